//! The probe engine: one HTTP(S) check of one target, measured phase by phase.
//!
//! Each hop's connection is built by hand (DNS, TCP, TLS, then hyper's HTTP/1.1 connection API)
//! rather than through a pooled client, so every probe pays for and measures each phase, the
//! way a new visitor would. One deadline covers the whole probe, redirects included; each phase
//! runs under `timeout_at` of that deadline, so a timeout names the phase it interrupted.
//!
//! Time to first byte is the first byte *read* from the socket after the request was written
//! (measured by [`FirstByteIo`] under hyper), not "headers complete".

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Body as _;
use hyper::header::{ACCEPT_ENCODING, CONTENT_ENCODING, HOST, LOCATION, USER_AGENT};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout_at;
use vantage_proto::{Outcome, Phase, RegexOutcome};

use crate::target::{IpFamily, Target};
use crate::tls;

/// Sent with every request so target owners can recognise (and allow-list) the monitor.
pub const USER_AGENT_VALUE: &str = concat!("vantage-agent/", env!("CARGO_PKG_VERSION"));

/// What one probe measured. The uplink turns it into a wire [`vantage_proto::ProbeResult`] and
/// assigns its sequence number.
///
/// Phase times (`dns` … `transfer`), `status`, `remote_ip` and `cert_not_after_s` describe the
/// final hop; `total` covers every hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurement {
    pub target_id: u32,
    pub started_at_ms: u64,
    pub status: u16,
    pub outcome: Outcome,
    /// Where a failed probe stopped; None when a response was received.
    pub failed_phase: Option<Phase>,
    pub regex: RegexOutcome,
    pub total: Duration,
    pub dns: Option<Duration>,
    pub connect: Option<Duration>,
    pub tls: Option<Duration>,
    pub ttfb: Option<Duration>,
    pub transfer: Option<Duration>,
    pub body_bytes: u32,
    pub body_truncated: bool,
    pub redirects: u8,
    /// Leaf certificate notAfter, unix seconds.
    pub cert_not_after_s: Option<u64>,
    pub remote_ip: Option<std::net::IpAddr>,
}

impl Measurement {
    /// A measurement of nothing yet (outcome `other`): the start of a probe, or, filled in by
    /// the caller, the result of a probe that could not run (`memory_refused`, lib.rs).
    pub fn new(target_id: u32, started_at_ms: u64) -> Measurement {
        Measurement {
            target_id,
            started_at_ms,
            status: 0,
            outcome: Outcome::Other,
            failed_phase: None,
            regex: RegexOutcome::NotConfigured,
            total: Duration::ZERO,
            dns: None,
            connect: None,
            tls: None,
            ttfb: None,
            transfer: None,
            body_bytes: 0,
            body_truncated: false,
            redirects: 0,
            cert_not_after_s: None,
            remote_ip: None,
        }
    }

    /// Forgets the per-hop fields before the next hop of a redirect chain.
    fn start_hop(&mut self) {
        let (id, at, redirects) = (self.target_id, self.started_at_ms, self.redirects);
        *self = Measurement::new(id, at);
        self.redirects = redirects;
    }
}

/// A failure: its kind and the phase it happened in.
type Failure = (Outcome, Phase);

