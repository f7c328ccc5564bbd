//! Connectors make themselves known by name, with `inventory`.
//!
//! A connector crate submits a [`SourceFactory`] and/or a [`SinkFactory`] (and, for a
//! platform, a [`SandboxFactory`]); the binary links the crate and finds it by the
//! `type` a config section names. Nothing outside this module matches on connector
//! names.
//!
//! ```
//! use contactsync_core::{ConfigError, ConnectorSettings, Source, SourceFactory};
//!
//! fn build(settings: &ConnectorSettings) -> Result<Box<dyn Source>, ConfigError> {
//!     Err(ConfigError::section(&settings.section, "this example builds nothing"))
//! }
//!
//! contactsync_core::inventory::submit! {
//!     SourceFactory { name: "example", summary: "an example", build }
//! }
//!
//! assert!(contactsync_core::registry::source("example").is_some());
//! ```

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use serde::de::DeserializeOwned;

use crate::{ConfigError, ConnectorError, SecretString, Sink, Source};

/// One connector section of the config (`[sinks.poppulo]`), as given to a factory.
#[derive(Debug, Clone)]
pub struct ConnectorSettings {
    /// The section's path (`sinks.poppulo`), for error messages and the sink's store.
    pub section: String,
    /// The section's name (`poppulo`).
    pub name: String,
    /// The section's settings, without `type`.
    pub values: config::Value,
    /// The config file's directory: relative paths in settings resolve against it.
    pub base_dir: PathBuf,
    /// Where connectors may keep files of their own (beside the state database).
    pub data_dir: PathBuf,
    /// The config file, for error messages.
    pub file: Option<PathBuf>,
}

impl ConnectorSettings {
    /// Settings from a TOML fragment; for tests and examples.
    pub fn from_toml(section: &str, toml: &str) -> Result<Self, ConfigError> {
        let values = config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.cache.clone().try_deserialize::<config::Value>())
            .map_err(|e| ConfigError::section(section, e.to_string()))?;
        let name = section.rsplit('.').next().unwrap_or(section).to_string();
        Ok(ConnectorSettings {
            section: section.to_string(),
            name,
            values,
            base_dir: PathBuf::from("."),
            data_dir: PathBuf::from("."),
            file: None,
        })
    }

    /// Deserializes the settings into a connector's own config type. Use
    /// `#[serde(deny_unknown_fields)]` on it so that a misspelt key is an error that
    /// names the key.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(self.values.clone()).map_err(|e| {
            // The path of the value that failed names the key, whatever the connector's
            // own deserializer said (unknown and missing keys are named by serde itself).
            let path = e.path().to_string();
            ConfigError {
                file: self.file.clone(),
                section: self.section.clone(),
                key: (path != ".").then_some(path),
                message: e.into_inner().to_string(),
            }
        })
    }

    /// Splits the section in two: the keys of a settings group shared by several
    /// connectors (`ClientConfig`'s `base_url`, `connect_timeout`, …), which stay flat in
    /// the file, and the rest. Each part is then [`ConnectorSettings::parse`]d on its own,
    /// with `deny_unknown_fields`, so that a misspelt key is still an error naming it
    /// (`serde(flatten)` would lose both).
    pub fn split(&self, group_keys: &[&str]) -> (ConnectorSettings, ConnectorSettings) {
        let mut rest = config::Map::new();
        let mut group = config::Map::new();
        if let Ok(table) = self.values.clone().into_table() {
            for (key, value) in table {
                if group_keys.contains(&key.as_str()) {
                    group.insert(key, value);
                } else {
                    rest.insert(key, value);
                }
            }
        }
        let part = |map: config::Map<String, config::Value>| ConnectorSettings {
            values: config::Value::new(None, config::ValueKind::Table(map)),
            ..self.clone()
        };
        (part(rest), part(group))
    }

    /// Whether the section sets `key`.
    pub fn has(&self, key: &str) -> bool {
        self.values
            .clone()
            .into_table()
            .is_ok_and(|table| table.contains_key(key))
    }

    /// A path from the settings, resolved against the config file's directory.
    pub fn path(&self, path: &Path) -> PathBuf {
        self.base_dir.join(path)
    }

    /// Resolves a secret given as `NAME` or `NAME_file` (see [`crate::resolve_secret`]).
    pub fn secret(
        &self,
        name: &str,
        inline: Option<SecretString>,
        file: Option<&Path>,
    ) -> Result<SecretString, ConfigError> {
        crate::resolve_secret(&self.section, name, inline, file, &self.base_dir).map_err(|mut e| {
            e.file = self.file.clone();
            e
        })
    }

    /// A [`ConfigError`] about `key` of this section.
    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            section: self.section.clone(),
            key: Some(key.to_string()),
            message: message.into(),
        }
    }
}

/// Builds a [`Source`] from its settings.
pub struct SourceFactory {
    /// The name a config section's `type` uses (`csv`).
    pub name: &'static str,
    /// One line for `contactsync connectors`.
    pub summary: &'static str,
    /// Builds the source. Must not touch the network: `check` and `read` do.
    pub build: fn(&ConnectorSettings) -> Result<Box<dyn Source>, ConfigError>,
}

