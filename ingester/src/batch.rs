//! One batch of the sink: the rows, gaps, agent statuses, clock-skew counts and agent clock
//! states it writes, and
//! the writer that keeps one record PostgreSQL refuses from stopping the stage.
//!
//! Each kind is written in its own transaction(s) and remembered as done, so a retry after a
//! transient error (connection lost, serialization failure: `DbError::is_transient`) goes on
//! where the last attempt stopped and counts nothing twice. A refusal of the data itself
//! (`DbError::refusal`: SQLSTATE classes 22, 23, 54, P0) used to end the sink, and every restart
//! replayed the same batch and died again; now [`db::Bisect`] narrows it down to the single
//! records PostgreSQL refuses, those go to the dead-letter topic (reason `postgres_refused`,
//! with the SQLSTATE and the server's message), and the rest of the batch is written.

use rdkafka::message::Message;
use tokio_postgres::Client;
use vantage_proto::{Batch, ClockHealth, Gap, ProbeResult};

use crate::clock::{self, ClockWindow, Refusal};
use crate::db::{self, Bisect, DbError, GapRow, Inserted, Row};
use crate::fleet::StatusRow;

/// Dead-letter reason of a record PostgreSQL refused.
pub const REFUSED: &str = "postgres_refused";

/// A record PostgreSQL refused, ready for the dead-letter topic.
#[derive(Debug, Clone)]
pub struct RefusedRecord {
    /// The Kafka key of the record it came from (`region/agent`).
    pub key: Option<Vec<u8>>,
    /// A status: its record's payload; a result or a gap: a frame of just that one.
    pub payload: Vec<u8>,
    pub sqlstate: String,
    /// The server's message (the values are in the payload, not here).
    pub error: String,
}

/// Results of one frame refused for their time, ready for the dead-letter topic.
#[derive(Debug, Clone)]
pub struct ClockLetter {
    pub refusal: Refusal,
    pub reason: &'static str,
    pub payload: Vec<u8>,
    pub results: usize,
    /// `started_at − bridge time` of the refused result furthest off (ms).
    pub skew_ms: i64,
    /// The bridge's time the results were judged by (the Kafka timestamp), ms.
    pub bridge_ms: i64,
    region: String,
    agent: String,
}

/// What one batch writes, and how far it got.
#[derive(Debug, Default)]
pub struct Writes {
    pub rows: Vec<Row>,
    pub gaps: Vec<GapRow>,
    statuses: Vec<StatusRow>,
    /// The Kafka key and payload of each status, for its dead letter.
    status_sources: Vec<(Option<Vec<u8>>, Vec<u8>)>,
    skew: clock::SkewCounts,
    /// Each agent's clock state from its latest frame (migration 0013).
    clocks: clock::AgentClocks,
    /// Rows then gaps, as one range `0..rows + gaps` (made at the first write).
    rows_todo: Option<Bisect>,
    statuses_todo: Option<Bisect>,
    skew_done: bool,
    clocks_done: bool,
    /// Inserted by the writes so far (the rest were already stored: replays).
    pub inserted: Inserted,
    /// Rows (not gaps) PostgreSQL refused.
    pub refused_rows: usize,
    /// Records PostgreSQL refused, for the dead-letter topic.
    pub refused: Vec<RefusedRecord>,
}

impl Writes {
    /// Adds one result frame's rows, after the clock check (`clock`: the frame's clock state,
    /// also kept for its agent's row): returns the dead letters of what the check refused
    /// (sent by the caller; [`Writes::count_skew`] once each is durable).
    pub fn add_frame(
        &mut self,
        window: &ClockWindow,
        rows: Vec<Row>,
        gaps: Vec<GapRow>,
        clock: Option<ClockHealth>,
        message: &impl Message,
    ) -> Vec<ClockLetter> {
        let now = crate::fleet::now_ms();
        let bridge = message.timestamp().to_millis().filter(|&t| t > 0);
        let (boot_id, region, agent) = match (rows.first(), gaps.first()) {
            (Some(r), _) => (r.boot_id, r.region.clone(), r.agent.clone()),
            (None, Some(g)) => (g.boot_id, g.region.clone(), g.agent.clone()),
            (None, None) => return Vec::new(),
        };
        if let Some(c) = &clock {
            let at = window.agent_clock(boot_id, c, bridge.unwrap_or(now));
            clock::keep_latest(&mut self.clocks, &region, &agent, at);
        }
        let checked = window.check(rows, gaps, clock.as_ref(), bridge, now);
        let whole =
            checked.rows.is_empty() && checked.gaps.is_empty() && checked.refused.len() == 1;
        let payload = message.payload().unwrap_or_default();
        let letters = checked
            .refused
            .iter()
            .map(|r| ClockLetter {
                refusal: r.refusal,
                reason: r.refusal.reason(),
                payload: if whole {
                    payload.to_vec()
                } else {
                    frame_of(boot_id, &r.results, &r.gaps).unwrap_or_else(|| payload.to_vec())
                },
                results: r.results.len(),
                skew_ms: r.worst_skew_ms,
                bridge_ms: bridge.unwrap_or(now),
                region: region.clone(),
                agent: agent.clone(),
            })
            .collect();
        self.rows.extend(checked.rows);
        self.gaps.extend(checked.gaps);
        letters
    }

