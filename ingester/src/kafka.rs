//! Kafka plumbing shared by the stages: client settings, topic creation, and the dead-letter path.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
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
    for (k, v) in &config.properties {
        c.set(k, v);
    }
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
    for (k, v) in &config.properties {
        c.set(k, v);
    }
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

/// Produces one message and waits for its delivery report, retrying with capped exponential
/// backoff until Kafka confirms it. Returns false only if `stop` fired first (the caller must
/// then not acknowledge its input).
pub async fn produce_until_delivered(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: Option<&OwnedHeaders>,
    stop: &CancellationToken,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(headers) = headers {
            record = record.headers(headers.clone());
        }
        // Queue-full waits inside librdkafka count against this timeout; delivery itself is
        // bounded by message.timeout.ms.
        let sent = tokio::select! {
            r = producer.send(record, Duration::from_secs(5)) => r,
            _ = stop.cancelled() => return false,
        };
        match sent {
            Ok(_) => return true,
            Err((e, _)) => {
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