/// Builds a [`Sink`] from its settings.
pub struct SinkFactory {
    /// The name a config section's `type` uses (`poppulo`).
    pub name: &'static str,
    /// One line for `contactsync connectors`.
    pub summary: &'static str,
    /// Builds the sink. Must not touch the network: `check` and `apply` do.
    pub build: fn(&ConnectorSettings) -> Result<Box<dyn Sink>, ConfigError>,
}

/// Builds a sink for a [`SinkFactory`]: `config` checks the section, `new` makes the
/// sink from it (touching no network). An error of `new` (a client that cannot be set
/// up as configured: a URL, a CA file) is a config error naming `key`.
///
/// ```ignore
/// contactsync_core::inventory::submit! {
///     SinkFactory { name: "acme", summary: "…", build: |s| registry::boxed_sink(s, SinkConfig::from_settings, AcmeSink::new, "base_url") }
/// }
/// ```
pub fn boxed_sink<C, S: Sink + 'static>(
    settings: &ConnectorSettings,
    config: fn(&ConnectorSettings) -> Result<C, ConfigError>,
    new: fn(C) -> Result<S, ConnectorError>,
    key: &str,
) -> Result<Box<dyn Sink>, ConfigError> {
    let sink = new(config(settings)?).map_err(|e| settings.error(key, e.to_string()))?;
    Ok(Box::new(sink))
}

/// Builds a source for a [`SourceFactory`], as [`boxed_sink`] builds a sink.
pub fn boxed_source<C, S: Source + 'static>(
    settings: &ConnectorSettings,
    config: fn(&ConnectorSettings) -> Result<C, ConfigError>,
    new: fn(C) -> Result<S, ConnectorError>,
    key: &str,
) -> Result<Box<dyn Source>, ConfigError> {
    let source = new(config(settings)?).map_err(|e| settings.error(key, e.to_string()))?;
    Ok(Box::new(source))
}

/// How to start a platform's sandbox.
#[derive(Debug, Clone, Default)]
pub struct SandboxOptions {
    /// Where the sandbox keeps its data between runs; `None` keeps it in memory.
    pub data_file: Option<PathBuf>,
    /// The loopback port to listen on; 0 picks a free one.
    pub port: u16,
    /// The settings of the connector section the sandbox stands in for, when started
    /// for `base_url = "sandbox"`: the sandbox accepts exactly the account and
    /// credentials they name (and nothing else). `None`: the sandbox's documented
    /// defaults.
    pub settings: Option<ConnectorSettings>,
}

/// A sandbox serving on loopback.
#[derive(Debug)]
pub struct RunningSandbox {
    /// The base URL to put in a connector's `base_url`.
    pub base_url: String,
    /// Cancel to stop the server (it saves its data first).
    pub shutdown: crate::CancellationToken,
    /// Stops the server when dropped (it saves its data as it goes, and once more on
    /// the way out), so a sandbox never outlives the value that started it.
    pub stopped: tokio_util::sync::DropGuard,
}

impl RunningSandbox {
    /// A sandbox serving at `base_url` until `shutdown` is cancelled or this value is
    /// dropped.
    pub fn new(base_url: String, shutdown: crate::CancellationToken) -> Self {
        RunningSandbox {
            base_url,
            stopped: shutdown.clone().drop_guard(),
            shutdown,
        }
    }
}

/// The future a [`SandboxFactory`] returns.
pub type SandboxStart =
    Pin<Box<dyn Future<Output = Result<RunningSandbox, ConnectorError>> + Send>>;

/// Starts a platform's sandbox, for `base_url = "sandbox"` and `contactsync sandbox NAME`.
pub struct SandboxFactory {
    /// The connector type it stands in for (`poppulo`).
    pub name: &'static str,
    /// Starts it; must be called inside a tokio runtime.
    pub start: fn(SandboxOptions) -> SandboxStart,
}

inventory::collect!(SourceFactory);
inventory::collect!(SinkFactory);
inventory::collect!(SandboxFactory);

/// The registered source called `name`.
pub fn source(name: &str) -> Option<&'static SourceFactory> {
    inventory::iter::<SourceFactory>().find(|f| f.name == name)
}

/// The registered sink called `name`.
pub fn sink(name: &str) -> Option<&'static SinkFactory> {
    inventory::iter::<SinkFactory>().find(|f| f.name == name)
}

/// The registered sandbox for connector type `name`.
pub fn sandbox(name: &str) -> Option<&'static SandboxFactory> {
    inventory::iter::<SandboxFactory>().find(|f| f.name == name)
}

/// Every registered source, sorted by name.
pub fn sources() -> Vec<&'static SourceFactory> {
    let mut all: Vec<_> = inventory::iter::<SourceFactory>().collect();
    all.sort_by_key(|f| f.name);
    all
}

/// Every registered sink, sorted by name.
pub fn sinks() -> Vec<&'static SinkFactory> {
    let mut all: Vec<_> = inventory::iter::<SinkFactory>().collect();
    all.sort_by_key(|f| f.name);
    all
}

/// Every registered sandbox, sorted by name.
pub fn sandboxes() -> Vec<&'static SandboxFactory> {
    let mut all: Vec<_> = inventory::iter::<SandboxFactory>().collect();
    all.sort_by_key(|f| f.name);
    all
}
