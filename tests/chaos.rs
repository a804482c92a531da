//! Lifecycle chaos: a seeded random sequence of signals, crashes, reloads,
//! upgrades and bad clients against a real echod under steady verifying
//! load, with the design's invariants checked after every step.
//!
//! Every bug in the lifecycle lived between two events the other suites send
//! one at a time. This driver draws the events (and their timings: back to
//! back, during a reload, during an upgrade) from a seeded RNG, so a failure
//! prints its seed and trace and the same seed replays the same sequence.
//! Timing-dependent outcomes (whether a kill lands before or after a new
//! master is ready) may differ between replays; the events and their
//! parameters do not.
//!
//! - short run (part of `cargo test`, so of `.ci/run`): a fixed seed per
//!   handler mode, `CHAOS_STEPS` steps each;
//! - long run: `ECHOD_CHAOS_STEPS=2000 ECHOD_CHAOS_SEED=random cargo test
//!   --release --test chaos -- --nocapture` (add `ECHOD_CHAOS_MODE=event` for
//!   one mode); every step is printed.
//!
//! Invariants (see `check_step` and `check_quiescent`):
//! - exactly one master of ours is alive and it has the expected number of
//!   serving workers; every worker ever logged as started is either its
//!   child or dead; every configured listener echoes, a removed one refuses;
//! - clients not hit by the step's event saw no error; no client ever saw a
//!   wrong byte;
//! - `/metrics` counters never go backwards within one service lifetime
//!   (a binary upgrade carries them; only a restart starts them afresh);
//! - under the test's NOTIFY_SOCKET: READY=1 names (MAINPID) the live
//!   master, a RELOADING=1 is followed by READY=1, STOPPING=1 is the last
//!   word of a stopped service and never said by a running one;
//! - at quiescence (clients paused; every fourth step, after restarts, at
//!   the end): accepted = closed + active with active 0, bytes in = bytes
//!   out (less what resetting clients sent and never read), the per-address
//!   limit has all its room back (`PER_IP` connections from 127.0.0.1 are
//!   all served), and every process's fd count is back at its baseline for
//!   that shape (listeners, workers).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Steps per mode in the short run (`cargo test`).
const CHAOS_STEPS: usize = 24;
/// Connections one address may hold; checked for leaks at quiescence.
const PER_IP: usize = 40;
/// Graceful drains end well within this; clients hold connections for
/// less, so a graceful event never has to cut one.
const SHUTDOWN_TIMEOUT: u64 = 3;
/// How long a state may take to settle before it counts as a violation.
const SETTLE: Duration = Duration::from_secs(15);

#[test]
fn chaos_thread_mode() {
    run_mode("thread", 0x5eed_0001);
}

#[test]
fn chaos_event_mode() {
    run_mode("event", 0x5eed_0002);
}

