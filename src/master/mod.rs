//! The master process: one thread, one poll loop.
//!
//! Like nginx's master cycle, the loop waits for a few kinds of event and
//! hands each to one handler; an event's token decodes to its
//! [`tokens::Source`], the one list of what the poll watches:
//!
//! | event                         | handler                  |
//! |-------------------------------|--------------------------|
//! | signal (via signal-hook pipe) | [`Master::on_signal`]    |
//! | child exit (SIGCHLD)          | [`Master::on_child_exit`]|
//! | worker channel readable/writable | [`Master::on_channel`] |
//! | listener readable             | marks it ready for the dispatcher |
//! | metrics listener / scrape     | [`http::HttpServer`]     |
//! | upgrade channel to the new master | `Master::on_successor_channel` |
//! | upgrade channel from the old master | `Master::on_predecessor_channel` |
//! | timer (the poll timeout)      | [`Master::on_timers`]    |
//!
//! after which the supervisor takes one step towards its target and the
//! dispatcher accepts and hands out connections, as far as the master's
//! [`Lifecycle`] allows: that one state decides whether it accepts, whether
//! it speaks for the service to systemd, and what each signal means now. The master never blocks and
//! never starts a thread: it forks workers for its whole life (respawns,
//! reloads, TTIN), and fork is only safe from a single-threaded process.

pub mod dispatch;
pub mod http;
pub mod listeners;
pub mod pidfile;
pub mod signals;
pub mod supervisor;
pub mod tokens;
pub mod upgrade;

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::{Events, Poll};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

use crate::config::{Config, Overrides};
use crate::ipc::Notice;
use crate::metrics::{self, MasterInfo};
use crate::scoreboard::monotonic_ms;
use crate::stats::{Snapshot, WorkerView};
use crate::systemd::{self, Notifier};
use crate::{limits, logging, privileges};
use dispatch::Dispatcher;
use http::HttpServer;
use listeners::Listeners;
use signals::{Signal, SignalSource};
use supervisor::Supervisor;
use tokens::Source;
use upgrade::{Predecessor, Successor};

/// How often worker heartbeats are checked.
const HEARTBEAT_CHECK: Duration = Duration::from_millis(500);
/// How often systemd's STATUS= line is refreshed (only sent when changed).
const STATUS_EVERY: Duration = Duration::from_secs(2);

pub use http::METRICS_FD_NAME;

/// Why the master could not start. The binary maps each to an exit code.
#[derive(Debug)]
pub enum StartError {
    /// The config cannot be applied (exit 78).
    Config(crate::config::ConfigError),
    /// Nothing to listen on, or an address cannot be bound.
    Listen(String),
    /// Any other OS failure (poll, signals, scoreboard).
    Os(io::Error),
}

impl From<io::Error> for StartError {
    fn from(e: io::Error) -> Self {
        StartError::Os(e)
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Listen(m) => write!(f, "{m}"),
            StartError::Config(e) => write!(f, "{e}"),
            StartError::Os(e) => write!(f, "{e}"),
        }
    }
}

/// Reads every pending notice on a worker's channel; true if it said Ready.
fn read_notices(id: usize, channel: &crate::ipc::Channel) -> bool {
    let mut ready = false;
    loop {
        match channel.try_recv_notice() {
            Ok(Some(Notice::Ready)) => ready = true,
            // Nothing to do: the dispatch pass after every event re-reads
            // capacity from the scoreboard.
            Ok(Some(Notice::RecheckRoom)) => {}
            Ok(None) => return ready,
            Err(e) => {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    log::debug!("worker {id} channel: {e}");
                }
                return ready; // its exit arrives as SIGCHLD
            }
        }
    }
}

/// Where the master is in its life. Each state decides, in one place,
/// whether the master accepts, whether it speaks for the service (MAINPID,
/// READY, STATUS, WATCHDOG, RELOADING, STOPPING, the fd store), what a
/// signal means now, and what the exit of a new master means (DESIGN §3b).
enum Lifecycle {
    /// Started by a binary upgrade: the old master still accepts and is
    /// the unit's main process. This one starts its workers, reports ready
    /// to the old one, and accepts nothing and tells systemd nothing until
    /// the old master says `go` (or is gone).
    Starting,
    /// The service's main master: accepts, speaks for the service.
    Serving,
    /// USR2 started a new master that is not ready yet; this one serves on.
    Upgrading {
        successor: Successor,
        /// A HUP arrived meanwhile. The new master reads the file itself and
        /// the sockets it inherits were fixed at fork, so the reload waits:
        /// applied here if the upgrade fails, passed on if it succeeds.
        reload_deferred: bool,
    },
    /// A graceful stop in its `shutdown_delay`: /healthz answers 503 while
    /// the listeners still accept, so balancers notice first.
    StopDelayed { at: Instant },
    /// The new master serves and is the main process; this old generation
    /// drains, its listeners kept open but unpolled. HUP, TTIN and TTOU are
    /// passed on to the new master.
    HandedOver {
        successor: Successor,
        /// Take over again if the new master dies before this one exits.
        /// Off once the operator stopped this generation, or the new master
        /// said it was told to stop (the service is stopping).
        take_back: bool,
        /// The drain is graceful (a QUIT makes it fast).
        graceful: bool,
    },
    /// Stopping: workers finish (graceful) or are cut (fast); the master
    /// exits once the last is reaped.
    Stopping {
        graceful: bool,
        /// Whether this master is the unit's main process: not if it was
        /// stopped while `Starting`, or after a hand-over.
        main: bool,
    },
}

impl Lifecycle {
    /// Speaks for the service to systemd (MAINPID is this process).
    fn is_main(&self) -> bool {
        match self {
            Lifecycle::Serving | Lifecycle::Upgrading { .. } | Lifecycle::StopDelayed { .. } => true,
            Lifecycle::Stopping { main, .. } => *main,
            Lifecycle::Starting | Lifecycle::HandedOver { .. } => false,
        }
    }

    /// Keeps its worker pool at the target (respawns, reloads, scaling).
    fn runs_workers(&self) -> bool {
        matches!(
            self,
            Lifecycle::Starting | Lifecycle::Serving | Lifecycle::Upgrading { .. } | Lifecycle::StopDelayed { .. }
        )
    }

    /// Accepts connections on its listeners.
    fn accepts(&self) -> bool {
        matches!(self, Lifecycle::Serving | Lifecycle::Upgrading { .. } | Lifecycle::StopDelayed { .. })
    }

    /// A stop was asked for, or this generation handed over: /healthz
    /// says 503, reloads and scaling no longer apply here.
    fn is_stopping(&self) -> bool {
        matches!(self, Lifecycle::StopDelayed { .. } | Lifecycle::HandedOver { .. } | Lifecycle::Stopping { .. })
    }

    /// The new master this one started, while it is one of our concerns.
    fn successor(&self) -> Option<&Successor> {
        match self {
            Lifecycle::Upgrading { successor, .. } | Lifecycle::HandedOver { successor, .. } => Some(successor),
            _ => None,
        }
    }
}

