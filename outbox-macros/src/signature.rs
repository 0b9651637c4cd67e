//! What a handler's signature says: which argument is the payload, which are
//! context, and what the return value is. Everything here is syntactic: the
//! macro sees tokens, not types, so context arguments are recognised by the
//! last segment of their type's path.

use crate::attr::Errors;
use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::{FnArg, GenericArgument, ItemFn, PathArguments, ReturnType, Type};

/// The context argument types, as the docs and the errors list them.
pub(crate) const CONTEXT_TYPES: &str =
    "outbox::Meta, outbox::State<T>, sqlx::PgPool, outbox::Ack and outbox::Context";

/// How one argument of the handler is produced.
pub(crate) enum ArgKind {
    /// Decoded from the row's payload.
    Payload,
    /// Built with `outbox::FromContext` (`Meta`, `State<T>`, `PgPool`, `Ack`).
    FromContext,
    /// The `outbox::Context` itself, cloned.
    Context,
}

/// One argument of the handler.
pub(crate) struct Arg {
    pub(crate) kind: ArgKind,
    pub(crate) ty: Type,
}

/// What the handler returns.
pub(crate) enum Return {
    /// Nothing (`()` or no return type): nothing to publish.
    Unit,
    /// `Result<T, E>` (any path whose last segment is `Result`): `Err` fails the row, `Ok`
    /// is published. `unit_ok` when `T` is written `()`.
    Result { span: Span, unit_ok: bool },
    /// Any other type: the value is published.
    Value { span: Span },
}

/// A handler whose signature the runtime can call.
pub(crate) struct Signature {
    pub(crate) args: Vec<Arg>,
    pub(crate) ret: Return,
    /// The `Ack` argument, if any (it implies `ack = "manual"`).
    pub(crate) ack_arg: Option<Span>,
}

impl Signature {
    /// Checks the function; every problem is reported, each at its own span.
    pub(crate) fn analyse(func: &ItemFn) -> syn::Result<Self> {
        let sig = &func.sig;
        let ident = &sig.ident;
        let mut errors = Errors::default();

        if sig.asyncness.is_none() {
            errors.add(
                sig.fn_token.span(),
                format!("a handler must be an `async fn`: write `async fn {ident}(...)`"),
            );
        }
        if let Some(c) = &sig.constness {
            errors.add(c.span(), "a handler cannot be a `const fn`: remove `const`");
        }
        if let Some(u) = &sig.unsafety {
            errors.add(
                u.span(),
                "a handler cannot be an `unsafe fn`: remove `unsafe` and use an `unsafe` block inside if you must",
            );
        }
        if let Some(abi) = &sig.abi {
            errors.add(
                abi.span(),
                "a handler cannot have an `extern` ABI: remove it",
            );
        }
        if let Some(v) = &sig.variadic {
            errors.add(v.span(), "a handler cannot be variadic");
        }
        if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
            let span = match &sig.generics.where_clause {
                Some(w) if sig.generics.params.is_empty() => w.span(),
                _ => sig.generics.span(),
            };
            errors.add(
                span,
                "a handler cannot be generic: the runtime calls one concrete function; use concrete types (one handler per payload type)",
            );
        }

