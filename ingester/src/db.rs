//! PostgreSQL: connecting, applying `migrations/`, and the statements that write results.
//!
//! Raw SQL through tokio-postgres, no ORM. Only this module contains SQL that writes results.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use tokio_postgres::{Client, NoTls};
use vantage_proto::{Gap, ProbeKind, ProbeResult};

use crate::config::{PgTls, PostgresConfig};

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
    (
        3,
        "0003_storage.sql",
        include_str!("../../migrations/0003_storage.sql"),
    ),
    (
        4,
        "0004_fleet_targets.sql",
        include_str!("../../migrations/0004_fleet_targets.sql"),
    ),
    (
        5,
        "0005_clock_upkeep.sql",
        include_str!("../../migrations/0005_clock_upkeep.sql"),
    ),
    (
        6,
        "0006_assigned_targets.sql",
        include_str!("../../migrations/0006_assigned_targets.sql"),
    ),
    (
        7,
        "0007_alerts.sql",
        include_str!("../../migrations/0007_alerts.sql"),
    ),
    (
        8,
        "0008_web.sql",
        include_str!("../../migrations/0008_web.sql"),
    ),
    (
        9,
        "0009_compact_storage.sql",
        include_str!("../../migrations/0009_compact_storage.sql"),
    ),
    (
        10,
        "0010_seen_targets.sql",
        include_str!("../../migrations/0010_seen_targets.sql"),
    ),
    (
        11,
        "0011_upkeep_yields.sql",
        include_str!("../../migrations/0011_upkeep_yields.sql"),
    ),
    (
        12,
        "0012_alert_reads.sql",
        include_str!("../../migrations/0012_alert_reads.sql"),
    ),
    (
        13,
        "0013_clock_health.sql",
        include_str!("../../migrations/0013_clock_health.sql"),
    ),
    (
        14,
        "0014_kept_windows.sql",
        include_str!("../../migrations/0014_kept_windows.sql"),
    ),
    (
        15,
        "0015_web_reads.sql",
        include_str!("../../migrations/0015_web_reads.sql"),
    ),
    (
        16,
        "0016_probe_kinds.sql",
        include_str!("../../migrations/0016_probe_kinds.sql"),
    ),
    (
        17,
        "0017_dns.sql",
        include_str!("../../migrations/0017_dns.sql"),
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
    /// A migration this database applied has different contents in this binary: someone edited
    /// a released file instead of adding a new one. Applying on top of an unknown schema is how
    /// data gets lost, so the ingester refuses to start.
    #[error(
        "migration {name} was edited after it was applied (checksum in schema_migrations \
         {applied}, in this binary {current}): migrations are never edited once released; \
         restore the file and put the change in a new migration"
    )]
    MigrationEdited {
        name: &'static str,
        applied: String,
        current: String,
    },
}

/// SHA-256 of a migration's text, hex: what `schema_migrations.checksum` records.
pub fn migration_checksum(sql: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, sql.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl DbError {
    /// Errors worth retrying with backoff: the connection or server, not our data or schema.
    pub fn is_transient(&self) -> bool {
        let e = match self {
            DbError::Postgres(e) => e,
            // A migration cut off by a restart is retried; one PostgreSQL refuses is not.
            DbError::Migration { source, .. } => source,
            DbError::MigrationEdited { .. } => return false,
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
                // deadlock), 55P03: a lock not granted within lock_timeout (upkeep yielding to
                // readers, migration 0011).
                c.starts_with("08")
                    || c.starts_with("53")
                    || c.starts_with("57P")
                    || c.starts_with("40")
                    || c == "55P03"
            }
        }
    }
}

impl DbError {
    /// `(SQLSTATE, server message)` when PostgreSQL refused the data itself: a value, a
    /// constraint or a trigger, so the same records would be refused on every retry. SQLSTATE
    /// classes 22 (data exception), 23 (integrity constraint violation), 54 (program limit
    /// exceeded, e.g. a row too large for an index) and P0 (a PL/pgSQL `RAISE`, as a checking
    /// trigger raises). Other permanent errors (a missing table, permissions, a full disk) are
    /// about the schema or the server, not a record: None.
    pub fn refusal(&self) -> Option<(String, String)> {
        let DbError::Postgres(e) = self else {
            return None;
        };
        let db = e.as_db_error()?;
        let code = db.code().code();
        ["22", "23", "54", "P0"]
            .iter()
            .any(|class| code.starts_with(class))
            .then(|| (code.to_owned(), db.message().to_owned()))
    }
}

