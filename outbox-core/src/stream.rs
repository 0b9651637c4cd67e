//! Streaming log-mode messages from a replication slot to a broker (feature
//! `capture`).
//!
//! A [`LogStream`] reads the messages [`crate::Capture::Log`] wrote, in commit
//! order, from a logical replication slot (plugin `pgoutput`, `messages
//! 'true'`), sends them to a [`Sink`] with many batches in flight, and
//! confirms a position (LSN) to the server only once every message of every
//! transaction up to it was acked by the broker, moved into the outbox table
//! or dead-lettered. A restart resumes from the confirmed position:
//! at-least-once, with duplicates bounded by what was in flight.
//!
//! What fails does not block the stream:
//! - a message the broker refuses for good is dead-lettered (`publish_rejected`),
//!   one its route refuses as well (`rejected`), and one that cannot be
//!   decoded (`rejected`, with the decoding error);
//! - a message that fails transiently is moved into the outbox table with
//!   its attempt counted and its next time from the retry strategy; the
//!   table-mode runtime (the relay runs both) retries it and dead-letters it
//!   at the end of its budget;
//! - a message whose key already has a failed message in the table follows it
//!   there, so that the key keeps its order, until the key's rows are done.
//!
//! When every message of a batch fails transiently (the broker is down), the
//! batch is sent again after a pause ([`PAUSE_TRIES`] times), and the stream
//! stops reading while its window is full; only then are the messages moved.
//!
//! The slot is created on the first start ([`create_slot`]) and recorded in
//! `outbox_slots`. A recorded slot that is gone, or that PostgreSQL
//! invalidated (`wal_status = 'lost'`), stops the stream with
//! [`Error::Capture`]: a new slot would start at the current position and
//! skip whatever was written since the old one's last confirmation.
//! Re-creating it is an explicit step ([`drop_slot`], then [`create_slot`]).
//! A slot streams to one reader at a time: a second stream on the same slot
//! waits as a standby and takes over when the first one ends.

use crate::capture::{prefix, LogMessage};
use crate::claim::storable;
use crate::{
    Envelope, Error, Failure, FailureReason, HandlerError, Outgoing, RetryStrategy, Sink,
    SinkError, Tables,
};
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig,
};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counter: log messages read from the slot, by `queue`.
pub const READ_TOTAL: &str = "outbox_capture_read_total";
/// Counter: log messages acked by the broker, by `queue`.
pub const SENT_TOTAL: &str = "outbox_capture_sent_total";
/// Counter: log messages moved into the outbox table, by `queue` and
/// `reason` (`failed`: a transient failure; `key_held`: their key had a
/// failed message in the table; `deferred`: no handler of the app takes
/// their queue, or an earlier message of their key failed in the same
/// batch; `contained`: the slot's last reader died and may have been
/// handling them).
pub const MOVED_TOTAL: &str = "outbox_capture_moved_total";
/// Counter: log messages dead-lettered (or parked) straight from the stream,
/// by `queue` and `reason`.
pub const DEAD_LETTERED_TOTAL: &str = "outbox_capture_dead_lettered_total";
/// Gauge: bytes of WAL the slot holds back (`pg_current_wal_lsn()` minus the
/// slot's confirmed position), by `slot`, sampled every 5 s.
pub const SLOT_LAG_BYTES: &str = "outbox_capture_slot_lag_bytes";
/// Gauge: seconds since the oldest transaction not yet confirmed was read,
/// by `slot`.
pub const UNCONFIRMED_AGE_SECONDS: &str = "outbox_capture_unconfirmed_age_seconds";

/// Describes the log stream's metrics to the installed recorder.
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_counter!(READ_TOTAL, Unit::Count, "Log messages read from the slot");
    describe_counter!(SENT_TOTAL, Unit::Count, "Log messages acked by the broker");
    describe_counter!(
        MOVED_TOTAL,
        Unit::Count,
        "Log messages moved into the outbox table"
    );
    describe_counter!(
        DEAD_LETTERED_TOTAL,
        Unit::Count,
        "Log messages dead-lettered straight from the stream"
    );
    describe_gauge!(
        SLOT_LAG_BYTES,
        Unit::Bytes,
        "WAL the replication slot holds back"
    );
    describe_gauge!(
        UNCONFIRMED_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest transaction read and not yet confirmed"
    );
}

/// The `reason`s of [`MOVED_TOTAL`].
const MOVED_REASONS: [&str; 4] = ["failed", "key_held", "deferred", "contained"];

/// Creates the stream's counters of `queue` at zero, when the stream first
/// reads one of its messages: `increase(...)` then sees the first failure
/// too, instead of a series that begins with it.
fn zero_counters(queue: &str) {
    for name in [READ_TOTAL, SENT_TOTAL] {
        metrics::counter!(name, "queue" => queue.to_owned()).increment(0);
    }
    for reason in MOVED_REASONS {
        metrics::counter!(MOVED_TOTAL, "queue" => queue.to_owned(), "reason" => reason)
            .increment(0);
    }
    for reason in FailureReason::ALL {
        metrics::counter!(DEAD_LETTERED_TOTAL, "queue" => queue.to_owned(), "reason" => reason.as_str())
            .increment(0);
    }
}

/// How many times a batch whose every message failed transiently is sent
/// again (after 1, 2, 4 s) before its messages are moved into the table.
pub const PAUSE_TRIES: u32 = 3;
/// Default interval of the heartbeat that lets an idle database's slot
/// advance (see [`LogCapture::heartbeat`]).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// How often the slot's lag ([`SLOT_LAG_BYTES`]) is sampled.
const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Default slot of a [`LogCapture`].
pub const DEFAULT_SLOT: &str = "outbox_app";
/// Default publication of a [`LogCapture`].
pub const DEFAULT_PUBLICATION: &str = "outbox_relay";
/// Default number of messages sent per batch.
pub const DEFAULT_BATCH: usize = 1000;
/// Default number of messages in flight (sent, not yet settled).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 20_000;

/// Chooses the broker message for a log message, or refuses it for good
/// (it is then dead-lettered as `rejected` with the text returned). The
/// stream adds the outbox headers (`outbox-id`, ...) itself.
pub type Route = Arc<dyn Fn(&Envelope) -> Result<Outgoing, String> + Send + Sync>;

/// Checks a slot or publication name: PostgreSQL's rules for slot names
/// (lower-case letters, digits and `_`, at most 63 bytes), applied to both
/// so that neither needs quoting anywhere.
///
/// ```
/// assert!(outbox::stream::validate_slot_name("SLOT_NAME", "outbox_relay").is_ok());
/// assert!(outbox::stream::validate_slot_name("SLOT_NAME", "Relay-1").is_err());
/// ```
pub fn validate_slot_name(what: &str, name: &str) -> Result<(), Error> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(Error::invalid(format!(
            "{what}: {name:?} is not a valid name (accepted: 1 to 63 lower-case letters, digits and _)"
        )));
    }
    Ok(())
}

/// What the server says of a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotStatus {
    /// The slot's name.
    pub slot: String,
    /// Whether the server has the slot.
    pub exists: bool,
    /// Whether `outbox_slots` records it as created for an outbox.
    pub recorded: bool,
    /// `reserved`, `extended`, `unreserved` or `lost` (`pg_replication_slots.wal_status`).
    pub wal_status: Option<String>,
    /// The process streaming it now, if any.
    pub active_pid: Option<i32>,
    /// The position confirmed by its reader.
    pub confirmed_lsn: Option<String>,
    /// WAL bytes it holds back.
    pub lag_bytes: Option<i64>,
    /// Its output plugin (`pgoutput` for ours).
    pub plugin: Option<String>,
    /// The database it decodes, when not the pool's own (slot names are
    /// shared by every database of a server).
    pub other_database: Option<String>,
}

