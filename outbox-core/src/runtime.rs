//! The subscriber runtime: claim -> handle -> publish -> settle, in batches.

use crate::claim::{Batch, Claimer, Retry, RowPosition, Terminal};
use crate::handler::{Decision, Extensions};
use crate::listen::{sleep_or_stop, Waker};
use crate::logging::human;
use crate::metrics as m;
use crate::{
    AckPolicy, Context, Envelope, Failure, FailureReason, HandlerError, HandlerErrorKind, Outgoing,
    Sink, Subscriber,
};
use futures::{FutureExt, StreamExt};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use uuid::Uuid;

/// Everything one subscriber's workers share.
pub(crate) struct SubRuntime {
    pub(crate) sub: Subscriber,
    pub(crate) claimer: Claimer,
    pub(crate) pool: sqlx::PgPool,
    pub(crate) state: Arc<Extensions>,
    pub(crate) sinks: Arc<HashMap<String, Arc<dyn Sink>>>,
    pub(crate) waker: Waker,
    pub(crate) mark_idle_sql: String,
    pub(crate) mark_busy_sql: String,
    pub(crate) shutdown_timeout: Duration,
}

/// One handler call: row index, result, manual decision, run time.
type Handled = (
    usize,
    // `None`: the handler was not called (the row's lease ran out first).
    Option<Result<crate::Output, HandlerError>>,
    Option<Decision>,
    Duration,
);

/// A claim's start and its result.
type Claimed = (Instant, Result<Batch, crate::Error>);

/// What becomes of one row of a batch.
enum Fate {
    /// Delete the row; with the handler's run time when it returned `Ok`
    /// (logged as "processed" once its publishes succeeded too).
    Ack(Option<Duration>),
    Retry(HandlerError, Option<Duration>),
    Fail(FailureReason, String),
    Release,
}

