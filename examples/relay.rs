//! The relay demo and tutorial 2 of the book, "Add a Kafka relay".
//!
//! A subscriber on the queue `orders` with a stacked Kafka publisher: every
//! order written to the outbox is logged (`got order 1`) and its return value
//! sent, as JSON, to the Kafka topic `orders.kafka`. At start-up the example
//! writes order 1 and its outbox row in one transaction.
//!
//! ```text
//! scripts/services up
//! cargo run --example relay                          # runs until Ctrl-C
//! RELAY_EXIT_WHEN_IDLE=1 cargo run --example relay   # exits once the outbox is empty
//! scripts/kafka-console-consumer --bootstrap-server 127.0.0.1:9092 \
//!     --topic orders.kafka --from-beginning --max-messages 1
//! ```
//!
//! Environment: `DATABASE_URL` (default
//! `postgres://outbox:outbox@127.0.0.1:5432/outbox`), `KAFKA_BROKERS` or
//! `PUBLISHER_URL` (default `127.0.0.1:9092`), every `KAFKA_*` setting of
//! `outbox_kafka::BrokerConfig::from_env`, `RELAY_EXIT_WHEN_IDLE` (`1`/`true`:
//! exit once nothing is left to do, for scripts and CI) and `RUST_LOG`.

use std::time::{Duration, Instant};

use outbox::{App, Tables};
use outbox_kafka as kafka;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

// ANCHOR: message
/// The business event: an order was placed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: i64,
    customer: String,
}
// ANCHOR_END: message

// ANCHOR: handler
/// Logs each order and forwards it to the Kafka topic `orders.kafka`. The row
/// leaves the outbox only after Kafka acknowledged the message.
#[kafka::publisher("orders.kafka")]
#[outbox::subscriber("orders")]
async fn handle(order: Order) -> Order {
    tracing::info!("got order {}", order.id);
    order
}
// ANCHOR_END: handler

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,librdkafka=warn".into()),
        )
        .without_time()
        .init();

    let exit_when_idle = match std::env::var("RELAY_EXIT_WHEN_IDLE") {
        Err(_) => false,
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "" | "0" | "false" | "no" | "off" => false,
            "1" | "true" | "yes" | "on" => true,
            other => {
                return Err(format!(
                    "RELAY_EXIT_WHEN_IDLE={other:?} is not a boolean; \
                     accepted: 1, true, yes, on, 0, false, no, off"
                )
                .into())
            }
        },
    };

    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://outbox:outbox@127.0.0.1:5432/outbox".to_owned());
    let pool = PgPool::connect(&url).await?;

    // ANCHOR: setup
    outbox::migrate(&pool, &Tables::default()).await?;
    // The application's own table.
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS relay_orders (id bigint PRIMARY KEY, customer text NOT NULL)",
    )
    .execute(&pool)
    .await?;

    // The broker reads KAFKA_BROKERS / PUBLISHER_URL and the KAFKA_* settings.
    let broker = kafka::Broker::from_env()?;
    // Created if missing (topics are never auto-created by a publish).
    broker.ensure_topic("orders.kafka", 1).await?;
    let running = App::new(pool.clone()).broker(broker).start().await?;
    // ANCHOR_END: setup

    // ANCHOR: publish
    // Order 1 and its outbox row, in one transaction.
    let order = Order {
        id: 1,
        customer: "alice".to_owned(),
    };
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO relay_orders (id, customer) VALUES ($1, $2) \
         ON CONFLICT (id) DO UPDATE SET customer = EXCLUDED.customer",
    )
    .bind(order.id)
    .bind(&order.customer)
    .execute(&mut *tx)
    .await?;
    let row_id = outbox::Message::json("orders", &order)?
        .key(order.id.to_string())
        .publish(&mut *tx)
        .await?
        .expect("a message without timer id is always written");
    tx.commit().await?;
    tracing::info!("published order {} (outbox row {row_id})", order.id);
    // ANCHOR_END: publish

    if !exit_when_idle {
        tracing::info!("running; Ctrl-C to stop");
        outbox::shutdown_signal().await;
        running.shutdown().await;
        return Ok(());
    }

    // Exit once the outbox has nothing left that is due (at most 60 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE queue = 'orders'")
            .fetch_one(&pool)
            .await?;
        if pending == 0 {
            break;
        }
        if Instant::now() > deadline {
            running.shutdown().await;
            return Err(format!("{pending} outbox rows still pending after 60 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!("outbox empty; stopping");
    running.shutdown().await;
    Ok(())
}
