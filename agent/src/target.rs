//! The validated [`Target`] the probe engine runs with, made from a [`RawTarget`] (whose shape
//! and checks are `vantage_common::target`, shared with the ingester's `targets apply`): here
//! the agent adds what only it has, the TLS settings (a CA file) and the header values kept in
//! its environment and files.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use vantage_common::target::{
    check, parse_status, redact_userinfo, Address, Checked, DnsQuery, HeaderValues, IpFamily,
    ProbeKind, RawTarget, RedactedHeaders, StatusSpec, TargetError, DEFAULT_BODY_CAP,
    DEFAULT_INTERVAL, DEFAULT_MAX_REDIRECTS, DEFAULT_TIMEOUT, MAX_BODY_CAP, MIN_INTERVAL,
};

/// A validated target. The HTTP settings of a `tcp` or `tls` target are their defaults and
/// unused; `address`, `send` and `expect` are those of a tcp or tls target.
#[derive(Clone)]
pub struct Target {
    pub id: u32,
    pub name: Option<String>,
    /// What the probe checks.
    pub kind: ProbeKind,
    /// `http`: the URL; `tcp`, `tls`: `<kind>://<address>`, for logs.
    pub url: url::Url,
    /// `tcp`, `tls`: where to connect.
    pub address: Option<Address>,
    /// `tcp`: written once connected (empty: nothing). May be a credential: never printed.
    pub send: Vec<u8>,
    /// `tcp`: what the first bytes read must be (empty: not checked).
    pub expect: Vec<u8>,
    /// `dns`: the name, record type and resolver.
    pub dns: Option<DnsQuery>,
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
            .field("kind", &self.kind)
            .field("url", &self.url.as_str())
            .field("send_bytes", &self.send.len())
            .field("expect", &String::from_utf8_lossy(&self.expect))
            .field("dns", &self.dns)
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

impl Target {
    /// A target with default settings for `url` (used by the one-shot `probe` command and tests).
    pub fn for_url(id: u32, url: &str) -> Result<Target, TargetError> {
        Target::from_raw(RawTarget::with_url(id, url))
    }

    /// Checks every setting of `raw` and reads what lives on the agent (CA file, header values).
    pub fn from_raw(raw: RawTarget) -> Result<Target, TargetError> {
        let err = |key: &'static str, reason: String| TargetError { key, reason };
        let checked = check(&raw, resolve_header_refs)?;
        let tls = if raw.tls_skip_verify {
            Some(crate::probe_tls::skip_verify_config())
        } else if let Some(path) = &raw.ca_file {
            Some(crate::probe_tls::config_with_ca_file(path).map_err(|r| err("ca_file", r))?)
        } else {
            None
        };
        Ok(Target {
            id: raw.id,
            name: raw.name,
            kind: raw.kind,
            url: checked.url,
            address: checked.address,
            send: checked.send,
            expect: checked.expect,
            dns: checked.dns,
            interval: raw.interval,
            timeout: raw.timeout,
            regex: checked.regex,
            method: checked.method,
            headers: checked.headers,
            accepted_status: checked.accepted_status,
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
                vantage_common::secret::from_env(var)
                    .map_err(|r| err(format!("{r} (header {name:?})")))?,
                format!("environment variable {var}"),
            ),
            HeaderSource::File(path) => (
                vantage_common::secret::from_file(path)
                    .map_err(|r| err(format!("{r} (header {name:?})")))?,
                format!("file {}", path.display()),
            ),
        };
        let mut value = hyper::header::HeaderValue::from_str(value.expose()).map_err(|_| {
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

    /// Issue #20: a tcp target's `send` may be a credential (`AUTH ...`): never in `Debug`.
    #[test]
    fn send_stays_out_of_debug() {
        let mut r = RawTarget::with_url(1, "");
        r.kind = ProbeKind::Tcp;
        r.address = Some("127.0.0.1:6379".into());
        r.send = Some("AUTH hunter2\r\n".into());
        r.expect = Some("+OK".into());
        let raw_debug = format!("{r:?}");
        let spec_debug = format!("{:?}", crate::target_set::spec_from_raw(&r).unwrap());
        let t = Target::from_raw(r).unwrap();
        assert_eq!(t.send, b"AUTH hunter2\r\n");
        for text in [raw_debug, spec_debug, format!("{t:?}")] {
            assert!(!text.contains("hunter2") && text.contains("+OK"), "{text}");
        }
    }

    /// Issue #20's dns kind: `query`, `query_type`, `resolver`, checked and named in errors;
    /// through a central target set's spec and back unchanged.
    #[test]
    fn dns_targets_are_checked_and_travel_in_specs() {
        let dns = |edit: &dyn Fn(&mut RawTarget)| {
            let mut r: RawTarget = toml::from_str(
                "id = 4\nkind = \"dns\"\nquery = \"Up.Test.\"\nquery_type = \"txt\"\n\
                 resolver = \"127.0.0.1:5353\"\n",
            )
            .unwrap();
            edit(&mut r);
            r
        };
        let t = Target::from_raw(dns(&|_| {})).unwrap();
        assert_eq!(
            t.dns,
            Some(DnsQuery {
                name: "Up.Test".into(),
                qtype: 16,
                resolver: Some("127.0.0.1:5353".parse().unwrap()),
            })
        );
        let plain = Target::from_raw(dns(&|r| {
            r.query_type = None;
            r.resolver = None;
        }))
        .unwrap();
        let q = plain.dns.unwrap();
        assert_eq!((q.qtype, q.resolver), (1, None));
        let v6 = Target::from_raw(dns(&|r| r.resolver = Some("::1".into()))).unwrap();
        assert_eq!(v6.dns.unwrap().resolver, Some("[::1]:53".parse().unwrap()));
        let rfc3597 = Target::from_raw(dns(&|r| r.query_type = Some("TYPE65".into()))).unwrap();
        assert_eq!(rfc3597.dns.unwrap().qtype, 65);
        let key = |edit: &dyn Fn(&mut RawTarget)| Target::from_raw(dns(edit)).unwrap_err().key;
        assert_eq!(key(&|r| r.query = None), "query");
        assert_eq!(key(&|r| r.query = Some("a..b".into())), "query");
        assert_eq!(key(&|r| r.query = Some("bücher.example".into())), "query");
        assert_eq!(
            key(&|r| r.query = Some(format!("{}.x", "a".repeat(64)))),
            "query"
        );
        assert_eq!(key(&|r| r.query_type = Some("AXFR2".into())), "query_type");
        assert_eq!(
            key(&|r| r.resolver = Some("dns.example".into())),
            "resolver"
        );
        assert_eq!(key(&|r| r.address = Some("h:53".into())), "address");
        assert_eq!(key(&|r| r.regex = Some("x".into())), "regex");
        assert_eq!(key(&|r| r.url = "http://h/".into()), "url");
        // The dns keys on another kind: refused.
        let mut http = raw("http://h/");
        http.query = Some("up.test".into());
        assert_eq!(Target::from_raw(http).unwrap_err().key, "query");
        let spec = crate::target_set::spec_from_raw(&dns(&|_| {})).unwrap();
        assert_eq!(spec.url.as_str(), "Up.Test.");
        let back = vantage_common::target_spec::raw_from_spec(&spec);
        assert_eq!(
            (
                back.query.as_deref(),
                back.query_type.as_deref(),
                back.resolver.as_deref()
            ),
            (Some("Up.Test."), Some("TXT"), Some("127.0.0.1:5353"))
        );
        assert_eq!(Target::from_raw(back).unwrap().dns, t.dns);
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
