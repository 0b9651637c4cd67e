//! The [`Broker`]: JetStream publishes for the outbox runtime.

use crate::config::{Auth, BrokerConfig, ConfigError};
use crate::error::Error;
use crate::subject::check_subject;
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::{self, Context};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use futures::future::BoxFuture;
use outbox::{Outgoing, Sink, SinkError};
use std::future::IntoFuture;
use std::str::FromStr;
use std::sync::Arc;
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// The header JetStream de-duplicates on.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// The header that carries the message key (NATS messages have no key).
pub const KEY_HEADER: &str = "outbox-key";
/// Header names starting with this (in any case) belong to JetStream; a row's
/// own headers of such names are not sent (see [`Broker`]).
pub const NATS_HEADER_PREFIX: &str = "Nats-";

/// JetStream's error code for a message larger than the stream's
/// `max_msg_size`: no retry can make it fit.
const JS_MESSAGE_TOO_LARGE: u64 = 10054;
/// PubAcks in flight per connection: a claimed batch, several times over.
const MAX_ACKS_IN_FLIGHT: usize = 20_000;

/// Publishes the outbox's messages to NATS JetStream; the [`Sink`] named
/// `"nats"` that `#[nats::publisher]` sends to.
///
/// Each message is a JetStream publish to the publisher's subject, with the
/// headers in the table below. All publishes of a claimed batch are sent
/// first, then their PubAcks are awaited together, so a batch costs about one
/// round trip. A row is deleted only after JetStream acknowledged its message
/// (the stream has stored it).
///
/// | header | value |
/// |---|---|
/// | `Nats-Msg-Id` | the outbox id (after [`BrokerConfig::msg_id_prefix`]) |
/// | `outbox-id` | the outbox id |
/// | `outbox-queue` | the row's queue |
/// | `outbox-attempt` | the delivery attempt, from 1 |
/// | `outbox-correlation-id` | the row's correlation id, when it has one |
/// | `outbox-created-at` | when the row was written, ms since the Unix epoch |
/// | `outbox-key` | the message key (the row's partition key, or `outbox::Keyed`'s) |
/// | any other | the row's own headers |
///
/// Row headers named `outbox-*` are dropped by the runtime; row headers named
/// `Nats-*` (JetStream's, such as `Nats-Expected-Stream`) are dropped here and
/// logged, so that no row can forge the message id or change how JetStream
/// stores it.
///
/// Delivery is at least once. JetStream drops a publish whose `Nats-Msg-Id`
/// it has seen within the stream's duplicate window (2 minutes by default),
/// so a re-send after a lost PubAck is stored once; consumers that may see a
/// message again after the window still de-duplicate on `outbox-id`.
///
/// Failures: no stream for the subject, a timeout and a lost connection are
/// transient (the row is retried by its subscriber's strategy); a message
/// over the server's `max_payload` or the stream's `max_msg_size`, or that
/// NATS cannot carry (a header with a line break, a key that is not UTF-8),
/// is permanent (dead letters). Every batch ends within the timeout.
///
/// The connection is made at the first batch, in the background: a server
/// that is down at start-up fails the batches (within the timeout) until it
/// is up.
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_nats as nats;
/// let broker = nats::Broker::from_env()?;
/// outbox::App::new(pool).broker(broker).run_until_signal().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    config: BrokerConfig,
    context: OnceCell<Context>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// A broker with these settings; checks them, connects later.
    pub fn new(config: BrokerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                context: OnceCell::new(),
            }),
        })
    }

    /// A broker configured from the environment ([`BrokerConfig::from_env`]).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::new(BrokerConfig::from_env()?)
    }

    /// The settings.
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// The JetStream context, connecting on first use (in the background:
    /// the publishes of a batch sent while the server is away time out).
    pub(crate) async fn context(&self) -> Result<&Context, Error> {
        self.inner
            .context
            .get_or_try_init(|| connect(&self.inner.config))
            .await
    }

    /// Publishes one batch: every message sent, then every PubAck awaited.
    async fn publish(&self, batch: Vec<Outgoing>) -> Vec<Result<(), SinkError>> {
        let config = &self.inner.config;
        let context = match self.context().await {
            Ok(context) => context,
            Err(e) => {
                let e = SinkError::transient(e.to_string());
                return vec![Err(e); batch.len()];
            }
        };
        let deadline = Instant::now() + config.timeout;
        let mut pending: Vec<Result<(String, PublishAckFuture), SinkError>> =
            Vec::with_capacity(batch.len());
        for msg in batch {
            let headers = match headers(&msg, &config.msg_id_prefix) {
                Ok(headers) => headers,
                Err(e) => {
                    pending.push(Err(e));
                    continue;
                }
            };
            let subject = msg.topic;
            let sent = tokio::time::timeout_at(
                deadline,
                context.publish_with_headers(subject.clone(), headers, msg.payload.into()),
            )
            .await;
            pending.push(match sent {
                Ok(Ok(ack)) => Ok((subject, ack)),
                Ok(Err(e)) => Err(publish_error(&subject, &e, config)),
                Err(_) => Err(timed_out(&subject, config)),
            });
        }
        let acks = pending.into_iter().map(|p| async move {
            let (subject, ack) = p?;
            match tokio::time::timeout_at(deadline, ack.into_future()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(publish_error(&subject, &e, config)),
                Err(_) => Err(timed_out(&subject, config)),
            }
        });
        futures::future::join_all(acks).await
    }
}

