//! Targets defined centrally: the targets file, its validation, and `targets apply | diff | list`.
//!
//! Flow of `apply`: [`TargetsFile::load`] (every check an agent would run, errors with file, line
//! and key; nothing is touched on error) → [`plan`] against PostgreSQL (stable ids: an explicit
//! `id`, else the live target of the same name, else the most recently retired one of that name,
//! else a live target with the same URL whose name left the file (a rename), else a new id) → one transaction that upserts `targets`, retires what left the file, records
//! the sets in `target_sets` and, if anything changed, a new generation in `target_applies` →
//! [`publish`]: every set as a retained postcard message (agent sets first, then region sets),
//! and an empty retained message for every scope that no longer exists.
//!
//! Publishing runs after the commit: PostgreSQL is the record of what should be live, and
//! `apply` republishes every set each time, so running it again repairs a failed publish.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Deserialize;
use tokio_postgres::Client;
use toml::Spanned;
use vantage_common::target::RawTarget;
use vantage_proto::control::{
    encode_target_set, TargetSetHeader, TargetSpec, MAX_TARGETS, MAX_TARGET_SET_LEN,
};

use crate::config::MqttConfig;
use crate::db::DbError;

/// Why `targets apply | diff` could not go on.
#[derive(Debug, thiserror::Error)]
pub enum TargetsError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// A problem in the file, located.
    #[error("{file}:{line}: {key}: {reason}")]
    Invalid {
        file: PathBuf,
        line: usize,
        key: String,
        reason: String,
    },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("publishing target sets to MQTT failed: {0}")]
    Publish(String),
    /// `diff` only reads, so it does not apply migrations the database lacks.
    #[error("the database lacks migrations {}: run `vantage-ingester migrate` first (`targets diff` changes nothing)", .0.join(", "))]
    NotMigrated(Vec<&'static str>),
}

impl From<tokio_postgres::Error> for TargetsError {
    fn from(e: tokio_postgres::Error) -> Self {
        TargetsError::Db(DbError::from(e))
    }
}

/// The file as serde reads it, with spans to report lines.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Shape {
    regions: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    targets: Vec<Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>>,
}

/// Where a target runs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Placement {
    /// Every agent of these regions.
    Regions(Vec<String>),
    /// Exactly these agents, as (region, agent).
    Agents(Vec<(String, String)>),
}

/// One validated target of the file.
#[derive(Debug, Clone)]
pub struct FileTarget {
    /// 1-based line of its table (for messages).
    pub line: usize,
    pub id: Option<u32>,
    pub name: String,
    pub placement: Placement,
    /// Every probe setting, in wire form (id filled in by [`plan`]).
    pub spec: TargetSpec,
}

/// A validated targets file.
#[derive(Debug, Clone)]
pub struct TargetsFile {
    pub path: PathBuf,
    pub regions: Vec<String>,
    pub targets: Vec<FileTarget>,
}

/// 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

impl TargetsFile {
    /// Reads and validates a targets file.
    pub fn load(path: &Path) -> Result<TargetsFile, TargetsError> {
        let text = std::fs::read_to_string(path).map_err(|source| TargetsError::Read {
            file: path.to_owned(),
            source,
        })?;
        TargetsFile::parse(&text, path)
    }

