//! Kafka plumbing shared by the stages: client settings, topic creation, and the dead-letter path.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;

/// Header that carries why a message was dead-lettered.
pub const REASON_HEADER: &str = "vantage-reason";
/// Header naming the stage that rejected it (`bridge` or `sink`).
pub const STAGE_HEADER: &str = "vantage-stage";
/// Header with the MQTT topic the bridge received a rejected payload on.
pub const MQTT_TOPIC_HEADER: &str = "vantage-mqtt-topic";
/// Header of a `clock_skew` / `past_retention` dead letter: the bridge's time the results were
/// judged by (the original record's Kafka timestamp, ms since the epoch).
pub const BRIDGE_TIME_HEADER: &str = "vantage-bridge-time-ms";
/// Headers of a `postgres_refused` dead letter: the SQLSTATE and the server's message.
pub const SQLSTATE_HEADER: &str = "vantage-sqlstate";
pub const ERROR_HEADER: &str = "vantage-error";

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

/// librdkafka settings common to every client: brokers, then the pass-through properties (which
/// may override anything, e.g. for SASL/SSL).
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    pass_through(&mut c, config);
    c
}

/// The pass-through properties, then the secret ones (read from the environment or files).
fn pass_through(c: &mut ClientConfig, config: &KafkaConfig) {
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    for (k, v) in &config.secrets {
        c.set(k, v.expose());
    }
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

/// Settings of the sink's consumer before its fixed ones: a crashed sink's partitions move to
/// the others after 10 s without heartbeats (librdkafka's default is 45 s, and every rebalance
/// waits for it). The pass-through properties may override these.
pub fn consumer_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    pass_through(&mut c, config);
    c
}

/// A producer that only reports success once every in-sync replica has the message, and that
/// never writes a message twice or out of order on its own retries.
pub fn producer(config: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    pass_through(&mut c, config);
    // After the pass-through: these two are the durability contract (`refused_property`).
    c.set("enable.idempotence", "true").set("acks", "all");
    c.create()
}