/// Narrows a write PostgreSQL refused down to the records it refuses, by halving.
///
/// The batch is records `0..len`. [`Bisect::next`] is the range to write now; after writing it
/// the caller reports [`Bisect::written`], or [`Bisect::refused`] when PostgreSQL refused it
/// ([`DbError::refusal`]): the range is then split in two halves, each written on its own,
/// down to single records, which are given up. What was written stays written (each range is
/// its own transaction), and ranges come in order, so records are written in their original
/// order (statuses depend on it). A transient error leaves the state as it is: the caller
/// retries the same range. No I/O, so it is tested without PostgreSQL. With k refused records
/// a batch of n costs about 2·k·log2(n) transactions more than one.
#[derive(Debug, Clone, Default)]
pub struct Bisect {
    /// Ranges still to write; the next one last.
    todo: Vec<std::ops::Range<usize>>,
}

impl Bisect {
    pub fn new(len: usize) -> Bisect {
        let mut todo = Vec::new();
        if len > 0 {
            todo.push(0..len);
        }
        Bisect { todo }
    }

    /// The range to write now; None when everything is written or given up.
    pub fn next(&self) -> Option<std::ops::Range<usize>> {
        self.todo.last().cloned()
    }

    /// The range from [`Bisect::next`] is written.
    pub fn written(&mut self) {
        self.todo.pop();
    }

    /// The range from [`Bisect::next`] was refused: returns its record if it was a single one
    /// (given up), else splits it.
    pub fn refused(&mut self) -> Option<usize> {
        let r = self.todo.pop()?;
        if r.len() == 1 {
            return Some(r.start);
        }
        let mid = r.start + r.len() / 2;
        self.todo.push(mid..r.end);
        self.todo.push(r.start..mid);
        None
    }
}

/// One result with the identity the bridge attached to it.
#[derive(Debug, Clone)]
pub struct Row {
    pub region: String,
    pub agent: String,
    pub boot_id: u64,
    pub result: ProbeResult,
    /// The clock's maximum error when its batch was sealed, ms (None: unknown; migration 0013).
    pub clock_error_ms: Option<i32>,
    /// Taken before its boot's first clock sync, or while the clock was not synchronised
    /// (None: unknown).
    pub clock_unsynced: Option<bool>,
}

impl Row {
    /// A row of `result` with the clock state of its batch (`clock`, None when unknown).
    pub fn new(
        region: &str,
        agent: &str,
        boot_id: u64,
        result: ProbeResult,
        clock: Option<&vantage_proto::ClockHealth>,
    ) -> Row {
        Row {
            region: region.to_owned(),
            agent: agent.to_owned(),
            boot_id,
            result,
            clock_error_ms: clock.map(|c| i32::try_from(c.max_error_ms).unwrap_or(i32::MAX)),
            clock_unsynced: clock.map(|c| c.unsynced_at(result.seq)),
        }
    }
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
    let client = match &config.tls {
        PgTls::Disable => {
            pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, connection) = pg.connect(NoTls).await?;
            spawn_connection(connection);
            client
        }
        PgTls::VerifyFull(tls) => {
            // Require, not prefer: a server (or a man in the middle) that declines TLS gets
            // an error, never a plaintext session. The connector verifies the chain against
            // the configured CA and the certificate against the host name.
            pg.ssl_mode(tokio_postgres::config::SslMode::Require);
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls.config).clone());
            let (client, connection) = pg.connect(connector).await?;
            spawn_connection(connection);
            client
        }
    };
    // The schema name is validated at config load (a-z, 0-9, '_'), so it is safe to splice.
    client
        .batch_execute(&format!("SET search_path TO {}", config.schema))
        .await?;
    Ok(client)
}

fn spawn_connection<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
}

/// The newest migration applied to the schema on `client`'s search path; 0 when none was
/// (no `schema_migrations` table yet). Commands that must not migrate (`web`, `maintain
/// --dry-run`) compare it with what they need.
pub async fn schema_version(client: &Client) -> Result<i32, DbError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM schema_migrations",
            &[],
        )
        .await?
        .get(0))
}

