//! The `vantage-ingester` binary: the command line, then one call per command (what a command
//! does beyond that lives in `vantage_ingester::commands`, one module each).
//!
//! Exit codes (docs/ingester.md): 0 success; 1 failure (bad configuration, a stage or command
//! failed); 2 bad command line; 3 `status` could not reach a configured service, or `agents`
//! found a stale agent, or `alerts` found an open incident.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vantage_ingester::commands::{self, Outcome};
use vantage_ingester::{alert, db, fleet, logging, report, status, targets, Config};

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
        /// Only targets of this probe kind.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(
            vantage_proto::ProbeKind::ALL.map(|k| k.as_str())
        ))]
        kind: Option<String>,
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
    /// target set generations, clock (ok/unsynced/OFFSET, offset from the bridge's clock,
    /// maximum error) and any refused set. Exit status 3 if any agent is stale.
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
    let outcome = runtime.block_on(dispatch(cli.command));
    // Dropping a runtime waits for its blocking tasks without a bound; a stage stopped while it
    // waited for Kafka leaves one behind (a metadata request, up to 10 s). What a stage must
    // finish it has finished when `run` returns, so the rest is cut off after a moment.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match outcome? {
        Outcome::Fine => Ok(()),
        Outcome::Attention => std::process::exit(3),
    }
}

/// Runs one command; what a command does beyond one call lives in `vantage_ingester::commands`.
async fn dispatch(command: Command) -> anyhow::Result<Outcome> {
    match command {
        Command::CheckConfig { config, stages } => commands::check_config::run(&config, &stages)?,
        Command::Bridge { config } => commands::stage::bridge(&config).await?,
        Command::Sink { config } => commands::stage::sink(&config).await?,
        Command::Alert { config } => commands::stage::alert(&config).await?,
        Command::Web { config } => commands::stage::web(&config).await?,
        Command::Alerts { config } => {
            let config = Config::load(&config)?;
            let client = db::connect(config.postgres()?).await?;
            let open = alert::list(&client).await?;
            print!("{}", alert::render(&open));
            return Ok(Outcome::attention_if(!open.is_empty()));
        }
        Command::Status { config } => {
            let config = Config::load(&config)?;
            let status = status::gather(&config).await;
            print!("{}", status::render(&status));
            return Ok(Outcome::attention_if(!status.reachable()));
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
            kind,
            format,
        } => {
            let config = Config::load(&config)?;
            let client = db::connect(config.postgres()?).await?;
            let rows = report::query(&client, since, target, kind.as_deref()).await?;
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
            return Ok(Outcome::attention_if(lines.iter().any(|l| l.stale)));
        }
        Command::Maintain {
            config,
            raw_retention,
            rollup_retention,
            daily_retention,
            ahead,
            dry_run,
        } => {
            let flags = commands::maintain::Overrides {
                raw_retention,
                rollup_retention,
                daily_retention,
                ahead,
            };
            commands::maintain::run(&config, flags, dry_run).await?
        }
    }
    Ok(Outcome::Fine)
}
