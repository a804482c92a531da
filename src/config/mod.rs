//! The configuration file: what each key means, its default, and how a bad
//! value is reported.
//!
//! The file is flat TOML (`key = value`, no tables), so an error can always
//! be pinned to one line and one key. A bad file never half-applies: parsing
//! and validation produce either a whole new [`Config`] or a [`ConfigError`]
//! naming the file, the line and the key, which the binary turns into exit
//! code 78 (EX_CONFIG) at start and into a log line (old config kept) on a
//! reload.

pub mod keys;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// sysexits.h EX_CONFIG: what every bad file, key, value or flag exits with.
pub const EX_CONFIG: i32 = 78;

/// Where echod looks when `--config` is not given, in order: the bundled
/// file relative to the working directory (so `cargo run` in a checkout
/// finds it), then the packaged file (so `echod --check-config` on a host
/// with the package checks the file the unit runs, as `nginx -t` does).
/// With neither, the built-in defaults.
pub const DEFAULT_PATHS: [&str; 2] = ["config/echod.toml", "/etc/echod/echod.toml"];

/// The config file echod uses without `--config` (see [`DEFAULT_PATHS`]).
pub fn default_path() -> Option<PathBuf> {
    DEFAULT_PATHS.iter().map(PathBuf::from).find(|p| p.exists())
}

/// Upper bound on worker processes. The scoreboard is sized from it before
/// the first fork, with room for a full set of replacements during a reload.
pub const MAX_WORKERS: usize = 256;

