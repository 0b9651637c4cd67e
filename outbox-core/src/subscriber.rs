//! Subscriber settings: which queues, how many at once, how to retry.

use crate::{validate_queue, ConfigErrors, ExponentialRetry, Handler, RetryStrategy, TableName};
use std::sync::Arc;
use std::time::Duration;

/// What happens to a row when its handler fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckPolicy {
    /// Transient errors are retried by the strategy (the default).
    #[default]
    NackOnError,
    /// Every error is final: the row goes to the dead letters (or is parked).
    RejectOnError,
    /// The handler decides with an [`crate::Ack`] argument.
    Manual,
}

/// Which rows a subscriber claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queues {
    /// Rows of these queues.
    Named(Vec<String>),
    /// Every row of the table (the stand-alone relay).
    All,
}

/// A publisher stacked on a subscriber: sink name and topic (for validation and the start-up log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherSpec {
    /// Sink name (`"kafka"`).
    pub sink: String,
    /// Topic.
    pub topic: String,
}

/// Default rows per claim.
pub const DEFAULT_BATCH_SIZE: usize = 100;
/// Default handlers in flight per worker.
pub const DEFAULT_CONCURRENCY: usize = 100;
/// Default lease time-to-live.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// Default of [`Subscriber::max_batch_bytes`]: 64 MiB.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;
/// Default of [`Subscriber::max_deliveries`].
pub const DEFAULT_MAX_DELIVERIES: u32 = 5;

/// One subscriber: a handler and its settings.
///
/// ```
/// use outbox::{Subscriber, Output, ConstantRetry};
/// use std::time::Duration;
/// let sub = Subscriber::new("audit", |env: std::sync::Arc<outbox::Envelope>, _ctx| async move {
///     println!("{} bytes", env.payload.len());
///     Ok(Output::none())
/// })
/// .queue("audit")
/// .batch_size(200)
/// .retry(ConstantRetry::new(Duration::from_secs(5)));
/// assert_eq!(sub.name(), "audit");
/// ```
#[derive(Clone)]
pub struct Subscriber {
    pub(crate) name: String,
    pub(crate) queues: Queues,
    pub(crate) handler: Arc<dyn Handler>,
    pub(crate) concurrency: usize,
    pub(crate) workers: usize,
    pub(crate) batch_size: usize,
    pub(crate) max_batch_bytes: usize,
    pub(crate) lease_ttl: Duration,
    pub(crate) max_deliveries: u32,
    pub(crate) retry: Arc<dyn RetryStrategy>,
    pub(crate) dlq: Option<String>,
    pub(crate) dlq_default: bool,
    pub(crate) ack: AckPolicy,
    pub(crate) ordered: bool,
    pub(crate) poll_min: Duration,
    pub(crate) poll_max: Duration,
    pub(crate) publishers: Vec<PublisherSpec>,
    pub(crate) source: Option<(&'static str, u32)>,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("name", &self.name)
            .field("queues", &self.queues)
            .field("concurrency", &self.concurrency)
            .field("workers", &self.workers)
            .field("batch_size", &self.batch_size)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("lease_ttl", &self.lease_ttl)
            .field("max_deliveries", &self.max_deliveries)
            .field("retry", &self.retry)
            .field("dlq", &self.dlq)
            .field("ack", &self.ack)
            .field("ordered", &self.ordered)
            .field("publishers", &self.publishers)
            .finish()
    }
}

impl Subscriber {
    /// A subscriber named `name` (the handler's name in logs) with default
    /// settings: 100 rows per claim, 100 handlers in flight, one worker, 30 s
    /// lease, exponential retry, the app's default dead-letter table.
    pub fn new(name: impl Into<String>, handler: impl Handler) -> Self {
        Self {
            name: name.into(),
            queues: Queues::Named(Vec::new()),
            handler: Arc::new(handler),
            concurrency: DEFAULT_CONCURRENCY,
            workers: 1,
            batch_size: DEFAULT_BATCH_SIZE,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            lease_ttl: DEFAULT_LEASE_TTL,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            retry: Arc::new(ExponentialRetry::default()),
            dlq: None,
            dlq_default: true,
            ack: AckPolicy::default(),
            ordered: false,
            poll_min: Duration::from_millis(50),
            poll_max: Duration::from_secs(1),
            publishers: Vec::new(),
            source: None,
        }
    }

