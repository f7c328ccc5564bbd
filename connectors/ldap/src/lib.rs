//! An LDAP directory as a contactsync source and sink.
//!
//! The usual system of record is the company directory: this crate reads people from
//! it with a paged search (full or incremental by `modifyTimestamp`) and, the other
//! way round, keeps a subtree of a directory in step with another source. It is not an
//! LDAP library (that is `ldap3`), and knows nothing of the engine or the sync state:
//! it speaks only `contactsync-core`.
//!
//! Start reading at [`LdapSource`] (with the design notes in [`source`]) and
//! [`LdapSink`]; the settings are in [`config`], the attribute mapping in [`mapping`].
//!
//! ```toml
//! [sources.directory]
//! type = "ldap"
//! url = "ldaps://ldap.example.org"
//! bind_dn = "cn=contactsync,ou=services,dc=example,dc=org"
//! password_file = "ldap-password"
//! base_dn = "ou=people,dc=example,dc=org"
//! inactive_filter = "(employeeType=disabled)"
//! [sources.directory.attributes]
//! uid = "external_id"
//! ```

pub mod client;
pub mod config;
pub mod mapping;
pub mod sink;
pub mod source;

use contactsync_core::{ConfigError, ConnectorSettings, Sink, SinkFactory, Source, SourceFactory};

pub use config::{Removal, SinkConfig, SourceConfig, TlsMode};
pub use sink::LdapSink;
pub use source::LdapSource;

/// The source factory registered as `ldap`: checks the settings, touches no network.
pub fn build_source(settings: &ConnectorSettings) -> Result<Box<dyn Source>, ConfigError> {
    Ok(Box::new(LdapSource::new(SourceConfig::from_settings(
        settings,
    )?)))
}

/// The sink factory registered as `ldap`: checks the settings, touches no network.
pub fn build_sink(settings: &ConnectorSettings) -> Result<Box<dyn Sink>, ConfigError> {
    Ok(Box::new(LdapSink::new(SinkConfig::from_settings(
        settings,
    )?)))
}

contactsync_core::inventory::submit! {
    SourceFactory {
        name: "ldap",
        summary: "people from an LDAP directory (paged search, incremental by modifyTimestamp)",
        build: build_source,
    }
}

contactsync_core::inventory::submit! {
    SinkFactory {
        name: "ldap",
        summary: "entries in an LDAP directory (upserts only what changed; delete or mark on removal)",
        build: build_sink,
    }
}
