//! Shutdown and drain. The gateway has two tokens:
//! - the **drain** token ([`Gateway::drain`](crate::gateway::Gateway::drain)), cancelled by the first SIGINT or
//!   SIGTERM: the accept loop stops, `/readyz` answers 503, and every WebSocket closes itself (1001
//!   [`DRAIN_REASON`](crate::protocol::close::DRAIN_REASON)) at its own random moment within `server.drain_window`
//!   ([`drain_turn`]), so the clients of this gateway reconnect to the others spread out instead of in one storm;
//! - the **root shutdown** token, cancelled by [`crate::run`] once the drain is over (or by a test or embedder that
//!   wants everything closed at once). Every task holds it or a child of it (the accept loop, each HTTP connection,
//!   each upgraded WebSocket and its writer, each room task), so one cancel reaches all of them. hyper's own
//!   graceful shutdown does not reach upgraded WebSockets, which is why they get the token too.
//!
//! A second signal during the drain exits the process at once (status 1): an operator who presses Ctrl-C twice, or an
//! orchestrator that gave up waiting, is not kept waiting for the window.

use std::{pin::Pin, task::Context, time::Duration};

use tokio_util::sync::CancellationToken;

/// Exit status after a second signal during the drain.
pub const FORCED_EXIT_STATUS: i32 = 1;

/// Cancels `drain` on the first SIGINT or SIGTERM, and exits the process on the second.
///
/// Not tracked by the gateway's task tracker on purpose: it lives as long as the process, and shutdown waits for
/// the tracker.
pub fn on_signals(drain: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received: draining (a second signal exits at once)");
        drain.cancel();
        wait_for_signal().await;
        tracing::warn!("second shutdown signal: exiting now");
        std::process::exit(FORCED_EXIT_STATUS);
    });
}

/// Completes at this connection's moment to close during a drain: a uniformly random point within `window` after
/// `drain` is cancelled. The timer is armed only once the drain starts, so an idle connection pays for no timer
/// before that; the random point is drawn per connection, which is what spreads the reconnects.
pub async fn drain_turn(drain: CancellationToken, window: Duration) {
    drain.cancelled().await;
    let delay = drain_delay(window);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// The gateway's stop state for its connections: one atomic they read on every wake-up, and one `Notify` they
/// register with once. A `CancellationToken` costs a mutex to ask (`is_cancelled`) and another to poll its wait, and
/// the drain token is shared by every connection, so each wake-up of each connection would take a lock every other
/// connection takes too. One watcher task per gateway ([`StopSignal::watch`]) turns the two tokens into this.
#[derive(Debug, Default)]
pub struct StopSignal {
    /// [`Stop`] as a number; only ever grows.
    state: std::sync::atomic::AtomicU8,
    notify: std::sync::Arc<tokio::sync::Notify>,
}

/// Where the gateway is in its life, as its connections see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Stop {
    /// Serving.
    Running = 0,
    /// Draining: each connection closes at its own moment within `server.drain_window`.
    Draining = 1,
    /// Shutting down: every connection closes now.
    Stopping = 2,
}

impl StopSignal {
    /// The state now: one atomic load.
    pub fn get(&self) -> Stop {
        match self.state.load(std::sync::atomic::Ordering::SeqCst) {
            0 => Stop::Running,
            1 => Stop::Draining,
            _ => Stop::Stopping,
        }
    }

    /// A wait for the next change. Register it (poll it once) before reading [`StopSignal::get`]: the state is set
    /// before the waiters are woken, so a change is never missed.
    pub fn changed(&self) -> tokio::sync::futures::OwnedNotified {
        self.notify.clone().notified_owned()
    }

    fn set(&self, stop: Stop) {
        self.state.fetch_max(stop as u8, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Follows `drain` and `shutdown` until shutdown; the gateway spawns this once.
    pub async fn watch(self: std::sync::Arc<Self>, drain: CancellationToken, shutdown: CancellationToken) {
        tokio::select! {
            _ = drain.cancelled() => self.set(Stop::Draining),
            _ = shutdown.cancelled() => {}
        }
        shutdown.cancelled().await;
        self.set(Stop::Stopping);
    }
}

pin_project_lite::pin_project! {
    /// One connection's watch on the [`StopSignal`]: registered once, then one atomic load per wake-up.
    #[derive(Debug)]
    pub struct StopWatch {
        #[pin]
        wait: tokio::sync::futures::OwnedNotified,
        // Whether `wait` is registered (polled once since it was made).
        armed: bool,
        // The state last reported.
        seen: Stop,
    }
}

impl StopWatch {
    /// A watch on `signal` that has seen nothing but [`Stop::Running`].
    pub fn new(signal: &StopSignal) -> Self {
        Self {
            wait: signal.changed(),
            armed: false,
            seen: Stop::Running,
        }
    }

    /// The state if it changed since the last call, else `None` with a wake-up registered for the next change. The
    /// wait is registered before the state is read (the signal sets its state before it wakes its waiters), so no
    /// change is missed; the state only grows, so this loops at most three times.
    pub fn poll_change(self: Pin<&mut Self>, signal: &StopSignal, cx: &mut Context<'_>) -> Option<Stop> {
        let mut this = self.project();
        let mut changed = None;
        loop {
            if !*this.armed {
                // Ready only if the state changed since the wait was made, which the read below sees.
                let _ = this.wait.as_mut().poll(cx);
                *this.armed = true;
            }
            let now = signal.get();
            if now == *this.seen {
                return changed;
            }
            *this.seen = now;
            changed = Some(now);
            this.wait.set(signal.changed());
            *this.armed = false;
        }
    }
}

/// One connection's delay after the drain starts: uniformly random within `window` (what [`drain_turn`] waits; a
/// connection that runs its own timer adds it to the moment it saw the drain).
pub fn drain_delay(window: Duration) -> Duration {
    jitter(window, rand::random::<f64>())
}

/// `window` scaled by `unit` (in `[0, 1)`), saturating: the delay of one connection in the drain.
fn jitter(window: Duration, unit: f64) -> Duration {
    Duration::try_from_secs_f64(window.as_secs_f64() * unit.clamp(0.0, 1.0)).unwrap_or(window)
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    // A fresh listener per wait is fine: tokio keeps the process-wide handler installed once registered.
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT will stop the gateway");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_the_window() {
        let w = Duration::from_secs(10);
        assert_eq!(jitter(w, 0.0), Duration::ZERO);
        assert_eq!(jitter(w, 0.5), Duration::from_secs(5));
        assert!(jitter(w, 0.999_999) < w);
        assert_eq!(jitter(Duration::ZERO, 0.7), Duration::ZERO);
        assert!(jitter(w, f64::NAN) <= w);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_turn_waits_for_the_drain_then_at_most_the_window() {
        let drain = CancellationToken::new();
        let turn = tokio::spawn(drain_turn(drain.clone(), Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!turn.is_finished(), "no drain, no close");
        drain.cancel();
        let started = tokio::time::Instant::now();
        turn.await.expect("turn");
        assert!(started.elapsed() <= Duration::from_secs(10));
    }
}