/// Creates `schema` (the one [`connect`] put on the search path) if needed and applies the
/// migrations not yet applied, each in its own transaction, under an advisory lock
/// so that two sinks starting together do not race. Returns how many it applied.
///
/// Each applied migration's checksum is recorded; one that was applied with other contents is
/// refused ([`DbError::MigrationEdited`]) before anything else is applied. Rows written by a
/// binary from before checksums (checksum NULL) adopt the current file's checksum.
pub async fn migrate(client: &mut Client, schema: &str) -> Result<usize, DbError> {
    migrate_to(client, schema, i32::MAX).await
}

/// [`migrate`], but only up to migration `last` (tests of a migration start from the schema
/// before it).
pub async fn migrate_to(client: &mut Client, schema: &str, last: i32) -> Result<usize, DbError> {
    client
        .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            );
            ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text",
        )
        .await?;
    check_checksums(client).await?;
    let mut applied = 0;
    for &(version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 <= last) {
        let tx = migration_transaction(client).await?;
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
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&version, &name, &migration_checksum(sql)],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(migration = name, "migration applied");
        applied += 1;
    }
    Ok(applied)
}

/// A transaction holding the migrations' lock of this schema (the lock key is the schema name,
/// so tests in separate schemas do not wait on each other), released at its end.
async fn migration_transaction(
    client: &mut Client,
) -> Result<tokio_postgres::Transaction<'_>, DbError> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext(current_schema()))",
        &[],
    )
    .await?;
    Ok(tx)
}

/// Refuses a migration applied with other contents than this binary's; records the checksum
/// of those applied before checksums existed.
async fn check_checksums(client: &mut Client) -> Result<(), DbError> {
    let tx = migration_transaction(client).await?;
    let rows = tx
        .query("SELECT version, checksum FROM schema_migrations", &[])
        .await?;
    for row in rows {
        let version: i32 = row.get(0);
        let applied: Option<String> = row.get(1);
        // A version this binary does not know is a newer binary's: not ours to judge.
        let Some(&(_, name, sql)) = MIGRATIONS.iter().find(|m| m.0 == version) else {
            continue;
        };
        let current = migration_checksum(sql);
        match applied {
            Some(applied) if applied != current => {
                return Err(DbError::MigrationEdited {
                    name,
                    applied,
                    current,
                })
            }
            Some(_) => {}
            None => {
                tx.execute(
                    "UPDATE schema_migrations SET checksum = $2 WHERE version = $1",
                    &[&version, &current],
                )
                .await?;
            }
        }
    }
    tx.commit().await?;
    Ok(())
}

/// The migrations this binary has that the database does not (all of them when the schema or
/// its `schema_migrations` table does not exist). Only reads: for commands that must not change
/// the database (`targets diff`).
pub async fn pending_migrations(client: &Client) -> Result<Vec<&'static str>, DbError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    let applied: Vec<i32> = if exists {
        client
            .query("SELECT version FROM schema_migrations", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        Vec::new()
    };
    Ok(MIGRATIONS
        .iter()
        .filter(|(v, _, _)| !applied.contains(v))
        .map(|(_, name, _)| *name)
        .collect())
}

/// How the sink writes a batch. Both are one transaction, idempotent on (agent, boot_id, seq),
/// and tolerate duplicates inside a batch; `bench-ingest` measures them against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMethod {
    /// Binary `COPY` into a temporary staging table, then `INSERT … SELECT … ON CONFLICT DO
    /// NOTHING` ([`copy_batch`]). COPY itself has no ON CONFLICT.
    Copy,
    /// One `INSERT … SELECT FROM unnest($1, $2, …) ON CONFLICT DO NOTHING` ([`insert_batch`]).
    Unnest,
}

/// From this many rows on, the sink writes with COPY; below it, with unnest. Measured with
/// `bench-ingest` (README.md, "Delivery"): unnest is faster for small batches (one statement
/// instead of three: COPY, its data, INSERT … SELECT), COPY from about 1,000 rows on, by 13–33%
/// at 4,000–16,000 rows.
pub const COPY_MIN_ROWS: usize = 2_000;

/// The faster method for a batch of `rows` rows.
pub fn write_method(rows: usize) -> WriteMethod {
    if rows >= COPY_MIN_ROWS {
        WriteMethod::Copy
    } else {
        WriteMethod::Unnest
    }
}

