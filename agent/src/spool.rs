//! The spool: results on disk (`state_dir/spool/<agent_id>/`) until they are acknowledged, so
//! a `kill -9`, a crash or a power cut does not forget them (issue #18 item 1).
//!
//! # Model
//! A FIFO of *records* (probe results), each with a *position*: a counter over every record
//! ever appended, across boots. The uplink's `Outbox` (uplink.rs) appends the results of
//! this boot, reads old ones back (those of earlier boots at start, and those its memory cache
//! evicted), and tells the spool what happened to them with *markers*:
//! - `Ack { upto }`: every position below `upto` is done (acknowledged, or dropped);
//! - `Drop { from, to }`: positions dropped because the spool was full (their loss travels as a
//!   gap record instead);
//! - `Gap { boot, gap }`: a gap record not yet delivered (the latest version of a
//!   `(boot, first_seq)` wins); `GapDone` once it is delivered.
//!
//! # Format
//! Append-only segment files `<first position, 20 digits>.seg`, each starting with
//! [`MAGIC`]. Then entries: `len: u16 LE`, `crc32: u32 LE` (of the rest), `kind: u8`, postcard
//! payload (`len` counts kind + payload). One flush is one `write`: a *group* header (boot id,
//! first position, first sequence number, count, time range) followed by its `count` results,
//! packed (entries of kind 8: up to 32 results as a wire format version 3 frame, version 4 when
//! one has a probe kind other than http (issue #20), the agent's own
//! packing, so a result costs the spool about what it costs on the wire; spools written before
//! hold one entry of kind 2 per result, still read) and a clock entry (the agent's clock state at that flush, `ClockHealth`, issue #18
//! item 3: results replayed after a restart are sent with the clock state they were taken
//! with; after the records, not in the header, so an agent that predates it skips the unknown
//! kind and still reads every record), then the markers of that flush. The group header is
//! what makes a torn write
//! measurable: after a power cut, the records of a group whose header reached the disk but not
//! all its records are known to be lost and become a gap record. A write of which not even the
//! header reached the disk leaves no trace; its results had not been sent (the uplink seals a
//! frame only from results already written), so they are lost like results still in memory.
//! Entries after a corrupt one in the same segment are not trusted (the lengths may be wrong);
//! reading goes on with the next segment.
//!
//! A new segment starts at every open and when the current one passes its size
//! ([`segment_bytes`]); its first write restates what is still pending (ack watermark, drop
//! ranges above it, undelivered gaps), so a segment can be deleted as soon as every position in
//! it is done without losing a marker. Segments are deleted in order.
//!
//! # Durability
//! Data is written (one `write` per flush) before a frame holding it is sealed: a `kill -9`
//! loses nothing that was written. `uplink.spool_fsync` decides when the data also reaches the
//! card (`always`: after every flush; a duration: at most that often; `never`: when the kernel
//! decides). The fsync runs on tokio's blocking pool, so an SD card's slow sync never blocks
//! the probes' runtime.
//!
//! CRC-32 (IEEE) from crc32fast, which flate2 already links into the agent.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vantage_proto::{ClockHealth, Gap, ProbeResult, MAX_RESULT_LEN};

/// First bytes of every segment file (format version 1).
pub const MAGIC: &[u8; 8] = b"VSPOOL1\n";
/// Bytes before an entry's kind: length (u16) and CRC (u32).
pub const ENTRY_HEADER: usize = 6;
/// Largest entry accepted on reading (kind + payload): a packed entry is a frame of at most
/// [`vantage_proto::MAX_RESULTS`] results.
const MAX_ENTRY: usize = 1 + vantage_proto::MAX_FRAME_LEN;

const KIND_GROUP: u8 = 1;
const KIND_RESULT: u8 = 2;
const KIND_ACK: u8 = 3;
const KIND_DROP: u8 = 4;
const KIND_GAP: u8 = 5;
const KIND_GAP_DONE: u8 = 6;
const KIND_CLOCK: u8 = 7;
/// Up to [`vantage_proto::MAX_RESULTS`] results of the group, as one version 3 frame (version
/// 4 when one of them needs it).
const KIND_PACKED: u8 = 8;

/// When written data is also synced to the card (`uplink.spool_fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every flush (default): a power cut loses at most the flush being written.
    Always,
    /// At most once per interval: fewer card writes, a power cut loses up to the interval.
    Every(Duration),
    /// Never explicitly: the kernel writes back when it wants (about 30 s on Linux).
    Never,
}

/// What the spool needs to know.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Bytes of records not yet acknowledged the spool keeps at most (`uplink.spool_max_bytes`).
    pub max_bytes: u64,
    pub fsync: FsyncPolicy,
}

/// The spool could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One flush's header.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
struct GroupHeader {
    boot_id: u64,
    first_pos: u64,
    first_seq: u64,
    count: u32,
    min_started_at_ms: u64,
    max_started_at_ms: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
struct GapEntry {
    boot_id: u64,
    gap: Gap,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
struct GapKey {
    boot_id: u64,
    first_seq: u64,
}

/// A record read back from disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskRecord {
    pub pos: u64,
    pub boot_id: u64,
    pub result: ProbeResult,
    /// Its size in the spool (entry header included).
    pub bytes: u64,
    /// The clock state written with its group (None: unknown, or a spool from before it).
    pub clock: Option<ClockHealth>,
}

/// What the spool found at open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// Records not yet acknowledged, to be sent again with their boot ids and sequence numbers.
    pub records: u64,
    /// Records found lost (torn or corrupt), each covered by a gap record.
    pub lost: u64,
    /// Gap records still to deliver (found, or made of the lost records), with their boot.
    pub gaps: Vec<(u64, Gap)>,
    /// Segment files found.
    pub segments: usize,
    /// Entries that failed their CRC or length check, and segments cut short.
    pub corrupt: u64,
}

/// Where a group lives, for reading its records back.
#[derive(Debug, Clone, Copy)]
struct GroupIndex {
    boot_id: u64,
    first_pos: u64,
    /// Records of the group that can be read (the rest were lost).
    valid: u32,
    /// Segment (its first position) and offset of the group header.
    segment: u64,
    offset: u64,
}

#[derive(Debug)]
struct Segment {
    first_pos: u64,
    path: PathBuf,
    bytes: u64,
}

/// A group read into memory, records handed out one by one.
struct OpenGroup {
    index: GroupIndex,
    records: Vec<(ProbeResult, u64)>,
    clock: Option<ClockHealth>,
}

