//! The `outbox` command line against a real PostgreSQL, through
//! `outbox::cli::run` (the binary's `main` is a thin wrapper around it).
//! Every test gets a fresh database.

mod common;

use common::{count, TestDb};
use outbox::claim::Claimer;
use outbox::cli::{run, Console, Exit};
use outbox::{Message, Tables};
use sqlx::PgPool;
use std::io::Cursor;
use std::time::Duration;

/// What one run printed and how it ended.
#[derive(Debug)]
struct Ran {
    exit: Exit,
    out: String,
    err: String,
}

/// Runs `outbox --database-url <db> <args>` with no terminal attached.
async fn cli(db: &TestDb, args: &[&str]) -> Ran {
    run_with(&db.url, args, None).await
}

/// Runs it with a person at a terminal typing `answer`.
async fn cli_answering(db: &TestDb, args: &[&str], answer: &str) -> Ran {
    run_with(&db.url, args, Some(answer)).await
}

async fn run_with(url: &str, args: &[&str], answer: Option<&str>) -> Ran {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut input = Cursor::new(answer.unwrap_or("").as_bytes().to_vec());
    let mut console = Console {
        out: &mut out,
        err: &mut err,
        input: match answer {
            Some(_) => Some(&mut input),
            None => None,
        },
    };
    let mut argv = vec!["outbox", "--database-url", url];
    argv.extend_from_slice(args);
    let exit = run(argv, &mut console).await;
    Ran {
        exit,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

#[track_caller]
fn ok(r: &Ran) {
    assert_eq!(r.exit, Exit::Ok, "out:\n{}\nerr:\n{}", r.out, r.err);
}

async fn migrated() -> TestDb {
    let db = TestDb::new().await;
    outbox::migrate(&db.pool, &Tables::default()).await.unwrap();
    db
}

/// A dead letter of `queue` that failed `ago` before now.
async fn dead_letter(pool: &PgPool, queue: &str, ago: Duration, error: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox_dlq (original_id, queue, payload, headers, partition_key, attempts, \
             deliveries, created_at, failed_at, failure_reason, last_error) \
         VALUES (1000 + (SELECT count(*) FROM outbox_dlq), $1, convert_to('{\"n\":1}', 'UTF8'), \
             '{\"source\":\"test\"}', 'k1', 3, 3, now() - $2 * interval '1 second' - interval '1 minute', \
             now() - $2 * interval '1 second', 'retries_exhausted', $3) RETURNING id",
    )
    .bind(queue)
    .bind(ago.as_secs_f64())
    .bind(error)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn parked_row(pool: &PgPool, queue: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (queue, payload, attempts, parked_at, failure_reason, last_error) \
         VALUES ($1, convert_to('{}', 'UTF8'), 1, now(), 'rejected', 'bad order') RETURNING id",
    )
    .bind(queue)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn migrate_creates_the_tables_and_is_idempotent() {
    let db = TestDb::new().await;
    let before = cli(&db, &["validate"]).await;
    assert_eq!(before.exit, Exit::Problems, "{before:?}");
    assert!(
        before.out.contains("run `outbox migrate`"),
        "{}",
        before.out
    );

    let r = cli(&db, &["migrate"]).await;
    ok(&r);
    assert!(
        r.out
            .contains("migrated: outbox outbox at v6, dead letters outbox_dlq at v1"),
        "{}",
        r.out
    );
    for t in [
        "outbox",
        "outbox_dlq",
        "outbox_listeners",
        "outbox_migrations",
    ] {
        let n = count(
            &db.pool,
            &format!("SELECT count(*) FROM pg_tables WHERE tablename = '{t}'"),
        )
        .await;
        assert_eq!(n, 1, "table {t}");
    }
    ok(&cli(&db, &["migrate"]).await);

    // Other table names, from the options.
    let r = cli(
        &db,
        &[
            "--table",
            "app.events",
            "--dlq-table",
            "app.events_dlq",
            "migrate",
        ],
    )
    .await;
    assert_eq!(r.exit, Exit::Failed, "{r:?}"); // schema app does not exist yet
    sqlx::query("CREATE SCHEMA app")
        .execute(&db.pool)
        .await
        .unwrap();
    let r = cli(
        &db,
        &[
            "--table",
            "app.events",
            "--dlq-table",
            "app.events_dlq",
            "migrate",
        ],
    )
    .await;
    ok(&r);
    let r = cli(
        &db,
        &[
            "validate",
            "--table",
            "app.events",
            "--dlq-table",
            "app.events_dlq",
        ],
    )
    .await;
    ok(&r);
    assert!(r.out.contains("app.events_listeners"), "{}", r.out);
    db.drop_db().await;
}

#[tokio::test]
async fn status_counts_rows_per_queue() {
    let db = migrated().await;
    let r = cli(&db, &["status"]).await;
    ok(&r);
    assert!(r.out.contains("empty"), "{}", r.out);

    for i in 0..3 {
        outbox::publish(&db.pool, "orders", &i).await.unwrap();
    }
    Message::json("payments", &1)
        .unwrap()
        .activate_in(Duration::from_secs(3600))
        .publish(&db.pool)
        .await
        .unwrap();
    parked_row(&db.pool, "orders").await;
    dead_letter(&db.pool, "orders", Duration::ZERO, "boom").await;
    dead_letter(&db.pool, "orders", Duration::ZERO, "boom").await;
    dead_letter(&db.pool, "refunds", Duration::ZERO, "boom").await;
    // One orders row in flight.
    let claimer = Claimer::new(db.pool.clone(), Tables::default(), vec!["orders".into()])
        .unwrap()
        .with_batch_size(1);
    assert_eq!(claimer.claim().await.unwrap().rows.len(), 1);

    let r = cli(&db, &["status", "--json"]).await;
    ok(&r);
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    let q = |name: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|q| q["queue"] == name)
            .unwrap_or_else(|| panic!("no {name} in {v}"))
            .clone()
    };
    let orders = q("orders");
    assert_eq!(orders["pending"], 2);
    assert_eq!(orders["in_flight"], 1);
    assert_eq!(orders["parked"], 1);
    assert_eq!(orders["dead_letters"], 2);
    assert!(orders["oldest_pending_s"].as_f64().unwrap() >= 0.0);
    assert_eq!(q("payments")["pending"], 1);
    let refunds = q("refunds");
    assert_eq!(
        (refunds["pending"].clone(), refunds["dead_letters"].clone()),
        (0.into(), 1.into())
    );

    let r = cli(&db, &["status"]).await;
    ok(&r);
    let lines: Vec<&str> = r.out.lines().collect();
    assert!(
        lines[0].starts_with("QUEUE") && lines[0].contains("DEAD LETTERS"),
        "{}",
        r.out
    );
    let orders_line: Vec<&str> = lines
        .iter()
        .find(|l| l.starts_with("orders"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(orders_line[..4], ["orders", "2", "1", "1"], "{}", r.out);
    assert_eq!(orders_line[5], "2", "{}", r.out);
    let refunds_line = lines.iter().find(|l| l.starts_with("refunds")).unwrap();
    assert!(
        refunds_line.contains(" - "),
        "no lag without rows: {refunds_line}"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn status_without_tables_says_to_migrate() {
    let db = TestDb::new().await;
    let r = cli(&db, &["status"]).await;
    assert_eq!(r.exit, Exit::Failed, "{r:?}");
    assert!(
        r.err.contains("does not exist: run `outbox migrate`"),
        "{}",
        r.err
    );
    db.drop_db().await;
}

#[tokio::test]
async fn dlq_list_and_show_with_filters() {
    let db = migrated().await;
    let old = dead_letter(&db.pool, "orders", Duration::from_secs(7200), "old failure").await;
    let a = dead_letter(&db.pool, "orders", Duration::ZERO, "connection refused").await;
    let b = dead_letter(&db.pool, "payments", Duration::ZERO, "bad card").await;
    let c = dead_letter(&db.pool, "orders", Duration::ZERO, "line one\nline two").await;

    let ids = |r: &Ran| -> Vec<i64> {
        let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_i64().unwrap())
            .collect()
    };
    let r = cli(&db, &["dlq", "list", "--json"]).await;
    ok(&r);
    assert_eq!(ids(&r), [old, a, b, c]);
    let r = cli(&db, &["dlq", "list", "--queue", "orders", "--json"]).await;
    assert_eq!(ids(&r), [old, a, c]);
    let r = cli(&db, &["dlq", "list", "--since", "1h", "--json"]).await;
    assert_eq!(ids(&r), [a, b, c]);
    let (from, to) = (a.to_string(), b.to_string());
    let r = cli(
        &db,
        &["dlq", "list", "--id-from", &from, "--id-to", &to, "--json"],
    )
    .await;
    assert_eq!(ids(&r), [a, b]);
    let r = cli(&db, &["dlq", "list", "--limit", "2", "--json"]).await;
    assert_eq!(ids(&r), [old, a]);
    let r = cli(&db, &["dlq", "list", "--queue", "nothing-here"]).await;
    ok(&r);
    assert!(r.out.contains("no dead letters match"), "{}", r.out);

    let r = cli(&db, &["dlq", "list"]).await;
    ok(&r);
    assert!(r.out.starts_with("ID"), "{}", r.out);
    assert!(r.out.contains("retries_exhausted"), "{}", r.out);
    assert!(
        r.out.contains("line one line two"),
        "one line per row: {}",
        r.out
    );
    assert_eq!(r.out.lines().count(), 5, "{}", r.out);

    let r = cli(&db, &["dlq", "show", &b.to_string()]).await;
    ok(&r);
    for want in [
        "payments",
        "bad card",
        r#"{"n":1}"#,
        r#"{"source":"test"}"#,
        "k1",
    ] {
        assert!(r.out.contains(want), "{want} missing in:\n{}", r.out);
    }
    let r = cli(&db, &["dlq", "show", &b.to_string(), "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(v["payload"], r#"{"n":1}"#);
    assert_eq!(v["headers"]["source"], "test");
    let r = cli(&db, &["dlq", "show", "999999"]).await;
    assert_eq!(r.exit, Exit::Failed, "{r:?}");
    assert!(r.err.contains("no dead letter with id 999999"), "{}", r.err);

    // Bad input is a usage error that says what is accepted.
    for args in [
        &["dlq", "list", "--since", "yesterday"][..],
        &["dlq", "list", "--limit", "0"],
        &["dlq", "list", "--id-from", "x"],
        &["dlq", "frobnicate"],
    ] {
        let r = cli(&db, args).await;
        assert_eq!(r.exit, Exit::Usage, "{args:?}: {r:?}");
        assert!(!r.err.is_empty());
    }
    let r = cli(&db, &["dlq", "list", "--id-from", "5", "--id-to", "2"]).await;
    assert_eq!(r.exit, Exit::Usage, "{r:?}");
    assert!(r.err.contains("accepted"), "{}", r.err);
    db.drop_db().await;
}

#[tokio::test]
async fn dlq_replay_and_purge_need_confirmation() {
    let db = migrated().await;
    let a = dead_letter(&db.pool, "orders", Duration::ZERO, "e").await;
    let b = dead_letter(&db.pool, "orders", Duration::ZERO, "e").await;
    let c = dead_letter(&db.pool, "payments", Duration::ZERO, "e").await;
    let dlq = |pool: PgPool| async move { count(&pool, "SELECT count(*) FROM outbox_dlq").await };
    let outbox = |pool: PgPool| async move { count(&pool, "SELECT count(*) FROM outbox").await };

    // Several rows, no terminal, no --yes: refused, nothing changed.
    let r = cli(&db, &["dlq", "replay", "--queue", "orders"]).await;
    assert_eq!(r.exit, Exit::Usage, "{r:?}");
    assert!(r.err.contains("--yes"), "{}", r.err);
    assert_eq!(dlq(db.pool.clone()).await, 3);

    // A person says no: nothing changed.
    let r = cli_answering(&db, &["dlq", "replay", "--queue", "orders"], "n\n").await;
    assert_eq!(r.exit, Exit::Failed, "{r:?}");
    assert!(r.err.contains("replay 2 dead letters"), "{}", r.err);
    assert_eq!(dlq(db.pool.clone()).await, 3);

    // One row needs no confirmation.
    let (id, s) = (c.to_string(), c.to_string());
    let r = cli(&db, &["dlq", "replay", "--id-from", &id, "--id-to", &s]).await;
    ok(&r);
    assert!(r.out.contains("replayed 1 dead letters"), "{}", r.out);
    let replayed: (String, Vec<u8>) = sqlx::query_as("SELECT queue, payload FROM outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(replayed, ("payments".into(), br#"{"n":1}"#.to_vec()));

    let r = cli(&db, &["dlq", "replay", "--queue", "orders", "--yes"]).await;
    ok(&r);
    assert!(r.out.contains("replayed 2 dead letters"), "{}", r.out);
    assert_eq!(
        (dlq(db.pool.clone()).await, outbox(db.pool.clone()).await),
        (0, 3)
    );
    let _ = (a, b);

    // Purge: always asks.
    for q in ["orders", "orders", "payments"] {
        dead_letter(&db.pool, q, Duration::ZERO, "e").await;
    }
    let r = cli(&db, &["dlq", "purge", "--queue", "payments"]).await;
    assert_eq!(r.exit, Exit::Usage, "{r:?}");
    assert!(
        r.err.contains("refusing to delete 1 dead letters"),
        "{}",
        r.err
    );
    let r = cli_answering(&db, &["dlq", "purge", "--queue", "payments"], "yes\n").await;
    ok(&r);
    assert!(r.out.contains("purged 1 dead letters"), "{}", r.out);
    assert_eq!(dlq(db.pool.clone()).await, 2);
    let r = cli(&db, &["dlq", "purge", "--since", "1h", "--yes"]).await;
    ok(&r);
    assert_eq!(dlq(db.pool.clone()).await, 0);
    let r = cli(&db, &["dlq", "purge", "--yes"]).await;
    ok(&r);
    assert!(r.out.contains("nothing purged"), "{}", r.out);
    db.drop_db().await;
}

#[tokio::test]
async fn parked_rows_list_and_replay() {
    let db = migrated().await;
    let a = parked_row(&db.pool, "orders").await;
    let b = parked_row(&db.pool, "orders").await;
    let c = parked_row(&db.pool, "payments").await;
    outbox::publish(&db.pool, "orders", &1).await.unwrap();

    let r = cli(&db, &["parked", "list", "--json"]).await;
    ok(&r);
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    let ids: Vec<i64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [a, b, c]);
    let r = cli(&db, &["parked", "list", "--queue", "payments"]).await;
    ok(&r);
    assert!(
        r.out.contains("bad order") && !r.out.contains("orders "),
        "{}",
        r.out
    );

    let parked = |pool: PgPool| async move {
        count(
            &pool,
            "SELECT count(*) FROM outbox WHERE parked_at IS NOT NULL",
        )
        .await
    };
    let r = cli(&db, &["parked", "replay", "--queue", "orders"]).await;
    assert_eq!(r.exit, Exit::Usage, "{r:?}");
    assert_eq!(parked(db.pool.clone()).await, 3);
    let r = cli(&db, &["parked", "replay", "--id", &b.to_string()]).await;
    ok(&r);
    assert!(r.out.contains("replayed 1 parked rows"), "{}", r.out);
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM outbox WHERE id = $1")
        .bind(b)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(attempts, 0, "a fresh retry budget");
    let r = cli(&db, &["parked", "replay", "--yes"]).await;
    ok(&r);
    assert_eq!(parked(db.pool.clone()).await, 0);
    let r = cli(&db, &["parked", "list"]).await;
    assert!(r.out.contains("no parked rows"), "{}", r.out);
    db.drop_db().await;
}

#[tokio::test]
async fn validate_finds_missing_objects_and_advises_on_vacuum() {
    let db = migrated().await;
    let r = cli(&db, &["validate"]).await;
    ok(&r);
    assert!(r.out.contains("schema OK"), "{}", r.out);
    assert!(
        r.out.contains(
            r#"ALTER TABLE "outbox" SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_cost_limit = 2000)"#
        ),
        "{}",
        r.out
    );

    sqlx::query(
        "ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_cost_limit = 2000)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let r = cli(&db, &["validate"]).await;
    ok(&r);
    assert!(!r.out.contains("advice"), "{}", r.out);
    assert!(r.out.contains("autovacuum tuned"), "{}", r.out);

    sqlx::query("DROP INDEX outbox_due_idx")
        .execute(&db.pool)
        .await
        .unwrap();
    let r = cli(&db, &["validate"]).await;
    assert_eq!(r.exit, Exit::Problems, "{r:?}");
    assert!(
        r.out.contains("index outbox_due_idx is missing"),
        "{}",
        r.out
    );
    assert!(r.out.contains("1 problem found"), "{}", r.out);
    assert!(
        r.out.contains("DELETE FROM outbox_migrations"),
        "how to repair: {}",
        r.out
    );

    // The repair the report gives works.
    sqlx::query("DELETE FROM outbox_migrations WHERE table_name = 'outbox' AND kind = 'outbox'")
        .execute(&db.pool)
        .await
        .unwrap();
    ok(&cli(&db, &["migrate"]).await);
    ok(&cli(&db, &["validate"]).await);

    sqlx::query("DROP TABLE outbox_dlq")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE outbox DROP COLUMN last_error")
        .execute(&db.pool)
        .await
        .unwrap();
    let r = cli(&db, &["validate"]).await;
    assert_eq!(r.exit, Exit::Problems, "{r:?}");
    assert!(
        r.out.contains("table outbox_dlq does not exist"),
        "{}",
        r.out
    );
    assert!(
        r.out.contains("column last_error (text) is missing"),
        "{}",
        r.out
    );

    sqlx::query(
        "UPDATE outbox_migrations SET version = 99 WHERE kind = 'outbox' \
         AND version = (SELECT max(version) FROM outbox_migrations WHERE kind = 'outbox')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let r = cli(&db, &["validate"]).await;
    assert_eq!(r.exit, Exit::Problems, "{r:?}");
    assert!(r.out.contains("newer than this version"), "{}", r.out);
    db.drop_db().await;
}

#[tokio::test]
async fn bad_database_url_fails_without_showing_the_password() {
    let r = run_with(
        "postgres://outbox:sekrit-pw@127.0.0.1:1/outbox",
        &["status"],
        None,
    )
    .await;
    assert_eq!(r.exit, Exit::Failed, "{r:?}");
    assert!(
        r.err.contains("postgres://outbox:***@127.0.0.1:1/outbox"),
        "{}",
        r.err
    );
    assert!(
        !r.err.contains("sekrit") && !r.out.contains("sekrit"),
        "{r:?}"
    );

    let r = run_with("postgres://outbox:sekrit-pw@[::1/outbox", &["status"], None).await;
    assert_eq!(r.exit, Exit::Usage, "{r:?}");
    assert!(!r.err.contains("sekrit"), "{}", r.err);

    let r = run_with(
        &with_password(&common::database_url(), "wrong-sekrit"),
        &["status"],
        None,
    )
    .await;
    assert_eq!(r.exit, Exit::Failed, "{r:?}");
    assert!(!r.err.contains("wrong-sekrit"), "{}", r.err);

    // Usage errors and help.
    let r = run_with("postgres://x", &["no-such-command"], None).await;
    assert_eq!(r.exit, Exit::Usage, "{r:?}");
    let r = run_with("postgres://x", &["--help"], None).await;
    assert_eq!(r.exit, Exit::Ok, "{r:?}");
    assert!(r.out.contains("3  validate found problems"), "{}", r.out);
    assert!(!r.out.contains("outbox:outbox@"), "{}", r.out);
    assert_eq!(Exit::Problems.code(), 3);
}

fn with_password(url: &str, password: &str) -> String {
    let scheme_end = url.find("://").unwrap() + 3;
    let at = url.rfind('@').unwrap();
    let user = url[scheme_end..at].split(':').next().unwrap();
    format!("{}{user}:{password}{}", &url[..scheme_end], &url[at..])
}

#[tokio::test]
async fn slot_status_create_and_drop() {
    let db = migrated().await;
    // Slot names are shared by every database of the server.
    let slot = format!("cli_{}", db.name().trim_start_matches("outbox_test_"));

    let r = cli(&db, &["slot", "status", &slot]).await;
    ok(&r);
    assert!(r.out.contains("does not exist"), "{}", r.out);
    assert!(r.out.contains("creates it on its first start"), "{}", r.out);

    let r = cli(&db, &["slot", "create", &slot]).await;
    ok(&r);
    assert!(
        r.out
            .contains(&format!("created slot {slot} (publication outbox_relay)")),
        "{}",
        r.out
    );
    let r = cli(&db, &["slot", "create", &slot]).await;
    assert_eq!(r.exit, Exit::Failed, "a second create is refused");
    assert!(
        r.err.contains("a slot of that name exists already"),
        "{}",
        r.err
    );

    let r = cli(&db, &["slot", "status", &slot, "--json"]).await;
    ok(&r);
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(v["exists"], true);
    assert_eq!(v["recorded"], true);
    assert_eq!(v["plugin"], "pgoutput");
    assert_eq!(v["active_pid"], serde_json::Value::Null);

    let r = cli(&db, &["slot", "drop", &slot]).await;
    assert_eq!(r.exit, Exit::Usage, "no terminal, no --yes: refused");
    let r = cli(&db, &["slot", "drop", &slot, "--yes"]).await;
    ok(&r);
    assert!(r.out.contains("dropped"), "{}", r.out);
    let r = cli(&db, &["slot", "status", &slot]).await;
    assert!(r.out.contains("does not exist"), "{}", r.out);
    assert_eq!(
        count(&db.pool, "select count(*) from outbox_slots").await,
        0
    );

    let r = cli(&db, &["slot", "status", "Bad-Name"]).await;
    assert_eq!(r.exit, Exit::Usage);
    assert!(
        r.err.contains("accepted: 1 to 63 lower-case letters"),
        "{}",
        r.err
    );
    db.drop_db().await;
}
