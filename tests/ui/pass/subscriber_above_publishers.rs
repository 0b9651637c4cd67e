// The other order, with two publishers and one of them below a plain attribute.
#[derive(serde::Deserialize)]
struct Order {
    id: i64,
}

#[derive(serde::Serialize)]
struct Accepted {
    id: i64,
}

#[outbox::subscriber("orders", "orders.priority", name = "accept_orders")]
#[outbox::publisher("orders.accepted")]
#[allow(clippy::unused_async)]
#[outbox::publisher("audit")]
pub(crate) async fn accept(order: Order) -> Accepted {
    Accepted { id: order.id }
}

fn main() {
    let sub = accept::subscriber();
    assert_eq!(sub.name(), "accept_orders");
    assert_eq!(
        sub.queues(),
        &outbox::Queues::Named(vec!["orders".to_owned(), "orders.priority".to_owned()])
    );
    let topics: Vec<&str> = sub.publishers().iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(topics, ["orders.accepted", "audit"]);
}
