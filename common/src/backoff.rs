//! Exponential backoff between retries of a failing service: one type for every retry loop of
//! both binaries, so that each loop says only its first pause and its cap.

use std::time::Duration;

/// Pauses that double from `first` up to `max`; [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The pause to take now; the one after it is twice as long, at most `max`.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next.min(self.max);
        self.next = self.next.saturating_mul(2).min(self.max);
        pause
    }

    /// [`Backoff::next_pause`] with "equal jitter": half the pause plus a random part of the
    /// other half (Marc Brooker, "Exponential Backoff And Jitter", AWS Architecture Blog, 2015),
    /// so that a fleet (or a set of bridges) does not reconnect in lockstep after a broker
    /// restart. In `[pause / 2, pause)`.
    pub fn next_jittered_pause(&mut self, rng: &mut fastrand::Rng) -> Duration {
        let half = self.next_pause() / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_nanos(rng.u64(..nanos))
    }

    /// What [`Backoff::next_pause`] would return, without moving on (for log lines).
    pub fn peek(&self) -> Duration {
        self.next.min(self.max)
    }

    /// Back to `first`, after the service answered.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        let pauses: Vec<Duration> = (0..5).map(|_| b.next_pause()).collect();
        assert_eq!(pauses, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        assert_eq!(b.peek(), ms(500));
        b.reset();
        assert_eq!(b.next_pause(), ms(100));
    }

    #[test]
    fn jitter_stays_within_half_and_full_pause() {
        let mut rng = fastrand::Rng::with_seed(12345);
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(2));
        let pauses: Vec<Duration> = (0..1000).map(|_| b.next_jittered_pause(&mut rng)).collect();
        assert!(pauses
            .iter()
            .all(|d| *d >= Duration::from_secs(1) && *d < Duration::from_secs(2)));
        // Spread, not one value.
        assert!(
            *pauses.iter().max().unwrap() - *pauses.iter().min().unwrap()
                > Duration::from_millis(500)
        );
    }

    #[test]
    fn a_first_pause_above_the_cap_is_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(10));
        assert_eq!(b.next_pause(), Duration::from_secs(10));
    }
}
