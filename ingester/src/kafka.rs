//! Kafka plumbing shared by the stages: client settings, topic creation, and the dead-letter path.

use std::time::Duration;
use vantage_common::backoff::Backoff;
use vantage_common::signal::sleep_unless_stopped;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _, PurgeConfig};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

pub use crate::config::kafka::DEFAULT_STALL_TIMEOUT;
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
    // After the pass-through: these two are the durability contract (`config::kafka::refused_property`).
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

/// How often a waiting delivery checks whether the producer stalled.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Longest wait between two replacements of a producer that delivers nothing.
const MAX_STALL_WAIT: Duration = Duration::from_secs(300);

/// How the producer is doing, for `/readyz` and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProducerHealth {
    /// Deliveries waiting for Kafka's confirmation now (retries included).
    pub waiting: usize,
    /// Since the last confirmed delivery (or since deliveries started waiting, or since the
    /// last replacement); zero while nothing waits.
    pub waiting_for: Duration,
    /// Nothing confirmed for `kafka.stall_timeout` while deliveries wait.
    pub stalled: bool,
    /// Instances replaced so far (stalled or fatal).
    pub replacements: u64,
}

/// The current librdkafka instance and what its deliveries have done.
struct Current {
    generation: u64,
    instance: std::sync::Arc<FutureProducer>,
    /// Deliveries between their first attempt and Kafka's confirmation (or shutdown).
    waiting: usize,
    /// Last confirmed delivery, or when deliveries started waiting, or the last replacement:
    /// the next replacement is measured from here.
    progress_at: std::time::Instant,
    /// Last confirmed delivery, or when deliveries started waiting (what `/readyz` reports).
    confirmed_at: std::time::Instant,
    /// Replacements for a stall since the last confirmed delivery: each doubles the next wait.
    stall_replacements: u32,
    replacements: u64,
}

/// A producer shared by many concurrent deliveries that replaces its librdkafka instance when
/// it breaks.
///
/// - An idempotent producer can hit errors that librdkafka declares fatal (e.g. an out-of-order
///   sequence after broker data loss); every later send on that instance fails.
/// - An instance can also wedge without any error: when a broker in controlled shutdown answers
///   a metadata request with an empty broker list (a single broker, or all of them, restarting
///   gracefully), librdkafka 2.12 decommissions every broker it knows
///   (`rd_kafka_metadata_decommission_unavailable_brokers`), and the re-bootstrap it schedules
///   when all brokers are down is cancelled by that same metadata response's success; with no
///   broker left it sends no metadata request, so its time-based re-bootstrap never starts.
///   The instance then sits without a broker for good, every delivery waits until
///   `message.timeout.ms` and fails, and so does every retry (seen in `make test-crash`; the
///   bridge never recovered; `tests/delivery.rs` `bridge_recovers_from_a_wedged_producer`).
///
/// So deliveries watch the instance: when some wait and none was confirmed for
/// `kafka.stall_timeout` (doubling after each replacement that brought no delivery, up to 5
/// min), the instance is replaced by a fresh one, which bootstraps from `kafka.brokers` again,
/// and the waiting deliveries are sent again on it (at-least-once: the old instance may have
/// written some, and the sink's natural key absorbs such copies). Nothing is acknowledged
/// upstream before a confirmation, so a replacement never loses a message.
pub struct Producer {
    config: KafkaConfig,
    current: std::sync::Mutex<Current>,
}

/// Counts one delivery as waiting for as long as it lives.
struct Waiting<'p>(&'p Producer);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut c = self.0.lock();
        c.waiting = c.waiting.saturating_sub(1);
    }
}

