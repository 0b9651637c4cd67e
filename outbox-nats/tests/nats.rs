//! `#[nats::publisher]` and the NATS [`Broker`] against a real nats-server
//! with JetStream (`scripts/services up nats`; `NATS_URL`, default
//! `nats://127.0.0.1:4222`) and a real PostgreSQL (a fresh database per test).
//! With `NATS_URL` set empty the tests are skipped, saying so.
//!
//! The handlers' subjects are literals, so each test owns a stream of its own
//! that it deletes and creates afresh: ids start at 1 in every fresh database,
//! and a stream left over from an earlier run would drop them as duplicates
//! (`Nats-Msg-Id`) within its duplicate window. A file lock per stream keeps a
//! run in another checkout on the same machine from doing so at the same time.
//!
//! The test that stops nats-server is `#[ignore]`d and runs alone:
//!
//! ```text
//! cargo test -p outbox-nats --test nats -- --ignored --test-threads=1
//! ```

#[path = "../../tests/common/mod.rs"]
mod common;

use async_nats::jetstream::{self, consumer::pull, stream};
use common::{count, kafka_brokers, kafka_config, TestDb};
use futures::StreamExt;
use outbox::{App, ConstantRetry, Message, Outbox, Outgoing, Sink};
use outbox_kafka as kafka;
use outbox_nats as bus;
use outbox_nats::{Broker, BrokerConfig};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq, Hash)]
struct Order {
    run: String,
    n: i64,
}

#[bus::publisher("outbox_test.forward")]
#[outbox::subscriber("forward")]
async fn forward(order: Order) -> Order {
    order
}

#[kafka::publisher("outbox_test.nats_stacked")]
#[outbox::subscriber("both")]
#[bus::publisher("outbox_test.stacked")]
async fn to_both(order: Order) -> Order {
    order
}

#[outbox_nats::publisher("outbox_test.nostream")]
#[outbox::subscriber(
    "nostream",
    retry = ConstantRetry::new(Duration::from_millis(100)).max_attempts(3),
    dlq = "outbox_dlq"
)]
async fn to_nowhere(order: Order) -> Order {
    order
}

#[bus::publisher("outbox_test.down")]
#[outbox::subscriber("down", retry = ConstantRetry::new(Duration::from_millis(500)).max_attempts(1000))]
async fn while_down(order: Order) -> Order {
    order
}

/// `NATS_URL` as scripts/env.sh sets it; `None` (and a note) when it is set
/// empty, which skips the test.
fn nats_url(test: &str) -> Option<String> {
    match std::env::var("NATS_URL") {
        Ok(url) if url.trim().is_empty() => {
            eprintln!("{test}: skipped: NATS_URL is empty (start NATS with `scripts/services up nats` and unset it)");
            None
        }
        Ok(url) => Some(url),
        Err(_) => Some(outbox_nats::DEFAULT_URL.to_owned()),
    }
}

async fn db() -> TestDb {
    common::migrated("warn,outbox_nats=info").await
}

fn broker(url: &str, timeout: Duration) -> Broker {
    Broker::new(BrokerConfig::new(url).timeout(timeout)).unwrap()
}

/// The JetStream context of a client of the test's own.
async fn jetstream(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url).await.unwrap_or_else(|e| {
        panic!("cannot connect to NATS at {url} ({e}); start it with `scripts/services up nats`")
    });
    jetstream::new(client)
}

/// Holds a stream for one test: nats-server is shared by every checkout on the
/// machine, and a run in another checkout would delete the stream under this
/// one. An exclusive lock on a file named for the stream, released on drop.
struct StreamLock {
    _file: std::fs::File,
}

fn lock_stream(name: &str) -> StreamLock {
    let path = std::env::temp_dir().join(format!("outbox-nats-test-{name}.lock"));
    let file = std::fs::File::create(&path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("cannot lock {}: {e}", path.display()));
    StreamLock { _file: file }
}

/// Deletes the stream `name` if it exists and creates it afresh for `subject`;
/// the caller holds [`lock_stream`] for it.
async fn fresh_stream(js: &jetstream::Context, name: &str, subject: &str) {
    let _ = js.delete_stream(name).await;
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("cannot create stream {name}: {e}"));
}

