//! Containment against a real PostgreSQL: no row escapes both its retries and
//! the dead letters, whatever its handler, its broker, the table or another
//! producer does to it. Each test attacks one way a row could be trapped
//! (re-claimed forever, never counted) or lost (deleted undelivered), and
//! counts the rows afterwards.

mod common;

use common::{count, eventually, fast, TestDb};
use futures::future::BoxFuture;
use outbox::claim::{Claimer, RowPosition};
use outbox::{
    AckPolicy, App, Context, Envelope, FromContext, HandlerError, Message, NoRetry, Outgoing,
    Output, Sink, SinkError, Subscriber, Tables,
};
use sqlx::PgPool;
use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn setup() -> TestDb {
    common::migrated("outbox=error").await
}

async fn scalar<T>(pool: &PgPool, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// `(original_id, failure_reason, last_error)` of every dead letter, by id.
async fn dead_letters(pool: &PgPool) -> Vec<(i64, String, String)> {
    sqlx::query_as(
        "select original_id, failure_reason, coalesce(last_error, '') from outbox_dlq order by original_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A sink that records what it was sent, after waiting `delay` per batch.
struct Recorder {
    name: &'static str,
    delay: Duration,
    sent: Mutex<Vec<Outgoing>>,
    /// Answer no result at all (a broken sink).
    mute: bool,
}

impl Recorder {
    fn new(name: &'static str) -> Arc<Self> {
        Arc::new(Self {
            name,
            delay: Duration::ZERO,
            sent: Mutex::new(Vec::new()),
            mute: false,
        })
    }

    /// The `outbox-id` header of every message sent, in order.
    fn ids(&self) -> Vec<i64> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .map(|o| header(o, "outbox-id").parse().unwrap())
            .collect()
    }
}

fn header(o: &Outgoing, name: &str) -> String {
    let values: Vec<&Vec<u8>> = o
        .headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        values.len(),
        1,
        "exactly one {name} header in {:?}",
        o.headers
    );
    String::from_utf8(values[0].clone()).unwrap()
}

impl Sink for Recorder {
    fn name(&self) -> &str {
        self.name
    }

    fn send(&self, batch: Vec<Outgoing>) -> BoxFuture<'_, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            let n = batch.len();
            self.sent.lock().unwrap().extend(batch);
            if self.mute {
                Vec::new()
            } else {
                vec![Ok(()); n]
            }
        })
    }
}

/// A handler that forwards the payload to sink `sink`, topic `t`.
fn forward(sink: &'static str) -> impl outbox::Handler {
    move |env: Arc<Envelope>, _ctx: Context| async move {
        Ok(Output::none().publish(sink, "t", None, env.payload.clone()))
    }
}

#[derive(serde::Deserialize, Debug)]
#[allow(dead_code)]
enum Kind {
    Created,
    Cancelled,
}

#[derive(serde::Deserialize, Debug)]
#[allow(dead_code)]
struct Order {
    kind: Kind,
}