/// Creates `outbox_slots`, or adds the columns it lacks, only when needed:
/// DDL on every start would put a catalog change into the WAL that every
/// new session of the slot then decodes.
async fn ensure_slots_table(pool: &PgPool) -> Result<(), Error> {
    let columns: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass('outbox_slots') \
         AND attname IN ('reader', 'settled_lsn') AND NOT attisdropped",
    )
    .fetch_one(pool)
    .await?;
    if columns < 2 {
        sqlx::query(crate::schema::SLOTS_TABLE)
            .execute(pool)
            .await?;
        sqlx::query(crate::schema::SLOTS_COLUMNS)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// The status of slot `slot` in the pool's database.
pub async fn slot_status(pool: &PgPool, slot: &str) -> Result<SlotStatus, Error> {
    use sqlx::Row;
    let row = sqlx::query(
        "SELECT wal_status, active_pid, confirmed_flush_lsn::text, \
                (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, plugin, \
                CASE WHEN database IS DISTINCT FROM current_database() THEN coalesce(database, '(none: a physical slot)') END \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?;
    // `outbox_slots` exists once a slot was created: look it up only then.
    let registry: Option<String> = sqlx::query_scalar("SELECT to_regclass('outbox_slots')::text")
        .fetch_one(pool)
        .await?;
    let recorded = match registry {
        Some(_) => {
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox_slots WHERE slot_name = $1)")
                .bind(slot)
                .fetch_one(pool)
                .await?
        }
        None => false,
    };
    Ok(match row {
        Some(r) => SlotStatus {
            slot: slot.to_owned(),
            exists: true,
            recorded,
            wal_status: r.try_get(0)?,
            active_pid: r.try_get(1)?,
            confirmed_lsn: r.try_get(2)?,
            lag_bytes: r.try_get(3)?,
            plugin: r.try_get(4)?,
            other_database: r.try_get(5)?,
        },
        None => SlotStatus {
            slot: slot.to_owned(),
            exists: false,
            recorded,
            wal_status: None,
            active_pid: None,
            confirmed_lsn: None,
            lag_bytes: None,
            plugin: None,
            other_database: None,
        },
    })
}

/// Creates publication `publication` (with no tables: log messages need
/// none) when missing, and logical slot `slot` (plugin `pgoutput`), and
/// records the slot in `outbox_slots`. Returns the slot's starting position.
/// Needs the REPLICATION attribute and the right to create publications.
pub async fn create_slot(
    pool: &PgPool,
    tables: &Tables,
    slot: &str,
    publication: &str,
) -> Result<String, Error> {
    validate_slot_name("slot", slot)?;
    validate_slot_name("publication", publication)?;
    ensure_publication(pool, publication).await?;
    ensure_slots_table(pool).await?;
    let lsn: String = sqlx::query_scalar(
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
    )
    .bind(slot)
    .fetch_one(pool)
    .await
    .map_err(|e| capture_db_error(e, slot))?;
    sqlx::query(
        "INSERT INTO outbox_slots (slot_name, publication, outbox_table, created_lsn) \
         VALUES ($1, $2, $3, $4::pg_lsn) ON CONFLICT (slot_name) DO UPDATE SET \
         publication = excluded.publication, outbox_table = excluded.outbox_table, \
         created_at = now(), created_lsn = excluded.created_lsn, reader = NULL, settled_lsn = NULL",
    )
    .bind(slot)
    .bind(publication)
    .bind(tables.outbox.to_string())
    .bind(&lsn)
    .execute(pool)
    .await?;
    tracing::info!(slot, publication, lsn = %lsn, "replication slot created");
    Ok(lsn)
}

/// Drops slot `slot` (when the server has it) and its record. Everything
/// not yet confirmed through it is given up: only for a slot that is lost,
/// or whose messages are no longer wanted. Returns whether the server had it.
pub async fn drop_slot(pool: &PgPool, slot: &str) -> Result<bool, Error> {
    validate_slot_name("slot", slot)?;
    let dropped: bool = sqlx::query_scalar(
        "SELECT count(pg_drop_replication_slot(slot_name)) > 0 FROM pg_replication_slots \
         WHERE slot_name = $1 AND database = current_database()",
    )
    .bind(slot)
    .fetch_one(pool)
    .await
    .map_err(|e| capture_db_error(e, slot))?;
    if sqlx::query_scalar::<_, Option<String>>("SELECT to_regclass('outbox_slots')::text")
        .fetch_one(pool)
        .await?
        .is_some()
    {
        sqlx::query("DELETE FROM outbox_slots WHERE slot_name = $1")
            .bind(slot)
            .execute(pool)
            .await?;
    }
    Ok(dropped)
}

async fn ensure_publication(pool: &PgPool, publication: &str) -> Result<(), Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(publication)
            .fetch_one(pool)
            .await?;
    if !exists {
        // The name was validated: lower-case letters, digits and `_` only.
        match sqlx::query(&format!("CREATE PUBLICATION \"{publication}\""))
            .execute(pool)
            .await
        {
            Ok(_) => tracing::info!(publication, "publication created"),
            // Another instance created it at the same moment.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The error of a slot statement, with what to do about the usual causes.
fn capture_db_error(e: sqlx::Error, slot: &str) -> Error {
    if let sqlx::Error::Database(db) = &e {
        let hint = match db.code().as_deref() {
            Some("42501") => {
                "the role needs the REPLICATION attribute (ALTER ROLE ... REPLICATION)"
            }
            Some("55000") => {
                "the server needs wal_level = logical (postgresql.conf, then a restart)"
            }
            Some("53400") => "max_replication_slots is reached: raise it, or drop an unused slot",
            Some("42710") => "a slot of that name exists already",
            Some("55006") => "the slot is being streamed right now",
            _ => "",
        };
        if !hint.is_empty() {
            return Error::Capture(format!("slot {slot:?}: {}: {hint}", db.message()));
        }
    }
    e.into()
}

/// Where and how a log stream reads: the database's URL (the replication
/// connection is made from it), the slot and publication, and the stream's
/// batch and window. Shared by the relay's [`LogStream`] and an app's
/// handlers ([`crate::App::capture_log`]).
///
/// ```
/// use outbox::stream::LogCapture;
/// let capture = LogCapture::new("postgres://outbox:outbox@127.0.0.1/outbox")
///     .slot("orders_app")
///     .batch_size(200);
/// assert_eq!(capture.slot_name(), "orders_app");
/// ```
#[derive(Clone)]
pub struct LogCapture {
    url: String,
    slot: String,
    publication: String,
    batch: usize,
    max_in_flight: usize,
    heartbeat: Duration,
    create: bool,
    table: Option<Arc<CaptureTable>>,
}

impl std::fmt::Debug for LogCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogCapture")
            .field("url", &crate::logging::redact_url(&self.url))
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("batch", &self.batch)
            .field("max_in_flight", &self.max_in_flight)
            .field("heartbeat", &self.heartbeat)
            .field("create", &self.create)
            .field("table", &self.table)
            .finish()
    }
}

impl LogCapture {
    /// Reads slot [`DEFAULT_SLOT`] (publication [`DEFAULT_PUBLICATION`]),
    /// created on the first start, of the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            slot: DEFAULT_SLOT.into(),
            publication: DEFAULT_PUBLICATION.into(),
            batch: DEFAULT_BATCH,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            heartbeat: DEFAULT_HEARTBEAT,
            create: true,
            table: None,
        }
    }

    /// The slot's name (checked by [`validate_slot_name`] when the stream
    /// starts). Slot names are shared by every database of the server, and
    /// each reader of the outbox (an app, a relay) needs a slot of its own.
    pub fn slot(mut self, slot: impl Into<String>) -> Self {
        self.slot = slot.into();
        self
    }

    /// The slot's name.
    pub fn slot_name(&self) -> &str {
        &self.slot
    }

    /// The publication's name.
    pub fn publication(mut self, publication: impl Into<String>) -> Self {
        self.publication = publication.into();
        self
    }

    /// Messages per batch (default [`DEFAULT_BATCH`]).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// Messages in flight at most (default [`DEFAULT_MAX_IN_FLIGHT`]): the
    /// bound on what a crash can send twice.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// How often, with nothing in flight, the stream writes a tiny
    /// non-transactional message of its own so that its slot can be
    /// confirmed past the WAL other databases and tables write (default
    /// [`DEFAULT_HEARTBEAT`]). An idle database must not hold back WAL.
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every.max(Duration::from_millis(10));
        self
    }

    /// Also captures the rows inserted into a table of producers' own (see
    /// [`CaptureTable`]): the table is added to the publication at start.
    pub fn capture_table(mut self, table: CaptureTable) -> Self {
        self.table = Some(Arc::new(table));
        self
    }

    /// Whether a missing slot that `outbox_slots` does not record is created
    /// (the default) or is an error.
    pub fn create_slot(mut self, on: bool) -> Self {
        self.create = on;
        self
    }
}

/// What a delivery of one message came to.
pub(crate) enum Verdict {
    /// Sent (or handled) for good.
    Done,
    /// Failed transiently: moved into the table with its first attempt
    /// counted, `delay` from the retry strategy. `broker` when the broker
    /// failed (a batch whose every message did pauses the stream).
    Retry {
        error: String,
        delay: Duration,
        broker: bool,
    },
    /// Moved into the table untried (no handler for its queue, or a key
    /// whose earlier message failed in the same batch).
    Defer,
    /// Failed for good: dead-lettered with its reason.
    Fail(FailureReason, String),
}

/// Where a stream's messages go: a broker (the relay) or an app's handlers.
pub(crate) trait Deliver: Send + Sync + 'static {
    /// One verdict per message, in order. Called in stream order.
    fn deliver(
        &self,
        batch: Vec<Arc<Envelope>>,
    ) -> futures::future::BoxFuture<'static, Vec<Verdict>>;

    /// The tables a failed message of `queue` goes to (default: the stream's).
    fn tables_for(&self, _queue: &str, stream: &Tables) -> Tables {
        stream.clone()
    }
}

/// The relay's delivery: each message routed to a broker message and sent.
struct Relay {
    sink: Arc<dyn Sink>,
    route: Route,
    retry: Arc<dyn RetryStrategy>,
}

