//! The dashboard in a real browser (issue #17): agents in three regions probe a local target
//! with different injected delays (eu-north none, us-east +200 ms before the first byte,
//! ap-south answered with 500), bridge and sink carry the results through Mosquitto and Kafka
//! into PostgreSQL, the alert stage opens an incident, and `vantage-ingester web` serves the
//! pages to a headless Chromium (Debian's, over WebDriver: `vantage_tests::browser`).
//! Screenshots of every page go to `target/web-screenshots/` on every run.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use vantage_tests::alerting::{http_with, region_agent_probing, AgentTask};
use vantage_tests::browser::Browser;
use vantage_tests::harness::{write_file, Run};
use vantage_tests::in_process::{
    ingester_base, migrated, start_sink_and_bridge, two_partitions, wait_for,
};
use vantage_tests::target::TargetServer;

const REGIONS: [&str; 3] = ["ap-south", "eu-north", "us-east"];
const DELAY_MS: u64 = 200;
const XSS: &str = "<script>alert(1)</script>";

fn init_tracing() {
    vantage_tests::in_process::init_tracing("warn,vantage_ingester::web=info");
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
fn agent(run: &Run, region: &str, target: &TargetServer) -> (CancellationToken, AgentTask) {
    let q = region_query(region);
    let (shop, other) = (
        target.url(&format!("/shop{q}")),
        target.url(&format!("/other{q}")),
    );
    region_agent_probing(run, region, &[(1, &shop), (2, &other)], "500ms", "450ms")
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

/// A GET of `url` with `headers`: (status, response head, body).
async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    http_with("GET", url, headers, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_in_a_real_browser() {
    init_tracing();
    let run = Run::new("web");
    let target = TargetServer::start("127.0.0.1:0").await.unwrap();
    let options = two_partitions(100, 50);
    let (_, base, config) = ingester_base(&run, &options);
    // The schema first, then the targets' names as `targets apply` records them (name, url):
    // the agents below probe local targets 1 and 2, so no set is published.
    let pg = migrated(&config).await;
    pg.execute(
        "INSERT INTO targets (target_id, name, url, created_at) VALUES
            (1, 'shop', $1, now()), (2, $2, $3, now())",
        &[&target.url("/shop"), &XSS, &target.url("/other")],
    )
    .await
    .unwrap();

    let stop = CancellationToken::new();
    let stages = start_sink_and_bridge(&config, &stop).await;
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
    let (status, _, body) = get(&format!("{url}/api/overview"), &[]).await;
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
    let (status, _, body) = get(&format!("{url}/api/targets/1?window=1h"), &[]).await;
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
        let (status, _, body) = get(&format!("{url}/api/targets/1?window={window}"), &[]).await;
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
        let (status, head, body) = get(&format!("{locked}{path}"), &[]).await;
        assert_eq!(status, 401, "{path} without a token: {head}");
        assert!(
            !body.contains("shop") && !body.contains("eu-north"),
            "{path}: {body}"
        );
        let (status, _, _) = get(
            &format!("{locked}{path}"),
            &[("Authorization", "Bearer wrong-token-0123456789")],
        )
        .await;
        assert_eq!(status, 401, "{path} with a wrong token");
    }
    let bearer = format!("Bearer {token}");
    let (status, _, body) = get(
        &format!("{locked}/api/overview"),
        &[("Authorization", &bearer)],
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
    let (status, _, body) = get(&format!("{public}/"), &[]).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("shop")
            && !body.contains(&target.addr.to_string())
            && !body.contains("/fleet"),
        "public overview shows names, no URL, no fleet link"
    );
    for path in ["/fleet", "/api/fleet"] {
        let (status, _, _) = get(&format!("{public}{path}"), &[]).await;
        assert_eq!(status, 404, "{path} in public mode");
    }
    let (status, _, _) = http_with("POST", &format!("{public}/"), &[], None).await;
    assert_eq!(status, 405, "POST");
    let (_, head, _) = get(&format!("{public}/"), &[("Accept-Encoding", "gzip")]).await;
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
    let _ = tokio::join!(stages.join(), alert);
    let mut sessions = vec![run.bridge_client_id(&options.client)];
    sessions.extend(
        REGIONS
            .iter()
            .map(|r| format!("vantage-agent-{r}-{}", run.id)),
    );
    run.cleanup(&sessions).await;
}
