struct Service;

impl Service {
    #[outbox::subscriber("orders")]
    async fn handle(&self, order_id: i64) {
        let _ = order_id;
    }
}

fn main() {}
