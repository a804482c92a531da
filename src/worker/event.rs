//! The event handler (`handler = "event"`): a few threads, each running one
//! mio poll over many connections, as nginx and Apache's event MPM do.
//!
//! It plugs into the same worker as the thread handler: connections still
//! arrive through the receiver and the bounded [`queue`](super::queue), are
//! counted in the same locked [`Counters`](super::counters::Counters), obey
//! the same idle and write timeouts, and stop by the same drain. Only what
//! takes a connection off the queue differs: the receiver pushes, then wakes
//! the least-loaded loop ([`notify`]), which takes its share of the queue
//! and registers each connection in its poll.
//!
//! The data path per message is one `read` into the loop's buffer and one
//! `write` of the same bytes, straight from that buffer: no copy, no
//! allocation, no lock. A read shorter than the buffer drained the socket
//! (a later arrival raises a new edge), so the loop does not pay a third
//! system call to see EAGAIN; except after the client's FIN, an error, or
//! TCP urgent data (EPOLLPRI), when the kernel may stop a read short with
//! bytes still queued and no new edge to come: then the loop reads until
//! EAGAIN (`Conn::read_to_block`). Only when the client does not take the whole
//! echo does the remainder move to a buffer of the connection's own; the
//! connection then stops reading until it is written, so a client that never
//! reads holds at most one `buffer_size` here, and the write timeout runs
//! from that moment. Idle connections hold no buffer at all, which is what
//! lets one worker keep tens of thousands of them.
//!
//! Fairness: a connection is read at most [`READ_BUDGET`] times per turn;
//! if it still has data it goes on a ready list served after the other
//! events, so one client streaming megabytes cannot starve the rest.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream as StdStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::config::Transform;
use crate::ipc::Origin;
use crate::scoreboard::Charge;
use crate::worker::access::{Ends, Reason};
use crate::worker::counters::{Ending, Refusal, Tally};
use crate::worker::echo::ending_of;
use crate::worker::handles::{self, Handle};
use crate::worker::proxied::{self, Refused};
use crate::worker::queue::Pop;
use crate::worker::shared::{Shared, TICK};
use proxy_protocol::{Handshake, HeaderError, Step};

/// Token of each loop's waker; connections use their slab index.
const WAKER: Token = Token(usize::MAX);

/// Reads per connection per turn before others get theirs.
const READ_BUDGET: usize = 16;

/// Events taken per `epoll_wait`.
const EVENTS: usize = 1024;

/// Receiver ticks between flushes of a loop's byte counts into the worker's
/// counters (about once a second, as the thread handler does).
const FLUSH_TICKS: u64 = 4;

/// Creates the polls and their handles before the worker's shared state
/// exists (the handles live in it; each poll moves into its thread).
pub fn prepare(loops: usize) -> io::Result<(Vec<Handle>, Vec<Poll>)> {
    let mut handles = Vec::with_capacity(loops);
    let mut polls = Vec::with_capacity(loops);
    for _ in 0..loops {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        handles.push(Handle::new(waker));
        polls.push(poll);
    }
    Ok((handles, polls))
}

/// Starts loop `index` on its own thread and returns once that thread runs.
///
/// The worker reports Ready after its loops are spawned; waiting here for
/// the thread to start means Ready promises loops that exist, named and
/// about to poll, not threads the kernel has yet to schedule (a test that
/// counted `event-` threads right after start saw two of three under load).
pub fn spawn(w: &Arc<Shared>, index: usize, poll: Poll) -> io::Result<()> {
    let w2 = w.clone();
    let (started, running) = std::sync::mpsc::sync_channel::<()>(1);
    w.threads.fetch_add(1, Ordering::AcqRel);
    let spawned = std::thread::Builder::new().name(format!("event-{index}")).spawn(move || {
        let event_loop = EventLoop::new(w2, index, poll);
        let _ = started.send(());
        event_loop.run();
    });
    match spawned {
        Ok(_) => {
            // An Err means the thread died before it said so; nothing to wait for.
            let _ = running.recv();
            Ok(())
        }
        Err(e) => {
            w.threads.fetch_sub(1, Ordering::AcqRel);
            Err(e)
        }
    }
}

