//! The app: finds the handlers, validates everything at once, runs until told to stop.

use crate::claim::Claimer;
use crate::handler::Extensions;
use crate::runtime::SubRuntime;
use crate::subscriber::Queues;
use crate::{ConfigErrors, Error, Pooler, Sink, Subscriber, TableName, Tables};
use sqlx::PgPool;
use std::any::TypeId;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The outbox runtime: subscribers, brokers, state.
///
/// `App::new` finds every handler annotated with `#[outbox::subscriber]` in the
/// binary; handlers in a library crate are found as long as the binary links
/// that crate (write `use my_handlers as _;` if it names nothing from it).
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
/// outbox::App::new(pool).run_until_signal().await?;
/// # Ok(()) }
/// ```
pub struct App {
    pool: PgPool,
    tables: Tables,
    subscribers: Vec<Subscriber>,
    /// The handlers given to [`App::subscriber`]: type id and type name.
    explicit: Vec<(TypeId, &'static str)>,
    discover: bool,
    sinks: HashMap<String, Arc<dyn Sink>>,
    state: Extensions,
    shutdown_timeout: Duration,
    pooler: Pooler,
    listen_url: Option<String>,
    #[cfg(feature = "prometheus")]
    metrics: Option<crate::metrics::Endpoint>,
    #[cfg(feature = "capture")]
    log: Option<crate::stream::LogCapture>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("tables", &self.tables)
            .field("subscribers", &self.subscribers)
            .field("discover", &self.discover)
            .field("sinks", &self.sinks.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl App {
    /// An app that runs every `#[outbox::subscriber]` handler linked into the binary.
    pub fn new(pool: PgPool) -> Self {
        Self {
            discover: true,
            ..Self::manual(pool)
        }
    }

    /// An app that runs only the subscribers given with [`App::subscriber`] and
    /// [`App::register`].
    pub fn manual(pool: PgPool) -> Self {
        Self {
            pool,
            tables: Tables::default(),
            subscribers: Vec::new(),
            explicit: Vec::new(),
            discover: false,
            sinks: HashMap::new(),
            state: Extensions::default(),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            pooler: Pooler::None,
            listen_url: None,
            #[cfg(feature = "prometheus")]
            metrics: None,
            #[cfg(feature = "capture")]
            log: None,
        }
    }

    /// Uses other table names (default: `outbox` and `outbox_dlq`).
    pub fn tables(mut self, tables: Tables) -> Self {
        self.tables = tables;
        self
    }

    /// Adds a handler annotated with `#[outbox::subscriber]`, by its function name.
    ///
    /// Anything else (a function without the attribute, a closure) is reported
    /// by [`App::validate`] and [`App::start`]; build a [`Subscriber`] and use
    /// [`App::register`] for those.
    ///
    /// ```no_run
    /// #[outbox::subscriber("orders")]
    /// async fn handle(order_id: i64) {}
    /// # async fn f(pool: sqlx::PgPool) {
    /// let app = outbox::App::manual(pool).subscriber(handle);
    /// # }
    /// ```
    pub fn subscriber<F: 'static>(mut self, _handler: F) -> Self {
        self.explicit
            .push((TypeId::of::<F>(), std::any::type_name::<F>()));
        self
    }

    /// Adds a subscriber built with the plain API.
    pub fn register(mut self, sub: Subscriber) -> Self {
        self.subscribers.push(sub);
        self
    }

    /// Adds a broker; publishers name it (`"kafka"`).
    pub fn broker(mut self, sink: impl Sink) -> Self {
        self.sinks.insert(sink.name().to_owned(), Arc::new(sink));
        self
    }

    /// Adds a broker shared with other code.
    pub fn broker_arc(mut self, sink: Arc<dyn Sink>) -> Self {
        self.sinks.insert(sink.name().to_owned(), sink);
        self
    }

    /// Adds state handlers can take as `outbox::State<T>`.
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.state.insert(value);
        self
    }

    /// How long a shutdown may take in all (default 25 s, inside the 30 s a
    /// container is given by default between SIGTERM and SIGKILL). In-flight
    /// handlers and their publishes get this less a fifth (at most 5 s) kept
    /// for flushing the brokers; what has not finished by then is released.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Sends the runtime's statements as `pooler` needs it: with
    /// [`Pooler::Transaction`], for a pool connected through PgBouncer in
    /// transaction mode, none is prepared and each runs in a transaction of
    /// its own (see [`crate::pooler`]). LISTEN cannot go through such a
    /// pooler: give [`App::listen_url`] a direct connection, or the workers
    /// poll (between the subscribers' `poll_interval` bounds).
    ///
    /// ```no_run
    /// # async fn f(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
    /// outbox::App::new(pool)
    ///     .pooler(outbox::Pooler::Transaction)
    ///     .listen_url("postgres://outbox:outbox@db-host:5432/outbox")
    ///     .run_until_signal()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn pooler(mut self, pooler: Pooler) -> Self {
        self.pooler = pooler;
        self
    }

