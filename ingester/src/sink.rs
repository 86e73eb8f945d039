//! The sink stage: Kafka consumer group → PostgreSQL, committing offsets only after COMMIT.
//!
//! Loop: collect a batch (up to `sink.batch_max` messages, or `sink.batch_timeout` after the first
//! one) → decode each message into rows (a poison message goes to the dead-letter topic) → write
//! all rows in one transaction ([`db::write_batch`]: binary COPY into a staging table, then
//! `INSERT … SELECT … ON CONFLICT DO NOTHING`, or for small batches one `INSERT … SELECT FROM
//! unnest(…)`, whichever `bench-ingest` measured faster), retrying with backoff while PostgreSQL is
//! unavailable → record the batch's offsets as durable and commit them (asynchronously).
//!
//! Offsets: only offsets whose rows are committed in PostgreSQL are ever committed to Kafka.
//! When partitions are revoked (another sink joins or leaves), the durable offsets of those
//! partitions are committed synchronously before the revocation completes, so the next owner
//! starts after them. A batch collected across a revocation is still written (rows are
//! idempotent) but its offsets are not committed: the next owner replays those messages.
//! A crash anywhere before an offset commit replays messages, and the natural key
//! (agent, boot id, seq) makes the replay a no-op.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vantage_common::backoff::Backoff;
use vantage_common::signal::sleep_unless_stopped;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::batch::{Writes, REFUSED};
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
    /// Write attempts that failed and were retried.
    pub write_retries: u64,
    /// Batches written whose offsets were not committed because a rebalance intervened.
    pub batches_uncommitted: u64,
    /// Synchronous offset commits tried when partitions were revoked (rebalance callback).
    pub revocation_commits: u64,
}

/// Offsets whose rows are committed in PostgreSQL, shared with the rebalance callback.
#[derive(Debug, Default)]
struct Durable {
    /// (topic, partition) → next offset to read.
    next: BTreeMap<(String, i32), i64>,
    /// Bumped at every revocation; a batch collected across one does not record its offsets.
    generation: u64,
    /// Offset commits tried on revocation (for [`SinkStats::revocation_commits`]).
    revocation_commits: u64,
}

impl Durable {
    fn list(&self) -> Result<TopicPartitionList, rdkafka::error::KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &self.next {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
        }
        Ok(tpl)
    }
}

/// The consumer's context: commits durable offsets when partitions are revoked.
struct SinkContext {
    durable: Arc<Mutex<Durable>>,
    /// False once librdkafka's statistics show no broker left to talk to (the wedge described
    /// at `kafka::Producer`); the batch loop then gives the consumer `kafka.brokers` again.
    has_brokers: Arc<AtomicBool>,
}

impl ClientContext for SinkContext {
    // librdkafka statistics (every `statistics.interval.ms`): consumer lag per partition, and
    // whether any broker is left.
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        crate::metrics::sink().consumer_stats(&statistics);
        self.has_brokers
            .store(kafka::has_brokers(&statistics), Ordering::Release);
    }
}

impl ConsumerContext for SinkContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let mut durable = self.durable.lock().unwrap_or_else(|e| e.into_inner());
        durable.generation += 1;
        let mut commit = TopicPartitionList::new();
        for p in revoked.elements() {
            if let Some(offset) = durable.next.remove(&(p.topic().to_owned(), p.partition())) {
                let _ =
                    commit.add_partition_offset(p.topic(), p.partition(), Offset::Offset(offset));
            }
        }
        if commit.count() == 0 {
            return;
        }
        durable.revocation_commits += 1;
        // Runs inside the consumer's poll; a blocking commit here is what makes the next owner
        // start after our rows instead of replaying them. The poll is the sink task's recv(),
        // so this runs on a worker of the runtime: block_in_place hands the worker's other
        // tasks (upkeep, /metrics, dead-letter deliveries) to another thread for as long as
        // the coordinator takes to answer (up to socket.timeout.ms when Kafka hangs). Without
        // a multi-thread runtime around (the consumer's close on the shutdown thread, a
        // current-thread runtime), it simply blocks.
        let sync_commit = || consumer.commit(&commit, CommitMode::Sync);
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let committed = if multi_thread {
            tokio::task::block_in_place(sync_commit)
        } else {
            sync_commit()
        };
        match committed {
            Ok(()) => tracing::info!(
                partitions = commit.count(),
                "offsets committed on revocation"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "offset commit on revocation failed; the next owner replays")
            }
        }
    }
}

