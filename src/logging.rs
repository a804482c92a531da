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

/// This process's pid, read once per process (a syscall per line adds up
/// in a busy connection log).
static PID: AtomicU64 = AtomicU64::new(0);

fn pid() -> u64 {
    match PID.load(Ordering::Relaxed) {
        0 => {
            let pid = u64::from(std::process::id());
            PID.store(pid, Ordering::Relaxed);
            pid
        }
        pid => pid,
    }
}

/// Makes every later line of this process a worker's (after fork).
pub fn set_worker(slot: usize, generation: u64) {
    PID.store(u64::from(std::process::id()), Ordering::Relaxed);
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
/// holds a space), a number, an address or a duration.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Text(&'a str),
    Int(u64),
    /// `-` in text and `null` in JSON when None.
    Addr(Option<std::net::SocketAddr>),
    /// Seconds with millisecond precision.
    Duration(std::time::Duration),
}

/// One whole log line, newline included, as the logger writes it: the
/// logger's own lines (`fields` empty) and the connection log's.
pub fn line(level: Level, message: &str, fields: &[(&str, Value)]) -> String {
    let journal = JOURNAL.load(Ordering::Relaxed);
    let mut out = String::with_capacity(128 + message.len() + 24 * fields.len());
    if journal {
        let _ = write!(out, "<{}>", syslog_priority(level));
    }
    let pid = pid();
    let slot = SLOT.load(Ordering::Relaxed);
    let generation = GENERATION.load(Ordering::Relaxed);
    let thread = std::thread::current();
    let thread = thread.name().filter(|n| *n != "main");
    if JSON.load(Ordering::Relaxed) {
        out.push_str("{\"ts\":\"");
        push_timestamp(&mut out);
        let _ = write!(out, "\",\"level\":\"{}\",\"pid\":{pid}", level_name(level));
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
                Value::Int(n) => push_u64(&mut out, *n),
                Value::Addr(Some(a)) => {
                    out.push('"');
                    push_addr(&mut out, a);
                    out.push('"');
                }
                Value::Addr(None) => out.push_str("null"),
                Value::Duration(d) => push_millis(&mut out, *d),
            }
        }
        out.push_str("}\n");
        return out;
    }
    if !journal {
        push_timestamp(&mut out);
        out.push_str(match level {
            Level::Error => " ERROR ",
            Level::Warn => " WARN  ",
            Level::Info => " INFO  ",
            Level::Debug => " DEBUG ",
            Level::Trace => " TRACE ",
        });
    }
    // Written piece by piece, not with `write!`: the connection log
    // formats a line per connection, and core::fmt was most of its cost.
    if slot == NOT_A_WORKER {
        out.push_str("[master ");
        push_u64(&mut out, pid);
    } else {
        out.push_str("[worker-");
        push_u64(&mut out, slot as u64);
        out.push(' ');
        push_u64(&mut out, pid);
        out.push_str(" g");
        push_u64(&mut out, generation);
    }
    if let Some(name) = thread {
        out.push(' ');
        out.push_str(name);
    }
    out.push_str("] ");
    out.push_str(message);
    for (key, value) in fields {
        out.push(' ');
        out.push_str(key);
        out.push('=');
        match value {
            Value::Text(t) if t.is_empty() || t.contains([' ', '"']) => {
                let _ = write!(out, "{t:?}");
            }
            Value::Text(t) => out.push_str(t),
            Value::Int(n) => push_u64(&mut out, *n),
            Value::Addr(Some(a)) => push_addr(&mut out, a),
            Value::Addr(None) => out.push('-'),
            Value::Duration(d) => push_millis(&mut out, *d),
        }
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
///
/// The date and time to the second are formatted once a second per thread
/// (a busy connection log writes thousands of lines a second).
fn push_timestamp(out: &mut String) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != secs {
            *text = rfc3339(secs, 0);
            text.truncate(text.len() - ".000Z".len());
            *cached = secs;
        }
        out.push_str(text);
    });
    let _ = write!(out, ".{:03}Z", now.subsec_millis());
}

/// `d` as seconds with three decimals, without float formatting.
fn push_millis(out: &mut String, d: std::time::Duration) {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    push_u64(out, ms / 1000);
    out.push('.');
    let frac = ms % 1000;
    out.push(char::from(b'0' + (frac / 100) as u8));
    out.push(char::from(b'0' + (frac / 10 % 10) as u8));
    out.push(char::from(b'0' + (frac % 10) as u8));
}

/// `n` in decimal.
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    out.push_str(std::str::from_utf8(&digits[i..]).unwrap_or("?"));
}

/// `a` as `SocketAddr`'s Display writes it (IPv4 by hand, the common case).
fn push_addr(out: &mut String, a: &std::net::SocketAddr) {
    match a {
        std::net::SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_u64(out, u64::from(octet));
            }
            out.push(':');
            push_u64(out, u64::from(v4.port()));
        }
        v6 => {
            let _ = write!(out, "{v6}");
        }
    }
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
        let mut now = String::new();
        push_timestamp(&mut now);
        push_timestamp(&mut now);
        assert_eq!(now.len(), 2 * "2026-12-03T11:41:56.638Z".len(), "{now}");
        assert!(now.ends_with('Z') && now.as_bytes()[10] == b'T', "{now}");
    }

    #[test]
    fn numbers_and_addresses_are_written_as_display_writes_them() {
        for n in [0, 7, 10, 65535, u64::MAX] {
            let mut out = String::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string());
        }
        for a in ["127.0.0.1:7007", "0.0.0.0:0", "255.255.255.255:65535", "[2001:db8::7]:5555", "[::1]:1"] {
            let a: std::net::SocketAddr = a.parse().unwrap();
            let mut out = String::new();
            push_addr(&mut out, &a);
            assert_eq!(out, a.to_string());
        }
        let mut out = String::new();
        push_millis(&mut out, std::time::Duration::from_micros(61_234_567));
        assert_eq!(out, "61.234");
    }

    #[test]
    fn json_strings_escape_what_json_requires() {
        let mut out = String::new();
        json_string(&mut out, "a\"b\\c\nd\u{1}é");
        assert_eq!(out, r#""a\"b\\c\nd\u0001é""#);
    }
}