    /// Where the wake-up listener connects (LISTEN on the outbox's channel):
    /// a `postgres://` URL of a direct connection to the server. By default
    /// it connects as the pool does, which suits a direct pool; through a
    /// pooler in transaction mode ([`App::pooler`]) the app does not listen
    /// unless this is set. Checked when the app is built.
    pub fn listen_url(mut self, url: impl Into<String>) -> Self {
        self.listen_url = Some(url.into());
        self
    }

    /// The connection the wake-up listener uses, if any.
    fn listen_options(&self) -> Result<Option<sqlx::postgres::PgConnectOptions>, Error> {
        match (&self.listen_url, self.pooler) {
            (Some(url), _) => {
                let accepted = "accepted is postgres://user:password@host:port/database \
                     (or postgresql://), a direct connection to the server: LISTEN does not work \
                     through a pooler in transaction mode";
                let scheme = url.split_once("://").map(|(s, _)| s);
                if !matches!(scheme, Some("postgres" | "postgresql")) {
                    return Err(Error::invalid(format!(
                        "App::listen_url is not a PostgreSQL URL; {accepted}"
                    )));
                }
                url.parse().map(Some).map_err(|e| {
                    Error::invalid(format!(
                        "App::listen_url is not a PostgreSQL URL ({e}); {accepted}"
                    ))
                })
            }
            (None, Pooler::Transaction) => Ok(None),
            (None, _) => Ok(Some((*self.pool.connect_options()).clone())),
        }
    }

    /// Serves Prometheus metrics, `/healthz` and `/readyz` on `addr` while the
    /// app runs, and samples the row gauges (see [`crate::metrics`]). Off
    /// unless asked. Port 0 picks a free port: [`Running::metrics_addr`].
    ///
    /// ```no_run
    /// # async fn f(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
    /// outbox::App::new(pool)
    ///     .metrics_addr("0.0.0.0:9100".parse().unwrap())
    ///     .run_until_signal()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "prometheus")]
    pub fn metrics_addr(self, addr: std::net::SocketAddr) -> Self {
        self.metrics_endpoint(crate::metrics::Endpoint::new(addr))
    }

    /// Like [`App::metrics_addr`], with readiness checks of your own (a
    /// broker, say) and a sample interval; the app adds the database check.
    #[cfg(feature = "prometheus")]
    pub fn metrics_endpoint(mut self, endpoint: crate::metrics::Endpoint) -> Self {
        self.metrics = Some(endpoint);
        self
    }

    /// Also drives the handlers from the log (feature `capture`): the
    /// messages [`crate::Capture::Log`] wrote (and the rows of a
    /// [`crate::stream::CaptureTable`]) are read from the slot `capture`
    /// names, in commit order, and each goes to the subscriber of its queue,
    /// its handler's output to the stacked publishers, with no outbox row.
    /// A message that fails transiently is moved into the outbox table with
    /// its first attempt counted, and the same subscriber retries it from
    /// there (its retry strategy, its dead letters); a key with a message in
    /// the table sends its later ones through the table too, so an ordered
    /// subscriber keeps each key's order. Messages of a queue no subscriber
    /// here handles are moved into the table as they are, for a subscriber
    /// or relay that handles it. The table workers run as in table mode.
    ///
    /// The slot is the app's own: every reader of the log (an app, a relay)
    /// reads every message, so give each one its own outbox or run one
    /// reader. A slot that is lost stops the app with [`Error::Capture`]
    /// ([`App::run`] returns it). The slot exists once [`App::start`]
    /// returned (it is created then when missing): a log-mode publish is
    /// refused while no slot can read it. See the book's Log capture chapter.
    ///
    /// ```no_run
    /// # async fn f(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
    /// use outbox::stream::LogCapture;
    /// outbox::App::new(pool)
    ///     .capture_log(LogCapture::new("postgres://outbox:outbox@127.0.0.1/outbox").slot("orders_app"))
    ///     .run_until_signal()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "capture")]
    pub fn capture_log(mut self, capture: crate::stream::LogCapture) -> Self {
        self.log = Some(capture);
        self
    }

