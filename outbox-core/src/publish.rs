//! Publishing rows into the outbox inside the caller's transaction.
//!
//! ```no_run
//! # async fn f(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
//! #[derive(serde::Serialize)]
//! struct Order { id: i64 }
//! let mut tx = pool.begin().await?;
//! // ... the business insert, in the same transaction ...
//! outbox::publish(&mut *tx, "orders", &Order { id: 1 }).await?;
//! outbox::Message::json("orders", &Order { id: 2 })?
//!     .key("customer-7")
//!     .header("source", "checkout")
//!     .activate_in(std::time::Duration::from_secs(30))
//!     .publish(&mut *tx)
//!     .await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```

use crate::{validate_queue, Capture, Error, Pooler, Tables};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest accepted header name, in bytes.
pub const MAX_HEADER_NAME_BYTES: usize = 255;
/// Largest accepted payload, in bytes (16 MiB). Every claimed row is held in
/// memory while its batch is handled; larger data belongs in object storage,
/// with a reference in the message.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;
/// Largest accepted total of a message's header names and values, in bytes
/// (64 KiB).
pub const MAX_HEADERS_BYTES: usize = 64 * 1024;
/// Header names reserved for the metadata the runtime adds when it publishes.
pub const RESERVED_HEADER_PREFIX: &str = "outbox-";

/// What to do when a message's `timer_id` is already pending in its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnConflict {
    /// Keep the pending timer; the new message is not written.
    #[default]
    Ignore,
    /// Replace the pending timer's payload, headers and due time (unless it is
    /// being delivered right now, in which case it is kept).
    Replace,
}

/// A message to publish: queue, payload and options.
#[derive(Debug, Clone)]
pub struct Message {
    pub(crate) queue: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) key: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) delay_us: Option<i64>,
    pub(crate) at_epoch_us: Option<i64>,
    pub(crate) timer: Option<(String, OnConflict)>,
}

impl Message {
    /// A message whose payload is `payload` serialized to JSON.
    pub fn json<T: Serialize + ?Sized>(
        queue: impl Into<String>,
        payload: &T,
    ) -> Result<Self, Error> {
        Ok(Self::bytes(
            queue,
            serde_json::to_vec(payload).map_err(Error::Serialize)?,
        ))
    }

