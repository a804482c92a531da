//! What echo-load prints: a summary table for people, one JSON object for
//! programs (`--json`; its keys are a contract, DESIGN.md section 5).

use serde_json::{Map, Value, json};

use super::{Counts, Options, Outcome};

/// Latency percentiles in microseconds.
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Latency {
    pub fn of(o: &Outcome) -> Latency {
        Latency::of_histogram(&o.latency)
    }

    fn of_histogram(h: &hdrhistogram::Histogram<u64>) -> Latency {
        let empty = h.is_empty();
        let q = |p: f64| if empty { 0 } else { h.value_at_quantile(p) };
        Latency {
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p999: q(0.999),
            max: if empty { 0 } else { h.max() },
            mean: if empty { 0.0 } else { h.mean() },
        }
    }
}

/// Responses per second and megabytes (10^6 bytes) echoed per second.
pub fn rates(o: &Outcome, opts: &Options) -> (f64, f64) {
    let secs = o.elapsed.as_secs_f64();
    if secs <= 0.0 {
        return (0.0, 0.0);
    }
    let rps = o.counts.responses as f64 / secs;
    (rps, rps * opts.size as f64 / 1e6)
}

/// The addresses as one string ("a" or "a,b,c").
fn addr_list(opts: &Options) -> String {
    opts.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")
}

