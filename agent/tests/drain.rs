//! A stop never loses a probe silently (issue #14 item 11): a probe still running at the drain
//! deadline is aborted and counted (`RunSummary::probes_aborted`), and the stop takes the drain
//! deadline, not the probe's timeout. Before: the run waited for the probe, whose result then
//! found the uplink gone and vanished: not numbered, not `undelivered`, no gap.
//!
//! No broker: the uplink just keeps what it has as `undelivered`. The target is a local server
//! that takes its request and never answers within the probe's timeout.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Starts an agent whose one target takes its request and answers after `answer_after` (never,
/// if None), stops the agent while that probe runs, and returns the run's summary.
async fn stop_during_a_probe(answer_after: Option<Duration>) -> vantage_agent::RunSummary {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (got_request, request_seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let _ = got_request.send(());
        match answer_after {
            Some(after) => {
                std::thread::sleep(after);
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                );
            }
            // Holds the connection until the test process ends.
            None => std::thread::sleep(Duration::from_secs(3600)),
        }
    });
    // A target due within 300 ms of the start (the phase is a hash of the id).
    let interval = Duration::from_secs(20);
    let id = (1..10_000)
        .find(|&id| vantage_agent::scheduler::phase(id, interval) < Duration::from_millis(300))
        .unwrap();
    let text = format!(
        "agent_id = \"drain-test\"\nregion = \"eu-north\"\nstate_dir = \"{dir}\"\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = 1\n\
         [uplink]\ndrain_timeout = \"500ms\"\n\
         [[targets]]\nid = {id}\nurl = \"http://{addr}/\"\ninterval = \"20s\"\ntimeout = \"20s\"\n",
        // Its own state_dir (the spool lives there): the tests of this file run at once.
        dir = std::env::temp_dir()
            .join(format!(
                "vantage-drain-{}-{}",
                std::process::id(),
                answer_after.map_or(0, |d| d.as_millis())
            ))
            .display(),
    );
    let config = vantage_agent::Config::parse(&text, Path::new("drain.toml")).unwrap();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(vantage_agent::run(
        config,
        vantage_agent::RunOptions::default(),
        shutdown.clone(),
    ));
    // Stop while the probe waits for its answer.
    let seen =
        tokio::task::spawn_blocking(move || request_seen.recv_timeout(Duration::from_secs(30)));
    seen.await.unwrap().expect("the agent never probed");
    let asked = Instant::now();
    shutdown.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .expect("the stop waited for the probe's 20 s timeout")
        .unwrap()
        .unwrap();
    println!("stopped in {:.1?}: {summary:?}", asked.elapsed());
    summary
}

/// The probe would answer after the 500 ms drain deadline (at 2 s). Before: the run waited
/// for it and its result vanished (started 1, results 0, undelivered 0, nothing aborted).
#[tokio::test(flavor = "current_thread")]
async fn a_probe_that_would_end_after_the_deadline_is_counted() {
    let summary = stop_during_a_probe(Some(Duration::from_secs(2))).await;
    assert_eq!(summary.probes_started, 1, "{summary:?}");
    // Every probe started is accounted for: a numbered result (delivered or not) or aborted.
    assert_eq!(
        summary.probes_started,
        summary.uplink.results + summary.probes_aborted,
        "a probe vanished: {summary:?}"
    );
    assert_eq!(summary.probes_aborted, 1, "{summary:?}");
    assert_eq!(summary.uplink.undelivered, summary.uplink.results);
}

/// The probe would run to its 20 s timeout: the stop takes the drain deadline, not that.
#[tokio::test(flavor = "current_thread")]
async fn the_stop_does_not_wait_for_a_probe_timeout() {
    let summary = stop_during_a_probe(None).await;
    assert_eq!(
        (summary.probes_started, summary.probes_aborted),
        (1, 1),
        "{summary:?}"
    );
}

/// The packaged unit gives a stop more time than the longest one the config allows (the drain
/// deadline, at most `MAX_DRAIN_TIMEOUT`, plus up to a second for the goodbye to the broker),
/// so systemd never kills an agent before it has counted what it leaves behind.
#[test]
fn the_systemd_unit_waits_longer_than_the_longest_stop() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../cross/deb/vantage-agent.service"
    ))
    .unwrap();
    let value = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("TimeoutStopSec="))
        .expect("the unit sets TimeoutStopSec");
    let stop = humantime::parse_duration(value).unwrap();
    let longest = vantage_agent::config::MAX_DRAIN_TIMEOUT + Duration::from_secs(10);
    assert!(stop >= longest, "TimeoutStopSec={value} < {longest:?}");
}
