//! The dashboard in a real browser (issue #17): agents in three regions probe a local target
//! with different injected delays (eu-north none, us-east +200 ms before the first byte,
//! ap-south answered with 500), bridge and sink carry the results through Mosquitto and Kafka
//! into PostgreSQL, the alert stage opens an incident, and `vantage-ingester web` serves the
//! pages to a headless Chromium (Debian's, over WebDriver: `vantage_tests::browser`).
//! Screenshots of every page go to `target/web-screenshots/` on every run.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use vantage_tests::alerting::http_with;
use vantage_tests::browser::Browser;
use vantage_tests::harness::{write_file, IngesterOptions, Run};
use vantage_tests::target::TargetServer;

const REGIONS: [&str; 3] = ["ap-south", "eu-north", "us-east"];
const DELAY_MS: u64 = 200;
const XSS: &str = "<script>alert(1)</script>";

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,vantage_ingester::web=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The query string each region's agent probes with: the delay or failure it sees.
fn region_query(region: &str) -> String {
    match region {
        "us-east" => format!("?delay_ms={DELAY_MS}"),
        "ap-south" => "?status=500".into(),
        _ => "?delay_ms=0".into(),
    }
}

/// An agent of `region` probing targets 1 and 2 every 500 ms.
fn agent(
    run: &Run,
    region: &str,
    target: &TargetServer,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let pw = run.dir.join("agent.pw");
    write_file(&pw, "agent-secret");
    let q = region_query(region);
    // The spool (uplink.spool_max_bytes) lives in state_dir: this run's folder.
    let spool_state_dir = run.dir.display();
    let text = format!(
        r#"
agent_id = "{region}-{id}"
region = "{region}"
state_dir = "{spool_state_dir}"

[mqtt]
host = "{host}"
port = {port}
username = "agent"
password_file = "{pw}"
topic_prefix = "{prefix}"

[uplink]
batch_max = 4
flush_interval = "100ms"
drain_timeout = "2s"

[fleet]
heartbeat_interval = "1s"

[[targets]]
id = 1
url = "{url1}"
interval = "500ms"
timeout = "450ms"

[[targets]]
id = 2
url = "{url2}"
interval = "500ms"
timeout = "450ms"
"#,
        id = run.id,
        host = run.services.mqtt_host,
        port = run.services.mqtt_port,
        pw = pw.display(),
        prefix = run.prefix(),
        url1 = target.url(&format!("/shop{q}")),
        url2 = target.url(&format!("/other{q}")),
    );
    let path = run.dir.join(format!("agent-{region}.toml"));
    write_file(&path, &text);
    let config = vantage_agent::Config::load(&path).expect("agent config");
    let token = CancellationToken::new();
    let t = token.clone();
    let handle = tokio::spawn(async move {
        let _ = vantage_agent::run(config, Default::default(), t).await;
    });
    (token, handle)
}

async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Where the screenshots go: `target/web-screenshots/` of the workspace.
fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/web-screenshots")
}

