//! Poppulo (Newsweaver API v2) source and sink.
//!
//! - [`PoppuloSink`] (`type = "poppulo"` under `[sinks.…]`) writes changes as one
//!   subscriber import job per batch, follows the job to its end (no earlier than
//!   `ping_after`), and maps the rows Poppulo rejected back to the changes. Removals are
//!   import rows with status `INACTIVE` or `OPT_OUT` (the `removal` setting): Poppulo
//!   has no delete.
//! - [`PoppuloSource`] (`type = "poppulo"` under `[sources.…]`) reads every subscriber,
//!   page by page, following `next` links.
//! - The fake Poppulo for tests and `base_url = "sandbox"` is its own crate,
//!   `contactsync-sandbox-poppulo`, which does not depend on this one (nor this one on
//!   it): each is written from the API documents, so that one misunderstanding cannot
//!   hide on both sides.
//!
//! Read in this order: [`config`] (what a user writes), [`client`] (the calls, on
//! `contactsync-http`), [`xml`] and [`rejected`] (what goes over the wire), [`sink`],
//! [`source`].

pub mod client;
pub mod config;
pub mod rejected;
pub mod sink;
pub mod source;
pub mod xml;

pub use config::{Removal, SinkConfig, SourceConfig};
pub use sink::PoppuloSink;
pub use source::PoppuloSource;

use contactsync_core::{ConfigError, ConnectorSettings, Sink, SinkFactory, Source, SourceFactory};

fn build_sink(settings: &ConnectorSettings) -> Result<Box<dyn Sink>, ConfigError> {
    let config = SinkConfig::from_settings(settings)?;
    let sink = PoppuloSink::new(config).map_err(|e| settings.error("base_url", e.to_string()))?;
    Ok(Box::new(sink))
}

fn build_source(settings: &ConnectorSettings) -> Result<Box<dyn Source>, ConfigError> {
    let config = SourceConfig::from_settings(settings)?;
    let source =
        PoppuloSource::new(config).map_err(|e| settings.error("base_url", e.to_string()))?;
    Ok(Box::new(source))
}

contactsync_core::inventory::submit! {
    SinkFactory {
        name: "poppulo",
        summary: "Poppulo (Newsweaver API v2): subscriber import jobs; removal as INACTIVE or OPT_OUT",
        build: build_sink,
    }
}

contactsync_core::inventory::submit! {
    SourceFactory {
        name: "poppulo",
        summary: "Poppulo (Newsweaver API v2): every subscriber, page by page",
        build: build_source,
    }
}
