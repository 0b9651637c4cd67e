//! Wake-ups: LISTEN/NOTIFY on the outbox channel, re-opened with backoff.
//!
//! A notification is a hint, never the source of truth: it bumps a counter that
//! sleeping workers watch, and workers also poll on a timer. After a reconnect
//! the counter is bumped too, since notifications sent meanwhile are lost.

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The shared wake-up state of one app.
#[derive(Clone)]
pub(crate) struct Waker {
    pub(crate) rx: watch::Receiver<u64>,
    pub(crate) connected: Arc<AtomicBool>,
}

/// Listens with a connection made from `options`; with `None` (a pooler in
/// transaction mode and no direct connection to listen on) it never listens,
/// and the workers poll.
pub(crate) fn spawn(
    options: Option<PgConnectOptions>,
    channel: String,
    mut stop: watch::Receiver<bool>,
) -> (Waker, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(0u64);
    let connected = Arc::new(AtomicBool::new(false));
    let flag = connected.clone();
    let Some(options) = options else {
        let task = tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            drop(tx);
        });
        return (Waker { rx, connected }, task);
    };
    // A connection of its own, outside the app's pool: LISTEN holds it for
    // good, and in a small pool (one connection, say) every claim would wait
    // for it.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options);
    let task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            if *stop.borrow() {
                break;
            }
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "wake-up listener cannot connect; polling meanwhile");
                    if sleep_or_stop(backoff, &mut stop).await {
                        break;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            if let Err(e) = listener.listen(&channel).await {
                tracing::warn!(error = %e, retry_in = ?backoff, "LISTEN failed; polling meanwhile");
                if sleep_or_stop(backoff, &mut stop).await {
                    break;
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
            backoff = Duration::from_millis(100);
            flag.store(true, Ordering::SeqCst);
            tx.send_modify(|n| *n = n.wrapping_add(1));
            loop {
                tokio::select! {
                    msg = listener.try_recv() => match msg {
                        Ok(Some(_)) => tx.send_modify(|n| *n = n.wrapping_add(1)),
                        Ok(None) => {
                            // Reconnected inside sqlx: anything sent meanwhile is lost.
                            tx.send_modify(|n| *n = n.wrapping_add(1));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "wake-up listener lost its connection; reconnecting");
                            break;
                        }
                    },
                    _ = stop.changed() => break,
                }
                if *stop.borrow() {
                    break;
                }
            }
            flag.store(false, Ordering::SeqCst);
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
        flag.store(false, Ordering::SeqCst);
    });
    (Waker { rx, connected }, task)
}

/// Sleeps; returns true when asked to stop meanwhile.
pub(crate) async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}
