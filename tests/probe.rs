//! The probe engine against local servers started by the test: TESTING.md cases 1–9 (case 10,
//! the scheduler, is unit-tested in `agent/src/scheduler.rs`), and the hostile servers of
//! cases 28–29 (issue 13). No services needed.

use std::sync::Arc;
use std::time::Duration;

use vantage_agent::probe::{Measurement, Prober};
use vantage_agent::target::Target;
use vantage_proto::{Outcome, Phase, RegexOutcome};
use vantage_tests::target::{RawServer, Step, TargetServer};
use vantage_tests::tls::TestCa;

fn target(url: &str, timeout_ms: u64, regex: Option<&str>) -> Target {
    let mut t = Target::for_url(1, url).unwrap();
    t.timeout = Duration::from_millis(timeout_ms);
    t.regex = regex.map(|r| regex_lite::Regex::new(r).unwrap());
    t
}

/// The probe of `target(url, timeout_ms, regex)` by a new prober.
async fn probe(url: &str, timeout_ms: u64, regex: Option<&str>) -> Measurement {
    Prober::new().probe(&target(url, timeout_ms, regex)).await
}

/// A [`TargetServer`] on a free loopback port.
async fn local_target() -> TargetServer {
    TargetServer::start("127.0.0.1:0").await.unwrap()
}

/// A [`TargetServer`] speaking TLS with `config` on a free loopback port.
async fn tls_target(config: Arc<rustls::ServerConfig>) -> TargetServer {
    TargetServer::start_tls("127.0.0.1:0", config)
        .await
        .unwrap()
}

/// A [`RawServer`] playing `script` on a free loopback port.
async fn raw(script: Vec<Step>) -> RawServer {
    RawServer::start(script).await.unwrap()
}

/// A loopback port that was free a moment ago (bound, then dropped): (very likely) closed.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `m` failed with `outcome` in `phase`; `case` (may be empty) names the case in the message.
#[track_caller]
fn assert_failed(m: &Measurement, outcome: Outcome, phase: Phase, case: &str) {
    assert_eq!(
        (m.outcome, m.failed_phase),
        (outcome, Some(phase)),
        "{case}: {m:?}"
    );
}

#[tokio::test]
async fn ok_response_is_up_with_phases() {
    let server = local_target().await;
    let m = probe(&server.url("/?delay_ms=20"), 2000, Some("target: ok")).await;
    assert_eq!(m.outcome, Outcome::Up);
    assert_eq!(m.status, 200);
    assert_eq!(m.regex, RegexOutcome::Matched);
    assert_eq!(m.dns_us, None, "IP literal: no DNS phase");
    assert!(m.tls_us.is_none());
    let (connect, ttfb) = (m.connect_us.unwrap(), m.ttfb_us.unwrap());
    assert!(connect > 0 && ttfb >= 20_000, "{m:?}");
    assert!(connect + ttfb <= m.total_us, "{m:?}");
    assert_eq!(m.body_bytes as usize, vantage_tests::target::BODY.len());
}

#[tokio::test]
async fn error_status_is_a_result_not_an_error() {
    let server = local_target().await;
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
    let server = local_target().await;
    let m = probe(&server.url("/"), 2000, Some("absent")).await;
    assert_eq!(
        (m.outcome, m.regex),
        (Outcome::RegexNotMatched, RegexOutcome::NotMatched)
    );
}

#[tokio::test]
async fn connection_refused() {
    // Bind then drop: the port is (very likely) closed now.
    let port = free_port();
    let m = probe(&format!("http://127.0.0.1:{port}/"), 2000, None).await;
    assert_eq!(m.outcome, Outcome::ConnectRefused);
    assert_eq!(m.status, 0);
}

#[tokio::test]
async fn unresolvable_name_is_dns_failure() {
    // `.invalid` is reserved (RFC 2606) and never resolves.
    let m = probe("http://no-such-host.invalid/", 5000, None).await;
    assert_eq!(m.outcome, Outcome::DnsNoSuchName, "{m:?}");
    assert_eq!(m.failed_phase, Some(Phase::Dns));
}

#[tokio::test]
async fn silent_server_times_out_near_the_deadline() {
    // Accepts and never answers.
    let server = raw(vec![Step::Hold]).await;
    let m = probe(&server.url("/"), 300, None).await;
    assert_eq!(m.outcome, Outcome::Timeout);
    assert!(m.connect_us.is_some() && m.ttfb_us.is_none(), "{m:?}");
    // Generous margin: this checks the deadline is enforced, not the machine's speed.
    assert!(m.total_us >= 300_000 && m.total_us < 3_000_000, "{m:?}");
}

