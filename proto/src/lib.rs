//! The wire format between agents and the ingester.
//!
//! A *frame* is one MQTT payload: a format-version byte followed by a [`Batch`] (version 2: its
//! plain postcard struct; versions 3 and 4: packed, see [`v3`] and [`v4`]).
//! Everything here is `no_std` and allocation-free so the same code runs on a Raspberry Pi, on a
//! microcontroller and in the ingester.
//!
//! # Compatibility contract
//! Field order and enum variant order are the contract: append, never reorder. postcard has no
//! field tags, so a new field means a new [`FORMAT_VERSION`]; the decoder keeps reading every
//! version ever shipped ([`v1`] frames come out as the current [`Batch`] with the fields v1 did
//! not have left empty). The golden-byte tests in `tests/golden.rs` freeze every version.
//! Version 4 leaves room for the fields of the probe kinds still to come (issue #20): reserved
//! bits of its extension byte, which a decoder older than the field refuses (see [`v4`]).
//!
//! # Sizes
//! A batch holds at most [`MAX_RESULTS`] results and [`MAX_GAPS`] gap records; a frame is at
//! most [`MAX_FRAME_LEN`] bytes (enforced by the types: decoding a longer list is an error, never
//! an allocation).
#![no_std]
#![forbid(unsafe_code)]

pub mod ack;
pub mod control;
pub mod topic;
mod types;
pub mod v1;
pub mod v3;
pub mod v4;

pub use types::*;

/// The version byte of frames [`encode`] writes ([`v4`]: version 3 with probe kinds). Versions
/// 1 to 3 are still read, and [`encode_v3`] and [`encode_v2`] still write versions 3 and 2 for
/// ingesters that predate version 4 (results of kind `http` only).
pub const FORMAT_VERSION: u8 = v4::VERSION;

/// Most results in one batch (the capacity of [`Batch::results`]).
pub const MAX_RESULTS: usize = 32;

/// Most gap records in one batch (the capacity of [`Batch::gaps`]).
pub const MAX_GAPS: usize = 4;

// Widest postcard encodings: varint u64 10 bytes, u32 5, u16 3, u8 1 (raw), enum tag and
// Option tag 1, bool 1.
const U64: usize = 10;
const U32: usize = 5;
const U16: usize = 3;
const TAG: usize = 1;

/// Largest encoded size of one [`ProbeResult`].
pub const MAX_RESULT_LEN: usize = U64 // seq
    + U32 // target_id
    + U64 // started_at_ms
    + U16 // status
    + TAG // outcome
    + TAG + TAG // failed_phase
    + TAG // regex
    + U32 // total_us
    + 5 * (TAG + U32) // dns, connect, tls, ttfb, transfer
    + U32 // body_bytes
    + 1 // body_truncated
    + 1 // redirects
    + TAG + U64 // cert_not_after_s
    + TAG + TAG + 16; // remote_ip (v6)

/// Largest encoded size of one [`Gap`].
pub const MAX_GAP_LEN: usize = U64 + U32 + U64 + U64;

/// Largest encoded size of a batch's [`ClockHealth`] in a version 3 frame (flags, both
/// errors, synced-from seq, boot age, seal time delta).
pub const MAX_CLOCK_LEN: usize = 1 + U32 + U32 + U64 + U32 + U64;

/// Largest frame: version byte, boot id, then both lists with their length prefixes (version
/// 2's widest encoding, the largest of every version: a version 3 or 4 frame, clock and kind
/// fields included, is smaller; `tests/golden.rs` checks them).
pub const MAX_FRAME_LEN: usize =
    1 + U64 + 1 + MAX_RESULTS * MAX_RESULT_LEN + 1 + MAX_GAPS * MAX_GAP_LEN;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Error {
    /// The frame has no bytes at all.
    Empty,
    /// The first byte names a format this decoder does not know.
    UnknownVersion(u8),
    /// The bytes after the version byte are not a valid batch.
    Malformed,
    /// A valid batch is followed by extra bytes.
    TrailingBytes,
    /// The output buffer is too small for the frame.
    BufferTooSmall,
    /// The batch has a result this format version has no place for (a kind other than `http`,
    /// or a field of version 4, in a version 2 or 3 frame). Nothing is dropped silently.
    Unrepresentable,
}

