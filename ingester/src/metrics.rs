//! Prometheus metrics of the ingester stages (docs/ingester.md lists every one).
//!
//! One registry per process, created on first use: a process runs one stage in production, and
//! the stages touch the metrics through short hooks (`metrics::bridge().received.inc()`) instead
//! of threading a handle through every function. Names follow the Prometheus conventions:
//! `vantage_<stage>_<what>_<unit>`, counters end in `_total` (added by the client library),
//! durations are seconds. Exposed in OpenMetrics text by `http.rs` at `/metrics`.
//!
//! Built on `prometheus-client`, the official Rust client (github.com/prometheus/client_rust).

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Label of dead letters: why the input was rejected (the `vantage-reason` header).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Label of per-partition gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub topic: String,
    pub partition: String,
}

/// Label of per-agent counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabel {
    pub region: String,
    pub agent: String,
}

/// Label of Kafka producer replacements: `stalled` or `fatal` (`kafka::Producer`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// Label of the build info gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: String,
}

/// The bridge's metrics.
pub struct BridgeMetrics {
    /// MQTT messages received on the results topics.
    pub received: Counter,
    /// Messages produced to the results topic (Kafka confirmed them).
    pub produced: Counter,
    /// Results inside the produced messages.
    pub results_produced: Counter,
    /// Messages produced to the dead-letter topic, by reason.
    pub dead_letters: Family<ReasonLabel, Counter>,
    /// Messages acknowledged to the MQTT broker.
    pub acked: Counter,
    /// Messages of another bridge's `partition` slot, acknowledged without producing.
    pub skipped: Counter,
    /// Delivered to Kafka but not acknowledged: received on an earlier MQTT connection.
    pub stale: Counter,
    /// End-to-end ack frames published to agents.
    pub e2e_acks: Counter,
    /// End-to-end ack frames dropped because rumqttc's queue was full.
    pub e2e_acks_dropped: Counter,
    /// Time from taking a message to Kafka's delivery report, retries included.
    pub delivery_seconds: Histogram,
    /// Connections to the MQTT broker (the first one and every reconnect).
    pub mqtt_connections: Counter,
    /// Failed MQTT connection attempts and dropped connections.
    pub mqtt_connection_errors: Counter,
    /// 1 while connected to the MQTT broker.
    pub mqtt_connected: Gauge,
    /// Deliveries waiting for Kafka's confirmation (`kafka::ProducerHealth`).
    pub kafka_waiting: Gauge,
    /// 1 while deliveries wait and none was confirmed for `kafka.stall_timeout`.
    pub kafka_stalled: Gauge,
}

/// The sink's metrics.
pub struct SinkMetrics {
    /// Kafka messages consumed (each a frame of up to 32 results and gaps).
    pub consumed: Counter,
    /// Result rows inserted into PostgreSQL.
    pub results_written: Counter,
    /// Result rows skipped because they were already stored (replays, duplicates).
    pub results_duplicate: Counter,
    /// Gap records inserted.
    pub gaps_written: Counter,
    /// Messages sent to the dead-letter topic, by reason.
    pub dead_letters: Family<ReasonLabel, Counter>,
    /// Results per PostgreSQL transaction.
    pub batch_results: Histogram,
    /// Duration of a successful PostgreSQL batch write (one transaction).
    pub write_seconds: Histogram,
    /// PostgreSQL writes that failed and were retried.
    pub write_retries: Counter,
    /// Messages between the committed offset and the end of each assigned partition.
    pub consumer_lag: Family<PartitionLabel, Gauge>,
    /// Unix time at which the last batch became durable in PostgreSQL (its offsets are
    /// committed right after). Unlike the lag, which librdkafka reports only while the sink is
    /// consuming, this stops moving whenever the sink is stuck.
    pub last_durable_batch: Gauge,
    /// Results dead-lettered because their time is outside the window around the bridge's
    /// clock (`clock.rs`), per agent.
    pub clock_skew: Family<AgentLabel, Counter>,
    /// Unix time of the last storage upkeep round that succeeded (`storage.rs`).
    pub upkeep_last_success: Gauge,
    /// Storage upkeep rounds (or reconnects) that failed.
    pub upkeep_failures: Counter,
    /// Rows left in `results_default` after the last upkeep (outside the adoption window).
    pub upkeep_default_rows: Gauge,
}