    /// Validates TOML text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<TargetsFile, TargetsError> {
        let invalid = |at: usize, key: &str, reason: String| TargetsError::Invalid {
            file: path.to_owned(),
            line: line_of(text, at),
            key: key.to_owned(),
            reason,
        };
        let shape: Shape = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start);
            // The location is ours (file:line); of toml's reason the first line, values hidden
            // (header values are often tokens).
            let message = vantage_common::config_text::redact_toml_reason(
                e.message().lines().next().unwrap_or(""),
            );
            invalid(at, "syntax", message)
        })?;

        let mut regions: Vec<String> = Vec::new();
        if shape.regions.get_ref().is_empty() {
            return Err(invalid(
                shape.regions.span().start,
                "regions",
                "list at least one region".into(),
            ));
        }
        for r in shape.regions.get_ref() {
            vantage_common::config_text::check_name(r.get_ref())
                .map_err(|reason| invalid(r.span().start, "regions", reason))?;
            if regions.contains(r.get_ref()) {
                return Err(invalid(
                    r.span().start,
                    "regions",
                    format!("region {:?} listed twice", r.get_ref()),
                ));
            }
            regions.push(r.get_ref().clone());
        }

        let mut targets: Vec<FileTarget> = Vec::new();
        for (i, table) in shape.targets.iter().enumerate() {
            let at = table.span().start;
            let fields = table.get_ref();
            let key_at = |k: &str| {
                fields
                    .keys()
                    .find(|key| key.get_ref() == k)
                    .map_or(at, |key| key.span().start)
            };
            let get = |k: &str| {
                fields
                    .iter()
                    .find(|(key, _)| key.get_ref() == k)
                    .map(|(_, v)| v)
            };
            let name = match get("name").map(|v| v.get_ref()) {
                Some(toml::Value::String(s)) => s.clone(),
                Some(_) => {
                    return Err(invalid(
                        key_at("name"),
                        &format!("targets[{i}].name"),
                        "must be a string".into(),
                    ))
                }
                None => {
                    return Err(invalid(
                        at,
                        &format!("targets[{i}]"),
                        "missing key `name` (every target needs a unique name)".into(),
                    ))
                }
            };
            let label = format!("targets[{i}] ({name:?})");
            let bad = |k: &str, reason: String| invalid(key_at(k), &format!("{label}.{k}"), reason);
            if name.trim().is_empty()
                || name.len() > vantage_proto::control::MAX_NAME_LEN
                || name.chars().any(char::is_control)
            {
                return Err(bad(
                    "name",
                    format!(
                        "must be 1 to {} bytes without control characters",
                        vantage_proto::control::MAX_NAME_LEN
                    ),
                ));
            }
            if let Some(other) = targets.iter().find(|t| t.name == name) {
                return Err(bad(
                    "name",
                    format!(
                        "duplicate name (also used by the target at line {})",
                        other.line
                    ),
                ));
            }
            let id = match get("id").map(|v| v.get_ref()) {
                None => None,
                Some(toml::Value::Integer(n)) if (1..=i64::from(i32::MAX)).contains(n) => {
                    Some(*n as u32)
                }
                Some(_) => return Err(bad("id", format!("must be an integer 1..={}", i32::MAX))),
            };
            if let Some(id) = id {
                if let Some(other) = targets.iter().find(|t| t.id == Some(id)) {
                    return Err(bad(
                        "id",
                        format!(
                            "duplicate id {id} (also used by {:?} at line {})",
                            other.name, other.line
                        ),
                    ));
                }
            }
            let string_list = |k: &str| -> Result<Option<Vec<(usize, String)>>, TargetsError> {
                let Some(v) = get(k) else { return Ok(None) };
                let toml::Value::Array(items) = v.get_ref() else {
                    return Err(bad(k, "must be a list of strings".into()));
                };
                items
                    .iter()
                    .map(|item| match item {
                        toml::Value::String(s) => Ok((v.span().start, s.clone())),
                        _ => Err(bad(k, "must be a list of strings".into())),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some)
            };
            let placement = match (string_list("regions")?, string_list("agents")?) {
                (Some(_), Some(_)) => {
                    return Err(bad("agents", "set either `regions` or `agents` (pinned targets run on exactly those agents), not both".into()))
                }
                (None, None) => Placement::Regions(regions.clone()),
                (Some(list), None) => {
                    if list.is_empty() {
                        return Err(bad("regions", "empty list: remove the target instead, or leave `regions` out for all regions".into()));
                    }
                    let mut out = Vec::new();
                    for (_, r) in list {
                        if !regions.contains(&r) {
                            return Err(bad("regions", format!("unknown region {r:?} (the file's `regions` are {regions:?})")));
                        }
                        if !out.contains(&r) {
                            out.push(r);
                        }
                    }
                    Placement::Regions(out)
                }
                (None, Some(list)) => {
                    if list.is_empty() {
                        return Err(bad("agents", "empty list".into()));
                    }
                    let mut out = Vec::new();
                    for (_, entry) in list {
                        let Some((r, a)) = entry.split_once('/') else {
                            return Err(bad("agents", format!("{entry:?}: write agents as \"region/agent-id\"")));
                        };
                        if !regions.iter().any(|x| x == r) {
                            return Err(bad("agents", format!("{entry:?}: unknown region {r:?} (the file's `regions` are {regions:?})")));
                        }
                        vantage_common::config_text::check_name(a).map_err(|reason| bad("agents", format!("{entry:?}: {reason}")))?;
                        let pair = (r.to_owned(), a.to_owned());
                        if !out.contains(&pair) {
                            out.push(pair);
                        }
                    }
                    Placement::Agents(out)
                }
            };
            // The probe settings: exactly an agent's `[[targets]]` table, minus what only the
            // central file has.
            let mut probe = toml::Table::new();
            for (k, v) in fields {
                if !matches!(k.get_ref().as_str(), "id" | "regions" | "agents") {
                    probe.insert(k.get_ref().clone(), v.get_ref().clone());
                }
            }
            probe.insert("id".into(), toml::Value::Integer(0));
            let raw = RawTarget::deserialize(toml::Value::Table(probe)).map_err(|e| {
                let message = vantage_common::config_text::redact_toml_reason(e.message());
                // serde names the offending key in backticks: point at its line.
                let key = message.split('`').nth(1).unwrap_or("").to_owned();
                let k = if key.is_empty() { "" } else { key.as_str() };
                invalid(
                    key_at(k),
                    &format!("{label}{}{k}", if k.is_empty() { "" } else { "." }),
                    message.clone(),
                )
            })?;
            let spec = vantage_common::target_spec::check_portable(&raw)
                .map_err(|e| bad(e.key, e.reason))?;
            targets.push(FileTarget {
                line: line_of(text, at),
                id,
                name,
                placement,
                spec,
            });
        }
        let file = TargetsFile {
            path: path.to_owned(),
            regions,
            targets,
        };
        check_set_limits(&file)?;
        Ok(file)
    }
}

