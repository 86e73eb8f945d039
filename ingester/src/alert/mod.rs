//! The third ingester stage, `vantage-ingester alert`: evaluates the `[[alerts.rules]]` on
//! PostgreSQL every `evaluation_interval`, keeps incidents and their event log in PostgreSQL,
//! and delivers them to Alertmanager (API v2) and signed webhooks (docs/alerts.md).
//!
//! Exactly one evaluator is active: the one holding a session advisory lock (keyed by the
//! schema) on the connection it evaluates and writes with. Others poll for the lock and take
//! over when the holder's connection dies. State (counters, open incidents) is read back from
//! PostgreSQL at every takeover, so a restart neither re-notifies nor forgets.
//!
//! - `../config/alerts.rs`: the `[alerts]` section, validated (rules and receivers).
//! - `state.rs`: the per-subject state machine (for, resolve_after, flapping), no I/O.
//! - `eval.rs`: each kind's query and verdicts.
//! - `store.rs`: incidents, events, counters, cursors.
//! - `deliver.rs`: Alertmanager and webhook tasks.

pub mod deliver;
pub mod eval;
pub mod state;
pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use vantage_common::backoff::Backoff;
use vantage_common::signal::sleep_unless_stopped;

use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::alerts::{AlertsConfig, Rule};
use crate::config::{Config, ConfigError, PostgresConfig};
use crate::db::DbError;
use deliver::Snapshot;
use state::{Change, Flap, Open, Track, Verdict};
use store::{Incident, Write};

/// First key of the evaluator's advisory lock (the second is the schema's hash), so it cannot
/// collide with the migrations' `pg_advisory_xact_lock(hashtext(schema))`.
pub const LOCK_CLASS: i32 = 0x7661_6c72; // "valr"

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("an evaluation took longer than {0:?}")]
    Timeout(Duration),
}

/// What a run did, for tests and the final log line.
#[derive(Debug, Clone, Default)]
pub struct AlertSummary {
    /// Evaluations done while active.
    pub evaluations: u64,
    /// Times this process took the lock.
    pub takeovers: u64,
    pub opened: u64,
    pub resolved: u64,
}

/// The evaluator's memory while it holds the lock.
struct Evaluator {
    config: Arc<AlertsConfig>,
    /// (rule, subject) → track. Idle subjects are not kept.
    tracks: HashMap<(String, String), Track>,
    /// Open incidents and those resolved within the retention, by id.
    incidents: BTreeMap<i64, Incident>,
}

impl Evaluator {
    /// Reads the state back; resolves incidents of rules no longer configured.
    async fn load(client: &mut Client, config: Arc<AlertsConfig>) -> Result<Evaluator, AlertError> {
        let mut tracks: HashMap<(String, String), Track> =
            store::tracks(client).await?.into_iter().collect();
        let retention = deliver::RESOLVED_RETENTION.as_secs_f64();
        let incidents = store::incidents(client, retention).await?;
        let last_regions = store::last_event_regions(client).await?;
        let configured: HashSet<&str> = config.rules.iter().map(|r| r.name.as_str()).collect();
        let mut writes = Vec::new();
        let mut forget = Vec::new();
        for i in incidents.iter().filter(|i| i.resolved_at.is_none()) {
            if !configured.contains(i.rule.as_str()) {
                writes.push(Write::Resolve {
                    id: i.id,
                    summary: format!("rule {} removed from the configuration", i.rule),
                });
                continue;
            }
            let track = tracks
                .entry((i.rule.clone(), i.subject.key.clone()))
                .or_default();
            track.open = Some(Open {
                incident_id: i.id,
                flapping: i.flapping,
                regions: last_regions.get(&i.id).cloned().unwrap_or_default(),
            });
        }
        tracks.retain(|(rule, subject), _| {
            let keep = configured.contains(rule.as_str());
            if !keep {
                forget.push((rule.clone(), subject.clone()));
            }
            keep
        });
        if !writes.is_empty() || !forget.is_empty() {
            let forget: Vec<(&str, &str)> = forget
                .iter()
                .map(|(r, s)| (r.as_str(), s.as_str()))
                .collect();
            store::apply(client, &writes, &[], &forget).await?;
        }
        let incidents = store::incidents(client, retention).await?;
        Ok(Evaluator {
            config,
            tracks,
            incidents: incidents.into_iter().map(|i| (i.id, i)).collect(),
        })
    }

