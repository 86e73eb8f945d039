//! TLS to the MQTT broker: the `[mqtt.tls]` section and the transport handed to rumqttc. The
//! rustls client configuration is built by `vantage_common::tls_files` (ring provider, like the
//! probes' TLS), the same code the ingester's MQTT link uses.
//!
//! The broker's certificate and host name are always verified; trust comes from `ca_file` or,
//! without it, from the bundled Mozilla roots. A client certificate (`cert_file` + `key_file`)
//! lets a broker with `use_identity_as_username` take the agent's identity from the certificate
//! instead of a password.

/// `[mqtt.tls]`: its presence turns TLS on (loaded by `vantage_common::tls_files`).
pub type RawMqttTls = vantage_common::tls_files::TlsFiles;
pub use vantage_common::tls_files::{client_config, is_loopback_host};

/// Puts the MQTT client on TLS when configured; otherwise warns if the broker is not on this
/// machine (the password and the results would cross the network in clear text).
pub fn apply(options: &mut rumqttc::MqttOptions, mqtt: &crate::config::MqttConfig) {
    match &mqtt.tls {
        Some(tls) => {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        None if !is_loopback_host(&mqtt.host) => {
            tracing::warn!(host = %mqtt.host, "MQTT without TLS to a remote broker: set [mqtt.tls]");
        }
        None => {}
    }
}
