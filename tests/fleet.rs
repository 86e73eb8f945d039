//! Central targets and the agent fleet, end to end on the real services: `vantage-ingester targets
//! apply` gives two agents (two regions, no local targets) their work; a second apply adds,
//! removes, renames and moves targets and the rows follow; a pushed set that fails validation is
//! refused and reported while the agent keeps its old set; an agent restarted while the broker is
//! unreachable probes from the set it persisted; agents announce themselves, send heartbeats and
//! are marked offline by a clean stop or by their last will; targets of kind http, tcp and tls
//! (issue #20) reach agents in two regions and land in SQL with their kind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vantage_agent::target_set::TargetBook;
use vantage_proto::control::SetScope;
use vantage_tests::harness::{publish_as_agent, write_file, IngesterOptions, Run};
use vantage_tests::in_process::{
    query_scalar, query_triples, two_partitions, wait_for, SinkAndBridge,
};
use vantage_tests::proxy::CuttableProxy;
use vantage_tests::stage::ingester_command as ingester;
use vantage_tests::target::TargetServer;

const REGIONS: [&str; 2] = ["eu-north", "us-east"];

fn init_tracing() {
    vantage_tests::in_process::init_tracing("warn,vantage_agent=info,vantage_ingester=info");
}

/// An agent with no local targets: it follows what `targets apply` pushes.
fn agent_config(run: &Run, region: &str, mqtt_port: u16) -> vantage_agent::Config {
    let pw = run.dir.join("agent.pw");
    write_file(&pw, "agent-secret");
    let text = format!(
        r#"
agent_id = "{region}-{id}"
region = "{region}"
state_dir = "{state}"

[mqtt]
host = "{host}"
port = {mqtt_port}
username = "agent"
password_file = "{pw}"
topic_prefix = "{prefix}"
keep_alive = "5s"

[uplink]
batch_max = 8
flush_interval = "200ms"
drain_timeout = "2s"

[fleet]
heartbeat_interval = "1s"
"#,
        id = run.id,
        state = state_dir(run, region).display(),
        host = run.services.mqtt_host,
        pw = pw.display(),
        prefix = run.prefix(),
    );
    let path = run.dir.join(format!("agent-{region}.toml"));
    write_file(&path, &text);
    let config = vantage_agent::Config::load(&path).unwrap();
    assert_eq!(config.targets_source, vantage_agent::TargetsSource::Central);
    config
}

fn state_dir(run: &Run, region: &str) -> PathBuf {
    run.dir.join(format!("state-{region}"))
}

/// The target sets the agent of `region` persisted, as it would load them at its next start.
fn book(run: &Run, region: &str) -> TargetBook {
    TargetBook::load(
        &state_dir(run, region),
        &run.prefix(),
        region,
        &agent_id(run, region),
    )
}

fn agent_id(run: &Run, region: &str) -> String {
    format!("{region}-{}", run.id)
}

