//! Code of the book's chapter "Log capture"; scripts/book-test type-checks it.
#![allow(dead_code)]

use outbox::{Capture, Message, Outbox, Tables};
use sqlx::PgPool;

#[derive(serde::Serialize)]
struct Order {
    id: i64,
}

async fn publish(pool: PgPool) -> Result<(), outbox::Error> {
    // ANCHOR: publish
    // Build it once and share it: it only holds the table names and the mode.
    let outbox = Outbox::new(Tables::default()).capture(Capture::Log);

    let mut tx = pool.begin().await?;
    // ... the business insert, in the same transaction ...
    let id: i64 = outbox.publish(&mut *tx, "orders", &Order { id: 1 }).await?;
    outbox
        .publish_message(
            &mut *tx,
            Message::json("orders", &Order { id: 2 })?
                .key("customer-7")
                .header("source", "checkout"),
        )
        .await?;
    // Delayed: written to the outbox table, as in table mode.
    outbox
        .publish_message(
            &mut *tx,
            Message::json("reminders", &Order { id: 1 })?
                .activate_in(std::time::Duration::from_secs(3600)),
        )
        .await?;
    tx.commit().await?;
    // ANCHOR_END: publish
    let _ = id;
    Ok(())
}

async fn app(pool: PgPool) -> Result<(), outbox::Error> {
    // ANCHOR: app
    use outbox::stream::LogCapture;

    // The replication connection needs the URL (and the REPLICATION attribute).
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    outbox::App::new(pool)
        .capture_log(LogCapture::new(url).slot("orders_app"))
        .run_until_signal()
        .await
    // ANCHOR_END: app
}
