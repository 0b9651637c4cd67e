//! The stand-alone relay: forwards every row of an outbox table to Kafka with
//! no user code, the queue (event type) naming the topic.
//!
//! The `outbox-relay` binary is a thin shell around [`run_relay`]; tests,
//! benchmarks and applications run the same code in-process.
//!
//! ```no_run
//! # async fn f() -> Result<(), outbox_kafka::relay::RelayError> {
//! use outbox_kafka::relay::{run_relay, RelayConfig};
//! let config = RelayConfig::from_env()?;
//! run_relay(config, outbox::shutdown_signal()).await?;
//! # Ok(()) }
//! ```

use crate::config::{human, parse_bool, parse_duration, parse_number, BrokerConfig, ConfigError};
use crate::topic::{check_topic_name, topic_char};
use crate::Broker;
use outbox::logging::{is_secret_name, redact_url, url_secrets};
use outbox::stream::{LogCapture, LogStream};
use outbox::{
    Capture, Envelope, ExponentialRetry, HandlerError, Output, Subscriber, TableName, Tables,
};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::Connection;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Default of `DATABASE_URL`.
pub const DEFAULT_DATABASE_URL: &str = "postgres://outbox:outbox@127.0.0.1:5432/outbox";
/// Default of `RELAY_BATCH_SIZE`: rows per claim.
pub const DEFAULT_RELAY_BATCH_SIZE: usize = 500;
/// Default of `RELAY_CONCURRENCY`.
pub const DEFAULT_RELAY_CONCURRENCY: usize = 500;
/// Default of `RELAY_WORKERS`.
pub const DEFAULT_RELAY_WORKERS: usize = 2;
pub use crate::topic::MAX_TOPIC_LEN;

/// Where the relay serves `/metrics`, `/healthz` and `/readyz` unless
/// `METRICS_ADDR` says otherwise.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9187";

/// How often an idle relay with `RELAY_EXIT_WHEN_IDLE` looks at the outbox.
const IDLE_CHECK: Duration = Duration::from_millis(200);

/// The environment variables the relay reads, with their defaults (`None`:
/// unset) and a description; the binary's `--help` is built from the same
/// names.
pub const RELAY_VARS: &[(&str, Option<&str>, &str)] = &[
    ("DATABASE_URL", Some(DEFAULT_DATABASE_URL), "PostgreSQL URL of the database holding the outbox"),
    ("PUBLISHER_TYPE", Some("kafka"), "broker type; only kafka is accepted"),
    ("PUBLISHER_URL", None, "kafka://[user:password@]host:port,host:port (default: KAFKA_BROKERS, else 127.0.0.1:9092)"),
    ("KAFKA_BROKERS", None, "host:port,host:port, used when PUBLISHER_URL is unset"),
    ("KAFKA_ACKS", Some("all"), "acknowledgements: all, one, none"),
    ("KAFKA_IDEMPOTENT", None, "idempotent producer (default: true with KAFKA_ACKS=all)"),
    ("KAFKA_ASYNC", Some("false"), "true: delete rows once queued in the producer, before Kafka acknowledges them (gives up at-least-once)"),
    ("KAFKA_BATCH_SIZE", None, "messages per produce request (librdkafka batch.num.messages)"),
    ("KAFKA_LINGER", None, "time to fill a produce request (linger.ms), e.g. 5ms (default 0: each claimed batch is sent whole)"),
    ("KAFKA_COMPRESSION", Some("none"), "none, gzip, snappy, lz4, zstd"),
    ("KAFKA_WRITE_TIMEOUT", Some("30s"), "how long a message may wait for its acknowledgement (message.timeout.ms)"),
    ("KAFKA_CREATE_TOPICS", Some("false"), "create missing topics with the admin API"),
    ("KAFKA_TOPIC_PARTITIONS", None, "partitions of created topics (default: the broker's)"),
    ("KAFKA_TRANSACTIONAL_ID", None, "one Kafka transaction per batch under this transactional.id"),
    ("RETRY_MAX_ATTEMPTS", Some("10"), "attempts per row before it is dead-lettered"),
    ("RETRY_INITIAL_DELAY", Some("1s"), "delay after the first failed attempt (doubles each time)"),
    ("RETRY_MAX_DELAY", Some("5m"), "longest delay between two attempts"),
    ("OUTBOX_TABLE", Some("outbox"), "outbox table, optionally schema.table"),
    ("DLQ_TABLE", Some("outbox_dlq"), "dead-letter table; none parks failed rows in the outbox"),
    ("TOPIC_MAP", None, "queue:topic pairs, comma separated; unmapped queues use TOPIC_PREFIX + queue"),
    ("TOPIC_PREFIX", None, "prefix of the topic of unmapped queues"),
    ("RELAY_BATCH_SIZE", Some("500"), "rows per claim (1 to 10000)"),
    ("RELAY_CONCURRENCY", Some("500"), "rows handled at once per worker (1 to 10000)"),
    ("RELAY_WORKERS", Some("2"), "claim loops (1 to 64)"),
    ("RELAY_BATCH_BYTES", Some("67108864"), "bytes of payload and headers per claim, at least one row (1024 to 1073741824)"),
    ("RELAY_MAX_DELIVERIES", Some("5"), "deliveries of a row beyond its settled attempts (the relay crashed or hung with it) before it is dead-lettered as crashed (1 to 1000)"),
    ("RELAY_MIGRATE", Some("false"), "create the outbox and dead-letter tables at start"),
    ("RELAY_EXIT_WHEN_IDLE", Some("false"), "exit 0 once the outbox has no pending row (table capture only)"),
    ("CAPTURE", Some("table"), "table: poll the outbox table; log: also stream log-mode messages (pg_logical_emit_message) from a replication slot"),
    ("CAPTURE_SLOT", Some("outbox_relay"), "replication slot of CAPTURE=log, created on the first start (lower-case letters, digits and _)"),
    ("CAPTURE_PUBLICATION", Some("outbox_relay"), "publication of CAPTURE=log, created when missing"),
    ("CAPTURE_HEARTBEAT", Some("10s"), "with nothing in flight, how often the slot is moved past WAL written elsewhere (100ms to 1h)"),
    ("CAPTURE_TABLE", None, "with CAPTURE=log, also send the rows inserted into this table (a Debezium-style outbox table, or producers that cannot call pg_logical_emit_message); none by default"),
    ("CAPTURE_COLUMNS", Some(outbox::stream::DEBEZIUM_COLUMNS), "the columns of CAPTURE_TABLE: field=column pairs (queue and payload required; key, id, correlation_id, headers, header.NAME)"),
    ("CAPTURE_MAX_IN_FLIGHT", Some("20000"), "log messages sent and not yet acked at most: what a crash may send twice (1 to 1000000)"),
    ("METRICS_ADDR", Some(DEFAULT_METRICS_ADDR), "address of the Prometheus /metrics, liveness /healthz and readiness /readyz endpoint; off disables it"),
    ("METRICS_SAMPLE_INTERVAL", Some("5s"), "how often the outbox gauges (pending rows, oldest age, parked, dead letters) are counted in the database (100ms to 1h)"),
    ("LOG_FORMAT", Some("text"), "text or json"),
    ("RUST_LOG", Some("info"), "log filter, e.g. info,outbox=debug"),
];

