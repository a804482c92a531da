//! One load-generating connection: a small state machine driven by its
//! thread's event loop.
//!
//! `Waiting` (until its ramp-up slot or a reconnect delay) -> `Connecting` ->
//! `Open`. While open it holds a queue of messages: the first `write_idx`
//! are fully written and wait for their echo; the rest are still being
//! written. Echoed bytes are matched against the head of the queue, so
//! pipelined echoes are verified in order.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::{Counts, Options, Tally};

/// How far message windows move inside the pool: payloads start at one of
/// this many offsets, so consecutive messages differ.
const SPREAD: usize = 4096;
/// Wait before reconnecting after a failed connect.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// Line mode keeps this many distinct messages (fewer for large sizes, so
/// the pool stays within 16 MiB; at least two, so consecutive ones differ).
const LINE_MESSAGES: usize = 64;

/// Random bytes shared by a thread's connections.
pub struct Pool {
    bytes: Vec<u8>,
    size: usize,
    /// Line mode: the pool is this many whole messages back to back.
    lines: Option<usize>,
}

impl Pool {
    /// `lines`: every payload is one line, random bytes without '\n' ending
    /// in '\n', for line-based echo servers (Apache's mod_echo echoes only
    /// complete lines, one write per line).
    pub fn new(size: usize, seed: u64, lines: bool) -> Pool {
        let count = lines.then(|| (16 << 20) / size.max(1)).map(|n| n.clamp(2, LINE_MESSAGES));
        let len = count.map_or(size + SPREAD, |n| n * size);
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        let mut bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        if count.is_some() {
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = if i % size == size - 1 {
                    b'\n'
                } else if *b == b'\n' {
                    b'.'
                } else {
                    *b
                };
            }
        }
        Pool { bytes, size, lines: count }
    }

    fn message(&self, offset: usize) -> &[u8] {
        &self.bytes[offset..offset + self.size]
    }

    /// A message start for (connection, sequence number); consecutive
    /// messages of a connection differ.
    fn offset(&self, id: u64, seq: u64) -> usize {
        let h = id.wrapping_mul(7919).wrapping_add(seq.wrapping_mul(104_729));
        match self.lines {
            Some(n) => (h % n as u64) as usize * self.size,
            None => (h % SPREAD as u64) as usize,
        }
    }
}

/// Where a thread records what happens (only while measuring).
pub struct Sink<'a> {
    /// One tally per server address (`--addr` may repeat).
    pub tallies: &'a mut [Tally],
    /// The address of the connection being handled.
    pub addr: usize,
    pub measuring: bool,
}

impl Sink<'_> {
    pub fn count(&mut self, f: impl FnOnce(&mut Counts)) {
        if self.measuring {
            f(&mut self.tallies[self.addr].counts);
        }
    }
}

struct Message {
    offset: usize,
    /// Send time (closed loop) or scheduled time (open loop): latency is
    /// measured from here.
    t: Instant,
    written: usize,
    received: usize,
    bad: bool,
}

enum State {
    Waiting { at: Instant },
    Connecting { since: Instant },
    Open,
}

pub struct Conn {
    token: Token,
    /// Index of its server address in `Options::addrs`.
    pub addr: usize,
    id: u64,
    stream: Option<TcpStream>,
    state: State,
    queue: VecDeque<Message>,
    /// Messages [0, write_idx) are fully written.
    write_idx: usize,
    seq: u64,
    /// Open loop: seconds between this connection's messages, and when the
    /// next is due.
    period: Option<Duration>,
    next_due: Option<Instant>,
    /// Open loop: first message offset from the start (spreads schedules).
    phase: Option<Duration>,
}

impl Conn {
    pub fn new(
        index: usize,
        addr: usize,
        id: u64,
        connect_at: Instant,
        phase: Option<Duration>,
        rate: Option<f64>,
    ) -> Conn {
        Conn {
            token: Token(index),
            addr,
            id,
            stream: None,
            state: State::Waiting { at: connect_at },
            queue: VecDeque::new(),
            write_idx: 0,
            seq: 0,
            period: rate.filter(|r| *r > 0.0).map(|r| Duration::from_secs_f64(1.0 / r)),
            next_due: None,
            phase,
        }
    }

