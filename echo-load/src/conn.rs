//! One load-generating connection: a small state machine driven by its
//! thread's event loop, and the bookkeeping that gives every message exactly
//! one outcome.
//!
//! States: `Waiting` (its ramp-up slot or a reconnect delay) -> `Connecting`
//! -> `Open` (-> `Closing` in churn mode: half-closed after its one echo,
//! reading until the server closes, so bytes after the echo are caught).
//!
//! Messages are numbered per connection, and three cursors split them:
//! `head <= written <= issued`. `[head, written)` and a partly written one
//! are on the wire waiting for their echo; `[written, issued)` are issued
//! but not yet written. In open loop the unwritten ones survive a reconnect:
//! messages due during an outage are sent late and measured from when they
//! were due, so the schedule never pauses. The echo of `head` is compared
//! byte by byte as it arrives; the first wrong byte, or a byte the client
//! never sent, is one mismatch and the connection is reset (after a
//! duplicated or extra echo nothing later on that connection lines up).
//!
//! At the end of the window (open loop) a connection closes its sending:
//! what is not on the wire then is never written after it. Issued but
//! unwritten messages of an open connection go back to the schedule and
//! count as unsent with those never issued (the client did not send them
//! in time); a message partly written is finished (the server has part of
//! it); those held for a connection that is down at the end stay requests
//! and end unanswered (the server was not there to take them).
//!
//! A measured message ends in exactly one bucket: `responses` (with its
//! latency), `timeouts` (each one, its latency at least `--timeout`),
//! `lost` (on the wire when its connection failed, or echoed wrong) or, when
//! the run is over, `unanswered` (with its age). So
//! `requests = responses + timeouts + lost + unanswered`.

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::plan::{Options, Shared, Window};
use super::tally::{Counts, Tally};

/// How far message windows move inside the pool: payloads start at one of
/// this many offsets, so consecutive messages differ.
const SPREAD: usize = 4096;
/// Wait before reconnecting after a failed connect.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);
/// Line mode keeps this many distinct messages (fewer for large sizes, so
/// the pool stays within 16 MiB; at least two, so consecutive ones differ).
const LINE_MESSAGES: usize = 64;
/// Most messages one connection issues in one pass of its loop: a client
/// far behind its schedule still serves its other connections every pass,
/// and what it never got to shows as `unsent` instead of piling up.
const ISSUE_BATCH: u64 = 1024;
/// Messages per `writev`: due messages go out together, one system call for
/// many, which is most of what lets one thread offer high rates.
const WRITE_BATCH: usize = 64;
/// Stands in for "never" where an `Instant` is needed (a century ahead).
const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Random bytes shared by a thread's connections.
pub struct Pool {
    bytes: Vec<u8>,
    pub size: usize,
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

    /// Message `seq` of connection `id`; consecutive messages differ.
    fn message(&self, id: u64, seq: u64) -> &[u8] {
        let h = id.wrapping_mul(7919).wrapping_add(seq.wrapping_mul(104_729));
        let offset = match self.lines {
            Some(n) => (h % n as u64) as usize * self.size,
            None => (h % SPREAD as u64) as usize,
        };
        &self.bytes[offset..offset + self.size]
    }
}

/// What a connection needs from its thread for one step.
pub struct Ctx<'a> {
    pub opts: &'a Options,
    pub pool: &'a Pool,
    pub registry: &'a Registry,
    pub shared: &'a Shared,
    pub window: Window,
    pub now: Instant,
    /// One tally per server address (`--addr` may repeat).
    pub tallies: &'a mut [Tally],
}

impl Ctx<'_> {
    /// Whether events happening now (connects, resets, bytes) count.
    fn measuring(&self) -> bool {
        self.now >= self.window.start
    }

    /// Counts an event of the connection to address `addr`, if measuring.
    fn event(&mut self, addr: usize, f: impl FnOnce(&mut Counts)) {
        if self.measuring() {
            f(&mut self.tallies[addr].counts);
        }
    }
}

/// Why a connection is dropped.
enum Fault {
    Io(ErrorKind),
    /// An echoed byte differed from the byte sent.
    Wrong,
    /// A byte arrived that was never sent (extra or duplicated echo, or
    /// anything after the echo in churn mode).
    Extra,
}

/// Where a message's time comes from.
enum Clock {
    /// Open loop: message `k` is due at `t0 + k × period` (seconds), on
    /// time or not, connected or not.
    Schedule { t0: Instant, period: f64 },
    /// Closed loop: when each message from `head` on was issued.
    Sent(VecDeque<Instant>),
}

#[derive(Clone, Copy)]
enum State {
    Waiting { at: Instant },
    Connecting { since: Instant },
    Open { since: Instant },
    Closing { since: Instant },
}

