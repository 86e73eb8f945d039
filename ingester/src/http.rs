//! The operator's HTTP endpoint of a stage: `/metrics` (Prometheus, OpenMetrics text),
//! `/healthz` (the process is alive and serving) and `/readyz` (connected to what the stage
//! needs: 200 when every check passes, 503 naming the failing ones).
//!
//! Served by the shared bounded server (`vantage_common::http_server`): at most
//! [`MAX_CONNECTIONS`] connections at once, each for at most [`CONNECTION_DEADLINE`].

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::net::TcpListener;
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

// The server itself is shared with the agent's metrics endpoint and the dashboard.
pub use vantage_common::http_server::{accept_loop, Handler, Limits};

async fn respond(
    req: Request<hyper::body::Incoming>,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    use vantage_common::http_server::{text_response as text, OPENMETRICS, PLAIN};
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            OPENMETRICS,
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