/// `targets apply FILE`, which must succeed; its output.
fn apply(config: &Path, file: &Path) -> Output {
    let out = ingester(config, &["targets", "apply"], &[file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "targets apply {} failed:\n{}{}",
        file.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// Rows per (target name, region), live and retired targets alike.
async fn counts(client: &tokio_postgres::Client) -> BTreeMap<(String, String), i64> {
    client
        .query(
            "SELECT t.name, r.region, count(*) FROM results r JOIN targets t USING (target_id)
              GROUP BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect()
}

fn count(c: &BTreeMap<(String, String), i64>, name: &str, region: &str) -> i64 {
    c.get(&(name.to_owned(), region.to_owned()))
        .copied()
        .unwrap_or(0)
}

/// Waits (60 s at most) until `agent`'s row in `agents` meets the SQL `condition`.
async fn wait_agent(client: &tokio_postgres::Client, agent: &str, condition: &str, what: &str) {
    let sql = format!("SELECT 1 FROM agents WHERE agent = $1 AND {condition}");
    wait_for(what, Duration::from_secs(60), || async {
        client.query_opt(&sql, &[&agent]).await.unwrap().map(|_| ())
    })
    .await
}

/// Waits (60 s at most) until target `name` has at least `n` rows from every region.
async fn wait_rows_everywhere(client: &tokio_postgres::Client, name: &str, n: i64) {
    let what = format!("{n} rows of {name} from every region");
    wait_for(&what, Duration::from_secs(60), || async {
        let c = counts(client).await;
        REGIONS
            .iter()
            .all(|r| count(&c, name, r) >= n)
            .then_some(())
    })
    .await
}

async fn target_id(client: &tokio_postgres::Client, name: &str) -> i32 {
    client
        .query_one(
            "SELECT target_id FROM targets WHERE name = $1 AND retired_at IS NULL",
            &[&name],
        )
        .await
        .unwrap_or_else(|e| panic!("target {name}: {e}"))
        .get(0)
}

fn targets_file(
    run: &Run,
    name: &str,
    target: &TargetServer,
    entries: &[(&str, &str, &str)],
) -> PathBuf {
    let mut text = format!("regions = {REGIONS:?}\n");
    for (name, path, extra) in entries {
        text.push_str(&format!(
            "\n[[targets]]\nname = \"{name}\"\nurl = \"{}\"\ninterval = \"500ms\"\ntimeout = \"400ms\"\nregex = \"target: ok\"\n{extra}\n",
            target.url(path)
        ));
    }
    let path = run.dir.join(name);
    write_file(&path, &text);
    path
}

/// The ingester's stages in-process on this run's names, a local target, a PostgreSQL client.
struct Fixture {
    run: Run,
    target: TargetServer,
    options: IngesterOptions,
    ingester_file: PathBuf,
    ingester_config: Arc<vantage_ingester::Config>,
    client: tokio_postgres::Client,
    stop: CancellationToken,
    stages: Option<SinkAndBridge>,
}

impl Fixture {
    async fn start(kind: &str) -> Fixture {
        init_tracing();
        let options = two_partitions(100, 100);
        let started = vantage_tests::in_process::start(kind, &options).await;
        let client = started.run.pg().await;
        Fixture {
            run: started.run,
            target: started.target,
            options,
            ingester_file: started.file,
            ingester_config: started.config,
            client,
            stop: started.stop,
            stages: Some(started.stages),
        }
    }

    fn mqtt(&self) -> &vantage_ingester::config::MqttConfig {
        self.ingester_config.mqtt().unwrap()
    }

    /// Stops the stages, clears the retained sets, ends the MQTT sessions, drops the names.
    async fn finish(mut self, agents: &[String]) {
        self.stop.cancel();
        if let Some(stages) = self.stages.take() {
            stages.join().await;
        }
        let clear: Vec<(String, Vec<u8>)> = REGIONS
            .iter()
            .map(|r| (format!("{}/v1/targets/{r}", self.run.prefix()), Vec::new()))
            .collect();
        vantage_ingester::targets::publish(self.mqtt(), clear)
            .await
            .unwrap();
        let mut sessions = vec![self.run.bridge_client_id(&self.options.client)];
        sessions.extend(agents.iter().map(|a| format!("vantage-agent-{a}")));
        self.run.cleanup(&sessions).await;
    }
}

/// Starts an agent of `region` in-process; cancel the token to stop it.
fn spawn_agent(
    run: &Run,
    region: &str,
    mqtt_port: u16,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<vantage_agent::RunSummary, vantage_agent::RunError>>,
) {
    let token = CancellationToken::new();
    let config = agent_config(run, region, mqtt_port);
    let handle = tokio::spawn(vantage_agent::run(
        config,
        Default::default(),
        token.clone(),
    ));
    (token, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_follow_central_targets() {
    let f = Fixture::start("fleet").await;
    let (run, target, client, ingester_file) = (&f.run, &f.target, &f.client, &f.ingester_file);

    // Two agents, no local targets, nothing published yet: they idle.
    let mut agents = BTreeMap::new();
    for region in REGIONS {
        agents.insert(region, spawn_agent(run, region, run.services.mqtt_port));
    }

    // --- First apply: three targets in both regions. --------------------------------------
    let v1 = targets_file(
        run,
        "targets-v1.toml",
        target,
        &[
            ("alpha", "/alpha", ""),
            ("beta", "/beta", ""),
            ("gamma", "/gamma", ""),
        ],
    );
    let out = apply(ingester_file, &v1);
    assert!(
        text(&out.stdout).contains("3 to add, 0 to change, 0 to retire"),
        "{}",
        text(&out.stdout)
    );
    let alpha_id = target_id(client, "alpha").await;
    let gamma_id = target_id(client, "gamma").await;

    let c = wait_for(
        "rows of every target from both regions",
        Duration::from_secs(60),
        || async {
            let c = counts(client).await;
            let all = ["alpha", "beta", "gamma"]
                .iter()
                .all(|n| REGIONS.iter().all(|r| count(&c, n, r) >= 2));
            all.then_some(c)
        },
    )
    .await;
    println!("after apply v1: {c:?}");

    // Both agents announced themselves and report the set they run.
    wait_for(
        "both agents online with generation 1 and 3 targets",
        Duration::from_secs(30),
        || async {
            let rows = client
            .query(
                "SELECT agent FROM agents WHERE online AND region_set_generation = 1 AND targets = 3
                    AND version IS NOT NULL AND last_seen > now() - interval '30 seconds'",
                &[],
            )
            .await
            .unwrap();
            (rows.len() == 2).then_some(())
        },
    )
    .await;

    // --- A bad file changes nothing, and says where the problem is. -----------------------
    let bad = targets_file(
        run,
        "targets-bad.toml",
        target,
        &[
            ("alpha", "/alpha", ""),
            ("delta", "/delta", "regions = [\"ap-south\"]"),
        ],
    );
    let out = ingester(
        ingester_file,
        &["targets", "apply"],
        &[bad.to_str().unwrap()],
    );
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "{}:17: targets[1] (\"delta\").regions: unknown region \"ap-south\"",
            bad.display()
        )),
        "{err}"
    );
    let generation: i64 =
        query_scalar(client, "SELECT max(generation) FROM target_applies", &[]).await;
    assert_eq!(generation, 1);

    // --- Second apply: rename alpha, remove beta, move gamma to eu-north, add delta. -------
    let v2 = targets_file(
        run,
        "targets-v2.toml",
        target,
        &[
            ("alpha-home", "/alpha", ""),
            ("gamma", "/gamma", "regions = [\"eu-north\"]"),
            ("delta", "/delta", ""),
        ],
    );
    let out = ingester(ingester_file, &["targets", "diff"], &[v2.to_str().unwrap()]);
    let diff = text(&out.stdout);
    assert!(out.status.success(), "{diff}{}", text(&out.stderr));
    for expected in [
        "+ add",
        "delta",
        "- retire",
        "beta",
        "renamed from \"alpha\"",
        "regions eu-north, us-east → regions eu-north",
    ] {
        assert!(diff.contains(expected), "diff lacks {expected:?}:\n{diff}");
    }
    let v2_started = std::time::Instant::now();
    let out = apply(ingester_file, &v2);
    assert!(
        text(&out.stdout).contains("1 to add, 2 to change, 1 to retire"),
        "{}",
        text(&out.stdout)
    );
    // Stable ids: the rename and the move kept theirs; beta is retired, not deleted.
    assert_eq!(target_id(client, "alpha-home").await, alpha_id);
    assert_eq!(target_id(client, "gamma").await, gamma_id);
    let beta_retired: bool = query_scalar(
        client,
        "SELECT retired_at IS NOT NULL FROM targets WHERE name = 'beta'",
        &[],
    )
    .await;
    assert!(beta_retired);
    let out = ingester(ingester_file, &["targets", "list"], &[]);
    let list = text(&out.stdout);
    assert!(
        list.contains("alpha-home") && list.contains("delta") && !list.contains("beta"),
        "{list}"
    );

    // The rows follow: delta appears in both regions...
    wait_rows_everywhere(client, "delta", 1).await;
    println!(
        "apply v2 -> first delta row from both regions: {:.2} s (apply command included)",
        v2_started.elapsed().as_secs_f64()
    );
    wait_rows_everywhere(client, "delta", 3).await;
    // ...and, while alpha keeps going everywhere, beta and gamma-in-us-east stop.
    let before = counts(client).await;
    let after = wait_for(
        "six more alpha rows per region",
        Duration::from_secs(60),
        || async {
            let c = counts(client).await;
            REGIONS
                .iter()
                .all(|r| count(&c, "alpha-home", r) >= count(&before, "alpha-home", r) + 6)
                .then_some(c)
        },
    )
    .await;
    println!("after apply v2: before {before:?}\n after {after:?}");
    for r in REGIONS {
        assert_eq!(
            count(&after, "beta", r),
            count(&before, "beta", r),
            "beta rows still arrive from {r}"
        );
        assert!(count(&after, "delta", r) > count(&before, "delta", r));
    }
    assert_eq!(
        count(&after, "gamma", "us-east"),
        count(&before, "gamma", "us-east"),
        "gamma still probed from us-east"
    );
    assert!(count(&after, "gamma", "eu-north") > count(&before, "gamma", "eu-north"));

    let us_agent = agent_id(run, "us-east");
    // --- Restart with the broker unreachable: the agent probes from its persisted set. ----
    let (token, handle) = agents.remove("us-east").unwrap();
    token.cancel();
    let first_boot = handle.await.unwrap().unwrap().uplink.boot_id as i64;
    wait_agent(
        client,
        &us_agent,
        "NOT online AND state = 'offline'",
        "the clean stop to mark us-east offline",
    )
    .await;
    let persisted = book(run, "us-east");
    assert_eq!(persisted.region_generation(), 2);
    assert!(persisted.path(SetScope::Region).is_file());
    let broker: std::net::SocketAddr =
        format!("{}:{}", run.services.mqtt_host, run.services.mqtt_port)
            .parse()
            .unwrap();
    let proxy = CuttableProxy::start(broker, false).await.unwrap();
    let token = CancellationToken::new();
    let config = agent_config(run, "us-east", proxy.addr.port());
    let handle = tokio::spawn(vantage_agent::run(
        config,
        Default::default(),
        token.clone(),
    ));
    // Probing while the broker cannot be reached; results wait in the agent's buffer.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restored_at: f64 =
        query_scalar(client, "SELECT extract(epoch FROM now())::float8", &[]).await;
    proxy.restore();
    let second: Vec<(i32, f64)> = wait_for(
        "rows of the restarted agent",
        Duration::from_secs(60),
        || async {
            let rows = client
                .query(
                    "SELECT target_id, extract(epoch FROM min(started_at))::float8 FROM results
                  WHERE agent = $1 AND boot_id <> $2 GROUP BY 1 ORDER BY 1",
                    &[&us_agent, &first_boot],
                )
                .await
                .unwrap();
            let got: Vec<(i32, f64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            (got.len() >= 2).then_some(got)
        },
    )
    .await;
    let delta_id = target_id(client, "delta").await;
    let ids: Vec<i32> = second.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, {
        let mut want = vec![alpha_id, delta_id];
        want.sort();
        want
    });
    for (id, first_started) in &second {
        assert!(
            *first_started < restored_at,
            "target {id}: first probe at {first_started}, broker reachable from {restored_at}"
        );
    }

    // --- The last will: the connection dies without a goodbye. ----------------------------
    proxy.cut();
    wait_agent(
        client,
        &us_agent,
        "NOT online AND state = 'lost'",
        "the last will to mark us-east lost",
    )
    .await;
    token.cancel();
    let _ = handle.await;

    let out = ingester(ingester_file, &["agents"], &["--stale-after", "60s"]);
    let listing = text(&out.stdout);
    assert!(out.status.success(), "{listing}{}", text(&out.stderr));
    let eu_agent = agent_id(run, "eu-north");
    let line = |agent: &str| vantage_tests::line_starting(&listing, agent);
    assert!(line(&eu_agent).contains("online"), "{listing}");
    assert!(line(&us_agent).contains("offline (lost)"), "{listing}");
    // An online agent not heard of for longer than the bound is flagged, with exit status 3.
    let out = ingester(ingester_file, &["agents"], &["--stale-after", "1ms"]);
    let stale = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stale}");
    let eu_line = stale.lines().find(|l| l.starts_with(eu_agent.as_str()));
    assert!(eu_line.is_some_and(|l| l.contains("STALE")), "{stale}");

    // --- Clean up. ------------------------------------------------------------------------
    for (_, (token, handle)) in agents {
        token.cancel();
        let _ = handle.await;
    }
    f.finish(&[eu_agent, us_agent]).await;
}

/// Issue #20, end to end: one central set with an http, a tcp (banner check), a tls and a dns
/// target (a query to a dnsmasq of the test), all on loopback servers of the test, reaches the
/// agents of both regions (a version 2 target set), their results travel as version 4 frames
/// and land in SQL with their kind (the tls one with its protocol version, the dns one with its
/// reply's RCODE and answer count); `region_comparison` and the report compare one kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probe_kinds_reach_sql_by_region() {
    let f = Fixture::start("kinds").await;
    let (run, target, client, ingester_file) = (&f.run, &f.target, &f.client, &f.ingester_file);

    // A service with a banner, and a TLS server with a certificate of a test CA.
    let banner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let banner_addr = banner.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = banner.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = stream.write_all(b"SSH-2.0-vantage-test\r\n").await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            });
        }
    });
    let ca = vantage_tests::tls::TestCa::new();
    let ca_path = run.dir.join("kinds-ca.pem");
    ca.write_pem(&ca_path);
    let leaf = ca.leaf(&["localhost"], (2020, 1, 1), (2099, 1, 1));
    let tls = TargetServer::start_tls("127.0.0.1:0", leaf.server_config())
        .await
        .unwrap();
    // A DNS server answering the test zone (issue #20's dns kind).
    let dns = vantage_tests::dns::Dnsmasq::start(&["--address=/up.test/127.0.0.1".to_owned()]);

    let file = run.dir.join("targets-kinds.toml");
    write_file(
        &file,
        &format!(
            r#"regions = {REGIONS:?}

[[targets]]
name = "web"
url = "{web}"
interval = "500ms"
timeout = "400ms"

[[targets]]
name = "ssh"
kind = "tcp"
address = "{banner_addr}"
expect = "SSH-2.0-"
interval = "500ms"
timeout = "400ms"

[[targets]]
name = "cert"
kind = "tls"
address = "localhost:{tls_port}"
ca_file = "{ca}"
ip_family = "ipv4"
interval = "500ms"
timeout = "400ms"

[[targets]]
name = "zone"
kind = "dns"
query = "up.test"
query_type = "A"
resolver = "{resolver}"
interval = "500ms"
timeout = "400ms"
"#,
            web = target.url("/"),
            tls_port = tls.addr.port(),
            ca = ca_path.display(),
            resolver = dns.addr,
        ),
    );
    let mut agents = Vec::new();
    for region in REGIONS {
        agents.push(spawn_agent(run, region, run.services.mqtt_port));
    }
    apply(ingester_file, &file);
    for name in ["web", "ssh", "cert", "zone"] {
        wait_rows_everywhere(client, name, 2).await;
    }

    // Every row has its target's kind; each probe was up; the tls ones say TLS 1.3.
    let rows = client
        .query(
            "SELECT t.name, r.region, r.kind, r.outcome, r.tls_version, r.regex_match,
                    r.dns_rcode, r.dns_answers, r.dns_us
               FROM results r JOIN targets t USING (target_id)",
            &[],
        )
        .await
        .unwrap();
    for row in &rows {
        let (name, region, kind, outcome): (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let tls_version: Option<String> = row.get(4);
        let expected = match name.as_str() {
            "web" => "http",
            "ssh" => "tcp",
            "zone" => "dns",
            _ => "tls",
        };
        assert_eq!(kind, expected, "{name} from {region}");
        assert_eq!(outcome, "up", "{name} from {region}");
        assert_eq!(
            tls_version.as_deref(),
            (kind == "tls").then_some("TLSv1.3"),
            "{name}"
        );
        if kind == "tcp" {
            assert_eq!(row.get::<_, Option<bool>>(5), Some(true), "expect matched");
        }
        // The dns rows carry the reply (NOERROR, one A record) and the query time; the
        // others no reply.
        let reply: (Option<i16>, Option<i32>) = (row.get(6), row.get(7));
        if kind == "dns" {
            assert_eq!(reply, (Some(0), Some(1)), "{name} from {region}");
            assert!(
                row.get::<_, Option<i32>>(8).is_some_and(|q| q > 0),
                "query time"
            );
        } else {
            assert_eq!(reply, (None, None), "{name} from {region}");
        }
    }
    let kinds: BTreeMap<String, String> = vantage_tests::in_process::query_pairs(
        client,
        "SELECT t.name, k.kind FROM targets t JOIN probe_kinds k USING (kind_id)
          WHERE t.name IS NOT NULL",
    )
    .await;
    assert_eq!(kinds["ssh"], "tcp");
    assert_eq!(kinds["cert"], "tls");
    assert_eq!(kinds["zone"], "dns");

    // region_comparison per kind: one kind's targets from both regions; all of them without.
    let ssh_id = target_id(client, "ssh").await;
    let per_kind = |kind: &'static str| async move {
        client
            .query(
                "SELECT target_id, region, kind, probes FROM region_comparison(interval '1 hour', NULL, $1)",
                &[&kind],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1), r.get::<_, String>(2)))
            .collect::<Vec<_>>()
    };
    let tcp = per_kind("tcp").await;
    assert_eq!(
        tcp,
        REGIONS
            .iter()
            .map(|r| (ssh_id, r.to_string(), "tcp".to_owned()))
            .collect::<Vec<_>>()
    );
    assert_eq!(per_kind("tls").await.len(), 2);
    let zone_id = target_id(client, "zone").await;
    assert_eq!(
        per_kind("dns").await,
        REGIONS
            .iter()
            .map(|r| (zone_id, r.to_string(), "dns".to_owned()))
            .collect::<Vec<_>>()
    );
    let all: i64 = query_scalar(
        client,
        "SELECT count(*) FROM region_comparison(interval '1 hour')",
        &[],
    )
    .await;
    assert_eq!(all, 8, "4 targets x 2 regions");
    let report =
        vantage_ingester::report::query(client, Duration::from_secs(3600), None, Some("tcp"))
            .await
            .unwrap();
    assert_eq!(report.len(), 2);
    assert!(report
        .iter()
        .all(|r| r.target_id == ssh_id && r.availability_pct > 99.0));

    let ids: Vec<String> = REGIONS.iter().map(|r| agent_id(run, r)).collect();
    for (token, handle) in agents {
        token.cancel();
        let _ = handle.await;
    }
    f.finish(&ids).await;
}

