//! `kind = "tls"` (issue #20): a TLS handshake with `address` and nothing after it (no HTTP
//! request): the DNS, connect and TLS phases of the HTTP probe, the same certificate checks
//! and failure kinds (`tls_untrusted`, `tls_expired`, `tls_hostname_mismatch`, `tls_failed`),
//! under the target's TLS settings (`ca_file`, `tls_skip_verify`) and one deadline.
//!
//! Recorded on success: the negotiated protocol version (`tls_version`) and, in
//! `cert_not_after_s`, the earliest expiry (notAfter) of the certificates the server presented
//! (the chain breaks when its first certificate expires; the HTTP probe records its leaf's).
//! The connection is then closed with a `close_notify`, after the measured time.

use std::time::Instant;

use rustls::ProtocolVersion;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use vantage_proto::{Outcome, Phase, TlsVersion};

use super::{borrowed, us, Failure, Measurement, Prober};
use crate::probe_tls;
use crate::target::Target;

impl Prober {
    /// One tls check of `target`; every failure ends up in `m`.
    pub(super) async fn measure_tls(
        &self,
        target: &Target,
        start: Instant,
        deadline: tokio::time::Instant,
        m: &mut Measurement,
    ) {
        let stream = self.tls_check(target, deadline, m).await;
        m.total_us = us(start.elapsed());
        match stream {
            Err(f) => m.end(f.outcome, Some(f.phase), f.detail),
            // A polite close (close_notify), bounded by the deadline; its failure changes
            // nothing measured.
            Ok(mut stream) => {
                m.outcome = Outcome::Up;
                let _ = tokio::time::timeout_at(deadline, stream.shutdown()).await;
            }
        }
    }

    /// Connects and shakes hands; records the version and the chain's earliest expiry.
    async fn tls_check(
        &self,
        target: &Target,
        deadline: tokio::time::Instant,
        m: &mut Measurement,
    ) -> Result<TlsStream<TcpStream>, Failure> {
        let address = target
            .address
            .as_ref()
            .ok_or_else(|| super::fail(Outcome::Other, Phase::Dns, "no address"))?;
        let host = borrowed(&address.host);
        let tcp = self.open(target, &host, address.port, deadline, m).await?;
        let stream = self.handshake(target, &host, tcp, deadline, m).await?;
        let conn = &stream.get_ref().1;
        m.cert_not_after_s = conn
            .peer_certificates()
            .into_iter()
            .flatten()
            .filter_map(|cert| probe_tls::not_after_unix(cert))
            .min();
        // rustls negotiates TLS 1.2 or 1.3 only.
        m.tls_version = match conn.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => Some(TlsVersion::Tls13),
            Some(ProtocolVersion::TLSv1_2) => Some(TlsVersion::Tls12),
            _ => None,
        };
        Ok(stream)
    }
}
