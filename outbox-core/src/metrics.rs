//! Metrics of the runtime, and the endpoint that serves them to Prometheus.
//!
//! The runtime records through the [`metrics`](https://docs.rs/metrics) facade,
//! so any recorder sees the figures; without one the calls cost next to nothing.
//! With the `prometheus` feature, [`serve`] (or [`crate::App::metrics_addr`])
//! installs a Prometheus recorder and answers:
//!
//! - `GET /metrics`: every metric, in the Prometheus text format;
//! - `GET /healthz`: liveness, `200 ok` while the process serves requests;
//! - `GET /readyz`: readiness, `200` when every check passes (the database
//!   answers `SELECT 1`, plus any check added with [`Endpoint::ready_check`]),
//!   `503` with the failing checks otherwise.
//!
//! | metric | kind | labels | what |
//! | --- | --- | --- | --- |
//! | `outbox_claimed_total` | counter | queue | rows claimed |
//! | `outbox_handled_total` | counter | queue | rows whose handler and publishes succeeded |
//! | `outbox_retried_total` | counter | queue | failed attempts scheduled for a retry |
//! | `outbox_dead_lettered_total` | counter | queue, reason | rows that failed for good (to the dead-letter table, or parked without one) |
//! | `outbox_rejected_total` | counter | queue, reason | the part of those that skipped the retries (permanent errors) |
//! | `outbox_handler_seconds` | histogram | queue | handler run time |
//! | `outbox_publish_seconds` | histogram | sink | time to publish one batch to a broker |
//! | `outbox_in_flight` | gauge | subscriber | rows claimed and not yet settled |
//! | `outbox_pending_rows` | gauge | queue | rows waiting (due or delayed) |
//! | `outbox_oldest_pending_seconds` | gauge | queue | age of the oldest row not parked: the outbox lag |
//! | `outbox_parked_rows` | gauge | queue | rows parked (failed for good, no dead-letter table) |
//! | `outbox_dlq_rows` | gauge | queue | rows in the dead-letter tables |
//! | `outbox_kafka_queue_depth` | gauge | (set by the Kafka crate) | messages in the producer's queue |
//! | `outbox_capture_*` | | | log capture, see `outbox::stream` (feature `capture`) |
//!
//! The row gauges come from a sampler the app runs while metrics are served
//! (every 5 s by default, see [`Endpoint::sample_interval`]). Every instance
//! samples the same table, so aggregate them with `max`, not `sum`.
//!
//! ```no_run
//! # #[cfg(feature = "prometheus")]
//! # async fn f(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
//! outbox::App::new(pool)
//!     .metrics_addr("0.0.0.0:9100".parse().unwrap())
//!     .run_until_signal()
//!     .await?;
//! # Ok(()) }
//! ```

use crate::{Error, TableName, Tables};
use sqlx::{PgPool, Row};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