    /// A message whose payload is the given bytes, unchanged.
    pub fn bytes(queue: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            queue: queue.into(),
            payload: payload.into(),
            headers: BTreeMap::new(),
            key: None,
            correlation_id: None,
            delay_us: None,
            at_epoch_us: None,
            timer: None,
        }
    }

    /// The partition key: the Kafka message key, and the unit of ordering for
    /// ordered subscribers.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header (forwarded as a Kafka header).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets a correlation id (forwarded as the `outbox-correlation-id` header).
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Delivers no sooner than `delay` after the transaction's statement runs
    /// (database clock).
    pub fn activate_in(mut self, delay: Duration) -> Self {
        self.delay_us = Some(i64::try_from(delay.as_micros()).unwrap_or(i64::MAX));
        self.at_epoch_us = None;
        self
    }

    /// Delivers no sooner than `at`.
    pub fn activate_at(mut self, at: SystemTime) -> Self {
        let us = match at.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
        };
        self.at_epoch_us = Some(us);
        self.delay_us = None;
        self
    }

    /// Makes the message a de-duplicated timer: at most one pending message per
    /// `(queue, timer_id)`; see [`OnConflict`] and [`cancel_timer`].
    pub fn timer_id(mut self, timer_id: impl Into<String>, on_conflict: OnConflict) -> Self {
        self.timer = Some((timer_id.into(), on_conflict));
        self
    }

    /// Writes the message into the default outbox table with the caller's
    /// executor (use `&mut *tx` for a transaction). Returns the row id, or
    /// `None` when a pending timer with the same id was kept.
    pub async fn publish<'c, E>(self, executor: E) -> Result<Option<i64>, Error>
    where
        E: sqlx::PgExecutor<'c>,
    {
        Outbox::default().publish_message(executor, self).await
    }

    /// The log-mode content after the version and the id (see [`crate::capture`]).
    fn log_body(&self) -> Vec<u8> {
        crate::capture::encode_body(
            &self.queue,
            self.key.as_deref(),
            self.correlation_id.as_deref(),
            &self.headers,
            &self.payload,
        )
    }

    /// Whether log mode can carry the message: the log has no "not before",
    /// so delayed messages and timers go to the table.
    fn fits_the_log(&self) -> bool {
        self.delay_us.is_none() && self.at_epoch_us.is_none() && self.timer.is_none()
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        validate_queue(&self.queue)?;
        if self.payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::invalid(format!(
                "payload of {} bytes is over the limit of {MAX_PAYLOAD_BYTES} bytes (16 MiB): \
                 put large data elsewhere (object storage, a table of its own) and publish a reference to it",
                self.payload.len()
            )));
        }
        let header_bytes: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if header_bytes > MAX_HEADERS_BYTES {
            return Err(Error::invalid(format!(
                "headers of {header_bytes} bytes (names and values) are over the limit of {MAX_HEADERS_BYTES} bytes (64 KiB)"
            )));
        }
        for name in self.headers.keys() {
            if name.is_empty() || name.len() > MAX_HEADER_NAME_BYTES {
                return Err(Error::invalid(format!(
                    "invalid header name {name:?}: accepted are 1 to {MAX_HEADER_NAME_BYTES} bytes"
                )));
            }
            if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(Error::invalid(format!(
                    "invalid header name {name:?}: whitespace and control characters are not accepted"
                )));
            }
            if name.starts_with(RESERVED_HEADER_PREFIX) {
                return Err(Error::invalid(format!(
                    "invalid header name {name:?}: names starting with {RESERVED_HEADER_PREFIX:?} are reserved for the runtime's metadata"
                )));
            }
        }
        for (name, value) in &self.headers {
            if value.contains('\0') {
                return Err(Error::invalid(format!(
                    "invalid value of header {name:?}: NUL characters are not accepted"
                )));
            }
        }
        for (what, v) in [
            ("partition key", &self.key),
            ("correlation id", &self.correlation_id),
        ] {
            if let Some(v) = v {
                if v.contains('\0') {
                    return Err(Error::invalid(format!(
                        "invalid {what}: NUL characters are not accepted"
                    )));
                }
            }
        }
        if let Some((id, _)) = &self.timer {
            if id.is_empty() || id.contains('\0') {
                return Err(Error::invalid(
                    "invalid timer id: accepted is non-empty text without NUL characters",
                ));
            }
        }
        Ok(())
    }
}

/// Publishes `payload` as JSON to `queue` in the default outbox table, inside
/// the caller's transaction or with any Postgres executor. Returns the row id.
pub async fn publish<'c, E, T>(executor: E, queue: &str, payload: &T) -> Result<i64, Error>
where
    E: sqlx::PgExecutor<'c>,
    T: Serialize + ?Sized,
{
    let id = Message::json(queue, payload)?.publish(executor).await?;
    Ok(id.expect("a message without a timer id is always written"))
}

/// Removes a pending timer. Returns whether one was removed; a timer being
/// delivered right now is not removed.
pub async fn cancel_timer<'c, E>(executor: E, queue: &str, timer_id: &str) -> Result<bool, Error>
where
    E: sqlx::PgExecutor<'c>,
{
    Outbox::default()
        .cancel_timer(executor, queue, timer_id)
        .await
}

/// Publishing into an outbox table of a given name.
///
/// ```
/// let ob = outbox::Outbox::new(outbox::Tables::new("billing_outbox", None).unwrap());
/// # let _ = ob;
/// ```
#[derive(Debug, Clone, Default)]
pub struct Outbox {
    tables: Tables,
    capture: Capture,
    pooler: Pooler,
}

impl Outbox {
    /// An outbox on the given tables.
    pub fn new(tables: Tables) -> Self {
        Self {
            tables,
            capture: Capture::Table,
            pooler: Pooler::None,
        }
    }

