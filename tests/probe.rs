//! The probe engine against local servers started by the test: TESTING.md cases 1–9 (case 10,
//! the scheduler, is unit-tested in `agent/src/scheduler.rs`). No services needed.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use vantage_agent::probe::Prober;
use vantage_agent::target::Target;
use vantage_proto::{Outcome, Phase, RegexOutcome};
use vantage_tests::target::TargetServer;
use vantage_tests::tls::TestCa;

fn target(url: &str, timeout_ms: u64, regex: Option<&str>) -> Target {
    let mut t = Target::for_url(1, url).unwrap();
    t.timeout = Duration::from_millis(timeout_ms);
    t.regex = regex.map(|r| regex_lite::Regex::new(r).unwrap());
    t
}

#[tokio::test]
async fn ok_response_is_up_with_phases() {
    let server = TargetServer::start("127.0.0.1:0").await.unwrap();
    let m = Prober::new()
        .probe(&target(
            &server.url("/?delay_ms=20"),
            2000,
            Some("target: ok"),
        ))
        .await;
    assert_eq!(m.outcome, Outcome::Up);
    assert_eq!(m.status, 200);
    assert_eq!(m.regex, RegexOutcome::Matched);
    assert_eq!(m.dns, None, "IP literal: no DNS phase");
    assert!(m.tls.is_none());
    let (connect, ttfb) = (m.connect.unwrap(), m.ttfb.unwrap());
    assert!(
        connect > Duration::ZERO && ttfb >= Duration::from_millis(20),
        "{m:?}"
    );
    assert!(connect + ttfb <= m.total, "{m:?}");
    assert_eq!(m.body_bytes as usize, vantage_tests::target::BODY.len());
}

#[tokio::test]
async fn error_status_is_a_result_not_an_error() {
    let server = TargetServer::start("127.0.0.1:0").await.unwrap();
    let prober = Prober::new();
    for status in [404u16, 500] {
        let m = prober
            .probe(&target(
                &server.url(&format!("/?status={status}")),
                2000,
                None,
            ))
            .await;
        assert_eq!(m.status, status);
        assert_eq!(m.outcome, Outcome::StatusNotAccepted);
        assert_eq!(m.regex, RegexOutcome::NotConfigured);
    }
}

#[tokio::test]
async fn regex_not_matched_is_its_own_outcome() {
    let server = TargetServer::start("127.0.0.1:0").await.unwrap();
    let m = Prober::new()
        .probe(&target(&server.url("/"), 2000, Some("absent")))
        .await;
    assert_eq!(
        (m.outcome, m.regex),
        (Outcome::RegexNotMatched, RegexOutcome::NotMatched)
    );
}

#[tokio::test]
async fn connection_refused() {
    // Bind then drop: the port is (very likely) closed now.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let m = Prober::new()
        .probe(&target(&format!("http://127.0.0.1:{port}/"), 2000, None))
        .await;
    assert_eq!(m.outcome, Outcome::ConnectRefused);
    assert_eq!(m.status, 0);
}

#[tokio::test]
async fn unresolvable_name_is_dns_failure() {
    // `.invalid` is reserved (RFC 2606) and never resolves.
    let m = Prober::new()
        .probe(&target("http://no-such-host.invalid/", 5000, None))
        .await;
    assert_eq!(m.outcome, Outcome::DnsNoSuchName, "{m:?}");
    assert_eq!(m.failed_phase, Some(Phase::Dns));
}

#[tokio::test]
async fn silent_server_times_out_near_the_deadline() {
    // Accepts and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let m = Prober::new()
        .probe(&target(&format!("http://{addr}/"), 300, None))
        .await;
    assert_eq!(m.outcome, Outcome::Timeout);
    assert!(m.connect.is_some() && m.ttfb.is_none(), "{m:?}");
    // Generous margin: this checks the deadline is enforced, not the machine's speed.
    assert!(
        m.total >= Duration::from_millis(300) && m.total < Duration::from_secs(3),
        "{m:?}"
    );
}

