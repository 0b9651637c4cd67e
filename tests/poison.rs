//! Poison handlers and payloads against a real PostgreSQL: each ends in its
//! documented state, and the app keeps running and handles a healthy row
//! afterwards.
//!
//! Covered elsewhere, not repeated here (tests/engine.rs): a handler that always
//! fails (retried on schedule, then dead-lettered), a crashed instance's rows
//! coming back after the lease, not-JSON and wrong-shape payloads through
//! `Envelope::json`; oversize messages on Kafka are in tests/kafka.rs.

mod common;

use common::{count, eventually, fast, TestDb};
use outbox::{App, Context, Envelope, ExponentialRetry, HandlerError, Message, Output, Subscriber};
use sqlx::{PgPool, Row};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn setup() -> TestDb {
    common::migrated("outbox=error").await
}

fn quick_retry(attempts: u32) -> ExponentialRetry {
    ExponentialRetry::default()
        .initial(Duration::from_millis(50))
        .max_delay(Duration::from_millis(200))
        .max_attempts(attempts)
}

/// Publishes `"healthy"` to `queue` and waits until the outbox is empty.
async fn healthy_row_is_handled(pool: &PgPool, queue: &str, handled: &AtomicUsize) {
    let before = handled.load(Ordering::SeqCst);
    outbox::publish(pool, queue, &"healthy").await.unwrap();
    eventually(
        "a healthy row handled afterwards",
        Duration::from_secs(15),
        || async {
            count(pool, "select count(*) from outbox").await == 0
                && handled.load(Ordering::SeqCst) > before
        },
    )
    .await;
}

/// The attempts a handler saw, and how many rows it handled with success.
#[derive(Default)]
struct Seen {
    attempts: Mutex<Vec<(i64, u32)>>,
    ok: AtomicUsize,
}

