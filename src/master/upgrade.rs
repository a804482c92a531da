//! Binary upgrade (USR2), as nginx does it: the old master starts the new
//! binary as a new master that inherits every listening socket; the old one
//! stops accepting only once the new one serves, then drains and exits.
//!
//! ```text
//! old master --USR2--> fork + exec(upgrade_binary or own path)
//!     listeners, metrics socket  -> fds 3.. (LISTEN_FDS, LISTEN_FDNAMES)
//!     upgrade channel (socketpair) -> ECHOD_UPGRADE_CHANNEL
//! new master: validates its config, adopts the sockets, starts workers;
//!     accepts nothing yet, touches neither MAINPID nor the fd store
//!     all workers ready -> "ready PID" on the channel
//! old master: stops accepting (keeps the sockets, unpolled), says "go",
//!     hands MAINPID over, drains its workers, and sends its totals on the
//!     channel as they grow; EOF when it exits.
//! new master, on "go" (or EOF): accepts; MAINPID= + READY=1; fd store;
//!     serves /metrics once it has the old totals: counters go on
//! ```
//!
//! If the new master exits, closes the channel or is not ready within
//! `upgrade_timeout`, the old master kills it (its workers die with it),
//! logs why and keeps serving: the listening sockets were never closed, and
//! the new master never accepted, so clients notice nothing. A new master
//! that closes its channel is given [`EXIT_GRACE`] to exit on its own, so
//! the reason it prints (a port in use, a bad config) reaches the log first.
//!
//! If the new master dies *after* taking over while the old one still
//! drains, the old master takes over again (`Master::take_back`): it never
//! closed its listeners, only stopped polling them, so nothing is refused
//! for longer than the moment it takes to notice.
//!
//! If the new master is *told to stop* (TERM, INT or QUIT: after the
//! hand-over it is the unit's main process, so this is `systemctl stop`), it
//! says so on the channel before it exits, and the old generation finishes
//! its drain instead of taking over: a stopped service stays stopped.
//!
//! The channel carries one [`UpgradeMsg`] per line of text: `ready PID`,
//! `stopping graceful|fast` and `totals ...` from the new master; `go`,
//! `totals ...` and `scale N` (TTIN/TTOU passed on) from the old one. Each
//! side sends its *own* totals (not those it carries from the other), so
//! whichever master ends up serving adds the other's and no counter goes
//! backwards, after a rollback too.
//! A line this master does not know is ignored, so masters of different
//! versions can talk. Both ends are non-blocking in their master's poll.

use std::ffi::OsString;
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::net::UnixStream;
use mio::{Interest, Registry};
use nix::unistd::Pid;

use super::tokens::Source;
use crate::stats::Carried;
use crate::sys::{self, Forked};

/// Environment variables the old master sets for the new one.
pub const ENV_CHANNEL: &str = "ECHOD_UPGRADE_CHANNEL";
/// How each passed echo socket was configured (`-` for one from systemd),
/// space-separated in LISTEN_FDS order, so reloads keep matching them.
pub const ENV_CONFIGURED: &str = "ECHOD_UPGRADE_CONFIGURED";
/// Set (to "1") by an old master that will say "go". A predecessor from
/// before the go/ready protocol does not set it and never says "go": the new
/// master then accepts as soon as it is ready, as those masters expect.
pub const ENV_SAYS_GO: &str = "ECHOD_UPGRADE_SAYS_GO";

/// How long a new master that closed its channel before it was ready may
/// take to exit by itself (and say why) before it is killed.
pub const EXIT_GRACE: Duration = Duration::from_secs(2);

/// The names (LISTEN_FDNAMES, FDNAME=) echod gives its own sockets wherever
/// it passes them on: to a new master on USR2, and into systemd's fd store,
/// whence a plain restart gets them back. A master matches sockets so named
/// against its `listen` and `metrics_listen`; systemd's own names (from
/// echod.socket) pass unchanged.
pub const FDNAME_LISTENER: &str = "echod-listen";
pub const FDNAME_METRICS: &str = "echod-metrics";

