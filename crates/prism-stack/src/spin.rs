//! Busy polling, opt-in ([`Config::busy_poll`](crate::Config::busy_poll)): for a while after
//! each of the stack's rounds, a task keeps one runtime worker polling for I/O instead of
//! sleeping. The next packet from the device, or the next answer from an upstream, then meets
//! a running thread instead of waking a sleeping one: a round trip saves the kernel's wake-ups
//! of Prism's thread, at the cost of that thread's core while traffic flows. Once the stack
//! has been idle for the whole window, the task sleeps until its next round: an idle Prism
//! does not spin.
//!
//! This is the one place Prism polls instead of waiting, and only when asked: the default
//! waits for events and never spins.
//!
//! How it polls: a task that yields is deferred by tokio until its worker has checked for I/O
//! events without blocking (`epoll_wait` with a zero timeout), so a yielding loop is a polling
//! loop. On a runtime of several workers each yield also wakes an idle worker to look for work
//! (measured: 1.76 cores busy instead of 1), so busy polling wants a runtime of one worker; the
//! `prism` binary builds one when it is on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::Counters;

/// What the stack and the polling task share.
#[derive(Debug, Default)]
struct Shared {
    /// The stack's rounds so far.
    rounds: AtomicU64,
    /// The task is asleep, waiting for `wake`.
    asleep: AtomicBool,
    wake: Notify,
}

/// The stack's end: tells the polling task of each round, and stops it when dropped.
#[derive(Debug)]
pub(crate) struct Spinner {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Spinner {
    /// Starts the polling task (on the current tokio runtime), polling for `window` after each
    /// round.
    pub(crate) fn start(window: Duration, counters: Arc<Counters>) -> Spinner {
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        if workers > 1 {
            warn!(
                workers,
                "busy polling on a runtime of several workers keeps waking the idle ones (about \
                 two cores where one would do); give the engine a runtime of one worker"
            );
        }
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(poll(Arc::clone(&shared), window, counters));
        Spinner { shared, task }
    }

    /// One round of the stack: the task polls on (or wakes up and polls) for another window.
    pub(crate) fn round(&self) {
        // Sequentially consistent with the task's store to `asleep` and load of `rounds`: one
        // of the two sees the other, so a round is never missed by both.
        self.shared.rounds.fetch_add(1, Ordering::SeqCst);
        if self.shared.asleep.swap(false, Ordering::SeqCst) {
            self.shared.wake.notify_one();
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn poll(shared: Arc<Shared>, window: Duration, counters: Arc<Counters>) {
    let mut seen = shared.rounds.load(Ordering::SeqCst);
    loop {
        shared.asleep.store(true, Ordering::SeqCst);
        // A round after the window's last look saw `asleep` still false and sent nothing:
        // look again before sleeping. (A round after the store sends a notification, kept as
        // a permit if it comes before the wait.)
        if shared.rounds.load(Ordering::SeqCst) == seen {
            shared.wake.notified().await;
        } else {
            shared.asleep.store(false, Ordering::SeqCst);
        }
        Counters::add(&counters.busy_poll_windows, 1);
        seen = shared.rounds.load(Ordering::Relaxed);
        let mut last = Instant::now();
        while last.elapsed() < window {
            tokio::task::yield_now().await;
            let rounds = shared.rounds.load(Ordering::Relaxed);
            if rounds != seen {
                seen = rounds;
                last = Instant::now();
            }
        }
    }
}
