//! Helpers shared by the integration tests in `tests/`: where the services are, a
//! fresh PostgreSQL database per test, and Kafka topics and consumers.
//!
//! The tests run against real services. Start them with `scripts/services up` (or
//! `docker compose up -d`); `DATABASE_URL` and `KAFKA_BROKERS` override the defaults,
//! which are the same as in `scripts/env.sh`.
//!
//! Use from a test file with `mod common;`. Each test file compiles this module on its
//! own and uses only part of it, hence the `allow`s.
#![allow(dead_code, unreachable_pub)]

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Message, OwnedMessage};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::Connection;

/// Default of `DATABASE_URL` (same as `scripts/env.sh`).
pub const DEFAULT_DATABASE_URL: &str = "postgres://outbox:outbox@127.0.0.1:5432/outbox";
/// Default of `KAFKA_BROKERS` (same as `scripts/env.sh`).
pub const DEFAULT_KAFKA_BROKERS: &str = "127.0.0.1:9092";

/// Connections of each test database's pool. Tests run in parallel, each with its
/// own pool; `scripts/services` raises PostgreSQL's `max_connections` to 300.
const TEST_POOL_SIZE: u32 = 5;

/// The admin database URL: `DATABASE_URL`, or the local default. Its role must have
/// `CREATEDB`, since every [`TestDb`] creates and drops a database of its own.
pub fn database_url() -> String {
    env_or("DATABASE_URL", DEFAULT_DATABASE_URL)
}

/// The Kafka bootstrap servers: `KAFKA_BROKERS`, or the local default.
pub fn kafka_brokers() -> String {
    env_or("KAFKA_BROKERS", DEFAULT_KAFKA_BROKERS)
}

fn env_or(name: &str, default: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value,
        _ => default.to_owned(),
    }
}

/// `url` with its database (the last path segment) replaced by `database`; the query
/// string, if any, is kept.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    format!("{base}/{database}{query}")
}

/// A fresh, uniquely named database, so that parallel tests never see each other's
/// rows. Call [`TestDb::drop_db`] at the end of the test; if the test panics first,
/// `Drop` removes the database on a helper thread (best effort).
pub struct TestDb {
    /// A pool connected to the fresh database.
    pub pool: PgPool,
    /// The URL of the fresh database (the admin URL with the database name replaced).
    pub url: String,
    /// Empty once the database has been dropped.
    name: String,
}

impl TestDb {
    /// Creates `outbox_test_<uuid>` through the admin URL ([`database_url`]) and
    /// connects a small pool to it. Panics with the reason when the database cannot
    /// be created (for example when PostgreSQL is not running).
    pub async fn new() -> TestDb {
        let admin_url = database_url();
        let name = format!("outbox_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!(
                "cannot connect to PostgreSQL at {} ({e}); start it with `scripts/services up`",
                redact(&admin_url)
            )
        });
        sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} failed: {e}"));
        // Best effort: the database exists either way.
        let _ = admin.close().await;

        let url = with_database(&admin_url, &name);
        let pool = match PgPoolOptions::new()
            .max_connections(TEST_POOL_SIZE)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&url)
            .await
        {
            Ok(pool) => pool,
            Err(e) => {
                drop_database_blocking(admin_url, name.clone());
                panic!("cannot connect to the test database {name}: {e}");
            }
        };
        TestDb { pool, url, name }
    }

    /// The name of the database (`outbox_test_<uuid>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the pool and drops the database (`WITH (FORCE)`: connections that are
    /// still open elsewhere are terminated).
    pub async fn drop_db(mut self) {
        let name = std::mem::take(&mut self.name);
        self.pool.close().await;
        drop_database(&database_url(), &name)
            .await
            .unwrap_or_else(|e| panic!("DROP DATABASE {name} failed: {e}"));
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        // drop_db was not called (the test panicked, or forgot): drop the database
        // from a thread with its own runtime, because Drop cannot await and may run
        // inside (or outside) the test's runtime.
        drop_database_blocking(database_url(), std::mem::take(&mut self.name));
    }
}

async fn drop_database(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    let mut admin = PgConnection::connect(admin_url).await?;
    // WITH (FORCE) may not terminate an autovacuum worker that just started on
    // the database ("must be a member of ... pg_signal_backend"); it is gone a
    // moment later, so try again.
    let mut tries = 0;
    loop {
        tries += 1;
        // A database with a replication slot cannot be dropped: end the
        // slot's reader, then drop the slot (log-capture tests).
        let _ = sqlx::query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE database = $1 AND active_pid IS NOT NULL",
        )
        .bind(name)
        .execute(&mut admin)
        .await;
        let _ = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE database = $1 AND NOT active",
        )
        .bind(name)
        .execute(&mut admin)
        .await;
        match sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
            .execute(&mut admin)
            .await
        {
            Ok(_) => break,
            Err(e) if tries < 20 => {
                eprintln!("TestDb: DROP DATABASE {name} failed ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    }
    admin.close().await
}

fn drop_database_blocking(admin_url: String, name: String) {
    let worker = std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("TestDb: cannot drop {name}: no runtime: {e}");
                return;
            }
        };
        let dropped = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), drop_database(&admin_url, &name)).await
        });
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("TestDb: cannot drop {name}: {e}"),
            Err(_) => eprintln!("TestDb: dropping {name} timed out"),
        }
    });
    let _ = worker.join();
}

