//! Golden bytes: the exact encoding of every frame version ever shipped. If one of these tests
//! fails, the wire format changed; old agents in the field would be misread. Append a new version
//! instead (and a new golden pair), never edit an existing pair.

use vantage_proto::{
    decode, encode, encode_v3, v1, Batch, ClockHealth, DnsReply, Error, Gap, IpAddress, Outcome,
    Phase, ProbeKind, ProbeResult, RegexOutcome, TlsVersion, MAX_FRAME_LEN, MAX_GAPS, MAX_RESULTS,
};

fn sample_v1() -> v1::Batch {
    let mut results = heapless::Vec::new();
    results
        .push(v1::ProbeResult {
            seq: 0,
            target_id: 1,
            started_at_ms: 1_764_000_000_000,
            status: 200,
            outcome: Outcome::Up,
            regex: RegexOutcome::Matched,
            total_us: 12_345,
            dns_us: None,
            connect_us: Some(150),
            tls_us: None,
            ttfb_us: Some(9_000),
            body_bytes: 512,
        })
        .unwrap();
    results
        .push(v1::ProbeResult {
            seq: 1,
            target_id: 300,
            started_at_ms: 1_764_000_000_500,
            status: 0,
            outcome: Outcome::ConnectRefused,
            regex: RegexOutcome::NotConfigured,
            total_us: 80,
            dns_us: Some(20),
            connect_us: None,
            tls_us: None,
            ttfb_us: None,
            body_bytes: 0,
        })
        .unwrap();
    v1::Batch {
        boot_id: 0x0123_4567_89AB_CDEF,
        results,
    }
}

fn sample_v2() -> Batch {
    let mut results = heapless::Vec::new();
    results
        .push(ProbeResult {
            seq: 7,
            target_id: 1,
            started_at_ms: 1_764_000_000_000,
            status: 200,
            outcome: Outcome::Up,
            failed_phase: None,
            regex: RegexOutcome::Matched,
            total_us: 52_000,
            dns_us: Some(900),
            connect_us: Some(150),
            tls_us: Some(4_000),
            ttfb_us: Some(9_000),
            transfer_us: Some(300),
            body_bytes: 512,
            body_truncated: false,
            redirects: 1,
            cert_not_after_s: Some(1_800_000_000),
            remote_ip: Some(IpAddress::V4([127, 0, 0, 1])),
            kind: ProbeKind::Http,
            tls_version: None,
            dns: None,
        })
        .unwrap();
    results
        .push(ProbeResult {
            // Timed out waiting for the first byte: no status, regex, body or certificate.
            failed_phase: Some(Phase::FirstByte),
            total_us: 1_000_000,
            connect_us: Some(100),
            remote_ip: Some(IpAddress::V6([
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
            ])),
            ..ProbeResult::without_response(8, 2, 1_764_000_000_100, Outcome::Timeout)
        })
        .unwrap();
    let mut gaps = heapless::Vec::new();
    gaps.push(Gap {
        first_seq: 2,
        count: 5,
        first_started_at_ms: 1_763_999_990_000,
        last_started_at_ms: 1_763_999_999_000,
    })
    .unwrap();
    Batch {
        boot_id: 0x0123_4567_89AB_CDEF,
        results,
        gaps,
        clock: None,
    }
}

const GOLDEN_V2: &[u8] = &[
    2, // format version
    239, 155, 175, 205, 248, 172, 209, 145, 1, // boot id (varint)
    2, // two results
    // seq 7, target 1, started_at, status 200, Up, no phase, Matched, total, dns..transfer
    7, 1, 128, 208, 223, 180, 171, 51, 200, 1, 0, 0, 1, 160, 150, 3, 1, 132, 7, 1, 150, 1, 1, 160,
    31, 1, 168, 70, 1, 172, 2, // ... body 512, not truncated, 1 redirect, cert, 127.0.0.1
    128, 4, 0, 1, 1, 128, 164, 167, 218, 6, 1, 0, 127, 0, 0, 1,
    // seq 8: Timeout in FirstByte, connected to ::1
    8, 2, 228, 208, 223, 180, 171, 51, 0, 7, 1, 3, 0, 192, 132, 61, 0, 1, 100, 0, 0, 0, 0, 0, 0, 0,
    1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    1, // one gap: first seq 2, 5 results, time range
    2, 5, 240, 129, 223, 180, 171, 51, 152, 200, 223, 180, 171, 51,
];

const GOLDEN_V1: &[u8] = &[
    1, // format version
    239, 155, 175, 205, 248, 172, 209, 145, 1, // boot id (varint)
    2, // two results
    0, 1, 128, 208, 223, 180, 171, 51, 200, 1, 0, 1, 185, 96, 0, 1, 150, 1, 0, 1, 168, 70, 128, 4,
    1, 172, 2, 244, 211, 223, 180, 171, 51, 0, 4, 0, 80, 1, 20, 0, 0, 0, 0,
];

#[test]
fn v1_encodes_to_golden_bytes() {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let bytes = v1::encode(&sample_v1(), &mut buf).unwrap();
    assert_eq!(&bytes[..], GOLDEN_V1, "{bytes:?}");
}

#[test]
fn v1_golden_bytes_decode_into_the_current_batch() {
    let batch = decode(GOLDEN_V1).unwrap();
    assert_eq!(batch, Batch::from(sample_v1()));
    assert!(batch.gaps.is_empty());
    assert_eq!(batch.results[0].failed_phase, None);
    assert_eq!(batch.results[1].outcome, Outcome::ConnectRefused);
}

#[test]
fn v2_encodes_to_golden_bytes() {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let bytes = vantage_proto::encode_v2(&sample_v2(), &mut buf).unwrap();
    assert_eq!(&bytes[..], GOLDEN_V2, "{bytes:?}");
}

#[test]
fn v2_golden_bytes_decode() {
    assert_eq!(decode(GOLDEN_V2).unwrap(), sample_v2());
}

// --- Issue #13: `MemoryRefused` appended within version 2 (after the redirect and encoding kinds). ---

