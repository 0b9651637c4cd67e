//! The Kafka broker against a real Kafka and a real PostgreSQL: key and header
//! mapping, a batch of 1,000 rows, unknown topics, oversize messages,
//! compression codecs, asynchronous mode, topic creation, and transactions.
//!
//! Needs `scripts/services up`. Every test uses its own database and topics.

mod common;

use common::{consume_all, create_topic, header_value, kafka_brokers, unique_topic, TestDb};
use futures::StreamExt;
use outbox::{App, ExponentialRetry, Message, Outgoing, Output, Sink, Subscriber, Tables};
use outbox_kafka::{Broker, BrokerConfig, Compression};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message as _, OwnedMessage};
use sqlx::PgPool;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn config() -> BrokerConfig {
    BrokerConfig::new(&kafka_brokers())
}

fn outgoing(topic: &str, key: Option<&str>, payload: &[u8]) -> Outgoing {
    Outgoing {
        sink: "kafka".into(),
        topic: topic.into(),
        key: key.map(|k| k.as_bytes().to_vec()),
        payload: payload.to_vec(),
        headers: vec![("h1".into(), b"v1".to_vec())],
    }
}

/// A subscriber that forwards the rows of `queue` to `topic` unchanged.
fn forwarder(queue: &str, topic: &str) -> Subscriber {
    let topic = topic.to_owned();
    Subscriber::new(
        format!("forward-{queue}"),
        move |env: Arc<outbox::Envelope>, _ctx| {
            let topic = topic.clone();
            async move { Ok(Output::none().publish("kafka", &topic, None, env.payload.clone())) }
        },
    )
    .queue(queue)
    .dlq("outbox_dlq")
}

async fn migrated_db() -> TestDb {
    let db = TestDb::new().await;
    outbox::migrate(&db.pool, &Tables::default())
        .await
        .expect("migrate");
    db
}

async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Polls `sql` (a count) until it returns `want`, or panics after `timeout`.
async fn wait_count(pool: &PgPool, sql: &str, want: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let n = scalar(pool, sql).await;
        if n == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql} is {n}, expected {want} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn header(m: &OwnedMessage, name: &str) -> String {
    String::from_utf8_lossy(header_value(m, name).unwrap_or_else(|| panic!("no header {name}")))
        .into_owned()
}