/// Why the topics could not be made sure of.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// Kafka did not answer (or answered with an error worth retrying later).
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The cluster cannot hold what the configuration asks for: the stage must not run (it
    /// would make the broker auto-create the topics with its own, weaker, defaults).
    #[error("key `{key}`: {reason}")]
    Config { key: &'static str, reason: String },
}

impl TopicError {
    /// A configuration the cluster refuses (as opposed to Kafka being unreachable).
    pub fn is_config(&self) -> bool {
        matches!(self, TopicError::Config { .. })
    }
}

/// The results and dead-letter topics as the cluster has them.
#[derive(Debug, Default)]
struct TopicState {
    brokers: usize,
    /// Replicas of partition 0, per existing topic.
    replicas: std::collections::BTreeMap<String, usize>,
}

async fn topic_state(config: &KafkaConfig) -> Result<TopicState, KafkaError> {
    let client: BaseConsumer = client_config(config).create()?;
    let names = [config.topic.clone(), config.dead_letter_topic.clone()];
    // A metadata request blocks its thread until the broker answers.
    tokio::task::spawn_blocking(move || {
        let metadata = client.fetch_metadata(None, Duration::from_secs(10))?;
        let mut state = TopicState {
            brokers: metadata.brokers().len(),
            ..TopicState::default()
        };
        for t in metadata.topics() {
            if names.iter().any(|n| n == t.name()) && t.error().is_none() {
                let replicas = t.partitions().first().map_or(0, |p| p.replicas().len());
                state.replicas.insert(t.name().to_owned(), replicas);
            }
        }
        Ok(state)
    })
    .await
    .map_err(|_| KafkaError::Canceled)?
}

/// Creates the results and dead-letter topics if they do not exist yet, with
/// `kafka.replication_factor` replicas and `min.insync.replicas = kafka.min_insync_replicas`.
/// Topics that exist are left as they are, with a warning when they have fewer replicas or a
/// lower `min.insync.replicas` than configured (Kafka auto-creates topics with the broker's
/// defaults, 1 and 1 unless the broker says otherwise).
pub async fn ensure_topics(config: &KafkaConfig) -> Result<(), TopicError> {
    let state = topic_state(config).await?;
    let admin: AdminClient<DefaultClientContext> = client_config(config).create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let existing: Vec<&String> = state.replicas.keys().collect();
    if !existing.is_empty() {
        check_existing(&admin, config, &state, &options).await;
    }
    let wanted = [
        (config.topic.as_str(), config.partitions),
        (config.dead_letter_topic.as_str(), 1),
    ];
    let min_isr = config.min_insync_replicas.to_string();
    let missing: Vec<NewTopic<'_>> = wanted
        .iter()
        .filter(|(name, _)| !state.replicas.contains_key(*name))
        .map(|&(name, partitions)| {
            NewTopic::new(
                name,
                partitions,
                TopicReplication::Fixed(config.replication_factor),
            )
            .set("min.insync.replicas", &min_isr)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if state.brokers < config.replication_factor as usize {
        return Err(TopicError::Config {
            key: "kafka.replication_factor",
            reason: format!(
                "is {} but the cluster has {} broker(s), so the topics cannot be created (set it \
                 to 1, and kafka.min_insync_replicas to 1, only for a single test broker)",
                config.replication_factor, state.brokers
            ),
        });
    }
    for result in admin.create_topics(&missing, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                tracing::error!(topic, ?code, "cannot create Kafka topic");
                return Err(match code {
                    RDKafkaErrorCode::InvalidReplicationFactor
                    | RDKafkaErrorCode::InvalidReplicaAssignment => TopicError::Config {
                        key: "kafka.replication_factor",
                        reason: format!("the cluster refused it for topic {topic}: {code}"),
                    },
                    RDKafkaErrorCode::InvalidConfig | RDKafkaErrorCode::PolicyViolation => {
                        TopicError::Config {
                            key: "kafka.min_insync_replicas",
                            reason: format!("the cluster refused it for topic {topic}: {code}"),
                        }
                    }
                    code => TopicError::Kafka(KafkaError::AdminOp(code)),
                });
            }
        }
    }
    Ok(())
}

/// Warns about existing topics weaker than the configuration asks for.
async fn check_existing(
    admin: &AdminClient<DefaultClientContext>,
    config: &KafkaConfig,
    state: &TopicState,
    options: &AdminOptions,
) {
    for (topic, &replicas) in &state.replicas {
        if replicas < config.replication_factor as usize {
            tracing::warn!(
                topic,
                replicas,
                wanted = config.replication_factor,
                "Kafka topic has fewer replicas than kafka.replication_factor (Kafka does not \
                 change an existing topic: add replicas with kafka-reassign-partitions)"
            );
        }
    }
    let resources: Vec<ResourceSpecifier<'_>> = state
        .replicas
        .keys()
        .map(|t| ResourceSpecifier::Topic(t))
        .collect();
    let Ok(described) = admin.describe_configs(&resources, options).await else {
        return;
    };
    for resource in described.into_iter().flatten() {
        let min_isr = resource
            .get("min.insync.replicas")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse::<i32>().ok());
        if let Some(have) = min_isr.filter(|&v| v < config.min_insync_replicas) {
            tracing::warn!(
                topic = ?resource.specifier,
                min_insync_replicas = have,
                wanted = config.min_insync_replicas,
                "Kafka topic has a lower min.insync.replicas than kafka.min_insync_replicas (set \
                 it with kafka-configs --alter)"
            );
        }
    }
}

