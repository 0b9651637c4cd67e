//! `outbox-relay`: forwards every row of a PostgreSQL outbox table to Kafka,
//! configured by environment variables (`outbox-relay --help` lists them).
//!
//! Exit status: 0 after SIGINT/SIGTERM (or once the outbox is empty with
//! `RELAY_EXIT_WHEN_IDLE=true`), 2 for an invalid setting, 1 for a runtime
//! failure such as a missing table.

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use outbox_kafka::relay::{run_relay, LogFormat, RelayConfig, RelayError};
use std::process::ExitCode;

/// Forwards every row of a PostgreSQL outbox table to Kafka, the queue naming
/// the topic. Every option can be given as the environment variable shown.
#[derive(Debug, Parser)]
#[command(
    name = "outbox-relay",
    version,
    after_help = "Any librdkafka setting can be passed as KAFKA_PROP_<KEY>, '_' standing for '.' \
                  (KAFKA_PROP_SECURITY_PROTOCOL=SASL_SSL sets security.protocol).\n\
                  Durations are a whole number with a unit: 500ms, 10s, 2m, 1h.\n\
                  Exit status: 0 on SIGINT/SIGTERM or when idle with RELAY_EXIT_WHEN_IDLE, \
                  2 for an invalid setting, 1 for a runtime failure."
)]
struct Args {
    /// PostgreSQL URL of the database holding the outbox.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, default_value = outbox_kafka::relay::DEFAULT_DATABASE_URL)]
    database_url: String,
    /// Broker type; only kafka is accepted.
    #[arg(long, env = "PUBLISHER_TYPE", default_value = "kafka")]
    publisher_type: String,
    /// Kafka servers: kafka://[user:password@]host:port,host:port [default: KAFKA_BROKERS, else 127.0.0.1:9092].
    #[arg(long, env = "PUBLISHER_URL", hide_env_values = true)]
    publisher_url: Option<String>,
    /// Kafka servers as host:port,host:port, used when PUBLISHER_URL is unset.
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Acknowledgements to wait for: all, one, none.
    #[arg(long, env = "KAFKA_ACKS", default_value = "all")]
    kafka_acks: String,
    /// Idempotent producer [default: true with KAFKA_ACKS=all].
    #[arg(long, env = "KAFKA_IDEMPOTENT")]
    kafka_idempotent: Option<String>,
    /// true: delete rows once queued in the producer, before Kafka acknowledged them (gives up at-least-once delivery).
    #[arg(long, env = "KAFKA_ASYNC", default_value = "false")]
    kafka_async: String,
    /// Messages per produce request (librdkafka batch.num.messages) [default: librdkafka's].
    #[arg(long, env = "KAFKA_BATCH_SIZE")]
    kafka_batch_size: Option<String>,
    /// Time to fill a produce request (linger.ms), e.g. 5ms [default: 0ms: each claimed batch is sent whole].
    #[arg(long, env = "KAFKA_LINGER")]
    kafka_linger: Option<String>,
    /// Compression: none, gzip, snappy, lz4, zstd.
    #[arg(long, env = "KAFKA_COMPRESSION", default_value = "none")]
    kafka_compression: String,
    /// How long a message may wait for its acknowledgement (message.timeout.ms).
    #[arg(long, env = "KAFKA_WRITE_TIMEOUT", default_value = "30s")]
    kafka_write_timeout: String,
    /// Create missing topics with the admin API.
    #[arg(long, env = "KAFKA_CREATE_TOPICS", default_value = "false")]
    kafka_create_topics: String,
    /// Partitions of created topics [default: the broker's num.partitions].
    #[arg(long, env = "KAFKA_TOPIC_PARTITIONS")]
    kafka_topic_partitions: Option<String>,
    /// One Kafka transaction per batch under this transactional.id [default: off].
    #[arg(long, env = "KAFKA_TRANSACTIONAL_ID")]
    kafka_transactional_id: Option<String>,
    /// Attempts per row before it is dead-lettered.
    #[arg(long, env = "RETRY_MAX_ATTEMPTS", default_value = "10")]
    retry_max_attempts: String,
    /// Delay after the first failed attempt; it doubles with each attempt.
    #[arg(long, env = "RETRY_INITIAL_DELAY", default_value = "1s")]
    retry_initial_delay: String,
    /// Longest delay between two attempts.
    #[arg(long, env = "RETRY_MAX_DELAY", default_value = "5m")]
    retry_max_delay: String,
    /// Outbox table, optionally schema.table.
    #[arg(long, env = "OUTBOX_TABLE", default_value = "outbox")]
    outbox_table: String,
    /// Dead-letter table; none parks failed rows in the outbox.
    #[arg(long, env = "DLQ_TABLE", default_value = "outbox_dlq")]
    dlq_table: String,
    /// Queue to topic pairs: queue1:topic1,queue2:topic2 [default: the topic is TOPIC_PREFIX + queue].
    #[arg(long, env = "TOPIC_MAP")]
    topic_map: Option<String>,
    /// Prefix of the topic of queues not in TOPIC_MAP [default: none].
    #[arg(long, env = "TOPIC_PREFIX")]
    topic_prefix: Option<String>,
    /// Rows per claim (1 to 10000).
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value = "500")]
    relay_batch_size: String,
    /// Rows handled at once per worker (1 to 10000).
    #[arg(long, env = "RELAY_CONCURRENCY", default_value = "500")]
    relay_concurrency: String,
    /// Claim loops (1 to 64).
    #[arg(long, env = "RELAY_WORKERS", default_value = "2")]
    relay_workers: String,
    /// Bytes of payload and headers per claim; a claim stops at the row that reaches it and takes at least one row (1024 to 1073741824).
    #[arg(long, env = "RELAY_BATCH_BYTES", default_value = "67108864")]
    relay_batch_bytes: String,
    /// Deliveries of a row beyond its settled attempts (the relay crashed, was killed or hung with it each time) before it is dead-lettered as crashed (1 to 1000).
    #[arg(long, env = "RELAY_MAX_DELIVERIES", default_value = "5")]
    relay_max_deliveries: String,
    /// Create the outbox and dead-letter tables at start.
    #[arg(long, env = "RELAY_MIGRATE", default_value = "false")]
    relay_migrate: String,
    /// Exit 0 once the outbox has no pending row (for scripts).
    #[arg(long, env = "RELAY_EXIT_WHEN_IDLE", default_value = "false")]
    relay_exit_when_idle: String,
    /// Address of the Prometheus /metrics, liveness /healthz and readiness /readyz endpoint; off disables it [default: 0.0.0.0:9187; when taken, the relay runs without it and logs a warning].
    #[arg(long, env = "CAPTURE", default_value = "table")]
    capture: String,
    #[arg(long, env = "CAPTURE_SLOT", default_value = "outbox_relay")]
    capture_slot: String,
    #[arg(long, env = "CAPTURE_PUBLICATION", default_value = "outbox_relay")]
    capture_publication: String,
    #[arg(long, env = "CAPTURE_HEARTBEAT", default_value = "10s")]
    capture_heartbeat: String,
    #[arg(long, env = "CAPTURE_TABLE")]
    capture_table: Option<String>,
    #[arg(long, env = "CAPTURE_COLUMNS", default_value = outbox::stream::DEBEZIUM_COLUMNS)]
    capture_columns: String,
    #[arg(long, env = "CAPTURE_MAX_IN_FLIGHT", default_value = "20000")]
    capture_max_in_flight: String,
    #[arg(long, env = "METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// How often the outbox gauges (pending rows, oldest age, parked, dead letters) are counted in the database (100ms to 1h).
    #[arg(long, env = "METRICS_SAMPLE_INTERVAL", default_value = "5s")]
    metrics_sample_interval: String,
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. info,outbox=debug.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    rust_log: String,
}

