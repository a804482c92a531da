//! echod as a systemd citizen, with real systemd tools and no systemd as PID
//! 1: unit verification, socket activation via systemd-socket-activate, the
//! sd_notify protocol on a socket the test owns, journal-style logging, and
//! the privilege drop.

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Runs echod under systemd-socket-activate on 127.0.0.1 `ports`, named
/// `fdnames` (colon-separated, as `--fdname`), its stderr in `log`. The guard
/// kills echod and its workers by PID.
fn socket_activated(
    ports: &[u16],
    fdnames: &str,
    config: &std::path::Path,
    log: &std::path::Path,
) -> (std::process::Child, Defer<impl FnMut() + use<>>) {
    let mut cmd = Command::new("systemd-socket-activate");
    for port in ports {
        cmd.arg("-l").arg(format!("127.0.0.1:{port}"));
    }
    let child = cmd
        .arg(format!("--fdname={fdnames}"))
        .arg(ECHOD)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd)");
    let pid = child.id() as i32;
    let guard = Defer(move || {
        let workers = children_of(pid);
        kill(pid, libc_sig::KILL);
        workers.into_iter().for_each(|w| kill(w, libc_sig::KILL));
    });
    (child, guard)
}

/// Connects to a socket-activated port. systemd-socket-activate holds the
/// socket and execs echod on the first connection, which waits in the
/// backlog until echod accepts it.
fn connect_activated(port: u16) -> std::net::TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    let s = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("connect to 127.0.0.1:{port}: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn units_pass_systemd_analyze_verify_and_score_well() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let service = std::fs::read_to_string(format!("{root}/systemd/echod.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/local/bin/echod --config /etc/echod/echod.toml"));
    // verify insists that ExecStart exists: point it at the binary under test.
    std::fs::write(dir.path().join("echod.service"), service.replace("/usr/local/bin/echod", ECHOD)).unwrap();
    std::fs::copy(format!("{root}/systemd/echod.socket"), dir.path().join("echod.socket")).unwrap();
    let units = [dir.path().join("echod.service"), dir.path().join("echod.socket")];
    // --man=no: Documentation= names echod(8), which the package installs
    // (debian/test.sh verifies the installed units with their pages).
    let out =
        Command::new("systemd-analyze").args(["verify", "--man=no"]).args(&units).output().expect("systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "verify: {err}");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&units[0])
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("exposure level for echod.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no score in:\n{text}"));
    assert!(score <= 2.0, "exposure {score} (README documents 1.8)");
}

/// The unit's ExecReload= lines, as systemd would run them for echod
/// (pid `main`, config `config`, the binary under test): in order, each
/// waited for, stopping at the first that fails. Returns the status of the
/// last one run and its stderr.
fn run_exec_reload(main: i32, config: &std::path::Path) -> (Option<i32>, String) {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/echod.service")).unwrap();
    let lines: Vec<&str> = unit.lines().filter_map(|l| l.strip_prefix("ExecReload=")).collect();
    assert!(lines.len() >= 2, "ExecReload= checks, then signals: {lines:?}");
    let mut last = (None, String::new());
    for line in lines {
        let line = line
            .replace("/usr/local/bin/echod", ECHOD)
            .replace("/etc/echod/echod.toml", config.to_str().unwrap())
            .replace("$MAINPID", &main.to_string());
        let words: Vec<&str> = line.split_whitespace().collect();
        let out = Command::new(words[0]).args(&words[1..]).stdin(Stdio::null()).output().unwrap();
        last = (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned());
        if !out.status.success() {
            break;
        }
    }
    last
}

/// #28.2: `systemctl reload` fails on a broken file, naming its file, line
/// and key, and sends no HUP; on a good file it reloads.
#[test]
fn the_units_reload_checks_the_file_before_it_signals() {
    let e = start("workers = 1\n");
    let skip = e.log_len();
    e.write_config(&format!("listen = [\"{}\"]\nworkers = 1\nbuffer_size = \"big\"\n", e.addr));
    let (code, err) = run_exec_reload(e.pid(), &e.config);
    assert_eq!(code, Some(78), "a reload to a broken file succeeded: {err}");
    assert!(err.contains(&format!("{}:3", e.config.display())) && err.contains("buffer_size"), "{err}");
    e.write_config(&format!("listen = [\"{}\"]\nworkers = 1\nbuffer_size = 2048\n", e.addr));
    let (code, err) = run_exec_reload(e.pid(), &e.config);
    assert_eq!(code, Some(0), "{err}");
    e.wait_log_after(skip, "reloaded", Duration::from_secs(10)).unwrap_or_else(|| panic!("{}", e.log_text()));
    // The broken file was never signalled: one reload, the good one.
    let log = e.log_lines()[skip..].join("\n");
    assert!(!log.contains("reload failed"), "the broken file reached the daemon:\n{log}");
    assert_eq!(log.matches("] reloaded ").count(), 1, "{log}");
}

