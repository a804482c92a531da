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
    /// NOTIFY_SOCKET is set: there is a service manager to tell.
    enabled: bool,
    /// This master is the unit's main process. Only the main process may
    /// say anything: under systemd, STOPPING=1 from any process of the unit
    /// stops the unit, and watchdog pings from another one would hide a
    /// wedged main process. The master's lifecycle sets it (`set_main`).
    main: bool,
    /// Say MAINPID= with READY=1: this master replaced another one (binary
    /// upgrade, or taking over again) and becomes the unit's main process.
    announce_pid: bool,
    /// Ping interval: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.
    watchdog_every: Option<Duration>,
    next_ping: Option<Instant>,
    last_status: String,
}

impl Notifier {
    /// `main`: whether this master starts as the unit's main process;
    /// `announce_pid`: whether it replaced another one (a binary upgrade).
    pub fn from_env(main: bool, announce_pid: bool) -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let watchdog_every = sd_notify::watchdog_enabled().filter(|_| enabled).map(|d| d / 2);
        Notifier {
            enabled,
            main,
            announce_pid,
            watchdog_every,
            next_ping: watchdog_every.filter(|_| main).map(|_| Instant::now()),
            last_status: String::new(),
        }
    }

    /// This master becomes (or stops being) the unit's main process. One
    /// that becomes main says MAINPID= at once and again with its next
    /// READY=1, and starts pinging the watchdog.
    pub fn set_main(&mut self, main: bool) {
        if main && !self.main {
            self.main = true;
            // Named at once, so that systemd (and whoever checks who speaks)
            // knows the sender of what follows (fd store, pings) is main.
            self.send(&[NotifyState::MainPid(std::process::id())]);
            self.announce_pid = true;
            self.next_ping = self.watchdog_every.map(|_| Instant::now());
        }
        if !main {
            self.next_ping = None;
        }
        self.main = main;
    }

    fn send(&self, states: &[NotifyState]) {
        if self.enabled() {
            if let Err(e) = sd_notify::notify(states) {
                log::warn!("sd_notify: {e}");
            }
        }
    }

    /// Every worker is up and serving.
    pub fn ready(&self, status: &str) {
        if self.announce_pid {
            self.send(&[NotifyState::MainPid(std::process::id()), NotifyState::Ready, NotifyState::Status(status)]);
        } else {
            self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
        }
    }

    /// A binary upgrade hands over: `pid` is the unit's main process now.
    /// Sent while this master is still main; the master's next state then
    /// makes it say nothing more (`set_main(false)`).
    pub fn hand_over(&mut self, pid: u32) {
        self.send(&[NotifyState::MainPid(pid)]);
    }

    /// There is a service manager and this master speaks to it.
    pub fn enabled(&self) -> bool {
        self.enabled && self.main
    }

    /// Puts `fds` into the service's fd store under `name`, replacing what
    /// was stored there, so that a restart gets them back (LISTEN_FDS) and
    /// no connect is refused while the service restarts.
    pub fn store_fds(&self, name: &str, fds: &[std::os::fd::BorrowedFd<'_>]) {
        if !self.enabled() {
            return;
        }
        if let Err(e) = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]) {
            log::warn!("sd_notify FDSTOREREMOVE: {e}");
        }
        if !fds.is_empty() {
            if let Err(e) = sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], fds) {
                log::warn!("sd_notify FDSTORE: {e}");
            }
        }
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
    // sd-notify sets FD_CLOEXEC on each (as sd_listen_fds(3) does): they
    // reach a later exec only when passed on on purpose (binary upgrade).
    Ok(sd_notify::listen_fds_with_names()?
        // LISTEN_PID named us, so these fds were opened for us at exec and no
        // Rust object owns them yet.
        .filter_map(|(fd, name)| sys::adopt_fd(fd).map(|fd| Activated { fd, name }))
        .collect())
}
