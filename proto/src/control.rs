//! Control-plane messages: target sets pushed to agents, and the status agents report back.
//!
//! Both travel over MQTT next to the result frames and follow the same rules: a version byte
//! first, postcard after it, field and variant order frozen (append only), sizes bounded by
//! heapless capacities, decoding total.
//!
//! # Target set frame
//! `[TARGET_SET_VERSION] postcard(TargetSetHeader) spec × header.count`, where a spec is, in
//! version 2, `postcard(TargetSpec) postcard(ProbeKind) postcard(options)` (the fields of
//! [`TargetSpec`] in order: the ones of version 1, then `kind` and `options`) and, in version 1,
//! `postcard(TargetSpec)` without the last two (every target `http`, no options). Both versions
//! are read; [`encode_target_set`] writes version 1 whenever a set needs nothing of version 2,
//! so agents that predate it keep following sets of HTTP targets. Later kinds and their
//! settings append variants to [`crate::ProbeKind`] and [`TargetOption`] within version 2: an
//! agent older than a variant refuses the set (malformed) and keeps its previous one.
//! The specs follow the header one after another instead of sitting in one list so that neither
//! side ever holds a whole set in a fixed-size array: a [`TargetSetReader`] hands them out one at
//! a time, and the encoder writes them from any iterator. A set is published *retained* on
//! `<prefix>/v1/targets/<region>` (the region's targets) and, when targets are pinned to agents,
//! on `<prefix>/v1/targets/<region>/<agent>`; an empty payload clears it.
//!
//! # Status frame
//! `[STATUS_VERSION] postcard(AgentStatus)`, published by an agent on
//! `<prefix>/v1/status/<region>/<agent>`: when it connects, at every heartbeat, when it stops,
//! and (as its MQTT last will, sent by the broker) when it vanishes.

use heapless::{String, Vec};
use serde::{Deserialize, Serialize};

use crate::{Error, ProbeKind};

/// Version byte of target set frames with kinds and options (issue #20).
pub const TARGET_SET_VERSION: u8 = 2;
/// Version byte of the first target set frames (every target `http`, no options).
pub const TARGET_SET_V1: u8 = 1;
/// Version byte of status frames.
pub const STATUS_VERSION: u8 = 1;

/// Most targets in one set.
pub const MAX_TARGETS: usize = 1024;
/// Largest target set frame. Below the broker's `max_packet_size` (256 KiB in the repository's
/// Mosquitto config) with room for the MQTT header and topic; `targets apply` refuses a set that
/// would not fit, naming the region.
pub const MAX_TARGET_SET_LEN: usize = 240 * 1024;

/// Capacity of a target name.
pub const MAX_NAME_LEN: usize = 64;
/// Capacity of a target URL.
pub const MAX_URL_LEN: usize = 512;
/// Capacity of a body regex.
pub const MAX_REGEX_LEN: usize = 256;
/// Capacity of an HTTP method.
pub const MAX_METHOD_LEN: usize = 16;
/// Most extra request headers per target.
pub const MAX_HEADERS: usize = 8;
/// Capacity of a header name.
pub const MAX_HEADER_NAME_LEN: usize = 64;
/// Capacity of a header value.
pub const MAX_HEADER_VALUE_LEN: usize = 256;
/// Most accepted status ranges per target.
pub const MAX_STATUS_RANGES: usize = 8;
/// Capacity of a CA file path (a path on the agent).
pub const MAX_PATH_LEN: usize = 256;
/// Capacity of a `tcp` target's `send` and `expect` text.
pub const MAX_PROBE_TEXT_LEN: usize = 256;
/// Capacity of a `dns` target's resolver address (`ip:port`, `[v6]:port`).
pub const MAX_RESOLVER_LEN: usize = 64;
/// Most [`TargetOption`]s per target.
pub const MAX_OPTIONS: usize = 8;
/// Capacity of a version string in a status.
pub const MAX_VERSION_LEN: usize = 32;
/// Capacity of a rejection reason in a status.
pub const MAX_REASON_LEN: usize = 256;

/// First part of a target set frame.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TargetSetHeader {
    /// Increases with every `targets apply` that changed something; all sets published by one
    /// apply carry the same generation.
    pub generation: u64,
    /// Number of [`TargetSpec`]s that follow.
    pub count: u16,
}