/// One client connection in a loop.
struct Conn {
    stream: TcpStream,
    /// The client address's charge, given back when the connection ends
    /// (None while a PROXY header is awaited: nothing is charged yet).
    charge: Option<Charge>,
    /// The PROXY header being read, with the balancer's address; None once
    /// admitted (or on a plain listener).
    header: Option<Box<(Handshake, std::net::SocketAddr)>>,
    started: Instant,
    /// Receiver tick of the client's last bytes (idle timeout).
    last_active: u64,
    /// Echo bytes the client has not taken yet, from `sent` on. Empty (no
    /// allocation) except while a write is stalled.
    unsent: Vec<u8>,
    sent: usize,
    /// When the current stall began, for the write timeout.
    stalled_since: Option<Instant>,
    /// A short read may not mean "nothing more": the poll reported the
    /// client's FIN or an error (its edge is spent), or TCP urgent data
    /// (EPOLLPRI: the kernel stops a read short at the urgent mark with
    /// in-band bytes still queued behind it, and raises no new edge for
    /// them). Reads then go on until they would block, return 0 or fail.
    read_to_block: bool,
    /// Bytes this connection read and echoed, for its log line.
    bytes_in: u64,
    bytes_out: u64,
    /// Its addresses, kept for its log line (None with the log off).
    ends: Option<Box<Ends>>,
}

/// What a turn on one connection left to do.
enum Turn {
    /// Wait for the next readiness edge.
    Wait,
    /// Read budget used up with data possibly left: serve again soon.
    More,
    /// The connection is over.
    Done(Ending),
}

struct EventLoop {
    w: Arc<Shared>,
    index: usize,
    poll: Poll,
    /// Connections by token; `free` lists the empty slots for reuse.
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Connections whose read budget ran out, to serve again this turn.
    ready: VecDeque<usize>,
    /// Bytes echoed since the last flush into the worker's counters.
    tally: Tally,
    buf: Vec<u8>,
    /// The queue closed: take no more; exit once every connection ended.
    closing: bool,
    /// A connection ended while the master waits for capacity.
    freed: bool,
}

impl EventLoop {
    fn new(w: Arc<Shared>, index: usize, poll: Poll) -> EventLoop {
        let buf = vec![0u8; w.config.buffer_size];
        EventLoop {
            w,
            index,
            poll,
            conns: Vec::new(),
            free: Vec::new(),
            ready: VecDeque::new(),
            tally: Tally::default(),
            buf,
            closing: false,
            freed: false,
        }
    }

