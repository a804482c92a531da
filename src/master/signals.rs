//! The signals the master acts on, and what each means (DESIGN.md, section 2).
//!
//! signal-hook's handler only writes to a pipe that the master's poll
//! watches, so the real work happens in the loop, never in signal context.
//! The pipe says *which* signals arrived since the last look, not how many
//! times; for the ones whose count matters (TTIN, TTOU: one worker each) a
//! counter in signal context counts every delivery. It also says who sent
//! each (the sender's pid and uid from siginfo, the last sender's when
//! several sent the same signal), so the master logs who asked for every
//! stop, reload, upgrade and rescale, as nginx does.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mio::{Interest, Registry, Token};
use signal_hook::consts::signal::*;
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::WithOrigin;

use crate::sys;

/// Installs the handlers. Called first thing in `main`, before the config is
/// read: a HUP (or TERM) that arrives while a new master loads its config,
/// e.g. a reload forwarded in a binary upgrade, is queued for the loop
/// instead of killing the process with the default action.
pub fn install() -> std::io::Result<SignalSource> {
    install_for(&HANDLED)
}

/// Handlers for `signals` (all of [`HANDLED`] in echod; fewer in tests).
fn install_for(signals: &[i32]) -> std::io::Result<SignalSource> {
    let counts = COUNTED.map(|_| Arc::new(AtomicUsize::new(0)));
    // Before the pipe: see sys::count_deliveries.
    for (sig, count) in COUNTED.iter().zip(&counts) {
        if signals.contains(sig) {
            sys::count_deliveries(*sig, count.clone())?;
        }
    }
    // signal-hook-mio's pollable type carries no siginfo, so the self-pipe
    // is built here, as it builds its own: a socket pair, the read end
    // polled by the master, the write end the handler's.
    let (read, write) = std::os::unix::net::UnixStream::pair()?;
    read.set_nonblocking(true)?;
    write.set_nonblocking(true)?;
    let read = mio::net::UnixStream::from_std(read);
    let pipe = SignalDelivery::with_pipe(read, write, WithOrigin::default(), signals)?;
    Ok(SignalSource { pipe, counts })
}

/// Registered with signal-hook at start.
pub const HANDLED: [i32; 9] = [SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2, SIGCHLD];

/// Signals whose every delivery counts.
const COUNTED: [i32; 2] = [SIGTTIN, SIGTTOU];

/// The signals that arrived, as the loop reads them.
pub struct SignalSource {
    pipe: SignalDelivery<mio::net::UnixStream, WithOrigin>,
    /// Deliveries of each of [`COUNTED`] not yet taken by the loop.
    counts: [Arc<AtomicUsize>; 2],
}

impl SignalSource {
    pub fn register(&mut self, registry: &Registry, token: Token) -> std::io::Result<()> {
        registry.register(self.pipe.get_read_mut(), token, Interest::READABLE)
    }

    /// What arrived since the last call, each with how many times it is to
    /// be acted on: a counted signal as often as it was delivered (0 when
    /// an earlier call already took its deliveries), any other once.
    pub fn take(&mut self) -> Vec<Delivery> {
        // With siginfo, the pipe may report one signal once per sender; it
        // is still acted on once per pass (as before, and as the counted
        // ones are: by their counter), and the last sender is named.
        let mut raw: Vec<(i32, Option<Sender>)> = Vec::new();
        for o in self.pipe.pending() {
            let from = o.process.map(|p| Sender { pid: p.pid, uid: p.uid });
            match raw.iter_mut().find(|(sig, _)| *sig == o.signal) {
                Some(seen) => seen.1 = from.or(seen.1),
                None => raw.push((o.signal, from)),
            }
        }
        raw.into_iter()
            .filter_map(|(sig, from)| {
                let times = match COUNTED.iter().position(|&c| c == sig) {
                    Some(i) => self.counts[i].swap(0, Ordering::Relaxed),
                    None => 1,
                };
                Signal::from_raw(sig).map(|signal| Delivery { signal, raw: sig, times, from })
            })
            .filter(|d| d.times > 0)
            .collect()
    }
}

