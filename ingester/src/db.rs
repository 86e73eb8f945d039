//! PostgreSQL: connecting, applying `migrations/`, and the one statement that writes results.
//!
//! Raw SQL through tokio-postgres, no ORM. Only this module contains SQL that writes results.

use std::time::{Duration, SystemTime};

use tokio_postgres::{Client, NoTls};
use vantage_proto::{Gap, ProbeResult};

use crate::config::PostgresConfig;

/// Every migration, in order. `migrations_match_directory` (below) fails if a file in
/// `migrations/` is missing here.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "0001_results.sql",
        include_str!("../../migrations/0001_results.sql"),
    ),
    (
        2,
        "0002_phases_gaps.sql",
        include_str!("../../migrations/0002_phases_gaps.sql"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("migration {name} failed: {source}")]
    Migration {
        name: &'static str,
        source: tokio_postgres::Error,
    },
}

impl DbError {
    /// Errors worth retrying with backoff: the connection or server, not our data or schema.
    pub fn is_transient(&self) -> bool {
        let e = match self {
            DbError::Postgres(e) => e,
            DbError::Migration { .. } => return false,
        };
        if e.is_closed() {
            return true;
        }
        match e.code() {
            // No SQLSTATE: I/O, connect or protocol-level failure.
            None => true,
            Some(code) => {
                let c = code.code();
                // 08: connection exception, 53: insufficient resources, 57P: operator
                // intervention (shutdown, restart), 40: transaction rollback (serialization,
                // deadlock).
                c.starts_with("08")
                    || c.starts_with("53")
                    || c.starts_with("57P")
                    || c.starts_with("40")
            }
        }
    }
}

/// One result with the identity the bridge attached to it.
#[derive(Debug, Clone)]
pub struct Row {
    pub region: String,
    pub agent: String,
    pub boot_id: u64,
    pub result: ProbeResult,
}

/// One gap record (results an agent dropped) with the identity the bridge attached to it.
#[derive(Debug, Clone)]
pub struct GapRow {
    pub region: String,
    pub agent: String,
    pub boot_id: u64,
    pub gap: Gap,
}

/// What one transaction inserted; the rest were already stored (replays).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inserted {
    pub results: u64,
    pub gaps: u64,
}

/// Opens a connection whose `search_path` is the configured schema.
pub async fn connect(config: &PostgresConfig) -> Result<Client, DbError> {
    let mut pg: tokio_postgres::Config = config.url.parse().map_err(DbError::Postgres)?;
    if let Some(password) = &config.password {
        pg.password(password);
    }
    pg.connect_timeout(Duration::from_secs(10));
    pg.application_name("vantage-ingester");
    let (client, connection) = pg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    // The schema name is validated at config load (a-z, 0-9, '_'), so it is safe to splice.
    client
        .batch_execute(&format!("SET search_path TO {}", config.schema))
        .await?;
    Ok(client)
}

/// Creates `schema` (the one [`connect`] put on the search path) if needed and applies the
/// migrations not yet applied, each in its own transaction, under an advisory lock
/// so that two sinks starting together do not race. Returns how many it applied.
pub async fn migrate(client: &mut Client, schema: &str) -> Result<usize, DbError> {
    client
        .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
    let mut applied = 0;
    for &(version, name, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        // Lock key: the schema name, so tests in separate schemas do not wait on each other.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext(current_schema()))",
            &[],
        )
        .await?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[&version],
            )
            .await?
            .is_some();
        if done {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(|source| DbError::Migration { name, source })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(migration = name, "migration applied");
        applied += 1;
    }
    Ok(applied)
}

