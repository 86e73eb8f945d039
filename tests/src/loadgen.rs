//! Simulated agents: many cheap agents in one process, each running the agent's real uplink
//! ([`vantage_agent::uplink::run`]: numbering, bounded buffer, gap records, persistent MQTT
//! session, frames kept until PUBACK) fed with synthetic but realistic results at a chosen rate.
//! Used by the delivery tests, the `loadgen` binary and the ingest benchmark.
//!
//! Agents run on current-thread runtimes, as the real agent does (`vantage-agent` starts one).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vantage_agent::config::{MqttConfig, UplinkConfig};
use vantage_agent::UplinkStats;
use vantage_proto::{IpAddress, Outcome, Phase, ProbeResult, RegexOutcome};

/// Regions the simulated agents are spread over, in turn.
pub const REGIONS: [&str; 4] = ["eu-north", "us-east", "ap-south", "sa-east"];

/// What to simulate.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Number of agents; agent `i` is `<agent_prefix>-<i>` in region `REGIONS[i % 4]`.
    pub agents: usize,
    pub agent_prefix: String,
    /// Results per second over all agents (spread evenly).
    pub rate: f64,
    /// Results each agent produces before it stops and drains.
    pub results_per_agent: u64,
    pub mqtt_host: String,
    pub mqtt_port: u16,
    pub mqtt_username: Option<String>,
    pub mqtt_password: Option<String>,
    pub topic_prefix: String,
    pub batch_max: usize,
    pub flush_interval: Duration,
    pub buffer_capacity: usize,
    pub drain_timeout: Duration,
    /// OS threads (each a current-thread runtime) the agents are spread over.
    pub threads: usize,
    /// `uplink.spool_max_bytes` of each agent (default 0: no spool, memory only, as the ingest
    /// benchmark has always measured).
    pub spool_max_bytes: u64,
    /// `uplink.spool_fsync`.
    pub spool_fsync: vantage_agent::spool::FsyncPolicy,
    /// The agents' `state_dir` (their spools are `state_dir/spool/<agent_id>`).
    pub state_dir: std::path::PathBuf,
    /// `uplink.end_to_end_acks = "auto"` (true) or `"off"`. Default: on, unless the environment
    /// says `VANTAGE_E2E_ACKS=off` (the control run of the crash tests: without end-to-end
    /// acknowledgements a `kill -9` of Mosquitto loses what it had acknowledged).
    pub end_to_end_acks: bool,
    /// `uplink.ack_timeout` (default 5 s here, shorter than the agent's 30 s so that tests
    /// see re-sends within their time).
    pub ack_timeout: Duration,
    /// `uplink.wire_format`: version 4 unless the environment says `VANTAGE_WIRE_FORMAT=2` or 3.
    pub wire_format: vantage_agent::config::WireFormat,
}

/// The frame version the environment asks for (`VANTAGE_WIRE_FORMAT=2` or `3`, else 4).
pub fn wire_format_from_env() -> vantage_agent::config::WireFormat {
    match std::env::var("VANTAGE_WIRE_FORMAT").as_deref() {
        Ok("2") => vantage_agent::config::WireFormat::V2,
        Ok("3") => vantage_agent::config::WireFormat::V3,
        _ => vantage_agent::config::WireFormat::V4,
    }
}

/// Whether the environment turns end-to-end acknowledgements off (`VANTAGE_E2E_ACKS=off`).
pub fn e2e_acks_from_env() -> bool {
    std::env::var("VANTAGE_E2E_ACKS").map_or(true, |v| v != "off")
}

impl LoadSpec {
    /// Defaults for the local test services: agent `agent`/`agent-secret`, batches of 32, a
    /// 100,000-result buffer and a two-minute drain.
    pub fn new(services: &crate::Services, topic_prefix: &str, agent_prefix: &str) -> LoadSpec {
        LoadSpec {
            agents: 4,
            agent_prefix: agent_prefix.to_owned(),
            rate: 1000.0,
            results_per_agent: 1000,
            mqtt_host: services.mqtt_host.clone(),
            mqtt_port: services.mqtt_port,
            mqtt_username: Some("agent".into()),
            mqtt_password: Some("agent-secret".into()),
            topic_prefix: topic_prefix.to_owned(),
            batch_max: vantage_proto::MAX_RESULTS,
            flush_interval: Duration::from_millis(200),
            buffer_capacity: 100_000,
            drain_timeout: Duration::from_secs(120),
            threads: 1,
            spool_max_bytes: 0,
            spool_fsync: vantage_agent::spool::FsyncPolicy::Always,
            state_dir: std::env::temp_dir(),
            end_to_end_acks: e2e_acks_from_env(),
            ack_timeout: Duration::from_secs(5),
            wire_format: wire_format_from_env(),
        }
    }

