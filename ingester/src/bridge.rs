//! The bridge stage: MQTT → validate → Kafka, acknowledging MQTT only after Kafka confirmed.
//!
//! Tasks (one owner per socket, after rumqttc's own examples):
//! - the event-loop task alone polls rumqttc and forwards incoming PUBLISH packets into a bounded
//!   channel, waiting when it is full (back-pressure down to the TCP socket); it never awaits
//!   `publish`/`ack`, and the worker never awaits rumqttc, so neither can wait on the other;
//! - the worker takes each message, validates it (topic → region and agent, frame decodes), and
//!   produces it to the results topic, or to the dead-letter topic with a reason. Deliveries run
//!   concurrently (up to `mqtt.max_in_flight`) in a `FuturesOrdered`, so acknowledgements leave in
//!   receive order (MQTT requires it) and each only after Kafka's delivery report.
//!
//! Durability: a message not yet confirmed by Kafka is not acknowledged; the broker keeps it in
//! the bridge's persistent session (`clean_session = false`) and redelivers it after a restart.
//! While Kafka is unavailable, deliveries retry, nothing is acknowledged, and once `max_in_flight`
//! messages wait the bridge stops taking more: the broker holds the rest.
//!
//! An acknowledgement is only sent on the connection the message arrived on (its *epoch*): after
//! a reconnect the broker redelivers what was not acknowledged, and a late PUBACK with an old
//! packet id could otherwise acknowledge a different message if the broker lost the session.
//!
//! Several bridges split the stream in one of two ways. `mqtt.partition = "i/n"`: each bridge
//! subscribes to everything with its own persistent session, produces the topics that hash to
//! its slot and acknowledges the rest at once; survives broker restarts, costs `n` copies between
//! broker and bridges. `mqtt.shared_group`: a shared subscription (`$share/<group>/...`, honoured
//! by Mosquitto for MQTT 3.1.1 clients too) delivers each message to one bridge; but Mosquitto
//! 2.0 does not persist shared subscriptions, so after a broker restart messages published
//! before the bridges re-subscribe are dropped (seen with 2.0.11; the crash test therefore uses
//! `partition`). Either way each bridge keeps its own persistent session, so what a crashed
//! bridge had not acknowledged waits for it to come back (eclipse-mosquitto/mosquitto#2662: with
//! non-persistent members of a shared group such messages are lost).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vantage_common::backoff::Backoff;
use vantage_common::signal::sleep_unless_stopped;
use vantage_proto::topic::{Channel, Topic};

use futures::stream::{FuturesOrdered, StreamExt};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::kafka;
use crate::ratelimit::RateLimit;

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
    /// Delivered to Kafka, but received on an earlier connection, so not acknowledged: the
    /// broker redelivers these (duplicates the sink absorbs).
    pub stale: u64,
    /// Acknowledged without producing: another bridge's slot (`mqtt.partition`).
    pub skipped: u64,
    /// End-to-end ack frames published to agents (`mqtt.end_to_end_acks`).
    pub e2e_acks: u64,
    /// End-to-end ack frames rumqttc's queue had no room for (the agent re-sends those frames).
    pub e2e_acks_dropped: u64,
}

/// Live state other tasks (tests, a future health endpoint) can watch while the bridge runs.
#[derive(Debug, Default)]
pub struct BridgeState {
    /// Set once the broker acknowledged the subscription: from then on nothing published on the
    /// results topics is missed, even across bridge restarts (persistent session).
    pub subscribed: AtomicBool,
    /// Connected to the broker right now.
    pub connected: AtomicBool,
    /// Connections made so far; a message is acknowledged only on the one it arrived on.
    pub epoch: AtomicU64,
    /// Messages received, in total.
    pub received: AtomicU64,
    /// Messages acknowledged to the broker, in total.
    pub acked: AtomicU64,
    /// Messages sent to the dead-letter topic, in total.
    pub dead_lettered: AtomicU64,
    /// The Kafka producer's health (`kafka::ProducerHealth`), refreshed every second.
    pub kafka: std::sync::Mutex<kafka::ProducerHealth>,
}

