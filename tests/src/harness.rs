//! One delivery run on the real services: its own MQTT topic prefix, Kafka topics and consumer
//! group, and PostgreSQL schema, the ingester configuration files for it, the checks that
//! compare what agents produced with what PostgreSQL holds, and the cleanup.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::loadgen::AgentReport;
use crate::{unique_id, Services};

/// Names and files of one run.
pub struct Run {
    pub id: String,
    pub dir: PathBuf,
    pub services: Services,
}

/// Knobs of an ingester configuration file.
#[derive(Debug, Clone)]
pub struct IngesterOptions {
    /// MQTT client id suffix; each bridge needs its own.
    pub client: String,
    /// `mqtt.shared_group`.
    pub shared_group: Option<String>,
    /// `mqtt.partition`, e.g. `"0/2"`.
    pub partition: Option<String>,
    /// `kafka.brokers` (default: the test Kafka).
    pub brokers: Option<String>,
    pub partitions: i32,
    pub max_in_flight: usize,
    pub sink_batch_max: usize,
    pub sink_batch_timeout_ms: u64,
    /// Extra lines for the `[sink]` section (TOML), e.g. `max_clock_ahead = "3h"`.
    pub sink_extra: String,
    /// Extra lines for the `[kafka]` section (TOML), e.g. `stall_timeout = "5s"`.
    pub kafka_extra: String,
    /// `[kafka.properties]`: librdkafka settings passed through.
    pub kafka_properties: Vec<(String, String)>,
    /// `mqtt.end_to_end_acks` (default: on unless `VANTAGE_E2E_ACKS=off`; false acts like an
    /// ingester from before end-to-end acknowledgements).
    pub end_to_end_acks: bool,
}

impl Default for IngesterOptions {
    fn default() -> Self {
        IngesterOptions {
            client: "a".into(),
            shared_group: None,
            partition: None,
            brokers: None,
            partitions: 4,
            max_in_flight: 100,
            end_to_end_acks: crate::loadgen::e2e_acks_from_env(),
            sink_batch_max: 200,
            sink_batch_timeout_ms: 100,
            sink_extra: String::new(),
            kafka_extra: String::new(),
            kafka_properties: Vec::new(),
        }
    }
}

impl Run {
    pub fn new(kind: &str) -> Run {
        let id = unique_id();
        let dir = std::env::temp_dir().join(format!("vantage-{kind}-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        Run {
            id,
            dir,
            services: Services::from_env(),
        }
    }

    pub fn prefix(&self) -> String {
        format!("d{}", self.id)
    }
    pub fn schema(&self) -> String {
        format!("dl_{}", self.id)
    }
    pub fn topic(&self) -> String {
        format!("vantage.results.{}", self.id)
    }
    pub fn dead_letter_topic(&self) -> String {
        format!("vantage.dead-letter.{}", self.id)
    }
    pub fn group(&self) -> String {
        format!("sink-{}", self.id)
    }
    /// The bridge's MQTT client id for `client`.
    pub fn bridge_client_id(&self, client: &str) -> String {
        format!("bridge-{client}-{}", self.id)
    }

    fn secret(&self, name: &str, value: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, value).unwrap();
        path
    }