#[tokio::test]
async fn reset_mid_response_is_connection_reset() {
    // Sends half a response, then closes.
    let server = raw(vec![Step::text(
        "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\npartial",
    )])
    .await;
    let m = probe(&server.url("/"), 2000, None).await;
    assert_eq!(m.outcome, Outcome::ConnectionReset, "{m:?}");
    assert_eq!(m.status, 200);
    assert_eq!(m.body_bytes, 7, "\"partial\" arrived: {m:?}");
}

#[tokio::test]
async fn garbage_response_is_protocol_error() {
    let server = raw(vec![Step::text("SSH-2.0-OpenSSH_9.2\r\n\r\n")]).await;
    let m = probe(&server.url("/"), 2000, None).await;
    assert_eq!(m.outcome, Outcome::ProtocolError, "{m:?}");
}

// ---- Accepted status codes (case 2) -------------------------------------------------------

#[tokio::test]
async fn accepted_status_is_configurable() {
    let server = local_target().await;
    let mut t = target(&server.url("/?status=404"), 2000, None);
    t.accepted_status = vec![200..=299, 404..=404];
    let m = Prober::new().probe(&t).await;
    assert_eq!((m.status, m.outcome), (404, Outcome::Up));
}

// ---- Redirects (case 3) --------------------------------------------------------------------

#[tokio::test]
async fn redirects_are_followed_and_counted() {
    let server = local_target().await;
    let m = probe(&server.url("/?redirect=3"), 2000, Some("target: ok")).await;
    assert_eq!(
        (m.status, m.redirects, m.outcome),
        (200, 3, Outcome::Up),
        "{m:?}"
    );
    // Phases are those of the final hop; the total covers all four requests.
    assert!(m.connect_us.unwrap() + m.ttfb_us.unwrap() <= m.total_us);
}

#[tokio::test]
async fn redirect_loop_stops_at_the_limit() {
    let server = local_target().await;
    let mut t = target(&server.url("/?loop=1"), 2000, None);
    t.max_redirects = 4;
    let m = Prober::new().probe(&t).await;
    assert_eq!((m.status, m.redirects), (302, 4), "{m:?}");
    // The same URL came back: a loop, not just a long chain.
    assert_eq!(m.outcome, Outcome::RedirectLoop, "{m:?}");
    assert!(m.detail.unwrap().contains("already requested"));
}

#[tokio::test]
async fn dont_follow_records_the_redirect_itself() {
    let server = local_target().await;
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
    let server = local_target().await;
    let m = probe(&server.url("/?stall=1"), 300, None).await;
    assert_failed(&m, Outcome::Timeout, Phase::Body, "");
    assert_eq!(m.status, 200);
    assert!(m.ttfb_us.is_some());
    assert!(m.total_us >= 300_000 && m.total_us < 3_000_000, "{m:?}");
}

#[tokio::test]
async fn slow_drip_times_out_in_the_body_phase() {
    let server = local_target().await;
    let m = probe(&server.url("/?drip_ms=50"), 400, None).await;
    assert_failed(&m, Outcome::Timeout, Phase::Body, "");
}

#[tokio::test]
async fn a_hanging_target_does_not_delay_another() {
    let server = local_target().await;
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
    let server = tls_target(leaf.server_config()).await;
    let m = probe(&server.url_with_host("localhost", "/"), 2000, None).await;
    assert_failed(&m, Outcome::TlsUntrusted, Phase::Tls, "");
}

#[tokio::test]
async fn ca_file_makes_the_certificate_trusted_and_expiry_is_recorded() {
    let ca = TestCa::new();
    let leaf = ca.leaf(&["localhost"], (2020, 1, 1), (2099, 6, 30));
    let server = tls_target(leaf.server_config()).await;
    let mut t = target(
        &server.url_with_host("localhost", "/"),
        2000,
        Some("target: ok"),
    );
    t.tls = Some(vantage_agent::probe_tls::config_with_ca_file(&ca_file(&ca, "trusted")).unwrap());
    let m = Prober::new().probe(&t).await;
    assert_eq!(m.outcome, Outcome::Up, "{m:?}");
    assert!(m.tls_us.is_some() && m.dns_us.is_some());
    assert_eq!(m.cert_not_after_s, Some(leaf.not_after_unix));
    assert_eq!(m.cert_not_after_s, Some(4_086_460_800)); // 2099-06-30T00:00:00Z
}

