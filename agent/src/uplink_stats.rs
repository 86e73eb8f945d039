//! What the uplink reports about itself: its counters for one run ([`UplinkStats`]) and the
//! spool's figures ([`SpoolState`]). Plain data in a module of its own, so that the metrics
//! endpoint reads them without importing the uplink (which calls the metrics hooks): no cycle.

use crate::spool::SpoolStats;

/// What the uplink did during one run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UplinkStats {
    pub boot_id: u64,
    /// Results numbered (and so produced) in this boot: sequence numbers `0..results`.
    pub results: u64,
    /// Results dropped because the buffer overflowed (each is covered by a gap record).
    pub dropped: u64,
    /// Gap records created (several drops in a row make one record).
    pub gaps: u64,
    /// Frames encoded.
    pub frames: u64,
    /// Frames handed to the MQTT client (more than `frames` after a lost session).
    pub frames_published: u64,
    /// Frames the broker acknowledged.
    pub frames_acked: u64,
    /// Successful connections after the first one.
    pub reconnects: u64,
    /// Reconnects after which the broker no longer had the session (frames were re-sent).
    pub sessions_lost: u64,
    /// Results not acknowledged by the broker when the drain deadline passed (without a spool
    /// lost with the process, not covered by a gap record; with one they stay in the spool and
    /// the next start sends them).
    pub undelivered: u64,
    /// Records of earlier boots found in the spool at start (sent again with their own boot id
    /// and sequence numbers).
    pub replayed: u64,
    /// Records the spool found torn or corrupt at start (each covered by a gap record).
    pub replay_lost: u64,
    /// Records of earlier boots dropped because the spool was full (covered by gap records).
    pub dropped_replayed: u64,
    /// Results the full memory cache left on disk only (read back later; not a loss).
    pub evicted: u64,
    /// Spool writes that failed (retried at the next flush).
    pub spool_write_errors: u64,
    /// Frames the ingester acknowledged end to end (Kafka holds them).
    pub frames_e2e_acked: u64,
    /// Sum of the end-to-end latencies of those frames (first hand to the MQTT client → the
    /// ingester's acknowledgement), in milliseconds.
    pub e2e_latency_ms_total: u64,
    /// Frames sent again because no end-to-end acknowledgement came within
    /// `uplink.ack_timeout`.
    pub resends: u64,
    /// Frames the broker acknowledged and the ingester not yet (now, not a counter).
    pub unacked_frames: u64,
    /// Whether results are freed at the broker's PUBACK because no end-to-end acknowledgement
    /// ever came (`uplink.end_to_end_acks = "auto"` against an older ingester), or by config.
    pub puback_fallback: bool,
    /// PUBACKs that did not acknowledge the oldest publish in flight: the order the outbox
    /// relies on was broken (0 is the invariant; see `uplink.rs`).
    pub pubacks_out_of_order: u64,
}

/// The spool's figures at one moment (metrics).
#[derive(Debug, Clone)]
pub struct SpoolState {
    pub live_bytes: u64,
    pub max_bytes: u64,
    pub disk_bytes: u64,
    pub segments: usize,
    /// Age of the oldest result not yet acknowledged (from its probe start).
    pub oldest_unacked_age_ms: Option<u64>,
    pub io: SpoolStats,
}