    /// Writes an ingester configuration file for this run and returns its path.
    pub fn ingester_file(&self, o: &IngesterOptions) -> PathBuf {
        let s = &self.services;
        let shared = o
            .shared_group
            .as_ref()
            .map(|g| format!("shared_group = \"{g}\""))
            .or_else(|| o.partition.as_ref().map(|p| format!("partition = \"{p}\"")))
            .unwrap_or_default();
        let text = format!(
            r#"
[mqtt]
host = "{mqtt_host}"
port = {mqtt_port}
username = "ingester"
password_file = "{mqtt_pw}"
client_id = "{client_id}"
topic_prefix = "{prefix}"
max_in_flight = {max_in_flight}
end_to_end_acks = {e2e}
{shared}

[kafka]
brokers = "{brokers}"
topic = "{topic}"
dead_letter_topic = "{dlq}"
group_id = "{group}"
partitions = {partitions}
# The single test broker: one replica (production: 3 and 2, docs/ingester.md).
replication_factor = 1
min_insync_replicas = 1
{kafka_extra}

[postgres]
{pg}
schema = "{schema}"

[sink]
batch_max = {batch_max}
batch_timeout = "{batch_timeout}ms"
{sink_extra}

# Stage processes of one test must not share a port: each picks a free one and logs it.
[http]
bridge_listen = "127.0.0.1:0"
sink_listen = "127.0.0.1:0"
{kafka_properties}
"#,
            mqtt_host = s.mqtt_host,
            mqtt_port = s.mqtt_port,
            mqtt_pw = self.secret("ingester.pw", "ingester-secret").display(),
            client_id = self.bridge_client_id(&o.client),
            prefix = self.prefix(),
            max_in_flight = o.max_in_flight,
            e2e = o.end_to_end_acks,
            brokers = o.brokers.as_deref().unwrap_or(&s.kafka_brokers),
            topic = self.topic(),
            dlq = self.dead_letter_topic(),
            group = self.group(),
            partitions = o.partitions,
            pg = s.pg_toml_plain(&self.dir),
            schema = self.schema(),
            batch_max = o.sink_batch_max,
            batch_timeout = o.sink_batch_timeout_ms,
            sink_extra = o.sink_extra,
            kafka_extra = o.kafka_extra,
            kafka_properties = if o.kafka_properties.is_empty() {
                String::new()
            } else {
                let lines: String = o
                    .kafka_properties
                    .iter()
                    .map(|(k, v)| format!("{k:?} = {v:?}\n"))
                    .collect();
                format!("\n[kafka.properties]\n{lines}")
            },
        );
        let path = self.dir.join(format!("ingester-{}.toml", o.client));
        std::fs::write(&path, &text).unwrap();
        path
    }

    /// [`Run::ingester_file`], loaded.
    pub fn ingester_config(&self, o: &IngesterOptions) -> vantage_ingester::Config {
        vantage_ingester::Config::load(&self.ingester_file(o)).unwrap()
    }

    /// A PostgreSQL client with this run's schema on the search path.
    pub async fn pg(&self) -> tokio_postgres::Client {
        self.services.pg(&self.schema()).await
    }

    /// Rows in `results`, or 0 while the table does not exist (or PostgreSQL is restarting).
    pub async fn count_rows(&self) -> i64 {
        let Ok((client, conn)) =
            tokio_postgres::connect(&self.services.pg_url, tokio_postgres::NoTls).await
        else {
            return 0;
        };
        tokio::spawn(conn);
        match client
            .query_one(
                &format!("SELECT count(*) FROM {}.results", self.schema()),
                &[],
            )
            .await
        {
            Ok(row) => row.get(0),
            Err(_) => 0,
        }
    }