impl BridgeState {
    /// The Kafka producer's health as last refreshed.
    pub fn kafka_health(&self) -> kafka::ProducerHealth {
        *self.kafka.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What happened to one MQTT message.
enum Disposition {
    Produced,
    DeadLettered,
    /// Another bridge's slot; acknowledged without producing.
    Skipped,
    /// Shutdown came before Kafka confirmed: must not be acknowledged.
    Abandoned,
}

/// Why a payload was rejected; the string goes into the dead-letter reason header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// The topic is not `<prefix>/v1/results/<region>/<agent>` (or `.../status/...`) with valid
    /// names.
    BadTopic,
    Oversized,
    Frame(vantage_proto::Error),
    /// A status frame whose agent or region differs from the topic it arrived on.
    ClaimsMismatch,
}

impl Reject {
    pub fn reason(self) -> &'static str {
        match self {
            Reject::BadTopic => "bad_topic",
            Reject::Oversized => "oversized",
            Reject::Frame(e) => e.reason(),
            Reject::ClaimsMismatch => "claims_mismatch",
        }
    }
}

/// What a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `<prefix>/v1/results/<region>/<agent>`: result batches.
    Results,
    /// `<prefix>/v1/status/<region>/<agent>`: agent status (announce, heartbeat, goodbye, will).
    Status,
}

/// Kafka header that marks a status record (result records have none).
pub const KIND_HEADER: &str = "vantage-kind";

/// Region and agent from a results topic, or None if the topic is not one.
pub fn parse_topic<'t>(prefix: &'t str, topic: &'t str) -> Option<(&'t str, &'t str)> {
    match parse_any_topic(prefix, topic)? {
        (Kind::Results, region, agent) => Some((region, agent)),
        _ => None,
    }
}

/// Kind, region and agent of a topic the bridge subscribes to (layout: `vantage_proto::topic`).
pub fn parse_any_topic<'t>(prefix: &'t str, topic: &'t str) -> Option<(Kind, &'t str, &'t str)> {
    let t = Topic::parse(prefix, topic)?;
    let kind = match t.channel {
        Channel::Results => Kind::Results,
        Channel::Status => Kind::Status,
        Channel::Targets | Channel::Acks => return None,
    };
    Some((kind, t.region, t.agent?))
}