/// Segment size: a sixteenth of the spool, within 64 KiB .. 8 MiB (deletion is per segment, so
/// this is also how much acknowledged data can linger on the card).
pub fn segment_bytes(max_bytes: u64) -> u64 {
    (max_bytes / 16).clamp(64 * 1024, 8 * 1024 * 1024)
}

/// The spool. Not thread-safe; owned by the uplink loop.
pub struct Spool {
    config: SpoolConfig,
    segments: VecDeque<Segment>,
    file: Option<File>,
    /// Next position to hand out.
    tail: u64,
    /// Positions below this are on disk (written); `tail` − `written` are in `pending`.
    written: u64,
    /// Every position below is done (persisted as `Ack` at the next write).
    watermark: u64,
    ack_dirty: bool,
    /// Dropped position ranges at or above the watermark, sorted, merged.
    drops: Vec<(u64, u64)>,
    drops_dirty: Vec<(u64, u64)>,
    /// Gap versions and deliveries to persist at the next write.
    gaps_dirty: GapMap,
    gaps_done: Vec<GapKey>,
    /// Gaps not yet delivered (restated at each new segment).
    gaps_open: GapMap,
    /// The group being collected: its header and results.
    pending: Option<GroupHeader>,
    pending_results: Vec<ProbeResult>,
    /// The latest clock state, written after the next group's results.
    clock: Option<ClockHealth>,
    groups: VecDeque<GroupIndex>,
    /// Bytes and number of records not done (appended, not acknowledged nor dropped).
    live_bytes: u64,
    live_records: u64,
    reader: Option<OpenGroup>,
    /// Set while a sync runs (at most one at a time; a flush meanwhile asks again later).
    syncing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    last_sync: Option<Instant>,
    sync_wanted: bool,
    stats: SpoolStats,
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// `write` calls (one per flush, plus one per new segment's header).
    pub writes: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Syncs handed to the sync thread.
    pub syncs: u64,
    /// Writes that failed (the data stays in memory and is retried at the next flush).
    pub write_errors: u64,
    /// Records read back from disk.
    pub read_back: u64,
    pub segments_deleted: u64,
}

