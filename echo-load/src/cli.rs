//! The command line of `echo-load`, as clap definitions.
//!
//! It lives in the library rather than in the binary so that the man page
//! and shell completions (echod's `examples/dist-assets.rs`, run when the
//! Debian package is built) are generated from the very same definitions.

use clap::Parser;

/// The version `echo-load --version` prints: the crate version and the git
/// commit it was built from (see build.rs).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("ECHOD_GIT_COMMIT"), ")");

/// What `echo-load --help` (and its man page) adds after the flags: where
/// every message goes and what the exit status says (`crate::exit`).
const ECHO_LOAD_AFTER_HELP: &str = "\
Every measured message is accounted for: requests = responses + timeouts + lost + unanswered.
A timeout counts each message that waited longer than --timeout; lost ones were on the wire when
their connection failed or came back wrong; unanswered ones had no echo when the run ended. In
open loop (--rate) latency counts from when each message was due, messages due while a connection
is down are sent late and measured from their due time, and 'send lateness' says how late the
client itself was.

Exit status:
  0  clean: every measured message echoed intact, no errors
  1  mismatch: an echo differed from what was sent, or bytes nobody sent arrived
  2  bad usage: a flag out of range or an address that does not resolve
  3  errors: timeouts, resets, failed connects, lost or unanswered messages, or no response
  4  client behind: with --rate, over 1% of the due messages were not sent by the end
  130  interrupted (Ctrl-C, TERM) during the ramp-up or warm-up: nothing was measured
When several apply, the first of these wins: 1 (a wrong byte), then 4 (a run whose client could
not keep its schedule: its errors describe the client), then 3 (errors). With --interactive: 0
the session ended, 3 a connection error (the echoes are printed, not judged). Ctrl-C
during the measurement prints the partial result, and the exit status is that result's.";

/// Load-test an echo server: throughput, latency percentiles, every byte
/// verified.
#[derive(Parser, Debug)]
#[command(name = "echo-load", version = VERSION, long_about = None, after_help = ECHO_LOAD_AFTER_HELP)]
pub struct EchoLoadCli {
    /// Server address, HOST:PORT; repeat it to load a fleet (connections are
    /// spread over the addresses, figures reported per address)
    #[arg(short, long, value_name = "HOST:PORT", required = true)]
    pub addr: Vec<String>,
    /// Concurrent connections
    #[arg(short, long, default_value_t = 50, value_name = "N")]
    pub connections: usize,
    /// Seconds to measure (after --warmup)
    #[arg(short, long, default_value_t = 10.0, value_name = "SECS")]
    pub duration: f64,
    /// Send exactly this many measured messages instead of running for
    /// --duration (stopped if nothing is answered for --timeout)
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Bytes per message
    #[arg(short, long, default_value_t = 64, value_name = "BYTES")]
    pub size: usize,
    /// Messages in flight per connection (closed loop only)
    #[arg(short, long, default_value_t = 1, value_name = "K", conflicts_with_all = ["rate", "churn"])]
    pub pipeline: usize,
    /// Open loop: total messages per second on a fixed schedule, starting
    /// when the ramp-up ends; latency is measured from the scheduled send
    /// time; a message not sent by the end is unsent, and a schedule the
    /// client cannot keep is reported (exit 4)
    #[arg(short, long, value_name = "MSGS_PER_SEC")]
    pub rate: Option<f64>,
    /// Each connection: connect, one round trip, close, again
    #[arg(long, conflicts_with = "rate")]
    pub churn: bool,
    /// Payloads are lines ending in '\n' (for line-based servers such as
    /// Apache mod_echo)
    #[arg(long)]
    pub lines: bool,
    /// Start every connection with a PROXY protocol header (v1 or v2)
    /// naming the connection's own address, as HAProxy's send-proxy would:
    /// to load an echod `proxy_protocol` listener without a balancer
    #[arg(long, value_name = "VERSION", value_parser = ["v1", "v2"])]
    pub proxy: Option<String>,
    /// Event-loop threads [default: CPU count]
    #[arg(short, long, value_name = "N")]
    pub threads: Option<usize>,
    /// Seconds of load before measuring starts
    #[arg(short, long, default_value_t = 0.0, value_name = "SECS")]
    pub warmup: f64,
    /// Seconds over which connections are opened, before the warm-up and
    /// the measurement (not part of --duration) [default: 1 s per 5000]
    #[arg(long, value_name = "SECS")]
    pub ramp_up: Option<f64>,
    /// A message not echoed within this many seconds is a timeout (each
    /// one counts; its connection is reopened). After the run, echoes are
    /// awaited for this long or 1 s, whichever is shorter
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub timeout: f64,
    /// Print one JSON object (stdout) instead of the summary table
    #[arg(long)]
    pub json: bool,
    /// Plain client: send stdin lines, print the echoes
    #[arg(short, long)]
    pub interactive: bool,
}
