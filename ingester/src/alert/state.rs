//! The incident state machine of one subject (a target, a region or an agent under one rule):
//! `for` consecutive bad evaluations open an incident, `resolve_after` good ones close it,
//! unknown evaluations (no fresh data) change nothing, and a subject whose verdict keeps
//! changing is *flapping*: it gets one incident, marked so, held open until it settles.
//!
//! No I/O and no clock: `step` takes a verdict and says what should happen, so every rule of
//! the issue is a unit test here. Flap detection follows Nagios' idea (state changes within a
//! window of recent checks, with a start and a lower stop threshold against oscillating between
//! flapping and not), without its weighting.

use std::collections::{BTreeMap, VecDeque};

/// What one evaluation found for one subject.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The condition holds.
    Bad(Detail),
    /// It does not, and enough fresh data says so.
    Good,
    /// Not enough fresh data to say (a silent region never votes).
    Unknown,
}

/// Why a subject is bad.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Detail {
    /// Regions (or, for agent rules, agents) involved and what each saw: an outcome, a value.
    pub regions: BTreeMap<String, String>,
    /// Regions with fresh data.
    pub reporting: u32,
    /// A number worth keeping the peak of (slowest percentile, fewest days left, ...).
    pub value: Option<f64>,
    /// One line for people: "down from eu-north, us-east (2 of 3 regions): connect_refused".
    pub summary: String,
}

/// Tuning shared by every rule.
#[derive(Debug, Clone, Copy)]
pub struct Flap {
    pub window: u32,
    pub start: f64,
    pub stop: f64,
}

/// What `step` says should happen.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Open an incident (flapping or not).
    Open { flapping: bool, detail: Detail },
    /// The open incident's regions changed.
    Update(Detail),
    /// The open incident is flapping (from now on it stays marked).
    Flapping,
    /// Close the open incident.
    Resolve,
}

/// The evaluator's memory of one subject; persisted (`alert_rule_state`) so a restart neither
/// forgets nor recounts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Track {
    /// Consecutive bad evaluations.
    pub bad: u32,
    /// Consecutive good evaluations.
    pub good: u32,
    /// Recent known verdicts, oldest first, true = bad; at most `Flap::window`.
    pub history: VecDeque<bool>,
    /// Currently flapping (hysteresis between `start` and `stop`).
    pub flapping: bool,
    /// The open incident, if any.
    pub open: Option<Open>,
    /// The latest bad detail (for an incident opened by flapping on a good evaluation).
    pub last_bad: Option<Detail>,
}

/// An open incident as the state machine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Open {
    pub incident_id: i64,
    /// Marked flapping (never unmarked).
    pub flapping: bool,
    /// The regions of the last detail sent, to notice a change.
    pub regions: Vec<String>,
}

impl Track {
    /// Whether this track says nothing that a fresh one would not (then it need not be kept).
    pub fn is_idle(&self) -> bool {
        self.open.is_none() && self.bad == 0 && !self.flapping && !self.history.contains(&true)
    }

    /// Share of state changes between consecutive entries of the history.
    fn change_share(&self) -> f64 {
        if self.history.len() < 2 {
            return 0.0;
        }
        let changes = self
            .history
            .iter()
            .zip(self.history.iter().skip(1))
            .filter(|(a, b)| a != b)
            .count();
        changes as f64 / (self.history.len() - 1) as f64
    }

    /// History as text, oldest first (`B` bad, `G` good), for `alert_rule_state.history`.
    pub fn history_text(&self) -> String {
        self.history
            .iter()
            .map(|b| if *b { 'B' } else { 'G' })
            .collect()
    }

    /// The inverse of [`Track::history_text`] (other characters are skipped).
    pub fn history_from(text: &str) -> VecDeque<bool> {
        text.chars()
            .filter_map(|c| match c {
                'B' => Some(true),
                'G' => Some(false),
                _ => None,
            })
            .collect()
    }

    /// One evaluation. `for_n` and `resolve_after` are the rule's.
    pub fn step(
        &mut self,
        verdict: Verdict,
        for_n: u32,
        resolve_after: u32,
        flap: Flap,
    ) -> Option<Change> {
        let detail = match verdict {
            Verdict::Unknown => return None,
            // Counts stop at what the rule needs: a subject that stays bad (or good) then leaves
            // the track unchanged, so a long incident writes nothing per evaluation.
            Verdict::Bad(d) => {
                self.bad = self.bad.saturating_add(1).min(for_n.max(1));
                self.good = 0;
                self.push(true, flap.window);
                self.last_bad = Some(d.clone());
                Some(d)
            }
            Verdict::Good => {
                self.good = self.good.saturating_add(1).min(resolve_after.max(1));
                self.bad = 0;
                self.push(false, flap.window);
                None
            }
        };
        let share = self.change_share();
        if !self.flapping && self.history.len() as u32 >= flap.window && share >= flap.start {
            self.flapping = true;
        } else if self.flapping && share <= flap.stop {
            self.flapping = false;
        }
        match &mut self.open {
            None => {
                let fire = self.bad >= for_n || self.flapping;
                if !fire {
                    return None;
                }
                let detail = detail.or_else(|| self.last_bad.clone())?;
                Some(Change::Open {
                    flapping: self.flapping,
                    detail,
                })
            }
            Some(open) => {
                if self.flapping && !open.flapping {
                    open.flapping = true;
                    return Some(Change::Flapping);
                }
                if let Some(d) = detail {
                    let regions: Vec<String> = d.regions.keys().cloned().collect();
                    if regions != open.regions {
                        open.regions = regions;
                        return Some(Change::Update(d));
                    }
                    return None;
                }
                (self.good >= resolve_after && !self.flapping).then_some(Change::Resolve)
            }
        }
    }

