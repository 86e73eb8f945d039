//! Agent configuration: the raw TOML shape and the validated [`Config`] the agent runs with.
//!
//! Two phases, after ripgrep and Vector: serde reads [`RawConfig`] (unknown keys are errors), then
//! [`Config::from_raw`] checks every value. Every error names the file, the key and the problem.

use std::path::{Path, PathBuf};
use std::time::Duration;
use vantage_proto::topic::{Channel, Topic};

use serde::Deserialize;

use crate::target::{RawTarget, Target};

/// A configuration that cannot be used, with where and why (one type for both binaries).
pub use vantage_common::config_text::ConfigError;

/// The file as written. Field docs are the reference for each key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// This agent's name; unique in the fleet. `[a-z0-9._-]`, at most 64 bytes.
    pub agent_id: String,
    /// The region this agent probes from, e.g. `eu-north`. Same character set as `agent_id`.
    pub region: String,
    pub mqtt: RawMqtt,
    #[serde(default)]
    pub uplink: RawUplink,
    #[serde(default)]
    pub probes: RawProbes,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub fleet: RawFleet,
    /// Where the agent keeps the last good target sets pushed by the ingester, so it can probe
    /// after a restart while the broker is unreachable (default `/var/lib/vantage`, the systemd unit's `StateDirectory`).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Local targets. When present the agent runs standalone and ignores pushed target sets;
    /// when absent it probes what the ingester's `targets apply` pushes to its region and to it.
    #[serde(default)]
    pub targets: Vec<RawTarget>,
}

/// The optional Prometheus endpoint (`metrics.rs`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// `ip:port` to serve `/metrics` and `/healthz` on (default: none, off). Port 0 picks a
    /// free port, which is logged.
    pub listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    /// How often the agent reports its status (default 30s, at least 1s). The ingester flags an
    /// agent stale after three missed heartbeats.
    #[serde(default = "default_heartbeat_interval", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
}

