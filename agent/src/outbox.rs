//! The outbox: the uplink's state without I/O. It numbers results, keeps them in a bounded
//! cache in front of the spool, seals them into frames with the gap records of what had to be
//! dropped, hands frames to the MQTT client within the window ([`MAX_IN_FLIGHT`]), and frees
//! them at their end-to-end acknowledgement (or PUBACK, for an ingester without acks). Driven by
//! `uplink.rs` (which owns the connection); tested here without a broker.
//!
//! PUBACKs are matched to frames by order (see `uplink.rs`, "Why the uplink keeps frames until
//! PUBACK"); end-to-end acks by boot id and sequence ranges.
//!
//! Every frame carries the agent's clock state (`ClockHealth`, issue #18 item 3), read through
//! the [`ClockSource`] it is given (the kernel's, `clock_state::read`, in the agent) at each
//! result numbering and at each seal: the first sequence number numbered after the clock was
//! first seen synchronised is `synced_from_seq`, so the results before it are marked. Records
//! of an earlier boot read back from the spool carry the clock state written with them, and
//! this moment's seal time and boot age.

use std::collections::VecDeque;
use std::time::Duration;

use vantage_proto::ack::{Ack, SeqRange, MAX_FRAME_RANGES};
use vantage_proto::{Batch, ClockHealth, Gap, ProbeResult, MAX_FRAME_LEN, MAX_GAPS};

use crate::clock_state::Reading;
use crate::spool::{Replay, Spool};
pub use crate::uplink_stats::{SpoolState, UplinkStats};

/// QoS 1 publishes in flight (handed to rumqttc, no PUBACK yet), at most: the MQTT window.
pub const MAX_IN_FLIGHT: usize = 16;

/// Frames encoded and not yet acknowledged end to end, at most (each is kept with its exact
/// size, ≤ [`MAX_FRAME_LEN`]; typically ~1.3 KB at 32 results, so ~330 KB when full). Much
/// larger than the MQTT window so that throughput is bound by PUBACKs, not by the longer round
/// trip through Kafka: 256 frames of 32 results cover 8,192 results per end-to-end round trip.
pub const MAX_FRAMES: usize = 256;

/// Gap records waiting for a frame. Between two frames only one gap per boot can form (drops
/// between two frames are contiguous), each frame carries up to [`MAX_GAPS`], and a replay
/// brings the open gaps of earlier boots (a few each), so this does not fill.
const MAX_PENDING_GAPS: usize = 32;

/// Where a frame is on its way to Kafka.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FrameState {
    /// In the send queue (new, or to be sent again).
    Queued,
    /// With rumqttc, waiting for the broker's PUBACK.
    Handed,
    /// The broker has it (PUBACK at `at`, ms); waiting for the ingester's end-to-end ack.
    Published { at: u64 },
    /// Done: acknowledged end to end (or by PUBACK without end-to-end acks). Released from the
    /// front in order.
    Acked,
}

/// One encoded frame and what it carries.
struct Frame {
    /// Numbers frames in seal order; `frames[i].id == frames[0].id + i`.
    id: u64,
    state: FrameState,
    /// Times sent again after an ack timeout (the backoff's exponent).
    resends: u32,
    /// When it was first handed to rumqttc (ms; 0: not yet), for the end-to-end latency.
    first_handed_ms: u64,
    boot: u64,
    /// What an end-to-end acknowledgement of this frame must cover.
    ranges: heapless::Vec<SeqRange, MAX_FRAME_RANGES>,
    bytes: Box<[u8]>,
    results: usize,
    /// Spool positions below this are done once the frame is acknowledged.
    end_pos: u64,
    /// Spool bytes of its results.
    spool_bytes: u64,
    /// Its gap records (boot, first_seq), marked delivered in the spool at the acknowledgement.
    gaps: heapless::Vec<(u64, u64), MAX_GAPS>,
    /// Earliest probe start among its results (for the oldest-unacknowledged age).
    oldest_ms: Option<u64>,
}

/// A result in the memory cache, with its place in the spool (0 without a spool).
#[derive(Clone, Copy)]
struct Cached {
    result: ProbeResult,
    pos: u64,
    bytes: u64,
}

/// The uplink's state: numbering, the spool (if configured) with a bounded memory cache in
/// front of it, the pending gap records, and the encoded frames in order (the first `handed`
/// of them are with the MQTT client, waiting for the broker's PUBACK). The only I/O is the
/// spool's files ([`crate::spool`]); there is none without one, and unit tests give it a
/// temporary directory.
///
/// Without a spool (`uplink.spool_max_bytes = 0`) the cache is the whole buffer: when it is
/// full the oldest result not yet in a frame is dropped into a gap record. With a spool, a
/// result evicted from the full cache is only on disk and read back when its turn comes; results
/// are dropped (oldest not in a frame first) only when the spool holds `spool_max_bytes` of
/// unacknowledged records. Either way exactly one place drops, so each dropped result is
/// counted once and covered by exactly one gap record.
///
/// Order of sending: records read back from disk (earlier boots, then evicted ones of this
/// boot) before the cache; a frame holds one boot's records. Memory is fixed at start: the cache
/// is allocated once with the configured capacity and never grows (its capacity is a runtime
/// setting, so it cannot be a `heapless::Deque`); gaps live in a `heapless` container; the
/// frame queues are allocated once with [`MAX_FRAMES`] slots, each frame's bytes boxed at its
/// exact size (at most [`MAX_FRAMES`] × [`MAX_FRAME_LEN`]).
pub struct Outbox {
    boot_id: u64,
    batch_max: usize,
    capacity: usize,
    next_seq: u64,
    /// Results not yet in a frame, in sequence order (the newest ones when a spool is used).
    results: VecDeque<Cached>,
    spool: Option<Spool>,
    /// Next spool position to consider reading back (positions below are in frames, dropped
    /// or done). Records in `disk_next .. cache start` are only on disk.
    disk_next: u64,
    gaps: heapless::Deque<(u64, Gap), MAX_PENDING_GAPS>,
    /// Sealed frames not yet released, in seal order (see [`FrameState`]).
    frames: VecDeque<Frame>,
    next_frame_id: u64,
    /// Ids of frames to hand to rumqttc, in order (new frames and re-sends).
    send_queue: VecDeque<u64>,
    /// Ids of frames handed and waiting for PUBACK, in hand order (PUBACKs come in this order).
    in_flight: VecDeque<u64>,
    /// End-to-end acknowledgements: None when off (`uplink.end_to_end_acks = "off"`).
    e2e: Option<E2e>,
    /// The clock of the last [`Outbox::tick`] (ms).
    now_ms: u64,
    /// The frame encoder (`uplink.wire_format`): version 3 unless the ingester is older.
    encode: Encoder,
    clock: ClockTrack,
    stats: UplinkStats,
}

/// Reads the machine's clock state: `clock_state::read` in the agent, a fake in tests.
pub type ClockSource = Box<dyn FnMut() -> Option<Reading> + Send>;

