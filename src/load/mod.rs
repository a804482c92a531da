//! echo-load's engine: many connections, few threads, every byte verified.
//!
//! `threads` event loops (mio), each owning its share of the connections.
//! Three ways to drive them:
//!
//! - **closed loop** (default): each connection keeps `pipeline` messages in
//!   flight and sends the next one when an echo completes;
//! - **open loop** (`rate`): messages are due on a fixed schedule whether or
//!   not earlier ones came back, and latency is measured from the *scheduled*
//!   time, so a stalled server shows its stall instead of hiding it
//!   (no coordinated omission, as in wrk2);
//! - **churn**: connect, one round trip, close, again: the connection rate.
//!
//! Payloads are windows into a per-thread pool of random bytes at an offset
//! that changes per message, so consecutive messages differ and the echo can
//! be compared byte for byte without generating data per message. A mismatch
//! is counted, never ignored.
//!
//! With several server addresses (a fleet), connection `g` goes to address
//! `g % addrs.len()`, and everything is counted per address as well.
//!
//! Only what happens between the end of the warm-up and the end of the run
//! is counted. Connections are opened gradually (`ramp_up`) so the harness
//! does not SYN-flood its own target.

pub mod conn;
pub mod report;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use conn::Conn;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Server addresses; connections are spread over them round-robin.
    pub addrs: Vec<SocketAddr>,
    pub connections: usize,
    /// Measured time (after warm-up); None with `count`.
    pub duration: Option<Duration>,
    /// Stop after this many responses.
    pub count: Option<u64>,
    pub size: usize,
    pub pipeline: usize,
    /// Open loop: messages per second over all connections.
    pub rate: Option<f64>,
    pub churn: bool,
    /// Payloads are newline-terminated lines (for line-based servers).
    pub lines: bool,
    /// Each connection first sends this PROXY protocol header.
    pub proxy: Option<crate::proxy::Version>,
    pub threads: usize,
    pub warmup: Duration,
    pub ramp_up: Duration,
    /// A message not echoed within this is a timeout (connection reopened).
    pub timeout: Duration,
}

impl Options {
    pub fn mode(&self) -> &'static str {
        match (self.churn, self.rate.is_some()) {
            (true, _) => "churn",
            (false, true) => "open",
            (false, false) => "closed",
        }
    }
}

/// Counters of one thread (then of the run).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Messages fully sent.
    pub requests: u64,
    /// Echoes fully received.
    pub responses: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Connections established.
    pub connects: u64,
    pub connect_errors: u64,
    /// Reset, broken pipe, or closed by the server mid-message.
    pub resets: u64,
    /// Messages not echoed within `timeout`.
    pub timeouts: u64,
    pub other_errors: u64,
    /// Echoes that differed from what was sent.
    pub mismatches: u64,
}

impl Counts {
    pub fn errors(&self) -> u64 {
        self.connect_errors + self.resets + self.timeouts + self.other_errors
    }

    pub fn add(&mut self, o: &Counts) {
        self.requests += o.requests;
        self.responses += o.responses;
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
        self.connects += o.connects;
        self.connect_errors += o.connect_errors;
        self.resets += o.resets;
        self.timeouts += o.timeouts;
        self.other_errors += o.other_errors;
        self.mismatches += o.mismatches;
    }
}

/// State shared by the driver and the event-loop threads.
#[derive(Default)]
pub struct Shared {
    /// Set to end the run (duration over, count reached, Ctrl-C).
    pub stop: AtomicBool,
    /// Set when the warm-up ends: counting starts.
    pub measuring: AtomicBool,
    /// Live totals for the progress display (measured only).
    pub responses: AtomicU64,
    pub errors: AtomicU64,
    pub mismatches: AtomicU64,
}

/// What was counted for one server address (or for the whole run).
pub struct Tally {
    pub counts: Counts,
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
}

impl Tally {
    pub fn new() -> Tally {
        Tally { counts: Counts::default(), latency: histogram() }
    }

    pub fn add(&mut self, o: &Tally) {
        self.counts.add(&o.counts);
        let _ = self.latency.add(&o.latency);
    }
}

impl Default for Tally {
    fn default() -> Tally {
        Tally::new()
    }
}

/// What one thread hands back: a tally per server address.
pub struct ThreadResult {
    pub per_addr: Vec<Tally>,
}

/// The whole run.
pub struct Outcome {
    pub counts: Counts,
    pub latency: Histogram<u64>,
    /// The same, per server address, in `Options::addrs` order.
    pub per_addr: Vec<Tally>,
    /// Measured time.
    pub elapsed: Duration,
    /// Stopped early (Ctrl-C).
    pub interrupted: bool,
}

/// A new latency histogram: 1 µs to an hour, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
    h.auto(true);
    h
}