    fn flap(&self) -> Flap {
        Flap {
            window: self.config.flap_window,
            start: self.config.flap_start,
            stop: self.config.flap_stop,
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            incidents: self.incidents.values().cloned().collect(),
        }
    }

    /// One evaluation of every rule; Ok(true) when incidents changed.
    async fn evaluate(
        &mut self,
        client: &mut Client,
        summary: &mut AlertSummary,
    ) -> Result<bool, AlertError> {
        let config = self.config.clone();
        let flap = self.flap();
        let mut writes: Vec<Write> = Vec::new();
        // For each write: the (rule, subject) it belongs to and, for opens, the subject.
        let mut opens: Vec<((String, String), Vec<String>, bool)> = Vec::new();
        let mut dirty: Vec<(String, String)> = Vec::new();
        for rule in &config.rules {
            let tracked: HashSet<String> = self
                .tracks
                .keys()
                .filter(|(r, _)| *r == rule.name)
                .map(|(_, s)| s.clone())
                .collect();
            let findings = eval::evaluate(client, rule, &tracked, config.forget_after).await?;
            for (subject, verdict) in findings {
                let key = (rule.name.clone(), subject.key.clone());
                if !self.tracks.contains_key(&key) && !matches!(verdict, Verdict::Bad(_)) {
                    continue; // idle and fine: nothing to remember
                }
                let track = self.tracks.entry(key.clone()).or_default();
                let before = track.clone();
                let change = track.step(verdict, rule.for_evaluations, rule.resolve_after, flap);
                if *track != before {
                    dirty.push(key.clone());
                }
                let Some(change) = change else { continue };
                match change {
                    Change::Open { flapping, detail } => {
                        opens.push((key, detail.regions.keys().cloned().collect(), flapping));
                        writes.push(open_write(rule, subject, flapping, detail));
                    }
                    Change::Update(detail) => {
                        if let Some(o) = &track.open {
                            writes.push(Write::Update {
                                id: o.incident_id,
                                detail,
                            });
                        }
                    }
                    Change::Flapping => {
                        if let Some(o) = &track.open {
                            writes.push(Write::Flapping { id: o.incident_id });
                        }
                    }
                    Change::Resolve => {
                        if let Some(o) = track.open.take() {
                            writes.push(Write::Resolve {
                                id: o.incident_id,
                                summary: "recovered".into(),
                            });
                        }
                    }
                }
            }
        }
        // Forget resolved incidents past the retention (Alertmanager has them by now).
        let now = SystemTime::now();
        let before = self.incidents.len();
        self.incidents.retain(|_, i| {
            i.resolved_at.is_none_or(|t| {
                now.duration_since(t)
                    .map_or(true, |age| age < deliver::RESOLVED_RETENTION)
            })
        });
        let mut changed = before != self.incidents.len();
        if writes.is_empty() && dirty.is_empty() {
            return Ok(changed);
        }
        dirty.sort();
        dirty.dedup();
        let mut keep = Vec::new();
        let mut forget = Vec::new();
        for key in &dirty {
            match self.tracks.get(key) {
                Some(t) if !t.is_idle() => keep.push((key.0.as_str(), key.1.as_str(), t)),
                _ => forget.push((key.0.as_str(), key.1.as_str())),
            }
        }
        // `open` of a track that is opening is set only once the row exists; until then the
        // track counts as idle-without-incident, which `apply` stores as counters only.
        let opened = store::apply(client, &writes, &keep, &forget).await?;
        for ((key, regions, flapping), id) in opens.into_iter().zip(&opened) {
            if let Some(t) = self.tracks.get_mut(&key) {
                t.open = Some(Open {
                    incident_id: *id,
                    flapping,
                    regions,
                });
            }
        }
        self.tracks.retain(|_, t| !t.is_idle());
        let metrics = crate::metrics::alert();
        for w in &writes {
            let event = match w {
                Write::Open { .. } => {
                    summary.opened += 1;
                    "firing"
                }
                Write::Update { .. } => "updated",
                Write::Flapping { .. } => "flapping",
                Write::Resolve { .. } => {
                    summary.resolved += 1;
                    "resolved"
                }
            };
            metrics.event(event);
        }
        if !writes.is_empty() {
            // Read the touched incidents back as stored (ids, timestamps from PostgreSQL).
            let retention = deliver::RESOLVED_RETENTION.as_secs_f64();
            self.incidents = store::incidents(client, retention)
                .await?
                .into_iter()
                .map(|i| (i.id, i))
                .collect();
            changed = true;
            for w in &writes {
                log_write(w, &self.incidents);
            }
        }
        Ok(changed)
    }
}

