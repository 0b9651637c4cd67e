//! The `outbox` command line: migrations, status, dead letters, parked rows,
//! schema validation.
//!
//! The binary is a thin `main` around [`run`], which takes the arguments and a
//! [`Console`] so that it can be driven from tests:
//!
//! ```no_run
//! # async fn f() {
//! use outbox::cli::{run, Console, Exit};
//! let (mut out, mut err) = (Vec::new(), Vec::new());
//! let mut console = Console { out: &mut out, err: &mut err, input: None };
//! let exit = run(["outbox", "status", "--json"], &mut console).await;
//! assert_eq!(exit, Exit::Ok);
//! # }
//! ```
//!
//! Exit codes: 0 done, 1 runtime or database error, 2 bad usage or input (also
//! a destructive command refused for want of `--yes`), 3 `validate` found
//! problems.

mod output;
mod validate;

use crate::dlq::{DeadLetter, DeadLetters, Filter};
use crate::logging::{human, redact_url, url_secrets};
use crate::{Error, TableName, Tables};
use clap::{Args, Parser, Subcommand};
use output::{rfc3339, table, text_or_hex, Align};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::time::Duration;

/// The database the command line uses unless told otherwise.
pub const DEFAULT_DATABASE_URL: &str = "postgres://outbox:outbox@127.0.0.1:5432/outbox";

const EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  runtime or database error
  2  bad usage or input; a destructive command without --yes when standard input is not a terminal
  3  validate found problems

Environment: DATABASE_URL, OUTBOX_TABLE, DLQ_TABLE, RUST_LOG (default warn), LOG_FORMAT (text|json).";

/// How a run of the command line ended; [`Exit::code`] is the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exit {
    /// 0: done.
    Ok,
    /// 1: a runtime or database error (the message says which).
    Failed,
    /// 2: bad usage or input, or a destructive command refused without `--yes`.
    Usage,
    /// 3: `validate` found problems.
    Problems,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::Problems => 3,
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}

/// Where a run writes and reads.
pub struct Console<'a> {
    /// Results (tables, JSON).
    pub out: &'a mut dyn Write,
    /// Errors, prompts and notes.
    pub err: &'a mut dyn Write,
    /// Answers to confirmation prompts: `Some` only when a person is there to
    /// answer (standard input is a terminal). With `None`, a destructive
    /// command needs `--yes`.
    pub input: Option<&'a mut dyn BufRead>,
}

impl std::fmt::Debug for Console<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("interactive", &self.input.is_some())
            .finish_non_exhaustive()
    }
}

/// Operate a transactional outbox in PostgreSQL: migrate the schema, watch the
/// queues, inspect and replay dead letters.
#[derive(Debug, Parser)]
#[command(name = "outbox", version, after_help = EXIT_CODES)]
struct Cli {
    /// PostgreSQL URL [default: postgres://outbox:***@127.0.0.1:5432/outbox]
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL,
        hide_default_value = true,
        hide_env_values = true,
        global = true,
        help_heading = "Global options"
    )]
    database_url: String,
    /// The outbox table (optionally schema-qualified)
    #[arg(
        long,
        env = "OUTBOX_TABLE",
        default_value = "outbox",
        global = true,
        help_heading = "Global options"
    )]
    table: String,
    /// The dead-letter table
    #[arg(
        long,
        env = "DLQ_TABLE",
        default_value = "outbox_dlq",
        global = true,
        help_heading = "Global options"
    )]
    dlq_table: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or upgrade the outbox and dead-letter tables
    Migrate,
    /// Rows per queue: pending, in flight, parked, age of the oldest, dead letters
    Status {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Dead letters: list, show, replay into the outbox, purge
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Rows parked in the outbox (failed for good with no dead-letter table)
    #[command(subcommand)]
    Parked(ParkedCommand),
    /// Check that the live schema is what this version expects, and advise on
    /// table settings
    Validate,
    /// The replication slot of log capture: status, create, drop
    #[command(subcommand)]
    Slot(SlotCommand),
}