/// A pushed set that fails the agent's validation (here published behind `targets apply`'s back,
/// as a buggy or newer ingester could) is refused: the agent keeps probing its previous set,
/// keeps the previous set on disk, and reports the refusal until a good set arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_target_set_keeps_the_old_one() {
    let f = Fixture::start("fleet-refused").await;
    let (run, target, client, ingester_file) = (&f.run, &f.target, &f.client, &f.ingester_file);
    let (token, handle) = spawn_agent(run, "us-east", run.services.mqtt_port);
    let us_agent = agent_id(run, "us-east");
    let v1 = targets_file(
        run,
        "targets-v1.toml",
        target,
        &[("alpha", "/alpha", ""), ("delta", "/delta", "")],
    );
    apply(ingester_file, &v1);
    wait_for("rows of both targets", Duration::from_secs(60), || async {
        let c = counts(client).await;
        (count(&c, "alpha", "us-east") >= 2 && count(&c, "delta", "us-east") >= 2).then_some(())
    })
    .await;

    // --- A pushed set the agent refuses: it keeps its old set and says why. ---------------
    let mqtt = f.mqtt();
    let invalid = {
        use vantage_proto::control::{encode_target_set, TargetSetHeader, MAX_TARGET_SET_LEN};
        let mut raw = vantage_agent::target::RawTarget::with_url(999, &target.url("/evil"));
        raw.name = Some("evil".into());
        raw.timeout = Duration::from_secs(60); // longer than the interval: invalid
        let spec = vantage_agent::target_set::spec_from_raw(&raw).unwrap();
        let mut buf = vec![0u8; MAX_TARGET_SET_LEN];
        encode_target_set(
            &TargetSetHeader {
                generation: 99,
                count: 1,
            },
            [&spec],
            &mut buf,
        )
        .unwrap()
        .to_vec()
    };
    let us_topic = format!("{}/v1/targets/us-east", run.prefix());
    vantage_ingester::targets::publish(mqtt, vec![(us_topic.clone(), invalid)])
        .await
        .unwrap();
    let rejection: String = wait_for(
        "the us-east agent to report the rejection",
        Duration::from_secs(30),
        || async {
            client
                .query_opt(
                    "SELECT rejection FROM agents WHERE agent = $1 AND rejected_generation = 99
                    AND rejected_scope = 'region' AND region_set_generation = 1",
                    &[&us_agent],
                )
                .await
                .unwrap()
                .map(|r| r.get(0))
        },
    )
    .await;
    assert!(rejection.contains("timeout"), "{rejection}");
    let before = counts(client).await;
    let after = wait_for(
        "more us-east rows under the old set",
        Duration::from_secs(60),
        || async {
            let c = counts(client).await;
            (count(&c, "alpha", "us-east") >= count(&before, "alpha", "us-east") + 4
                && count(&c, "delta", "us-east") >= count(&before, "delta", "us-east") + 4)
                .then_some(c)
        },
    )
    .await;
    let evil: i64 = query_scalar(
        client,
        "SELECT count(*) FROM results WHERE target_id = 999",
        &[],
    )
    .await;
    assert_eq!(evil, 0);
    drop(after);

    // The refused set was not persisted: a restart would still start from generation 1.
    assert_eq!(book(run, "us-east").region_generation(), 1);
    let out = ingester(ingester_file, &["agents"], &[]);
    assert!(
        text(&out.stdout).contains("region set 99"),
        "{}",
        text(&out.stdout)
    );

    // The documented fix, re-applying the good file, republishes the set the agent holds
    // (unchanged, generation 1): that clears the refusal (issue #14 item 13).
    apply(ingester_file, &v1);
    wait_agent(
        client,
        &us_agent,
        "rejection IS NULL AND region_set_generation = 1 AND targets = 2",
        "the refusal to clear after re-applying the good file",
    )
    .await;

    // A valid set of an older generation than the one held (a broker restored from a
    // backup) is refused too, and reported (issue #14 item 12).
    let older = {
        use vantage_proto::control::{encode_target_set, TargetSetHeader, MAX_TARGET_SET_LEN};
        let mut raw = vantage_agent::target::RawTarget::with_url(998, &target.url("/old"));
        raw.name = Some("old".into());
        let spec = vantage_agent::target_set::spec_from_raw(&raw).unwrap();
        let mut buf = vec![0u8; MAX_TARGET_SET_LEN];
        encode_target_set(
            &TargetSetHeader {
                generation: 0,
                count: 1,
            },
            [&spec],
            &mut buf,
        )
        .unwrap()
        .to_vec()
    };
    vantage_ingester::targets::publish(mqtt, vec![(us_topic.clone(), older)])
        .await
        .unwrap();
    wait_agent(
        client,
        &us_agent,
        "rejected_generation = 0 AND rejection LIKE '%older than the generation 1%'
         AND region_set_generation = 1 AND targets = 2",
        "the us-east agent to refuse the older generation",
    )
    .await;

    // A good set replaces the refused one, and the refusal is cleared.
    let v2 = targets_file(run, "targets-v2.toml", target, &[("alpha", "/alpha", "")]);
    apply(ingester_file, &v2);
    wait_agent(
        client,
        &us_agent,
        "rejection IS NULL AND region_set_generation = 2 AND targets = 1",
        "the refusal to clear",
    )
    .await;

    token.cancel();
    let _ = handle.await;
    f.finish(&[us_agent]).await;
}

