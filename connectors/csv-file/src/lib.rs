//! CSV file source and sink, registered as `csv`.
//!
//! The source streams a CSV file (header row required, UTF-8 with or without BOM) into
//! contacts, rejecting malformed rows with their real line number and going on. The sink
//! keeps a CSV file equal to the synced population: it receives only changes, so at
//! `finish` it merges them into the existing file and atomically replaces it.
//!
//! Both map columns to fields the same way ([`config::ColumnMap`]): a header naming a
//! canonical field (`email`, `first_name`, …, any case) is that field, the `columns`
//! setting maps other headers, and remaining columns become custom attributes (or are
//! ignored with `extra_columns = "ignore"`).
//!
//! Start reading at [`config`], then [`source::CsvSource`] and [`sink::CsvSink`].
//!
//! ```toml
//! [sources.hr]
//! type = "csv"
//! path = "people.csv"
//! delimiter = ";"
//! columns = { external_id = "Employee No", email = "E-mail" }
//!
//! [sinks.export]
//! type = "csv"
//! path = "synced.csv"
//! removal = "mark"    # keep removed people, with status inactive
//! ```

pub mod config;
mod limiter;
pub mod sink;
pub mod source;
mod spool;

use contactsync_core::{ConfigError, ConnectorSettings, Sink, SinkFactory, Source, SourceFactory};

/// Builds a [`source::CsvSource`] from its config section.
fn build_source(settings: &ConnectorSettings) -> Result<Box<dyn Source>, ConfigError> {
    Ok(Box::new(source::CsvSource::new(
        config::SourceConfig::from_settings(settings)?,
    )))
}

/// Builds a [`sink::CsvSink`] from its config section.
fn build_sink(settings: &ConnectorSettings) -> Result<Box<dyn Sink>, ConfigError> {
    Ok(Box::new(sink::CsvSink::new(
        config::SinkConfig::from_settings(settings)?,
    )))
}

contactsync_core::inventory::submit! {
    SourceFactory { name: "csv", summary: "reads people from a CSV file", build: build_source }
}

contactsync_core::inventory::submit! {
    SinkFactory { name: "csv", summary: "keeps a CSV file of the synced people", build: build_sink }
}