/// How queues map to topics: `TOPIC_MAP` entries first, then `TOPIC_PREFIX` +
/// queue.
///
/// ```
/// let map = outbox_kafka::relay::TopicMap::parse("orders:orders.v1", "app.").unwrap();
/// assert_eq!(map.topic_for("orders").unwrap(), "orders.v1");
/// assert_eq!(map.topic_for("payments").unwrap(), "app.payments");
/// assert!(map.topic_for("bad queue").is_err());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicMap {
    map: HashMap<String, String>,
    prefix: String,
}

impl TopicMap {
    /// Parses `queue1:topic1,queue2:topic2` and a prefix.
    pub fn parse(map: &str, prefix: &str) -> Result<Self, ConfigError> {
        let mut out = HashMap::new();
        for entry in map.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            // Queues may contain ':', topics may not: split at the last one.
            let (queue, topic) = entry.rsplit_once(':').ok_or_else(|| {
                ConfigError::invalid(
                    "TOPIC_MAP",
                    format!("{entry:?} is not queue:topic (accepted: queue1:topic1,queue2:topic2)"),
                )
            })?;
            let (queue, topic) = (queue.trim(), topic.trim());
            if queue.is_empty() {
                return Err(ConfigError::invalid(
                    "TOPIC_MAP",
                    format!("{entry:?} has an empty queue (accepted: queue1:topic1,queue2:topic2)"),
                ));
            }
            check_topic_name(topic).map_err(|m| ConfigError::invalid("TOPIC_MAP", m))?;
            if out.insert(queue.to_owned(), topic.to_owned()).is_some() {
                return Err(ConfigError::invalid(
                    "TOPIC_MAP",
                    format!("queue {queue:?} is mapped twice"),
                ));
            }
        }
        let prefix = prefix.trim();
        if let Some(c) = prefix.chars().find(|c| !topic_char(*c)) {
            return Err(ConfigError::invalid(
                "TOPIC_PREFIX",
                format!(
                    "character {c:?} is not allowed in a topic name (accepted: ASCII letters, digits, '.', '_', '-')"
                ),
            ));
        }
        if prefix.starts_with("__") {
            return Err(ConfigError::invalid(
                "TOPIC_PREFIX",
                format!(
                    "{prefix:?} would name topics internal to Kafka (names starting with \"__\" \
                     are kept for Kafka itself; accepted: a prefix not starting with \"__\")"
                ),
            ));
        }
        if prefix.len() >= MAX_TOPIC_LEN {
            return Err(ConfigError::invalid(
                "TOPIC_PREFIX",
                format!("{} characters leave no room for the queue (accepted: fewer than {MAX_TOPIC_LEN})", prefix.len()),
            ));
        }
        Ok(Self {
            map: out,
            prefix: prefix.to_owned(),
        })
    }

    /// The topic of `queue`, or why the queue cannot be forwarded.
    pub fn topic_for(&self, queue: &str) -> Result<String, String> {
        let topic = match self.map.get(queue) {
            Some(t) => return Ok(t.clone()),
            None => format!("{}{queue}", self.prefix),
        };
        check_topic_name(&topic).map_err(|m| {
            format!(
                "queue {queue:?} has no valid Kafka topic: {m}; map it with TOPIC_MAP=queue:topic"
            )
        })?;
        Ok(topic)
    }
}

