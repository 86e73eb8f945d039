//! The operator's HTTP endpoint of a stage: `/metrics` (Prometheus, OpenMetrics text),
//! `/healthz` (the process is alive and serving) and `/readyz` (connected to what the stage
//! needs: 200 when every check passes, 503 naming the failing ones).
//!
//! A small hyper 1.x server (after hyper's `server/hello` example): one task accepts, each
//! connection is served by its own task, at most [`MAX_CONNECTIONS`] at once and each for at
//! most [`CONNECTION_DEADLINE`], so a scraper that never reads cannot pile up tasks.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::bridge::BridgeState;
use crate::config::{KafkaConfig, PostgresConfig};

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 32;
/// Longest life of one connection.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// Longest wait for one readiness check.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("Kafka client for readiness checks: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// What `/readyz` checks.
pub struct Readiness {
    /// Whose metrics `/metrics` shows.
    stage: crate::metrics::Stage,
    /// The bridge: connected to the broker and subscribed.
    pub mqtt: Option<Arc<BridgeState>>,
    /// Kafka answers a metadata request for this topic. The client is replaced by a fresh one
    /// after a failed check: librdkafka can lose every broker in a broker restart and never
    /// find one again (the wedge described at `kafka::Producer`), which would make this check
    /// fail for good although the stage works.
    kafka: Option<(std::sync::Mutex<Arc<BaseConsumer>>, KafkaConfig)>,
    /// PostgreSQL answers `SELECT 1` (on a connection of its own, opened on demand).
    postgres: Option<(
        PostgresConfig,
        tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    )>,
}

impl Readiness {
    /// The endpoints of `stage`, with no readiness check yet.
    pub fn new(stage: crate::metrics::Stage) -> Readiness {
        Readiness {
            stage,
            mqtt: None,
            kafka: None,
            postgres: None,
        }
    }

    /// Adds the bridge's MQTT state.
    pub fn mqtt(mut self, state: Arc<BridgeState>) -> Self {
        self.mqtt = Some(state);
        self
    }

    /// Adds a Kafka check: a metadata request for the results topic, on a client of its own
    /// (same settings, so TLS/SASL properties apply).
    pub fn kafka(mut self, config: &KafkaConfig) -> Result<Self, HttpError> {
        let client: BaseConsumer = crate::kafka::client_config(config).create()?;
        self.kafka = Some((std::sync::Mutex::new(Arc::new(client)), config.clone()));
        Ok(self)
    }

    /// Adds a PostgreSQL check.
    pub fn postgres(mut self, config: &PostgresConfig) -> Self {
        self.postgres = Some((config.clone(), tokio::sync::Mutex::new(None)));
        self
    }

