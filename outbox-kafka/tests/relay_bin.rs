//! The `outbox-relay` binary: its help, its exit status for bad settings, and a
//! real run against PostgreSQL and Kafka (`scripts/services up`).

#[path = "../../tests/common/mod.rs"]
mod common;
mod running;

use common::{consume_all, create_topic, kafka_brokers, unique_topic, TestDb};
use running::Running;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

/// Runs the binary with a clean environment plus `vars`.
fn relay(vars: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(args);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().expect("run outbox-relay")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_lists_every_variable_with_its_default() {
    let out = relay(&[], &["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (name, default, _) in outbox_kafka::relay::RELAY_VARS {
        assert!(
            help.contains(&format!("env: {name}")),
            "{name} missing from:\n{help}"
        );
        if let Some(d) = default {
            assert!(
                help.contains(&format!("default: {d}")),
                "default of {name} missing from:\n{help}"
            );
        }
    }
    assert!(help.contains("KAFKA_PROP_"), "{help}");
}

#[test]
fn bad_settings_exit_2_naming_the_variable() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "CAPTURE",
            "wal",
            r#"CAPTURE: "wal" is not one of table, log"#,
        ),
        (
            "CAPTURE_SLOT",
            "Relay-1",
            "CAPTURE_SLOT: \"Relay-1\" is not a valid name (accepted: 1 to 63 lower-case letters, digits and _)",
        ),
        (
            "CAPTURE_HEARTBEAT",
            "5ms",
            "CAPTURE_HEARTBEAT: 5ms is out of range (accepted: 100ms to 1h)",
        ),
        (
            "CAPTURE_TABLE",
            "outbox_events",
            "CAPTURE_TABLE: is accepted with CAPTURE=log only",
        ),
        (
            "CAPTURE_COLUMNS",
            "queue=q",
            "CAPTURE_COLUMNS: is set without CAPTURE_TABLE",
        ),
        (
            "PUBLISHER_TYPE",
            "nats",
            r#"PUBLISHER_TYPE: "nats" is not one of kafka"#,
        ),
        (
            "PUBLISHER_URL",
            "http://k:9092",
            "PUBLISHER_URL: scheme must be kafka://",
        ),
        (
            "PUBLISHER_URL",
            "kafka://k:port",
            r#"PUBLISHER_URL: port "port""#,
        ),
        (
            "KAFKA_ACKS",
            "two",
            r#"KAFKA_ACKS: "two" is not one of all, one, none"#,
        ),
        (
            "KAFKA_BATCH_SIZE",
            "many",
            r#"KAFKA_BATCH_SIZE: "many" is not a number"#,
        ),
        (
            "KAFKA_WRITE_TIMEOUT",
            "10",
            r#"KAFKA_WRITE_TIMEOUT: "10" is not a duration"#,
        ),
        (
            "KAFKA_WRITE_TIMEOUT",
            "0ms",
            "KAFKA_WRITE_TIMEOUT: 0ms is out of range (accepted: 1ms to 1h)",
        ),
        (
            "RELAY_BATCH_SIZE",
            "0",
            "RELAY_BATCH_SIZE: 0 is out of range",
        ),
        (
            "RELAY_WORKERS",
            "x",
            r#"RELAY_WORKERS: "x" is not a number"#,
        ),
        (
            "RETRY_MAX_ATTEMPTS",
            "-1",
            r#"RETRY_MAX_ATTEMPTS: "-1" is not a number"#,
        ),
        (
            "RELAY_EXIT_WHEN_IDLE",
            "perhaps",
            r#"RELAY_EXIT_WHEN_IDLE: "perhaps" is not a boolean"#,
        ),
        ("OUTBOX_TABLE", "drop table x", "OUTBOX_TABLE: "),
        (
            "TOPIC_MAP",
            "orders",
            r#"TOPIC_MAP: "orders" is not queue:topic"#,
        ),
        (
            "TOPIC_MAP",
            "orders:__consumer_offsets",
            r#"TOPIC_MAP: topic "__consumer_offsets" is internal to Kafka"#,
        ),
        (
            "TOPIC_PREFIX",
            "__app.",
            r#"TOPIC_PREFIX: "__app." would name topics internal to Kafka"#,
        ),
        ("DATABASE_URL", "mysql://u:pw@h/db", "DATABASE_URL: "),
        (
            "METRICS_SAMPLE_INTERVAL",
            "10ms",
            "METRICS_SAMPLE_INTERVAL: 10ms is out of range (accepted: 100ms to 1h)",
        ),
        (
            "METRICS_SAMPLE_INTERVAL",
            "often",
            r#"METRICS_SAMPLE_INTERVAL: "often" is not a duration"#,
        ),
        (
            "LOG_FORMAT",
            "xml",
            r#"LOG_FORMAT: "xml" is not one of text, json"#,
        ),
    ];
    for (var, value, expected) in cases {
        let out = relay(&[(var, value)], &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {err}");
        assert!(
            err.contains(expected),
            "{var}={value}: expected {expected:?} in {err:?}"
        );
    }
}

