//! Log-line rate limiting for events a misbehaving network can repeat
//! thousands of times a second (accept errors, rejections, fd exhaustion).

use std::time::{Duration, Instant};

/// Allows one line per interval and counts what it held back.
#[derive(Debug, Clone)]
pub struct RateLimited {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for RateLimited {
    fn default() -> Self {
        RateLimited::every(Duration::from_secs(5))
    }
}

impl RateLimited {
    pub fn every(every: Duration) -> RateLimited {
        RateLimited { every, last: None, suppressed: 0 }
    }

    /// `Some(n)` if a line may be logged now, `n` being how many were held
    /// back since the last one; `None` (and one more held back) otherwise.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Text to append to the logged line.
    pub fn suffix(suppressed: u64) -> String {
        if suppressed == 0 { String::new() } else { format!(" ({suppressed} similar message(s) suppressed)") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_a_count() {
        let mut r = RateLimited::every(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(r.allow(t0 + Duration::from_secs(2)), None);
        assert_eq!(r.allow(t0 + Duration::from_secs(6)), Some(2));
        assert_eq!(RateLimited::suffix(2), " (2 similar message(s) suppressed)");
    }
}