#[tokio::test]
async fn expired_certificate_and_wrong_name_are_distinct_kinds() {
    let ca = TestCa::new();
    let tls = vantage_agent::probe_tls::config_with_ca_file(&ca_file(&ca, "kinds")).unwrap();

    let expired = ca.leaf(&["localhost"], (2020, 1, 1), (2021, 1, 1));
    let server = tls_target(expired.server_config()).await;
    let mut t = target(&server.url_with_host("localhost", "/"), 2000, None);
    t.tls = Some(tls.clone());
    assert_eq!(Prober::new().probe(&t).await.outcome, Outcome::TlsExpired);

    let other_name = ca.leaf(&["example.internal"], (2020, 1, 1), (2099, 1, 1));
    let server = tls_target(other_name.server_config()).await;
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
    let server = tls_target(leaf.server_config()).await;
    let mut t = target(&server.url_with_host("localhost", "/"), 2000, None);
    t.tls = Some(vantage_agent::probe_tls::skip_verify_config());
    let m = Prober::new().probe(&t).await;
    assert_eq!(m.outcome, Outcome::Up, "{m:?}");
    assert_eq!(m.cert_not_after_s, Some(leaf.not_after_unix));
}

// ---- Regex, body cap, gzip (cases 7, 8, 9) -------------------------------------------------

#[tokio::test]
async fn regex_finds_a_match_split_across_chunks() {
    let server = local_target().await;
    let m = probe(&server.url("/?split=1"), 2000, Some("target: ok")).await;
    assert_eq!(
        (m.outcome, m.regex),
        (Outcome::Up, RegexOutcome::Matched),
        "{m:?}"
    );
}

#[tokio::test]
async fn invalid_utf8_does_not_hide_the_text() {
    let server = local_target().await;
    let m = probe(&server.url("/?bad_utf8=1"), 2000, Some("target: ok")).await;
    assert_eq!(m.regex, RegexOutcome::Matched, "{m:?}");
}

#[tokio::test]
async fn body_over_the_cap_is_truncated() {
    let server = local_target().await;
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
    let server = local_target().await;
    let m = probe(&server.url("/?gzip=1"), 2000, Some("target: ok")).await;
    assert_eq!(m.regex, RegexOutcome::Matched, "{m:?}");
    // body_bytes counts what crossed the wire (compressed).
    assert!(m.body_bytes > 0 && (m.body_bytes as usize) != vantage_tests::target::BODY.len());
}

// ---- IP family (issue: record the address used) --------------------------------------------

