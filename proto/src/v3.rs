//! Format version 3: the same [`Batch`] as version 2, packed for metered links (issue #18
//! item 6: a Pi on LTE pays per byte). Nothing is rounded or dropped: every field of every
//! result decodes to exactly what was encoded (the round-trip tests and the fuzz target check
//! it). What makes it smaller than version 2's plain postcard struct:
//!
//! - two flag bytes per result say which optional fields follow, instead of one `Option` tag
//!   per field, and fold the common values into bits (status 200, no redirects, sequence number
//!   one past the previous result's, regex state, truncation);
//! - the start time is a signed delta from the previous result's (milliseconds apart, not a
//!   41-bit absolute time);
//! - the total time is stored as what the phases do not account for (total − the sum of the
//!   phases present), usually one or two bytes instead of three;
//! - the certificate's expiry is a delta from the last expiry of the same target in the batch
//!   (one byte when it is the same certificate) or else from the probe's start (four bytes, not
//!   five);
//! - the remote address can say "the same as this target's previous result in the batch";
//! - the boot id is 8 raw bytes (a random u64 is 10 bytes as a varint).
//!
//! Integers are postcard's varints (zigzag for the signed deltas), written with postcard itself
//! one value at a time; enums are postcard's variant indexes, as in version 2.
//!
//! Layout: `3`, boot id (8 bytes, little-endian), result count (1 byte, ≤ [`MAX_RESULTS`]),
//! the results, gap count (1 byte, ≤ [`MAX_GAPS`]), the gaps (version 2's `Gap`), then the
//! clock (issue #18 item 3; [`ClockHealth`], typically 8–12 bytes; nothing when unknown, so a
//! version 3 frame from before the clock existed reads as "unknown"):
//!
//! | field | when | encoding |
//! |---|---|---|
//! | clock flags | clock known | bit 0 set (present), bit 1 synced, bit 2 synced-from seq present, bits 3–7 reserved (0) |
//! | max error | clock known | varint ms |
//! | estimated error | clock known | varint ms |
//! | synced from seq | bit 2 | varint (absolute) |
//! | boot age | clock known | varint s |
//! | sealed at | clock known | zigzag varint, ms since the last result's start (no results: since 0), wrapping |
//!
//! The clock comes last so that the seal time can be a delta from the results' times: a
//! batch is sealed seconds after its last probe started, so two or three bytes, not six.
//!
//! One result:
//!
//! | field | when | encoding |
//! |---|---|---|
//! | head | always | bit 0 seq = previous + 1, bits 1–2 regex, bit 3 body truncated, bit 4 status 200, bit 5 redirects ≠ 0, bit 6 failed phase present, bit 7 reserved (0; version 4: extension byte follows, see [`crate::v4`]) |
//! | presence | always | bits 0–4 dns, connect, tls, ttfb, transfer present; bits 5–6 address: 0 none, 1 IPv4, 2 IPv6, 3 as this target's previous result in the batch; bit 7 certificate expiry present |
//! | outcome | always | variant index |
//! | failed phase | head bit 6 | variant index |
//! | seq | head bit 0 clear | varint (absolute) |
//! | target id | always | varint |
//! | start | always | zigzag varint, ms since the previous result's start (the first: since 0), wrapping |
//! | status | head bit 4 clear | varint |
//! | phases | presence bits 0–4 | varint µs each, in that order |
//! | total | always | zigzag varint, total µs − sum of the phases present |
//! | body bytes | always | varint |
//! | redirects | head bit 5 | one byte |
//! | certificate | presence bit 7 | zigzag varint, seconds from this target's previous expiry in the batch, else from the start in seconds, wrapping |
//! | address | presence 1 or 2 | 4 or 16 raw bytes |

use serde::{de::DeserializeOwned, Serialize};

use crate::{Batch, ClockHealth, Error, Gap, IpAddress, Outcome, Phase, ProbeResult, RegexOutcome};
use crate::{DnsReply, ProbeKind, TlsVersion, MAX_GAPS, MAX_RESULTS};

/// The version byte of this format.
pub const VERSION: u8 = 3;