impl Deliver for Relay {
    fn deliver(
        &self,
        batch: Vec<Arc<Envelope>>,
    ) -> futures::future::BoxFuture<'static, Vec<Verdict>> {
        let mut verdicts: Vec<Option<Verdict>> = Vec::with_capacity(batch.len());
        let mut out = Vec::new();
        for env in &batch {
            match (self.route)(env) {
                Ok(mut o) => {
                    crate::runtime::add_headers(&mut o, env);
                    out.push(o);
                    verdicts.push(None);
                }
                // The route's refusals are known before the send.
                Err(why) => verdicts.push(Some(Verdict::Fail(FailureReason::Rejected, why))),
            }
        }
        let sink = self.sink.clone();
        let retry = self.retry.clone();
        async move {
            let n = out.len();
            let mut results = if out.is_empty() {
                Vec::new()
            } else {
                sink.send(out).await
            };
            results.resize_with(n, || {
                Err(SinkError::transient(
                    "the sink answered fewer results than messages",
                ))
            });
            let mut results = results.into_iter();
            verdicts
                .into_iter()
                .map(|v| match v {
                    Some(v) => v,
                    None => match results.next() {
                        Some(Ok(())) => Verdict::Done,
                        Some(Err(e)) if e.permanent => {
                            Verdict::Fail(FailureReason::PublishRejected, e.message)
                        }
                        Some(Err(e)) => first_retry(&*retry, e.message, true),
                        None => unreachable!("resized to the messages sent"),
                    },
                })
                .collect()
        }
        .boxed()
    }
}

/// The verdict on a message's first transient failure: moved into the table
/// with the strategy's delay, or dead-lettered when the strategy allows no
/// retry at all.
pub(crate) fn first_retry(retry: &dyn RetryStrategy, error: String, broker: bool) -> Verdict {
    let err = HandlerError::transient(&error);
    match retry.next_delay(&Failure::new(1, Duration::ZERO, &err)) {
        Some(delay) => Verdict::Retry {
            error,
            delay,
            broker,
        },
        None => Verdict::Fail(FailureReason::RetriesExhausted, error),
    }
}

/// Streams log-mode messages from a replication slot to a sink; see the
/// [module docs](self).
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool, sink: std::sync::Arc<dyn outbox::Sink>) -> Result<(), outbox::Error> {
/// use outbox::stream::{LogCapture, LogStream};
/// let route = std::sync::Arc::new(|env: &outbox::Envelope| {
///     Ok(outbox::Outgoing {
///         sink: "kafka".into(),
///         topic: env.queue.clone(),
///         key: env.key.clone().map(String::into_bytes),
///         payload: env.payload.clone(),
///         headers: Vec::new(),
///     })
/// });
/// let capture = LogCapture::new("postgres://outbox:outbox@127.0.0.1/outbox").slot("outbox_relay");
/// LogStream::new(pool, capture, sink, route)
///     .run(outbox::shutdown_signal())
///     .await?;
/// # Ok(()) }
/// ```
pub struct LogStream {
    pool: PgPool,
    tables: Tables,
    s: LogCapture,
    target: Target,
    /// Set for an app's handlers: after a reader of the slot died while
    /// handling, the messages it may have had in flight go through the
    /// table (see [`LogStream::run`]).
    contain: bool,
}

enum Target {
    Relay {
        sink: Arc<dyn Sink>,
        route: Route,
        retry: Arc<dyn RetryStrategy>,
    },
    Other(Arc<dyn Deliver>),
}

impl std::fmt::Debug for LogStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStream")
            .field("tables", &self.tables)
            .field("capture", &self.s)
            .finish_non_exhaustive()
    }
}

impl LogStream {
    /// A stream of the default outbox's messages, read as `capture` says,
    /// each routed by `route` and sent to `sink`. `pool` serves the slot
    /// checks, the heartbeat and the writes of failed messages.
    pub fn new(pool: PgPool, capture: LogCapture, sink: Arc<dyn Sink>, route: Route) -> Self {
        Self {
            pool,
            tables: Tables::default(),
            s: capture,
            target: Target::Relay {
                sink,
                route,
                retry: Arc::new(crate::ExponentialRetry::default()),
            },
            contain: false,
        }
    }

    /// A stream delivering to an app's handlers.
    pub(crate) fn to_handlers(
        pool: PgPool,
        capture: LogCapture,
        tables: Tables,
        target: Arc<dyn Deliver>,
    ) -> Self {
        Self {
            pool,
            tables,
            s: capture,
            target: Target::Other(target),
            contain: true,
        }
    }

    /// The outbox (its name is the messages' prefix, failed messages go to
    /// its table and dead letters to its dead-letter table).
    pub fn tables(mut self, tables: Tables) -> Self {
        self.tables = tables;
        self
    }

    /// The retry strategy that schedules a message moved into the table
    /// after a transient failure (its first attempt counted).
    pub fn retry(mut self, strategy: impl RetryStrategy) -> Self {
        if let Target::Relay { retry, .. } = &mut self.target {
            *retry = Arc::new(strategy);
        }
        self
    }

    /// Streams until `shutdown` completes (then drains what is in flight and
    /// confirms it) or until the slot cannot be streamed ([`Error::Capture`]).
    /// A lost connection is retried with backoff from the confirmed position.
    ///
    /// For an app's handlers, a reader that takes the slot over from one
    /// that did not stop cleanly (killed, crashed: `outbox_slots.reader` is
    /// still set) cannot tell which message killed it. So the first
    /// messages it reads, up to twice the in-flight window and no further
    /// than the WAL written before it started, are moved into the table
    /// untried, where the table workers' crash containment applies: a
    /// message that kills the process every time it is handled is
    /// dead-lettered as `crashed` after `max_deliveries`, and the healthy
    /// ones are handled once.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        validate_slot_name("slot", &self.s.slot)?;
        validate_slot_name("publication", &self.s.publication)?;
        let base = replication_config(&self.s.url, &self.s.slot, &self.s.publication)?;
        let target: Arc<dyn Deliver> = match &self.target {
            Target::Relay { sink, route, retry } => Arc::new(Relay {
                sink: sink.clone(),
                route: route.clone(),
                retry: retry.clone(),
            }),
            Target::Other(t) => t.clone(),
        };
        let mut shutdown = std::pin::pin!(shutdown);
        let mut confirmed = self.prepare_slot().await?;
        let mut backoff = Duration::from_millis(200);
        let mut standby_logged = false;
        let me = uuid::Uuid::new_v4();
        loop {
            // Checked on every (re)connection: a slot lost while we were
            // away must stop the stream, not be streamed from a new start.
            let status = slot_status(&self.pool, &self.s.slot).await?;
            check_slot(&status)?;
            if status.active_pid.is_some() {
                // Streamed by another reader: wait for it to end, asking the
                // catalog rather than the replication protocol (whose refusal
                // the client logs as an error each time).
                if !standby_logged {
                    tracing::info!(slot = %self.s.slot, pid = status.active_pid, "the slot is streamed by another reader; standing by until it is free");
                    standby_logged = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = &mut shutdown => return Ok(()),
                }
            }
            let server: Lsn = status
                .confirmed_lsn
                .as_deref()
                .and_then(|s| Lsn::parse(s).ok())
                .unwrap_or(Lsn(0));
            // Moves record how far they let the stream confirm, in case the
            // confirmation did not reach the server (see `write_moves`).
            confirmed = confirmed.max(server).max(self.settled_at().await?);
            let cfg = base
                .clone()
                .with_start_lsn(confirmed)
                // Confirmations reach the server within 100 ms: what a crash
                // sends again is what was in flight, plus 100 ms of acks.
                .with_status_interval(Duration::from_millis(100))
                .with_wakeup_interval(Duration::from_secs(10))
                .with_buffer_size(8192);
            // The keys held now, including those a reader before this one
            // (a relay that was streamed while this one stood by) moved.
            let mut held = Held::default();
            held.load(&self.pool, &self.tables).await?;
            let contain = if self.contain {
                self.take_slot(me).await?
            } else {
                None
            };
            tracing::debug!(slot = %self.s.slot, start = %confirmed, "streaming from");
            let mut client = ReplicationClient::connect(cfg)
                .await
                .map_err(|e| Error::Capture(format!("cannot start streaming: {e}")))?;
            let mut run = Run::new(&self, target.clone(), confirmed);
            if let Some(until) = contain {
                tracing::warn!(slot = %self.s.slot, from = %confirmed, until = %until, "the slot's last reader did not stop cleanly: the messages it may have had in flight are moved into the table, where a message that crashes its handler every time is contained");
                run.contain = (2 * self.s.max_in_flight, until);
            }
            let outcome = run
                .stream(&mut client, &mut held, &mut shutdown, &mut standby_logged)
                .await;
            confirmed = run.confirmed;
            match outcome {
                Ok(()) => {
                    client.update_applied_lsn(confirmed);
                    if self.contain {
                        self.leave_slot(me).await;
                    }
                    // Give the worker a moment to send the last confirmation;
                    // if it does not, the next start sends a few again.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = client.shutdown().await;
                    tracing::info!(slot = %self.s.slot, lsn = %confirmed, "log stream stopped");
                    return Ok(());
                }
                Err(StreamEnd::Standby) => {
                    client.abort();
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = &mut shutdown => return Ok(()),
                    }
                }
                Err(StreamEnd::Fatal(e)) => {
                    client.abort();
                    return Err(e);
                }
                Err(StreamEnd::Retry(why)) => {
                    client.abort();
                    tracing::warn!(slot = %self.s.slot, retry_in = ?backoff, "log stream interrupted: {why}; resuming from {confirmed}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut shutdown => return Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
            backoff = Duration::from_millis(200);
        }
    }

    /// Records this reader in `outbox_slots`; returns the WAL's end when the
    /// reader recorded before it did not stop cleanly.
    async fn take_slot(&self, me: uuid::Uuid) -> Result<Option<Lsn>, Error> {
        let row: Option<(Option<uuid::Uuid>, String)> = sqlx::query_as(
            "WITH old AS (SELECT slot_name, reader FROM outbox_slots WHERE slot_name = $1 FOR UPDATE) \
             UPDATE outbox_slots s SET reader = $2 FROM old WHERE s.slot_name = old.slot_name \
             RETURNING old.reader, pg_current_wal_lsn()::text",
        )
        .bind(&self.s.slot)
        .bind(me)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some((Some(before), end)) if before != me => Lsn::parse(&end).ok(),
            _ => None,
        })
    }

    /// The position `outbox_slots` records as settled (see `write_moves`).
    async fn settled_at(&self) -> Result<Lsn, Error> {
        let at: Option<Option<String>> =
            sqlx::query_scalar("SELECT settled_lsn::text FROM outbox_slots WHERE slot_name = $1")
                .bind(&self.s.slot)
                .fetch_optional(&self.pool)
                .await?;
        Ok(at
            .flatten()
            .and_then(|s| Lsn::parse(&s).ok())
            .unwrap_or(Lsn(0)))
    }

    /// Records a clean stop.
    async fn leave_slot(&self, me: uuid::Uuid) {
        if let Err(e) = sqlx::query(
            "UPDATE outbox_slots SET reader = NULL WHERE slot_name = $1 AND reader = $2",
        )
        .bind(&self.s.slot)
        .bind(me)
        .execute(&self.pool)
        .await
        {
            tracing::warn!(slot = %self.s.slot, "recording a clean stop failed (the next start moves its first messages into the table): {e}");
        }
    }

    /// Makes sure the publication and the slot exist (creating the slot only
    /// on a first start); returns the slot's confirmed position.
    pub(crate) async fn prepare_slot(&self) -> Result<Lsn, Error> {
        let status = slot_status(&self.pool, &self.s.slot).await?;
        check_other_database(&status)?;
        if let Some(t) = &self.s.table {
            // Before the slot is created: a slot decodes the publication's
            // tables reliably only when they were in it before the slot's
            // consistent point (added later, the first inserts were seen
            // skipped now and then under load).
            ensure_publication(&self.pool, &self.s.publication).await?;
            t.add_to(&self.pool, &self.s.publication).await?;
        }
        if !status.exists && !status.recorded {
            if !self.s.create {
                return Err(Error::Capture(format!(
                    "slot {:?} does not exist; create it with `outbox slot create {}`",
                    self.s.slot, self.s.slot
                )));
            }
            match create_slot(&self.pool, &self.tables, &self.s.slot, &self.s.publication).await {
                Ok(_) => {}
                // Another instance created it first: stream it (or stand by).
                Err(Error::Capture(m)) if m.contains("exists already") => {}
                Err(e) => return Err(e),
            }
        } else {
            ensure_publication(&self.pool, &self.s.publication).await?;
        }
        ensure_slots_table(&self.pool).await?;
        let status = slot_status(&self.pool, &self.s.slot).await?;
        check_slot(&status)?;
        Ok(status
            .confirmed_lsn
            .as_deref()
            .and_then(|s| Lsn::parse(s).ok())
            .unwrap_or(Lsn(0)))
    }
}

