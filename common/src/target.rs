//! One target's probe settings as written (TOML, a central target set): the raw serde shape
//! ([`RawTarget`]) and the checks every reader runs on it ([`check`]), without reading any file
//! or environment variable. A target's `kind` (issue #20: `http`, `tcp`, `tls`, `dns`) decides which
//! keys apply; a key that does not apply to its kind is refused, naming the key. The agent turns the result into the target it probes with (TLS
//! settings, header values kept on the agent); `vantage-ingester targets apply` runs the same
//! checks before it publishes a set.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use vantage_proto::ProbeKind;

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
    /// What the probe checks: `http` (default), `tcp` (a connection to `address`, optionally
    /// `send` / `expect`) or `tls` (a handshake with `address`).
    #[serde(default)]
    pub kind: ProbeKind,
    /// `http`: an `http://` or `https://` URL (required). A `user:password@` in it is sent as
    /// HTTP basic authentication (percent-decoded, as curl does) and removed from the URL the
    /// probe uses. Empty for other kinds.
    #[serde(default)]
    pub url: String,
    /// `tcp`, `tls`: `host:port` to connect to (required); an IPv6 address as `[::1]:443`.
    pub address: Option<String>,
    /// `tcp`: text written once connected (TOML escapes such as `\r\n`; at most 256 bytes).
    /// May be a credential (`AUTH ...`): `Debug` hides it, but like a literal header value it
    /// travels in a central target set and sits in `targets.spec`.
    pub send: Option<String>,
    /// `tcp`: text the first bytes the peer sends must be (a banner: `SSH-2.0-`, `+PONG`);
    /// read until they match, differ or the deadline passes (at most 256 bytes).
    pub expect: Option<String>,
    /// `dns`: the name asked for (required), e.g. `example.org`.
    pub query: Option<String>,
    /// `dns`: the record type asked for: `A` (default), `AAAA`, `TXT`, `MX`, `NS`, `CNAME`,
    /// `SOA`, `PTR`, `SRV`, `CAA`, `HTTPS`, ... or `TYPE<n>` (RFC 3597).
    pub query_type: Option<String>,
    /// `dns`: the resolver to ask, `ip` or `ip:port` (`[v6]:port`; port 53 by default). Absent:
    /// the first `nameserver` of the agent's `/etc/resolv.conf`.
    pub resolver: Option<String>,
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
            .field("kind", &self.kind)
            .field("url", &redact_userinfo(&self.url))
            .field("address", &self.address)
            .field("send", &self.send.as_ref().map(|_| "<redacted>"))
            .field("expect", &self.expect)
            .field("query", &self.query)
            .field("query_type", &self.query_type)
            .field("resolver", &self.resolver)
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
pub struct RedactedHeaders<I>(pub I);

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

/// Longest `send` and `expect` (the capacity of a central target set's field).
pub const MAX_PROBE_TEXT_LEN: usize = vantage_proto::control::MAX_PROBE_TEXT_LEN;

/// Where a `tcp` or `tls` target connects (`address`): a host name or IP address and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub host: url::Host<String>,
    pub port: u16,
}

impl Address {
    /// Reads `host:port` (`[v6]:port` for an IPv6 address). The host is parsed as in an
    /// `https` URL (IPv4, IPv6, or a domain name, lowercased).
    pub fn parse(text: &str) -> Result<Address, String> {
        let bad = |why: &str| format!("{text:?} is not host:port ({why})");
        let (host, port) = text.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("the port is not 1-65535"))?;
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if host.contains(':') && !host.starts_with('[') {
            return Err(bad("write an IPv6 address in brackets, [::1]:443"));
        }
        let host = url::Host::parse(host).map_err(|e| bad(&e.to_string()))?;
        Ok(Address { host, port })
    }
}