#[derive(Debug, Subcommand)]
enum SlotCommand {
    /// The slot's state: WAL kept back, confirmed position, its reader
    Status {
        /// The slot's name
        #[arg(default_value = "outbox_relay")]
        slot: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Create the slot (and its publication when missing); a relay with
    /// CAPTURE=log streams from it. It starts at the current position
    Create {
        /// The slot's name
        #[arg(default_value = "outbox_relay")]
        slot: String,
        /// The publication's name
        #[arg(long, default_value = "outbox_relay")]
        publication: String,
    },
    /// Drop the slot: whatever it has not confirmed is given up (asks first)
    Drop {
        /// The slot's name
        #[arg(default_value = "outbox_relay")]
        slot: String,
        /// Do not ask for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its payload and headers
    Show {
        /// Its id in the dead-letter table
        id: i64,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back into the outbox as new rows (asks first when
    /// more than one matches)
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many, oldest first
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
        /// Do not ask for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Delete dead letters for good (asks first)
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        /// Do not ask for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

#[derive(Debug, Args)]
struct FilterArgs {
    /// Only this queue
    #[arg(long)]
    queue: Option<String>,
    /// Only ids from this one on (dead-letter table ids)
    #[arg(long)]
    id_from: Option<i64>,
    /// Only ids up to this one
    #[arg(long)]
    id_to: Option<i64>,
    /// Only rows that failed within this long ago: 30s, 15m, 1h, 2d, 1w, 1h30m
    #[arg(long, value_parser = parse_ago)]
    since: Option<Duration>,
}

#[derive(Debug, Subcommand)]
enum ParkedCommand {
    /// List parked rows, oldest first
    List {
        /// Only this queue
        #[arg(long)]
        queue: Option<String>,
        /// At most this many
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Make parked rows pending again with a fresh retry budget (asks first
    /// when more than one matches)
    Replay {
        /// Only this queue
        #[arg(long)]
        queue: Option<String>,
        /// Only these row ids (repeat the option for several)
        #[arg(long = "id")]
        ids: Vec<i64>,
        /// At most this many, oldest first
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
        /// Do not ask for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// Parses a duration ago: one or more `<number><unit>` with units `s`, `m`,
/// `h`, `d`, `w` (`90s`, `1h30m`, `2d`).
fn parse_ago(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "invalid duration {s:?}: accepted: numbers with a unit s, m, h, d or w, such as 30m, 1h, 1h30m or 2d"
        )
    };
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut any = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        num.clear();
        any = true;
    }
    if !num.is_empty() || !any {
        return Err(bad());
    }
    if total > 100 * 365 * 86_400 {
        return Err(format!("{}: at most 100 years are accepted", bad()));
    }
    Ok(Duration::from_secs(total))
}

/// A failure: what to print and how to exit.
struct Fail(Exit, String);

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(m) => Fail(Exit::Usage, m),
            e => Fail(Exit::Failed, e.to_string()),
        }
    }
}

type Res = Result<Exit, Fail>;

/// Runs the command line with `args` (the first is the program name) and
/// returns how it ended. Never panics on bad input and never exits the process.
pub async fn run<I, T>(args: I, console: &mut Console<'_>) -> Exit
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let help = matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion);
            let rendered = e.render().to_string();
            let sink = if help {
                &mut *console.out
            } else {
                &mut *console.err
            };
            let _ = sink.write_all(rendered.as_bytes());
            return if help { Exit::Ok } else { Exit::Usage };
        }
    };
    match execute(cli, console).await {
        Ok(exit) => exit,
        Err(Fail(exit, msg)) => {
            let _ = writeln!(console.err, "error: {msg}");
            exit
        }
    }
}