/// Console entries at WARNING or SEVERE (a CSP violation, a failed load, an exception).
fn problems(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .filter(|e| matches!(e["level"].as_str(), Some("SEVERE" | "WARNING")))
        .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Starts `web` on `file`'s config in-process; its base URL.
async fn web(file: &std::path::Path, stop: &CancellationToken) -> String {
    let config = vantage_ingester::Config::load(file).unwrap();
    let (addr, _task) =
        vantage_ingester::web::start(config.postgres().unwrap(), &config.web, stop.clone())
            .await
            .unwrap();
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_in_a_real_browser() {
    init_tracing();
    let run = Run::new("web");
    let target = TargetServer::start("127.0.0.1:0").await.unwrap();
    let options = IngesterOptions {
        partitions: 2,
        sink_batch_max: 100,
        sink_batch_timeout_ms: 50,
        ..IngesterOptions::default()
    };
    let base_file = run.ingester_file(&options);
    let base = std::fs::read_to_string(&base_file).unwrap();
    let config = Arc::new(vantage_ingester::Config::load(&base_file).unwrap());
    // The schema first, then the targets' names as `targets apply` records them (name, url):
    // the agents below probe local targets 1 and 2, so no set is published.
    let mut pg = vantage_ingester::db::connect(config.postgres().unwrap())
        .await
        .unwrap();
    vantage_ingester::db::migrate(&mut pg, &run.schema())
        .await
        .unwrap();
    pg.execute(
        "INSERT INTO targets (target_id, name, url, created_at) VALUES
            (1, 'shop', $1, now()), (2, $2, $3, now())",
        &[&target.url("/shop"), &XSS, &target.url("/other")],
    )
    .await
    .unwrap();

    let stop = CancellationToken::new();
    let sink = tokio::spawn({
        let (c, s) = (config.clone(), stop.clone());
        async move { vantage_ingester::sink::run(&c, s).await.unwrap() }
    });
    let state = Arc::new(vantage_ingester::bridge::BridgeState::default());
    let bridge = tokio::spawn({
        let (c, s, st) = (config.clone(), stop.clone(), state.clone());
        async move {
            vantage_ingester::bridge::run_with_state(&c, s, st)
                .await
                .unwrap()
        }
    });
    wait_for(
        "the bridge's subscription",
        Duration::from_secs(60),
        || async { state.subscribed.load(Ordering::Acquire).then_some(()) },
    )
    .await;
    let agents: Vec<_> = REGIONS.iter().map(|r| agent(&run, r, &target)).collect();

    // The alert stage on the same data: target 1 fails from ap-south, one region is enough.
    let alert_file = run.dir.join("alert.toml");
    write_file(
        &alert_file,
        &format!(
            "{base}alert_listen = \"off\"\n\n[alerts]\nevaluation_interval = \"500ms\"\n\
             stale_after = \"5s\"\n\n[[alerts.rules]]\nname = \"shop-down\"\nkind = \"down\"\n\
             targets = [1]\nmin_regions = 1\nfor = 1\n"
        ),
    );
    let alert = tokio::spawn({
        let c = vantage_ingester::Config::load(&alert_file).unwrap();
        let s = stop.clone();
        async move {
            let _ = vantage_ingester::alert::run(&c, s).await;
        }
    });

    let client = run.pg().await;
    wait_for(
        "20 results of target 1 from every region, and an open incident",
        Duration::from_secs(90),
        || async {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM (SELECT region FROM results WHERE target_id = 1
                      GROUP BY region HAVING count(*) >= 20) AS r",
                    &[],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            let open: i64 = client
                .query_one(
                    "SELECT count(*) FROM alert_incidents WHERE resolved_at IS NULL",
                    &[],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            (n == 3 && open > 0).then_some(())
        },
    )
    .await;

    // The dashboard: open on loopback, one with a token, one public.
    let web_file = run.dir.join("web.toml");
    write_file(
        &web_file,
        &format!("{base}\n[web]\nlisten = \"127.0.0.1:0\"\n"),
    );
    let url = web(&web_file, &stop).await;
    let browser = Browser::start(1400, 1700).await;
    let shots = screenshots();

    // --- Overview: the failing region's cell is down, the others up; the name is text. ----
    browser.goto(&format!("{url}/")).await;
    let cells = browser
        .script(
            "return [...document.querySelectorAll('td.cell[data-target=\"1\"]')]
                .map(e => [e.dataset.region, e.dataset.state, e.querySelector('.badge').textContent]);",
        )
        .await;
    let cells: Vec<(String, String, String)> = serde_json::from_value(cells).unwrap();
    assert_eq!(
        cells,
        vec![
            ("ap-south".into(), "down".into(), "down".into()),
            ("eu-north".into(), "up".into(), "up".into()),
            ("us-east".into(), "up".into(), "up".into()),
        ],
        "overview cells of target 1"
    );
    let xss = browser
        .script(
            "const a = document.querySelector('tr[data-target=\"2\"] a.target-name');
             return [a ? a.textContent : null, document.scripts.length,
                     [...document.scripts].every(s => s.src !== '' || s.type === 'application/json'),
                     document.querySelectorAll('.open-incidents tr[data-incident]').length];",
        )
        .await;
    assert_eq!(xss[0], XSS, "the target name renders as text: {xss}");
    assert_eq!(xss[1], 2, "only the page's own two scripts: {xss}");
    assert_eq!(xss[2], true, "no inline script: {xss}");
    assert!(
        xss[3].as_i64().unwrap_or(0) >= 1,
        "the open incident at the top: {xss}"
    );
    browser.screenshot(&shots.join("overview.png")).await;
    let console = problems(&browser.console().await);
    assert!(console.is_empty(), "console on the overview: {console:?}");

    // Its JSON twin says the same.
    let (status, _, body) = http_with("GET", &format!("{url}/api/overview"), &[], None).await;
    assert_eq!(status, 200, "{body}");
    let o: Value = serde_json::from_str(&body).unwrap();
    let t1 = o["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == 1)
        .unwrap();
    let states: Vec<&str> = t1["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["down", "up", "up"], "{t1}");

    // --- Target page: one p95 series per region, the slower region's p95 the larger, the
    // injected delay in the first-byte phase. ---------------------------------------------
    browser.goto(&format!("{url}/targets/1?window=1h")).await;
    let chart = browser
        .script(
            "const u = window.vantageCharts && window.vantageCharts.latency;
             if (!u) return null;
             const mean = i => { const v = u.data[i].filter(x => x != null);
                                 return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null; };
             return { labels: u.series.slice(1).map(s => s.label),
                      means: u.series.slice(1).map((s, i) => mean(i + 1)),
                      points: u.data[0].length,
                      rendered: document.body.dataset.chartRenderedMs || null };",
        )
        .await;
    assert!(!chart.is_null(), "no chart drawn");
    let labels: Vec<String> = serde_json::from_value(chart["labels"].clone()).unwrap();
    let p95: Vec<&String> = labels.iter().filter(|l| l.ends_with(" p95")).collect();
    assert_eq!(
        p95,
        ["ap-south p95", "eu-north p95", "us-east p95"],
        "one p95 series per region: {chart}"
    );
    let mean = |label: &str| {
        let i = labels.iter().position(|l| l == label).unwrap();
        chart["means"][i].as_f64().unwrap_or(0.0)
    };
    assert!(
        mean("us-east p95") > mean("eu-north p95") + DELAY_MS as f64 * 0.8,
        "the slower region's p95 is the larger: {chart}"
    );
    assert!(chart["rendered"].is_string(), "{chart}");
    let phases = browser
        .script(
            "const v = (r, p) => { const e = document.querySelector(
                 `#phases rect[data-region=\"${r}\"][data-phase=\"${p}\"]`);
                 return e ? parseFloat(e.dataset.ms) : null; };
             return { slow: ['dns', 'connect', 'tls', 'ttfb', 'transfer'].map(p => v('us-east', p)),
                      fast: ['dns', 'connect', 'tls', 'ttfb', 'transfer'].map(p => v('eu-north', p)) };",
        )
        .await;
    let slow: Vec<f64> = serde_json::from_value(phases["slow"].clone()).unwrap();
    let fast: Vec<f64> = serde_json::from_value(phases["fast"].clone()).unwrap();
    assert!(
        slow[3] >= DELAY_MS as f64 && slow[3] - fast[3] >= DELAY_MS as f64 * 0.9,
        "the injected {DELAY_MS} ms shows in us-east's first-byte phase: {phases}"
    );
    for (i, phase) in ["dns", "connect", "tls"].iter().enumerate() {
        assert!(
            slow[i] < 50.0,
            "{phase} of us-east is not where the delay went: {phases}"
        );
    }
    assert!(slow[4] < 50.0, "nor transfer: {phases}");
    browser.screenshot(&shots.join("target.png")).await;
    let console = problems(&browser.console().await);
    assert!(
        console.is_empty(),
        "console on the target page: {console:?}"
    );
    // The JSON twin has the same series.
    let (status, _, body) =
        http_with("GET", &format!("{url}/api/targets/1?window=1h"), &[], None).await;
    assert_eq!(status, 200, "{body}");
    let t: Value = serde_json::from_str(&body).unwrap();
    let regions: Vec<&str> = t["latency"]["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["region"].as_str().unwrap())
        .collect();
    assert_eq!(regions, REGIONS, "{body}");
    assert!(
        t["failures"].as_array().is_some_and(|f| !f.is_empty()
            && f.iter()
                .all(|x| x["region"] == "ap-south" && x["status"] == 500)),
        "{body}"
    );

    // The same from the rollups (hourly for 24 h, daily for 30 d): the delay is in first byte.
    for window in ["24h", "30d"] {
        let (status, _, body) = http_with(
            "GET",
            &format!("{url}/api/targets/1?window={window}"),
            &[],
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let t: Value = serde_json::from_str(&body).unwrap();
        let ttfb = |region: &str| {
            t["regions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["region"] == region)
                .and_then(|r| r["ttfb_ms"].as_f64())
                .unwrap_or(0.0)
        };
        assert!(
            ttfb("us-east") - ttfb("eu-north") >= DELAY_MS as f64 * 0.9,
            "{window}: {}",
            t["regions"]
        );
        assert_eq!(
            t["latency"]["series"].as_array().map(Vec::len),
            Some(3),
            "{window}"
        );
    }

    // --- The target named <script>: its own page, its title. --------------------------------
    browser.goto(&format!("{url}/targets/2?window=1h")).await;
    let h1 = browser
        .script("return [document.querySelector('h1').textContent, document.title, document.scripts.length];")
        .await;
    assert_eq!(h1[0], XSS, "{h1}");
    assert!(h1[1].as_str().unwrap_or_default().starts_with(XSS), "{h1}");
    assert_eq!(h1[2], 3, "two scripts and the data block: {h1}");
    let console = problems(&browser.console().await);
    assert!(
        console.is_empty(),
        "console on the <script> target's page: {console:?}"
    );

    // --- Regions, fleet, incidents. -------------------------------------------------------------
    browser.goto(&format!("{url}/regions?window=1h")).await;
    let heat = browser
        .script(
            "return [...document.querySelectorAll('tr[data-target=\"1\"] td.heat')].map(e => e.dataset.region);",
        )
        .await;
    assert_eq!(heat, serde_json::json!(REGIONS), "heatmap row of target 1");
    browser.screenshot(&shots.join("regions.png")).await;
    assert!(problems(&browser.console().await).is_empty());

    browser.goto(&format!("{url}/fleet")).await;
    let fleet = browser
        .script(
            "return [...document.querySelectorAll('tr[data-agent]')].map(e => e.dataset.status);",
        )
        .await;
    assert_eq!(
        fleet,
        serde_json::json!(["online", "online", "online"]),
        "fleet"
    );
    browser.screenshot(&shots.join("fleet.png")).await;
    assert!(problems(&browser.console().await).is_empty());

    browser.goto(&format!("{url}/incidents")).await;
    let open = browser
        .script("return document.querySelectorAll('tr[data-incident] .open').length;")
        .await;
    assert!(open.as_i64().unwrap_or(0) >= 1, "the open incident: {open}");
    browser.screenshot(&shots.join("incidents.png")).await;
    assert!(problems(&browser.console().await).is_empty());
    browser.quit().await;

    // --- With a token: 401 and no data without it. -------------------------------------------
    let token = "web-test-token-0123456789";
    let token_file = run.dir.join("web.token");
    write_file(&token_file, token);
    let locked_file = run.dir.join("web-token.toml");
    write_file(
        &locked_file,
        &format!(
            "{base}\n[web]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            token_file.display()
        ),
    );
    let locked = web(&locked_file, &stop).await;
    for path in [
        "/",
        "/api/overview",
        "/targets/1",
        "/api/targets/1",
        "/fleet",
    ] {
        let (status, head, body) = http_with("GET", &format!("{locked}{path}"), &[], None).await;
        assert_eq!(status, 401, "{path} without a token: {head}");
        assert!(
            !body.contains("shop") && !body.contains("eu-north"),
            "{path}: {body}"
        );
        let (status, _, _) = http_with(
            "GET",
            &format!("{locked}{path}"),
            &[("Authorization", "Bearer wrong-token-0123456789")],
            None,
        )
        .await;
        assert_eq!(status, 401, "{path} with a wrong token");
    }
    let bearer = format!("Bearer {token}");
    let (status, _, body) = http_with(
        "GET",
        &format!("{locked}/api/overview"),
        &[("Authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("\"shop\""), "{body}");

    // --- Public status page: no URLs, no fleet; GET only. ------------------------------------
    let public_file = run.dir.join("web-public.toml");
    write_file(
        &public_file,
        &format!("{base}\n[web]\nlisten = \"127.0.0.1:0\"\npublic = true\n"),
    );
    let public = web(&public_file, &stop).await;
    let (status, _, body) = http_with("GET", &format!("{public}/"), &[], None).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("shop")
            && !body.contains(&target.addr.to_string())
            && !body.contains("/fleet"),
        "public overview shows names, no URL, no fleet link"
    );
    for path in ["/fleet", "/api/fleet"] {
        let (status, _, _) = http_with("GET", &format!("{public}{path}"), &[], None).await;
        assert_eq!(status, 404, "{path} in public mode");
    }
    let (status, _, _) = http_with("POST", &format!("{public}/"), &[], None).await;
    assert_eq!(status, 405, "POST");
    let (_, head, _) = http_with(
        "GET",
        &format!("{public}/"),
        &[("Accept-Encoding", "gzip")],
        None,
    )
    .await;
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("content-encoding: gzip")
            && head.contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{head}"
    );

    stop.cancel();
    for (token, handle) in agents {
        token.cancel();
        let _ = handle.await;
    }
    let _ = tokio::join!(sink, bridge, alert);
    let mut sessions = vec![run.bridge_client_id(&options.client)];
    sessions.extend(
        REGIONS
            .iter()
            .map(|r| format!("vantage-agent-{r}-{}", run.id)),
    );
    run.cleanup(&sessions).await;
}
