//! Behaviour the README documents that no other test checked (part of the
//! "docs match the binary" work): each test names the README's promise and
//! fails when the binary stops keeping it. Loopback only.

mod common;

use std::time::Duration;

use common::*;

const M: &str = "metrics_listen = \"127.0.0.1:0\"\n";

/// "`echod_config_last_reload_successful`": 0 after a reload that failed, 1
/// again after one that applied.
#[test]
fn last_reload_successful_follows_each_reload() {
    let e = start(&format!("{M}workers = 1\n"));
    assert_eq!(e.scrape()["echod_config_last_reload_successful"], 1.0);
    let good = format!("listen = [\"{}\"]\n{M}workers = 1\n", e.addr)
        .replace("127.0.0.1:0\"\n", &format!("{}\"\n", e.metrics_addr()));
    let skip = e.log_len();
    e.write_config(&format!("{good}workers = 0\n"));
    e.signal(libc_sig::HUP);
    e.wait_log_after(skip, "reload failed", Duration::from_secs(5)).expect("refused");
    assert_eq!(e.scrape()["echod_config_last_reload_successful"], 0.0);
    let skip = e.log_len();
    e.write_config(&good);
    e.signal(libc_sig::HUP);
    e.wait_log_after(skip, "reloaded", Duration::from_secs(5)).expect("applied");
    assert_eq!(e.scrape()["echod_config_last_reload_successful"], 1.0);
}

/// "`--listen` / `--workers` override the file", across reloads too.
#[test]
fn command_line_overrides_survive_a_reload() {
    let over = free_port();
    let over_addr: std::net::SocketAddr = format!("127.0.0.1:{over}").parse().unwrap();
    let e = start_with("workers = 1\n", &["--workers", "3", "--listen", &over_addr.to_string()], &[]);
    assert_eq!(e.addr, over_addr, "the flag's address, not the file's");
    assert_eq!(e.wait_workers(3, Duration::from_secs(5)).len(), 3);
    let skip = e.log_len();
    e.write_config("listen = [\"127.0.0.1:0\"]\nworkers = 2\n");
    e.signal(libc_sig::HUP);
    e.wait_log_after(skip, "reloaded", Duration::from_secs(5)).expect("reloaded");
    let line = e.wait_log_after(skip, "reloaded", Duration::from_secs(1)).unwrap();
    assert!(line.contains("target 3"), "--workers 3 still wins: {line}");
    let mut s = connect(over_addr);
    assert_eq!(round_trip(&mut s, b"still here").unwrap(), b"still here");
    assert!(!e.log_lines()[skip..].iter().any(|l| l.contains("listening on")), "{}", e.log_text());
}

/// "`/healthz` ... 503 ... with no worker up".
#[test]
fn healthz_is_503_while_no_worker_serves() {
    let e = start_unready(
        &format!("listen = [\"127.0.0.1:0\"]\n{M}workers = 1\n"),
        &[("ECHOD_TEST_WORKER_CRASH", "startup")],
    );
    let metrics = e.metrics_addr();
    e.wait_log("died unexpectedly", Duration::from_secs(10)).expect("the worker dies at start");
    assert_eq!(http_get(metrics, "/healthz").0, 503);
    assert_eq!(http_get(metrics, "/livez").0, 200, "the master itself is alive");
}

/// "Byte counts go into the worker's counters ... about once a second for
/// long ones": a connection that stays open shows up in the totals. Event
/// loops flush on their tick, so even an idle connection's bytes are there;
/// a handler thread flushes between echoes, so its connection's bytes are
/// there once it echoes again a second later (README, "Metrics").
#[test]
fn a_long_lived_connection_counts_its_bytes_while_open() {
    for handler in ["event", "thread"] {
        let e = start(&format!("{M}workers = 1\nhandler = \"{handler}\"\n"));
        let mut s = connect(e.addr);
        let data = Rng::new(5).bytes(10_000);
        assert_eq!(round_trip(&mut s, &data).unwrap(), data);
        let sent = std::cell::Cell::new(10_000.0);
        let m = e.scrape_until(Duration::from_secs(5), |m| {
            if handler == "thread" {
                // Still active: one byte per look.
                round_trip(&mut s.try_clone().unwrap(), b"x").unwrap();
                sent.set(sent.get() + 1.0);
            }
            m.get("echod_bytes_received_total").is_some_and(|&b| b >= 10_000.0)
        });
        assert!(m["echod_bytes_received_total"] >= 10_000.0, "{handler}: {m:?}");
        assert!(m["echod_bytes_received_total"] <= sent.get(), "{handler}: {m:?}");
        assert_eq!(m["echod_connections_active"], 1.0, "{handler}: still open: {m:?}");
        drop(s);
    }
}

