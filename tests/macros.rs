//! The attribute macros at run time, against a real PostgreSQL and a real Kafka:
//! discovery of handlers in this binary and in a library crate, stacked
//! publishers in either order, the explicit registration form, validation at
//! start, context arguments, and plain calls of an annotated function.
//!
//! Needs `scripts/services up`. Every test uses its own database.
//!
//! `App::new` discovers every handler of this binary, so each handler has a
//! queue of its own, and tests that want only some handlers use `App::manual`.
//! A publisher's topic is a literal in its attribute, so the topics here are
//! fixed names shared by every run; each test marks its messages with a
//! `run` id of its own and reads only those back.

mod common;

use common::{count, create_topic, kafka_brokers, TestDb};
use outbox::{App, Envelope, Error, HandlerError, Keyed, Message, Meta, State};
use outbox_kafka as kafka;
use outbox_kafka::{Broker, BrokerConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// The only mention of the library crate: without this line the linker drops it
// and `App::new` never sees its handlers ("lib.greetings" and "lib.words").
use outbox_handlers_lib as _;

/// The topic no test ever creates, for a publish that must fail.
const MISSING_TOPIC: &str = "outbox-macros-test.never-created";

/// How long any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Handlers. Each has a queue of its own (see the module docs).
// ---------------------------------------------------------------------------

/// A row handled by the publishing handlers: `fail` makes the handler fail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Order {
    run: String,
    id: i64,
    fail: bool,
}

/// What the publishing handlers return (and Kafka receives).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Accepted {
    run: String,
    id: i64,
}

fn accept(order: Order) -> Result<Accepted, HandlerError> {
    if order.fail {
        return Err(HandlerError::transient(format!(
            "order {} refused",
            order.id
        )));
    }
    Ok(Accepted {
        run: order.run,
        id: order.id,
    })
}

#[outbox::subscriber("macros.discovered")]
async fn discovered_here(text: String) -> Result<(), HandlerError> {
    if text == "fail" {
        return Err(HandlerError::reject("asked to fail"));
    }
    Ok(())
}

#[kafka::publisher("outbox-macros-test.above")]
#[outbox::subscriber(
    "macros.above",
    retry = outbox::ConstantRetry::new(std::time::Duration::from_secs(3600))
)]
async fn publisher_above(order: Order) -> Result<Accepted, HandlerError> {
    accept(order)
}

#[outbox::subscriber(
    "macros.below",
    retry = outbox::ConstantRetry::new(std::time::Duration::from_secs(3600))
)]
#[kafka::publisher("outbox-macros-test.below")]
async fn publisher_below(order: Order) -> Result<Accepted, HandlerError> {
    accept(order)
}

#[kafka::publisher("outbox-macros-test.keyed")]
#[outbox::subscriber("macros.keyed")]
async fn keyed(order: Order) -> Keyed<Accepted> {
    Keyed::new(
        format!("explicit-{}", order.id),
        Accepted {
            run: order.run,
            id: order.id,
        },
    )
}

#[kafka::publisher("outbox-macros-test.fanout-a")]
#[kafka::publisher("outbox-macros-test.fanout-b")]
#[outbox::subscriber("macros.fanout")]
async fn fan_out(order: Order) -> Result<Accepted, HandlerError> {
    accept(order)
}

#[kafka::publisher("outbox-macros-test.half-a")]
#[outbox::subscriber(
    "macros.half",
    retry = outbox::ConstantRetry::new(std::time::Duration::from_secs(3600))
)]
#[kafka::publisher("outbox-macros-test.never-created")]
async fn half_published(order: Order) -> Result<Accepted, HandlerError> {
    accept(order)
}

#[outbox::subscriber("macros.only")]
async fn only_me(text: String) {
    let _ = text;
}

#[outbox::subscriber("macros.not")]
async fn not_me(text: String) {
    let _ = text;
}

#[outbox::subscriber("macros.dup-first")]
async fn dup_first(text: String) {
    let _ = text;
}

#[outbox::subscriber("macros.dup-second")]
async fn dup_second(text: String) {
    let _ = text;
}

/// What [`with_context`] saw of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    note: String,
    recorder: String,
    id: i64,
    queue: String,
    key: Option<String>,
    correlation_id: Option<String>,
    header: Option<String>,
    attempt: u32,
    database: String,
}

