//! When each target is due. A plain struct with no I/O and no clock of its own: the caller passes
//! `now`, so tests drive it with a fake clock.
//!
//! Due times advance by whole intervals from a fixed phase (`next += interval`), never from "when
//! the last probe finished", so a target keeps its period over hours without drift. Each target's
//! first due time is offset by a deterministic jitter in `[0, interval)` derived from its id, which
//! spreads many targets with the same interval across the period.
//!
//! [`Scheduler::update`] swaps the target list in place: a target whose id and interval did not
//! change keeps its next due time (its phase), so pushing a new target set does not make every
//! target fire at once or lose its grid.

use std::time::{Duration, Instant};

/// What the scheduler knows about one target.
#[derive(Debug, Clone)]
struct Slot {
    target: u32,
    interval: Duration,
    next_due: Instant,
    /// Probes still to run, when the run is limited to a number of rounds.
    rounds_left: Option<u64>,
}

/// One probe to start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// Id of the target (as given to [`Scheduler::new`] or [`Scheduler::update`]).
    pub target: u32,
    /// The time it was due (for honest lateness accounting).
    pub due_at: Instant,
    /// Periods passed over because the caller polled too late; each one is a skipped probe.
    pub skipped: u64,
}

#[derive(Debug)]
pub struct Scheduler {
    slots: Vec<Slot>,
}

impl Scheduler {
    /// `targets` gives (stable id, interval) per target; `rounds` limits how many probes each target
    /// gets (None: forever).
    pub fn new(targets: &[(u32, Duration)], start: Instant, rounds: Option<u64>) -> Scheduler {
        let slots = targets
            .iter()
            .map(|&(id, interval)| Slot {
                target: id,
                interval,
                next_due: start + jitter(id, interval),
                rounds_left: rounds,
            })
            .filter(|s| s.rounds_left != Some(0))
            .collect();
        Scheduler { slots }
    }

    /// Replaces the target list at `now`. Targets with the same id and interval as before keep
    /// their due time; new ones (and ones whose interval changed) start at `now` plus their
    /// jitter; missing ones are dropped. Rounds limits do not apply to targets added here.
    pub fn update(&mut self, targets: &[(u32, Duration)], now: Instant) {
        let old = std::mem::take(&mut self.slots);
        self.slots = targets
            .iter()
            .map(|&(id, interval)| {
                old.iter()
                    .find(|s| s.target == id && s.interval == interval)
                    .cloned()
                    .unwrap_or(Slot {
                        target: id,
                        interval,
                        next_due: now + jitter(id, interval),
                        rounds_left: None,
                    })
            })
            .collect();
    }

    /// Number of targets scheduled.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no target is scheduled.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The earliest time any target is due, or None when every target has finished its rounds.
    pub fn next_due(&self) -> Option<Instant> {
        self.slots.iter().map(|s| s.next_due).min()
    }

    /// Every target due at `now`, each once, and advances them to their next period.
    pub fn pop_due(&mut self, now: Instant) -> Vec<Due> {
        let mut due = Vec::new();
        for slot in &mut self.slots {
            if slot.next_due > now {
                continue;
            }
            let late = now.duration_since(slot.next_due);
            // Periods that ended entirely while we were not looking are skipped, not replayed.
            let skipped = (late.as_nanos() / slot.interval.as_nanos()) as u64;
            due.push(Due {
                target: slot.target,
                due_at: slot.next_due,
                skipped,
            });
            slot.next_due += slot.interval * (skipped as u32 + 1);
            if let Some(left) = slot.rounds_left.as_mut() {
                *left -= 1;
            }
        }
        self.slots.retain(|s| s.rounds_left != Some(0));
        due
    }
}

