//! Logging setup shared by every subcommand: `tracing` events to stderr, filtered by `RUST_LOG`
//! (a comma-separated list of `level` and `target=level`, `tracing_subscriber`'s `Targets`
//! syntax), as human-readable lines (coloured only on a terminal) or, with `--log-format json`,
//! one JSON object per event for log shippers.
//!
//! `Targets` rather than `EnvFilter`: `EnvFilter` links the `regex` crates (for span field
//! values), 320 KiB of the aarch64 `dist` agent, about a tenth of it (cross/README.md), for
//! `[span{field=value}]` directives that match nothing here: no vantage code opens a span.
//! The `target=level` lists the docs show filter the same way (longest target prefix wins).

use std::io::IsTerminal;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, fields, span.
    Json,
}

/// The filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info";

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: LogFormat) {
    init_with_default(format, DEFAULT_FILTER);
}

/// [`init`] with another filter for when `RUST_LOG` is not set (the ingester quiets its
/// libraries' chatter this way).
pub fn init_with_default(format: LogFormat, default_filter: &str) {
    let env = std::env::var("RUST_LOG").ok();
    let (filter, refused) = filter(env.as_deref(), default_filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(fmt.with_ansi(std::io::stderr().is_terminal()))
            .init(),
        LogFormat::Json => registry.with(fmt.json().with_current_span(false)).init(),
    }
    if let Some(value) = refused {
        tracing::warn!(
            rust_log = %value,
            default = default_filter,
            "RUST_LOG not understood (expected level or target=level, comma-separated), \
             using the default"
        );
    }
}

/// The filter from `RUST_LOG` (`env`), or `default_filter` when it is unset or empty; a value
/// that does not parse is returned too, to be logged once the subscriber is up.
fn filter<'e>(env: Option<&'e str>, default_filter: &str) -> (Targets, Option<&'e str>) {
    let default = || default_filter.parse().unwrap_or_default();
    match env.map(str::trim).filter(|v| !v.is_empty()) {
        None => (default(), None),
        Some(v) => match v.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(_) => (default(), Some(v)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn rust_log_lists_of_targets_filter_by_the_longest_prefix() {
        let (f, refused) = filter(
            Some("warn,vantage_agent=info,vantage_agent::probe=trace"),
            "info",
        );
        assert_eq!(refused, None);
        assert!(f.would_enable("rumqttc::state", &Level::WARN));
        assert!(!f.would_enable("rumqttc::state", &Level::INFO));
        assert!(f.would_enable("vantage_agent::uplink", &Level::INFO));
        assert!(!f.would_enable("vantage_agent::uplink", &Level::DEBUG));
        assert!(f.would_enable("vantage_agent::probe::check", &Level::TRACE));
    }

    #[test]
    fn unset_empty_or_unparsable_rust_log_uses_the_default() {
        let (f, refused) = filter(None, "info,rdkafka=warn");
        assert_eq!(refused, None);
        assert!(f.would_enable("vantage_ingester", &Level::INFO));
        assert!(!f.would_enable("rdkafka::client", &Level::INFO));
        let (f, refused) = filter(Some("  "), "info");
        assert_eq!(refused, None);
        assert!(f.would_enable("x", &Level::INFO));
        let (f, refused) = filter(Some("vantage_agent=loud"), "info");
        assert_eq!(refused, Some("vantage_agent=loud"));
        assert!(f.would_enable("x", &Level::INFO));
        assert!(!f.would_enable("x", &Level::DEBUG));
        // A plain level, and "debug" as the agent's --help suggests.
        let (f, _) = filter(Some("debug"), "info");
        assert!(f.would_enable("hyper::proto", &Level::DEBUG));
    }
}