/// The result an agent sends for a probe its memory budget could never hold: no response, no
/// phase, no timings; outcome byte 23.
const GOLDEN_V2_MEMORY_REFUSED: &[u8] = &[
    2, // format version
    1, // boot id 1
    1, // one result
    // seq 0, target 42, started_at, status 0, MemoryRefused (23), no phase, no regex, total 0
    0, 42, 128, 208, 223, 180, 171, 51, 0, 23, 0, 0, 0,
    // dns .. transfer None, body 0, not truncated, 0 redirects, no cert, no address
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
    0, // no gaps
];

/// One result without a response (no status, phase, timings, body), as the agent sends for
/// `memory_refused` and `missed`, in a batch of its own; its bytes must be `golden` (the
/// bytes are the contract: they spell out every field).
fn assert_no_response_golden(outcome: Outcome, golden: &[u8]) {
    let mut results = heapless::Vec::new();
    results
        .push(ProbeResult::without_response(
            0,
            42,
            1_764_000_000_000,
            outcome,
        ))
        .unwrap();
    let batch = Batch {
        boot_id: 1,
        results,
        gaps: heapless::Vec::new(),
        clock: None,
    };
    let mut buf = [0u8; MAX_FRAME_LEN];
    let bytes = vantage_proto::encode_v2(&batch, &mut buf).unwrap();
    assert_eq!(&bytes[..], golden, "{bytes:?}");
    assert_eq!(decode(golden).unwrap(), batch);
}

#[test]
fn v2_memory_refused_is_golden() {
    assert_no_response_golden(Outcome::MemoryRefused, GOLDEN_V2_MEMORY_REFUSED);
}

// --- End of issue #13 items 3/12. ---

// --- Issue #18 item 4: `Missed` appended within version 2 (outcome byte 24). ---

/// A probe that was due and did not run: no response, no phase, no timings.
const GOLDEN_V2_MISSED: &[u8] = &[
    2, // format version
    1, // boot id 1
    1, // one result
    // seq 0, target 42, started_at (its due time), status 0, Missed (24), no phase, no regex,
    // total 0
    0, 42, 128, 208, 223, 180, 171, 51, 0, 24, 0, 0, 0,
    // dns .. transfer None, body 0, not truncated, 0 redirects, no cert, no address
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
    0, // no gaps
];

#[test]
fn v2_missed_is_golden() {
    assert_no_response_golden(Outcome::Missed, GOLDEN_V2_MISSED);
}

/// The variant index is what travels: `all[i]` encodes as the byte `i`, and `names` (the
/// contract) are the stable names in that order.
fn assert_wire_order<T: serde::Serialize + core::fmt::Debug>(
    all: &[T],
    name: impl Fn(&T) -> &'static str,
    names: &[&str],
) {
    let mut buf = [0u8; 8];
    for (i, v) in all.iter().enumerate() {
        assert_eq!(
            postcard::to_slice(v, &mut buf).unwrap(),
            &[i as u8],
            "{v:?}"
        );
    }
    assert_eq!(all.iter().map(name).collect::<Vec<_>>(), names);
}

#[test]
fn phase_wire_order_is_frozen() {
    assert_wire_order(
        &Phase::ALL,
        |p| p.as_str(),
        &[
            "dns",
            "connect",
            "tls",
            "first_byte",
            "body",
            // issue 13 block
            "headers",
            "check",
        ],
    );
}

#[test]
fn outcome_wire_order_is_frozen() {
    assert_wire_order(
        &Outcome::ALL,
        |o| o.as_str(),
        &[
            "up",
            "status_not_accepted",
            "regex_not_matched",
            "dns_failed",
            "connect_refused",
            "connect_failed",
            "tls_failed",
            "timeout",
            "connection_reset",
            "protocol_error",
            "other",
            "dns_no_such_name",
            "connect_timeout",
            "unreachable",
            "tls_untrusted",
            "tls_expired",
            "tls_hostname_mismatch",
            "body_truncated",
            "address_refused",
            // issue 13 block
            "too_many_redirects",
            "redirect_loop",
            "downgrade_refused",
            "bad_content_encoding",
            "memory_refused",
            // issue 18
            "missed",
            // issue 20
            "expect_mismatch",
            "dns_server_failure",
        ],
    );
}

#[test]
fn kind_and_tls_version_wire_order_is_frozen() {
    assert_wire_order(
        &ProbeKind::ALL,
        |k| k.as_str(),
        &["http", "tcp", "tls", "dns"],
    );
    for (i, k) in ProbeKind::ALL.iter().enumerate() {
        assert_eq!(
            (k.index(), ProbeKind::from_index(i as u8)),
            (i as u8, Some(*k))
        );
    }
    assert_eq!(ProbeKind::from_index(4), None);
    assert_wire_order(&TlsVersion::ALL, |v| v.as_str(), &["TLSv1.2", "TLSv1.3"]);
    assert_eq!(TlsVersion::ALL.map(|v| v.code()), [0x0303, 0x0304]);
}

