//! Control frames: golden bytes (the v1 encodings are frozen), round trips, and totality.

use vantage_proto::control::{
    decode_status, encode_status, encode_target_set, AgentState, AgentStatus, HeaderSpec,
    IpFamilySpec, Rejection, SetScope, TargetOption, TargetSetHeader, TargetSetReader, TargetSpec,
    MAX_STATUS_LEN, MAX_TARGET_SET_LEN, TARGET_SET_V1, TARGET_SET_VERSION,
};
use vantage_proto::{Error, ProbeKind};

fn spec(id: u32) -> TargetSpec {
    let mut headers = heapless::Vec::new();
    headers
        .push(HeaderSpec {
            name: "accept".try_into().unwrap(),
            value: "text/html".try_into().unwrap(),
        })
        .unwrap();
    let mut accepted = heapless::Vec::new();
    accepted.push((200, 299)).unwrap();
    accepted.push((301, 301)).unwrap();
    TargetSpec {
        id,
        name: "shop".try_into().unwrap(),
        url: "https://shop.example/".try_into().unwrap(),
        interval_ms: 30_000,
        timeout_ms: 10_000,
        regex: Some("Buy".try_into().unwrap()),
        method: "GET".try_into().unwrap(),
        headers,
        accepted_status: accepted,
        max_redirects: 5,
        body_cap: 1_048_576,
        ca_file: None,
        tls_skip_verify: false,
        ip_family: IpFamilySpec::Ipv4,
        kind: ProbeKind::Http,
        options: heapless::Vec::new(),
    }
}

fn status() -> AgentStatus {
    AgentStatus {
        state: AgentState::Heartbeat,
        agent_id: "pi-1".try_into().unwrap(),
        region: "eu-north".try_into().unwrap(),
        boot_id: 0x0102_0304_0506_0708,
        version: "0.1.0".try_into().unwrap(),
        sent_at_ms: 1_764_000_000_000,
        max_concurrency: 64,
        buffer_capacity: 10_000,
        targets: 3,
        pending_results: 7,
        region_set_generation: 4,
        agent_set_generation: 0,
        rejection: Some(Rejection {
            scope: SetScope::Agent,
            generation: 5,
            reason: "bad".try_into().unwrap(),
        }),
    }
}

const GOLDEN_TARGET_SET: &[u8] = &[
    1, 9, 1, 7, 4, 115, 104, 111, 112, 21, 104, 116, 116, 112, 115, 58, 47, 47, 115, 104, 111, 112,
    46, 101, 120, 97, 109, 112, 108, 101, 47, 176, 234, 1, 144, 78, 1, 3, 66, 117, 121, 3, 71, 69,
    84, 1, 6, 97, 99, 99, 101, 112, 116, 9, 116, 101, 120, 116, 47, 104, 116, 109, 108, 2, 200, 1,
    171, 2, 173, 2, 173, 2, 5, 128, 128, 64, 0, 0, 1,
];

const GOLDEN_STATUS: &[u8] = &[
    1, 1, 4, 112, 105, 45, 49, 8, 101, 117, 45, 110, 111, 114, 116, 104, 136, 142, 152, 168, 192,
    224, 128, 129, 1, 5, 48, 46, 49, 46, 48, 128, 208, 223, 180, 171, 51, 64, 144, 78, 3, 7, 4, 0,
    1, 1, 5, 3, 98, 97, 100,
];

#[test]
fn target_set_golden_bytes() {
    let header = TargetSetHeader {
        generation: 9,
        count: 1,
    };
    let mut buf = [0u8; 4096];
    let frame = encode_target_set(&header, [&spec(7)], &mut buf).unwrap();
    assert_eq!(frame, GOLDEN_TARGET_SET, "{frame:?}");
    let mut reader = TargetSetReader::new(GOLDEN_TARGET_SET).unwrap();
    assert_eq!(reader.header(), &header);
    assert_eq!(reader.next(), Some(Ok(spec(7))));
    assert_eq!(reader.next(), None);
}

#[test]
fn status_golden_bytes() {
    let mut buf = [0u8; MAX_STATUS_LEN];
    let frame = encode_status(&status(), &mut buf).unwrap();
    assert_eq!(frame, GOLDEN_STATUS, "{frame:?}");
    assert_eq!(decode_status(GOLDEN_STATUS), Ok(status()));
}

