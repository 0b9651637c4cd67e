//! The Kafka sink: a librdkafka producer that sends a whole claimed batch at once.

use crate::config::{client_error_text, human, BrokerConfig};
use crate::error::Error;
use crate::topic;
use futures::future::BoxFuture;
use outbox::{Outgoing, Sink, SinkError};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Extra time past the write timeout before a missing delivery report is
/// treated as a failure: librdkafka reports a timed-out message itself, this
/// only keeps a lost report from hanging a batch.
const REPORT_GRACE: Duration = Duration::from_secs(5);

/// How long to wait before retrying an enqueue on a full librdkafka queue.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);

/// How long repeats of one librdkafka message are held back after it was
/// logged: with every broker down, librdkafka reports each failed reconnect.
const LOG_REPEAT_WINDOW: Duration = Duration::from_secs(30);

/// Forwards librdkafka's log lines and client errors to `tracing` (target
/// `librdkafka`) instead of the `log` crate. A message that repeats (the same
/// text up to its numbers) is logged at most once per 30 s, with the number
/// of repeats held back since.
#[derive(Debug, Clone, Default)]
pub struct LogContext {
    repeats: Arc<std::sync::Mutex<HashMap<String, Repeat>>>,
}

#[derive(Debug)]
struct Repeat {
    logged_at: std::time::Instant,
    held: u64,
}

