//! # outbox-kafka: the Kafka side of the outbox
//!
//! * [`Broker`]: the [`outbox::Sink`] named `"kafka"`, a librdkafka producer
//!   that keeps a whole claimed batch in flight and reports one result per
//!   message (too large: permanent; unreachable, timed out, unknown topic:
//!   transient). Configured with [`BrokerConfig`] in code or from the
//!   environment ([`BrokerConfig::from_env`]).
//! * [`publisher`]: `#[kafka::publisher("topic")]`, stacked on
//!   `#[outbox::subscriber]`, sends a handler's return value to a topic.
//! * [`relay`]: the stand-alone relay (the `outbox-relay` binary) that
//!   forwards every row of an outbox table with no user code.
//!
//! ```no_run
//! use outbox_kafka as kafka;
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Order { id: i64 }
//!
//! #[kafka::publisher("orders.kafka")]
//! #[outbox::subscriber("orders")]
//! async fn handle(order: Order) -> Order {
//!     order
//! }
//!
//! # async fn f(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! outbox::App::new(pool)
//!     .broker(kafka::Broker::from_env()?)
//!     .run_until_signal()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Every message carries the row's partition key as its key, and as headers
//! the row's own headers plus `outbox-id`, `outbox-queue`, `outbox-attempt`,
//! `outbox-correlation-id` and `outbox-created-at`. Delivery is at least once:
//! consumers de-duplicate on `outbox-id`.

mod broker;
mod config;
mod error;
mod properties;
pub mod relay;
mod topic;

pub use broker::{Broker, LogContext};
pub use config::{
    is_secret_key, parse_bool, parse_duration, parse_number, prop_key, Acks, BrokerConfig,
    Compression, ConfigError, DEFAULT_SERVERS, DEFAULT_WRITE_TIMEOUT, MAX_BATCH_SIZE, MAX_LINGER,
    MAX_WRITE_TIMEOUT, PROP_PREFIX,
};
pub use error::Error;
pub use topic::{check_topic_name, ensure_topic, MAX_TOPIC_LEN};

/// Sends a handler's return value to a Kafka topic; stack it on
/// `#[outbox::subscriber]`, in either order:
///
/// ```no_run
/// use outbox_kafka as kafka;
/// #[kafka::publisher("orders.kafka")]
/// #[outbox::subscriber("orders")]
/// async fn handle(order_id: i64) -> i64 {
///     order_id
/// }
/// ```
///
/// The value is serialized to JSON (`outbox::Raw` is sent as bytes,
/// `outbox::Keyed` sets the message key); the row is deleted only after Kafka
/// acknowledged the message. The app needs a [`Broker`]:
/// `App::new(pool).broker(kafka::Broker::from_env()?)`.
pub use outbox_macros::publisher;