impl Error {
    /// A short stable reason, used as the dead-letter reason and as a metric label.
    pub const fn reason(self) -> &'static str {
        match self {
            Error::Empty => "empty_frame",
            Error::UnknownVersion(_) => "unknown_version",
            Error::Malformed => "malformed",
            Error::TrailingBytes => "trailing_bytes",
            Error::BufferTooSmall => "buffer_too_small",
            Error::Unrepresentable => "unrepresentable",
        }
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Empty => f.write_str("empty frame"),
            Error::UnknownVersion(v) => write!(f, "unknown format version {v}"),
            Error::Malformed => f.write_str("malformed batch"),
            Error::TrailingBytes => f.write_str("trailing bytes after batch"),
            Error::BufferTooSmall => f.write_str("output buffer too small"),
            Error::Unrepresentable => f.write_str(
                "a result this format version cannot carry (kind other than http: version 4)",
            ),
        }
    }
}

impl core::error::Error for Error {}

/// Whether `name` may be an agent id or a region: 1 to 64 bytes of `a-z`, `0-9`, `-`, `_`, `.`.
///
/// Both become MQTT topic levels and SQL values, so the agent refuses other names at config load
/// and the bridge refuses topics that contain them.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// Largest target id: ids are `u32` on the wire but `integer` (signed 32-bit) in PostgreSQL, so
/// ids above `i32::MAX` would wrap to negative numbers there.
pub const MAX_TARGET_ID: u32 = i32::MAX as u32;

/// Whether `id` is a usable target id: 1..=[`MAX_TARGET_ID`]. The agent refuses other ids at
/// config load, and the sink dead-letters results that carry one.
pub fn is_valid_target_id(id: u32) -> bool {
    (1..=MAX_TARGET_ID).contains(&id)
}

/// Writes `batch` as a current-version frame into `buf` and returns the used prefix.
pub fn encode<'b>(batch: &Batch, buf: &'b mut [u8]) -> Result<&'b mut [u8], Error> {
    v4::encode(batch, buf)
}

/// Writes `batch` as a version 3 frame, which every ingester since version 3 reads: what an
/// agent sends while its ingester is older than version 4. [`Error::Unrepresentable`] when a
/// result does not fit version 3 ([`ProbeResult::fits_v3`]).
pub fn encode_v3<'b>(batch: &Batch, buf: &'b mut [u8]) -> Result<&'b mut [u8], Error> {
    v3::encode(batch, buf)
}

/// Writes `batch` as a version 2 frame (plain postcard of [`Batch`]), which every ingester since
/// version 2 reads: what an agent sends while its ingester is older than version 3.
/// [`Error::Unrepresentable`] when a result does not fit ([`ProbeResult::fits_v3`]): its
/// postcard struct would silently leave out the kind.
pub fn encode_v2<'b>(batch: &Batch, buf: &'b mut [u8]) -> Result<&'b mut [u8], Error> {
    if !batch.results.iter().all(ProbeResult::fits_v3) {
        return Err(Error::Unrepresentable);
    }
    encode_versioned(2, batch, buf)
}

/// Writes a version byte and a postcard body.
fn encode_versioned<'b, T: serde::Serialize>(
    version: u8,
    body: &T,
    buf: &'b mut [u8],
) -> Result<&'b mut [u8], Error> {
    let (first, rest) = buf.split_first_mut().ok_or(Error::BufferTooSmall)?;
    *first = version;
    let body_len = postcard::to_slice(body, rest)
        .map_err(|_| Error::BufferTooSmall)?
        .len();
    Ok(&mut buf[..1 + body_len])
}

/// Reads exactly one `T` from `body`; extra bytes are an error.
fn decode_body<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, Error> {
    let (value, rest) = postcard::take_from_bytes::<T>(body).map_err(|_| Error::Malformed)?;
    if !rest.is_empty() {
        return Err(Error::TrailingBytes);
    }
    Ok(value)
}

/// Reads a frame of any known version. Total: every byte string gives a batch or an error,
/// never a panic.
pub fn decode(frame: &[u8]) -> Result<Batch, Error> {
    let (&version, body) = frame.split_first().ok_or(Error::Empty)?;
    match version {
        1 => decode_body::<v1::Batch>(body).map(Batch::from),
        2 => decode_body::<Batch>(body),
        v3::VERSION => v3::decode_body(v3::VERSION, body),
        v4::VERSION => v3::decode_body(v4::VERSION, body),
        v => Err(Error::UnknownVersion(v)),
    }
}
