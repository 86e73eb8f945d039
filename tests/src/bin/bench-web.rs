//! Dashboard benchmark (issue #17). Not a test: prints figures and writes them to a file. Run
//! with `make bench-web` (needs the services, and Chromium from `tests/services/up`).
//!
//! On the storage benchmark's data (200 targets × 5 regions over 30 days; the schema is filled
//! by running `bench-storage --keep` when it is empty, so the generator is the storage
//! benchmark's own): the server time of `--requests` sequential requests (after warm-up) for
//! the overview and one target page at 24 hours and 30 days, measured at the client on loopback
//! with gzip (p50 / p99), the bytes of each page (gzipped, and the static files a first visit
//! adds), and the time from navigation start to the rendered latency chart in headless
//! Chromium (`data-chart-rendered-ms`, set by app.js after uPlot drew).

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use vantage_ingester::config::PostgresConfig;
use vantage_ingester::db;
use vantage_tests::alerting::http_with;

#[derive(Parser)]
#[command(about = "Dashboard benchmark: server time, bytes, time to a rendered chart")]
struct Args {
    /// Schema with the data (filled by bench-storage --keep when empty).
    #[arg(long, default_value = "bench_web")]
    schema: String,
    /// Results bench-storage loads when it fills the schema (200 targets × 5 regions × 30
    /// days; its own default is 10 million).
    #[arg(long, default_value_t = 10_000_000)]
    results: u64,
    /// Requests per page.
    #[arg(long, default_value_t = 50)]
    requests: usize,
    /// Target of the target pages.
    #[arg(long, default_value_t = 17)]
    target: i32,
    /// Chromium page loads for the chart timing.
    #[arg(long, default_value_t = 10)]
    loads: usize,
    #[arg(long, default_value = "target/bench/web.txt")]
    out: PathBuf,
}