/// How the master was started, so USR2 can start the same again.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Invocation {
    /// Records the running binary and its arguments. Called at start, while
    /// the path still names this binary (a package upgrade replaces it).
    pub fn current() -> Invocation {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        Invocation { exe, args: std::env::args_os().collect() }
    }
}

/// What the old master passes to the new one besides the environment.
pub struct Handover {
    /// Echo listeners with the address each was configured with (None:
    /// from systemd) and systemd's name for it.
    pub listeners: Vec<(RawFd, Option<SocketAddr>, Option<String>)>,
    /// The metrics listener, if any, and whether systemd passed it.
    pub metrics: Option<(RawFd, bool)>,
}

/// LISTEN_FDNAMES given to echo sockets that came from systemd's socket
/// unit when systemd gave them no name: any name but ours and "metrics"
/// means that. Named ones keep their name (`proxy_protocol` may use it).
const ACTIVATED_NAME: &str = "echo";

/// One message on the upgrade channel (one line of text each).
#[derive(Debug, Clone, PartialEq)]
pub enum UpgradeMsg {
    /// New to old: every worker serves; the old master may hand over.
    Ready(u32),
    /// Old to new: the old master stopped accepting; accept now.
    Go,
    /// New to old: the new master was told to stop (gracefully or not).
    /// After the hand-over that is the service stopping: the old generation
    /// must not take over again.
    Stopping { graceful: bool },
    /// Either way: the sender's own totals, without what it carries from
    /// the other master.
    Totals(Box<Carried>),
    /// Old to new: TTIN (+) or TTOU (-) deliveries sent to the old master
    /// after the hand-over, passed on as a count (signals re-sent with
    /// kill(2) could merge in the kernel).
    Scale(i64),
}

impl UpgradeMsg {
    /// The line, newline included.
    pub fn encode(&self) -> String {
        match self {
            UpgradeMsg::Ready(pid) => format!("ready {pid}\n"),
            UpgradeMsg::Go => "go\n".into(),
            UpgradeMsg::Stopping { graceful } => {
                format!("stopping {}\n", if *graceful { "graceful" } else { "fast" })
            }
            UpgradeMsg::Totals(c) => c.encode(),
            UpgradeMsg::Scale(n) => format!("scale {n}\n"),
        }
    }

    /// Reads one line (without its newline); None for a line this master
    /// does not know.
    pub fn decode(line: &str) -> Option<UpgradeMsg> {
        match line.split_once(' ').unwrap_or((line, "")) {
            ("ready", pid) => pid.parse().ok().map(UpgradeMsg::Ready),
            ("go", "") => Some(UpgradeMsg::Go),
            ("stopping", "graceful") => Some(UpgradeMsg::Stopping { graceful: true }),
            ("stopping", "fast") => Some(UpgradeMsg::Stopping { graceful: false }),
            ("totals", _) => Carried::decode(line).map(|c| UpgradeMsg::Totals(Box::new(c))),
            ("scale", n) => n.parse().ok().map(UpgradeMsg::Scale),
            _ => None,
        }
    }
}

/// Lines on their way to the other master, in order. The channel is
/// non-blocking and the other master may not read for a while (stopped,
/// busy): what does not fit waits here, so a line is never cut in half,
/// and a message that matters (`stopping`) is never dropped for lack of
/// room. Totals, of which only the latest counts, are queued only when
/// nothing is waiting, so the queue stays small.
#[derive(Default)]
struct Outbox {
    pending: Vec<u8>,
}

impl Outbox {
    /// Queues `msg` and writes what fits; false if it was totals and left
    /// out (the caller sends newer ones later).
    fn send(&mut self, msg: &UpgradeMsg, channel: &mut UnixStream) -> io::Result<bool> {
        if matches!(msg, UpgradeMsg::Totals(_)) && !self.pending.is_empty() {
            self.flush(channel)?;
            return Ok(false);
        }
        self.pending.extend_from_slice(msg.encode().as_bytes());
        self.flush(channel)?;
        Ok(true)
    }

