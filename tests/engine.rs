//! The outbox engine against a real PostgreSQL: publish, claims and leases,
//! ack/nack/reject, retries, dead letters, parking, ordering, shutdown.
//! Every test gets a fresh database.

mod common;

use common::{count, eventually, fast, TestDb};
use futures::future::BoxFuture;
use outbox::claim::{Claimer, Retry, Terminal};
use outbox::{
    App, ConstantRetry, Context, Envelope, ExponentialRetry, FailureReason, HandlerError, Message,
    NoRetry, OnConflict, Outbox, Output, Subscriber, Tables,
};
use sqlx::{PgPool, Row};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn setup() -> TestDb {
    common::migrated("outbox=warn").await
}

/// A pool of `n` connections to the test database (one "instance").
async fn instance_pool(db: &TestDb, n: u32) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(n)
        .connect(&db.url)
        .await
        .unwrap()
}

type Calls = Arc<Mutex<Vec<(i64, Instant)>>>;

/// A handler that records each call and returns what `f` says.
fn recording(
    calls: Calls,
    f: impl Fn(&Envelope) -> Result<(), HandlerError> + Send + Sync + 'static,
) -> impl Fn(Arc<Envelope>, Context) -> BoxFuture<'static, Result<Output, HandlerError>> {
    let f = Arc::new(f);
    move |env, _ctx| {
        calls.lock().unwrap().push((env.id, Instant::now()));
        let r = f(&env);
        Box::pin(async move { r.map(|_| Output::none()) })
    }
}

/// Waits until the one subscriber's worker has set its idle mark (publishers
/// notify only then).
async fn wait_until_idle(pool: &PgPool) {
    eventually(
        "subscriber marked idle",
        Duration::from_secs(10),
        || async {
            count(
                pool,
                "select count(*) from outbox_listeners where idle_until > now()",
            )
            .await
                == 1
        },
    )
    .await;
}

/// Publishes `per_queue` rows (JSON numbers 0..) to each queue, with keys
/// `k0` to `k{keys - 1}` in turn, one batch per queue.
async fn publish_keyed(pool: &PgPool, queues: &[&str], per_queue: usize, keys: usize) {
    for &q in queues {
        let msgs = (0..per_queue)
            .map(|i| Message::json(q, &i).unwrap().key(format!("k{}", i % keys)))
            .collect();
        Outbox::default().publish_batch(pool, msgs).await.unwrap();
    }
}

#[tokio::test]
async fn rollback_leaves_no_row_and_commit_is_handled_once() {
    let db = setup().await;
    let pool = &db.pool;

    let mut tx = pool.begin().await.unwrap();
    outbox::publish(&mut *tx, "orders", &serde_json::json!({"id": 1}))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(count(pool, "select count(*) from outbox").await, 0);

    let mut tx = pool.begin().await.unwrap();
    let id = outbox::publish(&mut *tx, "orders", &serde_json::json!({"id": 2}))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let calls: Calls = Default::default();
    let running = App::manual(pool.clone())
        .register(fast(
            Subscriber::new("orders", recording(calls.clone(), |_| Ok(()))).queue("orders"),
        ))
        .start()
        .await
        .unwrap();
    eventually("row deleted", Duration::from_secs(10), || async {
        count(pool, "select count(*) from outbox").await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.shutdown().await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "handled exactly once");
    assert_eq!(calls[0].0, id);
    assert_eq!(count(pool, "select count(*) from outbox_dlq").await, 0);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_with_four_workers_handle_every_row_once() {
    let db = setup().await;
    let n = 10_000usize;
    let msgs: Vec<Message> = (0..n)
        .map(|i| {
            Message::json("work", &i)
                .unwrap()
                .key(format!("k{}", i % 100))
        })
        .collect();
    let ob = Outbox::default();
    for chunk in msgs.chunks(2_000) {
        ob.publish_batch(&db.pool, chunk.to_vec()).await.unwrap();
    }
    let seen: Arc<Mutex<HashMap<i64, usize>>> = Default::default();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let seen = seen.clone();
        let pool = instance_pool(&db, 8).await;
        let handler = move |env: Arc<Envelope>, _ctx: Context| {
            *seen.lock().unwrap().entry(env.id).or_default() += 1;
            async { Ok(Output::none()) }
        };
        let sub = fast(Subscriber::new("work", handler).queue("work"))
            .workers(4)
            .batch_size(100);
        instances.push(App::manual(pool).register(sub).start().await.unwrap());
    }
    eventually("outbox drained", Duration::from_secs(60), || async {
        count(&db.pool, "select count(*) from outbox").await == 0
    })
    .await;
    for r in instances {
        r.shutdown().await;
    }
    let (handled, twice) = {
        let seen = seen.lock().unwrap();
        (seen.len(), seen.values().filter(|c| **c > 1).count())
    };
    assert_eq!(handled, n, "every row handled");
    assert_eq!(twice, 0, "no row handled twice");
    db.drop_db().await;
}

#[tokio::test]
async fn failing_handler_follows_the_schedule_then_lands_in_the_dlq() {
    let db = setup().await;
    let pool = &db.pool;
    let id = outbox::publish(pool, "flaky", &"x").await.unwrap();
    let calls: Calls = Default::default();
    let retry = ExponentialRetry::default()
        .initial(Duration::from_millis(300))
        .multiplier(2.0)
        .jitter(0.2)
        .max_attempts(4);
    let running = App::manual(pool.clone())
        .register(
            fast(
                Subscriber::new(
                    "flaky",
                    recording(calls.clone(), |_| Err(HandlerError::transient("db down"))),
                )
                .queue("flaky"),
            )
            .retry(retry),
        )
        .start()
        .await
        .unwrap();
    eventually("dead-lettered", Duration::from_secs(15), || async {
        count(pool, "select count(*) from outbox_dlq").await == 1
    })
    .await;
    running.shutdown().await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 4, "max_attempts = 4 calls");
    // Delays 300, 600, 1200 ms with ±20 % jitter; the upper bound allows for polling.
    for (i, base_ms) in [300.0, 600.0, 1200.0].into_iter().enumerate() {
        let gap = calls[i + 1].1.duration_since(calls[i].1).as_secs_f64() * 1000.0;
        assert!(
            gap >= base_ms * 0.8 - 5.0,
            "attempt {} came after {gap} ms, before {base_ms} ms - 20 %",
            i + 2
        );
        assert!(
            gap <= base_ms * 1.2 + 250.0,
            "attempt {} came after {gap} ms, long after {base_ms} ms + 20 %",
            i + 2
        );
    }
    let row =
        sqlx::query("select original_id, failure_reason, last_error, attempts from outbox_dlq")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(row.get::<i64, _>(0), id);
    assert_eq!(row.get::<String, _>(1), "retries_exhausted");
    assert_eq!(row.get::<String, _>(2), "db down");
    assert_eq!(row.get::<i32, _>(3), 4);
    assert_eq!(count(pool, "select count(*) from outbox").await, 0);
    db.drop_db().await;
}

