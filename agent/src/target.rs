//! One target's probe settings: the raw TOML/serde shape ([`RawTarget`]) and the validated
//! [`Target`] the probe engine runs with.
//!
//! Kept apart from the agent's own configuration because targets also arrive from elsewhere
//! (a central target set), and must be validated the same way wherever they come from.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

/// Shortest probe interval accepted: faster than this is a load test, not monitoring.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Default time between two probes of a target.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// Default deadline of one probe, all phases and redirects included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of redirects followed; 0 records the 3xx itself.
pub const DEFAULT_MAX_REDIRECTS: u8 = 5;
/// Default most body bytes read (and searched by the regex); the rest is not downloaded.
pub const DEFAULT_BODY_CAP: usize = 1024 * 1024;
/// Largest body cap accepted (memory per probe is bounded by it).
pub const MAX_BODY_CAP: usize = 64 * 1024 * 1024;

/// A target as written in a config file.
///
/// `Debug` is written by hand: a URL's `user:password` and header values (tokens, in practice)
/// are secrets and never printed.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    /// Stable numeric id; the same target has the same id in every region.
    pub id: u32,
    /// Optional human name (shown in logs).
    pub name: Option<String>,
    /// `http://` or `https://` URL. A `user:password@` in it is sent as HTTP basic
    /// authentication (percent-decoded, as curl does) and removed from the URL the probe uses.
    pub url: String,
    /// Time between two probes (default 30s, at least 100ms).
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Deadline of one probe, all phases and redirects included (default 10s); at most `interval`.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Regular expression (regex-lite syntax) searched in the body's text.
    pub regex: Option<String>,
    /// HTTP method (default `GET`).
    #[serde(default = "default_method")]
    pub method: String,
    /// Extra request headers, `name = "value"`. Values often are credentials: `Debug` hides
    /// them, but they travel in the target set and sit in `targets.spec`; for secrets use
    /// `headers_from_env` / `header_files`.
    #[serde(default)]
    pub headers: HeaderValues,
    /// Headers whose value is read on the agent from an environment variable:
    /// `name = "VARIABLE"`. Only the variable's name is written anywhere else (issue #14).
    #[serde(default)]
    pub headers_from_env: BTreeMap<String, String>,
    /// Headers whose value is the first line of a file on the agent: `name = "/path"`.
    #[serde(default)]
    pub header_files: BTreeMap<String, PathBuf>,
    /// Status codes that count as up: codes and ranges, e.g. `["200-299", 301]` (default 2xx).
    #[serde(default)]
    pub accepted_status: Vec<StatusSpec>,
    /// Redirects to follow (default 5); 0 records the redirect response itself.
    #[serde(default = "default_max_redirects")]
    pub max_redirects: u8,
    /// Most body bytes read (default 1 MiB, at most 64 MiB).
    #[serde(default = "default_body_cap")]
    pub body_cap: usize,
    /// PEM file of CA certificates to trust for this target instead of the bundled roots.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate. Only for targets you knowingly run with broken TLS.
    #[serde(default)]
    pub tls_skip_verify: bool,
    /// `auto` (default), `ipv4` or `ipv6`.
    #[serde(default)]
    pub ip_family: IpFamily,
    /// Follow a redirect from `https` to `http` (default false: such a probe ends as
    /// `downgrade_refused` and nothing is sent in the clear).
    #[serde(default)]
    pub allow_downgrade: bool,
}

/// Literal header values (`headers`): a map whose `Debug` shows the names only, because values
/// are often credentials (the raw types are logged with `{:?}`).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct HeaderValues(pub BTreeMap<String, String>);

impl std::fmt::Debug for HeaderValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

