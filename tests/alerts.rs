//! Alerts end to end on the real services and a real Alertmanager (issue #16): three agents in
//! three regions probe a local target through a proxy per region (cutting a proxy is that
//! region's outage), bridge and sink carry the results to PostgreSQL, the alert stage evaluates
//! and delivers to the Alertmanager of `tests/services`, whose receiver is this process
//! (`AmReceiver`). Every run labels its alerts `vantage_test=<run id>` and looks only at those.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vantage_tests::alerting::{
    am_alerts, region_agent, silence, AgentTask, AmReceiver, Notified, WebhookReceiver, SERIAL,
};
use vantage_tests::harness::{write_file, IngesterOptions, Run};
use vantage_tests::in_process::{migrated, two_partitions, wait_for, SinkAndBridge};
use vantage_tests::proxy::CuttableProxy;
use vantage_tests::stage::{ingester_stdout, StageProcess};
use vantage_tests::target::TargetServer;

const REGIONS: [&str; 3] = ["ap-south", "eu-north", "us-east"];
const LABEL: &str = "vantage_test";

fn init_tracing() {
    vantage_tests::in_process::init_tracing("warn,vantage_ingester::alert=info");
}

struct Fixture {
    run: Run,
    _target: TargetServer,
    proxies: BTreeMap<&'static str, CuttableProxy>,
    agents: BTreeMap<&'static str, (CancellationToken, AgentTask)>,
    stop: CancellationToken,
    stages: Option<SinkAndBridge>,
    base: String,
    client: tokio_postgres::Client,
    options: IngesterOptions,
}

impl Fixture {
    /// Services, bridge and sink in-process, one agent per region probing target 1 (path
    /// `path` of the local target, through the region's proxy), every region reporting.
    async fn start(kind: &str, path: impl Fn(&str) -> String) -> Fixture {
        init_tracing();
        let options = two_partitions(100, 50);
        let started = vantage_tests::in_process::start(kind, &options).await;
        let (run, target, base) = (started.run, started.target, started.base);
        let (stop, stages) = (started.stop, started.stages);
        let mut proxies = BTreeMap::new();
        let mut agents = BTreeMap::new();
        for region in REGIONS {
            let proxy = CuttableProxy::start(target.addr, true).await.unwrap();
            let url = format!("http://{}{}", proxy.addr, path(region));
            agents.insert(region, region_agent(&run, region, &url, "500ms"));
            proxies.insert(region, proxy);
        }
        let client = run.pg().await;
        let f = Fixture {
            run,
            _target: target,
            proxies,
            agents,
            stop,
            stages: Some(stages),
            base,
            client,
            options,
        };
        f.wait_reporting(3, "every region reporting").await;
        f
    }

    /// Cuts `region`'s proxy and waits (30 s) until `latest_status` holds its failure of target
    /// 1 (`fresh`: one younger than a second).
    async fn cut_until_failing(&self, region: &str, fresh: bool) {
        self.proxies[region].cut();
        let age = if fresh {
            " AND age < interval '1 second'"
        } else {
            ""
        };
        let sql = format!(
            "SELECT count(*) FROM latest_status
              WHERE target_id = 1 AND region = $1 AND outcome <> 'up'{age}"
        );
        let what = format!("{region}'s failure in latest_status");
        wait_for(&what, Duration::from_secs(30), || async {
            let r = self.client.query_one(&sql, &[&region]).await.ok()?;
            (r.get::<_, i64>(0) == 1).then_some(())
        })
        .await
    }

    /// Waits (60 s) until `n` regions have a result of target 1 younger than 2 s.
    async fn wait_reporting(&self, n: i64, what: &str) {
        wait_for(what, Duration::from_secs(60), || async {
            let r = self
                .client
                .query_one(
                    "SELECT count(*) FROM latest_status
                      WHERE target_id = 1 AND age < interval '2 seconds'",
                    &[],
                )
                .await;
            r.ok().and_then(|r| (r.get::<_, i64>(0) == n).then_some(()))
        })
        .await
    }

