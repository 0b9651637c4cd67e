//! Log capture (`CAPTURE=log`) against the real PostgreSQL (wal_level =
//! logical) and Kafka: messages written with `pg_logical_emit_message` in the
//! producer's transaction, streamed from a replication slot, counted on the
//! topic by a consumer of the test's own.
//!
//! Needs `scripts/services up`.

#[path = "../../tests/common/mod.rs"]
mod common;
mod running;

use common::{
    consume_all, count, create_topic, eventually, header_value, kafka_brokers, migrated,
    unique_topic, TestDb,
};
use futures::future::BoxFuture;
use outbox::{Capture, Message, Outbox, Outgoing, Sink, SinkError, Tables};
use outbox_kafka::relay::{run_relay, RelayConfig, RelayError};
use outbox_kafka::{Broker, BrokerConfig};
use rdkafka::message::{Message as _, OwnedMessage};
use running::Running;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// A slot name of the test's own: slot names are shared by every database
/// of the server, and the tests run in parallel.
fn slot_of(db: &TestDb) -> String {
    format!("s_{}", db.name().trim_start_matches("outbox_test_"))
}

fn log_config(db: &TestDb, vars: &[(&str, &str)]) -> RelayConfig {
    let mut all = vec![
        ("CAPTURE_SLOT".to_owned(), slot_of(db)),
        ("DATABASE_URL".to_owned(), db.url.clone()),
        ("KAFKA_BROKERS".to_owned(), kafka_brokers()),
        ("CAPTURE".to_owned(), "log".to_owned()),
        ("CAPTURE_HEARTBEAT".to_owned(), "200ms".to_owned()),
    ];
    all.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    RelayConfig::from_vars(all).expect("relay config")
}

/// The relay in-process, until the returned sender is used or dropped.
fn spawn_relay(
    config: RelayConfig,
) -> (
    tokio::task::JoinHandle<Result<(), RelayError>>,
    oneshot::Sender<()>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run_relay(config, async move {
        let _ = stopped.await;
    }));
    (task, stop)
}

async fn stop_relay(
    (task, stop): (
        tokio::task::JoinHandle<Result<(), RelayError>>,
        oneshot::Sender<()>,
    ),
) {
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the relay stops within 60 s")
        .expect("relay task")
        .expect("the relay stops without an error");
}

/// Waits until a reader streams the test's slot.
async fn wait_streaming(db: &TestDb) {
    let pool = db.pool.clone();
    let slot = slot_of(db);
    eventually("the relay streams its slot", Duration::from_secs(60), || {
        let (pool, slot) = (pool.clone(), slot.clone());
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active)",
            )
            .bind(slot)
            .fetch_one(&pool)
            .await
            .unwrap_or(false)
        }
    })
    .await;
}

/// Waits until the slot is confirmed up to the WAL written so far: every
/// message published before the call was sent, moved or dead-lettered.
async fn wait_confirmed(db: &TestDb, timeout: Duration) {
    let end: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let pool = db.pool.clone();
    let slot = slot_of(db);
    eventually("the slot is confirmed up to everything published", timeout, || {
        let (pool, end, slot) = (pool.clone(), end.clone(), slot.clone());
        async move {
            sqlx::query_scalar::<_, bool>(
                "select confirmed_flush_lsn >= $1::pg_lsn from pg_replication_slots where slot_name = $2",
            )
            .bind(end)
            .bind(slot)
            .fetch_one(&pool)
            .await
            .unwrap_or(false)
        }
    })
    .await;
}

fn log_outbox() -> Outbox {
    Outbox::new(Tables::default()).capture(Capture::Log)
}

fn number(m: &OwnedMessage) -> i64 {
    let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
    v["n"].as_i64().unwrap()
}

fn outbox_id(m: &OwnedMessage) -> i64 {
    std::str::from_utf8(header_value(m, "outbox-id").expect("outbox-id header"))
        .unwrap()
        .parse()
        .unwrap()
}

