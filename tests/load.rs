//! echo-load against real servers: echod, and a test server that corrupts a
//! byte now and then. Short, loopback-only runs; functional checks, not
//! speed checks.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::*;

both_modes! {
    fn a_short_run_against_echod_is_clean_and_json_has_every_contract_key() {
        let e = start("workers = 2\n");
        let addr = e.addr.to_string();
        let out = run_load(&["--addr", &addr, "--connections", "20", "--duration", "1", "--size", "512", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let j = output_json(&out);
        for key in ["requests", "responses", "errors", "mismatches", "rps", "mbps"] {
            assert!(j.get(key).is_some_and(|v| v.is_number()), "{key} missing: {j}");
        }
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(j["latency_us"][key].is_u64(), "latency_us.{key} missing: {j}");
        }
        assert!(j["responses"].as_u64().unwrap() > 0);
        assert_eq!((j["errors"].as_u64(), j["mismatches"].as_u64()), (Some(0), Some(0)), "{j}");
        let l = &j["latency_us"];
        assert!(l["p50"].as_u64() <= l["p99"].as_u64() && l["p99"].as_u64() <= l["max"].as_u64());
        // Every byte that came back was counted by echod too.
        let bytes = j["bytes_received"].as_u64().unwrap();
        let s = e.stats_until(Duration::from_secs(5), |s| s["closed"] == 20);
        assert!(s["bytes_out"] >= bytes, "{s:?} vs {bytes}");
    }

    fn the_human_summary_reports_every_figure() {
        let e = start("workers = 1\n");
        let out = run_load(&["--addr", &e.addr.to_string(), "-c", "4", "-d", "0.5", "--pipeline", "8", "-s", "100"]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        for word in ["requests", "responses", "MB/s", "errors", "mismatches", "p50", "p99.9", "pipeline 8"] {
            assert!(text.contains(word), "{word} missing:\n{text}");
        }
    }
}

/// Echoes, but flips one byte in every `every`-th chunk it reads.
fn corrupting_server(every: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for conn in l.incoming().flatten() {
            thread::spawn(move || {
                let mut s = conn;
                let mut buf = [0u8; 4096];
                let mut reads = 0usize;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    reads += 1;
                    if reads % every == 0 {
                        buf[n / 2] ^= 0x20;
                    }
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn corrupted_echoes_are_counted_as_mismatches() {
    let addr = corrupting_server(50).to_string();
    let out = run_load(&["--addr", &addr, "-c", "4", "-d", "1", "-s", "64", "--json"]);
    let j = output_json(&out);
    let m = j["mismatches"].as_u64().unwrap();
    assert!(m > 0, "corruption went unnoticed: {j}");
    // About one in 50 messages: counted, not ignored, not over-counted.
    let responses = j["responses"].as_u64().unwrap();
    assert!(m * 20 < responses && m * 200 > responses, "{m} mismatches in {responses} responses");
    assert_eq!(out.status.code(), Some(1), "a mismatch makes the exit status 1");
}

both_modes! {
    fn open_loop_holds_the_requested_rate() {
        let e = start("workers = 2\n");
        let out = run_load(&["--addr", &e.addr.to_string(), "-c", "10", "-d", "3", "--rate", "1500", "--json"]);
        let j = output_json(&out);
        let rps = j["rps"].as_f64().unwrap();
        assert!((rps - 1500.0).abs() < 1500.0 * 0.05, "asked 1500/s, got {rps:.0}/s");
        assert_eq!(j["mode"], "open");
        assert_eq!(j["errors"].as_u64(), Some(0));
    }
}

#[test]
fn open_loop_latency_includes_a_stall_closed_loop_would_hide() {
    // A server that stalls 300 ms once: on a fixed schedule every message
    // queued behind the stall is late, and the tail shows it.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let mut s = l.incoming().next().unwrap().unwrap();
        let mut buf = [0u8; 4096];
        let mut stalled = false;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                return;
            }
            if !stalled {
                stalled = true;
                thread::sleep(Duration::from_millis(300));
            }
            let _ = s.write_all(&buf[..n]);
        }
    });
    let out = run_load(&["--addr", &addr.to_string(), "-c", "1", "-t", "1", "-d", "1.5", "--rate", "200", "--json"]);
    let j = output_json(&out);
    let l = &j["latency_us"];
    assert!(l["max"].as_u64().unwrap() >= 250_000, "the stall is visible at the top: {j}");
    // Many messages were due during the stall, so p90 is late too.
    assert!(l["p90"].as_u64().unwrap() >= 50_000, "queued messages are charged their wait: {j}");
}

both_modes! {
    fn churn_opens_and_closes_connections() {
        let e = start("workers = 2\n");
        let out = run_load(&["--addr", &e.addr.to_string(), "-c", "8", "-d", "1", "--churn", "--json"]);
        let j = output_json(&out);
        let connects = j["connects"].as_u64().unwrap();
        assert!(connects > 100, "{j}");
        assert!(j["responses"].as_u64().unwrap() + 8 >= connects);
        assert_eq!(j["errors"].as_u64(), Some(0), "{j}");
        let s = e.stats_until(Duration::from_secs(5), |s| s["active"] == 0);
        assert!(s["accepted"] >= connects, "echod saw every connection: {s:?} vs {connects}");
    }

    fn count_bounds_a_run() {
        let e = start("workers = 1\n");
        let out = run_load(&["--addr", &e.addr.to_string(), "-c", "2", "--count", "500", "--json"]);
        let j = output_json(&out);
        assert_eq!((j["requests"].as_u64(), j["responses"].as_u64()), (Some(500), Some(500)), "exactly --count: {j}");
    }

    fn sigint_prints_the_partial_summary() {
        let e = start("workers = 1\n");
        let child = spawn_load(e.addr, &["-c", "2", "-d", "60"]);
        // Echoes are flowing (echod's live byte counters show them).
        e.stats_until(Duration::from_secs(10), |s| s["bytes_out"] > 0);
        kill(child.id() as i32, libc_sig::INT);
        let j = load_json(child);
        assert_eq!(j["interrupted"], true);
        assert!(j["responses"].as_u64().unwrap() > 0 && j["duration_s"].as_f64().unwrap() < 10.0, "{j}");
    }

    fn interactive_mode_echoes_lines() {
        let e = start("workers = 1\ntransform = \"upper\"\n");
        let mut child = Command::new(echo_load())
            .args(["--addr", &e.addr.to_string(), "--interactive"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"hello\nworld\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO\nWORLD\n");
    }
}

#[test]
fn unreachable_server_is_reported_not_hung() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = run_load(&["--addr", &format!("127.0.0.1:{port}"), "-c", "2", "-d", "0.5", "--json"]);
    let j = output_json(&out);
    assert!(j["connect_errors"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(j["responses"].as_u64(), Some(0));
    assert_eq!(out.status.code(), Some(3), "nothing came back: the errors status");
    let bad = run_load(&["--addr", "nonsense", "-d", "1"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn version_names_the_crate_version_and_commit() {
    let out = run_load(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(&format!("echo-load {} (git ", env!("CARGO_PKG_VERSION"))), "{text}");
    assert!(!text.contains("(git unknown)"), "built in a checkout, the commit is known: {text}");
}

#[test]
fn a_fleet_of_addresses_shares_the_connections_and_is_reported_per_address() {
    let (a, b) = (start("workers = 1\n"), start("workers = 1\n"));
    let (aa, ba) = (a.addr.to_string(), b.addr.to_string());
    let out = run_load(&["--addr", &aa, "--addr", &ba, "-c", "4", "-d", "1", "-t", "1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j = output_json(&out);
    assert_eq!(j["addr"], format!("{aa},{ba}"));
    let per = j["per_addr"].as_array().expect("per_addr");
    assert_eq!(per.len(), 2);
    let mut sum = 0;
    for (p, addr) in per.iter().zip([&aa, &ba]) {
        assert_eq!(p["addr"], addr.as_str());
        assert_eq!(p["connections"], 2, "{p}");
        assert!(p["responses"].as_u64().unwrap() > 100, "{p}");
        assert_eq!(p["errors"], 0, "{p}");
        assert_eq!(p["mismatches"], 0, "{p}");
        sum += p["responses"].as_u64().unwrap();
    }
    assert_eq!(sum, j["responses"].as_u64().unwrap(), "per-address responses add up to the total");
    // Both servers saw connections: their own counters say so.
    for e in [&a, &b] {
        let s = e.stats_until(Duration::from_secs(5), |s| s["accepted"] >= 2);
        assert!(s["accepted"] >= 2, "{s:?}");
    }
    let human = run_load(&["--addr", &aa, "--addr", &ba, "-c", "2", "-d", "0.3", "-t", "1"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains(&aa) && text.contains(&ba) && text.contains("1 conns"), "{text}");
}

both_modes! {
    /// #27.14: the ramp-up does not stretch the schedule. 200 connections
    /// opened over 1 s, 1,000 msg/s for 1 s: 1,000 messages are due in the
    /// measured window. Before, each connection's schedule started at its
    /// own ramp-up slot and the window opened at the start, so only the
    /// connections opened early enough had anything due: 166 of 1,000
    /// ("offered 1,000/s sent 166/s", exit 0).
    fn the_ramp_up_does_not_stretch_the_schedule() {
        let e = start("workers = 1\n");
        let out = run_load(&[
            "--addr", &e.addr.to_string(), "-c", "200", "--ramp-up", "1", "--rate", "1000", "-d", "1", "--json",
        ]);
        let j = output_json(&out);
        let scheduled = j["scheduled"].as_u64().unwrap();
        assert!((998..=1002).contains(&scheduled), "rate x duration are due in the window: {j}");
        assert_eq!(j["requests"].as_u64().unwrap() + j["unsent"].as_u64().unwrap(), scheduled, "{j}");
        assert!(j["sent_rps"].as_f64().unwrap() >= 990.0, "the whole rate was offered: {j}");
        assert_eq!(j["client_behind"], false, "{j}");
        assert_eq!(j["errors"].as_u64(), Some(0), "{j}");
        assert_eq!(out.status.code(), Some(0), "{j}");
    }

    /// #27.16: Ctrl-C during the warm-up is the user's doing: exit 130 and
    /// a summary that says nothing was measured. Before: "measured 0.00 s
    /// ... interrupted", then exit 3, "nothing came back", blaming the
    /// server.
    fn ctrl_c_during_the_warm_up_exits_130_and_blames_no_one() {
        let e = start("workers = 1\n");
        for json in [true, false] {
            let mut args = vec!["--addr".to_string(), e.addr.to_string(), "-c".into(), "2".into()];
            args.extend(["-w", "60", "-d", "1"].map(String::from));
            if json {
                args.push("--json".into());
            }
            let child = Command::new(echo_load())
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // The warm-up's echoes are flowing (echod's live byte counters).
            let before = e.stats_until(Duration::from_secs(10), |s| s["active"] == 2)["bytes_out"];
            e.stats_until(Duration::from_secs(10), |s| s["bytes_out"] > before);
            kill(child.id() as i32, libc_sig::INT);
            let out = child.wait_with_output().unwrap();
            assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stdout));
            if json {
                let j = output_json(&out);
                assert_eq!((&j["interrupted"], &j["interrupted_unmeasured"], &j["exit_code"]), (&true.into(), &true.into(), &130.into()), "{j}");
            } else {
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(text.contains("nothing was measured") && text.contains("(exit 130)"), "{text}");
                assert!(!text.contains("ERRORS"), "the server is not blamed: {text}");
            }
        }
    }

    /// Ctrl-C during the measurement prints the partial result, whose
    /// verdict is the exit status (as ping and wrk do): clean here.
    fn ctrl_c_during_the_measurement_exits_with_the_partial_verdict() {
        let e = start("workers = 1\n");
        let child = spawn_load(e.addr, &["-c", "2", "-d", "60", "--ramp-up", "0"]);
        e.stats_until(Duration::from_secs(10), |s| s["bytes_out"] > 0);
        kill(child.id() as i32, libc_sig::INT);
        let out = child.wait_with_output().unwrap();
        let j = output_json(&out);
        assert_eq!((&j["interrupted"], &j["interrupted_unmeasured"]), (&true.into(), &false.into()), "{j}");
        assert_eq!(out.status.code(), Some(0), "{j}");
        assert_eq!(j["exit_code"], 0, "{j}");
    }
}