/// Point 1: serde prints an unknown enum variant raw, so a payload with a NUL
/// in it gives an error text PostgreSQL's `text` refuses. The row and the
/// rows dead-lettered in the same statement are all dead-lettered, the NUL
/// replaced; the app goes on handling healthy rows.
#[tokio::test]
async fn an_error_text_with_a_nul_is_stored_and_its_batch_neighbours_are_dead_lettered_with_it() {
    let db = setup().await;
    let pool = &db.pool;
    let poison = Message::bytes("orders", br#"{"kind":"\u0000"}"#.to_vec())
        .publish(pool)
        .await
        .unwrap()
        .unwrap();
    let mut others = Vec::new();
    for variant in ["Shipped", "Lost", "Returned", "Unknown"] {
        let payload = format!(r#"{{"kind":"{variant}"}}"#).into_bytes();
        others.push(
            Message::bytes("orders", payload)
                .publish(pool)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let handler = move |env: Arc<Envelope>, _ctx: Context| {
        let h = h.clone();
        async move {
            let _order: Order = env.json()?;
            h.fetch_add(1, Ordering::SeqCst);
            Ok(Output::none())
        }
    };
    let running = App::manual(pool.clone())
        .register(fast(Subscriber::new("orders", handler).queue("orders")))
        .start()
        .await
        .unwrap();
    eventually(
        "all five rows dead-lettered",
        Duration::from_secs(15),
        || async { count(pool, "select count(*) from outbox_dlq").await == 5 },
    )
    .await;
    let letters = dead_letters(pool).await;
    let mut expected: Vec<i64> = others.clone();
    expected.push(poison);
    expected.sort();
    assert_eq!(
        letters.iter().map(|l| l.0).collect::<Vec<_>>(),
        expected,
        "every row of the batch is dead-lettered"
    );
    for (id, reason, error) in &letters {
        assert_eq!(reason, "deserialize", "row {id}");
        assert!(!error.contains('\0'));
    }
    let poison_error = &letters.iter().find(|l| l.0 == poison).unwrap().2;
    assert!(
        poison_error.contains("unknown variant `\u{fffd}`"),
        "the NUL is replaced, the rest of the error kept: {poison_error:?}"
    );
    assert_eq!(count(pool, "select count(*) from outbox").await, 0);
    outbox::publish(pool, "orders", &serde_json::json!({"kind": "Created"}))
        .await
        .unwrap();
    eventually("a healthy row handled", Duration::from_secs(10), || async {
        handled.load(Ordering::SeqCst) == 1
    })
    .await;
    running.shutdown().await;
    db.drop_db().await;
}

/// Point 1: an error text of 100 KB is stored cut to 8 KiB, the cut marked.
#[tokio::test]
async fn a_long_error_text_is_stored_cut_to_8_kib_with_the_cut_marked() {
    let db = setup().await;
    let pool = &db.pool;
    let id = outbox::publish(pool, "long", &"x").await.unwrap();
    let handler = |_env: Arc<Envelope>, _ctx: Context| async move {
        Err::<Output, _>(HandlerError::transient("é".repeat(50_000)))
    };
    let running = App::manual(pool.clone())
        .register(
            fast(Subscriber::new("long", handler).queue("long")).retry(ConstantRetryLong::get()),
        )
        .start()
        .await
        .unwrap();
    eventually("the failure stored", Duration::from_secs(10), || async {
        count(pool, "select count(*) from outbox where attempts = 1").await == 1
    })
    .await;
    running.shutdown().await;
    let error: String = sqlx::query_scalar("select last_error from outbox where id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(error.len() <= 8 * 1024, "{} bytes stored", error.len());
    assert!(error.len() > 8 * 1024 - 64, "{} bytes stored", error.len());
    assert!(
        error.ends_with("[cut: 100000 bytes in all]"),
        "the cut is marked: {:?}",
        &error[error.len() - 40..]
    );
    db.drop_db().await;
}

/// A retry after a minute: the row stays in the outbox for the assertions.
struct ConstantRetryLong;
impl ConstantRetryLong {
    fn get() -> outbox::ConstantRetry {
        outbox::ConstantRetry::new(Duration::from_secs(60)).max_attempts(10)
    }
}

/// Point 1: `Ack::nack` with `Duration::MAX` would overflow `now() +
/// interval` in the database; the delay is clamped to a year and the attempt
/// counted, so the row does not come back every lease.
#[tokio::test]
async fn a_nack_with_duration_max_is_stored_clamped_to_a_year() {
    let db = setup().await;
    let pool = &db.pool;
    let id = outbox::publish(pool, "later", &"x").await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let handler = move |env: Arc<Envelope>, ctx: Context| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            outbox::Ack::from_context(&env, &ctx)?.nack(Some(Duration::MAX), "much later");
            Ok(Output::none())
        }
    };
    let running = App::manual(pool.clone())
        .register(
            fast(Subscriber::new("later", handler).queue("later"))
                .ack_policy(AckPolicy::Manual)
                .lease_ttl(Duration::from_secs(1)),
        )
        .start()
        .await
        .unwrap();
    eventually("the nack stored", Duration::from_secs(10), || async {
        count(
            pool,
            "select count(*) from outbox where attempts = 1 and lease_token is null",
        )
        .await
            == 1
    })
    .await;
    // Past the lease: a failed nack would have brought the row back by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    running.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "handled once");
    let days: f64 = sqlx::query_scalar(
        "select extract(epoch from next_attempt_at - now())::float8 / 86400 from outbox where id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert!((364.0..=365.0).contains(&days), "due in {days} days");
    db.drop_db().await;
}

/// Point 1: one row the dead-letter table refuses (a trigger of the user's)
/// fails the batched statement; its neighbours are dead-lettered row by row,
/// and it is parked in the outbox, so that it stops coming back.
#[tokio::test]
async fn a_row_the_dead_letter_table_refuses_is_parked_and_its_neighbours_are_dead_lettered() {
    let db = setup().await;
    let pool = &db.pool;
    sqlx::raw_sql(
        "create function refuse_poison() returns trigger language plpgsql as $$ \
         begin if new.payload = convert_to('\"poison\"', 'UTF8') then \
           raise exception 'this table takes no poison'; end if; return new; end $$; \
         create trigger refuse_poison before insert on outbox_dlq \
           for each row execute function refuse_poison();",
    )
    .execute(pool)
    .await
    .unwrap();
    let mut ids = Vec::new();
    for p in ["a", "b", "poison", "c", "d", "e"] {
        ids.push(outbox::publish(pool, "refused", &p).await.unwrap());
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let handler = move |_env: Arc<Envelope>, _ctx: Context| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            Err::<Output, _>(HandlerError::reject("not wanted"))
        }
    };
    let running = App::manual(pool.clone())
        .register(
            fast(Subscriber::new("refused", handler).queue("refused"))
                .lease_ttl(Duration::from_secs(1)),
        )
        .start()
        .await
        .unwrap();
    eventually(
        "five dead letters and one parked row",
        Duration::from_secs(15),
        || async {
            count(pool, "select count(*) from outbox_dlq").await == 5
                && count(
                    pool,
                    "select count(*) from outbox where parked_at is not null",
                )
                .await
                    == 1
        },
    )
    .await;
    // Past the lease: nothing comes back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    running.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 6, "each row handled once");
    let parked: (i64, String) =
        sqlx::query_as("select id, failure_reason from outbox where parked_at is not null")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(parked, (ids[2], "rejected".to_owned()));
    assert_eq!(count(pool, "select count(*) from outbox").await, 1);
    db.drop_db().await;
}

/// Point 3: after `VACUUM FULL` between claim and ack, a position the claim
/// returned addresses another row of the same batch; acking half the batch
/// deletes exactly those ids, never the rows now found at their old places.
#[tokio::test]
async fn an_ack_after_vacuum_full_deletes_exactly_the_acked_ids() {
    let db = setup().await;
    let pool = &db.pool;
    // 24 small rows on one page; the odd ones deleted and vacuumed, so that
    // the claim writes the even ones into the freed line pointers: row 4 at
    // the third, row 6 at the fifth, ...
    let mut ids = Vec::new();
    for i in 0..24 {
        ids.push(outbox::publish(pool, "rw", &i).await.unwrap());
    }
    let odd: Vec<i64> = ids.iter().step_by(2).copied().collect();
    sqlx::query("delete from outbox where id = any($1)")
        .bind(&odd)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("vacuum outbox").execute(pool).await.unwrap();
    let claimer = Claimer::new(pool.clone(), Tables::default(), vec!["rw".into()])
        .unwrap()
        .with_batch_size(100);
    let batch = claimer.claim().await.unwrap();
    assert_eq!(batch.rows.len(), 12);
    sqlx::query("vacuum full outbox")
        .execute(pool)
        .await
        .unwrap();

    let half = 6;
    let acked: Vec<i64> = batch.rows[..half].iter().map(|r| r.id).collect();
    let kept: Vec<i64> = batch.rows[half..].iter().map(|r| r.id).collect();
    let positions: Vec<RowPosition> = batch.positions[..half].to_vec();
    let at_old_places: Vec<i64> =
        sqlx::query_scalar("select id from outbox where ctid = any($1) order by id")
            .bind(&positions)
            .fetch_all(pool)
            .await
            .unwrap();
    assert!(
        at_old_places.iter().any(|id| kept.contains(id)),
        "the rewrite puts rows not acked at the acked rows' old positions (else this test proves nothing): {at_old_places:?}, kept {kept:?}"
    );

    let done = claimer
        .ack_at(batch.token, &positions, &acked)
        .await
        .unwrap();
    assert_eq!(done, half as u64);
    let left: Vec<i64> = sqlx::query_scalar("select id from outbox order by id")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(left, kept, "exactly the acked ids are gone");
    db.drop_db().await;
}

/// The child process of the crash test: runs the `crashy` subscriber on the
/// database in `OUTBOX_CRASH_CHILD_URL` until the outbox is empty. Its
/// handler aborts the process on the payload "poison". Run by
/// `a_payload_that_aborts_the_process_is_dead_lettered_as_crashed`, not alone.
#[test]
#[ignore = "child process of a_payload_that_aborts_the_process_is_dead_lettered_as_crashed"]
fn crash_child_process() {
    let url = std::env::var("OUTBOX_CRASH_CHILD_URL").expect("run by the crash test only");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = PgPool::connect(&url).await.unwrap();
        let handler = |env: Arc<Envelope>, ctx: Context| async move {
            let pool = PgPool::from_context(&env, &ctx)?;
            sqlx::query("insert into calls (row_id) values ($1)")
                .bind(env.id)
                .execute(&pool)
                .await
                .map_err(HandlerError::transient)?;
            if env.payload == b"\"poison\"" {
                std::process::abort();
            }
            Ok(Output::none())
        };
        let running = App::manual(pool.clone())
            .register(
                fast(Subscriber::new("crashy", handler).queue("crashy"))
                    .lease_ttl(Duration::from_secs(1))
                    .max_deliveries(3),
            )
            .start()
            .await
            .unwrap();
        let started = Instant::now();
        while count(&pool, "select count(*) from outbox").await > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "child: not done in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        running.shutdown().await;
    });
}

/// Point 2: a payload whose handler aborts the process. Each start of the
/// app delivers it again; after `max_deliveries` (3) deliveries that were
/// never settled it is dead-lettered as `crashed` without its handler running
/// again. The healthy rows claimed with it are handled, each at most twice
/// (in the batch that crashed, then alone), not once per crash.
#[tokio::test]
async fn a_payload_that_aborts_the_process_is_dead_lettered_as_crashed() {
    let db = setup().await;
    let pool = &db.pool;
    sqlx::query("create table calls (row_id int8 not null)")
        .execute(pool)
        .await
        .unwrap();
    let poison = outbox::publish(pool, "crashy", &"poison").await.unwrap();
    let mut healthy = Vec::new();
    for i in 0..9 {
        healthy.push(outbox::publish(pool, "crashy", &i).await.unwrap());
    }
    let exe = std::env::current_exe().unwrap();
    let mut crashes = 0;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "not done in 90 s"
        );
        let status = Command::new(&exe)
            .args(["--ignored", "--exact", "crash_child_process", "--nocapture"])
            .env("OUTBOX_CRASH_CHILD_URL", &db.url)
            .env("RUST_LOG", "outbox=error")
            .status()
            .unwrap();
        if status.success() {
            break;
        }
        crashes += 1;
        assert!(crashes <= 3, "the process crashed {crashes} times");
    }
    assert_eq!(crashes, 3, "one crash per delivery of the poison row");
    assert_eq!(
        dead_letters(pool)
            .await
            .into_iter()
            .map(|l| (l.0, l.1))
            .collect::<Vec<_>>(),
        vec![(poison, "crashed".to_owned())]
    );
    let calls: Vec<(i64, i64)> =
        sqlx::query_as("select row_id, count(*) from calls group by row_id order by row_id")
            .fetch_all(pool)
            .await
            .unwrap();
    let calls: HashMap<i64, i64> = calls.into_iter().collect();
    assert_eq!(
        calls.get(&poison),
        Some(&3),
        "the handler ran 3 times on the poison row"
    );
    for id in &healthy {
        let n = calls.get(id).copied().unwrap_or(0);
        assert!((1..=2).contains(&n), "healthy row {id} handled {n} times");
    }
    assert_eq!(count(pool, "select count(*) from outbox").await, 0);
    db.drop_db().await;
}

