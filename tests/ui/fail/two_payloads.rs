#[derive(serde::Deserialize)]
struct Order {
    id: i64,
}

#[outbox::subscriber("orders")]
async fn handle(order: Order, customer: String, meta: outbox::Meta) {
    let _ = (order.id, customer, meta);
}

fn main() {}
