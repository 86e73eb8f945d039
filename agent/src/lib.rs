//! vantage-agent: probes HTTP(S) targets on a schedule and uploads the results over MQTT.
//!
//! Data flow inside the agent (see ARCHITECTURE.md):
//! [`config`] (or [`target_set`]: sets pushed by the ingester) → [`scheduler::Scheduler`] (when)
//! → [`probe::Prober`] (measure) → bounded channel → [`uplink`] (number, buffer, batch, publish;
//! receives target sets and sends [`fleet`] status).

pub mod config;
pub mod fleet;
pub mod logging;
pub mod metrics;
pub mod mqtt_tls;
pub mod netpolicy;
pub mod oneshot;
pub mod probe;
pub mod ratelimit;
pub mod scheduler;
pub mod target;
pub mod target_set;
pub mod tls;
pub mod uplink;

use std::sync::Arc;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use vantage_proto::control::SetScope;

pub use config::{Config, TargetsSource};
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
    #[error("--rounds needs local targets ([[targets]] in the config file)")]
    RoundsNeedLocalTargets,
}

/// Runs the agent until `shutdown` fires (or the rounds are done), then drains the uplink.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary, RunError> {
    let config = Arc::new(config);
    if options.rounds.is_some() && config.targets_source == TargetsSource::Central {
        return Err(RunError::RoundsNeedLocalTargets);
    }
    let prober = probe::Prober::new().with_address_policy(config.address_policy);
    // A new boot id at every start keeps (agent, boot, seq) unique across restarts.
    let boot_id = getrandom::u64().unwrap_or_else(|_| fallback_boot_id());

    // Where targets come from: the config file, or the sets the ingester pushes (starting from
    // the last good ones on disk, so a restart without broker still probes).
    let mut book = match config.targets_source {
        TargetsSource::Local => None,
        TargetsSource::Central => Some(target_set::TargetBook::load(
            &config.state_dir,
            &config.mqtt.topic_prefix,
            &config.region,
            &config.agent_id,
        )),
    };
    let mut targets: Vec<Arc<target::Target>> = match &book {
        None => config.targets.iter().cloned().map(Arc::new).collect(),
        Some(b) => b.effective(),
    };
    let board = Arc::new(fleet::StatusBoard::new(board_of(book.as_ref(), &targets)));
    tracing::info!(
        agent = %config.agent_id,
        region = %config.region,
        boot_id,
        source = ?config.targets_source,
        targets = targets.len(),
        "agent starting"
    );

    // Probes hand results to the uplink through this channel (the uplink numbers them); the
    // uplink drains it without ever waiting on the network, so its bound only matters if the
    // uplink task itself stalls.
    let (tx, rx) = mpsc::channel(1024);
    // Target set payloads from the broker: only the latest per scope matters, so a watch
    // channel (never blocks the MQTT event loop, holds one value).
    let (region_tx, mut region_rx) = watch::channel(None);
    let (agent_tx, mut agent_rx) = watch::channel(None);
    let control = uplink::Control {
        board: board.clone(),
        sets: (config.targets_source == TargetsSource::Central).then_some(uplink::SetSenders {
            region: region_tx,
            agent: agent_tx,
        }),
    };
    let uplink = tokio::spawn(uplink::run(
        config.clone(),
        boot_id,
        rx,
        control,
        shutdown.clone(),
    ));

    let mut schedule = scheduler::Scheduler::new(
        &intervals(&targets),
        std::time::Instant::now(),
        options.rounds,
    );
    let slots = Arc::new(Semaphore::new(config.max_concurrency));
    let mut probes = JoinSet::new();
    let mut summary = RunSummary::default();
    let following = book.is_some();

    loop {
        let next = schedule.next_due();
        if next.is_none() && !following {
            break; // local targets, all rounds done
        }
        // With no target due (an empty central set), sleep until a set arrives.
        let wake = next
            .unwrap_or_else(|| std::time::Instant::now() + std::time::Duration::from_secs(3600));
        tokio::select! {
            // In this order: when both sets changed at once, the agent's own is taken first
            // (the order `targets apply` publishes them in; see target_set::TargetBook).
            biased;
            _ = shutdown.cancelled() => break,
            Ok(()) = agent_rx.changed(), if following => {
                let payload = agent_rx.borrow_and_update().clone();
                apply_set(&mut book, SetScope::Agent, payload, &mut targets, &mut schedule, &board).await;
                continue;
            }
            Ok(()) = region_rx.changed(), if following => {
                let payload = region_rx.borrow_and_update().clone();
                apply_set(&mut book, SetScope::Region, payload, &mut targets, &mut schedule, &board).await;
                continue;
            }
            // Reap finished probes so the set does not grow.
            Some(_) = probes.join_next(), if !probes.is_empty() => continue,
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        for due in schedule.pop_due(std::time::Instant::now()) {
            summary.probes_skipped += due.skipped;
            let Some(target) = targets.iter().find(|t| t.id == due.target).cloned() else {
                continue;
            };
            // No free slot means earlier probes are still running: skip instead of piling up.
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                summary.probes_skipped += 1;
                tracing::warn!(target_id = target.id, "no free probe slot, probe skipped");
                continue;
            };
            summary.probes_started += 1;
            let (prober, tx) = (prober.clone(), tx.clone());
            // The probe owns its target: a set swapped meanwhile does not disturb it.
            probes.spawn(async move {
                let m = prober.probe(&target).await;
                metrics::probe_done(&m);
                tracing::debug!(target_id = m.target_id, outcome = m.outcome.as_str(), status = m.status, total = ?m.total, "probe done");
                // Fails only when the uplink is gone (shutdown); the result cannot go anywhere.
                let _ = tx.send(uplink::to_wire(&m)).await;
                drop(permit);
            });
        }
        metrics::probes_skipped(summary.probes_skipped);
    }
    // In-flight probes finish (each is bounded by its own timeout) before the uplink drains.
    while probes.join_next().await.is_some() {}
    drop(tx);
    summary.uplink = uplink.await?;
    tracing::info!(?summary, "agent stopped");
    Ok(summary)
}

