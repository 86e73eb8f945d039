//! One rule's reads: the query of each kind and the verdict per subject it yields.
//!
//! Every read goes through the public SQL interface by column name: `vantage_alert_down` and
//! `vantage_alert_regions` (migration 0007, over `latest_status` and `targets`; since 0012 over
//! a partial index of failing rows and the pending writes' up flags, same answers),
//! `cert_expiry_by_region`, `region_comparison(window)`, `fleet` and `gaps`. Each is bounded by
//! the number of targets × regions (latest values) or by the rule's window, never by the length
//! of the history.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, SystemTime};

use tokio_postgres::Client;

use super::state::{Detail, Verdict};
use crate::config::alerts::{Kind, Rule};

/// What an incident is about, for its labels and its row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Subject {
    /// The key within the rule: a target id, a region or an agent.
    pub key: String,
    pub target_id: Option<i32>,
    pub target_name: Option<String>,
    pub region: Option<String>,
    pub agent: Option<String>,
}

/// A subject and what this evaluation says of it.
pub type Finding = (Subject, Verdict);

fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

fn opt<T: Clone>(v: &[T]) -> Option<Vec<T>> {
    (!v.is_empty()).then(|| v.to_vec())
}

/// "eu-north, us-east (2 of 3 regions)".
fn regions_phrase(regions: &BTreeMap<String, String>, reporting: u32) -> String {
    let names: Vec<&str> = regions.keys().map(String::as_str).collect();
    let noun = if reporting == 1 { "region" } else { "regions" };
    format!(
        "{} ({} of {reporting} {noun})",
        names.join(", "),
        regions.len()
    )
}

