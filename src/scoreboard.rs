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

use crate::sync::{AtomicU64, fence};
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
    /// [`HeaderError::ALL`](proxy_protocol::HeaderError::ALL).
    ProxyErr0,
    /// C: connection-duration histogram, one (non-cumulative) count per
    /// bucket of [`DURATION_BUCKETS`].
    Duration0 = Field::ProxyErr0 as usize + PROXY_KINDS,
    /// T (every fourth): the worker's open fds, for `process_open_fds`
    /// (the master cannot count them: see `metrics::process`).
    OpenFds = Field::Duration0 as usize + DURATION_BUCKETS.len(),
    /// T (and at exit): connection log lines dropped (`worker::access`).
    LogDropped,
}

/// Kinds of PROXY header error, each with a slot word.
const PROXY_KINDS: usize = proxy_protocol::HeaderError::ALL.len();

const _: () = assert!((Field::LogDropped as usize) < STRIDE);

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

/// Words of one address entry: the tag (a generation in the high half, the
/// connection count in the low half), then the address (16 bytes, IPv4 as
/// IPv4-mapped IPv6) as two words. 24 bytes.
const ENTRY_WORDS: usize = 3;

/// Entries per group of the `touched` bitmap: 24 bytes each, 4 KiB.
const GROUP: usize = 4096 / (ENTRY_WORDS * 8);

/// Words of a slot's `touched` bitmap (both tables).
fn touched_words(table_len: usize) -> usize {
    (2 * table_len).div_ceil(GROUP).div_ceil(64)
}

/// Smallest address table: room for a reload to raise a small capacity
/// (tables are sized once, when the master maps the scoreboard).
#[cfg(not(loom))]
const MIN_TABLE: usize = 1024;
/// Under the model checker, a few entries: every word is an object loom
/// tracks, and clearing a slot touches them all.
#[cfg(loom)]
const MIN_TABLE: usize = 4;

/// Which of a slot's two address tables, by who writes its addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    /// Clients of plain listeners: the master inserts (at dispatch).
    Direct = 0,
    /// Clients PROXY headers name: the slot's worker inserts (at admission).
    Proxied = 1,
}

/// A charge held for one connection: the entry of its worker's address
/// table that counts it. The connection's owner gives it back with
/// [`Scoreboard::discharge`] when the connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge(pub u32);

impl Charge {
    /// Charged nothing (a peer without an address): discharging it does
    /// nothing (no slot has that many entries).
    pub const NONE: Charge = Charge(u32::MAX - 1);
}

/// What [`Scoreboard::admit_proxied`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Charged, and under the limit: discharge it when the connection ends.
    Admitted(Charge),
    /// Over `max_connections_per_ip` (nothing left charged).
    OverLimit,
    /// The worker's table has no free entry (see [`Scoreboard::new`]).
    TableFull,
}

/// The shared mapping. Cheap to copy: `'static` slices and a few numbers.
#[derive(Clone, Copy)]
pub struct Scoreboard {
    words: &'static [AtomicU64],
    /// Per slot, two open-addressing tables of `table_len` entries
    /// (`Table::Direct`, then `Table::Proxied`): client address ->
    /// connections the slot's worker holds from it. Counted by exact
    /// address (nginx's limit_conn keys on the binary address).
    ///
    /// The per-address total is the sum over *occupied* slots (the header's
    /// bitmap, one bit per slot the master has handed to a live worker), not
    /// a row of its own: a charge or discharge is then one atomic on the
    /// entry's tag, so a worker killed at any instant leaves nothing
    /// half-counted, and a dead worker's connections stop counting the
    /// moment the master vacates its slot. Summing costs one probe per live
    /// worker and table.
    ///
    /// Who writes what (the races, as Apache's fdqueue explains its own):
    /// - an entry's *address* has one writer per table: the master for
    ///   `Direct` (its loop is one thread), the slot's worker for `Proxied`
    ///   (its handler threads serialize on a lock of their own, see
    ///   `worker::proxied`), and the master again when it clears a slot no
    ///   process runs in. It re-keys an entry only while its count is 0:
    ///   then no connection holds the entry, so nobody else writes its tag;
    /// - the *count* goes up by the address writer only (a charge), and
    ///   down by whoever holds the connection (a discharge: the worker), one
    ///   RMW each, which keeps the generation bits;
    /// - a *reader* (any process, summing an address) must not be fooled
    ///   by an entry re-keyed under it: re-keying is a seqlock write (the
    ///   generation made odd, fence, address, then the tag with the next
    ///   even generation, Release), and the reader takes the count from a
    ///   tag read with Acquire, reads the address, and trusts the pair only
    ///   if the generation is unchanged after an Acquire fence; a count of 0
    ///   is 0 whatever the address. A 32-bit generation could only be
    ///   fooled by 2^31 re-keys of one entry inside one read.
    ///
    /// Probing is linear from a keyed hash (SipHash, a random key per
    /// master start), so nobody can compute addresses that crowd one
    /// another's entries; correctness does not depend on it (addresses are
    /// compared whole). Each table's writer records the farthest it ever
    /// placed an address from its home (`reach`, only growing until the
    /// slot is cleared), which bounds every lookup.
    addrs: &'static [AtomicU64],
    /// Per slot and table: the reach (see `addrs`).
    reach: &'static [AtomicU64],
    /// Per slot: a bitmap of the groups of [`GROUP`] entries (about a page)
    /// an address was ever written in since the slot was last cleared, so
    /// clearing reads only those and never faults in the rest of a table
    /// (a worker with few clients keeps a few pages, not megabytes).
    touched: &'static [AtomicU64],
    /// Entries per table, a power of two.
    table_len: usize,
    /// The SipHash key of the probe start.
    hash_key: (u64, u64),
    slots: usize,
}