    /// The ingester file of this run with `[alerts]` (`rules` and receivers as TOML) and the
    /// alert stage's HTTP endpoint off.
    fn alert_file(&self, name: &str, extra: &str) -> PathBuf {
        let text = format!(
            "{}alert_listen = \"off\"\n\n[alerts]\nevaluation_interval = \"500ms\"\n\
             resend_interval = \"2s\"\nstale_after = \"3s\"\n\
             link = \"https://vantage.example/targets/{{target_id}}\"\n\
             labels = {{ {LABEL} = \"{id}\" }}\n{extra}",
            self.base,
            id = self.run.id
        );
        let path = self.run.dir.join(name);
        write_file(&path, &text);
        path
    }

    fn am(&self) -> String {
        format!(
            "[[alerts.alertmanagers]]\nurl = \"{}\"\n",
            vantage_tests::alerting::alertmanager_url()
        )
    }

    /// Starts the alert stage in-process on `file`.
    fn alert_stage(
        &self,
        file: &std::path::Path,
    ) -> (
        CancellationToken,
        tokio::task::JoinHandle<vantage_ingester::alert::AlertSummary>,
    ) {
        let config = vantage_ingester::Config::load(file).unwrap();
        let token = self.stop.child_token();
        let t = token.clone();
        let handle =
            tokio::spawn(async move { vantage_ingester::alert::run(&config, t).await.unwrap() });
        (token, handle)
    }

    fn notified(&self) -> Vec<Notified> {
        AmReceiver::shared().notified(LABEL, &self.run.id)
    }

    /// Waits for notifications of this run until `check` holds.
    async fn wait_notified(
        &self,
        what: &str,
        check: impl Fn(&[Notified]) -> bool,
    ) -> Vec<Notified> {
        AmReceiver::shared()
            .wait(LABEL, &self.run.id, Duration::from_secs(60), what, check)
            .await
    }

    /// (rule, opened regions, resolved, flapping) of every incident, oldest first.
    async fn incidents(&self) -> Vec<(String, String, bool, bool)> {
        self.client
            .query(
                "SELECT rule, (SELECT string_agg(k, ',' ORDER BY k) FROM jsonb_object_keys(opened_regions) k),
                        resolved_at IS NOT NULL, flapping
                   FROM alert_incidents ORDER BY incident_id",
                &[],
            )
            .await
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        (
                            r.get(0),
                            r.get::<_, Option<String>>(1).unwrap_or_default(),
                            r.get(2),
                            r.get(3),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Restores the proxies of `regions` (sorted), which opened the one `down` incident: a
    /// resolved notification arrives, and after `settle` (for a duplicate to show) there is still
    /// one firing and one resolved, and the incident is resolved, opened by `regions`, not
    /// flapping.
    async fn restore_and_expect_resolved(&self, regions: [&str; 2], settle: Duration) {
        for region in regions {
            self.proxies[region].restore();
        }
        self.wait_notified("the resolved notification", |n| {
            count(n, "resolved", "down") >= 1
        })
        .await;
        tokio::time::sleep(settle).await;
        let n = self.notified();
        assert_eq!(count(&n, "firing", "down"), 1, "{n:#?}");
        assert_eq!(count(&n, "resolved", "down"), 1, "{n:#?}");
        assert_eq!(
            self.incidents().await,
            vec![("down".to_owned(), regions.join(","), true, false)]
        );
    }

    async fn finish(mut self) {
        self.stop.cancel();
        for (_, (token, task)) in std::mem::take(&mut self.agents) {
            token.cancel();
            let _ = task.await;
        }
        if let Some(stages) = self.stages.take() {
            stages.join().await;
        }
        let mut sessions = vec![self.run.bridge_client_id(&self.options.client)];
        sessions.extend(
            REGIONS
                .iter()
                .map(|r| format!("vantage-agent-{r}-{}", self.run.id)),
        );
        self.run.cleanup(&sessions).await;
    }
}

fn count(n: &[Notified], status: &str, alertname: &str) -> usize {
    n.iter()
        .filter(|x| x.status == status && x.alert["labels"]["alertname"] == alertname)
        .count()
}

/// Issue #16, must show 1: failing from one region of three → nothing; from two → exactly one
/// firing notification naming both; recovered → exactly one resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn down_from_two_of_three_regions_fires_once_and_resolves_once() {
    let _serial = SERIAL.lock().await;
    let f = Fixture::start("alerts-down", |_| "/".into()).await;
    let file = f.alert_file("alert.toml", &f.am());
    let (_token, stage) = f.alert_stage(&file);

    // One region fails: a dead ISP is not a dead site.
    f.cut_until_failing("ap-south", true).await;
    // Ten evaluations (five times `for`) with one region failing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        f.incidents().await,
        vec![],
        "one failing region opened an incident"
    );
    assert!(f.notified().is_empty(), "{:#?}", f.notified());

