//! Zero-downtime binary upgrade (USR2) and systemd's fd store, end to end:
//! the real binary, a second copy of it as the "new" binary, echo-load
//! traffic with long-lived and churning connections, a NOTIFY_SOCKET the
//! test owns. Loopback only, bounded in time; every process is killed by PID.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

both_modes! {
    fn two_upgrades_under_load_lose_nothing_and_counters_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let next = second_binary(dir.path());
        // shutdown_timeout is longer than the run: the long-lived connections
        // stay with the generation that accepted them until their clients
        // close, so none is cut.
        let e = start(&format!(
            "workers = 2\nshutdown_timeout = 30\nmetrics_listen = \"127.0.0.1:0\"\nupgrade_binary = \"{}\"\n",
            next.display()
        ));
        let metrics = e.metrics_addr();
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = watch_counters(metrics, stop.clone());
        let long1 = spawn_load(e.addr, &["-t", "1", "-c", "16", "-d", "4"]);
        let churn = spawn_load(e.addr, &["-t", "1", "-c", "8", "-d", "10", "--churn"]);
        // Both loads are on: the 16 long-lived connections and churn.
        let flowing = |m: &std::collections::HashMap<String, f64>, from: f64| {
            m.get("echod_connections_active").is_some_and(|&a| a >= 16.0)
                && m.get("echod_connections_accepted_total").is_some_and(|&a| a >= from + 100.0)
        };
        e.scrape_until(Duration::from_secs(10), |m| flowing(m, 0.0));

        // First upgrade: the original master hands over to the copy.
        let first = e.pid();
        let first_workers = e.workers();
        let second = upgrade(&e, first);
        let exe = std::fs::read_link(format!("/proc/{second}/exe")).unwrap();
        assert_eq!(exe, next, "the new master runs the new binary");
        let second_workers = e.wait_children(second, 2);

        // A second upgrade while the first generation still drains its
        // long-lived connections is refused (a failure then would leave two
        // masters serving the same sockets).
        let skip = e.log_len();
        kill(second, libc_sig::USR2);
        let refused = e.wait_log_after(skip, "upgrade refused", Duration::from_secs(5)).expect("refused");
        assert!(refused.contains(&format!("the previous master (pid {first}) is still draining")), "{refused}");
        assert!(refused.contains(&format!("[master {second}]")), "said by the new master: {refused}");

        // Once the first generation is gone (its clients closed), it is not.
        let long1 = load_json(long1);
        assert!(wait_gone(first, &first_workers, Duration::from_secs(10)), "first generation still there");
        // Metrics, not USR1: the master that started the test is gone.
        let accepted = e.scrape()["echod_connections_accepted_total"];
        let long2 = spawn_load(e.addr, &["-t", "1", "-c", "16", "-d", "4"]);
        e.scrape_until(Duration::from_secs(10), |m| flowing(m, accepted));
        let third = upgrade(&e, second);
        e.wait_children(third, 2);

        let long2 = load_json(long2);
        let churn = load_json(churn);
        assert!(wait_gone(second, &second_workers, Duration::from_secs(10)), "second generation still there");
        stop.store(true, Ordering::Relaxed);
        let (backwards, scrapes) = watcher.join().unwrap();
        for (what, j) in [("long-lived 1", &long1), ("long-lived 2", &long2), ("churn", &churn)] {
            eprintln!(
                "{what}: {} responses, {} errors, {} mismatches, p99 {} us, max {} us",
                j["responses"], j["errors"], j["mismatches"], j["latency_us"]["p99"], j["latency_us"]["max"]
            );
            assert!(j["responses"].as_u64().unwrap() > 1000, "{what}: {j}");
            assert_eq!(j["errors"], 0, "{what}: failed or refused connections: {j}");
            assert_eq!(j["mismatches"], 0, "{what}: {j}");
        }
        eprintln!("{scrapes} scrapes across both upgrades");
        assert!(scrapes > 50, "the metrics endpoint kept answering: {scrapes} scrapes");
        assert!(backwards.is_empty(), "counters went backwards: {backwards:?}");

        // The third master serves and stops like any other.
        let mut s = connect(e.addr);
        assert_eq!(round_trip(&mut s, b"third").unwrap(), b"third");
        drop(s);
        kill(third, libc_sig::TERM);
        assert!(wait_gone(third, &children_of(third), Duration::from_secs(10)));
    }

    fn a_broken_or_hung_new_binary_leaves_the_old_generation_serving() {
        let dir = tempfile::tempdir().unwrap();
        let e = start("workers = 2\nupgrade_timeout = 30\n");
        let master = e.pid();
        let workers = e.workers();
        let traffic = spawn_load(e.addr, &["-t", "1", "-c", "8", "-d", "5"]);
        let churn = spawn_load(e.addr, &["-t", "1", "-c", "4", "-d", "5", "--churn"]);
        e.stats_until(Duration::from_secs(10), |s| s["active"] >= 8 && s["accepted"] >= 50);

        // The same binary, but the file it reads was broken since: the new
        // master refuses it (exit 78) and the old one serves on.
        e.write_config(&format!("listen = [\"{}\"]\nworkers = 2\nupgrade_timeout = 1\nworkers = 3\n", e.addr));
        let skip = e.log_len();
        e.signal(libc_sig::USR2);
        let failed = e.wait_log_after(skip, "upgrade failed", Duration::from_secs(10)).expect("failure logged");
        assert!(failed.contains("the new master exited (exit status 78)"), "{failed}");
        assert!(e.log_lines()[skip..].iter().any(|l| l.contains("config error")), "{}", e.log_text());

        // A new binary that exits at once.
        use_upgrade_binary(&e, &script(dir.path(), "exits", "exit 3"), 30);
        let skip = e.log_len();
        e.signal(libc_sig::USR2);
        let failed = e.wait_log_after(skip, "upgrade failed", Duration::from_secs(10)).expect("failure logged");
        assert!(failed.contains("the new master exited (exit status 3)"), "{failed}");

        // A binary that starts but never serves is given up after upgrade_timeout.
        use_upgrade_binary(&e, &script(dir.path(), "hangs", "exec sleep 30"), 1);
        let skip = e.log_len();
        e.signal(libc_sig::USR2);
        let started = e.wait_log_after(skip, "upgrade: started new master (pid ", Duration::from_secs(5)).unwrap();
        let hung_pid = pid_in(&started);
        e.track(hung_pid);
        let failed = e.wait_log_after(skip, "upgrade failed", Duration::from_secs(5)).expect("timeout logged");
        assert!(failed.contains("did not become ready within 1s"), "{failed}");
        assert!(wait_gone(hung_pid, &[], Duration::from_secs(5)), "the hung binary was killed");

        for (what, j) in [("traffic", load_json(traffic)), ("churn", load_json(churn))] {
            assert_eq!(j["errors"], 0, "{what}: {j}");
            assert_eq!(j["mismatches"], 0, "{what}: {j}");
            assert!(j["responses"].as_u64().unwrap() > 100, "{what}: {j}");
        }
        assert!(alive(master), "the old master keeps running");
        let mut s = connect(e.addr);
        assert_eq!(round_trip(&mut s, b"still here").unwrap(), b"still here");
        // Reload replaced the workers; none was lost to the failed upgrades.
        assert_eq!(e.wait_workers(2, Duration::from_secs(10)).len(), 2, "{workers:?}");
    }

    fn under_systemd_the_new_master_becomes_the_main_pid() {
        let dir = tempfile::tempdir().unwrap();
        let next = second_binary(dir.path());
        let n = Notifications::new();
        let path = n.path.to_str().unwrap().to_string();
        let e = start_with(
            &format!("workers = 2\nshutdown_timeout = 2\nupgrade_binary = \"{}\"\n", next.display()),
            &[],
            &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "400000")],
        );
        n.wait(0, "READY=1", Duration::from_secs(5)).expect("READY=1");
        let mut s = connect(e.addr);
        assert_eq!(round_trip(&mut s, b"before").unwrap(), b"before");

        let before = n.all().len();
        let new = upgrade(&e, e.pid());
        // The old master names the new one the main process when it hands
        // over, and the new one says so with READY=1 once told to accept.
        let ready = format!("MAINPID={new}\nREADY=1");
        let i = n.wait(before, &ready, Duration::from_secs(5)).expect("MAINPID= and READY=1 from the new master");
        let msgs: Vec<String> = n.all().into_iter().skip(before).map(|(_, m)| m).collect();
        let first = msgs.iter().position(|m| m.contains(&format!("MAINPID={new}"))).unwrap();
        assert!(!msgs[first].contains("READY=1"), "the old master's MAINPID= comes first: {msgs:?}");
        assert!(n.all().len() > i);
        // The old master says nothing that would stop the unit.
        let old = e.pid();
        children_of(new).iter().for_each(|&w| e.track(w));
        assert!(wait_gone(old, &[], Duration::from_secs(10)), "old master gone after its drain");
        let msgs: Vec<String> = n.all().into_iter().skip(before).map(|(_, m)| m).collect();
        assert!(!msgs.iter().any(|m| m.contains("STOPPING=1")), "STOPPING=1 during an upgrade: {msgs:?}");
        // The watchdog is the new master's now (WATCHDOG_PID moved with it).
        let pings = n.all().len();
        let first = n.wait(pings, "WATCHDOG=1", Duration::from_secs(2)).expect("a watchdog ping from the new master");
        n.wait(first + 1, "WATCHDOG=1", Duration::from_secs(2)).expect("and another");
        // The long-lived connection from before the upgrade was drained by the
        // old generation; new ones go to the new master.
        let mut s2 = connect(e.addr);
        assert_eq!(round_trip(&mut s2, b"after").unwrap(), b"after");
        drop((s, s2));
        let before = n.all().len();
        kill(new, libc_sig::TERM);
        n.wait(before, "STOPPING=1", Duration::from_secs(5)).expect("STOPPING=1 from the new master");
        assert!(wait_gone(new, &[], Duration::from_secs(10)));
    }

    fn the_fd_store_keeps_the_port_through_a_restart() {
        // The listening socket echod puts into "systemd's" fd store (our
        // NOTIFY_SOCKET) keeps accepting into its backlog while echod is
        // down; a second echod started with it (LISTEN_FDS, as systemd does
        // on restart) serves everyone who connected meanwhile.
        let store = FdStore::new();
        let e = start_with("workers = 1\nshutdown_timeout = 1\n", &[], &[("NOTIFY_SOCKET", &store.path())]);
        let stored = store.wait_for("echod-listen", Duration::from_secs(5)).expect("FDSTORE=1 with FDNAME=echod-listen");
        let local = socket2::SockRef::from(&stored).local_addr().unwrap().as_socket().unwrap();
        assert_eq!(local, e.addr, "the stored socket is the listener");
        let addr = e.addr;
        let config = e.dir.path().join("restart.toml");
        std::fs::write(&config, in_test_mode(&format!("listen = [\"{addr}\"]\nworkers = 1\n"))).unwrap();

        // Stop echod: the port stays open (we hold the stored socket).
        e.signal(libc_sig::TERM);
        let mut e = e;
        assert_eq!(e.wait_exit(Duration::from_secs(10)), Some(0));
        let waiting: Vec<_> = (0..5).map(|_| std::net::TcpStream::connect(addr).expect("connect while down")).collect();

        // "Restart": a new echod gets the stored socket as fd 3.
        let log = e.dir.path().join("restart.log");
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import os, sys\nfd = int(sys.argv[1])\nif fd != 3: os.dup2(fd, 3); os.close(fd)\n\
                 os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='echod-listen')\n\
                 os.execv(sys.argv[2], sys.argv[2:])",
                &stored.as_raw_fd().to_string(),
                ECHOD,
                "--config",
                config.to_str().unwrap(),
            ])
            .env_remove("NOTIFY_SOCKET")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let _cleanup = Defer(move || kill(pid, 9));
        drop(stored);
        for (i, mut s) in waiting.into_iter().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let msg = format!("waited {i}");
            assert_eq!(round_trip(&mut s, msg.as_bytes()).unwrap(), msg.as_bytes(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("taking over 1 listening socket(s)"), "{text}");
        kill(pid, libc_sig::TERM);
        let _ = child.wait();
    }

    /// #22: a reload that changes the listeners replaces what the fd store
    /// holds (FDSTOREREMOVE, then FDSTORE with every listener), so a restart
    /// gets back the sockets the config names now, not the ones it named.
    fn a_reload_replaces_the_listeners_in_the_fd_store() {
        let store = FdStore::new();
        let e = start_with("workers = 1\n", &[], &[("NOTIFY_SOCKET", &store.path())]);
        assert_eq!(store.wait_addrs("echod-listen", &[e.addr], Duration::from_secs(5)), vec![e.addr]);
        let extra: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let reload = |listen: &[std::net::SocketAddr]| {
            let skip = e.log_len();
            let list = listen.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
            e.write_config(&format!("listen = [{list}]\nworkers = 1\n"));
            e.signal(libc_sig::HUP);
            e.wait_log_after(skip, "reloaded", Duration::from_secs(10)).unwrap_or_else(|| panic!("{}", e.log_text()));
        };
        reload(&[e.addr, extra]);
        let both = store.wait_addrs("echod-listen", &[e.addr, extra], Duration::from_secs(5));
        assert_eq!(both.len(), 2, "both listeners stored, the old entry replaced: {both:?}");
        reload(&[extra]);
        assert_eq!(store.wait_addrs("echod-listen", &[extra], Duration::from_secs(5)), vec![extra], "the removed listener left the store");
    }
}

