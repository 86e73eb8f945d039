//! End-to-end acknowledgements: what a bridge tells an agent once Kafka holds its results.
//!
//! `[ACK_VERSION] postcard(Ack)`, published by the bridge (QoS 0) on
//! `<prefix>/v1/acks/<region>/<agent>` after Kafka's delivery report of a frame from that agent
//! (several frames' acknowledgements coalesced). The agent frees a frame's spool space only when
//! every range of the frame ([`frame_ranges`]) is inside an acknowledgement of its boot; the
//! broker's PUBACK keeps governing the MQTT window. The agent's identity is the topic (the ACL
//! lets only that agent read it and only the ingester write it), so it is not in the payload.
//!
//! Same rules as every frame here: version byte first, field order frozen (append only), sizes
//! bounded by heapless capacities ([`MAX_ACK_RANGES`]), decoding total.

use heapless::Vec;
use serde::{Deserialize, Serialize};

use crate::{Batch, Error};

/// Version byte of acknowledgement frames.
pub const ACK_VERSION: u8 = 1;

/// Most sequence ranges in one acknowledgement. A frame needs at most
/// `MAX_RESULTS + MAX_GAPS` of them (36); a bridge with more to say sends several frames.
pub const MAX_ACK_RANGES: usize = 64;

/// Sequence numbers `first..=last` of one boot.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SeqRange {
    pub first: u64,
    pub last: u64,
}

impl SeqRange {
    /// Whether `other` lies entirely inside this range.
    pub const fn covers(&self, other: &SeqRange) -> bool {
        self.first <= other.first && other.last <= self.last
    }
}

/// "Kafka holds these sequence numbers of this boot."
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Ack {
    /// The boot the sequence numbers belong to (a frame's [`Batch::boot_id`]).
    pub boot_id: u64,
    /// Ascending, non-overlapping (the encoder's contract; a decoder must not rely on it).
    pub ranges: Vec<SeqRange, MAX_ACK_RANGES>,
}

impl Ack {
    /// Whether every range of `ranges` is inside one range of this acknowledgement.
    pub fn covers_all(&self, ranges: &[SeqRange]) -> bool {
        ranges
            .iter()
            .all(|r| self.ranges.iter().any(|a| a.covers(r)))
    }
}

/// Largest acknowledgement frame: version, boot id, list length, ranges of two u64 varints.
pub const MAX_ACK_LEN: usize = 1 + 10 + 1 + MAX_ACK_RANGES * 20;

/// Most ranges [`frame_ranges`] can return.
pub const MAX_FRAME_RANGES: usize = crate::MAX_RESULTS + crate::MAX_GAPS;

/// The sequence numbers a frame accounts for, as ascending merged ranges: its results' seqs and
/// its gap records' ranges (a gap-only frame is acknowledged too). Empty for an empty batch.
pub fn frame_ranges(batch: &Batch) -> Vec<SeqRange, MAX_FRAME_RANGES> {
    let mut raw: Vec<SeqRange, MAX_FRAME_RANGES> = Vec::new();
    for r in &batch.results {
        let _ = raw.push(SeqRange {
            first: r.seq,
            last: r.seq,
        });
    }
    for g in &batch.gaps {
        if g.count > 0 {
            let _ = raw.push(SeqRange {
                first: g.first_seq,
                last: g.first_seq.saturating_add(u64::from(g.count) - 1),
            });
        }
    }
    raw.sort_unstable_by_key(|r| r.first);
    merge_sorted(raw.iter().copied())
}

/// Merges ranges sorted by `first` (overlapping or adjacent ones become one) into at most `N`;
/// what does not fit is left out (callers size `N` so that nothing is).
pub fn merge_sorted<const N: usize>(
    sorted: impl IntoIterator<Item = SeqRange>,
) -> Vec<SeqRange, N> {
    let mut out: Vec<SeqRange, N> = Vec::new();
    for r in sorted {
        if let Some(last) = out.last_mut() {
            if r.first <= last.last.saturating_add(1) {
                last.last = last.last.max(r.last);
                continue;
            }
        }
        if out.push(r).is_err() {
            break;
        }
    }
    out
}

/// Writes an acknowledgement frame into `buf`.
pub fn encode_ack<'b>(ack: &Ack, buf: &'b mut [u8]) -> Result<&'b mut [u8], Error> {
    crate::encode_versioned(ACK_VERSION, ack, buf)
}

/// Reads an acknowledgement frame. Total: more than [`MAX_ACK_RANGES`] ranges, a range with
/// `first > last`, or extra bytes are errors, never an allocation or a panic.
pub fn decode_ack(frame: &[u8]) -> Result<Ack, Error> {
    let (&version, body) = frame.split_first().ok_or(Error::Empty)?;
    match version {
        ACK_VERSION => {
            let ack = crate::decode_body::<Ack>(body)?;
            if ack.ranges.iter().any(|r| r.first > r.last) {
                return Err(Error::Malformed);
            }
            Ok(ack)
        }
        v => Err(Error::UnknownVersion(v)),
    }
}
