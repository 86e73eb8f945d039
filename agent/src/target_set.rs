//! Target sets pushed by the ingester: conversion between a config-file target ([`RawTarget`])
//! and its wire form ([`TargetSpec`]), validation of a received set, the on-disk copy of the last
//! good set, and [`TargetBook`], which combines the region's set and the agent's own set into the
//! targets to probe.
//!
//! A pushed set goes through exactly the checks a `[[targets]]` table in the agent's file goes
//! through ([`Target::from_raw`]); the ingester runs the same checks before it publishes, so a
//! rejection on the agent means the two disagree (a CA file missing on this agent, a newer
//! ingester), and it is reported upstream in the agent's status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vantage_proto::control::{Rejection, SetScope, TargetSetReader, MAX_REASON_LEN};

pub use vantage_common::target_spec::{check_portable, raw_from_spec, spec_from_raw};

use crate::config::WireFormat;
use crate::target::Target;

/// A decoded, validated set.
#[derive(Debug, Clone)]
pub struct ReceivedSet {
    pub generation: u64,
    pub targets: Vec<Arc<Target>>,
}

/// Decodes and validates a set frame for an agent that sends version 4 frames (any kind).
/// The error says what is wrong, for the log and the status.
pub fn validate_frame(frame: &[u8]) -> Result<ReceivedSet, String> {
    validate_frame_for(frame, WireFormat::V4)
}

/// [`validate_frame`] for an agent that sends `wire` frames: a target whose results they
/// cannot carry refuses the set (`uplink.wire_format` below 4 carries http results only).
pub fn validate_frame_for(frame: &[u8], wire: WireFormat) -> Result<ReceivedSet, String> {
    let reader = TargetSetReader::new(frame).map_err(|e| format!("cannot decode: {e}"))?;
    let generation = reader.header().generation;
    let mut targets: Vec<Arc<Target>> = Vec::new();
    for (i, spec) in reader.enumerate() {
        let spec = spec.map_err(|e| format!("cannot decode target {i}: {e}"))?;
        if targets.iter().any(|t| t.id == spec.id) {
            return Err(format!("duplicate target id {}", spec.id));
        }
        if !vantage_proto::is_valid_target_id(spec.id) {
            return Err(format!(
                "target id {} is not 1..={}",
                spec.id,
                vantage_proto::MAX_TARGET_ID
            ));
        }
        if let Some(reason) = wire.refusal(spec.kind) {
            return Err(format!("target {} ({}): {reason}", spec.id, spec.name));
        }
        let target = Target::from_raw(raw_from_spec(&spec)).map_err(|e| {
            format!(
                "target {} ({}): {}: {}",
                spec.id, spec.name, e.key, e.reason
            )
        })?;
        targets.push(Arc::new(target));
    }
    Ok(ReceivedSet {
        generation,
        targets,
    })
}

/// One scope's accepted set, with the frame it came from (what is persisted).
#[derive(Debug, Clone)]
struct Held {
    set: ReceivedSet,
    frame: Vec<u8>,
}

/// The region's set and the agent's own set, as last accepted.
///
/// Which sets count: the region set always; the agent set only when its generation is not older
/// than the region set's. Every `targets apply` republishes all sets with one new generation
/// (agent sets first) and clears the agent sets it no longer has, so an agent set older than
/// the region set is one that was cleared while this agent was away.
#[derive(Debug, Clone)]
pub struct TargetBook {
    dir: PathBuf,
    /// `<prefix>+<region>` and `<prefix>+<region>+<agent>`: file names that say which scope a
    /// persisted set belongs to, so a card cloned into another Pi, or an agent moved to another
    /// region, never starts from sets meant for someone else. `+` is not a name character
    /// ([`vantage_proto::is_valid_name`]), so no two scopes share a name (with `-`, which names
    /// may contain, prefix `a-b` + region `c` and prefix `a` + region `b-c` did).
    region_key: String,
    agent_key: String,
    /// The names before `+` (`<prefix>-<region>`, ...), read when the new file is absent and
    /// only if they are unambiguous here (no `-` in prefix, region or agent).
    legacy_keys: Option<(String, String)>,
    region: Option<Held>,
    agent: Option<Held>,
    rejection: Option<Rejection>,
    /// The frames this agent sends: which kinds it can probe.
    wire: WireFormat,
}

