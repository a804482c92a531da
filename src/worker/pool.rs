//! A worker's handler threads: one per connection being served.
//!
//! Threads are reused across connections: after serving one, a handler goes
//! back to the queue for the next, so connection churn does not pay for
//! thread creation. The pool starts with `min_spare_threads` and grows (up
//! to the worker's capacity) whenever more connections wait than threads
//! are idle, noticed by the receiver when it pushes and by a handler when it
//! pops, and whenever fewer than `min_spare_threads` would be left idle; a
//! thread idle for `thread_idle_timeout` exits while more than
//! `min_spare_threads` idle ones remain (Apache's MinSpareThreads: spares
//! on top of the busy threads).
//!
//! Stacks are small, and the echo buffer (one per thread, reused) is a
//! mapping of its own whose pages become resident only when written
//! (`sys::PageBuffer`), so thousands of connections cost little memory.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::config::Transform;
use crate::ipc::Origin;
use crate::worker::access::Reason;
use crate::worker::counters::Tally;
use crate::worker::echo::{echo, ending_of};
use crate::worker::handles::ConnSlot;
use crate::worker::proxied;
use crate::worker::queue::Pop;
use crate::worker::shared::Shared;

/// Handler thread stack. The echo loop needs a few KiB (log formatting a few
/// more); only touched pages cost memory, but a small reservation keeps
/// thousands of threads within vm.max_map_count and address-space limits.
const STACK_SIZE: usize = 128 * 1024;

/// Receiver ticks (250 ms each) between counter flushes of a long-lived
/// connection: about once a second.
const FLUSH_TICKS: u64 = 4;

/// Echoes between a busy handler's heartbeat checks (see `Shared::beat`).
const BEAT_EVERY: u32 = 256;

/// Starts one more handler thread unless the worker is at capacity.
/// Returns Ok(false) at capacity.
pub fn spawn_handler(worker: &Arc<Shared>) -> io::Result<bool> {
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
fn handler(w: Arc<Shared>) {
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
                if depth.needs_thread() || depth.idle < w.config.min_spare_threads {
                    // More waiting than idle threads, or fewer idle ones
                    // left than min_spare_threads: start a helper before
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

/// Leaves the pool if more than `min_spare_threads` *idle* threads would
/// remain (Apache's MinSpareThreads: spares kept ready on top of the busy
/// ones, not a floor on the whole pool). Idle is alive minus busy, this
/// thread included; the update on `threads` serialises threads retiring
/// at once, so they never take the spares below the minimum together.
fn retire_if_spare(w: &Shared) -> bool {
    w.threads
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            let idle = n.saturating_sub(w.busy.load(Ordering::Acquire));
            (idle > w.config.min_spare_threads).then(|| n - 1)
        })
        .is_ok()
}

/// Serves one connection to its end and records it, giving back its
/// client's per-address charge.
fn serve(w: &Shared, slot: &ConnSlot, mut stream: TcpStream, origin: Origin, buf: &mut [u8]) {
    let started = Instant::now();
    w.busy.fetch_add(1, Ordering::Relaxed);
    let mut seen = w.ticks.load(Ordering::Relaxed);
    // Open first, so a drain deadline or fast stop can cut a connection
    // still sending its PROXY header.
    slot.open(stream.as_raw_fd(), seen);
    let mut ends = w.ends_of(&stream);
    let mut tally = Tally::default();
    let (charge, mut early) = match origin {
        Origin::Direct(charge) => (Some(charge), Vec::new()),
        Origin::Proxied => match proxied::handshake_blocking(w, &mut stream) {
            Ok(a) => {
                if let Some(ends) = ends.as_deref_mut() {
                    ends.client = a.client;
                }
                (a.charge, a.early)
            }
            Err(refused) => {
                // Counted (as finished) by `proxied`; nothing was charged.
                if let Some(ends) = ends.as_deref_mut() {
                    ends.client = refused.client;
                }
                w.log_connection(ends.as_deref(), started, (0, 0), Reason::Refused(refused.why));
                slot.close();
                drop(stream);
                w.busy.fetch_sub(1, Ordering::Release);
                w.slot_freed();
                return;
            }
        },
    };
    // Bytes that came with a PROXY header are the client's first message.
    let upper = w.config.transform == Transform::Upper;
    let early_end = proxied::echo_early(&mut stream, &mut early, upper, &mut tally).err().map(|e| ending_of(e.kind()));
    let mut next_flush = seen + FLUSH_TICKS;
    let mut echoes = 0u32;
    // What earlier flushes took from the tally: with it, the connection's
    // own byte counts for its log line.
    let mut flushed = Tally::default();
    let ending = early_end.unwrap_or_else(|| {
        echo(&mut stream, buf, w.config.transform, w.config.write_timeout.nonzero(), &mut tally, |t| {
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
                    flushed.bytes_in += t.bytes_in;
                    flushed.bytes_out += t.bytes_out;
                    w.counters.flush(t);
                    next_flush = now + FLUSH_TICKS;
                }
            }
        })
    });
    // Unregister before closing, so a cut never hits a reused fd number.
    let ending = slot.close().unwrap_or(ending);
    drop(stream);
    let bytes = (flushed.bytes_in + tally.bytes_in, flushed.bytes_out + tally.bytes_out);
    // Count and discharge before leaving `busy`: a draining worker exits
    // once nothing is busy, and must neither lose this connection's last
    // bytes nor leave its client charged in the scoreboard.
    w.counters.finish(&mut tally, ending, started.elapsed());
    if let Some(charge) = charge {
        w.scoreboard.discharge(w.id, charge);
    }
    // Logged while still busy: a drain that ends when nothing is busy
    // closes the log after this line, not before it.
    w.log_connection(ends.as_deref(), started, bytes, Reason::Ended(ending));
    w.busy.fetch_sub(1, Ordering::Release);
    log::trace!("connection closed: {ending:?}");
    w.slot_freed();
}
