//! Accepting connections and handing them to workers.
//!
//! The master accepts only while some worker has a free slot: capacity is
//! `capacity - (dispatched - finished)` per serving worker, read from the
//! scoreboard. When there is none, it stops calling accept and the kernel's
//! listen backlog holds new clients, as in Apache's worker MPM, so overload
//! never turns into memory. It resumes when a worker reports a freed slot
//! (the accept gate, [`crate::gate`], with the race it closes).
//!
//! Each accepted connection goes to the least-loaded worker (ties broken
//! round-robin); connections picked for the same worker in one pass travel in
//! one message. A worker whose channel is full, that has not reported Ready,
//! that is draining, or whose heartbeat stalled is skipped; fds it could not
//! take are kept and offered to the others first on the next pass.
//!
//! Over `max_connections` or `max_connections_per_ip` a connection is
//! closed right after accept (counted as rejected, logged at most once per
//! five seconds) instead of taking a thread. Per-address counts live in the
//! scoreboard, by exact address: the master charges the client's entry of
//! the worker's table when it sends it a connection (and puts the entry in
//! the `Serve` command), the worker discharges it when the connection
//! ends. On a
//! PROXY protocol listener the peer is the balancer, so the master applies
//! only `max_connections`; the worker applies the per-address limit once
//! the header has named the client (`worker::proxied`).
//!
//! Out of file descriptors (EMFILE/ENFILE) the master does not spin on a
//! readable listener it cannot accept from: it sends what it holds (freeing
//! fds) and, if that was nothing, pauses accepting for a growing interval
//! (as nginx and libuv do), logging at most once per interval.

use std::collections::VecDeque;
use std::io::{self, ErrorKind};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::gate::AcceptGate;
use crate::ipc::{MAX_FDS_PER_MESSAGE, Origin};
use crate::master::listeners::Listeners;
use crate::master::supervisor::{Pending, Phase, Supervisor, WorkerHandle};
use crate::ratelimit::RateLimited;

/// First pause after an EMFILE with nothing to free; doubles up to the max.
const FD_BACKOFF_MIN: Duration = Duration::from_millis(50);
const FD_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// While paused for capacity, re-check the scoreboard this often in case a
/// RecheckRoom notice was dropped (a full channel).
pub const PAUSED_RECHECK: Duration = Duration::from_millis(100);

/// Accept-side state of the master.
#[derive(Default)]
pub struct Dispatcher {
    /// Accepted connections no worker could take yet (their channel was
    /// full). Offered first on the next pass; never more than the capacity
    /// that admitted them.
    stash: VecDeque<Pending>,
    /// Round-robin cursor among workers for ties in load.
    rr: usize,
    /// Accepting is paused for lack of capacity.
    pub paused: bool,
    /// Accepting is paused until then (out of fds).
    fd_backoff: Option<(Instant, Duration)>,
    /// Run another pass without waiting for an event (more may be pending).
    pub again: bool,
    /// Connections accepted (and dispatched or being dispatched).
    pub accepted: u64,
    /// Connections closed at once because a limit was reached.
    pub rejected: u64,
    fd_log: RateLimited,
    send_log: RateLimited,
    reject_log: RateLimited,
}

/// The limits a dispatch pass enforces (from the config in force).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: u64,
    pub max_per_ip: u32,
}

impl Limits {
    pub fn of(config: &Config) -> Limits {
        Limits { max_connections: config.max_connections, max_per_ip: config.max_connections_per_ip }
    }
}

/// Why a connection was turned away.
enum Rejection {
    Total(u64),
    PerIp(u32),
}

impl Dispatcher {
    /// Connections accepted but not yet sent to a worker.
    pub fn held(&self, sup: &Supervisor) -> usize {
        self.stash.len() + sup.workers().iter().map(|w| w.outbox().len()).sum::<usize>()
    }