/// Counter: rows claimed, by `queue`.
pub const CLAIMED_TOTAL: &str = "outbox_claimed_total";
/// Counter: rows whose handler and stacked publishes succeeded, by `queue`.
pub const HANDLED_TOTAL: &str = "outbox_handled_total";
/// Counter: failed attempts scheduled for a retry, by `queue`.
pub const RETRIED_TOTAL: &str = "outbox_retried_total";
/// Counter: rows that failed for good, by `queue` and `reason` (moved to the
/// dead-letter table, or parked when there is none).
pub const DEAD_LETTERED_TOTAL: &str = "outbox_dead_lettered_total";
/// Counter: the dead-lettered rows that skipped the retries because the error
/// was permanent (`deserialize`, `rejected`, `publish_rejected`) or the row
/// crashed its process (`crashed`), by `queue` and `reason`.
pub const REJECTED_TOTAL: &str = "outbox_rejected_total";
/// Counter: headers of a row dropped because their name is reserved for the
/// runtime (`outbox-id`, `outbox-queue`, ...; written by another producer).
pub const RESERVED_HEADERS_DROPPED_TOTAL: &str = "outbox_reserved_headers_dropped_total";
/// Counter: worker steps that panicked outside the handlers (a custom retry
/// strategy or sink), by `subscriber`; the worker goes on.
pub const WORKER_PANICS_TOTAL: &str = "outbox_worker_panics_total";
/// Histogram: handler run time in seconds, by `queue`.
pub const HANDLER_SECONDS: &str = "outbox_handler_seconds";
/// Histogram: time to publish one batch to a broker in seconds, by `sink`.
pub const PUBLISH_SECONDS: &str = "outbox_publish_seconds";
/// Histogram: seconds from a message's creation to the end of its delivery,
/// by `queue`: from its `created_at` (the time of its producer's transaction;
/// in log mode, its commit) to the broker's ack of its last publish, or to
/// the end of its handler when it publishes nothing. Retries are inside it:
/// this is the latency a consumer sees.
pub const END_TO_END_SECONDS: &str = "outbox_end_to_end_seconds";
/// Gauge: 1 when every readiness check of the metrics endpoint passes (what
/// `/readyz` answers 200 for), 0 otherwise; evaluated every 5 s and on each
/// `/readyz` request.
pub const READY: &str = "outbox_ready";
/// Gauge: rows claimed and not yet settled, by `subscriber`.
pub const IN_FLIGHT: &str = "outbox_in_flight";
/// Gauge: rows waiting (due or delayed, not leased), by `queue`.
pub const PENDING_ROWS: &str = "outbox_pending_rows";
/// Gauge: age in seconds of the oldest row not parked, by `queue` (the outbox lag).
pub const OLDEST_PENDING_SECONDS: &str = "outbox_oldest_pending_seconds";
/// Gauge: parked rows, by `queue`.
pub const PARKED_ROWS: &str = "outbox_parked_rows";
/// Gauge: rows in the dead-letter tables, by `queue`.
pub const DLQ_ROWS: &str = "outbox_dlq_rows";
/// Gauge: messages waiting in the Kafka producer's queue; see [`set_kafka_queue_depth`].
pub const KAFKA_QUEUE_DEPTH: &str = "outbox_kafka_queue_depth";

/// How often the app samples the row gauges unless told otherwise.
pub const DEFAULT_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// The sample intervals accepted: 100 ms to 1 h.
pub const SAMPLE_INTERVALS: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3600);

/// Registers the unit and help text of every metric above with the installed
/// recorder ([`serve`] does it for you).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(CLAIMED_TOTAL, Unit::Count, "Rows claimed from the outbox");
    describe_counter!(
        HANDLED_TOTAL,
        Unit::Count,
        "Rows whose handler and stacked publishes succeeded"
    );
    describe_counter!(
        RETRIED_TOTAL,
        Unit::Count,
        "Failed attempts scheduled for a retry"
    );
    describe_counter!(
        DEAD_LETTERED_TOTAL,
        Unit::Count,
        "Rows that failed for good (dead-lettered, or parked without a dead-letter table)"
    );
    describe_counter!(
        REJECTED_TOTAL,
        Unit::Count,
        "Rows that failed for good without retries (permanent errors)"
    );
    describe_histogram!(HANDLER_SECONDS, Unit::Seconds, "Handler run time");
    describe_histogram!(
        PUBLISH_SECONDS,
        Unit::Seconds,
        "Time to publish one batch to a broker"
    );
    describe_gauge!(IN_FLIGHT, Unit::Count, "Rows claimed and not yet settled");
    describe_gauge!(
        PENDING_ROWS,
        Unit::Count,
        "Rows waiting in the outbox (due or delayed)"
    );
    describe_gauge!(
        OLDEST_PENDING_SECONDS,
        Unit::Seconds,
        "Age of the oldest row not parked (the outbox lag)"
    );
    describe_gauge!(PARKED_ROWS, Unit::Count, "Rows parked in the outbox");
    describe_gauge!(DLQ_ROWS, Unit::Count, "Rows in the dead-letter tables");
    describe_gauge!(
        KAFKA_QUEUE_DEPTH,
        Unit::Count,
        "Messages waiting in the Kafka producer's queue"
    );
    describe_histogram!(
        END_TO_END_SECONDS,
        Unit::Seconds,
        "From a message's creation to the end of its delivery (broker ack, or handler end)"
    );
    describe_gauge!(
        READY,
        "1 when every readiness check passes (/readyz answers 200), 0 otherwise"
    );
    describe_counter!(
        WORKER_PANICS_TOTAL,
        Unit::Count,
        "Worker steps that panicked outside the handlers"
    );
    #[cfg(feature = "capture")]
    crate::stream::describe();
}