impl std::fmt::Debug for RawTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Variable names and paths of header_from_env / header_files are not secrets.
        f.debug_struct("RawTarget")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("url", &redact_userinfo(&self.url))
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("regex", &self.regex)
            .field("method", &self.method)
            .field("headers", &self.headers)
            .field("headers_from_env", &self.headers_from_env)
            .field("header_files", &self.header_files)
            .field("accepted_status", &self.accepted_status)
            .field("max_redirects", &self.max_redirects)
            .field("body_cap", &self.body_cap)
            .field("ca_file", &self.ca_file)
            .field("tls_skip_verify", &self.tls_skip_verify)
            .field("ip_family", &self.ip_family)
            .field("allow_downgrade", &self.allow_downgrade)
            .finish()
    }
}

impl std::ops::Deref for HeaderValues {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for HeaderValues {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl From<BTreeMap<String, String>> for HeaderValues {
    fn from(map: BTreeMap<String, String>) -> Self {
        HeaderValues(map)
    }
}

/// Header names with every value shown as `<redacted>`.
struct RedactedHeaders<I>(I);

impl<'a, S, I> std::fmt::Debug for RedactedHeaders<I>
where
    S: AsRef<str> + ?Sized + 'a,
    I: Iterator<Item = &'a S> + Clone,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.clone().map(|name| (name.as_ref(), "<redacted>")))
            .finish()
    }
}

/// `url` with any `user:password@` replaced by `<redacted>@`, for messages and `Debug`. Works on
/// text that is not a valid URL too (an error message must not echo the password it failed on).
pub fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    // The authority ends at the first '/', '?' or '#'; the userinfo at its last '@'.
    let authority = rest.find(['/', '?', '#']).map_or(rest, |end| &rest[..end]);
    match authority.rfind('@') {
        Some(at) => format!("{}<redacted>{}", &url[..scheme_end], &rest[at..]),
        None => url.to_owned(),
    }
}

/// One entry of `accepted_status`: a code or a `"low-high"` range.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StatusSpec {
    Code(u16),
    Text(String),
}

/// Which address family to connect with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    /// The first address the resolver returns.
    #[default]
    Auto,
    Ipv4,
    Ipv6,
}

fn default_interval() -> Duration {
    DEFAULT_INTERVAL
}
fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}
fn default_method() -> String {
    "GET".into()
}
fn default_max_redirects() -> u8 {
    DEFAULT_MAX_REDIRECTS
}
fn default_body_cap() -> usize {
    DEFAULT_BODY_CAP
}

/// A validated target.
#[derive(Clone)]
pub struct Target {
    pub id: u32,
    pub name: Option<String>,
    pub url: url::Url,
    pub interval: Duration,
    pub timeout: Duration,
    pub regex: Option<regex_lite::Regex>,
    pub method: hyper::Method,
    /// Request headers: the configured ones, plus `Authorization: Basic` built from a URL's
    /// `user:password` (marked sensitive). Values are never printed.
    pub headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    /// Status ranges that count as up.
    pub accepted_status: Vec<RangeInclusive<u16>>,
    pub max_redirects: u8,
    pub body_cap: usize,
    /// TLS settings specific to this target (a CA file or skip-verify); None: the shared default.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub ip_family: IpFamily,
    /// Follow `https` → `http` redirects.
    pub allow_downgrade: bool,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("url", &self.url.as_str())
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("regex", &self.regex.as_ref().map(|r| r.as_str()))
            .field("method", &self.method)
            .field(
                "headers",
                &RedactedHeaders(self.headers.iter().map(|(n, _)| n.as_str())),
            )
            .field("accepted_status", &self.accepted_status)
            .field("max_redirects", &self.max_redirects)
            .field("body_cap", &self.body_cap)
            .field("custom_tls", &self.tls.is_some())
            .field("ip_family", &self.ip_family)
            .field("allow_downgrade", &self.allow_downgrade)
            .finish()
    }
}

/// A target setting that cannot be used: which key (relative to the target) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetError {
    pub key: &'static str,
    pub reason: String,
}

impl RawTarget {
    /// A target for `url` with every other setting at its default.
    pub fn with_url(id: u32, url: &str) -> RawTarget {
        RawTarget {
            id,
            name: None,
            url: url.to_owned(),
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            regex: None,
            method: default_method(),
            headers: Default::default(),
            headers_from_env: Default::default(),
            header_files: Default::default(),
            accepted_status: Vec::new(),
            max_redirects: DEFAULT_MAX_REDIRECTS,
            body_cap: DEFAULT_BODY_CAP,
            ca_file: None,
            tls_skip_verify: false,
            ip_family: IpFamily::Auto,
            allow_downgrade: false,
        }
    }
}

