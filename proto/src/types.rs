//! The wire types (version 2's postcard structs, which version 3 packs).

use serde::{Deserialize, Serialize};

use crate::{MAX_GAPS, MAX_RESULTS};

/// Why a probe ended the way it did. `Up` is the only success.
///
/// Append new kinds at the end; the numeric order is on the wire. Kinds 0–10 exist since
/// version 1; 11–17 since version 2; 18 (`AddressRefused`) was appended within version 2: a
/// version 2 decoder older than it rejects a frame carrying it as malformed (dead-lettered by
/// an old bridge), so upgrade the ingester before the agents. The same holds for the kinds
/// 19–23 (the "issue 13" block below), 24 (`Missed`), 25 (`ExpectMismatch`, issue 20) and 26
/// (`DnsServerFailure`, issue 20's `dns` kind).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Outcome {
    /// Response received, status accepted, regex (if any) matched.
    Up,
    /// A response arrived but its status code is not in the accepted set.
    StatusNotAccepted,
    /// The body was read to its end but the configured regex did not match it.
    RegexNotMatched,
    /// Name resolution failed for another reason than "no such name" (server failure, ...;
    /// kind `dns`: a response code without its own kind, REFUSED or NOTIMP, in
    /// [`DnsReply::rcode`]).
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
    /// The server spoke something that is not valid HTTP/1.1 (kind `dns`: a reply that is not
    /// a DNS message).
    ProtocolError,
    /// Any other failure on the agent side.
    Other,
    /// The name does not exist (NXDOMAIN) or has no address (kind `dns`: NXDOMAIN, or NOERROR
    /// without a record of the type asked; [`DnsReply::rcode`] tells them apart).
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
    // ---- appended within version 2 for issue 13 (hostile servers); keep together ----
    /// The redirect limit (`max_redirects`) was reached and the answer was another redirect.
    TooManyRedirects,
    /// The redirect limit was reached in a chain that requested the same URL twice.
    RedirectLoop,
    /// A redirect from `https` to `http` was not followed (the target did not set
    /// `allow_downgrade`). Nothing was sent over plain HTTP.
    DowngradeRefused,
    /// The body's `Content-Encoding` is corrupt, truncated by the server, or not one the agent
    /// decodes, so the regex could not be checked.
    BadContentEncoding,
    /// The agent did not probe: the probe would hold more body memory (its `body_cap` with a
    /// regex, at worst) than the agent's whole `probes.memory_budget`. Nothing was sent; an
    /// agent-side limit, not the target's failure. No phase.
    MemoryRefused,
    // ---- end of the issue 13 block ----
    // ---- appended within version 2 for issue 18 (an agent that forgets nothing) ----
    /// The probe was due but did not run: the agent was suspended or late (whole periods went
    /// by), its previous probe of the target was still running, no probe slot was free, or no
    /// body memory freed within the probe's timeout. Nothing was sent; no timings, no phase.
    /// Not measured, as opposed to measured up: an agent-side fact, not the target's failure.
    Missed,
    // ---- appended for issue 20 (probe kinds) ----
    /// A `tcp` probe's `expect` check failed: the first bytes the peer sent are not the
    /// expected ones (a banner of another service, an error line). No phase: an answer arrived
    /// and was checked, as for [`Outcome::RegexNotMatched`].
    ExpectMismatch,
    /// A `dns` probe's resolver answered SERVFAIL (RCODE 2): it could not resolve the name
    /// (an upstream failed or refused, a broken DNSSEC chain). Phase `dns`. (An NXDOMAIN answer
    /// is [`Outcome::DnsNoSuchName`]; other error codes, REFUSED or NOTIMP, are
    /// [`Outcome::DnsFailed`] with the code in [`DnsReply::rcode`].)
    DnsServerFailure,
}

impl Outcome {
    /// Every variant, in wire order.
    pub const ALL: [Outcome; 27] = [
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
        // issue 13 block
        Outcome::TooManyRedirects,
        Outcome::RedirectLoop,
        Outcome::DowngradeRefused,
        Outcome::BadContentEncoding,
        Outcome::MemoryRefused,
        // issue 18
        Outcome::Missed,
        // issue 20
        Outcome::ExpectMismatch,
        Outcome::DnsServerFailure,
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
            // issue 13 block
            Outcome::TooManyRedirects => "too_many_redirects",
            Outcome::RedirectLoop => "redirect_loop",
            Outcome::DowngradeRefused => "downgrade_refused",
            Outcome::BadContentEncoding => "bad_content_encoding",
            Outcome::MemoryRefused => "memory_refused",
            // issue 18
            Outcome::Missed => "missed",
            // issue 20
            Outcome::ExpectMismatch => "expect_mismatch",
            Outcome::DnsServerFailure => "dns_server_failure",
        }
    }
}

