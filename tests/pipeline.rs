//! End to end on the real services (`tests/services/up` must have started them):
//! two agents in two regions → Mosquitto → bridge → Kafka → sink → PostgreSQL.
//!
//! Every run uses its own MQTT topic prefix, Kafka topics and group, and PostgreSQL schema, and
//! removes them at the end, so runs can overlap and leave nothing behind.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vantage_tests::agent_toml::{agent_head, load_agent_config, target_entry};
use vantage_tests::harness::{publish_as_agent, Run};
use vantage_tests::in_process::{count_results, two_partitions, wait_results_then_settle};
use vantage_tests::target::TargetServer;

/// (region, target, status, outcome, regex match, count): one group of result rows.
type OutcomeCount = (String, i32, Option<i16>, String, Option<bool>, i64);

/// Delay the target adds for the slow region.
const SLOW_REGION_DELAY_MS: u64 = 150;
const ROUNDS: u64 = 4;

/// An agent in `region` probing three targets of `target`, each delayed by `delay_ms`.
fn agent_config(
    run: &Run,
    region: &str,
    delay_ms: u64,
    target: &TargetServer,
) -> vantage_agent::Config {
    let mut text = agent_head(run, &format!("{region}-{}", run.id), region);
    text.push_str("\n[uplink]\nbatch_max = 4\nflush_interval = \"200ms\"\n");
    // 1: up, regex matches. 2: a 404. 3: up, but the regex does not match.
    let (up, missing) = (
        target.url(&format!("/?delay_ms={delay_ms}")),
        target.url(&format!("/missing?status=404&delay_ms={delay_ms}")),
    );
    text.push_str(&target_entry(
        1,
        &up,
        "1s",
        "1s",
        "regex = \"target: ok\"\n",
    ));
    text.push_str(&target_entry(2, &missing, "1s", "1s", ""));
    text.push_str(&target_entry(
        3,
        &up,
        "1s",
        "1s",
        "regex = \"no such text\"\n",
    ));
    load_agent_config(run, &format!("agent-{region}.toml"), &text)
}

/// Publishes one undecodable payload on a results topic, as a broken agent would.
async fn publish_garbage(run: &Run) {
    let topic = format!("{}/v1/results/eu-north/broken", run.prefix());
    let client_id = format!("garbage-{}", run.id);
    publish_as_agent(&run.services, &client_id, &[(topic, vec![0xFF, 0, 1, 2])]).await;
}

fn init_tracing() {
    vantage_tests::in_process::init_tracing("warn,vantage_ingester=info");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_regions_reach_postgres_exactly_once() {
    init_tracing();
    // Sink first (it applies the migrations), then the bridge; agents start once the bridge's
    // subscription exists, because MQTT keeps nothing for a subscriber that never subscribed.
    let options = two_partitions(50, 100);
    let started = vantage_tests::in_process::start("pipeline", &options).await;
    let (run, target) = (started.run, started.target);
    let (stop, stages) = (started.stop, started.stages);

    publish_garbage(&run).await;

    let agent_options = vantage_agent::RunOptions {
        rounds: Some(ROUNDS),
    };
    let fast = vantage_agent::run(
        agent_config(&run, "eu-north", 0, &target),
        agent_options.clone(),
        CancellationToken::new(),
    );
    let slow = vantage_agent::run(
        agent_config(&run, "us-east", SLOW_REGION_DELAY_MS, &target),
        agent_options,
        CancellationToken::new(),
    );
    let (fast, slow) = tokio::join!(fast, slow);
    let (fast, slow) = (fast.unwrap(), slow.unwrap());
    for s in [&fast, &slow] {
        assert_eq!(s.probes_started, 3 * ROUNDS, "{s:?}");
        assert_eq!(s.uplink.results, 3 * ROUNDS, "{s:?}");
        assert_eq!(s.uplink.undelivered, 0, "{s:?}");
        assert_eq!(s.uplink.pubacks_out_of_order, 0, "{s:?}");
        assert_eq!(s.uplink.dropped, 0, "{s:?}");
    }
    let expected = (2 * 3 * ROUNDS) as i64;

    // Wait for the rows, then a little longer to give any duplicate a chance to show up.
    let client = run.pg().await;
    wait_results_then_settle(&client, expected).await;
    let (bridge_stats, sink_stats) = stages.stop(&stop).await;

    // Exactly once: every (agent, boot, seq) once, nothing more.
    assert_eq!(count_results(&client).await, expected);
    assert_eq!(sink_stats.rows_inserted as i64, expected);
    // The garbage frame went to the dead-letter topic and the bridge carried on.
    assert_eq!(bridge_stats.dead_lettered, 1, "{bridge_stats:?}");
    assert_eq!(
        bridge_stats.acked, bridge_stats.received,
        "{bridge_stats:?}"
    );

    // Region tags, status codes, regex outcomes.
    let rows = client
        .query(
            "SELECT region, target_id, status, outcome, regex_match, count(*)
               FROM results GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<OutcomeCount> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let n = ROUNDS as i64;
    let mut want = Vec::new();
    for region in ["eu-north", "us-east"] {
        want.push((
            region.to_owned(),
            1,
            Some(200),
            "up".to_owned(),
            Some(true),
            n,
        ));
        want.push((
            region.to_owned(),
            2,
            Some(404),
            "status_not_accepted".to_owned(),
            None,
            n,
        ));
        want.push((
            region.to_owned(),
            3,
            Some(200),
            "regex_not_matched".to_owned(),
            Some(false),
            n,
        ));
    }
    assert_eq!(got, want);

    // Phases are measured and consistent with the total.
    let bad_phases: i64 = client
        .query_one(
            "SELECT count(*) FROM results
              WHERE connect_us IS NULL OR ttfb_us IS NULL OR total_us <= 0
                 OR connect_us + ttfb_us > total_us OR body_bytes <= 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bad_phases, 0);

    // The slow region is slower by about the injected delay.
    let medians = client
        .query(
            "SELECT region, percentile_cont(0.5) WITHIN GROUP (ORDER BY total_us) / 1000.0
               FROM results GROUP BY region ORDER BY region",
            &[],
        )
        .await
        .unwrap();
    let fast_ms: f64 = medians[0].get(1);
    let slow_ms: f64 = medians[1].get(1);
    let diff = slow_ms - fast_ms;
    println!(
        "median total: eu-north {fast_ms:.1} ms, us-east {slow_ms:.1} ms, difference {diff:.1} ms"
    );
    let injected = SLOW_REGION_DELAY_MS as f64;
    assert!(
        // Generous on purpose: this checks that the delay shows up in the right region, not the
        // machine's scheduling (CI shares 2 cores with Kafka and PostgreSQL).
        diff >= injected * 0.6 && diff <= injected + 250.0,
        "difference {diff:.1} ms, injected {injected} ms"
    );

    // The sink's group committed every offset it consumed: acknowledgement, not just arrival.
    for (partition, committed, end) in run.committed_and_end() {
        assert_eq!(
            committed, end,
            "partition {partition}: committed {committed}, end {end}"
        );
    }

    // The report command's query answers from the same rows.
    let report = vantage_ingester::report::query(&client, Duration::from_secs(3600), None, None)
        .await
        .unwrap();
    assert_eq!(report.len(), 6);
    assert!(report.iter().all(|r| r.probes == n));

    let mqtt_sessions = [
        run.bridge_client_id(&options.client),
        format!("vantage-agent-eu-north-{}", run.id),
        format!("vantage-agent-us-east-{}", run.id),
        format!("garbage-{}", run.id),
    ];
    run.cleanup(&mqtt_sessions).await;
}
