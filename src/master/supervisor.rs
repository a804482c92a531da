//! The master's worker table: forking, reaping, respawning and replacing
//! workers.
//!
//! One rule drives everything: keep `target` workers of the current config
//! *generation* serving. [`Supervisor::reconcile`] moves one step towards it
//! after every event, and only one new worker starts at a time, so
//!
//! - a crashed worker is replaced (after a back-off if workers keep dying
//!   young, so a broken environment never makes the master spin);
//! - a reload (new generation) starts one new worker, waits until it reports
//!   Ready, then drains one old worker, and so on: capacity never dips and no
//!   connection is cut before its `shutdown_timeout`;
//! - TTIN/TTOU change `target` and the same step adds or drains a worker.
//!
//! A draining worker gets no new connections and exits by itself; if it is
//! still there well after its deadline it is killed.

use std::os::fd::{AsRawFd, OwnedFd};

/// An accepted connection not yet handed to a worker.
#[derive(Debug)]
pub struct Pending {
    pub fd: OwnedFd,
    /// The client's address, charged to the worker's table when the
    /// connection is sent; None on a PROXY listener (the peer is a
    /// balancer: the worker charges the client its header names).
    pub client: Option<std::net::IpAddr>,
}
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::tokens::Source;
use crate::config::{Config, MAX_WORKERS};
use crate::ipc::{Channel, Command};
use crate::scoreboard::{Scoreboard, SlotStats};
use crate::stats::{Carried, State};
use crate::sys::{self, Forked};
use crate::worker;

/// A worker dying sooner than this after it was forked counts as a start-up
/// failure (a broken environment, not bad luck) and raises the back-off.
const STARTUP_WINDOW: Duration = Duration::from_secs(5);
/// First respawn delay after a start-up failure; doubles per failure.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// The delay never exceeds this: a fixed environment recovers within it.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Consecutive start-up failures after which the master calls it a crash
/// loop in the log at error level.
const CRASH_LOOP_AFTER: u32 = 5;
/// Extra time a draining worker gets beyond `shutdown_timeout` (to record
/// its last connections and exit) before it is killed.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// A worker that has not reported Ready this long after fork is killed (and
/// counts as a start-up failure): a wedged start must not stall the
/// one-at-a-time replacement forever.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// A worker whose heartbeat is older than this gets no new connections.
pub const HUNG_AFTER_MS: u64 = 2000;

/// Where a worker is in its life, as the master sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Forked; has not reported Ready yet. Gets no connections; killed if
    /// still starting at `kill_at`.
    Starting { kill_at: Instant },
    /// Gets connections.
    Serving,
    /// Told to drain; gets no connections; killed if alive at `kill_at`.
    Draining { kill_at: Instant },
}

impl Phase {
    /// The state as operators see it (USR1 lines, `echod_worker_info`).
    pub fn state(&self) -> State {
        match self {
            Phase::Starting { .. } => State::Starting,
            Phase::Serving => State::Serving,
            Phase::Draining { .. } => State::Draining,
        }
    }
}

/// One worker process, from the master's side. Its identity (slot, pid,
/// channel) is fixed for its life and public; what changes is private and
/// changed through the methods below, so the table's rules (a phase moves
/// forward; `dispatched` only counts what was sent) hold in one place.
pub struct WorkerHandle {
    /// Scoreboard slot, also its name (`worker 3`) and metrics label.
    pub id: usize,
    pub pid: Pid,
    pub channel: Channel,
    /// The config generation it was forked with.
    generation: u64,
    phase: Phase,
    forked_at: Instant,
    /// Connections it may hold at once.
    capacity: usize,
    /// Connections sent to it so far. Its load is this minus the
    /// scoreboard's finished count.
    dispatched: u64,
    /// Connections picked for it during one dispatch pass and sent together
    /// at its end (what cannot be sent moves to the dispatcher's stash), so
    /// it is empty between passes.
    outbox: Vec<Pending>,
    /// Its channel was full at the last send; skipped until it drains.
    congested: bool,
    /// Its heartbeat stopped; skipped until it resumes.
    hung: bool,
    /// It gets no connections past this many (recycling); None = no limit.
    recycle_after: Option<u64>,
}

