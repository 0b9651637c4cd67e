// `Result` returns with every kind of error type.
use outbox::HandlerError;

#[derive(serde::Deserialize)]
struct Order {
    id: i64,
}

#[derive(Debug)]
struct MyError;

impl std::fmt::Display for MyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("my error")
    }
}

impl std::error::Error for MyError {}

/// An application's own `Result` alias, as `anyhow::Result` or `std::io::Result`.
mod app {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
}

/// A return type whose name ends in `Result` but is a plain value.
#[derive(serde::Serialize)]
struct SearchResult {
    hits: Vec<i64>,
}

#[outbox::subscriber("a")]
async fn plain(order: Order) -> Result<(), HandlerError> {
    if order.id < 0 {
        return Err(HandlerError::reject("negative id"));
    }
    Ok(())
}

#[outbox::subscriber("b")]
async fn string_error(order: Order) -> Result<(), String> {
    Err(format!("order {} failed", order.id))
}

#[outbox::subscriber("c")]
async fn str_error(order: Order) -> std::result::Result<(), &'static str> {
    let _ = order.id;
    Err("nope")
}

#[outbox::publisher("d.out")]
#[outbox::subscriber("d")]
async fn std_error(text: String) -> Result<i64, std::num::ParseIntError> {
    text.parse()
}

#[outbox::publisher("e.out")]
#[outbox::subscriber("e")]
async fn custom_error(order: Order) -> Result<i64, MyError> {
    if order.id == 0 {
        Err(MyError)
    } else {
        Ok(order.id)
    }
}

#[outbox::publisher("f.out")]
#[outbox::subscriber("f")]
async fn alias(order: Order) -> app::Result<Vec<i64>> {
    Ok(vec![order.id])
}

#[outbox::publisher("h.out")]
#[outbox::subscriber("h")]
async fn search(order: Order) -> SearchResult {
    SearchResult {
        hits: vec![order.id],
    }
}

#[outbox::subscriber("g")]
async fn value_without_publisher(order: Order) -> i64 {
    order.id
}

fn main() {
    for sub in [
        plain::subscriber(),
        string_error::subscriber(),
        str_error::subscriber(),
        std_error::subscriber(),
        custom_error::subscriber(),
        alias::subscriber(),
        search::subscriber(),
        value_without_publisher::subscriber(),
    ] {
        sub.validate().unwrap();
    }
}
