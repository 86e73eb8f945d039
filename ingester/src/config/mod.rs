//! Ingester configuration: the raw TOML shape and the validated [`Config`], one module per
//! section (`[mqtt]` in `mqtt.rs`, ...), each a raw serde form and a `TryFrom` that checks it.
//!
//! One file serves every stage; each stage asks for the sections it needs ([`Config::mqtt`],
//! [`Config::kafka`], [`Config::postgres`]) and a missing one is an error that names it.
//! Errors name the file, the key and the problem. Nothing here reaches the database, the
//! broker or Kafka: the validated config is what those modules are built from.

pub mod alerts;
pub mod http;
pub mod kafka;
pub mod mqtt;
pub mod postgres;
pub mod sink;
pub mod storage;
pub mod web;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use alerts::{AlertsConfig, RawAlerts};
pub use http::{HttpConfig, RawHttp};
pub use kafka::{KafkaConfig, RawKafka};
pub use mqtt::{MqttConfig, RawMqtt};
pub use postgres::{PgTls, PostgresConfig, RawPostgres};
pub use sink::{ClockWindow, RawSink, SinkConfig};
pub use storage::{RawStorage, StorageConfig};
pub use web::{RawWeb, WebConfig};

/// A configuration that cannot be used, with where and why (one type for both binaries).
pub use vantage_common::config_text::ConfigError;

/// A section's error before the file is known: (key from the top, e.g. `mqtt.host`; reason).
pub type Invalid = (String, String);

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
    /// `[alerts]`: the alert stage's rules and receivers (see `alerts.rs`).
    #[serde(default)]
    pub alerts: RawAlerts,
    /// `[web]`: the dashboard (`vantage-ingester web`, see `web.rs`).
    #[serde(default)]
    pub web: RawWeb,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    mqtt: Option<MqttConfig>,
    kafka: Option<KafkaConfig>,
    postgres: Option<PostgresConfig>,
    pub sink: SinkConfig,
    pub storage: StorageConfig,
    pub http: HttpConfig,
    pub alerts: AlertsConfig,
    pub web: WebConfig,
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&vantage_common::config_text::read(path)?, path)
    }

    /// Parses and validates TOML text; `path` is only used in error messages (which hide
    /// values: a secret typed into the file by mistake is not echoed).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::from_raw(vantage_common::config_text::parse(text, path)?, path)
    }

    /// Each section checks itself (`TryFrom` of its raw form, errors keyed from the section
    /// down); what spans sections is checked here; the file is added to every error.
    pub fn from_raw(raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
        let at_file = |(key, reason): Invalid| ConfigError::Invalid {
            file: path.to_owned(),
            key,
            reason,
        };
        let storage = StorageConfig::try_from(raw.storage).map_err(at_file)?;
        Ok(Config {
            file: path.to_owned(),
            mqtt: raw
                .mqtt
                .map(MqttConfig::try_from)
                .transpose()
                .map_err(at_file)?,
            kafka: raw
                .kafka
                .map(KafkaConfig::try_from)
                .transpose()
                .map_err(at_file)?,
            postgres: raw
                .postgres
                .map(PostgresConfig::try_from)
                .transpose()
                .map_err(at_file)?,
            http: HttpConfig::try_from(raw.http).map_err(at_file)?,
            alerts: AlertsConfig::try_from(raw.alerts).map_err(at_file)?,
            web: WebConfig::try_from(raw.web).map_err(at_file)?,
            sink: SinkConfig::from_raw(raw.sink, &storage).map_err(at_file)?,
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
/// A password from the section's `password_env`, `password_file` or `password_credential`
/// (at most one of them).
fn password(
    section: &str,
    env: &Option<String>,
    file: &Option<PathBuf>,
    credential: &Option<String>,
) -> Result<Option<String>, Invalid> {
    crate::secrets::password(env.as_deref(), file.as_deref(), credential.as_deref())
        .map(|s| s.map(|s| s.expose().to_owned()))
        .map_err(|(key, reason)| (format!("{section}.{key}"), reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const GOOD: &str = r#"
[mqtt]
host = "127.0.0.1"
username = "ingester"
[kafka]
brokers = "127.0.0.1:9092"
[postgres]
url = "host=127.0.0.1 user=vantage dbname=vantage"
"#;

    fn ok(text: &str) -> Config {
        Config::parse(text, Path::new("i.toml")).unwrap()
    }

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("ingester.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn good_config_has_defaults() {
        let c = ok(GOOD);
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
        let c = ok(GOOD);
        assert_eq!(
            c.http.bridge_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(c.http.sink_listen, Some("127.0.0.1:9465".parse().unwrap()));
        let c = ok(&format!("{GOOD}[http]\nbridge_listen = \"off\"\n"));
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
        ok(&format!(
            "{GOOD}[kafka.properties]\n\"debug\" = \"broker\"\n\"linger.ms\" = \"10\"\n"
        ));
    }

    /// Issue #14 item 13: which commands a file can run, and what the others lack.
    #[test]
    fn stages_say_which_commands_can_run() {
        let c = ok("[kafka]\nbrokers = \"127.0.0.1:9092\"\n");
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
        let full = ok(GOOD);
        assert!(full.stages().iter().all(|s| s.missing.is_empty()));
    }

    #[test]
    fn missing_section_is_named() {
        let c = ok("[kafka]\nbrokers = \"127.0.0.1:1\"\n");
        let e = c.postgres().unwrap_err().to_string();
        assert_eq!(
            e,
            "i.toml: key `postgres`: section is required by this command"
        );
    }

    #[test]
    fn shared_subscription_filter() {
        let c = ok(&GOOD.replace(
            "host = \"127.0.0.1\"",
            "host = \"127.0.0.1\"\nshared_group = \"bridges\"",
        ));
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
        let c = ok(&GOOD.replace(
                "[postgres]",
                "[kafka.properties]\n\"isolation.level\" = \"read_committed\"\n\"linger.ms\" = \"20\"\n[postgres]",
            ));
        assert_eq!(c.kafka().unwrap().properties.len(), 2);
    }

    #[test]
    fn replication_defaults_to_production_and_is_checked() {
        let c = ok(GOOD);
        let k = c.kafka().unwrap();
        assert_eq!((k.replication_factor, k.min_insync_replicas), (3, 2));
        let with = |lines: &str| GOOD.replace("[kafka]", &format!("[kafka]\n{lines}"));
        let c = ok(&with("replication_factor = 1\nmin_insync_replicas = 1"));
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
        let c = ok(GOOD);
        assert_eq!(c.sink.clock, ClockWindow::default());
        let e = err(&format!("{GOOD}[sink]\nmax_clock_behind = \"31d\"\n"));
        assert!(
            e.contains("key `sink.max_clock_behind`") && e.contains("raw_retention"),
            "{e}"
        );
        let e = err(&format!("{GOOD}[sink]\nmax_clock_ahead = \"2d\"\n"));
        assert!(e.contains("key `sink.max_clock_ahead`"), "{e}");
        let c = ok(&format!(
            "{GOOD}[sink]\nmax_clock_behind = \"60d\"\n[storage]\nraw_retention = \"90d\"\n"
        ));
        assert_eq!(c.sink.clock.max_behind, Duration::from_secs(60 * 86_400));
        assert_eq!(c.sink.clock.retention, Duration::from_secs(90 * 86_400));
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../ingester.example.toml")
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