const SEQ_NEXT: u8 = 1 << 0;
const REGEX_SHIFT: u8 = 1;
const REGEX_MASK: u8 = 0b11 << REGEX_SHIFT;
const TRUNCATED: u8 = 1 << 3;
const STATUS_200: u8 = 1 << 4;
const REDIRECTS: u8 = 1 << 5;
const FAILED_PHASE: u8 = 1 << 6;
/// Reserved in version 3; in version 4 "an extension byte follows the presence byte".
const HEAD_EXT: u8 = 1 << 7;

// Version 4's extension byte (crate::v4 has the table).
const EXT_KIND_MASK: u8 = 0x0F;
const EXT_TLS_VERSION: u8 = 1 << 4;
/// A second extension byte follows the first.
const EXT_SECOND: u8 = 1 << 7;
const EXT_RESERVED: u8 = !(EXT_KIND_MASK | EXT_TLS_VERSION | EXT_SECOND);
// The second extension byte.
const EXT2_DNS: u8 = 1 << 0;
const EXT2_RESERVED: u8 = !EXT2_DNS;

const ADDRESS_SHIFT: u8 = 5;
const ADDRESS_MASK: u8 = 0b11 << ADDRESS_SHIFT;
const ADDRESS_NONE: u8 = 0;
const ADDRESS_V4: u8 = 1;
const ADDRESS_V6: u8 = 2;
const ADDRESS_AS_BEFORE: u8 = 3;
const CERT: u8 = 1 << 7;

const CLOCK_PRESENT: u8 = 1 << 0;
const CLOCK_SYNCED: u8 = 1 << 1;
const CLOCK_SYNCED_FROM: u8 = 1 << 2;
const CLOCK_RESERVED: u8 = !(CLOCK_PRESENT | CLOCK_SYNCED | CLOCK_SYNCED_FROM);

/// Writes `batch` as a version 3 frame into `buf` and returns the used prefix;
/// [`Error::Unrepresentable`] if a result does not fit version 3 ([`ProbeResult::fits_v3`]).
pub fn encode<'b>(batch: &Batch, buf: &'b mut [u8]) -> Result<&'b mut [u8], Error> {
    encode_packed(VERSION, batch, buf)
}

/// Writes `batch` packed, as a frame of `version` (3 or 4, which differ only in the
/// extension byte of version 4).
pub(crate) fn encode_packed<'b>(
    version: u8,
    batch: &Batch,
    buf: &'b mut [u8],
) -> Result<&'b mut [u8], Error> {
    let mut w = Writer { buf, len: 0 };
    w.byte(version)?;
    w.raw(&batch.boot_id.to_le_bytes())?;
    // heapless capacities keep both counts within one byte.
    w.byte(batch.results.len() as u8)?;
    for (i, r) in batch.results.iter().enumerate() {
        let before = &batch.results[..i];
        put_result(&mut w, r, before, version)?;
    }
    w.byte(batch.gaps.len() as u8)?;
    for gap in &batch.gaps {
        w.put(gap)?;
    }
    put_clock(&mut w, batch.clock.as_ref(), last_start(&batch.results))?;
    let len = w.len;
    Ok(&mut w.buf[..len])
}

/// Reads the body of a version 3 or 4 frame (the bytes after the version byte `version`).
pub(crate) fn decode_body(version: u8, body: &[u8]) -> Result<Batch, Error> {
    let mut r = Reader { bytes: body };
    let boot_id = u64::from_le_bytes(r.array()?);
    let mut batch = Batch {
        boot_id,
        results: heapless::Vec::new(),
        gaps: heapless::Vec::new(),
        clock: None,
    };
    let count = usize::from(r.byte()?);
    if count > MAX_RESULTS {
        return Err(Error::Malformed);
    }
    for _ in 0..count {
        let result = take_result(&mut r, &batch.results, version)?;
        batch.results.push(result).map_err(|_| Error::Malformed)?;
    }
    let gaps = usize::from(r.byte()?);
    if gaps > MAX_GAPS {
        return Err(Error::Malformed);
    }
    for _ in 0..gaps {
        let gap: Gap = r.take()?;
        batch.gaps.push(gap).map_err(|_| Error::Malformed)?;
    }
    batch.clock = take_clock(&mut r, last_start(&batch.results))?;
    if !r.bytes.is_empty() {
        return Err(Error::TrailingBytes);
    }
    Ok(batch)
}

