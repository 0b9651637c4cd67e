#[outbox::subscriber("ticks")]
async fn tick(meta: outbox::Meta) {
    let _ = meta;
}

fn main() {}