/// Every message of a stream, read by an ephemeral consumer of the test's own,
/// until `expected` arrived or nothing more came for two seconds.
async fn read_stream(
    js: &jetstream::Context,
    name: &str,
    expected: usize,
) -> Vec<jetstream::Message> {
    let stream = js.get_stream(name).await.unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer
        .stream()
        .heartbeat(Duration::from_secs(1))
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), messages.next()).await {
            Ok(Some(Ok(m))) => got.push(m),
            Ok(Some(Err(e))) => eprintln!("read_stream({name}): {e}; retrying"),
            Ok(None) => break,
            Err(_) if got.len() >= expected => break,
            Err(_) => {}
        }
        if got.len() > expected + 100 {
            break;
        }
    }
    got
}

fn header<'a>(m: &'a jetstream::Message, name: &str) -> &'a str {
    m.headers.as_ref().and_then(|h| h.get(name)).map_or_else(
        || panic!("no header {name:?} on {:?}", m.subject),
        |v| v.as_str(),
    )
}

async fn wait_empty(db: &TestDb, timeout: Duration) {
    common::eventually("the outbox to be empty", timeout, || async {
        count(&db.pool, "select count(*) from outbox").await == 0
    })
    .await;
}

fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stacked_publisher_forwards_each_row_once_with_its_headers() {
    const N: i64 = 50;
    let Some(url) = nats_url("stacked_publisher_forwards_each_row_once_with_its_headers") else {
        return;
    };
    let _lock = lock_stream("OUTBOX_TEST_FORWARD");
    let js = jetstream(&url).await;
    fresh_stream(&js, "OUTBOX_TEST_FORWARD", "outbox_test.forward").await;
    let db = db().await;
    let run = run_id();
    let mut ids = HashMap::new();
    let mut tx = db.pool.begin().await.unwrap();
    for n in 0..N {
        let mut msg = Message::json(
            "forward",
            &Order {
                run: run.clone(),
                n,
            },
        )
        .unwrap()
        .header("source", "checkout");
        if n % 2 == 0 {
            msg = msg
                .key(format!("customer-{n}"))
                .correlation_id(format!("corr-{n}"));
        }
        let id = msg.publish(&mut *tx).await.unwrap().unwrap();
        ids.insert(n, id);
    }
    tx.commit().await.unwrap();

    let running = App::manual(db.pool.clone())
        .register(common::fast(forward::subscriber()))
        .broker(broker(&url, Duration::from_secs(10)))
        .start()
        .await
        .unwrap();
    wait_empty(&db, Duration::from_secs(30)).await;
    running.shutdown().await;

    let got = read_stream(&js, "OUTBOX_TEST_FORWARD", N as usize).await;
    assert_eq!(got.len(), N as usize, "each row once in the stream");
    let mut seen = HashSet::new();
    for m in &got {
        let order: Order = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(order.run, run);
        assert!(seen.insert(order.n), "row {} twice", order.n);
        let id = ids[&order.n].to_string();
        assert_eq!(header(m, "Nats-Msg-Id"), id);
        assert_eq!(header(m, "outbox-id"), id);
        assert_eq!(header(m, "outbox-queue"), "forward");
        assert_eq!(header(m, "outbox-attempt"), "1");
        assert_eq!(header(m, "source"), "checkout");
        let created: i64 = header(m, "outbox-created-at").parse().unwrap();
        assert!(created > 1_600_000_000_000);
        if order.n % 2 == 0 {
            assert_eq!(header(m, "outbox-key"), format!("customer-{}", order.n));
            assert_eq!(
                header(m, "outbox-correlation-id"),
                format!("corr-{}", order.n)
            );
        } else {
            let h = m.headers.as_ref().unwrap();
            assert!(h.get("outbox-key").is_none() && h.get("outbox-correlation-id").is_none());
        }
    }
    assert_eq!(count(&db.pool, "select count(*) from outbox_dlq").await, 0);
    db.drop_db().await;
}

