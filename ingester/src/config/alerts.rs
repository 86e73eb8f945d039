//! The `[alerts]` section: evaluation settings, rules (`[[alerts.rules]]`) and receivers
//! (`[[alerts.alertmanagers]]`, `[[alerts.webhooks]]`), raw (serde) and validated.
//!
//! Validation happens at load, like every other section: a rule with a key its kind does not
//! use, a threshold out of range or a duplicate name is refused with the key (e.g.
//! `alerts.rules[2].min_share`) and the reason; `mod.rs` adds the file name.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::secrets::Secret;

/// `[alerts]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    /// How often the active evaluator reads PostgreSQL and evaluates every rule (default 10s).
    #[serde(default, with = "humantime_serde")]
    pub evaluation_interval: Option<Duration>,
    /// How often firing alerts are re-sent to each Alertmanager (default 1m, Prometheus's
    /// `--rules.alert.resend-delay`); a change is sent at once.
    #[serde(default, with = "humantime_serde")]
    pub resend_interval: Option<Duration>,
    /// A region's latest result older than this does not vote (default 90s). Rules may override.
    #[serde(default, with = "humantime_serde")]
    pub stale_after: Option<Duration>,
    /// Regions and agents not heard of for this long are forgotten by `no_data` and
    /// `probe_stale` (default 24h): a decommissioned Pi stops alerting.
    #[serde(default, with = "humantime_serde")]
    pub forget_after: Option<Duration>,
    /// Link to a target put in every alert (`generatorURL`, annotation `link`, webhook body);
    /// `{target_id}` and `{target_name}` are replaced. Default: none.
    pub link: Option<String>,
    /// Labels added to every alert (like Prometheus's `external_labels`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Evaluations of history kept per subject for flap detection (default 10).
    pub flap_window: Option<u32>,
    /// Share of state changes among the `flap_window` last evaluations from which a subject is
    /// flapping (default 0.4) ...
    pub flap_start: Option<f64>,
    /// ... and at or below which it stops (default 0.15).
    pub flap_stop: Option<f64>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
    #[serde(default)]
    pub alertmanagers: Vec<RawAlertmanager>,
    #[serde(default)]
    pub webhooks: Vec<RawWebhook>,
}

/// One `[[alerts.rules]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// The alert's name (`alertname`): `[a-z0-9_-]`, 1 to 64 bytes, unique.
    pub name: String,
    /// `down`, `slow`, `cert_expiry`, `no_data`, `probe_stale` or `gaps`.
    pub kind: String,
    /// Target names (strings) or ids (integers); absent: every target.
    pub targets: Option<Vec<TargetRef>>,
    /// Regions whose results count; absent: every region.
    pub regions: Option<Vec<String>>,
    /// Label `severity` (default `critical` for `down`, else `warning`).
    pub severity: Option<String>,
    /// `down`, `slow`, `cert_expiry`: regions that must agree (default 2, or all reporting
    /// regions when fewer report).
    pub min_regions: Option<u32>,
    /// `down`: or at least this share (0..=1) of the reporting regions.
    pub min_share: Option<f64>,
    /// Consecutive bad evaluations before the alert fires (default 2 for `down`, else 1).
    #[serde(rename = "for")]
    pub for_evaluations: Option<u32>,
    /// Consecutive good evaluations before it resolves (default 2 for `down`, else 1).
    pub resolve_after: Option<u32>,
    /// Overrides `alerts.stale_after` for this rule.
    #[serde(default, with = "humantime_serde")]
    pub stale_after: Option<Duration>,
    /// `slow`: `p50`, `p95` (default) or `p99`.
    pub percentile: Option<String>,
    /// `slow`: only `total` (the phase `region_comparison` reports).
    pub phase: Option<String>,
    /// `slow`: window of the percentile (default 5m, whole minutes); `gaps`: how long a gap
    /// keeps the alert open (default 1h).
    #[serde(default, with = "humantime_serde")]
    pub window: Option<Duration>,
    /// `slow`: the percentile above this is slow, e.g. "800ms".
    #[serde(default, with = "humantime_serde")]
    pub threshold: Option<Duration>,
    /// `cert_expiry`: alert when the certificate expires within this many days (default 14).
    pub days: Option<u32>,
}

/// A target named in a rule: by name or by id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TargetRef {
    Id(i64),
    Name(String),
}

