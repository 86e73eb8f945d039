//! When each target is due, and whether its probe may start. A plain struct with no I/O and no
//! clock of its own: the caller passes `now` and reports finished probes, so tests drive it with
//! a fake clock.
//!
//! # Due times
//! Due times advance by whole intervals from a fixed phase (`next += interval`), never from "when
//! the last probe finished", so a target keeps its period over hours without drift. Each target's
//! first due time is offset by a deterministic jitter in `[0, interval)` derived from its id
//! ([`phase`]), which spreads many targets with the same interval across the period.
//!
//! [`Scheduler::update`] swaps the target list in place: a target whose id and interval did not
//! change keeps its next due time (its phase), so pushing a new target set does not make every
//! target fire at once or lose its grid.
//!
//! # Admission (issue #13 items 3 and 12)
//! A due probe starts only if
//! - its target has no probe in flight (at most one per target: a slow target cannot pile up);
//! - a probe slot is free ([`Limits::slots`], sized from the schedule by [`Limits::for_schedule`]
//!   unless `probes.max_concurrency` says otherwise);
//! - the body-memory budget holds what the probe may keep ([`Entry::memory`], see `budget.rs`).
//!
//! A target whose last probe **timed out** may not take the last [`Limits::reserved_slots`]
//! slots nor the last [`Limits::reserved_memory`] bytes: those are kept for targets that answer,
//! so any number of dead targets cannot starve a live one. (Except when nothing at all is in
//! flight, so a dead target too big for the unreserved part still gets probed and can recover.)
//! A target never probed counts as answering, so a new target gets its first chance; a dead one
//! loses the reserved share at its first timeout. So with a `max_concurrency` far below the
//! schedule's need, a live target can miss probes until every dead target has been probed once
//! (at worst dead targets × timeout ÷ slots after a start or a set change); with the slots
//! sized from the schedule it does not.
//!
//! A probe with no free slot is skipped and counted, not queued: queuing would only make every
//! later probe late. A probe whose memory is not free *waits* for it (memory frees as fast as
//! bodies are read), for at most its own timeout, then is skipped; one that needs more than the
//! whole budget can never run and is [`Action::Refused`] (the agent reports it with outcome
//! `memory_refused`).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// One target as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Stable id of the target.
    pub id: u32,
    pub interval: Duration,
    /// The probe's deadline: how long it can hold its slot.
    pub timeout: Duration,
    /// Bytes of the memory budget the probe reserves while in flight (`budget::need`).
    pub memory: u64,
}

/// How many probes may be in flight, and how much body memory they may hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Most probes in flight at once.
    pub slots: usize,
    /// Of `slots`, how many a target whose last probe timed out may not take.
    pub reserved_slots: usize,
    /// The body-memory budget, bytes.
    pub memory: u64,
    /// Of `memory`, how much a target whose last probe timed out may not take.
    pub reserved_memory: u64,
    /// Probes in flight if every target used its whole timeout: Σ timeout ÷ interval.
    pub steady_need: f64,
}

/// What [`Limits::for_schedule`] may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// `probes.max_concurrency`: a fixed number of slots (None: sized from the schedule).
    pub max_concurrency: Option<usize>,
    /// `probes.memory_budget`, bytes.
    pub memory_budget: u64,
    /// Bytes every probe reserves at least (`budget::PROBE_FLOOR`): the budget bounds the
    /// number of slots too.
    pub probe_floor: u64,
    /// Sockets the process may still open for probes (its descriptor limit, less a reserve).
    pub sockets: usize,
}

/// Share of slots and memory kept for targets that answer: a quarter.
const RESERVED_DIVISOR: u64 = 4;
/// Headroom over the steady-state need: due times are spread by a hash, not evenly, so more
/// probes than the average can be in flight at one moment.
const HEADROOM: f64 = 1.5;
/// Slots added to the steady-state need, for small schedules.
const EXTRA_SLOTS: usize = 8;

