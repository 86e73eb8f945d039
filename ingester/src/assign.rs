//! The sink's check that a result's target is one its agent was given (issue #14): a compromised
//! agent must not write results for any target id (overwriting `latest_results` of targets it
//! never had, growing the tables, making any certificate look expiring).
//!
//! **When it applies.** Central targets are *in use* for a region once `targets apply` published
//! a set for it, i.e. `target_sets` has the region's row (a region listed in the targets file;
//! its set may be empty). Results from such a region must be for a target of the region's set or
//! of the agent's own (pinned) set. Regions that never got a set (standalone agents with local
//! `[[targets]]`) are not checked: their agents define their own targets. So a standalone agent
//! must not sit in a region the targets file lists; its results would be refused.
//!
//! **Right after an apply.** Results probed under the previous generation are still on their way
//! (in flight, or buffered in an agent that was offline). The sink keeps the history of every
//! set (`target_assignments`, kept by a trigger on `target_sets`, migration 0006) and accepts a
//! result of a target that left the agent's sets if it was probed no later than
//! [`UNASSIGNED_GRACE`] after it left (the agent needs a moment to receive the new set, and its
//! clock may be a little off). A result probed later than that (an agent that was offline at the
//! apply kept probing its old set) is dead-lettered as `unassigned_target`: the operator removed
//! that target, and the dead letter keeps the results.
//!
//! **Cost.** The assignments are cached. The cache is revalidated (one single-row query) at most
//! once a second and whenever a result would be refused, so a target added by an apply that
//! committed before the probe started is never refused; the assignments are re-read only when
//! their version (bumped by the same trigger) changed. Hits cost no query.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use vantage_common::backoff::Backoff;
use vantage_common::signal::sleep_unless_stopped;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::PostgresConfig;
use crate::db::{DbError, Row};

/// How long after a target left an agent's sets a result probed then is still accepted.
pub const UNASSIGNED_GRACE: Duration = Duration::from_secs(300);

/// The dead-letter reason of results for targets the agent was not given.
pub const UNASSIGNED_REASON: &str = "unassigned_target";

/// The cache is revalidated at least this often while results arrive.
const REVALIDATE_EVERY: Duration = Duration::from_secs(1);

/// Why [`Assignments::check`] could not decide.
#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    /// Shutdown while PostgreSQL was unavailable: the message must be left for replay.
    #[error("shutdown while PostgreSQL is unavailable")]
    Stopped,
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What the sets of one scope held: target id → `None` while held, else when it left (ms).
type Held = BTreeMap<u32, Option<i64>>;

/// The assignments as last read, and the connection they are read on.
pub struct Assignments {
    config: PostgresConfig,
    /// Assignments that ended longer ago than this are not read (results that old are past
    /// raw retention anyway).
    horizon: Duration,
    client: Option<Client>,
    version: Option<i64>,
    validated_at: Option<Instant>,
    /// Regions with a region set: central targets are in use there.
    managed: BTreeSet<String>,
    /// region → agent → what its set held; agent `""` is the region's set.
    held: BTreeMap<String, BTreeMap<String, Held>>,
}

impl Assignments {
    /// No connection yet: the first check opens its own (DDL-free reads, never behind a batch).
    pub fn new(config: &PostgresConfig, horizon: Duration) -> Assignments {
        Assignments {
            config: config.clone(),
            horizon,
            client: None,
            version: None,
            validated_at: None,
            managed: BTreeSet::new(),
            held: BTreeMap::new(),
        }
    }