/// Everything a running echod can be told. Field docs say why a knob exists;
/// what operators read of each key (the bundled file's comments, the
/// README's table, the man page) comes from [`keys::KEYS`].
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Addresses to listen on (`IP:PORT`, IPv6 as `[::1]:7`). Port 0 picks a
    /// free port, which the master logs; tests use that to avoid races.
    pub listen: Vec<SocketAddr>,
    /// Length of the kernel accept queue. Overload waits here while every
    /// worker is full (capped by net.core.somaxconn).
    pub backlog: u32,
    /// Worker processes: "auto" (one per CPU) or a number.
    pub workers: Workers,
    /// How a worker serves its connections: "thread" (one thread per
    /// connection, the model echod is built on) or "event" (a few threads,
    /// each polling many connections). Both share the receiver, queue,
    /// counters, limits and drain; only what takes connections off the
    /// queue differs. Changing it on reload replaces the workers.
    pub handler: Handler,
    /// Thread mode: connections one worker serves at once, one thread each.
    /// Together with `workers` this is echod's capacity; beyond it the
    /// master stops accepting and new clients wait in the backlog.
    pub threads_per_worker: usize,
    /// Event mode: connections one worker serves at once (nginx's
    /// worker_connections). An idle connection costs a few hundred bytes
    /// here rather than a thread, so this is set far higher than
    /// `threads_per_worker`.
    pub worker_connections: usize,
    /// Event mode: polling threads per worker. One is nginx's choice and
    /// the most efficient; more spread one worker's connections over CPUs.
    pub event_threads: usize,
    /// Handler threads kept ready even when idle, so a burst of connections
    /// does not pay for thread creation.
    pub min_spare_threads: usize,
    /// An idle handler thread above `min_spare_threads` exits after this long.
    pub thread_idle_timeout: Seconds,
    /// Connections a worker may hold waiting for a thread. The receiver
    /// blocks when it is full, which backs pressure up to the master.
    pub queue_capacity: usize,
    /// Bytes read (and echoed) per system call: one buffer per thread.
    pub buffer_size: usize,
    /// Disable Nagle's algorithm so each echo leaves at once.
    pub tcp_nodelay: bool,
    /// What the echo does to the bytes: "none" (RFC 862) or "upper".
    pub transform: Transform,
    /// Graceful stop and reload: how long open connections may continue
    /// before they are closed.
    pub shutdown_timeout: Seconds,
    /// Graceful stop: how long /healthz answers 503 while the listeners
    /// still accept, before they close, so a load balancer's health check
    /// takes this backend out of rotation before connects are refused.
    /// 0 = close at once.
    pub shutdown_delay: Seconds,
    /// Default log level when RUST_LOG is not set.
    pub log_level: LogLevel,
    /// Lines as text for people or as JSON objects for machines.
    pub log_format: LogFormat,
    /// The connection log: a line per connection a worker ends.
    pub access_log: bool,
    /// Seconds between the master's summary log lines; 0 turns them off.
    pub stats_interval: Seconds,
    /// A connection from which nothing arrives for this long is closed, so
    /// idle and slowloris clients cannot hold threads forever; 0 = never.
    pub idle_timeout: Seconds,
    /// A connection whose client stops reading is closed when a write makes
    /// no progress for this long, so slow readers cannot pin memory and
    /// threads; 0 = never.
    pub write_timeout: Seconds,
    /// Connections echod holds at most; more are closed at once (counted as
    /// rejected). 0 = only the capacity limit (workers x threads_per_worker),
    /// beyond which clients wait in the backlog instead.
    pub max_connections: u64,
    /// Connections one client address may hold; more are closed at once.
    /// 0 = no limit.
    pub max_connections_per_ip: u32,
    /// Replace a worker after it has been given this many connections
    /// (Apache's MaxConnectionsPerChild, gunicorn's max_requests), to bound
    /// the effect of any slow leak; 0 = never.
    pub max_connections_per_worker: u64,
    /// Each worker's limit is raised by a random amount up to this, so
    /// workers started together do not all recycle at once.
    pub max_connections_per_worker_jitter: u64,
    /// Listeners whose clients arrive through a load balancer that sends
    /// the PROXY protocol header (v1 or v2): `true` (all), `false`, or a
    /// list of `listen` addresses and, under socket activation, systemd
    /// socket names (FileDescriptorName=). On those listeners the header's
    /// client address is the one limits, logs and counters see.
    pub proxy_protocol: ProxyProtocol,
    /// Sources (CIDR blocks or addresses) allowed to send a PROXY header:
    /// the balancers. A header is believed only from them; anyone else on a
    /// PROXY listener is refused unread, since their header could claim
    /// any address.
    pub proxy_trusted: Vec<CidrSetting>,
    /// How long a PROXY listener's connection may take to deliver its
    /// header before it is closed (counted as a `timeout` header error).
    pub proxy_timeout: Seconds,
    /// Where the master serves `GET /metrics` (Prometheus), `GET /healthz`
    /// and `GET /livez`; "" = off.
    #[serde(with = "optional_addr")]
    pub metrics_listen: Option<SocketAddr>,
    /// USR2 (binary upgrade) executes this file; "" = the path echod was
    /// started from (a package upgrade replaces the file there).
    pub upgrade_binary: String,
    /// USR2: how long the new master may take to report ready before the
    /// old one gives up on it, kills it and keeps serving.
    pub upgrade_timeout: Seconds,
    /// Where the main master writes its pid (and a draining old one its own,
    /// with `.oldbin`), for `echod --signal` and scripts; "" = none. An
    /// absolute path, so a relative one cannot name two files.
    pub pid_file: String,
    /// When started as root: the user to become after binding, in master and
    /// workers. Ignored when not started as root (systemd's DynamicUser= or
    /// User= already chose). "" = stay root, refused unless `allow_root`.
    pub user: String,
    /// The group to become; "" = the user's primary group.
    pub group: String,
    /// Allow running as root with `user = ""`. A worker that parses bytes
    /// from the whole internet should not be root; this is for containers
    /// whose "root" is already unprivileged.
    pub allow_root: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 7007))],
            backlog: 1024,
            workers: Workers::Auto,
            handler: Handler::Thread,
            threads_per_worker: 1024,
            worker_connections: 16384,
            event_threads: 1,
            min_spare_threads: 16,
            thread_idle_timeout: Seconds::from_secs(30),
            queue_capacity: 256,
            buffer_size: 16 * 1024,
            tcp_nodelay: true,
            transform: Transform::None,
            shutdown_timeout: Seconds::from_secs(30),
            shutdown_delay: Seconds::from_secs(0),
            log_level: LogLevel(log::LevelFilter::Info),
            log_format: LogFormat::Text,
            access_log: false,
            stats_interval: Seconds::from_secs(60),
            idle_timeout: Seconds::from_secs(300),
            write_timeout: Seconds::from_secs(60),
            max_connections: 0,
            max_connections_per_ip: 0,
            max_connections_per_worker: 0,
            max_connections_per_worker_jitter: 0,
            proxy_protocol: ProxyProtocol::Off,
            proxy_trusted: Vec::new(),
            proxy_timeout: Seconds::from_secs(5),
            metrics_listen: None,
            upgrade_binary: String::new(),
            upgrade_timeout: Seconds::from_secs(30),
            pid_file: String::new(),
            user: "nobody".to_string(),
            group: String::new(),
            allow_root: false,
        }
    }
}

