//! Ingester configuration: the raw TOML shape and the validated [`Config`].
//!
//! One file serves every stage; each stage asks for the sections it needs ([`Config::mqtt`],
//! [`Config::kafka`], [`Config::postgres`]) and a missing one is an error that names it.
//! Errors name the file, the key and the problem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vantage_proto::topic::{Channel, EveryAgent};

use serde::Deserialize;

/// A configuration that cannot be used, with where and why (one type for both binaries).
pub use vantage_common::config_text::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub mqtt: Option<RawMqtt>,
    pub kafka: Option<RawKafka>,
    pub postgres: Option<RawPostgres>,
    #[serde(default)]
    pub sink: RawSink,
    #[serde(default)]
    pub storage: RawStorage,
    #[serde(default)]
    pub http: RawHttp,
    /// `[alerts]`: the alert stage's rules and receivers (see `alert/rules.rs`).
    #[serde(default)]
    pub alerts: crate::alert::rules::RawAlerts,
    /// `[web]`: the dashboard (`vantage-ingester web`, see `web/mod.rs`).
    #[serde(default)]
    pub web: crate::web::RawWeb,
}

/// The stages' HTTP endpoints: `/metrics`, `/healthz`, `/readyz` (see `http.rs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    /// `host:port` of the bridge's endpoint, or `"off"` (default `127.0.0.1:9464`; port 0 picks
    /// a free port, logged at start).
    #[serde(default = "default_bridge_listen")]
    pub bridge_listen: String,
    /// `host:port` of the sink's endpoint, or `"off"` (default `127.0.0.1:9465`).
    #[serde(default = "default_sink_listen")]
    pub sink_listen: String,
    /// `host:port` of the alert stage's endpoint, or `"off"` (default `127.0.0.1:9466`).
    #[serde(default = "default_alert_listen")]
    pub alert_listen: String,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            bridge_listen: default_bridge_listen(),
            sink_listen: default_sink_listen(),
            alert_listen: default_alert_listen(),
        }
    }
}

fn default_bridge_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_sink_listen() -> String {
    "127.0.0.1:9465".into()
}
fn default_alert_listen() -> String {
    "127.0.0.1:9466".into()
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
    crate::storage_config::StorageConfig::default().raw_retention
}
fn default_rollup_retention() -> Duration {
    crate::storage_config::StorageConfig::default().rollup_retention
}
fn default_daily_retention() -> Duration {
    crate::storage_config::StorageConfig::default().daily_retention
}
fn default_rollup_interval() -> Duration {
    crate::storage_config::StorageConfig::default().rollup_interval
}
fn default_partitions_ahead() -> u32 {
    crate::storage_config::StorageConfig::default().partitions_ahead
}
fn default_upkeep_interval() -> Duration {
    crate::storage_config::StorageConfig::default().interval
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    /// Broker host name or address.
    pub host: String,
    /// Broker port (default 1883).
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    pub username: Option<String>,
    /// Name of an environment variable holding the broker password.
    pub password_env: Option<String>,
    /// Path of a file whose first line is the broker password.
    pub password_file: Option<PathBuf>,
    /// Name of a systemd credential holding the broker password (`LoadCredential=` in the unit;
    /// read from `$CREDENTIALS_DIRECTORY/<name>`).
    pub password_credential: Option<String>,
    /// MQTT client id; must be unique per bridge and stable across restarts, because the broker
    /// keeps the unacknowledged messages of a persistent session under this id.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// First topic level (default `vantage`); agents must use the same prefix.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// When set, subscribe through the shared subscription `$share/<group>/...` so several
    /// bridges split the stream. Caution: Mosquitto 2.0 does not persist shared subscriptions,
    /// so what agents publish after a broker restart and before the bridges re-subscribe is
    /// lost; prefer `partition` with Mosquitto.
    pub shared_group: Option<String>,
    /// `"i/n"`: this bridge is member `i` (0-based) of `n` bridges. Every bridge subscribes to
    /// all results with its own persistent session (which Mosquitto keeps across restarts) and
    /// produces only the topics that hash to its slot; it acknowledges the others at once.
    /// Costs `n` copies of each message between broker and bridges. Not with `shared_group`.
    /// Every bridge must have the same `n`: change it only with all bridges stopped (with
    /// different `n`s a topic can be every bridge's "someone else's", and be acknowledged
    /// without being produced).
    pub partition: Option<String>,
    /// Most MQTT messages received but not yet acknowledged (waiting for Kafka), default 100.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// After Kafka confirmed a result frame, tell its agent on `<prefix>/v1/acks/<region>/<agent>`
    /// (default true), so the agent frees its spool only for what Kafka holds. The broker's ACL
    /// must let the ingester write those topics (docs/ingester.md); turn off only to act like an
    /// ingester from before end-to-end acknowledgements.
    #[serde(default = "default_true")]
    pub end_to_end_acks: bool,
    /// `[mqtt.tls]`: connect over TLS (certificate and host name verified). Absent: plain TCP,
    /// which is refused for a broker that is not on this machine unless `allow_plaintext`.
    pub tls: Option<crate::tls::RawTls>,
    /// Talk to a remote broker in clear text (default false).
    #[serde(default)]
    pub allow_plaintext: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    /// Topic of accepted result frames (default `vantage.results`).
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Topic of rejected input with its reason (default `vantage.dead-letter`).
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Consumer group of the sinks (default `vantage-sink`).
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Partitions given to the topics when the ingester creates them (default 4).
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replicas of each partition of the topics the ingester creates (default 3; a single test
    /// broker needs 1). Kafka keeps an acknowledged message as long as one in-sync replica lives.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// `min.insync.replicas` of the topics the ingester creates (default 2): with the
    /// producers' `acks=all`, a write is acknowledged only once this many replicas have it.
    #[serde(default = "default_min_insync_replicas")]
    pub min_insync_replicas: i32,
    /// Extra librdkafka settings passed through unchanged (security.protocol, sasl.*, ssl.*...).
    /// No secrets here (`sasl.password`, `ssl.key.password`, ...): see `secret_env`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Secret librdkafka settings, each read from the named environment variable, e.g.
    /// `"sasl.password" = "VANTAGE_KAFKA_PASSWORD"`.
    #[serde(default)]
    pub secret_env: BTreeMap<String, String>,
    /// Secret librdkafka settings, each read from the first line of the named file.
    #[serde(default)]
    pub secret_files: BTreeMap<String, PathBuf>,
    /// Talk to brokers that are not on this machine without TLS (`security.protocol` unset,
    /// `PLAINTEXT` or `SASL_PLAINTEXT`); default false: refused at load, as for MQTT.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// A producer with deliveries waiting and none confirmed for this long is replaced by a
    /// fresh client (default 30s, at least 1s; `kafka::Producer`): librdkafka can wedge for good
    /// after a broker restart. The wait doubles after each replacement that delivers nothing.
    #[serde(default = "default_stall_timeout", with = "humantime_serde")]
    pub stall_timeout: Duration,
}

fn default_stall_timeout() -> Duration {
    crate::kafka::DEFAULT_STALL_TIMEOUT
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    /// Connection string, key-value or URL form, e.g. `host=127.0.0.1 user=vantage dbname=vantage`.
    /// Put no password here: use `password_env`, `password_file` or `password_credential`.
    pub url: String,
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Name of a systemd credential holding the password (`$CREDENTIALS_DIRECTORY/<name>`).
    pub password_credential: Option<String>,
    /// Schema that holds vantage's tables (default `vantage`); created by `migrate`.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// `verify-full` (default): TLS, certificate and host name verified; `disable`: plain TCP,
    /// only when written here explicitly. The URL's `sslmode` is ignored.
    #[serde(default = "default_pg_tls")]
    pub tls: String,
    /// PEM file of the CA certificates that sign the server's (default: the bundled Mozilla
    /// roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that authenticate clients by certificate.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (a file named here, never the key itself).
    pub key_file: Option<PathBuf>,
}

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
    crate::clock::ClockWindow::default().max_behind
}
fn default_max_clock_ahead() -> Duration {
    crate::clock::ClockWindow::default().max_ahead
}