/// The binary's `main`: logs to standard error (`RUST_LOG`, default `warn`;
/// `LOG_FORMAT`), asks for confirmations only on a terminal, runs [`run`].
pub async fn main() -> std::process::ExitCode {
    use std::io::IsTerminal;
    let format = match crate::logging::LogFormat::from_env("LOG_FORMAT") {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return Exit::Usage.into();
        }
    };
    if let Err(e) = crate::logging::install(format, "warn", std::io::stderr) {
        eprintln!("error: {e}");
        return Exit::Usage.into();
    }
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let stdin = std::io::stdin();
    let mut out = stdout.lock();
    let mut err = stderr.lock();
    let mut input = stdin.lock();
    let interactive = stdin.is_terminal() && stderr.is_terminal();
    let mut console = Console {
        out: &mut out,
        err: &mut err,
        input: if interactive { Some(&mut input) } else { None },
    };
    let exit = run(std::env::args_os(), &mut console).await;
    let _ = console.out.flush();
    exit.into()
}

async fn execute(cli: Cli, console: &mut Console<'_>) -> Res {
    let tables = Tables::new(&cli.table, Some(&cli.dlq_table))?;
    let pool = connect(&cli.database_url).await?;
    let r = match cli.command {
        Command::Migrate => migrate(&pool, &tables, console).await,
        Command::Status { json } => status(&pool, &tables, json, console).await,
        Command::Dlq(cmd) => dlq(&pool, &tables, cmd, console).await,
        Command::Parked(cmd) => parked(&pool, &tables, cmd, console).await,
        Command::Validate => validate::run(&pool, &tables, console).await,
        Command::Slot(cmd) => slot(&pool, &tables, cmd, console).await,
    };
    pool.close().await;
    r
}

async fn connect(url: &str) -> Result<PgPool, Fail> {
    use sqlx::postgres::{PgConnectOptions, PgConnection};
    use sqlx::{ConnectOptions, Connection};
    let opts: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
        let mut e = e.to_string();
        for secret in url_secrets(url) {
            e = e.replace(&secret, "***");
        }
        Fail(
            Exit::Usage,
            format!(
                "invalid --database-url {}: {e} (accepted: postgres://user:password@host:port/database)",
                redact_url(url)
            ),
        )
    })?;
    let failed = |e: String| {
        // The driver's message should not quote the URL; make sure of it.
        let mut e = e;
        for secret in url_secrets(url) {
            e = e.replace(&secret, "***");
        }
        Fail(
            Exit::Failed,
            format!("cannot connect to the database at {}: {e}", redact_url(url)),
        )
    };
    // One plain connection first: a pool would retry until its timeout and
    // then report only that it timed out, not why.
    let conn: PgConnection = tokio::time::timeout(Duration::from_secs(10), opts.clone().connect())
        .await
        .map_err(|_| failed("no answer within 10 s".into()))?
        .map_err(|e| failed(e.to_string()))?;
    let _ = conn.close().await;
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(opts))
}

fn io(e: std::io::Error) -> Fail {
    Fail(Exit::Failed, format!("cannot write the output: {e}"))
}

fn json_out(console: &mut Console<'_>, v: &serde_json::Value) -> Result<(), Fail> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Fail(Exit::Failed, e.to_string()))?;
    writeln!(console.out, "{s}").map_err(io)
}

/// Asks before a destructive step; `Err` when it must not go ahead.
fn confirm(console: &mut Console<'_>, yes: bool, what: &str) -> Result<(), Fail> {
    if yes {
        return Ok(());
    }
    let Some(input) = console.input.as_deref_mut() else {
        return Err(Fail(
            Exit::Usage,
            format!(
                "refusing to {what} without confirmation: standard input is not a terminal; \
                 pass --yes to go ahead"
            ),
        ));
    };
    write!(console.err, "{what}? [y/N] ").map_err(io)?;
    console.err.flush().map_err(io)?;
    let mut answer = String::new();
    input.read_line(&mut answer).map_err(io)?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(Fail(Exit::Failed, "aborted: nothing was changed".into())),
    }
}

async fn require_table(pool: &PgPool, t: &TableName, what: &str) -> Result<(), Fail> {
    if crate::metrics::table_exists(pool, t).await? {
        Ok(())
    } else {
        Err(Fail(
            Exit::Failed,
            format!("{what} table {t} does not exist: run `outbox migrate` (or pass --table / --dlq-table)"),
        ))
    }
}

