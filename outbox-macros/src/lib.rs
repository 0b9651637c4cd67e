//! Attribute macros of the outbox framework (being written).
use proc_macro::TokenStream;

/// Placeholder.
#[proc_macro_attribute]
pub fn subscriber(_attr: TokenStream, item: TokenStream) -> TokenStream {
    item
}

/// Placeholder.
#[proc_macro_attribute]
pub fn publisher(_attr: TokenStream, item: TokenStream) -> TokenStream {
    item
}