/// Distinct values of `regions`, in order of first appearance by region.
fn distinct_values(regions: &BTreeMap<String, String>) -> String {
    let mut seen = Vec::new();
    for v in regions.values() {
        if !seen.contains(&v.as_str()) {
            seen.push(v.as_str());
        }
    }
    seen.join(", ")
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Evaluates `rule`; `tracked` are the subject keys the evaluator remembers for it (each gets
/// a verdict even when its data went quiet).
pub async fn evaluate(
    client: &Client,
    rule: &Rule,
    tracked: &HashSet<String>,
    forget_after: Duration,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    match rule.kind {
        Kind::Down => down(client, rule, tracked).await,
        Kind::NoData => no_data(client, rule, tracked, forget_after).await,
        Kind::ProbeStale => probe_stale(client, rule, tracked, forget_after).await,
        Kind::Gaps => gaps(client, rule, tracked).await,
        Kind::CertExpiry => cert_expiry(client, rule, tracked).await,
        Kind::Slow => slow(client, rule, tracked).await,
    }
}

fn target_subject(id: i32, name: Option<String>) -> Subject {
    Subject {
        key: id.to_string(),
        target_id: Some(id),
        target_name: name,
        ..Subject::default()
    }
}

/// An agent of `region` (unknown for one only remembered), keyed by the agent.
fn agent_subject(agent: &str, region: Option<&str>) -> Subject {
    Subject {
        key: agent.to_owned(),
        region: region.map(str::to_owned),
        agent: Some(agent.to_owned()),
        ..Subject::default()
    }
}

fn region_subject(region: &str) -> Subject {
    Subject {
        key: region.to_owned(),
        region: Some(region.to_owned()),
        ..Subject::default()
    }
}

/// Bad in one region (or of one agent, in `region`), which saw `what`.
fn bad_in(
    region: &str,
    what: String,
    reporting: u32,
    value: Option<f64>,
    summary: String,
) -> Verdict {
    Verdict::Bad(Detail {
        regions: BTreeMap::from([(region.to_owned(), what)]),
        reporting,
        value,
        summary,
    })
}

/// `verdict` for each key the evaluator tracks that this evaluation did not see (`subject`
/// makes its subject): a subject that went quiet still gets an answer.
fn unseen(
    out: &mut Vec<Finding>,
    tracked: &HashSet<String>,
    seen: &BTreeSet<String>,
    verdict: Verdict,
    subject: impl Fn(&str) -> Subject,
) {
    for key in tracked.iter().filter(|k| !seen.contains(*k)) {
        out.push((subject(key), verdict.clone()));
    }
}

async fn down(
    client: &Client,
    rule: &Rule,
    tracked: &HashSet<String>,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let tracked_ids: Vec<i32> = tracked.iter().filter_map(|k| k.parse().ok()).collect();
    let rows = client
        .query(
            "SELECT target_id, target_name, retired, reporting, failing, failing_regions,
                    failing_outcomes
               FROM vantage_alert_down($1::text::interval, $2, $3, $4, $5)",
            &[
                &interval(rule.stale_after),
                &opt(&rule.target_ids),
                &opt(&rule.target_names),
                &opt(&rule.regions),
                &tracked_ids,
            ],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id: i32 = r.get(0);
        let retired: Option<bool> = r.get(2);
        let reporting = r.get::<_, i32>(3).max(0) as u32;
        let failing = r.get::<_, i32>(4).max(0) as u32;
        let regions: Vec<String> = r.get(5);
        let outcomes: Vec<String> = r.get(6);
        let subject = target_subject(id, r.get(1));
        let verdict = if retired == Some(true) {
            // A retired target is nobody's outage any more.
            Verdict::Good
        } else if rule.agree(failing, reporting) {
            let regions: BTreeMap<String, String> = regions.into_iter().zip(outcomes).collect();
            let summary = format!(
                "down from {}: {}",
                regions_phrase(&regions, reporting),
                distinct_values(&regions)
            );
            Verdict::Bad(Detail {
                regions,
                reporting,
                value: None,
                summary,
            })
        } else if reporting == 0 {
            Verdict::Unknown
        } else {
            Verdict::Good
        };
        out.push((subject, verdict));
    }
    Ok(out)
}

/// The rows of `sql`, a read of the rules about silence: `$1` the rule's `stale_after`, `$2`
/// `forget_after` (older subjects are forgotten), `$3` its regions (NULL: every region).
async fn silence_rows(
    client: &Client,
    sql: &str,
    rule: &Rule,
    forget_after: Duration,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let (stale, forget) = (interval(rule.stale_after), interval(forget_after));
    client
        .query(sql, &[&stale, &forget, &opt(&rule.regions)])
        .await
}

async fn no_data(
    client: &Client,
    rule: &Rule,
    tracked: &HashSet<String>,
    forget_after: Duration,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let sql = "SELECT region, last_result, fresh_targets, targets
                 FROM vantage_alert_regions($1::text::interval, $2::text::interval, $3)";
    let (mut seen, mut out) = (BTreeSet::new(), Vec::new());
    for r in silence_rows(client, sql, rule, forget_after).await? {
        let region: String = r.get(0);
        let last: SystemTime = r.get(1);
        let fresh: i32 = r.get(2);
        let targets: i32 = r.get(3);
        let verdict = if fresh == 0 {
            let since = rfc3339(last);
            let summary = format!(
                "no data from region {region} since {since} ({targets} targets not probed)"
            );
            bad_in(&region, format!("silent since {since}"), 0, None, summary)
        } else {
            Verdict::Good
        };
        out.push((region_subject(&region), verdict));
        seen.insert(region);
    }
    // A tracked region not heard of within forget_after is forgotten: its alert resolves.
    unseen(&mut out, tracked, &seen, Verdict::Good, region_subject);
    Ok(out)
}

async fn probe_stale(
    client: &Client,
    rule: &Rule,
    tracked: &HashSet<String>,
    forget_after: Duration,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let sql = "SELECT agent, region, status, last_seen, last_seen < now() - $1::text::interval
                 FROM fleet
                WHERE last_seen >= now() - $2::text::interval
                  AND ($3::text[] IS NULL OR region = ANY ($3))";
    let (mut seen, mut out) = (BTreeSet::new(), Vec::new());
    for r in silence_rows(client, sql, rule, forget_after).await? {
        let agent: String = r.get(0);
        let region: String = r.get(1);
        let status: Option<String> = r.get(2);
        let last_seen: SystemTime = r.get(3);
        let old: bool = r.get(4);
        let status = status.unwrap_or_default();
        // An agent that said goodbye (offline) is as silent as one that died (stale).
        let verdict = if old || status == "offline" {
            let summary = format!(
                "agent {agent} ({region}) silent since {} ({status})",
                rfc3339(last_seen)
            );
            bad_in(&region, status, 0, None, summary)
        } else {
            Verdict::Good
        };
        out.push((agent_subject(&agent, Some(&region)), verdict));
        seen.insert(agent);
    }
    unseen(&mut out, tracked, &seen, Verdict::Good, |a| {
        agent_subject(a, None)
    });
    Ok(out)
}

async fn gaps(
    client: &Client,
    rule: &Rule,
    tracked: &HashSet<String>,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    // `gaps` is small (a row per overflow of an agent's buffer) and kept for the raw
    // retention; ingested_at is when the loss became known.
    let rows = client
        .query(
            "SELECT agent, min(region), sum(dropped)::bigint, min(first_started_at),
                    max(last_started_at)
               FROM gaps
              WHERE ingested_at >= now() - $1::text::interval
                AND ($2::text[] IS NULL OR region = ANY ($2))
              GROUP BY agent",
            &[&interval(rule.window), &opt(&rule.regions)],
        )
        .await?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for r in rows {
        let agent: String = r.get(0);
        let region: String = r.get(1);
        let dropped: i64 = r.get(2);
        let first: SystemTime = r.get(3);
        let last: SystemTime = r.get(4);
        let summary = format!(
            "agent {agent} ({region}) dropped {dropped} results probed between {} and {}",
            rfc3339(first),
            rfc3339(last)
        );
        let verdict = bad_in(
            &region,
            format!("{dropped} dropped"),
            1,
            Some(dropped as f64),
            summary,
        );
        out.push((agent_subject(&agent, Some(&region)), verdict));
        seen.insert(agent);
    }
    unseen(&mut out, tracked, &seen, Verdict::Good, |a| {
        agent_subject(a, None)
    });
    Ok(out)
}

/// Whether target `id` (named `name`) is one `rule` selects.
fn selects(rule: &Rule, id: i32, name: Option<&str>) -> bool {
    (rule.target_ids.is_empty() && rule.target_names.is_empty())
        || rule.target_ids.contains(&id)
        || name.is_some_and(|n| rule.target_names.iter().any(|x| x == n))
}

fn region_selected(rule: &Rule, region: &str) -> bool {
    rule.regions.is_empty() || rule.regions.iter().any(|r| r == region)
}

/// Per target: (name, reporting regions, bad regions with their value).
type PerTarget = BTreeMap<i32, (Option<String>, u32, BTreeMap<String, (String, f64)>)>;

/// Counts `region` as reporting on target `id` in `per`; the target's bad regions, to add to.
/// None when `rule` selects neither the target (by id or by its name in `names`) nor the region.
fn reporting<'p>(
    rule: &Rule,
    names: &BTreeMap<i32, String>,
    per: &'p mut PerTarget,
    id: i32,
    region: &str,
) -> Option<&'p mut BTreeMap<String, (String, f64)>> {
    let name = names.get(&id).cloned();
    if !selects(rule, id, name.as_deref()) || !region_selected(rule, region) {
        return None;
    }
    let e = per.entry(id).or_insert_with(|| (name, 0, BTreeMap::new()));
    e.1 += 1;
    Some(&mut e.2)
}

