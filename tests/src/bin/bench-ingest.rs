//! The ingest benchmark (issue: "delivery that never loses or duplicates a result"). Not a test:
//! it prints figures and writes them to a file. Run it with `make bench-ingest` (release build,
//! all services on this machine).
//!
//! 1. Bytes per result on the MQTT uplink for batches of 1, 8 and 32, beside the same results as
//!    JSON.
//! 2. The sink's two write methods on the same rows: binary COPY into a staging table + INSERT …
//!    SELECT … ON CONFLICT DO NOTHING, against one INSERT … SELECT FROM unnest(…).
//! 3. Sustained throughput, MQTT → committed PostgreSQL rows: simulated agents publish as fast as
//!    they can through one bridge and one sink (release `vantage-ingester` processes).
//!    In the same run, on the same data (the Kafka topic the bridge filled): a consumer that
//!    INSERTs one row per autocommit statement, and psql's `\copy` of the same rows from a file
//!    (the ceiling); both ratios.
//! 4. End-to-end latency, probe finished → row committed, p50 and p99, at 5,000 results/s.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use vantage_ingester::db::{self, Row};
use vantage_ingester::sink::{decode_message, Decoded};
use vantage_proto::{Batch, MAX_FRAME_LEN};
use vantage_tests::harness::{agent_client_ids, IngesterOptions, Run};
use vantage_tests::loadgen::{self, LoadSpec, Synth};
use vantage_tests::stage::StageProcess;

#[derive(Parser)]
#[command(about = "Benchmark of vantage's ingest path: MQTT -> Kafka -> PostgreSQL")]
struct Args {
    /// Results for the throughput run.
    #[arg(long, default_value_t = 200_000)]
    results: u64,
    /// Simulated agents for the throughput run.
    #[arg(long, default_value_t = 8)]
    agents: usize,
    /// Seconds of the latency run at 5,000 results/s.
    #[arg(long, default_value_t = 30)]
    latency_seconds: u64,
    /// Time box of the row-per-INSERT baseline, seconds.
    #[arg(long, default_value_t = 30)]
    baseline_seconds: u64,
    /// Where to write the figures.
    #[arg(long, default_value = "target/bench/ingest.txt")]
    out: PathBuf,
    /// Only parts 1 and 2 (no services beyond PostgreSQL).
    #[arg(long)]
    quick: bool,
}

/// Collects the report: printed as it goes and written at the end.
#[derive(Default)]
struct Report(String);

