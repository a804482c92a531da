//! Test harness: runs the real `echod` binary on loopback and talks to it
//! with real sockets. Every process a test starts is killed by PID when its
//! handle drops, even if the test panics.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const ECHOD: &str = env!("CARGO_BIN_EXE_echod");

/// echo-load, built beside echod: it is another package of the workspace, so
/// Cargo gives its path only to that package's own tests; `cargo test` at
/// the top (`./test.sh`) builds every package first (default-members).
pub fn echo_load() -> &'static Path {
    static PATH: std::sync::LazyLock<PathBuf> = std::sync::LazyLock::new(|| {
        let path = Path::new(ECHOD).with_file_name("echo-load");
        let rebuild = "cargo build --release -p echo-load (./test.sh does it first)";
        let built = std::fs::metadata(&path).and_then(|m| m.modified());
        let built = built.unwrap_or_else(|e| panic!("{}: {e}: {rebuild}", path.display()));
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("echo-load/src");
        let newer = std::fs::read_dir(&src)
            .into_iter()
            .flatten()
            .flatten()
            .find(|f| f.metadata().and_then(|m| m.modified()).is_ok_and(|t| t > built));
        if let Some(f) = newer {
            panic!("{} is older than {}: {rebuild}", path.display(), f.path().display());
        }
        path
    });
    &PATH
}

