//! The probe engine: one check of one target, measured phase by phase. The target's kind
//! (issue #20) says which: an HTTP(S) request (this file), a TCP connection with an optional
//! banner check (`tcp.rs`), a TLS handshake (`tls.rs`) or a DNS query (`dns.rs`, its own UDP
//! and TCP exchange with a resolver). The first three share the DNS, TCP and TLS
//! phases below ([`resolve`], [`Prober::connect`], [`Prober::handshake`]), the fixed outcomes
//! and one deadline.
//!
//! Each hop's connection is built by hand (DNS, TCP, TLS, then hyper's HTTP/1.1 connection API)
//! rather than through a pooled client, so every probe pays for and measures each phase, the
//! way a new visitor would. One deadline covers the whole probe, redirects and the body check
//! included; each phase runs under `timeout_at` of that deadline, so a timeout names the phase
//! it interrupted.
//!
//! Time to first byte is the first byte *read* from the socket after the request was written
//! (measured by [`FirstByteIo`] under hyper), not "headers complete"; after interim (1xx)
//! responses it is the first byte of the final response. The network clock (`total`) stops at
//! the last body byte: decoding and the regex search run afterwards on threads of their own
//! (`check.rs`), still under the deadline.

mod check;
mod dns;
mod tcp;
mod tls;

pub use check::Leftover;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Body as _;
use hyper::header::{
    HeaderName, ACCEPT_ENCODING, AUTHORIZATION, COOKIE, HOST, LOCATION, PROXY_AUTHORIZATION,
    USER_AGENT,
};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout_at;
use vantage_proto::{Outcome, Phase, ProbeKind, ProbeResult, RegexOutcome};

use crate::probe_tls;
use crate::target::{IpFamily, Target};

/// Sent with every request so target owners can recognise (and allow-list) the monitor.
pub const USER_AGENT_VALUE: &str = concat!("vantage-agent/", env!("CARGO_PKG_VERSION"));

/// Longest [`Measurement::detail`], in bytes.
pub const MAX_DETAIL_LEN: usize = 200;

/// What one probe measured: the wire result as it will be sent (its `seq` is 0 until the
/// uplink numbers it) and, for a person, why it is not up. It reads and writes as the
/// [`ProbeResult`] it holds (`Deref`): the wire fields exist once.
///
/// Phase times, `status`, `remote_ip` and `cert_not_after_s` describe the final hop;
/// `total_us` covers every hop: probe start to the last body byte (the network's part), or to
/// the moment a failed probe failed. The body check is not network time and is not in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurement {
    pub result: ProbeResult,
    /// Why the outcome is not `up`, for a person (at most [`MAX_DETAIL_LEN`] bytes): shown by
    /// `vantage-agent probe` and logged at debug level. It does not travel on the wire (see
    /// docs/probe-engine.md); None when the outcome is `up`.
    pub detail: Option<String>,
}

impl std::ops::Deref for Measurement {
    type Target = ProbeResult;
    fn deref(&self) -> &ProbeResult {
        &self.result
    }
}

impl std::ops::DerefMut for Measurement {
    fn deref_mut(&mut self) -> &mut ProbeResult {
        &mut self.result
    }
}

impl Measurement {
    /// A measurement of nothing yet (outcome `other`): the start of a probe, or, filled in by
    /// the caller, the result of a probe that could not run (`memory_refused`, lib.rs).
    pub fn new(target_id: u32, started_at_ms: u64) -> Measurement {
        Measurement {
            result: ProbeResult::without_response(0, target_id, started_at_ms, Outcome::Other),
            detail: None,
        }
    }

    /// Forgets the per-hop fields before the next hop of a redirect chain.
    fn start_hop(&mut self) {
        let (id, at, redirects) = (self.target_id, self.started_at_ms, self.redirects);
        *self = Measurement::new(id, at);
        self.redirects = redirects;
    }

    /// Ends the probe with `outcome` (`phase` None: a response arrived) and why.
    fn end(&mut self, outcome: Outcome, phase: Option<Phase>, detail: String) {
        self.outcome = outcome;
        self.failed_phase = phase;
        self.detail = Some(bounded(detail));
    }
}

