//! `echod`: the daemon's command line.
//!
//! Parses flags, loads and validates the config (exit 78 with file, line and
//! key on any error, before anything starts), then hands over to the master.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use echod::cli::EchodCli as Cli;
use echod::config::{Config, ConfigError, EX_CONFIG, Overrides, Workers};
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
    // The control command waits for the master, and must stay
    // interruptible: it installs none of the daemon's handlers.
    if let Some(command) = &cli.signal {
        return match load(&cli) {
            Ok((config, source)) => exit(echod::control::run(command, &config, source.as_deref())),
            Err(e) => {
                eprintln!("echod: config error: {e}");
                exit(EX_CONFIG)
            }
        };
    }
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
    logging::init(config.log_level.0, config.log_format);
    if cli.check_config {
        return check_config(&config, source.as_deref(), cli.quiet);
    }
    let master = match Master::new(config, source, overrides(&cli).unwrap_or_default(), signals) {
        Ok(m) => m,
        Err(e) => {
            log::error!("cannot start: {e}");
            return exit(exit_code(&e));
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

/// `--check-config`: the checks the start makes (see
/// `master::check_config`), their warnings on stderr as the start logs
/// them, then (unless `quiet`) the effective config on stdout; 0 when it
/// would start.
fn check_config(config: &Config, source: Option<&Path>, quiet: bool) -> ExitCode {
    use std::io::Write;
    let from = source.map_or("built-in defaults".into(), |p| p.display().to_string());
    match echod::master::check_config(config, source) {
        Ok(_) if quiet => ExitCode::SUCCESS,
        Ok(capacity) => {
            let text = format!(
                "# echod {}: configuration OK ({from}); up to {capacity} connections per worker under this \
                 process's RLIMIT_NOFILE\n{}",
                echod::cli::VERSION,
                config.to_toml()
            );
            // A closed stdout (`| head -1`) is the reader's choice, not a
            // failed check: the verdict is the exit status.
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("echod: config error: {e}");
            exit(exit_code(&e))
        }
    }
}

/// The documented exit status of a failed start (DESIGN §5).
fn exit_code(e: &StartError) -> i32 {
    match e {
        StartError::Config(_) => EX_CONFIG,
        StartError::Listen(_) => 1,
        StartError::Os(_) => 71, // EX_OSERR
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
            // As the file's `workers = "auto"`: --check-config prints it so.
            "auto" => Ok(Workers::Auto),
            n => n
                .parse::<usize>()
                .map(Workers::Count)
                .map_err(|_| ConfigError::flag("--workers", format!("`{n}` is not a number or `auto`"))),
        })
        .transpose()?;
    Ok(Overrides { listen, workers })
}

/// The config to run: `--config`, else the first of
/// `config::DEFAULT_PATHS` that exists, else built-in defaults; the flags
/// on top.
fn load(cli: &Cli) -> Result<(Config, Option<PathBuf>), ConfigError> {
    let overrides = overrides(cli)?;
    let path = cli.config.clone().or_else(echod::config::default_path);
    match path {
        Some(p) => Ok((Config::load(&p, &overrides)?, Some(p))),
        None => Ok((Config::builtin(&overrides)?, None)),
    }
}
