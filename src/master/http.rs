//! The master's tiny HTTP endpoint: `GET /metrics`, `GET /healthz` and
//! `GET /livez`.
//!
//! `/healthz` is readiness: 503 while no worker serves and from the first
//! moment of a graceful stop, so a load balancer (HAProxy's httpchk, a
//! Kubernetes readinessProbe) stops sending clients. `/livez` is liveness:
//! 200 whenever the master's loop answers at all, stopping or not, so a
//! Kubernetes livenessProbe never kills a pod for draining.
//!
//! Served from the master's own poll loop, non-blocking, so the master stays
//! single-threaded (rule 1 of DESIGN.md). A scraper can never stall accept
//! and dispatch: each connection is a small state machine that reads at most
//! [`MAX_REQUEST`] bytes and writes from a buffer only when the socket is
//! writable, every connection has a deadline ([`DEADLINE`]) after which it
//! is dropped, and at most [`MAX_CONNS`] are open at once. One request per
//! connection (`Connection: close`), as Prometheus is happy with.
//!
//! Scrapes cannot slow dispatch: each scrape renders the exposition afresh
//! while scrapes come at an ordinary pace, but renders are rationed
//! ([`RENDER_BURST`], refilled one per [`RENDER_EVERY`]); past that, a scrape
//! gets the last render (at most one refill period old), so a flood costs the
//! loop copies of a string, not a walk over every worker's slot per request.
//! A request head arriving a byte at a time is scanned only where it grew.
//!
//! Health probes must get through whatever holds the port: when every slot
//! is taken, a new connection always gets one, by evicting (with a reset) an
//! older connection in any phase, cheapest first: one already answered and
//! lingering for its client's close (its response is with the kernel, or
//! the client does not read it), then one still writing its response (a
//! client that does not read), then one still sending its request (idle or
//! slowloris); oldest first within a phase. A probe sends its request at
//! once, and it is read and answered in the loop turn that accepts it when
//! it is already there, so it is the newest connection in the table when
//! anything is evicted: a flood of reconnecting clients, whatever phase it
//! holds connections in, evicts its own older connections, not the probe.
//! The table stays at [`MAX_CONNS`], and each eviction frees what the
//! kernel held for the victim (SO_LINGER 0), so memory stays bounded.
//!
//! Responses are delivered whole: after the last byte is written the master
//! half-closes and reads (discarding) until the client closes, for up to
//! [`LINGER`], instead of closing at once, which with unread request bytes
//! (a pipelined request, a body) would make the kernel reset the connection
//! and drop the response's tail. A client that does not take its response
//! by the deadline is reset (SO_LINGER 0), so no unsent response waits in
//! kernel memory after it; evictions, refusals and resets are counted in
//! `echod_metrics_connections_*_total`.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};

use super::tokens::{SCRAPE_IDS, Source};
use crate::stats::EndpointTotals;

/// FileDescriptorName= of a socket-activated metrics socket.
pub const METRICS_FD_NAME: &str = "metrics";
/// Request head size limit; larger requests get 431 and are closed.
const MAX_REQUEST: usize = 8 * 1024;
/// Whole-exchange deadline per connection.
const DEADLINE: Duration = Duration::from_secs(5);
/// Open scrape connections at most (see the module doc for who makes room).
const MAX_CONNS: usize = 64;
/// After the response: how long the client has to close before it is reset.
const LINGER: Duration = Duration::from_secs(2);
/// Fresh renders: one more allowed per this period, up to [`RENDER_BURST`]
/// saved up. 20 a second is far more than any monitoring scrapes, and at a
/// few ms per render with hundreds of workers, a small share of the loop.
const RENDER_EVERY: Duration = Duration::from_millis(50);
const RENDER_BURST: u32 = 20;

/// What the endpoint needs from the master to answer a request.
pub trait Responder {
    /// The Prometheus exposition, rendered now.
    fn metrics(&self) -> String;
    /// True while the master serves (not stopping, some worker up).
    fn healthy(&self) -> bool;
}

