//! The master process: one thread, one poll loop.
//!
//! Like nginx's master cycle, the loop waits for a few kinds of event and
//! hands each to one handler:
//!
//! | event                         | handler                  |
//! |-------------------------------|--------------------------|
//! | signal (via signal-hook pipe) | [`Master::on_signal`]    |
//! | child exit (SIGCHLD)          | [`Master::on_child_exit`]|
//! | worker channel readable/writable | [`Master::on_channel`] |
//! | listener readable             | marks it ready for the dispatcher |
//! | metrics listener / scrape     | [`http::HttpServer`]     |
//! | timer (the poll timeout)      | [`Master::on_timers`]    |
//!
//! after which the supervisor takes one step towards its target and the
//! dispatcher accepts and hands out connections. The master never blocks and
//! never starts a thread: it forks workers for its whole life (respawns,
//! reloads, TTIN), and fork is only safe from a single-threaded process.

pub mod dispatch;
pub mod http;
pub mod listeners;
pub mod signals;
pub mod supervisor;
pub mod upgrade;

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use signal_hook_mio::v1_0::Signals;

use crate::config::{Config, Overrides};
use crate::ipc::Notice;
use crate::metrics::{self, MasterInfo};
use crate::scoreboard::monotonic_ms;
use crate::stats::{Snapshot, WorkerView};
use crate::systemd::{self, Notifier};
use crate::{limits, logging, privileges};
use dispatch::Dispatcher;
use http::HttpServer;
use listeners::{LISTENER_TOKEN_BASE, Listeners};
use signals::Signal;
use supervisor::{Supervisor, WORKER_TOKEN_BASE};

const SIGNAL_TOKEN: Token = Token(0);
/// How often worker heartbeats are checked.
const HEARTBEAT_CHECK: Duration = Duration::from_millis(500);
/// How often systemd's STATUS= line is refreshed (only sent when changed).
const STATUS_EVERY: Duration = Duration::from_secs(2);

pub use http::METRICS_FD_NAME;

/// Why the master could not start. The binary maps each to an exit code.
#[derive(Debug)]
pub enum StartError {
    /// The config cannot be applied (exit 78).
    Config(String),
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
            StartError::Listen(m) | StartError::Config(m) => write!(f, "{m}"),
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
            Ok(Some(Notice::SlotFreed)) => {}
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

/// A graceful or fast stop in progress.
#[derive(Debug, Clone, Copy)]
struct Stopping {
    graceful: bool,
    /// The stop is a binary upgrade's hand-over, not the operator's: if the
    /// new master dies before this one has drained, this one takes over
    /// again (see `upgrade.rs`).
    handed_over: bool,
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
    signals: Signals,
    listeners: Listeners,
    sup: Supervisor,
    disp: Dispatcher,
    notify: Notifier,
    stopping: Option<Stopping>,
    /// A graceful stop waits for this moment (`shutdown_delay`) before it
    /// closes the listeners; /healthz answers 503 meanwhile.
    stop_at: Option<Instant>,
    /// READY=1 is owed to systemd once the current generation serves
    /// (at start-up and after each reload).
    ready_owed: bool,
    next_stats: Option<Instant>,
    next_heartbeat_check: Instant,
    next_status: Instant,
    /// The /metrics and /healthz endpoint, if `metrics_listen` is set.
    http: Option<HttpServer>,
    /// The endpoint's socket came from systemd: reloads keep it.
    http_activated: bool,
    /// Reported in /metrics.
    info: MasterInfo,
    /// How this master was started, for USR2.
    invocation: upgrade::Invocation,
    /// The new master a USR2 started, until it takes over or fails.
    successor: Option<upgrade::Successor>,
    /// The old master that started this one, while it drains.
    predecessor: Option<upgrade::Predecessor>,
    /// The inherited metrics socket, served once the old master's totals
    /// arrived, so scraped counters never go backwards.
    pending_metrics: Option<std::net::TcpListener>,
    /// A HUP arrived while a new master was starting. The new master reads
    /// the config file itself, and the sockets it inherits were fixed at
    /// fork, so the reload waits: applied here if the upgrade fails, passed
    /// on to the new master if it takes over.
    reload_pending: bool,
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
        metrics::render(&snapshot(self.sup, self.disp), &self.info)
    }

