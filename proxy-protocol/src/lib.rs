//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load
//! balancer puts before a client's bytes to say who the client really is.
//!
//! This crate is only the format and the trust list; nothing here does
//! I/O on its own. [`Handshake`] reads a header from any `Read` a piece at a
//! time, so the thread handler (blocking, with a deadline) and the event
//! handler (non-blocking, one piece per readiness edge) share every rule.
//! What echod's worker does with the result (per-address limits, counting,
//! closing) lives in its `worker::proxied`.
//!
//! Strictness is deliberate: a header is trusted to rewrite the client's
//! address, so anything that is not exactly one well-formed header (wrong
//! signature, bad address, a v1 line past 107 bytes, a v2 header longer than
//! [`MAX_V2_PAYLOAD`]) is refused, never guessed at. The header itself is
//! never echoed; bytes that arrived after it in the same read are the
//! client's first data and are echoed as such.
//!
//! Reads are sized so that a v2 header is never over-read (16 bytes, then
//! exactly its length), and a v1 header by at most the rest of its 107-byte
//! maximum.

use std::fmt;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature: chosen by the spec never to start a v1 line, an HTTP
/// request or TLS.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The v1 prefix.
const V1_PREFIX: &[u8] = b"PROXY ";

/// The longest v1 header the spec allows, CRLF included.
pub const V1_MAX: usize = 107;

/// The longest v2 payload (addresses plus TLVs) accepted. The spec
/// allows 65535; what balancers send is 12 to 216 bytes of addresses plus a
/// few TLVs (a cloud endpoint id, an ALPN), well within this. Longer is
/// refused as oversized rather than buffered.
pub const MAX_V2_PAYLOAD: usize = 2048;

/// Why a connection's header was refused: the `kind` label of
/// `echod_proxy_header_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// The first bytes are not a PROXY signature: a client that connected
    /// straight to a PROXY listener, or a proxy that was not told to send one.
    Missing,
    /// A signature, then something the spec does not allow.
    Malformed,
    /// Longer than [`V1_MAX`] or [`MAX_V2_PAYLOAD`].
    Oversized,
    /// The connection ended (EOF or an error) before the header did.
    Truncated,
    /// The header did not arrive within `proxy_timeout`.
    Timeout,
    /// The connection's source is not in `proxy_trusted`: its header would
    /// be believed from anyone, so the connection is refused unread.
    Untrusted,
}

impl HeaderError {
    /// Every kind, in the order the metrics list them.
    pub const ALL: [HeaderError; 6] = [
        HeaderError::Missing,
        HeaderError::Malformed,
        HeaderError::Oversized,
        HeaderError::Truncated,
        HeaderError::Timeout,
        HeaderError::Untrusted,
    ];

    /// The metric label and log word.
    pub fn name(self) -> &'static str {
        match self {
            HeaderError::Missing => "missing",
            HeaderError::Malformed => "malformed",
            HeaderError::Oversized => "oversized",
            HeaderError::Truncated => "truncated",
            HeaderError::Timeout => "timeout",
            HeaderError::Untrusted => "untrusted",
        }
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A complete, valid header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes the header took.
    pub len: usize,
    /// The client it speaks for; None when it speaks for nobody (v1
    /// `UNKNOWN`, v2 `LOCAL` such as a balancer's own health check, or an
    /// address family without an IP): the connection's own source counts.
    pub source: Option<SocketAddr>,
}

/// What the bytes received so far amount to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid header so far; `want` more bytes at most may complete it
    /// (the size of the next read).
    Incomplete {
        want: usize,
    },
    Complete(Header),
}

