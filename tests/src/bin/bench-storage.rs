//! Storage benchmark (issue: "storage that lasts for years"). Not a test: prints figures and
//! writes them to a file. Run with `make bench-storage` (needs the services).
//!
//! Loads synthetic results (default 10 million: 200 targets × 5 regions, spread over the last 30
//! days) through the sink's own writer (`db::write_batch`) in statements of the sink's size
//! (`--chunk`, default 500), runs the rollup round, then reports storage bytes per result after
//! upkeep, the cost of the same rollup round at 1 day and at the full history, the 24-hour and 30-day region comparison of
//! one target and of all targets from rollups and from raw rows, the same raw queries on a naive
//! single table with one B-tree on time (the shape public solutions use), and the time to apply
//! retention to one expired partition.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use tokio_postgres::Client;
use vantage_ingester::config::PostgresConfig;
use vantage_ingester::db;
use vantage_proto::{IpAddress, Outcome, Phase, ProbeResult, RegexOutcome};

#[derive(Parser)]
#[command(about = "Storage benchmark: partitioned results and rollups vs a naive table")]
struct Args {
    /// Results to load.
    #[arg(long, default_value_t = 10_000_000)]
    results: u64,
    #[arg(long, default_value_t = 200)]
    targets: u32,
    #[arg(long, default_value_t = 5)]
    regions: u32,
    #[arg(long, default_value_t = 30)]
    days: u32,
    /// Rows per write statement (the sink's batch: unnest below 2,000 rows, COPY from there).
    #[arg(long, default_value_t = 500)]
    chunk: u64,
    /// Schema to (re)create for the run.
    #[arg(long, default_value = "bench_storage")]
    schema: String,
    /// Keep the schema afterwards.
    #[arg(long)]
    keep: bool,
    /// Reuse the data a previous `--keep` (or interrupted) run left in the schema.
    #[arg(long)]
    skip_load: bool,
    #[arg(long, default_value = "target/bench/storage.txt")]
    out: PathBuf,
}

/// The synthetic results, time-major (step k of every series, then step k + 1), as agents
/// deliver them: result `i` of `total`.
struct Synth {
    regions: Vec<String>,
    series: u64,
    step_ms: u64,
    start_ms: u64,
    total: u64,
    targets_regions: u64,
    /// Deterministic synthetic data.
    rng: fastrand::Rng,
}

impl Synth {
    fn new(args: &Args) -> Synth {
        let regions: Vec<String> = (0..args.regions).map(|r| format!("region-{r}")).collect();
        let series = u64::from(args.targets) * u64::from(args.regions);
        let per_series = args.results / series;
        let span_ms = u64::from(args.days) * 86_400_000 - 60_000;
        let step_ms = span_ms / per_series.max(1);
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Synth {
            regions,
            series,
            step_ms,
            start_ms: now_ms - span_ms,
            total: per_series * series,
            targets_regions: u64::from(args.regions),
            rng: fastrand::Rng::with_seed(0x9E37_79B9_7F4A_7C15),
        }
    }

    /// Result `i`; `seq_offset` moves it to another sequence number (a distinct result).
    fn row(&mut self, i: u64, at_ms: Option<u64>, seq_offset: u64) -> db::Row {
        let step = i / self.series;
        let s = i % self.series;
        let target = (s / self.targets_regions) as u32;
        let region_ix = (s % self.targets_regions) as usize;
        let started_ms =
            at_ms.unwrap_or(self.start_ms + step * self.step_ms + (s * 997) % self.step_ms.max(1));
        // Latency: per-target base, slower far regions, log-normal-ish spread.
        let base = 20_000.0 + f64::from(target) * 500.0;
        let region_factor = 1.0 + region_ix as f64 * 0.6;
        let total_us = (base * region_factor * (0.5 + self.rng.f64()).powi(2) * 1.6) as u32;
        let fail = self.rng.u32(..100) == 0;
        db::Row {
            region: self.regions[region_ix].clone(),
            agent: format!("{}-pi", self.regions[region_ix]),
            boot_id: 1,
            result: ProbeResult {
                seq: step + seq_offset,
                target_id: target,
                started_at_ms: started_ms,
                status: if fail { 0 } else { 200 },
                outcome: if fail { Outcome::Timeout } else { Outcome::Up },
                failed_phase: fail.then_some(Phase::FirstByte),
                regex: RegexOutcome::NotConfigured,
                total_us,
                dns_us: Some(total_us / 20),
                connect_us: Some(total_us / 10),
                tls_us: Some(total_us / 5),
                ttfb_us: Some(total_us / 2),
                transfer_us: Some(total_us / 10),
                body_bytes: 5120,
                body_truncated: false,
                redirects: 0,
                cert_not_after_s: Some(1_900_000_000),
                remote_ip: Some(IpAddress::V4([192, 0, 2, 10])),
                kind: vantage_proto::ProbeKind::Http,
                tls_version: None,
                dns: None,
            },
            clock_error_ms: None,
            clock_unsynced: None,
        }
    }
}