/// How a hop ended when a response arrived.
enum HopEnd {
    /// A redirect to follow.
    Redirect(url::Url),
    /// The final response (body read, regex evaluated).
    Final,
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
            default_tls: tls::default_config(),
            address_policy: Default::default(),
        }
    }

    /// Which addresses probes may connect to (default: any, see `netpolicy.rs`).
    pub fn with_address_policy(mut self, policy: crate::netpolicy::AddressPolicy) -> Prober {
        self.address_policy = policy;
        self
    }

    /// Probes `target` once. Never fails: every failure is a [`Measurement`] with its outcome.
    pub async fn probe(&self, target: &Target) -> Measurement {
        let started_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let start = Instant::now();
        let deadline = tokio::time::Instant::from_std(start + target.timeout);
        let mut m = Measurement::new(target.id, started_at_ms);
        let mut url = target.url.clone();
        let mut method = target.method.clone();
        loop {
            m.start_hop();
            match self.hop(target, &url, &method, deadline, &mut m).await {
                Err((outcome, phase)) => {
                    m.outcome = outcome;
                    m.failed_phase = Some(phase);
                    break;
                }
                Ok(HopEnd::Redirect(next)) => {
                    m.redirects += 1;
                    // 303 See Other turns any method into GET (RFC 9110 15.4.4).
                    if m.status == 303 && method != hyper::Method::HEAD {
                        method = hyper::Method::GET;
                    }
                    url = next;
                }
                Ok(HopEnd::Final) => {
                    m.outcome = if !target.accepts(m.status) {
                        Outcome::StatusNotAccepted
                    } else if m.regex == RegexOutcome::NotMatched {
                        if m.body_truncated {
                            Outcome::BodyTruncated
                        } else {
                            Outcome::RegexNotMatched
                        }
                    } else {
                        Outcome::Up
                    };
                    break;
                }
            }
        }
        m.total = start.elapsed();
        m
    }

    /// One request/response on a new connection to `url`.
    async fn hop(
        &self,
        target: &Target,
        url: &url::Url,
        method: &hyper::Method,
        deadline: tokio::time::Instant,
        m: &mut Measurement,
    ) -> Result<HopEnd, Failure> {
        let host = url.host_str().ok_or((Outcome::Other, Phase::Dns))?;
        let port = url
            .port_or_known_default()
            .ok_or((Outcome::Other, Phase::Dns))?;
        let addr = resolve(url, port, target.ip_family, deadline, m).await?;
        m.remote_ip = Some(addr.ip());
        // After DNS and before connecting, on every hop: redirects and rebinding are covered.
        if !self.address_policy.permits(addr.ip()) {
            return Err((Outcome::AddressRefused, Phase::Connect));
        }

        let t = Instant::now();
        let tcp = match timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => return Err((Outcome::ConnectTimeout, Phase::Connect)),
            Ok(Err(e)) => return Err((classify_connect(&e), Phase::Connect)),
            Ok(Ok(tcp)) => tcp,
        };
        m.connect = Some(t.elapsed());
        // Requests are small; don't let Nagle hold them back and inflate the first-byte time.
        let _ = tcp.set_nodelay(true);

        if url.scheme() == "https" {
            let config = target
                .tls
                .clone()
                .unwrap_or_else(|| self.default_tls.clone());
            // An IP literal is checked against the certificate's IP addresses; `host_str`
            // would keep the brackets of an IPv6 literal.
            let name = match url.host() {
                Some(url::Host::Ipv4(ip)) => {
                    rustls::pki_types::ServerName::from(std::net::IpAddr::V4(ip))
                }
                Some(url::Host::Ipv6(ip)) => {
                    rustls::pki_types::ServerName::from(std::net::IpAddr::V6(ip))
                }
                _ => rustls::pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|_| (Outcome::TlsFailed, Phase::Tls))?,
            };
            let t = Instant::now();
            let stream = match timeout_at(
                deadline,
                tokio_rustls::TlsConnector::from(config).connect(name, tcp),
            )
            .await
            {
                Err(_) => return Err((Outcome::Timeout, Phase::Tls)),
                Ok(Err(e)) => return Err((tls::classify_handshake_error(&e), Phase::Tls)),
                Ok(Ok(stream)) => stream,
            };
            m.tls = Some(t.elapsed());
            m.cert_not_after_s = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| tls::not_after_unix(leaf));
            exchange(stream, target, url, method, deadline, m).await
        } else {
            exchange(tcp, target, url, method, deadline, m).await
        }
    }
}

/// Resolves the URL's host to one address of the wanted family; records the DNS phase unless
/// the host is an IP literal.
async fn resolve(
    url: &url::Url,
    port: u16,
    family: IpFamily,
    deadline: tokio::time::Instant,
    m: &mut Measurement,
) -> Result<SocketAddr, Failure> {
    let wanted = |a: &SocketAddr| match family {
        IpFamily::Auto => true,
        IpFamily::Ipv4 => a.is_ipv4(),
        IpFamily::Ipv6 => a.is_ipv6(),
    };
    let literal: Option<SocketAddr> = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some((ip, port).into()),
        Some(url::Host::Ipv6(ip)) => Some((ip, port).into()),
        _ => None,
    };
    if let Some(addr) = literal {
        return if wanted(&addr) {
            Ok(addr)
        } else {
            Err((Outcome::DnsNoSuchName, Phase::Dns))
        };
    }
    let host = url.host_str().unwrap_or_default();
    let t = Instant::now();
    let addrs = match timeout_at(deadline, tokio::net::lookup_host((host, port))).await {
        Err(_) => return Err((Outcome::Timeout, Phase::Dns)),
        Ok(Err(e)) => return Err((classify_dns(&e), Phase::Dns)),
        Ok(Ok(addrs)) => addrs,
    };
    m.dns = Some(t.elapsed());
    let mut addrs = addrs.filter(wanted);
    addrs.next().ok_or((Outcome::DnsNoSuchName, Phase::Dns))
}