impl Producer {
    pub fn new(config: &KafkaConfig) -> Result<Producer, KafkaError> {
        Ok(Producer {
            config: config.clone(),
            current: std::sync::Mutex::new(Current {
                generation: 0,
                instance: std::sync::Arc::new(producer(config)?),
                waiting: 0,
                progress_at: std::time::Instant::now(),
                confirmed_at: std::time::Instant::now(),
                stall_replacements: 0,
                replacements: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current instance and its generation.
    fn get(&self) -> (u64, std::sync::Arc<FutureProducer>) {
        let c = self.lock();
        (c.generation, c.instance.clone())
    }

    /// A delivery starts waiting; it stops when the guard is dropped.
    fn waiting(&self) -> Waiting<'_> {
        let mut c = self.lock();
        if c.waiting == 0 {
            // Nothing was asked of the instance until now: it has not failed to deliver.
            c.progress_at = std::time::Instant::now();
            c.confirmed_at = c.progress_at;
        }
        c.waiting += 1;
        Waiting(self)
    }

    /// Kafka confirmed a delivery.
    fn delivered(&self) {
        let mut c = self.lock();
        c.progress_at = std::time::Instant::now();
        c.confirmed_at = c.progress_at;
        c.stall_replacements = 0;
    }

    /// The generation of the current instance.
    fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// How long deliveries may wait with none confirmed before the instance is replaced.
    fn stall_wait(&self, c: &Current) -> Duration {
        let doubled = self
            .config
            .stall_timeout
            .saturating_mul(1 << c.stall_replacements.min(8));
        doubled.min(MAX_STALL_WAIT.max(self.config.stall_timeout))
    }

    /// Health now.
    pub fn health(&self) -> ProducerHealth {
        let c = self.lock();
        let waiting_for = if c.waiting > 0 {
            c.confirmed_at.elapsed()
        } else {
            Duration::ZERO
        };
        ProducerHealth {
            waiting: c.waiting,
            waiting_for,
            stalled: c.waiting > 0 && waiting_for >= self.config.stall_timeout,
            replacements: c.replacements,
        }
    }

    /// Replaces instance `generation` if it is still current and stalled. False when
    /// `generation` is no longer current: its deliveries must be sent again.
    fn watch(&self, generation: u64) -> bool {
        let mut c = self.lock();
        if c.generation != generation {
            return false;
        }
        let waited = c.progress_at.elapsed();
        if c.waiting == 0 || waited < self.stall_wait(&c) {
            return true;
        }
        c.stall_replacements = c.stall_replacements.saturating_add(1);
        let reason = format!(
            "{} deliveries waiting, none confirmed for {:.0?}",
            c.waiting, waited
        );
        self.replace(&mut c, "stalled", &reason);
        c.generation == generation
    }

    /// Replaces instance `generation` if it is still current and has a fatal error.
    fn recover(&self, generation: u64, broken: &FutureProducer) {
        let Some((code, reason)) = broken.client().fatal_error() else {
            return;
        };
        let mut c = self.lock();
        if c.generation == generation {
            self.replace(&mut c, "fatal", &format!("{code:?}: {reason}"));
        }
    }

    /// Puts a fresh instance in place of the current one (which is purged, so nothing waits on
    /// it any more, and destroyed off the runtime once unused: `rd_kafka_destroy` may block).
    fn replace(&self, c: &mut Current, kind: &'static str, reason: &str) {
        // The next stall is measured from now, also when the new instance cannot be created.
        c.progress_at = std::time::Instant::now();
        let fresh = match producer(&self.config) {
            Ok(p) => std::sync::Arc::new(p),
            Err(e) => {
                tracing::error!(error = %e, kind, reason, "cannot create a new Kafka producer");
                return;
            }
        };
        let old = std::mem::replace(&mut c.instance, fresh);
        c.generation += 1;
        c.replacements += 1;
        crate::metrics::kafka_producer_replaced(kind);
        tracing::error!(
            kind,
            reason,
            replacements = c.replacements,
            next_after = ?self.stall_wait(c),
            "Kafka producer replaced by a fresh one; waiting deliveries are sent again"
        );
        old.purge(PurgeConfig::default().queue().inflight().non_blocking());
        let retired = std::thread::Builder::new()
            .name("kafka-retire".into())
            .spawn(move || {
                // Deliveries still holding it drop it within a watch tick.
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while std::sync::Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                drop(old);
            });
        if let Err(e) = retired {
            tracing::warn!(error = %e, "cannot start a thread to destroy the old Kafka producer");
        }
    }

    /// Waits until every message handed to librdkafka is delivered or `timeout` passes.
    pub fn flush(&self, timeout: Duration) {
        let (_, p) = self.get();
        if let Err(e) = rdkafka::producer::Producer::flush(&*p, timeout) {
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
    let _waiting = producer.waiting();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
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
        // bounded by message.timeout.ms, and by the stall watch below.
        let send = instance.send(record, Duration::from_secs(5));
        tokio::pin!(send);
        let mut watch =
            tokio::time::interval_at(tokio::time::Instant::now() + WATCH_EVERY, WATCH_EVERY);
        let sent = loop {
            tokio::select! {
                r = &mut send => break Some(r),
                _ = stop.cancelled() => return false,
                // Replaced (by this delivery's watch or another's): send it again at once.
                _ = watch.tick() => if !producer.watch(generation) {
                    break None;
                },
            }
        };
        match sent {
            Some(Ok(_)) => {
                producer.delivered();
                return true;
            }
            None => {}
            // Purged with the instance it was waiting on: send it again at once.
            Some(Err(_)) if producer.generation() != generation => {}
            Some(Err((e, _))) => {
                producer.recover(generation, &instance);
                let pause = backoff.next_pause();
                tracing::warn!(topic, error = %e, retry_in = ?pause, "Kafka delivery failed");
                if !sleep_unless_stopped(stop, pause).await {
                    return false;
                }
            }
        }
    }
}

/// Whether librdkafka's statistics list any broker to talk to (one from `bootstrap.servers` or
/// learned from metadata), as opposed to only its internal ones.
pub fn has_brokers(stats: &rdkafka::statistics::Statistics) -> bool {
    stats
        .brokers
        .values()
        .any(|b| matches!(b.source.as_str(), "learned" | "configured"))
}

/// Gives a client that lost every broker (the wedge described at [`Producer`]) the brokers of
/// `kafka.brokers` again, which is what librdkafka's own re-bootstrap does (its timer callback
/// calls `rd_kafka_brokers_add0` with `bootstrap.servers`). For clients that cannot simply be
/// replaced, like the sink's consumer in its group. True if a broker was added.
pub fn re_add_brokers<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    brokers: &str,
) -> bool {
    let Ok(list) = std::ffi::CString::new(brokers) else {
        return false;
    };
    // SAFETY: `native_ptr` is the handle of `client`, alive for this borrow; librdkafka's
    // `rd_kafka_brokers_add` may be called from any thread at any time, copies what it needs
    // from the string (which outlives the call) and only reads it (rdkafka.h). rust-rdkafka has
    // no safe wrapper for it.
    let added =
        unsafe { rdkafka::bindings::rd_kafka_brokers_add(client.native_ptr(), list.as_ptr()) };
    added > 0
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(stall: &str) -> KafkaConfig {
        // Port 1 on loopback: nothing listens, so no delivery is ever confirmed.
        let text = format!(
            "[kafka]\nbrokers = \"127.0.0.1:1\"\nstall_timeout = \"{stall}\"\n\
             [kafka.properties]\n\"reconnect.backoff.max.ms\" = \"100\"\n"
        );
        crate::Config::parse(&text, std::path::Path::new("t.toml"))
            .unwrap()
            .kafka()
            .unwrap()
            .clone()
    }

    /// Deliveries that wait with none confirmed make the producer replace its instance after
    /// `stall_timeout`, then after twice that, and `health` says stalled meanwhile; nothing
    /// waiting, nothing stalls.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_producer_that_confirms_nothing_is_replaced_with_backoff() {
        let producer = std::sync::Arc::new(Producer::new(&config("1s")).unwrap());
        assert_eq!(producer.health(), ProducerHealth::default());
        let stop = CancellationToken::new();
        let delivery = tokio::spawn({
            let (producer, stop) = (producer.clone(), stop.clone());
            async move { produce_until_delivered(&producer, "t", None, b"x", None, &stop).await }
        });
        // When each replacement happened (polled), and what health said just before the first.
        let started = std::time::Instant::now();
        let mut at = Vec::new();
        let mut before_first = producer.health();
        while at.len() < 2 && started.elapsed() < Duration::from_secs(15) {
            let h = producer.health();
            if h.replacements as usize > at.len() {
                at.push(started.elapsed());
            } else if at.is_empty() {
                before_first = h;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(at.len(), 2, "replaced {} times in 15 s", at.len());
        assert_eq!(before_first.waiting, 1, "{before_first:?}");
        // Waits are lower bounds: 1 s before the first, 2 s (doubled) before the second.
        assert!(at[0] >= Duration::from_millis(950), "{at:?}");
        assert!(at[1] - at[0] >= Duration::from_millis(1950), "{at:?}");
        // Stalled counts from the last confirmation, which a replacement does not reset.
        let h = producer.health();
        assert!(
            h.stalled && h.waiting_for >= Duration::from_secs(3),
            "{h:?}"
        );
        stop.cancel();
        assert!(!delivery.await.unwrap(), "stopped, so not delivered");
        let h = producer.health();
        assert_eq!((h.waiting, h.stalled), (0, false), "{h:?}");
    }

    #[test]
    fn stall_timeout_has_a_floor() {
        let text = "[kafka]\nbrokers = \"127.0.0.1:9092\"\nstall_timeout = \"500ms\"\n";
        let e = crate::Config::parse(text, std::path::Path::new("t.toml")).unwrap_err();
        assert!(e.to_string().contains("kafka.stall_timeout"), "{e}");
    }
}
