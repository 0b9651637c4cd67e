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

/// `url` with its password replaced by `***`, for messages and logs: the
/// password of the user-info part and any `password` / `sslpassword` query
/// parameter.
///
/// ```
/// use outbox::logging::redact_url;
/// assert_eq!(
///     redact_url("postgres://app:s3cret@db:5432/app?sslmode=require"),
///     "postgres://app:***@db:5432/app?sslmode=require"
/// );
/// assert_eq!(redact_url("postgres://db/app?password=s3cret"), "postgres://db/app?password=***");
/// ```
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(i) => (&url[..i], Some(&url[i + 1..])),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &base[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &base[..scheme_end + 3],
                    &userinfo[..colon],
                    &base[at..]
                ),
                None => base.to_owned(),
            }
        }
        _ => base.to_owned(),
    };
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _))
                    if k.eq_ignore_ascii_case("password")
                        || k.eq_ignore_ascii_case("sslpassword") =>
                {
                    format!("{k}=***")
                }
                _ => kv.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// The secrets [`redact_url`] hides, to scrub them from error messages too.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) fn url_secrets(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let base = url.split('?').next().unwrap_or(url);
    if let (Some(scheme_end), Some(at)) = (base.find("://"), base.rfind('@')) {
        if at > scheme_end {
            if let Some((_, pw)) = base[scheme_end + 3..at].split_once(':') {
                secrets.push(pw.to_owned());
            }
        }
    }
    if let Some((_, q)) = url.split_once('?') {
        for kv in q.split('&') {
            if let Some((k, v)) = kv.split_once('=') {
                if k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("sslpassword") {
                    secrets.push(v.to_owned());
                }
            }
        }
    }
    secrets.retain(|s| !s.is_empty());
    secrets
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
            ["p@ss", "q"]
        );
    }

    #[test]
    fn log_format_names() {
        assert_eq!("text".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert_eq!(" Json ".parse::<LogFormat>().unwrap(), LogFormat::Json);
        let e = "xml".parse::<LogFormat>().unwrap_err().to_string();
        assert!(e.contains("text or json"), "{e}");
    }
}
