//! Producer settings: a typed builder over librdkafka's configuration map, read
//! from code or from the environment.
//!
//! ```
//! use outbox_kafka::{Acks, BrokerConfig, Compression};
//! use std::time::Duration;
//! let config = BrokerConfig::new("k1:9092,k2:9092")
//!     .acks(Acks::All)
//!     .linger(Duration::from_millis(5))
//!     .compression(Compression::Lz4)
//!     .write_timeout(Duration::from_secs(10))
//!     .set("security.protocol", "SASL_SSL")
//!     .set("sasl.password", "hunter2");
//! config.validate().unwrap();
//! assert!(!format!("{config:?}").contains("hunter2"));
//! ```

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaConfRes;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The bootstrap servers used when none are given.
pub const DEFAULT_SERVERS: &str = "127.0.0.1:9092";
/// The default write timeout (librdkafka's `message.timeout.ms`).
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest write timeout accepted.
pub const MAX_WRITE_TIMEOUT: Duration = Duration::from_secs(3600);
/// The longest linger accepted (librdkafka's limit for `linger.ms`).
pub const MAX_LINGER: Duration = Duration::from_secs(900);
/// The largest batch size accepted (librdkafka's limit for `batch.num.messages`).
pub const MAX_BATCH_SIZE: usize = 1_000_000;

/// librdkafka's default `message.max.bytes`.
const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// What the string shown instead of a secret looks like.
pub(crate) const REDACTED: &str = "***";

/// Acknowledgements the producer waits for (`acks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// Every in-sync replica has the message (`acks=all`), the default. Needed
    /// for the idempotent and the transactional producer.
    #[default]
    All,
    /// The partition leader has written it (`acks=1`).
    One,
    /// Nobody confirms anything (`acks=0`): a lost message is never noticed.
    None,
}

impl Acks {
    /// The value librdkafka takes.
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Acks::All => "all",
            Acks::One => "1",
            Acks::None => "0",
        }
    }

    fn parse(var: &str, value: &str) -> Result<Self, ConfigError> {
        match value.trim().to_ascii_lowercase().as_str() {
            "all" | "-1" => Ok(Acks::All),
            "one" | "1" => Ok(Acks::One),
            "none" | "0" => Ok(Acks::None),
            _ => Err(ConfigError::NotOneOf {
                var: var.to_owned(),
                value: value.to_owned(),
                accepted: "all, one, none",
            }),
        }
    }
}

/// Compression of produced batches (`compression.codec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// No compression, the default.
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    /// The value librdkafka takes.
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    fn parse(var: &str, value: &str) -> Result<Self, ConfigError> {
        match value.trim().to_ascii_lowercase().as_str() {
            "none" | "" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "snappy" => Ok(Compression::Snappy),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(ConfigError::NotOneOf {
                var: var.to_owned(),
                value: value.to_owned(),
                accepted: "none, gzip, snappy, lz4, zstd",
            }),
        }
    }
}

/// A setting that is not valid. Each message names the setting (the environment
/// variable when the configuration was read from the environment) and says what
/// is accepted; secrets are never part of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value outside a fixed set.
    #[error("{var}: {value:?} is not one of {accepted}")]
    NotOneOf {
        /// The setting.
        var: String,
        /// The value given.
        value: String,
        /// The values accepted.
        accepted: &'static str,
    },
    /// Not a boolean.
    #[error("{var}: {value:?} is not a boolean (accepted: true, false, 1, 0, yes, no, on, off)")]
    Bool {
        /// The setting.
        var: String,
        /// The value given.
        value: String,
    },
    /// Not a whole number.
    #[error("{var}: {value:?} is not a number (accepted: {accepted})")]
    Number {
        /// The setting.
        var: String,
        /// The value given.
        value: String,
        /// The range accepted.
        accepted: String,
    },
    /// Not a duration.
    #[error(
        "{var}: {value:?} is not a duration (accepted: a whole number with a unit ms, s, m or h, \
         such as 500ms, 10s, 2m, 1h)"
    )]
    Duration {
        /// The setting.
        var: String,
        /// The value given.
        value: String,
    },
    /// A number or duration outside its range.
    #[error("{var}: {value} is out of range (accepted: {accepted})")]
    OutOfRange {
        /// The setting.
        var: String,
        /// The value given.
        value: String,
        /// The range accepted.
        accepted: String,
    },
    /// Anything else wrong with one setting (a URL, a server address, ...).
    #[error("{var}: {message}")]
    Invalid {
        /// The setting.
        var: String,
        /// What is wrong and what is accepted.
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(var: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            var: var.to_owned(),
            message: message.into(),
        }
    }
}

/// Whether a librdkafka key holds a secret whose value must never be shown:
/// passwords, secrets, private keys, and the free-form SASL/OAUTHBEARER
/// configuration strings.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.contains("key.pem")
        || k.ends_with(".key")
        || k.contains("sasl.oauthbearer.config")
        || k.contains("sasl.jaas.config")
        || k.contains("token")
}

/// The names a configuration's settings are reported under: the builder
/// methods, or the environment variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Names {
    Builder,
    Env,
}

