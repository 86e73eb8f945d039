//! Rate-limited logging: the agent's [`RateLimit`] (`vantage_agent::ratelimit`), one copy for
//! both binaries.

pub use vantage_agent::ratelimit::RateLimit;