#[tokio::test]
async fn a_stale_token_cannot_ack_nack_or_dead_letter() {
    let db = setup().await;
    let pool = &db.pool;
    let id = outbox::publish(pool, "q", &1).await.unwrap();
    let a = Claimer::new(pool.clone(), Tables::default(), vec!["q".into()])
        .unwrap()
        .with_lease_ttl(Duration::from_millis(300));
    let first = a.claim().await.unwrap();
    assert_eq!(first.rows.len(), 1);
    assert_eq!(
        a.claim().await.unwrap().rows.len(),
        0,
        "leased rows are not claimed twice"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = a.claim().await.unwrap();
    assert_eq!(second.rows.len(), 1, "an expired lease is taken over");
    assert_eq!(second.rows[0].attempt, 2);

    let stale = first.token;
    assert_eq!(a.ack(stale, &[id]).await.unwrap(), 0);
    let retry = Retry {
        id,
        delay: Duration::from_secs(60),
        error: "x".into(),
    };
    assert_eq!(a.nack(stale, &[retry]).await.unwrap(), 0);
    let term = Terminal {
        id,
        reason: FailureReason::Rejected,
        error: "x".into(),
    };
    assert_eq!(a.fail(stale, &[term]).await.unwrap(), 0);
    assert_eq!(a.release(stale, &[id]).await.unwrap(), 0);
    assert_eq!(count(pool, "select count(*) from outbox").await, 1);
    assert_eq!(count(pool, "select count(*) from outbox_dlq").await, 0);

    // The position-based ack (what the runtime uses) obeys the same rule: the
    // stale token deletes nothing, at the old position or the new one.
    assert_eq!(a.ack_at(stale, &first.positions, &[id]).await.unwrap(), 0);
    assert_eq!(a.ack_at(stale, &second.positions, &[id]).await.unwrap(), 0);
    assert_eq!(count(pool, "select count(*) from outbox").await, 1);

    // The live token with the first claim's position (the takeover wrote the
    // row elsewhere) finds the row by its id instead.
    assert_eq!(
        a.ack_at(second.token, &first.positions, &[id])
            .await
            .unwrap(),
        1
    );
    assert_eq!(count(pool, "select count(*) from outbox").await, 0);
    db.drop_db().await;
}

#[tokio::test]
async fn rows_of_a_crashed_instance_come_back_after_the_lease() {
    let db = setup().await;
    let pool = &db.pool;
    let rows: Vec<Message> = (0..20)
        .map(|i| Message::json("jobs", &i).unwrap())
        .collect();
    Outbox::default().publish_batch(pool, rows).await.unwrap();

    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let hang = move |_env: Arc<Envelope>, _ctx: Context| {
        s.fetch_add(1, Ordering::SeqCst);
        async { futures::future::pending::<Result<Output, HandlerError>>().await }
    };
    let crashed = App::manual(instance_pool(&db, 4).await)
        .register(
            fast(Subscriber::new("jobs", hang).queue("jobs")).lease_ttl(Duration::from_secs(1)),
        )
        .start()
        .await
        .unwrap();
    eventually(
        "the first instance took the rows",
        Duration::from_secs(10),
        || async { started.load(Ordering::SeqCst) == 20 },
    )
    .await;
    crashed.abort();
    let claimed_at = Instant::now();
    assert_eq!(
        count(
            pool,
            "select count(*) from outbox where lease_token is not null"
        )
        .await,
        20
    );

    let calls: Calls = Default::default();
    let survivor = App::manual(instance_pool(&db, 4).await)
        .register(fast(
            Subscriber::new("jobs", recording(calls.clone(), |_| Ok(()))).queue("jobs"),
        ))
        .start()
        .await
        .unwrap();
    eventually(
        "rows handled by the survivor",
        Duration::from_secs(15),
        || async { count(pool, "select count(*) from outbox").await == 0 },
    )
    .await;
    survivor.shutdown().await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 20);
    let first = calls.iter().map(|c| c.1).min().unwrap();
    assert!(
        first.duration_since(claimed_at) >= Duration::from_millis(500),
        "rows came back before their lease expired"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn a_delayed_row_is_not_handled_before_its_time() {
    let db = setup().await;
    let pool = &db.pool;
    let calls: Calls = Default::default();
    let running = App::manual(pool.clone())
        .register(fast(
            Subscriber::new("later", recording(calls.clone(), |_| Ok(()))).queue("later"),
        ))
        .start()
        .await
        .unwrap();
    let published = Instant::now();
    Message::json("later", &1)
        .unwrap()
        .activate_in(Duration::from_millis(1500))
        .publish(pool)
        .await
        .unwrap();
    let at = std::time::SystemTime::now() + Duration::from_millis(1000);
    Message::json("later", &2)
        .unwrap()
        .activate_at(at)
        .publish(pool)
        .await
        .unwrap();
    eventually("both handled", Duration::from_secs(10), || async {
        calls.lock().unwrap().len() == 2
    })
    .await;
    running.shutdown().await;
    let calls = calls.lock().unwrap().clone();
    let waited: Vec<Duration> = calls
        .iter()
        .map(|c| c.1.duration_since(published))
        .collect();
    assert!(
        waited[0] >= Duration::from_millis(950),
        "activate_at row came after {:?}",
        waited[0]
    );
    assert!(
        waited[1] >= Duration::from_millis(1450),
        "activate_in row came after {:?}",
        waited[1]
    );
    db.drop_db().await;
}

#[tokio::test]
async fn timers_are_deduplicated_replaced_and_cancelled() {
    let db = setup().await;
    let pool = &db.pool;
    let later = Duration::from_secs(3600);
    let first = Message::json("timers", &"v1")
        .unwrap()
        .timer_id("t1", OnConflict::Ignore)
        .activate_in(later);
    let a = first.clone().publish(pool).await.unwrap();
    assert!(a.is_some());
    let b = first.publish(pool).await.unwrap();
    assert_eq!(b, None, "the pending timer is kept");
    assert_eq!(count(pool, "select count(*) from outbox").await, 1);

    let replaced = Message::json("timers", &"v2")
        .unwrap()
        .timer_id("t1", OnConflict::Replace)
        .activate_in(later)
        .publish(pool)
        .await
        .unwrap();
    assert_eq!(replaced, a, "replace keeps the row");
    let payload: Vec<u8> = sqlx::query_scalar("select payload from outbox")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(payload, br#""v2""#);

    // Another queue may use the same timer id.
    Message::json("other", &1)
        .unwrap()
        .timer_id("t1", OnConflict::Ignore)
        .activate_in(later)
        .publish(pool)
        .await
        .unwrap();
    assert_eq!(count(pool, "select count(*) from outbox").await, 2);

    assert!(outbox::cancel_timer(pool, "timers", "t1").await.unwrap());
    assert!(!outbox::cancel_timer(pool, "timers", "t1").await.unwrap());
    assert_eq!(
        count(pool, "select count(*) from outbox where queue = 'timers'").await,
        0
    );
    // Once cancelled, the id is free again.
    assert!(Message::json("timers", &"v3")
        .unwrap()
        .timer_id("t1", OnConflict::Ignore)
        .publish(pool)
        .await
        .unwrap()
        .is_some());
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ordered_subscribers_keep_key_order_and_a_failing_key_holds_only_itself() {
    let db = setup().await;
    let pool = &db.pool;
    let mut msgs = Vec::new();
    for i in 0..10 {
        for key in ["a", "b", "c"] {
            msgs.push(Message::json("ordered", &i).unwrap().key(key));
        }
    }
    Outbox::default().publish_batch(pool, msgs).await.unwrap();

    type Log = Arc<Mutex<Vec<(String, i64, Instant)>>>;
    let log: Log = Default::default();
    let in_flight: Arc<Mutex<HashMap<String, usize>>> = Default::default();
    let failures = Arc::new(AtomicUsize::new(0));
    let mut apps = Vec::new();
    for _ in 0..2 {
        let (log, in_flight, failures) = (log.clone(), in_flight.clone(), failures.clone());
        let handler = move |env: Arc<Envelope>, _ctx: Context| {
            let (log, in_flight, failures) = (log.clone(), in_flight.clone(), failures.clone());
            async move {
                let key = env.key.clone().unwrap();
                {
                    let mut f = in_flight.lock().unwrap();
                    let n = f.entry(key.clone()).or_default();
                    *n += 1;
                    assert_eq!(*n, 1, "two rows of key {key} handled at once");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                let value: i64 = env.json()?;
                *in_flight.lock().unwrap().get_mut(&key).unwrap() -= 1;
                // The first row of key b fails twice.
                if key == "b" && value == 0 && failures.fetch_add(1, Ordering::SeqCst) < 2 {
                    return Err(HandlerError::transient("b0 fails"));
                }
                log.lock().unwrap().push((key, env.id, Instant::now()));
                Ok(Output::none())
            }
        };
        let sub = fast(Subscriber::new("ordered", handler).queue("ordered"))
            .ordered(true)
            .workers(2)
            .retry(ConstantRetry::new(Duration::from_millis(400)).jitter(0.0));
        apps.push(
            App::manual(instance_pool(&db, 4).await)
                .register(sub)
                .start()
                .await
                .unwrap(),
        );
    }
    eventually("all handled", Duration::from_secs(20), || async {
        count(pool, "select count(*) from outbox").await == 0
    })
    .await;
    for a in apps {
        a.shutdown().await;
    }
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 30);
    for key in ["a", "b", "c"] {
        let ids: Vec<i64> = log.iter().filter(|l| l.0 == key).map(|l| l.1).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "key {key} handled out of id order");
    }
    let last = |k: &str| log.iter().filter(|l| l.0 == k).map(|l| l.2).max().unwrap();
    let first_b = log
        .iter()
        .filter(|l| l.0 == "b")
        .map(|l| l.2)
        .min()
        .unwrap();
    assert!(last("a") < first_b, "key a waited for failing key b");
    assert!(last("c") < first_b, "key c waited for failing key b");
    assert_eq!(failures.load(Ordering::SeqCst), 3);
    db.drop_db().await;
}

#[tokio::test]
async fn shutdown_releases_the_leases_of_unfinished_rows() {
    let db = setup().await;
    let pool = &db.pool;
    let rows: Vec<Message> = (0..5).map(|i| Message::json("slow", &i).unwrap()).collect();
    Outbox::default().publish_batch(pool, rows).await.unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let slow = move |_env: Arc<Envelope>, _ctx: Context| {
        s.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_secs(20)).await;
            Ok(Output::none())
        }
    };
    let running = App::manual(pool.clone())
        .register(fast(Subscriber::new("slow", slow).queue("slow")))
        .shutdown_timeout(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    eventually("handlers started", Duration::from_secs(10), || async {
        started.load(Ordering::SeqCst) == 5
    })
    .await;
    let t = Instant::now();
    running.shutdown().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown waited for the handlers"
    );
    assert_eq!(
        count(pool, "select count(*) from outbox").await,
        5,
        "nothing lost"
    );
    assert_eq!(
        count(
            pool,
            "select count(*) from outbox where lease_token is null"
        )
        .await,
        5,
        "leases released"
    );
    assert_eq!(
        count(pool, "select count(*) from outbox where attempts = 0").await,
        5,
        "no attempt counted"
    );
    db.drop_db().await;
}

/// With a backlog the runtime claims the next batch while the current one is
/// handled. At shutdown that prefetched batch is given back at once, whether
/// the current batch finishes in time or is cut off by the deadline.
#[tokio::test]
async fn shutdown_gives_back_the_prefetched_batch() {
    let db = setup().await;
    let pool = &db.pool;
    const N: usize = 40;
    let rows: Vec<Message> = (0..N).map(|i| Message::json("pre", &i).unwrap()).collect();
    Outbox::default().publish_batch(pool, rows).await.unwrap();

    for (handler_ms, deadline_ms) in [(300u64, 10_000u64), (20_000, 200)] {
        let handled = Arc::new(Mutex::new(Vec::new()));
        let started = Arc::new(AtomicUsize::new(0));
        let (h, s) = (handled.clone(), started.clone());
        let slow = move |env: Arc<Envelope>, _ctx: Context| {
            s.fetch_add(1, Ordering::SeqCst);
            let h = h.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(handler_ms)).await;
                h.lock().unwrap().push(env.id);
                Ok(Output::none())
            }
        };
        let before = count(pool, "select count(*) from outbox").await;
        let running = App::manual(pool.clone())
            .register(fast(
                Subscriber::new("pre", slow)
                    .queue("pre")
                    .batch_size(5)
                    .concurrency(5)
                    .workers(1),
            ))
            .shutdown_timeout(Duration::from_millis(deadline_ms))
            .start()
            .await
            .unwrap();
        eventually("a batch started", Duration::from_secs(10), || async {
            started.load(Ordering::SeqCst) >= 5
        })
        .await;
        // The next batch is claimed while the first is handled.
        eventually(
            "the next batch is prefetched",
            Duration::from_secs(10),
            || async {
                count(
                    pool,
                    "select count(*) from outbox where lease_token is not null",
                )
                .await
                    >= 10
            },
        )
        .await;
        running.shutdown().await;
        let done = handled.lock().unwrap().len() as i64;
        let left = count(pool, "select count(*) from outbox").await;
        assert_eq!(
            left + done,
            before,
            "nothing lost ({handler_ms} ms handlers)"
        );
        assert_eq!(
            count(pool, "select count(*) from outbox where lease_token is not null").await,
            0,
            "every lease given back at shutdown ({handler_ms} ms handlers, {deadline_ms} ms deadline)"
        );
        assert_eq!(
            count(pool, "select count(*) from outbox where attempts > 0").await,
            0,
            "no attempt counted for rows given back"
        );
    }

    // A new run handles every row that is left.
    let calls: Calls = Arc::default();
    let running = App::manual(pool.clone())
        .register(fast(
            Subscriber::new("pre", recording(calls.clone(), |_| Ok(()))).queue("pre"),
        ))
        .start()
        .await
        .unwrap();
    eventually("the rest is handled", Duration::from_secs(20), || async {
        count(pool, "select count(*) from outbox").await == 0
    })
    .await;
    running.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_handlers_finish_within_the_deadline() {
    let db = setup().await;
    let pool = &db.pool;
    outbox::publish(pool, "finish", &1).await.unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let h = move |_env: Arc<Envelope>, _ctx: Context| {
        s.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok(Output::none())
        }
    };
    let running = App::manual(pool.clone())
        .register(fast(Subscriber::new("finish", h).queue("finish")))
        .shutdown_timeout(Duration::from_secs(10))
        .start()
        .await
        .unwrap();
    eventually("handler started", Duration::from_secs(10), || async {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    running.shutdown().await;
    assert_eq!(
        count(pool, "select count(*) from outbox").await,
        0,
        "the finished row was acked"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn without_a_dlq_terminal_rows_are_parked_not_lost() {
    let db = setup().await;
    let pool = &db.pool;
    let id = outbox::publish(pool, "parking", &"p").await.unwrap();
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = fail.clone();
    let calls: Calls = Default::default();
    let handler = recording(calls.clone(), move |_| {
        if f.load(Ordering::SeqCst) {
            Err(HandlerError::transient("nope"))
        } else {
            Ok(())
        }
    });
    let running = App::manual(pool.clone())
        .register(
            fast(Subscriber::new("parking", handler).queue("parking"))
                .no_dlq()
                .retry(NoRetry),
        )
        .start()
        .await
        .unwrap();
    eventually("parked", Duration::from_secs(10), || async {
        count(
            pool,
            "select count(*) from outbox where parked_at is not null",
        )
        .await
            == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        calls.lock().unwrap().len(),
        1,
        "a parked row is not claimed again"
    );
    let parked = outbox::dlq::list_parked(pool, &Tables::default(), Some("parking"), 10)
        .await
        .unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].id, id);
    assert_eq!(
        parked[0].failure_reason.as_deref(),
        Some("retries_exhausted")
    );
    assert_eq!(parked[0].last_error.as_deref(), Some("nope"));
    assert_eq!(count(pool, "select count(*) from outbox_dlq").await, 0);

    fail.store(false, Ordering::SeqCst);
    assert_eq!(
        outbox::dlq::unpark(pool, &Tables::default(), &[id])
            .await
            .unwrap(),
        1
    );
    eventually("handled after unpark", Duration::from_secs(10), || async {
        count(pool, "select count(*) from outbox").await == 0
    })
    .await;
    running.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_payload_that_does_not_deserialize_is_rejected_without_retries() {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Order {
        id: i64,
    }
    let db = setup().await;
    let pool = &db.pool;
    Message::bytes("typed", b"not json".to_vec())
        .publish(pool)
        .await
        .unwrap();
    outbox::publish(pool, "typed", &serde_json::json!({"id": "seven"}))
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let h = move |env: Arc<Envelope>, _ctx: Context| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            let _order: Order = env.json()?;
            Ok(Output::none())
        }
    };
    let running = App::manual(pool.clone())
        .register(fast(Subscriber::new("typed", h).queue("typed")))
        .start()
        .await
        .unwrap();
    eventually("both dead-lettered", Duration::from_secs(10), || async {
        count(pool, "select count(*) from outbox_dlq").await == 2
    })
    .await;
    running.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "no retries");
    let rows = sqlx::query(
        "select failure_reason, last_error, attempts from outbox_dlq order by original_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for r in &rows {
        assert_eq!(r.get::<String, _>(0), "deserialize");
        assert_eq!(r.get::<i32, _>(2), 1);
    }
    assert!(
        rows[0].get::<String, _>(1).contains("expected ident"),
        "{}",
        rows[0].get::<String, _>(1)
    );
    assert!(
        rows[1].get::<String, _>(1).contains("invalid type"),
        "{}",
        rows[1].get::<String, _>(1)
    );
    db.drop_db().await;
}

