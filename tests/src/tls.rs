//! Test certificates made in the test (rcgen): a CA, leaves signed by it (valid, expired, for
//! another name), and a self-signed leaf; and rustls server configurations that present them.

use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A test CA.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and key ready for a server.
pub struct Leaf {
    pub cert_der: CertificateDer<'static>,
    /// The same certificate as PEM (a target's `ca_file` when it trusts this very certificate).
    pub cert_pem: String,
    key_der: Vec<u8>,
    /// notAfter, unix seconds.
    pub not_after_unix: u64,
}

impl TestCa {
    pub fn new() -> TestCa {
        Self::with_params(CertificateParams::new(Vec::<String>::new()).expect("no names"))
    }

    /// A CA valid until `not_after` (year, month, day): a chain that expires before its leaf.
    pub fn until(not_after: (i32, u8, u8)) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        Self::with_params(params)
    }

    fn with_params(mut params: CertificateParams) -> TestCa {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "vantage test CA");
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        TestCa { cert, key }
    }

    /// The CA certificate (DER), for a server that sends it after its leaf.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// The CA certificate as PEM, written to `path` (a target's `ca_file`).
    pub fn write_pem(&self, path: &Path) {
        std::fs::write(path, self.cert.pem()).expect("write CA PEM");
    }

    /// A leaf for `names`, valid from `not_before` to `not_after` (year, month, day).
    pub fn leaf(
        &self,
        names: &[&str],
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
    ) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("names");
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let not_after_unix = params.not_after.unix_timestamp() as u64;
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign leaf");
        Leaf {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_der: key.serialize_der(),
            not_after_unix,
        }
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

/// A self-signed leaf (no CA) for `names`.
pub fn self_signed(names: &[&str]) -> Leaf {
    self_signed_with(names, IsCa::NoCa)
}

/// A self-signed certificate for `names` that is also a CA (basicConstraints CA:TRUE), as
/// `openssl req -x509` makes by default: the most common self-signed certificate.
pub fn self_signed_ca(names: &[&str]) -> Leaf {
    self_signed_with(names, IsCa::Ca(BasicConstraints::Unconstrained))
}

fn self_signed_with(names: &[&str], is_ca: IsCa) -> Leaf {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("names");
    params.is_ca = is_ca;
    let not_after_unix = params.not_after.unix_timestamp() as u64;
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    Leaf {
        cert_der: cert.der().clone(),
        cert_pem: cert.pem(),
        key_der: key.serialize_der(),
        not_after_unix,
    }
}

impl Leaf {
    /// A rustls server configuration presenting this certificate.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config_with(&[], rustls::DEFAULT_VERSIONS)
    }

    /// A rustls server configuration presenting this certificate followed by `chain`, and
    /// speaking only the protocol `versions` (`&[&rustls::version::TLS12]`: a TLS 1.2 server).
    pub fn server_config_with(
        &self,
        chain: &[CertificateDer<'static>],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let mut certs = vec![self.cert_der.clone()];
        certs.extend_from_slice(chain);
        Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(versions)
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config"),
        )
    }
}