#[test]
fn largest_batch_fits_max_frame_len() {
    let widest = ProbeResult {
        seq: u64::MAX,
        target_id: u32::MAX,
        started_at_ms: u64::MAX,
        status: u16::MAX,
        outcome: Outcome::BodyTruncated,
        failed_phase: Some(Phase::Body),
        regex: RegexOutcome::NotMatched,
        total_us: u32::MAX,
        dns_us: Some(u32::MAX),
        connect_us: Some(u32::MAX),
        tls_us: Some(u32::MAX),
        ttfb_us: Some(u32::MAX),
        transfer_us: Some(u32::MAX),
        body_bytes: u32::MAX,
        body_truncated: true,
        redirects: u8::MAX,
        cert_not_after_s: Some(u64::MAX),
        remote_ip: Some(IpAddress::V6([0xFF; 16])),
        kind: ProbeKind::Http,
        tls_version: None,
        dns: None,
    };
    let mut results = heapless::Vec::new();
    for _ in 0..MAX_RESULTS {
        results.push(widest).unwrap();
    }
    let mut gaps = heapless::Vec::new();
    for _ in 0..MAX_GAPS {
        gaps.push(Gap {
            first_seq: u64::MAX,
            count: u32::MAX,
            first_started_at_ms: u64::MAX,
            last_started_at_ms: u64::MAX,
        })
        .unwrap();
    }
    let batch = Batch {
        boot_id: u64::MAX,
        results,
        gaps,
        clock: Some(ClockHealth {
            synced: true,
            max_error_ms: u32::MAX,
            est_error_ms: u32::MAX,
            synced_from_seq: Some(u64::MAX),
            boot_age_s: u32::MAX,
            // As far from the last start as a delta can be (zigzag of i64::MIN: 10 bytes).
            sealed_at_ms: u64::MAX.wrapping_add(i64::MIN as u64),
        }),
    };
    let mut buf = [0u8; MAX_FRAME_LEN];
    let v2 = vantage_proto::encode_v2(&batch, &mut buf).unwrap().len();
    // Version 2 does not carry the clock.
    let batch_v2 = Batch {
        clock: None,
        ..batch.clone()
    };
    assert_eq!(decode(&buf[..v2]).unwrap(), batch_v2);
    assert!(v2 <= MAX_FRAME_LEN);
    let bytes = encode_v3(&batch, &mut buf).unwrap();
    assert!(bytes.len() <= MAX_FRAME_LEN);
    let v3 = bytes.len();
    assert_eq!(decode(bytes).unwrap(), batch);
    // Version 4: the widest kind fields on every result (an extension byte and a TLS version).
    let mut widest_v4 = batch.clone();
    for r in widest_v4.results.iter_mut() {
        r.kind = ProbeKind::Tls;
        r.tls_version = Some(TlsVersion::Tls13);
        // Not a result a probe makes (a tls probe has no DNS reply), but the most bytes.
        r.dns = Some(DnsReply {
            rcode: u16::MAX,
            answers: u16::MAX,
        });
    }
    let bytes = encode(&widest_v4, &mut buf).unwrap();
    assert!(bytes.len() <= MAX_FRAME_LEN);
    println!(
        "largest frame: version 4 {} bytes, version 3 {v3}, version 2 {v2} (MAX_FRAME_LEN \
         {MAX_FRAME_LEN})",
        bytes.len()
    );
    assert_eq!(decode(bytes).unwrap(), widest_v4);
}

#[test]
fn bad_frames_are_errors() {
    assert_eq!(decode(&[]), Err(Error::Empty));
    assert_eq!(decode(&[9, 0]), Err(Error::UnknownVersion(9)));
    assert_eq!(decode(&[0]), Err(Error::UnknownVersion(0)));
    for golden in [GOLDEN_V1, GOLDEN_V2] {
        assert_eq!(decode(&golden[..golden.len() - 1]), Err(Error::Malformed));
        let mut long = golden.to_vec();
        long.push(0);
        assert_eq!(decode(&long), Err(Error::TrailingBytes));
    }
    // Lists longer than their capacity are refused, not allocated.
    assert_eq!(decode(&[1, 0, 33]), Err(Error::Malformed));
    assert_eq!(decode(&[2, 0, 33]), Err(Error::Malformed));
    assert_eq!(decode(&[2, 0, 0, 5]), Err(Error::Malformed));
    let mut tiny = [0u8; 4];
    assert_eq!(encode(&sample_v2(), &mut tiny), Err(Error::BufferTooSmall));
    assert_eq!(
        encode_v3(&sample_v2(), &mut tiny),
        Err(Error::BufferTooSmall)
    );
}

/// Every truncation of the golden frames and every byte of them set to a few telling values
/// decodes or fails cleanly. Random and coverage-guided inputs: the fuzz targets in
/// `fuzz/tests/decoders.rs`.
#[test]
fn decode_is_total_on_mutated_golden_frames() {
    for golden in [
        GOLDEN_V1,
        GOLDEN_V2,
        GOLDEN_V3,
        GOLDEN_V3_CLOCK,
        GOLDEN_V4,
        GOLDEN_V4_DNS,
    ] {
        for cut in 0..golden.len() {
            let _ = decode(&golden[..cut]);
        }
        for i in 0..golden.len() {
            for b in [0u8, 1, 2, 0x7f, 0x80, 0xff] {
                let mut mutated = golden.to_vec();
                mutated[i] = b;
                let _ = decode(&mutated);
            }
        }
    }
}

// ---- issue 13 block: outcomes and phases appended within version 2 ------------------------

const GOLDEN_V2_ISSUE_13: &[u8] = &[
    2, // format version
    1, // boot id
    2, // two results
    // seq 8, target 2, started_at, status 0, BadContentEncoding (22) in Check (6), then as in
    // GOLDEN_V2's second result
    8, 2, 228, 208, 223, 180, 171, 51, 0, 22, 1, 6, 0, 192, 132, 61, 0, 1, 100, 0, 0, 0, 0, 0, 0, 0,
    1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    // the same with Timeout (7) in Headers (5)
    8, 2, 228, 208, 223, 180, 171, 51, 0, 7, 1, 5, 0, 192, 132, 61, 0, 1, 100, 0, 0, 0, 0, 0, 0, 0,
    1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, // no gaps
];

/// A version 2 frame with a result that uses the outcomes and phases of the issue 13 block: the
/// new kinds are one byte each, like the old ones, and a current decoder reads them.
#[test]
fn issue_13_outcomes_and_phases_encode_as_appended_indexes() {
    let mut results = heapless::Vec::new();
    let mut r = sample_v2().results[1];
    r.outcome = Outcome::BadContentEncoding;
    r.failed_phase = Some(Phase::Check);
    results.push(r).unwrap();
    r.outcome = Outcome::Timeout;
    r.failed_phase = Some(Phase::Headers);
    results.push(r).unwrap();
    let batch = Batch {
        boot_id: 1,
        results,
        gaps: heapless::Vec::new(),
        clock: None,
    };
    let mut buf = [0u8; MAX_FRAME_LEN];
    let bytes = vantage_proto::encode_v2(&batch, &mut buf).unwrap();
    assert_eq!(&bytes[..], GOLDEN_V2_ISSUE_13, "{bytes:?}");
    assert_eq!(decode(bytes).unwrap(), batch);
}

