//! Golden bytes: the exact encoding of every frame version ever shipped. If one of these tests
//! fails, the wire format changed; old agents in the field would be misread. Append a new version
//! instead (and a new golden pair), never edit an existing pair.

use vantage_proto::{
    decode, encode, Batch, Error, Outcome, ProbeResult, RegexOutcome, MAX_FRAME_LEN, MAX_RESULTS,
};

fn sample_v1() -> Batch {
    let mut results = heapless::Vec::new();
    results
        .push(ProbeResult {
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
        .push(ProbeResult {
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
    Batch {
        boot_id: 0x0123_4567_89AB_CDEF,
        results,
    }
}

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
    let bytes = encode(&sample_v1(), &mut buf).unwrap();
    assert_eq!(&bytes[..], GOLDEN_V1, "{bytes:?}");
}

#[test]
fn v1_golden_bytes_decode() {
    assert_eq!(decode(GOLDEN_V1).unwrap(), sample_v1());
}

#[test]
fn outcome_wire_order_is_frozen() {
    // The variant index is what travels; this list is the contract.
    let mut buf = [0u8; 8];
    for (i, o) in Outcome::ALL.iter().enumerate() {
        let bytes = postcard::to_slice(o, &mut buf).unwrap();
        assert_eq!(bytes, &[i as u8], "{o:?}");
    }
    assert_eq!(
        Outcome::ALL.map(|o| o.as_str()),
        [
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
            "other"
        ]
    );
}

#[test]
fn largest_batch_fits_max_frame_len() {
    let widest = ProbeResult {
        seq: u64::MAX,
        target_id: u32::MAX,
        started_at_ms: u64::MAX,
        status: u16::MAX,
        outcome: Outcome::Other,
        regex: RegexOutcome::NotMatched,
        total_us: u32::MAX,
        dns_us: Some(u32::MAX),
        connect_us: Some(u32::MAX),
        tls_us: Some(u32::MAX),
        ttfb_us: Some(u32::MAX),
        body_bytes: u32::MAX,
    };
    let mut results = heapless::Vec::new();
    for _ in 0..MAX_RESULTS {
        results.push(widest).unwrap();
    }
    let batch = Batch {
        boot_id: u64::MAX,
        results,
    };
    let mut buf = [0u8; MAX_FRAME_LEN];
    let bytes = encode(&batch, &mut buf).unwrap();
    assert!(bytes.len() <= MAX_FRAME_LEN);
    assert_eq!(decode(bytes).unwrap(), batch);
}

#[test]
fn bad_frames_are_errors() {
    assert_eq!(decode(&[]), Err(Error::Empty));
    assert_eq!(decode(&[9, 0]), Err(Error::UnknownVersion(9)));
    assert_eq!(
        decode(&GOLDEN_V1[..GOLDEN_V1.len() - 1]),
        Err(Error::Malformed)
    );
    let mut long = GOLDEN_V1.to_vec();
    long.push(0);
    assert_eq!(decode(&long), Err(Error::TrailingBytes));
    // A list longer than MAX_RESULTS is refused, not allocated.
    assert_eq!(decode(&[1, 0, 33]), Err(Error::Malformed));
    let mut tiny = [0u8; 4];
    assert_eq!(encode(&sample_v1(), &mut tiny), Err(Error::BufferTooSmall));
}

#[test]
fn decode_is_total_on_random_and_mutated_input() {
    // xorshift64: deterministic pseudo-random bytes, no dependency needed.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..50_000 {
        let len = (next() % 200) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if let Some(b) = bytes.first_mut() {
            *b = 1; // mostly exercise the v1 body decoder
        }
        let _ = decode(&bytes);
        let mut mutated = GOLDEN_V1.to_vec();
        let i = (next() as usize) % mutated.len();
        mutated[i] = next() as u8;
        let _ = decode(&mutated);
    }
}
