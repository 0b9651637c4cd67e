//! Tutorial 1 of the book, "Your first outbox app".
//!
//! Writes an order and its outbox row in one transaction, then watches the
//! subscriber handle it:
//!
//! ```text
//! cargo run --example first_app -- commit     # the order is handled
//! cargo run --example first_app -- rollback   # nothing is handled
//! ```
//!
//! Needs PostgreSQL (`scripts/services up`); `DATABASE_URL` overrides the
//! default `postgres://outbox:outbox@127.0.0.1:5432/outbox`. The program exits
//! once the outbox has nothing left for it to do.

use std::time::{Duration, Instant};

use outbox::{App, Tables};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

// ANCHOR: message
/// The business event: an order was placed.
#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: i64,
    customer: String,
}
// ANCHOR_END: message

// ANCHOR: subscriber
/// Called once for every committed outbox row of the queue "orders".
#[outbox::subscriber("orders")]
async fn handle(order: Order) {
    tracing::info!("got order {}", order.id);
}
// ANCHOR_END: subscriber

/// What to do with the transaction that writes the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Commit,
    Rollback,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // ANCHOR: setup
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .without_time()
        .init();

    let mode = match std::env::args().nth(1).as_deref() {
        None | Some("commit") => Mode::Commit,
        Some("rollback") => Mode::Rollback,
        Some(other) => {
            return Err(format!("unknown mode {other:?}; accepted: commit, rollback").into())
        }
    };

    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://outbox:outbox@127.0.0.1:5432/outbox".to_owned());
    let pool = PgPool::connect(&url).await?;
    // ANCHOR_END: setup

    // ANCHOR: migrate
    // Creates the tables `outbox` and `outbox_dlq` (once; later calls do nothing).
    outbox::migrate(&pool, &Tables::default()).await?;
    // The application's own table.
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS orders (id bigserial PRIMARY KEY, customer text NOT NULL)",
    )
    .execute(&pool)
    .await?;
    // ANCHOR_END: migrate

    // ANCHOR: start
    // Finds every #[outbox::subscriber] in the binary and starts claiming rows.
    let running = App::new(pool.clone()).start().await?;
    // ANCHOR_END: start

    // ANCHOR: publish
    let mut tx = pool.begin().await?;
    // The business write...
    let id: i64 = sqlx::query_scalar("INSERT INTO orders (customer) VALUES ($1) RETURNING id")
        .bind("alice")
        .fetch_one(&mut *tx)
        .await?;
    let order = Order {
        id,
        customer: "alice".to_owned(),
    };
    // ...and the message, in the same transaction.
    let row = outbox::publish(&mut *tx, "orders", &order).await?;
    match mode {
        Mode::Commit => {
            tx.commit().await?;
            tracing::info!("committed order {id} (outbox row {row})");
        }
        Mode::Rollback => {
            tx.rollback().await?;
            tracing::info!("rolled back order {id} (outbox row {row})");
        }
    }
    // ANCHOR_END: publish

    // ANCHOR: wait
    // Wait until the outbox row is gone (handled and deleted), at most 30 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    while outbox_has_row(&pool, row).await? {
        if Instant::now() > deadline {
            running.shutdown().await;
            return Err(format!("outbox row {row} was not handled within 30 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if mode == Mode::Rollback {
        // Give the subscriber time to prove there is nothing to handle.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let saved: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1)")
        .bind(id)
        .fetch_one(&pool)
        .await?;
    if saved {
        tracing::info!("order {id} is in table orders, outbox row {row} is gone; stopping");
    } else {
        tracing::info!(
            "order {id} is not in table orders, outbox row {row} never existed; stopping"
        );
    }
    running.shutdown().await;
    // ANCHOR_END: wait
    Ok(())
}

async fn outbox_has_row(pool: &PgPool, id: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox WHERE id = $1)")
        .bind(id)
        .fetch_one(pool)
        .await
}
