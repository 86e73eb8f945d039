//! What each page shows, read from PostgreSQL through the SQL interface only (docs/sql.md:
//! `region_comparison`, `latest_status`, `cert_expiry_by_region`, `fleet`, `results`, the
//! incident table `alert_incidents`, and the `web_*` functions of migration 0008), as plain
//! structs that serialise to the pages' JSON twins (`/api/...`). Every query is bounded: a
//! fixed window of at most 90 days and a LIMIT, on a connection with a statement timeout.

use std::collections::BTreeMap;

use serde::Serialize;
use tokio_postgres::Client;

/// Most targets, regions, agents and incidents a page lists.
pub const MAX_TARGETS: i64 = 1000;
pub const MAX_REGIONS: usize = 100;
pub const MAX_AGENTS: i64 = 1000;
pub const MAX_INCIDENTS: i64 = 200;
/// Failures listed on a target page (from the last 24 hours).
pub const MAX_FAILURES: i64 = 50;
/// Days of uptime bars on the status page.
pub const UPTIME_DAYS: i32 = 90;

/// A window a page can show: the only values accepted from a query string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    pub name: &'static str,
    pub secs: u64,
}

pub const WINDOWS: &[Window] = &[
    Window {
        name: "1h",
        secs: 3_600,
    },
    Window {
        name: "6h",
        secs: 6 * 3_600,
    },
    Window {
        name: "24h",
        secs: 86_400,
    },
    Window {
        name: "7d",
        secs: 7 * 86_400,
    },
    Window {
        name: "30d",
        secs: 30 * 86_400,
    },
    Window {
        name: "90d",
        secs: 90 * 86_400,
    },
];

impl Window {
    pub fn parse(s: &str) -> Option<Window> {
        WINDOWS.iter().copied().find(|w| w.name == s)
    }

    pub fn default_window() -> Window {
        WINDOWS[2]
    }

    /// As a PostgreSQL interval literal.
    fn interval(&self) -> String {
        format!("{} seconds", self.secs)
    }

    /// Which level of the storage answers it (web_resolution in 0008).
    pub fn resolution(&self) -> &'static str {
        match self.secs {
            s if s <= 6 * 3_600 => "raw",
            s if s <= 7 * 86_400 => "1h",
            _ => "1d",
        }
    }
}

/// What a page decides about one target from one region right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Up,
    Down,
    /// Answering now, but below `degraded_below` % over the last 24 hours.
    Degraded,
    /// No result from that region within `stale_after`.
    NoData,
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::Degraded => "degraded",
            State::NoData => "no_data",
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::Degraded => "degraded",
            State::NoData => "no data",
        }
    }
}

/// The settings that shape what the pages decide.
#[derive(Debug, Clone)]
pub struct Judgement {
    pub stale_after_s: f64,
    pub degraded_below: f64,
    pub public: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Incident {
    pub id: i64,
    pub rule: String,
    pub kind: String,
    pub target_id: Option<i32>,
    pub target_name: Option<String>,
    pub region: Option<String>,
    pub agent: Option<String>,
    pub severity: String,
    /// Regions (agents for agent rules) involved since it opened, with what each saw last.
    pub regions: BTreeMap<String, String>,
    pub summary: String,
    pub started_at: f64,
    pub resolved_at: Option<f64>,
    pub flapping: bool,
}

const INCIDENT_COLUMNS: &str = "incident_id, rule, kind, target_id, target_name, region, agent, \
     severity, regions, last_summary, extract(epoch FROM started_at)::float8, \
     extract(epoch FROM resolved_at)::float8, flapping";

fn incident(r: &tokio_postgres::Row, public: bool) -> Incident {
    let regions: serde_json::Value = r.get(8);
    let regions = regions
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    Incident {
        id: r.get(0),
        rule: r.get(1),
        kind: r.get(2),
        target_id: r.get(3),
        target_name: r.get(4),
        region: r.get(5),
        // Agent names are part of the fleet, which a public page does not show.
        agent: if public { None } else { r.get(6) },
        severity: r.get(7),
        regions,
        summary: r.get(9),
        started_at: r.get(10),
        resolved_at: r.get(11),
        flapping: r.get(12),
    }
}

/// Whether a page shows incident `i`: a public page leaves out the agent rules' incidents
/// (`probe_stale`, `gaps`), which are about the fleet and name agents.
fn shown(i: &Incident, public: bool) -> bool {
    !(public && matches!(i.kind.as_str(), "probe_stale" | "gaps"))
}

/// A target as the pages name it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetName {
    pub id: i32,
    /// From the central definition (`targets apply`); None for a target only seen in results.
    pub name: Option<String>,
    /// None in public mode.
    pub url: Option<String>,
}

