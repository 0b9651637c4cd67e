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

// ANCHOR: tuned
async fn tuned(pool: PgPool, workers: usize) -> Result<(), outbox::Error> {
    // The settings the attribute wrote, changed at run time (from configuration, say).
    outbox::App::manual(pool)
        .register(refund::subscriber().workers(workers).batch_size(20))
        .run_until_signal()
        .await
}
// ANCHOR_END: tuned

// ANCHOR: library
// In the binary: the handlers of the library crate `outbox_handlers_lib` are
// registered only if the linker keeps that crate. A binary that names nothing
// from it must say so, or App::new finds none of its handlers.
use outbox_handlers_lib as _;
// ANCHOR_END: library

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool that never connects: `App::subscribers` and `App::validate` read no table.
    fn lazy_pool() -> PgPool {
        PgPool::connect_lazy("postgres://outbox:outbox@127.0.0.1:5432/outbox").unwrap()
    }

    #[tokio::test]
    async fn app_new_finds_the_handlers_of_the_binary_and_of_linked_libraries() {
        let names: Vec<String> = outbox::App::new(lazy_pool())
            .subscribers()
            .iter()
            .map(|s| s.name().to_owned())
            .collect();
        for name in ["refunds", "welcome", "deliver", "accept", "invoice", "forward"] {
            assert!(names.iter().any(|n| n == name), "{name} missing in {names:?}");
        }
        // From the library crate, thanks to `use outbox_handlers_lib as _;`.
        for name in ["greet", "count_words"] {
            assert!(names.iter().any(|n| n == name), "{name} missing in {names:?}");
        }
        // The plain subscriber is not an annotated handler: only App::register adds it.
        assert!(!names.iter().any(|n| n == "audit"));
    }

    #[tokio::test]
    async fn app_manual_runs_only_what_it_is_given() {
        let subs = outbox::App::manual(lazy_pool())
            .subscriber(accept)
            .subscriber(refund)
            .subscribers();
        let mut names: Vec<&str> = subs.iter().map(|s| s.name()).collect();
        names.sort();
        assert_eq!(names, ["accept", "refunds"]);
    }

    #[test]
    fn the_attribute_sets_the_subscriber() {
        let sub = refund::subscriber();
        assert_eq!(sub.name(), "refunds");
        assert_eq!(
            sub.queues(),
            &outbox::Queues::Named(vec!["refunds".into(), "refunds.priority".into()])
        );
        let invoice = invoice::subscriber();
        let topics: Vec<&str> = invoice
            .publishers()
            .iter()
            .map(|p| p.topic.as_str())
            .collect();
        assert_eq!(topics.len(), 2);
        assert!(topics.contains(&"invoices.v1") && topics.contains(&"audit"));
    }

    #[tokio::test]
    async fn every_problem_is_reported_at_once() {
        // ANCHOR: validate
        // Three handlers publish to Kafka (one of them to two topics), but no
        // broker was added: validate() lists all four problems in one error.
        let err = outbox::App::new(lazy_pool()).validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid configuration (4 problems):"), "{err}");
        assert!(err.contains(
            "publishes to kafka topic \"orders.accepted\" but no kafka broker is configured"
        ));
        // ANCHOR_END: validate
    }
}
