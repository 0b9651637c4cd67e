//! Where handlers' results go: brokers such as Kafka implement [`Sink`].

use futures::future::BoxFuture;
use std::time::Duration;

/// One message for a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Name of the sink (`"kafka"`).
    pub sink: String,
    /// Destination topic.
    pub topic: String,
    /// Message key (the row's partition key unless the handler chose one).
    pub key: Option<Vec<u8>>,
    /// Message body.
    pub payload: Vec<u8>,
    /// Headers: the row's own, plus `outbox-id`, `outbox-queue`, `outbox-attempt`,
    /// `outbox-correlation-id` and `outbox-created-at`.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Why a broker did not take a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    /// True when retrying cannot help (for example: message too large).
    pub permanent: bool,
    /// What went wrong, without credentials.
    pub message: String,
}

impl SinkError {
    /// A failure worth retrying.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            permanent: false,
            message: message.into(),
        }
    }
    /// A failure retrying cannot fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            permanent: true,
            message: message.into(),
        }
    }
}

/// A broker the runtime forwards handlers' results to.
///
/// `send` gets a whole claimed batch at once and must keep all of it in flight
/// together, answering one result per message, in order. A row is deleted only
/// when every message it produced is `Ok`.
pub trait Sink: Send + Sync + 'static {
    /// The name publishers refer to (`"kafka"`).
    fn name(&self) -> &str;

    /// Sends a batch; one result per message, in the same order.
    fn send(&self, batch: Vec<Outgoing>) -> BoxFuture<'_, Vec<Result<(), SinkError>>>;

    /// Waits until queued messages are delivered (at shutdown).
    fn flush(&self, _timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
