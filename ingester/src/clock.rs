//! Agent clocks are not trusted: the sink's check of each result's time against the bridge's.
//!
//! A Pi without a real-time clock (or with a bad one) dates its results wherever its clock is:
//! rows dated 400 days back were stored and then deleted by the next retention, silently; rows
//! dated 20 years ahead froze `latest_results` (and with it `latest_status` and
//! `failing_targets`) until that date, and each invented day made upkeep create a partition. The
//! Kafka record's timestamp is the bridge's clock (it produced the record when the frame
//! arrived), so the sink compares each result's `started_at` with it: a result must have
//! started at most `sink.max_clock_behind` before it (default 1 h) and at most
//! `sink.max_clock_ahead` after it (default 5 min). Older ones are also refused when they are
//! older than `storage.raw_retention` by the sink's own clock (a backlog replayed after a long
//! outage): retention would delete them at its next round.
//!
//! Refused results are never dropped: they go to the dead-letter topic (reason `clock_skew` or
//! `past_retention`; the raw frame when the whole frame is refused, else a frame of just the
//! refused records) and `clock_skew` ones are counted on the agent's row (`agents.clock_skew_*`)
//! and in `vantage_sink_clock_skew_results_total`. Gap records are checked against the hard
//! limits only (not in the future, not past retention): a gap legitimately covers an outage,
//! so it may be older than `max_clock_behind`.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::Client;
use vantage_proto::{Gap, ProbeResult};

use crate::db::{DbError, GapRow, Row};

pub use crate::config::ClockWindow;

/// Why a record's time is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// Outside the window around the bridge's clock.
    ClockSkew,
    /// Older than raw retention: the next retention would delete it.
    PastRetention,
}

impl Refusal {
    /// The dead-letter reason.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::ClockSkew => "clock_skew",
            Refusal::PastRetention => "past_retention",
        }
    }
}

/// Refused records of one frame, for one reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub refusal: Refusal,
    pub results: Vec<ProbeResult>,
    pub gaps: Vec<Gap>,
    /// `started_at − bridge time` of the refused result furthest off (ms; negative: behind).
    pub worst_skew_ms: i64,
}

/// One frame's rows after the check.
#[derive(Debug, Default)]
pub struct Checked {
    pub rows: Vec<Row>,
    pub gaps: Vec<GapRow>,
    /// At most one entry per reason, in [`Refusal`] order.
    pub refused: Vec<Refused>,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl ClockWindow {
    /// The verdict on one result that started at `started_ms` (all times in ms since the epoch).
    pub fn result(&self, started_ms: u64, bridge_ms: i64, now_ms: i64) -> Option<Refusal> {
        let t = i64::try_from(started_ms).unwrap_or(i64::MAX);
        if t > bridge_ms.saturating_add(ms(self.max_ahead))
            || t < bridge_ms.saturating_sub(ms(self.max_behind))
        {
            Some(Refusal::ClockSkew)
        } else if t < now_ms.saturating_sub(ms(self.retention)) {
            Some(Refusal::PastRetention)
        } else {
            None
        }
    }

    /// The verdict on a gap record: only the hard limits (see the module docs).
    pub fn gap(&self, gap: &Gap, bridge_ms: i64, now_ms: i64) -> Option<Refusal> {
        let last =
            i64::try_from(gap.last_started_at_ms.max(gap.first_started_at_ms)).unwrap_or(i64::MAX);
        let first =
            i64::try_from(gap.first_started_at_ms.min(gap.last_started_at_ms)).unwrap_or(i64::MAX);
        if last > bridge_ms.saturating_add(ms(self.max_ahead)) {
            Some(Refusal::ClockSkew)
        } else if first < now_ms.saturating_sub(ms(self.retention)) {
            Some(Refusal::PastRetention)
        } else {
            None
        }
    }

    /// Splits one frame's rows (all of one agent and boot) into those to store and those to
    /// refuse. `bridge_ms` is the Kafka record's timestamp; when the record has none, the
    /// sink's clock stands in for it.
    pub fn check(
        &self,
        rows: Vec<Row>,
        gaps: Vec<GapRow>,
        bridge_ms: Option<i64>,
        now_ms: i64,
    ) -> Checked {
        let bridge_ms = bridge_ms.filter(|&t| t > 0).unwrap_or(now_ms);
        let mut out = Checked::default();
        let mut refused: BTreeMap<Refusal, Refused> = BTreeMap::new();
        for row in rows {
            match self.result(row.result.started_at_ms, bridge_ms, now_ms) {
                None => out.rows.push(row),
                Some(r) => {
                    let skew = i64::try_from(row.result.started_at_ms)
                        .unwrap_or(i64::MAX)
                        .saturating_sub(bridge_ms);
                    let e = slot(&mut refused, r);
                    if skew.unsigned_abs() > e.worst_skew_ms.unsigned_abs() {
                        e.worst_skew_ms = skew;
                    }
                    e.results.push(row.result);
                }
            }
        }
        for g in gaps {
            match self.gap(&g.gap, bridge_ms, now_ms) {
                None => out.gaps.push(g),
                Some(r) => slot(&mut refused, r).gaps.push(g.gap),
            }
        }
        out.refused = refused.into_values().collect();
        out
    }
}

/// The refused records of reason `r` so far.
fn slot(refused: &mut BTreeMap<Refusal, Refused>, r: Refusal) -> &mut Refused {
    refused.entry(r).or_insert_with(|| Refused {
        refusal: r,
        results: Vec::new(),
        gaps: Vec::new(),
        worst_skew_ms: 0,
    })
}

/// Clock-skew refusals of one agent within a batch, for its `agents` row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkewCount {
    pub results: u64,
    /// The latest refused result's `started_at − bridge time` (ms) and that bridge time.
    pub last_skew_ms: i64,
    pub last_bridge_ms: i64,
}

