//! Stacked attributes, in the manner of actix-web's `#[routes]`.
//!
//! The top-most of `#[outbox::subscriber]` / `#[kafka::publisher]` expands first
//! and sees the others as plain attributes on the function. It takes them off,
//! reads them, and emits one expansion, so the order the user writes them in
//! does not matter and no attribute ever sees a wrapped or renamed function.
//!
//! Siblings are recognised by the last segment of their path, so every spelling
//! and crate alias works: `subscriber`, `outbox::subscriber`, `publisher`,
//! `kafka::publisher`, `outbox_kafka::publisher`, `outbox::publisher`.

use proc_macro2::{Span, TokenStream};
use syn::spanned::Spanned;
use syn::{Attribute, Meta};

/// Which macro an attribute names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Subscriber,
    Publisher,
}

/// A sibling attribute taken off the function.
pub(crate) struct Sibling {
    pub(crate) kind: Kind,
    /// The tokens inside the parentheses (empty for a bare path).
    pub(crate) args: syn::Result<TokenStream>,
    /// The whole attribute.
    pub(crate) span: Span,
}

fn kind_of(attr: &Attribute) -> Option<Kind> {
    let last = attr.path().segments.last()?;
    if last.ident == "subscriber" {
        Some(Kind::Subscriber)
    } else if last.ident == "publisher" {
        Some(Kind::Publisher)
    } else {
        None
    }
}

/// Removes the subscriber and publisher attributes from `attrs` and returns them,
/// in the order they were written.
pub(crate) fn take_siblings(attrs: &mut Vec<Attribute>) -> Vec<Sibling> {
    let mut siblings = Vec::new();
    attrs.retain(|attr| match kind_of(attr) {
        Some(kind) => {
            let args = match &attr.meta {
                Meta::Path(_) => Ok(TokenStream::new()),
                Meta::List(list) => Ok(list.tokens.clone()),
                Meta::NameValue(nv) => Err(syn::Error::new(
                    nv.eq_token.span(),
                    "write the arguments in parentheses, e.g. #[outbox::subscriber(\"orders\")]",
                )),
            };
            siblings.push(Sibling {
                kind,
                args,
                span: attr.span(),
            });
            false
        }
        None => true,
    });
    siblings
}
