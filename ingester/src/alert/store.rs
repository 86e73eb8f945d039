//! The alert stage's tables (migration 0007): incidents, the event log, the evaluator's
//! per-subject counters and the webhook cursors. Every change of one evaluation is written in
//! one transaction, on the connection that holds the evaluator's advisory lock, so an
//! evaluator that lost the lock (its connection died) cannot write.

use std::collections::BTreeMap;
use std::time::SystemTime;

use tokio_postgres::{Client, GenericClient, Row};

use super::eval::Subject;
use super::state::{Detail, Track};
use crate::config::alerts::Kind;

/// An incident as delivered: what the Alertmanager labels, annotations and webhook bodies are
/// made of.
#[derive(Debug, Clone, PartialEq)]
pub struct Incident {
    pub id: i64,
    pub rule: String,
    pub kind: String,
    pub subject: Subject,
    pub severity: String,
    /// Regions involved when it opened (the `regions` label: stable for the incident's life,
    /// because labels identify an alert in Alertmanager).
    pub opened_regions: Vec<String>,
    /// Every region involved since, with what it saw last.
    pub regions: BTreeMap<String, String>,
    /// The current summary.
    pub summary: String,
    pub started_at: SystemTime,
    pub resolved_at: Option<SystemTime>,
    pub flapping: bool,
}

const INCIDENT_COLUMNS: &str = "incident_id, rule, kind, subject, target_id, target_name, region, \
     agent, severity, opened_regions, regions, last_summary, started_at, resolved_at, flapping";

fn json_map(v: serde_json::Value) -> BTreeMap<String, String> {
    match v {
        serde_json::Value::Object(m) => m
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, text)
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn to_json(m: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

fn incident(r: &Row) -> Incident {
    Incident {
        id: r.get(0),
        rule: r.get(1),
        kind: r.get(2),
        subject: Subject {
            key: r.get(3),
            target_id: r.get(4),
            target_name: r.get(5),
            region: r.get(6),
            agent: r.get(7),
        },
        severity: r.get(8),
        opened_regions: json_map(r.get(9)).into_keys().collect(),
        regions: json_map(r.get(10)),
        summary: r.get(11),
        started_at: r.get(12),
        resolved_at: r.get(13),
        flapping: r.get(14),
    }
}

/// Open incidents, and those resolved within `recent_secs` (Alertmanager still gets those).
pub async fn incidents(
    client: &impl GenericClient,
    recent_secs: f64,
) -> Result<Vec<Incident>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT {INCIDENT_COLUMNS} FROM alert_incidents
                  WHERE resolved_at IS NULL
                     OR resolved_at >= now() - make_interval(secs => $1)
                  ORDER BY incident_id"
            ),
            &[&recent_secs],
        )
        .await?;
    Ok(rows.iter().map(incident).collect())
}

/// The regions of each open incident's latest event (what the evaluator last reported).
pub async fn last_event_regions(
    client: &Client,
) -> Result<BTreeMap<i64, Vec<String>>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT DISTINCT ON (e.incident_id) e.incident_id, e.regions
               FROM alert_events AS e JOIN alert_incidents AS i USING (incident_id)
              WHERE i.resolved_at IS NULL
              ORDER BY e.incident_id, e.event_id DESC",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), json_map(r.get(1)).into_keys().collect()))
        .collect())
}

/// The remembered counters: (rule, subject) → track (without `open`, set by the caller).
pub async fn tracks(
    client: &Client,
) -> Result<BTreeMap<(String, String), Track>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT rule, subject, bad, good, history, flapping FROM alert_rule_state",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let history: String = r.get(4);
            (
                (r.get(0), r.get(1)),
                Track {
                    bad: r.get::<_, i32>(2).max(0) as u32,
                    good: r.get::<_, i32>(3).max(0) as u32,
                    history: Track::history_from(&history),
                    flapping: r.get(5),
                    open: None,
                    last_bad: None,
                },
            )
        })
        .collect())
}

/// One write of an evaluation.
#[derive(Debug, Clone)]
pub enum Write {
    Open {
        rule: String,
        kind: Kind,
        subject: Subject,
        severity: String,
        flapping: bool,
        detail: Detail,
    },
    Update {
        id: i64,
        detail: Detail,
    },
    Flapping {
        id: i64,
    },
    Resolve {
        id: i64,
        summary: String,
    },
}

