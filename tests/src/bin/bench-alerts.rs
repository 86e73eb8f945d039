//! The alert benchmark (issue #16). Not a test: it prints figures and writes them to
//! `target/bench/alerts.txt`. Needs every service of `tests/services` (Alertmanager included).
//!
//! 1. Evaluation cost: `latest_results` filled with `targets` × `regions` fresh rows (1% of the
//!    targets failing in 3 regions), the alert stage in-process with the default `down` rule plus
//!    `no_data` and `probe_stale`; the time of each rule's read (p50/p99) and of whole
//!    evaluations (the stage's own histogram: mean). The same run times migration 0007's
//!    `down` and `no_data` reads (kept as `baseline_*` before 0012 replaces them) against
//!    0012's, with everything consumed by the rollup round and with `targets x regions / 5`
//!    results pending (written through the sink's path in its batch size), as ratios.
//! 2. Detection latency: three agents (three regions) probing every second through a proxy each,
//!    bridge, sink and the alert stage evaluating every second; per outage, the time from cutting
//!    two regions' proxies to Alertmanager holding the alert (GET /api/v2/alerts every 20 ms).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio_util::sync::CancellationToken;
use vantage_tests::alerting::{alertmanager_url, am_alerts, region_agent};
use vantage_tests::harness::{write_file, IngesterOptions, Run};
use vantage_tests::proxy::CuttableProxy;
use vantage_tests::target::TargetServer;

#[derive(Parser)]
#[command(about = "Benchmark of vantage's alert stage: evaluation cost and detection latency")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    targets: i32,
    #[arg(long, default_value_t = 10)]
    regions: i32,
    /// Evaluations timed for the cost figure.
    #[arg(long, default_value_t = 20)]
    evaluations: usize,
    /// Outages timed for the latency figure (0: skip).
    #[arg(long, default_value_t = 20)]
    outages: usize,
    #[arg(long, default_value = "target/bench/alerts.txt")]
    out: std::path::PathBuf,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn alerts_section(run: &Run, extra: &str) -> String {
    format!(
        "alert_listen = \"off\"\n\n[alerts]\nlabels = {{ vantage_bench = \"{}\" }}\n{extra}",
        run.id
    )
}

/// The two reads 0012 replaced against 0007's (kept as `baseline_*`), in SQL as the evaluator
/// calls them: p50/p99 of `evaluations` calls each, alternating, and the ratio.
async fn compare_reads(client: &tokio_postgres::Client, label: &str, evaluations: usize) -> String {
    let mut out = String::new();
    for (name, call) in [
        (
            "down",
            "vantage_alert_down('10 minutes', NULL, NULL, NULL, '{}')",
        ),
        (
            "no_data",
            "vantage_alert_regions('10 minutes', '1 day', NULL)",
        ),
    ] {
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..evaluations {
            for (i, prefix) in ["baseline_", ""].iter().enumerate() {
                let t0 = Instant::now();
                let rows = client
                    .query(&format!("SELECT * FROM {prefix}{call}"), &[])
                    .await
                    .unwrap();
                times[i].push(t0.elapsed().as_secs_f64() * 1000.0);
                std::hint::black_box(rows);
            }
        }
        for t in &mut times {
            t.sort_by(f64::total_cmp);
        }
        let (old, new) = (percentile(&times[0], 0.5), percentile(&times[1], 0.5));
        let _ = writeln!(
            out,
            "  {label}: {name:<7} 0007 p50 {old:7.1} ms, 0012 p50 {new:7.1} ms \
             (p99 {:.1} / {:.1}): {:.1}x",
            percentile(&times[0], 0.99),
            percentile(&times[1], 0.99),
            old / new
        );
    }
    out
}

