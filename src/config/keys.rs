//! Every configuration key as an operator meets it: name, default, what it
//! does, and what a reload does with a change. The one definition that the
//! bundled `config/echod.toml` and the README's key table (`cargo run
//! --example gen-docs`) and the echod.toml(5) page (`examples/dist-assets.rs`,
//! when the package is built) are generated from; a test fails
//! when a committed copy differs from what [`render_toml`] and
//! [`render_table`] write, or when this list and [`super::Config`] disagree
//! on a key, its order or its default.

/// What a reload (HUP) does with a changed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The master applies it at once.
    Now,
    /// The master applies it to its listeners at once (binds what is new,
    /// closes what was removed, sets the options again); connections
    /// already open are untouched.
    Rebind,
    /// The workers a reload starts have it; they replace the running ones
    /// one by one, and connections open on an old worker keep the old value
    /// until it has drained.
    NewWorkers,
    /// Fixed at start: a reload logs that it takes effect only on a restart.
    Restart,
}

impl Reload {
    /// A few words for the README's table.
    pub fn short(self) -> &'static str {
        match self {
            Reload::Now => "at once",
            Reload::Rebind => "listeners, at once",
            Reload::NewWorkers => "new workers",
            Reload::Restart => "restart only",
        }
    }

    /// A sentence for the file's comments and the man page.
    pub fn sentence(self) -> &'static str {
        match self {
            Reload::Now => "A reload applies a change at once.",
            Reload::Rebind => {
                "A reload applies a change to the listeners at once (new addresses bound, removed ones closed, \
                 options set again); open connections are untouched."
            }
            Reload::NewWorkers => {
                "A reload applies a change through new workers, which replace the running ones one by one."
            }
            Reload::Restart => "A reload cannot apply a change (it says so in the log): restart echod.",
        }
    }
}

/// One key of the file.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// The key, as written in the file.
    pub name: &'static str,
    /// Its default, as TOML: what `--check-config` prints for an empty file.
    pub default: &'static str,
    /// What it does, its range and what 0 or "" means: one paragraph, plain
    /// text with `code` in backticks.
    pub doc: &'static str,
    pub reload: Reload,
}

const fn key(name: &'static str, default: &'static str, reload: Reload, doc: &'static str) -> Key {
    Key { name, default, doc, reload }
}

