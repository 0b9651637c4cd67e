// The tutorial's order: the publisher above the subscriber.
use outbox::ExponentialRetry;

#[derive(serde::Deserialize, serde::Serialize, Debug)]
struct Order {
    id: i64,
}

/// Forwards an order's id.
#[outbox::publisher("orders.kafka")]
#[outbox::subscriber("orders", retry = ExponentialRetry::default(), dlq = "outbox_dlq")]
async fn handle(order: Order, meta: outbox::Meta) -> i64 {
    let _ = meta;
    order.id
}

fn main() {
    let sub = handle::subscriber();
    assert_eq!(sub.name(), "handle");
    assert_eq!(sub.queues(), &outbox::Queues::Named(vec!["orders".to_owned()]));
    assert_eq!(sub.publishers().len(), 1);
    assert_eq!(sub.publishers()[0].sink, "kafka");
    assert_eq!(sub.publishers()[0].topic, "orders.kafka");
    sub.validate().unwrap();
}
