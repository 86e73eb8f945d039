//! Logging setup: the shared one (`vantage_common::logging`: stderr, `RUST_LOG`, text or JSON with
//! `--log-format`), with the ingester's libraries quieter by default.

pub use vantage_common::logging::LogFormat;

/// The filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,rdkafka=warn,tokio_postgres=warn";

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: LogFormat) {
    vantage_common::logging::init_with_default(format, DEFAULT_FILTER);
}
