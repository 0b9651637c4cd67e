//! Logs a person can follow, and a one-call set-up for them.
//!
//! The runtime logs one line per event of a message, each starting with its
//! queue, and carrying `queue` and `id` fields (a JSON log keeps them as keys):
//!
//! ```text
//! DEBUG orders | received
//! DEBUG orders | processed in 3 ms
//!  WARN orders | retry 2/10 in 4s: connection refused
//! ERROR orders | dead-lettered: retries_exhausted: connection refused
//! ```
//!
//! `received` and `processed` are at `debug` level; run with
//! `RUST_LOG=info,outbox=debug` to see them. With the `logging` feature,
//! [`init`] installs a subscriber that reads `RUST_LOG` (default `info`) and
//! writes text or JSON lines to standard output:
//!
//! ```no_run
//! # #[cfg(feature = "logging")]
//! # fn main() -> Result<(), outbox::Error> {
//! use outbox::logging::{init, LogFormat};
//! init(LogFormat::from_env("LOG_FORMAT")?)?;
//! # Ok(()) }
//! # #[cfg(not(feature = "logging"))] fn main() {}
//! ```

use crate::Error;
use std::time::Duration;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event (the default).
    #[default]
    Text,
    /// One JSON object per line, with the message span's fields.
    Json,
}

impl LogFormat {
    /// The format named by environment variable `var` (`text` or `json`,
    /// any case); `Text` when it is unset or empty.
    ///
    /// ```
    /// use outbox::logging::LogFormat;
    /// assert_eq!(LogFormat::from_env("OUTBOX_DOC_UNSET_VAR").unwrap(), LogFormat::Text);
    /// ```
    pub fn from_env(var: &str) -> Result<Self, Error> {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => v
                .parse()
                .map_err(|e: Error| Error::invalid(format!("{var}: {e}"))),
            _ => Ok(Self::Text),
        }
    }
}

impl std::str::FromStr for LogFormat {
    type Err = Error;

    /// ```
    /// use outbox::logging::LogFormat;
    /// assert_eq!("JSON".parse::<LogFormat>().unwrap(), LogFormat::Json);
    /// assert!("yaml".parse::<LogFormat>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(Error::invalid(format!(
                "log format {s:?} is not known, accepted: text or json"
            ))),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// Installs a global `tracing` subscriber writing `format` lines to standard
/// output, filtered by `RUST_LOG` (default `info`).
///
/// Errors when `RUST_LOG` does not parse, or a subscriber is already installed.
#[cfg(feature = "logging")]
pub fn init(format: LogFormat) -> Result<(), Error> {
    install(format, "info", std::io::stdout)
}

/// Like [`init`], writing to `writer` with `default` as the filter when
/// `RUST_LOG` is unset (the command line logs to standard error).
#[cfg(feature = "logging")]
pub(crate) fn install<W>(format: LogFormat, default: &str, writer: W) -> Result<(), Error>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v).map_err(|e| {
            Error::invalid(format!(
                "RUST_LOG={v:?} does not parse: {e} (accepted: directives such as \
                 `info`, `warn,outbox=debug`)"
            ))
        })?,
        _ => EnvFilter::new(default),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let done = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    done.map_err(|e| Error::invalid(format!("cannot install the log subscriber: {e}")))
}

/// What a hidden secret looks like in messages and logs.
const REDACTED: &str = "***";

/// Whether a URL query parameter named `name` holds a secret: `password`,
/// `sslpassword`, and any name containing `password`, `passwd`, `secret` or
/// `token` (any case).
///
/// ```
/// assert!(outbox::logging::is_secret_name("sslpassword"));
/// assert!(!outbox::logging::is_secret_name("sslmode"));
/// ```
pub fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "passwd", "secret", "token"]
        .iter()
        .any(|s| name.contains(s))
        || name == "pass"
        || name == "pwd"
}

/// `url` with its secrets replaced by `***`, for messages and logs: the
/// password of the user-info part and the value of every query parameter whose
/// name looks secret ([`is_secret_name`]: `password`, `sslpassword`, ...).
///
/// Built on the `url` crate, which sqlx parses connection URLs with, so a
/// password holding a percent-encoded or a raw `@` is cut where the driver cuts
/// it. A URL it cannot parse (several hosts, a raw `/`, `?` or `#` in a
/// password) loses everything between the first `:` after the scheme and the
/// last `@`.
///
/// ```
/// use outbox::logging::redact_url;
/// assert_eq!(
///     redact_url("postgres://app:s3cret@db:5432/app?sslmode=require"),
///     "postgres://app:***@db:5432/app?sslmode=require"
/// );
/// assert_eq!(redact_url("postgres://u:p%40ss@word@db/app"), "postgres://u:***@db/app");
/// assert_eq!(redact_url("postgres://db/app?password=s3cret"), "postgres://db/app?password=***");
/// ```
pub fn redact_url(url: &str) -> String {
    redaction(url).0
}

/// The secrets [`redact_url`] hides (as written and percent-decoded), to
/// scrub them from error messages that may quote them.
///
/// ```
/// let secrets = outbox::logging::url_secrets("postgres://u:p%40ss@db/app?sslpassword=k3y");
/// assert!(secrets.contains(&"p@ss".to_owned()) && secrets.contains(&"k3y".to_owned()));
/// ```
pub fn url_secrets(url: &str) -> Vec<String> {
    redaction(url).1
}

