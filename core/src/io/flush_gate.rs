//! One flusher at a time for a TLS socket (`tls_relay`): the coordination of the two pumps that
//! produce TLS records and the drainer that waits for writability on the decrypting pump's behalf,
//! without the I/O, so that a loom model checks it (core/tests/loom_flush.rs): never two flushers
//! at once, no waiter left unwoken, no record left behind.
//!
//! In the proxy the pumps are futures of one worker thread and the state is a `RefCell`; under
//! `--cfg ringside_loom` it is a loom `Mutex`, and the model runs the pumps as loom threads (each
//! access is one short critical section either way, never held across an await).

use std::task::{Context, Poll, Waker};

#[derive(Debug, Default)]
struct State {
    /// A flusher holds the turn.
    busy: bool,
    /// Flushers waiting for the turn.
    waiters: Vec<Waker>,
    /// Records remain that the decrypting pump could not write: the drainer has work.
    kicked: bool,
    /// No more kicks will come: the drainer may end.
    closed: bool,
    /// The drainer, waiting for a kick.
    drainer: Option<Waker>,
}

#[cfg(not(ringside_loom))]
#[derive(Debug, Default)]
struct Shared(std::cell::RefCell<State>);
#[cfg(not(ringside_loom))]
impl Shared {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.0.borrow_mut())
    }
}

#[cfg(ringside_loom)]
#[derive(Debug, Default)]
struct Shared(loom::sync::Mutex<State>);
#[cfg(ringside_loom)]
impl Shared {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.0.lock().expect("flush gate lock"))
    }
}

/// The flusher's turn and the drainer's kicks.
#[derive(Debug, Default)]
pub struct FlushGate {
    state: Shared,
}

/// The turn to flush, held by one flusher; dropping it (done, failed or cancelled) hands the turn
/// on and wakes every waiter.
#[derive(Debug)]
pub struct FlushTurn<'a> {
    gate: &'a FlushGate,
}

impl Drop for FlushTurn<'_> {
    fn drop(&mut self) {
        let waiters = self.gate.state.with(|s| {
            s.busy = false;
            std::mem::take(&mut s.waiters)
        });
        // Woken outside the borrow: a waker may run code that uses the gate.
        for w in waiters {
            w.wake();
        }
    }
}

impl FlushGate {
    /// Take the turn, or wait (woken when the current flusher is done).
    pub fn poll_turn(&self, cx: &mut Context<'_>) -> Poll<FlushTurn<'_>> {
        self.state.with(|s| {
            if s.busy {
                s.waiters.push(cx.waker().clone());
                Poll::Pending
            } else {
                s.busy = true;
                Poll::Ready(FlushTurn { gate: self })
            }
        })
    }

    /// The turn, when free.
    pub async fn turn(&self) -> FlushTurn<'_> {
        std::future::poll_fn(|cx| self.poll_turn(cx)).await
    }

    /// A flusher holds the turn (a non-blocking writer must leave the socket to it).
    pub fn is_busy(&self) -> bool {
        self.state.with(|s| s.busy)
    }

    /// Records remain that the caller could not write without waiting: have the drainer do it.
    pub fn kick(&self) {
        let w = self.state.with(|s| {
            s.kicked = true;
            s.drainer.take()
        });
        if let Some(w) = w {
            w.wake();
        }
    }

    /// No more kicks: the drainer's wait ends once it has served the last one.
    pub fn close(&self) {
        let w = self.state.with(|s| {
            s.closed = true;
            s.drainer.take()
        });
        if let Some(w) = w {
            w.wake();
        }
    }

    /// The drainer's wait: `true` for a kick (flush now), `false` when closed with none pending.
    pub fn poll_kicked(&self, cx: &mut Context<'_>) -> Poll<bool> {
        self.state.with(|s| {
            if std::mem::take(&mut s.kicked) {
                Poll::Ready(true)
            } else if s.closed {
                Poll::Ready(false)
            } else {
                s.drainer = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }

    /// Wait for a kick (`true`) or the close (`false`).
    pub async fn kicked(&self) -> bool {
        std::future::poll_fn(|cx| self.poll_kicked(cx)).await
    }
}
