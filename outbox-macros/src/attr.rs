//! Typed arguments of `#[outbox::subscriber(...)]` and `#[kafka::publisher(...)]`.
//!
//! Parsing is done once, here, into [`SubscriberArgs`] and [`PublisherArgs`];
//! the expansion works only on those structs. Every error points at the token
//! that is wrong and says what is accepted.

use proc_macro2::{Span, TokenStream};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Ident, Lit, LitInt, LitStr, Token};

/// The options `#[outbox::subscriber]` accepts, in the order the docs list them.
const OPTIONS: &[&str] = &[
    "name",
    "concurrency",
    "workers",
    "batch_size",
    "lease_ttl",
    "retry",
    "dlq",
    "no_dlq",
    "ack",
    "ordered",
];

/// Longest queue name, in bytes (same limit as `outbox::MAX_QUEUE_BYTES`).
const MAX_QUEUE_BYTES: usize = 255;

/// Longest Kafka topic name.
const MAX_TOPIC_CHARS: usize = 249;

/// What `ack = "..."` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ack {
    Nack,
    Reject,
    Manual,
}

/// `dlq = "table"` or `no_dlq`.
pub(crate) enum Dlq {
    Table(LitStr),
    None,
}

/// A value together with the span of the option that set it (for cross-checks).
pub(crate) struct WithSpan<T> {
    pub(crate) value: T,
    pub(crate) span: Span,
}

/// The arguments of `#[outbox::subscriber("q1", "q2", key = value, ...)]`.
#[derive(Default)]
pub(crate) struct SubscriberArgs {
    pub(crate) queues: Vec<LitStr>,
    pub(crate) name: Option<LitStr>,
    pub(crate) concurrency: Option<LitInt>,
    pub(crate) workers: Option<LitInt>,
    pub(crate) batch_size: Option<LitInt>,
    /// The literal (for its span) and the duration in milliseconds.
    pub(crate) lease_ttl: Option<(LitStr, u64)>,
    pub(crate) retry: Option<Expr>,
    pub(crate) dlq: Option<Dlq>,
    pub(crate) ack: Option<WithSpan<Ack>>,
    pub(crate) ordered: Option<bool>,
}

/// The arguments of one `#[kafka::publisher("topic")]`.
pub(crate) struct PublisherArgs {
    pub(crate) topic: LitStr,
    /// The whole attribute, for errors about the publisher as such.
    pub(crate) span: Span,
}

