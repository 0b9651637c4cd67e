// The function is kept as written: tests call it directly, docs and attributes stay.

#[derive(serde::Deserialize, Debug, PartialEq)]
pub struct Order {
    id: i64,
}

/// Doubles an order's id.
#[outbox::subscriber("orders")]
#[must_use = "the doubled id"]
pub async fn double(order: Order, meta: outbox::Meta) -> i64 {
    assert_eq!(meta.queue, "orders");
    order.id * 2
}

mod nested {
    #[outbox::subscriber("nested")]
    pub(crate) async fn r#type(value: u8) -> u8 {
        value
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let env = outbox::Envelope::new(7, "orders", br#"{"id":21}"#.to_vec());
    let meta = outbox::Meta::from(&env);
    assert_eq!(runtime.block_on(double(Order { id: 21 }, meta)), 42);
    assert_eq!(runtime.block_on(nested::r#type(3)), 3);
    assert_eq!(nested::r#type::subscriber().name(), "type");
    // The explicit form: the fn item itself names the registration.
    runtime.block_on(async {
        let pool = sqlx::PgPool::connect_lazy("postgres://outbox@127.0.0.1/outbox").unwrap();
        let app = outbox::App::manual(pool).subscriber(double);
        let subs = app.subscribers();
        assert_eq!(subs.len(), 1);
        assert_eq!(subs[0].name(), "double");
    });
}