/// Refuses a slot name that another database's slot uses.
fn check_other_database(s: &SlotStatus) -> Result<(), Error> {
    match &s.other_database {
        Some(db) => Err(Error::Capture(format!(
            "slot {:?} belongs to database {db:?}: slot names are shared by every database of \
             the server, so give this outbox a slot name of its own",
            s.slot
        ))),
        None => Ok(()),
    }
}

/// Refuses a slot that cannot be streamed without skipping messages.
fn check_slot(s: &SlotStatus) -> Result<(), Error> {
    check_other_database(s)?;
    if !s.exists {
        return Err(Error::Capture(format!(
            "slot {:?} was created for this outbox but no longer exists (dropped, or the \
             database was restored): messages written since its last confirmed position may \
             never be sent. Check the outbox's producers, then re-create it explicitly with \
             `outbox slot drop {0}` and `outbox slot create {0}`",
            s.slot
        )));
    }
    if s.wal_status.as_deref() == Some("lost") {
        return Err(Error::Capture(format!(
            "slot {:?} is lost (wal_status = 'lost'): PostgreSQL removed WAL it still needed \
             (max_slot_wal_keep_size), so messages written since its last confirmed position \
             are gone from the log. Re-create it explicitly with `outbox slot drop {0}` and \
             `outbox slot create {0}`",
            s.slot
        )));
    }
    if s.plugin.as_deref().is_some_and(|p| p != "pgoutput") {
        return Err(Error::Capture(format!(
            "slot {:?} uses plugin {:?}; log capture needs a pgoutput slot",
            s.slot,
            s.plugin.as_deref().unwrap_or("")
        )));
    }
    Ok(())
}

/// The replication connection's settings from a `postgres://` URL.
fn replication_config(
    url: &str,
    slot: &str,
    publication: &str,
) -> Result<ReplicationConfig, Error> {
    let invalid = |why: String| {
        Error::invalid(format!(
            "{:?} is not a PostgreSQL URL log capture can use: {why} (accepted: \
             postgres://user:password@host:port/database?sslmode=disable|prefer|require|verify-ca|verify-full)",
            crate::logging::redact_url(url)
        ))
    };
    let u = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    if !matches!(u.scheme(), "postgres" | "postgresql") {
        return Err(invalid(format!("scheme {:?}", u.scheme())));
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let params: HashMap<String, String> = u.query_pairs().into_owned().collect();
    let host = params
        .get("host")
        .cloned()
        .or_else(|| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| "localhost".into());
    let user = match decode(u.username()) {
        s if s.is_empty() => params
            .get("user")
            .cloned()
            .ok_or_else(|| invalid("no user".into()))?,
        s => s,
    };
    let password = u
        .password()
        .map(decode)
        .or_else(|| params.get("password").cloned())
        .unwrap_or_default();
    let database = match decode(u.path().trim_start_matches('/')) {
        s if s.is_empty() => user.clone(),
        s => s,
    };
    let port = params
        .get("port")
        .and_then(|p| p.parse().ok())
        .or(u.port())
        .unwrap_or(5432);
    let tls = match params.get("sslmode").map(String::as_str) {
        None | Some("disable") | Some("allow") => TlsConfig::disabled(),
        Some("prefer") => {
            let mut t = TlsConfig::disabled();
            t.mode = pgwire_replication::SslMode::Prefer;
            t
        }
        Some("require") => TlsConfig::require(),
        Some("verify-ca") => TlsConfig::verify_ca(params.get("sslrootcert").map(Into::into)),
        Some("verify-full") => TlsConfig::verify_full(params.get("sslrootcert").map(Into::into)),
        Some(other) => return Err(invalid(format!("sslmode {other:?}"))),
    };
    Ok(
        ReplicationConfig::new(host, user, password, database, slot, publication)
            .with_port(port)
            .with_tls(tls)
            .with_application_name("outbox-log-stream"),
    )
}

/// A table whose inserted rows are captured as messages (from the same slot
/// as the log-mode messages, in commit order), so that producers that cannot
/// call `pg_logical_emit_message` (other languages, an existing
/// Debezium-style outbox table) need no polling. A producer may insert and
/// delete the row in the same transaction: only inserts are read, and the
/// table stays empty.
///
/// Each row's message id (the `outbox-id` header) is its WAL position,
/// negated: unique, the same when the row is read again after a restart, and
/// never one of the outbox table's own (positive) ids. The row's own id
/// column, if mapped, goes in the `id` header, as Debezium's outbox router
/// sends it.
///
/// ```
/// let t = outbox::stream::CaptureTable::parse("outbox_events", "queue=aggregatetype,payload=payload").unwrap();
/// assert_eq!(t.to_string(), "outbox_events (queue=aggregatetype, payload=payload)");
/// assert!(outbox::stream::CaptureTable::parse("outbox_events", "payload=payload").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureTable {
    table: crate::TableName,
    /// `(schema, name)` once resolved in the database.
    resolved: std::sync::OnceLock<(String, String)>,
    queue: String,
    payload: String,
    key: Option<String>,
    id: Option<String>,
    correlation_id: Option<String>,
    headers: Option<String>,
    header_columns: Vec<(String, String)>,
}

/// The column mapping of a Debezium outbox table (`id`, `aggregatetype`,
/// `aggregateid`, `type`, `payload`), the default of [`CaptureTable::debezium`].
pub const DEBEZIUM_COLUMNS: &str =
    "id=id,queue=aggregatetype,key=aggregateid,payload=payload,header.type=type";

impl CaptureTable {
    /// A Debezium outbox table: `aggregatetype` is the queue (mapped to a
    /// topic like any queue), `aggregateid` the key, `payload` the payload,
    /// `type` the header `type`, `id` the header `id`.
    pub fn debezium(table: &str) -> Result<Self, Error> {
        Self::parse(table, DEBEZIUM_COLUMNS)
    }