/// The staging table [`copy_batch`] copies into: the columns the sink writes, no constraints,
/// private to the session and emptied at every COMMIT.
const CREATE_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS results_staging (
    region text, agent text, boot_id int8, seq int8, target_id int4, started_at timestamptz,
    status int2, outcome text, regex_match bool, total_us int4, dns_us int4, connect_us int4,
    tls_us int4, ttfb_us int4, body_bytes int4, failed_phase text, transfer_us int4,
    body_truncated bool, redirects int2, cert_not_after timestamptz, remote_ip inet,
    clock_error_ms int4, clock_unsynced bool, kind text, tls_version text, dns_rcode int2,
    dns_answers int4
) ON COMMIT DELETE ROWS";

/// The written columns of the `results` view (names, not ids), in staging order (binary COPY writers use [`COLUMN_TYPES`]).
pub const COLUMNS: &str = "region, agent, boot_id, seq, target_id, started_at, status, outcome,
    regex_match, total_us, dns_us, connect_us, tls_us, ttfb_us, body_bytes, failed_phase,
    transfer_us, body_truncated, redirects, cert_not_after, remote_ip, clock_error_ms,
    clock_unsynced, kind, tls_version, dns_rcode, dns_answers";

/// The types of [`COLUMNS`], in order, for `BinaryCopyInWriter`.
pub const COLUMN_TYPES: [tokio_postgres::types::Type; 27] = {
    use tokio_postgres::types::Type;
    [
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::INT4,
        Type::TIMESTAMPTZ,
        Type::INT2,
        Type::TEXT,
        Type::BOOL,
        Type::INT4,
        Type::INT4,
        Type::INT4,
        Type::INT4,
        Type::INT4,
        Type::INT4,
        Type::TEXT,
        Type::INT4,
        Type::BOOL,
        Type::INT2,
        Type::TIMESTAMPTZ,
        Type::INET,
        Type::INT4,
        Type::BOOL,
        Type::TEXT,
        Type::TEXT,
        Type::INT2,
        Type::INT4,
    ]
};

/// [`connect`], plus the session's staging table for [`copy_batch`].
pub async fn connect_writer(config: &PostgresConfig) -> Result<Client, DbError> {
    let client = connect(config).await?;
    client.batch_execute(CREATE_STAGING).await?;
    Ok(client)
}

/// Writes a batch with the faster method for its size ([`write_method`]).
pub async fn write_batch(
    client: &mut Client,
    rows: &[Row],
    gaps: &[GapRow],
) -> Result<Inserted, DbError> {
    match write_method(rows.len()) {
        WriteMethod::Copy => copy_batch(client, rows, gaps).await,
        WriteMethod::Unnest => insert_batch(client, rows, gaps).await,
    }
}

/// Writes `rows` and `gaps` in one transaction: binary COPY of the rows into the session's
/// staging table (made by [`connect_writer`]), then one `INSERT … SELECT … ON CONFLICT DO
/// NOTHING` into `results`. Rows already present, and duplicates inside `rows`, are skipped.
///
/// `ingested_at` is the time the final INSERT ran, just before COMMIT.
pub async fn copy_batch(
    client: &mut Client,
    rows: &[Row],
    gaps: &[GapRow],
) -> Result<Inserted, DbError> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;

    let tx = client.transaction().await?;
    let mut inserted = Inserted::default();
    if !rows.is_empty() {
        let sink = tx
            .copy_in(&format!(
                "COPY results_staging ({COLUMNS}) FROM STDIN (FORMAT binary)"
            ))
            .await?;
        let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &COLUMN_TYPES));
        for row in rows {
            let v = Values::of(row);
            writer.as_mut().write(&v.params(row)).await?;
        }
        writer.as_mut().finish().await?;
        ensure_dims(&tx, rows).await?;
        inserted.results = tx
            .execute(&insert_raw_from("results_staging AS s"), &[])
            .await?;
        insert_pending(&tx, rows).await?;
    }
    inserted.gaps = insert_gaps(&tx, gaps).await?;
    tx.commit().await?;
    Ok(inserted)
}

/// The plainest writer: one autocommit `INSERT … VALUES` per row, as the seed exercise's
/// reference consumer did. Never used by the sink; `bench-ingest` measures it as a baseline.
/// Prepare `statement` with [`prepare_row_insert`].
pub async fn insert_row(
    client: &Client,
    statement: &tokio_postgres::Statement,
    row: &Row,
) -> Result<u64, DbError> {
    let v = Values::of(row);
    Ok(client.execute(statement, &v.params(row)).await?)
}

