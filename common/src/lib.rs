//! `vantage-common`: the std code both binaries need, so that the ingester never links the
//! agent (ripgrep's rule: code two binaries share lives in a crate both depend on).
//!
//! - [`target`]: raw target definitions and their checks, without file or environment I/O;
//! - [`target_spec`]: raw target ↔ wire `TargetSpec` (central target sets);
//! - [`config_text`]: name rules and TOML errors that never echo a value;
//! - [`tls_files`]: rustls client configurations from PEM files; [`secret`]: `Secret` and the
//!   one way both read passwords (environment variable, file, systemd credential);
//! - [`http_server`]: the bounded HTTP/1 server of every operator endpoint;
//! - [`logging`], [`ratelimit`], [`time`], [`backoff`], [`signal`]: logging set-up, rate-limited
//!   warnings, `now_ms`, the retry loops' exponential backoff, shutdown on SIGINT/SIGTERM.
//!
//! The wire format itself stays in `vantage-proto` (`no_std`, no alloc).

pub mod backoff;
pub mod config_text;
pub mod http_server;
pub mod logging;
pub mod ratelimit;
pub mod secret;
pub mod signal;
pub mod target;
pub mod target_spec;
pub mod time;
pub mod tls_files;
