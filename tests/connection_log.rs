//! The connection log (`access_log = true`, #28.5): one line per connection
//! a worker ended, naming both ends, the bytes each way and why it ended,
//! for every way a connection ends, plain and behind PROXY; and a log that
//! nobody reads drops lines (counted) instead of holding up an echo. Both
//! handler modes.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const M: &str = "metrics_listen = \"127.0.0.1:0\"\n";

/// The connection lines of the log, as key=value maps.
fn lines(e: &Echod) -> Vec<HashMap<String, String>> {
    e.log_lines().iter().filter_map(|l| parse(l)).collect()
}

fn parse(line: &str) -> Option<HashMap<String, String>> {
    let fields = line.split_once("] connection ")?.1;
    Some(
        fields
            .split(' ')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect(),
    )
}

/// Waits for the one line whose `peer` is `peer`; fails if there are two.
fn line_of(e: &Echod, peer: SocketAddr) -> HashMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found: Vec<_> = lines(e).into_iter().filter(|l| l["peer"] == peer.to_string()).collect();
        assert!(found.len() <= 1, "one line per connection, {peer} has {}:\n{}", found.len(), e.log_text());
        if let Some(line) = found.into_iter().next() {
            return line;
        }
        assert!(Instant::now() < deadline, "no line for {peer}:\n{}", e.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn expect(line: &HashMap<String, String>, reason: &str, bytes: u64) {
    assert_eq!(line["reason"], reason, "{line:?}");
    assert_eq!(line["bytes_in"], bytes.to_string(), "{line:?}");
    assert_eq!(line["bytes_out"], bytes.to_string(), "{line:?}");
    assert!(line["duration"].parse::<f64>().is_ok(), "{line:?}");
}

both_modes! {
    fn every_ending_has_one_line_with_both_ends_the_bytes_and_the_reason() {
        let mut e = start(&format!(
            "{M}workers = 1\naccess_log = true\nidle_timeout = 2\nwrite_timeout = 1\nshutdown_timeout = 1\n"
        ));
        // The client closes after 3000 bytes.
        let mut closed = connect(e.addr);
        let data = Rng::new(7).bytes(3000);
        assert_eq!(round_trip(&mut closed, &data).unwrap(), data);
        let closed_at = closed.local_addr().unwrap();
        drop(closed);
        let line = line_of(&e, closed_at);
        expect(&line, "closed", 3000);
        assert_eq!(line["listener"], e.addr.to_string());
        assert_eq!(line["client"], closed_at.to_string(), "no PROXY header: the client is the peer");

        // A reset after 10 bytes.
        let mut reset = connect(e.addr);
        assert_eq!(round_trip(&mut reset, b"0123456789").unwrap(), b"0123456789");
        let reset_at = reset.local_addr().unwrap();
        socket2::SockRef::from(&reset).set_linger(Some(Duration::ZERO)).unwrap();
        drop(reset);
        expect(&line_of(&e, reset_at), "reset", 10);

        // Silent for idle_timeout.
        let mut idle = connect(e.addr);
        let idle_at = idle.local_addr().unwrap();
        closed_by_server(&mut idle, Duration::from_secs(10)).unwrap();
        expect(&line_of(&e, idle_at), "idle_timeout", 0);

        // Sends and never reads: its echo stalls for write_timeout (shorter
        // than idle_timeout: event mode reads nothing while a write is
        // stalled, so with equal timeouts either may come first).
        let stalled = connect(e.addr);
        let stalled_at = stalled.local_addr().unwrap();
        socket2::SockRef::from(&stalled).set_recv_buffer_size(4096).unwrap();
        let mut writer = stalled.try_clone().unwrap();
        writer.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let chunk = vec![b'w'; 64 * 1024];
        let pushed = std::thread::spawn(move || {
            let mut sent = 0u64;
            while sent < 256 << 20 && writer.write_all(&chunk).is_ok() {
                sent += chunk.len() as u64;
            }
        });
        let line = line_of(&e, stalled_at);
        assert_eq!(line["reason"], "write_timeout", "{line:?}");
        let (read, echoed) = (line["bytes_in"].parse::<u64>().unwrap(), line["bytes_out"].parse::<u64>().unwrap());
        assert!(read > 0 && echoed <= read, "{line:?}");
        drop(stalled);
        pushed.join().unwrap();

        // Held through a stop: the drain's deadline cuts it.
        let mut held = connect(e.addr);
        assert_eq!(round_trip(&mut held, b"held").unwrap(), b"held");
        let held_at = held.local_addr().unwrap();
        e.signal(libc_sig::TERM);
        assert_eq!(e.wait_exit(Duration::from_secs(10)), Some(0), "{}", e.log_text());
        expect(&line_of(&e, held_at), "cut", 4);
        assert_eq!(lines(&e).len(), 5, "one line per connection:\n{}", e.log_text());
    }

    fn behind_a_proxy_the_line_names_the_client_and_each_refusal_its_reason() {
        let e = start(&format!(
            "{M}workers = 1\naccess_log = true\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.1\"]\n\
             max_connections_per_ip = 1\n"
        ));
        let open = |header: &[u8]| {
            let mut s = connect(e.addr);
            s.write_all(header).unwrap();
            s
        };
        let mut first = open(b"PROXY TCP4 192.0.2.7 127.0.0.1 1111 7\r\nhi");
        let mut got = [0u8; 2];
        first.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        let first_at = first.local_addr().unwrap();
        // The same client again, while the first is open: over the limit.
        let mut second = open(b"PROXY TCP4 192.0.2.7 127.0.0.1 2222 7\r\n");
        closed_unechoed(&mut second, Duration::from_secs(5)).unwrap();
        let line = line_of(&e, second.local_addr().unwrap());
        assert_eq!((line["reason"].as_str(), line["client"].as_str()), ("limit", "192.0.2.7:2222"), "{line:?}");
        drop(first);
        let line = line_of(&e, first_at);
        expect(&line, "closed", 2);
        assert_eq!(line["client"], "192.0.2.7:1111", "the client the header named: {line:?}");
        // A header that is not one.
        let mut bad = open(b"PROXY TCP4 192.0.2.300 127.0.0.1 1 7\r\n");
        closed_unechoed(&mut bad, Duration::from_secs(5)).unwrap();
        let bad_at = bad.local_addr().unwrap();
        let line = line_of(&e, bad_at);
        assert_eq!(line["reason"], "proxy_malformed", "{line:?}");
        assert_eq!(line["client"], bad_at.to_string(), "no client named: the peer is the client: {line:?}");
    }

    /// The log's reader stops reading (a pipe nobody drains): echoes go on
    /// at full speed, the lines that do not fit are counted as dropped, the
    /// master still answers, reloads and logs its warnings (the connection
    /// log leaves room in the pipe for them), and once the reader drains the
    /// pipe every line not counted arrives, whole: two workers' JSON lines
    /// never splice.
    fn a_log_nobody_reads_drops_lines_and_holds_up_no_echo() {
        let dir = tempfile::tempdir().unwrap();
        let (port, metrics_port) = (free_port(), free_port());
        let config = dir.path().join("echod.toml");
        let text = format!(
            "listen = [\"127.0.0.1:{port}\"]\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\nworkers = 2\n\
             access_log = true\nstats_interval = 0\nlog_format = \"json\"\nmax_connections_per_ip = 50\n\
             shutdown_timeout = 2\n"
        );
        std::fs::write(&config, in_test_mode(&text)).unwrap();
        let mut child = Command::new(ECHOD)
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let guard = KillOnDrop(child.id() as i32);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let maddr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while http_try(maddr, "/healthz") != Some(200) {
            assert!(Instant::now() < deadline, "echod never became healthy");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Far more lines than the pipe (64 KiB) and two workers' queues hold.
        let mut n = 12_000u64;
        for i in 0..n {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let msg = i.to_le_bytes();
            assert_eq!(round_trip(&mut s, &msg).unwrap(), msg, "echo {i} with the log stalled");
        }
        let scrape = || parse_metrics(&http_get(maddr, "/metrics").1);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = scrape();
            if m["echod_connections_closed_total"] as u64 == n && m["echod_access_log_dropped_total"] > 0.0 {
                break;
            }
            assert!(Instant::now() < deadline, "no drop counted: {m:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The pipe is full of connection lines, yet the master logs a
        // refusal (a 51st connection from 127.0.0.1) and a reload, and
        // answers throughout.
        // (Wait until the sequential ones have all closed: one still open
        // would be counted against the limit.)
        let deadline = Instant::now() + Duration::from_secs(10);
        while scrape()["echod_connections_active"] != 0.0 {
            assert!(Instant::now() < deadline, "connections still open");
            std::thread::sleep(Duration::from_millis(20));
        }
        let held: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for mut s in &held {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert_eq!(round_trip_ref(&mut s, b"held"), b"held");
        }
        let mut third = TcpStream::connect(addr).unwrap();
        closed_unechoed(&mut third, Duration::from_secs(10)).expect("the 51st is refused");
        drop(held);
        n += 50;
        kill(child.id() as i32, libc_sig::HUP);
        let deadline = Instant::now() + Duration::from_secs(15);
        while scrape().get("echod_config_generation") != Some(&2.0) {
            assert!(Instant::now() < deadline, "the master did not reload with the log stalled");
            std::thread::sleep(Duration::from_millis(50));
        }
        for i in 0..100u64 {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert_eq!(round_trip(&mut s, &i.to_le_bytes()).unwrap(), i.to_le_bytes(), "after the reload");
        }
        n += 100;
        // Now read the log: what was queued arrives, and with it every line
        // that was not dropped.
        let stderr = child.stderr.take().unwrap();
        let counted = Arc::new(AtomicU64::new(0));
        let torn = Arc::new(Mutex::new(Vec::new()));
        let (c, t) = (counted.clone(), torn.clone());
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                match serde_json::from_str::<serde_json::Value>(&line) {
                    Ok(v) if v["msg"] == "connection" => {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => t.lock().unwrap().push(line),
                }
            }
        });
        // The dropped count is published on the worker's tick: scrape it
        // again until the two add up.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let dropped = scrape()["echod_access_log_dropped_total"] as u64;
            let lines = counted.load(Ordering::Relaxed);
            if lines + dropped == n {
                break;
            }
            assert!(lines + dropped < n, "{lines} lines and {dropped} dropped: more than the {n} connections");
            assert!(Instant::now() < deadline, "{lines} lines and {dropped} dropped of {n}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let torn = torn.lock().unwrap();
        assert!(torn.is_empty(), "{} lines are not one JSON object each: {:?}", torn.len(), &torn[..torn.len().min(3)]);
        drop(guard);
        let _ = child.wait();
    }
}

fn round_trip_ref(s: &mut &TcpStream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).unwrap();
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got).unwrap();
    got
}

/// Kills the process by pid when the test ends, however it ends.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill(self.0, libc_sig::KILL);
    }
}

/// A GET's status, or None if nothing answers yet.
fn http_try(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