/// A duration in the wire's microseconds (saturating: 71 minutes and more are `u32::MAX`).
pub fn us(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// A failure: its kind, the phase it happened in, and a short detail for people.
#[derive(Debug)]
struct Failure {
    outcome: Outcome,
    phase: Phase,
    detail: String,
}

fn fail(outcome: Outcome, phase: Phase, detail: impl Into<String>) -> Failure {
    Failure {
        outcome,
        phase,
        detail: detail.into(),
    }
}

/// The deadline passed in `phase`.
fn timed_out(phase: Phase, timeout: Duration) -> Failure {
    fail(
        Outcome::Timeout,
        phase,
        format!("deadline ({timeout:?}) passed in phase {}", phase.as_str()),
    )
}

/// How a hop ended when a response arrived.
enum HopEnd {
    /// A redirect to follow (if the limit and the target's settings allow).
    Redirect(url::Url),
    /// The final response, its body read; the check to run on it, if a regex is configured.
    Final(Option<check::Job>),
}

/// The probe engine. Cheap to clone; shares the default TLS configuration.
#[derive(Clone)]
pub struct Prober {
    default_tls: Arc<rustls::ClientConfig>,
    address_policy: crate::netpolicy::AddressPolicy,
}

impl Default for Prober {
    fn default() -> Self {
        Prober::new()
    }
}

impl Prober {
    pub fn new() -> Prober {
        Prober {
            default_tls: probe_tls::default_config(),
            address_policy: Default::default(),
        }
    }

    /// Which addresses probes may connect to (default: any, see `netpolicy.rs`).
    pub fn with_address_policy(mut self, policy: crate::netpolicy::AddressPolicy) -> Prober {
        self.address_policy = policy;
        self
    }

    /// Probes `target` once. Never fails: every failure is a [`Measurement`] with its outcome.
    ///
    /// A check that ran past the deadline may still be running on its worker, holding the
    /// body; this does not wait for it (see [`Prober::probe_with_leftover`]).
    pub async fn probe(&self, target: &Target) -> Measurement {
        self.probe_with_leftover(target).await.0
    }

    /// [`Prober::probe`], also handing back the body check the probe gave up on at its deadline
    /// if it is still running: memory accounting (the body budget) should count the probe's
    /// body as held until [`Leftover::finished`].
    pub async fn probe_with_leftover(&self, target: &Target) -> (Measurement, Option<Leftover>) {
        let (m, leftover) = self.measure(target).await;
        if let Some(detail) = &m.detail {
            tracing::debug!(
                target_id = m.target_id,
                outcome = m.outcome.as_str(),
                phase = m.failed_phase.map(Phase::as_str),
                detail = %detail,
                "probe not up"
            );
        }
        (m, leftover)
    }

    async fn measure(&self, target: &Target) -> (Measurement, Option<Leftover>) {
        let started_at_ms = vantage_common::time::now_ms();
        let start = Instant::now();
        let deadline = tokio::time::Instant::from_std(start + target.timeout);
        let mut m = Measurement::new(target.id, started_at_ms);
        let (mut m, leftover) = match target.kind {
            ProbeKind::Http => self.measure_http(target, start, deadline, m).await,
            ProbeKind::Tcp => {
                self.measure_tcp(target, start, deadline, &mut m).await;
                (m, None)
            }
            ProbeKind::Tls => {
                self.measure_tls(target, start, deadline, &mut m).await;
                (m, None)
            }
            ProbeKind::Dns => {
                self.measure_dns(target, start, deadline, &mut m).await;
                (m, None)
            }
        };
        // Set last: a redirect's next hop starts from a new measurement.
        m.kind = target.kind;
        (m, leftover)
    }

    /// An HTTP(S) request, its redirects and its body check.
    async fn measure_http(
        &self,
        target: &Target,
        start: Instant,
        deadline: tokio::time::Instant,
        mut m: Measurement,
    ) -> (Measurement, Option<Leftover>) {
        let mut url = target.url.clone();
        let mut method = target.method.clone();
        // Every (method, URL) requested, to tell a loop from a long chain (at most
        // max_redirects + 1 entries).
        let mut requested: Vec<(hyper::Method, url::Url)> = Vec::new();
        // Set once the chain leaves the target's origin; stays set, as in the Fetch standard
        // (the headers are removed from the request, not re-added on the way back).
        let mut left_origin = false;
        let job = loop {
            m.start_hop();
            requested.push((method.clone(), url.clone()));
            let hop = Hop {
                target,
                url: &url,
                method: &method,
                left_origin,
                deadline,
            };
            match self.hop(&hop, &mut m).await {
                Err(f) => {
                    m.end(f.outcome, Some(f.phase), f.detail);
                    m.total_us = us(start.elapsed());
                    return (m, None);
                }
                Ok(HopEnd::Redirect(next)) => {
                    // 303 See Other turns any method into GET (RFC 9110 15.4.4).
                    let next_method = if m.status == 303 && method != hyper::Method::HEAD {
                        hyper::Method::GET
                    } else {
                        method.clone()
                    };
                    if m.redirects >= target.max_redirects {
                        let looped = requested.contains(&(next_method, next.clone()));
                        let (outcome, why) = if looped {
                            (Outcome::RedirectLoop, "redirect loop: already requested")
                        } else {
                            (Outcome::TooManyRedirects, "next redirect")
                        };
                        m.end(
                            outcome,
                            None,
                            format!(
                                "more than {} redirects; {why}: {}",
                                target.max_redirects,
                                redact(&next)
                            ),
                        );
                        m.total_us = us(start.elapsed());
                        return (m, None);
                    }
                    if url.scheme() == "https" && next.scheme() == "http" && !target.allow_downgrade
                    {
                        m.end(
                            Outcome::DowngradeRefused,
                            None,
                            format!(
                                "redirect from https to {} not followed (allow_downgrade = false)",
                                redact(&next)
                            ),
                        );
                        m.total_us = us(start.elapsed());
                        return (m, None);
                    }
                    left_origin |= url.origin() != next.origin();
                    m.redirects += 1;
                    method = next_method;
                    url = next;
                }
                Ok(HopEnd::Final(job)) => break job,
            }
        };
        // The network's part ends here; the check below runs under the same deadline.
        m.total_us = us(start.elapsed());
        if let Some(job) = job {
            let read = job.body.len();
            let (verdict, leftover) = check::run(job, deadline).await;
            match verdict {
                Ok(verdict) => {
                    m.body_truncated |= verdict.decoded_truncated;
                    m.regex = if verdict.matched {
                        RegexOutcome::Matched
                    } else {
                        RegexOutcome::NotMatched
                    };
                }
                Err(e) => {
                    let (outcome, detail) = match e {
                        check::CheckError::Expired(during) => (
                            Outcome::Timeout,
                            format!("deadline ({:?}) passed {during}", target.timeout),
                        ),
                        check::CheckError::BadEncoding(d) => (Outcome::BadContentEncoding, d),
                        check::CheckError::Agent(d) => (Outcome::Other, d),
                    };
                    m.end(outcome, Some(Phase::Check), detail);
                    m.total_us = us(start.elapsed());
                    return (m, leftover);
                }
            }
            if m.regex == RegexOutcome::NotMatched && target.accepts(m.status) {
                let detail = if m.body_truncated {
                    format!(
                        "regex not found within body_cap ({} bytes); the body is longer",
                        target.body_cap
                    )
                } else {
                    format!("regex not found in the body ({read} bytes on the wire)")
                };
                let outcome = if m.body_truncated {
                    Outcome::BodyTruncated
                } else {
                    Outcome::RegexNotMatched
                };
                m.end(outcome, None, detail);
                return (m, None);
            }
        }
        if target.accepts(m.status) {
            m.outcome = Outcome::Up;
        } else {
            let detail = format!("status {} is not in accepted_status", m.status);
            m.end(Outcome::StatusNotAccepted, None, detail);
        }
        (m, None)
    }

    /// One request/response on a new connection to the hop's URL.
    async fn hop(&self, hop: &Hop<'_>, m: &mut Measurement) -> Result<HopEnd, Failure> {
        let url = hop.url;
        let host = url
            .host()
            .ok_or_else(|| fail(Outcome::Other, Phase::Dns, "URL has no host"))?;
        let port = url
            .port_or_known_default()
            .ok_or_else(|| fail(Outcome::Other, Phase::Dns, "URL has no port"))?;
        let tcp = self.open(hop.target, &host, port, hop.deadline, m).await?;
        if url.scheme() == "https" {
            let stream = self
                .handshake(hop.target, &host, tcp, hop.deadline, m)
                .await?;
            m.cert_not_after_s = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| probe_tls::not_after_unix(leaf));
            exchange(Box::new(stream), hop, m).await
        } else {
            exchange(Box::new(tcp), hop, m).await
        }
    }

    /// The DNS and connect phases of every kind: `host` resolved (unless it is an address) to
    /// one address of the target's family, checked against the address policy, connected.
    async fn open(
        &self,
        target: &Target,
        host: &url::Host<&str>,
        port: u16,
        deadline: tokio::time::Instant,
        m: &mut Measurement,
    ) -> Result<TcpStream, Failure> {
        let addr = resolve(host, port, target, deadline, m).await?;
        m.remote_ip = Some(addr.ip().into());
        // After DNS and before connecting, on every hop: redirects and rebinding are covered.
        if !self.address_policy.permits(addr.ip()) {
            return Err(fail(
                Outcome::AddressRefused,
                Phase::Connect,
                format!("{} refused by probes.private_addresses", addr.ip()),
            ));
        }
        let t = Instant::now();
        let tcp = match timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(fail(
                    Outcome::ConnectTimeout,
                    Phase::Connect,
                    format!("no TCP connection to {addr} before the deadline"),
                ))
            }
            Ok(Err(e)) => {
                return Err(fail(
                    classify_connect(&e),
                    Phase::Connect,
                    format!("connect to {addr}: {e}"),
                ))
            }
            Ok(Ok(tcp)) => tcp,
        };
        m.connect_us = Some(us(t.elapsed()));
        // Requests are small; don't let Nagle hold them back and inflate the first-byte time.
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    /// The TLS phase of `https` and `tls` targets: a handshake with `host` (its name for SNI
    /// and the certificate check, or its address) under the target's TLS settings.
    async fn handshake(
        &self,
        target: &Target,
        host: &url::Host<&str>,
        tcp: TcpStream,
        deadline: tokio::time::Instant,
        m: &mut Measurement,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Failure> {
        let config = target
            .tls
            .clone()
            .unwrap_or_else(|| self.default_tls.clone());
        // An IP literal is checked against the certificate's IP addresses.
        let name = match host {
            url::Host::Ipv4(ip) => rustls::pki_types::ServerName::from(std::net::IpAddr::V4(*ip)),
            url::Host::Ipv6(ip) => rustls::pki_types::ServerName::from(std::net::IpAddr::V6(*ip)),
            url::Host::Domain(d) => rustls::pki_types::ServerName::try_from(d.to_string())
                .map_err(|e| fail(Outcome::TlsFailed, Phase::Tls, format!("server name: {e}")))?,
        };
        let t = Instant::now();
        let stream = match timeout_at(
            deadline,
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        {
            Err(_) => return Err(timed_out(Phase::Tls, target.timeout)),
            Ok(Err(e)) => {
                return Err(fail(
                    probe_tls::classify_handshake_error(&e),
                    Phase::Tls,
                    error_chain(&e),
                ))
            }
            Ok(Ok(stream)) => stream,
        };
        m.tls_us = Some(us(t.elapsed()));
        Ok(stream)
    }
}

/// One hop of an HTTP probe: what it requests, for whom, until when.
#[derive(Clone, Copy)]
struct Hop<'a> {
    target: &'a Target,
    url: &'a url::Url,
    method: &'a hyper::Method,
    /// The chain left the target's origin, so its credentials are not sent.
    left_origin: bool,
    deadline: tokio::time::Instant,
}