/// Point 2: a handler that blocks its thread (no `.await` in sight) is cut
/// at its time limit while it still blocks, and its row retried; without a
/// task of its own, the limit could not fire until the handler returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_blocks_its_thread_is_cut_at_its_time_limit() {
    let db = setup().await;
    let pool = &db.pool;
    let id = outbox::publish(pool, "blocking", &"x").await.unwrap();
    let handler = |env: Arc<Envelope>, _ctx: Context| async move {
        if env.attempt == 1 {
            std::thread::sleep(Duration::from_secs(6));
        }
        Ok(Output::none())
    };
    let running = App::manual(pool.clone())
        .register(
            fast(Subscriber::new("blocking", handler).queue("blocking"))
                .lease_ttl(Duration::from_secs(2))
                .retry(ConstantRetryLong::get()),
        )
        .start()
        .await
        .unwrap();
    let started = Instant::now();
    eventually(
        "the first attempt cut and counted",
        Duration::from_secs(10),
        || async { count(pool, "select count(*) from outbox where attempts = 1").await == 1 },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut after {:?}, while the handler still blocked",
        started.elapsed()
    );
    let error: String = sqlx::query_scalar("select last_error from outbox where id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(
        error.contains("did not finish within its time limit"),
        "{error}"
    );
    running.shutdown().await;
    db.drop_db().await;
}