impl std::fmt::Display for Address {
    /// `host:port`, an IPv6 address in brackets (as `url::Host` prints it).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
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
            kind: ProbeKind::Http,
            url: url.to_owned(),
            address: None,
            send: None,
            expect: None,
            query: None,
            query_type: None,
            resolver: None,
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

/// What [`check`] found usable in a [`RawTarget`]: the parts every reader of targets validates
/// the same way, with no file or environment read (the agent adds its TLS settings and the
/// header values that live on it; `targets apply` stops here). The HTTP parts of a `tcp` or
/// `tls` target are their defaults, unused.
#[derive(Clone)]
pub struct Checked {
    /// `http`: the URL without its `user:password@` (moved into an `Authorization: Basic`
    /// header). `tcp`, `tls`: `<kind>://<address>`, for logs (the probe connects to `address`).
    pub url: url::Url,
    /// `tcp`, `tls`: where to connect.
    pub address: Option<Address>,
    /// `tcp`: written once connected (empty: nothing).
    pub send: Vec<u8>,
    /// `tcp`: what the first bytes read must be (empty: not checked).
    pub expect: Vec<u8>,
    /// `dns`: what to ask and whom.
    pub dns: Option<DnsQuery>,
    pub regex: Option<regex_lite::Regex>,
    pub method: http::Method,
    /// The literal headers, then the ones `refs` returned, then `Authorization: Basic` from the
    /// URL (sensitive).
    pub headers: Vec<(http::header::HeaderName, http::header::HeaderValue)>,
    pub accepted_status: Vec<RangeInclusive<u16>>,
}

/// The headers a target reads from elsewhere (`headers_from_env`, `header_files`).
pub type HeaderRefs = Vec<(http::header::HeaderName, http::header::HeaderValue)>;

/// Checks every setting of `raw`. `refs` supplies the headers whose values live on the agent
/// (read from its environment and files there; stand-ins where only the names can be checked),
/// called at the point where the checks reach them, so errors come in the order of the keys.
pub fn check(
    raw: &RawTarget,
    refs: impl FnOnce(&RawTarget) -> Result<HeaderRefs, TargetError>,
) -> Result<Checked, TargetError> {
    check_applicable(raw)?;
    if raw.tls_skip_verify && raw.ca_file.is_some() {
        return Err(TargetError {
            key: "tls_skip_verify",
            reason: "set either ca_file or tls_skip_verify, not both".into(),
        });
    }
    match raw.kind {
        ProbeKind::Http => check_http(raw, refs),
        ProbeKind::Tcp | ProbeKind::Tls => check_endpoint(raw),
        ProbeKind::Dns => check_dns(raw),
    }
}

/// A `dns` target's query: the name, the record type, the resolver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsQuery {
    /// The name asked for, without a final dot (every label 1-63 bytes, at most 253 in all).
    pub name: String,
    /// The record type (RFC 1035 TYPE number).
    pub qtype: u16,
    /// Whom to ask; None: the agent's resolver from `/etc/resolv.conf`.
    pub resolver: Option<std::net::SocketAddr>,
}

/// Record types by name (IANA "Resource Record (RR) TYPEs"), for `query_type`.
const QUERY_TYPES: [(&str, u16); 16] = [
    ("A", 1),
    ("NS", 2),
    ("CNAME", 5),
    ("SOA", 6),
    ("PTR", 12),
    ("MX", 15),
    ("TXT", 16),
    ("AAAA", 28),
    ("SRV", 33),
    ("NAPTR", 35),
    ("DS", 43),
    ("DNSKEY", 48),
    ("SVCB", 64),
    ("HTTPS", 65),
    ("ANY", 255),
    ("CAA", 257),
];

/// The TYPE number of `text`: a name of [`QUERY_TYPES`] (any case) or `TYPE<n>` (RFC 3597).
pub fn parse_query_type(text: &str) -> Result<u16, String> {
    let upper = text.to_ascii_uppercase();
    if let Some(&(_, n)) = QUERY_TYPES.iter().find(|(name, _)| *name == upper) {
        return Ok(n);
    }
    upper
        .strip_prefix("TYPE")
        .and_then(|n| n.parse::<u16>().ok())
        .filter(|n| *n != 0)
        .ok_or_else(|| {
            format!("{text:?} is not a record type (A, AAAA, TXT, MX, ... or TYPE<number>)")
        })
}

/// The name `query_type` writes for TYPE number `n` (`TYPE<n>` when it has none here).
pub fn query_type_name(n: u16) -> String {
    QUERY_TYPES
        .iter()
        .find(|(_, t)| *t == n)
        .map_or_else(|| format!("TYPE{n}"), |(name, _)| (*name).to_owned())
}

/// Port of a resolver given without one.
pub const DNS_PORT: u16 = 53;

/// A resolver address: `ip`, `ip:port` or `[v6]:port` (no name: it would need a resolver).
pub fn parse_resolver(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
        return Ok(addr);
    }
    text.parse::<std::net::IpAddr>()
        .map(|ip| std::net::SocketAddr::new(ip, DNS_PORT))
        .map_err(|_| format!("{text:?} is not an IP address or ip:port ([v6]:port)"))
}

