//! Smoke tests of the test environment itself: PostgreSQL and Kafka are reachable
//! where `scripts/env.sh` says, a test gets a database of its own, and a message
//! produced with `acks=all` comes back to a new consumer group with its key, payload
//! and headers. When these fail, fix the services (`scripts/services status`) before
//! looking at any other test.

mod common;

use std::time::Duration;

use common::{consume_all, create_topic, header_value, kafka_config, unique_topic, TestDb};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::PgConnection;
use sqlx::Connection;

async fn database_exists(name: &str) -> bool {
    let mut admin = PgConnection::connect(&common::database_url())
        .await
        .expect("connect to the admin database");
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut admin)
            .await
            .expect("query pg_database");
    admin.close().await.expect("close the admin connection");
    exists
}

#[tokio::test]
async fn postgres_round_trip_on_a_fresh_database() {
    let db = TestDb::new().await;
    assert!(db.name().starts_with("outbox_test_"), "{}", db.name());
    assert!(db.url.ends_with(db.name()), "{}", db.url);

    let sum: i32 = sqlx::query_scalar("SELECT 1 + $1")
        .bind(41_i32)
        .fetch_one(&db.pool)
        .await
        .expect("select 1 + $1");
    assert_eq!(sum, 42);

    // The pool is connected to the fresh database, not to the admin one.
    let current: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&db.pool)
        .await
        .expect("select current_database()");
    assert_eq!(current, db.name());

    // Tests create and drop tables freely in their own database.
    sqlx::query("CREATE TABLE smoke (id bigserial PRIMARY KEY, body text NOT NULL)")
        .execute(&db.pool)
        .await
        .expect("create table");
    sqlx::query("INSERT INTO smoke (body) VALUES ($1), ($2)")
        .bind("a")
        .bind("b")
        .execute(&db.pool)
        .await
        .expect("insert");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM smoke")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(rows, 2);

    let name = db.name().to_owned();
    assert!(database_exists(&name).await);
    db.drop_db().await;
    assert!(!database_exists(&name).await, "drop_db left {name} behind");
}

#[tokio::test]
async fn test_db_is_dropped_even_without_drop_db() {
    let db = TestDb::new().await;
    let name = db.name().to_owned();
    // Keep a connection busy: the cleanup must drop the database anyway (FORCE).
    let mut held = db.pool.acquire().await.expect("acquire a connection");
    sqlx::query("SELECT 1")
        .execute(&mut *held)
        .await
        .expect("select 1");
    assert!(database_exists(&name).await);

    drop(held);
    drop(db); // what happens when a test panics before drop_db

    assert!(!database_exists(&name).await, "Drop left {name} behind");
}

#[tokio::test]
async fn kafka_produce_with_acks_all_and_consume_with_a_new_group() {
    let topic = unique_topic("smoke");
    create_topic(&topic, 3).await;

    let producer: FutureProducer = kafka_config()
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("create producer");
    let payload = format!(r#"{{"order_id":"{}"}}"#, uuid::Uuid::new_v4());
    let headers = OwnedHeaders::new().insert(Header {
        key: "outbox-message-id",
        value: Some("42"),
    });
    let delivery = producer
        .send(
            FutureRecord::to(&topic)
                .key("order-7")
                .payload(&payload)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("produce to {topic} failed: {e}"));
    assert!((0..3).contains(&delivery.partition), "{delivery:?}");
    assert!(delivery.offset >= 0, "{delivery:?}");

    let messages = consume_all(&topic, 1, Duration::from_secs(60)).await;
    assert_eq!(
        messages.len(),
        1,
        "expected the produced message on {topic}"
    );
    let message = &messages[0];
    assert_eq!(message.topic(), topic);
    assert_eq!(message.partition(), delivery.partition);
    assert_eq!(message.offset(), delivery.offset);
    assert_eq!(message.key(), Some("order-7".as_bytes()));
    assert_eq!(message.payload(), Some(payload.as_bytes()));
    assert_eq!(
        header_value(message, "outbox-message-id"),
        Some("42".as_bytes())
    );
}