#[tokio::test]
async fn ip_family_filters_addresses_and_the_address_is_recorded() {
    let server = local_target().await;
    let mut t = target(&server.url_with_host("localhost", "/"), 2000, None);
    t.ip_family = vantage_agent::target::IpFamily::Ipv4;
    let m = Prober::new().probe(&t).await;
    assert_eq!(m.outcome, Outcome::Up, "{m:?}");
    assert_eq!(
        m.remote_ip,
        Some("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into())
    );
    // An IPv4 literal with ipv6 required has no usable address.
    let mut t = target(&server.url("/"), 2000, None);
    t.ip_family = vantage_agent::target::IpFamily::Ipv6;
    assert_eq!(
        Prober::new().probe(&t).await.outcome,
        Outcome::DnsNoSuchName
    );
}

// ---- Hostile servers (TESTING.md cases 28, 29; issue 13) -----------------------------------

/// `url` with every byte that is not unreserved percent-encoded (a query parameter value).
fn encode(url: &str) -> String {
    url.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn with_headers(mut t: Target, headers: &[(&str, &str)]) -> Target {
    for (n, v) in headers {
        t.headers.push((n.parse().unwrap(), v.parse().unwrap()));
    }
    t
}

const SECRETS: [(&str, &str); 5] = [
    ("authorization", "Bearer s3cret"),
    ("cookie", "session=s3cret"),
    ("proxy-authorization", "Basic czNjcmV0"),
    ("host", "a.example"),
    ("x-custom", "kept"),
];

#[tokio::test]
async fn cross_origin_redirect_drops_credentials_and_host() {
    // A (this port) → B (another port: another origin) → back to A.
    let a = local_target().await;
    let b = local_target().await;
    let back = a.url("/final");
    let to_b = b.url(&format!("/b?redirect_to={}", encode(&back)));
    let t = with_headers(
        target(
            &a.url(&format!("/a?redirect_to={}", encode(&to_b))),
            2000,
            None,
        ),
        &SECRETS,
    );
    let m = Prober::new().probe(&t).await;
    assert_eq!((m.outcome, m.redirects), (Outcome::Up, 2), "{m:?}");

    let at_a = a.seen();
    assert_eq!(at_a.len(), 2, "{at_a:?}");
    for (name, value) in SECRETS {
        assert_eq!(at_a[0].header(name), Some(value), "first hop: {name}");
    }
    let at_b = b.seen();
    assert_eq!(at_b.len(), 1, "{at_b:?}");
    for name in ["authorization", "cookie", "proxy-authorization"] {
        assert_eq!(
            at_b[0].header(name),
            None,
            "{name} followed the redirect to B"
        );
    }
    let b_host = format!("127.0.0.1:{}", b.addr.port());
    assert_eq!(at_b[0].header("host"), Some(b_host.as_str()));
    // Other custom headers are not credentials (as curl and browsers do, they follow).
    assert_eq!(at_b[0].header("x-custom"), Some("kept"));
    // Once the chain left the origin, credentials stay dropped, even back at A.
    assert_eq!(at_a[1].target, "/final");
    assert_eq!(at_a[1].header("authorization"), None);
    let a_host = format!("127.0.0.1:{}", a.addr.port());
    assert_eq!(at_a[1].header("host"), Some(a_host.as_str()));
}

#[tokio::test]
async fn same_origin_redirect_keeps_the_headers() {
    let a = local_target().await;
    let t = with_headers(target(&a.url("/?redirect=1"), 2000, None), &SECRETS);
    let m = Prober::new().probe(&t).await;
    assert_eq!((m.outcome, m.redirects), (Outcome::Up, 1), "{m:?}");
    let seen = a.seen();
    assert_eq!(seen.len(), 2);
    for (name, value) in SECRETS {
        assert_eq!(seen[1].header(name), Some(value), "second hop: {name}");
    }
}

#[tokio::test]
async fn https_to_http_redirect_is_refused() {
    let plain = local_target().await;
    let leaf = vantage_tests::tls::self_signed(&["localhost"]);
    let secure = tls_target(leaf.server_config()).await;
    let url = secure.url_with_host(
        "localhost",
        &format!("/?redirect_to={}", encode(&plain.url("/"))),
    );
    let mut t = with_headers(target(&url, 2000, None), &SECRETS[..1]);
    t.tls = Some(vantage_agent::probe_tls::skip_verify_config());
    let m = Prober::new().probe(&t).await;
    assert_eq!(m.outcome, Outcome::DowngradeRefused, "{m:?}");
    assert_eq!((m.status, m.redirects), (302, 0), "{m:?}");
    assert!(plain.seen().is_empty(), "the http hop was sent");
    assert!(m.detail.unwrap().contains("allow_downgrade"));

    // Opted in: followed, and (another origin) without the credentials.
    t.allow_downgrade = true;
    let m = Prober::new().probe(&t).await;
    assert_eq!((m.outcome, m.redirects), (Outcome::Up, 1), "{m:?}");
    let seen = plain.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("authorization"), None);
}

#[tokio::test]
async fn ipv6_literal_sends_a_valid_host_header() {
    // Checked first: `::1` is configured on nearly every machine, but not inside every container.
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        eprintln!("SKIPPED ipv6_literal_sends_a_valid_host_header: cannot bind [::1]: {e}");
        return;
    }
    let server = TargetServer::start("[::1]:0").await.unwrap();
    let url = server.url("/");
    assert!(url.starts_with("http://[::1]:"), "{url}");
    let m = probe(&url, 2000, None).await;
    let host = format!("[::1]:{}", server.addr.port());
    let seen = server.seen();
    assert_eq!(seen[0].header("host"), Some(host.as_str()));
    assert_eq!((m.outcome, m.status), (Outcome::Up, 200), "{m:?}");
}

/// A gzip body of `decoded` zero bytes (a decompression bomb: about 1,000 : 1).
fn gzip_zeros(decoded: usize) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = vec![0u8; 1 << 20];
    let mut left = decoded;
    while left > 0 {
        let n = left.min(chunk.len());
        enc.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    enc.finish().unwrap()
}

fn gzip(text: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(text).unwrap();
    enc.finish().unwrap()
}

