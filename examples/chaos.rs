//! The chaos run: at-least-once delivery while things break.
//!
//! For each mode (`relay`: two `outbox-relay` processes; `handler`: two
//! `chaos_handler` processes, a subscriber with a stacked `#[kafka::publisher]`;
//! `log`: two `outbox-relay` processes with `CAPTURE=log`, one streaming the
//! slot and one standing by, the numbers published in log mode)
//! the driver publishes N uniquely numbered messages, each in the same
//! transaction as a business row (`chaos_published`), and meanwhile, in random
//! order, one after the other:
//!
//! * `kill -9`s one of the two instances 3 times at random moments, starting
//!   it again each time,
//! * restarts Kafka twice and PostgreSQL once (`scripts/services restart ...`),
//! * pauses the Kafka broker (`kill -STOP` of its java process, found by
//!   `scripts/services`' pid file or command-line marker) for 10 s longer than
//!   the instances' lease (relay: 30 s, handler: 15 s), then `kill -CONT`s it:
//!   the instances renew their leases while their sends hang, so the other
//!   instance takes nothing over. The driver sends CONT on every path out of
//!   the pause (an error, a panic, SIGINT/SIGTERM), and `scripts/chaos` sends
//!   it again when it exits,
//! * runs `VACUUM FULL outbox` once while the instances drain it: 1 to 3 s
//!   after the Kafka pause, while its backlog drains (with `--no-restarts`, at
//!   a random moment), and only once rows are leased (it waits up to 10 s for
//!   them). The table is rewritten between claims and acks, and an ack that
//!   deleted the wrong row would show as a lost number,
//! * handler mode only: publishes one poison row (`n` = `u64::MAX`, in its
//!   own transaction with a business row in `chaos_poison`), whose handler
//!   aborts the process. The fleet counts an instance that dies of it (SIGABRT
//!   and the handler's "poison message" line in its log) as a crash and starts
//!   it again; the runtime must dead-letter the row as `crashed` after at
//!   most `max_deliveries` (3 in `chaos_handler`) such crashes,
//!
//! then waits until the outbox is empty, stops both instances with SIGTERM and
//! reads the topic with a fresh consumer from the beginning (up to the high
//! watermarks). It prints per mode: N, kills, crashes, restarts, the Kafka
//! pause, the VACUUM FULL, lost, duplicates (with their bound: the rows an
//! instance can have in flight, workers x batch size, times the disturbances
//! that can make them go out twice) and times. It exits non-zero when a number
//! is lost, the duplicates exceed the bound, the outbox is not empty, the
//! dead-letter table holds anything but the poison row (with reason
//! `crashed`), the poison row reached the topic, the poison crashed the
//! instances more than `max_deliveries` times, or an instance crashed
//! otherwise or stopped uncleanly.
//!
//! The publisher survives the PostgreSQL restart: a failed transaction is
//! retried; when the outcome of a commit is unknown the business rows are
//! looked up, so a number counts as published exactly when its commit
//! succeeded.
//!
//! ```text
//! scripts/chaos                 # full run: 200,000 per mode, all three modes
//! scripts/chaos --bounded       # CI: 20,000 per mode
//! cargo run --release --example chaos -- --n 2000 --mode relay --no-restarts
//! ```
//!
//! Options: `--n N`, `--mode relay|handler|log|both|all` (both: relay and
//! handler; all, the default: the three), `--window SECS` (the
//! publishing time the events are spread over), `--no-restarts` (no service
//! restarts and no Kafka pause: leaves the shared services alone),
//! `--no-kills`, `--no-poison`, `--no-vacuum`, `--seed S`,
//! `--drain-timeout SECS`, `--relay-bin PATH`, `--handler-bin PATH`,
//! `--keep-db`. Environment: `DATABASE_URL` (admin URL; the run uses databases
//! `outbox_chaos_relay` and `outbox_chaos_handler` next to it), `KAFKA_BROKERS`,
//! `OUTBOX_REPO` (for `scripts/services`), `KAFKA_CACHE_DIR` (where
//! `scripts/services` keeps the broker's pid file).

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::{Capture, Message, Outbox, Tables};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The queue the driver publishes to.
const QUEUE: &str = "chaos";
/// The topic of the handler mode (a literal in `examples/chaos_handler.rs`).
const HANDLER_TOPIC: &str = "chaos.handler";
/// Partitions of the topics the driver creates.
const PARTITIONS: i32 = 3;
/// Numbers per publish transaction.
const BATCH: usize = 200;
/// The number of the poison message (`POISON` in `examples/chaos_handler.rs`).
const POISON: u64 = u64::MAX;
/// What `examples/chaos_handler.rs` sets (checked against the settings line
/// it prints): its lease, and the deliveries without a settlement after which
/// a row is dead-lettered as `crashed`.
const HANDLER_LEASE: Duration = Duration::from_secs(15);
const HANDLER_MAX_DELIVERIES: u32 = 3;
const HANDLER_BATCH_SIZE: u64 = 500;
const HANDLER_WORKERS: u64 = 2;
const HANDLER_WRITE_TIMEOUT: Duration = Duration::from_secs(8);
/// The relay's settings, passed to it in its environment. Its lease is
/// derived from the write timeout (`outbox-kafka/src/relay.rs`: twice the
/// write timeout plus 10 s, at least `outbox::DEFAULT_LEASE_TTL`).
const RELAY_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const RELAY_BATCH_SIZE: u64 = 500;
const RELAY_WORKERS: u64 = 2;
/// Mode `log`: the relays' slot and their window of messages in flight.
const LOG_SLOT: &str = "outbox_chaos_log";
const LOG_MAX_IN_FLIGHT: u64 = 2000;

/// Where a mode publishes.
fn capture_of(mode: Mode) -> Capture {
    if mode == Mode::Log {
        Capture::Log
    } else {
        Capture::Table
    }
}
/// How much longer than the lease the Kafka broker is paused.
const PAUSE_OVER_LEASE: Duration = Duration::from_secs(10);
/// On the command line of the broker `scripts/services` starts.
const KAFKA_MARKER: &str = "-Doutbox.services=kafka-broker";

/// One numbered message (the payload on the outbox and on Kafka).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Numbered {
    run: String,
    n: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Relay,
    Handler,
    /// Two `outbox-relay` processes with `CAPTURE=log`, the numbers
    /// published in log mode (one streams the slot, the other stands by).
    Log,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Relay => "relay",
            Mode::Handler => "handler",
            Mode::Log => "log",
        }
    }

    /// The instances' lease, which the Kafka pause exceeds.
    fn lease(self) -> Duration {
        match self {
            Mode::Relay | Mode::Log => {
                (RELAY_WRITE_TIMEOUT * 2 + Duration::from_secs(10)).max(outbox::DEFAULT_LEASE_TTL)
            }
            Mode::Handler => HANDLER_LEASE,
        }
    }

    fn write_timeout(self) -> Duration {
        match self {
            Mode::Relay | Mode::Log => RELAY_WRITE_TIMEOUT,
            Mode::Handler => HANDLER_WRITE_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone)]
struct Opts {
    n: u64,
    modes: Vec<Mode>,
    window: Duration,
    restarts: bool,
    kills: bool,
    poison: bool,
    vacuum: bool,
    seed: u64,
    drain_timeout: Duration,
    relay_bin: PathBuf,
    handler_bin: PathBuf,
    keep_db: bool,
}

fn usage() -> &'static str {
    "usage: chaos [--n N] [--mode relay|handler|log|both|all] [--window SECS] [--no-restarts] [--no-kills] \
     [--no-poison] [--no-vacuum] [--seed S] [--drain-timeout SECS] [--relay-bin PATH] [--handler-bin PATH] [--keep-db]"
}