/// Checks one payload; on success returns the kind and the Kafka key `region/agent`.
///
/// Agent and region come from the topic, which the broker's ACL ties to the agent's identity; a
/// status frame's own claims must agree with it.
pub fn validate(prefix: &str, topic: &str, payload: &[u8]) -> Result<(Kind, String), Reject> {
    let (kind, region, agent) = parse_any_topic(prefix, topic).ok_or(Reject::BadTopic)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(Reject::Oversized);
    }
    match kind {
        Kind::Results => {
            vantage_proto::decode(payload).map_err(Reject::Frame)?;
        }
        Kind::Status => {
            let status = vantage_proto::control::decode_status(payload).map_err(Reject::Frame)?;
            if status.agent_id.as_str() != agent || status.region.as_str() != region {
                return Err(Reject::ClaimsMismatch);
            }
        }
    }
    Ok((kind, format!("{region}/{agent}")))
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
    // Kafka may be down at start; the bridge still starts and simply acknowledges nothing until
    // deliveries succeed (producing does not need the admin API).
    let ensured = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(15), kafka::ensure_topics(&kafka_config)) => r,
        // Nothing taken from MQTT yet: nothing to finish.
        _ = shutdown.cancelled() => {
            tracing::warn!("shutdown while waiting for Kafka at start; bridge stopped");
            return Ok(BridgeStats::default());
        }
    };
    match ensured {
        Ok(Ok(())) => {}
        // The cluster cannot hold the configured replication: running on would let the broker
        // auto-create the topics with its own defaults.
        Ok(Err(kafka::TopicError::Config { key, reason })) => {
            return Err(ConfigError::Invalid {
                file: config.file.clone(),
                key: key.into(),
                reason,
            }
            .into())
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot create Kafka topics; continuing"),
        Err(_) => tracing::warn!("Kafka did not answer topic creation in 15 s; continuing"),
    }
    let producer = Arc::new(kafka::Producer::new(&kafka_config)?);

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
    crate::tls::mqtt_transport(&mut options, mqtt.tls.as_ref(), &mqtt.host);
    let (client, eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
    let (tx, mut rx) = mpsc::channel::<(u64, Publish)>(forward_capacity(mqtt.max_in_flight));
    let events_stop = CancellationToken::new();
    let filter = mqtt.results_filter();
    let filters = vec![filter.clone(), mqtt.status_filter()];
    let event_task = tokio::spawn(poll_events(
        eventloop,
        client.clone(),
        filters,
        tx,
        state.clone(),
        events_stop.clone(),
    ));
    tracing::info!(filter, topic = kafka_config.topic, "bridge running");

    let outputs = Arc::new(Outputs {
        prefix: mqtt.topic_prefix.clone(),
        topic: kafka_config.topic.clone(),
        dead_letter_topic: kafka_config.dead_letter_topic.clone(),
        producer: producer.clone(),
        rejections: RateLimit::new("frame rejected", Duration::from_secs(1)),
    });
    let hard_stop = CancellationToken::new();
    let mut stats = BridgeStats::default();
    let mut pending = FuturesOrdered::new();
    // Acknowledgements due, in receive order, waiting for room in rumqttc's request queue. The
    // worker never awaits that queue (the event loop may be waiting for this worker: see
    // `poll_events`). It stays short: the event loop serves requests between every few reads.
    let mut acks: VecDeque<(u64, Publish)> = VecDeque::new();
    let mut taking = true;
    let mut grace = Box::pin(tokio::time::sleep(Duration::from_secs(365 * 86_400)));
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    let mut health = tokio::time::interval(Duration::from_secs(1));
    let mut retry_acks = tokio::time::interval(Duration::from_millis(5));
    // End-to-end acknowledgements (`mqtt.end_to_end_acks`): what Kafka confirmed, per agent.
    let mut book = mqtt
        .end_to_end_acks
        .then(|| crate::ack_book::AckBook::new(&mqtt.topic_prefix, crate::ack_book::LINGER));
    loop {
        let ack_due = book.as_ref().and_then(|b| b.next_due());
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let ack_timer =
            tokio::time::sleep_until(ack_due.map_or(far, tokio::time::Instant::from_std));
        tokio::select! {
            _ = progress.tick() => {
                tracing::debug!(?stats, pending = pending.len(), queued = rx.len(), acks = acks.len(), "bridge progress");
            }
            _ = retry_acks.tick(), if !acks.is_empty() => {}
            _ = ack_timer, if ack_due.is_some() => {}
            _ = health.tick() => {
                let h = producer.health();
                let m = crate::metrics::bridge();
                m.kafka_waiting.set(h.waiting as i64);
                m.kafka_stalled.set(i64::from(h.stalled));
                let was = std::mem::replace(&mut *state.kafka.lock().unwrap_or_else(|e| e.into_inner()), h);
                if h.stalled && !was.stalled {
                    tracing::warn!(waiting = h.waiting, waiting_for = ?h.waiting_for, "Kafka confirms no delivery (producer stalled or Kafka unreachable)");
                } else if was.stalled && !h.stalled {
                    tracing::info!(replacements = h.replacements, "Kafka confirms deliveries again");
                }
            }
            // Stop taking input at shutdown; what is already in flight still completes.
            _ = shutdown.cancelled(), if taking => {
                taking = false;
                grace.as_mut().reset(tokio::time::Instant::now() + SHUTDOWN_GRACE);
            }
            _ = &mut grace, if !taking => hard_stop.cancel(),
            Some((epoch, publish)) = rx.recv(), if taking && pending.len() < mqtt.max_in_flight => {
                stats.received += 1;
                state.received.fetch_add(1, Ordering::Relaxed);
                crate::metrics::bridge().received.inc();
                let mine = mqtt.handles(&publish.topic);
                // The receive time becomes the Kafka timestamp of whatever this message turns
                // into, however often its delivery is retried: the sink orders statuses by it.
                let received_ms = crate::fleet::now_ms();
                pending.push_back(handle(mine, epoch, publish, received_ms, outputs.clone(), hard_stop.clone()));
            }
            Some((epoch, publish, disposition)) = pending.next(), if !pending.is_empty() => {
                match disposition {
                    Disposition::Produced => {
                        stats.produced += 1;
                        if let Some(book) = &mut book {
                            note_delivered(book, &mqtt.topic_prefix, &publish);
                        }
                    }
                    Disposition::Skipped => stats.skipped += 1,
                    Disposition::DeadLettered => {
                        stats.dead_lettered += 1;
                        state.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    }
                    // Acknowledging anything after this one would acknowledge out of order.
                    Disposition::Abandoned => break,
                }
                // Only the packet id and QoS matter for the acknowledgement.
                let ack = Publish { topic: String::new(), payload: Default::default(), ..publish };
                acks.push_back((epoch, ack));
            }
        }
        send_acks(&client, &state, &mut acks, &mut stats);
        if let Some(book) = &mut book {
            let done = !taking && pending.is_empty();
            publish_e2e_acks(&client, book, std::time::Instant::now(), done, &mut stats);
        }
        if !taking && pending.is_empty() && acks.is_empty() {
            break;
        }
    }
    // Last acknowledgements (bounded wait), then DISCONNECT, which queues behind them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !acks.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        send_acks(&client, &state, &mut acks, &mut stats);
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), client.disconnect()).await;
    producer.flush(Duration::from_secs(1));
    if tokio::time::timeout(Duration::from_secs(5), event_task)
        .await
        .is_err()
    {
        events_stop.cancel();
    }
    tracing::info!(?stats, "bridge stopped");
    Ok(stats)
}