/// Settings given on the command line; they beat the file, on every reload
/// too (as nginx's `-g`).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Vec<SocketAddr>,
    /// `--workers`: a count or `auto`, as the file's key.
    pub workers: Option<Workers>,
}

impl Config {
    /// Reads, parses and validates `path`, then applies `overrides`.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source: Source::File(path.to_path_buf()),
            line: None,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, Source::File(path.to_path_buf()), overrides)
    }

    /// Parses and validates a config text. `source` only labels errors.
    pub fn parse(text: &str, source: Source, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| line_number(text, span.start));
            ConfigError {
                key: line.and_then(|l| key_on_line(text, l)),
                line,
                source: source.clone(),
                message: e.message().trim().to_string(),
            }
        })?;
        config.validate().map_err(|(key, message)| {
            // A key left at its default can be wrong because of another one
            // that the file sets: name that one, where it is.
            let key = match line_of_key(text, key) {
                None => related_key(key).filter(|k| line_of_key(text, k).is_some()).unwrap_or(key),
                Some(_) => key,
            };
            ConfigError { line: line_of_key(text, key), key: Some(key.to_string()), source: source.clone(), message }
        })?;
        config.apply(overrides)?;
        Ok(config)
    }

    /// The built-in defaults plus the command-line overrides.
    pub fn builtin(overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        config.apply(overrides)?;
        Ok(config)
    }

    fn apply(&mut self, overrides: &Overrides) -> Result<(), ConfigError> {
        if !overrides.listen.is_empty() {
            self.listen = overrides.listen.clone();
        }
        if let Some(w) = overrides.workers {
            self.workers = w;
        }
        if overrides.listen.is_empty() && overrides.workers.is_none() {
            return Ok(()); // nothing changed since the file was validated
        }
        self.validate().map_err(|(key, message)| ConfigError {
            source: Source::CommandLine,
            line: None,
            key: Some(format!("--{}", key.replace('_', "-"))),
            message,
        })
    }

    /// Range and consistency checks the types cannot express. Returns the
    /// offending key and why.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        fn range<T: PartialOrd + fmt::Display>(
            key: &'static str,
            v: T,
            lo: T,
            hi: T,
        ) -> Result<(), (&'static str, String)> {
            if v < lo || v > hi {
                return Err((key, format!("must be between {lo} and {hi}, got {v}")));
            }
            Ok(())
        }
        self.validate_addresses()?;
        if let Workers::Count(n) = self.workers {
            range("workers", n, 1, MAX_WORKERS)?;
        }
        range("backlog", self.backlog, 1, 65535)?;
        range("threads_per_worker", self.threads_per_worker, 1, 65536)?;
        if self.min_spare_threads > self.threads_per_worker {
            return Err((
                "min_spare_threads",
                format!(
                    "must not exceed threads_per_worker ({}), got {}",
                    self.threads_per_worker, self.min_spare_threads
                ),
            ));
        }
        range("worker_connections", self.worker_connections, 1, 1 << 20)?;
        range("event_threads", self.event_threads, 1, 256)?;
        range("queue_capacity", self.queue_capacity, 1, 1 << 20)?;
        range("buffer_size", self.buffer_size, 512, 16 << 20)?;
        // Checked whoever runs the check: `--check-config` as an operator
        // must say what the daemon, started as root, would refuse.
        if !self.user.is_empty() {
            match crate::users::find_user(&self.user) {
                None => return Err(("user", format!("no such user `{}`", self.user))),
                Some(u) if u.uid.is_root() && !self.allow_root => {
                    return Err(("user", format!("`{}` is root: set allow_root = true to run as root", self.user)));
                }
                Some(_) => {}
            }
        }
        // Refused here, not at the privilege drop, so the message names the
        // file and line and nothing has been bound yet. Only for a root
        // process: under systemd (DynamicUser=) or any other user, `user`
        // is ignored and "" is fine.
        if self.user.is_empty() && !self.allow_root && nix::unistd::geteuid().is_root() {
            return Err((
                "user",
                "refusing to run as root with `user = \"\"`: set `user` (e.g. \"nobody\") or `allow_root = true`"
                    .into(),
            ));
        }
        if !self.group.is_empty() && crate::users::find_group(&self.group).is_none() {
            return Err(("group", format!("no such group `{}`", self.group)));
        }
        if self.upgrade_timeout.0.is_zero() {
            return Err(("upgrade_timeout", "must be more than 0: a new master needs time to start".into()));
        }
        self.validate_proxy()?;
        self.validate_upgrade_binary()?;
        if !self.pid_file.is_empty() && !Path::new(&self.pid_file).is_absolute() {
            return Err(("pid_file", format!("must be an absolute path, got `{}`", self.pid_file)));
        }
        if self.max_connections_per_worker == 0 && self.max_connections_per_worker_jitter > 0 {
            return Err((
                "max_connections_per_worker_jitter",
                "has no effect while max_connections_per_worker = 0".to_string(),
            ));
        }
        Ok(())
    }

    /// Addresses that would fail at bind, caught here with file and line: none
    /// at all; one listed twice (also with another IPv6 scope id); a wildcard
    /// and a specific address of the same family on one port (the kernel
    /// refuses the second bind); an IPv4-mapped IPv6 address (sockets are
    /// IPv6-only); and the metrics address on a port a listener covers.
    fn validate_addresses(&self) -> Result<(), (&'static str, String)> {
        if self.listen.is_empty() {
            return Err((
                "listen",
                "must list at least one address (under socket activation it is ignored, but must be set)".into(),
            ));
        }
        let mapped = |a: &SocketAddr| matches!(a, SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some());
        if let Some(a) = self.listen.iter().find(|a| mapped(a)) {
            return Err(("listen", format!("{a} is an IPv4-mapped address: write {}", v4_of(a))));
        }
        if let Some(m) = self.metrics_listen.filter(mapped) {
            return Err(("metrics_listen", format!("{m} is an IPv4-mapped address: write {}", v4_of(&m))));
        }
        for (i, a) in self.listen.iter().enumerate() {
            if let Some(b) = self.listen[..i].iter().find(|b| clash(a, b)) {
                let why = if a == b { "is listed twice".to_string() } else { format!("clashes with {b} (same port)") };
                return Err(("listen", format!("{a} {why}")));
            }
        }
        if let Some((m, b)) = self.metrics_listen.and_then(|m| Some((m, self.listen.iter().find(|b| clash(&m, b))?))) {
            return Err(("metrics_listen", format!("{m} clashes with {b} in `listen` (same port)")));
        }
        Ok(())
    }

    /// `upgrade_binary` is exec'd by the master on USR2, from whatever its
    /// working directory is then (`/` under systemd): a relative path would
    /// name another file than the operator meant, so it must be absolute,
    /// and it must be an executable file now, so `--check-config` and a
    /// reload catch a typo before the upgrade does.
    fn validate_upgrade_binary(&self) -> Result<(), (&'static str, String)> {
        use std::os::unix::fs::PermissionsExt;
        let b = &self.upgrade_binary;
        if b.is_empty() {
            return Ok(());
        }
        if !Path::new(b).is_absolute() {
            return Err(("upgrade_binary", format!("must be an absolute path, got `{b}`")));
        }
        match std::fs::metadata(b) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
            Ok(_) => Err(("upgrade_binary", format!("`{b}` is not an executable file"))),
            Err(e) => Err(("upgrade_binary", format!("`{b}`: {e}"))),
        }
    }

    fn validate_proxy(&self) -> Result<(), (&'static str, String)> {
        if let ProxyProtocol::Listeners(names) = &self.proxy_protocol {
            for (i, name) in names.iter().enumerate() {
                if names[..i].contains(name) {
                    return Err(("proxy_protocol", format!("`{name}` is listed twice")));
                }
                if name.is_empty() {
                    return Err(("proxy_protocol", "an empty name matches no listener".to_string()));
                }
                // An address must be one we listen on: a typo would
                // otherwise leave that listener without PROXY, echoing the
                // header and counting the balancer as the client.
                if let Ok(addr) = name.parse::<SocketAddr>() {
                    if !self.listen.contains(&addr) {
                        return Err(("proxy_protocol", format!("{addr} is not in `listen`")));
                    }
                }
            }
        }
        if self.proxy_protocol != ProxyProtocol::Off && self.proxy_trusted.is_empty() {
            return Err((
                "proxy_protocol",
                "is on but `proxy_trusted` is empty: list the balancers' addresses there (e.g. \
                 [\"10.0.0.0/8\"]); with none trusted every connection would be refused"
                    .to_string(),
            ));
        }
        if self.proxy_protocol != ProxyProtocol::Off && self.proxy_timeout.nonzero().is_none() {
            return Err(("proxy_timeout", "must be above 0: a header that never comes would hold a slot".to_string()));
        }
        Ok(())
    }

    /// `proxy_trusted` for a log line.
    pub fn proxy_trusted_list(&self) -> String {
        self.proxy_trusted.iter().map(|c| c.0.to_string()).collect::<Vec<_>>().join(", ")
    }

    /// Whether a PROXY header is trusted from `source`.
    pub fn proxy_trusts(&self, source: std::net::IpAddr) -> bool {
        self.proxy_trusted.iter().any(|c| c.0.contains(source))
    }

    /// Connections one worker may serve at once in the configured mode.
    pub fn connections_per_worker(&self) -> usize {
        match self.handler {
            Handler::Thread => self.threads_per_worker,
            Handler::Event => self.worker_connections,
        }
    }

    /// Worker processes to run, with "auto" resolved to the CPU count.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            Workers::Count(n) => n,
            Workers::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_WORKERS),
        }
    }

    /// The effective config as TOML, for `--check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Where a config came from, for error messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    File(PathBuf),
    CommandLine,
    /// No file: the built-in defaults (with the command line's overrides).
    Builtin,
}