/// Points 4 and 5: sends slower than the lease (a broker that takes 2.5 s
/// per batch, a lease of 1 s), two instances, ordered keys. The lease is
/// renewed while the batch is in flight: no row is taken over mid-send, so
/// none is sent twice, every row is acked at its first attempt, and each key's
/// rows go out in id order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_slower_than_the_lease_keeps_its_lease_and_is_sent_once() {
    let db = setup().await;
    let pool = &db.pool;
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    for i in 0..12 {
        let key = format!("k{}", i % 3);
        let id = Message::json("slow", &i)
            .unwrap()
            .key(key.clone())
            .publish(pool)
            .await
            .unwrap()
            .unwrap();
        by_key.entry(key).or_default().push(id);
    }
    let mut instances = Vec::new();
    let mut sinks = Vec::new();
    for _ in 0..2 {
        let sink = Arc::new(Recorder {
            name: "slow",
            delay: Duration::from_millis(2500),
            sent: Mutex::new(Vec::new()),
            mute: false,
        });
        sinks.push(sink.clone());
        instances.push(
            App::manual(pool.clone())
                .broker_arc(sink)
                .register(
                    fast(Subscriber::new("slow", forward("slow")).queue("slow"))
                        .ordered(true)
                        .lease_ttl(Duration::from_secs(1)),
                )
                .start()
                .await
                .unwrap(),
        );
    }
    eventually("every row acked", Duration::from_secs(40), || async {
        count(pool, "select count(*) from outbox").await == 0
    })
    .await;
    for i in instances {
        i.shutdown().await;
    }
    let mut sent: Vec<i64> = sinks.iter().flat_map(|s| s.ids()).collect();
    let mut all: Vec<i64> = by_key.values().flatten().copied().collect();
    sent.sort();
    all.sort();
    assert_eq!(sent, all, "every row sent exactly once");
    for s in &sinks {
        for o in s.sent.lock().unwrap().iter() {
            assert_eq!(header(o, "outbox-attempt"), "1", "first delivery");
        }
        // Per key, the order this instance sent in is the id order.
        let ids = s.ids();
        for key_ids in by_key.values() {
            let mine: Vec<i64> = ids
                .iter()
                .filter(|i| key_ids.contains(i))
                .copied()
                .collect();
            let mut sorted = mine.clone();
            sorted.sort();
            assert_eq!(mine, sorted, "one key's rows in id order");
        }
    }
    assert_eq!(count(pool, "select count(*) from outbox_dlq").await, 0);
    db.drop_db().await;
}

/// Point 5: rows that wait for a handler slot (concurrency 1, three rows
/// whose handlers take 60% of the time limit each) are not cut short or
/// charged: each is handled once, at its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_waiting_for_a_handler_slot_gets_its_whole_time_limit() {
    let db = setup().await;
    let pool = &db.pool;
    for i in 0..3 {
        outbox::publish(pool, "queued", &i).await.unwrap();
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let handler = move |env: Arc<Envelope>, _ctx: Context| {
        let s = s.clone();
        async move {
            // 60% of the limit (2 s lease less 200 ms).
            tokio::time::sleep(Duration::from_millis(1080)).await;
            s.lock().unwrap().push((env.id, env.attempt));
            Ok(Output::none())
        }
    };
    let running = App::manual(pool.clone())
        .register(
            fast(Subscriber::new("queued", handler).queue("queued"))
                .concurrency(1)
                .lease_ttl(Duration::from_secs(2))
                .retry(ConstantRetryLong::get()),
        )
        .start()
        .await
        .unwrap();
    eventually("all three handled", Duration::from_secs(15), || async {
        count(pool, "select count(*) from outbox").await == 0
    })
    .await;
    running.shutdown().await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "each row handled once: {seen:?}");
    assert!(seen.iter().all(|(_, attempt)| *attempt == 1), "{seen:?}");
    db.drop_db().await;
}