fn run_mode(mode: &'static str, default_seed: u64) {
    if std::env::var("ECHOD_CHAOS_MODE").is_ok_and(|m| m != mode) {
        return;
    }
    let seed = match std::env::var("ECHOD_CHAOS_SEED").as_deref() {
        Ok("random") => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
        Ok(s) => s.parse().unwrap_or_else(|_| panic!("ECHOD_CHAOS_SEED={s}: a number or `random`")),
        Err(_) => default_seed,
    };
    let steps = std::env::var("ECHOD_CHAOS_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(CHAOS_STEPS);
    in_mode(mode, || {
        let mut chaos = Chaos::start(seed, mode);
        let t0 = Instant::now();
        for step in 0..steps {
            chaos.step(step);
        }
        chaos.quiesce_and_check(steps);
        let s = chaos.stats;
        println!(
            "chaos {mode} seed {seed}: {steps} steps in {:.0?}: {} events, {} restarts, {} upgrades, {} quiescent checks, \
             {} client connections, {} round trips, {} client errors (all in steps that hit clients)",
            t0.elapsed(),
            chaos.trace.len(),
            s.restarts,
            s.upgrades,
            s.quiescent,
            chaos.clients.connections.load(Relaxed),
            chaos.clients.round_trips.load(Relaxed),
            chaos.clients.failures.lock().unwrap().len()
        );
        chaos.stop();
    });
}

/// One thing the driver does to echod (or to its clients).
#[derive(Debug, Clone)]
enum Event {
    /// Rewrite the config and HUP: worker count, buffer size, the extra
    /// listener on or off.
    Reload {
        workers: Option<usize>,
        buffer: usize,
        extra: bool,
    },
    /// A config with an error in it, HUP (the old config keeps running),
    /// then the good file back.
    BrokenReload,
    Ttin,
    Ttou,
    /// Binary upgrade to the same binary.
    Upgrade,
    /// USR2 to a binary that exits at once or hangs (killed after
    /// `upgrade_timeout`).
    FailedUpgrade {
        hangs: bool,
    },
    /// USR2, then SIGKILL the new master after `after_ms`.
    KillNewMaster {
        after_ms: u64,
    },
    /// USR2 to a binary that takes its time before it execs echod.
    SlowUpgrade,
    /// USR2, then TERM to the old master after `after_ms`: the upgrade is
    /// abandoned if it had not finished, and the service stops.
    TermDuringUpgrade {
        after_ms: u64,
    },
    /// SIGSTOP the master for `ms`, then SIGCONT: connections wait in the
    /// listen backlog, nobody fails.
    StopMaster {
        ms: u64,
    },
    /// USR2 and, back to back, a HUP (deferred until the upgrade ends).
    ReloadDuringUpgrade,
    /// HUP and, `after_ms` later, TERM; then start again.
    TermDuringReload {
        after_ms: u64,
    },
    SigkillWorker {
        which: usize,
    },
    StopWorker {
        which: usize,
        ms: u64,
    },
    /// TERM (graceful) or QUIT (fast), then start again.
    Stop {
        quit: bool,
    },
    SigkillMaster,
    /// Clients that connect and reset at once, or say nothing and leave.
    BadClients {
        resets: usize,
        silent: usize,
    },
}

impl Event {
    /// Whether the event may break client connections (a kill, a stop):
    /// in any other step a client error is a violation.
    fn hits_clients(&self) -> bool {
        matches!(
            self,
            Event::SigkillWorker { .. }
                | Event::Stop { .. }
                | Event::SigkillMaster
                | Event::TermDuringReload { .. }
                | Event::KillNewMaster { .. }
                | Event::TermDuringUpgrade { .. }
        )
    }

    /// One roll per kind of event (the lowest of its range in `draw`).
    const KINDS: [u64; 17] = [0, 15, 19, 21, 23, 24, 32, 39, 49, 53, 58, 63, 67, 75, 82, 88, 91];

    /// The event for a roll in 0..100 (how often each kind comes), with
    /// its parameters drawn from `rng`.
    fn draw(rng: &mut Rng, target: usize, roll: u64) -> Event {
        let which = rng.below(8) as usize;
        match roll {
            0..=14 => Event::Reload {
                workers: if rng.below(2) == 0 { Some(1 + rng.below(3) as usize) } else { None },
                buffer: [1024, 4096, 16384, 65536][rng.below(4) as usize],
                extra: rng.below(2) == 0,
            },
            15..=18 => Event::BrokenReload,
            19..=20 => Event::SlowUpgrade,
            21..=22 => Event::TermDuringUpgrade { after_ms: [0, 5, 50, 200][rng.below(4) as usize] },
            23 => Event::StopMaster { ms: [50, 500, 1500][rng.below(3) as usize] },
            24..=31 if target < 4 => Event::Ttin,
            24..=31 => Event::Ttou,
            32..=38 if target > 1 => Event::Ttou,
            32..=38 => Event::Ttin,
            39..=48 => Event::Upgrade,
            49..=52 => Event::FailedUpgrade { hangs: rng.below(3) == 0 },
            53..=57 => Event::KillNewMaster { after_ms: [0, 5, 20, 100, 300][rng.below(5) as usize] },
            58..=62 => Event::ReloadDuringUpgrade,
            63..=66 => Event::TermDuringReload { after_ms: [0, 2, 10, 50][rng.below(4) as usize] },
            67..=74 => Event::SigkillWorker { which },
            75..=81 => Event::StopWorker { which, ms: [20, 200, 800, 1500][rng.below(4) as usize] },
            82..=87 => Event::Stop { quit: rng.below(2) == 0 },
            88..=90 => Event::SigkillMaster,
            _ => Event::BadClients { resets: rng.below(40) as usize, silent: rng.below(10) as usize },
        }
    }
}

/// The config the driver keeps in the file (and what it expects to run).
#[derive(Debug, Clone)]
struct Shape {
    workers: usize,
    buffer: usize,
    extra: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct RunStats {
    restarts: u64,
    upgrades: u64,
    quiescent: u64,
}

struct Chaos {
    seed: u64,
    mode: &'static str,
    rng: Rng,
    dir: tempfile::TempDir,
    /// The main listener, the extra one (on and off by reload), the PROXY
    /// one, the metrics one: fixed ports, kept across restarts.
    main: SocketAddr,
    extra: SocketAddr,
    proxied: SocketAddr,
    metrics: SocketAddr,
    shape: Shape,
    /// Worker count the master should run (config, TTIN/TTOU).
    target: usize,
    notify: Notifications,
    echod: Option<Echod>,
    /// The master serving now (changes with upgrades and restarts).
    master: i32,
    /// Every master this service instance has had (upgrades); exactly one
    /// may be alive once a step settles.
    masters: Vec<i32>,
    /// Index in the notifications where this service instance began.
    notify_from: usize,
    clients: Arc<Clients>,
    client_threads: Vec<thread::JoinHandle<()>>,
    /// Last counters scraped in this service lifetime.
    counters: HashMap<String, f64>,
    /// Fd counts at quiescence by (listeners, workers) for the master, and
    /// the first seen for a worker.
    master_fds: HashMap<(usize, usize), usize>,
    worker_fds: Option<usize>,
    trace: Vec<String>,
    stats: RunStats,
    /// Bytes bad clients sent and never read back (they reset): what
    /// bytes in may exceed bytes out by, in this service lifetime.
    unread: u64,
    /// The first steps' rolls: each kind of event once, shuffled.
    kinds: Vec<u64>,
}

impl Chaos {
    fn start(seed: u64, mode: &'static str) -> Chaos {
        let dir = tempfile::tempdir().unwrap();
        let port = |_| -> SocketAddr { format!("127.0.0.1:{}", stable_port()).parse().unwrap() };
        let (main, extra, proxied, metrics) = (port(0), port(1), port(2), port(3));
        let clients = Arc::new(Clients::default());
        let mut chaos = Chaos {
            seed,
            mode,
            rng: Rng::new(seed),
            dir,
            main,
            extra,
            proxied,
            metrics,
            shape: Shape { workers: 2, buffer: 16384, extra: false },
            target: 2,
            notify: Notifications::new(),
            echod: None,
            master: 0,
            masters: Vec::new(),
            notify_from: 0,
            clients: clients.clone(),
            client_threads: Vec::new(),
            counters: HashMap::new(),
            master_fds: HashMap::new(),
            worker_fds: None,
            trace: Vec::new(),
            stats: RunStats::default(),
            unread: 0,
            kinds: Vec::new(),
        };
        let mut kinds = Event::KINDS.to_vec();
        for i in (1..kinds.len()).rev() {
            kinds.swap(i, chaos.rng.below(i as u64 + 1) as usize);
        }
        chaos.kinds = kinds;
        println!("chaos {mode}: seed {seed} (replay: ECHOD_CHAOS_SEED={seed} ECHOD_CHAOS_MODE={mode})");
        chaos.launch();
        chaos.client_threads = Clients::spawn(&clients, main, proxied, seed);
        chaos.quiesce_and_check(0);
        chaos
    }

    /// The config text for `shape` (and an optional upgrade binary).
    fn config(&self, shape: &Shape, upgrade: Option<(&std::path::Path, u32)>) -> String {
        let mut listen = vec![self.main.to_string(), self.proxied.to_string()];
        if shape.extra {
            listen.push(self.extra.to_string());
        }
        let listen: Vec<String> = listen.iter().map(|a| format!("\"{a}\"")).collect();
        let mut text = format!(
            "listen = [{}]\nworkers = {}\nbuffer_size = {}\nshutdown_timeout = {SHUTDOWN_TIMEOUT}\n\
             metrics_listen = \"{}\"\nmax_connections_per_ip = {PER_IP}\nproxy_protocol = [\"{}\"]\n\
             proxy_trusted = [\"127.0.0.1\"]\n",
            listen.join(", "),
            shape.workers,
            shape.buffer,
            self.metrics,
            self.proxied
        );
        if let Some((binary, timeout)) = upgrade {
            text.push_str(&format!("upgrade_binary = \"{}\"\nupgrade_timeout = {timeout}\n", binary.display()));
        }
        text
    }

    fn write_config(&self, text: &str) {
        self.e().write_config(text);
    }

    fn e(&self) -> &Echod {
        self.echod.as_ref().expect("echod running")
    }

    /// Starts the service afresh (first start, or after a stop or kill).
    fn launch(&mut self) {
        self.notify_from = self.notify.all().len();
        let text = self.config(&self.shape, None);
        let path = self.notify.path.to_str().unwrap().to_string();
        let e = start_with(&text, &[], &[("NOTIFY_SOCKET", &path)]);
        self.master = e.pid();
        self.masters = vec![self.master];
        self.target = self.shape.workers;
        self.counters.clear();
        self.unread = 0;
        self.echod = Some(e);
    }

    fn step(&mut self, step: usize) {
        // Every kind once first, in a seeded order (so the short run covers
        // them all), then as often as `draw` weighs them.
        let roll = match self.kinds.get(step) {
            Some(&r) => r,
            None => self.rng.below(100),
        };
        let event = Event::draw(&mut self.rng, self.target, roll);
        let line = format!("step {step}: {event:?}");
        println!("{line}");
        self.trace.push(line);
        let failures_before = self.clients.failures.lock().unwrap().len();
        let mismatches_before = self.clients.mismatches.load(Relaxed);
        let t = Instant::now();
        self.apply(&event);
        if event.hits_clients() {
            // Every client finishes (or fails) the connection it had when
            // the event hit, so its errors belong to this step.
            self.clients.pause();
            self.clients.resume();
        }
        self.check(step, "after the event", |c| c.check_step());
        let failures: Vec<String> = self.clients.failures.lock().unwrap()[failures_before..].to_vec();
        if !event.hits_clients() && !failures.is_empty() {
            self.fail(
                step,
                &format!(
                    "{} client error(s) in a step that hits no client: {:?}",
                    failures.len(),
                    &failures[..failures.len().min(5)]
                ),
            );
        }
        if self.clients.mismatches.load(Relaxed) != mismatches_before {
            self.fail(step, "a client got a wrong byte back");
        }
        if step % 4 == 3 || matches!(event, Event::Stop { .. } | Event::SigkillMaster | Event::TermDuringReload { .. })
        {
            self.quiesce_and_check(step);
        }
        if let Some(trace) = self.trace.last_mut() {
            trace.push_str(&format!(" ({:.0?})", t.elapsed()));
        }
    }

    /// Runs `f`; on a violation, prints the seed and the trace and fails.
    fn check(&mut self, step: usize, what: &str, f: impl FnOnce(&mut Chaos) -> Result<(), String>) {
        if let Err(why) = f(self) {
            self.fail(step, &format!("{what}: {why}"));
        }
    }

    fn fail(&self, step: usize, why: &str) -> ! {
        let log = self.echod.as_ref().map(|e| e.log_lines()).unwrap_or_default();
        let tail = &log[log.len().saturating_sub(60)..];
        panic!(
            "chaos {} failed at step {step}: {why}\nreplay: ECHOD_CHAOS_SEED={} ECHOD_CHAOS_MODE={} ECHOD_CHAOS_STEPS={} \
             cargo test --release --test chaos -- --nocapture\ntrace:\n{}\nlast log lines:\n{}",
            self.mode,
            self.seed,
            self.mode,
            step + 1,
            self.trace.join("\n"),
            tail.join("\n")
        );
    }

    fn apply(&mut self, event: &Event) {
        match *event {
            Event::Reload { workers, buffer, extra } => {
                let mut shape = self.shape.clone();
                if let Some(w) = workers {
                    // A changed `workers` wins over TTIN/TTOU; the same value
                    // keeps the scaled count.
                    if w != shape.workers {
                        self.target = w;
                    }
                    shape.workers = w;
                }
                shape.buffer = buffer;
                shape.extra = extra;
                self.shape = shape;
                self.reload(&self.config(&self.shape, None));
            }
            Event::BrokenReload => {
                let skip = self.e().log_len();
                let good = self.config(&self.shape, None);
                let broken = good.replace(&format!("buffer_size = {}", self.shape.buffer), "buffer_size = \"huge\"");
                self.write_config(&broken);
                kill(self.master, libc_sig::HUP);
                let line = self.wait_log(skip, "reload failed");
                if !line.contains("echod.toml:") || !line.contains("`buffer_size`") {
                    self.fail(
                        self.trace.len() - 1,
                        &format!("the failed reload does not name file, line and key: {line}"),
                    );
                }
                self.write_config(&good);
            }
            Event::Ttin => {
                self.target += 1;
                kill(self.master, libc_sig::TTIN);
            }
            Event::Ttou => {
                self.target = (self.target - 1).max(1);
                kill(self.master, libc_sig::TTOU);
            }
            Event::Upgrade => {
                self.upgrade();
            }
            Event::FailedUpgrade { hangs } => {
                let body = if hangs { "exec sleep 30" } else { "exit 1" };
                let binary = script(self.dir.path(), if hangs { "hangs" } else { "exits" }, body);
                self.reload(&self.config(&self.shape, Some((&binary, 1))));
                let skip = self.e().log_len();
                kill(self.master, libc_sig::USR2);
                self.wait_log(skip, "upgrade failed");
                self.reload(&self.config(&self.shape, None));
            }
            Event::KillNewMaster { after_ms } => {
                let (_, new) = self.begin_upgrade();
                thread::sleep(Duration::from_millis(after_ms));
                kill(new, libc_sig::KILL);
                // Dead first (a kill is delivered asynchronously), then see
                // which master, if any, is left.
                if !wait_gone(new, &[], SETTLE) {
                    self.fail(self.trace.len() - 1, &format!("new master {new} survived SIGKILL"));
                }
                self.settle_master();
            }
            Event::SlowUpgrade => {
                let binary = script(self.dir.path(), "slow", &format!("sleep 0.5\nexec {ECHOD} \"$@\""));
                self.reload(&self.config(&self.shape, Some((&binary, 10))));
                self.upgrade();
                self.reload(&self.config(&self.shape, None));
            }
            Event::TermDuringUpgrade { after_ms } => {
                self.begin_upgrade();
                thread::sleep(Duration::from_millis(after_ms));
                kill(self.master, libc_sig::TERM);
                // Either the hand-over had happened (the new master serves
                // on) or the old master abandons it (both stop).
                if !wait_gone(self.master, &[], Duration::from_secs(SHUTDOWN_TIMEOUT) + SETTLE) {
                    self.fail(self.trace.len() - 1, "the old master outlived its TERM");
                }
                self.settle_master();
            }
            Event::StopMaster { ms } => {
                kill(self.master, libc_sig::STOP);
                thread::sleep(Duration::from_millis(ms));
                kill(self.master, libc_sig::CONT);
            }
            Event::ReloadDuringUpgrade => {
                self.shape.buffer = if self.shape.buffer == 4096 { 8192 } else { 4096 };
                self.write_config(&self.config(&self.shape, None));
                let (skip, _) = self.begin_upgrade();
                kill(self.master, libc_sig::HUP);
                self.finish_upgrade(skip);
            }
            Event::TermDuringReload { after_ms } => {
                let shape = Shape { buffer: if self.shape.buffer == 4096 { 8192 } else { 4096 }, ..self.shape.clone() };
                self.shape = shape;
                self.write_config(&self.config(&self.shape, None));
                kill(self.master, libc_sig::HUP);
                thread::sleep(Duration::from_millis(after_ms));
                self.stop_and_restart(libc_sig::TERM);
            }
            Event::SigkillWorker { which } => {
                let workers = children_of(self.master);
                if let Some(&w) = workers.get(which % workers.len().max(1)) {
                    kill(w, libc_sig::KILL);
                }
            }
            Event::StopWorker { which, ms } => {
                let workers = children_of(self.master);
                if let Some(&w) = workers.get(which % workers.len().max(1)) {
                    kill(w, libc_sig::STOP);
                    thread::sleep(Duration::from_millis(ms));
                    kill(w, libc_sig::CONT);
                }
            }
            Event::Stop { quit } => self.stop_and_restart(if quit { libc_sig::QUIT } else { libc_sig::TERM }),
            Event::SigkillMaster => self.stop_and_restart(libc_sig::KILL),
            Event::BadClients { resets, silent } => {
                // From their own address: the per-address limit is theirs to
                // hit, not the verifying clients'.
                for _ in 0..resets {
                    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                    let from: SocketAddr = "127.0.0.2:0".parse().unwrap();
                    if s.bind(&from.into()).is_ok()
                        && s.connect(&self.main.into()).is_ok()
                        && (&s).write_all(b"half a messa").is_ok()
                    {
                        self.unread += 12;
                        let _ = s.set_linger(Some(Duration::ZERO));
                    }
                }
                for _ in 0..silent {
                    drop(connect_from("127.0.0.3", self.main));
                }
            }
        }
    }

    fn reload(&mut self, text: &str) {
        let skip = self.e().log_len();
        self.write_config(text);
        kill(self.master, libc_sig::HUP);
        self.wait_log(skip, &format!("[master {}] reloaded", self.master));
    }

    fn upgrade(&mut self) {
        let (skip, _) = self.begin_upgrade();
        self.finish_upgrade(skip);
    }

    /// Sends USR2 and waits for the new master to be started; returns the
    /// log position before the USR2 and the new master's pid (tracked, so
    /// it is killed by PID at the end whatever happens).
    fn begin_upgrade(&mut self) -> (usize, i32) {
        let skip = self.e().log_len();
        kill(self.master, libc_sig::USR2);
        let line = self.wait_log(skip, "upgrade: started new master (pid ");
        let new = pid_in(&line);
        self.e().track(new);
        self.masters.push(new);
        (skip, new)
    }

    /// Waits for the hand-over after a USR2 sent at log line `skip`, and
    /// for the old master to finish draining.
    fn finish_upgrade(&mut self, skip: usize) {
        let line = self.wait_log(skip, "upgrade: new master (pid ");
        let new = pid_in(&line);
        let old = self.master;
        self.master = new;
        self.stats.upgrades += 1;
        // A worker count scaled by TTIN/TTOU is not carried: the new master
        // starts what its file says.
        self.target = self.shape.workers;
        if !wait_gone(old, &[], SETTLE) {
            self.fail(self.trace.len() - 1, &format!("old master {old} still alive {SETTLE:?} after the hand-over"));
        }
    }

    /// After a kill of a new master: whichever of ours is alive is the one.
    fn settle_master(&mut self) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let living: Vec<i32> = self.masters.iter().copied().filter(|&m| alive(m)).collect();
            if living.len() == 1 {
                if living[0] != self.master {
                    // The new master had taken over and the old one had gone.
                    self.master = living[0];
                    self.target = self.shape.workers;
                }
                return;
            }
            if living.is_empty() {
                // Both gone: the old one had drained and left before the
                // kill. The service is down; an operator starts it again.
                self.restart();
                return;
            }
            if Instant::now() > deadline {
                self.fail(self.trace.len() - 1, &format!("masters {living:?} alive {SETTLE:?} after the kill"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the service with `sig` and checks it went away cleanly, then
    /// starts it again.
    fn stop_and_restart(&mut self, sig: i32) {
        let master = self.master;
        let workers = self.started_pids();
        let before = self.notify.all().len();
        kill(master, sig);
        let bound = Duration::from_secs(SHUTDOWN_TIMEOUT) + SETTLE;
        if !wait_gone(master, &workers, bound) {
            let left: Vec<i32> = workers.iter().copied().filter(|&p| alive(p)).collect();
            self.fail(
                self.trace.len() - 1,
                &format!("after signal {sig}: master {master} or workers {left:?} still alive"),
            );
        }
        if sig != libc_sig::KILL {
            let Some(at) = self.notify.wait(before, "STOPPING=1", Duration::from_secs(5)) else {
                self.fail(self.trace.len() - 1, "stopped without STOPPING=1");
            };
            let after: Vec<String> = self.notify.all()[at + 1..].iter().map(|(_, m)| m.clone()).collect();
            if let Some(m) = after.iter().find(|m| m.contains("READY=1") || m.contains("RELOADING=1")) {
                self.fail(self.trace.len() - 1, &format!("`{m}` after STOPPING=1"));
            }
        }
        if sig != libc_sig::KILL {
            let code = self
                .echod
                .as_mut()
                .and_then(|e| if e.pid() == master { e.wait_exit(Duration::from_secs(5)) } else { None });
            if let Some(c) = code.filter(|&c| c != 0) {
                self.fail(self.trace.len() - 1, &format!("exit status {c} after signal {sig}"));
            }
        }
        self.restart();
    }

    fn restart(&mut self) {
        // Let the clients see the outage and recover on the new instance.
        self.echod = None;
        self.stats.restarts += 1;
        self.launch();
    }

    /// Every pid the service logged as a started worker.
    fn started_pids(&self) -> Vec<i32> {
        self.e().log_lines().iter().filter(|l| l.contains(" started (pid ")).map(|l| pid_in(l)).collect()
    }

    fn wait_log(&self, skip: usize, pat: &str) -> String {
        self.e()
            .wait_log_after(skip, pat, SETTLE)
            .unwrap_or_else(|| self.fail(self.trace.len().saturating_sub(1), &format!("no `{pat}` in the log")))
    }

    /// The invariants that hold once a step has settled, under load.
    fn check_step(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + SETTLE;
        // One master of ours, with `target` serving workers.
        loop {
            let masters: Vec<i32> = self.masters.iter().copied().filter(|&m| alive(m)).collect();
            let m = scrape(self.metrics);
            let serving = m.get("echod_workers").copied().unwrap_or(-1.0);
            let target = m.get("echod_workers_target").copied().unwrap_or(-1.0);
            let children = children_of(self.master).len();
            let strays = self.stray_workers();
            if masters == [self.master]
                && serving == self.target as f64
                && target == self.target as f64
                && children == self.target
                && strays.is_empty()
            {
                break;
            }
            let last = format!(
                "masters alive {masters:?} (expected [{}]); workers serving {serving}, target {target}, children {children} \
                 (expected {}); started workers neither children nor dead: {strays:?}",
                self.master, self.target
            );
            if Instant::now() > deadline {
                return Err(format!("not settled after {SETTLE:?}: {last}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
        // Every configured listener serves; a removed one refuses.
        for (addr, on) in [(self.main, true), (self.extra, self.shape.extra)] {
            match (on, echo_once(addr)) {
                (true, Err(e)) => return Err(format!("{addr} does not echo: {e}")),
                (false, Ok(())) => return Err(format!("{addr} still serves after it was removed")),
                _ => {}
            }
        }
        let mut p = connect(self.proxied);
        p.write_all(b"PROXY TCP4 192.0.2.1 127.0.0.1 5000 80\r\n").map_err(|e| e.to_string())?;
        match round_trip(&mut p, b"via proxy") {
            Ok(got) if got == b"via proxy" => {}
            other => return Err(format!("the PROXY listener: {other:?}")),
        }
        drop(p);
        self.check_counters()?;
        self.check_notifications()
    }

    /// Workers logged as started (by any master of this instance) that are
    /// alive but not the current master's children.
    fn stray_workers(&self) -> Vec<i32> {
        let ours = children_of(self.master);
        self.started_pids().into_iter().filter(|p| !ours.contains(p) && alive(*p)).collect()
    }

    fn check_counters(&mut self) -> Result<(), String> {
        let m = scrape(self.metrics);
        for name in [
            "echod_connections_accepted_total",
            "echod_connections_closed_total",
            "echod_bytes_received_total",
            "echod_bytes_sent_total",
        ] {
            let now = m.get(name).copied().ok_or_else(|| format!("no {name}"))?;
            if let Some(&before) = self.counters.get(name) {
                if now < before {
                    return Err(format!("{name} went backwards: {before} then {now}"));
                }
            }
            self.counters.insert(name.to_string(), now);
        }
        Ok(())
    }

    /// What systemd was told: READY=1 after RELOADING=1, MAINPID names the
    /// live master, no STOPPING=1 from a running service.
    fn check_notifications(&self) -> Result<(), String> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let all = self.notify.all();
            let states: Vec<&str> = all[self.notify_from..]
                .iter()
                .map(|(_, m)| m.as_str())
                .filter(|m| m.contains("READY=1") || m.contains("RELOADING=1") || m.contains("STOPPING=1"))
                .collect();
            if let Some(m) = states.iter().find(|m| m.contains("STOPPING=1")) {
                return Err(format!("STOPPING=1 from a running service: {m}"));
            }
            let last = states.last().copied().unwrap_or("");
            let main_pid = all[self.notify_from..]
                .iter()
                .filter_map(|(_, m)| fields(m).get("MAINPID").and_then(|p| p.parse::<i32>().ok()))
                .next_back()
                .unwrap_or(self.masters[0]);
            if last.contains("READY=1") && main_pid == self.master {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("last state message `{last}`, MAINPID {main_pid}, master {}", self.master));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pauses the clients, checks the totals, the per-address room and the
    /// fd counts, and lets the clients go on.
    fn quiesce_and_check(&mut self, step: usize) {
        self.clients.pause();
        self.check(step, "at quiescence", |c| c.check_step());
        self.check(step, "at quiescence", |c| c.check_quiescent());
        self.clients.resume();
        self.stats.quiescent += 1;
    }

    fn check_quiescent(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + SETTLE;
        let mut m;
        loop {
            m = scrape(self.metrics);
            let g = |k: &str| m.get(k).copied().unwrap_or(-1.0);
            if g("echod_connections_active") == 0.0
                && g("echod_connections_accepted_total") == g("echod_connections_closed_total")
                && (0.0..=self.unread as f64).contains(&(g("echod_bytes_received_total") - g("echod_bytes_sent_total")))
            {
                break;
            }
            if Instant::now() > deadline {
                let keys = ["active", "accepted_total", "closed_total"].map(|k| format!("connections_{k}"));
                let shown: Vec<String> = keys
                    .iter()
                    .chain(["bytes_received_total".to_string(), "bytes_sent_total".to_string()].iter())
                    .map(|k| format!("{k}={}", g(&format!("echod_{k}"))))
                    .collect();
                return Err(format!("never quiescent: {} (unread by bad clients: {})", shown.join(" "), self.unread));
            }
            thread::sleep(Duration::from_millis(20));
        }
        // The per-address limit has all its room back: PER_IP connections
        // from 127.0.0.1 are served (a leaked count would refuse some).
        let mut held = Vec::new();
        for i in 0..PER_IP {
            let mut s = connect(self.main);
            match round_trip(&mut s, &[i as u8; 3]) {
                Ok(got) if got == [i as u8; 3] => held.push(s),
                other => return Err(format!("connection {i} of the {PER_IP} one address may hold: {other:?}")),
            }
        }
        drop(held);
        // Their room must be back before the clients resume (they share the
        // address): wait for the server to have seen every close.
        let deadline = Instant::now() + SETTLE;
        while scrape(self.metrics).get("echod_connections_active") != Some(&0.0) {
            if Instant::now() > deadline {
                return Err("the probes' connections never closed on the server".into());
            }
            thread::sleep(Duration::from_millis(10));
        }
        // Fd counts: the master's for this shape, every worker's, back to
        // where they were the first time (after the probes have closed).
        let shape = (if self.shape.extra { 3 } else { 2 }, self.target);
        let deadline = Instant::now() + SETTLE;
        loop {
            let master = fd_count(self.master);
            let workers: Vec<usize> = children_of(self.master).iter().map(|&w| fd_count(w)).collect();
            let base_m = *self.master_fds.entry(shape).or_insert(master);
            let base_w = *self.worker_fds.get_or_insert(workers.iter().copied().max().unwrap_or(0));
            if master <= base_m && workers.iter().all(|&w| w <= base_w) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "fds: master {master} (baseline {base_m} for {shape:?}), workers {workers:?} (baseline {base_w})"
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) {
        self.clients.stop.store(true, Relaxed);
        self.clients.resume();
        for t in self.client_threads.drain(..) {
            let _ = t.join();
        }
        if let Some(mut e) = self.echod.take() {
            kill(self.master, libc_sig::QUIT);
            let _ = e.wait_exit(Duration::from_secs(5));
        }
    }
}

/// `/metrics`, or nothing while no master answers (mid-restart).
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let get = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: chaos\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    };
    match get() {
        Ok(text) if text.starts_with("HTTP/1.1 200") => {
            parse_metrics(text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default())
        }
        _ => HashMap::new(),
    }
}

fn echo_once(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    match round_trip(&mut s, b"probe") {
        Ok(got) if got == b"probe" => Ok(()),
        Ok(got) => Err(format!("got {got:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// The verifying clients: churners (a few round trips per connection),
/// holders (a connection for up to 0.8 s, less than any drain allows) and
/// PROXY churners. Each checks every byte; errors are kept with the time.
#[derive(Default)]
struct Clients {
    stop: AtomicBool,
    paused: AtomicBool,
    /// Clients between connections while paused.
    parked: AtomicU64,
    connections: AtomicU64,
    round_trips: AtomicU64,
    mismatches: AtomicU64,
    failures: Mutex<Vec<String>>,
}

const CHURNERS: u64 = 3;
const HOLDERS: u64 = 2;
const PROXIERS: u64 = 1;

impl Clients {
    fn spawn(this: &Arc<Clients>, main: SocketAddr, proxied: SocketAddr, seed: u64) -> Vec<thread::JoinHandle<()>> {
        (0..CHURNERS + HOLDERS + PROXIERS)
            .map(|i| {
                let c = this.clone();
                let kind = if i < CHURNERS {
                    Kind::Churner
                } else if i < CHURNERS + HOLDERS {
                    Kind::Holder
                } else {
                    Kind::Proxied
                };
                let addr = if kind == Kind::Proxied { proxied } else { main };
                thread::spawn(move || c.run(kind, addr, seed.wrapping_add(i)))
            })
            .collect()
    }

    fn pause(&self) {
        self.paused.store(true, Relaxed);
        let deadline = Instant::now() + SETTLE;
        while self.parked.load(Relaxed) < CHURNERS + HOLDERS + PROXIERS {
            assert!(Instant::now() < deadline, "clients did not pause");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn resume(&self) {
        self.paused.store(false, Relaxed);
    }

    fn run(&self, kind: Kind, addr: SocketAddr, seed: u64) {
        let mut rng = Rng::new(seed);
        while !self.stop.load(Relaxed) {
            if self.paused.load(Relaxed) {
                self.parked.fetch_add(1, Relaxed);
                while self.paused.load(Relaxed) {
                    thread::sleep(Duration::from_millis(2));
                }
                self.parked.fetch_sub(1, Relaxed);
                continue;
            }
            if let Err(e) = self.one_connection(kind, addr, &mut rng) {
                self.failures.lock().unwrap().push(format!("{kind:?}: {e}"));
                // Down (a stop, a kill): try again shortly.
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn one_connection(&self, kind: Kind, addr: SocketAddr, rng: &mut Rng) -> Result<(), String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.set_nodelay(true);
        self.connections.fetch_add(1, Relaxed);
        if kind == Kind::Proxied {
            let header =
                format!("PROXY TCP4 198.51.100.{} 127.0.0.1 {} 80\r\n", rng.below(250) + 1, 1024 + rng.below(60000));
            s.write_all(header.as_bytes()).map_err(|e| format!("header: {e}"))?;
        }
        let until = Instant::now() + Duration::from_millis(if kind == Kind::Holder { 100 + rng.below(700) } else { 0 });
        let rounds = 1 + rng.below(5);
        let mut r = 0;
        while r < rounds || Instant::now() < until {
            let data = rng.payload(if r % 7 == 3 { 100_000 } else { 2048 });
            match round_trip(&mut s, &data) {
                Ok(got) if got == data => {
                    self.round_trips.fetch_add(1, Relaxed);
                }
                Ok(got) => {
                    self.mismatches.fetch_add(1, Relaxed);
                    return Err(format!(
                        "round trip {r}: {} bytes differ",
                        got.iter().zip(&data).filter(|(a, b)| a != b).count()
                    ));
                }
                Err(e) => return Err(format!("round trip {r}: {e}")),
            }
            r += 1;
            if kind == Kind::Holder {
                thread::sleep(Duration::from_millis(10));
            }
        }
        // A clean close: half-close, then the server's EOF.
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) if rest.is_empty() => Ok(()),
            Ok(_) => Err(format!("{} bytes after the last echo", rest.len())),
            Err(e) => Err(format!("close: {e}")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Churner,
    Holder,
    Proxied,
}