/// echo-load in the background against `addr`, with `--json` (read it with
/// [`load_json`]) and a 5 s echo timeout; `args` add to or override that.
pub fn spawn_load(addr: SocketAddr, args: &[&str]) -> Child {
    Command::new(echo_load())
        .args(["--addr", &addr.to_string(), "--json", "--timeout", "5"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run echo-load")
}

/// echo-load in the foreground with `args` as given (no `--addr` added);
/// its stdin is closed.
pub fn run_load(args: &[&str]) -> std::process::Output {
    Command::new(echo_load()).args(args).stdin(Stdio::null()).output().expect("run echo-load")
}

/// The JSON an echo-load run printed; fails the test with its output if
/// it printed none.
pub fn output_json(out: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {text}\n{}", String::from_utf8_lossy(&out.stderr)))
}

/// A client connection to `to` from the loopback address `from` (such as
/// 127.0.0.2: every 127/8 address is local), for per-address limits and
/// trust lists; 5 s read timeout.
pub fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap_or_else(|_| panic!("not an address: {from}"));
    sock.bind(&local.into()).unwrap_or_else(|e| panic!("bind {from}: {e}"));
    sock.connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {to} from {from}: {e}"));
    let s = TcpStream::from(sock);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Waits for a [`spawn_load`] run and parses its JSON; a run that printed
/// none fails the test with what it printed.
pub fn load_json(child: Child) -> serde_json::Value {
    let out = child.wait_with_output().expect("echo-load");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "echo-load JSON: {e}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A precondition this machine lacks (IPv6 loopback, root): the test is
/// skipped, says so, and leaves a line in `target/tmp/skipped/` for
/// `./test.sh` to sum up at the end, so no skip goes unseen. With
/// `ECHOD_TEST_NO_SKIP=1` (CI sets it) the test fails instead. Returns
/// after printing why, for the caller to return.
pub fn skip_or_fail(missing: &str) {
    assert!(
        std::env::var("ECHOD_TEST_NO_SKIP").as_deref() != Ok("1"),
        "{missing}: this test needs it, and ECHOD_TEST_NO_SKIP=1"
    );
    let test = format!("{}::{}", env!("CARGO_CRATE_NAME"), std::thread::current().name().unwrap_or("?"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped");
    let recorded = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join(test.replace("::", "-")), format!("{test} {missing}\n")));
    if let Err(e) = recorded {
        eprintln!("cannot record the skip in {}: {e}", dir.display());
    }
    eprintln!("{test}: skipped: {missing}");
}

/// Runs each test fn twice, once per handler mode (`handler = "thread"` and
/// `"event"`), as `name::thread` and `name::event`: the same suite proves
/// both modes. Every echod the body starts gets that mode unless its config
/// sets `handler` itself.
#[macro_export]
macro_rules! both_modes {
    ($( $(#[$attr:meta])* fn $name:ident() $body:block )*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            $(#[$attr])*
            fn thread() {
                $crate::common::in_mode("thread", || $body)
            }
            #[test]
            $(#[$attr])*
            fn event() {
                $crate::common::in_mode("event", || $body)
            }
        }
    )*};
}

thread_local! {
    /// The handler mode of the test running on this thread.
    static MODE: std::cell::Cell<&'static str> = const { std::cell::Cell::new("thread") };
}

/// Runs `body` with every echod it starts in handler mode `mode`.
pub fn in_mode(mode: &'static str, body: impl FnOnce()) {
    MODE.with(|m| m.set(mode));
    body()
}

/// The handler mode of the running test.
pub fn mode() -> &'static str {
    MODE.with(|m| m.get())
}

/// `text` with the running test's handler mode, unless it sets one: what
/// every config file a test writes goes through. Appended, so the line
/// numbers that error messages name stay those of `text`.
pub fn in_test_mode(text: &str) -> String {
    if sets(text, "handler") {
        return text.to_string();
    }
    let sep = if text.is_empty() || text.ends_with('\n') { "" } else { "\n" };
    format!("{text}{sep}handler = \"{}\"\n", mode())
}

/// One stderr line and when the test read it.
type LogLine = (Instant, String);

/// A running echod and its collected stderr.
pub struct Echod {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub dir: tempfile::TempDir,
    /// Each stderr line with the moment the test read it (for timing
    /// assertions such as the crash-loop back-off).
    log: Arc<(Mutex<Vec<LogLine>>, Condvar)>,
    /// Every worker pid ever seen, so Drop can kill stragglers by PID.
    seen_workers: Mutex<Vec<i32>>,
    /// The stderr reader pauses while this is set (`stall_log`).
    stalled: Arc<std::sync::atomic::AtomicBool>,
}

/// Writes `extra` (TOML lines) plus a loopback listener on a free port, and
/// starts echod on it.
pub fn start(extra: &str) -> Echod {
    start_with(extra, &[], &[])
}

pub fn start_with(extra: &str, args: &[&str], env: &[(&str, &str)]) -> Echod {
    let mut e = spawn(&with_test_defaults(extra), args, env);
    e.wait_ready();
    e
}

/// As `start`, but a daemon that refuses to start (a port taken by another
/// process, say) is an `Err` with its log, for tests that pick fixed ports
/// and can try others.
pub fn try_start(extra: &str) -> Result<Echod, String> {
    let mut e = spawn(&with_test_defaults(extra), &[], &[]);
    // Ready, or refused: a listen port can be bound and the metrics port
    // after it still be taken, so "listening on" decides nothing.
    let outcome = e.wait_lines(0, Duration::from_secs(10), |lines| {
        lines
            .iter()
            .find_map(|(_, l)| (l.contains("ready:") || l.contains("cannot start")).then(|| l.contains("ready:")))
    });
    match outcome {
        Some(true) => {
            e.wait_ready();
            Ok(e)
        }
        _ => Err(e.log_text()),
    }
}

/// `extra` plus the settings every test wants unless it sets them: two
/// workers and a short shutdown timeout.
fn with_test_defaults(extra: &str) -> String {
    let mut text = String::new();
    if !sets(extra, "workers") {
        text.push_str("workers = 2\n");
    }
    if !sets(extra, "shutdown_timeout") {
        text.push_str("shutdown_timeout = 5\n");
    }
    text.push_str(extra);
    text
}

/// Whether a TOML text assigns `key` (not merely mentions it).
fn sets(text: &str, key: &str) -> bool {
    text.lines().any(|l| l.split('=').next().is_some_and(|k| k.trim() == key))
}

/// Starts echod without waiting for readiness (for workers that cannot
/// start).
pub fn start_unready(extra: &str, env: &[(&str, &str)]) -> Echod {
    spawn(extra, &[], env)
}

/// Starts echod under `prlimit --nofile=N:N` (which execs it: same pid).
pub fn start_with_nofile(extra: &str, nofile: u64) -> Echod {
    let mut e = spawn_cmd(extra, &[], &[], Some(nofile));
    e.wait_ready();
    e
}

/// Writes the config (plus a loopback listener on a free port unless it
/// names `listen`) and starts echod with its stderr collected.
fn spawn(extra: &str, args: &[&str], env: &[(&str, &str)]) -> Echod {
    spawn_cmd(extra, args, env, None)
}

fn spawn_cmd(extra: &str, args: &[&str], env: &[(&str, &str)], nofile: Option<u64>) -> Echod {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("echod.toml");
    let listen = if sets(extra, "listen") { "" } else { "listen = [\"127.0.0.1:0\"]\n" };
    std::fs::write(&config, in_test_mode(&format!("{listen}{extra}"))).unwrap();
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--nofile={n}:{n}")).arg("--").arg(ECHOD);
            c
        }
        None => Command::new(ECHOD),
    };
    cmd.arg("--config").arg(&config).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd.env_remove("RUST_LOG").env_remove("NOTIFY_SOCKET").env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn echod");
    let log = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stall = stalled.clone();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
        loop {
            // A stalled reader (`Echod::stall_log`): the pipe fills.
            while stall.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let Some(line) = lines.next() else { break };
            if std::env::var_os("ECHOD_TEST_LOG").is_some() {
                eprintln!("echod: {line}");
            }
            sink.0.lock().unwrap().push((Instant::now(), line));
            sink.1.notify_all();
        }
    });
    Echod {
        child: Some(child),
        addr: "127.0.0.1:0".parse().unwrap(),
        config,
        dir,
        log,
        seen_workers: Mutex::new(Vec::new()),
        stalled,
    }
}

