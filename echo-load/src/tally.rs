//! What a run counts: where every message went, and the latency, send
//! lateness and unanswered-age histograms, per server address.

use hdrhistogram::Histogram;

/// Counters of one thread (then of the run).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Measured messages issued: requests = responses + timeouts + lost +
    /// unanswered.
    pub requests: u64,
    /// Echoes received whole and intact.
    pub responses: u64,
    /// Messages not echoed within `timeout` (each one).
    pub timeouts: u64,
    /// Messages on the wire when their connection was reset or closed, or
    /// whose echo was wrong.
    pub lost: u64,
    /// Messages still waiting for their echo when the run was over.
    pub unanswered: u64,
    /// Open loop: messages due in the measured window that the client never
    /// got to issue.
    pub unsent: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Connections established.
    pub connects: u64,
    pub connect_errors: u64,
    /// Reset, broken pipe, or closed by the server with messages in flight.
    pub resets: u64,
    pub other_errors: u64,
    /// Echoes that differed from what was sent, and bytes nobody sent: each
    /// is one mismatch, and its connection is reset.
    pub mismatches: u64,
}

impl Counts {
    /// Everything that went wrong but a mismatch: failed connects, resets,
    /// timeouts, unanswered messages and other errors. (Lost messages are
    /// the consequence of a reset or mismatch already counted.)
    pub fn errors(&self) -> u64 {
        self.connect_errors + self.resets + self.timeouts + self.unanswered + self.other_errors
    }

    /// Messages given an outcome so far (the progress of a `--count` run).
    pub fn settled(&self) -> u64 {
        self.responses + self.timeouts + self.lost
    }

    pub fn add(&mut self, o: &Counts) {
        self.requests += o.requests;
        self.responses += o.responses;
        self.timeouts += o.timeouts;
        self.lost += o.lost;
        self.unanswered += o.unanswered;
        self.unsent += o.unsent;
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
        self.connects += o.connects;
        self.connect_errors += o.connect_errors;
        self.resets += o.resets;
        self.other_errors += o.other_errors;
        self.mismatches += o.mismatches;
    }
}

/// What was counted for one server address (or for the whole run).
pub struct Tally {
    pub counts: Counts,
    /// Latency in microseconds, from when each message was issued (open
    /// loop: due) to its echo; timeouts count their age, at least `timeout`.
    pub latency: Histogram<u64>,
    /// Open loop: how late the client issued each message (µs). Large
    /// values mean the client, not the server, set the pace.
    pub lateness: Histogram<u64>,
    /// Ages of the messages left unanswered at the end (µs).
    pub unanswered_age: Histogram<u64>,
}

impl Tally {
    pub fn new() -> Tally {
        Tally { counts: Counts::default(), latency: histogram(), lateness: histogram(), unanswered_age: histogram() }
    }

    pub fn add(&mut self, o: &Tally) {
        self.counts.add(&o.counts);
        let _ = self.latency.add(&o.latency);
        let _ = self.lateness.add(&o.lateness);
        let _ = self.unanswered_age.add(&o.unanswered_age);
    }
}

impl Default for Tally {
    fn default() -> Tally {
        Tally::new()
    }
}

/// A new latency histogram: 1 µs to an hour, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
    h.auto(true);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field a distinct power of two, so a field added to the wrong
    /// one, not added, or multiplied shows in the sum.
    fn distinct(k: u64) -> Counts {
        let f = |i: u32| k << i;
        Counts {
            requests: f(0),
            responses: f(1),
            timeouts: f(2),
            lost: f(3),
            unanswered: f(4),
            unsent: f(5),
            bytes_sent: f(6),
            bytes_received: f(7),
            connects: f(8),
            connect_errors: f(9),
            resets: f(10),
            other_errors: f(11),
            mismatches: f(12),
        }
    }

    /// Threads' counts are merged field by field: a run's totals are the
    /// sum of its threads' (the accounting echo-load's figures rest on).
    #[test]
    fn counts_add_field_by_field() {
        let mut sum = Counts::default();
        sum.add(&distinct(1));
        sum.add(&distinct(2));
        assert_eq!(sum, distinct(3));
        assert_eq!(sum.errors(), 3 * ((1 << 9) + (1 << 10) + (1 << 2) + (1 << 4) + (1 << 11)));
        assert_eq!(sum.settled(), 3 * ((1 << 1) + (1 << 2) + (1 << 3)));
    }

    #[test]
    fn tallies_merge_their_histograms() {
        let mut a = Tally::new();
        let mut b = Tally::new();
        a.latency.record(10).unwrap();
        b.latency.record(7_200_000_000).unwrap(); // beyond the bound: auto-resized
        b.lateness.record(3).unwrap();
        b.unanswered_age.record(5).unwrap();
        b.counts.responses = 2;
        a.add(&b);
        assert_eq!((a.latency.len(), a.latency.min(), a.lateness.len(), a.unanswered_age.len()), (2, 10, 1, 1));
        assert!(a.latency.max() >= 7_190_000_000, "{}", a.latency.max());
        assert_eq!(a.counts.responses, 2);
        // 3 significant digits: 1234 µs stays 1234 µs.
        let mut h = histogram();
        h.record(1234).unwrap();
        assert_eq!(h.value_at_quantile(0.5), 1234);
    }
}
