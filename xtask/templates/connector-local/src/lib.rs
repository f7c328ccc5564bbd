//! __Name__ connector, for a platform reached without HTTP (a folder, a local
//! database, a command).
//!
// @if sink
//! - [`__Name__Sink`] (`type = "__name__"` under `[sinks.…]`) writes each change as one
//!   file: `{dir}/{key}.json` written whole (an upsert, so that a change sent twice does
//!   no harm) or removed.
// @end
// @if source
//! - [`__Name__Source`] (`type = "__name__"` under `[sources.…]`) reads every
//!   `{dir}/*.json`, one file at a time.
// @end
// @if !source
//! - [`__Name__Source`] reads the folder back; it is not registered as a source (the
//!   connector is a sink only): the conformance test reads back what the sink wrote
//!   with it. Register it with a `SourceFactory` to make the connector a source too.
// @end
//!
//! Written by `cargo xtask new-connector --no-http`: the platform is a placeholder (a
//! folder of JSON people, [`folder`]). Replace it with the platform's own access,
//! keeping the shape.
//!
//! Read in this order: [`config`] (what a user writes), [`folder`] (the platform),
//! [`sink`], [`source`].

pub mod config;
pub mod folder;
// @if sink
pub mod sink;
// @end
pub mod source;

// @if sink
pub use config::SinkConfig;
pub use sink::__Name__Sink;
// @end
pub use config::SourceConfig;
pub use source::__Name__Source;

// @if sink
use contactsync_core::{ConfigError, ConnectorSettings, Sink, SinkFactory};

fn build_sink(settings: &ConnectorSettings) -> Result<Box<dyn Sink>, ConfigError> {
    let config = SinkConfig::from_settings(settings)?;
    Ok(Box::new(__Name__Sink::new(config)))
}

contactsync_core::inventory::submit! {
    SinkFactory {
        name: "__name__",
        summary: "__Name__: people written and removed one file each",
        build: build_sink,
    }
}
// @end
// @if source
use contactsync_core::{Source, SourceFactory};

fn build_source(
    settings: &contactsync_core::ConnectorSettings,
) -> Result<Box<dyn Source>, contactsync_core::ConfigError> {
    let config = SourceConfig::from_settings(settings)?;
    Ok(Box::new(__Name__Source::new(config)))
}

contactsync_core::inventory::submit! {
    SourceFactory {
        name: "__name__",
        summary: "__Name__: every person, one file at a time",
        build: build_source,
    }
}
// @end
