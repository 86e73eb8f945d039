//! `[http]`: where each stage serves `/metrics`, `/healthz` and `/readyz` (see `../http.rs`).

use std::net::SocketAddr;

use serde::Deserialize;

use super::Invalid;

/// The stages' HTTP endpoints: `/metrics`, `/healthz`, `/readyz` (see `http.rs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    /// `host:port` of the bridge's endpoint, or `"off"` (default `127.0.0.1:9464`; port 0 picks
    /// a free port, logged at start).
    #[serde(default = "default_bridge_listen")]
    pub bridge_listen: String,
    /// `host:port` of the sink's endpoint, or `"off"` (default `127.0.0.1:9465`).
    #[serde(default = "default_sink_listen")]
    pub sink_listen: String,
    /// `host:port` of the alert stage's endpoint, or `"off"` (default `127.0.0.1:9466`).
    #[serde(default = "default_alert_listen")]
    pub alert_listen: String,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            bridge_listen: default_bridge_listen(),
            sink_listen: default_sink_listen(),
            alert_listen: default_alert_listen(),
        }
    }
}

fn default_bridge_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_sink_listen() -> String {
    "127.0.0.1:9465".into()
}
fn default_alert_listen() -> String {
    "127.0.0.1:9466".into()
}

/// Where each stage serves `/metrics`, `/healthz` and `/readyz` (None: off).
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub bridge_listen: Option<SocketAddr>,
    pub sink_listen: Option<SocketAddr>,
    pub alert_listen: Option<SocketAddr>,
}

impl TryFrom<RawHttp> for HttpConfig {
    type Error = Invalid;

    fn try_from(raw: RawHttp) -> Result<HttpConfig, Invalid> {
        Ok(HttpConfig {
            bridge_listen: listen("bridge_listen", &raw.bridge_listen)?,
            sink_listen: listen("sink_listen", &raw.sink_listen)?,
            alert_listen: listen("alert_listen", &raw.alert_listen)?,
        })
    }
}

/// `"host:port"` (an IP address) or `"off"`.
fn listen(key: &str, value: &str) -> Result<Option<SocketAddr>, Invalid> {
    match value {
        "off" => Ok(None),
        v => v.parse().map(Some).map_err(|_| {
            (
                format!("http.{key}"),
                format!("{v:?} is not \"host:port\" (an IP address) or \"off\""),
            )
        }),
    }
}