    /// `letter` is durable in the dead-letter topic: counts it on its agent (metric, and the
    /// `agents` row written with this batch) if it is a clock skew.
    pub fn count_skew(&mut self, letter: &ClockLetter) {
        if letter.refusal != Refusal::ClockSkew || letter.results == 0 {
            return;
        }
        clock::count(
            &mut self.skew,
            &letter.region,
            &letter.agent,
            letter.results,
            letter.skew_ms,
            letter.bridge_ms,
        );
        crate::metrics::sink().clock_skew(&letter.region, &letter.agent, letter.results as u64);
    }

    /// Adds an agent status (applied in order, after this batch's rows).
    pub fn add_status(&mut self, status: StatusRow, message: &impl Message) {
        self.statuses.push(status);
        self.status_sources.push((
            message.key().map(<[u8]>::to_vec),
            message.payload().unwrap_or_default().to_vec(),
        ));
    }

    /// Writes what is not written yet: rows and gaps, then statuses, then clock-skew counts,
    /// then the agents' clock states.
    /// Returns the first error that is not a refusal of a record (transient ones: call again
    /// after a backoff; it goes on where it stopped).
    pub async fn run(&mut self, client: &mut Client) -> Result<(), DbError> {
        let n_rows = self.rows.len();
        let todo = self
            .rows_todo
            .get_or_insert_with(|| Bisect::new(n_rows + self.gaps.len()));
        while let Some(range) = todo.next() {
            let rows = &self.rows[range.start.min(n_rows)..range.end.min(n_rows)];
            let gaps = &self.gaps[range.start.max(n_rows) - n_rows..range.end.max(n_rows) - n_rows];
            match db::write_batch(client, rows, gaps).await {
                Ok(inserted) => {
                    self.inserted.results += inserted.results;
                    self.inserted.gaps += inserted.gaps;
                    todo.written();
                }
                Err(e) => {
                    let Some((sqlstate, error)) = e.refusal() else {
                        return Err(e);
                    };
                    let Some(i) = todo.refused() else {
                        continue;
                    };
                    let (key, payload) = if i < n_rows {
                        self.refused_rows += 1;
                        let r = &self.rows[i];
                        (
                            format!("{}/{}", r.region, r.agent),
                            frame_of(r.boot_id, &[r.result], &[]),
                        )
                    } else {
                        let g = &self.gaps[i - n_rows];
                        (
                            format!("{}/{}", g.region, g.agent),
                            frame_of(g.boot_id, &[], &[g.gap]),
                        )
                    };
                    self.refused.push(RefusedRecord {
                        key: Some(key.into_bytes()),
                        payload: payload.unwrap_or_default(),
                        sqlstate,
                        error,
                    });
                }
            }
        }
        let todo = self
            .statuses_todo
            .get_or_insert_with(|| Bisect::new(self.statuses.len()));
        while let Some(range) = todo.next() {
            match crate::fleet::write_statuses(client, &self.statuses[range]).await {
                Ok(()) => todo.written(),
                Err(e) => {
                    let Some((sqlstate, error)) = e.refusal() else {
                        return Err(e);
                    };
                    if let Some(i) = todo.refused() {
                        let (key, payload) = self.status_sources[i].clone();
                        self.refused.push(RefusedRecord {
                            key,
                            payload,
                            sqlstate,
                            error,
                        });
                    }
                }
            }
        }
        if !self.skew_done {
            // Counts, not data (the dead letters hold the results).
            unless_refused(clock::record(client, &self.skew).await, "clock-skew counts")?;
            self.skew_done = true;
        }
        if !self.clocks_done {
            // State, not data.
            unless_refused(
                clock::record_clocks(client, &self.clocks).await,
                "agent clock states",
            )?;
            self.clocks_done = true;
        }
        Ok(())
    }
}

/// The result of writing what a batch keeps beside its rows (counts, state): PostgreSQL
/// refusing it must not stop the batch, so a refusal is logged and passes; any other error
/// (a lost connection) stops the write, to be retried.
fn unless_refused(written: Result<(), DbError>, what: &str) -> Result<(), DbError> {
    match written {
        Err(e) if e.refusal().is_some() => {
            tracing::warn!(error = %e, "{what} refused by PostgreSQL; not recorded");
            Ok(())
        }
        other => other,
    }
}

/// A frame of `results` and `gaps` of boot `boot_id` (a subset of a decoded frame, so it fits);
/// None if it does not encode.
pub fn frame_of(boot_id: u64, results: &[ProbeResult], gaps: &[Gap]) -> Option<Vec<u8>> {
    let mut batch = Batch {
        boot_id,
        results: Default::default(),
        gaps: Default::default(),
        clock: None,
    };
    for r in results {
        batch.results.push(*r).ok()?;
    }
    for g in gaps {
        batch.gaps.push(*g).ok()?;
    }
    let mut buf = [0u8; vantage_proto::MAX_FRAME_LEN];
    vantage_proto::encode(&batch, &mut buf)
        .ok()
        .map(|b| b.to_vec())
}
