//! What the master reports about itself: one snapshot, many readers.
//!
//! USR1, the periodic `stats_interval` line, systemd's STATUS= and /metrics
//! all render the same [`Snapshot`], so they can never disagree. Counters are
//! the sum of live workers' scoreboard slots, of the totals the master
//! kept from workers that exited, and of what earlier masters handed over in
//! a binary upgrade, so they never go backwards.

use crate::master::dispatch::Dispatcher;
use crate::master::supervisor::{Phase, Supervisor};
use crate::scoreboard::SlotStats;

/// One worker as the master sees it.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub id: usize,
    pub pid: i32,
    pub generation: u64,
    pub phase: Phase,
    /// Connections sent to it.
    pub accepted: u64,
    /// Connections it holds (sent, not yet finished).
    pub active: u64,
    pub capacity: usize,
    pub slot: SlotStats,
}

/// Everything at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub accepted: u64,
    pub rejected: u64,
    /// Connections held by echod: in workers, or accepted and not yet sent.
    pub active: u64,
    pub restarts: u64,
    pub generation: u64,
    pub target: usize,
    /// Counters summed over live and exited workers.
    pub totals: SlotStats,
    pub workers: Vec<WorkerView>,
}

impl Snapshot {
    pub fn take(sup: &Supervisor, disp: &Dispatcher) -> Snapshot {
        let mut totals = sup.retired;
        totals.add_counters(&sup.carried.totals);
        let mut workers: Vec<WorkerView> = sup
            .workers
            .iter()
            .map(|w| {
                let slot = sup.scoreboard.slot(w.id).snapshot();
                totals.add_counters(&slot);
                WorkerView {
                    id: w.id,
                    pid: w.pid.as_raw(),
                    generation: w.generation,
                    phase: w.phase,
                    accepted: w.dispatched,
                    active: w.dispatched.saturating_sub(slot.finished),
                    capacity: w.capacity,
                    slot,
                }
            })
            .collect();
        workers.sort_by_key(|w| w.id);
        let active = workers.iter().map(|w| w.active).sum::<u64>() + disp.held(sup) as u64;
        Snapshot {
            accepted: disp.accepted + sup.carried.accepted,
            // The master's rejections, and the workers' (PROXY listeners).
            rejected: disp.rejected + sup.carried.rejected + totals.rejected,
            active,
            restarts: sup.restarts + sup.carried.restarts,
            generation: sup.generation,
            target: sup.target,
            totals,
            workers,
        }
    }

    /// What a successor master carries on from this one.
    pub fn carried(&self) -> crate::master::upgrade::Carried {
        crate::master::upgrade::Carried {
            accepted: self.accepted,
            // The workers' share travels in `totals`.
            rejected: self.rejected - self.totals.rejected,
            restarts: self.restarts,
            totals: self.totals,
        }
    }

    /// Workers that take connections (not starting, not draining).
    pub fn serving(&self) -> usize {
        self.workers.iter().filter(|w| w.phase == Phase::Serving).count()
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
                    w.phase.name(),
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