impl Names {
    fn of(self, setting: Setting) -> &'static str {
        use Setting::*;
        match (self, setting) {
            (Names::Builder, Servers) => "servers",
            (Names::Builder, Acks) => "acks",
            (Names::Builder, Idempotent) => "idempotent",
            (Names::Builder, Async) => "asynchronous",
            (Names::Builder, BatchSize) => "batch_size",
            (Names::Builder, Linger) => "linger",
            (Names::Builder, WriteTimeout) => "write_timeout",
            (Names::Builder, Transactional) => "transactional",
            (Names::Builder, Partitions) => "topic_partitions",
            (Names::Env, Servers) => "PUBLISHER_URL",
            (Names::Env, Acks) => "KAFKA_ACKS",
            (Names::Env, Idempotent) => "KAFKA_IDEMPOTENT",
            (Names::Env, Async) => "KAFKA_ASYNC",
            (Names::Env, BatchSize) => "KAFKA_BATCH_SIZE",
            (Names::Env, Linger) => "KAFKA_LINGER",
            (Names::Env, WriteTimeout) => "KAFKA_WRITE_TIMEOUT",
            (Names::Env, Transactional) => "KAFKA_TRANSACTIONAL_ID",
            (Names::Env, Partitions) => "KAFKA_TOPIC_PARTITIONS",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Setting {
    Servers,
    Acks,
    Idempotent,
    Async,
    BatchSize,
    Linger,
    WriteTimeout,
    Transactional,
    Partitions,
}

/// Settings of the Kafka producer behind [`crate::Broker`].
///
/// The typed settings cover what the outbox needs; [`BrokerConfig::set`] passes
/// any other librdkafka key through (TLS, SASL, client id, buffer sizes, ...) and
/// wins over a typed setting of the same key. Values of keys that look like
/// secrets (see [`is_secret_key`]) and passwords in server URLs are redacted
/// in `Debug` output, logs and errors.
///
/// Defaults: `127.0.0.1:9092`, `acks=all`, idempotent, synchronous, no
/// compression, librdkafka's batch size and linger, 30 s write timeout, topics
/// not created.
///
/// ```
/// let config = outbox_kafka::BrokerConfig::default();
/// assert_eq!(config.bootstrap_servers(), "127.0.0.1:9092");
/// ```
#[derive(Clone)]
pub struct BrokerConfig {
    servers: Vec<String>,
    servers_error: Option<ConfigError>,
    username: Option<String>,
    password: Option<String>,
    acks: Acks,
    idempotent: Option<bool>,
    asynchronous: bool,
    batch_size: Option<usize>,
    linger: Option<Duration>,
    compression: Compression,
    write_timeout: Duration,
    create_topics: bool,
    topic_partitions: i32,
    transactional_id: Option<String>,
    props: BTreeMap<String, String>,
    names: Names,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self::new(DEFAULT_SERVERS)
    }
}

impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .props
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_key(k) { REDACTED } else { v };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("BrokerConfig")
            .field("servers", &self.servers)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| REDACTED))
            .field("acks", &self.acks)
            .field("idempotent", &self.idempotence())
            .field("asynchronous", &self.asynchronous)
            .field("batch_size", &self.batch_size)
            .field("linger", &self.linger)
            .field("compression", &self.compression)
            .field("write_timeout", &self.write_timeout)
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("transactional_id", &self.transactional_id)
            .field("props", &props)
            .finish()
    }
}

impl BrokerConfig {
    /// A configuration for the given bootstrap servers: `host:port` entries
    /// separated by commas, or a `kafka://[user:password@]host:port,...` URL.
    /// A malformed list is reported by [`BrokerConfig::validate`].
    ///
    /// ```
    /// let config = outbox_kafka::BrokerConfig::new("kafka://k1:9092,k2:9093");
    /// assert_eq!(config.bootstrap_servers(), "k1:9092,k2:9093");
    /// ```
    pub fn new(servers: &str) -> Self {
        let mut config = Self {
            servers: Vec::new(),
            servers_error: None,
            username: None,
            password: None,
            acks: Acks::All,
            idempotent: None,
            asynchronous: false,
            batch_size: None,
            linger: None,
            compression: Compression::None,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            create_topics: false,
            topic_partitions: -1,
            transactional_id: None,
            props: BTreeMap::new(),
            names: Names::Builder,
        };
        config.set_servers("servers", servers);
        config
    }

    fn set_servers(&mut self, var: &str, value: &str) {
        match parse_servers(var, value) {
            Ok(parsed) => {
                self.servers = parsed.servers;
                self.username = parsed.username;
                self.password = parsed.password;
                self.servers_error = None;
            }
            Err(e) => {
                self.servers.clear();
                self.servers_error = Some(e);
            }
        }
    }

    /// Replaces the bootstrap servers (same forms as [`BrokerConfig::new`]).
    pub fn servers(mut self, servers: &str) -> Self {
        self.set_servers(self.names.of(Setting::Servers), servers);
        self
    }

    /// The acknowledgements to wait for (default [`Acks::All`]).
    pub fn acks(mut self, acks: Acks) -> Self {
        self.acks = acks;
        self
    }

    /// The idempotent producer (`enable.idempotence`): no duplicates or
    /// reordering from the producer's own retries. On by default with
    /// [`Acks::All`], off otherwise; turning it on needs `Acks::All`.
    pub fn idempotent(mut self, on: bool) -> Self {
        self.idempotent = Some(on);
        self
    }

    /// Asynchronous mode: a send counts as done once librdkafka has the message
    /// in its queue, so the outbox row is deleted before Kafka acknowledged it.
    ///
    /// This gives up at-least-once delivery: if the process dies or the broker
    /// stays unreachable past the write timeout, queued messages are lost (the
    /// failure is only logged). The default, synchronous mode, deletes a row only
    /// after Kafka acknowledged its message.
    pub fn asynchronous(mut self, on: bool) -> Self {
        self.asynchronous = on;
        self
    }

