//! `[storage]` as the ingester runs it: retention, partitions ahead, upkeep and rollup intervals,
//! checked once for the config file and `maintain`'s flags alike. Apart from `storage.rs` (which
//! does the upkeep) so that the validated config needs nothing of the database code.

use std::time::Duration;

use serde::Deserialize;

use super::Invalid;

pub(crate) const DAY: Duration = Duration::from_secs(86_400);

/// How partitions and retention are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// Raw results, gap records and 1-minute rollups older than this are dropped (default 30 days).
    pub raw_retention: Duration,
    /// 1-hour rollups older than this are dropped (default 400 days).
    pub rollup_retention: Duration,
    /// 1-day rollups older than this are dropped (default 5 years).
    pub daily_retention: Duration,
    /// How often the rollup round runs (default 10 s).
    pub rollup_interval: Duration,
    /// Days of partitions created ahead of today (default 7): an insert never waits for DDL.
    pub partitions_ahead: u32,
    /// How often upkeep runs (default 10 minutes).
    pub interval: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            raw_retention: 30 * DAY,
            rollup_retention: 400 * DAY,
            daily_retention: 1826 * DAY,
            rollup_interval: Duration::from_secs(10),
            partitions_ahead: 7,
            interval: Duration::from_secs(600),
        }
    }
}

/// Partition upkeep and retention, run by the sink (see `storage.rs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    /// Raw results, gap records and 1-minute rollups are kept this long (default 30d).
    #[serde(default = "default_raw_retention", with = "humantime_serde")]
    pub raw_retention: Duration,
    /// 1-hour rollups are kept this long (default 400d).
    #[serde(default = "default_rollup_retention", with = "humantime_serde")]
    pub rollup_retention: Duration,
    /// 1-day rollups are kept this long (default 1826d, 5 years).
    #[serde(default = "default_daily_retention", with = "humantime_serde")]
    pub daily_retention: Duration,
    /// How often the sink runs a rollup round (default 10s).
    #[serde(default = "default_rollup_interval", with = "humantime_serde")]
    pub rollup_interval: Duration,
    /// Days of partitions created ahead (default 7).
    #[serde(default = "default_partitions_ahead")]
    pub partitions_ahead: u32,
    /// How often the sink runs upkeep (default 10m).
    #[serde(default = "default_upkeep_interval", with = "humantime_serde")]
    pub upkeep_interval: Duration,
}

impl Default for RawStorage {
    fn default() -> Self {
        RawStorage {
            raw_retention: default_raw_retention(),
            rollup_retention: default_rollup_retention(),
            daily_retention: default_daily_retention(),
            rollup_interval: default_rollup_interval(),
            partitions_ahead: default_partitions_ahead(),
            upkeep_interval: default_upkeep_interval(),
        }
    }
}

fn default_raw_retention() -> Duration {
    StorageConfig::default().raw_retention
}
fn default_rollup_retention() -> Duration {
    StorageConfig::default().rollup_retention
}
fn default_daily_retention() -> Duration {
    StorageConfig::default().daily_retention
}
fn default_rollup_interval() -> Duration {
    StorageConfig::default().rollup_interval
}
fn default_partitions_ahead() -> u32 {
    StorageConfig::default().partitions_ahead
}
fn default_upkeep_interval() -> Duration {
    StorageConfig::default().interval
}

impl TryFrom<RawStorage> for StorageConfig {
    type Error = Invalid;

    fn try_from(st: RawStorage) -> Result<StorageConfig, Invalid> {
        let storage = StorageConfig {
            raw_retention: st.raw_retention,
            rollup_retention: st.rollup_retention,
            daily_retention: st.daily_retention,
            rollup_interval: st.rollup_interval,
            partitions_ahead: st.partitions_ahead,
            interval: st.upkeep_interval,
        };
        storage
            .check()
            .map_err(|(setting, reason)| (setting.key().to_owned(), reason))?;
        Ok(storage)
    }
}

/// A setting of [`StorageConfig`], named as the config file and `maintain`'s flags name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    RawRetention,
    RollupRetention,
    DailyRetention,
    PartitionsAhead,
    Interval,
    RollupInterval,
}