/// The process that sent a signal, from its siginfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sender {
    pub pid: i32,
    pub uid: u32,
}

/// Signals of one kind the loop is to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub signal: Signal,
    /// The signal number (TERM and INT are one `Signal`).
    pub raw: i32,
    pub times: usize,
    /// Who sent it (None: the kernel, or a sender siginfo does not name).
    pub from: Option<Sender>,
}

impl Delivery {
    /// `HUP from pid 1234 (uid 0, kill)`: who asked, for the log line the
    /// master writes before acting on it.
    pub fn describe(&self) -> String {
        let name =
            TABLE.iter().find_map(|d| d.raw.iter().position(|&r| r == self.raw).map(|i| d.names[i])).unwrap_or("?");
        let times = if self.times > 1 { format!(" x{}", self.times) } else { String::new() };
        match self.from {
            Some(s) => {
                let comm = std::fs::read_to_string(format!("/proc/{}/comm", s.pid)).unwrap_or_default();
                let comm = comm.trim();
                let comm = if comm.is_empty() { String::new() } else { format!(", {comm}") };
                format!("{name}{times} from pid {} (uid {}{comm})", s.pid, s.uid)
            }
            None => format!("{name}{times} (sender unknown)"),
        }
    }
}

/// What a signal asks of the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// TERM, INT: graceful stop.
    Stop,
    /// QUIT: fast stop.
    Quit,
    /// HUP: reload the config.
    Reload,
    /// TTIN: one worker more.
    MoreWorkers,
    /// TTOU: one worker fewer (never below one).
    FewerWorkers,
    /// USR1: log a stats snapshot.
    Stats,
    /// USR2: binary upgrade (a new master takes over the listeners).
    Upgrade,
    /// CHLD: reap exited workers.
    Child,
}

impl Signal {
    pub fn from_raw(sig: i32) -> Option<Signal> {
        Some(match sig {
            SIGTERM | SIGINT => Signal::Stop,
            SIGQUIT => Signal::Quit,
            SIGHUP => Signal::Reload,
            SIGTTIN => Signal::MoreWorkers,
            SIGTTOU => Signal::FewerWorkers,
            SIGUSR1 => Signal::Stats,
            SIGUSR2 => Signal::Upgrade,
            SIGCHLD => Signal::Child,
            _ => return None,
        })
    }
}

/// One row of the signals table: what an operator sends and what it does.
/// [`TABLE`] is the one description: `echod --help`, echod(8)'s SIGNALS
/// section and the README's table are written from it, and a test holds it to
/// [`HANDLED`] and [`Signal::from_raw`].
#[derive(Debug, Clone, Copy)]
pub struct SignalDoc {
    /// The signals, as `kill -s` names them.
    pub names: &'static [&'static str],
    pub raw: &'static [i32],
    pub signal: Signal,
    /// The name `echod --signal` knows it by (None: not for operators).
    pub command: Option<&'static str>,
    /// One line for `--help`.
    pub summary: &'static str,
    /// The whole effect, in every state of the lifecycle, for the README.
    pub doc: &'static str,
}

