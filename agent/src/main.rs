//! The `vantage-agent` binary: parses the command line, loads the config, runs [`vantage_agent::run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "vantage-agent",
    version,
    about = "Probe HTTP(S) targets and upload results over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: probe targets on schedule and publish results.
    ///
    /// Example: vantage-agent run --config /etc/vantage/agent.toml
    Run {
        /// Path of the TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Probe every target this many times, deliver the results, then exit.
        #[arg(long)]
        rounds: Option<u64>,
    },
    /// Validate a configuration file without connecting to anything.
    ///
    /// Example: vantage-agent check-config /etc/vantage/agent.toml
    CheckConfig {
        /// Path of the TOML configuration file.
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => {
            let c = vantage_agent::Config::load(&config)?;
            println!(
                "{}: ok (agent {}, region {}, {} targets)",
                config.display(),
                c.agent_id,
                c.region,
                c.targets.len()
            );
            Ok(())
        }
        Command::Run { config, rounds } => {
            let config = vantage_agent::Config::load(&config)?;
            // One thread is plenty for I/O-bound probing on a small board.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(signal_to(shutdown.clone()));
                let summary =
                    vantage_agent::run(config, vantage_agent::RunOptions { rounds }, shutdown)
                        .await?;
                if summary.uplink.undelivered > 0 {
                    anyhow::bail!(
                        "{} results were not delivered before the drain deadline",
                        summary.uplink.undelivered
                    );
                }
                Ok(())
            })
        }
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
async fn signal_to(token: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
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
    token.cancel();
}