#[test]
fn largest_status_fits_its_bound() {
    let mut s = status();
    s.agent_id = "a".repeat(64).as_str().try_into().unwrap();
    s.region = "r".repeat(64).as_str().try_into().unwrap();
    s.version = "v".repeat(32).as_str().try_into().unwrap();
    s.boot_id = u64::MAX;
    s.sent_at_ms = u64::MAX;
    s.max_concurrency = u32::MAX;
    s.buffer_capacity = u32::MAX;
    s.targets = u32::MAX;
    s.pending_results = u32::MAX;
    s.region_set_generation = u64::MAX;
    s.agent_set_generation = u64::MAX;
    s.rejection.as_mut().unwrap().generation = u64::MAX;
    s.rejection.as_mut().unwrap().reason = "x".repeat(256).as_str().try_into().unwrap();
    let mut buf = [0u8; MAX_STATUS_LEN];
    let frame = encode_status(&s, &mut buf).unwrap();
    assert!(frame.len() <= MAX_STATUS_LEN);
}

#[test]
fn many_specs_round_trip_and_count_is_checked() {
    let specs: Vec<TargetSpec> = (1..=500).map(spec).collect();
    let header = TargetSetHeader {
        generation: 3,
        count: 500,
    };
    let mut buf = vec![0u8; MAX_TARGET_SET_LEN];
    let frame = encode_target_set(&header, &specs, &mut buf)
        .unwrap()
        .to_vec();
    let back: Result<Vec<_>, _> = TargetSetReader::new(&frame).unwrap().collect();
    assert_eq!(back.unwrap(), specs);

    // The header promises more specs than follow.
    let short = TargetSetHeader {
        generation: 3,
        count: 2,
    };
    let mut buf = [0u8; 4096];
    assert_eq!(
        encode_target_set(&short, [&spec(1)], &mut buf).err(),
        Some(Error::Malformed)
    );
    // Trailing bytes after the last spec.
    let mut frame = GOLDEN_TARGET_SET.to_vec();
    frame.push(0);
    let items: Vec<_> = TargetSetReader::new(&frame).unwrap().collect();
    assert_eq!(items.last(), Some(&Err(Error::TrailingBytes)));
}

#[test]
fn decoding_is_total() {
    // Every prefix and every single-byte corruption of both golden frames gives a value or an
    // error, never a panic; the reader always stops.
    for golden in [GOLDEN_TARGET_SET, GOLDEN_STATUS] {
        for cut in 0..golden.len() {
            let _ = decode_status(&golden[..cut]);
            if let Ok(r) = TargetSetReader::new(&golden[..cut]) {
                assert!(r.count() <= 1024);
            }
        }
        for i in 0..golden.len() {
            for b in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut f = golden.to_vec();
                f[i] = b;
                let _ = decode_status(&f);
                if let Ok(r) = TargetSetReader::new(&f) {
                    assert!(r.count() <= 1024);
                }
            }
        }
    }
    // Random and coverage-guided inputs: the fuzz targets in fuzz/tests/decoders.rs.
    assert_eq!(decode_status(&[]), Err(Error::Empty));
    assert_eq!(decode_status(&[9]), Err(Error::UnknownVersion(9)));
    // Version 2 exists since issue #20; 3 does not.
    assert!(matches!(
        TargetSetReader::new(&[3, 0, 0]),
        Err(Error::UnknownVersion(3))
    ));
}

const GOLDEN_TARGET_SET_REFERENCE: &[u8] = &[
    1, 9, 1, 7, 4, 115, 104, 111, 112, 21, 104, 116, 116, 112, 115, 58, 47, 47, 115, 104, 111, 112,
    46, 101, 120, 97, 109, 112, 108, 101, 47, 176, 234, 1, 144, 78, 1, 3, 66, 117, 121, 3, 71, 69,
    84, 2, 6, 97, 99, 99, 101, 112, 116, 9, 116, 101, 120, 116, 47, 104, 116, 109, 108, 17, 101,
    110, 118, 58, 97, 117, 116, 104, 111, 114, 105, 122, 97, 116, 105, 111, 110, 9, 65, 80, 73, 95,
    84, 79, 75, 69, 78, 2, 200, 1, 171, 2, 173, 2, 173, 2, 5, 128, 128, 64, 0, 0, 1,
];