fn parse_opts() -> Result<Opts, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // target/<profile>/examples/chaos -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut o = Opts {
        n: 20_000,
        modes: vec![Mode::Relay, Mode::Handler, Mode::Log],
        window: Duration::from_secs(60),
        restarts: true,
        kills: true,
        poison: true,
        vacuum: true,
        seed: seed_from_uuid(),
        drain_timeout: Duration::from_secs(300),
        relay_bin: profile_dir.join("outbox-relay"),
        handler_bin: profile_dir.join("examples").join("chaos_handler"),
        keep_db: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("{name} needs a value; {}", usage()))
        };
        let num = |name: &str, v: String| {
            v.replace('_', "")
                .parse::<u64>()
                .map_err(|_| format!("{name}: {v:?} is not a whole number"))
        };
        match a.as_str() {
            "--n" => {
                o.n = num("--n", value("--n")?)?;
                if o.n == 0 || o.n > 100_000_000 {
                    return Err("--n: accepted 1 to 100000000".into());
                }
            }
            "--mode" => {
                o.modes = match value("--mode")?.as_str() {
                    "relay" => vec![Mode::Relay],
                    "log" => vec![Mode::Log],
                    "all" => vec![Mode::Relay, Mode::Handler, Mode::Log],
                    "handler" => vec![Mode::Handler],
                    "both" => vec![Mode::Relay, Mode::Handler],
                    other => {
                        return Err(format!(
                            "--mode: {other:?} is not one of relay, handler, log, both (relay and handler), all"
                        ))
                    }
                }
            }
            "--window" => {
                o.window = Duration::from_secs(num("--window", value("--window")?)?.max(1))
            }
            "--drain-timeout" => {
                o.drain_timeout =
                    Duration::from_secs(num("--drain-timeout", value("--drain-timeout")?)?)
            }
            "--seed" => o.seed = num("--seed", value("--seed")?)?,
            "--no-restarts" => o.restarts = false,
            "--no-kills" => o.kills = false,
            "--no-poison" => o.poison = false,
            "--no-vacuum" => o.vacuum = false,
            "--relay-bin" => o.relay_bin = value("--relay-bin")?.into(),
            "--handler-bin" => o.handler_bin = value("--handler-bin")?.into(),
            "--keep-db" => o.keep_db = true,
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other:?}; {}", usage())),
        }
    }
    for (mode, bin) in [
        (Mode::Relay, &o.relay_bin),
        (Mode::Handler, &o.handler_bin),
        (Mode::Log, &o.relay_bin),
    ] {
        if o.modes.contains(&mode) && !bin.is_file() {
            return Err(format!(
                "{} not found (build it, or pass --{}-bin)",
                bin.display(),
                mode.name()
            ));
        }
    }
    Ok(o)
}

fn seed_from_uuid() -> u64 {
    let b = uuid::Uuid::new_v4().into_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) | 1
}

/// xorshift64*: enough randomness for picking moments and victims.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn env_or(name: &str, default: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => default.to_owned(),
    }
}

fn database_url() -> String {
    env_or(
        "DATABASE_URL",
        "postgres://outbox:outbox@127.0.0.1:5432/outbox",
    )
}

fn kafka_brokers() -> String {
    env_or("KAFKA_BROKERS", "127.0.0.1:9092")
}

fn repo_dir() -> PathBuf {
    std::env::var_os("OUTBOX_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// `url` with its database replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[start..].find('/') {
        Some(i) => &base[..start + i],
        None => base,
    };
    format!("{base}/{db}{query}")
}

fn stamp(start: Instant) -> String {
    format!("[{:>6.1}s]", start.elapsed().as_secs_f64())
}

/// Retries `f` with backoff until it succeeds or `limit` passes.
async fn retrying<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> Result<T, BoxError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BoxError>>,
{
    let deadline = Instant::now() + limit;
    let mut backoff = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() < deadline => {
                eprintln!("chaos: {what}: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(format!("{what}: {e}").into()),
        }
    }
}

// ---------------------------------------------------------------- database

async fn fresh_database(name: &str) -> Result<(PgPool, String), BoxError> {
    let admin_url = database_url();
    retrying("create the database", Duration::from_secs(60), || async {
        let mut admin = PgConnection::connect(&admin_url).await?;
        drop_slots(&mut admin, name).await?;
        sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
            .execute(&mut admin)
            .await?;
        sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(())
    })
    .await?;
    let url = with_database(&admin_url, name);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await?;
    outbox::migrate(&pool, &Tables::default()).await?;
    sqlx::query("CREATE TABLE chaos_published (n bigint PRIMARY KEY)")
        .execute(&pool)
        .await?;
    // The business row of the poison message: its outbox id.
    sqlx::query("CREATE TABLE chaos_poison (outbox_id bigint PRIMARY KEY)")
        .execute(&pool)
        .await?;
    Ok((pool, url))
}

/// Drops the slots of database `name` (a database with a slot cannot be
/// dropped), ending their readers first.
async fn drop_slots(admin: &mut PgConnection, name: &str) -> Result<(), BoxError> {
    sqlx::query(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
         WHERE database = $1 AND active_pid IS NOT NULL",
    )
    .bind(name)
    .execute(&mut *admin)
    .await?;
    for _ in 0..50 {
        sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE database = $1 AND NOT active",
        )
        .bind(name)
        .execute(&mut *admin)
        .await?;
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE database = $1")
                .bind(name)
                .fetch_one(&mut *admin)
                .await?;
        if left == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("the replication slots of {name} stay active").into())
}

async fn drop_database(name: &str) -> Result<(), BoxError> {
    let mut admin = PgConnection::connect(&database_url()).await?;
    drop_slots(&mut admin, name).await?;
    sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    Ok(())
}

async fn scalar(pool: &PgPool, sql: &str) -> Result<i64, BoxError> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

// ---------------------------------------------------------------- publisher

#[derive(Default)]
struct PublishStats {
    committed: AtomicU64,
    failed_attempts: AtomicU64,
    unknown_outcomes_committed: AtomicU64,
}

