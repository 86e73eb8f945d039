//! Secrets (passwords, tokens): read from an environment variable, a file or a systemd
//! credential *named* in the configuration, never from the configuration itself. Once read a
//! secret lives in a [`Secret`], whose `Debug` and `Display` print `<redacted>`; only
//! [`Secret::expose`] gives the value, where a client library needs it. Errors name the variable,
//! the file or the credential, never the value. One way of reading secrets for both binaries.

use std::path::Path;

/// A secret value. Formatting it never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The value, for handing to a client library. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The value of environment variable `var`; the error names the variable only.
pub fn from_env(var: &str) -> Result<Secret, String> {
    std::env::var(var)
        .map(Secret)
        .map_err(|_| format!("environment variable {var} is not set"))
}

/// The first line of the file at `path` (a trailing newline is not part of the secret); the
/// error names the file and the I/O error only.
pub fn from_file(path: &Path) -> Result<Secret, String> {
    std::fs::read_to_string(path)
        .map(|t| Secret(t.lines().next().unwrap_or_default().to_owned()))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// A systemd credential (`LoadCredential=name:/etc/vantage/...` in the unit): the file `name`
/// in `$CREDENTIALS_DIRECTORY`, which systemd makes readable to the service's user only.
pub fn from_credential(name: &str) -> Result<Secret, String> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(format!("{name:?} is not a credential name"));
    }
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
        .ok_or("CREDENTIALS_DIRECTORY is not set (not started by systemd with credentials?)")?;
    from_file(&Path::new(&dir).join(name))
}

/// Where one password of a configuration section comes from: at most one of
/// `password_env`, `password_file` and `password_credential`. On error: (key under the
/// section, reason).
pub fn password(
    env: Option<&str>,
    file: Option<&Path>,
    credential: Option<&str>,
) -> Result<Option<Secret>, (&'static str, String)> {
    match (env, file, credential) {
        (None, None, None) => Ok(None),
        (Some(var), None, None) => from_env(var).map(Some).map_err(|r| ("password_env", r)),
        (None, Some(path), None) => from_file(path).map(Some).map_err(|r| ("password_file", r)),
        (None, None, Some(name)) => from_credential(name)
            .map(Some)
            .map_err(|r| ("password_credential", r)),
        (Some(_), Some(_), None) => Err((
            "password_env",
            "set either password_env or password_file, not both".into(),
        )),
        (_, _, Some(_)) => Err((
            "password_credential",
            "set one of password_env, password_file, password_credential".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_format() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn one_source_per_password() {
        let dir = std::env::temp_dir().join(format!("vantage-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "s3cret\nsecond line\n").unwrap();
        let got = password(None, Some(&file), None).unwrap().unwrap();
        assert_eq!(got.expose(), "s3cret");
        assert_eq!(password(None, None, None).unwrap(), None);
        assert_eq!(
            password(Some("X"), Some(&file), None).unwrap_err().0,
            "password_env"
        );
        assert_eq!(
            password(None, Some(&file), Some("pw")).unwrap_err().0,
            "password_credential"
        );
        let missing = password(None, Some(&dir.join("nope")), None).unwrap_err();
        assert_eq!(missing.0, "password_file");
        assert!(!missing.1.contains("s3cret"));
        assert_eq!(
            from_credential("../etc/shadow").unwrap_err(),
            "\"../etc/shadow\" is not a credential name"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