    // A second region: down.
    f.proxies["eu-north"].cut();
    let n = f
        .wait_notified("one firing notification", |n| {
            count(n, "firing", "down") >= 1
        })
        .await;
    let firing = &n[0].alert;
    assert_eq!(
        firing["labels"]["regions"], "ap-south,eu-north",
        "{firing:#}"
    );
    assert_eq!(firing["labels"]["target"], "1");
    assert_eq!(firing["labels"]["severity"], "critical");
    let summary = firing["annotations"]["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("down from ap-south, eu-north (2 of 3 regions): "),
        "{summary}"
    );
    assert_eq!(
        firing["annotations"]["link"],
        "https://vantage.example/targets/1"
    );

    // Resends go on (every 2 s) and Alertmanager flushes every second: give a duplicate time.
    f.restore_and_expect_resolved(["ap-south", "eu-north"], Duration::from_secs(6))
        .await;
    let events: Vec<String> = vantage_tests::in_process::query_column(
        &f.client,
        "SELECT event FROM alert_events ORDER BY event_id",
    )
    .await;
    assert_eq!(events.first().map(String::as_str), Some("firing"));
    assert_eq!(events.last().map(String::as_str), Some("resolved"));
    f.stop.cancel();
    let summary = stage.await.unwrap();
    assert_eq!((summary.opened, summary.resolved), (1, 1), "{summary:?}");
    f.finish().await;
}

/// Issue #16, must show 2: every agent of a region stopped → a no_data alert for the region and
/// no down alert, even though the region's last result was a failure and another region fails
/// (a region without fresh data never votes: 1 failing of the 2 reporting is not enough).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_region_is_no_data_never_down() {
    let _serial = SERIAL.lock().await;
    let mut f = Fixture::start("alerts-nodata", |_| "/".into()).await;
    let rules = "[[alerts.rules]]\nname = \"down\"\nkind = \"down\"\n\
                 [[alerts.rules]]\nname = \"region-silent\"\nkind = \"no_data\"\n\
                 [[alerts.rules]]\nname = \"agent-silent\"\nkind = \"probe_stale\"\n";
    let file = f.alert_file("alert.toml", &format!("{}{rules}", f.am()));
    let (_token, _stage) = f.alert_stage(&file);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // ap-south fails, then falls silent: its last word is a failure, and it must not count.
    f.cut_until_failing("ap-south", false).await;
    let (token, task) = f.agents.remove("ap-south").unwrap();
    token.cancel();
    let _ = task.await;
    let n = f
        .wait_notified("no_data for ap-south", |n| {
            count(n, "firing", "region-silent") >= 1 && count(n, "firing", "agent-silent") >= 1
        })
        .await;
    let silent = n
        .iter()
        .find(|x| x.alert["labels"]["alertname"] == "region-silent")
        .unwrap();
    assert_eq!(
        silent.alert["labels"]["region"], "ap-south",
        "{:#}",
        silent.alert
    );
    // ap-south is stale now (that is what no_data says); eu-north fails. Well past `for`.
    f.proxies["eu-north"].cut();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let n = f.notified();
    assert_eq!(count(&n, "firing", "down"), 0, "{n:#?}");
    assert_eq!(count(&n, "firing", "region-silent"), 1, "{n:#?}");
    let rules: Vec<String> = f.incidents().await.into_iter().map(|i| i.0).collect();
    assert!(!rules.contains(&"down".to_owned()), "{rules:?}");
    f.finish().await;
}

