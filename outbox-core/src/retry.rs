//! Retry strategies: how long to wait before the next attempt, and when to stop.
//!
//! The default, [`ExponentialRetry::default()`], waits 1 s, 2 s, 4 s, ... up to
//! 300 s between attempts, with ±20 % jitter, and gives up after 10 attempts.
//!
//! ```
//! use outbox::{ExponentialRetry, RetryStrategy};
//! use std::time::Duration;
//! let r = ExponentialRetry::default().jitter(0.0);
//! let err = outbox::HandlerError::transient("down");
//! assert_eq!(r.next_delay(&outbox::Failure::new(1, Duration::ZERO, &err)), Some(Duration::from_secs(1)));
//! assert_eq!(r.next_delay(&outbox::Failure::new(3, Duration::ZERO, &err)), Some(Duration::from_secs(4)));
//! assert_eq!(r.next_delay(&outbox::Failure::new(10, Duration::ZERO, &err)), None);
//! ```

use crate::{ConfigErrors, HandlerError};
use rand::Rng;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Longest delay or cap any strategy accepts.
pub const MAX_RETRY_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most attempts any strategy accepts.
pub const MAX_ATTEMPTS: u32 = 1_000_000;

/// One failed attempt, as a strategy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// Which attempt failed, starting at 1.
    pub attempt: u32,
    /// Time since the first attempt started (database clock).
    pub elapsed: Duration,
    /// What the handler (or the publish) returned.
    pub error: &'a HandlerError,
}

impl<'a> Failure<'a> {
    /// A failure of attempt `attempt` (1-based).
    pub fn new(attempt: u32, elapsed: Duration, error: &'a HandlerError) -> Self {
        Self {
            attempt,
            elapsed,
            error,
        }
    }
}

/// Decides whether and when a failed message is tried again.
///
/// Implement it for a schedule of your own:
///
/// ```
/// use outbox::{Failure, RetryStrategy};
/// use std::time::Duration;
/// #[derive(Debug)]
/// struct ThreeQuickTries;
/// impl RetryStrategy for ThreeQuickTries {
///     fn next_delay(&self, f: &Failure<'_>) -> Option<Duration> {
///         (f.attempt < 3).then(|| Duration::from_millis(100))
///     }
/// }
/// ```
pub trait RetryStrategy: Send + Sync + fmt::Debug + 'static {
    /// The delay before the next attempt, or `None` to give up (the message is
    /// dead-lettered, or parked when there is no dead-letter table).
    fn next_delay(&self, failure: &Failure<'_>) -> Option<Duration>;

    /// Checks the settings; called when the app is built.
    fn validate(&self) -> Result<(), ConfigErrors> {
        Ok(())
    }

    /// The most attempts this strategy allows, first one included, when it
    /// knows (logs then read `retry 2/10`); `None` (the default) when it
    /// decides otherwise. The built-in strategies have a builder method of the
    /// same name, so call this one as `RetryStrategy::max_attempts(&strategy)`.
    ///
    /// ```
    /// use outbox::{ExponentialRetry, NoRetry, RetryStrategy};
    /// assert_eq!(RetryStrategy::max_attempts(&ExponentialRetry::default()), Some(10));
    /// assert_eq!(RetryStrategy::max_attempts(&NoRetry), Some(1));
    /// ```
    fn max_attempts(&self) -> Option<u32> {
        None
    }
}

impl<R: RetryStrategy + ?Sized> RetryStrategy for Arc<R> {
    fn next_delay(&self, failure: &Failure<'_>) -> Option<Duration> {
        (**self).next_delay(failure)
    }
    fn validate(&self) -> Result<(), ConfigErrors> {
        (**self).validate()
    }
    fn max_attempts(&self) -> Option<u32> {
        (**self).max_attempts()
    }
}

impl<R: RetryStrategy + ?Sized> RetryStrategy for Box<R> {
    fn next_delay(&self, failure: &Failure<'_>) -> Option<Duration> {
        (**self).next_delay(failure)
    }
    fn validate(&self) -> Result<(), ConfigErrors> {
        (**self).validate()
    }
    fn max_attempts(&self) -> Option<u32> {
        (**self).max_attempts()
    }
}

type RetryIf = Arc<dyn Fn(&HandlerError) -> bool + Send + Sync>;

/// Settings every built-in strategy shares.
#[derive(Clone)]
struct Limits {
    max_attempts: u32,
    max_total_delay: Option<Duration>,
    jitter: f64,
    retry_if: Option<RetryIf>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            max_total_delay: None,
            jitter: 0.2,
            retry_if: None,
        }
    }
}

