//! Alert tests' helpers: the Alertmanager of `tests/services` (its API v2: alerts, silences),
//! the webhook receiver its configuration posts notifications to (one per test process, on
//! `VANTAGE_ALERTMANAGER_WEBHOOK_PORT`), and a webhook receiver of our own for the stage's
//! signed webhooks, which a test can stop and start again on the same port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent_toml::{agent_head, load_agent_config, target_entry};

/// Tests of one binary that drive Alertmanager and agents take turns (two cores, real time).
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Base URL of the test Alertmanager.
pub fn alertmanager_url() -> String {
    std::env::var("VANTAGE_ALERTMANAGER_URL").unwrap_or_else(|_| {
        let port = std::env::var("VANTAGE_ALERTMANAGER_PORT").unwrap_or_else(|_| "9193".into());
        format!("http://127.0.0.1:{port}")
    })
}

/// One plain HTTP/1.0 request to 127.0.0.1 (Alertmanager's API); returns (status, body).
pub async fn http(method: &str, url: &str, body: Option<&Value>) -> (u16, String) {
    let (status, _, body) = http_with(method, url, &[], body).await;
    (status, body)
}

/// [`http`] with extra request headers; returns (status, response head, body). Also the
/// browser tests' WebDriver client and their plain requests to the dashboard. HTTP/1.1 with
/// `Connection: close`; the body is read by its Content-Length, chunked, or to the end
/// (chromedriver answers HTTP/1.0 with nothing, and keeps the socket open after its answer).
pub async fn http_with(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, String, String) {
    // Boxed: callers with many requests in one test stay small on debug builds' stacks.
    Box::pin(http_inner(method, url, headers, body)).await
}