impl Limits {
    /// Sizes the slots from the schedule: the steady-state need (Σ timeout ÷ interval, the
    /// average number of probes in flight if every probe ran to its deadline) × 1.5 + 8, at
    /// most one per target, within the sockets and the memory budget (each probe reserves at
    /// least `probe_floor`). `max_concurrency` overrides the computed number.
    pub fn for_schedule(entries: &[Entry], capacity: Capacity) -> Limits {
        let steady_need: f64 = entries
            .iter()
            .map(|e| {
                let interval = e.interval.as_secs_f64().max(1e-9);
                (e.timeout.as_secs_f64() / interval).min(1.0)
            })
            .sum();
        let slots = match capacity.max_concurrency {
            Some(n) => n,
            None => {
                let by_memory = capacity.memory_budget / capacity.probe_floor.max(1);
                ((steady_need * HEADROOM).ceil() as usize + EXTRA_SLOTS)
                    .min(entries.len())
                    .min(capacity.sockets)
                    .min(usize::try_from(by_memory).unwrap_or(usize::MAX))
            }
        }
        .max(1);
        // With a slot for every target, no target can take another's: nothing to reserve.
        let reserved_slots = if slots >= entries.len() {
            0
        } else {
            (slots as u64 / RESERVED_DIVISOR) as usize
        };
        Limits {
            slots,
            reserved_slots,
            memory: capacity.memory_budget,
            reserved_memory: capacity.memory_budget / RESERVED_DIVISOR,
            steady_need,
        }
    }
}

/// Why a due probe did not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Its due time passed while the agent could not run (whole periods missed).
    Late,
    /// The target's previous probe is still running (or waiting for memory).
    InFlight,
    /// Every probe slot it may take was busy.
    NoSlot,
    /// It waited its whole timeout for body memory.
    NoMemory,
}

impl SkipReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            SkipReason::Late => "late",
            SkipReason::InFlight => "previous probe still running",
            SkipReason::NoSlot => "no free probe slot",
            SkipReason::NoMemory => "no body memory free within its timeout",
        }
    }
}

/// The most `missed` results one skip reports for a target: the newest periods. An agent
/// suspended for a day must not fill its outbox with them and push real results out; the log
/// line and `vantage_agent_probes_skipped_total` count every period.
pub const MAX_MISSED_PER_SKIP: u64 = 60;

/// The due times (ms since the epoch) of the periods one skip covers: `count` periods from
/// `first_due_ms` on, `every` apart (a late poll skips whole periods; other skips are one
/// period), the newest [`MAX_MISSED_PER_SKIP`] of them, oldest first.
pub fn missed_due_times(first_due_ms: u64, every: Duration, count: u64) -> Vec<u64> {
    let every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
    let kept = count.min(MAX_MISSED_PER_SKIP);
    (count - kept..count)
        .map(|k| first_due_ms.saturating_add(k.saturating_mul(every_ms)))
        .collect()
}

/// What the caller must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start a probe of `target` now; report it with [`Scheduler::finished`].
    Start { target: u32, due_at: Instant },
    /// `count` probes of `target` did not run.
    Skipped {
        target: u32,
        due_at: Instant,
        reason: SkipReason,
        count: u64,
    },
    /// The probe needs more memory than the whole budget: it can never run. Report it.
    Refused {
        target: u32,
        due_at: Instant,
        need: u64,
    },
}

/// How a target's last probe went, for admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// Never probed (admitted like one that answers, so a new target gets its first chance).
    Unknown,
    Answered,
    TimedOut,
}

/// What the scheduler knows about one target.
#[derive(Debug, Clone)]
struct Slot {
    entry: Entry,
    next_due: Instant,
    /// Probes still to run, when the run is limited to a number of rounds.
    rounds_left: Option<u64>,
    health: Health,
}

/// A due probe waiting for memory.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    target: u32,
    due_at: Instant,
    /// When it gives up (its due time + its timeout).
    until: Instant,
}

#[derive(Debug)]
pub struct Scheduler {
    slots: Vec<Slot>,
    capacity: Capacity,
    limits: Limits,
    /// Probes in flight: target id → bytes reserved. Kept across [`Scheduler::update`]: a
    /// removed target's probe holds its slot until it finishes.
    running: BTreeMap<u32, u64>,
    held: u64,
    waiting: VecDeque<Waiting>,
}

impl Scheduler {
    /// `rounds` limits how many probes each target gets (None: forever).
    pub fn new(
        entries: &[Entry],
        capacity: Capacity,
        start: Instant,
        rounds: Option<u64>,
    ) -> Scheduler {
        let slots = entries
            .iter()
            .map(|&entry| Slot {
                entry,
                next_due: start + phase(entry.id, entry.interval),
                rounds_left: rounds,
                health: Health::Unknown,
            })
            .filter(|s| s.rounds_left != Some(0))
            .collect();
        Scheduler {
            slots,
            capacity,
            limits: Limits::for_schedule(entries, capacity),
            running: BTreeMap::new(),
            held: 0,
            waiting: VecDeque::new(),
        }
    }

