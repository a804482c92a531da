//! The Prometheus text exposition (format 0.0.4) of a [`Snapshot`].
//!
//! A pure function of the snapshot, so /metrics shows exactly what USR1 and
//! the stats line show. Series names are a contract (DESIGN.md, section 5):
//! `echod_connections_accepted_total`, `echod_connections_active`,
//! `echod_connections_rejected_total`, `echod_bytes_received_total`,
//! `echod_bytes_sent_total`, `echod_workers`, `echod_worker_restarts_total`;
//! per-worker series carry a `worker` label (the worker's slot number, the N
//! of `echod: worker N`). Every family's type and HELP come from
//! [`families::FAMILIES`], the one list of them.

pub mod families;
pub mod process;

use std::fmt::Write;

use proxy_protocol::HeaderError;

use crate::scoreboard::DURATION_BUCKETS;
use crate::stats::Snapshot;
use process::{Role, Sample};

/// Facts about the master that are not in the snapshot.
#[derive(Debug, Clone, Copy)]
pub struct MasterInfo {
    /// Unix time the master started, seconds.
    pub start_time: f64,
    /// Whether the last reload was applied (1) or rejected (0).
    pub last_reload_ok: bool,
    /// Unix time of the last successful (re)load, seconds.
    pub last_reload_time: f64,
}

