//! Tutorial 3 of the book, "Failures and dead letters".
//!
//! A payment handler whose provider is down: every attempt fails, the row is
//! retried on a short exponential schedule, then moved to the dead-letter
//! table. Then the provider comes back and the dead letter is replayed.
//!
//! ```text
//! cargo run --example retry_dlq             # the whole story, with the API
//! cargo run --example retry_dlq -- fail     # publish, fail three times, stop
//! cargo run --example retry_dlq -- recover  # provider up: handle what is pending, stop
//! ```
//!
//! Needs PostgreSQL (`scripts/services up`); `DATABASE_URL` overrides the
//! default `postgres://outbox:outbox@127.0.0.1:5432/outbox`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use outbox::dlq::{DeadLetter, DeadLetters, Filter};
use outbox::{App, HandlerError, Meta, Tables};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Debug, Serialize, Deserialize)]
struct Payment {
    id: i64,
    amount_cents: i64,
}

/// Stands in for a payment provider that is down until we say otherwise.
static PROVIDER_UP: AtomicBool = AtomicBool::new(false);

// ANCHOR: subscriber
#[outbox::subscriber(
    "payments",
    retry = outbox::ExponentialRetry::default()
        .initial(Duration::from_millis(200))
        .max_attempts(3)
)]
async fn charge(payment: Payment, meta: Meta) -> Result<(), HandlerError> {
    if !PROVIDER_UP.load(Ordering::SeqCst) {
        // Transient: the retry strategy decides when to try again.
        return Err(HandlerError::transient(format!(
            "payment provider unavailable (attempt {})",
            meta.attempt
        )));
    }
    tracing::info!(
        "charged payment {} ({} cents)",
        payment.id,
        payment.amount_cents
    );
    Ok(())
}
// ANCHOR_END: subscriber

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Everything, with the dead-letter API.
    All,
    /// Publish, let it fail into the dead letters, stop.
    Fail,
    /// The provider is up: handle what is pending, stop.
    Recover,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .without_time()
        .init();
    let mode = match std::env::args().nth(1).as_deref() {
        None | Some("all") => Mode::All,
        Some("fail") => Mode::Fail,
        Some("recover") => Mode::Recover,
        Some(other) => {
            return Err(format!("unknown mode {other:?}; accepted: all, fail, recover").into())
        }
    };
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://outbox:outbox@127.0.0.1:5432/outbox".to_owned());
    let pool = PgPool::connect(&url).await?;
    outbox::migrate(&pool, &Tables::default()).await?;

    if mode == Mode::Recover {
        PROVIDER_UP.store(true, Ordering::SeqCst);
        tracing::info!("the payment provider is back");
        let running = App::new(pool.clone()).start().await?;
        wait_until_no_pending_payments(&pool).await?;
        tracing::info!("no payment left in the outbox; stopping");
        running.shutdown().await;
        return Ok(());
    }

    let running = App::new(pool.clone()).start().await?;

    // ANCHOR: publish
    let payment = Payment {
        id: 42,
        amount_cents: 1999,
    };
    let mut tx = pool.begin().await?;
    let row = outbox::publish(&mut *tx, "payments", &payment).await?;
    tx.commit().await?;
    tracing::info!("published payment {} (outbox row {row})", payment.id);
    // ANCHOR_END: publish

    // ANCHOR: list
    let dlq = DeadLetters::new(pool.clone(), Tables::default())?;
    let dead = wait_for_dead_letter(&dlq, row).await?;
    tracing::info!(
        "dead letter {}: outbox row {}, queue {}, {} attempts, reason {}, last error: {}",
        dead.id,
        dead.original_id,
        dead.queue,
        dead.attempts,
        dead.failure_reason,
        dead.last_error.as_deref().unwrap_or("-"),
    );
    // ANCHOR_END: list

    if mode == Mode::Fail {
        tracing::info!("stopping; the dead letter stays in table outbox_dlq");
        running.shutdown().await;
        return Ok(());
    }

    // ANCHOR: replay
    PROVIDER_UP.store(true, Ordering::SeqCst);
    tracing::info!(
        "the payment provider is back; replaying dead letter {}",
        dead.id
    );
    let only_this_one = Filter::default().queue("payments").ids(dead.id, dead.id);
    let new_rows = dlq.replay(&only_this_one).await?;
    tracing::info!("replayed as outbox row(s) {new_rows:?}");
    // ANCHOR_END: replay

    wait_until_no_pending_payments(&pool).await?;
    tracing::info!("no payment left in the outbox; stopping");
    running.shutdown().await;
    Ok(())
}

/// Polls the dead letters until outbox row `row` shows up there (at most 30 s).
async fn wait_for_dead_letter(
    dlq: &DeadLetters,
    row: i64,
) -> Result<DeadLetter, Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // ANCHOR: list_call
        let letters = dlq.list(&Filter::default().queue("payments")).await?;
        // ANCHOR_END: list_call
        if let Some(dead) = letters.into_iter().find(|d| d.original_id == row) {
            return Ok(dead);
        }
        if Instant::now() > deadline {
            return Err(
                format!("outbox row {row} did not reach the dead letters within 30 s").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls until the outbox has no pending (unparked) row of queue "payments" (at most 30 s).
async fn wait_until_no_pending_payments(pool: &PgPool) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE queue = 'payments' AND parked_at IS NULL",
        )
        .fetch_one(pool)
        .await?;
        if pending == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{pending} payment(s) still pending after 30 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
