//! Storage on the real PostgreSQL: partitions at day, month and leap-day boundaries, partitions
//! ahead of time, retention, rollups under replay and late data, the percentile error bound,
//! and the indexes the SQL interface relies on (EXPLAIN).
//!
//! Each test migrates its own schema and drops it at the end.

use std::time::Duration;
use vantage_tests::now_ms;

use tokio_postgres::Client;
use vantage_ingester::config::PostgresConfig;
use vantage_ingester::db::{self, Row};
use vantage_ingester::storage::StorageConfig;
use vantage_proto::{Outcome, ProbeResult, RegexOutcome};
use vantage_tests::{unique_id, Services};

/// A migrated schema of its own; dropped by [`Schema::drop`].
struct Schema {
    config: PostgresConfig,
    client: Client,
}

impl Schema {
    async fn new(tag: &str) -> Schema {
        Schema::keeping(tag, &[], 0).await
    }

    /// A schema migrated to the last version, keeping the named SQL functions as they were at
    /// migration `version` under the prefix `old_` (same-answer tests of a migration that
    /// replaces them; `version` is ignored when `functions` is empty).
    async fn keeping(tag: &str, functions: &[&str], version: i32) -> Schema {
        let config = PostgresConfig {
            url: Services::from_env().pg_url,
            password: None,
            tls: vantage_ingester::config::PgTls::Disable,
            schema: format!("st_{tag}_{}", unique_id()),
        };
        let mut client = db::connect(&config)
            .await
            .expect("PostgreSQL must be running");
        if !functions.is_empty() {
            db::migrate_to(&mut client, &config.schema, version)
                .await
                .unwrap();
            for f in functions {
                vantage_tests::harness::keep_function_as(&client, f, "old_").await;
            }
        }
        db::migrate(&mut client, &config.schema).await.unwrap();
        // The (empty) pre-0009 tables are gone after the sink's first upkeep.
        vantage_ingester::storage::migrate_v8(&client, 50_000, Duration::from_secs(60))
            .await
            .unwrap();
        Schema { config, client }
    }

    /// How two queries' answers differ: (rows only in `old`, rows only in `new`, rows of `new`),
    /// by EXCEPT ALL both ways (the same-answer tests of redefined functions).
    async fn differ(&self, old: &str, new: &str) -> (i64, i64, i64) {
        let q = format!(
            "SELECT (SELECT count(*) FROM ({old} EXCEPT ALL {new}) AS x),
                    (SELECT count(*) FROM ({new} EXCEPT ALL {old}) AS y),
                    (SELECT count(*) FROM ({new}) AS z)"
        );
        let r = self.client.query_one(&q, &[]).await.unwrap();
        (r.get(0), r.get(1), r.get(2))
    }

    /// ANALYZE of this schema's tables only: a bare ANALYZE walks every schema of the database
    /// and so deadlocked with tests dropping theirs at the same time.
    async fn analyze(&self) {
        self.client
            .batch_execute(
                "DO $$
                 DECLARE t regclass;
                 BEGIN
                     FOR t IN SELECT c.oid FROM pg_class AS c
                               WHERE c.relnamespace = current_schema()::regnamespace
                                 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
                     LOOP
                         EXECUTE format('ANALYZE %s', t);
                     END LOOP;
                 END $$",
            )
            .await
            .unwrap();
    }

    async fn drop(self) {
        let _ = self
            .client
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.config.schema))
            .await;
    }

    /// Inserts a minimal result the way the sink's final statement does (ON CONFLICT DO
    /// NOTHING), at `started_at` (an SQL timestamptz expression).
    async fn insert_at(
        &self,
        seq: i64,
        target: i32,
        region: &str,
        started_at: &str,
        total_us: i32,
    ) {
        self.client
            .execute(
                &format!(
                    "INSERT INTO results (region, agent, boot_id, seq, target_id, started_at,
                                          outcome, total_us, body_bytes)
                     VALUES ($1, $1 || '-agent', 1, $2, $3, {started_at}, 'up', $4, 0)
                     ON CONFLICT DO NOTHING"
                ),
                &[&region, &seq, &target, &total_us],
            )
            .await
            .unwrap();
    }

    async fn partition_of(&self, seq: i64) -> String {
        self.client
            .query_one(
                "SELECT tableoid::regclass::text FROM results_raw WHERE seq = $1",
                &[&seq],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn scalar_i64(&self, sql: &str) -> i64 {
        self.client.query_one(sql, &[]).await.unwrap().get(0)
    }
}

fn row(
    seq: u64,
    target_id: u32,
    region: &str,
    started_at_ms: u64,
    total_us: u32,
    outcome: Outcome,
) -> Row {
    Row {
        region: region.into(),
        agent: format!("{region}-pi"),
        boot_id: 42,
        result: ProbeResult {
            seq,
            target_id,
            started_at_ms,
            status: 200,
            outcome,
            failed_phase: None,
            regex: RegexOutcome::NotConfigured,
            total_us,
            dns_us: Some(total_us / 10),
            connect_us: Some(total_us / 5),
            tls_us: None,
            ttfb_us: Some(total_us / 2),
            transfer_us: Some(total_us / 10),
            body_bytes: 100,
            body_truncated: false,
            redirects: 0,
            cert_not_after_s: None,
            remote_ip: None,
            kind: vantage_proto::ProbeKind::Http,
            tls_version: None,
            dns: None,
        },
        clock_error_ms: None,
        clock_unsynced: None,
    }
}

/// `steps` rounds, 5 minutes apart going back from `now_ms`, of `targets` targets × `regions`;
/// `shape(seq)` gives each result's total time (µs) and outcome.
fn every_five_minutes(
    steps: u64,
    targets: u32,
    regions: &[&str],
    now_ms: u64,
    shape: impl Fn(u64) -> (u32, Outcome),
) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut seq = 0;
    for step in 0..steps {
        for target in 0..targets {
            for region in regions {
                let (total_us, outcome) = shape(seq);
                rows.push(row(
                    seq,
                    target,
                    region,
                    now_ms - step * 300_000 - u64::from(target),
                    total_us,
                    outcome,
                ));
                seq += 1;
            }
        }
    }
    rows
}

#[tokio::test]
async fn rows_at_day_month_and_leap_day_boundaries_land_in_their_partitions() {
    let s = Schema::new("bounds").await;
    let cases = [
        (1, "'2028-02-28 23:59:59.999+00'", "results_p20280228"),
        (2, "'2028-02-29 00:00:00+00'", "results_p20280229"),
        (3, "'2028-02-29 23:59:59.999+00'", "results_p20280229"),
        (4, "'2028-03-01 00:00:00+00'", "results_p20280301"),
        (5, "'2028-12-31 23:59:59.999+00'", "results_p20281231"),
        (6, "'2029-01-01 00:00:00+00'", "results_p20290101"),
        // Time zone of the writer does not matter: partitions are UTC days.
        (7, "'2028-03-01 00:30:00+02'", "results_p20280229"),
    ];
    // Far in the future: no partition exists yet, so the rows wait in the default partition
    // (the insert never fails) ...
    for (seq, at, _) in cases {
        s.insert_at(seq, 1, "eu", at, 1000).await;
        assert_eq!(s.partition_of(seq).await, "results_default");
    }
    // ... and upkeep leaves them there (2028 is beyond the window it adopts: a clock years
    // ahead must not make it create partitions) ...
    vantage_ingester::storage::ensure_partitions(&s.client, &StorageConfig::default())
        .await
        .unwrap();
    assert_eq!(s.partition_of(1).await, "results_default");
    // ... until an operator adopts that range: each day gets its partition, the rows move.
    s.client
        .query_one(
            "SELECT vantage_adopt_default('2028-01-01', '2030-01-01')",
            &[],
        )
        .await
        .unwrap();
    for (seq, at, partition) in cases {
        assert_eq!(s.partition_of(seq).await, partition, "row at {at}");
    }
    assert_eq!(
        s.scalar_i64("SELECT count(*) FROM results_default").await,
        0
    );
    // Rollups follow the UTC boundaries: 1-minute, hourly and daily buckets of these rows.
    round(&s).await;
    assert_eq!(
        s.scalar_i64("SELECT sum(probes)::int8 FROM rollup_1m")
            .await,
        7
    );
    assert_eq!(
        s.scalar_i64("SELECT count(DISTINCT bucket) FROM rollup_1h")
            .await,
        7
    );
    assert_eq!(
        s.scalar_i64(
            "SELECT sum(probes)::int8 FROM rollup_1d WHERE bucket = '2028-02-29 00:00:00+00'"
        )
        .await,
        3
    );
    s.drop().await;
}

/// One rollup round, which must not be skipped (no other round runs on a test's schema).
async fn round(s: &Schema) -> vantage_ingester::storage::Round {
    let r = vantage_ingester::storage::rollup_round(&s.client)
        .await
        .unwrap();
    assert!(!r.skipped);
    r
}

