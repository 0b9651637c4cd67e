struct Shipped {
    order: i64,
}

#[outbox::publisher("orders.shipped")]
#[outbox::subscriber("orders")]
async fn ship(order: i64) -> Shipped {
    Shipped { order }
}

fn main() {
    let _ = |s: Shipped| s.order;
}