/// Runs the load. `tick` is called every 100 ms from the driving thread
/// (progress display); it returns false to stop early (Ctrl-C).
pub fn run(opts: &Options, shared: &Arc<Shared>, mut tick: impl FnMut(Duration) -> bool) -> Outcome {
    let threads = opts.threads.clamp(1, opts.connections.max(1));
    let start = Instant::now();
    let mut measure_start = None;
    if opts.warmup.is_zero() {
        measure_start = Some(start);
        shared.measuring.store(true, Ordering::Release);
    }
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (opts, shared) = (opts.clone(), shared.clone());
            std::thread::Builder::new()
                .name(format!("load-{t}"))
                .spawn(move || event_loop(&opts, &shared, t, threads, start))
                .expect("spawn load thread")
        })
        .collect();
    let mut interrupted = false;
    let mut next_tick = start;
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let now = Instant::now();
        if measure_start.is_none() && now >= start + opts.warmup {
            measure_start = Some(now);
            shared.measuring.store(true, Ordering::Release);
        }
        let measured = measure_start.map_or(Duration::ZERO, |m| now - m);
        if now >= next_tick {
            next_tick = now + Duration::from_millis(100);
            if !tick(measured) {
                interrupted = true;
                break;
            }
        }
        let done_time = opts.duration.is_some_and(|d| measured >= d);
        if done_time || shared.stop.load(Ordering::Acquire) {
            break;
        }
    }
    let end = Instant::now();
    shared.stop.store(true, Ordering::Release);
    let mut per_addr: Vec<Tally> = opts.addrs.iter().map(|_| Tally::new()).collect();
    for h in handles {
        if let Ok(r) = h.join() {
            per_addr.iter_mut().zip(&r.per_addr).for_each(|(a, b)| a.add(b));
        }
    }
    let mut total = Tally::new();
    per_addr.iter().for_each(|t| total.add(t));
    let elapsed = measure_start.map_or(Duration::ZERO, |m| end - m);
    Outcome { counts: total.counts, latency: total.latency, per_addr, elapsed, interrupted }
}

/// One thread's loop over its connections.
fn event_loop(opts: &Options, shared: &Shared, thread: usize, threads: usize, start: Instant) -> ThreadResult {
    let mut result = ThreadResult { per_addr: opts.addrs.iter().map(|_| Tally::new()).collect() };
    let mut poll = match mio::Poll::new() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("echo-load: poll: {e}");
            result.per_addr[0].counts.other_errors += 1;
            return result;
        }
    };
    let pool = conn::Pool::new(opts.size, thread as u64, opts.lines);
    // Connection g (global index) belongs to thread g % threads.
    let mine: Vec<usize> = (thread..opts.connections).step_by(threads).collect();
    let per_conn_rate = opts.rate.map(|r| r / opts.connections.max(1) as f64);
    let mut conns: Vec<Conn> = mine
        .iter()
        .enumerate()
        .map(|(i, &g)| {
            let ramp = opts.ramp_up.mul_f64(g as f64 / opts.connections.max(1) as f64);
            // Spread each connection's schedule across the period.
            let phase = per_conn_rate.map(|r| Duration::from_secs_f64(g as f64 / opts.connections as f64 / r));
            Conn::new(i, g % opts.addrs.len(), g as u64, start + ramp, phase, per_conn_rate)
        })
        .collect();
    let mut events = mio::Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let mut next_timeout_check = Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        let now = Instant::now();
        let measuring = shared.measuring.load(Ordering::Relaxed);
        let before = totals(&result.per_addr);
        let mut sink = conn::Sink { tallies: &mut result.per_addr, addr: 0, measuring };
        let mut wake = now + Duration::from_millis(50);
        for c in conns.iter_mut() {
            sink.addr = c.addr;
            if let Some(at) = c.due(opts, &pool, poll.registry(), now, &mut sink) {
                wake = wake.min(at);
            }
        }
        // mio rounds poll timeouts up to whole milliseconds; a scheduled send
        // must not wait that long (its latency counts from the schedule), so
        // near a due time the loop polls without sleeping.
        let timeout = match wake.saturating_duration_since(Instant::now()) {
            t if opts.rate.is_some() && t < Duration::from_millis(1) => Duration::ZERO,
            t => t,
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                sink.addr = 0;
                sink.count(|c| c.other_errors += 1);
                break;
            }
        }
        let now = Instant::now();
        for ev in events.iter() {
            if let Some(c) = conns.get_mut(ev.token().0) {
                sink.addr = c.addr;
                c.on_event(opts, &pool, poll.registry(), &mut buf, now, &mut sink);
            }
        }
        if now >= next_timeout_check {
            for c in conns.iter_mut() {
                sink.addr = c.addr;
                c.check_timeout(opts, poll.registry(), now, &mut sink);
            }
            next_timeout_check = now + Duration::from_millis(100);
        }
        if measuring {
            let after = totals(&result.per_addr);
            let total = shared.responses.fetch_add(after.responses - before.responses, Ordering::Relaxed)
                + (after.responses - before.responses);
            shared.errors.fetch_add(after.errors() - before.errors(), Ordering::Relaxed);
            shared.mismatches.fetch_add(after.mismatches - before.mismatches, Ordering::Relaxed);
            if opts.count.is_some_and(|c| total >= c) {
                shared.stop.store(true, Ordering::Release);
            }
        }
    }
    result
}

/// The counts of all addresses together.
fn totals(per_addr: &[Tally]) -> Counts {
    let mut c = Counts::default();
    per_addr.iter().for_each(|t| c.add(&t.counts));
    c
}