fn status_frame(agent: &str, region: &str) -> Vec<u8> {
    status_frame_with(agent, region, vantage_proto::control::AgentState::Online, 0)
}

/// A status of boot 7 in `state`, reporting `targets` targets.
fn status_frame_with(
    agent: &str,
    region: &str,
    state: vantage_proto::control::AgentState,
    targets: u32,
) -> Vec<u8> {
    use vantage_proto::control::{encode_status, AgentStatus, MAX_STATUS_LEN};
    let status = AgentStatus {
        state,
        agent_id: agent.try_into().unwrap(),
        region: region.try_into().unwrap(),
        boot_id: 7,
        version: "0.0.0-forged".try_into().unwrap(),
        sent_at_ms: 1,
        max_concurrency: 1,
        buffer_capacity: 1,
        targets,
        pending_results: 0,
        region_set_generation: 0,
        agent_set_generation: 0,
        rejection: None,
    };
    let mut buf = [0u8; MAX_STATUS_LEN];
    encode_status(&status, &mut buf).unwrap().to_vec()
}

/// A status whose claims (agent, region) disagree with the topic it was published on is
/// dead-lettered with the reason `claims_mismatch` and never reaches `agents`; the bridge goes on
/// and takes the next, honest status.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_status_is_dead_lettered() {
    let f = Fixture::start("fleet-forged").await;
    let (run, client) = (&f.run, &f.client);
    let topic = format!("{}/v1/status/us-east/pi-honest", run.prefix());
    let forger = format!("forger-{}", run.id);
    // In one connection, so in this order: two forgeries, then the honest status.
    let messages = [
        (topic.clone(), status_frame("pi-intruder", "us-east")),
        (topic.clone(), status_frame("pi-honest", "eu-north")),
        (topic.clone(), status_frame("pi-honest", "us-east")),
    ];
    publish_as_agent(&run.services, &forger, &messages).await;
    let agents: Vec<(String, String)> =
        wait_for("the honest status", Duration::from_secs(60), || async {
            let rows = client
                .query("SELECT agent, region FROM agents ORDER BY agent", &[])
                .await
                .ok()?;
            (!rows.is_empty()).then(|| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .await;
    assert_eq!(agents, [("pi-honest".to_owned(), "us-east".to_owned())]);
    let dead = run.read_topic(&run.dead_letter_topic());
    let reasons: Vec<&str> = dead
        .iter()
        .filter_map(|r| r.header(vantage_ingester::kafka::REASON_HEADER))
        .collect();
    assert_eq!(reasons, ["claims_mismatch", "claims_mismatch"], "{dead:?}");
    // The forger used a clean session: nothing of it stays on the broker.
    f.finish(&[]).await;
}

/// Issue #14 item 10: Kafka order is not receive order (the bridge delivers concurrently, and a
/// delivery it retried lands after a later status), so the sink orders statuses by the bridge's
/// receive time, the record timestamp: an older status never replaces a newer one, a newer one
/// always does, and a last will received before the stored status does not mark the agent lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_older_status_never_replaces_a_newer_one() {
    use vantage_proto::control::AgentState;
    use vantage_tests::harness::ProducedRecord;
    let f = Fixture::start("fleet-order").await;
    let (run, client) = (&f.run, &f.client);
    let (agent, marker) = ("pi-order", "pi-marker");
    let record = |who: &str, state: AgentState, targets: u32, at_ms: i64| ProducedRecord {
        partition: 0,
        key: format!("us-east/{who}"),
        payload: status_frame_with(who, "us-east", state, targets),
        headers: vec![(
            vantage_ingester::bridge::KIND_HEADER.to_owned(),
            "status".to_owned(),
        )],
        timestamp_ms: at_ms,
    };
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // One partition, so the sink sees them in this order; the marker (another agent, after
    // them) says when the first two have been applied.
    run.produce(
        &run.topic(),
        &[
            record(agent, AgentState::Online, 3, t),
            record(agent, AgentState::Offline, 1, t - 5_000),
            record(agent, AgentState::Lost, 0, t - 4_000),
            record(marker, AgentState::Online, 0, t),
        ],
    )
    .await;
    // (The sink may still be applying the migrations: errors count as "not yet".)
    wait_for("the marker status", Duration::from_secs(60), || async {
        client
            .query_opt("SELECT 1 FROM agents WHERE agent = $1", &[&marker])
            .await
            .ok()
            .flatten()
    })
    .await;
    let row = client
        .query_one(
            "SELECT state, online, targets, (extract(epoch FROM state_at) * 1000)::int8
               FROM agents WHERE agent = $1",
            &[&agent],
        )
        .await
        .unwrap();
    let got: (String, bool, i32, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        got,
        ("online".to_owned(), true, 3, t),
        "an older status (or will) replaced the newer one"
    );
    // Newer ones still apply: a heartbeat, then the will of this boot.
    run.produce(
        &run.topic(),
        &[
            record(agent, AgentState::Heartbeat, 4, t + 1_000),
            record(agent, AgentState::Lost, 0, t + 2_000),
        ],
    )
    .await;
    wait_agent(
        client,
        agent,
        "state = 'lost' AND NOT online AND targets = 4",
        "the newer heartbeat and will",
    )
    .await;
    f.finish(&[]).await;
}

/// Issue #14 item 12: `targets diff` only reads. On a database without the migrations it says
/// so and creates nothing (not even the schema); on a migrated one it plans without writing.
#[tokio::test]
async fn targets_diff_only_reads() {
    let run = Run::new("fleet-diff");
    let ingester_file = run.ingester_file(&IngesterOptions::default());
    let target = TargetServer::start("127.0.0.1:0").await.unwrap();
    let file = targets_file(&run, "targets.toml", &target, &[("alpha", "/alpha", "")]);
    let admin = run.pg().await;
    let schema_exists = || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
                &[&run.schema()],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    };
    let out = ingester(
        &ingester_file,
        &["targets", "diff"],
        &[file.to_str().unwrap()],
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        err.contains("run `vantage-ingester migrate` first"),
        "{err}"
    );
    assert!(!schema_exists().await, "diff created the schema");

    let out = ingester(&ingester_file, &["migrate"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ingester(
        &ingester_file,
        &["targets", "diff"],
        &[file.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("1 to add, 0 to change, 0 to retire"),
        "{}",
        text(&out.stdout)
    );
    let written: i64 = query_scalar(
        &admin,
        "SELECT (SELECT count(*) FROM targets) + (SELECT count(*) FROM target_applies)
                  + (SELECT count(*) FROM target_sets)",
        &[],
    )
    .await;
    assert_eq!(written, 0, "diff wrote to the database");
    run.cleanup(&[]).await;
}

/// Issue #14 item 7: new central ids come from the central targets alone. Ids seen only in
/// results (here a standalone agent's 1 and a hostile agent's 2147483647) are skipped but do not
/// move the start, so they cannot use up the id space.
#[tokio::test]
async fn new_ids_are_allocated_from_central_targets_only() {
    let run = Run::new("fleet-ids");
    let mut client = run.pg().await;
    vantage_ingester::db::migrate(&mut client, &run.schema())
        .await
        .unwrap();
    // What the results trigger leaves behind for ids it saw.
    client
        .batch_execute("INSERT INTO targets (target_id) VALUES (1), (2147483647)")
        .await
        .unwrap();
    let text = "regions = [\"eu-north\"]\n\
                [[targets]]\nname = \"a\"\nurl = \"http://a.example/\"\n\
                [[targets]]\nname = \"b\"\nurl = \"http://b.example/\"\n";
    let file =
        vantage_ingester::targets::TargetsFile::parse(text, Path::new("targets.toml")).unwrap();
    let plan = vantage_ingester::targets::plan(&client, &file)
        .await
        .unwrap_or_else(|e| panic!("no id for new targets: {e}"));
    let ids: Vec<u32> = plan.added.iter().map(|p| p.id).collect();
    assert_eq!(ids, [2, 3]);
    run.cleanup(&[]).await;
}

/// A result frame of `boot` with (seq, target id, probe start in ms) results.
fn frame_of(boot: u64, results: &[(u64, i32, i64)]) -> Vec<u8> {
    let mut synth = vantage_tests::loadgen::Synth::new(boot);
    let mut batch = vantage_proto::Batch {
        boot_id: boot,
        results: heapless::Vec::new(),
        gaps: heapless::Vec::new(),
        clock: None,
    };
    for &(seq, target, at) in results {
        let mut r = synth.result();
        r.seq = seq;
        r.target_id = target as u32;
        r.started_at_ms = at as u64;
        r.cert_not_after_s = Some(1_800_000_000);
        batch.results.push(r).unwrap();
    }
    let mut buf = [0u8; vantage_proto::MAX_FRAME_LEN];
    vantage_proto::encode(&batch, &mut buf).unwrap().to_vec()
}

/// Issue #14 item 7: once central targets are in use for a region, the sink writes a result
/// only for a target its agent was given (its region's set or its own pinned set); the others
/// are dead-lettered as `unassigned_target`, in a frame of their own, and never reach `results`
/// or `latest_results`. A region without central targets (standalone agents) is not checked.
/// Right after an apply, a result of a target that left the set is accepted if it was probed
/// before it left (plus a grace); one probed long after is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_for_targets_not_given_are_dead_lettered() {
    let f = Fixture::start("fleet-assigned").await;
    let (run, target, client, ingester_file) = (&f.run, &f.target, &f.client, &f.ingester_file);
    let v1 = targets_file(
        run,
        "targets-v1.toml",
        target,
        &[
            ("alpha", "/alpha", ""),
            ("lab", "/lab", "agents = [\"us-east/pi-lab\"]"),
        ],
    );
    apply(ingester_file, &v1);
    let (alpha, lab) = (
        target_id(client, "alpha").await,
        target_id(client, "lab").await,
    );
    let stranger = 99_999;
    let topic = |region: &str, agent: &str| format!("{}/v1/results/{region}/{agent}", run.prefix());
    let now: i64 = query_scalar(
        client,
        "SELECT (extract(epoch FROM now()) * 1000)::int8",
        &[],
    )
    .await;
    let publisher = format!("assign-{}", run.id);
    publish_as_agent(
        &run.services,
        &publisher,
        &[
            (
                topic("us-east", "pi-x"),
                frame_of(1, &[(0, alpha, now), (1, lab, now), (2, stranger, now)]),
            ),
            (topic("us-east", "pi-lab"), frame_of(2, &[(0, lab, now)])),
            (
                topic("ap-south", "pi-solo"),
                frame_of(3, &[(0, stranger, now)]),
            ),
        ],
    )
    .await;
    let stored = |n: usize| async move {
        wait_for(&format!("{n} results"), Duration::from_secs(60), || async {
            let sql = "SELECT agent, target_id, seq FROM results ORDER BY 1, 2, 3";
            let rows: Vec<(String, i32, i64)> = query_triples(client, sql).await;
            (rows.len() >= n).then_some(rows)
        })
        .await
    };
    let dead_letters = |n: usize| {
        wait_for_sync(
            &format!("{n} dead letters"),
            Duration::from_secs(60),
            || {
                let dead = run.read_topic(&run.dead_letter_topic());
                (dead.len() >= n).then_some(dead)
            },
        )
    };
    let dead = dead_letters(1);
    let rows = stored(3).await;
    assert_eq!(
        rows,
        [
            ("pi-lab".to_owned(), lab, 0),
            ("pi-solo".to_owned(), stranger, 0),
            ("pi-x".to_owned(), alpha, 0),
        ]
    );
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0].header(vantage_ingester::kafka::REASON_HEADER),
        Some("unassigned_target")
    );
    assert_eq!(dead[0].key.as_deref(), Some(b"us-east/pi-x".as_slice()));
    let refused = vantage_proto::decode(&dead[0].payload).unwrap();
    let ids: Vec<u32> = refused.results.iter().map(|r| r.target_id).collect();
    assert_eq!(ids, [lab as u32, stranger as u32]);
    let latest: i64 = query_scalar(
        client,
        "SELECT count(*) FROM latest_results WHERE region = 'us-east' AND target_id = $1",
        &[&stranger],
    )
    .await;
    assert_eq!(latest, 0);

    // alpha leaves us-east. A result probed before the apply (in flight) is still accepted...
    let v2 = targets_file(
        run,
        "targets-v2.toml",
        target,
        &[
            ("alpha", "/alpha", "regions = [\"eu-north\"]"),
            ("lab", "/lab", "agents = [\"us-east/pi-lab\"]"),
        ],
    );
    apply(ingester_file, &v2);
    publish_as_agent(
        &run.services,
        &publisher,
        &[(topic("us-east", "pi-x"), frame_of(1, &[(3, alpha, now)]))],
    )
    .await;
    stored(4).await;
    // ...one probed longer than the grace after it left is not. (The removal is moved an hour
    // back, and the version bumped as the trigger does; the sink looks again within a second.)
    client
        .batch_execute(&format!(
            "UPDATE target_assignments SET unassigned_at = unassigned_at - interval '1 hour'
              WHERE region = 'us-east' AND target_id = {alpha} AND unassigned_at IS NOT NULL;
             UPDATE target_assignments_version SET version = version + 1"
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish_as_agent(
        &run.services,
        &publisher,
        &[(topic("us-east", "pi-x"), frame_of(1, &[(4, alpha, now)]))],
    )
    .await;
    let dead = dead_letters(2);
    let refused = vantage_proto::decode(&dead[1].payload).unwrap();
    assert_eq!(
        refused
            .results
            .iter()
            .map(|r| (r.seq, r.target_id))
            .collect::<Vec<_>>(),
        [(4, alpha as u32)]
    );
    let rows = stored(4).await;
    assert_eq!(rows.len(), 4, "{rows:?}");
    f.finish(&[]).await;
}

/// [`wait_for`] for a blocking check.
fn wait_for_sync<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The retained payload on `topic` (as the broker holds it now).
async fn retained(run: &Run, topic: &str) -> Vec<u8> {
    let mut options = rumqttc::MqttOptions::new(
        format!("retained-{}", vantage_tests::unique_id()),
        run.services.mqtt_host.clone(),
        run.services.mqtt_port,
    );
    options.set_credentials("ingester", "ingester-secret");
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .subscribe(topic, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let payload = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
                eventloop.poll().await.expect("MQTT broker")
            {
                if p.retain {
                    return p.payload.to_vec();
                }
            }
        }
    })
    .await
    .expect("a retained message within 20 s");
    let _ = client.try_disconnect();
    payload
}

