//! `[mqtt]`: the broker the bridge subscribes to and `targets apply` publishes to.

use std::path::PathBuf;

use serde::Deserialize;
use vantage_proto::topic::{Channel, EveryAgent};

use super::{password, Invalid};

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

impl TryFrom<RawMqtt> for MqttConfig {
    type Error = Invalid;

    fn try_from(m: RawMqtt) -> Result<MqttConfig, Invalid> {
        let invalid = |key: &str, reason: String| (format!("mqtt.{key}"), reason);
        if m.host.is_empty() {
            return Err(invalid("host", "must not be empty".into()));
        }
        check_topic_level(&m.topic_prefix).map_err(|r| invalid("topic_prefix", r))?;
        if let Some(g) = &m.shared_group {
            check_topic_level(g).map_err(|r| invalid("shared_group", r))?;
        }
        if m.client_id.is_empty() || m.client_id.len() > 128 {
            return Err(invalid("client_id", "must be 1 to 128 bytes".into()));
        }
        let partition = match &m.partition {
            None => None,
            Some(_) if m.shared_group.is_some() => {
                return Err(invalid(
                    "partition",
                    "set either shared_group or partition, not both".into(),
                ))
            }
            Some(p) => Some(parse_partition(p).ok_or_else(|| {
                invalid(
                    "partition",
                    format!("{p:?} is not \"i/n\" with 0 <= i < n <= 64"),
                )
            })?),
        };
        if m.max_in_flight == 0 || m.max_in_flight > 65_535 {
            return Err(invalid("max_in_flight", "must be 1..=65535".into()));
        }
        let password = password(
            "mqtt",
            &m.password_env,
            &m.password_file,
            &m.password_credential,
        )?;
        if m.tls.is_none() && !m.allow_plaintext && !crate::tls::is_loopback_host(&m.host) {
            return Err(invalid(
                "tls",
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
                crate::tls::client(raw).map_err(|(key, r)| invalid(&format!("tls.{key}"), r))?,
            ),
        };
        Ok(MqttConfig {
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
}

/// `"i/n"` → (i, n) with 0 <= i < n <= 64.
fn parse_partition(s: &str) -> Option<(u32, u32)> {
    let (i, n) = s.split_once('/')?;
    let (i, n): (u32, u32) = (i.trim().parse().ok()?, n.trim().parse().ok()?);
    (i < n && n <= 64).then_some((i, n))
}

/// One level of an MQTT topic (the prefix, a shared-subscription group).
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