/// Point 6: rows written by another producer with values at the edges of
/// their types (`created_at = 'infinity'`, `first_attempt_at = '-infinity'`,
/// `attempts` and `deliveries` at `INT_MAX`) do not make the claim fail: they
/// are handled or dead-lettered with a reason, and the rows beside them flow.
#[tokio::test]
async fn rows_with_extreme_values_are_handled_or_dead_lettered_and_the_rest_flow() {
    let db = setup().await;
    let pool = &db.pool;
    let hostile: Vec<i64> = sqlx::query_scalar(
        "insert into outbox (queue, payload, created_at, first_attempt_at, attempts, deliveries) values \
         ('edge', '\"a\"', 'infinity', null, 0, 0), \
         ('edge', '\"b\"', '-infinity', '-infinity', 0, 0), \
         ('edge', '\"c\"', now(), 'infinity', 0, 2147483647), \
         ('edge', '\"d\"', now(), null, 2147483647, 0) \
         returning id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut healthy = Vec::new();
    for i in 0..5 {
        healthy.push(outbox::publish(pool, "edge", &i).await.unwrap());
    }
    let handled = Arc::new(Mutex::new(Vec::new()));
    let h = handled.clone();
    let handler = move |env: Arc<Envelope>, _ctx: Context| {
        let h = h.clone();
        async move {
            h.lock().unwrap().push(env.id);
            Ok(Output::none())
        }
    };
    let running = App::manual(pool.clone())
        .register(fast(Subscriber::new("edge", handler).queue("edge")))
        .start()
        .await
        .unwrap();
    eventually("the outbox drained", Duration::from_secs(15), || async {
        count(pool, "select count(*) from outbox").await == 0
    })
    .await;
    running.shutdown().await;
    let mut handled = handled.lock().unwrap().clone();
    handled.sort();
    let mut expected: Vec<i64> = healthy.clone();
    expected.extend([hostile[0], hostile[1], hostile[3]]);
    expected.sort();
    assert_eq!(
        handled, expected,
        "every row but the one delivered INT_MAX times handled"
    );
    assert_eq!(
        dead_letters(pool)
            .await
            .into_iter()
            .map(|l| (l.0, l.1))
            .collect::<Vec<_>>(),
        vec![(hostile[2], "crashed".to_owned())]
    );
    db.drop_db().await;
}

/// Point 13: a sink that answers fewer results than it was sent messages
/// failed the messages it did not answer: the row is retried, not acked.
#[tokio::test]
async fn a_sink_answering_no_result_fails_the_row_instead_of_acking_it() {
    let db = setup().await;
    let pool = &db.pool;
    let id = outbox::publish(pool, "mute", &"x").await.unwrap();
    let sink = Arc::new(Recorder {
        name: "mute",
        delay: Duration::ZERO,
        sent: Mutex::new(Vec::new()),
        mute: true,
    });
    let running = App::manual(pool.clone())
        .broker_arc(sink.clone())
        .register(
            fast(Subscriber::new("mute", forward("mute")).queue("mute"))
                .retry(ConstantRetryLong::get()),
        )
        .start()
        .await
        .unwrap();
    eventually("the failure stored", Duration::from_secs(10), || async {
        count(pool, "select count(*) from outbox where attempts = 1").await == 1
    })
    .await;
    running.shutdown().await;
    assert_eq!(sink.ids(), vec![id]);
    let error: String = sqlx::query_scalar("select last_error from outbox where id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(
        error.contains("answered 0 results for 1 messages"),
        "{error}"
    );
    db.drop_db().await;
}

/// Point 19a: a row written by another producer with headers of the names
/// the runtime writes (`outbox-id`, in any case) reaches the broker with the
/// runtime's own values only; its other headers are kept.
#[tokio::test]
async fn reserved_header_names_written_by_another_producer_are_dropped() {
    let db = setup().await;
    let pool = &db.pool;
    let id: i64 = sqlx::query_scalar(
        "insert into outbox (queue, payload, headers) values \
         ('forged', '\"x\"', '{\"outbox-id\": \"1\", \"Outbox-Queue\": \"elsewhere\", \"trace\": \"t-1\"}') \
         returning id",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let sink = Recorder::new("rec");
    let running = App::manual(pool.clone())
        .broker_arc(sink.clone())
        .register(fast(
            Subscriber::new("forged", forward("rec")).queue("forged"),
        ))
        .start()
        .await
        .unwrap();
    eventually("sent", Duration::from_secs(10), || async {
        count(pool, "select count(*) from outbox").await == 0
    })
    .await;
    running.shutdown().await;
    let sent = sink.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(header(&sent[0], "outbox-id"), id.to_string());
    assert_eq!(header(&sent[0], "outbox-queue"), "forged");
    assert_eq!(header(&sent[0], "trace"), "t-1");
    assert!(
        !sent[0].headers.iter().any(|(k, _)| k == "Outbox-Queue"),
        "{:?}",
        sent[0].headers
    );
    db.drop_db().await;
}

/// Point 10: `activate_in` counts from the statement, not from the start of
/// the caller's transaction.
#[tokio::test]
async fn activate_in_counts_from_the_publish_not_from_the_transaction_start() {
    let db = setup().await;
    let pool = &db.pool;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("select pg_sleep(1.5)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let id = Message::json("delayed", &"x")
        .unwrap()
        .activate_in(Duration::from_secs(1))
        .publish(&mut *tx)
        .await
        .unwrap()
        .unwrap();
    tx.commit().await.unwrap();
    let after_start: f64 = sqlx::query_scalar(
        "select extract(epoch from next_attempt_at - created_at)::float8 from outbox where id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(
        after_start >= 2.4,
        "due {after_start} s after the transaction started (1.5 s in it, then 1 s)"
    );
    db.drop_db().await;
}

/// Point 9: a replayed dead letter keeps its id, so the `outbox-id` header a
/// consumer de-duplicates on is the one any earlier copy carried.
#[tokio::test]
async fn a_replayed_dead_letter_keeps_its_original_id() {
    let db = setup().await;
    let pool = &db.pool;
    let first = Arc::new(AtomicUsize::new(0));
    let f = first.clone();
    let handler = move |env: Arc<Envelope>, _ctx: Context| {
        let f = f.clone();
        async move {
            if f.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(HandlerError::reject("not yet"));
            }
            Ok(Output::none().publish("rec", "t", None, env.payload.clone()))
        }
    };
    let id = outbox::publish(pool, "replayed", &"x").await.unwrap();
    // Rows published after it, so that a new id would differ.
    outbox::publish(pool, "other", &"y").await.unwrap();
    let sink = Recorder::new("rec");
    let running = App::manual(pool.clone())
        .broker_arc(sink.clone())
        .register(fast(Subscriber::new("replayed", handler).queue("replayed")).retry(NoRetry))
        .start()
        .await
        .unwrap();
    eventually("dead-lettered", Duration::from_secs(10), || async {
        count(pool, "select count(*) from outbox_dlq").await == 1
    })
    .await;
    let replayed = outbox::dlq::DeadLetters::new(pool.clone(), Tables::default())
        .unwrap()
        .replay(&outbox::dlq::Filter::default())
        .await
        .unwrap();
    assert_eq!(replayed, vec![id], "the replayed row has its original id");
    eventually("sent after the replay", Duration::from_secs(10), || async {
        sink.ids() == vec![id]
    })
    .await;
    running.shutdown().await;
    let next: i64 = scalar(
        pool,
        "select nextval(pg_get_serial_sequence('outbox', 'id'))",
    )
    .await;
    assert!(next > id + 1, "the sequence is untouched: {next}");
    db.drop_db().await;
}

/// Point 14: the wake-up listener holds a connection for good; with an app
/// pool of one connection, claims would wait for it. It has a connection of
/// its own: a row is handled at once.
#[tokio::test]
async fn an_app_pool_of_one_connection_handles_rows_beside_the_listener() {
    let db = setup().await;
    let small = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&db.url)
        .await
        .unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let handler = move |_env: Arc<Envelope>, _ctx: Context| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            Ok(Output::none())
        }
    };
    let running = App::manual(small.clone())
        .register(fast(Subscriber::new("small", handler).queue("small")))
        .start()
        .await
        .unwrap();
    // Let the listener connect first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    outbox::publish(&db.pool, "small", &"x").await.unwrap();
    eventually("handled", Duration::from_secs(10), || async {
        handled.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "handled after {:?}",
        started.elapsed()
    );
    running.shutdown().await;
    small.close().await;
    db.drop_db().await;
}