pub struct Conn {
    token: Token,
    /// Index of its server address in `Options::addrs`.
    pub addr: usize,
    id: u64,
    stream: Option<TcpStream>,
    state: State,
    /// The oldest message without an outcome, and how many bytes of its
    /// echo have arrived.
    head: u64,
    received: usize,
    /// Messages before `written` are written whole; `partial` bytes of the
    /// next one are written too.
    written: u64,
    partial: usize,
    /// Messages before `issued` exist.
    issued: u64,
    /// The first measured message: times only grow, so every message from
    /// here on is measured and none before it is.
    measured_from: Option<u64>,
    clock: Clock,
    /// Set at the end of the window: nothing from this message on is
    /// written (the run may still read echoes of what went before).
    send_limit: Option<u64>,
}

impl Conn {
    /// `schedule`: open loop, the first message's due time and the seconds
    /// between messages.
    pub fn new(index: usize, addr: usize, id: u64, connect_at: Instant, schedule: Option<(Instant, f64)>) -> Conn {
        Conn {
            token: Token(index),
            addr,
            id,
            stream: None,
            state: State::Waiting { at: connect_at },
            head: 0,
            received: 0,
            written: 0,
            partial: 0,
            issued: 0,
            measured_from: None,
            clock: match schedule {
                Some((t0, period)) => Clock::Schedule { t0, period },
                None => Clock::Sent(VecDeque::new()),
            },
            send_limit: None,
        }
    }

    /// When message `seq` was due (open loop) or issued (closed loop).
    fn time(&self, seq: u64) -> Instant {
        match &self.clock {
            Clock::Schedule { t0, period } => {
                let after = Duration::try_from_secs_f64(seq as f64 * period).unwrap_or(FAR).min(FAR);
                *t0 + after
            }
            Clock::Sent(times) => match seq.checked_sub(self.head).and_then(|i| times.get(i as usize)) {
                Some(t) => *t,
                None => Instant::now(),
            },
        }
    }

    fn measured(&self, seq: u64) -> bool {
        self.measured_from.is_some_and(|m| seq >= m)
    }

    fn open_loop(&self) -> bool {
        matches!(self.clock, Clock::Schedule { .. })
    }

    /// The end of what is on the wire: written whole, or partly.
    fn on_wire_end(&self) -> u64 {
        self.written + u64::from(self.partial > 0)
    }

    /// Whether the thread must keep running for this connection: measured
    /// messages without an outcome, or a connect in progress (dropped
    /// half-open, it would look like a client that never spoke, which a
    /// PROXY listener counts as an error).
    pub fn unfinished(&self) -> bool {
        (self.issued > self.head && self.measured(self.issued - 1)) || matches!(self.state, State::Connecting { .. })
    }

    /// Time-driven work: connect when due, issue the messages that are due,
    /// give up on those that waited too long. Returns when it next needs the
    /// clock.
    pub fn tick(&mut self, ctx: &mut Ctx) -> Option<Instant> {
        let issuing = ctx.window.end.is_none_or(|e| ctx.now < e) && !ctx.shared.tickets_out(ctx.opts.count);
        if let State::Waiting { at } = self.state {
            // After the end a connection comes back only for messages
            // already issued (open loop): nothing new starts.
            if ctx.now >= at && (issuing || (self.issued > self.written && self.send_limit.is_none())) {
                self.connect(ctx);
            }
        }
        if self.issue_due(ctx) {
            if let Err(e) = self.flush(ctx) {
                self.fail(Fault::Io(e.kind()), ctx);
            }
        }
        self.check_timeout(ctx);
        let mut wake = self.timeout_at(ctx.opts.timeout);
        if let State::Waiting { at } = self.state {
            wake = earliest(wake, Some(at));
        }
        if issuing && self.open_loop() {
            wake = earliest(wake, Some(self.time(self.issued)));
        }
        wake
    }

    /// Open loop: issues every message due by now (at most a batch).
    fn issue_due(&mut self, ctx: &mut Ctx) -> bool {
        if !self.open_loop() {
            return false;
        }
        let mut n = 0;
        while n < ISSUE_BATCH {
            let due = self.time(self.issued);
            if due > ctx.now || !self.issue(due, ctx) {
                break;
            }
            n += 1;
        }
        n > 0
    }

    /// Issues the next message, timed at `t`, if the run still wants it.
    fn issue(&mut self, t: Instant, ctx: &mut Ctx) -> bool {
        if self.send_limit.is_some() || ctx.window.end.is_some_and(|e| t >= e) {
            return false;
        }
        let measured = t >= ctx.window.start;
        if measured {
            if let Some(count) = ctx.opts.count {
                if !ctx.shared.take_ticket(count) {
                    return false; // the run's --count is used up
                }
            }
            self.measured_from.get_or_insert(self.issued);
            let tally = &mut ctx.tallies[self.addr];
            tally.counts.requests += 1;
            if self.open_loop() {
                let late = ctx.now.saturating_duration_since(t).as_micros() as u64;
                let _ = tally.lateness.record(late);
            }
        }
        if let Clock::Sent(times) = &mut self.clock {
            times.push_back(t);
        }
        self.issued += 1;
        true
    }