/// What the outbox knows of the clock.
#[derive(Default)]
struct ClockTrack {
    /// None: no clock state at all (frames say "unknown").
    source: Option<ClockSource>,
    latest: Option<Reading>,
    /// The first seq of this boot numbered after a synchronised reading.
    synced_from_seq: Option<u64>,
}

/// Writes a batch as a frame of one format version (`vantage_proto::encode` or `encode_v2`).
pub type Encoder = for<'b> fn(&Batch, &'b mut [u8]) -> Result<&'b mut [u8], vantage_proto::Error>;

/// The end-to-end acknowledgement state of an outbox.
struct E2e {
    ack_timeout_ms: u64,
    /// An acknowledgement arrived in this boot: the ingester sends them, never fall back.
    seen: bool,
    /// No acknowledgement ever came within `ack_timeout` of a PUBACK: the ingester is older
    /// than end-to-end acknowledgements, so PUBACK frees frames (until an ack arrives).
    fallback: bool,
}

impl Outbox {
    /// # Panics
    /// If `batch_max` is not `1..=MAX_RESULTS` or `capacity` is 0 (config validation rejects both).
    pub fn new(boot_id: u64, batch_max: usize, capacity: usize) -> Outbox {
        assert!((1..=vantage_proto::MAX_RESULTS).contains(&batch_max) && capacity > 0);
        Outbox {
            boot_id,
            batch_max,
            capacity,
            next_seq: 0,
            results: VecDeque::with_capacity(capacity),
            spool: None,
            disk_next: 0,
            gaps: heapless::Deque::new(),
            frames: VecDeque::with_capacity(MAX_FRAMES),
            next_frame_id: 0,
            send_queue: VecDeque::with_capacity(MAX_FRAMES),
            in_flight: VecDeque::with_capacity(MAX_IN_FLIGHT),
            e2e: None,
            now_ms: 0,
            encode: vantage_proto::encode,
            clock: ClockTrack::default(),
            stats: UplinkStats {
                boot_id,
                puback_fallback: true,
                ..UplinkStats::default()
            },
        }
    }

    /// Frees frames only at the ingester's end-to-end acknowledgement ([`Outbox::e2e_ack`]),
    /// re-sending a frame the broker acknowledged when none came within `ack_timeout`; falls
    /// back to PUBACK while no acknowledgement at all has come (see [`Outbox::tick`]).
    pub fn with_e2e_acks(mut self, ack_timeout: Duration) -> Outbox {
        self.e2e = Some(E2e {
            ack_timeout_ms: ack_timeout.as_millis().max(1) as u64,
            seen: false,
            fallback: false,
        });
        self.stats.puback_fallback = false;
        self
    }

    /// Frames in another format version than the current one (`uplink.wire_format = 2` for an
    /// ingester older than version 3 frames).
    pub fn with_encoder(mut self, encode: Encoder) -> Outbox {
        self.encode = encode;
        self
    }

    /// Frames carry the clock state `source` reads (without one they say "unknown").
    pub fn with_clock(mut self, source: ClockSource) -> Outbox {
        self.clock.source = Some(source);
        self.observe_clock();
        self
    }

    /// Reads the clock; the first synchronised reading of this boot marks the next sequence
    /// number as the first taken with a set clock. The spool writes the state with the next
    /// flush's results.
    fn observe_clock(&mut self) {
        let Some(source) = &mut self.clock.source else {
            return;
        };
        let reading = source();
        if reading.is_some_and(|r| r.synced) && self.clock.synced_from_seq.is_none() {
            self.clock.synced_from_seq = Some(self.next_seq);
        }
        self.clock.latest = reading;
        let health = self.clock_health();
        if let Some(s) = &mut self.spool {
            s.set_clock(health);
        }
    }

    /// The latest reading as this boot's clock health.
    fn clock_health(&self) -> Option<ClockHealth> {
        self.clock.latest.map(|r| ClockHealth {
            synced: r.synced,
            max_error_ms: r.max_error_ms(),
            est_error_ms: r.est_error_ms(),
            synced_from_seq: self.clock.synced_from_seq,
            boot_age_s: r.boot_age_s(),
            sealed_at_ms: r.wall_ms,
        })
    }

    /// The clock of a frame of an earlier boot's records: the state written with them (the
    /// worst of their groups', the latest synced-from seq), sealed now (this moment's seal
    /// time and boot age, which the ingester compares with its clock).
    fn replayed_clock(&self, stored: Option<ClockHealth>) -> Option<ClockHealth> {
        let mut c = stored?;
        if let Some(now) = self.clock.latest {
            c.sealed_at_ms = now.wall_ms;
            c.boot_age_s = now.boot_age_s();
        }
        Some(c)
    }

    /// The drain at a stop started: waits for end-to-end acks (a re-send, or the PUBACK
    /// fallback when no ack ever came) are cut to `limit` so that they happen before the drain
    /// deadline (`uplink.drain_timeout / 2`).
    pub fn draining(&mut self, limit: Duration) {
        if let Some(e2e) = &mut self.e2e {
            e2e.ack_timeout_ms = e2e.ack_timeout_ms.min(limit.as_millis().max(1) as u64);
        }
    }

    /// An outbox in front of an opened spool: what the spool replayed is sent first, with its
    /// own boot ids and sequence numbers, and its gap records too.
    pub fn with_spool(
        boot_id: u64,
        batch_max: usize,
        capacity: usize,
        spool: Spool,
        replay: &Replay,
    ) -> Outbox {
        let mut o = Outbox::new(boot_id, batch_max, capacity);
        o.stats.replayed = replay.records;
        o.stats.replay_lost = replay.lost;
        o.disk_next = 0;
        for &(boot, gap) in &replay.gaps {
            if o.gaps.push_back((boot, gap)).is_err() {
                // More than MAX_PENDING_GAPS open gaps across old boots: rare (each boot's
                // drops make at most a few). The spool still has it; the next start sends it.
                tracing::warn!(
                    boot_id = boot,
                    first_seq = gap.first_seq,
                    "too many replayed gap records; this one waits for the next start"
                );
            }
        }
        o.spool = Some(spool);
        o
    }

    /// Numbers `result` (its `seq` is overwritten) and buffers it (and appends it to the spool,
    /// written at the next flush). Returns the sequence number given.
    pub fn push(&mut self, mut result: ProbeResult) -> u64 {
        self.observe_clock();
        if self.results.len() == self.capacity {
            self.evict();
        }
        result.seq = self.next_seq;
        self.next_seq += 1;
        self.stats.results += 1;
        let (pos, bytes) = match &mut self.spool {
            Some(s) => s.append(self.boot_id, &result),
            None => (0, 0),
        };
        self.results.push_back(Cached { result, pos, bytes });
        result.seq
    }