/// A producer shared by many concurrent deliveries that replaces itself after a fatal error.
///
/// An idempotent producer can hit errors that librdkafka declares fatal (e.g. an out-of-order
/// sequence after broker data loss); every later send on that instance fails. Deliveries that
/// see such an error ask for a fresh instance and retry on it: the message is then produced
/// again (at-least-once), which the sink's natural key absorbs.
pub struct Producer {
    config: KafkaConfig,
    current: std::sync::Mutex<(u64, FutureProducer)>,
}

impl Producer {
    pub fn new(config: &KafkaConfig) -> Result<Producer, KafkaError> {
        Ok(Producer {
            config: config.clone(),
            current: std::sync::Mutex::new((0, producer(config)?)),
        })
    }

    /// The current instance and its generation.
    fn get(&self) -> (u64, FutureProducer) {
        let guard = self.current.lock().unwrap_or_else(|e| e.into_inner());
        (guard.0, guard.1.clone())
    }

    /// Replaces instance `generation` if it is still current and has a fatal error.
    fn recover(&self, generation: u64, broken: &FutureProducer) {
        let Some((code, reason)) = broken.client().fatal_error() else {
            return;
        };
        let mut guard = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if guard.0 != generation {
            return;
        }
        match producer(&self.config) {
            Ok(fresh) => {
                tracing::error!(
                    ?code,
                    reason,
                    "Kafka producer hit a fatal error; replaced it"
                );
                *guard = (generation + 1, fresh);
            }
            Err(e) => tracing::error!(error = %e, "cannot create a new Kafka producer"),
        }
    }

    /// Waits until every message handed to librdkafka is delivered or `timeout` passes.
    pub fn flush(&self, timeout: Duration) {
        let (_, p) = self.get();
        if let Err(e) = rdkafka::producer::Producer::flush(&p, timeout) {
            tracing::warn!(error = %e, "Kafka producer flush incomplete");
        }
    }
}

/// Produces one message and waits for its delivery report, retrying with capped exponential
/// backoff until Kafka confirms it. Returns false only if `stop` fired first (the caller must
/// then not acknowledge its input).
pub async fn produce_until_delivered(
    producer: &Producer,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: Option<&OwnedHeaders>,
    stop: &CancellationToken,
) -> bool {
    produce_until_delivered_at(producer, topic, key, payload, headers, None, stop).await
}

/// [`produce_until_delivered`] with the record's timestamp fixed (ms since the epoch): every
/// retry carries the same one. Without it librdkafka stamps each attempt when it is queued, so
/// a message retried after a failure would look newer than one produced after it (the bridge
/// stamps what it receives with the time it received it; the sink orders statuses by it).
pub async fn produce_until_delivered_at(
    producer: &Producer,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: Option<&OwnedHeaders>,
    timestamp_ms: Option<i64>,
    stop: &CancellationToken,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        let (generation, instance) = producer.get();
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(ts) = timestamp_ms {
            record = record.timestamp(ts);
        }
        if let Some(headers) = headers {
            record = record.headers(headers.clone());
        }
        // Queue-full waits inside librdkafka count against this timeout; delivery itself is
        // bounded by message.timeout.ms.
        let sent = tokio::select! {
            r = instance.send(record, Duration::from_secs(5)) => r,
            _ = stop.cancelled() => return false,
        };
        match sent {
            Ok(_) => return true,
            Err((e, _)) => {
                producer.recover(generation, &instance);
                tracing::warn!(topic, error = %e, retry_in = ?backoff, "Kafka delivery failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return false,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Headers of a dead letter.
pub fn dead_letter_headers(stage: &str, reason: &str, mqtt_topic: Option<&str>) -> OwnedHeaders {
    let mut h = OwnedHeaders::new()
        .insert(Header {
            key: REASON_HEADER,
            value: Some(reason),
        })
        .insert(Header {
            key: STAGE_HEADER,
            value: Some(stage),
        });
    if let Some(t) = mqtt_topic {
        h = h.insert(Header {
            key: MQTT_TOPIC_HEADER,
            value: Some(t),
        });
    }
    h
}
