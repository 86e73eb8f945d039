//! A headless Chromium driven over WebDriver (W3C, through Debian's `chromedriver`), for the
//! dashboard's browser tests and the web benchmark.
//!
//! Raw WebDriver JSON over the tests' one-request HTTP helper (`alerting::http_with`) rather than
//! a client crate: the tests use six commands (new session, navigate, execute script,
//! screenshot, the browser log, delete session), which is about a hundred lines here, while
//! `fantoccini` or `thirtyfour` would bring the `webdriver` crate, their own HTTP and TLS
//! stacks and some forty crates more to build on two cores.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::alerting::http_with;

/// A running chromedriver with one browser session; both end on drop.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
}

/// Where Debian installs them (`tests/services/up` installs the packages `chromium` and
/// `chromium-driver`).
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a headless session with a window
    /// of `width` × `height` and the browser console log recorded.
    ///
    /// # Panics
    /// If chromedriver or Chromium is missing or does not start within 30 s.
    pub async fn start(width: u32, height: u32) -> Browser {
        assert!(
            Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists(),
            "{CHROMEDRIVER} / {CHROMIUM} missing: run tests/services/up (it installs Debian's \
             chromium and chromium-driver)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let status = format!("{}/status", browser.base);
        loop {
            // Listening first (http_with panics on a refused connection), then ready.
            let listening = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok();
            if listening {
                let (code, _, body) = http_with("GET", &status, &[], None).await;
                if code == 200 && body.contains("\"ready\":true") {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not answer within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--no-first-run",
                             "--disable-extensions", format!("--window-size={width},{height}")]
                },
                "goog:loggingPrefs": { "browser": "ALL" }
            }}
        });
        let v = browser.command("POST", "/session", Some(&caps)).await;
        browser.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_owned();
        browser
    }

    /// One WebDriver command; its `value`. Panics on a WebDriver error (e.g. an unexpected
    /// `alert()` dialog: a script ran that should not have).
    async fn command(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let (status, _, text) = http_with(method, &url, &[], body).await;
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"));
        assert_eq!(status, 200, "WebDriver {method} {path}: {v}");
        v.get("value").cloned().unwrap_or(Value::Null)
    }

    fn at(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Navigates and waits for the page's load event.
    pub async fn goto(&self, url: &str) {
        self.command("POST", &self.at("/url"), Some(&json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub async fn script(&self, script: &str) -> Value {
        self.command(
            "POST",
            &self.at("/execute/sync"),
            Some(&json!({ "script": script, "args": [] })),
        )
        .await
    }

    /// Saves a PNG of the viewport to `path` (its folder is created).
    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let v = self.command("GET", &self.at("/screenshot"), None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .expect("a base64 screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }

    /// Browser console entries since the last call (chromedriver's log endpoint): each has
    /// `level` (`SEVERE`, `WARNING`, `INFO`...) and `message`. CSP violations, failed loads and
    /// uncaught exceptions arrive here as `SEVERE`.
    pub async fn console(&self) -> Vec<Value> {
        let v = self
            .command(
                "POST",
                &self.at("/se/log"),
                Some(&json!({ "type": "browser" })),
            )
            .await;
        v.as_array().cloned().unwrap_or_default()
    }

    /// Ends the session (chromedriver closes the browser) and chromedriver.
    pub async fn quit(mut self) {
        let path = self.at("");
        let url = format!("{}{path}", self.base);
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            http_with("DELETE", &url, &[], None),
        )
        .await;
        self.session.clear();
        self.stop();
    }

    /// Deletes the session if one is open (blocking, 5 s at most: also from `Drop`, when a test
    /// panicked), then kills chromedriver by its pid and reaps it.
    fn stop(&mut self) {
        if !self.session.is_empty() {
            use std::io::{Read as _, Write as _};
            let addr = self.base.trim_start_matches("http://").to_owned();
            if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = write!(
                    s,
                    "DELETE /session/{} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
                     Content-Length: 0\r\n\r\n",
                    self.session
                );
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
            }
            self.session.clear();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.stop();
    }
}
