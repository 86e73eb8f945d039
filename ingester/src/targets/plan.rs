//! `targets apply | diff`, the plan: what PostgreSQL holds ([`State`], three queries) and what
//! the file asks for, compared by a pure function ([`plan_from`], unit-tested below) that keeps
//! ids stable. Ids: an explicit `id`, else the live target of the same name, else the most
//! recently retired one of that name, else a live target with the same URL whose name left the
//! file (a rename), else a new id after the highest central one.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::GenericClient;
use vantage_proto::control::TargetSpec;

use super::{scopes_of, Placement, Scope, TargetsError, TargetsFile};

/// A target as it will be after `apply`.
#[derive(Debug, Clone)]
pub struct Planned {
    pub id: u32,
    pub name: String,
    pub placement: Placement,
    pub spec: TargetSpec,
}

/// A target live today that the file no longer has.
#[derive(Debug, Clone)]
pub struct Retiring {
    pub id: u32,
    pub name: String,
}

/// What `apply` will do.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub added: Vec<Planned>,
    /// With a short description of each difference.
    pub changed: Vec<(Planned, Vec<String>)>,
    pub unchanged: Vec<Planned>,
    pub retired: Vec<Retiring>,
    /// Every set to publish, target ids sorted.
    pub sets: BTreeMap<Scope, Vec<u32>>,
    /// Scopes published before that no longer exist (cleared on the broker).
    pub cleared: Vec<Scope>,
    /// Scopes whose target list differs from the last published one.
    pub sets_changed: Vec<Scope>,
    /// The generation the sets will carry.
    pub generation: u64,
    pub new_generation: bool,
}

impl Plan {
    pub fn is_noop(&self) -> bool {
        !self.new_generation
    }

    pub(super) fn all(&self) -> impl Iterator<Item = &Planned> {
        self.added
            .iter()
            .chain(self.changed.iter().map(|(p, _)| p))
            .chain(&self.unchanged)
    }

    /// Human-readable lines, one per change.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for p in &self.added {
            out.push_str(&format!(
                "+ add     {:>5}  {}  {}  ({})\n",
                p.id,
                p.name,
                p.spec.url,
                placement_text(&p.placement)
            ));
        }
        for (p, what) in &self.changed {
            out.push_str(&format!(
                "~ change  {:>5}  {}: {}\n",
                p.id,
                p.name,
                what.join("; ")
            ));
        }
        for r in &self.retired {
            out.push_str(&format!("- retire  {:>5}  {}\n", r.id, r.name));
        }
        for s in &self.sets_changed {
            let n = self.sets.get(s).map_or(0, Vec::len);
            out.push_str(&format!("> publish {s}: {n} targets\n"));
        }
        for s in &self.cleared {
            out.push_str(&format!("> clear   {s}\n"));
        }
        if self.is_noop() {
            out.push_str(&format!("no changes (generation {})\n", self.generation));
        } else {
            out.push_str(&format!(
                "{} to add, {} to change, {} to retire; sets will carry generation {}\n",
                self.added.len(),
                self.changed.len(),
                self.retired.len(),
                self.generation
            ));
        }
        out
    }
}