/// The master's state.
pub struct Master {
    config: Config,
    /// The config file to re-read on HUP (None: built-in defaults).
    source: Option<PathBuf>,
    /// Command-line settings, re-applied over every reload.
    overrides: Overrides,
    /// `workers` as of the last loaded file, so TTIN/TTOU survive a reload
    /// that does not change it.
    file_workers: usize,
    /// Connections one worker may hold (`Config::connections_per_worker`
    /// within the fd limit).
    capacity: usize,
    poll: Poll,
    signals: SignalSource,
    listeners: Listeners,
    sup: Supervisor,
    disp: Dispatcher,
    notify: Notifier,
    /// Where this master is in its life; see [`Lifecycle`].
    life: Lifecycle,
    /// READY=1 is owed to systemd once the current generation serves
    /// (at start-up and after each reload).
    ready_owed: bool,
    next_stats: Option<Instant>,
    next_heartbeat_check: Instant,
    next_status: Instant,
    /// The /metrics and /healthz endpoint, if `metrics_listen` is set.
    http: Option<HttpServer>,
    /// The endpoint's socket came from systemd: reloads keep it.
    metrics_from_systemd: bool,
    /// Reported in /metrics.
    info: MasterInfo,
    /// How this master was started, for USR2.
    invocation: upgrade::Invocation,
    /// The old master that started this one, while it drains: it sends its
    /// totals, we send ours (and whether we were told to stop).
    predecessor: Option<Predecessor>,
    /// The inherited metrics socket, served once the old master's totals
    /// arrived, so scraped counters never go backwards.
    pending_metrics: Option<std::net::TcpListener>,
    /// Stopped with messages to the old master still queued: exit by then
    /// at the latest (see `owes_predecessor`).
    exit_grace_until: Option<Instant>,
    /// `pid_file`, kept naming this master while it is main (see `enter`).
    pid_file: pidfile::PidFile,
}

/// The sockets found in LISTEN_FDS at start, by kind.
#[derive(Default)]
struct Passed {
    activated: Vec<systemd::Activated>,
    activated_metrics: Vec<std::os::fd::OwnedFd>,
    inherited: Vec<std::os::fd::OwnedFd>,
    inherited_metrics: Vec<std::os::fd::OwnedFd>,
}

/// What the HTTP endpoint answers with: a view of the master's state.
struct Endpoint<'a> {
    sup: &'a Supervisor,
    disp: &'a Dispatcher,
    info: MasterInfo,
    stopping: bool,
}

impl http::Responder for Endpoint<'_> {
    fn metrics(&self) -> String {
        let snap = snapshot(self.sup, self.disp);
        metrics::render(&snap, &self.info, &processes(&snap))
    }

    fn healthy(&self) -> bool {
        !self.stopping && self.sup.workers().iter().any(|w| w.phase() == supervisor::Phase::Serving)
    }
}

/// The `process_*` samples of this master and of each of its workers (a
/// process gone since the snapshot has none).
fn processes(snap: &Snapshot) -> Vec<(metrics::process::Role, metrics::process::Sample)> {
    use metrics::process::{self, Role};
    let master = process::read(std::process::id(), process::count_open_fds()).map(|s| (Role::Master, s));
    let workers = snap.workers.iter().filter_map(|w| {
        let pid = u32::try_from(w.pid).ok()?;
        Some((Role::Worker(w.id), process::read(pid, w.slot.open_fds)?))
    });
    master.into_iter().chain(workers).collect()
}