impl TargetName {
    pub fn display(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("target {}", self.id))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub region: String,
    pub state: State,
    /// The latest outcome from this region and its age in seconds.
    pub outcome: Option<String>,
    pub age_s: Option<f64>,
    pub availability_24h: Option<f64>,
    pub availability_7d: Option<f64>,
    pub availability_30d: Option<f64>,
    pub p95_ms_24h: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DayBar {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    pub probes: i64,
    pub up: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OverviewTarget {
    #[serde(flatten)]
    pub target: TargetName,
    /// Worst state over its regions (down > degraded > up > no data).
    pub state: State,
    /// One per region of [`Overview::regions`], in that order.
    pub cells: Vec<Cell>,
    pub availability_24h: Option<f64>,
    pub availability_7d: Option<f64>,
    pub availability_30d: Option<f64>,
    /// The last [`UPTIME_DAYS`] UTC days, oldest first, every region together; a day without
    /// probes has `probes` 0.
    pub days: Vec<DayBar>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    pub generated_at: f64,
    pub regions: Vec<String>,
    pub open_incidents: Vec<Incident>,
    pub targets: Vec<OverviewTarget>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

fn pct(up: i64, probes: i64) -> Option<f64> {
    (probes > 0).then(|| 100.0 * up as f64 / probes as f64)
}

async fn now(client: &Client) -> Result<f64, DataError> {
    Ok(client
        .query_one("SELECT extract(epoch FROM now())::float8", &[])
        .await?
        .get(0))
}

async fn targets(client: &Client, public: bool) -> Result<Vec<TargetName>, DataError> {
    let rows = client
        .query(
            "SELECT target_id, name, url FROM targets WHERE retired_at IS NULL
              ORDER BY target_id LIMIT $1",
            &[&MAX_TARGETS],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TargetName {
            id: r.get(0),
            name: r.get(1),
            url: if public { None } else { r.get(2) },
        })
        .collect())
}

/// (target, region) → (outcome, age in s), from `latest_status`.
type Latest = BTreeMap<(i32, String), (String, f64)>;

async fn latest(client: &Client, target: Option<i32>) -> Result<Latest, DataError> {
    let rows = client
        .query(
            "SELECT target_id, region, outcome, extract(epoch FROM age)::float8 FROM latest_status
              WHERE $1::int IS NULL OR target_id = $1 LIMIT 100000",
            &[&target],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect())
}

fn judge(j: &Judgement, latest: Option<&(String, f64)>, availability_24h: Option<f64>) -> State {
    match latest {
        None => State::NoData,
        Some((_, age)) if *age > j.stale_after_s => State::NoData,
        Some((outcome, _)) if outcome != "up" => State::Down,
        Some(_) if availability_24h.is_some_and(|a| a < j.degraded_below) => State::Degraded,
        Some(_) => State::Up,
    }
}

fn worst(states: impl Iterator<Item = State>) -> State {
    let rank = |s: &State| match s {
        State::Down => 3,
        State::Degraded => 2,
        State::Up => 1,
        State::NoData => 0,
    };
    states.max_by_key(rank).unwrap_or(State::NoData)
}

/// A target id (or NULL) as SQL text. Windows and ids are spliced into the statements as
/// literals, never taken from a request as text: an interval or id passed as a parameter keeps
/// the planner from pruning the functions' branches and partitions to the window, which made
/// `region_comparison` 9x slower (1.46 s against 0.16 s over 24 hours of 200 targets, measured).
fn literal(target: Option<i32>) -> String {
    target.map_or_else(|| "NULL".to_owned(), |t| t.to_string())
}

/// One row of `region_comparison`.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub target_id: i32,
    pub region: String,
    pub probes: i64,
    pub availability_pct: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub top_error: Option<String>,
}

async fn comparison(
    client: &Client,
    window: Window,
    target: Option<i32>,
) -> Result<Vec<Comparison>, DataError> {
    let rows = client
        .query(
            &format!(
                "SELECT target_id, region, probes, availability_pct, p50_ms, p90_ms, p95_ms,
                        p99_ms, top_error
                   FROM region_comparison(interval '{}', {}) LIMIT 100000",
                window.interval(),
                literal(target)
            ),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Comparison {
            target_id: r.get(0),
            region: r.get(1),
            probes: r.get(2),
            availability_pct: r.get(3),
            p50_ms: r.get(4),
            p90_ms: r.get(5),
            p95_ms: r.get(6),
            p99_ms: r.get(7),
            top_error: r.get(8),
        })
        .collect())
}