    /// Splits the rows of one message (one region and agent) into those for targets the agent
    /// was given and those it was not. Waits (with backoff) while PostgreSQL is unavailable.
    pub async fn check(
        &mut self,
        rows: Vec<Row>,
        shutdown: &CancellationToken,
    ) -> Result<(Vec<Row>, Vec<Row>), AssignError> {
        if rows.is_empty() {
            return Ok((rows, Vec::new()));
        }
        let called = Instant::now();
        if self
            .validated_at
            .is_none_or(|t| called.duration_since(t) >= REVALIDATE_EVERY)
        {
            self.revalidate(shutdown).await?;
        }
        if rows.iter().all(|r| self.assigned(r)) {
            return Ok((rows, Vec::new()));
        }
        // A miss may be an apply newer than the cache: look again (unless that was just done).
        if self.validated_at.is_none_or(|t| t < called) {
            self.revalidate(shutdown).await?;
        }
        Ok(rows.into_iter().partition(|r| self.assigned(r)))
    }

    /// Whether the cache says `row`'s agent was given its target when it probed it.
    fn assigned(&self, row: &Row) -> bool {
        if !self.managed.contains(&row.region) {
            return true;
        }
        let id = row.result.target_id;
        let probed_ms = i64::try_from(row.result.started_at_ms).unwrap_or(i64::MAX);
        let grace_ms = UNASSIGNED_GRACE.as_millis() as i64;
        let Some(sets) = self.held.get(&row.region) else {
            return false;
        };
        [row.agent.as_str(), ""].iter().any(|agent| {
            sets.get(*agent)
                .and_then(|held| held.get(&id))
                .is_some_and(|until| match until {
                    None => true,
                    Some(left_ms) => probed_ms <= left_ms.saturating_add(grace_ms),
                })
        })
    }