/// Which address family a target is probed over.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum IpFamilySpec {
    Auto,
    Ipv4,
    Ipv6,
}

/// An extra request header.
///
/// A `name` that starts with [`HEADER_FROM_ENV`] or [`HEADER_FROM_FILE`] is a *reference*
/// (issue #14): the header is the rest of the name, and `value` is not its value but the
/// environment variable or the file on the agent that holds it, read by the agent. Header names
/// cannot contain `:` (RFC 9110 tokens), so a reference never collides with a literal header;
/// an agent that predates references refuses such a set (its name is not a header name). This
/// keeps secrets (tokens) out of the target set, the retained message and `targets.spec`.
///
/// `Debug` (and `defmt::Format`) print a literal value as `<redacted>`: values are often
/// credentials. A reference's value (a variable name or a path) is shown.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct HeaderSpec {
    pub name: String<MAX_HEADER_NAME_LEN>,
    pub value: String<MAX_HEADER_VALUE_LEN>,
}

/// Name prefix of a header whose value the agent reads from the environment variable `value`.
pub const HEADER_FROM_ENV: &str = "env:";
/// Name prefix of a header whose value the agent reads from the file `value` (first line).
pub const HEADER_FROM_FILE: &str = "file:";

impl HeaderSpec {
    /// Whether `value` names where the agent finds the value, rather than being it.
    pub fn is_reference(&self) -> bool {
        self.name.starts_with(HEADER_FROM_ENV) || self.name.starts_with(HEADER_FROM_FILE)
    }

    fn shown_value(&self) -> &str {
        if self.is_reference() {
            self.value.as_str()
        } else {
            "<redacted>"
        }
    }
}

impl core::fmt::Debug for HeaderSpec {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HeaderSpec")
            .field("name", &self.name.as_str())
            .field("value", &self.shown_value())
            .finish()
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for HeaderSpec {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(
            f,
            "HeaderSpec {{ name: {=str}, value: {=str} }}",
            self.name.as_str(),
            self.shown_value()
        )
    }
}

/// A setting that only some kinds have (target sets version 2), in a list rather than one field
/// each so that later kinds append variants instead of a new frame version. Append only.
///
/// `Debug` (and `defmt::Format`) print a `Send` text as `<redacted>`: it may be a credential
/// (`AUTH ...`), like a header value.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub enum TargetOption {
    /// `tcp`: written after connecting.
    Send(String<MAX_PROBE_TEXT_LEN>),
    /// `tcp`: what the first bytes read must be.
    Expect(String<MAX_PROBE_TEXT_LEN>),
    /// `http`: follow redirects from `https` to `http`.
    AllowDowngrade,
    // ---- appended for the `dns` kind (issue #20) ----
    /// `dns`: the record type asked for (its RFC 1035 TYPE number: 1 A, 28 AAAA, 16 TXT...);
    /// absent: A.
    QueryType(u16),
    /// `dns`: the resolver asked (`ip:port`); absent: the agent's own (`/etc/resolv.conf`).
    Resolver(String<MAX_RESOLVER_LEN>),
}

impl core::fmt::Debug for TargetOption {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TargetOption::Send(_) => f.write_str("Send(<redacted>)"),
            TargetOption::Expect(t) => f.debug_tuple("Expect").field(&t.as_str()).finish(),
            TargetOption::AllowDowngrade => f.write_str("AllowDowngrade"),
            TargetOption::QueryType(t) => f.debug_tuple("QueryType").field(t).finish(),
            TargetOption::Resolver(r) => f.debug_tuple("Resolver").field(&r.as_str()).finish(),
        }
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for TargetOption {
    fn format(&self, f: defmt::Formatter<'_>) {
        match self {
            TargetOption::Send(_) => defmt::write!(f, "Send(<redacted>)"),
            TargetOption::Expect(t) => defmt::write!(f, "Expect({=str})", t.as_str()),
            TargetOption::AllowDowngrade => defmt::write!(f, "AllowDowngrade"),
            TargetOption::QueryType(t) => defmt::write!(f, "QueryType({=u16})", t),
            TargetOption::Resolver(r) => defmt::write!(f, "Resolver({=str})", r.as_str()),
        }
    }
}