/// The Content-Length of a response head (the bytes on the wire after the head).
fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Median wall time of `runs` executions of `sql` on `client` (after one warm-up).
async fn sql_p50(
    client: &tokio_postgres::Client,
    sql: &str,
    runs: usize,
) -> Result<f64, tokio_postgres::Error> {
    let times = vantage_tests::bench::query_times(client, sql, runs).await?;
    Ok(quantile(&times, 0.5))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let services = vantage_tests::Services::from_env();
    let pg: tokio_postgres::Config = services.pg_url.parse()?;
    let config = PostgresConfig {
        url: format!(
            "host=127.0.0.1 port={} user={} dbname={}",
            pg.get_ports().first().copied().unwrap_or(5432),
            pg.get_user().unwrap_or("vantage"),
            pg.get_dbname().unwrap_or("vantage")
        ),
        password: pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        tls: vantage_ingester::config::PgTls::Disable,
        schema: args.schema.clone(),
    };
    let mut client = db::connect(&config).await?;
    let have: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = 'latest_results'",
            &[&args.schema],
        )
        .await?
        .get(0);
    let rows: i64 = if have > 0 {
        client
            .query_one("SELECT count(*) FROM latest_results", &[])
            .await?
            .get(0)
    } else {
        0
    };
    if rows == 0 {
        let exe = std::env::current_exe()?;
        let storage = exe.with_file_name("bench-storage");
        eprintln!(
            "bench-web: {} is empty; loading it with {} --keep --results {}",
            args.schema,
            storage.display(),
            args.results
        );
        let status = std::process::Command::new(&storage)
            .args(["--keep", "--schema", &args.schema])
            .arg("--results")
            .arg(args.results.to_string())
            .arg("--out")
            .arg(args.out.with_file_name("storage-for-web.txt"))
            .status()?;
        if !status.success() {
            return Err(format!("{} failed: {status}", storage.display()).into());
        }
    }
    // The web functions of this binary's migrations (a schema from an older run gets them).
    db::migrate(&mut client, &args.schema).await?;
    // One rollup round first, as the sink's runs every `rollup_interval`: without it a schema
    // loaded an hour ago is read with its kept windows an hour behind (each read then corrects
    // them by the hour in between), which a live dashboard never sees.
    let started = Instant::now();
    let round = vantage_ingester::storage::rollup_round(&client).await?;
    println!(
        "bench-web: rollup round before measuring: {:.1} s ({} hours materialised, {} late)",
        started.elapsed().as_secs_f64(),
        round.hours,
        round.late_hours
    );
    client.batch_execute("ANALYZE").await?;
    let results: i64 = client
        .query_one("SELECT sum(probes)::int8 FROM rollup_1d", &[])
        .await?
        .get(0);
    let shape = client
        .query_one(
            "SELECT count(DISTINCT target_id), count(DISTINCT region),
                    extract(epoch FROM max(bucket) - min(bucket))::float8 / 86400 + 1
               FROM rollup_1d",
            &[],
        )
        .await?;
    let (targets, regions, days): (i64, i64, f64) = (shape.get(0), shape.get(1), shape.get(2));

    let web = vantage_ingester::web::WebConfig {
        listen: "127.0.0.1:0".parse()?,
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let (addr, _task) = vantage_ingester::web::start(&config, &web, stop.clone()).await?;
    let base = format!("http://{addr}");

    let mut report = String::new();
    let mut line = |s: String| {
        println!("{s}");
        report.push_str(&s);
        report.push('\n');
    };
    line(format!(
        "vantage dashboard benchmark — {results} results ({targets} targets × {regions} regions \
         over {days:.0} days, schema {}), {} requests per page, sequential, gzip, loopback",
        args.schema, args.requests
    ));
    line(String::new());
    line(format!(
        "  {:<28} {:>9} {:>9} {:>9} {:>12} {:>12}",
        "page", "p50 ms", "p99 ms", "max ms", "bytes (gz)", "bytes (raw)"
    ));
    let t = args.target;
    let pages = [
        ("overview /".to_owned(), "/".to_owned()),
        (
            format!("target {t}, 24 h"),
            format!("/targets/{t}?window=24h"),
        ),
        (
            format!("target {t}, 30 d"),
            format!("/targets/{t}?window=30d"),
        ),
        ("overview JSON /api/".to_owned(), "/api/overview".to_owned()),
        (
            "regions heatmap, 24 h".to_owned(),
            "/regions?window=24h".to_owned(),
        ),
    ];
    let gz = [("Accept-Encoding", "gzip")];
    for (label, path) in &pages {
        let url = format!("{base}{path}");
        for _ in 0..3 {
            http_with("GET", &url, &gz, None).await;
        }
        let mut times = Vec::with_capacity(args.requests);
        let mut bytes = 0;
        for _ in 0..args.requests {
            let start = Instant::now();
            let (status, head, _) = http_with("GET", &url, &gz, None).await;
            times.push(start.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(status, 200, "{url}");
            bytes = content_length(&head);
        }
        let (_, raw_head, _) = http_with("GET", &url, &[], None).await;
        times.sort_by(f64::total_cmp);
        line(format!(
            "  {label:<28} {:>9.1} {:>9.1} {:>9.1} {:>12} {:>12}",
            quantile(&times, 0.5),
            quantile(&times, 0.99),
            times[times.len() - 1],
            bytes,
            content_length(&raw_head)
        ));
    }
    let statics: usize = vantage_ingester::web::assets::ASSETS
        .iter()
        .filter(|a| a.name != "uPlot-LICENSE.txt")
        .map(|a| {
            let served = vantage_ingester::web::assets::find(
                vantage_ingester::web::assets::url(a.name).trim_start_matches("/static/"),
            );
            served.map_or(0, |s| s.gzipped.len())
        })
        .sum();
    line(format!(
        "  static files of a first visit (CSS, uPlot, app.js, icon; gzipped, then cached for a year): {statics} bytes"
    ));

    // The overview's two heavy reads against migration 0012's functions, when the schema keeps
    // them (bench-storage keeps them as baseline_*): the same-run baseline of migration 0014.
    let baselines: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = current_schema()::regnamespace
                AND proname IN ('baseline_region_comparison', 'baseline_web_daily')",
            &[],
        )
        .await?
        .get(0);
    if baselines == 2 {
        line(String::new());
        line(format!(
            "  {:<44} {:>9} {:>12} {:>9}",
            "the overview's SQL reads (p50 of 20, ms)", "now", "0012's", "0012/now"
        ));
        for (label, sql) in [
            (
                "region_comparison('24 hours') (also heatmap)",
                "SELECT * FROM region_comparison(interval '24 hours', NULL)",
            ),
            (
                "region_comparison('7 days')",
                "SELECT * FROM region_comparison(interval '7 days', NULL)",
            ),
            (
                "region_comparison('30 days')",
                "SELECT * FROM region_comparison(interval '30 days', NULL)",
            ),
            ("web_daily(90)", "SELECT * FROM web_daily(90, NULL)"),
        ] {
            let base_sql = sql.replace("FROM ", "FROM baseline_");
            let now_ms = sql_p50(&client, sql, 20).await?;
            let base_ms = sql_p50(&client, &base_sql, 20).await?;
            line(format!(
                "  {label:<44} {now_ms:>9.1} {base_ms:>12.1} {:>8.1}x",
                base_ms / now_ms
            ));
        }
    }

    line(String::new());
    let browser = vantage_tests::browser::Browser::start(1400, 1000).await;
    for window in ["24h", "30d"] {
        let url = format!("{base}/targets/{t}?window={window}");
        let mut times = Vec::new();
        let mut first = None;
        for i in 0..=args.loads {
            browser.goto(&url).await;
            let v = browser
                .script("return document.body.dataset.chartRenderedMs || null;")
                .await;
            let ms: f64 = v.as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
            if i == 0 {
                first = Some(ms);
            } else {
                times.push(ms);
            }
        }
        times.sort_by(f64::total_cmp);
        line(format!(
            "  Chromium, target page {window}: chart rendered {:.0} ms after navigation start \
             (median of {}; first, cold cache: {:.0} ms; p90 {:.0} ms)",
            quantile(&times, 0.5),
            times.len(),
            first.unwrap_or(f64::NAN),
            quantile(&times, 0.9)
        ));
    }
    browser.quit().await;
    stop.cancel();
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, report)?;
    eprintln!("bench-web: written to {}", args.out.display());
    Ok(())
}
