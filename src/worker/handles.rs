//! What the receiver holds of each handler, so it can pick, wake, time
//! out and cut them without knowing how they run: an event loop's
//! [`Handle`] (its waker, its load, the order to cut), and thread mode's
//! [`OpenConnections`] (each handler thread's fd and last activity).
//!
//! Both handlers and the receiver depend on this module; it depends on
//! neither, which keeps the worker's imports pointing one way.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mio::Waker;
use nix::sys::socket::{Shutdown, shutdown};

use crate::worker::counters::Ending;

/// What the receiver and the drain hold of one loop: how to wake it, how
/// loaded it is, and the order to cut everything.
pub struct Handle {
    pub(super) waker: Waker,
    /// Connections this loop serves, for the least-loaded choice.
    pub(super) open: AtomicUsize,
    /// Set by a drain deadline or fast stop: close every connection now.
    pub(super) cut: AtomicBool,
}

impl Handle {
    pub fn new(waker: Waker) -> Handle {
        Handle { waker, open: AtomicUsize::new(0), cut: AtomicBool::new(false) }
    }
}

/// Wakes the loop serving the fewest connections to take what was queued.
pub fn notify(handles: &[Handle]) {
    if let Some(h) = handles.iter().min_by_key(|h| h.open.load(Ordering::Relaxed)) {
        let _ = h.waker.wake();
    }
}

/// Wakes every loop (the queue closed: they finish and exit when empty).
pub fn wake_all(handles: &[Handle]) {
    for h in handles {
        let _ = h.waker.wake();
    }
}

/// Tells every loop to close all its connections; returns how many were
/// open.
pub fn cut_all(handles: &[Handle]) -> usize {
    handles
        .iter()
        .map(|h| {
            h.cut.store(true, Ordering::Release);
            let _ = h.waker.wake();
            h.open.load(Ordering::Relaxed)
        })
        .sum()
}

/// Loops that serve at least one connection (the "busy threads" gauge).
pub fn busy_loops(handles: &[Handle]) -> usize {
    handles.iter().filter(|h| h.open.load(Ordering::Relaxed) > 0).count()
}

/// What a handler thread is serving, visible to the receiver's tick: the
/// fd (to cut it) and when the client last sent something (to time it out).
///
/// The idle timeout lives here rather than in SO_RCVTIMEO because a
/// receive timeout makes the kernel arm and cancel a timer every time a
/// handler blocks in read, once per echoed message; the tick checks every
/// connection four times a second for the price of a relaxed store per
/// message.
#[derive(Default)]
pub struct ConnSlot {
    /// The connection's fd, or None when the thread is idle. Locked only at
    /// connection start and end and by cuts: a cut and a close never race.
    fd: Mutex<Option<RawFd>>,
    /// Receiver tick of the client's last bytes.
    pub(super) last_active: AtomicU64,
    /// Why the connection was cut, if it was (the handler reports that
    /// instead of a clean end).
    cut_as: Mutex<Option<Ending>>,
}

impl ConnSlot {
    pub(super) fn open(&self, fd: RawFd, tick: u64) {
        self.last_active.store(tick, Ordering::Relaxed);
        *lock(&self.cut_as) = None;
        *lock(&self.fd) = Some(fd);
    }

    /// Forgets the fd (before it is closed); returns why it was cut, if it
    /// was.
    pub(super) fn close(&self) -> Option<Ending> {
        *lock(&self.fd) = None;
        lock(&self.cut_as).take()
    }

    /// Shuts the connection down, waking its handler; false if idle.
    pub(super) fn cut(&self, why: Ending) -> bool {
        let fd = lock(&self.fd);
        let Some(fd) = *fd else { return false };
        *lock(&self.cut_as) = Some(why);
        let _ = shutdown(fd, Shutdown::Both);
        true
    }
}

/// Every handler thread's slot, so the receiver can time out idle
/// connections and cut all of them on a drain deadline or fast stop.
#[derive(Default)]
pub struct OpenConnections {
    slots: Mutex<Vec<Arc<ConnSlot>>>,
}

impl OpenConnections {
    pub(super) fn register(&self) -> Arc<ConnSlot> {
        let slot = Arc::new(ConnSlot::default());
        lock(&self.slots).push(slot.clone());
        slot
    }

    pub(super) fn unregister(&self, slot: &Arc<ConnSlot>) {
        lock(&self.slots).retain(|s| !Arc::ptr_eq(s, slot));
    }

    /// Shuts every open connection down; their handlers then finish.
    pub fn cut_all(&self) -> usize {
        lock(&self.slots).iter().filter(|s| s.cut(Ending::Cut)).count()
    }

    /// Cuts connections whose client sent nothing for `idle_ticks` ticks.
    pub fn cut_idle(&self, now: u64, idle_ticks: u64) -> usize {
        lock(&self.slots)
            .iter()
            .filter(|s| now.saturating_sub(s.last_active.load(Ordering::Relaxed)) >= idle_ticks)
            .filter(|s| s.cut(Ending::IdleTimeout))
            .count()
    }
}

/// Locks, carrying on past poison: a panicked handler leaves plain data
/// behind, still consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
