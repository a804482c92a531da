//! Resource limits the daemon must fit in.
//!
//! Each connection a worker serves is one fd in that worker. If a worker ran
//! out of fds, the kernel would silently drop connections passed to it
//! (SCM_RIGHTS truncation), so the master raises RLIMIT_NOFILE's soft limit
//! to the hard limit at start (as nginx's worker_rlimit_nofile) and lowers
//! per-worker capacity to what fits, saying so.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::config::{Config, Handler, Refusal};

/// Fds a worker needs besides connections and its handler's own: stdio,
/// its channel, and slack for the logger and libc.
pub const WORKER_RESERVED_FDS: u64 = 16;

/// Fds each event loop holds for its whole life: its epoll instance and
/// the eventfd of its waker.
pub const FDS_PER_EVENT_LOOP: u64 = 2;

/// Fds a worker holds that are not connections: the reserve, plus every
/// event loop's own in event mode (thread mode's threads hold none).
pub fn worker_overhead_fds(config: &Config) -> u64 {
    let handler = match config.handler {
        Handler::Thread => 0,
        Handler::Event => FDS_PER_EVENT_LOOP * config.event_threads as u64,
    };
    WORKER_RESERVED_FDS + handler
}

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

/// Whether a worker fits in the fd limit at all: its own fds (channel,
/// stdio, one epoll fd and waker per event loop) and one connection. A
/// worker that cannot would fail at start, and be respawned, for ever.
/// The error names the key to change.
pub fn check_fits(config: &Config, fd_limit: u64) -> Result<(), Refusal> {
    let own = worker_overhead_fds(config);
    if fd_limit > own {
        return Ok(());
    }
    let key = match config.handler {
        Handler::Thread => "threads_per_worker",
        Handler::Event => "event_threads",
    };
    Err(Refusal::new(
        key,
        format!(
            "RLIMIT_NOFILE {fd_limit} cannot hold a worker's own {own} fds and one connection{}: raise LimitNOFILE= \
             or `ulimit -n`{}",
            if config.handler == Handler::Event { " (2 per event loop)" } else { "" },
            if config.handler == Handler::Event { ", or lower `event_threads`" } else { "" }
        ),
    ))
}

/// Connections one worker may hold (`threads_per_worker` in thread mode,
/// `worker_connections` in event mode), unless the fd limit cannot hold
/// that many.
pub fn worker_capacity(config: &Config, fd_limit: u64) -> usize {
    let fits = fd_limit.saturating_sub(worker_overhead_fds(config)).max(1) as usize;
    let wanted = config.connections_per_worker();
    if fits < wanted {
        let key = match config.handler {
            Handler::Thread => "threads_per_worker",
            Handler::Event => "worker_connections",
        };
        log::warn!(
            "RLIMIT_NOFILE {fd_limit} holds only {fits} connections per worker (after {} fds of the worker's own{}); \
             {key} = {wanted} is lowered to that (raise LimitNOFILE= or `ulimit -n`)",
            worker_overhead_fds(config),
            if config.handler == Handler::Event { ", 2 per event loop" } else { "" }
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
    check_memory(config, workers, capacity);
    if config.handler == Handler::Event {
        return; // a few threads, however many connections
    }
    if let Some(max) = read_number("/proc/sys/kernel/threads-max") {
        if total > max {
            log::warn!("{total} handler threads may be needed but kernel.threads-max is {max}");
        }
    }
    // Each handler thread costs a worker about four memory mappings (its
    // stack, the stack's guard page, its echo buffer, its share of the
    // allocator's arenas; a worker aborted near 17,500 threads with the
    // default 65,530): past
    // vm.max_map_count, thread creation fails and the worker aborts,
    // taking its connections with it.
    if let Some(max) = read_number("/proc/sys/vm/max_map_count") {
        let fits = (max.saturating_sub(MAPS_RESERVED) / MAPS_PER_THREAD) as usize;
        if capacity > fits {
            log::warn!(
                "threads_per_worker = {capacity} needs about {} memory mappings per worker, but vm.max_map_count \
                 is {max}: a worker fails past about {fits} connections (lower threads_per_worker, use handler = \
                 \"event\", or raise vm.max_map_count)",
                capacity as u64 * MAPS_PER_THREAD + MAPS_RESERVED
            );
        }
        if config.min_spare_threads.min(capacity) > fits {
            log::warn!(
                "min_spare_threads = {} cannot all start in one worker (vm.max_map_count {max} holds about {fits}): \
                 workers will fail at start",
                config.min_spare_threads
            );
        }
    }
}

/// Memory mappings per handler thread, and for the rest of a worker.
const MAPS_PER_THREAD: u64 = 4;
const MAPS_RESERVED: u64 = 1024;

/// Warns when echo buffers alone could outgrow the memory echod may use:
/// every connection's buffer resident at once (thread mode: one per thread;
/// event mode: one per loop plus one per stalled client).
fn check_memory(config: &Config, workers: usize, capacity: usize) {
    let per_worker = match config.handler {
        Handler::Thread => capacity as u64,
        Handler::Event => (config.event_threads + capacity) as u64,
    };
    let worst = workers as u64 * per_worker * config.buffer_size as u64;
    let Some((limit, what)) = memory_limit() else { return };
    if worst > limit {
        log::warn!(
            "echo buffers could take up to {} MiB ({workers} worker(s) x {per_worker} x buffer_size {}), more than \
             {what} ({} MiB); lower buffer_size or the connection limits",
            worst >> 20,
            config.buffer_size,
            limit >> 20
        );
    }
}

/// The memory this process may use: its cgroup's memory.max if set, else
/// the machine's RAM.
fn memory_limit() -> Option<(u64, &'static str)> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|c| {
        let path = c.lines().find_map(|l| l.strip_prefix("0::"))?.trim().to_string();
        read_number(&format!("/sys/fs/cgroup{path}/memory.max"))
    });
    if let Some(max) = cgroup {
        return Some((max, "the cgroup's memory.max"));
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim();
    Some((kb.parse::<u64>().ok()? * 1024, "the machine's RAM"))
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// #27.9: every fd a worker holds that is not a connection comes off
    /// the limit, including each event loop's epoll fd and waker.
    #[test]
    fn capacity_counts_the_event_loops_own_fds() {
        let mut c = Config { worker_connections: 10_000, threads_per_worker: 10_000, ..Config::default() };
        c.handler = Handler::Thread;
        assert_eq!(worker_capacity(&c, 200), 200 - 16);
        c.handler = Handler::Event;
        c.event_threads = 64;
        assert_eq!(worker_capacity(&c, 200), 200 - 16 - 128);
        assert_eq!(worker_capacity(&c, 100), 1, "never zero");
    }
}