impl Default for RawFleet {
    fn default() -> Self {
        RawFleet {
            heartbeat_interval: default_heartbeat_interval(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    /// Broker host name or address.
    pub host: String,
    /// Broker port (default 1883).
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// User name for the broker, if it requires one.
    pub username: Option<String>,
    /// Name of an environment variable that holds the password (never the password itself).
    pub password_env: Option<String>,
    /// Path of a file whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// Name of a systemd credential holding the password: read from
    /// `$CREDENTIALS_DIRECTORY/<name>` (`LoadCredential=` in the service unit).
    pub password_credential: Option<String>,
    /// First segment of every topic (default `vantage`); lets test runs share a broker.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// MQTT keep-alive (default 30s).
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// `[mqtt.tls]`: connect over TLS (see `mqtt_tls.rs`). Absent: plain TCP, which is refused
    /// for a broker that is not on this machine unless `allow_plaintext = true`.
    pub tls: Option<vantage_common::tls_files::TlsFiles>,
    /// Send the password, results and target sets in clear text to a remote broker (default
    /// false). Only for a network you fully trust.
    #[serde(default)]
    pub allow_plaintext: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUplink {
    /// Most results per MQTT message (1..=32, default 32).
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// Longest time a result waits for its batch to fill (default 1s).
    #[serde(default = "default_flush_interval", with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Results kept while the broker is unreachable (default 10000, at most 1000000); when full
    /// the oldest go first, and the loss is reported upstream as a gap record. The memory is
    /// reserved at start (about 100 bytes per result).
    #[serde(default = "default_buffer_capacity")]
    pub buffer_capacity: usize,
    /// On shutdown, how long probes in flight may still finish and buffered results be
    /// delivered (default 10s, at most 60s). Probes still running then are aborted and
    /// counted; results still unacknowledged are counted as undelivered.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Bytes of unacknowledged results kept on disk in `state_dir/spool/<agent_id>/` (default
    /// 64MiB, about a million results; 0: no spool, results live in memory only). When full,
    /// the oldest results not yet sent are dropped into a gap record. A number of bytes or a
    /// string like `"64MiB"`; at least 64KiB unless 0.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: crate::budget::RawSize,
    /// When spooled data is synced to the card: `"always"` (default: after every flush, so a
    /// power cut tears at most the flush being written), a duration such as `"10s"` (at most
    /// that often: fewer card writes, more to lose), or `"never"` (the kernel decides).
    #[serde(default = "default_spool_fsync")]
    pub spool_fsync: String,
    /// How long a frame the broker acknowledged waits for the ingester's end-to-end
    /// acknowledgement (Kafka holds it) before it is sent again (default 30s; re-sends back off
    /// up to 8 times this). Duplicates are removed by the ingester.
    #[serde(default = "default_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// `"auto"` (default): free results only at the ingester's end-to-end acknowledgement, but
    /// fall back to the broker's PUBACK while no acknowledgement has ever arrived (an ingester
    /// from before them; docs/delivery.md). `"off"`: the broker's PUBACK frees them (the
    /// behaviour before end-to-end acknowledgements).
    #[serde(default = "default_end_to_end_acks")]
    pub end_to_end_acks: String,
    /// Frame format version: 4 (default: packed, about 30 bytes per result, every probe kind),
    /// 3 (for an ingester older than version 4; http targets only) or 2 (older than version 3;
    /// http targets only; docs/delivery.md "Upgrading").
    #[serde(default = "default_wire_format")]
    pub wire_format: u8,
}

impl Default for RawUplink {
    fn default() -> Self {
        RawUplink {
            batch_max: default_batch_max(),
            flush_interval: default_flush_interval(),
            buffer_capacity: default_buffer_capacity(),
            drain_timeout: default_drain_timeout(),
            spool_max_bytes: default_spool_max_bytes(),
            spool_fsync: default_spool_fsync(),
            ack_timeout: default_ack_timeout(),
            end_to_end_acks: default_end_to_end_acks(),
            wire_format: default_wire_format(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbes {
    /// Most probes running at once. Default: sized from the schedule (Σ timeout ÷ interval
    /// × 1.5 + 8, at most one per target, within the descriptor limit and the memory budget;
    /// see `scheduler.rs`). A probe that finds no free slot when it is due is counted as
    /// skipped rather than queued.
    pub max_concurrency: Option<usize>,
    /// Bytes of response bodies all probes together may hold (default 128 MiB): a number of
    /// bytes or a string like `"128MiB"`. Each probe reserves its worst case before it starts
    /// (`budget.rs`); one that does not fit waits, for at most its timeout.
    #[serde(default)]
    pub memory_budget: crate::budget::RawSize,
    /// `"allow"` (default) or `"refuse"`: whether probes may connect to loopback, private,
    /// link-local and other non-public addresses (checked after DNS and on every redirect).
    #[serde(default)]
    pub private_addresses: crate::netpolicy::AddressPolicy,
}

/// Largest `uplink.buffer_capacity`: about 100 MB of results.
pub const MAX_BUFFER_CAPACITY: usize = 1_000_000;

/// Default `uplink.spool_max_bytes`: 64 MiB, about a million results (a day of 100 targets
/// every 10 s is 864,000), a small share of the smallest SD card.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 64 * crate::budget::MIB;
/// Smallest `uplink.spool_max_bytes` other than 0 (one segment).
pub const MIN_SPOOL_MAX_BYTES: u64 = 64 * crate::budget::KIB;
/// Largest `uplink.spool_max_bytes` (a typing error of a unit should not fill the card).
pub const MAX_SPOOL_MAX_BYTES: u64 = 64 * crate::budget::GIB;

/// Longest `uplink.drain_timeout`. A stop takes at most this long (probes still in flight are
/// aborted at the same deadline), and the packaged unit's `TimeoutStopSec` (90 s) covers it
/// with room for the goodbye to the broker: systemd never kills an agent mid-count.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

fn default_mqtt_port() -> u16 {
    1883
}
fn default_topic_prefix() -> String {
    "vantage".to_owned()
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_batch_max() -> usize {
    vantage_proto::MAX_RESULTS
}
fn default_flush_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_buffer_capacity() -> usize {
    10_000
}
fn default_spool_max_bytes() -> crate::budget::RawSize {
    crate::budget::RawSize::Bytes(DEFAULT_SPOOL_MAX_BYTES)
}
fn default_spool_fsync() -> String {
    "always".to_owned()
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_end_to_end_acks() -> String {
    "auto".to_owned()
}
fn default_wire_format() -> u8 {
    vantage_proto::FORMAT_VERSION
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_heartbeat_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/vantage")
}

/// `uplink.spool_fsync`: `always`, `never` or a duration of at least 100ms.
fn parse_fsync(text: &str) -> Result<crate::spool::FsyncPolicy, String> {
    use crate::spool::FsyncPolicy;
    match text.trim() {
        "always" => Ok(FsyncPolicy::Always),
        "never" => Ok(FsyncPolicy::Never),
        t => match humantime::parse_duration(t) {
            Ok(d) if d >= Duration::from_millis(100) => Ok(FsyncPolicy::Every(d)),
            Ok(_) => Err("a sync interval must be at least 100ms (or \"always\")".into()),
            Err(_) => Err(format!(
                "{text:?} is not \"always\", \"never\" or a duration like \"10s\""
            )),
        },
    }
}

/// Where an agent's targets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetsSource {
    /// `[[targets]]` in the config file; pushed sets are ignored.
    Local,
    /// Target sets pushed by the ingester over MQTT (retained), persisted in `state_dir`.
    Central,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub agent_id: String,
    pub region: String,
    pub mqtt: MqttConfig,
    pub uplink: UplinkConfig,
    /// `probes.max_concurrency` (None: sized from the schedule).
    pub max_concurrency: Option<usize>,
    /// `probes.memory_budget`, bytes.
    pub memory_budget: u64,
    /// Where to serve `/metrics` (None: off).
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub heartbeat_interval: Duration,
    pub state_dir: PathBuf,
    pub targets_source: TargetsSource,
    /// `probes.private_addresses`.
    pub address_policy: crate::netpolicy::AddressPolicy,
    /// The local targets (empty when the source is central).
    pub targets: Vec<Target>,
}

#[derive(Clone)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub topic_prefix: String,
    pub keep_alive: Duration,
    /// TLS to the broker (`[mqtt.tls]`); None: plain TCP.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

// Hand-written so the password never reaches a log line.
impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("topic_prefix", &self.topic_prefix)
            .field("keep_alive", &self.keep_alive)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct UplinkConfig {
    pub batch_max: usize,
    pub flush_interval: Duration,
    pub buffer_capacity: usize,
    pub drain_timeout: Duration,
    /// `uplink.spool_max_bytes`; 0: no spool.
    pub spool_max_bytes: u64,
    pub spool_fsync: crate::spool::FsyncPolicy,
    pub ack_timeout: Duration,
    /// `uplink.end_to_end_acks = "auto"`; false: `"off"`.
    pub end_to_end_acks: bool,
    pub wire_format: WireFormat,
}

/// `uplink.wire_format`: the frame version the agent writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// Version 2: plain postcard, read by every ingester since version 2. http results only.
    V2,
    /// Version 3: packed (`vantage_proto::v3`). http results only.
    V3,
    /// Version 4: packed, with probe kinds (`vantage_proto::v4`).
    V4,
}

impl WireFormat {
    pub fn encoder(self) -> crate::outbox::Encoder {
        match self {
            WireFormat::V2 => vantage_proto::encode_v2,
            WireFormat::V3 => vantage_proto::encode_v3,
            WireFormat::V4 => vantage_proto::encode,
        }
    }

    /// Whether frames of this version carry results of `kind` (versions 2 and 3 have no
    /// place for a kind: their encoders refuse a batch with another, so the configuration and
    /// pushed target sets are refused instead).
    pub fn carries(self, kind: vantage_proto::ProbeKind) -> bool {
        self == WireFormat::V4 || kind == vantage_proto::ProbeKind::Http
    }

    /// Why a target of `kind` cannot be probed with this version, if it cannot.
    pub fn refusal(self, kind: vantage_proto::ProbeKind) -> Option<String> {
        (!self.carries(kind)).then(|| {
            format!(
                "a {} target needs uplink.wire_format = 4 (version {} frames carry http \
                 results only; upgrade the ingesters, then the agent's wire_format)",
                kind.as_str(),
                self.version()
            )
        })
    }

    /// The version byte.
    pub fn version(self) -> u8 {
        match self {
            WireFormat::V2 => 2,
            WireFormat::V3 => 3,
            WireFormat::V4 => 4,
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&vantage_common::config_text::read(path)?, path)
    }

    /// Parses and validates TOML text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::from_raw(vantage_common::config_text::parse(text, path)?, path)
    }

    /// Checks every value of `raw`; `path` is only used in error messages.
    pub fn from_raw(raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            file: path.to_owned(),
            key: key.to_owned(),
            reason,
        };
        check_name(&raw.agent_id).map_err(|r| invalid("agent_id", r))?;
        check_name(&raw.region).map_err(|r| invalid("region", r))?;
        check_name(&raw.mqtt.topic_prefix).map_err(|r| invalid("mqtt.topic_prefix", r))?;
        if raw.mqtt.host.is_empty() {
            return Err(invalid("mqtt.host", "must not be empty".into()));
        }
        let password = vantage_common::secret::password(
            raw.mqtt.password_env.as_deref(),
            raw.mqtt.password_file.as_deref(),
            raw.mqtt.password_credential.as_deref(),
        )
        .map_err(|(key, reason)| invalid(&format!("mqtt.{key}"), reason))?
        .map(|secret| secret.expose().to_owned());
        if raw.mqtt.tls.is_none()
            && !raw.mqtt.allow_plaintext
            && !vantage_common::tls_files::is_loopback_host(&raw.mqtt.host)
        {
            return Err(invalid(
                "mqtt.tls",
                format!(
                    "the broker {} is not on this machine: add a [mqtt.tls] section (or \
                     allow_plaintext = true to send the password and results in clear text)",
                    raw.mqtt.host
                ),
            ));
        }
        let tls = match &raw.mqtt.tls {
            None => None,
            Some(t) => Some(
                vantage_common::tls_files::client_config(t)
                    .map_err(|(key, r)| invalid(&format!("mqtt.tls.{key}"), r))?,
            ),
        };
        if raw.uplink.batch_max == 0 || raw.uplink.batch_max > vantage_proto::MAX_RESULTS {
            return Err(invalid(
                "uplink.batch_max",
                format!("must be 1..={}", vantage_proto::MAX_RESULTS),
            ));
        }
        if raw.uplink.buffer_capacity == 0 || raw.uplink.buffer_capacity > MAX_BUFFER_CAPACITY {
            return Err(invalid(
                "uplink.buffer_capacity",
                format!("must be 1..={MAX_BUFFER_CAPACITY} (memory is reserved at start)"),
            ));
        }
        if raw.uplink.flush_interval.is_zero() {
            return Err(invalid(
                "uplink.flush_interval",
                "must be longer than 0".into(),
            ));
        }
        if !raw.mqtt.keep_alive.is_zero() && raw.mqtt.keep_alive < Duration::from_secs(1) {
            return Err(invalid(
                "mqtt.keep_alive",
                "must be 0 (off) or at least 1s".into(),
            ));
        }
        if raw.fleet.heartbeat_interval < Duration::from_secs(1) {
            return Err(invalid(
                "fleet.heartbeat_interval",
                "must be at least 1s".into(),
            ));
        }
        if raw.state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir", "must not be empty".into()));
        }
        let metrics_listen = match &raw.metrics.listen {
            None => None,
            Some(_) if !cfg!(feature = "metrics") => {
                return Err(invalid(
                    "metrics.listen",
                    "this build has no metrics endpoint (cargo feature `metrics`)".into(),
                ))
            }
            Some(l) => Some(
                l.parse()
                    .map_err(|_| invalid("metrics.listen", format!("{l:?} is not \"ip:port\"")))?,
            ),
        };
        if raw.probes.max_concurrency == Some(0) {
            return Err(invalid(
                "probes.max_concurrency",
                "must be at least 1 (leave it out to size it from the schedule)".into(),
            ));
        }
        let memory_budget = raw
            .probes
            .memory_budget
            .bytes()
            .map_err(|r| invalid("probes.memory_budget", r))?;
        if !(crate::budget::MIN_MEMORY_BUDGET..=crate::budget::MAX_MEMORY_BUDGET)
            .contains(&memory_budget)
        {
            return Err(invalid(
                "probes.memory_budget",
                format!(
                    "must be {} to {}",
                    crate::budget::show(crate::budget::MIN_MEMORY_BUDGET),
                    crate::budget::show(crate::budget::MAX_MEMORY_BUDGET)
                ),
            ));
        }
        if raw.uplink.ack_timeout < Duration::from_millis(100) {
            return Err(invalid(
                "uplink.ack_timeout",
                "must be at least 100ms".into(),
            ));
        }
        let wire_format = match raw.uplink.wire_format {
            2 => WireFormat::V2,
            3 => WireFormat::V3,
            4 => WireFormat::V4,
            other => {
                return Err(invalid(
                    "uplink.wire_format",
                    format!("{other} is not 2, 3 or 4"),
                ))
            }
        };
        let end_to_end_acks = match raw.uplink.end_to_end_acks.as_str() {
            "auto" => true,
            "off" => false,
            other => {
                return Err(invalid(
                    "uplink.end_to_end_acks",
                    format!("{other:?} is not \"auto\" or \"off\""),
                ))
            }
        };
        if raw.uplink.drain_timeout > MAX_DRAIN_TIMEOUT {
            return Err(invalid(
                "uplink.drain_timeout",
                format!(
                    "must be at most {MAX_DRAIN_TIMEOUT:?} (the packaged systemd unit's \
                     TimeoutStopSec covers that much)"
                ),
            ));
        }
        let spool_max_bytes = raw
            .uplink
            .spool_max_bytes
            .bytes()
            .map_err(|r| invalid("uplink.spool_max_bytes", r))?;
        if spool_max_bytes != 0
            && !(MIN_SPOOL_MAX_BYTES..=MAX_SPOOL_MAX_BYTES).contains(&spool_max_bytes)
        {
            return Err(invalid(
                "uplink.spool_max_bytes",
                format!(
                    "must be 0 (no spool) or {} to {}",
                    crate::budget::show(MIN_SPOOL_MAX_BYTES),
                    crate::budget::show(MAX_SPOOL_MAX_BYTES)
                ),
            ));
        }
        let spool_fsync =
            parse_fsync(&raw.uplink.spool_fsync).map_err(|r| invalid("uplink.spool_fsync", r))?;
        let mut targets = Vec::with_capacity(raw.targets.len());
        for (i, t) in raw.targets.into_iter().enumerate() {
            if !vantage_proto::is_valid_target_id(t.id) {
                return Err(invalid(
                    &format!("targets[{i}].id"),
                    format!(
                        "{} is not 1..={} (ids are 32-bit signed integers in PostgreSQL)",
                        t.id,
                        vantage_proto::MAX_TARGET_ID
                    ),
                ));
            }
            if targets.iter().any(|seen: &Target| seen.id == t.id) {
                return Err(invalid(
                    &format!("targets[{i}].id"),
                    format!("duplicate target id {}", t.id),
                ));
            }
            if let Some(reason) = wire_format.refusal(t.kind) {
                return Err(invalid(&format!("targets[{i}].kind"), reason));
            }
            let target = Target::from_raw(t)
                .map_err(|e| invalid(&format!("targets[{i}].{}", e.key), e.reason))?;
            // It could never run: say so now rather than refuse it at every due time.
            let need = crate::budget::need(&target);
            if need > memory_budget {
                return Err(invalid(
                    &format!("targets[{i}].body_cap"),
                    format!(
                        "with a regex a probe of this target reserves {} ({} × body_cap + {}), \
                         more than probes.memory_budget ({}): lower body_cap or raise the budget",
                        crate::budget::show(need),
                        crate::budget::REGEX_BODY_COPIES,
                        crate::budget::show(crate::budget::PROBE_FLOOR),
                        crate::budget::show(memory_budget),
                    ),
                ));
            }
            targets.push(target);
        }
        Ok(Config {
            agent_id: raw.agent_id,
            region: raw.region,
            mqtt: MqttConfig {
                host: raw.mqtt.host,
                port: raw.mqtt.port,
                username: raw.mqtt.username,
                password,
                topic_prefix: raw.mqtt.topic_prefix,
                keep_alive: raw.mqtt.keep_alive,
                tls,
            },
            uplink: UplinkConfig {
                batch_max: raw.uplink.batch_max,
                flush_interval: raw.uplink.flush_interval,
                buffer_capacity: raw.uplink.buffer_capacity,
                drain_timeout: raw.uplink.drain_timeout,
                spool_max_bytes,
                spool_fsync,
                ack_timeout: raw.uplink.ack_timeout,
                end_to_end_acks,
                wire_format,
            },
            max_concurrency: raw.probes.max_concurrency,
            memory_budget,
            metrics_listen,
            heartbeat_interval: raw.fleet.heartbeat_interval,
            state_dir: raw.state_dir,
            targets_source: if targets.is_empty() {
                TargetsSource::Central
            } else {
                TargetsSource::Local
            },
            address_policy: raw.probes.private_addresses,
            targets,
        })
    }

    /// This agent's own topic on `channel` (layout: `vantage_proto::topic`).
    fn own_topic(&self, channel: Channel) -> String {
        Topic::agent(
            &self.mqtt.topic_prefix,
            channel,
            &self.region,
            &self.agent_id,
        )
        .to_string()
    }

    /// The spool's directory, `state_dir/spool/<agent_id>` (per agent id, so a renamed agent
    /// never sends another's results under its name), or None without a spool.
    pub fn spool_config(&self) -> Option<crate::spool::SpoolConfig> {
        (self.uplink.spool_max_bytes > 0).then(|| crate::spool::SpoolConfig {
            dir: self.state_dir.join("spool").join(&self.agent_id),
            max_bytes: self.uplink.spool_max_bytes,
            fsync: self.uplink.spool_fsync,
        })
    }

    /// The MQTT topic this agent publishes its result batches on.
    pub fn results_topic(&self) -> String {
        self.own_topic(Channel::Results)
    }

    /// Where the ingester's bridges acknowledge this agent's results end to end.
    pub fn acks_topic(&self) -> String {
        self.own_topic(Channel::Acks)
    }

    /// Where this agent reports its status (and its last will).
    pub fn status_topic(&self) -> String {
        self.own_topic(Channel::Status)
    }

    /// The retained target set of this agent's region.
    pub fn region_targets_topic(&self) -> String {
        Topic::region_targets(&self.mqtt.topic_prefix, &self.region).to_string()
    }

    /// The retained target set of targets pinned to this agent.
    pub fn agent_targets_topic(&self) -> String {
        self.own_topic(Channel::Targets)
    }
}

pub use vantage_common::config_text::{check_name, redact_toml_reason, toml_error};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::ProbeKind;

    const GOOD: &str = r#"
agent_id = "pi-1"
region = "eu-north"
[mqtt]
host = "127.0.0.1"
[[targets]]
id = 1
url = "http://127.0.0.1:8080/health"
interval = "5s"
timeout = "2s"
regex = "ok"
"#;

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("agent.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn good_config_loads_with_defaults() {
        let c = Config::parse(GOOD, Path::new("agent.toml")).unwrap();
        assert_eq!(c.targets.len(), 1);
        assert_eq!(c.targets[0].interval, Duration::from_secs(5));
        assert_eq!(c.mqtt.port, 1883);
        assert_eq!(c.uplink.batch_max, 32);
        assert_eq!(c.results_topic(), "vantage/v1/results/eu-north/pi-1");
    }

    #[test]
    fn the_spool_is_on_by_default_and_its_keys_are_checked() {
        let c = Config::parse(GOOD, Path::new("agent.toml")).unwrap();
        let spool = c.spool_config().unwrap();
        assert_eq!(spool.max_bytes, 64 * 1024 * 1024);
        assert_eq!(spool.fsync, crate::spool::FsyncPolicy::Always);
        assert!(spool.dir.ends_with("spool/pi-1"), "{:?}", spool.dir);
        let with = |uplink: &str| {
            Config::parse(
                &GOOD.replace("[[targets]]", &format!("[uplink]\n{uplink}\n[[targets]]")),
                Path::new("agent.toml"),
            )
        };
        assert!(with("spool_max_bytes = 0")
            .unwrap()
            .spool_config()
            .is_none());
        let c = with("spool_max_bytes = \"1MiB\"\nspool_fsync = \"10s\"").unwrap();
        assert_eq!(c.uplink.spool_max_bytes, 1 << 20);
        assert_eq!(
            c.uplink.spool_fsync,
            crate::spool::FsyncPolicy::Every(Duration::from_secs(10))
        );
        assert_eq!(
            with("spool_fsync = \"never\"").unwrap().uplink.spool_fsync,
            crate::spool::FsyncPolicy::Never
        );
        for (bad, key) in [
            ("spool_max_bytes = 1000", "`uplink.spool_max_bytes`"),
            ("spool_max_bytes = \"65GiB\"", "`uplink.spool_max_bytes`"),
            ("spool_max_bytes = \"lots\"", "`uplink.spool_max_bytes`"),
            ("spool_fsync = \"sometimes\"", "`uplink.spool_fsync`"),
            ("spool_fsync = \"1ms\"", "`uplink.spool_fsync`"),
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = err(&GOOD.replace("region =", "colour = \"red\"\nregion ="));
        assert!(e.starts_with("agent.toml:"), "{e}");
        assert!(e.contains("colour"), "{e}");
    }

    /// `GOOD` with `from` replaced by `to`: refused, and the refusal contains `needle` (the
    /// key, or the reason).
    #[track_caller]
    fn refused_naming(from: &str, to: &str, needle: &str) {
        let e = err(&GOOD.replace(from, to));
        assert!(e.contains(needle), "{from} -> {to}: {e}");
    }

    #[test]
    fn bad_url_names_the_target_key() {
        let url = "http://127.0.0.1:8080/health";
        refused_naming(url, "not a url", "agent.toml: key `targets[0].url`");
        refused_naming(url, "ftp://x/", "is not http or https");
    }

    /// Issue #20: a target's kind, its keys, and the wire format that can carry its results.
    #[test]
    fn probe_kinds_and_their_keys() {
        let tcp = GOOD
            .replace(
                "url = \"http://127.0.0.1:8080/health\"",
                "kind = \"tcp\"\naddress = \"127.0.0.1:5432\"\nexpect = \"+OK\"",
            )
            .replace("regex = \"ok\"\n", "");
        let c = Config::parse(&tcp, Path::new("agent.toml")).unwrap();
        let t = &c.targets[0];
        assert_eq!(t.kind, ProbeKind::Tcp);
        assert_eq!(t.address.as_ref().unwrap().to_string(), "127.0.0.1:5432");
        assert_eq!(t.expect, b"+OK");
        // A key of another kind is refused with the target's key and why.
        let e = err(&tcp.replace("expect =", "regex = \"x\"\nexpect ="));
        assert!(
            e.contains("`targets[0].regex`") && e.contains("does not apply to a tcp target"),
            "{e}"
        );
        let e = err(&tcp.replace("127.0.0.1:5432", "127.0.0.1"));
        assert!(
            e.contains("`targets[0].address`") && e.contains("host:port"),
            "{e}"
        );
        let e = err(&tcp.replace("address = \"127.0.0.1:5432\"\n", ""));
        assert!(
            e.contains("`targets[0].address`") && e.contains("needs"),
            "{e}"
        );
        let e = err(&tcp.replace("kind = \"tcp\"", "kind = \"tls\""));
        assert!(e.contains("`targets[0].expect`"), "{e}");
        let e = err(&tcp.replace("kind = \"tcp\"", "kind = \"udp\""));
        assert!(
            e.contains("line 8") && e.contains("unknown variant `udp`, expected one of `http`"),
            "{e}"
        );
        let e = err(&GOOD.replace("regex = \"ok\"", "send = \"x\""));
        assert!(
            e.contains("`targets[0].send`") && e.contains("http target"),
            "{e}"
        );
        let e = err(&tcp.replace("kind = \"tcp\"", "url = \"http://h/\"\nkind = \"tcp\""));
        assert!(
            e.contains("`targets[0].url`") && e.contains("address"),
            "{e}"
        );
        // Versions 2 and 3 carry http results only: refused, not dropped at send time.
        for old in [2, 3] {
            let e = err(&tcp.replace(
                "[[targets]]",
                &format!("[uplink]\nwire_format = {old}\n[[targets]]"),
            ));
            assert!(
                e.contains("`targets[0].kind`") && e.contains("uplink.wire_format = 4"),
                "{e}"
            );
            let http = GOOD.replace(
                "[[targets]]",
                &format!("[uplink]\nwire_format = {old}\n[[targets]]"),
            );
            assert!(Config::parse(&http, Path::new("agent.toml")).is_ok());
        }
        // The dns kind: its keys from a file, a bad one located, and version 4 needed too.
        let dns = GOOD
            .replace(
                "url = \"http://127.0.0.1:8080/health\"",
                "kind = \"dns\"\nquery = \"example.org\"\nquery_type = \"MX\"\n\
                 resolver = \"[::1]:5353\"",
            )
            .replace("regex = \"ok\"\n", "");
        let c = Config::parse(&dns, Path::new("agent.toml")).unwrap();
        let q = c.targets[0].dns.clone().unwrap();
        assert_eq!(
            (q.name.as_str(), q.qtype, q.resolver),
            ("example.org", 15, Some("[::1]:5353".parse().unwrap()))
        );
        let e = err(&dns.replace("\"MX\"", "\"MAIL\""));
        assert!(e.contains("`targets[0].query_type`"), "{e}");
        let e = err(&dns.replace("kind = \"dns\"\n", "kind = \"dns\"\naddress = \"h:53\"\n"));
        assert!(
            e.contains("`targets[0].address`") && e.contains("dns target"),
            "{e}"
        );
        let e = err(&dns.replace("[[targets]]", "[uplink]\nwire_format = 3\n[[targets]]"));
        assert!(e.contains("`targets[0].kind`"), "{e}");
        // Found in review: ip_family was accepted on a dns target and ignored.
        let e = err(&dns.replace("kind = \"dns\"\n", "kind = \"dns\"\nip_family = \"ipv6\"\n"));
        assert!(
            e.contains("`targets[0].ip_family`") && e.contains("does not apply to a dns target"),
            "{e}"
        );
    }

    #[test]
    fn bad_regex_and_interval_are_rejected() {
        refused_naming("\"ok\"", "\"(unclosed\"", "`targets[0].regex`");
        refused_naming("\"5s\"", "\"10ms\"", "`targets[0].interval`");
        refused_naming("\"2s\"", "\"9s\"", "`targets[0].timeout`");
    }

    #[test]
    fn bad_names_are_rejected() {
        refused_naming("pi-1", "Pi/1", "`agent_id`");
        refused_naming("eu-north", "eu+north", "`region`");
    }

    #[test]
    fn bad_uplink_values_are_rejected() {
        let with = |uplink: &str| {
            err(&GOOD.replace("[[targets]]", &format!("[uplink]\n{uplink}\n[[targets]]")))
        };
        assert!(with("buffer_capacity = 0").contains("`uplink.buffer_capacity`"));
        assert!(with("buffer_capacity = 1000001").contains("`uplink.buffer_capacity`"));
        assert!(with("batch_max = 33").contains("`uplink.batch_max`"));
        assert!(with("flush_interval = \"0s\"").contains("`uplink.flush_interval`"));
        let e = with("wire_format = 5");
        assert!(
            e.contains("`uplink.wire_format`") && e.contains("5 is not 2, 3 or 4"),
            "{e}"
        );
        refused_naming(
            "host = \"127.0.0.1\"",
            "host = \"127.0.0.1\"\nkeep_alive = \"500ms\"",
            "`mqtt.keep_alive`",
        );
    }

    #[test]
    fn probes_settings_are_checked() {
        let with = |probes: &str| {
            Config::parse(
                &GOOD.replace("[[targets]]", &format!("[probes]\n{probes}\n[[targets]]")),
                Path::new("agent.toml"),
            )
        };
        let c = Config::parse(GOOD, Path::new("agent.toml")).unwrap();
        assert_eq!(c.uplink.wire_format, WireFormat::V4);
        assert_eq!(c.max_concurrency, None);
        assert_eq!(c.memory_budget, 128 << 20);
        assert_eq!(
            with("memory_budget = \"64MiB\"").unwrap().memory_budget,
            64 << 20
        );
        assert_eq!(
            with("memory_budget = 8388608").unwrap().memory_budget,
            8 << 20
        );
        assert_eq!(
            with("max_concurrency = 16").unwrap().max_concurrency,
            Some(16)
        );
        for (probes, needle) in [
            (
                "max_concurrency = 0",
                "`probes.max_concurrency`: must be at least 1",
            ),
            (
                "memory_budget = \"12 MB\"",
                "`probes.memory_budget`: \"12 MB\" is not a size",
            ),
            (
                "memory_budget = 1000",
                "`probes.memory_budget`: must be 1.0 MiB to 64.0 GiB",
            ),
        ] {
            let e = with(probes).unwrap_err().to_string();
            assert!(e.contains(needle), "{probes}: {e}");
        }
        // A local target that could never fit is refused at load, by its key.
        let e = err(&GOOD
            .replace(
                "[[targets]]",
                "[probes]\nmemory_budget = \"4MiB\"\n[[targets]]",
            )
            .replace("regex = \"ok\"", "regex = \"ok\"\nbody_cap = 1048576"));
        assert!(
            e.contains(
                "key `targets[0].body_cap`: with a regex a probe of this target reserves 5.1 MiB"
            ),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "[[targets]]",
            "[uplink]\ndrain_timeout = \"61s\"\n[[targets]]",
        ));
        assert!(
            e.contains("`uplink.drain_timeout`: must be at most 60s"),
            "{e}"
        );
    }

    #[test]
    fn missing_password_env_is_reported() {
        refused_naming(
            "host = \"127.0.0.1\"",
            "host = \"127.0.0.1\"\npassword_env = \"VANTAGE_TEST_SURELY_UNSET\"",
            "VANTAGE_TEST_SURELY_UNSET is not set",
        );
    }

    #[test]
    fn plaintext_to_a_remote_broker_needs_an_explicit_yes() {
        let remote = GOOD.replace("host = \"127.0.0.1\"", "host = \"mqtt.example.org\"");
        let e = err(&remote);
        assert!(
            e.contains("key `mqtt.tls`: the broker mqtt.example.org is not on this machine"),
            "{e}"
        );
        let allowed = remote.replace("[mqtt]", "[mqtt]\nallow_plaintext = true");
        assert!(Config::parse(&allowed, Path::new("agent.toml")).is_ok());
        let tls = remote.replace("[[targets]]", "[mqtt.tls]\n[[targets]]");
        assert!(
            Config::parse(&tls, Path::new("agent.toml")).is_ok(),
            "{}",
            err(&tls)
        );
    }

    /// Issue #14 item 7: local target ids are limited to 1..=i32::MAX (above, they wrapped to
    /// negative numbers in PostgreSQL's `integer`).
    #[test]
    fn local_target_ids_fit_postgres() {
        for bad in ["0", "2147483648", "4294967295"] {
            let e = err(&GOOD.replace("id = 1", &format!("id = {bad}")));
            assert!(
                e.contains("key `targets[0].id`")
                    && e.contains(&format!("{bad} is not 1..=2147483647")),
                "{e}"
            );
        }
        Config::parse(
            &GOOD.replace("id = 1", "id = 2147483647"),
            Path::new("a.toml"),
        )
        .unwrap();
    }

    /// Issue #14 item 13: a syntax or type error shows where, never the value: a password typed
    /// into the file by mistake is not echoed.
    #[test]
    fn toml_errors_do_not_echo_values() {
        let cases = [
            (
                GOOD.replace("[mqtt]", "[mqtt]\npassword = hunter2-secret"),
                "password = <value not shown>",
            ),
            (
                GOOD.replace("[mqtt]", "[mqtt]\nport = \"hunter2-secret\""),
                "invalid type: string <redacted>, expected u16",
            ),
            (
                GOOD.replace("[mqtt]", "[mqtt]\nport = 99999999"),
                "invalid value: integer <redacted>, expected u16",
            ),
            (
                GOOD.replace("[mqtt]", "[mqtt]\nhunter2-secret"),
                "<line not shown>",
            ),
        ];
        for (text, expected) in cases {
            let e = err(&text);
            assert!(
                e.starts_with("agent.toml: TOML parse error at line "),
                "{e}"
            );
            assert!(e.contains(expected), "{e}");
            assert!(!e.contains("hunter2") && !e.contains("99999999"), "{e}");
        }
        // Keys and table headers are still shown.
        let e = err(&GOOD.replace("[mqtt]", "[mqtt"));
        assert!(e.contains("| [mqtt\n"), "{e}");
        assert_eq!(
            redact_toml_reason("invalid type: string \"a\\\"b\", expected u16\nunknown field `x`"),
            "invalid type: string <redacted>, expected u16\nunknown field `x`"
        );
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../agent.example.toml")
            .replace("password_env = \"VANTAGE_MQTT_PASSWORD\"", "");
        let c = Config::parse(&text, Path::new("agent.example.toml")).unwrap();
        assert_eq!(c.targets.len(), 1);
    }
}
