//! The connection log (`access_log = true`): one line per connection a
//! worker closed or refused, written by a thread of its own so that no
//! echo ever waits for stderr.
//!
//! The handler thread or event loop that ends a connection formats its
//! line ([`logging::line`], so it is text or JSON as every other line, and
//! names that thread) and offers it to a bounded queue, which the writer
//! empties every 100 ms or once 256 lines wait. A line that finds
//! the queue full is dropped and counted (`echod_access_log_dropped_total`),
//! never waited for: when the log's reader (a pipe, the journal) falls
//! behind, echoes go on and the count says what the log lacks. The writer
//! thread takes whatever is queued and writes it straight to fd 2 (not
//! through std's stderr lock, which the logger's own lines take), in
//! batches of whole lines of at most PIPE_BUF bytes: the kernel writes
//! those to a pipe whole, so lines from several workers never splice.
//!
//! The log's stream is shared: every process of echod writes its own
//! lines (a master's warning, a worker's) to the same pipe or socket, and
//! those writes block when it is full. So the writer never fills it: it
//! writes only while the stream keeps `RESERVE` free ([`sys::stream_fill`]:
//! a pipe's or socket's unread bytes against its size), and otherwise waits,
//! while its queue fills and then drops. A reader that stalls for good
//! stops the connection log at once and the daemon's own lines only when
//! they alone have filled the reserve, as any daemon's would.
//!
//! The master's refusals at accept (`max_connections`,
//! `max_connections_per_ip` on plain listeners) are not here: the master
//! has no thread to write for it (DESIGN rule 1) and must not block on
//! stderr; they are counted and logged at warn level, paced.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::logging::{self, Value};
use crate::worker::counters::{Ending, Refusal};

/// Lines the queue holds before it drops: at about 200 bytes a line, under
/// 1 MiB per worker, and a few seconds of a very busy worker's churn.
const QUEUE_LINES: usize = 4096;

/// At most this many bytes per write(2): PIPE_BUF, so a batch of lines is
/// written to a pipe whole, never spliced with another writer's.
const BATCH_BYTES: usize = 4096;

/// What the writer leaves free in the log's pipe or socket for the
/// daemon's own lines (a quarter of a smaller one).
const RESERVE: usize = 16 * 1024;

/// How often the writer looks again while the stream has no room.
const ROOM_POLL: Duration = Duration::from_millis(10);

/// The writer is woken when this many lines wait, and otherwise looks
/// every `FLUSH_EVERY`: waking it for each line cost a context switch per
/// connection (measured: +26% server CPU per echo under churn, event mode),
/// and a line may well reach the log a tenth of a second late.
const WAKE_AT: usize = 256;
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// How one connection ended, as its line says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Ended(Ending),
    Refused(Refusal),
}

impl Reason {
    /// `reason=`: `closed`, `cut`, `reset`, `idle_timeout`, `write_timeout`,
    /// `error`, `limit` (`max_connections_per_ip`) or `proxy_KIND` (a bad or
    /// missing PROXY header, by the kind its counter uses).
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match self {
            Reason::Ended(e) => e.name().into(),
            Reason::Refused(Refusal::PerIp) => "limit".into(),
            Reason::Refused(Refusal::Header(kind)) => format!("proxy_{}", kind.name()).into(),
        }
    }
}

/// A connection's two ends, read when it arrives (a reset connection has
/// no peer address any more at its end).
#[derive(Debug, Clone, Copy, Default)]
pub struct Ends {
    /// The local address it came in on (the listener's port).
    pub local: Option<SocketAddr>,
    /// The TCP peer: the client, or on a PROXY listener the balancer.
    pub peer: Option<SocketAddr>,
    /// The client a PROXY header named (None on plain listeners, and for
    /// a header that names none or was refused before it named one).
    pub client: Option<SocketAddr>,
}

impl Ends {
    pub fn of(stream: &std::net::TcpStream) -> Ends {
        Ends { local: stream.local_addr().ok(), peer: stream.peer_addr().ok(), client: None }
    }
}

/// One finished connection.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub ends: Ends,
    pub lived: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub reason: Reason,
}

impl Entry {
    /// Its line: `connection` with listener, client (the PROXY source, or
    /// the peer), peer, duration, bytes both ways and reason.
    pub fn line(&self) -> String {
        let e = &self.ends;
        let reason = self.reason.name();
        logging::line(
            log::Level::Info,
            "connection",
            &[
                ("listener", Value::Addr(e.local)),
                ("client", Value::Addr(e.client.or(e.peer))),
                ("peer", Value::Addr(e.peer)),
                ("duration", Value::Duration(self.lived)),
                ("bytes_in", Value::Int(self.bytes_in)),
                ("bytes_out", Value::Int(self.bytes_out)),
                ("reason", Value::Text(&reason)),
            ],
        )
    }
}

/// A worker's connection log: the queue, its writer thread, and the count
/// of lines dropped.
pub struct AccessLog {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Mutex<Queue>,
    /// Signalled when lines arrive (the writer waits) and when the writer
    /// has written everything after `close` (the closer waits).
    changed: Condvar,
    /// Lines that found the queue full.
    dropped: AtomicU64,
    /// Lines the writer took off the queue and has not written yet: lost,
    /// and counted, if the worker exits first.
    in_flight: AtomicU64,
}

