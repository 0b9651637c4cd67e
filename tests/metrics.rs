//! Metrics, health endpoints and log lines of a running app, against a real
//! PostgreSQL. The Prometheus recorder and the log subscriber are global to
//! the process, so every assertion on them lives in this one test binary;
//! each test uses queues of its own, so their figures never mix.

mod common;

use common::TestDb;
use futures::future::BoxFuture;
use outbox::metrics::Endpoint;
use outbox::{
    App, ConstantRetry, Context, Envelope, HandlerError, Message, NoRetry, Output, Sink, SinkError,
    Subscriber, Tables,
};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A series name, its labels and the value expected for it.
type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Log lines of the whole process, as the text format writes them.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("outbox=debug")
            .with_ansi(false)
            .with_target(false)
            .with_writer(move || LogWriter(writer.clone()))
            .try_init();
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

/// `GET path` over HTTP/1.0: status code and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(addr, &format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n")).await
}

async fn request(addr: SocketAddr, raw: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp))
        .await
        .expect("the endpoint answers within 10 s")
        .unwrap();
    let resp = String::from_utf8(resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("a full response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// One sample of the Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap();
                    let labels = inner
                        .split("\",")
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once("=\"").unwrap();
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (n.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            Sample {
                name,
                labels,
                value: value.parse().unwrap(),
            }
        })
        .collect()
}

/// The value of `name` with (at least) these labels, if present.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(()) => return,
            Err(last) if start.elapsed() > timeout => {
                panic!("timed out waiting for {what}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A broker that takes every message after a short pause.
struct SlowSink;

impl Sink for SlowSink {
    fn name(&self) -> &str {
        "fake"
    }
    fn send(&self, batch: Vec<outbox::Outgoing>) -> BoxFuture<'_, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            batch.iter().map(|_| Ok(())).collect()
        })
    }
}

/// A broker that refuses every message for good (too large, say).
struct RefusingSink;

impl Sink for RefusingSink {
    fn name(&self) -> &str {
        "refusing"
    }
    fn send(&self, batch: Vec<outbox::Outgoing>) -> BoxFuture<'_, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            batch
                .iter()
                .map(|_| Err(SinkError::permanent("message too large")))
                .collect()
        })
    }
}

type Fut = BoxFuture<'static, Result<Output, HandlerError>>;

fn sub(
    name: &str,
    queue: &str,
    f: impl Fn(Arc<Envelope>) -> Result<Output, HandlerError> + Send + Sync + 'static,
) -> Subscriber {
    let f = Arc::new(f);
    Subscriber::new(name, move |env: Arc<Envelope>, _ctx: Context| -> Fut {
        let r = f(env);
        Box::pin(async move { r })
    })
    .queue(queue)
    .poll_interval(Duration::from_millis(10), Duration::from_millis(50))
}

