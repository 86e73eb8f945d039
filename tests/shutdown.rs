//! The sink's shutdown is bounded even when Kafka does not answer (issue #9 "shutdown is clean";
//! the open bug: a sink sometimes did not exit within 30 s of SIGTERM after a Kafka restart).
//!
//! Also: a stage asked to stop while it waits to reconnect to a service that is down exits 0 at
//! once, having committed nothing that is not durable (issue #14: the sink exited 1 when
//! SIGTERM came while PostgreSQL was restarting).
//!
//! Freezes or stops the shared Kafka and PostgreSQL, so these tests are `#[ignore]`d and run
//! alone by `make test-crash`, after `cargo build --bins`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vantage_tests::harness::{publish_as_agent, result_frames, IngesterOptions, Run};
use vantage_tests::stage::{self, Service, ServicesGuard, StageProcess};

/// SIGTERM while Kafka is frozen: the sink's final offset commit and group leave cannot finish;
/// the sink must still exit 0 within 30 s (each Kafka step is bounded, `shutdown.rs`), and a
/// sink started after Kafka resumes replays what was not committed without adding a row.
///
/// The property under test is "bounded", so a deadline is inherent; 30 s is twice the designed
/// bound (10 s commit + 5 s close), not a performance figure (the benchmark-free way to tell
/// "bounded" from "hangs": before the fix the sink was still running when killed at 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "freezes the shared Kafka: run alone with `make test-crash`"]
async fn sink_exits_promptly_when_kafka_hangs_at_shutdown() {
    let Started {
        run,
        file,
        mut sink,
        mut bridge,
        agent,
        ..
    } = first_32_rows_stored("shutdown", "pi-s", 0x5d, 8).await;
    assert_eq!(bridge.terminate(Duration::from_secs(30)), Some(0));

    let kafka = stage::kafka_pid().expect("no Kafka pid file");
    let frozen = stage::Frozen::freeze(kafka);
    let asked = Instant::now();
    let code = sink.terminate(Duration::from_secs(30));
    let took = asked.elapsed();
    drop(frozen);
    let log = sink.log_text();
    let steps: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("in time") || l.contains("committed") || l.contains("closed"))
        .collect();
    println!("sink stopped in {took:.1?} with Kafka frozen, exit {code:?}: {steps:#?}");
    assert_eq!(code, Some(0), "sink did not exit 0 within 30 s:\n{log}");
    // The bound itself was exercised: with Kafka frozen, a step must have run out of time.
    assert!(
        log.contains("did not finish in time") || log.contains("did not close in time"),
        "no shutdown step hit its deadline, so Kafka was not really frozen:\n{log}"
    );

    // Kafka is back: a new sink replays whatever was not committed; the key absorbs it.
    let mut again = StageProcess::start("sink-again", "sink", &file, &run.dir);
    wait_offsets_caught_up(&run, Duration::from_secs(90), &again).await;
    assert_eq!(run.count_rows().await, 32);
    assert_eq!(again.terminate(Duration::from_secs(30)), Some(0));
    run.cleanup(&[run.bridge_client_id("a"), agent]).await;
}

