//! Hostile configuration: every bad table name, queue name, URL, duration or
//! size is refused with a message that names the setting, and credentials never
//! appear in it. The relay's environment variables are tried on the real
//! `outbox-relay` binary (the cases of outbox-kafka/tests/relay_bin.rs are not
//! repeated); the rest in-process. Run with `--nocapture` to see every case and
//! its message.

mod common;

use common::TestDb;
use outbox::{
    App, ConstantRetry, Context, Envelope, ExponentialRetry, Message, Output, Subscriber, Tables,
};
use outbox_kafka::BrokerConfig;
use std::path::PathBuf;
use std::process::{Command, Output as ProcessOutput};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The `outbox-relay` binary of this build profile, built (once) if needed.
fn relay_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/hostile-<hash> -> target/<profile>
        let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
        let release = profile_dir.ends_with("release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "outbox-kafka", "--bin", "outbox-relay"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo build outbox-relay");
        assert!(status.success(), "cargo build outbox-relay failed");
        let bin = profile_dir.join("outbox-relay");
        assert!(bin.is_file(), "{} missing", bin.display());
        bin
    })
    .clone()
}

/// Runs the relay with a clean environment plus `vars`; it must refuse them.
fn relay(vars: &[(&str, &str)]) -> ProcessOutput {
    let mut cmd = Command::new(relay_bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // Unreachable on purpose: a setting that is not refused would make the
        // relay start, retry and hit the test's timeout instead.
        .env("RUST_LOG", "error");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().expect("run outbox-relay")
}

/// Asserts that `vars` make the relay exit 2 with every `expected` fragment in
/// its message and none of `secrets`; prints the case and the message.
fn refused(vars: &[(&str, &str)], expected: &[&str], secrets: &[&str]) {
    let out = relay(vars);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let case = vars
        .iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!(
        "case: {case}\n  => exit {:?}: {}",
        out.status.code(),
        err.trim()
    );
    assert_eq!(out.status.code(), Some(2), "{case}: {err}");
    for e in expected {
        assert!(err.contains(e), "{case}: expected {e:?} in {err:?}");
    }
    for s in secrets {
        assert!(!err.contains(s), "{case}: the secret {s:?} leaked: {err:?}");
    }
}

#[test]
fn relay_refuses_hostile_table_names() {
    let long = "t".repeat(64);
    let long49 = format!("app.{}", "t".repeat(49));
    let schema64 = format!("{}.outbox", "s".repeat(64));
    for (var, value, why) in [
        ("OUTBOX_TABLE", "out\"box", "character '\"'"),
        ("OUTBOX_TABLE", "outbox; DROP TABLE users", "character ';'"),
        ("OUTBOX_TABLE", "outbox--", "character '-'"),
        ("OUTBOX_TABLE", "ünïcode", "character 'ü'"),
        ("OUTBOX_TABLE", "表", "character '表'"),
        ("OUTBOX_TABLE", long.as_str(), "64 bytes"),
        ("OUTBOX_TABLE", schema64.as_str(), "schema name is 64 bytes"),
        ("OUTBOX_TABLE", "app.", "table name is empty"),
        ("OUTBOX_TABLE", "9lives", "starts with a digit"),
        ("DLQ_TABLE", "dead\"letters", "character '\"'"),
        ("DLQ_TABLE", long49.as_str(), "49 bytes"),
        ("DLQ_TABLE", "a.b.c", "character '.'"),
    ] {
        refused(
            &[(var, value)],
            &[&format!("{var}: invalid table name"), why, "accepted"],
            &[],
        );
    }
}

#[test]
fn relay_refuses_malformed_urls_without_printing_credentials() {
    // DATABASE_URL: sqlx cannot parse these; before the fix the relay retried
    // them forever as if the database were down.
    for (value, why) in [
        (
            "postgres://user:db-secret@127.0.0.1:notaport/db",
            "invalid port number",
        ),
        ("postgres://user:db-secret@[::1/db", "IPv6"),
        (
            "postgres://user:db-secret@127.0.0.1:5432/db?sslmode=bogus",
            "bogus",
        ),
        (
            "postgresql://user:db-secret@127.0.0.1:99999/db",
            "invalid port number",
        ),
        ("mysql://user:db-secret@h/db", "is not a PostgreSQL URL"),
        ("user:db-secret@127.0.0.1/db", "is not a PostgreSQL URL"),
    ] {
        refused(
            &[("DATABASE_URL", value)],
            &["DATABASE_URL: ", why, "accepted"],
            &["db-secret"],
        );
    }
    // PUBLISHER_URL (relay_bin.rs has the scheme and a non-numeric port).
    for (value, why) in [
        ("kafka://[::1", "unclosed '['"),
        ("kafka://user@k:9092", "credentials must be user:password"),
        ("kafka://:kafka-secret@k:9092", "empty user name"),
        ("kafka://k:65536", "from 1 to 65535"),
        ("kafka://k:0", "from 1 to 65535"),
        (
            "kafka://a:9092,user:kafka-secret@b:9092",
            "credentials are accepted only before the first server",
        ),
        (
            "kafka://user:kafka,secret@b:9092",
            "is not a number from 1 to 65535",
        ),
        ("kafka://user:kafka-secret@b:9092/path", "path or query"),
        ("kafka://user:kafka-secret@b:9092?x=1", "path or query"),
        ("kafka://k 1:9092", "missing or invalid host"),
        ("kafka://", "no bootstrap server"),
    ] {
        refused(
            &[("PUBLISHER_URL", value)],
            &["PUBLISHER_URL: ", why],
            &["kafka-secret"],
        );
    }
    refused(&[("KAFKA_BROKERS", "k:9092,:1")], &["KAFKA_BROKERS: "], &[]);
}

#[test]
fn relay_refuses_zero_negative_and_absurd_durations_and_sizes() {
    let cases: &[(&str, &str, &[&str])] = &[
        // Retry delays: the message names them as RETRY_* and by their
        // strategy names (initial, max_delay), not by the variable itself.
        (
            "RETRY_INITIAL_DELAY",
            "0ms",
            &["RETRY_*", "initial is zero"],
        ),
        ("RETRY_MAX_DELAY", "0s", &["RETRY_*", "max_delay is zero"]),
        (
            "RETRY_INITIAL_DELAY",
            "-1s",
            &["RETRY_INITIAL_DELAY: \"-1s\" is not a duration"],
        ),
        (
            "RETRY_INITIAL_DELAY",
            "1.5s",
            &["RETRY_INITIAL_DELAY: \"1.5s\" is not a duration"],
        ),
        (
            "RETRY_MAX_DELAY",
            "99999999h",
            &["RETRY_*", "max_delay is", "at most 365 days"],
        ),
        (
            "RETRY_MAX_DELAY",
            "99999999999999999999h",
            &["RETRY_MAX_DELAY: \"99999999999999999999h\" is not a duration"],
        ),
        (
            "RETRY_MAX_DELAY",
            "5 fortnights",
            &["RETRY_MAX_DELAY: \"5 fortnights\" is not a duration"],
        ),
        (
            "RETRY_MAX_ATTEMPTS",
            "0",
            &["RETRY_MAX_ATTEMPTS: 0 is out of range"],
        ),
        (
            "RETRY_MAX_ATTEMPTS",
            "1000001",
            &["RETRY_MAX_ATTEMPTS: 1000001 is out of range"],
        ),
        (
            "KAFKA_LINGER",
            "16m",
            &["KAFKA_LINGER: 16m is out of range (accepted: 0ms to 15m)"],
        ),
        (
            "KAFKA_LINGER",
            "-5ms",
            &["KAFKA_LINGER: \"-5ms\" is not a duration"],
        ),
        (
            "KAFKA_WRITE_TIMEOUT",
            "2h",
            &["KAFKA_WRITE_TIMEOUT: 2h is out of range (accepted: 1ms to 1h)"],
        ),
        (
            "KAFKA_BATCH_SIZE",
            "0",
            &["KAFKA_BATCH_SIZE: 0 is out of range"],
        ),
        (
            "KAFKA_BATCH_SIZE",
            "1000001",
            &["KAFKA_BATCH_SIZE: 1000001 is out of range"],
        ),
        (
            "KAFKA_TOPIC_PARTITIONS",
            "-5",
            &["KAFKA_TOPIC_PARTITIONS: -5 is out of range"],
        ),
        (
            "KAFKA_TOPIC_PARTITIONS",
            "100001",
            &["KAFKA_TOPIC_PARTITIONS: 100001 is out of range"],
        ),
        (
            "RELAY_BATCH_SIZE",
            "10001",
            &["RELAY_BATCH_SIZE: 10001 is out of range"],
        ),
        (
            "RELAY_BATCH_SIZE",
            "18446744073709551616",
            &["RELAY_BATCH_SIZE: \"18446744073709551616\" is not a number"],
        ),
        (
            "RELAY_CONCURRENCY",
            "0",
            &["RELAY_CONCURRENCY: 0 is out of range"],
        ),
        (
            "RELAY_CONCURRENCY",
            "-3",
            &["RELAY_CONCURRENCY: \"-3\" is not a number"],
        ),
        (
            "RELAY_WORKERS",
            "65",
            &["RELAY_WORKERS: 65 is out of range (accepted: a whole number from 1 to 64)"],
        ),
        (
            "RELAY_WORKERS",
            "0x10",
            &["RELAY_WORKERS: \"0x10\" is not a number"],
        ),
        (
            "RELAY_BATCH_BYTES",
            "1023",
            &["RELAY_BATCH_BYTES: 1023 is out of range (accepted: a whole number from 1024 to 1073741824)"],
        ),
        (
            "RELAY_MAX_DELIVERIES",
            "0",
            &["RELAY_MAX_DELIVERIES: 0 is out of range (accepted: a whole number from 1 to 1000)"],
        ),
    ];
    for (var, value, expected) in cases {
        refused(&[(var, value)], expected, &[]);
    }
    refused(
        &[("RETRY_INITIAL_DELAY", "10s"), ("RETRY_MAX_DELAY", "1s")],
        &["RETRY_*", "max_delay (1s) is shorter than initial (10s)"],
        &[],
    );
    refused(
        &[("KAFKA_LINGER", "30s"), ("KAFKA_WRITE_TIMEOUT", "10s")],
        &["KAFKA_LINGER: 30s is not shorter than the write timeout"],
        &[],
    );
}

#[test]
fn relay_refuses_bad_topic_settings_and_librdkafka_properties() {
    refused(
        &[("TOPIC_MAP", ":orders")],
        &["TOPIC_MAP: \":orders\" has an empty queue"],
        &[],
    );
    refused(
        &[("TOPIC_MAP", "orders:bad topic")],
        &["TOPIC_MAP: topic \"bad topic\": character ' ' is not allowed"],
        &[],
    );
    let long_topic = format!("orders:{}", "t".repeat(250));
    refused(
        &[("TOPIC_MAP", &long_topic)],
        &["TOPIC_MAP: ", "1 to 249 characters"],
        &[],
    );
    refused(
        &[("TOPIC_MAP", "a:t1,a:t2")],
        &["TOPIC_MAP: queue \"a\" is mapped twice"],
        &[],
    );
    refused(
        &[("TOPIC_PREFIX", "a/b")],
        &["TOPIC_PREFIX: character '/'"],
        &[],
    );
    // librdkafka refuses these when the settings are read: exit 2 (an
    // invalid setting), the variable named, no value printed.
    refused(
        &[("KAFKA_PROP_BOGUS_KEY", "1")],
        &[
            "KAFKA_PROP_BOGUS_KEY: ",
            "no such librdkafka property \"bogus.key\"",
        ],
        &[],
    );
    refused(
        &[("KAFKA_PROP_SASL_PASSWORDS", "kafka-secret")],
        &["KAFKA_PROP_SASL_PASSWORDS: ", "\"sasl.passwords\""],
        &["kafka-secret"],
    );
    refused(
        &[("KAFKA_PROP_SECURITY_PROTOCOL", "carrier-pigeon")],
        &[
            "KAFKA_PROP_SECURITY_PROTOCOL: ",
            "\"security.protocol\"",
            "the value is not shown",
        ],
        &["carrier-pigeon"],
    );
}

// ------------------------------------------------------------- in process

fn noop(
) -> impl Fn(Arc<Envelope>, Context) -> futures::future::Ready<Result<Output, outbox::HandlerError>>
       + Send
       + Sync
       + 'static {
    |_env, _ctx| futures::future::ready(Ok(Output::none()))
}