impl fmt::Debug for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limits")
            .field("max_attempts", &self.max_attempts)
            .field("max_total_delay", &self.max_total_delay)
            .field("jitter", &self.jitter)
            .field("retry_if", &self.retry_if.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

impl Limits {
    /// Applies the shared rules around a base delay.
    fn decide(&self, f: &Failure<'_>, base: Duration) -> Option<Duration> {
        if f.attempt >= self.max_attempts {
            return None;
        }
        if let Some(pred) = &self.retry_if {
            if !pred(f.error) {
                return None;
            }
        }
        let delay = jittered(base, self.jitter);
        if let Some(cap) = self.max_total_delay {
            if f.elapsed.saturating_add(delay) > cap {
                return None;
            }
        }
        Some(delay)
    }

    fn validate(&self, errors: &mut ConfigErrors) {
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS {
            errors.push(format!(
                "max_attempts is {}, accepted: 1 to {MAX_ATTEMPTS}",
                self.max_attempts
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            errors.push(format!(
                "jitter is {}, accepted: a fraction from 0.0 to 1.0",
                self.jitter
            ));
        }
        if let Some(cap) = self.max_total_delay {
            check_duration(errors, "max_total_delay", cap);
        }
    }
}

fn check_duration(errors: &mut ConfigErrors, name: &str, d: Duration) {
    if d.is_zero() {
        errors.push(format!(
            "{name} is zero, accepted: more than 0 and at most 365 days"
        ));
    } else if d > MAX_RETRY_DURATION {
        errors.push(format!(
            "{name} is {d:?}, accepted: more than 0 and at most 365 days"
        ));
    }
}

/// `base` scaled by a uniform factor in `[1 - jitter, 1 + jitter]`.
fn jittered(base: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 || base.is_zero() {
        return base;
    }
    let factor = rand::thread_rng().gen_range((1.0 - jitter)..=(1.0 + jitter));
    base.mul_f64(factor.max(0.0))
}

macro_rules! limit_setters {
    () => {
        /// Gives up after this many attempts in all (the first one included).
        pub fn max_attempts(mut self, n: u32) -> Self {
            self.limits.max_attempts = n;
            self
        }

        /// Gives up when the next attempt would start later than this after the first.
        pub fn max_total_delay(mut self, cap: Duration) -> Self {
            self.limits.max_total_delay = Some(cap);
            self
        }

        /// Spreads each delay uniformly over `delay * (1 ± jitter)`; 0 turns it off.
        pub fn jitter(mut self, jitter: f64) -> Self {
            self.limits.jitter = jitter;
            self
        }

        /// Retries only errors for which `pred` is true; others fail for good at once.
        pub fn retry_if(
            mut self,
            pred: impl Fn(&HandlerError) -> bool + Send + Sync + 'static,
        ) -> Self {
            self.limits.retry_if = Some(Arc::new(pred));
            self
        }
    };
}

/// Delays that grow by a factor: `initial * multiplier^(attempt - 1)`, capped at `max_delay`.
///
/// Default: 1 s initial, x2, at most 300 s, 10 attempts, jitter 0.2.
#[derive(Debug, Clone)]
pub struct ExponentialRetry {
    initial: Duration,
    multiplier: f64,
    max_delay: Duration,
    limits: Limits,
}

impl Default for ExponentialRetry {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(300),
            limits: Limits::default(),
        }
    }
}

impl ExponentialRetry {
    /// The default schedule; see the type's docs.
    pub fn new() -> Self {
        Self::default()
    }
    /// The first delay.
    pub fn initial(mut self, d: Duration) -> Self {
        self.initial = d;
        self
    }
    /// The growth factor between two delays (at least 1).
    pub fn multiplier(mut self, m: f64) -> Self {
        self.multiplier = m;
        self
    }
    /// The longest single delay (before jitter).
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }
    limit_setters!();

    /// The delay after failed attempt `attempt` before jitter and caps.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(1024) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        if !secs.is_finite() || secs >= self.max_delay.as_secs_f64() {
            self.max_delay
        } else {
            Duration::from_secs_f64(secs)
        }
    }
}

impl RetryStrategy for ExponentialRetry {
    fn next_delay(&self, f: &Failure<'_>) -> Option<Duration> {
        self.limits.decide(f, self.base_delay(f.attempt))
    }