    /// Time-driven work: connect when due, enqueue scheduled messages.
    /// Returns when it next needs the clock.
    pub fn due(
        &mut self,
        opts: &Options,
        pool: &Pool,
        registry: &Registry,
        now: Instant,
        sink: &mut Sink,
    ) -> Option<Instant> {
        match self.state {
            State::Waiting { at } if now >= at => {
                self.connect(opts, registry, now, sink);
                None
            }
            State::Waiting { at } => Some(at),
            State::Connecting { .. } => None,
            State::Open => {
                let (period, mut due) = (self.period?, self.next_due?);
                let mut added = false;
                while due <= now {
                    self.push(pool, due);
                    due += period;
                    added = true;
                }
                self.next_due = Some(due);
                if added {
                    if let Err(e) = self.flush(pool, sink) {
                        self.fail(e.kind(), registry, now, sink);
                    }
                }
                Some(due)
            }
        }
    }

    fn connect(&mut self, opts: &Options, registry: &Registry, now: Instant, sink: &mut Sink) {
        if let Ok(mut s) = TcpStream::connect(opts.addrs[self.addr]) {
            if registry.register(&mut s, self.token, Interest::READABLE | Interest::WRITABLE).is_ok() {
                self.stream = Some(s);
                self.state = State::Connecting { since: now };
                return;
            }
        }
        sink.count(|c| c.connect_errors += 1);
        self.state = State::Waiting { at: now + RECONNECT_DELAY };
    }

    /// Readiness on the socket.
    pub fn on_event(
        &mut self,
        opts: &Options,
        pool: &Pool,
        registry: &Registry,
        buf: &mut [u8],
        now: Instant,
        sink: &mut Sink,
    ) {
        if let State::Connecting { .. } = self.state {
            let Some(s) = &self.stream else { return };
            match (s.take_error(), s.peer_addr()) {
                (Ok(None), Ok(_)) => {
                    if let Err(e) = self.opened(opts, pool, now, sink) {
                        return self.fail(e.kind(), registry, now, sink);
                    }
                }
                (Ok(None), Err(e)) if e.kind() == ErrorKind::NotConnected => return, // not yet
                _ => {
                    sink.count(|c| c.connect_errors += 1);
                    self.close(registry);
                    self.state = State::Waiting { at: now + RECONNECT_DELAY };
                    return;
                }
            }
        }
        if !matches!(self.state, State::Open) {
            return;
        }
        if let Err(kind) = self.read(opts, pool, registry, buf, now, sink) {
            self.fail(kind, registry, now, sink);
            return;
        }
        if matches!(self.state, State::Open) {
            if let Err(e) = self.flush(pool, sink) {
                self.fail(e.kind(), registry, now, sink);
            }
        }
    }

    fn opened(&mut self, opts: &Options, pool: &Pool, now: Instant, sink: &mut Sink) -> std::io::Result<()> {
        self.state = State::Open;
        sink.count(|c| c.connects += 1);
        if let Some(s) = &mut self.stream {
            let _ = s.set_nodelay(true);
            if let Some(version) = opts.proxy {
                // A few dozen bytes into a fresh socket's empty send buffer:
                // written whole at once, or the connection is broken.
                let header = crate::proxy::encode(version, s.local_addr()?, s.peer_addr()?);
                if s.write(&header)? != header.len() {
                    return Err(ErrorKind::WriteZero.into());
                }
            }
        }
        if self.period.is_some() {
            // Keep the schedule across reconnects; start it on first connect.
            let first = now + self.phase.take().unwrap_or_default();
            self.next_due = Some(self.next_due.map_or(first, |d| d.max(now)));
        } else {
            let n = if opts.churn { 1 } else { opts.pipeline.max(1) };
            (0..n).for_each(|_| self.push(pool, now));
        }
        Ok(())
    }

    fn push(&mut self, pool: &Pool, t: Instant) {
        let offset = pool.offset(self.id, self.seq);
        self.seq += 1;
        self.queue.push_back(Message { offset, t, written: 0, received: 0, bad: false });
    }

