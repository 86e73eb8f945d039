//! Format version 4 (issue #20, probe kinds): version 3's packed layout ([`crate::v3`]) with a
//! result's probe kind and the fields that only some kinds have. What an `http` result costs
//! does not change: its bytes are exactly version 3's (only the frame's version byte differs),
//! because the kind and the new fields travel in an *extension byte* that a result has only
//! when it needs one, announced by head bit 7 (reserved in version 3).
//!
//! Layout: as version 3, but in each result
//!
//! | field | when | encoding |
//! |---|---|---|
//! | head | always | as version 3; bit 7: an extension byte follows the presence byte |
//! | presence | always | as version 3 |
//! | extension | head bit 7 | see below |
//! | second extension | extension bit 7 | see below |
//! | outcome … address | | as version 3 |
//! | TLS version | extension bit 4 | variant index of [`crate::TlsVersion`] |
//! | DNS reply | second extension byte, bit 0 | varint RCODE, varint answer count ([`crate::DnsReply`]) |
//!
//! The extension byte:
//!
//! | bits | meaning |
//! |---|---|
//! | 0–3 | the kind: variant index of [`crate::ProbeKind`] (0 http, 1 tcp, 2 tls, 3 dns; up to 15 kinds) |
//! | 4 | TLS version present (kind `tls`) |
//! | 5–6 | reserved (0), for the fields of the kinds still to come, each appended at the end of the result in bit order: planned are 5 = address family of `ip_family = "both"`, 6 = negotiated HTTP version |
//! | 7 | a second extension byte follows this one (its fields come after those of bits 4–6) |
//!
//! The second extension byte (issue #20's `dns` kind; present only when one of its bits is set,
//! so a byte of 0 is refused as not canonical):
//!
//! | bits | meaning |
//! |---|---|
//! | 0 | DNS reply present (kind `dns`, an answer arrived): RCODE and answer count |
//! | 1–7 | reserved (0): planned are the ping fields (rtt min/avg/max, loss) |
//!
//! A result has an extension byte exactly when its kind is not `http` or it has a version 4
//! field; a byte of 0 (http, nothing) is refused as not canonical. A decoder refuses a set
//! reserved bit as [`crate::Error::Malformed`], so a field added later in a reserved bit needs
//! no new version byte, only the same upgrade order as an appended outcome: ingesters first
//! (an older bridge dead-letters such a frame, `malformed`).
//!
//! A non-`http` result cannot be written as version 3 or 2 ([`crate::Error::Unrepresentable`]):
//! an agent whose targets include other kinds must send version 4, and its configuration
//! refuses `uplink.wire_format` below 4 then.

use crate::{Batch, Error};

/// The version byte of this format.
pub const VERSION: u8 = 4;

/// Writes `batch` as a version 4 frame into `buf` and returns the used prefix.
pub fn encode<'b>(batch: &Batch, buf: &'b mut [u8]) -> Result<&'b mut [u8], Error> {
    crate::v3::encode_packed(VERSION, batch, buf)
}