/// Issue #14 (found by `make test-crash`): SIGTERM while the sink waits to reconnect to a
/// PostgreSQL that is down ends the sink with exit 0, promptly, and commits no offset of rows
/// that are not in PostgreSQL; once PostgreSQL is back a new sink stores every result once.
/// Two waits are tried: the writer's reconnect after a failed batch, and the connect at start
/// (which returned its last connect error as the stage's error: exit 1).
///
/// "Promptly" is part of the property, so there is a deadline: 15 s, one and a half times the
/// longest reconnect backoff (10 s) a stage that only noticed the stop after its wait would need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the shared PostgreSQL: run alone with `make test-crash`"]
async fn sink_stops_cleanly_while_reconnecting_to_postgres() {
    let _services = ServicesGuard;
    // 1. PostgreSQL goes away; the next batch fails and the writer waits to reconnect.
    let mut t = half_delivered_then_down(("pgdown", "pi-p", 0x9d), Service::Postgres).await;
    // The first step of a batch to notice: the assignment check (assign.rs) or the write.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while ![
        "cannot read target assignments, retrying",
        "cannot connect to PostgreSQL, retrying",
    ]
    .iter()
    .any(|l| t.sink.log_count(l) >= 2)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sink never waited for PostgreSQL:\n{}",
            t.sink.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = stop_cleanly(
        &mut t.sink,
        Duration::from_secs(15),
        "while its writer reconnected",
    );
    assert!(log.contains("batch left for replay"), "{log}");

    // 2. A sink started while PostgreSQL is still down waits at its first connect.
    let early = start_and_stop_early(
        (&t.run, &t.file, "sink"),
        (
            "cannot connect to PostgreSQL, retrying",
            2,
            Duration::from_secs(60),
            Duration::ZERO,
        ),
        (Duration::from_secs(15), "while connecting at start"),
    )
    .await;
    let log = early.log_text();
    assert!(log.contains("shutdown while reconnecting"), "{log}");

    // Nothing the sinks could not write was committed: PostgreSQL back, a new sink stores the
    // other 32 results, each once, and every offset gets committed.
    recovered_each_once(t, "sink").await;
}

/// The same for the bridge (issue #14, "the other stages"): SIGTERM while deliveries wait for
/// a Kafka that is down ends the bridge with exit 0 and acknowledges none of those messages
/// (the broker keeps them); SIGTERM to a bridge that starts while Kafka is down (it waits for
/// the topics) ends it at once, with exit 0; once Kafka is back a new bridge delivers every
/// result exactly once.
///
/// Deadlines: 30 s for the first stop (the designed 10 s grace for in-flight deliveries plus the
/// bounded MQTT disconnect); 5 s for the second, which has nothing in flight (before, it waited
/// out its topic check first: stopped after 8.0 s, exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the shared Kafka: run alone with `make test-crash`"]
async fn bridge_stops_cleanly_while_kafka_is_down() {
    let _services = ServicesGuard;
    // 1. Kafka goes away; the next messages wait in the bridge for a delivery report.
    let mut t = half_delivered_then_down(("kdown", "pi-k", 0x7d), Service::Kafka).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = stop_cleanly(
        &mut t.bridge,
        Duration::from_secs(30),
        "with deliveries waiting for Kafka",
    );
    let stopped = log
        .lines()
        .find(|l| l.contains("bridge stopped"))
        .unwrap_or_default();
    assert!(
        stopped.contains("received: 16") && stopped.contains("acked: 8"),
        "acknowledged what Kafka did not confirm, or did not receive the rest: {stopped}"
    );

    // 2. A bridge started while Kafka is still down waits for the topics.
    start_and_stop_early(
        (&t.run, &t.file, "bridge"),
        (
            "http listening",
            1,
            Duration::from_secs(30),
            Duration::from_secs(2),
        ),
        (Duration::from_secs(5), "while waiting for Kafka at start"),
    )
    .await;

    // Kafka back: a new bridge (same session) gets the 8 unacknowledged messages again.
    recovered_each_once(t, "bridge").await;
}

/// [`first_32_rows_stored`] with 16 frames; then `service` goes down (a clean stop) and the
/// other 8 frames are published: where both stop-while-reconnecting tests start from.
async fn half_delivered_then_down(
    (name, agent, seed): (&str, &str, u64),
    service: Service,
) -> Started {
    let t = first_32_rows_stored(name, agent, seed, 16).await;
    stage::service_down_async(service).await.unwrap();
    publish_as_agent(&t.run.services, &t.agent, &t.frames[8..]).await;
    t
}

/// Where every test here starts: a sink and a bridge (subscribed) of a new run, and `frames`
/// frames (4 results each) of one agent in eu-north, the first 8 of them published and stored
/// (32 rows).
struct Started {
    run: Run,
    file: PathBuf,
    sink: StageProcess,
    bridge: StageProcess,
    /// The agent's MQTT client id.
    agent: String,
    frames: Vec<(String, Vec<u8>)>,
}