impl Spool {
    /// Opens (creating) the spool directory, reads every segment, and starts a new segment.
    pub fn open(config: SpoolConfig) -> Result<(Spool, Replay), SpoolError> {
        std::fs::create_dir_all(&config.dir).map_err(io(&config.dir))?;
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(&config.dir).map_err(io(&config.dir))? {
            let entry = entry.map_err(io(&config.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                // A segment start that a crash interrupted before its rename: never used.
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            if let Some(n) = name
                .strip_suffix(".seg")
                .and_then(|n| n.parse::<u64>().ok())
            {
                found.push((n, entry.path()));
            }
        }
        found.sort_unstable_by_key(|(n, _)| *n);
        let mut scan = Scan::default();
        let mut segments = VecDeque::new();
        for (first_pos, path) in found {
            let data = std::fs::read(&path).map_err(io(&path))?;
            scan.segment(first_pos, &data);
            segments.push_back(Segment {
                first_pos,
                bytes: data.len() as u64,
                path,
            });
        }
        let mut spool = Spool {
            tail: scan.tail,
            written: scan.tail,
            watermark: scan.watermark,
            ack_dirty: false,
            drops: Vec::new(),
            drops_dirty: Vec::new(),
            gaps_dirty: GapMap::default(),
            gaps_done: Vec::new(),
            gaps_open: GapMap::default(),
            pending: None,
            pending_results: Vec::new(),
            clock: None,
            groups: VecDeque::new(),
            live_bytes: 0,
            live_records: 0,
            reader: None,
            syncing: Default::default(),
            last_sync: None,
            sync_wanted: false,
            stats: SpoolStats::default(),
            file: None,
            segments,
            config,
        };
        for &(from, to) in &scan.drops {
            spool.add_drop(from, to, false);
        }
        let mut replay = Replay {
            segments: spool.segments.len(),
            corrupt: scan.corrupt,
            ..Replay::default()
        };
        // Lost records: dropped positions, covered by a gap each (unless already done).
        for lost in &scan.lost {
            if lost.end <= spool.watermark {
                continue;
            }
            let from = lost.from.max(spool.watermark);
            let skipped = from - lost.from;
            let count = lost.end - from;
            spool.add_drop(from, lost.end, true);
            let gap = Gap {
                first_seq: lost.first_seq + skipped,
                count: u32::try_from(count).unwrap_or(u32::MAX),
                first_started_at_ms: lost.min_ms,
                last_started_at_ms: lost.max_ms,
            };
            replay.lost += count;
            if !scan.gaps.contains(&(lost.boot_id, gap.first_seq)) {
                scan.gaps.insert((lost.boot_id, gap.first_seq), gap);
            }
        }
        for key in &scan.gaps_done {
            scan.gaps.remove(&(key.boot_id, key.first_seq));
        }
        for &((boot, seq), ref gap) in scan.gaps.iter() {
            spool.gaps_open.insert((boot, seq), *gap);
            spool.gaps_dirty.insert((boot, seq), *gap);
            replay.gaps.push((boot, *gap));
        }
        spool.groups = scan
            .groups
            .into_iter()
            .filter(|g| g.first_pos + u64::from(g.valid) > spool.watermark)
            .collect();
        // Live records and their bytes: one pass over what is left.
        let mut at = spool.watermark;
        while let Some(r) = spool.read_next(at, u64::MAX) {
            replay.records += 1;
            spool.live_bytes += r.bytes;
            spool.live_records += 1;
            at = r.pos + 1;
        }
        spool.reader = None;
        spool.stats.read_back = 0;
        spool.ack_dirty = true;
        spool.new_segment()?;
        spool.delete_done_segments();
        Ok((spool, replay))
    }

    /// Records `result` of boot `boot_id` for the next flush; returns its position and size.
    pub fn append(&mut self, boot_id: u64, result: &ProbeResult) -> (u64, u64) {
        let pos = self.tail;
        self.tail += 1;
        let g = self.pending.get_or_insert(GroupHeader {
            boot_id,
            first_pos: pos,
            first_seq: result.seq,
            count: 0,
            min_started_at_ms: result.started_at_ms,
            max_started_at_ms: result.started_at_ms,
        });
        g.count += 1;
        g.min_started_at_ms = g.min_started_at_ms.min(result.started_at_ms);
        g.max_started_at_ms = g.max_started_at_ms.max(result.started_at_ms);
        self.pending_results.push(*result);
        let bytes = record_bytes(result);
        self.live_bytes += bytes;
        self.live_records += 1;
        (pos, bytes)
    }

    /// The agent's clock state now: written with the results of the next flush.
    pub fn set_clock(&mut self, clock: Option<ClockHealth>) {
        self.clock = clock;
    }

    /// Positions below this are on disk.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Next position to hand out.
    pub fn tail(&self) -> u64 {
        self.tail
    }

    /// Everything below `upto` is done; `records` live records (`bytes` big) left with it.
    pub fn ack(&mut self, upto: u64, records: u64, bytes: u64) {
        self.live_bytes = self.live_bytes.saturating_sub(bytes);
        self.live_records = self.live_records.saturating_sub(records);
        if upto > self.watermark {
            self.watermark = upto;
            self.ack_dirty = true;
            self.drops.retain(|&(_, to)| to > upto);
        }
    }

    /// Position `pos` (`bytes` big) was dropped (spool full); its loss is in a gap record.
    pub fn dropped(&mut self, pos: u64, bytes: u64) {
        self.live_bytes = self.live_bytes.saturating_sub(bytes);
        self.live_records = self.live_records.saturating_sub(1);
        self.add_drop(pos, pos + 1, true);
    }

    /// A gap record (new or grown) to persist.
    pub fn gap_changed(&mut self, boot_id: u64, gap: &Gap) {
        self.gaps_open.insert((boot_id, gap.first_seq), *gap);
        self.gaps_dirty.insert((boot_id, gap.first_seq), *gap);
    }

    /// A gap record was delivered.
    pub fn gap_done(&mut self, boot_id: u64, first_seq: u64) {
        self.gaps_open.remove(&(boot_id, first_seq));
        self.gaps_dirty.remove(&(boot_id, first_seq));
        self.gaps_done.push(GapKey { boot_id, first_seq });
    }

    /// Bytes of records not yet done.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Records not yet done.
    pub fn live_records(&self) -> u64 {
        self.live_records
    }

    pub fn max_bytes(&self) -> u64 {
        self.config.max_bytes
    }

    /// Segment files on disk.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Bytes of the segment files.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    pub fn stats(&self) -> &SpoolStats {
        &self.stats
    }

    /// Whether a flush has anything to write.
    pub fn dirty(&self) -> bool {
        self.pending.is_some()
            || self.ack_dirty
            || !self.drops_dirty.is_empty()
            || !self.gaps_dirty.is_empty()
            || !self.gaps_done.is_empty()
    }

    fn add_drop(&mut self, from: u64, to: u64, persist: bool) {
        merge_range(&mut self.drops, from, to);
        if persist {
            merge_range(&mut self.drops_dirty, from, to);
        }
    }

    /// Writes what accumulated since the last flush in one `write`, then rotates and deletes
    /// segments as needed. On an error nothing is lost from memory: the same bytes are written
    /// again at the next flush (into a new segment, so a half-written one is never appended to).
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        if self.dirty() {
            let mut buf = Vec::with_capacity(self.pending_results.len() * 40 + 128);
            let group = self.pending;
            if let Some(g) = &group {
                put_entry(&mut buf, KIND_GROUP, g);
                put_packed(&mut buf, g.boot_id, &self.pending_results);
                if let Some(clock) = &self.clock {
                    put_entry(&mut buf, KIND_CLOCK, clock);
                }
            }
            self.put_markers(&mut buf);
            let Some(file) = self.file.as_mut() else {
                return self.retry_in_new_segment();
            };
            let offset = self.segments.back().map_or(0, |s| s.bytes);
            if let Err(source) = file.write_all(&buf) {
                self.stats.write_errors += 1;
                // Position unknown now: start again in a fresh segment at the next flush.
                self.file = None;
                let path = self.segments.back().map(|s| s.path.clone());
                return Err(SpoolError::Io {
                    path: path.unwrap_or_else(|| self.config.dir.clone()),
                    source,
                });
            }
            self.stats.writes += 1;
            self.stats.bytes_written += buf.len() as u64;
            let segment = match self.segments.back_mut() {
                Some(s) => {
                    s.bytes += buf.len() as u64;
                    s.first_pos
                }
                None => 0,
            };
            if let Some(g) = group {
                self.groups.push_back(GroupIndex {
                    boot_id: g.boot_id,
                    first_pos: g.first_pos,
                    valid: g.count,
                    segment,
                    offset,
                });
            }
            self.pending = None;
            self.pending_results.clear();
            self.written = self.tail;
            self.clear_markers();
            self.sync_wanted = true;
        }
        self.maybe_sync();
        if self
            .segments
            .back()
            .is_some_and(|s| s.bytes >= segment_bytes(self.config.max_bytes))
        {
            self.new_segment()?;
        }
        self.delete_done_segments();
        Ok(())
    }

    fn retry_in_new_segment(&mut self) -> Result<(), SpoolError> {
        self.new_segment()?;
        self.flush()
    }

    fn put_markers(&self, buf: &mut Vec<u8>) {
        if self.ack_dirty {
            put_entry(buf, KIND_ACK, &self.watermark);
        }
        for r in &self.drops_dirty {
            put_entry(buf, KIND_DROP, r);
        }
        for &((boot_id, _), ref gap) in self.gaps_dirty.iter() {
            put_entry(buf, KIND_GAP, &GapEntry { boot_id, gap: *gap });
        }
        for key in &self.gaps_done {
            put_entry(buf, KIND_GAP_DONE, key);
        }
    }

    fn clear_markers(&mut self) {
        self.ack_dirty = false;
        self.drops_dirty.clear();
        self.gaps_dirty.clear();
        self.gaps_done.clear();
    }

