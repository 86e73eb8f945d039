//! TLS client configuration from PEM files, the same on both ends of a link: rustls with the
//! ring provider, certificates and host names always verified, trust from a CA file or else the
//! bundled Mozilla roots, an optional client certificate. Errors name the key and the file,
//! never key material.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ClientConfig;
use serde::Deserialize;

/// A TLS client section (`[mqtt.tls]` of both binaries, the TLS files of the ingester's
/// `[postgres]`): which CA to trust and, optionally, a client certificate.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM file of the CA certificates that sign the broker's certificate (default: the bundled
    /// Mozilla roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for brokers that authenticate agents by certificate.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`. A file named here; the key never goes in this file.
    pub key_file: Option<PathBuf>,
}

/// Builds the client configuration. On error: (key under `mqtt.tls.`, reason); reasons name
/// files, never key material.
pub fn client_config(raw: &TlsFiles) -> Result<Arc<ClientConfig>, (&'static str, String)> {
    let mut roots = rustls::RootCertStore::empty();
    match &raw.ca_file {
        Some(path) => {
            for cert in read_certs(path).map_err(|r| ("ca_file", r))? {
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
            let pem = std::fs::read(key)
                .map_err(|e| ("key_file", format!("cannot read {}: {e}", key.display())))?;
            // The parser's error is not shown: it could quote a line of the file.
            let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
                (
                    "key_file",
                    format!("{}: no usable PEM private key", key.display()),
                )
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| ("key_file", format!("does not fit cert_file: {e}")))?
        }
    };
    Ok(Arc::new(config))
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

/// `localhost` or a loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