/// Checks a name to ask for: ASCII letters, digits, `-`, `_` and dots, labels of 1-63 bytes,
/// at most 253 bytes (RFC 1035 2.3.4); a final dot is dropped.
fn check_query_name(text: &str) -> Result<String, String> {
    let name = text.strip_suffix('.').unwrap_or(text);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{text:?} is not a name of 1-253 bytes"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "{text:?} has a label that is empty or over 63 bytes"
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'*')
        {
            return Err(format!(
                "{text:?} is not an ASCII name (write an internationalised name in its xn-- form)"
            ));
        }
    }
    Ok(name.to_owned())
}

/// A `dns` target: `query` (required), `query_type`, `resolver`.
fn check_dns(raw: &RawTarget) -> Result<Checked, TargetError> {
    let err = |key: &'static str, reason: String| TargetError { key, reason };
    let text = raw.query.as_deref().ok_or_else(|| {
        err(
            "query",
            "a dns target needs `query = \"name\"`, the name to ask for".into(),
        )
    })?;
    let name = check_query_name(text).map_err(|r| err("query", r))?;
    let qtype = match raw.query_type.as_deref() {
        None => 1,
        Some(t) => parse_query_type(t).map_err(|r| err("query_type", r))?,
    };
    let resolver = raw
        .resolver
        .as_deref()
        .map(parse_resolver)
        .transpose()
        .map_err(|r| err("resolver", r))?;
    check_schedule(raw)?;
    // For logs and `Debug` only.
    let url = url::Url::parse(&format!("dns:{name}?type={}", query_type_name(qtype)))
        .map_err(|e| err("query", format!("{text:?}: {e}")))?;
    Ok(Checked {
        url,
        address: None,
        send: Vec::new(),
        expect: Vec::new(),
        dns: Some(DnsQuery {
            name,
            qtype,
            resolver,
        }),
        regex: None,
        method: http::Method::GET,
        headers: Vec::new(),
        accepted_status: vec![200..=299],
    })
}

/// The keys that have no meaning for `raw`'s kind, set anyway: refused rather than ignored
/// (a `regex` on a tcp target would look like a check that never runs). HTTP keys with a
/// default count as set when they differ from it.
fn check_applicable(raw: &RawTarget) -> Result<(), TargetError> {
    let kind = raw.kind;
    let http = kind == ProbeKind::Http;
    let dns = kind == ProbeKind::Dns;
    let set: [(&'static str, bool, bool); 19] = [
        // (key, set, applies)
        ("url", !raw.url.is_empty(), http),
        // A dns target asks a resolver given by its IP address (or the system's): no name of
        // its own to resolve, so no family to choose.
        ("ip_family", raw.ip_family != IpFamily::Auto, !dns),
        ("address", raw.address.is_some(), !http && !dns),
        ("query", raw.query.is_some(), dns),
        ("query_type", raw.query_type.is_some(), dns),
        ("resolver", raw.resolver.is_some(), dns),
        ("send", raw.send.is_some(), kind == ProbeKind::Tcp),
        ("expect", raw.expect.is_some(), kind == ProbeKind::Tcp),
        ("regex", raw.regex.is_some(), http),
        ("method", !raw.method.eq_ignore_ascii_case("GET"), http),
        ("headers", !raw.headers.is_empty(), http),
        ("headers_from_env", !raw.headers_from_env.is_empty(), http),
        ("header_files", !raw.header_files.is_empty(), http),
        ("accepted_status", !raw.accepted_status.is_empty(), http),
        (
            "max_redirects",
            raw.max_redirects != DEFAULT_MAX_REDIRECTS,
            http,
        ),
        ("body_cap", raw.body_cap != DEFAULT_BODY_CAP, http),
        ("allow_downgrade", raw.allow_downgrade, http),
        (
            "ca_file",
            raw.ca_file.is_some(),
            !matches!(kind, ProbeKind::Tcp | ProbeKind::Dns),
        ),
        (
            "tls_skip_verify",
            raw.tls_skip_verify,
            !matches!(kind, ProbeKind::Tcp | ProbeKind::Dns),
        ),
    ];
    match set.iter().find(|(_, set, applies)| *set && !applies) {
        Some(("url", ..)) if dns => Err(TargetError {
            key: "url",
            reason: "a dns target has no URL: it asks for `query = \"name\"`".into(),
        }),
        Some(("url", ..)) => Err(TargetError {
            key: "url",
            reason: format!(
                "a {} target has no URL: it connects to `address = \"host:port\"`",
                kind.as_str()
            ),
        }),
        Some((key, ..)) => Err(TargetError {
            key,
            reason: format!("does not apply to a {} target", kind.as_str()),
        }),
        None => Ok(()),
    }
}

/// The checks of every kind: interval and timeout.
fn check_schedule(raw: &RawTarget) -> Result<(), TargetError> {
    let err = |key: &'static str, reason: String| TargetError { key, reason };
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
    Ok(())
}

/// A `tcp` or `tls` target: `address`, and `send` / `expect` of a tcp target.
fn check_endpoint(raw: &RawTarget) -> Result<Checked, TargetError> {
    let err = |key: &'static str, reason: String| TargetError { key, reason };
    let kind = raw.kind.as_str();
    let text = raw.address.as_deref().ok_or_else(|| {
        err(
            "address",
            format!("a {kind} target needs `address = \"host:port\"`"),
        )
    })?;
    let address = Address::parse(text).map_err(|r| err("address", r))?;
    check_schedule(raw)?;
    let bytes = |key: &'static str, text: &Option<String>| -> Result<Vec<u8>, TargetError> {
        match text {
            None => Ok(Vec::new()),
            Some(t) if t.is_empty() => Err(err(key, "is empty (leave it out instead)".into())),
            Some(t) if t.len() > MAX_PROBE_TEXT_LEN => {
                Err(err(key, format!("longer than {MAX_PROBE_TEXT_LEN} bytes")))
            }
            Some(t) => Ok(t.as_bytes().to_vec()),
        }
    };
    let send = bytes("send", &raw.send)?;
    let expect = bytes("expect", &raw.expect)?;
    // For logs and `Debug` only; a URL of a scheme without special rules keeps the host as
    // written. The address is what the probe connects to.
    let url = url::Url::parse(&format!("{kind}://{address}"))
        .map_err(|e| err("address", format!("{text:?}: {e}")))?;
    Ok(Checked {
        url,
        address: Some(address),
        send,
        expect,
        dns: None,
        regex: None,
        method: http::Method::GET,
        headers: Vec::new(),
        accepted_status: vec![200..=299],
    })
}

