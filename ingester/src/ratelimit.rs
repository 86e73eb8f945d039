//! Rate-limited logging for input-driven warnings: one copy for both binaries
//! (`vantage_common::ratelimit`).

pub use vantage_common::ratelimit::RateLimit;
