//! The bridge stage: MQTT → validate → Kafka, acknowledging MQTT only after Kafka confirmed.
//!
//! Tasks (one owner per socket, after rumqttc's own examples):
//! - the event-loop task alone polls rumqttc and forwards incoming PUBLISH packets into a bounded
//!   channel; it never awaits `publish`/`ack` (that deadlocks rumqttc);
//! - the worker takes each message, validates it (topic → region and agent, frame decodes), and
//!   produces it to the results topic, or to the dead-letter topic with a reason. Deliveries run
//!   concurrently (up to `mqtt.max_in_flight`) in a `FuturesOrdered`, so acknowledgements leave in
//!   receive order (MQTT requires it) and each only after Kafka's delivery report.
//!
//! Durability: a message not yet confirmed by Kafka is not acknowledged; the broker keeps it in
//! the bridge's persistent session (`clean_session = false`) and redelivers it after a restart.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesOrdered, StreamExt};
use rdkafka::producer::FutureProducer;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::kafka;

/// Payloads above this size are dead-lettered as oversized without being decoded.
pub const MAX_PAYLOAD: usize = vantage_proto::MAX_FRAME_LEN;

/// How long shutdown waits for in-flight Kafka deliveries before leaving them unacknowledged.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("MQTT client: {0}")]
    Mqtt(#[from] rumqttc::ClientError),
}

/// Counters of one bridge run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BridgeStats {
    pub received: u64,
    pub produced: u64,
    pub dead_lettered: u64,
    pub acked: u64,
}

/// Live state other tasks (tests, a future health endpoint) can watch while the bridge runs.
#[derive(Debug, Default)]
pub struct BridgeState {
    /// Set once the broker acknowledged the subscription: from then on nothing published on the
    /// results topics is missed, even across bridge restarts (persistent session).
    pub subscribed: std::sync::atomic::AtomicBool,
}

/// What happened to one MQTT message.
enum Disposition {
    Produced,
    DeadLettered,
    /// Shutdown came before Kafka confirmed: must not be acknowledged.
    Abandoned,
}

/// Why a payload was rejected; the string goes into the dead-letter reason header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// The topic is not `<prefix>/v1/results/<region>/<agent>` with valid names.
    BadTopic,
    Oversized,
    Frame(vantage_proto::Error),
}

impl Reject {
    pub fn reason(self) -> &'static str {
        match self {
            Reject::BadTopic => "bad_topic",
            Reject::Oversized => "oversized",
            Reject::Frame(e) => e.reason(),
        }
    }
}

/// Region and agent from a results topic, or None if the topic is not one.
pub fn parse_topic<'t>(prefix: &str, topic: &'t str) -> Option<(&'t str, &'t str)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix("/v1/results/")?;
    let (region, agent) = rest.split_once('/')?;
    (vantage_proto::is_valid_name(region) && vantage_proto::is_valid_name(agent))
        .then_some((region, agent))
}

/// Checks one payload; on success returns the Kafka key `region/agent`.
pub fn validate(prefix: &str, topic: &str, payload: &[u8]) -> Result<String, Reject> {
    let (region, agent) = parse_topic(prefix, topic).ok_or(Reject::BadTopic)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(Reject::Oversized);
    }
    vantage_proto::decode(payload).map_err(Reject::Frame)?;
    Ok(format!("{region}/{agent}"))
}

/// Runs the bridge until `shutdown` fires, then finishes in-flight deliveries, acknowledges them
/// and disconnects.
pub async fn run(config: &Config, shutdown: CancellationToken) -> Result<BridgeStats, BridgeError> {
    run_with_state(config, shutdown, Arc::default()).await
}

