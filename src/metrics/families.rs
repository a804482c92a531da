//! Every metric family echod exports, defined once: its name, type, labels,
//! the HELP line the exposition carries, and what the docs say of it. The
//! exposition (`super::render`, `master::http`) takes type and HELP from
//! here; docs/OPERATIONS.md's metric table is written from it by `cargo run
//! --example gen-docs`, and tests fail when a rendered family is missing
//! here, when the table is stale, or when DESIGN's contract names a family
//! that is not here.

/// One metric family.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
    /// Its labels with their values where they are fixed, as the docs show
    /// them (`kind="reset|timeout|other"`); "" for none.
    pub labels: &'static str,
    /// The exposition's HELP text: one short sentence.
    pub help: &'static str,
    /// What the docs add, when HELP does not say enough ("" for nothing).
    pub doc: &'static str,
}

const fn family(
    name: &'static str,
    kind: &'static str,
    labels: &'static str,
    help: &'static str,
    doc: &'static str,
) -> Family {
    Family { name, kind, labels, help, doc }
}

/// The labels of the `process_*` families.
const PROCESS_LABELS: &str = r#"role="master|worker",worker"#;

/// Every family, in the order the exposition renders them.
pub const FAMILIES: &[Family] = &[
    family("echod_build_info", "gauge", "version,commit", "Build information.", "crate version and git commit"),
    family("echod_start_time_seconds", "gauge", "", "Unix time the master started.", ""),
    family("echod_config_generation", "gauge", "", "Config generation: 1 at start, +1 per applied reload.", ""),
    family("echod_config_last_reload_successful", "gauge", "", "Whether the last reload was applied.", ""),
    family(
        "echod_config_last_reload_success_timestamp_seconds",
        "gauge",
        "",
        "Unix time of the last applied (re)load.",
        "",
    ),
    family("echod_connections_accepted_total", "counter", "", "Connections accepted and handed to workers.", ""),
    family("echod_connections_active", "gauge", "", "Connections held now (in workers or being handed over).", ""),
    family(
        "echod_connections_draining",
        "gauge",
        "",
        "Connections the previous generation still drains during a binary upgrade.",
        "0 otherwise; accepted = closed + active + draining",
    ),
    family(
        "echod_connections_rejected_total",
        "counter",
        "",
        "Connections closed at once because a limit was reached.",
        "by `max_connections*` (on PROXY listeners, the per-address refusals of the workers too)",
    ),
    family("echod_connections_closed_total", "counter", "", "Connections that ended.", ""),
    family("echod_bytes_received_total", "counter", "", "Bytes read from clients.", ""),
    family("echod_bytes_sent_total", "counter", "", "Bytes echoed to clients.", ""),
    family("echod_workers", "gauge", "", "Worker processes serving connections.", ""),
    family("echod_workers_target", "gauge", "", "Worker processes wanted (workers, TTIN/TTOU).", ""),
    family("echod_worker_restarts_total", "counter", "", "Workers that exited unexpectedly and were respawned.", ""),
    family(
        "echod_connection_errors_total",
        "counter",
        r#"kind="reset|timeout|other""#,
        "Connections ended by an error, by kind.",
        "`other` includes those a worker held when it died (they count as closed too, so accepted = closed + \
         active always holds)",
    ),
    family(
        "echod_proxy_headers_total",
        "counter",
        "",
        "Connections on PROXY protocol listeners whose header was accepted.",
        "",
    ),
    family(
        "echod_proxy_header_errors_total",
        "counter",
        r#"kind="missing|malformed|oversized|truncated|timeout|untrusted""#,
        "Connections on PROXY protocol listeners closed for their header, by kind.",
        "no header, a bad one, one past 107 B (v1) or 2 KiB of v2 payload, EOF mid-header, none within \
         `proxy_timeout`, or a peer not in `proxy_trusted`",
    ),
    family(
        "echod_access_log_dropped_total",
        "counter",
        "",
        "Connection log lines dropped because the log could not take them at once.",
        "`access_log`: an echo never waits for the log",
    ),
    family("echod_worker_connections_active", "gauge", "worker", "Connections held by the worker.", ""),
    family("echod_worker_connections_accepted_total", "counter", "worker", "Connections handed to the worker.", ""),
    family("echod_worker_bytes_received_total", "counter", "worker", "Bytes the worker read.", ""),
    family("echod_worker_bytes_sent_total", "counter", "worker", "Bytes the worker echoed.", ""),
    family(
        "echod_worker_queue_depth",
        "gauge",
        "worker",
        "Connections waiting in the worker's queue for a thread.",
        "",
    ),
    family("echod_worker_capacity", "gauge", "worker", "Connections the worker may hold at once.", ""),
    family(
        "echod_worker_threads",
        "gauge",
        r#"worker,state="busy|idle""#,
        "Handler threads of the worker, busy or idle.",
        "",
    ),
    family(
        "echod_worker_info",
        "gauge",
        r#"worker,pid,state="starting|serving|draining""#,
        "Each worker process and its state.",
        "1 per worker process",
    ),
    family("echod_connection_duration_seconds", "histogram", "", "How long connections lived.", "1 ms .. 1 h buckets"),
    family(
        "process_cpu_seconds_total",
        "counter",
        PROCESS_LABELS,
        "Total user and system CPU time spent in seconds.",
        "the standard process metrics, one series for the master and one per worker (`worker` is the slot); \
         `sum by (role)` adds them up; during a binary upgrade's drain the old generation's processes are not \
         in them (`echod_connections_draining` counts what they hold)",
    ),
    family("process_resident_memory_bytes", "gauge", PROCESS_LABELS, "Resident memory size in bytes.", ""),
    family(
        "process_open_fds",
        "gauge",
        PROCESS_LABELS,
        "Number of open file descriptors.",
        "a worker counts its own once a second",
    ),
    family(
        "process_max_fds",
        "gauge",
        PROCESS_LABELS,
        "Maximum number of open file descriptors.",
        "the soft RLIMIT_NOFILE",
    ),
    family(
        "process_start_time_seconds",
        "gauge",
        PROCESS_LABELS,
        "Start time of the process since unix epoch in seconds.",
        "",
    ),
    family(
        "echod_metrics_connections_evicted_total",
        "counter",
        "",
        "Scrape connections reset to make room (answered ones first, then ones writing, then ones reading; \
         oldest first).",
        "",
    ),
    family(
        "echod_metrics_connections_refused_total",
        "counter",
        "",
        "Scrape connections closed at accept: they could not be polled.",
        "",
    ),
    family(
        "echod_metrics_connections_aborted_total",
        "counter",
        "",
        "Scrape connections reset at their deadline (a response not taken, or no close after it).",
        "",
    ),
    family(
        "echod_metrics_renders_total",
        "counter",
        "",
        "Times the exposition was rendered.",
        "rationed under a scrape flood",
    ),
];

/// Stands in for a family missing from [`FAMILIES`] (a test fails on it).
const UNLISTED: Family = family("", "untyped", "", "Not in FAMILIES.", "");

/// The family named `name`.
pub fn get(name: &str) -> &'static Family {
    FAMILIES.iter().find(|f| f.name == name).unwrap_or(&UNLISTED)
}

/// docs/OPERATIONS.md's metric table (Markdown), between its markers.
pub fn render_table() -> String {
    let mut out = String::from("| metric | type | meaning |\n|---|---|---|\n");
    for f in FAMILIES {
        let labels = if f.labels.is_empty() { String::new() } else { format!("{{{}}}", f.labels.replace('|', "\\|")) };
        let help = f.help.trim_end_matches('.');
        let meaning =
            if f.doc.is_empty() { help.to_string() } else { format!("{help}: {}", f.doc.replace('|', "\\|")) };
        out.push_str(&format!("| `{}{labels}` | {} | {meaning} |\n", f.name, f.kind));
    }
    out
}

/// docs/OPERATIONS.md's markers around the generated table.
pub const TABLE_BEGIN: &str = "<!-- metrics: generated from src/metrics/families.rs, do not edit -->\n";
pub const TABLE_END: &str = "<!-- end of metrics -->\n";