// ---- version 3 (issue 18 item 6): the same batch, packed ------------------------------------

const GOLDEN_V3: &[u8] = &[
    3, // format version
    239, 205, 171, 137, 103, 69, 35, 1, // boot id, 8 bytes little-endian
    2, // two results
    // head: regex Matched, status 200, redirects; presence: all five phases, IPv4, certificate
    50, 191, //
    0, 7, 1, // Up, seq 7 (the first result names its seq), target 1
    128, 160, 191, 233, 214, 102, // start: ms since 0 (zigzag)
    132, 7, 150, 1, 160, 31, 168, 70, 172,
    2, // dns 900, connect 150, tls 4000, ttfb 9000, transfer 300
    164, 204, 4, // total 52000 = the phases' 14350 + 37650 (zigzag)
    128, 4, 1, // body 512, 1 redirect
    128, 196, 170, 34, // certificate: 36,000,000 s after the start (zigzag)
    127, 0, 0, 1, // address
    // head: seq = previous + 1, failed phase; presence: connect, IPv6
    65, 66, //
    7, 3, 2, // Timeout in FirstByte, target 2
    200, 1, // start: 100 ms after the previous result's
    0, 100, // status 0, connect 100
    184, 135, 122, // total 1,000,000 = 100 + 999,900 (zigzag)
    0,   // body 0
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, // ::1
    1, // one gap, as in version 2
    2, 5, 240, 129, 223, 180, 171, 51, 152, 200, 223, 180, 171, 51,
];

#[test]
fn v3_encodes_to_golden_bytes() {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let bytes = encode_v3(&sample_v2(), &mut buf).unwrap();
    assert_eq!(&bytes[..], GOLDEN_V3, "{bytes:?}");
    assert!(GOLDEN_V3.len() < GOLDEN_V2.len());
}

#[test]
fn v3_golden_bytes_decode() {
    assert_eq!(decode(GOLDEN_V3).unwrap(), sample_v2());
}

/// Results that exercise every branch of the packing: each optional field absent and present,
/// statuses other than 200, sequence gaps and wraps, start times going backwards, the same
/// target again with the same and with another certificate and address, extreme values.
fn varied_results() -> heapless::Vec<ProbeResult, MAX_RESULTS> {
    let base = sample_v2().results[0];
    let mut out = heapless::Vec::new();
    let mut push = |r: ProbeResult| out.push(r).unwrap();
    push(base);
    push(ProbeResult {
        seq: 8,
        started_at_ms: base.started_at_ms - 5_000,
        ..base
    }); // earlier start
    push(ProbeResult {
        seq: 20,
        cert_not_after_s: Some(1_700_000_000),
        ..base
    }); // seq gap, older cert
    push(ProbeResult {
        seq: 21,
        remote_ip: Some(IpAddress::V4([10, 0, 0, 9])),
        ..base
    });
    push(ProbeResult {
        seq: 22,
        remote_ip: None,
        cert_not_after_s: None,
        ..base
    });
    push(ProbeResult {
        seq: 23,
        target_id: 9,
        remote_ip: Some(IpAddress::V6([7; 16])),
        ..base
    });
    push(ProbeResult {
        seq: 24,
        target_id: 9,
        ..base
    }); // V4 after V6 for target 9
    push(ProbeResult {
        seq: 25,
        status: 503,
        outcome: Outcome::StatusNotAccepted,
        regex: RegexOutcome::NotMatched,
        body_truncated: true,
        redirects: u8::MAX,
        ..base
    });
    push(ProbeResult {
        seq: 26,
        total_us: 10, // less than the phases: a negative remainder
        ..base
    });
    push(ProbeResult::without_response(
        27,
        3,
        base.started_at_ms,
        Outcome::Missed,
    ));
    push(ProbeResult {
        seq: u64::MAX,
        target_id: u32::MAX,
        started_at_ms: u64::MAX,
        status: u16::MAX,
        total_us: u32::MAX,
        dns_us: Some(u32::MAX),
        connect_us: Some(0),
        tls_us: None,
        ttfb_us: Some(u32::MAX),
        transfer_us: None,
        body_bytes: u32::MAX,
        cert_not_after_s: Some(u64::MAX),
        failed_phase: Some(Phase::Check),
        ..base
    });
    push(ProbeResult {
        seq: 0,
        started_at_ms: 0,
        cert_not_after_s: Some(0),
        ..base
    }); // seq wraps
    push(ProbeResult {
        seq: 1,
        target_id: u32::MAX,
        cert_not_after_s: Some(u64::MAX),
        ..base
    });
    out
}

#[test]
fn v3_round_trips_every_field_combination() {
    assert_every_slice_round_trips(&varied_results(), None, encode_v3, 3);
}

/// Every slice of `results` (each seen first and after each other one), with the gaps of
/// `sample_v2` and `clock`, written by `encoder` as a frame of `version`, decodes to itself.
fn assert_every_slice_round_trips(
    results: &[ProbeResult],
    clock: Option<ClockHealth>,
    encoder: for<'b> fn(&Batch, &'b mut [u8]) -> Result<&'b mut [u8], Error>,
    version: u8,
) {
    for from in 0..results.len() {
        for to in from + 1..=results.len() {
            let batch = Batch {
                boot_id: u64::MAX - from as u64,
                results: results[from..to].iter().copied().collect(),
                gaps: sample_v2().gaps,
                clock,
            };
            let mut buf = [0u8; MAX_FRAME_LEN];
            let bytes = encoder(&batch, &mut buf).unwrap();
            assert_eq!(bytes[0], version);
            assert_eq!(decode(bytes), Ok(batch), "results {from}..{to}");
        }
    }
}

