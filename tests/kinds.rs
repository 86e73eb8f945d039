//! Probe kinds (issue #20) against servers the test starts on loopback: `tcp` (an open port,
//! a closed one, a peer that never speaks with `expect`, banner match and mismatch, `send`
//! then `expect`, a peer that hangs up early, a name that resolves) and `tls` (a chain of a
//! test CA and its earliest expiry, an expired certificate, a wrong name, an untrusted one,
//! TLS 1.2 against 1.3) and `dns` (queries to a dnsmasq the test starts: an answer, NXDOMAIN,
//! a name without a record of the type, REFUSED, SERVFAIL and a slow name from upstreams of
//! the test's own, a large answer that falls back to TCP, a resolver that never answers and a
//! closed port). No services needed (dnsmasq is installed by `tests/services/up`); never an
//! address outside loopback.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use vantage_agent::probe::{Measurement, Prober};
use vantage_agent::target::{ProbeKind, RawTarget, Target};
use vantage_proto::{DnsReply, IpAddress, Outcome, Phase, RegexOutcome, TlsVersion};
use vantage_tests::dns::{upstream, Dnsmasq, Upstream};
use vantage_tests::target::TargetServer;
use vantage_tests::tls::TestCa;

/// A target of `kind` for `address`, its other settings given by `edit`.
fn target(kind: ProbeKind, address: &str, edit: impl FnOnce(&mut RawTarget)) -> Target {
    let mut raw = RawTarget::with_url(1, "");
    raw.kind = kind;
    raw.address = Some(address.to_owned());
    raw.timeout = Duration::from_secs(5);
    edit(&mut raw);
    Target::from_raw(raw).unwrap()
}

async fn probe(t: &Target) -> Measurement {
    Prober::new().probe(t).await
}

/// What a peer does on each connection it accepts: reads `read_first` bytes (what the probe
/// sends), writes `banner`, then holds the connection open, or closes it when `close`.
#[derive(Clone, Copy)]
struct Peer {
    read_first: usize,
    banner: &'static [u8],
    close: bool,
}

/// A listener on 127.0.0.1 (a free port) whose connections behave as `peer`; it lives as
/// long as the test's runtime.
async fn peer(peer: Peer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Peer {
                    read_first,
                    banner,
                    close,
                } = peer;
                let mut got = vec![0u8; read_first];
                if stream.read_exact(&mut got).await.is_err() {
                    return;
                }
                if stream.write_all(banner).await.is_err() || close {
                    return;
                }
                std::future::pending::<()>().await;
            });
        }
    });
    addr
}

/// A peer that accepts and never sends anything.
async fn silent() -> SocketAddr {
    peer(Peer {
        read_first: 0,
        banner: b"",
        close: false,
    })
    .await
}

fn loopback() -> Option<IpAddress> {
    Some(IpAddress::V4([127, 0, 0, 1]))
}

// ---- tcp ---------------------------------------------------------------------------------

#[tokio::test]
async fn tcp_open_port_is_up_with_its_connect_time() {
    // A bound listener that never accepts: the kernel completes the handshake all the same.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let m = probe(&target(ProbeKind::Tcp, &addr, |_| {})).await;
    assert_eq!((m.outcome, m.failed_phase), (Outcome::Up, None), "{m:?}");
    assert_eq!(m.kind, ProbeKind::Tcp);
    assert_eq!(m.dns_us, None, "an address: no DNS phase");
    assert!(
        m.connect_us.is_some_and(|c| c > 0 && c <= m.total_us),
        "{m:?}"
    );
    assert_eq!((m.ttfb_us, m.tls_us, m.status), (None, None, 0));
    assert_eq!(m.regex, RegexOutcome::NotConfigured);
    assert_eq!(m.remote_ip, loopback());
    assert_eq!(m.detail, None);
}