/// A 200 response with `body` as its content (exact length) and extra header lines.
fn response(headers: &str, body: &[u8]) -> Vec<Step> {
    let mut head = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    head.extend_from_slice(body);
    vec![Step::Send(head)]
}

#[tokio::test]
async fn gzip_bomb_ends_at_the_deadline_as_a_check_timeout() {
    let bomb = gzip_zeros(64 << 20);
    let server = raw(response("content-encoding: gzip\r\n", &bomb)).await;
    // A regex that makes the scan of 64 MiB slow.
    let mut t = target(&server.url("/"), 1000, Some("(a|b|c|d|e)+z$"));
    t.body_cap = vantage_agent::target::MAX_BODY_CAP;
    let started = std::time::Instant::now();
    let m = Prober::new().probe(&t).await;
    let took = started.elapsed();
    assert_failed(&m, Outcome::Timeout, Phase::Check, "");
    // Generous margin: the deadline is what is checked, not the machine's speed.
    assert!(took < Duration::from_millis(1500), "took {took:?}: {m:?}");
    assert_eq!(m.body_bytes as usize, bomb.len());
}

#[tokio::test]
async fn gzip_decoded_past_the_cap_is_truncated() {
    let server = local_target().await;
    let mut t = target(
        &server.url("/?size=200000&gzip=1"),
        2000,
        Some("no such text"),
    );
    t.body_cap = 10_000;
    let m = Prober::new().probe(&t).await;
    assert!(
        m.body_bytes < 10_000,
        "compressed body within the cap: {m:?}"
    );
    assert!(m.body_truncated, "decoded body was cut at the cap: {m:?}");
    assert_eq!(m.outcome, Outcome::BodyTruncated, "{m:?}");
}

#[tokio::test]
async fn corrupt_or_truncated_gzip_is_a_content_encoding_error() {
    let text = vantage_tests::target::BODY.repeat(200);
    let gz = gzip(text.as_bytes());
    let cases: [(&str, Vec<u8>); 3] = [
        ("not gzip at all", text.as_bytes().to_vec()),
        ("cut by the server", gz[..gz.len() / 2].to_vec()),
        ("bad checksum", {
            let mut bad = gz.clone();
            let crc = bad.len() - 8;
            bad[crc] ^= 0xFF;
            bad
        }),
    ];
    for (case, body) in cases {
        let server = raw(response("content-encoding: gzip\r\n", &body)).await;
        let m = probe(&server.url("/"), 2000, Some("target: ok")).await;
        assert_failed(&m, Outcome::BadContentEncoding, Phase::Check, case);
        assert!(m.detail.is_some(), "{case}");
        assert_eq!(m.status, 200, "{case}");
    }
}

#[tokio::test]
async fn self_signed_ca_certificate_is_untrusted() {
    // CA:TRUE, like `openssl req -x509`: webpki says CaUsedAsEndEntity, not UnknownIssuer.
    let cert = vantage_tests::tls::self_signed_ca(&["localhost"]);
    let server = tls_target(cert.server_config()).await;
    let m = probe(&server.url_with_host("localhost", "/"), 2000, None).await;
    assert_failed(&m, Outcome::TlsUntrusted, Phase::Tls, "");
}

#[tokio::test]
async fn openssl_self_signed_certificate_is_untrusted() {
    let dir = std::env::temp_dir().join(format!("vantage-openssl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED openssl_self_signed_certificate_is_untrusted: no working openssl");
        return;
    }
    let port = free_port();
    let mut server = tokio::process::Command::new("openssl")
        .args(["s_server", "-www", "-quiet", "-accept"])
        .arg(port.to_string())
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut ready = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "openssl s_server did not start on port {port}");
    let m = probe(&format!("https://localhost:{port}/"), 3000, None).await;
    let _ = server.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_failed(&m, Outcome::TlsUntrusted, Phase::Tls, "");
}

#[tokio::test]
async fn broken_chunked_encoding_is_protocol_error() {
    let server = raw(vec![Step::text(
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n",
    )]).await;
    let m = probe(&server.url("/"), 2000, None).await;
    assert_failed(&m, Outcome::ProtocolError, Phase::Body, "");
    assert_eq!((m.status, m.body_bytes), (200, 5), "{m:?}");
    // Not a dead end: the detail says what was wrong.
    let detail = m.detail.unwrap();
    assert!(detail.contains("chunk"), "{detail}");
}