/// Where a set is published: a region (agent empty) or one agent of a region.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    pub region: String,
    /// Empty for the region's set.
    pub agent: String,
}

impl Scope {
    pub fn topic(&self, prefix: &str) -> String {
        use vantage_proto::topic::{Channel, Topic};
        if self.agent.is_empty() {
            Topic::region_targets(prefix, &self.region).to_string()
        } else {
            Topic::agent(prefix, Channel::Targets, &self.region, &self.agent).to_string()
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.agent.is_empty() {
            write!(f, "region {}", self.region)
        } else {
            write!(f, "agent {}/{}", self.region, self.agent)
        }
    }
}

/// The sets `placements` make (indexes into it, in order): one per region of the file, possibly
/// empty (its agents then probe nothing), and one per agent with pinned targets.
fn scopes_of<'a>(
    regions: &[String],
    placements: impl Iterator<Item = &'a Placement>,
) -> BTreeMap<Scope, Vec<usize>> {
    let mut sets: BTreeMap<Scope, Vec<usize>> = regions
        .iter()
        .map(|r| {
            (
                Scope {
                    region: r.clone(),
                    agent: String::new(),
                },
                Vec::new(),
            )
        })
        .collect();
    for (i, placement) in placements.enumerate() {
        let scopes: Vec<Scope> = match placement {
            Placement::Regions(rs) => rs
                .iter()
                .map(|r| Scope {
                    region: r.clone(),
                    agent: String::new(),
                })
                .collect(),
            Placement::Agents(agents) => agents
                .iter()
                .map(|(r, a)| Scope {
                    region: r.clone(),
                    agent: a.clone(),
                })
                .collect(),
        };
        for scope in scopes {
            sets.entry(scope).or_default().push(i);
        }
    }
    sets
}

/// The limits of every set the file makes: at most [`MAX_TARGETS`] targets and
/// [`MAX_TARGET_SET_LEN`] bytes. Ids are not known before `plan` (and the generation not before
/// `apply`), so each counts at its widest (a target without an explicit id as `i32::MAX`, the
/// generation as `u64::MAX`): whatever `apply` then publishes is as small or smaller, and
/// `targets check` and `apply` agree on every file.
fn check_set_limits(file: &TargetsFile) -> Result<(), TargetsError> {
    let too_big = |reason: String| TargetsError::Invalid {
        file: file.path.clone(),
        line: 1,
        key: "targets".into(),
        reason,
    };
    let widest: Vec<TargetSpec> = file
        .targets
        .iter()
        .map(|t| {
            let mut spec = t.spec.clone();
            spec.id = t.id.unwrap_or(i32::MAX as u32);
            spec
        })
        .collect();
    for (scope, members) in scopes_of(&file.regions, file.targets.iter().map(|t| &t.placement)) {
        if members.len() > MAX_TARGETS {
            return Err(too_big(format!(
                "{scope} would get {} targets; at most {MAX_TARGETS} per set",
                members.len()
            )));
        }
        encode_specs(members.iter().map(|&i| &widest[i]).collect(), u64::MAX)
            .map_err(|reason| too_big(format!("{scope}: {reason}")))?;
    }
    Ok(())
}

mod plan;