impl Target {
    /// A target with default settings for `url` (used by the one-shot `probe` command and tests).
    pub fn for_url(id: u32, url: &str) -> Result<Target, TargetError> {
        Target::from_raw(RawTarget::with_url(id, url))
    }

    /// Checks every setting of `raw`.
    pub fn from_raw(raw: RawTarget) -> Result<Target, TargetError> {
        let err = |key: &'static str, reason: String| TargetError { key, reason };
        let mut url = url::Url::parse(&raw.url).map_err(|e| {
            err(
                "url",
                format!("invalid URL {:?}: {e}", redact_userinfo(&raw.url)),
            )
        })?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(err(
                "url",
                format!("scheme {:?} is not http or https", url.scheme()),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(err("url", "URL has no host".into()));
        }
        if raw.interval < MIN_INTERVAL {
            return Err(err(
                "interval",
                format!("must be at least {MIN_INTERVAL:?}"),
            ));
        }
        if raw.timeout.is_zero() || raw.timeout > raw.interval {
            return Err(err(
                "timeout",
                "must be greater than zero and not longer than the interval".into(),
            ));
        }
        let regex = raw
            .regex
            .as_deref()
            .map(regex_lite::Regex::new)
            .transpose()
            .map_err(|e| err("regex", format!("invalid regex: {e}")))?;
        let method = hyper::Method::from_bytes(raw.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| err("method", format!("{:?} is not an HTTP method", raw.method)))?;
        let mut headers = Vec::with_capacity(raw.headers.len());
        for (name, value) in raw.headers.iter() {
            let n = hyper::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| err("headers", format!("{name:?} is not a header name")))?;
            let v = hyper::header::HeaderValue::from_str(value).map_err(|_| {
                err(
                    "headers",
                    format!("value of {name:?} is not a header value"),
                )
            })?;
            headers.push((n, v));
        }
        headers.extend(resolve_header_refs(&raw)?);
        if let Some(basic) = take_basic_auth(&mut url) {
            if headers
                .iter()
                .any(|(n, _)| *n == hyper::header::AUTHORIZATION)
            {
                return Err(err(
                    "url",
                    "the URL has a user:password and `headers` an Authorization header: set one"
                        .into(),
                ));
            }
            headers.push((hyper::header::AUTHORIZATION, basic));
        }
        let accepted_status = if raw.accepted_status.is_empty() {
            vec![200..=299]
        } else {
            raw.accepted_status
                .iter()
                .map(parse_status)
                .collect::<Result<Vec<_>, String>>()
                .map_err(|r| err("accepted_status", r))?
        };
        if raw.body_cap == 0 || raw.body_cap > MAX_BODY_CAP {
            return Err(err("body_cap", format!("must be 1..={MAX_BODY_CAP} bytes")));
        }
        if raw.tls_skip_verify && raw.ca_file.is_some() {
            return Err(err(
                "tls_skip_verify",
                "set either ca_file or tls_skip_verify, not both".into(),
            ));
        }
        let tls = if raw.tls_skip_verify {
            Some(crate::tls::skip_verify_config())
        } else if let Some(path) = &raw.ca_file {
            Some(crate::tls::config_with_ca_file(path).map_err(|r| err("ca_file", r))?)
        } else {
            None
        };
        Ok(Target {
            id: raw.id,
            name: raw.name,
            url,
            interval: raw.interval,
            timeout: raw.timeout,
            regex,
            method,
            headers,
            accepted_status,
            max_redirects: raw.max_redirects,
            body_cap: raw.body_cap,
            tls,
            ip_family: raw.ip_family,
            allow_downgrade: raw.allow_downgrade,
        })
    }

    /// Whether `status` counts as up for this target.
    pub fn accepts(&self, status: u16) -> bool {
        self.accepted_status.iter().any(|r| r.contains(&status))
    }
}

