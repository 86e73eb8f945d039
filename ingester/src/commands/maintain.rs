//! `vantage-ingester maintain`: what the sink's upkeep does every `storage.upkeep_interval`
//! (partitions ahead, retention, a rollup round), now, with the config's `[storage]` and the
//! command line's overrides, or as a dry run that changes nothing.

use std::path::Path;
use std::time::Duration;

use crate::config::ConfigError;
use crate::storage::{self, Setting};
use crate::{db, Config};

/// The `--raw-retention`, `--rollup-retention`, `--daily-retention` and `--ahead` flags.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    pub raw_retention: Option<Duration>,
    pub rollup_retention: Option<Duration>,
    pub daily_retention: Option<Duration>,
    pub ahead: Option<u32>,
}

impl Overrides {
    /// Whether the flag of `setting` was given (its error then names the flag, not the file).
    fn given(&self, setting: Setting) -> bool {
        match setting {
            Setting::RawRetention => self.raw_retention.is_some(),
            Setting::RollupRetention => self.rollup_retention.is_some(),
            Setting::DailyRetention => self.daily_retention.is_some(),
            Setting::PartitionsAhead => self.ahead.is_some(),
            Setting::Interval | Setting::RollupInterval => false,
        }
    }
}

pub async fn run(path: &Path, flags: Overrides, dry_run: bool) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    // The file's [storage] (its defaults when absent), then the flags, checked the same way: a
    // flag cannot do what the file may not.
    let mut settings = config.storage.clone();
    settings.raw_retention = flags.raw_retention.unwrap_or(settings.raw_retention);
    settings.rollup_retention = flags.rollup_retention.unwrap_or(settings.rollup_retention);
    settings.daily_retention = flags.daily_retention.unwrap_or(settings.daily_retention);
    settings.partitions_ahead = flags.ahead.unwrap_or(settings.partitions_ahead);
    if let Err((setting, reason)) = settings.check() {
        return Err(match setting.flag().filter(|_| flags.given(setting)) {
            Some(flag) => anyhow::anyhow!("{flag}: {reason}"),
            None => ConfigError::Invalid {
                file: config.file.clone(),
                key: setting.key().into(),
                reason,
            }
            .into(),
        });
    }
    let pg = config.postgres()?;
    let mut client = db::connect(pg).await?;
    if dry_run {
        // Changes nothing, migrations included: an older schema is reported.
        let version = db::schema_version(&client).await?;
        let latest = db::MIGRATIONS.len() as i32;
        if version < latest {
            anyhow::bail!(
                "schema {} is at version {version}, this maintain needs {latest}: run \
                 `vantage-ingester migrate` first (a dry run changes nothing)",
                pg.schema
            );
        }
    } else {
        db::migrate(&mut client, &pg.schema).await?;
    }
    let upkeep = storage::maintain(&client, &settings, dry_run).await?;
    print!("{}", upkeep.render(dry_run));
    Ok(())
}