/// Issue #16, must show 3: a silence created through Alertmanager's API (a maintenance window)
/// suppresses the notification; the incident is still recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silence_suppresses_the_notification() {
    let _serial = SERIAL.lock().await;
    let f = Fixture::start("alerts-silence", |_| "/".into()).await;
    let id = silence(&[(LABEL, f.run.id.as_str()), ("alertname", "down")], 600).await;
    let file = f.alert_file("alert.toml", &f.am());
    let (_token, _stage) = f.alert_stage(&file);
    f.proxies["ap-south"].cut();
    f.proxies["us-east"].cut();
    // Alertmanager has the alert, and says a silence suppresses it.
    let alert = wait_for(
        "Alertmanager to hold the suppressed alert",
        Duration::from_secs(60),
        || async { am_alerts(LABEL, &f.run.id).await.into_iter().next() },
    )
    .await;
    assert_eq!(alert["status"]["state"], "suppressed", "{alert:#}");
    assert_eq!(alert["status"]["silencedBy"][0], id.as_str(), "{alert:#}");
    // group_wait is 1 s: a notification would have gone out by now.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(f.notified().is_empty(), "{:#?}", f.notified());
    assert_eq!(f.incidents().await.len(), 1);
    f.finish().await;
}

/// Issue #16, must show 4: two alert stages, one evaluates; `kill -9` of it during an incident
/// → the other takes over with no second firing notification, and the incident resolves once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_of_the_evaluator_neither_renotifies_nor_forgets() {
    let _serial = SERIAL.lock().await;
    let f = Fixture::start("alerts-kill", |_| "/".into()).await;
    let file = f.alert_file("alert.toml", &f.am());
    let mut a = StageProcess::start("alert-a", "alert", &file, &f.run.dir);
    assert!(
        a.wait_log("alert evaluator active", 1, Duration::from_secs(30))
            .await,
        "{}",
        a.log_text()
    );
    let b = StageProcess::start("alert-b", "alert", &file, &f.run.dir);
    assert!(
        b.wait_log("standing by", 1, Duration::from_secs(30)).await,
        "{}",
        b.log_text()
    );

    f.proxies["eu-north"].cut();
    f.proxies["us-east"].cut();
    f.wait_notified("the firing notification", |n| {
        count(n, "firing", "down") >= 1
    })
    .await;
    a.kill9();
    assert!(
        b.wait_log("alert evaluator active", 1, Duration::from_secs(30))
            .await,
        "{}",
        b.log_text()
    );
    assert!(b.log_text().contains("open=1"), "{}", b.log_text());
    // The killed one comes back and stands by.
    a.restart();
    assert!(
        a.wait_log("standing by", 1, Duration::from_secs(30)).await,
        "{}",
        a.log_text()
    );
    // Several resends by the new evaluator.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        count(&f.notified(), "firing", "down"),
        1,
        "{:#?}",
        f.notified()
    );

    f.restore_and_expect_resolved(["eu-north", "us-east"], Duration::from_secs(4))
        .await;
    // `alerts` lists nothing open now (exit 0).
    assert_eq!(
        ingester_stdout(&file, &["alerts"], &[], 0),
        "no open incidents\n"
    );
    drop(a);
    drop(b);
    f.finish().await;
}

