//! Storage upkeep: partitions ahead of time, retention by dropping whole partitions, and
//! compaction of the partial rollup rows the insert trigger appends.
//!
//! The work itself is in SQL (`vantage_ensure_partitions`, `vantage_apply_retention`,
//! `vantage_compact_rollups`; migrations 0003 and 0005), so it can also be run by hand or from
//! cron with psql; this module calls it, runs it periodically next to the sink on a connection
//! of its own (reconnecting with backoff when PostgreSQL restarts), and reports what it removed.

use std::time::{Duration, SystemTime};

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::PostgresConfig;
use crate::db::{self, DbError};

const DAY: Duration = Duration::from_secs(86_400);

/// How partitions and retention are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// Raw results, gap records and 1-minute rollups older than this are dropped (default 30 days).
    pub raw_retention: Duration,
    /// 1-hour rollups older than this are dropped (default 400 days).
    pub rollup_retention: Duration,
    /// Days of partitions created ahead of today (default 7): an insert never waits for DDL.
    pub partitions_ahead: u32,
    /// How often upkeep runs (default 10 minutes).
    pub interval: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            raw_retention: 30 * DAY,
            rollup_retention: 400 * DAY,
            partitions_ahead: 7,
            interval: Duration::from_secs(600),
        }
    }
}

/// A setting of [`StorageConfig`], named as the config file and `maintain`'s flags name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    RawRetention,
    RollupRetention,
    PartitionsAhead,
    Interval,
}

impl Setting {
    /// The key in the config file.
    pub fn key(self) -> &'static str {
        match self {
            Setting::RawRetention => "storage.raw_retention",
            Setting::RollupRetention => "storage.rollup_retention",
            Setting::PartitionsAhead => "storage.partitions_ahead",
            Setting::Interval => "storage.upkeep_interval",
        }
    }

    /// The flag of `vantage-ingester maintain` that overrides it, if any.
    pub fn flag(self) -> Option<&'static str> {
        match self {
            Setting::RawRetention => Some("--raw-retention"),
            Setting::RollupRetention => Some("--rollup-retention"),
            Setting::PartitionsAhead => Some("--ahead"),
            Setting::Interval => None,
        }
    }
}

impl StorageConfig {
    /// Checks every limit; the config file and `maintain`'s flags go through this one check, so
    /// a flag can never do what the file may not.
    pub fn check(&self) -> Result<(), (Setting, String)> {
        if self.raw_retention < DAY {
            return Err((
                Setting::RawRetention,
                "must be at least 1 day (partitions are whole days)".into(),
            ));
        }
        if self.rollup_retention < self.raw_retention {
            return Err((
                Setting::RollupRetention,
                format!(
                    "{} must not be shorter than raw_retention ({})",
                    show(self.rollup_retention),
                    show(self.raw_retention)
                ),
            ));
        }
        if self.partitions_ahead == 0 || self.partitions_ahead > 366 {
            return Err((Setting::PartitionsAhead, "must be 1..=366".into()));
        }
        if self.interval < Duration::from_secs(1) {
            return Err((Setting::Interval, "must be at least 1s".into()));
        }
        Ok(())
    }

    /// Whole days of raw data retention keeps (rounded up): the window upkeep adopts
    /// default-partition rows from.
    pub fn keep_days(&self) -> i32 {
        i32::try_from(self.raw_retention.as_secs().div_ceil(DAY.as_secs())).unwrap_or(i32::MAX)
    }
}

/// `30d` for whole days, else humantime's form (`36h`: not `1day 12h`).
fn show(d: Duration) -> String {
    if d.as_secs() % DAY.as_secs() == 0 && d.subsec_nanos() == 0 {
        format!("{}d", d.as_secs() / DAY.as_secs())
    } else {
        humantime::format_duration(d).to_string()
    }
}

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
    /// Partial rollup rows merged away.
    pub compacted: i64,
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
        if !dry_run && self.compacted > 0 {
            let _ = writeln!(out, "{} partial rollup rows compacted", self.compacted);
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
    raw_keep: Duration,
    hourly_keep: Duration,
    dry_run: bool,
) -> Result<Vec<Removed>, DbError> {
    let rows = client
        .query(
            "SELECT relation, removed_rows FROM vantage_apply_retention(
                 make_interval(secs => $1), make_interval(secs => $2), $3)",
            &[
                &raw_keep.as_secs_f64(),
                &hourly_keep.as_secs_f64(),
                &dry_run,
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

/// Merges the partial rollup rows of finished buckets; returns how many rows it removed.
pub async fn compact_rollups(client: &Client) -> Result<i64, DbError> {
    Ok(client
        .query_one("SELECT vantage_compact_rollups()", &[])
        .await?
        .get(0))
}

/// One round of upkeep: partitions first, then retention, then rollup compaction. With
/// `dry_run`, only retention runs, reporting what it would remove; nothing changes.
pub async fn maintain(
    client: &Client,
    config: &StorageConfig,
    dry_run: bool,
) -> Result<Upkeep, DbError> {
    let mut upkeep = Upkeep::default();
    if !dry_run {
        upkeep.created = ensure_partitions(client, config).await?;
    }
    upkeep.removed = apply_retention(
        client,
        config.raw_retention,
        config.rollup_retention,
        dry_run,
    )
    .await?;
    if !dry_run {
        upkeep.compacted = compact_rollups(client).await?;
    }
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
    const FIRST_RETRY: Duration = Duration::from_secs(1);
    let mut client: Option<Client> = None;
    let mut backoff = FIRST_RETRY;
    loop {
        if client.as_ref().is_none_or(Client::is_closed) {
            client = match db::connect(&pg).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "storage upkeep cannot connect to PostgreSQL");
                    None
                }
            };
        }
        let outcome = match &client {
            Some(c) => maintain(c, &config, false).await.map_err(Some),
            None => Err(None),
        };
        let wait = match outcome {
            Ok(upkeep) => {
                backoff = FIRST_RETRY;
                crate::metrics::sink().upkeep_done(SystemTime::now(), upkeep.waiting);
                if upkeep.created > 0 || !upkeep.removed.is_empty() || upkeep.compacted > 0 {
                    tracing::info!(
                        created = upkeep.created,
                        removed = ?upkeep.removed,
                        compacted = upkeep.compacted,
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
                    let wait = backoff.min(config.interval);
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    wait
                } else {
                    config.interval
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_name_the_setting() {
        let ok = StorageConfig::default();
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(ok.keep_days(), 30);
        let short = StorageConfig {
            raw_retention: Duration::from_secs(3600),
            ..ok.clone()
        };
        assert_eq!(short.check().unwrap_err().0, Setting::RawRetention);
        let crossed = StorageConfig {
            raw_retention: 500 * DAY,
            ..ok.clone()
        };
        let (setting, reason) = crossed.check().unwrap_err();
        assert_eq!(setting, Setting::RollupRetention);
        assert_eq!(reason, "400d must not be shorter than raw_retention (500d)");
        let none_ahead = StorageConfig {
            partitions_ahead: 0,
            ..ok.clone()
        };
        assert_eq!(none_ahead.check().unwrap_err().0.flag(), Some("--ahead"));
        // Part of a day counts as a day kept.
        let odd = StorageConfig {
            raw_retention: 30 * DAY + Duration::from_secs(1),
            ..ok
        };
        assert_eq!(odd.keep_days(), 31);
    }
}