/// IPv6 clients are served and counted per address like IPv4 ones
/// (`max_connections_per_ip`).
#[test]
fn ipv6_clients_have_their_per_address_limit() {
    let e = start("listen = [\"[::1]:0\"]\nworkers = 2\nmax_connections_per_ip = 2\n");
    assert!(e.addr.is_ipv6(), "{}", e.addr);
    let mut a = connect(e.addr);
    let mut b = connect(e.addr);
    assert_eq!(round_trip(&mut a, b"a").unwrap(), b"a");
    assert_eq!(round_trip(&mut b, b"b").unwrap(), b"b");
    let mut c = connect(e.addr);
    closed_unechoed(&mut c, Duration::from_secs(5)).unwrap();
    e.wait_log("max_connections_per_ip (2) reached for ::1", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the refusal names the IPv6 client:\n{}", e.log_text()));
}

both_modes! {
    /// "Each log line names the process (and, in workers, the thread) that
    /// wrote it": a handler thread is `[worker-N PID gG conn]`, an event
    /// loop `[worker-N PID gG event-K]` (#28.6: slot, pid and generation).
    fn log_lines_name_the_worker_thread_in_each_mode() {
        let e = start("workers = 1\nlog_level = \"trace\"\n");
        let mut s = connect(e.addr);
        assert_eq!(round_trip(&mut s, b"tag").unwrap(), b"tag");
        drop(s);
        let line = e
            .wait_log("connection closed", Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no close logged:\n{}", e.log_text()));
        let thread = if mode() == "event" { "event-0" } else { "conn" };
        let pid = e.workers()[0];
        let tag = format!("[worker-0 {pid} g1 {thread}] connection closed");
        assert!(line.contains(&tag), "{mode}: {line} lacks {tag}", mode = mode());
    }
}

/// #28.6: `log_format = "json"` makes every line, the master's and the
/// workers', one JSON object with `ts`, `level`, `pid`, `role`, `generation`
/// and `msg` (a worker's with its slot, and its own pid); a reload back to
/// `text` applies to the lines after it.
#[test]
fn log_format_json_writes_every_line_as_an_object_and_reloads_to_text() {
    let mut e = start_unready("workers = 2\nlog_level = \"trace\"\nlog_format = \"json\"\n", &[]);
    let listening = e.wait_log("listening on ", Duration::from_secs(10)).expect("a listening line");
    let parse = |line: &str| -> serde_json::Value {
        serde_json::from_str(line).unwrap_or_else(|err| panic!("not one JSON object ({err}): {line}"))
    };
    let msg = parse(&listening)["msg"].as_str().unwrap().to_string();
    e.addr = msg.rsplit("listening on ").next().unwrap().trim().parse().unwrap();
    e.wait_log("ready:", Duration::from_secs(10)).expect("ready");
    let workers = e.wait_workers(2, Duration::from_secs(5));
    let mut s = connect(e.addr);
    assert_eq!(round_trip(&mut s, b"json").unwrap(), b"json");
    drop(s);
    e.wait_log("connection closed", Duration::from_secs(5)).expect("a worker's trace line");
    let lines = e.log_lines();
    let (mut master_lines, mut worker_lines) = (0, 0);
    for line in &lines {
        let v = parse(line);
        for key in ["ts", "level", "msg"] {
            assert!(v[key].is_string(), "{key} in {line}");
        }
        assert!(log_stamp(v["ts"].as_str().unwrap()).is_some(), "RFC 3339 ts: {line}");
        assert_eq!(v["generation"], 1, "{line}");
        let pid = v["pid"].as_i64().unwrap() as i32;
        match v["role"].as_str() {
            Some("master") => {
                assert_eq!(pid, e.pid(), "{line}");
                assert!(v.get("worker").is_none(), "{line}");
                master_lines += 1;
            }
            Some("worker") => {
                let slot = v["worker"].as_u64().unwrap_or_else(|| panic!("a worker's slot: {line}"));
                assert!(slot < 2 && workers.contains(&pid), "a worker's own slot and pid: {line}");
                worker_lines += 1;
            }
            _ => panic!("role: {line}"),
        }
    }
    assert!(master_lines > 0 && worker_lines > 0, "{master_lines} master and {worker_lines} worker lines:\n{lines:?}");

    let before = e.log_len();
    e.write_config(&format!("listen = [\"{}\"]\nworkers = 2\nlog_level = \"debug\"\n", e.addr));
    e.signal(libc_sig::HUP);
    let line = e.wait_log_after(before, "reload", Duration::from_secs(5)).expect("the reload's lines");
    let reloaded = e.wait_log_after(before, "[master ", Duration::from_secs(5)).unwrap_or(line);
    assert!(
        reloaded.contains(&format!("[master {}] ", e.pid())) && log_stamp(&reloaded).is_some(),
        "text again: {reloaded}"
    );
}

/// "`log_level` ... unless RUST_LOG is set": RUST_LOG wins over the file.
#[test]
fn rust_log_overrides_log_level() {
    let e = start_with("workers = 1\nlog_level = \"warn\"\n", &[], &[("RUST_LOG", "debug")]);
    e.wait_log(" DEBUG ", Duration::from_secs(5)).unwrap_or_else(|| panic!("no debug line:\n{}", e.log_text()));
    let quiet = start("workers = 1\nlog_level = \"info\"\n");
    assert!(!quiet.log_text().contains(" DEBUG "), "{}", quiet.log_text());
}

/// "`group`": started as root, master and workers take the configured group.
#[test]
fn group_is_the_process_group() {
    if !nix::unistd::geteuid().is_root() {
        return skip_or_fail("root (to start echod as root with `user`)");
    }
    let daemon = nix::unistd::Group::from_name("daemon").unwrap().expect("group daemon").gid.as_raw();
    let e = start("workers = 1\nuser = \"nobody\"\ngroup = \"daemon\"\n");
    for pid in std::iter::once(e.pid()).chain(e.workers()) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let gids: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Gid:"))
            .unwrap()
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect();
        assert!(gids.iter().all(|&g| g == daemon), "pid {pid}: {gids:?} (daemon is {daemon})");
    }
}

/// "`min_spare_threads` ... `thread_idle_timeout`": a worker keeps that many
/// idle threads, grows for a burst, and shrinks back when idle.
#[test]
fn the_thread_pool_grows_and_shrinks_back_to_its_spares() {
    let e = start(&format!("{M}workers = 1\nhandler = \"thread\"\nmin_spare_threads = 3\nthread_idle_timeout = 1\n"));
    let idle = "echod_worker_threads{worker=\"0\",state=\"idle\"}";
    let busy = "echod_worker_threads{worker=\"0\",state=\"busy\"}";
    let m = e.scrape_until(Duration::from_secs(5), |m| m.get(idle) == Some(&3.0));
    assert_eq!((m[idle], m[busy]), (3.0, 0.0), "the spares at start: {m:?}");
    let mut held: Vec<_> = (0..8).map(|_| connect(e.addr)).collect();
    for (i, s) in held.iter_mut().enumerate() {
        assert_eq!(round_trip(s, &[i as u8]).unwrap(), [i as u8]);
    }
    let m = e.scrape_until(Duration::from_secs(5), |m| m.get(busy) == Some(&8.0));
    assert_eq!(m[busy], 8.0, "one thread per connection: {m:?}");
    drop(held);
    let m = e.scrape_until(Duration::from_secs(10), |m| m.get(idle) == Some(&3.0) && m.get(busy) == Some(&0.0));
    assert_eq!((m[idle], m[busy]), (3.0, 0.0), "back to the spares after thread_idle_timeout: {m:?}");
}

/// "`queue_capacity` ... connections a worker may hold waiting for a free
/// thread": with room for one, bursts of clients find the queue full (the
/// receiver says so at debug level and holds back), the published depth
/// never exceeds one, and every client is still served. Bursts repeat until
/// the queue was full at least once, so the test proves it hit that state
/// (the first burst does, in every run so far).
#[test]
fn queue_capacity_bounds_the_waiting_connections_and_loses_none() {
    let e = start_with(
        &format!(
            "{M}workers = 1\nhandler = \"thread\"\nthreads_per_worker = 64\nmin_spare_threads = 0\nqueue_capacity = 1\n"
        ),
        &[],
        &[("RUST_LOG", "debug")],
    );
    let depth = "echod_worker_queue_depth{worker=\"0\"}";
    let mut served = 0u64;
    for burst in 0..20 {
        // The clients queue up in the listen backlog while the master is
        // stopped, so it accepts them all at once and hands them over in
        // one batch: the receiver pushes them back to back.
        stop_process(e.pid());
        let conns: Vec<_> = (0..64).map(|_| connect(e.addr)).collect();
        kill(e.pid(), libc_sig::CONT);
        let clients: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(c, mut s)| {
                std::thread::spawn(move || {
                    let msg = [burst as u8, c as u8];
                    round_trip(&mut s, &msg).map(|got| got == msg)
                })
            })
            .collect();
        for (c, h) in clients.into_iter().enumerate() {
            assert!(h.join().unwrap().unwrap_or(false), "burst {burst} client {c} not echoed");
            served += 1;
        }
        let m = e.scrape();
        assert!(m[depth] <= 1.0, "queue depth {} over queue_capacity 1", m[depth]);
        if e.log_text().contains("queue full (1 waiting)") {
            break;
        }
    }
    assert!(e.log_text().contains("queue full (1 waiting)"), "20 bursts of 64 never filled a queue of one");
    let s = e.stats_until(Duration::from_secs(5), |s| s["closed"] == served);
    assert_eq!((s["accepted"], s["errors"]), (served, 0), "{s:?}");
}