enum State {
    Reading(Vec<u8>),
    Writing(Vec<u8>, usize),
    /// Response written and our side shut down: waiting for the client's
    /// close, discarding whatever it still sends.
    Closing,
}

impl State {
    /// Eviction order at the cap (lowest first): an answered connection
    /// costs nothing to drop (its client has had its response, or does not
    /// read it), one still writing is a client that does not read, one
    /// still reading its request is idle or slow, and the newest of those
    /// may be a probe whose request is on its way.
    fn eviction_rank(&self) -> u8 {
        match self {
            State::Closing => 0,
            State::Writing(..) => 1,
            State::Reading(_) => 2,
        }
    }
}

struct Conn {
    stream: TcpStream,
    state: State,
    deadline: Instant,
    accepted: Instant,
}

/// The endpoint's own counters, rendered after the master's series.
#[derive(Debug, Default, Clone, Copy)]
pub struct EndpointStats {
    /// Connections reset to make room for a new one (see the module doc
    /// for which go first).
    pub evicted: u64,
    /// Connections closed at accept because they could not be registered
    /// with the poll (a full table evicts instead).
    pub refused: u64,
    /// Connections reset at their deadline, a response possibly unsent.
    pub aborted: u64,
    /// Times the exposition was rendered (see RENDER_EVERY).
    pub renders: u64,
}

impl EndpointStats {
    /// As carried across a binary upgrade.
    fn totals(&self) -> EndpointTotals {
        EndpointTotals { evicted: self.evicted, refused: self.refused, aborted: self.aborted, renders: self.renders }
    }

    /// The series: ours plus what earlier masters `carried` (an upgrade).
    fn render(&self, carried: &EndpointTotals) -> String {
        let mut sum = self.totals();
        sum.add(carried);
        let series = [
            ("echod_metrics_connections_evicted_total", sum.evicted),
            ("echod_metrics_connections_refused_total", sum.refused),
            ("echod_metrics_connections_aborted_total", sum.aborted),
            ("echod_metrics_renders_total", sum.renders),
        ];
        let mut out = String::new();
        for (name, v) in series {
            crate::metrics::header(&mut out, name);
            out.push_str(&format!("{name} {v}\n"));
        }
        out
    }
}

/// The metrics listener and its connections.
pub struct HttpServer {
    listener: TcpListener,
    pub addr: SocketAddr,
    conns: HashMap<usize, Conn>,
    next_id: usize,
    /// Out of fds at the last accept: try again then (the edge-triggered
    /// readiness of pending scrapes was consumed).
    retry_at: Option<Instant>,
    stats: EndpointStats,
    /// The counters of earlier masters (binary upgrade), added to ours so
    /// `echod_metrics_*_total` never goes backwards.
    carried: EndpointTotals,
    /// The last rendered exposition, and the ration of fresh renders.
    rendered: Rendered,
    /// Not accepting (see `pause`).
    paused: bool,
}

/// The last render and what is left of the ration.
struct Rendered {
    text: String,
    /// Fresh renders allowed now (refilled with time, up to RENDER_BURST).
    tokens: u32,
    refilled_at: Instant,
}

impl Rendered {
    fn new() -> Rendered {
        Rendered { text: String::new(), tokens: RENDER_BURST, refilled_at: Instant::now() }
    }

    /// Whether a fresh render is allowed now (and takes it from the ration).
    fn take(&mut self, now: Instant) -> bool {
        let periods = now.duration_since(self.refilled_at).as_millis() / RENDER_EVERY.as_millis();
        if periods > 0 {
            self.tokens = (u128::from(self.tokens) + periods).min(u128::from(RENDER_BURST)) as u32;
            self.refilled_at = now;
        }
        let fresh = self.tokens > 0 || self.text.is_empty();
        self.tokens = self.tokens.saturating_sub(1);
        fresh
    }
}

impl HttpServer {
    /// Binds `addr` (SO_REUSEADDR, non-blocking, close-on-exec).
    pub fn bind(addr: SocketAddr, registry: &Registry) -> io::Result<HttpServer> {
        HttpServer::serve(TcpListener::bind(addr)?, registry)
    }