    /// Sends the statements as `pooler` needs it. With
    /// [`Pooler::Transaction`] (PgBouncer in transaction mode) they are not
    /// prepared, and the executor must be a transaction (`&mut *tx`): a
    /// statement sent outside a transaction block may be split by the pooler
    /// across two server connections (see [`crate::pooler`]).
    ///
    /// ```
    /// let ob = outbox::Outbox::default().pooler(outbox::Pooler::Transaction);
    /// assert_eq!(ob.pooler_in_use(), outbox::Pooler::Transaction);
    /// ```
    pub fn pooler(mut self, pooler: Pooler) -> Self {
        self.pooler = pooler;
        self
    }

    /// The pooler the statements are sent for.
    pub fn pooler_in_use(&self) -> Pooler {
        self.pooler
    }

    /// Where messages are written: rows of the table (the default) or
    /// messages in the write-ahead log ([`Capture::Log`], see
    /// [`crate::capture`]). Delayed messages and timers always go to the
    /// table.
    ///
    /// ```
    /// let ob = outbox::Outbox::default().capture(outbox::Capture::Log);
    /// assert_eq!(ob.capture_mode(), outbox::Capture::Log);
    /// ```
    pub fn capture(mut self, capture: Capture) -> Self {
        self.capture = capture;
        self
    }

    /// The capture mode in use.
    pub fn capture_mode(&self) -> Capture {
        self.capture
    }