    fn validate(&self) -> Result<(), ConfigErrors> {
        let mut e = ConfigErrors::new();
        check_duration(&mut e, "initial", self.initial);
        check_duration(&mut e, "max_delay", self.max_delay);
        if !(self.multiplier.is_finite() && (1.0..=1000.0).contains(&self.multiplier)) {
            e.push(format!(
                "multiplier is {}, accepted: from 1.0 to 1000.0",
                self.multiplier
            ));
        }
        if self.max_delay < self.initial {
            e.push(format!(
                "max_delay ({:?}) is shorter than initial ({:?}), accepted: max_delay >= initial",
                self.max_delay, self.initial
            ));
        }
        self.limits.validate(&mut e);
        e.into_result()
    }

    fn max_attempts(&self) -> Option<u32> {
        Some(self.limits.max_attempts)
    }
}

/// Delays that grow by a fixed step: `initial + step * (attempt - 1)`, capped at `max_delay`.
///
/// Default: 1 s initial, +1 s, at most 60 s, 10 attempts, jitter 0.2.
#[derive(Debug, Clone)]
pub struct LinearRetry {
    initial: Duration,
    step: Duration,
    max_delay: Duration,
    limits: Limits,
}

impl Default for LinearRetry {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            step: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            limits: Limits::default(),
        }
    }
}

impl LinearRetry {
    /// The default schedule; see the type's docs.
    pub fn new() -> Self {
        Self::default()
    }
    /// The first delay.
    pub fn initial(mut self, d: Duration) -> Self {
        self.initial = d;
        self
    }
    /// What each further attempt adds.
    pub fn step(mut self, d: Duration) -> Self {
        self.step = d;
        self
    }
    /// The longest single delay (before jitter).
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }
    limit_setters!();

    /// The delay after failed attempt `attempt` before jitter and caps.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        self.step
            .saturating_mul(attempt.saturating_sub(1))
            .saturating_add(self.initial)
            .min(self.max_delay)
    }
}

impl RetryStrategy for LinearRetry {
    fn next_delay(&self, f: &Failure<'_>) -> Option<Duration> {
        self.limits.decide(f, self.base_delay(f.attempt))
    }

    fn validate(&self) -> Result<(), ConfigErrors> {
        let mut e = ConfigErrors::new();
        check_duration(&mut e, "initial", self.initial);
        check_duration(&mut e, "max_delay", self.max_delay);
        if self.step > MAX_RETRY_DURATION {
            e.push(format!(
                "step is {:?}, accepted: at most 365 days",
                self.step
            ));
        }
        if self.max_delay < self.initial {
            e.push(format!(
                "max_delay ({:?}) is shorter than initial ({:?}), accepted: max_delay >= initial",
                self.max_delay, self.initial
            ));
        }
        self.limits.validate(&mut e);
        e.into_result()
    }

    fn max_attempts(&self) -> Option<u32> {
        Some(self.limits.max_attempts)
    }
}

/// The same delay before every attempt. Default: 1 s, 10 attempts, jitter 0.2.
#[derive(Debug, Clone)]
pub struct ConstantRetry {
    delay: Duration,
    limits: Limits,
}

impl Default for ConstantRetry {
    fn default() -> Self {
        Self {
            delay: Duration::from_secs(1),
            limits: Limits::default(),
        }
    }
}

impl ConstantRetry {
    /// A constant delay with the default limits.
    pub fn new(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }
    /// The delay.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    limit_setters!();
}

impl RetryStrategy for ConstantRetry {
    fn next_delay(&self, f: &Failure<'_>) -> Option<Duration> {
        self.limits.decide(f, self.delay)
    }

    fn validate(&self) -> Result<(), ConfigErrors> {
        let mut e = ConfigErrors::new();
        check_duration(&mut e, "delay", self.delay);
        self.limits.validate(&mut e);
        e.into_result()
    }

    fn max_attempts(&self) -> Option<u32> {
        Some(self.limits.max_attempts)
    }
}

/// Never retries: the first failure is terminal.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRetry;

impl RetryStrategy for NoRetry {
    fn next_delay(&self, _: &Failure<'_>) -> Option<Duration> {
        None
    }

