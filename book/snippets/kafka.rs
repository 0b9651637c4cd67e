//! Code of the book's chapter "Kafka"; scripts/book-test compiles and runs it.
#![allow(dead_code)]

use outbox_kafka as kafka;
use sqlx::PgPool;
use std::time::Duration;

fn builder() -> Result<kafka::Broker, kafka::Error> {
    // ANCHOR: builder
    use outbox_kafka::{Acks, Broker, BrokerConfig, Compression};

    let config = BrokerConfig::new("kafka-1:9092,kafka-2:9092")
        .acks(Acks::All) // the default
        .linger(Duration::from_millis(5))
        .batch_size(10_000)
        .compression(Compression::Lz4)
        .write_timeout(Duration::from_secs(10))
        // Any librdkafka key, passed through as it is:
        .set("security.protocol", "SASL_SSL")
        .set("sasl.mechanism", "SCRAM-SHA-512")
        .set("sasl.username", "outbox")
        .set("sasl.password", "hunter2")
        .set("ssl.ca.location", "/etc/ssl/certs/kafka-ca.pem");
    let broker = Broker::new(config)?; // validates; contacts no broker yet
    // ANCHOR_END: builder
    Ok(broker)
}

async fn app(pool: PgPool) -> Result<(), Box<dyn std::error::Error>> {
    // ANCHOR: app
    let broker = kafka::Broker::from_env()?; // PUBLISHER_URL / KAFKA_BROKERS, KAFKA_*
    outbox::App::new(pool).broker(broker).run_until_signal().await?;
    // ANCHOR_END: app
    Ok(())
}

fn transactional() -> Result<kafka::Broker, kafka::Error> {
    // ANCHOR: transactional
    let config = kafka::BrokerConfig::from_env()?.transactional("orders-relay-1");
    let broker = kafka::Broker::new(config)?;
    // ANCHOR_END: transactional
    Ok(broker)
}

#[test]
fn secrets_are_hidden() {
    // builder() itself is only type-checked: its producer would load the CA file.
    let config = kafka::BrokerConfig::new("kafka-1:9092").set("sasl.password", "hunter2");
    config.validate().unwrap();
    assert!(!format!("{config:?}").contains("hunter2"));
}

#[test]
fn settings_from_variables() -> Result<(), kafka::ConfigError> {
    // ANCHOR: from_vars
    let config = kafka::BrokerConfig::from_vars([
        ("PUBLISHER_URL", "kafka://k1:9092,k2:9092"),
        ("KAFKA_ACKS", "all"),
        ("KAFKA_LINGER", "5ms"),
        ("KAFKA_WRITE_TIMEOUT", "10s"),
        ("KAFKA_PROP_SECURITY_PROTOCOL", "SSL"),
        ("KAFKA_PROP_SSL_CA_LOCATION", "/etc/ssl/certs/kafka-ca.pem"),
    ])?;
    assert_eq!(config.bootstrap_servers(), "k1:9092,k2:9092");
    assert_eq!(config.client_config().get("security.protocol"), Some("SSL"));
    assert_eq!(
        config.client_config().get("ssl.ca.location"),
        Some("/etc/ssl/certs/kafka-ca.pem")
    );

    let err = kafka::BrokerConfig::from_vars([("KAFKA_WRITE_TIMEOUT", "10")]).unwrap_err();
    assert!(err.to_string().starts_with("KAFKA_WRITE_TIMEOUT: \"10\" is not a duration"));
    // ANCHOR_END: from_vars
    Ok(())
}

#[test]
fn transactions_need_acks_all() {
    let err = kafka::BrokerConfig::from_vars([
        ("KAFKA_TRANSACTIONAL_ID", "relay-1"),
        ("KAFKA_ACKS", "one"),
    ])
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "KAFKA_TRANSACTIONAL_ID: transactions need KAFKA_ACKS=all"
    );
}