both_modes! {
    fn socket_activation_serves_on_the_passed_sockets_and_a_reload_keeps_them() {
        let (port, mport) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("echod.toml");
        // The file's own listen address must be ignored while activated.
        std::fs::write(&config, in_test_mode("listen = [\"127.0.0.1:0\"]\nworkers = 2\n")).unwrap();
        let log = dir.path().join("stderr.log");
        let (mut child, cleanup) = socket_activated(&[port, mport], "echo:metrics", &config, &log);
        let pid = child.id() as i32;
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut s = connect_activated(port);
        assert_eq!(round_trip(&mut s, b"activated").unwrap(), b"activated");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("using 1 echo socket(s) passed by systemd (echo)"), "{text}");
        assert!(!text.contains("listening on 127.0.0.1:0"));
        let (code, body) = http_get(format!("127.0.0.1:{mport}").parse().unwrap(), "/metrics");
        assert_eq!(code, 200);
        assert!(body.contains("echod_connections_accepted_total"));

        // A reload keeps the passed sockets and binds nothing of its own.
        std::fs::write(&config, in_test_mode("listen = [\"127.0.0.1:0\"]\nworkers = 3\n")).unwrap();
        kill(pid, libc_sig::HUP);
        // Three of the new generation serving (the old ones may still drain
        // the connection this test holds).
        let deadline = Instant::now() + Duration::from_secs(10);
        let maddr: std::net::SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
        loop {
            let m = parse_metrics(&http_get(maddr, "/metrics").1);
            if m.get("echod_workers") == Some(&3.0) && m.get("echod_config_generation") == Some(&2.0) {
                break;
            }
            assert!(Instant::now() < deadline, "no three workers after the reload: {m:?}");
            thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("reloaded"), "{text}");
        assert_eq!(text.matches("listening on").count(), 1, "a reload bound something:\n{text}");
        assert_eq!(round_trip(&mut s, b"still").unwrap(), b"still");
        let mut fresh = connect(addr);
        assert_eq!(round_trip(&mut fresh, b"fresh").unwrap(), b"fresh");
        drop(fresh);
        drop(s);
        kill(pid, libc_sig::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(child.try_wait().unwrap().is_some_and(|s| s.success()));
        drop(cleanup);
    }
}