impl Sink for Broker {
    fn name(&self) -> &str {
        "nats"
    }

    fn send(&self, batch: Vec<Outgoing>) -> BoxFuture<'_, Vec<Result<(), SinkError>>> {
        Box::pin(self.publish(batch))
    }
}

async fn connect(config: &BrokerConfig) -> Result<Context, Error> {
    let mut options = async_nats::ConnectOptions::new()
        .name("outbox")
        .connection_timeout(config.timeout)
        .request_timeout(Some(config.timeout))
        .retry_on_initial_connect()
        .max_reconnects(None::<usize>)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!(target: "outbox_nats", "connected to NATS"),
                async_nats::Event::Disconnected => {
                    tracing::warn!(target: "outbox_nats", "disconnected from NATS; reconnecting (publishes fail until then)")
                }
                other => tracing::info!(target: "outbox_nats", "NATS: {other}"),
            }
        });
    options = match &config.auth {
        Auth::None => options,
        Auth::UserPassword(user, password) => {
            options.user_and_password(user.clone(), password.clone())
        }
        Auth::Token(token) => options.token(token.clone()),
        Auth::CredsFile(path) => options.credentials_file(path).await.map_err(|e| {
            Error::Connect(format!(
                "reading the credentials file {} failed: {e} (accepted: a NATS .creds file)",
                path.display()
            ))
        })?,
    };
    let servers: Vec<async_nats::ServerAddr> = config
        .servers
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Connect(format!("a server URL is not valid: {e}")))?;
    let client = options.connect(servers).await.map_err(|e| {
        Error::Connect(format!(
            "connecting to {} failed: {e}",
            config.servers.join(",")
        ))
    })?;
    Ok(jetstream::ContextBuilder::new()
        .timeout(config.timeout)
        .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
        .backpressure_on_inflight(true)
        .build(client))
}

/// The NATS headers of one message (see the table on [`Broker`]).
fn headers(msg: &Outgoing, msg_id_prefix: &str) -> Result<HeaderMap, SinkError> {
    check_subject(&msg.topic).map_err(SinkError::permanent)?;
    let mut map = HeaderMap::new();
    let mut dropped = Vec::new();
    let mut id = None;
    for (name, value) in &msg.headers {
        if name.len() >= NATS_HEADER_PREFIX.len()
            && name.as_bytes()[..NATS_HEADER_PREFIX.len()]
                .eq_ignore_ascii_case(NATS_HEADER_PREFIX.as_bytes())
        {
            dropped.push(name.as_str());
            continue;
        }
        if name == "outbox-id" {
            id = Some(value);
        }
        map.append(header_name(name)?, header_value(name, value)?);
    }
    if !dropped.is_empty() {
        tracing::warn!(target: "outbox_nats", subject = %msg.topic, ?dropped, "row headers with names reserved for JetStream (Nats-*) not sent");
    }
    if let Some(key) = &msg.key {
        map.insert(header_name(KEY_HEADER)?, header_value(KEY_HEADER, key)?);
    }
    if let Some(id) = id {
        let id = format!("{msg_id_prefix}{}", String::from_utf8_lossy(id));
        map.insert(
            header_name(MSG_ID_HEADER)?,
            header_value(MSG_ID_HEADER, id.as_bytes())?,
        );
    }
    Ok(map)
}