    /// Reads the version and, if it changed, the assignments; retries transient errors.
    async fn revalidate(&mut self, shutdown: &CancellationToken) -> Result<(), AssignError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            match self.try_revalidate().await {
                Ok(()) => {
                    self.validated_at = Some(Instant::now());
                    return Ok(());
                }
                Err(e) if e.is_transient() => {
                    let pause = backoff.next_pause();
                    tracing::warn!(error = %e, retry_in = ?pause, "cannot read target assignments, retrying");
                    if self.client.as_ref().is_some_and(Client::is_closed) {
                        self.client = None;
                    }
                    if !sleep_unless_stopped(shutdown, pause).await {
                        return Err(AssignError::Stopped);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn try_revalidate(&mut self) -> Result<(), DbError> {
        if self.client.is_none() {
            self.client = Some(crate::db::connect(&self.config).await?);
        }
        let Some(client) = self.client.as_mut() else {
            return Ok(());
        };
        let version: i64 = client
            .query_one("SELECT version FROM target_assignments_version", &[])
            .await?
            .get(0);
        if self.version == Some(version) {
            return Ok(());
        }
        // One snapshot for the version and what it describes.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let version: i64 = tx
            .query_one("SELECT version FROM target_assignments_version", &[])
            .await?
            .get(0);
        let managed: BTreeSet<String> = tx
            .query("SELECT region FROM target_sets WHERE agent = ''", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let rows = tx
            .query(
                "SELECT region, agent, target_id,
                        (extract(epoch FROM unassigned_at) * 1000)::int8
                   FROM target_assignments
                  WHERE unassigned_at IS NULL
                     OR unassigned_at > now() - make_interval(secs => $1)",
                &[&self.horizon.as_secs_f64()],
            )
            .await?;
        tx.commit().await?;
        let mut held: BTreeMap<String, BTreeMap<String, Held>> = BTreeMap::new();
        for r in &rows {
            let id: i32 = r.get(2);
            let until: Option<i64> = r.get(3);
            let entry = held
                .entry(r.get(0))
                .or_default()
                .entry(r.get(1))
                .or_default()
                .entry(id as u32)
                .or_insert(until);
            // Several stints in one set: held now wins, else the latest end.
            *entry = match (*entry, until) {
                (None, _) | (_, None) => None,
                (Some(a), Some(b)) => Some(a.max(b)),
            };
        }
        tracing::debug!(
            version,
            regions = managed.len(),
            assignments = rows.len(),
            "target assignments read"
        );
        self.version = Some(version);
        self.managed = managed;
        self.held = held;
        Ok(())
    }
}

/// The refused results of one message as a frame of their own (same boot id), for the dead
/// letter: it holds exactly what was not written. None if `refused` is empty.
pub fn refused_frame(refused: &[Row]) -> Option<Vec<u8>> {
    let first = refused.first()?;
    let mut batch = vantage_proto::Batch {
        boot_id: first.boot_id,
        results: Default::default(),
        gaps: Default::default(),
        clock: None,
    };
    for r in refused {
        // Cannot overflow: they come from one frame, which had room for them.
        let _ = batch.results.push(r.result);
    }
    let mut buf = vec![0u8; vantage_proto::MAX_FRAME_LEN];
    vantage_proto::encode(&batch, &mut buf)
        .ok()
        .map(|f| f.to_vec())
}

/// A probe result for unit tests.
#[cfg(test)]
pub(crate) mod tests_support {
    pub fn result() -> vantage_proto::ProbeResult {
        vantage_proto::ProbeResult {
            status: 200,
            total_us: 1,
            ..vantage_proto::ProbeResult::without_response(0, 1, 1, vantage_proto::Outcome::Up)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(region: &str, agent: &str, target_id: u32, started_at_ms: u64) -> Row {
        Row {
            region: region.into(),
            agent: agent.into(),
            boot_id: 9,
            result: vantage_proto::ProbeResult {
                target_id,
                started_at_ms,
                ..tests_support::result()
            },
            clock_error_ms: None,
            clock_unsynced: None,
        }
    }

    fn cache(sets: &[(&str, &str, u32, Option<i64>)]) -> Assignments {
        let config = crate::config::Config::parse(
            "[postgres]\nurl = \"host=127.0.0.1 user=x dbname=x\"\ntls = \"disable\"\n",
            std::path::Path::new("i.toml"),
        )
        .unwrap();
        let mut a = Assignments::new(config.postgres().unwrap(), Duration::from_secs(86_400));
        for (region, agent, id, until) in sets {
            if agent.is_empty() {
                a.managed.insert((*region).to_owned());
            }
            a.held
                .entry((*region).to_owned())
                .or_default()
                .entry((*agent).to_owned())
                .or_default()
                .insert(*id, *until);
        }
        a
    }

    #[test]
    fn results_only_for_targets_the_agent_was_given() {
        let a = cache(&[
            ("eu", "", 1, None),
            ("eu", "pi-lab", 7, None),
            ("eu", "", 3, Some(1_000_000)),
        ]);
        // The region's set, the agent's own set.
        assert!(a.assigned(&row("eu", "pi", 1, 5)));
        assert!(a.assigned(&row("eu", "pi-lab", 7, 5)));
        // Another agent's pinned target, a target never given.
        assert!(!a.assigned(&row("eu", "pi", 7, 5)));
        assert!(!a.assigned(&row("eu", "pi", 2, 5)));
        // Removed at 1,000,000 ms: accepted if probed before that plus the grace.
        let grace = UNASSIGNED_GRACE.as_millis() as u64;
        assert!(a.assigned(&row("eu", "pi", 3, 999_999)));
        assert!(a.assigned(&row("eu", "pi", 3, 1_000_000 + grace)));
        assert!(!a.assigned(&row("eu", "pi", 3, 1_000_001 + grace)));
        // A region without a central set is not checked (standalone agents).
        assert!(a.assigned(&row("us", "pi", 12345, 5)));
    }

    #[test]
    fn the_dead_letter_holds_exactly_the_refused_results() {
        let refused = [row("eu", "pi", 2, 5), row("eu", "pi", 4, 6)];
        let frame = refused_frame(&refused).unwrap();
        let batch = vantage_proto::decode(&frame).unwrap();
        assert_eq!(batch.boot_id, 9);
        let ids: Vec<u32> = batch.results.iter().map(|r| r.target_id).collect();
        assert_eq!(ids, [2, 4]);
        assert!(refused_frame(&[]).is_none());
    }
}
