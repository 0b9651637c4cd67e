//! Throughput and latency benchmark of the outbox engine and the stand-alone
//! relay, beside the PostgreSQL ceiling measured in the same run. Prints
//! figures and appends JSON lines; asserts nothing about speed.
//!
//! ```text
//! cargo build --release -p outbox-kafka --bin outbox-relay
//! cargo run --release --example bench -- [--json out.jsonl] [--modes relay,handler,sql]
//!     [--batches 1,10,100,1000] [--rows 200000] [--workloads drain,steady-1000,steady-10000,produce]
//!     [--duration 20] [--steady-batch 500 (the relay's default)] [--workers 2] [--partitions 6] [--no-cap]
//!     [--fillfactor N (overrides the migrations' table setting)] [--smoke]
//!     [--observe-md out.md (with workload observe)]
//!     [--latency-dump lat.txt (steady workloads: every message's commit time and latency)]
//! ```
//!
//! * `relay`: the `outbox-relay` binary (next to this example in `target/release`)
//!   as a child process, configured by environment variables.
//! * `handler`: this program re-run as a child process (`--serve-handler`): a
//!   subscriber whose handler deserialises the JSON payload and returns it for the
//!   stacked Kafka publisher, as `#[kafka::publisher] #[outbox::subscriber]` does.
//! * `sql`: the PostgreSQL ceiling, a plain `DELETE ... WHERE id IN (SELECT ... FOR
//!   UPDATE SKIP LOCKED) RETURNING` loop in this process, no Kafka.
//! * `log`: the `outbox-relay` binary with `CAPTURE=log`; the messages are
//!   published in log mode (`pg_logical_emit_message`, no table row) after its
//!   slot was created, and a drain ends when the slot is confirmed up to the
//!   end of the load.
//! * `kafka`: the Kafka ceiling (drain only), a bare rdkafka `FutureProducer`
//!   in this process sending the same messages (payload, key, an `outbox-id`
//!   header) with the relay's producer settings, `--batch` of them in flight at
//!   a time; no database.
//!
//! * workload `observe` (relay only, no timing): a backlog of `--rows` rows and
//!   one 2 MB row that Kafka refuses, drained by the relay at batch 100 while
//!   `outbox status` (the `outbox` binary next to this example) and the
//!   relay's `/metrics` are sampled every half second; then the refused row is
//!   listed and replayed from the dead-letter table with `outbox dlq`. Prints
//!   (and with `--observe-md` writes) what they showed, and fails when the
//!   backlog was not seen draining or the replay did not put the row back.
//! * workload `produce` (no Kafka, `--modes` ignored): what publishing costs
//!   the producer's transaction. 8 clients commit one business transaction
//!   after another for `--duration`: the business `INSERT` alone, with a
//!   `publish` in table mode, and with a `publish` in log mode (its slot
//!   present). Prints transactions per second and their latency, and the
//!   outbox table's inserts, deletes and dead tuples meanwhile.
//!
//! Both child modes are measured from `/proc/<pid>`: CPU seconds (utime+stime)
//! and peak RSS (VmHWM). Every measurement uses truncated tables in a scratch
//! database `outbox_bench` next to `DATABASE_URL`'s, and a fresh topic.

use outbox::{App, Context, Envelope, HandlerError, Message, Outbox, Output, Subscriber, Tables};
use outbox_kafka::{Broker, BrokerConfig};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgPool};
use std::collections::HashMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const QUEUE: &str = "bench";
/// The replication slot of mode `log`.
const SLOT: &str = "outbox_bench";
const KEYS: usize = 100;

