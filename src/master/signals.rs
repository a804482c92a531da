//! The signals the master acts on, and what each means (DESIGN.md, section 2).
//!
//! signal-hook's handler only writes to a pipe that the master's poll
//! watches, so the real work happens in the loop, never in signal context.

use signal_hook::consts::signal::*;
use signal_hook_mio::v1_0::Signals;

/// Installs the handlers. Called first thing in `main`, before the config is
/// read: a HUP (or TERM) that arrives while a new master loads its config,
/// e.g. a reload forwarded in a binary upgrade, is queued for the loop
/// instead of killing the process with the default action.
pub fn install() -> std::io::Result<Signals> {
    Signals::new(HANDLED)
}

/// Registered with signal-hook at start.
pub const HANDLED: [i32; 9] = [SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2, SIGCHLD];

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
