//! echod as an HAProxy backend, with the real HAProxy (Debian package
//! `haproxy`) running the configuration shipped in `deploy/haproxy/`:
//! two echod (one per handler mode) on distinct loopback addresses behind
//! it, sent PROXY v2 headers, health-checked on /healthz.
//!
//! One test, in phases that share the fleet: load spreads over both
//! backends; the per-address limit sees the client HAProxy names, not
//! HAProxy; a SIGKILLed backend costs only its own connections; a backend
//! stopped gracefully mid-run loses no echo. Loopback only, bounded in time
//! (about 30 s), every process killed by PID at the end.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn deploy_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `text` with each `(from, to)` replaced; each `from` must occur exactly
/// once, so an edit of the shipped file cannot silently leave the test
/// running something else.
fn swap(mut text: String, pairs: &[(&str, String)]) -> String {
    for (from, to) in pairs {
        assert_eq!(text.matches(from).count(), 1, "`{from}` should occur once in the shipped file");
        text = text.replace(from, to);
    }
    text
}

/// The shipped backend config for one loopback backend.
fn backend_config(listen: &str, metrics: &str, handler: &str, per_ip: u32) -> String {
    swap(
        deploy_file("echod-backend.toml"),
        &[
            ("\"0.0.0.0:7007\"", format!("\"{listen}\"")),
            ("\"0.0.0.0:9107\"", format!("\"{metrics}\"")),
            ("[\"10.0.0.5\", \"10.0.0.6\"]", "[\"127.0.0.1\"]".to_string()),
            ("handler = \"event\"", format!("handler = \"{handler}\"")),
            ("max_connections_per_ip = 100", format!("max_connections_per_ip = {per_ip}")),
        ],
    )
}

struct HaProxy {
    child: Child,
    stats: PathBuf,
    log: PathBuf,
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        kill(self.child.id() as i32, libc_sig::KILL);
        let _ = self.child.wait();
    }
}

impl HaProxy {
    fn start(dir: &Path, front: SocketAddr, servers: [SocketAddr; 2], check_port: u16) -> HaProxy {
        let stats = dir.join("haproxy.sock");
        let cfg = swap(
            deploy_file("haproxy.cfg"),
            &[
                ("bind :7   # ADDR frontend", format!("bind {front}")),
                ("10.0.0.11:7007", servers[0].to_string()),
                ("10.0.0.12:7007", servers[1].to_string()),
                ("check port 9107", format!("check port {check_port}")),
                ("/run/haproxy/echod.sock", stats.display().to_string()),
            ],
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let check =
            Command::new(haproxy_bin()).arg("-c").arg("-f").arg(&path).output().expect(
                "haproxy is not installed: `apt-get install haproxy` (the Debian package; .ci/run installs it)",
            );
        assert!(check.status.success(), "haproxy -c: {}", String::from_utf8_lossy(&check.stderr));
        let log = dir.join("haproxy.log");
        let child = Command::new(haproxy_bin())
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(std::fs::File::options().append(true).open(&log).unwrap()))
            .spawn()
            .expect("start haproxy");
        HaProxy { child, stats, log }
    }