/// The sum of the high watermarks of a Kafka topic's partitions.
async fn kafka_end(topic: &str) -> usize {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = kafka_config().create().unwrap();
        let meta = c
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .unwrap();
        let partitions = meta.topics()[0].partitions().len();
        (0..partitions)
            .map(|p| {
                c.fetch_watermarks(&topic, p as i32, Duration::from_secs(10))
                    .unwrap()
                    .1 as usize
            })
            .sum()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_and_nats_publishers_on_one_handler_both_get_each_row() {
    const N: i64 = 20;
    let Some(url) = nats_url("kafka_and_nats_publishers_on_one_handler_both_get_each_row") else {
        return;
    };
    let _lock = lock_stream("OUTBOX_TEST_STACKED");
    let js = jetstream(&url).await;
    fresh_stream(&js, "OUTBOX_TEST_STACKED", "outbox_test.stacked").await;
    let topic = "outbox_test.nats_stacked";
    common::create_topic(topic, 1).await;
    let before = kafka_end(topic).await;
    let db = db().await;
    let run = run_id();
    let msgs = (0..N)
        .map(|n| {
            Message::json(
                "both",
                &Order {
                    run: run.clone(),
                    n,
                },
            )
            .unwrap()
        })
        .collect();
    Outbox::default()
        .publish_batch(&db.pool, msgs)
        .await
        .unwrap();

    let kafka_broker = kafka::Broker::new(kafka::BrokerConfig::new(&kafka_brokers())).unwrap();
    let running = App::manual(db.pool.clone())
        .register(common::fast(to_both::subscriber()))
        .broker(broker(&url, Duration::from_secs(10)))
        .broker(kafka_broker)
        .start()
        .await
        .unwrap();
    wait_empty(&db, Duration::from_secs(30)).await;
    running.shutdown().await;

    let on_nats: HashSet<i64> = read_stream(&js, "OUTBOX_TEST_STACKED", N as usize)
        .await
        .iter()
        .map(|m| serde_json::from_slice::<Order>(&m.payload).unwrap())
        .filter(|o| o.run == run)
        .map(|o| o.n)
        .collect();
    let on_kafka: HashSet<i64> =
        common::consume_all(topic, before + N as usize, Duration::from_secs(30))
            .await
            .iter()
            .filter_map(|m| serde_json::from_slice::<Order>(rdkafka::Message::payload(m)?).ok())
            .filter(|o| o.run == run)
            .map(|o| o.n)
            .collect();
    let all: HashSet<i64> = (0..N).collect();
    assert_eq!(on_nats, all, "every row on NATS");
    assert_eq!(on_kafka, all, "every row on Kafka");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_without_a_stream_is_retried_then_dead_lettered() {
    let Some(url) = nats_url("a_subject_without_a_stream_is_retried_then_dead_lettered") else {
        return;
    };
    let _lock = lock_stream("OUTBOX_TEST_NOSTREAM");
    let js = jetstream(&url).await;
    let _ = js.delete_stream("OUTBOX_TEST_NOSTREAM").await;
    let db = db().await;
    let run = run_id();
    Message::json("nostream", &Order { run, n: 1 })
        .unwrap()
        .publish(&db.pool)
        .await
        .unwrap();
    let started = Instant::now();
    let running = App::manual(db.pool.clone())
        .register(common::fast(to_nowhere::subscriber()))
        .broker(broker(&url, Duration::from_secs(5)))
        .start()
        .await
        .unwrap();
    common::eventually(
        "the row in the dead letters",
        Duration::from_secs(30),
        || async { count(&db.pool, "select count(*) from outbox_dlq").await == 1 },
    )
    .await;
    running.shutdown().await;
    let (attempts, reason, error): (i32, String, Option<String>) =
        sqlx::query_as("select attempts, failure_reason, last_error from outbox_dlq")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    println!(
        "dead-lettered after {attempts} attempts in {:?}: {reason}: {error:?}",
        started.elapsed()
    );
    assert_eq!(attempts, 3, "retried up to the strategy's 3 attempts");
    let error = error.unwrap_or_default();
    assert!(
        error.contains("no JetStream stream stores subject \"outbox_test.nostream\"")
            && error.contains("create a stream"),
        "the reason says to create the stream: {error}"
    );
    assert_eq!(count(&db.pool, "select count(*) from outbox").await, 0);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_payload_is_permanent_and_the_rest_of_the_batch_goes() {
    let Some(url) =
        nats_url("a_message_over_max_payload_is_permanent_and_the_rest_of_the_batch_goes")
    else {
        return;
    };
    let _lock = lock_stream("OUTBOX_TEST_LARGE");
    let js = jetstream(&url).await;
    fresh_stream(&js, "OUTBOX_TEST_LARGE", "outbox_test.large").await;
    let broker = broker(&url, Duration::from_secs(5));
    let msg = |payload: Vec<u8>, id: &str| Outgoing {
        sink: "nats".into(),
        topic: "outbox_test.large".into(),
        key: None,
        payload,
        headers: vec![("outbox-id".into(), id.as_bytes().to_vec())],
    };
    let results = broker
        .send(vec![
            msg(b"small".to_vec(), "1"),
            msg(vec![b'x'; 2 * 1024 * 1024], "2"),
            msg(b"small too".to_vec(), "3"),
        ])
        .await;
    assert_eq!(results[0], Ok(()));
    let e = results[1].clone().unwrap_err();
    assert!(e.permanent && e.message.contains("max_payload"), "{e:?}");
    assert_eq!(results[2], Ok(()));
    // A re-send of the same id is stored once (JetStream's duplicate window).
    assert_eq!(
        broker.send(vec![msg(b"small".to_vec(), "1")]).await,
        vec![Ok(())]
    );
    let info = js
        .get_stream("OUTBOX_TEST_LARGE")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.state.messages, 2, "ids 1 and 3, id 1 once");
}

// ---------------------------------------------------------------------------
// NATS down: run alone (it stops the shared nats-server).
// ---------------------------------------------------------------------------

fn services(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services");
    let status = std::process::Command::new(script)
        .args([action, "nats"])
        .status()
        .unwrap_or_else(|e| panic!("{script} {action} nats: {e}"));
    assert!(status.success(), "{script} {action} nats failed: {status}");
}

/// Starts NATS again if the test fails while it is stopped.
struct RestartOnDrop {
    armed: bool,
}

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        if self.armed {
            eprintln!("nats_down: restarting NATS after a failure");
            services("start");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the shared nats-server; run alone: cargo test -p outbox-nats --test nats -- --ignored --test-threads=1"]
async fn nats_down_sends_fail_within_the_timeout_rows_are_nacked_and_none_is_lost() {
    const N: i64 = 200;
    const TIMEOUT: Duration = Duration::from_secs(2);
    let Some(url) =
        nats_url("nats_down_sends_fail_within_the_timeout_rows_are_nacked_and_none_is_lost")
    else {
        return;
    };
    let _lock = lock_stream("OUTBOX_TEST_DOWN");
    let js = jetstream(&url).await;
    fresh_stream(&js, "OUTBOX_TEST_DOWN", "outbox_test.down").await;
    let db = db().await;
    let run = run_id();
    let msgs = (0..N)
        .map(|n| {
            Message::json(
                "down",
                &Order {
                    run: run.clone(),
                    n,
                },
            )
            .unwrap()
        })
        .collect();
    Outbox::default()
        .publish_batch(&db.pool, msgs)
        .await
        .unwrap();

    services("stop");
    let mut guard = RestartOnDrop { armed: true };
    let started = Instant::now();
    let running = App::manual(db.pool.clone())
        .register(common::fast(while_down::subscriber()).batch_size(50))
        .broker(broker(&url, TIMEOUT))
        .start()
        .await
        .unwrap();
    common::eventually("a nacked row", Duration::from_secs(30), || async {
        count(&db.pool, "select count(*) from outbox where attempts >= 1").await > 0
    })
    .await;
    let first_nack = started.elapsed();
    println!("first nack {first_nack:?} after start, NATS down, timeout {TIMEOUT:?}");
    assert!(
        first_nack < TIMEOUT + Duration::from_secs(3),
        "the first send took {first_nack:?}, more than the {TIMEOUT:?} timeout and some slack"
    );
    common::eventually("rows tried twice", Duration::from_secs(30), || async {
        count(&db.pool, "select count(*) from outbox where attempts >= 2").await > 0
    })
    .await;
    let error: String = sqlx::query_scalar(
        "select last_error from outbox where last_error is not null order by id limit 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    println!("while NATS was down: {error}");
    assert!(error.contains("no PubAck"), "{error}");
    assert_eq!(
        count(&db.pool, "select count(*) from outbox").await,
        N,
        "a row left the outbox while NATS was down"
    );
    assert_eq!(count(&db.pool, "select count(*) from outbox_dlq").await, 0);

    services("start");
    guard.armed = false;
    let restarted = Instant::now();
    wait_empty(&db, Duration::from_secs(60)).await;
    println!("drained {:?} after the restart", restarted.elapsed());
    running.shutdown().await;

    let js = jetstream(&url).await;
    let got = read_stream(&js, "OUTBOX_TEST_DOWN", N as usize).await;
    let ids: HashSet<String> = got
        .iter()
        .map(|m| header(m, "outbox-id").to_owned())
        .collect();
    let ns: HashSet<i64> = got
        .iter()
        .map(|m| serde_json::from_slice::<Order>(&m.payload).unwrap().n)
        .collect();
    assert_eq!(ns, (0..N).collect::<HashSet<_>>(), "0 lost");
    assert_eq!(ids.len(), N as usize);
    assert_eq!(
        got.len(),
        N as usize,
        "re-sends of one id stored once (Nats-Msg-Id)"
    );
    db.drop_db().await;
}