#[tokio::test]
async fn partitions_exist_ahead_of_time() {
    let s = Schema::new("ahead").await;
    // The migration already ran upkeep: today and the next 7 days have partitions.
    let missing = s
        .scalar_i64(
            "SELECT count(*) FROM generate_series(0, 7) AS d
              WHERE to_regclass('results_p' || to_char((now() AT TIME ZONE 'UTC')::date + d, 'YYYYMMDD')) IS NULL
                 OR to_regclass('rollup_1h_p' || to_char((now() AT TIME ZONE 'UTC')::date + d, 'YYYYMM')) IS NULL
                 OR to_regclass('rollup_1d_p' || to_char((now() AT TIME ZONE 'UTC')::date + d, 'YYYYMM')) IS NULL",
        )
        .await;
    assert_eq!(missing, 0);
    // A row written now goes straight to today's partition, never to the default one.
    s.insert_at(1, 1, "eu", "now()", 1000).await;
    assert!(s.partition_of(1).await.starts_with("results_p"));
    s.drop().await;
}

#[tokio::test]
async fn retention_drops_exactly_the_expired_days() {
    let s = Schema::new("retention").await;
    // One row a day for 40 days back.
    for days in 0..40i64 {
        s.insert_at(
            days,
            1,
            "eu",
            &format!("now() - interval '{days} days'"),
            1000,
        )
        .await;
    }
    // Upkeep with a longer retention gave every one of those days its partition.
    let keep_all = StorageConfig {
        raw_retention: Duration::from_secs(45 * 86_400),
        ..StorageConfig::default()
    };
    vantage_ingester::storage::ensure_partitions(&s.client, &keep_all)
        .await
        .unwrap();
    assert_eq!(
        s.scalar_i64("SELECT count(*) FROM results_default").await,
        0
    );
    // The rollup round materialises the hours before raw rows go (upkeep runs it first).
    round(&s).await;
    let dropped =
        vantage_ingester::storage::apply_retention(&s.client, &StorageConfig::default(), false)
            .await
            .unwrap();
    // A daily partition goes when its whole day ended at or before now() - 30 days.
    let expected: Vec<String> = s
        .client
        .query(
            "SELECT 'results_p' || to_char(d, 'YYYYMMDD')
               FROM generate_series((now() AT TIME ZONE 'UTC')::date - 39,
                                    (now() AT TIME ZONE 'UTC')::date, '1 day') AS d
              WHERE (d + interval '1 day') AT TIME ZONE 'UTC' <= now() - interval '30 days'
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut dropped_results: Vec<String> = dropped
        .iter()
        .filter(|r| r.relation.starts_with("results_p"))
        .map(|r| r.relation.clone())
        .collect();
    dropped_results.sort();
    assert_eq!(dropped_results, expected);
    // Each with its one row: nothing goes without a count.
    assert!(dropped
        .iter()
        .filter(|r| r.relation.starts_with("results_p"))
        .all(|r| r.rows == 1));
    // What is left is exactly the rows whose day is not expired; hourly rollups are all kept.
    let kept = s.scalar_i64("SELECT count(*) FROM results").await;
    assert_eq!(kept, 40 - expected.len() as i64);
    assert_eq!(
        s.scalar_i64("SELECT sum(probes)::int8 FROM rollup_1h")
            .await,
        40
    );
    println!(
        "retention dropped {} partitions: {dropped:?}",
        dropped.len()
    );
    s.drop().await;
}

/// Buckets of `rollup_1m`, `rollup_1h` and `rollup_1d` (summed by bucket, as docs/sql.md asks)
/// that differ from a recount of the raw rows, and (target, region) pairs whose latest status is
/// not the newest raw row: (level, mismatches) for each.
async fn recount(s: &Schema) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for (table, unit) in [
        ("rollup_1m", "minute"),
        ("rollup_1h", "hour"),
        ("rollup_1d", "day"),
    ] {
        let mismatches = s
            .scalar_i64(&format!(
                "WITH raw AS (
                    SELECT target_id, region, date_trunc('{unit}', started_at, 'UTC') AS bucket,
                           count(*) AS probes, count(*) FILTER (WHERE outcome = 'up') AS up,
                           vantage_hist_agg(total_us) AS total_hist,
                           vantage_hist_agg(dns_us) AS dns_hist,
                           vantage_hist_agg(transfer_us) AS transfer_hist,
                           vantage_count_agg(outcome) AS outcomes
                      FROM results GROUP BY 1, 2, 3),
                 r AS (
                    SELECT target_id, region, bucket, sum(probes) AS probes, sum(up) AS up,
                           vantage_hist_merge_agg(total_hist) AS total_hist,
                           vantage_hist_merge_agg(dns_hist) AS dns_hist,
                           vantage_hist_merge_agg(transfer_hist) AS transfer_hist,
                           vantage_jsonb_sum_agg(outcomes) AS outcomes
                      FROM {table} GROUP BY 1, 2, 3)
                 SELECT count(*) FROM raw FULL JOIN r USING (target_id, region, bucket)
                  WHERE raw.probes IS DISTINCT FROM r.probes OR raw.up IS DISTINCT FROM r.up
                     OR raw.total_hist IS DISTINCT FROM r.total_hist
                     OR raw.dns_hist IS DISTINCT FROM r.dns_hist
                     OR raw.transfer_hist IS DISTINCT FROM r.transfer_hist
                     OR raw.outcomes IS DISTINCT FROM r.outcomes"
            ))
            .await;
        out.push((table, mismatches));
    }
    let latest = s
        .scalar_i64(
            "WITH raw AS (SELECT DISTINCT ON (target_id, region) target_id, region, started_at
                            FROM results ORDER BY target_id, region, started_at DESC)
             SELECT count(*) FROM raw FULL JOIN latest_status AS l USING (target_id, region)
              WHERE raw.started_at IS DISTINCT FROM l.started_at",
        )
        .await;
    out.push(("latest_status", latest));
    out
}

fn exact(levels: &[(&'static str, i64)]) -> bool {
    levels.iter().all(|(_, n)| *n == 0)
}

/// Issue #15, exactness: rollups equal a recount from raw rows after replays, duplicates inside
/// a batch, data hours late (for buckets already materialised), a write that commits while a
/// round runs (its snapshot cannot see it), and a round that dies half-way (a sink crash: its
/// transaction never commits). Before and after each round. The kept windows (0014) stay the
/// merge of their rollup rows through the same history.
#[tokio::test]
async fn rollups_survive_replays_and_late_data() {
    let s = Schema::new("rollup").await;
    let mut writer = db::connect_writer(&s.config).await.unwrap();
    let now = now_ms();
    let batch: Vec<Row> = (0..200)
        .map(|i| {
            let outcome = if i % 10 == 0 {
                Outcome::Timeout
            } else {
                Outcome::Up
            };
            row(
                i,
                1 + (i % 2) as u32,
                if i % 3 == 0 { "us-east" } else { "eu-north" },
                now - i * 1000,
                1000 + i as u32 * 37,
                outcome,
            )
        })
        .collect();
    // In two statements, then the whole batch again (a Kafka replay), and a duplicate inside
    // one batch.
    db::write_batch(&mut writer, &batch[..100], &[])
        .await
        .unwrap();
    db::write_batch(&mut writer, &batch[100..], &[])
        .await
        .unwrap();
    db::write_batch(&mut writer, &batch, &[]).await.unwrap();
    db::write_batch(&mut writer, &[batch[0].clone(), batch[0].clone()], &[])
        .await
        .unwrap();
    // Late data: an agent back after 5 hours offline.
    let late: Vec<Row> = (1000..1010)
        .map(|i| row(i, 1, "eu-north", now - 5 * 3_600_000 - i, 5000, Outcome::Up))
        .collect();
    db::write_batch(&mut writer, &late, &[]).await.unwrap();
    assert_eq!(s.scalar_i64("SELECT count(*) FROM results").await, 210);
    // Nothing materialised yet: every level is read from raw rows, exactly.
    let before = recount(&s).await;
    assert!(exact(&before), "before the first round: {before:?}");

    // The first round materialises every hour that ended; a round that also closes the current
    // hour (negative grace) makes every later write "late".
    let r = round(&s).await;
    assert!(r.hours > 0 && r.consumed == 5, "{r:?}");
    let after = recount(&s).await;
    assert!(exact(&after), "after the first round: {after:?}");
    assert_eq!(
        kept_mismatches(&s).await,
        0,
        "kept windows after the first round"
    );
    s.client
        .query_one("SELECT vantage_rollup_round(interval '-1 hour')", &[])
        .await
        .unwrap();
    assert!(
        s.scalar_i64(
            "SELECT count(*) FROM rollup_1h_data WHERE bucket = date_trunc('hour', now(), 'UTC')"
        )
        .await
            > 0,
        "the current hour is materialised"
    );
    let after = recount(&s).await;
    assert!(exact(&after), "after closing the current hour: {after:?}");

    // Late rows for materialised buckets (the current hour, and 3 hours back), replays of old
    // rows, and a duplicate inside the batch.
    let mut more: Vec<Row> = (2000..2040)
        .map(|i| {
            let back = if i % 2 == 0 { 3 * 3_600_000 } else { 0 };
            let outcome = if i % 7 == 0 {
                Outcome::ConnectRefused
            } else {
                Outcome::Up
            };
            row(
                i,
                1 + (i % 3) as u32,
                "ap-south",
                now - back - i,
                700 + i as u32,
                outcome,
            )
        })
        .collect();
    more.push(more[3].clone());
    more.extend_from_slice(&batch[..20]);
    db::write_batch(&mut writer, &more, &[]).await.unwrap();
    // Until the next round the materialised hours do not have them (read as they were) ...
    let stale = recount(&s).await;
    assert!(
        stale[1].1 > 0,
        "late rows showed in materialised hours before a round: {stale:?}"
    );
    assert_eq!(
        stale[3],
        ("latest_status", 0),
        "latest status is never behind"
    );
    // ... the round recounts exactly their buckets.
    let r = round(&s).await;
    assert!(r.late_hours > 0 && r.consumed == 1, "{r:?}");
    let after = recount(&s).await;
    assert!(exact(&after), "after late data: {after:?}");
    assert_eq!(kept_mismatches(&s).await, 0, "kept windows after late data");

    // A write that commits after a round took its snapshot: its pending row is still there for
    // the next round.
    let other = db::connect(&s.config).await.unwrap();
    other.batch_execute("BEGIN").await.unwrap();
    other
        .batch_execute(&format!(
            "INSERT INTO results (region, agent, boot_id, seq, target_id, started_at, outcome,
                                  total_us, body_bytes)
             VALUES ('eu-north', 'eu-north-pi', 42, 5000, 2,
                     to_timestamp({}) , 'timeout', 4321, 0)",
            (now - 3_600_000) as f64 / 1000.0
        ))
        .await
        .unwrap();
    let r = round(&s).await;
    assert_eq!(r.consumed, 0, "{r:?}");
    other.batch_execute("COMMIT").await.unwrap();
    assert!(!exact(&recount(&s).await));
    // A round that dies half-way (the sink killed during it): nothing of it stays, and the
    // pending row waits for the next one.
    let crashing = db::connect(&s.config).await.unwrap();
    crashing.batch_execute("BEGIN").await.unwrap();
    crashing
        .query_one("SELECT consumed FROM vantage_rollup_round()", &[])
        .await
        .unwrap();
    drop(crashing);
    // (the connection is gone: its transaction is rolled back)
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.scalar_i64("SELECT count(*) FROM rollup_pending").await, 1);
    let r = round(&s).await;
    assert!(r.consumed == 1 && r.late_hours > 0, "{r:?}");
    let after = recount(&s).await;
    assert!(
        exact(&after),
        "after a late commit and a crashed round: {after:?}"
    );
    assert_eq!(
        kept_mismatches(&s).await,
        0,
        "kept windows after a late commit and a crashed round"
    );
    assert_eq!(s.scalar_i64("SELECT count(*) FROM results").await, 251);
    // latest_results itself (not only the view over it) is exact once the round ran.
    assert_eq!(
        s.scalar_i64(
            "SELECT count(*) FROM latest_results AS l
               FULL JOIN (SELECT target_id, region, max(started_at) AS started_at
                            FROM results GROUP BY 1, 2) AS r USING (target_id, region)
              WHERE l.started_at IS DISTINCT FROM r.started_at"
        )
        .await,
        0
    );
    s.drop().await;
}

