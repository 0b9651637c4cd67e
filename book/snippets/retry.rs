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

#[test]
fn default_schedule_in_full() {
    // Attempts 1 to 9 are followed by 1 s, 2 s, 4 s, ... 256 s; the 300 s cap
    // is not reached within the default 10 attempts.
    let r = ExponentialRetry::default().jitter(0.0);
    let err = HandlerError::transient("down");
    let secs: Vec<u64> = (1..=10)
        .filter_map(|a| r.next_delay(&Failure::new(a, Duration::ZERO, &err)))
        .map(|d| d.as_secs())
        .collect();
    assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256]);
    assert_eq!(RetryStrategy::max_attempts(&r), Some(10));
    // With more attempts, the cap holds every later delay at 300 s.
    let longer = ExponentialRetry::default().jitter(0.0).max_attempts(20);
    assert_eq!(r.base_delay(10), Duration::from_secs(300));
    assert_eq!(
        longer.next_delay(&Failure::new(15, Duration::ZERO, &err)),
        Some(Duration::from_secs(300))
    );
}

#[test]
fn jitter_stays_within_twenty_percent() {
    let r = ExponentialRetry::default();
    let err = HandlerError::transient("down");
    for attempt in 1..=9u32 {
        let base = Duration::from_secs(1 << (attempt - 1));
        for _ in 0..200 {
            let d = r
                .next_delay(&Failure::new(attempt, Duration::ZERO, &err))
                .unwrap();
            assert!(d >= base.mul_f64(0.8) && d <= base.mul_f64(1.2), "{d:?} for {base:?}");
        }
    }
}

#[test]
fn limits_and_retry_if() {
    let err = HandlerError::transient("connection timed out");
    let other = HandlerError::transient("bad data");
    // max_total_delay: counted from the first delivery, delay included.
    let capped = ConstantRetry::new(Duration::from_secs(60))
        .jitter(0.0)
        .max_total_delay(Duration::from_secs(600));
    assert!(capped
        .next_delay(&Failure::new(2, Duration::from_secs(540), &err))
        .is_some());
    assert!(capped
        .next_delay(&Failure::new(2, Duration::from_secs(541), &err))
        .is_none());
    // retry_if: an error the predicate refuses is final at once.
    let r = retry_if();
    assert!(r.next_delay(&Failure::new(1, Duration::ZERO, &err)).is_some());
    assert!(r.next_delay(&Failure::new(1, Duration::ZERO, &other)).is_none());
    // Defaults of the other strategies.
    let lin = LinearRetry::default();
    assert_eq!(lin.base_delay(1), Duration::from_secs(1));
    assert_eq!(lin.base_delay(5), Duration::from_secs(5));
    assert_eq!(lin.base_delay(100), Duration::from_secs(60));
    assert_eq!(RetryStrategy::max_attempts(&NoRetry), Some(1));
    // Invalid settings name themselves.
    let e = ExponentialRetry::default().multiplier(0.5).validate().unwrap_err();
    assert!(e.to_string().contains("multiplier is 0.5, accepted: from 1.0 to 1000.0"));
}
