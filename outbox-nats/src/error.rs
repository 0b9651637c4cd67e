//! Errors of the NATS side that are not a message's (those are
//! [`outbox::SinkError`]s).

use crate::config::ConfigError;

/// What can go wrong outside a batch's publishes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is not valid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The client could not be set up (no credentials are shown).
    #[error("nats: {0}")]
    Connect(String),
    /// A stream could not be created or read.
    #[error("nats: {0}")]
    Stream(String),
}
