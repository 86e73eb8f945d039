//! Clock health (issue #18 item 3), end to end: two real `vantage-agent` processes probe the
//! same local target, one under libfaketime two hours ahead (`FAKETIME="+2h"`), one on the
//! machine's clock. Their rows carry the clock state the kernel reported (`clock_error_ms`,
//! `clock_unsynced`: whatever this machine's kernel says, read here the same way), and the
//! fleet shows each agent's offset from the bridge's clock: about +7,200,000 ms and flagged
//! `offset` for the first, a few ms for the second. The sink's `max_clock_ahead` is 3 h here so
//! that the fast clock's rows are stored rather than dead-lettered as `clock_skew`. A second
//! test publishes frames with chosen clock states: the skew guard stores a synchronised
//! agent's two-hour-old backlog and dead-letters the same from agents it cannot trust.
//!
//! Needs libfaketime (Debian `faketime`, installed by `tests/services/up`) and the binaries
//! (`cargo build --bins`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vantage_tests::agent_toml::{agent_head, target_entry};
use vantage_tests::harness::{write_file, IngesterOptions, Run};
use vantage_tests::in_process::{start_sink_and_bridge, wait_for};
use vantage_tests::stage::agent_command;
use vantage_tests::target::TargetServer;

const TARGET: u32 = 1;
const AHEAD_MS: i64 = 2 * 3_600_000;

/// libfaketime's library, where Debian puts it on any architecture.
fn libfaketime() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .chain([PathBuf::from("/usr/lib/faketime/libfaketime.so.1")])
        .find(|p| p.is_file());
    found.expect("libfaketime.so.1 not found: run tests/services/up (installs Debian's faketime)")
}

