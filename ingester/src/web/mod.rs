//! `vantage-ingester web`: the read-only dashboard and status page (docs/web.md).
//!
//! A hyper server (the stages' accept loop, `http::accept_loop`) that answers GET and HEAD
//! only, renders pages on the server ([`pages`], maud) from what [`data`] reads through the SQL
//! interface, and gives each page a JSON twin under `/api/`. Static files ([`assets`]) are
//! embedded and served under content-hashed names. Every response carries a strict
//! Content-Security-Policy (no inline script or style, nothing from other origins) and is
//! gzipped when the client accepts it. Access is open on loopback, or guarded by a token (Bearer,
//! or Basic with `username`) read from a secret; `public = true` is the status-page mode, which
//! hides URLs, agents and the fleet.

pub mod assets;
pub mod data;
pub mod pages;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE, VARY};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::PostgresConfig;

/// The policy every response carries. `'self'` only: the pages load their script, styles and
/// icon from this server, the charts' data is a JSON block (`type="application/json"` is not
/// executed, so it needs no hash), and uPlot needs no `eval` and sets styles through the CSSOM,
/// which `style-src` does not govern.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; base-uri 'none'; form-action 'none'; \
                       frame-ancestors 'none'";

pub use crate::config::web::{RawWeb, WebConfig};

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("PostgreSQL: {0}")]
    Db(#[from] crate::db::DbError),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("the server is shutting down")]
    Closed,
    #[error(
        "schema {schema} is at version {have}, the dashboard needs {need}: run \
         `vantage-ingester migrate` (the web stage only reads)"
    )]
    Schema {
        schema: String,
        have: i32,
        need: i32,
    },
}

/// The newest migration the pages read from (0008_web.sql).
const NEEDS_SCHEMA: i32 = 8;

/// PostgreSQL connections for the pages: at most `size` at once, each read-only with a
/// statement timeout, kept for the next request while they live.
struct Pool {
    config: PostgresConfig,
    timeout: Duration,
    idle: std::sync::Mutex<Vec<tokio_postgres::Client>>,
    slots: tokio::sync::Semaphore,
}

struct Lease<'a> {
    pool: &'a Pool,
    client: Option<tokio_postgres::Client>,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Pool {
    async fn get(&self) -> Result<Lease<'_>, WebError> {
        let permit = self.slots.acquire().await.map_err(|_| WebError::Closed)?;
        self.lease(permit).await
    }

    /// A connection if a slot is free now, else None.
    async fn try_get(&self) -> Result<Option<Lease<'_>>, WebError> {
        match self.slots.try_acquire() {
            Ok(permit) => self.lease(permit).await.map(Some),
            Err(_) => Ok(None),
        }
    }

    async fn lease<'a>(
        &'a self,
        permit: tokio::sync::SemaphorePermit<'a>,
    ) -> Result<Lease<'a>, WebError> {
        let idle = self.idle.lock().ok().and_then(|mut v| v.pop());
        let client = match idle {
            Some(c) if !c.is_closed() => c,
            _ => {
                let c = crate::db::connect(&self.config).await?;
                // Read-only sessions: nothing the web stage runs can write, whatever a bug in
                // it tried. JIT off: its compile time dwarfs these small queries.
                c.batch_execute(&format!(
                    "SET default_transaction_read_only = on; SET jit = off; \
                     SET statement_timeout = {}",
                    self.timeout.as_millis()
                ))
                .await?;
                c
            }
        };
        Ok(Lease {
            pool: self,
            client: Some(client),
            _permit: permit,
        })
    }
}

impl std::ops::Deref for Lease<'_> {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &tokio_postgres::Client {
        // Present from get() until drop.
        self.client.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !c.is_closed() {
                if let Ok(mut idle) = self.pool.idle.lock() {
                    idle.push(c);
                }
            }
        }
    }
}

struct Server {
    web: WebConfig,
    judgement: data::Judgement,
    pool: Pool,
}