/// The part of a lease kept for publishing and settling after the handler:
/// a tenth of it, between 50 ms and 5 s.
fn lease_margin(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

impl SubRuntime {
    pub(crate) async fn run_worker(
        self: Arc<Self>,
        worker: usize,
        mut stop: watch::Receiver<bool>,
    ) {
        let listener_id = Uuid::new_v4();
        let mut wake = self.waker.rx.clone();
        let mut delay = self.sub.poll_min;
        let mut idle_since: Option<Instant> = None;
        let mut backoff = Duration::from_millis(100);
        let idle_ttl = self.sub.poll_max * 2 + Duration::from_secs(5);
        tracing::debug!(subscriber = %self.sub.name, worker, "worker started");
        // The next batch, claimed while the current one was being handled.
        let mut prefetched: Option<Claimed> = None;
        loop {
            if *stop.borrow() {
                if let Some((_, Ok(batch))) = prefetched.take() {
                    let ids: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
                    self.give_back(batch.token, &ids).await;
                }
                break;
            }
            wake.borrow_and_update();
            let (claimed_at, claimed) = match prefetched.take() {
                Some(c) => c,
                None => self.claim().await,
            };
            let batch = match claimed {
                Ok(b) => {
                    backoff = Duration::from_millis(100);
                    b
                }
                Err(e) => {
                    tracing::warn!(subscriber = %self.sub.name, error = %e, retry_in = ?backoff, "claim failed");
                    if sleep_or_stop(backoff, &mut stop).await {
                        break;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            if batch.rows.is_empty() {
                let listening = self.waker.connected.load(Ordering::SeqCst);
                let stale = idle_since.is_none_or(|t| t.elapsed() > idle_ttl / 2);
                if listening && stale {
                    // Publishers notify only while a mark is set; claim once more
                    // after setting it so a row committed just before is not missed.
                    // (Also after refreshing a mark: it may have lapsed while the
                    // worker was busy with partial batches, as it is kept across them.)
                    if self.set_idle(listener_id, idle_ttl).await {
                        idle_since = Some(Instant::now());
                        continue;
                    }
                }
                tokio::select! {
                    _ = wake.changed() => { delay = self.sub.poll_min; }
                    _ = tokio::time::sleep(delay) => { delay = (delay * 2).min(self.sub.poll_max); }
                    _ = stop.changed() => {}
                }
                continue;
            }
            delay = self.sub.poll_min;
            // A full batch means a backlog: claim continuously (the next batch
            // while this one is handled, published and settled, so that the
            // database is not idle meanwhile; its lease runs from its own
            // claim), and let publishers stop paying for `pg_notify`. A partial
            // batch means the worker will be idle again within one batch: keep
            // the mark, so the next rows wake it by notification, without two
            // more round trips (unmark now, mark again) per batch on a lightly
            // loaded system.
            let full = batch.rows.len() >= self.sub.batch_size;
            if full && idle_since.take().is_some() {
                self.set_busy(listener_id).await;
            }
            let token = batch.token;
            let ids: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
            m::count_by_queue(
                m::CLAIMED_TOTAL,
                batch.rows.iter().map(|r| r.queue.as_str()),
            );
            let in_flight = metrics::gauge!(m::IN_FLIGHT, "subscriber" => self.sub.name.clone());
            in_flight.increment(ids.len() as f64);
            let work = self.process(token, batch.rows, batch.positions, claimed_at);
            let next = futures::future::maybe_done(async {
                if full {
                    Some(self.claim().await)
                } else {
                    None
                }
            });
            tokio::pin!(work);
            tokio::pin!(next);
            let mut deadline_stop = stop.clone();
            let timeout = self.shutdown_timeout;
            let deadline = async move {
                while !*deadline_stop.borrow() {
                    if deadline_stop.changed().await.is_err() {
                        break;
                    }
                }
                tokio::time::sleep(timeout).await;
            };
            let finished = tokio::select! {
                _ = futures::future::join(work.as_mut(), next.as_mut()) => true,
                _ = deadline => false,
            };
            if !finished {
                tracing::warn!(subscriber = %self.sub.name, rows = ids.len(), "shutdown deadline passed; releasing unfinished rows");
                self.give_back(token, &ids).await;
                // A claim of the next batch may be under way: let it finish
                // (one statement) and give its rows back too.
                next.as_mut().await;
            }
            prefetched = next.as_mut().take_output().flatten();
            in_flight.decrement(ids.len() as f64);
        }
        if idle_since.is_some() {
            self.set_busy(listener_id).await;
        }
        tracing::debug!(subscriber = %self.sub.name, worker, "worker stopped");
    }

    /// Claims a batch; the instant is taken before the claim, so that a lease
    /// measured from it never outlives the database's.
    async fn claim(&self) -> Claimed {
        let at = Instant::now();
        (at, self.claimer.claim().await)
    }

    /// Releases rows that will not be finished (shutdown), without counting
    /// an attempt.
    async fn give_back(&self, token: Uuid, ids: &[i64]) {
        if let Err(e) = self.claimer.release(token, ids).await {
            tracing::warn!(subscriber = %self.sub.name, error = %e, rows = ids.len(), "release failed; the rows come back when their lease expires");
        }
    }

    async fn set_idle(&self, id: Uuid, ttl: Duration) -> bool {
        sqlx::query(&self.mark_idle_sql)
            .bind(id)
            .bind(ttl.as_micros() as i64)
            .execute(&self.pool)
            .await
            .map_err(|e| tracing::debug!(error = %e, "could not mark idle"))
            .is_ok()
    }

    async fn set_busy(&self, id: Uuid) {
        let _ = sqlx::query(&self.mark_busy_sql)
            .bind(id)
            .execute(&self.pool)
            .await;
    }

    fn context(&self) -> Context {
        Context {
            state: self.state.clone(),
            pool: Some(self.pool.clone()),
            decision: Arc::new(Mutex::new(None)),
        }
    }

    /// Handles a batch and settles every row of it.
    async fn process(
        &self,
        token: Uuid,
        rows: Vec<Envelope>,
        positions: Vec<RowPosition>,
        claimed_at: Instant,
    ) {
        let rows: Vec<Arc<Envelope>> = rows.into_iter().map(Arc::new).collect();
        let ttl = self.sub.lease_ttl;
        // The lease runs from the claim, not from the moment a handler starts:
        // a row that waited for a free slot (or in a prefetched batch) has less
        // of it left. Keep a margin for publishing and settling, so that a
        // handler never runs past its row's lease (another instance could take
        // the row over and handle it as well).
        let lease_deadline = claimed_at + ttl - lease_margin(ttl);
        let handler = &self.sub.handler;
        let results: Vec<Handled> =
            futures::stream::iter(rows.iter().cloned().enumerate())
                .map(|(i, env)| {
                    let ctx = self.context();
                    let span = tracing::info_span!("message", queue = %env.queue, id = env.id, attempt = env.attempt, key = env.key.as_deref().unwrap_or(""));
                    async move {
                        let started = Instant::now();
                        let Some(budget) = lease_deadline.checked_duration_since(started) else {
                            // The lease ran out while the row waited for a slot:
                            // give it back untouched instead of racing its next owner.
                            return (i, None, None, Duration::ZERO);
                        };
                        tracing::debug!("{} | received", env.queue);
                        // A handler may panic while building its future, too.
                        let call = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            handler.call(env.clone(), ctx.clone())
                        }));
                        let r = match call {
                            Err(panic) => Err(HandlerError::transient(format!(
                                "handler panicked: {}",
                                panic_message(&panic)
                            ))),
                            Ok(fut) => match tokio::time::timeout(budget, AssertUnwindSafe(fut).catch_unwind()).await {
                                Ok(Ok(r)) => r,
                                Ok(Err(panic)) => Err(HandlerError::transient(format!(
                                    "handler panicked: {}",
                                    panic_message(&panic)
                                ))),
                                Err(_) => Err(HandlerError::transient(format!(
                                    "handler did not finish within the lease ({ttl:?}, less {:?} kept for publishing and settling)",
                                    lease_margin(ttl)
                                ))),
                            },
                        };
                        (i, Some(r), ctx.take_decision(), started.elapsed())
                    }
                    .instrument_with(span)
                })
                .buffer_unordered(self.sub.concurrency)
                .collect()
                .await;
        m::record_handler_times(
            results
                .iter()
                .filter(|(_, r, _, _)| r.is_some())
                .map(|(i, _, _, took)| (rows[*i].queue.as_str(), *took)),
        );

        let mut fates: Vec<Option<Fate>> = (0..rows.len()).map(|_| None).collect();
        let mut outgoing: HashMap<String, Vec<(usize, Outgoing)>> = HashMap::new();
        for (i, result, decision, took) in results {
            let env = &rows[i];
            let Some(result) = result else {
                fates[i] = Some(Fate::Release);
                continue;
            };
            let fate = match (self.sub.ack, decision, result) {
                (AckPolicy::Manual, Some(Decision::Nack(delay, err)), _) => {
                    Fate::Retry(HandlerError::transient(err), delay)
                }
                (AckPolicy::Manual, Some(Decision::Reject(reason)), _) => {
                    Fate::Fail(FailureReason::Rejected, reason)
                }
                // An explicit ack wins over an `Err` returned afterwards.
                (AckPolicy::Manual, Some(Decision::Ack), Err(e)) => {
                    tracing::debug!(queue = %env.queue, id = env.id, "{} | acked by the handler, which then returned: {}", env.queue, e.message());
                    Fate::Ack(None)
                }
                // No decision: retried like a failure, so that the attempt
                // counts and the retry budget bounds it.
                (AckPolicy::Manual, None, Ok(_)) => Fate::Retry(
                    HandlerError::transient(
                        "the handler (ack = manual) returned without calling ack, nack or reject",
                    ),
                    None,
                ),
                (_, _, Ok(output)) => {
                    for mut o in output.publishes {
                        if o.key.is_none() {
                            o.key = env.key.as_ref().map(|k| k.as_bytes().to_vec());
                        }
                        add_headers(&mut o, env);
                        outgoing.entry(o.sink.clone()).or_default().push((i, o));
                    }
                    Fate::Ack(Some(took))
                }
                (policy, _, Err(e)) => match e.kind() {
                    HandlerErrorKind::Permanent(reason) => {
                        Fate::Fail(reason, e.message().to_owned())
                    }
                    HandlerErrorKind::Transient if policy == AckPolicy::RejectOnError => {
                        Fate::Fail(FailureReason::Rejected, e.message().to_owned())
                    }
                    HandlerErrorKind::Transient => Fate::Retry(e, None),
                },
            };
            fates[i] = Some(fate);
        }

        // Every message of the batch in flight at once, per sink.
        let sends = outgoing.into_iter().map(|(name, msgs)| async move {
            let (idx, batch): (Vec<usize>, Vec<Outgoing>) = msgs.into_iter().unzip();
            let results = match self.sinks.get(&name) {
                Some(sink) => {
                    let started = Instant::now();
                    let results = sink.send(batch).await;
                    metrics::histogram!(m::PUBLISH_SECONDS, "sink" => name.clone())
                        .record(started.elapsed().as_secs_f64());
                    results
                }
                None => batch
                    .iter()
                    .map(|_| {
                        Err(crate::SinkError::transient(format!(
                            "no broker named {name:?} is configured"
                        )))
                    })
                    .collect(),
            };
            idx.into_iter().zip(results).collect::<Vec<_>>()
        });
        for (i, result) in futures::future::join_all(sends).await.into_iter().flatten() {
            if let Err(e) = result {
                let downgrade = match &fates[i] {
                    Some(Fate::Ack(_)) | None => true,
                    Some(Fate::Retry(..)) => e.permanent,
                    _ => false,
                };
                if downgrade {
                    fates[i] = Some(if e.permanent {
                        Fate::Fail(FailureReason::PublishRejected, e.message)
                    } else {
                        Fate::Retry(
                            HandlerError::transient(format!("publish failed: {}", e.message)),
                            None,
                        )
                    });
                }
            }
        }

        let mut acks = Vec::new();
        let mut retries = Vec::new();
        let mut terminal = Vec::new();
        let mut release = Vec::new();
        let mut acked_queues = Vec::new();
        let mut retried_queues = Vec::new();
        let mut failed = Vec::new();
        for ((env, fate), position) in rows.iter().zip(fates).zip(positions) {
            match fate.unwrap_or(Fate::Release) {
                Fate::Ack(handled_in) => {
                    if let Some(took) = handled_in {
                        tracing::debug!(queue = %env.queue, id = env.id, "{} | processed in {} ms", env.queue, took.as_millis());
                    }
                    acks.push(position);
                    acked_queues.push(env.queue.as_str());
                }
                Fate::Release => release.push(env.id),
                Fate::Fail(reason, error) => {
                    tracing::error!(queue = %env.queue, id = env.id, attempt = env.attempt, "{} | dead-lettered: {reason}: {error}", env.queue);
                    failed.push((env.queue.as_str(), reason.as_str()));
                    terminal.push(Terminal {
                        id: env.id,
                        reason,
                        error,
                    });
                }
                Fate::Retry(err, forced) => {
                    let attempt = env.failures + 1;
                    // The strategy decides whether the budget allows another
                    // attempt; a delay asked for by `Ack::nack` only replaces its delay.
                    let next = self
                        .sub
                        .retry
                        .next_delay(&Failure::new(attempt, env.elapsed, &err))
                        .map(|delay| forced.unwrap_or(delay));
                    match next {
                        Some(delay) => {
                            let of = match self.sub.retry.max_attempts() {
                                Some(max) => format!("/{max}"),
                                None => String::new(),
                            };
                            tracing::warn!(queue = %env.queue, id = env.id, "{} | retry {attempt}{of} in {}: {}", env.queue, human(delay), err.message());
                            retried_queues.push(env.queue.as_str());
                            retries.push(Retry {
                                id: env.id,
                                delay,
                                error: err.message().to_owned(),
                            });
                        }
                        None => {
                            tracing::error!(queue = %env.queue, id = env.id, attempt, "{} | dead-lettered: {}: {}", env.queue, FailureReason::RetriesExhausted, err.message());
                            failed.push((
                                env.queue.as_str(),
                                FailureReason::RetriesExhausted.as_str(),
                            ));
                            terminal.push(Terminal {
                                id: env.id,
                                reason: FailureReason::RetriesExhausted,
                                error: err.message().to_owned(),
                            });
                        }
                    }
                }
            }
        }
        m::count_by_queue(m::HANDLED_TOTAL, acked_queues);
        m::count_by_queue(m::RETRIED_TOTAL, retried_queues);
        m::count_by_queue_reason(
            m::REJECTED_TOTAL,
            failed
                .iter()
                .copied()
                .filter(|(_, r)| *r != FailureReason::RetriesExhausted.as_str()),
        );
        m::count_by_queue_reason(m::DEAD_LETTERED_TOTAL, failed);
        self.settle("ack", || self.claimer.ack_at(token, &acks), acks.len())
            .await;
        self.settle("nack", || self.claimer.nack(token, &retries), retries.len())
            .await;
        self.settle(
            "dead-letter",
            || self.claimer.fail(token, &terminal),
            terminal.len(),
        )
        .await;
        self.settle(
            "release",
            || self.claimer.release(token, &release),
            release.len(),
        )
        .await;
    }

    /// Runs a settling statement, retrying briefly on database errors; if it
    /// still fails, the rows come back when their lease expires.
    async fn settle<F, Fut>(&self, what: &str, f: F, n: usize)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<u64, crate::Error>>,
    {
        if n == 0 {
            return;
        }
        let mut wait = Duration::from_millis(50);
        for attempt in 1..=4 {
            match f().await {
                Ok(done) => {
                    if (done as usize) < n {
                        tracing::warn!(subscriber = %self.sub.name, what, expected = n, done, "lease lost for some rows (taken over after expiry); left to their new owner");
                    }
                    return;
                }
                Err(e) if attempt < 4 => {
                    tracing::warn!(subscriber = %self.sub.name, what, error = %e, "settling failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 4;
                }
                Err(e) => {
                    tracing::error!(subscriber = %self.sub.name, what, error = %e, rows = n, "settling failed; rows come back when their lease expires");
                }
            }
        }
    }
}

fn add_headers(o: &mut Outgoing, env: &Envelope) {
    for (k, v) in &env.headers {
        o.headers.push((k.clone(), v.as_bytes().to_vec()));
    }
    o.headers
        .push(("outbox-id".into(), env.id.to_string().into_bytes()));
    o.headers
        .push(("outbox-queue".into(), env.queue.as_bytes().to_vec()));
    o.headers.push((
        "outbox-attempt".into(),
        env.attempt.to_string().into_bytes(),
    ));
    if let Some(c) = &env.correlation_id {
        o.headers
            .push(("outbox-correlation-id".into(), c.as_bytes().to_vec()));
    }
    o.headers.push((
        "outbox-created-at".into(),
        env.created_at_ms.to_string().into_bytes(),
    ));
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".to_owned()
    }
}

trait InstrumentWith: std::future::Future + Sized {
    fn instrument_with(self, span: tracing::Span) -> tracing::instrument::Instrumented<Self> {
        tracing::Instrument::instrument(self, span)
    }
}
impl<F: std::future::Future> InstrumentWith for F {}
