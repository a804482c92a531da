//! What the master reports about itself: one snapshot, many readers.
//!
//! USR1, the periodic `stats_interval` line, systemd's STATUS= and /metrics
//! all render the same [`Snapshot`], so they can never disagree. Counters are
//! the sum of live workers' scoreboard slots, of the totals the master
//! kept from workers that exited, and of what earlier masters handed over in
//! a binary upgrade, so they never go backwards.

use crate::scoreboard::SlotStats;

/// Where a worker is in its life, as operators see it (the supervisor's
/// phase without its deadlines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Starting,
    Serving,
    Draining,
}

impl State {
    /// The word in USR1 lines and `echod_worker_info`.
    pub fn name(&self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Serving => "serving",
            State::Draining => "draining",
        }
    }
}

/// One worker as the master sees it.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub id: usize,
    pub pid: i32,
    pub generation: u64,
    pub state: State,
    /// Connections sent to it.
    pub accepted: u64,
    /// Connections it holds (sent, not yet finished).
    pub active: u64,
    pub capacity: usize,
    pub slot: SlotStats,
}

/// The metrics endpoint's own counters (`echod_metrics_*_total`), carried
/// across a binary upgrade like the connection counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EndpointTotals {
    /// Scrape connections closed to make room for a new one.
    pub evicted: u64,
    /// Scrape connections closed at accept.
    pub refused: u64,
    /// Scrape connections reset at their deadline.
    pub aborted: u64,
    /// Times the exposition was rendered.
    pub renders: u64,
}

impl EndpointTotals {
    pub fn add(&mut self, o: &EndpointTotals) {
        self.evicted += o.evicted;
        self.refused += o.refused;
        self.aborted += o.aborted;
        self.renders += o.renders;
    }
}

/// Counters one master hands to the other in a binary upgrade so totals
/// never go backwards: the old master's totals to the new one, and the new
/// one's own totals back (for a rollback).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Carried {
    pub accepted: u64,
    pub rejected: u64,
    pub restarts: u64,
    pub totals: SlotStats,
    pub endpoint: EndpointTotals,
}

impl Carried {
    /// What a successor master carries on from a snapshot of this one.
    pub fn of(s: &Snapshot) -> Carried {
        Carried {
            accepted: s.accepted,
            // The workers' share travels in `totals`.
            rejected: s.rejected - s.totals.rejected,
            restarts: s.restarts,
            totals: s.totals,
            endpoint: EndpointTotals::default(),
        }
    }

    /// Connections counted as accepted and not yet as closed: on a new
    /// master, those its predecessor still drains.
    pub fn open(&self) -> u64 {
        self.accepted.saturating_sub(self.totals.finished)
    }

    /// Counts every open connection as closed with an error: they died
    /// with the master that held them (its workers have PR_SET_PDEATHSIG).
    /// Returns how many.
    pub fn close_lost(&mut self) -> u64 {
        let lost = self.open();
        self.totals.finished += lost;
        self.totals.err_other += lost;
        lost
    }

    /// Adds `other`'s counters to these.
    pub fn add(&mut self, other: &Carried) {
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.restarts += other.restarts;
        self.totals.add_counters(&other.totals);
        self.endpoint.add(&other.endpoint);
    }

    /// The `totals ...` line of the upgrade channel.
    pub fn encode(&self) -> String {
        let t = &self.totals;
        let mut line = format!(
            "totals {} {} {} {} {} {} {} {} {} {} {}",
            self.accepted,
            self.rejected,
            self.restarts,
            t.received,
            t.finished,
            t.bytes_in,
            t.bytes_out,
            t.err_reset,
            t.err_timeout,
            t.err_other,
            t.duration_sum_us
        );
        for d in t.duration {
            line.push_str(&format!(" {d}"));
        }
        for v in [t.proxied, t.rejected].iter().chain(&t.proxy_errors) {
            line.push_str(&format!(" {v}"));
        }
        let e = &self.endpoint;
        for v in [e.evicted, e.refused, e.aborted, e.renders, t.log_dropped] {
            line.push_str(&format!(" {v}"));
        }
        line.push('\n');
        line
    }