    /// The cache is full: its oldest result leaves memory. With a spool it stays on disk (and
    /// is read back when its turn comes); it must be written first. Without one (or if the
    /// write fails) it is dropped into a gap record.
    fn evict(&mut self) {
        let on_disk = match (&mut self.spool, self.results.front()) {
            (Some(s), Some(front)) => {
                if front.pos >= s.written() {
                    if let Err(e) = s.flush() {
                        tracing::error!(error = %e, "spool write failed");
                    }
                }
                front.pos < s.written()
            }
            _ => false,
        };
        if on_disk {
            self.results.pop_front();
            self.stats.evicted += 1;
        } else if let Some(old) = self.results.pop_front() {
            self.drop_cached(old);
        }
    }

    fn drop_cached(&mut self, c: Cached) {
        if let Some(s) = &mut self.spool {
            s.dropped(c.pos, c.bytes);
            self.disk_next = self.disk_next.max(c.pos + 1);
        }
        self.record_drop(self.boot_id, &c.result);
    }

    /// First spool position held by the cache (the tail when it is empty).
    fn cache_start(&self) -> u64 {
        match (self.results.front(), &self.spool) {
            (Some(c), _) => c.pos,
            (None, Some(s)) => s.tail(),
            (None, None) => 0,
        }
    }

    fn record_drop(&mut self, boot: u64, r: &ProbeResult) {
        if boot == self.boot_id {
            self.stats.dropped += 1;
        } else {
            self.stats.dropped_replayed += 1;
        }
        if let Some((b, last)) = self.gaps.back_mut() {
            if *b == boot
                && last.first_seq + u64::from(last.count) == r.seq
                && last.count < u32::MAX
            {
                last.count += 1;
                last.first_started_at_ms = last.first_started_at_ms.min(r.started_at_ms);
                last.last_started_at_ms = last.last_started_at_ms.max(r.started_at_ms);
                let gap = *last;
                if let Some(s) = &mut self.spool {
                    s.gap_changed(boot, &gap);
                }
                return;
            }
        }
        let gap = Gap {
            first_seq: r.seq,
            count: 1,
            first_started_at_ms: r.started_at_ms,
            last_started_at_ms: r.started_at_ms,
        };
        self.stats.gaps += 1;
        if let Some(s) = &mut self.spool {
            s.gap_changed(boot, &gap);
        }
        if let Err((_, gap)) = self.gaps.push_back((boot, gap)) {
            // Unreachable (see MAX_PENDING_GAPS). Keep the count exact rather than lose it: fold
            // into the last record, whose range then also spans results that were sent.
            tracing::error!(
                first_seq = gap.first_seq,
                "gap list full, merging gap records"
            );
            if let Some((b, last)) = self.gaps.back_mut() {
                last.count = last.count.saturating_add(1);
                last.last_started_at_ms = r.started_at_ms;
                let (b, last) = (*b, *last);
                if let Some(s) = &mut self.spool {
                    s.gap_changed(b, &last);
                }
            }
        }
    }

    /// Writes the spool (one write), then drops the oldest records not in a frame while the
    /// spool holds more than `spool_max_bytes`. Does nothing without a spool.
    pub fn flush_spool(&mut self) {
        let Some(s) = &mut self.spool else { return };
        if let Err(e) = s.flush() {
            self.stats.spool_write_errors += 1;
            tracing::error!(error = %e, "spool write failed; retried at the next flush");
        }
        loop {
            let Some(s) = &mut self.spool else { return };
            if s.live_bytes() <= s.max_bytes() {
                return;
            }
            let limit = match self.results.front() {
                Some(c) => c.pos,
                None => s.tail(),
            };
            if let Some(r) = s.read_next(self.disk_next, limit) {
                s.dropped(r.pos, r.bytes);
                self.disk_next = r.pos + 1;
                self.record_drop(r.boot_id, &r.result);
            } else if let Some(c) = self.results.pop_front() {
                self.drop_cached(c);
            } else {
                // Everything left is in frames: those are never dropped.
                return;
            }
        }
    }

    /// Encodes buffered results into frames while there is room: records read back from disk
    /// first, then every full batch of the cache, and when `partial` also a last partial one
    /// (or a frame with only gap records). With a spool, only results already written are
    /// sealed (it is flushed first when needed).
    pub fn seal(&mut self, partial: bool) {
        if self.spool.as_ref().is_some_and(|s| s.dirty()) {
            let written = self.spool.as_ref().map_or(0, |s| s.written());
            let written_cached = self.results.partition_point(|c| c.pos < written);
            // Flush when a frame would need unwritten results (and at every partial seal: the
            // flush tick, which also persists acknowledgements).
            if partial || (written_cached < self.batch_max && self.results.len() >= self.batch_max)
            {
                self.flush_spool();
            }
        }
        // At most MAX_IN_FLIGHT frames not yet with the broker (as before end-to-end acks): what
        // waits for the broker stays in the cache and the spool, where the bounds and the gap
        // accounting apply; only frames the broker has may pile up to MAX_FRAMES.
        let mut unpublished = self.unpublished();
        while self.frames.len() < MAX_FRAMES && unpublished < MAX_IN_FLIGHT {
            unpublished += 1;
            if self.seal_from_disk() {
                continue;
            }
            // Gaps of earlier boots whose records are all in frames: gap-only frames.
            if let Some(boot) = self
                .gaps
                .iter()
                .map(|(b, _)| *b)
                .find(|b| *b != self.boot_id)
            {
                self.push_frame(boot, heapless::Vec::new(), None, 0, None);
                continue;
            }
            let written = self.spool.as_ref().map_or(u64::MAX, |s| s.written());
            let ready = self
                .results
                .iter()
                .take(self.batch_max)
                .take_while(|c| self.spool.is_none() || c.pos < written)
                .count();
            let full = ready >= self.batch_max;
            let current_gaps = self.gaps.iter().any(|(b, _)| *b == self.boot_id);
            if !(full || (partial && (ready > 0 || current_gaps))) {
                return;
            }
            let mut results = heapless::Vec::new();
            let mut bytes = 0;
            let mut end = None;
            for c in self.results.drain(..ready) {
                // Cannot fail: ready <= batch_max <= MAX_RESULTS.
                let _ = results.push(c.result);
                bytes += c.bytes;
                end = Some(c.pos + 1);
            }
            if let Some(end) = end {
                if self.spool.is_some() {
                    self.disk_next = self.disk_next.max(end);
                }
            }
            self.observe_clock();
            let clock = self.clock_health();
            self.push_frame(self.boot_id, results, end, bytes, clock);
        }
    }