/// HTTP/1.1 request and response (and, for the final hop, the body) over an open stream.
async fn exchange<S>(
    stream: S,
    target: &Target,
    url: &url::Url,
    method: &hyper::Method,
    deadline: tokio::time::Instant,
    m: &mut Measurement,
) -> Result<HopEnd, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let first_byte = Arc::new(OnceLock::new());
    let io = FirstByteIo {
        inner: stream,
        first_read: first_byte.clone(),
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
        Err(_) => return Err((Outcome::Timeout, Phase::FirstByte)),
        Ok(Err(e)) => return Err((classify_hyper(&e), Phase::FirstByte)),
        Ok(Ok(pair)) => pair,
    };
    // The connection future drives the socket. Aborting on drop makes sure a timed-out probe
    // leaves no task behind.
    let _conn = AbortOnDrop(tokio::spawn(conn));

    let request =
        build_request(target, url, method).map_err(|_| (Outcome::Other, Phase::FirstByte))?;
    let sent = Instant::now();
    // Before the first byte arrives the probe is waiting for it; after, it is reading headers.
    let phase_now = |first: &OnceLock<Instant>| {
        if first.get().is_some() {
            Phase::Body
        } else {
            Phase::FirstByte
        }
    };
    let response = match timeout_at(deadline, sender.send_request(request)).await {
        Err(_) => return Err((Outcome::Timeout, phase_now(&first_byte))),
        Ok(Err(e)) => return Err((classify_hyper(&e), phase_now(&first_byte))),
        Ok(Ok(r)) => r,
    };
    let first = first_byte.get().copied().unwrap_or_else(Instant::now);
    m.ttfb = Some(first.saturating_duration_since(sent));
    m.status = response.status().as_u16();

    if response.status().is_redirection() && m.redirects < target.max_redirects {
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

    let gzip = response
        .headers()
        .get(CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
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
            Err(_) => return Err((Outcome::Timeout, Phase::Body)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err((classify_hyper(&e), Phase::Body)),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref() {
            let take = data.len().min(target.body_cap - read);
            if take < data.len() {
                m.body_truncated = true;
            }
            read += take;
            if keep {
                kept.extend_from_slice(&data[..take]);
            }
            if m.body_truncated {
                break;
            }
        }
    }
    m.transfer = Some(first.elapsed());
    m.body_bytes = u32::try_from(read).unwrap_or(u32::MAX);
    if let Some(regex) = &target.regex {
        // Decoding and searching up to `body_cap` bytes is CPU work: off the runtime thread, so
        // it cannot delay (or inflate the timings of) other probes on a one-thread agent.
        let (regex, cap) = (regex.clone(), target.body_cap);
        let matched = tokio::task::spawn_blocking(move || {
            let text = if gzip {
                gunzip_capped(&kept, cap)
            } else {
                kept
            };
            // Lossy: invalid UTF-8 becomes U+FFFD and cannot crash or hide the rest of the
            // text. The whole (capped) body is searched at once, so a match across chunks is
            // found.
            regex.is_match(&String::from_utf8_lossy(&text))
        })
        .await
        .map_err(|_| (Outcome::Other, Phase::Body))?;
        m.regex = if matched {
            RegexOutcome::Matched
        } else {
            RegexOutcome::NotMatched
        };
    }
    Ok(HopEnd::Final)
}

fn build_request(
    target: &Target,
    url: &url::Url,
    method: &hyper::Method,
) -> Result<hyper::Request<Empty<Bytes>>, hyper::http::Error> {
    let host = url.host_str().unwrap_or_default();
    let host_header = match (url.port(), url.host()) {
        (Some(p), Some(url::Host::Ipv6(_))) => format!("[{host}]:{p}"),
        (Some(p), _) => format!("{host}:{p}"),
        (None, _) => host.to_owned(),
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
        request.headers_mut().insert(name.clone(), value.clone());
    }
    Ok(request)
}

/// Decodes a gzip body, keeping at most `cap` decoded bytes (a small bomb cannot blow up
/// memory). A body that is not valid gzip is searched as it is.
fn gunzip_capped(compressed: &[u8], cap: usize) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    let decoder = flate2::read::GzDecoder::new(compressed);
    match decoder.take(cap as u64).read_to_end(&mut out) {
        Ok(_) => out,
        // A truncated stream (body cut at the cap) still yields what was decoded so far.
        Err(_) if !out.is_empty() => out,
        Err(_) => compressed.to_vec(),
    }
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
            return match io.kind() {
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof => Outcome::ConnectionReset,
                _ => Outcome::Other,
            };
        }
        source = s.source();
    }
    Outcome::Other
}

/// A stream that notes when its first byte was read (for time to first byte).
struct FirstByteIo<S> {
    inner: S,
    first_read: Arc<OnceLock<Instant>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstByteIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let _ = self.first_read.set(Instant::now());
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
    fn gzip_is_decoded_and_capped() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&b"hello "[..].repeat(1000)).unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(gunzip_capped(&gz, 1 << 20).len(), 6000);
        assert_eq!(gunzip_capped(&gz, 100).len(), 100);
        // Not gzip at all: searched as is.
        assert_eq!(gunzip_capped(b"plain", 100), b"plain");
    }

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
}
