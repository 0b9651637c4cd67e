//! The subscriber runtime: claim -> handle -> publish -> settle, in batches.

use crate::claim::{Batch, Claimer, Retry, RowPosition, Terminal, MAX_RETRY_DELAY};
use crate::handler::{Decision, Extensions};
use crate::listen::{sleep_or_stop, Waker};
use crate::logging::human;
use crate::metrics as m;
use crate::{
    AckPolicy, Context, Envelope, Failure, FailureReason, HandlerError, HandlerErrorKind, Outgoing,
    Sink, Subscriber,
};
use futures::{FutureExt, StreamExt};
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::Instrument;
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
    /// Held while a row under suspicion (delivered before and never settled)
    /// is handled: one at a time in the process, shared by every subscriber.
    pub(crate) suspects: Arc<tokio::sync::Mutex<()>>,
    pub(crate) health: Arc<Health>,
}

/// What readiness reports about the workers: the last panic outside a
/// handler, if any.
#[derive(Default)]
pub(crate) struct Health {
    last_panic: Mutex<Option<(Instant, String)>>,
    /// Why the log stream stopped, if it did (for good).
    log_failure: Mutex<Option<String>>,
}

/// How long a worker's panic keeps `/readyz` at "not ready".
pub(crate) const PANIC_UNREADY_FOR: Duration = Duration::from_secs(60);

impl Health {
    fn panicked(&self, subscriber: &str, msg: String) {
        *self.last_panic.lock().expect("health lock") =
            Some((Instant::now(), format!("subscriber {subscriber:?}: {msg}")));
    }

    /// Records that the log stream stopped for good.
    #[cfg(feature = "capture")]
    pub(crate) fn log_failed(&self, why: String) {
        *self.log_failure.lock().expect("health lock") = Some(why);
    }

    /// `Err` while a worker panicked within the last [`PANIC_UNREADY_FOR`],
    /// and once the log stream stopped.
    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    pub(crate) fn check(&self) -> Result<(), String> {
        if let Some(why) = &*self.log_failure.lock().expect("health lock") {
            return Err(format!("the log stream stopped: {why}"));
        }
        match &*self.last_panic.lock().expect("health lock") {
            Some((at, msg)) if at.elapsed() < PANIC_UNREADY_FOR => Err(format!(
                "a worker step panicked {} s ago (its rows come back when their lease expires): {msg}",
                at.elapsed().as_secs()
            )),
            _ => Ok(()),
        }
    }
}