/// A value refused by a check made outside the parser (the fd limit, what
/// `user` can reach): the key to blame and why. Whoever holds the file's
/// text turns it into a [`ConfigError`] with file and line
/// ([`Refusal::in_file`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub key: &'static str,
    pub why: String,
}

impl Refusal {
    pub fn new(key: &'static str, why: impl Into<String>) -> Refusal {
        Refusal { key, why: why.into() }
    }

    /// The error as an operator reads it: the file at `path` (whose `text`
    /// was read earlier) and the key's line in it; or, with no file, the
    /// key of the built-in defaults and the command line.
    pub fn in_file(self, path: Option<&Path>, text: &str) -> ConfigError {
        match path {
            Some(p) => ConfigError::at_key(p, text, self.key, self.why),
            None => {
                ConfigError { source: Source::Builtin, line: None, key: Some(self.key.to_string()), message: self.why }
            }
        }
    }
}

/// A config that cannot be used: which file (or the command line), which
/// line, which key, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub source: Source,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    /// An error about `key` in the file at `path` whose `text` was read
    /// earlier, at the key's line if the text names it.
    pub fn at_key(path: &Path, text: &str, key: &str, message: impl Into<String>) -> ConfigError {
        let line = line_of_key(text, key);
        ConfigError {
            source: Source::File(path.to_path_buf()),
            line,
            key: Some(key.to_string()),
            message: message.into(),
        }
    }

    /// An error about a command-line flag.
    pub fn flag(flag: &str, message: impl Into<String>) -> ConfigError {
        ConfigError { source: Source::CommandLine, line: None, key: Some(flag.to_string()), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::File(p) => write!(f, "{}", p.display())?,
            Source::CommandLine => write!(f, "command line")?,
            Source::Builtin => write!(f, "built-in defaults")?,
        }
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// 1-based line number of byte offset `at`.
fn line_number(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// Whether two addresses cannot both be bound: the same port (not 0), the
/// same family, and the same IP (scope ids aside) or one of them a wildcard.
fn clash(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The IPv4 form of an IPv4-mapped address, for the error message.
fn v4_of(a: &SocketAddr) -> String {
    match a {
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().map_or(a.to_string(), |ip| format!("{ip}:{}", a.port())),
        SocketAddr::V4(_) => a.to_string(),
    }
}

/// The key assigned on 1-based line `line`, if it is a `key = value` line.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let l = text.lines().nth(line - 1)?;
    let (key, _) = l.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('#')).then(|| key.to_string())
}

/// 1-based line where top-level `key` is assigned (the file is flat),
/// skipping lines inside multi-line strings, which may look like keys.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let mut in_string: Option<&str> = None;
    for (i, l) in text.lines().enumerate() {
        let starts_inside = in_string.is_some();
        for delim in ["\"\"\"", "'''"] {
            if in_string.is_none_or(|d| d == delim) && l.matches(delim).count() % 2 == 1 {
                in_string = if in_string.is_some() { None } else { Some(delim) };
            }
        }
        if !starts_inside && l.split_once('=').is_some_and(|(k, _)| k.trim().trim_matches('"') == key) {
            return Some(i + 1);
        }
    }
    None
}