    fn handle(&self) -> &Handle {
        &self.w.loops[self.index]
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS);
        let mut last_tick = self.w.ticks.load(Ordering::Relaxed);
        let mut next_flush = last_tick + FLUSH_TICKS;
        // A first look at the queue: connections may have been pushed
        // before this thread ran.
        self.take_new();
        loop {
            let timeout = if self.ready.is_empty() { TICK } else { Duration::ZERO };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != ErrorKind::Interrupted {
                    log::error!("event loop {}: poll: {e}; closing its connections", self.index);
                    self.cut_all();
                    self.closing = true;
                }
            }
            self.w.beat();
            let mut woken = false;
            for ev in events.iter() {
                match ev.token() {
                    WAKER => woken = true,
                    Token(i) => self.serve(i, ev.is_read_closed() || ev.is_error() || ev.is_priority()),
                }
            }
            for _ in 0..self.ready.len() {
                if let Some(i) = self.ready.pop_front() {
                    self.serve(i, false);
                }
            }
            if self.handle().cut.swap(false, Ordering::AcqRel) {
                self.cut_all();
            }
            let now = self.w.ticks.load(Ordering::Relaxed);
            if woken || now != last_tick {
                // The queue is also checked on every tick, so a wake-up lost
                // to a race costs at most a tick.
                self.take_new();
            }
            if now != last_tick {
                last_tick = now;
                self.expire(now);
                if now >= next_flush {
                    self.w.counters.flush(&mut self.tally);
                    next_flush = now + FLUSH_TICKS;
                }
            }
            if self.freed {
                self.freed = false;
                self.w.slot_freed();
            }
            if self.closing && self.handle().open.load(Ordering::Acquire) == 0 {
                break;
            }
        }
        self.w.counters.flush(&mut self.tally);
        self.w.threads.fetch_sub(1, Ordering::AcqRel);
    }

    /// Takes this loop's share of the queue: all of it when it is the only
    /// loop, else an even split, waking another loop for the rest.
    fn take_new(&mut self) {
        if self.closing {
            return;
        }
        let loops = self.w.loops.len();
        let mut share = usize::MAX;
        let mut taken = 0;
        while taken < share {
            match self.w.queue.try_pop() {
                Pop::Item((stream, origin), depth) => {
                    if taken == 0 && loops > 1 {
                        share = (depth.queued + 1).div_ceil(loops);
                    }
                    taken += 1;
                    self.register(stream, origin);
                }
                Pop::TimedOut => return,
                Pop::Closed => {
                    self.closing = true;
                    return;
                }
            }
        }
        handles::notify(&self.w.loops);
    }

    fn register(&mut self, stream: StdStream, origin: Origin) {
        let started = Instant::now();
        let ends = self.w.ends_of(&stream);
        let (charge, header) = match origin {
            Origin::Direct(charge) => (Some(charge), None),
            Origin::Proxied => {
                let trusted = proxied::peer_of(&self.w, &stream).and_then(|peer| {
                    proxied::check_trusted(&self.w, peer)?;
                    Ok(peer)
                });
                let peer = match trusted {
                    Ok(peer) => peer,
                    Err(why) => {
                        // Counted as finished; dropping `stream` closes it,
                        // and a master waiting for room hears of it.
                        self.w.log_connection(ends.as_deref(), started, (0, 0), Reason::Refused(why));
                        self.freed = true;
                        return;
                    }
                };
                (None, Some(Box::new((Handshake::default(), peer))))
            }
        };
        self.handle().open.fetch_add(1, Ordering::AcqRel);
        self.w.busy.fetch_add(1, Ordering::Relaxed);
        let i = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let last_active = self.w.ticks.load(Ordering::Relaxed);
        let registered = stream.set_nonblocking(true).and_then(|()| {
            let mut stream = TcpStream::from_std(stream);
            let interest = Interest::READABLE | Interest::WRITABLE | Interest::PRIORITY;
            self.poll.registry().register(&mut stream, Token(i), interest)?;
            Ok(stream)
        });
        match registered {
            Ok(stream) => {
                self.conns[i] = Some(Conn {
                    stream,
                    charge,
                    header,
                    started,
                    last_active,
                    unsent: Vec::new(),
                    sent: 0,
                    stalled_since: None,
                    read_to_block: false,
                    bytes_in: 0,
                    bytes_out: 0,
                    ends,
                });
                // Edge-triggered: bytes that arrived before registration
                // raise no edge of their own, so look now.
                self.ready.push_back(i);
            }
            Err(e) => {
                log::warn!("cannot poll a connection: {e}");
                self.free.push(i);
                self.w.log_connection(ends.as_deref(), started, (0, 0), Reason::Ended(Ending::Other));
                self.finish(charge, started, Ending::Other);
            }
        }
    }

    /// One turn on connection `i`; `read_to_block` when the poll reported the
    /// client's FIN or an error.
    fn serve(&mut self, i: usize, read_to_block: bool) {
        let now = self.w.ticks.load(Ordering::Relaxed);
        let transform = self.w.config.transform;
        let Some(conn) = self.conns.get_mut(i).and_then(Option::as_mut) else { return };
        conn.read_to_block |= read_to_block;
        // The tally only grows within a turn (flushes happen between
        // turns), so what it gained is this connection's.
        let (was_in, was_out) = (self.tally.bytes_in, self.tally.bytes_out);
        if conn.header.is_some() {
            match read_header(&self.w, conn, transform, &mut self.tally) {
                Ok(true) => {}
                Ok(false) => return,
                Err(refused) => return self.drop_refused(i, refused),
            }
        }
        let turned = turn(conn, &mut self.buf, transform, &mut self.tally, now);
        conn.bytes_in += self.tally.bytes_in - was_in;
        conn.bytes_out += self.tally.bytes_out - was_out;
        match turned {
            Turn::Wait => {}
            Turn::More => self.ready.push_back(i),
            Turn::Done(ending) => self.close(i, ending),
        }
    }

    /// Idle and write timeouts, checked once per receiver tick.
    fn expire(&mut self, now: u64) {
        let idle = self.w.config.idle_timeout.nonzero().map(|d| d.as_millis().div_ceil(TICK.as_millis()).max(1) as u64);
        let stall = self.w.config.write_timeout.nonzero();
        let mut cut = Vec::new();
        let mut late = Vec::new();
        for (i, c) in self.conns.iter().enumerate() {
            let Some(c) = c else { continue };
            if let Some((_, peer)) = c.header.as_deref() {
                if c.started.elapsed() >= self.w.config.proxy_timeout.0 {
                    late.push((i, *peer));
                }
                continue;
            }
            let idle_out = idle.is_some_and(|t| now.saturating_sub(c.last_active) >= t);
            let stall_out = stall.zip(c.stalled_since).is_some_and(|(t, since)| since.elapsed() >= t);
            if idle_out {
                cut.push((i, Ending::IdleTimeout));
            } else if stall_out {
                cut.push((i, Ending::WriteTimeout));
            }
        }
        if !cut.is_empty() {
            log::debug!("closed {} idle or stalled connection(s)", cut.len());
        }
        for (i, ending) in cut {
            self.close(i, ending);
        }
        for (i, peer) in late {
            let why = proxied::refused(&self.w, peer, None, Refusal::Header(HeaderError::Timeout));
            self.drop_refused(i, why.into());
        }
    }

    /// Closes everything (drain deadline, fast stop). A connection still
    /// sending its PROXY header is a truncated header, as in thread mode,
    /// not an echo connection that ended cleanly.
    fn cut_all(&mut self) {
        for i in 0..self.conns.len() {
            match self.conns[i].as_ref().map(|c| c.header.as_deref().map(|(_, peer)| *peer)) {
                None => {}
                Some(None) => self.close(i, Ending::Cut),
                Some(Some(peer)) => {
                    let why = proxied::refused(&self.w, peer, None, Refusal::Header(HeaderError::Truncated));
                    self.drop_refused(i, why.into());
                }
            }
        }
    }

    fn close(&mut self, i: usize, ending: Ending) {
        let Some(mut conn) = self.conns.get_mut(i).and_then(Option::take) else { return };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        drop(conn.stream);
        self.free.push(i);
        // Counted and discharged first, at once as without the log (the
        // client's next connection must find its per-address room), then
        // logged while still busy (`forget` ends that), so a drain that
        // ends when nothing is busy closes the log after this line.
        self.count(conn.charge, conn.started, ending);
        let bytes = (conn.bytes_in, conn.bytes_out);
        self.w.log_connection(conn.ends.as_deref(), conn.started, bytes, Reason::Ended(ending));
        self.forget();
        log::trace!("connection closed: {ending:?}");
    }

    /// Records a connection that ended. Its bytes are in the loop's tally,
    /// flushed with it so totals are exact the moment it counts as finished.
    fn finish(&mut self, charge: Option<Charge>, started: Instant, ending: Ending) {
        self.count(charge, started, ending);
        self.forget();
    }

    /// `finish` less the `forget`: counted, its client's charge given back.
    fn count(&mut self, charge: Option<Charge>, started: Instant, ending: Ending) {
        self.w.counters.finish(&mut self.tally, ending, started.elapsed());
        if let Some(charge) = charge {
            self.w.scoreboard.discharge(self.w.id, charge);
        }
    }

    /// Closes a connection refused before its echo began (already counted
    /// by `proxied::refused`).
    fn drop_refused(&mut self, i: usize, refused: Refused) {
        let Some(mut conn) = self.conns.get_mut(i).and_then(Option::take) else { return };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        let mut ends = conn.ends;
        if let Some(ends) = ends.as_deref_mut() {
            ends.client = refused.client;
        }
        self.w.log_connection(ends.as_deref(), conn.started, (0, 0), Reason::Refused(refused.why));
        self.free.push(i);
        self.forget();
    }

    /// A connection of this loop is gone.
    fn forget(&mut self) {
        self.w.busy.fetch_sub(1, Ordering::Release);
        self.handle().open.fetch_sub(1, Ordering::AcqRel);
        self.freed = true;
    }
}