fn default_mqtt_port() -> u16 {
    1883
}
fn default_client_id() -> String {
    "vantage-bridge".into()
}
fn default_topic_prefix() -> String {
    "vantage".into()
}
fn default_true() -> bool {
    true
}
fn default_max_in_flight() -> usize {
    100
}
fn default_topic() -> String {
    "vantage.results".into()
}
fn default_dead_letter_topic() -> String {
    "vantage.dead-letter".into()
}
fn default_group_id() -> String {
    "vantage-sink".into()
}
fn default_partitions() -> i32 {
    4
}
fn default_replication_factor() -> i32 {
    3
}
fn default_min_insync_replicas() -> i32 {
    2
}
fn default_pg_tls() -> String {
    "verify-full".into()
}
fn default_schema() -> String {
    "vantage".into()
}
fn default_batch_max() -> usize {
    500
}
fn default_batch_timeout() -> Duration {
    Duration::from_millis(200)
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    mqtt: Option<MqttConfig>,
    kafka: Option<KafkaConfig>,
    postgres: Option<PostgresConfig>,
    pub sink: SinkConfig,
    pub storage: crate::storage_config::StorageConfig,
    pub http: HttpConfig,
    pub alerts: crate::alert::rules::AlertsConfig,
    pub web: crate::web::WebConfig,
}

/// Where each stage serves `/metrics`, `/healthz` and `/readyz` (None: off).
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub bridge_listen: Option<std::net::SocketAddr>,
    pub sink_listen: Option<std::net::SocketAddr>,
    pub alert_listen: Option<std::net::SocketAddr>,
}

#[derive(Clone)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_id: String,
    pub topic_prefix: String,
    pub shared_group: Option<String>,
    /// (this member, members), see [`RawMqtt::partition`].
    pub partition: Option<(u32, u32)>,
    pub max_in_flight: usize,
    /// See [`RawMqtt::end_to_end_acks`].
    pub end_to_end_acks: bool,
    /// TLS to the broker; None: plain TCP.
    pub tls: Option<crate::tls::TlsClient>,
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("client_id", &self.client_id)
            .field("topic_prefix", &self.topic_prefix)
            .field("shared_group", &self.shared_group)
            .field("partition", &self.partition)
            .field("end_to_end_acks", &self.end_to_end_acks)
            .field("tls", &self.tls)
            .finish()
    }
}