fn open_write(rule: &Rule, subject: eval::Subject, flapping: bool, detail: state::Detail) -> Write {
    Write::Open {
        rule: rule.name.clone(),
        kind: rule.kind,
        subject,
        severity: rule.severity.clone(),
        flapping,
        detail,
    }
}

fn log_write(w: &Write, incidents: &BTreeMap<i64, Incident>) {
    match w {
        Write::Open { rule, detail, .. } => {
            tracing::warn!(rule = %rule, summary = %detail.summary, "alert firing")
        }
        Write::Update { id, detail } => {
            tracing::info!(incident = id, summary = %detail.summary, "alert updated")
        }
        Write::Flapping { id } => tracing::warn!(incident = id, "alert flapping"),
        Write::Resolve { id, summary } => {
            let rule = incidents.get(id).map(|i| i.rule.as_str()).unwrap_or("?");
            tracing::info!(incident = id, rule, reason = %summary, "alert resolved")
        }
    }
}

/// Runs the stage until `shutdown`: waits for the lock, evaluates while it holds it, starts
/// over (new connection, wait for the lock again) after any PostgreSQL error.
pub async fn run(config: &Config, shutdown: CancellationToken) -> Result<AlertSummary, AlertError> {
    let pg = config.postgres()?.clone();
    let alerts = Arc::new(config.alerts.clone());
    if alerts.default_rules {
        tracing::info!("no [[alerts.rules]]: the default rule `down` watches every target");
    }
    let mut summary = AlertSummary::default();
    let mut pause = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let warn = crate::ratelimit::RateLimit::new("alert evaluator error", Duration::from_secs(30));
    while !shutdown.is_cancelled() {
        match session(&pg, &alerts, &shutdown, &mut summary).await {
            Ok(()) => break,
            Err(e) => {
                crate::metrics::alert().active.set(0);
                crate::metrics::alert().evaluation_errors.inc();
                if let Some(suppressed) = warn.allow() {
                    tracing::warn!(error = %e, suppressed, retry_in = ?pause.peek(),
                                   "alert evaluator: PostgreSQL failed, starting over");
                }
                if !sleep_unless_stopped(&shutdown, pause.next_pause()).await {
                    break;
                }
            }
        }
    }
    crate::metrics::alert().active.set(0);
    tracing::info!(?summary, "alert stage stopped");
    Ok(summary)
}