/// (target, region) → [(day number, probes, up)] oldest first, from `web_daily`.
type Daily = BTreeMap<(i32, String), Vec<(i64, i64, i64)>>;

async fn daily(client: &Client, target: Option<i32>) -> Result<Daily, DataError> {
    let rows = client
        .query(
            &format!(
                "SELECT target_id, region,
                        ARRAY(SELECT (d - date '1970-01-01')::int8 FROM unnest(day) AS d),
                        probes, up
                   FROM web_daily({UPTIME_DAYS}, {}) LIMIT 100000",
                literal(target)
            ),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let days: Vec<i64> = r.get(2);
            let probes: Vec<i64> = r.get(3);
            let up: Vec<i64> = r.get(4);
            let v = days
                .into_iter()
                .zip(probes)
                .zip(up)
                .map(|((d, p), u)| (d, p, u))
                .collect();
            ((r.get(0), r.get(1)), v)
        })
        .collect())
}

/// (probes, up) of the days from `since_day` on.
fn since(days: Option<&Vec<(i64, i64, i64)>>, since_day: i64) -> (i64, i64) {
    days.into_iter()
        .flatten()
        .filter(|(d, _, _)| *d >= since_day)
        .fold((0, 0), |(p, u), (_, pp, uu)| (p + pp, u + uu))
}

async fn open_incidents(client: &Client, public: bool) -> Result<Vec<Incident>, DataError> {
    let rows = client
        .query(
            &format!(
                "SELECT {INCIDENT_COLUMNS} FROM alert_incidents WHERE resolved_at IS NULL
                  ORDER BY started_at DESC LIMIT $1"
            ),
            &[&MAX_INCIDENTS],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| incident(r, public))
        .filter(|i| shown(i, public))
        .collect())
}