/// One handler call: row index, result, manual decision, run time.
type Handled = (
    usize,
    Result<crate::Output, HandlerError>,
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
            // A panic outside the handlers (a custom retry strategy or sink)
            // ends this step, not the worker: the rows stay leased and come
            // back when the lease expires, counted by `max_deliveries`.
            let work =
                AssertUnwindSafe(self.process(token, batch.rows, batch.positions, claimed_at))
                    .catch_unwind();
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
                (r, _) = futures::future::join(work.as_mut(), next.as_mut()) => Some(r),
                _ = deadline => None,
            };
            if let Some(Err(panic)) = &finished {
                let msg = panic_message(panic);
                tracing::error!(subscriber = %self.sub.name, worker, rows = ids.len(), "worker step panicked outside the handlers: {msg}; its rows come back when their lease expires");
                metrics::counter!(m::WORKER_PANICS_TOTAL, "subscriber" => self.sub.name.clone())
                    .increment(1);
                self.health.panicked(&self.sub.name, msg);
            }
            if finished.is_none() {
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
        let q = sqlx::query(&self.mark_idle_sql)
            .bind(id)
            .bind(ttl.as_micros() as i64);
        self.claimer
            .pooler()
            .execute(&self.pool, q)
            .await
            .map_err(|e| tracing::debug!(error = %e, "could not mark idle"))
            .is_ok()
    }

    async fn set_busy(&self, id: Uuid) {
        let q = sqlx::query(&self.mark_busy_sql).bind(id);
        let _ = self.claimer.pooler().execute(&self.pool, q).await;
    }

    fn context(&self) -> Context {
        Context {
            state: self.state.clone(),
            pool: Some(self.pool.clone()),
            decision: Arc::new(Mutex::new(None)),
        }
    }

    /// Handles a batch and settles every row of it, in four steps: screen
    /// (rows delivered too often without being settled), handle, publish,
    /// settle. The batch's lease is renewed meanwhile, so that neither a slow
    /// handler within its time limit nor a slow send loses it.
    async fn process(
        &self,
        token: Uuid,
        rows: Vec<Envelope>,
        positions: Vec<RowPosition>,
        claimed_at: Instant,
    ) {
        let every = renew_every(self.sub.lease_ttl);
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let lease = Lease {
            token,
            ids,
            renewed: AtomicBool::new(false),
        };
        let mut rows: Vec<Row> = rows
            .into_iter()
            .zip(positions)
            .map(|(env, position)| Row {
                env: Arc::new(env),
                position,
            })
            .collect();
        // A prefetched batch may have waited for the one before it: renew its
        // lease before handling it, and drop the rows taken over meanwhile.
        if claimed_at.elapsed() >= every {
            match lease.renew(&self.claimer).await {
                Ok(held) => {
                    if held.len() < rows.len() {
                        tracing::warn!(subscriber = %self.sub.name, rows = rows.len() - held.len(), "lease lost before handling (taken over after expiry); left to their new owner");
                        let held: HashSet<i64> = held.into_iter().collect();
                        rows.retain(|r| held.contains(&r.env.id));
                    }
                }
                Err(e) => {
                    tracing::warn!(subscriber = %self.sub.name, error = %e, "lease renewal failed")
                }
            }
        }
        let work = async {
            let Screened {
                crashed,
                healthy,
                suspect,
                later,
            } = self.screen(rows);
            if !crashed.is_empty() {
                let fates = crashed
                    .iter()
                    .map(|r| {
                        Fate::Fail(
                            FailureReason::Crashed,
                            format!(
                                "delivered {} times without being settled (the process handling it crashed, was killed or hung each time; max_deliveries = {}); not handled again",
                                unsettled(&r.env),
                                self.sub.max_deliveries
                            ),
                        )
                    })
                    .collect();
                self.settle(&lease, &crashed, fates).await;
            }
            if !later.is_empty() {
                let fates = later.iter().map(|_| Fate::Release).collect();
                self.settle(&lease, &later, fates).await;
            }
            if !healthy.is_empty() {
                self.run(&lease, healthy).await;
            }
            if let Some(row) = suspect {
                // One row under suspicion at a time in this process, alone: if
                // it crashes the process again, only it is charged.
                let _alone = self.suspects.lock().await;
                self.run(&lease, vec![row]).await;
            }
        };
        tokio::select! {
            _ = work => {}
            _ = self.keep_lease(&lease, Instant::now().max(claimed_at + every)) => {}
        }
    }

    /// Splits a batch by how often its rows were delivered without being
    /// settled: rows over `max_deliveries` (dead-lettered as `crashed`), rows
    /// never left unsettled (handled together), and rows under suspicion: the
    /// first is handled alone, the others are given back at once (without
    /// being charged) for later claims.
    fn screen(&self, rows: Vec<Row>) -> Screened {
        let mut s = Screened::default();
        for row in rows {
            let n = unsettled(&row.env);
            if n >= self.sub.max_deliveries {
                s.crashed.push(row);
            } else if n == 0 {
                s.healthy.push(row);
            } else if s.suspect.is_none() {
                s.suspect = Some(row);
            } else {
                s.later.push(row);
            }
        }
        s
    }

    /// Renews the batch's lease every third of its TTL, from `first`, until
    /// dropped (when the batch is settled).
    async fn keep_lease(&self, lease: &Lease, first: Instant) {
        let every = renew_every(self.sub.lease_ttl);
        tokio::time::sleep_until(first.into()).await;
        loop {
            match lease.renew(&self.claimer).await {
                Ok(held) => {
                    tracing::debug!(subscriber = %self.sub.name, rows = held.len(), "lease renewed");
                }
                Err(e) => {
                    tracing::warn!(subscriber = %self.sub.name, error = %e, "lease renewal failed; trying again")
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Handles, publishes and settles rows that run together.
    async fn run(&self, lease: &Lease, rows: Vec<Row>) {
        let handled = self.handle(&rows).await;
        let (mut fates, outgoing) = self.decide(&rows, handled);
        self.publish(outgoing, &mut fates).await;
        self.settle(lease, &rows, fates).await;
    }

    /// Runs the handler of every row, `concurrency` at a time. Each runs in a
    /// task of its own, so that its time limit fires even when it blocks its
    /// thread; the limit counts from its own start (a row that waited for a
    /// slot is not cut short: the lease is renewed meanwhile).
    async fn handle(&self, rows: &[Row]) -> Vec<Handled> {
        let ttl = self.sub.lease_ttl;
        let budget = ttl - lease_margin(ttl);
        let envs: Vec<(usize, Arc<Envelope>)> =
            rows.iter().map(|r| r.env.clone()).enumerate().collect();
        let results: Vec<Handled> = futures::stream::iter(envs)
            .map(|(i, env)| {
                let ctx = self.context();
                let handler = self.sub.handler.clone();
                let span = tracing::info_span!("message", queue = %env.queue, id = env.id, attempt = env.attempt, key = env.key.as_deref().unwrap_or(""));
                async move {
                    let started = Instant::now();
                    tracing::debug!("{} | received", env.queue);
                    let decision = ctx.clone();
                    let mut task = tokio::spawn(
                        async move {
                            // A handler may panic while building its future, too.
                            let fut = std::panic::catch_unwind(AssertUnwindSafe(|| {
                                handler.call(env, ctx)
                            }))?;
                            AssertUnwindSafe(fut).catch_unwind().await
                        }
                        .in_current_span(),
                    );
                    let r = match tokio::time::timeout(budget, &mut task).await {
                        Ok(Ok(Ok(r))) => r,
                        Ok(Ok(Err(panic))) => Err(panicked(&panic)),
                        Ok(Err(join)) if join.is_panic() => Err(panicked(&join.into_panic())),
                        Ok(Err(join)) => Err(HandlerError::transient(format!("handler task ended: {join}"))),
                        Err(_) => {
                            task.abort();
                            Err(HandlerError::transient(format!(
                                "handler did not finish within its time limit ({:?}: the lease, {ttl:?}, less {:?} kept for publishing and settling)",
                                budget,
                                lease_margin(ttl)
                            )))
                        }
                    };
                    (i, r, decision.take_decision(), started.elapsed())
                }
                .instrument_with(span)
            })
            .buffer_unordered(self.sub.concurrency)
            .collect()
            .await;
        m::record_handler_times(
            results
                .iter()
                .map(|(i, _, _, took)| (rows[*i].env.queue.as_str(), *took)),
        );
        results
    }

    /// What becomes of each handled row, and the messages its handler's
    /// output asks to publish, by sink.
    fn decide(&self, rows: &[Row], handled: Vec<Handled>) -> (Vec<Fate>, Outgoing_) {
        let mut fates: Vec<Fate> = rows.iter().map(|_| Fate::Release).collect();
        let mut outgoing: Outgoing_ = HashMap::new();
        for (i, result, decision, took) in handled {
            let env = &rows[i].env;
            fates[i] = match (self.sub.ack, decision, result) {
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
        }
        (fates, outgoing)
    }

    /// Sends every message of the rows at once, per sink; a row whose message
    /// failed is retried (or dead-lettered when the broker refused it for
    /// good) instead of acked. A sink that answers fewer results than it was
    /// given messages failed the messages it did not answer.
    async fn publish(&self, outgoing: Outgoing_, fates: &mut [Fate]) {
        let sends = outgoing.into_iter().map(|(name, msgs)| async move {
            let (idx, batch): (Vec<usize>, Vec<Outgoing>) = msgs.into_iter().unzip();
            let n = batch.len();
            let mut results = match self.sinks.get(&name) {
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
            if results.len() < n {
                tracing::error!(sink = %name, messages = n, results = results.len(), "the sink answered fewer results than messages; the rest count as failed");
                let missing = format!(
                    "sink {name:?} answered {} results for {n} messages: no result for this one",
                    results.len()
                );
                results.resize(n, Err(crate::SinkError::transient(missing)));
            }
            idx.into_iter().zip(results).collect::<Vec<_>>()
        });
        for (i, result) in futures::future::join_all(sends).await.into_iter().flatten() {
            if let Err(e) = result {
                let downgrade = match &fates[i] {
                    Fate::Ack(_) => true,
                    Fate::Retry(..) => e.permanent,
                    _ => false,
                };
                if downgrade {
                    fates[i] = if e.permanent {
                        Fate::Fail(FailureReason::PublishRejected, e.message)
                    } else {
                        Fate::Retry(
                            HandlerError::transient(format!("publish failed: {}", e.message)),
                            None,
                        )
                    };
                }
            }
        }
    }

    /// Logs and counts each row's fate and writes it: acks, nacks (with the
    /// strategy's delay, or to the dead letters when its budget is spent),
    /// dead letters and releases, one statement each.
    async fn settle(&self, lease: &Lease, rows: &[Row], fates: Vec<Fate>) {
        let mut acks = Vec::new();
        let mut retries = Vec::new();
        let mut terminal = Vec::new();
        let mut release = Vec::new();
        let mut acked_queues = Vec::new();
        let mut done = Vec::new();
        let mut retried_queues = Vec::new();
        let mut failed = Vec::new();
        for (row, fate) in rows.iter().zip(fates) {
            let env = &row.env;
            match fate {
                Fate::Ack(handled_in) => {
                    if let Some(took) = handled_in {
                        tracing::debug!(queue = %env.queue, id = env.id, "{} | processed in {} ms", env.queue, took.as_millis());
                    }
                    acks.push((row.position, env.id));
                    acked_queues.push(env.queue.as_str());
                    done.push((env.queue.as_str(), env.created_at_ms));
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
                    let attempt = env.failures.saturating_add(1);
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
                            tracing::warn!(queue = %env.queue, id = env.id, "{} | retry {attempt}{of} in {}: {}", env.queue, human(delay.min(MAX_RETRY_DELAY)), err.message());
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
        m::record_end_to_end(done);
        m::count_by_queue(m::RETRIED_TOTAL, retried_queues);
        m::count_by_queue_reason(
            m::REJECTED_TOTAL,
            failed
                .iter()
                .copied()
                .filter(|(_, r)| *r != FailureReason::RetriesExhausted.as_str()),
        );
        m::count_by_queue_reason(m::DEAD_LETTERED_TOTAL, failed);
        let token = lease.token;
        // After a renewal the rows are no longer where the claim left them.
        let renewed = lease.renewed.load(Ordering::SeqCst);
        self.write("ack", &acks, |rows| {
            let ids: Vec<i64> = rows.iter().map(|(_, id)| *id).collect();
            async move {
                if renewed {
                    self.claimer.ack(token, &ids).await
                } else {
                    let positions: Vec<RowPosition> = rows.iter().map(|(p, _)| *p).collect();
                    self.claimer.ack_at(token, &positions, &ids).await
                }
            }
        })
        .await;
        self.write("nack", &retries, |rows| self.claimer.nack(token, rows))
            .await;
        let refused = self
            .write("dead-letter", &terminal, |rows| {
                self.claimer.fail(token, rows)
            })
            .await;
        if !refused.is_empty() && self.claimer.has_dlq() {
            // The dead-letter table refused these rows even one by one (a
            // trigger or constraint of its own): park them in the outbox
            // instead, so that they stop coming back.
            let refused: Vec<Terminal> = refused.into_iter().cloned().collect();
            tracing::error!(subscriber = %self.sub.name, rows = refused.len(), "the dead-letter table refused rows; parking them in the outbox");
            self.write("park", &refused, |rows| self.claimer.park(token, rows))
                .await;
        }
        self.write("release", &release, |rows| {
            self.claimer.release(token, rows)
        })
        .await;
    }

    /// Runs one settling statement for `rows`. A connection error is retried
    /// until the lease is about to run out. When the database refuses the
    /// statement itself, it is run row by row, so that one row it cannot take
    /// does not hold back its batch neighbours. Returns the rows that could not
    /// be written even alone; they come back when their lease expires.
    async fn write<'a, T, F, Fut>(&self, what: &str, rows: &'a [T], f: F) -> Vec<&'a T>
    where
        F: Fn(&'a [T]) -> Fut,
        Fut: std::future::Future<Output = Result<u64, crate::Error>>,
    {
        if rows.is_empty() {
            return Vec::new();
        }
        let deadline = Instant::now() + self.sub.lease_ttl - lease_margin(self.sub.lease_ttl);
        match self
            .write_retrying(what, rows.len(), deadline, || f(rows))
            .await
        {
            Ok(()) => Vec::new(),
            Err(e) if rows.len() == 1 => {
                tracing::error!(subscriber = %self.sub.name, what, error = %e, "settling a row failed; it comes back when its lease expires");
                vec![&rows[0]]
            }
            Err(e) => {
                tracing::warn!(subscriber = %self.sub.name, what, error = %e, rows = rows.len(), "settling a batch failed; settling its rows one by one");
                let mut refused = Vec::new();
                for row in rows.chunks(1) {
                    if let Err(e) = self.write_retrying(what, 1, deadline, || f(row)).await {
                        tracing::error!(subscriber = %self.sub.name, what, error = %e, "settling a row failed; it comes back when its lease expires");
                        refused.push(&row[0]);
                    }
                }
                refused
            }
        }
    }

    /// One settling statement, retried on connection errors until `deadline`;
    /// a database error (the statement itself refused) is returned at once.
    async fn write_retrying<F, Fut>(
        &self,
        what: &str,
        n: usize,
        deadline: Instant,
        f: F,
    ) -> Result<(), crate::Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<u64, crate::Error>>,
    {
        let mut wait = Duration::from_millis(50);
        loop {
            match f().await {
                Ok(done) => {
                    if (done as usize) < n {
                        tracing::warn!(subscriber = %self.sub.name, what, expected = n, done, "lease lost for some rows (taken over after expiry); left to their new owner");
                    }
                    return Ok(());
                }
                Err(e) if is_refusal(&e) || Instant::now() + wait >= deadline => return Err(e),
                Err(e) => {
                    tracing::warn!(subscriber = %self.sub.name, what, error = %e, retry_in = ?wait, "settling failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// An app's handlers as the target of a log stream (feature `capture`):
/// each message goes to the subscriber of its queue, and its handler's
/// result to the stacked publishers, as in table mode; what fails takes the
/// log stream's failure path (moved into the table with its first attempt
/// counted, or dead-lettered), where the same subscriber's table workers
/// take over.
#[cfg(feature = "capture")]
pub(crate) struct LogHandlers {
    subs: Vec<Arc<SubRuntime>>,
    /// Each subscriber's dead-letter table (`None`: parked in the outbox).
    dlqs: Vec<Option<crate::TableName>>,
    by_queue: HashMap<String, usize>,
    all: Option<usize>,
    /// Per ordered subscriber, the end of its last delivery, which the next
    /// one waits for: a key's messages are handled in stream order even
    /// with several batches in flight.
    chains: Vec<Option<Mutex<Option<tokio::sync::oneshot::Receiver<()>>>>>,
}

#[cfg(feature = "capture")]
impl LogHandlers {
    pub(crate) fn new(subs: Vec<Arc<SubRuntime>>) -> Result<Self, crate::Error> {
        let dlqs = subs
            .iter()
            .map(|rt| rt.sub.dlq.as_deref().map(crate::TableName::new).transpose())
            .collect::<Result<_, _>>()?;
        let mut by_queue = HashMap::new();
        let mut all = None;
        for (k, rt) in subs.iter().enumerate() {
            match &rt.sub.queues {
                crate::Queues::All => all = Some(k),
                crate::Queues::Named(queues) => {
                    for q in queues {
                        by_queue.insert(q.clone(), k);
                    }
                }
            }
        }
        let chains = subs
            .iter()
            .map(|rt| rt.sub.ordered.then(|| Mutex::new(None)))
            .collect();
        Ok(Self {
            subs,
            dlqs,
            by_queue,
            all,
            chains,
        })
    }
}

#[cfg(feature = "capture")]
impl crate::stream::Deliver for LogHandlers {
    fn deliver(
        &self,
        batch: Vec<Arc<Envelope>>,
    ) -> futures::future::BoxFuture<'static, Vec<crate::stream::Verdict>> {
        use crate::stream::Verdict;
        let mut verdicts: Vec<Option<Verdict>> = batch.iter().map(|_| None).collect();
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); self.subs.len()];
        for (i, env) in batch.iter().enumerate() {
            match self.by_queue.get(&env.queue).copied().or(self.all) {
                Some(k) => groups[k].push(i),
                // No subscriber here: into the table, where a subscriber
                // (or a relay) of that queue takes it, as in table mode.
                None => verdicts[i] = Some(Verdict::Defer),
            }
        }
        let mut runs = Vec::new();
        for (k, idx) in groups.into_iter().enumerate() {
            if idx.is_empty() {
                continue;
            }
            let rt = self.subs[k].clone();
            // Taken now, in stream order: the chain decides the order.
            let turn = self.chains[k].as_ref().map(|chain| {
                let (done, next) = tokio::sync::oneshot::channel::<()>();
                let before = chain.lock().expect("chain lock").replace(next);
                (before, done)
            });
            let envs: Vec<Arc<Envelope>> = idx.iter().map(|&i| batch[i].clone()).collect();
            runs.push(async move {
                let _done = match turn {
                    Some((before, done)) => {
                        if let Some(before) = before {
                            let _ = before.await;
                        }
                        Some(done)
                    }
                    None => None,
                };
                (idx, rt.handle_log(envs).await)
            });
        }
        async move {
            for (idx, vs) in futures::future::join_all(runs).await {
                for (i, v) in idx.into_iter().zip(vs) {
                    verdicts[i] = Some(v);
                }
            }
            verdicts
                .into_iter()
                .map(|v| v.unwrap_or(Verdict::Defer))
                .collect()
        }
        .boxed()
    }

    fn tables_for(&self, queue: &str, stream: &crate::Tables) -> crate::Tables {
        match self.by_queue.get(queue).copied().or(self.all) {
            Some(k) => crate::Tables {
                outbox: stream.outbox.clone(),
                dlq: self.dlqs[k].clone(),
            },
            None => stream.clone(),
        }
    }
}

#[cfg(feature = "capture")]
impl SubRuntime {
    /// Handles messages read from the log and publishes their handlers'
    /// output: one verdict per message. For an ordered subscriber a key's
    /// messages run one after the other, and once one of them fails the
    /// key's later ones are moved into the table untried, behind it.
    async fn handle_log(&self, envs: Vec<Arc<Envelope>>) -> Vec<crate::stream::Verdict> {
        use crate::stream::Verdict;
        let mut verdicts: Vec<Option<Verdict>> = envs.iter().map(|_| None).collect();
        let mut failed_keys: HashSet<&str> = HashSet::new();
        let mut left: Vec<usize> = (0..envs.len()).collect();
        while !left.is_empty() {
            let mut round = Vec::new();
            let mut rest = Vec::new();
            let mut keys = HashSet::new();
            for i in left {
                match envs[i].key.as_deref() {
                    Some(k) if self.sub.ordered => {
                        if failed_keys.contains(k) {
                            verdicts[i] = Some(Verdict::Defer);
                        } else if keys.insert(k) {
                            round.push(i);
                        } else {
                            rest.push(i);
                        }
                    }
                    _ => round.push(i),
                }
            }
            left = rest;
            let rows: Vec<Row> = round
                .iter()
                .map(|&i| Row {
                    env: envs[i].clone(),
                    position: RowPosition::default(),
                })
                .collect();
            let handled = self.handle(&rows).await;
            let (mut fates, outgoing) = self.decide(&rows, handled);
            let handled_ok: Vec<bool> = fates.iter().map(|f| matches!(f, Fate::Ack(_))).collect();
            self.publish(outgoing, &mut fates).await;
            let mut done = Vec::new();
            for ((&i, fate), broker) in round.iter().zip(fates).zip(handled_ok) {
                let v = self.log_verdict(&envs[i], fate, broker);
                if matches!(v, Verdict::Done) {
                    done.push(envs[i].queue.as_str());
                } else if self.sub.ordered {
                    if let Some(k) = envs[i].key.as_deref() {
                        failed_keys.insert(k);
                    }
                }
                verdicts[i] = Some(v);
            }
            // Counted once per round, not per message.
            m::count_by_queue(m::HANDLED_TOTAL, done);
        }
        verdicts
            .into_iter()
            .map(|v| v.unwrap_or(Verdict::Defer))
            .collect()
    }

    /// A log message's fate as the stream's verdict, logged and counted as
    /// in table mode. `broker`: the handler succeeded (a failure is its
    /// publish's).
    fn log_verdict(&self, env: &Envelope, fate: Fate, broker: bool) -> crate::stream::Verdict {
        use crate::stream::Verdict;
        let q = env.queue.as_str();
        match fate {
            Fate::Ack(took) => {
                if let Some(took) = took {
                    tracing::debug!(queue = %q, id = env.id, "{q} | processed in {} ms", took.as_millis());
                }
                Verdict::Done
            }
            Fate::Retry(err, forced) => {
                let next = self
                    .sub
                    .retry
                    .next_delay(&Failure::new(1, env.elapsed, &err))
                    .map(|delay| forced.unwrap_or(delay));
                match next {
                    Some(delay) => {
                        tracing::warn!(queue = %q, id = env.id, "{q} | retry 1 in {} (moved from the log into the table): {}", human(delay.min(MAX_RETRY_DELAY)), err.message());
                        m::count_by_queue(m::RETRIED_TOTAL, [q]);
                        Verdict::Retry {
                            error: err.message().to_owned(),
                            delay,
                            broker,
                        }
                    }
                    None => {
                        let reason = FailureReason::RetriesExhausted;
                        tracing::error!(queue = %q, id = env.id, "{q} | dead-lettered: {reason}: {}", err.message());
                        m::count_by_queue_reason(m::DEAD_LETTERED_TOTAL, [(q, reason.as_str())]);
                        Verdict::Fail(reason, err.message().to_owned())
                    }
                }
            }
            Fate::Fail(reason, error) => {
                tracing::error!(queue = %q, id = env.id, "{q} | dead-lettered: {reason}: {error}");
                m::count_by_queue_reason(m::REJECTED_TOTAL, [(q, reason.as_str())]);
                m::count_by_queue_reason(m::DEAD_LETTERED_TOTAL, [(q, reason.as_str())]);
                Verdict::Fail(reason, error)
            }
            Fate::Release => Verdict::Defer,
        }
    }
}

/// Whether the database refused the statement itself (a constraint, a value
/// it cannot store, a trigger's error), as opposed to a lost connection.
fn is_refusal(e: &crate::Error) -> bool {
    matches!(e, crate::Error::Database(sqlx::Error::Database(_)))
}

/// Times a row was delivered without being settled, before this delivery.
fn unsettled(env: &Envelope) -> u32 {
    env.attempt.saturating_sub(1).saturating_sub(env.failures)
}

/// How often a batch's lease is renewed while it is handled: a third of it.
fn renew_every(ttl: Duration) -> Duration {
    ttl / 3
}

fn panicked(p: &Box<dyn std::any::Any + Send>) -> HandlerError {
    HandlerError::transient(format!("handler panicked: {}", panic_message(p)))
}

/// One claimed row: the envelope, and where the claim left it.
struct Row {
    env: Arc<Envelope>,
    position: RowPosition,
}

/// A batch's lease: its token, its rows, and whether it was renewed (the rows
/// then are elsewhere than their claim positions).
struct Lease {
    token: Uuid,
    ids: Vec<i64>,
    renewed: AtomicBool,
}

impl Lease {
    /// Extends the lease of the rows still held; returns their ids. From
    /// then on the rows are elsewhere than their claim positions.
    async fn renew(&self, claimer: &Claimer) -> Result<Vec<i64>, crate::Error> {
        let held = claimer.renew(self.token, &self.ids).await?;
        self.renewed.store(true, Ordering::SeqCst);
        Ok(held)
    }
}

/// A batch split by [`SubRuntime::screen`].
#[derive(Default)]
struct Screened {
    crashed: Vec<Row>,
    healthy: Vec<Row>,
    suspect: Option<Row>,
    later: Vec<Row>,
}

/// Messages to publish, by sink, each with the index of its row.
type Outgoing_ = HashMap<String, Vec<(usize, Outgoing)>>;

/// Whether a header name starts with [`crate::RESERVED_HEADER_PREFIX`], in any
/// case. `publish` refuses such names; a row's own header of such a name
/// (written by another producer) is dropped and counted, so that a consumer
/// that de-duplicates on `outbox-id` never sees a forged one.
fn reserved(name: &str) -> bool {
    let prefix = crate::RESERVED_HEADER_PREFIX;
    name.len() >= prefix.len()
        && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

pub(crate) fn add_headers(o: &mut Outgoing, env: &Envelope) {
    let mut dropped = 0u64;
    for (k, v) in &env.headers {
        if reserved(k) {
            dropped += 1;
            continue;
        }
        o.headers.push((k.clone(), v.as_bytes().to_vec()));
    }
    if dropped > 0 {
        tracing::warn!(queue = %env.queue, id = env.id, dropped, "{} | row headers with names reserved for the runtime dropped", env.queue);
        metrics::counter!(m::RESERVED_HEADERS_DROPPED_TOTAL, "queue" => env.queue.clone())
            .increment(dropped);
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