/// The headers whose values live on the agent (`headers_from_env`, `header_files`), read now.
/// Errors name the header and the variable or file, never a value. The values are marked
/// sensitive (hyper keeps them out of its own debug output).
fn resolve_header_refs(
    raw: &RawTarget,
) -> Result<Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>, TargetError> {
    let mut out = Vec::new();
    let refs = raw
        .headers_from_env
        .iter()
        .map(|(n, var)| ("headers_from_env", n, HeaderSource::Env(var)))
        .chain(
            raw.header_files
                .iter()
                .map(|(n, path)| ("header_files", n, HeaderSource::File(path))),
        );
    for (key, name, source) in refs {
        let err = |reason: String| TargetError { key, reason };
        let header = hyper::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| err(format!("{name:?} is not a header name")))?;
        let clash = raw
            .headers
            .keys()
            .chain(
                raw.headers_from_env
                    .keys()
                    .filter(|_| key == "header_files"),
            )
            .any(|other| other.eq_ignore_ascii_case(name));
        if clash {
            return Err(err(format!("header {name:?} is set twice")));
        }
        let (value, from) = match source {
            HeaderSource::Env(var) => (
                std::env::var(var).map_err(|_| {
                    err(format!(
                        "environment variable {var} (header {name:?}) is not set"
                    ))
                })?,
                format!("environment variable {var}"),
            ),
            HeaderSource::File(path) => (
                crate::config::read_secret_file(path).map_err(|e| {
                    err(format!(
                        "cannot read {} (header {name:?}): {e}",
                        path.display()
                    ))
                })?,
                format!("file {}", path.display()),
            ),
        };
        let mut value = hyper::header::HeaderValue::from_str(&value).map_err(|_| {
            err(format!(
                "the value in {from} (header {name:?}) is not a header value"
            ))
        })?;
        value.set_sensitive(true);
        out.push((header, value));
    }
    Ok(out)
}

