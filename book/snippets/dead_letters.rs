//! Code of the book's chapter "Dead letters and parked rows"; scripts/book-test type-checks it.
#![allow(dead_code)]

use outbox::dlq::{self, DeadLetters, Filter};
use outbox::Tables;
use sqlx::PgPool;

async fn dead_letters(pool: PgPool) -> Result<(), outbox::Error> {
    // ANCHOR: api
    let dlq = DeadLetters::new(pool.clone(), Tables::default())?;

    // Dead letters of queue "payments", oldest first, at most 50.
    let filter = Filter::default().queue("payments").limit(50);
    for d in dlq.list(&filter).await? {
        println!(
            "{} (outbox row {}): {} after {} attempts: {}",
            d.id,
            d.original_id,
            d.failure_reason,
            d.attempts,
            d.last_error.as_deref().unwrap_or("-"),
        );
    }
    let how_many: i64 = dlq.count(&filter).await?;

    // Back into the outbox with their original ids and a fresh retry budget.
    let new_ids: Vec<i64> = dlq.replay(&Filter::default().queue("payments").ids(10, 20)).await?;

    // Gone for good.
    let purged: u64 = dlq.purge(&Filter::default().queue("test-junk")).await?;
    // ANCHOR_END: api
    let _ = (how_many, new_ids, purged);
    Ok(())
}

async fn parked(pool: PgPool) -> Result<(), outbox::Error> {
    // ANCHOR: parked
    let tables = Tables::default();
    let rows = dlq::list_parked(&pool, &tables, Some("payments"), 100).await?;
    let ids: Vec<i64> = rows.iter().map(|p| p.id).collect();
    // Pending again, with a fresh retry budget, under the same ids.
    let unparked: u64 = dlq::unpark(&pool, &tables, &ids).await?;
    // ANCHOR_END: parked
    let _ = unparked;
    Ok(())
}

async fn stats(pool: PgPool) -> Result<(), outbox::Error> {
    // ANCHOR: stats
    for q in dlq::queue_stats(&pool, &Tables::default()).await? {
        println!(
            "{}: {} pending, {} in flight, {} parked, oldest {:.1} s",
            q.queue, q.pending, q.in_flight, q.parked, q.oldest_pending_s
        );
    }
    // ANCHOR_END: stats
    Ok(())
}

// ANCHOR: no_dlq
#[outbox::subscriber("ledger", no_dlq)]
async fn post_to_ledger(entry: serde_json::Value) -> Result<(), outbox::HandlerError> {
    let _ = entry;
    Ok(())
}
// ANCHOR_END: no_dlq

#[test]
fn failure_reasons_as_stored() {
    use outbox::FailureReason;
    assert_eq!(FailureReason::Deserialize.as_str(), "deserialize");
    assert_eq!(FailureReason::Rejected.as_str(), "rejected");
    assert_eq!(FailureReason::RetriesExhausted.as_str(), "retries_exhausted");
    assert_eq!(FailureReason::PublishRejected.as_str(), "publish_rejected");
    assert_eq!(FailureReason::Crashed.as_str(), "crashed");
}
