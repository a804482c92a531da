//! Log lines that say who wrote them, as text or as JSON.
//!
//! Every line carries the process (`master 1234`; `worker-2 1236 g3`: slot,
//! pid and config generation, since a slot is reused by the next generation
//! and, during a binary upgrade's drain, by the other master's workers) and,
//! inside a worker, the thread (`conn`, `event-0`; none for the receiver), because a
//! prefork daemon's log is interleaved from many processes on one stderr.
//! `log_format = "json"` writes each line as one JSON object with the same
//! facts as fields. Under systemd (stderr is the journal stream named by
//! JOURNAL_STREAM) lines carry a syslog priority prefix (`<3>` .. `<7>`)
//! instead of our own timestamp, so journald keeps the level and adds its
//! own time (a JSON line keeps its `ts`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use log::{Level, LevelFilter};

use crate::config::LogFormat;

/// `log_format = "json"` is in force; a reload may change it.
static JSON: AtomicBool = AtomicBool::new(false);
/// stderr is the journal's stream (decided once, at `init`).
static JOURNAL: AtomicBool = AtomicBool::new(false);
/// The worker slot this process serves, or `NOT_A_WORKER` in a master;
/// set in a worker right after fork.
static SLOT: AtomicUsize = AtomicUsize::new(NOT_A_WORKER);
const NOT_A_WORKER: usize = usize::MAX;
/// The config generation: a worker's is the one it was forked with; the
/// master's follows its reloads.
static GENERATION: AtomicU64 = AtomicU64::new(1);

/// Makes every later line of this process a worker's (after fork).
pub fn set_worker(slot: usize, generation: u64) {
    SLOT.store(slot, Ordering::Relaxed);
    GENERATION.store(generation, Ordering::Relaxed);
}

/// The master's config generation after an applied reload.
pub fn set_generation(generation: u64) {
    GENERATION.store(generation, Ordering::Relaxed);
}

/// Applies a (reloaded) `log_format`.
pub fn set_format(format: LogFormat) {
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
}

/// Whether RUST_LOG decides the level (then the config's `log_level` does not).
fn rust_log_set() -> bool {
    std::env::var_os("RUST_LOG").is_some_and(|v| !v.is_empty())
}

/// Installs the logger. `level` applies unless RUST_LOG is set.
pub fn init(level: LevelFilter, format: LogFormat) {
    JOURNAL.store(stderr_is_journal(), Ordering::Relaxed);
    set_format(format);
    let mut builder = env_logger::Builder::new();
    if rust_log_set() {
        builder.parse_env("RUST_LOG");
    } else {
        // Let the global max level do the filtering so a reload can change it.
        builder.filter_level(LevelFilter::Trace);
    }
    builder.format(|buf, record| buf.write_all(line(record.level(), &record.args().to_string(), &[]).as_bytes()));
    builder.write_style(env_logger::WriteStyle::Never);
    if builder.try_init().is_ok() && !rust_log_set() {
        log::set_max_level(level);
    }
}

/// A field's value in a line: text (quoted in JSON, and in text where it
/// holds a space) or a number.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Text(&'a str),
    Int(u64),
    /// Rendered with millisecond precision (durations, seconds).
    Secs(f64),
}

/// One whole log line, newline included, as the logger writes it: the
/// logger's own lines (`fields` empty) and the connection log's.
pub fn line(level: Level, message: &str, fields: &[(&str, Value)]) -> String {
    let journal = JOURNAL.load(Ordering::Relaxed);
    let mut out = String::with_capacity(128 + message.len() + 24 * fields.len());
    if journal {
        let _ = write!(out, "<{}>", syslog_priority(level));
    }
    let pid = std::process::id();
    let slot = SLOT.load(Ordering::Relaxed);
    let generation = GENERATION.load(Ordering::Relaxed);
    let thread = std::thread::current();
    let thread = thread.name().filter(|n| *n != "main");
    if JSON.load(Ordering::Relaxed) {
        let _ = write!(out, "{{\"ts\":\"{}\",\"level\":\"{}\",\"pid\":{pid}", timestamp(), level_name(level));
        if slot == NOT_A_WORKER {
            out.push_str(",\"role\":\"master\"");
        } else {
            let _ = write!(out, ",\"role\":\"worker\",\"worker\":{slot}");
        }
        let _ = write!(out, ",\"generation\":{generation}");
        if let Some(name) = thread {
            out.push_str(",\"thread\":");
            json_string(&mut out, name);
        }
        out.push_str(",\"msg\":");
        json_string(&mut out, message);
        for (key, value) in fields {
            out.push(',');
            json_string(&mut out, key);
            out.push(':');
            match value {
                Value::Text(t) => json_string(&mut out, t),
                Value::Int(n) => {
                    let _ = write!(out, "{n}");
                }
                Value::Secs(s) => {
                    let _ = write!(out, "{s:.3}");
                }
            }
        }
        out.push_str("}\n");
        return out;
    }
    if !journal {
        let _ = write!(out, "{} {:<5} ", timestamp(), level);
    }
    if slot == NOT_A_WORKER {
        let _ = write!(out, "[master {pid}");
    } else {
        let _ = write!(out, "[worker-{slot} {pid} g{generation}");
    }
    if let Some(name) = thread {
        let _ = write!(out, " {name}");
    }
    let _ = write!(out, "] {message}");
    for (key, value) in fields {
        let _ = match value {
            Value::Text(t) if t.is_empty() || t.contains([' ', '"']) => write!(out, " {key}={t:?}"),
            Value::Text(t) => write!(out, " {key}={t}"),
            Value::Int(n) => write!(out, " {key}={n}"),
            Value::Secs(s) => write!(out, " {key}={s:.3}"),
        };
    }
    out.push('\n');
    out
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Error => "error",
        Level::Warn => "warn",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    }
}

/// `s` as a JSON string: quoted, with `"`, `\\` and control characters
/// escaped (a message may quote a client's bytes).
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Now as RFC 3339 UTC with milliseconds (`2026-12-03T11:41:56.638Z`).
fn timestamp() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    rfc3339(now.as_secs(), now.subsec_millis())
}

fn rfc3339(secs: u64, millis: u32) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z", rem / 3600, rem / 60 % 60, rem % 60)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_796_298_116, 638), "2026-12-03T11:41:56.638Z");
    }

    #[test]
    fn json_strings_escape_what_json_requires() {
        let mut out = String::new();
        json_string(&mut out, "a\"b\\c\nd\u{1}é");
        assert_eq!(out, r#""a\"b\\c\nd\u0001é""#);
    }
}