impl Scoreboard {
    /// Maps room for `slots` workers of up to `capacity` connections each.
    /// Call before forking.
    ///
    /// Each address table has at least twice `capacity` entries, so it is
    /// never full: a worker holds at most its capacity (and a handful
    /// finishing), each holding one entry at most. A reload that raises a
    /// worker's capacity past [`Scoreboard::max_capacity`] is held to it
    /// (the supervisor says so); a table that is full anyway refuses the
    /// connection, counted as rejected.
    pub fn new(slots: usize, capacity: usize) -> io::Result<Scoreboard> {
        if slots > MAX_SLOTS {
            return Err(io::Error::other(format!("at most {MAX_SLOTS} scoreboard slots")));
        }
        let table_len = capacity.saturating_mul(2).max(MIN_TABLE).checked_next_power_of_two();
        let table_len = table_len.filter(|&n| n <= 1 << 30).ok_or_else(|| io::Error::other("capacity too large"))?;
        let words = shared_zeroed::<AtomicU64>((slots + 1) * STRIDE)?;
        let addrs = shared_zeroed::<AtomicU64>(slots * 2 * table_len * ENTRY_WORDS)?;
        let reach = shared_zeroed::<AtomicU64>(slots * 2)?;
        let touched = shared_zeroed::<AtomicU64>(slots * touched_words(table_len))?;
        Ok(Scoreboard { words, addrs, reach, touched, table_len, hash_key: hash_key(), slots })
    }

    /// The most connections a worker may hold for its tables never to fill.
    pub fn max_capacity(&self) -> usize {
        self.table_len / 2
    }

    /// Bytes of address tables per worker slot.
    pub fn table_bytes_per_slot(&self) -> usize {
        2 * self.table_len * ENTRY_WORDS * 8
    }

    /// The words of entry `index` (0..2 x table_len) of `slot`.
    fn entry(&self, slot: usize, index: usize) -> &[AtomicU64] {
        let at = (slot * 2 * self.table_len + index) * ENTRY_WORDS;
        &self.addrs[at..at + ENTRY_WORDS]
    }

    /// The address writer, before it writes entry `index`'s address.
    fn touch(&self, slot: usize, index: usize) {
        let group = index / GROUP;
        let word = &self.touched[slot * touched_words(self.table_len) + group / 64];
        if word.load(Ordering::Relaxed) & (1 << (group % 64)) == 0 {
            word.fetch_or(1 << (group % 64), Ordering::Relaxed);
        }
    }

    fn reach_of(&self, slot: usize, table: Table) -> &AtomicU64 {
        &self.reach[slot * 2 + table as usize]
    }