#[tokio::test]
async fn tcp_closed_port_is_refused() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let m = probe(&target(
        ProbeKind::Tcp,
        &format!("127.0.0.1:{port}"),
        |_| {},
    ))
    .await;
    assert_eq!(
        (m.outcome, m.failed_phase),
        (Outcome::ConnectRefused, Some(Phase::Connect)),
        "{m:?}"
    );
    assert_eq!(m.kind, ProbeKind::Tcp);
}

#[tokio::test]
async fn tcp_expect_from_a_silent_peer_times_out_waiting_for_the_first_byte() {
    let addr = silent().await.to_string();
    let t = target(ProbeKind::Tcp, &addr, |r| {
        r.expect = Some("SSH-2.0-".into());
        r.timeout = Duration::from_millis(300);
    });
    let m = probe(&t).await;
    assert_eq!(
        (m.outcome, m.failed_phase),
        (Outcome::Timeout, Some(Phase::FirstByte)),
        "{m:?}"
    );
    assert!(m.connect_us.is_some() && m.ttfb_us.is_none(), "{m:?}");
    // Generous margin: this checks that the deadline holds, not the machine's speed.
    assert!(m.total_us >= 300_000 && m.total_us < 3_000_000, "{m:?}");
}

#[tokio::test]
async fn tcp_banner_match_and_mismatch() {
    let ssh = peer(Peer {
        read_first: 0,
        banner: b"SSH-2.0-vantage-test\r\n",
        close: false,
    })
    .await
    .to_string();
    let t = target(ProbeKind::Tcp, &ssh, |r| r.expect = Some("SSH-2.0-".into()));
    let m = probe(&t).await;
    assert_eq!((m.outcome, m.failed_phase), (Outcome::Up, None), "{m:?}");
    assert_eq!(m.regex, RegexOutcome::Matched);
    // Read as far as the check needs, no further.
    assert_eq!(m.body_bytes, 8);
    assert!(m.ttfb_us.is_some() && m.transfer_us.is_some(), "{m:?}");
    let phases = m.connect_us.unwrap() + m.ttfb_us.unwrap() + m.transfer_us.unwrap();
    assert!(phases <= m.total_us, "{m:?}");

    // Another service answers: known at its first differing byte, long before the deadline.
    let smtp = peer(Peer {
        read_first: 0,
        banner: b"220 mail.example ESMTP\r\n",
        close: false,
    })
    .await
    .to_string();
    let t = target(ProbeKind::Tcp, &smtp, |r| {
        r.expect = Some("SSH-2.0-".into())
    });
    let m = probe(&t).await;
    assert_eq!(
        (m.outcome, m.failed_phase),
        (Outcome::ExpectMismatch, None),
        "{m:?}"
    );
    assert_eq!(m.regex, RegexOutcome::NotMatched);
    assert!(m.total_us < 2_000_000, "not the 5 s deadline: {m:?}");
    let detail = m.detail.as_deref().unwrap();
    assert!(
        detail.contains("SSH-2.0-") && detail.contains("220"),
        "{detail}"
    );
}

#[tokio::test]
async fn tcp_send_then_expect() {
    let redis = peer(Peer {
        read_first: 6,
        banner: b"+PONG\r\n",
        close: false,
    })
    .await
    .to_string();
    let t = target(ProbeKind::Tcp, &redis, |r| {
        r.send = Some("PING\r\n".into());
        r.expect = Some("+PONG".into());
    });
    let m = probe(&t).await;
    assert_eq!(
        (m.outcome, m.regex),
        (Outcome::Up, RegexOutcome::Matched),
        "{m:?}"
    );
    // Without the send the peer never answers: the wait for the first byte times out.
    let t = target(ProbeKind::Tcp, &redis, |r| {
        r.expect = Some("+PONG".into());
        r.timeout = Duration::from_millis(200);
    });
    let m = probe(&t).await;
    assert_eq!(m.outcome, Outcome::Timeout, "{m:?}");
}

