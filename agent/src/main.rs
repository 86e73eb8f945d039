//! The `vantage-agent` binary: parses the command line, loads the config, runs [`vantage_agent::run`].
//!
//! Exit codes (docs/agent.md), the same scheme as vantage-ingester's: 0 success (also a SIGTERM
//! stop); 1 failure (bad configuration file, a `--rounds` run that could not deliver); 2 bad
//! command line (clap's errors, and `probe` options that fail the target checks); 3 `probe`
//! ran and the outcome is not `up` (like the ingester's 3: checked, found unhealthy).

use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "vantage-agent",
    version,
    about = "Probe HTTP(S) targets and upload results over MQTT",
    after_help = "Exit codes: 0 success, 1 failure, 2 bad command line, 3 `probe`: the outcome \
                  is not up. Logs go to stderr; RUST_LOG filters them (e.g. debug)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: human-readable text or one JSON object per event.
    #[arg(long, global = true, value_enum, default_value_t = vantage_agent::logging::LogFormat::Text)]
    log_format: vantage_agent::logging::LogFormat,
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
    /// Probe one URL (or, with --kind tcp or tls, one host:port; with --kind dns, one name) now, with the engine and
    /// options of a configured target, and print every measured field. Exit status: 0 when the
    /// outcome is `up`, 3 when it is not, 2 on a bad command line.
    ///
    /// Example: vantage-agent probe https://example.org/ --regex 'Example Domain' --json
    ///
    /// Example: vantage-agent probe --kind tls example.org:443
    ///
    /// Example: vantage-agent probe --kind dns example.org --type AAAA --resolver 192.0.2.53
    Probe(Box<ProbeArgs>),
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// The http:// or https:// URL to probe; host:port for --kind tcp or tls; the name to ask
    /// for with --kind dns.
    url: String,
    /// What to check: http (a request to the URL), tcp (a connection to host:port), tls (a
    /// handshake with host:port), dns (a query for the name).
    #[arg(long, default_value = "http")]
    kind: String,
    /// dns: the record type (A, AAAA, TXT, MX, ... or TYPE<n>; default A).
    #[arg(long = "type")]
    query_type: Option<String>,
    /// dns: the resolver, ip or ip:port (default: the first nameserver of /etc/resolv.conf).
    #[arg(long)]
    resolver: Option<String>,
    /// tcp: text to write once connected (e.g. "PING\r\n" written with the shell's $'...').
    #[arg(long)]
    send: Option<String>,
    /// tcp: text the first bytes read must be (a banner such as "SSH-2.0-").
    #[arg(long)]
    expect: Option<String>,
    /// Deadline of the whole probe, redirects included.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Regular expression (regex-lite syntax) to search in the body.
    #[arg(long)]
    regex: Option<String>,
    /// HTTP method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// Extra request header, "Name: value"; repeatable.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Accepted status codes and ranges: "200-299", "200,301", or the flag repeated. Default:
    /// 200-299.
    #[arg(long = "accept", value_delimiter = ',')]
    accept: Vec<String>,
    /// Redirects to follow; 0 records the redirect itself.
    #[arg(long, default_value_t = vantage_agent::target::DEFAULT_MAX_REDIRECTS)]
    max_redirects: u8,
    /// Most body bytes to read.
    #[arg(long, default_value_t = vantage_agent::target::DEFAULT_BODY_CAP)]
    body_cap: usize,
    /// PEM file of CA certificates to trust instead of the bundled roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Accept any certificate.
    #[arg(long)]
    insecure: bool,
    /// Connect over IPv4 only.
    #[arg(long, conflicts_with = "ipv6")]
    ipv4: bool,
    /// Connect over IPv6 only.
    #[arg(long)]
    ipv6: bool,
    /// Print one JSON object instead of aligned lines.
    #[arg(long)]
    json: bool,
}