/// What the seal time is a delta from: the last result's start (0 without results).
fn last_start(results: &[ProbeResult]) -> u64 {
    results.last().map_or(0, |r| r.started_at_ms)
}

fn put_clock(w: &mut Writer<'_>, clock: Option<&ClockHealth>, base_ms: u64) -> Result<(), Error> {
    let Some(c) = clock else {
        return Ok(());
    };
    let mut flags = CLOCK_PRESENT;
    flags |= if c.synced { CLOCK_SYNCED } else { 0 };
    flags |= if c.synced_from_seq.is_some() {
        CLOCK_SYNCED_FROM
    } else {
        0
    };
    w.byte(flags)?;
    w.put(&c.max_error_ms)?;
    w.put(&c.est_error_ms)?;
    if let Some(seq) = c.synced_from_seq {
        w.put(&seq)?;
    }
    w.put(&c.boot_age_s)?;
    w.put(&(c.sealed_at_ms.wrapping_sub(base_ms) as i64))
}

fn take_clock(r: &mut Reader<'_>, base_ms: u64) -> Result<Option<ClockHealth>, Error> {
    if r.bytes.is_empty() {
        // Unknown (or a frame from before the clock): nothing after the gaps.
        return Ok(None);
    }
    let flags = r.byte()?;
    // Bit 0 is always set (so the bytes of "unknown" are unique: none); reserved bits are 0.
    if flags & CLOCK_RESERVED != 0 || flags & CLOCK_PRESENT == 0 {
        return Err(Error::Malformed);
    }
    let max_error_ms: u32 = r.take()?;
    let est_error_ms: u32 = r.take()?;
    let synced_from_seq: Option<u64> = if flags & CLOCK_SYNCED_FROM != 0 {
        Some(r.take()?)
    } else {
        None
    };
    let boot_age_s: u32 = r.take()?;
    let delta: i64 = r.take()?;
    Ok(Some(ClockHealth {
        synced: flags & CLOCK_SYNCED != 0,
        max_error_ms,
        est_error_ms,
        synced_from_seq,
        boot_age_s,
        sealed_at_ms: base_ms.wrapping_add(delta as u64),
    }))
}

fn phases(r: &ProbeResult) -> [Option<u32>; 5] {
    [r.dns_us, r.connect_us, r.tls_us, r.ttfb_us, r.transfer_us]
}

/// The newest result of `target` among `before`.
fn previous_of(before: &[ProbeResult], target: u32) -> Option<&ProbeResult> {
    before.iter().rev().find(|p| p.target_id == target)
}

/// What a certificate expiry is a delta from: this target's previous expiry in the batch, else
/// the probe's start in seconds.
fn cert_base(before: &[ProbeResult], r: &ProbeResult) -> u64 {
    previous_of(before, r.target_id)
        .and_then(|p| p.cert_not_after_s)
        .unwrap_or(r.started_at_ms / 1000)
}

