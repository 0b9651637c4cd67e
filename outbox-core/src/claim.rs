//! Claiming rows under a lease, and settling them: ack, nack, dead-letter, park, release.
//!
//! Every settling statement checks the lease token, so a worker whose lease
//! expired and was taken over changes nothing.
//!
//! ```no_run
//! # async fn f(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
//! use outbox::claim::Claimer;
//! let claimer = Claimer::new(pool, outbox::Tables::default(), vec!["orders".into()])?;
//! let batch = claimer.claim().await?;
//! let ids: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
//! claimer.ack(batch.token, &ids).await?;
//! # Ok(()) }
//! ```

use crate::sql::{self, ClaimScope};
use crate::{Envelope, Error, FailureReason, Pooler, TableName, Tables};
use sqlx::PgPool;
use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::pooler::Statement;

/// A claimed batch: the lease token and the rows.
#[derive(Debug)]
pub struct Batch {
    /// The lease token; every settling call must present it.
    pub token: Uuid,
    /// The rows, oldest first.
    pub rows: Vec<Envelope>,
    /// Where the claim stored each row (same order as `rows`), for
    /// [`Claimer::ack_at`].
    pub positions: Vec<RowPosition>,
}

/// Where a claim stored a row version (its `ctid`). [`Claimer::ack_at`] finds
/// rows by it without an index lookup each. It is only good for the lease that
/// produced it: once a row is updated (its lease taken over), the row is
/// elsewhere and an ack at the old position deletes nothing.
///
/// It travels in PostgreSQL's binary form (`tid`: block and line number), so
/// neither side formats or parses text per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RowPosition {
    block: u32,
    line: u16,
}

const TID_OID: sqlx::postgres::types::Oid = sqlx::postgres::types::Oid(27);
const TID_ARRAY_OID: sqlx::postgres::types::Oid = sqlx::postgres::types::Oid(1010);

impl sqlx::Type<sqlx::Postgres> for RowPosition {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_oid(TID_OID)
    }

    /// A `tid`, or the same 6 bytes in a `bytea` (claims through a pooler in
    /// transaction mode).
    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        *ty == Self::type_info() || *ty == <Vec<u8> as sqlx::Type<sqlx::Postgres>>::type_info()
    }
}

impl sqlx::postgres::PgHasArrayType for RowPosition {
    fn array_type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_oid(TID_ARRAY_OID)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for RowPosition {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        match value.as_bytes()? {
            &[b0, b1, b2, b3, l0, l1] => Ok(Self {
                block: u32::from_be_bytes([b0, b1, b2, b3]),
                line: u16::from_be_bytes([l0, l1]),
            }),
            other => Err(format!("a binary tid is 6 bytes, got {}", other.len()).into()),
        }
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for RowPosition {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        buf.extend_from_slice(&self.block.to_be_bytes());
        buf.extend_from_slice(&self.line.to_be_bytes());
        Ok(sqlx::encode::IsNull::No)
    }

    fn size_hint(&self) -> usize {
        6
    }
}

/// The longest delay a nack stores: a delay from a custom strategy or
/// `Ack::nack` beyond it (up to `Duration::MAX`) would overflow the
/// database's `now() + interval`, and the nack would fail.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(365 * 86_400);

/// The longest error text stored in `last_error`, in bytes.
pub const MAX_ERROR_LEN: usize = 8 * 1024;

/// An error text PostgreSQL can store: NUL characters (which `text` refuses,
/// failing the whole statement) replaced by U+FFFD, and at most
/// [`MAX_ERROR_LEN`] bytes, the cut marked with the full length.
///
/// ```
/// use outbox::claim::storable;
/// assert_eq!(storable("unknown variant `\0`"), "unknown variant `\u{fffd}`");
/// let long = "x".repeat(20_000);
/// assert!(storable(&long).len() <= outbox::claim::MAX_ERROR_LEN);
/// assert!(storable(&long).ends_with("[cut: 20000 bytes in all]"));
/// ```
pub fn storable(text: &str) -> Cow<'_, str> {
    let text: Cow<'_, str> = if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(text)
    };
    if text.len() <= MAX_ERROR_LEN {
        return text;
    }
    let mark = format!(" ... [cut: {} bytes in all]", text.len());
    let mut end = MAX_ERROR_LEN - mark.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}{mark}", &text[..end]))
}