#[tokio::test]
async fn tcp_peer_that_hangs_up_before_the_expected_bytes_is_a_reset() {
    let early = peer(Peer {
        read_first: 0,
        banner: b"SS",
        close: true,
    })
    .await
    .to_string();
    let t = target(ProbeKind::Tcp, &early, |r| {
        r.expect = Some("SSH-2.0-".into())
    });
    let m = probe(&t).await;
    assert_eq!(
        (m.outcome, m.failed_phase),
        (Outcome::ConnectionReset, Some(Phase::Body)),
        "{m:?}"
    );
    assert_eq!(m.body_bytes, 2);
}

#[tokio::test]
async fn tcp_to_a_name_has_a_dns_phase() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let t = target(ProbeKind::Tcp, &format!("localhost:{port}"), |r| {
        r.ip_family = vantage_agent::target::IpFamily::Ipv4;
    });
    let m = probe(&t).await;
    assert_eq!(m.outcome, Outcome::Up, "{m:?}");
    assert!(m.dns_us.is_some(), "{m:?}");
    assert_eq!(m.remote_ip, loopback());
}

// ---- tls ---------------------------------------------------------------------------------

/// A file holding `ca`'s certificate, for a target's `ca_file`.
fn ca_file(ca: &TestCa, name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "vantage-kinds-ca-{}-{name}.pem",
        std::process::id()
    ));
    ca.write_pem(&path);
    path
}

/// A tls target for `localhost:<port of server>` trusting `ca`.
fn tls_target(server: &TargetServer, ca: &TestCa, name: &str) -> Target {
    let ca_path = ca_file(ca, name);
    target(
        ProbeKind::Tls,
        &format!("localhost:{}", server.addr.port()),
        |r| {
            r.ca_file = Some(ca_path);
            r.ip_family = vantage_agent::target::IpFamily::Ipv4;
        },
    )
}

#[tokio::test]
async fn tls_handshake_records_version_and_the_chain_s_earliest_expiry() {
    // The CA expires in 2090, before its leaf (2099): the chain breaks in 2090.
    let ca = TestCa::until((2090, 1, 1));
    let leaf = ca.leaf(&["localhost"], (2020, 1, 1), (2099, 6, 30));
    let config = leaf.server_config_with(&[ca.cert_der()], rustls::DEFAULT_VERSIONS);
    let server = TargetServer::start_tls("127.0.0.1:0", config)
        .await
        .unwrap();
    let m = probe(&tls_target(&server, &ca, "chain")).await;
    assert_eq!((m.outcome, m.failed_phase), (Outcome::Up, None), "{m:?}");
    assert_eq!(m.kind, ProbeKind::Tls);
    assert_eq!(m.tls_version, Some(TlsVersion::Tls13));
    assert_eq!(m.cert_not_after_s, Some(3_786_912_000)); // 2090-01-01T00:00:00Z
    assert!(m.cert_not_after_s < Some(leaf.not_after_unix));
    assert!(m.dns_us.is_some() && m.connect_us.is_some() && m.tls_us.is_some());
    let phases = m.dns_us.unwrap() + m.connect_us.unwrap() + m.tls_us.unwrap();
    assert!(phases <= m.total_us, "{m:?}");
    // No HTTP: no request reached the server, no status, no first byte.
    assert_eq!((m.status, m.ttfb_us, m.body_bytes), (0, None, 0));
    assert!(server.seen().is_empty());
}

#[tokio::test]
async fn tls_1_2_and_1_3_are_recorded() {
    let ca = TestCa::new();
    let leaf = ca.leaf(&["localhost"], (2020, 1, 1), (2099, 1, 1));
    for (versions, want) in [
        (&[&rustls::version::TLS12][..], TlsVersion::Tls12),
        (&[&rustls::version::TLS13][..], TlsVersion::Tls13),
    ] {
        let config = leaf.server_config_with(&[], versions);
        let server = TargetServer::start_tls("127.0.0.1:0", config)
            .await
            .unwrap();
        let m = probe(&tls_target(&server, &ca, "versions")).await;
        assert_eq!(m.outcome, Outcome::Up, "{m:?}");
        assert_eq!(m.tls_version, Some(want), "{m:?}");
        assert_eq!(m.cert_not_after_s, Some(leaf.not_after_unix));
    }
}