/// Checks the schema, binds `web.listen` and serves until `shutdown`; returns the bound
/// address (logged as `web listening`) and the serving task.
pub async fn start(
    postgres: &PostgresConfig,
    web: &WebConfig,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), WebError> {
    let client = crate::db::connect(postgres).await?;
    let have = crate::db::schema_version(&client).await?;
    if have < NEEDS_SCHEMA {
        return Err(WebError::Schema {
            schema: postgres.schema.clone(),
            have,
            need: NEEDS_SCHEMA,
        });
    }
    let listener = TcpListener::bind(web.listen)
        .await
        .map_err(|source| WebError::Bind {
            addr: web.listen,
            source,
        })?;
    let bound = listener.local_addr().unwrap_or(web.listen);
    tracing::info!(
        addr = %bound,
        public = web.public,
        auth = if web.token.is_some() { "token" } else { "none" },
        "web listening"
    );
    let server = Arc::new(Server {
        judgement: data::Judgement {
            stale_after_s: web.stale_after.as_secs_f64(),
            degraded_below: web.degraded_below,
            public: web.public,
        },
        pool: Pool {
            config: postgres.clone(),
            timeout: web.query_timeout,
            idle: std::sync::Mutex::new(vec![client]),
            slots: tokio::sync::Semaphore::new(web.connections),
        },
        web: web.clone(),
    });
    let handler: crate::http::Handler = Arc::new(move |req| {
        let server = server.clone();
        Box::pin(async move { server.respond(req).await })
    });
    let limits = crate::http::Limits {
        max_connections: 64,
        // Keep-alive (a page loads four files), but no connection lives longer than this.
        deadline: Duration::from_secs(30),
        keep_alive: true,
    };
    let task = tokio::spawn(crate::http::accept_loop(
        listener, limits, shutdown, handler,
    ));
    Ok((bound, task))
}

/// `vantage-ingester web`: serves until `shutdown`.
pub async fn run(config: &crate::Config, shutdown: CancellationToken) -> Result<(), WebError> {
    let (_, task) = start(config.postgres()?, &config.web, shutdown).await?;
    let _ = task.await;
    Ok(())
}

/// gzip of `bytes` at `level`.
pub fn gzip(bytes: &[u8], level: flate2::Compression) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(bytes.len() / 3), level);
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(bytes);
    enc.finish().unwrap_or_default()
}

/// Whether the request's `Accept-Encoding` lists gzip (with a q-value above 0).
fn accepts_gzip(headers: &hyper::HeaderMap) -> bool {
    headers
        .get_all(hyper::header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let q0 = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f64>().ok())
                    == Some(0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !q0
        })
}

/// Equal in time independent of where they differ (the token check).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of query parameter `key` (no percent-decoding: every accepted value is a plain
/// token compared against a fixed list).
fn param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

struct Reply {
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    /// Already gzipped (an asset).
    gzipped: Option<&'static [u8]>,
    cache: &'static str,
    www_authenticate: Option<&'static str>,
}

impl Reply {
    fn html(status: StatusCode, markup: maud::Markup) -> Reply {
        Reply {
            status,
            content_type: "text/html; charset=utf-8",
            body: Bytes::from(markup.into_string()),
            gzipped: None,
            cache: "no-cache",
            www_authenticate: None,
        }
    }

    fn json(value: &impl serde::Serialize) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type: "application/json",
            body: Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
            gzipped: None,
            cache: "no-cache",
            www_authenticate: None,
        }
    }

    fn text(status: StatusCode, text: &'static str) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::from_static(text.as_bytes()),
            gzipped: None,
            cache: "no-store",
            www_authenticate: None,
        }
    }
}