/// Publishes messages `from..to` in log mode, `per_tx` per transaction, keyed
/// `key-{n % keys}`; returns their ids.
async fn publish_log(
    pool: &PgPool,
    queue: &str,
    from: i64,
    to: i64,
    per_tx: i64,
    keys: i64,
) -> Vec<i64> {
    let ob = log_outbox();
    let mut ids = Vec::new();
    let mut n = from;
    while n < to {
        let end = (n + per_tx).min(to);
        let mut tx = pool.begin().await.unwrap();
        let msgs: Vec<Message> = (n..end)
            .map(|i| {
                Message::json(queue, &serde_json::json!({ "n": i }))
                    .unwrap()
                    .key(format!("key-{}", i % keys))
            })
            .collect();
        ids.extend(ob.publish_batch(&mut *tx, msgs).await.unwrap());
        tx.commit().await.unwrap();
        n = end;
    }
    ids
}

/// Messages of each key in the order they arrived.
fn by_key(got: &[OwnedMessage]) -> HashMap<Vec<u8>, Vec<i64>> {
    let mut keys: HashMap<Vec<u8>, Vec<i64>> = HashMap::new();
    for m in got {
        keys.entry(m.key().unwrap_or_default().to_vec())
            .or_default()
            .push(number(m));
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_messages_arrive_in_commit_order_and_a_rollback_sends_nothing() {
    let db = migrated("warn").await;
    let topic = unique_topic("log-order");
    create_topic(&topic, 3).await;
    let relay = spawn_relay(log_config(&db, &[]));
    wait_streaming(&db).await;

    let ob = log_outbox();
    let mut tx = db.pool.begin().await.unwrap();
    ob.publish(&mut *tx, &topic, &serde_json::json!({ "n": -1 }))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let ids = publish_log(&db.pool, &topic, 0, 2000, 20, 8).await;

    assert_eq!(
        consume_all(&topic, 2000, Duration::from_secs(60))
            .await
            .len(),
        2000
    );
    wait_confirmed(&db, Duration::from_secs(60)).await;
    let got = consume_all(&topic, 2001, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 2000, "every committed message, and nothing else");
    assert!(
        got.iter().all(|m| number(m) >= 0),
        "the rolled-back message was sent"
    );
    let sent: HashSet<i64> = got.iter().map(outbox_id).collect();
    assert_eq!(
        sent,
        ids.iter().copied().collect(),
        "outbox-id is the id publish returned"
    );
    for (key, ns) in by_key(&got) {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "key {} out of order: {ns:?}",
            String::from_utf8_lossy(&key)
        );
    }
    assert_eq!(
        count(&db.pool, "select count(*) from outbox").await,
        0,
        "log mode writes no row"
    );
    assert_eq!(count(&db.pool, "select count(*) from outbox_dlq").await, 0);
    stop_relay(relay).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_and_timers_go_to_the_table_and_are_sent_when_due() {
    let db = migrated("warn").await;
    let topic = unique_topic("log-delayed");
    create_topic(&topic, 1).await;
    let ob = log_outbox();
    let mut tx = db.pool.begin().await.unwrap();
    let delayed = ob
        .publish_message(
            &mut *tx,
            Message::json(&topic, &serde_json::json!({ "n": 1 }))
                .unwrap()
                .activate_in(Duration::from_millis(500)),
        )
        .await
        .unwrap()
        .unwrap();
    let timer = ob
        .publish_message(
            &mut *tx,
            Message::json(&topic, &serde_json::json!({ "n": 2 }))
                .unwrap()
                .timer_id("t-1", outbox::OnConflict::Ignore),
        )
        .await
        .unwrap()
        .unwrap();
    tx.commit().await.unwrap();
    let rows: Vec<i64> = sqlx::query_scalar("select id from outbox order by id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, vec![delayed, timer], "both are rows of the table");

    let relay = spawn_relay(log_config(&db, &[]));
    let got = consume_all(&topic, 2, Duration::from_secs(60)).await;
    let mut ns: Vec<i64> = got.iter().map(number).collect();
    ns.sort();
    assert_eq!(
        ns,
        vec![1, 2],
        "the log-mode relay also sends the table's rows"
    );
    stop_relay(relay).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_malformed_messages_are_dead_lettered_while_the_stream_flows() {
    let db = migrated("warn").await;
    let topic = unique_topic("log-refused");
    create_topic(&topic, 1).await;
    let relay = spawn_relay(log_config(&db, &[]));
    wait_streaming(&db).await;

    let ob = log_outbox();
    let mut tx = db.pool.begin().await.unwrap();
    ob.publish(&mut *tx, &topic, &serde_json::json!({ "n": 0 }))
        .await
        .unwrap();
    // A queue the relay cannot map to a topic name.
    let refused = ob
        .publish(&mut *tx, "not a topic!", &serde_json::json!({ "n": 1 }))
        .await
        .unwrap();
    // Another producer's message under the outbox's prefix, in no known format.
    sqlx::query("select pg_logical_emit_message(true, 'outbox:outbox', 'garbage'::bytea)")
        .execute(&mut *tx)
        .await
        .unwrap();
    ob.publish(&mut *tx, &topic, &serde_json::json!({ "n": 2 }))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    publish_log(&db.pool, &topic, 3, 10, 7, 1).await;

    assert_eq!(
        consume_all(&topic, 9, Duration::from_secs(60)).await.len(),
        9
    );
    wait_confirmed(&db, Duration::from_secs(60)).await;
    let got = consume_all(&topic, 10, Duration::from_secs(3)).await;
    let mut ns: Vec<i64> = got.iter().map(number).collect();
    ns.sort();
    assert_eq!(
        ns,
        vec![0, 2, 3, 4, 5, 6, 7, 8, 9],
        "the stream flows past both"
    );
    let pool = db.pool.clone();
    eventually("two dead letters", Duration::from_secs(30), || {
        let pool = pool.clone();
        async move { count(&pool, "select count(*) from outbox_dlq").await == 2 }
    })
    .await;
    let dead: Vec<(i64, String, String, String)> = sqlx::query_as(
        "select original_id, queue, failure_reason, last_error from outbox_dlq order by id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let by_queue: HashMap<&str, &(i64, String, String, String)> =
        dead.iter().map(|d| (d.1.as_str(), d)).collect();
    let r = by_queue["not a topic!"];
    assert_eq!((r.0, r.2.as_str()), (refused, "rejected"));
    assert!(r.3.contains("TOPIC_MAP"), "{}", r.3);
    let m = by_queue["(undecodable)"];
    assert_eq!(m.2, "rejected");
    assert!(m.3.contains("malformed outbox log message"), "{}", m.3);
    assert_eq!(count(&db.pool, "select count(*) from outbox").await, 0);
    stop_relay(relay).await;
    db.drop_db().await;
}

/// A sink in front of the real broker that fails every message whose payload
/// says `"flaky":true` transiently, and counts what it passed on.
struct Flaky {
    inner: Broker,
    sent: AtomicUsize,
}

impl Sink for Flaky {
    fn name(&self) -> &str {
        "kafka"
    }

    fn send(&self, batch: Vec<Outgoing>) -> BoxFuture<'_, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            let mut pass = Vec::new();
            let mut results: Vec<Option<Result<(), SinkError>>> = Vec::new();
            for m in batch {
                if String::from_utf8_lossy(&m.payload).contains("\"flaky\":true") {
                    results.push(Some(Err(SinkError::transient("injected: broker busy"))));
                } else {
                    results.push(None);
                    pass.push(m);
                }
            }
            self.sent.fetch_add(pass.len(), Ordering::SeqCst);
            let mut passed = self.inner.send(pass).await.into_iter();
            results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| passed.next().expect("one result per message")))
                .collect()
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_moves_the_message_into_the_table_and_its_key_follows_it() {
    let db = migrated("warn").await;
    let topic = unique_topic("log-flaky");
    create_topic(&topic, 1).await;
    let broker = Broker::new(BrokerConfig::new(&kafka_brokers())).unwrap();
    let sink = Arc::new(Flaky {
        inner: broker,
        sent: AtomicUsize::new(0),
    });
    let config = log_config(&db, &[]);
    let route: outbox::stream::Route = Arc::new(|env: &outbox::Envelope| {
        Ok(Outgoing {
            sink: "kafka".into(),
            topic: env.queue.clone(),
            key: env.key.clone().map(String::into_bytes),
            payload: env.payload.clone(),
            headers: Vec::new(),
        })
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let stream =
        outbox::stream::LogStream::new(db.pool.clone(), db.url.clone(), sink.clone(), route)
            .slot(slot_of(&db))
            .retry(outbox::ConstantRetry::new(Duration::from_millis(200)));
    let streaming = tokio::spawn(stream.run(async move {
        let _ = stopped.await;
    }));
    wait_streaming(&db).await;

    // One transaction: the flaky message of key a, healthy ones around it.
    let ob = log_outbox();
    let mut tx = db.pool.begin().await.unwrap();
    let publish = |n: i64, key: &'static str, flaky: bool| {
        Message::json(&topic, &serde_json::json!({ "n": n, "flaky": flaky }))
            .unwrap()
            .key(key)
    };
    let first = ob
        .publish_batch(
            &mut *tx,
            vec![
                publish(0, "b", false),
                publish(1, "a", true),
                publish(2, "b", false),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let pool = db.pool.clone();
    eventually(
        "the flaky message is moved into the table",
        Duration::from_secs(30),
        || {
            let pool = pool.clone();
            async move { count(&pool, "select count(*) from outbox where attempts = 1").await == 1 }
        },
    )
    .await;
    let (id, attempts, error): (i64, i32, String) =
        sqlx::query_as("select id, attempts, last_error from outbox")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (id, attempts),
        (first[1], 1),
        "moved with its id and its attempt counted"
    );
    assert!(error.contains("injected: broker busy"), "{error}");

    // Key a is held by the row: its next message follows it into the table.
    let mut tx = db.pool.begin().await.unwrap();
    ob.publish_batch(
        &mut *tx,
        vec![publish(3, "a", false), publish(4, "b", false)],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    eventually(
        "key a's next message follows into the table",
        Duration::from_secs(30),
        || {
            let pool = pool.clone();
            async move { count(&pool, "select count(*) from outbox where attempts = 0").await == 1 }
        },
    )
    .await;

    // A log-mode relay stands by on the slot the flaky stream holds, and
    // sends the table's rows, one of a key at a time; then key a flows from
    // the log again.
    let table_relay = spawn_relay(config.clone());
    eventually("the table is drained", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move { count(&pool, "select count(*) from outbox").await == 0 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut tx = db.pool.begin().await.unwrap();
    ob.publish(
        &mut *tx,
        &topic,
        &serde_json::json!({ "n": 5, "flaky": false }),
    )
    .await
    .unwrap();
    ob.publish_message(&mut *tx, publish(6, "a", false))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let got = consume_all(&topic, 7, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 7);
    let keys = by_key(&got);
    assert_eq!(keys[&b"a".to_vec()], vec![1, 3, 6], "key a kept its order");
    assert_eq!(keys[&b"b".to_vec()], vec![0, 2, 4]);
    assert_eq!(
        count(&db.pool, "select count(*) from outbox").await,
        0,
        "key a is let go"
    );
    assert_eq!(count(&db.pool, "select count(*) from outbox_dlq").await, 0);
    let _ = stop.send(());
    streaming.await.unwrap().unwrap();
    stop_relay(table_relay).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_stops_the_relay_with_its_error_and_is_never_re_created_silently() {
    let db = migrated("warn").await;
    let relay = spawn_relay(log_config(&db, &[]));
    wait_streaming(&db).await;
    stop_relay(relay).await;
    // Dropped behind the outbox's back: the record of it stays.
    let slot = slot_of(&db);
    sqlx::query("select pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(&db.pool)
        .await
        .unwrap();

    let err = tokio::time::timeout(
        Duration::from_secs(60),
        run_relay(log_config(&db, &[]), std::future::pending()),
    )
    .await
    .expect("the relay stops at once")
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("no longer exists"), "{text}");
    assert!(text.contains("outbox slot create"), "{text}");
    let slots = count(
        &db.pool,
        "select count(*) from pg_replication_slots where database = current_database()",
    )
    .await;
    assert_eq!(slots, 0, "no new slot was made");

    // Re-created explicitly, it streams again.
    outbox::stream::drop_slot(&db.pool, &slot).await.unwrap();
    outbox::stream::create_slot(&db.pool, &Tables::default(), &slot, "outbox_relay")
        .await
        .unwrap();
    let relay = spawn_relay(log_config(&db, &[]));
    wait_streaming(&db).await;
    stop_relay(relay).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_advances_an_idle_slot_past_wal_written_elsewhere() {
    let db = migrated("warn").await;
    let other = TestDb::new().await;
    let relay = spawn_relay(log_config(&db, &[]));
    wait_streaming(&db).await;
    // WAL written by another database, none by the outbox's.
    sqlx::query("create table busy (n int8)")
        .execute(&other.pool)
        .await
        .unwrap();
    sqlx::query("insert into busy select generate_series(1, 10000)")
        .execute(&other.pool)
        .await
        .unwrap();
    let written: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
        .fetch_one(&other.pool)
        .await
        .unwrap();
    let pool = db.pool.clone();
    let slot = slot_of(&db);
    eventually("the idle slot is confirmed past the other database's WAL", Duration::from_secs(30), || {
        let pool = pool.clone();
        let (written, slot) = (written.clone(), slot.clone());
        async move {
            sqlx::query_scalar::<_, bool>(
                "select confirmed_flush_lsn >= $1::pg_lsn from pg_replication_slots where slot_name = $2 and database = current_database()",
            )
            .bind(written)
            .bind(slot)
            .fetch_one(&pool)
            .await
            .unwrap_or(false)
        }
    })
    .await;
    stop_relay(relay).await;
    other.drop_db().await;
    db.drop_db().await;
}

fn binary_vars(db: &TestDb) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.url.clone()),
        ("KAFKA_BROKERS", kafka_brokers()),
        ("CAPTURE", "log".into()),
        ("CAPTURE_SLOT", slot_of(db)),
        ("CAPTURE_MAX_IN_FLIGHT", "2000".into()),
        ("METRICS_ADDR", "off".into()),
        ("RUST_LOG", "info".into()),
    ]
}

fn start_binary(vars: &[(&'static str, String)]) -> Running {
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Running::start(&vars)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_stands_by_and_takes_over_when_the_first_is_killed() {
    let db = migrated("warn").await;
    let topic = unique_topic("log-standby");
    create_topic(&topic, 1).await;
    let vars = binary_vars(&db);
    let mut first = start_binary(&vars);
    wait_streaming(&db).await;
    let mut second = start_binary(&vars);
    assert!(
        second.wait_for_log(Duration::from_secs(30), |l| l.contains("standing by")),
        "the second relay says it stands by:\n{}",
        second.log()
    );
    publish_log(&db.pool, &topic, 0, 100, 10, 4).await;
    assert_eq!(
        consume_all(&topic, 100, Duration::from_secs(60))
            .await
            .len(),
        100
    );

    first.kill9();
    assert!(
        second.wait_for_log(Duration::from_secs(30), |l| l
            .contains("took over the slot")),
        "the second relay takes over:\n{}",
        second.log()
    );
    publish_log(&db.pool, &topic, 100, 200, 10, 4).await;
    wait_confirmed(&db, Duration::from_secs(60)).await;
    // Duplicates are allowed (the first relay's last acks may not have been
    // confirmed to the server when it was killed); losses are not.
    let got = consume_all(&topic, 1000, Duration::from_secs(5)).await;
    let ns: HashSet<i64> = got.iter().map(number).collect();
    let missing: Vec<i64> = (0..200).filter(|n| !ns.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "lost across the takeover: {missing:?}\n{}",
        second.log()
    );
    assert!(
        second.exited().is_none(),
        "the standby keeps running:\n{}",
        second.log()
    );
    second.kill9();
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_kills_during_a_drain_lose_nothing() {
    const N: i64 = 20_000;
    let db = migrated("warn").await;
    let topic = unique_topic("log-kill");
    create_topic(&topic, 3).await;
    let vars = binary_vars(&db);
    let mut relay = start_binary(&vars);
    wait_streaming(&db).await;
    let producer = {
        let pool = db.pool.clone();
        let topic = topic.clone();
        tokio::spawn(async move { publish_log(&pool, &topic, 0, N, 50, 64).await })
    };
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        relay.kill9();
        relay = start_binary(&vars);
    }
    let ids = producer.await.unwrap();
    assert_eq!(ids.len() as i64, N);
    wait_confirmed(&db, Duration::from_secs(120)).await;
    let got = consume_all(&topic, 2 * N as usize, Duration::from_secs(10)).await;
    let distinct: HashSet<i64> = got.iter().map(outbox_id).collect();
    let lost = ids.iter().filter(|id| !distinct.contains(id)).count();
    let duplicates = got.len() - distinct.len();
    println!(
        "log capture, 3 kills: {N} published, {} received, {lost} lost, {duplicates} duplicates",
        got.len()
    );
    assert_eq!(lost, 0, "nothing lost:\n{}", relay.log());
    // Each kill can resend what was in flight (CAPTURE_MAX_IN_FLIGHT, 2,000)
    // plus the acks of the last 100 ms, not yet confirmed to the server.
    assert!(duplicates <= 3 * 4_000, "{duplicates} duplicates");
    for (key, ns) in by_key(&got) {
        // Duplicates may repeat a stretch; the first arrival of each is in order.
        let mut seen = HashSet::new();
        let firsts: Vec<i64> = ns.into_iter().filter(|n| seen.insert(*n)).collect();
        assert!(
            firsts.windows(2).all(|w| w[0] < w[1]),
            "key {} out of order",
            String::from_utf8_lossy(&key)
        );
    }
    relay.kill9();
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_inserted_into_a_debezium_table_are_sent_in_commit_order_and_the_table_stays_empty() {
    let db = migrated("warn").await;
    let topic = unique_topic("log-table");
    create_topic(&topic, 1).await;
    sqlx::query(
        "create table outbox_events (id uuid primary key default gen_random_uuid(), \
         aggregatetype text, aggregateid text not null, type text not null, payload jsonb)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let relay = spawn_relay(log_config(&db, &[("CAPTURE_TABLE", "outbox_events")]));
    wait_streaming(&db).await;

    // As Debezium's users do: insert, and delete in the same transaction;
    // a log-mode message in between keeps its place in the commit order.
    let insert = "insert into outbox_events (aggregatetype, aggregateid, type, payload) \
                  values ($1, 'order-1', 'OrderCreated', $2) returning id";
    let mut tx = db.pool.begin().await.unwrap();
    let mut sources = Vec::new();
    for n in 0..2 {
        let id: uuid::Uuid = sqlx::query_scalar(insert)
            .bind(&topic)
            .bind(serde_json::json!({ "n": n }))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        sources.push(id.to_string());
    }
    log_outbox()
        .publish(&mut *tx, &topic, &serde_json::json!({ "n": 2 }))
        .await
        .unwrap();
    let id: uuid::Uuid = sqlx::query_scalar(insert)
        .bind(&topic)
        .bind(serde_json::json!({ "n": 3 }))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    sources.push(id.to_string());
    // Refused: no payload, and no queue.
    sqlx::query("insert into outbox_events (aggregatetype, aggregateid, type) values ($1, 'order-2', 'Broken')")
        .bind(&topic)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "insert into outbox_events (aggregateid, type, payload) values ('order-3', 'Broken', '{}')",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("delete from outbox_events")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let got = consume_all(&topic, 4, Duration::from_secs(60)).await;
    let ns: Vec<i64> = got.iter().map(number).collect();
    assert_eq!(
        ns,
        vec![0, 1, 2, 3],
        "commit order, table rows and log messages together"
    );
    for (m, source) in [&got[0], &got[1], &got[3]].into_iter().zip(&sources) {
        assert_eq!(m.key(), Some(&b"order-1"[..]));
        assert_eq!(header_value(m, "type"), Some(&b"OrderCreated"[..]));
        assert_eq!(header_value(m, "id"), Some(source.as_bytes()));
        assert!(
            outbox_id(m) < 0,
            "a table row's id is its WAL position, negated"
        );
    }
    assert!(
        outbox_id(&got[2]) > 0,
        "a log message keeps its sequence id"
    );
    let ids: HashSet<i64> = got.iter().map(outbox_id).collect();
    assert_eq!(ids.len(), 4, "ids are unique");

    let pool = db.pool.clone();
    eventually(
        "the refused rows are dead letters",
        Duration::from_secs(30),
        || {
            let pool = pool.clone();
            async move { count(&pool, "select count(*) from outbox_dlq").await == 2 }
        },
    )
    .await;
    let errors: Vec<String> = sqlx::query_scalar(
        "select last_error from outbox_dlq where failure_reason = 'rejected' order by id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        errors[0].contains("column \"payload\" (the payload) is NULL"),
        "{errors:?}"
    );
    assert!(
        errors[1].contains("column \"aggregatetype\" (the queue) is NULL"),
        "{errors:?}"
    );
    assert_eq!(
        count(&db.pool, "select count(*) from outbox_events").await,
        0
    );
    assert_eq!(count(&db.pool, "select count(*) from outbox").await, 0);
    stop_relay(relay).await;
    db.drop_db().await;
}