/// A row that failed for good.
#[derive(Debug, Clone)]
pub struct Terminal {
    /// Row id.
    pub id: i64,
    /// Why.
    pub reason: FailureReason,
    /// The last error message.
    pub error: String,
}

/// A row to retry later.
#[derive(Debug, Clone)]
pub struct Retry {
    /// Row id.
    pub id: i64,
    /// Delay from now (database clock).
    pub delay: Duration,
    /// The error message, stored in `last_error`.
    pub error: String,
}

/// Claims and settles rows of one outbox table.
#[derive(Debug, Clone)]
pub struct Claimer {
    pool: PgPool,
    /// How statements are sent (a pooler in transaction mode, or not).
    pooler: Pooler,
    queues: Option<Vec<String>>,
    batch_size: i64,
    lease_ttl_us: i64,
    /// Bytes of payload and headers per claim.
    batch_bytes: i64,
    claim_sql: String,
    tables: Tables,
    /// Whether the database's default isolation is stricter than READ
    /// COMMITTED (asked at the first claim).
    stricter_isolation: Arc<tokio::sync::OnceCell<bool>>,
    ack_sql: String,
    ack_at_sql: String,
    renew_sql: String,
    nack_sql: String,
    release_sql: String,
    park_sql: String,
    dead_letter_sql: Option<String>,
    /// Which rows a claim may take, and the parameters its statement binds.
    scope: ClaimScope,
    /// Where the next claim starts (claimers of one queue and of every
    /// queue; `None` for the others).
    cursor: Option<Arc<Mutex<Cursor>>>,
}

/// How long claims may start after the rows claimed before (skipping the
/// leased ones) before one starts from the oldest due row again.
const CURSOR_RESCAN: Duration = Duration::from_secs(1);

/// A claim walks the due rows in order (`(next_attempt_at, id)` for one
/// queue, `id` for every queue) from the oldest, past every row still leased:
/// in a backlog, the batches being handled and published, one heap fetch
/// each, a third to a half of the claim's time. While claims come back full,
/// the next one starts after the last row claimed so far instead. Rows before
/// that point that become claimable meanwhile (an expired or given-back lease,
/// a row committed late with an older id or time) are taken by the claim that
/// starts from the oldest due row again: whenever the rows after the cursor
/// run out, and at least every [`CURSOR_RESCAN`]. (A retry in one queue falls
/// due after its nack, later than every row claimed before: after the cursor.
/// In the id order of every queue it is before it, for the next such claim.)
#[derive(Debug)]
struct Cursor {
    after: Option<ClaimKey>,
    rescanned: Instant,
}

/// A row's place in the claim order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ClaimKey {
    due: DbTime,
    id: i64,
}

impl ClaimKey {
    const FIRST: Self = Self {
        due: DbTime(i64::MIN),
        id: i64::MIN,
    };
    const LAST: Self = Self {
        due: DbTime(i64::MAX),
        id: i64::MAX,
    };
}

/// A `timestamptz` in PostgreSQL's binary form: microseconds since
/// 2000-01-01 UTC, `i64::MIN` and `i64::MAX` being `-infinity` and `infinity`.
/// Compared exactly, as the index compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct DbTime(i64);

const TIMESTAMPTZ_OID: sqlx::postgres::types::Oid = sqlx::postgres::types::Oid(1184);