/// A URL for a detail: a user name and password in it are never shown.
fn redact(url: &url::Url) -> String {
    crate::target::redact_userinfo(url.as_str())
}

/// `detail` cut to [`MAX_DETAIL_LEN`] bytes at a character boundary.
fn bounded(mut detail: String) -> String {
    if detail.len() > MAX_DETAIL_LEN {
        let mut end = MAX_DETAIL_LEN - '…'.len_utf8();
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
        detail.push('…');
    }
    detail
}

/// An error and its sources, `outer: inner: …`, skipping a source that repeats its parent.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut last = text.clone();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !last.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        last = part;
        source = s.source();
    }
    text
}

/// Resolves the URL's host to one address of the wanted family; records the DNS phase unless
/// the host is an IP literal.
async fn resolve(
    host: &url::Host<&str>,
    port: u16,
    target: &Target,
    deadline: tokio::time::Instant,
    m: &mut Measurement,
) -> Result<SocketAddr, Failure> {
    let family = target.ip_family;
    let wanted = |a: &SocketAddr| match family {
        IpFamily::Auto => true,
        IpFamily::Ipv4 => a.is_ipv4(),
        IpFamily::Ipv6 => a.is_ipv6(),
    };
    let no_address = || {
        let which = match family {
            IpFamily::Auto => "no address",
            IpFamily::Ipv4 => "no IPv4 address (ip_family = ipv4)",
            IpFamily::Ipv6 => "no IPv6 address (ip_family = ipv6)",
        };
        fail(Outcome::DnsNoSuchName, Phase::Dns, which)
    };
    let host = match host {
        url::Host::Ipv4(ip) => return ok_if((*ip, port).into(), wanted, no_address),
        url::Host::Ipv6(ip) => return ok_if((*ip, port).into(), wanted, no_address),
        url::Host::Domain(d) => *d,
    };
    let t = Instant::now();
    let addrs = match timeout_at(deadline, tokio::net::lookup_host((host, port))).await {
        Err(_) => return Err(timed_out(Phase::Dns, target.timeout)),
        Ok(Err(e)) => return Err(fail(classify_dns(&e), Phase::Dns, format!("{host}: {e}"))),
        Ok(Ok(addrs)) => addrs,
    };
    m.dns_us = Some(us(t.elapsed()));
    let mut addrs = addrs.filter(wanted);
    addrs.next().ok_or_else(no_address)
}

