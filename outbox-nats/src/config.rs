//! Connection and publish settings, from code or from the environment.
//!
//! ```
//! use outbox_nats::BrokerConfig;
//! use std::time::Duration;
//! let config = BrokerConfig::new("nats://n1:4222,nats://n2:4222")
//!     .user_and_password("app", "hunter2")
//!     .timeout(Duration::from_secs(5));
//! config.validate().unwrap();
//! assert!(!format!("{config:?}").contains("hunter2"));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The server used when none is given.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";
/// The default publish timeout: how long a batch may take from its first
/// publish to its last PubAck.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest publish timeout accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// What a secret looks like when shown.
const REDACTED: &str = "***";

/// A setting that is not valid. Each message names the setting (the environment
/// variable when the configuration was read from the environment) and says what
/// is accepted; secrets are never part of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
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
    /// A duration outside its range.
    #[error("{var}: {value} is out of range (accepted: {accepted})")]
    OutOfRange {
        /// The setting.
        var: String,
        /// The value given.
        value: String,
        /// The range accepted.
        accepted: String,
    },
    /// Anything else wrong with one setting (a URL, a file, ...).
    #[error("{var}: {message}")]
    Invalid {
        /// The setting.
        var: String,
        /// What is wrong and what is accepted.
        message: String,
    },
}

fn invalid(var: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var: var.to_owned(),
        message: message.into(),
    }
}

/// How the client proves who it is.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) enum Auth {
    #[default]
    None,
    UserPassword(String, String),
    Token(String),
    CredsFile(PathBuf),
}

/// Which names errors use for the settings: the builder's or the environment's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Names {
    #[default]
    Builder,
    Env,
}

/// Settings of a [`crate::Broker`].
///
/// * servers: `nats://host:port` URLs (`tls://` for TLS), several for a
///   cluster; user and password, or a token, may be written in a URL
///   (`nats://user:password@host`, `nats://token@host`) or given apart;
/// * credentials: user and password, a token, or a `.creds` file (NATS
///   accounts with JWTs), passed through to the client;
/// * the publish timeout ([`DEFAULT_TIMEOUT`]): a batch's publishes and
///   their PubAcks must all be done within it, else the missing ones fail
///   (transiently: the rows are retried);
/// * a message-id prefix, for outbox tables that publish into one stream
///   (see [`BrokerConfig::msg_id_prefix`]).
///
/// `Debug` shows no secret.
#[derive(Clone)]
pub struct BrokerConfig {
    pub(crate) servers: Vec<String>,
    pub(crate) auth: Auth,
    pub(crate) timeout: Duration,
    pub(crate) msg_id_prefix: String,
    names: Names,
    /// The first problem met while the builder ran, reported by `validate`.
    error: Option<ConfigError>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            servers: vec![DEFAULT_URL.to_owned()],
            auth: Auth::None,
            timeout: DEFAULT_TIMEOUT,
            msg_id_prefix: String::new(),
            names: Names::Builder,
            error: None,
        }
    }
}

impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = match &self.auth {
            Auth::None => "none".to_owned(),
            Auth::UserPassword(user, _) => format!("user {user:?}, password {REDACTED}"),
            Auth::Token(_) => format!("token {REDACTED}"),
            Auth::CredsFile(path) => format!("credentials file {}", path.display()),
        };
        f.debug_struct("BrokerConfig")
            .field("servers", &self.servers)
            .field("auth", &auth)
            .field("timeout", &self.timeout)
            .field("msg_id_prefix", &self.msg_id_prefix)
            .finish()
    }
}

impl BrokerConfig {
    /// Settings for the servers in `urls`, a comma-separated list of
    /// `nats://[user:password@|token@]host[:port]` (port 4222 by default).
    pub fn new(urls: &str) -> Self {
        let mut c = Self::default();
        c.set_servers("servers", urls);
        c
    }

    fn name<'a>(&self, builder: &'a str, env: &'a str) -> &'a str {
        match self.names {
            Names::Builder => builder,
            Names::Env => env,
        }
    }

    fn fail(&mut self, e: ConfigError) {
        self.error.get_or_insert(e);
    }