    /// Writes what the channel takes now.
    fn flush(&mut self, channel: &mut UnixStream) -> io::Result<()> {
        while !self.pending.is_empty() {
            match channel.write(&self.pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => drop(self.pending.drain(..n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The old master's side: a new master that is starting.
pub struct Successor {
    pub pid: Pid,
    channel: UnixStream,
    inbox: Vec<u8>,
    /// Given up on past this.
    pub deadline: Instant,
    /// It reported ready: the old generation is handing over.
    pub ready: bool,
    /// It closed its channel (it is exiting, or never started).
    pub closed: bool,
    /// Last totals sent, so only changes are sent.
    sent: Option<Carried>,
    /// What did not fit in the channel yet.
    outbox: Outbox,
    /// It said it was told to stop (graceful or fast): its exit is the
    /// service stopping, not a crash to take over from.
    pub stopping: Option<bool>,
    /// Its own totals, as last reported: added to ours if we take over again.
    pub totals: Carried,
}

/// What the successor's channel said in one read; "ready" and EOF can come
/// together (a new master that reports ready and dies at once).
#[derive(Debug, Default, PartialEq)]
pub struct Heard {
    pub ready: bool,
    /// It said it is stopping, in this read (graceful or fast).
    pub stopping: Option<bool>,
    /// Closed: the new master exited (or never started).
    pub gone: bool,
}

/// Forks and execs the new master. In the child this never returns.
pub fn spawn(
    inv: &Invocation,
    binary: Option<PathBuf>,
    handover: &Handover,
    registry: &Registry,
    deadline: Instant,
) -> io::Result<Successor> {
    let (ours, theirs) = StdUnixStream::pair()?; // both CLOEXEC
    let exe = binary.unwrap_or_else(|| inv.exe.clone());
    match sys::fork()? {
        Forked::Child => {
            let err = exec_new_master(&exe, inv, handover, theirs.as_raw_fd());
            // The child holds the master's state; write and leave at once.
            let _ = writeln!(io::stderr(), "echod: cannot start {}: {err}", exe.display());
            std::process::exit(127);
        }
        Forked::Parent(pid) => {
            drop(theirs);
            ours.set_nonblocking(true)?;
            let mut channel = UnixStream::from_std(ours);
            registry.register(&mut channel, Source::Successor.token(), Interest::READABLE)?;
            Ok(Successor {
                pid,
                channel,
                inbox: Vec::new(),
                deadline,
                ready: false,
                closed: false,
                sent: None,
                outbox: Outbox::default(),
                stopping: None,
                totals: Carried::default(),
            })
        }
    }
}

/// In the forked child: puts the sockets at 3.., the channel after them,
/// and execs with the environment that tells the new master what they are.
fn exec_new_master(exe: &std::path::Path, inv: &Invocation, h: &Handover, channel: RawFd) -> io::Error {
    let mut fds: Vec<RawFd> = h.listeners.iter().map(|(fd, _, _)| *fd).collect();
    let mut names: Vec<&str> = h
        .listeners
        .iter()
        .map(|(_, conf, name)| match (conf, name.as_deref()) {
            (Some(_), _) => FDNAME_LISTENER,
            (None, Some(n)) if !n.is_empty() && n != FDNAME_LISTENER && n != FDNAME_METRICS => n,
            (None, _) => ACTIVATED_NAME,
        })
        .collect();
    if let Some((fd, activated)) = h.metrics {
        fds.push(fd);
        names.push(if activated { super::http::METRICS_FD_NAME } else { FDNAME_METRICS });
    }
    let configured: Vec<String> =
        h.listeners.iter().map(|(_, c, _)| c.map_or_else(|| "-".to_string(), |a| a.to_string())).collect();
    let pid = std::process::id();
    let n = fds.len();
    fds.push(channel);
    let skip = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", ENV_CHANNEL, ENV_CONFIGURED, ENV_SAYS_GO];
    let mut env: Vec<OsString> = std::env::vars_os()
        .filter(|(k, _)| !skip.iter().any(|s| k == s))
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            kv
        })
        .collect();
    let mut set = |k: &str, v: String| env.push(format!("{k}={v}").into());
    set("LISTEN_PID", pid.to_string());
    set("LISTEN_FDS", n.to_string());
    set("LISTEN_FDNAMES", names.join(":"));
    set(ENV_CONFIGURED, configured.join(" "));
    set(ENV_SAYS_GO, "1".into());
    set(ENV_CHANNEL, (3 + n).to_string());
    if std::env::var_os("WATCHDOG_USEC").is_some() {
        // The watchdog is for the main process, which the new master
        // becomes.
        set("WATCHDOG_PID", pid.to_string());
    }
    sys::exec_with_fds(exe, &inv.args, &env, &fds)
}

impl Successor {
    /// Reads what the new master said.
    pub fn on_readable(&mut self) -> Heard {
        let (msgs, gone) = read_or_gone(&mut self.channel, &mut self.inbox);
        let mut heard = Heard { gone, ..Heard::default() };
        for msg in msgs {
            match msg {
                UpgradeMsg::Ready(_) if !self.ready => heard.ready = true,
                UpgradeMsg::Stopping { graceful } => heard.stopping = Some(graceful),
                UpgradeMsg::Totals(c) => self.totals = *c,
                UpgradeMsg::Ready(_) | UpgradeMsg::Go | UpgradeMsg::Scale(_) => {}
            }
        }
        self.ready |= heard.ready;
        self.stopping = heard.stopping.or(self.stopping);
        self.closed |= gone;
        heard
    }

    /// Passes TTIN (+n) or TTOU (-n) deliveries on to the new master.
    pub fn scale(&mut self, n: i64) {
        if let Err(e) = self.outbox.send(&UpgradeMsg::Scale(n), &mut self.channel) {
            log::warn!("upgrade: cannot pass the worker count change on to the new master: {e}");
        }
    }

    /// Tells the new master it may accept: this master no longer does.
    pub fn go(&mut self) {
        if let Err(e) = self.outbox.send(&UpgradeMsg::Go, &mut self.channel) {
            // It then takes over when this master's channel closes (EOF).
            log::warn!("upgrade: cannot tell the new master to accept: {e}");
        }
    }

    /// Sends the old generation's totals if they changed. Best effort: the
    /// lines are short and the new master reads them at once; a full
    /// buffer only delays the figures.
    pub fn send_totals(&mut self, c: Carried) {
        if self.sent == Some(c) {
            return;
        }
        if let Ok(true) = self.outbox.send(&UpgradeMsg::Totals(Box::new(c)), &mut self.channel) {
            self.sent = Some(c);
        }
    }

    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.channel);
    }
}

/// The new master's side: the old master that started it, while it drains.
pub struct Predecessor {
    /// The old master (our parent when it started us).
    pub pid: Pid,
    channel: UnixStream,
    inbox: Vec<u8>,
    /// "ready" was sent (once: later READY=1s follow reloads).
    announced: bool,
    /// The old master said "go": it no longer accepts, we may.
    pub go: bool,
    /// The old generation's totals, as last reported.
    pub carried: Option<Carried>,
    /// Our own totals as last sent (only changes are sent).
    sent: Option<Carried>,
    /// What did not fit in the channel yet.
    outbox: Outbox,
    /// TTIN/TTOU the old master passed on, not yet applied (`Scale`).
    pub scale: i64,
}

impl Predecessor {
    /// The channel from the old master, if this process was started by a
    /// binary upgrade.
    pub fn from_env(registry: &Registry) -> io::Result<Option<Predecessor>> {
        let Some(fd) = std::env::var(ENV_CHANNEL).ok().and_then(|v| v.parse::<RawFd>().ok()) else {
            return Ok(None);
        };
        let Some(fd) = sys::adopt_fd(fd) else { return Ok(None) };
        // Not for our own workers or successors.
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
        let std = StdUnixStream::from(fd);
        std.set_nonblocking(true)?;
        let mut channel = UnixStream::from_std(std);
        registry.register(&mut channel, Source::Predecessor.token(), Interest::READABLE)?;
        let pid = nix::unistd::getppid();
        // An old master that does not say "go" stops accepting on "ready".
        let go = std::env::var_os(ENV_SAYS_GO).is_none();
        Ok(Some(Predecessor {
            pid,
            channel,
            inbox: Vec::new(),
            announced: false,
            go,
            carried: None,
            sent: None,
            outbox: Outbox::default(),
            scale: 0,
        }))
    }

    /// Tells the old master that this one serves.
    pub fn announce_ready(&mut self) {
        if std::mem::replace(&mut self.announced, true) {
            return;
        }
        if let Err(e) = self.outbox.send(&UpgradeMsg::Ready(std::process::id()), &mut self.channel) {
            log::warn!("upgrade: cannot tell the old master we are ready: {e}");
        }
    }

    /// Tells the old master this one was told to stop: if it handed over,
    /// the service is stopping and it must not take over again.
    pub fn announce_stopping(&mut self, graceful: bool) {
        if let Err(e) = self.outbox.send(&UpgradeMsg::Stopping { graceful }, &mut self.channel) {
            log::warn!("upgrade: cannot tell the old master we are stopping: {e}");
        }
    }

    /// Sends our own totals if they changed, so that the old master, if it
    /// takes over again, carries them on. Best effort, as the other way.
    /// Only once this master serves: before, it has counted nothing the old
    /// one could lose, and "ready" stays the first line it sends.
    pub fn send_totals(&mut self, c: Carried) {
        let _ = self.outbox.flush(&mut self.channel);
        if !self.announced || !self.go || self.sent == Some(c) {
            return;
        }
        if let Ok(true) = self.outbox.send(&UpgradeMsg::Totals(Box::new(c)), &mut self.channel) {
            self.sent = Some(c);
        }
    }

    /// Something is still waiting for room in the channel (see `Outbox`).
    pub fn unsent(&self) -> bool {
        !self.outbox.pending.is_empty()
    }

    /// Reads "go" and totals; true when the old master is gone (EOF).
    pub fn on_readable(&mut self) -> bool {
        let (msgs, gone) = read_or_gone(&mut self.channel, &mut self.inbox);
        for msg in msgs {
            match msg {
                UpgradeMsg::Go => self.go = true,
                UpgradeMsg::Totals(c) => self.carried = Some(*c),
                UpgradeMsg::Scale(n) => self.scale += n,
                UpgradeMsg::Ready(_) | UpgradeMsg::Stopping { .. } => {}
            }
        }
        gone
    }

    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.channel);
    }
}

