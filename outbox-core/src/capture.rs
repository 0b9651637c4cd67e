//! Log capture: messages written into PostgreSQL's write-ahead log instead of
//! an outbox row.
//!
//! In log mode ([`Capture::Log`]) `publish` calls
//! `pg_logical_emit_message(true, prefix, content)` in the caller's
//! transaction: no row, no index entry, no delete and no vacuum afterwards.
//! Logical replication hands the message to a streamer (the relay with
//! `CAPTURE=log`) once the transaction commits, in commit order; a rolled
//! back transaction sends nothing. Delayed messages and timers cannot live in
//! the log (it has no "not before"): they are written to the outbox table as
//! in table mode.
//!
//! A slot reads only what commits after its consistent point, so a message
//! written before a slot of the outbox table exists (or while the first one
//! is being created) would never be read: such a publish writes nothing and
//! returns [`crate::Error::Capture`]. Create the slot first (the relay's or
//! the app's first start, or `outbox slot create`).
//!
//! ```no_run
//! # async fn f(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
//! use outbox::{Capture, Outbox, Tables};
//! let ob = Outbox::new(Tables::default()).capture(Capture::Log);
//! let mut tx = pool.begin().await?;
//! // ... the business insert ...
//! ob.publish(&mut *tx, "orders", &serde_json::json!({"id": 1})).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! # The message format, version 1
//! The prefix is `outbox:` followed by the outbox table's name (`outbox:outbox`,
//! `outbox:billing.outbox`). The content is, with every integer big-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | format version, `1` |
//! | 8 | message id (`int8`), taken from the outbox table's id sequence |
//! | 4 + n | queue (UTF-8) |
//! | 4 + n | partition key (UTF-8), or the length `0xFFFFFFFF` when absent |
//! | 4 + n | correlation id (UTF-8), or `0xFFFFFFFF` when absent |
//! | 4 | number of headers, then for each: 4 + n name, 4 + n value (UTF-8) |
//! | 4 + n | payload |
//!
//! The id comes from the same sequence as the table's rows, so a message
//! keeps its id (the `outbox-id` header) when a failure moves it into the
//! table, and the two never collide.

use crate::{validate_queue, Tables};
use std::collections::BTreeMap;

/// Where `publish` writes a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Capture {
    /// A row in the outbox table, claimed by polling (the default).
    #[default]
    Table,
    /// A logical decoding message in the write-ahead log, streamed from a
    /// replication slot. Delayed messages and timers still go to the table.
    Log,
}

impl Capture {
    /// Parses `table` or `log` (any case), as the `CAPTURE` setting is written.
    ///
    /// ```
    /// assert_eq!(outbox::Capture::parse("LOG"), Some(outbox::Capture::Log));
    /// assert_eq!(outbox::Capture::parse("wal"), None);
    /// ```
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "table" => Some(Capture::Table),
            "log" => Some(Capture::Log),
            _ => None,
        }
    }
}

/// The version byte of the message format this crate writes and reads.
pub const FORMAT_VERSION: u8 = 1;

/// The prefix of the logical decoding messages of an outbox.
///
/// ```
/// assert_eq!(outbox::capture::prefix(&outbox::Tables::default()), "outbox:outbox");
/// ```
pub fn prefix(tables: &Tables) -> String {
    format!("outbox:{}", tables.outbox)
}

/// A message decoded from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogMessage {
    /// The message id, from the outbox table's id sequence.
    pub id: i64,
    /// The queue.
    pub queue: String,
    /// The partition key.
    pub key: Option<String>,
    /// The correlation id.
    pub correlation_id: Option<String>,
    /// Headers given at publish time.
    pub headers: BTreeMap<String, String>,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

/// Why a logical decoding message with an outbox prefix could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed outbox log message: {0}")]
pub struct DecodeError(pub String);

const ABSENT: u32 = u32::MAX;

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Lengths fit: payloads and headers are capped well below 4 GiB.
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_bytes(out, s.as_bytes()),
        None => out.extend_from_slice(&ABSENT.to_be_bytes()),
    }
}

/// Everything of the content after the version byte and the id, which the
/// server writes itself (the id comes from `nextval`).
pub(crate) fn encode_body(
    queue: &str,
    key: Option<&str>,
    correlation_id: Option<&str>,
    headers: &BTreeMap<String, String>,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        payload.len()
            + queue.len()
            + 32
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>(),
    );
    put_bytes(&mut out, queue.as_bytes());
    put_opt(&mut out, key);
    put_opt(&mut out, correlation_id);
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    for (k, v) in headers {
        put_bytes(&mut out, k.as_bytes());
        put_bytes(&mut out, v.as_bytes());
    }
    put_bytes(&mut out, payload);
    out
}