    /// When the dispatcher wants the loop to wake without an event.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        if self.again {
            return Some(now);
        }
        let backoff = self.fd_backoff.map(|(until, _)| until);
        let recheck = self.paused.then(|| now + PAUSED_RECHECK);
        backoff.into_iter().chain(recheck).min()
    }

    /// Drops every connection not yet handed to a worker (stopping).
    pub fn discard_held(&mut self, sup: &mut Supervisor) -> usize {
        let n = self.held(sup);
        self.stash.clear();
        sup.workers_mut().iter_mut().for_each(|w| drop(w.take_outbox()));
        n
    }

    /// One dispatch pass: place held connections, accept while there is
    /// capacity, send batches, and pause or resume accepting.
    pub fn run(&mut self, listeners: &mut Listeners, sup: &mut Supervisor, limits: Limits, now: Instant) {
        self.again = false;
        if self.fd_backoff.is_some_and(|(until, _)| now < until) {
            self.flush(sup);
            return;
        }
        // Two rounds at most: a send that fails puts fds back in the stash,
        // and the second round offers them to the other workers.
        for _ in 0..2 {
            self.place_stash(sup);
            if self.stash.is_empty() {
                self.accept(listeners, sup, limits, now);
            }
            if self.flush(sup) == 0 {
                break;
            }
        }
        let waiting = listeners.any_ready() || !self.stash.is_empty();
        self.update_pause(waiting, sup);
    }

    fn place_stash(&mut self, sup: &mut Supervisor) {
        while !self.stash.is_empty() {
            let Some(i) = self.pick(sup) else { return };
            if let Some(conn) = self.stash.pop_front() {
                sup.workers_mut()[i].hold(conn);
            }
        }
    }

    /// Accepts from ready listeners while some worker has room.
    fn accept(&mut self, listeners: &mut Listeners, sup: &mut Supervisor, limits: Limits, now: Instant) {
        for listener in listeners.ready_mut() {
            loop {
                let Some(i) = self.pick(sup) else { return };
                match listener.socket.accept() {
                    Ok((socket, peer)) => {
                        self.fd_backoff = None;
                        // Behind a PROXY listener the peer is the balancer:
                        // the worker learns the client and applies the
                        // per-address limit to it.
                        // (A peer without an address cannot happen on TCP;
                        // it would count as the unspecified address.)
                        let client = match peer.as_socket() {
                            _ if listener.proxy => None,
                            Some(a) => Some(a.ip().to_canonical()),
                            None => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
                        };
                        if let Some(why) = self.over_limit(sup, limits, client) {
                            self.reject(why, peer.as_socket(), now);
                            continue; // dropping `socket` closes it
                        }
                        self.accepted += 1;
                        let scoreboard = sup.scoreboard;
                        let w = &mut sup.workers_mut()[i];
                        if w.hold(Pending { fd: OwnedFd::from(socket), client }) >= MAX_FDS_PER_MESSAGE {
                            let full = send_outbox(w, &mut self.stash, &mut self.send_log, scoreboard);
                            self.refused_for_full_tables(full);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        listener.ready = false;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if is_fd_exhaustion(&e) => {
                        self.out_of_fds(e, sup, now);
                        return;
                    }
                    Err(e) if is_transient(&e) => {
                        log::debug!("accept on {}: {e}", listener.addr);
                    }
                    Err(e) => {
                        log::error!("accept on {}: {e}", listener.addr);
                        listener.ready = false;
                        break;
                    }
                }
            }
        }
    }

    /// Connections `send_outbox` closed because their worker's address
    /// table was full: rejected, not accepted after all.
    fn refused_for_full_tables(&mut self, n: u64) {
        self.accepted -= n;
        self.rejected += n;
    }

    /// Whether one more connection from `client` (None: a PROXY listener's
    /// balancer) would break a limit.
    fn over_limit(&self, sup: &Supervisor, limits: Limits, client: Option<IpAddr>) -> Option<Rejection> {
        if limits.max_connections > 0 {
            // load_of counts each worker's outbox; add only the stash.
            let held = self.stash.len() as u64 + sup.workers().iter().map(|w| load_of(w, sup)).sum::<u64>();
            if held >= limits.max_connections {
                return Some(Rejection::Total(limits.max_connections));
            }
        }
        if let (Some(ip), true) = (client, limits.max_per_ip > 0) {
            let in_workers = sup.scoreboard.ip_total(ip);
            let unsent = self.stash.iter().chain(sup.workers().iter().flat_map(|w| w.outbox()));
            let held = unsent.filter(|p| p.client == client).count() as u64;
            if in_workers + held >= limits.max_per_ip as u64 {
                return Some(Rejection::PerIp(limits.max_per_ip));
            }
        }
        None
    }

    fn reject(&mut self, why: Rejection, peer: Option<SocketAddr>, now: Instant) {
        self.rejected += 1;
        if let Some(suppressed) = self.reject_log.allow(now) {
            let peer = peer.map_or("?".to_string(), |p| p.ip().to_string());
            let why = match why {
                Rejection::Total(n) => format!("max_connections ({n}) reached"),
                Rejection::PerIp(n) => format!("max_connections_per_ip ({n}) reached for {peer}"),
            };
            log::warn!("rejected a connection from {peer}: {why}{}", RateLimited::suffix(suppressed));
        }
    }

    /// EMFILE/ENFILE: free what we hold, or back off if we hold nothing.
    fn out_of_fds(&mut self, e: io::Error, sup: &mut Supervisor, now: Instant) {
        if self.held(sup) > 0 {
            // Sending the batch closes our copies; try again right after.
            self.again = true;
            return;
        }
        let wait = match self.fd_backoff {
            Some((_, last)) => (last * 2).min(FD_BACKOFF_MAX),
            None => FD_BACKOFF_MIN,
        };
        self.fd_backoff = Some((now + wait, wait));
        if let Some(suppressed) = self.fd_log.allow(now) {
            log::error!(
                "accept: {e}: out of file descriptors; pausing accepts for {}ms{}",
                wait.as_millis(),
                RateLimited::suffix(suppressed)
            );
        }
    }

    /// The worker to give the next connection: least loaded among those that
    /// can take one, ties broken round-robin. None when all are full.
    fn pick(&mut self, sup: &Supervisor) -> Option<usize> {
        let n = sup.workers().len();
        let mut best: Option<(usize, u64)> = None;
        for k in 0..n {
            let i = (self.rr + k) % n;
            let w = &sup.workers()[i];
            if !w.takes_connections() {
                continue;
            }
            let load = load_of(w, sup);
            if load >= w.capacity() as u64 {
                continue;
            }
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((i, load));
            }
        }
        let (i, _) = best?;
        self.rr = i + 1;
        Some(i)
    }

    /// Sends every outbox. Returns how many connections went back to the
    /// stash (their worker's channel was full).
    fn flush(&mut self, sup: &mut Supervisor) -> usize {
        let before = self.stash.len();
        let scoreboard = sup.scoreboard;
        let mut full = 0;
        for w in sup.workers_mut().iter_mut().filter(|w| !w.outbox().is_empty()) {
            full += send_outbox(w, &mut self.stash, &mut self.send_log, scoreboard);
        }
        self.refused_for_full_tables(full);
        self.stash.len() - before
    }

    /// Pauses accepting while connections wait and no worker has room, and
    /// resumes when one does, through the accept gate (which closes before
    /// its last look for room, so a slot freed in between is never missed).
    fn update_pause(&mut self, waiting: bool, sup: &Supervisor) {
        let gate = AcceptGate::new(sup.scoreboard);
        if waiting && gate.close_unless(|| self.has_room(sup).is_some()) {
            // Before any worker serves there is no room either; that is a
            // start (or a crash loop, logged as such), not a full echod.
            let serving = sup.workers().iter().any(|w| w.phase() == Phase::Serving);
            if !self.paused && serving {
                log::debug!("all workers full; new connections wait in the listen backlog");
            }
            self.paused = true;
        } else {
            gate.open();
            self.paused = false;
            if waiting {
                self.again = true;
            }
        }
    }

    fn has_room(&self, sup: &Supervisor) -> Option<usize> {
        sup.workers().iter().position(|w| w.takes_connections() && load_of(w, sup) < w.capacity() as u64)
    }
}

