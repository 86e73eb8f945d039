//! Acknowledgement frames: golden bytes (version 1 is frozen), the frame → ranges helper, and
//! the decoder's bounds.

use vantage_proto::ack::{
    decode_ack, encode_ack, frame_ranges, Ack, SeqRange, ACK_VERSION, MAX_ACK_LEN, MAX_ACK_RANGES,
};
use vantage_proto::{Batch, Error, Gap, Outcome, ProbeResult};

fn ack() -> Ack {
    let mut ranges = heapless::Vec::new();
    ranges.push(SeqRange { first: 0, last: 31 }).unwrap();
    ranges
        .push(SeqRange {
            first: 300,
            last: 300,
        })
        .unwrap();
    Ack {
        boot_id: 0x0102_0304_0506_0708,
        ranges,
    }
}

const GOLDEN_ACK: &[u8] = &[
    1, 136, 142, 152, 168, 192, 224, 128, 129, 1, 2, 0, 31, 172, 2, 172, 2,
];

#[test]
fn ack_golden_bytes() {
    let mut buf = [0u8; MAX_ACK_LEN];
    let frame = encode_ack(&ack(), &mut buf).unwrap();
    assert_eq!(&frame[..], GOLDEN_ACK);
    assert_eq!(frame[0], ACK_VERSION);
    assert_eq!(decode_ack(GOLDEN_ACK), Ok(ack()));
}

#[test]
fn the_largest_ack_fits_its_bound() {
    let mut ranges = heapless::Vec::new();
    for i in 0..MAX_ACK_RANGES as u64 {
        ranges
            .push(SeqRange {
                first: u64::MAX - 1 - 2 * (MAX_ACK_RANGES as u64 - i),
                last: u64::MAX - 1,
            })
            .unwrap();
    }
    let big = Ack {
        boot_id: u64::MAX,
        ranges,
    };
    let mut buf = [0u8; MAX_ACK_LEN];
    let frame = encode_ack(&big, &mut buf).unwrap();
    assert_eq!(decode_ack(frame), Ok(big));
}

#[test]
fn decoding_refuses_what_is_not_an_ack() {
    assert_eq!(decode_ack(&[]), Err(Error::Empty));
    assert_eq!(decode_ack(&[2, 0, 0]), Err(Error::UnknownVersion(2)));
    // One range more than the bound.
    let mut too_many = vec![1, 0, MAX_ACK_RANGES as u8 + 1];
    too_many.extend(std::iter::repeat_n(0u8, 2 * (MAX_ACK_RANGES + 1)));
    assert_eq!(decode_ack(&too_many), Err(Error::Malformed));
    // first > last.
    assert_eq!(decode_ack(&[1, 0, 1, 5, 4]), Err(Error::Malformed));
    let mut trailing = GOLDEN_ACK.to_vec();
    trailing.push(0);
    assert_eq!(decode_ack(&trailing), Err(Error::TrailingBytes));
}

fn result(seq: u64) -> ProbeResult {
    ProbeResult {
        status: 200,
        total_us: 1,
        ..ProbeResult::without_response(seq, 1, 1_764_000_000_000, Outcome::Up)
    }
}

#[test]
fn frame_ranges_merge_results_and_gaps() {
    let mut batch = Batch {
        boot_id: 7,
        results: heapless::Vec::new(),
        gaps: heapless::Vec::new(),
        clock: None,
    };
    assert!(frame_ranges(&batch).is_empty());
    for seq in [10, 11, 12, 20, 21] {
        batch.results.push(result(seq)).unwrap();
    }
    batch
        .gaps
        .push(Gap {
            first_seq: 13,
            count: 3,
            first_started_at_ms: 0,
            last_started_at_ms: 0,
        })
        .unwrap();
    let ranges = frame_ranges(&batch);
    assert_eq!(
        &ranges[..],
        &[
            SeqRange {
                first: 10,
                last: 15
            },
            SeqRange {
                first: 20,
                last: 21
            }
        ]
    );
    let mut a = ack();
    a.ranges.clear();
    a.ranges.push(SeqRange { first: 0, last: 17 }).unwrap();
    assert!(!a.covers_all(&ranges));
    a.ranges
        .push(SeqRange {
            first: 19,
            last: 25,
        })
        .unwrap();
    assert!(a.covers_all(&ranges));
}