/// One `[[alerts.alertmanagers]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlertmanager {
    /// Base URL, e.g. `http://127.0.0.1:9093`; alerts go to `<url>/api/v2/alerts`.
    pub url: String,
    /// Name in metrics and logs (default: the URL's host:port).
    pub name: Option<String>,
    /// Plain HTTP to a host that is not this machine (default false: refused).
    #[serde(default)]
    pub allow_plaintext: bool,
}

/// One `[[alerts.webhooks]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    /// `[a-z0-9_-]`, unique; names the delivery cursor in PostgreSQL.
    pub name: String,
    pub url: String,
    /// Environment variable holding the HMAC-SHA256 key.
    pub secret_env: Option<String>,
    /// File whose first line is the HMAC-SHA256 key.
    pub secret_file: Option<PathBuf>,
    /// Give up on an event this old (default 24h).
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    #[serde(default)]
    pub allow_plaintext: bool,
}

/// What a rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Down,
    Slow,
    CertExpiry,
    NoData,
    ProbeStale,
    Gaps,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Down => "down",
            Kind::Slow => "slow",
            Kind::CertExpiry => "cert_expiry",
            Kind::NoData => "no_data",
            Kind::ProbeStale => "probe_stale",
            Kind::Gaps => "gaps",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        [
            Kind::Down,
            Kind::Slow,
            Kind::CertExpiry,
            Kind::NoData,
            Kind::ProbeStale,
            Kind::Gaps,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// The rule keys this kind reads (besides name, kind, targets, regions, severity, for,
    /// resolve_after, stale_after).
    fn keys(self) -> &'static [&'static str] {
        match self {
            Kind::Down => &["min_regions", "min_share"],
            Kind::Slow => &["min_regions", "percentile", "phase", "window", "threshold"],
            Kind::CertExpiry => &["min_regions", "days"],
            Kind::NoData | Kind::ProbeStale => &[],
            Kind::Gaps => &["window"],
        }
    }
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub kind: Kind,
    /// Target ids and names; both empty: every target.
    pub target_ids: Vec<i32>,
    pub target_names: Vec<String>,
    /// Empty: every region.
    pub regions: Vec<String>,
    pub severity: String,
    pub min_regions: u32,
    pub min_share: Option<f64>,
    pub for_evaluations: u32,
    pub resolve_after: u32,
    pub stale_after: Duration,
    /// `slow`: 0.5, 0.95 or 0.99.
    pub percentile: f64,
    pub window: Duration,
    pub threshold: Duration,
    pub days: u32,
}

impl Rule {
    /// The rule used when none is configured: `down` for every target, default thresholds.
    pub fn default_down(stale_after: Duration) -> Rule {
        Rule {
            name: "down".into(),
            kind: Kind::Down,
            target_ids: Vec::new(),
            target_names: Vec::new(),
            regions: Vec::new(),
            severity: "critical".into(),
            min_regions: 2,
            min_share: None,
            for_evaluations: 2,
            resolve_after: 2,
            stale_after,
            percentile: 0.95,
            window: Duration::from_secs(300),
            threshold: Duration::ZERO,
            days: 14,
        }
    }

    /// The regions whose votes this rule needs to call the subject bad, out of `reporting`:
    /// `min_regions`, or all of them when fewer report.
    pub fn needed(&self, reporting: u32) -> u32 {
        self.min_regions.min(reporting).max(1)
    }

    /// Whether `failing` of `reporting` regions make the subject bad.
    pub fn agree(&self, failing: u32, reporting: u32) -> bool {
        if failing == 0 || reporting == 0 {
            return false;
        }
        failing >= self.needed(reporting)
            || self
                .min_share
                .is_some_and(|s| f64::from(failing) >= s * f64::from(reporting))
    }
}

/// A receiver's transport: where to connect and whether over TLS.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub uri: hyper::Uri,
    pub tls: bool,
}

#[derive(Debug, Clone)]
pub struct Alertmanager {
    pub name: String,
    /// `<url>/api/v2/alerts`.
    pub endpoint: Endpoint,
}

#[derive(Debug, Clone)]
pub struct Webhook {
    pub name: String,
    pub endpoint: Endpoint,
    pub secret: Option<Secret>,
    pub max_age: Duration,
}

