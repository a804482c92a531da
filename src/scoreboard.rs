//! The scoreboard: per-worker numbers in memory shared by the master and
//! every worker (as Apache's scoreboard).
//!
//! The master maps it before the first fork, so every worker sees the same
//! pages. Each worker writes only its own slot; the master only reads slots
//! (and resets a slot before handing it to a new worker). It is the single
//! source for dispatch (how loaded is each worker?) and for everything an
//! operator sees (stats lines, USR1, /metrics).
//!
//! A slot is 256 bytes, a multiple of the cache line and aligned to it (the
//! mapping is page-aligned), so two workers never write the same line. The
//! master-written words, the accept-paused flag and the bitmap of occupied
//! slots, sit in a header block of their own.

use std::io;
use std::net::IpAddr;
use std::sync::atomic::Ordering;

use crate::sync::{AtomicU32, AtomicU64, fence};
#[cfg(not(loom))]
use crate::sys;

/// Words (u64) per slot: 256 bytes, four cache lines.
const STRIDE: usize = 32;

/// Upper bounds (seconds) of the connection-duration histogram buckets; the
/// last bucket is +Inf. Spread for an echo server: sub-millisecond churn up
/// to connections held for hours.
pub const DURATION_BUCKETS: [f64; 9] = [0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0, f64::INFINITY];

/// The words of a worker slot. Writers: R = receiver thread, C = under the
/// worker's counters lock, T = the receiver's 250 ms tick, M = master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Field {
    /// M: pid of the worker owning the slot (0 = free).
    Pid = 0,
    /// T: CLOCK_MONOTONIC milliseconds of the receiver's last tick; a stale
    /// value means the worker is hung (stopped, wedged) and gets no new work.
    Heartbeat,
    /// R: connections taken off the channel.
    Received,
    /// C: connections closed (the master's load is dispatched - finished).
    Finished,
    /// C: bytes read from clients.
    BytesIn,
    /// C: bytes echoed to clients.
    BytesOut,
    /// C: connections ended by a reset or broken pipe.
    ErrReset,
    /// C: connections closed by idle or write timeout.
    ErrTimeout,
    /// C: connections ended by any other error.
    ErrOther,
    /// C: sum of connection durations, microseconds.
    DurationSumUs,
    /// T: handler threads alive.
    Threads,
    /// T: handler threads serving a connection.
    Busy,
    /// T: connections waiting in the worker's queue.
    Queued,
    /// C: connections whose PROXY protocol header was accepted.
    Proxied,
    /// C: connections the worker turned away for `max_connections_per_ip`
    /// (those from PROXY listeners, whose client only the worker knows).
    Rejected,
    /// C: PROXY header errors, one word per kind of
    /// [`HeaderError::ALL`](crate::proxy::HeaderError::ALL).
    ProxyErr0,
    /// C: connection-duration histogram, one (non-cumulative) count per
    /// bucket of [`DURATION_BUCKETS`].
    Duration0 = Field::ProxyErr0 as usize + PROXY_KINDS,
}

/// Kinds of PROXY header error, each with a slot word.
const PROXY_KINDS: usize = crate::proxy::HeaderError::ALL.len();

const _: () = assert!(Field::Duration0 as usize + DURATION_BUCKETS.len() <= STRIDE);

/// Header words (block 0, written by the master).
const ACCEPT_PAUSED: usize = 0;
/// First word of the bitmap of occupied slots (one bit per slot), after the
/// accept-paused flag.
const OCCUPIED: usize = 1;
/// Slots the header's bitmap can name.
const MAX_SLOTS: usize = (STRIDE - OCCUPIED) * 64;
// The bitmap must fit in the header block: one more slot would set a bit in
// slot 0's words.
const _: () = assert!(OCCUPIED + MAX_SLOTS.div_ceil(64) <= STRIDE);

/// Client addresses are counted per hash bucket: two addresses that share a
/// bucket (rarely) share a `max_connections_per_ip` budget. Per worker that
/// is 64 KiB of shared memory, touched only where clients hash.
#[cfg(not(loom))]
pub const IP_BUCKETS: usize = 16384;
/// Under the model checker, a few buckets: every cell is an object loom
/// tracks, and clearing a slot touches them all.
#[cfg(loom)]
pub const IP_BUCKETS: usize = 4;