    /// At most this many messages per produce request (`batch.num.messages`,
    /// 1 to 1,000,000).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = Some(n);
        self
    }

    /// How long librdkafka waits to fill a batch (`linger.ms`, 0 to 15 min,
    /// and shorter than the write timeout).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = Some(linger);
        self
    }

    /// Compression of produced batches (`compression.codec`).
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// How long a message may take to be acknowledged, retries included
    /// (`message.timeout.ms`, 1 ms to 1 h, default 30 s). When Kafka is down
    /// or a topic does not exist, a send fails after this long and the row is
    /// retried by the subscriber's strategy.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// Creates missing topics with the admin API before sending to them (off
    /// by default: a message to a missing topic fails and is retried). The
    /// producer never lets the broker create topics on its own
    /// (`allow.auto.create.topics=false`).
    pub fn create_topics(mut self, on: bool) -> Self {
        self.create_topics = on;
        self
    }

    /// Partitions of topics created by [`BrokerConfig::create_topics`]
    /// (default -1: the broker's `num.partitions`).
    pub fn topic_partitions(mut self, n: i32) -> Self {
        self.topic_partitions = n;
        self
    }

    /// Exactly-once mode: every batch the runtime sends is one Kafka transaction
    /// under this `transactional.id`. See [`crate::Broker`] for what it does and
    /// does not guarantee. Needs [`Acks::All`] and synchronous mode.
    pub fn transactional(mut self, id: impl Into<String>) -> Self {
        self.transactional_id = Some(id.into());
        self
    }

    /// Sets any librdkafka configuration key (see librdkafka's
    /// `CONFIGURATION.md`), such as `security.protocol`, `sasl.mechanism`,
    /// `sasl.username`, `sasl.password`, `ssl.ca.location` or `client.id`.
    /// It wins over the typed settings.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.props.insert(key.into(), value.into());
        self
    }

    /// The bootstrap servers, comma separated (no credentials).
    pub fn bootstrap_servers(&self) -> String {
        self.servers.join(",")
    }

    /// The acknowledgements waited for.
    pub fn get_acks(&self) -> Acks {
        self.acks
    }

    /// Whether the idempotent producer is used (explicit setting, or the
    /// default: on with [`Acks::All`]).
    pub fn is_idempotent(&self) -> bool {
        self.idempotence()
    }

    fn idempotence(&self) -> bool {
        self.idempotent.unwrap_or(self.acks == Acks::All) || self.transactional_id.is_some()
    }

    /// Whether sends complete once queued ([`BrokerConfig::asynchronous`]).
    pub fn is_asynchronous(&self) -> bool {
        self.asynchronous
    }

    /// The write timeout.
    pub fn get_write_timeout(&self) -> Duration {
        self.write_timeout
    }

    /// Whether missing topics are created.
    pub fn creates_topics(&self) -> bool {
        self.create_topics
    }

    /// Partitions of created topics (-1: the broker's default).
    pub fn get_topic_partitions(&self) -> i32 {
        self.topic_partitions
    }

    /// The largest message the producer sends, in bytes: `message.max.bytes`
    /// when set, else librdkafka's default (1,000,000).
    pub fn max_message_bytes(&self) -> usize {
        self.props
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(LIBRDKAFKA_MESSAGE_MAX_BYTES)
    }

    /// The transactional id, in exactly-once mode.
    pub fn transactional_id(&self) -> Option<&str> {
        self.transactional_id.as_deref()
    }

    /// Checks every setting; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = |s| self.names.of(s);
        if let Some(e) = &self.servers_error {
            return Err(e.clone());
        }
        if self.servers.is_empty() {
            return Err(ConfigError::invalid(
                name(Setting::Servers),
                "no bootstrap server given (accepted: host:port entries separated by commas)",
            ));
        }
        if self.idempotent == Some(true) && self.acks != Acks::All {
            return Err(ConfigError::invalid(
                name(Setting::Idempotent),
                format!("the idempotent producer needs {}=all", name(Setting::Acks)),
            ));
        }
        if let Some(n) = self.batch_size {
            if n == 0 || n > MAX_BATCH_SIZE {
                return Err(ConfigError::OutOfRange {
                    var: name(Setting::BatchSize).to_owned(),
                    value: n.to_string(),
                    accepted: format!("1 to {MAX_BATCH_SIZE}"),
                });
            }
        }
        if self.write_timeout < Duration::from_millis(1) || self.write_timeout > MAX_WRITE_TIMEOUT {
            return Err(ConfigError::OutOfRange {
                var: name(Setting::WriteTimeout).to_owned(),
                value: human(self.write_timeout),
                accepted: "1ms to 1h".to_owned(),
            });
        }
        if let Some(linger) = self.linger {
            if linger > MAX_LINGER {
                return Err(ConfigError::OutOfRange {
                    var: name(Setting::Linger).to_owned(),
                    value: human(linger),
                    accepted: "0ms to 15m".to_owned(),
                });
            }
            if linger >= self.write_timeout {
                return Err(ConfigError::invalid(
                    name(Setting::Linger),
                    format!(
                        "{} is not shorter than the write timeout {} ({}); \
                         accepted: a linger shorter than the write timeout",
                        human(linger),
                        human(self.write_timeout),
                        name(Setting::WriteTimeout)
                    ),
                ));
            }
        }
        if self.topic_partitions == 0 || self.topic_partitions < -1 {
            return Err(ConfigError::OutOfRange {
                var: name(Setting::Partitions).to_owned(),
                value: self.topic_partitions.to_string(),
                accepted: "-1 (the broker's default) or 1 to 100000".to_owned(),
            });
        }
        if self.topic_partitions > 100_000 {
            return Err(ConfigError::OutOfRange {
                var: name(Setting::Partitions).to_owned(),
                value: self.topic_partitions.to_string(),
                accepted: "-1 (the broker's default) or 1 to 100000".to_owned(),
            });
        }
        if let Some(id) = &self.transactional_id {
            if id.trim().is_empty() {
                return Err(ConfigError::invalid(
                    name(Setting::Transactional),
                    "empty transactional id (accepted: any non-empty text)",
                ));
            }
            if self.acks != Acks::All {
                return Err(ConfigError::invalid(
                    name(Setting::Transactional),
                    format!("transactions need {}=all", name(Setting::Acks)),
                ));
            }
            if self.idempotent == Some(false) {
                return Err(ConfigError::invalid(
                    name(Setting::Transactional),
                    format!(
                        "transactions need the idempotent producer ({} must not be false)",
                        name(Setting::Idempotent)
                    ),
                ));
            }
            if self.asynchronous {
                return Err(ConfigError::invalid(
                    name(Setting::Transactional),
                    format!(
                        "transactions need synchronous mode ({} must not be true)",
                        name(Setting::Async)
                    ),
                ));
            }
        }
        for (key, value) in &self.props {
            if key.trim().is_empty() || key.contains(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    "librdkafka property",
                    format!("{key:?} is not a configuration key (accepted: keys such as security.protocol)"),
                ));
            }
            // librdkafka's own check of the key and its value, without making
            // a client: a typo fails here, naming its setting.
            if let Err(e) = ClientConfig::new().set(key, value).create_native_config() {
                let setting = match self.names {
                    Names::Env => prop_var(key),
                    Names::Builder => format!("librdkafka property {key:?}"),
                };
                return Err(ConfigError::invalid(&setting, client_error_text(&e)));
            }
        }
        Ok(())
    }

    /// The librdkafka settings of the producer, credentials included. Keep it
    /// out of logs: its `Debug` output shows every value.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = self.common_config();
        c.set("acks", self.acks.as_librdkafka());
        c.set("enable.idempotence", self.idempotence().to_string());
        c.set(
            "message.timeout.ms",
            self.write_timeout.as_millis().max(1).to_string(),
        );
        // Topics come into being only when someone asks (create_topics), never
        // as a side effect of a typo in a topic name.
        c.set("allow.auto.create.topics", "false");
        c.set("compression.codec", self.compression.as_librdkafka());
        if let Some(n) = self.batch_size {
            c.set("batch.num.messages", n.to_string());
        }
        if let Some(l) = self.linger {
            c.set("linger.ms", l.as_millis().to_string());
        }
        if let Some(id) = &self.transactional_id {
            c.set("transactional.id", id);
            c.set(
                "transaction.timeout.ms",
                (self.write_timeout.as_millis().max(1000) * 2).to_string(),
            );
        }
        for (k, v) in &self.props {
            c.set(k, v);
        }
        c
    }

    /// Settings shared by the producer and the admin client: servers,
    /// credentials, and every pass-through key.
    fn common_config(&self) -> ClientConfig {
        self.base_config(|_| true)
    }

    /// Settings for an admin client: the common settings without the
    /// producer-only keys (the admin client would warn about them).
    pub(crate) fn admin_config(&self) -> ClientConfig {
        self.base_config(|k| !PRODUCER_ONLY_KEYS.contains(&k))
    }

    fn base_config(&self, keep: impl Fn(&str) -> bool) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap_servers());
        if let (Some(user), Some(password)) = (&self.username, &self.password) {
            c.set("sasl.username", user);
            c.set("sasl.password", password);
            c.set("sasl.mechanism", "PLAIN");
            c.set("security.protocol", "sasl_ssl");
        }
        for (k, v) in &self.props {
            if keep(k) {
                c.set(k, v);
            }
        }
        c
    }

    /// A value with the secrets of this configuration masked, for messages.
    pub(crate) fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        let secrets = self
            .password
            .iter()
            .chain(
                self.props
                    .iter()
                    .filter(|(k, _)| is_secret_key(k))
                    .map(|(_, v)| v),
            )
            .filter(|s| s.len() >= 3);
        for s in secrets {
            out = out.replace(s.as_str(), REDACTED);
        }
        out
    }

    /// Reads the configuration from the process environment; see
    /// [`BrokerConfig::from_vars`] for the variables.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// Reads the configuration from `(name, value)` pairs such as
    /// `std::env::vars()` (empty values count as unset):
    ///
    /// | variable | meaning | default |
    /// |---|---|---|
    /// | `PUBLISHER_URL` | `kafka://[user:password@]host:port,host:port` | |
    /// | `KAFKA_BROKERS` | `host:port,host:port` (when `PUBLISHER_URL` is unset) | `127.0.0.1:9092` |
    /// | `KAFKA_ACKS` | `all`, `one`, `none` | `all` |
    /// | `KAFKA_IDEMPOTENT` | idempotent producer | true with `acks=all` |
    /// | `KAFKA_ASYNC` | delete rows once queued, not acknowledged | false |
    /// | `KAFKA_BATCH_SIZE` | `batch.num.messages` | librdkafka's |
    /// | `KAFKA_LINGER` | `linger.ms`, e.g. `5ms` | librdkafka's |
    /// | `KAFKA_COMPRESSION` | `none`, `gzip`, `snappy`, `lz4`, `zstd` | `none` |
    /// | `KAFKA_WRITE_TIMEOUT` | `message.timeout.ms`, e.g. `10s` | `30s` |
    /// | `KAFKA_CREATE_TOPICS` | create missing topics | false |
    /// | `KAFKA_TOPIC_PARTITIONS` | partitions of created topics | broker's |
    /// | `KAFKA_TRANSACTIONAL_ID` | exactly-once mode | off |
    /// | `KAFKA_PROP_<KEY>` | any librdkafka key: `_` stands for `.`, `__` for `_` | |
    ///
    /// Durations are a whole number with a unit: `500ms`, `10s`, `2m`, `1h`.
    /// Credentials in `PUBLISHER_URL` become `sasl.username`/`sasl.password`
    /// with `sasl.mechanism=PLAIN` and `security.protocol=sasl_ssl`, unless
    /// `KAFKA_PROP_*` variables say otherwise.
    ///
    /// ```
    /// let config = outbox_kafka::BrokerConfig::from_vars([
    ///     ("PUBLISHER_URL", "kafka://k1:9092,k2:9092"),
    ///     ("KAFKA_ACKS", "one"),
    ///     ("KAFKA_WRITE_TIMEOUT", "10s"),
    ///     ("KAFKA_PROP_SECURITY_PROTOCOL", "SASL_SSL"),
    /// ])
    /// .unwrap();
    /// assert_eq!(config.bootstrap_servers(), "k1:9092,k2:9092");
    /// assert_eq!(config.get_write_timeout(), std::time::Duration::from_secs(10));
    /// assert_eq!(config.client_config().get("security.protocol"), Some("SASL_SSL"));
    ///
    /// let err = outbox_kafka::BrokerConfig::from_vars([("KAFKA_ACKS", "two")]).unwrap_err();
    /// assert_eq!(err.to_string(), r#"KAFKA_ACKS: "two" is not one of all, one, none"#);
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
        let get = |name: &str| vars.get(name).cloned();
        let mut c = BrokerConfig {
            names: Names::Env,
            ..BrokerConfig::default()
        };
        if let Some(url) = get("PUBLISHER_URL") {
            c.set_servers("PUBLISHER_URL", &url);
        } else if let Some(list) = get("KAFKA_BROKERS") {
            c.set_servers("KAFKA_BROKERS", &list);
        }
        if let Some(e) = c.servers_error.take() {
            return Err(e);
        }
        if let Some(v) = get("KAFKA_ACKS") {
            c.acks = Acks::parse("KAFKA_ACKS", &v)?;
        }
        if let Some(v) = get("KAFKA_IDEMPOTENT") {
            c.idempotent = Some(parse_bool("KAFKA_IDEMPOTENT", &v)?);
        }
        if let Some(v) = get("KAFKA_ASYNC") {
            c.asynchronous = parse_bool("KAFKA_ASYNC", &v)?;
        }
        if let Some(v) = get("KAFKA_BATCH_SIZE") {
            c.batch_size = Some(parse_number("KAFKA_BATCH_SIZE", &v, 1, MAX_BATCH_SIZE)?);
        }
        if let Some(v) = get("KAFKA_LINGER") {
            c.linger = Some(parse_duration("KAFKA_LINGER", &v)?);
        }
        if let Some(v) = get("KAFKA_COMPRESSION") {
            c.compression = Compression::parse("KAFKA_COMPRESSION", &v)?;
        }
        if let Some(v) = get("KAFKA_WRITE_TIMEOUT") {
            c.write_timeout = parse_duration("KAFKA_WRITE_TIMEOUT", &v)?;
        }
        if let Some(v) = get("KAFKA_CREATE_TOPICS") {
            c.create_topics = parse_bool("KAFKA_CREATE_TOPICS", &v)?;
        }
        if let Some(v) = get("KAFKA_TOPIC_PARTITIONS") {
            let n: i64 = v.trim().parse().map_err(|_| ConfigError::Number {
                var: "KAFKA_TOPIC_PARTITIONS".into(),
                value: v.clone(),
                accepted: "-1 (the broker's default) or 1 to 100000".into(),
            })?;
            c.topic_partitions = i32::try_from(n).unwrap_or(i32::MAX);
        }
        if let Some(v) = get("KAFKA_TRANSACTIONAL_ID") {
            c.transactional_id = Some(v);
        }
        for (name, value) in &vars {
            if let Some(suffix) = name.strip_prefix(PROP_PREFIX) {
                if suffix.is_empty() {
                    return Err(ConfigError::invalid(
                        name,
                        "no key after the prefix (accepted: KAFKA_PROP_<KEY>, e.g. KAFKA_PROP_SECURITY_PROTOCOL)",
                    ));
                }
                c.props.insert(prop_key(suffix), value.clone());
            }
        }
        c.validate()?;
        Ok(c)
    }
}