/// What [`TargetBook::offer`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Offered {
    /// The set was accepted and the effective targets may have changed.
    Accepted,
    /// The same bytes as the set already held.
    Unchanged,
    /// Refused; the previous set stays.
    Rejected(String),
}

impl TargetBook {
    /// A book that persists into `dir`, starting from whatever valid sets are there for this
    /// topic prefix, region and agent.
    pub fn load(dir: &Path, prefix: &str, region: &str, agent: &str) -> TargetBook {
        TargetBook::load_for(dir, prefix, region, agent, WireFormat::V4)
    }

    /// [`TargetBook::load`] for an agent that sends `wire` frames: sets with targets of kinds
    /// those frames cannot carry are refused ([`validate_frame_for`]), persisted ones too.
    pub fn load_for(
        dir: &Path,
        prefix: &str,
        region: &str,
        agent: &str,
        wire: WireFormat,
    ) -> TargetBook {
        let unambiguous = ![prefix, region, agent].iter().any(|n| n.contains('-'));
        let mut book = TargetBook {
            dir: dir.to_owned(),
            region_key: format!("{prefix}+{region}"),
            agent_key: format!("{prefix}+{region}+{agent}"),
            legacy_keys: unambiguous.then(|| {
                (
                    format!("{prefix}-{region}"),
                    format!("{prefix}-{region}-{agent}"),
                )
            }),
            region: None,
            agent: None,
            rejection: None,
            wire,
        };
        for scope in [SetScope::Region, SetScope::Agent] {
            let mut path = book.path(scope);
            let legacy = book.legacy_path(scope);
            if !path.exists() {
                if let Some(old) = legacy.filter(|p| p.exists()) {
                    path = old;
                }
            }
            let frame = match std::fs::read(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read persisted target set");
                    continue;
                }
            };
            match validate_frame_for(&frame, wire) {
                Ok(set) => {
                    tracing::info!(path = %path.display(), generation = set.generation, targets = set.targets.len(), "loaded persisted target set");
                    *book.slot(scope) = Some(Held { set, frame });
                }
                Err(reason) => {
                    tracing::warn!(path = %path.display(), reason, "ignoring invalid persisted target set")
                }
            }
        }
        book
    }

    /// The file that holds the persisted set of `scope`.
    pub fn path(&self, scope: SetScope) -> PathBuf {
        self.dir.join(match scope {
            SetScope::Region => format!("targets-region-{}.bin", self.region_key),
            SetScope::Agent => format!("targets-agent-{}.bin", self.agent_key),
        })
    }

    /// The name an agent before issue #14 persisted `scope` under, when it is unambiguous.
    fn legacy_path(&self, scope: SetScope) -> Option<PathBuf> {
        let (region, agent) = self.legacy_keys.as_ref()?;
        Some(self.dir.join(match scope {
            SetScope::Region => format!("targets-region-{region}.bin"),
            SetScope::Agent => format!("targets-agent-{agent}.bin"),
        }))
    }

    fn slot(&mut self, scope: SetScope) -> &mut Option<Held> {
        match scope {
            SetScope::Region => &mut self.region,
            SetScope::Agent => &mut self.agent,
        }
    }

    /// Takes a payload received on one of the two target topics. An empty payload clears the
    /// scope (the ingester deleted the retained set).
    pub fn offer(&mut self, scope: SetScope, payload: &[u8]) -> Offered {
        if payload.is_empty() {
            if self.rejection.as_ref().is_some_and(|r| r.scope == scope) {
                self.rejection = None;
            }
            if self.slot(scope).take().is_none() {
                return Offered::Unchanged;
            }
            self.remove_files(scope);
            return Offered::Accepted;
        }
        if self
            .slot(scope)
            .as_ref()
            .is_some_and(|h| h.frame == payload)
        {
            // The set held is on the broker again (e.g. the good file re-applied after a set
            // published behind `apply`'s back was refused): nothing is refused any more.
            if self.rejection.as_ref().is_some_and(|r| r.scope == scope) {
                self.rejection = None;
            }
            return Offered::Unchanged;
        }
        let held_generation = self.slot(scope).as_ref().map(|h| h.set.generation);
        let result = validate_frame_for(payload, self.wire).and_then(|set| match held_generation {
            // Generations only grow (every apply that changes something takes the next one): an
            // older one is a broker restored from a backup, or a stale publisher, and would roll
            // this agent back.
            Some(held) if set.generation < held => Err(format!(
                "generation {} is older than the generation {held} this agent holds (a broker \
                 restored from a backup?); run `targets apply` again",
                set.generation
            )),
            _ => Ok(set),
        });
        match result {
            Ok(set) => {
                match persist(&self.path(scope), payload) {
                    Ok(()) => {
                        if let Some(old) = self.legacy_path(scope) {
                            let _ = std::fs::remove_file(old);
                        }
                    }
                    // Probing goes on; only a restart without broker would miss this set.
                    Err(e) => {
                        tracing::warn!(dir = %self.dir.display(), error = %e, "cannot persist target set")
                    }
                }
                if self.rejection.as_ref().is_some_and(|r| r.scope == scope) {
                    self.rejection = None;
                }
                *self.slot(scope) = Some(Held {
                    set,
                    frame: payload.to_vec(),
                });
                Offered::Accepted
            }
            Err(reason) => {
                let generation = TargetSetReader::new(payload)
                    .map(|r| r.header().generation)
                    .unwrap_or(0);
                let mut short = heapless::String::<MAX_REASON_LEN>::new();
                for c in reason.chars() {
                    if short.push(c).is_err() {
                        break;
                    }
                }
                self.rejection = Some(Rejection {
                    scope,
                    generation,
                    reason: short,
                });
                Offered::Rejected(reason)
            }
        }
    }

    /// Removes the persisted file of `scope` (and its pre-#14 name).
    fn remove_files(&self, scope: SetScope) {
        for path in std::iter::once(self.path(scope)).chain(self.legacy_path(scope)) {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove persisted target set");
                }
            }
        }
    }

    fn agent_set_counts(&self) -> bool {
        match (&self.region, &self.agent) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(r), Some(a)) => a.set.generation >= r.set.generation,
        }
    }

    /// The targets to probe now: the region's, then the agent's own (ids are unique across both
    /// because the ingester allocates them; on a clash the region's wins).
    pub fn effective(&self) -> Vec<Arc<Target>> {
        let mut out: Vec<Arc<Target>> = Vec::new();
        let agent = self.agent.as_ref().filter(|_| self.agent_set_counts());
        for held in self.region.iter().chain(agent) {
            for t in &held.set.targets {
                if !out.iter().any(|o| o.id == t.id) {
                    out.push(t.clone());
                }
            }
        }
        out
    }

    /// Generation of the region set held (0: none).
    pub fn region_generation(&self) -> u64 {
        self.region.as_ref().map_or(0, |h| h.set.generation)
    }

    /// Generation of the agent set in use (0: none or outdated).
    pub fn agent_generation(&self) -> u64 {
        match &self.agent {
            Some(h) if self.agent_set_counts() => h.set.generation,
            _ => 0,
        }
    }

    /// The last refused set, until a later one of the same scope is accepted.
    pub fn rejection(&self) -> Option<&Rejection> {
        self.rejection.as_ref()
    }
}