/// Sets the `outbox_kafka_queue_depth` gauge (for the Kafka broker: call it
/// with the producer's `in_flight_count()` from its statistics or a timer).
///
/// ```
/// outbox::metrics::set_kafka_queue_depth(12);
/// ```
pub fn set_kafka_queue_depth(depth: u64) {
    metrics::gauge!(KAFKA_QUEUE_DEPTH).set(depth as f64);
}

/// The figures of one queue: what `outbox status` prints and the sampler exports.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct QueueSnapshot {
    /// Queue.
    pub queue: String,
    /// Rows waiting (due or delayed), not leased.
    pub pending: i64,
    /// Rows leased right now.
    pub in_flight: i64,
    /// Rows parked (failed for good without a dead-letter table).
    pub parked: i64,
    /// Age in seconds of the oldest row not parked (the outbox lag).
    pub oldest_pending_s: f64,
    /// Rows of this queue in the dead-letter tables.
    pub dead_letters: i64,
}

/// Figures per queue of an outbox table and its dead-letter tables, in queue
/// order. A queue with dead letters but no outbox rows is listed too; a
/// dead-letter table that does not exist counts as empty.
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
/// let tables = outbox::Tables::default();
/// let dlqs: Vec<_> = tables.dlq.iter().cloned().collect();
/// for q in outbox::metrics::snapshot(&pool, &tables, &dlqs).await? {
///     println!("{}: {} pending, lag {:.0} s", q.queue, q.pending, q.oldest_pending_s);
/// }
/// # Ok(()) }
/// ```
pub async fn snapshot(
    pool: &PgPool,
    tables: &Tables,
    dlqs: &[TableName],
) -> Result<Vec<QueueSnapshot>, Error> {
    let mut out: BTreeMap<String, QueueSnapshot> = BTreeMap::new();
    for s in crate::dlq::queue_stats(pool, tables).await? {
        out.insert(
            s.queue.clone(),
            QueueSnapshot {
                queue: s.queue,
                pending: s.pending,
                in_flight: s.in_flight,
                parked: s.parked,
                oldest_pending_s: s.oldest_pending_s,
                dead_letters: 0,
            },
        );
    }
    let mut seen = HashSet::new();
    for d in dlqs {
        if !seen.insert(d) || !table_exists(pool, d).await? {
            continue;
        }
        let rows = sqlx::query(&crate::sql::dlq_count_by_queue(d))
            .fetch_all(pool)
            .await?;
        for r in rows {
            let queue: String = r.try_get(0)?;
            let n: i64 = r.try_get(1)?;
            out.entry(queue.clone())
                .or_insert_with(|| QueueSnapshot {
                    queue,
                    pending: 0,
                    in_flight: 0,
                    parked: 0,
                    oldest_pending_s: 0.0,
                    dead_letters: 0,
                })
                .dead_letters += n;
        }
    }
    Ok(out.into_values().collect())
}

pub(crate) async fn table_exists(pool: &PgPool, t: &TableName) -> Result<bool, Error> {
    Ok(sqlx::query_scalar(crate::sql::TABLE_EXISTS)
        .bind(t.quoted())
        .fetch_one(pool)
        .await?)
}

