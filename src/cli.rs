//! The command line of `echod`, as clap definitions.
//!
//! It lives in the library rather than in the binary so that the man page
//! and shell completions (`examples/dist-assets.rs`, run when the Debian
//! package is built) are generated from the very same definitions.

use std::path::PathBuf;

use clap::Parser;

/// The version `echod --version` prints: the crate version and the git
/// commit it was built from (see build.rs).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("ECHOD_GIT_COMMIT"), ")");

/// What `echod --help` (and the man page) adds after the flags: the signals
/// an operator sends (from the master's own table), the files, and the exit
/// codes.
fn echod_after_help() -> String {
    format!(
        "{}
Files:
  /etc/echod/echod.toml  the packaged config (every key documented in place)
  config/echod.toml      used when --config is not given and it exists

Exit status: 0 after a stop; 78 for a bad config or flag (the message names file, line and
key); 1 when a listen address cannot be bound; 71 for other start-up failures.",
        crate::master::signals::help_text()
    )
}

/// TCP echo server daemon (RFC 862): a master process dispatching
/// connections to a prefork pool of threaded workers.
#[derive(Parser, Debug)]
#[command(name = "echod", version = VERSION, about, long_about = None, after_long_help = echod_after_help())]
pub struct EchodCli {
    /// Config file [default: config/echod.toml if present, else built-in defaults]
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on, IP:PORT (repeatable; replaces the file's `listen`)
    #[arg(short, long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Worker processes, a number or `auto` (one per CPU; replaces the file's `workers`)
    #[arg(short, long, value_name = "N|auto")]
    pub workers: Option<String>,
    /// Validate the config, print the effective config and exit (0 valid, 78 invalid)
    #[arg(long)]
    pub check_config: bool,
}