/// Log output of the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Settings of the stand-alone relay, read from the environment with
/// [`RelayConfig::from_env`] (see [`RELAY_VARS`]) or set field by field.
///
/// ```
/// let mut config = outbox_kafka::relay::RelayConfig::default();
/// config.batch_size = 1000;
/// config.exit_when_idle = true;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// The database holding the outbox (`DATABASE_URL`).
    pub database_url: String,
    /// The Kafka producer.
    pub broker: BrokerConfig,
    /// The outbox table (`OUTBOX_TABLE`).
    pub outbox_table: String,
    /// The dead-letter table (`DLQ_TABLE`); `None` parks failed rows.
    pub dlq_table: Option<String>,
    /// Queue to topic mapping (`TOPIC_MAP`, `TOPIC_PREFIX`).
    pub topics: TopicMap,
    /// Attempts per row (`RETRY_MAX_ATTEMPTS`).
    pub retry_max_attempts: u32,
    /// First retry delay (`RETRY_INITIAL_DELAY`).
    pub retry_initial_delay: Duration,
    /// Longest retry delay (`RETRY_MAX_DELAY`).
    pub retry_max_delay: Duration,
    /// Rows per claim (`RELAY_BATCH_SIZE`).
    pub batch_size: usize,
    /// Rows in flight per worker (`RELAY_CONCURRENCY`).
    pub concurrency: usize,
    /// Claim loops (`RELAY_WORKERS`).
    pub workers: usize,
    /// Bytes of payload and headers per claim (`RELAY_BATCH_BYTES`).
    pub batch_bytes: usize,
    /// Unsettled deliveries before a row is dead-lettered as `crashed`
    /// (`RELAY_MAX_DELIVERIES`).
    pub max_deliveries: u32,
    /// Create the tables at start (`RELAY_MIGRATE`).
    pub migrate: bool,
    /// Stop once the outbox has no pending row (`RELAY_EXIT_WHEN_IDLE`).
    pub exit_when_idle: bool,
    /// The metrics and health endpoint (`METRICS_ADDR`); `None`: off.
    pub metrics: Option<MetricsSetting>,
    /// How often the endpoint counts the outbox gauges in the database
    /// (`METRICS_SAMPLE_INTERVAL`).
    pub metrics_sample_interval: Duration,
    /// Log output (`LOG_FORMAT`), used by the binary.
    pub log_format: LogFormat,
    /// Where messages are captured from (`CAPTURE`): the table only, or the
    /// write-ahead log as well (the table still carries delayed messages,
    /// timers and the log's failed messages).
    pub capture: Capture,
    /// The replication slot of log capture (`CAPTURE_SLOT`).
    pub capture_slot: String,
    /// The publication of log capture (`CAPTURE_PUBLICATION`).
    pub capture_publication: String,
    /// The heartbeat of an idle slot (`CAPTURE_HEARTBEAT`).
    pub capture_heartbeat: Duration,
    /// Log messages in flight at most (`CAPTURE_MAX_IN_FLIGHT`).
    pub capture_max_in_flight: usize,
    /// A table whose inserted rows are sent too (`CAPTURE_TABLE`,
    /// `CAPTURE_COLUMNS`).
    pub capture_table: Option<outbox::stream::CaptureTable>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            broker: BrokerConfig::default(),
            outbox_table: "outbox".to_owned(),
            dlq_table: Some("outbox_dlq".to_owned()),
            topics: TopicMap::default(),
            retry_max_attempts: 10,
            retry_initial_delay: Duration::from_secs(1),
            retry_max_delay: Duration::from_secs(300),
            batch_size: DEFAULT_RELAY_BATCH_SIZE,
            concurrency: DEFAULT_RELAY_CONCURRENCY,
            workers: DEFAULT_RELAY_WORKERS,
            batch_bytes: outbox::DEFAULT_MAX_BATCH_BYTES,
            max_deliveries: outbox::DEFAULT_MAX_DELIVERIES,
            migrate: false,
            exit_when_idle: false,
            metrics: None,
            metrics_sample_interval: outbox::metrics::DEFAULT_SAMPLE_INTERVAL,
            log_format: LogFormat::Text,
            capture: Capture::Table,
            capture_slot: "outbox_relay".to_owned(),
            capture_publication: "outbox_relay".to_owned(),
            capture_heartbeat: outbox::stream::DEFAULT_HEARTBEAT,
            capture_max_in_flight: outbox::stream::DEFAULT_MAX_IN_FLIGHT,
            capture_table: None,
        }
    }
}