/// The statement [`insert_row`] runs.
pub async fn prepare_row_insert(client: &Client) -> Result<tokio_postgres::Statement, DbError> {
    Ok(client
        .prepare(&format!(
            "INSERT INTO results ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                    $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25,
                    $26, $27)
             ON CONFLICT DO NOTHING"
        ))
        .await?)
}

/// One result's column values, converted for PostgreSQL.
struct Values {
    boot_id: i64,
    seq: i64,
    target_id: i32,
    started_at: SystemTime,
    status: Option<i16>,
    outcome: &'static str,
    regex_match: Option<bool>,
    total_us: i32,
    dns_us: Option<i32>,
    connect_us: Option<i32>,
    tls_us: Option<i32>,
    ttfb_us: Option<i32>,
    body_bytes: i32,
    failed_phase: Option<&'static str>,
    transfer_us: Option<i32>,
    body_truncated: bool,
    redirects: i16,
    cert_not_after: Option<SystemTime>,
    remote_ip: Option<std::net::IpAddr>,
    /// None for http: the sink sends (and stores) nothing for the common kind (0016).
    kind: Option<&'static str>,
    tls_version: Option<&'static str>,
    /// A dns reply's RCODE and answer count (0017).
    dns_rcode: Option<i16>,
    dns_answers: Option<i32>,
}

impl Values {
    /// `row`'s values in [`COLUMNS`] order, as statement parameters or COPY fields.
    fn params<'a>(&'a self, row: &'a Row) -> [&'a (dyn tokio_postgres::types::ToSql + Sync); 27] {
        [
            &row.region,
            &row.agent,
            &self.boot_id,
            &self.seq,
            &self.target_id,
            &self.started_at,
            &self.status,
            &self.outcome,
            &self.regex_match,
            &self.total_us,
            &self.dns_us,
            &self.connect_us,
            &self.tls_us,
            &self.ttfb_us,
            &self.body_bytes,
            &self.failed_phase,
            &self.transfer_us,
            &self.body_truncated,
            &self.redirects,
            &self.cert_not_after,
            &self.remote_ip,
            &row.clock_error_ms,
            &row.clock_unsynced,
            &self.kind,
            &self.tls_version,
            &self.dns_rcode,
            &self.dns_answers,
        ]
    }

    fn of(row: &Row) -> Values {
        let r = &row.result;
        Values {
            // u64 on the wire, stored as its two's-complement i64 (see 0001).
            boot_id: row.boot_id as i64,
            seq: r.seq as i64,
            target_id: r.target_id as i32,
            started_at: unix_ms(r.started_at_ms),
            status: (r.status != 0).then_some(r.status as i16),
            outcome: r.outcome.as_str(),
            regex_match: match r.regex {
                vantage_proto::RegexOutcome::NotConfigured => None,
                vantage_proto::RegexOutcome::Matched => Some(true),
                vantage_proto::RegexOutcome::NotMatched => Some(false),
            },
            total_us: clamp_i32(r.total_us),
            dns_us: r.dns_us.map(clamp_i32),
            connect_us: r.connect_us.map(clamp_i32),
            tls_us: r.tls_us.map(clamp_i32),
            ttfb_us: r.ttfb_us.map(clamp_i32),
            body_bytes: clamp_i32(r.body_bytes),
            failed_phase: r.failed_phase.map(|p| p.as_str()),
            transfer_us: r.transfer_us.map(clamp_i32),
            body_truncated: r.body_truncated,
            redirects: i16::from(r.redirects),
            // A certificate valid "forever" is stored as valid until the latest storable time.
            cert_not_after: r
                .cert_not_after_s
                .map(|s| unix_ms(s.saturating_mul(1000).min(MAX_TIME_MS))),
            remote_ip: r.remote_ip.map(std::net::IpAddr::from),
            kind: (r.kind != ProbeKind::Http).then(|| r.kind.as_str()),
            tls_version: r.tls_version.map(|v| v.as_str()),
            // RCODEs are at most 12 bits (4095) even with EDNS: they fit.
            dns_rcode: r.dns.map(|d| d.rcode.min(i16::MAX as u16) as i16),
            dns_answers: r.dns.map(|d| i32::from(d.answers)),
        }
    }
}