/// State given with `App::state`; `tag` tells one app's state from another's.
#[derive(Clone, Default)]
struct Recorder {
    tag: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

#[outbox::subscriber("macros.context")]
async fn with_context(
    note: String,
    meta: Meta,
    state: State<Recorder>,
    pool: PgPool,
) -> Result<(), HandlerError> {
    let database: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&pool)
        .await
        .map_err(|e| HandlerError::transient(e.to_string()))?;
    state.0.seen.lock().unwrap().push(Seen {
        note,
        recorder: state.0.tag.clone(),
        id: meta.id,
        queue: meta.queue,
        key: meta.key,
        correlation_id: meta.correlation_id,
        header: meta.headers.get("h").cloned(),
        attempt: meta.attempt,
        database,
    });
    Ok(())
}

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

async fn setup() -> TestDb {
    common::migrated("outbox=info").await
}

fn broker() -> Broker {
    Broker::new(BrokerConfig::new(&kafka_brokers()).write_timeout(Duration::from_secs(3)))
        .expect("broker")
}

fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Waits (up to [`WAIT`]) until `check` holds; panics with `what` otherwise.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < WAIT, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn row_exists(pool: &PgPool, id: i64) -> bool {
    sqlx::query_scalar("select exists(select 1 from outbox where id = $1)")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A row as the runtime left it after settling it.
#[derive(Debug, sqlx::FromRow)]
struct RowState {
    attempts: i32,
    leased: bool,
    parked: bool,
    failure_reason: Option<String>,
    last_error: Option<String>,
}

async fn row_state(pool: &PgPool, id: i64) -> Option<RowState> {
    sqlx::query_as(
        "select attempts, lease_token is not null as leased, parked_at is not null as parked, \
         failure_reason, last_error from outbox where id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// Waits until row `id` was tried and given back (nacked or parked).
async fn settled_after_failure(pool: &PgPool, id: i64) -> RowState {
    let start = Instant::now();
    loop {
        let state = row_state(pool, id)
            .await
            .unwrap_or_else(|| panic!("row {id} was deleted, but it must stay in the outbox"));
        if state.attempts >= 1 && !state.leased && state.last_error.is_some() {
            return state;
        }
        assert!(
            start.elapsed() < WAIT,
            "row {id} was not nacked within {WAIT:?}: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn publish_order(pool: &PgPool, queue: &str, order: &Order, key: Option<&str>) -> i64 {
    let mut message = Message::json(queue, order).unwrap();
    if let Some(key) = key {
        message = message.key(key);
    }
    message.publish(pool).await.unwrap().expect("a row id")
}

/// Every message of `topic` up to its current end, read with a fresh consumer.
async fn read_to_end(topic: &str) -> Vec<OwnedMessage> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = common::kafka_config()
            .set("group.id", common::unique_topic("outbox-macros-reader"))
            .set("enable.auto.commit", "false")
            .set("allow.auto.create.topics", "false")
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .unwrap_or_else(|| panic!("topic {topic} does not exist"));
        let mut assignment = TopicPartitionList::new();
        let mut ends = HashMap::new();
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p.id(), Duration::from_secs(10))
                .expect("watermarks");
            if high > low {
                assignment
                    .add_partition_offset(&topic, p.id(), Offset::Offset(low))
                    .unwrap();
                ends.insert(p.id(), high);
            }
        }
        let mut messages = Vec::new();
        if ends.is_empty() {
            return messages;
        }
        consumer.assign(&assignment).expect("assign");
        let start = Instant::now();
        while !ends.is_empty() {
            assert!(start.elapsed() < WAIT, "{topic} not read to its end");
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    if ends
                        .get(&m.partition())
                        .is_some_and(|end| m.offset() + 1 >= *end)
                    {
                        ends.remove(&m.partition());
                    }
                    messages.push(m.detach());
                }
                Some(Err(e)) => eprintln!("read_to_end({topic}): {e}; retrying"),
                None => {
                    // The end may be a control record, never delivered.
                    let position = consumer.position().expect("position");
                    for e in position.elements() {
                        if let Offset::Offset(at) = e.offset() {
                            if ends.get(&e.partition()).is_some_and(|end| at >= *end) {
                                ends.remove(&e.partition());
                            }
                        }
                    }
                }
            }
        }
        messages
    })
    .await
    .expect("reader panicked")
}

/// The messages of `topic` this run sent: `(key, value)`, in no special order.
async fn messages_of_run(topic: &str, run: &str) -> Vec<(Option<String>, Accepted)> {
    read_to_end(topic)
        .await
        .iter()
        .filter_map(|m| {
            let value: Accepted = serde_json::from_slice(m.payload()?).ok()?;
            let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
            (value.run == run).then_some((key, value))
        })
        .collect()
}

fn topic_exists(topic: &str) -> bool {
    let consumer: BaseConsumer = common::kafka_config().create().expect("metadata client");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    metadata
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
}