#[tokio::test]
async fn a_running_app_exports_what_it_does() {
    logs();
    let db = TestDb::new().await;
    outbox::migrate(&db.pool, &Tables::default()).await.unwrap();

    let flaky_calls = Arc::new(AtomicUsize::new(0));
    let calls = flaky_calls.clone();
    let app = App::manual(db.pool.clone())
        .broker(SlowSink)
        .register(
            sub("m_ok_handler", "m_ok", |env| {
                Ok(Output::none().publish("fake", "t", None, env.payload.clone()))
            })
            .publisher("fake", "t"),
        )
        .register(
            sub("m_flaky_handler", "m_flaky", move |_| {
                // Each of the two rows fails once, then succeeds.
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(HandlerError::transient("database is busy"))
                } else {
                    Ok(Output::none())
                }
            })
            .retry(
                ConstantRetry::new(Duration::from_millis(100))
                    .jitter(0.0)
                    .max_attempts(5),
            )
            .concurrency(1)
            .batch_size(1),
        )
        .register(sub("m_bad_handler", "m_bad", |_| {
            Err(HandlerError::reject("order was cancelled"))
        }))
        .register(
            sub("m_spent_handler", "m_spent", |_| {
                Err(HandlerError::transient("still down"))
            })
            .retry(NoRetry),
        )
        .broker(RefusingSink)
        .register(
            // The handler succeeds, its publish is refused: not "processed".
            sub("m_unsent_handler", "m_unsent", |env| {
                Ok(Output::none().publish("refusing", "t", None, env.payload.clone()))
            })
            .publisher("refusing", "t"),
        )
        .register(
            sub("m_parked_handler", "m_parked", |_| {
                Err(HandlerError::reject("no such customer"))
            })
            .no_dlq(),
        )
        .metrics_endpoint(
            Endpoint::new("127.0.0.1:0".parse().unwrap())
                .sample_interval(Duration::from_millis(200)),
        );

    for i in 0..3 {
        outbox::publish(&db.pool, "m_ok", &i).await.unwrap();
    }
    for i in 0..2 {
        outbox::publish(&db.pool, "m_flaky", &i).await.unwrap();
    }
    outbox::publish(&db.pool, "m_bad", &1).await.unwrap();
    outbox::publish(&db.pool, "m_spent", &1).await.unwrap();
    outbox::publish(&db.pool, "m_parked", &1).await.unwrap();
    outbox::publish(&db.pool, "m_unsent", &1).await.unwrap();
    for i in 0..2 {
        Message::json("m_later", &i)
            .unwrap()
            .activate_in(Duration::from_secs(3600))
            .publish(&db.pool)
            .await
            .unwrap();
    }

    // The m_ok rows were created 30 s before they are handled.
    sqlx::query(
        "UPDATE outbox SET created_at = now() - interval '30 seconds' WHERE queue = 'm_ok'",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let running = app.start().await.unwrap();
    let addr = running.metrics_addr().expect("metrics are on");
    assert_ne!(addr.port(), 0);

    let expected: &[Expected] = &[
        ("outbox_claimed_total", &[("queue", "m_ok")], 3.0),
        ("outbox_handled_total", &[("queue", "m_ok")], 3.0),
        ("outbox_claimed_total", &[("queue", "m_flaky")], 4.0),
        ("outbox_retried_total", &[("queue", "m_flaky")], 2.0),
        ("outbox_handled_total", &[("queue", "m_flaky")], 2.0),
        (
            "outbox_dead_lettered_total",
            &[("queue", "m_bad"), ("reason", "rejected")],
            1.0,
        ),
        (
            "outbox_rejected_total",
            &[("queue", "m_bad"), ("reason", "rejected")],
            1.0,
        ),
        (
            "outbox_dead_lettered_total",
            &[("queue", "m_spent"), ("reason", "retries_exhausted")],
            1.0,
        ),
        (
            "outbox_dead_lettered_total",
            &[("queue", "m_parked"), ("reason", "rejected")],
            1.0,
        ),
        (
            "outbox_dead_lettered_total",
            &[("queue", "m_unsent"), ("reason", "publish_rejected")],
            1.0,
        ),
        ("outbox_handler_seconds_count", &[("queue", "m_ok")], 3.0),
        // Once per message delivered, not per attempt.
        ("outbox_end_to_end_seconds_count", &[("queue", "m_ok")], 3.0),
        (
            "outbox_end_to_end_seconds_count",
            &[("queue", "m_flaky")],
            2.0,
        ),
        ("outbox_handler_seconds_count", &[("queue", "m_flaky")], 4.0),
        ("outbox_in_flight", &[("subscriber", "m_ok_handler")], 0.0),
        (
            "outbox_in_flight",
            &[("subscriber", "m_flaky_handler")],
            0.0,
        ),
        ("outbox_pending_rows", &[("queue", "m_later")], 2.0),
        ("outbox_parked_rows", &[("queue", "m_parked")], 1.0),
        ("outbox_dlq_rows", &[("queue", "m_bad")], 1.0),
        ("outbox_dlq_rows", &[("queue", "m_spent")], 1.0),
    ];
    eventually("every figure", Duration::from_secs(30), || async move {
        let (status, body) = get(addr, "/metrics").await;
        if status != 200 {
            return Err(format!("status {status}"));
        }
        let samples = parse(&body);
        for (name, labels, want) in expected {
            let got = value(&samples, name, labels);
            if got != Some(*want) {
                return Err(format!("{name}{labels:?} is {got:?}, expected {want}"));
            }
        }
        Ok(())
    })
    .await;

    let (_, body) = get(addr, "/metrics").await;
    let samples = parse(&body);
    assert_eq!(
        value(
            &samples,
            "outbox_rejected_total",
            &[("queue", "m_spent"), ("reason", "retries_exhausted")]
        ),
        None,
        "retries_exhausted is not a rejection"
    );
    let rejected_spent: f64 = samples
        .iter()
        .filter(|s| {
            s.name == "outbox_rejected_total"
                && s.labels.get("queue").map(String::as_str) == Some("m_spent")
        })
        .map(|s| s.value)
        .sum();
    assert_eq!(rejected_spent, 0.0, "the spent row counts as no rejection");
    let lag = value(
        &samples,
        "outbox_oldest_pending_seconds",
        &[("queue", "m_later")],
    )
    .unwrap();
    assert!(lag > 0.0 && lag < 600.0, "lag {lag}");
    let published = value(
        &samples,
        "outbox_publish_seconds_count",
        &[("sink", "fake")],
    )
    .unwrap();
    assert!(published >= 1.0, "one publish per batch: {published}");
    let end_to_end = value(
        &samples,
        "outbox_end_to_end_seconds_sum",
        &[("queue", "m_ok")],
    )
    .unwrap();
    assert!(
        (90.0..200.0).contains(&end_to_end),
        "three messages created 30 s before their delivery: {end_to_end} s in all"
    );
    assert_eq!(
        value(
            &samples,
            "outbox_end_to_end_seconds_count",
            &[("queue", "m_unsent")]
        ),
        None,
        "a message whose publish was refused was not delivered"
    );
    let publish_time = value(&samples, "outbox_publish_seconds_sum", &[("sink", "fake")]).unwrap();
    assert!(publish_time >= 0.005 * published, "{publish_time}");
    assert!(
        value(
            &samples,
            "outbox_handler_seconds_bucket",
            &[("queue", "m_ok"), ("le", "+Inf")]
        ) == Some(3.0),
        "handler times are a histogram with buckets: {body}"
    );
    assert!(
        body.contains("# HELP outbox_oldest_pending_seconds"),
        "{body}"
    );

    let (status, body) = get(addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("database: ok"), "{body}");

    // Log lines a person can follow.
    let text = log_text();
    for want in [
        "m_ok | received",
        "m_ok | processed in ",
        "m_flaky | retry 1/5 in 100ms: database is busy",
        "m_bad | dead-lettered: rejected: order was cancelled",
        "m_spent | dead-lettered: retries_exhausted: still down",
        "m_unsent | dead-lettered: publish_rejected: message too large",
    ] {
        assert!(text.contains(want), "no {want:?} in the logs:\n{text}");
    }
    assert!(
        !text.contains("m_unsent | processed"),
        "a row whose publish was refused is not logged as processed:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("m_ok | received") && l.contains("message{queue=m_ok")),
        "received is logged inside the message span:\n{text}"
    );

    // Rows that go away leave zeros behind, not their last figures.
    sqlx::query("DELETE FROM outbox WHERE queue = 'm_later'")
        .execute(&db.pool)
        .await
        .unwrap();
    eventually(
        "the drained queue to read zero",
        Duration::from_secs(10),
        || async move {
            let (_, body) = get(addr, "/metrics").await;
            match value(
                &parse(&body),
                "outbox_pending_rows",
                &[("queue", "m_later")],
            ) {
                Some(0.0) => Ok(()),
                v => Err(format!("{v:?}")),
            }
        },
    )
    .await;

    running.shutdown().await;
    eventually(
        "the endpoint to close with the app",
        Duration::from_secs(5),
        || async move {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => Err("still accepting".into()),
                Err(_) => Ok(()),
            }
        },
    )
    .await;
    db.drop_db().await;
}

