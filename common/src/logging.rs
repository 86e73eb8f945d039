//! Logging setup shared by every subcommand: `tracing` events to stderr, filtered by `RUST_LOG`
//! (`EnvFilter` syntax), as human-readable lines (coloured only on a terminal) or, with
//! `--log-format json`, one JSON object per event for log shippers.

use std::io::IsTerminal;

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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}
