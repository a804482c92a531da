//! A worker's handler threads: one per connection being served.
//!
//! Threads are reused across connections: after serving one, a handler goes
//! back to the queue for the next, so connection churn does not pay for
//! thread creation. The pool starts with `min_spare_threads` and grows (up
//! to the worker's capacity) whenever more connections wait than threads
//! are idle, noticed by the receiver when it pushes and by a handler when it
//! pops; a thread idle for `thread_idle_timeout` exits while more than
//! `min_spare_threads` remain, as Apache's MaxSpareThreads.
//!
//! Stacks are small, and the echo buffer (one per thread, reused) is a
//! mapping of its own whose pages become resident only when written
//! (`sys::PageBuffer`), so thousands of connections cost little memory.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nix::sys::socket::{Shutdown, shutdown};

use crate::config::Transform;
use crate::ipc::{Notice, Origin};
use crate::worker::counters::{Ending, Tally};
use crate::worker::echo::{echo, ending_of};
use crate::worker::queue::Pop;
use crate::worker::{Worker, proxied};

/// Handler thread stack. The echo loop needs a few KiB (log formatting a few
/// more); only touched pages cost memory, but a small reservation keeps
/// thousands of threads within vm.max_map_count and address-space limits.
const STACK_SIZE: usize = 128 * 1024;

/// Receiver ticks (250 ms each) between counter flushes of a long-lived
/// connection: about once a second.
const FLUSH_TICKS: u64 = 4;

/// Echoes between a busy handler's heartbeat checks (see `Worker::beat`).
const BEAT_EVERY: u32 = 256;

/// Starts one more handler thread unless the worker is at capacity.
/// Returns Ok(false) at capacity.
pub fn spawn_handler(worker: &Arc<Worker>) -> io::Result<bool> {
    let claimed = worker
        .threads
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < worker.capacity).then_some(n + 1))
        .is_ok();
    if !claimed {
        return Ok(false);
    }
    let w = worker.clone();
    let spawned = std::thread::Builder::new().name("conn".into()).stack_size(STACK_SIZE).spawn(move || handler(w));
    match spawned {
        Ok(_) => Ok(true),
        Err(e) => {
            worker.threads.fetch_sub(1, Ordering::AcqRel);
            Err(e)
        }
    }
}

/// A handler thread's life: take a connection, serve it, repeat.
fn handler(w: Arc<Worker>) {
    // Throughput work that blocks after every echo: see sys::set_batch_scheduling.
    if let Err(e) = crate::sys::set_batch_scheduling() {
        log::debug!("SCHED_BATCH: {e}");
    }
    let mut buf = match crate::sys::PageBuffer::new(w.config.buffer_size) {
        Ok(b) => b,
        Err(e) => {
            log::error!("cannot map an echo buffer: {e}");
            w.threads.fetch_sub(1, Ordering::AcqRel);
            return;
        }
    };
    let retire_after = w.config.thread_idle_timeout.nonzero();
    let slot = w.open.register();
    loop {
        match w.queue.pop(retire_after) {
            Pop::Item((stream, origin), depth) => {
                if depth.needs_thread() {
                    // More waiting than idle threads: start a helper before
                    // serving. The receiver does this too, but under load it
                    // is one thread among thousands; spreading the spawning
                    // over the handlers lets the pool grow with demand.
                    let _ = spawn_handler(&w);
                }
                serve(&w, &slot, stream, origin, &mut buf);
            }
            Pop::TimedOut => {
                if retire_if_spare(&w) {
                    break;
                }
            }
            Pop::Closed => {
                w.threads.fetch_sub(1, Ordering::AcqRel);
                break;
            }
        }
    }
    w.open.unregister(&slot);
}

/// Leaves the pool if more than `min_spare_threads` would remain.
fn retire_if_spare(w: &Worker) -> bool {
    w.threads
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n > w.config.min_spare_threads).then(|| n - 1))
        .is_ok()
}