    /// The rows of `show stat` for the echod backend's servers, each a map
    /// from column name (svname, status, scur, srv_abrt, ...) to value.
    fn stat(&self) -> Vec<HashMap<String, String>> {
        let Ok(mut s) = UnixStream::connect(&self.stats) else { return Vec::new() };
        let _ = s.write_all(b"show stat\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let mut lines = text.lines();
        let header: Vec<String> =
            lines.next().unwrap_or("").trim_start_matches("# ").split(',').map(String::from).collect();
        lines
            .map(|l| header.iter().cloned().zip(l.split(',').map(String::from)).collect::<HashMap<_, _>>())
            .filter(|row| row.get("pxname").is_some_and(|p| p == "echod"))
            .filter(|row| row.get("svname").is_some_and(|s| s.starts_with("echod")))
            .collect()
    }

    /// (server, status, current sessions).
    fn servers(&self) -> Vec<(String, String, u64)> {
        let field = |row: &HashMap<String, String>, k: &str| row.get(k).cloned().unwrap_or_default();
        self.stat()
            .iter()
            .map(|row| (field(row, "svname"), field(row, "status"), field(row, "scur").parse().unwrap_or(0)))
            .collect()
    }

    /// Sessions on `server` that ended on the server's side: aborted by it
    /// (reset), or never connected (refused, retries used up). HAProxy's
    /// own counters.
    fn server_failures(&self, server: &str) -> u64 {
        let rows = self.stat();
        let Some(row) = rows.iter().find(|r| r.get("svname").is_some_and(|s| s == server)) else { return 0 };
        ["srv_abrt", "econ", "eresp"].iter().filter_map(|c| row.get(*c)?.parse::<u64>().ok()).sum()
    }

    fn status(&self, server: &str) -> String {
        self.servers().into_iter().find(|(n, _, _)| n == server).map(|(_, s, _)| s).unwrap_or_default()
    }

    /// Waits until `server`'s status starts with `want` ("UP", "DOWN").
    fn wait_status(&self, server: &str, want: &str, within: Duration) -> Duration {
        let start = Instant::now();
        while !self.status(server).starts_with(want) {
            assert!(
                start.elapsed() < within,
                "{server} not {want} after {within:?}: {:?}\n{}",
                self.servers(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(50));
        }
        start.elapsed()
    }
}

/// Backend 1 (thread mode) on free ports of 127.0.0.2, and backend 2
/// (event mode) on the same ports of 127.0.0.3, so HAProxy's single `check
/// port` fits both, as in production; with backend 2's listen and metrics
/// addresses, for restarting it. Another process may hold one of backend 1's
/// ports on 127.0.0.3 or on the wildcard address (seen once in CI: "Address
/// already in use"), so a pair that cannot be had is given up for another.
fn backends_on_the_same_ports() -> (Echod, Echod, String, String) {
    let mut refusals = Vec::new();
    for _ in 0..5 {
        let a = backend("127.0.0.2:0", "127.0.0.2:0", "thread", PER_IP);
        let (port, mport) = (a.addr.port(), a.metrics_addr().port());
        let (listen, metrics) = (format!("127.0.0.3:{port}"), format!("127.0.0.3:{mport}"));
        match try_start(&backend_config(&listen, &metrics, "event", PER_IP)) {
            Ok(b) => return (a, b, listen, metrics),
            Err(log) => refusals.push(log),
        }
    }
    panic!("backend 2 could not take backend 1's ports in 5 tries:\n{}", refusals.join("\n"));
}

/// Starts one backend from the shipped config.
fn backend(listen: &str, metrics: &str, handler: &str, per_ip: u32) -> Echod {
    start(&backend_config(listen, metrics, handler, per_ip))
}

fn n(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no `{key}` in {v}"))
}

fn served(s: &mut TcpStream, what: &[u8]) -> bool {
    matches!(round_trip(s, what), Ok(got) if got == what)
}

fn metric(e: &Echod, name: &str) -> f64 {
    e.scrape().get(name).copied().unwrap_or(0.0)
}

#[test]
fn two_echod_behind_haproxy_with_proxy_v2() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut b, b1_listen, b1_metrics) = backends_on_the_same_ports();
    let mport = a.metrics_addr().port();
    let front: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let hap = HaProxy::start(dir.path(), front, [a.addr, b.addr], mport);
    hap.wait_status("echod1", "UP", Duration::from_secs(10));
    hap.wait_status("echod2", "UP", Duration::from_secs(10));

    // 1. Load spreads over both, every byte verified.
    let r = load_json(spawn_load(front, &["-c", "20", "-d", "2", "-s", "512"]));
    assert_eq!(n(&r, "errors"), 0, "{r}");
    assert_eq!(n(&r, "mismatches"), 0, "{r}");
    let (ha, hb) = (metric(&a, "echod_proxy_headers_total"), metric(&b, "echod_proxy_headers_total"));
    assert!(ha >= 5.0 && hb >= 5.0, "20 connections split {ha} / {hb}");
    println!("through haproxy: {} responses/s, 20 connections split {ha} / {hb}", r["rps"]);