/// Every key, in the order of [`super::Config`]'s fields.
pub const KEYS: &[Key] = &[
    key(
        "listen",
        r#"["127.0.0.1:7007"]"#,
        Reload::Rebind,
        "Addresses to listen on, `IP:PORT`, at least one; IPv6 as `[::1]:7007`. Port 0 takes any free port (the \
         chosen one is logged). IPv6 sockets are v6-only, so an IPv4-mapped address is refused: write the IPv4 one. \
         `--listen` on the command line replaces this, on every reload too; under socket activation the sockets \
         come from systemd and this is ignored.",
    ),
    key(
        "backlog",
        "1024",
        Reload::Rebind,
        "Length of the kernel's accept queue: while every worker is full, new clients wait here (capped by \
         `net.core.somaxconn`).",
    ),
    key(
        "workers",
        r#""auto""#,
        Reload::Now,
        "Worker processes: `\"auto\"` (one per CPU available to echod) or a number from 1 to 256. TTIN and TTOU \
         change the count until a reload changes this key.",
    ),
    key(
        "handler",
        r#""thread""#,
        Reload::NewWorkers,
        "How a worker serves connections. `\"thread\"`: each connection has a thread of its own for its whole \
         life (Apache's worker MPM): isolated, plain blocking I/O, a thread wake-up per message. `\"event\"`: \
         `event_threads` loops per worker each poll many connections (nginx): the fastest, and an idle \
         connection costs almost nothing; choose it for many or mostly idle clients. Both obey every limit and \
         timeout below.",
    ),
    key(
        "threads_per_worker",
        "1024",
        Reload::NewWorkers,
        "Thread mode: connections one worker serves at once, one thread each. `workers` x this is the capacity, \
         beyond which the master stops accepting and new clients wait in the backlog. Raised by a reload past \
         its value at start, it is held there (with a warning) until a restart or an upgrade: the per-address \
         tables are sized at start.",
    ),
    key(
        "worker_connections",
        "16384",
        Reload::NewWorkers,
        "Event mode: connections one worker serves at once (nginx's name); `workers` x this is the capacity. \
         Lowered to fit RLIMIT_NOFILE, with a warning; held at its value at start like `threads_per_worker`.",
    ),
    key(
        "event_threads",
        "1",
        Reload::NewWorkers,
        "Event mode: polling threads per worker. One is the most efficient; `workers = \"auto\"` already gives a \
         worker per CPU. Each costs two fds (its epoll and its waker), counted in the capacity.",
    ),
    key(
        "min_spare_threads",
        "16",
        Reload::NewWorkers,
        "Thread mode: idle handler threads kept ready for a burst, on top of the busy ones (Apache's \
         MinSpareThreads; at most `threads_per_worker` in all).",
    ),
    key(
        "thread_idle_timeout",
        "30",
        Reload::NewWorkers,
        "Seconds after which an idle handler thread exits while more than `min_spare_threads` other threads are \
         idle (0 = never).",
    ),
    key(
        "queue_capacity",
        "256",
        Reload::NewWorkers,
        "Connections a worker may hold between its receiver and its handlers, waiting for a free thread or loop; \
         when it is full the receiver waits, which backs pressure up to the master.",
    ),
    key(
        "buffer_size",
        "16384",
        Reload::NewWorkers,
        "Bytes read and echoed per system call, 512 to 16 MiB: one buffer per thread (event mode: one per loop, \
         plus up to this much for a client that does not read its echo).",
    ),
    key(
        "tcp_nodelay",
        "true",
        Reload::Rebind,
        "Send each echo at once (disable Nagle's algorithm on every connection).",
    ),
    key(
        "transform",
        r#""none""#,
        Reload::NewWorkers,
        "`\"none\"`: bytes come back unchanged (RFC 862). `\"upper\"`: ASCII letters come back upper-cased, every \
         other byte unchanged.",
    ),
    key(
        "shutdown_timeout",
        "30",
        Reload::Now,
        "Seconds open connections may go on after a graceful stop (TERM), a reload or a scale-down begins \
         draining them; the rest are then closed. 0 = close them at once (as a fast stop does).",
    ),
    key(
        "shutdown_delay",
        "0",
        Reload::Now,
        "Graceful stop behind a load balancer: for this many seconds `/healthz` answers 503 while the listeners \
         still accept; only then do they close. Set it above the balancer's check interval x fall count plus one \
         check (HAProxy `inter 1s fall 2`: more than 2; `deploy/haproxy` uses 5). 0 = close at once.",
    ),
    key(
        "log_level",
        r#""info""#,
        Reload::Now,
        "Log level: `off`, `error`, `warn`, `info`, `debug` or `trace`. `RUST_LOG`, when set, wins.",
    ),
    key(
        "log_format",
        r#""text""#,
        Reload::Now,
        "`text` (`TIME LEVEL [who] message`) or `json`: one object per line with `ts`, `level`, `pid`, `role`, \
         `worker` (a worker's slot), `generation`, `thread`, `msg` and the line's own fields.",
    ),
    key(
        "access_log",
        "false",
        Reload::NewWorkers,
        "One line per connection a worker closed or refused (the connection log): `listener`, `client` (the PROXY \
         source, else the peer), `peer`, `duration`, `bytes_in`, `bytes_out` and `reason` (`closed`, `cut`, \
         `reset`, `idle_timeout`, `write_timeout`, `error`, `limit`, `proxy_KIND`), in `log_format`. Written by a \
         thread of its own: a line the log cannot take at once is dropped and counted \
         (`echod_access_log_dropped_total`), never waited for.",
    ),
    key("stats_interval", "60", Reload::Now, "Seconds between summary lines in the log, as USR1 prints (0 = off)."),
    key(
        "idle_timeout",
        "300",
        Reload::NewWorkers,
        "Seconds after which a connection that sends nothing is closed, so idle and slowloris clients cannot hold \
         a slot for ever (checked four times a second; 0 = never).",
    ),
    key(
        "write_timeout",
        "60",
        Reload::NewWorkers,
        "Seconds after which a connection whose client stops reading is closed, once its echo has made no \
         progress for that long: no byte taken by the kernel since the socket last had room (nginx's \
         `send_timeout`; the same in both modes; 0 = never).",
    ),
    key(
        "max_connections",
        "0",
        Reload::Now,
        "Connections echod holds at most; more are closed right after accept, counted in \
         `echod_connections_rejected_total` and logged at most every 5 s. 0 = no limit but the capacity, past \
         which clients wait in the backlog instead.",
    ),
    key(
        "max_connections_per_ip",
        "0",
        Reload::Now,
        "Connections one client address may hold; more are closed right after accept and counted as rejected \
         (0 = no limit). Addresses count exactly (an IPv4-mapped IPv6 address as its IPv4 one), so no client can \
         use up another's budget. On a PROXY listener the address is the client the header names, and the \
         workers check it (so there a change applies through new workers). During a binary upgrade's drain \
         each generation counts its own.",
    ),
    key(
        "max_connections_per_worker",
        "0",
        Reload::NewWorkers,
        "Replace a worker after it was given this many connections, to bound any slow leak (Apache's \
         MaxConnectionsPerChild, gunicorn's max_requests); the replacement starts first, then the old worker \
         drains. 0 = never.",
    ),
    key(
        "max_connections_per_worker_jitter",
        "0",
        Reload::NewWorkers,
        "Add a random 0 to N to each worker's `max_connections_per_worker`, so workers started together do not \
         all recycle at once.",
    ),
    key(
        "proxy_protocol",
        "false",
        Reload::Rebind,
        "Listeners whose clients send a PROXY protocol header (v1 or v2, HAProxy's `send-proxy` / \
         `send-proxy-v2`) first: `true` (all), `false`, or a list of `listen` addresses and, under socket \
         activation, socket names (`FileDescriptorName=`), e.g. `[\"10.0.0.5:7\", \"proxied\"]`. There the \
         header's client address is what the limits, the logs and the counters see; a missing, malformed or \
         late header closes the connection (`echod_proxy_header_errors_total`).",
    ),
    key(
        "proxy_trusted",
        "[]",
        Reload::NewWorkers,
        "Who may send a PROXY header: CIDR blocks or addresses of the balancers, e.g. `[\"10.0.0.0/24\", \
         \"::1\"]`. Required when `proxy_protocol` is on; any other peer of a PROXY listener is refused unread \
         (`kind=\"untrusted\"`), since its header could claim any address.",
    ),
    key(
        "proxy_timeout",
        "5",
        Reload::NewWorkers,
        "Seconds a PROXY listener's connection has to deliver its header (more than 0).",
    ),
    key(
        "metrics_listen",
        r#""""#,
        Reload::Rebind,
        "Serve Prometheus metrics (`GET /metrics`), readiness (`GET /healthz`: 200 while serving, 503 while \
         stopping or with no worker up) and liveness (`GET /livez`: 200 whenever the master answers) on this \
         address, from the master, e.g. `\"127.0.0.1:9707\"`. Not on a port a `listen` address covers. `\"\"` = \
         off.",
    ),
    key(
        "upgrade_binary",
        r#""""#,
        Reload::Now,
        "The file USR2 starts as the new master, which takes over the listening sockets; `\"\"` = the path echod \
         was started from. An absolute path to a file `user` can execute (checked at load and on reload).",
    ),
    key(
        "upgrade_timeout",
        "30",
        Reload::Now,
        "Seconds the new master of a USR2 upgrade has to become ready; past it the old master kills it and serves \
         on (more than 0).",
    ),
    key(
        "pid_file",
        r#""""#,
        Reload::Restart,
        "Where the master that serves writes its pid, as nginx's `pid`, for `echod --signal` and scripts; while \
         an upgrade's old master drains, its pid is in this path plus `.oldbin`. Each master removes what names it \
         when it exits. An absolute path in a directory `user` can write (checked at start: the new master of an \
         upgrade writes it too); `\"\"` = none. The package sets `/run/echod/echod.pid`.",
    ),
    key(
        "user",
        r#""nobody""#,
        Reload::Restart,
        "Started as root: the user the master and every worker become right after binding the listeners (the \
         master keeps only CAP_NET_BIND_SERVICE). `\"\"` or a uid-0 user is refused unless `allow_root`. Ignored \
         when not started as root (e.g. under systemd with `DynamicUser=`).",
    ),
    key("group", r#""""#, Reload::Restart, "Started as root: the group to become; `\"\"` = the user's primary group."),
    key(
        "allow_root",
        "false",
        Reload::Restart,
        "Allow staying root when `user = \"\"` or a user with uid 0. Off, because a process that reads bytes from \
         the whole internet should not be root.",
    ),
];

/// The bundled `config/echod.toml`: every key with its default, under its
/// documentation.
pub fn render_toml() -> String {
    let mut out = String::from(
        "# echod configuration: every key, with its default value.\n\
         # Generated from src/config/keys.rs by `cargo run --example gen-docs`; edit there.\n\
         # Durations are seconds (fractions allowed, 0.001 at the finest). Reload with\n\
         # `systemctl reload echod` or `kill -HUP <master pid>`: a bad file is reported\n\
         # and the running configuration is kept.\n",
    );
    for k in KEYS {
        out.push('\n');
        for line in wrap(&format!("{} {}", k.doc.replace('`', ""), k.reload.sentence()), 78) {
            out.push_str(&format!("# {line}\n").replace("# \n", "#\n"));
        }
        out.push_str(&format!("{} = {}\n", k.name, k.default));
    }
    out
}

/// The README's key table (Markdown), between its markers.
pub fn render_table() -> String {
    let mut out = String::from("| key | default | on reload | meaning |\n|---|---|---|---|\n");
    for k in KEYS {
        out.push_str(&format!("| `{}` | `{}` | {} | {} |\n", k.name, k.default, k.reload.short(), k.doc));
    }
    out
}

/// Words of `text` in lines of at most `width` characters.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("one line at least");
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(word.to_string());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

/// The echod.toml(5) manual page (roff), every key under KEYS.
pub fn render_man() -> String {
    let mut out = String::from(
        ".TH ECHOD.TOML 5 \"\" \"echod\" \"File Formats\"\n\
         .SH NAME\nechod.toml \\- configuration file of echod, the TCP echo server daemon\n",
    );
    out.push_str(
        ".SH DESCRIPTION\n\
         echod reads one flat TOML file: \\fIkey\\fR = \\fIvalue\\fR lines, no tables. \\fBechod \\-\\-config\\fR \\fIFILE\\fR \
         names it; the package's service uses \\fI/etc/echod/echod.toml\\fR. Durations are seconds (fractions \
         allowed, 0.001 at the finest). An unknown key, a wrong type or a value out of range is an error that \
         names the file, the line and the key: at start echod exits 78 (EX_CONFIG) and starts nothing; on a \
         reload (SIGHUP) the running configuration is kept and the failure is logged. \
         \\fBechod \\-\\-check\\-config\\fR runs the same checks and prints the effective configuration.\n\
         .SH KEYS\n",
    );
    for k in KEYS {
        out.push_str(&format!(
            ".TP\n\\fB{}\\fR = {}\n{} {}\n",
            k.name,
            roff(k.default),
            roff_text(k.doc),
            k.reload.sentence()
        ));
    }
    out.push_str(
        ".SH FILES\n.TP\n\\fIconfig/echod.toml\\fR\nWithout \\fB\\-\\-config\\fR: used if it exists \
         (relative to the working directory).\n\
         .TP\n\\fI/etc/echod/echod.toml\\fR\nThe packaged configuration (a conffile); without \\fB\\-\\-config\\fR, \
         used when there is no \\fIconfig/echod.toml\\fR.\n\
         .SH SEE ALSO\n\\fBechod\\fR(8), \\fBecho\\-load\\fR(1)\n",
    );
    out
}

/// `text` safe as roff: backslashes and leading dots escaped, hyphens kept
/// as hyphens.
fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') { format!("\\&{escaped}") } else { escaped }
}