    /// The agent id and region of agent `i`.
    pub fn agent(&self, i: usize) -> (String, &'static str) {
        (
            format!("{}-{i}", self.agent_prefix),
            REGIONS[i % REGIONS.len()],
        )
    }

    fn agent_config(&self, i: usize) -> vantage_agent::Config {
        let (agent_id, region) = self.agent(i);
        vantage_agent::Config {
            agent_id,
            region: region.to_owned(),
            mqtt: MqttConfig {
                host: self.mqtt_host.clone(),
                port: self.mqtt_port,
                username: self.mqtt_username.clone(),
                password: self.mqtt_password.clone(),
                topic_prefix: self.topic_prefix.clone(),
                keep_alive: Duration::from_secs(5),
                tls: None,
            },
            uplink: UplinkConfig {
                batch_max: self.batch_max,
                flush_interval: self.flush_interval,
                buffer_capacity: self.buffer_capacity,
                drain_timeout: self.drain_timeout,
                spool_max_bytes: self.spool_max_bytes,
                spool_fsync: self.spool_fsync,
                ack_timeout: self.ack_timeout,
                end_to_end_acks: self.end_to_end_acks,
                wire_format: self.wire_format,
            },
            max_concurrency: Some(1),
            memory_budget: vantage_agent::budget::DEFAULT_MEMORY_BUDGET,
            metrics_listen: None,
            heartbeat_interval: Duration::from_secs(30),
            state_dir: self.state_dir.clone(),
            // Synthetic results: no target sets to follow.
            targets_source: vantage_agent::TargetsSource::Local,
            address_policy: Default::default(),
            targets: Vec::new(),
        }
    }
}

/// One simulated agent's outcome.
#[derive(Debug, Clone)]
pub struct AgentReport {
    pub agent_id: String,
    pub region: String,
    /// `stats.boot_id` and `stats.results` name exactly the results produced:
    /// sequence numbers `0..results` of that boot.
    pub stats: UplinkStats,
}

/// A running load: results produced so far, and the reports at the end.
pub struct Load {
    /// Results handed to the uplinks so far, over all agents.
    pub produced: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<AgentReport>>>,
}

impl Load {
    /// Waits (blocking this thread) until every agent produced its quota and drained.
    pub fn join(self) -> Vec<AgentReport> {
        let mut reports: Vec<AgentReport> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("load generator thread panicked"))
            .collect();
        reports.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        reports
    }

    /// [`Load::join`] from async code.
    pub async fn finish(self) -> Vec<AgentReport> {
        tokio::task::spawn_blocking(move || self.join())
            .await
            .expect("join task panicked")
    }
}

/// Starts the simulated agents. `shutdown` stops production early (agents then drain).
pub fn start(spec: LoadSpec, shutdown: CancellationToken) -> Load {
    let produced = Arc::new(AtomicU64::new(0));
    let threads = spec.threads.clamp(1, spec.agents.max(1));
    let spec = Arc::new(spec);
    let handles = (0..threads)
        .map(|t| {
            let (spec, produced, shutdown) = (spec.clone(), produced.clone(), shutdown.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("cannot start a tokio runtime");
                runtime.block_on(async move {
                    let mut set = tokio::task::JoinSet::new();
                    for i in (t..spec.agents).step_by(threads) {
                        set.spawn(agent(spec.clone(), i, produced.clone(), shutdown.clone()));
                    }
                    let mut out = Vec::new();
                    while let Some(r) = set.join_next().await {
                        out.push(r.expect("simulated agent panicked"));
                    }
                    out
                })
            })
        })
        .collect();
    Load {
        produced,
        threads: handles,
    }
}