#[tokio::test]
async fn dead_letters_can_be_listed_replayed_and_purged() {
    let db = setup().await;
    let pool = &db.pool;
    for i in 0..3 {
        Message::json("dl", &i)
            .unwrap()
            .key("k")
            .header("h", "v")
            .publish(pool)
            .await
            .unwrap();
    }
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = fail.clone();
    let calls: Calls = Default::default();
    let handler = recording(calls.clone(), move |_| {
        if f.load(Ordering::SeqCst) {
            Err(HandlerError::reject("bad order"))
        } else {
            Ok(())
        }
    });
    let running = App::manual(pool.clone())
        .register(fast(Subscriber::new("dl", handler).queue("dl")))
        .start()
        .await
        .unwrap();
    eventually("dead-lettered", Duration::from_secs(10), || async {
        count(pool, "select count(*) from outbox_dlq").await == 3
    })
    .await;
    let dlq = outbox::dlq::DeadLetters::new(pool.clone(), Tables::default()).unwrap();
    let all = dlq.list(&Default::default()).await.unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].failure_reason, "rejected");
    assert_eq!(all[0].last_error.as_deref(), Some("bad order"));
    assert_eq!(all[0].partition_key.as_deref(), Some("k"));
    assert_eq!(all[0].headers.get("h"), Some(&serde_json::json!("v")));
    assert_eq!(calls.lock().unwrap().len(), 3, "a rejection is not retried");

    fail.store(false, Ordering::SeqCst);
    let only_first = outbox::dlq::Filter::default().ids(all[0].id, all[0].id);
    let replayed = dlq.replay(&only_first).await.unwrap();
    assert_eq!(replayed.len(), 1);
    eventually("replayed row handled", Duration::from_secs(10), || async {
        count(pool, "select count(*) from outbox").await == 0 && calls.lock().unwrap().len() == 4
    })
    .await;
    assert_eq!(dlq.count(&Default::default()).await.unwrap(), 2);
    assert_eq!(
        dlq.purge(&outbox::dlq::Filter::default().queue("dl"))
            .await
            .unwrap(),
        2
    );
    assert_eq!(dlq.count(&Default::default()).await.unwrap(), 0);
    running.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn bad_input_is_refused_before_anything_is_written() {
    let db = setup().await;
    let pool = &db.pool;
    let long = "q".repeat(256);
    for (msg, why) in [
        (Message::json("", &1).unwrap(), "empty"),
        (Message::json(long.as_str(), &1).unwrap(), "256 bytes"),
        (
            Message::json("q", &1).unwrap().header("", "v"),
            "header name",
        ),
        (
            Message::json("q", &1).unwrap().header("a b", "v"),
            "whitespace",
        ),
        (
            Message::json("q", &1).unwrap().header("outbox-id", "1"),
            "reserved",
        ),
        (Message::json("q", &1).unwrap().header("h", "a\0b"), "NUL"),
        (Message::json("q", &1).unwrap().key("a\0b"), "NUL"),
    ] {
        let err = msg.publish(pool).await.unwrap_err().to_string();
        assert!(err.contains(why), "expected {why:?} in {err:?}");
    }
    assert_eq!(count(pool, "select count(*) from outbox").await, 0);
    for bad in ["a;b", "x\"y", "ünï", &"t".repeat(64), "1x", ""] {
        let err = Tables::new(bad, None).unwrap_err().to_string();
        assert!(
            err.contains("invalid table name") && err.contains("accepted"),
            "{err}"
        );
    }
    db.drop_db().await;
}

