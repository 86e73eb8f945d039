//! TLS for probes: client configurations (bundled roots, a per-target CA file, or an explicit
//! skip-verify), classification of handshake failures, and the leaf certificate's expiry.
//!
//! Every configuration uses rustls's ring provider: ring cross-compiles to ARM with a plain C
//! cross compiler, aws-lc-rs does not.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use vantage_proto::Outcome;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        // Cannot fail: the ring provider supports the default protocol versions.
        .expect("ring supports TLS 1.2 and 1.3")
}

/// The shared default: Mozilla's root set (bundled by `webpki-roots`, so a Pi with an old or
/// missing CA store still verifies the same way as every other agent).
pub fn default_config() -> Arc<ClientConfig> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            Arc::new(
                builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        })
        .clone()
}

/// Trusts exactly the CA certificates in the PEM file at `path`.
pub fn config_with_ca_file(path: &Path) -> Result<Arc<ClientConfig>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: unusable certificate: {e}", path.display()))?;
        found += 1;
    }
    if found == 0 {
        return Err(format!("{}: no certificates found", path.display()));
    }
    Ok(Arc::new(
        builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Accepts any server certificate (signatures on the handshake are still checked).
pub fn skip_verify_config() -> Arc<ClientConfig> {
    Arc::new(
        builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
            .with_no_client_auth(),
    )
}

/// The verifier behind `tls_skip_verify`. Follows the `danger` example of rustls
/// (rustls/examples, `NoCertificateVerification`).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The failure kind of a TLS handshake error (tokio-rustls wraps rustls errors in io::Error).
pub fn classify_handshake_error(e: &std::io::Error) -> Outcome {
    use rustls::CertificateError as C;
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match e.kind() {
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::BrokenPipe => Outcome::ConnectionReset,
            _ => Outcome::TlsFailed,
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => Outcome::TlsExpired,
            C::NotValidForName | C::NotValidForNameContext { .. } => Outcome::TlsHostnameMismatch,
            C::UnknownIssuer | C::BadSignature | C::BadEncoding => Outcome::TlsUntrusted,
            C::Other(other) if is_untrusted_chain(other) => Outcome::TlsUntrusted,
            _ => Outcome::TlsFailed,
        },
        _ => Outcome::TlsFailed,
    }
}

/// webpki errors that rustls passes on as `CertificateError::Other` but that mean "this chain
/// does not lead to a trusted root": above all `CaUsedAsEndEntity`, what a self-signed
/// certificate made by `openssl req -x509` (basicConstraints CA:TRUE) gives — webpki checks
/// the leaf's basic constraints before it looks for an issuer, so such a certificate never
/// gets as far as `UnknownIssuer`.
fn is_untrusted_chain(other: &rustls::OtherError) -> bool {
    use webpki::Error as W;
    let source: &(dyn std::error::Error + 'static) = &*other.0;
    matches!(
        source.downcast_ref::<W>(),
        Some(
            W::CaUsedAsEndEntity
                | W::EndEntityUsedAsCa
                | W::PathLenConstraintViolated
                | W::NameConstraintViolation
        )
    )
}

/// The leaf certificate's expiry (a DER walk of its own module).
pub use crate::cert_expiry::not_after_unix;