/// Enters a delivered results frame into the book (status frames carry no sequence numbers).
fn note_delivered(book: &mut crate::ack_book::AckBook, prefix: &str, publish: &Publish) {
    let Some((Kind::Results, region, agent)) = parse_any_topic(prefix, &publish.topic) else {
        return;
    };
    // It decoded in `validate` before it was produced; decoding twice is cheaper than carrying
    // the batch through the delivery future.
    if let Ok(batch) = vantage_proto::decode(&publish.payload) {
        let ranges = vantage_proto::ack::frame_ranges(&batch);
        book.delivered(
            region,
            agent,
            batch.boot_id,
            &ranges,
            std::time::Instant::now(),
        );
    }
}

/// Publishes the ack frames that are due (QoS 0, not retained), without waiting: a frame that
/// finds rumqttc's queue full is dropped and counted; its agent re-sends after its ack timeout.
fn publish_e2e_acks(
    client: &AsyncClient,
    book: &mut crate::ack_book::AckBook,
    now: std::time::Instant,
    all: bool,
    stats: &mut BridgeStats,
) {
    for due in book.due(now, all) {
        match client.try_publish(due.topic, QoS::AtMostOnce, false, due.frame) {
            Ok(()) => {
                stats.e2e_acks += 1;
                crate::metrics::bridge().e2e_acks.inc();
            }
            Err(_) => {
                stats.e2e_acks_dropped += 1;
                crate::metrics::bridge().e2e_acks_dropped.inc();
            }
        }
    }
}

