//! A SQL database as a source: people read straight from the HR or CRM database with
//! one query, in a read-only transaction that sees one snapshot, streamed from a
//! server-side cursor, incremental with a bound `:since`.
//!
//! PostgreSQL (`tokio-postgres`) and MySQL or MariaDB (`mysql_async`), TLS by rustls as
//! the PostgreSQL state connects. Read in this order: [`config`] (what a user writes),
//! [`query`] (`:since`), [`values`] (columns as fields, values as text), [`reading`]
//! (rows as records, whichever the server), [`postgres`] and [`mysql`] (the connection
//! and the query), [`source`]. docs/connectors/sql.md is the user's page.

pub mod config;
pub mod mysql;
pub mod postgres;
pub mod query;
pub mod reading;
pub mod source;
pub mod values;

pub use config::SqlConfig;
pub use source::SqlSource;

contactsync_core::inventory::submit! {
    contactsync_core::SourceFactory {
        name: "sql",
        summary: "a SQL database (PostgreSQL, MySQL, MariaDB): one read-only query, streamed, incremental with :since",
        build: |s| contactsync_core::registry::boxed_source(s, SqlConfig::from_settings, SqlSource::new, "url"),
    }
}