/// Seconds since the Unix epoch, for /metrics timestamps.
fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Master {
    /// Binds (or adopts) the listeners and sets up the loop. Starts no worker
    /// yet: that is the loop's first step.
    /// `signals` are the handlers `main` installed before it read the
    /// config ([`signals::install`]).
    pub fn new(
        config: Config,
        source: Option<PathBuf>,
        overrides: Overrides,
        mut signals: SignalSource,
    ) -> Result<Master, StartError> {
        let text = text_for_errors(source.as_deref());
        let capacity = fit_limits(&config, source.as_deref(), &text)?;
        let poll = Poll::new()?;
        signals.register(poll.registry(), Source::Signals.token())?;

        // Sockets passed in at exec: systemd's socket unit (they win over
        // `listen`; the one named "metrics" serves /metrics), or an earlier
        // master's (binary upgrade, or systemd's fd store across a restart),
        // matched against the config.
        let mut passed = Passed::default();
        for a in systemd::listen_fds()? {
            match a.name.as_str() {
                METRICS_FD_NAME => passed.activated_metrics.push(a.fd),
                upgrade::FDNAME_METRICS => passed.inherited_metrics.push(a.fd),
                upgrade::FDNAME_LISTENER => passed.inherited.push(a.fd),
                _ => passed.activated.push(a),
            }
        }
        let predecessor = upgrade::Predecessor::from_env(poll.registry())?;
        let listeners = if !passed.activated.is_empty() {
            let names: Vec<&str> = passed.activated.iter().map(|a| a.name.as_str()).collect();
            log::info!("using {} echo socket(s) passed by systemd ({})", names.len(), names.join(", "));
            // Any name but ours means socket activation, which overrides
            // `listen`: say so, in case the names were not meant for us.
            let listed: Vec<String> = config.listen.iter().map(|a| a.to_string()).collect();
            log::info!(
                "`listen` ({}) is ignored: LISTEN_FDS passed socket(s) named {}, which echod takes as socket \
                 activation (it names its own `{}`/`{}`)",
                listed.join(", "),
                names.join(", "),
                upgrade::FDNAME_LISTENER,
                upgrade::FDNAME_METRICS
            );
            Listeners::adopt(passed.activated.into_iter().map(|a| (a.fd, a.name)).collect(), &config)?
        } else if !passed.inherited.is_empty() {
            log::info!("taking over {} listening socket(s) from the previous master", passed.inherited.len());
            Listeners::inherit(upgrade::inherited_listeners(passed.inherited), &config)
                .map_err(|(addr, e)| StartError::Listen(format!("cannot listen on {addr}: {e}")))?
        } else {
            Listeners::bind(&config).map_err(|(addr, e)| StartError::Listen(format!("cannot listen on {addr}: {e}")))?
        };
        if listeners.is_empty() {
            return Err(StartError::Listen("nothing to listen on: `listen` is empty".into()));
        }
        listeners.register(poll.registry())?;
        for addr in listeners.addrs() {
            log::info!("listening on {addr}");
        }
        for addr in listeners.proxied() {
            log::info!("{addr} expects a PROXY protocol header (trusted: {})", config.proxy_trusted_list());
        }
        listeners.warn_unmatched_proxy(&config);
        let metrics_from_systemd = !passed.activated_metrics.is_empty();
        // An inherited metrics socket still named by `metrics_listen`.
        let inherited_metrics = passed.inherited_metrics.into_iter().map(std::net::TcpListener::from).find(|l| {
            l.local_addr()
                .is_ok_and(|a| config.metrics_listen.is_some_and(|m| m == a || (m.port() == 0 && m.ip() == a.ip())))
        });
        let mut pending_metrics = None;
        let http = match (passed.activated_metrics.into_iter().next(), inherited_metrics, config.metrics_listen) {
            // Served once the old master's totals arrived (see upgrade.rs):
            // until then the old master answers on the same socket, and two
            // masters answering with different totals look like counters
            // going backwards.
            (Some(fd), _, _) if predecessor.is_some() => {
                pending_metrics = Some(std::net::TcpListener::from(fd));
                None
            }
            (Some(fd), _, _) => Some(HttpServer::adopt(std::net::TcpListener::from(fd), poll.registry())?),
            (None, Some(l), _) if predecessor.is_some() => {
                pending_metrics = Some(l);
                None
            }
            (None, Some(l), _) => Some(HttpServer::adopt(l, poll.registry())?),
            (None, None, Some(addr)) => Some(
                HttpServer::bind(addr, poll.registry())
                    .map_err(|e| StartError::Listen(format!("cannot serve metrics on {addr}: {e}")))?,
            ),
            (None, None, None) => None,
        };
        if let Some(h) = &http {
            log::info!("metrics on http://{}/metrics", h.addr);
        }

        // Everything privileged is done: bind first, then drop. (`text`
        // was read while the master still could: where to point if `user`
        // turns out unable to read it, see privileges::check_reachable.)
        drop_privileges(&config, source.as_deref(), &text)?;
        let pid_file = open_pid_file(&config, source.as_deref(), &text, predecessor.is_none())?;
        let sup = Supervisor::new(config.worker_count(), capacity)?;
        let now = Instant::now();
        let started = unix_now();
        // A new master is main at once only when its predecessor will not
        // say "go" (a master from before that protocol).
        let life = if predecessor.as_ref().is_some_and(|p| !p.go) { Lifecycle::Starting } else { Lifecycle::Serving };
        let notify = Notifier::from_env(life.is_main(), predecessor.is_some());
        let mut master = Master {
            file_workers: config.worker_count(),
            next_stats: config.stats_interval.nonzero().map(|d| now + d),
            config,
            source,
            overrides,
            capacity,
            poll,
            signals,
            listeners,
            sup,
            disp: Dispatcher::default(),
            notify,
            life,
            ready_owed: true,
            next_heartbeat_check: now + HEARTBEAT_CHECK,
            next_status: now,
            http,
            metrics_from_systemd,
            info: MasterInfo { start_time: started, last_reload_ok: true, last_reload_time: started },
            invocation: upgrade::Invocation::current(),
            predecessor,
            pending_metrics,
            exit_grace_until: None,
            pid_file,
        };
        master.pid_file.set_main(master.life.is_main());
        master.store_fds();
        Ok(master)
    }

    /// Runs until stopped; returns the process exit code.
    pub fn run(mut self) -> io::Result<i32> {
        let mut events = Events::with_capacity(256);
        limits::check(&self.config, self.sup.target(), self.capacity);
        log::info!(
            "echod {} starting {} worker(s) in {} mode, up to {} connections each (pid {})",
            crate::cli::VERSION,
            self.sup.target(),
            self.config.handler.name(),
            self.capacity,
            std::process::id()
        );
        loop {
            let now = Instant::now();
            let timeout = self.next_deadline(now).map(|d| d.saturating_duration_since(now));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in events.iter() {
                match Source::of(event.token()) {
                    Some(Source::Signals) => {
                        for d in self.signals.take() {
                            // Who asked, for every control action (not for
                            // CHLD, the kernel's).
                            if d.signal != signals::Signal::Child {
                                log::info!("signal {}", d.describe());
                            }
                            self.on_signal(d.signal, d.times);
                        }
                    }
                    Some(Source::Successor) => self.on_successor_channel(),
                    Some(Source::Predecessor) => self.on_predecessor_channel(),
                    Some(Source::MetricsListener) => self.on_metrics_listener(),
                    Some(Source::Listener(id)) => self.listeners.mark_ready(id),
                    Some(Source::Scrape(id)) => self.on_scrape(id),
                    Some(Source::Worker(slot)) => self.on_channel(slot, event.is_readable(), event.is_writable()),
                    None => {}
                }
            }
            let now = Instant::now();
            self.on_timers(now);
            self.send_totals();
            if self.life.runs_workers() {
                self.sup.reconcile(&self.config, self.capacity, self.poll.registry(), now);
                // A new master accepts only once the old one stopped: a
                // connection it took and then lost to a failed upgrade
                // would be cut.
                if self.life.accepts() {
                    self.disp.run(&mut self.listeners, &mut self.sup, dispatch::Limits::of(&self.config), now);
                }
                self.announce_ready();
            } else if self.sup.workers().is_empty() && !self.owes_predecessor(now) {
                log::info!("all workers exited; bye");
                return Ok(0);
            }
        }
    }

    /// A stopping new master waits (up to EXIT_GRACE past its last worker)
    /// for the old one to take what is queued for it: its `stopping` above
    /// all, without which the old master would take over a stopped service.
    fn owes_predecessor(&mut self, now: Instant) -> bool {
        if !self.predecessor.as_ref().is_some_and(|p| p.unsent()) {
            return false;
        }
        let until = *self.exit_grace_until.get_or_insert(now + upgrade::EXIT_GRACE);
        if now >= until {
            log::warn!("upgrade: the old master did not read what this master told it; exiting anyway");
            return false;
        }
        true
    }

    /// Moves to `life`, and tells the notifier whether this master speaks
    /// for the service there: the one place that decides who talks to
    /// systemd.
    fn enter(&mut self, life: Lifecycle) {
        self.notify.set_main(life.is_main());
        self.pid_file.set_main(life.is_main());
        self.life = life;
    }

    /// Takes the state out to move what it owns (the successor) into the
    /// next one; the caller must `enter` a state before returning.
    fn take_life(&mut self) -> Lifecycle {
        std::mem::replace(&mut self.life, Lifecycle::Serving)
    }

    /// The earliest moment the loop must wake without an event.
    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        [
            self.sup.next_deadline(),
            self.disp.next_deadline(now),
            self.notify.next_deadline(),
            self.next_stats,
            Some(self.next_heartbeat_check),
            Some(self.next_status),
            self.http.as_ref().and_then(|h| h.next_deadline()),
            match &self.life {
                Lifecycle::Upgrading { successor, .. } => Some(successor.deadline),
                Lifecycle::StopDelayed { at } => Some(*at),
                _ => None,
            },
            // Retry what waits for room on the channel to the old master.
            self.predecessor.as_ref().filter(|p| p.unsent()).map(|_| now + Duration::from_millis(20)),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Signal handler (run in the loop, not in signal context); `times`
    /// is how often it was delivered (counted for TTIN and TTOU).
    fn on_signal(&mut self, sig: Signal, times: usize) {
        match sig {
            Signal::Stop => self.on_stop_signal(true),
            Signal::Quit => self.on_stop_signal(false),
            Signal::Reload | Signal::MoreWorkers | Signal::FewerWorkers => self.on_config_signal(sig, times),
            Signal::Stats => self.log_stats(true),
            Signal::Upgrade => self.begin_upgrade(),
            Signal::Child => self.on_child_exit(),
        }
    }

    /// HUP, TTIN, TTOU: applied here, deferred, passed on to the new master
    /// that serves in this one's place, or refused, by state.
    fn on_config_signal(&mut self, sig: Signal, times: usize) {
        let name = match sig {
            Signal::Reload => "HUP",
            Signal::MoreWorkers => "TTIN",
            _ => "TTOU",
        };
        match &mut self.life {
            Lifecycle::Upgrading { successor, reload_deferred } if sig == Signal::Reload => {
                log::info!(
                    "reload deferred: the new master (pid {}) is starting; applied when the upgrade ends",
                    successor.pid
                );
                *reload_deferred = true;
            }
            Lifecycle::HandedOver { successor, .. } => {
                let pid = successor.pid;
                log::info!(
                    "{name} x{times}: this master handed over to the new master (pid {pid}), which serves; passing it on"
                );
                match sig {
                    // HUPs may merge: one reload is all they ask.
                    Signal::Reload => {
                        if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP) {
                            log::warn!("cannot pass HUP on to pid {pid}: {e}");
                        }
                    }
                    // A count on the channel: re-sent signals could merge.
                    Signal::MoreWorkers => successor.scale(times as i64),
                    _ => successor.scale(-(times as i64)),
                }
            }
            Lifecycle::StopDelayed { .. } | Lifecycle::Stopping { .. } => {
                log::info!("{name} ignored: this master is stopping");
            }
            _ => match sig {
                Signal::Reload => self.reload(),
                Signal::MoreWorkers => self.scale(times as isize),
                _ => self.scale(-(times as isize)),
            },
        }
    }

    /// Reaps every exited child.
    fn on_child_exit(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return,
                Ok(status) if self.life.successor().is_some_and(|s| Some(s.pid) == status.pid()) => {
                    self.on_successor_exit(status);
                }
                Ok(status) => {
                    let draining = !self.life.runs_workers();
                    self.sup.on_exit(status, self.poll.registry(), draining, Instant::now());
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return, // ECHILD: none left
            }
        }
    }

    /// A worker's channel has notices to read, or room to write again.
    fn on_channel(&mut self, id: usize, readable: bool, writable: bool) {
        let Some(w) = self.sup.get_mut(id) else {
            return;
        };
        if writable {
            w.set_congested(false);
        }
        if readable && read_notices(id, &w.channel) {
            self.sup.mark_ready(id);
        }
    }

    /// Scrape connections wait: accept them (answering at once those whose
    /// request is there, see `http`).
    fn on_metrics_listener(&mut self) {
        let app = Endpoint { sup: &self.sup, disp: &self.disp, info: self.info, stopping: self.is_stopping() };
        if let Some(h) = &mut self.http {
            h.on_listener(self.poll.registry(), Instant::now(), &app);
        }
    }

    /// A scrape connection is readable or writable.
    fn on_scrape(&mut self, id: usize) {
        let app = Endpoint { sup: &self.sup, disp: &self.disp, info: self.info, stopping: self.is_stopping() };
        if let Some(h) = &mut self.http {
            h.on_conn(id, self.poll.registry(), &app);
        }
    }

    /// Everything driven by the clock.
    fn on_timers(&mut self, now: Instant) {
        if matches!(self.life, Lifecycle::StopDelayed { at } if now >= at) {
            self.begin_stop(true);
        }
        self.sup.kill_overdue(now);
        self.check_upgrade_deadline(now);
        if let Some(h) = &mut self.http {
            h.expire(now, self.poll.registry());
        }
        if now >= self.next_heartbeat_check {
            self.sup.check_heartbeats(monotonic_ms());
            self.next_heartbeat_check = now + HEARTBEAT_CHECK;
        }
        if let Some(at) = self.next_stats {
            if now >= at {
                self.log_stats(false);
                self.next_stats = self.config.stats_interval.nonzero().map(|d| now + d);
            }
        }
        // Both say nothing unless this master is main (see `enter`).
        self.notify.watchdog(now);
        if now >= self.next_status && self.life.is_main() {
            let status = snapshot(&self.sup, &self.disp).status();
            self.notify.status(&status);
            self.next_status = now + STATUS_EVERY;
        }
    }

    /// Tells systemd READY=1 once the current generation is fully serving.
    /// A new master tells its predecessor first, and systemd only once the
    /// predecessor said "go": MAINPID must never name a master that may
    /// still be killed for a failed upgrade.
    fn announce_ready(&mut self) {
        if self.ready_owed && self.sup.all_ready() {
            if let Some(p) = &mut self.predecessor {
                p.announce_ready(); // once
                if !p.go {
                    return;
                }
            }
            self.ready_owed = false;
            let snap = snapshot(&self.sup, &self.disp);
            log::info!("ready: {} worker(s) serving on {:?}", snap.serving(), self.listeners.addrs());
            self.notify.ready(&snap.status());
        }
    }

    /// TERM/INT (graceful) or QUIT (fast) from the operator. During a binary
    /// upgrade: before the new master took over, the upgrade is abandoned
    /// (it is killed; it never accepted) and this master stops; after, only
    /// this old generation stops, and the new master, which is the
    /// service's main process by then, serves on. A new master that is main
    /// tells its predecessor it is stopping: that is the service stopping,
    /// and the old generation must not take over again.
    fn on_stop_signal(&mut self, graceful: bool) {
        // Only a stop of the main process is the service's stop: a new
        // master told to stop before `go` is a failed upgrade, and the old
        // master serves on. A `go` may be waiting unread: read it first.
        if self.predecessor.is_some() {
            self.on_predecessor_channel();
        }
        if let Some(p) = self.predecessor.as_mut().filter(|_| self.life.is_main()) {
            p.announce_stopping(graceful);
        }
        match &mut self.life {
            Lifecycle::HandedOver { successor, take_back, graceful: drain_graceful } => {
                log::info!(
                    "stop asked after the hand-over: this old generation stops; the new master (pid {}) serves on",
                    successor.pid
                );
                *take_back = false;
                if !graceful && std::mem::replace(drain_graceful, false) {
                    log::info!("fast stop: closing this old generation's connections now");
                    self.sup.stop_all(false, Duration::ZERO, Instant::now());
                }
                return;
            }
            Lifecycle::Upgrading { .. } => {
                // Stopping: a reload deferred meanwhile no longer applies.
                log::error!("upgrade failed: abandoned: this master is stopping");
                let _ = self.abandon_upgrade("this master is stopping");
            }
            _ => {}
        }
        if graceful && self.life.is_main() {
            self.announce_stop();
        } else {
            self.begin_stop(graceful);
        }
    }

    /// A stop was asked for (it may still be in its `shutdown_delay`), or
    /// this generation handed over.
    fn is_stopping(&self) -> bool {
        self.life.is_stopping()
    }

    /// TERM/INT: a graceful stop, after `shutdown_delay` during which
    /// /healthz says 503 and the listeners still accept (see the config).
    fn announce_stop(&mut self) {
        let delay = self.config.shutdown_delay.0;
        match self.life {
            Lifecycle::StopDelayed { .. } => {}
            Lifecycle::Stopping { .. } => self.begin_stop(true),
            _ if delay.is_zero() => self.begin_stop(true),
            _ => {
                log::info!(
                    "graceful stop: /healthz answers 503; listeners close in {:.1}s (shutdown_delay)",
                    delay.as_secs_f64()
                );
                self.notify.stopping();
                self.enter(Lifecycle::StopDelayed { at: Instant::now() + delay });
            }
        }
    }

    /// TERM/INT (graceful) or QUIT (fast): close the listeners, stop the
    /// workers. Not after a hand-over (see `on_stop_signal`).
    fn begin_stop(&mut self, graceful: bool) {
        let main = match self.life {
            Lifecycle::Stopping { graceful: was, .. } if graceful || !was => return, // at least this fast already
            Lifecycle::Stopping { main, .. } => main,
            Lifecycle::HandedOver { .. } => return,
            ref life => life.is_main(),
        };
        let timeout = self.config.shutdown_timeout.0;
        // Entered first, so that only a main master says STOPPING=1.
        self.enter(Lifecycle::Stopping { graceful, main });
        self.notify.stopping();
        // Closed before it is said: whoever reads the line may rely on it.
        self.listeners.close_all(self.poll.registry());
        if graceful {
            log::info!(
                "graceful stop: listeners closed; connections may finish for up to {:.1}s",
                timeout.as_secs_f64()
            );
        } else {
            log::info!("fast stop: closing everything now");
        }
        self.drain_workers(graceful, timeout);
    }

    /// Tells every worker to drain (or quit), closing first what the
    /// dispatcher holds unsent.
    fn drain_workers(&mut self, graceful: bool, timeout: Duration) {
        let dropped = self.disp.discard_held(&mut self.sup);
        if dropped > 0 {
            log::warn!("{dropped} accepted connection(s) not yet handed to a worker were closed");
        }
        crate::gate::AcceptGate::new(self.sup.scoreboard).open();
        self.sup.stop_all(graceful, timeout, Instant::now());
    }

    /// HUP: re-read the config; apply it if valid, otherwise keep running as
    /// before.
    fn reload(&mut self) {
        if self.is_stopping() {
            return;
        }
        let loaded = match &self.source {
            Some(path) => Config::load(path, &self.overrides),
            None => Config::builtin(&self.overrides),
        };
        let new = match loaded {
            Ok(c) => c,
            Err(e) => {
                log::error!("reload failed: {e}; keeping the running configuration");
                self.info.last_reload_ok = false;
                return;
            }
        };
        // What this master (already `user`) will need later: checked now,
        // not at the next USR2.
        let checked = limits::check_fits(&new, limits::current_nofile())
            .and_then(|()| privileges::check_reachable(&new, &self.invocation.exe, self.source.as_deref()));
        match checked {
            Ok(warning) => warning.iter().for_each(|w| log::warn!("{w}")),
            Err(r) => {
                let e = r.in_file(self.source.as_deref(), &text_for_errors(self.source.as_deref()));
                log::error!("reload failed: {e}; keeping the running configuration");
                self.info.last_reload_ok = false;
                return;
            }
        }
        // Bind everything new before changing anything, so a failure leaves
        // the running state untouched.
        let new_http = match self.rebind_metrics(&new) {
            Ok(h) => h,
            Err(e) => {
                log::error!("reload failed: {e}; keeping the running configuration");
                self.info.last_reload_ok = false;
                return;
            }
        };
        if let Err((addr, e)) = self.listeners.reconcile(&new, self.poll.registry()) {
            log::error!("reload failed: cannot listen on {addr}: {e}; keeping the running configuration");
            self.info.last_reload_ok = false;
            if let Some(h) = new_http {
                h.close(self.poll.registry());
            }
            return;
        }
        if let Some(h) = new_http {
            log::info!("metrics on http://{}/metrics", h.addr);
            if let Some(old) = self.http.replace(h) {
                old.close(self.poll.registry());
            }
        } else if new.metrics_listen.is_none() && !self.metrics_from_systemd {
            if let Some(old) = self.http.take() {
                log::info!("metrics endpoint closed");
                old.close(self.poll.registry());
            }
        }
        self.store_fds();
        self.warn_unapplied(&new);
        self.info.last_reload_ok = true;
        self.info.last_reload_time = unix_now();
        self.notify.reloading();
        logging::set_level(new.log_level.0);
        logging::set_format(new.log_format);
        let file_workers = new.worker_count();
        if file_workers != self.file_workers {
            self.sup.set_target(file_workers);
            self.file_workers = file_workers;
        }
        self.capacity = limits::worker_capacity(&new, limits::current_nofile());
        self.next_stats = new.stats_interval.nonzero().map(|d| Instant::now() + d);
        self.config = new;
        self.sup.next_generation();
        logging::set_generation(self.sup.generation());
        self.ready_owed = true;
        log::info!(
            "reloaded {}: generation {}, {} worker(s) to replace one by one, target {}",
            self.source.as_ref().map_or("built-in defaults".into(), |p| p.display().to_string()),
            self.sup.generation(),
            // Those already draining (an earlier reload's) are not replaced:
            // they are on their way out.
            self.sup
                .workers()
                .iter()
                .filter(|w| w.generation() < self.sup.generation()
                    && !matches!(w.phase(), supervisor::Phase::Draining { .. }))
                .count(),
            self.sup.target()
        );
    }

    /// Says which changed keys a reload cannot apply: the identity the
    /// master dropped to is fixed at start (root is gone by then).
    fn warn_unapplied(&self, new: &Config) {
        let old = &self.config;
        for (key, was, now) in [
            ("user", old.user.as_str(), new.user.as_str()),
            ("pid_file", old.pid_file.as_str(), new.pid_file.as_str()),
            ("group", old.group.as_str(), new.group.as_str()),
            (
                "allow_root",
                if old.allow_root { "true" } else { "false" },
                if new.allow_root { "true" } else { "false" },
            ),
        ] {
            if was != now {
                log::warn!("reload: `{key}` changed from \"{was}\" to \"{now}\"; it takes effect only on a restart");
            }
        }
    }

    /// A new metrics server if `new` moves the metrics address (Ok(None):
    /// nothing to bind, keep or close the current one).
    fn rebind_metrics(&self, new: &Config) -> Result<Option<HttpServer>, String> {
        if self.metrics_from_systemd {
            return Ok(None);
        }
        let Some(addr) = new.metrics_listen else { return Ok(None) };
        let unchanged = Some(addr) == self.config.metrics_listen;
        let same = self.http.as_ref().is_some_and(|h| unchanged || h.addr == addr)
            // Inherited in an upgrade and not served yet (see upgrade.rs).
            || self.pending_metrics.as_ref().is_some_and(|l| unchanged || l.local_addr().is_ok_and(|a| a == addr));
        if same {
            return Ok(None);
        }
        HttpServer::bind(addr, self.poll.registry())
            .map(Some)
            .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))
    }

    /// TTIN (+1) / TTOU (-1): one worker more or fewer, never below one.
    fn scale(&mut self, delta: isize) {
        if self.is_stopping() {
            return;
        }
        let target = self.sup.target().saturating_add_signed(delta).clamp(1, crate::config::MAX_WORKERS);
        if target == self.sup.target() {
            log::info!("workers stay at {target}");
            return;
        }
        self.sup.set_target(target);
        self.sup.reset_backoff();
        log::info!("workers: target now {target}");
    }

    /// USR1 (with per-worker lines) and the periodic summary.
    fn log_stats(&self, per_worker: bool) {
        let snap = snapshot(&self.sup, &self.disp);
        log::info!("{}", snap.summary());
        if per_worker {
            for line in snap.worker_lines() {
                log::info!("{line}");
            }
        }
    }
}