/// One target with every probe setting, as the agent's `[[targets]]` table has them (see
/// `vantage_common::target` for meanings and defaults; the agent validates a spec exactly
/// like a target from its own file).
///
/// `kind` and `options` are not part of the postcard struct (`serde(skip)`): version 2 frames
/// write them after it, version 1 frames do not have them (see the module docs).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TargetSpec {
    pub id: u32,
    pub name: String<MAX_NAME_LEN>,
    /// `http`: the URL; `tcp` and `tls`: `host:port`; `dns`: the name asked for.
    pub url: String<MAX_URL_LEN>,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub regex: Option<String<MAX_REGEX_LEN>>,
    pub method: String<MAX_METHOD_LEN>,
    pub headers: Vec<HeaderSpec, MAX_HEADERS>,
    /// Inclusive ranges; empty means the default (200–299).
    pub accepted_status: Vec<(u16, u16), MAX_STATUS_RANGES>,
    pub max_redirects: u8,
    pub body_cap: u32,
    pub ca_file: Option<String<MAX_PATH_LEN>>,
    pub tls_skip_verify: bool,
    pub ip_family: IpFamilySpec,
    /// What the probe checks (version 2; version 1: `http`).
    #[serde(skip)]
    pub kind: ProbeKind,
    /// Settings of some kinds only (version 2; version 1: none).
    #[serde(skip)]
    pub options: Vec<TargetOption, MAX_OPTIONS>,
}

impl TargetSpec {
    /// Whether a version 1 frame carries this spec: an `http` target without options.
    pub fn fits_v1(&self) -> bool {
        self.kind == ProbeKind::Http && self.options.is_empty()
    }
}

/// Appends postcard of `value` to `buf[*used..]`.
fn put<T: Serialize>(value: &T, buf: &mut [u8], used: &mut usize) -> Result<(), Error> {
    let rest = buf.get_mut(*used..).ok_or(Error::BufferTooSmall)?;
    *used += postcard::to_slice(value, rest)
        .map_err(|_| Error::BufferTooSmall)?
        .len();
    Ok(())
}

/// Writes a target set frame into `buf` and returns the used prefix. `specs` must yield exactly
/// `header.count` items. The frame is version 1 when every spec fits it
/// ([`TargetSpec::fits_v1`]), else version 2.
pub fn encode_target_set<'b, 's, I>(
    header: &TargetSetHeader,
    specs: I,
    buf: &'b mut [u8],
) -> Result<&'b mut [u8], Error>
where
    I: IntoIterator<Item = &'s TargetSpec>,
    I::IntoIter: Clone,
{
    let specs = specs.into_iter();
    let version = if specs.clone().all(TargetSpec::fits_v1) {
        TARGET_SET_V1
    } else {
        TARGET_SET_VERSION
    };
    *buf.first_mut().ok_or(Error::BufferTooSmall)? = version;
    let mut used = 1;
    put(header, buf, &mut used)?;
    let mut count = 0usize;
    for spec in specs {
        put(spec, buf, &mut used)?;
        if version == TARGET_SET_VERSION {
            put(&spec.kind, buf, &mut used)?;
            put(&spec.options, buf, &mut used)?;
        }
        count += 1;
    }
    if count != usize::from(header.count) {
        return Err(Error::Malformed);
    }
    Ok(&mut buf[..used])
}

/// Reads a target set frame one spec at a time. [`TargetSetReader::new`] checks the version and
/// the header; iterating yields each spec or the first error, and checks that nothing follows
/// the last one. Total: any bytes give specs or an error, never a panic.
pub struct TargetSetReader<'a> {
    version: u8,
    header: TargetSetHeader,
    rest: &'a [u8],
    left: u16,
    failed: bool,
}

