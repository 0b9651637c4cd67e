//! Schema of the outbox and dead-letter tables, and the migrations that create it.
//!
//! Migrations are embedded in the library and run only when asked:
//! [`migrate`] (or `outbox migrate` on the command line). They are idempotent
//! and serialised by a transaction-scoped advisory lock, so several instances
//! may call them at start-up, also through PgBouncer in transaction mode.

use crate::{Error, TableName};
use sqlx::PgPool;

/// The names of the tables one outbox uses.
///
/// ```
/// let t = outbox::Tables::new("outbox", Some("outbox_dlq")).unwrap();
/// assert_eq!(t.outbox.name(), "outbox");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    /// The outbox table.
    pub outbox: TableName,
    /// The dead-letter table, created by [`migrate`] when set.
    pub dlq: Option<TableName>,
}

impl Default for Tables {
    fn default() -> Self {
        Self {
            outbox: TableName::new("outbox").expect("valid default"),
            dlq: Some(TableName::new("outbox_dlq").expect("valid default")),
        }
    }
}

impl Tables {
    /// Validated table names.
    pub fn new(outbox: &str, dlq: Option<&str>) -> Result<Self, Error> {
        Ok(Self {
            outbox: TableName::new(outbox)?,
            dlq: dlq.map(TableName::new).transpose()?,
        })
    }

    /// The NOTIFY channel of this outbox (at most 63 bytes, as Postgres requires).
    pub(crate) fn channel(&self) -> String {
        let mut c = format!("outbox_wake_{}", self.outbox);
        c.truncate(63);
        c
    }
}

struct Migration {
    version: i32,
    name: &'static str,
    sql: fn(&TableName) -> String,
}

const OUTBOX_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "create outbox",
        sql: outbox_v1,
    },
    Migration {
        version: 2,
        name: "room on each page for claim updates (fillfactor 50)",
        sql: outbox_v2,
    },
    Migration {
        version: 3,
        name: "room for every row of a page to be claimed at once (fillfactor 45)",
        sql: outbox_v3,
    },
    Migration {
        version: 4,
        name: "claim index ordered by (next_attempt_at, id)",
        sql: outbox_v4,
    },
    Migration {
        version: 5,
        name: "parked timers release their timer ids",
        sql: outbox_v5,
    },
    Migration {
        version: 6,
        name: "registry of log capture's replication slots",
        sql: outbox_v6,
    },
];

const DLQ_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "create dead letters",
    sql: dlq_v1,
}];

fn outbox_v1(t: &TableName) -> String {
    let o = t.quoted();
    let listeners = t.derived("_listeners");
    format!(
        r#"
CREATE TABLE IF NOT EXISTS {o} (
    id                bigserial PRIMARY KEY,
    queue             text NOT NULL CHECK (octet_length(queue) BETWEEN 1 AND 255),
    payload           bytea NOT NULL,
    headers           jsonb NOT NULL DEFAULT '{{}}'::jsonb CHECK (jsonb_typeof(headers) = 'object'),
    partition_key     text,
    correlation_id    text,
    timer_id          text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    first_attempt_at  timestamptz,
    last_attempt_at   timestamptz,
    attempts          integer NOT NULL DEFAULT 0,
    deliveries        integer NOT NULL DEFAULT 0,
    lease_token       uuid,
    lease_acquired_at timestamptz,
    lease_expires_at  timestamptz,
    parked_at         timestamptz,
    failure_reason    text,
    last_error        text,
    CONSTRAINT {lease_chk} CHECK ((lease_token IS NULL) = (lease_acquired_at IS NULL)
                                 AND (lease_token IS NULL) = (lease_expires_at IS NULL))
);
CREATE INDEX IF NOT EXISTS {claim_idx} ON {o} (queue, next_attempt_at) WHERE parked_at IS NULL;
CREATE INDEX IF NOT EXISTS {key_idx} ON {o} (queue, partition_key, id)
    WHERE partition_key IS NOT NULL AND parked_at IS NULL;
CREATE UNIQUE INDEX IF NOT EXISTS {timer_idx} ON {o} (queue, timer_id) WHERE timer_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS {parked_idx} ON {o} (queue, id) WHERE parked_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS {listeners} (
    listener   uuid PRIMARY KEY,
    idle_until timestamptz NOT NULL
);
"#,
        lease_chk = t.ident("_lease_chk"),
        claim_idx = t.ident("_claim_idx"),
        key_idx = t.ident("_key_idx"),
        timer_idx = t.ident("_timer_idx"),
        parked_idx = t.ident("_parked_idx"),
    )
}