/// Applies `writes` and the changed tracks (`keep`: upserted, `forget`: deleted) in one
/// transaction. Returns the ids of the opened incidents, in the order of the `Open` writes.
pub async fn apply(
    client: &mut Client,
    writes: &[Write],
    keep: &[(&str, &str, &Track)],
    forget: &[(&str, &str)],
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let mut opened = Vec::new();
    for w in writes {
        match w {
            Write::Open {
                rule,
                kind,
                subject,
                severity,
                flapping,
                detail,
            } => {
                let regions = to_json(&detail.regions);
                let summary = if *flapping {
                    format!("flapping: {}", detail.summary)
                } else {
                    detail.summary.clone()
                };
                let row = tx
                    .query_one(
                        "INSERT INTO alert_incidents (rule, kind, subject, target_id, target_name,
                                region, agent, severity, opened_regions, regions, reporting,
                                summary, last_summary, started_at, peak_regions, peak_value,
                                flapping)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11, $11, now(),
                                 $12, $13, $14)
                         RETURNING incident_id",
                        &[
                            rule,
                            &kind.as_str(),
                            &subject.key,
                            &subject.target_id,
                            &subject.target_name,
                            &subject.region,
                            &subject.agent,
                            severity,
                            &regions,
                            &(detail.reporting as i32),
                            &summary,
                            &(detail.regions.len() as i32),
                            &detail.value,
                            flapping,
                        ],
                    )
                    .await?;
                let id: i64 = row.get(0);
                event(&tx, id, "firing", &regions, &summary).await?;
                opened.push(id);
            }
            Write::Update { id, detail } => {
                let regions = to_json(&detail.regions);
                tx.execute(
                    "UPDATE alert_incidents
                        SET regions = regions || $2, last_summary = $3,
                            peak_regions = greatest(peak_regions, $4),
                            peak_value = CASE WHEN kind = 'cert_expiry'
                                              THEN least(peak_value, $5) ELSE greatest(peak_value, $5) END,
                            updated_at = now()
                      WHERE incident_id = $1",
                    &[
                        id,
                        &regions,
                        &detail.summary,
                        &(detail.regions.len() as i32),
                        &detail.value,
                    ],
                )
                .await?;
                event(&tx, *id, "updated", &regions, &detail.summary).await?;
            }
            Write::Flapping { id } => {
                let row = tx
                    .query_one(
                        "UPDATE alert_incidents
                            SET flapping = true, last_summary = 'flapping: ' || last_summary,
                                updated_at = now()
                          WHERE incident_id = $1
                         RETURNING regions, last_summary",
                        &[id],
                    )
                    .await?;
                let regions: serde_json::Value = row.get(0);
                let summary: String = row.get(1);
                event(&tx, *id, "flapping", &regions, &summary).await?;
            }
            Write::Resolve { id, summary } => {
                let row = tx
                    .query_one(
                        "UPDATE alert_incidents SET resolved_at = now(), updated_at = now()
                          WHERE incident_id = $1
                         RETURNING regions",
                        &[id],
                    )
                    .await?;
                let regions: serde_json::Value = row.get(0);
                event(&tx, *id, "resolved", &regions, summary).await?;
            }
        }
    }
    if !keep.is_empty() {
        let rules: Vec<&str> = keep.iter().map(|k| k.0).collect();
        let subjects: Vec<&str> = keep.iter().map(|k| k.1).collect();
        let bad: Vec<i32> = keep.iter().map(|k| k.2.bad as i32).collect();
        let good: Vec<i32> = keep.iter().map(|k| k.2.good as i32).collect();
        let history: Vec<String> = keep.iter().map(|k| k.2.history_text()).collect();
        let flapping: Vec<bool> = keep.iter().map(|k| k.2.flapping).collect();
        tx.execute(
            "INSERT INTO alert_rule_state (rule, subject, bad, good, history, flapping)
             SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::int[], $5::text[],
                                  $6::bool[])
             ON CONFLICT (rule, subject) DO UPDATE SET
                 bad = excluded.bad, good = excluded.good, history = excluded.history,
                 flapping = excluded.flapping, updated_at = now()",
            &[&rules, &subjects, &bad, &good, &history, &flapping],
        )
        .await?;
    }
    if !forget.is_empty() {
        let rules: Vec<&str> = forget.iter().map(|k| k.0).collect();
        let subjects: Vec<&str> = forget.iter().map(|k| k.1).collect();
        tx.execute(
            "DELETE FROM alert_rule_state AS s USING unnest($1::text[], $2::text[]) AS f(r, k)
              WHERE s.rule = f.r AND s.subject = f.k",
            &[&rules, &subjects],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(opened)
}

async fn event(
    tx: &tokio_postgres::Transaction<'_>,
    id: i64,
    event: &str,
    regions: &serde_json::Value,
    summary: &str,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO alert_events (incident_id, event, regions, summary) VALUES ($1, $2, $3, $4)",
        &[&id, &event, regions, &summary],
    )
    .await?;
    Ok(())
}

/// One event of the log, with its incident, for a webhook.
#[derive(Debug, Clone)]
pub struct Event {
    pub event_id: i64,
    pub event: String,
    pub at: SystemTime,
    pub regions: BTreeMap<String, String>,
    pub summary: String,
    pub idempotency_key: String,
    pub incident: Incident,
}

/// Events after `after`, oldest first, at most `limit`.
pub async fn events_after(
    client: &Client,
    after: i64,
    limit: i64,
) -> Result<Vec<Event>, tokio_postgres::Error> {
    let columns = INCIDENT_COLUMNS
        .split(", ")
        .map(|c| format!("i.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = client
        .query(
            &format!(
                "SELECT {columns}, e.event_id, e.event, e.at, e.regions, e.summary,
                        e.idempotency_key
                   FROM alert_events AS e JOIN alert_incidents AS i USING (incident_id)
                  WHERE e.event_id > $1
                  ORDER BY e.event_id
                  LIMIT $2"
            ),
            &[&after, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Event {
            incident: incident(r),
            event_id: r.get(15),
            event: r.get(16),
            at: r.get(17),
            regions: json_map(r.get(18)),
            summary: r.get(19),
            idempotency_key: r.get(20),
        })
        .collect())
}

/// The webhook's cursor; a new webhook starts after the latest event (no history replay).
pub async fn cursor(client: &Client, receiver: &str) -> Result<i64, tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO alert_webhook_cursors (receiver, delivered_through)
             SELECT $1, coalesce(max(event_id), 0) FROM alert_events
             ON CONFLICT (receiver) DO NOTHING",
            &[&receiver],
        )
        .await?;
    Ok(client
        .query_one(
            "SELECT delivered_through FROM alert_webhook_cursors WHERE receiver = $1",
            &[&receiver],
        )
        .await?
        .get(0))
}

/// Records that `receiver` has every event up to `event_id`.
pub async fn advance(
    client: &Client,
    receiver: &str,
    event_id: i64,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE alert_webhook_cursors SET delivered_through = greatest(delivered_through, $2),
                    updated_at = now()
              WHERE receiver = $1",
            &[&receiver, &event_id],
        )
        .await?;
    Ok(())
}