/// The relay's metrics and health endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsSetting {
    /// Where to listen.
    pub addr: std::net::SocketAddr,
    /// `true` when asked for explicitly: failing to listen stops the relay.
    /// The default address only logs a warning when it is taken (another
    /// relay on the same host, say).
    pub required: bool,
}

impl MetricsSetting {
    /// The binary's default: [`DEFAULT_METRICS_ADDR`], best effort (a taken
    /// address is logged, not fatal).
    pub fn default_for_binary() -> Self {
        Self {
            addr: DEFAULT_METRICS_ADDR.parse().expect("a valid default"),
            required: false,
        }
    }
}

/// Why the relay could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// A setting is not valid (the binary exits with status 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The Kafka producer could not be made.
    #[error(transparent)]
    Broker(#[from] crate::Error),
    /// The outbox runtime failed (a missing table, a database error, ...).
    #[error(transparent)]
    Outbox(#[from] outbox::Error),
}

impl RelayError {
    /// True when the error is a bad setting rather than a runtime failure.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            RelayError::Config(_) | RelayError::Broker(crate::Error::Config(_))
        )
    }
}

impl RelayConfig {
    /// Reads the settings from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// Reads the settings from `(name, value)` pairs (see [`RELAY_VARS`]);
    /// empty values count as unset. Every error names its variable.
    ///
    /// ```
    /// use outbox_kafka::relay::RelayConfig;
    /// let c = RelayConfig::from_vars([("TOPIC_MAP", "orders:orders.v1"), ("RELAY_BATCH_SIZE", "1000")]).unwrap();
    /// assert_eq!(c.batch_size, 1000);
    /// let e = RelayConfig::from_vars([("PUBLISHER_TYPE", "nats")]).unwrap_err();
    /// assert_eq!(e.to_string(), r#"PUBLISHER_TYPE: "nats" is not one of kafka"#);
    /// ```
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let vars: BTreeMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(_, v)| !v.trim().is_empty())
            .collect();
        let get = |name: &str| vars.get(name).map(|v| v.trim().to_owned());
        let mut c = RelayConfig::default();
        if let Some(t) = get("PUBLISHER_TYPE") {
            if !t.eq_ignore_ascii_case("kafka") {
                return Err(ConfigError::NotOneOf {
                    var: "PUBLISHER_TYPE".into(),
                    value: t,
                    accepted: "kafka",
                });
            }
        }
        if let Some(url) = get("DATABASE_URL") {
            check_database_url(&url)?;
            c.database_url = url;
        }
        c.broker = BrokerConfig::from_vars(vars.clone())?;
        if let Some(v) = get("RETRY_MAX_ATTEMPTS") {
            c.retry_max_attempts = parse_number("RETRY_MAX_ATTEMPTS", &v, 1, 1_000_000)? as u32;
        }
        if let Some(v) = get("RETRY_INITIAL_DELAY") {
            c.retry_initial_delay = parse_duration("RETRY_INITIAL_DELAY", &v)?;
        }
        if let Some(v) = get("RETRY_MAX_DELAY") {
            c.retry_max_delay = parse_duration("RETRY_MAX_DELAY", &v)?;
        }
        if let Some(v) = get("OUTBOX_TABLE") {
            TableName::new(&v).map_err(|e| ConfigError::invalid("OUTBOX_TABLE", e.to_string()))?;
            c.outbox_table = v;
        }
        if let Some(v) = get("DLQ_TABLE") {
            if v.eq_ignore_ascii_case("none") {
                c.dlq_table = None;
            } else {
                TableName::new(&v).map_err(|e| ConfigError::invalid("DLQ_TABLE", e.to_string()))?;
                c.dlq_table = Some(v);
            }
        }
        c.topics = TopicMap::parse(
            &get("TOPIC_MAP").unwrap_or_default(),
            &get("TOPIC_PREFIX").unwrap_or_default(),
        )?;
        if let Some(v) = get("RELAY_BATCH_SIZE") {
            c.batch_size = parse_number("RELAY_BATCH_SIZE", &v, 1, 10_000)?;
        }
        if let Some(v) = get("RELAY_CONCURRENCY") {
            c.concurrency = parse_number("RELAY_CONCURRENCY", &v, 1, 10_000)?;
        }
        if let Some(v) = get("RELAY_WORKERS") {
            c.workers = parse_number("RELAY_WORKERS", &v, 1, 64)?;
        }
        if let Some(v) = get("RELAY_BATCH_BYTES") {
            c.batch_bytes = parse_number("RELAY_BATCH_BYTES", &v, 1024, 1024 * 1024 * 1024)?;
        }
        if let Some(v) = get("RELAY_MAX_DELIVERIES") {
            c.max_deliveries = parse_number("RELAY_MAX_DELIVERIES", &v, 1, 1000)? as u32;
        }
        if let Some(v) = get("RELAY_MIGRATE") {
            c.migrate = parse_bool("RELAY_MIGRATE", &v)?;
        }
        if let Some(v) = get("RELAY_EXIT_WHEN_IDLE") {
            c.exit_when_idle = parse_bool("RELAY_EXIT_WHEN_IDLE", &v)?;
        }
        c.metrics = match get("METRICS_ADDR") {
            // The binary turns the endpoint on by default ([`MetricsSetting::default_for_binary`]).
            None => None,
            Some(v) if ["off", "none", "false", ""].contains(&v.to_ascii_lowercase().as_str()) => {
                None
            }
            Some(v) => Some(MetricsSetting {
                addr: v.parse().map_err(|_| {
                    ConfigError::invalid(
                        "METRICS_ADDR",
                        format!(
                            "{v:?} is not a socket address (accepted: host:port such as \
                             0.0.0.0:9187 or 127.0.0.1:0, or off)"
                        ),
                    )
                })?,
                required: true,
            }),
        };
        if let Some(v) = get("METRICS_SAMPLE_INTERVAL") {
            let every = parse_duration("METRICS_SAMPLE_INTERVAL", &v)?;
            if !outbox::metrics::SAMPLE_INTERVALS.contains(&every) {
                return Err(ConfigError::invalid(
                    "METRICS_SAMPLE_INTERVAL",
                    format!("{v} is out of range (accepted: 100ms to 1h)"),
                ));
            }
            c.metrics_sample_interval = every;
        }
        if let Some(v) = get("LOG_FORMAT") {
            c.log_format = match v.to_ascii_lowercase().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::NotOneOf {
                        var: "LOG_FORMAT".into(),
                        value: v,
                        accepted: "text, json",
                    })
                }
            };
        }
        if let Some(v) = get("CAPTURE") {
            c.capture = Capture::parse(&v).ok_or(ConfigError::NotOneOf {
                var: "CAPTURE".into(),
                value: v,
                accepted: "table, log",
            })?;
        }
        if let Some(v) = get("CAPTURE_SLOT") {
            c.capture_slot = v;
        }
        if let Some(v) = get("CAPTURE_PUBLICATION") {
            c.capture_publication = v;
        }
        if let Some(v) = get("CAPTURE_HEARTBEAT") {
            let every = parse_duration("CAPTURE_HEARTBEAT", &v)?;
            if every < Duration::from_millis(100) || every > Duration::from_secs(3600) {
                return Err(ConfigError::invalid(
                    "CAPTURE_HEARTBEAT",
                    format!("{v} is out of range (accepted: 100ms to 1h)"),
                ));
            }
            c.capture_heartbeat = every;
        }
        if let Some(table) = get("CAPTURE_TABLE") {
            let columns = get("CAPTURE_COLUMNS")
                .unwrap_or_else(|| outbox::stream::DEBEZIUM_COLUMNS.to_owned());
            c.capture_table = Some(
                outbox::stream::CaptureTable::parse(&table, &columns).map_err(|e| {
                    let var = if TableName::new(&table).is_err() {
                        "CAPTURE_TABLE"
                    } else {
                        "CAPTURE_COLUMNS"
                    };
                    ConfigError::invalid(var, e.to_string())
                })?,
            );
        } else if get("CAPTURE_COLUMNS").is_some() {
            return Err(ConfigError::invalid(
                "CAPTURE_COLUMNS",
                "is set without CAPTURE_TABLE (accepted: set both, or neither)",
            ));
        }
        if let Some(v) = get("CAPTURE_MAX_IN_FLIGHT") {
            c.capture_max_in_flight = parse_number("CAPTURE_MAX_IN_FLIGHT", &v, 1, 1_000_000)?;
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the settings that depend on each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.broker.validate()?;
        check_database_url(&self.database_url)?;
        self.tables()?;
        self.retry()
            .map_err(|e| ConfigError::invalid("RETRY_*", e))?;
        for (var, name) in [
            ("CAPTURE_SLOT", &self.capture_slot),
            ("CAPTURE_PUBLICATION", &self.capture_publication),
        ] {
            outbox::stream::validate_slot_name(var, name).map_err(|e| {
                ConfigError::invalid(
                    var,
                    e.to_string()
                        .trim_start_matches(&format!("{var}: "))
                        .to_owned(),
                )
            })?;
        }
        if self.capture == Capture::Table && self.capture_table.is_some() {
            return Err(ConfigError::invalid(
                "CAPTURE_TABLE",
                "is accepted with CAPTURE=log only (table capture reads the replication slot)",
            ));
        }
        if self.capture == Capture::Log && self.exit_when_idle {
            return Err(ConfigError::invalid(
                "RELAY_EXIT_WHEN_IDLE",
                "true is accepted with CAPTURE=table only (a log stream has no end to wait for)",
            ));
        }
        Ok(())
    }

    /// The log stream of `CAPTURE=log`: the relay's topic mapping, sent
    /// through `broker`.
    pub fn log_stream(&self, pool: PgPool, broker: Broker) -> Result<LogStream, ConfigError> {
        let topics = Arc::new(self.topics.clone());
        let route: outbox::stream::Route = Arc::new(move |env: &Envelope| {
            Ok(outbox::Outgoing {
                sink: "kafka".into(),
                topic: topics.topic_for(&env.queue)?,
                key: env.key.clone().map(String::into_bytes),
                payload: env.payload.clone(),
                headers: Vec::new(),
            })
        });
        let retry = self
            .retry()
            .map_err(|e| ConfigError::invalid("RETRY_*", e))?;
        let mut capture = LogCapture::new(self.database_url.clone())
            .slot(self.capture_slot.clone())
            .publication(self.capture_publication.clone())
            .batch_size(self.batch_size)
            .max_in_flight(self.capture_max_in_flight)
            .heartbeat(self.capture_heartbeat);
        if let Some(t) = &self.capture_table {
            capture = capture.capture_table(t.clone());
        }
        Ok(LogStream::new(pool, capture, Arc::new(broker), route)
            .tables(self.tables()?)
            .retry(retry))
    }

    /// The outbox and dead-letter tables.
    pub fn tables(&self) -> Result<Tables, ConfigError> {
        Tables::new(&self.outbox_table, self.dlq_table.as_deref())
            .map_err(|e| ConfigError::invalid("OUTBOX_TABLE/DLQ_TABLE", e.to_string()))
    }

    fn retry(&self) -> Result<ExponentialRetry, String> {
        let retry = ExponentialRetry::default()
            .max_attempts(self.retry_max_attempts)
            .initial(self.retry_initial_delay)
            .max_delay(self.retry_max_delay);
        outbox::RetryStrategy::validate(&retry).map_err(|e| e.to_string())?;
        Ok(retry)
    }

    /// The relay's subscriber: every queue of the table, each row's payload
    /// sent unchanged to its queue's topic (key: the row's partition key;
    /// headers: the row's and the outbox metadata). A queue without a valid
    /// topic name is rejected (dead-lettered) with a message saying so.
    ///
    /// Register it in an [`outbox::App`] together with a [`Broker`] to relay
    /// from inside an application.
    pub fn subscriber(&self) -> Subscriber {
        let topics = Arc::new(self.topics.clone());
        let handler = move |env: Arc<Envelope>, _ctx: outbox::Context| {
            let topic = topics.topic_for(&env.queue);
            async move {
                let topic = topic.map_err(HandlerError::reject)?;
                Ok(Output::none().publish("kafka", &topic, None, env.payload.clone()))
            }
        };
        // A send waits up to the write timeout; the lease must outlive it, or
        // another worker would take the rows over while they are in flight.
        let lease = (self.broker.get_write_timeout() * 2 + Duration::from_secs(10))
            .max(outbox::DEFAULT_LEASE_TTL);
        let mut sub = Subscriber::new("outbox-relay", handler)
            .all_queues()
            .batch_size(self.batch_size)
            .concurrency(self.concurrency)
            .workers(self.workers)
            .max_batch_bytes(self.batch_bytes)
            .max_deliveries(self.max_deliveries)
            // In log mode the table holds the log's failed messages and the
            // keys that follow them: one row of a key at a time keeps its order.
            .ordered(self.capture == Capture::Log)
            .lease_ttl(lease)
            .retry(self.retry().unwrap_or_default());
        sub = match &self.dlq_table {
            Some(d) => sub.dlq(d.clone()),
            None => sub.no_dlq(),
        };
        sub
    }
}

