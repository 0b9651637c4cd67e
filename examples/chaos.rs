//! The chaos run: at-least-once delivery while things break.
//!
//! For each mode (`relay`: two `outbox-relay` processes; `handler`: two
//! `chaos_handler` processes, a subscriber with a stacked `#[kafka::publisher]`)
//! the driver publishes N uniquely numbered messages, each in the same
//! transaction as a business row (`chaos_published`), and meanwhile:
//!
//! * `kill -9`s one of the two instances 3 times at random moments, starting
//!   it again each time,
//! * restarts Kafka twice and PostgreSQL once (`scripts/services restart ...`),
//!
//! then waits until the outbox is empty, stops both instances with SIGTERM and
//! reads the topic with a fresh consumer from the beginning (up to the high
//! watermarks). It prints per mode: N, kills, restarts, lost, duplicates and
//! times, and exits non-zero when a number is lost, the outbox or the
//! dead-letter table is not empty, or an instance crashed or stopped uncleanly.
//!
//! The publisher survives the PostgreSQL restart: a failed transaction is
//! retried; when the outcome of a commit is unknown the business rows are
//! looked up, so a number counts as published exactly when its commit
//! succeeded.
//!
//! ```text
//! scripts/chaos                 # full run: 200,000 per mode, both modes
//! scripts/chaos --bounded       # CI: 20,000 per mode
//! cargo run --release --example chaos -- --n 2000 --mode relay --no-restarts
//! ```
//!
//! Options: `--n N`, `--mode relay|handler|both`, `--window SECS` (the
//! publishing time the events are spread over), `--no-restarts` (kills only,
//! leaves the shared services alone), `--no-kills`, `--seed S`,
//! `--drain-timeout SECS`, `--relay-bin PATH`, `--handler-bin PATH`,
//! `--keep-db`. Environment: `DATABASE_URL` (admin URL; the run uses databases
//! `outbox_chaos_relay` and `outbox_chaos_handler` next to it), `KAFKA_BROKERS`,
//! `OUTBOX_REPO` (for `scripts/services`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::{Message, Outbox, Tables};
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
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Relay => "relay",
            Mode::Handler => "handler",
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
    seed: u64,
    drain_timeout: Duration,
    relay_bin: PathBuf,
    handler_bin: PathBuf,
    keep_db: bool,
}