#[tokio::test]
async fn invalid_settings_are_all_reported_when_the_app_is_built() {
    let db = setup().await;
    let noop = |_env: Arc<Envelope>, _ctx: Context| async { Ok(Output::none()) };
    let app = App::manual(db.pool.clone())
        .register(
            Subscriber::new("a", noop)
                .queue("shared")
                .batch_size(0)
                .concurrency(100_000)
                .lease_ttl(Duration::from_millis(10))
                .dlq("bad;name")
                .retry(ExponentialRetry::default().jitter(3.0)),
        )
        .register(
            Subscriber::new("b", noop)
                .queue("shared")
                .publisher("kafka", "t"),
        )
        .register(Subscriber::new("c", noop))
        .register(Subscriber::new("a", noop).queue("other"));
    let err = app.validate().unwrap_err().to_string();
    for expected in [
        "batch_size is 0",
        "concurrency is 100000",
        "lease_ttl",
        "dlq: invalid table name",
        "retry: jitter is 3",
        "queue \"shared\" has two handlers",
        "no kafka broker is configured",
        "no queue given",
        "two subscribers are named \"a\"",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    let start = App::manual(db.pool.clone())
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(start.contains("no subscribers"), "{start}");
    db.drop_db().await;
}

#[tokio::test]
async fn the_app_refuses_to_start_on_missing_tables() {
    let db = TestDb::new().await;
    let noop = |_env: Arc<Envelope>, _ctx: Context| async { Ok(Output::none()) };
    let err = App::manual(db.pool.clone())
        .register(Subscriber::new("a", noop).queue("q"))
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("table outbox does not exist") && err.contains("migrat"),
        "{err}"
    );
    db.drop_db().await;
}