/// The key whose value makes `key`'s (default) value invalid, for errors
/// about a key the file does not set.
fn related_key(key: &str) -> Option<&'static str> {
    Some(match key {
        "min_spare_threads" => "threads_per_worker",
        "metrics_listen" => "listen",
        "proxy_trusted" => "proxy_protocol",
        "max_connections_per_worker" => "max_connections_per_worker_jitter",
        "user" => "allow_root",
        _ => return None,
    })
}

/// `metrics_listen = "IP:PORT"`, with "" meaning off.
mod optional_addr {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.map(|a| a.to_string()).unwrap_or_default())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Ok(None);
        }
        s.parse().map(Some).map_err(|_| de::Error::invalid_value(de::Unexpected::Str(&s), &"\"IP:PORT\" or \"\" (off)"))
    }
}

/// `workers = "auto"` or a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    Auto,
    Count(usize),
}

impl Serialize for Workers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Workers::Auto => s.serialize_str("auto"),
            Workers::Count(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Workers;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "\"auto\" or a number of worker processes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Workers, E> {
                if v == "auto" { Ok(Workers::Auto) } else { Err(E::invalid_value(de::Unexpected::Str(v), &self)) }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Workers, E> {
                usize::try_from(v).map(Workers::Count).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Workers, E> {
                usize::try_from(v).map(Workers::Count).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// What takes connections off a worker's queue and serves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Handler {
    /// One thread per connection for its whole life (Apache's worker MPM).
    Thread,
    /// `event_threads` threads, each running a mio poll over many
    /// connections (nginx, Apache's event MPM).
    Event,
}

impl Handler {
    /// The name the config file uses.
    pub fn name(self) -> &'static str {
        match self {
            Handler::Thread => "thread",
            Handler::Event => "event",
        }
    }
}

/// `proxy_protocol = true | false | ["ADDRESS or socket name", ...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyProtocol {
    Off,
    All,
    /// Listeners named by configured or bound address, or by systemd name.
    Listeners(Vec<String>),
}