    /// Starts a segment at the tail, its first write restating every pending marker (the
    /// watermark, drops above it, open gaps; delivered gaps need no marker in a segment that no
    /// longer holds them). Written to a temporary file and renamed into place, so a crash
    /// never leaves a segment without them, even when it replaces one of the same name (a
    /// segment that holds no record: it began at the tail and nothing was added since).
    fn new_segment(&mut self) -> Result<(), SpoolError> {
        // Records collected but not written go into the new segment's first flush.
        let first_pos = self.pending.map_or(self.tail, |g| g.first_pos);
        let path = self.config.dir.join(format!("{first_pos:020}.seg"));
        if self
            .segments
            .back()
            .is_some_and(|s| s.first_pos == first_pos)
        {
            if self.file.is_some() {
                // Nothing was added since that segment began: keep writing there.
                return Ok(());
            }
            self.segments.pop_back();
        }
        self.ack_dirty = true;
        self.drops_dirty = self.drops.clone();
        for &(k, g) in self.gaps_open.iter() {
            self.gaps_dirty.insert(k, g);
        }
        let mut buf = MAGIC.to_vec();
        self.put_markers(&mut buf);
        let tmp = self.config.dir.join(format!("{first_pos:020}.tmp"));
        let write = || -> std::io::Result<File> {
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&tmp)?;
            f.write_all(&buf)?;
            if self.config.fsync != FsyncPolicy::Never {
                f.sync_data()?;
            }
            std::fs::rename(&tmp, &path)?;
            Ok(f)
        };
        let file = write().map_err(io(&path))?;
        self.stats.writes += 1;
        self.stats.bytes_written += buf.len() as u64;
        self.segments.push_back(Segment {
            first_pos,
            path,
            bytes: buf.len() as u64,
        });
        self.file = Some(file);
        self.clear_markers();
        // The new name must survive a power cut with the data synced into it later: the
        // directory is synced here, inline (a start or a rotation every sixteenth of the
        // spool, rare enough not to matter to the probes).
        if self.config.fsync != FsyncPolicy::Never {
            if let Err(e) = File::open(&self.config.dir).and_then(|d| d.sync_all()) {
                tracing::warn!(error = %e, "spool directory sync failed");
            }
        }
        Ok(())
    }

    /// Whether every position in `from..to` is done: below the watermark, or dropped.
    fn all_done(&self, from: u64, to: u64) -> bool {
        let mut at = from.max(self.watermark);
        while at < to {
            match self.drops.iter().find(|&&(f, t)| f <= at && at < t) {
                Some(&(_, t)) => at = t,
                None => return false,
            }
        }
        true
    }

    /// Deletes every segment but the current one whose positions are all done: acknowledged,
    /// or dropped (so a long outage behind a frame still in flight cannot fill the card with
    /// dropped records). Markers in them are restated in later segments (see `new_segment`),
    /// so only their records go, and those are done.
    fn delete_done_segments(&mut self) {
        let mut i = 0;
        while i + 1 < self.segments.len() {
            let (from, to) = (self.segments[i].first_pos, self.segments[i + 1].first_pos);
            if !self.all_done(from, to) {
                i += 1;
                continue;
            }
            if let Some(s) = self.segments.remove(i) {
                if let Err(e) = std::fs::remove_file(&s.path) {
                    tracing::warn!(path = %s.path.display(), error = %e, "cannot delete spool segment");
                }
                self.stats.segments_deleted += 1;
                self.groups.retain(|g| g.segment != s.first_pos);
                if self
                    .reader
                    .as_ref()
                    .is_some_and(|r| r.index.segment == s.first_pos)
                {
                    self.reader = None;
                }
                self.sync_dir();
            }
        }
        while self
            .groups
            .front()
            .is_some_and(|g| g.first_pos + u64::from(g.valid) <= self.watermark)
        {
            self.groups.pop_front();
        }
    }

    /// Runs `job` (an fsync) on tokio's blocking pool, so a slow card never blocks the runtime
    /// the probes share; inline outside a runtime (tests, the benchmark). False if a sync is
    /// still running. (A thread of the spool's own with a channel cost 4 KiB of binary more.)
    fn sync_off_thread(
        &mut self,
        job: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    ) -> bool {
        use std::sync::atomic::Ordering;
        if self.syncing.swap(true, Ordering::AcqRel) {
            return false;
        }
        let busy = self.syncing.clone();
        let run = move || {
            if let Err(e) = job() {
                tracing::warn!(error = %e, "spool fsync failed");
            }
            busy.store(false, Ordering::Release);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(run)),
            Err(_) => run(),
        }
        true
    }

    fn maybe_sync(&mut self) {
        if !self.sync_wanted {
            return;
        }
        let due = match self.config.fsync {
            FsyncPolicy::Never => false,
            FsyncPolicy::Always => true,
            FsyncPolicy::Every(d) => self.last_sync.is_none_or(|t| t.elapsed() >= d),
        };
        if !due {
            return;
        }
        let Some(file) = self.file.as_ref().and_then(|f| f.try_clone().ok()) else {
            return;
        };
        if self.sync_off_thread(move || file.sync_data()) {
            self.sync_wanted = false;
            self.last_sync = Some(Instant::now());
            self.stats.syncs += 1;
        }
    }

    /// Syncs the directory after a segment was deleted, unless a sync is running (then it is
    /// skipped: a deleted segment that reappears after a power cut holds only records that are
    /// done, and markers that later segments restate).
    fn sync_dir(&mut self) {
        if self.config.fsync == FsyncPolicy::Never {
            return;
        }
        let dir = self.config.dir.clone();
        self.sync_off_thread(move || File::open(dir).and_then(|f| f.sync_all()));
    }

    /// The next live record at or after `from` and below `limit`, read from disk (positions
    /// dropped or done are skipped).
    pub fn read_next(&mut self, from: u64, limit: u64) -> Option<DiskRecord> {
        let r = self.peek(from, limit)?;
        self.stats.read_back += 1;
        Some(r)
    }

    /// [`Spool::read_next`] without counting a read.
    pub fn peek(&mut self, from: u64, limit: u64) -> Option<DiskRecord> {
        let mut from = from.max(self.watermark);
        let limit = limit.min(self.written);
        loop {
            if from >= limit {
                return None;
            }
            // Groups are in position order: the first that ends after `from`.
            let i = self
                .groups
                .partition_point(|g| g.first_pos + u64::from(g.valid) <= from);
            let index = *self.groups.get(i)?;
            if index.first_pos >= limit {
                return None;
            }
            from = from.max(index.first_pos);
            if self
                .reader
                .as_ref()
                .is_none_or(|r| r.index.first_pos != index.first_pos)
            {
                match self.load_group(index) {
                    Ok(g) => self.reader = Some(g),
                    Err(e) => {
                        tracing::error!(error = %e, first_pos = index.first_pos, "cannot read spooled records back; skipping them");
                        self.groups.remove(i);
                        continue;
                    }
                }
            }
            let g = self.reader.as_ref()?;
            let clock = g.clock;
            let at = (from - index.first_pos) as usize;
            let Some(&(result, bytes)) = g.records.get(at) else {
                // Shorter than indexed (the file changed under us): skip the rest.
                from = index.first_pos + u64::from(index.valid);
                continue;
            };
            if let Some(&(_, to)) = self.drops.iter().find(|&&(f, t)| f <= from && from < t) {
                from = to;
                continue;
            }
            return Some(DiskRecord {
                pos: from,
                boot_id: index.boot_id,
                result,
                bytes,
                clock,
            });
        }
    }

    fn load_group(&self, index: GroupIndex) -> Result<OpenGroup, SpoolError> {
        let path = self.config.dir.join(format!("{:020}.seg", index.segment));
        let mut file = File::open(&path).map_err(io(&path))?;
        file.seek(SeekFrom::Start(index.offset))
            .map_err(io(&path))?;
        let mut records = Vec::with_capacity(index.valid as usize);
        let mut reader = std::io::BufReader::new(file);
        let mut first = true;
        let mut clock = None;
        while records.len() < index.valid as usize {
            let Some((kind, payload)) = read_entry(&mut reader) else {
                break;
            };
            if first {
                first = false;
                if kind != KIND_GROUP {
                    break;
                }
                continue;
            }
            match kind {
                KIND_PACKED => match unpack(&payload) {
                    Some(batch) if records.len() + batch.len() <= index.valid as usize => {
                        records.extend(batch.into_iter().map(|r| (r, record_bytes(&r))))
                    }
                    _ => break,
                },
                KIND_RESULT => match postcard::from_bytes::<ProbeResult>(&payload) {
                    Ok(r) => records.push((r, record_bytes(&r))),
                    Err(_) => break,
                },
                _ => break,
            }
        }
        // The group's clock entry follows its last record (absent when it was torn off, or
        // written by an agent that predates it).
        if !first && records.len() == index.valid as usize {
            if let Some((KIND_CLOCK, payload)) = read_entry(&mut reader) {
                clock = postcard::from_bytes::<ClockHealth>(&payload).ok();
            }
        }
        let mut index = index;
        index.valid = records.len() as u32;
        Ok(OpenGroup {
            index,
            records,
            clock,
        })
    }
}

