// Context arguments in any position and under any path; every option.
use outbox::{Ack, Context, Meta, State};
use sqlx::PgPool;
use std::time::Duration;

#[derive(Clone)]
struct Config {
    greeting: String,
}

#[outbox::subscriber(
    "greetings",
    concurrency = 4,
    workers = 2,
    batch_size = 10,
    lease_ttl = "2m",
    max_deliveries = 3,
    retry = outbox::ConstantRetry::new(Duration::from_secs(1)),
    no_dlq,
    ordered = true,
)]
async fn greet(meta: Meta, cfg: State<Config>, name: String, pool: PgPool, ctx: Context) {
    let _ = (meta.id, cfg.0.greeting, name, pool, ctx);
}

#[outbox::subscriber("manual")]
async fn manual(ack: Ack, (a, b): (i64, i64), meta: outbox::Meta, state: outbox::State<u32>) {
    if a + b > 0 {
        ack.ack();
    } else {
        ack.reject(format!("row {} has no positive sum ({})", meta.id, state.0));
    }
}

#[outbox::subscriber("rejecting", ack = "reject", dlq = "my_dead_letters", ordered)]
async fn rejecting(mut body: serde_json::Value) {
    body["seen"] = true.into();
}

fn main() {
    let sub = greet::subscriber();
    sub.validate().unwrap();
    assert!(format!("{sub:?}").contains("lease_ttl: 120s"), "{sub:?}");
    assert!(format!("{sub:?}").contains("max_deliveries: 3"), "{sub:?}");
    let sub = manual::subscriber();
    assert!(format!("{sub:?}").contains("ack: Manual"), "{sub:?}");
    let sub = rejecting::subscriber();
    assert!(format!("{sub:?}").contains("ack: RejectOnError"), "{sub:?}");
    assert!(format!("{sub:?}").contains("ordered: true"), "{sub:?}");
}
