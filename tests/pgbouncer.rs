//! The outbox through PgBouncer in transaction pooling mode (`PGBOUNCER_URL`,
//! started by `scripts/services up pgbouncer`): migrations, publish, claim,
//! ack, nack with retries, dead letters, and LISTEN on a direct connection.
//!
//! Every test creates a fresh database directly (`DATABASE_URL`), works on it
//! through PgBouncer, and counts what arrived through the direct connection.
//! Without `PGBOUNCER_URL` (unset or empty) each test is skipped with a
//! message; `scripts/test` sets it.

mod common;

use common::{count, eventually, fast, TestDb};
use outbox::claim::Claimer;
use outbox::{
    App, ConstantRetry, Context, Envelope, HandlerError, Message, Outbox, Output, Pooler,
    Subscriber, Tables,
};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `PGBOUNCER_URL`, or `None` when it is unset or empty.
fn pgbouncer_url() -> Option<String> {
    std::env::var("PGBOUNCER_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
}

/// Returns from the test, saying why, when no PgBouncer is configured.
macro_rules! pgbouncer_or_skip {
    () => {
        match pgbouncer_url() {
            Some(url) => url,
            None => {
                eprintln!(
                    "SKIPPED: PGBOUNCER_URL is not set; start PgBouncer with \
                     `scripts/services up pgbouncer` and source scripts/env.sh (scripts/test does both)"
                );
                return;
            }
        }
    };
}

/// A pool of `n` connections to the test database through PgBouncer.
async fn through_pgbouncer(url: &str, db: &TestDb, n: u32) -> PgPool {
    let url = common::with_database(url, db.name());
    PgPoolOptions::new()
        .max_connections(n)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&url)
        .await
        .unwrap_or_else(|e| {
            panic!("cannot connect through PgBouncer ({e}); is it up? `scripts/services status`")
        })
}

/// Migrates the test database through PgBouncer.
async fn migrated_through_pgbouncer(url: &str, n: u32) -> (TestDb, PgPool) {
    let db = TestDb::new().await;
    let pool = through_pgbouncer(url, &db, n).await;
    outbox::migrate(&pool, &Tables::default())
        .await
        .expect("migrate through PgBouncer");
    (db, pool)
}

/// Advisory locks held in the test database (as seen on a direct connection).
async fn advisory_locks(db: &TestDb) -> i64 {
    count(
        &db.pool,
        "select count(*) from pg_locks l join pg_database d on d.oid = l.database \
         where l.locktype = 'advisory' and d.datname = current_database()",
    )
    .await
}

/// Instances starting together migrate through PgBouncer: every run succeeds,
/// each version is recorded once, and no lock is left behind. Before the
/// migrations took a transaction-scoped lock and unprepared statements, this
/// failed: `prepared statement "sqlx_s_1" already exists` for all but one run
/// (sqlx's named statements met on shared server connections), and a session
/// lock could stay with a server connection after its client had gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_through_pgbouncer_all_succeed_and_leave_no_lock() {
    let url = pgbouncer_or_skip!();
    let db = TestDb::new().await;
    let pool = through_pgbouncer(&url, &db, 8).await;
    let tables = Tables::default();
    let dlq = outbox::TableName::new("orders_dead").unwrap();
    let runs = futures::future::join_all((0..8).map(|i| {
        let (pool, tables, dlq) = (&pool, &tables, &dlq);
        async move {
            let run = async {
                if i % 2 == 0 {
                    outbox::migrate(pool, tables).await
                } else {
                    outbox::migrate_dlq(pool, dlq).await
                }
            };
            tokio::time::timeout(Duration::from_secs(30), run).await
        }
    }))
    .await;
    for (i, run) in runs.into_iter().enumerate() {
        run.unwrap_or_else(|_| panic!("migration {i} still waits after 30 s"))
            .unwrap_or_else(|e| panic!("migration {i} failed: {e}"));
    }
    let (outbox_v, dlq_v) = outbox::expected_versions();
    let versions = |table: &str| {
        format!("select count(*) from outbox_migrations where table_name = '{table}'")
    };
    assert_eq!(count(&db.pool, &versions("outbox")).await, outbox_v as i64);
    assert_eq!(count(&db.pool, &versions("outbox_dlq")).await, dlq_v as i64);
    assert_eq!(
        count(&db.pool, &versions("orders_dead")).await,
        dlq_v as i64
    );
    assert_eq!(
        advisory_locks(&db).await,
        0,
        "no advisory lock is left held"
    );
    // Once more, with the tables in place: nothing to apply, nothing held.
    outbox::migrate(&pool, &tables)
        .await
        .expect("second migrate");
    assert_eq!(
        advisory_locks(&db).await,
        0,
        "no advisory lock is left held"
    );
    pool.close().await;
    db.drop_db().await;
}

