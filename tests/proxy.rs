//! The PROXY protocol on real sockets: headers from a trusted source are
//! parsed and never echoed, the client they name is what the per-address
//! limit counts, and every kind of bad header closes the connection and is
//! counted by kind, while other clients go on being served. Both handler
//! modes. (HAProxy itself in front of echod: tests/haproxy.rs.)

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const SIG_V2: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

fn v1(client: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 {port} 7\r\n").into_bytes()
}

/// A v2 PROXY (cmd 1) or LOCAL (cmd 0) header for an IPv4 client.
fn v2(cmd: u8, client: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = SIG_V2.to_vec();
    h.extend_from_slice(&[0x20 | cmd, 0x11, 0, 12]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&7u16.to_be_bytes());
    h
}

fn send(addr: SocketAddr, first: &[u8]) -> TcpStream {
    let mut s = connect(addr);
    s.write_all(first).unwrap();
    s
}

/// Every "listening on" address, in order.
fn listening(e: &Echod) -> Vec<SocketAddr> {
    e.log_lines().iter().filter_map(|l| l.rsplit("listening on ").next()?.trim().parse().ok()).collect()
}

const PROXIED: &str = "proxy_protocol = true\nproxy_trusted = [\"127.0.0.1\"]\nmetrics_listen = \"127.0.0.1:0\"\n";