    /// Seals one frame of records read back from the spool; false when there is none.
    fn seal_from_disk(&mut self) -> bool {
        let limit = self.cache_start();
        let Some(s) = &mut self.spool else {
            return false;
        };
        let Some(first) = s.peek(self.disk_next, limit) else {
            return false;
        };
        let boot = first.boot_id;
        let mut results = heapless::Vec::new();
        let mut bytes = 0;
        let mut end = first.pos;
        let mut stored = first.clock;
        while results.len() < self.batch_max {
            match s.peek(self.disk_next, limit) {
                Some(r) if r.boot_id == boot => {
                    let _ = s.read_next(self.disk_next, limit);
                    let _ = results.push(r.result);
                    bytes += r.bytes;
                    end = r.pos + 1;
                    self.disk_next = end;
                    stored = worse_clock(stored, r.clock);
                }
                _ => break,
            }
        }
        let clock = if boot == self.boot_id {
            // Evicted records of this boot: its own clock state is the current one.
            self.observe_clock();
            self.clock_health()
        } else {
            self.observe_clock();
            self.replayed_clock(stored)
        };
        self.push_frame(boot, results, Some(end), bytes, clock);
        true
    }

    /// Encodes one frame of `boot`'s `results` with that boot's pending gaps (up to
    /// [`MAX_GAPS`]).
    fn push_frame(
        &mut self,
        boot: u64,
        results: heapless::Vec<ProbeResult, { vantage_proto::MAX_RESULTS }>,
        end: Option<u64>,
        spool_bytes: u64,
        clock: Option<ClockHealth>,
    ) {
        let n = results.len();
        let oldest_ms = results.iter().map(|r| r.started_at_ms).min();
        let mut batch = Batch {
            boot_id: boot,
            results,
            gaps: heapless::Vec::new(),
            clock,
        };
        let mut frame_gaps = heapless::Vec::new();
        let mut i = 0;
        while batch.gaps.len() < MAX_GAPS && i < self.gaps.len() {
            let mine = self.gaps.iter().nth(i).is_some_and(|(b, _)| *b == boot);
            if !mine {
                i += 1;
                continue;
            }
            // Remove the i-th entry, keeping the order of the rest.
            let mut kept: heapless::Deque<(u64, Gap), MAX_PENDING_GAPS> = heapless::Deque::new();
            let mut taken = None;
            for (j, g) in self.gaps.iter().enumerate() {
                if j == i {
                    taken = Some(*g);
                } else {
                    let _ = kept.push_back(*g);
                }
            }
            self.gaps = kept;
            if let Some((_, g)) = taken {
                let _ = batch.gaps.push(g);
                let _ = frame_gaps.push((boot, g.first_seq));
            }
        }
        let mut buf = [0u8; MAX_FRAME_LEN];
        let bytes: Box<[u8]> = match (self.encode)(&batch, &mut buf) {
            Ok(frame) => Box::from(&frame[..]),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode batch, dropping it");
                self.stats.undelivered += n as u64;
                return;
            }
        };
        self.stats.frames += 1;
        let end_pos = end.unwrap_or(self.disk_next.min(self.cache_start()));
        let id = self.next_frame_id;
        self.next_frame_id += 1;
        self.send_queue.push_back(id);
        self.frames.push_back(Frame {
            id,
            state: FrameState::Queued,
            resends: 0,
            first_handed_ms: 0,
            boot,
            ranges: vantage_proto::ack::frame_ranges(&batch),
            bytes,
            results: n,
            end_pos,
            spool_bytes,
            gaps: frame_gaps,
            oldest_ms,
        });
    }

    /// Frames sealed and not yet acknowledged by the broker (queued or in flight).
    fn unpublished(&self) -> usize {
        self.frames
            .iter()
            .filter(|f| matches!(f.state, FrameState::Queued | FrameState::Handed))
            .count()
    }

    fn frame_mut(&mut self, id: u64) -> Option<&mut Frame> {
        let first = self.frames.front()?.id;
        let i = usize::try_from(id.checked_sub(first)?).ok()?;
        self.frames.get_mut(i)
    }

    /// The next frame to hand to the MQTT client, if any is waiting and the MQTT window
    /// ([`MAX_IN_FLIGHT`] publishes without PUBACK) has room.
    pub fn next_unhanded(&mut self) -> Option<&[u8]> {
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            return None;
        }
        // Skip ids released or acknowledged meanwhile (an ack can overtake a re-send).
        while let Some(&id) = self.send_queue.front() {
            match self.frame_mut(id) {
                Some(f) if f.state == FrameState::Queued => break,
                _ => {
                    self.send_queue.pop_front();
                }
            }
        }
        let id = *self.send_queue.front()?;
        let first = self.frames.front()?.id;
        self.frames.get((id - first) as usize).map(|f| &f.bytes[..])
    }

    /// The frame returned by [`Outbox::next_unhanded`] is now with the MQTT client.
    pub fn mark_handed(&mut self) {
        let Some(id) = self.send_queue.pop_front() else {
            return;
        };
        let now = self.now_ms;
        if let Some(f) = self.frame_mut(id) {
            f.state = FrameState::Handed;
            if f.first_handed_ms == 0 {
                f.first_handed_ms = now.max(1);
            }
            self.in_flight.push_back(id);
            self.stats.frames_published += 1;
        }
    }

    /// Frames handed to rumqttc and not yet acknowledged by the broker.
    pub fn handed(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether the broker's PUBACK frees a frame (no end-to-end acks, or the fallback).
    fn puback_frees(&self) -> bool {
        self.e2e.as_ref().is_none_or(|e| e.fallback)
    }

    /// The broker acknowledged the oldest `n` handed frames. Without end-to-end acks (or in
    /// the fallback) they are done: forget them and free their spool space (persisted at the
    /// next flush); otherwise they wait for the ingester's acknowledgement. Either way the
    /// MQTT window has room again.
    pub fn acked(&mut self, n: u64) {
        for _ in 0..n {
            let Some(id) = self.in_flight.pop_front() else {
                tracing::warn!("PUBACK without a frame in flight, ignored");
                break;
            };
            self.stats.frames_acked += 1;
            let frees = self.puback_frees();
            let now = self.now_ms;
            if let Some(f) = self.frame_mut(id) {
                if f.state == FrameState::Handed {
                    f.state = if frees {
                        FrameState::Acked
                    } else {
                        FrameState::Published { at: now }
                    };
                }
            }
        }
        self.release();
    }

    /// An end-to-end acknowledgement arrived: every frame of its boot whose ranges it covers
    /// is done (in whatever state: one overtaken by its own re-send is done too).
    pub fn e2e_ack(&mut self, ack: &Ack) {
        let Some(e2e) = &mut self.e2e else { return };
        if !e2e.seen || e2e.fallback {
            tracing::info!(
                "end-to-end acknowledgements from the ingester: results are freed only once Kafka holds them"
            );
        }
        e2e.seen = true;
        e2e.fallback = false;
        let now = self.now_ms;
        for f in self.frames.iter_mut() {
            if f.boot == ack.boot_id
                && f.state != FrameState::Acked
                && !f.ranges.is_empty()
                && ack.covers_all(&f.ranges)
            {
                f.state = FrameState::Acked;
                self.stats.frames_e2e_acked += 1;
                if f.first_handed_ms > 0 {
                    let latency = now.saturating_sub(f.first_handed_ms);
                    self.stats.e2e_latency_ms_total += latency;
                    crate::metrics::e2e_ack_latency(latency);
                }
            }
        }
        self.release();
    }

    /// Advances the outbox's clock: frames the broker acknowledged that waited longer than
    /// the ack timeout (doubling per re-send, at most 8 times) are queued again. While no
    /// end-to-end acknowledgement has ever come in this boot, the first such timeout instead
    /// switches to the PUBACK fallback: the ingester is one from before end-to-end acks (or
    /// the ACL does not let it write the ack topic), so PUBACK frees frames, as before.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        let Some(e2e) = &mut self.e2e else { return };
        if e2e.fallback {
            return;
        }
        let timeout = e2e.ack_timeout_ms;
        let seen = e2e.seen;
        let mut expired = Vec::new();
        for f in &self.frames {
            if let FrameState::Published { at } = f.state {
                let wait = timeout.saturating_mul(1 << f.resends.min(3));
                if now_ms.saturating_sub(at) >= wait {
                    expired.push(f.id);
                }
            }
        }
        if expired.is_empty() {
            return;
        }
        if !seen {
            tracing::warn!(
                timeout_ms = timeout,
                "no end-to-end acknowledgement from the ingester within uplink.ack_timeout: \
                 assuming an ingester without them, results are freed at the broker's PUBACK"
            );
            e2e.fallback = true;
            for f in self.frames.iter_mut() {
                if matches!(f.state, FrameState::Published { .. }) {
                    f.state = FrameState::Acked;
                }
            }
            self.release();
            return;
        }
        for id in expired {
            if let Some(f) = self.frame_mut(id) {
                f.state = FrameState::Queued;
                f.resends += 1;
                self.stats.resends += 1;
                self.send_queue.push_back(id);
            }
        }
    }

    /// Releases done frames from the front, in order (the spool's acknowledged-up-to marker
    /// only moves forward).
    fn release(&mut self) {
        while self
            .frames
            .front()
            .is_some_and(|f| f.state == FrameState::Acked)
        {
            if let Some(f) = self.frames.pop_front() {
                if let Some(s) = &mut self.spool {
                    s.ack(f.end_pos, f.results as u64, f.spool_bytes);
                    for &(boot, seq) in &f.gaps {
                        s.gap_done(boot, seq);
                    }
                }
            }
        }
        self.stats.unacked_frames = self
            .frames
            .iter()
            .filter(|f| matches!(f.state, FrameState::Published { .. }))
            .count() as u64;
        self.stats.puback_fallback = self.puback_frees();
    }

    /// The broker lost the session, and rumqttc dropped what it had not delivered: every frame
    /// handed and not yet acknowledged by the broker must be handed again, first, in order.
    pub fn session_lost(&mut self) {
        while let Some(id) = self.in_flight.pop_back() {
            if let Some(f) = self.frame_mut(id) {
                if f.state == FrameState::Handed {
                    f.state = FrameState::Queued;
                    self.send_queue.push_front(id);
                }
            }
        }
        self.stats.sessions_lost += 1;
    }

    /// Results not yet acknowledged by the broker (in memory, in frames, or only on disk).
    pub fn pending_results(&self) -> usize {
        match &self.spool {
            Some(s) => s.live_records() as usize,
            None => self.results.len() + self.frames.iter().map(|f| f.results).sum::<usize>(),
        }
    }

    /// Nothing left to deliver: no result, gap or frame waits.
    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
            && self.gaps.is_empty()
            && self.frames.is_empty()
            && self.spool.as_ref().is_none_or(|s| s.live_records() == 0)
    }

    pub fn stats(&self) -> &UplinkStats {
        &self.stats
    }

    /// The spool's state for metrics (None without a spool).
    pub fn spool_state(&mut self, now_ms: u64) -> Option<SpoolState> {
        let oldest = self
            .frames
            .front()
            .and_then(|f| f.oldest_ms)
            .or_else(|| {
                let limit = self.cache_start();
                let from = self.disk_next;
                self.spool
                    .as_mut()
                    .and_then(|s| s.peek(from, limit))
                    .map(|r| r.result.started_at_ms)
            })
            .or_else(|| self.results.front().map(|c| c.result.started_at_ms));
        let s = self.spool.as_ref()?;
        Some(SpoolState {
            live_bytes: s.live_bytes(),
            max_bytes: s.max_bytes(),
            disk_bytes: s.disk_bytes(),
            segments: s.segments(),
            oldest_unacked_age_ms: oldest.map(|t| now_ms.saturating_sub(t)),
            io: s.stats().clone(),
        })
    }

    /// The spool, for tests and the benchmark.
    pub fn spool(&self) -> Option<&Spool> {
        self.spool.as_ref()
    }
}

