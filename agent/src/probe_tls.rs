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

/// notAfter of a DER X.509 certificate, unix seconds. None if it cannot be read.
///
/// A minimal DER walk (Certificate → TBSCertificate → Validity) rather than a full X.509 parser:
/// this is the only field the agent needs, and it keeps the Pi binary small.
pub fn not_after_unix(cert_der: &[u8]) -> Option<u64> {
    let (cert, _) = der_element(cert_der, 0x30)?;
    let (tbs, _) = der_element(cert, 0x30)?;
    let mut rest = tbs;
    // [0] EXPLICIT version, optional.
    if rest.first() == Some(&0xA0) {
        rest = der_element(rest, 0xA0)?.1;
    }
    rest = der_element(rest, 0x02)?.1; // serialNumber
    rest = der_element(rest, 0x30)?.1; // signature AlgorithmIdentifier
    rest = der_element(rest, 0x30)?.1; // issuer
    let (validity, _) = der_element(rest, 0x30)?;
    let not_before_rest = skip_any(validity)?; // notBefore
    let tag = *not_before_rest.first()?;
    let (time, _) = der_element(not_before_rest, tag)?;
    parse_time(tag, time)
}

/// Reads one DER element with tag `tag` from the front of `input`: (content, rest).
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *input.first()? != tag {
        return None;
    }
    let (len, header): (usize, usize) = match *input.get(1)? {
        l if l < 0x80 => (l as usize, 2),
        0x81 => (*input.get(2)? as usize, 3),
        0x82 => ((*input.get(2)? as usize) << 8 | *input.get(3)? as usize, 4),
        0x83 => (
            (*input.get(2)? as usize) << 16
                | (*input.get(3)? as usize) << 8
                | *input.get(4)? as usize,
            5,
        ),
        _ => return None,
    };
    let end = header.checked_add(len)?;
    Some((input.get(header..end)?, input.get(end..)?))
}

fn skip_any(input: &[u8]) -> Option<&[u8]> {
    der_element(input, *input.first()?).map(|(_, rest)| rest)
}

/// UTCTime (0x17, YYMMDDHHMMSSZ) or GeneralizedTime (0x18, YYYYMMDDHHMMSSZ) to unix seconds.
fn parse_time(tag: u8, s: &[u8]) -> Option<u64> {
    let digits = |range: std::ops::Range<usize>| -> Option<u64> {
        let text = std::str::from_utf8(s.get(range)?).ok()?;
        text.parse().ok()
    };
    let (year, rest) = match tag {
        0x17 => {
            let yy = digits(0..2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        0x18 => (digits(0..4)?, 4),
        _ => return None,
    };
    let month = digits(rest..rest + 2)?;
    let day = digits(rest + 2..rest + 4)?;
    let hour = digits(rest + 4..rest + 6)?;
    let minute = digits(rest + 6..rest + 8)?;
    let second = digits(rest + 8..rest + 10)?;
    if s.get(rest + 10) != Some(&b'Z') || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let days = days_from_civil(year as i64, month as i64, day as i64);
    let secs = days * 86_400 + (hour * 3600 + minute * 60 + second) as i64;
    u64::try_from(secs).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date; Howard Hinnant's `days_from_civil`
/// (http://howardhinnant.github.io/date_algorithms.html).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
    }

    #[test]
    fn times() {
        assert_eq!(parse_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(parse_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(parse_time(0x18, b"20380119031408Z"), Some(2_147_483_648));
        assert_eq!(parse_time(0x18, b"2038011903140Z"), None);
        assert_eq!(parse_time(0x17, b"701301000000Z"), None);
    }

    #[test]
    fn garbage_certificates_give_none() {
        assert_eq!(not_after_unix(&[]), None);
        assert_eq!(not_after_unix(&[0x30, 0x82, 0xFF]), None);
        assert_eq!(not_after_unix(&[0x30, 0x03, 0x30, 0x01, 0x02]), None);
    }
}