/// One snapshot of the master's view: the supervisor's workers with their
/// scoreboard slots, the dispatcher's counts, and what earlier masters
/// handed over. Every report (USR1, STATUS=, /metrics, the upgrade's
/// totals) renders one of these.
pub(crate) fn snapshot(sup: &Supervisor, disp: &Dispatcher) -> Snapshot {
    snapshot_of(sup, disp, &sup.carried())
}

/// What `echod --check-config` runs: every check the start makes, in the
/// same order and with the same warnings (logged) and refusals, without
/// binding or forking anything: the fd limit (raised as the start raises
/// it), what a worker can hold, threads and memory against the kernel's
/// limits, then, started as root, the drop to `user` and what `user` can
/// read and execute (this process becomes `user`, as the daemon would).
/// Returns a worker's capacity.
pub fn check_config(config: &Config, source: Option<&Path>) -> Result<usize, StartError> {
    let text = text_for_errors(source);
    let capacity = fit_limits(config, source, &text)?;
    limits::check(config, config.worker_count(), capacity);
    drop_privileges(config, source, &text)?;
    // Not `pid_file`: whether its directory is writable depends on the user
    // the daemon runs as (under systemd, a DynamicUser= the check cannot
    // become); the start checks it.
    Ok(capacity)
}

/// `pid_file`, checked as `user` can write it and, on a fresh start (not
/// an upgrade's new master), not naming another running echod.
fn open_pid_file(
    config: &Config,
    source: Option<&Path>,
    text: &str,
    fresh: bool,
) -> Result<pidfile::PidFile, StartError> {
    let refused = |r: crate::config::Refusal| StartError::Config(r.in_file(source, text));
    let file = pidfile::PidFile::open(&config.pid_file).map_err(refused)?;
    let path = Path::new(&config.pid_file);
    for named in [path.to_path_buf(), pidfile::oldbin(path)] {
        if let Some(pid) = fresh.then(|| pidfile::running_echod(&named)).flatten() {
            return Err(refused(crate::config::Refusal::new(
                "pid_file",
                format!("{} names pid {pid}, a running echod: another instance uses this file", named.display()),
            )));
        }
    }
    Ok(file)
}