#[derive(Default)]
struct Queue {
    lines: VecDeque<String>,
    closing: bool,
    /// The writer has written what was queued at close and left.
    done: bool,
}

impl AccessLog {
    /// Starts the writer thread.
    pub fn start() -> std::io::Result<AccessLog> {
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            dropped: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        });
        let theirs = inner.clone();
        std::thread::Builder::new().name("access-log".into()).spawn(move || theirs.write_until_closed())?;
        Ok(AccessLog { inner })
    }

    /// Queues `entry`'s line, or drops and counts it if the queue is full.
    pub fn log(&self, entry: &Entry) {
        let line = entry.line();
        let mut q = self.inner.lock();
        if q.lines.len() >= QUEUE_LINES || q.closing {
            drop(q);
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.lines.push_back(line);
        let wake = q.lines.len() == WAKE_AT;
        drop(q);
        if wake {
            self.inner.changed.notify_one();
        }
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// At the worker's exit: lets the writer write what is queued, waiting
    /// at most `within` (a log that does not drain must not hold the exit;
    /// what is left then counts as dropped).
    pub fn close(&self, within: Duration) {
        let mut q = self.inner.lock();
        q.closing = true;
        self.inner.changed.notify_all();
        let deadline = std::time::Instant::now() + within;
        while !q.done {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                let lost = q.lines.len() as u64 + self.inner.in_flight.load(Ordering::Relaxed);
                self.inner.dropped.fetch_add(lost, Ordering::Relaxed);
                return;
            }
            q = match self.inner.changed.wait_timeout(q, left) {
                Ok((q, _)) => q,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer thread: waits for lines, writes them in batches.
    fn write_until_closed(&self) {
        let stream = {
            use std::os::fd::AsFd;
            crate::sys::stream_kind(std::io::stderr().as_fd())
        };
        let mut batch = Vec::with_capacity(BATCH_BYTES);
        loop {
            let mut q = self.lock();
            while q.lines.len() < WAKE_AT && !q.closing {
                let (next, waited) = match self.changed.wait_timeout(q, FLUSH_EVERY) {
                    Ok(v) => v,
                    Err(poisoned) => poisoned.into_inner(),
                };
                q = next;
                if waited.timed_out() && !q.lines.is_empty() {
                    break;
                }
            }
            if q.lines.is_empty() {
                q.done = true;
                drop(q);
                self.changed.notify_all();
                return;
            }
            let mut lines = 0;
            while let Some(line) = q.lines.front() {
                if !batch.is_empty() && batch.len() + line.len() > BATCH_BYTES {
                    break;
                }
                batch.extend_from_slice(line.as_bytes());
                q.lines.pop_front();
                lines += 1;
            }
            self.in_flight.store(lines, Ordering::Relaxed);
            drop(q);
            wait_for_room(stream, batch.len());
            if write_stderr(&batch).is_err() {
                // stderr is gone (closed, EPIPE): what it lacks is dropped.
                self.dropped.fetch_add(lines, Ordering::Relaxed);
            }
            self.in_flight.store(0, Ordering::Relaxed);
            batch.clear();
        }
    }
}

/// Waits until stderr's pipe or socket can take `len` more bytes and still
/// keep the reserve free for the daemon's own lines (at once for a file).
fn wait_for_room(stream: crate::sys::StreamKind, len: usize) {
    use std::os::fd::AsFd;
    let stderr = std::io::stderr();
    while let Some((queued, size)) = crate::sys::stream_fill(stderr.as_fd(), stream) {
        let reserve = RESERVE.min(size / 4);
        if size.saturating_sub(queued) >= len + reserve {
            return;
        }
        std::thread::sleep(ROOM_POLL);
    }
}

/// Writes all of `buf` to fd 2 with write(2), taking no lock.
fn write_stderr(mut buf: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    let stderr = std::io::stderr();
    while !buf.is_empty() {
        match nix::unistd::write(stderr.as_fd(), buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_protocol::HeaderError;

    #[test]
    fn a_line_names_both_ends_the_bytes_and_the_reason() {
        let ends = Ends {
            local: Some("127.0.0.1:7007".parse().unwrap()),
            peer: Some("10.0.0.2:41000".parse().unwrap()),
            client: Some("[2001:db8::7]:5555".parse().unwrap()),
        };
        let entry = Entry {
            ends,
            lived: Duration::from_millis(1234),
            bytes_in: 10,
            bytes_out: 9,
            reason: Reason::Ended(Ending::WriteTimeout),
        };
        let line = entry.line();
        assert!(
            line.ends_with(
                "] connection listener=127.0.0.1:7007 client=[2001:db8::7]:5555 peer=10.0.0.2:41000 \
                 duration=1.234 bytes_in=10 bytes_out=9 reason=write_timeout\n"
            ),
            "{line}"
        );
        let refused = Entry {
            ends: Ends { client: None, ..ends },
            reason: Reason::Refused(Refusal::Header(HeaderError::Untrusted)),
            ..entry
        };
        assert!(refused.line().contains(" client=10.0.0.2:41000 "), "the peer when no header named a client");
        assert!(refused.line().ends_with(" reason=proxy_untrusted\n"));
        assert_eq!(Reason::Refused(Refusal::PerIp).name(), "limit");
    }
}
