//! Format version 1, frozen: the first shipped format (no failed phase, transfer time,
//! truncation, redirects, certificate expiry, remote address or gap records). Kept so that
//! frames from agents not yet upgraded still decode, and so tests can produce them.

use serde::{Deserialize, Serialize};

use crate::{Error, Outcome, RegexOutcome, MAX_RESULTS};

/// A version 1 result. Its `outcome` uses only kinds 0–10.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeResult {
    pub seq: u64,
    pub target_id: u32,
    pub started_at_ms: u64,
    pub status: u16,
    pub outcome: Outcome,
    pub regex: RegexOutcome,
    pub total_us: u32,
    pub dns_us: Option<u32>,
    pub connect_us: Option<u32>,
    pub tls_us: Option<u32>,
    pub ttfb_us: Option<u32>,
    pub body_bytes: u32,
}

/// A version 1 batch.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub boot_id: u64,
    pub results: heapless::Vec<ProbeResult, MAX_RESULTS>,
}

/// Writes a version 1 frame, as agents of that version did.
pub fn encode<'b>(batch: &Batch, buf: &'b mut [u8]) -> Result<&'b mut [u8], Error> {
    crate::encode_versioned(1, batch, buf)
}

impl From<ProbeResult> for crate::ProbeResult {
    fn from(r: ProbeResult) -> Self {
        crate::ProbeResult {
            status: r.status,
            regex: r.regex,
            total_us: r.total_us,
            dns_us: r.dns_us,
            connect_us: r.connect_us,
            tls_us: r.tls_us,
            ttfb_us: r.ttfb_us,
            body_bytes: r.body_bytes,
            // What version 1 did not have is left as a result without a response has it.
            ..crate::ProbeResult::without_response(r.seq, r.target_id, r.started_at_ms, r.outcome)
        }
    }
}

impl From<Batch> for crate::Batch {
    fn from(b: Batch) -> Self {
        crate::Batch {
            boot_id: b.boot_id,
            // Same capacity, so nothing can be lost here.
            results: b
                .results
                .into_iter()
                .map(crate::ProbeResult::from)
                .collect(),
            gaps: heapless::Vec::new(),
            clock: None,
        }
    }
}