/// Parses the start of a connection's bytes.
pub fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    if buf.is_empty() {
        // Either version: 16 bytes are v2's fixed part and at most one
        // byte past the shortest v1 header ("PROXY UNKNOWN\r\n").
        return Ok(Parsed::Incomplete { want: 16 });
    }
    if buf[0] == V2_SIGNATURE[0] { parse_v2(buf) } else { parse_v1(buf) }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(HeaderError::Missing);
    }
    // Scan byte by byte so that the verdict depends only on the bytes
    // before it: more bytes arriving never change a decision.
    let mut end = None;
    for (i, &b) in buf.iter().enumerate().take(V1_MAX) {
        match b {
            b'\r' if i + 1 >= V1_MAX => return Err(HeaderError::Oversized),
            b'\r' if i + 1 == buf.len() => break,
            b'\r' if buf[i + 1] == b'\n' => {
                end = Some(i);
                break;
            }
            b' '..=b'~' => {}
            // A lone CR or LF, or any other control or non-ASCII byte.
            _ => return Err(HeaderError::Malformed),
        }
    }
    let Some(end) = end else {
        if buf.len() >= V1_MAX {
            return Err(HeaderError::Oversized);
        }
        return Ok(Parsed::Incomplete { want: V1_MAX - buf.len() });
    };
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..end]).map_err(|_| HeaderError::Malformed)?;
    let source = v1_source(line).ok_or(HeaderError::Malformed)?;
    Ok(Parsed::Complete(Header { len: end + 2, source }))
}

/// The source a v1 line (after "PROXY ", before CRLF) names: `Some(None)`
/// for UNKNOWN, None when malformed.
fn v1_source(line: &str) -> Option<Option<SocketAddr>> {
    if let Some(rest) = line.strip_prefix("UNKNOWN") {
        // The spec lets the rest be anything (it is ignored).
        return (rest.is_empty() || rest.starts_with(' ')).then_some(None);
    }
    let mut parts = line.split(' ');
    let (family, src, dst, sport, dport) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let (src, _dst): (IpAddr, IpAddr) = match family {
        "TCP4" => (IpAddr::V4(src.parse::<Ipv4Addr>().ok()?), IpAddr::V4(dst.parse::<Ipv4Addr>().ok()?)),
        "TCP6" => (IpAddr::V6(src.parse::<Ipv6Addr>().ok()?), IpAddr::V6(dst.parse::<Ipv6Addr>().ok()?)),
        _ => return None,
    };
    let (sport, _dport) = (v1_port(sport)?, v1_port(dport)?);
    Some(Some(SocketAddr::new(src, sport)))
}

/// A v1 port: decimal, no sign, no leading zero, 0..=65535.
fn v1_port(s: &str) -> Option<u16> {
    let ok =
        !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if ok { s.parse().ok() } else { None }
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(HeaderError::Missing);
    }
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete { want: 16 - buf.len() });
    }
    let (ver_cmd, fam) = (buf[12], buf[13]);
    let payload = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if ver_cmd >> 4 != 2 {
        return Err(HeaderError::Malformed);
    }
    if payload > MAX_V2_PAYLOAD {
        return Err(HeaderError::Oversized);
    }
    let total = 16 + payload;
    if buf.len() < total {
        return Ok(Parsed::Incomplete { want: total - buf.len() });
    }
    let body = &buf[16..total];
    let source = match ver_cmd & 0x0f {
        // LOCAL: the proxy speaking for itself (health checks); the
        // address block, if any, is to be ignored.
        0 => None,
        1 => v2_source(fam, body)?,
        _ => return Err(HeaderError::Malformed),
    };
    Ok(Parsed::Complete(Header { len: total, source }))
}

/// The source of a v2 PROXY command.
fn v2_source(fam: u8, body: &[u8]) -> Result<Option<SocketAddr>, HeaderError> {
    let (family, transport) = (fam >> 4, fam & 0x0f);
    // 0 = UNSPEC, 1 = STREAM. DGRAM (2) cannot describe a TCP client.
    if transport > 1 || (family != 0 && transport == 0) {
        return Err(HeaderError::Malformed);
    }
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    match family {
        0 => Ok(None),
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port(8))))
        }
        2 if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            Ok(Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port(32))))
        }
        // AF_UNIX: no IP to speak of; the connection's own source counts.
        3 if body.len() >= 216 => Ok(None),
        _ => Err(HeaderError::Malformed),
    }
}