    fn connect(&mut self, ctx: &mut Ctx) {
        if let Ok(mut s) = TcpStream::connect(ctx.opts.addrs[self.addr]) {
            if ctx.registry.register(&mut s, self.token, Interest::READABLE | Interest::WRITABLE).is_ok() {
                self.stream = Some(s);
                self.state = State::Connecting { since: ctx.now };
                return;
            }
        }
        ctx.event(self.addr, |c| c.connect_errors += 1);
        self.state = State::Waiting { at: ctx.now + RECONNECT_DELAY };
    }

    /// Readiness on the socket.
    pub fn on_event(&mut self, buf: &mut [u8], ctx: &mut Ctx) {
        if let State::Connecting { .. } = self.state {
            let Some(s) = &self.stream else { return };
            match (s.take_error(), s.peer_addr()) {
                (Ok(None), Ok(_)) => {
                    if let Err(e) = self.opened(ctx) {
                        return self.fail(Fault::Io(e.kind()), ctx);
                    }
                }
                (Ok(None), Err(e)) if e.kind() == ErrorKind::NotConnected => return, // not yet
                _ => {
                    ctx.event(self.addr, |c| c.connect_errors += 1);
                    self.disconnect(ctx, ctx.now + RECONNECT_DELAY);
                    return;
                }
            }
        }
        if let State::Open { .. } | State::Closing { .. } = self.state {
            if let Err(f) = self.read(buf, ctx) {
                return self.fail(f, ctx);
            }
        }
        if let State::Open { .. } = self.state {
            if let Err(e) = self.flush(ctx) {
                self.fail(Fault::Io(e.kind()), ctx);
            }
        }
    }

    fn opened(&mut self, ctx: &mut Ctx) -> std::io::Result<()> {
        self.state = State::Open { since: ctx.now };
        ctx.event(self.addr, |c| c.connects += 1);
        if let Some(s) = &mut self.stream {
            let _ = s.set_nodelay(true);
            if let Some(version) = ctx.opts.proxy {
                // A few dozen bytes into a fresh socket's empty send buffer:
                // written whole at once, or the connection is broken.
                let header = proxy_protocol::encode(version, s.local_addr()?, s.peer_addr()?);
                if s.write(&header)? != header.len() {
                    return Err(ErrorKind::WriteZero.into());
                }
            }
        }
        if !self.open_loop() {
            let n = if ctx.opts.churn { 1 } else { ctx.opts.pipeline.max(1) };
            for _ in 0..n {
                if !self.issue(ctx.now, ctx) {
                    break;
                }
            }
        }
        self.flush(ctx)
    }

