//! Logging setup: the agent's (`vantage_agent::logging`: stderr, `RUST_LOG`, text or JSON with
//! `--log-format`), with the ingester's libraries quieter by default.

pub use vantage_agent::logging::LogFormat;

/// The filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,rdkafka=warn,tokio_postgres=warn";

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: LogFormat) {
    vantage_agent::logging::init_with_default(format, DEFAULT_FILTER);
}
