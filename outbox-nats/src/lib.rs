//! # outbox-nats: the NATS JetStream side of the outbox
//!
//! * [`Broker`]: the [`outbox::Sink`] named `"nats"`, a JetStream publisher
//!   on [async-nats](https://docs.rs/async-nats) that keeps a whole claimed
//!   batch in flight and reports one result per message (too large:
//!   permanent; no stream, timed out, connection lost: transient).
//!   Configured with [`BrokerConfig`] in code or from the environment
//!   ([`BrokerConfig::from_env`]).
//! * [`ensure_stream`]: creates a stream; the broker never does.
//!
//! ```no_run
//! use outbox_nats as nats;
//!
//! # async fn f(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! outbox::App::new(pool)
//!     .broker(nats::Broker::from_env()?)
//!     .run_until_signal()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Every message carries `Nats-Msg-Id` (the outbox id, so that JetStream's
//! duplicate window drops re-sends) and the outbox headers `outbox-id`,
//! `outbox-queue`, `outbox-attempt`, `outbox-correlation-id`,
//! `outbox-created-at` and `outbox-key`, next to the row's own headers (see
//! [`Broker`]).

mod broker;
mod config;
mod error;
mod subject;

pub use broker::{Broker, KEY_HEADER, MSG_ID_HEADER, NATS_HEADER_PREFIX};
pub use config::{
    parse_duration, BrokerConfig, ConfigError, DEFAULT_TIMEOUT, DEFAULT_URL, MAX_TIMEOUT,
};
pub use error::Error;
pub use subject::{check_subject, ensure_stream};
