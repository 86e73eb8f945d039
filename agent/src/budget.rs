//! The agent-wide body-memory budget (`probes.memory_budget`, issue #13 item 3): how many bytes
//! one probe may hold, reserved before it starts, so `body_cap` × probes in flight can never
//! exceed what the Pi has. The scheduler does the accounting (`scheduler.rs`, admission); this
//! module says what a probe of a target needs and reads the setting.
//!
//! # What a probe holds (probe/mod.rs)
//! - Every probe: its socket, hyper's read buffer (capped at [`READ_BUFFER`]; hyper's own
//!   default grows to ~400 KB while a body streams in faster than it is read), TLS records
//!   (up to 16 KiB each way), the request, its task: [`PROBE_FLOOR`]. `bench/memory` measures
//!   the whole agent.
//! - Without a regex the body is read and dropped chunk by chunk: nothing more.
//! - With a regex the body is kept for the check, and while it runs up to
//!   [`REGEX_BODY_COPIES`] × `body_cap` bytes are alive at once: the bytes read (≤ `body_cap`),
//!   the gzip-decoded text (≤ `body_cap` decoded bytes), and the UTF-8 copy that
//!   `String::from_utf8_lossy` makes of a body that is not valid UTF-8, where each invalid byte
//!   becomes a 3-byte U+FFFD (≤ 3 × `body_cap`). A valid text or a plain body needs less; the
//!   reservation is the worst case, so the budget is a bound, not an average. (regex-lite's own
//!   memory depends on the pattern, not on the body.)

use serde::Deserialize;

use crate::target::Target;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Default `probes.memory_budget`: 128 MiB. A 1 GiB Raspberry Pi has about 850 MiB free after
/// the OS; 128 MiB leaves most of it to the system and the page cache even when every probe is
/// at its worst, and holds 24 regex probes of the default 1 MiB `body_cap` at their worst case
/// at once (or about 1,000 probes without a regex), far more than a Pi's link can feed.
pub const DEFAULT_MEMORY_BUDGET: u64 = 128 * MIB;
/// Smallest budget accepted: one probe's floor many times over.
pub const MIN_MEMORY_BUDGET: u64 = MIB;
/// Largest budget accepted (a typing error of a unit should not switch the bound off).
pub const MAX_MEMORY_BUDGET: u64 = 64 * GIB;
/// Reserved by every probe for what is not the body.
pub const PROBE_FLOOR: u64 = 128 * KIB;
/// hyper's read buffer per connection at most (`max_buf_size`; also the largest response head
/// accepted, far above the 8 to 16 KiB servers send).
pub const READ_BUFFER: usize = 64 * 1024;
/// Copies of a body with a regex that can be alive at once (see the module docs).
pub const REGEX_BODY_COPIES: u64 = 5;

/// Bytes of the budget a probe of `target` reserves while it runs.
pub fn need(target: &Target) -> u64 {
    let body = if target.regex.is_some() {
        REGEX_BODY_COPIES * target.body_cap as u64
    } else {
        0
    };
    PROBE_FLOOR + body
}

/// A size as written in the configuration: a number of bytes, or a string with a binary unit
/// (`"128MiB"`, `"512 KiB"`, `"1GiB"`, `"4096B"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}

impl RawSize {
    /// The size in bytes.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            RawSize::Bytes(b) => Ok(*b),
            RawSize::Text(t) => parse_size(t),
        }
    }
}

impl Default for RawSize {
    fn default() -> Self {
        RawSize::Bytes(DEFAULT_MEMORY_BUDGET)
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a size like 128MiB, 512KiB, 1GiB or a number of bytes");
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit = match unit.trim() {
        "" | "B" => 1,
        "KiB" => KIB,
        "MiB" => MIB,
        "GiB" => GIB,
        _ => return Err(bad()),
    };
    number.checked_mul(unit).ok_or_else(bad)
}

/// A size for people: `128 MiB`, `3.1 MiB`, `640 KiB`.
pub fn show(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{} KiB", bytes.div_ceil(KIB))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("128MiB"), Ok(128 * MIB));
        assert_eq!(parse_size(" 512 KiB "), Ok(512 * KIB));
        assert_eq!(parse_size("1GiB"), Ok(GIB));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        for bad in [
            "",
            "MiB",
            "12 MB",
            "1.5GiB",
            "-1",
            "99999999999999999999GiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_probe_needs_its_floor_and_with_a_regex_its_copies() {
        let mut raw = crate::target::RawTarget::with_url(1, "http://h/");
        raw.body_cap = 2 * MIB as usize;
        assert_eq!(need(&Target::from_raw(raw.clone()).unwrap()), 128 * KIB);
        raw.regex = Some("ok".into());
        assert_eq!(need(&Target::from_raw(raw).unwrap()), 128 * KIB + 10 * MIB);
    }
}
