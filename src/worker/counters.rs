//! A worker's locked counters.
//!
//! Handler threads count into a private [`Tally`] while they echo (no lock,
//! no shared cache line on the data path) and add it into the worker's
//! [`Counters`] under one mutex when a connection ends, and about once a
//! second for long-lived connections. Each flush then mirrors the totals into
//! the worker's scoreboard slot, where the master reads them. The mutex makes
//! the read-add-mirror step atomic across threads, so no update is lost and
//! the slot never shows a total going backwards.

use crate::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::scoreboard::{DURATION_BUCKETS, Field, Slot};
use proxy_protocol::HeaderError;

/// What one handler counted since its last flush.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// How a connection ended: the error counters count resets, timeouts and
/// the rest; the connection log names each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client closed.
    Closed,
    /// The worker closed it: a drain's deadline, or a fast stop. Not an
    /// error (the operator asked for it).
    Cut,
    /// Reset by the peer or broken pipe.
    Reset,
    /// Nothing arrived for `idle_timeout`.
    IdleTimeout,
    /// The echo made no progress for `write_timeout` (or the kernel timed
    /// the connection out).
    WriteTimeout,
    /// Anything else.
    Other,
}

impl Ending {
    /// Its name in the connection log (`reason=`).
    pub fn name(self) -> &'static str {
        match self {
            Ending::Closed => "closed",
            Ending::Cut => "cut",
            Ending::Reset => "reset",
            Ending::IdleTimeout => "idle_timeout",
            Ending::WriteTimeout => "write_timeout",
            Ending::Other => "error",
        }
    }
}

/// Why the worker turned a connection away before echoing anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its PROXY header was bad, late, or from an untrusted source.
    Header(HeaderError),
    /// The client the header named is at `max_connections_per_ip`.
    PerIp,
}

#[derive(Debug, Default)]
struct Totals {
    bytes_in: u64,
    bytes_out: u64,
    finished: u64,
    err_reset: u64,
    err_timeout: u64,
    err_other: u64,
    duration_sum_us: u64,
    duration: [u64; DURATION_BUCKETS.len()],
    proxied: u64,
    rejected: u64,
    proxy_errors: [u64; HeaderError::ALL.len()],
}

/// The worker-wide counters, shared by all its handler threads.
pub struct Counters {
    totals: Mutex<Totals>,
    slot: Slot,
}

impl Counters {
    pub fn new(slot: Slot) -> Counters {
        Counters { totals: Mutex::new(Totals::default()), slot }
    }

    /// Adds a long-lived connection's progress so far.
    pub fn flush(&self, tally: &mut Tally) {
        let mut t = self.lock();
        t.add(tally);
        self.slot.set(Field::BytesIn, t.bytes_in);
        self.slot.set(Field::BytesOut, t.bytes_out);
        *tally = Tally::default();
    }

    /// Records a finished connection: its last bytes, how it ended and how
    /// long it lived. Returns the new finished total.
    pub fn finish(&self, tally: &mut Tally, ending: Ending, lived: Duration) -> u64 {
        let mut t = self.lock();
        t.add(tally);
        *tally = Tally::default();
        t.finished += 1;
        match ending {
            Ending::Closed | Ending::Cut => {}
            Ending::Reset => t.err_reset += 1,
            Ending::IdleTimeout | Ending::WriteTimeout => t.err_timeout += 1,
            Ending::Other => t.err_other += 1,
        }
        t.duration_sum_us += lived.as_micros() as u64;
        let secs = lived.as_secs_f64();
        let bucket = DURATION_BUCKETS.iter().position(|&b| secs <= b).unwrap_or(DURATION_BUCKETS.len() - 1);
        t.duration[bucket] += 1;
        self.mirror(&t);
        t.finished
    }

    /// A PROXY header was accepted.
    pub fn proxied(&self) {
        let mut t = self.lock();
        t.proxied += 1;
        self.slot.set(Field::Proxied, t.proxied);
    }

    /// Records a connection turned away before its echo began. It counts
    /// as finished (the master's load is dispatched - finished) but not in
    /// the duration histogram, which is about echo connections.
    pub fn refuse(&self, why: Refusal) {
        let mut t = self.lock();
        t.finished += 1;
        match why {
            Refusal::PerIp => t.rejected += 1,
            Refusal::Header(kind) => {
                let i = HeaderError::ALL.iter().position(|&k| k == kind).unwrap_or(0);
                t.proxy_errors[i] += 1;
            }
        }
        self.mirror(&t);
    }

    /// Connections dropped unserved (fast stop): counted as finished so the
    /// accounting still balances.
    pub fn abandon(&self, n: u64) {
        let mut t = self.lock();
        t.finished += n;
        t.err_other += n;
        self.mirror(&t);
    }

