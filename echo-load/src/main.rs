//! `echo-load`: the load-test harness for echo servers (and a plain
//! interactive client).
//!
//! Exit status (`echo_load::exit`): 0 clean; 1 an echo differed; 2 bad
//! usage; 3 errors (timeouts, resets, lost or unanswered messages, nothing
//! came back); 4 the client could not send at the offered `--rate`; 130
//! interrupted before anything was measured (during the ramp-up or
//! warm-up). Interrupted during the measurement: the partial result's.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use echo_load::cli::EchoLoadCli as Cli;
use echo_load::{self as load, Options, Shared, report};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut addrs = Vec::with_capacity(cli.addr.len());
    for a in &cli.addr {
        match resolve(a) {
            Ok(r) => addrs.push(r),
            Err(e) => return usage(&format!("--addr {a}: {e}")),
        }
    }
    if cli.interactive {
        let addr = addrs[0];
        return match interactive(addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // A refused or broken connection is an error (3), not a
                // wrong echo (1).
                eprintln!("echo-load: {addr}: {e}");
                ExitCode::from(3)
            }
        };
    }
    let opts = match options(&cli, addrs) {
        Ok(o) => o,
        Err(e) => return usage(&e),
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, interrupted.clone());
    }
    let shared = Arc::new(Shared::default());
    let bar = progress_bar(&opts);
    let outcome = load::run(&opts, &shared, |measured| {
        let secs = measured.as_secs_f64().max(1e-9);
        let rsp = shared.responses.load(Ordering::Relaxed);
        bar.set_position(match opts.count {
            Some(_) => rsp,
            None => measured.as_millis() as u64,
        });
        bar.set_message(format!(
            "{}/s  errors {}  mismatches {}",
            report::group((rsp as f64 / secs) as u64),
            shared.errors.load(Ordering::Relaxed),
            shared.mismatches.load(Ordering::Relaxed)
        ));
        !interrupted.load(Ordering::Relaxed)
    });
    bar.finish_and_clear();
    if cli.json {
        println!("{}", report::json(&outcome, &opts));
    } else {
        print!("{}", report::summary(&outcome, &opts));
    }
    ExitCode::from(outcome.exit_code())
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("echo-load: {msg}");
    ExitCode::from(load::exit::USAGE)
}

fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    addr.to_socket_addrs()?.next().ok_or_else(|| std::io::Error::other("no address"))
}

/// The longest time any duration flag may ask for: a year. Longer is a
/// typo, and would overflow the clock.
const MAX_SECS: f64 = 365.0 * 86_400.0;
/// The highest `--rate`: past this one client measures only itself.
const MAX_RATE: f64 = 100_000_000.0;
/// The lowest `--rate`: one message per 1,000 s.
const MIN_RATE: f64 = 0.001;
/// The most connections and the largest message: past these the client runs
/// out of memory or descriptors before the server is tested.
const MAX_CONNECTIONS: usize = 1_000_000;
const MAX_SIZE: usize = 64 << 20;

/// Checks the flags and turns them into [`Options`]; every refusal names
/// the flag and the accepted range (exit 2, never a panic).
fn options(cli: &Cli, addrs: Vec<SocketAddr>) -> Result<Options, String> {
    let secs = |name: &str, v: f64| match Duration::try_from_secs_f64(v) {
        Ok(d) if v <= MAX_SECS => Ok(d),
        _ => Err(format!("{name} {v}: must be between 0 and {MAX_SECS} seconds")),
    };
    let at_least_one = |name: &str, v: u64| if v == 0 { Err(format!("{name} must be at least 1")) } else { Ok(()) };
    at_least_one("--connections", cli.connections as u64)?;
    at_least_one("--size", cli.size as u64)?;
    at_least_one("--pipeline", cli.pipeline as u64)?;
    if let Some(t) = cli.threads {
        at_least_one("--threads", t as u64)?;
    }
    if let Some(c) = cli.count {
        at_least_one("--count", c)?;
    }
    if cli.connections > MAX_CONNECTIONS {
        return Err(format!("--connections {}: at most {MAX_CONNECTIONS}", cli.connections));
    }
    if cli.size > MAX_SIZE {
        return Err(format!("--size {}: at most {MAX_SIZE} bytes", cli.size));
    }
    if let Some(r) = cli.rate {
        if !(MIN_RATE..=MAX_RATE).contains(&r) {
            return Err(format!("--rate {r}: must be between {MIN_RATE} and {MAX_RATE} messages per second"));
        }
    }
    let timeout = secs("--timeout", cli.timeout)?;
    if timeout.is_zero() {
        return Err("--timeout must be more than 0".into());
    }
    let threads = cli.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    if addrs.is_empty() {
        return Err("--addr is required".into());
    }
    Ok(Options {
        addrs,
        connections: cli.connections,
        duration: if cli.count.is_some() { None } else { Some(secs("--duration", cli.duration)?) },
        count: cli.count,
        size: cli.size,
        pipeline: cli.pipeline,
        rate: cli.rate,
        churn: cli.churn,
        lines: cli.lines,
        proxy: match cli.proxy.as_deref() {
            Some("v1") => Some(proxy_protocol::Version::V1),
            Some(_) => Some(proxy_protocol::Version::V2),
            None => None,
        },
        threads: threads.min(cli.connections),
        warmup: secs("--warmup", cli.warmup)?,
        ramp_up: match cli.ramp_up {
            Some(r) => secs("--ramp-up", r)?,
            None => Duration::from_secs_f64(cli.connections as f64 / 5000.0),
        },
        timeout,
    })
}

/// A live bar on a terminal; hidden otherwise (indicatif draws nothing
/// when stderr is not a TTY).
fn progress_bar(opts: &Options) -> ProgressBar {
    let len = match (opts.count, opts.duration) {
        (Some(c), _) => c,
        (None, Some(d)) => d.as_millis() as u64,
        (None, None) => 0,
    };
    let bar = if std::io::stderr().is_terminal() { ProgressBar::new(len) } else { ProgressBar::hidden() };
    let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// The classic echo client: each stdin line goes out, and what comes back
/// is printed, not judged (a server may transform it: `transform = "upper"`).
fn interactive(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = s.try_clone()?;
    eprintln!("connected to {addr}; type lines (Ctrl-D ends)");
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line? + "\n";
        s.write_all(line.as_bytes())?;
        let mut echo = vec![0u8; line.len()];
        reader.read_exact(&mut echo)?;
        let mut out = stdout.lock();
        out.write_all(&echo)?;
        out.flush()?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest)?;
    stdout.lock().write_all(&rest)?;
    Ok(())
}