/// rumqttc's request queue: room for many acknowledgements, so `try_ack` rarely has to leave one
/// in the worker's queue for the retry tick.
const REQUEST_QUEUE: usize = 8192;

/// The channel from the event loop to the worker. Mosquitto 2.0.11 does not keep to its inflight
/// window (`max_inflight_messages`) once acknowledgements flow (eclipse-mosquitto/mosquitto#2301;
/// measured: 4,851 of 5,000 messages outstanding with a window of 100), so this bound is reached
/// under load; the event loop then waits (see `poll_events`).
fn forward_capacity(max_in_flight: usize) -> usize {
    (4 * max_in_flight).max(1024)
}

/// Hands due acknowledgements to rumqttc without waiting. One whose message arrived on an earlier
/// connection is dropped: the broker redelivers that message (see the module docs).
fn send_acks(
    client: &AsyncClient,
    state: &BridgeState,
    acks: &mut VecDeque<(u64, Publish)>,
    stats: &mut BridgeStats,
) {
    while let Some((epoch, ack)) = acks.front() {
        let current = state.connected.load(Ordering::Acquire)
            && state.epoch.load(Ordering::Acquire) == *epoch;
        if !current {
            stats.stale += 1;
            crate::metrics::bridge().stale.inc();
            acks.pop_front();
            continue;
        }
        if client.try_ack(ack).is_err() {
            return; // queue full: the retry tick comes back
        }
        acks.pop_front();
        stats.acked += 1;
        crate::metrics::bridge().acked.inc();
        state.acked.fetch_add(1, Ordering::Relaxed);
    }
}

/// Validates and delivers one message; resolves when its fate is durable in Kafka.
async fn handle(
    mine: bool,
    epoch: u64,
    publish: Publish,
    received_ms: i64,
    out: Arc<Outputs>,
    stop: CancellationToken,
) -> (u64, Publish, Disposition) {
    if !mine {
        crate::metrics::bridge().skipped.inc();
        return (epoch, publish, Disposition::Skipped);
    }
    let started = std::time::Instant::now();
    let delivered = match validate(&out.prefix, &publish.topic, &publish.payload) {
        Ok((kind, key)) => {
            let headers = (kind == Kind::Status).then(|| {
                rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                    key: KIND_HEADER,
                    value: Some("status"),
                })
            });
            let ok = kafka::produce_until_delivered_at(
                &out.producer,
                &out.topic,
                Some(key.as_bytes()),
                &publish.payload,
                headers.as_ref(),
                Some(received_ms),
                &stop,
            )
            .await;
            if ok {
                let results = (kind == Kind::Results).then_some(&publish.payload[..]);
                crate::metrics::bridge().produced(results, started.elapsed());
            }
            ok.then_some(Disposition::Produced)
        }
        Err(reject) => {
            if let Some(suppressed) = out.rejections.allow() {
                tracing::warn!(topic = %publish.topic, bytes = publish.payload.len(), reason = reject.reason(), suppressed, "frame rejected");
            }
            let headers =
                kafka::dead_letter_headers("bridge", reject.reason(), Some(&publish.topic));
            let ok = kafka::produce_until_delivered_at(
                &out.producer,
                &out.dead_letter_topic,
                None,
                &publish.payload,
                Some(&headers),
                Some(received_ms),
                &stop,
            )
            .await;
            if ok {
                crate::metrics::bridge().dead_lettered(reject.reason());
            }
            ok.then_some(Disposition::DeadLettered)
        }
    };
    (epoch, publish, delivered.unwrap_or(Disposition::Abandoned))
}

/// Where [`handle`] sends messages.
struct Outputs {
    prefix: String,
    topic: String,
    dead_letter_topic: String,
    producer: Arc<kafka::Producer>,
    /// Rejected frames arrive at the input's rate: one log line per second at most.
    rejections: RateLimit,
}