async fn insert_gaps(
    tx: &tokio_postgres::Transaction<'_>,
    gaps: &[GapRow],
) -> Result<u64, DbError> {
    let mut n = 0;
    for g in gaps {
        n += tx
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
    Ok(n)
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
    let mut clock_error_ms = Vec::with_capacity(n);
    let mut clock_unsynced = Vec::with_capacity(n);
    let mut kind = Vec::with_capacity(n);
    let mut tls_version = Vec::with_capacity(n);
    let mut dns_rcode = Vec::with_capacity(n);
    let mut dns_answers = Vec::with_capacity(n);
    for row in rows {
        let v = Values::of(row);
        region.push(row.region.as_str());
        agent.push(row.agent.as_str());
        boot_id.push(v.boot_id);
        seq.push(v.seq);
        target_id.push(v.target_id);
        started_at.push(v.started_at);
        status.push(v.status);
        outcome.push(v.outcome);
        regex_match.push(v.regex_match);
        total_us.push(v.total_us);
        dns_us.push(v.dns_us);
        connect_us.push(v.connect_us);
        tls_us.push(v.tls_us);
        ttfb_us.push(v.ttfb_us);
        body_bytes.push(v.body_bytes);
        failed_phase.push(v.failed_phase);
        transfer_us.push(v.transfer_us);
        body_truncated.push(v.body_truncated);
        redirects.push(v.redirects);
        cert_not_after.push(v.cert_not_after);
        remote_ip.push(v.remote_ip);
        clock_error_ms.push(row.clock_error_ms);
        clock_unsynced.push(row.clock_unsynced);
        kind.push(v.kind);
        tls_version.push(v.tls_version);
        dns_rcode.push(v.dns_rcode);
        dns_answers.push(v.dns_answers);
    }
    let tx = client.transaction().await?;
    let mut inserted = Inserted::default();
    if !rows.is_empty() {
        ensure_dims(&tx, rows).await?;
        inserted.results = tx
            .execute(
                &insert_raw_from(&format!(
                    "unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int4[],
                            $6::timestamptz[], $7::int2[], $8::text[], $9::bool[],
                            $10::int4[], $11::int4[], $12::int4[], $13::int4[],
                            $14::int4[], $15::int4[], $16::text[], $17::int4[],
                            $18::bool[], $19::int2[], $20::timestamptz[], $21::inet[],
                            $22::int4[], $23::bool[], $24::text[], $25::text[],
                            $26::int2[], $27::int4[])
                     AS s({COLUMNS})"
                )),
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
                    &clock_error_ms,
                    &clock_unsynced,
                    &kind,
                    &tls_version,
                    &dns_rcode,
                    &dns_answers,
                ],
            )
            .await?;
        insert_pending(&tx, rows).await?;
    }
    inserted.gaps = insert_gaps(&tx, gaps).await?;
    tx.commit().await?;
    Ok(inserted)
}

/// `INSERT INTO results_raw … SELECT … FROM source … ON CONFLICT DO NOTHING`: `source` yields
/// [`COLUMNS`] (names, as the sink has them) as `s`; names become ids by joins with the
/// dimension tables ([`ensure_dims`] made sure they exist). `ingested_at` is the time the
/// statement runs, just before COMMIT.
fn insert_raw_from(source: &str) -> String {
    format!(
        "INSERT INTO results_raw (boot_id, seq, started_at, ingested_at, cert_not_after, agent_id,
                                  target_id, total_us, body_bytes, dns_us, connect_us, tls_us,
                                  ttfb_us, transfer_us, region_id, outcome_id, failed_phase_id,
                                  status, redirects, regex_match, body_truncated, remote_ip,
                                  clock_error_ms, clock_unsynced, kind_id, tls_version, dns_rcode,
                                  dns_answers)
         SELECT s.boot_id, s.seq, s.started_at, t.now, s.cert_not_after, a.agent_id, s.target_id,
                s.total_us, s.body_bytes, s.dns_us, s.connect_us, s.tls_us, s.ttfb_us,
                s.transfer_us, g.region_id, o.outcome_id, p.phase_id, s.status, s.redirects,
                s.regex_match, s.body_truncated, s.remote_ip, s.clock_error_ms, s.clock_unsynced,
                nullif(k.kind_id, 0), vantage_tls_version_code(s.tls_version), s.dns_rcode,
                s.dns_answers
           FROM {source}
           JOIN agents AS a ON a.agent = s.agent
           JOIN regions AS g ON g.region = s.region
           JOIN outcomes AS o ON o.outcome = s.outcome
           LEFT JOIN phases AS p ON p.phase = s.failed_phase
           LEFT JOIN probe_kinds AS k ON k.kind = s.kind
          CROSS JOIN (SELECT clock_timestamp() AS now) AS t
         ON CONFLICT DO NOTHING"
    )
}

