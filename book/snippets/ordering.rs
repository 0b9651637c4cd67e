//! Code of the book's chapter "Per-key ordering"; scripts/book-test type-checks it.
#![allow(dead_code)]

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Debug, Serialize, Deserialize)]
struct BalanceChange {
    account: i64,
    delta_cents: i64,
}

// ANCHOR: subscriber
// The changes of one account are applied one at a time, in the order they
// were published; different accounts are applied side by side.
#[outbox::subscriber("balance-changes", ordered)]
async fn apply(change: BalanceChange) -> Result<(), outbox::HandlerError> {
    tracing::info!(account = change.account, delta = change.delta_cents, "applied");
    Ok(())
}
// ANCHOR_END: subscriber

async fn change_balance(pool: &PgPool, change: &BalanceChange) -> Result<(), outbox::Error> {
    // ANCHOR: publish
    let mut tx = pool.begin().await?;
    // Lock the account row: two changes of one account are then published one
    // transaction after the other, so their ids are in the order of the changes.
    sqlx::query("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(change.account)
        .execute(&mut *tx)
        .await?;
    // ... update the balance with &mut *tx ...
    outbox::Message::json("balance-changes", change)?
        .key(change.account.to_string()) // the unit of ordering
        .publish(&mut *tx)
        .await?;
    tx.commit().await?;
    // ANCHOR_END: publish
    Ok(())
}

#[test]
fn the_attribute_turns_ordering_on() {
    assert!(format!("{:?}", apply::subscriber()).contains("ordered: true"));
}