/// Raises the fd limit and checks a worker fits in it; returns a worker's
/// capacity under it (lowered, with a warning, if needed).
fn fit_limits(config: &Config, source: Option<&Path>, text: &str) -> Result<usize, StartError> {
    let fd_limit = limits::raise_nofile();
    limits::check_fits(config, fd_limit).map_err(|r| StartError::Config(r.in_file(source, text)))?;
    Ok(limits::worker_capacity(config, fd_limit))
}

/// Started as root: becomes `user`, then checks what `user` will need later
/// (reading the file on HUP and USR2, executing `upgrade_binary`).
fn drop_privileges(config: &Config, source: Option<&Path>, text: &str) -> Result<(), StartError> {
    let refused = |r: crate::config::Refusal| StartError::Config(r.in_file(source, text));
    if let Some(msg) = privileges::drop(config).map_err(|e| refused(e.into()))? {
        log::info!("{msg}");
    }
    let exe = upgrade::Invocation::current().exe;
    if let Some(warning) = privileges::check_reachable(config, &exe, source).map_err(refused)? {
        log::warn!("{warning}");
    }
    Ok(())
}

/// The config file's text, read only to name a refused key's line: empty
/// when there is no file or it cannot be read, and never read unless it is
/// a regular file (reading a FIFO would consume it, or block).
fn text_for_errors(source: Option<&Path>) -> String {
    source
        .filter(|p| p.metadata().is_ok_and(|m| m.is_file()))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default()
}