    /// Reads a `totals ...` line; None for anything else.
    pub fn decode(line: &str) -> Option<Carried> {
        let mut words = line.strip_prefix("totals ")?.split(' ').map(|w| w.parse::<u64>().ok());
        let mut next = || words.next().flatten();
        let mut c = Carried { accepted: next()?, rejected: next()?, restarts: next()?, ..Carried::default() };
        let t = &mut c.totals;
        (t.received, t.finished, t.bytes_in, t.bytes_out) = (next()?, next()?, next()?, next()?);
        (t.err_reset, t.err_timeout, t.err_other, t.duration_sum_us) = (next()?, next()?, next()?, next()?);
        for d in t.duration.iter_mut() {
            *d = next()?;
        }
        // Added with the PROXY protocol: a predecessor built before it
        // sends none of these, which then start from zero.
        for v in [&mut t.proxied, &mut t.rejected].into_iter().chain(t.proxy_errors.iter_mut()) {
            *v = next().unwrap_or(0);
        }
        // Added when the endpoint's counters began to be carried.
        let e = &mut c.endpoint;
        for v in [&mut e.evicted, &mut e.refused, &mut e.aborted, &mut e.renders] {
            *v = next().unwrap_or(0);
        }
        // Added with the connection log.
        t.log_dropped = next().unwrap_or(0);
        Some(c)
    }
}

/// Everything at one moment (built by the master, which owns the workers
/// and the dispatcher; this module only renders it).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub accepted: u64,
    pub rejected: u64,
    /// Connections held by echod: in workers, or accepted and not yet sent.
    pub active: u64,
    /// Connections the previous generation still drains during a binary
    /// upgrade: counted in `accepted` (carried over), not yet in `closed`,
    /// and held by no worker of this master, so without them accepted =
    /// closed + active would not hold on the new master until the drain ends.
    pub draining: u64,
    pub restarts: u64,
    pub generation: u64,
    pub target: usize,
    /// Counters summed over live and exited workers.
    pub totals: SlotStats,
    pub workers: Vec<WorkerView>,
}

impl Snapshot {
    /// Workers that take connections (not starting, not draining).
    pub fn serving(&self) -> usize {
        self.workers.iter().filter(|w| w.state == State::Serving).count()
    }

    /// The one-line summary (periodic stats, USR1 first line).
    pub fn summary(&self) -> String {
        let t = &self.totals;
        format!(
            "stats: workers={}/{} active={} accepted={} rejected={} closed={} bytes_in={} bytes_out={} \
             errors={} (reset={} timeout={} other={}) restarts={}",
            self.serving(),
            self.target,
            self.active,
            self.accepted,
            self.rejected,
            t.finished,
            t.bytes_in,
            t.bytes_out,
            t.errors(),
            t.err_reset,
            t.err_timeout,
            t.err_other,
            self.restarts
        )
    }

    /// One line per worker (USR1).
    pub fn worker_lines(&self) -> Vec<String> {
        self.workers
            .iter()
            .map(|w| {
                format!(
                    "worker {}: pid={} {} gen={} active={} accepted={} bytes_in={} bytes_out={} threads={} busy={} \
                     idle={} queued={} capacity={}",
                    w.id,
                    w.pid,
                    w.state.name(),
                    w.generation,
                    w.active,
                    w.accepted,
                    w.slot.bytes_in,
                    w.slot.bytes_out,
                    w.slot.threads,
                    w.slot.busy,
                    w.slot.threads.saturating_sub(w.slot.busy),
                    w.slot.queued,
                    w.capacity
                )
            })
            .collect()
    }

    /// systemd's STATUS= one-liner.
    pub fn status(&self) -> String {
        format!("{} workers, {} active connections, {} accepted", self.serving(), self.active, self.accepted)
    }
}
