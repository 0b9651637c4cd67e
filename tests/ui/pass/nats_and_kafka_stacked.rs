// NATS and Kafka publishers on one handler, in every order, under crate
// aliases and a bare import.
use outbox_kafka as kafka;
use outbox_nats as bus;

#[derive(serde::Deserialize, serde::Serialize)]
struct Order {
    id: i64,
}

// Publishers above the subscriber, NATS first.
#[bus::publisher("orders.created")]
#[kafka::publisher("orders.kafka")]
#[outbox::subscriber("orders")]
async fn nats_first(order: Order) -> Order {
    order
}

// Kafka first, the subscriber between the publishers.
#[kafka::publisher("orders.kafka")]
#[outbox::subscriber("orders")]
#[bus::publisher("orders.created")]
async fn kafka_first(order: Order) -> Order {
    order
}

// The subscriber on top, then two NATS subjects and a Kafka topic of the same
// name as one of them (another broker: no clash).
#[outbox::subscriber("orders")]
#[outbox_nats::publisher("orders.created")]
#[kafka::publisher("orders.created")]
#[bus::publisher("audit.orders")]
async fn subscriber_first(order: Order) -> outbox::Keyed<Order> {
    outbox::Keyed::new(order.id.to_string(), order)
}

mod bare {
    use outbox_nats::publisher;

    #[publisher("orders.created")]
    #[outbox::subscriber("orders")]
    pub(crate) async fn only_nats(order: i64) -> i64 {
        order
    }
}

fn publishers(sub: &outbox::Subscriber) -> Vec<(String, String)> {
    sub.publishers()
        .iter()
        .map(|p| (p.sink.clone(), p.topic.clone()))
        .collect()
}

fn pair(sink: &str, topic: &str) -> (String, String) {
    (sink.to_owned(), topic.to_owned())
}

fn main() {
    assert_eq!(
        publishers(&nats_first::subscriber()),
        [pair("nats", "orders.created"), pair("kafka", "orders.kafka")]
    );
    assert_eq!(
        publishers(&kafka_first::subscriber()),
        [pair("kafka", "orders.kafka"), pair("nats", "orders.created")]
    );
    assert_eq!(
        publishers(&subscriber_first::subscriber()),
        [
            pair("nats", "orders.created"),
            pair("kafka", "orders.created"),
            pair("nats", "audit.orders")
        ]
    );
    assert_eq!(
        publishers(&bare::only_nats::subscriber()),
        [pair("nats", "orders.created")]
    );
}
