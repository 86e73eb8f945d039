//! The one small HTTP/1 server both binaries use for their operator endpoints (the agent's
//! `/metrics`, the ingester stages' `/metrics` `/healthz` `/readyz`, and the dashboard).
//!
//! After hyper's `server/hello` example: one task accepts, each connection is served by its own
//! task, at most [`Limits::max_connections`] at once and each for at most [`Limits::deadline`],
//! so a scraper that never reads cannot pile up tasks.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// A request handler of [`accept_loop`].
pub type Handler = Arc<
    dyn Fn(
            Request<hyper::body::Incoming>,
        ) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>
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
/// `limits.max_connections` at once and each for at most `limits.deadline`.
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

/// A response with `status`, a `content-type` and `body`.
pub fn text_response(
    status: hyper::StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

/// The OpenMetrics text content type both `/metrics` endpoints answer with.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Plain text.
pub const PLAIN: &str = "text/plain; charset=utf-8";
