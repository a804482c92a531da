//! The Prometheus text exposition (format 0.0.4) of a [`Snapshot`].
//!
//! A pure function of the snapshot, so /metrics shows exactly what USR1 and
//! the stats line show. Series names are a contract (DESIGN.md, section 5):
//! `echod_connections_accepted_total`, `echod_connections_active`,
//! `echod_connections_rejected_total`, `echod_bytes_received_total`,
//! `echod_bytes_sent_total`, `echod_workers`, `echod_worker_restarts_total`;
//! per-worker series carry a `worker` label (the worker's slot number, the N
//! of `echod: worker N`).

use std::fmt::Write;

use proxy_protocol::HeaderError;

use crate::scoreboard::DURATION_BUCKETS;
use crate::stats::Snapshot;

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

/// Renders every series.
pub fn render(snap: &Snapshot, info: &MasterInfo) -> String {
    let mut out = String::with_capacity(4096 + 1024 * snap.workers.len());
    let t = &snap.totals;
    let o = &mut out;
    let version = format!("version=\"{}\",commit=\"{}\"", env!("CARGO_PKG_VERSION"), env!("ECHOD_GIT_COMMIT"));
    metric(o, "echod_build_info", "gauge", "Build information.", &[(&version, 1.0)]);
    // (name, type, help, value) of every unlabelled series.
    let scalars: [(&str, &str, &str, f64); 14] = [
        ("echod_start_time_seconds", "gauge", "Unix time the master started.", info.start_time),
        (
            "echod_config_generation",
            "gauge",
            "Config generation: 1 at start, +1 per applied reload.",
            snap.generation as f64,
        ),
        (
            "echod_config_last_reload_successful",
            "gauge",
            "Whether the last reload was applied.",
            bool_f(info.last_reload_ok),
        ),
        (
            "echod_config_last_reload_success_timestamp_seconds",
            "gauge",
            "Unix time of the last applied (re)load.",
            info.last_reload_time,
        ),
        (
            "echod_connections_accepted_total",
            "counter",
            "Connections accepted and handed to workers.",
            snap.accepted as f64,
        ),
        (
            "echod_connections_active",
            "gauge",
            "Connections held now (in workers or being handed over).",
            snap.active as f64,
        ),
        (
            "echod_connections_draining",
            "gauge",
            "Connections the previous generation still drains during a binary upgrade.",
            snap.draining as f64,
        ),
        (
            "echod_connections_rejected_total",
            "counter",
            "Connections closed at once because a limit was reached.",
            snap.rejected as f64,
        ),
        ("echod_connections_closed_total", "counter", "Connections that ended.", t.finished as f64),
        ("echod_bytes_received_total", "counter", "Bytes read from clients.", t.bytes_in as f64),
        ("echod_bytes_sent_total", "counter", "Bytes echoed to clients.", t.bytes_out as f64),
        ("echod_workers", "gauge", "Worker processes serving connections.", snap.serving() as f64),
        ("echod_workers_target", "gauge", "Worker processes wanted (workers, TTIN/TTOU).", snap.target as f64),
        (
            "echod_worker_restarts_total",
            "counter",
            "Workers that exited unexpectedly and were respawned.",
            snap.restarts as f64,
        ),
    ];
    for (name, kind, help, v) in scalars {
        metric(o, name, kind, help, &[("", v)]);
    }
    metric(
        o,
        "echod_connection_errors_total",
        "counter",
        "Connections ended by an error, by kind.",
        &[
            ("kind=\"reset\"", t.err_reset as f64),
            ("kind=\"timeout\"", t.err_timeout as f64),
            ("kind=\"other\"", t.err_other as f64),
        ],
    );

    metric(
        o,
        "echod_proxy_headers_total",
        "counter",
        "Connections on PROXY protocol listeners whose header was accepted.",
        &[("", t.proxied as f64)],
    );
    let kinds: Vec<(String, f64)> = HeaderError::ALL
        .iter()
        .zip(t.proxy_errors)
        .map(|(k, v)| (format!("kind=\"{}\"", k.name()), v as f64))
        .collect();
    metric_owned(
        o,
        "echod_proxy_header_errors_total",
        "counter",
        "Connections on PROXY protocol listeners closed for their header, by kind.",
        kinds,
    );

    let per_worker = |f: &dyn Fn(&crate::stats::WorkerView) -> f64| -> Vec<(String, f64)> {
        snap.workers.iter().map(|w| (format!("worker=\"{}\"", w.id), f(w))).collect()
    };
    metric_owned(
        o,
        "echod_worker_connections_active",
        "gauge",
        "Connections held by the worker.",
        per_worker(&|w| w.active as f64),
    );
    metric_owned(
        o,
        "echod_worker_connections_accepted_total",
        "counter",
        "Connections handed to the worker.",
        per_worker(&|w| w.accepted as f64),
    );
    metric_owned(
        o,
        "echod_worker_bytes_received_total",
        "counter",
        "Bytes the worker read.",
        per_worker(&|w| w.slot.bytes_in as f64),
    );
    metric_owned(
        o,
        "echod_worker_bytes_sent_total",
        "counter",
        "Bytes the worker echoed.",
        per_worker(&|w| w.slot.bytes_out as f64),
    );
    metric_owned(
        o,
        "echod_worker_queue_depth",
        "gauge",
        "Connections waiting in the worker's queue for a thread.",
        per_worker(&|w| w.slot.queued as f64),
    );
    metric_owned(
        o,
        "echod_worker_capacity",
        "gauge",
        "Connections the worker may hold at once.",
        per_worker(&|w| w.capacity as f64),
    );
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
    metric_owned(o, "echod_worker_threads", "gauge", "Handler threads of the worker, busy or idle.", threads);
    let up: Vec<(String, f64)> = snap
        .workers
        .iter()
        .map(|w| (format!("worker=\"{}\",pid=\"{}\",state=\"{}\"", w.id, w.pid, w.state.name()), 1.0))
        .collect();
    metric_owned(o, "echod_worker_info", "gauge", "Each worker process and its state.", up);

    // Connection duration histogram (buckets are stored non-cumulative).
    let name = "echod_connection_duration_seconds";
    let _ = writeln!(o, "# HELP {name} How long connections lived.\n# TYPE {name} histogram");
    let mut cumulative = 0u64;
    for (i, &le) in DURATION_BUCKETS.iter().enumerate() {
        cumulative += t.duration[i];
        let le = if le.is_infinite() { "+Inf".to_string() } else { fmt_f(le) };
        let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(o, "{name}_sum {}", fmt_f(t.duration_sum_us as f64 / 1e6));
    let _ = writeln!(o, "{name}_count {cumulative}");
    out
}

fn bool_f(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// One metric family: HELP, TYPE and its samples (labels without braces).
fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        sample(out, name, labels, *v);
    }
}

fn metric_owned(out: &mut String, name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>) {
    let borrowed: Vec<(&str, f64)> = samples.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(out, name, kind, help, &borrowed);
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

    #[test]
    fn contract_series_are_present_with_exact_values() {
        let info = MasterInfo { start_time: 1.5e9, last_reload_ok: true, last_reload_time: 1.5e9 };
        let text = render(&snap(), &info);
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
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        assert!(text.ends_with('\n'));
    }
}