    /// The table's first entry of a probe sequence for `key`.
    fn home(&self, key: u128) -> usize {
        #[cfg(loom)]
        {
            // Every address collides under the model checker: the worst
            // case, and every step of a probe is taken.
            let _ = (key, self.hash_key);
            0
        }
        #[cfg(not(loom))]
        {
            use std::hash::Hasher;
            #[allow(deprecated)] // std's SipHash; keyed, which is the point
            let mut h = std::hash::SipHasher::new_with_keys(self.hash_key.0, self.hash_key.1);
            h.write_u128(key);
            h.finish() as usize & (self.table_len - 1)
        }
    }

    /// The count entry `index` of `slot` holds for `key` (0 for another
    /// address): the seqlock read described at `addrs`.
    fn count_for(&self, slot: usize, index: usize, key: u128) -> u64 {
        let e = self.entry(slot, index);
        loop {
            let tag = e[0].load(Ordering::Acquire);
            if tag as u32 == 0 {
                return 0;
            }
            let addr = (u128::from(e[1].load(Ordering::Relaxed)) << 64) | u128::from(e[2].load(Ordering::Relaxed));
            fence(Ordering::Acquire);
            if e[0].load(Ordering::Relaxed) >> 32 == tag >> 32 {
                return if addr == key { u64::from(tag as u32) } else { 0 };
            }
            // Re-keyed while we read: read it again.
        }
    }

    /// The address writer of `table`: charges `ip` to `slot`, re-using the
    /// entry that has its address, else re-keying the first free entry of
    /// its probe sequence. None when every entry is in use.
    fn charge(&self, slot: usize, table: Table, ip: IpAddr) -> Option<Charge> {
        let key = addr_key(ip);
        let base = table as usize * self.table_len;
        let mask = self.table_len - 1;
        let home = self.home(key);
        let reach = self.reach_of(slot, table);
        // Our own writes (or the master's clear, before this worker ran).
        let far = reach.load(Ordering::Acquire) as usize;
        for d in 0..=far {
            let i = base + ((home + d) & mask);
            let e = self.entry(slot, i);
            let addr = (u128::from(e[1].load(Ordering::Relaxed)) << 64) | u128::from(e[2].load(Ordering::Relaxed));
            if addr == key {
                e[0].fetch_add(1, Ordering::Release);
                return Some(Charge(i as u32));
            }
        }
        for d in 0..self.table_len {
            let i = base + ((home + d) & mask);
            let e = self.entry(slot, i);
            let tag = e[0].load(Ordering::Acquire);
            if tag as u32 != 0 {
                continue;
            }
            if d > far {
                reach.store(d as u64, Ordering::Release);
            }
            self.touch(slot, i);
            rekey(e, tag, key, 1);
            return Some(Charge(i as u32));
        }
        None
    }

    /// Master, sending a connection from `ip` to the worker of `slot`.
    pub fn charge_direct(&self, slot: usize, ip: IpAddr) -> Option<Charge> {
        self.charge(slot, Table::Direct, ip)
    }

    /// The worker of `slot`, for the client a PROXY header named: charges
    /// its own table, then sums every worker's (a SeqCst fence in between,
    /// as on every admitting worker, so of two workers admitting the same
    /// client at once each sees the other's charge: both may refuse, never
    /// both admit past `max`). The caller serializes the worker's threads.
    pub fn admit_proxied(&self, slot: usize, ip: IpAddr, max: u32) -> Admission {
        let Some(charge) = self.charge(slot, Table::Proxied, ip) else { return Admission::TableFull };
        fence(Ordering::SeqCst);
        if max > 0 && self.ip_total(ip) > u64::from(max) {
            self.discharge(slot, charge);
            return Admission::OverLimit;
        }
        Admission::Admitted(charge)
    }

    /// The connection's owner: it ended (never below zero, and the
    /// generation bits are kept).
    pub fn discharge(&self, slot: usize, charge: Charge) {
        if charge.0 as usize >= 2 * self.table_len || slot >= self.slots {
            return;
        }
        let tag = &self.entry(slot, charge.0 as usize)[0];
        let _ =
            tag.fetch_update(Ordering::Release, Ordering::Relaxed, |t| if t as u32 == 0 { None } else { Some(t - 1) });
    }

    /// Connections worker `slot` holds from `ip` (both tables).
    pub fn ip_count(&self, slot: usize, ip: IpAddr) -> u64 {
        let key = addr_key(ip);
        let home = self.home(key);
        let mut n = 0;
        for table in [Table::Direct, Table::Proxied] {
            let base = table as usize * self.table_len;
            let far = self.reach_of(slot, table).load(Ordering::Acquire) as usize;
            for d in 0..=far {
                n += self.count_for(slot, base + ((home + d) & (self.table_len - 1)), key);
            }
        }
        n
    }