    fn mirror(&self, t: &Totals) {
        let s = &self.slot;
        s.set(Field::BytesIn, t.bytes_in);
        s.set(Field::BytesOut, t.bytes_out);
        s.set(Field::ErrReset, t.err_reset);
        s.set(Field::ErrTimeout, t.err_timeout);
        s.set(Field::ErrOther, t.err_other);
        s.set(Field::DurationSumUs, t.duration_sum_us);
        for (i, &d) in t.duration.iter().enumerate() {
            s.set_duration_bucket(i, d);
        }
        s.set(Field::Rejected, t.rejected);
        for (i, &e) in t.proxy_errors.iter().enumerate() {
            s.set_proxy_error(i, e);
        }
        // Last, and SeqCst: the master's dispatcher reads it (see Scoreboard).
        s.set_finished(t.finished);
    }

    fn lock(&self) -> MutexGuard<'_, Totals> {
        // A panicking handler cannot leave Totals half-updated in a way that
        // matters (plain integers); keep counting.
        self.totals.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Totals {
    fn add(&mut self, tally: &Tally) {
        self.bytes_in += tally.bytes_in;
        self.bytes_out += tally.bytes_out;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoreboard::Scoreboard;
    use std::sync::Arc;

    #[test]
    fn concurrent_flushes_lose_nothing() {
        let sb = Scoreboard::new(1, 1).unwrap();
        let c = Arc::new(Counters::new(sb.slot(0)));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let mut t = Tally { bytes_in: 3, bytes_out: 3 };
                        c.flush(&mut t);
                        assert_eq!(t.bytes_in, 0);
                        let mut t = Tally { bytes_in: 1, bytes_out: 1 };
                        c.finish(&mut t, Ending::Reset, Duration::from_millis(2));
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let s = sb.slot(0).snapshot();
        assert_eq!((s.bytes_in, s.bytes_out, s.finished, s.err_reset), (32000, 32000, 8000, 8000));
        assert_eq!(s.duration[1], 8000, "2 ms lands in the <= 10 ms bucket");
        assert_eq!(s.duration_sum_us, 8000 * 2000);
    }

    /// Each way a connection can end lands in its own counter, and only
    /// there; every call adds (twice, so a counter that multiplies or
    /// overwrites instead of adding shows).
    #[test]
    fn every_ending_and_refusal_is_counted_where_the_metrics_read_it() {
        let sb = Scoreboard::new(1, 1).unwrap();
        let c = Counters::new(sb.slot(0));
        for round in 1..=2u64 {
            let mut t = Tally { bytes_in: 5, bytes_out: 4 };
            assert_eq!(c.finish(&mut t, Ending::Closed, Duration::from_micros(500)), 10 * (round - 1) + 1);
            assert_eq!((t.bytes_in, t.bytes_out), (0, 0), "the tally is handed over");
            c.finish(&mut Tally::default(), Ending::Reset, Duration::from_millis(5));
            c.finish(&mut Tally::default(), Ending::IdleTimeout, Duration::from_millis(50));
            c.finish(&mut Tally::default(), Ending::Other, Duration::from_secs(2));
            c.finish(&mut Tally::default(), Ending::Closed, Duration::from_secs(7200));
            c.proxied();
            c.refuse(Refusal::PerIp);
            c.refuse(Refusal::Header(HeaderError::Truncated));
            c.abandon(3);
            let s = sb.slot(0).snapshot();
            let r = round;
            assert_eq!((s.bytes_in, s.bytes_out), (5 * r, 4 * r));
            // 5 finished + 2 refused + 3 abandoned per round.
            assert_eq!(s.finished, 10 * r);
            assert_eq!((s.err_reset, s.err_timeout, s.err_other), (r, r, 4 * r), "abandoned count as other");
            assert_eq!((s.proxied, s.rejected), (r, r));
            let kinds: Vec<u64> = s.proxy_errors.to_vec();
            assert_eq!(kinds, [0, 0, 0, r, 0, 0], "Truncated is the fourth kind");
            // Buckets <= 1 ms, 10 ms, 0.1 s, 1 s, 10 s, 60 s, 600 s, 3600 s, +Inf;
            // refused and abandoned connections are not echo durations.
            assert_eq!(s.duration, [r, r, r, 0, r, 0, 0, 0, r]);
            assert_eq!(s.duration_sum_us, r * (500 + 5_000 + 50_000 + 2_000_000 + 7_200_000_000));
        }
        // A flush moves bytes only.
        let mut t = Tally { bytes_in: 1, bytes_out: 2 };
        c.flush(&mut t);
        let s = sb.slot(0).snapshot();
        assert_eq!((s.bytes_in, s.bytes_out, s.finished), (11, 10, 20));
        assert_eq!((t.bytes_in, t.bytes_out), (0, 0));
    }
}