#[tokio::test]
async fn reset_mid_response_is_connection_reset() {
    // Sends half a response, then closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        if let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\npartial")
                .await;
        }
    });
    let m = Prober::new()
        .probe(&target(&format!("http://{addr}/"), 2000, None))
        .await;
    assert_eq!(m.outcome, Outcome::ConnectionReset, "{m:?}");
    assert_eq!(m.status, 200);
}

#[tokio::test]
async fn garbage_response_is_protocol_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        if let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
        }
    });
    let m = Prober::new()
        .probe(&target(&format!("http://{addr}/"), 2000, None))
        .await;
    assert_eq!(m.outcome, Outcome::ProtocolError, "{m:?}");
}

// ---- Accepted status codes (case 2) -------------------------------------------------------

#[tokio::test]
async fn accepted_status_is_configurable() {
    let server = TargetServer::start("127.0.0.1:0").await.unwrap();
    let mut t = target(&server.url("/?status=404"), 2000, None);
    t.accepted_status = vec![200..=299, 404..=404];
    let m = Prober::new().probe(&t).await;
    assert_eq!((m.status, m.outcome), (404, Outcome::Up));
}

// ---- Redirects (case 3) --------------------------------------------------------------------

#[tokio::test]
async fn redirects_are_followed_and_counted() {
    let server = TargetServer::start("127.0.0.1:0").await.unwrap();
    let m = Prober::new()
        .probe(&target(
            &server.url("/?redirect=3"),
            2000,
            Some("target: ok"),
        ))
        .await;
    assert_eq!(
        (m.status, m.redirects, m.outcome),
        (200, 3, Outcome::Up),
        "{m:?}"
    );
    // Phases are those of the final hop; the total covers all four requests.
    assert!(m.connect.unwrap() + m.ttfb.unwrap() <= m.total);
}

#[tokio::test]
async fn redirect_loop_stops_at_the_limit() {
    let server = TargetServer::start("127.0.0.1:0").await.unwrap();
    let mut t = target(&server.url("/?loop=1"), 2000, None);
    t.max_redirects = 4;
    let m = Prober::new().probe(&t).await;
    assert_eq!((m.status, m.redirects), (302, 4), "{m:?}");
    assert_eq!(m.outcome, Outcome::StatusNotAccepted);
}

#[tokio::test]
async fn dont_follow_records_the_redirect_itself() {
    let server = TargetServer::start("127.0.0.1:0").await.unwrap();
    let mut t = target(&server.url("/?redirect=1"), 2000, None);
    t.max_redirects = 0;
    t.accepted_status = vec![200..=399];
    let m = Prober::new().probe(&t).await;
    assert_eq!(
        (m.status, m.redirects, m.outcome),
        (302, 0, Outcome::Up),
        "{m:?}"
    );
}

// ---- Hanging servers (case 4) --------------------------------------------------------------

#[tokio::test]
async fn stalled_body_times_out_in_the_body_phase() {
    let server = TargetServer::start("127.0.0.1:0").await.unwrap();
    let m = Prober::new()
        .probe(&target(&server.url("/?stall=1"), 300, None))
        .await;
    assert_eq!(
        (m.outcome, m.failed_phase),
        (Outcome::Timeout, Some(Phase::Body)),
        "{m:?}"
    );
    assert_eq!(m.status, 200);
    assert!(m.ttfb.is_some());
    assert!(
        m.total >= Duration::from_millis(300) && m.total < Duration::from_secs(3),
        "{m:?}"
    );
}

#[tokio::test]
async fn slow_drip_times_out_in_the_body_phase() {
    let server = TargetServer::start("127.0.0.1:0").await.unwrap();
    let m = Prober::new()
        .probe(&target(&server.url("/?drip_ms=50"), 400, None))
        .await;
    assert_eq!(
        (m.outcome, m.failed_phase),
        (Outcome::Timeout, Some(Phase::Body)),
        "{m:?}"
    );
}