/// One consumed message, decoded or rejected.
pub enum Decoded {
    /// A result frame's rows and gaps, and the clock state of its batch (None: unknown).
    Rows(Vec<Row>, Vec<GapRow>, Option<vantage_proto::ClockHealth>),
    /// An agent status (the record has the `vantage-kind: status` header).
    Status(Box<crate::fleet::StatusRow>),
    Poison(&'static str),
}

/// Whether a record's headers mark it as an agent status.
pub fn is_status(message: &impl Message) -> bool {
    message.headers().is_some_and(|h| {
        h.iter()
            .any(|h| h.key == crate::bridge::KIND_HEADER && h.value == Some(b"status".as_slice()))
    })
}

/// Turns a status record into a row for the `agents` table.
pub fn decode_status_message(
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    timestamp_ms: Option<i64>,
) -> Decoded {
    let Some((region, agent)) = split_key(key) else {
        return Decoded::Poison("bad_key");
    };
    match vantage_proto::control::decode_status(payload.unwrap_or_default()) {
        Ok(status) => match crate::fleet::StatusRow::new(region, agent, status, timestamp_ms) {
            Ok(row) => Decoded::Status(Box::new(row)),
            Err(crate::fleet::BadStatus::NulByte) => Decoded::Poison("nul_byte"),
        },
        Err(e) => Decoded::Poison(e.reason()),
    }
}

/// `region/agent` from a record key, both valid names.
fn split_key(key: Option<&[u8]>) -> Option<(&str, &str)> {
    key.and_then(|k| std::str::from_utf8(k).ok())
        .and_then(|k| k.split_once('/'))
        .filter(|(r, a)| vantage_proto::is_valid_name(r) && vantage_proto::is_valid_name(a))
}

/// Turns a Kafka message from the bridge (key `region/agent`, value a frame) into rows.
pub fn decode_message(key: Option<&[u8]>, payload: Option<&[u8]>) -> Decoded {
    let Some((region, agent)) = split_key(key) else {
        return Decoded::Poison("bad_key");
    };
    let batch = match vantage_proto::decode(payload.unwrap_or_default()) {
        Ok(b) => b,
        Err(e) => return Decoded::Poison(e.reason()),
    };
    // PostgreSQL (through postgres-types) refuses times past year 9999-ish; such a frame must
    // be dead-lettered here, or its write error would stop the sink on every restart.
    let times = batch.results.iter().map(|r| r.started_at_ms).chain(
        batch
            .gaps
            .iter()
            .flat_map(|g| [g.first_started_at_ms, g.last_started_at_ms]),
    );
    if times.into_iter().any(|t| t > db::MAX_TIME_MS) {
        return Decoded::Poison("time_out_of_range");
    }
    // Ids are `integer` in PostgreSQL: one above i32::MAX would be stored wrapped (negative).
    if batch
        .results
        .iter()
        .any(|r| !vantage_proto::is_valid_target_id(r.target_id))
    {
        return Decoded::Poison("target_id_out_of_range");
    }
    let rows = batch
        .results
        .iter()
        .map(|r| Row::new(region, agent, batch.boot_id, *r, batch.clock.as_ref()))
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
    Decoded::Rows(rows, gaps, batch.clock)
}

/// Runs the sink until `shutdown` fires; the batch being collected is written and its offsets
/// committed before it returns.
pub async fn run(config: &Config, shutdown: CancellationToken) -> Result<SinkStats, SinkError> {
    let kafka_config = config.kafka()?.clone();
    let pg_config = config.postgres()?.clone();
    let sink = config.sink.clone();

    // Shutdown may come while PostgreSQL or Kafka is still unreachable at start: nothing has
    // been consumed yet, so there is nothing to commit; the stage stops cleanly (exit 0).
    if !migrate_with_retry(&pg_config, &shutdown).await? {
        return Ok(stopped_while_reconnecting("PostgreSQL (migrations)"));
    }
    // Partitions ahead of time and retention, on a connection of their own (opened again
    // whenever PostgreSQL drops it): DDL never waits behind (or holds up) a batch.
    tokio::spawn(crate::storage::run(
        pg_config.clone(),
        config.storage.clone(),
        shutdown.clone(),
    ));
    // Rollups materialised behind a watermark, off the insert path (migration 0009).
    tokio::spawn(crate::storage::run_rollups(
        pg_config.clone(),
        config.storage.clone(),
        shutdown.clone(),
    ));
    let Some(client) = connect_with_retry(&pg_config, &shutdown).await? else {
        return Ok(stopped_while_reconnecting("PostgreSQL"));
    };
    let ensured = tokio::select! {
        r = kafka::ensure_topics(&kafka_config) => r,
        _ = shutdown.cancelled() => return Ok(stopped_while_reconnecting("Kafka")),
    };
    match ensured {
        Ok(()) => {}
        // The cluster cannot hold the configured replication: consuming on would let the
        // broker auto-create the dead-letter topic with its own defaults.
        Err(kafka::TopicError::Config { key, reason }) => {
            return Err(ConfigError::Invalid {
                file: config.file.clone(),
                key: key.into(),
                reason,
            }
            .into())
        }
        Err(e) => tracing::warn!(error = %e, "cannot create Kafka topics; continuing"),
    }
    let producer = kafka::Producer::new(&kafka_config)?;

    let durable = Arc::new(Mutex::new(Durable::default()));
    let has_brokers = Arc::new(AtomicBool::new(true));
    // Checks now and then that the consumer still has a broker (see `SinkContext`).
    let broker_check = tokio::time::interval(Duration::from_secs(5));
    let consumer: StreamConsumer<SinkContext> = kafka::consumer_config(&kafka_config)
        .set("group.id", &kafka_config.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "5000")
        .create_with_context(SinkContext {
            durable: durable.clone(),
            has_brokers: has_brokers.clone(),
        })?;
    consumer.subscribe(&[&kafka_config.topic])?;
    tracing::info!(
        topic = kafka_config.topic,
        group = kafka_config.group_id,
        "sink running"
    );

    let mut stage = Stage {
        // Which targets each agent was given (assign.rs), on a connection of its own.
        assignments: crate::assign::Assignments::new(&pg_config, config.storage.raw_retention),
        kafka: kafka_config,
        pg: pg_config,
        sink,
        client,
        producer,
        durable: durable.clone(),
        has_brokers,
        broker_check,
        // Poison messages can arrive at the input's rate: one log line per second at most.
        poison_log: crate::ratelimit::RateLimit::new("poison message", Duration::from_secs(1)),
        stats: SinkStats::default(),
        shutdown,
    };
    // The batches in a function of their own: however they end (shutdown, or an error that
    // stops the stage), the bounded commit-and-close below runs (shutdown.rs).
    let outcome = stage.batches(&consumer).await;
    let Stage {
        mut stats,
        producer,
        ..
    } = stage;
    // Final synchronous commit of everything durable, then leave the group, each bounded
    // (shutdown.rs: after a Kafka restart librdkafka could block here for ever). Once committed,
    // the revocation during close has nothing left to commit again.
    let tpl = lock(&durable).list()?;
    stats.revocation_commits = lock(&durable).revocation_commits;
    let on_committed = move || lock(&durable).next.clear();
    crate::shutdown::commit_and_close(
        consumer,
        (tpl.count() > 0).then_some(tpl),
        on_committed,
        producer,
    )
    .await;
    outcome?;
    tracing::info!(?stats, "sink stopped");
    Ok(stats)
}

/// What the batch loop works with, besides the consumer (whose messages borrow it).
struct Stage {
    kafka: crate::config::KafkaConfig,
    pg: PostgresConfig,
    sink: crate::config::SinkConfig,
    client: Client,
    producer: kafka::Producer,
    durable: Arc<Mutex<Durable>>,
    has_brokers: Arc<AtomicBool>,
    /// Checks now and then that the consumer still has a broker (see `SinkContext`).
    broker_check: tokio::time::Interval,
    assignments: crate::assign::Assignments,
    poison_log: crate::ratelimit::RateLimit,
    stats: SinkStats,
    shutdown: CancellationToken,
}

/// One batch on its way from Kafka to PostgreSQL.
#[derive(Default)]
struct Batch {
    writes: Writes,
    /// (topic, partition) → the offset after the batch's last message there.
    offsets: BTreeMap<(String, i32), i64>,
    /// Messages taken (decoded, or dead-lettered).
    count: usize,
    /// The rebalance generation when the first message came; the offsets are committed only if
    /// no revocation happened since.
    generation: Option<u64>,
}

impl Stage {
    /// The loop of named steps: collect, write, dead-letter what PostgreSQL refused, commit;
    /// until shutdown, or until a batch has to be left for replay (shutdown while a write or a
    /// dead letter was pending: nothing of it is committed, whoever consumes next replays it).
    async fn batches(&mut self, consumer: &StreamConsumer<SinkContext>) -> Result<(), SinkError> {
        while !self.shutdown.is_cancelled() {
            let Some(mut batch) = self.collect(consumer).await? else {
                return Ok(());
            };
            if batch.count == 0 {
                continue;
            }
            self.stats.messages += batch.count as u64;
            crate::metrics::sink().consumed.inc_by(batch.count as u64);
            if !self.write(&mut batch).await? || !self.dead_letter_refused(&mut batch).await {
                return Ok(());
            }
            self.commit(consumer, batch)?;
        }
        Ok(())
    }

