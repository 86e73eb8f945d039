//! `vantage-ingester status`: what an operator asks first. PostgreSQL: applied schema version
//! (vs the latest this binary knows) and the `results` partitions; Kafka: the results topic's
//! partitions with the sink group's committed offset, end offset and lag.
//!
//! Read-only: it never migrates, joins the consumer group or commits. Every call is bounded by
//! [`TIMEOUT`], so an unreachable service is reported instead of waited for.

use std::fmt::Write as _;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{Config, KafkaConfig, PostgresConfig};
use crate::db::{self, MIGRATIONS};

/// Longest wait for any one service.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// What PostgreSQL said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgStatus {
    /// Highest applied migration (None: never migrated).
    pub schema_version: Option<i32>,
    /// The latest migration this binary carries.
    pub latest_version: i32,
    /// Partitions of `results_raw` (e.g. `results_p20261128`), sorted.
    pub partitions: Vec<String>,
}

/// One partition of the results topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: i32,
    /// Next offset the sink group will read (None: the group never committed one).
    pub committed: Option<i64>,
    /// End of the partition (high watermark).
    pub end: i64,
    /// `end - committed` (everything, when nothing was committed: `end - start`).
    pub lag: i64,
}

/// What Kafka said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaStatus {
    pub topic: String,
    pub group: String,
    pub partitions: Vec<PartitionLag>,
}

/// The status of each configured service; an Err names why it could not be read.
#[derive(Debug)]
pub struct Status {
    pub postgres: Option<Result<PgStatus, String>>,
    pub kafka: Option<Result<KafkaStatus, String>>,
}

impl Status {
    /// True when every configured service answered.
    pub fn reachable(&self) -> bool {
        self.postgres.as_ref().is_none_or(|r| r.is_ok())
            && self.kafka.as_ref().is_none_or(|r| r.is_ok())
    }
}

/// Asks each service in `config` (a missing section is skipped).
pub async fn gather(config: &Config) -> Status {
    let postgres = match config.postgres() {
        Ok(pg) => Some(
            tokio::time::timeout(TIMEOUT, postgres(pg))
                .await
                .unwrap_or_else(|_| Err(format!("no answer in {TIMEOUT:?}"))),
        ),
        Err(_) => None,
    };
    let kafka = match config.kafka() {
        Ok(k) => Some(kafka(k.clone()).await),
        Err(_) => None,
    };
    Status { postgres, kafka }
}

async fn postgres(config: &PostgresConfig) -> Result<PgStatus, String> {
    let client = db::connect(config).await.map_err(|e| e.to_string())?;
    let latest_version = MIGRATIONS.iter().map(|m| m.0).max().unwrap_or(0);
    let version = db::schema_version(&client)
        .await
        .map_err(|e| e.to_string())?;
    if version == 0 {
        return Ok(PgStatus {
            schema_version: None,
            latest_version,
            partitions: Vec::new(),
        });
    }
    let schema_version = Some(version);
    let partitions = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_class p ON p.oid = i.inhparent
               JOIN pg_namespace n ON n.oid = p.relnamespace
              WHERE p.relname = 'results_raw' AND n.nspname = current_schema()
              ORDER BY 1",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(PgStatus {
        schema_version,
        latest_version,
        partitions,
    })
}

/// On a thread of its own: librdkafka's calls block, and a client of an unreachable cluster
/// may take long to destroy; the answer (or its absence) is what matters.
async fn kafka(config: KafkaConfig) -> Result<KafkaStatus, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(kafka_blocking(&config));
    });
    tokio::time::timeout(TIMEOUT * 3, rx)
        .await
        .map_err(|_| format!("no answer in {:?}", TIMEOUT * 3))?
        .map_err(|_| "Kafka status thread failed".to_owned())?
}

fn kafka_blocking(config: &KafkaConfig) -> Result<KafkaStatus, String> {
    let consumer: BaseConsumer = crate::kafka::client_config(config)
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| e.to_string())?;
    let metadata = consumer
        .fetch_metadata(Some(&config.topic), TIMEOUT)
        .map_err(|e| e.to_string())?;
    let topic = metadata
        .topics()
        .iter()
        .find(|t| t.name() == config.topic)
        .ok_or_else(|| format!("topic {} not found", config.topic))?;
    if let Some(e) = topic.error() {
        return Err(format!("topic {}: {:?}", config.topic, e));
    }
    let mut tpl = TopicPartitionList::new();
    for p in topic.partitions() {
        tpl.add_partition(&config.topic, p.id());
    }
    let committed = consumer
        .committed_offsets(tpl, TIMEOUT)
        .map_err(|e| e.to_string())?;
    let mut partitions = Vec::new();
    for p in topic.partitions() {
        let (start, end) = consumer
            .fetch_watermarks(&config.topic, p.id(), TIMEOUT)
            .map_err(|e| e.to_string())?;
        let committed = committed
            .find_partition(&config.topic, p.id())
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let lag = end - committed.unwrap_or(start).max(start);
        partitions.push(PartitionLag {
            partition: p.id(),
            committed,
            end,
            lag,
        });
    }
    partitions.sort_by_key(|p| p.partition);
    Ok(KafkaStatus {
        topic: config.topic.clone(),
        group: config.group_id.clone(),
        partitions,
    })
}

/// Aligned text for a terminal.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    match &status.postgres {
        None => {}
        Some(Err(e)) => {
            let _ = writeln!(out, "postgres: UNREACHABLE: {e}");
        }
        Some(Ok(pg)) => {
            let version = match pg.schema_version {
                None => "none (run `vantage-ingester migrate`)".to_owned(),
                Some(v) if v < pg.latest_version => {
                    format!("{v} (this binary has {}: run `migrate`)", pg.latest_version)
                }
                Some(v) => format!("{v} (up to date)"),
            };
            let _ = writeln!(out, "postgres: ok\n  schema version: {version}");
            match (pg.partitions.first(), pg.partitions.last()) {
                (Some(first), Some(last)) => {
                    let _ = writeln!(
                        out,
                        "  results partitions: {} ({first} .. {last})",
                        pg.partitions.len()
                    );
                }
                _ => {
                    let _ = writeln!(out, "  results partitions: 0");
                }
            }
        }
    }
    match &status.kafka {
        None => {}
        Some(Err(e)) => {
            let _ = writeln!(out, "kafka: UNREACHABLE: {e}");
        }
        Some(Ok(k)) => {
            let total: i64 = k.partitions.iter().map(|p| p.lag).sum();
            let _ = writeln!(
                out,
                "kafka: ok\n  topic {} ({} partitions), group {}: lag {total}",
                k.topic,
                k.partitions.len(),
                k.group
            );
            let _ = writeln!(
                out,
                "  {:>9} {:>12} {:>12} {:>8}",
                "partition", "committed", "end", "lag"
            );
            for p in &k.partitions {
                let committed = p.committed.map_or("-".to_owned(), |c| c.to_string());
                let _ = writeln!(
                    out,
                    "  {:>9} {committed:>12} {:>12} {:>8}",
                    p.partition, p.end, p.lag
                );
            }
        }
    }
    out
}