#[tokio::test]
async fn histogram_percentiles_are_within_one_percent_of_exact() {
    let s = Schema::new("hist").await;
    let mut writer = db::connect_writer(&s.config).await.unwrap();
    // 20,000 latencies, log-uniform between 100 us and 20 s, in one hour of one target.
    let mut rng = fastrand::Rng::with_seed(0x2545_F491_4F6C_DD1D);
    let mut next = move || rng.f64();
    let hour_start = (now_ms() / 3_600_000 - 2) * 3_600_000;
    let rows: Vec<Row> = (0..20_000)
        .map(|i| {
            let us = (100.0 * (200_000f64).powf(next())) as u32;
            row(
                i,
                7,
                "eu-north",
                hour_start + i % 3_600_000,
                us,
                Outcome::Up,
            )
        })
        .collect();
    for chunk in rows.chunks(2_000) {
        db::write_batch(&mut writer, chunk, &[]).await.unwrap();
    }
    let mut worst: f64 = 0.0;
    for q in [0.5, 0.9, 0.95, 0.99, 0.999] {
        let r = s
            .client
            .query_one(
                "SELECT (SELECT percentile_disc($1) WITHIN GROUP (ORDER BY total_us)::float8
                           FROM results WHERE target_id = 7),
                        (SELECT vantage_hist_quantile(vantage_hist_merge_agg(total_hist), $1)
                           FROM rollup_1m WHERE target_id = 7),
                        (SELECT vantage_hist_quantile(vantage_hist_merge_agg(total_hist), $1)
                           FROM rollup_1h WHERE target_id = 7)",
                &[&q],
            )
            .await
            .unwrap();
        let exact: f64 = r.get(0);
        for approx in [r.get::<_, f64>(1), r.get::<_, f64>(2)] {
            let err = (approx - exact).abs() / exact;
            worst = worst.max(err);
            assert!(
                err <= 0.01,
                "q{q}: exact {exact} us, from histogram {approx} us"
            );
        }
    }
    println!("worst relative percentile error: {:.4}%", worst * 100.0);
    s.drop().await;
}