fn sub_error(sub: Subscriber) -> String {
    sub.validate().unwrap_err().to_string()
}

#[test]
fn subscriber_settings_name_what_is_wrong() {
    let base = || Subscriber::new("s", noop()).queue("q");
    let long_queue = "q".repeat(256);
    let wide_queue = "é".repeat(200); // 400 bytes, multi-byte: cut on a char boundary
    let cases: Vec<(&str, Subscriber, &str)> = vec![
        (
            "workers(0)",
            base().workers(0),
            "workers is 0, accepted: 1 to 64",
        ),
        (
            "workers(65)",
            base().workers(65),
            "workers is 65, accepted: 1 to 64",
        ),
        (
            "batch_size(10_001)",
            base().batch_size(10_001),
            "batch_size is 10001, accepted: 1 to 10000",
        ),
        (
            "concurrency(0)",
            base().concurrency(0),
            "concurrency is 0, accepted: 1 to 10000",
        ),
        (
            "max_deliveries(0)",
            base().max_deliveries(0),
            "max_deliveries is 0, accepted: 1 to 1000",
        ),
        (
            "max_batch_bytes(100)",
            base().max_batch_bytes(100),
            "max_batch_bytes is 100, accepted: 1024 (1 KiB) to 1073741824 (1 GiB)",
        ),
        (
            "concurrency(usize::MAX)",
            base().concurrency(usize::MAX),
            "concurrency is 18446744073709551615",
        ),
        (
            "lease_ttl(0)",
            base().lease_ttl(Duration::ZERO),
            "lease_ttl is 0ns, accepted: 1 s to 24 h",
        ),
        (
            "lease_ttl(25h)",
            base().lease_ttl(Duration::from_secs(90_000)),
            "lease_ttl is 90000s",
        ),
        (
            "lease_ttl(MAX)",
            base().lease_ttl(Duration::MAX),
            "lease_ttl is",
        ),
        (
            "poll_interval(0, 1s)",
            base().poll_interval(Duration::ZERO, Duration::from_secs(1)),
            "poll_interval is 0ns..1s, accepted: 0 < min <= max <= 1 h",
        ),
        (
            "poll_interval(2s, 1s)",
            base().poll_interval(Duration::from_secs(2), Duration::from_secs(1)),
            "poll_interval is 2s..1s",
        ),
        (
            "poll_interval(1ms, 2h)",
            base().poll_interval(Duration::from_millis(1), Duration::from_secs(7200)),
            "poll_interval is 1ms..7200s",
        ),
        (
            "queue(\"\")",
            Subscriber::new("s", noop()).queue(""),
            "queues: invalid queue name \"\": it is empty",
        ),
        (
            "queue(256 bytes)",
            Subscriber::new("s", noop()).queue(long_queue.as_str()),
            "it is 256 bytes",
        ),
        (
            "queue(400 bytes of é)",
            Subscriber::new("s", noop()).queue(wide_queue.as_str()),
            "it is 400 bytes",
        ),
        (
            "queue(\"a\\nb\")",
            Subscriber::new("s", noop()).queue("a\nb"),
            "control character",
        ),
        (
            "queue(\"a\\0b\")",
            Subscriber::new("s", noop()).queue("a\0b"),
            "control character",
        ),
        (
            "no queue",
            Subscriber::new("s", noop()),
            "queues: no queue given",
        ),
        (
            "dlq(quote)",
            base().dlq("dead\"letters"),
            "dlq: invalid table name",
        ),
        (
            "dlq(semicolon)",
            base().dlq("dlq; DROP TABLE x"),
            "character ';'",
        ),
        ("dlq(unicode)", base().dlq("tôt"), "character 'ô'"),
        ("dlq(64 bytes)", base().dlq("d".repeat(64)), "64 bytes"),
        (
            "publisher topic \"\"",
            base().publisher("kafka", ""),
            "1 to 249 characters",
        ),
        (
            "publisher topic 250",
            base().publisher("kafka", "t".repeat(250)),
            "1 to 249 characters",
        ),
        (
            "publisher topic space",
            base().publisher("kafka", "a topic"),
            "character ' ' is not allowed",
        ),
        (
            "retry initial 0",
            base().retry(ExponentialRetry::default().initial(Duration::ZERO)),
            "retry: initial is zero",
        ),
        (
            "retry max_attempts 0",
            base().retry(ExponentialRetry::default().max_attempts(0)),
            "retry: max_attempts is 0",
        ),
        (
            "retry ConstantRetry(MAX)",
            base().retry(ConstantRetry::new(Duration::MAX)),
            "at most 365 days",
        ),
        (
            "retry max_total_delay 0",
            base().retry(ExponentialRetry::default().max_total_delay(Duration::ZERO)),
            "retry: max_total_delay is zero",
        ),
    ];
    for (case, sub, expected) in cases {
        let err = sub_error(sub);
        eprintln!("case: {case}\n  => {err}");
        assert!(
            err.contains(expected),
            "{case}: expected {expected:?} in {err:?}"
        );
    }
}

