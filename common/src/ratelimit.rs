//! Rate-limited logging for events whose rate the input decides (rejected frames, poison
//! messages, a full buffer): at most one line per interval, and every suppressed line is
//! accounted for: by the next line that is let through (its `suppressed` field), or, when the
//! burst is over, by one summary line an interval after the last line. Metrics count every
//! event; the log only has to show that it is happening, why, and how often.
//!
//! One helper for both binaries (the ingester re-exports it).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// At most one line per `interval`; the calls in between are counted and reported.
#[derive(Debug, Clone)]
pub struct RateLimit {
    /// What is being suppressed, for the summary line (e.g. `"poison message"`).
    what: &'static str,
    interval: Duration,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// When the last line (or summary) was logged.
    last: Option<Instant>,
    /// Suppressed since then.
    suppressed: u64,
    /// A summary task is waiting for the end of the interval.
    summary_pending: bool,
}

impl State {
    fn allow_at(&mut self, now: Instant, interval: Duration) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// The count for a summary line, once the interval since the last line is over.
    fn summary_at(&mut self, now: Instant, interval: Duration) -> Option<u64> {
        let over = self.last.is_none_or(|t| now.duration_since(t) >= interval);
        if !over || self.suppressed == 0 {
            return None;
        }
        // The summary is a line too: the next one waits a full interval after it.
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl RateLimit {
    pub fn new(what: &'static str, interval: Duration) -> RateLimit {
        RateLimit {
            what,
            interval,
            state: Arc::default(),
        }
    }

    /// `Some(lines suppressed since the last line)` if a line may be logged now. When it says
    /// no inside a tokio runtime, a summary of what it suppresses is logged at the end of the
    /// interval unless a line let through first carries the count.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut state = self.lock();
        let verdict = state.allow_at(now, self.interval);
        if verdict.is_none() && !state.summary_pending {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                state.summary_pending = true;
                let due = state.last.unwrap_or(now) + self.interval;
                let limit = self.clone();
                runtime.spawn(async move {
                    tokio::time::sleep_until(due.into()).await;
                    let count = {
                        let mut state = limit.lock();
                        state.summary_pending = false;
                        state.summary_at(Instant::now(), limit.interval)
                    };
                    if let Some(suppressed) = count {
                        tracing::warn!(
                            what = limit.what,
                            suppressed,
                            interval = ?limit.interval,
                            "rate-limited log: lines suppressed"
                        );
                    }
                });
            }
        }
        verdict
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state that let its first line through at `t0`, with the interval `i` (1 s).
    fn after_a_first_line() -> (State, Instant, Duration) {
        let mut s = State::default();
        let (t0, i) = (Instant::now(), Duration::from_secs(1));
        assert_eq!(s.allow_at(t0, i), Some(0));
        (s, t0, i)
    }

    #[test]
    fn one_line_per_interval_with_the_count_suppressed() {
        let (mut s, t0, i) = after_a_first_line();
        for k in 1..=5 {
            assert_eq!(s.allow_at(t0 + Duration::from_millis(100 * k), i), None);
        }
        assert_eq!(s.allow_at(t0 + Duration::from_secs(1), i), Some(5));
        assert_eq!(s.allow_at(t0 + Duration::from_millis(1500), i), None);
        assert_eq!(s.allow_at(t0 + Duration::from_secs(3), i), Some(1));
    }

    #[test]
    fn a_summary_only_after_the_interval_and_only_of_what_is_left() {
        let (mut s, t0, i) = after_a_first_line();
        assert_eq!(s.allow_at(t0 + Duration::from_millis(10), i), None);
        assert_eq!(s.summary_at(t0 + Duration::from_millis(500), i), None);
        assert_eq!(s.summary_at(t0 + i, i), Some(1));
        // Counted once: nothing left for the next line or summary.
        assert_eq!(s.summary_at(t0 + 3 * i, i), None);
        assert_eq!(s.allow_at(t0 + 3 * i, i), Some(0));
    }

    /// Issue #14 item 13: a burst that ends is still accounted for. 100 events in one interval
    /// log one line; the other 99 are reported by the summary at the interval's end (before, they
    /// waited for a next event that may never come).
    #[tokio::test]
    async fn the_end_of_a_burst_is_reported() {
        #[derive(Clone, Default)]
        struct Capture(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        // This (current-thread) runtime runs the summary task on this thread: it logs here.
        let _guard = tracing::subscriber::set_default(subscriber);
        let limit = RateLimit::new("test event", Duration::from_millis(100));
        let allowed: Vec<u64> = (0..100).filter_map(|_| limit.allow()).collect();
        assert_eq!(allowed, [0]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            let text = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
            if text.contains("lines suppressed") || Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            text.contains("what=\"test event\"") && text.contains("suppressed=99"),
            "{text}"
        );
        // The summary counted as a line: the next event within the interval is suppressed.
        assert_eq!(limit.allow(), None);
    }
}
