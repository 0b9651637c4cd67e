//! `outbox validate`: the live schema against what this version expects.

use super::{io, Console, Exit, Fail, Res};
use crate::{Error, TableName, Tables};
use sqlx::{PgPool, Row};

const TIMESTAMPTZ: &str = "timestamp with time zone";

/// Columns of the outbox table (migration v1), as `format_type` names them.
const OUTBOX_COLUMNS: &[(&str, &str)] = &[
    ("id", "bigint"),
    ("queue", "text"),
    ("payload", "bytea"),
    ("headers", "jsonb"),
    ("partition_key", "text"),
    ("correlation_id", "text"),
    ("timer_id", "text"),
    ("created_at", TIMESTAMPTZ),
    ("next_attempt_at", TIMESTAMPTZ),
    ("first_attempt_at", TIMESTAMPTZ),
    ("last_attempt_at", TIMESTAMPTZ),
    ("attempts", "integer"),
    ("deliveries", "integer"),
    ("lease_token", "uuid"),
    ("lease_acquired_at", TIMESTAMPTZ),
    ("lease_expires_at", TIMESTAMPTZ),
    ("parked_at", TIMESTAMPTZ),
    ("failure_reason", "text"),
    ("last_error", "text"),
];
/// Index suffixes of the outbox table.
const OUTBOX_INDEXES: &[&str] = &["_pkey", "_due_idx", "_key_idx", "_timer_idx", "_parked_idx"];
const LISTENER_COLUMNS: &[(&str, &str)] = &[("listener", "uuid"), ("idle_until", TIMESTAMPTZ)];
const DLQ_COLUMNS: &[(&str, &str)] = &[
    ("id", "bigint"),
    ("original_id", "bigint"),
    ("queue", "text"),
    ("payload", "bytea"),
    ("headers", "jsonb"),
    ("partition_key", "text"),
    ("correlation_id", "text"),
    ("attempts", "integer"),
    ("deliveries", "integer"),
    ("created_at", TIMESTAMPTZ),
    ("failed_at", TIMESTAMPTZ),
    ("failure_reason", "text"),
    ("last_error", "text"),
];
const DLQ_INDEXES: &[&str] = &["_pkey", "_queue_idx"];

/// Autovacuum settings advised for the outbox, a table whose every row is
/// inserted, updated and deleted within moments.
const VACUUM_SCALE_FACTOR: f64 = 0.01;
const VACUUM_COST_LIMIT: i64 = 2000;

#[derive(Default)]
struct Report {
    lines: Vec<(&'static str, String)>,
    problems: usize,
    /// Tables whose recorded migration did not leave the objects it creates.
    repair: Vec<(String, &'static str)>,
}

impl Report {
    fn ok(&mut self, s: String) {
        self.lines.push(("ok", s));
    }
    fn problem(&mut self, s: String) {
        self.problems += 1;
        self.lines.push(("problem", s));
    }
    fn advice(&mut self, s: String) {
        self.lines.push(("advice", s));
    }
}

struct Expected<'a> {
    table: String,
    kind: &'static str,
    version: i32,
    columns: &'a [(&'a str, &'a str)],
    indexes: &'a [&'a str],
}

pub(super) async fn run(pool: &PgPool, tables: &Tables, console: &mut Console<'_>) -> Res {
    let mut report = Report::default();
    let (outbox_v, dlq_v) = crate::expected_versions();
    let migrations = TableName::new("outbox_migrations")?;
    let has_migrations = crate::metrics::table_exists(pool, &migrations).await?;
    if !has_migrations {
        report.problem(
            "table outbox_migrations does not exist: no migration was ever run here; run `outbox migrate`"
                .into(),
        );
    }

    let mut expected = vec![Expected {
        table: tables.outbox.quoted(),
        kind: "outbox",
        version: outbox_v,
        columns: OUTBOX_COLUMNS,
        indexes: OUTBOX_INDEXES,
    }];
    if let Some(d) = &tables.dlq {
        expected.push(Expected {
            table: d.quoted(),
            kind: "dlq",
            version: dlq_v,
            columns: DLQ_COLUMNS,
            indexes: DLQ_INDEXES,
        });
    }
    let names: Vec<TableName> = std::iter::once(tables.outbox.clone())
        .chain(tables.dlq.clone())
        .collect();
    for (e, name) in expected.iter().zip(&names) {
        let applied = if has_migrations {
            applied_version(pool, name, e.kind).await?
        } else {
            None
        };
        let before = report.problems;
        check_table(pool, &mut report, &name.to_string(), name.name(), e).await?;
        let objects_ok = report.problems == before;
        match applied {
            Some(v) if v == e.version => {
                if objects_ok {
                    report.ok(format!("{name}: schema v{v}, as this version expects"));
                } else {
                    report.repair.push((name.to_string(), e.kind));
                }
            }
            Some(v) if v > e.version => report.problem(format!(
                "{name}: schema v{v} is newer than this version of outbox knows (v{}): upgrade the tool",
                e.version
            )),
            Some(v) => report.problem(format!(
                "{name}: schema v{v}, this version expects v{}: run `outbox migrate`",
                e.version
            )),
            None if has_migrations => report.problem(format!(
                "{name}: no migration recorded in outbox_migrations: run `outbox migrate`"
            )),
            None => {}
        }
    }
    let listeners = format!("{}_listeners", tables.outbox.name());
    check_table(
        pool,
        &mut report,
        &format!("{}{listeners}", qualified_prefix(&tables.outbox)),
        &listeners,
        &Expected {
            table: tables.outbox.derived("_listeners"),
            kind: "outbox",
            version: outbox_v,
            columns: LISTENER_COLUMNS,
            indexes: &["_pkey"],
        },
    )
    .await?;
    vacuum_advice(pool, &mut report, &tables.outbox).await?;

    for (tag, line) in &report.lines {
        writeln!(console.out, "{tag:<8} {line}").map_err(io)?;
    }
    for (table, kind) in &report.repair {
        writeln!(
            console.out,
            "\nhow to repair {table}: its migration is recorded as applied, so `outbox migrate` \
             skips it. Every statement of the migration is IF NOT EXISTS, so it is safe to run \
             again:\n  DELETE FROM outbox_migrations WHERE table_name = '{table}' AND kind = '{kind}';\n  \
             then run `outbox migrate`"
        )
        .map_err(io)?;
    }
    if report.problems == 0 {
        writeln!(console.out, "\nschema OK").map_err(io)?;
        Ok(Exit::Ok)
    } else {
        writeln!(
            console.out,
            "\n{} problem{} found",
            report.problems,
            if report.problems == 1 { "" } else { "s" }
        )
        .map_err(io)?;
        Ok(Exit::Problems)
    }
}