#[test]
fn broker_config_from_code_names_the_setting() {
    let cases: Vec<(&str, BrokerConfig, &[&str], &str)> = vec![
        (
            "write_timeout(0)",
            BrokerConfig::default().write_timeout(Duration::ZERO),
            &["write_timeout", "0ms is out of range"],
            "",
        ),
        (
            "write_timeout(2h)",
            BrokerConfig::default().write_timeout(Duration::from_secs(7200)),
            &["write_timeout", "2h is out of range"],
            "",
        ),
        (
            "write_timeout(MAX)",
            BrokerConfig::default().write_timeout(Duration::MAX),
            &["write_timeout", "out of range"],
            "",
        ),
        (
            "linger(16m)",
            BrokerConfig::default().linger(Duration::from_secs(960)),
            &["linger", "16m is out of range"],
            "",
        ),
        (
            "linger(MAX)",
            BrokerConfig::default().linger(Duration::MAX),
            &["linger", "out of range"],
            "",
        ),
        (
            "batch_size(0)",
            BrokerConfig::default().batch_size(0),
            &["batch_size", "0 is out of range"],
            "",
        ),
        (
            "batch_size(MAX)",
            BrokerConfig::default().batch_size(usize::MAX),
            &["batch_size", "out of range"],
            "",
        ),
        (
            "topic_partitions(0)",
            BrokerConfig::default().topic_partitions(0),
            &["0 is out of range"],
            "",
        ),
        (
            "topic_partitions(i32::MIN)",
            BrokerConfig::default().topic_partitions(i32::MIN),
            &["out of range"],
            "",
        ),
        (
            "transactional(\"  \")",
            BrokerConfig::default().transactional("  "),
            &["transactional"],
            "",
        ),
        ("new(\"\")", BrokerConfig::new(""), &["servers: "], ""),
        (
            "new(\"kafka://u:code-secret@h:x\")",
            BrokerConfig::new("kafka://u:code-secret@h:x"),
            &["servers: "],
            "code-secret",
        ),
        ("new(\" , \")", BrokerConfig::new(" , "), &["servers: "], ""),
    ];
    for (case, config, expected, secret) in cases {
        let err = config.validate().unwrap_err().to_string();
        eprintln!("case: BrokerConfig::{case}\n  => {err}");
        for e in expected {
            assert!(err.contains(e), "{case}: expected {e:?} in {err:?}");
        }
        if !secret.is_empty() {
            assert!(!err.contains(secret), "{case}: secret leaked: {err}");
            assert!(
                !format!("{config:?}").contains(secret),
                "{case}: secret in Debug"
            );
        }
    }
}

