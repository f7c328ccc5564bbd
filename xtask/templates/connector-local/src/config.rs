//! What a user writes in a `[sinks.NAME]` or `[sources.NAME]` section with
//! `type = "__name__"`, checked once at build time so that a misspelt key is a config
//! error naming the key.
//!
//! ```toml
//! [sinks.__name__]
//! type = "__name__"
//! dir = "people"     # relative to the config file's folder
//! ```

use std::path::PathBuf;

use contactsync_core::{ConfigError, ConnectorSettings};
use serde::Deserialize;

/// The section's keys, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Written {
    /// The folder the people are kept in.
    dir: PathBuf,
}

/// The sink's settings, checked.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// The folder, resolved against the config file's folder.
    pub dir: PathBuf,
}

/// The source's settings, checked.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The folder, resolved against the config file's folder.
    pub dir: PathBuf,
}

fn parse(settings: &ConnectorSettings) -> Result<PathBuf, ConfigError> {
    let written: Written = settings.parse()?;
    if written.dir.as_os_str().is_empty() {
        return Err(settings.error("dir", "must name a folder"));
    }
    Ok(settings.path(&written.dir))
}

impl SinkConfig {
    /// Parses and checks a `[sinks.NAME]` section.
    pub fn from_settings(settings: &ConnectorSettings) -> Result<Self, ConfigError> {
        Ok(SinkConfig {
            dir: parse(settings)?,
        })
    }
}

impl SourceConfig {
    /// Parses and checks a `[sources.NAME]` section.
    pub fn from_settings(settings: &ConnectorSettings) -> Result<Self, ConfigError> {
        Ok(SourceConfig {
            dir: parse(settings)?,
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
        let key = |toml: &str| {
            SourceConfig::from_settings(&settings(toml))
                .err()
                .and_then(|e| e.key)
        };
        assert_eq!(key("dir = \"people\""), None);
        assert_eq!(key("dir = \"people\"\ndri = 1").as_deref(), Some("dri"));
        assert_eq!(key("dir = \"\"").as_deref(), Some("dir"));
    }
}