impl ProxyProtocol {
    /// Whether a listener expects the header. `configured`: the address in
    /// `listen` it was bound for; `bound`: its address; `name`: systemd's
    /// FileDescriptorName for activated sockets.
    pub fn covers(&self, configured: Option<SocketAddr>, bound: SocketAddr, name: Option<&str>) -> bool {
        match self {
            ProxyProtocol::Off => false,
            ProxyProtocol::All => true,
            ProxyProtocol::Listeners(list) => list.iter().any(|entry| match entry.parse::<SocketAddr>() {
                Ok(a) => configured == Some(a) || bound == a,
                Err(_) => name == Some(entry.as_str()),
            }),
        }
    }
}

impl Serialize for ProxyProtocol {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ProxyProtocol::Off => s.serialize_bool(false),
            ProxyProtocol::All => s.serialize_bool(true),
            ProxyProtocol::Listeners(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ProxyProtocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ProxyProtocol;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "true, false, or a list of listen addresses and socket names")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ProxyProtocol, E> {
                Ok(if v { ProxyProtocol::All } else { ProxyProtocol::Off })
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<ProxyProtocol, A::Error> {
                let mut list = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    list.push(s);
                }
                Ok(if list.is_empty() { ProxyProtocol::Off } else { ProxyProtocol::Listeners(list) })
            }
        }
        d.deserialize_any(V)
    }
}