impl WorkerHandle {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Connections sent to it so far.
    pub fn dispatched(&self) -> u64 {
        self.dispatched
    }

    /// Whether it may be given connections at all, load aside: serving, its
    /// channel not full, its heartbeat fresh, and short of its recycling
    /// limit counting what its outbox already holds.
    pub fn takes_connections(&self) -> bool {
        self.phase == Phase::Serving
            && !self.congested
            && !self.hung
            && self.recycle_after.is_none_or(|n| self.dispatched + (self.outbox.len() as u64) < n)
    }

    /// Connections it holds or will hold: sent and not `finished` (its
    /// scoreboard count), plus its outbox.
    pub fn load(&self, finished: u64) -> u64 {
        (self.dispatched + self.outbox.len() as u64).saturating_sub(finished)
    }

    /// Connections picked for it this pass, not sent yet.
    pub fn outbox(&self) -> &[Pending] {
        &self.outbox
    }

    /// Picks `conn` for it; returns how many its outbox now holds.
    pub fn hold(&mut self, conn: Pending) -> usize {
        self.outbox.push(conn);
        self.outbox.len()
    }

    /// Empties the outbox, for sending (what cannot be sent is the
    /// caller's to keep).
    pub fn take_outbox(&mut self) -> Vec<Pending> {
        std::mem::take(&mut self.outbox)
    }

    /// `n` connections reached it over its channel.
    pub fn sent(&mut self, n: usize) {
        self.dispatched += n as u64;
    }

    /// Its channel is full (or failing): skipped until it says it drained.
    pub fn set_congested(&mut self, congested: bool) {
        self.congested = congested;
    }

    /// Past its connection limit: to be replaced like an old-generation
    /// worker (a new one first, then this one drains).
    pub fn spent(&self) -> bool {
        self.recycle_after.is_some_and(|n| self.dispatched >= n)
    }

    /// Whether it should be replaced by a worker of generation `current`.
    fn outdated(&self, current: u64) -> bool {
        self.generation < current || self.spent()
    }
}

/// The worker table and the policy that keeps it at its target.
pub struct Supervisor {
    workers: Vec<WorkerHandle>,
    /// The shared memory every worker reports in (a handle: copying it
    /// copies no state).
    pub scoreboard: Scoreboard,
    /// Counters of workers that have exited, so totals never go backwards.
    retired: SlotStats,
    /// The current config generation; bumped by every applied reload.
    generation: u64,
    /// How many workers of the current generation should serve.
    target: usize,
    /// Workers that exited without being asked to (each one respawned).
    restarts: u64,
    /// Totals of the generations before a binary upgrade (see
    /// `master::upgrade`), added to every snapshot.
    carried: Carried,
    /// Consecutive start-up failures (reset by a worker that lives past the
    /// start-up window).
    failures: u32,
    /// No worker is forked before this (the back-off).
    not_before: Option<Instant>,
    master_pid: Pid,
}

impl Supervisor {
    /// `capacity`: connections per worker at start, which sizes the
    /// scoreboard's per-address tables (see `spawn` for a reload past it).
    pub fn new(target: usize, capacity: usize) -> std::io::Result<Supervisor> {
        Ok(Supervisor {
            workers: Vec::new(),
            // Room for a full second set during a reload, plus TTIN headroom.
            scoreboard: Scoreboard::new(2 * MAX_WORKERS + 8, capacity)?,
            retired: SlotStats::default(),
            generation: 1,
            target,
            restarts: 0,
            carried: Default::default(),
            failures: 0,
            not_before: None,
            master_pid: nix::unistd::getpid(),
        })
    }

    pub fn workers(&self) -> &[WorkerHandle] {
        &self.workers
    }

    /// The workers, each to change through its own methods (the table
    /// itself, who is in it, changes only here).
    pub fn workers_mut(&mut self) -> &mut [WorkerHandle] {
        &mut self.workers
    }