/// Collects several errors so that all of them are reported at once.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }

    pub(crate) fn add(&mut self, span: Span, msg: impl std::fmt::Display) {
        self.push(syn::Error::new(span, msg));
    }

    /// Keeps the value of `r`, or records its error.
    pub(crate) fn take<T>(&mut self, r: syn::Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(e);
                None
            }
        }
    }

    /// The errors collected; call it only after adding one.
    pub(crate) fn into_error(self) -> syn::Error {
        self.0.expect("an error was added")
    }

    pub(crate) fn finish(self) -> syn::Result<()> {
        match self.0 {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Unwraps the invisible groups a `macro_rules!` `$e:expr` leaves around tokens.
fn ungroup(expr: &Expr) -> &Expr {
    match expr {
        Expr::Group(g) => ungroup(&g.expr),
        Expr::Paren(p) => ungroup(&p.expr),
        other => other,
    }
}

fn as_lit_str(expr: &Expr) -> Option<&LitStr> {
    match ungroup(expr) {
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => Some(s),
        _ => None,
    }
}

fn as_ident(expr: &Expr) -> Option<&Ident> {
    match ungroup(expr) {
        Expr::Path(p) if p.qself.is_none() && p.attrs.is_empty() => p.path.get_ident(),
        _ => None,
    }
}

/// Parses the comma-separated arguments of an attribute as expressions: string
/// literals, `ident`, and `ident = value` are all expressions.
fn parse_list(tokens: TokenStream) -> syn::Result<Punctuated<Expr, Token![,]>> {
    Punctuated::<Expr, Token![,]>::parse_terminated.parse2(tokens)
}

impl SubscriberArgs {
    /// Parses the arguments; `attr_span` is where to report a missing queue.
    pub(crate) fn parse(tokens: TokenStream, attr_span: Span) -> syn::Result<Self> {
        let list = parse_list(tokens)?;
        let mut args = SubscriberArgs::default();
        let mut errors = Errors::default();
        let mut seen: Vec<String> = Vec::new();
        let mut options_started = false;

        for expr in &list {
            // A queue name.
            if let Some(lit) = as_lit_str(expr) {
                if options_started {
                    errors.add(
                        lit.span(),
                        "queue names come first, before the options, e.g. #[outbox::subscriber(\"orders\", \"refunds\", concurrency = 10)]",
                    );
                } else if let Err(msg) = check_queue(&lit.value()) {
                    errors.add(lit.span(), msg);
                } else if args.queues.iter().any(|q| q.value() == lit.value()) {
                    errors.add(
                        lit.span(),
                        format!("queue {:?} is listed twice", lit.value()),
                    );
                } else {
                    args.queues.push(lit.clone());
                }
                continue;
            }

            // `key = value` or a flag.
            let (key, value) = match ungroup(expr) {
                Expr::Assign(assign) => match as_ident(&assign.left) {
                    Some(key) => (key, Some(&*assign.right)),
                    None => {
                        errors.add(
                            assign.left.span(),
                            format!("expected an option name; accepted: {}", OPTIONS.join(", ")),
                        );
                        continue;
                    }
                },
                other => match as_ident(other) {
                    // A flag, or a misspelt option once the queues are given.
                    Some(key)
                        if OPTIONS.contains(&key.to_string().as_str())
                            || options_started
                            || !args.queues.is_empty() =>
                    {
                        (key, None)
                    }
                    _ if !options_started => {
                        errors.add(
                            expr.span(),
                            "queue names must be string literals, e.g. #[outbox::subscriber(\"orders\")]",
                        );
                        continue;
                    }
                    Some(key) => (key, None),
                    None => {
                        errors.add(
                            expr.span(),
                            format!(
                                "expected a queue name (a string literal) or an option (`name = value`); accepted options: {}",
                                OPTIONS.join(", ")
                            ),
                        );
                        continue;
                    }
                },
            };
            options_started = true;

            let name = key.to_string();
            if !OPTIONS.contains(&name.as_str()) {
                let hint = match suggest(&name) {
                    _ if name == "queue" || name == "queues" => {
                        " (queues are given first, as string literals: #[outbox::subscriber(\"orders\")])".to_owned()
                    }
                    Some(s) => format!(" (did you mean `{s}`?)"),
                    None => String::new(),
                };
                errors.add(
                    key.span(),
                    format!(
                        "unknown option `{name}`{hint}; accepted: {}",
                        OPTIONS.join(", ")
                    ),
                );
                continue;
            }
            if seen.contains(&name) {
                errors.add(
                    key.span(),
                    format!("duplicate option `{name}`: give each option once (remove this one or the earlier one)"),
                );
                continue;
            }
            seen.push(name.clone());
            if let Err(e) = args.set(key, value) {
                errors.push(e);
            }
        }

        if args.queues.is_empty() && errors.0.is_none() {
            errors.add(
                attr_span,
                "a subscriber needs at least one queue, e.g. #[outbox::subscriber(\"orders\")]",
            );
        }
        errors.finish()?;
        Ok(args)
    }

    /// Sets one option (known, not a duplicate) from its value.
    fn set(&mut self, key: &Ident, value: Option<&Expr>) -> syn::Result<()> {
        let name = key.to_string();
        let needs = |example: &str| {
            syn::Error::new(
                key.span(),
                format!("option `{name}` needs a value, e.g. {example}"),
            )
        };
        match name.as_str() {
            "name" => {
                let v = value.ok_or_else(|| needs("name = \"audit\""))?;
                let lit = expect_str(v, "name", "name = \"audit\"")?;
                if lit.value().trim().is_empty() {
                    return Err(syn::Error::new(
                        lit.span(),
                        "the subscriber name must not be empty",
                    ));
                }
                self.name = Some(lit);
            }
            "concurrency" | "workers" | "batch_size" => {
                let example = format!("{name} = 10");
                let v = value.ok_or_else(|| needs(&example))?;
                let lit = expect_positive_int(v, &name, &example)?;
                match name.as_str() {
                    "concurrency" => self.concurrency = Some(lit),
                    "workers" => self.workers = Some(lit),
                    _ => self.batch_size = Some(lit),
                }
            }
            "lease_ttl" => {
                let v = value.ok_or_else(|| needs("lease_ttl = \"30s\""))?;
                let lit = expect_str(v, "lease_ttl", "lease_ttl = \"30s\"")?;
                let ms = parse_duration_ms(&lit.value())
                    .map_err(|msg| syn::Error::new(lit.span(), msg))?;
                self.lease_ttl = Some((lit, ms));
            }
            "retry" => {
                let v =
                    value.ok_or_else(|| needs("retry = outbox::ExponentialRetry::default()"))?;
                self.retry = Some(v.clone());
            }
            "dlq" => {
                let v = value.ok_or_else(|| needs("dlq = \"outbox_dlq\""))?;
                let lit = expect_str(v, "dlq", "dlq = \"outbox_dlq\"")?;
                if matches!(self.dlq, Some(Dlq::None)) {
                    return Err(syn::Error::new(
                        key.span(),
                        "`dlq` and `no_dlq` contradict each other: keep one",
                    ));
                }
                self.dlq = Some(Dlq::Table(lit));
            }
            "no_dlq" => {
                expect_flag(key, value)?;
                if matches!(self.dlq, Some(Dlq::Table(_))) {
                    return Err(syn::Error::new(
                        key.span(),
                        "`dlq` and `no_dlq` contradict each other: keep one",
                    ));
                }
                self.dlq = Some(Dlq::None);
            }
            "ack" => {
                let v = value.ok_or_else(|| needs("ack = \"reject\""))?;
                let lit = expect_str(v, "ack", "ack = \"reject\"")?;
                let ack = match lit.value().as_str() {
                    "nack" => Ack::Nack,
                    "reject" => Ack::Reject,
                    "manual" => Ack::Manual,
                    other => {
                        return Err(syn::Error::new(
                            lit.span(),
                            format!(
                                "unknown ack policy {other:?}; accepted: \"nack\" (retry errors, the default), \"reject\" (errors are final), \"manual\" (the handler decides with an outbox::Ack argument)"
                            ),
                        ))
                    }
                };
                self.ack = Some(WithSpan {
                    value: ack,
                    span: lit.span(),
                });
            }
            "ordered" => {
                self.ordered = Some(match value {
                    None => true,
                    Some(v) => match ungroup(v) {
                        Expr::Lit(ExprLit {
                            lit: Lit::Bool(b), ..
                        }) => b.value,
                        other => {
                            return Err(syn::Error::new(
                                other.span(),
                                "`ordered` expects `true` or `false` (or write just `ordered`)",
                            ))
                        }
                    },
                });
            }
            _ => unreachable!("option list and match arms agree"),
        }
        Ok(())
    }
}

impl PublisherArgs {
    /// Parses `("topic")`; `attr_span` is the whole attribute.
    pub(crate) fn parse(tokens: TokenStream, attr_span: Span) -> syn::Result<Self> {
        const EXAMPLE: &str = "#[kafka::publisher(\"orders.kafka\")]";
        let list = parse_list(tokens)?;
        let mut iter = list.iter();
        let first = iter.next().ok_or_else(|| {
            syn::Error::new(
                attr_span,
                format!("#[kafka::publisher] needs a topic, e.g. {EXAMPLE}"),
            )
        })?;
        let topic = as_lit_str(first).cloned().ok_or_else(|| {
            syn::Error::new(
                first.span(),
                format!("the topic must be a string literal, e.g. {EXAMPLE}"),
            )
        })?;
        if let Some(extra) = iter.next() {
            return Err(syn::Error::new(
                extra.span(),
                "#[kafka::publisher] takes one topic and no options; to publish to a second topic, stack another #[kafka::publisher(\"...\")]",
            ));
        }
        check_topic(&topic.value()).map_err(|msg| syn::Error::new(topic.span(), msg))?;
        Ok(PublisherArgs {
            topic,
            span: attr_span,
        })
    }
}

fn expect_str(value: &Expr, name: &str, example: &str) -> syn::Result<LitStr> {
    as_lit_str(value).cloned().ok_or_else(|| {
        syn::Error::new(
            value.span(),
            format!("`{name}` expects a string literal, e.g. {example}"),
        )
    })
}

fn expect_positive_int(value: &Expr, name: &str, example: &str) -> syn::Result<LitInt> {
    let lit = match ungroup(value) {
        Expr::Lit(ExprLit {
            lit: Lit::Int(i), ..
        }) => i.clone(),
        other => {
            return Err(syn::Error::new(
                other.span(),
                format!("`{name}` expects an integer literal, e.g. {example}"),
            ))
        }
    };
    if !matches!(lit.suffix(), "" | "usize") {
        return Err(syn::Error::new(
            lit.span(),
            format!("`{name}` is a usize: write {example} without a suffix"),
        ));
    }
    match lit.base10_parse::<usize>() {
        Ok(0) => Err(syn::Error::new(
            lit.span(),
            format!("`{name}` must be at least 1"),
        )),
        Ok(_) => Ok(lit),
        Err(_) => Err(syn::Error::new(
            lit.span(),
            format!("`{name}` is too large for a usize"),
        )),
    }
}

fn expect_flag(key: &Ident, value: Option<&Expr>) -> syn::Result<()> {
    match value {
        None => Ok(()),
        Some(v) => Err(syn::Error::new(
            v.span(),
            format!("`{key}` is a flag and takes no value: write just `{key}`"),
        )),
    }
}

/// Mirrors `outbox::validate_queue`, so a bad name is reported at the literal.
fn check_queue(queue: &str) -> Result<(), String> {
    const ACCEPTED: &str = "accepted: 1 to 255 bytes of printable text";
    if queue.is_empty() {
        Err(format!("the queue name is empty ({ACCEPTED})"))
    } else if queue.len() > MAX_QUEUE_BYTES {
        Err(format!(
            "the queue name is {} bytes long ({ACCEPTED})",
            queue.len()
        ))
    } else if queue.chars().any(char::is_control) {
        Err(format!(
            "the queue name contains a control character ({ACCEPTED})"
        ))
    } else {
        Ok(())
    }
}

/// Kafka's own rule for topic names.
pub(crate) fn check_topic(topic: &str) -> Result<(), String> {
    const ACCEPTED: &str =
        "accepted: 1 to 249 characters among ASCII letters, digits, '.', '_' and '-'";
    let chars = topic.chars().count();
    if chars == 0 {
        return Err(format!("the topic is empty ({ACCEPTED})"));
    }
    if chars > MAX_TOPIC_CHARS {
        return Err(format!("the topic is {chars} characters long ({ACCEPTED})"));
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "invalid Kafka topic {topic:?}: character {c:?} is not allowed ({ACCEPTED})"
        ));
    }
    if topic == "." || topic == ".." {
        return Err(format!(
            "invalid Kafka topic {topic:?}: \".\" and \"..\" are reserved"
        ));
    }
    Ok(())
}