async fn migrate(pool: &PgPool, tables: &Tables, console: &mut Console<'_>) -> Res {
    crate::migrate(pool, tables).await?;
    let (o, d) = crate::expected_versions();
    let dlq = tables
        .dlq
        .as_ref()
        .map_or(String::new(), |t| format!(", dead letters {t} at v{d}"));
    writeln!(
        console.out,
        "migrated: outbox {} at v{o}{dlq}",
        tables.outbox
    )
    .map_err(io)?;
    Ok(Exit::Ok)
}

async fn slot(pool: &PgPool, tables: &Tables, cmd: SlotCommand, console: &mut Console<'_>) -> Res {
    use crate::stream;
    match cmd {
        SlotCommand::Status { slot, json } => {
            stream::validate_slot_name("slot", &slot)?;
            let s = stream::slot_status(pool, &slot).await?;
            if json {
                json_out(
                    console,
                    &serde_json::json!({
                        "slot": s.slot,
                        "exists": s.exists,
                        "recorded": s.recorded,
                        "wal_status": s.wal_status,
                        "active_pid": s.active_pid,
                        "confirmed_lsn": s.confirmed_lsn,
                        "lag_bytes": s.lag_bytes,
                        "plugin": s.plugin,
                        "other_database": s.other_database,
                    }),
                )?;
                return Ok(Exit::Ok);
            }
            if !s.exists {
                let why = if s.recorded {
                    "it was created for this outbox and is gone: messages since its last confirmation may be lost; see `outbox slot create`"
                } else {
                    "a relay with CAPTURE=log creates it on its first start, or run `outbox slot create`"
                };
                writeln!(console.out, "slot {slot}: does not exist ({why})").map_err(io)?;
                return Ok(Exit::Ok);
            }
            let or = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            let lines = [
                ("slot", s.slot.clone()),
                (
                    "database",
                    or(s.other_database.clone().or(Some("this one".into()))),
                ),
                ("plugin", or(s.plugin.clone())),
                ("wal_status", or(s.wal_status.clone())),
                ("confirmed", or(s.confirmed_lsn.clone())),
                (
                    "kept back",
                    s.lag_bytes
                        .map_or("-".into(), |b| format!("{b} bytes of WAL")),
                ),
                (
                    "reader",
                    s.active_pid.map_or("none".into(), |p| format!("pid {p}")),
                ),
            ];
            for (k, v) in lines {
                writeln!(console.out, "{k:<11} {v}").map_err(io)?;
            }
            Ok(Exit::Ok)
        }
        SlotCommand::Create { slot, publication } => {
            let lsn = stream::create_slot(pool, tables, &slot, &publication).await?;
            writeln!(
                console.out,
                "created slot {slot} (publication {publication}) at {lsn}: log messages from here on are streamed by a relay with CAPTURE=log CAPTURE_SLOT={slot}"
            )
            .map_err(io)?;
            Ok(Exit::Ok)
        }
        SlotCommand::Drop { slot, yes } => {
            stream::validate_slot_name("slot", &slot)?;
            confirm(
                console,
                yes,
                &format!("drop slot {slot} (messages it has not confirmed are given up)"),
            )?;
            let had = stream::drop_slot(pool, &slot).await?;
            let what = if had {
                "dropped"
            } else {
                "had no such slot; its record is removed"
            };
            writeln!(console.out, "slot {slot}: {what}").map_err(io)?;
            Ok(Exit::Ok)
        }
    }
}