    /// The subscribers this app would run, after discovery.
    pub fn subscribers(&self) -> Vec<Subscriber> {
        let mut subs = self.subscribers.clone();
        let mut seen = HashSet::new();
        for reg in inventory::iter::<crate::__private::Registration> {
            let tid = (reg.type_id)();
            let named = self.explicit.iter().any(|(t, _)| *t == tid);
            if (self.discover || named) && seen.insert(tid) {
                subs.push((reg.build)());
            }
        }
        for s in &mut subs {
            if s.dlq_default {
                s.dlq = self.tables.dlq.as_ref().map(|d| d.to_string());
            }
        }
        subs
    }

    /// Creates the outbox table and every dead-letter table the subscribers use.
    pub async fn migrate(&self) -> Result<(), Error> {
        crate::migrate(&self.pool, &self.tables).await?;
        for sub in self.subscribers() {
            if let Some(d) = &sub.dlq {
                crate::schema::migrate_dlq(&self.pool, &TableName::new(d)?).await?;
            }
        }
        Ok(())
    }

    /// Checks the whole set of subscribers; every problem is reported together.
    pub fn validate(&self) -> Result<(), Error> {
        self.check(&self.subscribers()).map_err(Error::Config)
    }

    /// The values given to [`App::subscriber`] that are not annotated handlers.
    fn unregistered(&self) -> Vec<&'static str> {
        let known: HashSet<TypeId> = inventory::iter::<crate::__private::Registration>
            .into_iter()
            .map(|reg| (reg.type_id)())
            .collect();
        let mut seen = HashSet::new();
        self.explicit
            .iter()
            .filter(|(tid, _)| !known.contains(tid) && seen.insert(*tid))
            .map(|(_, name)| *name)
            .collect()
    }

    fn check(&self, subs: &[Subscriber]) -> Result<(), ConfigErrors> {
        let mut e = ConfigErrors::new();
        for name in self.unregistered() {
            e.push(format!(
                "App::subscriber was given `{name}`, which is not a handler annotated with #[outbox::subscriber]; \
                 annotate it, or build an outbox::Subscriber and add it with App::register"
            ));
        }
        if let Err(err) = self.listen_options() {
            e.push(err.to_string());
        }
        #[cfg(feature = "capture")]
        if let Some(c) = &self.log {
            if let Err(err) = crate::stream::validate_slot_name("LogCapture::slot", c.slot_name()) {
                e.push(err.to_string());
            }
        }
        if subs.is_empty() {
            e.push(
                "no subscribers: annotate a handler with #[outbox::subscriber], or register one; \
                 handlers in a library crate need the binary to link it (`use my_handlers as _;`)",
            );
        }
        let mut owners: HashMap<&str, String> = HashMap::new();
        let mut names: HashMap<&str, String> = HashMap::new();
        let mut all = None;
        for s in subs {
            if let Err(errs) = s.validate() {
                e.extend_with(&s.label(), errs);
            }
            if let Some(prev) = names.insert(s.name.as_str(), s.label()) {
                e.push(format!(
                    "two subscribers are named {:?}: {prev} and {}; give each a name of its own \
                     (the name labels its logs and its in-flight gauge)",
                    s.name,
                    s.label()
                ));
            }
            match &s.queues {
                Queues::All => {
                    if let Some(prev) = all.replace(s.label()) {
                        e.push(format!("{} and {prev} both claim every queue", s.label()));
                    }
                }
                Queues::Named(qs) => {
                    for q in qs {
                        if let Some(prev) = owners.insert(q.as_str(), s.label()) {
                            e.push(format!(
                                "queue {q:?} has two handlers: {prev} and {}; give each queue one handler",
                                s.label()
                            ));
                        }
                    }
                }
            }
            for p in &s.publishers {
                if !self.sinks.contains_key(&p.sink) {
                    e.push(format!(
                        "{} publishes to {} topic {:?} but no {} broker is configured; add one with App::broker (for Kafka: outbox_kafka::Broker::from_env()?)",
                        s.label(),
                        p.sink,
                        p.topic,
                        p.sink
                    ));
                }
            }
        }
        if let (Some(all), false) = (&all, owners.is_empty()) {
            e.push(format!(
                "{all} claims every queue, so no other subscriber may name queues"
            ));
        }
        e.into_result()
    }

    /// Validates, starts every worker, and returns a handle to stop them.
    pub async fn start(self) -> Result<Running, Error> {
        let subs = self.subscribers();
        self.check(&subs)?;
        self.check_tables(&subs).await?;
        let health = Arc::new(crate::runtime::Health::default());
        #[cfg(feature = "prometheus")]
        let metrics = match &self.metrics {
            Some(endpoint) => {
                let dlqs = subs
                    .iter()
                    .filter_map(|s| s.dlq.as_deref().map(TableName::new))
                    .collect::<Result<Vec<_>, _>>()?;
                let every = endpoint.sample_every();
                let workers = health.clone();
                let best_effort = endpoint.is_best_effort();
                let serving = endpoint.clone().database(self.pool.clone()).ready_check(
                    "workers",
                    move || {
                        let check = workers.check();
                        async move { check }
                    },
                );
                match serving.serve().await {
                    Ok(handle) => Some((handle, every, dlqs)),
                    Err(e) if best_effort => {
                        tracing::warn!("running without the metrics endpoint: {e}");
                        None
                    }
                    Err(e) => return Err(e),
                }
            }
            None => None,
        };
        for s in &subs {
            let queues = match &s.queues {
                Queues::All => "every queue".to_owned(),
                Queues::Named(q) => q.join(", "),
            };
            let pubs: Vec<String> = s
                .publishers
                .iter()
                .map(|p| format!("{}:{}", p.sink, p.topic))
                .collect();
            tracing::info!(
                subscriber = %s.name,
                queues = %queues,
                publishers = %pubs.join(", "),
                batch_size = s.batch_size,
                concurrency = s.concurrency,
                workers = s.workers,
                ordered = s.ordered,
                dlq = s.dlq.as_deref().unwrap_or("(none: parked)"),
                "registered subscriber"
            );
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let listen = self.listen_options()?;
        if listen.is_none() {
            tracing::info!(pooler = %self.pooler, "no LISTEN through a pooler in transaction mode and no App::listen_url: the workers poll");
        }
        let (waker, listener) =
            crate::listen::spawn(listen, self.tables.channel(), stop_rx.clone());
        let state = Arc::new(self.state);
        let sinks = Arc::new(self.sinks);
        let mut tasks = JoinSet::new();
        let suspects = Arc::new(tokio::sync::Mutex::new(()));
        #[cfg(feature = "prometheus")]
        if let Some((_, every, dlqs)) = &metrics {
            tasks.spawn(crate::metrics::run_sampler(
                self.pool.clone(),
                self.tables.clone(),
                dlqs.clone(),
                *every,
                stop_rx.clone(),
            ));
        }
        // Counters exist from start-up, at zero, for any recorder installed.
        for s in &subs {
            if let Queues::Named(queues) = &s.queues {
                for q in queues {
                    crate::metrics::zero_counters(q);
                }
            }
        }
        #[cfg(feature = "capture")]
        let mut runtimes = Vec::new();
        for s in subs {
            let dlq = s.dlq.as_deref().map(TableName::new).transpose()?;
            let queues = match &s.queues {
                Queues::All => None,
                Queues::Named(q) => Some(q.clone()),
            };
            let claimer = Claimer::build(self.pool.clone(), &self.tables, queues, s.ordered, dlq)
                .with_pooler(self.pooler)
                .with_batch_size(s.batch_size)
                .with_batch_bytes(s.max_batch_bytes)
                .with_lease_ttl(s.lease_ttl);
            let rt = Arc::new(SubRuntime {
                claimer,
                pool: self.pool.clone(),
                state: state.clone(),
                sinks: sinks.clone(),
                waker: waker.clone(),
                mark_idle_sql: crate::sql::mark_idle(&self.tables),
                mark_busy_sql: crate::sql::mark_busy(&self.tables),
                shutdown_timeout: self.shutdown_timeout - flush_reserve(self.shutdown_timeout),
                suspects: suspects.clone(),
                health: health.clone(),
                sub: s,
            });
            for w in 0..rt.sub.workers {
                tasks.spawn(rt.clone().run_worker(w, stop_rx.clone()));
            }
            #[cfg(feature = "capture")]
            runtimes.push(rt);
        }
        #[cfg(feature = "capture")]
        let log = match self.log {
            Some(capture) => {
                let target = Arc::new(crate::runtime::LogHandlers::new(runtimes)?);
                let stream = crate::stream::LogStream::to_handlers(
                    self.pool.clone(),
                    capture,
                    self.tables.clone(),
                    target,
                );
                // The slot exists once `start` returns: a log-mode publish
                // is refused while no slot can read it.
                stream.prepare_slot().await?;
                let mut stop = stop_rx.clone();
                let health = health.clone();
                Some(tokio::spawn(async move {
                    let r = stream
                        .run(async move {
                            let _ = stop.wait_for(|s| *s).await;
                        })
                        .await;
                    if let Err(e) = &r {
                        tracing::error!("the log stream stopped: {e}");
                        health.log_failed(e.to_string());
                    }
                    r
                }))
            }
            None => None,
        };
        Ok(Running {
            stop: stop_tx,
            tasks,
            listener,
            sinks,
            shutdown_timeout: self.shutdown_timeout,
            #[cfg(feature = "prometheus")]
            metrics: metrics.map(|(handle, _, _)| handle),
            #[cfg(feature = "capture")]
            log,
        })
    }

    async fn check_tables(&self, subs: &[Subscriber]) -> Result<(), Error> {
        let mut tables = vec![self.tables.outbox.clone()];
        for s in subs {
            if let Some(d) = &s.dlq {
                tables.push(TableName::new(d)?);
            }
        }
        for t in tables {
            use sqlx::Row;
            let q = sqlx::query("SELECT to_regclass($1) IS NOT NULL").bind(t.quoted());
            let rows = self.pooler.fetch_all(&self.pool, q).await?;
            let exists: bool = match rows.first() {
                Some(row) => row.try_get(0)?,
                None => false,
            };
            if !exists {
                return Err(Error::invalid(format!(
                    "table {t} does not exist: run the migrations first (App::migrate, outbox::migrate, or `outbox migrate`)"
                )));
            }
        }
        Ok(())
    }

    /// Runs until `shutdown` completes, then stops gracefully.
    /// With [`App::capture_log`], a log stream that cannot go on (its slot
    /// lost) stops the app, and its error is returned.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        #[allow(unused_mut)]
        let mut running = self.start().await?;
        #[cfg(feature = "capture")]
        if let Some(mut log) = running.log.take() {
            tokio::select! {
                _ = shutdown => running.log = Some(log),
                r = &mut log => {
                    running.shutdown().await;
                    return match r {
                        Ok(r) => r,
                        Err(e) => Err(Error::Capture(format!("the log stream's task failed: {e}"))),
                    };
                }
            }
            running.shutdown().await;
            return Ok(());
        }
        shutdown.await;
        running.shutdown().await;
        Ok(())
    }

    /// Runs until SIGINT or SIGTERM, then stops gracefully.
    pub async fn run_until_signal(self) -> Result<(), Error> {
        self.run(shutdown_signal()).await
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received; shutting down"),
        _ = term => tracing::info!("SIGTERM received; shutting down"),
    }
}

