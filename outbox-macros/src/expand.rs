//! Expansion of `#[outbox::subscriber]` and the publishers (`#[kafka::publisher]`,
//! `#[nats::publisher]`).
//!
//! The user's function is emitted exactly as written (minus the sibling
//! attributes this expansion consumed). Next to it:
//!
//! ```text
//! #[doc(hidden)] <vis> struct handle {}          // type namespace: no clash with the fn
//! impl handle { <vis> fn subscriber() -> ::outbox::Subscriber { ... } }
//! ::outbox::__private::inventory::submit! { Registration { name, type_id, build } }
//! ```
//!
//! On any error the function is still emitted, with the errors beside it, so the
//! rest of the crate keeps compiling and only the macro's message shows.

use crate::attr::{Ack, Dlq, Errors, PublisherArgs, SubscriberArgs};
use crate::signature::{ArgKind, Return, Signature};
use crate::stack::{self, Broker, Kind, Sibling};
use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::ItemFn;

/// Entry point of every attribute: `entry` is the one being expanded.
pub(crate) fn expand(entry: Kind, attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut func: ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(_) => {
            let msg = match entry {
                Kind::Subscriber => {
                    "#[outbox::subscriber] goes on an `async fn`, e.g. #[outbox::subscriber(\"orders\")] async fn handle(order: Order) {}".to_owned()
                }
                Kind::Publisher(broker) => format!(
                    "{} goes on an `async fn` that also has #[outbox::subscriber(...)]",
                    broker.attr()
                ),
            };
            let error = syn::Error::new(Span::call_site(), msg).to_compile_error();
            return quote! { #error #item };
        }
    };
    if stack::must_defer(&func.attrs) {
        func.attrs.push(stack::marker(entry, attr));
        return quote! { #func };
    }
    let siblings = stack::take_siblings(&mut func.attrs);
    let generated = generate(entry, attr, siblings, &func).unwrap_or_else(|e| e.to_compile_error());
    quote! {
        #func
        #generated
    }
}

/// Everything the attributes on one function say, once checked.
struct Parsed {
    args: SubscriberArgs,
    publishers: Vec<PublisherArgs>,
    sig: Signature,
}

fn generate(
    entry: Kind,
    attr: TokenStream,
    siblings: (Vec<Sibling>, Vec<Sibling>),
    func: &ItemFn,
) -> syn::Result<TokenStream> {
    let parsed = parse_all(entry, attr, siblings, func)?;
    Ok(emit(func, &parsed))
}

fn parse_all(
    entry: Kind,
    attr: TokenStream,
    (markers, others): (Vec<Sibling>, Vec<Sibling>),
    func: &ItemFn,
) -> syn::Result<Parsed> {
    let mut errors = Errors::default();
    // The attributes in the order they were written: the deferred ones above
    // the attribute being expanded, then it, then those below it.
    let all = markers
        .into_iter()
        .chain(std::iter::once(Sibling {
            kind: entry,
            args: Ok(attr),
            span: Span::call_site(),
        }))
        .chain(others);
    let mut first_publisher = None;

    // `Some(None)`: there is a subscriber attribute, but its arguments are wrong.
    let mut subscriber: Option<Option<SubscriberArgs>> = None;
    let mut publishers: Vec<PublisherArgs> = Vec::new();
    for attr in all {
        let Some(tokens) = errors.take(attr.args) else {
            continue;
        };
        match attr.kind {
            Kind::Subscriber if subscriber.is_some() => errors.add(
                attr.span,
                "one #[outbox::subscriber] per function: list every queue in one attribute, e.g. #[outbox::subscriber(\"orders\", \"refunds\")]",
            ),
            Kind::Subscriber => {
                let args = errors.take(SubscriberArgs::parse(tokens, attr.span));
                subscriber = Some(args);
            }
            Kind::Publisher(broker) => {
                first_publisher.get_or_insert(broker);
                let Some(publisher) = errors.take(PublisherArgs::parse(broker, tokens, attr.span))
                else {
                    continue;
                };
                let topic = publisher.topic.value();
                if publishers
                    .iter()
                    .any(|p| p.broker == broker && p.topic.value() == topic)
                {
                    errors.add(
                        publisher.topic.span(),
                        format!(
                            "this function already publishes to {} {} {topic:?}",
                            broker.sink(),
                            broker.destination()
                        ),
                    );
                } else {
                    publishers.push(publisher);
                }
            }
        }
    }

    let Some(args) = subscriber else {
        // Not a handler at all: its signature is not ours to judge.
        let broker = first_publisher.unwrap_or(Broker::Kafka);
        errors.add(
            Span::call_site(),
            format!(
                "{} needs #[outbox::subscriber(...)] on the same function: \
                 add e.g. #[outbox::subscriber(\"orders\")] below it, so that the publisher \
                 has rows to forward",
                broker.attr()
            ),
        );
        return Err(errors.into_error());
    };
    let sig = errors.take(Signature::analyse(func));

    if let (Some(args), Some(sig)) = (&args, &sig) {
        check_together(func, args, &publishers, sig, &mut errors);
    }
    errors.finish()?;
    Ok(Parsed {
        args: args.expect("no error, so the arguments parsed"),
        publishers,
        sig: sig.expect("no error, so the signature is fine"),
    })
}

/// Checks that need both the attributes and the signature.
fn check_together(
    func: &ItemFn,
    args: &SubscriberArgs,
    publishers: &[PublisherArgs],
    sig: &Signature,
    errors: &mut Errors,
) {
    let ident = &func.sig.ident;
    let returns = match sig.ret {
        Return::Unit => Some("`()`"),
        Return::Result { unit_ok: true, .. } => Some("`Result<(), _>`"),
        _ => None,
    };
    if let Some(returns) = returns {
        for p in publishers {
            errors.add(
                p.span,
                format!(
                    "nothing to publish: `{ident}` returns {returns}, so #[{}::publisher({:?})] has no message to send; \
                     return the message (a serde::Serialize value, or `Result<T, E>`) or remove the publisher",
                    p.broker.sink(),
                    p.topic.value()
                ),
            );
        }
    }
    match (&args.ack, sig.ack_arg) {
        (Some(ack), Some(_)) if ack.value != Ack::Manual => errors.add(
            ack.span,
            "this handler takes an `outbox::Ack` argument, so it decides the row's fate itself: \
             write ack = \"manual\" or leave the option out",
        ),
        (Some(ack), None) if ack.value == Ack::Manual => errors.add(
            ack.span,
            format!(
                "ack = \"manual\" needs an `outbox::Ack` argument to decide with: add `ack: outbox::Ack` to `{ident}`'s arguments"
            ),
        ),
        _ => {}
    }
}

fn emit(func: &ItemFn, parsed: &Parsed) -> TokenStream {
    let Parsed {
        args,
        publishers,
        sig,
    } = parsed;
    let ident = &func.sig.ident;
    let vis = &func.vis;
    let name = args
        .name
        .as_ref()
        .map_or_else(|| ident.unraw().to_string(), |lit| lit.value());

    // One `let` per argument. Locals keep the macro's own span (so they stay
    // visible to each other); only the paths that carry a trait bound get the
    // user's span, so a type error points at the user's type.
    let mut lets = Vec::new();
    let mut vars = Vec::new();
    for (i, arg) in sig.args.iter().enumerate() {
        let var = format_ident!("__outbox_arg{}", i);
        let ty = &arg.ty;
        let span = ty.span();
        lets.push(match arg.kind {
            ArgKind::Payload => {
                let decode = quote_spanned!(span=> ::outbox::__private::decode::<#ty>);
                quote! { let #var = #decode(&__outbox_env)?; }
            }
            ArgKind::FromContext => {
                let from_context =
                    quote_spanned!(span=> <#ty as ::outbox::FromContext>::from_context);
                quote! { let #var = #from_context(&__outbox_env, &__outbox_ctx)?; }
            }
            ArgKind::Context => {
                quote! { let #var: #ty = ::core::clone::Clone::clone(&__outbox_ctx); }
            }
        });
        vars.push(var);
    }

    let send_check = quote_spanned!(ident.span()=> __outbox_send);
    let call = quote! { let __outbox_ret = #send_check(#ident(#(#vars),*)).await; };

    let value = match sig.ret {
        Return::Unit => None,
        Return::Result { span, .. } => {
            let into_error = quote_spanned!(span=> ::outbox::__private::into_handler_error);
            Some((
                span,
                quote! {
                    let __outbox_value = match __outbox_ret {
                        ::core::result::Result::Ok(value) => value,
                        ::core::result::Result::Err(error) => {
                            return ::core::result::Result::Err(#into_error(error));
                        }
                    };
                },
            ))
        }
        Return::Value { span } => {
            // A `Result` under an alias of another name looks like a plain value
            // here; its `Err` would count as success. Refuse it at compile time.
            let check = quote_spanned! {span=>
                let () = ::outbox::__private::probe_return(&__outbox_ret).check();
            };
            let check = quote! {
                {
                    use ::outbox::__private::PlainValue as _;
                    #check
                }
            };
            Some((
                span,
                quote! {
                    #check
                    let __outbox_value = __outbox_ret;
                },
            ))
        }
    };

    let finish = match (value, publishers.is_empty()) {
        (None, _) => quote! {
            let () = __outbox_ret;
            ::core::result::Result::Ok(::outbox::Output::none())
        },
        (Some((_, value)), true) => quote! {
            #value
            let _ = __outbox_value;
            ::core::result::Result::Ok(::outbox::Output::none())
        },
        (Some((span, value)), false) => {
            let encode = quote_spanned!(span=> ::outbox::__private::encode);
            let last = publishers.len() - 1;
            let publishes = publishers.iter().enumerate().map(|(i, p)| {
                let topic = &p.topic;
                let sink = p.broker.sink();
                if i == last {
                    quote! { .publish(#sink, #topic, __outbox_key, __outbox_payload) }
                } else {
                    quote! {
                        .publish(
                            #sink,
                            #topic,
                            ::core::clone::Clone::clone(&__outbox_key),
                            ::core::clone::Clone::clone(&__outbox_payload),
                        )
                    }
                }
            });
            quote! {
                #value
                let (__outbox_key, __outbox_payload) = #encode(__outbox_value)?;
                ::core::result::Result::Ok(::outbox::Output::none() #(#publishes)*)
            }
        }
    };

    let mut settings = Vec::new();
    for queue in &args.queues {
        settings.push(quote! { .queue(#queue) });
    }
    if let Some(n) = &args.concurrency {
        settings.push(quote! { .concurrency(#n) });
    }
    if let Some(n) = &args.workers {
        settings.push(quote! { .workers(#n) });
    }
    if let Some(n) = &args.batch_size {
        settings.push(quote! { .batch_size(#n) });
    }
    if let Some(n) = &args.max_deliveries {
        settings.push(quote! { .max_deliveries(#n) });
    }
    if let Some((_, ms)) = &args.lease_ttl {
        settings.push(quote! { .lease_ttl(::core::time::Duration::from_millis(#ms)) });
    }
    if let Some(retry) = &args.retry {
        settings.push(quote! { .retry(#retry) });
    }
    match &args.dlq {
        Some(Dlq::Table(table)) => settings.push(quote! { .dlq(#table) }),
        Some(Dlq::None) => settings.push(quote! { .no_dlq() }),
        None => {}
    }
    let ack = args
        .ack
        .as_ref()
        .map(|a| a.value)
        .or(sig.ack_arg.map(|_| Ack::Manual));
    if let Some(ack) = ack {
        let policy = match ack {
            Ack::Nack => quote!(NackOnError),
            Ack::Reject => quote!(RejectOnError),
            Ack::Manual => quote!(Manual),
        };
        settings.push(quote! { .ack_policy(::outbox::AckPolicy::#policy) });
    }
    if let Some(ordered) = args.ordered {
        settings.push(quote! { .ordered(#ordered) });
    }
    for p in publishers {
        let topic = &p.topic;
        let sink = p.broker.sink();
        settings.push(quote! { .publisher(#sink, #topic) });
    }
    let file = quote_spanned!(ident.span()=> ::core::file!());
    let line = quote_spanned!(ident.span()=> ::core::line!());
    let doc = format!(
        "Builds the subscriber of handler `{name}` (generated by `#[outbox::subscriber]`)."
    );

    quote! {
        #[allow(non_camel_case_types, dead_code, missing_docs, unreachable_pub)]
        #[doc(hidden)]
        #vis struct #ident {}

        impl #ident {
            #[doc = #doc]
            #[allow(unreachable_pub)]
            #vis fn subscriber() -> ::outbox::Subscriber {
                async fn __outbox_call(
                    __outbox_env: ::std::sync::Arc<::outbox::Envelope>,
                    __outbox_ctx: ::outbox::Context,
                ) -> ::core::result::Result<::outbox::Output, ::outbox::HandlerError> {
                    // Names the handler when its future is not `Send`.
                    fn __outbox_send<F>(future: F) -> F
                    where
                        F: ::core::future::Future + ::core::marker::Send + 'static,
                    {
                        future
                    }
                    #(#lets)*
                    #call
                    #finish
                }
                ::outbox::Subscriber::new(#name, __outbox_call)
                    #(#settings)*
                    .source(#file, #line)
            }
        }

        ::outbox::__private::inventory::submit! {
            ::outbox::__private::Registration {
                name: #name,
                type_id: || ::outbox::__private::type_id_of(&#ident),
                build: #ident::subscriber,
            }
        }
    }
}