fn usage() -> &'static str {
    "usage: chaos [--n N] [--mode relay|handler|both] [--window SECS] [--no-restarts] [--no-kills] \
     [--seed S] [--drain-timeout SECS] [--relay-bin PATH] [--handler-bin PATH] [--keep-db]"
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
        modes: vec![Mode::Relay, Mode::Handler],
        window: Duration::from_secs(60),
        restarts: true,
        kills: true,
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
                    "handler" => vec![Mode::Handler],
                    "both" => vec![Mode::Relay, Mode::Handler],
                    other => {
                        return Err(format!(
                            "--mode: {other:?} is not one of relay, handler, both"
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
    for (mode, bin) in [(Mode::Relay, &o.relay_bin), (Mode::Handler, &o.handler_bin)] {
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
    Ok((pool, url))
}

async fn drop_database(name: &str) -> Result<(), BoxError> {
    let mut admin = PgConnection::connect(&database_url()).await?;
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
async fn publish_once(pool: &PgPool, run: &str, nums: &[i64]) -> Result<(), BoxError> {
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
    Outbox::default().publish_batch(&mut *tx, msgs).await?;
    tx.commit().await?;
    Ok(())
}

/// Publishes `nums` until a commit is known to have succeeded.
async fn publish_confirmed(pool: &PgPool, run: &str, nums: &[i64], stats: &PublishStats) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let error = match publish_once(pool, run, nums).await {
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

/// Publishes 0..n in transactions of [`BATCH`], paced over `window`. The last
/// 5 % wait until the chaos task is done, so every event hits a publisher
/// that is still at work.
async fn publisher(
    pool: PgPool,
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
        publish_confirmed(&pool, &run, &nums, &stats).await;
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

struct Instance {
    child: Child,
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
    unexpected_exits: Vec<String>,
}

impl Fleet {
    fn spawn(&self, idx: usize, generation: u32) -> Result<Child, BoxError> {
        let log_path = self
            .log_dir
            .join(format!("{}-{idx}-{generation}.log", self.mode.name()));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(&self.bin);
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        Ok(cmd.spawn()?)
    }

    fn start(&mut self, count: usize) -> Result<(), BoxError> {
        for idx in 0..count {
            let child = self.spawn(idx, 0)?;
            self.instances.push(Instance {
                child,
                spawned: 0,
                killed: false,
            });
        }
        Ok(())
    }

    /// Restarts instances that exited on their own (a crash: recorded).
    fn supervise(&mut self) -> Result<(), BoxError> {
        for idx in 0..self.instances.len() {
            if self.instances[idx].killed {
                continue;
            }
            if let Some(status) = self.instances[idx].child.try_wait()? {
                let generation = self.instances[idx].spawned + 1;
                self.unexpected_exits.push(format!(
                    "{} instance {idx} (start {}) exited on its own: {status}; log {}",
                    self.mode.name(),
                    self.instances[idx].spawned,
                    self.log_dir
                        .join(format!(
                            "{}-{idx}-{}.log",
                            self.mode.name(),
                            self.instances[idx].spawned
                        ))
                        .display()
                ));
                self.instances[idx] = Instance {
                    child: self.spawn(idx, generation)?,
                    spawned: generation,
                    killed: false,
                };
            }
        }
        Ok(())
    }

    async fn kill9(&mut self, idx: usize) -> Result<(), BoxError> {
        let inst = &mut self.instances[idx];
        inst.child.start_kill()?;
        inst.child.wait().await?;
        inst.killed = true;
        self.kills += 1;
        Ok(())
    }

    fn respawn(&mut self, idx: usize) -> Result<(), BoxError> {
        let generation = self.instances[idx].spawned + 1;
        self.instances[idx] = Instance {
            child: self.spawn(idx, generation)?,
            spawned: generation,
            killed: false,
        };
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
}

#[derive(Default, Debug)]
struct ChaosStats {
    kafka_restarts: u32,
    pg_restarts: u32,
    restart_failures: Vec<String>,
    log: Vec<String>,
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

/// Runs the events one after the other, each after its pause; says when done.
async fn chaos(
    fleet: Arc<Mutex<Fleet>>,
    events: Vec<(Duration, Event)>,
    mut rng: Rng,
    start: Instant,
    done: tokio::sync::watch::Sender<bool>,
) -> ChaosStats {
    let mut stats = ChaosStats::default();
    for (pause, event) in events {
        tokio::time::sleep(pause).await;
        match event {
            Event::Kill => {
                let mut f = fleet.lock().await;
                let idx = rng.below(f.instances.len());
                let pid = f.instances[idx].child.id().unwrap_or(0);
                if let Err(e) = f.kill9(idx).await {
                    stats.restart_failures.push(format!("kill -9 {pid}: {e}"));
                    continue;
                }
                let line = format!("{} kill -9 instance {idx} (pid {pid})", stamp(start));
                println!("chaos: {line}");
                stats.log.push(line);
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
                println!("chaos: {} restarting {service}", stamp(start));
                match services("restart", service).await {
                    Ok(took) => {
                        let line = format!(
                            "{} restarted {service} (took {:.1}s)",
                            stamp(start),
                            took.as_secs_f64()
                        );
                        println!("chaos: {line}");
                        stats.log.push(line);
                        if service == "kafka" {
                            stats.kafka_restarts += 1;
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
        }
    }
    let _ = done.send(true);
    stats
}

/// The events in random order, each with a random pause before it: the first
/// after 10 % to 20 % of the window, the others spread over about half of it.
fn schedule(o: &Opts, rng: &mut Rng) -> Vec<(Duration, Event)> {
    let mut events = Vec::new();
    if o.kills {
        events.extend([Event::Kill; 3]);
    }
    if o.restarts {
        events.extend([
            Event::Restart("kafka"),
            Event::Restart("kafka"),
            Event::Restart("postgres"),
        ]);
    }
    for i in (1..events.len()).rev() {
        let j = rng.below(i + 1);
        events.swap(i, j);
    }
    let slot = o.window.mul_f64(0.5 / events.len().max(1) as f64);
    events
        .into_iter()
        .enumerate()
        .map(|(k, e)| {
            let pause = if k == 0 {
                o.window.mul_f64(0.1 + 0.1 * rng.unit())
            } else {
                slot.mul_f64(2.0 * rng.unit())
            };
            (pause, e)
        })
        .collect()
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
        match counts.get_mut(v.n as usize) {
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
    consumed: Consumed,
    outbox_left: i64,
    dlq: i64,
    publish_time: Duration,
    drain_time: Duration,
    total_time: Duration,
    problems: Vec<String>,
    events: Vec<String>,
}

async fn run_mode(mode: Mode, o: &Opts, rng: &mut Rng) -> Result<Report, BoxError> {
    let start = Instant::now();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let db_name = format!("outbox_chaos_{}", mode.name());
    println!(
        "chaos: == mode {} == N={} window={}s run={run} database={db_name}",
        mode.name(),
        o.n,
        o.window.as_secs()
    );
    let (pool, url) = fresh_database(&db_name).await?;
    let topic = match mode {
        Mode::Relay => format!("chaos.relay.{run}"),
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
        Mode::Relay => {
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
                ("KAFKA_WRITE_TIMEOUT".into(), "10s".into()),
            ]);
            o.relay_bin.clone()
        }
        Mode::Handler => {
            env.push(("KAFKA_WRITE_TIMEOUT".into(), "8s".into()));
            o.handler_bin.clone()
        }
    };
    let fleet = Arc::new(Mutex::new(Fleet {
        mode,
        bin,
        env,
        log_dir: log_dir.clone(),
        instances: Vec::new(),
        kills: 0,
        unexpected_exits: Vec::new(),
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
        run.clone(),
        o.n,
        o.window,
        stats.clone(),
        done_rx,
    ));
    let events = schedule(o, rng);
    let chaos_task = tokio::spawn(chaos(
        fleet.clone(),
        events,
        Rng(rng.next() | 1),
        start,
        done_tx,
    ));
    publish.await?;
    let publish_time = start.elapsed();
    println!(
        "chaos: {} published {} numbers",
        stamp(start),
        stats.committed.load(Ordering::Relaxed)
    );
    let chaos_stats = chaos_task.await?;

    // Drain: wait until the outbox is empty.
    let drain_start = Instant::now();
    let mut last_print = Instant::now();
    let mut problems = Vec::new();
    loop {
        match scalar(&pool, "SELECT count(*) FROM outbox").await {
            Ok(0) => break,
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
    drop(f);

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
    if outbox_left != 0 {
        problems.push(format!("{outbox_left} rows left in the outbox"));
    }
    if dlq != 0 {
        problems.push(format!("{dlq} rows in the dead-letter table"));
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
        consumed,
        outbox_left,
        dlq,
        publish_time,
        drain_time,
        total_time: start.elapsed(),
        problems,
        events: chaos_stats.log,
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
    println!("  instances              2 at once");
    println!("  kill -9                {}", r.kills);
    println!(
        "  restarts               kafka {}, postgres {}",
        r.kafka_restarts, r.pg_restarts
    );
    for e in &r.events {
        println!("    {e}");
    }
    println!(
        "  consumed               {} messages ({} of this run, {} of other runs)",
        c.messages, c.of_this_run, c.other_runs
    );
    println!("  lost                   {}", c.lost);
    println!(
        "  duplicates             {} ({} numbers delivered more than once)",
        c.duplicates, c.duplicated_numbers
    );
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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("chaos: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    println!(
        "chaos: N={} modes={:?} window={}s restarts={} kills={} seed={}",
        o.n,
        o.modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
        o.window.as_secs(),
        o.restarts,
        o.kills,
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
    println!("chaos: mode     N        kills  kafka  pg  lost  duplicates  time");
    for r in &reports {
        println!(
            "chaos: {:<8} {:<8} {:<6} {:<6} {:<3} {:<5} {:<11} {:.1}s",
            r.mode.name(),
            r.n,
            r.kills,
            r.kafka_restarts,
            r.pg_restarts,
            r.consumed.lost,
            r.consumed.duplicates,
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