impl LogMessage {
    /// The whole content of the message, as `publish` writes it.
    ///
    /// ```
    /// use outbox::capture::LogMessage;
    /// let m = LogMessage::decode(&LogMessage::new(7, "orders", b"{}".to_vec()).encode()).unwrap();
    /// assert_eq!((m.id, m.queue.as_str()), (7, "orders"));
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT_VERSION];
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend(encode_body(
            &self.queue,
            self.key.as_deref(),
            self.correlation_id.as_deref(),
            &self.headers,
            &self.payload,
        ));
        out
    }

    /// A message with no key, correlation id or headers.
    pub fn new(id: i64, queue: impl Into<String>, payload: Vec<u8>) -> Self {
        Self {
            id,
            queue: queue.into(),
            key: None,
            correlation_id: None,
            headers: BTreeMap::new(),
            payload,
        }
    }

    /// Reads a message's content; every malformation is an error that says
    /// where the content went wrong.
    pub fn decode(content: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { b: content, at: 0 };
        let version = r.take(1, "the format version")?[0];
        if version != FORMAT_VERSION {
            return Err(DecodeError(format!(
                "format version {version} is not supported (accepted: {FORMAT_VERSION})"
            )));
        }
        let id = i64::from_be_bytes(r.take(8, "the id")?.try_into().expect("8 bytes"));
        let queue = r
            .string("the queue")?
            .ok_or_else(|| DecodeError("the queue is absent".into()))?;
        validate_queue(&queue).map_err(|e| DecodeError(e.to_string()))?;
        let key = r.string("the partition key")?;
        let correlation_id = r.string("the correlation id")?;
        let n = r.u32("the header count")?;
        let mut headers = BTreeMap::new();
        for i in 0..n {
            let name = r
                .string("a header name")?
                .ok_or_else(|| DecodeError(format!("header {i} has no name")))?;
            let value = r
                .string("a header value")?
                .ok_or_else(|| DecodeError(format!("header {name:?} has no value")))?;
            headers.insert(name, value);
        }
        let payload = r
            .bytes("the payload")?
            .ok_or_else(|| DecodeError("the payload is absent".into()))?
            .to_vec();
        if r.at != content.len() {
            return Err(DecodeError(format!(
                "{} bytes after the payload",
                content.len() - r.at
            )));
        }
        Ok(Self {
            id,
            queue,
            key,
            correlation_id,
            headers,
            payload,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.b.len() - self.at < n {
            return Err(DecodeError(format!(
                "the content ends at byte {} in {what} ({} bytes, {n} expected)",
                self.b.len(),
                self.b.len() - self.at
            )));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }

    fn bytes(&mut self, what: &str) -> Result<Option<&'a [u8]>, DecodeError> {
        let n = self.u32(what)?;
        if n == ABSENT {
            return Ok(None);
        }
        self.take(n as usize, what).map(Some)
    }

    fn string(&mut self, what: &str) -> Result<Option<String>, DecodeError> {
        match self.bytes(what)? {
            None => Ok(None),
            Some(b) => {
                let s = std::str::from_utf8(b)
                    .map_err(|e| DecodeError(format!("{what} is not UTF-8: {e}")))?;
                if s.contains('\0') {
                    return Err(DecodeError(format!("{what} contains a NUL character")));
                }
                Ok(Some(s.to_owned()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> LogMessage {
        let mut m = LogMessage::new(42, "orders", br#"{"id":1}"#.to_vec());
        m.key = Some("customer-7".into());
        m.correlation_id = Some("req-1".into());
        m.headers.insert("source".into(), "checkout".into());
        m
    }

    #[test]
    fn a_message_reads_back_as_written() {
        let m = sample();
        assert_eq!(LogMessage::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn every_truncation_is_an_error_naming_the_field() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            let e = LogMessage::decode(&bytes[..n]).unwrap_err();
            assert!(e.0.contains("ends at byte"), "cut at {n}: {e}");
        }
    }

    #[test]
    fn an_unknown_version_and_trailing_bytes_are_refused() {
        let mut bytes = sample().encode();
        bytes.push(0);
        assert_eq!(
            LogMessage::decode(&bytes).unwrap_err().0,
            "1 bytes after the payload"
        );
        bytes[0] = 9;
        assert!(LogMessage::decode(&bytes)
            .unwrap_err()
            .0
            .contains("format version 9 is not supported (accepted: 1)"));
    }

    #[test]
    fn an_invalid_queue_is_refused() {
        let mut m = sample();
        m.queue = String::new();
        assert!(LogMessage::decode(&m.encode()).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_content_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = LogMessage::decode(&b);
        }

        #[test]
        fn arbitrary_messages_round_trip(
            id in any::<i64>(),
            key in proptest::option::of("[a-z0-9]{0,8}"),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut m = LogMessage::new(id, "q", payload);
            m.key = key;
            prop_assert_eq!(LogMessage::decode(&m.encode()).unwrap(), m);
        }
    }
}