impl Args {
    /// The settings as `(variable, value)` pairs, plus the `KAFKA_PROP_*`
    /// variables of the environment.
    fn vars(self) -> Vec<(String, String)> {
        let mut vars: Vec<(&str, Option<String>)> = vec![
            ("DATABASE_URL", Some(self.database_url)),
            ("PUBLISHER_TYPE", Some(self.publisher_type)),
            ("PUBLISHER_URL", self.publisher_url),
            ("KAFKA_BROKERS", self.kafka_brokers),
            ("KAFKA_ACKS", Some(self.kafka_acks)),
            ("KAFKA_IDEMPOTENT", self.kafka_idempotent),
            ("KAFKA_ASYNC", Some(self.kafka_async)),
            ("KAFKA_BATCH_SIZE", self.kafka_batch_size),
            ("KAFKA_LINGER", self.kafka_linger),
            ("KAFKA_COMPRESSION", Some(self.kafka_compression)),
            ("KAFKA_WRITE_TIMEOUT", Some(self.kafka_write_timeout)),
            ("KAFKA_CREATE_TOPICS", Some(self.kafka_create_topics)),
            ("KAFKA_TOPIC_PARTITIONS", self.kafka_topic_partitions),
            ("KAFKA_TRANSACTIONAL_ID", self.kafka_transactional_id),
            ("RETRY_MAX_ATTEMPTS", Some(self.retry_max_attempts)),
            ("RETRY_INITIAL_DELAY", Some(self.retry_initial_delay)),
            ("RETRY_MAX_DELAY", Some(self.retry_max_delay)),
            ("OUTBOX_TABLE", Some(self.outbox_table)),
            ("DLQ_TABLE", Some(self.dlq_table)),
            ("TOPIC_MAP", self.topic_map),
            ("TOPIC_PREFIX", self.topic_prefix),
            ("RELAY_BATCH_SIZE", Some(self.relay_batch_size)),
            ("RELAY_CONCURRENCY", Some(self.relay_concurrency)),
            ("RELAY_WORKERS", Some(self.relay_workers)),
            ("RELAY_BATCH_BYTES", Some(self.relay_batch_bytes)),
            ("RELAY_MAX_DELIVERIES", Some(self.relay_max_deliveries)),
            ("RELAY_MIGRATE", Some(self.relay_migrate)),
            ("RELAY_EXIT_WHEN_IDLE", Some(self.relay_exit_when_idle)),
            ("CAPTURE", Some(self.capture)),
            ("CAPTURE_SLOT", Some(self.capture_slot)),
            ("CAPTURE_PUBLICATION", Some(self.capture_publication)),
            ("CAPTURE_HEARTBEAT", Some(self.capture_heartbeat)),
            ("CAPTURE_TABLE", self.capture_table.clone()),
            // The default is only used with a table.
            (
                "CAPTURE_COLUMNS",
                (self.capture_table.is_some() || std::env::var_os("CAPTURE_COLUMNS").is_some())
                    .then_some(self.capture_columns),
            ),
            ("CAPTURE_MAX_IN_FLIGHT", Some(self.capture_max_in_flight)),
            ("METRICS_ADDR", self.metrics_addr),
            (
                "METRICS_SAMPLE_INTERVAL",
                Some(self.metrics_sample_interval),
            ),
            ("LOG_FORMAT", Some(self.log_format)),
        ];
        let mut out: Vec<(String, String)> = vars
            .drain(..)
            .filter_map(|(k, v)| Some((k.to_owned(), v?)))
            .collect();
        out.extend(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .filter(|(k, _)| k.starts_with(outbox_kafka::PROP_PREFIX)),
        );
        out
    }
}