/// Every row is updated once by its claim (the lease columns) before it is
/// deleted. On full pages (the default fillfactor of 100) the new row version
/// goes to another page, so every claim also inserts into each index (a
/// non-HOT update). Half-empty pages let the claim write the new version next
/// to the old one as a heap-only tuple, with no index insert: the claim costs
/// about as much as the delete. Applies to pages written from now on.
fn outbox_v2(t: &TableName) -> String {
    format!("ALTER TABLE {} SET (fillfactor = 50);", t.quoted())
}

/// A claim takes a page's rows together (they are adjacent in the claim
/// order), so the page must hold a second version of each: at fillfactor 50
/// the line pointers and alignment left too little room, and about 7% of the
/// claim updates were not HOT (an insert into every index each). 45 leaves
/// room for all of them: about 15% less time and WAL per claimed row.
fn outbox_v3(t: &TableName) -> String {
    format!("ALTER TABLE {} SET (fillfactor = 45);", t.quoted())
}

/// Claims of one queue walk the due rows in `(next_attempt_at, id)` order, so
/// that a claim can start after the last row claimed (a row comparison on the
/// index), not only at the oldest due row. Replaces `_claim_idx`.
fn outbox_v4(t: &TableName) -> String {
    format!(
        "CREATE INDEX IF NOT EXISTS {due_idx} ON {o} (queue, next_attempt_at, id) WHERE parked_at IS NULL;\n\
         DROP INDEX IF EXISTS {claim_idx};",
        due_idx = t.ident("_due_idx"),
        o = t.quoted(),
        claim_idx = t.derived("_claim_idx"),
    )
}

/// A parked row is no longer a pending timer: it gives its `timer_id` up
/// (parking clears it from now on), so that a new timer of that id can be
/// published instead of being swallowed by the parked row (`Ignore`) or
/// written into it (`Replace`), where it would never fire.
fn outbox_v5(t: &TableName) -> String {
    format!(
        "UPDATE {} SET timer_id = NULL WHERE parked_at IS NOT NULL AND timer_id IS NOT NULL;",
        t.quoted()
    )
}

/// `outbox_slots`, the replication slots of log capture (one table for
/// every outbox of the database; a slot records the outbox table it serves).
/// A log-mode publish reads it, and refuses to write a message no slot can
/// read, so it exists from the migration on rather than from the first
/// slot's creation.
fn outbox_v6(_: &TableName) -> String {
    format!("{SLOTS_TABLE};\n{SLOTS_COLUMNS};")
}

/// The registry of log capture's slots (see [`outbox_v6`]).
pub(crate) const SLOTS_TABLE: &str = "CREATE TABLE IF NOT EXISTS outbox_slots (
    slot_name    text PRIMARY KEY,
    publication  text NOT NULL,
    outbox_table text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_lsn  pg_lsn NOT NULL,
    reader       uuid,
    settled_lsn  pg_lsn)";

/// Slots recorded before `reader` and `settled_lsn` existed get them.
pub(crate) const SLOTS_COLUMNS: &str =
    "ALTER TABLE outbox_slots ADD COLUMN IF NOT EXISTS reader uuid, \
     ADD COLUMN IF NOT EXISTS settled_lsn pg_lsn";

fn dlq_v1(t: &TableName) -> String {
    let d = t.quoted();
    format!(
        r#"
CREATE TABLE IF NOT EXISTS {d} (
    id              bigserial PRIMARY KEY,
    original_id     bigint NOT NULL,
    queue           text NOT NULL,
    payload         bytea NOT NULL,
    headers         jsonb NOT NULL DEFAULT '{{}}'::jsonb,
    partition_key   text,
    correlation_id  text,
    attempts        integer NOT NULL,
    deliveries      integer NOT NULL,
    created_at      timestamptz NOT NULL,
    failed_at       timestamptz NOT NULL DEFAULT now(),
    failure_reason  text NOT NULL,
    last_error      text
);
CREATE INDEX IF NOT EXISTS {q_idx} ON {d} (queue, id);
"#,
        q_idx = t.ident("_queue_idx"),
    )
}