    /// Collect: waits for a first message, then fills until `sink.batch_max` messages or
    /// `sink.batch_timeout` after the first. None: leave it for replay.
    async fn collect(
        &mut self,
        consumer: &StreamConsumer<SinkContext>,
    ) -> Result<Option<Batch>, SinkError> {
        let mut batch = Batch::default();
        let mut batch_deadline = None;
        while batch.count < self.sink.batch_max {
            let next = async {
                match batch_deadline {
                    Some(d) => tokio::time::timeout_at(d, consumer.recv()).await.ok(),
                    None => Some(consumer.recv().await),
                }
            };
            let received = tokio::select! {
                r = next => r,
                _ = self.shutdown.cancelled() => None,
                _ = self.broker_check.tick() => {
                    if !self.has_brokers.load(Ordering::Acquire)
                        && kafka::re_add_brokers(consumer.client(), &self.kafka.brokers)
                    {
                        tracing::error!(
                            brokers = self.kafka.brokers,
                            "Kafka consumer had no broker left (librdkafka lost them in a broker \
                             restart); kafka.brokers added again"
                        );
                        self.has_brokers.store(true, Ordering::Release);
                    }
                    continue;
                }
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
            batch_deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + self.sink.batch_timeout);
            // Read after the message: a revocation before it was served in this recv().
            batch
                .generation
                .get_or_insert_with(|| lock(&self.durable).generation);
            batch.count += 1;
            batch.offsets.insert(
                (message.topic().to_owned(), message.partition()),
                message.offset() + 1,
            );
            if !self.take(&mut batch, &message).await? {
                return Ok(None);
            }
        }
        Ok(Some(batch))
    }