async fn http_inner(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, String, String) {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e} (is the service up? tests/services/up)"));
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Connection: close\r\n{extra}Content-Length: {}\r\n\r\n{payload}",
        payload.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        // The head.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break buf.len();
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut body: Vec<u8> = buf.get(head_end + 4..).unwrap_or_default().to_vec();
        let header = |name: &str| {
            head.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_owned())
        };
        if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            while body.len() < len && read_more(&mut stream, &mut body).await > 0 {}
            body.truncate(len);
        } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            // Read to the last chunk, then decode.
            while !body.windows(5).any(|w| w == b"0\r\n\r\n")
                && read_more(&mut stream, &mut body).await > 0
            {}
            let mut out = Vec::new();
            let mut at = 0;
            while let Some(eol) = body[at..].windows(2).position(|w| w == b"\r\n") {
                let size =
                    usize::from_str_radix(String::from_utf8_lossy(&body[at..at + eol]).trim(), 16)
                        .unwrap_or(0);
                if size == 0 {
                    break;
                }
                let start = at + eol + 2;
                out.extend_from_slice(&body[start..(start + size).min(body.len())]);
                at = start + size + 2;
                if at >= body.len() {
                    break;
                }
            }
            body = out;
        } else {
            while read_more(&mut stream, &mut body).await > 0 {}
        }
        (head, body)
    };
    let (head, body) = tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap_or_else(|_| panic!("{method} {url}: no answer within 30 s"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

/// Reads what arrives next onto `body`; 0 at the end (or on an error).
async fn read_more(stream: &mut tokio::net::TcpStream, body: &mut Vec<u8>) -> usize {
    let mut chunk = vec![0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await.unwrap_or(0);
    body.extend_from_slice(&chunk[..n]);
    n
}

/// Alerts Alertmanager holds whose label `name` is `value` (GET /api/v2/alerts, silenced and
/// inhibited ones included).
pub async fn am_alerts(name: &str, value: &str) -> Vec<Value> {
    let (status, body) = http(
        "GET",
        &format!("{}/api/v2/alerts", alertmanager_url()),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let all: Value = serde_json::from_str(&body).unwrap();
    all.as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a["labels"][name] == value)
        .collect()
}

/// Creates a silence (a maintenance window) for alerts whose labels equal `matchers`, for
/// `for_secs`; returns its id (POST /api/v2/silences).
pub async fn silence(matchers: &[(&str, &str)], for_secs: u64) -> String {
    let now = std::time::SystemTime::now();
    let body = serde_json::json!({
        "matchers": matchers.iter().map(|(n, v)| serde_json::json!({
            "name": n, "value": v, "isRegex": false, "isEqual": true
        })).collect::<Vec<_>>(),
        "startsAt": humantime::format_rfc3339_millis(now).to_string(),
        "endsAt": humantime::format_rfc3339_millis(now + Duration::from_secs(for_secs)).to_string(),
        "createdBy": "vantage tests",
        "comment": "maintenance window",
    });
    let (status, text) = http(
        "POST",
        &format!("{}/api/v2/silences", alertmanager_url()),
        Some(&body),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["silenceID"].as_str().unwrap().to_owned()
}

/// One alert of one Alertmanager notification: the notification's per-alert status
/// (`firing` / `resolved`) and the alert.
#[derive(Debug, Clone)]
pub struct Notified {
    pub status: String,
    pub alert: Value,
}

/// What Alertmanager's receiver posted to this process so far (every notification).
pub struct AmReceiver {
    seen: Arc<Mutex<Vec<Value>>>,
}

impl AmReceiver {
    /// The process's receiver, started on first use on its own thread and runtime (tests each
    /// have a runtime of their own; this one outlives them).
    ///
    /// # Panics
    /// If the port is taken (another test process serving it).
    pub fn shared() -> &'static AmReceiver {
        static RECEIVER: OnceLock<AmReceiver> = OnceLock::new();
        RECEIVER.get_or_init(|| {
            // As tests/services/lib.sh derives it: the Alertmanager port + 1 unless set, so an
            // instance on other ports (VANTAGE_ALERTMANAGER_PORT only) gets its own receiver.
            let port_var = |k: &str| std::env::var(k).ok().and_then(|p| p.parse::<u16>().ok());
            let port: u16 = port_var("VANTAGE_ALERTMANAGER_WEBHOOK_PORT").unwrap_or_else(|| {
                port_var("VANTAGE_ALERTMANAGER_PORT").map_or(9194, |p| p.saturating_add(1))
            });
            let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let s = seen.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = TcpListener::bind(("127.0.0.1", port)).await;
                    let listener = match listener {
                        Ok(l) => {
                            let _ = ready_tx.send(Ok(()));
                            l
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    serve(listener, CancellationToken::new(), move |req| {
                        if let Ok(v) = serde_json::from_slice::<Value>(&req.body) {
                            s.lock().unwrap().push(v);
                        }
                        200
                    })
                    .await;
                });
            });
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("Alertmanager's receiver port {port}: {e}"),
                Err(_) => panic!("Alertmanager's receiver thread died"),
            }
            AmReceiver { seen }
        })
    }

    /// Alerts notified so far whose label `name` is `value`, in arrival order.
    pub fn notified(&self, name: &str, value: &str) -> Vec<Notified> {
        let seen = self.seen.lock().unwrap();
        let mut out = Vec::new();
        for n in seen.iter() {
            for a in n["alerts"].as_array().into_iter().flatten() {
                if a["labels"][name] == value {
                    out.push(Notified {
                        status: a["status"].as_str().unwrap_or_default().to_owned(),
                        alert: a.clone(),
                    });
                }
            }
        }
        out
    }

    /// Waits (up to `limit`) until `check` holds for the notifications of label `name=value`.
    pub async fn wait(
        &self,
        name: &str,
        value: &str,
        limit: Duration,
        what: &str,
        check: impl Fn(&[Notified]) -> bool,
    ) -> Vec<Notified> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let n = self.notified(name, value);
            if check(&n) {
                return n;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {limit:?} waiting for {what}; notifications so far: {n:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A request as a receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::target::header_value(&self.headers, name)
    }
}

/// Serves POSTs on `listener` until `stop`; `answer` records a request and picks the status.
async fn serve(
    listener: TcpListener,
    stop: CancellationToken,
    answer: impl Fn(Received) -> u16 + Send + Sync + 'static,
) {
    let answer = Arc::new(answer);
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
        };
        let answer = answer.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let answer = answer.clone();
                async move {
                    let headers = req
                        .headers()
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_owned(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes().to_vec())
                        .unwrap_or_default();
                    let status = answer(Received { headers, body });
                    let mut r = Response::new(Full::new(Bytes::from_static(b"ok\n")));
                    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// A webhook receiver of the test's own: records every request; `stop` closes the port (the
/// stage then sees connections refused) and `start` opens the same port again.
pub struct WebhookReceiver {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    stop: Option<CancellationToken>,
}

impl WebhookReceiver {
    pub async fn start_new() -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut r = WebhookReceiver {
            addr: listener.local_addr().unwrap(),
            received: Arc::default(),
            stop: None,
        };
        r.serve_on(listener);
        r
    }

    fn serve_on(&mut self, listener: TcpListener) {
        let stop = CancellationToken::new();
        let received = self.received.clone();
        tokio::spawn(serve(listener, stop.clone(), move |r| {
            received.lock().unwrap().push(r);
            200
        }));
        self.stop = Some(stop);
    }

    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            s.cancel();
        }
    }

    pub async fn start(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve_on(listener);
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An in-process agent's task.
pub type AgentTask =
    tokio::task::JoinHandle<Result<vantage_agent::RunSummary, vantage_agent::RunError>>;

/// Starts an agent `<region>-<run id>` in `region` probing target 1 at `url` every `interval`
/// (timeout 80% of it), status heartbeats every second; cancel the token to stop it.
pub fn region_agent(
    run: &crate::harness::Run,
    region: &str,
    url: &str,
    interval: &str,
) -> (CancellationToken, AgentTask) {
    let timeout_ms = humantime::parse_duration(interval)
        .map(|d| d.as_millis() * 4 / 5)
        .unwrap_or(400);
    region_agent_probing(
        run,
        region,
        &[(1, url)],
        interval,
        &format!("{timeout_ms}ms"),
    )
}

/// Starts an agent `<region>-<run id>` in `region` probing each `(id, url)` of `targets` every
/// `interval` with `timeout`, status heartbeats every second; cancel the token to stop it.
pub fn region_agent_probing(
    run: &crate::harness::Run,
    region: &str,
    targets: &[(u32, &str)],
    interval: &str,
    timeout: &str,
) -> (CancellationToken, AgentTask) {
    let agent_id = format!("{region}-{}", run.id);
    let mut text = agent_head(run, &agent_id, region);
    text.push_str(
        "\n[uplink]\nbatch_max = 4\nflush_interval = \"100ms\"\ndrain_timeout = \"2s\"\n\n\
         [fleet]\nheartbeat_interval = \"1s\"\n",
    );
    for (target_id, url) in targets {
        text.push_str(&target_entry(*target_id, url, interval, timeout, ""));
    }
    let config = load_agent_config(run, &format!("agent-{region}.toml"), &text);
    let token = CancellationToken::new();
    let handle = tokio::spawn(vantage_agent::run(
        config,
        Default::default(),
        token.clone(),
    ));
    (token, handle)
}
