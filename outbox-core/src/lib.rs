//! # outbox: a transactional outbox for PostgreSQL
//!
//! Write a business row and an outbox row in one transaction with [`publish`];
//! handlers annotated with [`subscriber`] are driven from the outbox rows by
//! [`App`], with leased batch claims, retries ([`ExponentialRetry`] and
//! friends) and dead letters. A row leaves the outbox only after its handler,
//! and every publish stacked on it, succeeded.
//!
//! ```no_run
//! #[derive(serde::Serialize, serde::Deserialize, Debug)]
//! struct Order { id: i64 }
//!
//! #[outbox::subscriber("orders")]
//! async fn handle(order: Order) {
//!     tracing::info!("got order {}", order.id);
//! }
//!
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://outbox:outbox@127.0.0.1:5432/outbox").await?;
//! outbox::migrate(&pool, &outbox::Tables::default()).await?;
//! let mut tx = pool.begin().await?;
//! outbox::publish(&mut *tx, "orders", &Order { id: 1 }).await?;
//! tx.commit().await?;
//! outbox::App::new(pool).run_until_signal().await?;
//! # Ok(()) }
//! ```

mod app;
pub mod capture;
pub mod claim;
#[cfg(feature = "cli")]
pub mod cli;
pub mod dlq;
mod envelope;
mod error;
mod handler;
mod listen;
pub mod logging;
pub mod metrics;
mod names;
#[cfg(feature = "capture")]
mod pgoutput;
pub mod pooler;
mod publish;
pub mod retry;
mod runtime;
mod schema;
pub mod settings;
mod sink;
mod sql;
#[cfg(feature = "capture")]
pub mod stream;
mod subscriber;

pub use app::{shutdown_signal, App, Running, DEFAULT_SHUTDOWN_TIMEOUT};
pub use capture::Capture;
pub use envelope::{Envelope, Meta};
pub use error::{ConfigErrors, Error, FailureReason, HandlerError, HandlerErrorKind};
pub use handler::{Ack, Context, FromContext, Handler, Output, State};
pub use names::{validate_queue, TableName, MAX_IDENTIFIER_BYTES, MAX_QUEUE_BYTES};
pub use pooler::Pooler;
pub use publish::{
    cancel_timer, publish, Message, OnConflict, Outbox, MAX_HEADERS_BYTES, MAX_HEADER_NAME_BYTES,
    MAX_PAYLOAD_BYTES, RESERVED_HEADER_PREFIX,
};
pub use retry::{ConstantRetry, ExponentialRetry, Failure, LinearRetry, NoRetry, RetryStrategy};
pub use schema::{expected_versions, migrate, migrate_dlq, Tables};
pub use sink::{Outgoing, Sink, SinkError};
pub use subscriber::{
    AckPolicy, PublisherSpec, Queues, Subscriber, DEFAULT_BATCH_SIZE, DEFAULT_CONCURRENCY,
    DEFAULT_LEASE_TTL, DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_DELIVERIES,
};

pub use outbox_macros::{publisher, subscriber};

/// The payload of a handler that wants the raw bytes, unchanged.
///
/// ```
/// #[outbox::subscriber("blobs")]
/// async fn store(blob: outbox::Raw) {
///     println!("{} bytes", blob.0.len());
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raw(pub Vec<u8>);

/// A handler's return value with an explicit message key, for stacked publishers.
///
/// ```
/// #[derive(serde::Serialize)]
/// struct Shipped { order: i64 }
/// #[outbox::subscriber("orders")]
/// async fn ship(order: i64) -> outbox::Keyed<Shipped> {
///     outbox::Keyed::new(format!("order-{order}"), Shipped { order })
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed<T> {
    /// The message key.
    pub key: String,
    /// The value, serialized to JSON.
    pub value: T,
}

impl<T> Keyed<T> {
    /// A value with a key.
    pub fn new(key: impl Into<String>, value: T) -> Self {
        Self {
            key: key.into(),
            value,
        }
    }
}