/// Loads results `from..to` through the sink's writer (`db::write_batch`: unnest below 2,000
/// rows, COPY from there, the dimension ids and the pending row in the same transaction), in
/// statements of `chunk` rows.
async fn load(
    client: &mut Client,
    synth: &mut Synth,
    chunk: u64,
    from: u64,
    to: u64,
) -> Result<(), db::DbError> {
    let mut written = from;
    while written < to {
        let n = chunk.min(to - written);
        let rows: Vec<db::Row> = (written..written + n)
            .map(|i| synth.row(i, None, 0))
            .collect();
        db::write_batch(client, &rows, &[]).await?;
        written += n;
        if (written - from) % (chunk * 200) == 0 || written == to {
            eprintln!("bench-storage: loaded {written} / {}", synth.total);
        }
    }
    Ok(())
}

/// The same rollup round at any history length: 10 results of every series for an hour that is
/// already materialised (late data, distinct results each time), written in statements of
/// `chunk` rows, then one round. Median of 3 (ms of the round alone).
async fn standard_round(
    client: &Client,
    writer: &mut Client,
    synth: &mut Synth,
    chunk: u64,
    loaded: u64,
    salt: u64,
) -> Result<(f64, i64), Box<dyn std::error::Error>> {
    let last_ms = synth.start_ms + (loaded / synth.series) * synth.step_ms;
    let hour_ms = (last_ms / 3_600_000).saturating_sub(3) * 3_600_000;
    let mut times = Vec::new();
    let mut late_hours = 0;
    for k in 0..3u64 {
        let rows: Vec<db::Row> = (0..synth.series * 10)
            .map(|i| {
                let at = hour_ms + (i / synth.series) * 300_000 + (i % synth.series);
                synth.row(
                    i % synth.series,
                    Some(at),
                    1_000_000_000 + salt * 1_000_000 + k * 100_000 + i,
                )
            })
            .collect();
        for c in rows.chunks(chunk as usize) {
            db::write_batch(writer, c, &[]).await?;
        }
        let t = Instant::now();
        let r = vantage_ingester::storage::rollup_round(client).await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        late_hours = r.late_hours;
    }
    times.sort_by(f64::total_cmp);
    Ok((times[1], late_hours))
}

/// Median wall time of `runs` executions of `sql` (after one warm-up).
async fn time_query(client: &Client, sql: &str, runs: usize) -> Result<f64, tokio_postgres::Error> {
    let times = vantage_tests::bench::query_times(client, sql, runs).await?;
    Ok(times[times.len() / 2])
}