#[tokio::test]
async fn failures_while_reading_headers_name_the_headers_phase() {
    let cases = [
        (
            "garbage",
            vec![Step::text("SSH-2.0-OpenSSH_9.2\r\n\r\n")],
            Outcome::ProtocolError,
        ),
        (
            "closed mid-headers",
            vec![Step::text("HTTP/1.1 200 OK\r\ncontent-le")],
            Outcome::ConnectionReset,
        ),
        (
            "stalled mid-headers",
            vec![Step::text("HTTP/1.1 200 OK\r\ncontent-le"), Step::Hold],
            Outcome::Timeout,
        ),
        (
            "endless headers",
            (0..20_000)
                .map(|i| Step::text(&format!("x-filler-{i}: {}\r\n", "y".repeat(40))))
                .fold(vec![Step::text("HTTP/1.1 200 OK\r\n")], |mut v, s| {
                    v.push(s);
                    v
                }),
            Outcome::ProtocolError,
        ),
    ];
    for (case, script, outcome) in cases {
        let server = raw(script).await;
        let m = probe(&server.url("/"), 500, None).await;
        assert_failed(&m, outcome, Phase::Headers, case);
        assert!(m.detail.is_some(), "{case}");
        assert!(m.ttfb_us.is_some(), "{case}: the first byte arrived: {m:?}");
        assert_eq!(m.status, 0, "{case}");
    }
}

#[tokio::test]
async fn redirect_limit_has_its_own_outcome() {
    let server = local_target().await;
    for accepted in [200..=299, 200..=399] {
        let mut t = target(&server.url("/?redirect=20"), 2000, None);
        t.max_redirects = 10;
        t.accepted_status = vec![accepted.clone()];
        let m = Prober::new().probe(&t).await;
        assert_eq!(
            (m.outcome, m.status, m.redirects),
            (Outcome::TooManyRedirects, 302, 10),
            "accepted {accepted:?}: {m:?}"
        );
        assert_eq!(m.failed_phase, None, "a response arrived");
    }
}

#[tokio::test]
async fn ttfb_is_the_final_responses_first_byte_after_interim_responses() {
    for interim in [
        "HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n",
        "HTTP/1.1 100 Continue\r\n\r\n",
    ] {
        let server = raw(vec![
            Step::text(interim),
            Step::Pause(Duration::from_millis(300)),
            Step::text("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        ])
        .await;
        let m = probe(&server.url("/"), 2000, None).await;
        assert_eq!((m.outcome, m.status), (Outcome::Up, 200), "{m:?}");
        assert!(
            m.ttfb_us.unwrap() >= 300_000,
            "ttfb measured to the interim response: {m:?}"
        );
    }
}

#[tokio::test]
async fn body_bytes_count_what_arrived_when_the_body_fails() {
    let server = local_target().await;
    let m = probe(&server.url("/?stall=1"), 300, None).await;
    assert_eq!(m.outcome, Outcome::Timeout, "{m:?}");
    assert_eq!(
        m.body_bytes as usize,
        vantage_tests::target::BODY.len() / 2,
        "{m:?}"
    );
}

#[tokio::test]
async fn every_failure_has_a_detail_and_up_has_none() {
    let server = local_target().await;
    let closed = free_port();
    let prober = Prober::new();
    let cases = [
        (target(&server.url("/"), 2000, None), Outcome::Up, None),
        (
            target(&server.url("/?status=500"), 2000, None),
            Outcome::StatusNotAccepted,
            Some("status 500"),
        ),
        (
            target(&server.url("/"), 2000, Some("absent")),
            Outcome::RegexNotMatched,
            Some("regex not found"),
        ),
        (
            target(&format!("http://127.0.0.1:{closed}/"), 2000, None),
            Outcome::ConnectRefused,
            Some("refused"),
        ),
        (
            target("http://no-such-host.invalid/", 5000, None),
            Outcome::DnsNoSuchName,
            Some("no-such-host.invalid"),
        ),
        (
            target(&server.url("/?stall=1"), 200, None),
            Outcome::Timeout,
            Some("phase body"),
        ),
    ];
    for (t, outcome, detail) in cases {
        let m = prober.probe(&t).await;
        assert_eq!(m.outcome, outcome, "{m:?}");
        match detail {
            None => assert_eq!(m.detail, None),
            Some(part) => assert!(
                m.detail.as_deref().is_some_and(|d| d.contains(part)),
                "{part:?} not in {m:?}"
            ),
        }
    }
}