    /// A table and its mapping, `field=column` pairs separated by commas:
    /// `queue` and `payload` (required), `key`, `id`, `correlation_id`,
    /// `headers` (a `jsonb` object of strings), and `header.NAME` for a
    /// column sent as header `NAME`.
    pub fn parse(table: &str, columns: &str) -> Result<Self, Error> {
        let table = crate::TableName::new(table)?;
        let mut t = Self {
            table,
            resolved: std::sync::OnceLock::new(),
            queue: String::new(),
            payload: String::new(),
            key: None,
            id: None,
            correlation_id: None,
            headers: None,
            header_columns: Vec::new(),
        };
        let accepted =
            "accepted: field=column pairs separated by commas, fields queue and payload \
                        (required), key, id, correlation_id, headers and header.NAME";
        for pair in columns.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, col) = pair
                .split_once('=')
                .map(|(f, c)| (f.trim(), c.trim()))
                .filter(|(_, c)| !c.is_empty())
                .ok_or_else(|| {
                    Error::invalid(format!("{pair:?} is not field=column ({accepted})"))
                })?;
            let col = col.to_owned();
            match field {
                "queue" => t.queue = col,
                "payload" => t.payload = col,
                "key" => t.key = Some(col),
                "id" => t.id = Some(col),
                "correlation_id" => t.correlation_id = Some(col),
                "headers" => t.headers = Some(col),
                f if f.starts_with("header.") && f.len() > 7 => {
                    let name = &f[7..];
                    if name
                        .to_ascii_lowercase()
                        .starts_with(crate::RESERVED_HEADER_PREFIX)
                    {
                        return Err(Error::invalid(format!(
                            "header {name:?}: names starting with {:?} are reserved for the runtime's metadata",
                            crate::RESERVED_HEADER_PREFIX
                        )));
                    }
                    t.header_columns.push((col, name.to_owned()));
                }
                other => {
                    return Err(Error::invalid(format!(
                        "unknown field {other:?} ({accepted})"
                    )))
                }
            }
        }
        if t.queue.is_empty() || t.payload.is_empty() {
            return Err(Error::invalid(format!(
                "the mapping needs the fields queue and payload ({accepted})"
            )));
        }
        Ok(t)
    }

    /// Looks the table up and adds it to the publication when it is not in it.
    async fn add_to(&self, pool: &PgPool, publication: &str) -> Result<(), Error> {
        let found: Option<(String, String)> = sqlx::query_as(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
        )
        .bind(self.table.quoted())
        .fetch_optional(pool)
        .await?;
        let Some((schema, name)) = found else {
            return Err(Error::Capture(format!(
                "the captured table {} does not exist",
                self.table
            )));
        };
        let columns: Vec<String> = sqlx::query_scalar(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
        )
        .bind(self.table.quoted())
        .fetch_all(pool)
        .await?;
        for col in self.mapped() {
            if !columns.iter().any(|c| c == col) {
                return Err(Error::Capture(format!(
                    "the captured table {} has no column {col:?} (it has: {})",
                    self.table,
                    columns.join(", ")
                )));
            }
        }
        let member: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 \
             AND schemaname = $2 AND tablename = $3)",
        )
        .bind(publication)
        .bind(&schema)
        .bind(&name)
        .fetch_one(pool)
        .await?;
        if !member {
            // The publication's name was validated; the table's is quoted.
            sqlx::query(&format!(
                "ALTER PUBLICATION \"{publication}\" ADD TABLE {}",
                self.table.quoted()
            ))
            .execute(pool)
            .await?;
            tracing::info!(publication, table = %self.table, "table added to the publication");
        }
        let _ = self.resolved.set((schema, name));
        Ok(())
    }

    fn mapped(&self) -> impl Iterator<Item = &String> {
        [&self.queue, &self.payload]
            .into_iter()
            .chain(self.key.iter())
            .chain(self.id.iter())
            .chain(self.correlation_id.iter())
            .chain(self.headers.iter())
            .chain(self.header_columns.iter().map(|(c, _)| c))
    }

    fn is(&self, rel: &crate::pgoutput::Relation) -> bool {
        match self.resolved.get() {
            Some((schema, name)) => rel.schema == *schema && rel.name == *name,
            None => {
                rel.name == self.table.name() && self.table.schema().is_none_or(|s| rel.schema == s)
            }
        }
    }

    /// The message of an inserted row, and why it is refused, if it is.
    fn envelope(
        &self,
        rel: &crate::pgoutput::Relation,
        values: &[crate::pgoutput::Value],
        lsn: Lsn,
    ) -> (Envelope, Option<String>) {
        use crate::pgoutput::{column_bytes, Value};
        let get = |col: &str| -> Result<Option<Vec<u8>>, String> {
            let i = rel
                .columns
                .iter()
                .position(|(c, _)| c == col)
                .ok_or_else(|| format!("column {col:?} is not in the row"))?;
            match values.get(i) {
                Some(Value::Text(t)) => column_bytes(t, rel.columns[i].1)
                    .map(Some)
                    .map_err(|e| format!("column {col:?}: {e}")),
                _ => Ok(None),
            }
        };
        let text = |col: &str| -> Result<Option<String>, String> {
            Ok(get(col)?.map(|b| String::from_utf8_lossy(&b).replace('\0', "\u{fffd}")))
        };
        let id = -i64::try_from(lsn.0).unwrap_or(i64::MAX);
        let mut refused = None;
        let mut refuse = |why: String| {
            refused.get_or_insert(format!("row at {lsn} of {}: {why}", self.table));
        };
        let queue = match text(&self.queue) {
            Ok(Some(q)) if crate::validate_queue(&q).is_ok() => q,
            Ok(Some(q)) => {
                refuse(format!(
                    "{q:?} in column {:?} is not a valid queue",
                    self.queue
                ));
                "(invalid queue)".to_owned()
            }
            Ok(None) => {
                refuse(format!("column {:?} (the queue) is NULL", self.queue));
                "(no queue)".to_owned()
            }
            Err(e) => {
                refuse(e);
                "(no queue)".to_owned()
            }
        };
        let payload = match get(&self.payload) {
            Ok(Some(p)) => p,
            Ok(None) => {
                refuse(format!("column {:?} (the payload) is NULL", self.payload));
                Vec::new()
            }
            Err(e) => {
                refuse(e);
                Vec::new()
            }
        };
        let mut env = Envelope::new(id, queue, payload);
        let mut opt = |col: &Option<String>| match col.as_deref().map(text) {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                refuse(e);
                None
            }
            None => None,
        };
        env.key = opt(&self.key);
        env.correlation_id = opt(&self.correlation_id);
        if let Some(source) = opt(&self.id) {
            env.headers.insert("id".into(), source);
        }
        let mut headers = match self.headers.as_deref().map(text) {
            Some(Ok(Some(json))) => {
                match serde_json::from_str::<BTreeMap<String, serde_json::Value>>(&json) {
                    Ok(h) => h
                        .into_iter()
                        .map(|(k, v)| match v {
                            serde_json::Value::String(s) => (k, s),
                            other => (k, other.to_string()),
                        })
                        .collect(),
                    Err(e) => {
                        refuse(format!(
                            "column {:?} is not a JSON object: {e}",
                            self.headers.as_deref().unwrap_or("")
                        ));
                        BTreeMap::new()
                    }
                }
            }
            Some(Err(e)) => {
                refuse(e);
                BTreeMap::new()
            }
            _ => BTreeMap::new(),
        };
        for (col, name) in &self.header_columns {
            match text(col) {
                Ok(Some(v)) => {
                    headers.insert(name.clone(), v);
                }
                Ok(None) => {}
                Err(e) => refuse(e),
            }
        }
        // Reserved names from the row's own headers are dropped when sent.
        env.headers.extend(headers);
        (env, refused)
    }
}

impl std::fmt::Display for CaptureTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut pairs = vec![
            format!("queue={}", self.queue),
            format!("payload={}", self.payload),
        ];
        for (field, col) in [
            ("key", &self.key),
            ("id", &self.id),
            ("correlation_id", &self.correlation_id),
            ("headers", &self.headers),
        ] {
            if let Some(c) = col {
                pairs.push(format!("{field}={c}"));
            }
        }
        for (c, h) in &self.header_columns {
            pairs.push(format!("header.{h}={c}"));
        }
        write!(f, "{} ({})", self.table, pairs.join(", "))
    }
}

/// Keys with a failed message in the table: their later messages follow it
/// there, so that each key keeps its order.
#[derive(Default)]
struct Held {
    /// `(queue, key)` and when this stream last moved a message of it.
    keys: HashMap<(String, String), Instant>,
    checked: Option<Instant>,
}

