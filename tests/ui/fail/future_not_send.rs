use std::rc::Rc;

async fn elsewhere() {}

#[outbox::subscriber("orders")]
async fn handle(order_id: i64) {
    let held = Rc::new(order_id);
    elsewhere().await;
    let _ = held;
}

fn main() {}