/// Connections a worker holds or will hold (see [`WorkerHandle::load`]),
/// with its finished count read from the scoreboard now.
fn load_of(w: &WorkerHandle, sup: &Supervisor) -> u64 {
    w.load(sup.scoreboard.slot(w.id).finished())
}

/// Sends a worker's outbox in messages of up to MAX_FDS_PER_MESSAGE fds,
/// each direct connection charged to its client's entry of the worker's
/// table first (the worker may close, and discharge, a connection before
/// this process runs again). On success our copies are closed; what could
/// not be sent is discharged and goes to `stash`. Returns how many
/// connections were closed instead because the worker's table was full
/// (never, while its capacity is at most the table's bound: see
/// `Supervisor::table_bound`).
fn send_outbox(
    w: &mut WorkerHandle,
    stash: &mut VecDeque<Pending>,
    log_limit: &mut RateLimited,
    scoreboard: crate::scoreboard::Scoreboard,
) -> u64 {
    let mut full = 0;
    let outbox = w.take_outbox();
    let mut charged: Vec<(Pending, Origin)> = Vec::with_capacity(outbox.len());
    for p in outbox {
        let origin = match p.client {
            None => Origin::Proxied,
            Some(ip) => match scoreboard.charge_direct(w.id, ip) {
                Some(charge) => Origin::Direct(charge),
                None => {
                    full += 1;
                    if let Some(s) = log_limit.allow(Instant::now()) {
                        log::warn!(
                            "rejected a connection from {ip}: worker {}'s per-address table is full{}",
                            w.id,
                            RateLimited::suffix(s)
                        );
                    }
                    continue; // dropping `p` closes it
                }
            },
        };
        charged.push((p, origin));
    }
    let mut rest = &charged[..];
    while !rest.is_empty() {
        let n = rest.len().min(MAX_FDS_PER_MESSAGE);
        let batch: Vec<(BorrowedFd, Origin)> = rest[..n].iter().map(|(p, o)| (p.fd.as_fd(), *o)).collect();
        match w.channel.send_serve(&batch) {
            Ok(()) => {
                w.sent(n);
                rest = &rest[n..];
            }
            Err(e) => {
                if e.kind() == ErrorKind::WouldBlock {
                    w.set_congested(true);
                } else if let Some(s) = log_limit.allow(Instant::now()) {
                    log::warn!("worker {}: cannot send connections: {e}{}", w.id, RateLimited::suffix(s));
                    w.set_congested(true);
                }
                break;
            }
        }
    }
    let sent = charged.len() - rest.len();
    // Keep what was not sent, its charges given back; the sent ones are
    // dropped (closed) here.
    for (p, origin) in charged.into_iter().skip(sent) {
        if let Origin::Direct(charge) = origin {
            scoreboard.discharge(w.id, charge);
        }
        stash.push_back(p);
    }
    full
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Errors about one connection, not the listener (accept(2) lists them).
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}
