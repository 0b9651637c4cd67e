use outbox_nats as bus;

struct Shipped {
    order: i64,
}

#[bus::publisher("orders.shipped")]
#[outbox::subscriber("orders")]
async fn ship(order: i64) -> Shipped {
    Shipped { order }
}

fn main() {}