    /// Decode: one message into the batch's writes, or to the dead-letter topic (poison,
    /// unassigned targets, agent clocks out of bounds). False: shutdown before a dead letter
    /// was delivered.
    async fn take(
        &mut self,
        batch: &mut Batch,
        message: &rdkafka::message::BorrowedMessage<'_>,
    ) -> Result<bool, SinkError> {
        let decoded = if is_status(message) {
            decode_status_message(
                message.key(),
                message.payload(),
                message.timestamp().to_millis(),
            )
        } else {
            decode_message(message.key(), message.payload())
        };
        let dead_letter_topic = &self.kafka.dead_letter_topic;
        match decoded {
            Decoded::Rows(mut r, g, clock) => {
                let delivered = drop_unassigned(
                    &mut self.assignments,
                    &mut r,
                    message.key(),
                    (&self.producer, dead_letter_topic),
                    &self.shutdown,
                    &mut self.stats,
                    &self.poison_log,
                )
                .await?;
                if !delivered {
                    tracing::warn!(
                        "shutdown before a dead letter was delivered; batch left for replay"
                    );
                    return Ok(false);
                }
                // Agent clocks are not trusted (clock.rs): what falls outside the window
                // around the bridge's clock is dead-lettered here, the rest is written.
                let letters = batch
                    .writes
                    .add_frame(&self.sink.clock, r, g, clock, message);
                for letter in letters {
                    if let Some(suppressed) = self.poison_log.allow() {
                        tracing::warn!(
                            key = %String::from_utf8_lossy(message.key().unwrap_or_default()),
                            reason = letter.reason,
                            results = letter.results,
                            skew_ms = letter.skew_ms,
                            suppressed,
                            "results refused: agent clock"
                        );
                    }
                    let bridge_ms = letter.bridge_ms.to_string();
                    if !dead_letter(
                        &self.producer,
                        dead_letter_topic,
                        message.key(),
                        &letter.payload,
                        letter.reason,
                        &[(kafka::BRIDGE_TIME_HEADER, &bridge_ms)],
                        &self.shutdown,
                    )
                    .await
                    {
                        tracing::warn!(
                            "shutdown before a dead letter was delivered; batch left for replay"
                        );
                        return Ok(false);
                    }
                    self.stats.dead_lettered += 1;
                    crate::metrics::sink().dead_lettered(letter.reason);
                    batch.writes.count_skew(&letter);
                }
            }
            Decoded::Status(s) => batch.writes.add_status(*s, message),
            Decoded::Poison(reason) => {
                if let Some(suppressed) = self.poison_log.allow() {
                    tracing::warn!(
                        partition = message.partition(),
                        offset = message.offset(),
                        reason,
                        suppressed,
                        "poison message"
                    );
                }
                let durable_letter = dead_letter(
                    &self.producer,
                    dead_letter_topic,
                    message.key(),
                    message.payload().unwrap_or_default(),
                    reason,
                    &[],
                    &self.shutdown,
                )
                .await;
                if !durable_letter {
                    // Its offset must not be committed: leave the whole batch for replay.
                    tracing::warn!(
                        "shutdown before a dead letter was delivered; batch left for replay"
                    );
                    return Ok(false);
                }
                self.stats.dead_lettered += 1;
                crate::metrics::sink().dead_lettered(reason);
            }
        }
        Ok(true)
    }

