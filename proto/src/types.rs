//! The current (version 2) wire types.

use serde::{Deserialize, Serialize};

use crate::{MAX_GAPS, MAX_RESULTS};

/// Why a probe ended the way it did. `Up` is the only success.
///
/// Append new kinds at the end; the numeric order is on the wire. Kinds 0–10 exist since
/// version 1; 11–17 since version 2; 18 (`AddressRefused`) was appended within version 2: a
/// version 2 decoder older than it rejects a frame carrying it as malformed (dead-lettered by
/// an old bridge), so upgrade the ingester before the agents. 19 (`MemoryRefused`) was
/// appended within version 2 the same way.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Outcome {
    /// Response received, status accepted, regex (if any) matched.
    Up,
    /// A response arrived but its status code is not in the accepted set.
    StatusNotAccepted,
    /// The body was read to its end but the configured regex did not match it.
    RegexNotMatched,
    /// Name resolution failed for another reason than "no such name" (server failure, ...).
    DnsFailed,
    /// The TCP connection was actively refused.
    ConnectRefused,
    /// The TCP connection failed for another reason.
    ConnectFailed,
    /// The TLS handshake failed for a reason without its own kind.
    TlsFailed,
    /// The probe's deadline passed (see [`ProbeResult::failed_phase`] for where).
    Timeout,
    /// The peer reset or closed the connection mid-exchange.
    ConnectionReset,
    /// The server spoke something that is not valid HTTP/1.1.
    ProtocolError,
    /// Any other failure on the agent side.
    Other,
    /// The name does not exist (NXDOMAIN) or has no address.
    DnsNoSuchName,
    /// The deadline passed while connecting.
    ConnectTimeout,
    /// No route to the host or network.
    Unreachable,
    /// The certificate chain does not lead to a trusted root (self-signed, unknown CA).
    TlsUntrusted,
    /// The certificate (or one in its chain) is expired or not yet valid.
    TlsExpired,
    /// The certificate is not valid for the host name.
    TlsHostnameMismatch,
    /// The regex did not match the part of the body read before the size cap.
    BodyTruncated,
    /// The target resolved to an address the agent refuses to probe (loopback, private,
    /// link-local...; `probes.private_addresses = "refuse"`). Nothing was sent to it.
    AddressRefused,
    // --- Appended by issue #13 items 3/12 (branch h13b); the lead renumbers at merge. ---
    /// The agent did not probe: the probe would hold more body memory (its `body_cap` with a
    /// regex, at worst) than the agent's whole `probes.memory_budget`. Nothing was sent; an
    /// agent-side limit, not the target's failure. No phase.
    MemoryRefused,
    // --- End of issue #13 items 3/12. ---
}

impl Outcome {
    /// Every variant, in wire order.
    pub const ALL: [Outcome; 20] = [
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
        Outcome::DnsNoSuchName,
        Outcome::ConnectTimeout,
        Outcome::Unreachable,
        Outcome::TlsUntrusted,
        Outcome::TlsExpired,
        Outcome::TlsHostnameMismatch,
        Outcome::BodyTruncated,
        Outcome::AddressRefused,
        // Issue #13 items 3/12 (h13b).
        Outcome::MemoryRefused,
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
            Outcome::DnsNoSuchName => "dns_no_such_name",
            Outcome::ConnectTimeout => "connect_timeout",
            Outcome::Unreachable => "unreachable",
            Outcome::TlsUntrusted => "tls_untrusted",
            Outcome::TlsExpired => "tls_expired",
            Outcome::TlsHostnameMismatch => "tls_hostname_mismatch",
            Outcome::BodyTruncated => "body_truncated",
            Outcome::AddressRefused => "address_refused",
            // Issue #13 items 3/12 (h13b).
            Outcome::MemoryRefused => "memory_refused",
        }
    }
}

/// The phases of a probe, in order. Append only.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Phase {
    Dns,
    Connect,
    Tls,
    /// Writing the request and waiting for the first response byte.
    FirstByte,
    /// Reading the rest of the response (headers and body).
    Body,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Dns,
        Phase::Connect,
        Phase::Tls,
        Phase::FirstByte,
        Phase::Body,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Dns => "dns",
            Phase::Connect => "connect",
            Phase::Tls => "tls",
            Phase::FirstByte => "first_byte",
            Phase::Body => "body",
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

/// An IP address without std (`core::net` types have no serde support in no_std serde).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum IpAddress {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl From<core::net::IpAddr> for IpAddress {
    fn from(ip: core::net::IpAddr) -> Self {
        match ip {
            core::net::IpAddr::V4(v4) => IpAddress::V4(v4.octets()),
            core::net::IpAddr::V6(v6) => IpAddress::V6(v6.octets()),
        }
    }
}

impl From<IpAddress> for core::net::IpAddr {
    fn from(ip: IpAddress) -> Self {
        match ip {
            IpAddress::V4(o) => core::net::IpAddr::from(o),
            IpAddress::V6(o) => core::net::IpAddr::from(o),
        }
    }
}

/// One probe of one target.
///
/// Times are microseconds measured with a monotonic clock on the agent. A phase that did not
/// happen (no TLS on `http://`, no connect after a DNS failure) is `None`. With redirects, the
/// phase times are those of the final hop and `total_us` covers all hops.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ProbeResult {
    /// Per boot, strictly increasing from 0: (agent, boot id, seq) identifies a result.
    pub seq: u64,
    /// The target's id.
    pub target_id: u32,
    /// Wall-clock time at which the probe started, unix milliseconds.
    pub started_at_ms: u64,
    /// HTTP status of the (final) response, 0 when no response arrived.
    pub status: u16,
    pub outcome: Outcome,
    /// The phase the probe was in when it failed; None on success (and for v1 frames).
    pub failed_phase: Option<Phase>,
    pub regex: RegexOutcome,
    /// Start of the probe to its end (success or failure), all hops.
    pub total_us: u32,
    pub dns_us: Option<u32>,
    pub connect_us: Option<u32>,
    pub tls_us: Option<u32>,
    /// Request written to the first response byte read.
    pub ttfb_us: Option<u32>,
    /// First response byte to the end of the body (or the cap).
    pub transfer_us: Option<u32>,
    /// Body bytes read (at most the cap).
    pub body_bytes: u32,
    /// The body was longer than the cap and reading stopped there.
    pub body_truncated: bool,
    /// Redirects followed before the final response.
    pub redirects: u8,
    /// Expiry (notAfter) of the leaf certificate, unix seconds; every successful TLS handshake.
    pub cert_not_after_s: Option<u64>,
    /// The address actually connected to (final hop).
    pub remote_ip: Option<IpAddress>,
}

/// Results an agent had to drop (its buffer overflowed during a long outage): loss made explicit.
/// The dropped results had sequence numbers `first_seq .. first_seq + count`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Gap {
    pub first_seq: u64,
    pub count: u32,
    /// Probe start of the first and the last dropped result, unix milliseconds.
    pub first_started_at_ms: u64,
    pub last_started_at_ms: u64,
}

/// The unit of upload: results (and gap records) of one agent boot, in sequence order.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Batch {
    /// Random at each agent start, so sequence numbers of two boots never collide.
    pub boot_id: u64,
    pub results: heapless::Vec<ProbeResult, MAX_RESULTS>,
    pub gaps: heapless::Vec<Gap, MAX_GAPS>,
}
