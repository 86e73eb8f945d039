//! `[web]`: the dashboard's listen address, access token and page settings
//! (`vantage-ingester web`, see `../web/mod.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Invalid;
use crate::secrets::Secret;

/// `[web]`: the dashboard.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeb {
    /// `host:port` to listen on (default `127.0.0.1:8080`; port 0 picks a free one, logged).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Public status page: no target URLs, no agents, no fleet page (default false).
    #[serde(default)]
    pub public: bool,
    /// Shown in the header and page titles (default `vantage`).
    #[serde(default = "default_title")]
    pub title: String,
    /// Environment variable holding the access token (at least 16 bytes). With a token every
    /// request needs `Authorization: Bearer <token>` (or Basic auth, see `username`).
    pub token_env: Option<String>,
    /// File whose first line is the access token.
    pub token_file: Option<PathBuf>,
    /// Also accept HTTP Basic auth with this user name and the token as password, so a browser
    /// asks for it (default: Bearer only).
    pub username: Option<String>,
    /// A region whose latest result is older than this shows "no data" (default 5m).
    #[serde(default = "default_stale_after", with = "humantime_serde")]
    pub stale_after: Duration,
    /// A region answering now but below this availability (%) over 24 hours shows "degraded"
    /// (default 99).
    #[serde(default = "default_degraded_below")]
    pub degraded_below: f64,
    /// PostgreSQL connections the pages use at most (default 4); requests beyond wait.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Longest time one page's queries may take (default 10s; PostgreSQL statement_timeout).
    #[serde(default = "default_query_timeout", with = "humantime_serde")]
    pub query_timeout: Duration,
}

impl Default for RawWeb {
    fn default() -> Self {
        RawWeb {
            listen: default_listen(),
            public: false,
            title: default_title(),
            token_env: None,
            token_file: None,
            username: None,
            stale_after: default_stale_after(),
            degraded_below: default_degraded_below(),
            connections: default_connections(),
            query_timeout: default_query_timeout(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_title() -> String {
    "vantage".into()
}
fn default_stale_after() -> Duration {
    Duration::from_secs(300)
}
fn default_degraded_below() -> f64 {
    99.0
}
fn default_connections() -> usize {
    4
}
fn default_query_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The validated `[web]`.
#[derive(Debug, Clone)]
pub struct WebConfig {
    pub listen: SocketAddr,
    pub public: bool,
    pub title: String,
    /// The access token; None: no authentication (loopback, or `public`).
    pub token: Option<Secret>,
    pub username: Option<String>,
    pub stale_after: Duration,
    pub degraded_below: f64,
    pub connections: usize,
    pub query_timeout: Duration,
}

impl TryFrom<RawWeb> for WebConfig {
    type Error = Invalid;

    fn try_from(w: RawWeb) -> Result<WebConfig, Invalid> {
        let bad = |key: &str, reason: String| (format!("web.{key}"), reason);
        let listen: SocketAddr = w.listen.parse().map_err(|_| {
            bad(
                "listen",
                format!("{:?} is not \"host:port\" with an IP address", w.listen),
            )
        })?;
        if w.title.is_empty() || w.title.len() > 64 {
            return Err(bad("title", "must be 1 to 64 bytes".into()));
        }
        let token = match (&w.token_env, &w.token_file) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "token_env",
                    "set token_env or token_file, not both".into(),
                ))
            }
            (Some(var), None) => {
                Some(crate::secrets::from_env(var).map_err(|r| bad("token_env", r))?)
            }
            (None, Some(path)) => {
                Some(crate::secrets::from_file(path).map_err(|r| bad("token_file", r))?)
            }
            (None, None) => None,
        };
        if token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            let key = if w.token_env.is_some() {
                "token_env"
            } else {
                "token_file"
            };
            return Err(bad(key, "the token must be at least 16 bytes".into()));
        }
        if let Some(u) = &w.username {
            if token.is_none() {
                return Err(bad(
                    "username",
                    "Basic auth needs a token (token_env or token_file) as its password".into(),
                ));
            }
            if u.is_empty() || u.contains(':') || u.chars().any(char::is_control) {
                return Err(bad(
                    "username",
                    "must be non-empty, without ':' or control characters".into(),
                ));
            }
        }
        if token.is_none() && !w.public && !listen.ip().is_loopback() {
            return Err(bad(
                "listen",
                format!(
                    "{listen} is not a loopback address and no access token is set: set \
                     web.token_env or web.token_file, or web.public = true for a public status \
                     page (no URLs, no fleet)"
                ),
            ));
        }
        if w.stale_after < Duration::from_secs(1) || w.stale_after > Duration::from_secs(86_400) {
            return Err(bad("stale_after", "must be 1s..=1d".into()));
        }
        if !(w.degraded_below > 0.0 && w.degraded_below <= 100.0) {
            return Err(bad(
                "degraded_below",
                format!("{} is not a percentage in (0, 100]", w.degraded_below),
            ));
        }
        if !(1..=64).contains(&w.connections) {
            return Err(bad("connections", "must be 1..=64".into()));
        }
        if w.query_timeout < Duration::from_millis(100)
            || w.query_timeout > Duration::from_secs(300)
        {
            return Err(bad("query_timeout", "must be 100ms..=5m".into()));
        }
        Ok(WebConfig {
            listen,
            public: w.public,
            title: w.title,
            token,
            username: w.username,
            stale_after: w.stale_after,
            degraded_below: w.degraded_below,
            connections: w.connections,
            query_timeout: w.query_timeout,
        })
    }
}

impl Default for WebConfig {
    fn default() -> Self {
        // The defaults above always validate (loopback, no token).
        match WebConfig::try_from(RawWeb::default()) {
            Ok(c) => c,
            Err((key, reason)) => unreachable!("default [web] is invalid: {key}: {reason}"),
        }
    }
}