impl MqttConfig {
    /// The filter the bridge subscribes to: every region, every agent.
    pub fn results_filter(&self) -> String {
        let filter = EveryAgent {
            prefix: &self.topic_prefix,
            channel: Channel::Results,
        }
        .to_string();
        match &self.shared_group {
            Some(group) => format!("$share/{group}/{filter}"),
            None => filter,
        }
    }

    /// The filter for agent status messages (same sharing as the results).
    pub fn status_filter(&self) -> String {
        let filter = EveryAgent {
            prefix: &self.topic_prefix,
            channel: Channel::Status,
        }
        .to_string();
        match &self.shared_group {
            Some(group) => format!("$share/{group}/{filter}"),
            None => filter,
        }
    }

    /// Whether this bridge produces messages received on `topic` (always, without
    /// `partition`). FNV-1a (Fowler, Noll, Vo; 64-bit offset basis and prime) of the topic, so
    /// every bridge agrees without talking to the others.
    pub fn handles(&self, topic: &str) -> bool {
        let Some((member, members)) = self.partition else {
            return true;
        };
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in topic.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h % u64::from(members) == u64::from(member)
    }
}

/// `Debug` is derived: `secrets` holds [`Secret`](crate::secrets::Secret)s, which print as
/// `<redacted>`, and `properties` holds no secret (refused at load).
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    pub dead_letter_topic: String,
    pub group_id: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub min_insync_replicas: i32,
    pub properties: BTreeMap<String, String>,
    /// librdkafka settings that are secrets (from `secret_env` / `secret_files`).
    pub secrets: BTreeMap<String, crate::secrets::Secret>,
    /// `kafka.stall_timeout`.
    pub stall_timeout: Duration,
}

#[derive(Clone)]
pub struct PostgresConfig {
    pub url: String,
    pub password: Option<String>,
    pub schema: String,
    pub tls: PgTls,
}