impl Server {
    fn site(&self) -> pages::Site<'_> {
        pages::Site {
            title: &self.web.title,
            public: self.web.public,
        }
    }

    fn authorized(&self, req: &Request<hyper::body::Incoming>) -> bool {
        let Some(token) = &self.web.token else {
            return true;
        };
        let Some(value) = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        if let Some(given) = value.strip_prefix("Bearer ") {
            return same(given.trim().as_bytes(), token.expose().as_bytes());
        }
        if let (Some(user), Some(encoded)) = (&self.web.username, value.strip_prefix("Basic ")) {
            use base64::Engine as _;
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim())
            else {
                return false;
            };
            let expected = format!("{user}:{}", token.expose());
            return same(&decoded, expected.as_bytes());
        }
        false
    }

    async fn respond(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let gzip_ok = accepts_gzip(req.headers());
        let reply = self.route(&req).await;
        finish(reply, gzip_ok, req.method() == Method::HEAD)
    }

    async fn route(&self, req: &Request<hyper::body::Incoming>) -> Reply {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Reply::text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        let path = req.uri().path();
        if path == "/healthz" {
            return Reply::text(StatusCode::OK, "ok\n");
        }
        if !self.authorized(req) {
            let mut r = Reply::text(StatusCode::UNAUTHORIZED, "unauthorized\n");
            r.www_authenticate = Some(if self.web.username.is_some() {
                "Basic realm=\"vantage\", charset=\"UTF-8\""
            } else {
                "Bearer realm=\"vantage\""
            });
            return r;
        }
        if let Some(name) = path.strip_prefix("/static/") {
            return match assets::find(name) {
                Some(a) => Reply {
                    status: StatusCode::OK,
                    content_type: a.asset.content_type,
                    body: Bytes::from_static(a.asset.bytes),
                    gzipped: Some(&a.gzipped),
                    // The name changes with the content, so the file never does.
                    cache: "public, max-age=31536000, immutable",
                    www_authenticate: None,
                },
                None => Reply::text(StatusCode::NOT_FOUND, "not found\n"),
            };
        }
        let query = req.uri().query();
        let (api, page) = match path.strip_prefix("/api") {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => (true, rest),
            _ => (false, path),
        };
        // `/api/overview` is the twin of `/`.
        let page = match page {
            "" | "/overview" if api => "/",
            "" => "/",
            p => p,
        };
        let window = match param(query, "window") {
            None => Some(data::Window::default_window()),
            Some(w) => data::Window::parse(w),
        };
        let Some(window) = window else {
            return self.not_found(api, "no such window: use 1h, 6h, 24h, 7d, 30d or 90d");
        };
        let client = match self.pool.get().await {
            Ok(c) => c,
            Err(e) => return self.unavailable(api, &e.to_string()),
        };
        let j = &self.judgement;
        let site = self.site();
        // The overview and the target page run their longest read on a second connection when
        // the pool has one to give: only when free, since waiting for it while holding one could
        // deadlock requests that each hold one.
        let second = if self.web.connections > 1 && (page == "/" || page.starts_with("/targets/")) {
            match self.pool.try_get().await {
                Ok(c) => c,
                Err(e) => return self.unavailable(api, &e.to_string()),
            }
        } else {
            None
        };
        let other: &tokio_postgres::Client = second.as_deref().unwrap_or(&client);
        match page {
            "/" => match data::overview(&client, other, j).await {
                Ok(o) if api => Reply::json(&o),
                Ok(o) => Reply::html(StatusCode::OK, pages::overview(&site, &o)),
                Err(e) => self.unavailable(api, &e.to_string()),
            },
            "/regions" => {
                let metric = match param(query, "metric") {
                    Some("availability") => "availability",
                    _ => "p95",
                };
                match data::regions(&client, j, window).await {
                    Ok(r) if api => Reply::json(&r),
                    Ok(r) => Reply::html(StatusCode::OK, pages::regions(&site, &r, metric)),
                    Err(e) => self.unavailable(api, &e.to_string()),
                }
            }
            "/fleet" if !self.web.public => match data::fleet(&client).await {
                Ok(f) if api => Reply::json(&f),
                Ok(f) => Reply::html(StatusCode::OK, pages::fleet(&site, &f)),
                Err(e) => self.unavailable(api, &e.to_string()),
            },
            "/incidents" => match data::incidents(&client, j).await {
                Ok(i) if api => Reply::json(&i),
                Ok(i) => Reply::html(StatusCode::OK, pages::incidents(&site, &i)),
                Err(e) => self.unavailable(api, &e.to_string()),
            },
            p => match p.strip_prefix("/targets/").map(str::parse::<i32>) {
                Some(Ok(id)) => match data::target_page(&client, other, j, id, window).await {
                    Ok(Some(t)) if api => Reply::json(&t),
                    Ok(Some(t)) => Reply::html(StatusCode::OK, pages::target(&site, &t)),
                    Ok(None) => self.not_found(api, "no such target"),
                    Err(e) => self.unavailable(api, &e.to_string()),
                },
                _ => self.not_found(api, "no such page"),
            },
        }
    }

    fn not_found(&self, api: bool, what: &'static str) -> Reply {
        self.error(api, StatusCode::NOT_FOUND, "Not found", what)
    }

    /// PostgreSQL failed or is unreachable: 503, the cause logged (not shown: it may name
    /// hosts and schemas).
    fn unavailable(&self, api: bool, error: &str) -> Reply {
        tracing::warn!(error, "web: page query failed");
        let what = "the database did not answer; try again shortly";
        self.error(api, StatusCode::SERVICE_UNAVAILABLE, "Unavailable", what)
    }

    /// An error reply with `status`: `{"error": what}` for the API, else a page titled `title`.
    fn error(&self, api: bool, status: StatusCode, title: &str, what: &str) -> Reply {
        if api {
            let mut r = Reply::json(&serde_json::json!({ "error": what }));
            r.status = status;
            r
        } else {
            Reply::html(status, pages::message(&self.site(), title, what))
        }
    }
}