/// Adds the regions, agents, outcomes, phases and target ids of `rows` that the dimension tables
/// and `targets` do not have yet (one statement; existing rows are not locked).
async fn ensure_dims(tx: &tokio_postgres::Transaction<'_>, rows: &[Row]) -> Result<(), DbError> {
    let mut agents: BTreeMap<&str, &str> = BTreeMap::new();
    let mut outcomes: BTreeSet<&'static str> = BTreeSet::new();
    let mut phases: BTreeSet<&'static str> = BTreeSet::new();
    for row in rows {
        agents.entry(&row.agent).or_insert(&row.region);
        outcomes.insert(row.result.outcome.as_str());
        if let Some(p) = row.result.failed_phase {
            phases.insert(p.as_str());
        }
    }
    // Every region, also one whose agents are known under another region.
    let mut regions: Vec<&str> = agents.values().copied().collect();
    let mut names: Vec<&str> = agents.keys().copied().collect();
    for row in rows {
        if !regions.contains(&row.region.as_str()) {
            regions.push(&row.region);
            names.push(&row.agent);
        }
    }
    let outcomes: Vec<&str> = outcomes.into_iter().collect();
    let phases: Vec<&str> = phases.into_iter().collect();
    // Target ids seen in results get a `targets` row (migration 0010): alert rules and the
    // dashboard select targets there, also standalone agents' local ones.
    // With their kind (0016): the newest result of each says it.
    let kinds: BTreeMap<i32, i16> = rows
        .iter()
        .map(|r| (r.result.target_id as i32, i16::from(r.result.kind.index())))
        .collect();
    let targets: Vec<i32> = kinds.keys().copied().collect();
    let kinds: Vec<i16> = kinds.into_values().collect();
    tx.execute(
        "SELECT vantage_ensure_dims($1, $2, $3, $4), vantage_ensure_targets($5, $6)",
        &[&regions, &names, &outcomes, &phases, &targets, &kinds],
    )
    .await?;
    Ok(())
}

/// What a write touched, for the rollup round (migration 0009): the (target, UTC hour) buckets
/// of `rows` and, per target and region, the newest probe time. Computed here, so the
/// transaction adds one row to `rollup_pending`, not one per result.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub targets: Vec<i32>,
    pub hours: Vec<SystemTime>,
    pub latest_targets: Vec<i32>,
    pub latest_regions: Vec<String>,
    pub latest_started: Vec<SystemTime>,
    /// Whether the result at `latest_started[i]` was up (with two at that time: both were).
    /// Lets the alert reads skip pairs that are up without a lookup (migration 0012).
    pub latest_up: Vec<bool>,
}

impl Touched {
    pub fn of(rows: &[Row]) -> Touched {
        const HOUR_MS: u64 = 3_600_000;
        let mut hours: BTreeSet<(i32, u64)> = BTreeSet::new();
        let mut latest: BTreeMap<(i32, &str), (u64, bool)> = BTreeMap::new();
        for row in rows {
            let r = &row.result;
            let target = r.target_id as i32;
            // UTC hours are whole multiples of an hour since the epoch.
            hours.insert((target, r.started_at_ms - r.started_at_ms % HOUR_MS));
            // `latest_results` holds the latest *measurement*: a missed period (the agent did
            // not probe) counts in the rollups, but leaves the last real result in place and
            // lets it age, so a stalled agent reads as no data, not as a target down.
            if r.outcome == vantage_proto::Outcome::Missed {
                continue;
            }
            let up = r.outcome == vantage_proto::Outcome::Up;
            let newest = latest
                .entry((target, row.region.as_str()))
                .or_insert((r.started_at_ms, up));
            if r.started_at_ms > newest.0 {
                *newest = (r.started_at_ms, up);
            } else if r.started_at_ms == newest.0 {
                newest.1 &= up;
            }
        }
        let mut t = Touched::default();
        for (target, hour) in hours {
            t.targets.push(target);
            t.hours.push(unix_ms(hour));
        }
        for ((target, region), (ms, up)) in latest {
            t.latest_targets.push(target);
            t.latest_regions.push(region.to_owned());
            t.latest_started.push(unix_ms(ms));
            t.latest_up.push(up);
        }
        t
    }
}

