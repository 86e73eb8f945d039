//! Rate-limited logging for events whose rate the input decides (the ingester's rejected frames
//! and poison messages, the agent's skipped and refused probes): at most one line per interval,
//! and the line carries how many were suppressed. The metrics count every one; the log only has
//! to show that it is happening and why. (Here, not in the ingester, because both binaries use
//! it and the ingester already depends on this crate.)

use std::time::{Duration, Instant};

/// At most one `allow()` per `interval`; the calls in between are counted.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(interval: Duration) -> RateLimit {
        RateLimit {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(lines suppressed since the last one)` if a line may be logged now.
    pub fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// [`RateLimit::allow`] at `now` (for callers and tests with their own clock).
    pub fn allow_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_suppressed() {
        let mut r = RateLimit::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(r.allow_at(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(r.allow_at(t0 + Duration::from_millis(100 * i)), None);
        }
        assert_eq!(r.allow_at(t0 + Duration::from_secs(1)), Some(5));
        assert_eq!(r.allow_at(t0 + Duration::from_millis(1500)), None);
        assert_eq!(r.allow_at(t0 + Duration::from_secs(3)), Some(1));
    }
}
