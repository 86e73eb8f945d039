//! `vantage-agent probe URL` (or `--kind tcp|tls HOST:PORT`, `--kind dns NAME`): one probe with the same engine
//! and options as a configured target, printed for a person (aligned lines) or for a program
//! (`--json`). Field names match the columns of the `results` table, plus `detail` (why it is
//! not up; agent-side only).

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use crate::probe::{Measurement, Prober};
use crate::target::Target;

/// Probes `target` once on a runtime of its own (one thread, as `run` uses).
///
/// Here rather than in `main.rs`, and not `async`, on purpose: when `main.rs` polled
/// `Prober::probe`'s future itself, the binary crate compiled its own copy of that future and of
/// every future it awaits (the whole probe engine, beside the library's copy that `run` uses;
/// the symbol names say which crate instantiated each): 35 KiB of the x86_64 `dist` binary.
pub fn probe(target: &Target) -> std::io::Result<Measurement> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(Prober::new().probe(target)))
}

/// One printed value.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Int(u64),
    Bool(bool),
    Text(String),
}

fn us(micros: Option<u32>) -> Value {
    micros.map_or(Value::Null, |us| Value::Int(us.into()))
}

/// The measurement as (column name, value) pairs, in table order.
fn fields(m: &Measurement) -> Vec<(&'static str, Value)> {
    let time = |unix: Duration| {
        Value::Text(humantime::format_rfc3339_millis(UNIX_EPOCH + unix).to_string())
    };
    vec![
        ("target_id", Value::Int(m.target_id.into())),
        ("started_at", time(Duration::from_millis(m.started_at_ms))),
        ("outcome", Value::Text(m.outcome.as_str().into())),
        (
            "failed_phase",
            m.failed_phase
                .map_or(Value::Null, |p| Value::Text(p.as_str().into())),
        ),
        (
            "detail",
            m.detail
                .as_ref()
                .map_or(Value::Null, |d| Value::Text(d.clone())),
        ),
        (
            "status",
            if m.status == 0 {
                Value::Null
            } else {
                Value::Int(m.status.into())
            },
        ),
        (
            "regex_match",
            match m.regex {
                vantage_proto::RegexOutcome::NotConfigured => Value::Null,
                vantage_proto::RegexOutcome::Matched => Value::Bool(true),
                vantage_proto::RegexOutcome::NotMatched => Value::Bool(false),
            },
        ),
        ("total_us", us(Some(m.total_us))),
        ("dns_us", us(m.dns_us)),
        ("connect_us", us(m.connect_us)),
        ("tls_us", us(m.tls_us)),
        ("ttfb_us", us(m.ttfb_us)),
        ("transfer_us", us(m.transfer_us)),
        ("body_bytes", Value::Int(m.body_bytes.into())),
        ("body_truncated", Value::Bool(m.body_truncated)),
        ("redirects", Value::Int(m.redirects.into())),
        (
            "cert_not_after",
            m.cert_not_after_s
                .map_or(Value::Null, |s| time(Duration::from_secs(s))),
        ),
        (
            "remote_ip",
            m.remote_ip.map_or(Value::Null, |ip| {
                Value::Text(std::net::IpAddr::from(ip).to_string())
            }),
        ),
        ("kind", Value::Text(m.kind.as_str().into())),
        (
            "tls_version",
            m.tls_version
                .map_or(Value::Null, |v| Value::Text(v.as_str().into())),
        ),
        (
            "dns_rcode",
            m.dns.map_or(Value::Null, |d| Value::Int(d.rcode.into())),
        ),
        (
            "dns_answers",
            m.dns.map_or(Value::Null, |d| Value::Int(d.answers.into())),
        ),
    ]
}

/// A JSON object on one line.
pub fn to_json(m: &Measurement) -> String {
    let mut out = String::from("{");
    for (i, (name, value)) in fields(m).into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "\"{name}\":");
        match value {
            Value::Null => out.push_str("null"),
            Value::Int(n) => {
                let _ = write!(out, "{n}");
            }
            Value::Bool(b) => {
                let _ = write!(out, "{b}");
            }
            Value::Text(t) => json_string(&mut out, &t),
        }
    }
    out.push('}');
    out
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Aligned `name  value` lines; times in milliseconds with three decimals.
pub fn to_text(m: &Measurement) -> String {
    let mut out = String::new();
    for (name, value) in fields(m) {
        let shown = match (name.ends_with("_us"), value) {
            (_, Value::Null) => "-".to_owned(),
            (true, Value::Int(n)) => format!("{:.3} ms", n as f64 / 1000.0),
            (false, Value::Int(n)) => n.to_string(),
            (_, Value::Bool(b)) => b.to_string(),
            (_, Value::Text(t)) => t,
        };
        let label = name.strip_suffix("_us").unwrap_or(name);
        let _ = writeln!(out, "{label:<15} {shown}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vantage_proto::{Outcome, Phase};

    fn sample() -> Measurement {
        let mut m = Measurement::new(0, 1_764_000_000_123);
        m.outcome = Outcome::Timeout;
        m.failed_phase = Some(Phase::FirstByte);
        m.total_us = 1_000_500;
        m.connect_us = Some(150);
        m.remote_ip = Some("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into());
        m.detail = Some("deadline (1s) passed in phase first_byte".into());
        m
    }

    #[test]
    fn json_has_column_names_and_nulls() {
        let j = to_json(&sample());
        assert!(
            j.starts_with("{\"target_id\":0,\"started_at\":\"2025-11-24T16:00:00.123Z\""),
            "{j}"
        );
        assert!(
            j.contains(
                "\"outcome\":\"timeout\",\"failed_phase\":\"first_byte\",\
                 \"detail\":\"deadline (1s) passed in phase first_byte\",\"status\":null"
            ),
            "{j}"
        );
        let mut up = sample();
        up.outcome = Outcome::Up;
        up.failed_phase = None;
        up.detail = None;
        assert!(to_json(&up).contains("\"detail\":null"));
        assert!(j.contains("\"connect_us\":150,\"tls_us\":null"), "{j}");
        assert!(
            j.ends_with(
                "\"remote_ip\":\"127.0.0.1\",\"kind\":\"http\",\"tls_version\":null,\
                 \"dns_rcode\":null,\"dns_answers\":null}"
            ),
            "{j}"
        );
    }

    #[test]
    fn text_is_aligned_with_units() {
        let t = to_text(&sample());
        assert!(t.contains("total           1000.500 ms"), "{t}");
        assert!(t.contains("tls             -"), "{t}");
        assert!(
            t.contains("detail          deadline (1s) passed in phase first_byte\n"),
            "{t}"
        );
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut s = String::new();
        json_string(&mut s, "a\"b\\c\n");
        assert_eq!(s, "\"a\\\"b\\\\c\\u000a\"");
    }
}