/// Adds the pending row of a write (see [`Touched`]) inside its transaction.
async fn insert_pending(tx: &tokio_postgres::Transaction<'_>, rows: &[Row]) -> Result<(), DbError> {
    let t = Touched::of(rows);
    tx.execute(
        "INSERT INTO rollup_pending (targets, hours, l_targets, l_regions, l_started, l_up)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &t.targets,
            &t.hours,
            &t.latest_targets,
            &t.latest_regions,
            &t.latest_started,
            &t.latest_up,
        ],
    )
    .await?;
    Ok(())
}

/// Latest time stored: 9999-12-31T23:59:59.999Z. Later values (a broken clock, a forged frame)
/// are refused before they reach PostgreSQL (see `sink::decode_message`).
pub const MAX_TIME_MS: u64 = 253_402_300_799_999;

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

    /// The sink stores a kind by its name's `probe_kinds` row: every kind it can decode must
    /// have one, at the kind's wire index (0016 and the migrations of later kinds).
    #[test]
    fn every_kind_has_a_probe_kinds_row() {
        let sql: String = MIGRATIONS.iter().map(|m| m.2).collect();
        for k in ProbeKind::ALL {
            let row = format!("({}, '{}')", k.index(), k.as_str());
            assert!(sql.contains(&row), "no probe_kinds row {row}");
        }
    }

    /// The bisecting writer against a fake "PostgreSQL" that refuses any range holding a bad
    /// record: exactly the bad records are given up, every other record is written once, in
    /// order.
    #[test]
    fn bisect_finds_exactly_the_refused_records() {
        for (len, bad) in [
            (1usize, vec![0usize]),
            (10, vec![]),
            (10, vec![3]),
            (10, vec![0, 9]),
            (33, vec![1, 2, 3, 31]),
            (500, (0..500).step_by(7).collect()),
            (4, vec![0, 1, 2, 3]),
        ] {
            let mut b = Bisect::new(len);
            let mut written = Vec::new();
            let mut refused = Vec::new();
            let mut attempts = 0;
            while let Some(r) = b.next() {
                attempts += 1;
                if r.clone().any(|i| bad.contains(&i)) {
                    refused.extend(b.refused());
                } else {
                    written.extend(r);
                    b.written();
                }
            }
            assert_eq!(refused, bad, "len {len}");
            let expected: Vec<usize> = (0..len).filter(|i| !bad.contains(i)).collect();
            assert_eq!(written, expected, "len {len}: written once each, in order");
            if bad.is_empty() {
                assert_eq!(attempts, 1, "a batch PostgreSQL takes is one write");
            }
        }
        assert_eq!(Bisect::new(0).next(), None);
    }

    /// A missed period counts in the rollups (its hour is touched) but is not the latest
    /// measurement of its target and region (issue #18 item 4).
    #[test]
    fn missed_results_are_not_the_latest_measurement() {
        use vantage_proto::{Outcome, ProbeResult};
        let row = |seq, started_at_ms, outcome| Row {
            region: "eu".into(),
            agent: "pi".into(),
            boot_id: 1,
            result: ProbeResult::without_response(seq, 7, started_at_ms, outcome),
            clock_error_ms: None,
            clock_unsynced: None,
        };
        let hour = 3_600_000;
        let t = Touched::of(&[
            row(0, 10 * hour, Outcome::Timeout),
            row(1, 11 * hour + 5, Outcome::Missed),
        ]);
        assert_eq!(t.hours, [unix_ms(10 * hour), unix_ms(11 * hour)]);
        assert_eq!(t.latest_targets, [7]);
        assert_eq!(t.latest_started, [unix_ms(10 * hour)]);
        assert_eq!(t.latest_up, [false]);
        // Only missed periods: nothing for latest_results.
        let t = Touched::of(&[row(2, 12 * hour, Outcome::Missed)]);
        assert_eq!(t.targets, [7]);
        assert!(t.latest_targets.is_empty());
    }

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
