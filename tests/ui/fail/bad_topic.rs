#[outbox::publisher("orders kafka")]
#[outbox::subscriber("orders")]
async fn handle(order_id: i64) -> i64 {
    order_id
}

fn main() {}