/// The overview / status page. `other` is a second connection (or the same one): the region
/// comparison runs there while the rest runs on `client`.
pub async fn overview(
    client: &Client,
    other: &Client,
    j: &Judgement,
) -> Result<Overview, DataError> {
    // Pipelined on one connection: tokio-postgres sends them all before the first answer.
    let (generated_at, names, latest, c24, days, incidents) = futures::try_join!(
        now(client),
        targets(client, j.public),
        latest(client, None),
        comparison(other, Window::default_window(), None),
        daily(client, None),
        open_incidents(client, j.public),
    )?;
    let mut regions: Vec<String> = latest.keys().map(|(_, r)| r.clone()).collect();
    regions.extend(c24.iter().map(|c| c.region.clone()));
    regions.sort();
    regions.dedup();
    regions.truncate(MAX_REGIONS);
    let c24: BTreeMap<(i32, String), &Comparison> = c24
        .iter()
        .map(|c| ((c.target_id, c.region.clone()), c))
        .collect();
    // Targets: every live definition, and ids that only appear in results.
    let mut all: BTreeMap<i32, TargetName> = names.into_iter().map(|t| (t.id, t)).collect();
    for (id, _) in latest.keys() {
        if all.len() as i64 >= MAX_TARGETS {
            break;
        }
        all.entry(*id).or_insert_with(|| TargetName {
            id: *id,
            name: None,
            url: None,
        });
    }
    let today = (generated_at / 86_400.0).floor() as i64;
    // The day that contains now() - 7 days (and 30): where region_comparison's windows of days start.
    let day7 = ((generated_at - 7.0 * 86_400.0) / 86_400.0).floor() as i64;
    let day30 = ((generated_at - 30.0 * 86_400.0) / 86_400.0).floor() as i64;
    let targets = all
        .into_values()
        .map(|target| {
            let id = target.id;
            let cells: Vec<Cell> = regions
                .iter()
                .map(|region| {
                    let key = (id, region.clone());
                    let day = c24.get(&key);
                    let a24 = day.and_then(|c| c.availability_pct);
                    let l = latest.get(&key);
                    let (p7, u7) = since(days.get(&key), day7);
                    let (p30, u30) = since(days.get(&key), day30);
                    Cell {
                        region: region.clone(),
                        state: judge(j, l, a24),
                        outcome: l.map(|(o, _)| o.clone()),
                        age_s: l.map(|(_, a)| *a),
                        availability_24h: a24,
                        availability_7d: pct(u7, p7),
                        availability_30d: pct(u30, p30),
                        p95_ms_24h: day.and_then(|c| c.p95_ms),
                    }
                })
                .collect();
            let (p24, u24) = regions
                .iter()
                .filter_map(|r| c24.get(&(id, r.clone())))
                .fold((0i64, 0f64), |(p, u), c| {
                    (
                        p + c.probes,
                        u + c.availability_pct.unwrap_or(0.0) * c.probes as f64 / 100.0,
                    )
                });
            let mut by_day: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
            let (mut p7, mut u7, mut p30, mut u30) = (0, 0, 0, 0);
            for r in &regions {
                for (d, p, u) in days.get(&(id, r.clone())).into_iter().flatten() {
                    let e = by_day.entry(*d).or_default();
                    e.0 += p;
                    e.1 += u;
                    if *d >= day7 {
                        p7 += p;
                        u7 += u;
                    }
                    if *d >= day30 {
                        p30 += p;
                        u30 += u;
                    }
                }
            }
            let bars = (0..i64::from(UPTIME_DAYS))
                .rev()
                .map(|back| {
                    let d = today - back;
                    let (probes, up) = by_day.get(&d).copied().unwrap_or((0, 0));
                    DayBar {
                        day: day_name(d),
                        probes,
                        up,
                    }
                })
                .collect();
            OverviewTarget {
                state: worst(cells.iter().map(|c| c.state)),
                availability_24h: (p24 > 0).then(|| 100.0 * u24 / p24 as f64),
                availability_7d: pct(u7, p7),
                availability_30d: pct(u30, p30),
                cells,
                days: bars,
                target,
            }
        })
        .collect();
    Ok(Overview {
        generated_at,
        regions,
        open_incidents: incidents,
        targets,
    })
}

