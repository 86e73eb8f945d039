//! The probe engine against local servers started by the test (TESTING.md cases 1, 2, 4, 5, 7).
//! No services needed.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use vantage_agent::probe::Prober;
use vantage_agent::target::Target;
use vantage_proto::{Outcome, RegexOutcome};
use vantage_tests::target::TargetServer;

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
    assert_eq!(m.failed_phase, Some(vantage_proto::Phase::Dns));
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