/// Renders every series; `processes` are the `process_*` samples of the
/// master and the workers.
pub fn render(snap: &Snapshot, info: &MasterInfo, processes: &[(Role, Sample)]) -> String {
    let mut out = String::with_capacity(4096 + 1024 * snap.workers.len());
    let t = &snap.totals;
    let o = &mut out;
    let version = format!("version=\"{}\",commit=\"{}\"", env!("CARGO_PKG_VERSION"), env!("ECHOD_GIT_COMMIT"));
    metric(o, "echod_build_info", &[(&version, 1.0)]);
    // (name, value) of every unlabelled series.
    let scalars: [(&str, f64); 14] = [
        ("echod_start_time_seconds", info.start_time),
        ("echod_config_generation", snap.generation as f64),
        ("echod_config_last_reload_successful", bool_f(info.last_reload_ok)),
        ("echod_config_last_reload_success_timestamp_seconds", info.last_reload_time),
        ("echod_connections_accepted_total", snap.accepted as f64),
        ("echod_connections_active", snap.active as f64),
        ("echod_connections_draining", snap.draining as f64),
        ("echod_connections_rejected_total", snap.rejected as f64),
        ("echod_connections_closed_total", t.finished as f64),
        ("echod_bytes_received_total", t.bytes_in as f64),
        ("echod_bytes_sent_total", t.bytes_out as f64),
        ("echod_workers", snap.serving() as f64),
        ("echod_workers_target", snap.target as f64),
        ("echod_worker_restarts_total", snap.restarts as f64),
    ];
    for (name, v) in scalars {
        metric(o, name, &[("", v)]);
    }
    metric(
        o,
        "echod_connection_errors_total",
        &[
            ("kind=\"reset\"", t.err_reset as f64),
            ("kind=\"timeout\"", t.err_timeout as f64),
            ("kind=\"other\"", t.err_other as f64),
        ],
    );

    metric(o, "echod_proxy_headers_total", &[("", t.proxied as f64)]);
    let kinds: Vec<(String, f64)> = HeaderError::ALL
        .iter()
        .zip(t.proxy_errors)
        .map(|(k, v)| (format!("kind=\"{}\"", k.name()), v as f64))
        .collect();
    metric_owned(o, "echod_proxy_header_errors_total", kinds);
    metric(o, "echod_access_log_dropped_total", &[("", t.log_dropped as f64)]);

    let per_worker = |f: &dyn Fn(&crate::stats::WorkerView) -> f64| -> Vec<(String, f64)> {
        snap.workers.iter().map(|w| (format!("worker=\"{}\"", w.id), f(w))).collect()
    };
    metric_owned(o, "echod_worker_connections_active", per_worker(&|w| w.active as f64));
    metric_owned(o, "echod_worker_connections_accepted_total", per_worker(&|w| w.accepted as f64));
    metric_owned(o, "echod_worker_bytes_received_total", per_worker(&|w| w.slot.bytes_in as f64));
    metric_owned(o, "echod_worker_bytes_sent_total", per_worker(&|w| w.slot.bytes_out as f64));
    metric_owned(o, "echod_worker_queue_depth", per_worker(&|w| w.slot.queued as f64));
    metric_owned(o, "echod_worker_capacity", per_worker(&|w| w.capacity as f64));
    let threads: Vec<(String, f64)> = snap
        .workers
        .iter()
        .flat_map(|w| {
            [
                (format!("worker=\"{}\",state=\"busy\"", w.id), w.slot.busy as f64),
                (format!("worker=\"{}\",state=\"idle\"", w.id), w.slot.threads.saturating_sub(w.slot.busy) as f64),
            ]
        })
        .collect();
    metric_owned(o, "echod_worker_threads", threads);
    let up: Vec<(String, f64)> = snap
        .workers
        .iter()
        .map(|w| (format!("worker=\"{}\",pid=\"{}\",state=\"{}\"", w.id, w.pid, w.state.name()), 1.0))
        .collect();
    metric_owned(o, "echod_worker_info", up);

    // Connection duration histogram (buckets are stored non-cumulative).
    let name = "echod_connection_duration_seconds";
    header(o, name);
    let mut cumulative = 0u64;
    for (i, &le) in DURATION_BUCKETS.iter().enumerate() {
        cumulative += t.duration[i];
        let le = if le.is_infinite() { "+Inf".to_string() } else { fmt_f(le) };
        let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(o, "{name}_sum {}", fmt_f(t.duration_sum_us as f64 / 1e6));
    let _ = writeln!(o, "{name}_count {cumulative}");

    let of = |f: &dyn Fn(&Sample) -> f64| -> Vec<(String, f64)> {
        processes.iter().map(|(role, s)| (role.labels(), f(s))).collect()
    };
    metric_owned(o, "process_cpu_seconds_total", of(&|s| s.cpu_seconds));
    metric_owned(o, "process_resident_memory_bytes", of(&|s| s.resident_bytes as f64));
    metric_owned(o, "process_open_fds", of(&|s| s.open_fds as f64));
    metric_owned(o, "process_max_fds", of(&|s| s.max_fds as f64));
    metric_owned(o, "process_start_time_seconds", of(&|s| s.start_time));
    out
}

fn bool_f(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// A family's HELP and TYPE lines, from [`families::FAMILIES`].
pub fn header(out: &mut String, name: &str) {
    let f = families::get(name);
    let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {}", f.help, f.kind);
}

/// One metric family: HELP, TYPE and its samples (labels without braces).
fn metric(out: &mut String, name: &str, samples: &[(&str, f64)]) {
    header(out, name);
    for (labels, v) in samples {
        sample(out, name, labels, *v);
    }
}

fn metric_owned(out: &mut String, name: &str, samples: Vec<(String, f64)>) {
    let borrowed: Vec<(&str, f64)> = samples.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(out, name, &borrowed);
}

fn sample(out: &mut String, name: &str, labels: &str, v: f64) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {}", fmt_f(v));
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {}", fmt_f(v));
    }
}