async fn status(pool: &PgPool, tables: &Tables, json: bool, console: &mut Console<'_>) -> Res {
    require_table(pool, &tables.outbox, "outbox").await?;
    let dlqs: Vec<TableName> = tables.dlq.iter().cloned().collect();
    let queues = crate::metrics::snapshot(pool, tables, &dlqs).await?;
    if json {
        json_out(
            console,
            &serde_json::to_value(&queues).map_err(|e| Fail(Exit::Failed, e.to_string()))?,
        )?;
        return Ok(Exit::Ok);
    }
    if queues.is_empty() {
        writeln!(
            console.out,
            "no rows: the outbox {} and its dead letters are empty",
            tables.outbox
        )
        .map_err(io)?;
        return Ok(Exit::Ok);
    }
    let rows = queues
        .iter()
        .map(|q| {
            vec![
                q.queue.clone(),
                q.pending.to_string(),
                q.in_flight.to_string(),
                q.parked.to_string(),
                if q.pending + q.in_flight > 0 {
                    human(Duration::from_secs_f64(q.oldest_pending_s.max(0.0)))
                } else {
                    "-".into()
                },
                q.dead_letters.to_string(),
            ]
        })
        .collect();
    let t = table(
        &[
            ("QUEUE", Align::Left),
            ("PENDING", Align::Right),
            ("IN FLIGHT", Align::Right),
            ("PARKED", Align::Right),
            ("OLDEST", Align::Right),
            ("DEAD LETTERS", Align::Right),
        ],
        rows,
    );
    write!(console.out, "{t}").map_err(io)?;
    Ok(Exit::Ok)
}

/// The library filter of the command-line options, with `--since` measured on
/// the database clock.
async fn filter(pool: &PgPool, f: FilterArgs, limit: Option<i64>) -> Result<Filter, Fail> {
    if let Some(q) = &f.queue {
        crate::validate_queue(q)?;
    }
    if let (Some(a), Some(b)) = (f.id_from, f.id_to) {
        if a > b {
            return Err(Fail(
                Exit::Usage,
                format!("--id-from {a} is above --id-to {b}: accepted: id-from <= id-to"),
            ));
        }
    }
    let since_ms = match f.since {
        Some(d) => {
            let now: i64 = sqlx::query_scalar(crate::sql::NOW_MS)
                .fetch_one(pool)
                .await
                .map_err(Error::from)?;
            Some(now - i64::try_from(d.as_millis()).unwrap_or(i64::MAX).min(now))
        }
        None => None,
    };
    Ok(Filter {
        queue: f.queue,
        min_id: f.id_from,
        max_id: f.id_to,
        since_ms,
        limit,
    })
}

/// How many dead letters match, and the highest id among them.
async fn span(pool: &PgPool, dlq: &TableName, f: &Filter) -> Result<(i64, Option<i64>), Fail> {
    let row = sqlx::query(&crate::sql::dlq_span(dlq))
        .bind(f.queue.as_deref())
        .bind(f.min_id)
        .bind(f.max_id)
        .bind(f.since_ms)
        .fetch_one(pool)
        .await
        .map_err(Error::from)?;
    Ok((
        row.try_get(0).map_err(Error::from)?,
        row.try_get(1).map_err(Error::from)?,
    ))
}

