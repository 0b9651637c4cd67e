// `outbox::Raw` in and out, and `outbox::Keyed` to choose the message key.
use outbox::{Keyed, Raw};

#[derive(serde::Serialize)]
struct Shipped {
    order: i64,
}

#[outbox::publisher("blobs.copy")]
#[outbox::subscriber("blobs")]
async fn copy(blob: Raw) -> Raw {
    blob
}

#[outbox::publisher("orders.shipped")]
#[outbox::subscriber("orders")]
async fn ship(order: i64) -> Keyed<Shipped> {
    Keyed::new(format!("order-{order}"), Shipped { order })
}

#[outbox::publisher("orders.checked")]
#[outbox::subscriber("checks")]
async fn check(blob: outbox::Raw) -> Result<outbox::Keyed<Raw>, outbox::HandlerError> {
    Ok(Keyed::new("k", blob))
}

fn main() {
    assert_eq!(copy::subscriber().publishers()[0].topic, "blobs.copy");
    assert_eq!(ship::subscriber().publishers()[0].topic, "orders.shipped");
    assert_eq!(check::subscriber().publishers()[0].topic, "orders.checked");
}
