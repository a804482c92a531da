//! echo-load, a load-test harness for TCP echo servers: many connections,
//! few threads, every byte verified.
//!
//! This library is its engine ([`run`]) and its command line ([`cli`]); the
//! binary (`src/main.rs`) wires them to a terminal.
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
//! Connections are opened gradually (`ramp_up`) so the harness does not
//! SYN-flood its own target; then comes the warm-up; only what happens
//! after both, up to the end of the run, is counted. In open loop the
//! schedule starts when the ramp-up ends, the same instant for every
//! connection, so the measured window runs at the whole `rate`.
//!
//! At the end a message not yet on the wire is not sent after it (open
//! loop): it is unsent, as is one the client never got to issue.

pub mod cli;
pub mod conn;
pub mod plan;
pub mod report;
pub mod tally;

use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use conn::{Conn, Ctx};
pub use plan::{Options, Shared, Window};
pub use tally::{Counts, Tally, histogram};

/// echo-load's exit statuses (`echo-load --help`, the man page, the README).
/// When several apply: mismatch, then client behind, then errors.
pub mod exit {
    /// Every measured message was echoed intact; no errors.
    pub const CLEAN: u8 = 0;
    /// An echo differed from what was sent (or bytes nobody sent arrived).
    pub const MISMATCH: u8 = 1;
    /// Bad flags or an address that does not resolve.
    pub const USAGE: u8 = 2;
    /// Errors: timeouts, resets, connect failures, messages lost or left
    /// unanswered, or no response at all.
    pub const ERRORS: u8 = 3;
    /// Open loop: the client could not send at the offered rate, so the
    /// figures describe the client, not the server.
    pub const CLIENT_BEHIND: u8 = 4;
    /// Interrupted (Ctrl-C, TERM) before the measured window began (during
    /// the ramp-up or the warm-up): nothing was measured, and that is the
    /// user's doing, not the server's (128 + SIGINT, the shell convention).
    pub const INTERRUPTED: u8 = 130;
}

/// After the end, how long a thread waits for echoes of the messages it
/// issued before giving them up as unanswered (or `timeout`, if shorter).
/// The run's rates count only the measured duration; this only settles its
/// accounts, so a server that stalls at the end shows as unanswered
/// messages instead of vanishing.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// A client is behind when more than this share of what was due went
/// unsent (one in a hundred).
const BEHIND_SHARE: f64 = 0.01;
/// The poll timeout when the timer has nothing sooner: a safety net, not a
/// clock.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// The load thread's timer token (connections use their index).
const TIMER: mio::Token = mio::Token(usize::MAX);

/// The whole run.
pub struct Outcome {
    /// All addresses together.
    pub total: Tally,
    /// The same, per server address, in `Options::addrs` order.
    pub per_addr: Vec<Tally>,
    /// Measured time.
    pub elapsed: Duration,
    /// Stopped early (Ctrl-C).
    pub interrupted: bool,
    /// Stopped (Ctrl-C) before the measured window began: nothing was
    /// measured.
    pub interrupted_unmeasured: bool,
    /// A `--count` run stopped because nothing was settled for `timeout`.
    pub stalled: bool,
    /// Open loop: the offered rate (messages per second).
    pub rate: Option<f64>,
}

impl Outcome {
    /// Open loop: messages due in the measured window.
    pub fn scheduled(&self) -> u64 {
        self.total.counts.requests + self.total.counts.unsent
    }

    /// The client could not keep to the offered schedule.
    pub fn client_behind(&self) -> bool {
        self.rate.is_some() && self.total.counts.unsent as f64 > BEHIND_SHARE * self.scheduled() as f64
    }

    /// The exit status this run deserves ([`exit`]).
    pub fn exit_code(&self) -> u8 {
        let c = &self.total.counts;
        if self.interrupted_unmeasured {
            // Nothing was measured, so there is no verdict on the server.
            exit::INTERRUPTED
        } else if c.mismatches > 0 {
            exit::MISMATCH
        } else if self.client_behind() {
            // Before errors: a client off its schedule floods or starves the
            // server, so its errors say more about the client than the server.
            exit::CLIENT_BEHIND
        } else if c.errors() > 0 || c.lost > 0 || c.responses == 0 || self.stalled {
            exit::ERRORS
        } else {
            exit::CLEAN
        }
    }
}