    /// Replaces the target list at `now`. Targets with the same id and interval as before keep
    /// their due time and health; new ones (and ones whose interval changed) start at `now` plus
    /// their jitter; missing ones are dropped (a probe of theirs still running keeps its slot
    /// until [`Scheduler::finished`]). Rounds limits do not apply to targets added here. The
    /// limits are sized again for the new list.
    pub fn update(&mut self, entries: &[Entry], now: Instant) {
        let old = std::mem::take(&mut self.slots);
        self.slots = entries
            .iter()
            .map(|&entry| {
                match old
                    .iter()
                    .find(|s| s.entry.id == entry.id && s.entry.interval == entry.interval)
                {
                    Some(s) => Slot { entry, ..s.clone() },
                    None => Slot {
                        entry,
                        next_due: now + phase(entry.id, entry.interval),
                        rounds_left: None,
                        health: Health::Unknown,
                    },
                }
            })
            .collect();
        let slots = &self.slots;
        self.waiting
            .retain(|w| slots.iter().any(|s| s.entry.id == w.target));
        self.limits = Limits::for_schedule(entries, self.capacity);
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Number of targets scheduled.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no target is scheduled.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Probes in flight.
    pub fn in_flight(&self) -> usize {
        self.running.len()
    }

    /// Body-memory bytes reserved by the probes in flight.
    pub fn memory_held(&self) -> u64 {
        self.held
    }

    /// When [`Scheduler::poll`] has something to do next: the earliest due time or the end of a
    /// wait for memory. None when every target has finished its rounds and nothing waits.
    pub fn next_wake(&self) -> Option<Instant> {
        let due = self
            .slots
            .iter()
            .filter(|s| s.rounds_left != Some(0))
            .map(|s| s.next_due)
            .min();
        let wait_ends = self.waiting.iter().map(|w| w.until).min();
        match (due, wait_ends) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A probe started by [`Action::Start`] ended; `answered` is false when it timed out (it
    /// held its slot to its deadline). Frees its slot and memory.
    pub fn finished(&mut self, target: u32, answered: bool) {
        if let Some(bytes) = self.running.remove(&target) {
            self.held -= bytes;
        }
        if let Some(s) = self.slots.iter_mut().find(|s| s.entry.id == target) {
            s.health = if answered {
                Health::Answered
            } else {
                Health::TimedOut
            };
        }
    }

    /// Everything to do at `now`: waits for memory that ended, waiting probes that now fit, and
    /// every target due (each once, advanced to its next period). Call it when the time from
    /// [`Scheduler::next_wake`] has come and after every [`Scheduler::finished`].
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        // Waits that ran out.
        self.waiting.retain(|w| {
            let expired = w.until <= now;
            if expired {
                actions.push(Action::Skipped {
                    target: w.target,
                    due_at: w.due_at,
                    reason: SkipReason::NoMemory,
                    count: 1,
                });
            }
            !expired
        });
        // Waiting probes first, in the order they came due; any that fits starts (a large one
        // at the head does not block smaller ones behind it, and ends its wait in time).
        let mut still = VecDeque::with_capacity(self.waiting.len());
        while let Some(w) = self.waiting.pop_front() {
            let Some(i) = self.slots.iter().position(|s| s.entry.id == w.target) else {
                continue;
            };
            match self.admit(i) {
                Admission::Start => {
                    self.take(i);
                    actions.push(Action::Start {
                        target: w.target,
                        due_at: w.due_at,
                    });
                }
                // A slot or memory may free later within the wait.
                Admission::NoSlot | Admission::NoMemory => still.push_back(w),
                Admission::Never => actions.push(Action::Refused {
                    target: w.target,
                    due_at: w.due_at,
                    need: self.slots[i].entry.memory,
                }),
            }
        }
        self.waiting = still;

        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            // (A slot whose rounds are done stays only while its last probe waits for memory.)
            if slot.next_due > now || slot.rounds_left == Some(0) {
                continue;
            }
            let due_at = slot.next_due;
            let (target, interval) = (slot.entry.id, slot.entry.interval);
            // Periods that ended entirely while we were not looking are skipped, not replayed.
            let late = (now.duration_since(due_at).as_nanos() / interval.as_nanos().max(1)) as u64;
            slot.next_due += interval * (late as u32 + 1);
            if let Some(left) = slot.rounds_left.as_mut() {
                *left = left.saturating_sub(1);
            }
            if late > 0 {
                actions.push(Action::Skipped {
                    target,
                    due_at,
                    reason: SkipReason::Late,
                    count: late,
                });
            }
            let busy = self.running.contains_key(&target)
                || self.waiting.iter().any(|w| w.target == target);
            let action = if busy {
                Action::Skipped {
                    target,
                    due_at,
                    reason: SkipReason::InFlight,
                    count: 1,
                }
            } else {
                match self.admit(i) {
                    Admission::Start => {
                        self.take(i);
                        Action::Start { target, due_at }
                    }
                    Admission::NoSlot => Action::Skipped {
                        target,
                        due_at,
                        reason: SkipReason::NoSlot,
                        count: 1,
                    },
                    Admission::NoMemory => {
                        let timeout = self.slots[i].entry.timeout;
                        self.waiting.push_back(Waiting {
                            target,
                            due_at,
                            until: due_at + timeout,
                        });
                        continue;
                    }
                    Admission::Never => Action::Refused {
                        target,
                        due_at,
                        need: self.slots[i].entry.memory,
                    },
                }
            };
            actions.push(action);
        }
        let waiting = &self.waiting;
        self.slots
            .retain(|s| s.rounds_left != Some(0) || waiting.iter().any(|w| w.target == s.entry.id));
        actions
    }

    /// Whether the target in `self.slots[i]` may start now.
    fn admit(&self, i: usize) -> Admission {
        let slot = &self.slots[i];
        let need = slot.entry.memory;
        if need > self.limits.memory {
            return Admission::Never;
        }
        let l = &self.limits;
        // A target that timed out last time stays out of the reserved share, unless nothing at
        // all is in flight (so it can never be locked out for good).
        let (slots, memory) = if slot.health == Health::TimedOut {
            (
                l.slots.saturating_sub(l.reserved_slots),
                l.memory.saturating_sub(l.reserved_memory),
            )
        } else {
            (l.slots, l.memory)
        };
        let idle = self.running.is_empty();
        if self.running.len() >= slots && !idle {
            return Admission::NoSlot;
        }
        if self.held + need > memory && !idle {
            return Admission::NoMemory;
        }
        Admission::Start
    }

    fn take(&mut self, i: usize) {
        let e = self.slots[i].entry;
        self.held += e.memory;
        self.running.insert(e.id, e.memory);
    }
}

enum Admission {
    Start,
    NoSlot,
    NoMemory,
    Never,
}

/// The offset of a target's due times from the start, in `[0, interval)`: deterministic, so the
/// same target always lands at the same phase (and a benchmark can pick targets that are due
/// together).
pub fn phase(id: u32, interval: Duration) -> Duration {
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

    const MIB: u64 = 1 << 20;
    const KIB: u64 = 1 << 10;

    fn entry(id: u32, interval: Duration) -> Entry {
        Entry {
            id,
            interval,
            timeout: interval,
            memory: 64 * KIB,
        }
    }

    fn roomy() -> Capacity {
        Capacity {
            max_concurrency: None,
            memory_budget: 128 * MIB,
            probe_floor: 64 * KIB,
            sockets: 100_000,
        }
    }

    /// A scheduler of target `id` alone, made now: (now, the scheduler, its first due time).
    fn one_target(id: u32, interval: Duration) -> (Instant, Scheduler, Instant) {
        let t0 = Instant::now();
        let s = Scheduler::new(&[entry(id, interval)], roomy(), t0, None);
        let first = s.next_wake().unwrap();
        (t0, s, first)
    }

    /// Room for everything but memory: `bytes` of it.
    fn memory_budget(bytes: u64) -> Capacity {
        Capacity {
            memory_budget: bytes,
            ..roomy()
        }
    }

    /// A target every 10 s that reserves 40 MiB, with `timeout`.
    fn big(id: u32, timeout: Duration) -> Entry {
        Entry {
            id,
            interval: Duration::from_secs(10),
            timeout,
            memory: 40 * MIB,
        }
    }

    /// Targets 1, 2 and 3 of 40 MiB each (`timeout`) under a 100 MiB budget (two fit), all
    /// due at `t0`.
    fn three_big_due(t0: Instant, timeout: Duration, rounds: Option<u64>) -> Scheduler {
        let targets = [big(1, timeout), big(2, timeout), big(3, timeout)];
        let mut s = Scheduler::new(&targets, memory_budget(100 * MIB), t0, rounds);
        all_due(&mut s, t0);
        s
    }

    /// Every target of `s` due at `at`.
    fn all_due(s: &mut Scheduler, at: Instant) {
        for slot in &mut s.slots {
            slot.next_due = at;
        }
    }

    /// Starts every due probe and reports it finished at once (answered): the due times alone.
    fn run_instant(s: &mut Scheduler, now: Instant) -> Vec<Action> {
        let actions = s.poll(now);
        for a in &actions {
            if let Action::Start { target, .. } = a {
                s.finished(*target, true);
            }
        }
        actions
    }

    fn started(actions: &[Action]) -> Vec<(u32, Instant)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start { target, due_at } => Some((*target, *due_at)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn keeps_period_without_drift() {
        let interval = Duration::from_millis(1000);
        let (t0, mut s, first) = one_target(7, interval);
        assert!(first >= t0 && first < t0 + interval);
        // Poll a little late every time; due times must stay on the grid.
        let mut now = first;
        for k in 0..10_000u32 {
            now += Duration::from_millis(3);
            let a = run_instant(&mut s, now);
            assert_eq!(started(&a), vec![(7, first + interval * k)]);
            assert_eq!(a.len(), 1, "{a:?}");
            now = s.next_wake().unwrap();
        }
    }

    #[test]
    fn late_poll_counts_skipped_periods() {
        let interval = Duration::from_secs(1);
        let (_, mut s, first) = one_target(1, interval);
        let a = run_instant(&mut s, first + Duration::from_millis(3500));
        assert!(a.contains(&Action::Skipped {
            target: 1,
            due_at: first,
            reason: SkipReason::Late,
            count: 3
        }));
        assert_eq!(started(&a).len(), 1);
        assert_eq!(s.next_wake().unwrap(), first + interval * 4);
    }

    #[test]
    fn missed_due_times_are_the_newest_periods() {
        let every = Duration::from_secs(10);
        assert_eq!(missed_due_times(1_000, every, 1), [1_000]);
        assert_eq!(missed_due_times(1_000, every, 3), [1_000, 11_000, 21_000]);
        // A day suspended at 10 s: the newest 60 periods, the last one at the right time.
        let day = missed_due_times(1_000, every, 8_640);
        assert_eq!(day.len() as u64, MAX_MISSED_PER_SKIP);
        assert_eq!(day.last(), Some(&(1_000 + 8_639 * 10_000)));
        assert_eq!(day[0], 1_000 + (8_640 - 60) * 10_000);
        assert!(missed_due_times(1_000, every, 0).is_empty());
    }

    #[test]
    fn jitter_spreads_targets() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(60);
        let targets: Vec<_> = (0..100).map(|id| entry(id, interval)).collect();
        let s = Scheduler::new(&targets, roomy(), t0, None);
        let mut offsets: Vec<_> = s.slots.iter().map(|x| x.next_due - t0).collect();
        offsets.sort();
        offsets.dedup();
        assert_eq!(offsets.len(), 100);
        // Roughly uniform: both halves of the period get a fair share.
        let early = offsets.iter().filter(|d| **d < interval / 2).count();
        assert!((30..=70).contains(&early), "{early}");
        // Deterministic.
        let again = Scheduler::new(&targets, roomy(), t0, None);
        assert_eq!(again.next_wake(), s.next_wake());
    }

    #[test]
    fn rounds_limit_the_run() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(
            &[
                entry(1, Duration::from_millis(10)),
                entry(2, Duration::from_millis(25)),
            ],
            roomy(),
            t0,
            Some(3),
        );
        let mut count = [0; 2];
        while let Some(at) = s.next_wake() {
            for (t, _) in started(&run_instant(&mut s, at)) {
                count[t as usize - 1] += 1;
            }
        }
        assert_eq!(count, [3, 3]);
    }