both_modes! {
    fn sd_notify_ready_status_reload_watchdog_and_stopping() {
        let n = Notifications::new();
        let path = n.path.to_str().unwrap().to_string();
        let mut e = start_with("workers = 2\n", &[], &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "300000")]);
        let ready = n.wait(0, "READY=1", Duration::from_secs(5)).expect("READY=1");
        // READY=1 came with a status and only once both workers were up.
        let msg = &n.all()[ready].1;
        assert!(fields(msg).get("STATUS").is_some_and(|s| s.starts_with("2 workers")), "{msg}");
        assert_eq!(e.workers().len(), 2);
        let mut s = connect(e.addr);
        assert_eq!(round_trip(&mut s, b"ready").unwrap(), b"ready");

        // Watchdog pings at half of WATCHDOG_USEC (150 ms): over six of
        // them, no gap reaches the 300 ms at which systemd would kill us,
        // and none is so short that the master spins.
        let deadline = Instant::now() + Duration::from_secs(10);
        let pings = loop {
            let t: Vec<Instant> = n.all().iter().filter(|(_, m)| m.contains("WATCHDOG=1")).map(|(t, _)| *t).collect();
            if t.len() >= 7 {
                break t;
            }
            assert!(Instant::now() < deadline, "{} watchdog pings in 10 s", t.len());
            thread::sleep(Duration::from_millis(50));
        };
        for gap in pings.windows(2).map(|w| w[1] - w[0]) {
            assert!(gap >= Duration::from_millis(100) && gap < Duration::from_millis(300), "watchdog gap {gap:?}: {pings:?}");
        }
        // STATUS lines track activity.
        let status = n.wait(ready + 1, "STATUS=2 workers, 1 active", Duration::from_secs(5));
        assert!(status.is_some(), "{:?}", n.all());

        // HUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
        let before = n.all().len();
        e.write_config(&format!("listen = [\"{}\"]\nworkers = 2\nbuffer_size = 2048\n", e.addr));
        e.signal(libc_sig::HUP);
        let reloading = n.wait(before, "RELOADING=1", Duration::from_secs(5)).expect("RELOADING=1");
        let usec: u64 = fields(&n.all()[reloading].1)["MONOTONIC_USEC"].parse().unwrap();
        assert!(usec > 0);
        n.wait(reloading + 1, "READY=1", Duration::from_secs(10)).expect("READY=1 after reload");

        // TERM: STOPPING=1.
        drop(s);
        let before = n.all().len();
        e.signal(libc_sig::TERM);
        n.wait(before, "STOPPING=1", Duration::from_secs(5)).expect("STOPPING=1");
        assert_eq!(e.wait_exit(Duration::from_secs(10)), Some(0));
    }

    fn no_ready_is_sent_while_workers_cannot_start() {
        let n = Notifications::new();
        let path = n.path.to_str().unwrap().to_string();
        let e = start_unready("workers = 1\n", &[("NOTIFY_SOCKET", &path), ("ECHOD_TEST_WORKER_CRASH", "startup")]);
        // Three failed starts in a row (the crash-loop report), none ready.
        e.wait_log("crash loop", Duration::from_secs(10)).unwrap_or_else(|| panic!("{}", e.log_text()));
        assert!(!n.all().iter().any(|(_, m)| m.contains("READY=1")), "READY=1 without a serving worker: {:?}", n.all());
    }

    fn under_journald_lines_carry_priorities_instead_of_timestamps() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("journal.log");
        let file = std::fs::File::create(&log).unwrap();
        let meta = file.metadata().unwrap();
        let stream = format!("{}:{}", meta.dev(), meta.ino());
        let config = dir.path().join("echod.toml");
        // A tiny fd limit makes echod warn (priority 4) about capacity.
        std::fs::write(&config, in_test_mode("listen = [\"127.0.0.1:0\"]\nworkers = 1\n")).unwrap();
        let mut child = Command::new("prlimit")
            .args(["--nofile=200:200", "--"])
            .arg(ECHOD)
            .arg("--config")
            .arg(&config)
            .env("JOURNAL_STREAM", &stream)
            .stderr(file)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&log).unwrap().contains("ready:") && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let pid = child.id() as i32;
        let workers = children_of(pid);
        kill(pid, libc_sig::TERM);
        let _ = child.wait();
        workers.into_iter().for_each(|w| kill(w, libc_sig::KILL));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.lines().any(|l| l.starts_with(&format!("<6>[master {pid}] ready:"))), "{text}");
        assert!(text.lines().any(|l| l.starts_with(&format!("<4>[master {pid}] RLIMIT_NOFILE 200"))), "{text}");
        assert!(text.lines().all(|l| l.starts_with('<') && !l.contains("Z INFO")), "{text}");
    }

    fn root_drops_to_the_configured_user_and_refuses_to_stay_root() {
        if !nix::unistd::geteuid().is_root() {
            return skip_or_fail("root (the privilege drop)");
        }
        let e = start("workers = 2\nuser = \"nobody\"\n");
        for pid in std::iter::once(e.pid()).chain(e.workers()) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
            assert!(uid.split_whitespace().skip(1).all(|u| u == "65534"), "pid {pid}: {uid}");
        }
        let mut s = connect(e.addr);
        assert_eq!(round_trip(&mut s, b"nobody").unwrap(), b"nobody");
        // #17.3: the master keeps CAP_NET_BIND_SERVICE alone (0x400), in
        // every set, ambient included; the workers keep nothing.
        assert_capabilities(e.pid(), &e.workers());
        // So a reload, read by the master as nobody, can add port 7's kin.
        let dir = e.config.parent().expect("the config's folder").to_path_buf();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let port = free_privileged_port();
        let skip = e.log_len();
        e.write_config(&format!("listen = [\"{}\", \"127.0.0.1:{port}\"]\nworkers = 2\nuser = \"nobody\"\n", e.addr));
        e.signal(libc_sig::HUP);
        e.wait_log_after(skip, "reloaded", Duration::from_secs(10)).unwrap_or_else(|| panic!("{}", e.log_text()));
        let mut low = connect(format!("127.0.0.1:{port}").parse().unwrap());
        assert_eq!(round_trip(&mut low, b"port below 1024").unwrap(), b"port below 1024");
        // A binary upgrade execs the new master as nobody: the ambient
        // capability carries CAP_NET_BIND_SERVICE across, and nothing else.
        let new = upgrade(&e, e.pid());
        let workers = e.wait_children(new, 2);
        assert_eq!(workers.len(), 2, "{}", e.log_text());
        assert_capabilities(new, &workers);

        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("root.toml");
        std::fs::write(&cfg, "listen = [\"127.0.0.1:0\"]\nuser = \"\"\n").unwrap();
        let (code, err, _) = run_to_exit(&["--config", cfg.to_str().unwrap()], None);
        assert_eq!(code, 78, "{err}");
        // #22: file and line, like every config error, and before any bind.
        assert!(err.contains("root.toml:2: key `user`") && err.contains("refusing to run as root"), "{err}");
        assert!(!err.contains("listening on"), "refused before binding: {err}");
        std::fs::write(&cfg, "listen = [\"127.0.0.1:0\"]\n\nuser = \"no-such-user-here\"\n").unwrap();
        let (code, err, _) = run_to_exit(&["--config", cfg.to_str().unwrap()], None);
        assert_eq!(code, 78, "{err}");
        assert!(err.contains("root.toml:3: key `user`"), "{err}");
    }
}

