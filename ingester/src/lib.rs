//! vantage-ingester: the central side of vantage.
//!
//! Stages (see ARCHITECTURE.md): [`bridge`] (MQTT → Kafka) and [`sink`] (Kafka → PostgreSQL),
//! plus admin commands ([`db::migrate`], [`report`], [`targets`] apply/list/diff, [`fleet`]
//! agents). Each stage's `run(config, shutdown)` returns
//! when `shutdown` fires and its in-flight work is durable.

pub mod ack_book;
pub mod alert;
pub mod assign;
pub mod batch;
pub mod bridge;
pub mod clock;
pub mod commands;
pub mod config;
pub mod db;
pub mod fleet;
pub mod http;
pub mod kafka;
pub mod logging;
pub mod metrics;
pub mod ratelimit;
pub mod report;
pub mod secrets;
pub mod shutdown;
pub mod sink;
pub mod status;
pub mod storage;
pub mod table;
pub mod targets;
pub mod tls;
pub mod web;

pub use config::Config;
