//! The handler-mode application of the chaos run (`scripts/chaos`, driven by
//! `examples/chaos.rs`): a subscriber on the queue `chaos` with a stacked Kafka
//! publisher that forwards every row, unchanged, to the topic `chaos.handler`.
//!
//! It runs until SIGINT/SIGTERM and then exits 0 (in-flight rows finished or
//! released, the producer flushed). The chaos driver starts two of it at once,
//! `kill -9`s them at random moments, restarts Kafka and PostgreSQL under it,
//! pauses Kafka for longer than the lease and runs `VACUUM FULL` on the outbox.
//!
//! One payload is poison: a [`Numbered`] with `n` = [`POISON`] (`u64::MAX`,
//! never a number of the run) makes the handler abort the whole process
//! (`std::process::abort()`), the way a segfaulting library or an
//! out-of-memory kill would. The driver publishes exactly one of them per run
//! and expects the runtime to dead-letter it as `crashed` after
//! `max_deliveries` (3 here) deliveries that never settled, so the process
//! crashes at most 3 times because of it. At start the process prints its
//! subscriber's settings (`chaos_handler: settings ...`) for the driver to check.
//!
//! ```text
//! DATABASE_URL=postgres://outbox:outbox@127.0.0.1:5432/outbox_chaos_handler \
//!     cargo run --release --example chaos_handler
//! ```
//!
//! Environment: `DATABASE_URL` (default
//! `postgres://outbox:outbox@127.0.0.1:5432/outbox`), `KAFKA_BROKERS` or
//! `PUBLISHER_URL` and every `KAFKA_*` setting of
//! `outbox_kafka::BrokerConfig::from_env`, `RUST_LOG`.

use std::time::Duration;

use outbox::App;
use outbox_kafka as kafka;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;

/// The topic every row is forwarded to (the driver creates it).
pub const TOPIC: &str = "chaos.handler";

/// The reserved number of the poison message: its handler aborts the process.
pub const POISON: u64 = u64::MAX;

/// One numbered message of the chaos run.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Numbered {
    /// The run it belongs to.
    run: String,
    /// Its number, 0 to N-1, or [`POISON`].
    n: u64,
}

/// Forwards each row to `chaos.handler`, and aborts the process on the
/// poison message. Retries are fast and practically unbounded, so that Kafka
/// or PostgreSQL being down for a while never dead-letters a row; the lease
/// is short so that rows of a killed (or crashed) instance come back quickly,
/// and so that the driver's Kafka pause (longer than the lease) stays short.
/// `max_deliveries` bounds the crashes the poison row causes.
#[kafka::publisher("chaos.handler")]
#[outbox::subscriber(
    "chaos",
    batch_size = 500,
    concurrency = 500,
    workers = 2,
    lease_ttl = "15s",
    max_deliveries = 3,
    retry = outbox::ExponentialRetry::default()
        .initial(Duration::from_millis(200))
        .max_delay(Duration::from_secs(2))
        .max_attempts(100_000)
        .max_total_delay(Duration::from_secs(86_400))
)]
async fn forward(message: Numbered) -> Numbered {
    if message.n == POISON {
        eprintln!(
            "chaos_handler: poison message of run {}: aborting the process",
            message.run
        );
        std::process::abort();
    }
    message
}

/// `name: value` out of a `Debug` rendering (`lease_ttl: 15s, ...`).
fn debug_field<'a>(debug: &'a str, name: &str) -> &'a str {
    let pat = format!("{name}: ");
    debug
        .find(&pat)
        .map(|i| &debug[i + pat.len()..])
        .and_then(|rest| rest.split([',', ' ', '}']).next())
        .unwrap_or("?")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,outbox=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://outbox:outbox@127.0.0.1:5432/outbox".to_owned());
    // The database may be restarting while we start: retry the connection.
    let mut backoff = Duration::from_millis(200);
    let pool = loop {
        match PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&url)
            .await
        {
            Ok(pool) => break pool,
            Err(e) => {
                tracing::warn!("cannot connect to the database ({e}); retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    let broker = kafka::Broker::from_env()?;
    let app = App::new(pool).broker(broker);
    // The driver reads this line to check the figures it relies on (the
    // lease its Kafka pause must exceed, the bound on the poison's crashes).
    for sub in app.subscribers() {
        let d = format!("{sub:?}");
        eprintln!(
            "chaos_handler: settings subscriber={} batch_size={} workers={} lease_ttl={} max_deliveries={}",
            sub.name(),
            debug_field(&d, "batch_size"),
            debug_field(&d, "workers"),
            debug_field(&d, "lease_ttl"),
            debug_field(&d, "max_deliveries"),
        );
    }
    app.run_until_signal().await?;
    eprintln!("chaos_handler: stopped");
    Ok(())
}
