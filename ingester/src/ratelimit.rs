//! Rate-limited logging for input-driven warnings: the agent's helper, one copy for both
//! binaries (see `vantage_agent::ratelimit`).

pub use vantage_agent::ratelimit::RateLimit;