    /// Writes issued messages, a batch per system call, until the socket is
    /// full or nothing is left.
    fn flush(&mut self, ctx: &mut Ctx) -> std::io::Result<()> {
        if !matches!(self.state, State::Open { .. }) {
            return Ok(());
        }
        let size = ctx.pool.size;
        let limit = self.send_limit.map_or(self.issued, |l| l.min(self.issued));
        while self.written < limit {
            let Some(stream) = &mut self.stream else { return Ok(()) };
            let result = {
                let mut slices = [IoSlice::new(&[]); WRITE_BATCH];
                let mut k = 0;
                let mut seq = self.written;
                while k < WRITE_BATCH && seq < limit {
                    let m = ctx.pool.message(self.id, seq);
                    slices[k] = IoSlice::new(if k == 0 { &m[self.partial..] } else { m });
                    k += 1;
                    seq += 1;
                }
                stream.write_vectored(&slices[..k])
            };
            match result {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    ctx.event(self.addr, |c| c.bytes_sent += n as u64);
                    let total = self.partial + n;
                    self.written += (total / size) as u64;
                    self.partial = total % size;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads and verifies echoes until the socket is empty.
    fn read(&mut self, buf: &mut [u8], ctx: &mut Ctx) -> Result<(), Fault> {
        let size = ctx.pool.size;
        loop {
            let Some(stream) = &mut self.stream else { return Ok(()) };
            let n = match stream.read(buf) {
                Ok(0) => return Err(Fault::Io(ErrorKind::UnexpectedEof)),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fault::Io(e.kind())),
            };
            ctx.event(self.addr, |c| c.bytes_received += n as u64);
            let mut data = &buf[..n];
            while !data.is_empty() {
                if let State::Closing { .. } = self.state {
                    return Err(Fault::Extra);
                }
                // Bytes of the head message the server has been given.
                let sent = match self.head.cmp(&self.written) {
                    std::cmp::Ordering::Less => size,
                    std::cmp::Ordering::Equal => self.partial,
                    std::cmp::Ordering::Greater => 0,
                };
                let k = sent.saturating_sub(self.received).min(data.len());
                if k == 0 {
                    return Err(Fault::Extra);
                }
                let expect = &ctx.pool.message(self.id, self.head)[self.received..self.received + k];
                if data[..k] != *expect {
                    return Err(Fault::Wrong);
                }
                self.received += k;
                data = &data[k..];
                if self.received == size {
                    self.complete(ctx).map_err(|e| Fault::Io(e.kind()))?;
                }
            }
        }
    }

    /// The head message's echo is complete.
    fn complete(&mut self, ctx: &mut Ctx) -> std::io::Result<()> {
        let seq = self.head;
        if self.measured(seq) {
            let us = ctx.now.saturating_duration_since(self.time(seq)).as_micros() as u64;
            let t = &mut ctx.tallies[self.addr];
            t.counts.responses += 1;
            let _ = t.latency.record(us.max(1));
        }
        if let Clock::Sent(times) = &mut self.clock {
            times.pop_front();
        }
        self.head += 1;
        self.received = 0;
        if ctx.opts.churn {
            // Half-close and read to the server's close: bytes after the
            // echo are caught, not left unread in a closed socket.
            if let Some(s) = &self.stream {
                s.shutdown(Shutdown::Write)?;
            }
            self.state = State::Closing { since: ctx.now };
        } else if !self.open_loop() {
            self.issue(ctx.now, ctx);
        }
        Ok(())
    }

    /// Drops the connection for `fault`: what was on the wire is lost (in
    /// closed loop, everything issued); open loop keeps its unwritten
    /// messages for the next connection.
    fn fail(&mut self, fault: Fault, ctx: &mut Ctx) {
        match fault {
            // The server closed after the echo in churn mode: the clean end.
            Fault::Io(ErrorKind::UnexpectedEof) if matches!(self.state, State::Closing { .. }) => {
                self.disconnect(ctx, ctx.now);
                return;
            }
            Fault::Io(
                ErrorKind::ConnectionReset
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof
                | ErrorKind::ConnectionAborted,
            ) => ctx.event(self.addr, |c| c.resets += 1),
            Fault::Io(_) => ctx.event(self.addr, |c| c.other_errors += 1),
            Fault::Wrong | Fault::Extra => ctx.event(self.addr, |c| c.mismatches += 1),
        }
        self.settle_in_flight(None, ctx);
        self.disconnect(ctx, ctx.now);
    }

    /// Gives the messages on the wire (closed loop: all issued) an outcome:
    /// a timeout when `timeout` is given, else lost.
    fn settle_in_flight(&mut self, timeout: Option<Duration>, ctx: &mut Ctx) {
        let end = if self.open_loop() { self.on_wire_end() } else { self.issued };
        for seq in self.head..end {
            if !self.measured(seq) {
                continue;
            }
            let age = ctx.now.saturating_duration_since(self.time(seq));
            let t = &mut ctx.tallies[self.addr];
            match timeout {
                Some(limit) => {
                    t.counts.timeouts += 1;
                    let _ = t.latency.record(age.max(limit).as_micros() as u64);
                }
                None => t.counts.lost += 1,
            }
        }
        if let Clock::Sent(times) = &mut self.clock {
            times.drain(..(end - self.head) as usize);
        }
        self.head = end;
        self.written = self.written.max(end);
        self.partial = 0;
        self.received = 0;
    }

    /// When the head message (or a connect, or a churn close) times out.
    fn timeout_at(&self, timeout: Duration) -> Option<Instant> {
        match self.state {
            State::Connecting { since } | State::Closing { since } => Some(since + timeout),
            // A message's timeout runs from when it could reach the server:
            // one due during an outage gets its full time after the
            // reconnect (its latency still counts from when it was due).
            State::Open { since }
                if self.head < self.on_wire_end() || (!self.open_loop() && self.head < self.issued) =>
            {
                Some(self.time(self.head).max(since) + timeout)
            }
            _ => None,
        }
    }

    /// Gives up on a connect, a churn close or a message that took too long.
    fn check_timeout(&mut self, ctx: &mut Ctx) {
        let Some(at) = self.timeout_at(ctx.opts.timeout) else { return };
        if ctx.now < at {
            return;
        }
        match self.state {
            State::Connecting { .. } => ctx.event(self.addr, |c| c.connect_errors += 1),
            // The echo came back whole but the server never closed.
            State::Closing { .. } => ctx.event(self.addr, |c| c.other_errors += 1),
            _ => self.settle_in_flight(Some(ctx.opts.timeout), ctx),
        }
        self.disconnect(ctx, ctx.now);
    }

    /// The end of the window (open loop): from now on nothing new is
    /// written. A message partly written is finished; the rest of what an
    /// open connection issued but did not write goes back to the schedule,
    /// so [`finish`](Self::finish) counts it as unsent; what a connection
    /// that is down holds stays issued and ends unanswered.
    pub fn close_sending(&mut self, ctx: &mut Ctx) {
        if !self.open_loop() || self.send_limit.is_some() {
            return;
        }
        let limit = self.on_wire_end();
        self.send_limit = Some(limit);
        if !matches!(self.state, State::Open { .. }) {
            return;
        }
        let first = self.measured_from.map_or(self.issued, |m| m.max(limit));
        ctx.tallies[self.addr].counts.requests -= self.issued.saturating_sub(first);
        self.issued = limit.min(self.issued);
        if self.measured_from.is_some_and(|m| m >= self.issued) {
            self.measured_from = None; // none of its measured messages went out
        }
    }

    /// The run is over: what is still without an outcome is unanswered
    /// (with its age), and in open loop what was due but never issued is
    /// counted as unsent.
    pub fn finish(&mut self, ctx: &mut Ctx) {
        for seq in self.head..self.issued {
            if self.measured(seq) {
                let age = ctx.now.saturating_duration_since(self.time(seq)).as_micros() as u64;
                let t = &mut ctx.tallies[self.addr];
                t.counts.unanswered += 1;
                let _ = t.unanswered_age.record(age.max(1));
            }
        }
        self.head = self.issued;
        if let (Clock::Schedule { .. }, Some(end)) = (&self.clock, ctx.window.end) {
            let scheduled = self.first_due_from(end).saturating_sub(self.first_due_from(ctx.window.start));
            let requests = self.measured_from.map_or(0, |m| self.issued - m);
            ctx.tallies[self.addr].counts.unsent += scheduled.saturating_sub(requests);
        }
        self.disconnect(ctx, ctx.now + FAR);
    }

    /// Open loop: the first message due at or after `x`.
    fn first_due_from(&self, x: Instant) -> u64 {
        let Clock::Schedule { t0, period } = self.clock else { return 0 };
        let mut k = (x.saturating_duration_since(t0).as_secs_f64() / period).ceil() as u64;
        while k > 0 && self.time(k - 1) >= x {
            k -= 1;
        }
        while self.time(k) < x {
            k += 1;
        }
        k
    }

    fn disconnect(&mut self, ctx: &mut Ctx, reconnect_at: Instant) {
        if let Some(mut s) = self.stream.take() {
            let _ = ctx.registry.deregister(&mut s);
        }
        self.state = State::Waiting { at: reconnect_at };
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
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
                let m = pool.message(9, seq);
                assert_eq!(m.len(), size);
                assert_eq!(m[size - 1], b'\n', "size {size}");
                assert!(!m[..size - 1].contains(&b'\n'), "one newline only");
            }
            if size > 1 {
                assert_ne!(pool.message(9, 0), pool.message(9, 1));
            }
        }
        let pool = Pool::new(64, 3, false);
        assert_ne!(pool.message(1, 0), pool.message(1, 1), "messages differ");
    }

