//! Fuzzing the PROXY protocol parser (`proxy_protocol`) with proptest: it
//! parses bytes from the network before anything else looks at them, so it
//! must never panic, never read past a v2 header, never change its mind,
//! and find exactly the client in every header a balancer can send, however
//! the bytes are split across reads.
//!
//! The corpus in `tests/corpus/proxy/` (seed inputs named
//! `<expected outcome>-<what>.bin`) is replayed first; proptest keeps any
//! failing case it finds in `tests/proxy_fuzz.proptest-regressions`, which is
//! committed and replayed on every run. `PROPTEST_CASES=100000 cargo test
//! --release --test proxy_fuzz` fuzzes longer.

use std::io::{self, Cursor, ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use proxy_protocol::{Handshake, HeaderError, MAX_V2_PAYLOAD, Parsed, Step, V1_MAX, V2_SIGNATURE, parse};

/// A header a balancer could send, and the client it names.
#[derive(Debug, Clone)]
struct Valid {
    bytes: Vec<u8>,
    source: Option<SocketAddr>,
    v2: bool,
}

fn v1_header() -> impl Strategy<Value = Valid> {
    prop_oneof![
        (any::<u32>(), any::<u32>(), any::<u16>(), any::<u16>()).prop_map(|(s, d, sp, dp)| {
            let (s, d) = (Ipv4Addr::from(s), Ipv4Addr::from(d));
            let bytes = format!("PROXY TCP4 {s} {d} {sp} {dp}\r\n").into_bytes();
            Valid { bytes, source: Some(SocketAddr::new(IpAddr::V4(s), sp)), v2: false }
        }),
        (any::<u128>(), any::<u128>(), any::<u16>(), any::<u16>()).prop_map(|(s, d, sp, dp)| {
            let (s, d) = (Ipv6Addr::from(s), Ipv6Addr::from(d));
            let bytes = format!("PROXY TCP6 {s} {d} {sp} {dp}\r\n").into_bytes();
            Valid { bytes, source: Some(SocketAddr::new(IpAddr::V6(s), sp)), v2: false }
        }),
        "[ -~]{0,80}".prop_map(|rest| {
            let bytes = format!("PROXY UNKNOWN {rest}\r\n").into_bytes();
            Valid { bytes, source: None, v2: false }
        }),
    ]
    .prop_filter("v1 headers are at most 107 bytes", |v| v.bytes.len() <= V1_MAX)
}

fn v2_header() -> impl Strategy<Value = Valid> {
    let tlvs = proptest::collection::vec(any::<u8>(), 0..300);
    (0u8..6, any::<[u8; 36]>(), tlvs).prop_map(|(shape, addrs, tlvs)| {
        let (cmd, fam, block, source) = match shape {
            0 => {
                let ip = Ipv4Addr::new(addrs[0], addrs[1], addrs[2], addrs[3]);
                let port = u16::from_be_bytes([addrs[8], addrs[9]]);
                (1, 0x11, addrs[..12].to_vec(), Some(SocketAddr::new(IpAddr::V4(ip), port)))
            }
            1 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(&addrs[..16]);
                let port = u16::from_be_bytes([addrs[32], addrs[33]]);
                (1, 0x21, addrs.to_vec(), Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port)))
            }
            2 => (1, 0x31, vec![7u8; 216], None),       // AF_UNIX
            3 => (1, 0x00, Vec::new(), None),           // UNSPEC
            4 => (0, 0x11, addrs[..12].to_vec(), None), // LOCAL, addresses ignored
            _ => (0, 0x00, Vec::new(), None),
        };
        let mut body = block;
        body.extend_from_slice(&tlvs);
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x20 | cmd, fam]);
        bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&body);
        Valid { bytes, source, v2: true }
    })
}

fn any_header() -> impl Strategy<Value = Valid> {
    prop_oneof![v1_header(), v2_header()]
}

/// Hands out the input in the given read sizes (cycled), like a socket
/// whose segments arrive in pieces; WouldBlock between pieces.
struct Pieces {
    data: Cursor<Vec<u8>>,
    sizes: Vec<usize>,
    next: usize,
    blocked: bool,
}

impl Read for Pieces {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.blocked = !self.blocked;
        if self.blocked {
            return Err(ErrorKind::WouldBlock.into());
        }
        let size = self.sizes[self.next % self.sizes.len()].max(1);
        self.next += 1;
        let n = b.len().min(size);
        self.data.read(&mut b[..n])
    }
}