    fn set_servers(&mut self, var: &str, urls: &str) {
        let mut servers = Vec::new();
        for entry in urls.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match parse_server(var, entry) {
                Ok((server, auth)) => {
                    servers.push(server);
                    if let Some(auth) = auth {
                        self.auth = auth;
                    }
                }
                Err(e) => return self.fail(e),
            }
        }
        if servers.is_empty() {
            return self.fail(invalid(
                var,
                format!("no server given (accepted: a comma-separated list of URLs such as {DEFAULT_URL})"),
            ));
        }
        self.servers = servers;
    }

    /// Logs in with a user and a password.
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.auth = Auth::UserPassword(user.into(), password.into());
        self
    }

    /// Logs in with a token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.auth = Auth::Token(token.into());
        self
    }

    /// Logs in with a NATS credentials file (a user JWT and its NKey seed).
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.auth = Auth::CredsFile(path.into());
        self
    }

    /// How long a batch may take, from its first publish to its last PubAck
    /// (default [`DEFAULT_TIMEOUT`], at most [`MAX_TIMEOUT`]); also the connect
    /// timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Written before the outbox id in `Nats-Msg-Id` (default: nothing). Ids
    /// are unique within one outbox table only: give each table (or database)
    /// that publishes into the same stream a prefix of its own, such as
    /// `"billing:"`, or JetStream's duplicate window drops one table's message
    /// as a re-send of the other's.
    pub fn msg_id_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.msg_id_prefix = prefix.into();
        self
    }

    /// The server URLs, without credentials.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// The publish timeout.
    pub fn get_timeout(&self) -> Duration {
        self.timeout
    }

    /// The message-id prefix.
    pub fn get_msg_id_prefix(&self) -> &str {
        &self.msg_id_prefix
    }

    /// Checks every setting; the error names the setting and what is accepted.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.timeout < Duration::from_millis(1) || self.timeout > MAX_TIMEOUT {
            return Err(ConfigError::OutOfRange {
                var: self.name("timeout", "NATS_TIMEOUT").to_owned(),
                value: format!("{:?}", self.timeout),
                accepted: format!("1ms to {}s", MAX_TIMEOUT.as_secs()),
            });
        }
        if let Some(c) = self
            .msg_id_prefix
            .chars()
            .find(|c| *c == '\r' || *c == '\n')
        {
            return Err(invalid(
                self.name("msg_id_prefix", "NATS_MSG_ID_PREFIX"),
                format!(
                    "{c:?} cannot be part of a header value (accepted: text without line breaks)"
                ),
            ));
        }
        if let Auth::CredsFile(path) = &self.auth {
            if !path.is_file() {
                return Err(invalid(
                    self.name("credentials_file", "NATS_CREDS"),
                    format!(
                        "{} is not a readable file (accepted: the path of a NATS .creds file)",
                        path.display()
                    ),
                ));
            }
        }
        Ok(())
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
    /// | `NATS_URL` | `nats://[user:password@\|token@]host[:port],...` | `nats://127.0.0.1:4222` |
    /// | `NATS_USER`, `NATS_PASSWORD` | user and password | |
    /// | `NATS_TOKEN` | token | |
    /// | `NATS_CREDS` | path of a `.creds` file | |
    /// | `NATS_TIMEOUT` | publish timeout, e.g. `5s` | `10s` |
    /// | `NATS_MSG_ID_PREFIX` | written before the outbox id in `Nats-Msg-Id` | |
    ///
    /// ```
    /// let config = outbox_nats::BrokerConfig::from_vars([
    ///     ("NATS_URL", "nats://n1:4222,nats://n2"),
    ///     ("NATS_TIMEOUT", "5s"),
    /// ])
    /// .unwrap();
    /// assert_eq!(config.servers(), ["nats://n1:4222", "nats://n2:4222"]);
    /// assert_eq!(config.get_timeout(), std::time::Duration::from_secs(5));
    ///
    /// let err = outbox_nats::BrokerConfig::from_vars([("NATS_URL", "http://n1")]).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     r#"NATS_URL: "http://n1" has scheme "http" (accepted: nats://, tls://, ws:// or wss:// URLs such as nats://127.0.0.1:4222)"#
    /// );
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
        if let Some(urls) = get("NATS_URL") {
            c.set_servers("NATS_URL", &urls);
        }
        match (get("NATS_USER"), get("NATS_PASSWORD")) {
            (Some(user), Some(password)) => c.auth = Auth::UserPassword(user, password),
            (Some(_), None) => {
                return Err(invalid(
                    "NATS_PASSWORD",
                    "unset while NATS_USER is set (accepted: both or neither)",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "NATS_USER",
                    "unset while NATS_PASSWORD is set (accepted: both or neither)",
                ))
            }
            (None, None) => {}
        }
        if let Some(token) = get("NATS_TOKEN") {
            c.auth = Auth::Token(token);
        }
        if let Some(path) = get("NATS_CREDS") {
            c.auth = Auth::CredsFile(PathBuf::from(path));
        }
        let given = ["NATS_USER", "NATS_TOKEN", "NATS_CREDS"]
            .iter()
            .filter(|v| vars.contains_key(**v))
            .count();
        if given > 1 {
            return Err(invalid(
                "NATS_USER/NATS_TOKEN/NATS_CREDS",
                "more than one way to log in is set (accepted: one of NATS_USER with NATS_PASSWORD, NATS_TOKEN or NATS_CREDS)",
            ));
        }
        if let Some(v) = get("NATS_TIMEOUT") {
            c.timeout = parse_duration("NATS_TIMEOUT", &v)?;
        }
        if let Some(v) = get("NATS_MSG_ID_PREFIX") {
            c.msg_id_prefix = v;
        }
        c.validate()?;
        Ok(c)
    }
}

