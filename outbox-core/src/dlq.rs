//! Dead letters and parked rows: list, replay, purge.
//!
//! ```no_run
//! # async fn f(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
//! use outbox::dlq::{DeadLetters, Filter};
//! let dlq = DeadLetters::new(pool, outbox::Tables::default())?;
//! for row in dlq.list(&Filter::default().queue("orders")).await? {
//!     println!("{} failed: {} ({:?})", row.original_id, row.failure_reason, row.last_error);
//! }
//! let replayed = dlq.replay(&Filter::default().queue("orders")).await?;
//! # let _ = replayed; Ok(()) }
//! ```

use crate::{Error, TableName, Tables};
use sqlx::{PgPool, Row};
use std::collections::BTreeMap;

/// Which dead letters a command applies to. Empty means all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only ids from this one on.
    pub min_id: Option<i64>,
    /// Only ids up to this one.
    pub max_id: Option<i64>,
    /// Only rows that failed at or after this time (ms since the Unix epoch).
    pub since_ms: Option<i64>,
    /// At most this many rows (list and replay; default 1,000).
    pub limit: Option<i64>,
}

impl Filter {
    /// Only this queue.
    pub fn queue(mut self, q: impl Into<String>) -> Self {
        self.queue = Some(q.into());
        self
    }
    /// Only ids in `min..=max`.
    pub fn ids(mut self, min: i64, max: i64) -> Self {
        self.min_id = Some(min);
        self.max_id = Some(max);
        self
    }
    /// At most `n` rows.
    pub fn limit(mut self, n: i64) -> Self {
        self.limit = Some(n);
        self
    }
}

/// One dead letter.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Id in the dead-letter table.
    pub id: i64,
    /// Id the row had in the outbox.
    pub original_id: i64,
    /// Queue.
    pub queue: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: BTreeMap<String, serde_json::Value>,
    /// Partition key.
    pub partition_key: Option<String>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// Failed attempts.
    pub attempts: i32,
    /// Deliveries.
    pub deliveries: i32,
    /// Publish time, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Failure time, ms since the Unix epoch.
    pub failed_at_ms: i64,
    /// `deserialize`, `rejected`, `retries_exhausted` or `publish_rejected`.
    pub failure_reason: String,
    /// The last error message.
    pub last_error: Option<String>,
}

/// Operations on one dead-letter table.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    pool: PgPool,
    tables: Tables,
    dlq: TableName,
}

impl DeadLetters {
    /// The dead letters of `tables.dlq`; an error when the tables name none.
    pub fn new(pool: PgPool, tables: Tables) -> Result<Self, Error> {
        let dlq = tables.dlq.clone().ok_or_else(|| {
            Error::invalid(
                "no dead-letter table configured: name one in Tables::new(outbox, Some(dlq))",
            )
        })?;
        Ok(Self { pool, tables, dlq })
    }

    fn bind<'q>(
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        f: &'q Filter,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        q.bind(f.queue.as_deref())
            .bind(f.min_id)
            .bind(f.max_id)
            .bind(f.since_ms)
    }

    /// Lists matching dead letters, oldest first.
    pub async fn list(&self, f: &Filter) -> Result<Vec<DeadLetter>, Error> {
        let sql = crate::sql::dlq_list(&self.dlq);
        let rows = Self::bind(sqlx::query(&sql), f)
            .bind(f.limit.unwrap_or(1000))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let headers: sqlx::types::Json<BTreeMap<String, serde_json::Value>> =
                    r.try_get(4)?;
                Ok(DeadLetter {
                    id: r.try_get(0)?,
                    original_id: r.try_get(1)?,
                    queue: r.try_get(2)?,
                    payload: r.try_get(3)?,
                    headers: headers.0,
                    partition_key: r.try_get(5)?,
                    correlation_id: r.try_get(6)?,
                    attempts: r.try_get(7)?,
                    deliveries: r.try_get(8)?,
                    created_at_ms: r.try_get(9)?,
                    failed_at_ms: r.try_get(10)?,
                    failure_reason: r.try_get(11)?,
                    last_error: r.try_get(12)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Error::from)
    }

    /// Counts matching dead letters.
    pub async fn count(&self, f: &Filter) -> Result<i64, Error> {
        let sql = crate::sql::dlq_count(&self.dlq);
        Ok(Self::bind(sqlx::query(&sql), f)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?)
    }

    /// Moves matching dead letters back into the outbox, in one statement;
    /// returns the ids of the rows written. A replayed row keeps the id it
    /// had before it was dead-lettered (so the `outbox-id` header consumers
    /// de-duplicate on is the same as on any copy that reached the broker
    /// before), unless an outbox row holds that id now; then it gets a new one.
    pub async fn replay(&self, f: &Filter) -> Result<Vec<i64>, Error> {
        let sql = crate::sql::dlq_replay(&self.tables, &self.dlq);
        let rows = Self::bind(sqlx::query(&sql), f)
            .bind(f.limit.unwrap_or(1000))
            .bind(self.tables.channel())
            .bind(self.tables.outbox.quoted())
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.get::<i64, _>(0)).collect())
    }

    /// Deletes matching dead letters; returns how many.
    pub async fn purge(&self, f: &Filter) -> Result<u64, Error> {
        let sql = crate::sql::dlq_purge(&self.dlq);
        Ok(Self::bind(sqlx::query(&sql), f)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}

/// A row parked in the outbox after failing for good with no dead-letter table.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Parked {
    /// Row id.
    pub id: i64,
    /// Queue.
    pub queue: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Failed attempts.
    pub attempts: i32,
    /// Why it failed.
    pub failure_reason: Option<String>,
    /// The last error.
    pub last_error: Option<String>,
}

/// Lists parked rows (optionally of one queue), oldest first.
pub async fn list_parked(
    pool: &PgPool,
    tables: &Tables,
    queue: Option<&str>,
    limit: i64,
) -> Result<Vec<Parked>, Error> {
    let rows = sqlx::query(&crate::sql::parked_list(tables))
        .bind(queue)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Parked {
                id: r.try_get(0)?,
                queue: r.try_get(1)?,
                payload: r.try_get(2)?,
                attempts: r.try_get(6)?,
                failure_reason: r.try_get(10)?,
                last_error: r.try_get(11)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Error::from)
}

/// Makes parked rows pending again with a fresh retry budget; returns how many.
pub async fn unpark(pool: &PgPool, tables: &Tables, ids: &[i64]) -> Result<u64, Error> {
    Ok(sqlx::query(&crate::sql::unpark(tables))
        .bind(ids)
        .execute(pool)
        .await?
        .rows_affected())
}

/// Per-queue figures of an outbox table.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Queue.
    pub queue: String,
    /// Rows waiting (due or delayed), not leased.
    pub pending: i64,
    /// Rows leased right now.
    pub in_flight: i64,
    /// Rows parked.
    pub parked: i64,
    /// Age in seconds of the oldest row not parked (the outbox lag).
    pub oldest_pending_s: f64,
}

/// Figures per queue.
pub async fn queue_stats(pool: &PgPool, tables: &Tables) -> Result<Vec<QueueStats>, Error> {
    let rows = sqlx::query(&crate::sql::queue_stats(tables))
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(QueueStats {
                queue: r.try_get(0)?,
                pending: r.try_get(1)?,
                in_flight: r.try_get(2)?,
                parked: r.try_get(3)?,
                oldest_pending_s: r.try_get(4)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Error::from)
}
