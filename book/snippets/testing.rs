//! Code of the book's chapter "Testing your handlers"; scripts/book-test type-checks it.
#![allow(dead_code)]

use outbox::{Context, Envelope, HandlerError, Meta, Output, State};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

// ANCHOR: handler
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Order {
    id: i64,
    total_cents: i64,
}

#[derive(Clone)]
struct Limits {
    max_cents: i64,
}

#[outbox::subscriber("orders")]
async fn check(order: Order, limits: State<Limits>, meta: Meta) -> Result<i64, HandlerError> {
    if order.total_cents > limits.0.max_cents {
        return Err(HandlerError::reject(format!(
            "order {} (row {}) is over the limit",
            order.id, meta.id
        )));
    }
    Ok(order.id)
}
// ANCHOR_END: handler

// ANCHOR: tests
#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta::from(&Envelope::new(1, "orders", Vec::new()))
    }

    #[tokio::test]
    async fn accepts_small_orders() {
        let order = Order { id: 7, total_cents: 500 };
        let got = check(order, State(Limits { max_cents: 1000 }), meta()).await;
        assert_eq!(got.unwrap(), 7);
    }

    #[tokio::test]
    async fn rejects_large_orders_without_retries() {
        let order = Order { id: 8, total_cents: 5000 };
        let err = check(order, State(Limits { max_cents: 1000 }), meta())
            .await
            .unwrap_err();
        assert!(!err.is_transient(), "a rejected order must not be retried");
    }

    #[test]
    fn the_published_json_decodes() {
        let env = Envelope::new(1, "orders", br#"{"id":7,"total_cents":500}"#.to_vec())
            .with_key("customer-1")
            .with_header("source", "test");
        let order: Order = env.json().unwrap();
        assert_eq!(order, Order { id: 7, total_cents: 500 });
    }
}
// ANCHOR_END: tests

// ANCHOR: plain
/// A handler written with the plain API, registered with
/// `App::register(Subscriber::new("audit", audit).queue("audit"))`.
async fn audit(env: Arc<Envelope>, ctx: Context) -> Result<Output, HandlerError> {
    let limits = ctx.state::<Limits>().ok_or_else(|| HandlerError::transient("no limits"))?;
    if env.payload.len() as i64 > limits.max_cents {
        return Err(HandlerError::reject("payload too large"));
    }
    Ok(Output::none())
}

#[tokio::test]
async fn audit_refuses_large_payloads() {
    let env = Arc::new(Envelope::new(1, "audit", vec![0; 100]));
    let ctx = Context::for_tests().with_state(Limits { max_cents: 10 });
    let err = audit(env, ctx).await.unwrap_err();
    assert!(!err.is_transient());
}
// ANCHOR_END: plain

fn registered() -> outbox::Subscriber {
    outbox::Subscriber::new("audit", audit).queue("audit")
}