/// Runs a handshake to its end: Ok((step, bytes left unread)).
fn handshake(input: Vec<u8>, sizes: Vec<usize>) -> Result<(Step, Vec<u8>), HeaderError> {
    let mut r = Pieces { data: Cursor::new(input), sizes, next: 0, blocked: false };
    let mut hs = Handshake::default();
    for _ in 0..100_000 {
        match hs.advance(&mut r)? {
            Step::Pending => {}
            done => {
                let at = r.data.position() as usize;
                let rest = r.data.get_ref()[at..].to_vec();
                return Ok((done, rest));
            }
        }
    }
    panic!("handshake made no progress");
}

/// What a corpus file's name says the parser must conclude.
fn outcome(r: &Result<Parsed, HeaderError>) -> &'static str {
    match r {
        Ok(Parsed::Complete(_)) => "ok",
        Ok(Parsed::Incomplete { .. }) => "incomplete",
        Err(e) => e.name(),
    }
}

#[test]
fn corpus_inputs_parse_as_their_names_say() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/proxy");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/corpus/proxy") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let expected = name.split('-').next().unwrap().to_string();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(outcome(&parse(&data)), expected, "{name}");
        seen += 1;
    }
    assert!(seen >= 20, "the corpus has only {seen} inputs");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Arbitrary bytes, and arbitrary bytes behind either signature: no
    /// panic, and a complete header never claims more than was given.
    #[test]
    fn never_panics(tail in proptest::collection::vec(any::<u8>(), 0..600), start in 0u8..3) {
        let mut buf = match start {
            0 => Vec::new(),
            1 => b"PROXY ".to_vec(),
            _ => V2_SIGNATURE.to_vec(),
        };
        buf.extend_from_slice(&tail);
        if let Ok(Parsed::Complete(h)) = parse(&buf) {
            prop_assert!(h.len <= buf.len());
        }
        let _ = handshake(buf, vec![7, 1, 300]);
    }

    /// Every header a balancer can send, split any way, yields its client;
    /// what follows is left for the echo (all of it, for v2).
    #[test]
    fn valid_headers_in_any_pieces(h in any_header(), data in proptest::collection::vec(any::<u8>(), 0..200), sizes in proptest::collection::vec(1usize..64, 1..8)) {
        let input = [h.bytes.clone(), data.clone()].concat();
        let (step, rest) = handshake(input, sizes).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let Step::Done { header, early } = step else { unreachable!() };
        prop_assert_eq!(header.source, h.source);
        prop_assert_eq!(header.len, h.bytes.len());
        prop_assert_eq!([early.clone(), rest].concat(), data, "bytes after the header are kept, in order");
        if h.v2 {
            prop_assert!(early.is_empty(), "a v2 header was over-read");
        }
        prop_assert!(early.len() <= V1_MAX);
    }

    /// A header cut short is never an error, only "more, please"; and once
    /// the parser decides (error or header), more bytes never change it.
    #[test]
    fn decisions_are_final(h in any_header(), cut in any::<prop::sample::Index>(), more in proptest::collection::vec(any::<u8>(), 1..64)) {
        let at = cut.index(h.bytes.len());
        let cut_short = parse(&h.bytes[..at]);
        prop_assert!(matches!(cut_short, Ok(Parsed::Incomplete { .. })), "cut at {}: {:?}", at, cut_short);
        let decided = parse(&h.bytes);
        prop_assert_eq!(parse(&[h.bytes.clone(), more].concat()), decided);
    }

    /// One byte changed anywhere in a valid header: still no panic, and an
    /// error stays an error when more bytes come.
    #[test]
    fn mutated_headers(h in any_header(), at in any::<prop::sample::Index>(), byte in any::<u8>(), more in proptest::collection::vec(any::<u8>(), 0..32)) {
        let mut bytes = h.bytes.clone();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let r = parse(&bytes);
        if let Err(e) = r {
            prop_assert_eq!(parse(&[bytes.clone(), more].concat()), Err(e));
        }
    }

    /// Lengths past the limit are refused as oversized from the 16 fixed
    /// bytes alone, before any payload is read.
    #[test]
    fn oversized_v2_is_refused_early(len in (MAX_V2_PAYLOAD as u16 + 1)..=u16::MAX, fam in any::<u8>()) {
        let mut b = V2_SIGNATURE.to_vec();
        b.extend_from_slice(&[0x21, fam]);
        b.extend_from_slice(&len.to_be_bytes());
        prop_assert_eq!(parse(&b), Err(HeaderError::Oversized));
    }
}