#[tokio::test]
async fn readiness_reports_failing_checks() {
    logs();
    let handle = Endpoint::new("127.0.0.1:0".parse().unwrap())
        .ready_check("always", || async { Ok::<(), String>(()) })
        .ready_check("broker", || async {
            Err::<(), _>("127.0.0.1:9 is unreachable")
        })
        .serve()
        .await
        .unwrap();
    let addr = handle.local_addr();
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("always: ok"), "{body}");
    assert!(
        body.contains("broker: failed: 127.0.0.1:9 is unreachable"),
        "{body}"
    );
    let (status, _) = get(addr, "/healthz").await;
    assert_eq!(status, 200, "alive even when not ready");
    let (status, body) = get(addr, "/nope").await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = request(addr, "POST /metrics HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 405);
    outbox::metrics::set_kafka_queue_depth(7);
    let (status, body) = get(addr, "/metrics?x=1").await;
    assert_eq!(status, 200);
    assert_eq!(
        value(&parse(&body), "outbox_kafka_queue_depth", &[]),
        Some(7.0),
        "{body}"
    );
    handle.stop();

    // A database that does not answer makes the app's check fail.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy("postgres://outbox:outbox@127.0.0.1:1/outbox")
        .unwrap();
    let handle = Endpoint::new("127.0.0.1:0".parse().unwrap())
        .database(pool)
        .serve()
        .await
        .unwrap();
    let (status, body) = get(handle.local_addr(), "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("database: failed"), "{body}");
    assert!(!body.contains("outbox:outbox"), "{body}");
    handle.stop();

    // Settings are checked.
    let e = Endpoint::new("127.0.0.1:0".parse().unwrap())
        .sample_interval(Duration::ZERO)
        .serve()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("accepted: 100 ms to 1 h"), "{e}");
}

