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
  config/echod.toml      without --config: used if it exists (relative to the working directory)
  /etc/echod/echod.toml  without --config, when there is no config/echod.toml: the packaged config
                         (so `echod --check-config` checks the file the unit runs)

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
    /// Config file [default: ./config/echod.toml, else /etc/echod/echod.toml, else built-in defaults]
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on, IP:PORT (repeatable; replaces the file's `listen`)
    #[arg(short, long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Worker processes, a number or `auto` (one per CPU available to echod; replaces the file's `workers`)
    #[arg(short, long, value_name = "N|auto", value_hint = clap::ValueHint::Other)]
    pub workers: Option<String>,
    /// Check the config as a start would (limits, the drop to `user`, what `user` can read; warnings on
    /// stderr), print the effective config and exit (0 valid, 78 invalid)
    #[arg(long)]
    pub check_config: bool,
    /// With --check-config: print nothing when the config is valid (errors and warnings still go to
    /// stderr), as `systemctl reload` runs it
    #[arg(short, long, requires = "check_config")]
    pub quiet: bool,
    /// Signal the running master, found through the config's `pid_file`, and wait for the result (stop,
    /// quit: until it exited; upgrade: until a new master took over; reload: checks the file first)
    #[arg(short, long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(crate::master::signals::commands()), conflicts_with = "check_config")]
    pub signal: Option<String>,
}
