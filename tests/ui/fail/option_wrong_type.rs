#[outbox::subscriber("orders", concurrency = "10", dlq = outbox_dlq)]
async fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {}