async fn dlq(pool: &PgPool, tables: &Tables, cmd: DlqCommand, console: &mut Console<'_>) -> Res {
    let dlq_table = tables
        .dlq
        .clone()
        .ok_or_else(|| Fail(Exit::Usage, "no dead-letter table given".into()))?;
    require_table(pool, &dlq_table, "dead-letter").await?;
    let dlq = DeadLetters::new(pool.clone(), tables.clone())?;
    match cmd {
        DlqCommand::List {
            filter: f,
            limit,
            json,
        } => {
            let f = filter(pool, f, Some(limit)).await?;
            let rows = dlq.list(&f).await?;
            if json {
                json_out(
                    console,
                    &serde_json::Value::Array(rows.iter().map(dead_letter_json).collect()),
                )?;
                return Ok(Exit::Ok);
            }
            if rows.is_empty() {
                writeln!(console.out, "no dead letters match").map_err(io)?;
                return Ok(Exit::Ok);
            }
            let body = rows
                .iter()
                .map(|d| {
                    vec![
                        d.id.to_string(),
                        d.original_id.to_string(),
                        d.queue.clone(),
                        rfc3339(d.failed_at_ms),
                        d.failure_reason.clone(),
                        d.attempts.to_string(),
                        output::one_line(d.last_error.as_deref().unwrap_or(""), 60),
                    ]
                })
                .collect();
            let t = table(
                &[
                    ("ID", Align::Right),
                    ("ORIGINAL ID", Align::Right),
                    ("QUEUE", Align::Left),
                    ("FAILED AT", Align::Left),
                    ("REASON", Align::Left),
                    ("ATTEMPTS", Align::Right),
                    ("LAST ERROR", Align::Left),
                ],
                body,
            );
            write!(console.out, "{t}").map_err(io)?;
            Ok(Exit::Ok)
        }
        DlqCommand::Show { id, json } => {
            let rows = dlq.list(&Filter::default().ids(id, id).limit(1)).await?;
            let Some(d) = rows.first() else {
                return Err(Fail(
                    Exit::Failed,
                    format!("no dead letter with id {id} in {dlq_table}"),
                ));
            };
            if json {
                json_out(console, &dead_letter_json(d))?;
                return Ok(Exit::Ok);
            }
            let headers = serde_json::to_string(&d.headers).unwrap_or_default();
            let out = &mut console.out;
            let lines = [
                ("id", d.id.to_string()),
                ("original id", d.original_id.to_string()),
                ("queue", d.queue.clone()),
                ("reason", d.failure_reason.clone()),
                ("last error", d.last_error.clone().unwrap_or_default()),
                ("attempts", d.attempts.to_string()),
                ("deliveries", d.deliveries.to_string()),
                ("published at", rfc3339(d.created_at_ms)),
                ("failed at", rfc3339(d.failed_at_ms)),
                ("key", d.partition_key.clone().unwrap_or_default()),
                (
                    "correlation id",
                    d.correlation_id.clone().unwrap_or_default(),
                ),
                ("headers", headers),
                ("payload", text_or_hex(&d.payload)),
            ];
            for (k, v) in lines {
                writeln!(out, "{k:<15} {v}").map_err(io)?;
            }
            Ok(Exit::Ok)
        }
        DlqCommand::Replay {
            filter: f,
            limit,
            yes,
        } => {
            let mut f = filter(pool, f, Some(limit)).await?;
            let (n, max) = span(pool, &dlq_table, &f).await?;
            let n = n.min(limit);
            if n == 0 {
                writeln!(console.out, "no dead letters match: nothing replayed").map_err(io)?;
                return Ok(Exit::Ok);
            }
            // What is replayed is what was counted: later dead letters stay.
            f.max_id = max;
            if n > 1 {
                confirm(
                    console,
                    yes,
                    &format!(
                        "replay {n} dead letters from {dlq_table} into {}",
                        tables.outbox
                    ),
                )?;
            }
            let ids = dlq.replay(&f).await?;
            writeln!(
                console.out,
                "replayed {} dead letters into {} (as rows {}, their original ids)",
                ids.len(),
                tables.outbox,
                output::id_ranges(&ids)
            )
            .map_err(io)?;
            Ok(Exit::Ok)
        }
        DlqCommand::Purge { filter: f, yes } => {
            let mut f = filter(pool, f, None).await?;
            let (n, max) = span(pool, &dlq_table, &f).await?;
            if n == 0 {
                writeln!(console.out, "no dead letters match: nothing purged").map_err(io)?;
                return Ok(Exit::Ok);
            }
            f.max_id = max;
            confirm(
                console,
                yes,
                &format!("delete {n} dead letters from {dlq_table} for good"),
            )?;
            let done = dlq.purge(&f).await?;
            writeln!(console.out, "purged {done} dead letters from {dlq_table}").map_err(io)?;
            Ok(Exit::Ok)
        }
    }
}

fn dead_letter_json(d: &DeadLetter) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": d.id,
        "original_id": d.original_id,
        "queue": d.queue,
        "failure_reason": d.failure_reason,
        "last_error": d.last_error,
        "attempts": d.attempts,
        "deliveries": d.deliveries,
        "created_at": rfc3339(d.created_at_ms),
        "failed_at": rfc3339(d.failed_at_ms),
        "partition_key": d.partition_key,
        "correlation_id": d.correlation_id,
        "headers": d.headers,
    });
    match std::str::from_utf8(&d.payload) {
        Ok(s) => v["payload"] = s.into(),
        Err(_) => v["payload_hex"] = output::hex(&d.payload).into(),
    }
    v
}

