//! Changing a running echod without clients noticing: reload under traffic,
//! runtime scaling, crash-loop back-off, fast stop, recycling, stats.
//! Real binary, loopback, bounded.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn rewrite(e: &Echod, text: &str) {
    // Keep the test's loopback port: reloads must not move the listener.
    e.write_config(&format!("listen = [\"{}\"]\n{text}", e.addr));
}

both_modes! {
    fn reloads_under_traffic_lose_nothing_and_a_broken_file_is_ignored() {
        let e = start("workers = 2\nshutdown_timeout = 20\n");
        let traffic = Traffic::start(e.addr, 24, 6);
        traffic.expect_progress(300, Duration::from_secs(10));

        // 1: more workers and a smaller buffer.
        let skip = e.log_len();
        rewrite(&e, "workers = 3\nbuffer_size = 4096\nshutdown_timeout = 20\n");
        e.signal(libc_sig::HUP);
        assert!(e.wait_log_after(skip, "reloaded", Duration::from_secs(5)).is_some(), "{}", e.log_text());
        let s = e.stats_until(Duration::from_secs(10), |s| s["workers"] == 3);
        assert_eq!(s["workers"], 3, "the new worker count took effect: {s:?}");
        traffic.expect_progress(300, Duration::from_secs(10));

        // 2: a broken file is reported (file, line, key) and changes nothing.
        let skip = e.log_len();
        rewrite(&e, "workers = 3\nbuffer_size = \"big\"\n");
        e.signal(libc_sig::HUP);
        let err = e.wait_log_after(skip, "reload failed", Duration::from_secs(5)).expect("broken reload not reported");
        assert!(err.contains("echod.toml:3") && err.contains("`buffer_size`"), "{err}");
        // Traffic flows on through the failed reload, on the same workers.
        traffic.expect_progress(300, Duration::from_secs(10));
        assert_eq!(e.stats()["workers"], 3);

        // 3: back to two workers, another buffer size.
        let skip = e.log_len();
        rewrite(&e, "workers = 2\nbuffer_size = 1024\nshutdown_timeout = 20\n");
        e.signal(libc_sig::HUP);
        assert!(e.wait_log_after(skip, "reloaded", Duration::from_secs(5)).is_some());
        let s = e.stats_until(Duration::from_secs(10), |s| s["workers"] == 2);
        assert_eq!(s["workers"], 2, "{s:?}");
        traffic.expect_progress(300, Duration::from_secs(10));

        let t = traffic.stop();
        assert!(t.failures.is_empty(), "failed connections during reloads: {:?}", &t.failures[..t.failures.len().min(5)]);
        assert_eq!(t.mismatches, 0);
        assert!(t.connections > 100 && t.round_trips > 1000, "not enough traffic to mean anything: {t:?}");
        // Every connection the clients made was accepted and is accounted for.
        let s = e.stats_until(Duration::from_secs(5), |s| s["closed"] == t.connections);
        assert_eq!((s["accepted"], s["closed"]), (t.connections, t.connections), "{s:?}");
        assert_eq!((s["bytes_in"], s["bytes_out"]), (t.bytes, t.bytes), "{s:?}");
    }

    fn ttin_and_ttou_change_the_worker_count_and_survive_a_reload() {
        let e = start("workers = 2\nshutdown_timeout = 1\n");
        e.signal(libc_sig::TTIN);
        assert_eq!(e.wait_workers(3, Duration::from_secs(5)).len(), 3);
        e.signal(libc_sig::TTIN);
        assert_eq!(e.wait_workers(4, Duration::from_secs(5)).len(), 4);
        // One TTOU at a time, each awaited (signals sent back to back may
        // coalesce into one), down to the floor and once more past it.
        for n in [3, 2, 1] {
            e.signal(libc_sig::TTOU);
            assert_eq!(e.wait_workers(n, Duration::from_secs(10)).len(), n);
        }
        let skip = e.log_len();
        e.signal(libc_sig::TTOU);
        e.expect_log_count(skip, "workers stay at 1", 1, Duration::from_secs(5));
        assert_eq!(e.workers().len(), 1, "never below one");
        // A reload that leaves `workers` alone keeps the scaled count...
        rewrite(&e, "workers = 2\nshutdown_timeout = 1\nbuffer_size = 2048\n");
        let skip = e.log_len();
        e.signal(libc_sig::HUP);
        e.expect_log_count(skip, "reloaded", 1, Duration::from_secs(5));
        // The reload replaces the one worker with one of the new generation
        // (never two: the scaled count is kept) and reports ready again.
        e.expect_log_count(skip, "ready:", 1, Duration::from_secs(10));
        assert_eq!(e.wait_workers(1, Duration::from_secs(5)).len(), 1);
        assert_eq!(e.stats()["workers"], 1);
        // ...one that changes it wins.
        rewrite(&e, "workers = 3\nshutdown_timeout = 1\n");
        e.signal(libc_sig::HUP);
        assert_eq!(e.wait_workers(3, Duration::from_secs(10)).len(), 3);
        let mut s = connect(e.addr);
        assert_eq!(round_trip(&mut s, b"scaled").unwrap(), b"scaled");
    }

    fn workers_crashing_at_start_are_backed_off_not_respawned_in_a_loop() {
        let mut e = start_unready("workers = 1\n", &[("ECHOD_TEST_WORKER_CRASH", "startup")]);
        // Back-off after the k-th failure in a row is 0.1 s x 2^(k-1): each
        // start comes at least that long after the one before (the failure
        // follows the start). Six starts see delays 0.1 .. 1.6 s.
        e.expect_log_count(0, " started (pid", 6, Duration::from_secs(20));
        let starts = e.log_times(" started (pid");
        for (k, pair) in starts.windows(2).take(5).enumerate() {
            let gap = pair[1] - pair[0];
            let backoff = Duration::from_millis(100 << k);
            // 10 ms of slack for the master's timer and the millisecond stamps.
            assert!(gap + Duration::from_millis(10) >= backoff, "start {} came {gap:?} after the one before, back-off {backoff:?}:\n{}", k + 2, e.log_text());
        }
        assert!(e.log_text().contains("crash loop"), "crash loop not reported:\n{}", e.log_text());
        assert!(!e.log_text().contains("ready:"));
        // The master itself stays responsive and stops cleanly.
        e.signal(libc_sig::TERM);
        assert_eq!(e.wait_exit(Duration::from_secs(5)), Some(0));
    }

    fn quit_exits_at_once_and_leaves_no_process() {
        let mut e = start("workers = 2\nshutdown_timeout = 60\n");
        let workers = e.wait_workers(2, Duration::from_secs(5));
        let mut clients: Vec<_> = (0..5).map(|_| connect(e.addr)).collect();
        round_trip(&mut clients[0], b"x").unwrap();
        let t0 = Instant::now();
        e.signal(libc_sig::QUIT);
        assert_eq!(e.wait_exit(Duration::from_secs(5)), Some(0));
        assert!(t0.elapsed() < Duration::from_secs(2), "fast stop took {:?}", t0.elapsed());
        assert!(wait_gone(e.pid(), &workers, Duration::from_secs(2)), "workers left behind: {:?}", e.live_seen_workers());
        for c in &mut clients {
            closed_by_server(c, Duration::from_secs(1)).expect("clients were disconnected");
        }
    }

    fn term_during_a_reload_still_stops_cleanly() {
        // Generation 2's worker never reports ready (worker 0 of generation
        // 1 does), so the TERM lands exactly while the reload waits for it.
        let mut e = start_with("workers = 1\nshutdown_timeout = 2\n", &[], &[("ECHOD_TEST_WORKER_CRASH", "hang-but-first")]);
        let mut held = connect(e.addr);
        assert_eq!(round_trip(&mut held, b"held").unwrap(), b"held");
        let skip = e.log_len();
        rewrite(&e, "workers = 1\nshutdown_timeout = 2\nbuffer_size = 2048\n");
        e.signal(libc_sig::HUP);
        let started = e.expect_log_count(skip, "generation 2)", 1, Duration::from_secs(5));
        let gen2 = pid_in(&started[0]);
        e.track(gen2);
        e.expect_log_count(skip, "never reports ready", 1, Duration::from_secs(5));
        // Generation 1's worker is replaced only once generation 2's is ready.
        let gen1 = pid_in(&e.wait_log("generation 1)", Duration::ZERO).expect("generation 1 logged"));
        assert!(alive(gen1) && alive(gen2), "not during the reload:\n{}", e.log_text());
        e.signal(libc_sig::TERM);
        assert_eq!(e.wait_exit(Duration::from_secs(10)), Some(0), "{}", e.log_text());
        // Every worker the master ever logged as started is gone.
        let pids: Vec<i32> = e.log_lines().iter().filter(|l| l.contains(" started (pid")).map(|l| pid_in(l)).collect();
        assert_eq!(pids.len(), 2, "{}", e.log_text());
        assert!(wait_gone(e.pid(), &pids, Duration::from_secs(3)), "left behind: {:?}\n{}", e.live_seen_workers(), e.log_text());
        assert!(closed_by_server(&mut held, Duration::from_secs(3)).is_ok(), "the held client was not closed");
    }

    fn workers_are_recycled_after_max_connections_with_jitter() {
        let e = start("workers = 2\nmax_connections_per_worker = 10\nmax_connections_per_worker_jitter = 5\n");
        let mut pids = std::collections::HashSet::new();
        for i in 0..120u32 {
            let mut s = connect(e.addr);
            let msg = i.to_le_bytes();
            assert_eq!(round_trip(&mut s, &msg).unwrap(), msg, "connection {i}");
            pids.extend(e.workers());
        }
        let recycled = e.log_lines().iter().filter(|l| l.contains("recycled after")).count();
        // 120 connections over workers allowed 10..15 each: at least 6 recycles.
        assert!(recycled >= 6, "{recycled} recycles:\n{}", e.log_text());
        assert!(pids.len() >= 8, "{} distinct workers", pids.len());
        let s = e.stats_until(Duration::from_secs(5), |s| s["closed"] == 120);
        assert_eq!((s["accepted"], s["closed"], s["errors"]), (120, 120, 0), "{s:?}");
    }

    fn usr1_and_periodic_stats_report_the_same_numbers() {
        let e = start("workers = 2\nstats_interval = 0.3\n");
        let mut s = connect(e.addr);
        round_trip(&mut s, b"count me").unwrap();
        drop(s);
        // Two periodic lines 0.3 s apart, the second after the close.
        let skip = e.log_len();
        e.expect_log_count(skip, "stats: ", 2, Duration::from_secs(3));
        let t = e.log_times("stats: ");
        let gap = t[t.len() - 1] - t[t.len() - 2];
        assert!(gap >= Duration::from_millis(250), "periodic lines {gap:?} apart, interval 0.3 s");
        let skip = e.log_len();
        let usr1 = e.stats_until(Duration::from_secs(3), |s| s["closed"] == 1);
        assert_eq!((usr1["accepted"], usr1["bytes_in"], usr1["bytes_out"]), (1, 8, 8));
        // One line per worker with pid, active, accepted, bytes, threads, queue.
        let w = e.wait_log_after(skip, "worker 0: pid=", Duration::from_secs(2)).expect("per-worker line");
        for key in ["active=", "accepted=", "bytes_in=", "busy=", "idle=", "queued="] {
            assert!(w.contains(key), "{key} missing in {w}");
        }
        // The next periodic line agrees with USR1.
        let skip = e.log_len();
        let periodic = parse_kv(&e.wait_log_after(skip, "stats: ", Duration::from_secs(2)).unwrap());
        assert_eq!((periodic["accepted"], periodic["bytes_in"]), (usr1["accepted"], usr1["bytes_in"]));
    }

    fn reload_moves_listeners_without_touching_open_connections() {
        let e = start("workers = 1\n");
        let mut held = connect(e.addr);
        round_trip(&mut held, b"before").unwrap();
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let new_addr = probe.local_addr().unwrap();
        drop(probe);
        e.write_config(&format!("listen = [\"{new_addr}\"]\nworkers = 1\nshutdown_timeout = 30\n"));
        e.signal(libc_sig::HUP);
        assert!(e.wait_log(&format!("listening on {new_addr}"), Duration::from_secs(5)).is_some(), "{}", e.log_text());
        assert!(e.wait_log(&format!("no longer listening on {}", e.addr), Duration::from_secs(5)).is_some());
        let mut fresh = connect(new_addr);
        assert_eq!(round_trip(&mut fresh, b"new").unwrap(), b"new");
        assert_eq!(round_trip(&mut held, b"still").unwrap(), b"still", "open connection survived the reload");
        assert!(std::net::TcpStream::connect_timeout(&e.addr, Duration::from_millis(500)).is_err());
    }

    fn a_worker_that_never_becomes_ready_is_killed_and_retried() {
        let mut e = start_unready("workers = 1\n", &[("ECHOD_TEST_WORKER_CRASH", "hang")]);
        // START_TIMEOUT is 10 s.
        let line = e.wait_log("did not become ready", Duration::from_secs(15));
        assert!(line.is_some(), "a wedged start was not noticed:\n{}", e.log_text());
        let died = e.log_len();
        assert!(e.wait_log("died unexpectedly", Duration::from_secs(3)).is_some());
        assert!(
            e.wait_log_after(died, " started (pid", Duration::from_secs(3)).is_some(),
            "no second attempt:\n{}",
            e.log_text()
        );
        e.signal(libc_sig::TERM);
        assert_eq!(e.wait_exit(Duration::from_secs(5)), Some(0));
    }
}

/// The timing checks above read echod's own timestamps: the parse is exact
/// (leap day, epoch) and refuses a line without one.
#[test]
fn log_stamps_are_the_lines_own_time() {
    let ms = |s: &str| log_stamp(s).map(|d| d.as_millis());
    assert_eq!(ms("1970-01-01T00:00:01.500Z INFO x"), Some(1500));
    assert_eq!(ms("2026-12-02T14:24:03.483Z INFO  [master 1] up"), Some(1_796_221_443_483));
    assert_eq!(ms("2024-02-29T23:59:59.999Z"), Some(1_709_251_199_999));
    assert_eq!(ms("worker 0 started"), None);
}
