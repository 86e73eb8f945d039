//! Operability on the real services (`tests/services/up`): the ingester stages run as processes
//! (`cargo build --bins` first), their `/metrics` is scraped during an end-to-end run, and the
//! counters must move by exactly what was sent; `/healthz`, `/readyz` and `status` answer.

use std::net::SocketAddr;
use std::time::Duration;

use vantage_ingester::metrics::sample;
use vantage_tests::agent_toml::{agent_head, load_agent_config, target_entry};
use vantage_tests::harness::{publish_as_agent, result_frames, IngesterOptions, Run};
use vantage_tests::stage::{self, http_get};

/// The value of one sample, 0 when absent (a labelled counter appears on first use).
async fn value(addr: SocketAddr, name: &str) -> f64 {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    sample(&body, name).unwrap_or(0.0)
}

/// Polls until `cond` holds on a fresh scrape, or `timeout`; returns the last scrape.
async fn wait_metrics(addr: SocketAddr, timeout: Duration, cond: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (_, body) = http_get(addr, "/metrics").await;
        if cond(&body) || tokio::time::Instant::now() >= deadline {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each `(sample, value)` of `want` has that value in the OpenMetrics `text`.
#[track_caller]
fn assert_samples(text: &str, want: &[(&str, f64)]) {
    for &(name, value) in want {
        assert_eq!(sample(text, name), Some(value), "{name}\n{text}");
    }
}

async fn publish(run: &Run, agent: &str, messages: &[(String, Vec<u8>)]) {
    publish_as_agent(
        &run.services,
        &format!("{}-{agent}", run.prefix()),
        messages,
    )
    .await;
}

/// Issue #9 "Must show": scrape `/metrics` of both stages during an end-to-end run; every
/// counter moves by exactly what was sent (10 frames of 3 results, 2 bad frames, then the same
/// 10 frames again, which the sink must count as duplicates, not as rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_metrics_move_by_what_flows_through() {
    let run = Run::new("metrics");
    let file = run.ingester_file(&IngesterOptions::default());
    let (mut sink, mut bridge) = vantage_tests::stage::sink_and_bridge(&file, &run.dir).await;
    let (b, s) = (bridge.http_addr().await, sink.http_addr().await);

    // Alive at once; ready once connected to what each stage needs.
    assert_eq!(http_get(b, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(http_get(s, "/healthz").await.0, 200);
    assert_eq!(http_get(b, "/nope").await.0, 404);
    for (addr, checks) in [
        (b, &["mqtt: ok", "kafka: ok"][..]),
        (s, &["kafka: ok", "postgres: ok"]),
    ] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut last = http_get(addr, "/readyz").await;
        while last.0 != 200 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            last = http_get(addr, "/readyz").await;
        }
        assert_eq!(last.0, 200, "{addr} not ready: {}", last.1);
        for c in checks {
            assert!(last.1.contains(c), "{}", last.1);
        }
    }

    // A fresh process starts at zero.
    let (_, text) = http_get(b, "/metrics").await;
    assert_eq!(
        sample(&text, "vantage_bridge_messages_received_total"),
        Some(0.0)
    );
    assert_eq!(sample(&text, "vantage_bridge_mqtt_connected"), Some(1.0));
    assert!(sample(&text, "vantage_bridge_mqtt_connections_total") >= Some(1.0));
    assert_eq!(value(s, "vantage_sink_results_written_total").await, 0.0);
    assert_eq!(
        value(s, "vantage_sink_last_durable_batch_timestamp_seconds").await,
        0.0
    );
    // Each stage exports its own metrics only.
    assert_eq!(sample(&text, "vantage_sink_results_written_total"), None);

    let topic = format!("{}/v1/results/eu-north/pi-m", run.prefix());
    let good = result_frames(0x9e7a, 10, 3);
    let mut messages: Vec<(String, Vec<u8>)> =
        good.iter().map(|f| (topic.clone(), f.clone())).collect();
    messages.push((topic.clone(), vec![7])); // unknown_version
    messages.push((topic.clone(), vec![1, 1])); // malformed
    publish(&run, "pi-m", &messages).await;

    let text = wait_metrics(s, Duration::from_secs(60), |t| {
        sample(t, "vantage_sink_results_written_total") >= Some(30.0)
    })
    .await;
    assert_samples(
        &text,
        &[
            ("vantage_sink_results_written_total", 30.0),
            ("vantage_sink_messages_consumed_total", 10.0),
        ],
    );
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let durable_at = sample(&text, "vantage_sink_last_durable_batch_timestamp_seconds").unwrap();
    assert!(
        durable_at > unix_now - 3600.0 && durable_at <= unix_now + 1.0,
        "last durable batch at {durable_at}, now {unix_now}"
    );
    assert_samples(
        &text,
        &[
            ("vantage_sink_results_duplicate_total", 0.0),
            ("vantage_sink_batch_results_sum", 30.0),
        ],
    );
    let batches = sample(&text, "vantage_sink_batch_results_count").unwrap();
    assert!((1.0..=10.0).contains(&batches), "{batches}");
    assert_eq!(
        sample(&text, "vantage_sink_write_duration_seconds_count"),
        Some(batches)
    );
    assert_eq!(run.count_rows().await, 30);

    let text = wait_metrics(b, Duration::from_secs(30), |t| {
        sample(t, "vantage_bridge_messages_acked_total") >= Some(12.0)
    })
    .await;
    assert_samples(
        &text,
        &[
            ("vantage_bridge_messages_received_total", 12.0),
            ("vantage_bridge_messages_produced_total", 10.0),
            ("vantage_bridge_results_produced_total", 30.0),
            ("vantage_bridge_messages_acked_total", 12.0),
            ("vantage_bridge_kafka_delivery_seconds_count", 10.0),
            (
                "vantage_bridge_dead_letters_total{reason=\"unknown_version\"}",
                1.0,
            ),
            (
                "vantage_bridge_dead_letters_total{reason=\"malformed\"}",
                1.0,
            ),
            ("vantage_bridge_messages_skipped_total", 0.0),
        ],
    );

    // The same frames again: the bridge produces them again, the sink stores nothing new.
    publish(&run, "pi-m", &messages[..10]).await;
    let text = wait_metrics(s, Duration::from_secs(60), |t| {
        sample(t, "vantage_sink_results_duplicate_total") >= Some(30.0)
    })
    .await;
    assert_samples(
        &text,
        &[
            ("vantage_sink_results_duplicate_total", 30.0),
            ("vantage_sink_results_written_total", 30.0),
            ("vantage_sink_messages_consumed_total", 20.0),
        ],
    );
    assert_eq!(
        value(b, "vantage_bridge_results_produced_total").await,
        60.0
    );
    assert_eq!(run.count_rows().await, 30);

    // Lag per partition (librdkafka statistics, every 5 s): once the offsets are committed,
    // every assigned partition that has a committed offset shows 0.
    let text = wait_metrics(s, Duration::from_secs(60), |t| {
        let lags: Vec<f64> = t
            .lines()
            .filter(|l| l.starts_with("vantage_sink_consumer_lag{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        !lags.is_empty() && lags.iter().all(|&v| v == 0.0)
    })
    .await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("vantage_sink_consumer_lag{") && l.ends_with(" 0")),
        "{text}"
    );

    // `status` sees the same: schema up to date, partitions, no lag.
    let stdout = status(&file);
    assert!(stdout.contains("(up to date)"), "{stdout}");
    assert!(stdout.contains("results partitions: "), "{stdout}");
    assert!(stdout.contains("lag 0"), "{stdout}");

    // And a lag that is not 0: with the sink stopped, 5 more frames reach Kafka and nobody
    // consumes them.
    assert_eq!(
        sink.terminate(Duration::from_secs(30)),
        Some(0),
        "{}",
        sink.log_text()
    );
    let produced = value(b, "vantage_bridge_messages_produced_total").await;
    let more: Vec<(String, Vec<u8>)> = result_frames(0x5eed, 5, 3)
        .into_iter()
        .map(|f| (topic.clone(), f))
        .collect();
    publish(&run, "pi-m", &more).await;
    wait_metrics(b, Duration::from_secs(60), |t| {
        sample(t, "vantage_bridge_messages_produced_total") >= Some(produced + 5.0)
    })
    .await;
    let stdout = status(&file);
    assert!(stdout.contains("lag 5"), "{stdout}");

    assert_eq!(
        bridge.terminate(Duration::from_secs(30)),
        Some(0),
        "{}",
        bridge.log_text()
    );
    run.cleanup(&[run.bridge_client_id("a"), format!("{}-pi-m", run.prefix())])
        .await;
}

/// `vantage-ingester status --config FILE`, which must succeed; its output.
fn status(file: &std::path::Path) -> String {
    stage::ingester_stdout(file, &["status"], &[], 0)
}

/// `status` exits 3 and names the service when one cannot be reached.
#[tokio::test]
async fn status_reports_unreachable_services() {
    let run = Run::new("status");
    let file = run.ingester_file(&IngesterOptions {
        brokers: Some("127.0.0.1:1".into()),
        ..IngesterOptions::default()
    });
    let text = std::fs::read_to_string(&file).unwrap();
    let pg = text
        .lines()
        .find(|l| l.starts_with("url = "))
        .unwrap()
        .to_owned();
    std::fs::write(
        &file,
        text.replace(&pg, "url = \"host=127.0.0.1 port=1 user=x dbname=x\""),
    )
    .unwrap();
    let stdout = stage::ingester_stdout(&file, &["status"], &[], 3);
    assert!(stdout.contains("postgres: UNREACHABLE"), "{stdout}");
    assert!(stdout.contains("kafka: UNREACHABLE"), "{stdout}");
    let _ = std::fs::remove_dir_all(&run.dir);
}

/// The agent's optional endpoint (`[metrics] listen`, in-process here): probes by outcome and
/// the uplink's counters move by exactly what the run did, as its own summary reports; with a
/// bridge sending end-to-end acknowledgements, their counters and latency too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_metrics_match_the_run() {
    let started =
        vantage_tests::in_process::start("agentmetrics", &IngesterOptions::default()).await;
    let (run, target) = (&started.run, &started.target);
    let mut text = agent_head(run, &format!("metrics-{}", run.id), "eu-north");
    text.push_str(
        "[uplink]\nflush_interval = \"100ms\"\nbuffer_capacity = 500\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    text.push_str(&target_entry(1, &target.url("/"), "200ms", "200ms", ""));
    let missing = target.url("/missing?status=404");
    text.push_str(&target_entry(2, &missing, "200ms", "200ms", ""));
    let config = load_agent_config(run, "agent.toml", &text);
    let listen = config.metrics_listen.expect("[metrics] listen");
    let http_stop = tokio_util::sync::CancellationToken::new();
    let addr = vantage_agent::metrics::serve(listen, http_stop.clone())
        .await
        .unwrap();
    assert_eq!(http_get(addr, "/healthz").await.0, 200);

    let shutdown = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(vantage_agent::run(
        config,
        vantage_agent::RunOptions::default(),
        shutdown.clone(),
    ));
    // Moving while it runs.
    let text = wait_metrics(addr, Duration::from_secs(60), |t| {
        sample(
            t,
            "vantage_agent_probes_total{outcome=\"status_not_accepted\"}",
        ) >= Some(3.0)
            && sample(t, "vantage_agent_frames_acked_total") >= Some(2.0)
            && sample(t, "vantage_agent_frames_e2e_acked_total") >= Some(2.0)
    })
    .await;
    assert!(
        sample(&text, "vantage_agent_probes_total{outcome=\"up\"}") >= Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "vantage_agent_mqtt_connected"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "vantage_agent_buffer_capacity_results"),
        Some(500.0)
    );
    // The spool (on by default, issue #18): written once per flush, in one segment so far.
    assert_eq!(
        sample(&text, "vantage_agent_spool_max_bytes"),
        Some(64.0 * 1024.0 * 1024.0),
        "{text}"
    );
    assert_eq!(sample(&text, "vantage_agent_spool_segments"), Some(1.0));
    assert!(sample(&text, "vantage_agent_spool_writes_total") >= Some(2.0));
    assert!(sample(&text, "vantage_agent_spool_written_bytes_total") > Some(100.0));
    assert!(sample(&text, "vantage_agent_spool_bytes").is_some());
    assert!(sample(&text, "vantage_agent_spool_disk_bytes") > Some(8.0));
    let age = sample(&text, "vantage_agent_spool_oldest_unacked_age_seconds");
    assert!(age.is_some_and(|a| (0.0..60.0).contains(&a)), "{age:?}");
    assert_eq!(
        sample(&text, "vantage_agent_spool_replayed_total"),
        Some(0.0)
    );
    assert_eq!(sample(&text, "vantage_agent_spool_lost_total"), Some(0.0));

    shutdown.cancel();
    let summary = agent.await.unwrap().unwrap();
    let text = http_get(addr, "/metrics").await.1;
    let probes: f64 = ["up", "status_not_accepted", "timeout"]
        .iter()
        .filter_map(|o| {
            sample(
                &text,
                &format!("vantage_agent_probes_total{{outcome=\"{o}\"}}"),
            )
        })
        .sum();
    assert_eq!(probes, summary.probes_started as f64, "{text}\n{summary:?}");
    assert_eq!(
        sample(&text, "vantage_agent_probe_duration_seconds_count"),
        Some(summary.probes_started as f64)
    );
    let u = &summary.uplink;
    for (name, want) in [
        ("vantage_agent_results_total", u.results),
        ("vantage_agent_results_dropped_total", u.dropped),
        ("vantage_agent_frames_acked_total", u.frames_acked),
        ("vantage_agent_frames_published_total", u.frames_published),
        ("vantage_agent_probes_skipped_total", summary.probes_skipped),
    ] {
        assert_eq!(
            sample(&text, name),
            Some(want as f64),
            "{name}\n{text}\n{summary:?}"
        );
    }
    assert_eq!(
        u.results,
        summary.probes_started + summary.probes_refused + summary.missed_reported
    );
    assert_eq!(
        sample(&text, "vantage_agent_buffer_results"),
        Some(0.0),
        "{text}"
    );
    // End-to-end acknowledgements: every frame freed by one, none re-sent, the latency
    // histogram holds one observation per acknowledged frame, no PUBACK fallback.
    assert!(u.frames_e2e_acked >= 2, "{u:?}");
    assert_eq!(u.frames_e2e_acked, u.frames_acked, "{u:?}");
    for (name, want) in [
        ("vantage_agent_frames_e2e_acked_total", u.frames_e2e_acked),
        (
            "vantage_agent_e2e_ack_latency_seconds_count",
            u.frames_e2e_acked,
        ),
        ("vantage_agent_frames_resent_total", u.resends),
        ("vantage_agent_frames_unacked", 0),
        ("vantage_agent_puback_fallback", 0),
    ] {
        assert_eq!(
            sample(&text, name),
            Some(want as f64),
            "{name}\n{text}\n{summary:?}"
        );
    }
    let latency = sample(&text, "vantage_agent_e2e_ack_latency_seconds_sum");
    assert!(
        latency.is_some_and(|s| s > 0.0 && s < 60.0 * u.frames_e2e_acked as f64),
        "{latency:?}"
    );
    http_stop.cancel();
    started.stages.stop(&started.stop).await;
    run.cleanup(&[format!("vantage-agent-metrics-{}", run.id)])
        .await;
}
