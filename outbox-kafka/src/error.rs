//! Errors of the Kafka broker and its helpers.

use crate::config::ConfigError;

/// Why a [`crate::Broker`] could not be made, or a topic not be created. No
/// message contains a credential.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is not valid; the message names it and says what is accepted.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// librdkafka refused the configuration (for example an unknown key passed
    /// through with `BrokerConfig::set`, or a codec it was built without).
    #[error("librdkafka refused the configuration: {0}")]
    Client(String),
    /// A topic could not be created or did not become ready.
    #[error("kafka topic {topic:?}: {message}")]
    Topic {
        /// The topic.
        topic: String,
        /// What went wrong.
        message: String,
    },
}