/// Runs the load. `tick` is called every 100 ms from the driving thread
/// (progress display, with the measured time so far); it returns false to
/// stop early (Ctrl-C).
pub fn run(opts: &Options, shared: &Arc<Shared>, mut tick: impl FnMut(Duration) -> bool) -> Outcome {
    let threads = opts.threads.clamp(1, opts.connections.max(1));
    let start = Instant::now();
    let window = window(opts, start);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (opts, shared) = (opts.clone(), shared.clone());
            std::thread::Builder::new().name(format!("load-{t}")).spawn(move || {
                let r = event_loop(&opts, &shared, t, threads, start, window);
                shared.finished.fetch_add(1, Ordering::AcqRel);
                r
            })
        })
        .collect();
    let mut stopped_at = None;
    let mut stalled = false;
    let (mut next_tick, mut settled, mut settled_at) = (start, 0, window.start);
    while shared.finished.load(Ordering::Acquire) < handles.len() {
        std::thread::sleep(Duration::from_millis(10));
        let now = Instant::now();
        if now >= next_tick {
            next_tick = now + Duration::from_millis(100);
            if !tick(now.saturating_duration_since(window.start)) && stopped_at.is_none() {
                stopped_at = Some(now);
                shared.stop.store(true, Ordering::Release);
            }
        }
        // A --count run has no end of its own: one that settles nothing for
        // `timeout` (a dead server, connections refused) is stopped.
        let s = shared.settled.load(Ordering::Relaxed);
        if s != settled || now < window.start {
            (settled, settled_at) = (s, now.max(window.start));
        } else if opts.count.is_some() && now >= settled_at + opts.timeout && stopped_at.is_none() {
            stalled = true;
            stopped_at = Some(now);
            shared.stop.store(true, Ordering::Release);
        }
    }
    let mut per_addr: Vec<Tally> = opts.addrs.iter().map(|_| Tally::new()).collect();
    let mut span = Span::default();
    for h in handles.into_iter().flatten() {
        if let Ok(r) = h.join() {
            per_addr.iter_mut().zip(&r.tallies).for_each(|(a, b)| a.add(b));
            span.merge(&r.span);
        }
    }
    if let Some(count) = opts.count {
        cap_unsent(&mut per_addr, count);
    }
    let mut total = Tally::new();
    per_addr.iter().for_each(|t| total.add(t));
    let (from, to) = measured(opts, window, &span, stopped_at);
    Outcome {
        total,
        per_addr,
        elapsed: to.saturating_duration_since(from),
        interrupted: stopped_at.is_some() && !stalled,
        interrupted_unmeasured: !stalled && stopped_at.is_some_and(|s| s <= window.start),
        stalled,
        rate: opts.rate,
    }
}

/// The run's clock: the measured window opens once every connection is
/// open (`ramp_up`) and the warm-up is over, and lasts `duration`. A
/// `--count` run at a `--rate` ends when its `count` messages have been
/// due (half a gap more, so rounding cannot drop the last one): what is
/// not sent by then is unsent, as in a timed run. A closed-loop `--count`
/// run has no end of its own.
pub fn window(opts: &Options, start: Instant) -> Window {
    let from = start + opts.ramp_up + opts.warmup;
    let end = match (opts.duration, opts.count, opts.rate) {
        (Some(d), _, _) => Some(from + d),
        (None, Some(n), Some(r)) => Some(from + Duration::try_from_secs_f64((n as f64 + 0.5) / r).unwrap_or(FAR)),
        _ => None,
    };
    Window { start: from, end }
}

/// Stands in for "never" where an `Instant` is needed (a century ahead).
const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);

/// The measured time, from and to. A timed run measures its window (cut
/// short by a stop). A `--count` run measures from its first measured
/// message (closed loop: issued; open loop: the window, where the first was
/// due) to the last moment a measured message was issued or settled, on the
/// clocks that timed those messages: not when the driver noticed.
fn measured(opts: &Options, window: Window, span: &Span, stopped_at: Option<Instant>) -> (Instant, Instant) {
    if opts.count.is_none() {
        let end = window.end.unwrap_or(window.start);
        return (window.start, stopped_at.map_or(end, |s| s.min(end)));
    }
    let from = if opts.rate.is_some() { window.start } else { span.first.unwrap_or(window.start) };
    let to = span.last.unwrap_or(from);
    (from, stopped_at.map_or(to, |s| s.min(to)).max(from))
}