fn check_database_url(url: &str) -> Result<(), ConfigError> {
    let scheme = url.split("://").next().unwrap_or("");
    if !url.contains("://") || !(scheme == "postgres" || scheme == "postgresql") {
        return Err(ConfigError::invalid(
            "DATABASE_URL",
            format!(
                "{:?} is not a PostgreSQL URL (accepted: postgres://user:password@host:port/database)",
                redact_url(url)
            ),
        ));
    }
    connect_options(url).map(|_| ())
}

/// Query parameters of a connection URL that sqlx's PostgreSQL driver reads.
/// It logs any other one with its value.
const DRIVER_URL_PARAMS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// The driver's options for `DATABASE_URL`, and the names of the query
/// parameters left out of them: those the driver does not read and that look
/// secret (`sslpassword`, ...), since the driver would only log them, value
/// included. A URL the driver refuses (a bad port, an unknown `sslmode`, ...)
/// is an invalid setting: retrying the connection could never help.
fn connect_options(url: &str) -> Result<(PgConnectOptions, Vec<String>), ConfigError> {
    let invalid = |e: String| {
        ConfigError::invalid(
            "DATABASE_URL",
            format!(
                "{:?} is not a valid PostgreSQL URL: {} (accepted: \
                 postgres://user:password@host:port/database?param=value)",
                redact_url(url),
                scrub(&e, url)
            ),
        )
    };
    let mut parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    let mut left_out = Vec::new();
    if parsed.query().is_some() {
        type Pairs = Vec<(String, String)>;
        let (kept, dropped): (Pairs, Pairs) =
            parsed.query_pairs().into_owned().partition(|(name, _)| {
                DRIVER_URL_PARAMS.contains(&name.as_str())
                    || name.starts_with("options[")
                    || !is_secret_name(name)
            });
        if !dropped.is_empty() {
            left_out = dropped.into_iter().map(|(name, _)| name).collect();
            if kept.is_empty() {
                parsed.set_query(None);
            } else {
                parsed.query_pairs_mut().clear().extend_pairs(kept);
            }
        }
    }
    let options =
        PgConnectOptions::from_str(parsed.as_str()).map_err(|e| invalid(e.to_string()))?;
    Ok((options, left_out))
}