/// Names at the limits are accepted and work in a real PostgreSQL: a 48-byte
/// table name (the longest whose derived index names fit 63 bytes) in a
/// 63-byte schema; a queue of exactly 255 bytes; bad queues refused on publish.
#[tokio::test]
async fn names_at_the_limits_work_and_bad_queues_are_refused_on_publish() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let schema = "s".repeat(63);
    let table = format!("{schema}.{}", "t".repeat(48));
    sqlx::query(&format!("create schema \"{schema}\""))
        .execute(pool)
        .await
        .unwrap();
    let tables = Tables::new(&table, Some(&format!("{schema}.{}", "d".repeat(48)))).unwrap();
    outbox::migrate(pool, &tables).await.unwrap();
    outbox::migrate(pool, &tables).await.unwrap();
    let ob = outbox::Outbox::new(tables.clone());
    let queue = "é".repeat(127) + "q"; // 255 bytes
    assert_eq!(queue.len(), 255);
    ob.publish(pool, &queue, &1).await.unwrap();

    let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = handled.clone();
    let handler = move |_env: Arc<Envelope>, _ctx: Context| {
        h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        futures::future::ready(Ok(Output::none()))
    };
    let running = App::manual(pool.clone())
        .tables(tables.clone())
        .register(
            Subscriber::new("limits", handler)
                .queue(queue.as_str())
                .dlq(format!("{schema}.{}", "d".repeat(48)))
                .poll_interval(Duration::from_millis(10), Duration::from_millis(50)),
        )
        .start()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while handled.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the 255-byte queue was not handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await;

    let wide = "é".repeat(128); // 256 bytes
    for (queue, why) in [
        (wide.as_str(), "256 bytes"),
        ("a\tb", "control character"),
        ("\u{7f}", "control character"),
    ] {
        let err = Message::json(queue, &1)
            .unwrap()
            .publish(pool)
            .await
            .unwrap_err()
            .to_string();
        eprintln!("case: publish to queue {queue:?}\n  => {err}");
        assert!(
            err.contains("invalid queue name") && err.contains(why),
            "{err}"
        );
    }
    db.drop_db().await;
}