/// A `--count` run never has more than `count` messages due: what each
/// connection counted as due past that (its share of the half gap the
/// window adds, or none sent at all) is taken back.
fn cap_unsent(per_addr: &mut [Tally], count: u64) {
    let requests: u64 = per_addr.iter().map(|t| t.counts.requests).sum();
    let unsent: u64 = per_addr.iter().map(|t| t.counts.unsent).sum();
    let mut excess = (requests + unsent).saturating_sub(count);
    for t in per_addr.iter_mut().rev() {
        let take = excess.min(t.counts.unsent);
        t.counts.unsent -= take;
        excess -= take;
    }
}

/// When one thread's measured activity began and last changed.
#[derive(Debug, Default, Clone, Copy)]
struct Span {
    /// The first measured message was issued.
    first: Option<Instant>,
    /// The last measured message was issued, settled or given up.
    last: Option<Instant>,
}

impl Span {
    /// Notes one pass (timed `now`) that went from `before` to `after`.
    fn note(&mut self, now: Instant, before: &Counts, after: &Counts) {
        if after.requests > before.requests && self.first.is_none() {
            self.first = Some(now);
        }
        if after.requests != before.requests || after.settled() != before.settled() {
            self.last = Some(now);
        }
    }

    fn merge(&mut self, o: &Span) {
        self.first = earliest(self.first, o.first);
        self.last = self.last.max(o.last);
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What one load thread hands back.
struct ThreadResult {
    /// One per server address.
    tallies: Vec<Tally>,
    span: Span,
}

/// One thread's loop over its connections; returns a tally per address
/// and when its measured activity began and ended.
fn event_loop(
    opts: &Options,
    shared: &Shared,
    thread: usize,
    threads: usize,
    start: Instant,
    mut window: Window,
) -> ThreadResult {
    let mut tallies: Vec<Tally> = opts.addrs.iter().map(|_| Tally::new()).collect();
    let mut span = Span::default();
    let (mut poll, timer) = match timed_poll() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("echo-load: cannot set up a load thread: {e}");
            tallies[0].counts.other_errors += 1;
            return ThreadResult { tallies, span };
        }
    };
    // Timers fire within a microsecond or so instead of the default 50 µs
    // slack: at low rates that slack would be charged to the server.
    let _ = nix::sys::prctl::set_timerslack(1);
    let pool = conn::Pool::new(opts.size, thread as u64, opts.lines);
    let mut conns = connections(opts, thread, threads, start);
    let mut events = mio::Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let mut drain_until = None;
    let mut sending_closed = false;
    let mut armed: Option<Instant> = None;
    let spin = spin_window(opts, threads);
    loop {
        let now = Instant::now();
        if shared.stop.load(Ordering::Acquire) && window.end.is_none_or(|e| now < e) {
            window.end = Some(now);
        }
        let issuing = window.end.is_none_or(|e| now < e) && !shared.tickets_out(opts.count);
        if !issuing && drain_until.is_none() {
            drain_until = Some(now + opts.timeout.min(DRAIN_GRACE));
        }
        let before = totals(&tallies);
        let mut ctx = Ctx { opts, pool: &pool, registry: poll.registry(), shared, window, now, tallies: &mut tallies };
        let mut wake = now + IDLE_POLL;
        for c in conns.iter_mut() {
            if let Some(at) = c.tick(&mut ctx) {
                wake = wake.min(at);
            }
        }
        // The end: this pass was the last chance to send. Nothing not on
        // the wire now goes out after it (open loop: it is unsent).
        if !sending_closed && window.end.is_some_and(|e| now >= e) {
            conns.iter_mut().for_each(|c| c.close_sending(&mut ctx));
            sending_closed = true;
        }
        let ticked = totals(&tallies);
        span.note(now, &before, &ticked);
        if let Some(d) = drain_until {
            if now >= d || !conns.iter().any(Conn::unfinished) {
                break;
            }
            wake = wake.min(d);
        }
        if window.end.is_some_and(|e| now < e) {
            wake = wake.min(window.end.unwrap_or(wake));
        }
        // The timer, not the poll timeout, keeps time: epoll rounds its
        // timeout up to whole milliseconds, a timerfd does not. A woken
        // thread still runs some 50 µs late, so the timer is set `spin`
        // early and the last stretch is a busy wait (see `spin_window`).
        let mut timeout = wake.saturating_duration_since(Instant::now());
        if timeout <= spin {
            while Instant::now() < wake {
                std::hint::spin_loop();
            }
            timeout = Duration::ZERO;
        }
        let early = wake.checked_sub(spin).unwrap_or(wake);
        if armed != Some(early) && !timeout.is_zero() {
            let after = early.saturating_duration_since(Instant::now()).max(Duration::from_nanos(1));
            let _ = timer.set(Expiration::OneShot(TimeSpec::from_duration(after)), TimerSetTimeFlags::empty());
            armed = Some(early);
        }
        let poll_for = if timeout.is_zero() { Duration::ZERO } else { IDLE_POLL };
        if let Err(e) = poll.poll(&mut events, Some(poll_for)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                eprintln!("echo-load: poll: {e}");
                tallies[0].counts.other_errors += 1;
                break;
            }
        }
        let now = Instant::now();
        let mut ctx = Ctx { opts, pool: &pool, registry: poll.registry(), shared, window, now, tallies: &mut tallies };
        for ev in events.iter() {
            if ev.token() == TIMER {
                let _ = timer.wait(); // clear it; nonblocking
                armed = None;
            } else if let Some(c) = conns.get_mut(ev.token().0) {
                c.on_event(&mut buf, &mut ctx);
            }
        }
        let after = totals(&tallies);
        span.note(now, &ticked, &after);
        publish(shared, &before, &after);
    }
    let now = Instant::now();
    let before = totals(&tallies);
    let mut ctx = Ctx { opts, pool: &pool, registry: poll.registry(), shared, window, now, tallies: &mut tallies };
    conns.iter_mut().for_each(|c| c.finish(&mut ctx));
    publish(shared, &before, &totals(&tallies));
    ThreadResult { tallies, span }
}

