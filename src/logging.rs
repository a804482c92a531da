//! Log lines that say who wrote them.
//!
//! Every line carries the process role (`master`, `worker-2`) and, inside a
//! worker, the thread (`receiver`, `conn`), because a prefork daemon's log is
//! interleaved from many processes on one stderr. Under systemd (stderr is
//! the journal stream named by JOURNAL_STREAM) lines carry a syslog priority
//! prefix (`<3>` .. `<7>`) instead of our own timestamp, so journald keeps
//! the level and adds its own time.

use std::io::Write;
use std::sync::RwLock;

use log::{Level, LevelFilter};

/// This process's role; rewritten in a worker right after fork.
static ROLE: RwLock<String> = RwLock::new(String::new());

/// Names the process in every later log line (e.g. `worker-2`).
pub fn set_role(role: &str) {
    if let Ok(mut r) = ROLE.write() {
        *r = role.to_string();
    }
}

/// Whether RUST_LOG decides the level (then the config's `log_level` does not).
fn rust_log_set() -> bool {
    std::env::var_os("RUST_LOG").is_some_and(|v| !v.is_empty())
}

/// Installs the logger. `level` applies unless RUST_LOG is set.
pub fn init(level: LevelFilter) {
    // With the pid: during a binary upgrade two masters write to one log.
    set_role(&format!("master {}", std::process::id()));
    let journal = stderr_is_journal();
    let mut builder = env_logger::Builder::new();
    if rust_log_set() {
        builder.parse_env("RUST_LOG");
    } else {
        // Let the global max level do the filtering so a reload can change it.
        builder.filter_level(LevelFilter::Trace);
    }
    builder.format(move |buf, record| {
        let role = ROLE.read().map(|r| r.clone()).unwrap_or_default();
        let thread = std::thread::current();
        let who = match thread.name() {
            Some(name) if name != "main" => format!("{role} {name}"),
            _ => role,
        };
        if journal {
            writeln!(buf, "<{}>[{who}] {}", syslog_priority(record.level()), record.args())
        } else {
            writeln!(buf, "{} {:<5} [{who}] {}", buf.timestamp_millis(), record.level(), record.args())
        }
    });
    builder.write_style(if journal { env_logger::WriteStyle::Never } else { env_logger::WriteStyle::Auto });
    if builder.try_init().is_ok() && !rust_log_set() {
        log::set_max_level(level);
    }
}

/// Applies a reloaded `log_level` (ignored when RUST_LOG is set).
pub fn set_level(level: LevelFilter) {
    if !rust_log_set() {
        log::set_max_level(level);
    }
}

fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// True when stderr is the journal stream systemd set up for us: JOURNAL_STREAM
/// holds `device:inode` of that stream, and it must match fd 2 (it is
/// inherited by children whose stderr may have been redirected elsewhere).
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}
