// A `Result` under an alias named otherwise would look like a plain value, and
// its `Err` would count as success: refused at compile time.
type MyResult<T> = Result<T, String>;

#[outbox::subscriber("orders")]
async fn handle(order_id: i64) -> MyResult<i64> {
    if order_id < 0 {
        return Err("negative".to_owned());
    }
    Ok(order_id)
}

fn main() {}