/// Keys the admin client would warn about ("producer property ... ignored").
const PRODUCER_ONLY_KEYS: &[&str] = &[
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "compression.codec",
    "compression.type",
    "batch.num.messages",
    "batch.size",
    "linger.ms",
    "queue.buffering.max.ms",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "transactional.id",
    "transaction.timeout.ms",
    "partitioner",
    "retries",
    "message.send.max.retries",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
];

/// A librdkafka error for messages: a refused setting is described by its
/// key, never its value (a misspelled secret key is not recognised as secret,
/// so no value is shown at all).
pub(crate) fn client_error_text(e: &KafkaError) -> String {
    let KafkaError::ClientConfig(result, description, key, value) = e else {
        return e.to_string();
    };
    if *result == RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN {
        let meant = match closest_key(key) {
            Some(k) => format!("did you mean {k:?}? "),
            None => String::new(),
        };
        return format!(
            "no such librdkafka property {key:?} ({meant}accepted: the keys of librdkafka's CONFIGURATION.md)"
        );
    }
    // librdkafka quotes a value ("...") or sets it between words (value 5
    // is outside ...); a long value is hidden wherever it appears.
    let mut text = description.trim().to_owned();
    if !value.is_empty() {
        text = text
            .replace(&format!("\"{value}\""), &format!("\"{REDACTED}\""))
            .replace(&format!(" {value} "), &format!(" {REDACTED} "));
        if let Some(start) = text.strip_suffix(&format!(" {value}")) {
            text = format!("{start} {REDACTED}");
        }
        if value.len() >= 8 {
            text = text.replace(value.as_str(), REDACTED);
        }
    }
    let mut chars = text.chars();
    let text = match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => format!("librdkafka refused property {key:?}"),
    };
    if text.contains(key.as_str()) {
        format!("{text} (the value is not shown)")
    } else {
        format!("property {key:?}: {text} (the value is not shown)")
    }
}