    /// Write, retrying transient failures for as long as it takes: offsets must not move past
    /// rows that are not durable. At shutdown, give up instead (false: nothing is committed, so
    /// the batch is replayed by whoever consumes next). `Writes` remembers what is done (each
    /// step is its own transaction), so a retry neither redoes nor recounts it.
    async fn write(&mut self, batch: &mut Batch) -> Result<bool, SinkError> {
        let writes = &mut batch.writes;
        let started = std::time::Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            match writes.run(&mut self.client).await {
                Ok(()) => break,
                Err(e) if e.is_transient() => {
                    self.stats.write_retries += 1;
                    crate::metrics::sink().write_retries.inc();
                    let pause = backoff.next_pause();
                    tracing::warn!(error = %e, retry_in = ?pause, "PostgreSQL write failed, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = self.shutdown.cancelled() => {
                            tracing::warn!(rows = writes.rows.len(), "shutdown while PostgreSQL is unavailable; batch left for replay");
                            return Ok(false);
                        }
                    }
                    if self.client.is_closed() {
                        self.client = match connect_with_retry(&self.pg, &self.shutdown).await? {
                            Some(c) => c,
                            None => {
                                tracing::warn!(rows = writes.rows.len(), "shutdown while reconnecting to PostgreSQL; batch left for replay");
                                return Ok(false);
                            }
                        };
                    }
                }
                // Not transient and not about one record (a missing table, permissions...):
                // the same batch would fail again; the stage stops.
                Err(e) => return Err(e.into()),
            }
        }
        if !(writes.rows.is_empty() && writes.gaps.is_empty()) {
            let written = writes.rows.len() - writes.refused_rows;
            crate::metrics::sink().batch_written(
                written,
                writes.inserted.results,
                writes.inserted.gaps,
                started.elapsed(),
            );
            self.stats.rows_inserted += writes.inserted.results;
            self.stats.rows_duplicate += written as u64 - writes.inserted.results;
            self.stats.gaps_inserted += writes.inserted.gaps;
            tracing::debug!(rows = written, inserted = ?writes.inserted, "batch written");
        }
        Ok(true)
    }

    /// What PostgreSQL refused goes to the dead-letter topic before any offset moves. False:
    /// shutdown before a dead letter was delivered.
    async fn dead_letter_refused(&mut self, batch: &mut Batch) -> bool {
        for refused in std::mem::take(&mut batch.writes.refused) {
            if let Some(suppressed) = self.poison_log.allow() {
                tracing::warn!(
                    key = %String::from_utf8_lossy(refused.key.as_deref().unwrap_or_default()),
                    sqlstate = refused.sqlstate,
                    error = refused.error,
                    suppressed,
                    "record refused by PostgreSQL"
                );
            }
            let durable_letter = dead_letter(
                &self.producer,
                &self.kafka.dead_letter_topic,
                refused.key.as_deref(),
                &refused.payload,
                REFUSED,
                &[
                    (kafka::SQLSTATE_HEADER, &refused.sqlstate),
                    (kafka::ERROR_HEADER, &refused.error),
                ],
                &self.shutdown,
            )
            .await;
            if !durable_letter {
                tracing::warn!(
                    "shutdown before a dead letter was delivered; batch left for replay"
                );
                return false;
            }
            self.stats.dead_lettered += 1;
            crate::metrics::sink().dead_lettered(REFUSED);
        }
        true
    }

    /// Commit: the rows are committed, so now, and only now, the offsets may advance (not if a
    /// revocation came since the batch's first message: the next owner replays it).
    fn commit(
        &mut self,
        consumer: &StreamConsumer<SinkContext>,
        batch: Batch,
    ) -> Result<(), SinkError> {
        self.stats.batches += 1;
        crate::metrics::sink().batch_durable();
        let commit = {
            let mut d = lock(&self.durable);
            if batch.generation != Some(d.generation) {
                self.stats.batches_uncommitted += 1;
                None
            } else {
                d.next.extend(batch.offsets);
                Some(d.list()?)
            }
        };
        if let Some(tpl) = commit {
            // Asynchronous: a lost commit only means a replay, and every later commit carries
            // all durable offsets again.
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                tracing::warn!(error = %e, "offset commit failed; messages will be replayed");
            }
        }
        Ok(())
    }
}