/// An `http` target.
fn check_http(
    raw: &RawTarget,
    refs: impl FnOnce(&RawTarget) -> Result<HeaderRefs, TargetError>,
) -> Result<Checked, TargetError> {
    let err = |key: &'static str, reason: String| TargetError { key, reason };
    if raw.url.is_empty() {
        return Err(err(
            "url",
            "an http target needs `url` (or set `kind` to \"tcp\" or \"tls\" and `address`)".into(),
        ));
    }
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
    check_schedule(raw)?;
    let regex = raw
        .regex
        .as_deref()
        .map(regex_lite::Regex::new)
        .transpose()
        .map_err(|e| err("regex", format!("invalid regex: {e}")))?;
    let method = http::Method::from_bytes(raw.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| err("method", format!("{:?} is not an HTTP method", raw.method)))?;
    let mut headers = Vec::with_capacity(raw.headers.len());
    for (name, value) in raw.headers.iter() {
        let n = http::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| err("headers", format!("{name:?} is not a header name")))?;
        let v = http::header::HeaderValue::from_str(value).map_err(|_| {
            err(
                "headers",
                format!("value of {name:?} is not a header value"),
            )
        })?;
        headers.push((n, v));
    }
    headers.extend(refs(raw)?);
    if let Some(basic) = take_basic_auth(&mut url) {
        if headers
            .iter()
            .any(|(n, _)| *n == http::header::AUTHORIZATION)
        {
            return Err(err(
                "url",
                "the URL has a user:password and `headers` an Authorization header: set one".into(),
            ));
        }
        headers.push((http::header::AUTHORIZATION, basic));
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
    Ok(Checked {
        url,
        address: None,
        send: Vec::new(),
        expect: Vec::new(),
        dns: None,
        regex,
        method,
        headers,
        accepted_status,
    })
}

/// Removes `user:password@` from `url` and returns it as an `Authorization: Basic` value
/// (RFC 7617), or None when the URL has no user info. Both parts are percent-decoded first, as
/// curl does, so `p%40ss` sends `p@ss`. The value is marked sensitive (hyper's `Debug` of it
/// prints `Sensitive`).
fn take_basic_auth(url: &mut url::Url) -> Option<http::header::HeaderValue> {
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
    let mut value = http::header::HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

pub fn parse_status(spec: &StatusSpec) -> Result<RangeInclusive<u16>, String> {
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