/// Every signal the master handles, in the order operators look for them.
pub const TABLE: &[SignalDoc] = &[
    SignalDoc {
        names: &["TERM", "INT"],
        raw: &[SIGTERM, SIGINT],
        signal: Signal::Stop,
        command: Some("stop"),
        summary: "graceful stop: stop accepting, let connections finish for shutdown_timeout",
        doc: "graceful stop: `/healthz` answers 503 at once; after `shutdown_delay` (default 0) close listeners, let \
              connections finish for up to `shutdown_timeout`, then close the rest; the master reaps every worker \
              and exits 0. During a binary upgrade: before the new master took over, the upgrade is abandoned \
              (the new master, which has accepted nothing, is killed) and this master stops; after the hand-over, \
              only the old generation stops and the new master serves on. Sent to the *new* master while the old \
              generation still drains (`systemctl stop` does exactly this, the new master being `MAINPID`), it \
              stops the service: the new master tells the old one, which finishes its drain (refusing new \
              clients) and exits instead of taking over again",
    },
    SignalDoc {
        names: &["QUIT"],
        raw: &[SIGQUIT],
        signal: Signal::Quit,
        command: Some("quit"),
        summary: "fast stop: close every connection now",
        doc: "fast stop: close every connection now, exit 0 (during an upgrade, as `TERM`; to the new master \
              during the drain, the old generation's connections are cut too)",
    },
    SignalDoc {
        names: &["HUP"],
        raw: &[SIGHUP],
        signal: Signal::Reload,
        command: Some("reload"),
        summary: "reload the config file; an invalid file is logged and changes nothing",
        doc: "reload: re-read the config file; if it is invalid, log why (file, line, key) and keep running \
              unchanged. If valid, bind new listen addresses and close removed ones (open connections are \
              untouched; a reload that cannot bind everything changes nothing), then replace workers one by one: \
              a new worker starts, and once it is ready an old one stops receiving connections and drains for up \
              to `shutdown_timeout`. While a new master is starting (USR2) the reload waits: it is applied if the \
              upgrade fails and passed on to the new master if it takes over. Sent to the old master after the \
              hand-over, it is passed on to the new one (logged)",
    },
    SignalDoc {
        names: &["TTIN"],
        raw: &[SIGTTIN],
        signal: Signal::MoreWorkers,
        command: Some("more-workers"),
        summary: "one worker process more, per delivery",
        doc: "one worker more, once per signal delivered (four `kill -TTIN` in a row are four workers more); the \
              count survives reloads unless the file's `workers` changes, but not a binary upgrade: the new \
              master starts from the file's `workers`, as a restart does. Sent to the old master after the \
              hand-over, passed on to the new one",
    },
    SignalDoc {
        names: &["TTOU"],
        raw: &[SIGTTOU],
        signal: Signal::FewerWorkers,
        command: Some("fewer-workers"),
        summary: "one worker process fewer (never below one), per delivery",
        doc: "one worker fewer (never below 1), once per signal delivered, as `TTIN`; the worker let go drains \
              for up to `shutdown_timeout`",
    },
    SignalDoc {
        names: &["USR1"],
        raw: &[SIGUSR1],
        signal: Signal::Stats,
        command: Some("stats"),
        summary: "log a stats snapshot",
        doc: "log a stats snapshot: totals and one line per worker (pid, state, active, accepted, bytes, threads \
              busy/idle, queue depth)",
    },
    SignalDoc {
        names: &["USR2"],
        raw: &[SIGUSR2],
        signal: Signal::Upgrade,
        command: Some("upgrade"),
        summary: "binary upgrade: a new master takes over the listeners; this one drains once it serves",
        doc: "binary upgrade: start `upgrade_binary` (or the same path) as a new master that takes over the \
              listening sockets; once it serves, this master stops accepting, drains for up to \
              `shutdown_timeout` and exits (see docs/OPERATIONS.md, \"Upgrading without downtime\"). Refused \
              (logged) while an upgrade is in progress or while this master's own predecessor still drains",
    },
    SignalDoc {
        names: &["CHLD"],
        raw: &[SIGCHLD],
        signal: Signal::Child,
        command: None,
        summary: "reap exited workers; respawn, with back-off for workers that die at start",
        doc: "reap; a worker that exits unexpectedly is respawned, with exponential back-off (0.1 s doubling to \
              30 s) when workers die within 5 s of starting; five such deaths in a row are logged as a crash loop \
              at error level. A worker that has not reported ready 10 s after fork is killed and counts as such a \
              death. The master never spins",
    },
];

/// The signals block of `echod --help` (and of the man page).
pub fn help_text() -> String {
    let mut out = String::from("Signals (to the master process):\n");
    for d in TABLE {
        let names = d.names.join(", ");
        let command = d.command.map_or(String::new(), |c| format!("-s {c}"));
        out.push_str(&format!("  {names:<10}  {command:<16}  {}\n", d.summary));
    }
    out
}

/// The names `echod --signal` takes, in the table's order.
pub fn commands() -> Vec<&'static str> {
    TABLE.iter().filter_map(|d| d.command).collect()
}

