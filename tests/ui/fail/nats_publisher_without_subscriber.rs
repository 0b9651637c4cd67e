use outbox_nats as bus;

#[bus::publisher("orders.created")]
async fn handle(order_id: i64) -> i64 {
    order_id
}

fn main() {}
