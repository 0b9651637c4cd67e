use outbox_nats as nats;

const SUBJECT: &str = "orders.created";

#[nats::publisher]
#[outbox::subscriber("orders")]
async fn no_subject(order_id: i64) -> i64 {
    order_id
}

#[nats::publisher(SUBJECT)]
#[outbox::subscriber("orders")]
async fn not_literal(order_id: i64) -> i64 {
    order_id
}

#[nats::publisher("orders.created", "audit")]
#[outbox::subscriber("orders")]
async fn two_subjects(order_id: i64) -> i64 {
    order_id
}

#[nats::publisher("orders.created")]
#[outbox::subscriber("orders")]
#[nats::publisher("orders.created")]
async fn twice(order_id: i64) -> i64 {
    order_id
}

fn main() {}
