//! The agent fleet on the central side: status records (which the bridge put on the results
//! topic with the `vantage-kind: status` header) become the `agents` table, and
//! `vantage-ingester agents` lists it.
//!
//! Statuses of one agent share its Kafka key, so they reach the sink in Kafka order; but that is
//! not always the order they were received in: the bridge delivers concurrently, and a delivery
//! it had to retry lands after a later status. So every status carries the bridge's receive time
//! (the record's timestamp, fixed across retries) and an older one never replaces a newer one
//! (`state_at`). A replay after a sink crash changes nothing for the same reason. The last will
//! is the other exception: the broker sends it when a connection dies, possibly after the same
//! agent already reconnected with a new boot id, so a will only counts for the boot that
//! registered it.

use std::time::Duration;

use tokio_postgres::Client;
use vantage_proto::control::{AgentState, AgentStatus, SetScope};

use crate::db::DbError;

/// One status, with the identity taken from the Kafka key (which the bridge took from the
/// authenticated topic).
#[derive(Debug, Clone)]
pub struct StatusRow {
    pub region: String,
    pub agent: String,
    pub status: AgentStatus,
    /// When the bridge produced it (the Kafka record's timestamp), in ms since the epoch.
    ///
    /// Not the agent's own `sent_at_ms`: a Pi without a real-time clock can be minutes or years
    /// off, and the last will has no time at all. One clock (the bridges') keeps `state_at` and
    /// `last_seen` comparable across agents and with `now()`.
    pub at_ms: i64,
}

/// Why a status record cannot be stored (it goes to the dead-letter topic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadStatus {
    /// A text field holds a NUL byte, which PostgreSQL `text` refuses.
    NulByte,
}

impl StatusRow {
    /// Checks what PostgreSQL would refuse, so one bad record cannot stop a sink.
    pub fn new(
        region: &str,
        agent: &str,
        status: AgentStatus,
        kafka_timestamp_ms: Option<i64>,
    ) -> Result<StatusRow, BadStatus> {
        let reason = status.rejection.as_ref().map_or("", |r| r.reason.as_str());
        if status.version.contains('\0') || reason.contains('\0') {
            return Err(BadStatus::NulByte);
        }
        Ok(StatusRow {
            region: region.to_owned(),
            agent: agent.to_owned(),
            status,
            at_ms: kafka_timestamp_ms.filter(|&t| t > 0).unwrap_or_else(now_ms),
        })
    }
}

/// Wall clock in ms since the epoch, signed as Kafka timestamps are (the agent's helper).
pub(crate) fn now_ms() -> i64 {
    i64::try_from(vantage_common::time::now_ms()).unwrap_or(i64::MAX)
}

fn state_name(s: AgentState) -> &'static str {
    match s {
        AgentState::Online => "online",
        AgentState::Heartbeat => "heartbeat",
        AgentState::Offline => "offline",
        AgentState::Lost => "lost",
    }
}

/// Creates a region the first time an agent row names it (`agents.region` references it).
pub(crate) const INSERT_REGION: &str =
    "INSERT INTO regions (region) VALUES ($1) ON CONFLICT DO NOTHING";