/// Parses `"500ms"`, `"30s"`, `"5m"`, `"1h"` into milliseconds.
pub(crate) fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid duration {text:?}: expected a whole number followed by ms, s, m or h, e.g. \"500ms\", \"30s\", \"5m\", \"1h\""
        )
    };
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(bad)?;
    let (number, unit) = trimmed.split_at(digits_end);
    if number.is_empty() {
        return Err(bad());
    }
    let factor: u64 = match unit.trim_start() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let ms = n
        .checked_mul(factor)
        .ok_or_else(|| format!("duration {text:?} is too long"))?;
    if ms == 0 {
        return Err(format!("duration {text:?} is zero; it must be positive"));
    }
    Ok(ms)
}

/// The accepted option closest to a misspelt one, if any is close.
fn suggest(name: &str) -> Option<&'static str> {
    OPTIONS
        .iter()
        .map(|o| (edit_distance(name, o), *o))
        .filter(|(d, o)| *d <= (o.len() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, o)| o)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn parse(tokens: TokenStream) -> syn::Result<SubscriberArgs> {
        SubscriberArgs::parse(tokens, Span::call_site())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        assert_eq!(parse_duration_ms(" 2 s "), Ok(2_000));
        for bad in [
            "",
            "s",
            "30",
            "30sec",
            "1.5s",
            "-1s",
            "0s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration_ms(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn topics() {
        assert!(check_topic("orders.kafka").is_ok());
        assert!(check_topic("a-b_c.9").is_ok());
        assert!(check_topic("").is_err());
        assert!(check_topic("a b").is_err());
        assert!(check_topic("..").is_err());
        assert!(check_topic(&"x".repeat(250)).is_err());
        assert!(check_topic(&"x".repeat(249)).is_ok());
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest("concurency"), Some("concurrency"));
        assert_eq!(suggest("batchsize"), Some("batch_size"));
        assert_eq!(suggest("xyz"), None);
    }

    #[test]
    fn full_argument_list() {
        let args = parse(quote!(
            "orders",
            "refunds",
            name = "orders_handler",
            concurrency = 10,
            workers = 2,
            batch_size = 50,
            lease_ttl = "1m",
            retry = outbox::NoRetry,
            dlq = "dead",
            ack = "reject",
            ordered,
        ))
        .unwrap();
        assert_eq!(args.queues.len(), 2);
        assert_eq!(args.lease_ttl.unwrap().1, 60_000);
        assert_eq!(args.ack.unwrap().value, Ack::Reject);
        assert_eq!(args.ordered, Some(true));
        assert!(matches!(args.dlq, Some(Dlq::Table(_))));
    }

    #[test]
    fn errors() {
        let msg = |t: TokenStream| parse(t).err().expect("an error").to_string();
        assert!(msg(quote!()).contains("at least one queue"));
        assert!(msg(quote!(ORDERS)).contains("string literals"));
        assert!(msg(quote!(queues::ORDERS)).contains("string literals"));
        assert!(msg(quote!("a", concurency = 1)).contains("did you mean `concurrency`"));
        assert!(msg(quote!("a", workers = 1, workers = 2)).contains("duplicate option"));
        assert!(msg(quote!("a", workers = "1")).contains("integer literal"));
        assert!(msg(quote!("a", workers = 0)).contains("at least 1"));
        assert!(msg(quote!("a", dlq = "x", no_dlq)).contains("contradict"));
        assert!(msg(quote!("a", ordered, "b")).contains("come first"));
        assert!(msg(quote!("a", "a")).contains("twice"));
        assert!(msg(quote!("a", ack = "later")).contains("unknown ack policy"));
        assert!(msg(quote!("a", no_dlq = true)).contains("takes no value"));
        assert!(msg(quote!("a", lease_ttl)).contains("needs a value"));
    }
}
