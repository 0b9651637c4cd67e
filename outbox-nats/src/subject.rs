//! NATS subjects and JetStream streams.

use crate::broker::Broker;
use crate::error::Error;
use async_nats::jetstream::stream::Config;
use std::time::Duration;

/// Checks the subject of a publish as NATS does: tokens separated by `.`,
/// none of them empty, no whitespace or control characters, and no wildcards
/// (`*`, `>`), which only subscriptions may use. `#[nats::publisher]` checks
/// the same at compile time.
///
/// ```
/// use outbox_nats::check_subject;
/// assert!(check_subject("orders.created").is_ok());
/// assert!(check_subject("orders..created").is_err());
/// assert!(check_subject("orders.*").is_err());
/// ```
pub fn check_subject(subject: &str) -> Result<(), String> {
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

/// Creates the JetStream stream `name` storing `subjects` (file storage, the
/// server's limits, a duplicate window of `duplicate_window`; JetStream's
/// default is 2 minutes) unless a stream of that name exists, which is left as
/// it is. For examples, tests and start-up code: the broker never creates
/// streams by itself.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// let broker = outbox_nats::Broker::from_env()?;
/// outbox_nats::ensure_stream(&broker, "ORDERS", &["orders.>"], Duration::from_secs(120)).await?;
/// # Ok(()) }
/// ```
pub async fn ensure_stream(
    broker: &Broker,
    name: &str,
    subjects: &[&str],
    duplicate_window: Duration,
) -> Result<(), Error> {
    let context = broker.context().await?;
    let config = Config {
        name: name.to_owned(),
        subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        duplicate_window,
        ..Config::default()
    };
    context
        .get_or_create_stream(config)
        .await
        .map(|_| ())
        .map_err(|e| {
            Error::Stream(format!(
                "creating stream {name:?} for {subjects:?} failed: {e}"
            ))
        })
}