/// Instances starting together each create the dead-letter tables their
/// subscribers name (`migrate_dlq`): the migrations queue behind one lock, so
/// none fails on a half-made table or a version recorded by another.
#[tokio::test]
async fn concurrent_dead_letter_table_migrations_all_succeed() {
    let db = TestDb::new().await;
    let dlq = outbox::TableName::new("orders_dead").unwrap();
    let runs = futures::future::join_all((0..8).map(|_| outbox::migrate_dlq(&db.pool, &dlq))).await;
    for run in runs {
        run.expect("every concurrent migrate_dlq succeeds");
    }
    assert_eq!(
        count(
            &db.pool,
            "select count(*) from outbox_migrations where table_name = 'orders_dead'"
        )
        .await,
        outbox::expected_versions().1 as i64
    );
    assert_eq!(count(&db.pool, "select count(*) from orders_dead").await, 0);
    db.drop_db().await;
}

#[tokio::test]
async fn custom_table_names_and_repeated_migrations_work() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    sqlx::query("create schema billing")
        .execute(pool)
        .await
        .unwrap();
    let tables = Tables::new("billing.events_outbox", Some("billing.events_dead")).unwrap();
    outbox::migrate(pool, &tables).await.unwrap();
    outbox::migrate(pool, &tables).await.unwrap();
    let ob = Outbox::new(tables.clone());
    let ids = ob
        .publish_batch(
            pool,
            vec![
                Message::json("e", &1).unwrap(),
                Message::json("e", &2).unwrap(),
            ],
        )
        .await
        .unwrap();
    assert_eq!(ids.len(), 2);
    assert!(ids[0] < ids[1]);
    assert_eq!(
        count(pool, "select count(*) from billing.events_outbox").await,
        2
    );
    let calls: Calls = Default::default();
    let running = App::manual(pool.clone())
        .tables(tables)
        .register(fast(
            Subscriber::new("e", recording(calls.clone(), |_| Ok(())))
                .queue("e")
                .dlq("billing.events_dead"),
        ))
        .start()
        .await
        .unwrap();
    eventually("handled", Duration::from_secs(10), || async {
        count(pool, "select count(*) from billing.events_outbox").await == 0
    })
    .await;
    running.shutdown().await;
    db.drop_db().await;
}