/// One transaction: the business rows and their outbox rows.
async fn publish_once(
    pool: &PgPool,
    capture: Capture,
    run: &str,
    nums: &[i64],
) -> Result<(), BoxError> {
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO chaos_published (n) SELECT unnest($1::bigint[])")
        .bind(nums)
        .execute(&mut *tx)
        .await?;
    let msgs = nums
        .iter()
        .map(|&n| {
            Message::json(
                QUEUE,
                &Numbered {
                    run: run.to_owned(),
                    n: n as u64,
                },
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    Outbox::default()
        .capture(capture)
        .publish_batch(&mut *tx, msgs)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Publishes `nums` until a commit is known to have succeeded.
async fn publish_confirmed(
    pool: &PgPool,
    capture: Capture,
    run: &str,
    nums: &[i64],
    stats: &PublishStats,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let error = match publish_once(pool, capture, run, nums).await {
            Ok(()) => break,
            Err(e) => e,
        };
        stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
        eprintln!("chaos: publish of {}..: {error}; checking", nums[0]);
        // Did the commit happen after all? Ask until the database answers.
        let present = loop {
            match sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM chaos_published WHERE n = ANY($1)",
            )
            .bind(nums)
            .fetch_one(pool)
            .await
            {
                Ok(c) => break c,
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        };
        if present == nums.len() as i64 {
            stats
                .unknown_outcomes_committed
                .fetch_add(1, Ordering::Relaxed);
            break;
        }
        assert_eq!(present, 0, "a transaction committed in part");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    stats
        .committed
        .fetch_add(nums.len() as u64, Ordering::Relaxed);
}

/// Publishes the poison message like the others (with a business row, in one
/// transaction), until its commit is known to have succeeded; its outbox id.
async fn publish_poison(pool: &PgPool, run: &str) -> Result<i64, BoxError> {
    let mut backoff = Duration::from_millis(50);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let attempt = async {
            let mut tx = pool.begin().await?;
            let msg = Message::json(
                QUEUE,
                &Numbered {
                    run: run.to_owned(),
                    n: POISON,
                },
            )?;
            let ids = Outbox::default().publish_batch(&mut *tx, vec![msg]).await?;
            let id = *ids.first().ok_or("publish_batch returned no id")?;
            sqlx::query("INSERT INTO chaos_poison (outbox_id) VALUES ($1)")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<i64, BoxError>(id)
        };
        let error = match attempt.await {
            Ok(id) => return Ok(id),
            Err(e) => e,
        };
        eprintln!("chaos: publish of the poison row: {error}; checking");
        // Did the commit happen after all? Ask until the database answers.
        let present = loop {
            match sqlx::query_scalar::<_, i64>("SELECT outbox_id FROM chaos_poison LIMIT 1")
                .fetch_optional(pool)
                .await
            {
                Ok(v) => break v,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("publish of the poison row: {error}; lookup: {e}").into())
                }
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        };
        if let Some(id) = present {
            return Ok(id);
        }
        if Instant::now() > deadline {
            return Err(format!("publish of the poison row: {error}").into());
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Publishes 0..n in transactions of [`BATCH`], paced over `window`. The last
/// 5 % wait until the chaos task is done, so every event hits a publisher
/// that is still at work.
async fn publisher(
    pool: PgPool,
    capture: Capture,
    run: String,
    n: u64,
    window: Duration,
    stats: Arc<PublishStats>,
    mut chaos_done: tokio::sync::watch::Receiver<bool>,
) {
    let start = Instant::now();
    let hold_from = n - n / 20;
    let mut next: u64 = 0;
    while next < n {
        if next >= hold_from {
            let _ = chaos_done.wait_for(|done| *done).await;
        }
        let end = (next + BATCH as u64).min(n);
        let nums: Vec<i64> = (next..end).map(|i| i as i64).collect();
        publish_confirmed(&pool, capture, &run, &nums, &stats).await;
        next = end;
        // Pace the numbers over the window so the events hit a busy system.
        let due = window.mul_f64(next as f64 / n as f64);
        let elapsed = start.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

// ---------------------------------------------------------------- instances

/// The events of a mode, as printed, in the order they happened (the chaos
/// task and the fleet's supervisor both write to it).
#[derive(Clone)]
struct EventLog {
    start: Instant,
    lines: Arc<std::sync::Mutex<Vec<String>>>,
}

impl EventLog {
    fn new(start: Instant) -> Self {
        Self {
            start,
            lines: Arc::default(),
        }
    }

    /// Prints `what` with the time since the mode started, and keeps it.
    fn push(&self, what: impl std::fmt::Display) {
        let line = format!("{} {what}", stamp(self.start));
        println!("chaos: {line}");
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

struct Instance {
    child: Child,
    pid: u32,
    spawned: u32,
    /// Killed by the chaos task and waiting to be started again.
    killed: bool,
}

struct Fleet {
    mode: Mode,
    bin: PathBuf,
    env: Vec<(String, String)>,
    log_dir: PathBuf,
    instances: Vec<Instance>,
    kills: u32,
    /// Whether an instance may die of the poison message (handler mode).
    poison_expected: bool,
    /// Instances that aborted on the poison message (each started again).
    poison_crashes: u32,
    unexpected_exits: Vec<String>,
    log: EventLog,
}

impl Fleet {
    fn log_path(&self, idx: usize, generation: u32) -> PathBuf {
        self.log_dir
            .join(format!("{}-{idx}-{generation}.log", self.mode.name()))
    }

    fn spawn(&self, idx: usize, generation: u32) -> Result<Instance, BoxError> {
        let log = std::fs::File::create(self.log_path(idx, generation))?;
        let mut cmd = Command::new(&self.bin);
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn()?;
        Ok(Instance {
            pid: child.id().unwrap_or(0),
            child,
            spawned: generation,
            killed: false,
        })
    }

    fn start(&mut self, count: usize) -> Result<(), BoxError> {
        for idx in 0..count {
            let inst = self.spawn(idx, 0)?;
            self.instances.push(inst);
        }
        Ok(())
    }

    /// Whether instance `idx` died of the poison message: aborted (SIGABRT)
    /// after the handler said so in its log.
    fn died_of_poison(&self, idx: usize, status: ExitStatus) -> bool {
        const SIGABRT: i32 = 6;
        self.poison_expected
            && status.signal() == Some(SIGABRT)
            && std::fs::read(self.log_path(idx, self.instances[idx].spawned))
                .map(|log| String::from_utf8_lossy(&log).contains("chaos_handler: poison message"))
                .unwrap_or(false)
    }

    /// Records the exit of instance `idx` (not killed by the driver) and
    /// starts it again: a crash on the poison message is counted, any other
    /// exit is a problem.
    fn exited(&mut self, idx: usize, status: ExitStatus) -> Result<(), BoxError> {
        let (pid, spawned) = (self.instances[idx].pid, self.instances[idx].spawned);
        if self.died_of_poison(idx, status) {
            self.poison_crashes += 1;
            self.log.push(format!(
                "instance {idx} (pid {pid}) aborted on the poison message (crash {}); starting it again",
                self.poison_crashes
            ));
        } else {
            let what = format!(
                "{} instance {idx} (pid {pid}, start {spawned}) exited on its own: {status}; log {}",
                self.mode.name(),
                self.log_path(idx, spawned).display()
            );
            self.log.push(&what);
            self.unexpected_exits.push(what);
        }
        self.instances[idx] = self.spawn(idx, spawned + 1)?;
        Ok(())
    }

    /// Restarts instances that exited on their own (a crash: recorded).
    fn supervise(&mut self) -> Result<(), BoxError> {
        for idx in 0..self.instances.len() {
            if self.instances[idx].killed {
                continue;
            }
            if let Some(status) = self.instances[idx].child.try_wait()? {
                self.exited(idx, status)?;
            }
        }
        Ok(())
    }

    /// `kill -9` of instance `idx`; false when it had exited on its own
    /// already (recorded and started again by [`Fleet::exited`]).
    async fn kill9(&mut self, idx: usize) -> Result<bool, BoxError> {
        if let Some(status) = self.instances[idx].child.try_wait()? {
            self.exited(idx, status)?;
            return Ok(false);
        }
        let inst = &mut self.instances[idx];
        inst.child.start_kill()?;
        inst.child.wait().await?;
        inst.killed = true;
        self.kills += 1;
        Ok(true)
    }

    fn respawn(&mut self, idx: usize) -> Result<(), BoxError> {
        let generation = self.instances[idx].spawned + 1;
        self.instances[idx] = self.spawn(idx, generation)?;
        Ok(())
    }

    /// SIGTERM to every instance; the exit statuses, `Err` for an unclean stop.
    async fn stop_all(&mut self) -> Vec<Result<(), String>> {
        let mut out = Vec::new();
        for (idx, inst) in self.instances.iter_mut().enumerate() {
            let Some(pid) = inst.child.id() else {
                out.push(Err(format!("instance {idx} already gone")));
                continue;
            };
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
            match tokio::time::timeout(Duration::from_secs(60), inst.child.wait()).await {
                Ok(Ok(s)) if s.success() => out.push(Ok(())),
                Ok(Ok(s)) => out.push(Err(format!("instance {idx} stopped with {s}"))),
                Ok(Err(e)) => out.push(Err(format!("instance {idx}: {e}"))),
                Err(_) => {
                    let _ = inst.child.start_kill();
                    out.push(Err(format!(
                        "instance {idx} did not stop within 60 s of SIGTERM"
                    )))
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------- events

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Kill,
    Restart(&'static str),
    /// `kill -STOP` of the Kafka broker for this long, then `kill -CONT`.
    PauseKafka(Duration),
    /// `VACUUM FULL` of the outbox table.
    VacuumFull,
    /// The poison message (handler mode).
    Poison,
}

#[derive(Default, Debug)]
struct ChaosStats {
    kafka_restarts: u32,
    pg_restarts: u32,
    /// How long each Kafka restart took (stop and start).
    kafka_outages: Vec<Duration>,
    /// How long the broker was stopped, for each pause.
    kafka_pauses: Vec<Duration>,
    /// Each VACUUM FULL.
    vacuums: Vec<Vacuum>,
    /// The outbox id of the poison row, once published.
    poison_id: Option<i64>,
    restart_failures: Vec<String>,
}

async fn services(action: &str, service: &str) -> Result<Duration, String> {
    let script = repo_dir().join("scripts").join("services");
    let started = Instant::now();
    let out = Command::new(&script)
        .args([action, service])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("{} {action} {service}: {e}", script.display()))?;
    if out.status.success() {
        Ok(started.elapsed())
    } else {
        Err(format!(
            "{} {action} {service} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The pid of the broker `scripts/services` started: its pid file when that
/// names a process with the broker's command-line marker, else the only
/// process with the marker.
fn kafka_broker_pid() -> Result<u32, String> {
    let is_broker = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                c.split(|&b| b == 0)
                    .any(|arg| arg == KAFKA_MARKER.as_bytes())
            })
            .unwrap_or(false)
    };
    let cache = std::env::var_os("KAFKA_CACHE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_dir().join(".cache").join("kafka"));
    if let Ok(text) = std::fs::read_to_string(cache.join("kafka.pid")) {
        if let Ok(pid) = text.trim().parse::<u32>() {
            if is_broker(pid) {
                return Ok(pid);
            }
        }
    }
    let found: Vec<u32> = std::fs::read_dir("/proc")
        .map_err(|e| format!("/proc: {e}"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| is_broker(pid))
        .collect();
    match found[..] {
        [pid] => Ok(pid),
        [] => Err(format!(
            "no Kafka broker started by scripts/services is running (no process with {KAFKA_MARKER})"
        )),
        _ => Err(format!(
            "{} Kafka brokers started by scripts/services are running ({found:?}); not pausing any",
            found.len()
        )),
    }
}

/// The pid of the broker while it is stopped, for the signal handler.
static STOPPED_BROKER: AtomicU32 = AtomicU32::new(0);

/// `kill -CONT` of `pid`.
fn resume_broker(pid: u32) -> Result<(), String> {
    let status = std::process::Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status()
        .map_err(|e| format!("kill -CONT {pid}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill -CONT {pid}: {status}"))
    }
}

/// A stopped Kafka broker: resumed when dropped, so that no path out of the
/// pause (an error, a panic, a cancelled task) leaves it stopped. SIGINT and
/// SIGTERM of the driver resume it too (see `main`).
struct StoppedBroker {
    pid: u32,
}

impl StoppedBroker {
    fn stop(pid: u32) -> Result<Self, String> {
        STOPPED_BROKER.store(pid, Ordering::SeqCst);
        let guard = StoppedBroker { pid };
        let status = std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .map_err(|e| format!("kill -STOP {pid}: {e}"))?;
        if !status.success() {
            return Err(format!("kill -STOP {pid}: {status}"));
        }
        Ok(guard)
    }

    fn resume(self) -> Result<(), String> {
        let pid = self.pid;
        std::mem::forget(self);
        STOPPED_BROKER.store(0, Ordering::SeqCst);
        resume_broker(pid)
    }
}

impl Drop for StoppedBroker {
    fn drop(&mut self) {
        STOPPED_BROKER.store(0, Ordering::SeqCst);
        if let Err(e) = resume_broker(self.pid) {
            eprintln!("chaos: {e}: resume it by hand (kill -CONT {})", self.pid);
        }
    }
}

/// One `VACUUM FULL` of the outbox.
#[derive(Debug, Clone)]
struct Vacuum {
    took: Duration,
    /// Rows in the outbox just before it, and how many of them were leased
    /// (claimed in the last 5 s and not yet acknowledged).
    rows: i64,
    leased: i64,
    /// Of those leased rows, how many were still leased right after it: their
    /// acknowledgement comes after the rewrite.
    leased_after: i64,
    /// How long it waited for rows in flight.
    waited: Duration,
}

/// `VACUUM FULL outbox` while rows are in flight: waits (up to 10 s) until
/// some rows are leased, claimed in the last 5 s (not the lease of a killed
/// instance, waiting to expire) and not the poison row, so that the rewrite falls between their
/// claim and their acknowledgement. Retried for a minute on errors.
async fn vacuum_full(pool: &PgPool, poison_id: Option<i64>) -> Result<Vacuum, BoxError> {
    retrying("VACUUM FULL outbox", Duration::from_secs(60), || async {
        let began = Instant::now();
        let (leased_ids, rows) = loop {
            let (ids, rows): (Vec<i64>, i64) = sqlx::query_as(
                "SELECT coalesce(array_agg(id) FILTER (WHERE lease_token IS NOT NULL \
                 AND lease_acquired_at > now() - interval '5 seconds' AND id IS DISTINCT FROM $1), '{}'), \
                 count(*) FROM outbox",
            )
            .bind(poison_id)
            .fetch_one(pool)
            .await?;
            if !ids.is_empty() || began.elapsed() > Duration::from_secs(10) {
                break (ids, rows);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let waited = began.elapsed();
        let started = Instant::now();
        sqlx::raw_sql("VACUUM FULL outbox").execute(pool).await?;
        let took = started.elapsed();
        let leased_after: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE id = ANY($1) AND lease_token IS NOT NULL",
        )
        .bind(&leased_ids)
        .fetch_one(pool)
        .await?;
        Ok(Vacuum {
            took,
            rows,
            leased: leased_ids.len() as i64,
            leased_after,
            waited,
        })
    })
    .await
}

/// What the chaos task works with.
struct ChaosCtx {
    fleet: Arc<Mutex<Fleet>>,
    events: Vec<(Duration, Event)>,
    rng: Rng,
    log: EventLog,
    pool: PgPool,
    run: String,
    lease: Duration,
    done: tokio::sync::watch::Sender<bool>,
}

/// Runs the events one after the other, each after its pause; says when done.
async fn chaos(ctx: ChaosCtx) -> ChaosStats {
    let ChaosCtx {
        fleet,
        events,
        mut rng,
        log,
        pool,
        run,
        lease,
        done,
    } = ctx;
    let mut stats = ChaosStats::default();
    for (pause, event) in events {
        tokio::time::sleep(pause).await;
        match event {
            Event::Kill => {
                let mut f = fleet.lock().await;
                let idx = rng.below(f.instances.len());
                let pid = f.instances[idx].pid;
                match f.kill9(idx).await {
                    Ok(true) => {}
                    Ok(false) => {
                        log.push(format!(
                            "kill -9 instance {idx}: it had exited already (started again)"
                        ));
                        continue;
                    }
                    Err(e) => {
                        stats.restart_failures.push(format!("kill -9 {pid}: {e}"));
                        continue;
                    }
                }
                log.push(format!("kill -9 instance {idx} (pid {pid})"));
                drop(f);
                // Down for a moment, then back.
                tokio::time::sleep(Duration::from_millis(200 + rng.below(2000) as u64)).await;
                let mut f = fleet.lock().await;
                if let Err(e) = f.respawn(idx) {
                    stats
                        .restart_failures
                        .push(format!("respawn instance {idx}: {e}"));
                }
            }
            Event::Restart(service) => {
                println!("chaos: {} restarting {service}", stamp(log.start));
                match services("restart", service).await {
                    Ok(took) => {
                        log.push(format!(
                            "restarted {service} (took {:.1}s)",
                            took.as_secs_f64()
                        ));
                        if service == "kafka" {
                            stats.kafka_restarts += 1;
                            stats.kafka_outages.push(took);
                        } else {
                            stats.pg_restarts += 1;
                        }
                    }
                    Err(e) => {
                        eprintln!("chaos: {e}; starting it again");
                        stats.restart_failures.push(e);
                        if let Err(e) = services("start", service).await {
                            stats.restart_failures.push(e);
                        }
                    }
                }
            }
            Event::PauseKafka(length) => {
                let pid = match kafka_broker_pid() {
                    Ok(pid) => pid,
                    Err(e) => {
                        stats.restart_failures.push(format!("kafka pause: {e}"));
                        continue;
                    }
                };
                let stopped = match StoppedBroker::stop(pid) {
                    Ok(s) => s,
                    Err(e) => {
                        stats.restart_failures.push(format!("kafka pause: {e}"));
                        continue;
                    }
                };
                let began = Instant::now();
                log.push(format!(
                    "kill -STOP kafka broker (pid {pid}) for {}s (lease {}s)",
                    length.as_secs(),
                    lease.as_secs()
                ));
                tokio::time::sleep(length).await;
                let result = stopped.resume();
                let took = began.elapsed();
                match result {
                    Ok(()) => {
                        log.push(format!(
                            "kill -CONT kafka broker (pid {pid}) after {:.1}s",
                            took.as_secs_f64()
                        ));
                        stats.kafka_pauses.push(took);
                    }
                    Err(e) => stats.restart_failures.push(format!("kafka pause: {e}")),
                }
            }
            Event::VacuumFull => match vacuum_full(&pool, stats.poison_id).await {
                Ok(v) => {
                    log.push(format!(
                        "VACUUM FULL outbox took {:.2}s: {} rows, {} of them leased before it ({} still leased after it); waited {:.1}s for leased rows",
                        v.took.as_secs_f64(),
                        v.rows,
                        v.leased,
                        v.leased_after,
                        v.waited.as_secs_f64()
                    ));
                    stats.vacuums.push(v);
                }
                Err(e) => stats
                    .restart_failures
                    .push(format!("VACUUM FULL outbox: {e}")),
            },
            Event::Poison => match publish_poison(&pool, &run).await {
                Ok(id) => {
                    log.push(format!("published the poison row (outbox id {id})"));
                    stats.poison_id = Some(id);
                }
                Err(e) => stats.restart_failures.push(e.to_string()),
            },
        }
    }
    let _ = done.send(true);
    stats
}

/// The events in random order, each with a random pause before it: the first
/// after 10 % to 20 % of the window, the others spread over about half of it.
/// The VACUUM FULL follows the Kafka pause (or, without one, takes a random
/// place like the others).
fn schedule(o: &Opts, mode: Mode, rng: &mut Rng) -> Vec<(Duration, Event)> {
    let mut events = Vec::new();
    if o.kills {
        events.extend([Event::Kill; 3]);
    }
    if o.restarts {
        events.extend([
            Event::Restart("kafka"),
            Event::Restart("kafka"),
            Event::Restart("postgres"),
            Event::PauseKafka(mode.lease() + PAUSE_OVER_LEASE),
        ]);
    }
    let paused = events.iter().any(|e| matches!(e, Event::PauseKafka(_)));
    // Log mode keeps the table empty: nothing for a VACUUM FULL to rewrite.
    let vacuum = o.vacuum && mode != Mode::Log;
    if vacuum && !paused {
        events.push(Event::VacuumFull);
    }
    if o.poison && mode == Mode::Handler {
        events.push(Event::Poison);
    }
    for i in (1..events.len()).rev() {
        let j = rng.below(i + 1);
        events.swap(i, j);
    }
    let slot = o.window.mul_f64(0.5 / events.len().max(1) as f64);
    let mut out = Vec::new();
    for (k, e) in events.into_iter().enumerate() {
        let pause = if k == 0 {
            o.window.mul_f64(0.1 + 0.1 * rng.unit())
        } else {
            slot.mul_f64(2.0 * rng.unit())
        };
        out.push((pause, e));
        // The VACUUM FULL follows the Kafka pause by 1 to 3 s: the backlog
        // of the pause is being drained, many rows are in flight.
        if vacuum && matches!(e, Event::PauseKafka(_)) {
            let after = Duration::from_millis(1000 + rng.below(2000) as u64);
            out.push((after, Event::VacuumFull));
        }
    }
    out
}

// ---------------------------------------------------------------- kafka

fn kafka_config() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", kafka_brokers());
    c
}

async fn fresh_topic(topic: &str, delete_first: bool) -> Result<(), BoxError> {
    let admin: AdminClient<DefaultClientContext> = kafka_config().create()?;
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(30)))
        .request_timeout(Some(Duration::from_secs(30)));
    if delete_first {
        // Best effort: the consumer counts only this run's messages anyway.
        let _ = admin.delete_topics(&[topic], &opts).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let new = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1));
        let r = admin.create_topics([&new], &opts).await?;
        match r.into_iter().next() {
            Some(Ok(_)) => break,
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) if !delete_first => break,
            Some(Err((_, code))) if Instant::now() < deadline => {
                eprintln!("chaos: create topic {topic}: {code}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Some(Err((_, code))) => {
                if code == RDKafkaErrorCode::TopicAlreadyExists {
                    eprintln!("chaos: topic {topic} was not deleted; using it as it is");
                    break;
                }
                return Err(format!("create topic {topic}: {code}").into());
            }
            None => return Err("create_topics returned nothing".into()),
        }
    }
    // Wait for the leaders.
    let t = topic.to_owned();
    tokio::task::spawn_blocking(move || -> Result<(), BoxError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = admin
                .inner()
                .fetch_metadata(Some(&t), Duration::from_secs(5))
                .ok()
                .and_then(|m| {
                    m.topics().iter().find(|x| x.name() == t).map(|x| {
                        x.error().is_none()
                            && x.partitions().len() == PARTITIONS as usize
                            && x.partitions().iter().all(|p| p.leader() >= 0)
                    })
                })
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("topic {t} has no leaders after 30 s").into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await?
}

#[derive(Debug, Default)]
struct Consumed {
    messages: u64,
    of_this_run: u64,
    other_runs: u64,
    unreadable: u64,
    out_of_range: u64,
    /// The poison message of this run (must never reach the topic).
    poison: u64,
    lost: u64,
    first_lost: Vec<u64>,
    duplicates: u64,
    duplicated_numbers: u64,
}

/// Reads `topic` from the beginning to the high watermarks with a fresh group.
fn consume(topic: &str, run: &str, n: u64) -> Result<Consumed, BoxError> {
    let consumer: BaseConsumer = kafka_config()
        .set("group.id", format!("chaos-check-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let timeout = Duration::from_secs(10);
    let meta = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = meta
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or("topic missing from the metadata")?
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut high = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let (lo, hi) = consumer.fetch_watermarks(topic, p, timeout)?;
        if hi > lo {
            high.insert(p, hi);
        }
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut counts = vec![0u32; n as usize];
    let mut c = Consumed::default();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !high.is_empty() {
        if Instant::now() > deadline {
            return Err(format!("not at the high watermarks after 300 s: {high:?}").into());
        }
        let Some(r) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = match r {
            Ok(m) => m,
            Err(e) => {
                eprintln!("chaos: consumer: {e}");
                continue;
            }
        };
        if let Some(&hi) = high.get(&m.partition()) {
            if m.offset() + 1 >= hi {
                high.remove(&m.partition());
            }
        }
        c.messages += 1;
        let Some(v) = m
            .payload()
            .and_then(|p| serde_json::from_slice::<Numbered>(p).ok())
        else {
            c.unreadable += 1;
            continue;
        };
        if v.run != run {
            c.other_runs += 1;
            continue;
        }
        c.of_this_run += 1;
        if v.n == POISON {
            c.poison += 1;
            continue;
        }
        match usize::try_from(v.n).ok().and_then(|i| counts.get_mut(i)) {
            Some(k) => *k += 1,
            None => c.out_of_range += 1,
        }
    }
    for (i, &k) in counts.iter().enumerate() {
        if k == 0 {
            c.lost += 1;
            if c.first_lost.len() < 20 {
                c.first_lost.push(i as u64);
            }
        } else if k > 1 {
            c.duplicates += u64::from(k - 1);
            c.duplicated_numbers += 1;
        }
    }
    Ok(c)
}

// ---------------------------------------------------------------- one mode

/// A row of the dead-letter table: original id, payload, failure reason,
/// deliveries, last error.
type DeadLetter = (i64, Vec<u8>, String, i32, Option<String>);

/// What became of the poison row (handler mode).
#[derive(Debug)]
struct PoisonOutcome {
    outbox_id: i64,
    /// Instances that aborted on it.
    crashes: u32,
    /// The subscriber's `max_deliveries`, as `chaos_handler` printed it.
    max_deliveries: u32,
    /// Its dead letter: failure reason and deliveries, if it has one.
    dead_letter: Option<(String, i32)>,
}

#[derive(Debug)]
struct Report {
    mode: Mode,
    n: u64,
    published: u64,
    failed_publish_attempts: u64,
    unknown_outcomes_committed: u64,
    kills: u32,
    kafka_restarts: u32,
    pg_restarts: u32,
    kafka_pauses: Vec<Duration>,
    lease: Duration,
    vacuums: Vec<Vacuum>,
    poison: Option<PoisonOutcome>,
    consumed: Consumed,
    duplicate_bound: u64,
    duplicate_bound_why: String,
    outbox_left: i64,
    dlq: i64,
    publish_time: Duration,
    drain_time: Duration,
    total_time: Duration,
    problems: Vec<String>,
    events: Vec<String>,
}

/// The settings `chaos_handler` printed at start (`key=value` pairs of its
/// `chaos_handler: settings` line), from the log of its first start.
fn handler_settings(log_dir: &Path) -> Option<BTreeMap<String, String>> {
    let log = std::fs::read(log_dir.join("handler-0-0.log")).ok()?;
    let log = String::from_utf8_lossy(&log);
    let line = log
        .lines()
        .find_map(|l| l.split_once("chaos_handler: settings "))?
        .1;
    Some(
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

/// Checks the settings the driver relies on against what `chaos_handler`
/// printed; the problems.
fn check_handler_settings(log_dir: &Path) -> Vec<String> {
    let Some(s) = handler_settings(log_dir) else {
        return vec![format!(
            "no 'chaos_handler: settings' line in {}",
            log_dir.join("handler-0-0.log").display()
        )];
    };
    let expected = [
        ("lease_ttl", format!("{HANDLER_LEASE:?}")),
        ("max_deliveries", HANDLER_MAX_DELIVERIES.to_string()),
        ("batch_size", HANDLER_BATCH_SIZE.to_string()),
        ("workers", HANDLER_WORKERS.to_string()),
    ];
    expected
        .into_iter()
        .filter(|(k, v)| s.get(*k) != Some(v))
        .map(|(k, v)| {
            format!(
                "chaos_handler runs with {k}={}, the driver assumes {v} (update the HANDLER_* constants of examples/chaos.rs)",
                s.get(k).map_or("?", String::as_str)
            )
        })
        .collect()
}

/// The duplicates the run may produce: the rows an instance can have sent
/// and not yet acknowledged (workers x batch size), once for each instance
/// killed or crashed, and for both instances once per PostgreSQL restart and
/// once per write timeout (plus one) that Kafka was restarting or paused
/// (sends that timed out may still be written when the broker comes back).
fn duplicate_bound(mode: Mode, kills: u32, crashes: u32, stats: &ChaosStats) -> (u64, String) {
    let per_instance = match mode {
        Mode::Relay => RELAY_WORKERS * RELAY_BATCH_SIZE,
        // What the stream has in flight, plus 100 ms of acks not yet
        // confirmed to the server (at most a batch per 5 ms here).
        Mode::Log => LOG_MAX_IN_FLIGHT + 20 * RELAY_BATCH_SIZE,
        Mode::Handler => HANDLER_WORKERS * HANDLER_BATCH_SIZE,
    };
    let rounds =
        |d: &Duration| (d.as_secs_f64() / mode.write_timeout().as_secs_f64()).ceil() as u64 + 1;
    let restart_rounds: u64 = stats.kafka_outages.iter().map(rounds).sum();
    let pause_rounds: u64 = stats.kafka_pauses.iter().map(rounds).sum();
    let units = u64::from(kills)
        + u64::from(crashes)
        + 2 * (restart_rounds + pause_rounds + u64::from(stats.pg_restarts));
    (
        per_instance * units,
        format!(
            "{per_instance} in flight per instance x ({kills} kills + {crashes} crashes + 2 x ({restart_rounds} Kafka restart rounds + {pause_rounds} pause rounds + {} PostgreSQL restarts))",
            stats.pg_restarts
        ),
    )
}

async fn run_mode(mode: Mode, o: &Opts, rng: &mut Rng) -> Result<Report, BoxError> {
    let start = Instant::now();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let db_name = format!("outbox_chaos_{}", mode.name());
    println!(
        "chaos: == mode {} == N={} window={}s lease={}s run={run} database={db_name}",
        mode.name(),
        o.n,
        o.window.as_secs(),
        mode.lease().as_secs()
    );
    let (pool, url) = fresh_database(&db_name).await?;
    let topic = match mode {
        Mode::Relay => format!("chaos.relay.{run}"),
        Mode::Log => format!("chaos.log.{run}"),
        Mode::Handler => HANDLER_TOPIC.to_owned(),
    };
    fresh_topic(&topic, mode == Mode::Handler).await?;

    let log_dir = repo_dir().join("target").join("chaos");
    std::fs::create_dir_all(&log_dir)?;
    let mut env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), url.clone()),
        ("KAFKA_BROKERS".into(), kafka_brokers()),
        ("RUST_LOG".into(), "warn".into()),
    ];
    let bin = match mode {
        Mode::Relay | Mode::Log => {
            env.extend([
                (
                    "PUBLISHER_URL".into(),
                    format!("kafka://{}", kafka_brokers()),
                ),
                ("TOPIC_MAP".into(), format!("{QUEUE}:{topic}")),
                // Never dead-letter because a service was down for a while.
                ("RETRY_MAX_ATTEMPTS".into(), "100000".into()),
                ("RETRY_INITIAL_DELAY".into(), "200ms".into()),
                ("RETRY_MAX_DELAY".into(), "2s".into()),
                (
                    "KAFKA_WRITE_TIMEOUT".into(),
                    format!("{}s", RELAY_WRITE_TIMEOUT.as_secs()),
                ),
                // The defaults, spelled out: the duplicate bound uses them.
                ("RELAY_BATCH_SIZE".into(), RELAY_BATCH_SIZE.to_string()),
                ("RELAY_WORKERS".into(), RELAY_WORKERS.to_string()),
            ]);
            if mode == Mode::Log {
                env.extend([
                    ("CAPTURE".into(), "log".into()),
                    ("CAPTURE_SLOT".into(), LOG_SLOT.into()),
                    (
                        "CAPTURE_MAX_IN_FLIGHT".into(),
                        LOG_MAX_IN_FLIGHT.to_string(),
                    ),
                    // Two relays on one host.
                    ("METRICS_ADDR".into(), "off".into()),
                ]);
                // The slot exists before the first number is published.
                outbox::stream::create_slot(&pool, &Tables::default(), LOG_SLOT, "outbox_relay")
                    .await?;
            }
            o.relay_bin.clone()
        }
        Mode::Handler => {
            env.push((
                "KAFKA_WRITE_TIMEOUT".into(),
                format!("{}s", HANDLER_WRITE_TIMEOUT.as_secs()),
            ));
            o.handler_bin.clone()
        }
    };
    let log = EventLog::new(start);
    let poison_expected = o.poison && mode == Mode::Handler;
    let fleet = Arc::new(Mutex::new(Fleet {
        mode,
        bin,
        env,
        log_dir: log_dir.clone(),
        instances: Vec::new(),
        kills: 0,
        poison_expected,
        poison_crashes: 0,
        unexpected_exits: Vec::new(),
        log: log.clone(),
    }));
    fleet.lock().await.start(2)?;

    // Supervisor: restarts (and records) instances that died on their own.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let sup = {
        let fleet = fleet.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                    _ = stop_rx.changed() => return,
                }
                if let Err(e) = fleet.lock().await.supervise() {
                    eprintln!("chaos: supervise: {e}");
                }
            }
        })
    };

    let stats = Arc::new(PublishStats::default());
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let publish = tokio::spawn(publisher(
        pool.clone(),
        capture_of(mode),
        run.clone(),
        o.n,
        o.window,
        stats.clone(),
        done_rx,
    ));
    let events = schedule(o, mode, rng);
    let chaos_task = tokio::spawn(chaos(ChaosCtx {
        fleet: fleet.clone(),
        events,
        rng: Rng(rng.next() | 1),
        log: log.clone(),
        pool: pool.clone(),
        run: run.clone(),
        lease: mode.lease(),
        done: done_tx,
    }));
    publish.await?;
    let publish_time = start.elapsed();
    println!(
        "chaos: {} published {} numbers",
        stamp(start),
        stats.committed.load(Ordering::Relaxed)
    );
    let chaos_stats = chaos_task.await?;

    // Drain: wait until the outbox is empty (and, in log mode, the slot is
    // confirmed up to everything published).
    let drain_start = Instant::now();
    let mut last_print = Instant::now();
    let mut problems = Vec::new();
    let published_to: String =
        retrying("read the WAL position", Duration::from_secs(60), || async {
            Ok(
                sqlx::query_scalar::<_, String>("SELECT pg_current_wal_lsn()::text")
                    .fetch_one(&pool)
                    .await?,
            )
        })
        .await?;
    loop {
        let confirmed = mode != Mode::Log
            || sqlx::query_scalar::<_, bool>(
                "SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
            )
            .bind(&published_to)
            .bind(LOG_SLOT)
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
            .unwrap_or(false);
        match scalar(&pool, "SELECT count(*) FROM outbox").await {
            Ok(0) if confirmed => break,
            Ok(0) => {
                if last_print.elapsed() > Duration::from_secs(5) {
                    println!(
                        "chaos: {} the slot is not confirmed up to {published_to} yet",
                        stamp(start)
                    );
                    last_print = Instant::now();
                }
            }
            Ok(left) => {
                if last_print.elapsed() > Duration::from_secs(5) {
                    println!("chaos: {} {left} rows still in the outbox", stamp(start));
                    last_print = Instant::now();
                }
            }
            Err(e) => eprintln!("chaos: count outbox: {e}"),
        }
        if drain_start.elapsed() > o.drain_timeout {
            problems.push(format!(
                "the outbox did not drain within {}s",
                o.drain_timeout.as_secs()
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let drain_time = drain_start.elapsed();
    let _ = stop_tx.send(true);
    let _ = sup.await;
    let mut f = fleet.lock().await;
    for (idx, r) in f.stop_all().await.into_iter().enumerate() {
        if let Err(e) = r {
            problems.push(format!("unclean stop of instance {idx}: {e}"));
        }
    }
    problems.extend(f.unexpected_exits.iter().cloned());
    problems.extend(chaos_stats.restart_failures.iter().cloned());
    let kills = f.kills;
    let poison_crashes = f.poison_crashes;
    drop(f);
    if mode == Mode::Handler {
        problems.extend(check_handler_settings(&log_dir));
    }

    let published = retrying("count published", Duration::from_secs(60), || {
        scalar(&pool, "SELECT count(*) FROM chaos_published")
    })
    .await? as u64;
    if published != o.n {
        problems.push(format!(
            "{published} numbers in chaos_published, {} expected",
            o.n
        ));
    }
    let outbox_left = scalar(&pool, "SELECT count(*) FROM outbox").await?;
    let dlq = scalar(&pool, "SELECT count(*) FROM outbox_dlq").await?;
    let dead_letters: Vec<DeadLetter> = sqlx::query_as(
        "SELECT original_id, payload, failure_reason, deliveries, last_error \
         FROM outbox_dlq ORDER BY id LIMIT 100",
    )
    .fetch_all(&pool)
    .await?;
    let is_poison = |original_id: i64, payload: &[u8]| {
        Some(original_id) == chaos_stats.poison_id
            || serde_json::from_slice::<Numbered>(payload)
                .is_ok_and(|v| v.n == POISON && v.run == run)
    };
    let mut poison_dead_letter = None;
    let mut others = Vec::new();
    for (original_id, payload, reason, deliveries, last_error) in &dead_letters {
        if is_poison(*original_id, payload) {
            if poison_dead_letter.is_some() {
                problems.push("the poison row was dead-lettered twice".into());
            }
            poison_dead_letter = Some((reason.clone(), *deliveries));
        } else {
            others.push(format!(
                "original id {original_id}, reason {reason}, {deliveries} deliveries: {}",
                last_error.as_deref().unwrap_or("")
            ));
        }
    }
    let other_dead_letters = dlq - i64::from(poison_dead_letter.is_some());
    if other_dead_letters > 0 {
        problems.push(format!(
            "{other_dead_letters} rows in the dead-letter table besides the poison row (first: {})",
            others.first().map_or("?", String::as_str)
        ));
    }
    let poison = chaos_stats.poison_id.map(|outbox_id| PoisonOutcome {
        outbox_id,
        crashes: poison_crashes,
        max_deliveries: HANDLER_MAX_DELIVERIES,
        dead_letter: poison_dead_letter.clone(),
    });
    if let Some(p) = &poison {
        match &p.dead_letter {
            None => problems.push(format!(
                "the poison row (outbox id {}) was not dead-lettered",
                p.outbox_id
            )),
            Some((reason, _)) if reason != "crashed" => problems.push(format!(
                "the poison row was dead-lettered as {reason:?}, not \"crashed\""
            )),
            Some(_) => {}
        }
        if p.crashes > p.max_deliveries {
            problems.push(format!(
                "the poison row crashed the instances {} times, more than max_deliveries = {}",
                p.crashes, p.max_deliveries
            ));
        }
    } else if poison_crashes > 0 {
        problems.push(format!(
            "{poison_crashes} crashes on a poison message that was not published"
        ));
    }

    let (t, r, n) = (topic.clone(), run.clone(), o.n);
    let consumed = tokio::task::spawn_blocking(move || consume(&t, &r, n)).await??;
    if consumed.lost > 0 {
        problems.push(format!(
            "{} numbers lost (first: {:?})",
            consumed.lost, consumed.first_lost
        ));
    }
    if consumed.out_of_range > 0 || consumed.unreadable > 0 {
        problems.push(format!(
            "{} messages with a number out of range, {} unreadable",
            consumed.out_of_range, consumed.unreadable
        ));
    }
    if consumed.poison > 0 {
        problems.push(format!(
            "the poison row reached the topic ({} times)",
            consumed.poison
        ));
    }
    let (duplicate_bound, duplicate_bound_why) =
        duplicate_bound(mode, kills, poison_crashes, &chaos_stats);
    if consumed.duplicates > duplicate_bound {
        problems.push(format!(
            "{} duplicates, more than the bound of {duplicate_bound} ({duplicate_bound_why})",
            consumed.duplicates
        ));
    }
    if outbox_left != 0 {
        problems.push(format!("{outbox_left} rows left in the outbox"));
    }
    pool.close().await;
    if !o.keep_db && problems.is_empty() {
        if let Err(e) = drop_database(&db_name).await {
            eprintln!("chaos: drop database {db_name}: {e}");
        }
    }
    Ok(Report {
        mode,
        n: o.n,
        published,
        failed_publish_attempts: stats.failed_attempts.load(Ordering::Relaxed),
        unknown_outcomes_committed: stats.unknown_outcomes_committed.load(Ordering::Relaxed),
        kills,
        kafka_restarts: chaos_stats.kafka_restarts,
        pg_restarts: chaos_stats.pg_restarts,
        kafka_pauses: chaos_stats.kafka_pauses.clone(),
        lease: mode.lease(),
        vacuums: chaos_stats.vacuums.clone(),
        poison,
        consumed,
        duplicate_bound,
        duplicate_bound_why,
        outbox_left,
        dlq,
        publish_time,
        drain_time,
        total_time: start.elapsed(),
        problems,
        events: log.lines(),
    })
}

fn print_report(r: &Report) {
    let c = &r.consumed;
    println!();
    println!("chaos summary, mode {}:", r.mode.name());
    println!("  N                      {}", r.n);
    println!(
        "  published (committed)  {} ({} failed publish attempts, {} of unknown outcome found committed)",
        r.published, r.failed_publish_attempts, r.unknown_outcomes_committed
    );
    println!(
        "  instances              2 at once (lease {}s)",
        r.lease.as_secs()
    );
    println!("  kill -9                {}", r.kills);
    println!(
        "  restarts               kafka {}, postgres {}",
        r.kafka_restarts, r.pg_restarts
    );
    if r.kafka_pauses.is_empty() {
        println!("  kafka paused           no");
    } else {
        for p in &r.kafka_pauses {
            println!(
                "  kafka paused           {:.1}s (kill -STOP .. -CONT; lease {}s)",
                p.as_secs_f64(),
                r.lease.as_secs()
            );
        }
    }
    if r.vacuums.is_empty() {
        println!("  VACUUM FULL outbox     no");
    } else {
        for v in &r.vacuums {
            println!(
                "  VACUUM FULL outbox     {:.2}s ({} rows, {} leased before it, {} still leased after it)",
                v.took.as_secs_f64(),
                v.rows,
                v.leased,
                v.leased_after
            );
        }
    }
    match &r.poison {
        None => println!("  poison row             none"),
        Some(p) => {
            println!(
                "  poison row             outbox id {}: {} crashes (max_deliveries {}), on the topic {} times",
                p.outbox_id, p.crashes, p.max_deliveries, c.poison
            );
            match &p.dead_letter {
                Some((reason, deliveries)) => {
                    println!("  poison dead letter     reason {reason}, {deliveries} deliveries")
                }
                None => println!("  poison dead letter     MISSING"),
            }
        }
    }
    println!("  events:");
    for e in &r.events {
        println!("    {e}");
    }
    println!(
        "  consumed               {} messages ({} of this run, {} of other runs)",
        c.messages, c.of_this_run, c.other_runs
    );
    println!("  lost                   {}", c.lost);
    println!(
        "  duplicates             {} ({} numbers delivered more than once; bound {})",
        c.duplicates, c.duplicated_numbers, r.duplicate_bound
    );
    println!("    bound: {}", r.duplicate_bound_why);
    println!("  outbox left / dlq      {} / {}", r.outbox_left, r.dlq);
    println!(
        "  time                   {:.1}s (publish {:.1}s, drain {:.1}s)",
        r.total_time.as_secs_f64(),
        r.publish_time.as_secs_f64(),
        r.drain_time.as_secs_f64()
    );
    if r.problems.is_empty() {
        println!("  result                 OK");
    } else {
        println!("  result                 FAILED");
        for p in &r.problems {
            println!("    - {p}");
        }
    }
}

/// SIGINT or SIGTERM: resume the Kafka broker if a pause has it stopped, then
/// exit (130 or 143).
fn resume_broker_on_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("chaos: cannot install the signal handlers");
        return;
    };
    tokio::spawn(async move {
        let code = tokio::select! {
            _ = int.recv() => 130,
            _ = term.recv() => 143,
        };
        let pid = STOPPED_BROKER.swap(0, Ordering::SeqCst);
        if pid != 0 {
            match resume_broker(pid) {
                Ok(()) => eprintln!("chaos: interrupted; resumed the Kafka broker (pid {pid})"),
                Err(e) => eprintln!("chaos: interrupted; {e}: resume it by hand"),
            }
        } else {
            eprintln!("chaos: interrupted");
        }
        std::process::exit(code);
    });
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("chaos: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    resume_broker_on_signal();
    println!(
        "chaos: N={} modes={:?} window={}s restarts={} kills={} poison={} vacuum={} seed={}",
        o.n,
        o.modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
        o.window.as_secs(),
        o.restarts,
        o.kills,
        o.poison,
        o.vacuum,
        o.seed
    );
    let mut rng = Rng(o.seed);
    let mut failed = false;
    let mut reports = Vec::new();
    for &mode in &o.modes {
        match run_mode(mode, &o, &mut rng).await {
            Ok(r) => {
                failed |= !r.problems.is_empty();
                print_report(&r);
                reports.push(r);
            }
            Err(e) => {
                eprintln!("chaos: mode {} failed: {e}", mode.name());
                failed = true;
            }
        }
    }
    println!();
    println!(
        "chaos: mode     N        kills  crashes  kafka  pg  pause  vacuum  lost  duplicates (bound)  dlq          time"
    );
    for r in &reports {
        let crashes = r.poison.as_ref().map_or("-".to_owned(), |p| {
            format!("{}/{}", p.crashes, p.max_deliveries)
        });
        let pause = r
            .kafka_pauses
            .iter()
            .map(|p| format!("{:.0}s", p.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(",");
        let vacuum = r
            .vacuums
            .iter()
            .map(|v| format!("{:.2}s", v.took.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(",");
        let dlq = match r.poison.as_ref().and_then(|p| p.dead_letter.as_ref()) {
            Some((reason, _)) if r.dlq == 1 => format!("1 {reason}"),
            _ => r.dlq.to_string(),
        };
        println!(
            "chaos: {:<8} {:<8} {:<6} {:<8} {:<6} {:<3} {:<6} {:<7} {:<5} {:<19} {:<12} {:.1}s",
            r.mode.name(),
            r.n,
            r.kills,
            crashes,
            r.kafka_restarts,
            r.pg_restarts,
            if pause.is_empty() { "-" } else { &pause },
            if vacuum.is_empty() { "-" } else { &vacuum },
            r.consumed.lost,
            format!("{} ({})", r.consumed.duplicates, r.duplicate_bound),
            dlq,
            r.total_time.as_secs_f64()
        );
    }
    if failed {
        println!("chaos: FAILED");
        std::process::ExitCode::FAILURE
    } else {
        println!("chaos: OK");
        std::process::ExitCode::SUCCESS
    }
}