    pub fn retired(&self) -> SlotStats {
        self.retired
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A new config generation is in force: its workers replace the
    /// others one by one, starting now (no back-off left from the old).
    pub fn next_generation(&mut self) {
        self.generation += 1;
        self.reset_backoff();
    }

    pub fn target(&self) -> usize {
        self.target
    }

    pub fn set_target(&mut self, target: usize) {
        self.target = target;
    }

    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    pub fn carried(&self) -> Carried {
        self.carried
    }

    /// What the generations before a binary upgrade counted.
    pub fn set_carried(&mut self, carried: Carried) {
        self.carried = carried;
    }

    pub fn get_mut(&mut self, id: usize) -> Option<&mut WorkerHandle> {
        self.workers.iter_mut().find(|w| w.id == id)
    }

    /// Whether `target` workers of the current generation have reported
    /// Ready (then READY=1 is due).
    pub fn all_ready(&self) -> bool {
        let serving = self.workers.iter().filter(|w| w.phase == Phase::Serving && w.generation == self.generation);
        serving.count() >= self.target
    }

    /// When the next back-off ends, if the table is waiting for one.
    pub fn next_deadline(&self) -> Option<Instant> {
        let kills = self.workers.iter().filter_map(|w| match w.phase {
            Phase::Draining { kill_at } | Phase::Starting { kill_at } => Some(kill_at),
            Phase::Serving => None,
        });
        kills.chain(self.not_before).min()
    }

    /// One step towards `target` serving workers of the current generation.
    /// Call after every event; it is cheap and idempotent.
    ///
    /// "Outdated" workers (older generation, or past their recycling limit)
    /// are replaced one at a time: a new worker is started first, and one
    /// outdated worker drains once the new one is Ready and the total
    /// exceeds the target.
    pub fn reconcile(&mut self, config: &Config, capacity: usize, registry: &Registry, now: Instant) {
        loop {
            let g = self.generation;
            let live = || self.workers.iter().filter(|w| !matches!(w.phase, Phase::Draining { .. }));
            if live().any(|w| matches!(w.phase, Phase::Starting { .. })) {
                return; // one new worker at a time; wait for it
            }
            let current = live().filter(|w| !w.outdated(g)).count();
            let old = live().filter(|w| w.outdated(g)).count();
            let oldest = live().filter(|w| w.outdated(g)).min_by_key(|w| (w.generation, w.id));
            if let Some(w) = oldest.filter(|_| current + old > self.target || current >= self.target) {
                let why = if w.spent() {
                    format!("recycled after {} connections (max_connections_per_worker)", w.dispatched)
                } else {
                    "replaced by a worker with the new config".to_string()
                };
                let id = w.id;
                self.retire(id, config.shutdown_timeout.0, &why, now);
                continue;
            }
            if old == 0 && current > self.target {
                if let Some(id) = live().max_by_key(|w| (w.forked_at, w.id)).map(|w| w.id) {
                    self.retire(id, config.shutdown_timeout.0, "fewer workers wanted", now);
                }
                continue;
            }
            if current < self.target {
                if self.not_before.is_some_and(|t| now < t) {
                    return; // backing off
                }
                self.not_before = None;
                if let Err(e) = self.spawn(config, capacity, registry, now) {
                    log::error!("cannot start a worker: {e}");
                    self.note_failure(now);
                }
            }
            return;
        }
    }

    /// Forks one worker of the current generation.
    fn spawn(&mut self, config: &Config, capacity: usize, registry: &Registry, now: Instant) -> std::io::Result<()> {
        let id = (0..self.scoreboard.slots())
            .find(|i| !self.workers.iter().any(|w| w.id == *i))
            .ok_or_else(|| std::io::Error::other("no free scoreboard slot"))?;
        let capacity = self.table_bound(capacity);
        let (ours, theirs) = Channel::pair()?;
        self.scoreboard.slot(id).reset();
        self.scoreboard.occupy(id);
        match sys::fork()? {
            Forked::Child => worker::run(worker::Args {
                id,
                master_pid: self.master_pid,
                config: config.clone(),
                channel: theirs,
                scoreboard: self.scoreboard,
                capacity,
                generation: self.generation,
            }),
            Forked::Parent(pid) => {
                drop(theirs);
                let token = Source::Worker(id).token();
                registry.register(&mut SourceFd(&ours.as_raw_fd()), token, Interest::READABLE | Interest::WRITABLE)?;
                log::info!("worker {id} started (pid {pid}, generation {})", self.generation);
                self.workers.push(WorkerHandle {
                    id,
                    pid,
                    channel: ours,
                    generation: self.generation,
                    phase: Phase::Starting { kill_at: now + START_TIMEOUT },
                    forked_at: now,
                    capacity,
                    dispatched: 0,
                    outbox: Vec::new(),
                    congested: false,
                    hung: false,
                    recycle_after: recycle_limit(config),
                });
                Ok(())
            }
        }
    }

    /// A worker's capacity, held to what the scoreboard's per-address
    /// tables were sized for at start (twice the capacity then): past it a
    /// table could fill, and connections would be refused for it. Only a
    /// reload that raises `threads_per_worker` / `worker_connections` gets
    /// here; a restart or a binary upgrade sizes the tables anew.
    fn table_bound(&self, capacity: usize) -> usize {
        let max = self.scoreboard.max_capacity();
        if capacity > max {
            log::warn!(
                "a worker gets {max} connections, not {capacity}: the per-address tables were sized at start \
                 (restart or upgrade, USR2, to raise it)"
            );
        }
        capacity.min(max)
    }

    /// Tells a worker to drain and stops giving it connections.
    pub fn retire(&mut self, id: usize, timeout: Duration, why: &str, now: Instant) {
        let Some(w) = self.get_mut(id) else { return };
        if matches!(w.phase, Phase::Draining { .. }) {
            return;
        }
        debug_assert!(w.outbox.is_empty(), "outboxes are empty between dispatch passes");
        w.phase = Phase::Draining { kill_at: now + timeout + DRAIN_GRACE };
        log::info!("worker {} (pid {}) draining: {why}", w.id, w.pid);
        if let Err(e) = w.channel.send_command(&Command::Drain { timeout }) {
            log::warn!("worker {}: cannot send drain ({e}); stopping it", w.id);
            let _ = kill(w.pid, Signal::SIGKILL);
        }
    }

    /// Tells every worker to drain (graceful stop) or quit (fast stop).
    pub fn stop_all(&mut self, graceful: bool, timeout: Duration, now: Instant) {
        for w in &mut self.workers {
            // A worker still starting holds no connection: it just quits (and
            // is killed soon if it cannot even do that).
            let drain = graceful && !matches!(w.phase, Phase::Starting { .. });
            let (cmd, kill_at) = if drain {
                (Command::Drain { timeout }, now + timeout + DRAIN_GRACE)
            } else {
                (Command::Quit, now + Duration::from_secs(1))
            };
            if let Phase::Draining { kill_at: k } = w.phase {
                if graceful {
                    continue; // already draining on its own deadline
                }
                w.phase = Phase::Draining { kill_at: k.min(kill_at) };
            } else {
                w.phase = Phase::Draining { kill_at };
            }
            if w.channel.send_command(&cmd).is_err() {
                let _ = kill(w.pid, Signal::SIGKILL);
            }
        }
    }

    /// Kills draining workers that overstayed their deadline, and workers
    /// that never finished starting.
    pub fn kill_overdue(&mut self, now: Instant) {
        for w in &mut self.workers {
            if let Phase::Starting { kill_at } = w.phase {
                if now >= kill_at {
                    log::error!(
                        "worker {} (pid {}) did not become ready in {START_TIMEOUT:?}; killing it",
                        w.id,
                        w.pid
                    );
                    let _ = kill(w.pid, Signal::SIGKILL);
                    w.phase = Phase::Starting { kill_at: now + Duration::from_secs(1) };
                }
            }
            if let Phase::Draining { kill_at } = w.phase {
                if now >= kill_at {
                    log::warn!("worker {} (pid {}) did not exit in time; killing it", w.id, w.pid);
                    let _ = kill(w.pid, Signal::SIGKILL);
                    // Once more in a while if even that did not reap it.
                    w.phase = Phase::Draining { kill_at: now + Duration::from_secs(1) };
                }
            }
        }
    }

    /// A worker reported Ready.
    pub fn mark_ready(&mut self, id: usize) {
        if let Some(w) = self.get_mut(id) {
            if matches!(w.phase, Phase::Starting { .. }) {
                w.phase = Phase::Serving;
                log::debug!("worker {id} (pid {}) ready", w.pid);
            }
        }
    }

    /// Records the exit of a child, if it was one of ours.
    pub fn on_exit(&mut self, status: WaitStatus, registry: &Registry, stopping: bool, now: Instant) {
        let Some(pid) = status.pid() else { return };
        let Some(pos) = self.workers.iter().position(|w| w.pid == pid) else { return };
        let w = self.workers.swap_remove(pos);
        debug_assert!(w.outbox.is_empty(), "outboxes are empty between dispatch passes");
        let _ = registry.deregister(&mut SourceFd(&w.channel.as_raw_fd()));
        let mut stats = self.scoreboard.slot(w.id).snapshot();
        // Connections it was sent and never finished (open ones, and ones
        // still in its channel) died with it: they count as closed, with an
        // error of kind `other`, so that accepted = closed + active holds
        // for good instead of showing them open forever.
        let lost = w.dispatched.saturating_sub(stats.finished);
        stats.finished += lost;
        stats.err_other += lost;
        self.retired.add_counters(&stats);
        // Its connections are gone: their clients no longer count against
        // max_connections_per_ip.
        self.scoreboard.vacate(w.id);
        let how = describe(status);
        let expected = matches!(w.phase, Phase::Draining { .. }) || stopping;
        if expected {
            log::info!("worker {} (pid {pid}) exited: {how}", w.id);
        } else {
            self.restarts += 1;
            // Dying before Ready is a start-up failure whatever the age.
            let young = matches!(w.phase, Phase::Starting { .. }) || now.duration_since(w.forked_at) < STARTUP_WINDOW;
            if young {
                self.note_failure(now);
            } else {
                self.failures = 0;
            }
            log::warn!(
                "worker {} (pid {pid}) died unexpectedly: {how}; {lost} open connection(s) lost; respawning{}",
                w.id,
                match self.not_before {
                    Some(t) if t > now => format!(" in {:.1}s", (t - now).as_secs_f64()),
                    _ => String::new(),
                }
            );
        }
    }

    /// A worker died young: back off exponentially, and say loudly when it
    /// looks like a crash loop.
    fn note_failure(&mut self, now: Instant) {
        self.failures += 1;
        let exp = (self.failures - 1).min(16);
        let delay = BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_MAX);
        self.not_before = Some(now + delay);
        if self.failures >= CRASH_LOOP_AFTER {
            log::error!(
                "crash loop: workers died within {}s of starting {} times in a row; next attempt in {:.1}s \
                 (fix the cause; send HUP after changing the config)",
                STARTUP_WINDOW.as_secs(),
                self.failures,
                delay.as_secs_f64()
            );
        }
    }