/// How the ingester talks to PostgreSQL.
#[derive(Debug, Clone)]
pub enum PgTls {
    /// Plain TCP; only when the configuration says `tls = "disable"` (or a program says so).
    Disable,
    /// TLS required (never downgraded), certificate chain and host name verified.
    VerifyFull(crate::tls::TlsClient),
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &"<redacted>")
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("schema", &self.schema)
            .field("tls", &self.tls)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub batch_max: usize,
    pub batch_timeout: Duration,
    /// The window around the bridge's clock results must fall into (`clock.rs`).
    pub clock: crate::clock::ClockWindow,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: path.to_owned(),
            // Values hidden: a secret typed into the file by mistake is not echoed.
            message: vantage_common::config_text::toml_error(text, &e),
        })?;
        Config::from_raw(raw, path)
    }

    pub fn from_raw(raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            file: path.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let mqtt = match raw.mqtt {
            None => None,
            Some(m) => {
                if m.host.is_empty() {
                    return Err(invalid("mqtt.host", "must not be empty".into()));
                }
                check_topic_level(&m.topic_prefix).map_err(|r| invalid("mqtt.topic_prefix", r))?;
                if let Some(g) = &m.shared_group {
                    check_topic_level(g).map_err(|r| invalid("mqtt.shared_group", r))?;
                }
                if m.client_id.is_empty() || m.client_id.len() > 128 {
                    return Err(invalid("mqtt.client_id", "must be 1 to 128 bytes".into()));
                }
                let partition = match &m.partition {
                    None => None,
                    Some(_) if m.shared_group.is_some() => {
                        return Err(invalid(
                            "mqtt.partition",
                            "set either shared_group or partition, not both".into(),
                        ))
                    }
                    Some(p) => Some(parse_partition(p).ok_or_else(|| {
                        invalid(
                            "mqtt.partition",
                            format!("{p:?} is not \"i/n\" with 0 <= i < n <= 64"),
                        )
                    })?),
                };
                if m.max_in_flight == 0 || m.max_in_flight > 65_535 {
                    return Err(invalid("mqtt.max_in_flight", "must be 1..=65535".into()));
                }
                let password = secret(
                    &m.password_env,
                    &m.password_file,
                    &m.password_credential,
                    "mqtt",
                    &invalid,
                )?;
                if m.tls.is_none() && !m.allow_plaintext && !crate::tls::is_loopback_host(&m.host) {
                    return Err(invalid(
                        "mqtt.tls",
                        format!(
                            "the broker {} is not on this machine: add a [mqtt.tls] section (or \
                             allow_plaintext = true to talk to it in clear text)",
                            m.host
                        ),
                    ));
                }
                let tls = match &m.tls {
                    None => None,
                    Some(raw) => Some(
                        crate::tls::client(raw)
                            .map_err(|(key, r)| invalid(&format!("mqtt.tls.{key}"), r))?,
                    ),
                };
                Some(MqttConfig {
                    host: m.host,
                    port: m.port,
                    username: m.username,
                    password,
                    client_id: m.client_id,
                    topic_prefix: m.topic_prefix,
                    shared_group: m.shared_group,
                    partition,
                    max_in_flight: m.max_in_flight,
                    end_to_end_acks: m.end_to_end_acks,
                    tls,
                })
            }
        };
        let kafka = match raw.kafka {
            None => None,
            Some(k) => {
                if k.brokers.trim().is_empty() {
                    return Err(invalid("kafka.brokers", "must not be empty".into()));
                }
                for (key, value) in [
                    ("kafka.topic", &k.topic),
                    ("kafka.dead_letter_topic", &k.dead_letter_topic),
                    ("kafka.group_id", &k.group_id),
                ] {
                    if value.is_empty()
                        || !value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                    {
                        return Err(invalid(key, format!("{value:?} is not a valid Kafka name")));
                    }
                }
                if k.topic == k.dead_letter_topic {
                    return Err(invalid(
                        "kafka.dead_letter_topic",
                        "must differ from kafka.topic".into(),
                    ));
                }
                if k.partitions < 1 {
                    return Err(invalid("kafka.partitions", "must be at least 1".into()));
                }
                if !(1..=32).contains(&k.replication_factor) {
                    return Err(invalid(
                        "kafka.replication_factor",
                        "must be 1..=32 (3 in production; 1 only for a single test broker)".into(),
                    ));
                }
                if k.min_insync_replicas < 1 || k.min_insync_replicas > k.replication_factor {
                    return Err(invalid(
                        "kafka.min_insync_replicas",
                        format!(
                            "must be 1..=kafka.replication_factor ({}); 2 with 3 replicas in \
                             production",
                            k.replication_factor
                        ),
                    ));
                }
                if let Some((key, reason)) = k
                    .properties
                    .keys()
                    .find_map(|key| crate::kafka::refused_property(key).map(|r| (key, r)))
                {
                    return Err(invalid(&format!("kafka.properties.{key}"), reason.into()));
                }
                if let Some(key) = k
                    .properties
                    .keys()
                    .find(|key| crate::secrets::is_secret_kafka_property(key))
                {
                    return Err(invalid(
                        &format!("kafka.properties.{key}"),
                        "is a secret: name an environment variable in kafka.secret_env or a \
                         file in kafka.secret_files instead"
                            .into(),
                    ));
                }
                let secrets = crate::secrets::kafka_secrets(&k.secret_env, &k.secret_files)
                    .map_err(|(key, r)| invalid(&key, r))?;
                check_kafka_transport(&k).map_err(|(key, r)| invalid(key, r))?;
                if k.stall_timeout < Duration::from_secs(1) {
                    return Err(invalid(
                        "kafka.stall_timeout",
                        "must be at least 1s (default 30s)".into(),
                    ));
                }
                crate::kafka::check_properties(&k.properties).map_err(|(property, r)| {
                    invalid(
                        &format!("kafka.properties.{property}"),
                        format!("librdkafka: {r}"),
                    )
                })?;
                Some(KafkaConfig {
                    brokers: k.brokers,
                    topic: k.topic,
                    dead_letter_topic: k.dead_letter_topic,
                    group_id: k.group_id,
                    partitions: k.partitions,
                    replication_factor: k.replication_factor,
                    min_insync_replicas: k.min_insync_replicas,
                    properties: k.properties,
                    secrets,
                    stall_timeout: k.stall_timeout,
                })
            }
        };
        let postgres = match raw.postgres {
            None => None,
            Some(p) => {
                let parsed = p.url.parse::<tokio_postgres::Config>().map_err(|e| {
                    invalid("postgres.url", format!("not a connection string: {e}"))
                })?;
                if parsed.get_password().is_some() {
                    return Err(invalid(
                        "postgres.url",
                        "contains a password: use postgres.password_env or postgres.password_file"
                            .into(),
                    ));
                }
                let tls_files = crate::tls::RawTls {
                    ca_file: p.ca_file.clone(),
                    cert_file: p.cert_file.clone(),
                    key_file: p.key_file.clone(),
                };
                let tls = match p.tls.as_str() {
                    "disable" => {
                        if tls_files.ca_file.is_some() || tls_files.cert_file.is_some() {
                            return Err(invalid(
                                "postgres.tls",
                                "is \"disable\" but TLS files are set".into(),
                            ));
                        }
                        PgTls::Disable
                    }
                    "verify-full" => PgTls::VerifyFull(
                        crate::tls::client(&tls_files)
                            .map_err(|(key, r)| invalid(&format!("postgres.{key}"), r))?,
                    ),
                    other => {
                        return Err(invalid(
                            "postgres.tls",
                            format!("{other:?} is not \"verify-full\" or \"disable\""),
                        ))
                    }
                };
                let schema_ok = p
                    .schema
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                    && p.schema.len() <= 63
                    && p.schema
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if !schema_ok {
                    return Err(invalid(
                        "postgres.schema",
                        "use a-z, 0-9 and '_', starting with a letter or '_', at most 63 bytes"
                            .into(),
                    ));
                }
                let password = secret(
                    &p.password_env,
                    &p.password_file,
                    &p.password_credential,
                    "postgres",
                    &invalid,
                )?;
                Some(PostgresConfig {
                    url: p.url,
                    password,
                    schema: p.schema,
                    tls,
                })
            }
        };
        let listen = |key: &str, value: &str| match value {
            "off" => Ok(None),
            v => v.parse().map(Some).map_err(|_| {
                invalid(
                    key,
                    format!("{v:?} is not \"host:port\" (an IP address) or \"off\""),
                )
            }),
        };
        let http = HttpConfig {
            bridge_listen: listen("http.bridge_listen", &raw.http.bridge_listen)?,
            sink_listen: listen("http.sink_listen", &raw.http.sink_listen)?,
            alert_listen: listen("http.alert_listen", &raw.http.alert_listen)?,
        };
        let alerts = crate::alert::rules::AlertsConfig::try_from(raw.alerts)
            .map_err(|(key, reason)| invalid(&key, reason))?;
        let web = crate::web::WebConfig::try_from(raw.web)
            .map_err(|(key, reason)| invalid(&key, reason))?;
        if raw.sink.batch_max == 0 {
            return Err(invalid("sink.batch_max", "must be at least 1".into()));
        }
        let st = &raw.storage;
        let storage = crate::storage_config::StorageConfig {
            raw_retention: st.raw_retention,
            rollup_retention: st.rollup_retention,
            daily_retention: st.daily_retention,
            rollup_interval: st.rollup_interval,
            partitions_ahead: st.partitions_ahead,
            interval: st.upkeep_interval,
        };
        storage
            .check()
            .map_err(|(setting, reason)| invalid(setting.key(), reason))?;
        if raw.sink.max_clock_behind > storage.raw_retention {
            return Err(invalid(
                "sink.max_clock_behind",
                "must not exceed storage.raw_retention: older results would be deleted by the \
                 next retention"
                    .into(),
            ));
        }
        if raw.sink.max_clock_ahead > Duration::from_secs(86_400) {
            return Err(invalid(
                "sink.max_clock_ahead",
                "must be at most 1d: a result from the future stands as the latest result of \
                 its target until that time"
                    .into(),
            ));
        }
        Ok(Config {
            file: path.to_owned(),
            mqtt,
            kafka,
            postgres,
            http,
            alerts,
            web,
            sink: SinkConfig {
                batch_max: raw.sink.batch_max,
                batch_timeout: raw.sink.batch_timeout,
                clock: crate::clock::ClockWindow {
                    max_behind: raw.sink.max_clock_behind,
                    max_ahead: raw.sink.max_clock_ahead,
                    retention: storage.raw_retention,
                },
            },
            storage,
        })
    }

    pub fn mqtt(&self) -> Result<&MqttConfig, ConfigError> {
        self.mqtt.as_ref().ok_or_else(|| self.missing("mqtt"))
    }

    pub fn kafka(&self) -> Result<&KafkaConfig, ConfigError> {
        self.kafka.as_ref().ok_or_else(|| self.missing("kafka"))
    }

    pub fn postgres(&self) -> Result<&PostgresConfig, ConfigError> {
        self.postgres
            .as_ref()
            .ok_or_else(|| self.missing("postgres"))
    }

    fn missing(&self, section: &str) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            key: section.to_owned(),
            reason: "section is required by this command".into(),
        }
    }
}