/// #28.8: `--workers auto` is the file's `workers = "auto"`, and
/// `--check-config` prints it as such, whichever set it.
#[test]
fn workers_auto_reads_the_same_from_the_flag_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("echod.toml");
    std::fs::write(&file, "workers = \"auto\"\n").unwrap();
    let file = file.to_str().unwrap();
    let (code, err, from_file) = run_to_exit(&["--check-config", "--config", file], None);
    assert_eq!(code, 0, "{err}");
    let (code, err, from_flag) = run_to_exit(&["--check-config", "--config", "/dev/null", "--workers", "auto"], None);
    assert_eq!(code, 0, "{err}");
    let workers = |out: &str| out.lines().find(|l| l.starts_with("workers = ")).map(str::to_string);
    assert_eq!(workers(&from_file).as_deref(), Some("workers = \"auto\""), "{from_file}");
    assert_eq!(workers(&from_flag), workers(&from_file), "{from_flag}");
}

/// #28.8: at debug level a start does not say "all workers full" before a
/// worker serves (there is no room yet; that is not a full echod).
#[test]
fn a_start_at_debug_level_does_not_call_its_workers_full() {
    let e = start("workers = 2\nlog_level = \"debug\"\n");
    let mut s = connect(e.addr);
    assert_eq!(round_trip(&mut s, b"x").unwrap(), b"x");
    let log = e.log_text();
    assert!(!log.contains("all workers full"), "{log}");
}

