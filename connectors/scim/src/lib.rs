//! SCIM 2.0 source and sink: the same people provisioned into any application that
//! speaks SCIM (RFC 7643 resources, RFC 7644 protocol), as Entra ID and Okta provision.
//!
//! - [`ScimSink`] (`type = "scim"` under `[sinks.…]`) finds each new person in the app
//!   first (`userName` or `externalId`) and adopts them, else creates them; updates
//!   only the attributes the source changed (PATCH, or GET and PUT with `If-Match`);
//!   removes by deactivating (or deleting); keeps the groups named in `groups` in step
//!   with subscriptions; writes in `/Bulk` requests when the server takes them.
//! - [`ScimSource`] (`type = "scim"` under `[sources.…]`) reads `/Users` page by page,
//!   complete only when the pages covered the server's total.
//!
//! Read in this order: [`config`] (what a user writes), [`user`] (the mapping between a
//! contact and a User), [`client`] (the calls, on `contactsync-http`), [`sink`],
//! [`source`]. docs/connectors/scim.md is the user's page.

pub mod client;
pub mod config;
pub mod sink;
pub mod source;
pub mod user;

pub use config::{ScimConfig, SinkConfig, SourceConfig};
pub use sink::ScimSink;
pub use source::ScimSource;

// A client that cannot be set up as configured (the URL, a CA file) is an error of
// `base_url`'s.
contactsync_core::inventory::submit! {
    contactsync_core::SinkFactory {
        name: "scim",
        summary: "SCIM 2.0 (any app Entra or Okta would provision): users found or created, patched, deactivated; groups",
        build: |s| contactsync_core::registry::boxed_sink(s, ScimConfig::from_settings, ScimSink::new, "base_url"),
    }
}
contactsync_core::inventory::submit! {
    contactsync_core::SourceFactory {
        name: "scim",
        summary: "SCIM 2.0: every user of an app, page by page",
        build: |s| contactsync_core::registry::boxed_source(s, ScimConfig::from_settings, ScimSource::new, "base_url"),
    }
}