impl Echod {
    /// Stops (true) or resumes reading echod's stderr, as a log reader
    /// that falls behind: the pipe fills while stalled.
    pub fn stall_log(&self, stalled: bool) {
        self.stalled.store(stalled, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits for the listening and ready lines; sets `addr`.
    pub fn wait_ready(&mut self) {
        let line = self
            .wait_log("listening on ", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("echod did not listen:\n{}", self.log_text()));
        let addr = line.rsplit("listening on ").next().unwrap_or_default().trim();
        self.addr = addr.parse().unwrap_or_else(|e| panic!("bad address in `{line}`: {e}\n{}", self.log_text()));
        self.wait_log("ready:", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("echod not ready:\n{}", self.log_text()));
        self.note_workers();
    }

    /// Kills `pid` (by PID) when this handle drops: processes the test
    /// learns about later, such as masters started by a binary upgrade.
    pub fn track(&self, pid: i32) {
        self.seen_workers.lock().unwrap().push(pid);
    }

    /// Waits until the master `pid` (not necessarily ours) has `n` workers;
    /// tracks them for cleanup and returns them. Fails the test after 10 s.
    pub fn wait_children(&self, pid: i32, n: usize) -> Vec<i32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let w = children_of(pid);
            w.iter().for_each(|&p| self.track(p));
            if w.len() == n {
                return w;
            }
            assert!(Instant::now() < deadline, "master {pid} has {w:?}, not {n} worker(s):\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Replaces the config file (for a reload), in the test's mode.
    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, in_test_mode(text)).unwrap();
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn signal(&self, sig: i32) {
        kill(self.pid(), sig);
    }

    /// Lines logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.0.lock().unwrap().iter().map(|(_, l)| l.clone()).collect()
    }

    /// When echod wrote each line containing `pat`, in order: the line's own
    /// timestamp (milliseconds), not when the test read it, which a loaded
    /// machine can delay by tens of milliseconds.
    pub fn log_times(&self, pat: &str) -> Vec<Duration> {
        let lines = self.log_lines();
        let stamped = lines.iter().filter(|l| l.contains(pat));
        stamped.map(|l| log_stamp(l).unwrap_or_else(|| panic!("no timestamp at the start of `{l}`"))).collect()
    }

    pub fn log_text(&self) -> String {
        self.log_lines().join("\n")
    }

    /// Waits until `n` lines after the first `skip` contain `pat`; returns
    /// them. Fails the test, with the log, after `timeout`.
    pub fn expect_log_count(&self, skip: usize, pat: &str, n: usize, timeout: Duration) -> Vec<String> {
        self.wait_lines(skip, timeout, |lines| {
            let found: Vec<String> = lines.iter().filter(|(_, l)| l.contains(pat)).map(|(_, l)| l.clone()).collect();
            (found.len() >= n).then_some(found)
        })
        .unwrap_or_else(|| panic!("fewer than {n} lines with `{pat}` after {timeout:?}:\n{}", self.log_text()))
    }

    /// Waits for a log line containing `pat`; returns it.
    pub fn wait_log(&self, pat: &str, timeout: Duration) -> Option<String> {
        self.wait_log_after(0, pat, timeout)
    }

    /// As `wait_log`, only lines after the first `skip`.
    pub fn wait_log_after(&self, skip: usize, pat: &str, timeout: Duration) -> Option<String> {
        self.wait_lines(skip, timeout, |lines| lines.iter().find(|(_, l)| l.contains(pat)).map(|(_, l)| l.clone()))
    }

    /// Re-reads the lines after the first `skip` each time one arrives
    /// until `f` finds what it wants, or `timeout` passes.
    fn wait_lines<T>(&self, skip: usize, timeout: Duration, f: impl Fn(&[LogLine]) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.log;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some(found) = f(lines.get(skip..).unwrap_or_default()) {
                return Some(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            lines = cv.wait_timeout(lines, left).unwrap().0;
        }
    }

    pub fn log_len(&self) -> usize {
        self.log.0.lock().unwrap().len()
    }

    /// Current worker pids (children of the master named `echod: worker N`).
    pub fn workers(&self) -> Vec<i32> {
        let w = children_of(self.pid());
        self.seen_workers.lock().unwrap().extend(&w);
        w
    }

    fn note_workers(&self) {
        let _ = self.workers();
    }

    /// Waits until exactly `n` worker processes exist.
    pub fn wait_workers(&self, n: usize, timeout: Duration) -> Vec<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let w = self.workers();
            if w.len() == n {
                return w;
            }
            assert!(Instant::now() < deadline, "{w:?}, not {n} worker(s) after {timeout:?}:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks for a USR1 snapshot and returns the parsed summary line.
    pub fn stats(&self) -> HashMap<String, u64> {
        let skip = self.log_len();
        self.signal(libc_sig::USR1);
        let line = self.wait_log_after(skip, "stats: ", Duration::from_secs(5)).expect("no stats line");
        parse_kv(&line)
    }

    /// Polls USR1 stats until `pred` holds (counters settle once clients
    /// have closed and workers flushed) and returns that snapshot; fails
    /// the test, with the last one and the log, if it never does.
    pub fn stats_until(&self, timeout: Duration, pred: impl Fn(&HashMap<String, u64>) -> bool) -> HashMap<String, u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.stats();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "stats never matched in {timeout:?}; last {s:?}\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the master to exit; returns its exit code (None on timeout).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every worker pid this handle has seen that is still alive.
    pub fn live_seen_workers(&self) -> Vec<i32> {
        self.seen_workers.lock().unwrap().iter().copied().filter(|&p| alive(p)).collect()
    }
}

impl Drop for Echod {
    fn drop(&mut self) {
        let _ = self.workers();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in self.seen_workers.lock().unwrap().iter() {
            kill(*p, 9);
        }
    }
}

/// `key=value` pairs of a log line (numbers only).
pub fn parse_kv(line: &str) -> HashMap<String, u64> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| {
            v.trim_end_matches(')').split('/').next()?.parse().ok().map(|v| (k.trim_start_matches('(').to_string(), v))
        })
        .collect()
}

pub mod libc_sig {
    pub const HUP: i32 = 1;
    pub const INT: i32 = 2;
    pub const QUIT: i32 = 3;
    pub const KILL: i32 = 9;
    pub const USR1: i32 = 10;
    pub const USR2: i32 = 12;
    pub const TERM: i32 = 15;
    pub const CONT: i32 = 18;
    pub const STOP: i32 = 19;
    pub const TTIN: i32 = 21;
    pub const TTOU: i32 = 22;
}

pub fn kill(pid: i32, sig: i32) {
    if pid > 0 {
        if let Ok(sig) = nix::sys::signal::Signal::try_from(sig) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }
}

/// What /proc/PID/stat says of a process: its name, state and parent.
pub struct Stat {
    /// The name (`comm`), at most 15 bytes.
    pub comm: String,
    /// `R`, `S`, ... `Z` for a zombie.
    pub state: char,
    pub ppid: i32,
}

/// `pid`'s /proc stat, if it exists (zombies included).
pub fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    let mut rest = text[close + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some(Stat { comm: text[open + 1..close].to_string(), state, ppid })
}

pub fn alive(pid: i32) -> bool {
    // A zombie is not alive for our purposes.
    stat(pid).is_some_and(|s| s.state != 'Z')
}

/// The time since the Unix epoch a log line starts with
/// (`2026-12-02T14:24:03.483Z ...`, UTC, milliseconds).
pub fn log_stamp(line: &str) -> Option<Duration> {
    let field = |from: usize, to: usize| line.get(from..to)?.parse::<i64>().ok();
    let (y, mo, d) = (field(0, 4)?, field(5, 7)?, field(8, 10)?);
    let (h, mi, sec, ms) = (field(11, 13)?, field(14, 16)?, field(17, 19)?, field(20, 23)?);
    // Days from the civil date (Howard Hinnant's days_from_civil).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec;
    Some(Duration::from_millis(u64::try_from(secs * 1000 + ms).ok()?))
}

/// `pid` is alive and its name (`comm`) starts with `name`: the process a
/// log line named, not another that took its pid since (pids wrap at
/// `kernel.pid_max`, 32768 by default, within a long chaos run).
pub fn alive_as(pid: i32, name: &str) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z' && s.comm.starts_with(name))
}

