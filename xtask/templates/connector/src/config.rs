//! What a user writes in a `[sinks.NAME]` or `[sources.NAME]` section with
//! `type = "__name__"`, checked once at build time so that a misspelt key is a config
//! error naming the key.
//!
//! ```toml
//! [sinks.__name__]
//! type = "__name__"
//! base_url = "https://api.example.com"   # or "sandbox"
//! api_key_file = "__name__-key.txt"
//! request_timeout = "30s"                # and the other connection settings
//! ```

use std::path::PathBuf;

use contactsync_core::{ConfigError, ConnectorSettings, SecretString};
use contactsync_http::{HttpDefaults, HttpSettings};
use serde::Deserialize;

/// __Name__'s defaults for the shared connection settings: `base_url` must be given.
#[derive(Debug)]
pub struct __Name__Defaults;

impl HttpDefaults for __Name__Defaults {}

/// The section's own keys, as written; the connection keys are [`HttpSettings`]'s.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Written {
    /// The API key (better: `api_key_file`, or the environment).
    api_key: Option<SecretString>,
    /// A file holding the API key.
    api_key_file: Option<PathBuf>,
    /// People per page when reading.
    #[serde(default = "default_page_size")]
    page_size: usize,
}

fn default_page_size() -> usize {
    100
}

/// Where and how to reach the platform: what the source and the sink share.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The connection settings (`base_url`, timeouts, retries).
    pub http: HttpSettings,
    /// The API key (never printed).
    pub api_key: SecretString,
}

/// The sink's settings, checked.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// How to reach the platform.
    pub connection: Connection,
}

/// The source's settings, checked.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// How to reach the platform.
    pub connection: Connection,
    /// People per page.
    pub page_size: usize,
}

fn parse(settings: &ConnectorSettings) -> Result<(Connection, usize), ConfigError> {
    let (written, http): (Written, _) = HttpSettings::parse::<__Name__Defaults, _>(settings)?;
    let api_key = settings.secret("api_key", written.api_key, written.api_key_file.as_deref())?;
    if written.page_size == 0 {
        return Err(settings.error("page_size", "must be at least 1"));
    }
    Ok((Connection { http, api_key }, written.page_size))
}

impl SinkConfig {
    /// Parses and checks a `[sinks.NAME]` section.
    pub fn from_settings(settings: &ConnectorSettings) -> Result<Self, ConfigError> {
        let (connection, _) = parse(settings)?;
        Ok(SinkConfig { connection })
    }
}

impl SourceConfig {
    /// Parses and checks a `[sources.NAME]` section.
    pub fn from_settings(settings: &ConnectorSettings) -> Result<Self, ConfigError> {
        let (connection, page_size) = parse(settings)?;
        Ok(SourceConfig {
            connection,
            page_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> ConnectorSettings {
        ConnectorSettings::from_toml("sinks.__name__", toml).expect("toml")
    }

    #[test]
    fn errors_name_the_key() {
        let base = "base_url = \"http://127.0.0.1:1\"\napi_key = \"k\"\n";
        let key = |extra: &str| {
            SourceConfig::from_settings(&settings(&format!("{base}{extra}")))
                .err()
                .and_then(|e| e.key)
        };
        assert_eq!(key(""), None);
        assert_eq!(key("page_sise = 5").as_deref(), Some("page_sise"));
        assert_eq!(key("page_size = 0").as_deref(), Some("page_size"));
        assert_eq!(key("request_timeout = \"soon\"").as_deref(), Some("request_timeout"));
        let missing = SinkConfig::from_settings(&settings("api_key = \"k\"")).err();
        assert_eq!(missing.and_then(|e| e.key).as_deref(), Some("base_url"));
    }
}