impl Setting {
    /// The key in the config file.
    pub fn key(self) -> &'static str {
        match self {
            Setting::RawRetention => "storage.raw_retention",
            Setting::RollupRetention => "storage.rollup_retention",
            Setting::DailyRetention => "storage.daily_retention",
            Setting::PartitionsAhead => "storage.partitions_ahead",
            Setting::Interval => "storage.upkeep_interval",
            Setting::RollupInterval => "storage.rollup_interval",
        }
    }

    /// The flag of `vantage-ingester maintain` that overrides it, if any.
    pub fn flag(self) -> Option<&'static str> {
        match self {
            Setting::RawRetention => Some("--raw-retention"),
            Setting::RollupRetention => Some("--rollup-retention"),
            Setting::DailyRetention => Some("--daily-retention"),
            Setting::PartitionsAhead => Some("--ahead"),
            Setting::Interval | Setting::RollupInterval => None,
        }
    }
}

impl StorageConfig {
    /// Checks every limit; the config file and `maintain`'s flags go through this one check, so
    /// a flag can never do what the file may not.
    pub fn check(&self) -> Result<(), (Setting, String)> {
        if self.raw_retention < DAY {
            return Err((
                Setting::RawRetention,
                "must be at least 1 day (partitions are whole days)".into(),
            ));
        }
        if self.rollup_retention < self.raw_retention {
            return Err((
                Setting::RollupRetention,
                format!(
                    "{} must not be shorter than raw_retention ({})",
                    show(self.rollup_retention),
                    show(self.raw_retention)
                ),
            ));
        }
        if self.daily_retention < self.raw_retention {
            return Err((
                Setting::DailyRetention,
                format!(
                    "{} must not be shorter than raw_retention ({})",
                    show(self.daily_retention),
                    show(self.raw_retention)
                ),
            ));
        }
        if self.rollup_interval < Duration::from_millis(100) {
            return Err((Setting::RollupInterval, "must be at least 100ms".into()));
        }
        if self.partitions_ahead == 0 || self.partitions_ahead > 366 {
            return Err((Setting::PartitionsAhead, "must be 1..=366".into()));
        }
        if self.interval < Duration::from_secs(1) {
            return Err((Setting::Interval, "must be at least 1s".into()));
        }
        Ok(())
    }

    /// Whole days of raw data retention keeps (rounded up): the window upkeep adopts
    /// default-partition rows from.
    pub fn keep_days(&self) -> i32 {
        i32::try_from(self.raw_retention.as_secs().div_ceil(DAY.as_secs())).unwrap_or(i32::MAX)
    }
}

/// `30d` for whole days, else humantime's form (`36h`: not `1day 12h`).
fn show(d: Duration) -> String {
    if d.as_secs() % DAY.as_secs() == 0 && d.subsec_nanos() == 0 {
        format!("{}d", d.as_secs() / DAY.as_secs())
    } else {
        humantime::format_duration(d).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_name_the_setting() {
        let ok = StorageConfig::default();
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(ok.keep_days(), 30);
        let short = StorageConfig {
            raw_retention: Duration::from_secs(3600),
            ..ok.clone()
        };
        assert_eq!(short.check().unwrap_err().0, Setting::RawRetention);
        let crossed = StorageConfig {
            raw_retention: 500 * DAY,
            ..ok.clone()
        };
        let (setting, reason) = crossed.check().unwrap_err();
        assert_eq!(setting, Setting::RollupRetention);
        assert_eq!(reason, "400d must not be shorter than raw_retention (500d)");
        let none_ahead = StorageConfig {
            partitions_ahead: 0,
            ..ok.clone()
        };
        assert_eq!(none_ahead.check().unwrap_err().0.flag(), Some("--ahead"));
        // Part of a day counts as a day kept.
        let odd = StorageConfig {
            raw_retention: 30 * DAY + Duration::from_secs(1),
            ..ok
        };
        assert_eq!(odd.keep_days(), 31);
    }
}