/// `url` without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A topic name no other test uses: `<prefix>-<uuid>`.
pub fn unique_topic(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Client settings every test client starts from.
pub fn kafka_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", kafka_brokers());
    config
}

/// Creates `name` with `partitions` partitions (replication factor 1) and waits until
/// the broker's metadata shows all of them. An existing topic is fine.
pub async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = kafka_config()
        .create()
        .expect("cannot create a Kafka admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(20)))
        .request_timeout(Some(Duration::from_secs(20)));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot create topic {name} on {} ({e}); start Kafka with `scripts/services up`",
                kafka_brokers()
            )
        });
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => panic!("cannot create topic {topic}: {code}"),
        }
    }

    // CreateTopics returns once the controller has the topic; wait for the broker's
    // metadata so that the first produce does not race it.
    let name = name.to_owned();
    let expected = usize::try_from(partitions).unwrap_or(0);
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = admin
                .inner()
                .fetch_metadata(Some(&name), Duration::from_secs(5))
                .ok()
                .and_then(|metadata| {
                    metadata
                        .topics()
                        .iter()
                        .find(|t| t.name() == name)
                        .map(|t| {
                            t.error().is_none()
                                && t.partitions().len() == expected
                                && t.partitions().iter().all(|p| p.leader() >= 0)
                        })
                })
                .unwrap_or(false);
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "topic {name} has no leader for all {expected} partitions after 20 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .expect("metadata wait panicked");
}

/// Reads every partition of `topic` from the beginning until `expected`
/// messages arrived or `timeout` passed, and returns what arrived (the caller
/// asserts the count). The partitions are assigned, not subscribed: no
/// consumer group forms, so a busy group coordinator cannot hold the read
/// back. Consumer errors before the deadline are retried.
pub async fn consume_all(topic: &str, expected: usize, timeout: Duration) -> Vec<OwnedMessage> {
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: StreamConsumer = kafka_config()
        .set("group.id", unique_topic("outbox-test-group"))
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("cannot create a Kafka consumer");
    let name = topic.to_owned();
    let partitions = tokio::task::spawn_blocking(move || {
        let meta_client: rdkafka::consumer::BaseConsumer = kafka_config()
            .create()
            .expect("cannot create a Kafka metadata client");
        let meta = meta_client
            .fetch_metadata(Some(&name), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("no metadata for {name}: {e}"));
        meta.topics()
            .iter()
            .find(|t| t.name() == name)
            .map_or(0, |t| t.partitions().len())
    })
    .await
    .expect("metadata task");
    assert!(partitions > 0, "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
            .expect("partition");
    }
    consumer
        .assign(&tpl)
        .unwrap_or_else(|e| panic!("cannot assign {topic}: {e}"));

    let deadline = tokio::time::Instant::now() + timeout;
    let mut messages = Vec::with_capacity(expected);
    while messages.len() < expected {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Err(_elapsed) => break,
            Ok(Ok(message)) => messages.push(message.detach()),
            Ok(Err(e)) => {
                eprintln!("consume_all({topic}): {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    messages
}

/// The value of the first header called `key`, if any.
pub fn header_value<'a>(message: &'a OwnedMessage, key: &str) -> Option<&'a [u8]> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    headers
        .iter()
        .find(|header| header.key == key)
        .and_then(|header| header.value)
}

/// The single `i64` a query returns (`count(*)`, say); panics with the query
/// and the error otherwise.
pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Waits, at most `timeout`, until `check` holds; panics naming `what` otherwise.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < timeout, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh database ([`TestDb::new`]) with the default outbox and dead-letter
/// tables, and test logging (`RUST_LOG`, else `default_filter`) set up once.
pub async fn migrated(default_filter: &str) -> TestDb {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_test_writer()
        .try_init();
    let db = TestDb::new().await;
    outbox::migrate(&db.pool, &outbox::Tables::default())
        .await
        .expect("migrate");
    db
}

/// `sub` polling every 10 to 50 ms, so that tests do not wait for wake-ups.
pub fn fast(sub: outbox::Subscriber) -> outbox::Subscriber {
    sub.poll_interval(Duration::from_millis(10), Duration::from_millis(50))
}
