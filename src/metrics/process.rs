//! The standard process metrics (`process_cpu_seconds_total` and the four
//! others every Prometheus client library exports) of the master and of
//! each worker, read from /proc.
//!
//! The master reads `/proc/PID/stat`, `status` and `limits` of itself and
//! of every worker at each scrape: those files are world-readable, even for
//! a worker that changed uid. The one number it cannot read is a worker's
//! count of open fds: a process that changed uid is not dumpable, so its
//! `/proc/PID/fd` belongs to root. Each worker therefore counts its own on
//! its tick ([`count_open_fds`], published in its scoreboard slot), and the
//! master counts its own at the scrape.

use std::sync::OnceLock;

/// The clock ticks of `/proc/PID/stat`: USER_HZ, 100 on every Linux ABI
/// (the kernel converts to it whatever its own HZ), as Prometheus' procfs
/// library assumes too.
const USER_HZ: f64 = 100.0;

/// One process's figures at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub resident_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft RLIMIT_NOFILE: the most fds it may open.
    pub max_fds: u64,
    /// Unix time the process started, seconds.
    pub start_time: f64,
}

/// Whose sample it is, which becomes its labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Master,
    /// A worker, by slot (the `worker` label of the `echod_worker_*` series).
    Worker(usize),
}

impl Role {
    /// The sample's labels, without braces.
    pub fn labels(self) -> String {
        match self {
            Role::Master => "role=\"master\"".to_string(),
            Role::Worker(id) => format!("role=\"worker\",worker=\"{id}\""),
        }
    }
}

/// Reads process `pid`'s figures; `open_fds` is counted by the caller (see
/// the module's header). None if the process is gone or /proc is not
/// Linux's.
pub fn read(pid: u32, open_fds: u64) -> Option<Sample> {
    let proc = format!("/proc/{pid}");
    let (cpu_ticks, start_ticks) = parse_stat(&std::fs::read_to_string(format!("{proc}/stat")).ok()?)?;
    let resident_kib = parse_status_rss(&std::fs::read_to_string(format!("{proc}/status")).ok()?)?;
    let max_fds = parse_limits_nofile(&std::fs::read_to_string(format!("{proc}/limits")).ok()?)?;
    Some(Sample {
        cpu_seconds: cpu_ticks as f64 / USER_HZ,
        resident_bytes: resident_kib * 1024,
        open_fds,
        max_fds,
        start_time: boot_time()? + start_ticks as f64 / USER_HZ,
    })
}

/// The calling process's open fds (the entries of `/proc/self/fd`, less the
/// one this count opens). 0 if /proc cannot be read.
pub fn count_open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1) as u64)
}

/// `/proc/PID/stat` split into the command name (field 2) and the fields
/// after it (field 3, the state, first). The name is in parentheses and
/// may hold spaces and parentheses itself (`echod: worker 0`), so it ends
/// at the last `)`.
pub fn split_stat(text: &str) -> Option<(&str, Vec<&str>)> {
    let (open, close) = (text.find(" (")?, text.rfind(')')?);
    Some((text.get(open + 2..close)?, text.get(close + 1..)?.split_whitespace().collect()))
}

/// (utime + stime, starttime) in clock ticks from `/proc/PID/stat`.
fn parse_stat(text: &str) -> Option<(u64, u64)> {
    let (_, fields) = split_stat(text)?;
    // utime is field 14, stime 15, starttime 22; `fields` starts at 3.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)? + field(15)?, field(22)?))
}

/// `VmRSS` of `/proc/PID/status`, KiB (0 for a process without memory, a
/// zombie, whose line is missing).
fn parse_status_rss(text: &str) -> Option<u64> {
    match text.lines().find_map(|l| l.strip_prefix("VmRSS:")) {
        Some(rest) => rest.split_whitespace().next()?.parse().ok(),
        None => Some(0),
    }
}

/// The soft limit of `Max open files` in `/proc/PID/limits`.
fn parse_limits_nofile(text: &str) -> Option<u64> {
    let rest = text.lines().find_map(|l| l.strip_prefix("Max open files"))?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Unix time the machine booted (`btime` of /proc/stat), read once.
fn boot_time() -> Option<f64> {
    static BOOT: OnceLock<Option<f64>> = OnceLock::new();
    *BOOT.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        text.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (echod: worker (0)) S 1 4242 4242 0 -1 4194560 300 0 0 0 \
                    150 25 0 0 20 0 3 0 98765 12345678 500 18446744073709551615";
        assert_eq!(parse_stat(line), Some((175, 98765)));
        assert_eq!(parse_stat("12 (x) S 1 2"), None, "a short line is not a sample");
        assert_eq!(
            split_stat("4242 (echod: worker (0)) S 1").map(|(n, f)| (n, f[0])),
            Some(("echod: worker (0)", "S"))
        );
    }

    #[test]
    fn rss_and_the_fd_limit_are_read_from_their_lines() {
        assert_eq!(parse_status_rss("Name:\techod\nVmPeak:\t 9 kB\nVmRSS:\t    5120 kB\n"), Some(5120));
        assert_eq!(parse_status_rss("Name:\techod\nState:\tZ (zombie)\n"), Some(0));
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95000                95000                processes \n\
                      Max open files            1024                 20000                files     \n";
        assert_eq!(parse_limits_nofile(limits), Some(1024));
    }

    /// This process, read as the master reads a worker: the figures are its
    /// own (the fd limit getrlimit reports, a start in the recent past, a
    /// resident size, CPU that grows with work).
    #[test]
    fn this_process_reads_as_itself() {
        let me = std::process::id();
        let fds = count_open_fds();
        let before = read(me, fds).expect("/proc/self");
        let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(before.max_fds, soft);
        assert!(before.resident_bytes > 1 << 20, "{before:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(before.start_time <= now + 1.0 && before.start_time > now - 3600.0, "{before:?} at {now}");
        assert!(fds >= 3, "stdin, stdout, stderr at least: {fds}");
        // Work until the CPU time shows it (bounded; no fixed sleep: on a
        // loaded machine the spin may get little of the CPU).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut x = 0u64;
        let after = loop {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            let now = read(me, fds).unwrap();
            if now.cpu_seconds >= before.cpu_seconds + 0.05 || std::time::Instant::now() > deadline {
                break now;
            }
        };
        assert!(after.cpu_seconds >= before.cpu_seconds + 0.05, "{before:?} -> {after:?}");
    }
}