/// Publishes notify only while a subscriber sleeps; a sleeping subscriber wakes
/// on the notification. Prints the observed wake-up latency.
#[tokio::test]
async fn notify_is_sent_only_while_a_subscriber_is_idle() {
    let db = setup().await;
    let pool = &db.pool;
    let mut listener = sqlx::postgres::PgListener::connect_with(pool)
        .await
        .unwrap();
    listener.listen("outbox_wake_outbox").await.unwrap();

    outbox::publish(pool, "quiet", &1).await.unwrap();
    let none = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(none.is_err(), "no subscriber is idle, so no notification");

    let calls: Calls = Default::default();
    let running = App::manual(pool.clone())
        .register(
            Subscriber::new("wake", recording(calls.clone(), |_| Ok(())))
                .queue("wake")
                .poll_interval(Duration::from_secs(30), Duration::from_secs(30)),
        )
        .start()
        .await
        .unwrap();
    wait_until_idle(pool).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut latencies = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        outbox::publish(pool, "wake", &i).await.unwrap();
        let note = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
        assert!(note.is_ok(), "an idle subscriber gets a notification");
        eventually("handled", Duration::from_secs(10), || async {
            calls.lock().unwrap().len() == i + 1
        })
        .await;
        latencies.push(calls.lock().unwrap()[i].1.duration_since(t));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("NOTIFY wake-up latency (publish commit -> handler), 5 samples: {latencies:?}");
    running.shutdown().await;
    db.drop_db().await;
}

/// The claim statement has three forms (one queue: `queue = $1` on the claim
/// index; several queues: one index walk per queue; every queue: by id). A
/// claimer "crashes" holding a batch of a multi-queue claim: the others never
/// see those rows while the lease holds, take them over after it expires, the
/// crashed claimer's late ack deletes nothing, and in the end every row was
/// acked exactly once, none of another queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_claim_form_skips_leased_rows_and_takes_over_a_crashed_claimers_rows() {
    let db = setup().await;
    publish_keyed(&db.pool, &["qa", "qb", "qc"], 100, 7).await;
    let two = vec!["qa".to_owned(), "qb".to_owned()];
    let crashed = Claimer::new(db.pool.clone(), Tables::default(), two.clone())
        .unwrap()
        .with_batch_size(50)
        .with_lease_ttl(Duration::from_secs(5));
    let lost = crashed.claim().await.unwrap();
    let crashed_at = Instant::now();
    assert_eq!(lost.rows.len(), 50);
    let lost_ids: Vec<i64> = lost.rows.iter().map(|r| r.id).collect();
    // The crash: this batch is never acked by its owner.

    let acked: Arc<Mutex<Vec<(i64, String)>>> = Arc::default();
    let drain = |claimer: Claimer, acked: Arc<Mutex<Vec<(i64, String)>>>| async move {
        loop {
            let b = claimer.claim().await.unwrap();
            if b.rows.is_empty() {
                return;
            }
            let ids: Vec<i64> = b.rows.iter().map(|r| r.id).collect();
            assert_eq!(claimer.ack(b.token, &ids).await.unwrap(), ids.len() as u64);
            acked
                .lock()
                .unwrap()
                .extend(b.rows.iter().map(|r| (r.id, r.queue.clone())));
        }
    };
    // Two claimers of the two queues and two of the one queue, at once.
    let multi = || {
        Claimer::new(db.pool.clone(), Tables::default(), two.clone())
            .unwrap()
            .with_batch_size(7)
    };
    let single = || {
        Claimer::new(db.pool.clone(), Tables::default(), vec!["qc".to_owned()])
            .unwrap()
            .with_batch_size(9)
    };
    tokio::join!(
        drain(multi(), acked.clone()),
        drain(multi(), acked.clone()),
        drain(single(), acked.clone()),
        drain(single(), acked.clone()),
    );
    {
        let got = acked.lock().unwrap();
        assert_eq!(got.len(), 250, "everything but the crashed claimer's batch");
        assert!(got.iter().all(|(id, _)| !lost_ids.contains(id)));
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox").await,
        50,
        "the leased rows wait for their lease to expire"
    );

    assert!(
        crashed_at.elapsed() < Duration::from_secs(5),
        "the machine is too slow for this test: the lease expired during the first drain"
    );
    tokio::time::sleep(
        Duration::from_secs(5).saturating_sub(crashed_at.elapsed()) + Duration::from_millis(300),
    )
    .await;
    drain(multi(), acked.clone()).await;
    assert_eq!(
        crashed.ack(lost.token, &lost_ids).await.unwrap(),
        0,
        "a stale token deletes nothing"
    );
    let got = acked.lock().unwrap().clone();
    let mut ids: Vec<i64> = got.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 300, "every row acked exactly once");
    assert_eq!(got.len(), 300);
    for q in ["qa", "qb", "qc"] {
        assert_eq!(got.iter().filter(|(_, queue)| queue == q).count(), 100);
    }
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox").await, 0);
}

