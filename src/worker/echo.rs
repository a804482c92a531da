//! The echo itself (RFC 862): read what the client sends, write it back.
//!
//! Blocking reads on the connection's own thread: one `read` into the
//! thread's buffer, then the same bytes written back before the next read.
//! Nothing is allocated, locked or counted in shared memory per read; the
//! handler counts into its private tally and hands it over at the end (or
//! once per `flush_due` tick on long connections).
//!
//! A client that half-closes (shutdown(SHUT_WR)) still gets every byte: each
//! read is fully written back before the next read, so by the time `read`
//! returns 0 nothing is owed. An idle client is cut by the worker's tick
//! (`pool::ConnSlot`).
//!
//! A client that stops reading is cut by `write_timeout`, which means what
//! it means in event mode: the connection's echo made no progress for that
//! long, progress being the kernel taking at least one byte of it when the
//! socket reported itself writable (nginx's `send_timeout`: the time since
//! the last successful write). Writes do not block (MSG_DONTWAIT: one call
//! when the socket takes it all); when it takes less, the thread waits for
//! POLLOUT — the readiness event mode waits for as EPOLLOUT — for what is
//! left of the timeout since the last byte went out, and gives up when that
//! runs out, without a last try.
//!
//! Why not SO_SNDTIMEO (it used to be): it bounds one blocking call, and a
//! call that took a few bytes before its time ran out returns them, so the
//! next call started a fresh timeout. Worse, each such retry found room
//! that no client made: on a window update Linux grows the send buffer
//! (autotuning, up to `tcp_wmem`'s maximum), which leaves the socket short
//! of writable but lets a write take a few hundred KiB that sit unsent.
//! Measured with `write_timeout = 1`: the server's calls took 1.5 KiB at
//! 1.0 s, ~270 KiB at 1.01 s, 3.5 KiB at 2.1 s, and the reset came 2.9 s
//! after the client last received anything (event mode: 0.8-1.0 s).
//! Waiting for writability and never retrying on expiry ignores that room,
//! in both modes, and it is bounded anyway (the buffer stops growing at its
//! maximum), so no client keeps a connection alive without reading: the
//! socket becomes writable only when the client has taken a good part of
//! what is queued.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{MsgFlags, send};

use crate::config::Transform;
use crate::worker::counters::{Ending, Tally};

/// Where the echo is written: a socket that can be written without
/// blocking and waited on for room.
pub trait Sink {
    /// Writes what the socket takes right now; Ok(0) when it takes nothing.
    fn write_now(&mut self, data: &[u8]) -> io::Result<usize>;
    /// Waits until the socket is writable (or has an error to report), for
    /// at most `at_most` (None: no limit); false if the time ran out or a
    /// signal interrupted the wait.
    fn wait_writable(&mut self, at_most: Option<Duration>) -> io::Result<bool>;
}

