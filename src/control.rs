//! `echod --signal NAME`: the control command, as `nginx -s`, that finds the
//! running master through `pid_file` and signals it, waiting for the result
//! where the result is something a script needs to know.
//!
//! The pid file names the master that speaks for the service (see
//! `master::pidfile`), so this signals the right process during an
//! upgrade's drain and on a host with two instances (each with its own
//! file), where `pidof` and `pgrep` guess. Before it signals, it checks
//! that the pid is a running echod, so a stale file after a SIGKILL does
//! not signal whatever process reused the pid. `reload` checks the file
//! first, as the unit's `ExecReload` does; `upgrade` waits until a new
//! master has taken over (or the old one gave up on it); `stop` and `quit`
//! wait until the master has exited.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal as NixSignal, kill};
use nix::unistd::Pid;

use crate::config::{Config, EX_CONFIG};
use crate::master::{pidfile, signals};

/// How often the waits look again.
const POLL: Duration = Duration::from_millis(50);

/// Beyond the config's own timeouts: what a wait allows for a start, an
/// exec or a slow machine.
const SLACK: Duration = Duration::from_secs(10);

/// Runs `echod --signal command` against the master `config` names; returns
/// the exit status (0 done; 1 no master, or it did not do it in time; 78 a
/// config that cannot say where the master is, or one a reload would
/// refuse).
pub fn run(command: &str, config: &Config, source: Option<&Path>) -> i32 {
    match send(command, config, source) {
        Ok(done) => {
            println!("echod: {done}");
            0
        }
        Err((code, why)) => {
            eprintln!("echod: -s {command}: {why}");
            code
        }
    }
}

fn send(command: &str, config: &Config, source: Option<&Path>) -> Result<String, (i32, String)> {
    let doc = signals::for_command(command).ok_or((EX_CONFIG, format!("no such command `{command}`")))?;
    let from = source.map_or("the built-in defaults".to_string(), |p| p.display().to_string());
    if config.pid_file.is_empty() {
        return Err((EX_CONFIG, format!("`pid_file` is not set in {from}, so the master cannot be found")));
    }
    let path = Path::new(&config.pid_file);
    let pid = running_master(path)?;
    // `reload`: the file was loaded and validated before this runs, so a
    // broken one was already refused (78, file, line, key) unsignalled.
    let draining = pidfile::running_echod(&pidfile::oldbin(path));
    let raw = doc.raw[0];
    let sig = NixSignal::try_from(raw).map_err(|e| (1, e.to_string()))?;
    kill(Pid::from_raw(pid as i32), sig).map_err(|e| (1, format!("cannot signal master {pid}: {e}")))?;
    let name = doc.names[0];
    match doc.signal {
        signals::Signal::Upgrade => wait_for_successor(path, pid, config),
        signals::Signal::Stop | signals::Signal::Quit => {
            // During an upgrade's drain the old master stops with the new
            // one (it is told so): the service has stopped when both have.
            let done = wait_for_exit(pid, config, name)?;
            match draining {
                Some(old) => wait_for_exit(old, config, name).map(|d| format!("{done}; the draining old {d}")),
                None => Ok(done),
            }
        }
        _ => Ok(format!("sent {name} to master {pid} ({})", doc.summary)),
    }
}

/// The pid in `path`, if it is a running echod.
fn running_master(path: &Path) -> Result<u32, (i32, String)> {
    match pidfile::read(path) {
        Ok(Some(_)) => {}
        Ok(None) => return Err((1, format!("no echod is running: {} does not name a pid", path.display()))),
        Err(e) => return Err((1, format!("cannot read {}: {e}", path.display()))),
    }
    pidfile::running_echod(path).ok_or_else(|| {
        (1, format!("{} names no running echod (a stale file: the master was killed outright?)", path.display()))
    })
}

/// USR2 sent to `old`: done once the pid file names another running echod;
/// failed if `old` gave up on the new master (past `upgrade_timeout`).
fn wait_for_successor(path: &Path, old: u32, config: &Config) -> Result<String, (i32, String)> {
    let deadline = Instant::now() + config.upgrade_timeout.0 + SLACK;
    loop {
        if let Some(new) = pidfile::running_echod(path).filter(|&p| p != old) {
            return Ok(format!(
                "upgraded: master {new} serves; the old master {old} drains for up to {}s, then exits",
                config.shutdown_timeout.0.as_secs_f64()
            ));
        }
        if Instant::now() >= deadline {
            return Err((
                1,
                format!(
                    "no new master took over within {}s: master {old} serves on (its log says why)",
                    (config.upgrade_timeout.0 + SLACK).as_secs()
                ),
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// `pid` exists and is not a zombie (a master that exited but whose parent
/// has not reaped it yet has stopped all the same).
fn is_running(pid: u32) -> bool {
    pidfile::proc_state(pid).is_some_and(|(_, state)| state != 'Z')
}

/// TERM or QUIT sent to `pid`: done once it has exited.
fn wait_for_exit(pid: u32, config: &Config, name: &str) -> Result<String, (i32, String)> {
    let allowed = config.shutdown_delay.0 + config.shutdown_timeout.0 + SLACK;
    let deadline = Instant::now() + allowed;
    while is_running(pid) {
        if Instant::now() >= deadline {
            return Err((1, format!("sent {name}, but master {pid} is still running after {}s", allowed.as_secs())));
        }
        std::thread::sleep(POLL);
    }
    Ok(format!("master {pid} has exited after {name}"))
}
