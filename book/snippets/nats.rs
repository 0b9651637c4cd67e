//! Code of the book's chapter "Other brokers: NATS JetStream"; scripts/book-test
//! compiles and runs it.
#![allow(dead_code)]

use sqlx::PgPool;
use std::time::Duration;

#[derive(serde::Serialize, serde::Deserialize)]
struct Order {
    id: i64,
}

mod one {
    use super::Order;
    // ANCHOR: attribute
    use outbox_nats as nats;

    #[nats::publisher("orders.created")]
    #[outbox::subscriber("orders")]
    async fn handle(order: Order) -> Order {
        order
    }
    // ANCHOR_END: attribute
}

mod both {
    use super::Order;
    // ANCHOR: stacked
    use outbox_kafka as kafka;
    use outbox_nats as bus; // any alias works

    #[kafka::publisher("orders.kafka")]
    #[outbox::subscriber("orders")]
    #[bus::publisher("orders.created")]
    #[bus::publisher("audit.orders")]
    async fn handle(order: Order) -> outbox::Keyed<Order> {
        outbox::Keyed::new(format!("customer-{}", order.id), order)
    }
    // ANCHOR_END: stacked

    #[test]
    fn three_publishers() {
        let sub = handle::subscriber();
        let sinks: Vec<(&str, &str)> = sub
            .publishers()
            .iter()
            .map(|p| (p.sink.as_str(), p.topic.as_str()))
            .collect();
        assert_eq!(
            sinks,
            [
                ("kafka", "orders.kafka"),
                ("nats", "orders.created"),
                ("nats", "audit.orders")
            ]
        );
    }
}

async fn app(pool: PgPool) -> Result<(), Box<dyn std::error::Error>> {
    // ANCHOR: app
    use outbox_nats as nats;

    let broker = nats::Broker::from_env()?; // NATS_URL, NATS_TIMEOUT, ...
    // Streams are not created unless asked; this creates one if it is missing.
    nats::ensure_stream(&broker, "ORDERS", &["orders.>"], Duration::from_secs(120)).await?;
    outbox::App::new(pool)
        .broker(broker)
        .broker(outbox_kafka::Broker::from_env()?) // for #[kafka::publisher], if any
        .run_until_signal()
        .await?;
    // ANCHOR_END: app
    Ok(())
}

#[test]
fn settings() -> Result<(), outbox_nats::ConfigError> {
    // ANCHOR: builder
    use outbox_nats::{Broker, BrokerConfig};

    let config = BrokerConfig::new("nats://n1:4222,nats://n2:4222")
        .user_and_password("outbox", "hunter2") // or .token(..), .credentials_file(..)
        .timeout(Duration::from_secs(5)) // publish to PubAck, per batch; default 10 s
        .msg_id_prefix("billing:"); // when several outbox tables share a stream
    let broker = Broker::new(config)?; // validates; connects at the first batch
    // ANCHOR_END: builder
    assert!(!format!("{broker:?}").contains("hunter2"));

    // ANCHOR: from_vars
    let config = outbox_nats::BrokerConfig::from_vars([
        ("NATS_URL", "nats://outbox:hunter2@n1:4222,nats://n2:4222"),
        ("NATS_TIMEOUT", "5s"),
    ])?;
    assert_eq!(config.servers(), ["nats://n1:4222", "nats://n2:4222"]);
    assert!(!format!("{config:?}").contains("hunter2"));

    let err = outbox_nats::BrokerConfig::from_vars([("NATS_TIMEOUT", "5")]).unwrap_err();
    assert!(err.to_string().starts_with("NATS_TIMEOUT: \"5\" is not a duration"));
    // ANCHOR_END: from_vars
    Ok(())
}