/// Which header a client sends (echo-load's `--proxy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The header a balancer would send for a client at `src` connected to
/// `dst` (a PROXY command; UNKNOWN / UNSPEC when the families differ).
pub fn encode(version: Version, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    match (version, src, dst) {
        (Version::V1, SocketAddr::V4(s), SocketAddr::V4(d)) => {
            format!("PROXY TCP4 {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port()).into_bytes()
        }
        (Version::V1, SocketAddr::V6(s), SocketAddr::V6(d)) => {
            format!("PROXY TCP6 {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port()).into_bytes()
        }
        (Version::V1, _, _) => b"PROXY UNKNOWN\r\n".to_vec(),
        (Version::V2, src, dst) => {
            let mut h = V2_SIGNATURE.to_vec();
            let body = match (src, dst) {
                (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                    h.extend_from_slice(&[0x21, 0x11]);
                    [&s.ip().octets()[..], &d.ip().octets()[..], &s.port().to_be_bytes(), &d.port().to_be_bytes()]
                        .concat()
                }
                (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                    h.extend_from_slice(&[0x21, 0x21]);
                    [&s.ip().octets()[..], &d.ip().octets()[..], &s.port().to_be_bytes(), &d.port().to_be_bytes()]
                        .concat()
                }
                _ => {
                    h.extend_from_slice(&[0x21, 0x00]);
                    Vec::new()
                }
            };
            h.extend_from_slice(&(body.len() as u16).to_be_bytes());
            h.extend_from_slice(&body);
            h
        }
    }
}

/// A header being read from one connection.
#[derive(Debug, Default)]
pub struct Handshake {
    got: Vec<u8>,
}

/// What one [`Handshake::advance`] came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// No complete header yet; call again when more can be read.
    Pending,
    /// The header, and whatever the client sent after it in the same read
    /// (to be echoed before anything else).
    Done { header: Header, early: Vec<u8> },
}

impl Handshake {
    /// Reads once (retrying only EINTR) and parses what has arrived.
    /// WouldBlock, and a blocking read's timeout, are `Pending`: the caller
    /// owns the deadline.
    pub fn advance<R: Read>(&mut self, r: &mut R) -> Result<Step, HeaderError> {
        let want = match parse(&self.got)? {
            Parsed::Incomplete { want } => want,
            Parsed::Complete(header) => return Ok(self.finish(header)),
        };
        let start = self.got.len();
        self.got.resize(start + want, 0);
        let read = loop {
            match r.read(&mut self.got[start..]) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let n = match read {
            Ok(0) => {
                self.got.truncate(start);
                // A few bytes of no header at all are "missing", not "truncated".
                parse(&self.got)?;
                return Err(HeaderError::Truncated);
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                self.got.truncate(start);
                return Ok(Step::Pending);
            }
            Err(_) => {
                self.got.truncate(start);
                return Err(HeaderError::Truncated);
            }
        };
        self.got.truncate(start + n);
        match parse(&self.got)? {
            Parsed::Incomplete { .. } => Ok(Step::Pending),
            Parsed::Complete(header) => Ok(self.finish(header)),
        }
    }

    /// Bytes of the header read so far (progress, for non-blocking callers).
    pub fn received(&self) -> usize {
        self.got.len()
    }

    fn finish(&mut self, header: Header) -> Step {
        let early = self.got.split_off(header.len);
        self.got.clear();
        Step::Done { header, early }
    }
}

/// An address block (`10.0.0.0/8`, `::1/128`, or a bare address) from
/// which PROXY headers are believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside the block (an IPv4-mapped IPv6 address counts
    /// as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u32::from(n).into(), self.prefix, 32) == masked(u32::from(a).into(), self.prefix, 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(u128::from(n), self.prefix, 128) == masked(u128::from(a), self.prefix, 128)
            }
            _ => false,
        }
    }
}