/// #28.8: `echo-load -i` against nothing is a connection error (3), not a
/// wrong echo (1), and a session that ends exits 0.
#[test]
fn echo_load_interactive_exits_as_documented() {
    let refused = format!("127.0.0.1:{}", free_port());
    let out = std::process::Command::new(echo_load())
        .args(["-i", "-a", &refused])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let e = start("workers = 1\n");
    let mut child = std::process::Command::new(echo_load())
        .args(["-i", "-a", &e.addr.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"one\ntwo\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"one\ntwo\n");
}

/// #28.8: the unit's documentation names the man pages, and its IPv6
/// recipe lists an IPv4 address too (echod's IPv6 sockets are v6-only).
#[test]
fn the_unit_points_at_the_man_pages_and_a_dual_stack_recipe() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/echod.service")).unwrap();
    let docs = unit.lines().find(|l| l.starts_with("Documentation=")).expect("Documentation=");
    assert!(docs.contains("man:echod(8)") && docs.contains("man:echod.toml(5)"), "{docs}");
    assert!(!unit.contains("listen = [\"[::]:7\"]"), "an IPv6-only recipe serves no IPv4 client");
}

/// An ordinary run (connections come and go, a reload, a stop) logs no
/// error and no warning: an operator's alert on ERROR must mean something.
/// (Found by mutation testing: `accept` treating EAGAIN as an error still
/// served every client, and only the log showed it.)
#[test]
fn an_ordinary_run_logs_no_error_or_warning() {
    let mut e = start("workers = 2\n");
    for i in 0..50u32 {
        let mut s = connect(e.addr);
        assert_eq!(round_trip(&mut s, &i.to_le_bytes()).unwrap(), i.to_le_bytes());
    }
    let skip = e.log_len();
    e.write_config(&format!("listen = [\"{}\"]\nworkers = 2\n", e.addr));
    e.signal(libc_sig::HUP);
    e.wait_log_after(skip, "ready:", Duration::from_secs(10)).expect("ready after the reload");
    let mut s = connect(e.addr);
    assert_eq!(round_trip(&mut s, b"after").unwrap(), b"after");
    drop(s);
    e.signal(libc_sig::TERM);
    assert_eq!(e.wait_exit(Duration::from_secs(10)), Some(0));
    let bad: Vec<String> =
        e.log_lines().into_iter().filter(|l| l.contains(" ERROR ") || l.contains(" WARN ")).collect();
    assert!(bad.is_empty(), "{bad:#?}");
}