/// Label of alert deliveries: the receiver's name and how the attempt ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabel {
    pub receiver: String,
    pub result: String,
}

/// Label of alert events: firing, updated, flapping, resolved.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: String,
}

/// The alert stage's metrics (issue #16).
pub struct AlertMetrics {
    /// Evaluations completed while this process was the active evaluator.
    pub evaluations: Counter,
    /// Sessions that ended in a PostgreSQL error (the stage starts over).
    pub evaluation_errors: Counter,
    /// Duration of one evaluation of every rule.
    pub evaluation_seconds: Histogram,
    /// Incidents open, as this evaluator last saw them.
    pub incidents_open: Gauge,
    /// 1 while this process holds the evaluator lock.
    pub active: Gauge,
    /// Incident events written, by event.
    pub events: Family<EventLabel, Counter>,
    /// Delivery attempts, by receiver and result (ok, error, expired, db_error).
    pub deliveries: Family<DeliveryLabel, Counter>,
}

impl AlertMetrics {
    pub fn delivered(&self, receiver: &str, result: &str) {
        self.deliveries
            .get_or_create(&DeliveryLabel {
                receiver: receiver.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn event(&self, event: &str) {
        self.events
            .get_or_create(&EventLabel {
                event: event.to_owned(),
            })
            .inc();
    }
}

/// Which stage's metrics an endpoint exposes: a process runs one stage, and exporting the
/// other's (idle) metrics would, e.g., make every sink report `vantage_bridge_mqtt_connected 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Bridge,
    Sink,
    Alert,
}

/// Every metric of this process and the registries that expose them, one per stage.
pub struct Metrics {
    pub bridge_registry: Registry,
    pub sink_registry: Registry,
    pub alert_registry: Registry,
    pub bridge: BridgeMetrics,
    pub sink: SinkMetrics,
    pub alert: AlertMetrics,
    /// Kafka producer instances replaced, by kind; one family, exposed under each stage's name
    /// (the bridge's producer and the sink's dead-letter producer are the same code).
    pub producer_replacements: Family<KindLabel, Counter>,
}

/// A Kafka producer instance was replaced (`kind`: `stalled` or `fatal`).
pub fn kafka_producer_replaced(kind: &str) {
    METRICS
        .producer_replacements
        .get_or_create(&KindLabel {
            kind: kind.to_owned(),
        })
        .inc();
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

/// The bridge's metrics of this process.
pub fn bridge() -> &'static BridgeMetrics {
    &METRICS.bridge
}

/// The sink's metrics of this process.
pub fn sink() -> &'static SinkMetrics {
    &METRICS.sink
}

/// The alert stage's metrics of this process.
pub fn alert() -> &'static AlertMetrics {
    &METRICS.alert
}