fn header_name(name: &str) -> Result<HeaderName, SinkError> {
    HeaderName::from_str(name).map_err(|_| {
        SinkError::permanent(format!(
            "header name {name:?} cannot be sent over NATS (accepted: printable ASCII without spaces or ':')"
        ))
    })
}

fn header_value(name: &str, value: &[u8]) -> Result<HeaderValue, SinkError> {
    let text = std::str::from_utf8(value).map_err(|_| {
        SinkError::permanent(format!(
            "header {name:?} is not UTF-8 text, which NATS headers carry (accepted: UTF-8 without line breaks)"
        ))
    })?;
    HeaderValue::from_str(text).map_err(|_| {
        SinkError::permanent(format!(
            "header {name:?} holds a line break, which NATS headers cannot carry (accepted: UTF-8 without line breaks)"
        ))
    })
}

fn timed_out(subject: &str, config: &BrokerConfig) -> SinkError {
    SinkError::transient(format!(
        "no PubAck for {subject:?} within the timeout of {:?} (is NATS up at {}?)",
        config.timeout,
        config.servers.join(",")
    ))
}

/// Sorts a failed publish into transient and permanent, with a message that
/// says what to do.
fn publish_error(subject: &str, e: &PublishError, config: &BrokerConfig) -> SinkError {
    let on = format!(" {subject:?}");
    match e.kind() {
        PublishErrorKind::StreamNotFound => SinkError::transient(format!(
            "no JetStream stream stores subject{on} (NATS answered \"no responders\"): create a stream \
             for it, e.g. with outbox_nats::ensure_stream or `nats stream add`; streams are not created unless asked"
        )),
        PublishErrorKind::TimedOut => timed_out(subject, config),
        PublishErrorKind::BrokenPipe => SinkError::transient(format!(
            "the connection to NATS was lost before the PubAck{on} arrived"
        )),
        PublishErrorKind::MaxPayloadExceeded => SinkError::permanent(format!(
            "message{on} is larger than the server's max_payload: {e}"
        )),
        _ => {
            let text = e.to_string();
            let code = std::error::Error::source(e)
                .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
                .map(|js| js.error_code().0);
            if code == Some(JS_MESSAGE_TOO_LARGE) {
                SinkError::permanent(format!(
                    "message{on} is larger than the stream's max_msg_size: {text}"
                ))
            } else {
                SinkError::transient(format!("JetStream publish{on} failed: {text}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(headers: &[(&str, &[u8])], key: Option<&[u8]>) -> Outgoing {
        Outgoing {
            sink: "nats".into(),
            topic: "orders.created".into(),
            key: key.map(<[u8]>::to_vec),
            payload: b"{}".to_vec(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
                .collect(),
        }
    }

    #[test]
    fn headers_carry_the_id_key_and_row_headers() {
        let msg = outgoing(
            &[
                ("trace", b"abc"),
                ("Nats-Expected-Stream", b"X"),
                ("outbox-id", b"42"),
            ],
            Some(b"k1"),
        );
        let h = headers(&msg, "db1:").unwrap();
        assert_eq!(h.get(MSG_ID_HEADER).unwrap().as_str(), "db1:42");
        assert_eq!(h.get("outbox-id").unwrap().as_str(), "42");
        assert_eq!(h.get(KEY_HEADER).unwrap().as_str(), "k1");
        assert_eq!(h.get("trace").unwrap().as_str(), "abc");
        assert!(h.get("Nats-Expected-Stream").is_none());
    }

    #[test]
    fn what_nats_cannot_carry_is_permanent() {
        let e = headers(&outgoing(&[("h", b"a\r\nb")], None), "").unwrap_err();
        assert!(e.permanent && e.message.contains("line break"), "{e:?}");
        let e = headers(&outgoing(&[], Some(&[0xff])), "").unwrap_err();
        assert!(e.permanent && e.message.contains("UTF-8"), "{e:?}");
        let mut msg = outgoing(&[], None);
        msg.topic = "orders.*".into();
        assert!(headers(&msg, "").unwrap_err().permanent);
    }
}