/// (id, interval) of each target, for the scheduler.
fn intervals(targets: &[Arc<target::Target>]) -> Vec<(u32, std::time::Duration)> {
    targets.iter().map(|t| (t.id, t.interval)).collect()
}

/// The status fields that follow from the target sets.
fn board_of(
    book: Option<&target_set::TargetBook>,
    targets: &[Arc<target::Target>],
) -> fleet::Board {
    fleet::Board {
        targets: targets.len() as u32,
        region_set_generation: book.map_or(0, |b| b.region_generation()),
        agent_set_generation: book.map_or(0, |b| b.agent_generation()),
        rejection: book.and_then(|b| b.rejection().cloned()),
    }
}

/// Offers a received payload to the book; on acceptance swaps the schedule in place.
async fn apply_set(
    book: &mut Option<target_set::TargetBook>,
    scope: SetScope,
    payload: Option<Vec<u8>>,
    targets: &mut Vec<Arc<target::Target>>,
    schedule: &mut scheduler::Scheduler,
    board: &fleet::StatusBoard,
) {
    let Some(payload) = payload else { return };
    let Some(current) = book.take() else { return };
    // Validation compiles every regex and reads CA files, and persisting fsyncs an SD card: on
    // the blocking pool, so the probes in flight on this (single) runtime thread keep honest
    // timings. The book is cloned first so a panic there cannot lose it.
    let fallback = current.clone();
    let (updated, offered) = match tokio::task::spawn_blocking(move || {
        let mut b = current;
        let offered = b.offer(scope, &payload);
        (b, offered)
    })
    .await
    {
        Ok(done) => done,
        Err(e) => {
            tracing::error!(error = %e, "target set validation failed; keeping the previous set");
            *book = Some(fallback);
            return;
        }
    };
    let book = book.insert(updated);
    match offered {
        target_set::Offered::Unchanged => {}
        target_set::Offered::Accepted => {
            *targets = book.effective();
            schedule.update(&intervals(targets), std::time::Instant::now());
            tracing::info!(
                ?scope,
                region_generation = book.region_generation(),
                agent_generation = book.agent_generation(),
                targets = targets.len(),
                "target set applied"
            );
        }
        target_set::Offered::Rejected(reason) => {
            tracing::warn!(
                ?scope,
                reason,
                "target set rejected; keeping the previous one"
            );
        }
    }
    board.set(board_of(Some(book), targets));
}

/// Used only if the OS has no entropy source: time-based, still distinct across restarts.
fn fallback_boot_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