/// Reads as much of a connection's PROXY header as has arrived. Ok(true):
/// admitted, the echo may start (bytes sent after the header are queued to
/// be echoed first); Ok(false): wait for more; Err: refused and counted.
fn read_header(w: &Shared, c: &mut Conn, transform: Transform, tally: &mut Tally) -> Result<bool, Refused> {
    let Some((hs, peer)) = c.header.as_deref_mut() else { return Ok(true) };
    let peer = *peer;
    // Edge-triggered: read until the header is whole or the socket is
    // empty. Each pass either reads a byte or more, or stops.
    let (header, mut early) = loop {
        let before = hs.received();
        match hs.advance(&mut c.stream) {
            Ok(Step::Pending) if hs.received() == before => return Ok(false),
            Ok(Step::Pending) => {}
            Ok(Step::Done { header, early }) => break (header, early),
            Err(kind) => return Err(proxied::refused(w, peer, None, Refusal::Header(kind)).into()),
        }
    };
    let admitted = proxied::admit(w, peer, header, Vec::new())?;
    c.charge = admitted.charge;
    if let Some(ends) = c.ends.as_deref_mut() {
        ends.client = admitted.client;
    }
    c.header = None;
    if !early.is_empty() {
        if transform == Transform::Upper {
            early.make_ascii_uppercase();
        }
        tally.bytes_in += early.len() as u64;
        c.unsent = early;
        c.sent = 0;
    }
    Ok(true)
}