#[test]
fn secrets_stay_out_of_error_messages() {
    let out = relay(
        &[
            ("DATABASE_URL", "mysql://admin:db-secret-pw@h/db"),
            ("PUBLISHER_URL", "kafka://user:kafka-secret-pw@k:9092"),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(!err.contains("db-secret-pw"), "{err}");
    let out = relay(
        &[("PUBLISHER_URL", "kafka://user:kafka-secret-pw@k:port")],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        !stderr(&out).contains("kafka-secret-pw"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_relays_rows_and_exits_when_idle() {
    let db = TestDb::new().await;
    let topic = unique_topic("relay-bin");
    create_topic(&topic, 1).await;
    // RELAY_MIGRATE creates the tables, so migrate first to publish.
    outbox::migrate(&db.pool, &outbox::Tables::default())
        .await
        .unwrap();
    // 10,000 rows, and no user code: the binary alone forwards them.
    const ROWS: usize = 10_000;
    for chunk in (0..ROWS).collect::<Vec<_>>().chunks(1_000) {
        let msgs: Vec<outbox::Message> = chunk
            .iter()
            .map(|i| outbox::Message::json("bin.orders", i).unwrap())
            .collect();
        outbox::Outbox::default()
            .publish_batch(&db.pool, msgs)
            .await
            .unwrap();
    }
    let map = format!("bin.orders:{topic}");
    let vars = [
        ("DATABASE_URL", db.url.clone()),
        ("PUBLISHER_URL", format!("kafka://{}", kafka_brokers())),
        ("PUBLISHER_TYPE", "kafka".to_owned()),
        ("TOPIC_MAP", map),
        ("RELAY_MIGRATE", "true".to_owned()),
        ("RELAY_EXIT_WHEN_IDLE", "true".to_owned()),
        ("LOG_FORMAT", "json".to_owned()),
    ];
    let out = tokio::task::spawn_blocking(move || {
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        relay(&vars, &[])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let logs = stderr(&out);
    assert!(
        logs.lines().any(|l| l.starts_with('{')),
        "json logs: {logs}"
    );
    assert!(
        !logs.contains(":outbox@"),
        "the database password leaked: {logs}"
    );
    let left: i64 = sqlx::query_scalar("select count(*) from outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    // Every row arrived: each payload (0..ROWS) at least once.
    let got = consume_all(&topic, ROWS, Duration::from_secs(120)).await;
    let numbers: std::collections::BTreeSet<usize> = got
        .iter()
        .filter_map(|m| serde_json::from_slice(rdkafka::Message::payload(m)?).ok())
        .collect();
    assert_eq!(
        numbers.len(),
        ROWS,
        "{} messages, {} distinct payloads of {ROWS}",
        got.len(),
        numbers.len()
    );
    assert_eq!(numbers.last(), Some(&(ROWS - 1)));
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_binary_with_status_0() {
    let db = TestDb::new().await;
    let child = Command::new(BIN)
        .env("DATABASE_URL", &db.url)
        .env("KAFKA_BROKERS", kafka_brokers())
        .env("RELAY_MIGRATE", "true")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn outbox-relay");
    // Wait until it runs: the migration creates the outbox table.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready: bool = sqlx::query_scalar("select to_regclass('outbox') is not null")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "the relay did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let logs = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{logs}");
    assert!(logs.contains("SIGTERM"), "{logs}");
    db.drop_db().await;
}

/// The relay serves Prometheus metrics (with the outbox lag gauges), liveness
/// and readiness (database and Kafka) on `METRICS_ADDR`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_are_served_on_metrics_addr() {
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let db = TestDb::new().await;
    let topic = unique_topic("relay-metrics");
    create_topic(&topic, 1).await;
    outbox::migrate(&db.pool, &outbox::Tables::default())
        .await
        .unwrap();
    let msgs: Vec<outbox::Message> = (0..5)
        .map(|i| outbox::Message::json("metrics.orders", &i).unwrap())
        .collect();
    outbox::Outbox::default()
        .publish_batch(&db.pool, msgs)
        .await
        .unwrap();
    // Port 0: the relay binds a free port itself and logs it; a port freed by
    // the test and passed on could be taken by another process meanwhile.
    let mut child = tokio::process::Command::new(BIN)
        .env("DATABASE_URL", &db.url)
        .env("KAFKA_BROKERS", kafka_brokers())
        .env("TOPIC_MAP", format!("metrics.orders:{topic}"))
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Every line the relay logs, for the assertion messages.
    let logs = Arc::new(Mutex::new(Vec::<String>::new()));
    let (addr_tx, mut addr_rx) = tokio::sync::mpsc::unbounded_channel::<u16>();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let kept = logs.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(port) = serving_port(&line) {
                let _ = addr_tx.send(port);
            }
            kept.lock().unwrap().push(line);
        }
    });
    let tail = |logs: &Arc<Mutex<Vec<String>>>| {
        let logs = logs.lock().unwrap();
        logs[logs.len().saturating_sub(30)..].join("\n")
    };
    let port = match tokio::time::timeout(Duration::from_secs(60), addr_rx.recv()).await {
        Ok(Some(port)) => port,
        _ => panic!(
            "the relay logged no metrics address within 60 s; its log:\n{}",
            tail(&logs)
        ),
    };
    async fn get(port: u16, path: &str) -> Option<String> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        if let Some(m) = get(port, "/metrics").await {
            // The five rows were relayed, and the lag gauges sampled.
            if m.contains("outbox_handled_total{queue=\"metrics.orders\"} 5")
                && m.contains("outbox_pending_rows")
                && m.contains("outbox_kafka_queue_depth")
            {
                break m;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no metrics of the 5 relayed rows within 60 s: {:?}\nthe relay's log:\n{}",
            get(port, "/metrics").await,
            tail(&logs)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        metrics.starts_with("HTTP/1.1 200") || metrics.starts_with("HTTP/1.0 200"),
        "{metrics}"
    );
    let health = get(port, "/healthz").await.unwrap();
    assert!(health.contains(" 200 "), "{health}");
    let ready = get(port, "/readyz").await.unwrap();
    assert!(
        ready.contains(" 200 "),
        "database and Kafka reachable: {ready}"
    );
    child.kill().await.unwrap();
    db.drop_db().await;
}

/// The port of the relay's "serving /metrics" JSON log line.
fn serving_port(line: &str) -> Option<u16> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    if !fields
        .get("message")?
        .as_str()?
        .starts_with("serving /metrics")
    {
        return None;
    }
    let addr: std::net::SocketAddr = fields.get("addr")?.as_str()?.parse().ok()?;
    Some(addr.port())
}

#[test]
fn a_bad_metrics_addr_exits_2_naming_the_variable() {
    let out = relay(&[("METRICS_ADDR", "localhost")], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("METRICS_ADDR: \"localhost\" is not a socket address"),
        "{}",
        stderr(&out)
    );
}

/// With the database unreachable, the relay says why at once (not a pool
/// timeout 30 s later), keeps retrying with a short backoff, and SIGTERM
/// meanwhile stops it with status 0.
#[test]
fn an_unreachable_database_is_reported_at_once_and_sigterm_exits_0() {
    let mut relay = Running::start(&[
        (
            "DATABASE_URL",
            "postgres://outbox:outbox@127.0.0.1:1/outbox",
        ),
        ("KAFKA_BROKERS", &kafka_brokers()),
        ("METRICS_ADDR", "off"),
    ]);
    let refused = |log: &str| log.to_lowercase().matches("connection refused").count();
    assert!(
        relay.wait_for_log(Duration::from_secs(5), |log| refused(log) >= 2),
        "no two \"connection refused\" lines within 5 s; the relay's log:\n{}",
        relay.log()
    );
    let status = relay.terminate(Duration::from_secs(5));
    let log = relay.log();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "SIGTERM while waiting for the database; the relay's log:\n{log}"
    );
    assert!(!log.contains("pool timed out"), "{log}");
}

/// `url` with its user-info replaced by `userinfo` (`user` or `user:password`).
fn with_userinfo(url: &str, userinfo: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let host = match url[start..end].rfind('@') {
        Some(at) => &url[start + at + 1..end],
        None => &url[start..end],
    };
    format!("{}{userinfo}@{host}{}", &url[..start], &url[end..])
}

/// Neither a password holding '@' nor a `password` / `sslpassword` query
/// parameter reaches the relay's log: not in the line naming the database it
/// cannot reach, nor in the line naming the one it connected to, nor in an
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_url_secrets_never_reach_the_log() {
    // Unreachable, so the log names the database in its retry warnings.
    let mut unreachable = Running::start(&[
        (
            "DATABASE_URL",
            "postgres://outbox:p%40ss@word-s3cret@127.0.0.1:1/outbox?sslmode=disable\
             &password=query-s3cret&sslpassword=ssl-s3cret",
        ),
        ("KAFKA_BROKERS", &kafka_brokers()),
        ("METRICS_ADDR", "off"),
    ]);
    assert!(
        unreachable.wait_for_log(Duration::from_secs(10), |log| log.contains("127.0.0.1:1")),
        "no line names the database; the relay's log:\n{}",
        unreachable.log()
    );
    unreachable.terminate(Duration::from_secs(10));
    let log = unreachable.log();
    for secret in ["s3cret", "p%40ss", "p@ss", "word-"] {
        assert!(!log.contains(secret), "{secret:?} leaked:\n{log}");
    }
    assert!(log.contains("password=***"), "{log}");

    // Reachable, the password given only as a query parameter: the relay
    // connects, logs so, then stops for want of an outbox table (exit 1).
    let db = TestDb::new().await;
    let url = format!(
        "{}?password={}&sslpassword=ssl-s3cret",
        with_userinfo(&db.url, &current_user(&db.url)),
        current_password(&db.url)
    );
    let vars = [
        ("DATABASE_URL", url),
        ("KAFKA_BROKERS", kafka_brokers()),
        ("METRICS_ADDR", "off".to_owned()),
    ];
    let out = tokio::task::spawn_blocking(move || {
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        relay(&vars, &[])
    })
    .await
    .unwrap();
    let log = stderr(&out);
    assert!(log.contains("connected to the database"), "{log}");
    let password = current_password(&db.url);
    assert!(
        !log.contains(&format!("password={password}")),
        "the password leaked:\n{log}"
    );
    assert!(
        !log.contains("ssl-s3cret"),
        "the ssl password leaked:\n{log}"
    );
    db.drop_db().await;
}

/// The user name of a `scheme://user:password@host/...` URL.
fn current_user(url: &str) -> String {
    userinfo(url)
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The password of a `scheme://user:password@host/...` URL.
fn current_password(url: &str) -> String {
    userinfo(url)
        .split_once(':')
        .map(|(_, p)| p.to_owned())
        .unwrap_or_default()
}

fn userinfo(url: &str) -> &str {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    url[start..end]
        .rfind('@')
        .map_or("", |at| &url[start..start + at])
}

/// Polls the dead-letter table until a row of `queue` is there, at most
/// `timeout`; its failure reason and last error.
async fn dead_letter(db: &TestDb, queue: &str, timeout: Duration) -> Option<(String, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        let row: Option<(String, Option<String>)> = sqlx::query_as(
            "select failure_reason, last_error from outbox_dlq where queue = $1 limit 1",
        )
        .bind(queue)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if let Some((reason, error)) = row {
            return Some((reason, error.unwrap_or_default()));
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A queue whose topic Kafka would refuse (an internal topic such as
/// `__consumer_offsets`) is dead-lettered at once, naming the topic, instead
/// of being retried for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_mapped_to_an_internal_topic_is_dead_lettered_at_once() {
    let db = TestDb::new().await;
    outbox::migrate(&db.pool, &outbox::Tables::default())
        .await
        .unwrap();
    outbox::Message::json("__consumer_offsets", &1)
        .unwrap()
        .publish(&db.pool)
        .await
        .unwrap();
    let mut relay = Running::start(&[
        ("DATABASE_URL", &db.url),
        ("KAFKA_BROKERS", &kafka_brokers()),
        ("METRICS_ADDR", "off"),
    ]);
    let dead = dead_letter(&db, "__consumer_offsets", Duration::from_secs(15)).await;
    relay.terminate(Duration::from_secs(10));
    let (reason, error) = dead.unwrap_or_else(|| {
        panic!(
            "not dead-lettered within 15 s; the relay's log:\n{}",
            relay.log()
        )
    });
    assert!(
        error.contains("\"__consumer_offsets\""),
        "{reason}: {error}"
    );
    assert!(error.contains("internal"), "{reason}: {error}");
    db.drop_db().await;
}

/// The Kafka sink itself (as `#[kafka::publisher]` uses it) refuses an
/// internal topic for good, at once, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_refuses_an_internal_topic_for_good() {
    use outbox::Sink;
    let broker =
        outbox_kafka::Broker::new(outbox_kafka::BrokerConfig::new(&kafka_brokers())).unwrap();
    let started = Instant::now();
    let results = broker
        .send(vec![outbox::Outgoing {
            sink: "kafka".into(),
            topic: "__transaction_state".into(),
            key: None,
            payload: b"1".to_vec(),
            headers: vec![],
        }])
        .await;
    let e = results[0].clone().unwrap_err();
    assert!(e.permanent, "{e}");
    assert!(e.message.contains("\"__transaction_state\""), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5), "{e}");
}

/// A message over the size limit because of a 3 MB header is dead-lettered
/// with its real size (payload, key and headers) and the limit, not the size
/// of its payload alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_large_for_its_headers_is_dead_lettered_with_its_real_size() {
    let db = TestDb::new().await;
    let topic = unique_topic("relay-big-header");
    create_topic(&topic, 1).await;
    outbox::migrate(&db.pool, &outbox::Tables::default())
        .await
        .unwrap();
    // Written by another producer: `publish` refuses headers over 64 KiB.
    sqlx::query(
        "insert into outbox (queue, payload, partition_key, headers) \
         values ('big.header', '1', 'k', jsonb_build_object('big', repeat('x', 3000000)))",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let map = format!("big.header:{topic}");
    let mut relay = Running::start(&[
        ("DATABASE_URL", &db.url),
        ("KAFKA_BROKERS", &kafka_brokers()),
        ("TOPIC_MAP", &map),
        ("METRICS_ADDR", "off"),
    ]);
    let dead = dead_letter(&db, "big.header", Duration::from_secs(30)).await;
    relay.terminate(Duration::from_secs(10));
    let (reason, error) = dead.unwrap_or_else(|| {
        panic!(
            "not dead-lettered within 30 s; the relay's log:\n{}",
            relay.log()
        )
    });
    let numbers: Vec<u64> = error
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        numbers.iter().any(|n| (3_000_000..3_100_000).contains(n)),
        "the real size is missing: {reason}: {error}"
    );
    assert!(
        numbers.contains(&1_000_000),
        "the limit is missing: {reason}: {error}"
    );
    assert!(error.contains("header"), "{reason}: {error}");
    db.drop_db().await;
}

/// A misspelled librdkafka key is named (with the key meant) and refused with
/// status 2, and no property's value is echoed: neither the secret of the
/// misspelled key nor a bad value of another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misspelled_property_is_named_without_its_value() {
    // A database of its own: were the setting accepted, the relay would find
    // no outbox table there and stop, rather than relay someone's rows.
    let test_db = TestDb::new().await;
    let db = test_db.url.clone();
    let brokers = kafka_brokers();
    let run = |vars: Vec<(&'static str, String)>| {
        tokio::task::spawn_blocking(move || {
            let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            relay(&vars, &[])
        })
    };
    let out = run(vec![
        ("DATABASE_URL", db.clone()),
        ("KAFKA_BROKERS", brokers.clone()),
        ("METRICS_ADDR", "off".into()),
        ("KAFKA_PROP_SASL_PASWORD", "hunter2-typo-s3cret".into()),
    ])
    .await
    .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("KAFKA_PROP_SASL_PASWORD"), "{err}");
    assert!(err.contains("\"sasl.pasword\""), "{err}");
    assert!(err.contains("\"sasl.password\""), "no suggestion: {err}");
    assert!(!err.contains("hunter2"), "the value leaked: {err}");

    let out = run(vec![
        ("DATABASE_URL", db),
        ("KAFKA_BROKERS", brokers),
        ("METRICS_ADDR", "off".into()),
        ("KAFKA_PROP_SOCKET_TIMEOUT_MS", "not-a-number-s3cret".into()),
    ])
    .await
    .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("KAFKA_PROP_SOCKET_TIMEOUT_MS"), "{err}");
    assert!(err.contains("\"socket.timeout.ms\""), "{err}");
    assert!(
        !err.contains("not-a-number-s3cret"),
        "the value leaked: {err}"
    );
    test_db.drop_db().await;
}