    /// Writes queued messages until the socket is full.
    fn flush(&mut self, pool: &Pool, sink: &mut Sink) -> std::io::Result<()> {
        let Some(stream) = &mut self.stream else { return Ok(()) };
        while let Some(m) = self.queue.get_mut(self.write_idx) {
            let data = &pool.message(m.offset)[m.written..];
            match stream.write(data) {
                Ok(n) => {
                    m.written += n;
                    sink.count(|c| c.bytes_sent += n as u64);
                    if m.written == pool.size {
                        self.write_idx += 1;
                        sink.count(|c| c.requests += 1);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads and verifies echoes until the socket is empty.
    fn read(
        &mut self,
        opts: &Options,
        pool: &Pool,
        registry: &Registry,
        buf: &mut [u8],
        now: Instant,
        sink: &mut Sink,
    ) -> Result<(), ErrorKind> {
        loop {
            let Some(stream) = &mut self.stream else { return Ok(()) };
            let n = match stream.read(buf) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.kind()),
            };
            sink.count(|c| c.bytes_received += n as u64);
            let mut data = &buf[..n];
            while !data.is_empty() {
                let Some(m) = self.queue.front_mut() else {
                    // Bytes nobody asked for.
                    sink.count(|c| c.mismatches += 1);
                    return Err(ErrorKind::InvalidData);
                };
                let expect = &pool.message(m.offset)[m.received..];
                let k = expect.len().min(data.len());
                if data[..k] != expect[..k] {
                    m.bad = true;
                }
                m.received += k;
                data = &data[k..];
                if m.received == pool.size {
                    self.complete(opts, pool, registry, now, sink);
                    if !matches!(self.state, State::Open) {
                        return Ok(()); // churn: closed after its one echo
                    }
                }
            }
        }
    }

    /// The head message's echo is complete.
    fn complete(&mut self, opts: &Options, pool: &Pool, registry: &Registry, now: Instant, sink: &mut Sink) {
        let Some(m) = self.queue.pop_front() else { return };
        self.write_idx = self.write_idx.saturating_sub(1);
        let us = now.saturating_duration_since(m.t).as_micros() as u64;
        if sink.measuring {
            let t = &mut sink.tallies[sink.addr];
            t.counts.responses += 1;
            if m.bad {
                t.counts.mismatches += 1;
            }
            let _ = t.latency.record(us.max(1));
        }
        if opts.churn {
            self.close(registry);
            self.state = State::Waiting { at: now };
        } else if self.period.is_none() {
            self.push(pool, now);
        }
    }

    /// Gives up on messages that waited too long (and on slow connects).
    pub fn check_timeout(&mut self, opts: &Options, registry: &Registry, now: Instant, sink: &mut Sink) {
        let late = match self.state {
            State::Connecting { since } => now.duration_since(since) > opts.timeout,
            State::Open => self.queue.front().is_some_and(|m| now.saturating_duration_since(m.t) > opts.timeout),
            State::Waiting { .. } => false,
        };
        if late {
            match self.state {
                State::Connecting { .. } => sink.count(|c| c.connect_errors += 1),
                _ => sink.count(|c| c.timeouts += 1),
            }
            self.close(registry);
            self.state = State::Waiting { at: now };
        }
    }

    /// An I/O error: count it, drop the connection, reconnect.
    fn fail(&mut self, kind: ErrorKind, registry: &Registry, now: Instant, sink: &mut Sink) {
        match kind {
            ErrorKind::ConnectionReset
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionAborted => sink.count(|c| c.resets += 1),
            ErrorKind::InvalidData => {} // counted as a mismatch already
            _ => sink.count(|c| c.other_errors += 1),
        }
        self.close(registry);
        self.state = State::Waiting { at: now };
    }

    fn close(&mut self, registry: &Registry) {
        if let Some(mut s) = self.stream.take() {
            let _ = registry.deregister(&mut s);
        }
        self.queue.clear();
        self.write_idx = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_mode_messages_are_single_lines() {
        for size in [1, 2, 63, 64, 65, 4096] {
            let pool = Pool::new(size, 3, true);
            for seq in 0..200 {
                let m = pool.message(pool.offset(9, seq));
                assert_eq!(m.len(), size);
                assert_eq!(m[size - 1], b'\n', "size {size}");
                assert!(!m[..size - 1].contains(&b'\n'), "one newline only");
            }
            if size > 1 {
                assert_ne!(pool.message(pool.offset(9, 0)), pool.message(pool.offset(9, 1)));
            }
        }
        let pool = Pool::new(64, 3, false);
        assert_ne!(pool.message(pool.offset(1, 0)), pool.message(pool.offset(1, 1)), "messages differ");
    }
}