        let mut args = Vec::new();
        let mut payload: Option<&syn::PatType> = None;
        let mut ack_arg = None;
        for input in &sig.inputs {
            let pat_type = match input {
                FnArg::Receiver(r) => {
                    errors.add(
                        r.span(),
                        "a handler is a free function, not a method: remove `self` (reach shared things through an `outbox::State<T>` argument)",
                    );
                    continue;
                }
                FnArg::Typed(t) => t,
            };
            let ty = &*pat_type.ty;
            if let Some(span) = find_impl_trait(ty) {
                errors.add(
                    span,
                    "`impl Trait` in an argument makes the handler generic: name a concrete type",
                );
                continue;
            }
            if let Type::Reference(r) = strip_groups(ty) {
                let inner = &r.elem;
                let inner = quote::quote!(#inner).to_string();
                let owned = match inner.as_str() {
                    "str" => "String".to_owned(),
                    "[u8]" => "Vec<u8>".to_owned(),
                    other => other.to_owned(),
                };
                errors.add(
                    ty.span(),
                    format!(
                        "handler arguments are owned values: write `{owned}` instead of a reference"
                    ),
                );
                continue;
            }
            let kind = classify(ty);
            match kind {
                ArgKind::Payload => match payload {
                    Some(first) => {
                        let first_pat = &first.pat;
                        errors.add(
                            pat_type.span(),
                            format!(
                                "a handler takes one payload argument, and `{}` is already the payload; \
                                 the other arguments must be context ({CONTEXT_TYPES}); \
                                 to receive several values, publish one struct that holds them",
                                quote::quote!(#first_pat)
                            ),
                        );
                        continue;
                    }
                    None => payload = Some(pat_type),
                },
                ArgKind::FromContext => {
                    if last_segment(ty).is_some_and(|s| s == "Ack") {
                        ack_arg.get_or_insert(ty.span());
                    }
                }
                ArgKind::Context => {}
            }
            args.push(Arg {
                kind,
                ty: ty.clone(),
            });
        }
        let has_receiver = sig.receiver().is_some();
        if payload.is_none() && !has_receiver && errors_are_only_about_args(&sig.inputs) {
            errors.add(
                sig.paren_token.span.join(),
                format!(
                    "handler `{ident}` has no payload argument: add one, e.g. `order: Order` \
                     (any serde::Deserialize type, or outbox::Raw for the bytes); \
                     the context arguments ({CONTEXT_TYPES}) do not count"
                ),
            );
        }

        let ret = match &sig.output {
            ReturnType::Default => Return::Unit,
            ReturnType::Type(_, ty) => match return_kind(ty) {
                Ok(r) => r,
                Err(e) => {
                    errors.push(e);
                    Return::Unit
                }
            },
        };

        errors.finish()?;
        Ok(Signature { args, ret, ack_arg })
    }
}

/// True unless an argument was already rejected for its own reason (a
/// reference or `impl Trait` payload): then "no payload" would be noise.
fn errors_are_only_about_args(inputs: &syn::punctuated::Punctuated<FnArg, syn::Token![,]>) -> bool {
    inputs.iter().all(|i| match i {
        FnArg::Typed(t) => {
            find_impl_trait(&t.ty).is_none() && !matches!(strip_groups(&t.ty), Type::Reference(_))
        }
        FnArg::Receiver(_) => true,
    })
}

fn return_kind(ty: &Type) -> syn::Result<Return> {
    const ACCEPTED: &str = "accepted: nothing or `()`, a type that implements serde::Serialize \
         (published by a stacked #[kafka::publisher]), outbox::Keyed<T>, outbox::Raw, or `Result<T, E>` of those";
    if let Some(span) = find_impl_trait(ty) {
        return Err(syn::Error::new(
            span,
            format!("unsupported return type: `impl Trait` cannot be named by the generated code; {ACCEPTED}"),
        ));
    }
    let ty = strip_groups(ty);
    match ty {
        Type::Tuple(t) if t.elems.is_empty() => Ok(Return::Unit),
        Type::Never(_) | Type::TraitObject(_) | Type::Infer(_) | Type::Reference(_) => Err(
            syn::Error::new(ty.span(), format!("unsupported return type; {ACCEPTED}")),
        ),
        Type::Path(p) if p.qself.is_none() => {
            let last = p.path.segments.last().expect("a path has a segment");
            if last.ident == "Result" {
                let ok = match &last.arguments {
                    PathArguments::AngleBracketed(a) => a.args.iter().find_map(|g| match g {
                        GenericArgument::Type(t) => Some(t),
                        _ => None,
                    }),
                    _ => None,
                };
                let unit_ok =
                    matches!(ok.map(strip_groups), Some(Type::Tuple(t)) if t.elems.is_empty());
                Ok(Return::Result {
                    span: ty.span(),
                    unit_ok,
                })
            } else {
                Ok(Return::Value { span: ty.span() })
            }
        }
        _ => Ok(Return::Value { span: ty.span() }),
    }
}

/// Context arguments are recognised by the last segment of their type's path.
fn classify(ty: &Type) -> ArgKind {
    match last_segment(ty) {
        Some(s) if s == "Meta" || s == "PgPool" || s == "Ack" => ArgKind::FromContext,
        Some(s) if s == "State" && has_angle_args(ty) => ArgKind::FromContext,
        Some(s) if s == "Context" => ArgKind::Context,
        _ => ArgKind::Payload,
    }
}

fn strip_groups(ty: &Type) -> &Type {
    match ty {
        Type::Group(g) => strip_groups(&g.elem),
        Type::Paren(p) => strip_groups(&p.elem),
        other => other,
    }
}

fn type_path(ty: &Type) -> Option<&syn::Path> {
    match strip_groups(ty) {
        Type::Path(p) if p.qself.is_none() => Some(&p.path),
        _ => None,
    }
}

fn last_segment(ty: &Type) -> Option<&syn::Ident> {
    type_path(ty)
        .and_then(|p| p.segments.last())
        .map(|s| &s.ident)
}

fn has_angle_args(ty: &Type) -> bool {
    type_path(ty)
        .and_then(|p| p.segments.last())
        .is_some_and(|s| matches!(s.arguments, PathArguments::AngleBracketed(_)))
}

/// The span of the first `impl Trait` anywhere inside `ty`.
fn find_impl_trait(ty: &Type) -> Option<Span> {
    struct Find(Option<Span>);
    impl<'ast> Visit<'ast> for Find {
        fn visit_type_impl_trait(&mut self, t: &'ast syn::TypeImplTrait) {
            self.0.get_or_insert(t.span());
        }
    }
    let mut f = Find(None);
    f.visit_type(ty);
    f.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn analyse(tokens: proc_macro2::TokenStream) -> syn::Result<Signature> {
        Signature::analyse(&syn::parse2(tokens).unwrap())
    }

    #[test]
    fn payload_and_context() {
        let s = analyse(quote::quote! {
            async fn h(m: outbox::Meta, (a, b): (i64, i64), st: State<Cfg>, pool: sqlx::PgPool, ack: Ack, c: outbox::Context) {}
        })
        .unwrap();
        assert_eq!(s.args.len(), 6);
        assert!(matches!(s.args[1].kind, ArgKind::Payload));
        assert!(matches!(s.args[5].kind, ArgKind::Context));
        assert!(s.ack_arg.is_some());
        assert!(matches!(s.ret, Return::Unit));
    }

    #[test]
    fn returns() {
        let r = |t| analyse(t).unwrap().ret;
        assert!(matches!(
            r(quote::quote!(
                async fn h(x: i64) -> () {}
            )),
            Return::Unit
        ));
        assert!(matches!(
            r(quote::quote!(
                async fn h(x: i64) -> Result<(), String> {}
            )),
            Return::Result { unit_ok: true, .. }
        ));
        assert!(matches!(
            r(quote::quote!(
                async fn h(x: i64) -> anyhow::Result<i64> {}
            )),
            Return::Result { unit_ok: false, .. }
        ));
        assert!(matches!(
            r(quote::quote!(
                async fn h(x: i64) -> i64 {}
            )),
            Return::Value { .. }
        ));
    }

    #[test]
    fn rejected() {
        let e = |t| analyse(t).err().expect("an error").to_string();
        assert!(e(quote::quote!(
            fn h(x: i64) {}
        ))
        .contains("async fn"));
        assert!(e(quote::quote!(
            async fn h() {}
        ))
        .contains("no payload"));
        assert!(e(quote::quote!(
            async fn h(m: Meta) {}
        ))
        .contains("no payload"));
        assert!(e(quote::quote!(
            async fn h(a: A, b: B) {}
        ))
        .contains("one payload"));
        assert!(e(quote::quote!(
            async fn h<T>(a: T) {}
        ))
        .contains("generic"));
        assert!(e(quote::quote!(
            async fn h(a: impl Tr) {}
        ))
        .contains("impl Trait"));
        assert!(e(quote::quote!(
            async fn h(a: &str) {}
        ))
        .contains("owned"));
        assert!(e(quote::quote!(
            async fn h(a: i64) -> impl Tr {}
        ))
        .contains("unsupported return"));
    }
}