/// A snapshot with `carried` as what earlier masters handed over (nothing:
/// this master's own counts, which it sends back to its predecessor).
fn snapshot_of(sup: &Supervisor, disp: &Dispatcher, carried: &crate::stats::Carried) -> Snapshot {
    let mut totals = sup.retired();
    totals.add_counters(&carried.totals);
    let mut workers: Vec<WorkerView> = sup
        .workers()
        .iter()
        .map(|w| {
            let slot = sup.scoreboard.slot(w.id).snapshot();
            totals.add_counters(&slot);
            WorkerView {
                id: w.id,
                pid: w.pid.as_raw(),
                generation: w.generation(),
                state: w.phase().state(),
                accepted: w.dispatched(),
                active: w.dispatched().saturating_sub(slot.finished),
                capacity: w.capacity(),
                slot,
            }
        })
        .collect();
    workers.sort_by_key(|w| w.id);
    let active = workers.iter().map(|w| w.active).sum::<u64>() + disp.held(sup) as u64;
    Snapshot {
        accepted: disp.accepted + carried.accepted,
        // The master's rejections, and the workers' (PROXY listeners).
        rejected: disp.rejected + carried.rejected + totals.rejected,
        active,
        draining: carried.open(),
        restarts: sup.restarts() + carried.restarts,
        generation: sup.generation(),
        target: sup.target(),
        totals,
        workers,
    }
}

// Binary upgrade, the master's side: the handlers of USR2 and of the
// successor's and predecessor's messages. The protocol and its processes
// live in `upgrade`; these are here because they drive the master itself.
impl Master {
    /// USR2: start the new binary as a new master.
    pub(super) fn begin_upgrade(&mut self) {
        let refuse = match (&self.life, &self.predecessor) {
            (Lifecycle::Serving, None) => None,
            (Lifecycle::Upgrading { successor, .. }, _) => {
                Some(format!("an upgrade is already in progress (new master pid {})", successor.pid))
            }
            // A third generation while the first still drains would leave
            // two masters serving the same sockets if it failed (nginx
            // refuses this too).
            (Lifecycle::Serving | Lifecycle::Starting, Some(p)) => {
                Some(format!("the previous master (pid {}) is still draining", p.pid))
            }
            (Lifecycle::HandedOver { successor, .. }, _) => {
                Some(format!("this master handed over to pid {}; signal that one", successor.pid))
            }
            _ => Some("stopping".to_string()),
        };
        if let Some(why) = refuse {
            log::warn!("upgrade refused: {why}");
            return;
        }
        let binary = Some(&self.config.upgrade_binary).filter(|b| !b.is_empty()).map(PathBuf::from);
        let handover = upgrade::Handover {
            listeners: self.listeners.handover(),
            metrics: self.http.as_ref().map(|h| (h.listener_fd(), self.metrics_from_systemd)),
        };
        let deadline = Instant::now() + self.config.upgrade_timeout.0;
        let exe = binary.clone().unwrap_or_else(|| self.invocation.exe.clone());
        match upgrade::spawn(&self.invocation, binary, &handover, self.poll.registry(), deadline) {
            Ok(successor) => {
                log::info!(
                    "upgrade: started new master (pid {}) from {}; waiting up to {:.0}s for it to serve",
                    successor.pid,
                    exe.display(),
                    self.config.upgrade_timeout.0.as_secs_f64()
                );
                self.enter(Lifecycle::Upgrading { successor, reload_deferred: false });
            }
            Err(e) => log::error!("upgrade failed: cannot start {}: {e}; this master keeps serving", exe.display()),
        }
    }

