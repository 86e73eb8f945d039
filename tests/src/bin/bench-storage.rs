//! Storage benchmark (issue: "storage that lasts for years"). Not a test: prints figures and
//! writes them to a file. Run with `make bench-storage` (needs the services).
//!
//! Loads synthetic results (default 10 million: 200 targets × 5 regions, spread over the last 30
//! days) by binary COPY into the partitioned `results` table (the insert trigger keeps the
//! rollups), then reports storage bytes per result, the 24-hour and 30-day region comparison of
//! one target and of all targets from rollups and from raw rows, the same raw queries on a naive
//! single table with one B-tree on time (the shape public solutions use), and the time to apply
//! retention to one expired partition.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use vantage_ingester::config::PostgresConfig;
use vantage_ingester::db;

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
    /// Rows per COPY statement (one trigger run per statement).
    #[arg(long, default_value_t = 100_000)]
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

/// xorshift64*: deterministic synthetic data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

async fn load(client: &mut Client, args: &Args) -> Result<(), tokio_postgres::Error> {
    let regions: Vec<String> = (0..args.regions).map(|r| format!("region-{r}")).collect();
    let series = u64::from(args.targets) * u64::from(args.regions);
    let per_series = args.results / series;
    let span_ms = u64::from(args.days) * 86_400_000 - 60_000;
    let step_ms = span_ms / per_series.max(1);
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let start_ms = now_ms - span_ms;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let total = per_series * series;
    let mut written = 0u64;
    let ip: std::net::IpAddr = "192.0.2.10".parse().expect("ip");
    let cert = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
    while written < total {
        let n = args.chunk.min(total - written);
        let tx = client.transaction().await?;
        let sink = tx
            .copy_in(&format!(
                "COPY results ({}) FROM STDIN (FORMAT binary)",
                db::COLUMNS
            ))
            .await?;
        let writer = BinaryCopyInWriter::new(sink, &db::COLUMN_TYPES);
        pin_mut!(writer);
        for i in written..written + n {
            // Time-major order, as agents deliver: step k of every series, then step k + 1.
            let step = i / series;
            let s = i % series;
            let target = (s / u64::from(args.regions)) as i32;
            let region_ix = (s % u64::from(args.regions)) as usize;
            let started = SystemTime::UNIX_EPOCH
                + Duration::from_millis(start_ms + step * step_ms + (s * 997) % step_ms.max(1));
            // Latency: per-target base, slower far regions, log-normal-ish spread.
            let base = 20_000.0 + f64::from(target) * 500.0;
            let region_factor = 1.0 + region_ix as f64 * 0.6;
            let total_us = (base * region_factor * (0.5 + rng.unit()).powi(2) * 1.6) as i32;
            let fail = rng.next() % 100 == 0;
            let outcome = if fail { "timeout" } else { "up" };
            let agent = format!("{}-pi", regions[region_ix]);
            let row: [&(dyn ToSql + Sync); 21] = [
                &regions[region_ix],
                &agent,
                &1i64,
                &(step as i64),
                &target,
                &started,
                &(if fail { None } else { Some(200i16) }),
                &outcome,
                &None::<bool>,
                &total_us,
                &Some(total_us / 20),
                &Some(total_us / 10),
                &Some(total_us / 5),
                &Some(total_us / 2),
                &5120i32,
                &(if fail { Some("first_byte") } else { None }),
                &Some(total_us / 10),
                &false,
                &0i16,
                &Some(cert),
                &Some(ip),
            ];
            writer.as_mut().write(&row).await?;
        }
        writer.finish().await?;
        tx.commit().await?;
        written += n;
        if written % (args.chunk * 10) == 0 || written == total {
            eprintln!("bench-storage: loaded {written} / {total}");
        }
    }
    Ok(())
}