/// Writes `bytes` to `path` atomically: a temporary file, fsync, rename, fsync of the directory.
fn persist(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::target::{IpFamily, ProbeKind, RawTarget, StatusSpec};
    use vantage_proto::control::{
        encode_target_set, TargetSetHeader, TargetSpec, MAX_TARGET_SET_LEN,
    };

    fn raw(id: u32, url: &str) -> RawTarget {
        let mut r = RawTarget::with_url(id, url);
        r.name = Some(format!("t{id}"));
        r
    }

    fn frame(generation: u64, targets: &[RawTarget]) -> Vec<u8> {
        let specs: Vec<TargetSpec> = targets.iter().map(|t| spec_from_raw(t).unwrap()).collect();
        let header = TargetSetHeader {
            generation,
            count: specs.len() as u16,
        };
        let mut buf = vec![0; MAX_TARGET_SET_LEN];
        encode_target_set(&header, &specs, &mut buf)
            .unwrap()
            .to_vec()
    }

    /// A fresh directory for one test.
    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vantage-target-set-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn ids(book: &TargetBook) -> Vec<u32> {
        book.effective().iter().map(|t| t.id).collect()
    }

    #[test]
    fn spec_round_trip_keeps_every_setting() {
        let mut r = raw(3, "https://example.org/x");
        r.regex = Some("Ex.mple".into());
        r.method = "HEAD".into();
        r.headers.insert("accept".into(), "text/html".into());
        r.accepted_status = vec![StatusSpec::Code(301), StatusSpec::Text("200-204".into())];
        r.max_redirects = 0;
        r.body_cap = 4096;
        r.ip_family = IpFamily::Ipv6;
        r.interval = Duration::from_millis(2500);
        r.timeout = Duration::from_millis(2000);
        let spec = spec_from_raw(&r).unwrap();
        let back = raw_from_spec(&spec);
        // Every field survives the trip (headers included), and both forms validate the same.
        assert_eq!(spec_from_raw(&back).unwrap(), spec);
        assert_eq!(spec.headers.len(), 1);
        let (a, b) = (
            Target::from_raw(r).unwrap(),
            Target::from_raw(back).unwrap(),
        );
        assert_eq!(a.accepted_status, b.accepted_status);
        assert_eq!(a.headers, b.headers);
    }

    /// Issue #14 item 9: header references travel as references (`env:` / `file:` names,
    /// the variable or path as value), come back as references, and `Debug` of the wire form
    /// shows no literal value.
    #[test]
    fn header_references_travel_without_values() {
        let mut r = raw(3, "https://example.org/x");
        r.headers.insert("accept".into(), "s3cr3t-literal".into());
        r.headers_from_env
            .insert("authorization".into(), "API_TOKEN".into());
        r.header_files
            .insert("x-key".into(), PathBuf::from("/etc/vantage/key"));
        let spec = check_portable(&r).unwrap();
        let wire: Vec<(&str, &str)> = spec
            .headers
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_str()))
            .collect();
        assert_eq!(
            wire,
            [
                ("accept", "s3cr3t-literal"),
                ("env:authorization", "API_TOKEN"),
                ("file:x-key", "/etc/vantage/key")
            ]
        );
        let debug = format!("{spec:?}");
        assert!(
            !debug.contains("s3cr3t") && debug.contains("API_TOKEN"),
            "{debug}"
        );
        let back = raw_from_spec(&spec);
        assert_eq!(back.headers, r.headers);
        assert_eq!(back.headers_from_env, r.headers_from_env);
        assert_eq!(back.header_files, r.header_files);
        // The central check does not read what only agents have, but checks the names.
        let mut bad = r.clone();
        bad.headers_from_env.insert("bad header".into(), "X".into());
        assert_eq!(check_portable(&bad).unwrap_err().key, "headers_from_env");
        let mut bad = r;
        bad.headers_from_env.insert("accept".into(), "X".into());
        assert!(check_portable(&bad)
            .unwrap_err()
            .reason
            .contains("set twice"));
    }

    /// Target sets version 2 (issue #20) carry `allow_downgrade` (refused by version 1, which
    /// had no field for it) and the tcp settings; the kinds reach the agent intact.
    #[test]
    fn kinds_and_options_travel_in_central_sets() {
        let mut r = raw(1, "https://example.org/");
        r.allow_downgrade = true;
        let spec = check_portable(&r).unwrap();
        assert!(!spec.fits_v1());
        assert!(
            Target::from_raw(raw_from_spec(&spec))
                .unwrap()
                .allow_downgrade
        );
        let mut tcp = raw(2, "");
        tcp.kind = ProbeKind::Tcp;
        tcp.url.clear();
        tcp.address = Some("db.example:5432".into());
        tcp.send = Some("PING\r\n".into());
        tcp.expect = Some("+PONG".into());
        let mut tls = raw(3, "");
        tls.kind = ProbeKind::Tls;
        tls.url.clear();
        tls.address = Some("[::1]:443".into());
        let f = frame(4, &[r, tcp, tls]);
        let set = validate_frame(&f).unwrap();
        let kinds: Vec<ProbeKind> = set.targets.iter().map(|t| t.kind).collect();
        assert_eq!(kinds, [ProbeKind::Http, ProbeKind::Tcp, ProbeKind::Tls]);
        assert_eq!(set.targets[1].send, b"PING\r\n");
        assert_eq!(set.targets[1].expect, b"+PONG");
        assert_eq!(
            set.targets[2].address.as_ref().unwrap().to_string(),
            "[::1]:443"
        );
        // An agent that sends version 3 frames cannot carry them: the set is refused (and the
        // previous one kept), naming the target.
        let e = validate_frame_for(&f, WireFormat::V3).unwrap_err();
        assert!(
            e.contains("target 2 (t2)") && e.contains("wire_format = 4"),
            "{e}"
        );
        let dir = temp_dir("kinds-v3");
        let mut book = TargetBook::load_for(&dir, "v", "eu", "pi", WireFormat::V3);
        let http_only = frame(1, &[raw(1, "http://a/")]);
        assert_eq!(book.offer(SetScope::Region, &http_only), Offered::Accepted);
        assert!(matches!(
            book.offer(SetScope::Region, &f),
            Offered::Rejected(_)
        ));
        assert_eq!(ids(&book), [1]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn too_long_values_name_their_key() {
        let r = raw(1, &format!("https://example.org/{}", "a".repeat(600)));
        assert_eq!(spec_from_raw(&r).unwrap_err().key, "url");
    }

    #[test]
    fn accepts_persists_and_reloads() {
        let dir = temp_dir("reload");
        let mut book = TargetBook::load(&dir, "v", "eu", "pi");
        assert!(book.effective().is_empty());
        let f = frame(1, &[raw(1, "http://a/"), raw(2, "http://b/")]);
        assert_eq!(book.offer(SetScope::Region, &f), Offered::Accepted);
        assert_eq!(book.offer(SetScope::Region, &f), Offered::Unchanged);
        assert_eq!(ids(&book), [1, 2]);
        let again = TargetBook::load(&dir, "v", "eu", "pi");
        assert_eq!(ids(&again), [1, 2]);
        assert_eq!(again.region_generation(), 1);
    }

    #[test]
    fn invalid_set_is_rejected_and_the_old_one_kept() {
        let dir = temp_dir("reject");
        let mut book = TargetBook::load(&dir, "v", "eu", "pi");
        book.offer(SetScope::Region, &frame(1, &[raw(1, "http://a/")]));
        // A spec the agent refuses: timeout longer than the interval.
        let mut bad = raw(2, "http://b/");
        bad.timeout = Duration::from_secs(60);
        let f = frame(2, &[bad]);
        let Offered::Rejected(reason) = book.offer(SetScope::Region, &f) else {
            panic!("accepted an invalid set")
        };
        assert!(reason.contains("timeout"), "{reason}");
        assert_eq!(ids(&book), [1]);
        let r = book.rejection().unwrap();
        assert_eq!((r.scope, r.generation), (SetScope::Region, 2));
        // Garbage is refused too, and never persisted.
        assert!(matches!(
            book.offer(SetScope::Region, b"\x01\xff\xff"),
            Offered::Rejected(_)
        ));
        assert_eq!(ids(&TargetBook::load(&dir, "v", "eu", "pi")), [1]);
        // A later good set clears the rejection.
        book.offer(SetScope::Region, &frame(3, &[raw(5, "http://c/")]));
        assert!(book.rejection().is_none());
        assert_eq!(ids(&book), [5]);
    }

    /// Issue #14 item 12: an older generation than the one held is refused (a broker restored
    /// from a backup must not roll the agent back), and reported; the same or a newer one is not.
    #[test]
    fn an_older_generation_is_refused() {
        let dir = temp_dir("older");
        let mut book = TargetBook::load(&dir, "v", "eu", "pi");
        assert_eq!(
            book.offer(SetScope::Region, &frame(5, &[raw(1, "http://a/")])),
            Offered::Accepted
        );
        let Offered::Rejected(reason) =
            book.offer(SetScope::Region, &frame(4, &[raw(2, "http://b/")]))
        else {
            panic!("an older generation was accepted")
        };
        assert!(
            reason.contains("generation 4 is older than the generation 5"),
            "{reason}"
        );
        assert_eq!(ids(&book), [1]);
        let r = book.rejection().unwrap();
        assert_eq!((r.scope, r.generation), (SetScope::Region, 4));
        assert_eq!(ids(&TargetBook::load(&dir, "v", "eu", "pi")), [1]);
        // Same generation (a republish), then a newer one: accepted.
        assert_eq!(
            book.offer(SetScope::Region, &frame(5, &[raw(3, "http://c/")])),
            Offered::Accepted
        );
        assert!(book.rejection().is_none());
        assert_eq!(
            book.offer(SetScope::Region, &frame(6, &[raw(4, "http://d/")])),
            Offered::Accepted
        );
        // After a clear, any generation starts over.
        assert_eq!(book.offer(SetScope::Region, b""), Offered::Accepted);
        assert_eq!(
            book.offer(SetScope::Region, &frame(1, &[raw(1, "http://a/")])),
            Offered::Accepted
        );
    }

    /// Issue #14 item 13: a refusal is cleared when the set held is published again (the
    /// documented fix: re-apply the good file), although that set is unchanged.
    #[test]
    fn republishing_the_held_set_clears_the_refusal() {
        let dir = temp_dir("republish");
        let mut book = TargetBook::load(&dir, "v", "eu", "pi");
        let good = frame(1, &[raw(1, "http://a/")]);
        book.offer(SetScope::Region, &good);
        let mut bad = raw(2, "http://b/");
        bad.timeout = Duration::from_secs(60);
        assert!(matches!(
            book.offer(SetScope::Region, &frame(99, &[bad])),
            Offered::Rejected(_)
        ));
        assert!(book.rejection().is_some());
        assert_eq!(book.offer(SetScope::Region, &good), Offered::Unchanged);
        assert!(book.rejection().is_none(), "{:?}", book.rejection());
    }

    /// Issue #14 item 12: persisted file names cannot collide: with `-` between the parts,
    /// prefix `a-b` + region `c` and prefix `a` + region `b-c` shared one file.
    #[test]
    fn persisted_names_are_unambiguous() {
        let dir = temp_dir("names");
        let mut one = TargetBook::load(&dir, "a-b", "c", "pi");
        one.offer(SetScope::Region, &frame(1, &[raw(1, "http://a/")]));
        let other = TargetBook::load(&dir, "a", "b-c", "pi");
        assert_ne!(one.path(SetScope::Region), other.path(SetScope::Region));
        assert!(
            other.effective().is_empty(),
            "another scope's persisted set was loaded"
        );
        let agent_a = TargetBook::load(&dir, "v", "eu-x", "pi");
        let agent_b = TargetBook::load(&dir, "v", "eu", "x-pi");
        assert_ne!(agent_a.path(SetScope::Agent), agent_b.path(SetScope::Agent));
    }

    /// A set persisted under the pre-#14 name is still found when that name is unambiguous,
    /// and moves to the new name at the next accepted set.
    #[test]
    fn unambiguous_legacy_names_are_read() {
        let dir = temp_dir("legacy");
        let f = frame(3, &[raw(1, "http://a/")]);
        std::fs::write(dir.join("targets-region-v-eu.bin"), &f).unwrap();
        let mut book = TargetBook::load(&dir, "v", "eu", "pi");
        assert_eq!(book.region_generation(), 3);
        book.offer(SetScope::Region, &frame(4, &[raw(1, "http://a/")]));
        assert!(book.path(SetScope::Region).is_file());
        assert!(!dir.join("targets-region-v-eu.bin").exists());
        // With a '-' in a part the old name is ambiguous: not read.
        std::fs::write(dir.join("targets-region-v-eu-x.bin"), &f).unwrap();
        assert!(TargetBook::load(&dir, "v", "eu-x", "pi")
            .effective()
            .is_empty());
    }

    #[test]
    fn agent_set_counts_only_when_not_older_than_the_region_set() {
        let dir = temp_dir("agent");
        let mut book = TargetBook::load(&dir, "v", "eu", "pi");
        book.offer(SetScope::Agent, &frame(4, &[raw(9, "http://pinned/")]));
        book.offer(SetScope::Region, &frame(4, &[raw(1, "http://a/")]));
        assert_eq!(ids(&book), [1, 9]);
        assert_eq!(book.agent_generation(), 4);
        // A newer apply without a set for this agent: the old agent set no longer counts.
        book.offer(SetScope::Region, &frame(5, &[raw(1, "http://a/")]));
        assert_eq!(ids(&book), [1]);
        assert_eq!(book.agent_generation(), 0);
        // Clearing the agent set (empty retained payload) removes the file too.
        assert_eq!(book.offer(SetScope::Agent, b""), Offered::Accepted);
        assert!(!book.path(SetScope::Agent).exists());
        // Another agent (a cloned card) or region does not pick up these files.
        book.offer(SetScope::Region, &frame(6, &[raw(1, "http://a/")]));
        assert_eq!(ids(&TargetBook::load(&dir, "v", "eu", "pi")), [1]);
        assert!(TargetBook::load(&dir, "v", "eu", "pi-2").agent_generation() == 0);
        assert!(TargetBook::load(&dir, "v", "us", "pi")
            .effective()
            .is_empty());
    }
}
