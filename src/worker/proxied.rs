//! Connections from PROXY protocol listeners (`proxy_protocol`): what a
//! worker does before the echo begins.
//!
//! 1. The peer must be in `proxy_trusted`; anyone else is refused unread.
//! 2. The header (v1 or v2, parsed by [`proxy_protocol`]) must arrive whole
//!    within `proxy_timeout`.
//! 3. The client it names must be under `max_connections_per_ip`.
//!
//! Each refusal closes the connection and is counted by kind
//! (`echod_proxy_header_errors_total`, or `echod_connections_rejected_total`
//! for the limit), with one log line per five seconds per worker.
//!
//! Why here and not in the master: reading a header is waiting on a client,
//! for up to `proxy_timeout`, and the master's loop must never wait on a
//! client (its accepts, signals and health answers would stall behind the
//! slowest one). The handlers already own per-connection waiting: a thread
//! blocks with a deadline, an event loop keeps per-connection state and a
//! tick. Parsing is spread over the workers, and a header that crashes
//! something takes down one worker, not the master.
//!
//! The cost is that the per-address limit for these clients is checked here,
//! against every worker's tables of the scoreboard, instead of in the
//! master. The worker charges the client's exact address in its own PROXY
//! table first and then reads the total (a SeqCst fence between, on every
//! worker), so two workers admitting the same client at once both see each
//! other: at worst both refuse, never both admit past the limit.
//!
//! The worker is the only writer of its PROXY table's addresses (the master
//! writes the other table, of plain listeners' clients), and its handler
//! threads (or event loops) take turns through [`ADMITTING`]: one entry is
//! never re-keyed by two threads at once. A discharge needs no turn (one
//! atomic on a count the connection holds). A full table (it has twice the
//! worker's capacity of entries, so it cannot fill) refuses the client as
//! over the limit, with a log line.

use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use crate::ratelimit::RateLimited;
use crate::scoreboard::{Admission, Charge};
use crate::worker::counters::{Refusal, Tally};
use crate::worker::echo::write_counted;
use crate::worker::shared::Shared;
use proxy_protocol::{Handshake, Header, HeaderError, Step};

/// A connection whose header was accepted.
#[derive(Debug)]
pub struct Admitted {
    /// The client's address, charged to this worker: discharge it when the
    /// connection ends. None for a LOCAL (or UNKNOWN, UNSPEC, AF_UNIX)
    /// header: the balancer speaking for itself names no client, and its
    /// health checks must not eat a client's per-address budget.
    pub charge: Option<Charge>,
    /// Bytes the client sent right after the header, read with it: the
    /// first bytes to echo.
    pub early: Vec<u8>,
    /// The client the header named (None for LOCAL and the like), for the
    /// connection log.
    pub client: Option<SocketAddr>,
}

/// A connection refused for its header or its client, with the client the
/// header named when it got that far (for the connection log).
#[derive(Debug, Clone, Copy)]
pub struct Refused {
    pub why: Refusal,
    pub client: Option<SocketAddr>,
}

impl From<Refusal> for Refused {
    fn from(why: Refusal) -> Refused {
        Refused { why, client: None }
    }
}

/// Step 1: refuses a peer that may not send headers.
pub fn check_trusted(w: &Shared, peer: SocketAddr) -> Result<(), Refusal> {
    if w.config.proxy_trusts(peer.ip()) {
        Ok(())
    } else {
        Err(refused(w, peer, None, Refusal::Header(HeaderError::Untrusted)))
    }
}

/// The balancer's address, before anything is read. A peer that connected
/// and reset before the worker looked has none (ENOTCONN): that is a header
/// cut short, counted like any refusal, because every connection the master
/// dispatched must count as finished exactly once or its worker looks
/// loaded for ever.
pub fn peer_of(w: &Shared, stream: &TcpStream) -> Result<SocketAddr, Refusal> {
    stream.peer_addr().map_err(|_| {
        let why = Refusal::Header(HeaderError::Truncated);
        w.counters.refuse(why);
        why
    })
}