/// `text` without the secrets of `url`, for a driver's message that might
/// quote them.
fn scrub(text: &str, url: &str) -> String {
    url_secrets(url)
        .iter()
        .filter(|s| s.len() >= 3)
        .fold(text.to_owned(), |text, secret| {
            text.replace(secret.as_str(), "***")
        })
}

/// The metrics endpoint to serve, with the broker's readiness check; `None`
/// when off, or when the default address is taken (logged).
async fn metrics_endpoint(
    config: &RelayConfig,
) -> Result<Option<outbox::metrics::Endpoint>, RelayError> {
    let Some(setting) = config.metrics else {
        return Ok(None);
    };
    if setting.required {
        // Asked for explicitly: refuse to start without it, naming the setting.
        if let Err(e) = tokio::net::TcpListener::bind(setting.addr).await {
            return Err(ConfigError::invalid(
                "METRICS_ADDR",
                format!("cannot listen on {}: {e}", setting.addr),
            )
            .into());
        }
    }
    // A client of its own for the readiness check: cluster metadata within 2 s.
    let mut client = config.broker.client_config();
    client.remove("transactional.id");
    let probe: Arc<rdkafka::producer::BaseProducer> = Arc::new(client.create().map_err(|e| {
        crate::Error::Client(config.broker.redact(&crate::config::client_error_text(&e)))
    })?);
    let endpoint = outbox::metrics::Endpoint::new(setting.addr)
        .best_effort(!setting.required)
        .sample_interval(config.metrics_sample_interval)
        .ready_check("kafka", move || {
            let probe = probe.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    rdkafka::producer::Producer::client(&*probe)
                        .fetch_metadata(None, Duration::from_secs(2))
                        .map(|_| ())
                        .map_err(|e| format!("no Kafka broker answers: {e}"))
                })
                .await
                .map_err(|e| format!("readiness check failed: {e}"))?
            }
        });
    Ok(Some(endpoint))
}