/// Eight producers commit 25 messages each (and roll one back) through
/// PgBouncer, as a batch and one by one; four claimers claim and ack them all
/// through PgBouncer. Every committed message is claimed once, none is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_claim_and_ack_through_pgbouncer() {
    let url = pgbouncer_or_skip!();
    let (db, pool) = migrated_through_pgbouncer(&url, 8).await;
    let outbox = Outbox::default().pooler(Pooler::Transaction);
    let producers = futures::future::join_all((0..8i64).map(|p| {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        async move {
            let mut ids = Vec::new();
            for i in 0..20 {
                let mut tx = pool.begin().await.unwrap();
                ids.push(outbox.publish(&mut *tx, "q", &(p * 100 + i)).await.unwrap());
                tx.commit().await.unwrap();
            }
            let mut tx = pool.begin().await.unwrap();
            let batch = (20..25)
                .map(|i| {
                    Message::json("q", &(p * 100 + i))
                        .unwrap()
                        .key(format!("k{p}"))
                })
                .collect();
            ids.extend(outbox.publish_batch(&mut *tx, batch).await.unwrap());
            tx.commit().await.unwrap();
            let mut tx = pool.begin().await.unwrap();
            outbox.publish(&mut *tx, "q", &-1).await.unwrap();
            tx.rollback().await.unwrap();
            ids
        }
    }))
    .await;
    let published: HashSet<i64> = producers.into_iter().flatten().collect();
    assert_eq!(published.len(), 200, "200 distinct ids returned");
    assert_eq!(count(&db.pool, "select count(*) from outbox").await, 200);

    let claimer = Claimer::new(pool.clone(), Tables::default(), vec!["q".into()])
        .unwrap()
        .with_pooler(Pooler::Transaction)
        .with_batch_size(7);
    let claimers = futures::future::join_all((0..4).map(|_| {
        let claimer = claimer.clone();
        async move {
            let mut seen = Vec::new();
            let mut acked = 0;
            loop {
                let batch = claimer.claim().await.expect("claim through PgBouncer");
                if batch.rows.is_empty() {
                    break;
                }
                let ids: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
                if seen.len() % 2 == 0 {
                    acked += claimer
                        .ack_at(batch.token, &batch.positions, &ids)
                        .await
                        .expect("ack_at through PgBouncer");
                } else {
                    acked += claimer
                        .ack(batch.token, &ids)
                        .await
                        .expect("ack through PgBouncer");
                }
                seen.extend(ids);
            }
            (seen, acked)
        }
    }))
    .await;
    let mut claimed = HashMap::<i64, usize>::new();
    let mut acked = 0;
    for (seen, n) in claimers {
        acked += n;
        for id in seen {
            *claimed.entry(id).or_default() += 1;
        }
    }
    assert_eq!(acked, 200, "every row acked");
    assert_eq!(claimed.len(), 200, "every row claimed");
    assert!(claimed.values().all(|n| *n == 1), "no row claimed twice");
    assert_eq!(
        claimed.keys().copied().collect::<HashSet<_>>(),
        published,
        "the rows claimed are the rows published"
    );
    assert_eq!(count(&db.pool, "select count(*) from outbox").await, 0);
    pool.close().await;
    db.drop_db().await;
}

type Calls = Arc<Mutex<HashMap<i64, u32>>>;

/// A handler that counts its calls per row id and fails the first `fail` of them.
fn failing_first(
    calls: Calls,
    fail: u32,
) -> impl Fn(Arc<Envelope>, Context) -> futures::future::BoxFuture<'static, Result<Output, HandlerError>>
{
    move |env, _ctx| {
        let n = {
            let mut calls = calls.lock().unwrap();
            let n = calls.entry(env.id).or_default();
            *n += 1;
            *n
        };
        Box::pin(async move {
            if n <= fail {
                Err(HandlerError::transient(format!("attempt {n} fails")))
            } else {
                Ok(Output::none())
            }
        })
    }
}

/// Publishes `n` messages to `queue` in transactions through PgBouncer.
async fn publish_n(pool: &PgPool, queue: &str, n: i64) -> HashSet<i64> {
    let outbox = Outbox::default().pooler(Pooler::Transaction);
    let mut ids = HashSet::new();
    for i in 0..n {
        let mut tx = pool.begin().await.unwrap();
        ids.insert(outbox.publish(&mut *tx, queue, &i).await.unwrap());
        tx.commit().await.unwrap();
    }
    ids
}