    fn healthy(&self) -> bool {
        !self.stopping && self.sup.workers.iter().any(|w| w.phase == supervisor::Phase::Serving)
    }
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
        mut signals: Signals,
    ) -> Result<Master, StartError> {
        let fd_limit = limits::raise_nofile();
        let capacity = limits::worker_capacity(&config, fd_limit);
        let poll = Poll::new()?;
        poll.registry().register(&mut signals, SIGNAL_TOKEN, Interest::READABLE)?;

        // Sockets passed in at exec: systemd's socket unit (they win over
        // `listen`; the one named "metrics" serves /metrics), or an earlier
        // master's (binary upgrade, or systemd's fd store across a restart),
        // matched against the config.
        let mut passed = Passed::default();
        for a in systemd::listen_fds()? {
            match a.name.as_str() {
                METRICS_FD_NAME => passed.activated_metrics.push(a.fd),
                upgrade::FD_METRICS => passed.inherited_metrics.push(a.fd),
                upgrade::FD_LISTEN => passed.inherited.push(a.fd),
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
                upgrade::FD_LISTEN,
                upgrade::FD_METRICS
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
        let http_activated = !passed.activated_metrics.is_empty();
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

        // Everything privileged is done: bind first, then drop.
        match privileges::drop(&config) {
            Ok(Some(msg)) => log::info!("{msg}"),
            Ok(None) => {}
            Err(msg) => return Err(StartError::Config(format!("key `user`: {msg}"))),
        }
        let sup = Supervisor::new(config.worker_count(), capacity)?;
        let now = Instant::now();
        let started = unix_now();
        let mut notify = Notifier::from_env();
        notify.announce_pid = predecessor.is_some();
        let master = Master {
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
            stopping: None,
            stop_at: None,
            ready_owed: true,
            next_heartbeat_check: now + HEARTBEAT_CHECK,
            next_status: now,
            http,
            http_activated,
            info: MasterInfo { start_time: started, last_reload_ok: true, last_reload_time: started },
            invocation: upgrade::Invocation::current(),
            successor: None,
            predecessor,
            pending_metrics,
            reload_pending: false,
        };
        master.store_fds();
        Ok(master)
    }

    /// Runs until stopped; returns the process exit code.
    pub fn run(mut self) -> io::Result<i32> {
        let mut events = Events::with_capacity(256);
        limits::check(&self.config, self.sup.target, self.capacity);
        log::info!(
            "echod {} starting {} worker(s) in {} mode, up to {} connections each (pid {})",
            crate::cli::VERSION,
            self.sup.target,
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
                let token = event.token();
                match token.0 {
                    _ if token == SIGNAL_TOKEN => {
                        let pending: Vec<i32> = self.signals.pending().collect();
                        pending.into_iter().filter_map(Signal::from_raw).for_each(|s| self.on_signal(s));
                    }
                    _ if token == upgrade::SUCCESSOR_TOKEN => self.on_successor_channel(),
                    _ if token == upgrade::PREDECESSOR_TOKEN => self.on_predecessor_channel(),
                    _ if token == http::LISTENER_TOKEN => self.on_metrics_listener(),
                    t if t >= LISTENER_TOKEN_BASE => self.listeners.mark_ready(token),
                    t if t >= http::CONN_TOKEN_BASE => self.on_scrape(token),
                    t if t >= WORKER_TOKEN_BASE => {
                        self.on_channel(t - WORKER_TOKEN_BASE, event.is_readable(), event.is_writable())
                    }
                    _ => {}
                }
            }
            let now = Instant::now();
            self.on_timers(now);
            if self.stopping.is_none() {
                self.sup.reconcile(&self.config, self.capacity, self.poll.registry(), now);
                // A new master accepts only once the old one stopped: a
                // connection it took and then lost to a failed upgrade
                // would be cut.
                if self.is_main() {
                    self.disp.run(&mut self.listeners, &mut self.sup, dispatch::Limits::of(&self.config), now);
                }
                self.announce_ready();
            } else {
                self.send_totals_to_successor();
                if self.sup.workers.is_empty() {
                    log::info!("all workers exited; bye");
                    return Ok(0);
                }
            }
        }
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
            self.successor.as_ref().filter(|s| !s.ready).map(|s| s.deadline),
            self.stop_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Signal handler (run in the loop, not in signal context).
    fn on_signal(&mut self, sig: Signal) {
        match sig {
            Signal::Stop => self.on_stop_signal(true),
            Signal::Quit => self.on_stop_signal(false),
            Signal::Reload => self.on_reload_signal(),
            Signal::MoreWorkers => self.scale(1),
            Signal::FewerWorkers => self.scale(-1),
            Signal::Stats => self.log_stats(true),
            Signal::Upgrade => self.begin_upgrade(),
            Signal::Child => self.on_child_exit(),
        }
    }

    /// Reaps every exited child.
    fn on_child_exit(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return,
                Ok(status) if self.successor.as_ref().is_some_and(|s| Some(s.pid) == status.pid()) => {
                    self.on_successor_exit(status);
                }
                Ok(status) => {
                    let stopping = self.stopping.is_some();
                    self.sup.on_exit(status, self.poll.registry(), stopping, Instant::now());
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
            w.congested = false;
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
    fn on_scrape(&mut self, token: Token) {
        let app = Endpoint { sup: &self.sup, disp: &self.disp, info: self.info, stopping: self.is_stopping() };
        if let Some(h) = &mut self.http {
            h.on_conn(token, self.poll.registry(), &app);
        }
    }

    /// Everything driven by the clock.
    fn on_timers(&mut self, now: Instant) {
        if self.stop_at.is_some_and(|at| now >= at) {
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
        self.notify.watchdog(now);
        // A new master waiting for "go" is not the unit's main process yet:
        // its status would overwrite the serving one's.
        if now >= self.next_status && self.is_main() {
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
    /// service's main process by then, serves on.
    fn on_stop_signal(&mut self, graceful: bool) {
        match &self.successor {
            Some(s) if s.ready => log::info!(
                "stop asked after the hand-over: this old generation stops; the new master (pid {}) serves on",
                s.pid
            ),
            Some(_) => {
                self.reload_pending = false; // stopping: nothing to reload
                self.upgrade_failed("abandoned: this master is stopping".into());
            }
            None => {}
        }
        if graceful {
            self.announce_stop();
        } else {
            self.begin_stop(false);
        }
        if let Some(st) = &mut self.stopping {
            st.handed_over = false; // the operator's stop now: no taking over again
        }
    }

    /// HUP: reload, unless a new master is starting (see `reload_pending`).
    fn on_reload_signal(&mut self) {
        match &self.successor {
            Some(s) if !s.ready => {
                log::info!(
                    "reload deferred: the new master (pid {}) is starting; applied when the upgrade ends",
                    s.pid
                );
                self.reload_pending = true;
            }
            _ => self.reload(),
        }
    }

    /// A stop was asked for (it may still be in its `shutdown_delay`).
    fn is_stopping(&self) -> bool {
        self.stopping.is_some() || self.stop_at.is_some()
    }

    /// TERM/INT: a graceful stop, after `shutdown_delay` during which
    /// /healthz says 503 and the listeners still accept (see the config).
    fn announce_stop(&mut self) {
        let delay = self.config.shutdown_delay.0;
        if delay.is_zero() || self.stopping.is_some() {
            return self.begin_stop(true);
        }
        if self.stop_at.is_none() {
            log::info!(
                "graceful stop: /healthz answers 503; listeners close in {:.1}s (shutdown_delay)",
                delay.as_secs_f64()
            );
            self.notify.stopping();
            self.stop_at = Some(Instant::now() + delay);
        }
    }

    /// TERM/INT (graceful) or QUIT (fast).
    fn begin_stop(&mut self, graceful: bool) {
        self.stop_at = None;
        match self.stopping {
            Some(s) if graceful || !s.graceful => return, // already stopping at least this fast
            _ => {}
        }
        let timeout = self.config.shutdown_timeout.0;
        self.notify.stopping(); // a no-op after a binary upgrade handed over
        // Closed before it is said: whoever reads the line may rely on it.
        // After a hand-over they stay open, unpolled (`hand_over`).
        if self.successor.as_ref().is_none_or(|s| !s.ready) {
            self.listeners.close_all(self.poll.registry());
        }
        if graceful {
            log::info!(
                "graceful stop: listeners closed; connections may finish for up to {:.1}s",
                timeout.as_secs_f64()
            );
        } else {
            log::info!("fast stop: closing everything now");
        }
        let dropped = self.disp.discard_held(&mut self.sup);
        if dropped > 0 {
            log::warn!("{dropped} accepted connection(s) not yet handed to a worker were closed");
        }
        self.sup.scoreboard.set_accept_paused(false);
        self.sup.stop_all(graceful, timeout, Instant::now());
        self.stopping = Some(Stopping { graceful, handed_over: false });
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
        } else if new.metrics_listen.is_none() && !self.http_activated {
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
        let file_workers = new.worker_count();
        if file_workers != self.file_workers {
            self.sup.target = file_workers;
            self.file_workers = file_workers;
        }
        self.capacity = limits::worker_capacity(&new, limits::current_nofile());
        self.next_stats = new.stats_interval.nonzero().map(|d| Instant::now() + d);
        self.config = new;
        self.sup.generation += 1;
        self.sup.reset_backoff();
        self.ready_owed = true;
        log::info!(
            "reloaded {}: generation {}, {} worker(s) to replace one by one, target {}",
            self.source.as_ref().map_or("built-in defaults".into(), |p| p.display().to_string()),
            self.sup.generation,
            self.sup.workers.iter().filter(|w| w.generation < self.sup.generation).count(),
            self.sup.target
        );
    }

    /// Says which changed keys a reload cannot apply: the identity the
    /// master dropped to is fixed at start (root is gone by then).
    fn warn_unapplied(&self, new: &Config) {
        let old = &self.config;
        for (key, was, now) in [
            ("user", old.user.as_str(), new.user.as_str()),
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
        if self.http_activated {
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
        let target = self.sup.target.saturating_add_signed(delta).clamp(1, crate::config::MAX_WORKERS);
        if target == self.sup.target {
            log::info!("workers stay at {target}");
            return;
        }
        self.sup.target = target;
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
                state: w.phase.state(),
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

// Binary upgrade, the master's side: the handlers of USR2 and of the
// successor's and predecessor's messages. The protocol and its processes
// live in `upgrade`; these are here because they drive the master itself.
impl Master {
    /// USR2: start the new binary as a new master.
    pub(super) fn begin_upgrade(&mut self) {
        let refuse = if self.is_stopping() {
            Some("stopping".to_string())
        } else if let Some(s) = &self.successor {
            Some(format!("an upgrade is already in progress (new master pid {})", s.pid))
        } else {
            // A third generation while the first still drains would leave
            // two masters serving the same sockets if it failed (nginx
            // refuses this too).
            self.predecessor.as_ref().map(|p| format!("the previous master (pid {}) is still draining", p.pid))
        };
        if let Some(why) = refuse {
            log::warn!("upgrade refused: {why}");
            return;
        }
        let binary = Some(&self.config.upgrade_binary).filter(|b| !b.is_empty()).map(PathBuf::from);
        let handover = upgrade::Handover {
            listeners: self.listeners.handover(),
            metrics: self.http.as_ref().map(|h| (h.listener_fd(), self.http_activated)),
        };
        let deadline = Instant::now() + self.config.upgrade_timeout.0;
        let exe = binary.clone().unwrap_or_else(|| self.invocation.exe.clone());
        match upgrade::spawn(&self.invocation, binary, &handover, self.poll.registry(), deadline) {
            Ok(s) => {
                log::info!(
                    "upgrade: started new master (pid {}) from {}; waiting up to {:.0}s for it to serve",
                    s.pid,
                    exe.display(),
                    self.config.upgrade_timeout.0.as_secs_f64()
                );
                self.successor = Some(s);
            }
            Err(e) => log::error!("upgrade failed: cannot start {}: {e}; this master keeps serving", exe.display()),
        }
    }

    /// The channel to the new master is readable.
    pub(super) fn on_successor_channel(&mut self) {
        let Some(s) = &mut self.successor else { return };
        let heard = s.on_readable();
        if heard.ready {
            self.hand_over();
        }
        let Some(s) = &mut self.successor else { return };
        if heard.gone {
            s.deregister(self.poll.registry());
            if !s.ready {
                // It is exiting: let it say why before it is killed. Its exit
                // (SIGCHLD) ends the upgrade; the grace bounds the wait.
                s.deadline = s.deadline.min(Instant::now() + upgrade::EXIT_GRACE);
            }
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
            // Main from now on: the fd store is ours to keep (READY=1 with
            // MAINPID= follows from `announce_ready`).
            self.store_fds();
        }
        if let Some(c) = carried {
            self.sup.carried = c;
            self.serve_pending_metrics();
        }
        if gone {
            if let Some(mut p) = self.predecessor.take() {
                p.deregister(self.poll.registry());
            }
            if go {
                log::info!("upgrade: the previous generation has exited");
            } else {
                // It died (or was killed) before handing over: nobody else
                // accepts, so this master does.
                log::warn!("upgrade: the old master (pid {pid}) is gone without handing over; this master takes over");
                self.store_fds();
            }
            self.serve_pending_metrics();
        }
    }

    /// Whether this master accepts connections and speaks for the service
    /// (MAINPID, fd store): always, unless it is a new master whose
    /// predecessor has not yet said "go".
    pub(super) fn is_main(&self) -> bool {
        self.predecessor.as_ref().is_none_or(|p| p.go)
    }

    /// The inherited metrics socket goes live once the old totals are in.
    fn serve_pending_metrics(&mut self) {
        if let Some(l) = self.pending_metrics.take() {
            match HttpServer::adopt(l, self.poll.registry()) {
                Ok(h) => {
                    log::info!("metrics on http://{}/metrics", h.addr);
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
        let Some(s) = self.successor.as_mut() else { return };
        let pid = s.pid;
        log::info!("upgrade: new master (pid {pid}) serves; this master stops accepting and drains");
        self.listeners.pause(self.poll.registry());
        // The new master serves /metrics from here; scrapes in progress
        // finish (dropping them would reset their clients).
        if let Some(h) = &mut self.http {
            h.pause(self.poll.registry());
        }
        // MAINPID first: the new master's READY=1 (after "go") then always
        // follows it.
        self.notify.hand_over(pid.as_raw() as u32);
        s.go();
        self.begin_stop(true);
        if let Some(st) = &mut self.stopping {
            st.handed_over = true;
        }
        self.send_totals_to_successor();
        if std::mem::take(&mut self.reload_pending) {
            log::info!("upgrade: passing the reload asked for during the upgrade on to the new master (pid {pid})");
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP);
        }
    }

    /// While draining after a hand-over: the new master carries our totals.
    pub(super) fn send_totals_to_successor(&mut self) {
        if let Some(s) = self.successor.as_mut().filter(|s| s.ready && !s.closed) {
            s.send_totals(crate::stats::Carried::of(&snapshot(&self.sup, &self.disp)));
        }
    }

    /// The new master exited (reaped by SIGCHLD).
    pub(super) fn on_successor_exit(&mut self, status: nix::sys::wait::WaitStatus) {
        let how = supervisor::describe(status);
        let Some(s) = &self.successor else { return };
        if !s.ready {
            return self.upgrade_failed(format!("the new master exited ({how})"));
        }
        let pid = s.pid;
        if let Some(mut s) = self.successor.take() {
            s.deregister(self.poll.registry());
        }
        if self.stopping.is_some_and(|st| st.handed_over) {
            log::warn!("upgrade: the new master (pid {pid}), which had taken over, exited ({how}); taking over again");
            self.take_back();
        } else {
            log::warn!("upgrade: the new master (pid {pid}), which had taken over, exited ({how})");
        }
    }

    /// Rolls a hand-over back: the new master died while this one drained.
    /// Listen again on the sockets kept for this, serve /metrics again, be
    /// systemd's main process again, and start a fresh generation of workers
    /// (the draining ones finish on their own deadlines).
    fn take_back(&mut self) {
        if let Err(e) = self.listeners.resume(self.poll.registry()) {
            log::error!("upgrade: cannot listen again: {e}");
        }
        if let Some(Err(e)) = self.http.as_mut().map(|h| h.resume(self.poll.registry())) {
            log::error!("cannot serve metrics again: {e}");
        }
        self.notify.take_back();
        self.stopping = None;
        self.stop_at = None;
        self.sup.generation += 1;
        self.sup.reset_backoff();
        self.ready_owed = true;
        self.store_fds();
    }

    /// Gives up on a new master that did not become ready in time, or that
    /// closed its channel and did not exit.
    pub(super) fn check_upgrade_deadline(&mut self, now: Instant) {
        let Some(s) = self.successor.as_ref().filter(|s| !s.ready && now >= s.deadline) else { return };
        let why = if s.closed {
            format!("the new master closed its channel and did not exit within {}s", upgrade::EXIT_GRACE.as_secs())
        } else {
            format!("the new master did not become ready within {:.0}s", self.config.upgrade_timeout.0.as_secs_f64())
        };
        self.upgrade_failed(why);
    }

    /// Ends a failed upgrade: the new master (and with it its workers, by
    /// PR_SET_PDEATHSIG) is killed; it never accepted, and this master never
    /// stopped serving. A reload asked for meanwhile is applied now.
    pub(super) fn upgrade_failed(&mut self, why: String) {
        let Some(mut s) = self.successor.take() else { return };
        s.deregister(self.poll.registry());
        let _ = nix::sys::signal::kill(s.pid, nix::sys::signal::Signal::SIGKILL);
        log::error!("upgrade failed: {why}; this master keeps serving");
        if std::mem::take(&mut self.reload_pending) {
            self.reload();
        }
    }

    /// Keeps systemd's fd store holding our listening sockets (when it is
    /// there to hold them and they are not the socket unit's), so that a
    /// plain restart refuses no connection: the new process gets them back
    /// as LISTEN_FDS named [`upgrade::FD_LISTEN`] / [`upgrade::FD_METRICS`]. Only the main
    /// master writes it: a new master that may still fail must not replace
    /// the live sockets there.
    pub(super) fn store_fds(&self) {
        if !self.notify.enabled() || !self.is_main() {
            return;
        }
        self.notify.store_fds(upgrade::FD_LISTEN, &self.listeners.own_fds());
        if !self.http_activated {
            // Served, or inherited and not served yet: either way the live
            // metrics socket (never an empty entry that would remove it).
            let pending = self.pending_metrics.iter().map(std::os::fd::AsFd::as_fd);
            let metrics: Vec<_> = self.http.iter().map(|h| h.listener_borrowed()).chain(pending).collect();
            self.notify.store_fds(upgrade::FD_METRICS, &metrics);
        }
    }
}