/// A worker keeps its idle mark across partial batches (publishers keep
/// notifying it) and its claims and settles commit without waiting for the WAL
/// flush. With polling every 30 s, only notifications can wake it in time:
/// rows published one by one, some while it is busy with a slow partial batch,
/// are all handled, once. Midway another claimer "crashes" holding a batch
/// under a 1 s lease: its rows come back to the worker after the lease (the
/// next notification wakes it), its late ack deletes nothing, and in the end
/// every row was handled exactly once and the outbox is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_busy_with_partial_batches_is_woken_and_a_crashed_claim_comes_back() {
    let db = setup().await;
    let pool = &db.pool;
    let calls: Calls = Default::default();
    let c = calls.clone();
    let handler = move |env: Arc<Envelope>, _ctx: Context| {
        c.lock().unwrap().push((env.id, Instant::now()));
        let slow = env.payload.as_slice() == b"0";
        async move {
            if slow {
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            Ok(Output::none())
        }
    };
    let running = App::manual(pool.clone())
        .register(
            Subscriber::new("partial", handler)
                .queue("partial")
                .batch_size(10)
                .workers(1)
                .poll_interval(Duration::from_secs(30), Duration::from_secs(30)),
        )
        .start()
        .await
        .unwrap();
    wait_until_idle(pool).await;

    let mut published = Vec::new();
    // Rounds of one slow row, then fast rows while it is being handled.
    for round in 0..4 {
        published.push(outbox::publish(pool, "partial", &0).await.unwrap());
        tokio::time::sleep(Duration::from_millis(30)).await;
        if round == 1 {
            // While the worker is inside the slow handler, another instance
            // claims the new rows and crashes holding them.
            let crashed = Claimer::new(pool.clone(), Tables::default(), vec!["partial".into()])
                .unwrap()
                .with_lease_ttl(Duration::from_secs(1));
            for i in 10..13 {
                published.push(outbox::publish(pool, "partial", &i).await.unwrap());
            }
            let batch = crashed.claim().await.unwrap();
            assert!(!batch.rows.is_empty(), "the crashing claimer took rows");
            let lost: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
            tokio::time::sleep(Duration::from_millis(1100)).await;
            // After the lease, the next publish wakes the worker, which takes
            // the crashed claimer's rows as well.
            published.push(outbox::publish(pool, "partial", &20).await.unwrap());
            eventually(
                "the crashed claimer's rows handled by the worker",
                Duration::from_secs(10),
                || async {
                    let calls = calls.lock().unwrap();
                    lost.iter().all(|id| calls.iter().any(|c| c.0 == *id))
                },
            )
            .await;
            let late = crashed.ack(batch.token, &lost).await.unwrap();
            assert_eq!(late, 0, "a stale token deleted rows");
        }
        for i in 1..4 {
            published.push(outbox::publish(pool, "partial", &i).await.unwrap());
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Notifications only (polling is every 30 s): everything within seconds.
    eventually("every row handled", Duration::from_secs(10), || async {
        count(pool, "select count(*) from outbox").await == 0
    })
    .await;
    running.shutdown().await;
    let calls = calls.lock().unwrap().clone();
    let mut handled: Vec<i64> = calls.iter().map(|c| c.0).collect();
    handled.sort_unstable();
    published.sort_unstable();
    assert_eq!(handled, published, "every row handled exactly once");
    db.drop_db().await;
}

/// Claimers whose leases expire at once (TTL 0) race for the same rows, so a
/// claim often meets a row that another claim updated after its snapshot (the
/// row lock then follows the update to the newest version, and the update
/// finds that version by position). Every claim of a row adds one to its
/// `deliveries`: if a claim took a row it had not locked, took a row of
/// another queue, or two claims saw the same version, the numbers returned
/// would repeat or skip. In the end only each row's last claim can ack it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_racing_for_expired_leases_take_each_row_version_once() {
    let db = setup().await;
    publish_keyed(&db.pool, &["race", "race2", "other"], 200, 5).await;
    type Seen = Arc<Mutex<Vec<outbox::claim::Batch>>>;
    let seen: Seen = Arc::default();
    let race = |queues: &[&str], seen: Seen| {
        let claimer = Claimer::new(
            db.pool.clone(),
            Tables::default(),
            queues.iter().map(|q| q.to_string()).collect(),
        )
        .unwrap()
        .with_batch_size(40)
        .with_lease_ttl(Duration::ZERO);
        async move {
            for _ in 0..40 {
                let b = claimer.claim().await.unwrap();
                seen.lock().unwrap().push(b);
            }
        }
    };
    tokio::join!(
        race(&["race"], seen.clone()),
        race(&["race"], seen.clone()),
        race(&["race"], seen.clone()),
        race(&["race", "race2"], seen.clone()),
        race(&["race", "race2"], seen.clone()),
    );
    let batches = std::mem::take(&mut *seen.lock().unwrap());
    let mut deliveries: HashMap<i64, Vec<u32>> = HashMap::new();
    for b in &batches {
        let mut ids: Vec<i64> = b.rows.iter().map(|r| r.id).collect();
        ids.dedup();
        assert_eq!(ids.len(), b.rows.len(), "a row twice in one claim");
        for r in &b.rows {
            assert_ne!(
                r.queue, "other",
                "a claim took a row of a queue it does not serve"
            );
            // `attempt` is the row's `deliveries` after this claim.
            deliveries.entry(r.id).or_default().push(r.attempt);
        }
    }
    let claims: usize = deliveries.values().map(Vec::len).sum();
    assert!(
        claims > 600,
        "the claimers should have taken rows over from each other ({claims} claims of rows)"
    );
    let stored: HashMap<i64, i32> = sqlx::query("SELECT id, deliveries FROM outbox")
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get("id"), r.get("deliveries")))
        .collect();
    for (id, mut seen) in deliveries.clone() {
        seen.sort_unstable();
        let expected: Vec<u32> = (1..=stored[&id] as u32).collect();
        assert_eq!(
            seen, expected,
            "row {id}: every claim counted once, each saw its own version"
        );
    }
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE queue = 'other' AND deliveries > 0"
        )
        .await,
        0
    );

    // Acks, oldest claim first: a row goes only with its last claim's token
    // and position, never with an earlier one.
    let acker = Claimer::new(db.pool.clone(), Tables::default(), vec!["race".into()]).unwrap();
    for b in &batches {
        let last_claims = b
            .rows
            .iter()
            .filter(|r| r.attempt as i32 == stored[&r.id])
            .count();
        let ids: Vec<i64> = b.rows.iter().map(|r| r.id).collect();
        let deleted = acker.ack_at(b.token, &b.positions, &ids).await.unwrap();
        assert_eq!(
            deleted as usize, last_claims,
            "an ack deletes exactly the rows its claim still holds"
        );
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox WHERE deliveries > 0").await,
        0
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox").await,
        600 - deliveries.len() as i64
    );
    db.drop_db().await;
}

