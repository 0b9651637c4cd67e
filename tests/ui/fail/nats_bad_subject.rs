use outbox_nats as nats;

#[nats::publisher("")]
#[outbox::subscriber("orders")]
async fn empty(order_id: i64) -> i64 {
    order_id
}

#[nats::publisher("orders created")]
#[outbox::subscriber("orders")]
async fn space(order_id: i64) -> i64 {
    order_id
}

#[nats::publisher("orders..created")]
#[outbox::subscriber("orders")]
async fn empty_token(order_id: i64) -> i64 {
    order_id
}

#[outbox::subscriber("orders")]
#[nats::publisher("orders.>")]
async fn wildcard(order_id: i64) -> i64 {
    order_id
}

fn main() {}
