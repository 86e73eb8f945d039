//! Fuzz targets for every decoder of the wire format: any byte string gives a value or an error,
//! never a panic, and whatever decodes re-encodes to bytes that decode to the same value.
//!
//! With bolero (https://github.com/camshaft/bolero) the same targets run two ways:
//! - `cargo test -p vantage-fuzz` (stable, part of `make test`): bolero's random
//!   engine, a few thousand random inputs per target;
//! - `make fuzz` (cargo-bolero, libFuzzer, coverage-guided, on the stable toolchain; `tests/fuzz`):
//!   a short run in `make test`, the long one with `FUZZ_RUNS=10000000 make fuzz`; figures in
//!   target/bench/fuzz.txt.

use vantage_fuzz::cert_expiry::not_after_unix;
use vantage_proto::ack::{decode_ack, encode_ack, MAX_ACK_LEN, MAX_ACK_RANGES};
use vantage_proto::control::{
    decode_status, encode_status, TargetSetReader, MAX_STATUS_LEN, MAX_TARGETS,
};
use vantage_proto::{decode, encode, Error, MAX_FRAME_LEN};

/// The property every codec here shares: what `decode` accepts, `encode` writes into `N` bytes
/// (the codec's largest frame), and that decodes to the same value ("canonical after one round
/// trip"; not byte for byte: postcard reads overlong varints too, 0x80 0x00 is 0). The value
/// decoded, for the codec's own checks.
fn round_trip<T: PartialEq + std::fmt::Debug, const N: usize>(
    bytes: &[u8],
    decode: fn(&[u8]) -> Result<T, Error>,
    encode: for<'b> fn(&T, &'b mut [u8]) -> Result<&'b mut [u8], Error>,
) -> Option<T> {
    let value = decode(bytes).ok()?;
    let mut buf = [0u8; N];
    let again = encode(&value, &mut buf).expect("a decoded value fits its largest frame");
    assert_eq!(decode(again).as_ref(), Ok(&value));
    Some(value)
}

/// Result frames of every version: decode is total, and canonical after one round trip.
#[test]
fn result_frames() {
    bolero::check!().for_each(|bytes: &[u8]| round_trips(bytes));
}

/// [`round_trip`] of a result frame (encoded again as the current version).
fn round_trips(frame: &[u8]) {
    round_trip::<_, MAX_FRAME_LEN>(frame, decode, encode);
}

/// Version 3 clocks (issue #18 item 3): random bytes rarely get past the results to the
/// clock at a frame's end, so these start from a valid head (no results or one, no gaps) and
/// let the input be the clock; the same properties as [`result_frames`].
#[test]
fn result_frame_clocks() {
    const NO_RESULTS: &[u8] = &[3, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0];
    // One result: Up, seq 0, target 1, started 1,000 ms, status 200, total 0, body 0; no gaps.
    const ONE_RESULT: &[u8] = &[
        3, 1, 2, 3, 4, 5, 6, 7, 8, 1, 16, 0, 0, 0, 1, 208, 15, 0, 0, 0,
    ];
    bolero::check!().for_each(|bytes: &[u8]| {
        for head in [NO_RESULTS, ONE_RESULT] {
            round_trips(&[head, bytes].concat());
        }
    });
}

/// Version 4's extension (issue #20): a valid head of one result whose extension byte says
/// tcp, then the input in place of the rest of the result (outcome on), so the extension's
/// fields, later results and the clock are reached; the same properties as [`result_frames`].
/// A second head lets the input be the extension byte itself.
#[test]
fn result_frame_kinds() {
    // Version 4, boot id, one result: head status 200 + extension, presence 0; then the
    // extension byte tcp (or the input as the extension byte, or dns with a reply).
    const TCP_HEAD: &[u8] = &[4, 1, 2, 3, 4, 5, 6, 7, 8, 1, 0x90, 0, 1];
    const EXT_HEAD: &[u8] = &[4, 1, 2, 3, 4, 5, 6, 7, 8, 1, 0x90, 0];
    // The dns kind (issue #20): extension dns + second byte, second byte "DNS reply".
    const DNS_HEAD: &[u8] = &[4, 1, 2, 3, 4, 5, 6, 7, 8, 1, 0x90, 0, 0x83, 1];
    bolero::check!().for_each(|bytes: &[u8]| {
        for head in [TCP_HEAD, EXT_HEAD, DNS_HEAD] {
            round_trips(&[head, bytes].concat());
        }
    });
}

/// Target set frames, read spec by spec as the agent does: never more specs than the header's
/// count (itself at most `MAX_TARGETS`), and nothing after the first error.
#[test]
fn target_set_frames() {
    bolero::check!().for_each(|bytes: &[u8]| {
        if let Ok(reader) = TargetSetReader::new(bytes) {
            let count = usize::from(reader.header().count);
            assert!(count <= MAX_TARGETS);
            let mut seen = 0;
            for item in reader {
                seen += 1;
                assert!(seen <= count + 1, "more items than the header's count");
                if item.is_err() {
                    break;
                }
            }
        }
    });
}

/// Agent status frames: decode is total, and canonical after one round trip.
#[test]
fn status_frames() {
    bolero::check!().for_each(|bytes: &[u8]| {
        round_trip::<_, MAX_STATUS_LEN>(bytes, decode_status, encode_status);
    });
}