    /// Forgets the back-off (an operator acted: reload or TTIN).
    pub fn reset_backoff(&mut self) {
        self.failures = 0;
        self.not_before = None;
    }

    /// Marks workers whose heartbeat stalled (stopped or wedged processes)
    /// so they get no new connections, and logs each change.
    pub fn check_heartbeats(&mut self, now_ms: u64) {
        for w in &mut self.workers {
            if w.phase != Phase::Serving {
                continue;
            }
            let beat = self.scoreboard.slot(w.id).get(crate::scoreboard::Field::Heartbeat);
            let hung = now_ms.saturating_sub(beat) > HUNG_AFTER_MS;
            if hung != w.hung {
                w.hung = hung;
                if hung {
                    log::warn!("worker {} (pid {}) is not responding; no new connections go to it", w.id, w.pid);
                } else {
                    log::info!("worker {} (pid {}) is responding again", w.id, w.pid);
                }
            }
        }
    }
}

/// This worker's connection limit: the configured maximum plus a random
/// share of the jitter, so siblings do not recycle in lockstep.
fn recycle_limit(config: &Config) -> Option<u64> {
    use std::hash::{BuildHasher, Hasher};
    let max = config.max_connections_per_worker;
    if max == 0 {
        return None;
    }
    let jitter = config.max_connections_per_worker_jitter;
    // RandomState is seeded randomly per instance: enough for jitter.
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
    Some(max + if jitter > 0 { r % (jitter + 1) } else { 0 })
}

/// A child's exit in words: `exit status 0`, `killed by SIGKILL`.
pub(crate) fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit status {code}"),
        WaitStatus::Signaled(_, sig, core) => format!("killed by {sig}{}", if core { " (core dumped)" } else { "" }),
        other => format!("{other:?}"),
    }
}