/// The shared mapping. Cheap to copy: it is a `'static` slice.
#[derive(Clone, Copy)]
pub struct Scoreboard {
    words: &'static [AtomicU64],
    /// Per worker, per client-address bucket: connections the worker holds.
    /// The master adds when it sends a connection, the worker subtracts when
    /// it closes one.
    ///
    /// The per-address total is the sum over *occupied* slots (the header's
    /// bitmap, one bit per slot the master has handed to a live worker), not
    /// a row of its own: a charge or discharge is then one atomic, so a
    /// worker killed at any instant leaves nothing half-counted, and a dead
    /// worker's connections stop counting the moment the master vacates its
    /// slot. Summing costs one load per live worker, not one per slot
    /// (there are 2 x MAX_WORKERS + 8 slots, most of them empty).
    ip_counts: &'static [AtomicU32],
    slots: usize,
}

impl Scoreboard {
    /// Maps room for `slots` workers. Call before forking.
    pub fn new(slots: usize) -> io::Result<Scoreboard> {
        if slots > MAX_SLOTS {
            return Err(io::Error::other(format!("at most {MAX_SLOTS} scoreboard slots")));
        }
        let words = shared_zeroed::<AtomicU64>((slots + 1) * STRIDE)?;
        let ip_counts = shared_zeroed::<AtomicU32>(slots * IP_BUCKETS)?;
        Ok(Scoreboard { words, ip_counts, slots })
    }

    fn ip_cell(&self, slot: usize, bucket: u16) -> &AtomicU32 {
        &self.ip_counts[slot * IP_BUCKETS + bucket as usize % IP_BUCKETS]
    }

    /// Connections worker `slot` holds from addresses in `bucket`.
    #[cfg(test)]
    pub fn ip_count(&self, slot: usize, bucket: u16) -> u32 {
        self.ip_cell(slot, bucket).load(Ordering::Relaxed)
    }

    /// Master (or a worker, for a client a PROXY header named): worker
    /// `slot` holds one more connection from `bucket`.
    pub fn charge_ip(&self, slot: usize, bucket: u16) {
        self.ip_cell(slot, bucket).fetch_add(1, Ordering::Relaxed);
    }

    /// Worker: it closed a connection from `bucket`.
    pub fn discharge_ip(&self, slot: usize, bucket: u16) {
        let _ = self.ip_cell(slot, bucket).fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Connections all live workers hold from addresses in `bucket`: what
    /// `max_connections_per_ip` is checked against, by the master for plain
    /// listeners and by a worker for clients only it knows (PROXY).
    pub fn ip_total(&self, bucket: u16) -> u64 {
        let mut total = 0;
        for (w, word) in self.words[OCCUPIED..OCCUPIED + self.slots.div_ceil(64)].iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                let slot = w * 64 + bits.trailing_zeros() as usize;
                total += self.ip_cell(slot, bucket).load(Ordering::Relaxed) as u64;
                bits &= bits - 1;
            }
        }
        total
    }

    /// Master, before forking a worker into `slot`: zeroes its address
    /// counts and makes them count.
    pub fn occupy(&self, slot: usize) {
        self.clear_ips(slot);
        self.words[OCCUPIED + slot / 64].fetch_or(1 << (slot % 64), Ordering::Release);
    }

    /// Master, once the worker of `slot` is reaped: its connections died
    /// with it, so its address counts stop counting (whatever it was doing
    /// when it died) and are zeroed.
    pub fn vacate(&self, slot: usize) {
        self.words[OCCUPIED + slot / 64].fetch_and(!(1 << (slot % 64)), Ordering::Release);
        self.clear_ips(slot);
    }

    fn clear_ips(&self, slot: usize) {
        for cell in &self.ip_counts[slot * IP_BUCKETS..(slot + 1) * IP_BUCKETS] {
            if cell.load(Ordering::Relaxed) != 0 {
                cell.store(0, Ordering::Relaxed);
            }
        }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Slot `i` (0-based); panics on a slot the master never allocated.
    pub fn slot(&self, i: usize) -> Slot {
        assert!(i < self.slots, "scoreboard slot {i} out of range");
        let start = (i + 1) * STRIDE;
        Slot { words: &self.words[start..start + STRIDE] }
    }

    /// Master: accepting is paused for lack of capacity; workers should send
    /// [`crate::ipc::Notice::SlotFreed`] when a connection ends.
    ///
    /// SeqCst pairs with [`Slot::finish`]: either the worker sees the flag or
    /// the master, re-reading loads after setting it, sees the freed slot.
    pub fn set_accept_paused(&self, paused: bool) {
        self.words[ACCEPT_PAUSED].store(paused as u64, Ordering::SeqCst);
        // The fence, not the SeqCst store alone, is what loom can check
        // (it models SeqCst accesses as AcqRel): store, fence, then load,
        // on both sides (tests/loom.rs).
        fence(Ordering::SeqCst);
    }

    pub fn accept_paused(&self) -> bool {
        self.words[ACCEPT_PAUSED].load(Ordering::SeqCst) != 0
    }
}

