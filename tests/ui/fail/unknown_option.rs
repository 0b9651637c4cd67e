#[outbox::subscriber("orders", concurency = 10)]
async fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {}
