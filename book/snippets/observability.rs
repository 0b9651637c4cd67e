//! Code of the book's chapter "Metrics and logs"; scripts/book-test type-checks it.
#![allow(dead_code)]

use sqlx::PgPool;
use std::time::Duration;

async fn metrics(pool: PgPool) -> Result<(), outbox::Error> {
    // ANCHOR: metrics_addr
    outbox::App::new(pool)
        .metrics_addr("0.0.0.0:9100".parse().unwrap())
        .run_until_signal()
        .await?;
    // ANCHOR_END: metrics_addr
    Ok(())
}

async fn endpoint(pool: PgPool, kafka_up: fn() -> bool) -> Result<(), outbox::Error> {
    // ANCHOR: endpoint
    use outbox::metrics::Endpoint;

    let endpoint = Endpoint::new("0.0.0.0:9100".parse().unwrap())
        .sample_interval(Duration::from_secs(15)) // row gauges; default 5 s
        .ready_check("kafka", move || async move {
            if kafka_up() {
                Ok(())
            } else {
                Err("no broker answers")
            }
        });
    let running = outbox::App::new(pool).metrics_endpoint(endpoint).start().await?;
    println!("metrics on {:?}", running.metrics_addr());
    // ANCHOR_END: endpoint
    running.shutdown().await;
    Ok(())
}

fn logging() -> Result<(), outbox::Error> {
    // ANCHOR: logging
    use outbox::logging::{init, LogFormat};

    // RUST_LOG filters (default info); LOG_FORMAT=json for one JSON object per line.
    init(LogFormat::from_env("LOG_FORMAT")?)?;
    // ANCHOR_END: logging
    Ok(())
}