#[test]
fn v3_bad_frames_are_errors() {
    assert_eq!(
        decode(&GOLDEN_V3[..GOLDEN_V3.len() - 1]),
        Err(Error::Malformed)
    );
    // A byte after the gaps is the clock's flags (0 is not valid ones); bytes after a whole
    // clock are trailing (v3_bad_clocks_are_errors).
    let mut long = GOLDEN_V3.to_vec();
    long.push(0);
    assert_eq!(decode(&long), Err(Error::Malformed));
    // More results or gaps than a batch holds.
    let header = &GOLDEN_V3[..9];
    assert_eq!(decode(&[header, &[33]].concat()), Err(Error::Malformed));
    assert_eq!(decode(&[header, &[0, 5]].concat()), Err(Error::Malformed));
    // One result (Up, seq 0, target 1, start 0), then `tail` from the total on; head and
    // presence bytes varied; no gaps, clock unknown.
    let frame = |head: u8, presence: u8, tail: &[u8]| {
        [header, &[1, head, presence, 0, 0, 1, 0], tail, &[0]].concat()
    };
    let ok = frame(STATUS_200, 0, &[0, 0]);
    assert!(decode(&ok).is_ok());
    assert_eq!(
        decode(&frame(STATUS_200 | 0x80, 0, &[0, 0])),
        Err(Error::Malformed),
        "reserved bit"
    );
    assert_eq!(
        decode(&frame(STATUS_200 | 0b110, 0, &[0, 0])),
        Err(Error::Malformed),
        "regex 3"
    );
    // "Same address as this target's previous result" with no previous result.
    assert_eq!(
        decode(&frame(STATUS_200, 0b0110_0000, &[0, 0])),
        Err(Error::Malformed)
    );
    // A total of u32::MAX + 1 (zigzag 2^33): does not fit.
    assert_eq!(
        decode(&frame(STATUS_200, 0, &[0x80, 0x80, 0x80, 0x80, 0x20, 0])),
        Err(Error::Malformed)
    );
    // A redirect count of 0 under the "redirects" bit is not canonical.
    assert_eq!(
        decode(&frame(STATUS_200 | (1 << 5), 0, &[0, 0, 0])),
        Err(Error::Malformed)
    );
    // "seq = previous + 1" on the first result.
    let first_next = [header, &[1, STATUS_200 | 1, 0, 0, 1, 0, 0, 0], &[0]].concat();
    assert_eq!(decode(&first_next), Err(Error::Malformed));
}

const STATUS_200: u8 = 1 << 4;

// ---- version 3's clock (issue 18 item 3): the batch's clock health after the gaps ------------

/// A synced agent: 12 ms maximum error, 1 ms estimated, synced since seq 3, up one day,
/// sealed 2.5 s after the last result's start.
fn synced_clock() -> ClockHealth {
    ClockHealth {
        synced: true,
        max_error_ms: 12,
        est_error_ms: 1,
        synced_from_seq: Some(3),
        boot_age_s: 86_400,
        sealed_at_ms: 1_764_000_000_100 + 2_500,
    }
}

const GOLDEN_V3_CLOCK: &[u8] = &[
    3, // format version
    239, 205, 171, 137, 103, 69, 35, 1, // boot id
    0, // no results
    0, // no gaps
    // clock: present, synced, synced-from seq present; max error 12, estimated 1, from seq 3,
    // boot age 86,400 s, sealed at 1,764,000,002,600 ms (zigzag, from 0: no results)
    7, 12, 1, 3, 128, 163, 5, 208, 200, 191, 233, 214, 102,
];

#[test]
fn v3_clock_is_golden() {
    // Without results the seal time is a delta from 0: the longest form.
    let batch = Batch {
        boot_id: 0x0123_4567_89AB_CDEF,
        results: heapless::Vec::new(),
        gaps: heapless::Vec::new(),
        clock: Some(synced_clock()),
    };
    let mut buf = [0u8; MAX_FRAME_LEN];
    let bytes = encode_v3(&batch, &mut buf).unwrap();
    assert_eq!(&bytes[..], GOLDEN_V3_CLOCK, "{bytes:?}");
    assert_eq!(decode(GOLDEN_V3_CLOCK).unwrap(), batch);
    // With results: the seal time is 2.5 s after the last start, 2 bytes; the whole clock 9.
    let with = Batch {
        clock: Some(synced_clock()),
        ..sample_v2()
    };
    let bytes = encode_v3(&with, &mut buf).unwrap();
    assert_eq!(bytes.len(), GOLDEN_V3.len() + 9);
    assert_eq!(
        &bytes[GOLDEN_V3.len()..],
        &[7, 12, 1, 3, 128, 163, 5, 136, 39]
    );
    assert_eq!(decode(bytes).unwrap(), with);
    // Version 2 has no room for it: it decodes to None.
    let v2 = vantage_proto::encode_v2(&with, &mut buf).unwrap();
    assert_eq!(&v2[..], GOLDEN_V2);
}

/// A Pi without RTC in its first minute: not synced, 16 s maximum error, no sync yet, up
/// 42 s; its results before the first sync are the ones marked.
#[test]
fn v3_unsynced_clock_marks_every_result() {
    let clock = ClockHealth {
        synced: false,
        max_error_ms: 16_000,
        est_error_ms: 16_000,
        synced_from_seq: None,
        boot_age_s: 42,
        sealed_at_ms: 1_764_000_000_100 - 7, // seal time before the last start: negative delta
    };
    let batch = Batch {
        clock: Some(clock),
        ..sample_v2()
    };
    let mut buf = [0u8; MAX_FRAME_LEN];
    let bytes = encode_v3(&batch, &mut buf).unwrap();
    assert_eq!(&bytes[GOLDEN_V3.len()..], &[1, 128, 125, 128, 125, 42, 13]);
    assert_eq!(decode(bytes).unwrap(), batch);
    assert!(batch.results.iter().all(|r| clock.unsynced_at(r.seq)));
    let synced = synced_clock();
    assert!(synced.unsynced_at(2) && !synced.unsynced_at(3) && !synced.unsynced_at(8));
    let lost = ClockHealth {
        synced: false,
        ..synced
    };
    assert!(
        lost.unsynced_at(8),
        "a clock that lost its sync marks every result"
    );
}