#[tokio::test]
async fn a_hanging_target_does_not_delay_another() {
    let server = TargetServer::start("127.0.0.1:0").await.unwrap();
    let prober = Prober::new();
    let hanging = target(&server.url("/?stall=1"), 2000, None);
    let fast = target(&server.url("/"), 2000, None);
    let hang = tokio::spawn({
        let p = prober.clone();
        async move { p.probe(&hanging).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let m = prober.probe(&fast).await;
    assert_eq!(m.outcome, Outcome::Up);
    // The fast probe finished while the hanging one is still waiting for its deadline.
    assert!(!hang.is_finished());
    assert_eq!(hang.await.unwrap().outcome, Outcome::Timeout);
}

// ---- TLS (case 6) --------------------------------------------------------------------------

fn ca_file(ca: &TestCa, name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("vantage-ca-{}-{name}.pem", std::process::id()));
    ca.write_pem(&path);
    path
}

#[tokio::test]
async fn self_signed_certificate_is_untrusted_by_default() {
    let leaf = vantage_tests::tls::self_signed(&["localhost"]);
    let server = TargetServer::start_tls("127.0.0.1:0", leaf.server_config())
        .await
        .unwrap();
    let m = Prober::new()
        .probe(&target(&server.url_with_host("localhost", "/"), 2000, None))
        .await;
    assert_eq!(
        (m.outcome, m.failed_phase),
        (Outcome::TlsUntrusted, Some(Phase::Tls)),
        "{m:?}"
    );
}

#[tokio::test]
async fn ca_file_makes_the_certificate_trusted_and_expiry_is_recorded() {
    let ca = TestCa::new();
    let leaf = ca.leaf(&["localhost"], (2020, 1, 1), (2099, 6, 30));
    let server = TargetServer::start_tls("127.0.0.1:0", leaf.server_config())
        .await
        .unwrap();
    let mut t = target(
        &server.url_with_host("localhost", "/"),
        2000,
        Some("target: ok"),
    );
    t.tls = Some(vantage_agent::tls::config_with_ca_file(&ca_file(&ca, "trusted")).unwrap());
    let m = Prober::new().probe(&t).await;
    assert_eq!(m.outcome, Outcome::Up, "{m:?}");
    assert!(m.tls.is_some() && m.dns.is_some());
    assert_eq!(m.cert_not_after_s, Some(leaf.not_after_unix));
    assert_eq!(m.cert_not_after_s, Some(4_086_460_800)); // 2099-06-30T00:00:00Z
}

#[tokio::test]
async fn expired_certificate_and_wrong_name_are_distinct_kinds() {
    let ca = TestCa::new();
    let tls = vantage_agent::tls::config_with_ca_file(&ca_file(&ca, "kinds")).unwrap();

    let expired = ca.leaf(&["localhost"], (2020, 1, 1), (2021, 1, 1));
    let server = TargetServer::start_tls("127.0.0.1:0", expired.server_config())
        .await
        .unwrap();
    let mut t = target(&server.url_with_host("localhost", "/"), 2000, None);
    t.tls = Some(tls.clone());
    assert_eq!(Prober::new().probe(&t).await.outcome, Outcome::TlsExpired);

    let other_name = ca.leaf(&["example.internal"], (2020, 1, 1), (2099, 1, 1));
    let server = TargetServer::start_tls("127.0.0.1:0", other_name.server_config())
        .await
        .unwrap();
    let mut t = target(&server.url_with_host("localhost", "/"), 2000, None);
    t.tls = Some(tls);
    assert_eq!(
        Prober::new().probe(&t).await.outcome,
        Outcome::TlsHostnameMismatch
    );
}

#[tokio::test]
async fn skip_verify_is_an_explicit_opt_in() {
    let leaf = vantage_tests::tls::self_signed(&["localhost"]);
    let server = TargetServer::start_tls("127.0.0.1:0", leaf.server_config())
        .await
        .unwrap();
    let mut t = target(&server.url_with_host("localhost", "/"), 2000, None);
    t.tls = Some(vantage_agent::tls::skip_verify_config());
    let m = Prober::new().probe(&t).await;
    assert_eq!(m.outcome, Outcome::Up, "{m:?}");
    assert_eq!(m.cert_not_after_s, Some(leaf.not_after_unix));
}

// ---- Regex, body cap, gzip (cases 7, 8, 9) -------------------------------------------------

#[tokio::test]
async fn regex_finds_a_match_split_across_chunks() {
    let server = TargetServer::start("127.0.0.1:0").await.unwrap();
    let m = Prober::new()
        .probe(&target(&server.url("/?split=1"), 2000, Some("target: ok")))
        .await;
    assert_eq!(
        (m.outcome, m.regex),
        (Outcome::Up, RegexOutcome::Matched),
        "{m:?}"
    );
}

#[tokio::test]
async fn invalid_utf8_does_not_hide_the_text() {
    let server = TargetServer::start("127.0.0.1:0").await.unwrap();
    let m = Prober::new()
        .probe(&target(
            &server.url("/?bad_utf8=1"),
            2000,
            Some("target: ok"),
        ))
        .await;
    assert_eq!(m.regex, RegexOutcome::Matched, "{m:?}");
}

#[tokio::test]
async fn body_over_the_cap_is_truncated() {
    let server = TargetServer::start("127.0.0.1:0").await.unwrap();
    let mut t = target(&server.url("/?size=200000"), 2000, Some("no such text"));
    t.body_cap = 10_000;
    let m = Prober::new().probe(&t).await;
    assert_eq!(m.body_bytes, 10_000);
    assert!(m.body_truncated);
    assert_eq!(
        (m.outcome, m.regex),
        (Outcome::BodyTruncated, RegexOutcome::NotMatched)
    );
    // Without a regex the cap holds too, and a truncated body is still up.
    let mut t = target(&server.url("/?size=200000"), 2000, None);
    t.body_cap = 10_000;
    let m = Prober::new().probe(&t).await;
    assert_eq!(
        (m.body_bytes, m.body_truncated, m.outcome),
        (10_000, true, Outcome::Up)
    );
}

#[tokio::test]
async fn gzip_body_is_decoded_before_matching() {
    let server = TargetServer::start("127.0.0.1:0").await.unwrap();
    let m = Prober::new()
        .probe(&target(&server.url("/?gzip=1"), 2000, Some("target: ok")))
        .await;
    assert_eq!(m.regex, RegexOutcome::Matched, "{m:?}");
    // body_bytes counts what crossed the wire (compressed).
    assert!(m.body_bytes > 0 && (m.body_bytes as usize) != vantage_tests::target::BODY.len());
}

// ---- IP family (issue: record the address used) --------------------------------------------

#[tokio::test]
async fn ip_family_filters_addresses_and_the_address_is_recorded() {
    let server = TargetServer::start("127.0.0.1:0").await.unwrap();
    let mut t = target(&server.url_with_host("localhost", "/"), 2000, None);
    t.ip_family = vantage_agent::target::IpFamily::Ipv4;
    let m = Prober::new().probe(&t).await;
    assert_eq!(m.outcome, Outcome::Up, "{m:?}");
    assert_eq!(m.remote_ip, Some("127.0.0.1".parse().unwrap()));
    // An IPv4 literal with ipv6 required has no usable address.
    let mut t = target(&server.url("/"), 2000, None);
    t.ip_family = vantage_agent::target::IpFamily::Ipv6;
    assert_eq!(
        Prober::new().probe(&t).await.outcome,
        Outcome::DnsNoSuchName
    );
}