/// Applies statuses in order, in one transaction.
pub async fn write_statuses(client: &mut Client, statuses: &[StatusRow]) -> Result<(), DbError> {
    if statuses.is_empty() {
        return Ok(());
    }
    let tx = client.transaction().await?;
    let region_insert = tx.prepare(INSERT_REGION).await?;
    // Online, heartbeat, offline: the agent speaks for itself. Statuses of one agent arrive in
    // Kafka order (one key, one partition), so each simply replaces the previous state.
    let alive = tx
        .prepare(
            "INSERT INTO agents AS a (agent, region, version, boot_id, online, state, state_at,
                 last_seen, max_concurrency, buffer_capacity, targets, pending_results,
                 region_set_generation, agent_set_generation, rejected_scope,
                 rejected_generation, rejection)
             VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7::float8 / 1000),
                 to_timestamp($7::float8 / 1000), $8, $9, $10, $11, $12, $13, $14, $15, $16)
             ON CONFLICT (agent) DO UPDATE SET
                 region = excluded.region, version = excluded.version,
                 boot_id = excluded.boot_id, online = excluded.online, state = excluded.state,
                 state_at = excluded.state_at,
                 last_seen = greatest(a.last_seen, excluded.last_seen),
                 max_concurrency = excluded.max_concurrency,
                 buffer_capacity = excluded.buffer_capacity, targets = excluded.targets,
                 pending_results = excluded.pending_results,
                 region_set_generation = excluded.region_set_generation,
                 agent_set_generation = excluded.agent_set_generation,
                 rejected_scope = excluded.rejected_scope,
                 rejected_generation = excluded.rejected_generation,
                 rejection = excluded.rejection
             -- A status received before the one stored (a delivery the bridge retried and
             -- so produced after a later one) changes nothing.
             WHERE a.state_at IS NULL OR a.state_at <= excluded.state_at",
        )
        .await?;
    // The last will: only for the boot that registered it.
    let lost = tx
        .prepare(
            "UPDATE agents SET online = false, state = 'lost', state_at = to_timestamp($3::float8 / 1000)
              WHERE agent = $1 AND boot_id = $2
                AND (state_at IS NULL OR state_at <= to_timestamp($3::float8 / 1000))",
        )
        .await?;
    for s in statuses {
        let st = &s.status;
        tx.execute(&region_insert, &[&s.region]).await?;
        // Stored as signed: boot ids are random 64-bit numbers, PostgreSQL has no unsigned type
        // (the same mapping as `results.boot_id`).
        let boot_id = st.boot_id as i64;
        match st.state {
            AgentState::Lost => {
                tx.execute(&lost, &[&s.agent, &boot_id, &(s.at_ms as f64)])
                    .await?;
            }
            state => {
                let online = state != AgentState::Offline;
                let (scope, generation, reason) = match &st.rejection {
                    Some(r) => (
                        Some(match r.scope {
                            SetScope::Region => "region",
                            SetScope::Agent => "agent",
                        }),
                        Some(r.generation as i64),
                        Some(r.reason.as_str()),
                    ),
                    None => (None, None, None),
                };
                let clamp = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
                tx.execute(
                    &alive,
                    &[
                        &s.agent,
                        &s.region,
                        &st.version.as_str(),
                        &boot_id,
                        &online,
                        &state_name(state),
                        &(s.at_ms as f64),
                        &clamp(st.max_concurrency),
                        &clamp(st.buffer_capacity),
                        &clamp(st.targets),
                        &clamp(st.pending_results),
                        &(st.region_set_generation as i64),
                        &(st.agent_set_generation as i64),
                        &scope,
                        &generation,
                        &reason,
                    ],
                )
                .await?;
            }
        }
    }
    tx.commit().await?;
    Ok(())
}

/// One line of `vantage-ingester agents`.
#[derive(Debug, Clone)]
pub struct AgentLine {
    pub agent: String,
    pub region: String,
    pub version: Option<String>,
    pub online: bool,
    pub stale: bool,
    pub state: Option<String>,
    pub last_seen_ago_s: Option<f64>,
    pub first_seen: String,
    pub targets: Option<i32>,
    pub pending_results: Option<i32>,
    pub region_set_generation: Option<i64>,
    pub agent_set_generation: Option<i64>,
    pub rejection: Option<String>,
    /// The agent's clock state from its latest frame (migration 0013); None: none yet.
    pub clock: Option<ClockLine>,
}

/// An agent's clock as the fleet shows it (the `fleet` view's `clock_*` columns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockLine {
    pub synced: bool,
    pub error_ms: i32,
    pub offset_ms: i64,
    /// `offset`, `unsynced`, or None when fine.
    pub flag: Option<String>,
}

impl ClockLine {
    /// One short cell: the verdict (`ok`, `unsynced`, `OFFSET`), the offset from the bridge's
    /// clock and the kernel's maximum error, e.g. `ok +3ms ±12ms`, `OFFSET +7200s ±16s`. The
    /// CLI's CLOCK column and the dashboard's fleet page both show this.
    pub fn summary(&self) -> String {
        let verdict = match self.flag.as_deref() {
            Some("offset") => "OFFSET",
            Some(other) => other,
            None => "ok",
        };
        let offset = if self.offset_ms.unsigned_abs() < 10_000 {
            format!("{:+}ms", self.offset_ms)
        } else {
            format!("{:+}s", (self.offset_ms as f64 / 1000.0).round() as i64)
        };
        let error = if self.error_ms < 10_000 {
            format!("±{}ms", self.error_ms)
        } else {
            format!("±{}s", self.error_ms / 1000)
        };
        format!("{verdict} {offset} {error}")
    }
}