/// What a command needs from the file: `check-config` says which ones this file can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageCheck {
    /// The command, as typed (`bridge`, `targets apply`, ...).
    pub command: &'static str,
    /// Required sections the file lacks (empty: the command can run).
    pub missing: Vec<&'static str>,
}

/// Every command that reads the configuration and the sections it needs (`status` reports on
/// whatever is configured, so it needs none).
pub const COMMAND_SECTIONS: &[(&str, &[&str])] = &[
    ("bridge", &["mqtt", "kafka"]),
    ("sink", &["kafka", "postgres"]),
    ("migrate", &["postgres"]),
    ("report", &["postgres"]),
    ("maintain", &["postgres"]),
    ("agents", &["postgres"]),
    ("targets apply", &["postgres", "mqtt"]),
    ("targets diff", &["postgres"]),
    ("targets list", &["postgres"]),
    ("alert", &["postgres"]),
    ("alerts", &["postgres"]),
    ("web", &["postgres"]),
    ("status", &[]),
];

impl Config {
    /// For each command, the sections it needs that this file lacks.
    pub fn stages(&self) -> Vec<StageCheck> {
        COMMAND_SECTIONS
            .iter()
            .map(|(command, sections)| StageCheck {
                command,
                missing: sections
                    .iter()
                    .copied()
                    .filter(|s| match *s {
                        "mqtt" => self.mqtt.is_none(),
                        "kafka" => self.kafka.is_none(),
                        "postgres" => self.postgres.is_none(),
                        _ => false,
                    })
                    .collect(),
            })
            .collect()
    }
}

/// `check-config`'s report: one line per command, whether this file can run it and, if not,
/// why.
pub fn render_stages(stages: &[StageCheck]) -> String {
    let width = stages.iter().map(|s| s.command.len()).max().unwrap_or(0);
    let mut out = String::new();
    for s in stages {
        if s.missing.is_empty() {
            out.push_str(&format!("  {:width$}  can run\n", s.command));
        } else {
            let sections: Vec<String> = s.missing.iter().map(|m| format!("[{m}]")).collect();
            out.push_str(&format!(
                "  {:width$}  cannot run: no {} section\n",
                s.command,
                sections.join(" or ")
            ));
        }
    }
    out
}