impl Metrics {
    fn new() -> Metrics {
        let mut bridge_registry = Registry::default();
        let mut sink_registry = Registry::default();
        let mut alert_registry = Registry::default();
        let build: Family<BuildLabel, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        for registry in [
            &mut bridge_registry,
            &mut sink_registry,
            &mut alert_registry,
        ] {
            registry.register(
                "vantage_ingester_build_info",
                "Version of vantage-ingester",
                build.clone(),
            );
        }

        let bridge = BridgeMetrics {
            received: Counter::default(),
            produced: Counter::default(),
            results_produced: Counter::default(),
            dead_letters: Family::default(),
            acked: Counter::default(),
            skipped: Counter::default(),
            stale: Counter::default(),
            e2e_acks: Counter::default(),
            e2e_acks_dropped: Counter::default(),
            // 1 ms .. ~33 s
            delivery_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            mqtt_connections: Counter::default(),
            mqtt_connection_errors: Counter::default(),
            mqtt_connected: Gauge::default(),
            kafka_waiting: Gauge::default(),
            kafka_stalled: Gauge::default(),
        };
        let producer_replacements: Family<KindLabel, Counter> = Family::default();
        let r = &mut bridge_registry;
        r.register(
            "vantage_bridge_messages_received",
            "MQTT messages received on the results topics",
            bridge.received.clone(),
        );
        r.register(
            "vantage_bridge_messages_produced",
            "Messages (result batches and agent status) produced to the results topic and \
             confirmed by Kafka",
            bridge.produced.clone(),
        );
        r.register(
            "vantage_bridge_results_produced",
            "Probe results inside the messages produced to the results topic",
            bridge.results_produced.clone(),
        );
        r.register(
            "vantage_bridge_dead_letters",
            "Messages produced to the dead-letter topic, by reason",
            bridge.dead_letters.clone(),
        );
        r.register(
            "vantage_bridge_messages_acked",
            "MQTT messages acknowledged to the broker (after Kafka confirmed them)",
            bridge.acked.clone(),
        );
        r.register(
            "vantage_bridge_messages_skipped",
            "Messages of another bridge's partition slot, acknowledged without producing",
            bridge.skipped.clone(),
        );
        r.register(
            "vantage_bridge_messages_stale",
            "Messages delivered to Kafka but received on an earlier MQTT connection (redelivered)",
            bridge.stale.clone(),
        );
        r.register(
            "vantage_bridge_e2e_acks",
            "End-to-end ack frames published to agents after Kafka's delivery reports",
            bridge.e2e_acks.clone(),
        );
        r.register(
            "vantage_bridge_e2e_acks_dropped",
            "End-to-end ack frames dropped because the MQTT client's queue was full",
            bridge.e2e_acks_dropped.clone(),
        );
        r.register_with_unit(
            "vantage_bridge_kafka_delivery",
            "Time from taking an MQTT message to Kafka's delivery report, retries included",
            Unit::Seconds,
            bridge.delivery_seconds.clone(),
        );
        r.register(
            "vantage_bridge_mqtt_connections",
            "Connections made to the MQTT broker (first connect and reconnects)",
            bridge.mqtt_connections.clone(),
        );
        r.register(
            "vantage_bridge_mqtt_connection_errors",
            "Failed MQTT connection attempts and lost connections",
            bridge.mqtt_connection_errors.clone(),
        );
        r.register(
            "vantage_bridge_mqtt_connected",
            "1 while the bridge is connected to the MQTT broker",
            bridge.mqtt_connected.clone(),
        );
        r.register(
            "vantage_bridge_kafka_waiting",
            "Deliveries waiting for Kafka's confirmation, retries included",
            bridge.kafka_waiting.clone(),
        );
        r.register(
            "vantage_bridge_kafka_stalled",
            "1 while deliveries wait and Kafka confirmed none for kafka.stall_timeout",
            bridge.kafka_stalled.clone(),
        );
        r.register(
            "vantage_bridge_kafka_producer_replacements",
            "Kafka producer instances replaced by a fresh one, by kind (stalled, fatal)",
            producer_replacements.clone(),
        );

        let sink = SinkMetrics {
            consumed: Counter::default(),
            results_written: Counter::default(),
            results_duplicate: Counter::default(),
            gaps_written: Counter::default(),
            dead_letters: Family::default(),
            // 1 .. 16384 results
            batch_results: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            // 0.5 ms .. ~16 s
            write_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            write_retries: Counter::default(),
            consumer_lag: Family::default(),
            last_durable_batch: Gauge::default(),
            clock_skew: Family::default(),
            upkeep_last_success: Gauge::default(),
            upkeep_failures: Counter::default(),
            upkeep_default_rows: Gauge::default(),
        };
        let r = &mut sink_registry;
        r.register(
            "vantage_sink_messages_consumed",
            "Kafka messages consumed from the results topic",
            sink.consumed.clone(),
        );
        r.register(
            "vantage_sink_results_written",
            "Result rows inserted into PostgreSQL",
            sink.results_written.clone(),
        );
        r.register(
            "vantage_sink_results_duplicate",
            "Result rows skipped because they were already stored (replays)",
            sink.results_duplicate.clone(),
        );
        r.register(
            "vantage_sink_gaps_written",
            "Gap records (results agents had to drop) inserted into PostgreSQL",
            sink.gaps_written.clone(),
        );
        r.register(
            "vantage_sink_dead_letters",
            "Kafka messages sent to the dead-letter topic, by reason",
            sink.dead_letters.clone(),
        );
        r.register(
            "vantage_sink_batch_results",
            "Results per PostgreSQL transaction",
            sink.batch_results.clone(),
        );
        r.register_with_unit(
            "vantage_sink_write_duration",
            "Duration of a successful PostgreSQL batch write (one transaction)",
            Unit::Seconds,
            sink.write_seconds.clone(),
        );
        r.register(
            "vantage_sink_write_retries",
            "PostgreSQL batch writes that failed and were retried",
            sink.write_retries.clone(),
        );
        r.register(
            "vantage_sink_consumer_lag",
            "Messages between the committed offset and the end of each assigned partition \
             (from librdkafka statistics, every 5 s)",
            sink.consumer_lag.clone(),
        );
        r.register(
            "vantage_sink_last_durable_batch_timestamp_seconds",
            "Unix time at which the last batch became durable in PostgreSQL (then its offsets are \
             committed); alert on time() minus this while agents are sending",
            sink.last_durable_batch.clone(),
        );
        r.register(
            "vantage_sink_clock_skew_results",
            "Results dead-lettered because their time is outside the window around the bridge's \
             clock (sink.max_clock_behind / max_clock_ahead), per agent",
            sink.clock_skew.clone(),
        );
        r.register(
            "vantage_sink_upkeep_last_success_timestamp_seconds",
            "Unix time of the last storage upkeep round (partitions ahead, rollup round, retention) \
             that succeeded",
            sink.upkeep_last_success.clone(),
        );
        r.register(
            "vantage_sink_upkeep_failures",
            "Storage upkeep rounds or reconnects that failed (retried with backoff)",
            sink.upkeep_failures.clone(),
        );
        r.register(
            "vantage_sink_upkeep_default_rows",
            "Rows left in results_default after the last upkeep: times outside the window upkeep \
             adopts (docs/sql.md)",
            sink.upkeep_default_rows.clone(),
        );
        r.register(
            "vantage_sink_kafka_producer_replacements",
            "Kafka producer instances (dead letters) replaced by a fresh one, by kind (stalled, \
             fatal)",
            producer_replacements.clone(),
        );
        let alert = AlertMetrics {
            evaluations: Counter::default(),
            evaluation_errors: Counter::default(),
            // 1 ms .. ~33 s
            evaluation_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            incidents_open: Gauge::default(),
            active: Gauge::default(),
            events: Family::default(),
            deliveries: Family::default(),
        };
        let r = &mut alert_registry;
        r.register(
            "vantage_alert_evaluations",
            "Evaluations of every rule completed while this process was the active evaluator",
            alert.evaluations.clone(),
        );
        r.register(
            "vantage_alert_evaluation_errors",
            "Evaluator sessions ended by a PostgreSQL error (the stage starts over)",
            alert.evaluation_errors.clone(),
        );
        r.register_with_unit(
            "vantage_alert_evaluation_duration",
            "Duration of one evaluation of every rule",
            Unit::Seconds,
            alert.evaluation_seconds.clone(),
        );
        r.register(
            "vantage_alert_incidents_open",
            "Incidents open, as the active evaluator last saw them",
            alert.incidents_open.clone(),
        );
        r.register(
            "vantage_alert_active",
            "1 while this process holds the evaluator lock (exactly one process does)",
            alert.active.clone(),
        );
        r.register(
            "vantage_alert_events",
            "Incident events written (firing, updated, flapping, resolved)",
            alert.events.clone(),
        );
        r.register(
            "vantage_alert_deliveries",
            "Delivery attempts by receiver and result (ok, error, expired, db_error)",
            alert.deliveries.clone(),
        );
        Metrics {
            bridge_registry,
            sink_registry,
            alert_registry,
            bridge,
            sink,
            alert,
            producer_replacements,
        }
    }