/// The `comm` a worker of slot `slot` has: its title, cut to the 15 bytes
/// the kernel keeps.
pub fn worker_comm(slot: &str) -> String {
    let mut name = format!("echod: worker {slot}");
    name.truncate(15);
    name
}

/// A loopback port nobody listens on (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A free loopback port below the ephemeral range, for a service that must
/// keep its port across restarts while thousands of client connections take
/// ephemeral source ports (one of them could hold the port while the service
/// is down). Ports are handed out once per test process.
pub fn stable_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    // Spread test processes apart by pid; then walk down from there.
    let start = low - 1 - (std::process::id() % 2000) as u16 * 4;
    loop {
        let step = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = start.checked_sub(step).filter(|&p| p > 1024).expect("no stable port left");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// SIGSTOPs `pid` and waits until every one of its threads is stopped
/// (signal delivery is asynchronous: a thread may still run for a moment
/// after `kill` returns). Fails the test after 5 s.
pub fn stop_process(pid: i32) {
    kill(pid, libc_sig::STOP);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let states: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.flatten()
                    .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
                    .filter_map(|s| Some(s.rsplit(')').next()?.split_whitespace().next()?.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        if !states.is_empty() && states.iter().all(|s| s == "T") {
            return;
        }
        assert!(Instant::now() < deadline, "pid {pid} did not stop: thread states {states:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Direct children of `pid` whose name starts with `echod`.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if stat(p).is_some_and(|s| s.state != 'Z' && s.ppid == pid && s.comm.starts_with("echod")) {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// A fast deterministic byte generator (xorshift), so payloads are random
/// but reproducible and need no extra crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    /// Random bytes of a random length from 1 to `max`.
    pub fn payload(&mut self, max: usize) -> Vec<u8> {
        let n = 1 + self.below(max as u64) as usize;
        self.bytes(n)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Connects with a timeout and sane per-operation timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Whether the server closed `s` (EOF or reset) within `within`, having
/// sent nothing: a refused connection must not get its bytes back. A
/// connection still open after `within` is an error, not a pass.
pub fn closed_unechoed(s: &mut TcpStream, within: Duration) -> Result<(), String> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("got {n} bytes back: {:?}", String::from_utf8_lossy(&buf[..n]))),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Err(e) => Err(format!("still open: {e}")),
    }
}

/// Asserts "closed by the server": EOF or a reset within `within`, after
/// any bytes still in flight (echoes of what was sent before). A connection
/// still open when the time is up is an error: a read timeout must never
/// pass for a close.
pub fn closed_by_server(s: &mut TcpStream, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        // At least one short read even when no time is left: a close that
        // already happened is seen at once.
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) if Instant::now() < deadline => continue,
            Ok(_) => return Err(format!("still sending after {within:?}")),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(format!("still open: {e}")),
        }
    }
}