/// Reads everything available; returns the messages in the complete lines
/// and whether the peer closed (a read error counts as closed: the channel
/// is no use).
fn read_or_gone(stream: &mut UnixStream, inbox: &mut Vec<u8>) -> (Vec<UpgradeMsg>, bool) {
    let (lines, gone) = read_lines(stream, inbox).unwrap_or_else(|_| (Vec::new(), true));
    (lines.iter().filter_map(|l| UpgradeMsg::decode(l)).collect(), gone)
}

/// Reads everything available; returns the complete lines and whether the
/// peer closed.
fn read_lines(stream: &mut UnixStream, inbox: &mut Vec<u8>) -> io::Result<(Vec<String>, bool)> {
    let mut buf = [0u8; 4096];
    let mut eof = false;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => inbox.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if inbox.len() > 1 << 20 {
            return Err(io::Error::new(ErrorKind::InvalidData, "upgrade channel: line too long"));
        }
    }
    let mut lines = Vec::new();
    while let Some(end) = inbox.iter().position(|&b| b == b'\n') {
        lines.push(String::from_utf8_lossy(&inbox[..end]).into_owned());
        inbox.drain(..=end);
    }
    Ok((lines, eof))
}

/// The echo sockets and configured addresses a binary upgrade passed in,
/// from LISTEN_FDS entries named [`FDNAME_LISTENER`] and [`ENV_CONFIGURED`].
pub fn inherited_listeners(fds: Vec<OwnedFd>) -> Vec<(OwnedFd, Option<SocketAddr>)> {
    let configured = std::env::var(ENV_CONFIGURED).unwrap_or_default();
    let mut conf = configured.split(' ').map(|c| c.parse::<SocketAddr>().ok());
    fds.into_iter().map(|fd| (fd, conf.next().flatten())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_round_trip_through_a_line() {
        let mut c = Carried { accepted: 7, rejected: 1, restarts: 2, ..Carried::default() };
        c.totals.bytes_in = u64::MAX;
        c.totals.duration[3] = 42;
        c.totals.err_timeout = 5;
        c.endpoint.evicted = 11;
        c.endpoint.renders = 12;
        c.totals.log_dropped = 13;
        let line = c.encode();
        assert!(line.ends_with('\n'));
        assert_eq!(Carried::decode(line.trim_end()), Some(c));
        assert_eq!(Carried::decode("totals 1 2"), None, "short lines are refused");
        assert_eq!(Carried::decode("ready 12"), None);
        // A line from a master that did not carry the connection log's
        // drops, then one that did not carry the endpoint's counters either.
        let older = line.trim_end().rsplitn(2, ' ').last().unwrap().to_string();
        let mut want = c;
        want.totals.log_dropped = 0;
        assert_eq!(Carried::decode(&older), Some(want));
        let oldest = line.trim_end().rsplitn(6, ' ').last().unwrap().to_string();
        want.endpoint = Default::default();
        assert_eq!(Carried::decode(&oldest), Some(want));
    }

    #[test]
    fn carried_totals_add_field_by_field() {
        let mut a = Carried { accepted: 1, rejected: 2, restarts: 4, ..Carried::default() };
        a.totals.bytes_in = 8;
        a.endpoint.evicted = 16;
        let mut b = Carried { accepted: 32, rejected: 64, restarts: 128, ..Carried::default() };
        b.totals.bytes_in = 256;
        b.endpoint = crate::stats::EndpointTotals { evicted: 512, refused: 1024, aborted: 2048, renders: 4096 };
        a.add(&b);
        assert_eq!((a.accepted, a.rejected, a.restarts, a.totals.bytes_in), (33, 66, 132, 264));
        assert_eq!(
            a.endpoint,
            crate::stats::EndpointTotals { evicted: 528, refused: 1024, aborted: 2048, renders: 4096 }
        );
    }

    #[test]
    fn every_message_round_trips_and_unknown_lines_are_ignored() {
        let mut c = Carried { accepted: 3, ..Carried::default() };
        c.totals.bytes_out = 9;
        for m in [
            UpgradeMsg::Ready(4242),
            UpgradeMsg::Go,
            UpgradeMsg::Stopping { graceful: true },
            UpgradeMsg::Stopping { graceful: false },
            UpgradeMsg::Totals(Box::new(c)),
            UpgradeMsg::Scale(3),
            UpgradeMsg::Scale(-2),
        ] {
            let line = m.encode();
            assert!(line.ends_with('\n'), "{line:?}");
            assert_eq!(UpgradeMsg::decode(line.trim_end()), Some(m));
        }
        // The lines masters of earlier versions send and expect, to the byte.
        assert_eq!(UpgradeMsg::Ready(7).encode(), "ready 7\n");
        assert_eq!(UpgradeMsg::Go.encode(), "go\n");
        for unknown in ["", "go now", "ready", "ready x", "stopping", "stopping slowly", "hello"] {
            assert_eq!(UpgradeMsg::decode(unknown), None, "{unknown:?}");
        }
    }
}