impl sqlx::Type<sqlx::Postgres> for DbTime {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_oid(TIMESTAMPTZ_OID)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for DbTime {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        match value.as_bytes()? {
            &[a, b, c, d, e, f, g, h] => Ok(Self(i64::from_be_bytes([a, b, c, d, e, f, g, h]))),
            other => Err(format!("a binary timestamptz is 8 bytes, got {}", other.len()).into()),
        }
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for DbTime {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        buf.extend_from_slice(&self.0.to_be_bytes());
        Ok(sqlx::encode::IsNull::No)
    }

    fn size_hint(&self) -> usize {
        8
    }
}

impl Claimer {
    /// A claimer of the given queues with 100 rows per claim, a 30 s lease, and
    /// the tables' dead-letter table.
    pub fn new(pool: PgPool, tables: Tables, queues: Vec<String>) -> Result<Self, Error> {
        for q in &queues {
            crate::validate_queue(q)?;
        }
        Ok(Self::build(
            pool,
            &tables,
            Some(queues),
            false,
            tables.dlq.clone(),
        ))
    }

    /// A claimer of every queue of the table, by id (what the stand-alone
    /// relay claims), with the defaults of [`Claimer::new`].
    pub fn all_queues(pool: PgPool, tables: Tables) -> Self {
        let dlq = tables.dlq.clone();
        Self::build(pool, &tables, None, false, dlq)
    }

    pub(crate) fn build(
        pool: PgPool,
        tables: &Tables,
        queues: Option<Vec<String>>,
        ordered: bool,
        dlq: Option<TableName>,
    ) -> Self {
        let scope = match (queues.as_deref(), ordered) {
            (None, false) => ClaimScope::All,
            (None, true) => ClaimScope::AllOrdered,
            (Some([_]), false) => ClaimScope::Queue,
            (Some([_]), true) => ClaimScope::QueueOrdered,
            (Some(_), false) => ClaimScope::Queues,
            (Some(_), true) => ClaimScope::QueuesOrdered,
        };
        Self {
            pool,
            pooler: Pooler::None,
            queues,
            batch_size: crate::subscriber::DEFAULT_BATCH_SIZE as i64,
            lease_ttl_us: crate::subscriber::DEFAULT_LEASE_TTL.as_micros() as i64,
            batch_bytes: crate::subscriber::DEFAULT_MAX_BATCH_BYTES as i64,
            claim_sql: sql::claim(
                tables,
                scope,
                crate::subscriber::DEFAULT_MAX_BATCH_BYTES as i64,
            ),
            tables: tables.clone(),
            stricter_isolation: Arc::new(tokio::sync::OnceCell::new()),
            ack_sql: sql::ack(tables),
            ack_at_sql: sql::ack_at(tables),
            renew_sql: sql::renew(tables),
            nack_sql: sql::nack(tables),
            release_sql: sql::release(tables),
            park_sql: sql::park(tables),
            dead_letter_sql: dlq.map(|d| sql::dead_letter(tables, &d)),
            cursor: matches!(scope, ClaimScope::All | ClaimScope::Queue).then(|| {
                Arc::new(Mutex::new(Cursor {
                    after: None,
                    rescanned: Instant::now(),
                }))
            }),
            scope,
        }
    }

    /// Bytes of payload and headers per claim (at least one row is claimed,
    /// whatever its size).
    pub fn with_batch_bytes(mut self, n: usize) -> Self {
        self.batch_bytes = n.min(i64::MAX as usize) as i64;
        self.claim_sql = self.claim_statement();
        self
    }

    /// The claim statement for the scope, the batch bytes and the pooler.
    fn claim_statement(&self) -> String {
        if self.pooler.needs_transaction() {
            sql::claim_through_pooler(&self.tables, self.scope, self.batch_bytes)
        } else {
            sql::claim(&self.tables, self.scope, self.batch_bytes)
        }
    }