#[tokio::test]
async fn tls_verification_failures_are_distinct_kinds() {
    let ca = TestCa::new();
    let cases = [
        (
            ca.leaf(&["localhost"], (2020, 1, 1), (2021, 1, 1)),
            Outcome::TlsExpired,
        ),
        (
            ca.leaf(&["example.internal"], (2020, 1, 1), (2099, 1, 1)),
            Outcome::TlsHostnameMismatch,
        ),
        (
            vantage_tests::tls::self_signed(&["localhost"]),
            Outcome::TlsUntrusted,
        ),
    ];
    for (leaf, outcome) in cases {
        let server = TargetServer::start_tls("127.0.0.1:0", leaf.server_config())
            .await
            .unwrap();
        let m = probe(&tls_target(&server, &ca, "failures")).await;
        assert_eq!(
            (m.outcome, m.failed_phase),
            (outcome, Some(Phase::Tls)),
            "{m:?}"
        );
        assert_eq!((m.kind, m.tls_version), (ProbeKind::Tls, None));
    }
}

#[tokio::test]
async fn tls_skip_verify_accepts_and_still_records() {
    let leaf = vantage_tests::tls::self_signed(&["localhost"]);
    let server = TargetServer::start_tls("127.0.0.1:0", leaf.server_config())
        .await
        .unwrap();
    let t = target(
        ProbeKind::Tls,
        &format!("127.0.0.1:{}", server.addr.port()),
        |r| r.tls_skip_verify = true,
    );
    let m = probe(&t).await;
    assert_eq!(m.outcome, Outcome::Up, "{m:?}");
    assert_eq!(m.cert_not_after_s, Some(leaf.not_after_unix));
    assert!(m.tls_version.is_some());
}

// ---- dns ---------------------------------------------------------------------------------

/// A dns target asking `resolver` for `name` of `query_type`.
fn dns_target(resolver: SocketAddr, name: &str, query_type: &str, timeout: Duration) -> Target {
    let mut raw = RawTarget::with_url(1, "");
    raw.kind = ProbeKind::Dns;
    raw.query = Some(name.to_owned());
    raw.query_type = Some(query_type.to_owned());
    raw.resolver = Some(resolver.to_string());
    raw.timeout = timeout;
    Target::from_raw(raw).unwrap()
}

/// A TXT string of 200 bytes: four of them make an answer over UDP's 512 bytes.
fn long_text(c: char) -> String {
    std::iter::repeat_n(c, 200).collect()
}

/// The test zone: `up.test` (A), `two.test` (two A records), `v4.nx.test` (an A, no AAAA),
/// other names under `nx.test` NXDOMAIN, `big.test` (four long TXT records), `broken.test` and
/// `slow.test` forwarded to the given upstreams; anything else REFUSED (no upstream).
fn zone(broken: SocketAddr, slow: SocketAddr) -> Vec<String> {
    let mut args = vec![
        "--address=/up.test/127.0.0.1".to_owned(),
        "--host-record=two.test,127.0.0.2".to_owned(),
        "--host-record=two.test,127.0.0.3".to_owned(),
        "--local=/nx.test/".to_owned(),
        "--host-record=v4.nx.test,127.0.0.4".to_owned(),
        format!("--server=/broken.test/127.0.0.1#{}", broken.port()),
        format!("--server=/slow.test/127.0.0.1#{}", slow.port()),
    ];
    for c in ['a', 'b', 'c', 'd'] {
        args.push(format!("--txt-record=big.test,{}", long_text(c)));
    }
    args
}

