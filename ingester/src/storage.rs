//! Storage upkeep: partitions ahead of time, retention by dropping whole partitions, the rollup
//! round that materialises rollups behind a watermark, and the batched move of pre-0009 data.
//!
//! The work itself is in SQL (`vantage_ensure_partitions`, `vantage_apply_retention`,
//! `vantage_rollup_round`, `vantage_migrate_v8`; migrations 0003, 0005, 0009 and 0011), so it can also
//! be run by hand or from cron with psql; this module calls it, runs it periodically next to the
//! sink on connections of its own (reconnecting with backoff when PostgreSQL restarts), and
//! reports what it did. Rollup rounds run every `storage.rollup_interval` (they read only what
//! was written since the last round); partitions and retention every `storage.upkeep_interval`.

use std::time::{Duration, SystemTime};

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use vantage_common::backoff::Backoff;
use vantage_common::signal::sleep_unless_stopped;

use crate::config::PostgresConfig;
use crate::db::{self, DbError};

pub use crate::config::storage::{Setting, StorageConfig};

/// Something retention removed (or, in a dry run, would remove).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// A dropped partition, or a table whose expired rows were deleted (`results_default`,
    /// `gaps`, ...).
    pub relation: String,
    pub rows: i64,
}

/// What one round of upkeep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upkeep {
    /// Partitions created (ahead, and for default-partition rows inside the window).
    pub created: i32,
    pub removed: Vec<Removed>,
    /// The rollup round of this upkeep.
    pub round: Round,
    /// Rows of pre-0009 tables moved into the new ones by this upkeep.
    pub migrated: i64,
    /// Rows left in `results_default` after adoption: times outside the window upkeep adopts
    /// (written by something other than the sink, whose clock check refuses such times).
    pub waiting: i64,
}

impl Upkeep {
    /// Lines for `vantage-ingester maintain` (`dry_run`: what would be removed).
    pub fn render(&self, dry_run: bool) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let verb = if dry_run { "would remove" } else { "removed" };
        if !dry_run {
            let _ = writeln!(out, "{} partitions created", self.created);
        }
        let _ = writeln!(
            out,
            "{} partitions dropped{}",
            self.removed
                .iter()
                .filter(|r| !is_table(&r.relation))
                .count(),
            if dry_run {
                " (dry run: nothing changed)"
            } else {
                ""
            }
        );
        for r in &self.removed {
            if is_table(&r.relation) {
                let _ = writeln!(
                    out,
                    "{verb} {} rows past retention from {}",
                    r.rows, r.relation
                );
            } else {
                let _ = writeln!(out, "{verb} partition {} ({} rows)", r.relation, r.rows);
            }
        }
        if !dry_run {
            let r = &self.round;
            let _ = writeln!(
                out,
                "rollup round: {} writes consumed, {} hourly rows ({} late), {} daily rows, {} latest, materialised through {}",
                r.consumed, r.hours, r.late_hours, r.days, r.latest, r.hour_through
            );
            if self.migrated > 0 {
                let _ = writeln!(out, "{} rows moved from the pre-0009 tables", self.migrated);
            }
        }
        if self.waiting > 0 {
            let _ = writeln!(
                out,
                "{} rows wait in results_default outside the adoption window (see docs/sql.md)",
                self.waiting
            );
        }
        out
    }
}

/// Tables retention deletes expired rows from (as opposed to partitions it drops).
fn is_table(relation: &str) -> bool {
    relation == "gaps" || relation.ends_with("_default")
}

/// Creates missing partitions (today − 1 .. today + `partitions_ahead`) and moves rows waiting
/// in a default partition into theirs, but only those from `raw_retention` back to
/// `partitions_ahead` ahead. Returns how many partitions it created.
pub async fn ensure_partitions(client: &Client, config: &StorageConfig) -> Result<i32, DbError> {
    let ahead = i32::try_from(config.partitions_ahead).unwrap_or(i32::MAX);
    let row = client
        .query_one(
            "SELECT vantage_ensure_partitions($1, 1, $2)",
            &[&ahead, &config.keep_days()],
        )
        .await?;
    Ok(row.get(0))
}

/// Drops expired partitions and deletes expired rows from the default partitions and `gaps`
/// (with `dry_run`, only says what it would remove).
pub async fn apply_retention(
    client: &Client,
    config: &StorageConfig,
    dry_run: bool,
) -> Result<Vec<Removed>, DbError> {
    let rows = client
        .query(
            "SELECT relation, removed_rows FROM vantage_apply_retention(
                 make_interval(secs => $1), make_interval(secs => $2), $3,
                 make_interval(secs => $4))",
            &[
                &config.raw_retention.as_secs_f64(),
                &config.rollup_retention.as_secs_f64(),
                &dry_run,
                &config.daily_retention.as_secs_f64(),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Removed {
            relation: r.get(0),
            rows: r.get(1),
        })
        .collect())
}

/// What one rollup round did (`vantage_rollup_round`, migration 0009).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// Another round was running (another sink's upkeep): this one did nothing.
    pub skipped: bool,
    /// Pending rows (one per write transaction) consumed.
    pub consumed: i64,
    /// Hourly rows materialised for the hours that closed.
    pub hours: i64,
    /// Hourly rows recomputed because late data arrived for them.
    pub late_hours: i64,
    /// Daily rows written.
    pub days: i64,
    /// `latest_results` rows changed.
    pub latest: i64,
    /// The watermark after the round (hourly rows exist for the hours before it).
    pub hour_through: String,
}

/// Hours that ended this long ago are materialised (results still on their way count as late
/// data, which costs a recount of their bucket).
const ROUND_GRACE_SECS: f64 = 120.0;

