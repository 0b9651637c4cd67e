//! Errors of the outbox runtime.

use std::fmt;

/// Everything that can go wrong in the outbox runtime outside a handler.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database refused or failed a statement.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A setting, name or argument is not valid; the message says what is accepted.
    #[error("{0}")]
    Invalid(String),
    /// Several problems found at once while the app was built.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// A payload could not be serialized to JSON.
    #[error("payload does not serialize to JSON: {0}")]
    Serialize(#[source] serde_json::Error),
    /// Log capture cannot go on: the replication slot is lost, was dropped,
    /// or cannot be streamed; the message says what to do.
    #[error("log capture: {0}")]
    Capture(String),
    /// A migration failed.
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        /// Version of the failing migration.
        version: i32,
        /// Name of the failing migration.
        name: &'static str,
        /// What the database said.
        #[source]
        source: sqlx::Error,
    },
}

impl Error {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

/// Every problem found while validating an app, reported together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors {
    problems: Vec<String>,
}

impl ConfigErrors {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one problem.
    pub fn push(&mut self, problem: impl Into<String>) {
        self.problems.push(problem.into());
    }

    /// Adds every problem of another list, each prefixed with `context: `.
    pub fn extend_with(&mut self, context: &str, other: ConfigErrors) {
        for p in other.problems {
            self.problems.push(format!("{context}: {p}"));
        }
    }

    /// The problems, in the order they were found.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    /// True when nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// `Ok(())` when empty, the list as an error otherwise.
    pub fn into_result(self) -> Result<(), ConfigErrors> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.len() {
            0 => write!(f, "no configuration problems"),
            1 => write!(f, "invalid configuration: {}", self.problems[0]),
            n => {
                write!(f, "invalid configuration ({n} problems):")?;
                for p in &self.problems {
                    write!(f, "\n  - {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigErrors {}

/// Why a message failed for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureReason {
    /// The payload does not deserialize into the handler's argument type.
    Deserialize,
    /// The handler rejected the message explicitly.
    Rejected,
    /// The retry budget (attempts or total delay) is spent.
    RetriesExhausted,
    /// The broker refused the message for good (for example: too large).
    PublishRejected,
    /// The row was delivered `max_deliveries` times more than it was settled:
    /// the process handling it crashed, was killed or hung each time (a
    /// payload that aborts the process, exhausts its memory or blocks its
    /// worker). It is not handled again.
    Crashed,
}

impl FailureReason {
    /// Every reason, in the order the docs list them.
    pub const ALL: [FailureReason; 5] = [
        FailureReason::Deserialize,
        FailureReason::Rejected,
        FailureReason::RetriesExhausted,
        FailureReason::PublishRejected,
        FailureReason::Crashed,
    ];

    /// The reason as stored in the `failure_reason` column.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Deserialize => "deserialize",
            FailureReason::Rejected => "rejected",
            FailureReason::RetriesExhausted => "retries_exhausted",
            FailureReason::PublishRejected => "publish_rejected",
            FailureReason::Crashed => "crashed",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error a handler returns. Transient by default (retried by the strategy);
/// [`HandlerError::reject`] makes it permanent (straight to the dead letters).
///
/// Any error type converts into it with `?`:
///
/// ```
/// fn parse(s: &str) -> Result<i64, outbox::HandlerError> {
///     Ok(s.parse::<i64>()?)
/// }
/// assert!(parse("x").unwrap_err().is_transient());
/// let e = outbox::HandlerError::reject("order was cancelled");
/// assert!(!e.is_transient());
/// ```
pub struct HandlerError {
    kind: HandlerErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// Whether a [`HandlerError`] is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandlerErrorKind {
    /// Retried according to the subscriber's retry strategy.
    Transient,
    /// Not retried: the message goes to the dead letters (or is parked).
    Permanent(FailureReason),
}

impl HandlerError {
    /// A transient error with a message.
    pub fn transient(message: impl fmt::Display) -> Self {
        Self {
            kind: HandlerErrorKind::Transient,
            message: message.to_string(),
            source: None,
        }
    }

    /// A permanent error: the message is not retried.
    pub fn reject(message: impl fmt::Display) -> Self {
        Self::permanent(FailureReason::Rejected, message)
    }

    /// A permanent error with a given reason.
    pub fn permanent(reason: FailureReason, message: impl fmt::Display) -> Self {
        Self {
            kind: HandlerErrorKind::Permanent(reason),
            message: message.to_string(),
            source: None,
        }
    }

    /// The payload did not deserialize into the handler's type.
    pub fn deserialize(err: serde_json::Error) -> Self {
        Self::permanent(FailureReason::Deserialize, err)
    }

    /// Transient or permanent.
    pub fn kind(&self) -> HandlerErrorKind {
        self.kind
    }

    /// True when the retry strategy decides.
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, HandlerErrorKind::Transient)
    }

    /// The message, as stored in `last_error`.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The underlying error, when there is one.
    pub fn source(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

impl<E> From<E> for HandlerError
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn from(err: E) -> Self {
        let boxed: Box<dyn std::error::Error + Send + Sync> = err.into();
        Self {
            kind: HandlerErrorKind::Transient,
            message: boxed.to_string(),
            source: Some(boxed),
        }
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