/// A subscriber starts each claim after the rows it claimed before while
/// claims come back full, instead of walking past every leased row from the
/// oldest due one. Rows before that point that become claimable during a long
/// backlog are not left for its end: a row committed late with a lower id
/// (and an older `next_attempt_at`), and in the id order of every queue a
/// retry that falls due, are handled while the backlog still drains (a claim
/// starts from the oldest due row at least every second), and every row is
/// handled once (the retried one twice). `every_queue`: the relay's claim (by id) instead of one queue's (by
/// due time and id).
async fn rows_before_the_cursor_are_handled_during_a_backlog(every_queue: bool) {
    let db = setup().await;
    let pool = &db.pool;
    let queue_of = |i: usize| {
        if every_queue && i % 2 == 1 {
            "qb"
        } else {
            "qa"
        }
    };
    // The late row takes the lowest id and the oldest time, and commits once
    // the backlog drains.
    let mut late_tx = pool.begin().await.unwrap();
    let late = outbox::publish(&mut *late_tx, "qa", &"late").await.unwrap();
    let n = 6_000;
    let ob = Outbox::default();
    for chunk in (0..n).collect::<Vec<usize>>().chunks(1_000) {
        let msgs = chunk
            .iter()
            .map(|i| Message::json(queue_of(*i), i).unwrap())
            .collect();
        ob.publish_batch(pool, msgs).await.unwrap();
    }
    let first_backlog_id: i64 = sqlx::query_scalar("SELECT min(id) FROM outbox")
        .fetch_one(pool)
        .await
        .unwrap();
    let retried = first_backlog_id + 10;

    let calls: Calls = Default::default();
    let seen = calls.clone();
    let failed_once = Arc::new(AtomicUsize::new(0));
    let handler = move |env: Arc<Envelope>, _ctx: Context| {
        seen.lock().unwrap().push((env.id, Instant::now()));
        let fail = env.id == retried && failed_once.fetch_add(1, Ordering::SeqCst) == 0;
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if fail {
                Err(HandlerError::transient("fails once"))
            } else {
                Ok(Output::none())
            }
        }) as BoxFuture<'static, Result<Output, HandlerError>>
    };
    let sub = Subscriber::new("cursor", handler);
    let sub = if every_queue {
        sub.all_queues()
    } else {
        sub.queue("qa")
    };
    // About 2,000 rows/s: the backlog lasts about 3 s.
    let sub = fast(sub)
        .batch_size(50)
        .concurrency(5)
        .workers(2)
        .retry(ConstantRetry::new(Duration::from_millis(100)).jitter(0.0));
    let running = App::manual(pool.clone())
        .register(sub)
        .start()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    late_tx.commit().await.unwrap();
    eventually("outbox drained", Duration::from_secs(60), || async {
        count(pool, "select count(*) from outbox").await == 0
    })
    .await;
    running.shutdown().await;

    let calls = calls.lock().unwrap().clone();
    let mut per_row: HashMap<i64, usize> = HashMap::new();
    for (id, _) in &calls {
        *per_row.entry(*id).or_default() += 1;
    }
    assert_eq!(per_row.len(), n + 1, "every row handled");
    assert_eq!(per_row[&retried], 2, "the failed row handled again");
    assert!(
        per_row.iter().all(|(id, c)| *id == retried || *c == 1),
        "no other row handled twice"
    );
    let at = |id: i64| {
        calls
            .iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, t)| *t)
            .max()
            .unwrap()
    };
    let backlog_done = calls.iter().map(|(_, t)| *t).max().unwrap();
    let started = calls.iter().map(|(_, t)| *t).min().unwrap();
    assert!(
        backlog_done - started > Duration::from_secs(2),
        "the backlog should last a few seconds (took {:?})",
        backlog_done - started
    );
    // In one queue the retry is due 100 ms after its nack, after the whole
    // backlog (oldest due first): only the late row must come early there.
    let early: &[(&str, i64)] = if every_queue {
        &[("late row", late), ("retried row", retried)]
    } else {
        &[("late row", late)]
    };
    for &(what, id) in early {
        assert!(
            backlog_done - at(id) > Duration::from_millis(500),
            "the {what} was left for the end of the backlog ({:?} before its end)",
            backlog_done - at(id)
        );
    }
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_queue_claims_take_rows_before_their_cursor_during_a_backlog() {
    rows_before_the_cursor_are_handled_during_a_backlog(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_queue_claims_take_rows_before_their_cursor_during_a_backlog() {
    rows_before_the_cursor_are_handled_during_a_backlog(true).await;
}