fn put_result(
    w: &mut Writer<'_>,
    r: &ProbeResult,
    before: &[ProbeResult],
    version: u8,
) -> Result<(), Error> {
    // Version 3 has no place for a kind: refused, never dropped.
    let ext = (!r.fits_v3()).then(|| ext_byte(r));
    let ext2 = second_ext_byte(r);
    if ext.is_some() && version == VERSION {
        return Err(Error::Unrepresentable);
    }
    let previous = before.last();
    let seq_next = previous.is_some_and(|p| p.seq.wrapping_add(1) == r.seq);
    let mut head = (regex_bits(r.regex) << REGEX_SHIFT) & REGEX_MASK;
    head |= if seq_next { SEQ_NEXT } else { 0 };
    head |= if r.body_truncated { TRUNCATED } else { 0 };
    head |= if r.status == 200 { STATUS_200 } else { 0 };
    head |= if r.redirects != 0 { REDIRECTS } else { 0 };
    head |= if r.failed_phase.is_some() {
        FAILED_PHASE
    } else {
        0
    };
    head |= if ext.is_some() { HEAD_EXT } else { 0 };

    let mut presence = 0u8;
    for (bit, phase) in phases(r).iter().enumerate() {
        if phase.is_some() {
            presence |= 1 << bit;
        }
    }
    let as_before = previous_of(before, r.target_id).and_then(|p| p.remote_ip) == r.remote_ip;
    let address = match r.remote_ip {
        None => ADDRESS_NONE,
        Some(_) if as_before => ADDRESS_AS_BEFORE,
        Some(IpAddress::V4(_)) => ADDRESS_V4,
        Some(IpAddress::V6(_)) => ADDRESS_V6,
    };
    presence |= address << ADDRESS_SHIFT;
    presence |= if r.cert_not_after_s.is_some() {
        CERT
    } else {
        0
    };

    w.byte(head)?;
    w.byte(presence)?;
    if let Some(ext) = ext {
        w.byte(ext)?;
        if ext2 != 0 {
            w.byte(ext2)?;
        }
    }
    w.put(&r.outcome)?;
    if let Some(phase) = r.failed_phase {
        w.put(&phase)?;
    }
    if !seq_next {
        w.put(&r.seq)?;
    }
    w.put(&r.target_id)?;
    let previous_ms = previous.map_or(0, |p| p.started_at_ms);
    w.put(&(r.started_at_ms.wrapping_sub(previous_ms) as i64))?;
    if r.status != 200 {
        w.put(&r.status)?;
    }
    let mut sum = 0i64;
    for us in phases(r).into_iter().flatten() {
        w.put(&us)?;
        sum += i64::from(us);
    }
    w.put(&(i64::from(r.total_us) - sum))?;
    w.put(&r.body_bytes)?;
    if r.redirects != 0 {
        w.byte(r.redirects)?;
    }
    if let Some(cert) = r.cert_not_after_s {
        w.put(&(cert.wrapping_sub(cert_base(before, r)) as i64))?;
    }
    match r.remote_ip {
        Some(IpAddress::V4(o)) if !as_before => w.raw(&o)?,
        Some(IpAddress::V6(o)) if !as_before => w.raw(&o)?,
        _ => {}
    }
    if let Some(v) = r.tls_version {
        w.put(&v)?;
    }
    if let Some(d) = r.dns {
        w.put(&d.rcode)?;
        w.put(&d.answers)?;
    }
    Ok(())
}

/// Version 4's extension byte of `r`: its kind and which of its fields follow.
fn ext_byte(r: &ProbeResult) -> u8 {
    let mut ext = r.kind.index() & EXT_KIND_MASK;
    ext |= if r.tls_version.is_some() {
        EXT_TLS_VERSION
    } else {
        0
    };
    ext |= if second_ext_byte(r) != 0 {
        EXT_SECOND
    } else {
        0
    };
    ext
}

/// Version 4's second extension byte of `r` (0: none).
fn second_ext_byte(r: &ProbeResult) -> u8 {
    if r.dns.is_some() {
        EXT2_DNS
    } else {
        0
    }
}