async fn first_32_rows_stored(name: &str, agent: &str, seed: u64, frames: u64) -> Started {
    let run = Run::new(name);
    let file = run.ingester_file(&IngesterOptions::default());
    let (sink, bridge) = vantage_tests::stage::sink_and_bridge(&file, &run.dir).await;
    let client = format!("{}-{agent}", run.prefix());
    let topic = format!("{}/v1/results/eu-north/{agent}", run.prefix());
    let frames: Vec<(String, Vec<u8>)> = result_frames(seed, frames, 4)
        .into_iter()
        .map(|f| (topic.clone(), f))
        .collect();
    publish_as_agent(&run.services, &client, &frames[..8]).await;
    assert_eq!(run.wait_rows(32, Duration::from_secs(60)).await, 32);
    Started {
        run,
        file,
        sink,
        bridge,
        agent: client,
        frames,
    }
}

/// A `stage` (`sink` or `bridge`) of `run` on `file` started while a service is down: once its
/// log has `line` `times` (`within` at most) and `pause` later, SIGTERM ends it with exit 0 within
/// `limit` (printed with `while_`). The stopped stage, for its log.
async fn start_and_stop_early(
    (run, file, stage): (&Run, &Path, &str),
    (line, times, within, pause): (&str, usize, Duration, Duration),
    (limit, while_): (Duration, &str),
) -> StageProcess {
    let mut early = StageProcess::start(&format!("{stage}-early"), stage, file, &run.dir);
    let seen = early.wait_log(line, times, within).await;
    assert!(seen, "{}", early.log_text());
    tokio::time::sleep(pause).await;
    stop_cleanly(&mut early, limit, while_);
    early
}

/// The services back up, a new `kind` of stage (`sink` or `bridge`) of `t`'s run brings `results` to 64
/// rows, each (agent, boot, seq) once (a new sink: and its group commits every partition to its
/// end within 60 s); then it and the other stage stop with exit 0 and the run's names go.
async fn recovered_each_once(t: Started, kind: &str) {
    let Started {
        run,
        file,
        sink,
        bridge,
        agent,
        ..
    } = t;
    let mut other = if kind == "sink" { bridge } else { sink };
    stage::services_up_async().await.unwrap();
    let mut again = StageProcess::start(&format!("{kind}-again"), kind, &file, &run.dir);
    assert_eq!(
        run.wait_rows(64, Duration::from_secs(90)).await,
        64,
        "{}\n{}",
        again.log_text(),
        other.log_text()
    );
    if kind == "sink" {
        wait_offsets_caught_up(&run, Duration::from_secs(60), &again).await;
    }
    assert_each_result_once(&run, 64).await;
    assert_eq!(again.terminate(Duration::from_secs(30)), Some(0));
    assert_eq!(other.terminate(Duration::from_secs(30)), Some(0));
    run.cleanup(&[run.bridge_client_id("a"), agent]).await;
}

/// SIGTERM to `stage`, waiting `limit` at most; prints how long it took (`while`: in what
/// state) and checks that it exited 0; its log.
fn stop_cleanly(stage: &mut StageProcess, limit: Duration, while_: &str) -> String {
    let asked = Instant::now();
    let code = stage.terminate(limit);
    println!(
        "{} stopped in {:.1?} {while_}: exit {code:?}",
        stage.stage,
        asked.elapsed()
    );
    let log = stage.log_text();
    assert_eq!(code, Some(0), "exit {while_}:\n{log}");
    log
}

/// Waits (`limit` at most) until the run's group has committed every partition to its end
/// (and has committed something); `stage`'s log in the failure message.
async fn wait_offsets_caught_up(run: &Run, limit: Duration, stage: &StageProcess) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let offsets = run.committed_and_end();
        if !offsets.is_empty() && offsets.iter().all(|(_, c, e)| c == e) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "offsets never caught up: {offsets:?}\n{}",
            stage.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `results` holds `n` rows, each (agent, boot, seq) once.
async fn assert_each_result_once(run: &Run, n: i64) {
    let distinct: i64 = run
        .pg()
        .await
        .query_one(
            "SELECT count(*) FROM (SELECT DISTINCT agent, boot_id, seq FROM results) d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!((run.count_rows().await, distinct), (n, n));
}
