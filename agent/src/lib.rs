//! vantage-agent: probes HTTP(S) targets on a schedule and uploads the results over MQTT.
//!
//! Data flow inside the agent (see ARCHITECTURE.md):
//! [`config`] → [`scheduler::Scheduler`] (when) → [`probe::Prober`] (measure) → bounded channel →
//! [`uplink`] (number, buffer, batch, publish).

pub mod config;
pub mod oneshot;
pub mod probe;
pub mod scheduler;
pub mod target;
pub mod tls;
pub mod uplink;

use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use uplink::UplinkStats;

/// Options that belong to one run rather than to the configuration file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Probe each target this many times, deliver the results, then return (None: until shutdown).
    pub rounds: Option<u64>,
}

/// What a run did, for logs and tests.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub probes_started: u64,
    /// Probes not started because they were late or all probe slots were busy.
    pub probes_skipped: u64,
    pub uplink: UplinkStats,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("uplink task failed: {0}")]
    Uplink(#[from] tokio::task::JoinError),
}

/// Runs the agent until `shutdown` fires (or the rounds are done), then drains the uplink.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary, RunError> {
    let config = Arc::new(config);
    let prober = probe::Prober::new();
    // A new boot id at every start keeps (agent, boot, seq) unique across restarts.
    let boot_id = getrandom::u64().unwrap_or_else(|_| fallback_boot_id());
    tracing::info!(
        agent = %config.agent_id,
        region = %config.region,
        boot_id,
        targets = config.targets.len(),
        "agent starting"
    );

    // Probes hand results to the uplink through this channel (the uplink numbers them); the
    // uplink drains it without ever waiting on the network, so its bound only matters if the
    // uplink task itself stalls.
    let (tx, rx) = mpsc::channel(1024);
    let uplink = tokio::spawn(uplink::run(config.clone(), boot_id, rx, shutdown.clone()));

    let intervals: Vec<(u32, std::time::Duration)> =
        config.targets.iter().map(|t| (t.id, t.interval)).collect();
    let mut schedule =
        scheduler::Scheduler::new(&intervals, std::time::Instant::now(), options.rounds);
    let slots = Arc::new(Semaphore::new(config.max_concurrency));
    let mut probes = JoinSet::new();
    let mut summary = RunSummary::default();

    while let Some(next) = schedule.next_due() {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // Reap finished probes so the set does not grow.
            Some(_) = probes.join_next(), if !probes.is_empty() => continue,
            _ = tokio::time::sleep_until(next.into()) => {}
        }
        for due in schedule.pop_due(std::time::Instant::now()) {
            summary.probes_skipped += due.skipped;
            // No free slot means earlier probes are still running: skip instead of piling up.
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                summary.probes_skipped += 1;
                tracing::warn!(
                    target_id = config.targets[due.target].id,
                    "no free probe slot, probe skipped"
                );
                continue;
            };
            summary.probes_started += 1;
            let (prober, config, tx) = (prober.clone(), config.clone(), tx.clone());
            probes.spawn(async move {
                let target = &config.targets[due.target];
                let m = prober.probe(target).await;
                tracing::debug!(target_id = m.target_id, outcome = m.outcome.as_str(), status = m.status, total = ?m.total, "probe done");
                // Fails only when the uplink is gone (shutdown); the result cannot go anywhere.
                let _ = tx.send(uplink::to_wire(&m)).await;
                drop(permit);
            });
        }
    }
    // In-flight probes finish (each is bounded by its own timeout) before the uplink drains.
    while probes.join_next().await.is_some() {}
    drop(tx);
    summary.uplink = uplink.await?;
    tracing::info!(?summary, "agent stopped");
    Ok(summary)
}

/// Used only if the OS has no entropy source: time-based, still distinct across restarts.
fn fallback_boot_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