/// How long one attempt to reach the database may take (a host that drops
/// packets would otherwise hold the first attempt for minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The first pause between two attempts to reach the database; it doubles up
/// to [`CONNECT_BACKOFF_MAX`].
const CONNECT_BACKOFF: Duration = Duration::from_millis(200);
/// The longest pause between two attempts to reach the database.
const CONNECT_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Connects to `config.database_url` (retrying with backoff while the
/// database is unreachable, until `shutdown` completes) and runs the relay
/// until `shutdown` completes, or until the outbox is empty with
/// [`RelayConfig::exit_when_idle`]. The producer is flushed before it returns.
pub async fn run_relay(
    config: RelayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RelayError> {
    config.validate()?;
    // Polled from here on, so a signal handler behind it is in place while
    // the database is awaited.
    let mut shutdown = std::pin::pin!(shutdown);
    let Some(pool) = connect(&config, &mut shutdown).await else {
        return Ok(());
    };
    let result = run_relay_on(pool.clone(), config, shutdown).await;
    pool.close().await;
    result
}

/// The pool, once the database answers; `None` when `shutdown` completed
/// first. Every failed attempt is logged with its cause.
async fn connect(
    config: &RelayConfig,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<PgPool> {
    let url = &config.database_url;
    let redacted = redact_url(url);
    let (options, left_out) = match connect_options(url) {
        Ok(found) => found,
        // `validate` checked it already.
        Err(e) => {
            tracing::error!("{e}");
            return None;
        }
    };
    for name in left_out {
        tracing::warn!(
            database = %redacted,
            "DATABASE_URL: parameter {name:?} is not one the PostgreSQL driver reads; it is left out (its value is not shown)"
        );
    }
    let pool_size = u32::try_from(config.workers * 2 + 3).unwrap_or(32);
    let mut backoff = CONNECT_BACKOFF;
    loop {
        let attempt = async {
            // One connection first: a pool retries a refused connection
            // silently until its acquire timeout, then reports only "pool
            // timed out".
            let probe = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
                .await
                .map_err(|_| format!("no answer within {}", human(CONNECT_TIMEOUT)))?
                .map_err(|e| scrub(&e.to_string(), url))?;
            let _ = probe.close().await;
            PgPoolOptions::new()
                .max_connections(pool_size)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(options.clone())
                .await
                .map_err(|e| scrub(&e.to_string(), url))
        };
        let error = tokio::select! {
            result = attempt => match result {
                Ok(pool) => {
                    tracing::info!(database = %redacted, "connected to the database");
                    return Some(pool);
                }
                Err(e) => e,
            },
            _ = &mut *shutdown => return None,
        };
        tracing::warn!(
            database = %redacted,
            retry_in = %human(backoff),
            "cannot connect to the database: {error}"
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut *shutdown => return None,
        }
        backoff = (backoff * 2).min(CONNECT_BACKOFF_MAX);
    }
}

/// [`run_relay`] on a pool the caller made.
pub async fn run_relay_on(
    pool: PgPool,
    config: RelayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RelayError> {
    config.validate()?;
    let tables = config.tables()?;
    if config.migrate {
        // rustc cannot prove `outbox::migrate`'s future `Send` (its borrows of
        // a connection are "not general enough"), which would make this whole
        // future non-`Send` and `tokio::spawn(run_relay_on(..))` impossible.
        // Driving it on a blocking thread keeps it out of this future.
        let (p, t) = (pool.clone(), tables.clone());
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || handle.block_on(outbox::migrate(&p, &t)))
            .await
            .map_err(|e| outbox::Error::Invalid(format!("migration task failed: {e}")))??;
        tracing::info!(outbox = %tables.outbox, "migrations applied");
    }
    let broker = Broker::new(config.broker.clone())?;
    tracing::info!(
        servers = %config.broker.bootstrap_servers(),
        acks = ?config.broker.get_acks(),
        idempotent = config.broker.is_idempotent(),
        asynchronous = config.broker.is_asynchronous(),
        transactional = config.broker.transactional_id().is_some(),
        write_timeout = ?config.broker.get_write_timeout(),
        "relaying {} to Kafka",
        tables.outbox
    );
    let broker_for_log = (config.capture == Capture::Log).then(|| broker.clone());
    let mut app = outbox::App::manual(pool.clone())
        .tables(tables.clone())
        .register(config.subscriber())
        .broker(broker);
    if let Some(endpoint) = metrics_endpoint(&config).await? {
        app = app.metrics_endpoint(endpoint);
    }
    let running = app.start().await?;
    if config.capture == Capture::Log {
        let stream =
            config.log_stream(pool.clone(), broker_for_log.expect("made for log capture"))?;
        tracing::info!(slot = %config.capture_slot, publication = %config.capture_publication, "streaming log-mode messages");
        let result = stream.run(shutdown).await;
        running.shutdown().await;
        return result.map_err(RelayError::from);
    }
    if config.exit_when_idle {
        let pending_sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE parked_at IS NULL)",
            tables.outbox.quoted()
        );
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(IDLE_CHECK) => {}
            }
            match sqlx::query_scalar::<_, bool>(&pending_sql)
                .fetch_one(&pool)
                .await
            {
                Ok(false) => {
                    tracing::info!("outbox is empty; stopping (RELAY_EXIT_WHEN_IDLE)");
                    break;
                }
                Ok(true) => {}
                Err(e) => tracing::warn!("cannot count pending rows: {e}"),
            }
        }
    } else {
        shutdown.await;
    }
    running.shutdown().await;
    Ok(())
}