/// Runs [`snapshot`] every `every` and sets the row gauges, until `stop`.
/// A queue that disappears (drained, purged) is set to zero rather than left
/// at its last value.
#[cfg(feature = "prometheus")]
pub(crate) async fn run_sampler(
    pool: PgPool,
    tables: Tables,
    dlqs: Vec<TableName>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut known: HashSet<String> = HashSet::new();
    let mut failing = false;
    loop {
        match snapshot(&pool, &tables, &dlqs).await {
            Ok(queues) => {
                if failing {
                    tracing::info!("queue metrics sampling works again");
                    failing = false;
                }
                let mut now = HashSet::with_capacity(queues.len());
                for q in queues {
                    if !known.contains(&q.queue) {
                        // A queue first seen here (every queue, for the relay).
                        zero_counters(&q.queue);
                    }
                    set_row_gauges(
                        &q.queue,
                        [
                            q.pending as f64,
                            q.oldest_pending_s,
                            q.parked as f64,
                            q.dead_letters as f64,
                        ],
                    );
                    now.insert(q.queue);
                }
                for gone in known.difference(&now) {
                    set_row_gauges(gone, [0.0; 4]);
                }
                known = now;
            }
            Err(e) if !failing => {
                tracing::warn!(error = %e, "queue metrics sampling failed; retrying quietly");
                failing = true;
            }
            Err(e) => tracing::debug!(error = %e, "queue metrics sampling failed"),
        }
        if crate::listen::sleep_or_stop(every, &mut stop).await {
            break;
        }
    }
}

#[cfg(feature = "prometheus")]
fn set_row_gauges(queue: &str, [pending, oldest, parked, dlq]: [f64; 4]) {
    let q = queue.to_owned();
    metrics::gauge!(PENDING_ROWS, "queue" => q.clone()).set(pending);
    metrics::gauge!(OLDEST_PENDING_SECONDS, "queue" => q.clone()).set(oldest);
    metrics::gauge!(PARKED_ROWS, "queue" => q.clone()).set(parked);
    metrics::gauge!(DLQ_ROWS, "queue" => q).set(dlq);
}

/// Creates the counters of `queue` at zero (handled, claimed, retried, and
/// dead-lettered and rejected for every reason), so that they exist from
/// start-up: `increase(outbox_dead_lettered_total[1h]) > 0` then sees the
/// first dead letter after a restart too, instead of a series that begins
/// with it.
pub(crate) fn zero_counters(queue: &str) {
    for name in [CLAIMED_TOTAL, HANDLED_TOTAL, RETRIED_TOTAL] {
        metrics::counter!(name, "queue" => queue.to_owned()).increment(0);
    }
    for reason in crate::FailureReason::ALL {
        metrics::counter!(DEAD_LETTERED_TOTAL, "queue" => queue.to_owned(), "reason" => reason.as_str())
            .increment(0);
        if reason != crate::FailureReason::RetriesExhausted {
            metrics::counter!(REJECTED_TOTAL, "queue" => queue.to_owned(), "reason" => reason.as_str())
                .increment(0);
        }
    }
}

/// Adds one to counter `name` per item, with one `increment` per distinct
/// queue: recording costs a few label look-ups per batch, not per row.
pub(crate) fn count_by_queue<'a>(name: &'static str, queues: impl IntoIterator<Item = &'a str>) {
    let mut counts: Vec<(&str, u64)> = Vec::new();
    for q in queues {
        match counts.iter_mut().find(|(k, _)| *k == q) {
            Some((_, n)) => *n += 1,
            None => counts.push((q, 1)),
        }
    }
    for (q, n) in counts {
        metrics::counter!(name, "queue" => q.to_owned()).increment(n);
    }
}

/// Like [`count_by_queue`] with a `reason` label.
pub(crate) fn count_by_queue_reason<'a>(
    name: &'static str,
    items: impl IntoIterator<Item = (&'a str, &'static str)>,
) {
    let mut counts: Vec<((&str, &'static str), u64)> = Vec::new();
    for k in items {
        match counts.iter_mut().find(|(c, _)| *c == k) {
            Some((_, n)) => *n += 1,
            None => counts.push((k, 1)),
        }
    }
    for ((q, reason), n) in counts {
        metrics::counter!(name, "queue" => q.to_owned(), "reason" => reason).increment(n);
    }
}

/// Records each handler duration in the histogram of its queue, looking the
/// histogram up once per queue.
pub(crate) fn record_handler_times<'a>(times: impl IntoIterator<Item = (&'a str, Duration)>) {
    record_by_queue(
        HANDLER_SECONDS,
        times.into_iter().map(|(q, took)| (q, took.as_secs_f64())),
    );
}

