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
//!
//! # Agents that say how good their clock is (issue #18 item 3)
//! A version 3 frame carries the agent's clock state (`ClockHealth`: the kernel's synced flag
//! and maximum error, and the agent's time when it sealed the frame). A result older than
//! `max_clock_behind` is not a sign of a bad clock when the agent is one that can be trusted
//! ([`ClockWindow::trusts`]: synchronised, at most [`TRUSTED_MAX_ERROR_MS`] of maximum error,
//! and a seal time inside the window around the bridge's clock, which proves the clock is
//! right now), and the result was not taken before the clock's first sync: it is a backlog
//! from its spool after an outage, and it is stored (retention still applies). Results from
//! the future are refused whatever the agent says.
//!
//! The same state, with the offset of the agent's clock from the bridge's (seal time minus the
//! Kafka timestamp), goes to the agent's `agents` row ([`AgentClock`], `record_clocks`).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use vantage_proto::{ClockHealth, Gap, ProbeResult};

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

/// Largest maximum error (ms) of a clock whose old results are trusted ([`ClockWindow::trusts`]).
pub const TRUSTED_MAX_ERROR_MS: u32 = 1000;

/// An agent clock further ahead of the bridge's than this is flagged `offset` in the fleet.
pub const OFFSET_AHEAD_FLAG_MS: i64 = 10_000;

impl ClockWindow {
    /// Whether an agent with this clock state is trusted to date its results (see the module
    /// docs): synchronised, at most [`TRUSTED_MAX_ERROR_MS`] of maximum error, and sealed at a
    /// time inside the window around the bridge's `bridge_ms`.
    pub fn trusts(&self, clock: Option<&ClockHealth>, bridge_ms: i64) -> bool {
        clock.is_some_and(|c| {
            let sealed = i64::try_from(c.sealed_at_ms).unwrap_or(i64::MAX);
            c.synced
                && c.max_error_ms <= TRUSTED_MAX_ERROR_MS
                && sealed <= bridge_ms.saturating_add(ms(self.max_ahead))
                && sealed >= bridge_ms.saturating_sub(ms(self.max_behind))
        })
    }

    /// The verdict on one result that started at `started_ms` (all times in ms since the epoch).
    pub fn result(&self, started_ms: u64, bridge_ms: i64, now_ms: i64) -> Option<Refusal> {
        self.result_of(started_ms, bridge_ms, now_ms, false)
    }