/// Days since 1970-01-01 → `YYYY-MM-DD` (Howard Hinnant's `civil_from_days`,
/// <https://howardhinnant.github.io/date_algorithms.html>).
pub fn day_name(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Latency per region for the chart: aligned arrays, as uPlot takes them.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Bucket starts, seconds since the epoch.
    pub buckets: Vec<f64>,
    pub series: Vec<LatencySeries>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencySeries {
    pub region: String,
    pub p50_ms: Vec<Option<f64>>,
    pub p95_ms: Vec<Option<f64>>,
}

/// Per region over the window: the phase medians and the outcome mix.
#[derive(Debug, Clone, Serialize)]
pub struct RegionDetail {
    pub region: String,
    pub probes: i64,
    pub up: i64,
    pub outcomes: BTreeMap<String, i64>,
    pub dns_ms: Option<f64>,
    pub connect_ms: Option<f64>,
    pub tls_ms: Option<f64>,
    pub ttfb_ms: Option<f64>,
    pub transfer_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub started_at: f64,
    pub region: String,
    /// None in public mode.
    pub agent: Option<String>,
    pub outcome: String,
    pub failed_phase: Option<String>,
    pub status: Option<i16>,
    /// None in public mode.
    pub remote_ip: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cert {
    pub region: String,
    pub not_after: f64,
    pub days_left: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RegionNow {
    pub region: String,
    pub state: State,
    pub outcome: Option<String>,
    pub age_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetPage {
    pub generated_at: f64,
    #[serde(flatten)]
    pub target: TargetName,
    pub window: Window,
    /// `raw`, `1h` or `1d`: what the chart's points are read from.
    pub resolution: &'static str,
    pub now: Vec<RegionNow>,
    pub comparison: Vec<Comparison>,
    pub latency: Latency,
    pub regions: Vec<RegionDetail>,
    pub failures: Vec<Failure>,
    pub certificates: Vec<Cert>,
    pub incidents: Vec<Incident>,
}

/// The target page; None when the target is unknown (no definition and no result).
/// `other` may be `client`; when it is a second connection, the latency chart (the longest read)
/// runs there while the rest is pipelined on `client`.
pub async fn target_page(
    client: &Client,
    other: &Client,
    j: &Judgement,
    id: i32,
    window: Window,
) -> Result<Option<TargetPage>, DataError> {
    let interval = window.interval();
    let name = async {
        let r = client
            .query_opt(
                "SELECT target_id, name, url FROM targets WHERE target_id = $1",
                &[&id],
            )
            .await?;
        Ok::<_, DataError>(r.map(|r| TargetName {
            id: r.get(0),
            name: r.get(1),
            url: if j.public { None } else { r.get(2) },
        }))
    };
    let latency = async {
        Ok::<_, DataError>(
            other
                .query(
                    &format!(
                        "SELECT extract(epoch FROM bucket)::float8, region, p50_ms, p95_ms
                           FROM web_latency({id}, interval '{interval}') LIMIT 100000"
                    ),
                    &[],
                )
                .await?,
        )
    };
    let detail = async {
        Ok::<_, DataError>(
            client
                .query(
                    &format!(
                        "SELECT region, probes, up, outcomes, dns_ms, connect_ms, tls_ms,
                                ttfb_ms, transfer_ms
                           FROM web_region_detail({id}, interval '{interval}') LIMIT {MAX_REGIONS}"
                    ),
                    &[],
                )
                .await?,
        )
    };
    let failures = async {
        Ok::<_, DataError>(
            client
                .query(
                    "SELECT extract(epoch FROM started_at)::float8, region, agent, outcome,
                            failed_phase, status, host(remote_ip)
                       FROM results
                      WHERE target_id = $1 AND started_at >= now() - interval '24 hours'
                        AND outcome <> 'up'
                      ORDER BY started_at DESC LIMIT $2",
                    &[&id, &MAX_FAILURES],
                )
                .await?,
        )
    };
    let certs = async {
        Ok::<_, DataError>(
            client
                .query(
                    "SELECT region, extract(epoch FROM not_after)::float8,
                            extract(epoch FROM remaining)::float8 / 86400
                       FROM cert_expiry_by_region WHERE target_id = $1 ORDER BY region LIMIT $2",
                    &[&id, &(MAX_REGIONS as i64)],
                )
                .await?,
        )
    };
    let incidents = async {
        Ok::<_, DataError>(
            client
                .query(
                    &format!(
                        "SELECT {INCIDENT_COLUMNS} FROM alert_incidents WHERE target_id = $1
                          ORDER BY started_at DESC LIMIT 20"
                    ),
                    &[&id],
                )
                .await?,
        )
    };
    let (generated_at, name, latest, c, c24, lat, det, fail, cert, inc) = futures::try_join!(
        now(client),
        name,
        latest(client, Some(id)),
        comparison(client, window, Some(id)),
        comparison(client, Window::default_window(), Some(id)),
        latency,
        detail,
        failures,
        certs,
        incidents,
    )?;
    if name.is_none() && latest.is_empty() && c.is_empty() {
        return Ok(None);
    }
    let target = name.unwrap_or(TargetName {
        id,
        name: None,
        url: None,
    });
    let mut regions: Vec<String> = latest.keys().map(|(_, r)| r.clone()).collect();
    regions.extend(c.iter().map(|c| c.region.clone()));
    regions.sort();
    regions.dedup();
    regions.truncate(MAX_REGIONS);
    let now_rows = regions
        .iter()
        .map(|region| {
            let l = latest.get(&(id, region.clone()));
            let a24 = c24
                .iter()
                .find(|c| &c.region == region)
                .and_then(|c| c.availability_pct);
            RegionNow {
                region: region.clone(),
                state: judge(j, l, a24),
                outcome: l.map(|(o, _)| o.clone()),
                age_s: l.map(|(_, a)| *a),
            }
        })
        .collect();
    // Aligned arrays: every bucket any region has, a null where a region has none.
    let mut buckets: Vec<f64> = lat.iter().map(|r| r.get::<_, f64>(0)).collect();
    buckets.sort_by(f64::total_cmp);
    buckets.dedup();
    let mut series: BTreeMap<String, LatencySeries> = BTreeMap::new();
    for r in &lat {
        let region: String = r.get(1);
        let Ok(ix) = buckets.binary_search_by(|b| b.total_cmp(&r.get::<_, f64>(0))) else {
            continue;
        };
        let s = series
            .entry(region.clone())
            .or_insert_with(|| LatencySeries {
                region,
                p50_ms: vec![None; buckets.len()],
                p95_ms: vec![None; buckets.len()],
            });
        s.p50_ms[ix] = r.get(2);
        s.p95_ms[ix] = r.get(3);
    }
    let regions_detail = det
        .iter()
        .map(|r| {
            let outcomes: serde_json::Value = r.get(3);
            RegionDetail {
                region: r.get(0),
                probes: r.get(1),
                up: r.get(2),
                outcomes: outcomes
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .map(|(k, v)| (k.clone(), v.as_i64().unwrap_or(0)))
                            .collect()
                    })
                    .unwrap_or_default(),
                dns_ms: r.get(4),
                connect_ms: r.get(5),
                tls_ms: r.get(6),
                ttfb_ms: r.get(7),
                transfer_ms: r.get(8),
            }
        })
        .collect();
    Ok(Some(TargetPage {
        generated_at,
        target,
        window,
        resolution: window.resolution(),
        now: now_rows,
        comparison: c,
        latency: Latency {
            buckets,
            series: series.into_values().collect(),
        },
        regions: regions_detail,
        failures: fail
            .iter()
            .map(|r| Failure {
                started_at: r.get(0),
                region: r.get(1),
                agent: if j.public { None } else { r.get(2) },
                outcome: r.get(3),
                failed_phase: r.get(4),
                status: r.get(5),
                remote_ip: if j.public { None } else { r.get(6) },
            })
            .collect(),
        certificates: cert
            .iter()
            .map(|r| Cert {
                region: r.get(0),
                not_after: r.get(1),
                days_left: r.get(2),
            })
            .collect(),
        incidents: inc.iter().map(|r| incident(r, j.public)).collect(),
    }))
}

/// The region × target heatmap.
#[derive(Debug, Clone, Serialize)]
pub struct Regions {
    pub generated_at: f64,
    pub window: Window,
    pub regions: Vec<String>,
    pub targets: Vec<TargetName>,
    /// One per (target, region) with data.
    pub cells: Vec<Comparison>,
}

pub async fn regions(client: &Client, j: &Judgement, window: Window) -> Result<Regions, DataError> {
    let (generated_at, names, cells) = futures::try_join!(
        now(client),
        targets(client, j.public),
        comparison(client, window, None),
    )?;
    let mut regions: Vec<String> = cells.iter().map(|c| c.region.clone()).collect();
    regions.sort();
    regions.dedup();
    regions.truncate(MAX_REGIONS);
    let mut all: BTreeMap<i32, TargetName> = names.into_iter().map(|t| (t.id, t)).collect();
    for c in &cells {
        if all.len() as i64 >= MAX_TARGETS {
            break;
        }
        all.entry(c.target_id).or_insert_with(|| TargetName {
            id: c.target_id,
            name: None,
            url: None,
        });
    }
    Ok(Regions {
        generated_at,
        window,
        regions,
        targets: all.into_values().collect(),
        cells,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Agent {
    pub agent: String,
    pub region: String,
    pub status: String,
    pub version: Option<String>,
    pub last_seen: Option<f64>,
    pub targets: Option<i32>,
    pub pending_results: Option<i32>,
    pub region_set_generation: Option<i64>,
    pub agent_set_generation: Option<i64>,
    pub rejected_scope: Option<String>,
    pub rejected_generation: Option<i64>,
    pub rejection: Option<String>,
    /// The agent's clock from its latest frame (migration 0013; all None before one came):
    /// synchronised, maximum error, time since boot, offset from the bridge's clock (ms,
    /// positive: ahead), the sink's flag (`offset`, `unsynced`, None: fine), when (epoch s).
    pub clock_synced: Option<bool>,
    pub clock_error_ms: Option<i32>,
    pub clock_boot_age_s: Option<i64>,
    pub clock_offset_ms: Option<i64>,
    pub clock_flag: Option<String>,
    pub clock_at: Option<f64>,
}

impl Agent {
    /// The fleet page's clock cell (the CLI's CLOCK column); empty before a clock state came.
    pub fn clock_summary(&self) -> String {
        match (self.clock_synced, self.clock_error_ms, self.clock_offset_ms) {
            (Some(synced), Some(error_ms), Some(offset_ms)) => crate::fleet::ClockLine {
                synced,
                error_ms,
                offset_ms,
                flag: self.clock_flag.clone(),
            }
            .summary(),
            _ => String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Fleet {
    pub generated_at: f64,
    pub agents: Vec<Agent>,
}

pub async fn fleet(client: &Client) -> Result<Fleet, DataError> {
    let (generated_at, rows) = futures::try_join!(now(client), async {
        Ok::<_, DataError>(
            client
                .query(
                    "SELECT agent, region, status, version, extract(epoch FROM last_seen)::float8,
                            targets, pending_results, region_set_generation,
                            agent_set_generation, rejected_scope, rejected_generation, rejection,
                            clock_synced, clock_error_ms, clock_boot_age_s, clock_offset_ms,
                            clock_flag, extract(epoch FROM clock_at)::float8
                       FROM fleet ORDER BY region, agent LIMIT $1",
                    &[&MAX_AGENTS],
                )
                .await?,
        )
    })?;
    Ok(Fleet {
        generated_at,
        agents: rows
            .iter()
            .map(|r| Agent {
                agent: r.get(0),
                region: r.get(1),
                status: r.get(2),
                version: r.get(3),
                last_seen: r.get(4),
                targets: r.get(5),
                pending_results: r.get(6),
                region_set_generation: r.get(7),
                agent_set_generation: r.get(8),
                rejected_scope: r.get(9),
                rejected_generation: r.get(10),
                rejection: r.get(11),
                clock_synced: r.get(12),
                clock_error_ms: r.get(13),
                clock_boot_age_s: r.get(14),
                clock_offset_ms: r.get(15),
                clock_flag: r.get(16),
                clock_at: r.get(17),
            })
            .collect(),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Incidents {
    pub generated_at: f64,
    pub open: Vec<Incident>,
    /// Resolved within the last 30 days, newest first.
    pub recent: Vec<Incident>,
}

pub async fn incidents(client: &Client, j: &Judgement) -> Result<Incidents, DataError> {
    let (generated_at, open, recent) =
        futures::try_join!(now(client), open_incidents(client, j.public), async {
            Ok::<_, DataError>(
                client
                    .query(
                        &format!(
                            "SELECT {INCIDENT_COLUMNS} FROM alert_incidents
                              WHERE resolved_at >= now() - interval '30 days'
                              ORDER BY resolved_at DESC LIMIT $1"
                        ),
                        &[&MAX_INCIDENTS],
                    )
                    .await?,
            )
        })?;
    Ok(Incidents {
        generated_at,
        open,
        recent: recent
            .iter()
            .map(|r| incident(r, j.public))
            .filter(|i| shown(i, j.public))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_named_in_utc() {
        assert_eq!(day_name(0), "1970-01-01");
        assert_eq!(day_name(19_782), "2024-02-29");
        assert_eq!(day_name(20_000), "2024-10-04");
    }

    #[test]
    fn windows_come_from_a_fixed_list() {
        assert_eq!(Window::parse("24h").map(|w| w.secs), Some(86_400));
        assert!(Window::parse("1000d").is_none());
        assert!(Window::parse("1 hour; DROP TABLE results").is_none());
        assert_eq!(Window::parse("6h").unwrap().resolution(), "raw");
        assert_eq!(Window::parse("7d").unwrap().resolution(), "1h");
        assert_eq!(Window::parse("30d").unwrap().resolution(), "1d");
    }

    #[test]
    fn states_follow_the_latest_result_and_its_age() {
        let j = Judgement {
            stale_after_s: 300.0,
            degraded_below: 99.0,
            public: false,
        };
        let l = |o: &str, age: f64| Some((o.to_owned(), age));
        assert_eq!(judge(&j, l("up", 1.0).as_ref(), Some(100.0)), State::Up);
        assert_eq!(
            judge(&j, l("timeout", 1.0).as_ref(), Some(100.0)),
            State::Down
        );
        assert_eq!(
            judge(&j, l("up", 1.0).as_ref(), Some(98.0)),
            State::Degraded
        );
        assert_eq!(judge(&j, l("timeout", 301.0).as_ref(), None), State::NoData);
        assert_eq!(judge(&j, None, None), State::NoData);
        assert_eq!(
            worst([State::Up, State::NoData, State::Down].into_iter()),
            State::Down
        );
    }
}
