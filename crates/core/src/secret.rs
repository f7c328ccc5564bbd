//! Secrets in settings: given inline (usually through the environment), or read from a
//! file. Kept as [`SecretString`], whose `Debug` prints nothing of the value, so a
//! secret cannot leak through logs, reports or panics by accident.

use std::path::Path;

pub use secrecy::{ExposeSecret, SecretString};

use crate::ConfigError;

/// Resolves a secret setting `name` of `section` from its inline value or its
/// `NAME_file` companion (relative to `base_dir`). Exactly one must be given.
/// A trailing newline in the file is not part of the secret.
pub fn resolve_secret(
    section: &str,
    name: &str,
    inline: Option<SecretString>,
    file: Option<&Path>,
    base_dir: &Path,
) -> Result<SecretString, ConfigError> {
    let env_name = format!(
        "CONTACTSYNC_{}__{}",
        section.replace('.', "__").to_uppercase(),
        name.to_uppercase()
    );
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::key(
            section,
            name,
            format!("both `{name}` and `{name}_file` are set; keep one"),
        )),
        (Some(secret), None) => Ok(secret),
        (None, Some(path)) => {
            let path = base_dir.join(path);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::key(
                    section,
                    format!("{name}_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let value = text.trim_end_matches(['\r', '\n']).to_string();
            if value.is_empty() {
                return Err(ConfigError::key(
                    section,
                    format!("{name}_file"),
                    format!("{} is empty", path.display()),
                ));
            }
            Ok(SecretString::from(value))
        }
        (None, None) => Err(ConfigError::key(
            section,
            name,
            format!("missing; set `{name}_file` to a file holding it, or the environment variable {env_name}"),
        )),
    }
}