impl LogContext {
    /// `None`: a repeat to hold back; `Some(n)`: log it, `n` repeats were
    /// held back since it was last logged.
    fn admit(&self, text: &str, now: std::time::Instant) -> Option<u64> {
        let key: String = text.chars().filter(|c| !c.is_ascii_digit()).collect();
        let mut repeats = self.repeats.lock().unwrap_or_else(|e| e.into_inner());
        if repeats.len() > 1024 {
            repeats.retain(|_, r| now.duration_since(r.logged_at) < LOG_REPEAT_WINDOW);
        }
        match repeats.get_mut(&key) {
            Some(r) if now.duration_since(r.logged_at) < LOG_REPEAT_WINDOW => {
                r.held += 1;
                None
            }
            Some(r) => {
                let held = r.held;
                *r = Repeat {
                    logged_at: now,
                    held: 0,
                };
                Some(held)
            }
            None => {
                repeats.insert(
                    key,
                    Repeat {
                        logged_at: now,
                        held: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

/// `" (N like it in the last 30 s not shown)"`, or nothing.
fn held_back(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(
            " ({n} like it in the last {} s not shown)",
            LOG_REPEAT_WINDOW.as_secs()
        )
    }
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if matches!(level, RDKafkaLogLevel::Debug) {
            tracing::debug!(target: "librdkafka", facility = fac, "{message}");
            return;
        }
        let Some(held) = self.admit(&format!("{fac} {message}"), std::time::Instant::now()) else {
            return;
        };
        let held = held_back(held);
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{message}{held}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{message}{held}")
            }
            _ => tracing::info!(target: "librdkafka", facility = fac, "{message}{held}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let text = format!("kafka client error: {error}: {reason}");
        if let Some(held) = self.admit(&text, std::time::Instant::now()) {
            tracing::warn!(target: "librdkafka", "{text}{}", held_back(held));
        }
    }
}

type Producer_ = FutureProducer<LogContext>;

/// Publishes the outbox's messages to Kafka; the [`Sink`] named `"kafka"` that
/// `#[kafka::publisher]` and the stand-alone relay send to.
///
/// Every message of a claimed batch is handed to librdkafka at once, then the
/// acknowledgements are awaited together, so a batch costs about one round
/// trip to the brokers, not one per message. For that reason the producer's
/// `linger.ms` is 0 unless the settings name one.
///
/// * **Synchronous** (default): a row is acked only after Kafka acknowledged
///   its message with the configured [`crate::Acks`]. At-least-once: a crash
///   between Kafka's acknowledgement and the row's delete republishes the
///   message, so consumers de-duplicate on the `outbox-id` header.
/// * **Asynchronous** ([`BrokerConfig::asynchronous`]): a row is acked once its
///   message is queued in librdkafka. Faster, but not at-least-once: messages
///   still queued when the process dies, or that fail after the write timeout,
///   are lost (and logged).
/// * **Transactional** ([`BrokerConfig::transactional`]): every batch is one
///   Kafka transaction. Any failure aborts the whole batch, and its messages
///   stay invisible to consumers with `isolation.level=read_committed`; every
///   message of an aborted batch is reported as a transient failure (except a
///   message Kafka refuses for good, which is reported as permanent so that it
///   goes to the dead letters and stops blocking its batch). This is not
///   end-to-end exactly-once: the outbox rows are deleted in a separate
///   database statement after the Kafka commit, so a crash between the two
///   publishes the batch again in a new transaction. Consumers still
///   de-duplicate on `outbox-id`; what the transaction adds is that they never
///   see half a batch, nor a batch that was aborted.
///
/// Failures: an unreachable broker, a timeout and a missing topic are
/// transient (the row is retried by its subscriber's strategy); a message too
/// large or otherwise refused for good is permanent (the row goes to the dead
/// letters with reason `publish_rejected`). Every send ends within the write
/// timeout.
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_kafka as kafka;
/// let broker = kafka::Broker::from_env()?;
/// outbox::App::new(pool).broker(broker).run_until_signal().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Broker {
    name: String,
    inner: Arc<Inner>,
}

struct Inner {
    config: BrokerConfig,
    mode: Mode,
    admin: Option<topic::Admin>,
    known_topics: std::sync::Mutex<HashSet<String>>,
    async_failures: Arc<AtomicU64>,
}

enum Mode {
    /// Replaced when librdkafka reports a fatal error (possible with the
    /// idempotent producer), so that one bad moment does not fail every later
    /// batch.
    Plain(std::sync::Mutex<Producer_>),
    Transactional(tokio::sync::Mutex<TxnState>),
}

struct TxnState {
    producer: Option<Producer_>,
    ready: bool,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("name", &self.name)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// A broker with the given settings. Nothing is contacted yet: a broker
    /// that is down makes sends fail (and rows retry), not this call.
    ///
    /// ```
    /// let broker = outbox_kafka::Broker::new(outbox_kafka::BrokerConfig::new("127.0.0.1:9092")).unwrap();
    /// use outbox::Sink;
    /// assert_eq!(broker.name(), "kafka");
    /// ```
    pub fn new(config: BrokerConfig) -> Result<Self, Error> {
        config.validate()?;
        let mode = match config.transactional_id() {
            None => Mode::Plain(std::sync::Mutex::new(create_producer(&config)?)),
            Some(_) => {
                // Checked now so that a bad setting fails at start-up; the
                // transactional producer itself is made on first use.
                drop(create_producer(&config)?);
                Mode::Transactional(tokio::sync::Mutex::new(TxnState {
                    producer: None,
                    ready: false,
                }))
            }
        };
        let admin = if config.creates_topics() {
            Some(topic::Admin::new(&config)?)
        } else {
            None
        };
        tracing::debug!(config = ?config, "kafka producer configured");
        Ok(Self {
            name: "kafka".to_owned(),
            inner: Arc::new(Inner {
                config,
                mode,
                admin,
                known_topics: std::sync::Mutex::new(HashSet::new()),
                async_failures: Arc::new(AtomicU64::new(0)),
            }),
        })
    }

    /// A broker configured from the environment ([`BrokerConfig::from_env`]).
    pub fn from_env() -> Result<Self, Error> {
        Self::new(BrokerConfig::from_env()?)
    }

    /// The same broker under another sink name, for an app with two Kafka
    /// clusters (`Output::publish("kafka-eu", ...)`). The default is `"kafka"`.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The settings in use.
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// Messages lost in asynchronous mode: queued, their rows deleted, then
    /// not delivered.
    pub fn async_failures(&self) -> u64 {
        self.inner.async_failures.load(Ordering::Relaxed)
    }

    /// Creates `topic` with `partitions` partitions (replication factor: the
    /// broker's default) unless it exists, and waits until its partitions have
    /// leaders. See [`crate::ensure_topic`].
    pub async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<(), Error> {
        crate::ensure_topic(&self.inner.config, topic, partitions).await
    }

    async fn send_batch(&self, batch: Vec<Outgoing>) -> Vec<Result<(), SinkError>> {
        let inner = &*self.inner;
        let mut results: Vec<Option<Result<(), SinkError>>> = vec![None; batch.len()];
        // A topic Kafka would refuse is refused here, for good: librdkafka
        // would only let the message time out, and its row be retried.
        for (i, msg) in batch.iter().enumerate() {
            if let Err(why) = topic::check_topic_name(&msg.topic) {
                results[i] = Some(Err(SinkError::permanent(format!(
                    "kafka cannot take a message for topic {:?}: {why}",
                    msg.topic
                ))));
            }
        }
        if inner.admin.is_some() {
            let wanted: Vec<&str> = batch
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_none())
                .map(|(m, _)| m.topic.as_str())
                .collect();
            let failed = self.create_missing_topics(&wanted).await;
            if !failed.is_empty() {
                for (i, msg) in batch.iter().enumerate() {
                    if let Some(e) = failed.get(&msg.topic) {
                        results[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        match &inner.mode {
            Mode::Plain(slot) => {
                let producer = slot.lock().expect("producer lock").clone();
                let asynchronous = inner.config.is_asynchronous();
                self.produce_all(&producer, &batch, &mut results, asynchronous)
                    .await;
                if let Some((code, reason)) = producer.client().fatal_error() {
                    tracing::error!(
                        "kafka producer failed fatally ({code}: {}); replacing it",
                        inner.config.redact(&reason)
                    );
                    self.replace_producer(slot, &producer);
                }
                results
                    .into_iter()
                    .map(|r| r.unwrap_or_else(|| Err(SinkError::transient("kafka: not sent"))))
                    .collect()
            }
            Mode::Transactional(state) => self.send_transaction(state, &batch, results).await,
        }
    }

    /// Enqueues every message without a result yet, then (unless
    /// `asynchronous`) awaits every delivery report together.
    async fn produce_all(
        &self,
        producer: &Producer_,
        batch: &[Outgoing],
        results: &mut [Option<Result<(), SinkError>>],
        asynchronous: bool,
    ) {
        let timeout = self.inner.config.get_write_timeout();
        let enqueue_deadline = Instant::now() + timeout;
        let mut pending: Vec<(usize, DeliveryFuture)> = Vec::with_capacity(batch.len());
        for (i, msg) in batch.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            match self.enqueue(producer, msg, enqueue_deadline).await {
                Ok(delivery) => pending.push((i, delivery)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        // Messages waiting in the producer, this batch included.
        outbox::metrics::set_kafka_queue_depth(producer.in_flight_count().max(0) as u64);
        if asynchronous {
            let watched: Vec<(String, String, DeliveryFuture)> = pending
                .into_iter()
                .map(|(i, delivery)| {
                    results[i] = Some(Ok(()));
                    (batch[i].topic.clone(), outbox_id(&batch[i]), delivery)
                })
                .collect();
            let failures = self.inner.async_failures.clone();
            let config = self.inner.config.clone();
            tokio::spawn(async move {
                for (topic, id, delivery) in watched {
                    let error = match delivery.await {
                        Ok(Ok(_)) => continue,
                        Ok(Err((e, _))) => config.redact(&e.to_string()),
                        Err(_) => "the producer was closed before delivery".to_owned(),
                    };
                    failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        topic = %topic,
                        outbox_id = %id,
                        "asynchronous publish failed after the row was deleted; the message is lost: {error}"
                    );
                }
            });
            return;
        }
        let report_deadline = Instant::now() + timeout + REPORT_GRACE;
        let reports =
            futures::future::join_all(pending.into_iter().map(|(i, delivery)| async move {
                (i, tokio::time::timeout_at(report_deadline, delivery).await)
            }))
            .await;
        let mut timed_out: HashMap<String, Option<String>> = HashMap::new();
        for (i, report) in &reports {
            if let Ok(Ok(Err((e, _)))) = report {
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut) {
                    timed_out.entry(batch[*i].topic.clone()).or_default();
                }
            }
        }
        for (topic, why) in timed_out.iter_mut() {
            *why = diagnose_timeout(producer, topic, timeout).await;
        }
        for (i, report) in reports {
            let msg = &batch[i];
            results[i] = Some(match report {
                Ok(Ok(Ok(_))) => Ok(()),
                Ok(Ok(Err((e, _)))) => match timed_out.get(&msg.topic) {
                    Some(Some(why)) => Err(SinkError::transient(format!(
                        "kafka did not acknowledge the message for topic {:?} within the write timeout ({}): {why}",
                        msg.topic,
                        human(timeout)
                    ))),
                    _ => Err(self.sink_error(&e, msg)),
                },
                Ok(Err(_canceled)) => Err(SinkError::transient(format!(
                    "kafka: the producer was closed before topic {:?} acknowledged the message",
                    msg.topic
                ))),
                Err(_elapsed) => Err(SinkError::transient(format!(
                    "kafka: no delivery report for topic {:?} within the write timeout ({})",
                    msg.topic,
                    human(timeout)
                ))),
            });
        }
    }

    /// Hands one message to librdkafka, waiting while its queue is full.
    async fn enqueue(
        &self,
        producer: &Producer_,
        msg: &Outgoing,
        deadline: Instant,
    ) -> Result<DeliveryFuture, SinkError> {
        let mut headers = OwnedHeaders::new_with_capacity(msg.headers.len());
        for (key, value) in &msg.headers {
            headers = headers.insert(Header {
                key: key.as_str(),
                value: Some(value.as_slice()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&msg.topic)
            .payload(msg.payload.as_slice())
            .headers(headers);
        if let Some(key) = &msg.key {
            record = record.key(key.as_slice());
        }
        loop {
            match producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    if Instant::now() >= deadline {
                        return Err(SinkError::transient(format!(
                            "kafka: librdkafka's send queue stayed full for the write timeout ({}); \
                             the brokers may be unreachable",
                            human(self.inner.config.get_write_timeout())
                        )));
                    }
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_WAIT).await;
                }
                Err((e, _)) => return Err(self.sink_error(&e, msg)),
            }
        }
    }

    /// Classifies a producer error: refused for good, or worth retrying.
    fn sink_error(&self, e: &KafkaError, msg: &Outgoing) -> SinkError {
        let config = &self.inner.config;
        let detail = config.redact(&e.to_string());
        let topic = &msg.topic;
        match e.rdkafka_error_code() {
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidMessageSize,
            ) => {
                let key = msg.key.as_ref().map_or(0, Vec::len);
                let headers: usize = msg.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
                let total = msg.payload.len() + key + headers;
                SinkError::permanent(format!(
                    "kafka refused the message for topic {topic:?} as too large: {total} bytes \
                     (payload {}, key {key}, headers {headers}); the limit is {} bytes in the \
                     producer (message.max.bytes) and may be lower in the broker \
                     (message.max.bytes) or the topic (max.message.bytes): {detail}",
                    msg.payload.len(),
                    config.max_message_bytes()
                ))
            }
            Some(RDKafkaErrorCode::InvalidRecord | RDKafkaErrorCode::InvalidMessage) => {
                SinkError::permanent(format!(
                    "kafka refused the message for topic {topic:?} as invalid: {detail}"
                ))
            }
            Some(RDKafkaErrorCode::InvalidTopic) => SinkError::permanent(format!(
                "kafka refused topic {topic:?} as invalid (an internal topic, or a name it does not \
                 accept); map the queue to a topic of your own: {detail}"
            )),
            Some(RDKafkaErrorCode::TopicAuthorizationFailed) => SinkError::permanent(format!(
                "kafka refused access to topic {topic:?} (topic authorization failed): grant the \
                 producer's principal WRITE on it, then replay the dead letters: {detail}"
            )),
            Some(RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition) => {
                SinkError::transient(format!(
                    "kafka topic {topic:?} does not exist and topics are not created automatically \
                     (create it, or set KAFKA_CREATE_TOPICS=true / BrokerConfig::create_topics): {detail}"
                ))
            }
            Some(RDKafkaErrorCode::MessageTimedOut) => SinkError::transient(format!(
                "kafka did not acknowledge the message for topic {topic:?} within the write timeout ({}): \
                 the brokers may be unreachable, or the topic may not exist: {detail}",
                human(config.get_write_timeout())
            )),
            _ => SinkError::transient(format!(
                "kafka publish to topic {topic:?} failed: {detail}"
            )),
        }
    }

    /// Creates the topics that are not known to exist; returns the topics
    /// that could not be created.
    async fn create_missing_topics(&self, topics: &[&str]) -> HashMap<String, SinkError> {
        let Some(admin) = &self.inner.admin else {
            return HashMap::new();
        };
        let missing: Vec<String> = {
            let known = self.inner.known_topics.lock().expect("known topics lock");
            let mut seen = HashSet::new();
            topics
                .iter()
                .copied()
                .filter(|t| !known.contains(*t) && seen.insert(*t))
                .map(str::to_owned)
                .collect()
        };
        if missing.is_empty() {
            return HashMap::new();
        }
        let mut failed = HashMap::new();
        let partitions = self.inner.config.get_topic_partitions();
        for (topic, result) in admin.create(&missing, partitions).await {
            match result {
                Ok(()) => {
                    self.inner
                        .known_topics
                        .lock()
                        .expect("known topics lock")
                        .insert(topic);
                }
                Err(e) => {
                    let e = SinkError::transient(format!(
                        "kafka: cannot create topic {topic:?}: {}",
                        self.inner.config.redact(&e)
                    ));
                    failed.insert(topic, e);
                }
            }
        }
        failed
    }

    /// Sends the batch as one Kafka transaction.
    async fn send_transaction(
        &self,
        state: &tokio::sync::Mutex<TxnState>,
        batch: &[Outgoing],
        mut results: Vec<Option<Result<(), SinkError>>>,
    ) -> Vec<Result<(), SinkError>> {
        let config = &self.inner.config;
        let timeout = config.get_write_timeout();
        let all_failed = |why: String| -> Vec<Result<(), SinkError>> {
            batch
                .iter()
                .map(|_| Err(SinkError::transient(why.clone())))
                .collect()
        };
        if results.iter().any(|r| r.is_some()) {
            // A topic was refused or could not be created: the batch cannot
            // be complete.
            return results
                .into_iter()
                .map(|r| match r {
                    Some(Err(e)) => Err(e),
                    _ => Err(SinkError::transient(
                        "kafka transaction not attempted: a topic of the batch was refused or could not be created",
                    )),
                })
                .collect();
        }
        let mut st = state.lock().await;
        let producer = match &st.producer {
            Some(p) => p.clone(),
            None => match create_producer(config) {
                Ok(p) => {
                    st.producer = Some(p.clone());
                    st.ready = false;
                    p
                }
                Err(e) => return all_failed(format!("kafka: cannot create the producer: {e}")),
            },
        };
        if !st.ready {
            let p = producer.clone();
            match blocking(move || p.init_transactions(timeout)).await {
                Ok(()) => st.ready = true,
                Err(e) => {
                    let why = format!(
                        "kafka: cannot initialise transactions: {}",
                        config.redact(&e.to_string())
                    );
                    reset(&mut st).await;
                    return all_failed(why);
                }
            }
        }
        if let Err(e) = producer.begin_transaction() {
            let why = format!(
                "kafka: cannot begin a transaction: {}",
                config.redact(&e.to_string())
            );
            reset(&mut st).await;
            return all_failed(why);
        }
        self.produce_all(&producer, batch, &mut results, false)
            .await;
        let first_error = results.iter().find_map(|r| match r {
            Some(Err(e)) => Some(e.message.clone()),
            _ => None,
        });
        match first_error {
            None => {
                let p = producer.clone();
                match blocking(move || p.commit_transaction(timeout)).await {
                    Ok(()) => results.into_iter().map(|_| Ok(())).collect(),
                    Err(e) => {
                        let why = format!(
                            "kafka: transaction commit failed, batch aborted: {}",
                            config.redact(&e.to_string())
                        );
                        abort(&mut st, &producer, timeout).await;
                        all_failed(why)
                    }
                }
            }
            Some(first) => {
                abort(&mut st, &producer, timeout).await;
                let why = format!(
                    "kafka transaction aborted because a message of the batch failed: {first}"
                );
                results
                    .into_iter()
                    .map(|r| match r {
                        Some(Err(e)) if e.permanent => Err(e),
                        _ => Err(SinkError::transient(why.clone())),
                    })
                    .collect()
            }
        }
    }

    /// Puts a new producer in place of `failed`, unless another batch did
    /// already; the failed one is dropped off the async threads.
    fn replace_producer(&self, slot: &std::sync::Mutex<Producer_>, failed: &Producer_) {
        let fresh = match create_producer(&self.inner.config) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("cannot recreate the kafka producer: {e}");
                return;
            }
        };
        let mut current = slot.lock().expect("producer lock");
        if std::ptr::eq(current.client(), failed.client()) {
            let old = std::mem::replace(&mut *current, fresh);
            drop(current);
            tokio::task::spawn_blocking(move || drop(old));
        }
    }

    async fn flush_producer(&self, timeout: Duration) {
        let producer = match &self.inner.mode {
            Mode::Plain(p) => p.lock().expect("producer lock").clone(),
            Mode::Transactional(state) => match &state.lock().await.producer {
                Some(p) => p.clone(),
                None => return,
            },
        };
        let in_flight = producer.in_flight_count();
        let p = producer.clone();
        if let Err(e) = blocking(move || p.flush(timeout)).await {
            tracing::warn!(
                in_flight = producer.in_flight_count(),
                "kafka producer flush did not finish within {}: {e}",
                human(timeout)
            );
        } else if in_flight > 0 {
            tracing::debug!(in_flight, "kafka producer flushed");
        }
    }
}

impl Sink for Broker {
    fn name(&self) -> &str {
        &self.name
    }

    fn send(&self, batch: Vec<Outgoing>) -> BoxFuture<'_, Vec<Result<(), SinkError>>> {
        Box::pin(self.send_batch(batch))
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(self.flush_producer(timeout))
    }
}

/// Why messages to `topic` timed out, when the cluster's metadata can tell:
/// the topic does not exist, or no broker answers.
async fn diagnose_timeout(producer: &Producer_, topic: &str, timeout: Duration) -> Option<String> {
    let p = producer.clone();
    let name = topic.to_owned();
    let wait = timeout.min(Duration::from_secs(2));
    let metadata = tokio::task::spawn_blocking(move || {
        p.client().fetch_metadata(Some(&name), wait).map(|m| {
            m.topics()
                .iter()
                .find(|t| t.name() == name)
                .map(|t| (t.error(), t.partitions().len()))
        })
    })
    .await
    .ok()?;
    match metadata {
        Err(e) => Some(format!(
            "no broker answers ({e}); is Kafka running and reachable?"
        )),
        Ok(Some((Some(_), _))) | Ok(Some((None, 0))) | Ok(None) => Some(format!(
            "topic {topic:?} does not exist and topics are not created automatically \
             (create it, or set KAFKA_CREATE_TOPICS=true / BrokerConfig::create_topics)"
        )),
        Ok(Some(_)) => None,
    }
}

/// Aborts the open transaction; a producer that cannot abort is replaced.
async fn abort(st: &mut TxnState, producer: &Producer_, timeout: Duration) {
    let p = producer.clone();
    if let Err(e) = blocking(move || p.abort_transaction(timeout)).await {
        tracing::warn!("kafka: transaction abort failed, recreating the producer: {e}");
        reset(st).await;
    }
}

/// Drops the transactional producer (off the async threads: dropping a
/// producer blocks while librdkafka shuts down); the next batch makes a new
/// one, whose `init_transactions` fences the old one's transaction.
async fn reset(st: &mut TxnState) {
    st.ready = false;
    if let Some(p) = st.producer.take() {
        let _ = tokio::task::spawn_blocking(move || drop(p)).await;
    }
}

/// Runs a blocking librdkafka call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}

/// librdkafka's default `linger.ms` (5 ms) when the settings name none.
const DEFAULT_LINGER_MS: &str = "0";

fn create_producer(config: &BrokerConfig) -> Result<Producer_, Error> {
    let mut client = config.client_config();
    // A claimed batch is handed over whole and then awaited, so lingering
    // cannot fill a request any further: it only delays every batch (5 ms, the
    // librdkafka default, capped a batch-of-one relay at ~200 rows/s with two
    // workers, and added 5 ms to every message's latency). A linger the user
    // set (KAFKA_LINGER, `BrokerConfig::linger`, a property) is kept.
    if client.get("linger.ms").is_none() && client.get("queue.buffering.max.ms").is_none() {
        client.set("linger.ms", DEFAULT_LINGER_MS);
    }
    // librdkafka leaves Nagle's algorithm on: a produce request written while
    // an earlier one is unacknowledged on the connection (two workers, or a
    // batch spanning requests) can wait for the broker's delayed TCP ACK.
    // Requests are already whole batches, so there is nothing to coalesce.
    // A value the user set is kept.
    if client.get("socket.nagle.disable").is_none() {
        client.set("socket.nagle.disable", "true");
    }
    client
        .set_log_level(RDKafkaLogLevel::Warning)
        .create_with_context(LogContext::default())
        .map_err(|e| Error::Client(config.redact(&client_error_text(&e))))
}

fn outbox_id(msg: &Outgoing) -> String {
    msg.headers
        .iter()
        .find(|(k, _)| k == "outbox-id")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(topic: &str) -> Outgoing {
        Outgoing {
            sink: "kafka".into(),
            topic: topic.into(),
            key: Some(b"key".to_vec()),
            payload: b"payload".to_vec(),
            headers: vec![("h".into(), vec![b'x'; 100])],
        }
    }

    #[test]
    fn invalid_topics_and_refused_access_are_permanent_and_name_the_topic() {
        // Nothing is contacted until a send.
        let broker = Broker::new(BrokerConfig::default()).unwrap();
        for code in [
            RDKafkaErrorCode::InvalidTopic,
            RDKafkaErrorCode::TopicAuthorizationFailed,
        ] {
            let e = broker.sink_error(&KafkaError::MessageProduction(code), &outgoing("t.x"));
            assert!(e.permanent, "{code:?}: {e}");
            assert!(e.message.contains("topic \"t.x\""), "{code:?}: {e}");
        }
        let e = broker.sink_error(
            &KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition),
            &outgoing("t.x"),
        );
        assert!(!e.permanent, "a missing topic may be created: {e}");
    }

    #[test]
    fn a_message_too_large_is_reported_with_its_whole_size_and_the_limit() {
        let broker = Broker::new(BrokerConfig::default()).unwrap();
        let e = broker.sink_error(
            &KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            &outgoing("t.x"),
        );
        assert!(e.permanent, "{e}");
        // payload 7 + key 3 + headers 1 + 100.
        assert!(
            e.message
                .contains("111 bytes (payload 7, key 3, headers 101); the limit is 1000000 bytes"),
            "{e}"
        );
        let broker = Broker::new(BrokerConfig::default().set("message.max.bytes", "5000")).unwrap();
        let e = broker.sink_error(
            &KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            &outgoing("t.x"),
        );
        assert!(e.message.contains("the limit is 5000 bytes"), "{e}");
    }

    #[test]
    fn repeated_librdkafka_messages_are_logged_once_per_window_with_a_count() {
        let ctx = LogContext::default();
        let t0 = std::time::Instant::now();
        let refused = |port: u16, ms: u32| {
            format!("127.0.0.1:{port}/1: Connect to ipv4#127.0.0.1:{port} failed: Connection refused (after {ms}ms in state CONNECT)")
        };
        assert_eq!(
            ctx.admit(&refused(9092, 0), t0),
            Some(0),
            "the first is logged"
        );
        // The same text up to its numbers is a repeat within the window.
        for (i, ms) in [1, 5, 12].into_iter().enumerate() {
            let at = t0 + Duration::from_secs(i as u64 + 1);
            assert_eq!(ctx.admit(&refused(9092, ms), at), None);
        }
        // Another message is not held back by the first.
        assert_eq!(
            ctx.admit("1/1 brokers are down", t0 + Duration::from_secs(2)),
            Some(0)
        );
        // After the window, logged again with the number held back.
        let later = t0 + LOG_REPEAT_WINDOW + Duration::from_secs(1);
        assert_eq!(ctx.admit(&refused(9092, 3), later), Some(3));
        assert_eq!(ctx.admit(&refused(9092, 3), later), None);
        assert_eq!(held_back(0), "");
        assert_eq!(held_back(3), " (3 like it in the last 30 s not shown)");
    }
}