/// An app behind PgBouncer: each of 30 rows fails twice (nacked, retried
/// after 50 ms), then succeeds; every row is handled three times, and none
/// is left or dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nack_and_retry_through_pgbouncer() {
    let url = pgbouncer_or_skip!();
    let (db, pool) = migrated_through_pgbouncer(&url, 6).await;
    let published = publish_n(&pool, "retry", 30).await;
    let calls: Calls = Default::default();
    let sub = fast(Subscriber::new("retry", failing_first(calls.clone(), 2)).queue("retry"))
        .retry(ConstantRetry::new(Duration::from_millis(50)).max_attempts(5))
        .workers(2)
        .batch_size(8);
    let running = App::manual(pool.clone())
        .pooler(Pooler::Transaction)
        .register(sub)
        .start()
        .await
        .expect("the app starts behind PgBouncer");
    eventually("every row handled", Duration::from_secs(30), || async {
        count(&db.pool, "select count(*) from outbox").await == 0
    })
    .await;
    running.shutdown().await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls.keys().copied().collect::<HashSet<_>>(),
        published,
        "every row reached the handler"
    );
    assert!(
        calls.values().all(|n| *n == 3),
        "every row handled three times (two nacks, one ack): {calls:?}"
    );
    assert_eq!(count(&db.pool, "select count(*) from outbox_dlq").await, 0);
    pool.close().await;
    db.drop_db().await;
}

/// An app behind PgBouncer whose handler always fails: after 3 attempts each
/// of 20 rows is moved to the dead-letter table, with its attempts and error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exhausted_retries_are_dead_lettered_through_pgbouncer() {
    let url = pgbouncer_or_skip!();
    let (db, pool) = migrated_through_pgbouncer(&url, 6).await;
    let published = publish_n(&pool, "doomed", 20).await;
    let calls: Calls = Default::default();
    let sub =
        fast(Subscriber::new("doomed", failing_first(calls.clone(), u32::MAX)).queue("doomed"))
            .retry(ConstantRetry::new(Duration::from_millis(50)).max_attempts(3))
            .workers(2)
            .batch_size(8);
    let running = App::manual(pool.clone())
        .pooler(Pooler::Transaction)
        .register(sub)
        .start()
        .await
        .expect("the app starts behind PgBouncer");
    eventually(
        "every row dead-lettered",
        Duration::from_secs(30),
        || async { count(&db.pool, "select count(*) from outbox_dlq").await == 20 },
    )
    .await;
    running.shutdown().await;
    assert_eq!(count(&db.pool, "select count(*) from outbox").await, 0);
    let rows = sqlx::query(
        "select original_id, failure_reason, attempts, last_error from outbox_dlq order by id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let dead: HashSet<i64> = rows.iter().map(|r| r.get::<i64, _>(0)).collect();
    assert_eq!(dead, published, "the dead letters are the rows published");
    for r in &rows {
        assert_eq!(r.get::<String, _>(1), "retries_exhausted");
        assert_eq!(r.get::<i32, _>(2), 3);
        assert_eq!(r.get::<String, _>(3), "attempt 3 fails");
    }
    let calls = calls.lock().unwrap().clone();
    assert!(
        calls.len() == 20 && calls.values().all(|n| *n == 3),
        "every row handled three times: {calls:?}"
    );
    pool.close().await;
    db.drop_db().await;
}

/// An app behind PgBouncer listens on the direct connection it is given
/// (`App::listen_url`): with polls 60 s apart, a message published through
/// PgBouncer is handled within seconds, woken by its NOTIFY.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_behind_pgbouncer_is_woken_through_its_listen_url() {
    let url = pgbouncer_or_skip!();
    let (db, pool) = migrated_through_pgbouncer(&url, 4).await;
    let calls: Calls = Default::default();
    let sub = Subscriber::new("woken", failing_first(calls.clone(), 0))
        .queue("woken")
        .poll_interval(Duration::from_secs(60), Duration::from_secs(60));
    let running = App::manual(pool.clone())
        .pooler(Pooler::Transaction)
        .listen_url(db.url.clone())
        .register(sub)
        .start()
        .await
        .expect("the app starts behind PgBouncer");
    eventually(
        "the worker marked idle",
        Duration::from_secs(10),
        || async {
            count(
                &db.pool,
                "select count(*) from outbox_listeners where idle_until > now()",
            )
            .await
                == 1
        },
    )
    .await;
    let id = publish_n(&pool, "woken", 1).await;
    eventually("the message handled", Duration::from_secs(10), || async {
        count(&db.pool, "select count(*) from outbox").await == 0
    })
    .await;
    running.shutdown().await;
    assert_eq!(
        calls
            .lock()
            .unwrap()
            .keys()
            .copied()
            .collect::<HashSet<_>>(),
        id
    );
    pool.close().await;
    db.drop_db().await;
}

/// A listen URL that is not a PostgreSQL URL is refused when the app is
/// built, with what is accepted.
#[tokio::test]
async fn a_bad_listen_url_is_refused_with_what_is_accepted() {
    let pool = PgPoolOptions::new()
        .connect_lazy(&common::database_url())
        .unwrap();
    let noop = |_env: Arc<Envelope>, _ctx: Context| async { Ok(Output::none()) };
    let err = App::manual(pool)
        .pooler(Pooler::Transaction)
        .listen_url("mysql://db-host/outbox")
        .register(Subscriber::new("a", noop).queue("q"))
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("App::listen_url")
            && err.contains("postgres://user:password@host:port/database"),
        "{err}"
    );
}
