//! Secrets in settings: given inline (usually through the environment), or read from a
//! file. Kept as [`SecretString`], whose `Debug` prints nothing of the value, so a
//! secret cannot leak through logs, reports or panics by accident.

use std::path::Path;

pub use secrecy::{ExposeSecret, SecretString};

use std::borrow::Cow;
use std::sync::{OnceLock, RwLock};

use crate::ConfigError;

/// The secret values this process knows (settings, tokens it was given), so that any
/// text leaving the process can be cleaned of them, whatever its origin: a server that
/// echoes the request in its error body must not put a password into a log, a report
/// or a webhook.
static KNOWN: OnceLock<RwLock<Vec<String>>> = OnceLock::new();

/// What a secret's value becomes in text that leaves the process.
pub const REDACTED: &str = "[redacted]";

/// Remembers `value` as a secret of this process (values shorter than four characters
/// are too common in ordinary text to be told apart, and are not remembered).
pub fn remember_secret(value: &str) {
    if value.chars().count() < 4 {
        return;
    }
    let known = KNOWN.get_or_init(Default::default);
    let mut known = known
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !known.iter().any(|k| k == value) {
        known.push(value.to_string());
        // Longest first: a secret that holds another is replaced whole.
        known.sort_by_key(|k| std::cmp::Reverse(k.len()));
    }
}

/// `text` with every remembered secret replaced by [`REDACTED`].
///
/// ```
/// use contactsync_core::{redact_secrets, remember_secret};
/// remember_secret("hunter2-Pw");
/// assert_eq!(
///     redact_secrets("401: bad password 'hunter2-Pw'"),
///     "401: bad password '[redacted]'"
/// );
/// ```
pub fn redact_secrets(text: &str) -> Cow<'_, str> {
    let Some(known) = KNOWN.get() else {
        return Cow::Borrowed(text);
    };
    let known = known
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut out = Cow::Borrowed(text);
    for secret in known.iter() {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), REDACTED));
        }
    }
    out
}

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
        (Some(secret), None) => {
            remember_secret(secret.expose_secret());
            Ok(secret)
        }
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
            remember_secret(&value);
            Ok(SecretString::from(value))
        }
        (None, None) => Err(ConfigError::key(
            section,
            name,
            format!("missing; set `{name}_file` to a file holding it, or the environment variable {env_name}"),
        )),
    }
}
