//! Secrets (passwords, private keys) and the rules that keep them out of configuration files,
//! logs and error messages.
//!
//! A secret comes from an environment variable, a file or a systemd credential *named* in the
//! configuration, never from the file itself (`vantage_common::secret`, the same for the
//! agent). Once read it lives in a [`Secret`], whose `Debug` and `Display` print `<redacted>`;
//! only [`Secret::expose`] gives the value. Errors name the source, never the value. Here: which
//! librdkafka properties are secrets, and reading them.

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use vantage_common::secret::{from_credential, from_env, from_file, password, Secret};

/// Whether a librdkafka property holds a secret, which must then come from
/// `kafka.secret_env` / `kafka.secret_files` instead of `kafka.properties`. Errs on the side of
/// caution: any key that mentions a password, a secret or an inline private key.
pub fn is_secret_kafka_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k == "ssl.key.pem"
        || k == "ssl_key"
        || k == "sasl.oauthbearer.config"
        || k == "sasl.jaas.config"
}

/// The librdkafka properties (CONFIGURATION.md of librdkafka 2.x) that hold secrets.
pub const KNOWN_SECRET_PROPERTIES: &[&str] = &[
    "sasl.password",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.config",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl.keystore.password",
];

/// Reads the Kafka secret properties: `env` maps a property to an environment variable, `files`
/// a property to a file. On error: (config key, reason).
pub fn kafka_secrets(
    env: &BTreeMap<String, String>,
    files: &BTreeMap<String, PathBuf>,
) -> Result<BTreeMap<String, Secret>, (String, String)> {
    // librdkafka echoes a property's value in the error for a name it does not know, so a typo
    // here ("sasl.passwrod") would print the secret: only known secret properties are taken.
    for (key, property) in env
        .keys()
        .map(|p| ("secret_env", p))
        .chain(files.keys().map(|p| ("secret_files", p)))
    {
        if !KNOWN_SECRET_PROPERTIES.contains(&property.as_str()) {
            return Err((
                format!("kafka.{key}.{property}"),
                format!(
                    "not a librdkafka secret property this ingester knows (one of: {})",
                    KNOWN_SECRET_PROPERTIES.join(", ")
                ),
            ));
        }
    }
    let mut out = BTreeMap::new();
    for (property, var) in env {
        let value = from_env(var).map_err(|r| (format!("kafka.secret_env.{property}"), r))?;
        out.insert(property.clone(), value);
    }
    for (property, path) in files {
        if out.contains_key(property) {
            return Err((
                format!("kafka.secret_files.{property}"),
                "also set in kafka.secret_env".into(),
            ));
        }
        let value = from_file(path).map_err(|r| (format!("kafka.secret_files.{property}"), r))?;
        out.insert(property.clone(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_secret_property_is_refused_without_reading_it() {
        let mut env = BTreeMap::new();
        env.insert(
            "sasl.passwrod".to_owned(),
            "VANTAGE_TEST_NO_SUCH_VAR".to_owned(),
        );
        let (key, reason) = kafka_secrets(&env, &BTreeMap::new()).unwrap_err();
        assert_eq!(key, "kafka.secret_env.sasl.passwrod");
        assert!(reason.contains("sasl.password"), "{reason}");
    }

    #[test]
    fn secret_kafka_properties_are_recognised() {
        for k in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "SASL.PASSWORD",
        ] {
            assert!(is_secret_kafka_property(k), "{k}");
        }
        for k in [
            "sasl.username",
            "security.protocol",
            "ssl.ca.location",
            "ssl.key.location",
        ] {
            assert!(!is_secret_kafka_property(k), "{k}");
        }
    }
}