/// Where a header's value comes from on the agent.
enum HeaderSource<'a> {
    Env(&'a String),
    File(&'a PathBuf),
}

/// Removes `user:password@` from `url` and returns it as an `Authorization: Basic` value
/// (RFC 7617), or None when the URL has no user info. Both parts are percent-decoded first, as
/// curl does, so `p%40ss` sends `p@ss`. The value is marked sensitive (hyper's `Debug` of it
/// prints `Sensitive`).
fn take_basic_auth(url: &mut url::Url) -> Option<hyper::header::HeaderValue> {
    use base64::Engine as _;
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let mut credentials: Vec<u8> = percent_encoding::percent_decode_str(url.username()).collect();
    credentials.push(b':');
    credentials.extend(percent_encoding::percent_decode_str(
        url.password().unwrap_or_default(),
    ));
    // Cannot fail for an http(s) URL with a host (checked before); ignored otherwise.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let encoded = base64::engine::general_purpose::STANDARD.encode(&credentials);
    // Base64 is always a valid header value.
    let mut value = hyper::header::HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

pub(crate) fn parse_status(spec: &StatusSpec) -> Result<RangeInclusive<u16>, String> {
    let valid = |c: u16| (100..=599).contains(&c);
    let range = match spec {
        StatusSpec::Code(c) => *c..=*c,
        StatusSpec::Text(t) => {
            let parse = |s: &str| {
                s.trim()
                    .parse::<u16>()
                    .map_err(|_| format!("{t:?} is not a status code or range like \"200-299\""))
            };
            match t.split_once('-') {
                Some((lo, hi)) => parse(lo)?..=parse(hi)?,
                None => {
                    let c = parse(t)?;
                    c..=c
                }
            }
        }
    };
    if !valid(*range.start()) || !valid(*range.end()) || range.start() > range.end() {
        return Err(format!(
            "{range:?} is not a range of status codes within 100-599"
        ));
    }
    Ok(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(url: &str) -> RawTarget {
        toml::from_str(&format!("id = 1\nurl = {url:?}\n")).unwrap()
    }

    #[test]
    fn defaults() {
        let t = Target::from_raw(raw("https://example.org/x?y=1")).unwrap();
        assert_eq!(t.method, hyper::Method::GET);
        assert_eq!(t.accepted_status, vec![200..=299]);
        assert_eq!(t.max_redirects, DEFAULT_MAX_REDIRECTS);
        assert_eq!(t.body_cap, DEFAULT_BODY_CAP);
        assert!(t.tls.is_none());
        assert!(t.accepts(204) && !t.accepts(301) && !t.accepts(404));
        assert!(!t.allow_downgrade);
        let opted: RawTarget =
            toml::from_str("id = 1\nurl = \"https://h/\"\nallow_downgrade = true\n").unwrap();
        assert!(Target::from_raw(opted).unwrap().allow_downgrade);
    }

    #[test]
    fn accepted_status_codes_and_ranges() {
        let mut r = raw("http://h/");
        r.accepted_status = vec![
            StatusSpec::Text("200-299".into()),
            StatusSpec::Code(301),
            StatusSpec::Text("404".into()),
        ];
        let t = Target::from_raw(r).unwrap();
        assert!(t.accepts(250) && t.accepts(301) && t.accepts(404) && !t.accepts(302));
        let toml_form: RawTarget =
            toml::from_str("id = 1\nurl = \"http://h/\"\naccepted_status = [\"200-399\", 418]\n")
                .unwrap();
        assert!(Target::from_raw(toml_form).unwrap().accepts(418));
    }

    /// Issue #14 item 9: header values resolved on the agent, from a variable or a file; errors
    /// name the header and the source, never a value; `Debug` of the raw target shows no value.
    #[test]
    fn header_values_from_the_environment_and_files() {
        let dir = std::env::temp_dir().join(format!("vantage-headers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "Bearer s3cr3t-from-file\nsecond line\n").unwrap();
        let mut r = raw("http://h/");
        r.headers.insert("x-plain".into(), "s3cr3t-literal".into());
        // Cargo sets CARGO_PKG_NAME for the test process: a variable that is there for sure.
        r.headers_from_env
            .insert("x-from-env".into(), "CARGO_PKG_NAME".into());
        r.header_files.insert("authorization".into(), file.clone());
        let debug = format!("{r:?}");
        assert!(
            !debug.contains("s3cr3t") && debug.contains("x-plain"),
            "{debug}"
        );
        let t = Target::from_raw(r.clone()).unwrap();
        let get = |n: &str| {
            t.headers
                .iter()
                .find(|(k, _)| k.as_str() == n)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            get("authorization").as_deref(),
            Some("Bearer s3cr3t-from-file")
        );
        assert_eq!(get("x-from-env").as_deref(), Some("vantage-agent"));
        assert_eq!(get("x-plain").as_deref(), Some("s3cr3t-literal"));

        let mut missing = r.clone();
        missing
            .headers_from_env
            .insert("x-other".into(), "VANTAGE_TEST_NO_SUCH_VARIABLE".into());
        let e = Target::from_raw(missing).unwrap_err();
        assert_eq!(e.key, "headers_from_env");
        assert!(
            e.reason.contains("VANTAGE_TEST_NO_SUCH_VARIABLE"),
            "{}",
            e.reason
        );
        let mut gone = r.clone();
        gone.header_files
            .insert("authorization".into(), dir.join("missing"));
        let e = Target::from_raw(gone).unwrap_err();
        assert_eq!(e.key, "header_files");
        assert!(!e.reason.contains("s3cr3t"), "{}", e.reason);
        let mut twice = r;
        twice.headers.insert("Authorization".into(), "x".into());
        assert!(Target::from_raw(twice)
            .unwrap_err()
            .reason
            .contains("set twice"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn url_credentials_become_basic_auth_and_leave_the_url() {
        let t = Target::from_raw(raw("https://user:p%40ss@example.org:8443/x?y=1")).unwrap();
        assert_eq!(t.url.as_str(), "https://example.org:8443/x?y=1");
        let (name, value) = t.headers.last().unwrap();
        assert_eq!(*name, hyper::header::AUTHORIZATION);
        // base64("user:p@ss")
        assert_eq!(value.to_str().unwrap(), "Basic dXNlcjpwQHNz");
        assert!(value.is_sensitive());
        // A user without a password is "user:" (RFC 7617 allows an empty password).
        let t = Target::from_raw(raw("http://user@h/")).unwrap();
        assert_eq!(t.headers[0].1.to_str().unwrap(), "Basic dXNlcjo=");
        // No user info, no header.
        assert!(Target::from_raw(raw("http://h/"))
            .unwrap()
            .headers
            .is_empty());
        // Two ways of saying it: refused.
        let mut r = raw("http://user:pw@h/");
        r.headers.insert("authorization".into(), "Bearer x".into());
        assert_eq!(Target::from_raw(r).unwrap_err().key, "url");
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let mut r = raw("https://user:hunter2@example.org/");
        r.headers.insert("X-Api-Key".into(), "tok-123".into());
        let raw_debug = format!("{r:?}");
        let t = Target::from_raw(r).unwrap();
        let debug = format!("{t:?}");
        for text in [&raw_debug, &debug] {
            assert!(
                !text.contains("hunter2") && !text.contains("tok-123"),
                "{text}"
            );
            // base64("user:hunter2")
            assert!(!text.contains("dXNlcjpodW50ZXIy"), "{text}");
            assert!(
                text.contains("x-api-key") || text.contains("X-Api-Key"),
                "{text}"
            );
        }
        assert!(
            raw_debug.contains("https://<redacted>@example.org/"),
            "{raw_debug}"
        );
        // A URL that does not parse is not echoed with its password.
        let e = Target::from_raw(raw("http://user:hunter2@h:99999/")).unwrap_err();
        assert!(e.reason.contains("<redacted>@h:99999"), "{}", e.reason);
        assert!(!e.reason.contains("hunter2"), "{}", e.reason);
    }

    #[test]
    fn redact_userinfo_finds_only_the_authority() {
        assert_eq!(
            redact_userinfo("http://u:p@h/a@b"),
            "http://<redacted>@h/a@b"
        );
        assert_eq!(redact_userinfo("http://u:p@x@h/"), "http://<redacted>@h/");
        assert_eq!(redact_userinfo("http://h/?q=a@b"), "http://h/?q=a@b");
        assert_eq!(redact_userinfo("http://h#a@b"), "http://h#a@b");
        assert_eq!(redact_userinfo("not a url"), "not a url");
    }

    #[test]
    fn bad_settings_name_their_key() {
        let key = |r: RawTarget| Target::from_raw(r).unwrap_err().key;
        assert_eq!(key(raw("ftp://h/")), "url");
        assert_eq!(key(raw("not a url")), "url");
        let mut r = raw("http://h/");
        r.accepted_status = vec![StatusSpec::Text("299-200".into())];
        assert_eq!(key(r), "accepted_status");
        let mut r = raw("http://h/");
        r.accepted_status = vec![StatusSpec::Code(999)];
        assert_eq!(key(r), "accepted_status");
        let mut r = raw("http://h/");
        r.method = "G ET".into();
        assert_eq!(key(r), "method");
        let mut r = raw("http://h/");
        r.headers.insert("bad header".into(), "x".into());
        assert_eq!(key(r), "headers");
        let mut r = raw("http://h/");
        r.regex = Some("(".into());
        assert_eq!(key(r), "regex");
        let mut r = raw("http://h/");
        r.body_cap = 0;
        assert_eq!(key(r), "body_cap");
        let mut r = raw("https://h/");
        r.ca_file = Some("/nonexistent/ca.pem".into());
        assert_eq!(key(r), "ca_file");
        let mut r = raw("http://h/");
        r.interval = Duration::from_millis(10);
        assert_eq!(key(r), "interval");
        let mut r = raw("http://h/");
        r.timeout = Duration::from_secs(60);
        assert_eq!(key(r), "timeout");
    }
}