async fn evaluation_cost(args: &Args, report: &mut String) {
    let run = Run::new("bench-alerts-cost");
    let base = std::fs::read_to_string(run.ingester_file(&IngesterOptions::default())).unwrap();
    let file = run.dir.join("alert-cost.toml");
    let rules = "evaluation_interval = \"1s\"\nstale_after = \"10m\"\n\
                 [[alerts.rules]]\nname = \"down\"\nkind = \"down\"\n\
                 [[alerts.rules]]\nname = \"region-silent\"\nkind = \"no_data\"\n\
                 [[alerts.rules]]\nname = \"agent-silent\"\nkind = \"probe_stale\"\n";
    write_file(&file, &format!("{base}{}", alerts_section(&run, rules)));
    let config = vantage_ingester::Config::load(&file).unwrap();
    let mut client = vantage_ingester::db::connect(config.postgres().unwrap())
        .await
        .unwrap();
    // The baseline of the same run: 0007's two reads, kept under other names before 0012
    // replaces them.
    let schema = config.postgres().unwrap().schema.clone();
    vantage_ingester::db::migrate_to(&mut client, &schema, 11)
        .await
        .unwrap();
    for f in ["vantage_alert_down", "vantage_alert_regions"] {
        vantage_tests::harness::keep_function_as(&client, f, "baseline_").await;
    }
    vantage_ingester::db::migrate(&mut client, &schema)
        .await
        .unwrap();
    let failing = (args.targets / 100).max(1);
    client
        .execute(
            "INSERT INTO latest_results (target_id, region, agent, started_at, status, outcome,
                                         total_us)
             SELECT t, 'region-' || r, 'agent-' || r, now(), 200,
                    CASE WHEN t <= $3 AND r <= 3 THEN 'connect_refused' ELSE 'up' END, 20000
               FROM generate_series(1, $1) AS t, generate_series(1, $2) AS r",
            &[&args.targets, &args.regions, &failing],
        )
        .await
        .unwrap();
    client
        .batch_execute("ANALYZE latest_results")
        .await
        .unwrap();
    let rows = args.targets as i64 * args.regions as i64;

    // Each rule's read alone, as the evaluator issues it.
    let mut lines = String::new();
    for rule in &config.alerts.rules {
        let mut ms = Vec::new();
        for _ in 0..args.evaluations {
            let t0 = Instant::now();
            let found = vantage_ingester::alert::eval::evaluate(
                &client,
                rule,
                &Default::default(),
                config.alerts.forget_after,
            )
            .await
            .unwrap();
            ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            std::hint::black_box(found);
        }
        ms.sort_by(f64::total_cmp);
        let _ = writeln!(
            lines,
            "  rule {:<14} ({:<11}) read: p50 {:7.1} ms, p99 {:7.1} ms",
            rule.name,
            rule.kind.as_str(),
            percentile(&ms, 0.5),
            percentile(&ms, 0.99)
        );
    }

    // The two reads 0012 replaced against 0007's, in SQL as the evaluator calls them: first
    // with every result consumed by the rollup round, then with `pending` results written
    // through the sink's path and not yet consumed (10 s of writes at 10,000 targets x 10
    // regions every 50 s; 2% of them failing).
    lines.push_str(&compare_reads(&client, "consumed", args.evaluations).await);
    let pending = args.targets as usize * args.regions as usize / 5;
    {
        let mut writer = vantage_ingester::db::connect_writer(config.postgres().unwrap())
            .await
            .unwrap();
        let now = vantage_tests::now_ms();
        let rows: Vec<vantage_ingester::db::Row> = (0..pending)
            .map(|i| {
                let region = 1 + i as i32 % args.regions;
                let outcome = if i % 50 == 0 {
                    vantage_proto::Outcome::Timeout
                } else {
                    vantage_proto::Outcome::Up
                };
                vantage_ingester::db::Row {
                    region: format!("region-{region}"),
                    agent: format!("agent-{region}"),
                    boot_id: 7,
                    result: vantage_proto::ProbeResult {
                        status: 200,
                        total_us: 20_000,
                        // Targets after the failing ones, which stay failing.
                        ..vantage_proto::ProbeResult::without_response(
                            i as u64,
                            (failing + 1) as u32
                                + (i as u32 / args.regions as u32)
                                    % (args.targets - failing).max(1) as u32,
                            now - (i as u64 % 10_000),
                            outcome,
                        )
                    },
                    clock_error_ms: None,
                    clock_unsynced: None,
                }
            })
            .collect();
        // In the sink's batch size.
        for chunk in rows.chunks(500) {
            vantage_ingester::db::write_batch(&mut writer, chunk, &[])
                .await
                .unwrap();
        }
    }
    lines.push_str(&compare_reads(&client, &format!("{pending} pending"), args.evaluations).await);

    // Whole evaluations by the stage (state machine, writes of the incidents it opens), with
    // the pending results still there.
    let stop = CancellationToken::new();
    let stage = tokio::spawn({
        let s = stop.clone();
        async move { vantage_ingester::alert::run(&config, s).await.unwrap() }
    });
    let sample = |name: &str| {
        let text =
            vantage_ingester::metrics::global().encode(vantage_ingester::metrics::Stage::Alert);
        vantage_ingester::metrics::sample(&text, name).unwrap_or(0.0)
    };
    // The first evaluations open the incidents (a row and an event each); after them every
    // evaluation reads, finds the same 1% failing, and writes nothing.
    let warmup = 3;
    while (sample("vantage_alert_evaluations_total") as usize) < warmup {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (sum0, count0) = (
        sample("vantage_alert_evaluation_duration_seconds_sum"),
        sample("vantage_alert_evaluation_duration_seconds_count"),
    );
    while (sample("vantage_alert_evaluations_total") as usize) < warmup + args.evaluations {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    let summary = stage.await.unwrap();
    let sum = sample("vantage_alert_evaluation_duration_seconds_sum");
    let count = sample("vantage_alert_evaluation_duration_seconds_count");
    let open: i64 = client
        .query_one(
            "SELECT count(*) FROM alert_incidents WHERE resolved_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let _ = writeln!(
        report,
        "Evaluation cost: {} targets x {} regions = {rows} latest results ({failing} targets \
         failing in 3 regions), rules down + no_data + probe_stale\n{lines}  whole evaluation \
         (stage histogram): mean {:.1} ms over the first {count0} evaluations (they open the \
         incidents), then {:.1} ms over {} ({} incidents opened, {open} open)\n",
        args.targets,
        args.regions,
        1000.0 * sum0 / count0.max(1.0),
        1000.0 * (sum - sum0) / (count - count0).max(1.0),
        count - count0,
        summary.opened,
    );
    run.cleanup(&[]).await;
}

async fn detection_latency(args: &Args, report: &mut String) {
    let run = Run::new("bench-alerts-latency");
    let target = TargetServer::start("127.0.0.1:0").await.unwrap();
    let options = IngesterOptions {
        sink_batch_max: 100,
        sink_batch_timeout_ms: 50,
        ..IngesterOptions::default()
    };
    let base_file = run.ingester_file(&options);
    let base = std::fs::read_to_string(&base_file).unwrap();
    let config = Arc::new(vantage_ingester::Config::load(&base_file).unwrap());
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn({
        let (c, s) = (config.clone(), stop.clone());
        async move {
            vantage_ingester::sink::run(&c, s).await.unwrap();
        }
    }));
    let state = Arc::new(vantage_ingester::bridge::BridgeState::default());
    tasks.push(tokio::spawn({
        let (c, s, st) = (config.clone(), stop.clone(), state.clone());
        async move {
            vantage_ingester::bridge::run_with_state(&c, s, st)
                .await
                .unwrap();
        }
    }));
    while !state.subscribed.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut proxies = Vec::new();
    let mut agents = Vec::new();
    for region in ["ap-south", "eu-north", "us-east"] {
        let proxy = CuttableProxy::start(target.addr, true).await.unwrap();
        agents.push(region_agent(
            &run,
            region,
            &format!("http://{}/", proxy.addr),
            "1s",
        ));
        proxies.push(proxy);
    }
    let file = run.dir.join("alert-latency.toml");
    let extra = format!(
        "evaluation_interval = \"1s\"\nresend_interval = \"5s\"\nstale_after = \"5s\"\n\
         [[alerts.alertmanagers]]\nurl = \"{}\"\n",
        alertmanager_url()
    );
    write_file(&file, &format!("{base}{}", alerts_section(&run, &extra)));
    let alert_config = vantage_ingester::Config::load(&file).unwrap();
    tasks.push(tokio::spawn({
        let s = stop.clone();
        async move {
            vantage_ingester::alert::run(&alert_config, s)
                .await
                .unwrap();
        }
    }));
    let client = run.pg().await;
    let incidents = || async {
        client
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE resolved_at IS NULL) FROM alert_incidents",
                &[],
            )
            .await
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .unwrap_or((0, 0))
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut latencies = Vec::new();
    for i in 0..args.outages {
        let before = incidents().await.0;
        let t0 = Instant::now();
        proxies[1].cut();
        proxies[2].cut();
        // Alertmanager holds an active alert of the new incident.
        let want = (before + 1).to_string();
        loop {
            let alerts = am_alerts("vantage_bench", &run.id).await;
            if alerts
                .iter()
                .any(|a| a["annotations"]["incident_id"] == want.as_str())
            {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "outage {i}: no alert in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        latencies.push(t0.elapsed().as_secs_f64());
        proxies[1].restore();
        proxies[2].restore();
        while incidents().await.1 > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Calm between outages, longer than the flap window (10 evaluations): outages every few
        // seconds would (rightly) be one flapping incident, not separate detections.
        tokio::time::sleep(Duration::from_secs(11)).await;
    }
    latencies.sort_by(f64::total_cmp);
    let _ = writeln!(
        report,
        "Detection latency (failure start -> Alertmanager holds the alert): probe interval 1 s, \
         evaluation 1 s, rule down (2 of 3 regions, for = 2), {} outages: p50 {:.2} s, p99 \
         {:.2} s, min {:.2} s, max {:.2} s (goal <= 2 x interval + evaluation + 1 s = 4 s)",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.first().copied().unwrap_or(f64::NAN),
        latencies.last().copied().unwrap_or(f64::NAN),
    );
    stop.cancel();
    for (token, task) in agents {
        token.cancel();
        let _ = task.await;
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut sessions = vec![run.bridge_client_id(&options.client)];
    sessions.extend(
        ["ap-south", "eu-north", "us-east"]
            .iter()
            .map(|r| format!("vantage-agent-{r}-{}", run.id)),
    );
    run.cleanup(&sessions).await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
    let mut report = String::new();
    evaluation_cost(&args, &mut report).await;
    print!("{report}");
    if args.outages > 0 {
        let mut latency = String::new();
        detection_latency(&args, &mut latency).await;
        print!("{latency}");
        report.push_str(&latency);
    }
    write_file(&args.out, &report);
    println!("written to {}", args.out.display());
}