pub(super) fn placement_text(p: &Placement) -> String {
    match p {
        Placement::Regions(r) => format!("regions {}", r.join(", ")),
        Placement::Agents(a) => format!(
            "agents {}",
            a.iter()
                .map(|(r, a)| format!("{r}/{a}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A row of `targets` as stored.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    pub id: u32,
    pub name: Option<String>,
    pub spec: Option<serde_json::Value>,
    pub placement: Option<Placement>,
    /// Unix time, None while live.
    pub retired_at: Option<f64>,
}

pub(super) fn placement_from_row(
    regions: Option<Vec<String>>,
    agents: Option<Vec<String>>,
) -> Option<Placement> {
    match (regions, agents) {
        (_, Some(a)) => Some(Placement::Agents(
            a.iter()
                .filter_map(|x| x.split_once('/'))
                .map(|(r, a)| (r.to_owned(), a.to_owned()))
                .collect(),
        )),
        (Some(r), None) => Some(Placement::Regions(r)),
        (None, None) => None,
    }
}

pub(super) fn placement_columns(p: &Placement) -> (Option<Vec<String>>, Option<Vec<String>>) {
    match p {
        Placement::Regions(r) => (Some(r.clone()), None),
        Placement::Agents(a) => (
            None,
            Some(a.iter().map(|(r, a)| format!("{r}/{a}")).collect()),
        ),
    }
}

/// What the plan compares the file with: every row of `targets`, the sets last published, the
/// current generation and the highest one agents report holding.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub stored: Vec<Stored>,
    pub published: BTreeMap<Scope, Vec<u32>>,
    pub current_generation: i64,
    pub reported_generation: i64,
}

/// Reads [`State`]. Read-only.
pub async fn load_state(client: &impl GenericClient) -> Result<State, TargetsError> {
    let rows = client
        .query(
            "SELECT target_id, name, spec::text, regions, agents,
                    extract(epoch FROM retired_at)::float8
               FROM targets",
            &[],
        )
        .await?;
    let stored: Vec<Stored> = rows
        .iter()
        .map(|r| Stored {
            id: r.get::<_, i32>(0) as u32,
            name: r.get(1),
            spec: r
                .get::<_, Option<String>>(2)
                .and_then(|s| serde_json::from_str(&s).ok()),
            placement: placement_from_row(r.get(3), r.get(4)),
            retired_at: r.get(5),
        })
        .collect();

    let published: BTreeMap<Scope, Vec<u32>> = client
        .query("SELECT region, agent, target_ids FROM target_sets", &[])
        .await?
        .iter()
        .map(|r| {
            let ids: Vec<i32> = r.get(2);
            (
                Scope {
                    region: r.get(0),
                    agent: r.get(1),
                },
                ids.into_iter().map(|i| i as u32).collect(),
            )
        })
        .collect();
    // Agents refuse a generation older than the one they hold, so a new one also goes above
    // what agents report holding: after the database was rebuilt (target_applies empty again)
    // the next apply is not refused by every agent. Reports above 2^40 are ignored: no real
    // fleet gets there, and a hostile agent must not push generations to overflow.
    let row = client
        .query_one(
            "SELECT (SELECT coalesce(max(generation), 0) FROM target_applies),
                    (SELECT coalesce(max(greatest(region_set_generation, agent_set_generation)), 0)
                       FROM agents
                      WHERE greatest(region_set_generation, agent_set_generation) <= 1099511627776)",
            &[],
        )
        .await?;
    Ok(State {
        stored,
        published,
        current_generation: row.get(0),
        reported_generation: row.get(1),
    })
}

/// Compares `file` with what PostgreSQL holds. Read-only.
pub async fn plan(client: &impl GenericClient, file: &TargetsFile) -> Result<Plan, TargetsError> {
    plan_from(file, &load_state(client).await?)
}

/// The plan for `file` against `state`: no I/O.
pub fn plan_from(file: &TargetsFile, state: &State) -> Result<Plan, TargetsError> {
    // Ids: explicit ones first, then the live target of the same name, then the latest retired.
    let explicit: BTreeSet<u32> = file.targets.iter().filter_map(|t| t.id).collect();
    let file_names: BTreeSet<&str> = file.targets.iter().map(|t| t.name.as_str()).collect();
    let mut taken = explicit.clone();
    // New ids come after the highest id of a central target (one applied from a file, so it
    // has a name) or an explicit one. Ids seen only in results (standalone agents' local
    // targets) are skipped, so a new target never inherits their history, but they never
    // move the start: one result with id 2147483647, from a hostile or misconfigured agent,
    // would otherwise leave no id to give. Central ids stay in 1..=i32::MAX (`integer`).
    let seen: BTreeSet<u32> = state.stored.iter().map(|s| s.id).collect();
    let mut next_id = state
        .stored
        .iter()
        .filter(|s| s.name.is_some())
        .map(|s| s.id)
        .chain(explicit.iter().copied())
        .filter(|&id| id <= vantage_proto::MAX_TARGET_ID)
        .max()
        .unwrap_or(0)
        + 1;
    let mut exhausted = false;
    let mut plan = Plan::default();
    let mut kept: BTreeSet<u32> = BTreeSet::new();
    for t in &file.targets {
        let by_name = |live: bool| {
            state
                .stored
                .iter()
                .filter(|s| s.name.as_deref() == Some(t.name.as_str()))
                .filter(|s| s.retired_at.is_none() == live && !taken.contains(&s.id))
                .max_by(|a, b| {
                    a.retired_at
                        .unwrap_or(0.0)
                        .total_cmp(&b.retired_at.unwrap_or(0.0))
                })
                .map(|s| s.id)
        };
        let id = match t.id {
            Some(id) => id,
            None => {
                // A rename: a live target whose name left the file, with the same URL.
                let renamed = || {
                    state
                        .stored
                        .iter()
                        .filter(|s| s.retired_at.is_none() && !taken.contains(&s.id))
                        .filter(|s| {
                            s.name
                                .as_ref()
                                .is_some_and(|n| !file_names.contains(n.as_str()))
                        })
                        .find(|s| {
                            s.spec
                                .as_ref()
                                .and_then(|v| v.get("url"))
                                .and_then(|u| u.as_str())
                                == Some(t.spec.url.as_str())
                        })
                        .map(|s| s.id)
                };
                let id = by_name(true)
                    .or_else(|| by_name(false))
                    .or_else(renamed)
                    .unwrap_or_else(|| loop {
                        let id = next_id;
                        next_id += 1;
                        if id > vantage_proto::MAX_TARGET_ID {
                            exhausted = true;
                            break id;
                        }
                        if !seen.contains(&id) && !taken.contains(&id) {
                            break id;
                        }
                    });
                taken.insert(id);
                id
            }
        };
        kept.insert(id);
        let mut spec = t.spec.clone();
        spec.id = id;
        spec.name = t.name.as_str().try_into().unwrap_or_default();
        let planned = Planned {
            id,
            name: t.name.clone(),
            placement: t.placement.clone(),
            spec,
        };
        match state.stored.iter().find(|s| s.id == id) {
            Some(s) if s.name.is_some() => {
                let mut what = Vec::new();
                if s.retired_at.is_some() {
                    what.push("revived".to_owned());
                }
                if s.name.as_deref() != Some(t.name.as_str()) {
                    what.push(format!(
                        "renamed from {:?}",
                        s.name.as_deref().unwrap_or("")
                    ));
                }
                let new_spec = super::spec_json(&planned.spec);
                if let (Some(old), Some(new)) = (
                    s.spec.as_ref().and_then(|v| v.as_object()),
                    new_spec.as_object(),
                ) {
                    // Keys of both: `kind` and `options` are only there when not the default.
                    let keys: std::collections::BTreeSet<&String> =
                        new.keys().chain(old.keys()).collect();
                    for k in keys {
                        let (o, v) = (old.get(k), new.get(k));
                        if k == "name" || o == v {
                            continue;
                        }
                        // Header values and `send` texts are often credentials: say that they
                        // changed, not to what.
                        if k == "headers" || k == "options" {
                            what.push(format!("{k} changed"));
                        } else {
                            let shown = |x: Option<&serde_json::Value>| {
                                x.map_or("-".into(), |x| x.to_string())
                            };
                            what.push(format!("{k}: {} → {}", shown(o), shown(v)));
                        }
                    }
                } else if s.spec.as_ref() != Some(&new_spec) {
                    what.push("settings".into());
                }
                if s.placement.as_ref() != Some(&t.placement) {
                    what.push(format!(
                        "{} → {}",
                        s.placement.as_ref().map_or("-".into(), placement_text),
                        placement_text(&t.placement)
                    ));
                }
                if what.is_empty() {
                    plan.unchanged.push(planned);
                } else {
                    plan.changed.push((planned, what));
                }
            }
            // New, or an id only seen in results so far (a standalone agent's local target).
            _ => plan.added.push(planned),
        }
    }
    if exhausted {
        return Err(TargetsError::Invalid {
            file: file.path.clone(),
            line: 1,
            key: "targets".into(),
            reason: format!(
                "no free target id left below {}; give targets explicit `id`s",
                i32::MAX
            ),
        });
    }
    plan.retired = state
        .stored
        .iter()
        .filter(|s| s.name.is_some() && s.retired_at.is_none() && !kept.contains(&s.id))
        .map(|s| Retiring {
            id: s.id,
            name: s.name.clone().unwrap_or_default(),
        })
        .collect();

    // Sets.
    let members: Vec<(u32, Placement)> = plan.all().map(|p| (p.id, p.placement.clone())).collect();
    plan.sets = scopes_of(&file.regions, members.iter().map(|(_, p)| p))
        .into_iter()
        .map(|(scope, members_of)| (scope, members_of.iter().map(|&i| members[i].0).collect()))
        .collect();
    for ids in plan.sets.values_mut() {
        ids.sort_unstable();
    }
    plan.cleared = state
        .published
        .keys()
        .filter(|s| !plan.sets.contains_key(*s))
        .cloned()
        .collect();
    plan.sets_changed = plan
        .sets
        .iter()
        .filter(|(s, ids)| state.published.get(*s) != Some(*ids))
        .map(|(s, _)| s.clone())
        .collect();

    // The limits per set (targets, bytes) were checked by `TargetsFile::parse` from the file
    // alone, with every id and the generation at their widest: this set can only be smaller.

    plan.new_generation = !plan.added.is_empty()
        || !plan.changed.is_empty()
        || !plan.retired.is_empty()
        || !plan.cleared.is_empty()
        || !plan.sets_changed.is_empty();
    plan.generation = if plan.new_generation {
        state.current_generation.max(state.reported_generation) as u64 + 1
    } else {
        state.current_generation as u64
    };
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    // The targets file of targets.rs's own tests: shop (both regions), api (id 40), lab (pinned).
    use super::super::tests::GOOD as FILE;

    fn file(text: &str) -> TargetsFile {
        TargetsFile::parse(text, Path::new("targets.toml")).unwrap()
    }

    fn scope(region: &str, agent: &str) -> Scope {
        Scope {
            region: region.into(),
            agent: agent.into(),
        }
    }

    /// The state after `apply` wrote `plan` at `now` (what apply_locked stores).
    fn applied(before: &State, plan: &Plan, now: f64) -> State {
        let mut stored: Vec<Stored> = before
            .stored
            .iter()
            .filter(|s| !plan.all().any(|p| p.id == s.id))
            .cloned()
            .collect();
        for s in &mut stored {
            if plan.retired.iter().any(|r| r.id == s.id) {
                s.retired_at = Some(now);
            }
        }
        stored.extend(plan.all().map(|p| Stored {
            id: p.id,
            name: Some(p.name.clone()),
            spec: Some(crate::targets::spec_json(&p.spec)),
            placement: Some(p.placement.clone()),
            retired_at: None,
        }));
        State {
            stored,
            published: plan.sets.clone(),
            current_generation: plan.generation as i64,
            reported_generation: before.reported_generation,
        }
    }

    fn id_of(plan: &Plan, name: &str) -> u32 {
        plan.all().find(|p| p.name == name).unwrap().id
    }

    #[test]
    fn a_first_apply_numbers_after_the_explicit_ids_and_builds_every_set() {
        let plan = plan_from(&file(FILE), &State::default()).unwrap();
        assert_eq!(plan.added.len(), 3);
        assert_eq!(
            (
                id_of(&plan, "api"),
                id_of(&plan, "shop"),
                id_of(&plan, "lab")
            ),
            (40, 41, 42)
        );
        let sets: Vec<(Scope, Vec<u32>)> = plan.sets.clone().into_iter().collect();
        assert_eq!(
            sets,
            [
                (scope("eu-north", ""), vec![41]),
                (scope("eu-north", "pi-lab"), vec![42]),
                (scope("us-east", ""), vec![40, 41]),
            ]
        );
        assert!(plan.new_generation);
        assert_eq!(plan.generation, 1);
        assert_eq!(plan.sets_changed.len(), 3);
    }

    #[test]
    fn the_same_file_again_changes_nothing() {
        let first = plan_from(&file(FILE), &State::default()).unwrap();
        let state = applied(&State::default(), &first, 100.0);
        let again = plan_from(&file(FILE), &state).unwrap();
        assert!(again.is_noop(), "{}", again.render());
        assert_eq!(again.unchanged.len(), 3);
        assert_eq!(again.generation, 1);
        assert!(again.sets_changed.is_empty() && again.cleared.is_empty());
    }

    #[test]
    fn a_rename_keeps_the_id_a_removal_retires_and_a_return_revives() {
        let first = plan_from(&file(FILE), &State::default()).unwrap();
        let state = applied(&State::default(), &first, 100.0);

        // "shop" becomes "store" (same URL) and "lab" leaves the file.
        let text = FILE
            .replace("name = \"shop\"", "name = \"store\"")
            .replace(
                "[[targets]]\nname = \"lab\"\nurl = \"http://10.0.0.1/\"\nagents = [\"eu-north/pi-lab\"]\n",
                "",
            );
        let plan = plan_from(&file(&text), &state).unwrap();
        assert_eq!(id_of(&plan, "store"), 41);
        let (_, what) = plan.changed.iter().find(|(p, _)| p.id == 41).unwrap();
        assert!(
            what.iter().any(|w| w == "renamed from \"shop\""),
            "{what:?}"
        );
        assert_eq!(plan.retired.len(), 1);
        assert_eq!(
            (plan.retired[0].id, plan.retired[0].name.as_str()),
            (42, "lab")
        );
        assert_eq!(plan.cleared, [scope("eu-north", "pi-lab")]);
        assert_eq!(plan.generation, 2);

        // "lab" comes back: its old id, marked revived.
        let state = applied(&state, &plan, 200.0);
        let text = text + "\n[[targets]]\nname = \"lab\"\nurl = \"http://10.0.0.2/\"\n";
        let back = plan_from(&file(&text), &state).unwrap();
        assert_eq!(id_of(&back, "lab"), 42);
        let (_, what) = back.changed.iter().find(|(p, _)| p.id == 42).unwrap();
        assert!(what.iter().any(|w| w == "revived"), "{what:?}");
    }

    #[test]
    fn ids_seen_only_in_results_are_skipped_and_never_move_the_start() {
        let seen = |id| Stored {
            id,
            ..Stored::default()
        };
        let state = State {
            stored: vec![seen(41), seen(vantage_proto::MAX_TARGET_ID)],
            ..State::default()
        };
        let plan = plan_from(&file(FILE), &state).unwrap();
        assert_eq!((id_of(&plan, "shop"), id_of(&plan, "lab")), (42, 43));
        // A standalone agent's id becomes central: added, not changed.
        assert_eq!(plan.added.len(), 3);
    }

    #[test]
    fn no_free_id_is_an_error_naming_the_way_out() {
        let text = FILE.replace("id = 40", &format!("id = {}", vantage_proto::MAX_TARGET_ID));
        let err = plan_from(&file(&text), &State::default()).unwrap_err();
        assert!(
            err.to_string().contains("give targets explicit `id`s"),
            "{err}"
        );
    }

    #[test]
    fn a_new_generation_goes_above_what_agents_report() {
        let state = State {
            current_generation: 3,
            reported_generation: 7,
            ..State::default()
        };
        assert_eq!(plan_from(&file(FILE), &state).unwrap().generation, 8);
    }
}