impl ProbeArgs {
    /// The same validation as a target in a config file.
    fn target(&self) -> anyhow::Result<vantage_agent::target::Target> {
        use vantage_agent::target::{IpFamily, ProbeKind, RawTarget, StatusSpec, Target};
        let kind = ProbeKind::ALL
            .into_iter()
            .find(|k| k.as_str() == self.kind)
            .with_context(|| format!("--kind {:?}: expected http, tcp, tls or dns", self.kind))?;
        let http = kind == ProbeKind::Http;
        let dns = kind == ProbeKind::Dns;
        let mut headers = std::collections::BTreeMap::new();
        for h in &self.headers {
            let (name, value) = h
                .split_once(':')
                .with_context(|| format!("--header {h:?}: expected \"Name: value\""))?;
            headers.insert(name.trim().to_owned(), value.trim().to_owned());
        }
        let raw = RawTarget {
            id: 0,
            name: None,
            kind,
            url: if http {
                self.url.clone()
            } else {
                String::new()
            },
            address: (!http && !dns).then(|| self.url.clone()),
            send: self.send.clone(),
            expect: self.expect.clone(),
            query: dns.then(|| self.url.clone()),
            query_type: self.query_type.clone(),
            resolver: self.resolver.clone(),
            interval: self.timeout,
            timeout: self.timeout,
            regex: self.regex.clone(),
            method: self.method.clone(),
            headers: headers.into(),
            headers_from_env: Default::default(),
            header_files: Default::default(),
            accepted_status: self.accept.iter().cloned().map(StatusSpec::Text).collect(),
            max_redirects: self.max_redirects,
            body_cap: self.body_cap,
            ca_file: self.ca_file.clone(),
            tls_skip_verify: self.insecure,
            ip_family: if self.ipv4 {
                IpFamily::Ipv4
            } else if self.ipv6 {
                IpFamily::Ipv6
            } else {
                IpFamily::Auto
            },
            allow_downgrade: false,
        };
        Target::from_raw(raw).map_err(|e| {
            let flag = match e.key {
                "url" => "URL".to_owned(),
                "address" => "HOST:PORT".to_owned(),
                "query" => "NAME".to_owned(),
                "query_type" => "--type".to_owned(),
                "interval" | "timeout" => "--timeout".to_owned(),
                "accepted_status" => "--accept".to_owned(),
                "tls_skip_verify" => "--insecure".to_owned(),
                key => format!("--{}", key.replace('_', "-")),
            };
            anyhow::anyhow!("{flag}: {}", e.reason)
        })
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    vantage_agent::logging::init(cli.log_format);
    match cli.command {
        Command::CheckConfig { config } => {
            let c = vantage_agent::Config::load(&config)?;
            let targets = match c.targets_source {
                vantage_agent::TargetsSource::Local => format!("{} local targets", c.targets.len()),
                vantage_agent::TargetsSource::Central => format!(
                    "targets pushed by the ingester, last good set kept in {}",
                    c.state_dir.display()
                ),
            };
            println!(
                "{}: ok (agent {}, region {}, {targets})",
                config.display(),
                c.agent_id,
                c.region,
            );
            Ok(())
        }
        Command::Probe(args) => {
            let target = args.target().unwrap_or_else(|e| usage_error("probe", e));
            let m =
                vantage_agent::oneshot::probe(&target).context("cannot start the tokio runtime")?;
            if args.json {
                println!("{}", vantage_agent::oneshot::to_json(&m));
            } else {
                print!("{}", vantage_agent::oneshot::to_text(&m));
            }
            if m.outcome != vantage_proto::Outcome::Up {
                std::process::exit(3);
            }
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
                tokio::spawn(vantage_common::signal::cancel_on_signal(shutdown.clone()));
                if let Some(addr) = config.metrics_listen {
                    vantage_agent::metrics::serve(addr, shutdown.clone()).await?;
                }
                let summary = vantage_agent::run(
                    config,
                    vantage_agent::RunOptions { rounds },
                    shutdown.clone(),
                )
                .await?;
                // SIGTERM: the drain deadline bounds shutdown; what it leaves is counted and
                // logged, and the stop itself is a success (systemd must not see a failure).
                // A `--rounds` run that could not deliver is a failure of that run.
                if shutdown.is_cancelled() {
                    if summary.uplink.undelivered > 0 {
                        tracing::warn!(
                            undelivered = summary.uplink.undelivered,
                            "stopped with results undelivered after the drain deadline"
                        );
                    }
                } else if summary.uplink.undelivered > 0 {
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

/// A flag value that parsed but failed a later check: reported the way clap reports its own
/// usage errors (message, usage line, exit code 2), so every command-line mistake looks and
/// exits alike.
fn usage_error(subcommand: &str, message: impl std::fmt::Display) -> ! {
    let mut cli = Cli::command();
    cli.build();
    match cli.find_subcommand_mut(subcommand) {
        Some(sub) => sub
            .error(clap::error::ErrorKind::ValueValidation, message)
            .exit(),
        None => cli
            .error(clap::error::ErrorKind::ValueValidation, message)
            .exit(),
    }
}