/// How long before a due send the thread stops sleeping and busy-waits.
///
/// Measured at 300 msg/s on one connection: sleeping to the due time made
/// sends 55 µs late at p50 (the wake-up), charged to the server as latency;
/// a 100 µs spin made them 1 µs late. The spin is at most a tenth of the
/// gap between this thread's sends, so it costs at most a tenth of a core,
/// in proportion to the rate; closed loop never spins.
fn spin_window(opts: &Options, threads: usize) -> Duration {
    const MAX_SPIN: Duration = Duration::from_micros(100);
    match opts.rate {
        Some(rate) => Duration::try_from_secs_f64(threads as f64 / rate / 10.0).map_or(MAX_SPIN, |d| d.min(MAX_SPIN)),
        None => Duration::ZERO,
    }
}

/// A poll with a nonblocking timerfd registered as [`TIMER`].
fn timed_poll() -> std::io::Result<(mio::Poll, TimerFd)> {
    let poll = mio::Poll::new()?;
    let timer = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC)?;
    let fd = timer.as_fd().as_raw_fd();
    poll.registry().register(&mut mio::unix::SourceFd(&fd), TIMER, mio::Interest::READABLE)?;
    Ok((poll, timer))
}

/// This thread's connections: global connection `g` belongs to thread
/// `g % threads` and opens at its ramp-up slot. In open loop every
/// schedule starts when the ramp-up ends, connection `g`'s first message
/// offset by `g / rate`: message `k` of connection `g` is message
/// `k × connections + g` of one schedule at `rate`, so the connections'
/// messages interleave and a window of `d` seconds has `rate × d` due, however
/// long the ramp-up took. (Before, each schedule started at its
/// connection's slot: with a 2 s ramp-up a 1 s run offered a third.)
fn connections(opts: &Options, thread: usize, threads: usize, start: Instant) -> Vec<Conn> {
    let n = opts.connections.max(1) as f64;
    let t0 = start + opts.ramp_up;
    (thread..opts.connections)
        .step_by(threads)
        .enumerate()
        .map(|(i, g)| {
            let at = start + opts.ramp_up.mul_f64(g as f64 / n);
            let schedule = opts.rate.map(|r| (t0 + Duration::from_secs_f64(g as f64 / r), n / r));
            Conn::new(i, g % opts.addrs.len(), g as u64, at, schedule)
        })
        .collect()
}