/// Thread mode: all three steps, blocking, the deadline enforced with
/// SO_RCVTIMEO for the header only (the echo itself runs without one; see
/// `pool::ConnSlot`).
pub fn handshake_blocking(w: &Shared, stream: &mut TcpStream) -> Result<Admitted, Refused> {
    let peer = peer_of(w, stream)?;
    check_trusted(w, peer)?;
    let deadline = Instant::now() + w.config.proxy_timeout.0;
    let mut hs = Handshake::default();
    let read = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(HeaderError::Timeout);
        }
        if stream.set_read_timeout(Some(left)).is_err() {
            break Err(HeaderError::Truncated);
        }
        match hs.advance(stream) {
            Ok(Step::Pending) => {}
            Ok(Step::Done { header, early }) => break Ok((header, early)),
            Err(e) => break Err(e),
        }
    };
    let _ = stream.set_read_timeout(None);
    match read {
        Ok((header, early)) => admit(w, peer, header, early),
        Err(kind) => Err(refused(w, peer, None, Refusal::Header(kind)).into()),
    }
}

/// Turns of this worker's threads at writing its PROXY address table (a
/// worker process holds one scoreboard slot, so one lock per process).
static ADMITTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Step 3, once a header is complete: charges the client it names and
/// checks `max_connections_per_ip` across all workers.
pub fn admit(w: &Shared, peer: SocketAddr, header: Header, early: Vec<u8>) -> Result<Admitted, Refused> {
    let Some(client) = header.source else {
        // LOCAL / UNKNOWN: the balancer speaks for itself (a health check),
        // trusted already; no client to charge.
        w.counters.proxied();
        log::trace!("connection from {peer} (the balancer itself)");
        return Ok(Admitted { charge: None, early, client: None });
    };
    let admission = {
        // A poisoned turn only means another thread panicked holding it;
        // the table itself is atomics, consistent at every step.
        let _turn = ADMITTING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        w.scoreboard.admit_proxied(w.id, client.ip().to_canonical(), w.config.max_connections_per_ip)
    };
    let charge = match admission {
        Admission::Admitted(charge) => charge,
        Admission::OverLimit => {
            return Err(Refused { why: refused(w, peer, Some(client), Refusal::PerIp), client: Some(client) });
        }
        Admission::TableFull => {
            w.counters.refuse(Refusal::PerIp);
            let allowed = w.refusal_log.lock().map(|mut l| l.allow(Instant::now())).unwrap_or(None);
            if let Some(suppressed) = allowed {
                log::warn!(
                    "rejected a connection from {} (via {peer}): worker {}'s per-address table is full{}",
                    client.ip(),
                    w.id,
                    RateLimited::suffix(suppressed)
                );
            }
            return Err(Refused { why: Refusal::PerIp, client: Some(client) });
        }
    };
    w.counters.proxied();
    log::trace!("connection from {client} via {peer}");
    Ok(Admitted { charge: Some(charge), early, client: Some(client) })
}

/// Counts a refusal and logs it (rate-limited); the caller closes.
pub fn refused(w: &Shared, peer: SocketAddr, client: Option<SocketAddr>, why: Refusal) -> Refusal {
    w.counters.refuse(why);
    let now = Instant::now();
    let allowed = w.refusal_log.lock().map(|mut l| l.allow(now)).unwrap_or(None);
    if let Some(suppressed) = allowed {
        let more = RateLimited::suffix(suppressed);
        match (why, client) {
            (Refusal::PerIp, Some(c)) => log::warn!(
                "rejected a connection from {} (via {peer}): max_connections_per_ip ({}) reached{more}",
                c.ip(),
                w.config.max_connections_per_ip
            ),
            (Refusal::Header(HeaderError::Untrusted), _) => {
                log::warn!(
                    "refused a connection from {peer}: not in proxy_trusted, so its PROXY header is not believed{more}"
                )
            }
            (Refusal::Header(kind), _) => {
                log::warn!("refused a connection from {peer}: PROXY protocol header {kind}{more}")
            }
            (Refusal::PerIp, None) => log::warn!("rejected a connection from {peer}: max_connections_per_ip{more}"),
        }
    }
    why
}

/// Thread mode: echoes the bytes that came with the header (none: nothing
/// to do), counting them as the echo loop does.
pub fn echo_early(stream: &mut TcpStream, early: &mut [u8], upper: bool, tally: &mut Tally) -> std::io::Result<()> {
    tally.bytes_in += early.len() as u64;
    if upper {
        early.make_ascii_uppercase();
    }
    write_counted(stream, early, tally)
}
