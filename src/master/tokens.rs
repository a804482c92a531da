//! Every poll token the master hands out, in one place: which event source
//! each one names, and how a token read back from an event decodes to it.
//!
//! A token is a `usize`: the four single sources have one value each; the
//! sources of which there are many (worker channels, scrape connections,
//! listeners) take a range each, wide enough that their ids (worker slots
//! below `MAX_WORKERS` x 2, scrape ids wrapped below 2^20, listener ids
//! counted up from 0) cannot reach the next one. [`Source::of`] is the one
//! decoder, an exhaustive match over the ranges, so the loop in `mod.rs`
//! matches on a `Source` and never on numbers.

use mio::Token;

/// What an event's token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The signal-hook pipe.
    Signals,
    /// The metrics endpoint's listening socket.
    MetricsListener,
    /// The upgrade channel to a new master this one started (USR2).
    Successor,
    /// The upgrade channel from the old master that started this one
    /// (both can be open at once: a master may be upgraded again while its
    /// predecessor still drains).
    Predecessor,
    /// The channel to the worker in this slot.
    Worker(usize),
    /// A scrape connection of the metrics endpoint, by its id.
    Scrape(usize),
    /// A listening socket, by its id (`listeners::Listener`).
    Listener(usize),
}

const SIGNALS: usize = 0;
const METRICS_LISTENER: usize = 1;
const SUCCESSOR: usize = 2;
const PREDECESSOR: usize = 3;
const WORKER_BASE: usize = 1 << 16;
/// Scrape ids wrap below `SCRAPE_IDS` (http.rs), so they stay in range.
pub const SCRAPE_IDS: usize = 1 << 20;
const SCRAPE_BASE: usize = 1 << 20;
const LISTENER_BASE: usize = 1 << 24;

impl Source {
    pub fn token(self) -> Token {
        Token(match self {
            Source::Signals => SIGNALS,
            Source::MetricsListener => METRICS_LISTENER,
            Source::Successor => SUCCESSOR,
            Source::Predecessor => PREDECESSOR,
            Source::Worker(slot) => WORKER_BASE + slot,
            Source::Scrape(id) => SCRAPE_BASE + id,
            Source::Listener(id) => LISTENER_BASE + id,
        })
    }

    /// The source `token` names; `None` for a number no source uses.
    pub fn of(token: Token) -> Option<Source> {
        Some(match token.0 {
            SIGNALS => Source::Signals,
            METRICS_LISTENER => Source::MetricsListener,
            SUCCESSOR => Source::Successor,
            PREDECESSOR => Source::Predecessor,
            4..WORKER_BASE => return None,
            t @ WORKER_BASE..SCRAPE_BASE => Source::Worker(t - WORKER_BASE),
            t @ SCRAPE_BASE..LISTENER_BASE => Source::Scrape(t - SCRAPE_BASE),
            t @ LISTENER_BASE.. => Source::Listener(t - LISTENER_BASE),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every source decodes back to itself, at both ends of its range.
    #[test]
    fn every_token_decodes_to_the_source_that_made_it() {
        let max_slot = crate::config::MAX_WORKERS * 2;
        for s in [
            Source::Signals,
            Source::MetricsListener,
            Source::Successor,
            Source::Predecessor,
            Source::Worker(0),
            Source::Worker(max_slot),
            Source::Scrape(0),
            Source::Scrape(SCRAPE_IDS - 1),
            Source::Listener(0),
            Source::Listener(1 << 30),
        ] {
            assert_eq!(Source::of(s.token()), Some(s), "{s:?}");
        }
        assert!(max_slot < SCRAPE_BASE - WORKER_BASE, "worker slots stay in their range");
        assert_eq!(Source::of(Token(4)), None);
    }
}
