//! Talking to systemd: readiness and status notifications, the watchdog, and
//! socket activation.
//!
//! Everything is a no-op outside systemd: without NOTIFY_SOCKET nothing is
//! sent, without WATCHDOG_USEC no pings are due, without LISTEN_PID equal to
//! our pid no sockets are adopted.

use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::sys;

/// The master's link to the service manager.
pub struct Notifier {
    enabled: bool,
    /// Ping interval: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.
    watchdog_every: Option<Duration>,
    next_ping: Option<Instant>,
    last_status: String,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let watchdog_every = sd_notify::watchdog_enabled().filter(|_| enabled).map(|d| d / 2);
        Notifier {
            enabled,
            watchdog_every,
            next_ping: watchdog_every.map(|_| Instant::now()),
            last_status: String::new(),
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if self.enabled {
            if let Err(e) = sd_notify::notify(states) {
                log::warn!("sd_notify: {e}");
            }
        }
    }

    /// Every worker is up and serving.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A reload starts (systemd's Type=notify-reload protocol wants the
    /// monotonic timestamp with it).
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(ts) => self.send(&[NotifyState::Reloading, ts, NotifyState::Status("reloading")]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// Sends STATUS= if it changed.
    pub fn status(&mut self, status: &str) {
        if status != self.last_status {
            self.send(&[NotifyState::Status(status)]);
            self.last_status = status.to_string();
        }
    }

    /// When the next watchdog ping is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.next_ping
    }

    /// Pings the watchdog if due. Called from the master's loop only, so a
    /// wedged loop stops the pings and systemd restarts us.
    pub fn watchdog(&mut self, now: Instant) {
        if let (Some(every), Some(due)) = (self.watchdog_every, self.next_ping) {
            if now >= due {
                self.send(&[NotifyState::Watchdog]);
                self.next_ping = Some(now + every);
            }
        }
    }
}

/// A socket passed by systemd, with its FileDescriptorName=.
pub struct Activated {
    pub fd: OwnedFd,
    pub name: String,
}

/// The sockets systemd passed us (LISTEN_FDS, checked against LISTEN_PID),
/// empty when not socket-activated.
pub fn listen_fds() -> io::Result<Vec<Activated>> {
    Ok(sd_notify::listen_fds_with_names()?
        // LISTEN_PID named us, so these fds were opened for us at exec and no
        // Rust object owns them yet.
        .filter_map(|(fd, name)| sys::adopt_fd(fd).map(|fd| Activated { fd, name }))
        .collect())
}
