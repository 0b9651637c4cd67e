#[outbox::__private::__outbox_stacked(rabbitmq, "orders")]
async fn handle(order_id: i64) -> i64 {
    order_id
}

fn main() {}