/// One agent: its real uplink, and a generator feeding it at `rate / agents` per second.
async fn agent(
    spec: Arc<LoadSpec>,
    i: usize,
    produced: Arc<AtomicU64>,
    shutdown: CancellationToken,
) -> AgentReport {
    let config = Arc::new(spec.agent_config(i));
    let boot_id = getrandom::u64().expect("no entropy");
    let (tx, rx) = mpsc::channel(1024);
    let uplink = tokio::spawn(vantage_agent::uplink::run(
        config.clone(),
        boot_id,
        rx,
        vantage_agent::uplink::Control {
            board: Default::default(),
            sets: None,
        },
        CancellationToken::new(),
    ));
    let per_agent = spec.rate / spec.agents as f64;
    let mut gen = Synth::new(boot_id ^ i as u64);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    'produce: while sent < spec.results_per_agent {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        let due = ((start.elapsed().as_secs_f64() * per_agent) as u64).min(spec.results_per_agent);
        while sent < due {
            if tx.send(gen.result()).await.is_err() {
                break 'produce;
            }
            sent += 1;
            produced.fetch_add(1, Ordering::Relaxed);
        }
    }
    drop(tx);
    let stats = uplink.await.expect("uplink task panicked");
    AgentReport {
        agent_id: config.agent_id.clone(),
        region: config.region.clone(),
        stats,
    }
}

/// Deterministic synthetic probe results with a realistic mix: 20 targets, mostly `up` over
/// HTTPS, some 404/500, timeouts and refused connections; probe finished "now".
pub struct Synth {
    rng: fastrand::Rng,
}

impl Synth {
    pub fn new(seed: u64) -> Synth {
        Synth {
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    fn rand(&mut self, n: u64) -> u64 {
        self.rng.u64(..n.max(1))
    }

    /// The next result (`seq` 0: the uplink numbers it).
    pub fn result(&mut self) -> ProbeResult {
        let target_id = 1 + self.rand(20) as u32;
        let https = target_id % 4 != 0;
        let dns = 200 + self.rand(3_000) as u32;
        let connect = 1_000 + self.rand(40_000) as u32;
        let tls = https.then(|| 5_000 + self.rand(60_000) as u32);
        let ttfb = 10_000 + self.rand(300_000) as u32;
        let transfer = 100 + self.rand(20_000) as u32;
        let kind = self.rand(100);
        let (outcome, status, failed_phase, total) = match kind {
            0..=89 => (
                Outcome::Up,
                200,
                None,
                dns + connect + tls.unwrap_or(0) + ttfb + transfer,
            ),
            90..=93 => (
                Outcome::StatusNotAccepted,
                if kind % 2 == 0 { 404 } else { 500 },
                None,
                dns + connect + tls.unwrap_or(0) + ttfb + transfer,
            ),
            94..=97 => (Outcome::Timeout, 0, Some(Phase::FirstByte), 10_000_000),
            _ => (Outcome::ConnectRefused, 0, Some(Phase::Connect), dns + 300),
        };
        let responded = status != 0;
        let now_ms = crate::now_ms();
        ProbeResult {
            seq: 0,
            target_id,
            // The probe started `total` ago and finished now.
            started_at_ms: now_ms.saturating_sub(u64::from(total) / 1000),
            status,
            outcome,
            failed_phase,
            regex: if target_id % 3 == 0 {
                RegexOutcome::Matched
            } else {
                RegexOutcome::NotConfigured
            },
            total_us: total,
            dns_us: Some(dns),
            connect_us: (outcome != Outcome::ConnectRefused).then_some(connect),
            tls_us: if outcome == Outcome::ConnectRefused {
                None
            } else {
                tls
            },
            ttfb_us: responded.then_some(ttfb),
            transfer_us: responded.then_some(transfer),
            body_bytes: if responded {
                512 + self.rand(60_000) as u32
            } else {
                0
            },
            body_truncated: false,
            redirects: u8::from(target_id == 7),
            cert_not_after_s: (https && responded).then_some(1_800_000_000 + target_id as u64),
            remote_ip: Some(IpAddress::V4([
                10,
                0,
                (target_id >> 8) as u8,
                target_id as u8,
            ])),
            kind: vantage_proto::ProbeKind::Http,
            tls_version: None,
            dns: None,
        }
    }
}