/// What `echod --signal NAME` sends.
pub fn for_command(name: &str) -> Option<&'static SignalDoc> {
    TABLE.iter().find(|d| d.command == Some(name))
}

/// The README's signals table (Markdown), between its markers.
pub fn render_table() -> String {
    let mut out = String::from("| signal | effect |\n|---|---|\n");
    for d in TABLE {
        let names: Vec<String> = d.names.iter().map(|n| format!("`{n}`")).collect();
        let command = d.command.map_or(String::new(), |c| format!(" (`echod -s {c}`)"));
        out.push_str(&format!("| {}{command} | {} |\n", names.join(", "), d.doc));
    }
    out
}

/// The README's markers around the generated table.
pub const TABLE_BEGIN: &str = "<!-- signals: generated from src/master/signals.rs, do not edit -->\n";
pub const TABLE_END: &str = "<!-- end of signals -->\n";

#[cfg(test)]
mod tests {
    use super::*;

    /// The table is what the master does: it names every handled signal
    /// once, in `HANDLED`'s order, and each maps to its row's meaning.
    #[test]
    fn the_table_is_the_handled_signals_and_their_meanings() {
        let listed: Vec<i32> = TABLE.iter().flat_map(|d| d.raw.iter().copied()).collect();
        assert_eq!(listed, HANDLED, "TABLE and HANDLED list the same signals, in the same order");
        for d in TABLE {
            assert_eq!(d.names.len(), d.raw.len());
            for (&raw, name) in d.raw.iter().zip(d.names) {
                assert_eq!(Signal::from_raw(raw), Some(d.signal), "{name}");
                let by_name: nix::sys::signal::Signal = format!("SIG{name}").parse().expect("a signal name");
                assert_eq!(by_name as i32, raw, "{name} is the signal it says");
            }
        }
    }

    /// The README's copy is what [`render_table`] writes
    /// (`cargo run --example gen-docs` rewrites it).
    #[test]
    fn the_readmes_signal_table_is_what_the_generator_writes() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
        let table = crate::config::keys::between(&readme, TABLE_BEGIN, TABLE_END).expect("the signal table's markers");
        assert!(table == render_table(), "README.md's signal table is stale: run `cargo run --example gen-docs`");
    }

    /// #27.5: four TTINs delivered before the loop looks are four workers
    /// more, not one (signal-hook's pipe reports a signal once per pass).
    /// `raise` runs the handler before it returns, so each is a delivery.
    #[test]
    fn every_delivery_of_ttin_and_ttou_counts() {
        let mut source = install_for(&[SIGTTIN, SIGTTOU, SIGUSR1]).unwrap();
        for _ in 0..4 {
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGTTIN).unwrap();
        }
        for _ in 0..2 {
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGTTOU).unwrap();
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGUSR1).unwrap();
        }
        let me = Sender { pid: std::process::id() as i32, uid: nix::unistd::getuid().as_raw() };
        let mut got = source.take();
        got.sort_by_key(|d| d.signal as u8);
        let kinds: Vec<(Signal, usize)> = got.iter().map(|d| (d.signal, d.times)).collect();
        assert_eq!(kinds, vec![(Signal::MoreWorkers, 4), (Signal::FewerWorkers, 2), (Signal::Stats, 1)]);
        // raise(3) is a signal from this process to itself: siginfo names it.
        assert!(got.iter().all(|d| d.from == Some(me)), "{got:?}");
        assert!(got[0].describe().starts_with(&format!("TTIN x4 from pid {} (uid {}", me.pid, me.uid)), "{got:?}");
        assert!(source.take().is_empty(), "each delivery is taken once");
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTTIN).unwrap();
        let once: Vec<(Signal, usize)> = source.take().iter().map(|d| (d.signal, d.times)).collect();
        assert_eq!(once, vec![(Signal::MoreWorkers, 1)]);
        // The pipe reports a signal whose deliveries an earlier pass took
        // (a delivery between that pass's swap and its read of the pipe):
        // nothing to act on, not an act of zero.
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTTIN).unwrap();
        source.counts[0].swap(0, Ordering::Relaxed);
        assert_eq!(source.take(), vec![]);
    }
}