    /// Sends every statement as `pooler` needs it (default [`Pooler::None`]:
    /// prepared and cached per connection).
    ///
    /// ```no_run
    /// # fn f(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
    /// use outbox::{claim::Claimer, Pooler, Tables};
    /// let claimer = Claimer::new(pool, Tables::default(), vec!["orders".into()])?
    ///     .with_pooler(Pooler::Transaction);
    /// # Ok(()) }
    /// ```
    pub fn with_pooler(mut self, pooler: Pooler) -> Self {
        self.pooler = pooler;
        self.claim_sql = self.claim_statement();
        self
    }

    /// Rows per claim.
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n as i64;
        self
    }

    /// The lease time-to-live: a claim older than this may be taken over.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl_us = i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX);
        self
    }

    /// The pooler the statements are sent for.
    pub(crate) fn pooler(&self) -> Pooler {
        self.pooler
    }

    /// Whether terminal failures go to a dead-letter table (else they are parked).
    pub fn has_dlq(&self) -> bool {
        self.dead_letter_sql.is_some()
    }

    /// Claims up to a batch of due rows with one statement (a claim started
    /// after the rows claimed before may need a second one from the oldest due
    /// row; see `Cursor`).
    pub async fn claim(&self) -> Result<Batch, Error> {
        let token = Uuid::new_v4();
        let after = self.cursor.as_ref().and_then(|c| {
            let c = c.lock().expect("cursor lock");
            c.after.filter(|_| c.rescanned.elapsed() < CURSOR_RESCAN)
        });
        let mut out = self
            .claim_rows(
                token,
                self.batch_size,
                after.unwrap_or(ClaimKey::FIRST),
                ClaimKey::LAST,
            )
            .await?;
        let full = out.len() as i64 >= self.batch_size;
        let mut rescanned = after.is_none();
        if let (Some(after), false) = (after, full) {
            // The rest from the oldest due row, up to where the first claim started.
            let rest = self.batch_size - out.len() as i64;
            match self.claim_rows(token, rest, ClaimKey::FIRST, after).await {
                Ok(more) => {
                    out.extend(more);
                    rescanned = true;
                }
                // The first statement's rows are claimed: handle them rather
                // than leave them leased until their lease expires.
                Err(e) if !out.is_empty() => {
                    tracing::warn!(error = %e, rows = out.len(), "the second claim statement failed; handling what the first one claimed");
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(cursor) = &self.cursor {
            let last = out.iter().map(|(_, _, key)| *key).max();
            let mut c = cursor.lock().expect("cursor lock");
            if rescanned {
                c.rescanned = Instant::now();
            }
            c.after = if full { c.after.max(last) } else { None };
        }
        out.sort_unstable_by_key(|(e, _, _)| e.id);
        let (rows, positions) = out.into_iter().map(|(e, p, _)| (e, p)).unzip();
        Ok(Batch {
            token,
            rows,
            positions,
        })
    }

    /// One claim statement: up to `limit` rows under `token`, from after
    /// `lower` up to `upper` in the claim order (claimers with a cursor).
    async fn claim_rows(
        &self,
        token: Uuid,
        limit: i64,
        lower: ClaimKey,
        upper: ClaimKey,
    ) -> Result<Vec<(Envelope, RowPosition, ClaimKey)>, Error> {
        let mut q = sqlx::query(&self.claim_sql);
        q = match self.queues.as_deref() {
            // One queue: `queue = $1`, which walks the claim index in order.
            Some([queue]) => q.bind(queue),
            Some(queues) => q.bind(queues),
            None => q.bind(lower.id),
        };
        q = q.bind(limit).bind(self.lease_ttl_us).bind(token);
        q = match self.scope {
            ClaimScope::All | ClaimScope::AllOrdered => q.bind(upper.id),
            ClaimScope::Queue => q
                .bind(lower.due)
                .bind(lower.id)
                .bind(upper.due)
                .bind(upper.id),
            ClaimScope::QueueOrdered | ClaimScope::Queues | ClaimScope::QueuesOrdered => q,
        };
        let rows = self.fetch(q).await?;
        let by_id = matches!(self.scope, ClaimScope::All | ClaimScope::AllOrdered);
        Ok(rows
            .iter()
            .map(|row| {
                use sqlx::Row;
                let env = Envelope::from_row(row)?;
                // The columns after the envelope's: `position`, `due`.
                let key = ClaimKey {
                    // Every queue: the order is by id alone.
                    due: if by_id { DbTime(0) } else { row.try_get(11)? },
                    id: env.id,
                };
                Ok((env, row.try_get::<RowPosition, _>(10)?, key))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?)
    }

    /// Runs a statement of the claimer and returns its rows: as it is, or in
    /// a transaction of its own when the database's default isolation is
    /// stricter than READ COMMITTED (`default_transaction_isolation`; the
    /// transaction is set to READ COMMITTED) or a pooler in transaction mode
    /// needs one ([`Pooler::Transaction`]). Claims and settles assume READ
    /// COMMITTED: under REPEATABLE READ or SERIALIZABLE, a claim racing
    /// another for the same rows, or an ack beside a claim, fails with a
    /// serialization error instead of skipping or following the other's update.
    async fn fetch(&self, q: Statement<'_>) -> Result<Vec<sqlx::postgres::PgRow>, Error> {
        let stricter = self.read_committed_needed().await?;
        if !stricter && !self.pooler.needs_transaction() {
            return Ok(q.fetch_all(&self.pool).await?);
        }
        let mut tx = self.pool.begin().await?;
        if stricter {
            sqlx::query(sql::SET_READ_COMMITTED)
                .persistent(self.pooler.prepares())
                .execute(&mut *tx)
                .await?;
        }
        let rows = q
            .persistent(self.pooler.prepares())
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// [`Claimer::fetch`] for a statement without rows.
    async fn execute(&self, q: Statement<'_>) -> Result<sqlx::postgres::PgQueryResult, Error> {
        let stricter = self.read_committed_needed().await?;
        if !stricter && !self.pooler.needs_transaction() {
            return Ok(q.execute(&self.pool).await?);
        }
        let mut tx = self.pool.begin().await?;
        if stricter {
            sqlx::query(sql::SET_READ_COMMITTED)
                .persistent(self.pooler.prepares())
                .execute(&mut *tx)
                .await?;
        }
        let done = q
            .persistent(self.pooler.prepares())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Whether statements run under a stricter isolation than READ
    /// COMMITTED by default here; asked once, at the first claim.
    async fn read_committed_needed(&self) -> Result<bool, Error> {
        let pool = &self.pool;
        let pooler = self.pooler;
        self.stricter_isolation
            .get_or_try_init(|| async move {
                use sqlx::Row;
                let rows = pooler.fetch_all(pool, sqlx::query(sql::ISOLATION)).await?;
                let level: String = match rows.first() {
                    Some(row) => row.try_get(0)?,
                    None => return Err(Error::from(sqlx::Error::RowNotFound)),
                };
                if level != "read committed" {
                    tracing::info!(isolation = %level, "the database's default isolation is not read committed; claims run in a read committed transaction of their own");
                }
                Ok::<_, Error>(level != "read committed")
            })
            .await
            .copied()
    }

    /// Deletes handled rows found by the positions their claim returned;
    /// returns how many were still held under `token`. Cheaper than
    /// [`Claimer::ack`] (no index lookup per row), with the same guarantee: a
    /// row whose lease was taken over is not deleted, and neither is a row
    /// that is not the one with the id given beside its position (`ids`, in
    /// the same order as `positions`). Rows not found at their position (the
    /// table was rewritten since the claim) are acked by id.
    pub async fn ack_at(
        &self,
        token: Uuid,
        positions: &[RowPosition],
        ids: &[i64],
    ) -> Result<u64, Error> {
        if positions.is_empty() {
            return Ok(0);
        }
        if positions.len() != ids.len() {
            return Err(Error::Invalid(format!(
                "ack_at: {} positions but {} ids (one id per position is expected)",
                positions.len(),
                ids.len()
            )));
        }
        if self.pooler.needs_transaction() {
            // Binding `tid[]` would make sqlx look the type up with prepared
            // statements of its own (see `sql::claim_through_pooler`).
            return self.ack(token, ids).await;
        }
        let done = self
            .execute(
                sqlx::query(&self.ack_at_sql)
                    .bind(positions)
                    .bind(token)
                    .bind(ids),
            )
            .await?
            .rows_affected();
        if (done as usize) < ids.len() {
            // Moved (a table rewrite) or taken over: by id, with the token check.
            return Ok(done + self.ack(token, ids).await?);
        }
        Ok(done)
    }

    /// Extends the lease of rows still held under `token` by the lease TTL,
    /// from now; returns the ids still held. Their positions change (the rows
    /// are updated): settle them by id afterwards.
    pub async fn renew(&self, token: Uuid, ids: &[i64]) -> Result<Vec<i64>, Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let q = sqlx::query(&self.renew_sql)
            .bind(ids)
            .bind(token)
            .bind(self.lease_ttl_us);
        use sqlx::Row;
        self.fetch(q)
            .await?
            .iter()
            .map(|r| r.try_get(0).map_err(Error::from))
            .collect()
    }

    /// Deletes handled rows; returns how many were still held under `token`.
    pub async fn ack(&self, token: Uuid, ids: &[i64]) -> Result<u64, Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        let done = self
            .execute(sqlx::query(&self.ack_sql).bind(ids).bind(token))
            .await?;
        Ok(done.rows_affected())
    }

    /// Reschedules failed rows; returns how many were still held under `token`.
    pub async fn nack(&self, token: Uuid, rows: &[Retry]) -> Result<u64, Error> {
        if rows.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let delays: Vec<i64> = rows
            .iter()
            .map(|r| r.delay.min(MAX_RETRY_DELAY).as_micros() as i64)
            .collect();
        let errs: Vec<Cow<'_, str>> = rows.iter().map(|r| storable(&r.error)).collect();
        let done = self
            .execute(
                sqlx::query(&self.nack_sql)
                    .bind(ids)
                    .bind(delays)
                    .bind(errs)
                    .bind(token),
            )
            .await?;
        Ok(done.rows_affected())
    }

    /// Moves rows that failed for good to the dead-letter table in the statement
    /// that deletes them, or parks them when there is none.
    pub async fn fail(&self, token: Uuid, rows: &[Terminal]) -> Result<u64, Error> {
        let sql = self.dead_letter_sql.as_deref().unwrap_or(&self.park_sql);
        self.terminal(sql, token, rows).await
    }

    /// Parks rows that failed for good in the outbox, whether or not there is
    /// a dead-letter table: the last resort for a row the dead-letter insert
    /// refuses (a trigger or constraint of the user's on that table).
    pub async fn park(&self, token: Uuid, rows: &[Terminal]) -> Result<u64, Error> {
        self.terminal(&self.park_sql, token, rows).await
    }

    async fn terminal(&self, sql: &str, token: Uuid, rows: &[Terminal]) -> Result<u64, Error> {
        if rows.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let reasons: Vec<&str> = rows.iter().map(|r| r.reason.as_str()).collect();
        let errs: Vec<Cow<'_, str>> = rows.iter().map(|r| storable(&r.error)).collect();
        let done = self
            .execute(
                sqlx::query(sql)
                    .bind(ids)
                    .bind(reasons)
                    .bind(errs)
                    .bind(token),
            )
            .await?;
        Ok(done.rows_affected())
    }

    /// Gives rows back at once without counting an attempt (shutdown).
    pub async fn release(&self, token: Uuid, ids: &[i64]) -> Result<u64, Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        let done = self
            .execute(sqlx::query(&self.release_sql).bind(ids).bind(token))
            .await?;
        Ok(done.rows_affected())
    }
}