/// An address literal: itself if it is of the wanted family.
fn ok_if(
    addr: SocketAddr,
    wanted: impl Fn(&SocketAddr) -> bool,
    no_address: impl Fn() -> Failure,
) -> Result<SocketAddr, Failure> {
    if wanted(&addr) {
        Ok(addr)
    } else {
        Err(no_address())
    }
}

/// `host` borrowed, as [`url::Url::host`] gives it.
fn borrowed(host: &url::Host<String>) -> url::Host<&str> {
    match host {
        url::Host::Domain(d) => url::Host::Domain(d.as_str()),
        url::Host::Ipv4(ip) => url::Host::Ipv4(*ip),
        url::Host::Ipv6(ip) => url::Host::Ipv6(*ip),
    }
}

/// A hop's open connection: TCP, or TLS over TCP.
///
/// One type for both, so that [`exchange`] and everything hyper compiles for the connection it
/// drives exist once rather than once per stream type: a generic `exchange` made two copies,
/// 29 KiB of the x86_64 `dist` binary. The price, a virtual call per read or write, is nothing
/// next to the system call behind it.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

/// HTTP/1.1 request and response (and, for the final hop, the body) over an open stream.
async fn exchange(
    stream: Box<dyn Stream>,
    hop: &Hop<'_>,
    m: &mut Measurement,
) -> Result<HopEnd, Failure> {
    let Hop {
        target,
        url,
        method,
        left_origin,
        deadline,
    } = *hop;
    let marks = Arc::new(ReadMarks::default());
    let io = FirstByteIo {
        inner: stream,
        marks: marks.clone(),
        scan: HeadScan::Start,
    };
    // A bounded read buffer keeps what a probe holds besides its body within budget.rs's floor.
    let (mut sender, conn) = match timeout_at(
        deadline,
        hyper::client::conn::http1::Builder::new()
            .max_buf_size(crate::budget::READ_BUFFER)
            .handshake(TokioIo::new(io)),
    )
    .await
    {
        Err(_) => return Err(timed_out(Phase::FirstByte, target.timeout)),
        Ok(Err(e)) => return Err(fail(classify_hyper(&e), Phase::FirstByte, error_chain(&e))),
        Ok(Ok(pair)) => pair,
    };
    // The connection future drives the socket. Aborting on drop makes sure a timed-out probe
    // leaves no task behind.
    let _conn = AbortOnDrop(tokio::spawn(conn));

    let request = build_request(target, url, method, left_origin)
        .map_err(|e| fail(Outcome::Other, Phase::FirstByte, format!("request: {e}")))?;
    let sent = Instant::now();
    // Before the first byte arrives the probe is waiting for it; after, it is reading the head
    // (and the byte that arrived is the first byte).
    let in_head = |m: &mut Measurement| match marks.first.get() {
        Some(_) => {
            m.ttfb_us = marks
                .response_start()
                .map(|t| us(t.saturating_duration_since(sent)));
            Phase::Headers
        }
        None => Phase::FirstByte,
    };
    let response = match timeout_at(deadline, sender.send_request(request)).await {
        Err(_) => return Err(timed_out(in_head(m), target.timeout)),
        Ok(Err(e)) => return Err(fail(classify_hyper(&e), in_head(m), error_chain(&e))),
        Ok(Ok(r)) => r,
    };
    let first = marks.response_start().unwrap_or_else(Instant::now);
    m.ttfb_us = Some(us(first.saturating_duration_since(sent)));
    m.status = response.status().as_u16();

    // max_redirects = 0: don't follow, the 3xx itself is the result.
    if response.status().is_redirection() && target.max_redirects > 0 {
        if let Some(next) = response
            .headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| url.join(l).ok())
            .filter(|u| matches!(u.scheme(), "http" | "https"))
        {
            return Ok(HopEnd::Redirect(next));
        }
    }

    let encoding = check::Encoding::from_headers(response.headers());
    let mut body = response.into_body();
    let keep = target.regex.is_some();
    let mut kept: Vec<u8> = Vec::new();
    let mut read: usize = 0;
    loop {
        if read >= target.body_cap {
            // Stop at the cap: the rest is never downloaded, memory stays bounded.
            m.body_truncated = !body.is_end_stream();
            break;
        }
        let frame = match timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(timed_out(Phase::Body, target.timeout)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(fail(classify_hyper(&e), Phase::Body, error_chain(&e))),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref() {
            let take = data.len().min(target.body_cap - read);
            if take < data.len() {
                m.body_truncated = true;
            }
            read += take;
            // Counted as it arrives, so a body that fails later still says what came.
            m.body_bytes = u32::try_from(read).unwrap_or(u32::MAX);
            if keep {
                kept.extend_from_slice(&data[..take]);
            }
            if m.body_truncated {
                break;
            }
        }
    }
    m.transfer_us = Some(us(first.elapsed()));
    Ok(HopEnd::Final(target.regex.as_ref().map(|regex| {
        check::Job {
            body: kept,
            encoding,
            complete: !m.body_truncated,
            regex: regex.clone(),
            cap: target.body_cap,
        }
    })))
}