/// Serves one connection as far as it can go without blocking: first what
/// it still owes the client, then new bytes, up to the read budget.
fn turn(c: &mut Conn, buf: &mut [u8], transform: Transform, tally: &mut Tally, now: u64) -> Turn {
    if !c.unsent.is_empty() {
        match write_some(&mut c.stream, &c.unsent[c.sent..]) {
            Ok(n) => {
                tally.bytes_out += n as u64;
                c.sent += n;
                if c.sent < c.unsent.len() {
                    if n > 0 {
                        c.stalled_since = Some(Instant::now());
                    }
                    return Turn::Wait;
                }
                c.unsent = Vec::new();
                c.sent = 0;
                c.stalled_since = None;
            }
            Err(e) => return Turn::Done(ending_of(e.kind())),
        }
    }
    for _ in 0..READ_BUDGET {
        let n = match c.stream.read(buf) {
            Ok(0) => return Turn::Done(Ending::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // Drained for sure: short reads can be trusted again (an
                // urgent mark raises EPOLLPRI anew; a FIN reads as 0).
                c.read_to_block = false;
                return Turn::Wait;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Turn::Done(ending_of(e.kind())),
        };
        c.last_active = now;
        tally.bytes_in += n as u64;
        let data = &mut buf[..n];
        if transform == Transform::Upper {
            data.make_ascii_uppercase();
        }
        match write_some(&mut c.stream, data) {
            Ok(w) => {
                tally.bytes_out += w as u64;
                if w < n {
                    // The client is not taking it: keep the rest and read
                    // nothing more until it is gone (see the module doc).
                    c.unsent.extend_from_slice(&data[w..]);
                    c.stalled_since = Some(Instant::now());
                    return Turn::Wait;
                }
            }
            Err(e) => return Turn::Done(ending_of(e.kind())),
        }
        if n < buf.len() && !c.read_to_block {
            // The socket is drained; its next bytes (or FIN) raise a new
            // edge.
            return Turn::Wait;
        }
    }
    Turn::More
}

/// Writes as much of `data` as the socket takes now; Ok(0..len) when it
/// would block.
fn write_some<W: Write>(w: &mut W, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match w.write(&data[done..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