/// The scoreboard's memory: shared between processes (see
/// [`sys::shared_zeroed`]).
#[cfg(not(loom))]
fn shared_zeroed<T: sys::SharedAtomic>(len: usize) -> io::Result<&'static [T]> {
    sys::shared_zeroed(len)
}

/// Under loom: leaked heap memory holding loom's atomics (a model runs in
/// one process, and each run makes a new, small scoreboard).
#[cfg(loom)]
fn shared_zeroed<T: Default>(len: usize) -> io::Result<&'static [T]> {
    Ok(Box::leak((0..len).map(|_| T::default()).collect::<Vec<T>>().into_boxed_slice()))
}

/// One worker's slot.
#[derive(Clone, Copy)]
pub struct Slot {
    words: &'static [AtomicU64],
}

impl Slot {
    pub fn get(&self, f: Field) -> u64 {
        self.words[f as usize].load(Ordering::Relaxed)
    }

    pub fn set(&self, f: Field, v: u64) {
        self.words[f as usize].store(v, Ordering::Relaxed);
    }

    /// The finished count, ordered against the master's paused flag.
    pub fn finished(&self) -> u64 {
        self.words[Field::Finished as usize].load(Ordering::SeqCst)
    }

    /// Publishes a new finished count (see [`Scoreboard::set_accept_paused`]).
    pub fn set_finished(&self, v: u64) {
        self.words[Field::Finished as usize].store(v, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    pub fn duration_bucket(&self, i: usize) -> u64 {
        self.words[Field::Duration0 as usize + i].load(Ordering::Relaxed)
    }

    pub fn set_duration_bucket(&self, i: usize, v: u64) {
        self.words[Field::Duration0 as usize + i].store(v, Ordering::Relaxed);
    }

    /// Publishes the count of PROXY header errors of kind `i`.
    pub fn set_proxy_error(&self, i: usize, v: u64) {
        self.words[Field::ProxyErr0 as usize + i].store(v, Ordering::Relaxed);
    }

    /// Master: zeroes the slot before a new worker gets it.
    pub fn reset(&self) {
        for w in self.words {
            w.store(0, Ordering::SeqCst);
        }
    }

    /// A consistent-enough copy of the slot for reporting.
    pub fn snapshot(&self) -> SlotStats {
        let mut duration = [0; DURATION_BUCKETS.len()];
        for (i, d) in duration.iter_mut().enumerate() {
            *d = self.duration_bucket(i);
        }
        let mut proxy_errors = [0; PROXY_KINDS];
        for (i, e) in proxy_errors.iter_mut().enumerate() {
            *e = self.words[Field::ProxyErr0 as usize + i].load(Ordering::Relaxed);
        }
        SlotStats {
            received: self.get(Field::Received),
            finished: self.finished(),
            bytes_in: self.get(Field::BytesIn),
            bytes_out: self.get(Field::BytesOut),
            err_reset: self.get(Field::ErrReset),
            err_timeout: self.get(Field::ErrTimeout),
            err_other: self.get(Field::ErrOther),
            duration_sum_us: self.get(Field::DurationSumUs),
            duration,
            proxied: self.get(Field::Proxied),
            rejected: self.get(Field::Rejected),
            proxy_errors,
            threads: self.get(Field::Threads),
            busy: self.get(Field::Busy),
            queued: self.get(Field::Queued),
        }
    }
}

/// The numbers of one slot at one moment. Counters add up across workers
/// (and across dead workers, whose totals the master keeps).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotStats {
    pub received: u64,
    pub finished: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub err_reset: u64,
    pub err_timeout: u64,
    pub err_other: u64,
    pub duration_sum_us: u64,
    pub duration: [u64; DURATION_BUCKETS.len()],
    pub proxied: u64,
    pub rejected: u64,
    /// By kind, in the order of `proxy::HeaderError::ALL`.
    pub proxy_errors: [u64; PROXY_KINDS],
    // Gauges (not summed into retired totals).
    pub threads: u64,
    pub busy: u64,
    pub queued: u64,
}

impl SlotStats {
    /// Adds the counters of `other` (not its gauges).
    pub fn add_counters(&mut self, other: &SlotStats) {
        self.received += other.received;
        self.finished += other.finished;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.err_reset += other.err_reset;
        self.err_timeout += other.err_timeout;
        self.err_other += other.err_other;
        self.duration_sum_us += other.duration_sum_us;
        for (a, b) in self.duration.iter_mut().zip(other.duration) {
            *a += b;
        }
        self.proxied += other.proxied;
        self.rejected += other.rejected;
        for (a, b) in self.proxy_errors.iter_mut().zip(other.proxy_errors) {
            *a += b;
        }
    }

