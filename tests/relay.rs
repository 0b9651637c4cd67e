//! The stand-alone relay, run in-process against a real Kafka and a real
//! PostgreSQL: 10,000 rows forwarded with no user code (and the drain rate
//! printed), topic mapping, invalid topics, custom tables.
//!
//! Needs `scripts/services up`. `cargo test --test relay -- --nocapture` shows
//! the drain rate.

mod common;

use common::{consume_all, count, create_topic, header_value, kafka_brokers, unique_topic, TestDb};
use outbox::{Message, Outbox, Tables};
use outbox_kafka::relay::{run_relay, RelayConfig};
use rdkafka::message::Message as _;
use sqlx::PgPool;
use std::collections::HashSet;
use std::time::{Duration, Instant};

fn relay_config(db: &TestDb, vars: &[(&str, &str)]) -> RelayConfig {
    let mut all = vec![
        ("DATABASE_URL".to_owned(), db.url.clone()),
        ("KAFKA_BROKERS".to_owned(), kafka_brokers()),
        ("RELAY_EXIT_WHEN_IDLE".to_owned(), "true".to_owned()),
    ];
    all.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    RelayConfig::from_vars(all).expect("relay config")
}

async fn run_until_idle(config: RelayConfig, limit: Duration) -> Duration {
    let started = Instant::now();
    tokio::time::timeout(limit, run_relay(config, std::future::pending()))
        .await
        .unwrap_or_else(|_| panic!("the relay did not drain the outbox within {limit:?}"))
        .expect("relay");
    started.elapsed()
}

async fn publish_many(pool: &PgPool, outbox: &Outbox, queue: &str, n: usize) {
    let mut next = 0;
    while next < n {
        let end = (next + 2000).min(n);
        let msgs: Vec<Message> = (next..end)
            .map(|i| {
                Message::json(queue, &serde_json::json!({ "n": i }))
                    .unwrap()
                    .key(format!("key-{}", i % 16))
            })
            .collect();
        outbox.publish_batch(pool, msgs).await.unwrap();
        next = end;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_forwards_10000_rows_with_no_user_code() {
    const N: usize = 10_000;
    let db = TestDb::new().await;
    outbox::migrate(&db.pool, &Tables::default()).await.unwrap();
    let topic = unique_topic("relay-10k");
    create_topic(&topic, 3).await;
    publish_many(&db.pool, &Outbox::default(), "relay.orders", N).await;

    let map = format!("relay.orders:{topic}");
    let config = relay_config(&db, &[("TOPIC_MAP", &map), ("KAFKA_ACKS", "all")]);
    let took = run_until_idle(config, Duration::from_secs(300)).await;
    let rate = N as f64 / took.as_secs_f64();
    println!(
        "relay drained {N} rows (acks=all, idempotent, batch 500, 2 workers) in {:.2} s: {rate:.0} msgs/s",
        took.as_secs_f64()
    );
    assert_eq!(count(&db.pool, "select count(*) from outbox").await, 0);
    assert_eq!(count(&db.pool, "select count(*) from outbox_dlq").await, 0);

    let got = consume_all(&topic, N, Duration::from_secs(120)).await;
    assert_eq!(got.len(), N);
    let ids: HashSet<&[u8]> = got
        .iter()
        .map(|m| header_value(m, "outbox-id").expect("outbox-id"))
        .collect();
    assert_eq!(ids.len(), N, "every row exactly once");
    let keyed = got
        .iter()
        .filter(|m| m.key().is_some_and(|k| k.starts_with(b"key-")))
        .count();
    assert_eq!(keyed, N, "the partition key is the message key");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_maps_queues_to_topics_and_parks_invalid_ones() {
    let db = TestDb::new().await;
    let tables = Tables::new("outbox", None).unwrap();
    outbox::migrate(&db.pool, &tables).await.unwrap();
    let prefix = format!("{}.", unique_topic("relay-prefix"));
    let mapped = unique_topic("relay-mapped");
    for t in [format!("{prefix}payments"), mapped.clone()] {
        create_topic(&t, 1).await;
    }
    let outbox = Outbox::default();
    publish_many(&db.pool, &outbox, "payments", 20).await;
    publish_many(&db.pool, &outbox, "orders", 30).await;
    publish_many(&db.pool, &outbox, "not a topic!", 2).await;

    let map = format!("orders:{mapped}");
    let config = relay_config(
        &db,
        &[
            ("TOPIC_MAP", &map),
            ("TOPIC_PREFIX", &prefix),
            ("DLQ_TABLE", "none"),
        ],
    );
    run_until_idle(config, Duration::from_secs(120)).await;

    assert_eq!(
        consume_all(&format!("{prefix}payments"), 20, Duration::from_secs(60))
            .await
            .len(),
        20
    );
    assert_eq!(
        consume_all(&mapped, 30, Duration::from_secs(60))
            .await
            .len(),
        30
    );
    let parked: Vec<(String, String, String)> = sqlx::query_as(
        "select queue, failure_reason, last_error from outbox where parked_at is not null",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(parked.len(), 2, "{parked:?}");
    for (queue, reason, error) in &parked {
        assert_eq!(queue, "not a topic!");
        assert_eq!(reason, "rejected");
        assert!(error.contains("TOPIC_MAP"), "{error}");
    }
    assert_eq!(count(&db.pool, "select count(*) from outbox").await, 2);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_migrates_and_uses_custom_tables() {
    let db = TestDb::new().await;
    let topic = unique_topic("relay-custom");
    create_topic(&topic, 1).await;
    let vars = [
        ("OUTBOX_TABLE", "relay_outbox"),
        ("DLQ_TABLE", "relay_dlq"),
        ("RELAY_MIGRATE", "true"),
        ("TOPIC_PREFIX", ""),
    ];
    // First run: creates the tables, finds nothing, exits.
    run_until_idle(relay_config(&db, &vars), Duration::from_secs(60)).await;
    let tables = Tables::new("relay_outbox", Some("relay_dlq")).unwrap();
    let outbox = Outbox::new(tables);
    publish_many(&db.pool, &outbox, &topic, 50).await;
    run_until_idle(relay_config(&db, &vars), Duration::from_secs(60)).await;
    assert_eq!(
        count(&db.pool, "select count(*) from relay_outbox").await,
        0
    );
    assert_eq!(count(&db.pool, "select count(*) from relay_dlq").await, 0);
    assert_eq!(
        consume_all(&topic, 50, Duration::from_secs(60)).await.len(),
        50
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_reports_a_missing_table() {
    let db = TestDb::new().await;
    let err = run_relay(relay_config(&db, &[]), std::future::pending())
        .await
        .unwrap_err();
    assert!(!err.is_config());
    assert!(err.to_string().contains("does not exist"), "{err}");
    db.drop_db().await;
}