/// Topics: parse is total over any UTF-8, and what parses formats back to the same text.
#[test]
fn topics() {
    bolero::check!().for_each(|bytes: &[u8]| {
        if let Ok(text) = core::str::from_utf8(bytes) {
            let prefix = text.split('/').next().unwrap_or("");
            if let Some(topic) = vantage_proto::topic::Topic::parse(prefix, text) {
                assert_eq!(topic.to_string(), text);
            }
        }
    });
}

/// The agent's certificate expiry walk (a server's certificate is input from anyone): total
/// over any bytes, and equal to `x509-cert`'s notAfter on every certificate that parses.
#[test]
fn certificate_expiry() {
    use x509_cert::der::Decode;
    bolero::check!().for_each(|bytes: &[u8]| {
        let walked = not_after_unix(bytes);
        if let Ok(cert) = x509_cert::Certificate::from_der(bytes) {
            let reference = cert.tbs_certificate.validity.not_after.to_unix_duration();
            assert_eq!(walked, Some(reference.as_secs()), "{cert:?}");
        }
    });
}

/// The same comparison on real certificates (rcgen, UTCTime before 2050 and GeneralizedTime
/// from 2050) and on every one-byte change of them: random bytes are almost never a certificate
/// that `x509-cert` accepts, these are.
#[test]
fn certificate_expiry_matches_x509_cert_on_real_certificates() {
    use x509_cert::der::Decode;
    let mut compared = 0;
    for (year, month, day) in [
        (1999, 12, 31),
        (2027, 2, 28),
        (2049, 12, 31),
        (2050, 1, 1),
        (2100, 6, 15),
    ] {
        let mut params =
            rcgen::CertificateParams::new(vec!["example.test".to_owned()]).expect("a name");
        params.not_after = rcgen::date_time_ymd(year, month, day);
        let expected = params.not_after.unix_timestamp() as u64;
        let key = rcgen::KeyPair::generate().expect("a key");
        let der = params
            .self_signed(&key)
            .expect("a certificate")
            .der()
            .to_vec();
        assert_eq!(not_after_unix(&der), Some(expected), "{year}-{month}-{day}");
        for i in 0..der.len() {
            for flip in [0x01u8, 0x80] {
                let mut bytes = der.clone();
                bytes[i] ^= flip;
                let walked = not_after_unix(&bytes);
                if let Ok(cert) = x509_cert::Certificate::from_der(&bytes) {
                    let reference = cert.tbs_certificate.validity.not_after.to_unix_duration();
                    assert_eq!(walked, Some(reference.as_secs()), "byte {i} ^ {flip:#x}");
                    compared += 1;
                }
            }
        }
    }
    assert!(
        compared > 100,
        "only {compared} changed certificates parsed"
    );
}

/// End-to-end acknowledgement frames: decode is total, never more than `MAX_ACK_RANGES` ranges,
/// each with `first <= last`, and canonical after one round trip.
#[test]
fn ack_frames() {
    bolero::check!().for_each(|bytes: &[u8]| {
        if let Some(ack) = round_trip::<_, MAX_ACK_LEN>(bytes, decode_ack, encode_ack) {
            assert!(ack.ranges.len() <= MAX_ACK_RANGES);
            assert!(ack.ranges.iter().all(|r| r.first <= r.last));
        }
    });
}

/// The `dns` probe's reply parser (a reply is input from anyone on the path): total over any
/// bytes; what it reads agrees with the header's bytes; a truncated reply is read by its
/// header; every record it accepted fits in the reply.
#[test]
fn dns_replies() {
    use vantage_fuzz::dns_wire::{encode_query, parse_reply, ParseError};
    // A reply head to start from: id 0x1234, QR RD RA, one question (up.test A), one answer.
    let head = [
        &encode_query(0x1234, "up.test", 1)[..],
        &[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4],
    ]
    .concat();
    bolero::check!().for_each(|bytes: &[u8]| {
        for input in [bytes.to_vec(), [&head[..], bytes].concat()] {
            let mut input = input;
            if input.len() >= 4 && input.len() > bytes.len() {
                input[2] |= 0x80; // make the started-from head a response
                input[6..8].copy_from_slice(&1u16.to_be_bytes());
            }
            match parse_reply(&input, "up.test", 1) {
                Ok(reply) => {
                    assert!(input.len() >= 12);
                    assert_eq!(reply.id, u16::from_be_bytes([input[0], input[1]]));
                    assert_eq!(reply.answers, u16::from_be_bytes([input[6], input[7]]));
                    assert!(reply.matching <= reply.answers);
                    assert_eq!(reply.rcode, u16::from(input[3] & 0x0F));
                    assert_eq!(reply.truncated, input[2] & 0x02 != 0);
                    // Not truncated: every record was walked, so each took at least 11 bytes.
                    if !reply.truncated {
                        let records: usize = [6, 8, 10]
                            .iter()
                            .map(|&i| usize::from(u16::from_be_bytes([input[i], input[i + 1]])))
                            .sum();
                        assert!(12 + records * 11 <= input.len());
                    }
                }
                Err(ParseError::NotResponse) => assert!(input[2] & 0x80 == 0),
                Err(_) => {}
            }
        }
    });
}