    /// Connections all live workers hold from `ip`: what
    /// `max_connections_per_ip` is checked against, by the master for plain
    /// listeners and by a worker for clients only it knows (PROXY).
    pub fn ip_total(&self, ip: IpAddr) -> u64 {
        let mut total = 0;
        for (w, word) in self.words[OCCUPIED..OCCUPIED + self.slots.div_ceil(64)].iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                total += self.ip_count(w * 64 + bits.trailing_zeros() as usize, ip);
                bits &= bits - 1;
            }
        }
        total
    }

    /// Master, before forking a worker into `slot`: empties its address
    /// tables and makes them count.
    pub fn occupy(&self, slot: usize) {
        self.clear_ips(slot);
        self.words[OCCUPIED + slot / 64].fetch_or(1 << (slot % 64), Ordering::Release);
    }

    /// Master, once the worker of `slot` is reaped: its connections died
    /// with it, so its address counts stop counting (whatever it was doing
    /// when it died) and are emptied.
    pub fn vacate(&self, slot: usize) {
        self.words[OCCUPIED + slot / 64].fetch_and(!(1 << (slot % 64)), Ordering::Release);
        self.clear_ips(slot);
    }

    /// Re-keys every used entry of `slot` to address 0, count 0 (no process
    /// writes the slot's tables meanwhile: its worker is reaped or not yet
    /// forked, and waitpid/fork order its writes before these; readers may
    /// read, hence the seqlock). Only groups ever written are read.
    fn clear_ips(&self, slot: usize) {
        let words = &self.touched[slot * touched_words(self.table_len)..(slot + 1) * touched_words(self.table_len)];
        for (w, word) in words.iter().enumerate() {
            let mut bits = word.load(Ordering::Relaxed);
            while bits != 0 {
                let group = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                for i in group * GROUP..((group + 1) * GROUP).min(2 * self.table_len) {
                    let e = self.entry(slot, i);
                    let tag = e[0].load(Ordering::Relaxed);
                    if tag as u32 != 0 || e[1].load(Ordering::Relaxed) != 0 || e[2].load(Ordering::Relaxed) != 0 {
                        rekey(e, tag, 0, 0);
                    }
                }
            }
            word.store(0, Ordering::Relaxed);
        }
        for table in [Table::Direct, Table::Proxied] {
            self.reach_of(slot, table).store(0, Ordering::Release);
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

    /// The accept gate's word ([`crate::gate::AcceptGate`], the only
    /// caller, explains the protocol): store, then a SeqCst fence, pairing
    /// with [`Slot::set_finished`].
    pub(crate) fn set_accept_paused(&self, paused: bool) {
        self.words[ACCEPT_PAUSED].store(paused as u64, Ordering::SeqCst);
        // The fence, not the SeqCst store alone, is what loom can check
        // (it models SeqCst accesses as AcqRel): store, fence, then load,
        // on both sides (tests/loom.rs).
        fence(Ordering::SeqCst);
    }

    pub(crate) fn accept_paused(&self) -> bool {
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

    /// Publishes a new finished count: store, then a SeqCst fence (the
    /// worker's half of the accept gate, [`crate::gate`]).
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
            open_fds: self.get(Field::OpenFds),
            log_dropped: self.get(Field::LogDropped),
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
    /// By kind, in the order of `proxy_protocol::HeaderError::ALL`.
    pub proxy_errors: [u64; PROXY_KINDS],
    /// Connection log lines the worker dropped.
    pub log_dropped: u64,
    // Gauges (not summed into retired totals).
    pub threads: u64,
    pub busy: u64,
    pub queued: u64,
    pub open_fds: u64,
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
        self.log_dropped += other.log_dropped;
    }

    pub fn errors(&self) -> u64 {
        self.err_reset + self.err_timeout + self.err_other
    }
}

/// A client address as the tables key it: IPv4 as its IPv4-mapped IPv6
/// form, so a dual-stack listener's `::ffff:192.0.2.7` and a v4
/// listener's `192.0.2.7` are one client.
fn addr_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Gives entry `e` (tag `tag`, count 0: nobody else writes it) the
/// address `key` and the count `count`: a seqlock write (see
/// `Scoreboard::addrs`).
fn rekey(e: &[AtomicU64], tag: u64, key: u128, count: u32) {
    let generation = (tag >> 32) | 1; // odd: being re-keyed
    e[0].store(generation << 32, Ordering::Relaxed);
    fence(Ordering::Release);
    e[1].store((key >> 64) as u64, Ordering::Relaxed);
    e[2].store(key as u64, Ordering::Relaxed);
    let next = generation.wrapping_add(1) & 0xffff_ffff;
    e[0].store((next << 32) | u64::from(count), Ordering::Release);
}

/// A random SipHash key per scoreboard (so per master start): std's
/// RandomState draws it from the OS (getrandom).
#[cfg(not(loom))]
fn hash_key() -> (u64, u64) {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new();
    (random.hash_one(0x6563_686f_u64), random.hash_one(0x006b_6579_u64))
}

/// Under loom the model must be deterministic (and `home` ignores it).
#[cfg(loom)]
fn hash_key() -> (u64, u64) {
    (0, 0)
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
        let sb = Scoreboard::new(3, 1).unwrap();
        assert_eq!(sb.slots(), 3);
        assert!(!sb.accept_paused());
        sb.set_accept_paused(true);
        assert!(sb.accept_paused());
        sb.set_accept_paused(false);
        assert!(!sb.accept_paused());
        assert!(Scoreboard::new(MAX_SLOTS + 1, 1).is_err());
        // Slot 0 lives after the header block: its pid word is not the
        // accept-paused flag, its heartbeat not the occupied bitmap.
        sb.slot(0).set(Field::Pid, 42);
        sb.slot(0).set(Field::Heartbeat, 1);
        assert!(!sb.accept_paused(), "slot 0 overlaps the header");
        assert_eq!(sb.words[OCCUPIED].load(Ordering::Relaxed), 0, "slot 0 overlaps the occupied bitmap");
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// Addresses count exactly: 127.1.25.8 and 127.0.0.2 shared a bucket
    /// of the old unkeyed FNV-1a, and so did 2001:db8::1 and
    /// 2001:db8::1:1d96; an IPv4-mapped IPv6 address is its IPv4 one.
    #[test]
    fn addresses_count_exactly_and_mapped_v4_is_v4() {
        let sb = Scoreboard::new(2, 4).unwrap();
        sb.occupy(0);
        sb.occupy(1);
        for _ in 0..3 {
            sb.charge_direct(0, ip("127.1.25.8")).unwrap();
        }
        assert_eq!((sb.ip_total(ip("127.1.25.8")), sb.ip_total(ip("127.0.0.2"))), (3, 0));
        sb.charge_direct(1, ip("2001:db8::1")).unwrap();
        assert_eq!((sb.ip_total(ip("2001:db8::1")), sb.ip_total(ip("2001:db8::1:1d96"))), (1, 0));
        let v4 = sb.charge_direct(0, ip("192.0.2.7")).unwrap();
        let mapped = sb.admit_proxied(1, ip("::ffff:192.0.2.7"), 0);
        assert_eq!(sb.ip_total(ip("192.0.2.7")), 2, "v4 and v4-mapped are one client");
        assert_eq!(sb.ip_total(ip("::ffff:192.0.2.7")), 2);
        sb.discharge(0, v4);
        assert!(matches!(mapped, Admission::Admitted(c) if { sb.discharge(1, c); true }));
        assert_eq!(sb.ip_total(ip("192.0.2.7")), 0);
    }

    /// The tables hold twice the capacity, never fewer than MIN_TABLE; a
    /// full table says so instead of counting wrong, and a freed entry is
    /// re-used (re-keyed) for another address.
    #[test]
    fn a_table_holds_twice_the_capacity_and_says_when_full() {
        let sb = Scoreboard::new(1, 1000).unwrap();
        assert_eq!((sb.max_capacity(), sb.table_bytes_per_slot()), (1024, 2 * 2048 * 24));
        assert_eq!(Scoreboard::new(1, 2).unwrap().max_capacity(), MIN_TABLE / 2);
        sb.occupy(0);
        let addr = |i: u32| IpAddr::from(std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i)));
        let charges: Vec<Charge> = (0..2048).map(|i| sb.charge_direct(0, addr(i)).expect("room")).collect();
        assert_eq!(sb.charge_direct(0, addr(5000)), None, "full");
        assert_eq!(sb.charge_direct(0, addr(7)), Some(charges[7]), "a held address is still counted");
        assert_eq!(sb.ip_total(addr(7)), 2);
        assert!(matches!(sb.admit_proxied(0, addr(5000), 0), Admission::Admitted(_)), "the PROXY table is separate");
        sb.discharge(0, charges[100]);
        let reused = sb.charge_direct(0, addr(5000)).expect("a freed entry");
        assert_eq!(reused, charges[100], "re-keyed");
        assert_eq!(
            (sb.ip_total(addr(5000)), sb.ip_total(addr(100))),
            (2, 0),
            "one direct, one proxied; the old address gone"
        );
        sb.vacate(0);
        sb.occupy(0);
        assert!((0..2048).chain([5000]).all(|i| sb.ip_total(addr(i)) == 0), "every touched group cleared");
        assert!((0..2048).all(|i| sb.charge_direct(0, addr(i)).is_some()), "and every entry free again");
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
        let sb = Scoreboard::new(4, 1).unwrap();
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
    fn ip_counts_per_worker_and_address() {
        let sb = Scoreboard::new(2, 4).unwrap();
        let (a, b) = (ip("192.0.2.7"), ip("192.0.2.8"));
        sb.occupy(0);
        sb.occupy(1);
        let c0 = sb.charge_direct(0, a).unwrap();
        assert_eq!(sb.charge_direct(0, a), Some(c0), "one entry per address");
        sb.charge_direct(1, a).unwrap();
        sb.discharge(0, c0);
        assert_eq!((sb.ip_count(0, a), sb.ip_count(1, a)), (1, 1));
        assert_eq!(sb.ip_total(a), 2);
        sb.vacate(0);
        sb.discharge(0, c0); // never below zero
        assert_eq!((sb.ip_count(0, a), sb.ip_count(1, a)), (0, 1));
        assert_eq!(sb.ip_total(a), 1, "the total follows charges, discharges and a vacated slot");
        assert_eq!(sb.ip_total(b), 0);
        sb.discharge(1, Charge(u32::MAX)); // out of range: ignored
        assert_eq!(sb.ip_total(a), 1);
    }

    /// A PROXY client is charged to the admitting worker's own table and
    /// checked against every worker's: at the limit it is refused and
    /// nothing stays charged.
    #[test]
    fn proxied_admission_charges_then_checks_the_total() {
        let sb = Scoreboard::new(2, 4).unwrap();
        sb.occupy(0);
        sb.occupy(1);
        let a = ip("198.51.100.1");
        sb.charge_direct(0, a).unwrap();
        let Admission::Admitted(c) = sb.admit_proxied(1, a, 2) else { panic!("under the limit") };
        assert_eq!(sb.admit_proxied(1, a, 2), Admission::OverLimit);
        assert_eq!((sb.ip_count(1, a), sb.ip_total(a)), (1, 2), "the refused charge was given back");
        sb.discharge(1, c);
        assert!(matches!(sb.admit_proxied(1, a, 2), Admission::Admitted(_)));
        assert!(matches!(sb.admit_proxied(1, a, 0), Admission::Admitted(_)), "0 = no limit");
    }

    #[test]
    fn a_dead_workers_counts_stop_counting_whatever_it_was_doing() {
        // A worker killed mid-charge (or mid-discharge) leaves its own
        // table at whatever it reached; vacating the slot must take the
        // table out of every total, and a new worker in the slot starts
        // from zero.
        let sb = Scoreboard::new(300, 8).unwrap();
        let a = ip("198.51.100.1");
        sb.occupy(3);
        sb.occupy(299);
        for _ in 0..5 {
            sb.charge_direct(299, a).unwrap();
        }
        sb.admit_proxied(299, a, 0);
        sb.charge_direct(3, a).unwrap();
        assert_eq!(sb.ip_total(a), 7);
        sb.vacate(299);
        assert_eq!(sb.ip_total(a), 1, "the dead slot's six are gone");
        sb.charge_direct(299, a); // a straggler write after the reap
        assert_eq!(sb.ip_total(a), 1, "a vacated slot does not count");
        sb.occupy(299);
        assert_eq!((sb.ip_count(299, a), sb.ip_total(a)), (0, 1), "a reused slot starts empty");
    }

    #[test]
    fn slot_is_cache_line_sized() {
        assert_eq!(STRIDE * 8 % 128, 0);
    }
}
