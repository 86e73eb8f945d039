//! The wire format between agents and the ingester.
//!
//! A *frame* is one MQTT payload: a format-version byte followed by a postcard-encoded [`Batch`].
//! Everything here is `no_std` and allocation-free so the same code runs on a Raspberry Pi, on a
//! microcontroller and in the ingester.
//!
//! # Compatibility contract
//! Field order and enum variant order are the contract: append, never reorder. A change that old
//! decoders cannot read gets a new [`FORMAT_VERSION`]; the golden-byte tests in `tests/golden.rs`
//! freeze every version ever shipped.
//!
//! # Sizes
//! A batch holds at most [`MAX_RESULTS`] results and a frame is at most [`MAX_FRAME_LEN`] bytes
//! (both enforced by the types: decoding a longer list is an error, never an allocation).
#![no_std]
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// The version byte that starts every frame this crate writes.
pub const FORMAT_VERSION: u8 = 1;

/// Most results in one batch (the capacity of [`Batch::results`]).
pub const MAX_RESULTS: usize = 32;

/// Largest encoded size of one [`ProbeResult`]: every varint at its widest
/// (u64: 10 bytes, u32: 5, u16: 3, enum tags: 1, `Option` tag: 1).
pub const MAX_RESULT_LEN: usize = 10 + 5 + 10 + 3 + 1 + 1 + 5 + 4 * (1 + 5) + 5;

/// Largest frame: version byte, boot id, list length, then full results.
pub const MAX_FRAME_LEN: usize = 1 + 10 + 1 + MAX_RESULTS * MAX_RESULT_LEN;

/// Why a probe ended the way it did. `Up` is the only success.
///
/// Append new kinds at the end; the numeric order is on the wire.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Outcome {
    /// Response received, status accepted, regex (if any) matched.
    Up,
    /// A response arrived but its status code is not in the accepted set.
    StatusNotAccepted,
    /// The body was read but the configured regex did not match it.
    RegexNotMatched,
    /// The host name did not resolve.
    DnsFailed,
    /// The TCP connection was actively refused.
    ConnectRefused,
    /// The TCP connection failed for another reason (unreachable, ...).
    ConnectFailed,
    /// The TLS handshake failed (untrusted or expired certificate, wrong name, ...).
    TlsFailed,
    /// The probe's deadline passed before it finished.
    Timeout,
    /// The peer reset or closed the connection mid-exchange.
    ConnectionReset,
    /// The server spoke something that is not valid HTTP/1.1.
    ProtocolError,
    /// Any other failure on the agent side.
    Other,
}

impl Outcome {
    /// Every variant, in wire order.
    pub const ALL: [Outcome; 11] = [
        Outcome::Up,
        Outcome::StatusNotAccepted,
        Outcome::RegexNotMatched,
        Outcome::DnsFailed,
        Outcome::ConnectRefused,
        Outcome::ConnectFailed,
        Outcome::TlsFailed,
        Outcome::Timeout,
        Outcome::ConnectionReset,
        Outcome::ProtocolError,
        Outcome::Other,
    ];

    /// The stable snake_case name used in logs and in PostgreSQL.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Up => "up",
            Outcome::StatusNotAccepted => "status_not_accepted",
            Outcome::RegexNotMatched => "regex_not_matched",
            Outcome::DnsFailed => "dns_failed",
            Outcome::ConnectRefused => "connect_refused",
            Outcome::ConnectFailed => "connect_failed",
            Outcome::TlsFailed => "tls_failed",
            Outcome::Timeout => "timeout",
            Outcome::ConnectionReset => "connection_reset",
            Outcome::ProtocolError => "protocol_error",
            Outcome::Other => "other",
        }
    }
}

/// The three states of a body check: a regex that is not configured is not a match.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RegexOutcome {
    NotConfigured,
    Matched,
    NotMatched,
}

/// One probe of one target.
///
/// Times are microseconds measured with a monotonic clock on the agent. A phase that did not
/// happen (no TLS on `http://`, no connect after a DNS failure) is `None`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ProbeResult {
    /// Per boot, strictly increasing from 0: (agent, boot id, seq) identifies a result.
    pub seq: u64,
    /// The target's id as configured.
    pub target_id: u32,
    /// Wall-clock time at which the probe started, unix milliseconds.
    pub started_at_ms: u64,
    /// HTTP status of the response, 0 when no response arrived.
    pub status: u16,
    pub outcome: Outcome,
    pub regex: RegexOutcome,
    /// Start of the probe to its end (success or failure).
    pub total_us: u32,
    pub dns_us: Option<u32>,
    pub connect_us: Option<u32>,
    pub tls_us: Option<u32>,
    /// Request sent to the first response byte.
    pub ttfb_us: Option<u32>,
    /// Body bytes read.
    pub body_bytes: u32,
}

/// The unit of upload: results of one agent boot, in sequence order.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Batch {
    /// Random at each agent start, so sequence numbers of two boots never collide.
    pub boot_id: u64,
    pub results: heapless::Vec<ProbeResult, MAX_RESULTS>,
}

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

/// Writes `batch` as a frame into `buf` and returns the used prefix.
pub fn encode<'b>(batch: &Batch, buf: &'b mut [u8]) -> Result<&'b mut [u8], Error> {
    let (first, rest) = buf.split_first_mut().ok_or(Error::BufferTooSmall)?;
    *first = FORMAT_VERSION;
    let body_len = postcard::to_slice(batch, rest)
        .map_err(|_| Error::BufferTooSmall)?
        .len();
    Ok(&mut buf[..1 + body_len])
}

/// Reads a frame. Total: every byte string gives a batch or an error, never a panic.
pub fn decode(frame: &[u8]) -> Result<Batch, Error> {
    let (&version, body) = frame.split_first().ok_or(Error::Empty)?;
    if version != FORMAT_VERSION {
        return Err(Error::UnknownVersion(version));
    }
    let (batch, rest) = postcard::take_from_bytes::<Batch>(body).map_err(|_| Error::Malformed)?;
    if !rest.is_empty() {
        return Err(Error::TrailingBytes);
    }
    Ok(batch)
}
