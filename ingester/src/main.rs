//! The `vantage-ingester` binary: command line, config, tracing, then a stage's `run`.
//!
//! Exit codes (docs/ingester.md): 0 success; 1 failure (bad configuration, a stage or command
//! failed); 2 bad command line; 3 `status` could not reach a configured service, or `agents`
//! found a stale agent, or `alerts` found an open incident.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use vantage_ingester::{
    alert, bridge, db, fleet, http, logging, report, sink, status, storage, targets, web, Config,
};

#[derive(Parser)]
#[command(
    name = "vantage-ingester",
    version,
    about = "vantage central ingester: MQTT → Kafka → PostgreSQL",
    after_help = "Exit codes: 0 success, 1 failure, 2 bad command line, 3 `status`: a service \
                  is unreachable / `agents`: an agent is stale / `alerts`: an incident is open. Logs go to stderr; RUST_LOG \
                  filters them (e.g. debug,rdkafka=info)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: human-readable text or one JSON object per event.
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Subscribe to agent results on MQTT and produce them to Kafka.
    ///
    /// Example: vantage-ingester bridge --config /etc/vantage/ingester.toml
    Bridge {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Consume results from Kafka and write them to PostgreSQL (applies migrations first).
    ///
    /// Example: vantage-ingester sink --config /etc/vantage/ingester.toml
    Sink {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Evaluate the alert rules ([alerts] in the config) and deliver to Alertmanager and
    /// webhooks; one active evaluator per schema, others stand by (see docs/alerts.md).
    ///
    /// Example: vantage-ingester alert --config /etc/vantage/ingester.toml
    Alert {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Serve the read-only dashboard and status page ([web] in the config, docs/web.md).
    ///
    /// Example: vantage-ingester web --config /etc/vantage/ingester.toml
    Web {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List the open incidents. Exit status 3 if there is any.
    ///
    /// Example: vantage-ingester alerts --config /etc/vantage/ingester.toml
    Alerts {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Apply the SQL migrations and exit.
    ///
    /// Example: vantage-ingester migrate --config /etc/vantage/ingester.toml
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print availability and response-time percentiles per target and region.
    ///
    /// Example: vantage-ingester report --config ingester.toml --since 24h --format csv
    Report {
        #[arg(long, short)]
        config: PathBuf,
        /// Window to report on, e.g. 15m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        since: Duration,
        /// Only this target id.
        #[arg(long)]
        target: Option<i32>,
        #[arg(long, value_enum, default_value_t = report::Format::Table)]
        format: report::Format,
    },
    /// Create missing partitions, drop expired ones and run a rollup round now, as the sink does
    /// every `storage.upkeep_interval`, with the retention of the config's `[storage]`. Prints
    /// what it removed, with row counts.
    ///
    /// Example: vantage-ingester maintain --config ingester.toml --dry-run
    Maintain {
        #[arg(long, short)]
        config: PathBuf,
        /// Override `storage.raw_retention`: raw results and gaps older than this are dropped.
        #[arg(long, value_parser = humantime::parse_duration)]
        raw_retention: Option<Duration>,
        /// Override `storage.rollup_retention`: 1-hour rollups older than this are dropped.
        #[arg(long, value_parser = humantime::parse_duration)]
        rollup_retention: Option<Duration>,
        /// Override `storage.daily_retention`: 1-day rollups older than this are dropped.
        #[arg(long, value_parser = humantime::parse_duration)]
        daily_retention: Option<Duration>,
        /// Override `storage.partitions_ahead`: days of partitions to create ahead.
        #[arg(long)]
        ahead: Option<u32>,
        /// Print what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate a configuration file without connecting to anything, and say which commands it
    /// can run (each needs its sections: bridge [mqtt] [kafka], sink [kafka] [postgres], ...).
    /// Exit status 1 if the file is invalid, or if a command named with --stage cannot run.
    ///
    /// Example: vantage-ingester check-config --stage sink /etc/vantage/ingester.toml
    CheckConfig {
        config: PathBuf,
        /// A command this file must be able to run (repeatable): bridge, sink, migrate, report,
        /// maintain, agents, "targets apply", "targets diff", "targets list", status.
        #[arg(long = "stage", value_parser = clap::builder::PossibleValuesParser::new(
            vantage_ingester::config::COMMAND_SECTIONS.iter().map(|(c, _)| *c)
        ))]
        stages: Vec<String>,
    },
    /// Define targets centrally and push them to the agents (see docs/targets.md).
    ///
    /// Example: vantage-ingester targets apply --config ingester.toml targets.toml
    #[command(subcommand)]
    Targets(TargetsCommand),
    /// List the agents that reported status: region, version, online/offline/STALE, last seen,
    /// target set generations and any refused set. Exit status 3 if any agent is stale.
    ///
    /// Example: vantage-ingester agents --config ingester.toml --stale-after 2m
    Agents {
        #[arg(long, short)]
        config: PathBuf,
        /// An online agent not heard of for this long is flagged STALE (default: three missed
        /// default heartbeats).
        #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
        stale_after: Duration,
    },
    /// Show schema version, results partitions and the sink group's lag per Kafka partition.
    /// Exits 3 when a configured service cannot be reached.
    ///
    /// Example: vantage-ingester status --config /etc/vantage/ingester.toml
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum TargetsCommand {
    /// Validate FILE, store its targets in PostgreSQL (stable ids, removed ones retired) and
    /// publish the resulting sets to the agents as retained MQTT messages. Changes nothing if the
    /// file has an error.
    ///
    /// Example: vantage-ingester targets apply --config ingester.toml targets.toml
    Apply {
        #[arg(long, short)]
        config: PathBuf,
        /// The targets file (TOML).
        file: PathBuf,
    },
    /// Show what `apply FILE` would change, without changing anything.
    ///
    /// Example: vantage-ingester targets diff --config ingester.toml targets.toml
    Diff {
        #[arg(long, short)]
        config: PathBuf,
        file: PathBuf,
    },
    /// Show the targets that are live (with --all, retired ones too) and the published sets.
    ///
    /// Example: vantage-ingester targets list --config ingester.toml --all
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        all: bool,
    },
    /// Validate FILE without connecting to anything.
    ///
    /// Example: vantage-ingester targets check targets.toml
    Check { file: PathBuf },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::CheckConfig {
                config: path,
                stages,
            } => {
                let config = Config::load(&path)?;
                let checks = config.stages();
                println!("{}: valid", path.display());
                print!("{}", vantage_ingester::config::render_stages(&checks));
                let unable: Vec<&str> = checks
                    .iter()
                    .filter(|c| !c.missing.is_empty() && stages.iter().any(|s| s == c.command))
                    .map(|c| c.command)
                    .collect();
                if !unable.is_empty() {
                    anyhow::bail!(
                        "{}: cannot run {} (see above)",
                        path.display(),
                        unable.join(", ")
                    );
                }
            }
            Command::Bridge { config } => {
                let config = Config::load(&config)?;
                let shutdown = shutdown_on_signal();
                let state = std::sync::Arc::<bridge::BridgeState>::default();
                if let Some(addr) = config.http.bridge_listen {
                    let ready = http::Readiness::new(vantage_ingester::metrics::Stage::Bridge)
                        .mqtt(state.clone())
                        .kafka(config.kafka()?)?;
                    http::start(addr, ready, shutdown.clone()).await?;
                }
                bridge::run_with_state(&config, shutdown, state).await?;
            }
            Command::Sink { config } => {
                let config = Config::load(&config)?;
                let shutdown = shutdown_on_signal();
                if let Some(addr) = config.http.sink_listen {
                    let ready = http::Readiness::new(vantage_ingester::metrics::Stage::Sink)
                        .kafka(config.kafka()?)?
                        .postgres(config.postgres()?);
                    http::start(addr, ready, shutdown.clone()).await?;
                }
                sink::run(&config, shutdown).await?;
            }
            Command::Alert { config } => {
                let config = Config::load(&config)?;
                let shutdown = shutdown_on_signal();
                if let Some(addr) = config.http.alert_listen {
                    let ready = http::Readiness::new(vantage_ingester::metrics::Stage::Alert)
                        .postgres(config.postgres()?);
                    http::start(addr, ready, shutdown.clone()).await?;
                }
                alert::run(&config, shutdown).await?;
            }
            Command::Web { config } => {
                let config = Config::load(&config)?;
                web::run(&config, shutdown_on_signal()).await?;
            }
            Command::Alerts { config } => {
                let config = Config::load(&config)?;
                let client = db::connect(config.postgres()?).await?;
                let open = alert::list(&client).await?;
                print!("{}", alert::render(&open));
                if !open.is_empty() {
                    std::process::exit(3);
                }
            }
            Command::Status { config } => {
                let config = Config::load(&config)?;
                let status = status::gather(&config).await;
                print!("{}", status::render(&status));
                if !status.reachable() {
                    std::process::exit(3);
                }
            }
            Command::Migrate { config } => {
                let config = Config::load(&config)?;
                let pg = config.postgres()?;
                let mut client = db::connect(pg).await?;
                let applied = db::migrate(&mut client, &pg.schema).await?;
                println!("{applied} migrations applied");
            }
            Command::Report {
                config,
                since,
                target,
                format,
            } => {
                let config = Config::load(&config)?;
                let client = db::connect(config.postgres()?).await?;
                let rows = report::query(&client, since, target).await?;
                print!("{}", report::render(&rows, format));
            }
            Command::Targets(TargetsCommand::Check { file }) => {
                let f = targets::TargetsFile::load(&file)?;
                println!(
                    "{}: ok ({} targets, {} regions)",
                    file.display(),
                    f.targets.len(),
                    f.regions.len()
                );
            }
            Command::Targets(TargetsCommand::Diff { config, file }) => {
                let f = targets::TargetsFile::load(&file)?;
                let config = Config::load(&config)?;
                let mut client = db::connect(config.postgres()?).await?;
                print!("{}", targets::diff(&mut client, &f).await?.render());
            }
            Command::Targets(TargetsCommand::Apply { config, file }) => {
                let f = targets::TargetsFile::load(&file)?;
                let config = Config::load(&config)?;
                let mut client = db::connect(config.postgres()?).await?;
                db::migrate(&mut client, &config.postgres()?.schema).await?;
                let applied = targets::apply(&mut client, config.mqtt()?, &f).await?;
                print!("{}", applied.plan.render());
                println!("{} retained messages published", applied.published);
            }
            Command::Targets(TargetsCommand::List { config, all }) => {
                let config = Config::load(&config)?;
                let client = db::connect(config.postgres()?).await?;
                print!("{}", targets::render_list(&client, all).await?);
            }
            Command::Agents {
                config,
                stale_after,
            } => {
                let config = Config::load(&config)?;
                let client = db::connect(config.postgres()?).await?;
                let lines = fleet::list(&client, stale_after).await?;
                print!("{}", fleet::render(&lines));
                if lines.iter().any(|l| l.stale) {
                    std::process::exit(3);
                }
            }
            Command::Maintain {
                config,
                raw_retention,
                rollup_retention,
                daily_retention,
                ahead,
                dry_run,
            } => {
                let config = Config::load(&config)?;
                // The file's [storage] (its defaults when absent), then the flags, checked the
                // same way: a flag cannot do what the file may not.
                let mut storage = config.storage.clone();
                storage.raw_retention = raw_retention.unwrap_or(storage.raw_retention);
                storage.rollup_retention = rollup_retention.unwrap_or(storage.rollup_retention);
                storage.daily_retention = daily_retention.unwrap_or(storage.daily_retention);
                storage.partitions_ahead = ahead.unwrap_or(storage.partitions_ahead);
                if let Err((setting, reason)) = storage.check() {
                    let given = match setting {
                        storage::Setting::RawRetention => raw_retention.is_some(),
                        storage::Setting::RollupRetention => rollup_retention.is_some(),
                        storage::Setting::DailyRetention => daily_retention.is_some(),
                        storage::Setting::PartitionsAhead => ahead.is_some(),
                        storage::Setting::Interval | storage::Setting::RollupInterval => false,
                    };
                    match setting.flag().filter(|_| given) {
                        Some(flag) => anyhow::bail!("{flag}: {reason}"),
                        None => {
                            return Err(vantage_ingester::config::ConfigError::Invalid {
                                file: config.file.clone(),
                                key: setting.key().into(),
                                reason,
                            }
                            .into())
                        }
                    }
                }
                let pg = config.postgres()?;
                let mut client = db::connect(pg).await?;
                if dry_run {
                    // Changes nothing, migrations included: an older schema is reported.
                    let version: i32 = client
                        .query_one(
                            "SELECT coalesce(max(version), 0) FROM schema_migrations",
                            &[],
                        )
                        .await
                        .map(|r| r.get(0))
                        .unwrap_or(0);
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
                let upkeep = storage::maintain(&client, &storage, dry_run).await?;
                print!("{}", upkeep.render(dry_run));
            }
        }
        Ok(())
    });
    // Dropping a runtime waits for its blocking tasks without a bound; a stage stopped while it
    // waited for Kafka leaves one behind (a metadata request, up to 10 s). What a stage must
    // finish it has finished when `run` returns, so the rest is cut off after a moment.
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}

/// A token cancelled on SIGINT or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install SIGTERM handler");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}