    #[test]
    fn update_keeps_the_phase_of_unchanged_targets() {
        let t0 = Instant::now();
        let sec = Duration::from_secs(1);
        let mut s = Scheduler::new(
            &[entry(1, sec * 10), entry(2, sec * 10), entry(3, sec * 10)],
            roomy(),
            t0,
            None,
        );
        let due_of = |s: &Scheduler, id: u32| {
            s.slots
                .iter()
                .find(|x| x.entry.id == id)
                .map(|x| x.next_due)
        };
        // Run a while so the due times are past their first period.
        let mut now = t0;
        while now < t0 + sec * 25 {
            now = s.next_wake().unwrap();
            run_instant(&mut s, now);
        }
        let before_1 = due_of(&s, 1).unwrap();
        // 2 removed, 3 gets a new interval, 4 is new.
        s.update(
            &[entry(1, sec * 10), entry(3, sec * 5), entry(4, sec * 10)],
            now,
        );
        assert_eq!(s.len(), 3);
        assert_eq!(due_of(&s, 1), Some(before_1));
        assert_eq!(due_of(&s, 2), None);
        assert_eq!(due_of(&s, 3), Some(now + phase(3, sec * 5)));
        assert_eq!(due_of(&s, 4), Some(now + phase(4, sec * 10)));
        // Target 1 stays on its grid afterwards.
        let mut seen = 0;
        while seen < 3 {
            let at = s.next_wake().unwrap();
            for (t, due_at) in started(&run_instant(&mut s, at)) {
                if t == 1 {
                    assert_eq!(due_at, before_1 + sec * 10 * seen);
                    seen += 1;
                }
            }
        }
    }