#[test]
fn v3_round_trips_every_clock() {
    let base = synced_clock();
    let clocks = [
        None,
        Some(base),
        Some(ClockHealth {
            synced_from_seq: None,
            ..base
        }),
        Some(ClockHealth {
            synced: false,
            synced_from_seq: Some(0),
            ..base
        }),
        Some(ClockHealth {
            synced: false,
            max_error_ms: u32::MAX,
            est_error_ms: 0,
            synced_from_seq: Some(u64::MAX),
            boot_age_s: u32::MAX,
            sealed_at_ms: 0,
        }),
        Some(ClockHealth {
            sealed_at_ms: u64::MAX,
            ..base
        }),
    ];
    let results = varied_results();
    for clock in clocks {
        for to in [0, 1, 2, results.len()] {
            let batch = Batch {
                boot_id: 5,
                results: results[..to].iter().copied().collect(),
                gaps: heapless::Vec::new(),
                clock,
            };
            let mut buf = [0u8; MAX_FRAME_LEN];
            let bytes = encode_v3(&batch, &mut buf).unwrap();
            assert_eq!(decode(bytes), Ok(batch), "{clock:?} {to} results");
        }
    }
}

#[test]
fn v3_bad_clocks_are_errors() {
    // The frame of GOLDEN_V3_CLOCK up to its gap count, then `clock`.
    let head = &GOLDEN_V3_CLOCK[..11];
    let frame = |clock: &[u8]| [head, clock].concat();
    // Nothing after the gaps: unknown (also every version 3 frame from before the clock).
    assert_eq!(decode(head).unwrap().clock, None);
    // Reserved bits, and flags without "present" (0 included: unknown is no byte at all).
    for flags in [0, 1 << 3, 1 << 7, 0b1111_1001, 0b10, 0b100, 0b110] {
        assert_eq!(
            decode(&frame(&[flags, 0, 0, 0, 0, 0])),
            Err(Error::Malformed),
            "flags {flags:#b}"
        );
    }
    // Cut anywhere inside the clock.
    let clock = &GOLDEN_V3_CLOCK[11..];
    for cut in 1..clock.len() {
        assert_eq!(
            decode(&frame(&clock[..cut])),
            Err(Error::Malformed),
            "cut {cut}"
        );
    }
    // An error that does not fit a u32.
    assert_eq!(
        decode(&frame(&[1, 0x80, 0x80, 0x80, 0x80, 0x10, 0, 0, 0])),
        Err(Error::Malformed)
    );
    // Trailing bytes after the clock.
    assert_eq!(
        decode(&[GOLDEN_V3_CLOCK, &[0]].concat()),
        Err(Error::TrailingBytes)
    );
}

/// The heads the fuzz target `result_frame_clocks` (fuzz/tests/decoders.rs) starts from are
/// valid frames with the clock unknown.
#[test]
fn fuzz_clock_heads_are_valid() {
    let one = [
        3, 1, 2, 3, 4, 5, 6, 7, 8, 1, 16, 0, 0, 0, 1, 208, 15, 0, 0, 0,
    ];
    let batch = decode(&one).unwrap();
    assert_eq!(batch.results[0].started_at_ms, 1000);
    assert_eq!(batch.clock, None);
    assert!(decode(&[3, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0]).is_ok());
}

// ---- version 4 (issue 20): probe kinds ---------------------------------------------------------

/// An http result, then a tcp and a tls result: the http one in exactly version 3's bytes, the
/// others with an extension byte.
fn sample_v4() -> Batch {
    let http = sample_v2().results[0];
    let tcp = ProbeResult {
        regex: RegexOutcome::Matched, // the expect check
        total_us: 1_200,
        connect_us: Some(300),
        ttfb_us: Some(800),
        transfer_us: Some(50),
        body_bytes: 8,
        remote_ip: Some(IpAddress::V4([127, 0, 0, 1])),
        kind: ProbeKind::Tcp,
        ..ProbeResult::without_response(8, 3, http.started_at_ms + 100, Outcome::Up)
    };
    let tls = ProbeResult {
        total_us: 3_800,
        dns_us: Some(500),
        connect_us: Some(200),
        tls_us: Some(3_000),
        cert_not_after_s: Some(1_800_000_000),
        remote_ip: Some(IpAddress::V6([
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
        ])),
        kind: ProbeKind::Tls,
        tls_version: Some(TlsVersion::Tls13),
        ..ProbeResult::without_response(9, 4, http.started_at_ms + 200, Outcome::Up)
    };
    Batch {
        boot_id: 0x0123_4567_89AB_CDEF,
        results: [http, tcp, tls].into_iter().collect(),
        gaps: heapless::Vec::new(),
        clock: None,
    }
}

const GOLDEN_V4: &[u8] = &[
    4, // format version
    239,
    205,
    171,
    137,
    103,
    69,
    35,
    1, // boot id, 8 bytes little-endian
    3, // three results
    // the http result: version 3's bytes (GOLDEN_V3's first result), no extension
    50,
    191,
    0,
    7,
    1,
    128,
    160,
    191,
    233,
    214,
    102,
    132,
    7,
    150,
    1,
    160,
    31,
    168,
    70,
    172,
    2,
    164,
    204,
    4,
    128,
    4,
    1,
    128,
    196,
    170,
    34,
    127,
    0,
    0,
    1,
    // tcp: head seq + 1, regex Matched, extension; presence connect, ttfb, transfer, IPv4
    0b1000_0011,
    0b0011_1010, //
    1,           // extension: kind 1 (tcp), no field
    0,
    3, // Up, target 3
    200,
    1, // start: 100 ms after the previous result's (zigzag)
    0, // status 0
    172,
    2,
    160,
    6,
    50,  // connect 300, ttfb 800, transfer 50
    100, // total 1,200 = the phases' 1,150 + 50 (zigzag)
    8,   // body 8
    127,
    0,
    0,
    1, // address
    // tls: head seq + 1, extension; presence dns, connect, tls, IPv6, certificate
    0b1000_0001,
    0b1100_0111, //
    0b0001_0010, // extension: kind 2 (tls), TLS version present
    0,
    4, // Up, target 4
    200,
    1, // start: 100 ms later
    0, // status 0
    244,
    3,
    200,
    1,
    184,
    23, // dns 500, connect 200, tls 3000
    200,
    1, // total 3,800 = 3,700 + 100 (zigzag)
    0, // body 0
    128,
    196,
    170,
    34, // certificate: 36,000,000 s after the start (zigzag)
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    1, // ::1
    1, // TLSv1.3
    0, // no gaps; clock unknown
];