    /// The tables in use.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// Publishes `payload` as JSON to `queue`.
    pub async fn publish<'c, E, T>(
        &self,
        executor: E,
        queue: &str,
        payload: &T,
    ) -> Result<i64, Error>
    where
        E: sqlx::PgExecutor<'c>,
        T: Serialize + ?Sized,
    {
        let id = self
            .publish_message(executor, Message::json(queue, payload)?)
            .await?;
        Ok(id.expect("a message without a timer id is always written"))
    }

    /// Publishes one message. Returns `None` when a pending timer was kept.
    pub async fn publish_message<'c, E>(
        &self,
        executor: E,
        msg: Message,
    ) -> Result<Option<i64>, Error>
    where
        E: sqlx::PgExecutor<'c>,
    {
        msg.validate()?;
        if self.capture == Capture::Log && msg.fits_the_log() {
            let body = msg.log_body();
            let id: Option<i64> = sqlx::query_scalar(&crate::sql::emit_one())
                .bind(crate::capture::prefix(&self.tables))
                .bind(body)
                .bind(self.tables.outbox.quoted())
                .bind(self.tables.outbox.to_string())
                .persistent(self.pooler.prepares())
                .fetch_optional(executor)
                .await?;
            return match id {
                Some(id) => Ok(Some(id)),
                None => Err(self.no_slot()),
            };
        }
        let headers = serde_json::to_value(&msg.headers).map_err(Error::Serialize)?;
        let replace = matches!(msg.timer, Some((_, OnConflict::Replace)));
        let sql = crate::sql::publish_one(&self.tables, replace);
        let id: Option<i64> = sqlx::query_scalar(&sql)
            .bind(&msg.queue)
            .bind(&msg.payload)
            .bind(headers)
            .bind(&msg.key)
            .bind(&msg.correlation_id)
            .bind(msg.delay_us)
            .bind(msg.at_epoch_us)
            .bind(msg.timer.as_ref().map(|(t, _)| t))
            .bind(self.tables.channel())
            .persistent(self.pooler.prepares())
            .fetch_optional(executor)
            .await?;
        Ok(id)
    }

    /// Publishes many messages in one statement. Timers in a batch keep a pending
    /// timer of the same id ([`OnConflict::Ignore`]); `Replace` is refused here.
    /// Returns the ids of the rows written.
    pub async fn publish_batch<'c, E>(
        &self,
        executor: E,
        msgs: Vec<Message>,
    ) -> Result<Vec<i64>, Error>
    where
        E: sqlx::PgExecutor<'c>,
    {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        if self.capture == Capture::Log {
            return self.publish_batch_to_log(executor, msgs).await;
        }
        self.publish_batch_to_table(executor, msgs).await
    }

    /// Log mode: one statement emits every message, in order. A batch with a
    /// delayed message or a timer goes to the table whole, in the order given
    /// (an executor serves one statement here, and splitting the batch would
    /// reorder it).
    async fn publish_batch_to_log<'c, E>(
        &self,
        executor: E,
        msgs: Vec<Message>,
    ) -> Result<Vec<i64>, Error>
    where
        E: sqlx::PgExecutor<'c>,
    {
        if msgs.iter().any(|m| !m.fits_the_log()) {
            return self.publish_batch_to_table(executor, msgs).await;
        }
        let mut bodies = Vec::with_capacity(msgs.len());
        for msg in &msgs {
            msg.validate()?;
            bodies.push(msg.log_body());
        }
        let n = bodies.len();
        let ids: Vec<i64> = sqlx::query_scalar(&crate::sql::emit_batch())
            .bind(crate::capture::prefix(&self.tables))
            .bind(bodies)
            .bind(self.tables.outbox.quoted())
            .bind(self.tables.outbox.to_string())
            .persistent(self.pooler.prepares())
            .fetch_all(executor)
            .await?;
        if ids.len() != n {
            return Err(self.no_slot());
        }
        Ok(ids)
    }

    /// The refusal of a log-mode publish while no slot can read it: the
    /// message would be in the WAL and never decoded.
    fn no_slot(&self) -> Error {
        Error::Capture(format!(
            "no replication slot can read log-mode messages of outbox table {} yet (none is \
             recorded for it in outbox_slots, or its first one is still being created), so \
             this message would never be sent; nothing was written. Start the relay (CAPTURE=log) \
             or the app with log capture once, or run `outbox slot create <slot>`, before \
             publishing in log mode (Capture::Table works meanwhile)",
            self.tables.outbox
        ))
    }

    async fn publish_batch_to_table<'c, E>(
        &self,
        executor: E,
        msgs: Vec<Message>,
    ) -> Result<Vec<i64>, Error>
    where
        E: sqlx::PgExecutor<'c>,
    {
        let n = msgs.len();
        let mut queues = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut headers = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut corr = Vec::with_capacity(n);
        let mut delays = Vec::with_capacity(n);
        let mut ats = Vec::with_capacity(n);
        let mut timers = Vec::with_capacity(n);
        for msg in msgs {
            msg.validate()?;
            if matches!(msg.timer, Some((_, OnConflict::Replace))) {
                return Err(Error::invalid(
                    "publish_batch does not accept OnConflict::Replace timers: publish them one by one",
                ));
            }
            headers.push(serde_json::to_value(&msg.headers).map_err(Error::Serialize)?);
            queues.push(msg.queue);
            payloads.push(msg.payload);
            keys.push(msg.key);
            corr.push(msg.correlation_id);
            delays.push(msg.delay_us);
            ats.push(msg.at_epoch_us);
            timers.push(msg.timer.map(|(t, _)| t));
        }
        let sql = crate::sql::publish_batch(&self.tables);
        let ids: Vec<i64> = sqlx::query_scalar(&sql)
            .bind(queues)
            .bind(payloads)
            .bind(headers)
            .bind(keys)
            .bind(corr)
            .bind(delays)
            .bind(ats)
            .bind(timers)
            .bind(self.tables.channel())
            .persistent(self.pooler.prepares())
            .fetch_all(executor)
            .await?;
        Ok(ids)
    }

    /// Removes a pending timer; see [`cancel_timer`].
    pub async fn cancel_timer<'c, E>(
        &self,
        executor: E,
        queue: &str,
        timer_id: &str,
    ) -> Result<bool, Error>
    where
        E: sqlx::PgExecutor<'c>,
    {
        validate_queue(queue)?;
        let done = sqlx::query(&crate::sql::cancel_timer(&self.tables))
            .bind(queue)
            .bind(timer_id)
            .persistent(self.pooler.prepares())
            .execute(executor)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
