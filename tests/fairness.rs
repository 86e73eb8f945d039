//! A thousand broken targets do not starve a healthy one (issue #13 item 12), end to end: the
//! real `vantage-agent` binary with its default `[probes]` settings, publishing to the test
//! Mosquitto (`tests/services/up`), against local servers.
//!
//! Before the fix, the same setup (1,000 targets on a port that accepts and never answers,
//! timeout 5 s, interval 10 s, plus one healthy target every 1 s) gave the healthy target 12
//! results in 95 s, and the agent logged about 8,000 "no free probe slot" warnings.
//!
//! Build the binaries first (`cargo build --bins`, as `make test` does).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use vantage_tests::harness::{discard_mqtt_sessions, write_file, Run};
use vantage_tests::stage::workspace_bin;

const BROKEN: u32 = 1000;
const HEALTHY_ID: u32 = 5000;
/// Broken targets' first round is spread over their 10 s interval; measure after it.
const WARMUP: Duration = Duration::from_secs(12);
const MEASURE: Duration = Duration::from_secs(60);

/// Accepts every connection and never answers; drops it when the client gives up.
async fn black_hole() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut sink = [0u8; 1024];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// Answers every request at once with 200, on a thread of its own (so the test's runtime
/// cannot delay it); records when each request arrived.
fn healthy_server() -> (std::net::SocketAddr, Arc<Mutex<Vec<Instant>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            vantage_tests::cli::read_request_head(&mut s);
            log.lock().unwrap().push(Instant::now());
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    (addr, seen)
}

/// (started_at_ms, outcome) of every result of `target` the agent published.
type Published = Arc<Mutex<BTreeMap<u32, Vec<(u64, vantage_proto::Outcome)>>>>;

/// Collects every result published under `prefix`, decoded.
async fn subscribe_results(run: &Run, client_id: &str) -> Published {
    let s = &run.services;
    let mut options = rumqttc::MqttOptions::new(client_id, s.mqtt_host.clone(), s.mqtt_port);
    options.set_credentials("ingester", "ingester-secret");
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 16);
    client
        .subscribe(
            format!("{}/v1/results/#", run.prefix()),
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let published: Published = Default::default();
    let sink = published.clone();
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    tokio::spawn(async move {
        let _keep = client;
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let batch = vantage_proto::decode(&p.payload).expect("agent frame decodes");
                    let mut map = sink.lock().unwrap();
                    for r in &batch.results {
                        map.entry(r.target_id)
                            .or_default()
                            .push((r.started_at_ms, r.outcome));
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), subscribed_rx)
        .await
        .expect("SUBACK within 30 s")
        .unwrap();
    published
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_broken_targets_do_not_starve_a_healthy_one() {
    let run = Run::new("fairness");
    let hole = black_hole().await;
    let (healthy, arrivals) = healthy_server();
    let pw = run.dir.join("agent.pw");
    write_file(&pw, "agent-secret");
    let agent_id = format!("fair-{}", run.id);
    // Default [probes]: whatever the agent sizes by itself is what is under test.
    let mut config = format!(
        "agent_id = \"{agent_id}\"\nregion = \"eu-north\"\nstate_dir = \"{dir}\"\n\
         [mqtt]\nhost = \"{host}\"\nport = {port}\nusername = \"agent\"\npassword_file = \"{pw}\"\n\
         topic_prefix = \"{prefix}\"\n\
         [[targets]]\nid = {HEALTHY_ID}\nurl = \"http://{healthy}/health\"\ninterval = \"1s\"\ntimeout = \"1s\"\n",
        dir = run.dir.display(),
        host = run.services.mqtt_host,
        port = run.services.mqtt_port,
        pw = pw.display(),
        prefix = run.prefix(),
    );
    for id in 1..=BROKEN {
        config.push_str(&format!(
            "[[targets]]\nid = {id}\nurl = \"http://{hole}/t{id}\"\ninterval = \"10s\"\ntimeout = \"5s\"\n"
        ));
    }
    let config_path = run.dir.join("agent.toml");
    write_file(&config_path, &config);
    let subscriber = format!("fair-sub-{}", run.id);
    let published = subscribe_results(&run, &subscriber).await;

    let log_path = run.dir.join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut agent = Command::new(workspace_bin("vantage-agent"))
        .args(["run", "--config"])
        .arg(&config_path)
        // The default filter: what an operator's journal would get.
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start vantage-agent (cargo build --bins first)");
    let started = Instant::now();
    tokio::time::sleep(WARMUP).await;
    let lines_at_warmup = std::fs::read_to_string(&log_path).unwrap().lines().count();
    let window_start = Instant::now();
    tokio::time::sleep(MEASURE).await;
    let window_end = Instant::now();
    let log_text = std::fs::read_to_string(&log_path).unwrap();
    let lines_in_window = log_text.lines().count() - lines_at_warmup;
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let status = agent.wait().unwrap();

    let times: Vec<Instant> = arrivals
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|t| *t >= window_start && *t <= window_end)
        .collect();
    let gaps: Vec<f64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    let mean = (times[times.len() - 1] - times[0]).as_secs_f64() / (times.len() - 1) as f64;
    let worst = gaps.iter().copied().fold(0.0, f64::max);
    let broken_results: usize = published
        .lock()
        .unwrap()
        .iter()
        .filter(|(id, _)| **id != HEALTHY_ID)
        // Probed, that is: the periods they missed (no free slot) are results too, not probes.
        .map(|(_, v)| {
            v.iter()
                .filter(|(_, o)| *o != vantage_proto::Outcome::Missed)
                .count()
        })
        .sum();
    let healthy_results = published
        .lock()
        .unwrap()
        .get(&HEALTHY_ID)
        .cloned()
        .unwrap_or_default();
    let summary = format!(
        "healthy: {} requests in {:.1?} (mean period {mean:.4} s, longest gap {worst:.3} s); \
         {} healthy and {broken_results} broken results published; {lines_in_window} log \
         lines in the window; agent ran {:.1?}, exit {status:?}",
        times.len(),
        window_end - window_start,
        healthy_results.len(),
        started.elapsed(),
    );
    println!("{summary}");
    let tail: Vec<&str> = log_text.lines().rev().take(20).collect();
    assert!(
        (mean - 1.0).abs() <= 0.02,
        "healthy period off by more than 2 %: {summary}\n{tail:#?}"
    );
    assert!(
        worst < 1.5,
        "a healthy probe was skipped: {summary}\n{tail:#?}"
    );
    // At most a few lines per minute, whatever the broken targets do.
    assert!(
        lines_in_window <= 4,
        "too many log lines: {summary}\n{tail:#?}"
    );
    // The broken targets were probed too (their timeouts are results), and the healthy
    // target's results say `up`.
    assert!(
        broken_results as u64 >= u64::from(BROKEN) * 5,
        "broken targets were not probed on schedule: {summary}"
    );
    assert!(
        healthy_results
            .iter()
            .all(|(_, o)| *o == vantage_proto::Outcome::Up),
        "{healthy_results:?}"
    );
    assert_eq!(status.code(), Some(0), "{summary}");

    discard_mqtt_sessions(
        &run.services,
        &[format!("vantage-agent-{agent_id}"), subscriber],
    )
    .await;
    let _ = std::fs::remove_dir_all(&run.dir);
}