/// A dnsmasq with [`zone`]; the slow upstream forwards after 300 ms to a second dnsmasq that
/// knows `slow.test`.
async fn dns_server() -> (Dnsmasq, Dnsmasq) {
    let back = Dnsmasq::start(&["--address=/slow.test/127.0.0.9".to_owned()]);
    let slow = upstream(Upstream::Delay(Duration::from_millis(300), back.addr)).await;
    let broken = upstream(Upstream::Rcode(2)).await;
    (Dnsmasq::start(&zone(broken, slow)), back)
}

const DNS_TIMEOUT: Duration = Duration::from_secs(3);

#[tokio::test]
async fn dns_answer_is_up_with_its_code_count_and_query_time() {
    let (dns, _back) = dns_server().await;
    let m = probe(&dns_target(dns.addr, "up.test", "A", DNS_TIMEOUT)).await;
    assert_eq!((m.outcome, m.failed_phase), (Outcome::Up, None), "{m:?}");
    assert_eq!(m.kind, ProbeKind::Dns);
    assert_eq!(
        m.dns,
        Some(DnsReply {
            rcode: 0,
            answers: 1
        })
    );
    assert!(m.dns_us.is_some_and(|q| q > 0 && q <= m.total_us), "{m:?}");
    assert_eq!(
        (m.connect_us, m.tls_us, m.ttfb_us, m.status),
        (None, None, None, 0)
    );
    assert_eq!(m.remote_ip, loopback());
    assert_eq!(m.detail, None);
    // Two records, and the name in other case (RFC 4343): the same answer.
    let two = probe(&dns_target(dns.addr, "TWO.test", "a", DNS_TIMEOUT)).await;
    assert_eq!(two.outcome, Outcome::Up, "{two:?}");
    assert_eq!(
        two.dns,
        Some(DnsReply {
            rcode: 0,
            answers: 2
        })
    );
}

#[tokio::test]
async fn dns_nxdomain_and_no_record_are_no_such_name() {
    let (dns, _back) = dns_server().await;
    let nx = probe(&dns_target(dns.addr, "gone.nx.test", "A", DNS_TIMEOUT)).await;
    assert_eq!(
        (nx.outcome, nx.failed_phase),
        (Outcome::DnsNoSuchName, Some(Phase::Dns)),
        "{nx:?}"
    );
    assert_eq!(
        nx.dns,
        Some(DnsReply {
            rcode: 3,
            answers: 0
        })
    );
    assert!(nx.dns_us.is_some(), "{nx:?}");
    // The name exists, without a record of the type asked: NOERROR, no answer.
    let nodata = probe(&dns_target(dns.addr, "v4.nx.test", "AAAA", DNS_TIMEOUT)).await;
    assert_eq!(
        (nodata.outcome, nodata.failed_phase),
        (Outcome::DnsNoSuchName, Some(Phase::Dns)),
        "{nodata:?}"
    );
    assert_eq!(
        nodata.dns,
        Some(DnsReply {
            rcode: 0,
            answers: 0
        })
    );
    assert!(
        nodata.detail.as_deref().is_some_and(|d| d.contains("AAAA")),
        "{nodata:?}"
    );
}

#[tokio::test]
async fn dns_servfail_and_refused_are_their_kinds() {
    let (dns, _back) = dns_server().await;
    // dnsmasq passes on its upstream's SERVFAIL.
    let servfail = probe(&dns_target(dns.addr, "x.broken.test", "A", DNS_TIMEOUT)).await;
    assert_eq!(
        (servfail.outcome, servfail.failed_phase),
        (Outcome::DnsServerFailure, Some(Phase::Dns)),
        "{servfail:?}"
    );
    assert_eq!(
        servfail.dns,
        Some(DnsReply {
            rcode: 2,
            answers: 0
        })
    );
    // A name dnsmasq has no upstream for: REFUSED, a DNS failure with its code.
    let refused = probe(&dns_target(dns.addr, "elsewhere.example", "A", DNS_TIMEOUT)).await;
    assert_eq!(
        (refused.outcome, refused.failed_phase),
        (Outcome::DnsFailed, Some(Phase::Dns)),
        "{refused:?}"
    );
    assert_eq!(
        refused.dns,
        Some(DnsReply {
            rcode: 5,
            answers: 0
        })
    );
}