fn topic_exists(topic: &str) -> bool {
    let consumer: rdkafka::consumer::BaseConsumer =
        common::kafka_config().create().expect("metadata client");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    metadata
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_maps_key_headers_and_payload() {
    let topic = unique_topic("kafka-map");
    create_topic(&topic, 1).await;
    let broker = Broker::new(config()).unwrap();
    let results = broker
        .send(vec![
            outgoing(&topic, Some("k-1"), b"{\"n\":1}"),
            outgoing(&topic, None, b"\x00\x01binary"),
        ])
        .await;
    assert_eq!(results, vec![Ok(()), Ok(())]);
    let got = consume_all(&topic, 2, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2);
    let first = got.iter().find(|m| m.key() == Some(b"k-1")).expect("keyed");
    assert_eq!(first.payload(), Some(&b"{\"n\":1}"[..]));
    assert_eq!(header(first, "h1"), "v1");
    let second = got.iter().find(|m| m.key().is_none()).expect("unkeyed");
    assert_eq!(second.payload(), Some(&b"\x00\x01binary"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_keep_key_headers_and_metadata_on_kafka() {
    let db = migrated_db().await;
    let topic = unique_topic("kafka-rows");
    create_topic(&topic, 3).await;

    let mut tx = db.pool.begin().await.unwrap();
    let id = Message::json("orders", &serde_json::json!({"id": 7}))
        .unwrap()
        .key("customer-7")
        .header("source", "checkout")
        .correlation_id("corr-1")
        .publish(&mut *tx)
        .await
        .unwrap()
        .unwrap();
    tx.commit().await.unwrap();

    let running = App::manual(db.pool.clone())
        .register(forwarder("orders", &topic))
        .broker(Broker::new(config()).unwrap())
        .start()
        .await
        .unwrap();
    wait_count(
        &db.pool,
        "select count(*) from outbox",
        0,
        Duration::from_secs(60),
    )
    .await;
    running.shutdown().await;

    let got = consume_all(&topic, 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.key(), Some(&b"customer-7"[..]));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(m.payload().unwrap()).unwrap(),
        serde_json::json!({"id": 7})
    );
    assert_eq!(header(m, "source"), "checkout");
    assert_eq!(header(m, "outbox-id"), id.to_string());
    assert_eq!(header(m, "outbox-queue"), "orders");
    assert_eq!(header(m, "outbox-attempt"), "1");
    assert_eq!(header(m, "outbox-correlation-id"), "corr-1");
    let created: i64 = header(m, "outbox-created-at").parse().unwrap();
    assert!(
        created > 1_600_000_000_000,
        "created-at {created} is ms since the epoch"
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_1000_rows_is_relayed() {
    let db = migrated_db().await;
    let topic = unique_topic("kafka-1000");
    create_topic(&topic, 3).await;
    let msgs: Vec<Message> = (0..1000)
        .map(|i| {
            Message::json("bulk", &i)
                .unwrap()
                .key(format!("k{}", i % 10))
        })
        .collect();
    outbox::Outbox::default()
        .publish_batch(&db.pool, msgs)
        .await
        .unwrap();

    let started = Instant::now();
    let running = App::manual(db.pool.clone())
        .register(forwarder("bulk", &topic).batch_size(500).concurrency(500))
        .broker(Broker::new(config()).unwrap())
        .start()
        .await
        .unwrap();
    wait_count(
        &db.pool,
        "select count(*) from outbox",
        0,
        Duration::from_secs(120),
    )
    .await;
    let took = started.elapsed();
    running.shutdown().await;
    println!("1000 rows relayed in {took:?}");

    let got = consume_all(&topic, 1000, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 1000);
    let ids: HashSet<String> = got.iter().map(|m| header(m, "outbox-id")).collect();
    assert_eq!(ids.len(), 1000, "every row exactly once");
    assert_eq!(scalar(&db.pool, "select count(*) from outbox_dlq").await, 0);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topic_fails_within_the_write_timeout() {
    let topic = unique_topic("kafka-missing");
    let broker = Broker::new(config().write_timeout(Duration::from_secs(2))).unwrap();
    let started = Instant::now();
    let results = broker
        .send(vec![
            outgoing(&topic, None, b"1"),
            outgoing(&topic, Some("k"), b"2"),
        ])
        .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "took {took:?}");
    for r in &results {
        let e = r.as_ref().unwrap_err();
        assert!(!e.permanent, "{e:?}");
        assert!(e.message.contains(&topic), "{}", e.message);
    }
    println!(
        "unknown topic: {took:?}: {}",
        results[0].as_ref().unwrap_err()
    );
    assert!(!topic_exists(&topic), "the topic must not be auto-created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_for_an_unknown_topic_are_nacked_and_not_lost() {
    let db = migrated_db().await;
    let topic = unique_topic("kafka-later");
    for i in 0..5 {
        outbox::publish(&db.pool, "later", &i).await.unwrap();
    }
    let broker = Broker::new(config().write_timeout(Duration::from_secs(3))).unwrap();
    let sub = forwarder("later", &topic).retry(
        ExponentialRetry::default()
            .initial(Duration::from_secs(3600))
            .max_delay(Duration::from_secs(3600)),
    );
    let running = App::manual(db.pool.clone())
        .register(sub)
        .broker(broker.clone())
        .start()
        .await
        .unwrap();
    wait_count(
        &db.pool,
        "select count(*) from outbox where attempts = 1 and lease_token is null",
        5,
        Duration::from_secs(60),
    )
    .await;
    running.shutdown().await;
    assert_eq!(scalar(&db.pool, "select count(*) from outbox").await, 5);
    assert_eq!(scalar(&db.pool, "select count(*) from outbox_dlq").await, 0);
    let error: String = sqlx::query_scalar("select last_error from outbox limit 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    println!("last_error: {error}");
    assert!(error.contains(&topic), "{error}");
    assert!(!topic_exists(&topic), "the topic must not be auto-created");

    // Once the topic exists, the same rows go through.
    create_topic(&topic, 1).await;
    sqlx::query("update outbox set next_attempt_at = now()")
        .execute(&db.pool)
        .await
        .unwrap();
    let running = App::manual(db.pool.clone())
        .register(forwarder("later", &topic))
        .broker(broker)
        .start()
        .await
        .unwrap();
    wait_count(
        &db.pool,
        "select count(*) from outbox",
        0,
        Duration::from_secs(60),
    )
    .await;
    running.shutdown().await;
    let got = consume_all(&topic, 5, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 5);
    db.drop_db().await;
}

/// Random bytes, so that no codec could shrink them under a limit.
fn incompressible(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn oversize_is_dead_lettered(broker: Broker, label: &str) {
    let db = migrated_db().await;
    let topic = unique_topic("kafka-big");
    create_topic(&topic, 1).await;
    let big = outbox::Message::bytes("big", incompressible(2_000_000));
    let small = outbox::Message::bytes("big", b"small".to_vec());
    outbox::Outbox::default()
        .publish_batch(&db.pool, vec![big, small])
        .await
        .unwrap();
    let running = App::manual(db.pool.clone())
        .register(forwarder("big", &topic))
        .broker(broker)
        .start()
        .await
        .unwrap();
    wait_count(
        &db.pool,
        "select count(*) from outbox",
        0,
        Duration::from_secs(60),
    )
    .await;
    running.shutdown().await;
    let (reason, error, len): (String, String, i32) =
        sqlx::query_as("select failure_reason, last_error, octet_length(payload) from outbox_dlq")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    println!("{label}: {reason}: {error}");
    assert_eq!(reason, "publish_rejected");
    assert_eq!(len, 2_000_000);
    assert!(error.contains("too large"), "{error}");
    let got = consume_all(&topic, 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload(), Some(&b"small"[..]));
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_message_refused_by_the_client_is_dead_lettered() {
    // librdkafka's own message.max.bytes (1,000,000) refuses it at once.
    oversize_is_dead_lettered(Broker::new(config()).unwrap(), "client limit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_message_refused_by_the_broker_is_dead_lettered() {
    // The client lets it through; the broker's message.max.bytes (1 MB) refuses it.
    let broker = Broker::new(config().set("message.max.bytes", "10000000")).unwrap();
    oversize_is_dead_lettered(broker, "broker limit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compression_codec_delivers() {
    let topic = unique_topic("kafka-codecs");
    create_topic(&topic, 1).await;
    let codecs = [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ];
    for codec in codecs {
        let broker = Broker::new(
            config()
                .compression(codec)
                .linger(Duration::from_millis(5))
                .batch_size(1000),
        )
        .unwrap_or_else(|e| panic!("{codec:?}: {e}"));
        let payload = format!("{codec:?} {}", "x".repeat(1000));
        let results = broker
            .send(vec![outgoing(&topic, None, payload.as_bytes())])
            .await;
        assert_eq!(results, vec![Ok(())], "{codec:?}");
    }
    let got = consume_all(&topic, codecs.len(), Duration::from_secs(30)).await;
    assert_eq!(got.len(), codecs.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asynchronous_mode_delivers_after_flush() {
    let topic = unique_topic("kafka-async");
    create_topic(&topic, 1).await;
    let broker = Broker::new(config().asynchronous(true)).unwrap();
    let batch: Vec<Outgoing> = (0..200)
        .map(|i| outgoing(&topic, None, format!("{i}").as_bytes()))
        .collect();
    let results = broker.send(batch).await;
    assert!(results.iter().all(|r| r.is_ok()));
    broker.flush(Duration::from_secs(30)).await;
    let got = consume_all(&topic, 200, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 200);
    assert_eq!(broker.async_failures(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_are_created_when_asked() {
    let topic = unique_topic("kafka-create");
    let broker = Broker::new(config().create_topics(true).topic_partitions(2)).unwrap();
    let results = broker
        .send(vec![
            outgoing(&topic, None, b"a"),
            outgoing(&topic, None, b"b"),
        ])
        .await;
    assert_eq!(results, vec![Ok(()), Ok(())]);
    assert!(topic_exists(&topic));
    let got = consume_all(&topic, 2, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_topic_creates_once() {
    let topic = unique_topic("kafka-ensure");
    outbox_kafka::ensure_topic(&config(), &topic, 2)
        .await
        .unwrap();
    outbox_kafka::ensure_topic(&config(), &topic, 2)
        .await
        .unwrap();
    assert!(topic_exists(&topic));
}

/// Every message on `topic` as a consumer with the given isolation level sees
/// it, reading until `quiet` passes without a new message.
async fn read_topic(topic: &str, isolation: &str, quiet: Duration) -> Vec<OwnedMessage> {
    let consumer: StreamConsumer = common::kafka_config()
        .set("group.id", unique_topic("kafka-txn-group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut stream = consumer.stream();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut wait = Duration::from_secs(15); // the first fetch includes the group join
    while Instant::now() < deadline {
        match tokio::time::timeout(wait, stream.next()).await {
            Ok(Some(Ok(m))) => {
                out.push(m.detach());
                wait = quiet;
            }
            Ok(Some(Err(e))) => eprintln!("consumer: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transaction_is_invisible_to_read_committed_consumers() {
    let topic = unique_topic("kafka-txn");
    create_topic(&topic, 1).await;
    let broker = Broker::new(
        config()
            .transactional(unique_topic("outbox-test-txn"))
            .write_timeout(Duration::from_secs(10)),
    )
    .unwrap();

    // The last message is too large: the whole batch is aborted.
    let results = broker
        .send(vec![
            outgoing(&topic, None, b"aborted-1"),
            outgoing(&topic, None, b"aborted-2"),
            outgoing(&topic, None, &incompressible(2_000_000)),
        ])
        .await;
    assert!(!results[0].as_ref().unwrap_err().permanent);
    assert!(!results[1].as_ref().unwrap_err().permanent);
    assert!(results[2].as_ref().unwrap_err().permanent);
    println!("aborted: {}", results[0].as_ref().unwrap_err());

    let results = broker
        .send(vec![
            outgoing(&topic, None, b"committed-1"),
            outgoing(&topic, None, b"committed-2"),
        ])
        .await;
    assert_eq!(results, vec![Ok(()), Ok(())]);

    let committed = read_topic(&topic, "read_committed", Duration::from_secs(3)).await;
    let payloads: Vec<&[u8]> = committed.iter().filter_map(|m| m.payload()).collect();
    assert_eq!(payloads, vec![&b"committed-1"[..], &b"committed-2"[..]]);

    let uncommitted = read_topic(&topic, "read_uncommitted", Duration::from_secs(3)).await;
    println!(
        "read_uncommitted sees {} messages (aborted ones written before the abort included)",
        uncommitted.len()
    );
    assert!(uncommitted.len() >= 2);
    broker.flush(Duration::from_secs(10)).await;
}