/// Runs one rollup round (its own transaction when `client` is not in one).
pub async fn rollup_round(client: &Client) -> Result<Round, DbError> {
    let r = client
        .query_one(
            "SELECT skipped, consumed, hours, late_hours, days, latest, hour_through::text
               FROM vantage_rollup_round(make_interval(secs => $1))",
            &[&ROUND_GRACE_SECS],
        )
        .await?;
    Ok(Round {
        skipped: r.get(0),
        consumed: r.get(1),
        hours: r.get(2),
        late_hours: r.get(3),
        days: r.get(4),
        latest: r.get(5),
        hour_through: r.get(6),
    })
}

/// Moves pre-0009 data in batches of `batch` rows, each its own transaction, for at most
/// `budget`; returns the rows moved (the rest waits for the next upkeep).
pub async fn migrate_v8(client: &Client, batch: i32, budget: Duration) -> Result<i64, DbError> {
    let started = std::time::Instant::now();
    let mut moved = 0;
    loop {
        let n: i64 = client
            .query_one("SELECT vantage_migrate_v8($1)", &[&batch])
            .await?
            .get(0);
        moved += n;
        if n == 0 || started.elapsed() >= budget {
            return Ok(moved);
        }
    }
}

/// One round of upkeep: partitions first, then the move of pre-0009 data, retention, and a
/// rollup round. With `dry_run`, only retention runs, reporting what it would remove; nothing
/// changes.
pub async fn maintain(
    client: &Client,
    config: &StorageConfig,
    dry_run: bool,
) -> Result<Upkeep, DbError> {
    let mut upkeep = Upkeep::default();
    if !dry_run {
        upkeep.created = ensure_partitions(client, config).await?;
        upkeep.migrated = migrate_v8(client, 50_000, Duration::from_secs(60)).await?;
    }
    if !dry_run {
        // Before retention: the hours of raw rows about to go are materialised first.
        upkeep.round = rollup_round(client).await?;
    }
    upkeep.removed = apply_retention(client, config, dry_run).await?;
    upkeep.waiting = client
        .query_one("SELECT count(*) FROM results_default", &[])
        .await?
        .get(0);
    Ok(upkeep)
}

/// Runs [`maintain`] every `config.interval` until `shutdown`, on a connection of its own.
///
/// The connection is opened here and opened again whenever it is lost (a PostgreSQL restart
/// closes it): with backoff from 1 s, capped at a minute and at `interval`. A failure of a round
/// is logged and retried the same way when it was transient (the connection, a restart), at
/// the next round otherwise. Upkeep running late never blocks writes: rows without a partition
/// go to the default partition and are moved later.
pub async fn run(pg: PostgresConfig, config: StorageConfig, shutdown: CancellationToken) {
    let mut client: Option<Client> = None;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        reopen(
            &mut client,
            &pg,
            "storage upkeep",
            backoff.peek().min(config.interval),
        )
        .await;
        let outcome = match &client {
            Some(c) => maintain(c, &config, false).await.map_err(Some),
            None => Err(None),
        };
        let wait = match outcome {
            Ok(upkeep) => {
                backoff.reset();
                crate::metrics::sink().upkeep_done(SystemTime::now(), upkeep.waiting);
                if upkeep.created > 0 || !upkeep.removed.is_empty() || upkeep.migrated > 0 {
                    tracing::info!(
                        created = upkeep.created,
                        removed = ?upkeep.removed,
                        migrated = upkeep.migrated,
                        "storage upkeep"
                    );
                }
                if upkeep.waiting > 0 {
                    tracing::warn!(
                        rows = upkeep.waiting,
                        "rows wait in results_default outside the adoption window"
                    );
                }
                config.interval
            }
            Err(e) => {
                crate::metrics::sink().upkeep_failures.inc();
                let transient = e.as_ref().is_none_or(DbError::is_transient);
                if let Some(e) = &e {
                    tracing::warn!(error = %e, transient, "storage upkeep failed");
                }
                if transient {
                    backoff.next_pause().min(config.interval)
                } else {
                    config.interval
                }
            }
        };
        if !sleep_unless_stopped(&shutdown, wait).await {
            return;
        }
    }
}

/// Opens `client` again when it is missing or closed (a PostgreSQL restart closes it); leaves
/// it None when PostgreSQL cannot be reached, logged for `what` with the pause until the next
/// try (`retry_in`).
async fn reopen(client: &mut Option<Client>, pg: &PostgresConfig, what: &str, retry_in: Duration) {
    if client.as_ref().is_none_or(Client::is_closed) {
        *client = match db::connect(pg).await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, ?retry_in, "{what} cannot connect to PostgreSQL");
                None
            }
        };
    }
}

/// Runs [`rollup_round`] every `config.rollup_interval` until `shutdown`, on a connection of its
/// own (opened again, with backoff, whenever it is lost). A failed round changes nothing (it is
/// one transaction): the next one does its work.
pub async fn run_rollups(pg: PostgresConfig, config: StorageConfig, shutdown: CancellationToken) {
    let mut client: Option<Client> = None;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        reopen(&mut client, &pg, "rollup round", backoff.peek()).await;
        let wait = match &client {
            Some(c) => match rollup_round(c).await {
                Ok(round) => {
                    backoff.reset();
                    if round.hours > 0 || round.late_hours > 0 {
                        tracing::info!(?round, "rollup round");
                    } else {
                        tracing::debug!(?round, "rollup round");
                    }
                    config.rollup_interval
                }
                Err(e) => {
                    tracing::warn!(error = %e, "rollup round failed");
                    backoff.next_pause().max(config.rollup_interval)
                }
            },
            None => backoff.next_pause(),
        };
        if !sleep_unless_stopped(&shutdown, wait).await {
            return;
        }
    }
}
