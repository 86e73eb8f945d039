//! `[postgres]`: where the sink, the alert stage, the dashboard and the commands find the
//! database, and how they talk to it (TLS verified unless `tls = "disable"` is written).

use std::path::PathBuf;

use serde::Deserialize;

use super::{password, Invalid};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    /// Connection string, key-value or URL form, e.g. `host=127.0.0.1 user=vantage dbname=vantage`.
    /// Put no password here: use `password_env`, `password_file` or `password_credential`.
    pub url: String,
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Name of a systemd credential holding the password (`$CREDENTIALS_DIRECTORY/<name>`).
    pub password_credential: Option<String>,
    /// Schema that holds vantage's tables (default `vantage`); created by `migrate`.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// `verify-full` (default): TLS, certificate and host name verified; `disable`: plain TCP,
    /// only when written here explicitly. The URL's `sslmode` is ignored.
    #[serde(default = "default_pg_tls")]
    pub tls: String,
    /// PEM file of the CA certificates that sign the server's (default: the bundled Mozilla
    /// roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that authenticate clients by certificate.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (a file named here, never the key itself).
    pub key_file: Option<PathBuf>,
}

fn default_pg_tls() -> String {
    "verify-full".into()
}
fn default_schema() -> String {
    "vantage".into()
}

#[derive(Clone)]
pub struct PostgresConfig {
    pub url: String,
    pub password: Option<String>,
    pub schema: String,
    pub tls: PgTls,
}

/// How the ingester talks to PostgreSQL.
#[derive(Debug, Clone)]
pub enum PgTls {
    /// Plain TCP; only when the configuration says `tls = "disable"` (or a program says so).
    Disable,
    /// TLS required (never downgraded), certificate chain and host name verified.
    VerifyFull(crate::tls::TlsClient),
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &"<redacted>")
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("schema", &self.schema)
            .field("tls", &self.tls)
            .finish()
    }
}

impl TryFrom<RawPostgres> for PostgresConfig {
    type Error = Invalid;

    fn try_from(p: RawPostgres) -> Result<PostgresConfig, Invalid> {
        let invalid = |key: &str, reason: String| (format!("postgres.{key}"), reason);
        let parsed = p
            .url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| invalid("url", format!("not a connection string: {e}")))?;
        if parsed.get_password().is_some() {
            return Err(invalid(
                "url",
                "contains a password: use postgres.password_env or postgres.password_file".into(),
            ));
        }
        let tls_files = crate::tls::RawTls {
            ca_file: p.ca_file.clone(),
            cert_file: p.cert_file.clone(),
            key_file: p.key_file.clone(),
        };
        let tls = match p.tls.as_str() {
            "disable" => {
                if tls_files.ca_file.is_some() || tls_files.cert_file.is_some() {
                    return Err(invalid(
                        "tls",
                        "is \"disable\" but TLS files are set".into(),
                    ));
                }
                PgTls::Disable
            }
            "verify-full" => PgTls::VerifyFull(
                crate::tls::client(&tls_files).map_err(|(key, r)| invalid(key, r))?,
            ),
            other => {
                return Err(invalid(
                    "tls",
                    format!("{other:?} is not \"verify-full\" or \"disable\""),
                ))
            }
        };
        if !is_schema_name(&p.schema) {
            return Err(invalid(
                "schema",
                "use a-z, 0-9 and '_', starting with a letter or '_', at most 63 bytes".into(),
            ));
        }
        let password = password(
            "postgres",
            &p.password_env,
            &p.password_file,
            &p.password_credential,
        )?;
        Ok(PostgresConfig {
            url: p.url,
            password,
            schema: p.schema,
            tls,
        })
    }
}

/// A schema name every statement can use unquoted.
fn is_schema_name(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}