/// Issue #14: a header reference (`env:` / `file:` name, the variable or path as value) is an
/// ordinary `HeaderSpec` on the wire: v1 frames carry it unchanged (bytes frozen here), and
/// `Debug` shows a reference's value but never a literal one.
#[test]
fn header_reference_golden_bytes() {
    let mut s = spec(7);
    s.headers
        .push(HeaderSpec {
            name: "env:authorization".try_into().unwrap(),
            value: "API_TOKEN".try_into().unwrap(),
        })
        .unwrap();
    let header = TargetSetHeader {
        generation: 9,
        count: 1,
    };
    let mut buf = [0u8; 4096];
    let frame = encode_target_set(&header, [&s], &mut buf).unwrap();
    assert_eq!(frame, GOLDEN_TARGET_SET_REFERENCE, "{frame:?}");
    let mut reader = TargetSetReader::new(GOLDEN_TARGET_SET_REFERENCE).unwrap();
    assert_eq!(reader.next(), Some(Ok(s.clone())));
    let debug = format!("{:?}", s.headers);
    assert!(
        debug.contains("API_TOKEN") && !debug.contains("text/html"),
        "{debug}"
    );
    assert!(s.headers[1].is_reference() && !s.headers[0].is_reference());
}

// ---- target sets version 2 (issue 20): kinds and options ------------------------------------

/// A tcp target with a banner check, as `targets apply` publishes it.
fn tcp_spec(id: u32) -> TargetSpec {
    let mut options = heapless::Vec::new();
    options
        .push(TargetOption::Send("PING\r\n".try_into().unwrap()))
        .unwrap();
    options
        .push(TargetOption::Expect("+PONG".try_into().unwrap()))
        .unwrap();
    TargetSpec {
        id,
        name: "cache".try_into().unwrap(),
        url: "cache.example:6379".try_into().unwrap(),
        interval_ms: 10_000,
        timeout_ms: 2_000,
        regex: None,
        method: "GET".try_into().unwrap(),
        headers: heapless::Vec::new(),
        accepted_status: heapless::Vec::new(),
        max_redirects: 5,
        body_cap: 1_048_576,
        ca_file: None,
        tls_skip_verify: false,
        ip_family: IpFamilySpec::Auto,
        kind: ProbeKind::Tcp,
        options,
    }
}

const GOLDEN_TARGET_SET_V2: &[u8] = &[
    2, 10, 1, // version 2, generation 10, one spec
    // the version 1 fields: id 8, "cache", "cache.example:6379", 10 s, 2 s, no regex, "GET",
    // no headers, no status ranges, 5 redirects, 1 MiB body cap, no CA file, verify, auto
    8, 5, 99, 97, 99, 104, 101, 18, 99, 97, 99, 104, 101, 46, 101, 120, 97, 109, 112, 108, 101, 58,
    54, 51, 55, 57, 144, 78, 208, 15, 0, 3, 71, 69, 84, 0, 0, 5, 128, 128, 64, 0, 0, 0,
    1, // kind tcp
    2, // two options: Send "PING\r\n", Expect "+PONG"
    0, 6, 80, 73, 78, 71, 13, 10, 1, 5, 43, 80, 79, 78, 71,
];

#[test]
fn target_set_v2_golden_bytes() {
    let header = TargetSetHeader {
        generation: 10,
        count: 1,
    };
    let mut buf = [0u8; 4096];
    let frame = encode_target_set(&header, [&tcp_spec(8)], &mut buf).unwrap();
    assert_eq!(frame, GOLDEN_TARGET_SET_V2, "{frame:?}");
    let mut reader = TargetSetReader::new(GOLDEN_TARGET_SET_V2).unwrap();
    assert_eq!(reader.version(), TARGET_SET_VERSION);
    assert_eq!(reader.next(), Some(Ok(tcp_spec(8))));
    assert_eq!(reader.next(), None);
    // `send` may be a credential: Debug does not show it.
    let debug = format!("{:?}", tcp_spec(8));
    assert!(
        !debug.contains("PING") && debug.contains("Send(<redacted>)") && debug.contains("+PONG"),
        "{debug}"
    );
}

