//! Credentials, kept out of `Debug` output and logs.

use std::fmt;

use contactsync_core::{ExposeSecret, SecretString};

/// How requests authenticate. `Debug` prints the scheme and user name, never a secret.
#[derive(Clone, Default)]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// HTTP Basic (`Authorization: Basic …`).
    Basic {
        /// The user name (not secret: it may appear in errors).
        username: String,
        /// The password.
        password: SecretString,
    },
    /// `Authorization: Bearer <token>`.
    Bearer(SecretString),
}

impl Auth {
    /// HTTP Basic with `username` and `password`.
    pub fn basic(username: impl Into<String>, password: SecretString) -> Self {
        let username = username.into();
        // What goes over the wire is `user:password` in base64: as secret as the
        // password, should a server echo the request back.
        use base64::Engine as _;
        contactsync_core::remember_secret(password.expose_secret());
        contactsync_core::remember_secret(
            &base64::engine::general_purpose::STANDARD
                .encode(format!("{username}:{}", password.expose_secret())),
        );
        Auth::Basic { username, password }
    }

    /// A bearer token.
    pub fn bearer(token: SecretString) -> Self {
        contactsync_core::remember_secret(token.expose_secret());
        Auth::Bearer(token)
    }

    /// Adds the credentials to a request; reqwest marks the header sensitive, so its
    /// own `Debug` output does not show it either.
    pub(crate) fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Auth::None => request,
            Auth::Basic { username, password } => {
                request.basic_auth(username, Some(password.expose_secret()))
            }
            Auth::Bearer(token) => request.bearer_auth(token.expose_secret()),
        }
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("Auth::None"),
            Auth::Basic { username, .. } => f
                .debug_struct("Auth::Basic")
                .field("username", username)
                .field("password", &"[redacted]")
                .finish(),
            Auth::Bearer(_) => f.write_str("Auth::Bearer([redacted])"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secrets() {
        let basic = Auth::basic("user", SecretString::from("hunter2"));
        let bearer = Auth::bearer(SecretString::from("tok-123"));
        let text = format!("{basic:?} {bearer:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("tok-123"), "{text}");
        assert!(text.contains("user"));
    }
}