    /// The subscriber's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a queue to claim from.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        match &mut self.queues {
            Queues::Named(q) => q.push(queue.into()),
            Queues::All => self.queues = Queues::Named(vec![queue.into()]),
        }
        self
    }

    /// Claims every row of the table, whatever its queue.
    pub fn all_queues(mut self) -> Self {
        self.queues = Queues::All;
        self
    }

    /// The queues claimed.
    pub fn queues(&self) -> &Queues {
        &self.queues
    }

    /// Handlers in flight at once per worker (1 to 10,000).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Claim loops of this subscriber in this process (1 to 64).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Rows per claim (1 to 10,000).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// Bytes of payload and headers per claim (1 KiB to 1 GiB; default 64
    /// MiB): a claim stops at the row that reaches it, and takes at least one
    /// row whatever its size. A worker holds up to two batches in memory (one
    /// handled, one claimed ahead), each copied to its broker.
    ///
    /// ```
    /// let sub = outbox::Subscriber::new("blobs", |_env, _ctx| async { Ok(outbox::Output::none()) })
    ///     .queue("blobs")
    ///     .max_batch_bytes(16 * 1024 * 1024);
    /// assert!(sub.validate().is_ok());
    /// ```
    pub fn max_batch_bytes(mut self, n: usize) -> Self {
        self.max_batch_bytes = n;
        self
    }

    /// How long a claim holds a row before another worker may take it over
    /// (1 s to 24 h). While a batch is handled and published, its lease is
    /// renewed every third of this, so a slow send never loses it. A handler
    /// running longer than this, less a tenth kept for publishing and
    /// settling, counted from its own start, is abandoned and the row retried.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How many more times a row may be delivered than it was settled before
    /// it is dead-lettered as `crashed` without running its handler again (1
    /// to 1,000; default 5). A delivery that is never settled is one whose
    /// process crashed, was killed or hung (a payload that aborts the process,
    /// exhausts its memory, overflows its stack or blocks its thread). A row
    /// delivered before and never settled is handled alone, one such row at a
    /// time in this process, so that a crash it causes does not count against
    /// healthy rows. Rows given back (shutdown) are not counted.
    ///
    /// ```
    /// let sub = outbox::Subscriber::new("audit", |_env, _ctx| async { Ok(outbox::Output::none()) })
    ///     .queue("audit")
    ///     .max_deliveries(3);
    /// assert!(sub.validate().is_ok());
    /// ```
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n;
        self
    }

    /// The retry strategy.
    pub fn retry(mut self, strategy: impl RetryStrategy) -> Self {
        self.retry = Arc::new(strategy);
        self
    }

    /// The dead-letter table for rows that failed for good.
    pub fn dlq(mut self, table: impl Into<String>) -> Self {
        self.dlq = Some(table.into());
        self.dlq_default = false;
        self
    }

    /// No dead-letter table: rows that failed for good are parked in the outbox.
    pub fn no_dlq(mut self) -> Self {
        self.dlq = None;
        self.dlq_default = false;
        self
    }

    /// The ack policy.
    pub fn ack_policy(mut self, policy: AckPolicy) -> Self {
        self.ack = policy;
        self
    }

    /// Handles rows of one partition key one at a time, in id order.
    pub fn ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    /// Polling interval bounds when idle (LISTEN/NOTIFY wakes the subscriber
    /// sooner); the interval doubles from `min` to `max` while nothing arrives.
    pub fn poll_interval(mut self, min: Duration, max: Duration) -> Self {
        self.poll_min = min;
        self.poll_max = max;
        self
    }

    /// Declares a stacked publisher (done by `#[kafka::publisher]`).
    pub fn publisher(mut self, sink: impl Into<String>, topic: impl Into<String>) -> Self {
        self.publishers.push(PublisherSpec {
            sink: sink.into(),
            topic: topic.into(),
        });
        self
    }

    /// The declared publishers.
    pub fn publishers(&self) -> &[PublisherSpec] {
        &self.publishers
    }

    /// Where the handler is defined (set by the macro; used in error messages).
    pub fn source(mut self, file: &'static str, line: u32) -> Self {
        self.source = Some((file, line));
        self
    }

    pub(crate) fn label(&self) -> String {
        match self.source {
            Some((file, line)) => format!("subscriber {:?} ({file}:{line})", self.name),
            None => format!("subscriber {:?}", self.name),
        }
    }

    /// Checks every setting; all problems are reported together.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut e = ConfigErrors::new();
        match &self.queues {
            Queues::Named(q) if q.is_empty() => {
                e.push("queues: no queue given (add .queue(\"name\") or use .all_queues())")
            }
            Queues::Named(q) => {
                for name in q {
                    if let Err(err) = validate_queue(name) {
                        e.push(format!("queues: {err}"));
                    }
                }
            }
            Queues::All => {}
        }
        let range = |e: &mut ConfigErrors, name: &str, v: usize, max: usize| {
            if v == 0 || v > max {
                e.push(format!("{name} is {v}, accepted: 1 to {max}"));
            }
        };
        range(&mut e, "concurrency", self.concurrency, 10_000);
        range(&mut e, "workers", self.workers, 64);
        range(&mut e, "batch_size", self.batch_size, 10_000);
        if !(1024..=1024 * 1024 * 1024).contains(&self.max_batch_bytes) {
            e.push(format!(
                "max_batch_bytes is {}, accepted: 1024 (1 KiB) to 1073741824 (1 GiB)",
                self.max_batch_bytes
            ));
        }
        range(
            &mut e,
            "max_deliveries",
            self.max_deliveries as usize,
            1_000,
        );
        if self.lease_ttl < Duration::from_secs(1) || self.lease_ttl > Duration::from_secs(86_400) {
            e.push(format!(
                "lease_ttl is {:?}, accepted: 1 s to 24 h",
                self.lease_ttl
            ));
        }
        if self.poll_min.is_zero()
            || self.poll_min > self.poll_max
            || self.poll_max > Duration::from_secs(3600)
        {
            e.push(format!(
                "poll_interval is {:?}..{:?}, accepted: 0 < min <= max <= 1 h",
                self.poll_min, self.poll_max
            ));
        }
        if let Some(d) = &self.dlq {
            if let Err(err) = TableName::new(d) {
                e.push(format!("dlq: {err}"));
            }
        }
        if let Err(r) = self.retry.validate() {
            e.extend_with("retry", r);
        }
        for p in &self.publishers {
            if p.topic.is_empty() || p.topic.len() > 249 {
                e.push(format!(
                    "publisher topic {:?}: accepted are 1 to 249 characters",
                    p.topic
                ));
            } else if let Some(c) = p
                .topic
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            {
                e.push(format!(
                    "publisher topic {:?}: character {c:?} is not allowed (accepted: ASCII letters, digits, '.', '_', '-')",
                    p.topic
                ));
            }
        }
        e.into_result()
    }
}
