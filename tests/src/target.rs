//! A local HTTP(S) target whose behaviour is chosen per request by query parameters, in the
//! spirit of httpbin and blackbox_exporter's test servers:
//!
//! | parameter | effect |
//! |---|---|
//! | `delay_ms=N` | wait N ms before answering |
//! | `status=N` | answer with status N |
//! | `redirect=N` | answer 302 to the same URL with `redirect=N-1`, until 0 |
//! | `loop=1` | answer 302 to the very same URL, forever |
//! | `size=N` | a body of N bytes (`BODY` repeated) instead of `BODY` |
//! | `split=1` | send `BODY` in two chunks, cut in the middle of "target: ok" |
//! | `drip_ms=N` | send the body one byte every N ms |
//! | `stall=1` | send headers and the first body chunk, then nothing, forever |
//! | `gzip=1` | gzip the body (`Content-Encoding: gzip`) |
//! | `bad_utf8=1` | put invalid UTF-8 bytes before `BODY` |
//! | `flip=NAME` | every second request with this NAME answers 500 (a flapping target) |
//! | `redirect_to=URL` | answer 302 to `URL` (percent-encoded), e.g. another server's |
//!
//! The default body is [`BODY`], which contains "target: ok". Like nginx or Go's net/http, the
//! target answers 400 to a request whose `Host` header is missing or not a valid authority,
//! and it records every request's headers ([`TargetServer::seen`]) so tests can check what
//! arrived where.
//!
//! [`RawServer`] is the other kind of target: it answers every connection with a fixed script
//! of bytes and pauses, for servers that misbehave below HTTP (garbage, broken chunking,
//! interim responses, headers that never end).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const BODY: &str = "<html><body>vantage test target: ok</body></html>\n";

/// A running target; stops when dropped.
pub struct TargetServer {
    pub addr: SocketAddr,
    scheme: &'static str,
    stop: CancellationToken,
    seen: Seen,
}

/// One request as the target received it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Path and query.
    pub target: String,
    /// Header names (lowercase) and values, in arrival order.
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    /// The value of header `name` (lowercase), if it arrived.
    pub fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
    }
}

/// The value of the first header named `name` in `headers` (names and values in arrival order).
pub fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The requests a target has received, the first [`MAX_SEEN`] of them.
type Seen = Arc<Mutex<Vec<SeenRequest>>>;

/// Requests recorded per target; later ones are served but not recorded (memory stays flat
/// when the benchmark sends millions).
pub const MAX_SEEN: usize = 256;

impl TargetServer {
    /// Binds `addr` (use `127.0.0.1:0` for any free port) and serves plain HTTP until dropped.
    pub async fn start(addr: &str) -> std::io::Result<TargetServer> {
        Self::start_with(addr, None).await
    }

    /// The same over TLS with `config` (see [`crate::tls`] for test certificates).
    pub async fn start_tls(
        addr: &str,
        config: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<TargetServer> {
        Self::start_with(addr, Some(tokio_rustls::TlsAcceptor::from(config))).await
    }

    async fn start_with(
        addr: &str,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<TargetServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let seen = Seen::default();
        tokio::spawn(serve_with(listener, tls, stop.clone(), seen.clone()));
        Ok(TargetServer {
            addr,
            scheme,
            stop,
            seen,
        })
    }

    /// The requests received so far, in order.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// `<scheme>://127.0.0.1:<port><path_and_query>`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, path_and_query)
    }

    /// The same URL with a host name instead of the IP (for TLS name checks).
    pub fn url_with_host(&self, host: &str, path_and_query: &str) -> String {
        format!(
            "{}://{}:{}{}",
            self.scheme,
            host,
            self.addr.port(),
            path_and_query
        )
    }
}