/// One `proxy_trusted` entry: `"10.0.0.0/8"`, `"::1/128"` or an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrSetting(pub proxy_protocol::Cidr);

impl Serialize for CidrSetting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for CidrSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(CidrSetting).map_err(de::Error::custom)
    }
}

/// What the echo does to the bytes it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transform {
    /// RFC 862: every byte back unchanged.
    None,
    /// ASCII letters upper-cased, every other byte unchanged (the classic
    /// teaching server); still binary-safe and length-preserving.
    Upper,
}

/// How log lines are written (`logging`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `TIME LEVEL [who] message key=value...`, for people.
    Text,
    /// One JSON object per line, the same facts as fields, for machines.
    Json,
}

/// A log level name as RUST_LOG spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLevel(pub log::LevelFilter);

impl Serialize for LogLevel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.as_str().to_ascii_lowercase())
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(LogLevel).map_err(|_| {
            de::Error::invalid_value(de::Unexpected::Str(&s), &"one of off, error, warn, info, debug, trace")
        })
    }
}

/// A duration written as seconds (`30`, `0.25`). Zero means "off" where a
/// key says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seconds(pub Duration);

impl Seconds {
    pub const fn from_secs(s: u64) -> Seconds {
        Seconds(Duration::from_secs(s))
    }
    /// `None` when zero (the "off" value).
    pub fn nonzero(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.as_secs_f64())
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.subsec_nanos() == 0 {
            s.serialize_u64(self.0.as_secs())
        } else {
            s.serialize_f64(self.0.as_secs_f64())
        }
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        /// A day: longer than any sane timeout, short enough to catch typos
        /// like 3000000.
        const MAX: f64 = 86_400.0;
        /// A millisecond: the finest any timeout is kept to.
        const MIN: f64 = 0.001;
        impl Visitor<'_> for V {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "0 (off) or a number of seconds from {MIN} to {MAX}")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Seconds, E> {
                // Below a millisecond (but not 0) would round to "off" in
                // the tick-based timeouts: refuse what cannot mean itself.
                if !(0.0..=MAX).contains(&v) || (v > 0.0 && v < MIN) {
                    return Err(E::invalid_value(de::Unexpected::Float(v), &self));
                }
                Ok(Seconds(Duration::from_secs_f64(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seconds, E> {
                if !(0..=MAX as i64).contains(&v) {
                    return Err(E::invalid_value(de::Unexpected::Signed(v), &self));
                }
                Ok(Seconds(Duration::from_secs(v as u64)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seconds, E> {
                match i64::try_from(v) {
                    Ok(v) => self.visit_i64(v),
                    Err(_) => Err(E::invalid_value(de::Unexpected::Unsigned(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Source::File("t.toml".into()), &Overrides::default())
    }

    #[test]
    fn the_bundled_file_documents_every_key_at_its_default() {
        let text = include_str!("../../config/echod.toml");
        assert_eq!(parse(text).unwrap(), Config::default());
        for line in Config::default().to_toml().lines() {
            let key = line.split('=').next().unwrap_or("").trim();
            assert!(line_of_key(text, key).is_some(), "config/echod.toml does not list `{key}`");
        }
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn values_parse() {
        let c = parse("workers = 3\nshutdown_timeout = 0.5\ntransform = \"upper\"\nlisten = [\"[::1]:9\", \"127.0.0.1:0\"]\nlog_level = \"debug\"").unwrap();
        assert_eq!(c.workers, Workers::Count(3));
        assert_eq!(c.shutdown_timeout.0, Duration::from_millis(500));
        assert_eq!(c.transform, Transform::Upper);
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.log_level.0, log::LevelFilter::Debug);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = parse("workers = 2\n\nwrokers = 3\n").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("wrokers")), "{e}");
        assert!(e.to_string().starts_with("t.toml:3: key `wrokers`"), "{e}");
    }

    #[test]
    fn wrong_type_names_line_and_key() {
        let e = parse("# c\nbacklog = \"big\"\n").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("backlog")), "{e}");
    }

    #[test]
    fn out_of_range_names_line_and_key() {
        let e = parse("transform = \"none\"\nworkers = 0\n").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("workers")), "{e}");
        let e = parse("shutdown_timeout = -1\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("shutdown_timeout"), "{e}");
        let e = parse("threads_per_worker = 4\nmin_spare_threads = 8\n").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("min_spare_threads")), "{e}");
    }

    #[test]
    fn syntax_error_has_a_line() {
        let e = parse("workers = 2\nlisten = [\n").unwrap_err();
        assert!(e.line.is_some(), "{e}");
    }

    #[test]
    fn overrides_beat_the_file_and_are_validated() {
        let o = Overrides { listen: vec!["127.0.0.1:1".parse().unwrap()], workers: Some(Workers::Count(2)) };
        let c = Config::parse("workers = 5", Source::CommandLine, &o).unwrap();
        assert_eq!((c.worker_count(), c.listen.clone()), (2, o.listen.clone()));
        let bad = Overrides { workers: Some(Workers::Count(0)), ..Overrides::default() };
        let e = Config::builtin(&bad).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("--workers"));
    }

    #[test]
    fn proxy_protocol_settings() {
        let c = parse("proxy_protocol = true\nproxy_trusted = [\"10.0.0.0/8\", \"::1\"]").unwrap();
        assert_eq!(c.proxy_protocol, ProxyProtocol::All);
        assert!(c.proxy_trusts("10.9.9.9".parse().unwrap()) && c.proxy_trusts("::1".parse().unwrap()));
        assert!(!c.proxy_trusts("127.0.0.1".parse().unwrap()));
        assert_eq!(parse(&c.to_toml()).unwrap(), c);

        let text = "listen = [\"127.0.0.1:7\", \"127.0.0.1:8\"]\nproxy_protocol = [\"127.0.0.1:8\", \"lb\"]\nproxy_trusted = [\"127.0.0.1\"]";
        let c = parse(text).unwrap();
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(c.proxy_protocol.covers(Some(a("127.0.0.1:8")), a("127.0.0.1:8"), None));
        assert!(!c.proxy_protocol.covers(Some(a("127.0.0.1:7")), a("127.0.0.1:7"), None));
        assert!(c.proxy_protocol.covers(None, a("0.0.0.0:9"), Some("lb")));
        assert!(!c.proxy_protocol.covers(None, a("0.0.0.0:9"), Some("echo")));
        assert_eq!(parse(&c.to_toml()).unwrap(), c);

        let e = parse("workers = 1\nproxy_protocol = true\n").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("proxy_protocol")), "{e}");
        let e = parse("proxy_trusted = [\"1.2.3.4\"]\nproxy_protocol = [\"127.0.0.1:9\"]").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("proxy_protocol")), "{e}");
        assert!(e.message.contains("not in `listen`"), "{e}");
        let e = parse("workers = 1\nproxy_trusted = [\"10.0.0.0/40\"]").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("proxy_trusted")), "{e}");
        let e = parse("proxy_protocol = \"yes\"").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("proxy_protocol"), "{e}");
    }

    #[test]
    fn rendered_config_parses_back() {
        let c = parse("workers = 3\nthread_idle_timeout = 2.5").unwrap();
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        let c = parse("metrics_listen = \"127.0.0.1:9707\"").unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9707".parse().unwrap()));
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        let e = parse("metrics_listen = \"nope\"").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("metrics_listen"));
    }
}