#[tokio::test]
async fn a_handler_failing_twice_then_succeeding_is_handled_on_the_third_attempt() {
    let db = setup().await;
    let pool = &db.pool;
    let id = outbox::publish(pool, "flaky", &"x").await.unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let handler = move |env: Arc<Envelope>, _ctx: Context| {
        let s = s.clone();
        async move {
            s.attempts.lock().unwrap().push((env.id, env.attempt));
            if env.payload == b"\"x\"" && env.attempt < 3 {
                return Err(HandlerError::transient(format!(
                    "not yet (attempt {})",
                    env.attempt
                )));
            }
            s.ok.fetch_add(1, Ordering::SeqCst);
            Ok(Output::none())
        }
    };
    let running = App::manual(pool.clone())
        .register(fast(Subscriber::new("flaky", handler).queue("flaky")).retry(quick_retry(5)))
        .start()
        .await
        .unwrap();
    eventually("handled", Duration::from_secs(10), || async {
        count(pool, "select count(*) from outbox").await == 0
    })
    .await;
    assert_eq!(
        *seen.attempts.lock().unwrap(),
        vec![(id, 1), (id, 2), (id, 3)],
        "two failures, then success"
    );
    assert_eq!(count(pool, "select count(*) from outbox_dlq").await, 0);
    healthy_row_is_handled(pool, "flaky", &seen.ok).await;
    running.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_panicking_handler_is_retried_then_dead_lettered_and_the_app_keeps_running() {
    let db = setup().await;
    let pool = &db.pool;
    let id = outbox::publish(pool, "boom", &"poison").await.unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let handler = move |env: Arc<Envelope>, _ctx: Context| {
        let s = s.clone();
        async move {
            s.attempts.lock().unwrap().push((env.id, env.attempt));
            if env.payload == b"\"poison\"" {
                panic!("boom on row {}", env.id);
            }
            s.ok.fetch_add(1, Ordering::SeqCst);
            Ok(Output::none())
        }
    };
    let running = App::manual(pool.clone())
        .register(fast(Subscriber::new("boom", handler).queue("boom")).retry(quick_retry(3)))
        .start()
        .await
        .unwrap();
    eventually("dead-lettered", Duration::from_secs(10), || async {
        count(pool, "select count(*) from outbox_dlq").await == 1
    })
    .await;
    let row =
        sqlx::query("select original_id, failure_reason, last_error, attempts from outbox_dlq")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(row.get::<i64, _>(0), id);
    assert_eq!(row.get::<String, _>(1), "retries_exhausted");
    let last_error = row.get::<String, _>(2);
    assert!(
        last_error.contains("handler panicked")
            && last_error.contains(&format!("boom on row {id}")),
        "{last_error}"
    );
    assert_eq!(row.get::<i32, _>(3), 3);
    assert_eq!(
        seen.attempts.lock().unwrap().len(),
        3,
        "retried, 3 attempts"
    );
    healthy_row_is_handled(pool, "boom", &seen.ok).await;
    running.shutdown().await;
    db.drop_db().await;
}

/// A closure handler that panics while it makes its future (before the first
/// poll), rather than inside it: the panic is caught like one inside the
/// future, the row is retried then dead-lettered, and the worker lives on.
#[tokio::test]
async fn a_handler_panicking_before_its_future_does_not_stop_the_subscriber() {
    let db = setup().await;
    let pool = &db.pool;
    outbox::publish(pool, "sync_boom", &"poison").await.unwrap();
    let ok = Arc::new(AtomicUsize::new(0));
    let o = ok.clone();
    let handler = move |env: Arc<Envelope>, _ctx: Context| {
        assert!(env.payload != b"\"poison\"", "sync boom on row {}", env.id);
        o.fetch_add(1, Ordering::SeqCst);
        async { Ok(Output::none()) }
    };
    let running = App::manual(pool.clone())
        .register(
            fast(Subscriber::new("sync_boom", handler).queue("sync_boom"))
                .retry(quick_retry(2))
                .lease_ttl(Duration::from_secs(2)),
        )
        .start()
        .await
        .unwrap();
    eventually("dead-lettered", Duration::from_secs(15), || async {
        count(pool, "select count(*) from outbox_dlq").await == 1
    })
    .await;
    healthy_row_is_handled(pool, "sync_boom", &ok).await;
    running.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_handler_hanging_past_its_lease_is_abandoned_and_the_row_handled_again() {
    let db = setup().await;
    let pool = &db.pool;
    let id = outbox::publish(pool, "slow", &"hang once").await.unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let handler = move |env: Arc<Envelope>, _ctx: Context| {
        let s = s.clone();
        async move {
            s.attempts.lock().unwrap().push((env.id, env.attempt));
            if env.payload == b"\"hang once\"" && env.attempt == 1 {
                futures::future::pending::<()>().await;
            }
            s.ok.fetch_add(1, Ordering::SeqCst);
            Ok(Output::none())
        }
    };
    let started = Instant::now();
    let running = App::manual(pool.clone())
        .register(
            fast(Subscriber::new("slow", handler).queue("slow"))
                .lease_ttl(Duration::from_secs(1))
                .retry(quick_retry(5)),
        )
        .start()
        .await
        .unwrap();
    // Meanwhile other rows are not held up by the hanging one.
    outbox::publish(pool, "slow", &"quick").await.unwrap();
    eventually("handled again", Duration::from_secs(15), || async {
        count(pool, "select count(*) from outbox").await == 0
    })
    .await;
    // The handler's budget is the lease less a tenth kept for settling (0.9 s).
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "abandoned before its budget (lease less a tenth) ran out"
    );
    let attempts: Vec<u32> = seen
        .attempts
        .lock()
        .unwrap()
        .iter()
        .filter(|(i, _)| *i == id)
        .map(|(_, a)| *a)
        .collect();
    assert_eq!(
        attempts,
        vec![1, 2],
        "abandoned after the lease, then handled"
    );
    assert_eq!(count(pool, "select count(*) from outbox_dlq").await, 0);
    healthy_row_is_handled(pool, "slow", &seen.ok).await;
    running.shutdown().await;
    db.drop_db().await;
}

// ------------------------------------------------------------------ payloads

/// The typed payload of the macro handler below.
#[derive(Debug, serde::Deserialize)]
struct Note {
    id: i64,
    text: String,
}

static NOTES: Mutex<Vec<(i64, String)>> = Mutex::new(Vec::new());
static BLOBS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

#[outbox::subscriber("poison.typed", retry = outbox::NoRetry)]
async fn typed_note(note: Note) {
    NOTES.lock().unwrap().push((note.id, note.text));
}

#[outbox::subscriber("poison.raw")]
async fn raw_blob(blob: outbox::Raw) {
    BLOBS.lock().unwrap().push(blob.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_end_handled_or_dead_lettered_and_the_app_keeps_running() {
    let db = setup().await;
    let pool = &db.pool;
    let five_mb_text = "x".repeat(5 * 1024 * 1024);
    let five_mb_bytes: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let raw_with_nul = b"\0{\"id\":3,\"text\":\"t\"}\0\xff".to_vec();

    let publish_bytes = |queue: &'static str, bytes: Vec<u8>| async move {
        Message::bytes(queue, bytes)
            .publish(pool)
            .await
            .unwrap()
            .unwrap()
    };
    // Typed handler: not JSON, wrong shape, raw NUL bytes -> dead letters
    // (deserialize, one attempt); NUL inside a JSON string and 5 MB -> handled.
    let not_json = publish_bytes("poison.typed", b"not json".to_vec()).await;
    let wrong_shape = outbox::publish(pool, "poison.typed", &serde_json::json!({"id": "seven"}))
        .await
        .unwrap();
    let raw_nul_typed = publish_bytes("poison.typed", raw_with_nul.clone()).await;
    outbox::publish(
        pool,
        "poison.typed",
        &serde_json::json!({"id": 1, "text": "a\u{0}b"}),
    )
    .await
    .unwrap();
    outbox::publish(
        pool,
        "poison.typed",
        &serde_json::json!({"id": 2, "text": five_mb_text}),
    )
    .await
    .unwrap();
    // Raw handler: bytes arrive unchanged, NULs and 5 MB included.
    publish_bytes("poison.raw", raw_with_nul.clone()).await;
    publish_bytes("poison.raw", five_mb_bytes.clone()).await;

    let running = App::manual(pool.clone())
        .subscriber(typed_note)
        .subscriber(raw_blob)
        .start()
        .await
        .unwrap();
    eventually("every row settled", Duration::from_secs(30), || async {
        count(pool, "select count(*) from outbox").await == 0
    })
    .await;

    let dead = sqlx::query(
        "select original_id, failure_reason, last_error, attempts from outbox_dlq order by original_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let ids: Vec<i64> = dead.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![not_json, wrong_shape, raw_nul_typed]);
    for r in &dead {
        assert_eq!(r.get::<String, _>(1), "deserialize");
        assert_eq!(r.get::<i32, _>(3), 1, "not retried");
        assert!(!r.get::<String, _>(2).is_empty());
    }
    assert!(
        dead[1].get::<String, _>(2).contains("invalid type"),
        "{}",
        dead[1].get::<String, _>(2)
    );

    {
        let mut notes = NOTES.lock().unwrap().clone();
        notes.sort();
        assert_eq!(
            notes.len(),
            2,
            "{:?}",
            notes.iter().map(|n| n.0).collect::<Vec<_>>()
        );
        assert_eq!(notes[0], (1, "a\0b".to_owned()), "the NUL survives");
        assert_eq!(notes[1].0, 2);
        assert_eq!(notes[1].1.len(), five_mb_text.len());
        let blobs = BLOBS.lock().unwrap();
        assert_eq!(blobs.len(), 2);
        assert!(blobs.contains(&raw_with_nul));
        assert!(blobs.contains(&five_mb_bytes), "5 MB unchanged");
    }

    // Still running: a healthy row on each queue.
    outbox::publish(
        pool,
        "poison.typed",
        &serde_json::json!({"id": 4, "text": "ok"}),
    )
    .await
    .unwrap();
    publish_bytes("poison.raw", b"ok".to_vec()).await;
    eventually("healthy rows handled", Duration::from_secs(15), || async {
        count(pool, "select count(*) from outbox").await == 0
            && NOTES.lock().unwrap().iter().any(|n| n.0 == 4)
            && BLOBS.lock().unwrap().iter().any(|b| b == b"ok")
    })
    .await;
    assert_eq!(count(pool, "select count(*) from outbox_dlq").await, 3);
    running.shutdown().await;
    db.drop_db().await;
}

/// Manual acknowledgement that never settles for good: a handler that always
/// nacks with its own delay, and one that returns without deciding. Both
/// count attempts and end in the DLQ when the retry budget is spent (neither
/// loops forever); a handler that acks and then returns `Err` has its row
/// deleted, not retried.
#[tokio::test]
async fn manual_ack_decisions_are_bounded_by_the_retry_budget() {
    use outbox::{AckPolicy, FromContext};
    let db = setup().await;
    let pool = &db.pool;
    let nack_id = outbox::publish(pool, "manual", &"nack").await.unwrap();
    let silent_id = outbox::publish(pool, "manual", &"silent").await.unwrap();
    let acked_id = outbox::publish(pool, "manual", &"ack then err")
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let handler = move |env: Arc<Envelope>, ctx: Context| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            let ack = outbox::Ack::from_context(&env, &ctx)?;
            match env.payload.as_slice() {
                b"\"nack\"" => ack.nack(Some(Duration::from_millis(10)), "not yet"),
                b"\"silent\"" => {}
                _ => {
                    ack.ack();
                    return Err(HandlerError::transient("cleanup failed after the ack"));
                }
            }
            Ok(Output::none())
        }
    };
    let running = App::manual(pool.clone())
        .register(
            fast(Subscriber::new("manual", handler).queue("manual"))
                .ack_policy(AckPolicy::Manual)
                .retry(quick_retry(3)),
        )
        .start()
        .await
        .unwrap();
    eventually(
        "both undecided rows dead-lettered",
        Duration::from_secs(20),
        || async { count(pool, "select count(*) from outbox_dlq").await == 2 },
    )
    .await;
    running.shutdown().await;
    assert_eq!(
        count(pool, "select count(*) from outbox").await,
        0,
        "outbox empty"
    );
    let rows = sqlx::query(
        "select original_id, failure_reason, attempts from outbox_dlq order by original_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let got: Vec<(i64, String, i32)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![
            (nack_id, "retries_exhausted".to_owned(), 3),
            (silent_id, "retries_exhausted".to_owned(), 3),
        ],
        "each undecided row tried 3 times, then dead-lettered"
    );
    assert!(
        got.iter().all(|(id, _, _)| *id != acked_id),
        "the acked row is deleted, not dead-lettered"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        7,
        "3 + 3 attempts + 1 for the acked row"
    );
    db.drop_db().await;
}
