#[outbox::subscriber("orders", batch_size = 10, dlq = "dead", batch_size = 20)]
async fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {}