#[derive(Debug, Clone)]
struct Opts {
    json: Option<String>,
    modes: Vec<String>,
    batches: Vec<usize>,
    rows: usize,
    workloads: Vec<String>,
    duration: Duration,
    steady_batch: usize,
    workers: usize,
    partitions: i32,
    cap: bool,
    fillfactor: Option<usize>,
    observe_md: Option<String>,
    latency_dump: Option<String>,
    database_url: String,
    brokers: String,
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        json: None,
        modes: list("sql,relay,handler"),
        batches: vec![1, 10, 100, 1000],
        rows: 200_000,
        workloads: list("drain,steady-1000,steady-10000"),
        duration: Duration::from_secs(20),
        steady_batch: outbox_kafka::relay::DEFAULT_RELAY_BATCH_SIZE,
        workers: 2,
        partitions: 6,
        cap: true,
        fillfactor: None,
        observe_md: None,
        latency_dump: None,
        database_url: std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://outbox:outbox@127.0.0.1:5432/outbox".into()),
        brokers: std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into()),
    };
    let mut args = std::env::args().skip(1);
    let num = |name: &str, v: Option<String>| -> Result<usize, String> {
        v.as_deref()
            .unwrap_or("")
            .replace('_', "")
            .parse()
            .map_err(|_| format!("{name} needs a whole number"))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => o.json = args.next(),
            "--modes" => o.modes = list(&args.next().unwrap_or_default()),
            "--batches" => {
                o.batches = list(&args.next().unwrap_or_default())
                    .iter()
                    .map(|b| b.parse().map_err(|_| format!("bad batch size {b:?}")))
                    .collect::<Result<_, _>>()?
            }
            "--rows" => o.rows = num("--rows", args.next())?,
            "--workloads" => o.workloads = list(&args.next().unwrap_or_default()),
            "--duration" => {
                o.duration = Duration::from_secs(num("--duration", args.next())? as u64)
            }
            "--steady-batch" => o.steady_batch = num("--steady-batch", args.next())?,
            "--workers" => o.workers = num("--workers", args.next())?,
            "--partitions" => o.partitions = num("--partitions", args.next())? as i32,
            "--no-cap" => o.cap = false,
            "--fillfactor" => o.fillfactor = Some(num("--fillfactor", args.next())?),
            "--observe-md" => o.observe_md = args.next(),
            "--latency-dump" => o.latency_dump = args.next(),
            "--smoke" => {
                o.rows = 2_000;
                o.batches = vec![100];
                o.workloads = list("drain,steady-1000,observe,produce");
                o.duration = Duration::from_secs(2);
            }
            "-h" | "--help" => {
                println!(
                    "{}",
                    include_str!("bench.rs")
                        .lines()
                        .take(13)
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    for m in &o.modes {
        if !["relay", "handler", "sql", "log", "kafka"].contains(&m.as_str()) {
            return Err(format!(
                "unknown mode {m:?} (accepted: relay, handler, sql, log, kafka)"
            ));
        }
    }
    for w in &o.workloads {
        if !["drain", "steady-1000", "steady-10000", "observe", "produce"].contains(&w.as_str()) {
            return Err(format!(
                "unknown workload {w:?} (accepted: drain, steady-1000, steady-10000, observe, produce)"
            ));
        }
    }
    if o.batches.iter().any(|b| *b == 0 || *b > 10_000) || o.steady_batch == 0 {
        return Err("batch sizes are 1 to 10000".into());
    }
    Ok(o)
}

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_at(url.find('?').unwrap_or(url.len()));
    let cut = base.rfind('/').unwrap_or(base.len());
    format!("{}/{db}{query}", &base[..cut])
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// About 200 bytes of JSON.
fn payload(n: usize, ts_us: u64) -> serde_json::Value {
    serde_json::json!({
        "order_id": n,
        "customer": format!("c-{:06}", n % 100_000),
        "items": [{"sku": format!("sku-{:05}", n % 10_000), "qty": 1 + n % 5, "price_cents": 1999}],
        "ts_us": ts_us,
        "note": "x".repeat(64),
    })
}

fn message(n: usize, ts_us: u64) -> Message {
    Message::json(QUEUE, &payload(n, ts_us))
        .expect("json")
        .key(format!("key-{}", n % KEYS))
}

/// Empties the tables; `VACUUM` so that every run starts from the same heap.
async fn reset(pool: &PgPool) {
    pool.execute("TRUNCATE outbox, outbox_dlq, outbox_listeners RESTART IDENTITY")
        .await
        .expect("truncate");
    outbox::stream::drop_slot(pool, SLOT)
        .await
        .expect("drop the bench slot");
}

/// Mode `log` publishes in log mode, into a slot that exists before the
/// first message.
fn outbox_for(pool_mode: &str) -> Outbox {
    if pool_mode == "log" {
        Outbox::default().capture(outbox::Capture::Log)
    } else {
        Outbox::default()
    }
}

async fn create_slot(pool: &PgPool) {
    outbox::stream::create_slot(pool, &Tables::default(), SLOT, "outbox_relay")
        .await
        .expect("create the bench slot");
}

/// Whether the slot is confirmed up to `lsn`.
async fn confirmed_to(pool: &PgPool, lsn: &str) -> bool {
    sqlx::query_scalar::<_, bool>(
        "SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
    )
    .bind(lsn)
    .bind(SLOT)
    .fetch_optional(pool)
    .await
    .ok()
    .flatten()
    .unwrap_or(false)
}

async fn wal_lsn(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await
        .expect("pg_current_wal_lsn")
}

async fn load(pool: &PgPool, rows: usize) {
    load_as(pool, rows, "table").await
}

async fn load_as(pool: &PgPool, rows: usize, mode: &str) {
    let ob = outbox_for(mode);
    let mut i = 0;
    while i < rows {
        let n = (rows - i).min(5_000);
        let msgs = (i..i + n).map(|k| message(k, 0)).collect();
        ob.publish_batch(pool, msgs).await.expect("load");
        i += n;
    }
    pool.execute("VACUUM ANALYZE outbox").await.expect("vacuum");
}

/// The outbox table's insert and delete counts and dead tuples
/// (`pg_stat_user_tables`).
async fn table_stats(pool: &PgPool) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT n_tup_ins, n_tup_del, n_dead_tup FROM pg_stat_user_tables WHERE relname = 'outbox'",
    )
    .fetch_one(pool)
    .await
    .unwrap_or((-1, -1, -1))
}

/// Clients of workload `produce`, as in the issue's pgbench runs.
const PRODUCERS: usize = 8;