/// Headers that carry the target's credentials or name its host: not sent once a redirect
/// chain left the target's origin. The same set curl drops since 7.58.0 (CVE-2018-1000007:
/// `Authorization` and `Cookie`, and `Host` as a custom header; see curl's
/// `Curl_auth_allowed_to_host`) and browsers drop by the Fetch standard (`Authorization`,
/// and `Proxy-Authorization`, which is never sent to an origin server).
fn is_origin_bound(name: &HeaderName) -> bool {
    [AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, HOST].contains(name)
}

fn build_request(
    target: &Target,
    url: &url::Url,
    method: &hyper::Method,
    left_origin: bool,
) -> Result<hyper::Request<Empty<Bytes>>, hyper::http::Error> {
    // `host_str` already has the brackets of an IPv6 literal (`[::1]`).
    let host = url.host_str().unwrap_or_default();
    let host_header = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let mut builder = hyper::Request::builder()
        .method(method.clone())
        .uri(path)
        .header(HOST, host_header)
        .header(USER_AGENT, USER_AGENT_VALUE);
    // Ask for gzip only when the body will be searched (it is then decoded before matching).
    if target.regex.is_some() {
        builder = builder.header(ACCEPT_ENCODING, "gzip");
    }
    let mut request = builder.body(Empty::<Bytes>::new())?;
    for (name, value) in &target.headers {
        if left_origin && is_origin_bound(name) {
            continue;
        }
        request.headers_mut().insert(name.clone(), value.clone());
    }
    Ok(request)
}

