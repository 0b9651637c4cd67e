#[outbox::subscriber("orders")]
fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {}