/// A NOTIFY_SOCKET that keeps the fds sent with FDSTORE=1, as systemd does.
struct FdStore {
    dir: tempfile::TempDir,
    stored: Arc<std::sync::Mutex<Vec<(String, OwnedFd)>>>,
}

impl FdStore {
    fn new() -> FdStore {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let stored = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = stored.clone();
        thread::spawn(move || {
            loop {
                let mut buf = [0u8; 4096];
                let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 8]);
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let Ok(msg) = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty()) else {
                    return;
                };
                let fds: Vec<OwnedFd> = msg
                    .cmsgs()
                    .into_iter()
                    .flatten()
                    .flat_map(|c| match c {
                        ControlMessageOwned::ScmRights(fds) => fds,
                        _ => Vec::new(),
                    })
                    // Received just now: nothing else owns these numbers.
                    .filter_map(echod::sys::adopt_fd)
                    .collect();
                let n = msg.bytes;
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if text.contains("FDSTOREREMOVE=1") {
                    let name = fields(&text).get("FDNAME").map(|s| s.to_string()).unwrap_or_default();
                    sink.lock().unwrap().retain(|(n, _)| *n != name);
                } else if text.contains("FDSTORE=1") {
                    let name = fields(&text).get("FDNAME").map(|s| s.to_string()).unwrap_or_default();
                    let mut s = sink.lock().unwrap();
                    s.extend(fds.into_iter().map(|fd| (name.clone(), fd)));
                }
            }
        });
        FdStore { dir, stored }
    }

    fn path(&self) -> String {
        self.dir.path().join("notify.sock").to_str().unwrap().to_string()
    }

    /// Waits until the sockets stored under `name` listen on exactly
    /// `want` (in any order); fails the test if they never do.
    fn wait_addrs(&self, name: &str, want: &[std::net::SocketAddr], timeout: Duration) -> Vec<std::net::SocketAddr> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut got: Vec<std::net::SocketAddr> = self
                .stored
                .lock()
                .unwrap()
                .iter()
                .filter(|(n, _)| n == name)
                .filter_map(|(_, fd)| socket2::SockRef::from(fd).local_addr().ok()?.as_socket())
                .collect();
            got.sort();
            let mut want = want.to_vec();
            want.sort();
            if got == want {
                return got;
            }
            assert!(Instant::now() < deadline, "the fd store holds {got:?} under {name}, not {want:?}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Takes the first fd stored under `name`.
    fn wait_for(&self, name: &str, timeout: Duration) -> Option<OwnedFd> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let mut s = self.stored.lock().unwrap();
            if let Some(i) = s.iter().position(|(n, _)| n == name) {
                return Some(s.swap_remove(i).1);
            }
            drop(s);
            thread::sleep(Duration::from_millis(10));
        }
        None
    }
}
