//! Silence becomes data (issue #18 item 4), end to end: the real `vantage-agent` binary, stopped
//! with SIGSTOP (what a suspended board or a stalled process looks like from outside) and let go
//! again, publishes a `missed` result for every period it did not probe; the bridge and sink
//! (in-process) store them, the hourly view counts them as probes that were not up, and
//! `latest_status` keeps the last real measurement. A tcp target's missed periods are tcp
//! results (issue #20: the sink takes a target's kind from its newest results).
//!
//! Build the binaries first (`cargo build --bins`, as `make test` does).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use vantage_tests::now_ms;

use tokio_util::sync::CancellationToken;
use vantage_tests::agent_toml::{agent_head, target_entry};
use vantage_tests::harness::{write_file, IngesterOptions, Run};
use vantage_tests::in_process::{start_sink_and_bridge, wait_for};
use vantage_tests::stage::agent_command;
use vantage_tests::target::TargetServer;

const TARGET: i32 = 1;
const TCP_TARGET: i32 = 2;
const STOPPED: Duration = Duration::from_secs(6);

/// (outcome, started_at as ms since the epoch, total_us, status) of every row of the target.
async fn rows(client: &tokio_postgres::Client) -> Vec<(String, i64, i32, i32)> {
    client
        .query(
            "SELECT outcome, (extract(epoch FROM started_at) * 1000)::bigint, coalesce(total_us, 0),
                    coalesce(status, 0)::integer
               FROM results WHERE target_id = $1 ORDER BY started_at",
            &[&TARGET],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_reports_the_periods_it_missed() {
    let run = Run::new("missed");
    let target = TargetServer::start("127.0.0.1:0").await.unwrap();
    let options = IngesterOptions::default();
    let ingester = Arc::new(run.ingester_config(&options));
    let stop = CancellationToken::new();
    let stages = start_sink_and_bridge(&ingester, &stop).await;

    let agent_id = format!("missed-{}", run.id);
    let config = agent_head(&run, &agent_id, "eu-north")
        + "[uplink]\nbatch_max = 1\n"
        + &target_entry(TARGET as u32, &target.url("/ok"), "1s", "500ms", "")
        + &format!(
            "\n[[targets]]\nid = {TCP_TARGET}\nkind = \"tcp\"\naddress = \"{}\"\n\
             interval = \"1s\"\ntimeout = \"500ms\"\n",
            target.addr
        );
    let config_path = run.dir.join("agent.toml");
    write_file(&config_path, &config);
    let log_path = run.dir.join("agent.log");
    let mut agent = agent_command(&config_path, &log_path)
        .spawn()
        .expect("start vantage-agent (cargo build --bins first)");
    let pid = agent.id();

    let client = run.pg().await;
    let up_rows = |n: usize| {
        let client = &client;
        move || async move {
            let r = rows(client).await;
            (r.iter().filter(|x| x.0 == "up").count() >= n).then_some(r)
        }
    };
    wait_for(
        "three measured results",
        Duration::from_secs(60),
        up_rows(3),
    )
    .await;

    // Suspended: no probe runs, no timer fires.
    let stopped_at = now_ms() as i64;
    signal(pid, "-STOP");
    tokio::time::sleep(STOPPED).await;
    signal(pid, "-CONT");
    let resumed_at = now_ms() as i64;

    let measured_before = rows(&client).await.iter().filter(|x| x.0 == "up").count();
    let all = wait_for(
        "missed results and measured ones after the stop",
        Duration::from_secs(60),
        || async {
            let r = rows(&client).await;
            let missed = r.iter().filter(|x| x.0 == "missed").count();
            let up = r.iter().filter(|x| x.0 == "up").count();
            (missed >= 4 && up >= measured_before + 3).then_some(r)
        },
    )
    .await;
    let tcp: Vec<(String, String)> = wait_for(
        "missed results of the tcp target",
        Duration::from_secs(30),
        || async {
            let r: Vec<(String, String)> = vantage_tests::in_process::query_pairs(
                &client,
                &format!("SELECT outcome, kind FROM results WHERE target_id = {TCP_TARGET}"),
            )
            .await;
            r.iter().any(|(o, _)| o == "missed").then_some(r)
        },
    )
    .await;
    assert!(tcp.iter().all(|(_, kind)| kind == "tcp"), "{tcp:?}");
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = agent.wait();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    println!("{all:?}");

    // Every missed result is a period of the stop, without a measurement.
    let missed: Vec<_> = all.iter().filter(|x| x.0 == "missed").collect();
    for m in &missed {
        assert!(
            m.1 >= stopped_at - 1_000 && m.1 <= resumed_at + 1_000,
            "a missed period outside the stop ({stopped_at}..{resumed_at}): {m:?}\n{log}"
        );
        assert_eq!((m.2, m.3), (0, 0), "a missed result has no timings: {m:?}");
    }
    // One per second of the stop (6 s at 1 s: 5 or 6, as the stop and the grid fall).
    assert!(
        (4..=7).contains(&missed.len()),
        "{} missed results for a {STOPPED:?} stop at 1 s: {missed:?}\n{log}",
        missed.len()
    );
    // No period went silent from the first result to the last: measured + missed fill it.
    let span_s = (all[all.len() - 1].1 - all[0].1) as f64 / 1000.0;
    assert!(
        all.len() as f64 >= span_s - 1.0,
        "{} results over {span_s:.1} s: periods are missing\n{all:?}",
        all.len()
    );

    // Availability sees the missed periods: they are probes that were not up.
    let (probes, up): (i64, i64) = {
        let r = client
            .query_one(
                "SELECT sum(probes)::bigint, sum(up)::bigint FROM rollup_1h WHERE target_id = $1",
                &[&TARGET],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(probes as usize, all.len());
    assert_eq!(
        up as usize,
        all.iter().filter(|x| x.0 == "up").count(),
        "missed periods are not up"
    );
    // The latest measurement is a real one, whatever came after it.
    let latest: String = client
        .query_one(
            "SELECT outcome FROM latest_status WHERE target_id = $1",
            &[&TARGET],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(latest, "up");

    stages.stop(&stop).await;
    run.cleanup(&[
        run.bridge_client_id(&options.client),
        format!("vantage-agent-eu-north-{}", run.id),
    ])
    .await;
}