pub use plan::{load_state, plan, plan_from, Plan, Planned, Retiring, State, Stored};
use plan::{placement_columns, placement_from_row, placement_text};

/// What `apply` would change, without changing anything: no migrations, and the plan is made in
/// a read-only transaction.
pub async fn diff(client: &mut Client, file: &TargetsFile) -> Result<Plan, TargetsError> {
    let pending = crate::db::pending_migrations(client).await?;
    if !pending.is_empty() {
        return Err(TargetsError::NotMigrated(pending));
    }
    let tx = client.build_transaction().read_only(true).start().await?;
    let plan = plan(&tx, file).await?;
    tx.rollback().await?;
    Ok(plan)
}

/// The frame of one set.
fn encode_set(plan: &Plan, scope: &Scope, generation: u64) -> Result<Vec<u8>, String> {
    let ids = plan.sets.get(scope).cloned().unwrap_or_default();
    let specs: Vec<&TargetSpec> = ids
        .iter()
        .filter_map(|id| plan.all().find(|p| p.id == *id).map(|p| &p.spec))
        .collect();
    encode_specs(specs, generation)
}

/// A spec as `targets.spec` stores it and `plan` compares it: the fields of its postcard
/// struct, plus `kind` and `options` (target sets version 2) only when they are not `http` and
/// none, so the stored form of a target from before them is unchanged and the upgrade makes no
/// target look changed.
pub(crate) fn spec_json(spec: &TargetSpec) -> serde_json::Value {
    let mut json = serde_json::to_value(spec).unwrap_or_default();
    if let Some(fields) = json.as_object_mut() {
        if spec.kind != vantage_proto::ProbeKind::Http {
            fields.insert("kind".into(), spec.kind.as_str().into());
        }
        if !spec.options.is_empty() {
            let options = serde_json::to_value(&spec.options).unwrap_or_default();
            fields.insert("options".into(), options);
        }
    }
    json
}

/// A set frame of `specs` with `generation`; an error if it exceeds [`MAX_TARGET_SET_LEN`].
fn encode_specs(specs: Vec<&TargetSpec>, generation: u64) -> Result<Vec<u8>, String> {
    let header = TargetSetHeader {
        generation,
        count: specs.len() as u16,
    };
    let mut buf = vec![0u8; MAX_TARGET_SET_LEN];
    encode_target_set(&header, specs, &mut buf)
        .map(|f| f.to_vec())
        .map_err(|_| format!("the set is larger than {MAX_TARGET_SET_LEN} bytes (the broker's packet limit); split it over agents or shorten settings"))
}

/// What `apply` did.
#[derive(Debug, Clone)]
pub struct Applied {
    pub plan: Plan,
    /// Messages published (sets and clears).
    pub published: usize,
}

/// Applies `file`: PostgreSQL first (one transaction), then every set to the broker.
pub async fn apply(
    client: &mut Client,
    mqtt: &MqttConfig,
    file: &TargetsFile,
) -> Result<Applied, TargetsError> {
    // One apply at a time, from planning until its sets are on the broker: two overlapping
    // applies could otherwise publish out of order and leave agents on the older generation.
    // A session lock, so it is released if this process dies.
    client
        .execute(
            "SELECT pg_advisory_lock(hashtext('vantage-targets-apply'))",
            &[],
        )
        .await?;
    let result = apply_locked(client, mqtt, file).await;
    if let Err(e) = client
        .execute(
            "SELECT pg_advisory_unlock(hashtext('vantage-targets-apply'))",
            &[],
        )
        .await
    {
        tracing::warn!(error = %e, "cannot release the apply lock (it ends with this session)");
    }
    result
}