/// Workload `produce`: what publishing costs the producer. [`PRODUCERS`]
/// clients each commit one business transaction after another for
/// `--duration`: an `INSERT` into a business table alone (`insert`), with a
/// `publish` in table mode (`table`: a row), or in log mode (`log`: a WAL
/// record, into a slot that exists). Messages are transactions; latency is
/// each transaction's, begin to commit.
async fn produce(o: &Opts, pool: &PgPool, db_url: &str, variant: &str) -> Record {
    reset(pool).await;
    pool.execute(
        "CREATE TABLE IF NOT EXISTS bench_orders (id bigserial PRIMARY KEY, customer int8 NOT NULL, \
         amount numeric NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .expect("business table");
    pool.execute("TRUNCATE bench_orders")
        .await
        .expect("truncate");
    pool.execute("VACUUM ANALYZE outbox, bench_orders")
        .await
        .expect("vacuum");
    if variant == "log" {
        create_slot(pool).await;
    }
    let before = table_stats(pool).await;
    // The producers' own connections: closed at the end, so that their
    // statistics reach pg_stat_user_tables.
    let producers = PgPoolOptions::new()
        .max_connections(PRODUCERS as u32)
        .connect(db_url)
        .await
        .expect("producer pool");
    let end = Instant::now() + o.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let (pool, variant) = (producers.clone(), variant.to_owned());
        tasks.push(tokio::spawn(async move {
            let ob = outbox_for(&variant);
            let mut lat = Vec::new();
            let mut n = p * 10_000_000;
            while Instant::now() < end {
                let t = Instant::now();
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query("INSERT INTO bench_orders (customer, amount) VALUES ($1, $2::numeric)")
                    .bind(n as i64 % 1000)
                    .bind("19.90")
                    .execute(&mut *tx)
                    .await
                    .expect("business insert");
                if variant != "insert" {
                    ob.publish_message(&mut *tx, message(n, 0))
                        .await
                        .expect("publish");
                }
                tx.commit().await.expect("commit");
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                n += 1;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("producer"));
    }
    let seconds = started.elapsed().as_secs_f64();
    producers.close().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = table_stats(pool).await;
    let rows = remaining(pool).await;
    lat.sort_by(|a, b| a.total_cmp(b));
    let what = match variant {
        "insert" => "the business INSERT alone",
        "table" => "the business INSERT + publish in table mode (an outbox row)",
        _ => "the business INSERT + publish in log mode (pg_logical_emit_message, slot present)",
    };
    let extra = format!(
        "; produce: {PRODUCERS} clients for {:.0} s, one transaction after another: {what}; msgs = transactions; \
         latency = begin to commit; outbox table meanwhile: {} inserts, {} deletes, {} dead tuples (pg_stat_user_tables), {rows} rows after",
        o.duration.as_secs_f64(),
        after.0 - before.0,
        after.1 - before.1,
        after.2,
    );
    Record {
        system: "outbox-rs",
        mode: variant.into(),
        workload: "produce".into(),
        batch_size: 1,
        messages: lat.len(),
        seconds,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        max_ms: lat.last().copied(),
        cpu_s: None,
        peak_rss_mb: None,
        settings: format!(
            "{}; PostgreSQL 15 on loopback; {} cores",
            extra.trim_start_matches("; "),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
    }
}

async fn remaining(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

async fn is_empty(pool: &PgPool) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT NOT EXISTS (SELECT 1 FROM outbox)")
        .fetch_one(pool)
        .await
        .unwrap_or(false)
}

/// One measurement, as a JSON line.
#[derive(Debug, Clone)]
struct Record {
    system: &'static str,
    mode: String,
    workload: String,
    batch_size: usize,
    messages: usize,
    seconds: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
    cpu_s: Option<f64>,
    peak_rss_mb: Option<f64>,
    settings: String,
}

impl Record {
    fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.messages as f64 / self.seconds
        } else {
            0.0
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "system": self.system,
            "mode": self.mode,
            "workload": self.workload,
            "batch_size": self.batch_size,
            "messages": self.messages,
            "seconds": self.seconds,
            "msgs_per_s": self.rate(),
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "cpu_s": self.cpu_s,
            "peak_rss_mb": self.peak_rss_mb,
            "settings": self.settings,
        })
    }
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}{unit}"))
}

/// CPU seconds (utime + stime) and peak RSS in MB of a live process.
fn proc_stats(pid: u32) -> (Option<f64>, Option<f64>) {
    let ticks = 100.0; // CLK_TCK on Linux
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        });
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb / 1024.0)
        });
    (cpu, rss)
}

/// The system under test, run as a child process.
struct System {
    child: Child,
}

impl System {
    fn start(o: &Opts, mode: &str, db_url: &str, topic: &str, batch: usize) -> Self {
        let exe = std::env::current_exe().expect("current exe");
        let mut cmd = if mode == "relay" || mode == "log" {
            let relay = sibling_binary("outbox-relay", BUILD_RELAY).unwrap_or_else(|e| {
                eprintln!("{e}");
                std::process::exit(2);
            });
            Command::new(relay)
        } else {
            let mut c = Command::new(exe);
            c.arg("--serve-handler");
            c
        };
        cmd.env("DATABASE_URL", db_url)
            .env("KAFKA_BROKERS", &o.brokers)
            .env_remove("PUBLISHER_URL")
            .env("KAFKA_ACKS", "all")
            .env("KAFKA_ASYNC", "false")
            .env("TOPIC_MAP", format!("{QUEUE}:{topic}"))
            .env("BENCH_TOPIC", topic)
            .env("RELAY_BATCH_SIZE", batch.to_string())
            .env("RELAY_CONCURRENCY", batch.to_string())
            .env("RELAY_WORKERS", o.workers.to_string())
            .env("CAPTURE", if mode == "log" { "log" } else { "table" })
            .env("CAPTURE_SLOT", SLOT)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        System {
            child: cmd.spawn().expect("spawn the system under test"),
        }
    }