fn names(app: &App) -> Vec<String> {
    let mut names: Vec<String> = app
        .subscribers()
        .iter()
        .map(|s| s.name().to_owned())
        .collect();
    names.sort();
    names
}

/// The two publishing handlers differ only in the order of their attributes;
/// both must publish `Ok` values keyed by the partition key, delete the row,
/// and nack an `Err` without publishing.
async fn publishes_ok_and_nacks_err(queue: &str, topic: &str, handler: outbox::Subscriber) {
    let db = setup().await;
    create_topic(topic, 3).await;
    let run = run_id();
    let order = |id, fail| Order {
        run: run.clone(),
        id,
        fail,
    };
    let with_key = publish_order(&db.pool, queue, &order(1, false), Some("customer-1")).await;
    let without_key = publish_order(&db.pool, queue, &order(2, false), None).await;
    let failing = publish_order(&db.pool, queue, &order(3, true), Some("customer-3")).await;

    let running = App::manual(db.pool.clone())
        .register(handler)
        .broker(broker())
        .start()
        .await
        .expect("start");
    eventually("both good rows deleted", || async {
        !row_exists(&db.pool, with_key).await && !row_exists(&db.pool, without_key).await
    })
    .await;
    let failed = settled_after_failure(&db.pool, failing).await;
    running.shutdown().await;

    assert_eq!(failed.attempts, 1, "{failed:?}");
    assert!(!failed.parked, "{failed:?}");
    assert!(
        failed
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("order 3 refused")),
        "{failed:?}"
    );
    let mut got = messages_of_run(topic, &run).await;
    got.sort_by_key(|(_, v)| v.id);
    assert_eq!(
        got,
        vec![
            (
                Some("customer-1".to_owned()),
                Accepted {
                    run: run.clone(),
                    id: 1
                }
            ),
            (
                None,
                Accepted {
                    run: run.clone(),
                    id: 2
                }
            ),
        ],
        "the Ok values as JSON, keyed by the partition key; nothing for the Err"
    );
    db.drop_db().await;
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_new_discovers_handlers_of_this_binary_and_of_a_library_crate() {
    let db = setup().await;
    let app = App::new(db.pool.clone()).broker(broker());
    let found = names(&app);
    for name in ["greet", "count_words", "discovered_here", "with_context"] {
        assert!(found.iter().any(|n| n == name), "{name} not in {found:?}");
    }
    assert!(
        App::manual(db.pool.clone()).subscribers().is_empty(),
        "App::manual discovers nothing"
    );

    // Payloads written as JSON by hand: this file names nothing of the library.
    let greeting = outbox::publish(
        &db.pool,
        "lib.greetings",
        &serde_json::json!({"name": "Ada"}),
    )
    .await
    .unwrap();
    let words = outbox::publish(&db.pool, "lib.words", &"two words")
        .await
        .unwrap();
    let no_words = outbox::publish(&db.pool, "lib.words", &"  ").await.unwrap();
    let local = outbox::publish(&db.pool, "macros.discovered", &"hello")
        .await
        .unwrap();
    let local_failing = outbox::publish(&db.pool, "macros.discovered", &"fail")
        .await
        .unwrap();

    let running = app.start().await.expect("start");
    eventually("library and local rows handled", || async {
        !row_exists(&db.pool, greeting).await
            && !row_exists(&db.pool, words).await
            && !row_exists(&db.pool, local).await
    })
    .await;
    // count_words rejects an empty text, and has no_dlq: the row is parked.
    let parked = settled_after_failure(&db.pool, no_words).await;
    eventually("local rejected row dead-lettered", || async {
        count(
            &db.pool,
            &format!("select count(*) from outbox_dlq where original_id = {local_failing}"),
        )
        .await
            == 1
    })
    .await;
    running.shutdown().await;

    assert!(parked.parked, "{parked:?}");
    assert_eq!(parked.failure_reason.as_deref(), Some("rejected"));
    assert!(
        parked
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains(&format!("row {no_words} of lib.words has no words"))),
        "{parked:?}"
    );
    assert_eq!(count(&db.pool, "select count(*) from outbox").await, 1);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_above_subscriber_publishes_ok_as_json_keyed_and_nacks_err() {
    publishes_ok_and_nacks_err(
        "macros.above",
        "outbox-macros-test.above",
        publisher_above::subscriber(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_above_publisher_publishes_ok_as_json_keyed_and_nacks_err() {
    publishes_ok_and_nacks_err(
        "macros.below",
        "outbox-macros-test.below",
        publisher_below::subscriber(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_return_value_overrides_the_partition_key() {
    let db = setup().await;
    let topic = "outbox-macros-test.keyed";
    create_topic(topic, 3).await;
    let run = run_id();
    let order = Order {
        run: run.clone(),
        id: 7,
        fail: false,
    };
    let id = publish_order(&db.pool, "macros.keyed", &order, Some("partition-7")).await;
    let running = App::manual(db.pool.clone())
        .subscriber(keyed)
        .broker(broker())
        .start()
        .await
        .expect("start");
    eventually("row deleted", || async { !row_exists(&db.pool, id).await }).await;
    running.shutdown().await;
    assert_eq!(
        messages_of_run(topic, &run).await,
        vec![(Some("explicit-7".to_owned()), Accepted { run, id: 7 })]
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stacked_publishers_both_receive_the_message() {
    let db = setup().await;
    let (a, b) = ("outbox-macros-test.fanout-a", "outbox-macros-test.fanout-b");
    create_topic(a, 1).await;
    create_topic(b, 1).await;
    let run = run_id();
    let order = Order {
        run: run.clone(),
        id: 11,
        fail: false,
    };
    let id = publish_order(&db.pool, "macros.fanout", &order, Some("k-11")).await;
    let running = App::manual(db.pool.clone())
        .subscriber(fan_out)
        .broker(broker())
        .start()
        .await
        .expect("start");
    eventually("row deleted", || async { !row_exists(&db.pool, id).await }).await;
    running.shutdown().await;
    let expected = vec![(
        Some("k-11".to_owned()),
        Accepted {
            run: run.clone(),
            id: 11,
        },
    )];
    assert_eq!(messages_of_run(a, &run).await, expected, "topic {a}");
    assert_eq!(messages_of_run(b, &run).await, expected, "topic {b}");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_stays_when_one_of_two_stacked_publishers_fails() {
    assert!(
        !topic_exists(MISSING_TOPIC),
        "{MISSING_TOPIC} exists, but this test needs it missing; delete it"
    );
    let db = setup().await;
    let present = "outbox-macros-test.half-a";
    create_topic(present, 1).await;
    let run = run_id();
    let order = Order {
        run: run.clone(),
        id: 21,
        fail: false,
    };
    let id = publish_order(&db.pool, "macros.half", &order, Some("k-21")).await;
    let running = App::manual(db.pool.clone())
        .subscriber(half_published)
        .broker(broker())
        .start()
        .await
        .expect("start");
    let state = settled_after_failure(&db.pool, id).await;
    running.shutdown().await;

    assert_eq!(state.attempts, 1, "{state:?}");
    assert!(!state.parked, "{state:?}");
    assert!(
        state
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains(MISSING_TOPIC)),
        "the error names the missing topic: {state:?}"
    );
    // At least once: the topic that exists got the message, and will get it
    // again when the row is retried.
    assert_eq!(
        messages_of_run(present, &run).await,
        vec![(Some("k-21".to_owned()), Accepted { run, id: 21 })]
    );
    assert!(
        !topic_exists(MISSING_TOPIC),
        "the publish must not create the topic"
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_manual_subscriber_registers_only_that_handler() {
    let db = setup().await;
    let app = App::manual(db.pool.clone()).subscriber(only_me);
    assert_eq!(names(&app), vec!["only_me".to_owned()]);

    let not_mine = outbox::publish(&db.pool, "macros.not", &"skip me")
        .await
        .unwrap();
    let mine = outbox::publish(&db.pool, "macros.only", &"take me")
        .await
        .unwrap();
    let running = app.start().await.expect("start");
    eventually("only_me's row deleted", || async {
        !row_exists(&db.pool, mine).await
    })
    .await;
    running.shutdown().await;
    let untouched = row_state(&db.pool, not_mine)
        .await
        .expect("the row of not_me is still there");
    assert_eq!(untouched.attempts, 0, "not_me ran: {untouched:?}");
    assert_eq!(
        names(&App::manual(db.pool.clone()).subscriber(not_me)),
        ["not_me"]
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handlers_on_one_queue_and_a_publisher_without_broker_are_one_error() {
    let db = setup().await;
    // Both of dup_first and dup_second (the latter given dup_first's queue as
    // well), and a handler with a publisher, but no broker.
    let bad = || {
        App::manual(db.pool.clone())
            .subscriber(dup_first)
            .register(dup_second::subscriber().queue("macros.dup-first"))
            .subscriber(publisher_above)
    };
    let problems = |e: Error| match e {
        Error::Config(errors) => errors.problems().to_vec(),
        other => panic!("expected a configuration error, got {other:?}"),
    };
    let from_validate = problems(bad().validate().expect_err("validate must fail"));
    assert_eq!(from_validate.len(), 2, "{from_validate:#?}");
    assert!(
        from_validate
            .iter()
            .any(|p| p.contains("\"macros.dup-first\"")
                && p.contains("two handlers")
                && p.contains("\"dup_first\"")
                && p.contains("\"dup_second\"")),
        "{from_validate:#?}"
    );
    assert!(
        from_validate
            .iter()
            .any(|p| p.contains("\"publisher_above\"")
                && p.contains("\"outbox-macros-test.above\"")
                && p.contains("no kafka broker is configured")),
        "{from_validate:#?}"
    );

    let from_start = problems(bad().start().await.expect_err("start must fail"));
    assert_eq!(from_start, from_validate);

    // The same set is valid without the duplicate and with a broker.
    App::manual(db.pool.clone())
        .subscriber(dup_first)
        .subscriber(dup_second)
        .subscriber(publisher_above)
        .broker(broker())
        .validate()
        .expect("a valid set");
    db.drop_db().await;
}

/// Not annotated: `App::subscriber` must refuse it rather than drop it.
async fn not_annotated(text: String) {
    let _ = text;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_subscriber_reports_a_function_without_the_attribute() {
    let db = setup().await;
    let app = App::manual(db.pool.clone())
        .subscriber(only_me)
        .subscriber(not_annotated);
    assert_eq!(names(&app), ["only_me"]);
    let problems = match app.validate() {
        Err(Error::Config(errors)) => errors.problems().to_vec(),
        other => panic!("expected a configuration error, got {other:?}"),
    };
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].contains("`macros::not_annotated`")
            && problems[0].contains("not a handler annotated with #[outbox::subscriber]"),
        "{problems:#?}"
    );
    let from_start = App::manual(db.pool.clone())
        .subscriber(only_me)
        .subscriber(not_annotated)
        .start()
        .await
        .expect_err("start must fail");
    assert!(
        from_start.to_string().contains("macros::not_annotated"),
        "{from_start}"
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_meta_and_pool_arguments_receive_the_apps_values() {
    let db = setup().await;
    let recorder = Recorder {
        tag: run_id(),
        seen: Arc::default(),
    };
    let id = Message::json("macros.context", &"note-1")
        .unwrap()
        .key("key-1")
        .correlation_id("corr-1")
        .header("h", "header-1")
        .publish(&db.pool)
        .await
        .unwrap()
        .unwrap();
    let running = App::manual(db.pool.clone())
        .subscriber(with_context)
        .state(recorder.clone())
        .start()
        .await
        .expect("start");
    eventually("row deleted", || async { !row_exists(&db.pool, id).await }).await;
    running.shutdown().await;
    let seen = recorder.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![Seen {
            note: "note-1".into(),
            recorder: recorder.tag.clone(),
            id,
            queue: "macros.context".into(),
            key: Some("key-1".into()),
            correlation_id: Some("corr-1".into()),
            header: Some("header-1".into()),
            attempt: 1,
            database: db.name().to_owned(),
        }]
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotated_function_stays_callable_as_a_plain_function() {
    let db = setup().await;
    let run = run_id();
    let ok = publisher_above(Order {
        run: run.clone(),
        id: 1,
        fail: false,
    })
    .await;
    assert_eq!(
        ok.unwrap(),
        Accepted {
            run: run.clone(),
            id: 1
        }
    );
    let err = publisher_below(Order {
        run: run.clone(),
        id: 2,
        fail: true,
    })
    .await
    .unwrap_err();
    assert_eq!(err.message(), "order 2 refused");
    let k = keyed(Order {
        run: run.clone(),
        id: 3,
        fail: false,
    })
    .await;
    assert_eq!(k, Keyed::new("explicit-3", Accepted { run, id: 3 }));

    let recorder = Recorder {
        tag: "direct".into(),
        seen: Arc::default(),
    };
    let meta = Meta::from(
        &Envelope::new(42, "macros.context", Vec::new())
            .with_key("k")
            .with_header("h", "v"),
    );
    with_context(
        "by hand".into(),
        meta,
        State(recorder.clone()),
        db.pool.clone(),
    )
    .await
    .unwrap();
    let seen = recorder.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].note.as_str(), seen[0].id, seen[0].key.as_deref()),
        ("by hand", 42, Some("k"))
    );
    assert_eq!(seen[0].header.as_deref(), Some("v"));
    assert_eq!(seen[0].database, db.name());
    // Nothing was written: calling the function is not publishing.
    assert_eq!(count(&db.pool, "select count(*) from outbox").await, 0);
    db.drop_db().await;
}