    /// The channel to the new master is readable.
    pub(super) fn on_successor_channel(&mut self) {
        match &mut self.life {
            Lifecycle::Upgrading { successor, .. } => {
                let heard = successor.on_readable();
                if heard.gone {
                    successor.deregister(self.poll.registry());
                    // It is exiting: let it say why before it is killed. Its
                    // exit (SIGCHLD) ends the upgrade; the grace bounds the wait.
                    successor.deadline = successor.deadline.min(Instant::now() + upgrade::EXIT_GRACE);
                }
                // "ready" and EOF in one read: it said ready and is gone (or
                // going). Handing over to it would drain this generation for
                // nothing; its exit ends the upgrade as failed instead.
                if heard.ready && !heard.gone {
                    self.hand_over();
                }
            }
            Lifecycle::HandedOver { successor, .. } => {
                let heard = successor.on_readable();
                if heard.gone {
                    successor.deregister(self.poll.registry());
                }
                if let Some(graceful) = heard.stopping {
                    self.on_successor_stopping(graceful);
                }
            }
            _ => {}
        }
    }

    /// The new master, which serves as the unit's main process, was told to
    /// stop: the service is stopping. This old generation will not take over
    /// again, and a fast stop cuts its connections too.
    fn on_successor_stopping(&mut self, graceful: bool) {
        let Lifecycle::HandedOver { successor, take_back, graceful: drain_graceful } = &mut self.life else { return };
        let how = if graceful { "gracefully" } else { "fast" };
        log::info!(
            "upgrade: the new master (pid {}) is stopping {how}: the service is stopping; this old generation \
             will finish and not take over again",
            successor.pid
        );
        *take_back = false;
        if !graceful && std::mem::replace(drain_graceful, false) {
            self.sup.stop_all(false, Duration::ZERO, Instant::now());
        }
    }

    /// The channel from the old master is readable: "go", totals, or EOF.
    pub(super) fn on_predecessor_channel(&mut self) {
        let Some(p) = &mut self.predecessor else { return };
        let was_go = p.go;
        let gone = p.on_readable();
        let (go, carried, pid) = (p.go, p.carried, p.pid);
        if go && !was_go {
            log::info!("upgrade: the old master (pid {pid}) stopped accepting; this master accepts now");
            self.become_main();
        }
        if let Some(c) = carried {
            self.set_carried(c);
            self.serve_pending_metrics();
        }
        let scale = self.predecessor.as_mut().map_or(0, |p| std::mem::take(&mut p.scale));
        if scale != 0 {
            let (sig, n) = if scale > 0 { (Signal::MoreWorkers, scale) } else { (Signal::FewerWorkers, -scale) };
            log::info!("upgrade: the old master passed on {n} {}", if scale > 0 { "TTIN" } else { "TTOU" });
            self.on_config_signal(sig, n as usize);
        }
        if gone {
            if let Some(mut p) = self.predecessor.take() {
                p.deregister(self.poll.registry());
            }
            if go {
                log::info!("upgrade: the previous generation has exited");
                // Killed while it drained, it could not send the closes of
                // what it held: those died with it.
                let mut carried = self.sup.carried();
                let lost = carried.close_lost();
                if lost > 0 {
                    log::warn!("upgrade: {lost} connection(s) the old generation still drained were lost with it");
                    self.set_carried(carried);
                }
            } else {
                // It died (or was killed) before handing over: nobody else
                // accepts, so this master does.
                log::warn!("upgrade: the old master (pid {pid}) is gone without handing over; this master takes over");
                self.become_main();
            }
            self.serve_pending_metrics();
        }
    }

    /// A new master's predecessor said "go" (or is gone): this master is the
    /// unit's main process from now on, unless it was already told to stop.
    /// READY=1 with MAINPID= follows from `announce_ready`.
    fn become_main(&mut self) {
        // A new master told to stop before `go` stays what it was: a failed
        // upgrade. It says nothing to systemd, and its exit without a
        // `stopping` makes the old master take over again.
        if let Lifecycle::Starting = self.life {
            self.enter(Lifecycle::Serving);
            // The fd store is ours to keep.
            self.store_fds();
        }
    }

    /// Whether this master accepts connections and speaks for the service
    /// (MAINPID, fd store).
    pub(super) fn is_main(&self) -> bool {
        self.life.is_main()
    }

    /// What earlier masters counted, for every report from now on.
    fn set_carried(&mut self, c: crate::stats::Carried) {
        self.sup.set_carried(c);
        if let Some(h) = &mut self.http {
            h.set_carried(c.endpoint);
        }
    }

    /// The inherited metrics socket goes live once the old totals are in.
    fn serve_pending_metrics(&mut self) {
        if let Some(l) = self.pending_metrics.take() {
            match HttpServer::adopt(l, self.poll.registry()) {
                Ok(mut h) => {
                    log::info!("metrics on http://{}/metrics", h.addr);
                    h.set_carried(self.sup.carried().endpoint);
                    self.http = Some(h);
                }
                Err(e) => log::error!("cannot serve the inherited metrics socket: {e}"),
            }
        }
    }

