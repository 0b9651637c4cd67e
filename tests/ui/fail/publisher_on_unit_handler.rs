#[outbox::publisher("orders.kafka")]
#[outbox::subscriber("orders")]
async fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {}
