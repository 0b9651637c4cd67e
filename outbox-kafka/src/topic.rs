//! Topic creation through the Kafka admin API.

use crate::broker::LogContext;
use crate::config::{client_error_text, BrokerConfig};
use crate::error::Error;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::RDKafkaErrorCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// Whether `c` may appear in a Kafka topic name.
pub(crate) fn topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Checks a topic name as Kafka does (1 to 249 of ASCII letters, digits, `.`,
/// `_`, `-`, other than `.` and `..`), and refuses the names Kafka keeps for
/// itself (starting with `__`, such as `__consumer_offsets`): a message to
/// one of them could never be delivered, however often it were retried.
///
/// ```
/// use outbox_kafka::check_topic_name;
/// assert!(check_topic_name("orders.v1").is_ok());
/// assert!(check_topic_name("orders v1").is_err());
/// let e = check_topic_name("__consumer_offsets").unwrap_err();
/// assert!(e.contains("internal"), "{e}");
/// ```
pub fn check_topic_name(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN || topic == "." || topic == ".." {
        return Err(format!(
            "topic {topic:?} is not 1 to {MAX_TOPIC_LEN} characters (other than . and ..)"
        ));
    }
    if let Some(c) = topic.chars().find(|c| !topic_char(*c)) {
        return Err(format!(
            "topic {topic:?}: character {c:?} is not allowed (accepted: ASCII letters, digits, '.', '_', '-')"
        ));
    }
    if topic.starts_with("__") {
        return Err(format!(
            "topic {topic:?} is internal to Kafka (names starting with \"__\", such as \
             __consumer_offsets, are kept for Kafka itself; accepted: a topic of your own)"
        ));
    }
    Ok(())
}

/// An admin client made from a broker configuration.
pub(crate) struct Admin {
    client: Arc<AdminClient<LogContext>>,
    timeout: Duration,
}

impl Admin {
    pub(crate) fn new(config: &BrokerConfig) -> Result<Self, Error> {
        let client = config
            .admin_config()
            .set_log_level(RDKafkaLogLevel::Warning)
            .create_with_context(LogContext::default())
            .map_err(|e| Error::Client(config.redact(&client_error_text(&e))))?;
        Ok(Self {
            client: Arc::new(client),
            timeout: config.get_write_timeout(),
        })
    }

    /// Creates the topics (replication factor: the broker's default); an
    /// existing topic counts as created. One result per topic.
    pub(crate) async fn create(
        &self,
        topics: &[String],
        partitions: i32,
    ) -> Vec<(String, Result<(), String>)> {
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1)))
            .collect();
        let options = AdminOptions::new()
            .request_timeout(Some(self.timeout))
            .operation_timeout(Some(self.timeout));
        match self.client.create_topics(new.iter(), &options).await {
            Err(e) => topics
                .iter()
                .map(|t| (t.clone(), Err(e.to_string())))
                .collect(),
            Ok(results) => results
                .into_iter()
                .map(|r| match r {
                    Ok(t) | Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                        tracing::info!(topic = %t, "kafka topic ready");
                        (t, Ok(()))
                    }
                    Err((t, code)) => (t, Err(code.to_string())),
                })
                .collect(),
        }
    }

    /// Waits until the broker's metadata shows `topic` with partitions that
    /// all have a leader.
    pub(crate) async fn wait_ready(&self, topic: &str) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout.max(Duration::from_secs(10));
        loop {
            let client = self.client.clone();
            let name = topic.to_owned();
            let metadata =
                tokio::task::spawn_blocking(move || {
                    let m = client
                        .inner()
                        .fetch_metadata(Some(&name), Duration::from_secs(2))
                        .map_err(|e| e.to_string())?;
                    Ok::<bool, String>(m.topics().iter().find(|t| t.name() == name).is_some_and(
                        |t| {
                            t.error().is_none()
                                && !t.partitions().is_empty()
                                && t.partitions().iter().all(|p| p.leader() >= 0)
                        },
                    ))
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            let ready = matches!(metadata, Ok(true));
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(match metadata {
                    Err(e) => format!("no metadata: {e}"),
                    Ok(_) => "created, but its partitions have no leader yet".to_owned(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Creates `topic` with `partitions` partitions (-1: the broker's
/// `num.partitions`; replication factor: the broker's default) unless it
/// exists, then waits until every partition has a leader, so that the first
/// message does not race the topic's creation. For examples, tests and
/// start-up code; the broker itself creates topics only with
/// [`BrokerConfig::create_topics`].
///
/// ```no_run
/// # async fn f() -> Result<(), outbox_kafka::Error> {
/// let config = outbox_kafka::BrokerConfig::from_env()?;
/// outbox_kafka::ensure_topic(&config, "orders.kafka", 3).await?;
/// # Ok(()) }
/// ```
pub async fn ensure_topic(
    config: &BrokerConfig,
    topic: &str,
    partitions: i32,
) -> Result<(), Error> {
    config.validate()?;
    let admin = Admin::new(config)?;
    let err = |message: String| Error::Topic {
        topic: topic.to_owned(),
        message: config.redact(&message),
    };
    for (_, result) in admin.create(&[topic.to_owned()], partitions).await {
        result.map_err(|e| err(format!("cannot create: {e}")))?;
    }
    admin.wait_ready(topic).await.map_err(err)
}