/// `schema.` of a qualified table name, or nothing.
fn qualified_prefix(t: &TableName) -> String {
    let full = t.to_string();
    match full.len().checked_sub(t.name().len()) {
        Some(n) if n > 0 => full[..n].to_owned(),
        _ => String::new(),
    }
}

async fn applied_version(
    pool: &PgPool,
    table: &TableName,
    kind: &str,
) -> Result<Option<i32>, Fail> {
    let rows = sqlx::query(crate::sql::APPLIED_VERSIONS)
        .bind(table.to_string())
        .fetch_all(pool)
        .await
        .map_err(Error::from)?;
    for r in rows {
        let k: String = r.try_get(0).map_err(Error::from)?;
        if k == kind {
            return Ok(r.try_get(1).map_err(Error::from)?);
        }
    }
    Ok(None)
}

async fn check_table(
    pool: &PgPool,
    report: &mut Report,
    label: &str,
    index_prefix: &str,
    e: &Expected<'_>,
) -> Result<(), Fail> {
    let exists: bool = sqlx::query_scalar(crate::sql::TABLE_EXISTS)
        .bind(&e.table)
        .fetch_one(pool)
        .await
        .map_err(Error::from)?;
    if !exists {
        report.problem(format!("table {label} does not exist"));
        return Ok(());
    }
    let cols = sqlx::query(crate::sql::TABLE_COLUMNS)
        .bind(&e.table)
        .fetch_all(pool)
        .await
        .map_err(Error::from)?;
    let mut live = Vec::with_capacity(cols.len());
    for r in cols {
        let n: String = r.try_get(0).map_err(Error::from)?;
        let t: String = r.try_get(1).map_err(Error::from)?;
        live.push((n, t));
    }
    let mut bad = 0;
    for (col, ty) in e.columns {
        match live.iter().find(|(n, _)| n == col) {
            None => {
                bad += 1;
                report.problem(format!("{label}: column {col} ({ty}) is missing"));
            }
            Some((_, t)) if t != ty => {
                bad += 1;
                report.problem(format!("{label}: column {col} is {t}, expected {ty}"));
            }
            Some(_) => {}
        }
    }
    let indexes: Vec<String> = sqlx::query_scalar(crate::sql::TABLE_INDEXES)
        .bind(&e.table)
        .fetch_all(pool)
        .await
        .map_err(Error::from)?;
    for suffix in e.indexes {
        let want = format!("{index_prefix}{suffix}");
        if !indexes.contains(&want) {
            bad += 1;
            report.problem(format!("{label}: index {want} is missing"));
        }
    }
    if bad == 0 {
        let n = e.indexes.len();
        report.ok(format!(
            "{label}: {} columns and {n} index{} present",
            e.columns.len(),
            if n == 1 { "" } else { "es" }
        ));
    }
    Ok(())
}

async fn vacuum_advice(pool: &PgPool, report: &mut Report, outbox: &TableName) -> Result<(), Fail> {
    let options: Option<Vec<String>> = sqlx::query_scalar(crate::sql::TABLE_OPTIONS)
        .bind(outbox.quoted())
        .fetch_optional(pool)
        .await
        .map_err(Error::from)?;
    let Some(options) = options else {
        return Ok(());
    };
    let get = |key: &str| {
        options.iter().find_map(|o| {
            o.split_once('=')
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v.to_owned())
        })
    };
    let scale = get("autovacuum_vacuum_scale_factor").and_then(|v| v.parse::<f64>().ok());
    let cost = get("autovacuum_vacuum_cost_limit").and_then(|v| v.parse::<i64>().ok());
    let scale_ok = scale.is_some_and(|s| s <= 0.05);
    let cost_ok = cost.is_some_and(|c| c >= 1000);
    if scale_ok && cost_ok {
        report.ok(format!(
            "{outbox}: autovacuum tuned (scale factor {}, cost limit {})",
            scale.unwrap_or_default(),
            cost.unwrap_or_default()
        ));
    } else {
        report.advice(format!(
            "{outbox}: every row of the outbox is inserted, updated and deleted within moments, \
             so dead rows pile up between vacuums and slow the claim query; vacuum it more often:\n         \
             ALTER TABLE {} SET (autovacuum_vacuum_scale_factor = {VACUUM_SCALE_FACTOR}, \
             autovacuum_vacuum_cost_limit = {VACUUM_COST_LIMIT});",
            outbox.quoted()
        ));
    }
    Ok(())
}