/// One round trip: sends `data`, reads the same number of bytes back.
pub fn round_trip(s: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(data)?;
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got)?;
    Ok(got)
}

/// Streams `len` random bytes (from `seed`) to the server while reading the
/// echo concurrently, half-closes, reads to EOF. Returns (FNV hash sent,
/// FNV hash received, bytes received).
pub fn stream_through(addr: SocketAddr, len: usize, seed: u64) -> (u64, u64, usize) {
    let s = connect(addr);
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut rng = Rng::new(seed);
        let mut h = Fnv::default();
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            rng.fill(&mut buf[..n]);
            h.write(&buf[..n]);
            writer.write_all(&buf[..n]).expect("send");
            left -= n;
        }
        writer.shutdown(Shutdown::Write).unwrap();
        h.0
    });
    let mut reader = s;
    let mut h = Fnv::default();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.write(&buf[..n]);
                got += n;
            }
            Err(e) => panic!("receive after {got} bytes: {e}"),
        }
    }
    (sender.join().unwrap(), h.0, got)
}

/// FNV-1a, 64 bit: a streaming hash to compare payloads too large to keep.
pub struct Fnv(pub u64);
impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}
impl Fnv {
    pub fn write(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Which worker pid serves each client port (see [`socket_owners`], which
/// reads ss rather than /proc/net/tcp: that table skips live entries on a
/// busy machine, and a test then misjudged whose clients a kill hit).
pub fn connection_owners(workers: &[i32], server_port: u16) -> HashMap<u16, i32> {
    socket_owners(workers, server_port)
}

/// Waits until the owner map names `n` client ports (the workers have
/// received the connections); returns it. Fails the test after 10 s.
pub fn expect_owners(workers: &[i32], server_port: u16, n: usize) -> HashMap<u16, i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let owners = connection_owners(workers, server_port);
        if owners.len() >= n {
            return owners;
        }
        assert!(Instant::now() < deadline, "{} of {n} connections owned by {workers:?}: {owners:?}", owners.len());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs echod with `args` to completion (for config errors); returns
/// (exit code, stderr, stdout).
pub fn run_to_exit(args: &[&str], cwd: Option<&Path>) -> (i32, String, String) {
    let mut cmd = Command::new(ECHOD);
    cmd.args(args).stdin(Stdio::null());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let out = cmd.output().expect("run echod");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into(),
        String::from_utf8_lossy(&out.stdout).into(),
    )
}

/// Background load for fault and lifecycle tests: `churners` clients that
/// connect, do a few verified round trips and close, over and over; and
/// `holders` clients that keep one connection and echo on it until stopped.
pub struct Traffic {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Tally>>,
    /// Round trips completed so far, live.
    progress: Arc<std::sync::atomic::AtomicU64>,
}

/// What one traffic client saw.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub connections: u64,
    pub round_trips: u64,
    pub bytes: u64,
    pub failures: Vec<String>,
    pub mismatches: u64,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.connections += o.connections;
        self.round_trips += o.round_trips;
        self.bytes += o.bytes;
        self.failures.extend(o.failures);
        self.mismatches += o.mismatches;
    }
}