fn classify_connect(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => Outcome::ConnectRefused,
        K::HostUnreachable | K::NetworkUnreachable => Outcome::Unreachable,
        K::TimedOut => Outcome::ConnectTimeout,
        _ => Outcome::ConnectFailed,
    }
}

/// The kind of a read or write error on an open connection.
fn classify_io(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
            Outcome::ConnectionReset
        }
        _ => Outcome::Other,
    }
}

/// getaddrinfo reports "no such name" only as text (std wraps EAI_* codes in a message);
/// the glibc and musl wordings are matched, anything else is a generic DNS failure.
fn classify_dns(e: &std::io::Error) -> Outcome {
    let text = e.to_string();
    let no_such_name = [
        "Name or service not known",
        "No address associated with hostname",
        "Name does not resolve",
        "nodename nor servname provided",
        "No such host",
    ];
    if no_such_name.iter().any(|s| text.contains(s)) {
        Outcome::DnsNoSuchName
    } else {
        Outcome::DnsFailed
    }
}

fn classify_hyper(e: &hyper::Error) -> Outcome {
    if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
        return Outcome::ProtocolError;
    }
    if e.is_incomplete_message() {
        return Outcome::ConnectionReset;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return match io.kind() {
                // hyper's body decoders (chunked framing, lengths) report a malformed body as
                // InvalidData / InvalidInput: the server's fault, not the agent's.
                K::InvalidData | K::InvalidInput => Outcome::ProtocolError,
                _ => classify_io(io),
            };
        }
        source = s.source();
    }
    Outcome::Other
}