/// The counted figures of a run or of one address: counts, errors by kind,
/// rate and latency.
fn figures(c: &Counts, latency: &hdrhistogram::Histogram<u64>, secs: f64) -> Map<String, Value> {
    let l = Latency::of_histogram(latency);
    let rps = if secs > 0.0 { c.responses as f64 / secs } else { 0.0 };
    let v = json!({
        "requests": c.requests,
        "responses": c.responses,
        "errors": c.errors(),
        "connect_errors": c.connect_errors,
        "resets": c.resets,
        "timeouts": c.timeouts,
        "other_errors": c.other_errors,
        "mismatches": c.mismatches,
        "connects": c.connects,
        "bytes_sent": c.bytes_sent,
        "bytes_received": c.bytes_received,
        "rps": rps,
        "latency_us": { "p50": l.p50, "p90": l.p90, "p99": l.p99, "p999": l.p999, "max": l.max, "mean": l.mean },
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Per-address figures, in `--addr` order.
fn per_addr_json(o: &Outcome, opts: &Options) -> Vec<Value> {
    let secs = o.elapsed.as_secs_f64();
    opts.addrs
        .iter()
        .zip(&o.per_addr)
        .enumerate()
        .map(|(i, (addr, t))| {
            let mut m = figures(&t.counts, &t.latency, secs);
            m.insert("addr".into(), addr.to_string().into());
            m.insert("connections".into(), (i..opts.connections).step_by(opts.addrs.len()).count().into());
            Value::Object(m)
        })
        .collect()
}

/// The `--json` object.
pub fn json(o: &Outcome, opts: &Options) -> Value {
    let (_, mbps) = rates(o, opts);
    let mut m = figures(&o.counts, &o.latency, o.elapsed.as_secs_f64());
    let run = json!({
        "addr": addr_list(opts),
        "per_addr": per_addr_json(o, opts),
        "mode": opts.mode(),
        "connections": opts.connections,
        "size": opts.size,
        "pipeline": opts.pipeline,
        "lines": opts.lines,
        "proxy": opts.proxy.map(|v| if v == crate::proxy::Version::V1 { "v1" } else { "v2" }),
        "rate": opts.rate,
        "threads": opts.threads,
        "duration_s": o.elapsed.as_secs_f64(),
        "warmup_s": opts.warmup.as_secs_f64(),
        "interrupted": o.interrupted,
        "mbps": mbps,
    });
    if let Value::Object(r) = run {
        m.extend(r);
    }
    Value::Object(m)
}

/// The human summary.
pub fn summary(o: &Outcome, opts: &Options) -> String {
    let c = &o.counts;
    let l = Latency::of(o);
    let (rps, mbps) = rates(o, opts);
    let mode = match opts.mode() {
        "churn" => "churn (connect, 1 echo, close)".to_string(),
        "open" => format!("open loop at {} msg/s", group(opts.rate.unwrap_or(0.0) as u64)),
        _ => format!("closed loop, pipeline {}", opts.pipeline),
    };
    let mut out = String::new();
    out.push_str(&format!(
        "echo-load {}: {} connections, {} B messages, {mode}, {} threads\n",
        addr_list(opts),
        opts.connections,
        opts.size,
        opts.threads
    ));
    out.push_str(&format!(
        "  measured     {:.2} s{}{}\n",
        o.elapsed.as_secs_f64(),
        if opts.warmup.is_zero() {
            String::new()
        } else {
            format!(" (after {:.1} s warm-up)", opts.warmup.as_secs_f64())
        },
        if o.interrupted { ", interrupted" } else { "" }
    ));
    out.push_str(&format!("  requests     {:>12}\n", group(c.requests)));
    out.push_str(&format!("  responses    {:>12}   {}/s   {mbps:.2} MB/s\n", group(c.responses), group(rps as u64)));
    if opts.churn {
        out.push_str(&format!(
            "  connections  {:>12}   {}/s\n",
            group(c.connects),
            group((c.connects as f64 / o.elapsed.as_secs_f64().max(1e-9)) as u64)
        ));
    }
    out.push_str(&format!(
        "  errors       {:>12}   (connect {}, reset {}, timeout {}, other {})\n",
        group(c.errors()),
        c.connect_errors,
        c.resets,
        c.timeouts,
        c.other_errors
    ));
    out.push_str(&format!(
        "  mismatches   {:>12}{}\n",
        group(c.mismatches),
        if c.mismatches > 0 { "   <- echoed bytes differed!" } else { "" }
    ));
    out.push_str(&format!(
        "  latency µs   p50 {}   p90 {}   p99 {}   p99.9 {}   max {}   (mean {:.0})\n",
        group(l.p50),
        group(l.p90),
        group(l.p99),
        group(l.p999),
        group(l.max),
        l.mean
    ));
    if opts.addrs.len() > 1 {
        for p in per_addr_json(o, opts) {
            out.push_str(&format!(
                "  {:<22} {:>4} conns  responses {:>12}   {}/s   errors {}   mismatches {}   p99 {} µs\n",
                p["addr"].as_str().unwrap_or_default(),
                p["connections"],
                group(p["responses"].as_u64().unwrap_or(0)),
                group(p["rps"].as_f64().unwrap_or(0.0) as u64),
                p["errors"],
                p["mismatches"],
                group(p["latency_us"]["p99"].as_u64().unwrap_or(0)),
            ));
        }
    }
    out
}

/// 1234567 -> "1,234,567".
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{Counts, Tally, histogram};
    use std::time::Duration;

    #[test]
    fn json_has_the_contract_keys() {
        let mut latency = histogram();
        for v in [10, 20, 30, 1000] {
            latency.record(v).unwrap();
        }
        let o = Outcome {
            counts: Counts { requests: 4, responses: 4, mismatches: 1, ..Counts::default() },
            latency,
            per_addr: vec![Tally::new()],
            elapsed: Duration::from_secs(2),
            interrupted: false,
        };
        let opts = crate::load::Options {
            addrs: vec!["127.0.0.1:7".parse().unwrap()],
            connections: 1,
            duration: Some(Duration::from_secs(2)),
            count: None,
            size: 1_000_000,
            pipeline: 1,
            rate: None,
            churn: false,
            lines: false,
            proxy: None,
            threads: 1,
            warmup: Duration::ZERO,
            ramp_up: Duration::ZERO,
            timeout: Duration::from_secs(1),
        };
        let j = json(&o, &opts);
        for k in ["requests", "responses", "errors", "mismatches", "rps", "mbps"] {
            assert!(j.get(k).is_some(), "{k}");
        }
        assert_eq!(j["rps"], 2.0);
        assert_eq!(j["mbps"], 2.0);
        assert_eq!(j["mismatches"], 1);
        for k in ["p50", "p90", "p99", "p999", "max"] {
            assert!(j["latency_us"][k].as_u64().is_some(), "{k}");
        }
        assert!(j["latency_us"]["max"].as_u64().unwrap() >= 1000);
        assert_eq!(group(1234567), "1,234,567");
        assert_eq!(group(12), "12");
    }
}