/// An answer over 512 bytes comes truncated over UDP (TC); the probe asks again over TCP and
/// counts the whole answer.
#[tokio::test]
async fn dns_large_answer_falls_back_to_tcp() {
    let (dns, _back) = dns_server().await;
    let m = probe(&dns_target(dns.addr, "big.test", "TXT", DNS_TIMEOUT)).await;
    assert_eq!((m.outcome, m.failed_phase), (Outcome::Up, None), "{m:?}");
    assert_eq!(
        m.dns,
        Some(DnsReply {
            rcode: 0,
            answers: 4
        })
    );
    let connect = m
        .connect_us
        .expect("a TCP connection after the truncated reply");
    assert!(
        m.dns_us.is_some_and(|q| q > connect && q <= m.total_us),
        "{m:?}"
    );
}

/// dnsmasq forwards `slow.test` to an upstream that answers 300 ms late: the query time says so.
#[tokio::test]
async fn dns_slow_name_is_measured() {
    let (dns, _back) = dns_server().await;
    let m = probe(&dns_target(dns.addr, "slow.test", "A", DNS_TIMEOUT)).await;
    assert_eq!((m.outcome, m.failed_phase), (Outcome::Up, None), "{m:?}");
    let q = m.dns_us.unwrap();
    assert!(
        (300_000..2_000_000).contains(&q),
        "query time {q} µs: {m:?}"
    );
    // Faster than the deadline: the same name with a deadline of 100 ms times out in dns.
    let late = probe(&dns_target(
        dns.addr,
        "slow.test",
        "A",
        Duration::from_millis(100),
    ))
    .await;
    assert_eq!(
        (late.outcome, late.failed_phase),
        (Outcome::Timeout, Some(Phase::Dns)),
        "{late:?}"
    );
    assert!((100_000..600_000).contains(&late.total_us), "{late:?}");
    assert_eq!((late.dns, late.dns_us), (None, None));
}

#[tokio::test]
async fn dns_silent_resolver_times_out_and_closed_port_is_refused() {
    // A UDP socket that reads queries and never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let t = Duration::from_millis(300);
    let m = probe(&dns_target(silent.local_addr().unwrap(), "up.test", "A", t)).await;
    assert_eq!(
        (m.outcome, m.failed_phase),
        (Outcome::Timeout, Some(Phase::Dns)),
        "{m:?}"
    );
    assert!((300_000..800_000).contains(&m.total_us), "{m:?}");
    assert_eq!(m.remote_ip, loopback());
    // Nothing bound: the kernel answers with ICMP port unreachable.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let m = probe(&dns_target(closed, "up.test", "A", DNS_TIMEOUT)).await;
    assert_eq!(
        (m.outcome, m.failed_phase),
        (Outcome::ConnectRefused, Some(Phase::Dns)),
        "{m:?}"
    );
    assert!(m.total_us < 1_000_000, "{m:?}");
}

/// `probes.private_addresses = "refuse"` covers a configured resolver: nothing is sent to it.
#[tokio::test]
async fn dns_refused_resolver_gets_nothing() {
    let resolver = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let t = dns_target(resolver.local_addr().unwrap(), "up.test", "A", DNS_TIMEOUT);
    let prober = Prober::new().with_address_policy(vantage_agent::netpolicy::AddressPolicy::Refuse);
    let m = prober.probe(&t).await;
    assert_eq!(
        (m.outcome, m.failed_phase),
        (Outcome::AddressRefused, Some(Phase::Dns)),
        "{m:?}"
    );
    let mut buf = [0u8; 512];
    let got = tokio::time::timeout(Duration::from_millis(200), resolver.recv(&mut buf)).await;
    assert!(got.is_err(), "the resolver received a query");
}
