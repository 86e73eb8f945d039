//! The probe engine: one HTTP(S) request to one target, measured phase by phase.
//!
//! The connection is built by hand (DNS, TCP, TLS, then hyper's HTTP/1.1 connection API) rather
//! than through a pooled client, so every probe pays for and measures each phase, the way a new
//! visitor would. One deadline covers the whole probe; each phase runs under `timeout_at` of that
//! deadline so a timeout is attributed to the phase it interrupted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::timeout_at;
use vantage_proto::{Outcome, Phase, RegexOutcome};

use crate::config::TargetConfig;

/// Sent with every request so target owners can recognise (and allow-list) the monitor.
pub const USER_AGENT_VALUE: &str = concat!("vantage-agent/", env!("CARGO_PKG_VERSION"));

/// Most body bytes read per probe; the rest of the body is not downloaded.
pub const BODY_CAP: usize = 1024 * 1024;

/// What one probe measured. Converted to a wire [`vantage_proto::ProbeResult`] by the uplink,
/// which assigns the sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurement {
    pub target_id: u32,
    pub started_at_ms: u64,
    pub status: u16,
    pub outcome: Outcome,
    pub regex: RegexOutcome,
    pub total: Duration,
    pub dns: Option<Duration>,
    pub connect: Option<Duration>,
    pub tls: Option<Duration>,
    pub ttfb: Option<Duration>,
    pub transfer: Option<Duration>,
    pub body_bytes: u32,
    pub body_truncated: bool,
    pub failed_phase: Option<Phase>,
    pub redirects: u8,
    /// Leaf certificate notAfter, unix seconds.
    pub cert_not_after_s: Option<u64>,
    pub remote_ip: Option<std::net::IpAddr>,
}

/// Shared, read-only state of the probe engine.
#[derive(Clone)]
pub struct Prober {
    tls: tokio_rustls::TlsConnector,
}

impl Prober {
    /// A prober that trusts the Mozilla root set bundled by `webpki-roots`.
    pub fn new() -> Result<Prober, rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        // The ring provider, not aws-lc-rs: ring cross-compiles to ARM without extra toolchains.
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Prober {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// Probes `target` once. Never fails: every failure is a [`Measurement`] with its outcome.
    pub async fn probe(&self, target: &TargetConfig) -> Measurement {
        let started_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let start = Instant::now();
        let deadline = tokio::time::Instant::from_std(start + target.timeout);
        let mut m = Measurement {
            target_id: target.id,
            started_at_ms,
            status: 0,
            outcome: Outcome::Other,
            regex: RegexOutcome::NotConfigured,
            total: Duration::ZERO,
            dns: None,
            connect: None,
            tls: None,
            ttfb: None,
            transfer: None,
            body_bytes: 0,
            body_truncated: false,
            failed_phase: None,
            redirects: 0,
            cert_not_after_s: None,
            remote_ip: None,
        };
        m.outcome = match self.run(target, deadline, &mut m).await {
            Ok(()) => classify_response(target, &m),
            Err(outcome) => outcome,
        };
        m.total = start.elapsed();
        m
    }

    /// The phases in order; fills `m` as it goes and returns the failure outcome, if any.
    async fn run(
        &self,
        target: &TargetConfig,
        deadline: tokio::time::Instant,
        m: &mut Measurement,
    ) -> Result<(), Outcome> {
        let url = &target.url;
        let host = url.host_str().ok_or(Outcome::Other)?;
        let port = url.port_or_known_default().ok_or(Outcome::Other)?;

        // DNS. An IP literal needs no lookup and records no DNS phase.
        let addr: SocketAddr = match url.host() {
            Some(url::Host::Ipv4(ip)) => (ip, port).into(),
            Some(url::Host::Ipv6(ip)) => (ip, port).into(),
            _ => {
                let t = Instant::now();
                let mut addrs = timeout_at(deadline, tokio::net::lookup_host((host, port)))
                    .await
                    .map_err(|_| Outcome::Timeout)?
                    .map_err(|_| Outcome::DnsFailed)?;
                m.dns = Some(t.elapsed());
                addrs.next().ok_or(Outcome::DnsFailed)?
            }
        };

        // TCP connect.
        let t = Instant::now();
        let tcp = timeout_at(deadline, TcpStream::connect(addr))
            .await
            .map_err(|_| Outcome::Timeout)?
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::ConnectionRefused => Outcome::ConnectRefused,
                _ => Outcome::ConnectFailed,
            })?;
        m.connect = Some(t.elapsed());
        // Requests are small; don't let Nagle hold them back and inflate the first-byte time.
        let _ = tcp.set_nodelay(true);

        if url.scheme() == "https" {
            let t = Instant::now();
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|_| Outcome::TlsFailed)?;
            let tls = timeout_at(deadline, self.tls.connect(name, tcp))
                .await
                .map_err(|_| Outcome::Timeout)?
                .map_err(|_| Outcome::TlsFailed)?;
            m.tls = Some(t.elapsed());
            exchange(tls, target, deadline, m).await
        } else {
            exchange(tcp, target, deadline, m).await
        }
    }
}

/// HTTP/1.1 request and response body over an established stream.
async fn exchange<S>(
    stream: S,
    target: &TargetConfig,
    deadline: tokio::time::Instant,
    m: &mut Measurement,
) -> Result<(), Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = timeout_at(
        deadline,
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| Outcome::Timeout)?
    .map_err(|e| classify_hyper(&e))?;
    // The connection future drives the socket; it ends when `sender` is dropped. Aborting on
    // drop makes sure a timed-out probe leaves no task behind.
    let conn = AbortOnDrop(tokio::spawn(conn));

    let url = &target.url;
    let host_header = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_owned(),
    };
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let request = hyper::Request::get(path)
        .header(HOST, host_header)
        .header(USER_AGENT, USER_AGENT_VALUE)
        .body(Empty::<Bytes>::new())
        .map_err(|_| Outcome::Other)?;

    let t = Instant::now();
    let response = timeout_at(deadline, sender.send_request(request))
        .await
        .map_err(|_| Outcome::Timeout)?
        .map_err(|e| classify_hyper(&e))?;
    m.ttfb = Some(t.elapsed());
    m.status = response.status().as_u16();

    let mut body = response.into_body();
    let mut kept: Vec<u8> = Vec::new();
    let mut read: usize = 0;
    while read < BODY_CAP {
        let frame = match timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(Outcome::Timeout),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(classify_hyper(&e)),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref() {
            let take = data.len().min(BODY_CAP - read);
            read += take;
            if target.regex.is_some() {
                kept.extend_from_slice(&data[..take]);
            }
        }
    }
    m.body_bytes = u32::try_from(read).unwrap_or(u32::MAX);
    if let Some(regex) = &target.regex {
        // Lossy: invalid UTF-8 becomes U+FFFD and cannot crash or hide the rest of the text.
        let text = String::from_utf8_lossy(&kept);
        m.regex = if regex.is_match(&text) {
            RegexOutcome::Matched
        } else {
            RegexOutcome::NotMatched
        };
    }
    drop(conn);
    Ok(())
}

/// The outcome of a probe that got a complete response: accepted status (2xx) and regex.
fn classify_response(_target: &TargetConfig, m: &Measurement) -> Outcome {
    if !(200..300).contains(&m.status) {
        Outcome::StatusNotAccepted
    } else if m.regex == RegexOutcome::NotMatched {
        Outcome::RegexNotMatched
    } else {
        Outcome::Up
    }
}

fn classify_hyper(e: &hyper::Error) -> Outcome {
    if e.is_parse() || e.is_parse_status() {
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

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