fn take_result(
    r: &mut Reader<'_>,
    before: &[ProbeResult],
    version: u8,
) -> Result<ProbeResult, Error> {
    let head = r.byte()?;
    let presence = r.byte()?;
    let ext = if head & HEAD_EXT == 0 {
        None
    } else if version == VERSION {
        // Reserved in version 3.
        return Err(Error::Malformed);
    } else {
        Some(r.byte()?)
    };
    let ext2 = match ext {
        Some(e) if e & EXT_SECOND != 0 => match r.byte()? {
            // Reserved bits as in the first byte; a byte of 0 would not be there.
            e2 if e2 & EXT2_RESERVED != 0 || e2 == 0 => return Err(Error::Malformed),
            e2 => e2,
        },
        _ => 0,
    };
    let kind = match ext {
        None => ProbeKind::Http,
        // Reserved bits are later fields: a decoder older than them refuses the frame. A byte
        // that says nothing (http, no field) is not canonical: the bit would be clear.
        Some(e) if e & EXT_RESERVED != 0 || e == 0 => return Err(Error::Malformed),
        Some(e) => ProbeKind::from_index(e & EXT_KIND_MASK).ok_or(Error::Malformed)?,
    };
    let regex = match (head & REGEX_MASK) >> REGEX_SHIFT {
        0 => RegexOutcome::NotConfigured,
        1 => RegexOutcome::Matched,
        2 => RegexOutcome::NotMatched,
        _ => return Err(Error::Malformed),
    };
    let outcome: Outcome = r.take()?;
    let failed_phase: Option<Phase> = if head & FAILED_PHASE != 0 {
        Some(r.take()?)
    } else {
        None
    };
    let previous = before.last();
    let seq = if head & SEQ_NEXT != 0 {
        // "One past the previous result" needs a previous result.
        previous.ok_or(Error::Malformed)?.seq.wrapping_add(1)
    } else {
        r.take()?
    };
    let target_id: u32 = r.take()?;
    let delta: i64 = r.take()?;
    let started_at_ms = previous
        .map_or(0, |p| p.started_at_ms)
        .wrapping_add(delta as u64);
    let status: u16 = if head & STATUS_200 != 0 {
        200
    } else {
        r.take()?
    };
    let mut times = [None; 5];
    let mut sum = 0i64;
    for (bit, time) in times.iter_mut().enumerate() {
        if presence & (1 << bit) != 0 {
            let us: u32 = r.take()?;
            sum += i64::from(us);
            *time = Some(us);
        }
    }
    let residual: i64 = r.take()?;
    let total_us = sum
        .checked_add(residual)
        .and_then(|t| u32::try_from(t).ok())
        .ok_or(Error::Malformed)?;
    let body_bytes: u32 = r.take()?;
    let redirects = if head & REDIRECTS != 0 {
        match r.byte()? {
            0 => return Err(Error::Malformed), // the bit says "not zero"
            n => n,
        }
    } else {
        0
    };
    let mut result = ProbeResult {
        seq,
        target_id,
        started_at_ms,
        status,
        outcome,
        failed_phase,
        regex,
        total_us,
        dns_us: times[0],
        connect_us: times[1],
        tls_us: times[2],
        ttfb_us: times[3],
        transfer_us: times[4],
        body_bytes,
        body_truncated: head & TRUNCATED != 0,
        redirects,
        cert_not_after_s: None,
        remote_ip: None,
        kind,
        tls_version: None,
        dns: None,
    };
    if presence & CERT != 0 {
        let delta: i64 = r.take()?;
        result.cert_not_after_s = Some(cert_base(before, &result).wrapping_add(delta as u64));
    }
    result.remote_ip = match (presence & ADDRESS_MASK) >> ADDRESS_SHIFT {
        ADDRESS_NONE => None,
        ADDRESS_V4 => Some(IpAddress::V4(r.array()?)),
        ADDRESS_V6 => Some(IpAddress::V6(r.array()?)),
        _ => Some(
            previous_of(before, target_id)
                .and_then(|p| p.remote_ip)
                .ok_or(Error::Malformed)?,
        ),
    };
    if ext.is_some_and(|e| e & EXT_TLS_VERSION != 0) {
        result.tls_version = Some(r.take::<TlsVersion>()?);
    }
    if ext2 & EXT2_DNS != 0 {
        result.dns = Some(DnsReply {
            rcode: r.take()?,
            answers: r.take()?,
        });
    }
    Ok(result)
}

fn regex_bits(regex: RegexOutcome) -> u8 {
    match regex {
        RegexOutcome::NotConfigured => 0,
        RegexOutcome::Matched => 1,
        RegexOutcome::NotMatched => 2,
    }
}

/// Appends values to a byte buffer, each in postcard's encoding.
struct Writer<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn put<T: Serialize>(&mut self, value: &T) -> Result<(), Error> {
        let used = postcard::to_slice(value, &mut self.buf[self.len..])
            .map_err(|_| Error::BufferTooSmall)?
            .len();
        self.len += used;
        Ok(())
    }

    fn raw(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let end = self.len + bytes.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(Error::BufferTooSmall)?
            .copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    fn byte(&mut self, b: u8) -> Result<(), Error> {
        self.raw(&[b])
    }
}

/// Takes values off the front of a byte string; running out is [`Error::Malformed`].
struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take<T: DeserializeOwned>(&mut self) -> Result<T, Error> {
        let (value, rest) = postcard::take_from_bytes(self.bytes).map_err(|_| Error::Malformed)?;
        self.bytes = rest;
        Ok(value)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        if self.bytes.len() < N {
            return Err(Error::Malformed);
        }
        let (head, rest) = self.bytes.split_at(N);
        self.bytes = rest;
        let mut out = [0u8; N];
        out.copy_from_slice(head);
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, Error> {
        Ok(self.array::<1>()?[0])
    }
}
