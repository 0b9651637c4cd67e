//! A claimed row, as handlers see it.

use std::collections::BTreeMap;
use std::time::Duration;

/// One row claimed from the outbox, with its metadata.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Envelope {
    /// Row id (`outbox-id` header on Kafka): consumers de-duplicate on it.
    pub id: i64,
    /// The queue the row was published to.
    pub queue: String,
    /// The payload bytes (JSON when published with [`crate::publish`]).
    pub payload: Vec<u8>,
    /// Headers given at publish time.
    pub headers: BTreeMap<String, String>,
    /// Partition key, if any.
    pub key: Option<String>,
    /// Correlation id, if any.
    pub correlation_id: Option<String>,
    /// This delivery's number, starting at 1.
    pub attempt: u32,
    /// Failed attempts before this one.
    pub failures: u32,
    /// When the row was published, in milliseconds since the Unix epoch (database clock).
    pub created_at_ms: i64,
    /// Time since the first delivery started (database clock).
    pub elapsed: Duration,
}

impl Envelope {
    /// An envelope for tests of handlers, with attempt 1.
    ///
    /// ```
    /// let env = outbox::Envelope::new(1, "orders", br#"{"id":1}"#.to_vec());
    /// assert_eq!(env.attempt, 1);
    /// ```
    pub fn new(id: i64, queue: impl Into<String>, payload: Vec<u8>) -> Self {
        Self {
            id,
            queue: queue.into(),
            payload,
            headers: BTreeMap::new(),
            key: None,
            correlation_id: None,
            attempt: 1,
            failures: 0,
            created_at_ms: 0,
            elapsed: Duration::ZERO,
        }
    }

    /// The same envelope with a partition key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The same envelope with a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Deserializes the JSON payload; a failure is a permanent `deserialize` error.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, crate::HandlerError> {
        serde_json::from_slice(&self.payload).map_err(crate::HandlerError::deserialize)
    }

    pub(crate) fn from_row(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let headers: sqlx::types::Json<BTreeMap<String, serde_json::Value>> = row.try_get(3)?;
        let headers = headers
            .0
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect();
        let deliveries: i32 = row.try_get(7)?;
        let attempts: i32 = row.try_get(6)?;
        let elapsed_us: Option<i64> = row.try_get(9)?;
        Ok(Self {
            id: row.try_get(0)?,
            queue: row.try_get(1)?,
            payload: row.try_get(2)?,
            headers,
            key: row.try_get(4)?,
            correlation_id: row.try_get(5)?,
            failures: attempts.max(0) as u32,
            attempt: deliveries.max(1) as u32,
            created_at_ms: row.try_get(8)?,
            elapsed: Duration::from_micros(elapsed_us.unwrap_or(0).max(0) as u64),
        })
    }
}

/// Message metadata a handler can take as an argument.
///
/// ```
/// #[outbox::subscriber("audit")]
/// async fn audit(body: serde_json::Value, meta: outbox::Meta) {
///     println!("row {} of {} (attempt {}): {body}", meta.id, meta.queue, meta.attempt);
/// }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Meta {
    /// Row id.
    pub id: i64,
    /// Queue.
    pub queue: String,
    /// Headers.
    pub headers: BTreeMap<String, String>,
    /// Delivery number, from 1.
    pub attempt: u32,
    /// Partition key.
    pub key: Option<String>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// Publish time, ms since the Unix epoch.
    pub created_at_ms: i64,
}

impl From<&Envelope> for Meta {
    fn from(e: &Envelope) -> Self {
        Self {
            id: e.id,
            queue: e.queue.clone(),
            headers: e.headers.clone(),
            attempt: e.attempt,
            key: e.key.clone(),
            correlation_id: e.correlation_id.clone(),
            created_at_ms: e.created_at_ms,
        }
    }
}
