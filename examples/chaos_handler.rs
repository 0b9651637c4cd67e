//! The handler-mode application of the chaos run (`scripts/chaos`, driven by
//! `examples/chaos.rs`): a subscriber on the queue `chaos` with a stacked Kafka
//! publisher that forwards every row, unchanged, to the topic `chaos.handler`.
//!
//! It runs until SIGINT/SIGTERM and then exits 0 (in-flight rows finished or
//! released, the producer flushed). The chaos driver starts two of it at once,
//! `kill -9`s them at random moments and restarts Kafka and PostgreSQL under it.
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

/// One numbered message of the chaos run.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Numbered {
    /// The run it belongs to.
    run: String,
    /// Its number, 0 to N-1.
    n: u64,
}

/// Forwards each row to `chaos.handler`. Retries are fast and practically
/// unbounded, so that Kafka or PostgreSQL being down for a while never
/// dead-letters a row; the lease is short so that rows of a killed instance
/// come back quickly.
#[kafka::publisher("chaos.handler")]
#[outbox::subscriber(
    "chaos",
    batch_size = 500,
    concurrency = 500,
    workers = 2,
    lease_ttl = "20s",
    retry = outbox::ExponentialRetry::default()
        .initial(Duration::from_millis(200))
        .max_delay(Duration::from_secs(2))
        .max_attempts(100_000)
        .max_total_delay(Duration::from_secs(86_400))
)]
async fn forward(message: Numbered) -> Numbered {
    message
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
    App::new(pool).broker(broker).run_until_signal().await?;
    eprintln!("chaos_handler: stopped");
    Ok(())
}
