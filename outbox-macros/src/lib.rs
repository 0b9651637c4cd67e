//! Attribute macros of the outbox framework: `#[outbox::subscriber]` and
//! `#[kafka::publisher]`.
//!
//! Use them through the runtime crates (`outbox::subscriber`,
//! `outbox_kafka::publisher`); this crate holds no runtime logic. The generated
//! code reaches the runtime only through `::outbox::__private`.
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
    expand::expand(stack::Kind::Publisher, attr.into(), item.into()).into()
}
