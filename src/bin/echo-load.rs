//! `echo-load`: the load-test harness for echo servers (and a plain
//! interactive client).
//!
//! Exit status: 0 when the run completed with responses and no mismatch;
//! 1 when any echoed byte differed or nothing came back; 2 for bad usage.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use echod::load::{self, Options, Shared, report};

/// Load-test an echo server: throughput, latency percentiles, every byte
/// verified.
#[derive(Parser, Debug)]
#[command(name = "echo-load", version, about, long_about = None)]
struct Cli {
    /// Server address, HOST:PORT
    #[arg(short, long, value_name = "HOST:PORT")]
    addr: String,
    /// Concurrent connections
    #[arg(short, long, default_value_t = 50, value_name = "N")]
    connections: usize,
    /// Seconds to measure (after --warmup)
    #[arg(short, long, default_value_t = 10.0, value_name = "SECS")]
    duration: f64,
    /// Stop after this many responses instead of after --duration
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Bytes per message
    #[arg(short, long, default_value_t = 64, value_name = "BYTES")]
    size: usize,
    /// Messages in flight per connection (closed loop)
    #[arg(short, long, default_value_t = 1, value_name = "K")]
    pipeline: usize,
    /// Open loop: total messages per second on a fixed schedule; latency is
    /// measured from the scheduled send time
    #[arg(short, long, value_name = "MSGS_PER_SEC")]
    rate: Option<f64>,
    /// Each connection: connect, one round trip, close, again
    #[arg(long)]
    churn: bool,
    /// Payloads are lines ending in '\n' (for line-based servers such as
    /// Apache mod_echo)
    #[arg(long)]
    lines: bool,
    /// Event-loop threads [default: CPU count]
    #[arg(short, long, value_name = "N")]
    threads: Option<usize>,
    /// Seconds of load before measuring starts
    #[arg(short, long, default_value_t = 0.0, value_name = "SECS")]
    warmup: f64,
    /// Seconds over which connections are opened [default: 1 s per 5000]
    #[arg(long, value_name = "SECS")]
    ramp_up: Option<f64>,
    /// A message not echoed within this many seconds is a timeout
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    timeout: f64,
    /// Print one JSON object (stdout) instead of the summary table
    #[arg(long)]
    json: bool,
    /// Plain client: send stdin lines, print the echoes
    #[arg(short, long)]
    interactive: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let addr = match resolve(&cli.addr) {
        Ok(a) => a,
        Err(e) => return usage(&format!("--addr {}: {e}", cli.addr)),
    };
    if cli.interactive {
        return match interactive(addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("echo-load: {addr}: {e}");
                ExitCode::from(1)
            }
        };
    }
    let opts = match options(&cli, addr) {
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
    if outcome.counts.mismatches > 0 || outcome.counts.responses == 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("echo-load: {msg}");
    ExitCode::from(2)
}

fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    addr.to_socket_addrs()?.next().ok_or_else(|| std::io::Error::other("no address"))
}

fn options(cli: &Cli, addr: SocketAddr) -> Result<Options, String> {
    let secs = |name: &str, v: f64| {
        if v.is_finite() && v >= 0.0 { Ok(Duration::from_secs_f64(v)) } else { Err(format!("{name} must be >= 0")) }
    };
    if cli.connections == 0 || cli.size == 0 || cli.pipeline == 0 {
        return Err("--connections, --size and --pipeline must be at least 1".into());
    }
    if cli.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err("--rate must be a positive number".into());
    }
    if cli.churn && cli.rate.is_some() {
        return Err("--churn and --rate do not combine".into());
    }
    let threads = cli.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    Ok(Options {
        addr,
        connections: cli.connections,
        duration: if cli.count.is_some() { None } else { Some(secs("--duration", cli.duration)?) },
        count: cli.count,
        size: cli.size,
        pipeline: cli.pipeline,
        rate: cli.rate,
        churn: cli.churn,
        lines: cli.lines,
        threads: threads.min(cli.connections),
        warmup: secs("--warmup", cli.warmup)?,
        ramp_up: match cli.ramp_up {
            Some(r) => secs("--ramp-up", r)?,
            None => Duration::from_secs_f64(cli.connections as f64 / 5000.0),
        },
        timeout: secs("--timeout", cli.timeout)?,
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

/// The classic echo client: each stdin line goes out, its echo is printed.
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
