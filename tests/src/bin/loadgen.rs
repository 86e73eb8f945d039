//! `loadgen`: many simulated agents (the agent's real uplink, synthetic results) publishing to
//! the MQTT broker at a chosen rate; prints what each produced, so the rows in PostgreSQL can be
//! checked against it. See `vantage_tests::loadgen`.
//!
//! Example: loadgen --agents 10 --rate 5000 --results-per-agent 3000 --topic-prefix vantage

use std::time::Instant;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use vantage_tests::loadgen::{self, LoadSpec};
use vantage_tests::Services;

#[derive(Parser)]
#[command(about = "Simulated vantage agents publishing realistic result batches over MQTT")]
struct Args {
    /// Number of simulated agents.
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Results per second over all agents.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Results each agent produces before it drains and stops.
    #[arg(long, default_value_t = 1000)]
    results_per_agent: u64,
    /// MQTT topic prefix (the ingester's `mqtt.topic_prefix`).
    #[arg(long, default_value = "vantage")]
    topic_prefix: String,
    /// Agent ids are `<agent-prefix>-<n>`.
    #[arg(long, default_value = "sim")]
    agent_prefix: String,
    /// Results per MQTT message (1..=32).
    #[arg(long, default_value_t = 32)]
    batch_max: usize,
    /// Threads the agents are spread over (each a current-thread runtime, like the agent).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    anyhow::ensure!(
        (1..=vantage_proto::MAX_RESULTS).contains(&args.batch_max),
        "--batch-max must be 1..=32"
    );
    let services = Services::from_env();
    let mut spec = LoadSpec::new(&services, &args.topic_prefix, &args.agent_prefix);
    spec.agents = args.agents;
    spec.rate = args.rate;
    spec.results_per_agent = args.results_per_agent;
    spec.batch_max = args.batch_max;
    spec.threads = args.threads;
    let t0 = Instant::now();
    let reports = loadgen::start(spec, CancellationToken::new()).join();
    let secs = t0.elapsed().as_secs_f64();
    let mut total = 0;
    for r in &reports {
        let s = &r.stats;
        total += s.results;
        println!(
            "{} {} boot={} results={} dropped={} undelivered={} frames={} reconnects={}",
            r.agent_id,
            r.region,
            s.boot_id,
            s.results,
            s.dropped,
            s.undelivered,
            s.frames,
            s.reconnects
        );
    }
    println!(
        "total {total} results in {secs:.1} s ({:.0}/s)",
        total as f64 / secs.max(f64::EPSILON)
    );
    let undelivered: u64 = reports.iter().map(|r| r.stats.undelivered).sum();
    anyhow::ensure!(undelivered == 0, "{undelivered} results undelivered");
    Ok(())
}