/// Median wall time of `runs` executions of `sql` (after one warm-up).
async fn time_query(client: &Client, sql: &str, runs: usize) -> Result<f64, tokio_postgres::Error> {
    client.simple_query(sql).await?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        client.simple_query(sql).await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
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
        db::migrate(&mut client, &args.schema).await?;
        client
            .query_one(
                "SELECT vantage_ensure_partitions(7, $1)",
                &[&(args.days as i32 + 1)],
            )
            .await?;
    }

    // The same planner settings for every query compared below: JIT compilation (on by default)
    // costs ~0.6 s on these plans and would dominate all of them.
    client.batch_execute("SET jit = off").await?;

    let mut report = String::new();
    let mut line = |s: String| {
        println!("{s}");
        report.push_str(&s);
        report.push('\n');
    };

    let mut load_s = f64::NAN;
    if !args.skip_load {
        let t = Instant::now();
        load(&mut client, &args).await?;
        load_s = t.elapsed().as_secs_f64();
        client.batch_execute("ANALYZE").await?;
    }
    let n = scalar(&client, "SELECT count(*) FROM results").await?;
    line(format!(
        "vantage storage benchmark — {n} results ({} targets × {} regions over {} days)",
        args.targets, args.regions, args.days
    ));
    line(format!(
        "load: {load_s:.1} s by binary COPY in statements of {} rows, rollups by trigger: {:.0} results/s",
        args.chunk,
        n as f64 / load_s
    ));

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
    let raw =
        size("SELECT sum(pg_total_relation_size(relid))::int8 FROM pg_partition_tree('results')")
            .await?;
    let raw_heap =
        size("SELECT sum(pg_relation_size(relid))::int8 FROM pg_partition_tree('results')").await?;
    let r1m =
        size("SELECT sum(pg_total_relation_size(relid))::int8 FROM pg_partition_tree('rollup_1m')")
            .await?;
    let r1h =
        size("SELECT sum(pg_total_relation_size(relid))::int8 FROM pg_partition_tree('rollup_1h')")
            .await?;
    let r1d =
        size("SELECT sum(pg_total_relation_size(relid))::int8 FROM pg_partition_tree('rollup_1d')")
            .await?;
    let latest = size("SELECT pg_total_relation_size('latest_results')").await?;
    let naive = size("SELECT pg_total_relation_size('naive_results')").await?;
    let per = |b: i64| b as f64 / n as f64;
    line(String::new());
    line("storage, bytes per result:".into());
    line(format!(
        "  results heap              {:>8.1}",
        per(raw_heap)
    ));
    line(format!(
        "  results indexes           {:>8.1}",
        per(raw - raw_heap)
    ));
    line(format!("  rollup_1m (+ indexes)     {:>8.1}", per(r1m)));
    line(format!("  rollup_1h (+ indexes)     {:>8.1}", per(r1h)));
    line(format!("  rollup_1d (+ indexes)     {:>8.1}", per(r1d)));
    line(format!("  latest_results            {:>8.1}", per(latest)));
    line(format!(
        "  total                     {:>8.1}",
        per(raw + r1m + r1h + r1d + latest)
    ));
    line(format!("  naive table + time index  {:>8.1}", per(naive)));

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
    line(String::new());
    line("region comparison, median of 5 runs (ms):".into());
    line(format!(
        "  {:<26} {:>10} {:>14} {:>12} {:>10} {:>10}",
        "query", "rollups", "raw partitioned", "raw naive", "naive/rollup", "naive/raw"
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
        let runs = if target.is_none() && since == "30 days" {
            3
        } else {
            5
        };
        let r = time_query(&client, &rollup_sql, runs).await?;
        let p = time_query(&client, &raw_query("results", since, target), runs).await?;
        let q = time_query(&client, &raw_query("naive_results", since, target), runs).await?;
        line(format!(
            "  {label:<26} {r:>10.1} {p:>14.1} {q:>12.1} {:>9.0}x {:>9.1}x",
            q / r,
            q / p
        ));
    }

    // Retention of one expired day: drop the oldest partition.
    let oldest_keep = format!("{} days", args.days - 1);
    let t = Instant::now();
    let dropped: Vec<String> = client
        .query(
            &format!(
                "SELECT vantage_apply_retention(interval '{oldest_keep}', interval '400 days')"
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