#[test]
fn proxy_protocol_picks_activated_sockets_by_their_name() {
    let (plain, proxied) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("echod.toml");
    std::fs::write(
        &config,
        in_test_mode("workers = 1\nproxy_protocol = [\"behind-lb\"]\nproxy_trusted = [\"127.0.0.1\"]\n"),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let (mut child, _cleanup) = socket_activated(&[plain, proxied], "echo:behind-lb", &config, &log);
    let pid = child.id() as i32;
    let header = b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 7\r\n";
    let mut s = connect_activated(proxied);
    s.write_all(header).unwrap();
    assert_eq!(round_trip(&mut s, b"via lb").unwrap(), b"via lb", "the header was not consumed");
    // The other socket is plain: a header there is just bytes to echo.
    let mut p = connect(format!("127.0.0.1:{plain}").parse().unwrap());
    assert_eq!(round_trip(&mut p, header).unwrap(), header);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&format!("127.0.0.1:{proxied} expects a PROXY protocol header")), "{text}");
    assert!(!text.contains(&format!("127.0.0.1:{plain} expects")), "{text}");
    drop((s, p));
    kill(pid, libc_sig::TERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().is_some_and(|s| s.success()));
}

/// #18.13: sockets under names echod does not know are taken as socket
/// activation, which overrides `listen`: the log says so, naming them, so a
/// stray LISTEN_FDS is not silently obeyed.
#[test]
fn unknown_listen_fdnames_are_named_when_they_override_listen() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("echod.toml");
    std::fs::write(&config, in_test_mode("workers = 1\nlisten = [\"127.0.0.1:0\"]\n")).unwrap();
    let log = dir.path().join("stderr.log");
    let (mut child, _cleanup) = socket_activated(&[port], "not-ours", &config, &log);
    let mut s = connect_activated(port);
    assert_eq!(round_trip(&mut s, b"x").unwrap(), b"x");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("`listen` (127.0.0.1:0) is ignored: LISTEN_FDS passed socket(s) named not-ours"), "{text}");
    drop(s);
    kill(child.id() as i32, libc_sig::TERM);
    let _ = child.wait();
}

/// Master: CAP_NET_BIND_SERVICE (bit 10) alone in every set; workers: none.
fn assert_capabilities(master: i32, workers: &[i32]) {
    let caps = |pid: i32| -> Vec<String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"]
            .iter()
            .map(|k| status.lines().find(|l| l.starts_with(k)).unwrap_or_default().to_string())
            .collect()
    };
    for line in caps(master) {
        assert!(line.ends_with("0000000000000400"), "master {master}: {line}");
    }
    assert!(!workers.is_empty());
    for &w in workers {
        for line in caps(w) {
            assert!(line.ends_with("0000000000000000"), "worker {w}: {line}");
        }
    }
}

/// A free port below 1024 on 127.0.0.1 (the test runs as root); each
/// handler mode looks in its own range, so the two runs of a test, which
/// go in parallel, do not pick the same one.
fn free_privileged_port() -> u16 {
    let from = if mode() == "event" { 960 } else { 900 };
    (from..from + 60).find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()).expect("a free port below 1024")
}
