//! The sink stage: Kafka consumer group → PostgreSQL, committing offsets only after COMMIT.
//!
//! Loop: collect a batch (up to `sink.batch_max` messages, or `sink.batch_timeout` after the first
//! one) → decode each message into rows (a poison message goes to the dead-letter topic) → write
//! all rows in one transaction, retrying with backoff while PostgreSQL is unavailable → commit
//! the batch's offsets. A crash anywhere before the offset commit replays the batch, and the
//! natural key (agent, boot id, seq) makes the replay a no-op.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, PostgresConfig};
use crate::db::{self, DbError, GapRow, Row};
use crate::kafka;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Counters of one sink run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SinkStats {
    pub messages: u64,
    pub rows_inserted: u64,
    /// Rows skipped because they were already stored (replays).
    pub rows_duplicate: u64,
    /// Gap records (results agents had to drop) stored.
    pub gaps_inserted: u64,
    pub dead_lettered: u64,
    pub batches: u64,
}

/// One consumed message, decoded or rejected.
enum Decoded {
    Rows(Vec<Row>, Vec<GapRow>),
    Poison(&'static str),
}

/// Turns a Kafka message from the bridge (key `region/agent`, value a frame) into rows.
fn decode_message(key: Option<&[u8]>, payload: Option<&[u8]>) -> Decoded {
    let Some((region, agent)) = key
        .and_then(|k| std::str::from_utf8(k).ok())
        .and_then(|k| k.split_once('/'))
        .filter(|(r, a)| vantage_proto::is_valid_name(r) && vantage_proto::is_valid_name(a))
    else {
        return Decoded::Poison("bad_key");
    };
    let batch = match vantage_proto::decode(payload.unwrap_or_default()) {
        Ok(b) => b,
        Err(e) => return Decoded::Poison(e.reason()),
    };
    let rows = batch
        .results
        .iter()
        .map(|r| Row {
            region: region.to_owned(),
            agent: agent.to_owned(),
            boot_id: batch.boot_id,
            result: *r,
        })
        .collect();
    let gaps = batch
        .gaps
        .iter()
        .map(|g| GapRow {
            region: region.to_owned(),
            agent: agent.to_owned(),
            boot_id: batch.boot_id,
            gap: *g,
        })
        .collect();
    Decoded::Rows(rows, gaps)
}

/// Runs the sink until `shutdown` fires; the batch being collected is written and committed
/// before it returns.
pub async fn run(config: &Config, shutdown: CancellationToken) -> Result<SinkStats, SinkError> {
    let kafka_config = config.kafka()?.clone();
    let pg_config = config.postgres()?.clone();
    let sink = config.sink.clone();

    let mut client = connect_with_retry(&pg_config, &shutdown).await?;
    db::migrate(&mut client, &pg_config.schema).await?;
    kafka::ensure_topics(&kafka_config).await?;
    let producer = kafka::producer(&kafka_config)?;

    let consumer: StreamConsumer = kafka::client_config(&kafka_config)
        .set("group.id", &kafka_config.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .create()?;
    consumer.subscribe(&[&kafka_config.topic])?;
    tracing::info!(
        topic = kafka_config.topic,
        group = kafka_config.group_id,
        "sink running"
    );

    let mut stats = SinkStats::default();
    while !shutdown.is_cancelled() {
        // Collect: wait for a first message, then fill until full or the batch timeout.
        let mut rows: Vec<Row> = Vec::new();
        let mut gaps: Vec<GapRow> = Vec::new();
        let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut count = 0usize;
        let mut batch_deadline = None;
        while count < sink.batch_max {
            let next = async {
                match batch_deadline {
                    Some(d) => tokio::time::timeout_at(d, consumer.recv()).await.ok(),
                    None => Some(consumer.recv().await),
                }
            };
            let received = tokio::select! {
                r = next => r,
                _ = shutdown.cancelled() => None,
            };
            let message = match received {
                None => break,
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    // Broker trouble surfaces here; librdkafka reconnects on its own, so wait a
                    // moment instead of spinning on the error.
                    tracing::warn!(error = %e, "Kafka consume error");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            batch_deadline.get_or_insert_with(|| tokio::time::Instant::now() + sink.batch_timeout);
            count += 1;
            offsets.insert(
                (message.topic().to_owned(), message.partition()),
                message.offset() + 1,
            );
            match decode_message(message.key(), message.payload()) {
                Decoded::Rows(r, g) => {
                    rows.extend(r);
                    gaps.extend(g);
                }
                Decoded::Poison(reason) => {
                    tracing::warn!(
                        partition = message.partition(),
                        offset = message.offset(),
                        reason,
                        "poison message"
                    );
                    dead_letter(
                        &producer,
                        &kafka_config.dead_letter_topic,
                        message.key(),
                        message.payload().unwrap_or_default(),
                        reason,
                    )
                    .await;
                    stats.dead_lettered += 1;
                }
            }
        }
        if count == 0 {
            continue;
        }
        stats.messages += count as u64;

        // Write, retrying transient failures for as long as it takes: offsets must not move
        // past rows that are not durable.
        if !rows.is_empty() || !gaps.is_empty() {
            let mut backoff = Duration::from_millis(100);
            loop {
                match db::insert_batch(&mut client, &rows, &gaps).await {
                    Ok(inserted) => {
                        stats.rows_inserted += inserted.results;
                        stats.rows_duplicate += rows.len() as u64 - inserted.results;
                        stats.gaps_inserted += inserted.gaps;
                        tracing::debug!(rows = rows.len(), ?inserted, "batch written");
                        break;
                    }
                    Err(e) if e.is_transient() => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "PostgreSQL write failed, retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        if client.is_closed() {
                            client =
                                connect_with_retry(&pg_config, &CancellationToken::new()).await?;
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }

        // The rows are committed: now, and only now, the offsets may advance.
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &offsets {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
        }
        // A failed commit (e.g. the partition moved to another sink) only means a replay, which
        // the natural key absorbs.
        if let Err(e) = tokio::task::block_in_place(|| consumer.commit(&tpl, CommitMode::Sync)) {
            tracing::warn!(error = %e, "offset commit failed; batch will be replayed");
        }
        stats.batches += 1;
    }
    consumer.unsubscribe();
    tracing::info!(?stats, "sink stopped");
    Ok(stats)
}

async fn dead_letter(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    reason: &str,
) {
    let headers = kafka::dead_letter_headers("sink", reason, None);
    // Not cancellable: the poison message's offset is committed with its batch, so its dead
    // letter must be durable first.
    kafka::produce_until_delivered(
        producer,
        topic,
        key,
        payload,
        Some(&headers),
        &CancellationToken::new(),
    )
    .await;
}

/// Connects to PostgreSQL, retrying with backoff while it is unreachable.
async fn connect_with_retry(
    config: &PostgresConfig,
    shutdown: &CancellationToken,
) -> Result<Client, DbError> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match db::connect(config).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot connect to PostgreSQL, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_messages_are_recognised() {
        assert!(matches!(
            decode_message(None, Some(&[1, 0, 0])),
            Decoded::Poison("bad_key")
        ));
        assert!(matches!(
            decode_message(Some(b"nokey"), Some(&[1, 0, 0])),
            Decoded::Poison("bad_key")
        ));
        assert!(matches!(
            decode_message(Some(b"eu/pi"), Some(&[3])),
            Decoded::Poison("unknown_version")
        ));
        match decode_message(Some(b"eu/pi"), Some(&[1, 7, 0])) {
            Decoded::Rows(r, g) => assert!(r.is_empty() && g.is_empty()),
            Decoded::Poison(p) => panic!("{p}"),
        }
    }
}