/// A retry strategy that panics: a bug in user code outside the handler.
#[derive(Debug)]
struct PanickingRetry;

impl outbox::RetryStrategy for PanickingRetry {
    fn next_delay(&self, _failure: &outbox::Failure<'_>) -> Option<Duration> {
        panic!("the retry strategy has a bug");
    }
}

/// Point 12: a panic outside the handler (here a custom retry strategy)
/// ends the worker's step, not the worker: `/readyz` reports it, a later row
/// is handled, and the row whose settling panicked is dead-lettered as
/// `crashed` after `max_deliveries`, instead of looping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_retry_strategy_is_survived_reported_and_contained() {
    let db = setup().await;
    let pool = &db.pool;
    let bad = outbox::publish(pool, "buggy", &"fail").await.unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let handler = move |env: Arc<Envelope>, _ctx: Context| {
        let h = h.clone();
        async move {
            if env.payload == b"\"fail\"" {
                return Err(HandlerError::transient("failing"));
            }
            h.fetch_add(1, Ordering::SeqCst);
            Ok(Output::none())
        }
    };
    let running = App::manual(pool.clone())
        .metrics_addr("127.0.0.1:0".parse().unwrap())
        .register(
            fast(Subscriber::new("buggy", handler).queue("buggy"))
                .retry(PanickingRetry)
                .lease_ttl(Duration::from_secs(1))
                .max_deliveries(2),
        )
        .start()
        .await
        .unwrap();
    let addr = running.metrics_addr().expect("metrics endpoint");
    eventually(
        "readiness reports the panic",
        Duration::from_secs(10),
        || async {
            let body = http_get(addr, "/readyz").await;
            body.contains("not ready") && body.contains("the retry strategy has a bug")
        },
    )
    .await;
    outbox::publish(pool, "buggy", &"ok").await.unwrap();
    eventually("a later row handled", Duration::from_secs(10), || async {
        handled.load(Ordering::SeqCst) == 1
    })
    .await;
    eventually(
        "the row dead-lettered as crashed",
        Duration::from_secs(15),
        || async { count(pool, "select count(*) from outbox_dlq").await == 1 },
    )
    .await;
    running.shutdown().await;
    assert_eq!(
        dead_letters(pool)
            .await
            .into_iter()
            .map(|l| (l.0, l.1))
            .collect::<Vec<_>>(),
        vec![(bad, "crashed".to_owned())]
    );
    assert_eq!(count(pool, "select count(*) from outbox").await, 0);
    db.drop_db().await;
}

/// The body of `GET path` on `addr` (HTTP/1.0, read to the end).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).await.unwrap();
    out
}

/// Point 7: a payload over 16 MiB, or headers over 64 KiB, are refused at
/// publish with the limit named; nothing is written.
#[tokio::test]
async fn a_payload_or_headers_over_the_limit_are_refused_at_publish() {
    let db = setup().await;
    let pool = &db.pool;
    let big = vec![b'x'; outbox::MAX_PAYLOAD_BYTES + 1];
    let err = Message::bytes("big", big)
        .publish(pool)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("payload of 16777217 bytes is over the limit of 16777216 bytes"),
        "{err}"
    );
    let err = Message::bytes("big", b"x".to_vec())
        .header("note", "y".repeat(70_000))
        .publish(pool)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("headers of 70004 bytes") && err.contains("limit of 65536 bytes"),
        "{err}"
    );
    // At the limit: accepted.
    Message::bytes("big", vec![b'x'; outbox::MAX_PAYLOAD_BYTES])
        .publish(pool)
        .await
        .unwrap();
    assert_eq!(count(pool, "select count(*) from outbox").await, 1);
    db.drop_db().await;
}