async fn parked(
    pool: &PgPool,
    tables: &Tables,
    cmd: ParkedCommand,
    console: &mut Console<'_>,
) -> Res {
    require_table(pool, &tables.outbox, "outbox").await?;
    match cmd {
        ParkedCommand::List { queue, limit, json } => {
            if let Some(q) = &queue {
                crate::validate_queue(q)?;
            }
            let rows = crate::dlq::list_parked(pool, tables, queue.as_deref(), limit).await?;
            if json {
                let v = rows
                    .iter()
                    .map(|p| {
                        let mut v = serde_json::json!({
                            "id": p.id,
                            "queue": p.queue,
                            "attempts": p.attempts,
                            "failure_reason": p.failure_reason,
                            "last_error": p.last_error,
                        });
                        match std::str::from_utf8(&p.payload) {
                            Ok(s) => v["payload"] = s.into(),
                            Err(_) => v["payload_hex"] = output::hex(&p.payload).into(),
                        }
                        v
                    })
                    .collect();
                json_out(console, &serde_json::Value::Array(v))?;
                return Ok(Exit::Ok);
            }
            if rows.is_empty() {
                writeln!(console.out, "no parked rows").map_err(io)?;
                return Ok(Exit::Ok);
            }
            let body = rows
                .iter()
                .map(|p| {
                    vec![
                        p.id.to_string(),
                        p.queue.clone(),
                        p.failure_reason.clone().unwrap_or_default(),
                        p.attempts.to_string(),
                        output::one_line(p.last_error.as_deref().unwrap_or(""), 60),
                    ]
                })
                .collect();
            let t = table(
                &[
                    ("ID", Align::Right),
                    ("QUEUE", Align::Left),
                    ("REASON", Align::Left),
                    ("ATTEMPTS", Align::Right),
                    ("LAST ERROR", Align::Left),
                ],
                body,
            );
            write!(console.out, "{t}").map_err(io)?;
            Ok(Exit::Ok)
        }
        ParkedCommand::Replay {
            queue,
            ids,
            limit,
            yes,
        } => {
            if let Some(q) = &queue {
                crate::validate_queue(q)?;
            }
            let chosen: Vec<i64> = if ids.is_empty() {
                crate::dlq::list_parked(pool, tables, queue.as_deref(), limit)
                    .await?
                    .iter()
                    .map(|p| p.id)
                    .collect()
            } else {
                sqlx::query_scalar(&crate::sql::parked_ids(tables))
                    .bind(&ids)
                    .bind(queue.as_deref())
                    .bind(limit)
                    .fetch_all(pool)
                    .await
                    .map_err(Error::from)?
            };
            if chosen.is_empty() {
                writeln!(console.out, "no parked rows match: nothing replayed").map_err(io)?;
                return Ok(Exit::Ok);
            }
            if chosen.len() > 1 {
                confirm(
                    console,
                    yes,
                    &format!(
                        "make {} parked rows of {} pending again",
                        chosen.len(),
                        tables.outbox
                    ),
                )?;
            }
            let done = crate::dlq::unpark(pool, tables, &chosen).await?;
            writeln!(
                console.out,
                "replayed {done} parked rows (ids {})",
                output::id_ranges(&chosen)
            )
            .map_err(io)?;
            Ok(Exit::Ok)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_ago_parse() {
        assert_eq!(parse_ago("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ago("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_ago("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_ago("1w"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "1", "h", "1x", "-1h", "1.5h", "99999999999999999999s"] {
            let e = parse_ago(bad).unwrap_err();
            assert!(e.contains("accepted"), "{bad}: {e}");
        }
    }

    #[test]
    fn help_documents_exit_codes_and_hides_the_password() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("3  validate found problems"), "{help}");
        assert!(!help.contains("outbox:outbox@"), "{help}");
        Cli::command().debug_assert();
    }
}