    /// Waits until `results` holds at least `n` rows; returns the last count seen.
    pub async fn wait_rows(&self, n: i64, timeout: Duration) -> i64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let c = self.count_rows().await;
            if c >= n || tokio::time::Instant::now() >= deadline {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn kafka_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.services.kafka_brokers);
        c
    }

    /// Committed offset of the sink group and end offset, per partition of the results topic.
    ///
    /// Right after Kafka was frozen or restarted, its partitions have no leader and its group
    /// coordinator is still loading for a moment (the broker fences itself after a freeze
    /// longer than its session timeout): the reading waits for those answers, up to 30 s,
    /// instead of failing the test on what it merely observes. Any other error fails at once.
    ///
    /// # Panics
    /// If Kafka is still settling after 30 s, or on any other error.
    pub fn committed_and_end(&self) -> Vec<(i32, i64, i64)> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.try_committed_and_end() {
                Ok(offsets) => return offsets,
                Err(e) if std::time::Instant::now() < deadline && kafka_settling(&e) => {
                    eprintln!("offsets not readable yet ({e}), waiting for Kafka");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("cannot read the offsets from Kafka for 30 s: {e}"),
            }
        }
    }

    fn try_committed_and_end(&self) -> Result<Vec<(i32, i64, i64)>, rdkafka::error::KafkaError> {
        let consumer: BaseConsumer = self.kafka_config().set("group.id", self.group()).create()?;
        let topic = self.topic();
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let partitions: Vec<i32> = metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| p.id())
            .collect();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition(&topic, *p);
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
        partitions
            .iter()
            .map(|&p| {
                let (_, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
                let c = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => 0,
                };
                Ok((p, c, high))
            })
            .collect()
    }

    /// Every message of `topic` from the beginning: (key, payload, headers as (name, value)).
    pub fn read_topic(&self, topic: &str) -> Vec<KafkaRecord> {
        let consumer: BaseConsumer = self
            .kafka_config()
            .set("group.id", format!("reader-{}", unique_id()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        let mut remaining = 0i64;
        for p in metadata.topics()[0].partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap();
            remaining += high - low;
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while (out.len() as i64) < remaining && std::time::Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    let headers = m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|x| {
                                    (
                                        x.key.to_owned(),
                                        String::from_utf8_lossy(x.value.unwrap_or_default())
                                            .into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    out.push(KafkaRecord {
                        partition: m.partition(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().unwrap_or_default().to_vec(),
                        headers,
                        timestamp_ms: m.timestamp().to_millis(),
                    });
                }
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
        }
        out
    }

    /// Produces `records` to `topic` (each to its partition, with its key, headers and
    /// timestamp) one after another, waiting for each delivery: as a bridge would, but with
    /// every field chosen by the test.
    pub async fn produce(&self, topic: &str, records: &[ProducedRecord]) {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = self.kafka_config().create().unwrap();
        for r in records {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &r.headers {
                headers = headers.insert(Header {
                    key: k.as_str(),
                    value: Some(v.as_str()),
                });
            }
            let record = FutureRecord::to(topic)
                .partition(r.partition)
                .key(&r.key)
                .payload(&r.payload)
                .headers(headers)
                .timestamp(r.timestamp_ms);
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .unwrap_or_else(|e| panic!("producing to {topic}: {e}"));
        }
    }

    /// Removes the schema, the Kafka topics, the MQTT sessions of `mqtt_clients` and the files.
    pub async fn cleanup(&self, mqtt_clients: &[String]) {
        let client = self.pg().await;
        let _ = client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema()))
            .await;
        let admin: AdminClient<DefaultClientContext> = self.kafka_config().create().unwrap();
        let _ = admin
            .delete_topics(
                &[&self.topic(), &self.dead_letter_topic()],
                &AdminOptions::new(),
            )
            .await;
        discard_mqtt_sessions(&self.services, mqtt_clients).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One Kafka message for [`Run::produce`].
#[derive(Debug, Clone)]
pub struct ProducedRecord {
    pub partition: i32,
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub timestamp_ms: i64,
}

/// One Kafka message as read back by [`Run::read_topic`].
#[derive(Debug, Clone)]
pub struct KafkaRecord {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    /// The record's timestamp (the bridge sets it to the time it received the message).
    pub timestamp_ms: Option<i64>,
}

impl KafkaRecord {
    /// An agent status record (the results topic carries those too), not a result frame.
    pub fn is_status(&self) -> bool {
        self.header(vantage_ingester::bridge::KIND_HEADER) == Some("status")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Publishes `messages` (topic, payload) at QoS 1 as the test agent identity (`agent` /
/// `agent-secret`, a clean session named `client_id`) and waits for every PUBACK, as a
/// misbehaving, forging or simulated agent would.
pub async fn publish_as_agent(
    services: &Services,
    client_id: &str,
    messages: &[(String, Vec<u8>)],
) {
    let mut options =
        rumqttc::MqttOptions::new(client_id, services.mqtt_host.clone(), services.mqtt_port);
    options.set_credentials("agent", "agent-secret");
    // Room for every publish: queuing never waits for the event loop polled below.
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, messages.len() + 4);
    for (topic, payload) in messages {
        client
            .try_publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.clone())
            .expect("queue the publish");
    }
    let acked = tokio::time::timeout(Duration::from_secs(60), async {
        let mut acks = 0;
        while acks < messages.len() {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => acks += 1,
                Ok(_) => {}
                Err(e) => panic!("MQTT broker must be running: {e}"),
            }
        }
    })
    .await;
    assert!(
        acked.is_ok(),
        "broker did not acknowledge the publishes within 60 s"
    );
    let _ = client.try_disconnect();
}

/// Result frames as an agent of `boot_id` would send them: `frames` frames of `per_frame`
/// synthetic results each, with consecutive sequence numbers from 0.
pub fn result_frames(boot_id: u64, frames: u64, per_frame: u64) -> Vec<Vec<u8>> {
    let mut synth = crate::loadgen::Synth::new(boot_id);
    (0..frames)
        .map(|f| {
            let mut b = vantage_proto::Batch {
                boot_id,
                results: heapless::Vec::new(),
                gaps: heapless::Vec::new(),
                clock: None,
            };
            for i in 0..per_frame {
                let mut r = synth.result();
                r.seq = f * per_frame + i;
                b.results.push(r).expect("per_frame ≤ MAX_RESULTS");
            }
            let mut buf = [0u8; vantage_proto::MAX_FRAME_LEN];
            vantage_proto::encode(&b, &mut buf)
                .expect("a batch fits MAX_FRAME_LEN")
                .to_vec()
        })
        .collect()
}

/// Ends persistent MQTT sessions (connect with a clean session, then disconnect), so a test
/// leaves no session state in the shared broker. `ingester` credentials for `bridge-*` ids,
/// `agent` for the rest.
pub async fn discard_mqtt_sessions(services: &Services, client_ids: &[String]) {
    for id in client_ids {
        let (user, pass) = if id.starts_with("bridge-") {
            ("ingester", "ingester-secret")
        } else {
            ("agent", "agent-secret")
        };
        let mut options =
            rumqttc::MqttOptions::new(id.clone(), services.mqtt_host.clone(), services.mqtt_port);
        options.set_credentials(user, pass);
        options.set_clean_session(true);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = client.try_disconnect();
                    }
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// The MQTT client ids of the simulated agents in `reports`.
pub fn agent_client_ids(reports: &[AgentReport]) -> Vec<String> {
    reports
        .iter()
        .map(|r| format!("vantage-agent-{}", r.agent_id))
        .collect()
}

/// What PostgreSQL holds compared with what the agents produced.
#[derive(Debug, Default)]
pub struct Comparison {
    /// Results the agents produced (sequence numbers handed out).
    pub produced: u64,
    /// Of those, dropped by a full agent buffer (must be covered by gap rows).
    pub dropped: u64,
    /// Rows in `results`.
    pub rows: u64,
    /// Produced, not dropped, and not in PostgreSQL.
    pub missing: u64,
    /// In PostgreSQL but not produced (or dropped).
    pub unexpected: u64,
    /// Gap rows and the results they say were dropped.
    pub gap_rows: u64,
    pub gap_results: u64,
    /// Dropped results not covered by a gap row, or covered twice.
    pub gap_mismatch: u64,
}

impl Comparison {
    /// Nothing missing, nothing extra, every drop recorded as a gap.
    pub fn exact(&self) -> bool {
        self.missing == 0
            && self.unexpected == 0
            && self.gap_mismatch == 0
            && self.rows + self.dropped == self.produced
    }
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "produced {} (dropped by agents {}), rows in PostgreSQL {}, missing {}, unexpected {}, \
             gap rows {} covering {} results (mismatch {})",
            self.produced,
            self.dropped,
            self.rows,
            self.missing,
            self.unexpected,
            self.gap_rows,
            self.gap_results,
            self.gap_mismatch
        )
    }
}

/// Compares the set of (agent, boot, seq) in PostgreSQL with the set the agents produced:
/// for each agent, `0..results` of its boot, less what it dropped, which must appear in `gaps`.
pub async fn compare(client: &tokio_postgres::Client, reports: &[AgentReport]) -> Comparison {
    let mut got: BTreeMap<(String, i64), BTreeSet<i64>> = BTreeMap::new();
    let mut rows = 0u64;
    for r in client
        .query("SELECT agent, boot_id, seq FROM results", &[])
        .await
        .unwrap()
    {
        rows += 1;
        got.entry((r.get(0), r.get(1)))
            .or_default()
            .insert(r.get(2));
    }
    let mut gaps: BTreeMap<(String, i64), Vec<(i64, i64)>> = BTreeMap::new();
    let mut c = Comparison {
        rows,
        ..Comparison::default()
    };
    for r in client
        .query("SELECT agent, boot_id, first_seq, dropped FROM gaps", &[])
        .await
        .unwrap()
    {
        let dropped: i32 = r.get(3);
        c.gap_rows += 1;
        c.gap_results += dropped as u64;
        gaps.entry((r.get(0), r.get(1)))
            .or_default()
            .push((r.get(2), i64::from(dropped)));
    }
    for rep in reports {
        let key = (rep.agent_id.clone(), rep.stats.boot_id as i64);
        let have = got.remove(&key).unwrap_or_default();
        let mut dropped_seqs = BTreeSet::new();
        for &(first, n) in gaps.get(&key).map(Vec::as_slice).unwrap_or_default() {
            for s in first..first + n {
                if !dropped_seqs.insert(s) {
                    c.gap_mismatch += 1;
                }
            }
        }
        c.produced += rep.stats.results;
        c.dropped += rep.stats.dropped;
        if dropped_seqs.len() as u64 != rep.stats.dropped {
            c.gap_mismatch += (dropped_seqs.len() as u64).abs_diff(rep.stats.dropped);
        }
        for seq in 0..rep.stats.results as i64 {
            let present = have.contains(&seq);
            let dropped = dropped_seqs.contains(&seq);
            match (present, dropped) {
                (false, false) => c.missing += 1,
                (true, true) => c.unexpected += 1,
                _ => {}
            }
        }
        c.unexpected += have
            .iter()
            .filter(|&&s| s < 0 || s >= rep.stats.results as i64)
            .count() as u64;
    }
    // Rows of agents or boots nobody produced.
    c.unexpected += got.values().map(|s| s.len() as u64).sum::<u64>();
    c
}

/// Results carried by frames in `records` (with duplicates), from the results topic.
pub fn results_in(records: &[KafkaRecord]) -> u64 {
    records
        .iter()
        .filter(|r| !r.is_status())
        .filter_map(|r| vantage_proto::decode(&r.payload).ok())
        .map(|b| b.results.len() as u64)
        .sum()
}

/// Writes `text` to `path`, creating its folder.
pub fn write_file(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(path, text).unwrap();
}

/// True for the answers a broker gives right after it resumes from a freeze or restart (the
/// group coordinator still loading or moving, a partition without a leader yet, the client's
/// metadata not knowing the partition yet). librdkafka retries these itself inside a
/// consumer's own work; a one-off read in a test has to.
fn kafka_settling(e: &rdkafka::error::KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::OperationTimedOut
        )
    )
}

/// Keeps today's definition of the SQL function `name` (in `client`'s schema) under the name
/// `prefix` + `name`: the same-run baseline of a migration that replaces it (tests and
/// benchmarks compare the two).
pub async fn keep_function_as(client: &tokio_postgres::Client, name: &str, prefix: &str) {
    let def: String = client
        .query_one("SELECT pg_get_functiondef($1::text::regproc)", &[&name])
        .await
        .unwrap_or_else(|e| panic!("function {name}: {e:?}"))
        .get(0);
    let def = def.replacen(&format!(".{name}("), &format!(".{prefix}{name}("), 1);
    client.batch_execute(&def).await.unwrap();
}