impl Held {
    /// Keys of the rows a previous run moved (tried at least once) and that
    /// are not done.
    async fn load(&mut self, pool: &PgPool, tables: &Tables) -> Result<(), Error> {
        let rows: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT DISTINCT queue, partition_key FROM {o} \
             WHERE partition_key IS NOT NULL AND parked_at IS NULL AND attempts > 0",
            o = tables.outbox.quoted()
        ))
        .fetch_all(pool)
        .await?;
        let now = Instant::now();
        for k in rows {
            self.keys.insert(k, now);
        }
        Ok(())
    }

    fn holds(&self, queue: &str, key: Option<&str>) -> bool {
        match key {
            Some(k) if !self.keys.is_empty() => {
                self.keys.contains_key(&(queue.to_owned(), k.to_owned()))
            }
            _ => false,
        }
    }

    /// Lets go of the keys whose rows are all done (at most once a second).
    async fn refresh(&mut self, pool: &PgPool, tables: &Tables) {
        if self.keys.is_empty()
            || self
                .checked
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        let started = Instant::now();
        self.checked = Some(started);
        let (queues, keys): (Vec<String>, Vec<String>) = self.keys.keys().cloned().unzip();
        let still: Result<Vec<(String, String)>, _> = sqlx::query_as(&format!(
            "SELECT u.q, u.k FROM unnest($1::text[], $2::text[]) AS u(q, k) WHERE EXISTS (\
                SELECT 1 FROM {o} o WHERE o.queue = u.q AND o.partition_key = u.k AND o.parked_at IS NULL)",
            o = tables.outbox.quoted()
        ))
        .bind(queues)
        .bind(keys)
        .fetch_all(pool)
        .await;
        let Ok(still) = still else { return };
        let still: std::collections::HashSet<(String, String)> = still.into_iter().collect();
        // A key moved after the query started may not be visible to it yet.
        self.keys
            .retain(|k, moved| still.contains(k) || *moved >= started);
    }
}

/// Why a streaming session ended without a shutdown.
enum StreamEnd {
    /// Another reader streams the slot: wait and try again.
    Standby,
    /// The slot cannot be streamed: stop.
    Fatal(Error),
    /// Anything else: reconnect from the confirmed position.
    Retry(String),
}

/// What becomes of one message of a batch.
enum Action {
    /// Delivered (sent to the broker, or handled).
    Send,
    /// Moved into the table untried: its key is held.
    MoveHeld,
    /// Moved into the table untried: the slot's last reader may have died
    /// handling it.
    Contain,
    /// Dead-lettered without a send.
    DeadLetter(FailureReason, String),
}

struct Item {
    txn: u64,
    env: Arc<Envelope>,
    action: Action,
}

/// One transaction's progress: confirmed once all its messages are settled.
struct Txn {
    seq: u64,
    pending: usize,
    end: Option<Lsn>,
    read_at: Instant,
}

type Sent = (Vec<Item>, Vec<Verdict>);

/// A message moved into the table: its attempts, the delay before its next
/// one, its error, and why it moved (the `reason` of [`MOVED_TOTAL`]).
type Move<'a> = (
    &'a Envelope,
    u32,
    Option<Duration>,
    Option<String>,
    &'static str,
);

/// Transaction `seq`: the queue holds consecutive sequence numbers (pushed in
/// order, popped from the front), so it is found by its offset.
fn txn_mut(txns: &mut VecDeque<Txn>, seq: u64) -> Option<&mut Txn> {
    let first = txns.front()?.seq;
    let t = txns.get_mut(usize::try_from(seq.checked_sub(first)?).ok()?)?;
    (t.seq == seq).then_some(t)
}

/// The state of one streaming session.
struct Run<'a> {
    s: &'a LogCapture,
    pool: &'a PgPool,
    tables: &'a Tables,
    target: Arc<dyn Deliver>,
    prefix: String,
    heartbeat_prefix: String,
    confirmed: Lsn,
    txns: VecDeque<Txn>,
    next_seq: u64,
    open: Option<(u64, i64)>,
    batch: Vec<Item>,
    in_flight: usize,
    last_event: Instant,
    /// Relations described in this session, and the captured table's oid
    /// once its description arrived.
    relations: crate::pgoutput::Relations,
    /// Messages still to move into the table untried, and the position
    /// past which none is (see [`LogStream::run`]).
    contain: (usize, Lsn),
    /// Queues whose counters exist (see [`zero_counters`]).
    seen: std::collections::HashSet<String>,
}

impl<'a> Run<'a> {
    fn new(stream: &'a LogStream, target: Arc<dyn Deliver>, confirmed: Lsn) -> Self {
        let prefix = prefix(&stream.tables);
        Self {
            s: &stream.s,
            pool: &stream.pool,
            tables: &stream.tables,
            target,
            heartbeat_prefix: format!("{prefix}:heartbeat"),
            prefix,
            confirmed,
            txns: VecDeque::new(),
            next_seq: 0,
            open: None,
            batch: Vec::new(),
            in_flight: 0,
            last_event: Instant::now(),
            relations: Default::default(),
            contain: (0, Lsn(0)),
            seen: Default::default(),
        }
    }

    async fn stream(
        &mut self,
        client: &mut ReplicationClient,
        held: &mut Held,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
        standby_logged: &mut bool,
    ) -> Result<(), StreamEnd> {
        let mut sending: FuturesOrdered<futures::future::BoxFuture<'static, Sent>> =
            FuturesOrdered::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heartbeat = Instant::now();
        let mut last_lag = Instant::now()
            .checked_sub(LAG_SAMPLE_INTERVAL)
            .unwrap_or_else(Instant::now);
        let mut started = false;
        loop {
            tokio::select! {
                biased;
                _ = &mut *shutdown => {
                    // Drain: what is in flight is settled and confirmed.
                    self.flush(&mut sending);
                    let drain = async {
                        while let Some(done) = sending.next().await {
                            self.settle(done, held).await?;
                        }
                        Ok::<(), StreamEnd>(())
                    };
                    match tokio::time::timeout(Duration::from_secs(20), drain).await {
                        Ok(r) => r?,
                        Err(_) => tracing::warn!(slot = %self.s.slot, "log stream stopped with sends still in flight; they are sent again on the next start"),
                    }
                    return Ok(());
                }
                Some(done) = sending.next(), if !sending.is_empty() => {
                    self.settle(done, held).await?;
                    client.update_applied_lsn(self.confirmed);
                }
                ev = client.recv(), if self.in_flight < self.s.max_in_flight => {
                    let ev = ev.map_err(|e| classify(&e, &self.s.slot, standby_logged))?;
                    let Some(ev) = ev else {
                        return Err(StreamEnd::Retry("the server ended the stream".into()));
                    };
                    if !started {
                        started = true;
                        if *standby_logged {
                            tracing::info!(slot = %self.s.slot, "took over the slot");
                            *standby_logged = false;
                        }
                    }
                    self.event(ev, held);
                    // Take whatever else is ready, then send it as one batch.
                    while self.batch.len() < self.s.batch && self.in_flight < self.s.max_in_flight {
                        match client.recv().now_or_never() {
                            Some(Ok(Some(ev))) => self.event(ev, held),
                            Some(Ok(None)) => return Err(StreamEnd::Retry("the server ended the stream".into())),
                            Some(Err(e)) => return Err(classify(&e, &self.s.slot, standby_logged)),
                            None => break,
                        }
                    }
                    self.flush(&mut sending);
                    self.advance();
                    client.update_applied_lsn(self.confirmed);
                }
                _ = tick.tick() => {
                    held.refresh(self.pool, self.tables).await;
                    let age = self.txns.front().map_or(0.0, |t| t.read_at.elapsed().as_secs_f64());
                    metrics::gauge!(UNCONFIRMED_AGE_SECONDS, "slot" => self.s.slot.clone()).set(age);
                    if self.txns.is_empty() && self.open.is_none()
                        && last_heartbeat.elapsed() >= self.s.heartbeat
                        && self.last_event.elapsed() >= self.s.heartbeat
                    {
                        last_heartbeat = Instant::now();
                        self.beat().await;
                    }
                    // The lag matters most while busy: sampled every 5 s,
                    // idle or not.
                    if last_lag.elapsed() >= LAG_SAMPLE_INTERVAL {
                        last_lag = Instant::now();
                        self.sample_lag().await;
                    }
                }
            }
        }
    }

    /// Writes the heartbeat message.
    async fn beat(&self) {
        if let Err(e) = sqlx::query("SELECT pg_logical_emit_message(false, $1, ''::bytea)")
            .bind(&self.heartbeat_prefix)
            .execute(self.pool)
            .await
        {
            tracing::warn!(slot = %self.s.slot, "heartbeat failed: {e}");
        }
    }

    /// Samples the WAL the slot keeps back.
    async fn sample_lag(&self) {
        if let Ok(s) = slot_status(self.pool, &self.s.slot).await {
            if let Some(lag) = s.lag_bytes {
                metrics::gauge!(SLOT_LAG_BYTES, "slot" => self.s.slot.clone()).set(lag as f64);
            }
        }
    }

