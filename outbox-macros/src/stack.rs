//! Stacked attributes, in the manner of actix-web's `#[routes]`.
//!
//! The top-most of `#[outbox::subscriber]` and the publishers expands first and
//! sees the others as plain attributes on the function. A publisher's path
//! cannot tell which broker it belongs to (`use outbox_nats as bus;` makes it
//! `#[bus::publisher]`, a plain `use outbox_nats::publisher;` makes it
//! `#[publisher]`), but each broker's attribute is a macro of its own and knows
//! its broker once it expands. So:
//!
//! * While a publisher attribute that has not expanded yet is still below it,
//!   the expanding attribute *defers*: it leaves the function as it is and
//!   appends itself, with its kind made explicit, as
//!   `#[::outbox::__private::__outbox_stacked(nats, "subject")]` (`kafka`,
//!   `nats` or `subscriber`, then its own arguments with their spans).
//! * The last one to expand finds only the subscriber and such markers beside
//!   it: it takes them all off and emits one expansion.
//!
//! So the order the attributes are written in does not matter, any spelling or
//! crate alias works, and no attribute ever sees a wrapped or renamed function.
//! Siblings are recognised by the last segment of their path: `subscriber`,
//! `publisher` (`kafka::publisher`, `bus::publisher`, `outbox::publisher`, ...)
//! and the marker `__outbox_stacked`.

use proc_macro2::{Span, TokenStream};
use quote::quote_spanned;
use syn::parse::{ParseStream, Parser};
use syn::spanned::Spanned;
use syn::{Attribute, Ident, Meta, Token};

/// The brokers a publisher attribute can send to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Broker {
    Kafka,
    Nats,
}

impl Broker {
    /// The name of the runtime's sink (`outbox::Sink::name`).
    pub(crate) fn sink(self) -> &'static str {
        match self {
            Broker::Kafka => "kafka",
            Broker::Nats => "nats",
        }
    }

    /// How users write the attribute, for messages.
    pub(crate) fn attr(self) -> &'static str {
        match self {
            Broker::Kafka => "#[kafka::publisher]",
            Broker::Nats => "#[nats::publisher]",
        }
    }

    /// A complete example of the attribute.
    pub(crate) fn example(self) -> &'static str {
        match self {
            Broker::Kafka => "#[kafka::publisher(\"orders.kafka\")]",
            Broker::Nats => "#[nats::publisher(\"orders.created\")]",
        }
    }

    /// What the destination is called on this broker.
    pub(crate) fn destination(self) -> &'static str {
        match self {
            Broker::Kafka => "topic",
            Broker::Nats => "subject",
        }
    }

    /// Checks a destination against the broker's rules.
    pub(crate) fn check(self, destination: &str) -> Result<(), String> {
        match self {
            Broker::Kafka => crate::attr::check_topic(destination),
            Broker::Nats => crate::attr::check_subject(destination),
        }
    }
}

/// Which macro an attribute names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Subscriber,
    Publisher(Broker),
}

impl Kind {
    /// The tag of a deferred attribute's marker.
    fn tag(self) -> &'static str {
        match self {
            Kind::Subscriber => "subscriber",
            Kind::Publisher(broker) => broker.sink(),
        }
    }

    fn from_tag(tag: &Ident) -> Option<Kind> {
        Some(if tag == "subscriber" {
            Kind::Subscriber
        } else if tag == "kafka" {
            Kind::Publisher(Broker::Kafka)
        } else if tag == "nats" {
            Kind::Publisher(Broker::Nats)
        } else {
            return None;
        })
    }
}

/// A sibling attribute taken off the function.
pub(crate) struct Sibling {
    pub(crate) kind: Kind,
    /// The tokens inside the parentheses (empty for a bare path).
    pub(crate) args: syn::Result<TokenStream>,
    /// The whole attribute.
    pub(crate) span: Span,
}

/// What an attribute on the function is, to this module.
enum Found {
    Subscriber,
    /// A publisher that has not expanded yet: its broker is not known.
    Publisher,
    /// A deferred attribute.
    Marker,
}

const MARKER: &str = "__outbox_stacked";

fn found(attr: &Attribute) -> Option<Found> {
    let last = attr.path().segments.last()?;
    if last.ident == "subscriber" {
        Some(Found::Subscriber)
    } else if last.ident == "publisher" {
        Some(Found::Publisher)
    } else if last.ident == MARKER {
        Some(Found::Marker)
    } else {
        None
    }
}

/// True while a publisher attribute below has not expanded yet: then the
/// expanding attribute defers (see the module docs).
pub(crate) fn must_defer(attrs: &[Attribute]) -> bool {
    attrs
        .iter()
        .any(|a| matches!(found(a), Some(Found::Publisher)))
}

/// The marker a deferring attribute leaves at the end of the function's
/// attributes. Its own tokens carry the span of the attribute it stands for,
/// so errors about the attribute as such still point at it.
pub(crate) fn marker(kind: Kind, args: TokenStream) -> Attribute {
    let span = Span::call_site();
    let tag = Ident::new(kind.tag(), span);
    let marker = Ident::new(MARKER, span);
    let attr = quote_spanned!(span=> #[::outbox::__private::#marker(#tag, #args)]);
    Attribute::parse_outer
        .parse2(attr)
        .expect("a marker attribute parses")
        .remove(0)
}

/// Splits a marker's arguments into its kind and the attribute's own arguments.
pub(crate) fn parse_marker(tokens: TokenStream) -> syn::Result<(Kind, TokenStream)> {
    (|input: ParseStream<'_>| {
        let tag: Ident = input.parse()?;
        let kind = Kind::from_tag(&tag).ok_or_else(|| {
            syn::Error::new(
                tag.span(),
                "__outbox_stacked is internal to the outbox attributes: write #[outbox::subscriber] or a broker's #[publisher] instead",
            )
        })?;
        input.parse::<Token![,]>()?;
        let rest: TokenStream = input.parse()?;
        Ok((kind, rest))
    })
    .parse2(tokens)
}

/// Removes the subscriber attributes and the markers from `attrs` and returns
/// them: the markers (the attributes above the expanding one, in the order
/// they were written) and the rest.
pub(crate) fn take_siblings(attrs: &mut Vec<Attribute>) -> (Vec<Sibling>, Vec<Sibling>) {
    let mut markers = Vec::new();
    let mut others = Vec::new();
    attrs.retain(|attr| {
        let Some(found) = found(attr) else {
            return true;
        };
        let args = match &attr.meta {
            Meta::Path(_) => Ok(TokenStream::new()),
            Meta::List(list) => Ok(list.tokens.clone()),
            Meta::NameValue(nv) => Err(syn::Error::new(
                nv.eq_token.span(),
                "write the arguments in parentheses, e.g. #[outbox::subscriber(\"orders\")]",
            )),
        };
        let span = attr.span();
        match found {
            Found::Marker => {
                let (kind, args) = match args.and_then(parse_marker) {
                    Ok((kind, args)) => (kind, Ok(args)),
                    Err(e) => (Kind::Subscriber, Err(e)),
                };
                markers.push(Sibling { kind, args, span });
            }
            Found::Subscriber => others.push(Sibling {
                kind: Kind::Subscriber,
                args,
                span,
            }),
            Found::Publisher => unreachable!("an expansion that gathers has no publisher below"),
        }
        false
    });
    (markers, others)
}