/// One agent's rows: (clock_error_ms, clock_unsynced, started_at − ingested_at in ms); none
/// while the sink has not migrated the run's schema yet.
async fn rows(
    client: &tokio_postgres::Client,
    agent: &str,
) -> Vec<(Option<i32>, Option<bool>, i64)> {
    client
        .query(
            "SELECT clock_error_ms, clock_unsynced,
                    (extract(epoch FROM started_at - ingested_at) * 1000)::bigint
               FROM results WHERE agent = $1 ORDER BY seq",
            &[&agent],
        )
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The fleet's clock columns of `agent`: (synced, error ms, boot age s, offset ms, flag).
type FleetClock = (bool, i32, i64, i64, Option<String>);

async fn fleet_clock(client: &tokio_postgres::Client, agent: &str) -> Option<FleetClock> {
    let row = client
        .query_opt(
            "SELECT clock_synced, clock_error_ms, clock_boot_age_s, clock_offset_ms, clock_flag
               FROM fleet WHERE agent = $1 AND clock_at IS NOT NULL",
            &[&agent],
        )
        .await
        .ok()??;
    Some((row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_two_hours_ahead_is_flagged_and_its_rows_carry_its_clock() {
    let faketime = libfaketime();
    let run = Run::new("clock");
    let target = TargetServer::start("127.0.0.1:0").await.unwrap();
    let options = IngesterOptions {
        sink_extra: "max_clock_ahead = \"3h\"".into(),
        ..IngesterOptions::default()
    };
    let ingester = Arc::new(run.ingester_config(&options));
    let stop = CancellationToken::new();
    let stages = start_sink_and_bridge(&ingester, &stop).await;

    let fast = format!("clock-fast-{}", run.id);
    let normal = format!("clock-normal-{}", run.id);
    let mut agents = Vec::new();
    for agent_id in [&fast, &normal] {
        let config = agent_head(&run, agent_id, "eu-north")
            + "[uplink]\nbatch_max = 1\n"
            + &target_entry(TARGET, &target.url("/ok"), "1s", "500ms", "");
        let config_path = run.dir.join(format!("{agent_id}.toml"));
        write_file(&config_path, &config);
        let log = run.dir.join(format!("{agent_id}.log"));
        let mut command = agent_command(&config_path, &log);
        if agent_id == &fast {
            command
                .env("LD_PRELOAD", &faketime)
                .env("FAKETIME", "+2h")
                // Only the wall clock: tokio's timers keep the real monotonic clock.
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let child = command
            .spawn()
            .expect("start vantage-agent (cargo build --bins first)");
        agents.push((child, log));
    }

    let client = run.pg().await;
    for agent in [&fast, &normal] {
        wait_for(
            &format!("{agent}: 3 rows and a clock state in the fleet"),
            Duration::from_secs(60),
            || async {
                let n = rows(&client, agent).await.len();
                (n >= 3 && fleet_clock(&client, agent).await.is_some()).then_some(())
            },
        )
        .await;
    }
    // The kernel's state, read the way the agents read it (this machine's clock may well be
    // unsynchronised: then every row is marked, with 16 s of maximum error).
    let kernel = vantage_agent::clock_state::read().expect("Linux has adjtimex");
    println!("kernel clock: {kernel:?}");

    for agent in [&fast, &normal] {
        let rows = rows(&client, agent).await;
        let (synced, error_ms, boot_age_s, offset_ms, flag) =
            fleet_clock(&client, agent).await.unwrap();
        println!(
            "{agent}: {} rows, first {:?}; fleet: synced {synced}, error {error_ms} ms, boot age {boot_age_s} s, offset {offset_ms} ms, flag {flag:?}",
            rows.len(),
            rows[0]
        );
        for (error, unsynced, _) in &rows {
            let error = error.expect("every row carries the clock's maximum error");
            assert!(error > 0, "{agent}: a maximum error of {error} ms");
            if !kernel.synced {
                assert_eq!(error, 16_000, "{agent}: an unsynchronised kernel says 16 s");
            }
            // Synchronised when the agent started: every result after its first sync.
            assert_eq!(
                *unsynced,
                Some(!kernel.synced),
                "{agent}: clock_unsynced follows the kernel's state"
            );
        }
        assert_eq!(synced, kernel.synced);
        assert!(boot_age_s > 0);
    }

    // The fast agent: its rows are dated two hours after they were stored, the fleet sees
    // its clock two hours ahead of the bridge's and flags it.
    let fast_rows = rows(&client, &fast).await;
    for (_, _, ahead) in &fast_rows {
        assert!(
            (AHEAD_MS - 60_000..AHEAD_MS + 60_000).contains(ahead),
            "a row of the fast agent dated {ahead} ms after it was stored"
        );
    }
    let (_, _, _, offset, flag) = fleet_clock(&client, &fast).await.unwrap();
    assert!(
        (AHEAD_MS - 5_000..=AHEAD_MS + 1_000).contains(&offset),
        "fast agent's offset {offset} ms, about {AHEAD_MS}"
    );
    assert_eq!(flag.as_deref(), Some("offset"));
    // The normal agent: a few ms off the bridge (the frame's transit), flagged only if the
    // kernel says its clock is not synchronised.
    let (_, _, _, offset, flag) = fleet_clock(&client, &normal).await.unwrap();
    assert!(
        offset.abs() < 1_000,
        "normal agent's offset {offset} ms, a few ms expected"
    );
    assert_eq!(
        flag.as_deref(),
        (!kernel.synced).then_some("unsynced"),
        "normal agent's flag"
    );
    // `vantage-ingester agents` shows it in its CLOCK column.
    let lines = vantage_ingester::fleet::list(&client, Duration::from_secs(90))
        .await
        .unwrap();
    let table = vantage_ingester::fleet::render(&lines);
    println!("{table}");
    let line_of = |agent: &str| vantage_tests::line_starting(&table, agent);
    assert!(line_of(&fast).contains("OFFSET +7"), "{table}");
    assert!(!line_of(&normal).contains("OFFSET"), "{table}");

    for (mut child, log) in agents {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(!text.contains("panicked"), "{text}");
    }
    stages.stop(&stop).await;
    run.cleanup(&[
        run.bridge_client_id(&options.client),
        format!("vantage-agent-{fast}"),
        format!("vantage-agent-{normal}"),
    ])
    .await;
}

/// The clock-skew guard uses the clock state (ingester/src/clock.rs): results two hours old
/// (older than `sink.max_clock_behind`, 1 h) are a spool's backlog from a synchronised agent
/// with a small error whose seal time agrees with the bridge, and are stored; the same
/// results from an agent that says nothing of its clock, from one whose maximum error is 5 s,
/// and those taken before an agent's first sync are dead-lettered as `clock_skew`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronised_agents_backlog_is_stored_others_are_dead_lettered() {
    use vantage_proto::{Batch, ClockHealth};

    let run = Run::new("clock-trust");
    let options = IngesterOptions::default();
    let ingester = Arc::new(run.ingester_config(&options));
    let stop = CancellationToken::new();
    let stages = start_sink_and_bridge(&ingester, &stop).await;

    let now = vantage_tests::now_ms();
    let synced = ClockHealth {
        synced: true,
        max_error_ms: 20,
        est_error_ms: 2,
        synced_from_seq: Some(0),
        boot_age_s: 86_400,
        sealed_at_ms: now,
    };
    let agents: [(&str, Option<ClockHealth>, usize); 4] = [
        ("trusted", Some(synced), 4),
        (
            "presync",
            Some(ClockHealth {
                synced_from_seq: Some(2),
                ..synced
            }),
            2,
        ),
        ("unknown", None, 0),
        (
            "loose",
            Some(ClockHealth {
                max_error_ms: 5_000,
                ..synced
            }),
            0,
        ),
    ];
    let mut synth = vantage_tests::loadgen::Synth::new(7);
    let messages: Vec<(String, Vec<u8>)> = agents
        .iter()
        .map(|(name, clock, _)| {
            let mut batch = Batch {
                boot_id: 7,
                results: heapless::Vec::new(),
                gaps: heapless::Vec::new(),
                clock: *clock,
            };
            for seq in 0..4 {
                let mut r = synth.result();
                r.seq = seq;
                r.started_at_ms = now - 2 * 3_600_000 + seq * 1000;
                batch.results.push(r).unwrap();
            }
            let mut buf = [0u8; vantage_proto::MAX_FRAME_LEN];
            let frame = vantage_proto::encode(&batch, &mut buf).unwrap().to_vec();
            let topic = format!("{}/v1/results/eu-north/{name}-{}", run.prefix(), run.id);
            (topic, frame)
        })
        .collect();
    vantage_tests::harness::publish_as_agent(
        &run.services,
        &format!("trust-{}", run.id),
        &messages,
    )
    .await;

    // 4 + 2 stored; 2 + 4 + 4 dead-lettered.
    assert_eq!(run.wait_rows(6, Duration::from_secs(60)).await, 6);
    let mut refused = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while refused < 10 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        refused = run
            .read_topic(&run.dead_letter_topic())
            .iter()
            .filter(|d| d.header("vantage-reason") == Some("clock_skew"))
            .map(|d| vantage_proto::decode(&d.payload).unwrap().results.len())
            .sum::<usize>();
    }
    assert_eq!(refused, 10, "dead-lettered as clock_skew");
    let client = run.pg().await;
    for (name, clock, stored) in agents {
        let agent = format!("{name}-{}", run.id);
        let rows = client
            .query(
                "SELECT seq, clock_error_ms, clock_unsynced FROM results WHERE agent = $1 ORDER BY seq",
                &[&agent],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), stored, "{agent}");
        for r in &rows {
            assert_eq!(r.get::<_, Option<i32>>(1), Some(20), "{agent}");
            assert_eq!(r.get::<_, Option<bool>>(2), Some(false), "{agent}");
        }
        if name == "presync" {
            let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            assert_eq!(seqs, [2, 3], "the results after the first sync");
        }
        // Every agent with a clock state has it in the fleet, flagged or not.
        let fleet = fleet_clock(&client, &agent).await;
        assert_eq!(fleet.is_some(), clock.is_some(), "{agent}");
        if let Some((synced, error_ms, _, offset_ms, flag)) = fleet {
            assert!(synced, "{agent}");
            assert_eq!(flag, None, "{agent}: a synchronised clock within 10 s");
            assert!(offset_ms.abs() < 5_000, "{agent}: offset {offset_ms} ms");
            assert!(error_ms == 20 || error_ms == 5_000, "{agent}");
        }
    }
    stages.stop(&stop).await;
    run.cleanup(&[
        run.bridge_client_id(&options.client),
        format!("trust-{}", run.id),
    ])
    .await;
}