    pub fn errors(&self) -> u64 {
        self.err_reset + self.err_timeout + self.err_other
    }
}

/// The bucket of a client address (FNV-1a over its bytes; IPv4-mapped IPv6
/// counts as the IPv4 address).
pub fn ip_bucket(ip: IpAddr) -> u16 {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let bytes = match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    ((h ^ (h >> 16)) as usize % IP_BUCKETS) as u16
}

/// CLOCK_MONOTONIC in milliseconds: one clock for every process, so the
/// master can judge a worker's heartbeat.
pub fn monotonic_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A retired worker's counters are added field by field into the
    /// master's totals (cargo-mutants: unchecked by the unit tests).
    #[test]
    fn retired_counters_add_field_by_field() {
        let stats = |k: u64| {
            let mut s = SlotStats {
                received: k,
                finished: k << 1,
                bytes_in: k << 2,
                bytes_out: k << 3,
                err_reset: k << 4,
                err_timeout: k << 5,
                err_other: k << 6,
                duration_sum_us: k << 7,
                proxied: k << 8,
                rejected: k << 9,
                threads: 5,
                ..SlotStats::default()
            };
            s.duration[2] = k << 10;
            s.proxy_errors[3] = k << 11;
            s
        };
        let mut sum = SlotStats::default();
        sum.add_counters(&stats(1));
        sum.add_counters(&stats(2));
        let want = SlotStats { threads: 0, ..stats(3) };
        assert_eq!(sum, want, "gauges (threads) are not summed");
        assert_eq!(sum.errors(), 3 * ((1 << 4) + (1 << 5) + (1 << 6)));
    }

    #[test]
    fn header_words_and_size() {
        let sb = Scoreboard::new(3).unwrap();
        assert_eq!(sb.slots(), 3);
        assert!(!sb.accept_paused());
        sb.set_accept_paused(true);
        assert!(sb.accept_paused());
        sb.set_accept_paused(false);
        assert!(!sb.accept_paused());
        assert!(Scoreboard::new(MAX_SLOTS + 1).is_err());
        // Slot 0 lives after the header block: its pid word is not the
        // accept-paused flag, its heartbeat not the occupied bitmap.
        sb.slot(0).set(Field::Pid, 42);
        sb.slot(0).set(Field::Heartbeat, 1);
        assert!(!sb.accept_paused(), "slot 0 overlaps the header");
        assert_eq!(sb.words[OCCUPIED].load(Ordering::Relaxed), 0, "slot 0 overlaps the occupied bitmap");
    }