    fn event(&mut self, ev: ReplicationEvent, held: &Held) {
        if !matches!(ev, ReplicationEvent::KeepAlive { .. }) {
            // Outbox traffic (or any transaction): no heartbeat needed.
            self.last_event = Instant::now();
        }
        match ev {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                let seq = self.next_seq;
                self.next_seq += 1;
                // PostgreSQL's epoch is 2000-01-01.
                let ms = commit_time_micros / 1000 + 946_684_800_000;
                self.open = Some((seq, ms));
                self.txns.push_back(Txn {
                    seq,
                    pending: 0,
                    end: None,
                    read_at: Instant::now(),
                });
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                if let Some((seq, _)) = self.open.take() {
                    if let Some(t) = txn_mut(&mut self.txns, seq) {
                        t.end = Some(end_lsn);
                    }
                }
            }
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                if prefix == self.heartbeat_prefix {
                    self.idle_confirm(lsn);
                    return;
                }
                if prefix != self.prefix {
                    return;
                }
                let (txn, created_ms) = match (transactional, self.open) {
                    (true, Some(open)) => open,
                    // Sent at once, even if its transaction rolled back
                    // later; a unit of its own, confirmed at its position.
                    _ => {
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        self.txns.push_back(Txn {
                            seq,
                            pending: 0,
                            end: Some(lsn),
                            read_at: Instant::now(),
                        });
                        let now_ms = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as i64);
                        (seq, now_ms)
                    }
                };
                let (mut env, refused) = match LogMessage::decode(&content) {
                    Ok(m) => {
                        let mut env = Envelope::new(m.id, m.queue, m.payload);
                        env.key = m.key;
                        env.correlation_id = m.correlation_id;
                        env.headers = m.headers;
                        (env, None)
                    }
                    Err(e) => (
                        Envelope::new(0, "(undecodable)", content.to_vec()),
                        Some(format!("{e} (at {lsn})")),
                    ),
                };
                env.created_at_ms = created_ms;
                self.push(txn, env, refused, held, lsn);
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => self.idle_confirm(wal_end),
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => self.change(wal_start, &data, held),
            // The end of a bounded stream (never asked for).
            ReplicationEvent::StoppedAt { .. } => {}
        }
    }

    /// A table change: a relation's description is kept; a row inserted
    /// into the captured table becomes a message of the open transaction.
    fn change(&mut self, lsn: Lsn, data: &[u8], held: &Held) {
        use crate::pgoutput::{parse, Change};
        let Some(table) = self.s.table.clone() else {
            return;
        };
        match parse(data) {
            Ok(Change::Relation(oid, rel)) => {
                self.relations.insert(oid, rel);
            }
            Ok(Change::Insert(oid, values)) => {
                let Some(rel) = self.relations.get(&oid) else {
                    tracing::warn!(slot = %self.s.slot, "an insert into relation {oid} came before its description; skipped");
                    return;
                };
                if !table.is(rel) {
                    return;
                }
                let Some((txn, created_ms)) = self.open else {
                    return;
                };
                let (mut env, refused) = table.envelope(rel, &values, lsn);
                env.created_at_ms = created_ms;
                self.push(txn, env, refused, held, lsn);
            }
            Ok(Change::Other) => {}
            Err(e) => {
                tracing::warn!(slot = %self.s.slot, at = %lsn, "unreadable table change skipped: {e}")
            }
        }
    }

    /// With nothing read and unsettled, everything up to `lsn` is done.
    fn idle_confirm(&mut self, lsn: Lsn) {
        if self.txns.is_empty()
            && self.open.is_none()
            && self.batch.is_empty()
            && lsn > self.confirmed
        {
            tracing::debug!(slot = %self.s.slot, from = %self.confirmed, to = %lsn, "nothing in flight: confirmed up to the server's position");
            self.confirmed = lsn;
        }
    }

    /// Adds a message of transaction `txn` to the batch being read: refused
    /// for good (dead-lettered as `rejected` with the reason), moved after
    /// its held key, or sent.
    fn push(&mut self, txn: u64, env: Envelope, refused: Option<String>, held: &Held, lsn: Lsn) {
        let action = match refused {
            Some(why) => Action::DeadLetter(FailureReason::Rejected, why),
            None if self.contain.0 > 0 && lsn <= self.contain.1 => {
                self.contain.0 -= 1;
                Action::Contain
            }
            None if held.holds(&env.queue, env.key.as_deref()) => Action::MoveHeld,
            None => Action::Send,
        };
        if let Some(t) = txn_mut(&mut self.txns, txn) {
            t.pending += 1;
        }
        self.in_flight += 1;
        self.batch.push(Item {
            txn,
            env: Arc::new(env),
            action,
        });
    }

    /// Sends the batch read so far (items with nothing to send pass through).
    fn flush(&mut self, sending: &mut FuturesOrdered<futures::future::BoxFuture<'static, Sent>>) {
        if self.batch.is_empty() {
            return;
        }
        let items = std::mem::take(&mut self.batch);
        for item in &items {
            if !self.seen.contains(&item.env.queue) {
                zero_counters(&item.env.queue);
                self.seen.insert(item.env.queue.clone());
            }
        }
        crate::metrics::count_by_queue(
            READ_TOTAL,
            items
                .iter()
                .filter(|i| i.env.id != 0)
                .map(|i| i.env.queue.as_str()),
        );
        let envs: Vec<Arc<Envelope>> = items
            .iter()
            .filter(|i| matches!(i.action, Action::Send))
            .map(|i| i.env.clone())
            .collect();
        let target = self.target.clone();
        sending.push_back(
            async move {
                let verdicts = deliver_with_pauses(&*target, envs).await;
                (items, verdicts)
            }
            .boxed(),
        );
    }

    /// Settles a sent batch in stream order: dead letters and moves are
    /// written first, then the batch's transactions count it done.
    async fn settle(&mut self, (items, verdicts): Sent, held: &mut Held) -> Result<(), StreamEnd> {
        let mut verdicts = verdicts.into_iter();
        let mut moves: Vec<Move> = Vec::new();
        let mut dead: Vec<(&Envelope, FailureReason, String, u32)> = Vec::new();
        let mut sent: Vec<&Envelope> = Vec::new();
        for item in &items {
            match &item.action {
                Action::Send => match verdicts.next() {
                    Some(Verdict::Done) => sent.push(&item.env),
                    Some(Verdict::Fail(reason, why)) => dead.push((&item.env, reason, why, 1)),
                    Some(Verdict::Retry { error, delay, .. }) => {
                        moves.push((&item.env, 1, Some(delay), Some(error), "failed"))
                    }
                    Some(Verdict::Defer) => moves.push((&item.env, 0, None, None, "deferred")),
                    None => moves.push((
                        &item.env,
                        1,
                        None,
                        Some("the delivery answered fewer verdicts than messages".into()),
                        "failed",
                    )),
                },
                Action::MoveHeld => moves.push((&item.env, 0, None, None, "key_held")),
                Action::Contain => moves.push((&item.env, 0, None, None, "contained")),
                Action::DeadLetter(reason, why) => dead.push((&item.env, *reason, why.clone(), 0)),
            }
        }
        crate::metrics::count_by_queue(SENT_TOTAL, sent.iter().map(|e| e.queue.as_str()));
        crate::metrics::record_end_to_end(sent.iter().map(|e| (e.queue.as_str(), e.created_at_ms)));
        // Dead letters first: the moves record the batch as settled.
        if !dead.is_empty() {
            self.write_dead(&dead).await?;
            for (env, reason, why, _) in &dead {
                tracing::warn!(queue = %env.queue, id = env.id, reason = %reason, "{} | log message failed for good: {why}", env.queue);
                metrics::counter!(DEAD_LETTERED_TOTAL, "queue" => env.queue.clone(), "reason" => reason.as_str()).increment(1);
            }
        }
        for item in &items {
            if let Some(t) = txn_mut(&mut self.txns, item.txn) {
                t.pending -= 1;
            }
        }
        if !moves.is_empty() {
            // What this batch lets the stream confirm, recorded with the moves.
            let upto = self.confirmable();
            self.write_moves(&moves, upto).await?;
            let now = Instant::now();
            for (env, _, _, _, reason) in &moves {
                if let Some(k) = &env.key {
                    held.keys.insert((env.queue.clone(), k.clone()), now);
                }
                metrics::counter!(MOVED_TOTAL, "queue" => env.queue.clone(), "reason" => *reason)
                    .increment(1);
            }
        }
        self.in_flight -= items.len();
        self.advance();
        Ok(())
    }

    /// The position [`Run::advance`] would confirm now.
    fn confirmable(&self) -> Lsn {
        let mut at = self.confirmed;
        for t in &self.txns {
            match t.end {
                Some(end) if t.pending == 0 => at = at.max(end),
                _ => break,
            }
        }
        at
    }

    /// Confirms every leading transaction whose messages are all settled.
    fn advance(&mut self) {
        while let Some(t) = self.txns.front() {
            match t.end {
                Some(end) if t.pending == 0 => {
                    if end > self.confirmed {
                        self.confirmed = end;
                    }
                    self.txns.pop_front();
                }
                _ => break,
            }
        }
    }

    /// Moves messages into the outbox table, keeping their ids (a message
    /// already there from an earlier run is left as it is).
    ///
    /// In the same statement, records `upto` (the position the stream can
    /// confirm once this batch is settled) in `outbox_slots.settled_lsn`: a
    /// later session starts from there even when the confirmation had not
    /// reached the server, rather than moving again a message the table
    /// workers may have handled and deleted meanwhile.
    async fn write_moves(&self, moves: &[Move<'_>], upto: Lsn) -> Result<(), StreamEnd> {
        let sql = crate::sql::move_from_log(self.tables);
        let upto = upto.to_string();
        retry_write("moving failed log messages into the table", || {
            let mut rows = Rows::default();
            let (mut delays, mut attempts, mut errors) = (Vec::new(), Vec::new(), Vec::new());
            let mut deliveries = Vec::new();
            for (env, a, delay, err, reason) in moves {
                // A contained message counts as delivered once and never
                // settled: the table workers handle it alone, under suspicion.
                deliveries.push(*a as i32 + i32::from(*reason == "contained"));
                rows.push(env);
                delays.push(delay.map_or(0, |d| {
                    i64::try_from(d.min(crate::claim::MAX_RETRY_DELAY).as_micros())
                        .unwrap_or(i64::MAX)
                }));
                attempts.push(*a as i32);
                errors.push(err.as_deref().map(|e| storable(e).into_owned()));
            }
            rows.bind(sqlx::query(&sql))
                .bind(delays)
                .bind(attempts)
                .bind(errors)
                .bind(deliveries)
                .bind(&upto)
                .bind(&self.s.slot)
                .execute(self.pool)
        })
        .await
    }

    /// Dead-letters messages (or parks them in the table without a
    /// dead-letter table), each in the tables its queue's failures go to.
    async fn write_dead(
        &self,
        dead: &[(&Envelope, FailureReason, String, u32)],
    ) -> Result<(), StreamEnd> {
        let mut by_tables: Vec<(Tables, Vec<usize>)> = Vec::new();
        for (i, (env, ..)) in dead.iter().enumerate() {
            let t = self.target.tables_for(&env.queue, self.tables);
            match by_tables.iter_mut().find(|(k, _)| *k == t) {
                Some((_, idx)) => idx.push(i),
                None => by_tables.push((t, vec![i])),
            }
        }
        for (tables, idx) in by_tables {
            let sql = crate::sql::dead_letter_from_log(&tables);
            retry_write("dead-lettering log messages", || {
                let mut rows = Rows::default();
                let (mut reasons, mut errors, mut attempts) = (Vec::new(), Vec::new(), Vec::new());
                for &i in &idx {
                    let (env, reason, why, a) = &dead[i];
                    rows.push(env);
                    reasons.push(reason.as_str().to_owned());
                    errors.push(storable(why).into_owned());
                    attempts.push(*a as i32);
                }
                rows.bind(sqlx::query(&sql))
                    .bind(reasons)
                    .bind(errors)
                    .bind(attempts)
                    .execute(self.pool)
            })
            .await?;
        }
        Ok(())
    }
}