both_modes! {
    fn v1_and_v2_headers_are_consumed_and_what_follows_is_echoed() {
        let e = start(PROXIED);
        // v1 with data in the same segment: the header goes, the data comes back.
        let mut a = send(e.addr, &[v1("192.0.2.7", 4000), b"hello".to_vec()].concat());
        let mut got = [0u8; 5];
        a.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(round_trip(&mut a, b" again").unwrap(), b" again");
        // v2, header and data in separate writes.
        let mut b = send(e.addr, &v2(1, [198, 51, 100, 9], 5000));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(round_trip(&mut b, b"world").unwrap(), b"world");
        // v2 split mid-header, then LOCAL (a balancer's own health check).
        let h = v2(1, [198, 51, 100, 10], 5001);
        let mut c = send(e.addr, &h[..7]);
        std::thread::sleep(Duration::from_millis(50));
        c.write_all(&h[7..]).unwrap();
        assert_eq!(round_trip(&mut c, b"split").unwrap(), b"split");
        let mut d = send(e.addr, &v2(0, [0; 4], 0));
        assert_eq!(round_trip(&mut d, b"local").unwrap(), b"local");
        // A large payload right behind the header arrives whole.
        let mut rng = Rng::new(3);
        let big = rng.bytes(300_000);
        let mut f = send(e.addr, &v1("192.0.2.8", 1));
        assert_eq!(round_trip(&mut f, &big).unwrap(), big);
        drop((a, b, c, d, f));
        let m = e.scrape_until(Duration::from_secs(5), |m| m.get("echod_connections_closed_total") == Some(&5.0));
        assert_eq!(m["echod_proxy_headers_total"], 5.0, "{m:?}");
        for kind in ["missing", "malformed", "oversized", "truncated", "timeout", "untrusted"] {
            assert_eq!(m[&format!("echod_proxy_header_errors_total{{kind=\"{kind}\"}}")], 0.0, "{kind}");
        }
        assert_eq!(m["echod_bytes_received_total"], (5 + 6 + 5 + 5 + 5 + big.len()) as f64, "headers are not data");
    }

    fn bad_headers_are_closed_and_counted_by_kind() {
        let e = start(&format!("{PROXIED}proxy_timeout = 0.5\n"));
        let mut oversized = SIG_V2.to_vec();
        oversized.extend_from_slice(&[0x21, 0x11]);
        oversized.extend_from_slice(&3000u16.to_be_bytes());
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("missing", b"hello, no header here\r\n".to_vec()),
            ("malformed", b"PROXY TCP4 192.0.2.300 127.0.0.1 1 7\r\n".to_vec()),
            ("oversized", oversized),
            ("timeout", b"PROXY TCP4 ".to_vec()),
        ];
        for (kind, first) in &cases {
            let mut s = send(e.addr, first);
            closed_unechoed(&mut s, Duration::from_secs(5)).unwrap_or_else(|why| panic!("{kind}: {why}"));
        }
        // Truncated: half a header, then the client's FIN.
        let mut s = send(e.addr, &v2(1, [192, 0, 2, 1], 1)[..20]);
        s.shutdown(Shutdown::Write).unwrap();
        closed_unechoed(&mut s, Duration::from_secs(5)).unwrap();
        // Untrusted: a valid header from 127.0.0.2, which is not a balancer.
        let mut s = connect_from("127.0.0.2", e.addr);
        s.write_all(&[v1("192.0.2.9", 9), b"x".to_vec()].concat()).unwrap();
        closed_unechoed(&mut s, Duration::from_secs(5)).unwrap();

        // Nobody else noticed.
        let mut good = send(e.addr, &v1("192.0.2.10", 10));
        assert_eq!(round_trip(&mut good, b"fine").unwrap(), b"fine");
        drop(good);
        let m = e.scrape_until(Duration::from_secs(5), |m| m.get("echod_connections_closed_total") == Some(&7.0));
        for kind in ["missing", "malformed", "oversized", "truncated", "timeout", "untrusted"] {
            assert_eq!(m[&format!("echod_proxy_header_errors_total{{kind=\"{kind}\"}}")], 1.0, "{kind}: {m:?}");
        }
        assert_eq!(m["echod_proxy_headers_total"], 1.0);
        assert_eq!(m["echod_connections_accepted_total"], 7.0);
        assert_eq!(m["echod_connections_active"], 0.0, "refused connections were released");
        assert!(e.log_text().contains("PROXY protocol header"), "{}", e.log_text());
    }

    fn the_per_address_limit_counts_the_client_the_header_names() {
        let e = start(&format!("{PROXIED}max_connections_per_ip = 2\n"));
        let open = |client: &str, port: u16| {
            let s = send(e.addr, &v1(client, port));
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        };
        let mut a = open("192.0.2.7", 1);
        let mut b = open("192.0.2.7", 2);
        assert_eq!(round_trip(&mut a, b"a").unwrap(), b"a");
        assert_eq!(round_trip(&mut b, b"b").unwrap(), b"b");
        // A third from the same client is over; another client is not,
        // though every connection comes from the same peer, 127.0.0.1.
        let mut c = open("192.0.2.7", 3);
        closed_unechoed(&mut c, Duration::from_secs(5)).unwrap();
        let mut d = open("192.0.2.8", 4);
        assert_eq!(round_trip(&mut d, b"d").unwrap(), b"d");
        // When one leaves, the client may connect again.
        drop(a);
        e.scrape_until(Duration::from_secs(5), |m| m.get("echod_connections_closed_total") == Some(&2.0));
        let mut f = open("192.0.2.7", 5);
        assert_eq!(round_trip(&mut f, b"f").unwrap(), b"f");
        let m = e.scrape();
        assert_eq!(m["echod_connections_rejected_total"], 1.0, "{m:?}");
        let log = e.log_text();
        assert!(
            log.contains("rejected a connection from 192.0.2.7 (via 127.0.0.1"),
            "the log names the client, not the balancer:\n{log}"
        );
        drop((b, d, f));
    }

    fn only_the_listed_listeners_expect_a_header_and_a_reload_changes_that() {
        let base = "listen = [\"127.0.0.1:0\", \"127.0.0.2:0\"]\nproxy_trusted = [\"127.0.0.0/8\"]\n";
        let e = start(&format!("{base}proxy_protocol = [\"127.0.0.2:0\", \"not-a-socket\"]\n"));
        let addrs = listening(&e);
        assert_eq!(addrs.len(), 2, "{addrs:?}");
        let (plain, proxied) = (addrs[0], addrs[1]);
        assert!(e.log_text().contains(&format!("{proxied} expects a PROXY protocol header")));
        assert!(e.log_text().contains("proxy_protocol entry `not-a-socket` matches no listener"), "{}", e.log_text());
        let header = v1("192.0.2.7", 1);
        // The plain listener echoes a header like any bytes (RFC 862).
        let mut s = connect(plain);
        assert_eq!(round_trip(&mut s, &header).unwrap(), header);
        let mut s = send(proxied, &header);
        assert_eq!(round_trip(&mut s, b"x").unwrap(), b"x");

        // Swap them on reload: new connections follow the new config.
        let skip = e.log_len();
        e.write_config(&in_test_mode(&format!("workers = 2\n{base}proxy_protocol = [\"127.0.0.1:0\"]\n")));
        e.signal(libc_sig::HUP);
        e.wait_log_after(skip, "reloaded", Duration::from_secs(10)).expect("reload");
        let log = e.log_text();
        assert!(log.contains(&format!("{proxied} no longer expects a PROXY protocol header")), "{log}");
        assert!(log.contains(&format!("{plain} now expects a PROXY protocol header")), "{log}");
        let mut s = send(plain, &header);
        assert_eq!(round_trip(&mut s, b"y").unwrap(), b"y");
        let mut s = connect(proxied);
        assert_eq!(round_trip(&mut s, &header).unwrap(), header);
    }
}

