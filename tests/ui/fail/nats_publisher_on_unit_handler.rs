use outbox_nats as nats;

#[outbox::subscriber("orders")]
#[nats::publisher("orders.created")]
async fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {}