impl Sink for TcpStream {
    fn write_now(&mut self, data: &[u8]) -> io::Result<usize> {
        match send(self.as_raw_fd(), data, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    fn wait_writable(&mut self, at_most: Option<Duration>) -> io::Result<bool> {
        // Rounded up, so the wait never ends before the timeout.
        let timeout = at_most.map_or(PollTimeout::NONE, |d| {
            let ms = i32::try_from(d.as_millis().saturating_add(1)).unwrap_or(i32::MAX);
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::NONE)
        });
        let mut fds = [PollFd::new(self.as_fd(), PollFlags::POLLOUT)];
        match poll(&mut fds, timeout) {
            Ok(n) => Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => Ok(false), // wait again
            Err(e) => Err(e.into()),
        }
    }
}

/// Echoes until the client closes or an error ends the connection; a
/// write that makes no progress for `write_timeout` (None: no limit) ends
/// it as a timeout.
///
/// `flush_due` is polled after every echo and gets the tally when it says
/// so; the caller decides what "periodically" means.
pub fn echo<S: Read + Sink>(
    stream: &mut S,
    buf: &mut [u8],
    transform: Transform,
    write_timeout: Option<Duration>,
    tally: &mut Tally,
    mut flush_due: impl FnMut(&mut Tally),
) -> Ending {
    loop {
        let n = match stream.read(buf) {
            Ok(0) => return Ending::Closed,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return ending_of(e.kind()),
        };
        tally.bytes_in += n as u64;
        let data = &mut buf[..n];
        if transform == Transform::Upper {
            data.make_ascii_uppercase();
        }
        if let Err(e) = write_progressing(stream, data, write_timeout, tally) {
            return ending_of(e.kind());
        }
        flush_due(tally);
    }
}

/// Writes all of `data`, counting every byte the kernel took (also when a
/// later write fails), and fails with `TimedOut` once no byte went out for
/// `stall` (None: never).
pub(crate) fn write_progressing<S: Sink>(
    s: &mut S,
    mut data: &[u8],
    stall: Option<Duration>,
    tally: &mut Tally,
) -> io::Result<()> {
    // When the socket last took nothing after taking something: the start
    // of the current stall.
    let mut stalled_since: Option<Instant> = None;
    while !data.is_empty() {
        match s.write_now(data) {
            Ok(0) => {}
            Ok(n) => {
                tally.bytes_out += n as u64;
                data = &data[n..];
                stalled_since = None;
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let since = *stalled_since.get_or_insert_with(Instant::now);
        // Write again only once the socket says it is writable, never on
        // the chance that it takes something when the wait ran out: that
        // is when event mode writes (EPOLLOUT), and a retry would find the
        // room the kernel opens by growing the send buffer (autotuning,
        // on a window update) and count bytes that never reach the client
        // as progress (see the module doc).
        loop {
            let left = stall.map(|t| t.saturating_sub(since.elapsed()));
            if left.is_some_and(|l| l.is_zero()) {
                return Err(ErrorKind::TimedOut.into());
            }
            if s.wait_writable(left)? {
                break;
            }
        }
    }
    Ok(())
}

/// `write_all` that counts every byte the kernel took, also when a later
/// write fails: a client that resets mid-echo did receive (or at least was
/// sent) the first part, and `echod_bytes_sent_total` must say so.
pub(crate) fn write_counted<W: Write>(w: &mut W, mut data: &[u8], tally: &mut Tally) -> std::io::Result<()> {
    while !data.is_empty() {
        match w.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                tally.bytes_out += n as u64;
                data = &data[n..];
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How an I/O error ends a connection, for the error counters.
pub(crate) fn ending_of(kind: ErrorKind) -> Ending {
    match kind {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => Ending::Reset,
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Ending::WriteTimeout,
        _ => Ending::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{self, Cursor};

    /// An in-memory client: reads come from `input` in `chunk`-sized pieces,
    /// writes collect in `output`.
    struct Script {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
        chunk: usize,
        fail_write: Option<ErrorKind>,
        /// Writes fail (with `fail_write`) once this many bytes went out.
        fail_after: usize,
    }
    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            let n = b.len().min(self.chunk);
            self.input.read(&mut b[..n])
        }
    }
    impl Sink for Script {
        fn write_now(&mut self, b: &[u8]) -> io::Result<usize> {
            if let Some(k) = self.fail_write.filter(|_| self.output.len() >= self.fail_after) {
                return Err(k.into());
            }
            let n = b.len().min(3); // short writes: the writer must loop
            self.output.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn wait_writable(&mut self, _: Option<Duration>) -> io::Result<bool> {
            Ok(true)
        }
    }

    /// A client that takes `takes` bytes at each of its reads, `every`
    /// apart, then nothing: progress, then a stall.
    struct Trickle {
        takes: Vec<usize>,
        every: Duration,
        next: Instant,
        waits: usize,
    }
    impl Sink for Trickle {
        fn write_now(&mut self, b: &[u8]) -> io::Result<usize> {
            if Instant::now() < self.next || self.takes.is_empty() {
                return Ok(0);
            }
            self.next = Instant::now() + self.every;
            Ok(self.takes.remove(0).min(b.len()))
        }
        fn wait_writable(&mut self, at_most: Option<Duration>) -> io::Result<bool> {
            self.waits += 1;
            let room_at = if self.takes.is_empty() { Instant::now() + Duration::from_secs(3600) } else { self.next };
            let until = at_most.map_or(room_at, |t| room_at.min(Instant::now() + t));
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
            Ok(Instant::now() >= room_at)
        }
    }

    /// #27.12: the write timeout is time without progress, whatever the
    /// number of write calls: a client taking a few bytes every 30 ms is
    /// never cut by a 100 ms timeout, and is cut about 100 ms after it
    /// stops taking any (not 100 ms per call, as SO_SNDTIMEO was).
    #[test]
    fn the_write_timeout_counts_from_the_last_byte_taken() {
        let mut t = Trickle { takes: vec![2; 10], every: Duration::from_millis(30), next: Instant::now(), waits: 0 };
        let mut tally = Tally::default();
        let began = Instant::now();
        let r = write_progressing(&mut t, &[7u8; 20], Some(Duration::from_millis(100)), &mut tally);
        assert!(r.is_ok(), "progress every 30 ms is not a stall: {r:?}");
        assert_eq!(tally.bytes_out, 20);
        assert!(began.elapsed() >= Duration::from_millis(270), "{:?}", began.elapsed());
        let mut t = Trickle { takes: vec![2; 3], every: Duration::from_millis(30), next: Instant::now(), waits: 0 };
        let mut tally = Tally::default();
        let r = write_progressing(&mut t, &[7u8; 20], Some(Duration::from_millis(100)), &mut tally);
        let stalled_at = t.next - t.every; // the last byte taken
        assert_eq!(r.map_err(|e| e.kind()), Err(ErrorKind::TimedOut));
        assert_eq!(tally.bytes_out, 6, "what went out before the stall counts");
        assert!(stalled_at.elapsed() >= Duration::from_millis(100), "cut before the timeout");
        assert!(t.waits >= 3, "waited for room, not spun: {} waits", t.waits);
    }

    /// A socket that never reports itself writable, though a write would
    /// take everything after the first: room the send buffer's autotuning
    /// opened without the client taking a byte.
    struct GrownBuffer {
        tries: usize,
    }
    impl Sink for GrownBuffer {
        fn write_now(&mut self, b: &[u8]) -> io::Result<usize> {
            self.tries += 1;
            Ok(if self.tries == 1 { 0 } else { b.len() })
        }
        fn wait_writable(&mut self, at_most: Option<Duration>) -> io::Result<bool> {
            std::thread::sleep(at_most.unwrap_or(Duration::from_secs(3600)));
            Ok(false)
        }
    }

    /// #27.12: when the wait for room runs out, the echo ends; no last try
    /// takes the room a grown send buffer offers and counts it as progress
    /// (a fresh timeout each time, as with SO_SNDTIMEO's per-call retries).
    #[test]
    fn a_wait_that_runs_out_ends_the_echo_without_a_last_try() {
        let mut s = GrownBuffer { tries: 0 };
        let mut tally = Tally::default();
        let r = write_progressing(&mut s, &[7u8; 20], Some(Duration::from_millis(50)), &mut tally);
        assert_eq!(r.map_err(|e| e.kind()), Err(ErrorKind::TimedOut));
        assert_eq!((s.tries, tally.bytes_out), (1, 0), "wrote without the socket being writable");
    }

    #[test]
    fn echoes_every_byte_and_counts_them() {
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let mut s =
            Script { input: Cursor::new(data.clone()), output: vec![], chunk: 700, fail_write: None, fail_after: 0 };
        let mut tally = Tally::default();
        let mut flushes = 0;
        let end = echo(&mut s, &mut [0u8; 512], Transform::None, None, &mut tally, |_| flushes += 1);
        assert_eq!(end, Ending::Closed);
        assert_eq!(s.output, data);
        assert_eq!((tally.bytes_in, tally.bytes_out), (10_000, 10_000));
        assert_eq!(flushes, 10_000usize.div_ceil(512));
    }

    #[test]
    fn upper_changes_only_ascii_letters() {
        let mut s = Script {
            input: Cursor::new(b"abc\xffz-\x00q".to_vec()),
            output: vec![],
            chunk: 64,
            fail_write: None,
            fail_after: 0,
        };
        echo(&mut s, &mut [0u8; 64], Transform::Upper, None, &mut Tally::default(), |_| {});
        assert_eq!(s.output, b"ABC\xffZ-\x00Q");
    }

    #[test]
    fn errors_are_classified() {
        let mut s = Script {
            input: Cursor::new(b"x".to_vec()),
            output: vec![],
            chunk: 64,
            fail_write: Some(ErrorKind::BrokenPipe),
            fail_after: 0,
        };
        assert_eq!(echo(&mut s, &mut [0u8; 8], Transform::None, None, &mut Tally::default(), |_| {}), Ending::Reset);
        s = Script {
            input: Cursor::new(b"x".to_vec()),
            output: vec![],
            chunk: 64,
            fail_write: Some(ErrorKind::WouldBlock),
            fail_after: 0,
        };
        assert_eq!(
            echo(&mut s, &mut [0u8; 8], Transform::None, None, &mut Tally::default(), |_| {}),
            Ending::WriteTimeout
        );
    }

    #[test]
    fn bytes_written_before_a_failed_write_are_counted() {
        // Short writes of 3 bytes: 6 go out, then the client resets.
        let mut s = Script {
            input: Cursor::new(b"0123456789".to_vec()),
            output: vec![],
            chunk: 64,
            fail_write: Some(ErrorKind::ConnectionReset),
            fail_after: 6,
        };
        let mut tally = Tally::default();
        assert_eq!(echo(&mut s, &mut [0u8; 64], Transform::None, None, &mut tally, |_| {}), Ending::Reset);
        assert_eq!(s.output, b"012345");
        assert_eq!((tally.bytes_in, tally.bytes_out), (10, 6), "what went out before the reset counts");
    }
}