fn lock(durable: &Mutex<Durable>) -> std::sync::MutexGuard<'_, Durable> {
    durable.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes the rows for targets their agent was not given out of `rows` (one message's: one agent)
/// and dead-letters them as a frame of their own with reason `unassigned_target` (issue #14,
/// `assign.rs`). False if shutdown came before the dead letter was delivered.
async fn drop_unassigned(
    assignments: &mut crate::assign::Assignments,
    rows: &mut Vec<Row>,
    key: Option<&[u8]>,
    (producer, topic): (&kafka::Producer, &str),
    shutdown: &CancellationToken,
    stats: &mut SinkStats,
    log: &crate::ratelimit::RateLimit,
) -> Result<bool, SinkError> {
    let (assigned, refused) = match assignments.check(std::mem::take(rows), shutdown).await {
        Ok(split) => split,
        Err(crate::assign::AssignError::Stopped) => return Ok(false),
        Err(crate::assign::AssignError::Db(e)) => return Err(e.into()),
    };
    *rows = assigned;
    let Some(frame) = crate::assign::refused_frame(&refused) else {
        return Ok(true);
    };
    let reason = crate::assign::UNASSIGNED_REASON;
    if let Some(suppressed) = log.allow() {
        let ids: BTreeSet<u32> = refused.iter().map(|r| r.result.target_id).collect();
        tracing::warn!(
            region = %refused[0].region,
            agent = %refused[0].agent,
            target_ids = ?ids,
            results = refused.len(),
            suppressed,
            "results for targets this agent was not given, dead-lettered"
        );
    }
    if !dead_letter(producer, topic, key, &frame, reason, &[], shutdown).await {
        return Ok(false);
    }
    stats.dead_lettered += 1;
    crate::metrics::sink().dead_lettered(reason);
    Ok(true)
}

/// Sends a poison message to the dead-letter topic; false if `shutdown` came first (then the
/// batch must not be committed: the poison message's offset may advance only once its dead
/// letter is durable).
async fn dead_letter(
    producer: &kafka::Producer,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    reason: &str,
    extra_headers: &[(&str, &str)],
    shutdown: &CancellationToken,
) -> bool {
    let mut headers = kafka::dead_letter_headers("sink", reason, None);
    for &(key, value) in extra_headers {
        headers = headers.insert(rdkafka::message::Header {
            key,
            value: Some(value),
        });
    }
    kafka::produce_until_delivered(producer, topic, key, payload, Some(&headers), shutdown).await
}

/// Logs that the stage stopped before it consumed anything, and returns its (empty) counters.
fn stopped_while_reconnecting(what: &str) -> SinkStats {
    tracing::warn!(
        waiting_for = what,
        "shutdown while reconnecting; sink stopped before consuming (nothing to commit)"
    );
    let stats = SinkStats::default();
    tracing::info!(?stats, "sink stopped");
    stats
}

/// Connects to PostgreSQL for the batches, retrying with backoff while it is unreachable.
/// `Ok(None)`: shutdown came first (during an attempt or a backoff wait). Issue #14: this used
/// to return the last connect error, so a SIGTERM while PostgreSQL was restarting ended the
/// stage with exit 1 although it had nothing to lose.
async fn connect_with_retry(
    config: &PostgresConfig,
    shutdown: &CancellationToken,
) -> Result<Option<Client>, DbError> {
    // The attempt itself may take up to the connect timeout (a host that drops packets).
    retry_transient(shutdown, "cannot connect to PostgreSQL", || {
        db::connect_writer(config)
    })
    .await
}

/// Applies the migrations on a connection of its own, retrying (on a new connection) while
/// PostgreSQL is unreachable or restarts half-way: each migration is its own transaction under
/// an advisory lock, so a retry goes on where the last one stopped. False: shutdown came first.
async fn migrate_with_retry(
    config: &PostgresConfig,
    shutdown: &CancellationToken,
) -> Result<bool, DbError> {
    let migrated = retry_transient(shutdown, "migrations interrupted", || async {
        let Some(mut client) = connect_with_retry(config, shutdown).await? else {
            return Ok(false);
        };
        db::migrate(&mut client, &config.schema).await.map(|_| true)
    })
    .await?;
    Ok(migrated == Some(true))
}

/// Runs `attempt` until it succeeds or fails for good, pausing with backoff (200 ms doubling
/// to 10 s) after each transient failure, logged as "`what`, retrying". `Ok(None)`: shutdown
/// came first, during an attempt or a pause.
async fn retry_transient<T, F, Fut>(
    shutdown: &CancellationToken,
    what: &str,
    mut attempt: F,
) -> Result<Option<T>, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let Some(attempted) = shutdown.run_until_cancelled(attempt()).await else {
            return Ok(None);
        };
        match attempted {
            Ok(done) => return Ok(Some(done)),
            Err(e) if e.is_transient() => {
                let pause = backoff.next_pause();
                tracing::warn!(error = %e, retry_in = ?pause, "{what}, retrying");
                if !sleep_unless_stopped(shutdown, pause).await {
                    return Ok(None);
                }
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
            decode_message(Some(b"eu/pi"), Some(&[9])),
            Decoded::Poison("unknown_version")
        ));
        match decode_message(Some(b"eu/pi"), Some(&[1, 7, 0])) {
            Decoded::Rows(r, g, c) => assert!(r.is_empty() && g.is_empty() && c.is_none()),
            Decoded::Status(_) => panic!("a result frame decoded as a status"),
            Decoded::Poison(p) => panic!("{p}"),
        }
        // A status record that does not decode is poison too.
        assert!(matches!(
            decode_status_message(Some(b"eu/pi"), Some(&[1, 9]), None),
            Decoded::Poison("malformed")
        ));
    }

    /// Issue #14 item 7: a target id above i32::MAX (which PostgreSQL would store wrapped, as a
    /// negative number) is dead-lettered.
    #[test]
    fn target_ids_out_of_range_are_poison() {
        let frame = |id: u32| {
            let mut batch = vantage_proto::Batch {
                boot_id: 1,
                results: Default::default(),
                gaps: Default::default(),
                clock: None,
            };
            let mut r = crate::assign::tests_support::result();
            r.target_id = id;
            batch.results.push(r).unwrap();
            let mut buf = [0u8; vantage_proto::MAX_FRAME_LEN];
            vantage_proto::encode(&batch, &mut buf).unwrap().to_vec()
        };
        for id in [0, 2_147_483_648, u32::MAX] {
            assert!(
                matches!(
                    decode_message(Some(b"eu/pi"), Some(&frame(id))),
                    Decoded::Poison("target_id_out_of_range")
                ),
                "{id}"
            );
        }
        assert!(matches!(
            decode_message(Some(b"eu/pi"), Some(&frame(2_147_483_647))),
            Decoded::Rows(..)
        ));
    }

    /// Issue #18 item 3: each row gets its batch's clock state; results before the boot's first
    /// sync are marked, and frames without a clock give rows that say "unknown".
    #[test]
    fn rows_carry_the_clock_state_of_their_batch() {
        let mut batch = vantage_proto::Batch {
            boot_id: 1,
            results: Default::default(),
            gaps: Default::default(),
            clock: Some(vantage_proto::ClockHealth {
                synced: true,
                max_error_ms: 42,
                est_error_ms: 3,
                synced_from_seq: Some(5),
                boot_age_s: 60,
                sealed_at_ms: 1_800_000_000_000,
            }),
        };
        for seq in [4, 5, 6] {
            let mut r = crate::assign::tests_support::result();
            r.seq = seq;
            batch.results.push(r).unwrap();
        }
        let mut buf = [0u8; vantage_proto::MAX_FRAME_LEN];
        let frame = vantage_proto::encode(&batch, &mut buf).unwrap().to_vec();
        let Decoded::Rows(rows, _, clock) = decode_message(Some(b"eu/pi"), Some(&frame)) else {
            panic!("not rows");
        };
        assert_eq!(clock, batch.clock);
        assert_eq!(
            rows.iter()
                .map(|r| (r.clock_error_ms, r.clock_unsynced))
                .collect::<Vec<_>>(),
            [
                (Some(42), Some(true)),
                (Some(42), Some(false)),
                (Some(42), Some(false))
            ]
        );
        batch.clock = None;
        let frame = vantage_proto::encode_v2(&batch, &mut buf).unwrap().to_vec();
        let Decoded::Rows(rows, _, clock) = decode_message(Some(b"eu/pi"), Some(&frame)) else {
            panic!("not rows");
        };
        assert_eq!(clock, None);
        assert!(rows
            .iter()
            .all(|r| r.clock_error_ms.is_none() && r.clock_unsynced.is_none()));
    }

    /// What PostgreSQL would refuse is caught at decode time, so it is dead-lettered instead of
    /// failing the write (and stopping the sink on every restart).
    #[test]
    fn values_postgres_refuses_are_poison() {
        use vantage_proto::control::{encode_status, AgentState, AgentStatus, MAX_STATUS_LEN};
        let mut status = AgentStatus {
            state: AgentState::Heartbeat,
            agent_id: "pi".try_into().unwrap(),
            region: "eu".try_into().unwrap(),
            boot_id: 1,
            version: "0.1\0".try_into().unwrap(),
            sent_at_ms: u64::MAX,
            max_concurrency: 1,
            buffer_capacity: 1,
            targets: 0,
            pending_results: 0,
            region_set_generation: 0,
            agent_set_generation: 0,
            rejection: None,
        };
        let mut buf = [0u8; MAX_STATUS_LEN];
        let frame = encode_status(&status, &mut buf).unwrap().to_vec();
        assert!(matches!(
            decode_status_message(Some(b"eu/pi"), Some(&frame), Some(1)),
            Decoded::Poison("nul_byte")
        ));
        // The agent's own clock is not used: an absurd sent_at is harmless.
        status.version = "0.1".try_into().unwrap();
        let frame = encode_status(&status, &mut buf).unwrap().to_vec();
        match decode_status_message(Some(b"eu/pi"), Some(&frame), Some(1_764_000_000_000)) {
            Decoded::Status(row) => assert_eq!(row.at_ms, 1_764_000_000_000),
            _ => panic!("a valid status was refused"),
        }

        let mut batch = vantage_proto::Batch {
            boot_id: 1,
            results: Default::default(),
            gaps: Default::default(),
            clock: None,
        };
        batch
            .gaps
            .push(vantage_proto::Gap {
                first_seq: 0,
                count: 1,
                first_started_at_ms: 1,
                last_started_at_ms: db::MAX_TIME_MS + 1,
            })
            .unwrap();
        let mut buf = [0u8; vantage_proto::MAX_FRAME_LEN];
        let frame = vantage_proto::encode(&batch, &mut buf).unwrap().to_vec();
        assert!(matches!(
            decode_message(Some(b"eu/pi"), Some(&frame)),
            Decoded::Poison("time_out_of_range")
        ));
    }
}
