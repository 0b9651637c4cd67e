//! The handler interface: what the runtime calls for each claimed row.

use crate::{Envelope, HandlerError, Meta, Outgoing};
use futures::future::BoxFuture;
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a successful handler produces: messages for the brokers, if any.
#[derive(Debug, Default, Clone)]
pub struct Output {
    pub(crate) publishes: Vec<Outgoing>,
}

impl Output {
    /// Nothing to publish.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds a message for sink `sink` (`"kafka"`) on `topic`. The key defaults to
    /// the row's partition key when `key` is `None`.
    pub fn publish(
        mut self,
        sink: &str,
        topic: &str,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
    ) -> Self {
        self.publishes.push(Outgoing {
            sink: sink.to_owned(),
            topic: topic.to_owned(),
            key,
            payload,
            headers: Vec::new(),
        });
        self
    }

    /// The messages to publish.
    pub fn publishes(&self) -> &[Outgoing] {
        &self.publishes
    }
}

/// Handles one claimed row.
///
/// The attribute macro `#[outbox::subscriber]` implements it for you; a closure
/// `Fn(Arc<Envelope>, Context) -> impl Future<Output = Result<Output, HandlerError>>`
/// implements it too.
pub trait Handler: Send + Sync + 'static {
    /// Handles one row.
    fn call(
        &self,
        env: Arc<Envelope>,
        ctx: Context,
    ) -> BoxFuture<'static, Result<Output, HandlerError>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(Arc<Envelope>, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Output, HandlerError>> + Send + 'static,
{
    fn call(
        &self,
        env: Arc<Envelope>,
        ctx: Context,
    ) -> BoxFuture<'static, Result<Output, HandlerError>> {
        Box::pin((self)(env, ctx))
    }
}

/// Shared state given to the app with [`crate::App::state`], looked up by type.
#[derive(Clone, Default)]
pub(crate) struct Extensions {
    map: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl Extensions {
    pub(crate) fn insert<T: Clone + Send + Sync + 'static>(&mut self, value: T) {
        self.map.insert(TypeId::of::<T>(), Arc::new(value));
    }

    pub(crate) fn get<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.map
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref::<T>())
            .cloned()
    }
}

/// A manual acknowledgement decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    Ack,
    Nack(Option<Duration>, String),
    Reject(String),
}

/// What a handler may reach besides its payload: app state, the pool, and in
/// manual ack mode the acknowledgement handle.
#[derive(Clone)]
pub struct Context {
    pub(crate) state: Arc<Extensions>,
    pub(crate) pool: Option<sqlx::PgPool>,
    pub(crate) decision: Arc<Mutex<Option<Decision>>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    /// A context for unit tests of handlers, with no state and no pool.
    pub fn for_tests() -> Self {
        Self {
            state: Arc::new(Extensions::default()),
            pool: None,
            decision: Arc::new(Mutex::new(None)),
        }
    }

    /// A context for unit tests that carries `state`.
    pub fn with_state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        let mut ext = (*self.state).clone();
        ext.insert(value);
        self.state = Arc::new(ext);
        self
    }

    /// State of type `T` given to the app, if any.
    pub fn state<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.state.get::<T>()
    }

    pub(crate) fn take_decision(&self) -> Option<Decision> {
        self.decision.lock().expect("decision lock").take()
    }
}

/// A handler argument built from the message and the context, by type.
///
/// Implemented for [`Meta`], [`State<T>`], [`sqlx::PgPool`] and [`Ack`].
pub trait FromContext: Sized {
    /// Builds the argument.
    fn from_context(env: &Envelope, ctx: &Context) -> Result<Self, HandlerError>;
}

impl FromContext for Meta {
    fn from_context(env: &Envelope, _: &Context) -> Result<Self, HandlerError> {
        Ok(Meta::from(env))
    }
}

impl FromContext for sqlx::PgPool {
    fn from_context(_: &Envelope, ctx: &Context) -> Result<Self, HandlerError> {
        ctx.pool
            .clone()
            .or_else(|| ctx.state::<sqlx::PgPool>())
            .ok_or_else(|| HandlerError::transient("no PgPool in the handler context"))
    }
}

/// Application state of type `T`, given with [`crate::App::state`].
///
/// ```
/// #[derive(Clone)]
/// struct Config { greeting: String }
/// #[outbox::subscriber("greet")]
/// async fn greet(name: String, cfg: outbox::State<Config>) {
///     println!("{} {name}", cfg.0.greeting);
/// }
/// ```
#[derive(Debug, Clone)]
pub struct State<T>(pub T);

impl<T: Clone + Send + Sync + 'static> FromContext for State<T> {
    fn from_context(_: &Envelope, ctx: &Context) -> Result<Self, HandlerError> {
        ctx.state::<T>().map(State).ok_or_else(|| {
            HandlerError::transient(format!(
                "no state of type {} was given to the app (use App::state)",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// The acknowledgement handle of a subscriber in manual ack mode.
///
/// Whatever the handler returns, the row's fate is what it decided here; a
/// handler that decides nothing has its row released for another delivery.
#[derive(Clone)]
pub struct Ack {
    decision: Arc<Mutex<Option<Decision>>>,
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ack").finish_non_exhaustive()
    }
}

impl Ack {
    fn set(&self, d: Decision) {
        *self.decision.lock().expect("decision lock") = Some(d);
    }
    /// Deletes the row (after its publishes succeed).
    pub fn ack(&self) {
        self.set(Decision::Ack)
    }
    /// Retries: after `delay`, or the retry strategy's delay when `None`.
    pub fn nack(&self, delay: Option<Duration>, error: impl std::fmt::Display) {
        self.set(Decision::Nack(delay, error.to_string()))
    }
    /// Fails the row for good (dead letters, or parked).
    pub fn reject(&self, reason: impl std::fmt::Display) {
        self.set(Decision::Reject(reason.to_string()))
    }
}

impl FromContext for Ack {
    fn from_context(_: &Envelope, ctx: &Context) -> Result<Self, HandlerError> {
        Ok(Ack {
            decision: ctx.decision.clone(),
        })
    }
}
