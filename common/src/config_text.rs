//! What the agent's and the ingester's config loading share: TOML errors that never echo a
//! value, the rule for names that become MQTT topic levels and SQL values, and the error a
//! configuration file gets (file, key, reason).

use std::path::{Path, PathBuf};

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: key `{key}`: {reason}")]
    Invalid {
        file: PathBuf,
        key: String,
        reason: String,
    },
}

/// The text of a configuration file.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_owned(),
        source,
    })
}

/// `text` as the raw (serde) form `T` of a configuration; `path` is only used in the error,
/// whose message hides every value ([`toml_error`]).
pub fn parse<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        file: path.to_owned(),
        message: toml_error(text, &e),
    })
}

/// A TOML error for a message: toml's layout (location, the source line, a caret, the reason)
/// with every value hidden. toml itself prints the whole source line, and serde's "invalid
/// type" names the value found, so a password typed into the file by mistake (in place of
/// `password_file = ...`, say) would be echoed into a terminal or a journal. Kept: the key
/// (everything before `=`) and table headers; hidden: the rest of the line and the values in
/// the reason. Shared by the agent's and the ingester's config loading.
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let reason = redact_toml_reason(e.message());
    let Some(span) = e.span() else {
        return reason;
    };
    let at = span.start.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line_text = text[line_start..line_end].trim_end_matches('\r');
    let line = text[..line_start].matches('\n').count() + 1;
    let column = text[line_start..at].chars().count() + 1;
    let shown = if line_text.trim_start().starts_with('[') {
        line_text.to_owned()
    } else {
        match line_text.split_once('=') {
            Some((key, _)) => format!("{key}= <value not shown>"),
            None => "<line not shown>".to_owned(),
        }
    };
    // The caret points into what is shown, never past it.
    let caret_at = (column - 1).min(shown.chars().count().saturating_sub(1));
    let gutter = " ".repeat(line.to_string().len());
    format!(
        "TOML parse error at line {line}, column {column}\n{gutter} |\n{line} | {shown}\n{gutter} | {}^\n{reason}",
        " ".repeat(caret_at)
    )
}

/// serde's "invalid type: string \"x\", expected ..." (and `integer `5``, ...) with the value
/// replaced by `<redacted>`; any other reason unchanged (keys in backticks are not values).
pub fn redact_toml_reason(reason: &str) -> String {
    reason
        .lines()
        .map(|line| {
            for prefix in ["invalid type: ", "invalid value: "] {
                let Some(rest) = line.strip_prefix(prefix) else {
                    continue;
                };
                if let Some(quoted) = rest.strip_prefix("string \"") {
                    // A Debug-quoted string: ends at the first quote not escaped.
                    let mut escaped = false;
                    for (i, c) in quoted.char_indices() {
                        match c {
                            '\\' if !escaped => escaped = true,
                            '"' if !escaped => {
                                return format!("{prefix}string <redacted>{}", &quoted[i + 1..]);
                            }
                            _ => escaped = false,
                        }
                    }
                    return format!("{prefix}string <redacted>");
                }
                for kind in ["integer `", "floating point `", "boolean `", "character `"] {
                    if let Some(value) = rest.strip_prefix(kind) {
                        let after = value.find('`').map_or("", |i| &value[i + 1..]);
                        return format!("{prefix}{}<redacted>{after}", kind.trim_end_matches('`'));
                    }
                }
            }
            line.to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Agent ids, regions and topic prefixes become MQTT topic levels and SQL values: keep them tame.
pub fn check_name(name: &str) -> Result<(), String> {
    if vantage_proto::is_valid_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name: use 1 to 64 of a-z, 0-9, '-', '_', '.'"
        ))
    }
}
