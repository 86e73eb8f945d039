//! vantage-agent: probes HTTP(S) targets on a schedule and uploads the results over MQTT.
//!
//! Data flow inside the agent (see ARCHITECTURE.md):
//! [`config`] (or [`target_set`]: sets pushed by the ingester) → [`scheduler::Scheduler`] (when)
//! → [`probe::Prober`] (measure) → bounded channel → [`uplink`] (number, buffer, batch, publish;
//! receives target sets and sends [`fleet`] status).

pub mod budget;
pub mod cert_expiry;
pub mod clock_state;
pub mod config;
pub mod dns_wire;
pub mod fleet;
pub mod metrics;
pub mod mqtt_tls;
pub mod netpolicy;
pub mod oneshot;
pub mod outbox;
pub mod probe;
pub mod probe_tls;
pub mod scheduler;
pub mod spool;
pub mod target;
pub mod target_set;
pub mod uplink;
pub mod uplink_stats;

// Shared with the ingester; re-exported so the agent's paths stay `crate::logging`, ...
pub use vantage_common::{logging, ratelimit};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use vantage_proto::control::SetScope;
use vantage_proto::{Outcome, ProbeKind, ProbeResult};

use scheduler::{Action, SkipReason};

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
    /// Probes not started (the sum of the four reasons below).
    pub probes_skipped: u64,
    /// ... because their due time passed while the agent could not run.
    pub skipped_late: u64,
    /// ... because the target's previous probe was still running.
    pub skipped_in_flight: u64,
    /// ... because every probe slot they may take was busy.
    pub skipped_no_slot: u64,
    /// ... because no body memory freed within their timeout.
    pub skipped_no_memory: u64,
    /// Probes that could never fit the memory budget, reported as `memory_refused` results.
    pub probes_refused: u64,
    /// Skipped periods reported as `missed` results (the newest
    /// [`scheduler::MAX_MISSED_PER_SKIP`] of each skip).
    pub missed_reported: u64,
    /// Probes still running at the drain deadline, aborted: no result exists for them, so they
    /// are neither numbered nor `undelivered`; counted here and in the stop warning.
    pub probes_aborted: u64,
    pub uplink: UplinkStats,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("uplink task failed: {0}")]
    Uplink(#[from] tokio::task::JoinError),
    #[error("--rounds needs local targets ([[targets]] in the config file)")]
    RoundsNeedLocalTargets,
    #[error("state_dir: cannot use the spool directory {dir}: {source} (set uplink.spool_max_bytes = 0 to run without a spool)")]
    Spool {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Sends results no probe produced (`memory_refused`, `missed`) to the uplink from a task of
/// their own, so the schedule never waits on a full channel. The task is not in `running`: it
/// holds no slot.
fn hand_to_uplink(
    probes: &mut JoinSet<bool>,
    tx: &mpsc::Sender<ProbeResult>,
    results: Vec<ProbeResult>,
) {
    let tx = tx.clone();
    probes.spawn(async move {
        for result in results {
            let _ = tx.send(result).await;
        }
        true
    });
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
    // A spool that cannot be created is a setup error: refuse to start rather than run
    // without the durability the configuration asks for.
    if let Some(spool) = config.spool_config() {
        std::fs::create_dir_all(&spool.dir)
            .and_then(|()| tempfile_probe(&spool.dir))
            .map_err(|source| RunError::Spool {
                dir: spool.dir.clone(),
                source,
            })?;
    }
    let prober = probe::Prober::new().with_address_policy(config.address_policy);
    // A new boot id at every start keeps (agent, boot, seq) unique across restarts.
    let boot_id = getrandom::u64().unwrap_or_else(|_| fallback_boot_id());

    // Where targets come from: the config file, or the sets the ingester pushes (starting from
    // the last good ones on disk, so a restart without broker still probes).
    let mut book = match config.targets_source {
        TargetsSource::Local => None,
        TargetsSource::Central => Some(target_set::TargetBook::load_for(
            &config.state_dir,
            &config.mqtt.topic_prefix,
            &config.region,
            &config.agent_id,
            config.uplink.wire_format,
        )),
    };
    let mut targets: Vec<Arc<target::Target>> = match &book {
        None => config.targets.iter().cloned().map(Arc::new).collect(),
        Some(b) => b.effective(),
    };
    tracing::info!(
        agent = %config.agent_id,
        region = %config.region,
        boot_id,
        source = ?config.targets_source,
        targets = targets.len(),
        "agent starting"
    );
    let capacity = scheduler::Capacity {
        max_concurrency: config.max_concurrency,
        memory_budget: config.memory_budget,
        probe_floor: budget::PROBE_FLOOR,
        sockets: probe_sockets(),
    };
    let mut schedule =
        scheduler::Scheduler::new(&entries(&targets), capacity, Instant::now(), options.rounds);
    log_limits(&schedule, "probe limits");
    let board = Arc::new(fleet::StatusBoard::new(board_of(
        book.as_ref(),
        &targets,
        &schedule,
    )));

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

    // Each probe task returns whether its target answered; the map says whose task it was
    // (a task that panicked returns only its id).
    let mut probes: JoinSet<bool> = JoinSet::new();
    let mut running: HashMap<tokio::task::Id, u32> = HashMap::new();
    let mut summary = RunSummary::default();
    let following = book.is_some();
    // Skips and refusals are input-driven (a thousand dead targets make thousands): one line
    // per half minute each, with how many were suppressed; the summary and /metrics count all.
    let skip_log = ratelimit::RateLimit::new("probe skipped", Duration::from_secs(30));
    let refuse_log = ratelimit::RateLimit::new(
        "probe refused by the memory budget",
        Duration::from_secs(30),
    );

    loop {
        let next = schedule.next_wake();
        if next.is_none() && !following {
            break; // local targets, all rounds done
        }
        // With no target due (an empty central set), sleep until a set arrives.
        let wake = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            // In this order: when both sets changed at once, the agent's own is taken first
            // (the order `targets apply` publishes them in; see target_set::TargetBook).
            biased;
            _ = shutdown.cancelled() => break,
            Ok(()) = agent_rx.changed(), if following => {
                let payload = agent_rx.borrow_and_update().clone();
                apply_set(&mut book, SetScope::Agent, payload, &mut targets, &mut schedule, &board).await;
            }
            Ok(()) = region_rx.changed(), if following => {
                let payload = region_rx.borrow_and_update().clone();
                apply_set(&mut book, SetScope::Region, payload, &mut targets, &mut schedule, &board).await;
            }
            // A probe ended: its slot and memory are free (and waiting probes may start below).
            Some(done) = probes.join_next_with_id(), if !probes.is_empty() => {
                let (task, answered) = match &done {
                    Ok((task, answered)) => (*task, *answered),
                    // A panic in a probe task: an agent fault, not the target's timeout.
                    Err(e) => (e.id(), true),
                };
                let target = running.remove(&task);
                if let Err(e) = &done {
                    tracing::error!(target_id = ?target, error = %e, "probe task failed; it has no result");
                }
                if let Some(target) = target {
                    schedule.finished(target, answered);
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        for action in schedule.poll(Instant::now()) {
            match action {
                Action::Start { target, .. } => {
                    let Some(target) = targets.iter().find(|t| t.id == target).cloned() else {
                        schedule.finished(target, true);
                        continue;
                    };
                    summary.probes_started += 1;
                    let (prober, tx, id) = (prober.clone(), tx.clone(), target.id);
                    // The probe owns its target: a set swapped meanwhile does not disturb it.
                    let handle = probes.spawn(async move {
                        let (m, leftover) = prober.probe_with_leftover(&target).await;
                        metrics::probe_done(&m);
                        tracing::debug!(
                            target_id = m.target_id,
                            outcome = m.outcome.as_str(),
                            status = m.status,
                            kind = m.kind.as_str(),
                            total_us = m.total_us,
                            "probe done"
                        );
                        // The uplink receives until this sender is gone (see the drain below),
                        // so the result is numbered even after the drain deadline.
                        let _ = tx.send(m.result).await;
                        // A body check given up at the deadline still holds the body: this
                        // probe's memory (and slot) stays counted until it ends (probe/check.rs).
                        if let Some(leftover) = leftover {
                            leftover.finished().await;
                        }
                        // A timeout held the slot to its deadline; anything else answered.
                        !matches!(m.outcome, Outcome::Timeout | Outcome::ConnectTimeout)
                    });
                    running.insert(handle.id(), id);
                }
                Action::Skipped {
                    target,
                    due_at,
                    reason,
                    count,
                } => {
                    summary.probes_skipped += count;
                    *match reason {
                        SkipReason::Late => &mut summary.skipped_late,
                        SkipReason::InFlight => &mut summary.skipped_in_flight,
                        SkipReason::NoSlot => &mut summary.skipped_no_slot,
                        SkipReason::NoMemory => &mut summary.skipped_no_memory,
                    } += count;
                    if let Some(suppressed) = skip_log.allow() {
                        tracing::warn!(
                            target_id = target,
                            reason = reason.as_str(),
                            suppressed,
                            skipped_total = summary.probes_skipped,
                            "probe skipped"
                        );
                    }
                    // Silence becomes data: each period that went unmeasured is a result with
                    // outcome `missed` at its due time (no timings), so availability and SQL
                    // tell "not measured" from "measured up" (issue #18 item 4).
                    // The target's kind too: a missed period of a tcp target is a tcp result
                    // (the sink takes a target's kind from its newest results).
                    let (every, kind) = targets
                        .iter()
                        .find(|t| t.id == target)
                        .map_or((Duration::ZERO, ProbeKind::Http), |t| (t.interval, t.kind));
                    let behind = Instant::now().saturating_duration_since(due_at);
                    let first_due_ms = fleet::now_ms()
                        .saturating_sub(u64::try_from(behind.as_millis()).unwrap_or(u64::MAX));
                    let missed: Vec<_> = scheduler::missed_due_times(first_due_ms, every, count)
                        .into_iter()
                        .map(|at| ProbeResult {
                            kind,
                            ..ProbeResult::without_response(0, target, at, Outcome::Missed)
                        })
                        .collect();
                    summary.missed_reported += missed.len() as u64;
                    hand_to_uplink(&mut probes, &tx, missed);
                }
                Action::Refused { target, need, .. } => {
                    summary.probes_refused += 1;
                    if let Some(suppressed) = refuse_log.allow() {
                        tracing::warn!(
                            target_id = target,
                            need = %budget::show(need),
                            memory_budget = %budget::show(config.memory_budget),
                            suppressed,
                            "probe refused: it could hold more body memory than probes.memory_budget (outcome memory_refused)"
                        );
                    }
                    // A result that says so, like any other: the refusal reaches SQL.
                    let mut m = probe::Measurement::new(target, fleet::now_ms());
                    m.outcome = Outcome::MemoryRefused;
                    if let Some(t) = targets.iter().find(|t| t.id == target) {
                        m.kind = t.kind;
                    }
                    m.detail = Some(format!(
                        "needs {} of body memory, more than probes.memory_budget ({})",
                        budget::show(need),
                        budget::show(config.memory_budget)
                    ));
                    metrics::probe_done(&m);
                    hand_to_uplink(&mut probes, &tx, vec![m.result]);
                }
            }
        }
        metrics::probes_skipped(summary.probes_skipped);
    }
    // In-flight probes may finish until the drain deadline, the uplink's too (each is bounded
    // by its own timeout); then they are aborted and counted. A `--rounds` run that was not
    // stopped waits for them: the uplink's drain starts only after.
    let deadline = shutdown
        .is_cancelled()
        .then(|| tokio::time::Instant::now() + config.uplink.drain_timeout);
    summary.probes_aborted = finish_probes(&mut probes, deadline).await;
    if summary.probes_aborted > 0 {
        tracing::warn!(
            aborted = summary.probes_aborted,
            "probes still running at the drain deadline were aborted (they have no result)"
        );
    }
    drop(tx);
    summary.uplink = uplink.await?;
    tracing::info!(?summary, "agent stopped");
    Ok(summary)
}

/// Waits for every probe task, until `deadline` if there is one; then aborts the rest and
/// returns how many were aborted (a probe that finished meanwhile has sent its result).
async fn finish_probes(probes: &mut JoinSet<bool>, deadline: Option<tokio::time::Instant>) -> u64 {
    let all_done = async { while probes.join_next().await.is_some() {} };
    match deadline {
        None => {
            all_done.await;
            return 0;
        }
        Some(d) => {
            if tokio::time::timeout_at(d, all_done).await.is_ok() {
                return 0;
            }
        }
    }
    probes.abort_all();
    let mut aborted = 0;
    while let Some(done) = probes.join_next().await {
        if matches!(done, Err(e) if e.is_cancelled()) {
            aborted += 1;
        }
    }
    aborted
}

/// Sockets probes may open: the soft limit on open files (`/proc/self/limits`) less 64 for the
/// broker connection, the metrics endpoint, resolver threads, state files and stdio. Each probe
/// holds one socket, so more slots than this would fail as `connect_failed`, an agent fault
/// reported as the target's. 1024 (the usual default) when the limit cannot be read.
fn probe_sockets() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .map(|soft| soft.parse::<usize>().unwrap_or(usize::MAX))
        })
        .unwrap_or(1024);
    soft.saturating_sub(64).max(1)
}

fn log_limits(schedule: &scheduler::Scheduler, what: &str) {
    let l = schedule.limits();
    tracing::info!(
        targets = schedule.len(),
        slots = l.slots,
        reserved_slots = l.reserved_slots,
        steady_need = format!("{:.1}", l.steady_need),
        memory_budget = %budget::show(l.memory),
        "{what}"
    );
}

/// What the scheduler needs to know of each target.
fn entries(targets: &[Arc<target::Target>]) -> Vec<scheduler::Entry> {
    targets
        .iter()
        .map(|t| scheduler::Entry {
            id: t.id,
            interval: t.interval,
            timeout: t.timeout,
            memory: budget::need(t),
        })
        .collect()
}

/// The status fields that follow from the target sets.
fn board_of(
    book: Option<&target_set::TargetBook>,
    targets: &[Arc<target::Target>],
    schedule: &scheduler::Scheduler,
) -> fleet::Board {
    fleet::Board {
        targets: targets.len() as u32,
        max_concurrency: u32::try_from(schedule.limits().slots).unwrap_or(u32::MAX),
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
            schedule.update(&entries(targets), Instant::now());
            tracing::info!(
                ?scope,
                region_generation = book.region_generation(),
                agent_generation = book.agent_generation(),
                targets = targets.len(),
                slots = schedule.limits().slots,
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
    board.set(board_of(Some(book), targets, schedule));
}

/// Creates and removes a file in `dir`: the spool can be written there.
fn tempfile_probe(dir: &std::path::Path) -> std::io::Result<()> {
    let path = dir.join(".write-test");
    std::fs::write(&path, b"")?;
    std::fs::remove_file(&path)
}

/// Used only if the OS has no entropy source: time-based, still distinct across restarts.
fn fallback_boot_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
