//! Code of the book's chapter "Testing your handlers"; scripts/book-test type-checks it.
#![allow(dead_code)]

use futures::future::BoxFuture;
use outbox::{
    App, Context, Envelope, HandlerError, Meta, Outgoing, Output, Sink, SinkError, State, Tables,
};
use outbox_kafka as kafka;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{Connection, PgConnection};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ANCHOR: handler
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Order {
    id: i64,
    total_cents: i64,
}

#[derive(Clone)]
struct Limits {
    max_cents: i64,
}

#[kafka::publisher("orders.checked")]
#[outbox::subscriber("orders")]
async fn check(order: Order, limits: State<Limits>, meta: Meta) -> Result<i64, HandlerError> {
    if order.total_cents > limits.0.max_cents {
        return Err(HandlerError::reject(format!(
            "order {} (row {}) is over the limit",
            order.id, meta.id
        )));
    }
    Ok(order.id)
}
// ANCHOR_END: handler

// ANCHOR: tests
#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta::from(&Envelope::new(1, "orders", Vec::new()))
    }

    #[tokio::test]
    async fn accepts_small_orders() {
        let order = Order { id: 7, total_cents: 500 };
        let got = check(order, State(Limits { max_cents: 1000 }), meta()).await;
        assert_eq!(got.unwrap(), 7);
    }

    #[tokio::test]
    async fn rejects_large_orders_without_retries() {
        let order = Order { id: 8, total_cents: 5000 };
        let err = check(order, State(Limits { max_cents: 1000 }), meta())
            .await
            .unwrap_err();
        assert!(!err.is_transient(), "a rejected order must not be retried");
    }

    #[test]
    fn the_published_json_decodes() {
        let env = Envelope::new(1, "orders", br#"{"id":7,"total_cents":500}"#.to_vec())
            .with_key("customer-1")
            .with_header("source", "test");
        let order: Order = env.json().unwrap();
        assert_eq!(order, Order { id: 7, total_cents: 500 });
    }
}
// ANCHOR_END: tests

// ANCHOR: plain
/// A handler written with the plain API, registered with
/// `App::register(Subscriber::new("audit", audit).queue("audit"))`.
async fn audit(env: Arc<Envelope>, ctx: Context) -> Result<Output, HandlerError> {
    let limits = ctx.state::<Limits>().ok_or_else(|| HandlerError::transient("no limits"))?;
    if env.payload.len() as i64 > limits.max_cents {
        return Err(HandlerError::reject("payload too large"));
    }
    Ok(Output::none())
}

#[tokio::test]
async fn audit_refuses_large_payloads() {
    let env = Arc::new(Envelope::new(1, "audit", vec![0; 100]));
    let ctx = Context::for_tests().with_state(Limits { max_cents: 10 });
    let err = audit(env, ctx).await.unwrap_err();
    assert!(!err.is_transient());
}
// ANCHOR_END: plain

fn registered() -> outbox::Subscriber {
    outbox::Subscriber::new("audit", audit).queue("audit")
}

// ANCHOR: validate
#[tokio::test]
async fn the_handlers_of_this_binary_fit_together() {
    // The settings the attribute produced.
    let sub = check::subscriber();
    assert_eq!(sub.name(), "check");
    assert_eq!(sub.publishers()[0].topic, "orders.checked");

    // The whole set, as App::start would check it: one handler per queue, a
    // broker for every publisher, valid settings. A lazy pool never connects.
    let pool = PgPool::connect_lazy("postgres://outbox:outbox@127.0.0.1:5432/outbox").unwrap();
    App::new(pool).broker(Recorder::default()).validate().unwrap();
}
// ANCHOR_END: validate

// ANCHOR: recorder
/// Stands in for Kafka: keeps what the runtime would have sent.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Outgoing>>>);

impl Sink for Recorder {
    fn name(&self) -> &str {
        "kafka" // the broker #[kafka::publisher] sends to
    }

    fn send(&self, batch: Vec<Outgoing>) -> BoxFuture<'_, Vec<Result<(), SinkError>>> {
        let n = batch.len();
        self.0.lock().unwrap().extend(batch);
        Box::pin(async move { vec![Ok(()); n] })
    }
}
// ANCHOR_END: recorder

// ANCHOR: testdb
/// A database of its own for one test, so tests can run in parallel.
struct TestDb {
    pool: PgPool,
    admin: PgConnectOptions,
    name: String,
}

impl TestDb {
    /// Creates `outbox_test_<uuid>` and its outbox tables. `None` when no
    /// PostgreSQL answers at DATABASE_URL (the test then skips).
    async fn new() -> Option<TestDb> {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://outbox:outbox@127.0.0.1:5432/outbox".into());
        let admin: PgConnectOptions = url.parse().expect("DATABASE_URL is a PostgreSQL URL");
        let mut conn = match PgConnection::connect_with(&admin).await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("skipped: no PostgreSQL ({e}); start it with scripts/services up");
                return None;
            }
        };
        let name = format!("outbox_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
            .execute(&mut conn)
            .await
            .unwrap();
        let pool = PgPool::connect_with(admin.clone().database(&name)).await.unwrap();
        outbox::migrate(&pool, &Tables::default()).await.unwrap();
        Some(TestDb { pool, admin, name })
    }

    async fn drop_db(self) {
        self.pool.close().await;
        let mut conn = PgConnection::connect_with(&self.admin).await.unwrap();
        let name = &self.name;
        sqlx::query(&format!(r#"DROP DATABASE "{name}" WITH (FORCE)"#))
            .execute(&mut conn)
            .await
            .unwrap();
    }
}
// ANCHOR_END: testdb

// ANCHOR: integration
#[tokio::test]
async fn orders_are_checked_published_or_dead_lettered() {
    let Some(db) = TestDb::new().await else { return };
    let pool = db.pool.clone();

    let mut tx = pool.begin().await.unwrap();
    let small = outbox::publish(&mut *tx, "orders", &Order { id: 1, total_cents: 500 })
        .await
        .unwrap();
    outbox::publish(&mut *tx, "orders", &Order { id: 2, total_cents: 5000 })
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let kafka = Recorder::default();
    let running = App::manual(pool.clone())
        .subscriber(check)
        .state(Limits { max_cents: 1000 })
        .broker(kafka.clone())
        .start()
        .await
        .unwrap();

    // Wait, bounded, until both rows have left the outbox.
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&pool, "SELECT count(*) FROM outbox").await > 0 {
        assert!(Instant::now() < deadline, "rows still in the outbox after 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await;

    // Order 1 was published, with the row id in a header.
    let sent = kafka.0.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].topic, "orders.checked");
    assert_eq!(sent[0].payload, b"1");
    let id_header = ("outbox-id".to_owned(), small.to_string().into_bytes());
    assert!(sent[0].headers.contains(&id_header));
    // Order 2 was rejected: in the dead letters at once, no retries.
    let sql = "SELECT count(*) FROM outbox_dlq WHERE failure_reason = 'rejected' AND attempts = 1";
    assert_eq!(count(&pool, sql).await, 1);
    db.drop_db().await;
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}
// ANCHOR_END: integration

#[test]
fn an_ack_can_be_built_for_a_test() {
    use outbox::{Ack, FromContext};
    let env = Envelope::new(1, "webhooks", Vec::new());
    let _ack = Ack::from_context(&env, &Context::for_tests()).unwrap();
}