/// The top `prefix` bits of a `bits`-wide address.
fn masked(v: u128, prefix: u8, bits: u32) -> u128 {
    let prefix = u32::from(prefix).min(bits);
    if prefix == 0 { 0 } else { v >> (bits - prefix) }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| format!("`{s}` is not an address or ADDRESS/PREFIX"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(format!("`{s}`: prefix length must be 0 to {max}")),
            },
        };
        Ok(Cidr { net, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{self, Cursor};

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x20 | cmd, fam]);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn v2_inet(src: [u8; 4], sport: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut body = src.to_vec();
        body.extend_from_slice(&[127, 0, 0, 1]);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&7u16.to_be_bytes());
        body.extend_from_slice(tlvs);
        v2(1, 0x11, &body)
    }

    fn complete(buf: &[u8]) -> Header {
        match parse(buf) {
            Ok(Parsed::Complete(h)) => h,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let h = complete(b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 7\r\nhello");
        assert_eq!(h, Header { len: 40, source: Some("192.0.2.7:56324".parse().unwrap()) });
        let h = complete(b"PROXY TCP6 2001:db8::1 ::1 65535 7\r\n");
        assert_eq!(h.source, Some("[2001:db8::1]:65535".parse().unwrap()));
        assert_eq!(complete(b"PROXY UNKNOWN\r\n").source, None);
        assert_eq!(complete(b"PROXY UNKNOWN ff:: 1.2.3.4 1 2\r\n").source, None);
    }

    #[test]
    fn v1_refusals_by_kind() {
        use HeaderError::*;
        let cases: &[(&[u8], HeaderError)] = &[
            (b"GET / HTTP/1.1\r\n", Missing),
            (b"proxy TCP4", Missing),
            (b"PROXY TCP4 192.0.2.7 127.0.0.1 56324\r\n", Malformed),
            (b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 7 8\r\n", Malformed),
            (b"PROXY TCP4 ::1 127.0.0.1 1 7\r\n", Malformed),
            (b"PROXY TCP6 192.0.2.7 ::1 1 7\r\n", Malformed),
            (b"PROXY TCP4 192.0.2.7 127.0.0.1 65536 7\r\n", Malformed),
            (b"PROXY TCP4 192.0.2.7 127.0.0.1 0080 7\r\n", Malformed),
            (b"PROXY TCP4 192.0.2.7 127.0.0.1 +80 7\r\n", Malformed),
            (b"PROXY TCP4  192.0.2.7 127.0.0.1 80 7\r\n", Malformed),
            (b"PROXY UDP4 192.0.2.7 127.0.0.1 80 7\r\n", Malformed),
            (b"PROXY TCP4 192.0.2.7\n", Malformed),
            (b"PROXY UNKNOWNX\r\n", Malformed),
        ];
        for (input, kind) in cases {
            assert_eq!(parse(input), Err(*kind), "{:?}", String::from_utf8_lossy(input));
        }
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 100]].concat();
        assert_eq!(parse(&long), Err(Oversized));
    }

    #[test]
    fn partial_headers_ask_for_more_and_never_over_read_v2() {
        let full = b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 7\r\n";
        for n in 0..full.len() {
            assert!(matches!(parse(&full[..n]), Ok(Parsed::Incomplete { .. })), "{n}");
        }
        let h = v2_inet([192, 0, 2, 7], 4000, &[]);
        assert_eq!(parse(&h[..3]), Ok(Parsed::Incomplete { want: 13 }));
        assert_eq!(parse(&h[..16]), Ok(Parsed::Incomplete { want: 12 }));
        assert_eq!(parse(&h[..20]), Ok(Parsed::Incomplete { want: 8 }));
    }

    #[test]
    fn v2_addresses_local_and_tlvs() {
        let h = complete(&v2_inet([192, 0, 2, 7], 4000, &[0x04, 0, 2, b'x', b'y']));
        assert_eq!(h, Header { len: 16 + 12 + 5, source: Some("192.0.2.7:4000".parse().unwrap()) });
        let mut body = vec![0u8; 36];
        body[0] = 0x20;
        body[1] = 0x01;
        body[15] = 9;
        body[32..34].copy_from_slice(&443u16.to_be_bytes());
        assert_eq!(complete(&v2(1, 0x21, &body)).source, Some("[2001::9]:443".parse().unwrap()));
        assert_eq!(complete(&v2(0, 0x00, &[])).source, None, "LOCAL");
        assert_eq!(complete(&v2(0, 0x11, &[1; 12])).source, None, "LOCAL ignores addresses");
        assert_eq!(complete(&v2(1, 0x00, &[])).source, None, "UNSPEC");
        assert_eq!(complete(&v2(1, 0x31, &[0; 216])).source, None, "AF_UNIX");
    }

    #[test]
    fn v2_refusals_by_kind() {
        use HeaderError::*;
        let mut bad_version = v2_inet([1, 2, 3, 4], 1, &[]);
        bad_version[12] = 0x11;
        assert_eq!(parse(&bad_version), Err(Malformed));
        assert_eq!(parse(&v2(2, 0x11, &[0; 12])), Err(Malformed), "unknown command");
        assert_eq!(parse(&v2(1, 0x12, &[0; 12])), Err(Malformed), "datagram");
        assert_eq!(parse(&v2(1, 0x11, &[0; 11])), Err(Malformed), "short address block");
        assert_eq!(parse(&v2(1, 0x21, &[0; 35])), Err(Malformed), "short v6 block");
        assert_eq!(parse(&v2(1, 0x41, &[0; 12])), Err(Malformed), "unknown family");
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&((MAX_V2_PAYLOAD + 1) as u16).to_be_bytes());
        assert_eq!(parse(&huge), Err(Oversized));
        assert_eq!(parse(b"\r\n\r\nX"), Err(Missing));
    }

    /// Reads in fixed pieces, then WouldBlock, like a non-blocking socket
    /// whose data arrives slowly.
    struct Drip {
        data: Cursor<Vec<u8>>,
        piece: usize,
        eof: bool,
    }
    impl Read for Drip {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            let n = b.len().min(self.piece);
            match self.data.read(&mut b[..n])? {
                0 if !self.eof => Err(ErrorKind::WouldBlock.into()),
                n => Ok(n),
            }
        }
    }

    fn run(data: Vec<u8>, piece: usize, eof: bool) -> Result<Step, HeaderError> {
        let mut r = Drip { data: Cursor::new(data), piece, eof };
        let mut hs = Handshake::default();
        for _ in 0..1000 {
            match hs.advance(&mut r)? {
                Step::Pending if r.data.position() as usize == r.data.get_ref().len() && !eof => {
                    return Ok(Step::Pending);
                }
                Step::Pending => {}
                done => return Ok(done),
            }
        }
        panic!("no progress");
    }

    #[test]
    fn handshake_reads_in_pieces_and_returns_early_data() {
        let mut data = v2_inet([10, 1, 2, 3], 5555, &[]);
        data.extend_from_slice(b"payload");
        for piece in [1, 3, 16, 1000] {
            let Ok(Step::Done { header, early }) = run(data.clone(), piece, true) else { panic!("piece {piece}") };
            assert_eq!(header.source, Some("10.1.2.3:5555".parse().unwrap()));
            // v2 is never over-read: the payload stays in the socket.
            assert!(early.is_empty(), "piece {piece}: {early:?}");
        }
        let v1 = b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\nabc".to_vec();
        let Ok(Step::Done { early, .. }) = run(v1.clone(), 1000, true) else { panic!() };
        assert_eq!(early, b"abc");
        let Ok(Step::Done { early, .. }) = run(v1, 1, true) else { panic!() };
        assert!(early.is_empty());
    }

    #[test]
    fn handshake_classifies_endings() {
        let h = v2_inet([10, 1, 2, 3], 5555, &[]);
        assert_eq!(run(h[..20].to_vec(), 4, true), Err(HeaderError::Truncated));
        assert_eq!(run(h[..20].to_vec(), 4, false), Ok(Step::Pending));
        assert_eq!(run(b"hello".to_vec(), 4, true), Err(HeaderError::Missing));
        assert_eq!(run(b"PRO".to_vec(), 4, true), Err(HeaderError::Truncated));
        assert_eq!(run(Vec::new(), 4, true), Err(HeaderError::Truncated));
    }

    #[test]
    fn encoded_headers_parse_back() {
        let pairs = [("192.0.2.7:4000", "127.0.0.1:7"), ("[2001:db8::1]:5", "[::1]:7"), ("192.0.2.7:1", "[::1]:7")];
        for (src, dst) in pairs {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            for v in [Version::V1, Version::V2] {
                let h = encode(v, src, dst);
                let same_family = src.is_ipv4() == dst.is_ipv4();
                assert_eq!(complete(&h), Header { len: h.len(), source: same_family.then_some(src) }, "{v:?}");
            }
        }
    }

    /// The names are the metric labels and log words operators match on.
    #[test]
    fn error_names_are_the_documented_labels() {
        let names: Vec<String> = HeaderError::ALL.iter().map(|e| e.to_string()).collect();
        assert_eq!(names, ["missing", "malformed", "oversized", "truncated", "timeout", "untrusted"]);
        assert_eq!(HeaderError::Timeout.name(), "timeout");
    }

    /// The edges cargo-mutants found unchecked: the v1 length limit to the
    /// byte, a CR not followed by LF, how much an incomplete header asks
    /// for, v2's payload limit to the byte, AF_UNIX's address length.
    #[test]
    fn limits_hold_to_the_byte() {
        // A v1 line whose CRLF ends at byte 107 is the longest allowed.
        let line = |total: usize| {
            let head = "PROXY TCP4 192.0.2.1 127.0.0.1 1 2";
            let pad = " ".repeat(total - head.len() - 2);
            format!("{head}{pad}\r\n").into_bytes()
        };
        assert!(matches!(parse(&line(V1_MAX)), Err(HeaderError::Malformed)), "padding is malformed, but not oversized");
        assert_eq!(parse(&line(V1_MAX + 1)), Err(HeaderError::Oversized));
        let exact = format!("PROXY UNKNOWN {}\r\n", "x".repeat(V1_MAX - 16)).into_bytes();
        assert_eq!(exact.len(), V1_MAX);
        assert_eq!(complete(&exact), Header { len: V1_MAX, source: None });
        let over = format!("PROXY UNKNOWN {}\r\n", "x".repeat(V1_MAX - 15)).into_bytes();
        assert_eq!(parse(&over), Err(HeaderError::Oversized));
        assert_eq!(parse(b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\rX"), Err(HeaderError::Malformed), "CR without LF");
        assert_eq!(parse(b"PROXY TCP4"), Ok(Parsed::Incomplete { want: V1_MAX - 10 }));
        // v2: a payload of exactly MAX_V2_PAYLOAD is allowed, one more is not.
        let mut at_max = v2(1, 0x11, &[0; 12]);
        at_max[14..16].copy_from_slice(&(MAX_V2_PAYLOAD as u16).to_be_bytes());
        assert_eq!(parse(&at_max), Ok(Parsed::Incomplete { want: 16 + MAX_V2_PAYLOAD - at_max.len() }));
        at_max[14..16].copy_from_slice(&(MAX_V2_PAYLOAD as u16 + 1).to_be_bytes());
        assert_eq!(parse(&at_max), Err(HeaderError::Oversized));
        // AF_UNIX (0x31) needs its 216 address bytes.
        assert_eq!(parse(&v2(1, 0x31, &[0; 12])), Err(HeaderError::Malformed));
        assert_eq!(complete(&v2(1, 0x31, &[0; 216])), Header { len: 16 + 216, source: None });
    }

    /// A reader that replays a script of results, and fails the test if
    /// read again after the script ends (a caller that spins on an error).
    struct Script(Vec<io::Result<Vec<u8>>>);
    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            assert!(!self.0.is_empty(), "read again after the last scripted result");
            let data = self.0.remove(0)?;
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            if n < data.len() {
                self.0.insert(0, Ok(data[n..].to_vec()));
            }
            Ok(n)
        }
    }

    #[test]
    fn advance_retries_only_eintr_and_tells_pending_from_truncated() {
        let header = b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\n".to_vec();
        let err = |k: io::ErrorKind| Err(io::Error::from(k));
        // EINTR: read again at once.
        let mut r = Script(vec![err(io::ErrorKind::Interrupted), Ok(header.clone())]);
        let mut hs = Handshake::default();
        assert_eq!(hs.received(), 0);
        // The first read asks for 16 bytes (either version's minimum): an
        // event loop reads on while `received` grows.
        assert!(matches!(hs.advance(&mut r), Ok(Step::Pending)));
        assert_eq!(hs.received(), 16);
        let mut done = false;
        for _ in 0..header.len() {
            if let Step::Done { header: h, .. } = hs.advance(&mut r).expect("EINTR is retried, not an error") {
                assert_eq!(h.len, header.len());
                done = true;
                break;
            }
        }
        assert!(done, "never completed");
        // WouldBlock and a blocking read's timeout: pending, no second read.
        for k in [io::ErrorKind::WouldBlock, io::ErrorKind::TimedOut] {
            let mut r = Script(vec![err(k)]);
            assert!(matches!(Handshake::default().advance(&mut r), Ok(Step::Pending)), "{k:?}");
        }
        // Any other error ends the handshake as truncated.
        let mut r = Script(vec![err(io::ErrorKind::ConnectionReset)]);
        assert_eq!(Handshake::default().advance(&mut r).err(), Some(HeaderError::Truncated));
    }

    #[test]
    fn cidr_matching() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.255.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let one: Cidr = "127.0.0.2".parse().unwrap();
        assert!(one.contains("127.0.0.2".parse().unwrap()) && !one.contains("127.0.0.3".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()) && !v6.contains("fe80::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "x", "10.0.0.0/", "10.0.0.0/-1"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(c.to_string(), "10.0.0.0/8");
    }
}