/// The response: security headers on everything, gzip when accepted and worth it.
fn finish(reply: Reply, gzip_ok: bool, head: bool) -> Response<Full<Bytes>> {
    let (body, encoded) = match (gzip_ok, reply.gzipped) {
        (true, Some(z)) => (Bytes::from_static(z), true),
        (true, None) if reply.body.len() > 1024 => (
            Bytes::from(gzip(&reply.body, flate2::Compression::fast())),
            true,
        ),
        _ => (reply.body, false),
    };
    let mut r = Response::new(Full::new(if head { Bytes::new() } else { body }));
    *r.status_mut() = reply.status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static(reply.cache));
    h.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
    if encoded {
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    if let Some(v) = reply.www_authenticate {
        h.insert(hyper::header::WWW_AUTHENTICATE, HeaderValue::from_static(v));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(text: &str) -> Result<WebConfig, (String, String)> {
        let raw: RawWeb = toml::from_str(text).unwrap();
        WebConfig::try_from(raw)
    }

    #[test]
    fn defaults_listen_on_loopback_without_auth() {
        let w = web("").unwrap();
        assert_eq!(w.listen, "127.0.0.1:8080".parse().unwrap());
        assert!(w.token.is_none() && !w.public);
    }

    #[test]
    fn bad_settings_name_the_key() {
        let key = |t: &str| web(t).unwrap_err().0;
        assert_eq!(key("listen = \"0.0.0.0:80\""), "web.listen");
        assert_eq!(key("listen = \"localhost:80\""), "web.listen");
        assert_eq!(
            key("token_env = \"VANTAGE_TEST_NO_SUCH_TOKEN\""),
            "web.token_env"
        );
        assert_eq!(key("username = \"ops\""), "web.username");
        assert_eq!(key("degraded_below = 0"), "web.degraded_below");
        assert_eq!(key("stale_after = \"0s\""), "web.stale_after");
        assert_eq!(key("connections = 0"), "web.connections");
        assert_eq!(key("title = \"\""), "web.title");
        let dir = std::env::temp_dir().join(format!("vantage-web-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let e = web(&format!("token_file = {:?}", short.display().to_string())).unwrap_err();
        assert_eq!(e.0, "web.token_file");
        assert!(e.1.contains("16 bytes") && !e.1.contains("abc"), "{e:?}");
        // Public or with a token, another address is fine.
        web("listen = \"0.0.0.0:80\"\npublic = true").unwrap();
        let long = dir.join("long");
        std::fs::write(&long, "0123456789abcdef0123\n").unwrap();
        let w = web(&format!(
            "listen = \"0.0.0.0:80\"\ntoken_file = {:?}\nusername = \"ops\"",
            long.display().to_string()
        ))
        .unwrap();
        assert_eq!(w.token.unwrap().expose(), "0123456789abcdef0123");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn gzip_is_taken_only_when_offered() {
        let accepts = |v: &str| {
            let mut h = hyper::HeaderMap::new();
            h.insert(
                hyper::header::ACCEPT_ENCODING,
                HeaderValue::from_str(v).unwrap(),
            );
            accepts_gzip(&h)
        };
        assert!(accepts("gzip, deflate, br"));
        assert!(!accepts("br"));
        assert!(!accepts("gzip;q=0"));
        let z = gzip(&[b'a'; 10_000], flate2::Compression::fast());
        assert!(z.len() < 200 && z.starts_with(&[0x1f, 0x8b]));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcdeX"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcde"));
        assert_eq!(param(Some("a=1&window=7d"), "window"), Some("7d"));
        assert_eq!(param(None, "window"), None);
    }
}