/// When bytes arrived on a connection.
#[derive(Default)]
struct ReadMarks {
    /// The first byte of anything (an interim response included).
    first: OnceLock<Instant>,
    /// The first byte of the final (non-1xx) response head.
    final_head: OnceLock<Instant>,
}

impl ReadMarks {
    /// When the final response started, or failing that, when the first byte came.
    fn response_start(&self) -> Option<Instant> {
        self.final_head.get().or(self.first.get()).copied()
    }
}

/// Where [`FirstByteIo`] is in the stream of response heads. Only interim (1xx) heads are read
/// to their end; the first byte of any other head ends the scan, so a plain response costs a
/// look at its first 12 bytes.
enum HeadScan {
    /// At the first byte of a response head.
    Start,
    /// In the first bytes of a head, which started (arrived) at `at`: "HTTP/1.1 1xx" or not.
    Prefix {
        prefix: [u8; 12],
        len: usize,
        at: Instant,
    },
    /// In an interim head; `line_empty`: nothing but CR since the last LF.
    Interim {
        line_empty: bool,
    },
    Done,
}

impl HeadScan {
    fn feed(&mut self, bytes: &[u8], now: Instant, marks: &ReadMarks) {
        let mut i = 0;
        while i < bytes.len() {
            match self {
                HeadScan::Done => return,
                HeadScan::Start => {
                    *self = HeadScan::Prefix {
                        prefix: [0; 12],
                        len: 0,
                        at: now,
                    }
                }
                HeadScan::Prefix { prefix, len, at } => {
                    prefix[*len] = bytes[i];
                    *len += 1;
                    i += 1;
                    if *len == prefix.len() {
                        // hyper skips 1xx heads and hands over the next one, except 101 (which
                        // is the response to an upgrade, never asked for here).
                        let interim = prefix.starts_with(b"HTTP/1.")
                            && prefix[8] == b' '
                            && prefix[9] == b'1'
                            && &prefix[9..12] != b"101";
                        if interim {
                            *self = HeadScan::Interim { line_empty: false };
                        } else {
                            let _ = marks.final_head.set(*at);
                            *self = HeadScan::Done;
                        }
                    }
                }
                HeadScan::Interim { line_empty } => {
                    match bytes[i] {
                        // An empty line ends the head (httparse accepts bare LF too).
                        b'\n' if *line_empty => *self = HeadScan::Start,
                        b'\n' => *line_empty = true,
                        b'\r' => {}
                        _ => *line_empty = false,
                    }
                    i += 1;
                }
            }
        }
    }
}