/// Issue #14 item 9: a header whose value is a secret is written centrally as a reference
/// (`header_files` / `headers_from_env`), resolved by the agent: the value reaches the target
/// server, and never appears in `targets.spec`, the retained target set, or `Debug` output.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn header_secrets_stay_on_the_agent() {
    let f = Fixture::start("fleet-headers").await;
    let (run, target, client, ingester_file) = (&f.run, &f.target, &f.client, &f.ingester_file);
    let token = format!("Bearer {}", vantage_tests::unique_id());
    let token_file = run.dir.join("api-token");
    write_file(&token_file, &format!("{token}\n"));
    let file = targets_file(
        run,
        "targets.toml",
        target,
        &[(
            "private",
            "/private",
            &format!(
                "header_files = {{ authorization = \"{}\" }}\n\
                 headers_from_env = {{ x-from-env = \"CARGO_PKG_NAME\" }}",
                token_file.display()
            ),
        )],
    );
    let (agent_token, handle) = spawn_agent(run, "us-east", run.services.mqtt_port);
    apply(ingester_file, &file);
    let private = target_id(client, "private").await;

    // The agent read the file and the variable: the target server got both values.
    let seen = wait_for(
        "a request with the token",
        Duration::from_secs(60),
        || async {
            target
                .seen()
                .into_iter()
                .find(|r| r.target == "/private")
                .filter(|r| {
                    r.headers
                        .contains(&("authorization".to_owned(), token.clone()))
                })
        },
    )
    .await;
    assert!(
        seen.headers
            .contains(&("x-from-env".to_owned(), "vantage-tests".to_owned())),
        "{seen:?}"
    );
    wait_for(
        "rows of the private target",
        Duration::from_secs(60),
        || async {
            let n: i64 = query_scalar(
                client,
                "SELECT count(*) FROM results WHERE target_id = $1 AND outcome = 'up'",
                &[&private],
            )
            .await;
            (n >= 1).then_some(())
        },
    )
    .await;

    // Centrally only the reference: targets.spec, the retained set, Debug of every raw type.
    let spec: String = query_scalar(
        client,
        "SELECT spec::text FROM targets WHERE target_id = $1",
        &[&private],
    )
    .await;
    assert!(
        spec.contains(&token_file.display().to_string()) && !spec.contains(&token),
        "{spec}"
    );
    let payload = retained(run, &format!("{}/v1/targets/us-east", run.prefix())).await;
    assert!(!payload.is_empty());
    assert!(
        !payload.windows(token.len()).any(|w| w == token.as_bytes()),
        "the token is in the retained set"
    );
    let parsed = vantage_ingester::targets::TargetsFile::load(&file).unwrap();
    let set = vantage_agent::target_set::validate_frame(&payload).unwrap();
    let book = book(run, "us-east");
    for (what, debug) in [
        ("targets file", format!("{parsed:?}")),
        ("received set", format!("{set:?}")),
        ("agent's book", format!("{book:?}")),
        (
            "raw target",
            format!(
                "{:?}",
                vantage_agent::target_set::raw_from_spec(
                    &vantage_proto::control::TargetSetReader::new(&payload)
                        .unwrap()
                        .next()
                        .unwrap()
                        .unwrap()
                )
            ),
        ),
    ] {
        assert!(!debug.contains(&token), "{what}: {debug}");
    }
    // A literal value (not a secret by this file's choice) is hidden from Debug too.
    let mut literal = vantage_agent::target::RawTarget::with_url(1, "http://h/");
    literal
        .headers
        .insert("authorization".into(), token.clone());
    assert!(!format!("{literal:?}").contains(&token));
    let spec = vantage_agent::target_set::spec_from_raw(&literal).unwrap();
    assert!(!format!("{spec:?}").contains(&token));

    agent_token.cancel();
    let _ = handle.await;
    let agent = agent_id(run, "us-east");
    f.finish(&[agent]).await;
}