/// The phases of a probe. Append only (the wire order is not the order they happen in:
/// `Headers` comes between `FirstByte` and `Body`, `Check` last). Like [`Outcome`], the
/// phases of the issue 13 block were appended within version 2.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Phase {
    Dns,
    Connect,
    Tls,
    /// Writing the request and waiting for the first response byte.
    FirstByte,
    /// Reading the body (before issue 13 also the headers after their first byte).
    Body,
    // ---- appended within version 2 for issue 13 (hostile servers); keep together ----
    /// The first byte arrived; reading the rest of the response head.
    Headers,
    /// After the last body byte: decoding the body and searching it with the regex.
    Check,
    // ---- end of the issue 13 block ----
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Dns,
        Phase::Connect,
        Phase::Tls,
        Phase::FirstByte,
        Phase::Body,
        // issue 13 block
        Phase::Headers,
        Phase::Check,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Dns => "dns",
            Phase::Connect => "connect",
            Phase::Tls => "tls",
            Phase::FirstByte => "first_byte",
            Phase::Body => "body",
            // issue 13 block
            Phase::Headers => "headers",
            Phase::Check => "check",
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

/// What a probe checks (a target's `kind`, issue #20). Append only: the variant index is on
/// the wire (result frames from version 4 on, target sets from version 2 on) and is the
/// `kind_id` of PostgreSQL (table `probe_kinds`). The serde names (`http`, `tcp`, `tls`) are
/// what configuration files say; postcard ignores them.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// An HTTP(S) request (every result before version 4).
    #[default]
    Http,
    /// A TCP connection to host:port, optionally writing `send` and checking `expect`.
    Tcp,
    /// A TLS handshake to host:port: protocol version, certificate expiry, verification.
    Tls,
    /// A DNS query (a name and a record type) to a resolver: response code, answer count,
    /// query time.
    Dns,
}

impl ProbeKind {
    /// Every variant, in wire order.
    pub const ALL: [ProbeKind; 4] = [
        ProbeKind::Http,
        ProbeKind::Tcp,
        ProbeKind::Tls,
        ProbeKind::Dns,
    ];

    /// The stable name used in configuration, logs and PostgreSQL.
    pub const fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Http => "http",
            ProbeKind::Tcp => "tcp",
            ProbeKind::Tls => "tls",
            ProbeKind::Dns => "dns",
        }
    }

    /// The variant index (the wire value).
    pub const fn index(self) -> u8 {
        self as u8
    }

    /// The kind of wire value `index`, if there is one.
    pub fn from_index(index: u8) -> Option<ProbeKind> {
        ProbeKind::ALL.get(usize::from(index)).copied()
    }
}

/// The TLS protocol version a handshake negotiated. Append only (the variant index is on the
/// wire, version 4).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

impl TlsVersion {
    /// Every variant, in wire order.
    pub const ALL: [TlsVersion; 2] = [TlsVersion::Tls12, TlsVersion::Tls13];

    /// The name OpenSSL and rustls print (`TLSv1.3`), what the `results` view shows.
    pub const fn as_str(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "TLSv1.2",
            TlsVersion::Tls13 => "TLSv1.3",
        }
    }

    /// The protocol's own number (RFC 8446 `ProtocolVersion`: 0x0303, 0x0304), what
    /// PostgreSQL stores.
    pub const fn code(self) -> u16 {
        match self {
            TlsVersion::Tls12 => 0x0303,
            TlsVersion::Tls13 => 0x0304,
        }
    }
}