/// The columns `$1` to `$7` of the statements that write log messages into
/// a table ([`crate::sql::move_from_log`], [`crate::sql::dead_letter_from_log`]).
#[derive(Default)]
struct Rows {
    ids: Vec<i64>,
    queues: Vec<String>,
    payloads: Vec<Vec<u8>>,
    headers: Vec<serde_json::Value>,
    keys: Vec<Option<String>>,
    corr: Vec<Option<String>>,
    created: Vec<i64>,
}

impl Rows {
    fn push(&mut self, env: &Envelope) {
        self.ids.push(env.id);
        self.queues.push(env.queue.clone());
        self.payloads.push(env.payload.clone());
        self.headers.push(headers_json(&env.headers));
        self.keys.push(env.key.clone());
        self.corr.push(env.correlation_id.clone());
        self.created.push(env.created_at_ms);
    }

    fn bind(
        self,
        q: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
        q.bind(self.ids)
            .bind(self.queues)
            .bind(self.payloads)
            .bind(self.headers)
            .bind(self.keys)
            .bind(self.corr)
            .bind(self.created)
    }
}

fn headers_json(h: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::to_value(h).unwrap_or_else(|_| serde_json::json!({}))
}

/// A write that settles messages is retried a few times; if the database
/// stays away, the session ends and resumes from the confirmed position
/// (the messages are read, and sent, again).
async fn retry_write<F, Fut>(what: &str, mut write: F) -> Result<(), StreamEnd>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<sqlx::postgres::PgQueryResult, sqlx::Error>>,
{
    let mut pause = Duration::from_millis(100);
    for attempt in 1..=5 {
        match write().await {
            Ok(_) => return Ok(()),
            Err(e) if attempt == 5 => {
                return Err(StreamEnd::Retry(format!("{what} failed: {e}")));
            }
            Err(e) => {
                tracing::warn!("{what} failed (attempt {attempt} of 5): {e}");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    }
    unreachable!("the last attempt returns")
}

/// Delivers a batch; when every message failed transiently at the broker
/// (it is unreachable), delivers it again after a pause, [`PAUSE_TRIES`]
/// times, before its messages are moved into the table.
async fn deliver_with_pauses(target: &dyn Deliver, batch: Vec<Arc<Envelope>>) -> Vec<Verdict> {
    if batch.is_empty() {
        return Vec::new();
    }
    let mut pause = Duration::from_secs(1);
    for _ in 0..PAUSE_TRIES {
        let verdicts = target.deliver(batch.clone()).await;
        let broker_down = verdicts.len() == batch.len()
            && verdicts
                .iter()
                .all(|v| matches!(v, Verdict::Retry { broker: true, .. }));
        if !broker_down {
            return verdicts;
        }
        let why = match verdicts.first() {
            Some(Verdict::Retry { error, .. }) => error.as_str(),
            _ => "",
        };
        tracing::warn!(
            messages = batch.len(),
            retry_in = ?pause,
            "every message of a batch failed ({why}); the stream pauses",
        );
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
    target.deliver(batch).await
}

/// What a replication error means for the stream.
fn classify(e: &PgWireError, slot: &str, standby_logged: &mut bool) -> StreamEnd {
    let text = e.to_string();
    if text.contains("SQLSTATE 55006") {
        if !*standby_logged {
            tracing::info!(
                slot,
                "the slot is streamed by another reader; standing by until it is free"
            );
            *standby_logged = true;
        }
        return StreamEnd::Standby;
    }
    let fatal_hint = if text.contains("SQLSTATE 42704") {
        Some("the slot does not exist")
    } else if text.contains("can no longer get changes") || text.contains("has been invalidated") {
        Some("the slot is lost (wal_status = 'lost')")
    } else if text.contains("SQLSTATE 42501") || e.is_auth() {
        Some("the role cannot stream (it needs LOGIN and REPLICATION, and a valid password)")
    } else if text.contains("publication") && text.contains("does not exist") {
        Some("the publication does not exist")
    } else {
        None
    };
    match fatal_hint {
        Some(hint) => StreamEnd::Fatal(Error::Capture(format!("slot {slot:?}: {hint}: {text}"))),
        None => StreamEnd::Retry(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replication_connection_comes_from_the_url() {
        let c = replication_config(
            "postgres://us%40er:p%3Aw@db.example:6432/shop?sslmode=require",
            "s",
            "p",
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("db.example", 6432));
        assert_eq!((c.user.as_str(), c.password.as_str()), ("us@er", "p:w"));
        assert_eq!(c.database, "shop");
        assert_eq!(c.tls.mode, pgwire_replication::SslMode::Require);
    }

    #[test]
    fn a_bad_url_is_refused_without_its_password() {
        let e = replication_config("mysql://u:secret@h/db", "s", "p").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("scheme \"mysql\""), "{text}");
        assert!(!text.contains("secret"), "{text}");
        let e = replication_config("postgres://u:secret@h/db?sslmode=maybe", "s", "p").unwrap_err();
        assert!(e.to_string().contains("sslmode \"maybe\""), "{e}");
    }

    #[test]
    fn a_column_mapping_says_what_is_wrong_and_what_is_accepted() {
        let t = CaptureTable::debezium("outbox_events").unwrap();
        assert_eq!(
            t.to_string(),
            "outbox_events (queue=aggregatetype, payload=payload, key=aggregateid, id=id, header.type=type)"
        );
        for (columns, says) in [
            ("payload=payload", "needs the fields queue and payload"),
            ("queue=q,payload=p,colour=c", "unknown field \"colour\""),
            ("queue=q,payload", "\"payload\" is not field=column"),
            ("queue=q,payload=", "\"payload=\" is not field=column"),
            (
                "queue=q,payload=p,header.outbox-id=x",
                "reserved for the runtime",
            ),
        ] {
            let e = CaptureTable::parse("t", columns).unwrap_err().to_string();
            assert!(e.contains(says), "{columns}: {e}");
            assert!(
                e.contains("accepted") || e.contains("reserved"),
                "{columns}: {e}"
            );
        }
        assert!(CaptureTable::parse("bad name!", "queue=q,payload=p").is_err());
    }

    #[test]
    fn slot_names_follow_postgres_rules() {
        for ok in ["outbox_relay", "a", "s1_2"] {
            assert!(validate_slot_name("SLOT_NAME", ok).is_ok(), "{ok}");
        }
        for bad in ["", "Relay", "a-b", "a b", &"x".repeat(64)] {
            let e = validate_slot_name("SLOT_NAME", bad)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("SLOT_NAME: "), "{e}");
            assert!(
                e.contains("accepted: 1 to 63 lower-case letters, digits and _"),
                "{e}"
            );
        }
    }
}