/// Records [`END_TO_END_SECONDS`] of messages done now, given their queues
/// and `created_at` (epoch ms). A clock behind the producer's counts as 0.
pub(crate) fn record_end_to_end<'a>(done: impl IntoIterator<Item = (&'a str, i64)>) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    record_by_queue(
        END_TO_END_SECONDS,
        done.into_iter()
            .map(|(q, created)| (q, now_ms.saturating_sub(created).max(0) as f64 / 1000.0)),
    );
}

/// Records values into histogram `name` by queue, with one label look-up
/// per distinct queue.
fn record_by_queue<'a>(name: &'static str, values: impl IntoIterator<Item = (&'a str, f64)>) {
    let mut hists: Vec<(&str, metrics::Histogram)> = Vec::new();
    for (q, v) in values {
        let h = match hists.iter().position(|(k, _)| *k == q) {
            Some(i) => &hists[i].1,
            None => {
                hists.push((q, metrics::histogram!(name, "queue" => q.to_owned())));
                &hists[hists.len() - 1].1
            }
        };
        h.record(v);
    }
}

#[cfg(feature = "prometheus")]
pub use endpoint::{serve, Endpoint, MetricsHandle};

#[cfg(feature = "prometheus")]
mod endpoint {
    use super::DEFAULT_SAMPLE_INTERVAL;
    use crate::Error;
    use futures::future::BoxFuture;
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
    use sqlx::PgPool;
    use std::future::Future;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Histogram buckets for the `*_seconds` metrics: 1 ms to 60 s.
    const BUCKETS: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    /// How long one readiness check may take before it counts as failed.
    const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
    /// Longest request head read; the endpoint takes no bodies.
    const MAX_REQUEST: usize = 8 * 1024;
    /// Connections served at once; more wait in the listen backlog.
    const MAX_CONNECTIONS: usize = 64;

    type Check = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

    /// The settings of the metrics endpoint: where it listens and what
    /// readiness means.
    ///
    /// ```no_run
    /// # async fn f(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
    /// use outbox::metrics::Endpoint;
    /// let handle = Endpoint::new("127.0.0.1:9100".parse().unwrap())
    ///     .database(pool)
    ///     .ready_check("kafka", || async { Ok::<_, String>(()) })
    ///     .serve()
    ///     .await?;
    /// println!("metrics on http://{}/metrics", handle.local_addr());
    /// # Ok(()) }
    /// ```
    #[derive(Clone)]
    pub struct Endpoint {
        addr: SocketAddr,
        checks: Vec<(String, Check)>,
        sample_interval: Duration,
        best_effort: bool,
    }

