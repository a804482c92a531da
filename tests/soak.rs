//! Soak: minutes of mixed load with RSS and fd counts sampled every few
//! seconds; after warm-up nothing may grow. Not part of the default run:
//!
//!     SOAK_SECS=300 cargo test --release --test soak -- --ignored --nocapture
//!
//! Mixed load: churning clients, long-lived echoers, idle connections that
//! time out, slow readers whose writes time out, resets, and 8 MiB streams.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;

both_modes! {
    #[ignore = "minutes long; run with --ignored (see the module docs)"]
    fn soak_mixed_load_has_no_growth_after_warm_up() {
        let secs: u64 = std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
        raise_own_nofile(8192);
        let e = start("workers = 2\nidle_timeout = 3\nwrite_timeout = 2\n");
        let traffic = Traffic::start(e.addr, 12, 8);
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(secs);
        let addr = e.addr;
        // Disturbances in the background, in waves.
        let chaos = thread::spawn(move || {
            let mut rng = Rng::new(1);
            let mut streams_ok = 0u64;
            while Instant::now() < end {
                let idle: Vec<_> = (0..200).map(|_| connect(addr)).collect(); // time out after 3 s
                for _ in 0..20 {
                    let s = socket2::Socket::from(connect(addr));
                    let _ = s.send(&rng.bytes(32 * 1024));
                    let _ = s.set_linger(Some(Duration::ZERO));
                }
                let slow: Vec<_> = (0..5)
                    .map(|i| {
                        thread::spawn(move || {
                            use std::io::Write;
                            let mut s = connect(addr);
                            let chunk = Rng::new(i).bytes(1 << 20);
                            for _ in 0..16 {
                                if s.write_all(&chunk).is_err() {
                                    break;
                                }
                            }
                        })
                    })
                    .collect();
                let (a, b, n) = stream_through(addr, 8 << 20, rng.next());
                assert!(a == b && n == 8 << 20, "8 MiB stream differs");
                streams_ok += 1;
                slow.into_iter().for_each(|t| t.join().unwrap());
                thread::sleep(Duration::from_secs(4));
                drop(idle);
            }
            streams_ok
        });
        let mut samples = Vec::new();
        println!("   t(s)  rss(KiB)  fds  threads  round_trips");
        while Instant::now() < end {
            thread::sleep(Duration::from_secs(3));
            let pids: Vec<i32> = std::iter::once(e.pid()).chain(e.workers()).collect();
            let rss = rss_kb(&pids);
            let fds: usize = pids.iter().map(|&p| fd_count(p)).sum();
            let threads: usize =
                pids.iter().map(|&p| std::fs::read_dir(format!("/proc/{p}/task")).map(|d| d.count()).unwrap_or(0)).sum();
            let t = t0.elapsed().as_secs();
            println!("{t:7}  {rss:8}  {fds:4}  {threads:7}  {}", traffic.progress());
            samples.push((t, rss, fds));
        }
        let streams = chaos.join().unwrap();
        let tally = traffic.stop();
        assert!(tally.failures.is_empty() && tally.mismatches == 0, "{:?}", &tally.failures[..tally.failures.len().min(5)]);
        // After warm-up (first quarter), the second half may not exceed the first.
        let warm = samples.len() / 4;
        let body = &samples[warm..];
        let (first, second) = body.split_at(body.len() / 2);
        let max_rss = |s: &[(u64, u64, usize)]| s.iter().map(|x| x.1).max().unwrap_or(0);
        let max_fds = |s: &[(u64, u64, usize)]| s.iter().map(|x| x.2).max().unwrap_or(0);
        println!(
            "soak {secs}s: {} round trips, {} connections, {} 8 MiB streams, failures 0, mismatches 0; \
             RSS max {} KiB then {} KiB; fds max {} then {}",
            tally.round_trips,
            tally.connections,
            streams,
            max_rss(first),
            max_rss(second),
            max_fds(first),
            max_fds(second)
        );
        assert!(max_rss(second) <= max_rss(first) * 11 / 10 + 4096, "RSS grew after warm-up");
        assert!(max_fds(second) <= max_fds(first) + 50, "fds grew after warm-up");
        // When the load is gone, so are its fds.
        let s = e.stats_until(Duration::from_secs(10), |s| s["active"] == 0);
        assert_eq!(s["active"], 0);
    }
}