/// Point 7: a claim stops at its byte budget (the row that reaches it
/// included, at least one row), so that a batch of multi-MB rows cannot
/// hold gigabytes in memory.
#[tokio::test]
async fn a_claim_stops_at_its_byte_budget() {
    let db = setup().await;
    let pool = &db.pool;
    let mib = 1024 * 1024;
    for _ in 0..10 {
        Message::bytes("blobs", vec![7u8; mib])
            .publish(pool)
            .await
            .unwrap();
    }
    let claimer = Claimer::new(pool.clone(), Tables::default(), vec!["blobs".into()])
        .unwrap()
        .with_batch_size(100)
        .with_batch_bytes(3 * mib);
    let batch = claimer.claim().await.unwrap();
    assert_eq!(batch.rows.len(), 3, "1 MiB rows up to a 3 MiB budget");
    let small = Claimer::new(pool.clone(), Tables::default(), vec!["blobs".into()])
        .unwrap()
        .with_batch_size(100)
        .with_batch_bytes(1024);
    assert_eq!(
        small.claim().await.unwrap().rows.len(),
        1,
        "a row larger than the budget is claimed alone"
    );
    // The relay's form (every queue) obeys the same budget.
    let all = Claimer::all_queues(pool.clone(), Tables::default())
        .with_batch_size(100)
        .with_batch_bytes(2 * mib);
    assert_eq!(all.claim().await.unwrap().rows.len(), 2);
    db.drop_db().await;
}

/// Point 15: a claim after a full batch starts after the last row claimed
/// (the cursor) and, when that part is short, claims the rest from the
/// oldest due row with a second statement. When only that second statement
/// fails (here a trigger refuses the update of one row due before the
/// cursor), the rows the first one claimed are handed over, not left
/// leased until their lease expires.
#[tokio::test]
async fn a_failed_second_claim_statement_hands_over_what_the_first_claimed() {
    let db = setup().await;
    let pool = &db.pool;
    for n in 0..10 {
        Message::json("cursor", &n)
            .unwrap()
            .publish(pool)
            .await
            .unwrap();
    }
    let claimer = Claimer::new(pool.clone(), Tables::default(), vec!["cursor".into()])
        .unwrap()
        .with_batch_size(10);
    let first = claimer.claim().await.unwrap();
    assert_eq!(first.rows.len(), 10, "a full batch sets the cursor");
    // Due before the cursor (as another producer may write it), and refused
    // by a trigger when a claim updates it.
    let early: i64 = sqlx::query_scalar(
        "insert into outbox (queue, payload, next_attempt_at) \
         values ('cursor', '1', now() - interval '1 hour') returning id",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "create function refuse_claim() returns trigger language plpgsql as $$ \
         begin if new.id = {early} and new.lease_token is not null then \
         raise exception 'refused by the test'; end if; return new; end $$"
    ))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "create trigger refuse_claim before update on outbox \
         for each row execute function refuse_claim()",
    )
    .execute(pool)
    .await
    .unwrap();
    let mut later = Vec::new();
    for n in 10..15 {
        let id = Message::json("cursor", &n)
            .unwrap()
            .publish(pool)
            .await
            .unwrap();
        later.push(id.expect("an id"));
    }

    let second = claimer
        .claim()
        .await
        .expect("the first statement's rows are handed over");
    let ids: Vec<i64> = second.rows.iter().map(|e| e.id).collect();
    assert_eq!(ids, later, "the rows after the cursor");
    let leased: Vec<i64> =
        sqlx::query_scalar("select id from outbox where lease_token = $1 order by id")
            .bind(second.token)
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(leased, later, "leased to the batch that was handed over");
    assert_eq!(claimer.ack(second.token, &ids).await.unwrap(), 5, "acked");
    db.drop_db().await;
}

/// A sink whose flush never returns (a broker that hangs at shutdown).
struct HangingFlush;

impl Sink for HangingFlush {
    fn name(&self) -> &str {
        "hang"
    }

    fn send(&self, batch: Vec<Outgoing>) -> BoxFuture<'_, Vec<Result<(), SinkError>>> {
        Box::pin(async move { vec![Ok(()); batch.len()] })
    }

    fn flush(&self, _timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(std::future::pending())
    }
}

/// Point 18: with the defaults, a shutdown under a handler that never
/// returns and a broker whose flush never returns ends within the 25 s
/// shutdown timeout (inside a 30 s termination grace period), and the row is
/// given back uncounted.
#[tokio::test]
async fn a_shutdown_with_a_hung_handler_and_broker_fits_the_default_timeout() {
    let db = setup().await;
    let pool = &db.pool;
    let id = outbox::publish(pool, "stuck", &"x").await.unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let handler = move |_env: Arc<Envelope>, _ctx: Context| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
            Ok(Output::none())
        }
    };
    let running = App::manual(pool.clone())
        .broker(HangingFlush)
        .register(
            fast(Subscriber::new("stuck", handler).queue("stuck"))
                .lease_ttl(Duration::from_secs(120)),
        )
        .start()
        .await
        .unwrap();
    eventually("the handler started", Duration::from_secs(10), || async {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(40), running.shutdown())
        .await
        .expect("the shutdown ended within 40 s");
    let took = t.elapsed();
    assert!(
        took <= Duration::from_secs(26) && took >= Duration::from_secs(19),
        "shutdown took {took:?}"
    );
    let (token, deliveries): (Option<uuid::Uuid>, i32) =
        sqlx::query_as("select lease_token, deliveries from outbox where id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(token, None, "the row is given back");
    assert_eq!(deliveries, 0, "and its delivery not counted");
    db.drop_db().await;
}

/// Point 18: settling waits for the database as long as the lease allows,
/// not about a second: with the app's only connection held for 4 s after the
/// handler returns, the row is still acked, long before its lease (30 s)
/// would bring it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_waits_for_the_database_while_the_lease_lasts() {
    let db = setup().await;
    let small = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_millis(500))
        .connect(&db.url)
        .await
        .unwrap();
    let handler = move |_env: Arc<Envelope>, ctx: Context| async move {
        let pool = PgPool::from_context(&Envelope::new(0, "x", Vec::new()), &ctx)?;
        let conn = pool.acquire().await.map_err(HandlerError::transient)?;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            drop(conn);
        });
        Ok(Output::none())
    };
    let running = App::manual(small.clone())
        .register(fast(Subscriber::new("held", handler).queue("held")))
        .start()
        .await
        .unwrap();
    let t = Instant::now();
    outbox::publish(&db.pool, "held", &"x").await.unwrap();
    eventually("acked", Duration::from_secs(15), || async {
        count(&db.pool, "select count(*) from outbox").await == 0
    })
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "acked after {:?}",
        t.elapsed()
    );
    assert_eq!(count(&db.pool, "select count(*) from outbox_dlq").await, 0);
    running.shutdown().await;
    small.close().await;
    db.drop_db().await;
}