/// Creates or upgrades the outbox table (and the dead-letter table when one is
/// named). Safe to call from several instances at once.
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
/// outbox::migrate(&pool, &outbox::Tables::default()).await?;
/// # Ok(()) }
/// ```
pub async fn migrate(pool: &PgPool, tables: &Tables) -> Result<(), Error> {
    let mut targets = vec![(&tables.outbox, "outbox", OUTBOX_MIGRATIONS)];
    if let Some(dlq) = &tables.dlq {
        targets.push((dlq, "dlq", DLQ_MIGRATIONS));
    }
    migrate_locked(pool, &targets).await
}

/// Creates a dead-letter table on its own (for subscribers naming a table of
/// their own). Safe to call from several instances at once, and before
/// [`migrate`].
pub async fn migrate_dlq(pool: &PgPool, dlq: &TableName) -> Result<(), Error> {
    migrate_locked(pool, &[(dlq, "dlq", DLQ_MIGRATIONS)]).await
}

/// The advisory lock every outbox migration takes.
const MIGRATION_LOCK: i64 = 7244551220173090001;

/// Applies the migrations of each `(table, kind, migrations)` still missing,
/// each in a transaction of its own that first takes the one advisory lock
/// of every outbox migration, so that concurrent start-ups queue up instead
/// of racing for a table or a version row. The lock is transaction-scoped:
/// it is released by the commit or rollback on the very server connection
/// that took it, also through a pooler in transaction mode (PgBouncer), where
/// a session lock stays with whichever server connection took it, held after
/// the client has gone, and an unlock sent later may reach another one.
/// For the same reason the statements are not prepared: migrations run
/// rarely, and so work through any pooler.
async fn migrate_locked(
    pool: &PgPool,
    targets: &[(&TableName, &str, &[Migration])],
) -> Result<(), Error> {
    use sqlx::Connection;
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    lock(&mut tx).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS outbox_migrations (
            table_name text NOT NULL,
            kind text NOT NULL,
            version integer NOT NULL,
            name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (table_name, kind, version))",
    )
    .persistent(false)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    for (table, kind, migrations) in targets {
        apply(&mut conn, table, kind, migrations).await?;
    }
    Ok(())
}

async fn lock(conn: &mut sqlx::PgConnection) -> Result<(), Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .persistent(false)
        .execute(conn)
        .await?;
    Ok(())
}

async fn apply(
    conn: &mut sqlx::PgConnection,
    table: &TableName,
    kind: &str,
    migrations: &[Migration],
) -> Result<(), Error> {
    use sqlx::Connection;
    for m in migrations {
        let mut tx = conn.begin().await?;
        lock(&mut tx).await?;
        let done: Option<i32> = sqlx::query_scalar(
            "SELECT version FROM outbox_migrations WHERE table_name = $1 AND kind = $2 AND version = $3",
        )
        .bind(table.to_string())
        .bind(kind)
        .bind(m.version)
        .persistent(false)
        .fetch_optional(&mut *tx)
        .await?;
        if done.is_some() {
            tx.commit().await?;
            continue;
        }
        let err = |source| Error::Migration {
            version: m.version,
            name: m.name,
            source,
        };
        sqlx::raw_sql(&(m.sql)(table))
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query(
            "INSERT INTO outbox_migrations (table_name, kind, version, name) VALUES ($1, $2, $3, $4)",
        )
        .bind(table.to_string())
        .bind(kind)
        .bind(m.version)
        .bind(m.name)
        .persistent(false)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await?;
        tracing::info!(table = %table, kind, version = m.version, name = m.name, "applied migration");
    }
    Ok(())
}

/// The schema version this library expects for each table kind.
pub fn expected_versions() -> (i32, i32) {
    (
        OUTBOX_MIGRATIONS.last().map_or(0, |m| m.version),
        DLQ_MIGRATIONS.last().map_or(0, |m| m.version),
    )
}
