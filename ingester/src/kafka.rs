//! Kafka plumbing shared by the stages: client settings, topic creation, and the dead-letter path.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
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
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    pass_through(&mut c, config);
    c.create()
}

/// Creates the results and dead-letter topics if they do not exist yet.
pub async fn ensure_topics(config: &KafkaConfig) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(config).create()?;
    let topics = [
        NewTopic::new(&config.topic, config.partitions, TopicReplication::Fixed(1)),
        NewTopic::new(&config.dead_letter_topic, 1, TopicReplication::Fixed(1)),
    ];
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(topic, ?code, "cannot create Kafka topic");
                })
            }
        }
    }
    Ok(())
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
