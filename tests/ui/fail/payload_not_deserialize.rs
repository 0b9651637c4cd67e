struct Order {
    id: i64,
}

#[outbox::subscriber("orders")]
async fn handle(order: Order) {
    let _ = order.id;
}

fn main() {}
