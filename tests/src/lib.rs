//! Helpers for vantage's end-to-end tests and demo: a local HTTP target with knobs, and the
//! addresses of the real services started by `tests/services/up`.

pub mod agent_toml;
pub mod alerting;
pub mod bench;
pub mod browser;
pub mod cli;
pub mod deb;
pub mod dns;
pub mod harness;
pub mod in_process;
pub mod loadgen;
pub mod proxy;
pub mod stage;
pub mod target;
pub mod tls;

/// Where the services started by `tests/services/up` listen; each can be overridden by the same
/// environment variable the script reads (`VANTAGE_PG_PORT`, ...).
#[derive(Debug, Clone)]
pub struct Services {
    pub pg_url: String,
    pub mqtt_host: String,
    pub mqtt_port: u16,
    pub kafka_brokers: String,
}

impl Services {
    pub fn from_env() -> Services {
        let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
        let pg_port = var("VANTAGE_PG_PORT", "5432");
        Services {
            pg_url: var(
                "VANTAGE_PG_URL",
                &format!("postgresql://vantage:vantage@127.0.0.1:{pg_port}/vantage"),
            ),
            mqtt_host: var("VANTAGE_MQTT_HOST", "127.0.0.1"),
            mqtt_port: var("VANTAGE_MQTT_PORT", "1883").parse().unwrap_or(1883),
            kafka_brokers: var(
                "VANTAGE_KAFKA_BROKERS",
                &format!("127.0.0.1:{}", var("VANTAGE_KAFKA_PORT", "9092")),
            ),
        }
    }
}

impl Services {
    /// A client of the test PostgreSQL with `schema` on the search path (its connection runs
    /// on a task of the current runtime).
    pub async fn pg(&self, schema: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.pg_url, tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL must be running: tests/services/up");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("SET search_path TO {schema}"))
            .await
            .unwrap();
        client
    }

    /// The `[postgres]` lines of an ingester configuration for the test PostgreSQL, without
    /// TLS: `url` without the password (a configuration file may not hold one), the password in
    /// a file written into `dir`, and an explicit `tls = "disable"`.
    pub fn pg_toml_plain(&self, dir: &std::path::Path) -> String {
        let pg: tokio_postgres::Config = self.pg_url.parse().expect("VANTAGE_PG_URL");
        let password_file = dir.join("pg.pw");
        std::fs::write(&password_file, pg.get_password().unwrap_or_default()).unwrap();
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        format!(
            "url = \"host={host} port={port} user={user} dbname={db}\"\npassword_file = \"{pw}\"\ntls = \"disable\"",
            port = pg.get_ports().first().copied().unwrap_or(5432),
            user = pg.get_user().unwrap_or("vantage"),
            db = pg.get_dbname().unwrap_or("vantage"),
            pw = password_file.display(),
        )
    }
}

/// Wall clock in ms since the Unix epoch (the one copy both binaries use).
pub use vantage_common::time::now_ms;

/// A name unique to this process and moment, for topics, schemas and groups of one test run.
pub fn unique_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}{:x}", std::process::id(), nanos)
}

/// The first line of `text` that starts with `prefix` (empty when none does): an agent's row of
/// a table the ingester prints.
pub fn line_starting(text: &str, prefix: &str) -> String {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_default()
        .to_owned()
}