async fn apply_locked(
    client: &mut Client,
    mqtt: &MqttConfig,
    file: &TargetsFile,
) -> Result<Applied, TargetsError> {
    let tx = client.transaction().await?;
    let plan = plan(&tx, file).await?;
    if plan.new_generation {
        tx.execute(
            "INSERT INTO target_applies (generation, file, added, changed, retired)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &(plan.generation as i64),
                &file.path.display().to_string(),
                &(plan.added.len() as i32),
                &(plan.changed.len() as i32),
                &(plan.retired.len() as i32),
            ],
        )
        .await?;
    }
    let upsert = tx
        .prepare(
            "INSERT INTO targets (target_id, name, url, spec, regions, agents, kind_id, created_at,
                                  updated_at)
             VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7, now(), now())
             ON CONFLICT (target_id) DO UPDATE SET
                 name = excluded.name, url = excluded.url, spec = excluded.spec,
                 regions = excluded.regions, agents = excluded.agents, kind_id = excluded.kind_id,
                 created_at = coalesce(targets.created_at, excluded.created_at),
                 updated_at = now(), retired_at = NULL",
        )
        .await?;
    // Retire first: a new target may take the name of one that leaves.
    for r in &plan.retired {
        tx.execute(
            "UPDATE targets SET retired_at = now() WHERE target_id = $1",
            &[&(r.id as i32)],
        )
        .await?;
    }
    for p in plan.added.iter().chain(plan.changed.iter().map(|(p, _)| p)) {
        let (regions, agents) = placement_columns(&p.placement);
        let spec = spec_json(&p.spec).to_string();
        tx.execute(
            &upsert,
            &[
                &(p.id as i32),
                &p.name,
                &p.spec.url.as_str(),
                &spec,
                &regions,
                &agents,
                &i16::from(p.spec.kind.index()),
            ],
        )
        .await?;
    }
    for scope in &plan.cleared {
        tx.execute(
            "DELETE FROM target_sets WHERE region = $1 AND agent = $2",
            &[&scope.region, &scope.agent],
        )
        .await?;
    }
    let mut frames: Vec<(Scope, Vec<u8>)> = Vec::new();
    for (scope, ids) in &plan.sets {
        let frame = encode_set(&plan, scope, plan.generation).map_err(TargetsError::Publish)?;
        let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        tx.execute(
            "INSERT INTO target_sets (region, agent, generation, target_ids, bytes, published_at)
             VALUES ($1, $2, $3, $4, $5, now())
             ON CONFLICT (region, agent) DO UPDATE SET generation = excluded.generation,
                 target_ids = excluded.target_ids, bytes = excluded.bytes,
                 published_at = excluded.published_at",
            &[
                &scope.region,
                &scope.agent,
                &(plan.generation as i64),
                &ids,
                &(frame.len() as i32),
            ],
        )
        .await?;
        frames.push((scope.clone(), frame));
    }
    tx.commit().await?;

    // Agent sets before region sets (see the agent's uplink: an agent must not see a region set
    // newer than its own set), clears last.
    frames.sort_by_key(|(scope, _)| scope.agent.is_empty());
    let mut messages: Vec<(String, Vec<u8>)> = frames
        .into_iter()
        .map(|(scope, frame)| (scope.topic(&mqtt.topic_prefix), frame))
        .collect();
    messages.extend(
        plan.cleared
            .iter()
            .map(|s| (s.topic(&mqtt.topic_prefix), Vec::new())),
    );
    let published = messages.len();
    let kept: Vec<(String, Vec<u8>)> = messages
        .iter()
        .filter(|(_, payload)| !payload.is_empty())
        .cloned()
        .collect();
    let failed = |e: String| {
        TargetsError::Publish(format!(
            "{e}; PostgreSQL already holds generation {} — run `targets apply` again to republish",
            plan.generation
        ))
    };
    publish(mqtt, messages).await.map_err(failed)?;
    // An MQTT 3.1.1 broker acknowledges a publish its ACL refuses and drops it: read the
    // retained sets back before saying they are live.
    verify_retained(mqtt, &kept).await.map_err(failed)?;
    Ok(Applied { plan, published })
}