/// Support for the code `#[outbox::subscriber]` and `#[kafka::publisher]` generate.
/// Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use futures;
    pub use inventory;
    /// Stands for a stacked attribute that deferred its expansion.
    pub use outbox_macros::__outbox_stacked;
    pub use serde;
    pub use serde_json;

    use crate::{Envelope, HandlerError, Keyed, Raw, Subscriber};
    use std::any::TypeId;

    /// One handler found by the attribute macro.
    pub struct Registration {
        /// The function's name.
        pub name: &'static str,
        /// The function item's type id (for `App::subscriber(handle)`).
        pub type_id: fn() -> TypeId,
        /// Builds the subscriber.
        pub build: fn() -> Subscriber,
    }

    inventory::collect!(Registration);

    /// The type id of a value's type.
    pub fn type_id_of<T: 'static>(_: &T) -> TypeId {
        TypeId::of::<T>()
    }

    /// How a handler's payload argument is decoded.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot be a handler's payload: it does not implement serde::Deserialize",
        label = "the payload argument",
        note = "derive serde::Deserialize for it, or take outbox::Raw (the bytes) or serde_json::Value"
    )]
    pub trait FromPayload: Sized {
        /// Decodes; a failure is a permanent `deserialize` error.
        fn from_payload(env: &Envelope) -> Result<Self, HandlerError>;
    }

    impl<T: serde::de::DeserializeOwned> FromPayload for T {
        fn from_payload(env: &Envelope) -> Result<Self, HandlerError> {
            serde_json::from_slice(&env.payload).map_err(HandlerError::deserialize)
        }
    }

    impl FromPayload for Raw {
        fn from_payload(env: &Envelope) -> Result<Self, HandlerError> {
            Ok(Raw(env.payload.clone()))
        }
    }

    /// How a handler's return value becomes a message: `(key, payload)`.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot be published: it does not implement serde::Serialize",
        label = "the value a stacked publisher sends",
        note = "derive serde::Serialize for it, or return outbox::Raw (bytes) or outbox::Keyed<T> (with a key)"
    )]
    pub trait IntoMessage {
        /// Serializes; a failure is a permanent error.
        fn into_message(self) -> Result<(Option<Vec<u8>>, Vec<u8>), HandlerError>;
    }

    impl<T: serde::Serialize> IntoMessage for T {
        fn into_message(self) -> Result<(Option<Vec<u8>>, Vec<u8>), HandlerError> {
            serde_json::to_vec(&self).map(|p| (None, p)).map_err(|e| {
                HandlerError::reject(format!("return value does not serialize to JSON: {e}"))
            })
        }
    }

    impl<T: serde::Serialize> IntoMessage for Keyed<T> {
        fn into_message(self) -> Result<(Option<Vec<u8>>, Vec<u8>), HandlerError> {
            let (_, p) = self.value.into_message()?;
            Ok((Some(self.key.into_bytes()), p))
        }
    }

    impl IntoMessage for Keyed<Raw> {
        fn into_message(self) -> Result<(Option<Vec<u8>>, Vec<u8>), HandlerError> {
            Ok((Some(self.key.into_bytes()), self.value.0))
        }
    }

    impl IntoMessage for Raw {
        fn into_message(self) -> Result<(Option<Vec<u8>>, Vec<u8>), HandlerError> {
            Ok((None, self.0))
        }
    }

    /// Looks at a handler's return type: see [`PlainValue`].
    pub struct ReturnProbe<T>(std::marker::PhantomData<T>);

    /// Starts the check of a handler's return type (generated code calls this).
    pub fn probe_return<T>(_: &T) -> ReturnProbe<T> {
        ReturnProbe(std::marker::PhantomData)
    }

    /// What a handler returns when its `Result` was spelled with an alias whose
    /// name is not `Result`: the compile error names this type, which says the fix.
    #[derive(Debug)]
    pub struct ReturnTypeIsAResultAliasNameItResultOrWriteResultTE;

    impl<T, E> ReturnProbe<Result<T, E>> {
        /// Inherent, so it wins over [`PlainValue::check`] for a `Result`.
        pub fn check(&self) -> ReturnTypeIsAResultAliasNameItResultOrWriteResultTE {
            ReturnTypeIsAResultAliasNameItResultOrWriteResultTE
        }
    }

    /// The check for every return type that is not a `Result`.
    pub trait PlainValue {
        /// Returns `()`: the return type is a plain value.
        fn check(&self) {}
    }

    impl<T> PlainValue for ReturnProbe<T> {}

    /// Decodes the payload argument (generated code calls this).
    pub fn decode<T: FromPayload>(env: &Envelope) -> Result<T, HandlerError> {
        T::from_payload(env)
    }

    /// Encodes a return value (generated code calls this).
    pub fn encode<T: IntoMessage>(value: T) -> Result<(Option<Vec<u8>>, Vec<u8>), HandlerError> {
        value.into_message()
    }

    /// The error types a handler's `Err` may carry.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot be a handler's error: it does not convert into outbox::HandlerError",
        label = "the handler's `Err` type",
        note = "implement std::error::Error for it (then `Err` is a transient failure, retried), \
                or return outbox::HandlerError (HandlerError::reject(..) for a permanent one)"
    )]
    pub trait IntoHandlerError {
        /// Converts.
        fn into_handler_error(self) -> HandlerError;
    }

    impl<E: Into<HandlerError>> IntoHandlerError for E {
        fn into_handler_error(self) -> HandlerError {
            self.into()
        }
    }

    /// Converts a handler's `Err` (generated code calls this).
    pub fn into_handler_error<E: IntoHandlerError>(e: E) -> HandlerError {
        e.into_handler_error()
    }
}