    #[test]
    fn at_most_one_probe_per_target_in_flight() {
        let t0 = Instant::now();
        let sec = Duration::from_secs(1);
        let mut s = Scheduler::new(&[entry(1, sec)], roomy(), t0, None);
        let first = s.next_wake().unwrap();
        assert_eq!(started(&s.poll(first)).len(), 1);
        // Not finished when due again: skipped, not started twice.
        let a = s.poll(first + sec);
        assert_eq!(
            a,
            vec![Action::Skipped {
                target: 1,
                due_at: first + sec,
                reason: SkipReason::InFlight,
                count: 1
            }]
        );
        assert_eq!(s.in_flight(), 1);
        s.finished(1, true);
        assert_eq!(started(&s.poll(first + sec * 2)).len(), 1);
    }

    #[test]
    fn slots_are_sized_from_the_schedule() {
        let sec = Duration::from_secs(1);
        let mut entries: Vec<Entry> = (1..=1000)
            .map(|id| Entry {
                timeout: sec * 5,
                ..entry(id, sec * 10)
            })
            .collect();
        entries.push(entry(5000, sec));
        let l = Limits::for_schedule(&entries, roomy());
        assert_eq!(l.steady_need, 501.0);
        assert_eq!(l.slots, 760); // 501 × 1.5 + 8
        assert_eq!(l.reserved_slots, 190);
        // At most one slot per target.
        let l = Limits::for_schedule(&entries[..10], roomy());
        assert_eq!((l.slots, l.reserved_slots), (10, 0));
        // Within the sockets and the memory budget.
        let few_fds = Capacity {
            sockets: 300,
            ..roomy()
        };
        assert_eq!(Limits::for_schedule(&entries, few_fds).slots, 300);
        let small = Capacity {
            memory_budget: 16 * MIB,
            ..roomy()
        };
        assert_eq!(Limits::for_schedule(&entries, small).slots, 256);
        // An explicit max_concurrency wins.
        let fixed = Capacity {
            max_concurrency: Some(64),
            ..roomy()
        };
        assert_eq!(Limits::for_schedule(&entries, fixed).slots, 64);
    }

