//! Storage upkeep: partitions ahead of time, retention by dropping whole partitions, and
//! compaction of the partial rollup rows the insert trigger appends.
//!
//! The work itself is in SQL (`migrations/0003_storage.sql`: `vantage_ensure_partitions`,
//! `vantage_apply_retention`, `vantage_compact_rollups`), so it can also be run by hand or from cron with psql; this module
//! calls it and runs it periodically next to the sink.

use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::db::DbError;

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
            raw_retention: Duration::from_secs(30 * 86_400),
            rollup_retention: Duration::from_secs(400 * 86_400),
            partitions_ahead: 7,
            interval: Duration::from_secs(600),
        }
    }
}

/// Creates missing partitions (today − 1 .. today + `ahead`, and any day that has rows waiting
/// in a default partition). Returns how many it created.
pub async fn ensure_partitions(client: &Client, ahead: u32) -> Result<i32, DbError> {
    let ahead = i32::try_from(ahead).unwrap_or(i32::MAX);
    let row = client
        .query_one("SELECT vantage_ensure_partitions($1, 1)", &[&ahead])
        .await?;
    Ok(row.get(0))
}

/// Drops expired partitions; returns their names.
pub async fn apply_retention(
    client: &Client,
    raw_keep: Duration,
    hourly_keep: Duration,
) -> Result<Vec<String>, DbError> {
    let rows = client
        .query(
            "SELECT vantage_apply_retention(make_interval(secs => $1), make_interval(secs => $2))",
            &[&raw_keep.as_secs_f64(), &hourly_keep.as_secs_f64()],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Merges the partial rollup rows of finished buckets; returns how many rows it removed.
pub async fn compact_rollups(client: &Client) -> Result<i64, DbError> {
    Ok(client
        .query_one("SELECT vantage_compact_rollups()", &[])
        .await?
        .get(0))
}

/// One round of upkeep: partitions first, then retention, then rollup compaction.
pub async fn maintain(client: &Client, config: &StorageConfig) -> Result<(), DbError> {
    let created = ensure_partitions(client, config.partitions_ahead).await?;
    let dropped = apply_retention(client, config.raw_retention, config.rollup_retention).await?;
    let compacted = compact_rollups(client).await?;
    if created > 0 || !dropped.is_empty() || compacted > 0 {
        tracing::info!(created, ?dropped, compacted, "storage upkeep");
    }
    Ok(())
}

/// Runs [`maintain`] every `config.interval` until `shutdown`. Failures are logged and retried at
/// the next round: upkeep running late never blocks writes (rows without a partition go to the
/// default partition and are moved later).
pub async fn run(client: Client, config: StorageConfig, shutdown: CancellationToken) {
    loop {
        if let Err(e) = maintain(&client, &config).await {
            tracing::warn!(error = %e, "storage upkeep failed; retrying at the next round");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(config.interval) => {}
        }
    }
}
