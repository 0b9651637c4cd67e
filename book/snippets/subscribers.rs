//! Code of the book's chapter "Subscribers"; scripts/book-test type-checks it.
#![allow(dead_code)]

use outbox_kafka as kafka;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: i64,
    customer: String,
}

#[derive(Debug, Deserialize)]
struct Refund {
    id: i64,
}

// ANCHOR: all_options
#[outbox::subscriber(
    "refunds", "refunds.priority",          // one or more queues, first
    name = "refunds",                       // name in logs and errors
    concurrency = 10,                       // handlers in flight per worker
    workers = 2,                            // claim loops in this process
    batch_size = 50,                        // rows per claim
    lease_ttl = "2m",                       // how long a claim holds a row
    retry = outbox::ConstantRetry::new(Duration::from_secs(5)),
    dlq = "refunds_dlq",                    // dead-letter table (or: no_dlq)
    ack = "reject",                         // every error is final
    ordered,                                // one row per partition key at a time
)]
async fn refund(refund: Refund) -> Result<(), outbox::HandlerError> {
    if refund.id < 0 {
        return Err(outbox::HandlerError::reject("negative refund id"));
    }
    Ok(())
}
// ANCHOR_END: all_options

// ANCHOR: context
#[derive(Clone)]
struct Mailer {
    from: String,
}

#[outbox::subscriber("welcome-mails")]
async fn welcome(
    customer: String,              // the payload (any serde type)
    meta: outbox::Meta,            // id, queue, headers, attempt, key, correlation id
    mailer: outbox::State<Mailer>, // given with App::state(Mailer { .. })
    pool: PgPool,                  // the app's pool
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO mails (recipient, sender, row_id) VALUES ($1, $2, $3)")
        .bind(&customer)
        .bind(&mailer.0.from)
        .bind(meta.id)
        .execute(&pool)
        .await?;
    Ok(())
}

async fn run(pool: PgPool) -> Result<(), outbox::Error> {
    outbox::App::new(pool)
        .state(Mailer {
            from: "shop@example.com".into(),
        })
        .run_until_signal()
        .await
}
// ANCHOR_END: context

// ANCHOR: manual_ack
#[outbox::subscriber("webhooks")]
async fn deliver(body: serde_json::Value, ack: outbox::Ack, meta: outbox::Meta) {
    match post(&body).await {
        Ok(200..=299) => ack.ack(),
        // The receiver asked us to come back later: our delay, not the strategy's.
        Ok(429) => ack.nack(Some(Duration::from_secs(60)), "receiver rate-limited us"),
        Ok(status) if meta.attempt >= 5 => ack.reject(format!("status {status} five times")),
        Ok(status) => ack.nack(None, format!("status {status}")),
        Err(e) => ack.nack(None, e),
    }
}
// ANCHOR_END: manual_ack

async fn post(_body: &serde_json::Value) -> Result<u16, String> {
    Ok(200)
}

// ANCHOR: returns
#[derive(Serialize)]
struct OrderAccepted {
    id: i64,
}

// The return value is sent to the topic; the Kafka key is the row's partition key.
#[kafka::publisher("orders.accepted")]
#[outbox::subscriber("orders")]
async fn accept(order: Order) -> Result<OrderAccepted, outbox::HandlerError> {
    Ok(OrderAccepted { id: order.id })
}

// outbox::Keyed chooses the key; several publishers send the same message.
#[kafka::publisher("invoices.v1")]
#[kafka::publisher("audit")]
#[outbox::subscriber("invoices")]
async fn invoice(order: Order) -> outbox::Keyed<OrderAccepted> {
    outbox::Keyed::new(order.customer, OrderAccepted { id: order.id })
}

// outbox::Raw: the payload's bytes as published, and bytes sent as they are.
#[kafka::publisher("images.raw")]
#[outbox::subscriber("images")]
async fn forward(image: outbox::Raw) -> outbox::Raw {
    image
}
// ANCHOR_END: returns

// ANCHOR: explicit
async fn only_some(pool: PgPool) -> Result<(), Box<dyn std::error::Error>> {
    // App::manual runs only the handlers it is given, not every one in the binary.
    outbox::App::manual(pool)
        .subscriber(accept)
        .subscriber(refund)
        .broker(kafka::Broker::from_env()?)
        .run_until_signal()
        .await?;
    Ok(())
}
// ANCHOR_END: explicit

// ANCHOR: plain
fn audit_subscriber() -> outbox::Subscriber {
    outbox::Subscriber::new(
        "audit",
        |env: Arc<outbox::Envelope>, _ctx: outbox::Context| async move {
            tracing::info!(id = env.id, bytes = env.payload.len(), "audited");
            Ok(outbox::Output::none())
        },
    )
    .queue("audit")
    .batch_size(200)
    .poll_interval(Duration::from_millis(20), Duration::from_millis(500))
    .retry(outbox::NoRetry)
}

async fn with_plain(pool: PgPool) -> Result<(), outbox::Error> {
    outbox::App::new(pool)
        .register(audit_subscriber())
        .run_until_signal()
        .await
}
// ANCHOR_END: plain