    /// Issue #13 item 12 on a fake clock: 1,000 targets that never answer (every probe runs to
    /// its 5 s timeout, interval 10 s) and one that answers in 5 ms every second. Before: the
    /// healthy target got 12 of 95 probes. Now: every one, on its grid, and the dead targets
    /// are probed on schedule too.
    #[test]
    fn a_thousand_dead_targets_do_not_starve_a_live_one() {
        // The case with the default (sized) slots; and a quarter of it (250 dead
        // targets) with 16 fixed slots, a quarter of what a small fixed setting would give.
        for (dead, max_concurrency) in [(1000, None), (250, Some(16))] {
            let sec = Duration::from_secs(1);
            let mut entries: Vec<Entry> = (1..=dead)
                .map(|id| Entry {
                    timeout: sec * 5,
                    ..entry(id, sec * 10)
                })
                .collect();
            const LIVE: u32 = 5000;
            const SETTLED: Duration = Duration::from_secs(150);
            entries.push(entry(LIVE, sec));
            let capacity = Capacity {
                max_concurrency,
                ..roomy()
            };
            let t0 = Instant::now();
            let mut s = Scheduler::new(&entries, capacity, t0, None);
            // (when it ends, target, answered)
            let mut ends: Vec<(Instant, u32, bool)> = Vec::new();
            let mut live_starts = Vec::new();
            let (mut dead_started, mut dead_skipped) = (0u64, 0u64);
            let mut now = t0;
            // Long enough to see the 64-slot case settle (see below).
            let end = t0 + sec * if max_concurrency.is_none() { 120 } else { 300 };
            while now < end {
                let next_end = ends.iter().map(|e| e.0).min();
                now = match (s.next_wake(), next_end) {
                    (Some(a), Some(b)) => a.min(b),
                    (a, b) => a.or(b).unwrap(),
                };
                ends.retain(|&(at, target, answered)| {
                    if at <= now {
                        s.finished(target, answered);
                    }
                    at > now
                });
                for a in s.poll(now) {
                    match a {
                        Action::Start {
                            target: LIVE,
                            due_at,
                        } => {
                            assert_eq!(due_at, now, "the live probe started late");
                            live_starts.push(due_at);
                            ends.push((now + Duration::from_millis(5), LIVE, true));
                        }
                        Action::Start { target, .. } => {
                            dead_started += 1;
                            ends.push((now + sec * 5, target, false));
                        }
                        // Never probed, a dead target counts as answering (a new target
                        // must get its first chance), so with 16 slots the dead ones can fill
                        // even the reserved share until each has been probed once: 250 × 5 s
                        // ÷ 16 ≈ 80 s. Never after, and never with the slots sized.
                        Action::Skipped { target: LIVE, .. }
                            if max_concurrency.is_some() && now < t0 + SETTLED => {}
                        Action::Skipped { target: LIVE, .. } => {
                            panic!("{max_concurrency:?}: live probe skipped: {a:?}")
                        }
                        Action::Skipped { count, .. } => dead_skipped += count,
                        Action::Refused { .. } => panic!("{a:?}"),
                    }
                }
            }
            let settled = if max_concurrency.is_none() {
                t0
            } else {
                t0 + SETTLED
            };
            let steady: Vec<Instant> = live_starts
                .iter()
                .copied()
                .filter(|t| *t >= settled)
                .collect();
            let expected = (end - settled).as_secs() as usize;
            assert!(
                (expected - 1..=expected).contains(&steady.len()),
                "{max_concurrency:?}: {} of {expected}",
                steady.len()
            );
            for w in steady.windows(2) {
                assert_eq!(w[1] - w[0], sec);
            }
            if max_concurrency.is_none() {
                // Sized from the schedule: the dead targets are all probed on time as well.
                assert_eq!(dead_skipped, 0);
                assert!(dead_started >= 11_000, "{dead_started}");
            } else {
                // 16 slots cannot hold 125 dead probes: they are skipped, the live one is not.
                assert!(dead_skipped > 0);
            }
        }
    }

