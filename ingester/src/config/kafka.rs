//! `[kafka]`: brokers, topics, and the librdkafka settings the stages pass through, checked at
//! load (the durability settings the ingester fixes itself are refused here, with the reason).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;
use serde::Deserialize;

use super::Invalid;

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
    DEFAULT_STALL_TIMEOUT
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

impl TryFrom<RawKafka> for KafkaConfig {
    type Error = Invalid;

    fn try_from(k: RawKafka) -> Result<KafkaConfig, Invalid> {
        let invalid = |key: &str, reason: String| (format!("kafka.{key}"), reason);
        if k.brokers.trim().is_empty() {
            return Err(invalid("brokers", "must not be empty".into()));
        }
        for (key, value) in [
            ("topic", &k.topic),
            ("dead_letter_topic", &k.dead_letter_topic),
            ("group_id", &k.group_id),
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
                "dead_letter_topic",
                "must differ from kafka.topic".into(),
            ));
        }
        if k.partitions < 1 {
            return Err(invalid("partitions", "must be at least 1".into()));
        }
        if !(1..=32).contains(&k.replication_factor) {
            return Err(invalid(
                "replication_factor",
                "must be 1..=32 (3 in production; 1 only for a single test broker)".into(),
            ));
        }
        if k.min_insync_replicas < 1 || k.min_insync_replicas > k.replication_factor {
            return Err(invalid(
                "min_insync_replicas",
                format!(
                    "must be 1..=kafka.replication_factor ({}); 2 with 3 replicas in production",
                    k.replication_factor
                ),
            ));
        }
        if let Some((key, reason)) = k
            .properties
            .keys()
            .find_map(|key| refused_property(key).map(|r| (key, r)))
        {
            return Err(invalid(&format!("properties.{key}"), reason.into()));
        }
        if let Some(key) = k
            .properties
            .keys()
            .find(|key| crate::secrets::is_secret_kafka_property(key))
        {
            return Err(invalid(
                &format!("properties.{key}"),
                "is a secret: name an environment variable in kafka.secret_env or a file in \
                 kafka.secret_files instead"
                    .into(),
            ));
        }
        let secrets = crate::secrets::kafka_secrets(&k.secret_env, &k.secret_files)?;
        check_transport(&k)?;
        if k.stall_timeout < Duration::from_secs(1) {
            return Err(invalid(
                "stall_timeout",
                "must be at least 1s (default 30s)".into(),
            ));
        }
        check_properties(&k.properties).map_err(|(property, r)| {
            invalid(
                &format!("properties.{property}"),
                format!("librdkafka: {r}"),
            )
        })?;
        Ok(KafkaConfig {
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
}

/// librdkafka properties `kafka.properties` may not set, with the reason (refused at config
/// load). Each one would silently break "acknowledge only what is durable" or the sink's
/// commit protocol; the ingester sets them itself:
///
/// - `acks` / `request.required.acks` (producers: `all`, or a broker failure loses what the
///   bridge already acknowledged to MQTT) and `enable.idempotence` (`true`: retries neither
///   duplicate nor reorder a partition's messages).
/// - `enable.auto.commit` (the sink commits only offsets whose rows are committed in
///   PostgreSQL; librdkafka's auto-commit would commit what it merely fetched),
///   `enable.auto.offset.store` (with it on, closing the consumer or a later auto-commit
///   commits the position of fetched messages) and `auto.offset.reset` (`earliest`: a new
///   group, or offsets expired by the broker, must replay from the start; `latest` skips
///   everything not yet written).
///
/// `isolation.level` stays allowed: nothing writes these topics transactionally, so it changes
/// nothing. `group.id` is `kafka.group_id`.
pub fn refused_property(key: &str) -> Option<&'static str> {
    Some(match key {
        "acks" | "request.required.acks" => {
            "is fixed to \"all\": the bridge acknowledges MQTT only for messages every in-sync \
             replica has (set kafka.min_insync_replicas instead)"
        }
        "enable.idempotence" => {
            "is fixed to true: producer retries must not duplicate or reorder messages"
        }
        "enable.auto.commit" | "enable.auto.offset.store" => {
            "is fixed to false: the sink commits an offset only after its rows are committed in \
             PostgreSQL"
        }
        "auto.offset.reset" => {
            "is fixed to \"earliest\": a new consumer group (or one whose offsets expired) must \
             replay the topic, never skip to its end"
        }
        "group.id" => "set kafka.group_id instead",
        _ => return None,
    })
}

/// Checks each pass-through property with librdkafka itself (known name, valid value) without
/// creating a client, so a bad one is refused at config load naming its key, instead of failing
/// a stage later with librdkafka's message alone. On error: (property, librdkafka's reason).
/// Only for `kafka.properties`, which hold no secrets (librdkafka's reason repeats the value).
pub fn check_properties(
    properties: &std::collections::BTreeMap<String, String>,
) -> Result<(), (String, String)> {
    for (key, value) in properties {
        let mut one = ClientConfig::new();
        one.set(key, value);
        if let Err(e) = one.create_native_config() {
            let reason = match e {
                KafkaError::ClientConfig(_, description, _, _) => description,
                other => other.to_string(),
            };
            return Err((key.clone(), reason));
        }
    }
    Ok(())
}

/// Default of `kafka.stall_timeout`.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Plaintext Kafka only to brokers on this machine, unless `kafka.allow_plaintext`: the rule
/// MQTT (`mqtt.allow_plaintext`) and PostgreSQL (`tls = "disable"`) follow. On error: (key,
/// reason).
fn check_transport(k: &RawKafka) -> Result<(), Invalid> {
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
        key.to_owned(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_host_takes_the_port_off() {
        assert_eq!(broker_host("[::1]:9092"), "::1");
        assert_eq!(broker_host("::1"), "::1");
        assert_eq!(broker_host("k.example"), "k.example");
        assert_eq!(broker_host("k.example:9092"), "k.example");
    }
}