/// Serves one connection to its end and records it, giving back its
/// client's per-address charge.
fn serve(w: &Worker, slot: &ConnSlot, mut stream: TcpStream, origin: Origin, buf: &mut [u8]) {
    let started = Instant::now();
    w.busy.fetch_add(1, Ordering::Relaxed);
    let mut seen = w.ticks.load(Ordering::Relaxed);
    // Open first, so a drain deadline or fast stop can cut a connection
    // still sending its PROXY header.
    slot.open(stream.as_raw_fd(), seen);
    let mut tally = Tally::default();
    let (bucket, mut early) = match origin {
        Origin::Direct(bucket) => (Some(bucket), Vec::new()),
        Origin::Proxied => match proxied::handshake_blocking(w, &mut stream) {
            Ok(a) => (a.bucket, a.early),
            Err(_) => {
                // Counted (as finished) by `proxied`; nothing was charged.
                slot.close();
                drop(stream);
                w.busy.fetch_sub(1, Ordering::Release);
                slot_freed(w);
                return;
            }
        },
    };
    // Bytes that came with a PROXY header are the client's first message.
    let upper = w.config.transform == Transform::Upper;
    let early_end = proxied::echo_early(&mut stream, &mut early, upper, &mut tally).err().map(|e| ending_of(e.kind()));
    let mut next_flush = seen + FLUSH_TICKS;
    let mut echoes = 0u32;
    let ending = early_end.unwrap_or_else(|| {
        echo(&mut stream, buf, w.config.transform, &mut tally, |t| {
            echoes = echoes.wrapping_add(1);
            if echoes % BEAT_EVERY == 0 {
                w.beat();
            }
            // One relaxed load per echo; a store only when the tick moved.
            let now = w.ticks.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                slot.last_active.store(now, Ordering::Relaxed);
                if now >= next_flush {
                    w.counters.flush(t);
                    next_flush = now + FLUSH_TICKS;
                }
            }
        })
    });
    // Unregister before closing, so a cut never hits a reused fd number.
    let ending = slot.close().unwrap_or(ending);
    drop(stream);
    // Count and discharge before leaving `busy`: a draining worker exits
    // once nothing is busy, and must neither lose this connection's last
    // bytes nor leave its client charged in the scoreboard.
    w.counters.finish(&mut tally, ending, started.elapsed());
    if let Some(bucket) = bucket {
        w.scoreboard.discharge_ip(w.id, bucket);
    }
    w.busy.fetch_sub(1, Ordering::Release);
    log::trace!("connection closed: {ending:?}");
    slot_freed(w);
}

/// Tells the master a slot is free, if it is waiting for one.
fn slot_freed(w: &Worker) {
    if w.scoreboard.accept_paused() {
        // The master waits for capacity; a full channel means it will wake
        // anyway, so a failed notice loses nothing.
        let _ = w.channel.send_notice(Notice::SlotFreed);
    }
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
    last_active: AtomicU64,
    /// Why the connection was cut, if it was (the handler reports that
    /// instead of a clean end).
    cut_as: Mutex<Option<Ending>>,
}

impl ConnSlot {
    fn open(&self, fd: RawFd, tick: u64) {
        self.last_active.store(tick, Ordering::Relaxed);
        *lock(&self.cut_as) = None;
        *lock(&self.fd) = Some(fd);
    }

    /// Forgets the fd (before it is closed); returns why it was cut, if it
    /// was.
    fn close(&self) -> Option<Ending> {
        *lock(&self.fd) = None;
        lock(&self.cut_as).take()
    }

    /// Shuts the connection down, waking its handler; false if idle.
    fn cut(&self, why: Ending) -> bool {
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
    fn register(&self) -> Arc<ConnSlot> {
        let slot = Arc::new(ConnSlot::default());
        lock(&self.slots).push(slot.clone());
        slot
    }

    fn unregister(&self, slot: &Arc<ConnSlot>) {
        lock(&self.slots).retain(|s| !Arc::ptr_eq(s, slot));
    }

    /// Shuts every open connection down; their handlers then finish.
    pub fn cut_all(&self) -> usize {
        lock(&self.slots).iter().filter(|s| s.cut(Ending::Clean)).count()
    }

    /// Cuts connections whose client sent nothing for `idle_ticks` ticks.
    pub fn cut_idle(&self, now: u64, idle_ticks: u64) -> usize {
        lock(&self.slots)
            .iter()
            .filter(|s| now.saturating_sub(s.last_active.load(Ordering::Relaxed)) >= idle_ticks)
            .filter(|s| s.cut(Ending::Timeout))
            .count()
    }
}

/// Locks, carrying on past poison: a panicked handler leaves plain data
/// behind, still consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