/// A section's password: at most one of `password_env`, `password_file`, `password_credential`
/// (`vantage_common::secret::password`, the agent's rule too).
fn secret(
    env: &Option<String>,
    file: &Option<PathBuf>,
    credential: &Option<String>,
    section: &str,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Option<String>, ConfigError> {
    crate::secrets::password(env.as_deref(), file.as_deref(), credential.as_deref())
        .map(|s| s.map(|s| s.expose().to_owned()))
        .map_err(|(key, reason)| invalid(&format!("{section}.{key}"), reason))
}

/// Plaintext Kafka only to brokers on this machine, unless `kafka.allow_plaintext`: the rule
/// MQTT (`mqtt.allow_plaintext`) and PostgreSQL (`tls = "disable"`) follow. On error: (key,
/// reason).
fn check_kafka_transport(k: &RawKafka) -> Result<(), (&'static str, String)> {
    let protocol = k
        .properties
        .get("security.protocol")
        .map(|p| p.to_ascii_lowercase());
    // librdkafka's default is plaintext.
    let encrypted = matches!(protocol.as_deref(), Some("ssl" | "sasl_ssl"));
    if encrypted || k.allow_plaintext {
        return Ok(());
    }
    let remote: Vec<&str> = k
        .brokers
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty() && !crate::tls::is_loopback_host(broker_host(b)))
        .collect();
    if remote.is_empty() {
        return Ok(());
    }
    let key = if protocol.is_some() {
        "kafka.properties.security.protocol"
    } else {
        "kafka.brokers"
    };
    Err((
        key,
        format!(
            "{} not on this machine and the connection would be plaintext: set \
             \"security.protocol\" = \"SASL_SSL\" (or \"SSL\") in [kafka.properties], or \
             kafka.allow_plaintext = true to talk to it in clear text",
            match remote.as_slice() {
                [one] => format!("the broker {one} is"),
                many => format!("the brokers {} are", many.join(", ")),
            }
        ),
    ))
}

/// The host of a `host:port` broker address (`[v6]:port` too); the whole string without a port.
fn broker_host(broker: &str) -> &str {
    if let Some(rest) = broker.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match broker.rsplit_once(':') {
        // More than one ':' without brackets: a bare IPv6 address.
        Some((host, _)) if !host.contains(':') => host,
        _ => broker,
    }
}

/// `"i/n"` → (i, n) with 0 <= i < n <= 64.
fn parse_partition(s: &str) -> Option<(u32, u32)> {
    let (i, n) = s.split_once('/')?;
    let (i, n): (u32, u32) = (i.trim().parse().ok()?, n.trim().parse().ok()?);
    (i < n && n <= 64).then_some((i, n))
}