/// A deterministic offset in `[0, interval)`: the same target always lands at the same phase.
fn jitter(id: u32, interval: Duration) -> Duration {
    // SplitMix64 finaliser: spreads consecutive ids across the whole range.
    let mut x = u64::from(id).wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    let nanos = interval.as_nanos().max(1) as u64;
    Duration::from_nanos(x % nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_period_without_drift() {
        let t0 = Instant::now();
        let interval = Duration::from_millis(1000);
        let mut s = Scheduler::new(&[(7, interval)], t0, None);
        let first = s.next_due().unwrap();
        assert!(first >= t0 && first < t0 + interval);
        // Poll a little late every time; due times must stay on the grid.
        let mut now = first;
        for k in 0..10_000u32 {
            now += Duration::from_millis(3);
            let due = s.pop_due(now);
            assert_eq!(due.len(), 1);
            assert_eq!(due[0].due_at, first + interval * k);
            assert_eq!(due[0].skipped, 0);
            now = s.next_due().unwrap();
        }
    }

    #[test]
    fn late_poll_counts_skipped_periods() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(1);
        let mut s = Scheduler::new(&[(1, interval)], t0, None);
        let first = s.next_due().unwrap();
        let due = s.pop_due(first + Duration::from_millis(3500));
        assert_eq!(due[0].skipped, 3);
        assert_eq!(s.next_due().unwrap(), first + interval * 4);
    }

    #[test]
    fn jitter_spreads_targets() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(60);
        let targets: Vec<_> = (0..100).map(|id| (id, interval)).collect();
        let s = Scheduler::new(&targets, t0, None);
        let mut offsets: Vec<_> = s.slots.iter().map(|x| x.next_due - t0).collect();
        offsets.sort();
        offsets.dedup();
        assert_eq!(offsets.len(), 100);
        // Roughly uniform: both halves of the period get a fair share.
        let early = offsets.iter().filter(|d| **d < interval / 2).count();
        assert!((30..=70).contains(&early), "{early}");
        // Deterministic.
        let again = Scheduler::new(&targets, t0, None);
        assert_eq!(again.next_due(), s.next_due());
    }

    #[test]
    fn rounds_limit_the_run() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(
            &[
                (1, Duration::from_millis(10)),
                (2, Duration::from_millis(25)),
            ],
            t0,
            Some(3),
        );
        let mut count = [0; 2];
        while let Some(at) = s.next_due() {
            for d in s.pop_due(at) {
                count[d.target as usize - 1] += 1;
            }
        }
        assert_eq!(count, [3, 3]);
    }

    #[test]
    fn update_keeps_the_phase_of_unchanged_targets() {
        let t0 = Instant::now();
        let sec = Duration::from_secs(1);
        let mut s = Scheduler::new(&[(1, sec * 10), (2, sec * 10), (3, sec * 10)], t0, None);
        let due_of =
            |s: &Scheduler, id: u32| s.slots.iter().find(|x| x.target == id).map(|x| x.next_due);
        // Run a while so the due times are past their first period.
        let mut now = t0;
        while now < t0 + sec * 25 {
            now = s.next_due().unwrap();
            s.pop_due(now);
        }
        let before_1 = due_of(&s, 1).unwrap();
        // 2 removed, 3 gets a new interval, 4 is new.
        s.update(&[(1, sec * 10), (3, sec * 5), (4, sec * 10)], now);
        assert_eq!(s.len(), 3);
        assert_eq!(due_of(&s, 1), Some(before_1));
        assert_eq!(due_of(&s, 2), None);
        assert_eq!(due_of(&s, 3), Some(now + jitter(3, sec * 5)));
        assert_eq!(due_of(&s, 4), Some(now + jitter(4, sec * 10)));
        // Target 1 stays on its grid afterwards.
        let mut seen = 0;
        while seen < 3 {
            let at = s.next_due().unwrap();
            for d in s.pop_due(at) {
                if d.target == 1 {
                    assert_eq!(d.due_at, before_1 + sec * 10 * seen);
                    seen += 1;
                }
            }
        }
    }

    #[test]
    fn fast_target_is_not_held_back_by_slow_ones() {
        let t0 = Instant::now();
        let mut targets: Vec<_> = (0..1000).map(|id| (id, Duration::from_secs(300))).collect();
        targets.push((5000, Duration::from_millis(100)));
        let mut s = Scheduler::new(&targets, t0, None);
        let mut fast = 0;
        let mut now = t0;
        while now < t0 + Duration::from_secs(10) {
            now = s.next_due().unwrap();
            fast += s.pop_due(now).iter().filter(|d| d.target == 5000).count();
        }
        assert!((99..=101).contains(&fast), "{fast}");
    }
}