    fn stats(&self) -> (Option<f64>, Option<f64>) {
        proc_stats(self.child.id())
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for System {
    /// A measurement that panicked (a service restarted under it) leaves no
    /// child behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn settings(o: &Opts, mode: &str, batch: usize, extra: &str) -> String {
    let what = match mode {
        "relay" => "target/release/outbox-relay child process",
        "handler" => "subscriber + stacked Kafka publisher (serde_json in/out), child process",
        "log" => "target/release/outbox-relay child process, CAPTURE=log (messages published in log mode)",
        "kafka" => "bare rdkafka FutureProducer in-process, the same messages, `batch` in flight at a time, no database",
        _ => "plain SQL DELETE .. WHERE id IN (SELECT .. ORDER BY next_attempt_at LIMIT b FOR UPDATE SKIP LOCKED) RETURNING, in-process",
    };
    let kafka = if mode == "sql" {
        "no Kafka".to_owned()
    } else {
        format!(
            "acks=all idempotent synchronous, {} partitions, RELAY_BATCH_SIZE=RELAY_CONCURRENCY={batch}, \
             cpu_s/peak_rss_mb from /proc/<pid>/stat,status (VmHWM)",
            o.partitions
        )
    };
    let env: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("KAFKA_") && k != "KAFKA_BROKERS")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let extra = if env.is_empty() {
        extra.to_owned()
    } else {
        format!(
            "; environment passed to the system: {}{extra}",
            env.join(" ")
        )
    };
    let ff = o
        .fillfactor
        .map_or("outbox fillfactor from the migrations".to_owned(), |f| {
            format!("outbox fillfactor {f} (--fillfactor)")
        });
    format!(
        "{what}; {} workers; {kafka}; ~200 B JSON, {KEYS} keys; {ff}; PostgreSQL 15 + Kafka on loopback; {} cores{extra}",
        o.workers,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

fn unique_topic(tag: &str) -> String {
    format!(
        "bench.{tag}.{}",
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..8)
            .unwrap_or("x")
    )
}

async fn kafka_count(brokers: &str, topic: &str) -> i64 {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-bench-count")
        .create()
        .expect("consumer");
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .ok()?;
        let parts = md.topics().first()?.partitions().len() as i32;
        let mut total = 0;
        for p in 0..parts {
            let (lo, hi) = consumer
                .fetch_watermarks(&topic, p, Duration::from_secs(10))
                .ok()?;
            total += hi - lo;
        }
        Some(total)
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(-1)
}

/// The Postgres ceiling: claim and delete in one statement, no Kafka.
async fn drain_sql(o: &Opts, pool: &PgPool, batch: usize, rows: usize) -> Record {
    reset(pool).await;
    load(pool, rows).await;
    let sql = "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE queue = $1 AND parked_at IS NULL \
               AND next_attempt_at <= now() ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
               RETURNING id, payload, partition_key";
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..o.workers {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            loop {
                let got = sqlx::query(sql)
                    .bind(QUEUE)
                    .bind(batch as i64)
                    .fetch_all(&pool)
                    .await
                    .expect("ceiling delete");
                if got.is_empty() {
                    return n;
                }
                n += got.len();
            }
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.expect("ceiling task");
    }
    Record {
        system: "postgres-ceiling",
        mode: "sql".into(),
        workload: "drain".into(),
        batch_size: batch,
        messages: done,
        seconds: t.elapsed().as_secs_f64(),
        p50_ms: None,
        p99_ms: None,
        max_ms: None,
        cpu_s: None,
        peak_rss_mb: None,
        settings: settings(o, "sql", batch, ""),
    }
}

async fn drain_system(
    o: &Opts,
    pool: &PgPool,
    db_url: &str,
    mode: &str,
    batch: usize,
    rows: usize,
) -> Record {
    reset(pool).await;
    if mode == "log" {
        create_slot(pool).await;
    }
    let before = table_stats(pool).await;
    load_as(pool, rows, mode).await;
    let loaded = wal_lsn(pool).await;
    let topic = unique_topic(mode);
    outbox_kafka::ensure_topic(&BrokerConfig::new(&o.brokers), &topic, o.partitions)
        .await
        .expect("create topic");
    let t = Instant::now();
    let mut system = System::start(o, mode, db_url, &topic, batch);
    let limit = Duration::from_secs(1800);
    while !(is_empty(pool).await && (mode != "log" || confirmed_to(pool, &loaded).await)) {
        if t.elapsed() > limit {
            panic!("{mode} did not drain {rows} rows within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = t.elapsed().as_secs_f64();
    let (cpu, rss) = system.stats();
    system.stop();
    let in_kafka = kafka_count(&o.brokers, &topic).await;
    // The relay's backends have ended and flushed their statistics.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = table_stats(pool).await;
    let mut extra = if in_kafka == rows as i64 {
        format!("; verified {in_kafka} messages in Kafka; time from spawn (start-up included) to empty outbox")
    } else {
        format!("; WARNING: {in_kafka} messages in Kafka for {rows} rows (duplicates after a retry, or lost)")
    };
    extra += &format!(
        "; outbox table during the run: {} inserts, {} deletes, {} dead tuples after it (pg_stat_user_tables)",
        after.0 - before.0,
        after.1 - before.1,
        after.2
    );
    Record {
        system: "outbox-rs",
        mode: mode.into(),
        workload: "drain".into(),
        batch_size: batch,
        messages: rows,
        seconds,
        p50_ms: None,
        p99_ms: None,
        max_ms: None,
        cpu_s: cpu,
        peak_rss_mb: rss,
        settings: settings(o, mode, batch, &extra),
    }
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)])
}

/// The Kafka ceiling: the drain's messages sent by a bare producer with the
/// relay's settings (acks=all, idempotent), `batch` in flight at a time.
async fn drain_kafka(o: &Opts, batch: usize, rows: usize) -> Record {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let topic = unique_topic("kafka");
    outbox_kafka::ensure_topic(&BrokerConfig::new(&o.brokers), &topic, o.partitions)
        .await
        .expect("create topic");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &o.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .create()
        .expect("producer");
    let msgs: Vec<(String, Vec<u8>)> = (0..rows)
        .map(|n| {
            (
                format!("key-{}", n % KEYS),
                serde_json::to_vec(&payload(n, 0)).expect("json"),
            )
        })
        .collect();
    let t = Instant::now();
    for (start, chunk) in msgs.chunks(batch).enumerate() {
        let mut sends = Vec::with_capacity(chunk.len());
        for (i, (key, body)) in chunk.iter().enumerate() {
            let id = (start * batch + i).to_string();
            let record = FutureRecord::to(&topic).key(key).payload(body).headers(
                OwnedHeaders::new().insert(Header {
                    key: "outbox-id",
                    value: Some(&id),
                }),
            );
            match producer.send_result(record) {
                Ok(delivery) => sends.push(delivery),
                Err((e, _)) => panic!("enqueue: {e}"),
            }
        }
        for s in sends {
            s.await.expect("delivery").expect("acked");
        }
    }
    let seconds = t.elapsed().as_secs_f64();
    let in_kafka = kafka_count(&o.brokers, &topic).await;
    Record {
        system: "kafka-ceiling",
        mode: "kafka".into(),
        workload: "drain".into(),
        batch_size: batch,
        messages: rows,
        seconds,
        p50_ms: None,
        p99_ms: None,
        max_ms: None,
        cpu_s: None,
        peak_rss_mb: None,
        settings: settings(
            o,
            "kafka",
            batch,
            &format!("; verified {in_kafka} messages in Kafka"),
        ),
    }
}

/// Producers at `rate` msgs/s in concurrent transactions for the duration; a
/// consumer measures commit-to-Kafka latency of every message.
async fn steady(
    o: &Opts,
    pool: &PgPool,
    db_url: &str,
    mode: &str,
    rate: usize,
    workload: &str,
) -> Record {
    reset(pool).await;
    pool.execute("VACUUM ANALYZE outbox").await.expect("vacuum");
    let batch = o.steady_batch;
    let topic = unique_topic(mode);
    outbox_kafka::ensure_topic(&BrokerConfig::new(&o.brokers), &topic, o.partitions)
        .await
        .expect("create topic");

    // Commit time of every row id, in µs since the epoch.
    let committed: Arc<Mutex<HashMap<i64, u64>>> = Arc::default();
    // (row id, receipt time µs, Kafka CreateTime ms): CreateTime is when the
    // system handed the message to its producer.
    let received: Arc<Mutex<Vec<(i64, u64, i64)>>> = Arc::default();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &o.brokers)
        .set("group.id", format!("outbox-bench-{topic}"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..o.partitions {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let rx = received.clone();
    let consuming = tokio::spawn(async move {
        loop {
            let Ok(m) = consumer.recv().await else {
                continue;
            };
            let at = now_us();
            let id = m
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "outbox-id")
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                })
                .unwrap_or(-1);
            let created = m.timestamp().to_millis().unwrap_or(0);
            rx.lock().unwrap().push((id, at, created));
        }
    });

    if mode == "log" {
        create_slot(pool).await;
    }
    let mut system = System::start(o, mode, db_url, &topic, batch);
    // Warm-up: wait until the system forwards a first row.
    let ob = outbox_for(mode);
    ob.publish_message(pool, message(0, now_us()))
        .await
        .expect("warm-up publish");
    let warm = Instant::now();
    while received.lock().unwrap().is_empty() {
        if warm.elapsed() > Duration::from_secs(60) {
            panic!("{mode} forwarded nothing within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    received.lock().unwrap().clear();
    let (cpu0, _) = system.stats();

    // Each producer commits one transaction per tick; 1,000 transactions/s in
    // all, each with rate/1,000 messages.
    // Enough producers that a slow commit (tens of ms on a loaded machine)
    // does not lower the offered rate.
    let producers = 32usize;
    let per_tx = (rate / 1000).max(1);
    let tx_rate = rate / per_tx;
    let interval = Duration::from_secs_f64(producers as f64 / tx_rate as f64);
    let started = Instant::now();
    let end = started + o.duration;
    let mut tasks = Vec::new();
    for p in 0..producers {
        let pool = pool.clone();
        let committed = committed.clone();
        let mode = mode.to_owned();
        tasks.push(tokio::spawn(async move {
            let ob = outbox_for(&mode);
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + interval.mul_f64(p as f64 / producers as f64),
                interval,
            );
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut n = p * 10_000_000;
            let mut sent = 0usize;
            while Instant::now() < end {
                tick.tick().await;
                let mut tx = pool.begin().await.expect("begin");
                let msgs = (0..per_tx).map(|k| message(n + k, now_us())).collect();
                n += per_tx;
                let ids = ob.publish_batch(&mut *tx, msgs).await.expect("publish");
                tx.commit().await.expect("commit");
                let at = now_us();
                let mut c = committed.lock().unwrap();
                for id in ids {
                    c.insert(id, at);
                }
                sent += per_tx;
            }
            sent
        }));
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await.expect("producer");
    }
    let produce_secs = started.elapsed().as_secs_f64();
    // Wait for the tail.
    let tail = Instant::now();
    while received.lock().unwrap().len() < sent && tail.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (cpu1, rss) = system.stats();
    system.stop();
    consuming.abort();
    let left = remaining(pool).await;
    let committed = committed.lock().unwrap();
    let got = received.lock().unwrap();
    let mut lat: Vec<f64> = got
        .iter()
        .filter_map(|(id, at, _)| {
            committed
                .get(id)
                .map(|c| at.saturating_sub(*c) as f64 / 1000.0)
        })
        .collect();
    if let Some(path) = &o.latency_dump {
        // One line per message: mode, workload, row id, commit time (µs since
        // the epoch), commit-to-consumer latency (ms); for finding when the
        // slow ones were committed.
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open --latency-dump");
        for (id, at, _) in got.iter() {
            if let Some(c) = committed.get(id) {
                let ms = at.saturating_sub(*c) as f64 / 1000.0;
                writeln!(f, "{mode} {workload} {id} {c} {ms:.1}").expect("write --latency-dump");
            }
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let mut to_producer: Vec<f64> = got
        .iter()
        .filter_map(|(id, _, created)| {
            committed
                .get(id)
                .map(|c| *created as f64 - *c as f64 / 1000.0)
        })
        .collect();
    to_producer.sort_by(|a, b| a.total_cmp(b));
    let extra = format!(
        "; steady: {producers} producer tasks, {per_tx} msg/transaction, {tx_rate} transactions/s offered for {:.0} s \
         (achieved {:.0} msgs/s offered); latency = consumer receipt - producer commit return (same clock; consumer fetch.wait.max.ms=5, so a fetch waits at most 5 ms, not librdkafka's 500 ms default), \
         {} of {sent} received, {left} rows left; commit to Kafka CreateTime (handed to librdkafka, ms resolution) p50 {:.1} ms p99 {:.1} ms; msgs_per_s = messages / (produce time + tail); cpu_s over the steady window",
        o.duration.as_secs_f64(),
        sent as f64 / produce_secs,
        lat.len(),
        percentile(&to_producer, 0.5).unwrap_or(f64::NAN),
        percentile(&to_producer, 0.99).unwrap_or(f64::NAN),
    );
    Record {
        system: "outbox-rs",
        mode: mode.into(),
        workload: workload.into(),
        batch_size: batch,
        messages: lat.len(),
        seconds,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        max_ms: lat.last().copied(),
        cpu_s: match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        peak_rss_mb: rss,
        settings: settings(o, mode, batch, &extra),
    }
}

/// How to build the relay binary the bench runs.
const BUILD_RELAY: &str = "cargo build --release -p outbox-kafka --bin outbox-relay";

/// A binary built next to this example (`target/release/<name>`).
fn sibling_binary(name: &str, build: &str) -> Result<std::path::PathBuf, String> {
    let path = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join(name))
        .ok_or("no target directory")?;
    if path.exists() {
        Ok(path)
    } else {
        Err(format!("{} is missing: {build}", path.display()))
    }
}

/// Runs the `outbox` command line on the bench database; its stdout, or why
/// it failed.
fn outbox_cli(cli: &std::path::Path, db_url: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cli)
        .args(args)
        .env("DATABASE_URL", db_url)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", cli.display()))?;
    if !out.status.success() {
        return Err(format!(
            "outbox {} exited with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The line of `queue` in `outbox status`, columns split.
fn status_row(status: &str, queue: &str) -> Option<Vec<String>> {
    status
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cols| cols.first().map(String::as_str) == Some(queue))
}

/// The value of a metric line `name{queue="bench"...} value`, summed over
/// its other labels.
fn metric(text: &str, name: &str) -> Option<f64> {
    let label = format!("queue=\"{QUEUE}\"");
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') && rest.contains(&label)) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    Some(body)
}

/// Workload `observe`: what an operator sees while the relay drains a
/// backlog, from `outbox status` and the relay's `/metrics`, then a
/// dead-lettered row replayed with `outbox dlq replay`.
async fn observe(o: &Opts, pool: &PgPool, db_url: &str) -> Result<(), String> {
    let cli = sibling_binary(
        "outbox",
        "cargo build --release -p outbox-core --features cli --bin outbox",
    )?;
    let relay = sibling_binary("outbox-relay", BUILD_RELAY)?;
    reset(pool).await;
    // The first row is larger than Kafka accepts (1 MB by default): the relay
    // dead-letters it without retrying.
    let big = Message::json(QUEUE, &serde_json::json!({ "blob": "x".repeat(2_000_000) }))
        .map_err(|e| e.to_string())?;
    Outbox::default()
        .publish_message(pool, big)
        .await
        .map_err(|e| e.to_string())?;
    load(pool, o.rows).await;
    let topic = unique_topic("observe");
    outbox_kafka::ensure_topic(&BrokerConfig::new(&o.brokers), &topic, o.partitions)
        .await
        .map_err(|e| e.to_string())?;
    let batch = 100;
    let mut child = Command::new(&relay)
        .env("DATABASE_URL", db_url)
        .env("KAFKA_BROKERS", &o.brokers)
        .env_remove("PUBLISHER_URL")
        .env("TOPIC_MAP", format!("{QUEUE}:{topic}"))
        .env("RELAY_BATCH_SIZE", batch.to_string())
        .env("RELAY_CONCURRENCY", batch.to_string())
        .env("RELAY_WORKERS", o.workers.to_string())
        // Port 0: the relay picks a free port and logs it.
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("METRICS_SAMPLE_INTERVAL", "500ms")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", relay.display()))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let mut system = System { child };
    let (port_tx, port_rx) = std::sync::mpsc::channel::<u16>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let addr = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .filter(|v| {
                    v["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("serving /metrics"))
                })
                .and_then(|v| {
                    v["fields"]["addr"]
                        .as_str()?
                        .parse::<std::net::SocketAddr>()
                        .ok()
                });
            if let Some(addr) = addr {
                let _ = port_tx.send(addr.port());
            }
            eprintln!("relay: {line}");
        }
    });
    let port = tokio::task::spawn_blocking(move || port_rx.recv_timeout(Duration::from_secs(60)))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the relay logged no metrics address within 60 s".to_owned())?;

    // (t, status line, metrics pending, oldest, handled, dead-lettered)
    type Sample = (
        f64,
        String,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
    );
    let mut samples: Vec<Sample> = Vec::new();
    let mut pending_seen: Vec<i64> = Vec::new();
    let t = Instant::now();
    let mut drained_at: Option<Instant> = None;
    loop {
        let status = outbox_cli(&cli, db_url, &["status"])?;
        let row = status_row(&status, QUEUE);
        let backlog = row
            .as_ref()
            .map(|c| {
                c.get(1).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0)
                    + c.get(2).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0)
            })
            .unwrap_or(0);
        pending_seen.push(backlog);
        let m = http_get(port, "/metrics").await.unwrap_or_default();
        samples.push((
            t.elapsed().as_secs_f64(),
            row.map(|c| c.join("  "))
                .unwrap_or_else(|| status.trim().to_owned()),
            metric(&m, "outbox_pending_rows"),
            metric(&m, "outbox_oldest_pending_seconds"),
            metric(&m, "outbox_handled_total"),
            metric(&m, "outbox_dead_lettered_total"),
        ));
        match drained_at {
            // Two more samples after the outbox emptied: the gauges catch up.
            Some(at) if at.elapsed() > Duration::from_millis(1200) => break,
            None if backlog == 0 => drained_at = Some(Instant::now()),
            _ => {}
        }
        if t.elapsed() > Duration::from_secs(600) {
            return Err(format!(
                "the relay did not drain {} rows within 600 s",
                o.rows
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    system.stop();
    let dlq_list = outbox_cli(&cli, db_url, &["dlq", "list", "--queue", QUEUE])?;
    let replay = outbox_cli(&cli, db_url, &["dlq", "replay", "--queue", QUEUE, "--yes"])?;
    let after = outbox_cli(&cli, db_url, &["status"])?;

    let mut md = format!(
        "### The backlog draining, as an operator sees it\n\n\
         `outbox-relay` (RELAY_BATCH_SIZE={batch}, {} workers, METRICS_SAMPLE_INTERVAL=500ms) drains {} rows \
         plus one 2 MB row that Kafka refuses; every 0.5 s the bench runs `outbox status` and reads the relay's `/metrics`.\n\n\
         | t (s) | `outbox status`: queue, pending, in flight, parked, oldest, dead letters | `outbox_pending_rows` | `outbox_oldest_pending_seconds` | `outbox_handled_total` | `outbox_dead_lettered_total` |\n\
         |---|---|---|---|---|---|\n",
        o.workers, o.rows
    );
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
    for (at, line, pending, oldest, handled, dead) in &samples {
        md.push_str(&format!(
            "| {at:.1} | `{line}` | {} | {} | {} | {} |\n",
            f(*pending),
            oldest.map_or("-".to_owned(), |v| format!("{v:.1}")),
            f(*handled),
            f(*dead)
        ));
    }
    md.push_str(&format!(
        "\nThen, with the relay stopped:\n\n```text\n$ outbox dlq list --queue {QUEUE}\n{}$ outbox dlq replay --queue {QUEUE} --yes\n{}$ outbox status\n{}```\n",
        dlq_list, replay, after
    ));
    println!("\n{md}");
    if let Some(path) = &o.observe_md {
        std::fs::write(path, &md).map_err(|e| format!("write {path}: {e}"))?;
    }

    // What the observation must show.
    let distinct_draining = {
        let mut v: Vec<i64> = pending_seen.iter().copied().filter(|p| *p > 0).collect();
        v.dedup();
        v.len()
    };
    if pending_seen.windows(2).any(|w| w[1] > w[0]) {
        return Err(format!(
            "the backlog grew while the relay drained it: {pending_seen:?}"
        ));
    }
    if distinct_draining < 2 && o.rows >= 10_000 {
        return Err(format!(
            "fewer than two samples saw the backlog shrink: {pending_seen:?}"
        ));
    }
    let handled = samples.last().and_then(|s| s.4).unwrap_or(0.0);
    if handled < o.rows as f64 {
        return Err(format!(
            "/metrics counted {handled} handled rows of {}",
            o.rows
        ));
    }
    if samples.last().and_then(|s| s.2) != Some(0.0) {
        return Err("/metrics never showed the outbox empty".into());
    }
    if !replay.contains("replayed 1 ") {
        return Err(format!("the refused row was not replayed: {replay}"));
    }
    match status_row(&after, QUEUE) {
        Some(c)
            if c.get(1).map(String::as_str) == Some("1")
                && c.last().map(String::as_str) == Some("0") => {}
        _ => {
            return Err(format!(
                "after the replay, status does not show 1 pending and 0 dead letters:\n{after}"
            ))
        }
    }
    Ok(())
}

/// `--serve-handler`: the handler-mode system under test.
async fn serve_handler() -> Result<(), Box<dyn std::error::Error>> {
    let _ = outbox::logging::init(outbox::logging::LogFormat::Text);
    let url = std::env::var("DATABASE_URL")?;
    let topic: Arc<str> = std::env::var("BENCH_TOPIC")?.into();
    let batch: usize = std::env::var("RELAY_BATCH_SIZE")?.parse()?;
    let workers: usize = std::env::var("RELAY_WORKERS")?.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(workers as u32 * 2 + 3)
        .connect(&url)
        .await?;
    #[derive(serde::Deserialize, serde::Serialize)]
    struct Item {
        sku: String,
        qty: u32,
        price_cents: u64,
    }
    #[derive(serde::Deserialize, serde::Serialize)]
    struct Order {
        order_id: u64,
        customer: String,
        items: Vec<Item>,
        ts_us: u64,
        note: String,
    }
    let handler = move |env: Arc<Envelope>, _ctx: Context| {
        let topic = topic.clone();
        async move {
            let order: Order = serde_json::from_slice(&env.payload)
                .map_err(|e| HandlerError::reject(e.to_string()))?;
            let out =
                serde_json::to_vec(&order).map_err(|e| HandlerError::reject(e.to_string()))?;
            Ok(Output::none().publish("kafka", &topic, None, out))
        }
    };
    let sub = Subscriber::new("bench-handler", handler)
        .queue(QUEUE)
        .batch_size(batch)
        .concurrency(batch)
        .workers(workers);
    App::manual(pool)
        .register(sub)
        .broker(Broker::from_env()?)
        .run_until_signal()
        .await?;
    Ok(())
}

/// Runs one measurement, again (up to three times) if it fails: PostgreSQL
/// or Kafka may be restarted under it on a shared machine.
async fn attempt<F, Fut>(what: &str, f: F) -> Option<Record>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Record> + Send + 'static,
{
    for i in 1..=3 {
        match tokio::spawn(f()).await {
            Ok(mut r) => {
                if i > 1 {
                    r.settings
                        .push_str(&format!("; measured at attempt {i} (earlier ones failed)"));
                }
                return Some(r);
            }
            Err(e) => {
                eprintln!("bench: {what} failed (attempt {i}/3): {e}; retrying in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
    None
}

fn print(r: &Record) {
    println!(
        "| {:<16} | {:<7} | {:<12} | {:>5} | {:>7} | {:>7.2} | {:>9.0} | {:>7} | {:>7} | {:>7} | {:>6} | {:>7} |",
        r.system,
        r.mode,
        r.workload,
        r.batch_size,
        r.messages,
        r.seconds,
        r.rate(),
        opt(r.p50_ms, ""),
        opt(r.p99_ms, ""),
        opt(r.max_ms, ""),
        opt(r.cpu_s, ""),
        opt(r.peak_rss_mb, ""),
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().nth(1).as_deref() == Some("--serve-handler") {
        return serve_handler().await;
    }
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    let admin = PgPool::connect(&o.database_url).await?;
    admin
        .execute("DROP DATABASE IF EXISTS outbox_bench WITH (FORCE)")
        .await?;
    admin.execute("CREATE DATABASE outbox_bench").await?;
    let db_url = with_database(&o.database_url, "outbox_bench");
    let pool = PgPoolOptions::new()
        .max_connections(o.workers as u32 + 40)
        .connect(&db_url)
        .await?;
    outbox::migrate(&pool, &Tables::default()).await?;
    if let Some(ff) = o.fillfactor {
        pool.execute(format!("ALTER TABLE outbox SET (fillfactor = {ff})").as_str())
            .await?;
    }
    let mut out = match &o.json {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
        None => None,
    };
    println!(
        "| system           | mode    | workload     | batch | msgs    | seconds | msgs/s    | p50 ms  | p99 ms  | max ms  | cpu s  | rss MB  |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut failed = Vec::new();
    let mut emit = |what: String, r: Option<Record>| match r {
        Some(r) => {
            print(&r);
            if let Some(f) = out.as_mut() {
                writeln!(f, "{}", r.json()).expect("write --json");
            }
        }
        None => {
            eprintln!("bench: {what} failed; skipped (see above)");
            failed.push(what);
        }
    };
    for w in &o.workloads {
        if w == "observe" {
            if let Err(e) = observe(&o, &pool, &db_url).await {
                eprintln!("bench: observe: {e}");
                emit("observe".to_owned(), None);
            }
        } else if w == "produce" {
            for variant in ["insert", "table", "log"] {
                let what = format!("{variant} produce");
                let r = attempt(&what, || {
                    let (o, pool) = (o.clone(), pool.clone());
                    let db_url = db_url.clone();
                    async move { produce(&o, &pool, &db_url, variant).await }
                })
                .await;
                emit(what, r);
            }
        } else if w == "drain" {
            for &b in &o.batches {
                // Batch 1 and 10 pay one Kafka round trip per claim: fewer rows
                // keep the run short (--no-cap drains --rows at every size).
                let rows = match (o.cap, b) {
                    (true, 1) => o.rows.min(10_000),
                    (true, 2..=99) => o.rows.min(50_000),
                    _ => o.rows,
                };
                for m in &o.modes {
                    let what = format!("{m} drain batch {b}");
                    let r = attempt(&what, || {
                        let (o, pool, db_url, m) =
                            (o.clone(), pool.clone(), db_url.clone(), m.clone());
                        async move {
                            match m.as_str() {
                                "sql" => drain_sql(&o, &pool, b, rows).await,
                                "kafka" => drain_kafka(&o, b, rows).await,
                                mode => drain_system(&o, &pool, &db_url, mode, b, rows).await,
                            }
                        }
                    })
                    .await;
                    emit(what, r);
                }
            }
        } else {
            let rate = if w == "steady-1000" { 1_000 } else { 10_000 };
            for m in o.modes.iter().filter(|m| *m != "sql" && *m != "kafka") {
                let what = format!("{m} {w}");
                let r = attempt(&what, || {
                    let (o, pool, db_url, m, w) = (
                        o.clone(),
                        pool.clone(),
                        db_url.clone(),
                        m.clone(),
                        w.clone(),
                    );
                    async move { steady(&o, &pool, &db_url, &m, rate, &w).await }
                })
                .await;
                emit(what, r);
            }
        }
    }
    pool.close().await;
    admin
        .execute("DROP DATABASE IF EXISTS outbox_bench WITH (FORCE)")
        .await?;
    if !failed.is_empty() {
        eprintln!("bench: failed: {}", failed.join(", "));
        std::process::exit(1);
    }
    Ok(())
}