fn merge_range(ranges: &mut Vec<(u64, u64)>, from: u64, to: u64) {
    // Kept sorted by insertion (no sort: it costs the Pi's binary more than this loop).
    let i = ranges.partition_point(|r| r.0 < from);
    ranges.insert(i, (from, to));
    // Merge with the neighbours it touches or overlaps.
    let mut j = i.saturating_sub(1);
    while j + 1 < ranges.len() {
        if ranges[j].1 >= ranges[j + 1].0 {
            ranges[j].1 = ranges[j].1.max(ranges[j + 1].1);
            ranges.remove(j + 1);
        } else if j > i {
            break;
        } else {
            j += 1;
        }
    }
}

/// Gap records by `(boot_id, first_seq)`, sorted: a few entries, so a vector (a `BTreeMap`
/// of this key and value added kilobytes to the agent's binary).
#[derive(Debug, Default, Clone)]
struct GapMap(Vec<((u64, u64), Gap)>);

impl GapMap {
    fn find(&self, key: &(u64, u64)) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.cmp(key))
    }
    fn contains(&self, key: &(u64, u64)) -> bool {
        self.find(key).is_ok()
    }
    fn insert(&mut self, key: (u64, u64), gap: Gap) {
        match self.find(&key) {
            Ok(i) => self.0[i].1 = gap,
            Err(i) => self.0.insert(i, (key, gap)),
        }
    }
    fn remove(&mut self, key: &(u64, u64)) {
        if let Ok(i) = self.find(key) {
            self.0.remove(i);
        }
    }
    fn iter(&self) -> std::slice::Iter<'_, ((u64, u64), Gap)> {
        self.0.iter()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Appends one entry: length, CRC, kind, postcard payload.
