//! Resource limits the daemon must fit in.
//!
//! Each connection a worker serves is one fd in that worker. If a worker ran
//! out of fds, the kernel would silently drop connections passed to it
//! (SCM_RIGHTS truncation), so the master raises RLIMIT_NOFILE's soft limit
//! to the hard limit at start (as nginx's worker_rlimit_nofile) and lowers
//! per-worker capacity to what fits, saying so.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::config::{Config, Handler};

/// Fds a worker needs besides connections: stdio, its channel, and slack for
/// the logger and libc.
pub const WORKER_RESERVED_FDS: u64 = 16;

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit in
/// effect.
pub fn raise_nofile() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                log::warn!("cannot raise RLIMIT_NOFILE from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// The soft RLIMIT_NOFILE now.
pub fn current_nofile() -> u64 {
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// Connections one worker may hold (`threads_per_worker` in thread mode,
/// `worker_connections` in event mode), unless the fd limit cannot hold
/// that many.
pub fn worker_capacity(config: &Config, fd_limit: u64) -> usize {
    let fits = fd_limit.saturating_sub(WORKER_RESERVED_FDS).max(1) as usize;
    let wanted = config.connections_per_worker();
    if fits < wanted {
        let key = match config.handler {
            Handler::Thread => "threads_per_worker",
            Handler::Event => "worker_connections",
        };
        log::warn!(
            "RLIMIT_NOFILE {fd_limit} holds only {fits} connections per worker; {key} = {wanted} is lowered to \
             that (raise LimitNOFILE= or `ulimit -n`)"
        );
    }
    fits.min(wanted)
}

/// Warns about limits that cannot all be met at once.
pub fn check(config: &Config, workers: usize, capacity: usize) {
    let total = (workers * capacity) as u64;
    if config.max_connections > total {
        log::warn!(
            "max_connections = {} exceeds what {workers} worker(s) x {capacity} can serve ({total}); \
             beyond {total}, clients wait in the listen backlog",
            config.max_connections
        );
    }
    if config.handler == Handler::Event {
        return; // a few threads, however many connections
    }
    if let Some(max) =
        std::fs::read_to_string("/proc/sys/kernel/threads-max").ok().and_then(|s| s.trim().parse::<u64>().ok())
    {
        if total > max {
            log::warn!("{total} handler threads may be needed but kernel.threads-max is {max}");
        }
    }
}