/// Per (region, agent): what a batch refused for clock skew.
pub type SkewCounts = BTreeMap<(String, String), SkewCount>;

/// Adds `results` results of `region/agent` refused for clock skew to `counts`; the latest
/// was `skew_ms` off the bridge's time `bridge_ms`.
pub fn count(
    counts: &mut SkewCounts,
    region: &str,
    agent: &str,
    results: usize,
    skew_ms: i64,
    bridge_ms: i64,
) {
    let c = counts
        .entry((region.to_owned(), agent.to_owned()))
        .or_default();
    c.results += results as u64;
    c.last_skew_ms = skew_ms;
    c.last_bridge_ms = bridge_ms;
}

/// Adds the counts to the agents' rows (creating rows for agents never seen), in one
/// transaction.
pub async fn record(client: &mut Client, counts: &SkewCounts) -> Result<(), DbError> {
    if counts.is_empty() {
        return Ok(());
    }
    let tx = client.transaction().await?;
    let region = tx
        .prepare("INSERT INTO regions (region) VALUES ($1) ON CONFLICT DO NOTHING")
        .await?;
    let agent = tx
        .prepare(
            "INSERT INTO agents AS a (agent, region, clock_skew_results, clock_skew_ms, clock_skew_at)
             VALUES ($1, $2, $3, $4, to_timestamp($5::float8 / 1000))
             ON CONFLICT (agent) DO UPDATE SET
                 clock_skew_results = a.clock_skew_results + excluded.clock_skew_results,
                 clock_skew_ms = excluded.clock_skew_ms,
                 clock_skew_at = excluded.clock_skew_at",
        )
        .await?;
    for ((r, a), c) in counts {
        tx.execute(&region, &[r]).await?;
        let n = i64::try_from(c.results).unwrap_or(i64::MAX);
        tx.execute(
            &agent,
            &[a, r, &n, &c.last_skew_ms, &(c.last_bridge_ms as f64)],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vantage_proto::Outcome;

    const NOW: i64 = 1_800_000_000_000;
    const DAY: u64 = 86_400_000;

    fn result(seq: u64, started_at_ms: u64) -> ProbeResult {
        ProbeResult {
            status: 200,
            total_us: 1000,
            ..ProbeResult::without_response(seq, 1, started_at_ms, Outcome::Up)
        }
    }

    fn row(seq: u64, started_at_ms: u64) -> Row {
        Row {
            region: "eu".into(),
            agent: "pi".into(),
            boot_id: 9,
            result: result(seq, started_at_ms),
        }
    }

    #[test]
    fn the_window_is_around_the_bridge_clock() {
        let w = ClockWindow::default();
        let now = NOW as u64;
        // The bridge received it 10 minutes ago (a backlog in Kafka): judged by that time.
        let bridge = NOW - 600_000;
        let b = bridge as u64;
        assert_eq!(w.result(b - 1000, bridge, NOW), None);
        assert_eq!(w.result(b - 3_600_000, bridge, NOW), None);
        assert_eq!(
            w.result(b - 3_600_001, bridge, NOW),
            Some(Refusal::ClockSkew)
        );
        assert_eq!(w.result(b + 300_000, bridge, NOW), None);
        assert_eq!(w.result(b + 300_001, bridge, NOW), Some(Refusal::ClockSkew));
        assert_eq!(
            w.result(now - 400 * DAY, NOW, NOW),
            Some(Refusal::ClockSkew)
        );
        assert_eq!(w.result(u64::MAX, NOW, NOW), Some(Refusal::ClockSkew));
        assert_eq!(w.result(0, NOW, NOW), Some(Refusal::ClockSkew));
        // A backlog older than retention: right by the bridge's clock, deleted by the next
        // retention all the same.
        let old_bridge = NOW - 31 * DAY as i64;
        assert_eq!(
            w.result(old_bridge as u64 - 1000, old_bridge, NOW),
            Some(Refusal::PastRetention)
        );
        // Gaps: may be older than max_behind (they cover an outage), not from the future or
        // past retention.
        let gap = |first: u64, last: u64| Gap {
            first_seq: 0,
            count: 1,
            first_started_at_ms: first,
            last_started_at_ms: last,
        };
        assert_eq!(
            w.gap(&gap(now - 5 * 3_600_000, now - 3_600_000), NOW, NOW),
            None
        );
        assert_eq!(
            w.gap(&gap(now - 1000, now + 20 * 365 * DAY), NOW, NOW),
            Some(Refusal::ClockSkew)
        );
        assert_eq!(
            w.gap(&gap(now - 400 * DAY, now - 399 * DAY), NOW, NOW),
            Some(Refusal::PastRetention)
        );
    }

    #[test]
    fn a_frame_is_split_and_only_refused_records_are_dead_lettered() {
        let w = ClockWindow::default();
        let now = NOW as u64;
        let rows = vec![
            row(0, now - 1000),
            row(1, now - 400 * DAY),
            row(2, now + 20 * 365 * DAY),
            row(3, now - 2000),
        ];
        let gaps = vec![GapRow {
            region: "eu".into(),
            agent: "pi".into(),
            boot_id: 9,
            gap: Gap {
                first_seq: 10,
                count: 2,
                first_started_at_ms: now - 400 * DAY,
                last_started_at_ms: now - 400 * DAY,
            },
        }];
        let c = w.check(rows, gaps, Some(NOW), NOW);
        assert_eq!(
            c.rows.iter().map(|r| r.result.seq).collect::<Vec<_>>(),
            [0, 3]
        );
        assert!(c.gaps.is_empty());
        assert_eq!(c.refused.len(), 2);
        let skew = &c.refused[0];
        assert_eq!(skew.refusal, Refusal::ClockSkew);
        assert_eq!(
            skew.results.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(skew.worst_skew_ms, (20 * 365 * DAY) as i64);
        let frame = crate::batch::frame_of(9, &skew.results, &skew.gaps).unwrap();
        let batch = vantage_proto::decode(&frame).unwrap();
        assert_eq!(batch.boot_id, 9);
        assert_eq!(batch.results.len(), 2);
        assert!(batch.gaps.is_empty());
        assert_eq!(c.refused[1].refusal, Refusal::PastRetention);
        assert_eq!(c.refused[1].gaps.len(), 1);

        let mut counts = SkewCounts::new();
        count(&mut counts, "eu", "pi", 2, skew.worst_skew_ms, NOW);
        count(&mut counts, "eu", "pi", 1, -5, NOW + 1);
        assert_eq!(
            counts[&("eu".to_owned(), "pi".to_owned())],
            SkewCount {
                results: 3,
                last_skew_ms: -5,
                last_bridge_ms: NOW + 1,
            }
        );
        // No Kafka timestamp: the sink's clock stands in.
        let c = w.check(vec![row(0, now - 1000)], vec![], None, NOW);
        assert_eq!(c.rows.len(), 1);
    }
}
