//! `echod`: the daemon's command line.
//!
//! Parses flags, loads and validates the config (exit 78 with file, line and
//! key on any error, before anything starts), then hands over to the master.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use echod::cli::EchodCli as Cli;
use echod::config::{Config, ConfigError, DEFAULT_PATH, EX_CONFIG, Overrides};
use echod::logging;
use echod::master::{Master, StartError};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::{DisplayHelp, DisplayVersion};
            let _ = e.print();
            return if matches!(e.kind(), DisplayHelp | DisplayVersion) { ExitCode::SUCCESS } else { exit(EX_CONFIG) };
        }
    };
    // Before the config is read: see signals::install.
    let signals = match echod::master::signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("echod: cannot install signal handlers: {e}");
            return exit(71);
        }
    };
    let (config, source) = match load(&cli) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("echod: config error: {e}");
            return exit(EX_CONFIG);
        }
    };
    if cli.check_config {
        let from = source.as_deref().map_or("built-in defaults".into(), |p: &Path| p.display().to_string());
        println!("# echod {}: configuration OK ({from})\n{}", echod::cli::VERSION, config.to_toml());
        return ExitCode::SUCCESS;
    }
    logging::init(config.log_level.0);
    let master = match Master::new(config, source, overrides(&cli).unwrap_or_default(), signals) {
        Ok(m) => m,
        Err(e) => {
            log::error!("cannot start: {e}");
            return exit(match e {
                StartError::Config(_) => EX_CONFIG,
                StartError::Listen(_) => 1,
                StartError::Os(_) => 71, // EX_OSERR
            });
        }
    };
    match master.run() {
        Ok(code) => exit(code),
        Err(e) => {
            log::error!("master loop failed: {e}");
            exit(1)
        }
    }
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// The flags that override the file, validated one by one.
fn overrides(cli: &Cli) -> Result<Overrides, ConfigError> {
    let listen = cli
        .listen
        .iter()
        .map(|a| {
            a.parse::<SocketAddr>()
                .map_err(|_| ConfigError::flag("--listen", format!("`{a}` is not IP:PORT (IPv6 as [::1]:7)")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let workers = cli
        .workers
        .as_deref()
        .map(|w| match w {
            "auto" => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
            n => n.parse::<usize>().map_err(|_| ConfigError::flag("--workers", format!("`{n}` is not a number"))),
        })
        .transpose()?;
    Ok(Overrides { listen, workers })
}

/// The config to run: `--config`, else the bundled file if present, else
/// built-in defaults; the flags on top.
fn load(cli: &Cli) -> Result<(Config, Option<PathBuf>), ConfigError> {
    let overrides = overrides(cli)?;
    let path = cli.config.clone().or_else(|| Path::new(DEFAULT_PATH).exists().then(|| DEFAULT_PATH.into()));
    match path {
        Some(p) => Ok((Config::load(&p, &overrides)?, Some(p))),
        None => Ok((Config::builtin(&overrides)?, None)),
    }
}