    fn push(&mut self, bad: bool, window: u32) {
        self.history.push_back(bad);
        while self.history.len() > window as usize {
            self.history.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAP: Flap = Flap {
        window: 10,
        start: 0.4,
        stop: 0.15,
    };

    fn bad(regions: &[&str]) -> Verdict {
        Verdict::Bad(Detail {
            regions: regions
                .iter()
                .map(|r| (r.to_string(), "connect_refused".to_string()))
                .collect(),
            reporting: 3,
            value: None,
            summary: String::new(),
        })
    }

    /// Runs verdicts through a track, applying opens and resolves as the evaluator would;
    /// returns the changes by kind: (opened, resolved, flapping marks, updates).
    fn run(track: &mut Track, verdicts: impl IntoIterator<Item = Verdict>) -> (u32, u32, u32, u32) {
        let mut counts = (0, 0, 0, 0);
        for v in verdicts {
            match track.step(v, 2, 2, FLAP) {
                Some(Change::Open { flapping, detail }) => {
                    counts.0 += 1;
                    track.open = Some(Open {
                        incident_id: 1,
                        flapping,
                        regions: detail.regions.keys().cloned().collect(),
                    });
                }
                Some(Change::Resolve) => {
                    counts.1 += 1;
                    track.open = None;
                }
                Some(Change::Flapping) => counts.2 += 1,
                Some(Change::Update(_)) => counts.3 += 1,
                None => {}
            }
        }
        counts
    }

    #[test]
    fn fires_after_for_and_resolves_after_resolve_after() {
        let mut t = Track::default();
        assert_eq!(t.step(bad(&["a", "b"]), 2, 2, FLAP), None);
        assert!(matches!(
            t.step(bad(&["a", "b"]), 2, 2, FLAP),
            Some(Change::Open {
                flapping: false,
                ..
            })
        ));
        t.open = Some(Open {
            incident_id: 1,
            flapping: false,
            regions: vec!["a".into(), "b".into()],
        });
        assert_eq!(t.step(bad(&["a", "b"]), 2, 2, FLAP), None);
        // Hysteresis: one good evaluation is not enough.
        assert_eq!(t.step(Verdict::Good, 2, 2, FLAP), None);
        assert_eq!(t.step(Verdict::Good, 2, 2, FLAP), Some(Change::Resolve));
    }

    #[test]
    fn a_single_bad_evaluation_never_fires() {
        let mut t = Track::default();
        let seq = [
            bad(&["a", "b"]),
            Verdict::Good,
            Verdict::Good,
            Verdict::Good,
        ];
        assert_eq!(run(&mut t, seq), (0, 0, 0, 0));
    }

    #[test]
    fn unknown_changes_nothing() {
        let mut t = Track::default();
        run(&mut t, [bad(&["a", "b"]), bad(&["a", "b"])]);
        let before = t.clone();
        // The regions went silent: the incident neither resolves nor counts.
        for _ in 0..20 {
            assert_eq!(t.step(Verdict::Unknown, 2, 2, FLAP), None);
        }
        assert_eq!(t, before);
    }

    #[test]
    fn a_new_region_updates_the_open_incident() {
        let mut t = Track::default();
        let c = run(
            &mut t,
            [bad(&["a", "b"]), bad(&["a", "b"]), bad(&["a", "b", "c"])],
        );
        assert_eq!(c, (1, 0, 0, 1));
    }

    #[test]
    fn alternating_verdicts_make_one_flapping_incident() {
        let mut t = Track::default();
        // Alternating every evaluation: `for` = 2 is never reached, flap detection opens one
        // incident, marked flapping, and it stays open while the flapping lasts.
        let flips = (0..40).map(|i| {
            if i % 2 == 0 {
                bad(&["a", "b"])
            } else {
                Verdict::Good
            }
        });
        let (opened, resolved, _, _) = run(&mut t, flips);
        assert_eq!((opened, resolved), (1, 0));
        assert!(t.open.as_ref().is_some_and(|o| o.flapping));
        // It settles: good from now on; resolved once, when the history is calm again.
        let (opened, resolved, _, _) = run(&mut t, (0..20).map(|_| Verdict::Good));
        assert_eq!((opened, resolved), (0, 1));
        assert!(!t.flapping);
    }

    #[test]
    fn an_open_incident_that_starts_flapping_is_marked_once() {
        let mut t = Track::default();
        run(&mut t, [bad(&["a", "b"]), bad(&["a", "b"])]);
        let flips = (0..30).map(|i| {
            if i % 2 == 0 {
                Verdict::Good
            } else {
                bad(&["a", "b"])
            }
        });
        let (opened, resolved, marked, _) = run(&mut t, flips);
        assert_eq!((opened, resolved, marked), (0, 0, 1));
    }

    #[test]
    fn history_round_trips_as_text() {
        let mut t = Track::default();
        run(&mut t, [bad(&["a"]), Verdict::Good, bad(&["a"])]);
        assert_eq!(t.history_text(), "BGB");
        assert_eq!(Track::history_from("BGB"), t.history);
    }
}
