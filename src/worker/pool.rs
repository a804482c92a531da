//! A worker's handler threads: one per connection being served.
//!
//! Threads are reused across connections: after serving one, a handler goes
//! back to the queue for the next, so connection churn does not pay for
//! thread creation. The pool starts with `min_spare_threads`, grows when the
//! receiver pushes a connection that no idle thread is waiting for (up to
//! the worker's capacity), and a thread idle for `thread_idle_timeout` exits
//! while more than `min_spare_threads` remain, as Apache's MaxSpareThreads.
//!
//! Stacks are small (the echo buffer is on the heap, one per thread, reused)
//! so thousands of connections cost little memory.

use std::collections::HashSet;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nix::sys::socket::{Shutdown, shutdown};

use crate::ipc::Notice;
use crate::worker::Worker;
use crate::worker::counters::Tally;
use crate::worker::echo::echo;
use crate::worker::queue::Pop;

/// Handler thread stack. The echo loop needs a few KiB (log formatting a few
/// more); only touched pages cost memory, but a small reservation keeps
/// thousands of threads within vm.max_map_count and address-space limits.
const STACK_SIZE: usize = 128 * 1024;

/// Receiver ticks (250 ms each) between counter flushes of a long-lived
/// connection: about once a second.
const FLUSH_TICKS: u64 = 4;

/// Starts one more handler thread unless the worker is at capacity.
/// Returns Ok(false) at capacity.
pub fn spawn_handler(worker: &Arc<Worker>) -> io::Result<bool> {
    let claimed = worker
        .threads
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < worker.capacity).then_some(n + 1)
        })
        .is_ok();
    if !claimed {
        return Ok(false);
    }
    let w = worker.clone();
    let spawned = std::thread::Builder::new()
        .name("conn".into())
        .stack_size(STACK_SIZE)
        .spawn(move || handler(w));
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
    let mut buf = vec![0u8; w.config.buffer_size];
    let retire_after = w.config.thread_idle_timeout.nonzero();
    loop {
        match w.queue.pop(retire_after) {
            Pop::Item(stream) => serve(&w, stream, &mut buf),
            Pop::TimedOut => {
                if retire_if_spare(&w) {
                    return;
                }
            }
            Pop::Closed => break,
        }
    }
    w.threads.fetch_sub(1, Ordering::AcqRel);
}

/// Leaves the pool if more than `min_spare_threads` would remain.
fn retire_if_spare(w: &Worker) -> bool {
    w.threads
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n > w.config.min_spare_threads).then(|| n - 1)
        })
        .is_ok()
}

/// Serves one connection to its end and records it.
fn serve(w: &Worker, mut stream: TcpStream, buf: &mut [u8]) {
    let started = Instant::now();
    let fd = stream.as_raw_fd();
    w.busy.fetch_add(1, Ordering::Relaxed);
    w.open.insert(fd);
    let mut tally = Tally::default();
    let mut next_flush = w.ticks.load(Ordering::Relaxed) + FLUSH_TICKS;
    let ending = echo(&mut stream, buf, w.config.transform, &mut tally, |t| {
        let now = w.ticks.load(Ordering::Relaxed);
        if now >= next_flush {
            w.counters.flush(t);
            next_flush = now + FLUSH_TICKS;
        }
    });
    // Unregister before closing, so a forced close never hits a reused fd.
    w.open.remove(fd);
    drop(stream);
    w.busy.fetch_sub(1, Ordering::Relaxed);
    w.counters.finish(&mut tally, ending, started.elapsed());
    log::trace!("connection closed: {ending:?}");
    if w.scoreboard.accept_paused() {
        // The master waits for capacity; a full channel means it will wake
        // anyway, so a failed notice loses nothing.
        let _ = w.channel.send_notice(Notice::SlotFreed);
    }
}

/// The fds of connections being served, so a drain deadline or fast stop can
/// cut them: `shutdown(2)` wakes a thread blocked in read or write.
///
/// Handlers remove their fd under the lock *before* closing it, and cuts
/// happen under the same lock, so a cut never reaches a reused fd number.
#[derive(Default)]
pub struct OpenConnections {
    fds: Mutex<HashSet<RawFd>>,
}

impl OpenConnections {
    fn insert(&self, fd: RawFd) {
        self.lock().insert(fd);
    }

    fn remove(&self, fd: RawFd) {
        self.lock().remove(&fd);
    }

    /// Shuts every open connection down; their handlers then finish.
    pub fn cut_all(&self) -> usize {
        let fds = self.lock();
        for &fd in fds.iter() {
            let _ = shutdown(fd, Shutdown::Both);
        }
        fds.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<RawFd>> {
        self.fds.lock().unwrap_or_else(|e| e.into_inner())
    }
}
