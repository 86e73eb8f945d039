//! TLS client settings of the ingester's MQTT and PostgreSQL links (Kafka's TLS is librdkafka's,
//! configured through `kafka.properties`).
//!
//! rustls with the ring provider (as in the agent). Certificates are always verified, host name
//! included: there is no skip-verify switch here. Trust comes from `ca_file` when set, else from
//! Mozilla's root set bundled by `webpki-roots`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ClientConfig;
use serde::Deserialize;

/// `[mqtt.tls]` / the TLS files of `[postgres]`: which CA to trust and, optionally, a client
/// certificate.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM file of the CA certificates to trust (default: the bundled Mozilla roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for servers that authenticate clients by certificate.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (a file named here, never the key itself).
    pub key_file: Option<PathBuf>,
}

/// A validated TLS client configuration. `Debug` shows only which files it came from.
#[derive(Clone)]
pub struct TlsClient {
    pub config: Arc<ClientConfig>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .finish()
    }
}

/// Builds the client configuration. On error: (key suffix, reason), e.g. `("ca_file", ...)`;
/// reasons name files, never key material.
pub fn client(raw: &RawTls) -> Result<TlsClient, (&'static str, String)> {
    let mut roots = rustls::RootCertStore::empty();
    match &raw.ca_file {
        Some(path) => {
            let certs = read_certs(path).map_err(|r| ("ca_file", r))?;
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    (
                        "ca_file",
                        format!("{}: unusable certificate: {e}", path.display()),
                    )
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| ("ca_file", format!("TLS setup: {e}")))?
            .with_root_certificates(roots);
    let config = match (&raw.cert_file, &raw.key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => return Err(("key_file", "is required with cert_file".into())),
        (None, Some(_)) => return Err(("cert_file", "is required with key_file".into())),
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert).map_err(|r| ("cert_file", r))?;
            let key = read_key(key).map_err(|r| ("key_file", r))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ("key_file", format!("does not fit cert_file: {e}")))?
        }
    };
    Ok(TlsClient {
        config: Arc::new(config),
        ca_file: raw.ca_file.clone(),
        cert_file: raw.cert_file.clone(),
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificates found", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // The parser's error is not shown: it could quote a line of the file.
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|_| format!("{}: no usable PEM private key", path.display()))
}

/// Puts the MQTT client on TLS when configured; otherwise warns once if the broker is not on
/// this machine (credentials and results would cross the network in clear text).
pub fn mqtt_transport(options: &mut rumqttc::MqttOptions, tls: Option<&TlsClient>, host: &str) {
    match tls {
        Some(tls) => {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.config.clone()),
            ));
        }
        None if !is_loopback_host(host) => {
            tracing::warn!(host, "MQTT without TLS to a remote broker: set [mqtt.tls]");
        }
        None => {}
    }
}

/// `localhost` or a loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