    // 2. The per-address limit counts the client HAProxy names. Every
    // connection reaches echod from HAProxy's one address; were that what
    // counted, the 21st would be refused whoever sent it.
    let mut held = Vec::new();
    for i in 0..2 * PER_IP {
        let mut c = connect_from("127.0.0.10", front);
        assert!(served(&mut c, format!("c{i}").as_bytes()), "connection {i} from 127.0.0.10 refused");
        held.push(c);
    }
    let mut over = connect_from("127.0.0.10", front);
    assert!(!served(&mut over, b"over"), "127.0.0.10 is at the limit on both hosts");
    let mut other = connect_from("127.0.0.11", front);
    assert!(served(&mut other, b"other client"));
    let rejected = metric(&a, "echod_connections_rejected_total") + metric(&b, "echod_connections_rejected_total");
    assert_eq!(rejected, 1.0);
    // The refusal is logged by whichever backend refused, a moment after
    // the client saw it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logs = a.log_text() + &b.log_text();
        if logs.contains("rejected a connection from 127.0.0.10 (via 127.0.0.1:") {
            break;
        }
        assert!(Instant::now() < deadline, "{logs}");
        thread::sleep(Duration::from_millis(20));
    }
    drop((held, over, other));

    // 3. SIGKILL backend 2 under load: only connections HAProxy sent to it
    // fail, none of backend 1's; HAProxy's check takes it out and new
    // connections go to backend 1. "Sent to it" is those it held, plus any
    // of their clients' reconnects that HAProxy placed on it in the instant
    // its workers were already gone but the kernel still completed
    // handshakes on its listener (seen: 7 held, 10 failed, in 1 run of 8):
    // at most one more per held connection.
    let failures_before = hap.server_failures("echod1");
    // 8 s: past the kill (1.5 s) and the longest wait for DOWN (5 s).
    let load = spawn_load(front, &["-c", "12", "-d", "8"]);
    // All 12 connections are up, spread over the two backends.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&a, "echod_connections_active") + metric(&b, "echod_connections_active") < 12.0 {
        assert!(Instant::now() < deadline, "the load's 12 connections never reached the backends");
        thread::sleep(Duration::from_millis(50));
    }
    let held = metric(&b, "echod_connections_active") as u64;
    let errors_before = metric(&a, "echod_connection_errors_total{kind=\"reset\"}");
    b.signal(libc_sig::KILL);
    let down = hap.wait_status("echod2", "DOWN", Duration::from_secs(5));
    thread::sleep(Duration::from_millis(300));
    // Read while the load still runs: its end closes every connection,
    // which backend 1 may count as resets of its own.
    let errors_after = metric(&a, "echod_connection_errors_total{kind=\"reset\"}");
    let r = load_json(load);
    let failed = n(&r, "errors");
    thread::sleep(Duration::from_millis(200));
    let lost1 = hap.server_failures("echod1") - failures_before;
    println!("SIGKILL: backend 2 held {held}; {failed} client connections failed; DOWN after {down:?}; {r}");
    assert!(held > 0, "backend 2 held no connections");
    assert!(failed >= held, "backend 2 held {held} connections but only {failed} failed: {r}");
    assert!(failed <= 2 * held, "{failed} failures: more than backend 2's {held} connections could explain: {r}");
    assert_eq!(lost1, 0, "HAProxy counted sessions on backend 1 failing on its side");
    assert_eq!(n(&r, "mismatches"), 0);
    assert_eq!(errors_after, errors_before, "backend 1 lost connections when backend 2 died");
    let _ = b.wait_exit(Duration::from_secs(5));
    drop(b);

    // Backend 2 again, on the same address; HAProxy brings it back.
    let b = backend(&b1_listen, &b1_metrics, "event", PER_IP);
    hap.wait_status("echod2", "UP", Duration::from_secs(10));

    // 4. Stop backend 1 gracefully mid-run: /healthz fails first, HAProxy
    // takes it out while it still accepts, its open connections finish.
    // Long-lived and churning clients: not one echo may be lost.
    let long = spawn_load(front, &["-c", "12", "-d", "7"]);
    let churn = spawn_load(front, &["-c", "4", "-d", "7", "--churn"]);
    a.scrape_until(Duration::from_secs(10), |m| m.get("echod_connections_active").is_some_and(|&v| v > 0.0));
    let draining = metric(&a, "echod_connections_active");
    assert!(draining > 0.0, "backend 1 held nothing to drain");
    let mut a = a;
    a.signal(libc_sig::TERM);
    let down = hap.wait_status("echod1", "DOWN", Duration::from_secs(5));
    let (long, churn) = (load_json(long), load_json(churn));
    println!("graceful stop: backend 1 held {draining}, DOWN after {down:?}; long-lived {long}; churn {churn}");
    for r in [&long, &churn] {
        assert_eq!(n(r, "errors"), 0, "{r}");
        assert_eq!(n(r, "mismatches"), 0, "{r}");
        assert!(n(r, "responses") > 0, "{r}");
    }
    assert!(n(&churn, "connects") > 100, "churn did not churn: {churn}");
    assert_eq!(a.wait_exit(Duration::from_secs(10)), Some(0), "{}", a.log_text());
    assert!(a.log_text().contains("graceful stop: /healthz answers 503"));
    drop(b);
}

/// Debian installs it in /usr/sbin, which a non-root PATH may lack.
fn haproxy_bin() -> &'static str {
    if Path::new("/usr/sbin/haproxy").exists() { "/usr/sbin/haproxy" } else { "haproxy" }
}

/// `max_connections_per_ip` on each backend. echo-load's connections all
/// come from 127.0.0.1, so every phase stays below it on one host.
const PER_IP: u32 = 20;

/// What `backends_on_the_same_ports` relies on to try another pair: a
/// backend whose port another process holds is an `Err` with the reason,
/// not a panic or a hang.
#[test]
fn a_backend_on_a_taken_port_is_an_error_to_retry() {
    let held = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();
    let log = match try_start(&backend_config(&taken, "127.0.0.3:0", "event", PER_IP)) {
        Ok(_) => panic!("echod listened on {taken}, which this test holds"),
        Err(log) => log,
    };
    assert!(log.contains("Address already in use"), "{log}");
    // The listen port free and the metrics port taken: refused as well
    // (it logs "listening on" before it fails to bind the metrics port).
    let log = match try_start(&backend_config("127.0.0.3:0", &taken, "event", PER_IP)) {
        Ok(_) => panic!("echod served metrics on {taken}, which this test holds"),
        Err(log) => log,
    };
    assert!(log.contains("cannot serve metrics") && log.contains("Address already in use"), "{log}");
}