    /// The new master serves: stop accepting (keeping the sockets, so this
    /// master can take over again if the new one dies), let it accept, make
    /// it systemd's main process, and drain this generation.
    fn hand_over(&mut self) {
        let (mut successor, reload_deferred) = match self.take_life() {
            Lifecycle::Upgrading { successor, reload_deferred } => (successor, reload_deferred),
            other => return self.enter(other),
        };
        let pid = successor.pid;
        log::info!("upgrade: new master (pid {pid}) serves; this master stops accepting and drains");
        self.listeners.pause(self.poll.registry());
        // The new master serves /metrics from here; scrapes in progress
        // finish (dropping them would reset their clients).
        if let Some(h) = &mut self.http {
            h.pause(self.poll.registry());
        }
        // MAINPID first, while this master is still main: the new master's
        // READY=1 (after "go") then always follows it.
        self.notify.hand_over(pid.as_raw() as u32);
        successor.go();
        let timeout = self.config.shutdown_timeout.0;
        log::info!(
            "upgrade: this old generation drains for up to {:.1}s; its sockets stay open, unpolled, in case the \
             new master fails",
            timeout.as_secs_f64()
        );
        self.drain_workers(true, timeout);
        self.enter(Lifecycle::HandedOver { successor, take_back: true, graceful: true });
        self.send_totals();
        if reload_deferred {
            log::info!("upgrade: passing the reload asked for during the upgrade on to the new master (pid {pid})");
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP);
        }
    }

    /// Each side of an upgrade keeps the other's counters current: after
    /// the hand-over, the old master sends its totals (which the new one
    /// carries on); the new master sends its own (which the old one adds if
    /// it takes over again). Only changes are sent.
    pub(super) fn send_totals(&mut self) {
        let endpoint = self.http.as_ref().map(|h| h.totals()).unwrap_or_default();
        if let Lifecycle::HandedOver { successor, .. } = &mut self.life {
            if !successor.closed {
                let mut c = crate::stats::Carried::of(&snapshot(&self.sup, &self.disp));
                c.endpoint = endpoint;
                c.endpoint.add(&self.sup.carried().endpoint);
                successor.send_totals(c);
            }
        }
        if let Some(p) = &mut self.predecessor {
            let mut own = crate::stats::Carried::of(&snapshot_of(&self.sup, &self.disp, &Default::default()));
            own.endpoint = endpoint;
            p.send_totals(own);
        }
    }

    /// The new master exited (reaped by SIGCHLD). Before the hand-over the
    /// upgrade failed; after it, this master takes over again, unless the
    /// new one exited because it was told to stop: then the service is
    /// stopping, and this old generation finishes its drain and exits.
    pub(super) fn on_successor_exit(&mut self, status: WaitStatus) {
        let how = supervisor::describe(status);
        match self.take_life() {
            Lifecycle::Upgrading { successor, reload_deferred } => {
                self.enter(Lifecycle::Upgrading { successor, reload_deferred });
                self.upgrade_failed(format!("the new master exited ({how})"));
            }
            Lifecycle::HandedOver { mut successor, take_back, graceful } => {
                // What it said last may still be unread.
                let _ = successor.on_readable();
                successor.deregister(self.poll.registry());
                let pid = successor.pid;
                // Told to stop, it said so first (even if it is then killed
                // at the end of its own drain); any other exit is a failure.
                let stopped = successor.stopping.is_some();
                if take_back && !stopped {
                    log::warn!(
                        "upgrade: the new master (pid {pid}), which had taken over, exited ({how}); taking over again"
                    );
                    return self.take_back(successor.totals);
                }
                if stopped {
                    log::info!(
                        "upgrade: the new master (pid {pid}) stopped ({how}); this old generation finishes its drain \
                         and exits"
                    );
                } else {
                    log::warn!("upgrade: the new master (pid {pid}), which had taken over, exited ({how})");
                }
                // Nobody serves on the sockets any more: refuse, don't queue.
                self.listeners.close_all(self.poll.registry());
                if let Some(h) = self.http.take() {
                    h.close(self.poll.registry());
                }
                self.enter(Lifecycle::Stopping { graceful, main: false });
            }
            other => self.enter(other),
        }
    }

    /// Rolls a hand-over back: the new master died while this one drained.
    /// Listen again on the sockets kept for this, serve /metrics again, be
    /// systemd's main process again, carry on the new master's counters,
    /// and start a fresh generation of workers (the draining ones finish on
    /// their own deadlines).
    fn take_back(&mut self, mut theirs: crate::stats::Carried) {
        // The connections it held died with it: they count as closed with
        // an error, as a dead worker's do, so accepted = closed + active
        // holds on.
        let lost = theirs.close_lost();
        if lost > 0 {
            log::warn!("upgrade: {lost} connection(s) the new master held were lost with it");
        }
        if let Err(e) = self.listeners.resume(self.poll.registry()) {
            log::error!("upgrade: cannot listen again: {e}");
        }
        if let Some(Err(e)) = self.http.as_mut().map(|h| h.resume(self.poll.registry())) {
            log::error!("cannot serve metrics again: {e}");
        }
        let mut carried = self.sup.carried();
        carried.add(&theirs);
        self.set_carried(carried);
        self.enter(Lifecycle::Serving);
        self.sup.next_generation();
        self.ready_owed = true;
        self.store_fds();
    }

    /// Gives up on a new master that did not become ready in time, or that
    /// closed its channel and did not exit.
    pub(super) fn check_upgrade_deadline(&mut self, now: Instant) {
        let Lifecycle::Upgrading { successor: s, .. } = &self.life else { return };
        if now < s.deadline {
            return;
        }
        let why = if s.closed {
            format!("the new master closed its channel and did not exit within {}s", upgrade::EXIT_GRACE.as_secs())
        } else {
            format!("the new master did not become ready within {:.0}s", self.config.upgrade_timeout.0.as_secs_f64())
        };
        self.upgrade_failed(why);
    }

    /// Ends a failed upgrade: this master never stopped serving. A reload
    /// asked for meanwhile is applied now.
    pub(super) fn upgrade_failed(&mut self, why: String) {
        log::error!("upgrade failed: {why}; this master keeps serving");
        if self.abandon_upgrade("the upgrade failed") {
            self.reload();
        }
    }

    /// Kills the new master (and with it its workers, by PR_SET_PDEATHSIG):
    /// it never accepted. Returns whether a reload was deferred for it.
    fn abandon_upgrade(&mut self, why: &str) -> bool {
        match self.take_life() {
            Lifecycle::Upgrading { mut successor, reload_deferred } => {
                successor.deregister(self.poll.registry());
                let _ = nix::sys::signal::kill(successor.pid, nix::sys::signal::Signal::SIGKILL);
                log::debug!("upgrade: killed the new master (pid {}): {why}", successor.pid);
                self.enter(Lifecycle::Serving);
                reload_deferred
            }
            other => {
                self.enter(other);
                false
            }
        }
    }

    /// Keeps systemd's fd store holding our listening sockets (when it is
    /// there to hold them and they are not the socket unit's), so that a
    /// plain restart refuses no connection: the new process gets them back
    /// as LISTEN_FDS named [`upgrade::FDNAME_LISTENER`] / [`upgrade::FDNAME_METRICS`]. Only the main
    /// master writes it: a new master that may still fail must not replace
    /// the live sockets there.
    pub(super) fn store_fds(&self) {
        if !self.notify.enabled() || !self.is_main() {
            return;
        }
        self.notify.store_fds(upgrade::FDNAME_LISTENER, &self.listeners.own_fds());
        if !self.metrics_from_systemd {
            // Served, or inherited and not served yet: either way the live
            // metrics socket (never an empty entry that would remove it).
            let pending = self.pending_metrics.iter().map(std::os::fd::AsFd::as_fd);
            let metrics: Vec<_> = self.http.iter().map(|h| h.listener_borrowed()).chain(pending).collect();
            self.notify.store_fds(upgrade::FDNAME_METRICS, &metrics);
        }
    }
}