/// Every agent known, with `stale` set for an agent that says it is online but has not been
/// heard of for `stale_after`.
pub async fn list(client: &Client, stale_after: Duration) -> Result<Vec<AgentLine>, DbError> {
    let rows = client
        .query(
            "SELECT agent, region, version, online,
                    online AND (last_seen IS NULL OR last_seen < now() - make_interval(secs => $1)),
                    state, extract(epoch FROM now() - last_seen)::float8,
                    to_char(first_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'),
                    targets, pending_results, region_set_generation, agent_set_generation,
                    CASE WHEN rejection IS NULL THEN NULL
                         ELSE rejected_scope || ' set ' || rejected_generation || ': ' || rejection END,
                    clock_synced, clock_error_ms, clock_offset_ms, clock_flag
               FROM agents ORDER BY region, agent",
            &[&stale_after.as_secs_f64()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| AgentLine {
            agent: r.get(0),
            region: r.get(1),
            version: r.get(2),
            online: r.get(3),
            stale: r.get::<_, Option<bool>>(4).unwrap_or(false),
            state: r.get(5),
            last_seen_ago_s: r.get(6),
            first_seen: r.get(7),
            targets: r.get(8),
            pending_results: r.get(9),
            region_set_generation: r.get(10),
            agent_set_generation: r.get(11),
            rejection: r.get(12),
            clock: match (r.get(13), r.get(14), r.get(15)) {
                (Some(synced), Some(error_ms), Some(offset_ms)) => Some(ClockLine {
                    synced,
                    error_ms,
                    offset_ms,
                    flag: r.get(16),
                }),
                _ => None,
            },
        })
        .collect())
}

/// The agents table as aligned text; stale agents are flagged in the STATUS column.
pub fn render(lines: &[AgentLine]) -> String {
    let mut rows = vec![[
        "AGENT",
        "REGION",
        "STATUS",
        "LAST SEEN",
        "VERSION",
        "TARGETS",
        "PENDING",
        "SETS",
        "CLOCK",
        "FIRST SEEN",
        "REJECTED SET",
    ]
    .map(String::from)];
    for l in lines {
        let status = if l.stale {
            "STALE".to_owned()
        } else if l.online {
            "online".to_owned()
        } else if let Some(state) = l.state.as_deref().filter(|s| *s != "offline") {
            // Not a clean stop: say how it went offline (e.g. "lost": the last will).
            format!("offline ({state})")
        } else if l.state.is_some() {
            "offline".to_owned()
        } else {
            "unknown".to_owned()
        };
        let opt = |v: Option<i32>| v.map_or("-".into(), |v| v.to_string());
        rows.push([
            l.agent.clone(),
            l.region.clone(),
            status,
            l.last_seen_ago_s
                .map_or("never".into(), |s| format!("{}s ago", s.round() as i64)),
            l.version.clone().unwrap_or_else(|| "-".into()),
            opt(l.targets),
            opt(l.pending_results),
            format!(
                "{}/{}",
                l.region_set_generation.unwrap_or(0),
                l.agent_set_generation.unwrap_or(0)
            ),
            l.clock.as_ref().map_or("-".into(), ClockLine::summary),
            l.first_seen.clone(),
            l.rejection.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    crate::table::align(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_cell_says_the_verdict_the_offset_and_the_error() {
        let line = |flag: Option<&str>, offset_ms, error_ms| ClockLine {
            synced: flag.is_none(),
            error_ms,
            offset_ms,
            flag: flag.map(str::to_owned),
        };
        assert_eq!(line(None, 3, 12).summary(), "ok +3ms ±12ms");
        assert_eq!(
            line(Some("unsynced"), -4, 16_000).summary(),
            "unsynced -4ms ±16s"
        );
        assert_eq!(
            line(Some("offset"), 7_199_999, 16_000).summary(),
            "OFFSET +7200s ±16s"
        );
    }
}