/// A doc paragraph as roff: `code` in bold, *emphasis* plain (also used
/// for echod(8)'s SIGNALS section).
pub fn roff_text(text: &str) -> String {
    let mut out = String::new();
    for (i, part) in roff(&text.replace('*', "")).split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str(&format!("\\fB{part}\\fR"));
        } else {
            out.push_str(part);
        }
    }
    out
}

/// The README's markers around the generated table.
pub const TABLE_BEGIN: &str = "<!-- config keys: generated from src/config/keys.rs, do not edit -->\n";
pub const TABLE_END: &str = "<!-- end of config keys -->\n";

/// The text between `begin` and `end` in `text`.
pub fn between<'a>(text: &'a str, begin: &str, end: &str) -> Option<&'a str> {
    let from = text.find(begin)? + begin.len();
    let to = text[from..].find(end)? + from;
    Some(&text[from..to])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The list and `Config` agree: the same keys, in the same order, with
    /// the same defaults (the built-in config, rendered as `--check-config`
    /// does, is exactly the `name = default` lines).
    #[test]
    fn the_keys_are_the_configs_fields_with_their_defaults() {
        let listed: String = KEYS.iter().map(|k| format!("{} = {}\n", k.name, k.default)).collect();
        assert_eq!(super::super::Config::default().to_toml(), listed);
    }

    /// What a committed copy must equal: `cargo run --example gen-docs`
    /// rewrites them.
    #[test]
    fn the_committed_copies_are_what_the_generator_writes() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let toml = std::fs::read_to_string(root.join("config/echod.toml")).expect("read config/echod.toml");
        assert!(toml == render_toml(), "config/echod.toml is stale: run `cargo run --example gen-docs`");
        let readme = std::fs::read_to_string(root.join("README.md")).expect("read README.md");
        let table = between(&readme, TABLE_BEGIN, TABLE_END).expect("the README has the key table's markers");
        assert!(table == render_table(), "README.md's key table is stale: run `cargo run --example gen-docs`");
    }

    #[test]
    fn wrapping_keeps_every_word_within_the_width() {
        let lines = wrap("aaa bbb ccc dddddddddd e", 7);
        assert_eq!(lines, ["aaa bbb", "ccc", "dddddddddd", "e"]);
    }
}