    /// Uses a listening socket passed by systemd.
    pub fn adopt(socket: std::net::TcpListener, registry: &Registry) -> io::Result<HttpServer> {
        socket.set_nonblocking(true)?;
        HttpServer::serve(TcpListener::from_std(socket), registry)
    }

    fn serve(mut listener: TcpListener, registry: &Registry) -> io::Result<HttpServer> {
        registry.register(&mut listener, Source::MetricsListener.token(), Interest::READABLE)?;
        let addr = listener.local_addr()?;
        Ok(HttpServer {
            listener,
            addr,
            conns: HashMap::new(),
            next_id: 0,
            retry_at: None,
            stats: Default::default(),
            carried: EndpointTotals::default(),
            rendered: Rendered::new(),
            paused: false,
        })
    }

    /// This endpoint's own counters, for the other master in an upgrade.
    pub fn totals(&self) -> EndpointTotals {
        self.stats.totals()
    }

    /// What earlier masters counted (replaces the last such report).
    pub fn set_carried(&mut self, carried: EndpointTotals) {
        self.carried = carried;
    }

    /// The listening socket, for a binary upgrade to pass on.
    pub fn listener_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.listener.as_raw_fd()
    }

    /// The listening socket, borrowed (for systemd's fd store).
    pub fn listener_borrowed(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.listener.as_fd()
    }

    /// Stops accepting but finishes the scrapes in progress and keeps the
    /// listening socket, unpolled: after a binary upgrade the new master
    /// serves it, and this one may have to again if the new one dies.
    pub fn pause(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.listener);
        self.paused = true;
    }

    /// Accepts again after [`HttpServer::pause`] (connections queued
    /// meanwhile raise an event as soon as the listener is polled again).
    pub fn resume(&mut self, registry: &Registry) -> io::Result<()> {
        registry.register(&mut self.listener, Source::MetricsListener.token(), Interest::READABLE)?;
        self.paused = false;
        Ok(())
    }

    /// Closes the listener and every connection.
    pub fn close(mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.listener);
        for (_, mut c) in self.conns.drain() {
            let _ = registry.deregister(&mut c.stream);
        }
    }

    /// The earliest connection deadline or accept retry.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().map(|c| c.deadline).chain(self.retry_at).min()
    }

    /// Drops connections past their deadline (slow or silent scrapers), and
    /// retries accepting after fd exhaustion.
    pub fn expire(&mut self, now: Instant, registry: &Registry) {
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            if !self.paused {
                self.accept_pending(registry, now, None);
            }
        }
        let late: Vec<usize> = self.conns.iter().filter(|(_, c)| now >= c.deadline).map(|(id, _)| *id).collect();
        for id in late {
            log::debug!("metrics: dropping a scrape connection that took longer than {DEADLINE:?}");
            let answering = self.conns.get(&id).is_some_and(|c| !matches!(c.state, State::Reading(_)));
            if answering {
                // Whatever of the response is still unsent goes with a
                // reset, not with a FIN that would keep it in kernel memory.
                self.abort_conn(id, registry);
                self.stats.aborted += 1;
            } else {
                self.drop_conn(id, registry);
            }
        }
    }

    /// Accepts pending scrape connections, and answers each one whose
    /// request is already there in the same turn (see the module doc).
    pub fn on_listener(&mut self, registry: &Registry, now: Instant, app: &dyn Responder) {
        self.accept_pending(registry, now, Some(app));
    }

    /// Accepts until the backlog is empty. Without `app` (an accept retry
    /// from the timer) a new connection is only registered: its request,
    /// left unread, raises a readiness event for the next turn.
    fn accept_pending(&mut self, registry: &Registry, now: Instant, app: Option<&dyn Responder>) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.conns.len() >= MAX_CONNS {
                        if let Some(victim) = self.eviction_victim() {
                            self.abort_conn(victim, registry);
                            self.stats.evicted += 1;
                        }
                    }
                    let id = self.next_id;
                    self.next_id = self.next_id.wrapping_add(1) % SCRAPE_IDS;
                    let token = Source::Scrape(id).token();
                    if registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE).is_err() {
                        self.stats.refused += 1;
                        continue; // dropped: closed at once
                    }
                    let state = State::Reading(Vec::with_capacity(512));
                    self.conns.insert(id, Conn { stream, state, deadline: now + DEADLINE, accepted: now });
                    if let Some(app) = app {
                        self.on_conn(id, registry, app);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("metrics accept: {e}; retrying in 1 s");
                    self.retry_at = Some(now + Duration::from_secs(1));
                    return;
                }
            }
        }
    }

    /// Progresses one connection after a readiness event.
    pub fn on_conn(&mut self, id: usize, registry: &Registry, app: &dyn Responder) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let mut exposition =
            Exposition { app, rendered: &mut self.rendered, stats: &mut self.stats, carried: &self.carried };
        let done = match advance(conn, &mut exposition) {
            Ok(done) => done,
            Err(e) => {
                log::debug!("metrics connection: {e}");
                true
            }
        };
        if done {
            self.drop_conn(id, registry);
        }
    }

    /// The connection to reset for a new one: lowest phase rank, then the
    /// oldest (ids break ties between connections accepted in the same
    /// instant, in accept order modulo wrap-around).
    fn eviction_victim(&self) -> Option<usize> {
        let key = |(id, c): (&usize, &Conn)| (c.state.eviction_rank(), c.accepted, *id);
        self.conns.iter().min_by_key(|e| key(*e)).map(|(id, _)| *id)
    }

    fn drop_conn(&mut self, id: usize, registry: &Registry) {
        if let Some(mut c) = self.conns.remove(&id) {
            let _ = registry.deregister(&mut c.stream);
        }
    }

    /// Drops a connection with a reset (SO_LINGER 0): the kernel frees what
    /// it still holds for it at once.
    fn abort_conn(&mut self, id: usize, registry: &Registry) {
        if let Some(c) = self.conns.get(&id) {
            let _ = socket2::SockRef::from(&c.stream).set_linger(Some(Duration::ZERO));
        }
        self.drop_conn(id, registry);
    }
}