    fn max_attempts(&self) -> Option<u32> {
        Some(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err() -> HandlerError {
        HandlerError::transient("boom")
    }

    #[test]
    fn default_schedule_is_exponential_from_one_second() {
        let r = ExponentialRetry::default().jitter(0.0);
        let e = err();
        let delays: Vec<_> = (1..=10)
            .map(|a| r.next_delay(&Failure::new(a, Duration::ZERO, &e)))
            .collect();
        let secs: Vec<_> = delays.iter().flatten().map(|d| d.as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 32, 64, 128, 256]);
        assert_eq!(delays[9], None, "the 10th failure is terminal");
    }

    #[test]
    fn invalid_settings_name_the_setting() {
        let e = ExponentialRetry::default()
            .multiplier(0.5)
            .jitter(2.0)
            .max_attempts(0)
            .initial(Duration::ZERO)
            .validate()
            .unwrap_err()
            .to_string();
        for s in ["multiplier", "jitter", "max_attempts", "initial"] {
            assert!(e.contains(s), "{s} missing in {e}");
        }
        assert!(ExponentialRetry::default().validate().is_ok());
        assert!(LinearRetry::default()
            .max_delay(Duration::from_millis(1))
            .validate()
            .is_err());
        assert!(ConstantRetry::new(Duration::from_secs(400 * 24 * 3600))
            .validate()
            .unwrap_err()
            .to_string()
            .contains("delay"));
    }

    #[test]
    fn retry_if_stops_non_matching_errors() {
        let r = ConstantRetry::default().retry_if(|e| e.message().contains("timeout"));
        let t = HandlerError::transient("timeout talking to x");
        let o = HandlerError::transient("bad data");
        assert!(r.next_delay(&Failure::new(1, Duration::ZERO, &t)).is_some());
        assert!(r.next_delay(&Failure::new(1, Duration::ZERO, &o)).is_none());
    }

    #[test]
    fn no_retry_never_retries() {
        assert_eq!(
            NoRetry.next_delay(&Failure::new(1, Duration::ZERO, &err())),
            None
        );
    }

    proptest! {
        #[test]
        fn exponential_respects_caps_and_jitter_bounds(
            attempt in 1u32..50,
            initial_ms in 1u64..10_000,
            mult in 1.0f64..10.0,
            max_s in 10u64..1000,
            jitter in 0.0f64..1.0,
            max_attempts in 1u32..60,
            elapsed_s in 0u64..2000,
            cap_s in 1u64..3000,
        ) {
            let r = ExponentialRetry::default()
                .initial(Duration::from_millis(initial_ms))
                .multiplier(mult)
                .max_delay(Duration::from_secs(max_s))
                .jitter(jitter)
                .max_attempts(max_attempts)
                .max_total_delay(Duration::from_secs(cap_s));
            prop_assert!(r.validate().is_ok());
            let e = err();
            let elapsed = Duration::from_secs(elapsed_s);
            let base = r.base_delay(attempt);
            prop_assert!(base <= Duration::from_secs(max_s));
            match r.next_delay(&Failure::new(attempt, elapsed, &e)) {
                None => {}
                Some(d) => {
                    prop_assert!(attempt < max_attempts, "retried past max_attempts");
                    prop_assert!(elapsed + d <= Duration::from_secs(cap_s), "total delay cap broken");
                    prop_assert!(d.as_secs_f64() >= base.as_secs_f64() * (1.0 - jitter) - 1e-6);
                    prop_assert!(d.as_secs_f64() <= base.as_secs_f64() * (1.0 + jitter) + 1e-6);
                }
            }
        }

        #[test]
        fn base_delays_are_monotone(attempt in 1u32..100, mult in 1.0f64..5.0, step_ms in 0u64..5000) {
            let ex = ExponentialRetry::default().multiplier(mult);
            prop_assert!(ex.base_delay(attempt) <= ex.base_delay(attempt + 1));
            let lin = LinearRetry::default().step(Duration::from_millis(step_ms));
            prop_assert!(lin.base_delay(attempt) <= lin.base_delay(attempt + 1));
        }

        #[test]
        fn constant_stays_inside_jitter(attempt in 1u32..9, jitter in 0.0f64..1.0, ms in 1u64..100_000) {
            let r = ConstantRetry::new(Duration::from_millis(ms)).jitter(jitter);
            let e = err();
            let d = r.next_delay(&Failure::new(attempt, Duration::ZERO, &e)).unwrap();
            let base = ms as f64 / 1000.0;
            prop_assert!(d.as_secs_f64() >= base * (1.0 - jitter) - 1e-6);
            prop_assert!(d.as_secs_f64() <= base * (1.0 + jitter) + 1e-6);
        }
    }
}