#[test]
fn a_proxy_listener_without_trusted_sources_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echod.toml");
    std::fs::write(&path, "listen = [\"127.0.0.1:0\"]\nproxy_protocol = true\n").unwrap();
    let started = Instant::now();
    let (code, err, _) = run_to_exit(&["--config", path.to_str().unwrap()], None);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("echod.toml:2: key `proxy_protocol`: is on but `proxy_trusted` is empty"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

both_modes! {
    fn echo_load_sends_proxy_headers_v1_and_v2() {
        let e = start(PROXIED);
        let mut headers = 0.0;
        for version in ["v1", "v2"] {
            // No ramp-up: echo-load counts the connects of its measured
            // window, and a churning client would connect before it opens.
            let r = load_json(spawn_load(
                e.addr,
                &["-c", "4", "--count", "400", "--churn", "--ramp-up", "0", "--proxy", version],
            ));
            assert_eq!((r["errors"].as_u64(), r["mismatches"].as_u64()), (Some(0), Some(0)), "{r}");
            assert_eq!(r["proxy"], version);
            headers += r["connects"].as_u64().unwrap() as f64;
        }
        let m = e.scrape_until(Duration::from_secs(5), |m| m.get("echod_proxy_headers_total") == Some(&headers));
        assert_eq!(m["echod_proxy_headers_total"], headers, "one header per connection echo-load made");
        let errors: f64 = m.iter().filter(|(k, _)| k.starts_with("echod_proxy_header_errors_total")).map(|(_, v)| v).sum();
        assert_eq!(errors, 0.0);
    }
}

both_modes! {
    /// #27.7: `max_connections_per_ip` counts exact addresses. Under the
    /// old unkeyed hash (FNV-1a mod 16,384) 127.1.25.8 shares 127.0.0.2's
    /// bucket, so three connections from it locked 127.0.0.2 out.
    fn the_per_address_limit_counts_exact_addresses_not_hash_buckets() {
        let e = start("workers = 2\nmax_connections_per_ip = 3\n");
        let mut hogs: Vec<TcpStream> = (0..3).map(|_| connect_from("127.1.25.8", e.addr)).collect();
        for s in &mut hogs {
            assert_eq!(round_trip(s, b"in").unwrap(), b"in");
        }
        let mut victim = connect_from("127.0.0.2", e.addr);
        let echoed = round_trip(&mut victim, b"me").unwrap_or_else(|err| panic!("127.0.0.2: {err}\n{}", e.log_text()));
        assert_eq!(echoed, b"me");
        let mut fourth = connect_from("127.1.25.8", e.addr);
        closed_unechoed(&mut fourth, Duration::from_secs(5)).unwrap();
        e.wait_log("max_connections_per_ip (3) reached for 127.1.25.8", Duration::from_secs(5)).expect("logged");
        assert!(!e.log_text().contains("reached for 127.0.0.2"), "{}", e.log_text());
        drop((hogs, victim));
    }

    /// #27.7, behind a balancer: the addresses PROXY headers name count
    /// exactly too, IPv6 included (2001:db8::1:1d96 shared 2001:db8::1's
    /// old bucket), and an IPv4-mapped IPv6 client is its IPv4 address.
    fn behind_a_proxy_the_limit_counts_exact_v4_and_v6_addresses() {
        let e = start(&format!("{PROXIED}max_connections_per_ip = 3\n"));
        let v1_6 = |client: &str, port: u16| format!("PROXY TCP6 {client} ::1 {port} 7\r\n").into_bytes();
        let mut held = Vec::new();
        let mut serve = |first: Vec<u8>, what: &str| {
            let mut s = send(e.addr, &first);
            let echoed = round_trip(&mut s, b"x").unwrap_or_else(|err| panic!("{what}: {err}\n{}", e.log_text()));
            assert_eq!(echoed, b"x");
            held.push(s);
        };
        for port in 1..=3 {
            serve(v1("127.1.25.8", port), "127.1.25.8 under the limit");
        }
        serve(v1("127.0.0.2", 9), "127.0.0.2 (127.1.25.8's old bucket)");
        for port in 1..=3 {
            serve(v1_6("2001:db8::1", port), "2001:db8::1 under the limit");
        }
        serve(v1_6("2001:db8::1:1d96", 9), "2001:db8::1:1d96 (2001:db8::1's old bucket)");
        serve(v1_6("::ffff:192.0.2.7", 1), "::ffff:192.0.2.7");
        serve(v1_6("::ffff:192.0.2.7", 2), "::ffff:192.0.2.7");
        serve(v1("192.0.2.7", 3), "192.0.2.7");
        for refused in [v1("127.1.25.8", 4), v1_6("2001:db8::1", 4), v1("192.0.2.7", 4)] {
            let mut s = send(e.addr, &refused);
            closed_unechoed(&mut s, Duration::from_secs(5)).unwrap();
        }
        let m = e.scrape_until(Duration::from_secs(5), |m| m.get("echod_connections_rejected_total") == Some(&3.0));
        assert_eq!(m["echod_connections_rejected_total"], 3.0, "{m:?}");
        drop(held);
    }
}