/// The known librdkafka key nearest to `key`, when one is near enough to be
/// a typo of it.
fn closest_key(key: &str) -> Option<&'static str> {
    let key = key.to_ascii_lowercase();
    crate::properties::LIBRDKAFKA_KEYS
        .iter()
        .map(|k| (edit_distance(&key, k), *k))
        .filter(|(d, k)| *d <= 3 && *d * 4 <= k.len())
        .min()
        .map(|(_, k)| k)
}

/// Levenshtein distance (in bytes; keys are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// `sasl.password` -> `KAFKA_PROP_SASL_PASSWORD`: the variable that sets a
/// key (the inverse of [`prop_key`]).
fn prop_var(key: &str) -> String {
    let suffix: String = key
        .split('_')
        .map(|part| part.replace('.', "_"))
        .collect::<Vec<_>>()
        .join("__");
    format!("{PROP_PREFIX}{}", suffix.to_ascii_uppercase())
}

/// Prefix of the variables that pass librdkafka keys through.
pub const PROP_PREFIX: &str = "KAFKA_PROP_";

/// `SECURITY_PROTOCOL` -> `security.protocol`; `__` stands for a literal `_`.
pub fn prop_key(suffix: &str) -> String {
    suffix
        .to_ascii_lowercase()
        .split("__")
        .map(|part| part.replace('_', "."))
        .collect::<Vec<_>>()
        .join("_")
}

