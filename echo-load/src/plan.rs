//! What a run is asked to do and the clock and state its threads share:
//! the options from the command line, the measured window, and the few
//! atomics the driver and the load threads both touch.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
    pub proxy: Option<proxy_protocol::Version>,
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

/// The run's clock, the same for every thread.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Messages issued (open loop: due) from here on are measured: the
    /// warm-up is over.
    pub start: Instant,
    /// No message is issued (open loop: due) from here on. `None` with
    /// `--count`, where the tickets decide.
    pub end: Option<Instant>,
}

/// State shared by the driver and the event-loop threads.
#[derive(Default)]
pub struct Shared {
    /// Set to end the run now (Ctrl-C, or a `--count` run making no
    /// progress): threads stop issuing and settle what is in flight.
    pub stop: AtomicBool,
    /// `--count`: measured messages issued so far, over all threads. Each
    /// takes a ticket, so a run issues exactly `count`.
    pub(super) tickets: AtomicU64,
    /// Live totals for the progress display (measured only).
    pub responses: AtomicU64,
    pub errors: AtomicU64,
    pub mismatches: AtomicU64,
    /// Messages given an outcome: a `--count` run with none for `timeout`
    /// is stopped.
    pub(super) settled: AtomicU64,
    /// Threads that have returned their results.
    pub(super) finished: AtomicUsize,
}

impl Shared {
    /// Takes one of `count` tickets; false once they are gone.
    pub fn take_ticket(&self, count: u64) -> bool {
        self.tickets.fetch_add(1, Ordering::AcqRel) < count
    }

    pub fn tickets_out(&self, count: Option<u64>) -> bool {
        count.is_some_and(|c| self.tickets.load(Ordering::Acquire) >= c)
    }
}

#[cfg(test)]
impl Options {
    /// What the unit tests start from and override: one connection to
    /// 127.0.0.1:9, 8-byte messages, closed loop for 1 s, no ramp-up or
    /// warm-up, a 1 s timeout.
    pub fn for_tests() -> Options {
        Options {
            addrs: vec!["127.0.0.1:9".parse().expect("an address")],
            connections: 1,
            duration: Some(Duration::from_secs(1)),
            count: None,
            size: 8,
            pipeline: 1,
            rate: None,
            churn: false,
            lines: false,
            proxy: None,
            threads: 1,
            warmup: Duration::ZERO,
            ramp_up: Duration::ZERO,
            timeout: Duration::from_secs(1),
        }
    }
}
