//! The signals the master acts on, and what each means (DESIGN.md, section 2).
//!
//! signal-hook's handler only writes to a pipe that the master's poll
//! watches, so the real work happens in the loop, never in signal context.
//! The pipe says *which* signals arrived since the last look, not how many
//! times; for the ones whose count matters (TTIN, TTOU: one worker each) a
//! counter in signal context counts every delivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mio::{Interest, Registry, Token};
use signal_hook::consts::signal::*;
use signal_hook_mio::v1_0::Signals;

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
    Ok(SignalSource { pipe: Signals::new(signals)?, counts })
}

/// Registered with signal-hook at start.
pub const HANDLED: [i32; 9] = [SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2, SIGCHLD];

/// Signals whose every delivery counts.
const COUNTED: [i32; 2] = [SIGTTIN, SIGTTOU];

/// The signals that arrived, as the loop reads them.
pub struct SignalSource {
    pipe: Signals,
    /// Deliveries of each of [`COUNTED`] not yet taken by the loop.
    counts: [Arc<AtomicUsize>; 2],
}

impl SignalSource {
    pub fn register(&mut self, registry: &Registry, token: Token) -> std::io::Result<()> {
        registry.register(&mut self.pipe, token, Interest::READABLE)
    }

    /// What arrived since the last call, each with how many times it is to
    /// be acted on: a counted signal as often as it was delivered (0 when
    /// an earlier call already took its deliveries), any other once.
    pub fn take(&mut self) -> Vec<(Signal, usize)> {
        let raw: Vec<i32> = self.pipe.pending().collect();
        raw.into_iter()
            .filter_map(|sig| {
                let times = match COUNTED.iter().position(|&c| c == sig) {
                    Some(i) => self.counts[i].swap(0, Ordering::Relaxed),
                    None => 1,
                };
                Signal::from_raw(sig).map(|s| (s, times))
            })
            .filter(|&(_, times)| times > 0)
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut got = source.take();
        got.sort_by_key(|(s, _)| *s as u8);
        assert_eq!(got, vec![(Signal::MoreWorkers, 4), (Signal::FewerWorkers, 2), (Signal::Stats, 1)]);
        assert!(source.take().is_empty(), "each delivery is taken once");
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTTIN).unwrap();
        assert_eq!(source.take(), vec![(Signal::MoreWorkers, 1)]);
        // The pipe reports a signal whose deliveries an earlier pass took
        // (a delivery between that pass's swap and its read of the pipe):
        // nothing to act on, not an act of zero.
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTTIN).unwrap();
        source.counts[0].swap(0, Ordering::Relaxed);
        assert_eq!(source.take(), vec![]);
    }
}
