//! Typed arguments of `#[outbox::subscriber(...)]` and the publishers
//! (`#[kafka::publisher(...)]`, `#[nats::publisher(...)]`).
//!
//! Parsing is done once, here, into [`SubscriberArgs`] and [`PublisherArgs`];
//! the expansion works only on those structs. Every error points at the token
//! that is wrong and says what is accepted.

use proc_macro2::{Span, TokenStream};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Ident, Lit, LitInt, LitStr, Token};

use crate::stack::Broker;

/// The options `#[outbox::subscriber]` accepts, in the order the docs list them.
const OPTIONS: &[&str] = &[
    "name",
    "concurrency",
    "workers",
    "batch_size",
    "lease_ttl",
    "max_deliveries",
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
    pub(crate) max_deliveries: Option<LitInt>,
    pub(crate) retry: Option<Expr>,
    pub(crate) dlq: Option<Dlq>,
    pub(crate) ack: Option<WithSpan<Ack>>,
    pub(crate) ordered: Option<bool>,
}

/// The arguments of one `#[kafka::publisher("topic")]` or
/// `#[nats::publisher("subject")]`.
pub(crate) struct PublisherArgs {
    pub(crate) broker: Broker,
    /// The topic or subject.
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
            "concurrency" | "workers" | "batch_size" | "max_deliveries" => {
                let example = format!("{name} = 10");
                let v = value.ok_or_else(|| needs(&example))?;
                let lit = expect_positive_int(v, &name, &example)?;
                match name.as_str() {
                    "concurrency" => self.concurrency = Some(lit),
                    "workers" => self.workers = Some(lit),
                    "max_deliveries" => self.max_deliveries = Some(lit),
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
    /// Parses `("topic")` for `broker`; `attr_span` is the whole attribute.
    pub(crate) fn parse(broker: Broker, tokens: TokenStream, attr_span: Span) -> syn::Result<Self> {
        let example = broker.example();
        let attr = broker.attr();
        let noun = broker.destination();
        let list = parse_list(tokens)?;
        let mut iter = list.iter();
        let first = iter.next().ok_or_else(|| {
            syn::Error::new(attr_span, format!("{attr} needs a {noun}, e.g. {example}"))
        })?;
        let topic = as_lit_str(first).cloned().ok_or_else(|| {
            syn::Error::new(
                first.span(),
                format!("the {noun} must be a string literal, e.g. {example}"),
            )
        })?;
        if let Some(extra) = iter.next() {
            return Err(syn::Error::new(
                extra.span(),
                format!(
                    "{attr} takes one {noun} and no options; to publish to a second {noun}, stack another {}::publisher(\"...\")]",
                    &attr[..attr.len() - "::publisher]".len()]
                ),
            ));
        }
        broker
            .check(&topic.value())
            .map_err(|msg| syn::Error::new(topic.span(), msg))?;
        Ok(PublisherArgs {
            broker,
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

/// NATS's rule for the subject of a publish: tokens separated by `.`, none of
/// them empty, no whitespace or control characters, and no wildcards (`*`,
/// `>`), which only subscriptions may use.
pub(crate) fn check_subject(subject: &str) -> Result<(), String> {
    const ACCEPTED: &str = "accepted: tokens of printable characters without spaces, \
         separated by single dots, such as \"orders.created\"; no wildcards";
    if subject.is_empty() {
        return Err(format!("the subject is empty ({ACCEPTED})"));
    }
    if let Some(c) = subject
        .chars()
        .find(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "invalid NATS subject {subject:?}: {c:?} is not allowed ({ACCEPTED})"
        ));
    }
    if subject.split('.').any(str::is_empty) {
        return Err(format!(
            "invalid NATS subject {subject:?}: empty token (a leading, trailing or doubled '.'; {ACCEPTED})"
        ));
    }
    if let Some(token) = subject.split('.').find(|t| *t == "*" || *t == ">") {
        return Err(format!(
            "invalid NATS subject {subject:?}: the wildcard {token:?} matches subjects when subscribing; \
             a publish names one subject ({ACCEPTED})"
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

/// Edit distance in which swapping two neighbouring letters counts as one
/// edit (optimal string alignment), so that `retyr` is one edit from `retry`.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: distance between the first i letters of a and the first j of b.
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
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
    fn subjects() {
        assert!(check_subject("orders.created").is_ok());
        assert!(check_subject("orders").is_ok());
        assert!(check_subject("a-b_c.9.$x").is_ok());
        assert!(check_subject("").is_err());
        assert!(check_subject("a b").is_err());
        assert!(check_subject("a..b").is_err());
        assert!(check_subject(".a").is_err());
        assert!(check_subject("a.").is_err());
        assert!(check_subject("orders.*").is_err());
        assert!(check_subject("orders.>").is_err());
        assert!(check_subject("a\tb").is_err());
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
        // A swap of two neighbouring letters is one edit.
        assert_eq!(suggest("retyr"), Some("retry"));
        assert_eq!(suggest("odrered"), Some("ordered"));
        assert_eq!(suggest("max_delivereis"), Some("max_deliveries"));
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

/// Property tests of the parser: option order does not matter, durations
/// round-trip, and no input makes it panic.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use quote::ToTokens;
    use std::str::FromStr;

    /// What a subscriber attribute says, in plain values.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    struct Settings {
        queues: Vec<String>,
        name: Option<String>,
        concurrency: Option<usize>,
        workers: Option<usize>,
        batch_size: Option<usize>,
        lease_ttl_ms: Option<u64>,
        /// The retry expression, as normalised tokens.
        retry: Option<String>,
        /// `Some(None)` is `no_dlq`.
        dlq: Option<Option<String>>,
        ack: Option<Ack>,
        ordered: Option<bool>,
    }

    fn int(lit: &Option<LitInt>) -> Option<usize> {
        lit.as_ref().map(|l| l.base10_parse().unwrap())
    }

    fn settings_of(a: &SubscriberArgs) -> Settings {
        Settings {
            queues: a.queues.iter().map(LitStr::value).collect(),
            name: a.name.as_ref().map(LitStr::value),
            concurrency: int(&a.concurrency),
            workers: int(&a.workers),
            batch_size: int(&a.batch_size),
            lease_ttl_ms: a.lease_ttl.as_ref().map(|(_, ms)| *ms),
            retry: a.retry.as_ref().map(|e| e.to_token_stream().to_string()),
            dlq: a.dlq.as_ref().map(|d| match d {
                Dlq::Table(t) => Some(t.value()),
                Dlq::None => None,
            }),
            ack: a.ack.as_ref().map(|w| w.value),
            ordered: a.ordered,
        }
    }

    fn normalise_expr(text: &str) -> String {
        syn::parse_str::<Expr>(text)
            .unwrap()
            .to_token_stream()
            .to_string()
    }

    fn parse_text(text: &str) -> syn::Result<SubscriberArgs> {
        let tokens = TokenStream::from_str(text).expect("the test input tokenizes");
        SubscriberArgs::parse(tokens, Span::call_site())
    }

    /// The attribute arguments that say `s`: queues first, then one entry per
    /// option. `lease` is how the lease is written (number, unit); `bare` writes
    /// `ordered = true` as just `ordered`.
    fn render(s: &Settings, lease: Option<(u64, &str)>, bare: bool) -> (Vec<String>, Vec<String>) {
        let queues = s.queues.iter().map(|q| format!("{q:?}")).collect();
        let mut opts = Vec::new();
        if let Some(n) = &s.name {
            opts.push(format!("name = {n:?}"));
        }
        for (key, v) in [
            ("concurrency", s.concurrency),
            ("workers", s.workers),
            ("batch_size", s.batch_size),
        ] {
            if let Some(v) = v {
                opts.push(format!("{key} = {v}"));
            }
        }
        if let Some((n, unit)) = lease {
            opts.push(format!("lease_ttl = \"{n}{unit}\""));
        }
        if let Some(r) = &s.retry {
            opts.push(format!("retry = {r}"));
        }
        match &s.dlq {
            Some(Some(t)) => opts.push(format!("dlq = {t:?}")),
            Some(None) => opts.push("no_dlq".to_owned()),
            None => {}
        }
        if let Some(ack) = s.ack {
            let v = match ack {
                Ack::Nack => "nack",
                Ack::Reject => "reject",
                Ack::Manual => "manual",
            };
            opts.push(format!("ack = {v:?}"));
        }
        match s.ordered {
            Some(true) if bare => opts.push("ordered".to_owned()),
            Some(o) => opts.push(format!("ordered = {o}")),
            None => {}
        }
        (queues, opts)
    }

    const UNITS: [(&str, u64); 4] = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)];

    const RETRIES: [&str; 3] = [
        "outbox::NoRetry",
        "outbox::ConstantRetry::new(std::time::Duration::from_secs(5))",
        "outbox::ExponentialRetry::default().max_attempts(3)",
    ];

    /// Valid settings, with how to write the lease and `ordered`.
    fn valid() -> impl Strategy<Value = (Settings, Option<(u64, &'static str)>, bool)> {
        let queues = prop::collection::btree_set("\\PC{1,20}", 1..4)
            .prop_map(|set| set.into_iter().collect::<Vec<_>>());
        let count = || prop::option::of(1usize..=100_000);
        let dlq = prop_oneof![
            Just(None),
            Just(Some(None)),
            "[a-z_][a-z0-9_]{0,20}".prop_map(|t| Some(Some(t))),
        ];
        let ack = prop::option::of(prop::sample::select(vec![
            Ack::Nack,
            Ack::Reject,
            Ack::Manual,
        ]));
        let lease = prop::option::of((1u64..=100_000, prop::sample::select(UNITS.to_vec())));
        (
            queues,
            prop::option::of("[a-z][a-z0-9_ ]{0,15}"),
            (count(), count(), count()),
            lease,
            prop::option::of(prop::sample::select(RETRIES.to_vec())),
            dlq,
            ack,
            prop::option::of(any::<bool>()),
            any::<bool>(),
        )
            .prop_map(
                |(
                    queues,
                    name,
                    (concurrency, workers, batch_size),
                    lease,
                    retry,
                    dlq,
                    ack,
                    ordered,
                    bare,
                )| {
                    let settings = Settings {
                        queues,
                        name,
                        concurrency,
                        workers,
                        batch_size,
                        lease_ttl_ms: lease.map(|(n, (_, f))| n * f),
                        retry: retry.map(normalise_expr),
                        dlq,
                        ack,
                        ordered,
                    };
                    let lease = lease.map(|(n, (unit, _))| (n, unit));
                    (settings, lease, bare)
                },
            )
    }

    /// Valid settings, their queues, and their options in a random order.
    fn shuffled() -> impl Strategy<Value = (Settings, Vec<String>, Vec<String>)> {
        valid().prop_flat_map(|(settings, lease, bare)| {
            let (queues, opts) = render(&settings, lease, bare);
            (Just(settings), Just(queues), Just(opts).prop_shuffle())
        })
    }

    /// Tokens a careless or hostile user might put in an attribute.
    const SOUP: &[&str] = &[
        "\"orders\"",
        "\"\"",
        "\"a\\nb\"",
        "\"30s\"",
        "\"0s\"",
        "\"manual\"",
        ",",
        ",",
        "=",
        "=",
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
        "queue",
        "concurency",
        "0",
        "1",
        "10usize",
        "5u8",
        "-1",
        "1.5",
        "99999999999999999999999",
        "true",
        "false",
        "foo",
        "::",
        "outbox::NoRetry",
        "(1)",
        "[2, 3]",
        "{}",
        "'c'",
        "#",
        ";",
        "r#type",
        "b\"x\"",
        "|x| x",
        "..",
        "&",
        "'a",
    ];

    proptest! {
        #[test]
        fn option_order_does_not_change_the_settings((settings, queues, opts) in shuffled()) {
            let text = queues.iter().chain(&opts).cloned().collect::<Vec<_>>().join(", ");
            let args = parse_text(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
            prop_assert_eq!(settings_of(&args), settings);
        }

        #[test]
        fn a_trailing_comma_changes_nothing((settings, queues, opts) in shuffled()) {
            let text = queues.iter().chain(&opts).cloned().collect::<Vec<_>>().join(", ") + ",";
            let args = parse_text(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
            prop_assert_eq!(settings_of(&args), settings);
        }

        #[test]
        fn an_option_given_twice_is_an_error(
            (_, queues, opts) in shuffled(),
            pick in any::<prop::sample::Index>(),
        ) {
            prop_assume!(!opts.is_empty());
            let again = opts[pick.index(opts.len())].clone();
            let text = queues.iter().chain(&opts).chain([&again]).cloned().collect::<Vec<_>>().join(", ");
            let err = parse_text(&text).err().ok_or_else(|| TestCaseError::fail(format!("accepted: {text}")))?;
            prop_assert!(err.to_string().contains("duplicate option"), "{}: {}", text, err);
        }

        #[test]
        fn options_before_a_queue_are_an_error((_, queues, opts) in shuffled()) {
            prop_assume!(!opts.is_empty());
            let text = opts.iter().chain(&queues).cloned().collect::<Vec<_>>().join(", ");
            prop_assert!(parse_text(&text).is_err(), "accepted: {}", text);
        }

        #[test]
        fn durations_round_trip(
            n in 1u64..=1_000_000_000,
            (unit, factor) in prop::sample::select(UNITS.to_vec()),
            before in " {0,2}",
            between in " {0,2}",
            after in " {0,2}",
        ) {
            let ms = n * factor;
            prop_assert_eq!(parse_duration_ms(&format!("{before}{n}{between}{unit}{after}")), Ok(ms));
            prop_assert_eq!(parse_duration_ms(&format!("{ms}ms")), Ok(ms));
            if ms % factor == 0 {
                prop_assert_eq!(parse_duration_ms(&format!("{}{unit}", ms / factor)), Ok(ms));
            }
        }

        #[test]
        fn durations_too_long_or_zero_are_errors(
            (unit, factor) in prop::sample::select(UNITS.to_vec()),
            over in 1u64..=1_000,
        ) {
            // Fits in a u64, but not once multiplied by the unit (every unit but ms).
            if let Some(n) = (u64::MAX / factor).checked_add(over).filter(|_| factor > 1) {
                let err = parse_duration_ms(&format!("{n}{unit}")).unwrap_err();
                prop_assert!(err.contains("too long"), "{}", err);
            }
            let zero = parse_duration_ms(&format!("0{unit}")).unwrap_err();
            prop_assert!(zero.contains("zero"), "{}", zero);
        }

        #[test]
        fn only_the_documented_duration_grammar_is_accepted(text in "\\PC{0,12}|[0-9 ]{0,6}(ms|s|m|h|sec|us|M)? ?") {
            let grammar = regex_like_duration(&text);
            match parse_duration_ms(&text) {
                Ok(ms) => {
                    prop_assert!(ms > 0);
                    prop_assert!(grammar, "{:?} accepted", text);
                }
                Err(msg) => prop_assert!(!msg.is_empty()),
            }
        }

        #[test]
        fn topics_follow_kafkas_rule(topic in "[A-Za-z0-9._-]{0,3}|[A-Za-z0-9._-]{245,252}|\\PC{0,10}") {
            let legal = (1..=249).contains(&topic.chars().count())
                && topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                && topic != "."
                && topic != "..";
            prop_assert_eq!(check_topic(&topic).is_ok(), legal, "{:?}", topic);
        }

        #[test]
        fn random_text_never_panics(text in "\\PC{0,60}") {
            if let Ok(tokens) = TokenStream::from_str(&text) {
                check_garbage(&text, tokens)?;
            }
        }

        #[test]
        fn random_tokens_never_panic(words in prop::collection::vec(prop::sample::select(SOUP.to_vec()), 0..12)) {
            let text = words.join(" ");
            let tokens = TokenStream::from_str(&text).expect("the soup tokenizes");
            check_garbage(&text, tokens)?;
        }
    }

    fn starts_with_str_literal(text: &str) -> bool {
        let t = text.trim_start();
        t.starts_with('"') || t.starts_with("r\"") || t.starts_with("r#")
    }

    /// A whole number, optional spaces, and a unit: what the docs promise.
    fn regex_like_duration(text: &str) -> bool {
        let t = text.trim();
        let digits = t.chars().take_while(char::is_ascii_digit).count();
        digits > 0 && matches!(t[digits..].trim_start(), "ms" | "s" | "m" | "h")
    }

    /// Whatever `tokens` hold, parsing returns (no panic); what it accepts is
    /// well-formed, and what it rejects comes with a message.
    fn check_garbage(text: &str, tokens: TokenStream) -> Result<(), TestCaseError> {
        match SubscriberArgs::parse(tokens.clone(), Span::call_site()) {
            Ok(args) => {
                prop_assert!(!args.queues.is_empty(), "no queue: {}", text);
                prop_assert!(
                    starts_with_str_literal(text),
                    "accepted without a leading queue: {}",
                    text
                );
                for q in &args.queues {
                    prop_assert!(check_queue(&q.value()).is_ok());
                }
                let mut names: Vec<String> = args.queues.iter().map(LitStr::value).collect();
                names.sort();
                names.dedup();
                prop_assert_eq!(names.len(), args.queues.len(), "a queue twice: {}", text);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        match PublisherArgs::parse(Broker::Kafka, tokens, Span::call_site()) {
            Ok(p) => prop_assert!(check_topic(&p.topic.value()).is_ok(), "{}", text),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        Ok(())
    }
}
