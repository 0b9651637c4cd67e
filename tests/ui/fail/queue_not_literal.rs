const ORDERS: &str = "orders";

#[outbox::subscriber(ORDERS)]
async fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {
    let _ = ORDERS;
}