struct ParsedServers {
    servers: Vec<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Parses `kafka://[user:pass@]h1:9092,h2:9092` or `h1:9092,h2:9092`.
fn parse_servers(var: &str, value: &str) -> Result<ParsedServers, ConfigError> {
    let value = value.trim();
    let mut username = None;
    let mut password = None;
    let mut servers = Vec::new();
    for (i, entry) in value.split(',').enumerate() {
        let mut entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        if let Some(pos) = entry.find("://") {
            let scheme = &entry[..pos];
            if !scheme.eq_ignore_ascii_case("kafka") {
                return Err(ConfigError::invalid(
                    var,
                    format!(
                        "scheme must be kafka:// (got {:?}; accepted: kafka://host:port,host:port)",
                        format!("{scheme}://")
                    ),
                ));
            }
            entry = entry[pos + 3..].trim();
            if entry.is_empty() {
                continue;
            }
        }
        if let Some(at) = entry.rfind('@') {
            if i != 0 && username.is_none() {
                return Err(ConfigError::invalid(
                    var,
                    "credentials are accepted only before the first server (kafka://user:password@host:port,...)",
                ));
            }
            let userinfo = &entry[..at];
            let (user, pass) = userinfo.split_once(':').ok_or_else(|| {
                ConfigError::invalid(
                    var,
                    "credentials must be user:password (kafka://user:password@host:port)",
                )
            })?;
            if user.is_empty() {
                return Err(ConfigError::invalid(
                    var,
                    "empty user name in the credentials",
                ));
            }
            username = Some(percent_decode(user));
            password = Some(percent_decode(pass));
            entry = &entry[at + 1..];
        }
        let entry = entry.trim_end_matches('/');
        if entry.contains('/') || entry.contains('?') {
            return Err(ConfigError::invalid(
                var,
                format!(
                    "{:?} has a path or query; accepted: host:port entries separated by commas",
                    outbox::logging::redact_url(entry)
                ),
            ));
        }
        servers.push(parse_host_port(var, entry)?);
    }
    if servers.is_empty() {
        return Err(ConfigError::invalid(
            var,
            "no bootstrap server given (accepted: kafka://host:port,host:port)",
        ));
    }
    Ok(ParsedServers {
        servers,
        username,
        password,
    })
}

fn parse_host_port(var: &str, entry: &str) -> Result<String, ConfigError> {
    // [v6::addr]:port, host:port, or host (port 9092).
    let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
        let close = rest.find(']').ok_or_else(|| {
            ConfigError::invalid(var, format!("{entry:?}: unclosed '[' in an IPv6 address"))
        })?;
        let host = &entry[..close + 2];
        let after = &rest[close + 1..];
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => {
                return Err(ConfigError::invalid(
                    var,
                    format!("{entry:?} is not host:port"),
                ))
            }
        }
    } else {
        match entry.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (entry, None),
        }
    };
    if host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '@' | ',' | '/'))
    {
        return Err(ConfigError::invalid(
            var,
            format!("{entry:?}: missing or invalid host (accepted: host:port)"),
        ));
    }
    let port = match port {
        None => 9092,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => {
                return Err(ConfigError::invalid(
                    var,
                    format!("port {p:?} of {entry:?} is not a number from 1 to 65535"),
                ))
            }
            Ok(n) => n,
        },
    };
    Ok(format!("{host}:{port}"))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `true/false/1/0/yes/no/on/off`.
pub fn parse_bool(var: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::Bool {
            var: var.to_owned(),
            value: value.to_owned(),
        }),
    }
}

/// Parses a whole number from `min` to `max`.
pub fn parse_number(var: &str, value: &str, min: usize, max: usize) -> Result<usize, ConfigError> {
    let accepted = format!("a whole number from {min} to {max}");
    let n: u64 = value.trim().parse().map_err(|_| ConfigError::Number {
        var: var.to_owned(),
        value: value.to_owned(),
        accepted: accepted.clone(),
    })?;
    match usize::try_from(n) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError::OutOfRange {
            var: var.to_owned(),
            value: n.to_string(),
            accepted,
        }),
    }
}