async fn scalar(client: &Client, sql: &str) -> Result<i64, tokio_postgres::Error> {
    Ok(client.query_one(sql, &[]).await?.get(0))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let config = PostgresConfig {
        url: vantage_tests::Services::from_env().pg_url,
        password: None,
        tls: vantage_ingester::config::PgTls::Disable,
        schema: args.schema.clone(),
    };
    let mut client = db::connect(&config).await?;
    if !args.skip_load {
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", args.schema))
            .await?;
        // Migration 0012's region_comparison and web_daily (before 0014's kept windows), kept as
        // the same-run baselines `baseline_*` (bench-web reads them too).
        db::migrate_to(&mut client, &args.schema, 12).await?;
        for f in ["region_comparison", "web_daily"] {
            vantage_tests::harness::keep_function_as(&client, f, "baseline_").await;
        }
        db::migrate(&mut client, &args.schema).await?;
        vantage_ingester::storage::migrate_v8(&client, 50_000, Duration::from_secs(60)).await?;
        client
            .query_one(
                "SELECT vantage_ensure_partitions(7, $1, $1)",
                &[&(args.days as i32 + 1)],
            )
            .await?;
    }
    let mut writer = db::connect_writer(&config).await?;

    let mut report = String::new();
    let mut line = |s: String| {
        println!("{s}");
        report.push_str(&s);
        report.push('\n');
    };

    let mut synth = Synth::new(&args);
    let mut load_s = f64::NAN;
    let mut rounds = None;
    if !args.skip_load {
        // The first day, its round, the standard round at 1 day of history; then the rest, its
        // round, the standard round at the full history.
        let total = synth.total;
        let first = (total / u64::from(args.days.max(1))).min(total);
        let t = Instant::now();
        load(&mut writer, &mut synth, args.chunk, 0, first).await?;
        let mut elapsed = t.elapsed().as_secs_f64();
        vantage_ingester::storage::rollup_round(&client).await?;
        let day1 = standard_round(&client, &mut writer, &mut synth, args.chunk, first, 1).await?;
        let t = Instant::now();
        load(&mut writer, &mut synth, args.chunk, first, total).await?;
        elapsed += t.elapsed().as_secs_f64();
        load_s = elapsed;
        let t = Instant::now();
        let catch_up = vantage_ingester::storage::rollup_round(&client).await?;
        let catch_up_ms = t.elapsed().as_secs_f64() * 1000.0;
        let full = standard_round(&client, &mut writer, &mut synth, args.chunk, total, 2).await?;
        rounds = Some((day1, full, catch_up_ms, catch_up));
        client.batch_execute("VACUUM ANALYZE").await?;
    }
    let n = scalar(&client, "SELECT count(*) FROM results").await?;
    line(format!(
        "vantage storage benchmark — {n} results ({} targets × {} regions over {} days)",
        args.targets, args.regions, args.days
    ));
    let loaded = synth.total;
    line(format!(
        "load: {loaded} results in {load_s:.1} s through the sink's writer (db::write_batch) in statements of {} rows: {:.0} results/s",
        args.chunk,
        loaded as f64 / load_s
    ));
    if let Some(((d1, h1), (d30, h30), catch_up_ms, catch_up)) = rounds {
        line(format!(
            "rollup round with the same late data ({h1} / {h30} hourly buckets recounted), median of 3: {d1:.1} ms at 1 day of history, {d30:.1} ms at {} days: ratio {:.2}",
            args.days,
            d30 / d1
        ));
        line(format!(
            "round after the load (late data: {} hourly rows recounted, {} new; {} daily rows): {catch_up_ms:.0} ms",
            catch_up.late_hours, catch_up.hours, catch_up.days
        ));
    }

    // Naive baseline: one table, one B-tree on time.
    let t = Instant::now();
    client
        .batch_execute(
            "DROP TABLE IF EXISTS naive_results;
             CREATE TABLE naive_results AS SELECT * FROM results;
             CREATE INDEX naive_results_time ON naive_results (started_at);
             ANALYZE naive_results;",
        )
        .await?;
    line(format!(
        "naive table built in {:.1} s (not part of the comparison)",
        t.elapsed().as_secs_f64()
    ));

    let size = |sql: &'static str| {
        let c = &client;
        async move { scalar(c, sql).await }
    };
    let tree = |t: &'static str, f: &'static str| {
        let c = &client;
        async move {
            scalar(
                c,
                &format!("SELECT coalesce(sum({f}(relid)), 0)::int8 FROM pg_partition_tree('{t}')"),
            )
            .await
        }
    };
    let raw = tree("results_raw", "pg_total_relation_size").await?;
    let raw_heap = tree("results_raw", "pg_relation_size").await?;
    let r1h = tree("rollup_1h_data", "pg_total_relation_size").await?;
    let r1d = tree("rollup_1d_data", "pg_total_relation_size").await?;
    let latest = size("SELECT pg_total_relation_size('latest_results')").await?;
    let other = size(
        "SELECT (pg_total_relation_size('rollup_pending') + pg_total_relation_size('regions')
                 + pg_total_relation_size('agents') + pg_total_relation_size('outcomes')
                 + pg_total_relation_size('phases') + pg_total_relation_size('rollup_state'))::int8",
    )
    .await?;
    let naive = size("SELECT pg_total_relation_size('naive_results')").await?;
    let per = |b: i64| b as f64 / n as f64;
    line(String::new());
    line("storage after upkeep, bytes per result:".into());
    line(format!(
        "  results_raw heap          {:>8.1}",
        per(raw_heap)
    ));
    line(format!(
        "  results_raw indexes       {:>8.1}",
        per(raw - raw_heap)
    ));
    line(format!("  rollup_1h_data (+ idx)    {:>8.1}", per(r1h)));
    line(format!("  rollup_1d_data (+ idx)    {:>8.1}", per(r1d)));
    line(format!("  latest_results            {:>8.1}", per(latest)));
    line(format!("  dimensions, pending, state{:>8.1}", per(other)));
    line(format!(
        "  total                     {:>8.1}",
        per(raw + r1h + r1d + latest + other)
    ));
    line(format!("  naive table + time index  {:>8.1}", per(naive)));
    line(format!(
        "  naive / total             {:>8.2}",
        naive as f64 / (raw + r1h + r1d + latest + other) as f64
    ));

    let raw_query = |table: &str, since: &str, target: Option<i32>| {
        format!(
            "SELECT target_id, region, count(*), avg((outcome = 'up')::int),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY total_us),
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY total_us),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY total_us)
               FROM {table}
              WHERE started_at >= now() - interval '{since}' {}
              GROUP BY 1, 2",
            target.map_or(String::new(), |t| format!("AND target_id = {t}"))
        )
    };
    for jit in ["off", "on"] {
        client.batch_execute(&format!("SET jit = {jit}")).await?;
        line(String::new());
        line(format!(
            "region comparison, JIT {jit}, median of 5 runs (ms):"
        ));
        line(format!(
            "  {:<26} {:>10} {:>12} {:>14} {:>12} {:>10} {:>10} {:>10}",
            "query",
            "rollups",
            "0012 fn",
            "raw partitioned",
            "raw naive",
            "0012/now",
            "naive/rollup",
            "naive/raw"
        ));
        for (label, since, target) in [
            ("one target, 24 hours", "24 hours", Some(17)),
            ("one target, 30 days", "30 days", Some(17)),
            ("all targets, 24 hours", "24 hours", None),
            ("all targets, 30 days", "30 days", None),
        ] {
            let rollup_sql = format!(
                "SELECT * FROM region_comparison(interval '{since}'{})",
                target.map_or(String::new(), |t| format!(", {t}"))
            );
            let runs = 5;
            let r = time_query(&client, &rollup_sql, runs).await?;
            let baseline_sql =
                rollup_sql.replace("region_comparison", "baseline_region_comparison");
            let b = time_query(&client, &baseline_sql, runs).await?;
            // The answers must be the same rows, both ways.
            let differ = scalar(
                &client,
                &format!(
                    "SELECT (SELECT count(*) FROM ({rollup_sql} EXCEPT ALL {baseline_sql}) AS x)
                          + (SELECT count(*) FROM ({baseline_sql} EXCEPT ALL {rollup_sql}) AS y)"
                ),
            )
            .await?;
            if differ != 0 {
                return Err(format!("{label}: {differ} rows differ from the 0012 function").into());
            }
            let p = time_query(&client, &raw_query("results", since, target), runs).await?;
            let q = time_query(&client, &raw_query("naive_results", since, target), runs).await?;
            line(format!(
                "  {label:<26} {r:>10.1} {b:>12.1} {p:>14.1} {q:>12.1} {:>9.1}x {:>9.0}x {:>9.1}x",
                b / r,
                q / r,
                q / p
            ));
        }
    }
    client.batch_execute("SET jit = off").await?;

    // Retention of one expired day: drop the oldest partition.
    let oldest_keep = format!("{} days", args.days - 1);
    let t = Instant::now();
    let dropped: Vec<String> = client
        .query(
            &format!(
                "SELECT relation FROM vantage_apply_retention(interval '{oldest_keep}', interval '400 days')"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let retention_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    let deleted = client
        .execute(
            &format!(
                "DELETE FROM naive_results WHERE started_at < now() - interval '{oldest_keep}'"
            ),
            &[],
        )
        .await?;
    let naive_delete_ms = t.elapsed().as_secs_f64() * 1000.0;
    line(String::new());
    line(format!(
        "retention of one expired day: {retention_ms:.1} ms (dropped {dropped:?}); the same day by DELETE on the naive table: {naive_delete_ms:.1} ms for {deleted} rows (and leaves bloat for VACUUM)"
    ));

    if !args.keep {
        client
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", args.schema))
            .await?;
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &report)?;
    println!("\nwritten to {}", args.out.display());
    Ok(())
}