fn check_topic_level(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 64 {
        return Err("must be 1 to 64 bytes".into());
    }
    if s.contains(['/', '+', '#', '$']) || s.chars().any(char::is_whitespace) {
        return Err(format!(
            "{s:?} must not contain '/', '+', '#', '$' or spaces"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[mqtt]
host = "127.0.0.1"
username = "ingester"
[kafka]
brokers = "127.0.0.1:9092"
[postgres]
url = "host=127.0.0.1 user=vantage dbname=vantage"
"#;

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("ingester.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn good_config_has_defaults() {
        let c = Config::parse(GOOD, Path::new("ingester.toml")).unwrap();
        assert_eq!(c.kafka().unwrap().topic, "vantage.results");
        assert_eq!(c.mqtt().unwrap().results_filter(), "vantage/v1/results/+/+");
        assert_eq!(c.postgres().unwrap().schema, "vantage");
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = err(&GOOD.replace("[kafka]", "[kafka]\ncolour = 1"));
        assert!(
            e.starts_with("ingester.toml:") && e.contains("colour"),
            "{e}"
        );
        let e = err(&GOOD.replace("127.0.0.1:9092", ""));
        assert!(e.contains("key `kafka.brokers`"), "{e}");
        let e = err(&GOOD.replace("[postgres]", "[postgres]\nschema = \"Bad-Name\""));
        assert!(e.contains("key `postgres.schema`"), "{e}");
        let e = err(&GOOD.replace(
            "host = \"127.0.0.1\"",
            "host = \"127.0.0.1\"\nshared_group = \"a/b\"",
        ));
        assert!(e.contains("key `mqtt.shared_group`"), "{e}");
        let e = err(&format!("{GOOD}[http]\nsink_listen = \"localhost\"\n"));
        assert!(e.contains("key `http.sink_listen`"), "{e}");
    }

    #[test]
    fn http_endpoints_default_on_loopback_and_can_be_off() {
        let c = Config::parse(GOOD, Path::new("i.toml")).unwrap();
        assert_eq!(
            c.http.bridge_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(c.http.sink_listen, Some("127.0.0.1:9465".parse().unwrap()));
        let c = Config::parse(
            &format!("{GOOD}[http]\nbridge_listen = \"off\"\n"),
            Path::new("i.toml"),
        )
        .unwrap();
        assert_eq!(c.http.bridge_listen, None);
    }

    /// Issue #14 item 13: a property librdkafka refuses is refused at load, naming the file and
    /// the key (not only librdkafka's message, later, when a stage creates its client).
    #[test]
    fn bad_librdkafka_properties_name_file_and_key() {
        for (property, needle) in [
            (
                "\"no.such.property\" = \"1\"",
                "No such configuration property",
            ),
            ("\"socket.timeout.ms\" = \"soon\"", "Invalid value"),
        ] {
            let e = err(&format!("{GOOD}[kafka.properties]\n{property}\n"));
            let key = property.split('"').nth(1).unwrap();
            assert!(
                e.starts_with(&format!(
                    "ingester.toml: key `kafka.properties.{key}`: librdkafka: "
                )) && e.contains(needle),
                "{e}"
            );
        }
        Config::parse(
            &format!("{GOOD}[kafka.properties]\n\"debug\" = \"broker\"\n\"linger.ms\" = \"10\"\n"),
            Path::new("i.toml"),
        )
        .unwrap();
    }

    /// Issue #14 item 13: which commands a file can run, and what the others lack.
    #[test]
    fn stages_say_which_commands_can_run() {
        let c = Config::parse(
            "[kafka]\nbrokers = \"127.0.0.1:9092\"\n",
            Path::new("i.toml"),
        )
        .unwrap();
        let by = |cmd: &str| c.stages().into_iter().find(|s| s.command == cmd).unwrap();
        assert_eq!(by("bridge").missing, ["mqtt"]);
        assert_eq!(by("sink").missing, ["postgres"]);
        assert_eq!(by("targets apply").missing, ["postgres", "mqtt"]);
        assert!(by("status").missing.is_empty());
        let text = render_stages(&c.stages());
        assert!(
            text.contains("  bridge         cannot run: no [mqtt] section\n"),
            "{text}"
        );
        assert!(
            text.contains("  targets apply  cannot run: no [postgres] or [mqtt] section\n"),
            "{text}"
        );
        assert!(text.contains("  status         can run\n"), "{text}");
        let full = Config::parse(GOOD, Path::new("i.toml")).unwrap();
        assert!(full.stages().iter().all(|s| s.missing.is_empty()));
    }

    #[test]
    fn missing_section_is_named() {
        let c = Config::parse("[kafka]\nbrokers = \"127.0.0.1:1\"\n", Path::new("i.toml")).unwrap();
        let e = c.postgres().unwrap_err().to_string();
        assert_eq!(
            e,
            "i.toml: key `postgres`: section is required by this command"
        );
    }

    #[test]
    fn shared_subscription_filter() {
        let c = Config::parse(
            &GOOD.replace(
                "host = \"127.0.0.1\"",
                "host = \"127.0.0.1\"\nshared_group = \"bridges\"",
            ),
            Path::new("i.toml"),
        )
        .unwrap();
        assert_eq!(
            c.mqtt().unwrap().results_filter(),
            "$share/bridges/vantage/v1/results/+/+"
        );
    }

    #[test]
    fn partitions_split_topics_between_bridges() {
        let with = |p: &str| {
            Config::parse(
                &GOOD.replace(
                    "host = \"127.0.0.1\"",
                    &format!("host = \"127.0.0.1\"\npartition = \"{p}\""),
                ),
                Path::new("i.toml"),
            )
        };
        for bad in ["2/2", "x/2", "1", "0/65"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("key `mqtt.partition`"), "{e}");
        }
        let members: Vec<MqttConfig> = (0..3)
            .map(|i| with(&format!("{i}/3")).unwrap().mqtt().unwrap().clone())
            .collect();
        assert_eq!(members[0].results_filter(), "vantage/v1/results/+/+");
        for a in 0..100 {
            let topic = format!("vantage/v1/results/eu/agent-{a}");
            let owners = members.iter().filter(|m| m.handles(&topic)).count();
            assert_eq!(owners, 1, "{topic}");
        }
        let both = GOOD.replace(
            "host = \"127.0.0.1\"",
            "host = \"127.0.0.1\"\npartition = \"0/2\"\nshared_group = \"g\"",
        );
        assert!(err(&both).contains("not both"));
    }

    /// Issue #14 item 8: plaintext Kafka off loopback is refused unless allowed, as for MQTT.
    #[test]
    fn plaintext_kafka_to_a_remote_broker_is_refused() {
        let remote = GOOD.replace("127.0.0.1:9092", "127.0.0.1:9092,kafka-1.example:9092");
        let e = err(&remote);
        assert!(
            e.contains("key `kafka.brokers`")
                && e.contains("broker kafka-1.example:9092 is not on this"),
            "{e}"
        );
        let e = err(&format!(
            "{remote}[kafka.properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n"
        ));
        assert!(
            e.contains("key `kafka.properties.security.protocol`"),
            "{e}"
        );
        for ok in [
            format!("{remote}[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n"),
            format!("{remote}[kafka.properties]\n\"security.protocol\" = \"ssl\"\n"),
            remote.replace("[kafka]", "[kafka]\nallow_plaintext = true"),
            GOOD.replace("127.0.0.1:9092", "localhost:9092,[::1]:9093"),
        ] {
            Config::parse(&ok, Path::new("i.toml")).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert_eq!(broker_host("[::1]:9092"), "::1");
        assert_eq!(broker_host("::1"), "::1");
        assert_eq!(broker_host("k.example"), "k.example");
    }

    /// Issue #14 item 13: syntax and type errors do not echo values (the agent's helper).
    #[test]
    fn toml_errors_do_not_echo_values() {
        let e = err(&GOOD.replace("[postgres]", "[postgres]\npassword = hunter2-secret"));
        assert!(
            e.starts_with("ingester.toml: TOML parse error at line ")
                && e.contains("password = <value not shown>")
                && !e.contains("hunter2"),
            "{e}"
        );
        let e = err(&GOOD.replace("[mqtt]", "[mqtt]\nport = \"hunter2-secret\""));
        assert!(
            e.contains("string <redacted>") && !e.contains("hunter2"),
            "{e}"
        );
    }

    /// Issue #14, item 4: the durability settings cannot be overridden through
    /// `kafka.properties`; the error names the file, the key and why.
    #[test]
    fn durability_properties_are_refused() {
        for (key, value, why) in [
            ("acks", "1", "all"),
            ("request.required.acks", "0", "all"),
            ("enable.idempotence", "false", "duplicate"),
            ("enable.auto.commit", "true", "after its rows are committed"),
            (
                "enable.auto.offset.store",
                "true",
                "after its rows are committed",
            ),
            ("auto.offset.reset", "latest", "earliest"),
            ("group.id", "other", "kafka.group_id"),
        ] {
            let e = err(&GOOD.replace(
                "[postgres]",
                &format!("[kafka.properties]\n\"{key}\" = \"{value}\"\n[postgres]"),
            ));
            assert!(
                e.starts_with(&format!("ingester.toml: key `kafka.properties.{key}`: "))
                    && e.contains(why),
                "{e}"
            );
        }
        // Other librdkafka settings still pass through.
        let c = Config::parse(
            &GOOD.replace(
                "[postgres]",
                "[kafka.properties]\n\"isolation.level\" = \"read_committed\"\n\"linger.ms\" = \"20\"\n[postgres]",
            ),
            Path::new("i.toml"),
        )
        .unwrap();
        assert_eq!(c.kafka().unwrap().properties.len(), 2);
    }

    #[test]
    fn replication_defaults_to_production_and_is_checked() {
        let c = Config::parse(GOOD, Path::new("i.toml")).unwrap();
        let k = c.kafka().unwrap();
        assert_eq!((k.replication_factor, k.min_insync_replicas), (3, 2));
        let with = |lines: &str| GOOD.replace("[kafka]", &format!("[kafka]\n{lines}"));
        let c = Config::parse(
            &with("replication_factor = 1\nmin_insync_replicas = 1"),
            Path::new("i.toml"),
        )
        .unwrap();
        assert_eq!(c.kafka().unwrap().replication_factor, 1);
        let e = err(&with("replication_factor = 0"));
        assert!(e.contains("key `kafka.replication_factor`"), "{e}");
        let e = err(&with("replication_factor = 1"));
        assert!(
            e.contains("key `kafka.min_insync_replicas`") && e.contains("(1)"),
            "min.insync.replicas 2 > 1 replica: {e}"
        );
        let e = err(&with("min_insync_replicas = 0"));
        assert!(e.contains("key `kafka.min_insync_replicas`"), "{e}");
    }

    /// Issue #14, item 3: the clock window is bounded by retention.
    #[test]
    fn clock_window_is_checked() {
        let c = Config::parse(GOOD, Path::new("i.toml")).unwrap();
        assert_eq!(c.sink.clock, crate::clock::ClockWindow::default());
        let e = err(&format!("{GOOD}[sink]\nmax_clock_behind = \"31d\"\n"));
        assert!(
            e.contains("key `sink.max_clock_behind`") && e.contains("raw_retention"),
            "{e}"
        );
        let e = err(&format!("{GOOD}[sink]\nmax_clock_ahead = \"2d\"\n"));
        assert!(e.contains("key `sink.max_clock_ahead`"), "{e}");
        let c = Config::parse(
            &format!(
                "{GOOD}[sink]\nmax_clock_behind = \"60d\"\n[storage]\nraw_retention = \"90d\"\n"
            ),
            Path::new("i.toml"),
        )
        .unwrap();
        assert_eq!(c.sink.clock.max_behind, Duration::from_secs(60 * 86_400));
        assert_eq!(c.sink.clock.retention, Duration::from_secs(90 * 86_400));
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../ingester.example.toml")
            .replace("password_env = \"VANTAGE_MQTT_PASSWORD\"", "")
            .replace("password_env = \"VANTAGE_PG_PASSWORD\"", "");
        let c = Config::parse(&text, Path::new("ingester.example.toml")).unwrap();
        c.mqtt().unwrap();
        c.kafka().unwrap();
        c.postgres().unwrap();
        assert_eq!(c.alerts.rules.len(), 6);
        assert_eq!(c.alerts.alertmanagers.len(), 1);
    }

    /// Issue #16: a bad rule is refused at load, naming the file, the key and the reason.
    #[test]
    fn bad_alert_rules_name_file_and_key() {
        let e = err(&format!(
            "{GOOD}[[alerts.rules]]\nname = \"slow\"\nkind = \"slow\"\nmin_share = 0.5\n"
        ));
        assert_eq!(
            e,
            "ingester.toml: key `alerts.rules[0].min_share`: not a key of kind slow"
        );
    }
}
