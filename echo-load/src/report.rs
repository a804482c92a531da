//! What echo-load prints: a summary table for people, one JSON object for
//! programs (`--json`; its keys are a contract, DESIGN.md section 5).

use serde_json::{Map, Value, json};

use super::{Options, Outcome, Tally, exit};

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
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Latency {
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

/// Above this p99 send lateness (µs) the summary warns that the client's
/// own delay is part of the latency figures.
const LATE_WARNING_US: u64 = 1_000;

/// Responses per second and megabytes (10^6 bytes) echoed per second.
pub fn rates(o: &Outcome, opts: &Options) -> (f64, f64) {
    let rps = per_second(o.total.counts.responses, o);
    (rps, rps * opts.size as f64 / 1e6)
}

fn per_second(n: u64, o: &Outcome) -> f64 {
    let secs = o.elapsed.as_secs_f64();
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// The addresses as one string ("a" or "a,b,c").
fn addr_list(opts: &Options) -> String {
    opts.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")
}

/// The counted figures of a run or of one address: where every message
/// went, errors by kind, rate and latency.
fn figures(t: &Tally, secs: f64) -> Map<String, Value> {
    let (c, l) = (&t.counts, Latency::of(&t.latency));
    let (late, age) = (Latency::of(&t.lateness), Latency::of(&t.unanswered_age));
    let rps = if secs > 0.0 { c.responses as f64 / secs } else { 0.0 };
    let v = json!({
        "requests": c.requests,
        "responses": c.responses,
        "timeouts": c.timeouts,
        "lost": c.lost,
        "unanswered": c.unanswered,
        "unsent": c.unsent,
        "errors": c.errors(),
        "connect_errors": c.connect_errors,
        "resets": c.resets,
        "other_errors": c.other_errors,
        "mismatches": c.mismatches,
        "connects": c.connects,
        "bytes_sent": c.bytes_sent,
        "bytes_received": c.bytes_received,
        "rps": rps,
        "latency_us": { "p50": l.p50, "p90": l.p90, "p99": l.p99, "p999": l.p999, "max": l.max, "mean": l.mean },
        "send_lateness_us": { "p50": late.p50, "p99": late.p99, "max": late.max },
        "unanswered_age_us": { "p50": age.p50, "max": age.max },
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
            let mut m = figures(t, secs);
            m.insert("addr".into(), addr.to_string().into());
            m.insert("connections".into(), (i..opts.connections).step_by(opts.addrs.len()).count().into());
            Value::Object(m)
        })
        .collect()
}

/// The `--json` object.
pub fn json(o: &Outcome, opts: &Options) -> Value {
    let (_, mbps) = rates(o, opts);
    let mut m = figures(&o.total, o.elapsed.as_secs_f64());
    let run = json!({
        "addr": addr_list(opts),
        "per_addr": per_addr_json(o, opts),
        "mode": opts.mode(),
        "connections": opts.connections,
        "size": opts.size,
        "pipeline": opts.pipeline,
        "lines": opts.lines,
        "proxy": opts.proxy.map(|v| if v == proxy_protocol::Version::V1 { "v1" } else { "v2" }),
        "rate": opts.rate,
        "scheduled": o.scheduled(),
        "sent_rps": per_second(o.total.counts.requests, o),
        "client_behind": o.client_behind(),
        "threads": opts.threads,
        "duration_s": o.elapsed.as_secs_f64(),
        "warmup_s": opts.warmup.as_secs_f64(),
        "interrupted": o.interrupted,
        "interrupted_unmeasured": o.interrupted_unmeasured,
        "stalled": o.stalled,
        "mbps": mbps,
        "exit_code": o.exit_code(),
    });
    if let Value::Object(r) = run {
        m.extend(r);
    }
    Value::Object(m)
}

/// The human summary.
pub fn summary(o: &Outcome, opts: &Options) -> String {
    let c = &o.total.counts;
    let l = Latency::of(&o.total.latency);
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
    if o.interrupted_unmeasured {
        out.push_str(&format!(
            "  interrupted  before the measurement began ({}): nothing was measured\n",
            if opts.warmup.is_zero() { "during the ramp-up" } else { "during the ramp-up or warm-up" }
        ));
        out.push_str(&format!("  result       {} (exit {})\n", verdict(o.exit_code()), o.exit_code()));
        return out;
    }
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
    out.push_str(&format!(
        "  requests     {:>12}   answered {}, timed out {}, lost {}, unanswered {}\n",
        group(c.requests),
        group(c.responses),
        group(c.timeouts),
        group(c.lost),
        group(c.unanswered)
    ));
    out.push_str(&format!("  responses    {:>12}   {}/s   {mbps:.2} MB/s\n", group(c.responses), group(rps as u64)));
    if let Some(rate) = opts.rate {
        let late = Latency::of(&o.total.lateness);
        out.push_str(&format!(
            "  offered      {:>12}/s sent {}/s   send lateness µs p50 {}   p99 {}   max {}\n",
            group(rate as u64),
            group(per_second(c.requests, o) as u64),
            group(late.p50),
            group(late.p99),
            group(late.max)
        ));
    }
    if opts.churn {
        out.push_str(&format!(
            "  connections  {:>12}   {}/s\n",
            group(c.connects),
            group(per_second(c.connects, o) as u64)
        ));
    }
    out.push_str(&format!(
        "  errors       {:>12}   (connect {}, reset {}, timeout {}, unanswered {}, other {})\n",
        group(c.errors()),
        c.connect_errors,
        c.resets,
        c.timeouts,
        c.unanswered,
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
    for line in warnings(o) {
        out.push_str(&format!("  ! {line}\n"));
    }
    out.push_str(&format!("  result       {} (exit {})\n", verdict(o.exit_code()), o.exit_code()));
    out
}

/// What a reader must not miss, in words.
fn warnings(o: &Outcome) -> Vec<String> {
    let c = &o.total.counts;
    let mut w = Vec::new();
    if o.client_behind() {
        w.push(format!(
            "offered {}/s, sent {}/s: the client is the bottleneck ({} of {} due messages not sent by the \
             end); the figures describe echo-load, not the server",
            group(o.rate.unwrap_or(0.0) as u64),
            group(per_second(c.requests, o) as u64),
            group(c.unsent),
            group(o.scheduled())
        ));
    } else if o.rate.is_some() && Latency::of(&o.total.lateness).p99 > LATE_WARNING_US {
        w.push(format!(
            "the client was late: send lateness p99 {} µs is part of the latency figures",
            group(Latency::of(&o.total.lateness).p99)
        ));
    }
    if c.unanswered > 0 {
        w.push(format!(
            "{} messages had no echo when the run ended (oldest {} ms)",
            group(c.unanswered),
            group(o.total.unanswered_age.max() / 1000)
        ));
    }
    if o.stalled {
        w.push("nothing was answered for --timeout: the run was stopped before --count".into());
    }
    w
}

/// The exit status in words.
fn verdict(code: u8) -> &'static str {
    match code {
        exit::CLEAN => "clean",
        exit::MISMATCH => "MISMATCHES: echoed bytes differed",
        exit::ERRORS => "ERRORS: messages timed out, were lost or went unanswered, or nothing came back",
        exit::CLIENT_BEHIND => "CLIENT BEHIND: echo-load could not send at the offered rate",
        exit::INTERRUPTED => "INTERRUPTED: stopped before anything was measured",
        _ => "unknown",
    }
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
    use crate::{Counts, Tally, histogram};
    use std::time::Duration;

    #[test]
    fn json_has_the_contract_keys() {
        let mut latency = histogram();
        for v in [10, 20, 30, 1000] {
            latency.record(v).unwrap();
        }
        let total = Tally {
            counts: Counts { requests: 4, responses: 4, mismatches: 1, ..Counts::default() },
            latency,
            ..Tally::new()
        };
        let o = Outcome {
            total,
            per_addr: vec![Tally::new()],
            elapsed: Duration::from_secs(2),
            interrupted: false,
            interrupted_unmeasured: false,
            stalled: false,
            rate: None,
        };
        let opts = crate::Options {
            addrs: vec!["127.0.0.1:7".parse().unwrap()],
            duration: Some(Duration::from_secs(2)),
            size: 1_000_000,
            ..crate::Options::for_tests()
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
