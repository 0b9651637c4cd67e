//! Code of the book's chapter "Shutdown"; scripts/book-test type-checks it.
#![allow(dead_code)]

use sqlx::PgPool;
use std::time::Duration;

async fn timeout(pool: PgPool) -> Result<(), outbox::Error> {
    // ANCHOR: timeout
    outbox::App::new(pool)
        .shutdown_timeout(Duration::from_secs(20))
        .run_until_signal()
        .await?;
    // ANCHOR_END: timeout
    Ok(())
}