/// Subscribes to every topic of `expected` and checks the broker holds exactly that retained
/// payload on each (15 s at most).
pub async fn verify_retained(
    mqtt: &MqttConfig,
    expected: &[(String, Vec<u8>)],
) -> Result<(), String> {
    if expected.is_empty() {
        return Ok(());
    }
    let mut options = MqttOptions::new(
        format!("{}-verify-{}", mqtt.client_id, std::process::id()),
        &mqtt.host,
        mqtt.port,
    );
    options.set_clean_session(true);
    options.set_max_packet_size(MAX_TARGET_SET_LEN + 4096, MAX_TARGET_SET_LEN + 4096);
    if let Some(user) = &mqtt.username {
        options.set_credentials(user.clone(), mqtt.password.clone().unwrap_or_default());
    }
    crate::tls::mqtt_transport(&mut options, mqtt.tls.as_ref(), &mqtt.host);
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    client
        .try_subscribe_many(
            expected
                .iter()
                .map(|(t, _)| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)),
        )
        .map_err(|e| e.to_string())?;
    let mut missing: BTreeMap<&str, &[u8]> = expected
        .iter()
        .map(|(t, p)| (t.as_str(), p.as_slice()))
        .collect();
    let work = async {
        while !missing.is_empty() {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if p.retain => {
                    if missing.get(p.topic.as_str()) == Some(&p.payload.as_ref()) {
                        missing.remove(p.topic.as_str());
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack)))
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
                {
                    return Err("the broker refuses to let this identity read the target topics (it needs readwrite on <prefix>/v1/targets/#)".to_owned());
                }
                Ok(_) => {}
                Err(e) => return Err(format!("{}:{}: {e}", mqtt.host, mqtt.port)),
            }
        }
        Ok(())
    };
    let outcome = tokio::time::timeout(Duration::from_secs(15), work).await;
    let _ = client.try_disconnect();
    match outcome {
        Ok(result) => result,
        Err(_) => Err(format!(
            "the broker does not hold the published set on {} (acknowledged but dropped: is this identity allowed to publish there?)",
            missing.keys().copied().collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Publishes `messages` retained at QoS 1 and waits for every PUBACK (30 s at most).
pub async fn publish(mqtt: &MqttConfig, messages: Vec<(String, Vec<u8>)>) -> Result<(), String> {
    let mut options = MqttOptions::new(
        format!("{}-targets-{}", mqtt.client_id, std::process::id()),
        &mqtt.host,
        mqtt.port,
    );
    options.set_clean_session(true);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(MAX_TARGET_SET_LEN + 4096, MAX_TARGET_SET_LEN + 4096);
    if let Some(user) = &mqtt.username {
        options.set_credentials(user.clone(), mqtt.password.clone().unwrap_or_default());
    }
    crate::tls::mqtt_transport(&mut options, mqtt.tls.as_ref(), &mqtt.host);
    // Room for every request, so queuing them never waits for the event loop polled below.
    let (client, mut eventloop) = AsyncClient::new(options, messages.len() + 4);
    let expected = messages.len();
    for (topic, payload) in messages {
        client
            .try_publish(topic, QoS::AtLeastOnce, true, payload)
            .map_err(|e| e.to_string())?;
    }
    let work = async {
        let mut acked = 0;
        let mut disconnecting = false;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked += 1;
                    // Everything is with the broker: say goodbye (DISCONNECT goes out next).
                    if acked >= expected && !disconnecting {
                        disconnecting = true;
                        let _ = client.try_disconnect();
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if ack.code != rumqttc::ConnectReturnCode::Success {
                        return Err(format!("broker refused the connection: {:?}", ack.code));
                    }
                    if expected == 0 {
                        disconnecting = true;
                        let _ = client.try_disconnect();
                    }
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(_) if disconnecting => return Ok(()),
                Err(e) => return Err(format!("{}:{}: {e}", mqtt.host, mqtt.port)),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .map_err(|_| "no acknowledgement from the broker within 30 s".to_owned())?
}

/// One line of `targets list`.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: i32,
    pub name: String,
    pub url: String,
    pub interval_ms: Option<i64>,
    pub placement: String,
    pub retired: bool,
    pub updated: String,
}

/// Targets defined centrally (`all`: retired ones too), by id.
pub async fn list(client: &Client, all: bool) -> Result<Vec<Listed>, TargetsError> {
    let rows = client
        .query(
            "SELECT target_id, name, url, (spec->>'interval_ms')::int8, regions, agents,
                    retired_at IS NOT NULL,
                    to_char(coalesce(retired_at, updated_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')
               FROM targets
              WHERE name IS NOT NULL AND ($1 OR retired_at IS NULL)
              ORDER BY target_id",
            &[&all],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Listed {
            id: r.get(0),
            name: r.get(1),
            url: r.get(2),
            interval_ms: r.get(3),
            placement: placement_from_row(r.get(4), r.get(5))
                .map_or("-".into(), |p| placement_text(&p)),
            retired: r.get(6),
            updated: r.get::<_, Option<String>>(7).unwrap_or_default(),
        })
        .collect())
}

/// `targets list` output, with the published sets under the table.
pub async fn render_list(client: &Client, all: bool) -> Result<String, TargetsError> {
    let lines = list(client, all).await?;
    let mut rows =
        vec![["ID", "NAME", "URL", "INTERVAL", "RUNS ON", "STATE", "SINCE"].map(String::from)];
    for l in &lines {
        rows.push([
            l.id.to_string(),
            l.name.clone(),
            l.url.clone(),
            l.interval_ms.map_or("-".into(), |ms| {
                humantime::format_duration(Duration::from_millis(ms as u64)).to_string()
            }),
            l.placement.clone(),
            if l.retired { "retired" } else { "live" }.into(),
            l.updated.clone(),
        ]);
    }
    let mut out = crate::table::align(&rows);
    let sets = client
        .query(
            "SELECT region, agent, generation, cardinality(target_ids), bytes FROM target_sets ORDER BY agent <> '', region, agent",
            &[],
        )
        .await?;
    if !sets.is_empty() {
        out.push('\n');
        let mut rows = vec![["SET", "GENERATION", "TARGETS", "BYTES"].map(String::from)];
        for r in &sets {
            let scope = Scope {
                region: r.get(0),
                agent: r.get(1),
            };
            rows.push([
                scope.to_string(),
                r.get::<_, i64>(2).to_string(),
                r.get::<_, i32>(3).to_string(),
                r.get::<_, i32>(4).to_string(),
            ]);
        }
        out.push_str(&crate::table::align(&rows));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TargetsFile, String> {
        TargetsFile::parse(text, Path::new("targets.toml")).map_err(|e| e.to_string())
    }

    pub(super) const GOOD: &str = r#"
regions = ["eu-north", "us-east"]

[[targets]]
name = "shop"
url = "https://shop.example/"
interval = "30s"
regex = "Buy"

[[targets]]
name = "api"
id = 40
url = "http://api.example/health"
regions = ["us-east"]

[[targets]]
name = "lab"
url = "http://10.0.0.1/"
agents = ["eu-north/pi-lab"]
"#;

    #[test]
    fn good_file() {
        let f = parse(GOOD).unwrap();
        assert_eq!(f.regions, ["eu-north", "us-east"]);
        assert_eq!(f.targets.len(), 3);
        assert_eq!(
            f.targets[0].placement,
            Placement::Regions(vec!["eu-north".into(), "us-east".into()])
        );
        assert_eq!(f.targets[1].id, Some(40));
        assert_eq!(f.targets[1].line, 10);
        assert_eq!(
            f.targets[2].placement,
            Placement::Agents(vec![("eu-north".into(), "pi-lab".into())])
        );
        assert_eq!(f.targets[0].spec.interval_ms, 30_000);
    }

    /// Every error names the file, the line and the key.
    #[test]
    fn errors_are_located() {
        let cases: &[(&str, &str, &str)] = &[
            ("url = \"https://shop.example/\"", "url = \"ftp://shop.example/\"", "targets.toml:6: targets[0] (\"shop\").url: scheme \"ftp\" is not http or https"),
            ("url = \"https://shop.example/\"", "url = \"not a url\"", "targets.toml:6: targets[0] (\"shop\").url: invalid URL"),
            ("regions = [\"us-east\"]", "regions = [\"ap-south\"]", "targets.toml:14: targets[1] (\"api\").regions: unknown region \"ap-south\""),
            ("regex = \"Buy\"", "regex = \"Buy(\"", "targets.toml:8: targets[0] (\"shop\").regex: invalid regex"),
            ("interval = \"30s\"", "interval = \"10ms\"", "targets.toml:7: targets[0] (\"shop\").interval: must be at least"),
            ("name = \"api\"", "name = \"shop\"", "targets.toml:11: targets[1] (\"shop\").name: duplicate name (also used by the target at line 4)"),
            ("regex = \"Buy\"", "regexp = \"Buy\"", "targets.toml:8: targets[0] (\"shop\").regexp: unknown field `regexp`"),
            ("agents = [\"eu-north/pi-lab\"]", "agents = [\"mars/pi-lab\"]", "targets.toml:19: targets[2] (\"lab\").agents: \"mars/pi-lab\": unknown region \"mars\""),
            ("regions = [\"eu-north\", \"us-east\"]", "regions = [\"eu-north\", \"us-east\"]\nzones = 1", "targets.toml:3: syntax: unknown field `zones`"),
        ];
        for (from, to, expected) in cases {
            let text = GOOD.replacen(from, to, 1);
            let err = parse(&text).unwrap_err();
            assert!(
                err.starts_with(expected),
                "{to}:\n  got      {err}\n  expected {expected}"
            );
        }
    }

    /// Issue #20: probe kinds in a targets file, checked as the agents check them and located;
    /// the stored form of an http target is what it was before kinds (no target looks changed).
    #[test]
    fn probe_kinds_in_the_file() {
        let text = "regions = [\"eu\"]\n[[targets]]\nname = \"ssh\"\nkind = \"tcp\"\n\
                    address = \"10.0.0.2:22\"\nexpect = \"SSH-2.0-\"\n";
        let f = parse(text).unwrap();
        let spec = &f.targets[0].spec;
        assert_eq!(spec.kind, vantage_proto::ProbeKind::Tcp);
        assert_eq!(spec.url.as_str(), "10.0.0.2:22");
        let json = spec_json(spec);
        assert_eq!(json["kind"], "tcp");
        assert_eq!(json["options"][0]["Expect"], "SSH-2.0-");
        let http = spec_json(&parse(GOOD).unwrap().targets[0].spec);
        assert!(
            http.get("kind").is_none() && http.get("options").is_none(),
            "{http}"
        );
        let err = parse(&text.replace("expect", "regex")).unwrap_err();
        assert!(
            err.contains("targets[0] (\"ssh\").regex: does not apply to a tcp target"),
            "{err}"
        );
        let err = parse(&text.replace("10.0.0.2:22", "10.0.0.2")).unwrap_err();
        assert!(err.contains("targets[0] (\"ssh\").address:"), "{err}");
        // The dns kind: the name in the spec's url, its type and resolver as options; a
        // resolver given by name is refused where the file says it.
        let dns = "regions = [\"eu\"]\n[[targets]]\nname = \"zone\"\nkind = \"dns\"\n\
                   query = \"example.org\"\nquery_type = \"AAAA\"\nresolver = \"192.0.2.53\"\n";
        let spec = &parse(dns).unwrap().targets[0].spec;
        assert_eq!(
            (spec.kind, spec.url.as_str()),
            (vantage_proto::ProbeKind::Dns, "example.org")
        );
        let json = spec_json(spec);
        assert_eq!(json["kind"], "dns");
        assert_eq!(json["options"][0]["QueryType"], 28);
        assert_eq!(json["options"][1]["Resolver"], "192.0.2.53");
        let err = parse(&dns.replace("192.0.2.53", "ns.example")).unwrap_err();
        assert!(err.contains("targets[0] (\"zone\").resolver:"), "{err}");
        let err = parse(&dns.replace("query = \"example.org\"\n", "")).unwrap_err();
        assert!(err.contains("targets[0] (\"zone\").query:"), "{err}");
    }

    /// Issue #14 item 13: `targets check` (which is `TargetsFile::load`) refuses what `apply`
    /// refuses: a set of more than 1,024 targets, or one that encodes to more than 240 KiB.
    #[test]
    fn set_limits_are_checked_from_the_file_alone() {
        let many = |n: usize, url_len: usize, placement: &str| {
            let mut text = String::from("regions = [\"eu\", \"us\"]\n");
            for i in 0..n {
                let path = "a".repeat(url_len);
                text.push_str(&format!(
                    "[[targets]]\nname = \"t{i}\"\nurl = \"http://h{i}.example/{path}\"\n{placement}\n"
                ));
            }
            parse(&text)
        };
        let refused = |r: Result<TargetsFile, String>| match r {
            Ok(_) => panic!("accepted a file apply would refuse"),
            Err(e) => e,
        };
        // (targets, URL path length, placement, refusal past the limit, targets within it)
        for (n, url_len, placement, refusal, within) in [
            (
                1025,
                1,
                "regions = [\"us\"]",
                "targets.toml:1: targets: region us would get 1025 targets; at most 1024",
                1024,
            ),
            (
                500,
                480,
                "agents = [\"eu/pi\"]",
                "targets.toml:1: targets: agent eu/pi: the set is larger than 245760 bytes",
                400,
            ),
        ] {
            let err = refused(many(n, url_len, placement));
            assert!(err.starts_with(refusal), "{err}");
            many(within, url_len, placement).unwrap();
        }
    }

    #[test]
    fn missing_name_and_bad_id() {
        let err = parse("regions = [\"eu\"]\n[[targets]]\nurl = \"http://a/\"\n").unwrap_err();
        assert!(
            err.starts_with("targets.toml:2: targets[0]: missing key `name`"),
            "{err}"
        );
        let err =
            parse("regions = [\"eu\"]\n[[targets]]\nname = \"a\"\nid = -1\nurl = \"http://a/\"\n")
                .unwrap_err();
        assert!(
            err.starts_with("targets.toml:4: targets[0] (\"a\").id: must be an integer"),
            "{err}"
        );
        let err = parse("regions = []\n").unwrap_err();
        assert!(
            err.starts_with("targets.toml:1: regions: list at least one region"),
            "{err}"
        );
    }
}