/// The redacted URL and the secrets it hid.
fn redaction(url: &str) -> (String, Vec<String>) {
    let mut secrets = Vec::new();
    let redacted = match url::Url::parse(url) {
        // An '@' after the authority means the parser cut the user-info short
        // (a raw '/', '?' or '#' in the password): what follows may be secret.
        Ok(mut parsed) if !parsed[url::Position::BeforePath..].contains('@') => {
            if let Some(password) = parsed.password().map(str::to_owned) {
                secrets.push(decode(&password));
                secrets.push(password);
                let _ = parsed.set_password(Some(REDACTED));
            }
            if let Some(query) = parsed.query().map(str::to_owned) {
                let query = redact_query(&query, &mut secrets);
                parsed.set_query(Some(&query));
            }
            parsed.to_string()
        }
        _ => redact_unparsed(url, &mut secrets),
    };
    secrets.retain(|s| !s.is_empty());
    secrets.sort();
    secrets.dedup();
    (redacted, secrets)
}

/// `a=1&password=x` -> `a=1&password=***`.
fn redact_query(query: &str, secrets: &mut Vec<String>) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) if is_secret_name(&decode(name)) => {
                secrets.push(decode(value));
                secrets.push(value.to_owned());
                format!("{name}={REDACTED}")
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The conservative redaction of a URL the `url` crate refuses.
fn redact_unparsed(url: &str, secrets: &mut Vec<String>) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let (head, rest) = url.split_at(start);
    let (mut out, tail) = match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let out = match userinfo.find([':', '?']) {
                Some(cut) => {
                    secrets.push(userinfo[cut + 1..].to_owned());
                    secrets.push(decode(&userinfo[cut + 1..]));
                    format!("{head}{}{REDACTED}@", &userinfo[..=cut])
                }
                None => format!("{head}{userinfo}@"),
            };
            (out, &rest[at + 1..])
        }
        None => (head.to_owned(), rest),
    };
    match tail.split_once('?') {
        Some((base, query)) => {
            out.push_str(base);
            out.push('?');
            out.push_str(&redact_query(query, secrets));
        }
        None => out.push_str(tail),
    }
    out
}

/// Percent-decoding (`+` stays a `+`).
fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A duration for people: `250ms`, `4s`, `4.5s`, `2m30s`, `1h5m`, `3d4h`.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    if s < 60 {
        let tenths = (ms % 1_000) / 100;
        return if tenths == 0 {
            format!("{s}s")
        } else {
            format!("{s}.{tenths}s")
        };
    }
    let two = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit}{small}{small_unit}")
        }
    };
    match s {
        s if s < 3_600 => two(s / 60, "m", s % 60, "s"),
        s if s < 86_400 => two(s / 3_600, "h", s % 3_600 / 60, "m"),
        s => two(s / 86_400, "d", s % 86_400 / 3_600, "h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_person_writes_them() {
        let cases = [
            (Duration::from_millis(3), "3ms"),
            (Duration::from_millis(999), "999ms"),
            (Duration::from_secs(4), "4s"),
            (Duration::from_millis(4_567), "4.5s"),
            (Duration::from_secs(150), "2m30s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(3_900), "1h5m"),
            (Duration::from_secs(3 * 86_400 + 4 * 3_600), "3d4h"),
        ];
        for (d, want) in cases {
            assert_eq!(human(d), want, "{d:?}");
        }
    }

    #[test]
    fn urls_lose_their_passwords() {
        for (url, want) in [
            ("postgres://u:p@h/db", "postgres://u:***@h/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("postgres://h/db", "postgres://h/db"),
            ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
            (
                "postgres://h/db?sslmode=require&Password=x",
                "postgres://h/db?sslmode=require&Password=***",
            ),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
        assert_eq!(
            url_secrets("postgres://u:p@ss@h/db?password=q"),
            ["p%40ss", "p@ss", "q"]
        );
    }

    #[test]
    fn passwords_holding_at_signs_and_secret_parameters_are_hidden() {
        for (url, want) in [
            // A raw '@' in the password: cut at the last '@', as sqlx does.
            (
                "postgres://u:p%40ss@word@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            (
                "postgres://u@h/db?sslmode=disable&password=a&sslpassword=b&x=1",
                "postgres://u@h/db?sslmode=disable&password=***&sslpassword=***&x=1",
            ),
            (
                "postgres://h/db?pass%77ord=s",
                "postgres://h/db?pass%77ord=***",
            ),
            // Not parseable: hidden from the first ':' to the last '@'.
            ("postgres://u:pa/ss@h/db", "postgres://u:***@h/db"),
            ("postgres://u:12/ss@h/db", "postgres://u:***@h/db"),
            (
                "postgres://u:p@h1:5432,h2:5432/db",
                "postgres://u:***@h1:5432,h2:5432/db",
            ),
            (
                "kafka://u:p@ss@k1:9092,k2:9092",
                "kafka://u:***@k1:9092,k2:9092",
            ),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
        let secrets = url_secrets("postgres://u:p%40ss@word@h/db?sslpassword=k3y");
        assert!(secrets.contains(&"p@ss@word".to_owned()), "{secrets:?}");
        assert!(secrets.contains(&"k3y".to_owned()), "{secrets:?}");
    }

    #[test]
    fn log_format_names() {
        assert_eq!("text".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert_eq!(" Json ".parse::<LogFormat>().unwrap(), LogFormat::Json);
        let e = "xml".parse::<LogFormat>().unwrap_err().to_string();
        assert!(e.contains("text or json"), "{e}");
    }
}