/// Point 8: a parked timer (no dead-letter table) gives up its id: a later
/// timer of that id is written and fires, with `Ignore` and with `Replace`,
/// instead of being swallowed by the parked row or written into it.
#[tokio::test]
async fn a_parked_timer_does_not_swallow_a_later_timer_of_its_id() {
    use outbox::OnConflict;
    let db = setup().await;
    let pool = &db.pool;
    let first = Message::json("timers", &"first")
        .unwrap()
        .timer_id("daily", OnConflict::Ignore)
        .publish(pool)
        .await
        .unwrap()
        .expect("written");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let handler = move |env: Arc<Envelope>, _ctx: Context| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(env.id);
            if env.payload == b"\"first\"" {
                return Err(HandlerError::reject("first one fails"));
            }
            Ok(Output::none())
        }
    };
    let running = App::manual(pool.clone())
        .register(fast(Subscriber::new("timers", handler).queue("timers")).no_dlq())
        .start()
        .await
        .unwrap();
    eventually(
        "the first timer parked",
        Duration::from_secs(10),
        || async {
            count(
                pool,
                "select count(*) from outbox where parked_at is not null",
            )
            .await
                == 1
        },
    )
    .await;
    let ignored = Message::json("timers", &"second")
        .unwrap()
        .timer_id("daily", OnConflict::Ignore)
        .publish(pool)
        .await
        .unwrap()
        .expect("a new timer is written beside the parked one");
    eventually(
        "the second timer fired",
        Duration::from_secs(10),
        || async { seen.lock().unwrap().contains(&ignored) },
    )
    .await;
    // Its handler ran; its row goes once it is acked. Until then a timer of
    // the same id is in flight, and `Replace` leaves a timer in flight alone.
    eventually(
        "the second timer acked",
        Duration::from_secs(10),
        || async {
            count(
                pool,
                &format!("select count(*) from outbox where id = {ignored}"),
            )
            .await
                == 0
        },
    )
    .await;
    let replaced = Message::json("timers", &"third")
        .unwrap()
        .timer_id("daily", OnConflict::Replace)
        .publish(pool)
        .await
        .unwrap()
        .expect("written");
    assert_ne!(replaced, first, "not written into the parked row");
    eventually("the third timer fired", Duration::from_secs(10), || async {
        seen.lock().unwrap().contains(&replaced)
    })
    .await;
    running.shutdown().await;
    assert_eq!(
        count(pool, "select count(*) from outbox").await,
        1,
        "only the parked row is left"
    );
    db.drop_db().await;
}

/// Point 17: on a database whose default isolation is SERIALIZABLE, claims
/// racing for the same rows do not fail with serialization errors (they run
/// at READ COMMITTED, which they assume), and every row is claimed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_on_a_serializable_database_race_without_failing() {
    let db = setup().await;
    sqlx::query(&format!(
        "alter database \"{}\" set default_transaction_isolation = 'serializable'",
        db.name()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    // New connections see the setting.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&db.url)
        .await
        .unwrap();
    let level: String = scalar(&pool, "select current_setting('transaction_isolation')").await;
    assert_eq!(level, "serializable");
    let msgs: Vec<Message> = (0..3000)
        .map(|i| Message::json("race", &i).unwrap())
        .collect();
    outbox::Outbox::default()
        .publish_batch(&pool, msgs)
        .await
        .unwrap();
    let mut racers = Vec::new();
    for _ in 0..4 {
        let claimer = Claimer::new(pool.clone(), Tables::default(), vec!["race".into()])
            .unwrap()
            .with_batch_size(50);
        racers.push(tokio::spawn(async move {
            let (mut claimed, mut errors) = (Vec::new(), Vec::new());
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(30) {
                match claimer.claim().await {
                    Ok(b) if b.rows.is_empty() => break,
                    Ok(b) => {
                        let ids: Vec<i64> = b.rows.iter().map(|r| r.id).collect();
                        claimer.ack_at(b.token, &b.positions, &ids).await.unwrap();
                        claimed.extend(ids);
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (claimed, errors)
        }));
    }
    let mut all = Vec::new();
    for r in racers {
        let (claimed, errors) = r.await.unwrap();
        assert!(
            errors.is_empty(),
            "claims failed: {:?}",
            &errors[..errors.len().min(3)]
        );
        all.extend(claimed);
    }
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 3000, "every row claimed once");
    assert_eq!(count(&pool, "select count(*) from outbox").await, 0);
    pool.close().await;
    db.drop_db().await;
}