/// [`run`], updating `state` as it goes.
pub async fn run_with_state(
    config: &Config,
    shutdown: CancellationToken,
    state: Arc<BridgeState>,
) -> Result<BridgeStats, BridgeError> {
    let mqtt = config.mqtt()?.clone();
    let kafka_config = config.kafka()?.clone();
    kafka::ensure_topics(&kafka_config).await?;
    let producer = kafka::producer(&kafka_config)?;

    let mut options = MqttOptions::new(&mqtt.client_id, &mqtt.host, mqtt.port);
    options.set_clean_session(false);
    options.set_manual_acks(true);
    options.set_keep_alive(Duration::from_secs(30));
    // Accept larger packets than any valid frame so oversized ones reach the dead-letter topic
    // instead of killing the connection.
    options.set_max_packet_size(1024 * 1024, 1024 * 1024);
    if let Some(user) = &mqtt.username {
        options.set_credentials(user.clone(), mqtt.password.clone().unwrap_or_default());
    }
    let (client, eventloop) = AsyncClient::new(options, 1024);
    // The broker sends at most its inflight window of unacknowledged QoS 1 messages (Mosquitto:
    // max_inflight_messages); this bound is larger, so the event-loop task never waits long.
    let (tx, mut rx) = mpsc::channel::<Publish>(mqtt.max_in_flight.max(1024));
    let events_stop = CancellationToken::new();
    let filter = mqtt.results_filter();
    let event_task = tokio::spawn(poll_events(
        eventloop,
        client.clone(),
        filter.clone(),
        tx,
        state,
        events_stop.clone(),
    ));
    tracing::info!(filter, topic = kafka_config.topic, "bridge running");

    let hard_stop = CancellationToken::new();
    let mut stats = BridgeStats::default();
    let mut pending = FuturesOrdered::new();
    let mut taking = true;
    let mut grace = Box::pin(tokio::time::sleep(Duration::from_secs(365 * 86_400)));
    loop {
        tokio::select! {
            // Stop taking input at shutdown; what is already in flight still completes.
            _ = shutdown.cancelled(), if taking => {
                taking = false;
                grace.as_mut().reset(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                if pending.is_empty() { break; }
            }
            _ = &mut grace, if !taking => hard_stop.cancel(),
            Some(publish) = rx.recv(), if taking && pending.len() < mqtt.max_in_flight => {
                stats.received += 1;
                pending.push_back(handle(
                    publish,
                    mqtt.topic_prefix.clone(),
                    kafka_config.topic.clone(),
                    kafka_config.dead_letter_topic.clone(),
                    producer.clone(),
                    hard_stop.clone(),
                ));
            }
            Some((publish, disposition)) = pending.next(), if !pending.is_empty() => {
                match disposition {
                    Disposition::Produced => stats.produced += 1,
                    Disposition::DeadLettered => stats.dead_lettered += 1,
                    // Acknowledging anything after this one would acknowledge out of order.
                    Disposition::Abandoned => break,
                }
                client.ack(&publish).await?;
                stats.acked += 1;
                if !taking && pending.is_empty() { break; }
            }
        }
    }
    // DISCONNECT queues behind the acknowledgements, so they reach the broker first.
    let _ = client.disconnect().await;
    if tokio::time::timeout(Duration::from_secs(5), event_task)
        .await
        .is_err()
    {
        events_stop.cancel();
    }
    tracing::info!(?stats, "bridge stopped");
    Ok(stats)
}

/// Validates and delivers one message; resolves when its fate is durable in Kafka.
async fn handle(
    publish: Publish,
    prefix: String,
    topic: String,
    dead_letter_topic: String,
    producer: FutureProducer,
    stop: CancellationToken,
) -> (Publish, Disposition) {
    let delivered = match validate(&prefix, &publish.topic, &publish.payload) {
        Ok(key) => {
            let ok = kafka::produce_until_delivered(
                &producer,
                &topic,
                Some(key.as_bytes()),
                &publish.payload,
                None,
                &stop,
            )
            .await;
            ok.then_some(Disposition::Produced)
        }
        Err(reject) => {
            tracing::warn!(topic = %publish.topic, bytes = publish.payload.len(), reason = reject.reason(), "frame rejected");
            let headers =
                kafka::dead_letter_headers("bridge", reject.reason(), Some(&publish.topic));
            let ok = kafka::produce_until_delivered(
                &producer,
                &dead_letter_topic,
                None,
                &publish.payload,
                Some(&headers),
                &stop,
            )
            .await;
            ok.then_some(Disposition::DeadLettered)
        }
    };
    (publish, delivered.unwrap_or(Disposition::Abandoned))
}

/// The only task that polls the MQTT event loop.
async fn poll_events(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filter: String,
    tx: mpsc::Sender<Publish>,
    state: Arc<BridgeState>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                // Bounded by the broker's inflight window (see `run`); a closed channel means the
                // worker stopped, and the message stays unacknowledged with the broker.
                if tx.send(publish).await.is_err() {
                    tracing::debug!("worker gone, not forwarding");
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to MQTT broker"
                );
                backoff = Duration::from_millis(100);
                // (Re)subscribe on every connect; try_subscribe never waits, so this loop cannot
                // deadlock on rumqttc's request queue.
                if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                    tracing::error!(error = %e, "cannot queue MQTT subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)))
                {
                    tracing::info!(?ack.return_codes, "subscribed");
                    state.subscribed.store(true, Ordering::Release);
                } else {
                    tracing::error!(?ack.return_codes, filter, "broker refused the subscription");
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "MQTT connection error");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_gives_region_and_agent() {
        assert_eq!(
            parse_topic("vantage", "vantage/v1/results/eu-north/pi-1"),
            Some(("eu-north", "pi-1"))
        );
        assert_eq!(parse_topic("vantage", "vantage/v1/results/eu-north"), None);
        assert_eq!(parse_topic("vantage", "vantage/v1/results/eu/pi/x"), None);
        assert_eq!(parse_topic("vantage", "other/v1/results/eu/pi"), None);
        assert_eq!(parse_topic("vantage", "vantage/v1/results/EU/pi"), None);
        assert_eq!(parse_topic("vantage", "vantage/v1/results//pi"), None);
    }

    #[test]
    fn bad_payloads_have_reasons() {
        let t = "vantage/v1/results/eu/pi";
        assert_eq!(
            validate("vantage", t, &[]),
            Err(Reject::Frame(vantage_proto::Error::Empty))
        );
        assert_eq!(
            validate("vantage", t, &[7]).unwrap_err().reason(),
            "unknown_version"
        );
        assert_eq!(
            validate("vantage", t, &[1, 1]).unwrap_err().reason(),
            "malformed"
        );
        assert_eq!(
            validate("vantage", t, &vec![1; MAX_PAYLOAD + 1])
                .unwrap_err()
                .reason(),
            "oversized"
        );
        assert_eq!(
            validate("vantage", "x/y", &[1]).unwrap_err().reason(),
            "bad_topic"
        );
        // A valid empty batch is accepted.
        assert_eq!(validate("vantage", t, &[1, 5, 0]), Ok("eu/pi".to_owned()));
        assert_eq!(
            validate("vantage", t, &[2, 5, 0, 0]),
            Ok("eu/pi".to_owned())
        );
    }
}