/// One server URL: the URL without credentials, and the credentials it held.
fn parse_server(var: &str, entry: &str) -> Result<(String, Option<Auth>), ConfigError> {
    const ACCEPTED: &str =
        "accepted: nats://, tls://, ws:// or wss:// URLs such as nats://127.0.0.1:4222";
    // A bare host:port is a nats:// URL, as the NATS tools take it.
    let with_scheme = if entry.contains("://") {
        entry.to_owned()
    } else {
        format!("nats://{entry}")
    };
    // As written, unless it may hold a secret (user-info or a query).
    let shown = if entry.contains(['@', '?']) {
        outbox::logging::redact_url(entry)
    } else {
        entry.to_owned()
    };
    let mut url = url::Url::parse(&with_scheme)
        .map_err(|e| invalid(var, format!("{shown:?} is not a URL: {e} ({ACCEPTED})")))?;
    if !matches!(url.scheme(), "nats" | "tls" | "ws" | "wss") {
        return Err(invalid(
            var,
            format!("{shown:?} has scheme {:?} ({ACCEPTED})", url.scheme()),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(
            var,
            format!("{shown:?} names no host ({ACCEPTED})"),
        ));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(
            var,
            format!("{shown:?} has a path, query or fragment ({ACCEPTED})"),
        ));
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let auth = match (url.username(), url.password()) {
        ("", None) => None,
        (token, None) => Some(Auth::Token(decode(token))),
        (user, Some(password)) => Some(Auth::UserPassword(decode(user), decode(password))),
    };
    let _ = url.set_username("");
    let _ = url.set_password(None);
    if url.port().is_none() && matches!(url.scheme(), "nats" | "tls") {
        let _ = url.set_port(Some(4222));
    }
    let mut server = url.to_string();
    if server.ends_with('/') {
        server.pop();
    }
    Ok((server, auth))
}

/// Parses a duration: a whole number with a unit, `ms`, `s`, `m` or `h`
/// (`500ms`, `10s`, `2m`, `1h`), as the Kafka settings do.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(outbox_nats::parse_duration("X", "500ms").unwrap(), Duration::from_millis(500));
/// assert!(outbox_nats::parse_duration("X", "10").is_err());
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
            accepted: format!("1ms to {}s", MAX_TIMEOUT.as_secs()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials() {
        let c = BrokerConfig::from_vars([("NATS_URL", "nats://app:s3cr%40t@n1,tls://n2:4443")])
            .unwrap();
        assert_eq!(c.servers(), ["nats://n1:4222", "tls://n2:4443"]);
        assert!(c.auth == Auth::UserPassword("app".into(), "s3cr@t".into()));
        assert!(!format!("{c:?}").contains("s3cr"));
        let c = BrokerConfig::from_vars([("NATS_URL", "nats://t0ken@n1")]).unwrap();
        assert!(c.auth == Auth::Token("t0ken".into()));
        assert!(!format!("{c:?}").contains("t0ken"));
        let c = BrokerConfig::from_vars([("NATS_URL", "127.0.0.1:4223")]).unwrap();
        assert_eq!(c.servers(), ["nats://127.0.0.1:4223"]);
    }

    #[test]
    fn bad_settings_are_named() {
        let e = BrokerConfig::from_vars([("NATS_URL", "nats://u:pw@")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("NATS_URL: "), "{e}");
        assert!(!e.contains("pw"), "{e}");
        let e = BrokerConfig::from_vars([("NATS_TIMEOUT", "10")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("NATS_TIMEOUT: \"10\" is not a duration"),
            "{e}"
        );
        let e = BrokerConfig::from_vars([("NATS_TIMEOUT", "0s")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("NATS_TIMEOUT: 0ns is out of range"), "{e}");
        let e = BrokerConfig::from_vars([("NATS_USER", "u")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("NATS_PASSWORD: unset"), "{e}");
        let e = BrokerConfig::from_vars([("NATS_TOKEN", "t"), ("NATS_CREDS", "/x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than one way to log in"), "{e}");
        let e = BrokerConfig::from_vars([("NATS_CREDS", "/nonexistent.creds")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("NATS_CREDS: /nonexistent.creds is not a readable file"),
            "{e}"
        );
        let e = BrokerConfig::new(",").validate().unwrap_err().to_string();
        assert!(e.starts_with("servers: no server given"), "{e}");
    }
}