/// A stream that notes when bytes were read (for time to first byte).
struct FirstByteIo<S> {
    inner: S,
    marks: Arc<ReadMarks>,
    scan: HeadScan,
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstByteIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let now = Instant::now();
            let _ = this.marks.first.set(now);
            if !matches!(this.scan, HeadScan::Done) {
                this.scan.feed(&buf.filled()[before..], now, &this.marks);
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstByteIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_errors_are_split() {
        let e = std::io::Error::other(
            "failed to lookup address information: Name or service not known",
        );
        assert_eq!(classify_dns(&e), Outcome::DnsNoSuchName);
        let e = std::io::Error::other(
            "failed to lookup address information: Temporary failure in name resolution",
        );
        assert_eq!(classify_dns(&e), Outcome::DnsFailed);
    }

    fn scan(chunks: &[(&[u8], u64)]) -> ReadMarks {
        let marks = ReadMarks::default();
        let mut scan = HeadScan::Start;
        let t0 = Instant::now();
        for (bytes, ms) in chunks {
            let now = t0 + Duration::from_millis(*ms);
            let _ = marks.first.set(now);
            scan.feed(bytes, now, &marks);
        }
        marks
    }

    fn ms(marks: &ReadMarks) -> Option<u128> {
        let first = *marks.first.get()?;
        marks
            .final_head
            .get()
            .map(|t| t.duration_since(first).as_millis())
    }

    #[test]
    fn final_head_start_skips_interim_responses() {
        // Plain response: the first byte.
        assert_eq!(ms(&scan(&[(b"HTTP/1.1 200 OK\r\n\r\n", 0)])), Some(0));
        // 103, then the final response in a later read.
        let marks = scan(&[
            (b"HTTP/1.1 103 Early Hints\r\nLink: <a>\r\n\r\n", 0),
            (b"HTTP/1.1 200 OK\r\n", 30),
        ]);
        assert_eq!(ms(&marks), Some(30));
        // Interim and final in one read: they arrived together.
        let marks = scan(&[(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            5,
        )]);
        assert_eq!(ms(&marks), Some(0));
        // Split anywhere, bare LFs, two interim responses.
        let marks = scan(&[
            (b"HTTP/1.1 1", 0),
            (b"00 Continue\n", 1),
            (b"\nHTTP/1.1 103 Early Hints\r\n\r", 2),
            (b"\n", 3),
            (b"HTTP/1.1 20", 4),
            (b"0 OK\r\n\r\n", 9),
        ]);
        assert_eq!(ms(&marks), Some(4));
        // Not HTTP at all: the first byte is the (garbage) response.
        assert_eq!(ms(&scan(&[(b"SSH-2.0-OpenSSH_9.2\r\n", 0)])), Some(0));
        // Only an interim response, then nothing: no final head.
        assert_eq!(ms(&scan(&[(b"HTTP/1.1 103 Early Hints\r\n\r\n", 0)])), None);
    }

    #[test]
    fn origin_bound_headers_are_dropped_after_leaving_the_origin() {
        let mut t = Target::for_url(1, "http://a.example:8080/").unwrap();
        for (n, v) in [
            ("authorization", "Bearer x"),
            ("cookie", "a=b"),
            ("proxy-authorization", "Basic y"),
            ("host", "override.example"),
            ("x-api-key", "kept"),
        ] {
            t.headers.push((n.parse().unwrap(), v.parse().unwrap()));
        }
        let next = url::Url::parse("http://b.example/").unwrap();
        let r = build_request(&t, &next, &hyper::Method::GET, true).unwrap();
        let names: Vec<&str> = r.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["host", "user-agent", "x-api-key"]);
        assert_eq!(r.headers()[HOST], "b.example");
        let r = build_request(&t, &t.url, &hyper::Method::GET, false).unwrap();
        assert_eq!(r.headers()[HOST], "override.example");
        assert_eq!(r.headers()[AUTHORIZATION], "Bearer x");
    }

    #[test]
    fn host_header_of_ip_literals() {
        let host = |u: &str| {
            let t = Target::for_url(1, u).unwrap();
            build_request(&t, &t.url, &hyper::Method::GET, false)
                .unwrap()
                .headers()[HOST]
                .to_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(host("http://[::1]:8080/"), "[::1]:8080");
        assert_eq!(host("http://[2001:db8::1]/"), "[2001:db8::1]");
        assert_eq!(host("http://127.0.0.1:81/x"), "127.0.0.1:81");
        assert_eq!(host("https://example.org:443/"), "example.org");
    }

    #[test]
    fn details_are_bounded_and_redacted() {
        let long = "é".repeat(300);
        let cut = bounded(long);
        assert!(cut.len() <= MAX_DETAIL_LEN && cut.ends_with('…'), "{cut}");
        let u = url::Url::parse("https://user:pw@example.org/p?q=1").unwrap();
        assert_eq!(redact(&u), "https://<redacted>@example.org/p?q=1");
    }
}