/// Writes `rows` and `gaps` in one transaction; rows already present (same agent, boot id,
/// sequence) are skipped, including duplicates inside `rows`, and so are gaps.
///
/// One `INSERT … SELECT FROM unnest(arrays)` statement per table: one round trip per batch.
pub async fn insert_batch(
    client: &mut Client,
    rows: &[Row],
    gaps: &[GapRow],
) -> Result<Inserted, DbError> {
    let n = rows.len();
    let mut region = Vec::with_capacity(n);
    let mut agent = Vec::with_capacity(n);
    let mut boot_id = Vec::with_capacity(n);
    let mut seq = Vec::with_capacity(n);
    let mut target_id = Vec::with_capacity(n);
    let mut started_at = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut outcome = Vec::with_capacity(n);
    let mut regex_match = Vec::with_capacity(n);
    let mut total_us = Vec::with_capacity(n);
    let mut dns_us = Vec::with_capacity(n);
    let mut connect_us = Vec::with_capacity(n);
    let mut tls_us = Vec::with_capacity(n);
    let mut ttfb_us = Vec::with_capacity(n);
    let mut body_bytes = Vec::with_capacity(n);
    let mut failed_phase = Vec::with_capacity(n);
    let mut transfer_us = Vec::with_capacity(n);
    let mut body_truncated = Vec::with_capacity(n);
    let mut redirects = Vec::with_capacity(n);
    let mut cert_not_after = Vec::with_capacity(n);
    let mut remote_ip = Vec::with_capacity(n);
    for row in rows {
        let r = &row.result;
        region.push(row.region.as_str());
        agent.push(row.agent.as_str());
        boot_id.push(row.boot_id as i64);
        seq.push(r.seq as i64);
        target_id.push(r.target_id as i32);
        started_at.push(unix_ms(r.started_at_ms));
        status.push((r.status != 0).then_some(r.status as i16));
        outcome.push(r.outcome.as_str());
        regex_match.push(match r.regex {
            vantage_proto::RegexOutcome::NotConfigured => None,
            vantage_proto::RegexOutcome::Matched => Some(true),
            vantage_proto::RegexOutcome::NotMatched => Some(false),
        });
        total_us.push(clamp_i32(r.total_us));
        dns_us.push(r.dns_us.map(clamp_i32));
        connect_us.push(r.connect_us.map(clamp_i32));
        tls_us.push(r.tls_us.map(clamp_i32));
        ttfb_us.push(r.ttfb_us.map(clamp_i32));
        body_bytes.push(clamp_i32(r.body_bytes));
        failed_phase.push(r.failed_phase.map(|p| p.as_str()));
        transfer_us.push(r.transfer_us.map(clamp_i32));
        body_truncated.push(r.body_truncated);
        redirects.push(i16::from(r.redirects));
        cert_not_after.push(
            r.cert_not_after_s
                .and_then(|s| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(s))),
        );
        remote_ip.push(r.remote_ip.map(std::net::IpAddr::from));
    }
    let tx = client.transaction().await?;
    let mut inserted = Inserted::default();
    if !rows.is_empty() {
        inserted.results = tx
            .execute(
                "INSERT INTO results (region, agent, boot_id, seq, target_id, started_at, status,
                                      outcome, regex_match, total_us, dns_us, connect_us, tls_us,
                                      ttfb_us, body_bytes, failed_phase, transfer_us,
                                      body_truncated, redirects, cert_not_after, remote_ip)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int4[],
                                      $6::timestamptz[], $7::int2[], $8::text[], $9::bool[],
                                      $10::int4[], $11::int4[], $12::int4[], $13::int4[],
                                      $14::int4[], $15::int4[], $16::text[], $17::int4[],
                                      $18::bool[], $19::int2[], $20::timestamptz[], $21::inet[])
                 ON CONFLICT DO NOTHING",
                &[
                    &region,
                    &agent,
                    &boot_id,
                    &seq,
                    &target_id,
                    &started_at,
                    &status,
                    &outcome,
                    &regex_match,
                    &total_us,
                    &dns_us,
                    &connect_us,
                    &tls_us,
                    &ttfb_us,
                    &body_bytes,
                    &failed_phase,
                    &transfer_us,
                    &body_truncated,
                    &redirects,
                    &cert_not_after,
                    &remote_ip,
                ],
            )
            .await?;
    }
    for g in gaps {
        inserted.gaps += tx
            .execute(
                "INSERT INTO gaps (region, agent, boot_id, first_seq, dropped, first_started_at,
                                   last_started_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT DO NOTHING",
                &[
                    &g.region,
                    &g.agent,
                    &(g.boot_id as i64),
                    &(g.gap.first_seq as i64),
                    &clamp_i32(g.gap.count),
                    &unix_ms(g.gap.first_started_at_ms),
                    &unix_ms(g.gap.last_started_at_ms),
                ],
            )
            .await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

fn unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// Microsecond values above i32::MAX (35 minutes) are clamped; no probe runs that long.
fn clamp_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_match_directory() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<&str> = MIGRATIONS.iter().map(|m| m.1).collect();
        assert_eq!(files, listed);
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.0 as usize, i + 1, "versions are 1, 2, 3...");
            assert!(m.1.starts_with(&format!("{:04}_", m.0)));
        }
    }
}
