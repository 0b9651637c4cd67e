//! # outbox-nats: the NATS JetStream side of the outbox
//!
//! * [`Broker`]: the [`outbox::Sink`] named `"nats"`, a JetStream publisher
//!   on [async-nats](https://docs.rs/async-nats) that keeps a whole claimed
//!   batch in flight and reports one result per message (too large:
//!   permanent; no stream, timed out, connection lost: transient).
//!   Configured with [`BrokerConfig`] in code or from the environment
//!   ([`BrokerConfig::from_env`]).
//! * [`publisher`]: `#[nats::publisher("subject")]`, stacked on
//!   `#[outbox::subscriber]` (and beside any other publishers), sends a
//!   handler's return value to a subject.
//! * [`ensure_stream`]: creates a stream; the broker never does.
//!
//! ```no_run
//! use outbox_nats as nats;
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Order { id: i64 }
//!
//! #[nats::publisher("orders.created")]
//! #[outbox::subscriber("orders")]
//! async fn handle(order: Order) -> Order {
//!     order
//! }
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

/// Sends a handler's return value to a NATS JetStream subject; stack it on
/// `#[outbox::subscriber]`, in any order, next to any other publishers:
///
/// ```no_run
/// use outbox_nats as nats;
/// use outbox_kafka as kafka;
/// #[nats::publisher("orders.created")]
/// #[outbox::subscriber("orders")]
/// #[kafka::publisher("orders.kafka")]
/// async fn handle(order_id: i64) -> i64 {
///     order_id
/// }
/// ```
///
/// The subject is checked at compile time (tokens separated by single dots,
/// no whitespace, no wildcards). The value is serialized to JSON
/// (`outbox::Raw` is sent as bytes, `outbox::Keyed`'s key goes in the
/// `outbox-key` header); the row is deleted only after JetStream acknowledged
/// the message. The app needs a [`Broker`]:
/// `App::new(pool).broker(nats::Broker::from_env()?)`.
pub use outbox_macros::nats_publisher as publisher;
