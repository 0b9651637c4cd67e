//! Connection poolers between the library and PostgreSQL, and how statements
//! are sent through them.
//!
//! By default every statement is prepared once per connection and cached
//! (sqlx's named statements): the fastest path, on a direct connection or
//! through a pooler in session mode. A pooler in transaction mode (PgBouncer
//! with `pool_mode = transaction`, before 1.21 or with
//! `max_prepared_statements = 0`) hands each transaction to whichever server
//! connection is free, so a statement prepared on one is unknown on the next
//! (`prepared statement "sqlx_s_2" does not exist`), or another client's
//! statement of the same name is run instead. Even an unnamed statement is
//! sent in two exchanges (parse and describe, then bind and execute), and
//! outside a transaction block PgBouncer may send the second to another
//! server connection, where it runs whatever statement that connection parsed
//! last, with these parameters. [`Pooler::Transaction`] therefore sends every
//! statement unnamed, inside a transaction block: the caller's, or one of its
//! own.
//!
//! ```no_run
//! # async fn f(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
//! use outbox::{App, Outbox, Pooler};
//! let outbox = Outbox::default().pooler(Pooler::Transaction);
//! let mut tx = pool.begin().await?;
//! outbox.publish(&mut *tx, "orders", &1).await?;
//! tx.commit().await?;
//! App::new(pool)
//!     .pooler(Pooler::Transaction)
//!     .listen_url("postgres://outbox:outbox@db-host:5432/outbox")
//!     .run_until_signal()
//!     .await?;
//! # Ok(()) }
//! ```

use sqlx::postgres::{PgArguments, PgQueryResult, PgRow};
use sqlx::{PgPool, Postgres};

/// A statement with its parameters bound.
pub(crate) type Statement<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// What sits between the library and PostgreSQL, which decides how its
/// statements are sent (see [the module](crate::pooler)).
///
/// ```
/// use outbox::Pooler;
/// assert_eq!(Pooler::default(), Pooler::None);
/// assert_eq!("transaction".parse::<Pooler>().unwrap(), Pooler::Transaction);
/// assert!("statement".parse::<Pooler>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Pooler {
    /// Direct connections, or a pooler in session mode (the default):
    /// statements are prepared once per connection and cached.
    #[default]
    None,
    /// A pooler in transaction mode without prepared-statement support
    /// (PgBouncer `pool_mode = transaction` before 1.21, or with
    /// `max_prepared_statements = 0`): every statement is unnamed and runs
    /// inside a transaction block, the caller's or one of its own (two more
    /// round trips for a statement outside the caller's transaction).
    /// LISTEN cannot go through such a pooler: the app listens on
    /// [`crate::App::listen_url`], or polls without it.
    Transaction,
}

impl std::str::FromStr for Pooler {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "session" => Ok(Self::None),
            "transaction" => Ok(Self::Transaction),
            _ => Err(crate::Error::invalid(format!(
                "invalid pooler {s:?}: accepted are \"none\" (a direct connection, the default), \
                 \"session\" (a pooler in session mode, same as none) and \"transaction\" \
                 (PgBouncer or another pooler in transaction mode)"
            ))),
        }
    }
}

impl std::fmt::Display for Pooler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Transaction => "transaction",
        })
    }
}

impl Pooler {
    /// Whether statements are prepared and cached per connection.
    pub(crate) fn prepares(self) -> bool {
        self == Self::None
    }

    /// Whether statements outside the caller's transaction need one of their own.
    pub(crate) fn needs_transaction(self) -> bool {
        self == Self::Transaction
    }

    /// Runs `q` on `pool` and returns its rows, as this pooler needs it.
    pub(crate) async fn fetch_all(
        self,
        pool: &PgPool,
        q: Statement<'_>,
    ) -> Result<Vec<PgRow>, sqlx::Error> {
        if !self.needs_transaction() {
            return q.fetch_all(pool).await;
        }
        let mut tx = pool.begin().await?;
        let rows = q.persistent(false).fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Runs `q` on `pool`, as this pooler needs it.
    pub(crate) async fn execute(
        self,
        pool: &PgPool,
        q: Statement<'_>,
    ) -> Result<PgQueryResult, sqlx::Error> {
        if !self.needs_transaction() {
            return q.execute(pool).await;
        }
        let mut tx = pool.begin().await?;
        let done = q.persistent(false).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done)
    }
}