    /// FNV-1a, pinned: 127.0.0.1 and its IPv4-mapped form share a bucket,
    /// and distinct addresses spread over the buckets.
    #[test]
    fn addresses_hash_to_stable_spread_buckets() {
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(ip_bucket(v4), 6722);
        assert_eq!(ip_bucket("::ffff:127.0.0.1".parse().unwrap()), 6722);
        assert_eq!(ip_bucket("192.0.2.7".parse().unwrap()), 11013);
        assert_eq!(ip_bucket("2001:db8::1".parse().unwrap()), 10927);
        let buckets: std::collections::HashSet<u16> =
            (0..2000u32).map(|i| ip_bucket(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)))).collect();
        assert!(buckets.len() > 1800, "2000 addresses in only {} buckets", buckets.len());
    }

    /// The heartbeat clock is CLOCK_MONOTONIC in ms (the same clock in
    /// every process), and it advances.
    #[test]
    fn the_heartbeat_clock_is_monotonic_milliseconds() {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
        let a = monotonic_ms();
        let want = t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000;
        assert!((want..want + 1000).contains(&a), "{a} ms, CLOCK_MONOTONIC {want} ms");
        std::thread::sleep(std::time::Duration::from_millis(30));
        let b = monotonic_ms();
        assert!((30..10_000).contains(&(b - a)), "advanced {} ms in a 30 ms sleep", b - a);
    }

    #[test]
    fn slots_are_separate() {
        let sb = Scoreboard::new(4).unwrap();
        sb.slot(1).set(Field::BytesIn, 7);
        sb.slot(1).set_duration_bucket(DURATION_BUCKETS.len() - 1, 3);
        assert_eq!(sb.slot(0).get(Field::BytesIn), 0);
        assert_eq!(sb.slot(2).snapshot(), SlotStats::default());
        let s = sb.slot(1).snapshot();
        assert_eq!((s.bytes_in, s.duration[DURATION_BUCKETS.len() - 1]), (7, 3));
        sb.slot(1).reset();
        assert_eq!(sb.slot(1).snapshot(), SlotStats::default());
        sb.set_accept_paused(true);
        assert!(sb.accept_paused());
    }

    #[test]
    fn ip_counts_per_worker_and_bucket() {
        let sb = Scoreboard::new(2).unwrap();
        let b = ip_bucket("192.0.2.7".parse().unwrap());
        assert_eq!(b, ip_bucket("::ffff:192.0.2.7".parse().unwrap()), "mapped v4 is v4");
        assert_ne!(b, ip_bucket("192.0.2.8".parse().unwrap()));
        sb.occupy(0);
        sb.occupy(1);
        sb.charge_ip(0, b);
        sb.charge_ip(0, b);
        sb.charge_ip(1, b);
        sb.discharge_ip(0, b);
        assert_eq!((sb.ip_count(0, b), sb.ip_count(1, b)), (1, 1));
        assert_eq!(sb.ip_total(b), 2);
        sb.vacate(0);
        sb.discharge_ip(0, b); // never below zero
        assert_eq!((sb.ip_count(0, b), sb.ip_count(1, b)), (0, 1));
        assert_eq!(sb.ip_total(b), 1, "the total follows charges, discharges and a vacated slot");
        assert_eq!(sb.ip_total(ip_bucket("192.0.2.8".parse().unwrap())), 0);
    }

    #[test]
    fn a_dead_workers_counts_stop_counting_whatever_it_was_doing() {
        // A worker killed mid-charge (or mid-discharge) leaves its own row
        // at whatever it reached; vacating the slot must take the row out
        // of every total, and a new worker in the slot starts from zero.
        let sb = Scoreboard::new(300).unwrap();
        let b = ip_bucket("198.51.100.1".parse().unwrap());
        sb.occupy(3);
        sb.occupy(299);
        for _ in 0..5 {
            sb.charge_ip(299, b);
        }
        sb.charge_ip(3, b);
        assert_eq!(sb.ip_total(b), 6);
        sb.vacate(299);
        assert_eq!(sb.ip_total(b), 1, "the dead slot's five are gone");
        sb.charge_ip(299, b); // a straggler write after the reap
        assert_eq!(sb.ip_total(b), 1, "a vacated slot does not count");
        sb.occupy(299);
        assert_eq!((sb.ip_count(299, b), sb.ip_total(b)), (0, 1), "a reused slot starts empty");
    }

    #[test]
    fn slot_is_cache_line_sized() {
        assert_eq!(STRIDE * 8 % 128, 0);
    }
}
