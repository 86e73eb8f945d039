//! `[sink]`: batch sizes and the window around the bridge's clock that results must fall into
//! (the clock-skew guard of `clock.rs`).

use std::time::Duration;

use serde::Deserialize;

use super::storage::StorageConfig;
use super::Invalid;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSink {
    /// Most Kafka messages per PostgreSQL transaction (default 500).
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// Longest wait for a batch to fill once its first message arrived (default 200ms).
    #[serde(default = "default_batch_timeout", with = "humantime_serde")]
    pub batch_timeout: Duration,
    /// A result must have started at most this long before the bridge received it (its Kafka
    /// timestamp), else it is dead-lettered as `clock_skew` (default 1h; at most
    /// `storage.raw_retention`). See `clock.rs`.
    #[serde(default = "default_max_clock_behind", with = "humantime_serde")]
    pub max_clock_behind: Duration,
    /// ... and at most this long after it (default 5m, at most 1d).
    #[serde(default = "default_max_clock_ahead", with = "humantime_serde")]
    pub max_clock_ahead: Duration,
}

impl Default for RawSink {
    fn default() -> Self {
        RawSink {
            batch_max: default_batch_max(),
            batch_timeout: default_batch_timeout(),
            max_clock_behind: default_max_clock_behind(),
            max_clock_ahead: default_max_clock_ahead(),
        }
    }
}

fn default_max_clock_behind() -> Duration {
    ClockWindow::default().max_behind
}
fn default_max_clock_ahead() -> Duration {
    ClockWindow::default().max_ahead
}

fn default_batch_max() -> usize {
    500
}
fn default_batch_timeout() -> Duration {
    Duration::from_millis(200)
}

#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub batch_max: usize,
    pub batch_timeout: Duration,
    /// The window around the bridge's clock results must fall into (`clock.rs`).
    pub clock: ClockWindow,
}

/// The window a result's time must fall into, around the bridge's clock (`clock.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockWindow {
    /// Longest a result may have started before the bridge received it.
    pub max_behind: Duration,
    /// Longest a result may have started after the bridge received it (clocks of two machines).
    pub max_ahead: Duration,
    /// `storage.raw_retention`: nothing older (by the sink's clock) is stored.
    pub retention: Duration,
}

impl Default for ClockWindow {
    fn default() -> Self {
        ClockWindow {
            max_behind: Duration::from_secs(3600),
            max_ahead: Duration::from_secs(300),
            retention: StorageConfig::default().raw_retention,
        }
    }
}

impl SinkConfig {
    /// `[sink]` checked against the `[storage]` it writes into.
    pub fn from_raw(raw: RawSink, storage: &StorageConfig) -> Result<SinkConfig, Invalid> {
        let invalid = |key: &str, reason: &str| Err((format!("sink.{key}"), reason.to_owned()));
        if raw.batch_max == 0 {
            return invalid("batch_max", "must be at least 1");
        }
        if raw.max_clock_behind > storage.raw_retention {
            return invalid(
                "max_clock_behind",
                "must not exceed storage.raw_retention: older results would be deleted by the \
                 next retention",
            );
        }
        if raw.max_clock_ahead > Duration::from_secs(86_400) {
            return invalid(
                "max_clock_ahead",
                "must be at most 1d: a result from the future stands as the latest result of \
                 its target until that time",
            );
        }
        Ok(SinkConfig {
            batch_max: raw.batch_max,
            batch_timeout: raw.batch_timeout,
            clock: ClockWindow {
                max_behind: raw.max_clock_behind,
                max_ahead: raw.max_clock_ahead,
                retention: storage.raw_retention,
            },
        })
    }
}