    /// One stage's registry in OpenMetrics text.
    pub fn encode(&self, stage: Stage) -> String {
        let registry = match stage {
            Stage::Bridge => &self.bridge_registry,
            Stage::Sink => &self.sink_registry,
            Stage::Alert => &self.alert_registry,
        };
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, registry);
        text
    }
}

impl BridgeMetrics {
    /// The MQTT connection came up (true) or failed (false).
    pub fn connected(&self, up: bool) {
        if up {
            self.mqtt_connections.inc();
        } else {
            self.mqtt_connection_errors.inc();
        }
        self.mqtt_connected.set(i64::from(up));
    }

    /// A message was rejected and dead-lettered.
    pub fn dead_lettered(&self, reason: &str) {
        self.dead_letters
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A valid message was produced to the results topic after `took`; `results_frame` is
    /// the payload when it is a result batch (None: an agent status).
    pub fn produced(&self, results_frame: Option<&[u8]>, took: Duration) {
        self.produced.inc();
        self.delivery_seconds.observe(took.as_secs_f64());
        // Decoding is cheap (no allocation) next to a Kafka round trip; the bridge already
        // validated this frame, so it decodes.
        if let Some(Ok(batch)) = results_frame.map(vantage_proto::decode) {
            self.results_produced.inc_by(batch.results.len() as u64);
        }
    }
}

impl SinkMetrics {
    /// A message was dead-lettered as poison.
    pub fn dead_lettered(&self, reason: &str) {
        self.dead_letters
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A batch of `results` rows was committed in `took`; `inserted` were new.
    pub fn batch_written(&self, results: usize, inserted: u64, gaps: u64, took: Duration) {
        self.results_written.inc_by(inserted);
        self.results_duplicate
            .inc_by((results as u64).saturating_sub(inserted));
        self.gaps_written.inc_by(gaps);
        self.batch_results.observe(results as f64);
        self.write_seconds.observe(took.as_secs_f64());
    }

    /// A batch (rows and statuses) is durable in PostgreSQL.
    pub fn batch_durable(&self) {
        let now = vantage_common::time::unix_secs(std::time::SystemTime::now());
        self.last_durable_batch
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// `results` results of `region/agent` were dead-lettered as `clock_skew`.
    pub fn clock_skew(&self, region: &str, agent: &str, results: u64) {
        self.clock_skew
            .get_or_create(&AgentLabel {
                region: region.to_owned(),
                agent: agent.to_owned(),
            })
            .inc_by(results);
    }

    /// A storage upkeep round succeeded at `at`, leaving `default_rows` in `results_default`.
    pub fn upkeep_done(&self, at: std::time::SystemTime, default_rows: i64) {
        let secs = vantage_common::time::unix_secs(at);
        self.upkeep_last_success
            .set(i64::try_from(secs).unwrap_or(i64::MAX));
        self.upkeep_default_rows.set(default_rows);
    }

    /// librdkafka statistics of the sink's consumer: per-partition lag of the partitions this
    /// consumer is assigned (librdkafka reports -1 for the others, which are removed).
    pub fn consumer_stats(&self, stats: &rdkafka::statistics::Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 {
                    continue; // librdkafka's internal "unassigned" partition
                }
                let label = PartitionLabel {
                    topic: topic.clone(),
                    partition: partition.to_string(),
                };
                if p.consumer_lag >= 0 {
                    self.consumer_lag.get_or_create(&label).set(p.consumer_lag);
                } else {
                    self.consumer_lag.remove(&label);
                }
            }
        }
    }
}

/// The value of the first sample named exactly `name` (with its labels, e.g.
/// `vantage_sink_dead_letters_total{reason="bad_key"}`) in an OpenMetrics text, for tests and
/// `status`-like tools.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.bridge.received.inc();
        m.bridge.dead_lettered("bad_topic");
        m.sink.batch_written(10, 7, 1, Duration::from_millis(3));
        // Each stage exports its own metrics only (and the build info).
        let bridge = m.encode(Stage::Bridge);
        let sink = m.encode(Stage::Sink);
        assert!(!bridge.contains("vantage_sink_"), "{bridge}");
        assert!(!sink.contains("vantage_bridge_"), "{sink}");
        let text = format!("{bridge}{sink}");
        assert_eq!(
            sample(&text, "vantage_bridge_messages_received_total"),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "vantage_bridge_dead_letters_total{reason=\"bad_topic\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "vantage_sink_results_written_total"),
            Some(7.0)
        );
        assert_eq!(
            sample(&text, "vantage_sink_results_duplicate_total"),
            Some(3.0)
        );
        assert_eq!(sample(&text, "vantage_sink_batch_results_sum"), Some(10.0));
        assert_eq!(
            sample(&text, "vantage_sink_write_duration_seconds_count"),
            Some(1.0)
        );
        assert!(text.contains("# TYPE vantage_bridge_kafka_delivery_seconds histogram"));
        assert!(bridge.contains("vantage_ingester_build_info{version="));
        assert!(sink.contains("vantage_ingester_build_info{version="));
        assert!(sink.ends_with("# EOF\n"));
        m.alert.delivered("am", "ok");
        let alert = m.encode(Stage::Alert);
        assert!(!alert.contains("vantage_sink_") && !alert.contains("vantage_bridge_"));
        assert_eq!(
            sample(
                &alert,
                "vantage_alert_deliveries_total{receiver=\"am\",result=\"ok\"}"
            ),
            Some(1.0)
        );
    }
}