/// The clock state of records from two spool groups of one boot: synchronised only if both
/// were, the larger errors, the synced-from seq once known (it only goes from None to a
/// value within a boot). Unknown if either is unknown.
fn worse_clock(a: Option<ClockHealth>, b: Option<ClockHealth>) -> Option<ClockHealth> {
    let (a, b) = (a?, b?);
    Some(ClockHealth {
        synced: a.synced && b.synced,
        max_error_ms: a.max_error_ms.max(b.max_error_ms),
        est_error_ms: a.est_error_ms.max(b.est_error_ms),
        synced_from_seq: b.synced_from_seq.or(a.synced_from_seq),
        ..b
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vantage_proto::{Outcome, RegexOutcome};

    fn result(started_at_ms: u64) -> ProbeResult {
        ProbeResult {
            seq: 999,
            target_id: 1,
            started_at_ms,
            status: 200,
            outcome: Outcome::Up,
            failed_phase: None,
            regex: RegexOutcome::NotConfigured,
            total_us: 1000,
            dns_us: None,
            connect_us: Some(100),
            tls_us: None,
            ttfb_us: Some(500),
            transfer_us: Some(10),
            body_bytes: 10,
            body_truncated: false,
            redirects: 0,
            cert_not_after_s: None,
            remote_ip: None,
            kind: vantage_proto::ProbeKind::Http,
            tls_version: None,
            dns: None,
        }
    }

    /// Hands every waiting frame to a fake client, returning the decoded batches.
    fn hand_all(o: &mut Outbox) -> Vec<Batch> {
        let mut out = Vec::new();
        while let Some(f) = o.next_unhanded() {
            out.push(vantage_proto::decode(f).unwrap());
            o.mark_handed();
        }
        out
    }

    fn seqs(batches: &[Batch]) -> Vec<u64> {
        batches
            .iter()
            .flat_map(|b| b.results.iter().map(|r| r.seq))
            .collect()
    }

    #[test]
    fn numbers_and_batches_in_order() {
        let mut o = Outbox::new(7, 4, 100);
        for i in 0..10 {
            assert_eq!(o.push(result(i)), i);
        }
        o.seal(false);
        let b = hand_all(&mut o);
        assert_eq!(b.len(), 2, "only full batches without `partial`");
        assert!(b.iter().all(|b| b.boot_id == 7 && b.results.len() == 4));
        o.seal(true);
        let b2 = hand_all(&mut o);
        assert_eq!(seqs(&b2), vec![8, 9]);
        assert_eq!(o.pending_results(), 10, "nothing acknowledged yet");
        o.acked(3);
        assert!(o.is_empty());
        assert_eq!(o.stats().frames_acked, 3);
    }

    #[test]
    fn overflow_drops_oldest_unsent_and_records_one_gap() {
        let mut o = Outbox::new(1, 2, 5);
        for i in 0..12 {
            o.push(result(1000 + i));
        }
        // 7 oldest dropped (0..=6), 5 kept (7..=11), one contiguous gap.
        assert_eq!(o.stats().dropped, 7);
        assert_eq!(o.stats().gaps, 1);
        o.seal(true);
        let b = hand_all(&mut o);
        assert_eq!(seqs(&b), vec![7, 8, 9, 10, 11]);
        let gaps: Vec<Gap> = b.iter().flat_map(|b| b.gaps.iter().copied()).collect();
        assert_eq!(
            gaps,
            vec![Gap {
                first_seq: 0,
                count: 7,
                first_started_at_ms: 1000,
                last_started_at_ms: 1006
            }]
        );
        // The gap rides on the first frame.
        assert_eq!(b[0].gaps.len(), 1);
    }

    #[test]
    fn results_in_frames_are_never_dropped() {
        // Frames full (broker down), buffer overflows: only buffered results go.
        let mut o = Outbox::new(1, 1, 3);
        for i in 0..(MAX_IN_FLIGHT as u64 + 10) {
            o.push(result(i));
            o.seal(false);
        }
        // While nothing reaches the broker, at most MAX_IN_FLIGHT frames are sealed.
        assert_eq!(o.frames.len(), MAX_IN_FLIGHT);
        // Frames hold 0..16; the buffer keeps the newest 3 (23..=25); 16..=22 dropped.
        assert_eq!(o.stats().dropped, 7);
        let b = hand_all(&mut o);
        assert_eq!(seqs(&b), (0..MAX_IN_FLIGHT as u64).collect::<Vec<_>>());
        o.acked(MAX_IN_FLIGHT as u64);
        o.seal(true);
        let b = hand_all(&mut o);
        assert_eq!(seqs(&b), vec![23, 24, 25]);
        assert_eq!(b[0].gaps[0].first_seq, 16);
        assert_eq!(b[0].gaps[0].count, 7);
    }

    #[test]
    fn separate_overflows_make_separate_gaps() {
        let mut o = Outbox::new(1, 2, 2);
        for i in 0..4 {
            o.push(result(i)); // drops 0, 1
        }
        o.seal(false); // frame [2, 3]
        for i in 4..8 {
            o.push(result(i)); // drops 4, 5
        }
        assert_eq!(o.stats().gaps, 2);
        o.seal(true);
        let b = hand_all(&mut o);
        let gaps: Vec<(u64, u32)> = b
            .iter()
            .flat_map(|b| b.gaps.iter().map(|g| (g.first_seq, g.count)))
            .collect();
        assert_eq!(gaps, vec![(0, 2), (4, 2)]);
        assert_eq!(seqs(&b), vec![2, 3, 6, 7]);
    }

    #[test]
    fn lost_session_resends_unacknowledged_frames_in_order() {
        let mut o = Outbox::new(1, 2, 100);
        for i in 0..8 {
            o.push(result(i));
        }
        o.seal(false);
        let first = hand_all(&mut o);
        assert_eq!(first.len(), 4);
        o.acked(1);
        o.session_lost();
        let again = hand_all(&mut o);
        assert_eq!(seqs(&again), vec![2, 3, 4, 5, 6, 7]);
        assert_eq!(o.stats().frames_published, 7);
        o.acked(3);
        assert!(o.is_empty());
    }

    fn ack_of(batches: &[Batch]) -> Ack {
        let mut ack = Ack {
            boot_id: batches[0].boot_id,
            ranges: heapless::Vec::new(),
        };
        for b in batches {
            for r in vantage_proto::ack::frame_ranges(b) {
                ack.ranges.push(r).unwrap();
            }
        }
        ack
    }

    /// An outbox with end-to-end acknowledgements (30 s timeout) that sent results 0..4 at
    /// `now_ms` as two frames, both PUBACKed: the outbox and the frames.
    fn two_frames_pubacked(now_ms: u64) -> (Outbox, Vec<Batch>) {
        let mut o = Outbox::new(1, 2, 100).with_e2e_acks(Duration::from_secs(30));
        o.tick(now_ms);
        for i in 0..4 {
            o.push(result(i));
        }
        o.seal(false);
        let sent = hand_all(&mut o);
        assert_eq!(sent.len(), 2);
        o.acked(2);
        (o, sent)
    }

    #[test]
    fn with_e2e_acks_puback_does_not_free_and_the_ack_does() {
        let (mut o, sent) = two_frames_pubacked(1_000);
        assert!(!o.is_empty(), "PUBACK alone frees nothing");
        assert_eq!(o.stats().unacked_frames, 2);
        assert_eq!(o.pending_results(), 4);
        // The second frame's ack first: the first still holds the front.
        o.tick(1_050);
        o.e2e_ack(&ack_of(&sent[1..]));
        assert_eq!(o.pending_results(), 4);
        o.e2e_ack(&ack_of(&sent[..1]));
        assert!(o.is_empty());
        assert_eq!(o.stats().frames_e2e_acked, 2);
        assert_eq!(o.stats().e2e_latency_ms_total, 100);
        // An ack of another boot or of nothing in flight changes nothing.
        let mut other = ack_of(&sent);
        other.boot_id = 2;
        o.e2e_ack(&other);
    }

    #[test]
    fn the_mqtt_window_stays_16_while_many_frames_wait_for_e2e_acks() {
        let mut o = Outbox::new(1, 1, 1000).with_e2e_acks(Duration::from_secs(30));
        for i in 0..100 {
            o.push(result(i));
        }
        o.seal(false);
        assert_eq!(hand_all(&mut o).len(), MAX_IN_FLIGHT);
        o.acked(MAX_IN_FLIGHT as u64);
        o.seal(false);
        // PUBACKs reopen the window although nothing is acknowledged end to end.
        assert_eq!(hand_all(&mut o).len(), MAX_IN_FLIGHT);
    }

    #[test]
    fn a_frame_whose_ack_is_lost_is_sent_again_with_backoff() {
        let (mut o, sent) = two_frames_pubacked(1);
        // An ack proves the ingester sends them: from now on timeouts re-send.
        o.e2e_ack(&ack_of(&sent[1..]));
        o.tick(29_000);
        assert!(hand_all(&mut o).is_empty());
        o.tick(30_001);
        let again = hand_all(&mut o);
        assert_eq!(seqs(&again), vec![0, 1]);
        assert_eq!(o.stats().resends, 1);
        o.acked(1);
        // The second wait is twice as long.
        o.tick(30_001 + 59_000);
        assert!(hand_all(&mut o).is_empty());
        o.tick(30_001 + 60_000);
        assert_eq!(seqs(&hand_all(&mut o)), vec![0, 1]);
        o.acked(1);
        o.e2e_ack(&ack_of(&sent[..1]));
        assert!(o.is_empty());
    }

    #[test]
    fn without_any_ack_it_falls_back_to_puback_after_the_timeout() {
        let (mut o, _) = two_frames_pubacked(1);
        assert!(!o.stats().puback_fallback);
        o.tick(30_001);
        assert!(o.is_empty(), "an old ingester: PUBACK frees");
        assert!(o.stats().puback_fallback);
        assert_eq!(o.stats().resends, 0);
        for i in 0..2 {
            o.push(result(i));
        }
        o.seal(false);
        let sent = hand_all(&mut o);
        o.acked(1);
        assert!(o.is_empty());
        // An ack arriving later switches end-to-end acknowledgements on again.
        for i in 0..2 {
            o.push(result(i));
        }
        o.seal(false);
        let more = hand_all(&mut o);
        o.e2e_ack(&ack_of(&sent));
        o.acked(1);
        assert!(!o.is_empty());
        o.e2e_ack(&ack_of(&more));
        assert!(o.is_empty());
    }

    #[test]
    fn the_drain_cuts_the_ack_timeout() {
        let mut o = Outbox::new(1, 2, 100).with_e2e_acks(Duration::from_secs(30));
        o.tick(1);
        o.push(result(0));
        o.seal(true);
        let _ = hand_all(&mut o);
        o.acked(1);
        o.draining(Duration::from_secs(5));
        o.tick(4_000);
        assert!(!o.is_empty());
        o.tick(5_001);
        assert!(
            o.is_empty(),
            "no ack ever: the fallback comes within the drain"
        );
    }

    #[test]
    fn extra_acks_are_ignored() {
        let mut o = Outbox::new(1, 1, 10);
        o.push(result(0));
        o.seal(false);
        hand_all(&mut o);
        o.acked(5);
        assert!(o.is_empty());
        assert_eq!(o.stats().frames_acked, 1);
    }

    #[test]
    fn gap_rides_on_the_next_frame() {
        let mut o = Outbox::new(1, 1, 1);
        o.push(result(0));
        o.push(result(1)); // drops 0
        o.seal(false); // frame [1] with the gap
        let b = hand_all(&mut o);
        assert_eq!(b[0].gaps.len(), 1);
        assert_eq!(seqs(&b), vec![1]);
    }

    fn spooled(name: &str, boot: u64, batch: usize, cache: usize, max_bytes: u64) -> Outbox {
        let dir = crate::spool::tests::temp_dir(name);
        reopen(&dir, boot, batch, cache, max_bytes)
    }

    fn reopen(dir: &std::path::Path, boot: u64, batch: usize, cache: usize, max: u64) -> Outbox {
        let (spool, replay) = Spool::open(crate::spool::tests::config(dir, max)).unwrap();
        Outbox::with_spool(boot, batch, cache, spool, &replay)
    }

    /// Delivers everything: seal, hand, acknowledge, until empty.
    fn deliver_all(o: &mut Outbox) -> Vec<Batch> {
        let mut out = Vec::new();
        for _ in 0..10_000 {
            o.seal(true);
            let b = hand_all(o);
            if b.is_empty() && o.is_empty() {
                break;
            }
            let n = b.len() as u64;
            out.extend(b);
            o.acked(n);
        }
        out
    }

    fn gaps_of(batches: &[Batch]) -> Vec<(u64, Gap)> {
        batches
            .iter()
            .flat_map(|b| b.gaps.iter().map(move |g| (b.boot_id, *g)))
            .collect()
    }

    #[test]
    fn spool_full_during_an_outage_drops_the_oldest_into_exactly_one_gap() {
        // Room for about 40 results of ~55 bytes; the cache (10) in front of it.
        let mut o = spooled("full", 1, 4, 10, 64 * 1024);
        let per = {
            let mut p = spooled("full-size", 2, 4, 10, 64 * 1024);
            p.push(result(0));
            p.spool().unwrap().live_bytes()
        };
        let room = 64 * 1024 / per;
        let produced = 10 * room;
        // Broker down: frames fill (16 × 4), everything else waits in the spool.
        for i in 0..produced {
            o.push(result(1000 + i));
            o.seal(false);
            if i % 50 == 49 {
                o.seal(true); // the flush tick
            }
        }
        o.seal(true);
        let s = o.stats().clone();
        assert!(s.dropped > 0 && s.dropped < produced, "{s:?}");
        assert_eq!(s.gaps, 1, "one gap for one outage: {s:?}");
        assert!(o.spool().unwrap().live_bytes() <= 64 * 1024);
        // On disk too: segments of dropped records go although the first one (frames in
        // flight) stays; at most the limit plus the current and the first segment.
        let disk = o.spool().unwrap().disk_bytes();
        assert!(
            disk <= 64 * 1024 + 2 * crate::spool::segment_bytes(64 * 1024),
            "{disk} bytes on disk"
        );
        assert!(o.spool().unwrap().stats().segments_deleted > 0);
        // Broker back.
        let batches = deliver_all(&mut o);
        let delivered = seqs(&batches);
        let gaps = gaps_of(&batches);
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        let g = gaps[0].1;
        assert_eq!(u64::from(g.count), s.dropped);
        // The frames in flight (16, of up to 4: the flush ticks seal partial ones) went
        // first; the gap covers the oldest results after them.
        assert!(g.first_seq > MAX_IN_FLIGHT as u64 && g.first_seq <= MAX_IN_FLIGHT as u64 * 4);
        assert_eq!(
            delivered.iter().take_while(|&&q| q < g.first_seq).count() as u64,
            g.first_seq
        );
        assert_eq!(delivered.len() as u64 + s.dropped, produced);
        let mut all: Vec<u64> = delivered.clone();
        all.extend(g.first_seq..g.first_seq + u64::from(g.count));
        all.sort_unstable();
        assert_eq!(all, (0..produced).collect::<Vec<_>>(), "each result once");
        assert!(o.is_empty());
    }

    #[test]
    fn a_full_cache_evicts_to_the_spool_without_losing_anything() {
        let mut o = spooled("evict", 1, 8, 20, 1 << 20);
        for i in 0..4000 {
            o.push(result(i));
            o.seal(false);
            if i % 100 == 99 {
                o.seal(true);
            }
        }
        let s = o.stats().clone();
        assert_eq!(s.dropped, 0, "{s:?}");
        assert!(s.evicted > 800, "{s:?}");
        let batches = deliver_all(&mut o);
        assert_eq!(
            seqs(&batches),
            (0..4000).collect::<Vec<_>>(),
            "all, in order"
        );
        assert!(gaps_of(&batches).is_empty());
        assert!(o.spool().unwrap().stats().read_back > 800);
    }

    #[test]
    fn a_restart_sends_the_earlier_boot_first_with_its_own_ids() {
        let dir = crate::spool::tests::temp_dir("restart");
        let mut o = reopen(&dir, 11, 8, 100, 1 << 20);
        for i in 0..30 {
            o.push(result(i));
        }
        o.seal(true); // written, frames sealed, broker down: nothing acknowledged
        hand_all(&mut o);
        o.acked(1); // only the first frame made it
        o.flush_spool();
        drop(o); // kill -9: no drain
        let mut o = reopen(&dir, 12, 8, 100, 1 << 20);
        assert_eq!(o.stats().replayed, 22);
        for i in 0..5 {
            o.push(result(100 + i));
        }
        let batches = deliver_all(&mut o);
        let boots: Vec<(u64, Vec<u64>)> = batches
            .iter()
            .map(|b| (b.boot_id, b.results.iter().map(|r| r.seq).collect()))
            .collect();
        assert_eq!(
            boots,
            vec![
                (11, (8..16).collect()),
                (11, (16..24).collect()),
                (11, (24..30).collect()),
                (12, (0..5).collect()),
            ]
        );
        o.flush_spool();
        drop(o);
        let o = reopen(&dir, 13, 8, 100, 1 << 20);
        assert_eq!(o.stats().replayed, 0, "all acknowledged");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn gaps_of_an_earlier_boot_survive_a_restart_and_are_sent_once() {
        let dir = crate::spool::tests::temp_dir("gap-restart");
        let mut o = reopen(&dir, 21, 4, 4, 64 * 1024);
        for i in 0..3000 {
            o.push(result(i));
            o.seal(false);
            if i % 50 == 49 {
                o.seal(true);
            }
        }
        o.seal(true);
        let dropped = o.stats().dropped;
        assert!(dropped > 0);
        o.flush_spool();
        drop(o);
        let mut o = reopen(&dir, 22, 4, 4, 64 * 1024);
        let batches = deliver_all(&mut o);
        let gaps = gaps_of(&batches);
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        assert_eq!((gaps[0].0, u64::from(gaps[0].1.count)), (21, dropped));
        assert_eq!(seqs(&batches).len() as u64 + dropped, 3000);
        o.flush_spool();
        drop(o);
        let mut o = reopen(&dir, 23, 4, 4, 64 * 1024);
        assert!(deliver_all(&mut o).is_empty(), "nothing sent twice");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A fake clock the test sets: (synced, wall ms), shared with the outbox's source.
    fn fake_clock(state: &std::sync::Arc<std::sync::Mutex<(bool, u64)>>) -> ClockSource {
        let state = state.clone();
        Box::new(move || {
            let (synced, wall_ms) = *state.lock().unwrap();
            Some(Reading {
                synced,
                max_error_us: if synced { 800 } else { 16_000_000 },
                est_error_us: if synced { 200 } else { 16_000_000 },
                boot_age_ms: 30_000,
                wall_ms,
            })
        })
    }

    #[test]
    fn frames_carry_the_clock_and_mark_results_before_the_first_sync() {
        let state = std::sync::Arc::new(std::sync::Mutex::new((false, 1_000)));
        let mut o = Outbox::new(7, 4, 100).with_clock(fake_clock(&state));
        for i in 0..3 {
            o.push(result(i));
        }
        // NTP sets the clock: the next result numbered (seq 3) is the first after the sync.
        *state.lock().unwrap() = (true, 2_000_000);
        for i in 3..6 {
            o.push(result(i));
        }
        *state.lock().unwrap() = (true, 2_000_500);
        o.seal(true);
        let b = hand_all(&mut o);
        assert_eq!(b.len(), 2);
        for batch in &b {
            let c = batch.clock.expect("a clock on every frame");
            assert!(c.synced);
            assert_eq!(c.synced_from_seq, Some(3));
            assert_eq!((c.max_error_ms, c.est_error_ms, c.boot_age_s), (1, 1, 30));
            assert_eq!(c.sealed_at_ms, 2_000_500, "read at the seal");
        }
        let marked: Vec<bool> = b
            .iter()
            .flat_map(|batch| {
                let c = batch.clock.unwrap();
                batch.results.iter().map(move |r| c.unsynced_at(r.seq))
            })
            .collect();
        assert_eq!(marked, [true, true, true, false, false, false]);
        // Without a source (not Linux): unknown.
        let mut plain = Outbox::new(7, 4, 100);
        plain.push(result(0));
        plain.seal(true);
        assert_eq!(hand_all(&mut plain)[0].clock, None);
    }

    #[test]
    fn an_earlier_boots_records_keep_their_clock_state_and_are_sealed_now() {
        let name = "clock-replay";
        let dir = crate::spool::tests::temp_dir(name);
        let state = std::sync::Arc::new(std::sync::Mutex::new((false, 5_000)));
        {
            let (spool, replay) = Spool::open(crate::spool::tests::config(&dir, 1 << 20)).unwrap();
            let mut o =
                Outbox::with_spool(1, 4, 100, spool, &replay).with_clock(fake_clock(&state));
            for i in 0..3 {
                o.push(result(i));
            }
            o.flush_spool();
            // Never sent: the agent is killed here.
        }
        // The next boot starts with a synchronised clock, hours later.
        *state.lock().unwrap() = (true, 9_000_000);
        let (spool, replay) = Spool::open(crate::spool::tests::config(&dir, 1 << 20)).unwrap();
        let mut o = Outbox::with_spool(2, 4, 100, spool, &replay).with_clock(fake_clock(&state));
        o.push(result(10));
        o.seal(true);
        let b = hand_all(&mut o);
        assert_eq!(b[0].boot_id, 1);
        let old = b[0].clock.expect("the clock state written with them");
        assert!(!old.synced, "taken before any sync");
        assert_eq!(old.synced_from_seq, None);
        assert_eq!(old.max_error_ms, 16_000);
        assert_eq!(old.sealed_at_ms, 9_000_000, "sealed now");
        assert_eq!(b[1].boot_id, 2);
        let new = b[1].clock.unwrap();
        assert!(new.synced && new.synced_from_seq == Some(0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_worse_of_two_clock_states() {
        let a = ClockHealth {
            synced: true,
            max_error_ms: 5,
            est_error_ms: 9,
            synced_from_seq: None,
            boot_age_s: 1,
            sealed_at_ms: 1,
        };
        let b = ClockHealth {
            synced: false,
            max_error_ms: 3,
            est_error_ms: 1,
            synced_from_seq: Some(4),
            boot_age_s: 2,
            sealed_at_ms: 2,
        };
        let w = worse_clock(Some(a), Some(b)).unwrap();
        assert!(!w.synced);
        assert_eq!((w.max_error_ms, w.est_error_ms), (5, 9));
        assert_eq!(w.synced_from_seq, Some(4));
        assert_eq!(worse_clock(Some(a), None), None);
    }
}
