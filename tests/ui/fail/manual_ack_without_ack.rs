#[outbox::subscriber("orders", ack = "manual")]
async fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {}