    #[test]
    fn an_open_loop_schedule_counts_what_is_due_in_a_window() {
        let t0 = Instant::now();
        let c = Conn::new(0, 0, 0, t0, Some((t0, 0.001)));
        assert_eq!(c.first_due_from(t0), 0);
        assert_eq!(c.first_due_from(t0 + Duration::from_micros(1)), 1);
        assert_eq!(c.first_due_from(t0 + Duration::from_millis(1)), 1);
        assert_eq!(c.first_due_from(t0 + Duration::from_secs(3)), 3000);
        // A rate far below one message per run never panics.
        let slow = Conn::new(0, 0, 0, t0, Some((t0, 1e12)));
        assert_eq!(slow.first_due_from(t0 + Duration::from_secs(5)), 1);
    }

    /// What a connection needs to be driven outside a run: options for one
    /// address, 8-byte messages, a 1 s timeout.
    struct Env {
        opts: Options,
        pool: Pool,
        poll: mio::Poll,
        shared: Shared,
        tallies: Vec<Tally>,
    }

    impl Env {
        fn new(rate: Option<f64>) -> Env {
            let opts = Options { rate, ..Options::for_tests() };
            let pool = Pool::new(8, 1, false);
            Env { opts, pool, poll: mio::Poll::new().unwrap(), shared: Shared::default(), tallies: vec![Tally::new()] }
        }