    /// [`ClockWindow::result`], where a `trusted` clock's result may be older than
    /// `max_behind` (not older than retention, not from the future).
    pub fn result_of(
        &self,
        started_ms: u64,
        bridge_ms: i64,
        now_ms: i64,
        trusted: bool,
    ) -> Option<Refusal> {
        let t = i64::try_from(started_ms).unwrap_or(i64::MAX);
        if t > bridge_ms.saturating_add(ms(self.max_ahead))
            || (!trusted && t < bridge_ms.saturating_sub(ms(self.max_behind)))
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
    /// sink's clock stands in for it. `clock` is the frame's clock state: rows taken with a
    /// set clock ([`Row::clock_unsynced`] false) of an agent it [`trusts`](Self::trusts) may
    /// be older than `max_behind`.
    pub fn check(
        &self,
        rows: Vec<Row>,
        gaps: Vec<GapRow>,
        clock: Option<&ClockHealth>,
        bridge_ms: Option<i64>,
        now_ms: i64,
    ) -> Checked {
        let bridge_ms = bridge_ms.filter(|&t| t > 0).unwrap_or(now_ms);
        let trusted = self.trusts(clock, bridge_ms);
        let mut out = Checked::default();
        let mut refused: BTreeMap<Refusal, Refused> = BTreeMap::new();
        for row in rows {
            let trusted = trusted && row.clock_unsynced == Some(false);
            match self.result_of(row.result.started_at_ms, bridge_ms, now_ms, trusted) {
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

/// An agent's clock state for its `agents` row (migration 0013): from the latest frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentClock {
    pub boot_id: u64,
    pub synced: bool,
    pub error_ms: u32,
    pub boot_age_s: u32,
    /// The agent's seal time minus the bridge's receive time (ms; positive: ahead). The
    /// frame's transit time makes it read a little behind; never ahead.
    pub offset_ms: i64,
    /// `offset`, `unsynced`, or None when fine.
    pub flag: Option<&'static str>,
    /// The bridge's receive time (ms).
    pub bridge_ms: i64,
}

impl ClockWindow {
    /// What the fleet shows of an agent whose frame of boot `boot_id` with `clock` the
    /// bridge received at `bridge_ms`: flagged `offset` when its clock is more than
    /// [`OFFSET_AHEAD_FLAG_MS`] ahead or further behind than `max_behind` (its results would
    /// be refused as clock skew), `unsynced` when the kernel says it is not synchronised.
    pub fn agent_clock(&self, boot_id: u64, clock: &ClockHealth, bridge_ms: i64) -> AgentClock {
        let offset_ms = i64::try_from(clock.sealed_at_ms)
            .unwrap_or(i64::MAX)
            .saturating_sub(bridge_ms);
        let flag = if offset_ms > OFFSET_AHEAD_FLAG_MS || offset_ms < -ms(self.max_behind) {
            Some("offset")
        } else if !clock.synced {
            Some("unsynced")
        } else {
            None
        };
        AgentClock {
            boot_id,
            synced: clock.synced,
            error_ms: clock.max_error_ms,
            boot_age_s: clock.boot_age_s,
            offset_ms,
            flag,
            bridge_ms,
        }
    }
}

/// Per (region, agent): the clock state of its latest frame in a batch.
pub type AgentClocks = BTreeMap<(String, String), AgentClock>;

/// Keeps `clock` for `region/agent` unless `clocks` has a later reading of the same boot (a
/// frame sent again after an ack timeout carries its old seal: it must not win).
pub fn keep_latest(clocks: &mut AgentClocks, region: &str, agent: &str, clock: AgentClock) {
    let key = (region.to_owned(), agent.to_owned());
    if let Some(old) = clocks.get(&key) {
        if old.boot_id == clock.boot_id && old.boot_age_s > clock.boot_age_s {
            return;
        }
    }
    clocks.insert(key, clock);
}

/// Writes the agents' clock states (creating rows for agents never seen), in one
/// transaction; as in [`keep_latest`], a reading of the same boot with a smaller boot age
/// than the stored one is left out.
pub async fn record_clocks(client: &mut Client, clocks: &AgentClocks) -> Result<(), DbError> {
    upsert_agents(
        client,
        clocks,
        "INSERT INTO agents AS a (agent, region, clock_boot_id, clock_synced, clock_error_ms,
                                  clock_boot_age_s, clock_offset_ms, clock_flag, clock_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, to_timestamp($9::float8 / 1000))
         ON CONFLICT (agent) DO UPDATE SET
             clock_boot_id = excluded.clock_boot_id,
             clock_synced = excluded.clock_synced,
             clock_error_ms = excluded.clock_error_ms,
             clock_boot_age_s = excluded.clock_boot_age_s,
             clock_offset_ms = excluded.clock_offset_ms,
             clock_flag = excluded.clock_flag,
             clock_at = excluded.clock_at
         WHERE a.clock_boot_id IS DISTINCT FROM excluded.clock_boot_id
            OR a.clock_boot_age_s IS NULL
            OR a.clock_boot_age_s <= excluded.clock_boot_age_s",
        |c| {
            vec![
                Box::new(c.boot_id as i64),
                Box::new(c.synced),
                Box::new(i32::try_from(c.error_ms).unwrap_or(i32::MAX)),
                Box::new(i64::from(c.boot_age_s)),
                Box::new(c.offset_ms),
                Box::new(c.flag),
                Box::new(c.bridge_ms as f64),
            ]
        },
    )
    .await
}

/// One `agents` row per (region, agent) of `rows`, by `upsert` (`$1` the agent, `$2` the
/// region, then the row's `values`), each region created first if it is new; in one
/// transaction.
async fn upsert_agents<V>(
    client: &mut Client,
    rows: &BTreeMap<(String, String), V>,
    upsert: &str,
    values: impl Fn(&V) -> Vec<Box<dyn ToSql + Send + Sync>>,
) -> Result<(), DbError> {
    if rows.is_empty() {
        return Ok(());
    }
    let tx = client.transaction().await?;
    let region = tx.prepare(crate::fleet::INSERT_REGION).await?;
    let agent = tx.prepare(upsert).await?;
    for ((r, a), v) in rows {
        tx.execute(&region, &[r]).await?;
        let values = values(v);
        let params: Vec<&(dyn ToSql + Sync)> = [a as &(dyn ToSql + Sync), r]
            .into_iter()
            .chain(values.iter().map(|b| b.as_ref() as &(dyn ToSql + Sync)))
            .collect();
        tx.execute(&agent, &params).await?;
    }
    tx.commit().await?;
    Ok(())
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
    upsert_agents(
        client,
        counts,
        "INSERT INTO agents AS a (agent, region, clock_skew_results, clock_skew_ms, clock_skew_at)
         VALUES ($1, $2, $3, $4, to_timestamp($5::float8 / 1000))
         ON CONFLICT (agent) DO UPDATE SET
             clock_skew_results = a.clock_skew_results + excluded.clock_skew_results,
             clock_skew_ms = excluded.clock_skew_ms,
             clock_skew_at = excluded.clock_skew_at",
        |c| {
            vec![
                Box::new(i64::try_from(c.results).unwrap_or(i64::MAX)),
                Box::new(c.last_skew_ms),
                Box::new(c.last_bridge_ms as f64),
            ]
        },
    )
    .await
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
        Row::new("eu", "pi", 9, result(seq, started_at_ms), None)
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
        let c = w.check(rows, gaps, None, Some(NOW), NOW);
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
        let c = w.check(vec![row(0, now - 1000)], vec![], None, None, NOW);
        assert_eq!(c.rows.len(), 1);
    }

    fn synced(sealed_at_ms: u64) -> ClockHealth {
        ClockHealth {
            synced: true,
            max_error_ms: 40,
            est_error_ms: 2,
            synced_from_seq: Some(0),
            boot_age_s: 600,
            sealed_at_ms,
        }
    }

    #[test]
    fn a_trusted_clock_may_send_a_backlog_older_than_max_behind() {
        let w = ClockWindow::default();
        let now = NOW as u64;
        let clock = synced(now - 20);
        assert!(w.trusts(Some(&clock), NOW));
        // Not trusted: unknown, not synchronised, too large an error, sealed out of bounds.
        assert!(!w.trusts(None, NOW));
        let unsynced = ClockHealth {
            synced: false,
            ..clock
        };
        assert!(!w.trusts(Some(&unsynced), NOW));
        let loose = ClockHealth {
            max_error_ms: TRUSTED_MAX_ERROR_MS + 1,
            ..clock
        };
        assert!(!w.trusts(Some(&loose), NOW));
        assert!(w.trusts(
            Some(&ClockHealth {
                max_error_ms: TRUSTED_MAX_ERROR_MS,
                ..clock
            }),
            NOW
        ));
        assert!(!w.trusts(Some(&synced(now + 300_001)), NOW), "sealed ahead");
        assert!(
            !w.trusts(Some(&synced(now - 3_600_001)), NOW),
            "sealed behind"
        );

        // A backlog of 5 hours (spooled during an outage) from a trusted agent is stored; the
        // same rows from an agent without clock state are refused as before.
        let backlog = |clock: Option<&ClockHealth>| {
            let rows = (0..3)
                .map(|seq| Row::new("eu", "pi", 9, result(seq, now - 5 * 3_600_000), clock))
                .collect();
            w.check(rows, vec![], clock, Some(NOW), NOW)
        };
        let c = backlog(Some(&clock));
        assert_eq!(c.rows.len(), 3);
        assert!(c.refused.is_empty());
        let c = backlog(None);
        assert!(c.rows.is_empty());
        assert_eq!(c.refused[0].refusal, Refusal::ClockSkew);
        assert_eq!(backlog(Some(&unsynced)).rows.len(), 0);

        // Results taken before the clock's first sync are not trusted, the rest are.
        let late_sync = ClockHealth {
            synced_from_seq: Some(2),
            ..clock
        };
        let c = backlog(Some(&late_sync));
        assert_eq!(c.rows.iter().map(|r| r.result.seq).collect::<Vec<_>>(), [2]);
        assert_eq!(c.refused[0].results.len(), 2);

        // Never from the future, never past retention, whatever the clock says.
        assert_eq!(
            w.result_of(now + 300_001, NOW, NOW, true),
            Some(Refusal::ClockSkew)
        );
        assert_eq!(
            w.result_of(now - 31 * DAY, NOW, NOW, true),
            Some(Refusal::PastRetention)
        );
        assert_eq!(w.result_of(now - 29 * DAY, NOW, NOW, true), None);
    }

    #[test]
    fn the_fleet_flags_offset_and_unsynced_clocks() {
        let w = ClockWindow::default();
        let now = NOW as u64;
        let fine = w.agent_clock(9, &synced(now - 4), NOW);
        assert_eq!((fine.offset_ms, fine.flag), (-4, None));
        let ahead = w.agent_clock(9, &synced(now + 7_200_000), NOW);
        assert_eq!((ahead.offset_ms, ahead.flag), (7_200_000, Some("offset")));
        assert_eq!(w.agent_clock(9, &synced(now + 10_000), NOW).flag, None);
        assert_eq!(
            w.agent_clock(9, &synced(now + 10_001), NOW).flag,
            Some("offset")
        );
        assert_eq!(w.agent_clock(9, &synced(now - 3_600_000), NOW).flag, None);
        assert_eq!(
            w.agent_clock(9, &synced(now - 3_600_001), NOW).flag,
            Some("offset")
        );
        let unsynced = ClockHealth {
            synced: false,
            ..synced(now)
        };
        assert_eq!(w.agent_clock(9, &unsynced, NOW).flag, Some("unsynced"));

        // A frame sent again (older seal, smaller boot age) does not replace a newer reading
        // of the same boot; a new boot does.
        let mut clocks = AgentClocks::new();
        let newer = w.agent_clock(9, &synced(now), NOW);
        keep_latest(&mut clocks, "eu", "pi", newer.clone());
        let resent = w.agent_clock(
            9,
            &ClockHealth {
                boot_age_s: 570,
                ..synced(now - 30_000)
            },
            NOW,
        );
        keep_latest(&mut clocks, "eu", "pi", resent);
        assert_eq!(clocks[&("eu".to_owned(), "pi".to_owned())], newer);
        let reboot = w.agent_clock(
            10,
            &ClockHealth {
                boot_age_s: 5,
                ..unsynced
            },
            NOW,
        );
        keep_latest(&mut clocks, "eu", "pi", reboot.clone());
        assert_eq!(clocks[&("eu".to_owned(), "pi".to_owned())], reboot);
    }
}