impl<'a> TargetSetReader<'a> {
    pub fn new(frame: &'a [u8]) -> Result<TargetSetReader<'a>, Error> {
        let (&version, body) = frame.split_first().ok_or(Error::Empty)?;
        if version != TARGET_SET_VERSION && version != TARGET_SET_V1 {
            return Err(Error::UnknownVersion(version));
        }
        if frame.len() > MAX_TARGET_SET_LEN {
            return Err(Error::Malformed);
        }
        let (header, rest) =
            postcard::take_from_bytes::<TargetSetHeader>(body).map_err(|_| Error::Malformed)?;
        if usize::from(header.count) > MAX_TARGETS {
            return Err(Error::Malformed);
        }
        Ok(TargetSetReader {
            version,
            left: header.count,
            header,
            rest,
            failed: false,
        })
    }

    pub fn header(&self) -> &TargetSetHeader {
        &self.header
    }

    /// The frame's version byte ([`TARGET_SET_V1`] or [`TARGET_SET_VERSION`]).
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Takes one `T` off the front of the rest.
    fn take<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, Error> {
        let (value, rest) =
            postcard::take_from_bytes::<T>(self.rest).map_err(|_| Error::Malformed)?;
        self.rest = rest;
        Ok(value)
    }

    fn take_spec(&mut self) -> Result<TargetSpec, Error> {
        let mut spec: TargetSpec = self.take()?;
        if self.version == TARGET_SET_VERSION {
            spec.kind = self.take()?;
            spec.options = self.take()?;
        }
        Ok(spec)
    }
}

impl Iterator for TargetSetReader<'_> {
    type Item = Result<TargetSpec, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if self.left == 0 {
            if self.rest.is_empty() {
                return None;
            }
            self.failed = true;
            return Some(Err(Error::TrailingBytes));
        }
        match self.take_spec() {
            Ok(spec) => {
                self.left -= 1;
                Some(Ok(spec))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// What an agent says about itself.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum AgentState {
    /// Just connected (or reconnected) to the broker.
    Online,
    /// Still running; sent every heartbeat interval.
    Heartbeat,
    /// Stopping cleanly.
    Offline,
    /// The agent's MQTT last will: the broker lost the connection without a goodbye.
    Lost,
}

/// Which target set a rejection is about.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SetScope {
    Region,
    Agent,
}

/// A pushed target set the agent refused (it keeps probing with the previous one).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Rejection {
    pub scope: SetScope,
    pub generation: u64,
    pub reason: String<MAX_REASON_LEN>,
}

/// An agent's announcement, heartbeat or goodbye.
///
/// `agent_id` and `region` are *claims*: the bridge compares them with the topic the message
/// arrived on (which the broker's ACL ties to the agent's credentials) and dead-letters a status
/// whose claims disagree.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct AgentStatus {
    pub state: AgentState,
    pub agent_id: String<64>,
    pub region: String<64>,
    pub boot_id: u64,
    /// The agent's version, e.g. `0.1.0`.
    pub version: String<MAX_VERSION_LEN>,
    /// Agent wall clock in ms since the Unix epoch; 0 in the last will (its time is unknown when
    /// the will is registered, so the receiver uses its own clock).
    pub sent_at_ms: u64,
    /// Probes the agent runs at once at most.
    pub max_concurrency: u32,
    /// Results the agent can buffer while the broker is unreachable.
    pub buffer_capacity: u32,
    /// Targets it is probing now.
    pub targets: u32,
    /// Results waiting for delivery.
    pub pending_results: u32,
    /// Generation of the region target set in use (0: none).
    pub region_set_generation: u64,
    /// Generation of the agent's own target set in use (0: none).
    pub agent_set_generation: u64,
    /// The most recent pushed set it refused, until a later set is accepted.
    pub rejection: Option<Rejection>,
}

/// Largest status frame.
pub const MAX_STATUS_LEN: usize = 1 // version byte
    + 1 // state
    + 2 * (1 + 64) // agent_id, region (length prefix + bytes)
    + 10 // boot_id
    + 1 + MAX_VERSION_LEN
    + 10 // sent_at_ms
    + 4 * 5 // four u32 counters
    + 2 * 10 // two generations
    + 1 + 1 + 10 + 2 + MAX_REASON_LEN; // rejection

/// Writes a status frame into `buf`.
pub fn encode_status<'b>(status: &AgentStatus, buf: &'b mut [u8]) -> Result<&'b mut [u8], Error> {
    crate::encode_versioned(STATUS_VERSION, status, buf)
}

/// Reads a status frame. Total.
pub fn decode_status(frame: &[u8]) -> Result<AgentStatus, Error> {
    let (&version, body) = frame.split_first().ok_or(Error::Empty)?;
    match version {
        STATUS_VERSION => crate::decode_body::<AgentStatus>(body),
        v => Err(Error::UnknownVersion(v)),
    }
}
