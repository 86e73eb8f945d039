//! A local HTTP target whose behaviour is chosen per request by query parameters:
//! `delay_ms=N` waits before answering, `status=N` sets the status code. The body always
//! contains "vantage test target: ok".

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const BODY: &str = "<html><body>vantage test target: ok</body></html>\n";

/// A running target; stops when dropped.
pub struct TargetServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl TargetServer {
    /// Binds `addr` (use `127.0.0.1:0` for any free port) and serves until dropped.
    pub async fn start(addr: &str) -> std::io::Result<TargetServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, stop.clone()));
        Ok(TargetServer { addr, stop })
    }

    /// `http://<addr><path_and_query>`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }
}

impl Drop for TargetServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves connections from `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer));
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn answer(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut delay = Duration::ZERO;
    let mut status = StatusCode::OK;
    for pair in req.uri().query().unwrap_or_default().split('&') {
        match pair.split_once('=') {
            Some(("delay_ms", v)) => delay = Duration::from_millis(v.parse().unwrap_or(0)),
            Some(("status", v)) => {
                status = v
                    .parse::<u16>()
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::OK)
            }
            _ => {}
        }
    }
    tokio::time::sleep(delay).await;
    let mut response = Response::new(Full::new(Bytes::from_static(BODY.as_bytes())));
    *response.status_mut() = status;
    Ok(response)
}
