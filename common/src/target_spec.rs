//! A target in wire form ([`TargetSpec`], the central target sets) and back: the conversion
//! both the ingester (which publishes sets) and the agents (which probe them) use, and
//! [`check_portable`], the checks `targets apply` runs before publishing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use vantage_proto::control::{
    HeaderSpec, IpFamilySpec, TargetOption, TargetSpec, HEADER_FROM_ENV, HEADER_FROM_FILE,
};
use vantage_proto::ProbeKind;

use crate::target::{
    check, parse_query_type, query_type_name, IpFamily, RawTarget, StatusSpec, TargetError,
};

/// A [`RawTarget`] in wire form. Fails (naming the key) when a value does not fit the wire
/// format's capacities.
pub fn spec_from_raw(raw: &RawTarget) -> Result<TargetSpec, TargetError> {
    fn fit<const N: usize>(key: &'static str, s: &str) -> Result<heapless::String<N>, TargetError> {
        s.try_into().map_err(|_| TargetError {
            key,
            reason: format!("longer than {N} bytes"),
        })
    }
    let millis = |key: &'static str, d: Duration| {
        u32::try_from(d.as_millis()).map_err(|_| TargetError {
            key,
            reason: "too long".into(),
        })
    };
    let mut headers = heapless::Vec::new();
    // Literal values, then references (`env:NAME` = variable, `file:NAME` = path; see
    // `HeaderSpec`): the value of a reference is read by the agent, never carried.
    let literal = raw
        .headers
        .iter()
        .map(|(n, v)| ("headers", n.clone(), v.clone()));
    let from_env = raw.headers_from_env.iter().map(|(n, var)| {
        (
            "headers_from_env",
            format!("{HEADER_FROM_ENV}{n}"),
            var.clone(),
        )
    });
    let from_file = raw.header_files.iter().map(|(n, path)| {
        (
            "header_files",
            format!("{HEADER_FROM_FILE}{n}"),
            path.to_string_lossy().into_owned(),
        )
    });
    for (key, name, value) in literal.chain(from_env).chain(from_file) {
        headers
            .push(HeaderSpec {
                name: fit(key, &name)?,
                value: fit(key, &value)?,
            })
            .map_err(|_| TargetError {
                key,
                reason: format!(
                    "at most {} headers (headers, headers_from_env and header_files together)",
                    vantage_proto::control::MAX_HEADERS
                ),
            })?;
    }
    let mut accepted_status = heapless::Vec::new();
    for s in &raw.accepted_status {
        let range = crate::target::parse_status(s).map_err(|reason| TargetError {
            key: "accepted_status",
            reason,
        })?;
        accepted_status
            .push((*range.start(), *range.end()))
            .map_err(|_| TargetError {
                key: "accepted_status",
                reason: format!(
                    "at most {} entries",
                    vantage_proto::control::MAX_STATUS_RANGES
                ),
            })?;
    }
    // Settings of some kinds only (target sets version 2; a set that needs none of them is
    // still written as version 1, which older agents read).
    let mut options = heapless::Vec::new();
    let texts = [("send", &raw.send), ("expect", &raw.expect)];
    for (key, text) in texts {
        let Some(text) = text else { continue };
        let text = fit(key, text)?;
        let option = match key {
            "send" => TargetOption::Send(text),
            _ => TargetOption::Expect(text),
        };
        // Capacity: a target has at most three options (send, expect, allow_downgrade; or
        // query_type and resolver), MAX_OPTIONS is 8.
        let _ = options.push(option);
    }
    if raw.allow_downgrade {
        let _ = options.push(TargetOption::AllowDowngrade);
    }
    if let Some(t) = &raw.query_type {
        let qtype = parse_query_type(t).map_err(|reason| TargetError {
            key: "query_type",
            reason,
        })?;
        let _ = options.push(TargetOption::QueryType(qtype));
    }
    if let Some(r) = &raw.resolver {
        let _ = options.push(TargetOption::Resolver(fit("resolver", r)?));
    }
    // `url` carries the address of a tcp or tls target (the field is "what is probed").
    let (key, target) = match raw.kind {
        ProbeKind::Http => ("url", raw.url.as_str()),
        ProbeKind::Tcp | ProbeKind::Tls => ("address", raw.address.as_deref().unwrap_or_default()),
        // and the name a dns target asks for.
        ProbeKind::Dns => ("query", raw.query.as_deref().unwrap_or_default()),
    };
    Ok(TargetSpec {
        id: raw.id,
        name: fit("name", raw.name.as_deref().unwrap_or_default())?,
        url: fit(key, target)?,
        interval_ms: millis("interval", raw.interval)?,
        timeout_ms: millis("timeout", raw.timeout)?,
        regex: raw.regex.as_deref().map(|r| fit("regex", r)).transpose()?,
        method: fit("method", &raw.method)?,
        headers,
        accepted_status,
        max_redirects: raw.max_redirects,
        body_cap: u32::try_from(raw.body_cap).map_err(|_| TargetError {
            key: "body_cap",
            reason: "too large".into(),
        })?,
        ca_file: raw
            .ca_file
            .as_deref()
            .map(|p| fit("ca_file", &p.to_string_lossy()))
            .transpose()?,
        tls_skip_verify: raw.tls_skip_verify,
        ip_family: match raw.ip_family {
            IpFamily::Auto => IpFamilySpec::Auto,
            IpFamily::Ipv4 => IpFamilySpec::Ipv4,
            IpFamily::Ipv6 => IpFamilySpec::Ipv6,
        },
        kind: raw.kind,
        options,
    })
}

