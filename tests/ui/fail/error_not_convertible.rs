#[derive(Debug)]
struct NotAnError;

#[outbox::subscriber("orders")]
async fn handle(order_id: i64) -> Result<(), NotAnError> {
    let _ = order_id;
    Err(NotAnError)
}

fn main() {}