impl Traffic {
    pub fn start(addr: SocketAddr, churners: usize, holders: usize) -> Traffic {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut threads = Vec::new();
        for i in 0..churners + holders {
            let (stop, progress) = (stop.clone(), progress.clone());
            let hold = i >= churners;
            threads.push(std::thread::spawn(move || client_loop(addr, i as u64, hold, &stop, &progress)));
        }
        Traffic { stop, threads, progress }
    }

    /// Round trips completed so far.
    /// Waits until `more` round trips have completed after this call
    /// ("traffic flows", as a condition rather than a sleep); returns the
    /// new count. Fails the test after `timeout`.
    pub fn expect_progress(&self, more: u64, timeout: Duration) -> u64 {
        let from = self.progress();
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.progress();
            if now >= from + more {
                return now;
            }
            assert!(Instant::now() < deadline, "traffic stalled: {} of {more} round trips in {timeout:?}", now - from);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn progress(&self) -> u64 {
        self.progress.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops every client and sums what they saw.
    pub fn stop(self) -> Tally {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = Tally::default();
        for t in self.threads {
            total.add(t.join().expect("traffic thread panicked"));
        }
        total
    }
}

fn client_loop(
    addr: SocketAddr,
    seed: u64,
    hold: bool,
    stop: &std::sync::atomic::AtomicBool,
    progress: &std::sync::atomic::AtomicU64,
) -> Tally {
    use std::sync::atomic::Ordering::Relaxed;
    let mut t = Tally::default();
    let mut rng = Rng::new(seed + 1000);
    while !stop.load(Relaxed) {
        let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => s,
            Err(e) => {
                t.failures.push(format!("connect: {e}"));
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.set_nodelay(true);
        t.connections += 1;
        let rounds = if hold { u64::MAX } else { 1 + rng.below(10) };
        let mut r = 0;
        while r < rounds && !stop.load(Relaxed) {
            let data = rng.payload(4096);
            match round_trip(&mut s, &data) {
                Ok(got) if got == data => {
                    t.round_trips += 1;
                    t.bytes += data.len() as u64;
                    progress.fetch_add(1, Relaxed);
                }
                Ok(_) => t.mismatches += 1,
                Err(e) => {
                    t.failures.push(format!("round trip {r} ({}): {e}", if hold { "holder" } else { "churner" }));
                    break;
                }
            }
            r += 1;
            if hold {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    t
}

/// Sends `data` on a new connection while reading, half-closes (SHUT_WR)
/// after the last byte, and returns everything echoed until the server
/// closes: what a half-closed client must get back.
pub fn echo_half_closed(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut s = connect(addr);
    let mut w = s.try_clone().unwrap();
    let d = data.to_vec();
    let sender = std::thread::spawn(move || {
        w.write_all(&d).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    back
}

/// One HTTP/1.1 GET; returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = connect(addr);
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: echod-tests\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("HTTP response");
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// Samples of a Prometheus exposition: `name{labels}` -> value.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

impl Echod {
    /// The metrics address from the log (`metrics_listen` must be set).
    pub fn metrics_addr(&self) -> SocketAddr {
        let line = self.wait_log("metrics on http://", Duration::from_secs(5)).expect("no metrics line");
        line.split("http://").nth(1).unwrap().trim_end_matches("/metrics").parse().unwrap()
    }

    /// Scrapes /metrics and parses it.
    pub fn scrape(&self) -> HashMap<String, f64> {
        let (code, body) = http_get(self.metrics_addr(), "/metrics");
        assert_eq!(code, 200, "{body}");
        parse_metrics(&body)
    }

    /// Scrapes until `pred` holds (counters settle after clients close)
    /// and returns that scrape; fails the test, with the last one, if it
    /// never does.
    pub fn scrape_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&HashMap<String, f64>) -> bool,
    ) -> HashMap<String, f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.scrape();
            if pred(&m) {
                return m;
            }
            assert!(Instant::now() < deadline, "metrics never matched in {timeout:?}; last {m:?}\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A client holding one connection and echoing on it until stopped.
pub struct Holder {
    /// Local port: maps the connection to the worker serving it.
    pub port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Result<u64, String>>,
}

impl Holder {
    pub fn start(addr: SocketAddr, seed: u64) -> Holder {
        let mut s = connect(addr);
        let port = s.local_addr().unwrap().port();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let mut rounds = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let data = rng.payload(2000);
                match round_trip(&mut s, &data) {
                    Ok(got) if got == data => rounds += 1,
                    Ok(_) => return Err(format!("mismatch after {rounds} rounds")),
                    Err(e) => return Err(format!("{e} after {rounds} rounds")),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(rounds)
        });
        Holder { port, stop, handle }
    }

    /// Stops and returns the rounds completed, or why it failed.
    pub fn finish(self) -> Result<u64, String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().expect("holder panicked")
    }
}

/// Sum of VmRSS (KiB) over `pids`.
pub fn rss_kb(pids: &[i32]) -> u64 {
    pids.iter().map(|p| status_field(*p, "VmRSS:")).sum()
}

fn status_field(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Open fds of `pid`.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// CPU time (user + system) of `pid`, in seconds.
pub fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    // After the comm field: utime is field 14, stime 15 (rest[11], rest[12]).
    let ticks: u64 =
        rest.get(11).and_then(|v| v.parse().ok()).unwrap_or(0) + rest.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

/// Raises this test process's fd limit (for thousands of client sockets).
pub fn raise_own_nofile(want: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard);
    }
}

/// Runs a closure on drop (kills processes even when an assert fails).
pub struct Defer<F: FnMut()>(pub F);
impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// A NOTIFY_SOCKET the test owns: collects every datagram with its arrival
/// time and the pid that sent it (SO_PASSCRED: the kernel's word, as
/// systemd reads it), so a test can check who spoke for the service.
pub struct Notifications {
    pub path: std::path::PathBuf,
    got: Arc<Mutex<Vec<Notice>>>,
    _dir: tempfile::TempDir,
}

/// One datagram from a NOTIFY_SOCKET and its sender's pid (0 if the kernel
/// gave no credentials).
fn recv_with_sender(sock: &std::os::unix::net::UnixDatagram, buf: &mut [u8]) -> std::io::Result<(usize, i32)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg};
    use std::os::fd::AsRawFd;
    let mut iov = [std::io::IoSliceMut::new(buf)];
    // FDSTORE=1 messages carry fds as well: room for them, so the
    // credentials are never cut off.
    let mut space = nix::cmsg_space!(UnixCredentials, [std::os::fd::RawFd; 32]);
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut pid = 0;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::ScmCredentials(cred) => pid = cred.pid(),
            ControlMessageOwned::ScmRights(fds) => fds.into_iter().for_each(|fd| {
                let _ = nix::unistd::close(fd);
            }),
            _ => {}
        }
    }
    Ok((msg.bytes, pid))
}

impl Notifications {
    pub fn new() -> Notifications {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::PassCred, &true).unwrap();
        // echod drops root to `nobody` after binding; it must still reach us.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok((n, pid)) = recv_with_sender(&sock, &mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap().push(Notice { at: Instant::now(), pid, text });
            }
        });
        Notifications { path, got, _dir: dir }
    }

    /// Every message with the pid that sent it.
    pub fn with_senders(&self) -> Vec<(i32, String)> {
        self.got.lock().unwrap().iter().map(|n| (n.pid, n.text.clone())).collect()
    }

    /// Every message, as received.
    pub fn notices(&self) -> Vec<Notice> {
        self.got.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    pub fn all(&self) -> Vec<(Instant, String)> {
        self.got.lock().unwrap().iter().map(|n| (n.at, n.text.clone())).collect()
    }

    /// Waits for a message containing `pat` after index `skip`; returns its index.
    pub fn wait(&self, skip: usize, pat: &str, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.all().iter().skip(skip).position(|(_, m)| m.contains(pat)) {
                return Some(skip + i);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

pub fn fields(msg: &str) -> HashMap<&str, &str> {
    msg.lines().filter_map(|l| l.split_once('=')).collect()
}

// ---- Binary upgrades (tests/upgrade.rs, tests/upgrade_edges.rs) ----

/// A copy of the echod binary: the "new version" an upgrade switches to.
pub fn second_binary(dir: &Path) -> PathBuf {
    let copy = dir.join("echod-next");
    std::fs::copy(ECHOD, &copy).unwrap();
    copy
}

/// An executable shell script (a broken "new binary").
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

/// The pid in a log line's "(pid N)".
pub fn pid_in(line: &str) -> i32 {
    let after = line.split("(pid ").nth(1).unwrap_or_else(|| panic!("no `(pid ` in `{line}`"));
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|_| panic!("no pid in `{line}`"))
}

/// Sends USR2 to `master`; waits for the hand-over and returns the new
/// master's pid.
pub fn upgrade(e: &Echod, master: i32) -> i32 {
    let skip = e.log_len();
    kill(master, libc_sig::USR2);
    let line = e
        .wait_log_after(skip, "upgrade: new master (pid ", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no hand-over:\n{}", e.log_text()));
    let pid = pid_in(&line);
    e.track(pid);
    pid
}

/// Reloads `e` with `upgrade_binary = binary` and `upgrade_timeout` (s).
/// Short timeouts only where the test waits them out (a hung binary): a
/// failing binary is judged by its exit, which a loaded machine may delay.
pub fn use_upgrade_binary(e: &Echod, binary: &Path, upgrade_timeout: u32) {
    let skip = e.log_len();
    e.write_config(&format!(
        "listen = [\"{}\"]\nworkers = 2\nupgrade_timeout = {upgrade_timeout}\nupgrade_binary = \"{}\"\n",
        e.addr,
        binary.display()
    ));
    e.signal(libc_sig::HUP);
    e.wait_log_after(skip, "reloaded", Duration::from_secs(5)).expect("reloaded");
}

/// Whether `pid` has signal `sig` pending (process-directed, ShdPnd).
pub fn signal_pending(pid: i32, sig: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("ShdPnd:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .unwrap_or(0);
    mask & (1 << (sig - 1)) != 0
}

/// Sends `sig` to `pid` and waits until it was delivered (no longer
/// pending), so the kernel cannot merge it with the next one: a standard
/// signal sent again while still pending is dropped by the kernel, which no
/// handler can count (a burst of `kill`s faster than delivery is one).
pub fn deliver(pid: i32, sig: i32) {
    kill(pid, sig);
    let deadline = Instant::now() + Duration::from_secs(5);
    while signal_pending(pid, sig) {
        assert!(Instant::now() < deadline, "signal {sig} to {pid} never delivered");
        std::thread::yield_now();
    }
}

/// Runs `cmd` (stdin closed, stderr captured) until it exits or `timeout`
/// passes, then kills it and its children by pid. Returns its exit code
/// (None: it was still running, e.g. started where it should have refused)
/// and what it wrote to stderr.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> (Option<i32>, String) {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let pid = child.id() as i32;
    let _guard = Defer(move || {
        children_of(pid).into_iter().for_each(|w| kill(w, libc_sig::KILL));
        kill(pid, libc_sig::KILL);
    });
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if code.is_none() {
        children_of(pid).into_iter().for_each(|w| kill(w, libc_sig::KILL));
        kill(pid, libc_sig::KILL);
        let _ = child.wait();
    }
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    (code, err)
}

/// Waits until `pid` and its workers are gone.
pub fn wait_gone(pid: i32, workers: &[i32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !alive(pid) && workers.iter().all(|&w| !alive(w)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Scrapes /metrics every few ms until stopped; returns how often a counter
/// went backwards (with the first such pair) and how many scrapes there were.
pub fn watch_counters(
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(Vec<String>, usize)> {
    std::thread::spawn(move || {
        let names = ["echod_connections_accepted_total", "echod_bytes_received_total", "echod_bytes_sent_total"];
        let mut last = [0f64; 3];
        let (mut backwards, mut scrapes) = (Vec::new(), 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let (code, body) = http_get(addr, "/metrics");
            if code == 200 {
                scrapes += 1;
                let m = parse_metrics(&body);
                for (i, n) in names.iter().enumerate() {
                    let v = m.get(*n).copied().unwrap_or(0.0);
                    if v < last[i] {
                        backwards.push(format!("{n}: {} then {v}", last[i]));
                    }
                    last[i] = v;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (backwards, scrapes)
    })
}

// ---- Lifecycle chaos (tests/chaos.rs): who talks to systemd, tight limits ----

/// One datagram on a [`Notifications`] socket: when, from which pid
/// (the kernel's SCM_CREDENTIALS, not what the sender claims), and its text.
#[derive(Debug, Clone)]
pub struct Notice {
    pub at: Instant,
    pub pid: i32,
    pub text: String,
}

/// As [`start_with`] with no arguments, under `prlimit --nofile=N:N` (which
/// execs echod: same pid); `extra` must set `workers` and `shutdown_timeout`
/// itself if it cares.
pub fn start_with_env_nofile(extra: &str, env: &[(&str, &str)], nofile: u64) -> Echod {
    let mut e = spawn_cmd(extra, &[], env, Some(nofile));
    e.wait_ready();
    e
}

/// As [`connection_owners`], from the kernel's socket dump (`ss`, over
/// netlink, established connections only) rather than /proc/net/tcp, which
/// on a busy machine (tens of thousands of TIME_WAIT entries) skips live
/// connections more often. Neither dump is atomic: a table that changes
/// while it is read may still lose an entry, so callers that must not miss
/// one take the union of two. Client port -> owning pid.
pub fn socket_owners(pids: &[i32], server_port: u16) -> HashMap<u16, i32> {
    let mut inode_owner = HashMap::new();
    for &p in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{p}/fd")) else { continue };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy().to_string();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inode_owner.insert(inode.to_string(), p);
                }
            }
        }
    }
    let filter = format!("( sport = :{server_port} )");
    let out = Command::new("ss").args(["-tnHe", "state", "established", &filter]).output().expect("run ss");
    let mut owners = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let peer = f.iter().position(|w| w.contains(&format!(":{server_port}"))).and_then(|i| f.get(i + 1));
        let port = peer.and_then(|p| p.rsplit(':').next()).and_then(|p| p.parse::<u16>().ok());
        let inode = f.iter().find_map(|w| w.strip_prefix("ino:"));
        if let (Some(port), Some(owner)) = (port, inode.and_then(|i| inode_owner.get(i))) {
            owners.insert(port, *owner);
        }
    }
    owners
}