    #[test]
    fn memory_waits_then_skips_and_refuses_what_never_fits() {
        let t0 = Instant::now();
        let sec = Duration::from_secs(1);
        let huge = Entry {
            memory: 101 * MIB,
            ..big(9, sec * 2)
        };
        let targets = [big(1, sec * 2), big(2, sec * 2), big(3, sec * 2), huge];
        let mut s = Scheduler::new(&targets, memory_budget(100 * MIB), t0, None);
        // Make all four due at once.
        all_due(&mut s, t0);
        let a = s.poll(t0);
        assert_eq!(started(&a).len(), 2, "{a:?}"); // 2 × 40 MiB fit in 100, the third waits
        assert!(a.contains(&Action::Refused {
            target: 9,
            due_at: t0,
            need: 101 * MIB
        }));
        assert_eq!(s.memory_held(), 80 * MIB);
        // The wait ends at its timeout at the latest; a finished probe lets it in before.
        assert_eq!(s.next_wake(), Some(t0 + sec * 2));
        let (first, _) = started(&a)[0];
        s.finished(first, true);
        let a = s.poll(t0 + sec);
        assert_eq!(started(&a), vec![(3, t0)], "{a:?}");
        // Again, and this time nothing frees: skipped when its timeout has passed.
        let mut s = three_big_due(t0, sec * 2, None);
        s.poll(t0);
        assert_eq!(s.next_wake(), Some(t0 + sec * 2));
        assert_eq!(s.poll(t0 + sec), vec![]);
        assert_eq!(
            s.poll(t0 + sec * 2),
            vec![Action::Skipped {
                target: 3,
                due_at: t0,
                reason: SkipReason::NoMemory,
                count: 1
            }]
        );
    }