/// The validated `[alerts]` section.
#[derive(Debug, Clone)]
pub struct AlertsConfig {
    pub evaluation_interval: Duration,
    pub resend_interval: Duration,
    pub forget_after: Duration,
    pub link: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub flap_window: u32,
    pub flap_start: f64,
    pub flap_stop: f64,
    /// Never empty: the default `down` rule when none is configured.
    pub rules: Vec<Rule>,
    /// Whether `rules` is the default.
    pub default_rules: bool,
    pub alertmanagers: Vec<Alertmanager>,
    pub webhooks: Vec<Webhook>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        // The defaults are valid by construction.
        AlertsConfig::try_from(RawAlerts::default()).unwrap_or_else(|_| unreachable!())
    }
}

use super::Invalid;

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__` (reserved).
fn is_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
        && !s.starts_with("__")
}

/// Labels vantage sets itself; `alerts.labels` may not replace them.
const OWN_LABELS: &[&str] = &[
    "alertname",
    "target",
    "target_name",
    "regions",
    "region",
    "agent",
    "severity",
];

fn endpoint(key: &str, url: &str, allow_plaintext: bool, path: &str) -> Result<Endpoint, Invalid> {
    let bad = |r: String| (key.to_owned(), r);
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| bad(format!("{url:?} is not a URL: {e}")))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad(format!("{url:?}: use http:// or https://"))),
    };
    let host = uri
        .host()
        .ok_or_else(|| bad(format!("{url:?} has no host")))?;
    if !tls && !allow_plaintext && !crate::tls::is_loopback_host(host.trim_matches(['[', ']'])) {
        return Err(bad(format!(
            "{host} is not on this machine: use https:// (or allow_plaintext = true to send \
             alerts in clear text)"
        )));
    }
    if uri.query().is_some() && !path.is_empty() {
        return Err(bad(format!("{url:?}: a base URL has no query")));
    }
    let uri = if path.is_empty() {
        uri
    } else {
        let base = uri.path().trim_end_matches('/');
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
        format!(
            "{}://{authority}{base}{path}",
            uri.scheme_str().unwrap_or("http")
        )
        .parse()
        .map_err(|e| bad(format!("{url:?}: {e}")))?
    };
    Ok(Endpoint { uri, tls })
}

impl TryFrom<RawAlerts> for AlertsConfig {
    type Error = Invalid;

    fn try_from(raw: RawAlerts) -> Result<AlertsConfig, Invalid> {
        let bad = |key: &str, reason: &str| Err((key.to_owned(), reason.to_owned()));
        let evaluation_interval = raw.evaluation_interval.unwrap_or(Duration::from_secs(10));
        if evaluation_interval < Duration::from_millis(100) {
            return bad("alerts.evaluation_interval", "must be at least 100ms");
        }
        let resend_interval = raw.resend_interval.unwrap_or(Duration::from_secs(60));
        if resend_interval < Duration::from_millis(100) {
            return bad("alerts.resend_interval", "must be at least 100ms");
        }
        let stale_after = raw.stale_after.unwrap_or(Duration::from_secs(90));
        if stale_after < Duration::from_secs(1) {
            return bad("alerts.stale_after", "must be at least 1s");
        }
        let forget_after = raw.forget_after.unwrap_or(Duration::from_secs(86_400));
        if forget_after <= stale_after {
            return bad(
                "alerts.forget_after",
                "must be longer than alerts.stale_after",
            );
        }
        if let Some(link) = &raw.link {
            if !(link.starts_with("https://") || link.starts_with("http://")) {
                return bad("alerts.link", "must start with http:// or https://");
            }
        }
        for (name, value) in &raw.labels {
            if !is_label_name(name) {
                return Err((
                    format!("alerts.labels.{name}"),
                    "not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, no leading __)".into(),
                ));
            }
            if OWN_LABELS.contains(&name.as_str()) {
                return Err((
                    format!("alerts.labels.{name}"),
                    "is set by vantage itself".into(),
                ));
            }
            if value.is_empty() {
                return Err((format!("alerts.labels.{name}"), "must not be empty".into()));
            }
        }
        let flap_window = raw.flap_window.unwrap_or(10);
        if !(4..=64).contains(&flap_window) {
            return bad("alerts.flap_window", "must be 4..=64 evaluations");
        }
        let flap_start = raw.flap_start.unwrap_or(0.4);
        let flap_stop = raw.flap_stop.unwrap_or(0.15);
        if !(flap_start > 0.0 && flap_start <= 1.0) {
            return bad("alerts.flap_start", "must be in (0, 1]");
        }
        if !(0.0..flap_start).contains(&flap_stop) {
            return bad("alerts.flap_stop", "must be in [0, flap_start)");
        }

        let mut rules = Vec::new();
        for (i, r) in raw.rules.into_iter().enumerate() {
            let rule = rule(i, r, stale_after)?;
            if rules.iter().any(|o: &Rule| o.name == rule.name) {
                return Err((
                    format!("alerts.rules[{i}].name"),
                    format!("{:?} is the name of an earlier rule", rule.name),
                ));
            }
            rules.push(rule);
        }
        let default_rules = rules.is_empty();
        if default_rules {
            rules.push(Rule::default_down(stale_after));
        }

        let mut alertmanagers = Vec::new();
        for (i, a) in raw.alertmanagers.iter().enumerate() {
            let key = format!("alerts.alertmanagers[{i}].url");
            let endpoint = endpoint(&key, &a.url, a.allow_plaintext, "/api/v2/alerts")?;
            let name = a.name.clone().unwrap_or_else(|| {
                endpoint
                    .uri
                    .authority()
                    .map_or_else(|| a.url.clone(), |x| x.to_string())
            });
            if alertmanagers.iter().any(|o: &Alertmanager| o.name == name) {
                return Err((
                    format!("alerts.alertmanagers[{i}].name"),
                    format!("{name:?} is already the name of another Alertmanager"),
                ));
            }
            alertmanagers.push(Alertmanager { name, endpoint });
        }
        let mut webhooks = Vec::new();
        for (i, w) in raw.webhooks.iter().enumerate() {
            let key = |k: &str| format!("alerts.webhooks[{i}].{k}");
            if !is_name(&w.name) || webhooks.iter().any(|o: &Webhook| o.name == w.name) {
                return Err((
                    key("name"),
                    format!("{:?}: [a-z0-9_-], 1 to 64 bytes, unique", w.name),
                ));
            }
            let endpoint = endpoint(&key("url"), &w.url, w.allow_plaintext, "")?;
            let secret = match (&w.secret_env, &w.secret_file) {
                (Some(_), Some(_)) => {
                    return Err((
                        key("secret_env"),
                        "set secret_env or secret_file, not both".into(),
                    ))
                }
                (Some(var), None) => {
                    Some(crate::secrets::from_env(var).map_err(|r| (key("secret_env"), r))?)
                }
                (None, Some(path)) => {
                    Some(crate::secrets::from_file(path).map_err(|r| (key("secret_file"), r))?)
                }
                (None, None) => None,
            };
            if secret.as_ref().is_some_and(|s| s.expose().len() < 16) {
                return Err((
                    key(if w.secret_env.is_some() {
                        "secret_env"
                    } else {
                        "secret_file"
                    }),
                    "the secret must be at least 16 bytes".into(),
                ));
            }
            let max_age = w.max_age.unwrap_or(Duration::from_secs(86_400));
            webhooks.push(Webhook {
                name: w.name.clone(),
                endpoint,
                secret,
                max_age,
            });
        }
        Ok(AlertsConfig {
            evaluation_interval,
            resend_interval,
            forget_after,
            link: raw.link,
            labels: raw.labels,
            flap_window,
            flap_start,
            flap_stop,
            rules,
            default_rules,
            alertmanagers,
            webhooks,
        })
    }
}

fn rule(i: usize, r: RawRule, default_stale: Duration) -> Result<Rule, Invalid> {
    let key = |k: &str| format!("alerts.rules[{i}].{k}");
    let bad = |k: &str, reason: String| Err((key(k), reason));
    if !is_name(&r.name) {
        return bad(
            "name",
            format!("{:?}: use [a-z0-9_-], 1 to 64 bytes", r.name),
        );
    }
    let Some(kind) = Kind::parse(&r.kind) else {
        return bad(
            "kind",
            format!(
                "{:?} is not one of down, slow, cert_expiry, no_data, probe_stale, gaps",
                r.kind
            ),
        );
    };
    // A key this kind does not read is a mistake worth reporting (a `threshold` on a `down`
    // rule does nothing, and silently).
    let set = [
        ("min_regions", r.min_regions.is_some()),
        ("min_share", r.min_share.is_some()),
        ("percentile", r.percentile.is_some()),
        ("phase", r.phase.is_some()),
        ("window", r.window.is_some()),
        ("threshold", r.threshold.is_some()),
        ("days", r.days.is_some()),
    ];
    if let Some((k, _)) = set.iter().find(|(k, on)| *on && !kind.keys().contains(k)) {
        return bad(k, format!("not a key of kind {}", kind.as_str()));
    }
    if matches!(kind, Kind::NoData | Kind::ProbeStale | Kind::Gaps) && r.targets.is_some() {
        return bad(
            "targets",
            format!(
                "kind {} watches regions and agents, not targets",
                kind.as_str()
            ),
        );
    }
    let mut target_ids = Vec::new();
    let mut target_names = Vec::new();
    if let Some(targets) = r.targets {
        if targets.is_empty() {
            return bad("targets", "is empty (leave it out for every target)".into());
        }
        for t in targets {
            match t {
                TargetRef::Id(id) => match i32::try_from(id) {
                    Ok(id) if id >= 1 => target_ids.push(id),
                    _ => return bad("targets", format!("target id {id} is not 1..=2147483647")),
                },
                TargetRef::Name(n) if !n.is_empty() => target_names.push(n),
                TargetRef::Name(_) => return bad("targets", "an empty target name".into()),
            }
        }
    }
    let regions = r.regions.unwrap_or_default();
    if let Some(bad_region) = regions.iter().find(|g| !vantage_proto::is_valid_name(g)) {
        return bad("regions", format!("{bad_region:?} is not a region name"));
    }
    let severity = r.severity.unwrap_or_else(|| {
        if kind == Kind::Down {
            "critical".into()
        } else {
            "warning".into()
        }
    });
    if !is_name(&severity) {
        return bad(
            "severity",
            format!("{severity:?}: use [a-z0-9_-], 1 to 64 bytes"),
        );
    }
    let min_regions = r.min_regions.unwrap_or(2);
    if min_regions == 0 {
        return bad("min_regions", "must be at least 1".into());
    }
    if let Some(s) = r.min_share {
        if !(s > 0.0 && s <= 1.0) {
            return bad("min_share", format!("{s} is not in (0, 1]"));
        }
    }
    let (default_for, default_resolve) = if kind == Kind::Down { (2, 2) } else { (1, 1) };
    let for_evaluations = r.for_evaluations.unwrap_or(default_for);
    if !(1..=1000).contains(&for_evaluations) {
        return bad("for", "must be 1..=1000 evaluations".into());
    }
    let resolve_after = r.resolve_after.unwrap_or(default_resolve);
    if !(1..=1000).contains(&resolve_after) {
        return bad("resolve_after", "must be 1..=1000 evaluations".into());
    }
    let stale_after = r.stale_after.unwrap_or(default_stale);
    if stale_after < Duration::from_secs(1) {
        return bad("stale_after", "must be at least 1s".into());
    }
    let percentile = match r.percentile.as_deref().unwrap_or("p95") {
        "p50" => 0.5,
        "p95" => 0.95,
        "p99" => 0.99,
        other => return bad("percentile", format!("{other:?} is not p50, p95 or p99")),
    };
    if let Some(phase) = &r.phase {
        if phase != "total" {
            return bad(
                "phase",
                format!(
                    "{phase:?}: only \"total\" (region_comparison's percentiles are of the total \
                     time)"
                ),
            );
        }
    }
    let window = r.window.unwrap_or(if kind == Kind::Gaps {
        Duration::from_secs(3600)
    } else {
        Duration::from_secs(300)
    });
    if kind == Kind::Slow
        && (window < Duration::from_secs(60) || window >= Duration::from_secs(6 * 3600))
    {
        return bad("window", "must be 1m..6h (minute rollups)".into());
    }
    if kind == Kind::Gaps && window < Duration::from_secs(1) {
        return bad("window", "must be at least 1s".into());
    }
    let threshold = r.threshold.unwrap_or_default();
    if kind == Kind::Slow && threshold.is_zero() {
        return bad(
            "threshold",
            "is required for kind slow (e.g. \"800ms\")".into(),
        );
    }
    let days = r.days.unwrap_or(14);
    if kind == Kind::CertExpiry && !(1..=3650).contains(&days) {
        return bad("days", "must be 1..=3650".into());
    }
    Ok(Rule {
        name: r.name,
        kind,
        target_ids,
        target_names,
        regions,
        severity,
        min_regions,
        min_share: r.min_share,
        for_evaluations,
        resolve_after,
        stale_after,
        percentile,
        window,
        threshold,
        days,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AlertsConfig, Invalid> {
        let raw: RawAlerts =
            toml::from_str(text).map_err(|e| ("toml".to_owned(), e.to_string()))?;
        AlertsConfig::try_from(raw)
    }

    #[test]
    fn no_rule_means_the_default_down_rule() {
        let c = parse("").unwrap();
        assert!(c.default_rules);
        assert_eq!(c.rules, vec![Rule::default_down(Duration::from_secs(90))]);
        assert_eq!(c.evaluation_interval, Duration::from_secs(10));
        assert_eq!(c.resend_interval, Duration::from_secs(60));
    }

    #[test]
    fn down_needs_min_regions_or_all_when_fewer_report() {
        let r = Rule::default_down(Duration::from_secs(90));
        assert!(!r.agree(1, 3));
        assert!(r.agree(2, 3));
        // One region reporting: it is all there is.
        assert!(r.agree(1, 1));
        assert!(!r.agree(0, 0));
        let share = Rule {
            min_regions: 5,
            min_share: Some(0.5),
            ..r
        };
        assert!(share.agree(2, 4));
        assert!(!share.agree(1, 4));
    }

    #[test]
    fn bad_rules_are_refused_with_key_and_reason() {
        for (text, key, needle) in [
            ("[[rules]]\nname = \"x\"\nkind = \"boom\"", "alerts.rules[0].kind", "not one of"),
            (
                "[[rules]]\nname = \"x\"\nkind = \"down\"\nthreshold = \"1s\"",
                "alerts.rules[0].threshold",
                "not a key of kind down",
            ),
            (
                "[[rules]]\nname = \"x\"\nkind = \"down\"\nmin_share = 1.5",
                "alerts.rules[0].min_share",
                "not in (0, 1]",
            ),
            (
                "[[rules]]\nname = \"x\"\nkind = \"down\"\n[[rules]]\nname = \"x\"\nkind = \"gaps\"",
                "alerts.rules[1].name",
                "earlier rule",
            ),
            ("[[rules]]\nname = \"x\"\nkind = \"slow\"", "alerts.rules[0].threshold", "required"),
            (
                "[[rules]]\nname = \"x\"\nkind = \"slow\"\nthreshold = \"1s\"\nphase = \"dns\"",
                "alerts.rules[0].phase",
                "only \"total\"",
            ),
            (
                "[[rules]]\nname = \"x\"\nkind = \"down\"\nfor = 0",
                "alerts.rules[0].for",
                "1..=1000",
            ),
            (
                "[[rules]]\nname = \"x\"\nkind = \"no_data\"\ntargets = [\"shop\"]",
                "alerts.rules[0].targets",
                "not targets",
            ),
            (
                "[[rules]]\nname = \"x\"\nkind = \"down\"\ntargets = [0]",
                "alerts.rules[0].targets",
                "not 1..=",
            ),
            ("[labels]\nseverity = \"x\"", "alerts.labels.severity", "set by vantage"),
            (
                "[[alertmanagers]]\nurl = \"http://am.example:9093\"",
                "alerts.alertmanagers[0].url",
                "not on this machine",
            ),
            (
                "[[webhooks]]\nname = \"w\"\nurl = \"https://h.example/x\"\nsecret_env = \"VANTAGE_TEST_NO_SUCH_SECRET\"",
                "alerts.webhooks[0].secret_env",
                "VANTAGE_TEST_NO_SUCH_SECRET is not set",
            ),
            ("flap_stop = 0.5", "alerts.flap_stop", "[0, flap_start)"),
        ] {
            let (k, reason) = parse(text).unwrap_err();
            assert_eq!(k, key, "{text}: {reason}");
            assert!(reason.contains(needle), "{text}: {reason}");
        }
    }

    #[test]
    fn receivers_and_selectors() {
        let c = parse(
            r#"
evaluation_interval = "1s"
[[rules]]
name = "shop-down"
kind = "down"
targets = ["shop", 7]
regions = ["eu-north", "us-east"]
min_regions = 2
for = 3
resolve_after = 4
[[alertmanagers]]
url = "http://127.0.0.1:9093/"
[[webhooks]]
name = "ops"
url = "https://hooks.example/vantage?x=1"
"#,
        )
        .unwrap();
        let r = &c.rules[0];
        assert_eq!(
            (r.target_ids.clone(), r.target_names.clone()),
            (vec![7], vec!["shop".to_owned()])
        );
        assert_eq!((r.for_evaluations, r.resolve_after), (3, 4));
        assert_eq!(
            c.alertmanagers[0].endpoint.uri.to_string(),
            "http://127.0.0.1:9093/api/v2/alerts"
        );
        assert_eq!(c.alertmanagers[0].name, "127.0.0.1:9093");
        assert!(c.webhooks[0].endpoint.tls);
        assert_eq!(c.webhooks[0].endpoint.uri.query(), Some("x=1"));
    }
}