/// What a DNS resolver answered (kind `dns`; version 4): the response code and how many
/// records the answer section holds.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DnsReply {
    /// RCODE (RFC 1035 4.1.1; 0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN, 5 REFUSED, ...).
    pub rcode: u16,
    /// ANCOUNT: the records of the answer section (CNAMEs on the way included).
    pub answers: u16,
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
///
/// The fields after `remote_ip` came with version 4 and are not part of version 2's postcard
/// struct (`serde(skip)`, like [`Batch::clock`]): versions 1 to 3 decode to their defaults
/// (kind `http`, nothing else), and their encoders refuse a result that has other values
/// ([`crate::Error::Unrepresentable`]) rather than drop them. [`ProbeResult::fits_v3`] says
/// which results they can carry.
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
    /// What the probe checked (version 4; before: always `http`).
    #[serde(skip)]
    pub kind: ProbeKind,
    /// The TLS protocol version negotiated (kind `tls`; version 4).
    #[serde(skip)]
    pub tls_version: Option<TlsVersion>,
    /// What the resolver answered (kind `dns`, when an answer arrived; version 4).
    #[serde(skip)]
    pub dns: Option<DnsReply>,
}

impl ProbeResult {
    /// A result without a response: status 0, no phase, no regex, no timings, no body, no
    /// certificate, no address (what an agent reports for `missed` and `memory_refused`, and
    /// the base of tests that set the fields they are about).
    pub const fn without_response(
        seq: u64,
        target_id: u32,
        started_at_ms: u64,
        outcome: Outcome,
    ) -> ProbeResult {
        ProbeResult {
            seq,
            target_id,
            started_at_ms,
            status: 0,
            outcome,
            failed_phase: None,
            regex: RegexOutcome::NotConfigured,
            total_us: 0,
            dns_us: None,
            connect_us: None,
            tls_us: None,
            ttfb_us: None,
            transfer_us: None,
            body_bytes: 0,
            body_truncated: false,
            redirects: 0,
            cert_not_after_s: None,
            remote_ip: None,
            kind: ProbeKind::Http,
            tls_version: None,
            dns: None,
        }
    }

    /// Whether frame versions 1 to 3 can carry this result: an `http` result without the
    /// fields version 4 added.
    pub fn fits_v3(&self) -> bool {
        self.kind == ProbeKind::Http && self.tls_version.is_none() && self.dns.is_none()
    }
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

/// How far the agent's clock can be trusted (issue #18 item 3): the kernel's clock discipline
/// (Linux `adjtimex`, read-only) and the time since the machine booted, read when the batch was
/// sealed. Carried by version 3 frames only (versions 1 and 2 decode to `clock: None`).
///
/// Two parts: what the clock was like when the results were taken (`synced`, the errors,
/// `synced_from_seq`; for results an agent replays from its spool after a restart, as recorded
/// then), and the moment the frame was built (`boot_age_s`, `sealed_at_ms`, always fresh),
/// which the ingester compares with its own clock to see how far off the agent's is.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ClockHealth {
    /// The kernel considers its clock synchronised (no `STA_UNSYNC`, not `TIME_ERROR`).
    pub synced: bool,
    /// The kernel's maximum error, milliseconds, rounded up and saturating (16 s when unsynced).
    pub max_error_ms: u32,
    /// The kernel's estimated error, milliseconds, rounded up and saturating.
    pub est_error_ms: u32,
    /// The first sequence number of this boot numbered after the clock was first seen
    /// synchronised; None: not synchronised yet in this boot. Results before it were taken
    /// with a clock that had not been set (a Pi without RTC in its first minute).
    pub synced_from_seq: Option<u64>,
    /// Seconds since the machine booted (`CLOCK_BOOTTIME`) when the frame was sealed.
    pub boot_age_s: u32,
    /// The agent's wall clock when the frame was sealed, unix milliseconds.
    pub sealed_at_ms: u64,
}

impl ClockHealth {
    /// Whether result `seq` of this batch was taken with a clock that was not synchronised:
    /// before the first sync of its boot, or the clock is not synchronised now.
    pub fn unsynced_at(&self, seq: u64) -> bool {
        !self.synced || self.synced_from_seq.is_none_or(|first| seq < first)
    }
}

/// The unit of upload: results (and gap records) of one agent boot, in sequence order.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Batch {
    /// Random at each agent start, so sequence numbers of two boots never collide.
    pub boot_id: u64,
    pub results: heapless::Vec<ProbeResult, MAX_RESULTS>,
    pub gaps: heapless::Vec<Gap, MAX_GAPS>,
    /// The agent's clock when the batch was sealed; None when unknown (not Linux, frames of
    /// versions 1 and 2). Not part of version 2's postcard struct (`serde(skip)`): only
    /// version 3 carries it.
    #[serde(skip)]
    pub clock: Option<ClockHealth>,
}