/// Issue #16, must show 5: the webhook's signature verifies; with the receiver down for 30 s the
/// events wait and are delivered after, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_is_signed_and_survives_a_receiver_outage() {
    let _serial = SERIAL.lock().await;
    let f = Fixture::start("alerts-webhook", |_| "/".into()).await;
    let mut hook = WebhookReceiver::start_new().await;
    let secret = "a webhook secret of 32 bytes....";
    let secret_file = f.run.dir.join("hook.secret");
    write_file(&secret_file, &format!("{secret}\n"));
    let file = f.alert_file(
        "alert.toml",
        &format!(
            "[[alerts.webhooks]]\nname = \"ops\"\nurl = \"{}\"\nsecret_file = \"{}\"\n",
            hook.url(),
            secret_file.display()
        ),
    );
    let mut stage = StageProcess::start("alert", "alert", &file, &f.run.dir);
    assert!(
        stage
            .wait_log("alert evaluator active", 1, Duration::from_secs(30))
            .await
    );
    f.proxies["eu-north"].cut();
    f.proxies["us-east"].cut();
    let first = wait_for("the firing webhook", Duration::from_secs(60), || async {
        hook.requests().into_iter().next()
    })
    .await;
    let ts: u64 = first
        .header("x-vantage-timestamp")
        .unwrap()
        .parse()
        .unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = ts.to_string().into_bytes();
    signed.push(b'.');
    signed.extend_from_slice(&first.body);
    let sig = first.header("x-vantage-signature").unwrap();
    let hex = sig.strip_prefix("sha256=").unwrap();
    let raw: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    ring::hmac::verify(&key, &signed, &raw).expect("the signature verifies");
    // A tampered body does not.
    let mut tampered = signed.clone();
    *tampered.last_mut().unwrap() ^= 1;
    assert!(ring::hmac::verify(&key, &tampered, &raw).is_err());
    let body: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(body["event"], "firing");
    assert_eq!(
        first.header("idempotency-key"),
        body["idempotency_key"].as_str()
    );

    // Receiver down; the target recovers meanwhile (the resolved event waits).
    hook.stop();
    f.proxies["eu-north"].restore();
    f.proxies["us-east"].restore();
    wait_for(
        "the incident resolved in PostgreSQL",
        Duration::from_secs(60),
        || async {
            let i = f.incidents().await;
            (i.len() == 1 && i[0].2).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(hook.requests().len(), 1);
    hook.start().await;
    wait_for("the resolved webhook", Duration::from_secs(90), || async {
        (hook.requests().len() >= 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = hook.requests();
    let events: Vec<serde_json::Value> = got
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["firing", "resolved"], "{events:#?}");
    let mut keys: Vec<&str> = got
        .iter()
        .map(|r| r.header("idempotency-key").unwrap())
        .collect();
    keys.dedup();
    assert_eq!(keys.len(), 2, "one delivery per event");
    assert!(
        stage.log_text().contains("webhook delivery failed"),
        "{}",
        stage.log_text()
    );
    stage.terminate(Duration::from_secs(15));
    f.finish().await;
}

/// Issue #16, must show 6: a target that fails every second probe in two regions → one
/// incident, marked flapping, one firing notification; it settles → one resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flapping_target_is_one_incident_marked_flapping() {
    let _serial = SERIAL.lock().await;
    let flip_id = vantage_tests::unique_id();
    let f = Fixture::start("alerts-flap", |region| match region {
        "ap-south" => "/".into(),
        r => format!("/?flip={r}-{flip_id}"),
    })
    .await;
    let rules = "[[alerts.rules]]\nname = \"down\"\nkind = \"down\"\nfor = 3\nresolve_after = 3\n";
    let file = f.alert_file("alert.toml", &format!("{}{rules}", f.am()));
    let (_token, _stage) = f.alert_stage(&file);
    wait_for("a flapping incident", Duration::from_secs(60), || async {
        let i = f.incidents().await;
        i.first().is_some_and(|i| i.3).then_some(())
    })
    .await;
    // Flapping on for a while longer: still one incident, one notification.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let incidents = f.incidents().await;
    assert_eq!(incidents.len(), 1, "{incidents:?}");
    assert!(incidents[0].3 && !incidents[0].2, "{incidents:?}");
    // It settles: resolved once the flap history is calm.
    for r in ["eu-north", "us-east"] {
        vantage_tests::target::stop_flipping(&format!("{r}-{flip_id}"));
    }
    wait_for(
        "the flapping incident to resolve",
        Duration::from_secs(60),
        || async {
            let i = f.incidents().await;
            i.first().is_some_and(|i| i.2).then_some(())
        },
    )
    .await;
    f.wait_notified("the resolved notification", |n| {
        count(n, "resolved", "down") >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let n = f.notified();
    assert_eq!(count(&n, "firing", "down"), 1, "{n:#?}");
    assert_eq!(count(&n, "resolved", "down"), 1, "{n:#?}");
    assert_eq!(n[0].alert["annotations"]["flapping"], "true", "{n:#?}");
    assert_eq!(f.incidents().await.len(), 1);
    f.finish().await;
}

/// Issue #16, rules beyond `down`, several receivers, a receiver that never answers: `slow`
/// (p95 over 5 min above 500 ms in 2 regions), `cert_expiry` (within 14 days in 2 regions, as each
/// region sees it) and `gaps` (an agent dropped results) fire, to Alertmanager and to a live
/// webhook, while a dead webhook only fails (metrics) and never holds up evaluation; `alerts`
/// lists the open incidents and exits 3. Rows are written through `results` and `gaps` as the
/// sink writes them (its trigger keeps the rollups and latest results).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_cert_expiry_and_gaps_reach_every_receiver() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let run = Run::new("alerts-rules");
    let base = std::fs::read_to_string(run.ingester_file(&IngesterOptions::default())).unwrap();
    let live = WebhookReceiver::start_new().await;
    let dead_port = vantage_tests::cli::closed_port();
    let text = format!(
        "{base}alert_listen = \"off\"\n\n[alerts]\nevaluation_interval = \"500ms\"\n\
         resend_interval = \"2s\"\nstale_after = \"5m\"\nlabels = {{ {LABEL} = \"{id}\" }}\n\
         [[alerts.rules]]\nname = \"slow\"\nkind = \"slow\"\nthreshold = \"500ms\"\n\
         [[alerts.rules]]\nname = \"cert-expiry\"\nkind = \"cert_expiry\"\ndays = 14\n\
         [[alerts.rules]]\nname = \"results-dropped\"\nkind = \"gaps\"\nwindow = \"10m\"\n\
         [[alerts.alertmanagers]]\nurl = \"{am}\"\n\
         [[alerts.webhooks]]\nname = \"live\"\nurl = \"{live}\"\n\
         [[alerts.webhooks]]\nname = \"dead\"\nurl = \"http://127.0.0.1:{dead_port}/hook\"\n",
        id = run.id,
        am = vantage_tests::alerting::alertmanager_url(),
        live = live.url(),
    );
    let file = run.dir.join("alert.toml");
    write_file(&file, &text);
    let config = vantage_ingester::Config::load(&file).unwrap();
    let client = migrated(&config).await;
    // Target 7: 900 ms and a certificate expiring in 3 days from ap-south and eu-north; 20 ms and
    // 60 days from us-east.
    for (i, (region, total_us, days)) in [
        ("ap-south", 900_000, 3),
        ("eu-north", 900_000, 3),
        ("us-east", 20_000, 60),
    ]
    .into_iter()
    .enumerate()
    {
        for seq in 0..5i64 {
            client
                .execute(
                    "INSERT INTO results (region, agent, boot_id, seq, target_id, started_at,
                                          outcome, total_us, body_bytes, cert_not_after)
                     VALUES ($1, $1 || '-a', 1, $2, 7, now() - make_interval(secs => $5),
                             'up', $3, 10, now() + make_interval(days => $4))",
                    &[
                        &region,
                        &(seq + 10 * i as i64),
                        &total_us,
                        &days,
                        &(seq as f64),
                    ],
                )
                .await
                .unwrap();
        }
    }
    client
        .execute(
            "INSERT INTO gaps (region, agent, boot_id, first_seq, dropped, first_started_at,
                               last_started_at)
             VALUES ('eu-north', 'eu-north-a', 1, 100, 5, now() - interval '1 minute', now())",
            &[],
        )
        .await
        .unwrap();

    let stop = CancellationToken::new();
    let stage = tokio::spawn({
        let s = stop.clone();
        async move { vantage_ingester::alert::run(&config, s).await.unwrap() }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let firing = loop {
        let events: Vec<serde_json::Value> = live
            .requests()
            .iter()
            .map(|r| serde_json::from_slice(&r.body).unwrap())
            .collect();
        if events.len() >= 3 {
            break events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "webhook events: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let by_rule = |rule: &str| {
        firing
            .iter()
            .find(|e| e["incident"]["rule"] == rule)
            .unwrap_or_else(|| panic!("no {rule} event in {firing:#?}"))
            .clone()
    };
    let slow = by_rule("slow");
    assert_eq!(slow["event"], "firing");
    assert_eq!(slow["labels"]["regions"], "ap-south,eu-north", "{slow:#}");
    let summary =
        |event: &serde_json::Value| event["summary"].as_str().unwrap_or_default().to_owned();
    assert!(
        summary(&slow).starts_with("slow from ap-south (p95 "),
        "{slow:#}"
    );
    let cert = by_rule("cert-expiry");
    assert_eq!(cert["labels"]["regions"], "ap-south,eu-north", "{cert:#}");
    assert!(summary(&cert).contains("days left"), "{cert:#}");
    let gaps = by_rule("results-dropped");
    assert_eq!(gaps["labels"]["agent"], "eu-north-a", "{gaps:#}");
    assert!(summary(&gaps).contains("dropped 5 results"), "{gaps:#}");
    // Alertmanager has the three as well.
    let am = AmReceiver::shared()
        .wait(
            LABEL,
            &run.id,
            Duration::from_secs(60),
            "three notifications",
            |n| n.iter().filter(|x| x.status == "firing").count() >= 3,
        )
        .await;
    assert_eq!(am.len(), 3, "{am:#?}");

    // The dead receiver failed (and keeps failing) while evaluations went on.
    let text = vantage_ingester::metrics::global().encode(vantage_ingester::metrics::Stage::Alert);
    let failed = vantage_ingester::metrics::sample(
        &text,
        "vantage_alert_deliveries_total{receiver=\"dead\",result=\"error\"}",
    );
    assert!(failed.unwrap_or(0.0) >= 1.0, "{text}");
    let listing = ingester_stdout(&file, &["alerts"], &[], 3);
    assert_eq!(listing.lines().count(), 4, "{listing}");
    assert!(
        listing.contains("results-dropped") && listing.contains("eu-north-a"),
        "{listing}"
    );
    // Evaluations go on while the dead webhook retries (tests take turns: this stage is the
    // only one of the process now).
    let evaluations = || {
        let text =
            vantage_ingester::metrics::global().encode(vantage_ingester::metrics::Stage::Alert);
        vantage_ingester::metrics::sample(&text, "vantage_alert_evaluations_total").unwrap_or(0.0)
    };
    let e1 = evaluations();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let e2 = evaluations();
    assert!(e2 - e1 >= 2.0, "{e1} then {e2} evaluations");
    stop.cancel();
    let summary = stage.await.unwrap();
    assert_eq!(summary.opened, 3, "{summary:?}");
    run.cleanup(&[]).await;
}
