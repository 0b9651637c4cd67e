#[outbox::subscriber("orders", lease_ttl = "30 seconds")]
async fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {}