fn put_entry<T: Serialize>(buf: &mut Vec<u8>, kind: u8, value: &T) {
    let mut body = [0u8; MAX_RESULT_LEN + 64];
    body[0] = kind;
    let Ok(payload) = postcard::to_slice(value, &mut body[1..]) else {
        // Unreachable: every entry type is smaller than a result plus its header.
        tracing::error!(kind, "spool entry too large, not written");
        return;
    };
    let len = 1 + payload.len();
    let body = &body[..len];
    buf.extend_from_slice(&(len as u16).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    buf.extend_from_slice(body);
}

/// What a record counts against `spool_max_bytes` and in `live_bytes`: its size as an entry of
/// its own (kind 2), whatever the packing on disk, so the same record always counts the same
/// (appended, read back, acknowledged) and the bound stays on the safe side of the disk.
fn record_bytes(result: &ProbeResult) -> u64 {
    let mut buf = [0u8; MAX_RESULT_LEN];
    let len = postcard::to_slice(result, &mut buf).map_or(MAX_RESULT_LEN, |b| b.len());
    (ENTRY_HEADER + 1 + len) as u64
}

/// Appends `results` as packed entries (kind 8) of up to [`vantage_proto::MAX_RESULTS`] each:
/// version 3 frames (version 4 when a result has another kind than http) of boot `boot_id`,
/// without gaps or clock (the group has its own).
fn put_packed(buf: &mut Vec<u8>, boot_id: u64, results: &[ProbeResult]) {
    let mut body = vec![0u8; MAX_ENTRY];
    for chunk in results.chunks(vantage_proto::MAX_RESULTS) {
        let batch = vantage_proto::Batch {
            boot_id,
            results: chunk.iter().copied().collect(),
            gaps: heapless::Vec::new(),
            clock: None,
        };
        body[0] = KIND_PACKED;
        // Version 3 when the results fit it (http only: what an agent from before version 4
        // reads back after a downgrade), else version 4 (issue #20's kinds).
        let packed = match vantage_proto::encode_v3(&batch, &mut body[1..]) {
            Ok(frame) => Ok(frame.len()),
            Err(_) => vantage_proto::encode(&batch, &mut body[1..]).map(|f| f.len()),
        };
        let Ok(frame_len) = packed else {
            // Unreachable: a batch of MAX_RESULTS always fits MAX_FRAME_LEN (proto's tests).
            tracing::error!(
                records = chunk.len(),
                "spool: results do not pack, not written"
            );
            continue;
        };
        let len = 1 + frame_len;
        buf.extend_from_slice(&(len as u16).to_le_bytes());
        buf.extend_from_slice(&crc32fast::hash(&body[..len]).to_le_bytes());
        buf.extend_from_slice(&body[..len]);
    }
}

/// The results of a packed entry's payload; None if it is not a frame of results alone.
fn unpack(payload: &[u8]) -> Option<heapless::Vec<ProbeResult, { vantage_proto::MAX_RESULTS }>> {
    let batch = vantage_proto::decode(payload).ok()?;
    (batch.gaps.is_empty() && !batch.results.is_empty()).then_some(batch.results)
}

/// Reads one entry; None at the end or at anything that does not check out.
fn read_entry(r: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; ENTRY_HEADER];
    r.read_exact(&mut head).ok()?;
    let len = u16::from_le_bytes([head[0], head[1]]) as usize;
    let crc = u32::from_le_bytes([head[2], head[3], head[4], head[5]]);
    if len == 0 || len > MAX_ENTRY {
        return None;
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    if crc32fast::hash(&body) != crc {
        return None;
    }
    let kind = body.remove(0);
    Some((kind, body))
}

/// Parses one entry from `data` at `at`: `(kind, payload, next offset)`, or `Err` if it is
/// cut short or does not check out (length, CRC).
fn parse_entry(data: &[u8], at: usize) -> Result<(u8, &[u8], usize), ()> {
    let head = data.get(at..at + ENTRY_HEADER).ok_or(())?;
    let len = u16::from_le_bytes([head[0], head[1]]) as usize;
    let crc = u32::from_le_bytes([head[2], head[3], head[4], head[5]]);
    if len == 0 || len > MAX_ENTRY {
        return Err(());
    }
    let start = at + ENTRY_HEADER;
    let body = data.get(start..start + len).ok_or(())?;
    if crc32fast::hash(body) != crc {
        return Err(());
    }
    Ok((body[0], &body[1..], start + len))
}

/// Records a group lost in part.
#[derive(Debug, Clone, Copy)]
struct Lost {
    boot_id: u64,
    from: u64,
    end: u64,
    first_seq: u64,
    min_ms: u64,
    max_ms: u64,
}

/// What reading every segment found (markers apply in file order).
#[derive(Default)]
struct Scan {
    tail: u64,
    watermark: u64,
    drops: Vec<(u64, u64)>,
    gaps: GapMap,
    gaps_done: Vec<GapKey>,
    groups: Vec<GroupIndex>,
    lost: Vec<Lost>,
    corrupt: u64,
}

impl Scan {
    fn segment(&mut self, first_pos: u64, data: &[u8]) {
        self.tail = self.tail.max(first_pos);
        if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
            if !data.is_empty() {
                self.corrupt += 1;
            }
            return;
        }
        let mut at = MAGIC.len();
        // The group whose records are being read: header, records read, header offset.
        let mut group: Option<(GroupHeader, u32, u64)> = None;
        while at < data.len() {
            let Ok((kind, payload, next)) = parse_entry(data, at) else {
                self.corrupt += 1;
                break;
            };
            if let Some((g, read, _)) = &mut group {
                let records = match kind {
                    KIND_RESULT if *read < g.count => {
                        Some(postcard::from_bytes::<ProbeResult>(payload).map_or(0, |_| 1))
                    }
                    KIND_PACKED if *read < g.count => Some(unpack(payload).map_or(0, |b| b.len())),
                    _ => None,
                };
                if let Some(n) = records {
                    // Unreadable, or more records than the header announced: corrupt.
                    let Some(total) = u32::try_from(n)
                        .ok()
                        .filter(|&n| n > 0)
                        .and_then(|n| read.checked_add(n))
                        .filter(|&t| t <= g.count)
                    else {
                        self.corrupt += 1;
                        break;
                    };
                    *read = total;
                    at = next;
                    continue;
                }
            }
            if let Some((g, read, offset)) = group.take() {
                self.close_group(g, read, first_pos, offset);
            }
            match kind {
                KIND_GROUP => match postcard::from_bytes::<GroupHeader>(payload) {
                    Ok(g) if g.count > 0 => {
                        self.tail = self.tail.max(g.first_pos + u64::from(g.count));
                        group = Some((g, 0, at as u64));
                    }
                    _ => {
                        self.corrupt += 1;
                        break;
                    }
                },
                KIND_ACK => {
                    if let Ok(upto) = postcard::from_bytes::<u64>(payload) {
                        self.watermark = self.watermark.max(upto);
                    }
                }
                KIND_DROP => {
                    if let Ok((f, t)) = postcard::from_bytes::<(u64, u64)>(payload) {
                        merge_range(&mut self.drops, f, t);
                    }
                }
                KIND_GAP => {
                    if let Ok(e) = postcard::from_bytes::<GapEntry>(payload) {
                        self.gaps.insert((e.boot_id, e.gap.first_seq), e.gap);
                    }
                }
                KIND_GAP_DONE => {
                    if let Ok(k) = postcard::from_bytes::<GapKey>(payload) {
                        self.gaps.remove(&(k.boot_id, k.first_seq));
                        self.gaps_done.push(k);
                    }
                }
                // A group's clock state: read with the group's records (`load_group`).
                KIND_CLOCK => {}
                // An unknown kind from a newer agent: skipped (its length is known).
                _ => {}
            }
            at = next;
        }
        if let Some((g, read, offset)) = group.take() {
            self.close_group(g, read, first_pos, offset);
        }
    }

    /// A group ends: its readable records are indexed; the rest (torn, corrupt) are lost.
    fn close_group(&mut self, g: GroupHeader, read: u32, segment: u64, offset: u64) {
        if read > 0 {
            self.groups.push(GroupIndex {
                boot_id: g.boot_id,
                first_pos: g.first_pos,
                valid: read,
                segment,
                offset,
            });
        }
        if read < g.count {
            self.lost.push(Lost {
                boot_id: g.boot_id,
                from: g.first_pos + u64::from(read),
                end: g.first_pos + u64::from(g.count),
                first_seq: g.first_seq + u64::from(read),
                min_ms: g.min_started_at_ms,
                max_ms: g.max_started_at_ms,
            });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vantage_proto::{Outcome, RegexOutcome};

    /// A fresh directory under the system's temporary folder.
    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vantage-spool-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    pub(crate) fn config(dir: &Path, max_bytes: u64) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_owned(),
            max_bytes,
            fsync: FsyncPolicy::Never,
        }
    }

    pub(crate) fn result(seq: u64) -> ProbeResult {
        ProbeResult {
            seq,
            target_id: 1 + (seq % 7) as u32,
            started_at_ms: 1_700_000_000_000 + seq * 1000,
            status: 200,
            outcome: Outcome::Up,
            failed_phase: None,
            regex: RegexOutcome::NotConfigured,
            total_us: 12_345,
            dns_us: Some(100),
            connect_us: Some(2000),
            tls_us: Some(5000),
            ttfb_us: Some(4000),
            transfer_us: Some(1000),
            body_bytes: 5120,
            body_truncated: false,
            redirects: 0,
            cert_not_after_s: Some(1_800_000_000),
            remote_ip: None,
            kind: vantage_proto::ProbeKind::Http,
            tls_version: None,
            dns: None,
        }
    }

    fn all(spool: &mut Spool) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(r) = spool.read_next(at, u64::MAX) {
            out.push((r.boot_id, r.result.seq));
            at = r.pos + 1;
        }
        out
    }

    #[test]
    fn ranges_stay_sorted_and_merged() {
        let mut r = Vec::new();
        for (f, t) in [
            (10, 12),
            (2, 4),
            (4, 6),
            (20, 21),
            (12, 15),
            (0, 1),
            (5, 11),
        ] {
            merge_range(&mut r, f, t);
        }
        assert_eq!(r, vec![(0, 1), (2, 15), (20, 21)]);
        merge_range(&mut r, 1, 2);
        assert_eq!(r, vec![(0, 15), (20, 21)]);
    }

    /// Appends the results `seqs` of boot `boot` and flushes them (one write).
    fn write(s: &mut Spool, boot: u64, seqs: std::ops::Range<u64>) {
        for seq in seqs {
            s.append(boot, &result(seq));
        }
        s.flush().unwrap();
    }

    #[test]
    fn records_survive_a_reopen_in_order_with_their_boot_and_seq() {
        let dir = temp_dir("reopen");
        let (mut s, replay) = Spool::open(config(&dir, 1 << 20)).unwrap();
        assert_eq!(
            replay,
            Replay {
                segments: 0,
                ..Replay::default()
            }
        );
        write(&mut s, 7, 0..10);
        write(&mut s, 7, 10..15);
        // Never written: a kill -9 before the flush loses it (it was never sent either).
        s.append(7, &result(15));
        let live = s.live_bytes();
        drop(s);
        let (mut s, replay) = Spool::open(config(&dir, 1 << 20)).unwrap();
        assert_eq!(replay.records, 15);
        assert_eq!(replay.lost, 0);
        assert_eq!(all(&mut s), (0..15).map(|q| (7, q)).collect::<Vec<_>>());
        assert!(s.live_bytes() < live && s.live_bytes() > 0);
        // New records follow at higher positions, under a new boot.
        s.append(8, &result(0));
        s.flush().unwrap();
        assert_eq!(all(&mut s).last(), Some(&(8, 0)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn acknowledged_records_are_not_replayed_and_their_segments_go() {
        let dir = temp_dir("ack");
        let (mut s, _) = Spool::open(config(&dir, 64 * 1024)).unwrap();
        // Far more than one segment (64 KiB) of records (packed: about 20 bytes each).
        let mut bytes = 0;
        for seq in 0..9000 {
            bytes += s.append(1, &result(seq)).1;
            if seq % 100 == 99 {
                s.flush().unwrap();
            }
        }
        s.flush().unwrap();
        assert!(s.segments() > 2, "{} segments", s.segments());
        s.ack(8500, 8500, 0);
        s.flush().unwrap();
        assert!(
            s.segments() <= 3,
            "acknowledged segments deleted: {}",
            s.segments()
        );
        drop(s);
        let (mut s, replay) = Spool::open(config(&dir, 64 * 1024)).unwrap();
        assert_eq!(replay.records, 500);
        assert_eq!(all(&mut s).first(), Some(&(1, 8500)));
        s.ack(9000, 500, bytes);
        s.flush().unwrap();
        drop(s);
        let (_, replay) = Spool::open(config(&dir, 64 * 1024)).unwrap();
        assert_eq!(replay.records, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn drops_and_gap_markers_survive_a_reopen() {
        let dir = temp_dir("markers");
        let (mut s, _) = Spool::open(config(&dir, 1 << 20)).unwrap();
        let mut sizes = Vec::new();
        for seq in 0..10 {
            sizes.push(s.append(3, &result(seq)));
        }
        s.flush().unwrap();
        for &(pos, bytes) in &sizes[..4] {
            s.dropped(pos, bytes);
        }
        let mut gap = Gap {
            first_seq: 0,
            count: 3,
            first_started_at_ms: 1,
            last_started_at_ms: 2,
        };
        s.gap_changed(3, &gap);
        s.flush().unwrap();
        gap.count = 4;
        s.gap_changed(3, &gap);
        s.gap_changed(
            3,
            &Gap {
                first_seq: 100,
                ..gap
            },
        );
        s.gap_done(3, 100);
        s.flush().unwrap();
        drop(s);
        let (mut s, replay) = Spool::open(config(&dir, 1 << 20)).unwrap();
        assert_eq!(replay.records, 6);
        assert_eq!(
            replay.gaps,
            vec![(3, gap)],
            "the latest version, the delivered one gone"
        );
        assert_eq!(all(&mut s), (4..10).map(|q| (3, q)).collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Starts that die before their first flush (a crash loop) keep every marker: the new
    /// segment that replaces an empty one of the same name restates them in its first write.
    #[test]
    fn markers_survive_starts_that_never_flush() {
        let dir = temp_dir("crashloop");
        let (mut s, _) = Spool::open(config(&dir, 1 << 20)).unwrap();
        let sizes: Vec<_> = (0..6).map(|q| s.append(4, &result(q))).collect();
        s.flush().unwrap();
        s.dropped(sizes[0].0, sizes[0].1);
        let gap = Gap {
            first_seq: 0,
            count: 1,
            first_started_at_ms: 1,
            last_started_at_ms: 1,
        };
        s.gap_changed(4, &gap);
        s.ack(0, 0, 0);
        s.flush().unwrap();
        drop(s);
        for _ in 0..3 {
            let (_, replay) = Spool::open(config(&dir, 1 << 20)).unwrap();
            assert_eq!(replay.records, 5);
            assert_eq!(replay.gaps, vec![(4, gap)]);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A power cut: the last write torn at every byte offset. Every record is either replayed
    /// or counted lost (and covered by the gap record); never a panic.
    #[test]
    fn a_torn_last_write_at_any_offset_is_replayed_or_reported_lost() {
        let dir = temp_dir("torn");
        let (mut s, _) = Spool::open(config(&dir, 1 << 20)).unwrap();
        write(&mut s, 5, 0..20);
        let path = s.segments.back().unwrap().path.clone();
        let before_last = std::fs::metadata(&path).unwrap().len();
        write(&mut s, 5, 20..32);
        drop(s);
        let full = std::fs::read(&path).unwrap();
        // The group header of the last write: its length is in the first two bytes.
        let header_end = before_last as usize
            + ENTRY_HEADER
            + u16::from_le_bytes([full[before_last as usize], full[before_last as usize + 1]])
                as usize;
        for cut in 0..=full.len() {
            let d = temp_dir(&format!("torn-{cut}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(path.file_name().unwrap()), &full[..cut]).unwrap();
            let (mut t, replay) = Spool::open(config(&d, 1 << 20)).unwrap();
            let read = all(&mut t);
            let lost: u64 = replay.gaps.iter().map(|(_, g)| u64::from(g.count)).sum();
            assert_eq!(replay.lost, lost, "cut {cut}");
            assert_eq!(read.len() as u64, replay.records, "cut {cut}");
            // Records are a prefix, in order.
            assert!(read
                .iter()
                .enumerate()
                .all(|(i, &(b, q))| b == 5 && q == i as u64));
            if cut >= header_end {
                // The header says the write held 12 more: each is replayed or in the gap.
                assert_eq!(replay.records + lost, 32, "cut {cut}: {replay:?}");
                if let Some((_, g)) = replay.gaps.first() {
                    assert_eq!(g.first_seq, replay.records);
                }
            } else if cut >= before_last as usize {
                // Not even the header reached the disk: the first write is whole.
                assert_eq!((replay.records, lost), (20, 0), "cut {cut}");
            }
            // A second start finds the same (the gap is not made twice, the torn part is
            // skipped) and the spool is usable.
            t.append(6, &result(0));
            t.flush().unwrap();
            drop(t);
            let (mut t, again) = Spool::open(config(&d, 1 << 20)).unwrap();
            assert_eq!(again.records, replay.records + 1, "cut {cut}");
            assert_eq!(again.gaps, replay.gaps, "cut {cut}");
            assert_eq!(all(&mut t).last(), Some(&(6, 0)));
            let _ = std::fs::remove_dir_all(&d);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_entry_loses_its_records_only() {
        let dir = temp_dir("corrupt");
        let (mut s, _) = Spool::open(config(&dir, 1 << 20)).unwrap();
        write(&mut s, 9, 0..10);
        drop(s);
        // The next start writes a new segment.
        let (mut s, _) = Spool::open(config(&dir, 1 << 20)).unwrap();
        write(&mut s, 9, 10..15);
        let first = s.segments.front().unwrap().path.clone();
        drop(s);
        let mut data = std::fs::read(&first).unwrap();
        let n = data.len();
        // Inside the packed entry of the first segment's only group (its 10 records; the
        // group's clock entry follows it only when the outbox set a clock, not here).
        data[n - 20] ^= 0xff;
        std::fs::write(&first, &data).unwrap();
        let (mut s, replay) = Spool::open(config(&dir, 1 << 20)).unwrap();
        assert_eq!(replay.lost, 10);
        assert_eq!(replay.corrupt, 1);
        assert_eq!(replay.gaps[0].1.first_seq, 0);
        assert_eq!(replay.gaps[0].1.count, 10);
        let seqs: Vec<u64> = all(&mut s).into_iter().map(|(_, q)| q).collect();
        assert_eq!(seqs, (10..15).collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_foreign_or_empty_file_is_not_a_panic() {
        let dir = temp_dir("foreign");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{:020}.seg", 0)), b"not a spool at all").unwrap();
        std::fs::write(dir.join(format!("{:020}.seg", 5)), b"").unwrap();
        std::fs::write(dir.join("notes.txt"), b"ignored").unwrap();
        let (mut s, replay) = Spool::open(config(&dir, 1 << 20)).unwrap();
        assert_eq!(replay.records, 0);
        assert_eq!(replay.corrupt, 1);
        s.append(1, &result(0));
        s.flush().unwrap();
        assert_eq!(all(&mut s), vec![(1, 0)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_write_per_flush_and_little_overhead_per_result() {
        let dir = temp_dir("overhead");
        let (mut s, _) = Spool::open(config(&dir, 1 << 20)).unwrap();
        let writes = s.stats().writes;
        let bytes = s.stats().bytes_written;
        let results: Vec<ProbeResult> = (0..10).map(result).collect();
        for r in &results {
            s.append(1, r);
        }
        s.ack(0, 0, 0);
        s.flush().unwrap();
        assert_eq!(s.stats().writes - writes, 1);
        let per_result = (s.stats().bytes_written - bytes) as f64 / 10.0;
        // Against what the same results cost on the wire, as one version 3 frame.
        let batch = vantage_proto::Batch {
            boot_id: 1,
            results: results.iter().copied().collect(),
            gaps: heapless::Vec::new(),
            clock: None,
        };
        let mut buf = [0u8; vantage_proto::MAX_FRAME_LEN];
        let wire = vantage_proto::encode(&batch, &mut buf).unwrap().len() as f64 / 10.0;
        let ratio = per_result / wire;
        assert!(
            ratio <= 1.5,
            "{per_result} bytes per result, {ratio:.2}× the wire's {wire}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A spool written before results were packed (one kind 2 entry per result) is read.
    #[test]
    fn a_spool_of_single_result_entries_is_still_read() {
        let dir = temp_dir("unpacked");
        std::fs::create_dir_all(&dir).unwrap();
        let mut data = MAGIC.to_vec();
        let header = GroupHeader {
            boot_id: 4,
            first_pos: 0,
            first_seq: 0,
            count: 3,
            min_started_at_ms: result(0).started_at_ms,
            max_started_at_ms: result(2).started_at_ms,
        };
        put_entry(&mut data, KIND_GROUP, &header);
        for seq in 0..3 {
            put_entry(&mut data, KIND_RESULT, &result(seq));
        }
        std::fs::write(dir.join(format!("{:020}.seg", 0)), &data).unwrap();
        let (mut s, replay) = Spool::open(config(&dir, 1 << 20)).unwrap();
        assert_eq!((replay.records, replay.lost, replay.corrupt), (3, 0, 0));
        assert_eq!(all(&mut s), vec![(4, 0), (4, 1), (4, 2)]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