/// Integers without a decimal point (exact up to 2^53), others as Rust
/// prints them.
fn fmt_f(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 9.0e15 { format!("{}", v as i64) } else { format!("{v}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoreboard::SlotStats;
    use crate::stats::WorkerView;

    fn snap() -> Snapshot {
        let mut totals =
            SlotStats { finished: 3, bytes_in: 10, bytes_out: 10, duration_sum_us: 1_500_000, ..SlotStats::default() };
        totals.duration[0] = 2;
        totals.duration[4] = 1;
        Snapshot {
            accepted: 4,
            rejected: 1,
            active: 1,
            draining: 0,
            restarts: 0,
            generation: 2,
            target: 1,
            totals,
            workers: vec![WorkerView {
                id: 3,
                pid: 42,
                generation: 2,
                state: crate::stats::State::Serving,
                accepted: 4,
                active: 1,
                capacity: 8,
                slot: SlotStats { threads: 5, busy: 1, ..SlotStats::default() },
            }],
        }
    }

    fn processes() -> Vec<(Role, Sample)> {
        let s = Sample { cpu_seconds: 1.25, resident_bytes: 4096, open_fds: 9, max_fds: 1024, start_time: 1.5e9 };
        vec![(Role::Master, s), (Role::Worker(3), Sample { open_fds: 60, ..s })]
    }

    #[test]
    fn contract_series_are_present_with_exact_values() {
        let info = MasterInfo { start_time: 1.5e9, last_reload_ok: true, last_reload_time: 1.5e9 };
        let text = render(&snap(), &info, &processes());
        for line in [
            "echod_connections_accepted_total 4",
            "echod_connections_active 1",
            "echod_connections_rejected_total 1",
            "echod_bytes_received_total 10",
            "echod_bytes_sent_total 10",
            "echod_workers 1",
            "echod_worker_restarts_total 0",
            "echod_worker_connections_active{worker=\"3\"} 1",
            "echod_worker_threads{worker=\"3\",state=\"idle\"} 4",
            "echod_connection_duration_seconds_bucket{le=\"0.001\"} 2",
            "echod_connection_duration_seconds_bucket{le=\"+Inf\"} 3",
            "echod_connection_duration_seconds_sum 1.5",
            "echod_connection_duration_seconds_count 3",
            "process_cpu_seconds_total{role=\"master\"} 1.25",
            "process_open_fds{role=\"master\"} 9",
            "process_open_fds{role=\"worker\",worker=\"3\"} 60",
            "process_max_fds{role=\"worker\",worker=\"3\"} 1024",
            "process_start_time_seconds{role=\"master\"} 1500000000",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        assert!(text.ends_with('\n'));
    }

    /// Every family the exposition renders is listed in `FAMILIES`, in
    /// the same order, and each listed one is rendered (the metrics
    /// endpoint's own `echod_metrics_*` families come last, from
    /// `master::http`).
    #[test]
    fn the_exposition_renders_exactly_the_listed_families() {
        let info = MasterInfo { start_time: 1.5e9, last_reload_ok: true, last_reload_time: 1.5e9 };
        let text = render(&snap(), &info, &processes());
        let rendered: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
        let listed: Vec<&str> =
            families::FAMILIES.iter().map(|f| f.name).filter(|n| !n.starts_with("echod_metrics_")).collect();
        assert_eq!(rendered, listed);
        assert!(!text.contains("untyped"), "a family missing from FAMILIES:\n{text}");
    }

    /// docs/OPERATIONS.md's table is what `families::render_table` writes
    /// (`cargo run --example gen-docs`), and every family DESIGN's metric
    /// contract names is one of them.
    #[test]
    fn the_docs_name_the_families_as_they_are() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let ops = std::fs::read_to_string(root.join("docs/OPERATIONS.md")).expect("docs/OPERATIONS.md");
        let table = crate::config::keys::between(&ops, families::TABLE_BEGIN, families::TABLE_END)
            .expect("the metric table's markers");
        assert!(
            table == families::render_table(),
            "docs/OPERATIONS.md's metric table is stale: run `cargo run --example gen-docs`"
        );
        let design = std::fs::read_to_string(root.join("docs/DESIGN.md")).expect("docs/DESIGN.md");
        let contract = design.split("## 5. Contracts").nth(1).and_then(|c| c.split("\n## ").next()).expect("DESIGN §5");
        let mut named = 0;
        for word in contract.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("echod_") && word.len() > "echod_".len() && !word.ends_with('_') {
                let f = families::get(word);
                let listed = !f.name.is_empty() || families::FAMILIES.iter().any(|f| word.starts_with(f.name));
                assert!(listed, "DESIGN's contract names {word}, which echod does not export");
                named += 1;
            }
        }
        assert!(named >= 10, "read DESIGN's contract ({named} names)");
    }
}