/// What answers a request: the master's state, through the rationed render.
struct Exposition<'a> {
    app: &'a dyn Responder,
    rendered: &'a mut Rendered,
    stats: &'a mut EndpointStats,
    carried: &'a EndpointTotals,
}

impl Exposition<'_> {
    fn healthy(&self) -> bool {
        self.app.healthy()
    }

    /// The exposition, rendered now if the ration allows, else the last
    /// render; then the endpoint's own counters (always current).
    fn metrics(&mut self) -> String {
        if self.rendered.take(Instant::now()) {
            self.stats.renders += 1;
            self.rendered.text = self.app.metrics();
        }
        self.rendered.text.clone() + &self.stats.render(self.carried)
    }
}

/// Reads the request until its head is complete, writes the response, then
/// waits for the client's close. Returns true when the connection is
/// finished.
fn advance(conn: &mut Conn, exposition: &mut Exposition) -> io::Result<bool> {
    if let State::Reading(buf) = &mut conn.state {
        let mut chunk = [0u8; 2048];
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    // Only where the head grew (and the 3 bytes before,
                    // where a terminator may start): a head sent a byte at
                    // a time is not rescanned whole on every read.
                    let from = buf.len().saturating_sub(3);
                    buf.extend_from_slice(&chunk[..n]);
                    if head_complete(&buf[from..]) || buf.len() > MAX_REQUEST {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let response = respond(buf, exposition);
        conn.state = State::Writing(response, 0);
    }
    if let State::Writing(data, off) = &mut conn.state {
        while *off < data.len() {
            match conn.stream.write(&data[*off..]) {
                Ok(n) => *off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        conn.stream.shutdown(Shutdown::Write)?;
        conn.state = State::Closing;
        conn.deadline = conn.deadline.min(Instant::now() + LINGER);
    }
    // Closing: discard what the client still sends until it closes.
    let mut sink = [0u8; 2048];
    loop {
        match conn.stream.read(&mut sink) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn head_complete(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

/// The full HTTP response for a request head.
fn respond(head: &[u8], app: &mut Exposition) -> Vec<u8> {
    if head.len() > MAX_REQUEST {
        return response(431, "Request Header Fields Too Large", "text/plain", "request too large\n", false);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let parts: Vec<&str> = line.split_whitespace().collect();
    let (method, path) = match parts[..] {
        [method, path, version] if version.starts_with("HTTP/") => (method, path),
        _ => return response(400, "Bad Request", "text/plain", "malformed request line\n", false),
    };
    let path = path.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return response(405, "Method Not Allowed", "text/plain", "only GET and HEAD\n", head_only);
    }
    match path {
        "/metrics" => response(200, "OK", "text/plain; version=0.0.4; charset=utf-8", &app.metrics(), head_only),
        "/healthz" if app.healthy() => response(200, "OK", "text/plain", "ok\n", head_only),
        "/healthz" => response(503, "Service Unavailable", "text/plain", "stopping or no worker serving\n", head_only),
        "/livez" => response(200, "OK", "text/plain", "alive\n", head_only),
        _ => response(404, "Not Found", "text/plain", "try /metrics, /healthz or /livez\n", head_only),
    }
}

fn response(code: u16, reason: &str, ctype: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct App(bool);
    impl Responder for App {
        fn metrics(&self) -> String {
            "m 1\n".into()
        }
        fn healthy(&self) -> bool {
            self.0
        }
    }

    fn text(head: &str, healthy: bool) -> String {
        let (mut rendered, mut stats) = (Rendered::new(), EndpointStats::default());
        let carried = EndpointTotals::default();
        let mut e = Exposition { app: &App(healthy), rendered: &mut rendered, stats: &mut stats, carried: &carried };
        String::from_utf8(respond(head.as_bytes(), &mut e)).unwrap()
    }

    #[test]
    fn renders_are_rationed_not_stopped() {
        let mut r = Rendered::new();
        let t0 = r.refilled_at;
        r.text = "x".into();
        assert!((0..RENDER_BURST).all(|_| r.take(t0)), "a burst of fresh renders");
        assert!(!r.take(t0), "then the last render is served");
        assert!(r.take(t0 + RENDER_EVERY), "one more per period");
        assert!(!r.take(t0 + RENDER_EVERY));
        let later = t0 + RENDER_EVERY * 1000;
        assert_eq!((0..100).filter(|_| r.take(later)).count(), RENDER_BURST as usize, "saved up to the burst only");
    }

    #[test]
    fn routes() {
        assert!(text("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", true).starts_with("HTTP/1.1 200 OK"));
        assert!(text("GET /metrics HTTP/1.1\r\n\r\n", true).contains("\r\n\r\nm 1\n# HELP echod_metrics_connections_"));
        assert!(text("GET /healthz HTTP/1.0\r\n\r\n", true).starts_with("HTTP/1.1 200"));
        assert!(text("GET /healthz HTTP/1.0\r\n\r\n", false).starts_with("HTTP/1.1 503"));
        assert!(text("GET /livez HTTP/1.0\r\n\r\n", false).starts_with("HTTP/1.1 200"), "alive while stopping");
        assert!(text("GET /nope HTTP/1.0\r\n\r\n", true).starts_with("HTTP/1.1 404"));
        assert!(text("POST /metrics HTTP/1.0\r\n\r\n", true).starts_with("HTTP/1.1 405"));
        for bad in ["GET\r\n\r\n", "GET /metrics\r\n\r\n", "GET /metrics FTP/1.0\r\n\r\n", "\r\n\r\n"] {
            assert!(text(bad, true).starts_with("HTTP/1.1 400"), "{bad:?}");
        }
        let head = text("HEAD /metrics HTTP/1.1\r\n\r\n", true);
        assert!(head.contains("Content-Length: ") && head.ends_with("\r\n\r\n"));
        assert!(head_complete(b"GET / HTTP/1.0\n\n") && !head_complete(b"GET / HTTP/1.0\r\n"));
    }
}