#[test]
fn v4_encodes_to_golden_bytes() {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let bytes = encode(&sample_v4(), &mut buf).unwrap();
    assert_eq!(&bytes[..], GOLDEN_V4, "{bytes:?}");
    assert_eq!(decode(GOLDEN_V4).unwrap(), sample_v4());
}

/// What an http result costs does not change with version 4 (issue #20's bytes-per-result
/// figure): the frame of a batch of http results is version 3's, but for the version byte.
#[test]
fn v4_http_results_are_version_3_bytes() {
    let mut results = varied_results();
    results.truncate(MAX_RESULTS);
    for clock in [None, Some(synced_clock())] {
        for batch in [
            sample_v2(),
            Batch {
                boot_id: 3,
                results: results.clone(),
                gaps: heapless::Vec::new(),
                clock,
            },
        ] {
            let mut b3 = [0u8; MAX_FRAME_LEN];
            let mut b4 = [0u8; MAX_FRAME_LEN];
            let v3 = encode_v3(&batch, &mut b3).unwrap();
            let v4 = encode(&batch, &mut b4).unwrap();
            assert_eq!((v3[0], v4[0]), (3, 4));
            assert_eq!(v3[1..], v4[1..]);
            assert_eq!(decode(v4).unwrap(), batch);
        }
    }
}

/// Versions 2 and 3 have no place for a kind: a batch with one is refused, never sent without it.
#[test]
fn v3_and_v2_refuse_other_kinds() {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let batch = sample_v4();
    assert_eq!(encode_v3(&batch, &mut buf), Err(Error::Unrepresentable));
    assert_eq!(
        vantage_proto::encode_v2(&batch, &mut buf),
        Err(Error::Unrepresentable)
    );
    assert_eq!(Error::Unrepresentable.reason(), "unrepresentable");
    // An http result with a version 4 field is refused too.
    let mut http = sample_v2();
    http.results[0].tls_version = Some(TlsVersion::Tls12);
    assert!(!http.results[0].fits_v3());
    assert_eq!(encode_v3(&http, &mut buf), Err(Error::Unrepresentable));
    assert!(sample_v2().results.iter().all(ProbeResult::fits_v3));
}

#[test]
fn v4_round_trips_every_kind_and_field() {
    let mut results = varied_results();
    let kinds = [
        (ProbeKind::Http, None),
        (ProbeKind::Tcp, None),
        (ProbeKind::Tls, Some(TlsVersion::Tls12)),
        (ProbeKind::Tls, Some(TlsVersion::Tls13)),
        (ProbeKind::Tls, None),
        (ProbeKind::Http, Some(TlsVersion::Tls13)),
        (ProbeKind::Dns, None),
        (ProbeKind::Dns, None),
    ];
    let replies = [
        None,
        Some(DnsReply {
            rcode: 0,
            answers: 3,
        }),
        Some(DnsReply {
            rcode: 3,
            answers: 0,
        }),
        Some(DnsReply {
            rcode: 4095,
            answers: u16::MAX,
        }),
    ];
    for (i, r) in results.iter_mut().enumerate() {
        (r.kind, r.tls_version) = kinds[i % kinds.len()];
        r.dns = replies[i % replies.len()];
    }
    assert_every_slice_round_trips(&results, Some(synced_clock()), encode, 4);
}

#[test]
fn v4_bad_extensions_are_errors() {
    let header = &GOLDEN_V4[..9];
    // One result (Up, seq 0, target 1, start 0, status 200, total 0, body 0) with extension
    // byte `ext` and `tail` after the body; no gaps, clock unknown.
    let frame = |ext: u8, tail: &[u8]| {
        [
            header,
            &[1, STATUS_200 | 0x80, 0, ext, 0, 0, 1, 0, 0, 0],
            tail,
            &[0],
        ]
        .concat()
    };
    assert_eq!(
        decode(&frame(1, &[])).unwrap().results[0].kind,
        ProbeKind::Tcp
    );
    let tls = decode(&frame(0x12, &[0])).unwrap().results[0];
    assert_eq!(
        (tls.kind, tls.tls_version),
        (ProbeKind::Tls, Some(TlsVersion::Tls12))
    );
    // "http, nothing": the bit would be clear.
    assert_eq!(decode(&frame(0, &[])), Err(Error::Malformed));
    // A kind that does not exist (yet).
    assert_eq!(decode(&frame(4, &[])), Err(Error::Malformed));
    // Kind 3 (dns) without a reply: a query that timed out.
    let timed_out = decode(&frame(3, &[])).unwrap().results[0];
    assert_eq!((timed_out.kind, timed_out.dns), (ProbeKind::Dns, None));
    assert_eq!(decode(&frame(15, &[])), Err(Error::Malformed));
    // Reserved bits: fields of later kinds.
    for bit in 5..7 {
        assert_eq!(
            decode(&frame(1 | 1 << bit, &[])),
            Err(Error::Malformed),
            "bit {bit}"
        );
    }
    // A TLS version that does not exist, or none where one was announced.
    assert_eq!(decode(&frame(0x12, &[2])), Err(Error::Malformed));
    assert_eq!(
        decode(&[header, &[1, STATUS_200 | 0x80, 0, 0x12, 0, 0, 1, 0, 0, 0]].concat()),
        Err(Error::Malformed)
    );
    // A second extension byte: bit 0 the DNS reply (RCODE, answers), the rest reserved, and
    // never a byte of 0.
    let second = |ext2: u8, tail: &[u8]| {
        [
            header,
            &[1, STATUS_200 | 0x80, 0, 0x83, ext2, 0, 0, 1, 0, 0, 0],
            tail,
            &[0],
        ]
        .concat()
    };
    let dns = decode(&second(1, &[3, 0])).unwrap().results[0];
    assert_eq!(
        (dns.kind, dns.dns),
        (
            ProbeKind::Dns,
            Some(DnsReply {
                rcode: 3,
                answers: 0
            })
        )
    );
    assert_eq!(decode(&second(0, &[3, 0])), Err(Error::Malformed));
    for bit in 1..8 {
        assert_eq!(
            decode(&second(1 | 1 << bit, &[3, 0])),
            Err(Error::Malformed),
            "bit {bit}"
        );
    }
    // Announced, missing: the answer count, or both (the gap count's 0 is read as the RCODE).
    assert_eq!(decode(&second(1, &[3])), Err(Error::Malformed));
    assert_eq!(decode(&second(1, &[])), Err(Error::Malformed));
    // An RCODE beyond u16 is not one.
    assert_eq!(
        decode(&second(1, &[0xff, 0xff, 0x04, 0])),
        Err(Error::Malformed)
    );
    // The same result as version 3: head bit 7 is reserved there.
    let mut v3 = frame(1, &[]);
    v3[0] = 3;
    assert_eq!(decode(&v3), Err(Error::Malformed));
}