/// Adds one pass's progress to the shared live totals.
fn publish(shared: &Shared, before: &Counts, after: &Counts) {
    shared.responses.fetch_add(after.responses - before.responses, Ordering::Relaxed);
    shared.errors.fetch_add(after.errors() - before.errors(), Ordering::Relaxed);
    shared.mismatches.fetch_add(after.mismatches - before.mismatches, Ordering::Relaxed);
    shared.settled.fetch_add(after.settled() - before.settled(), Ordering::Relaxed);
}

/// The counts of all addresses together.
fn totals(per_addr: &[Tally]) -> Counts {
    let mut c = Counts::default();
    per_addr.iter().for_each(|t| c.add(&t.counts));
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(counts: Counts, rate: Option<f64>) -> Outcome {
        Outcome {
            total: Tally { counts, ..Tally::new() },
            per_addr: vec![],
            elapsed: Duration::from_secs(1),
            interrupted: false,
            interrupted_unmeasured: false,
            stalled: false,
            rate,
        }
    }

    /// The exit status: nothing measured, then mismatch, then client
    /// behind, then errors (each kind alone is enough), else clean.
    #[test]
    fn the_exit_status_follows_its_documented_order() {
        let ok = Counts { requests: 100, responses: 100, ..Counts::default() };
        assert_eq!(outcome(ok, None).exit_code(), exit::CLEAN);
        assert_eq!(outcome(ok, Some(100.0)).exit_code(), exit::CLEAN);
        for bad in [
            Counts { timeouts: 1, ..ok },
            Counts { resets: 1, ..ok },
            Counts { connect_errors: 1, ..ok },
            Counts { unanswered: 1, ..ok },
            Counts { other_errors: 1, ..ok },
            Counts { lost: 1, ..ok },
            Counts { responses: 0, ..ok },
        ] {
            assert_eq!(outcome(bad, None).exit_code(), exit::ERRORS, "{bad:?}");
        }
        let stalled = Outcome { stalled: true, ..outcome(ok, None) };
        assert_eq!(stalled.exit_code(), exit::ERRORS);
        // Over 1% of what was due unsent: behind, before errors.
        let behind = Counts { unsent: 2, resets: 1, ..ok };
        assert_eq!(outcome(behind, Some(100.0)).exit_code(), exit::CLIENT_BEHIND);
        assert_eq!(outcome(behind, None).exit_code(), exit::ERRORS, "closed loop is never behind");
        let mismatch = Counts { mismatches: 1, ..behind };
        assert_eq!(outcome(mismatch, Some(100.0)).exit_code(), exit::MISMATCH);
        let unmeasured = Outcome { interrupted: true, interrupted_unmeasured: true, ..outcome(mismatch, Some(1.0)) };
        assert_eq!(unmeasured.exit_code(), exit::INTERRUPTED);
    }

    /// "Behind" is more than 1% of the scheduled messages unsent: exactly
    /// 1% is not.
    #[test]
    fn a_client_is_behind_past_one_percent_unsent() {
        let at = |unsent| {
            outcome(
                Counts { requests: 1000 - unsent, responses: 1000 - unsent, unsent, ..Counts::default() },
                Some(1.0),
            )
        };
        assert_eq!(at(10).scheduled(), 1000);
        assert!(!at(10).client_behind());
        assert!(at(11).client_behind());
    }

    /// A `--count` run never counts more due than `count`: the excess goes,
    /// from the last address back, and no further.
    #[test]
    fn a_count_run_caps_what_was_due_at_its_count() {
        let tally =
            |requests, unsent| Tally { counts: Counts { requests, unsent, ..Counts::default() }, ..Tally::new() };
        let mut t = vec![tally(40, 5), tally(50, 8)];
        cap_unsent(&mut t, 100);
        assert_eq!((t[0].counts.unsent, t[1].counts.unsent), (5, 5));
        let mut t = vec![tally(40, 5), tally(50, 1)];
        cap_unsent(&mut t, 93);
        assert_eq!((t[0].counts.unsent, t[1].counts.unsent), (3, 0), "spills over to the next address");
        let mut t = vec![tally(40, 5)];
        cap_unsent(&mut t, 50);
        assert_eq!(t[0].counts.unsent, 5, "nothing in excess");
    }

    fn options(duration: Option<Duration>, count: Option<u64>, rate: Option<f64>) -> Options {
        Options {
            duration,
            count,
            rate,
            warmup: Duration::from_millis(300),
            ramp_up: Duration::from_millis(200),
            ..Options::for_tests()
        }
    }

    /// #27.14: the window opens after the ramp-up and the warm-up; a timed
    /// run lasts its duration, a `--count` run at a rate until its count
    /// was due (and half a gap), a closed-loop `--count` run has no end.
    #[test]
    fn the_window_opens_after_the_ramp_up_and_the_warm_up() {
        let t = Instant::now();
        let w = window(&options(Some(Duration::from_secs(2)), None, None), t);
        assert_eq!((w.start, w.end), (t + Duration::from_millis(500), Some(t + Duration::from_millis(2500))));
        let w = window(&options(None, Some(100), Some(1000.0)), t);
        assert_eq!(w.end, Some(t + Duration::from_millis(500) + Duration::from_micros(100_500)));
        assert_eq!(window(&options(None, Some(100), None), t).end, None);
    }

    /// #27.15: a timed run measures its window (cut by a stop); a `--count`
    /// run from its first measured message (open loop: the window) to its
    /// last activity, never the driver's notice.
    #[test]
    fn measured_time_is_the_window_or_the_activity() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let w = Window { start: ms(0), end: Some(ms(1000)) };
        let span = Span { first: Some(ms(3)), last: Some(ms(20)) };
        let timed = options(Some(Duration::from_secs(1)), None, None);
        assert_eq!(measured(&timed, w, &span, None), (ms(0), ms(1000)));
        assert_eq!(measured(&timed, w, &span, Some(ms(400))), (ms(0), ms(400)));
        let count = options(None, Some(10), None);
        let w = Window { start: ms(0), end: None };
        assert_eq!(measured(&count, w, &span, None), (ms(3), ms(20)));
        assert_eq!(measured(&count, w, &span, Some(ms(10))), (ms(3), ms(10)));
        assert_eq!(measured(&count, w, &span, Some(ms(1))), (ms(3), ms(3)), "never negative");
        let paced = options(None, Some(10), Some(100.0));
        assert_eq!(measured(&paced, w, &span, None), (ms(0), ms(20)));
    }

    /// A pass that issued the first measured message starts the span; any
    /// pass that issued or settled one moves its end; others do not.
    #[test]
    fn the_span_follows_issues_and_outcomes() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let mut s = Span::default();
        let zero = Counts::default();
        s.note(ms(1), &zero, &Counts { bytes_sent: 5, ..zero });
        assert_eq!((s.first, s.last), (None, None));
        let issued = Counts { requests: 1, ..zero };
        s.note(ms(2), &zero, &issued);
        let answered = Counts { responses: 1, ..issued };
        s.note(ms(3), &issued, &answered);
        s.note(ms(4), &answered, &answered);
        assert_eq!((s.first, s.last), (Some(ms(2)), Some(ms(3))));
        // Merged, the threads' spans run from the earliest first to the
        // latest last, whichever side holds them.
        let wider = Span { first: Some(ms(1)), last: Some(ms(9)) };
        let mut other = wider;
        other.merge(&s);
        assert_eq!((other.first, other.last), (Some(ms(1)), Some(ms(9))));
        let mut inner = s;
        inner.merge(&wider);
        assert_eq!((inner.first, inner.last), (Some(ms(1)), Some(ms(9))));
        let mut idle = Span::default();
        idle.merge(&s);
        assert_eq!((idle.first, idle.last), (Some(ms(2)), Some(ms(3))), "a thread that measured nothing adds nothing");
        let mut late = Span { first: Some(ms(5)), last: Some(ms(6)) };
        late.merge(&Span { first: None, last: Some(ms(7)) });
        assert_eq!((late.first, late.last), (Some(ms(5)), Some(ms(7))));
    }
}