/// Parses a duration: a whole number with a unit `ms`, `s`, `m` or `h`
/// (`500ms`, `10s`, `2m`, `1h`).
///
/// ```
/// use std::time::Duration;
/// assert_eq!(outbox_kafka::parse_duration("X", "500ms").unwrap(), Duration::from_millis(500));
/// assert_eq!(outbox_kafka::parse_duration("X", "2m").unwrap(), Duration::from_secs(120));
/// assert!(outbox_kafka::parse_duration("X", "10").is_err());
/// ```
pub fn parse_duration(var: &str, value: &str) -> Result<Duration, ConfigError> {
    use outbox::settings::DurationError;
    outbox::settings::parse_duration(value).map_err(|e| match e {
        DurationError::Invalid => ConfigError::Duration {
            var: var.to_owned(),
            value: value.to_owned(),
        },
        DurationError::TooLarge => ConfigError::OutOfRange {
            var: var.to_owned(),
            value: value.to_owned(),
            accepted: "at most a few days".to_owned(),
        },
    })
}

/// `30s`, `1500ms`: a duration as the settings are written.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if d.is_zero() {
        "0ms".to_owned()
    } else if ms == 0 {
        format!("{d:?}")
    } else if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<BrokerConfig, ConfigError> {
        BrokerConfig::from_vars(vars.iter().copied())
    }

    fn err(vars: &[(&str, &str)]) -> String {
        from(vars).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let c = from(&[]).unwrap();
        assert_eq!(c.bootstrap_servers(), "127.0.0.1:9092");
        assert_eq!(c.get_acks(), Acks::All);
        assert!(c.is_idempotent());
        assert!(!c.is_asynchronous());
        assert_eq!(c.get_write_timeout(), Duration::from_secs(30));
        let cc = c.client_config();
        assert_eq!(cc.get("acks"), Some("all"));
        assert_eq!(cc.get("enable.idempotence"), Some("true"));
        assert_eq!(cc.get("message.timeout.ms"), Some("30000"));
        assert_eq!(cc.get("allow.auto.create.topics"), Some("false"));
        assert_eq!(cc.get("compression.codec"), Some("none"));
        assert_eq!(cc.get("batch.num.messages"), None);
    }

    #[test]
    fn publisher_url_and_brokers() {
        let c = from(&[("PUBLISHER_URL", "kafka://h1:9092,h2:9093")]).unwrap();
        assert_eq!(c.bootstrap_servers(), "h1:9092,h2:9093");
        let c = from(&[("PUBLISHER_URL", "kafka://h1:9092,kafka://h2")]).unwrap();
        assert_eq!(c.bootstrap_servers(), "h1:9092,h2:9092");
        let c = from(&[("KAFKA_BROKERS", "a:1, b:2")]).unwrap();
        assert_eq!(c.bootstrap_servers(), "a:1,b:2");
        // PUBLISHER_URL wins over KAFKA_BROKERS.
        let c = from(&[("PUBLISHER_URL", "kafka://u:1"), ("KAFKA_BROKERS", "x:2")]).unwrap();
        assert_eq!(c.bootstrap_servers(), "u:1");
        let c = from(&[("PUBLISHER_URL", "kafka://[::1]:9092")]).unwrap();
        assert_eq!(c.bootstrap_servers(), "[::1]:9092");
    }

    #[test]
    fn bad_servers() {
        assert_eq!(
            err(&[("PUBLISHER_URL", "http://h:9092")]),
            r#"PUBLISHER_URL: scheme must be kafka:// (got "http://"; accepted: kafka://host:port,host:port)"#
        );
        assert!(err(&[("PUBLISHER_URL", "kafka://h:nine")])
            .starts_with(r#"PUBLISHER_URL: port "nine" of "h:nine" is not a number"#));
        assert!(err(&[("PUBLISHER_URL", "kafka://h:0")]).contains("from 1 to 65535"));
        assert!(err(&[("PUBLISHER_URL", "kafka://")]).contains("no bootstrap server"));
        assert!(err(&[("PUBLISHER_URL", "kafka://,,")]).contains("no bootstrap server"));
        assert!(err(&[("KAFKA_BROKERS", ":9092")]).starts_with("KAFKA_BROKERS:"));
        assert!(err(&[("PUBLISHER_URL", "kafka://h:1/topic")]).contains("path or query"));
        let e = BrokerConfig::new("").validate().unwrap_err().to_string();
        assert!(e.starts_with("servers: "), "{e}");
    }

    #[test]
    fn values() {
        assert_eq!(
            err(&[("KAFKA_ACKS", "two")]),
            r#"KAFKA_ACKS: "two" is not one of all, one, none"#
        );
        let c = from(&[("KAFKA_ACKS", "one")]).unwrap();
        assert_eq!(c.get_acks(), Acks::One);
        assert!(!c.is_idempotent());
        assert_eq!(c.client_config().get("acks"), Some("1"));
        assert_eq!(
            err(&[("KAFKA_ACKS", "one"), ("KAFKA_IDEMPOTENT", "true")]),
            "KAFKA_IDEMPOTENT: the idempotent producer needs KAFKA_ACKS=all"
        );
        assert!(err(&[("KAFKA_ASYNC", "maybe")])
            .starts_with(r#"KAFKA_ASYNC: "maybe" is not a boolean"#));
        assert!(from(&[("KAFKA_ASYNC", "true")]).unwrap().is_asynchronous());
        assert_eq!(
            err(&[("KAFKA_BATCH_SIZE", "lots")]),
            r#"KAFKA_BATCH_SIZE: "lots" is not a number (accepted: a whole number from 1 to 1000000)"#
        );
        assert!(err(&[("KAFKA_BATCH_SIZE", "0")]).contains("out of range"));
        assert!(err(&[("KAFKA_BATCH_SIZE", "99999999")]).contains("out of range"));
        let c = from(&[
            ("KAFKA_BATCH_SIZE", "1000"),
            ("KAFKA_LINGER", "5ms"),
            ("KAFKA_COMPRESSION", "lz4"),
            ("KAFKA_WRITE_TIMEOUT", "10s"),
        ])
        .unwrap();
        let cc = c.client_config();
        assert_eq!(cc.get("batch.num.messages"), Some("1000"));
        assert_eq!(cc.get("linger.ms"), Some("5"));
        assert_eq!(cc.get("compression.codec"), Some("lz4"));
        assert_eq!(cc.get("message.timeout.ms"), Some("10000"));
        assert!(err(&[("KAFKA_COMPRESSION", "brotli")])
            .contains("is not one of none, gzip, snappy, lz4, zstd"));
        assert!(err(&[("KAFKA_WRITE_TIMEOUT", "10")])
            .starts_with(r#"KAFKA_WRITE_TIMEOUT: "10" is not a duration"#));
        assert!(err(&[("KAFKA_WRITE_TIMEOUT", "0s")]).contains("out of range"));
        assert!(err(&[("KAFKA_WRITE_TIMEOUT", "3h")]).contains("out of range"));
        assert!(
            err(&[("KAFKA_LINGER", "1m"), ("KAFKA_WRITE_TIMEOUT", "30s")])
                .contains("not shorter than the write timeout")
        );
        assert!(err(&[("KAFKA_TOPIC_PARTITIONS", "0")]).contains("out of range"));
        assert!(
            err(&[("KAFKA_TRANSACTIONAL_ID", "t"), ("KAFKA_ASYNC", "1")]).contains("synchronous")
        );
        assert!(
            err(&[("KAFKA_TRANSACTIONAL_ID", "t"), ("KAFKA_ACKS", "one")])
                .contains("KAFKA_ACKS=all")
        );
    }

    #[test]
    fn durations() {
        let d = |s| parse_duration("X", s);
        assert_eq!(d("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(d("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(d("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(d("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["", "s", "10", "1.5s", "-1s", "10 x", "ms10"] {
            assert!(d(bad).is_err(), "{bad}");
        }
        assert!(d("99999999999999999999h").is_err());
    }

    #[test]
    fn prop_keys() {
        assert_eq!(prop_key("SECURITY_PROTOCOL"), "security.protocol");
        assert_eq!(prop_key("SASL_PASSWORD"), "sasl.password");
        assert_eq!(prop_key("A__B_C"), "a_b.c");
        let c = from(&[
            ("KAFKA_PROP_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_PROP_SASL_PASSWORD", "hunter2"),
        ])
        .unwrap();
        let cc = c.client_config();
        assert_eq!(cc.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(cc.get("sasl.password"), Some("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn refused_properties_are_named_without_their_values() {
        let e = err(&[("KAFKA_PROP_SASL_PASWORD", "hunter2")]);
        assert_eq!(
            e,
            "KAFKA_PROP_SASL_PASWORD: no such librdkafka property \"sasl.pasword\" (did you mean \
             \"sasl.password\"? accepted: the keys of librdkafka's CONFIGURATION.md)"
        );
        let e = err(&[("KAFKA_PROP_SOCKET_TIMEOUT_MS", "soon-ish")]);
        assert!(e.starts_with("KAFKA_PROP_SOCKET_TIMEOUT_MS: "), "{e}");
        assert!(e.contains("\"socket.timeout.ms\""), "{e}");
        assert!(!e.contains("soon-ish"), "{e}");
        let e = err(&[("KAFKA_PROP_SOCKET_TIMEOUT_MS", "1")]);
        assert!(!e.contains(" 1 ") && !e.contains("\"1\""), "{e}");
        let e = err(&[("KAFKA_PROP_NOTHING__LIKE_IT", "x")]);
        assert!(e.starts_with("KAFKA_PROP_NOTHING__LIKE_IT: no such librdkafka property \"nothing_like.it\" (accepted"), "{e}");
        let e = BrokerConfig::default()
            .set("ssl.key.pasword", "pw-three")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("librdkafka property \"ssl.key.pasword\": "),
            "{e}"
        );
        assert!(e.contains("\"ssl.key.password\""), "{e}");
        assert!(!e.contains("pw-three"), "{e}");
        assert_eq!(prop_var("sasl.password"), "KAFKA_PROP_SASL_PASSWORD");
        assert_eq!(prop_var("a_b.c"), "KAFKA_PROP_A__B_C");
        assert_eq!(prop_key("A__B_C"), "a_b.c");
    }

    #[test]
    fn credentials_are_redacted() {
        let c = from(&[("PUBLISHER_URL", "kafka://alice:s3cr%40t@h1:9092,h2:9092")]).unwrap();
        assert_eq!(c.bootstrap_servers(), "h1:9092,h2:9092");
        let cc = c.client_config();
        assert_eq!(cc.get("sasl.username"), Some("alice"));
        assert_eq!(cc.get("sasl.password"), Some("s3cr@t"));
        assert_eq!(cc.get("security.protocol"), Some("sasl_ssl"));
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cr"), "{debug}");
        assert!(debug.contains("alice"));
        assert_eq!(c.redact("auth failed for s3cr@t"), "auth failed for ***");

        let c = BrokerConfig::default()
            .set("ssl.key.password", "pw-one")
            .set("sasl.oauthbearer.client.secret", "pw-two")
            .set("client.id", "visible");
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("pw-one") && !debug.contains("pw-two"),
            "{debug}"
        );
        assert!(debug.contains("visible"));

        // A bad URL's error does not echo the password.
        let e = err(&[("PUBLISHER_URL", "kafka://bob:topsecret@h:x")]);
        assert!(!e.contains("topsecret"), "{e}");
        let e = err(&[("PUBLISHER_URL", "kafka://bob:topsecret@h:1/p")]);
        assert!(!e.contains("topsecret"), "{e}");
        let e = err(&[("PUBLISHER_URL", "kafka://bob:top@secret@h:1/p?password=q")]);
        assert!(!e.contains("secret") && !e.contains("=q"), "{e}");
    }
}