async fn session(
    pg: &PostgresConfig,
    alerts: &Arc<AlertsConfig>,
    shutdown: &CancellationToken,
    summary: &mut AlertSummary,
) -> Result<(), AlertError> {
    let metrics = crate::metrics::alert();
    let mut client = crate::db::connect(pg).await?;
    crate::db::migrate(&mut client, &pg.schema).await?;
    let poll = alerts.evaluation_interval.min(Duration::from_secs(1));
    let mut waiting_logged = false;
    loop {
        let got: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext(current_schema()))",
                &[&LOCK_CLASS],
            )
            .await?
            .get(0);
        if got {
            break;
        }
        if !waiting_logged {
            tracing::info!("another alert evaluator is active; standing by");
            waiting_logged = true;
        }
        if !sleep_unless_stopped(shutdown, poll).await {
            return Ok(());
        }
    }
    summary.takeovers += 1;
    metrics.active.set(1);
    let mut ev = Evaluator::load(&mut client, alerts.clone()).await?;
    tracing::info!(
        rules = alerts.rules.len(),
        open = ev
            .incidents
            .values()
            .filter(|i| i.resolved_at.is_none())
            .count(),
        "alert evaluator active"
    );
    // A new webhook starts after the latest event: its cursor is created here, before the
    // first evaluation of this session can add events, so none falls between the two (its
    // task connects on its own and could otherwise start after them).
    for hook in &alerts.webhooks {
        store::cursor(&client, &hook.name).await?;
    }
    let (tx, rx) = watch::channel(Arc::new(ev.snapshot()));
    let workers = shutdown.child_token();
    let mut tasks = Vec::new();
    for am in &alerts.alertmanagers {
        tasks.push(tokio::spawn(deliver::alertmanager_task(
            alerts.clone(),
            am.clone(),
            rx.clone(),
            workers.clone(),
        )));
    }
    for hook in &alerts.webhooks {
        tasks.push(tokio::spawn(deliver::webhook_task(
            alerts.clone(),
            pg.clone(),
            hook.clone(),
            rx.clone(),
            workers.clone(),
        )));
    }
    // A stuck evaluation (a frozen server) ends the session: the connection is dropped, so the
    // lock is released and another evaluator can take over.
    let deadline = (alerts.evaluation_interval * 5).max(Duration::from_secs(30));
    let mut tick = tokio::time::interval(alerts.evaluation_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = tick.tick() => {}
        }
        let t0 = Instant::now();
        let r = tokio::time::timeout(deadline, ev.evaluate(&mut client, summary)).await;
        let r = r.unwrap_or(Err(AlertError::Timeout(deadline)));
        metrics
            .evaluation_seconds
            .observe(t0.elapsed().as_secs_f64());
        match r {
            Ok(changed) => {
                summary.evaluations += 1;
                metrics.evaluations.inc();
                metrics.incidents_open.set(
                    ev.incidents
                        .values()
                        .filter(|i| i.resolved_at.is_none())
                        .count() as i64,
                );
                if changed {
                    tx.send_replace(Arc::new(ev.snapshot()));
                }
            }
            Err(e) => break Err(e),
        }
    };
    workers.cancel();
    for t in tasks {
        // Each worker's request is bounded by REQUEST_TIMEOUT; it sees the cancellation then.
        let _ = tokio::time::timeout(deliver::REQUEST_TIMEOUT + Duration::from_secs(1), t).await;
    }
    metrics.active.set(0);
    result
}

/// `vantage-ingester alerts`: the open incidents, one line each.
pub async fn list(client: &Client) -> Result<Vec<Incident>, tokio_postgres::Error> {
    Ok(store::incidents(client, 0.0)
        .await?
        .into_iter()
        .filter(|i| i.resolved_at.is_none())
        .collect())
}

/// The table `vantage-ingester alerts` prints.
pub fn render(incidents: &[Incident]) -> String {
    if incidents.is_empty() {
        return "no open incidents\n".into();
    }
    let mut rows = vec![[
        "ID".to_owned(),
        "RULE".to_owned(),
        "SUBJECT".to_owned(),
        "SEVERITY".to_owned(),
        "SINCE".to_owned(),
        "FLAPPING".to_owned(),
        "SUMMARY".to_owned(),
    ]];
    for i in incidents {
        let subject = i
            .subject
            .target_name
            .clone()
            .or_else(|| i.subject.agent.clone())
            .or_else(|| i.subject.region.clone())
            .unwrap_or_else(|| i.subject.key.clone());
        rows.push([
            i.id.to_string(),
            i.rule.clone(),
            subject,
            i.severity.clone(),
            humantime::format_rfc3339_seconds(i.started_at).to_string(),
            if i.flapping { "yes" } else { "no" }.to_owned(),
            i.summary.clone(),
        ]);
    }
    crate::table::align(&rows)
}