/// The heads the fuzz target `result_frame_kinds` (fuzz/tests/decoders.rs) starts from are
/// valid version 4 frames.
#[test]
fn fuzz_kind_heads_are_valid() {
    // One tcp result (seq 0, target 1, start 0, status 200, total 0, body 0), no gaps.
    let tcp = [
        4, 1, 2, 3, 4, 5, 6, 7, 8, 1, 0x90, 0, 1, 0, 0, 1, 0, 0, 0, 0,
    ];
    assert_eq!(decode(&tcp).unwrap().results[0].kind, ProbeKind::Tcp);
    // One dns result with a reply (RCODE 0, 1 answer).
    let dns = [
        4, 1, 2, 3, 4, 5, 6, 7, 8, 1, 0x90, 0, 0x83, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0,
    ];
    assert_eq!(
        decode(&dns).unwrap().results[0].dns,
        Some(DnsReply {
            rcode: 0,
            answers: 1
        })
    );
}

// ---- issue 20's dns kind: appended within version 4 (a second extension byte) ------------

/// Two dns results: an answer (NOERROR, 2 records, over UDP) and NXDOMAIN (over TCP, after a
/// truncated UDP reply: its connect time is the TCP connection's).
fn sample_v4_dns() -> Batch {
    let up = ProbeResult {
        total_us: 1_600,
        dns_us: Some(1_500), // the query time
        remote_ip: Some(IpAddress::V4([127, 0, 0, 1])),
        kind: ProbeKind::Dns,
        dns: Some(DnsReply {
            rcode: 0,
            answers: 2,
        }),
        ..ProbeResult::without_response(0, 5, 1_764_000_000_000, Outcome::Up)
    };
    let nxdomain = ProbeResult {
        failed_phase: Some(Phase::Dns),
        total_us: 900,
        dns_us: Some(800),
        connect_us: Some(100),
        remote_ip: Some(IpAddress::V4([127, 0, 0, 1])),
        kind: ProbeKind::Dns,
        dns: Some(DnsReply {
            rcode: 3,
            answers: 0,
        }),
        ..ProbeResult::without_response(1, 5, 1_764_000_000_250, Outcome::DnsNoSuchName)
    };
    Batch {
        boot_id: 1,
        results: [up, nxdomain].into_iter().collect(),
        gaps: heapless::Vec::new(),
        clock: None,
    }
}

const GOLDEN_V4_DNS: &[u8] = &[
    4, // format version
    1,
    0,
    0,
    0,
    0,
    0,
    0,
    0, // boot id
    2, // two results
    // up: head extension; presence dns, IPv4; extension kind 3 (dns) + second byte; second
    // byte: DNS reply
    0b1000_0000,
    0b0010_0001,
    0b1000_0011,
    0b0000_0001,
    0, // Up
    0, // seq 0
    5, // target 5
    128,
    160,
    191,
    233,
    214,
    102, // start (zigzag)
    0,   // status 0
    220,
    11, // dns (query time) 1,500
    200,
    1, // total 1,600 = 1,500 + 100 (zigzag)
    0, // body 0
    127,
    0,
    0,
    1, // address
    0,
    2, // RCODE 0 (NOERROR), 2 answers
    // nxdomain: head seq + 1, failed phase, extension; presence dns, connect, address as before
    0b1100_0001,
    0b0110_0011,
    0b1000_0011,
    0b0000_0001,
    11, // DnsNoSuchName
    0,  // in phase dns
    5,  // target 5
    244,
    3, // start: 250 ms later (zigzag)
    0, // status 0
    160,
    6,   // dns 800
    100, // connect 100
    0,   // total 900 = the phases' 900
    0,   // body 0
    3,
    0, // RCODE 3 (NXDOMAIN), 0 answers
    0, // no gaps; clock unknown
];

#[test]
fn v4_dns_encodes_to_golden_bytes() {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let bytes = encode(&sample_v4_dns(), &mut buf).unwrap();
    assert_eq!(&bytes[..], GOLDEN_V4_DNS, "{bytes:?}");
    assert_eq!(decode(GOLDEN_V4_DNS).unwrap(), sample_v4_dns());
    // Neither version 3 nor 2 can carry them.
    assert_eq!(
        encode_v3(&sample_v4_dns(), &mut buf),
        Err(Error::Unrepresentable)
    );
}