fn init_logging(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("RUST_LOG: {filter:?} is not a log filter: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))
}

/// A setting librdkafka refused (`KAFKA_PROP_*` with an unknown key or a bad
/// value): the message with the variable that set it, when it can be told.
fn librdkafka_refusal(e: &RelayError) -> Option<String> {
    let RelayError::Broker(outbox_kafka::Error::Client(message)) = e else {
        return None;
    };
    let var = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter_map(|k| {
            let key = outbox_kafka::prop_key(k.strip_prefix(outbox_kafka::PROP_PREFIX)?);
            message.contains(&format!("\"{key}\"")).then_some(k)
        })
        .next()
        .unwrap_or_else(|| format!("{}*", outbox_kafka::PROP_PREFIX));
    Some(format!("{var}: {e}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = args.rust_log.clone();
    let metrics_unset = args.metrics_addr.is_none();
    let mut config = match RelayConfig::from_vars(args.vars()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("outbox-relay: {e}");
            return ExitCode::from(2);
        }
    };
    if metrics_unset {
        // On by default in the binary (opt-in for RelayConfig users).
        config.metrics = Some(outbox_kafka::relay::MetricsSetting::default_for_binary());
    }
    if let Err(e) = init_logging(config.log_format, &filter) {
        eprintln!("outbox-relay: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run_relay(config, outbox::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(refusal) = librdkafka_refusal(&e) {
                tracing::error!("{refusal}");
                eprintln!("outbox-relay: {refusal}");
                return ExitCode::from(2);
            }
            tracing::error!("{e}");
            eprintln!("outbox-relay: {e}");
            if e.is_config() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