/// Default of [`App::shutdown_timeout`].
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(25);

/// The part of the shutdown timeout kept for flushing the brokers: a fifth,
/// at most 5 s.
fn flush_reserve(timeout: Duration) -> Duration {
    (timeout / 5).min(Duration::from_secs(5))
}

/// A started app.
pub struct Running {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    listener: tokio::task::JoinHandle<()>,
    sinks: Arc<HashMap<String, Arc<dyn Sink>>>,
    shutdown_timeout: Duration,
    #[cfg(feature = "prometheus")]
    metrics: Option<crate::metrics::MetricsHandle>,
    #[cfg(feature = "capture")]
    log: Option<tokio::task::JoinHandle<Result<(), Error>>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").finish_non_exhaustive()
    }
}

impl Running {
    /// Where the metrics endpoint listens, when [`App::metrics_addr`] was set.
    #[cfg(feature = "prometheus")]
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(|m| m.local_addr())
    }

    /// Stops claiming, lets in-flight handlers finish within the shutdown
    /// timeout, releases what did not finish, and flushes the brokers.
    pub async fn shutdown(mut self) {
        let started = Instant::now();
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        // The log stream settles and confirms what it has in flight.
        #[cfg(feature = "capture")]
        if let Some(log) = self.log.take() {
            let _ = log.await;
        }
        let _ = (&mut self.listener).await;
        // What is left of the shutdown timeout, and at least the reserve.
        let left = self
            .shutdown_timeout
            .saturating_sub(started.elapsed())
            .max(flush_reserve(self.shutdown_timeout));
        let flushes = self.sinks.values().map(|sink| async move {
            if tokio::time::timeout(left, sink.flush(left)).await.is_err() {
                tracing::warn!(sink = sink.name(), "broker flush did not finish within {left:?}; its unsent messages are retried from the outbox");
            }
        });
        futures::future::join_all(flushes).await;
        #[cfg(feature = "prometheus")]
        if let Some(m) = &self.metrics {
            m.stop();
        }
        tracing::info!("outbox stopped");
    }

    /// Stops at once without settling anything, as a crash would: the rows in
    /// flight come back when their lease expires. For tests.
    pub fn abort(mut self) {
        self.tasks.abort_all();
        #[cfg(feature = "capture")]
        if let Some(log) = self.log.take() {
            log.abort();
        }
        self.listener.abort();
        #[cfg(feature = "prometheus")]
        if let Some(m) = &self.metrics {
            m.stop();
        }
        let _ = self.stop.send(true);
    }
}
