//! Bounded shutdown of the sink's librdkafka clients.
//!
//! librdkafka's blocking calls at the end of a consumer's life have no deadline of their own:
//! a synchronous offset commit waits for the group coordinator, `rd_kafka_consumer_close`
//! (rust-rdkafka's `Drop` for a consumer in a group polls until it reports closed) waits for
//! the rebalance and the LeaveGroup, and `rd_kafka_destroy` waits for every broker thread. After
//! a Kafka restart any of them can wait far longer than an orchestrator's stop timeout
//! (confluentinc/librdkafka#1002, #4131; `make test-crash` saw a sink miss its 30 s about one
//! run in four). So they run on a thread of their own and the stage waits for each step only
//! up to a deadline, the same workaround confluent-kafka-python#1667 describes (close on a
//! daemon thread, join with a timeout). A step that misses its deadline is logged and left to
//! the process exit.
//!
//! Durability is unchanged: only offsets of rows already committed in PostgreSQL are ever
//! committed; a commit that does not finish in time means the next owner replays those
//! messages, and the natural key absorbs the replay.

use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::TopicPartitionList;

/// Longest wait for the final synchronous offset commit.
pub const COMMIT_DEADLINE: Duration = Duration::from_secs(10);
/// Longest wait for leaving the group and destroying the clients, after the commit.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(5);

/// How the bounded shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Finished in time (commit: and succeeded).
    Done(Duration),
    /// Finished in time with an error (commit only).
    Failed(Duration),
    /// Still running at the deadline; left to the process exit.
    TimedOut,
}

/// Commits `commit` synchronously (if any), calls `on_committed` after a successful commit,
/// then closes `consumer` (leaves the group) and drops `also` (e.g. a producer), on a separate
/// thread; waits for each step at most [`COMMIT_DEADLINE`] / [`CLOSE_DEADLINE`].
pub async fn commit_and_close<C, A>(
    consumer: StreamConsumer<C>,
    commit: Option<TopicPartitionList>,
    on_committed: impl FnOnce() + Send + 'static,
    also: A,
) -> (Step, Step)
where
    C: ConsumerContext + 'static,
    A: Send + 'static,
{
    let (committed_tx, committed_rx) = tokio::sync::oneshot::channel();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let started = Instant::now();
    let spawned = std::thread::Builder::new()
        .name("kafka-close".into())
        .spawn(move || {
            if let Some(tpl) = commit {
                let r = consumer.commit(&tpl, CommitMode::Sync);
                if r.is_ok() {
                    on_committed();
                }
                let _ = committed_tx.send((r, started.elapsed()));
            } else {
                drop(committed_tx);
            }
            let close_started = Instant::now();
            drop(consumer);
            drop(also);
            let _ = closed_tx.send(close_started.elapsed());
        });
    if let Err(e) = spawned {
        // No thread: nothing was committed or closed; the next owner replays, the OS cleans up.
        tracing::error!(error = %e, "cannot start the Kafka close thread");
        return (Step::TimedOut, Step::TimedOut);
    }
    let commit_step = match tokio::time::timeout(COMMIT_DEADLINE, committed_rx).await {
        Ok(Ok((Ok(()), took))) => {
            tracing::info!(took_ms = took.as_millis() as u64, "final offsets committed");
            Step::Done(took)
        }
        Ok(Ok((Err(e), took))) => {
            tracing::warn!(error = %e, "final offset commit failed; messages will be replayed");
            Step::Failed(took)
        }
        // No commit was needed.
        Ok(Err(_)) => Step::Done(Duration::ZERO),
        Err(_) => {
            tracing::warn!(
                deadline = ?COMMIT_DEADLINE,
                "final offset commit did not finish in time; messages will be replayed"
            );
            Step::TimedOut
        }
    };
    let close_step = match tokio::time::timeout(CLOSE_DEADLINE, closed_rx).await {
        Ok(Ok(took)) => {
            tracing::info!(took_ms = took.as_millis() as u64, "Kafka consumer closed");
            Step::Done(took)
        }
        _ => {
            tracing::warn!(
                deadline = ?CLOSE_DEADLINE,
                "Kafka consumer did not close in time; leaving it to the process exit"
            );
            Step::TimedOut
        }
    };
    (commit_step, close_step)
}