/// An endpoint whose address is taken: `best_effort` apps start without it
/// (the relay binary's default address), the others refuse to start, naming
/// the address.
#[tokio::test]
async fn a_taken_address_fails_the_start_unless_best_effort() {
    logs();
    let db = TestDb::new().await;
    outbox::migrate(&db.pool, &Tables::default()).await.unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let noop = |_env: Arc<Envelope>, _ctx: Context| async { Ok(Output::none()) };
    let app =
        || App::manual(db.pool.clone()).register(Subscriber::new("taken", noop).queue("taken"));

    let err = match app().metrics_endpoint(Endpoint::new(addr)).start().await {
        Ok(_) => panic!("started although {addr} is taken"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("cannot serve metrics on {addr}")),
        "{err}"
    );

    let running = app()
        .metrics_endpoint(Endpoint::new(addr).best_effort(true))
        .start()
        .await
        .expect("a best-effort endpoint does not stop the app");
    assert_eq!(running.metrics_addr(), None, "running without the endpoint");
    running.shutdown().await;
    drop(taken);
    db.drop_db().await;
}

/// Counters exist from start-up at zero, for every queue a subscriber names
/// and every reason, and for the queues of an every-queue subscriber (the
/// relay) once the sampler has seen them: an alert on
/// `increase(outbox_dead_lettered_total[1h]) > 0` sees the first dead letter
/// after a restart, not a series that starts with it.
#[tokio::test]
async fn counters_exist_at_zero_from_start_up() {
    logs();
    let db = TestDb::new().await;
    outbox::migrate(&db.pool, &Tables::default()).await.unwrap();
    // A row of another queue, not yet due, for the every-queue subscriber.
    Message::json("z_other", &1)
        .unwrap()
        .activate_in(Duration::from_secs(3600))
        .publish(&db.pool)
        .await
        .unwrap();
    let endpoint = || {
        Endpoint::new("127.0.0.1:0".parse().unwrap()).sample_interval(Duration::from_millis(200))
    };
    let running = App::manual(db.pool.clone())
        .register(sub("z_named_handler", "z_named", |_| Ok(Output::none())))
        .metrics_endpoint(endpoint())
        .start()
        .await
        .unwrap();
    let addr = running.metrics_addr().expect("metrics are on");
    let (_, body) = get(addr, "/metrics").await;
    let samples = parse(&body);
    for name in [
        "outbox_claimed_total",
        "outbox_handled_total",
        "outbox_retried_total",
    ] {
        assert_eq!(
            value(&samples, name, &[("queue", "z_named")]),
            Some(0.0),
            "{name}"
        );
    }
    for reason in [
        "deserialize",
        "rejected",
        "retries_exhausted",
        "publish_rejected",
        "crashed",
    ] {
        assert_eq!(
            value(
                &samples,
                "outbox_dead_lettered_total",
                &[("queue", "z_named"), ("reason", reason)]
            ),
            Some(0.0),
            "dead-lettered, {reason}"
        );
    }
    running.shutdown().await;

    // The relay's form: every queue, named by the rows the sampler sees.
    let running = App::manual(db.pool.clone())
        .register(
            Subscriber::new(
                "z_all_handler",
                |_env: Arc<Envelope>, _ctx: Context| async { Ok(Output::none()) },
            )
            .all_queues(),
        )
        .metrics_endpoint(endpoint())
        .start()
        .await
        .unwrap();
    let addr = running.metrics_addr().expect("metrics are on");
    eventually(
        "the sampler's queue has its counters",
        Duration::from_secs(10),
        || async {
            let (_, body) = get(addr, "/metrics").await;
            match value(
                &parse(&body),
                "outbox_dead_lettered_total",
                &[("queue", "z_other"), ("reason", "crashed")],
            ) {
                Some(0.0) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    running.shutdown().await;
    db.drop_db().await;
}