/// The config-file form of a received spec (then validated by [`check`] and, on the agent, made a probe target).
pub fn raw_from_spec(spec: &TargetSpec) -> RawTarget {
    let http = spec.kind == ProbeKind::Http;
    let dns = spec.kind == ProbeKind::Dns;
    let text = |want: fn(&TargetOption) -> Option<&str>| {
        spec.options.iter().find_map(want).map(str::to_owned)
    };
    RawTarget {
        id: spec.id,
        name: (!spec.name.is_empty()).then(|| spec.name.to_string()),
        kind: spec.kind,
        url: if http {
            spec.url.to_string()
        } else {
            String::new()
        },
        address: (!http && !dns).then(|| spec.url.to_string()),
        query: dns.then(|| spec.url.to_string()),
        query_type: spec.options.iter().find_map(|o| match o {
            TargetOption::QueryType(t) => Some(query_type_name(*t)),
            _ => None,
        }),
        resolver: text(|o| match o {
            TargetOption::Resolver(r) => Some(r.as_str()),
            _ => None,
        }),
        send: text(|o| match o {
            TargetOption::Send(t) => Some(t.as_str()),
            _ => None,
        }),
        expect: text(|o| match o {
            TargetOption::Expect(t) => Some(t.as_str()),
            _ => None,
        }),
        interval: Duration::from_millis(spec.interval_ms.into()),
        timeout: Duration::from_millis(spec.timeout_ms.into()),
        regex: spec.regex.as_ref().map(|r| r.to_string()),
        method: spec.method.to_string(),
        headers: spec
            .headers
            .iter()
            .filter(|h| !h.is_reference())
            .map(|h| (h.name.to_string(), h.value.to_string()))
            .collect::<BTreeMap<_, _>>()
            .into(),
        headers_from_env: spec
            .headers
            .iter()
            .filter_map(|h| {
                let name = h.name.strip_prefix(HEADER_FROM_ENV)?;
                Some((name.to_owned(), h.value.to_string()))
            })
            .collect(),
        header_files: spec
            .headers
            .iter()
            .filter_map(|h| {
                let name = h.name.strip_prefix(HEADER_FROM_FILE)?;
                Some((name.to_owned(), PathBuf::from(h.value.as_str())))
            })
            .collect(),
        accepted_status: spec
            .accepted_status
            .iter()
            .map(|&(lo, hi)| StatusSpec::Text(format!("{lo}-{hi}")))
            .collect(),
        max_redirects: spec.max_redirects,
        body_cap: spec.body_cap as usize,
        ca_file: spec.ca_file.as_ref().map(|p| PathBuf::from(p.as_str())),
        tls_skip_verify: spec.tls_skip_verify,
        ip_family: match spec.ip_family {
            IpFamilySpec::Auto => IpFamily::Auto,
            IpFamilySpec::Ipv4 => IpFamily::Ipv4,
            IpFamilySpec::Ipv6 => IpFamily::Ipv6,
        },
        allow_downgrade: spec.options.contains(&TargetOption::AllowDowngrade),
    }
}

/// The checks an agent will run on `raw`, minus reading what only the agents have (`ca_file`,
/// and the variables and files of `headers_from_env` / `header_files`): what `targets apply`
/// runs before publishing. A reference's header name and its variable or path are checked.
pub fn check_portable(raw: &RawTarget) -> Result<TargetSpec, TargetError> {
    let mut portable = raw.clone();
    portable.ca_file = None;
    for (key, name, source) in raw
        .headers_from_env
        .iter()
        .map(|(n, v)| ("headers_from_env", n, v.clone()))
        .chain(
            raw.header_files
                .iter()
                .map(|(n, p)| ("header_files", n, p.to_string_lossy().into_owned())),
        )
    {
        let bad = |reason: String| TargetError { key, reason };
        let unusable = match key {
            "headers_from_env" => source.is_empty() || source.contains(['\0', '=']),
            _ => source.is_empty() || source.contains('\0'),
        };
        if unusable {
            return Err(bad(format!(
                "{source:?} is not a usable {} (header {name:?})",
                if key == "headers_from_env" {
                    "variable name"
                } else {
                    "path"
                }
            )));
        }
        if http::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(bad(format!("{name:?} is not a header name")));
        }
        if portable
            .headers
            .keys()
            .any(|h| h.eq_ignore_ascii_case(name))
        {
            return Err(bad(format!("header {name:?} is set twice")));
        }
        // Stands in for the value, which only the agent can read: the name is still checked.
        portable.headers.insert(name.clone(), "x".into());
    }
    portable.headers_from_env.clear();
    portable.header_files.clear();
    // Only the checks: no file or variable is read here (they live on the agents).
    check(&portable, |_| Ok(Vec::new()))?;
    spec_from_raw(raw)
}