impl Report {
    fn line(&mut self, s: impl AsRef<str>) {
        println!("{}", s.as_ref());
        let _ = writeln!(self.0, "{}", s.as_ref());
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(bench(args))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let mut r = Report::default();
    r.line(format!(
        "vantage ingest benchmark — {} — {} CPUs, all services on this machine",
        humantime_now(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    r.line(format!(
        "command: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    ));
    r.line("");
    bytes_per_result(&mut r)?;
    write_methods(&mut r).await?;
    if !args.quick {
        throughput(&mut r, &args).await?;
        latency(&mut r, &args).await?;
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &r.0)?;
    println!("\nwritten to {}", args.out.display());
    Ok(())
}

fn humantime_now() -> String {
    let out = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%dT%H:%M:%SZ")
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// 1. postcard frames vs JSON, payload and on the wire (MQTT 3.1.1 PUBLISH, QoS 1).
fn bytes_per_result(r: &mut Report) -> anyhow::Result<()> {
    r.line("## 1. Bytes per result on the MQTT uplink (realistic synthetic results)");
    let topic = "vantage/v1/results/eu-north/pi-kitchen";
    r.line(format!(
        "   on the wire = payload + MQTT PUBLISH header (fixed header, topic \"{topic}\", packet id)"
    ));
    r.line(format!(
        "{:>6} {:>13} {:>13} {:>13} {:>13} {:>13} {:>13} {:>8} {:>8}",
        "batch",
        "v3 B/res",
        "+MQTT B/res",
        "v2 B/res",
        "+MQTT B/res",
        "JSON B/res",
        "+MQTT B/res",
        "v2/v3",
        "JSON/v3"
    ));
    let mut synth = Synth::new(0x5eed);
    for n in [1usize, 8, 32] {
        let frames = 3200 / n;
        // Payload bytes of each frame: version 4 (what agents send; for these http results the
        // bytes of version 3), version 2 (before issue #18 item 6) and JSON, of the same batches.
        let (mut v3, mut v2, mut js) = (Vec::new(), Vec::new(), Vec::new());
        for f in 0..frames {
            let mut batch = Batch {
                boot_id: 0x1234_5678_9abc_def0,
                results: heapless::Vec::new(),
                gaps: heapless::Vec::new(),
                clock: None,
            };
            for i in 0..n {
                let mut res = synth.result();
                res.seq = (f * n + i) as u64;
                let _ = batch.results.push(res);
            }
            // What a synchronised Pi sends (issue #18 item 3): tens of ms of maximum error,
            // up for days, sealed a second or two after its last probe started.
            batch.clock = Some(vantage_proto::ClockHealth {
                synced: true,
                max_error_ms: 40 + (f % 200) as u32,
                est_error_ms: 3 + (f % 20) as u32,
                synced_from_seq: Some(0),
                boot_age_s: 259_200 + f as u32 * 10,
                sealed_at_ms: batch.results.last().map_or(0, |r| r.started_at_ms) + 1_500,
            });
            let mut buf = [0u8; MAX_FRAME_LEN];
            let v4 = vantage_proto::encode(&batch, &mut buf)?.len();
            // An http result costs the same in version 4 as in version 3 (issue #20).
            assert_eq!(v4, vantage_proto::encode_v3(&batch, &mut buf)?.len());
            v3.push(v4);
            v2.push(vantage_proto::encode_v2(&batch, &mut buf)?.len());
            js.push(serde_json::to_vec(&batch)?.len());
        }
        let mqtt = |payload: usize| {
            let remaining = 2 + topic.len() + 2 + payload;
            let len_bytes = if remaining < 128 {
                1
            } else if remaining < 16_384 {
                2
            } else {
                3
            };
            1 + len_bytes + remaining
        };
        let per = |total: usize| total as f64 / (frames * n) as f64;
        let payload = |sizes: &[usize]| per(sizes.iter().sum());
        let wire = |sizes: &[usize]| per(sizes.iter().map(|&p| mqtt(p)).sum());
        r.line(format!(
            "{n:>6} {:>13.1} {:>13.1} {:>13.1} {:>13.1} {:>13.1} {:>13.1} {:>7.2}x {:>7.1}x",
            payload(&v3),
            wire(&v3),
            payload(&v2),
            wire(&v2),
            payload(&js),
            wire(&js),
            wire(&v2) / wire(&v3),
            wire(&js) / wire(&v3)
        ));
    }
    r.line("   v3: the packed frame agents send (vantage_proto::v4, the same size as v3 for http results), with a synchronised agent's clock health (about 10 bytes a frame); v2: the plain postcard frame before it (no clock); JSON: serde_json of the same Batch (field names, enums as strings; no clock); ratios on the wire");
    r.line("");
    Ok(())
}

/// Rows for the database benchmarks: `agents` × `per_agent` synthetic results.
fn synthetic_rows(n: usize, salt: u64) -> Vec<Row> {
    let mut synth = Synth::new(salt);
    (0..n)
        .map(|i| {
            let mut result = synth.result();
            result.seq = i as u64;
            Row {
                region: vantage_tests::loadgen::REGIONS[i % 4].to_owned(),
                agent: format!("bench-{}", i % 16),
                boot_id: salt,
                result,
                clock_error_ms: None,
                clock_unsynced: None,
            }
        })
        .collect()
}

/// 2. COPY + staging vs unnest, same rows, alternating, median of 3 rounds.
async fn write_methods(r: &mut Report) -> anyhow::Result<()> {
    r.line(
        "## 2. Sink write method: binary COPY into a staging table + INSERT … SELECT … ON CONFLICT",
    );
    r.line("##    DO NOTHING, vs one INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING");
    r.line("   same rows, emptied table per round, one transaction per batch, median of 3 rounds (alternating);
   rows go to results_raw with their ids and one rollup_pending row per batch (migration 0009; no trigger)");
    r.line(format!(
        "{:>12} {:>10} {:>14} {:>14} {:>8}",
        "rows/batch", "rows", "COPY rows/s", "unnest rows/s", "COPY/unnest"
    ));
    let run = Run::new("bench-write");
    let options = IngesterOptions::default();
    let config = run.ingester_config(&options);
    let pg = config.postgres()?.clone();
    let mut client = db::connect_writer(&pg).await?;
    db::migrate(&mut client, &pg.schema).await?;
    for batch_rows in [100usize, 1_000, 4_000, 16_000] {
        // Small batches are slow (a round trip and a transaction each): fewer rows.
        let total = (batch_rows * 60).clamp(6_000, 96_000);
        let mut copy = Vec::new();
        let mut unnest = Vec::new();
        for round in 0..3u64 {
            for method in [db::WriteMethod::Copy, db::WriteMethod::Unnest] {
                client
                    .batch_execute(
                        "TRUNCATE results_raw, rollup_1h_data, rollup_1d_data, latest_results,
                                  rollup_pending",
                    )
                    .await?;
                let rows = synthetic_rows(total, 1000 + round);
                let t0 = Instant::now();
                for chunk in rows.chunks(batch_rows) {
                    match method {
                        db::WriteMethod::Copy => db::copy_batch(&mut client, chunk, &[]).await?,
                        db::WriteMethod::Unnest => {
                            db::insert_batch(&mut client, chunk, &[]).await?
                        }
                    };
                }
                let rate = total as f64 / t0.elapsed().as_secs_f64();
                match method {
                    db::WriteMethod::Copy => copy.push(rate),
                    db::WriteMethod::Unnest => unnest.push(rate),
                }
            }
        }
        let (c, u) = (median(&mut copy), median(&mut unnest));
        r.line(format!(
            "{batch_rows:>12} {total:>10} {c:>14.0} {u:>14.0} {:>7.2}x",
            c / u
        ));
    }
    r.line(format!(
        "   the sink uses COPY for batches of {} rows or more, unnest below (db::COPY_MIN_ROWS)",
        db::COPY_MIN_ROWS
    ));
    r.line("");
    drop(client);
    run.cleanup(&[]).await;
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Starts a sink and a bridge process for `run`, waits until the bridge subscribed.
async fn stages(
    run: &Run,
    options: &IngesterOptions,
) -> anyhow::Result<(StageProcess, StageProcess)> {
    let file = run.ingester_file(options);
    let migrate = Command::new(vantage_tests::stage::workspace_bin("vantage-ingester"))
        .args(["migrate", "--config"])
        .arg(&file)
        .output()?;
    anyhow::ensure!(migrate.status.success(), "migrate failed: {migrate:?}");
    let sink = StageProcess::start("sink", "sink", &file, &run.dir);
    let bridge = StageProcess::start("bridge", "bridge", &file, &run.dir);
    anyhow::ensure!(
        bridge
            .wait_log("subscribed", 1, Duration::from_secs(60))
            .await,
        "bridge did not subscribe"
    );
    anyhow::ensure!(
        sink.wait_log("sink running", 1, Duration::from_secs(60))
            .await,
        "sink did not start"
    );
    Ok((sink, bridge))
}

/// 3. Throughput, and both baselines on the same data.
async fn throughput(r: &mut Report, args: &Args) -> anyhow::Result<()> {
    r.line("## 3. Sustained throughput, MQTT -> committed PostgreSQL rows");
    let run = Run::new("bench-tp");
    let options = IngesterOptions::default();
    let (mut sink, mut bridge) = stages(&run, &options).await?;
    let mut spec = LoadSpec::new(&run.services, &run.prefix(), &format!("tp-{}", run.id));
    spec.agents = args.agents;
    spec.rate = 1e9; // as fast as the uplinks go
    spec.results_per_agent = args.results.div_ceil(args.agents as u64);
    spec.threads = 1;
    let expected = spec.results_per_agent * args.agents as u64;
    let t0 = Instant::now();
    let load = loadgen::start(spec, CancellationToken::new());
    let reports = load.finish().await;
    let published = t0.elapsed();
    let got = run
        .wait_rows(expected as i64, Duration::from_secs(600))
        .await;
    let committed = t0.elapsed();
    anyhow::ensure!(
        got as u64 == expected,
        "only {got} of {expected} rows arrived"
    );
    let pipeline = expected as f64 / committed.as_secs_f64();
    r.line(format!(
        "   {} agents (the agent's uplink, batches of 32) -> Mosquitto -> 1 bridge -> Kafka (4 partitions) -> 1 sink (batch_max 500, 200 ms) -> PostgreSQL",
        args.agents
    ));
    r.line(format!(
        "   {expected} results published in {:.1} s ({:.0}/s), all committed after {:.1} s",
        published.as_secs_f64(),
        expected as f64 / published.as_secs_f64(),
        committed.as_secs_f64()
    ));
    r.line(format!(
        "   pipeline: {pipeline:>10.0} results/s (first publish -> last row committed)"
    ));
    let _ = sink.terminate(Duration::from_secs(30));
    let _ = bridge.terminate(Duration::from_secs(30));

    // The same rows, from the Kafka topic the bridge filled, one autocommit INSERT each.
    let baseline = row_per_insert(&run, args.baseline_seconds).await?;
    r.line(format!(
        "   baseline, one autocommit INSERT per row (same Kafka data, {} rows in {:.1} s, time-boxed): {:>8.0} rows/s",
        baseline.0,
        baseline.1.as_secs_f64(),
        baseline.0 as f64 / baseline.1.as_secs_f64()
    ));
    let per_row = baseline.0 as f64 / baseline.1.as_secs_f64();

    // The same rows again, with psql's \copy from a CSV file into an empty table.
    let (copied, secs) = psql_copy(&run).await?;
    let ceiling = copied as f64 / secs;
    r.line(format!(
        "   ceiling, psql \\copy of the same {copied} rows from a CSV file into an empty results_raw (the sink's table, no triggers): {ceiling:>8.0} rows/s ({secs:.2} s)"
    ));
    r.line(format!(
        "   ratios: pipeline / row-per-INSERT = {:.1}x; pipeline / psql COPY = {:.2} ({:.0}% of the ceiling)",
        pipeline / per_row,
        pipeline / ceiling,
        100.0 * pipeline / ceiling
    ));
    r.line("");
    run.cleanup(&{
        let mut c = agent_client_ids(&reports);
        c.push(run.bridge_client_id("a"));
        c
    })
    .await;
    Ok(())
}

/// Reads the run's results topic from the beginning and inserts each row with its own
/// autocommit INSERT into a fresh `results` table, for at most `seconds`.
async fn row_per_insert(run: &Run, seconds: u64) -> anyhow::Result<(u64, Duration)> {
    let pg_run = Run::new("bench-rowins");
    let config = pg_run.ingester_config(&IngesterOptions::default());
    let pg = config.postgres()?.clone();
    let mut client = db::connect(&pg).await?;
    db::migrate(&mut client, &pg.schema).await?;
    let statement = db::prepare_row_insert(&client).await?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &run.services.kafka_brokers)
        .set("group.id", format!("rowins-{}", run.id))
        .set("enable.auto.commit", "false")
        .create()?;
    let topic = run.topic();
    let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(seconds);
    let mut rows = 0u64;
    let mut idle = 0;
    'outer: while Instant::now() < deadline && idle < 10 {
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            idle += 1;
            continue;
        };
        idle = 0;
        let m = m?;
        if let Decoded::Rows(batch, _, _) = decode_message(m.key(), m.payload()) {
            for row in &batch {
                db::insert_row(&client, &statement, row)
                    .await
                    .map_err(|e| anyhow::anyhow!("row INSERT: {e:?}"))?;
                rows += 1;
                if Instant::now() >= deadline {
                    break 'outer;
                }
            }
        }
    }
    let took = t0.elapsed();
    drop(client);
    pg_run.cleanup(&[]).await;
    Ok((rows, took))
}

/// Exports the run's rows to a CSV file, then times psql `\copy` of it into an empty table with
/// the same schema. Returns (rows, seconds).
async fn psql_copy(run: &Run) -> anyhow::Result<(u64, f64)> {
    let psql = psql_binary();
    let file = run.dir.join("rows.csv");
    // The table the sink writes (migration 0009: ids, not names), without triggers: the
    // physical limit of the write path.
    let cols = "boot_id, seq, started_at, ingested_at, cert_not_after, agent_id, target_id, total_us, body_bytes, dns_us, connect_us, tls_us, ttfb_us, transfer_us, region_id, outcome_id, failed_phase_id, status, redirects, regex_match, body_truncated, remote_ip";
    // psql running one command, stopping at its first error.
    let psql_c = |command: String| {
        let mut c = Command::new(&psql);
        c.arg(&run.services.pg_url)
            .args(["-qAtX", "-v", "ON_ERROR_STOP=1", "-c"])
            .arg(command);
        c
    };
    let export = psql_c(format!(
        "\\copy (SELECT {cols} FROM {}.results_raw) TO '{}' (FORMAT csv)",
        run.schema(),
        file.display()
    ))
    .output()?;
    anyhow::ensure!(export.status.success(), "export failed: {export:?}");
    let target = Run::new("bench-copy");
    let config = target.ingester_config(&IngesterOptions::default());
    let pg = config.postgres()?.clone();
    let mut client = db::connect(&pg).await?;
    db::migrate(&mut client, &pg.schema).await?;
    let t0 = Instant::now();
    let out = psql_c(format!(
        "\\copy {}.results_raw ({cols}) FROM '{}' (FORMAT csv)",
        target.schema(),
        file.display()
    ))
    // The schema's triggers name its functions without a schema.
    .env("PGOPTIONS", format!("-c search_path={}", target.schema()))
    .output()?;
    let secs = t0.elapsed().as_secs_f64();
    anyhow::ensure!(out.status.success(), "psql \\copy failed: {out:?}");
    // results_raw itself: the `results` view joins dimension rows this schema does not have.
    let n: i64 = client
        .query_one("SELECT count(*) FROM results_raw", &[])
        .await?
        .get(0);
    drop(client);
    target.cleanup(&[]).await;
    Ok((n as u64, secs))
}

fn psql_binary() -> PathBuf {
    if let Ok(p) = std::env::var("PSQL") {
        return p.into();
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.into_iter()
        .rev()
        .map(|d| d.join("bin/psql"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| "psql".into())
}

/// 4. Latency at 5,000 results/s.
async fn latency(r: &mut Report, args: &Args) -> anyhow::Result<()> {
    r.line("## 4. End-to-end latency at 5,000 results/s, probe finished -> row committed");
    let run = Run::new("bench-lat");
    let (mut sink, mut bridge) = stages(&run, &IngesterOptions::default()).await?;
    let mut spec = LoadSpec::new(&run.services, &run.prefix(), &format!("lat-{}", run.id));
    spec.agents = 10;
    spec.rate = 5000.0;
    spec.results_per_agent = 500 * args.latency_seconds;
    spec.flush_interval = Duration::from_secs(1);
    let expected = spec.results_per_agent * 10;
    let t0 = Instant::now();
    let reports = loadgen::start(spec, CancellationToken::new())
        .finish()
        .await;
    let produced_in = t0.elapsed();
    let got = run
        .wait_rows(expected as i64, Duration::from_secs(300))
        .await;
    anyhow::ensure!(
        got as u64 == expected,
        "only {got} of {expected} rows arrived"
    );
    let client = run.pg().await;
    // Probe finished = started_at + total; committed ≈ ingested_at (set just before COMMIT).
    let row = client
        .query_one(
            "WITH l AS (
               SELECT extract(epoch FROM ingested_at - started_at) * 1000 - total_us / 1000.0 AS ms
                 FROM results)
             SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
                    max(ms)::float8, count(*)
               FROM l",
            &[],
        )
        .await?;
    let (p50, p99, max, n): (f64, f64, f64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
    r.line(format!(
        "   10 agents × 500 results/s for {:.0} s ({n} results; batches of 32, flush 1 s), 1 bridge, 1 sink (batch_max 500, 200 ms)",
        produced_in.as_secs_f64()
    ));
    r.line(format!(
        "   latency ms: p50 {p50:.0}, p99 {p99:.0}, max {max:.0}"
    ));
    r.line("   (at the agent a batch of 32 fills in 64 ms at 500 results/s; finished = started_at + total_us;");
    r.line("    committed = ingested_at, set by the sink's final INSERT just before COMMIT; one clock)");
    let _ = sink.terminate(Duration::from_secs(30));
    let _ = bridge.terminate(Duration::from_secs(30));
    let mut clients = agent_client_ids(&reports);
    clients.push(run.bridge_client_id("a"));
    run.cleanup(&clients).await;
    Ok(())
}