    impl std::fmt::Debug for Endpoint {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Endpoint")
                .field("addr", &self.addr)
                .field(
                    "checks",
                    &self.checks.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                )
                .field("sample_interval", &self.sample_interval)
                .finish()
        }
    }

    impl Endpoint {
        /// An endpoint on `addr` (port 0 picks a free port; see
        /// [`MetricsHandle::local_addr`]) with no readiness checks yet.
        pub fn new(addr: SocketAddr) -> Self {
            Self {
                addr,
                checks: Vec::new(),
                sample_interval: DEFAULT_SAMPLE_INTERVAL,
                best_effort: false,
            }
        }

        /// The address to listen on.
        pub fn addr(&self) -> SocketAddr {
            self.addr
        }

        /// Readiness requires the database to answer `SELECT 1` (the app adds
        /// this check itself).
        pub fn database(self, pool: PgPool) -> Self {
            self.ready_check("database", move || {
                let pool = pool.clone();
                async move {
                    sqlx::query(crate::sql::PING)
                        .execute(&pool)
                        .await
                        .map(|_| ())
                }
            })
        }

        /// Adds a readiness check: `/readyz` answers 200 only when every check
        /// returns `Ok` within 5 s. The error is shown in the 503 response, so
        /// it must not carry credentials.
        ///
        /// ```
        /// # fn f(e: outbox::metrics::Endpoint) -> outbox::metrics::Endpoint {
        /// e.ready_check("broker", || async {
        ///     // for example: fetch the cluster metadata with a short timeout
        ///     Err::<(), _>("broker 127.0.0.1:9092 unreachable")
        /// })
        /// # }
        /// ```
        pub fn ready_check<F, Fut, E>(mut self, name: impl Into<String>, check: F) -> Self
        where
            F: Fn() -> Fut + Send + Sync + 'static,
            Fut: Future<Output = Result<(), E>> + Send + 'static,
            E: std::fmt::Display,
        {
            let check: Check = Arc::new(move || {
                let fut = check();
                Box::pin(async move { fut.await.map_err(|e| e.to_string()) })
            });
            self.checks.push((name.into(), check));
            self
        }

        /// How often an app samples the row gauges (`outbox_pending_rows`
        /// and friends); 100 ms to 1 h, default 5 s. Each sample counts the
        /// outbox rows per queue.
        pub fn sample_interval(mut self, every: Duration) -> Self {
            self.sample_interval = every;
            self
        }

        /// `true`: when the address cannot be bound, an app logs a warning and
        /// runs without the endpoint instead of failing to start (for a
        /// default address that another process on the host may hold).
        pub fn best_effort(mut self, yes: bool) -> Self {
            self.best_effort = yes;
            self
        }

        pub(crate) fn is_best_effort(&self) -> bool {
            self.best_effort
        }

        pub(crate) fn sample_every(&self) -> Duration {
            self.sample_interval
        }

        /// Installs the Prometheus recorder (once per process; later calls
        /// share it), binds the address and serves `/metrics`, `/healthz` and
        /// `/readyz` until [`MetricsHandle::stop`].
        pub async fn serve(self) -> Result<MetricsHandle, Error> {
            if !super::SAMPLE_INTERVALS.contains(&self.sample_interval) {
                return Err(Error::invalid(format!(
                    "metrics sample interval is {:?}, accepted: 100 ms to 1 h",
                    self.sample_interval
                )));
            }
            let prometheus = recorder()?;
            let listener = TcpListener::bind(self.addr).await.map_err(|e| {
                Error::invalid(format!(
                    "cannot serve metrics on {}: {e} (accepted: a free local address, port 0 picks one)",
                    self.addr
                ))
            })?;
            let addr = listener.local_addr().map_err(|e| {
                Error::invalid(format!("cannot serve metrics on {}: {e}", self.addr))
            })?;
            let shared = Arc::new(Shared {
                prometheus: prometheus.clone(),
                checks: self.checks,
            });
            let task = tokio::spawn(accept_loop(listener, shared));
            tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
            Ok(MetricsHandle {
                addr,
                prometheus,
                task: task.abort_handle(),
            })
        }
    }

    /// Installs the Prometheus recorder and serves `/metrics`, `/healthz` and
    /// `/readyz` on `addr` with no readiness checks (see [`Endpoint`] to add
    /// them; the app adds the database).
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), outbox::Error> {
    /// let handle = outbox::metrics::serve("127.0.0.1:0".parse().unwrap()).await?;
    /// println!("http://{}/metrics", handle.local_addr());
    /// # Ok(()) }
    /// ```
    pub async fn serve(addr: SocketAddr) -> Result<MetricsHandle, Error> {
        Endpoint::new(addr).serve().await
    }

    /// A running metrics endpoint.
    #[derive(Debug, Clone)]
    pub struct MetricsHandle {
        addr: SocketAddr,
        prometheus: PrometheusHandle,
        task: tokio::task::AbortHandle,
    }

    impl MetricsHandle {
        /// The address the endpoint listens on (the real port when 0 was asked).
        pub fn local_addr(&self) -> SocketAddr {
            self.addr
        }

        /// The metrics in the Prometheus text format, as `/metrics` serves them.
        pub fn render(&self) -> String {
            self.prometheus.render()
        }

        /// Stops accepting connections. The recorder stays installed.
        pub fn stop(&self) {
            self.task.abort();
        }
    }

    /// The process-wide Prometheus recorder, installed on first use.
    fn recorder() -> Result<PrometheusHandle, Error> {
        static RECORDER: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
        let mut slot = RECORDER.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = &*slot {
            return Ok(h.clone());
        }
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
            .and_then(|b| b.install_recorder())
            .map_err(|e| {
                Error::invalid(format!(
                    "cannot install the Prometheus recorder: {e} (only one metrics recorder \
                     can be installed per process; serve yours instead of outbox::metrics::serve)"
                ))
            })?;
        super::describe();
        *slot = Some(handle.clone());
        Ok(handle)
    }

    struct Shared {
        prometheus: PrometheusHandle,
        checks: Vec<(String, Check)>,
    }

    async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
        // Readiness as a gauge too, for alerts; ends with this loop (the
        // set aborts its tasks when dropped).
        let mut side = tokio::task::JoinSet::new();
        let checks = shared.clone();
        side.spawn(async move {
            loop {
                readiness(&checks.checks).await;
                tokio::time::sleep(READY_SAMPLE_INTERVAL).await;
            }
        });
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut upkeep = tokio::time::interval(Duration::from_secs(5));
        let mut backoff = Duration::from_millis(10);
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = upkeep.tick() => {
                    shared.prometheus.run_upkeep();
                    continue;
                }
            };
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => { backoff = Duration::from_millis(10); s }
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
                _ = upkeep.tick() => {
                    shared.prometheus.run_upkeep();
                    continue;
                }
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(30), answer(stream, &shared)).await;
                drop(permit);
            });
        }
    }

    async fn answer(mut stream: TcpStream, shared: &Shared) {
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        let head = async {
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if buf.windows(4).any(|w| w == b"\r\n\r\n")
                    || buf.windows(2).any(|w| w == b"\n\n")
                    || buf.len() > MAX_REQUEST
                {
                    return;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), head)
            .await
            .is_err()
        {
            return;
        }
        let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        let (status, content_type, body) = match (method, path) {
            ("GET" | "HEAD", "/metrics") => (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                shared.prometheus.render(),
            ),
            ("GET" | "HEAD", "/healthz") => ("200 OK", "text/plain; charset=utf-8", "ok\n".into()),
            ("GET" | "HEAD", "/readyz") => {
                let (ready, body) = readiness(&shared.checks).await;
                let status = if ready {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                (status, "text/plain; charset=utf-8", body)
            }
            ("GET" | "HEAD", _) => (
                "404 Not Found",
                "text/plain; charset=utf-8",
                "not found: try /metrics, /healthz or /readyz\n".into(),
            ),
            _ => (
                "405 Method Not Allowed",
                "text/plain; charset=utf-8",
                "only GET and HEAD are accepted\n".into(),
            ),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes()).await;
        if method != "HEAD" {
            let _ = stream.write_all(body.as_bytes()).await;
        }
        let _ = stream.shutdown().await;
    }

    /// How often [`super::READY`] is evaluated besides each `/readyz`.
    const READY_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

    /// Runs every check at once; one line per check. Sets [`super::READY`].
    async fn readiness(checks: &[(String, Check)]) -> (bool, String) {
        let results = futures::future::join_all(checks.iter().map(|(name, check)| async move {
            let r = match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            };
            (name, r)
        }))
        .await;
        let mut ready = true;
        let mut body = String::new();
        for (name, r) in results {
            match r {
                Ok(()) => body.push_str(&format!("{name}: ok\n")),
                Err(e) => {
                    ready = false;
                    body.push_str(&format!("{name}: failed: {e}\n"));
                }
            }
        }
        metrics::gauge!(super::READY).set(if ready { 1.0 } else { 0.0 });
        let verdict = if ready { "ready\n" } else { "not ready\n" };
        (ready, format!("{verdict}{body}"))
    }
}