    /// Runs every check; returns (all passed, one line per check).
    pub async fn check(&self) -> (bool, String) {
        let mut lines = Vec::new();
        if let Some(state) = &self.mqtt {
            let ok =
                state.connected.load(Ordering::Acquire) && state.subscribed.load(Ordering::Acquire);
            lines.push((
                "mqtt",
                if ok {
                    Ok(())
                } else {
                    Err("not connected and subscribed".to_owned())
                },
            ));
            // The bridge's own producer: the metadata check below uses a client of its own,
            // which says nothing about a producer that wedged (kafka.rs `Producer`).
            let h = state.kafka_health();
            lines.push((
                "kafka_producer",
                if h.stalled {
                    Err(format!(
                        "stalled: {} deliveries waiting, none confirmed for {:.0?} (replaced {} \
                         times so far)",
                        h.waiting, h.waiting_for, h.replacements
                    ))
                } else {
                    Ok(())
                },
            ));
        }
        if let Some((slot, config)) = &self.kafka {
            let client = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let topic = config.topic.clone();
            let r = tokio::task::spawn_blocking(move || {
                // This client is never consumed from: drain the log and error events librdkafka
                // queues for it, or they pile up for the life of the process.
                for _ in 0..1000 {
                    if client.poll(Duration::ZERO).is_none() {
                        break;
                    }
                }
                let metadata = client
                    .fetch_metadata(Some(&topic), CHECK_TIMEOUT)
                    .map_err(|e| e.to_string())?;
                match metadata.topics().iter().find(|t| t.name() == topic) {
                    Some(t) if t.error().is_none() => Ok(()),
                    Some(t) => Err(format!("topic {topic}: {:?}", t.error())),
                    None => Err(format!("topic {topic} not in the metadata")),
                }
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            if r.is_err() {
                if let Ok(fresh) = crate::kafka::client_config(config).create::<BaseConsumer>() {
                    // The old one is destroyed off the runtime (rd_kafka_destroy may block).
                    let old = std::mem::replace(
                        &mut *slot.lock().unwrap_or_else(|e| e.into_inner()),
                        Arc::new(fresh),
                    );
                    tokio::task::spawn_blocking(move || drop(old));
                }
            }
            lines.push(("kafka", r));
        }
        if let Some((config, client)) = &self.postgres {
            let r = tokio::time::timeout(CHECK_TIMEOUT, async {
                let mut client = client.lock().await;
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    *client = Some(
                        crate::db::connect(config)
                            .await
                            .map_err(|e| e.to_string())?,
                    );
                }
                let c = client.as_ref().ok_or("not connected")?;
                let r = c.simple_query("SELECT 1").await.map(|_| ());
                r.map_err(|e| {
                    *client = None;
                    e.to_string()
                })
            })
            .await
            .unwrap_or_else(|_| Err("timed out".to_owned()));
            lines.push(("postgres", r));
        }
        let ready = lines.iter().all(|(_, r)| r.is_ok());
        let text = lines
            .iter()
            .map(|(name, r)| match r {
                Ok(()) => format!("{name}: ok\n"),
                Err(e) => format!("{name}: {e}\n"),
            })
            .collect();
        (ready, text)
    }
}

/// Binds `addr` (port 0 picks a free one) and serves until `shutdown`; returns the bound
/// address. The stage logs it (`http listening`), which is how tests find an ephemeral port.
pub async fn start(
    addr: SocketAddr,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<SocketAddr, HttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %bound, "http listening (/metrics, /healthz, /readyz)");
    tokio::spawn(serve(listener, Arc::new(readiness), shutdown));
    Ok(bound)
}

async fn serve(listener: TcpListener, readiness: Arc<Readiness>, shutdown: CancellationToken) {
    let handler: Handler = Arc::new(move |req| {
        let readiness = readiness.clone();
        Box::pin(async move { respond(req, &readiness).await })
    });
    let limits = Limits {
        max_connections: MAX_CONNECTIONS,
        deadline: CONNECTION_DEADLINE,
        keep_alive: false,
    };
    accept_loop(listener, limits, shutdown, handler).await;
}

/// A request handler of [`accept_loop`].
pub type Handler = Arc<
    dyn Fn(
            Request<hyper::body::Incoming>,
        ) -> futures::future::BoxFuture<'static, Response<Full<Bytes>>>
        + Send
        + Sync,
>;

/// How [`accept_loop`] bounds its connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Longest life of one connection (keep-alive included).
    pub deadline: Duration,
    pub keep_alive: bool,
}

/// Accepts on `listener` until `shutdown`: each connection served by its own task, at most
/// `limits.max_connections` at once and each for at most `limits.deadline`, so a client that
/// never reads cannot pile up tasks. Shared by the stages' endpoint and the dashboard (`web`).
pub async fn accept_loop(
    listener: TcpListener,
    limits: Limits,
    shutdown: CancellationToken,
    handler: Handler,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let f = handler(req);
                async move { Ok::<_, Infallible>(f.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(limits.keep_alive)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(limits.deadline, conn).await;
            drop(permit);
        });
    }
}

async fn respond(
    req: Request<hyper::body::Incoming>,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, content_type: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(content_type),
        );
        r
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            crate::metrics::global().encode(readiness.stage),
        ),
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => {
            let (ready, body) = readiness.check().await;
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, PLAIN, body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
