//! Code of the book's chapter "Publishing"; scripts/book-test type-checks it.
#![allow(dead_code)]

use serde::Serialize;
use sqlx::PgPool;
use std::time::{Duration, SystemTime};

#[derive(Serialize)]
struct Order {
    id: i64,
    customer: String,
}

async fn plain(pool: &PgPool, order: &Order) -> Result<(), outbox::Error> {
    // ANCHOR: plain
    let mut tx = pool.begin().await?;
    // ... your business writes, with &mut *tx ...
    let row_id: i64 = outbox::publish(&mut *tx, "orders", order).await?;
    tx.commit().await?;
    // ANCHOR_END: plain
    let _ = row_id;
    Ok(())
}

async fn builder(pool: &PgPool, order: &Order) -> Result<(), outbox::Error> {
    let mut tx = pool.begin().await?;
    // ANCHOR: builder
    let row_id: Option<i64> = outbox::Message::json("orders", order)?
        .key(order.customer.clone()) // partition key: Kafka message key, unit of ordering
        .header("source", "checkout") // forwarded as a Kafka header
        .correlation_id("req-7f3a") // forwarded as the outbox-correlation-id header
        .publish(&mut *tx)
        .await?;
    // ANCHOR_END: builder
    tx.commit().await?;
    let _ = row_id;
    Ok(())
}

async fn bytes(pool: &PgPool) -> Result<(), outbox::Error> {
    // ANCHOR: bytes
    outbox::Message::bytes("images", vec![0x89, 0x50, 0x4e, 0x47])
        .publish(pool)
        .await?;
    // ANCHOR_END: bytes
    Ok(())
}

async fn delays(pool: &PgPool, order: &Order) -> Result<(), outbox::Error> {
    let mut tx = pool.begin().await?;
    // ANCHOR: delays
    // Handled no sooner than 15 minutes after the publish (database clock).
    outbox::Message::json("reminders", order)?
        .activate_in(Duration::from_secs(15 * 60))
        .publish(&mut *tx)
        .await?;

    // Handled no sooner than a given time.
    let tomorrow = SystemTime::now() + Duration::from_secs(24 * 3600);
    outbox::Message::json("reminders", order)?
        .activate_at(tomorrow)
        .publish(&mut *tx)
        .await?;
    // ANCHOR_END: delays
    tx.commit().await?;
    Ok(())
}

async fn timers(pool: &PgPool, order: &Order) -> Result<(), outbox::Error> {
    let mut tx = pool.begin().await?;
    // ANCHOR: timers
    use outbox::OnConflict;
    let timer = format!("cart-abandoned-{}", order.customer);

    // At most one pending "cart-abandoned" timer per customer: while one is
    // pending, this publish writes nothing and returns None.
    outbox::Message::json("carts", order)?
        .timer_id(timer.clone(), OnConflict::Ignore)
        .activate_in(Duration::from_secs(30 * 60))
        .publish(&mut *tx)
        .await?;

    // Push the pending timer back: payload, headers and due time are replaced.
    outbox::Message::json("carts", order)?
        .timer_id(timer.clone(), OnConflict::Replace)
        .activate_in(Duration::from_secs(30 * 60))
        .publish(&mut *tx)
        .await?;

    // The customer checked out: remove the timer. False when there was none,
    // or when it is being handled right now.
    let removed: bool = outbox::cancel_timer(&mut *tx, "carts", &timer).await?;
    // ANCHOR_END: timers
    tx.commit().await?;
    let _ = removed;
    Ok(())
}

async fn batch(pool: &PgPool, orders: &[Order]) -> Result<(), outbox::Error> {
    // ANCHOR: batch
    let messages = orders
        .iter()
        .map(|o| outbox::Message::json("orders", o).map(|m| m.key(o.customer.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let mut tx = pool.begin().await?;
    let ids: Vec<i64> = outbox::Outbox::default()
        .publish_batch(&mut *tx, messages)
        .await?;
    tx.commit().await?;
    // ANCHOR_END: batch
    let _ = ids;
    Ok(())
}

async fn other_table(pool: &PgPool, order: &Order) -> Result<(), outbox::Error> {
    // ANCHOR: tables
    // The schema "billing" must exist; migrate creates tables, not schemas.
    let tables = outbox::Tables::new("billing.outbox", Some("billing.outbox_dlq"))?;
    outbox::migrate(pool, &tables).await?;
    let billing = outbox::Outbox::new(tables.clone());

    let mut tx = pool.begin().await?;
    billing.publish(&mut *tx, "invoices", order).await?;
    billing
        .publish_message(&mut *tx, outbox::Message::json("invoices", order)?.key("c-1"))
        .await?;
    tx.commit().await?;

    // The runtime must read the same tables:
    let app = outbox::App::new(pool.clone()).tables(tables);
    // ANCHOR_END: tables
    let _ = app;
    Ok(())
}
