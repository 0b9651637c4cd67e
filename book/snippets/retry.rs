//! Code of the book's chapter "Retry strategies"; scripts/book-test type-checks it.
#![allow(dead_code)]

use outbox::{
    ConstantRetry, ExponentialRetry, Failure, HandlerError, LinearRetry, NoRetry, RetryStrategy,
};
use std::time::Duration;

fn strategies() {
    // ANCHOR: builtin
    // The default: 1 s, 2 s, 4 s, ... at most 300 s apart, 10 attempts, ±20 % jitter.
    let default = ExponentialRetry::default();

    // Tuned: 200 ms, 600 ms, 1.8 s, ... at most 1 min apart, give up after
    // 8 attempts or when the next one would start more than 10 min after the first.
    let tuned = ExponentialRetry::default()
        .initial(Duration::from_millis(200))
        .multiplier(3.0)
        .max_delay(Duration::from_secs(60))
        .max_attempts(8)
        .max_total_delay(Duration::from_secs(600))
        .jitter(0.1);

    // 2 s, 4 s, 6 s, ... at most 30 s apart.
    let linear = LinearRetry::default()
        .initial(Duration::from_secs(2))
        .step(Duration::from_secs(2))
        .max_delay(Duration::from_secs(30));

    // Every 5 s, 20 attempts, no jitter.
    let constant = ConstantRetry::new(Duration::from_secs(5))
        .max_attempts(20)
        .jitter(0.0);

    // The first failure is final.
    let never = NoRetry;
    // ANCHOR_END: builtin
    let _ = (default, tuned, linear, constant, never);
}

fn retry_if() -> ExponentialRetry {
    // ANCHOR: retry_if
    // Retry only errors that look like timeouts; any other error fails for good at once.
    ExponentialRetry::default().retry_if(|e: &HandlerError| e.message().contains("timed out"))
    // ANCHOR_END: retry_if
}

// ANCHOR: custom
/// Retries quickly three times, then every hour, for at most a day.
#[derive(Debug)]
struct QuickThenHourly;

impl RetryStrategy for QuickThenHourly {
    fn next_delay(&self, f: &Failure<'_>) -> Option<Duration> {
        if f.elapsed > Duration::from_secs(24 * 3600) {
            return None; // dead-letter (or park)
        }
        Some(if f.attempt <= 3 {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(3600)
        })
    }
}

#[outbox::subscriber("exports", retry = QuickThenHourly)]
async fn export(batch: Vec<i64>) -> Result<(), HandlerError> {
    let _ = batch;
    Ok(())
}
// ANCHOR_END: custom

#[test]
fn default_schedule() {
    // ANCHOR: schedule
    let r = ExponentialRetry::default().jitter(0.0);
    let err = HandlerError::transient("down");
    let delay = |attempt| r.next_delay(&Failure::new(attempt, Duration::ZERO, &err));
    assert_eq!(delay(1), Some(Duration::from_secs(1)));
    assert_eq!(delay(9), Some(Duration::from_secs(256)));
    assert_eq!(delay(10), None); // the 10th failure is final
    // ANCHOR_END: schedule
}