    #[test]
    fn a_last_round_waiting_for_memory_still_runs() {
        let t0 = Instant::now();
        let sec = Duration::from_secs(1);
        let mut s = three_big_due(t0, sec * 5, Some(1));
        let first = started(&s.poll(t0));
        assert_eq!(first.len(), 2);
        // The third target's only round waits: the run is not over.
        assert_eq!(s.next_wake(), Some(t0 + sec * 5));
        s.finished(first[0].0, true);
        assert_eq!(started(&s.poll(t0 + sec)), vec![(3, t0)]);
        s.finished(first[1].0, true);
        s.finished(3, true);
        assert_eq!(s.poll(t0 + sec * 2), vec![]);
        assert_eq!(s.next_wake(), None);
    }

    #[test]
    fn timed_out_targets_keep_out_of_the_reserved_share() {
        let t0 = Instant::now();
        let sec = Duration::from_secs(1);
        // 8 slots, 2 reserved; 20 MiB of memory, 5 MiB reserved.
        let capacity = Capacity {
            max_concurrency: Some(8),
            memory_budget: 20 * MIB,
            ..roomy()
        };
        let entries: Vec<Entry> = (1..=10)
            .map(|id| Entry {
                memory: MIB,
                ..entry(id, sec * 10)
            })
            .collect();
        let mut s = Scheduler::new(&entries, capacity, t0, None);
        assert_eq!(s.limits().reserved_slots, 2);
        // Every target timed out once.
        for slot in &mut s.slots {
            slot.health = Health::TimedOut;
            slot.next_due = t0;
        }
        let a = s.poll(t0);
        // 6 = 8 slots - 2 reserved; the other 4 are skipped.
        assert_eq!(started(&a).len(), 6, "{a:?}");
        // A target that answered may still take the reserved ones.
        s.slots[9].health = Health::Answered;
        s.slots[9].next_due = t0 + sec;
        assert_eq!(started(&s.poll(t0 + sec)), vec![(10, t0 + sec)]);
        // Memory: a timed-out target may hold at most 15 of the 20 MiB.
        let capacity = Capacity {
            memory_budget: 20 * MIB,
            ..roomy()
        };
        let entries: Vec<Entry> = (1..=3)
            .map(|id| Entry {
                memory: 6 * MIB,
                ..entry(id, sec * 10)
            })
            .collect();
        let mut s = Scheduler::new(&entries, capacity, t0, None);
        for slot in &mut s.slots {
            slot.health = Health::TimedOut;
            slot.next_due = t0;
        }
        assert_eq!(started(&s.poll(t0)).len(), 2); // 12 MiB; a third would make 18 > 15
                                                   // Nothing in flight: even one bigger than the unreserved part gets its chance.
        let lone = Entry {
            memory: 18 * MIB,
            ..entry(1, sec * 10)
        };
        let mut s = Scheduler::new(&[lone], capacity, t0, None);
        s.slots[0].health = Health::TimedOut;
        s.slots[0].next_due = t0;
        assert_eq!(started(&s.poll(t0)).len(), 1);
    }

    #[test]
    fn a_removed_target_keeps_its_slot_until_it_finishes() {
        let t0 = Instant::now();
        let sec = Duration::from_secs(1);
        let mut s = Scheduler::new(&[entry(1, sec), entry(2, sec)], roomy(), t0, None);
        all_due(&mut s, t0);
        assert_eq!(started(&s.poll(t0)).len(), 2);
        s.update(&[entry(2, sec)], t0);
        assert_eq!(s.in_flight(), 2);
        s.finished(1, true);
        assert_eq!((s.in_flight(), s.memory_held()), (1, 64 * KIB));
    }
}