/// A dns target (issue #20): the name asked for in `url`, its type and resolver as options.
fn dns_spec(id: u32) -> TargetSpec {
    let mut options = heapless::Vec::new();
    options.push(TargetOption::QueryType(16)).unwrap();
    options
        .push(TargetOption::Resolver("127.0.0.1:5353".try_into().unwrap()))
        .unwrap();
    TargetSpec {
        name: "zone".try_into().unwrap(),
        url: "up.test".try_into().unwrap(),
        kind: ProbeKind::Dns,
        options,
        ..tcp_spec(id)
    }
}

const GOLDEN_TARGET_SET_V2_DNS: &[u8] = &[
    2, 12, 1, // version 2, generation 12, one spec
    // id 9, "zone", "up.test", then as GOLDEN_TARGET_SET_V2's version 1 fields
    9, 4, 122, 111, 110, 101, 7, 117, 112, 46, 116, 101, 115, 116, 144, 78, 208, 15, 0, 3, 71, 69,
    84, 0, 0, 5, 128, 128, 64, 0, 0, 0, 3, // kind dns
    2, // two options: QueryType 16 (TXT), Resolver "127.0.0.1:5353"
    3, 16, 4, 14, 49, 50, 55, 46, 48, 46, 48, 46, 49, 58, 53, 51, 53, 51,
];

#[test]
fn target_set_v2_dns_golden_bytes() {
    let header = TargetSetHeader {
        generation: 12,
        count: 1,
    };
    let mut buf = [0u8; 4096];
    let frame = encode_target_set(&header, [&dns_spec(9)], &mut buf).unwrap();
    assert_eq!(frame, GOLDEN_TARGET_SET_V2_DNS, "{frame:?}");
    let mut reader = TargetSetReader::new(GOLDEN_TARGET_SET_V2_DNS).unwrap();
    assert_eq!(reader.next(), Some(Ok(dns_spec(9))));
    assert_eq!(reader.next(), None);
}

/// A set of http targets without options is still written as version 1, which agents from
/// before version 2 read; one target that needs version 2 makes the whole frame version 2,
/// and both kinds of spec read back the same.
#[test]
fn target_sets_use_version_1_when_they_can() {
    let mut buf = [0u8; 8192];
    let header = TargetSetHeader {
        generation: 9,
        count: 1,
    };
    let v1 = encode_target_set(&header, [&spec(7)], &mut buf).unwrap();
    assert_eq!(v1[0], TARGET_SET_V1);
    assert_eq!(TargetSetReader::new(v1).unwrap().version(), TARGET_SET_V1);
    let mut downgrade = spec(7);
    downgrade
        .options
        .push(TargetOption::AllowDowngrade)
        .unwrap();
    assert!(!downgrade.fits_v1() && spec(7).fits_v1());
    let specs = [spec(1), tcp_spec(2), downgrade];
    let header = TargetSetHeader {
        generation: 11,
        count: 3,
    };
    let frame = encode_target_set(&header, &specs, &mut buf)
        .unwrap()
        .to_vec();
    assert_eq!(frame[0], TARGET_SET_VERSION);
    let back: Result<Vec<_>, _> = TargetSetReader::new(&frame).unwrap().collect();
    assert_eq!(back.unwrap(), specs);
    // Cut anywhere: an error, never a panic or a short set read as whole.
    for cut in 1..frame.len() {
        if let Ok(reader) = TargetSetReader::new(&frame[..cut]) {
            assert!(reader.collect::<Result<Vec<_>, _>>().is_err(), "cut {cut}");
        }
    }
    // A kind or an option this agent does not know: the set is malformed.
    let mut unknown_kind = GOLDEN_TARGET_SET_V2.to_vec();
    let kind_at = GOLDEN_TARGET_SET_V2.len() - 17;
    assert_eq!(unknown_kind[kind_at], 1);
    unknown_kind[kind_at] = 9;
    let mut reader = TargetSetReader::new(&unknown_kind).unwrap();
    assert_eq!(reader.next(), Some(Err(Error::Malformed)));
    let mut unknown_option = GOLDEN_TARGET_SET_V2.to_vec();
    unknown_option[kind_at + 2] = 7;
    let mut reader = TargetSetReader::new(&unknown_option).unwrap();
    assert_eq!(reader.next(), Some(Err(Error::Malformed)));
    // A version 3 does not exist.
    assert_eq!(
        TargetSetReader::new(&[3, 1, 0]).err(),
        Some(Error::UnknownVersion(3))
    );
}