/// The only task that polls the MQTT event loop.
async fn poll_events(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filters: Vec<String>,
    tx: mpsc::Sender<(u64, Publish)>,
    state: Arc<BridgeState>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    let mut rng = fastrand::Rng::new();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                // Back-pressure: while the worker's input is full this task stops polling, so
                // rumqttc stops reading the socket and the broker has to hold what it would send
                // (Mosquitto 2.0.11 does not keep to its inflight window, see `forward_capacity`).
                // Waiting here cannot deadlock: the worker never waits on rumqttc (`send_acks`),
                // so it always frees room as long as Kafka delivers. A closed channel means the
                // worker stopped; the message stays unacknowledged with the broker.
                let epoch = state.epoch.load(Ordering::Acquire);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    sent = tx.send((epoch, publish)) => if sent.is_err() {
                        tracing::debug!("worker gone, not forwarding");
                    },
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to MQTT broker"
                );
                backoff.reset();
                state.epoch.fetch_add(1, Ordering::AcqRel);
                state.connected.store(true, Ordering::Release);
                crate::metrics::bridge().connected(true);
                // (Re)subscribe on every connect; try_subscribe never waits, so this loop cannot
                // deadlock on rumqttc's request queue.
                let subscriptions = filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                if let Err(e) = client.try_subscribe_many(subscriptions) {
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
                    tracing::error!(?ack.return_codes, ?filters, "broker refused the subscription");
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                state.connected.store(false, Ordering::Release);
                // Not subscribed again until the next connection's SUBACK (what /readyz reports).
                state.subscribed.store(false, Ordering::Release);
                crate::metrics::bridge().connected(false);
                // Jittered, so that bridges do not reconnect in lockstep.
                let wait = backoff.next_jittered_pause(&mut rng);
                tracing::warn!(error = %e, retry_in = ?wait, "MQTT connection error");
                if !sleep_unless_stopped(&stop, wait).await {
                    return;
                }
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
        let ok = Ok((Kind::Results, "eu/pi".to_owned()));
        assert_eq!(validate("vantage", t, &[1, 5, 0]), ok);
        assert_eq!(validate("vantage", t, &[2, 5, 0, 0]), ok);
    }

    #[test]
    fn status_claims_must_match_the_topic() {
        use vantage_proto::control::{encode_status, AgentState, AgentStatus, MAX_STATUS_LEN};
        let status = |agent: &str, region: &str| {
            let s = AgentStatus {
                state: AgentState::Heartbeat,
                agent_id: agent.try_into().unwrap(),
                region: region.try_into().unwrap(),
                boot_id: 1,
                version: "0.1.0".try_into().unwrap(),
                sent_at_ms: 1,
                max_concurrency: 1,
                buffer_capacity: 1,
                targets: 0,
                pending_results: 0,
                region_set_generation: 0,
                agent_set_generation: 0,
                rejection: None,
            };
            let mut buf = [0u8; MAX_STATUS_LEN];
            encode_status(&s, &mut buf).unwrap().to_vec()
        };
        let t = "vantage/v1/status/eu/pi";
        assert_eq!(
            validate("vantage", t, &status("pi", "eu")),
            Ok((Kind::Status, "eu/pi".to_owned()))
        );
        // Another agent's identity, or another region, on this agent's topic.
        for forged in [status("pi-2", "eu"), status("pi", "us")] {
            assert_eq!(
                validate("vantage", t, &forged).unwrap_err().reason(),
                "claims_mismatch"
            );
        }
        // A results frame on a status topic does not decode as a status.
        assert_eq!(
            validate("vantage", t, &[2, 5, 0, 0]).unwrap_err().reason(),
            "unknown_version"
        );
        assert_eq!(
            parse_any_topic("vantage", "vantage/v1/status/eu/pi"),
            Some((Kind::Status, "eu", "pi"))
        );
        assert_eq!(parse_any_topic("vantage", "vantage/v1/targets/eu/pi"), None);
    }
}