impl Drop for TargetServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves plain HTTP connections from `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, stop: CancellationToken) {
    serve_with(listener, None, stop, Seen::default()).await
}

async fn serve_with(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
    seen: Seen,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let stop = stop.clone();
        let tls = tls.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, stop, seen).await,
                Some(acceptor) => {
                    // A failed handshake (the client rejected our certificate) just ends here.
                    if let Ok(s) = acceptor.accept(stream).await {
                        serve_connection(s, stop, seen).await
                    }
                }
            }
        });
    }
}

async fn serve_connection<S>(stream: S, stop: CancellationToken, seen: Seen)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        record(&seen, &req);
        answer(req)
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        _ = stop.cancelled() => {}
    }
}

/// Requests seen per `flip=NAME` (u64::MAX: flipping stopped, always up).
type Flips = std::sync::Mutex<std::collections::HashMap<String, u64>>;
static FLIPS: std::sync::LazyLock<Flips> = std::sync::LazyLock::new(Default::default);

/// Stops the flapping of `flip=NAME`: from now on it answers 200.
pub fn stop_flipping(name: &str) {
    if let Ok(mut f) = FLIPS.lock() {
        f.insert(name.to_owned(), u64::MAX);
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn record(seen: &Seen, req: &Request<hyper::body::Incoming>) {
    let Ok(mut seen) = seen.lock() else { return };
    if seen.len() >= MAX_SEEN {
        return;
    }
    seen.push(SeenRequest {
        target: req
            .uri()
            .path_and_query()
            .map_or_else(String::new, |p| p.to_string()),
        headers: req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    });
}

async fn answer(req: Request<hyper::body::Incoming>) -> Result<Response<Body>, Infallible> {
    // A missing or malformed Host (e.g. `[[::1]]:8080`) gets 400, as real servers answer.
    let host_ok = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h.parse::<hyper::http::uri::Authority>().is_ok());
    if !host_ok {
        return Ok(Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(full("bad Host header\n"))
            .unwrap_or_else(|_| Response::new(full(""))));
    }
    let query = req.uri().query().unwrap_or_default().to_owned();
    let param = |name: &str| -> Option<u64> {
        query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.parse().ok())
    };
    if let Some(ms) = param("delay_ms").filter(|ms| *ms > 0) {
        // A thread sleep on the blocking pool overshoots by tens of microseconds; tokio's timer
        // would round up to the next millisecond and blur the timing-accuracy benchmark.
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(Duration::from_millis(ms)))
            .await;
    }
    let path = req.uri().path().to_owned();
    let flip = query
        .split('&')
        .find_map(|p| p.strip_prefix("flip="))
        .map(str::to_owned);
    if let Some(name) = flip {
        let n = FLIPS
            .lock()
            .map(|mut f| {
                let n = f.entry(name).or_insert(0);
                // u64::MAX stays: flipping stopped.
                *n = n.saturating_add(1);
                *n
            })
            .unwrap_or(0);
        if n % 2 == 0 && n != u64::MAX {
            return Ok(Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .body(full("flip\n"))
                .unwrap_or_else(|_| Response::new(full(""))));
        }
    }
    if let Some(to) = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "redirect_to")
        .map(|(_, v)| v.into_owned())
    {
        return Ok(redirect(&to));
    }
    if param("loop") == Some(1) {
        return Ok(redirect(&format!("{path}?{query}")));
    }
    if let Some(n) = param("redirect").filter(|n| *n > 0) {
        let next = query.replace(&format!("redirect={n}"), &format!("redirect={}", n - 1));
        return Ok(redirect(&format!("{path}?{next}")));
    }
    let status = param("status")
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .unwrap_or(StatusCode::OK);

    let mut content: Vec<u8> = match param("size") {
        Some(n) => BODY.bytes().cycle().take(n as usize).collect(),
        None => BODY.as_bytes().to_vec(),
    };
    if param("bad_utf8") == Some(1) {
        content.splice(0..0, [0xFF, 0xFE, 0xC3, 0x28, 0x80]);
    }
    let mut response = Response::builder().status(status);
    if param("gzip") == Some(1) {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = enc.write_all(&content);
        content = enc.finish().unwrap_or_default();
        response = response.header("content-encoding", "gzip");
    }

    let body = if param("split") == Some(1) {
        let cut = BODY.find("target: ok").map_or(0, |i| i + 4);
        let (a, b) = content.split_at(cut.min(content.len()));
        let chunks = vec![Bytes::copy_from_slice(a), Bytes::copy_from_slice(b)];
        // The pause makes the two halves arrive in two reads on the client.
        paced(chunks, Duration::from_millis(30), content.len())
    } else if let Some(ms) = param("drip_ms") {
        let chunks = content
            .iter()
            .map(|b| Bytes::copy_from_slice(&[*b]))
            .collect();
        paced(chunks, Duration::from_millis(ms), content.len())
    } else if param("stall") == Some(1) {
        let first = Bytes::copy_from_slice(&content[..content.len() / 2]);
        let stream = futures::stream::once(async move { Ok(Frame::data(first)) })
            .chain(futures::stream::pending());
        response = response.header("content-length", content.len());
        BodyExt::boxed(StreamBody::new(stream))
    } else {
        full(content)
    };
    Ok(response
        .body(body)
        .unwrap_or_else(|_| Response::new(full(""))))
}

/// A body sent as `chunks`, waiting `pause` before each one after the first.
fn paced(chunks: Vec<Bytes>, pause: Duration, _len: usize) -> Body {
    let stream =
        futures::stream::iter(chunks.into_iter().enumerate()).then(move |(i, c)| async move {
            if i > 0 {
                tokio::time::sleep(pause).await;
            }
            Ok::<_, Infallible>(Frame::data(c))
        });
    BodyExt::boxed(StreamBody::new(stream))
}

fn redirect(location: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::FOUND)
        .header("location", location)
        .body(full(""))
        .unwrap_or_else(|_| Response::new(full("")))
}

/// One step of a [`RawServer`]'s answer.
#[derive(Debug, Clone)]
pub enum Step {
    /// Write these bytes.
    Send(Vec<u8>),
    /// Wait this long.
    Pause(Duration),
    /// Keep the connection open, silent, until the server is dropped.
    Hold,
}

impl Step {
    /// `Send` of a text.
    pub fn text(s: &str) -> Step {
        Step::Send(s.as_bytes().to_vec())
    }
}

/// A TCP server that reads each request's head and answers with the same script of raw bytes,
/// then closes the connection (unless the script ends in [`Step::Hold`]). Stops when dropped.
pub struct RawServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl RawServer {
    /// Listens on 127.0.0.1 (any free port).
    pub async fn start(script: Vec<Step>) -> std::io::Result<RawServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let script = Arc::new(script);
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let mut stream = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let (script, token) = (script.clone(), token.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = run_script(&mut stream, &script) => {}
                    }
                });
            }
        });
        Ok(RawServer { addr, stop })
    }

    /// `http://127.0.0.1:<port><path_and_query>`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn run_script(stream: &mut tokio::net::TcpStream, script: &[Step]) {
    // Read the request head (up to its blank line, or 64 KiB); the probe sends no body.
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    for step in script {
        match step {
            Step::Send(bytes) => {
                if stream.write_all(bytes).await.is_err() {
                    return;
                }
            }
            Step::Pause(d) => tokio::time::sleep(*d).await,
            Step::Hold => std::future::pending::<()>().await,
        }
    }
}
