//! Attribute macros of the outbox framework: `#[outbox::subscriber]` and the
//! publishers stacked on it, `#[kafka::publisher]` and `#[nats::publisher]`.
//!
//! Use them through the runtime crates (`outbox::subscriber`,
//! `outbox_kafka::publisher`, `outbox_nats::publisher`); this crate holds no
//! runtime logic. The generated code reaches the runtime only through
//! `::outbox::__private`.
//!
//! Layout: `attr` parses the attribute arguments into typed structs,
//! `signature` checks the handler's signature, `stack` gathers stacked
//! attributes, and `expand` emits the code.

use proc_macro::TokenStream;

mod attr;
mod expand;
mod signature;
mod stack;

#[doc = include_str!("docs/subscriber.md")]
#[proc_macro_attribute]
pub fn subscriber(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::expand(stack::Kind::Subscriber, attr.into(), item.into()).into()
}

#[doc = include_str!("docs/publisher.md")]
#[proc_macro_attribute]
pub fn publisher(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::expand(
        stack::Kind::Publisher(stack::Broker::Kafka),
        attr.into(),
        item.into(),
    )
    .into()
}

#[doc = include_str!("docs/nats_publisher.md")]
#[proc_macro_attribute]
pub fn nats_publisher(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::expand(
        stack::Kind::Publisher(stack::Broker::Nats),
        attr.into(),
        item.into(),
    )
    .into()
}

/// A stacked attribute that deferred its expansion (see the `stack` module):
/// `#[::outbox::__private::__outbox_stacked(nats, "subject")]`. The last
/// outbox attribute to expand takes it off the function; should it ever be
/// expanded itself, it does what the attribute it stands for would do.
#[doc(hidden)]
#[proc_macro_attribute]
pub fn __outbox_stacked(attr: TokenStream, item: TokenStream) -> TokenStream {
    match stack::parse_marker(attr.into()) {
        Ok((kind, args)) => expand::expand(kind, args, item.into()).into(),
        Err(e) => {
            let e = e.to_compile_error();
            let item = proc_macro2::TokenStream::from(item);
            quote::quote!(#e #item).into()
        }
    }
}
