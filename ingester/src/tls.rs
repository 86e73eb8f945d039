//! TLS client settings of the ingester's MQTT and PostgreSQL links (Kafka's TLS is librdkafka's,
//! configured through `kafka.properties`).
//!
//! rustls with the ring provider (as in the agent). Certificates are always verified, host name
//! included: there is no skip-verify switch here. Trust comes from `ca_file` when set, else from
//! Mozilla's root set bundled by `webpki-roots`.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::ClientConfig;

pub use vantage_common::tls_files::is_loopback_host;

/// `[mqtt.tls]` / the TLS files of `[postgres]`: which CA to trust and, optionally, a client
/// certificate (the same section type as the agent's `[mqtt.tls]`).
pub type RawTls = vantage_common::tls_files::TlsFiles;

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
/// reasons name files, never key material. The work is `vantage_common::tls_files`', so both
/// ends of the MQTT link load certificates and keys the same way.
pub fn client(raw: &RawTls) -> Result<TlsClient, (&'static str, String)> {
    let config = vantage_common::tls_files::client_config(raw)?;
    Ok(TlsClient {
        config,
        ca_file: raw.ca_file.clone(),
        cert_file: raw.cert_file.clone(),
    })
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