fn verdicts(rule: &Rule, per: PerTarget, tracked: &HashSet<String>, what: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (id, (name, reporting, bad)) in per {
        seen.insert(id.to_string());
        let failing = bad.len() as u32;
        let subject = target_subject(id, name);
        let verdict = if rule.agree(failing, reporting) {
            let peak = bad.values().map(|(_, v)| *v).fold(f64::NAN, |a, b| {
                if what == "slow" {
                    a.max(b)
                } else {
                    a.min(b)
                }
            });
            let regions: BTreeMap<String, String> =
                bad.into_iter().map(|(r, (text, _))| (r, text)).collect();
            let names: Vec<String> = regions.iter().map(|(r, t)| format!("{r} ({t})")).collect();
            Verdict::Bad(Detail {
                summary: format!(
                    "{what} from {} ({} of {reporting} regions)",
                    names.join(", "),
                    regions.len()
                ),
                regions,
                reporting,
                value: Some(peak),
            })
        } else if reporting == 0 {
            Verdict::Unknown
        } else {
            Verdict::Good
        };
        out.push((subject, verdict));
    }
    unseen(&mut out, tracked, &seen, Verdict::Unknown, |key| {
        target_subject(key.parse().unwrap_or(0), None)
    });
    out
}

async fn target_names(client: &Client) -> Result<BTreeMap<i32, String>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT target_id, name FROM targets WHERE name IS NOT NULL AND retired_at IS NULL",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

async fn cert_expiry(
    client: &Client,
    rule: &Rule,
    tracked: &HashSet<String>,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT target_id, region, extract(epoch FROM remaining)::float8 / 86400
               FROM cert_expiry_by_region
              WHERE seen_at >= now() - $1::text::interval",
            &[&interval(rule.stale_after)],
        )
        .await?;
    let names = target_names(client).await?;
    let mut per: PerTarget = BTreeMap::new();
    for r in rows {
        let id: i32 = r.get(0);
        let region: String = r.get(1);
        let days: f64 = r.get(2);
        if let Some(bad) = reporting(rule, &names, &mut per, id, &region) {
            if days < f64::from(rule.days) {
                bad.insert(region, (format!("{days:.1} days left"), days));
            }
        }
    }
    Ok(verdicts(rule, per, tracked, "certificate expiring"))
}

async fn slow(
    client: &Client,
    rule: &Rule,
    tracked: &HashSet<String>,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let column = match rule.percentile {
        p if p <= 0.5 => "p50_ms",
        p if p <= 0.95 => "p95_ms",
        _ => "p99_ms",
    };
    let label = column.trim_end_matches("_ms");
    let single = match (rule.target_ids.as_slice(), rule.target_names.is_empty()) {
        ([one], true) => Some(*one),
        _ => None,
    };
    let rows = client
        .query(
            &format!(
                "SELECT target_id, region, {column} FROM region_comparison($1::text::interval, $2)
                  WHERE probes > 0"
            ),
            &[&interval(rule.window), &single],
        )
        .await?;
    let names = target_names(client).await?;
    let threshold_ms = rule.threshold.as_secs_f64() * 1000.0;
    let mut per: PerTarget = BTreeMap::new();
    for r in rows {
        let id: i32 = r.get(0);
        let region: String = r.get(1);
        let ms: Option<f64> = r.get(2);
        let Some(bad) = reporting(rule, &names, &mut per, id, &region) else {
            continue;
        };
        if let Some(ms) = ms.filter(|ms| *ms > threshold_ms) {
            bad.insert(
                region,
                (format!("{label} {ms:.0} ms > {threshold_ms:.0} ms"), ms),
            );
        }
    }
    Ok(verdicts(rule, per, tracked, "slow"))
}