#[tokio::test]
async fn explain_shows_indexes_and_partition_pruning() {
    let s = Schema::new("explain").await;
    let mut writer = db::connect_writer(&s.config).await.unwrap();
    let now = now_ms();
    // Two days of 50 targets × 4 regions every ~5 minutes.
    let rows = every_five_minutes(576, 50, &["a", "b", "c", "d"], now, |_| (1000, Outcome::Up));
    for chunk in rows.chunks(5_000) {
        db::write_batch(&mut writer, chunk, &[]).await.unwrap();
    }
    s.analyze().await;
    let client = &s.client;
    let plan = |sql: &'static str| async move {
        client
            .query(&format!("EXPLAIN {sql}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Time range of one target: pruned to the partitions of the last day, by index.
    let p = plan(
        "SELECT * FROM results WHERE target_id = 3 AND region = 'a'
            AND started_at >= now() - interval '24 hours'",
    )
    .await;
    println!("{p}");
    assert!(p.contains("_target_id_started_at_idx"), "{p}");
    // Pruned: no partition of a day before yesterday is read. The empty partitions made ahead
    // for future days match `>= now() - 24 h`; having no statistics, they are planned as
    // (free) sequential scans. Every partition that holds rows is read by index.
    let days: Vec<String> = s
        .client
        .query_one(
            "SELECT ARRAY[to_char((now() AT TIME ZONE 'UTC')::date - 1, 'YYYYMMDD'),
                          to_char((now() AT TIME ZONE 'UTC')::date, 'YYYYMMDD')]",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let (yesterday, today) = (days[0].as_str(), days[1].as_str());
    for day in p.split("on results_p").skip(1).map(|rest| &rest[..8]) {
        assert!(day >= yesterday, "partition of {day} scanned:\n{p}");
    }
    for day in p
        .split("Seq Scan on results_p")
        .skip(1)
        .map(|rest| &rest[..8])
    {
        assert!(
            day > today,
            "partition of {day} read without an index:\n{p}"
        );
    }
    // Latest status per target and region reads `latest_results`, one row per pair kept by the
    // rollup round, and reaches raw rows only by index, for the writes not consumed yet: never
    // the history (115,200 rows here).
    round(&s).await;
    s.analyze().await;
    let p = plan("SELECT * FROM latest_status").await;
    println!("{p}");
    assert!(p.contains("on latest_results"), "{p}");
    for day in p
        .split("Seq Scan on results_p")
        .skip(1)
        .map(|rest| &rest[..8])
    {
        assert!(
            day > today,
            "latest_status read the partition of {day} without an index:\n{p}"
        );
    }
    assert_eq!(
        s.scalar_i64("SELECT count(*) FROM latest_results").await,
        200
    );
    // Region comparison over 24 h reads hourly rollups of the window only.
    let p = plan(
        "SELECT * FROM rollup_1h WHERE target_id = 3 AND bucket >= now() - interval '24 hours'",
    )
    .await;
    println!("{p}");
    let month: String = s
        .client
        .query_one("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYYMM')", &[])
        .await
        .unwrap()
        .get(0);
    for m in p
        .split("Seq Scan on rollup_1h_p")
        .skip(1)
        .map(|rest| &rest[..6])
    {
        assert!(
            m > month.as_str(),
            "rollup_1h of {m} read without an index:\n{p}"
        );
    }
    s.drop().await;
}

/// `vantage-ingester maintain ARGS` with `file`; (exit code, stdout, stderr).
fn maintain(file: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(vantage_tests::stage::workspace_bin("vantage-ingester"))
        .arg("maintain")
        .arg("--config")
        .arg(file)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config file for `maintain` on this schema with `storage` lines; in its own folder.
fn storage_config(s: &Schema, storage: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vantage-maintain-{}", unique_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ingester.toml");
    let text = format!(
        "[postgres]\n{}\nschema = \"{}\"\n[storage]\n{storage}\n",
        Services::from_env().pg_toml_plain(&dir),
        s.config.schema
    );
    std::fs::write(&file, text).unwrap();
    file
}

/// Issue #14, item 2: `maintain --config` keeps what `[storage]` says (90 days here), not a
/// default of its own (it dropped 60 of those days for good); its flags only override, and are
/// refused as the file's keys would be; `--dry-run` lists what would go and drops nothing.
/// Needs `cargo build --bins`.
#[tokio::test]
async fn maintain_keeps_what_the_config_keeps() {
    let s = Schema::new("maintain").await;
    // One row a day: 0..=88 days old (inside 90 days) and 92..=99 days old (outside).
    for d in (0..=88).chain(92..=99) {
        s.insert_at(d, 1, "eu", &format!("now() - interval '{d} days'"), 1000)
            .await;
    }
    let file = storage_config(&s, "raw_retention = \"90d\"\nrollup_retention = \"400d\"");
    let (code, out, err) = maintain(&file, &[]);
    println!("maintain:\n{out}{err}");
    assert_eq!(code, Some(0), "{err}");
    let inside = s
        .scalar_i64("SELECT count(*) FROM results WHERE started_at > now() - interval '90 days'")
        .await;
    assert_eq!(inside, 89, "rows within raw_retention = 90d were dropped");
    assert_eq!(s.scalar_i64("SELECT count(*) FROM results").await, 89);
    // What went is said: the 8 rows older than 90 days, with their count.
    assert!(out.contains("8 rows"), "{out}");

    // A flag overrides the file: with 60 days, a dry run lists the partitions that would go and
    // drops nothing.
    let (code, out, err) = maintain(&file, &["--raw-retention", "60d", "--dry-run"]);
    println!("maintain --raw-retention 60d --dry-run:\n{out}{err}");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(s.scalar_i64("SELECT count(*) FROM results").await, 89);
    let day = |days_ago: i32| {
        let client = &s.client;
        async move {
            client
                .query_one(
                    "SELECT 'results_p' || to_char((now() - make_interval(days => $1)) AT TIME ZONE 'UTC', 'YYYYMMDD')",
                    &[&days_ago],
                )
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    let (old, young) = (day(88).await, day(59).await);
    assert!(out.contains(&old) && out.contains("would"), "{out}");
    assert!(!out.contains(&young), "{out}");

    // Flags are validated like the file's keys, and the error names the flag.
    let (code, _, err) = maintain(&file, &["--raw-retention", "12h"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--raw-retention") && err.contains("1 day"),
        "{err}"
    );
    let (code, _, err) = maintain(&file, &["--raw-retention", "500d"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("rollup_retention"), "{err}");
    let (code, _, err) = maintain(&file, &["--ahead", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--ahead"), "{err}");
    assert_eq!(s.scalar_i64("SELECT count(*) FROM results").await, 89);
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
    s.drop().await;
}

/// Issue #14, item 3: rows waiting in the default partition are adopted only inside a bounded
/// window (raw retention back, the partitions ahead forward): a clock a year behind or twenty
/// years ahead no longer makes upkeep create a partition per day it invents; what retention
/// deletes from the default partition is reported, never silent.
#[tokio::test]
async fn upkeep_adopts_default_rows_only_inside_a_bounded_window() {
    let s = Schema::new("adopt").await;
    let partitions = "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                       WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'";
    let before = s.scalar_i64(partitions).await;
    // 20 distinct days about 400 days back and 20 about 20 years ahead, and one row 3 days ago
    // (no partition yet: it waits in the default partition, inside the window).
    for i in 0..20i64 {
        s.insert_at(
            i,
            1,
            "eu",
            &format!("now() - interval '{} days'", 400 + i),
            1000,
        )
        .await;
        s.insert_at(
            100 + i,
            1,
            "eu",
            &format!("now() + interval '{} days'", 7300 + i),
            1000,
        )
        .await;
    }
    s.insert_at(1000, 1, "eu", "now() - interval '3 days'", 1000)
        .await;
    assert_eq!(
        s.scalar_i64("SELECT count(*) FROM results_default").await,
        41
    );
    s.client
        .query_one("SELECT vantage_ensure_partitions(7, 1)", &[])
        .await
        .unwrap();
    let created = s.scalar_i64(partitions).await - before;
    // The day 3 days ago: its results partition (its month's rollup partitions exist already:
    // upkeep keeps them for the whole raw retention back).
    assert!(
        created == 1,
        "upkeep created {created} partitions for rows from broken clocks"
    );
    assert!(s.partition_of(1000).await.starts_with("results_p"));
    assert_eq!(
        s.scalar_i64("SELECT count(*) FROM results_default").await,
        40
    );
    s.drop().await;
}

/// Issue #14, item 1: the sink's storage upkeep survives a PostgreSQL restart. Before, it kept
/// its first connection forever: after a restart no partition was created ahead and nothing
/// was retained until the sink itself restarted. Here upkeep runs every second; after the
/// restart a dropped partition ahead is created again and the "last successful upkeep" gauge
/// moves on.
///
/// Restarts the shared PostgreSQL: `#[ignore]`d, run alone by `make test-crash` (after
/// `cargo build --bins`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared PostgreSQL: run alone with `make test-crash`"]
async fn upkeep_recovers_after_a_postgres_restart() {
    use vantage_tests::harness::{IngesterOptions, Run};
    use vantage_tests::stage::{self, http_get, Service, ServicesGuard, StageProcess};
    let _services = ServicesGuard;
    let run = Run::new("upkeep");
    let file = run.ingester_file(&IngesterOptions::default());
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("\n[storage]\nupkeep_interval = \"1s\"\n");
    std::fs::write(&file, text).unwrap();
    let mut sink = StageProcess::start("sink", "sink", &file, &run.dir);
    let addr = sink.http_addr().await;
    let gauge = || async move {
        let (_, body) = http_get(addr, "/metrics").await;
        vantage_ingester::metrics::sample(
            &body,
            "vantage_sink_upkeep_last_success_timestamp_seconds",
        )
    };
    // The last partition made ahead (today + 7, the default `partitions_ahead`).
    let client = run.pg().await;
    let ahead: String = client
        .query_one(
            "SELECT 'results_p' || to_char((now() AT TIME ZONE 'UTC')::date + 7, 'YYYYMMDD')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let exists = |name: String| {
        let run = &run;
        async move {
            let Ok(client) = tokio::time::timeout(Duration::from_secs(5), run.pg()).await else {
                return false;
            };
            client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
                .await
                .is_ok_and(|r| r.get(0))
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !exists(ahead.clone()).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no upkeep at start:\n{}",
            sink.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(client);

    let took = stage::restart_service(Service::Postgres, Duration::from_secs(2))
        .await
        .unwrap();
    let restarted = now_ms() as f64 / 1000.0;
    println!("PostgreSQL restarted in {took:.1?}");
    // Upkeep must notice it has work again: drop the partition it made ahead.
    run.pg()
        .await
        .batch_execute(&format!("DROP TABLE {ahead}"))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let recreated = exists(ahead.clone()).await;
        let last = gauge().await.unwrap_or(0.0);
        if recreated && last >= restarted.floor() {
            println!("after the restart: {ahead} created again, last successful upkeep at {last}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "upkeep did not recover within 60 s of the PostgreSQL restart \
             ({ahead} recreated: {recreated}, last successful upkeep: {last}):\n{}",
            sink.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(sink.terminate(Duration::from_secs(30)), Some(0));
    run.cleanup(&[]).await;
}

/// Migration 0016 (issue #20): each row keeps its kind and TLS version, through both of the
/// sink's writers and the view's INSERT (which refuses a kind it does not know rather than
/// store it as http); http rows store no kind id; `targets` takes its results' kind; and
/// `region_comparison(since, target, of_kind)` is the two-argument answer for that kind's
/// targets, with their kind. The rollups stay equal to a recount from raw rows.
#[tokio::test]
async fn kinds_are_stored_and_compared_per_kind() {
    use vantage_proto::{ProbeKind, TlsVersion};
    let s = Schema::new("kinds").await;
    let now = now_ms();
    let mut rows = Vec::new();
    let cases = [
        (51, ProbeKind::Http, None),
        (52, ProbeKind::Tcp, None),
        (53, ProbeKind::Tls, Some(TlsVersion::Tls13)),
        (53, ProbeKind::Tls, Some(TlsVersion::Tls12)),
    ];
    for (i, (target, kind, tls)) in cases.into_iter().enumerate() {
        for region in ["eu-north", "us-east"] {
            let at = now - 60_000 + i as u64 * 1000;
            let mut r = row(
                rows.len() as u64,
                target,
                region,
                at,
                1000 + 100 * i as u32,
                Outcome::Up,
            );
            r.result.kind = kind;
            r.result.tls_version = tls;
            rows.push(r);
        }
    }
    let mut client = db::connect_writer(&s.config).await.unwrap();
    let (by_unnest, by_copy) = rows.split_at(4);
    db::insert_batch(&mut client, by_unnest, &[]).await.unwrap();
    db::copy_batch(&mut client, by_copy, &[]).await.unwrap();
    let insert = |kind: &str| {
        format!(
            "INSERT INTO results (region, agent, boot_id, seq, target_id, started_at, outcome,
                                  total_us, body_bytes, kind)
             VALUES ('eu-north', 'eu-north-pi', 43, 0, 52, now() - interval '1 minute', 'up',
                     900, 0, '{kind}')"
        )
    };
    s.client.batch_execute(&insert("tcp")).await.unwrap();
    let e = s
        .client
        .batch_execute(&insert("carrier-pigeon"))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE),
        "{e:?}"
    );

    let stored: Vec<(i32, String, Option<String>, i64)> = s
        .client
        .query(
            "SELECT target_id, kind, tls_version, count(*) FROM results GROUP BY 1, 2, 3
              ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let text = |t: &str| Some(t.to_owned());
    assert_eq!(
        stored,
        [
            (51, "http".to_owned(), None, 2),
            (52, "tcp".to_owned(), None, 3),
            (53, "tls".to_owned(), text("TLSv1.2"), 2),
            (53, "tls".to_owned(), text("TLSv1.3"), 2),
        ]
    );
    assert_eq!(
        s.scalar_i64("SELECT count(*) FROM results_raw WHERE kind_id IS NULL")
            .await,
        2,
        "the http rows store no kind"
    );
    let kinds: Vec<(i32, String)> = vantage_tests::in_process::query_pairs(
        &s.client,
        "SELECT target_id, kind FROM targets JOIN probe_kinds USING (kind_id) ORDER BY 1",
    )
    .await;
    assert_eq!(
        kinds,
        [(51, "http".into()), (52, "tcp".into()), (53, "tls".into())]
    );

    round(&s).await;
    assert!(exact(&recount(&s).await), "{:?}", recount(&s).await);
    type Line = (i32, String, i64, Option<f64>, Option<String>);
    let compare = |sql: &'static str, kind: Option<&'static str>| {
        let client = &s.client;
        async move {
            let rows = match kind {
                None => client.query(sql, &[]).await,
                Some(k) => client.query(sql, &[&k]).await,
            };
            rows.unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
                .collect::<Vec<Line>>()
        }
    };
    let all = compare(
        "SELECT target_id, region, probes, p50_ms, top_error
           FROM region_comparison(interval '1 hour')",
        None,
    )
    .await;
    assert_eq!(all.len(), 6);
    for (kind, target) in [("http", 51), ("tcp", 52), ("tls", 53)] {
        let of_kind = compare(
            "SELECT target_id, region, probes, p50_ms, top_error
               FROM region_comparison(interval '1 hour', NULL, $1) WHERE kind = $1",
            Some(kind),
        )
        .await;
        let expected: Vec<Line> = all.iter().filter(|l| l.0 == target).cloned().collect();
        assert_eq!(of_kind, expected, "{kind}");
    }
    let unfiltered: i64 = s
        .client
        .query_one(
            "SELECT count(*) FROM region_comparison(interval '1 hour', NULL, NULL)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unfiltered, 6);
    s.drop().await;
}

/// Issue #20's dns kind (0017): a reply's RCODE and answer count stored by both writers and
/// the view's INSERT, NULL for other kinds and for a dns probe without a reply; the target is a
/// dns target and region_comparison compares it per kind.
#[tokio::test]
async fn dns_replies_are_stored() {
    use vantage_proto::{DnsReply, ProbeKind};
    let s = Schema::new("dnskind").await;
    let now = now_ms();
    let mut rows = Vec::new();
    let replies = [
        (Outcome::Up, Some((0, 2))),
        (Outcome::DnsNoSuchName, Some((3, 0))),
        (Outcome::DnsServerFailure, Some((2, 0))),
        (Outcome::Timeout, None),
    ];
    for (i, (outcome, reply)) in replies.into_iter().enumerate() {
        for region in ["eu-north", "us-east"] {
            let at = now - 60_000 + i as u64 * 1000;
            let mut r = row(rows.len() as u64, 61, region, at, 900, outcome);
            r.result.kind = ProbeKind::Dns;
            r.result.dns = reply.map(|(rcode, answers)| DnsReply { rcode, answers });
            rows.push(r);
        }
    }
    let mut http = row(
        rows.len() as u64,
        62,
        "eu-north",
        now - 1000,
        900,
        Outcome::Up,
    );
    http.result.kind = ProbeKind::Http;
    rows.push(http);
    let mut client = db::connect_writer(&s.config).await.unwrap();
    let (by_unnest, by_copy) = rows.split_at(4);
    db::insert_batch(&mut client, by_unnest, &[]).await.unwrap();
    db::copy_batch(&mut client, by_copy, &[]).await.unwrap();
    s.client
        .batch_execute(
            "INSERT INTO results (region, agent, boot_id, seq, target_id, started_at, outcome,
                                  total_us, body_bytes, kind, dns_rcode, dns_answers)
             VALUES ('eu-north', 'eu-north-pi', 44, 0, 61, now() - interval '1 minute',
                     'dns_failed', 900, 0, 'dns', 5, 0)",
        )
        .await
        .unwrap();
    type Stored = (i32, String, String, Option<i16>, Option<i32>, i64);
    let stored: Vec<Stored> = s
        .client
        .query(
            "SELECT target_id, kind, outcome, dns_rcode, dns_answers, count(*) FROM results
              GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 4, 3",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let line = |t, k: &str, o: &str, rc, an, n| (t, k.to_owned(), o.to_owned(), rc, an, n);
    assert_eq!(
        stored,
        [
            line(61, "dns", "up", Some(0), Some(2), 2),
            line(61, "dns", "dns_server_failure", Some(2), Some(0), 2),
            line(61, "dns", "dns_no_such_name", Some(3), Some(0), 2),
            line(61, "dns", "dns_failed", Some(5), Some(0), 1),
            line(61, "dns", "timeout", None, None, 2),
            line(62, "http", "up", None, None, 1),
        ]
    );
    let kinds: Vec<(i32, String)> = vantage_tests::in_process::query_pairs(
        &s.client,
        "SELECT target_id, kind FROM targets JOIN probe_kinds USING (kind_id) ORDER BY 1",
    )
    .await;
    assert_eq!(kinds, [(61, "dns".into()), (62, "http".into())]);
    let compared: Vec<(i32, String)> = vantage_tests::in_process::query_pairs(
        &s.client,
        "SELECT target_id, region FROM region_comparison(interval '1 hour', NULL, 'dns')
          ORDER BY 1, 2",
    )
    .await;
    assert_eq!(compared, [(61, "eu-north".into()), (61, "us-east".into())]);
    s.drop().await;
}

/// Issue #14 item 7: `cert_expiry` reports per region, and one region never decides alone: the
/// target-level `not_after` is the soonest expiry two regions see (a single region's when it is
/// the only one reporting); the lone early claim shows as `soonest` / `soonest_from`.
/// Target ids seen only in results (a standalone agent's local targets) get a `targets` row,
/// as the insert trigger gave them before 0009: alert rules with `targets = [...]` and the
/// dashboard select targets there. Without it the demo's down alert on its local target never
/// fired (migration 0010).
#[tokio::test]
async fn targets_seen_in_results_are_recorded() {
    let s = Schema::new("seen").await;
    let now = now_ms();
    let rows: Vec<_> = [(41, "eu-north"), (41, "us-east"), (42, "eu-north")]
        .into_iter()
        .enumerate()
        .map(|(i, (target, region))| row(i as u64, target, region, now, 1000, Outcome::Up))
        .collect();
    let mut client = db::connect_writer(&s.config).await.unwrap();
    db::write_batch(&mut client, &rows, &[]).await.unwrap();
    // Written again: no error, no second row.
    db::write_batch(&mut client, &rows, &[]).await.unwrap();
    let ids: Vec<i32> = vantage_tests::in_process::query_column(
        &s.client,
        "SELECT target_id FROM targets ORDER BY 1",
    )
    .await;
    assert_eq!(ids, [41, 42]);
}
#[tokio::test]
async fn cert_expiry_is_per_region_and_needs_two_regions() {
    let s = Schema::new("cert").await;
    let now = now_ms();
    let day = 86_400u64;
    let (soon, later) = (now / 1000 + day, now / 1000 + 90 * day);
    let mut rows = Vec::new();
    // Target 5: three regions, ap-south (a lying or odd agent) alone sees an early expiry.
    // Target 6: two regions that disagree. Target 7: one region only.
    for (i, (target, region, not_after)) in [
        (5, "eu-north", later),
        (5, "us-east", later),
        (5, "ap-south", soon),
        (6, "eu-north", soon),
        (6, "us-east", later),
        (7, "eu-north", soon),
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = row(i as u64, target, region, now, 1000, Outcome::Up);
        r.result.cert_not_after_s = Some(not_after);
        rows.push(r);
    }
    let mut client = db::connect_writer(&s.config).await.unwrap();
    db::write_batch(&mut client, &rows, &[]).await.unwrap();
    let got: Vec<(i32, i64, i32, i64, String)> = s
        .client
        .query(
            "SELECT target_id, extract(epoch FROM not_after)::int8, regions,
                    extract(epoch FROM soonest)::int8, soonest_from
               FROM cert_expiry ORDER BY target_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let (soon, later) = (soon as i64, later as i64);
    assert_eq!(
        got,
        [
            (5, later, 3, soon, "ap-south".to_owned()),
            (6, later, 2, soon, "eu-north".to_owned()),
            (7, soon, 1, soon, "eu-north".to_owned()),
        ]
    );
    let by_region = s
        .scalar_i64("SELECT count(*) FROM cert_expiry_by_region WHERE target_id = 5")
        .await;
    assert_eq!(by_region, 3);
    s.drop().await;
}

/// Issue #15: the move from the pre-0009 schema. Data written by the old insert trigger (raw
/// rows in daily partitions and the default one, partial rollup rows) is moved in batches, each
/// its own short transaction, while the sink goes on writing through the new path; the views
/// show every row all along; afterwards the old tables are gone and every rollup level equals a
/// recount from raw rows.
#[tokio::test]
async fn migration_from_0008_moves_data_in_batches() {
    let config = PostgresConfig {
        url: Services::from_env().pg_url,
        password: None,
        tls: vantage_ingester::config::PgTls::Disable,
        schema: format!("st_v8_{}", unique_id()),
    };
    let mut client = db::connect(&config).await.unwrap();
    db::migrate_to(&mut client, &config.schema, 8)
        .await
        .unwrap();
    // 8,000 results over ~3.4 days in four statements (partial rollup rows from each), some in
    // the default partition (days before upkeep's window).
    for part in 0..4 {
        client
            .batch_execute(&format!(
                "INSERT INTO results (region, agent, boot_id, seq, target_id, started_at, outcome,
                                      total_us, dns_us, body_bytes)
                 SELECT (ARRAY['eu', 'us', 'ap'])[1 + i % 3], 'pi-' || (i % 3), 7, i, 1 + i % 4,
                        now() - i * interval '37 seconds',
                        CASE WHEN i % 11 = 0 THEN 'timeout' ELSE 'up' END, 1000 + i % 5000,
                        100 + i % 300, 0
                   FROM generate_series({}, {}) AS i",
                part * 2000 + 1,
                part * 2000 + 2000
            ))
            .await
            .unwrap();
    }
    let s = Schema {
        config: config.clone(),
        client,
    };
    s.client
        .query_one("SELECT vantage_compact_rollups()", &[])
        .await
        .unwrap();
    let mut client = db::connect(&config).await.unwrap();
    db::migrate(&mut client, &config.schema).await.unwrap();
    assert_eq!(s.scalar_i64("SELECT count(*) FROM results").await, 8000);
    assert_eq!(s.scalar_i64("SELECT count(*) FROM results_raw").await, 0);

    // Batches of 1,000 rows, with the sink writing in between.
    let mut writer = db::connect_writer(&config).await.unwrap();
    let now = now_ms();
    let mut steps = 0;
    let mut seq = 100_000;
    loop {
        let moved: i64 = s
            .client
            .query_one("SELECT vantage_migrate_v8(1000)", &[])
            .await
            .unwrap()
            .get(0);
        if moved == 0 {
            break;
        }
        steps += 1;
        assert!(steps < 100, "the migration does not end");
        let batch: Vec<Row> = (0..50)
            .map(|i| {
                seq += 1;
                row(
                    seq,
                    1 + (i % 4) as u32,
                    "eu",
                    now - i * 997,
                    2000,
                    Outcome::Up,
                )
            })
            .collect();
        db::write_batch(&mut writer, &batch, &[]).await.unwrap();
        let visible = s.scalar_i64("SELECT count(*) FROM results").await;
        assert_eq!(
            visible,
            8000 + 50 * steps,
            "rows hidden during the migration"
        );
    }
    assert!(steps >= 8, "moved in {steps} steps: not batched");
    assert_eq!(
        s.scalar_i64(
            "SELECT count(*) FROM pg_class WHERE relnamespace = current_schema()::regnamespace
                AND relname LIKE '%\\_v8%'"
        )
        .await,
        0,
        "old tables left"
    );
    round(&s).await;
    let after = recount(&s).await;
    assert!(exact(&after), "after the migration: {after:?}");
    assert_eq!(
        s.scalar_i64("SELECT count(*) FROM results").await,
        8000 + 50 * steps
    );
    s.drop().await;
}

/// Issue #15, item 3: the real functions read only what their window needs (EXPLAIN ANALYZE of
/// the calls themselves, so partitions pruned at run time by the watermark do not show):
/// `region_comparison` over 24 h reads hourly rollups and raw rows from the watermark on only,
/// over 30 days daily rollups (never the hourly ones); one target is read by index;
/// `latest_status` and `failing_targets` read `latest_results` and the pending writes, never
/// the history.
#[tokio::test]
async fn explain_functions_read_only_their_window() {
    let s = Schema::new("window").await;
    let mut writer = db::connect_writer(&s.config).await.unwrap();
    let now = now_ms();
    // Three days of 20 targets × 3 regions every 5 minutes (51,840 results).
    let rows = every_five_minutes(864, 20, &["a", "b", "c"], now, |seq| {
        let outcome = if seq % 13 == 0 {
            Outcome::Timeout
        } else {
            Outcome::Up
        };
        (1000 + (seq % 900) as u32, outcome)
    });
    for chunk in rows.chunks(5_000) {
        db::write_batch(&mut writer, chunk, &[]).await.unwrap();
    }
    round(&s).await;
    // Writes after the round: pending again.
    db::write_batch(&mut writer, &rows[..600], &[])
        .await
        .unwrap();
    s.analyze().await;
    let wm_day: String = s
        .client
        .query_one(
            "SELECT to_char(hour_through AT TIME ZONE 'UTC', 'YYYYMMDD') FROM rollup_state",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let plan = |sql: String| {
        let client = &s.client;
        async move {
            client
                .query(
                    &format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {sql}"),
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    // Raw partitions a plan scans, with whether each scan used an index.
    let raw_scans = |p: &str| -> Vec<(String, bool)> {
        p.lines()
            .filter_map(|l| {
                let at = l.find(" on results_p")?;
                let day = l[at + " on results_p".len()..].get(..8)?.to_owned();
                Some((day, !l.contains("Seq Scan")))
            })
            .collect()
    };
    for (since, target) in [
        ("24 hours", Some(3)),
        ("24 hours", None),
        ("30 days", Some(3)),
        ("30 days", None),
    ] {
        let call = match target {
            Some(t) => format!("SELECT * FROM region_comparison(interval '{since}', {t})"),
            None => format!("SELECT * FROM region_comparison(interval '{since}')"),
        };
        // One target must be readable by index. A partition of a few rows is read whole
        // whatever its indexes (its heap is one page), and which partitions hold few rows
        // depends on the day the test runs (3 days of data reach into last month's daily
        // partition on the 1st to 3rd): so the planner is asked to prefer indexes, and a
        // sequential scan left in the plan means no index can serve the read.
        if target.is_some() {
            s.client
                .batch_execute("SET enable_seqscan = off")
                .await
                .unwrap();
        }
        let p = plan(call.clone()).await;
        s.client
            .batch_execute("RESET enable_seqscan")
            .await
            .unwrap();
        println!("{call}:\n{p}\n");
        assert!(
            !p.contains("Function Scan on region_comparison"),
            "not inlined: {p}"
        );
        // Raw rows: only from the watermark's day on (the hours before are rollups).
        for (day, _) in raw_scans(&p) {
            assert!(day >= wm_day, "{call} read raw rows of {day}:\n{p}");
        }
        // Migration 0014: these windows are kept (the round built them), so their histograms
        // are read from kept_windows, not merged from rollup rows.
        assert!(p.contains("on kept_windows"), "{call}:\n{p}");
        if since == "24 hours" {
            assert!(!p.contains("rollup_1d"), "{call} read daily rollups:\n{p}");
            assert!(p.contains("rollup_1h_p"), "{call}:\n{p}");
        } else {
            assert!(!p.contains("rollup_1h"), "{call} read hourly rollups:\n{p}");
            assert!(p.contains("rollup_1d_p"), "{call}:\n{p}");
        }
        if target.is_some() {
            // One target: by index, in every table that holds rows.
            for (day, indexed) in raw_scans(&p) {
                assert!(
                    indexed || day > wm_day,
                    "{call}: partition {day} read without an index:\n{p}"
                );
            }
            assert!(
                !p.contains("Seq Scan on rollup_1h_p") && !p.contains("Seq Scan on rollup_1d_p"),
                "{call}:\n{p}"
            );
        }
        // Same answer as from raw rows, within the histogram bound (probes exactly).
        let probes: i64 = s
            .client
            .query_one(&format!("SELECT sum(probes)::int8 FROM ({call}) AS x"), &[])
            .await
            .unwrap()
            .get(0);
        let start = if since == "24 hours" {
            "date_trunc('hour', now() - interval '24 hours', 'UTC')"
        } else {
            "date_trunc('day', now() - interval '30 days', 'UTC')"
        };
        let raw: i64 = s
            .scalar_i64(&format!(
                "SELECT count(*) FROM results WHERE started_at >= {start} {}",
                target
                    .map(|t| format!("AND target_id = {t}"))
                    .unwrap_or_default()
            ))
            .await;
        assert_eq!(probes, raw, "{call}");
    }
    for call in [
        "SELECT * FROM latest_status",
        "SELECT * FROM failing_targets(1, interval '1 hour')",
        "SELECT * FROM cert_expiry",
    ] {
        let p = plan(call.to_owned()).await;
        println!("{call}:\n{p}\n");
        assert!(
            p.contains("on latest_results") && p.contains("on rollup_pending d"),
            "{call}:\n{p}"
        );
        for (day, indexed) in raw_scans(&p) {
            assert!(
                indexed || day > wm_day,
                "{call}: partition {day} read without an index:\n{p}"
            );
        }
    }
    let failing = s
        .scalar_i64("SELECT count(*) FROM failing_targets(1, interval '1 day')")
        .await;
    assert!(failing > 0);
    s.drop().await;
}

/// The backend process id of `client`'s connection.
async fn backend_pid(client: &Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits (30 s at most) until the backend `pid` waits for a heavyweight lock.
async fn wait_until_blocked(observer: &Client, pid: i32, who: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let blocked: bool = observer
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                                 WHERE pid = $1 AND wait_event_type = 'Lock')",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if blocked {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{who} never waited for a lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CI failure of 2026-12-02 (tests/fleet.rs, "deadlock detected"): the sink's first upkeep
/// finished the move of the (empty) pre-0009 tables while a test read the `results` view. A
/// reader locks the view, then the tables under it in order; the move dropped the `_v8`
/// partitions first and asked for the view last, so each held what the other wanted next.
/// Here the interleaving is forced: a third session holds `outcomes` (read through the view
/// before `results_v8`), so the reader stops between the view and `results_v8`; the move
/// starts; the third session lets go. The reader must never fail, and upkeep may only yield
/// (lock timeout, retried at its next round), never deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finishing_the_pre_0009_move_never_deadlocks_a_reader() {
    let config = PostgresConfig {
        url: Services::from_env().pg_url,
        password: None,
        tls: vantage_ingester::config::PgTls::Disable,
        schema: format!("st_lock_{}", unique_id()),
    };
    let mut setup = db::connect(&config).await.unwrap();
    db::migrate(&mut setup, &config.schema).await.unwrap();
    assert!(
        setup
            .query_one("SELECT to_regclass('results_v8') IS NOT NULL", &[])
            .await
            .unwrap()
            .get::<_, bool>(0),
        "a fresh schema has the (empty) pre-0009 tables until the first upkeep"
    );

    let mut holder = db::connect(&config).await.unwrap();
    let hold = holder.transaction().await.unwrap();
    hold.batch_execute("LOCK TABLE outcomes IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let reader_client = db::connect(&config).await.unwrap();
    let reader_pid = backend_pid(&reader_client).await;
    let reader = tokio::spawn(async move {
        reader_client
            .query_one("SELECT count(*) FROM results", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
    });
    wait_until_blocked(&setup, reader_pid, "the reader").await;

    let upkeep_client = db::connect(&config).await.unwrap();
    let upkeep_pid = backend_pid(&upkeep_client).await;
    let upkeep = tokio::spawn(async move {
        let first = upkeep_client
            .query_one("SELECT vantage_migrate_v8(50000)", &[])
            .await
            .map(|r| r.get::<_, i64>(0));
        (upkeep_client, first)
    });
    wait_until_blocked(&setup, upkeep_pid, "upkeep").await;
    hold.commit().await.unwrap();

    let read = reader.await.unwrap();
    assert!(matches!(read, Ok(0)), "the reader failed: {read:?}");
    let (upkeep_client, first) = upkeep.await.unwrap();
    match first {
        Ok(n) => assert_eq!(n, 0, "nothing was left to move"),
        // Yielding to the reader is allowed; the next round finishes the move.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
            let again: i64 = upkeep_client
                .query_one("SELECT vantage_migrate_v8(50000)", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(again, 0);
        }
        Err(e) => panic!("upkeep failed otherwise than by yielding: {e:?}"),
    }
    let gone: bool = setup
        .query_one("SELECT to_regclass('results_v8') IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(gone, "the pre-0009 tables are dropped");
    let _ = setup
        .batch_execute(&format!("DROP SCHEMA {} CASCADE", config.schema))
        .await;
}

/// Migration 0012: the alert stage's two reads answer exactly what 0007's did, on latest rows
/// kept by a round and pending writes of the real write path: failures that recovered, recoveries
/// that failed again, a pair known only from pending writes, two agents of a region at the same
/// time, stale rows, missed periods, and rows written by a sink from before 0012 (no up flags).
#[tokio::test]
async fn alert_reads_answer_as_0007_did() {
    // 0007's functions, kept under other names.
    let s = Schema::keeping(
        "alertreads",
        &["vantage_alert_down", "vantage_alert_regions"],
        11,
    )
    .await;
    let mut writer = db::connect_writer(&s.config).await.unwrap();
    let regions = ["a", "b", "c", "d"];
    let now = now_ms();
    // Round 1 (into latest_results): 60 targets, 10 of them failing in 2 or 3 regions; one
    // region of target 59 last heard of an hour ago.
    let mut seq = 0;
    let mut first = Vec::new();
    for target in 1..=60u32 {
        for (i, region) in regions.iter().enumerate() {
            seq += 1;
            let failing = target % 6 == 0 && i < 2 + (target as usize % 2);
            let at = if target == 59 && *region == "d" {
                now - 3_600_000
            } else {
                now - 20_000
            };
            let outcome = if failing {
                Outcome::Timeout
            } else {
                Outcome::Up
            };
            first.push(row(seq, target, region, at, 1000, outcome));
        }
    }
    db::write_batch(&mut writer, &first, &[]).await.unwrap();
    round(&s).await;
    // Pending writes: recoveries (6, 12), new failures (1, 2), a pending-only pair (target 70),
    // missed periods (target 3), and two agents of region a at one time for target 4.
    let mut second = Vec::new();
    for (target, region, outcome) in [
        (6, "a", Outcome::Up),
        (6, "b", Outcome::Up),
        (12, "a", Outcome::Up),
        (1, "a", Outcome::ConnectRefused),
        (1, "b", Outcome::ConnectRefused),
        (2, "c", Outcome::Timeout),
        (70, "a", Outcome::Timeout),
        (70, "b", Outcome::Timeout),
        (3, "a", Outcome::Missed),
        (3, "b", Outcome::Missed),
    ] {
        seq += 1;
        second.push(row(seq, target, region, now - 5_000, 1000, outcome));
    }
    for (agent, outcome) in [("a-pi", Outcome::Up), ("a-pi2", Outcome::Timeout)] {
        seq += 1;
        let mut r = row(seq, 4, "a", now - 4_000, 1000, outcome);
        r.agent = agent.into();
        second.push(r);
        seq += 1;
        let mut r = row(seq, 4, "b", now - 4_000, 1000, Outcome::Timeout);
        r.agent = agent.into();
        second.push(r);
    }
    db::write_batch(&mut writer, &second, &[]).await.unwrap();
    // As a sink from before 0012 writes: no up flags (target 5 fails in c and d).
    s.client
        .batch_execute(&format!(
            "INSERT INTO results (region, agent, boot_id, seq, target_id, started_at, outcome,
                                  total_us, body_bytes)
             VALUES ('c', 'c-pi', 42, {a}, 5, now() - interval '3 seconds', 'timeout', 1000, 0),
                    ('d', 'd-pi', 42, {b}, 5, now() - interval '3 seconds', 'timeout', 1000, 0)",
            a = seq + 1,
            b = seq + 2
        ))
        .await
        .unwrap();
    let unflagged = s
        .scalar_i64("SELECT count(*) FROM rollup_pending WHERE l_up IS NULL")
        .await;
    assert!(
        unflagged > 0,
        "the old write path's pending rows have no flags"
    );

    let differ = |sql_old: String, sql_new: String| {
        let s = &s;
        async move { s.differ(&sql_old, &sql_new).await }
    };
    for args in [
        "'5 minutes', NULL, NULL, NULL, '{}'",
        "'5 minutes', NULL, NULL, NULL, '{6, 59, 99}'",
        "'10 seconds', NULL, NULL, NULL, '{}'",
        "'5 minutes', '{1, 4, 70}', NULL, '{a, b}', '{}'",
        "'5 minutes', NULL, '{nothing}', NULL, '{12}'",
    ] {
        let (only_old, only_new, rows) = differ(
            format!("SELECT * FROM old_vantage_alert_down({args})"),
            format!("SELECT * FROM vantage_alert_down({args})"),
        )
        .await;
        assert_eq!((only_old, only_new), (0, 0), "down({args}): {rows} rows");
        if args.starts_with("'5 minutes', NULL, NULL, NULL") {
            assert!(rows > 5, "down({args}) found the failing targets: {rows}");
        }
    }
    for args in [
        "'5 minutes', '1 day', NULL",
        "'10 minutes', '2 hours', '{a, d}'",
        "'1 second', '1 day', NULL",
    ] {
        let (only_old, only_new, rows) = differ(
            format!("SELECT * FROM old_vantage_alert_regions({args})"),
            format!("SELECT * FROM vantage_alert_regions({args})"),
        )
        .await;
        assert_eq!((only_old, only_new), (0, 0), "regions({args}): {rows} rows");
        assert!(rows > 0);
    }
    s.drop().await;
}

/// Kept windows (migration 0014) that differ from the merge of their level's rollup rows from
/// their start on (counts, outcomes, the histogram's buckets and cumulative counts).
async fn kept_mismatches(s: &Schema) -> i64 {
    s.scalar_i64(
        "WITH w AS (SELECT * FROM kept_window_spans WHERE from_ts IS NOT NULL),
              d AS (SELECT 'hour' AS unit, target_id, region_id, bucket, probes, up, outcomes,
                           total_hist FROM rollup_1h_data
                    UNION ALL
                    SELECT 'day', target_id, region_id, bucket, probes, up, outcomes, total_hist
                      FROM rollup_1d_data),
              e AS (SELECT w.win, d.target_id, d.region_id, sum(d.probes)::int8 AS probes,
                           sum(d.up)::int8 AS up, vantage_jsonb_sum_agg(d.outcomes) AS outcomes,
                           vantage_hist_merge_agg(d.total_hist) AS total_hist
                      FROM w JOIN d ON d.unit = w.unit AND d.bucket >= w.from_ts
                     GROUP BY 1, 2, 3)
         SELECT count(*) FROM e FULL JOIN kept_windows AS k USING (win, target_id, region_id)
          WHERE e.probes IS DISTINCT FROM k.probes OR e.up IS DISTINCT FROM k.up
             OR e.outcomes IS DISTINCT FROM k.outcomes
             OR k.buckets IS DISTINCT FROM (SELECT array_agg(bucket ORDER BY bucket)
                                              FROM vantage_hist_entries(e.total_hist))
             OR k.cum IS DISTINCT FROM (SELECT array_agg(c ORDER BY bucket)
                                          FROM (SELECT bucket, sum(n) OVER (ORDER BY bucket)::int8 AS c
                                                  FROM vantage_hist_entries(e.total_hist)) AS x)
             OR vantage_kept_hist(k.buckets, k.cum) IS DISTINCT FROM e.total_hist",
    )
    .await
}

/// Migration 0014: `region_comparison` answers exactly what 0009's did and `web_daily` what
/// 0008's did (and 0015's `web_region_detail` what 0008's did) (kept as baselines, EXCEPT ALL both ways), over windows with and without a kept window, for every target and for
/// one: on data of 35 days with errors, pending writes above the watermark, late data for hours
/// already materialised (before and after the round that consumes it), kept windows whose start
/// is behind or ahead of the window's (an hour or a day boundary passed since the round), and
/// after a write to the rollup tables that is not the round's (invalidated, rebuilt). The kept
/// windows stay the merge of their rows (as rollups stay a recount of raw rows).
#[tokio::test]
async fn region_comparison_answers_as_0009_did() {
    let s = Schema::keeping(
        "kept",
        &["region_comparison", "web_daily", "web_region_detail"],
        12,
    )
    .await;
    let mut writer = db::connect_writer(&s.config).await.unwrap();
    let now = now_ms();
    let regions = ["a", "b", "c"];
    let mut rng = fastrand::Rng::with_seed(15);
    // 35 days, 8 targets x 3 regions, every 20 minutes; latencies over two decades, 3% errors.
    let mut rows = Vec::new();
    let mut seq = 0;
    for step in 0..(35 * 72) {
        for target in 1..=8u32 {
            for region in regions {
                seq += 1;
                let outcome = match rng.u32(..100) {
                    0 | 1 => Outcome::Timeout,
                    2 => Outcome::ConnectRefused,
                    _ => Outcome::Up,
                };
                let total = (2_000.0 * 100f64.powf(rng.f64())) as u32 + target * 300;
                let at = now - 60_000 - step * 1_200_000 - u64::from(rng.u32(..600_000));
                rows.push(row(seq, target, region, at, total, outcome));
            }
        }
    }
    for chunk in rows.chunks(5_000) {
        db::write_batch(&mut writer, chunk, &[]).await.unwrap();
    }
    round(&s).await;
    assert_eq!(
        s.scalar_i64("SELECT count(*) FROM kept_window_spans WHERE from_ts IS NULL")
            .await,
        0,
        "the first round builds every kept window"
    );
    assert!(s.scalar_i64("SELECT count(*) FROM kept_windows").await > 0);
    assert_eq!(kept_mismatches(&s).await, 0, "after the build");

    let compare = |what: &'static str| {
        let s = &s;
        async move {
            for since in [
                "24 hours", "1 day", "7 days", "30 days", "1 hour", "6 hours", "2 days", "3 days",
            ] {
                for target in ["NULL", "3"] {
                    let old = format!(
                        "SELECT * FROM old_region_comparison(interval '{since}', {target})"
                    );
                    let new =
                        format!("SELECT * FROM region_comparison(interval '{since}', {target})");
                    let (only_old, only_new, n) = s.differ(&old, &new).await;
                    assert_eq!(
                        (only_old, only_new),
                        (0, 0),
                        "{what}: region_comparison('{since}', {target}), {n} rows"
                    );
                    let want = if target == "NULL" { 24 } else { 3 };
                    assert_eq!(n, want, "{what}: ('{since}', {target})");
                }
            }
            // And the status page's daily counts (web_daily, also 0014).
            for args in ["90, NULL", "7, 3", "1, NULL", "400, NULL"] {
                let old = format!("SELECT * FROM old_web_daily({args})");
                let new = format!("SELECT * FROM web_daily({args})");
                let (only_old, only_new, _) = s.differ(&old, &new).await;
                assert_eq!((only_old, only_new), (0, 0), "{what}: web_daily({args})");
            }
            // And the target page's region detail (0015), at every level it reads.
            for since in [
                "1 hour", "24 hours", "7 days", "8 days", "30 days", "90 days",
            ] {
                for target in [3, 5] {
                    let args = format!("{target}, interval '{since}'");
                    let old = format!("SELECT * FROM old_web_region_detail({args})");
                    let new = format!("SELECT * FROM web_region_detail({args})");
                    assert_eq!(
                        s.differ(&old, &new).await,
                        (0, 0, 3),
                        "{what}: web_region_detail({args})"
                    );
                }
            }
        }
    };
    compare("after the first round").await;

    // Pending writes: new results above the watermark, and late ones for materialised hours
    // (2 hours, 3 days and 20 days back).
    let mut more = Vec::new();
    for (i, back_ms) in [0u64, 7_200_000, 3 * 86_400_000, 20 * 86_400_000]
        .into_iter()
        .enumerate()
    {
        for target in 1..=8u32 {
            for region in regions {
                seq += 1;
                let outcome = if (seq + i as u64) % 5 == 0 {
                    Outcome::Timeout
                } else {
                    Outcome::Up
                };
                more.push(row(
                    seq,
                    target,
                    region,
                    now - 30_000 - back_ms,
                    900_000 + target * 1_000,
                    outcome,
                ));
            }
        }
    }
    db::write_batch(&mut writer, &more, &[]).await.unwrap();
    compare("with pending writes").await;
    let r = round(&s).await;
    assert!(r.late_hours > 0, "{r:?}");
    assert_eq!(kept_mismatches(&s).await, 0, "after late data");
    compare("after late data").await;

    // Starts behind the window's (subtracted at read) and ahead of it (added).
    for (as_of, what) in [
        (
            "now() - interval '50 hours'",
            "kept windows 50 hours behind",
        ),
        ("now() + interval '30 hours'", "kept windows 30 hours ahead"),
    ] {
        s.client
            .batch_execute(&format!(
                "UPDATE kept_window_spans SET from_ts = NULL;
                 SELECT vantage_kept_windows_move({as_of});"
            ))
            .await
            .unwrap();
        assert_eq!(kept_mismatches(&s).await, 0, "{what}");
        compare(what).await;
    }
    // The next round moves them back (a start that went back: rebuilt).
    round(&s).await;
    assert_eq!(kept_mismatches(&s).await, 0, "moved back");
    compare("moved back by a round").await;

    // A partition attached (or dropped, as retention does): no DML statement, so no trigger;
    // the next round sees the partitions changed and rebuilds.
    s.client
        .batch_execute(
            "CREATE TABLE kept_test_p (LIKE rollup_1h_data INCLUDING DEFAULTS);
             INSERT INTO kept_test_p SELECT '2099-01-01 00:00+00', target_id, probes, up,
                    region_id, outcomes, total_hist, dns_hist, connect_hist, tls_hist, ttfb_hist,
                    transfer_hist
               FROM rollup_1h_data WHERE bucket = date_trunc('hour', now(), 'UTC') - interval '5 hours';
             ALTER TABLE rollup_1h_data ATTACH PARTITION kept_test_p
                 FOR VALUES FROM ('2099-01-01 00:00+00') TO ('2099-02-01 00:00+00');",
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    round(&s).await;
    assert_eq!(kept_mismatches(&s).await, 0, "a partition attached");
    s.client
        .batch_execute(
            "ALTER TABLE rollup_1h_data DETACH PARTITION kept_test_p;
             DROP TABLE kept_test_p;",
        )
        .await
        .unwrap();
    round(&s).await;
    assert_eq!(kept_mismatches(&s).await, 0, "a partition dropped");
    compare("partitions changed").await;

    // A write to the rollup tables that is not the round's: invalidated, read as before, rebuilt.
    s.client
        .batch_execute("UPDATE rollup_1h_data SET probes = probes WHERE false")
        .await
        .unwrap();
    assert_eq!(
        s.scalar_i64("SELECT count(*) FROM kept_window_spans WHERE from_ts IS NOT NULL")
            .await
            + s.scalar_i64("SELECT count(*) FROM kept_windows").await,
        0,
        "invalidated"
    );
    compare("invalidated").await;
    round(&s).await;
    assert_eq!(kept_mismatches(&s).await, 0, "rebuilt");
    compare("rebuilt").await;
    s.drop().await;
}
