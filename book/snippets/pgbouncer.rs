//! Code of the book's chapter "PgBouncer and other poolers"; scripts/book-test type-checks it.
#![allow(dead_code)]

use outbox::{App, Outbox, Pooler};

// ANCHOR: run
/// `DATABASE_URL` goes through PgBouncer (transaction mode);
/// `DATABASE_DIRECT_URL` is PostgreSQL itself, for LISTEN.
async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let pool = sqlx::PgPool::connect(&std::env::var("DATABASE_URL")?).await?;
    outbox::migrate(&pool, &outbox::Tables::default()).await?; // safe through PgBouncer
    App::new(pool)
        .pooler(Pooler::Transaction)
        .listen_url(std::env::var("DATABASE_DIRECT_URL")?) // leave out to poll instead
        .run_until_signal()
        .await?;
    Ok(())
}
// ANCHOR_END: run

// ANCHOR: publish
async fn place_order(pool: &sqlx::PgPool, order_id: i64) -> Result<(), outbox::Error> {
    let outbox = Outbox::default().pooler(Pooler::Transaction);
    let mut tx = pool.begin().await?; // always a transaction through PgBouncer
    // ... the business insert with &mut *tx ...
    outbox.publish(&mut *tx, "orders", &order_id).await?;
    tx.commit().await?;
    Ok(())
}
// ANCHOR_END: publish

#[test]
fn the_setting_parses() {
    assert_eq!("transaction".parse::<Pooler>().unwrap(), Pooler::Transaction);
}
