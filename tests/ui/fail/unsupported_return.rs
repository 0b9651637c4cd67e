#[outbox::publisher("orders.kafka")]
#[outbox::subscriber("orders")]
async fn handle(order_id: i64) -> impl serde::Serialize {
    order_id
}

fn main() {}