        fn ctx(&mut self, window: Window, now: Instant) -> Ctx<'_> {
            let registry = self.poll.registry();
            Ctx {
                opts: &self.opts,
                pool: &self.pool,
                registry,
                shared: &self.shared,
                window,
                now,
                tallies: &mut self.tallies,
            }
        }

        fn counts(&self) -> Counts {
            self.tallies[0].counts
        }
    }

    /// An open-loop connection due every millisecond from `t0`, open, with
    /// messages `[head, written)` written whole, `partial` bytes of the
    /// next, and `issued` issued, all measured.
    fn open_loop(t0: Instant, head: u64, written: u64, partial: usize, issued: u64) -> Conn {
        let mut c = Conn::new(0, 0, 7, t0, Some((t0, 0.001)));
        c.state = State::Open { since: t0 };
        (c.head, c.written, c.partial, c.issued, c.measured_from) = (head, written, partial, issued, Some(0));
        c
    }

    /// Each way a connection fails lands in its own counter; the messages on
    /// the wire (open loop: not the unwritten ones) are lost, each once.
    #[test]
    fn each_fault_is_counted_in_its_own_bucket_and_loses_what_was_on_the_wire() {
        let t0 = Instant::now();
        let window = Window { start: t0, end: None };
        type Field = fn(&Counts) -> u64;
        let cases: [(Fault, Field); 7] = [
            (Fault::Io(ErrorKind::ConnectionReset), |c| c.resets),
            (Fault::Io(ErrorKind::BrokenPipe), |c| c.resets),
            (Fault::Io(ErrorKind::UnexpectedEof), |c| c.resets),
            (Fault::Io(ErrorKind::ConnectionAborted), |c| c.resets),
            (Fault::Io(ErrorKind::TimedOut), |c| c.other_errors),
            (Fault::Wrong, |c| c.mismatches),
            (Fault::Extra, |c| c.mismatches),
        ];
        for (fault, field) in cases {
            let mut env = Env::new(Some(1000.0));
            let mut c = open_loop(t0, 2, 4, 3, 10);
            c.fail(fault, &mut env.ctx(window, t0 + Duration::from_millis(20)));
            let k = env.counts();
            assert_eq!(field(&k), 1, "{k:?}");
            assert_eq!(k.resets + k.other_errors + k.mismatches, 1, "one bucket only: {k:?}");
            // Messages 2, 3 (whole) and 4 (partly written) were on the wire.
            assert_eq!(k.lost, 3, "{k:?}");
            assert_eq!((c.head, c.written, c.partial, c.issued), (5, 5, 0, 10), "the unwritten wait for a reconnect");
            assert!(matches!(c.state, State::Waiting { .. }));
        }
    }

    /// Closed loop loses everything it issued; messages before the first
    /// measured one are not counted; a churn connection's close after its
    /// echo is its clean end.
    #[test]
    fn closed_loop_loses_all_it_issued_and_unmeasured_messages_count_nothing() {
        let t0 = Instant::now();
        let window = Window { start: t0, end: None };
        let mut env = Env::new(None);
        let mut c = Conn::new(0, 0, 7, t0, None);
        c.state = State::Open { since: t0 };
        c.clock = Clock::Sent([t0; 5].into_iter().collect());
        (c.head, c.written, c.issued, c.measured_from) = (0, 1, 5, Some(2));
        c.fail(Fault::Io(ErrorKind::ConnectionReset), &mut env.ctx(window, t0));
        assert_eq!((env.counts().lost, env.counts().resets), (3, 1), "messages 2..5 of 0..5: {:?}", env.counts());
        assert_eq!(c.head, 5);

        let mut env = Env::new(None);
        let mut c = Conn::new(0, 0, 7, t0, None);
        c.state = State::Closing { since: t0 };
        c.fail(Fault::Io(ErrorKind::UnexpectedEof), &mut env.ctx(window, t0));
        assert_eq!(env.counts(), Counts::default(), "a churn close is not an error");
        assert!(matches!(c.state, State::Waiting { .. }));
    }

    /// A timeout gives up every message on the wire, each counted, each
    /// with a latency of at least the timeout; before the timeout nothing.
    #[test]
    fn a_timeout_counts_each_message_on_the_wire_at_least_the_timeout() {
        let t0 = Instant::now();
        let window = Window { start: t0, end: None };
        let mut env = Env::new(Some(1000.0));
        let mut c = open_loop(t0, 0, 3, 0, 6);
        c.check_timeout(&mut env.ctx(window, t0 + Duration::from_millis(999)));
        assert_eq!(env.counts().timeouts, 0, "not yet");
        c.check_timeout(&mut env.ctx(window, t0 + Duration::from_millis(1500)));
        let t = &env.tallies[0];
        assert_eq!(t.counts.timeouts, 3, "{:?}", t.counts);
        assert_eq!(t.latency.len(), 3);
        assert!(t.latency.min() >= 1_000_000, "{}", t.latency.min());
        assert_eq!((c.head, c.issued), (3, 6), "the unwritten are kept");
    }

    /// #27.13: at the end an open connection finishes the message it is
    /// writing and gives the rest back (they become unsent); a connection
    /// that is down keeps what it holds (unanswered). Nothing is issued or
    /// written after that.
    #[test]
    fn closing_the_sending_gives_back_the_unwritten_of_an_open_connection_only() {
        let t0 = Instant::now();
        let end = t0 + Duration::from_millis(10);
        let window = Window { start: t0, end: Some(end) };
        let mut env = Env::new(Some(1000.0));
        env.tallies[0].counts.requests = 10;
        let mut c = open_loop(t0, 2, 4, 3, 10);
        c.close_sending(&mut env.ctx(window, end));
        assert_eq!((c.issued, c.send_limit), (5, Some(5)), "messages 0-4 are on the wire");
        assert_eq!(env.counts().requests, 5);
        assert!(!c.issue(t0, &mut env.ctx(window, end)), "nothing is issued after the end");
        c.finish(&mut env.ctx(window, end));
        // Ten were due in the window: the five given back are unsent; the
        // three on the wire without an echo are unanswered.
        assert_eq!((env.counts().unsent, env.counts().unanswered), (5, 3), "{:?}", env.counts());

        let mut env = Env::new(Some(1000.0));
        env.tallies[0].counts.requests = 10;
        let mut c = open_loop(t0, 4, 4, 0, 10);
        c.state = State::Waiting { at: t0 };
        c.close_sending(&mut env.ctx(window, end));
        assert_eq!((c.issued, c.send_limit, env.counts().requests), (10, Some(4), 10));
        c.tick(&mut env.ctx(window, end + Duration::from_millis(1)));
        assert!(matches!(c.state, State::Waiting { .. }), "no reconnect after the end to send them");
        c.finish(&mut env.ctx(window, end));
        assert_eq!((env.counts().unsent, env.counts().unanswered), (0, 6), "{:?}", env.counts());
    }

    /// Closed loop has no schedule: closing the sending changes nothing.
    #[test]
    fn closing_the_sending_leaves_closed_loop_alone() {
        let t0 = Instant::now();
        let window = Window { start: t0, end: Some(t0) };
        let mut env = Env::new(None);
        let mut c = Conn::new(0, 0, 7, t0, None);
        c.state = State::Open { since: t0 };
        (c.written, c.issued, c.measured_from) = (0, 2, Some(0));
        c.close_sending(&mut env.ctx(window, t0));
        assert_eq!((c.issued, c.send_limit), (2, None));
    }

    /// A connected pair: the client side as echo-load's connection, the
    /// server side to write "echoes" with.
    fn connected(c: &mut Conn, env: &Env) -> std::net::TcpStream {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        client.set_nonblocking(true).unwrap();
        let mut s = TcpStream::from_std(client);
        env.poll.registry().register(&mut s, c.token, Interest::READABLE).unwrap();
        c.stream = Some(s);
        l.accept().unwrap().0
    }

    /// Reads until `want` responses or a fault (bounded).
    fn read_until(c: &mut Conn, env: &mut Env, window: Window, want: u64) -> Result<(), Fault> {
        let mut buf = [0u8; 256];
        for _ in 0..1000 {
            c.read(&mut buf, &mut env.ctx(window, Instant::now()))?;
            if env.counts().responses >= want {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// An echo is compared byte by byte: intact it is a response, a wrong
    /// byte is `Wrong`, a byte beyond what was sent is `Extra`.
    #[test]
    fn echoes_are_classified_byte_by_byte() {
        let t0 = Instant::now();
        let window = Window { start: t0, end: None };
        for (what, mangle) in [("intact", 0usize), ("wrong", 1), ("extra", 2)] {
            let mut env = Env::new(Some(1000.0));
            let mut c = open_loop(t0, 0, 2, 0, 2);
            let mut peer = connected(&mut c, &env);
            let mut echo = [env.pool.message(7, 0), env.pool.message(7, 1)].concat();
            match mangle {
                1 => echo[11] ^= 1,
                2 => echo.push(b'+'),
                _ => {}
            }
            peer.write_all(&echo).unwrap();
            let r = read_until(&mut c, &mut env, window, if mangle == 2 { 3 } else { 2 });
            let k = env.counts();
            match (mangle, r) {
                (0, Ok(())) => assert_eq!((k.responses, c.head, k.bytes_received), (2, 2, 16), "{what}"),
                (1, Err(Fault::Wrong)) => assert_eq!((k.responses, c.head), (1, 1), "{what}: the first was intact"),
                (2, Err(Fault::Extra)) => assert_eq!(k.responses, 2, "{what}"),
                (_, r) => panic!("{what}: {:?}", r.err().map(|f| matches!(f, Fault::Wrong))),
            }
        }
    }

    /// A reset from the server is a reset, not a quiet socket and not an
    /// end of file: the read gives it back as it came.
    #[test]
    fn a_reset_under_a_read_is_reported_as_a_reset() {
        let t0 = Instant::now();
        let window = Window { start: t0, end: None };
        let mut env = Env::new(Some(1000.0));
        let mut c = open_loop(t0, 0, 1, 0, 1);
        let peer = connected(&mut c, &env);
        socket2::SockRef::from(&peer).set_linger(Some(Duration::ZERO)).unwrap();
        drop(peer); // an RST, not a FIN
        let r = read_until(&mut c, &mut env, window, 1);
        assert!(
            matches!(r, Err(Fault::Io(ErrorKind::ConnectionReset))),
            "{:?}",
            r.err().map(|f| match f {
                Fault::Io(k) => format!("{k:?}"),
                _ => "not an I/O fault".to_string(),
            })
        );
    }

    /// A connect, or a churn connection's wait for the server's close, that
    /// takes the whole timeout is counted once in its own bucket, exactly
    /// at the timeout and not before.
    #[test]
    fn a_connect_or_a_close_that_takes_the_timeout_counts_once() {
        let t0 = Instant::now();
        let window = Window { start: t0, end: None };
        let timeout = Duration::from_secs(1);
        type Field = fn(&Counts) -> u64;
        let cases: [(State, Field); 2] = [
            (State::Connecting { since: t0 }, |k| k.connect_errors),
            (State::Closing { since: t0 }, |k| k.other_errors),
        ];
        for (state, field) in cases {
            let mut env = Env::new(None);
            let mut c = Conn::new(0, 0, 7, t0, None);
            c.state = state;
            assert_eq!(c.timeout_at(timeout), Some(t0 + timeout));
            c.check_timeout(&mut env.ctx(window, t0 + timeout - Duration::from_nanos(1)));
            assert_eq!(env.counts(), Counts::default(), "not before the timeout");
            c.check_timeout(&mut env.ctx(window, t0 + timeout));
            let k = env.counts();
            assert_eq!((field(&k), k.errors()), (1, 1), "at the timeout, once: {k:?}");
            assert!(matches!(c.state, State::Waiting { .. }), "and it starts over");
        }
    }

    /// An open connection's timer runs while a message is on the wire, or
    /// (closed loop) issued and not yet written; open loop, a message not
    /// yet written has no server to wait for.
    #[test]
    fn the_timer_runs_for_what_the_server_holds() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(1);
        let closed = |head, written, issued| {
            let mut c = Conn::new(0, 0, 7, t0, None);
            c.state = State::Open { since: t0 };
            c.clock = Clock::Sent([t0; 4].into_iter().collect());
            (c.head, c.written, c.issued, c.measured_from) = (head, written, issued, Some(0));
            c
        };
        assert_eq!(closed(0, 0, 1).timeout_at(timeout), Some(t0 + timeout), "issued, not written");
        assert_eq!(closed(0, 1, 1).timeout_at(timeout), Some(t0 + timeout), "on the wire");
        assert_eq!(closed(1, 1, 1).timeout_at(timeout), None, "answered: nothing to wait for");
        assert_eq!(open_loop(t0, 0, 0, 0, 1).timeout_at(timeout), None, "open loop, issued, not written");
        assert_eq!(open_loop(t0, 0, 0, 3, 1).timeout_at(timeout), Some(t0 + timeout), "partly written");
    }

    /// The first message due at or after an instant is exact at every due
    /// time and a nanosecond either side, for periods a float divides
    /// inexactly, so the estimate's corrections are exercised both ways.
    #[test]
    fn the_first_due_message_is_exact_at_every_boundary() {
        let t0 = Instant::now();
        let ns = Duration::from_nanos(1);
        for period in [0.001, 0.1, 1.0 / 3.0, 7e-6, 0.3, 1.0 / 7.0, 2.5e-4] {
            let c = Conn::new(0, 0, 0, t0, Some((t0, period)));
            for k in 1..3000u64 {
                let due = c.time(k);
                let strictly_after = |x: Instant| (k..k + 2).find(|&j| c.time(j) >= x).unwrap();
                assert_eq!(c.first_due_from(due), k, "at due time {k}, period {period}");
                assert_eq!(c.first_due_from(due + ns), strictly_after(due + ns), "just after {k}, period {period}");
                if c.time(k - 1) < due - ns {
                    assert_eq!(c.first_due_from(due - ns), k, "just before {k}, period {period}");
                }
            }
        }
    }
}
