//! Actito (v4 API) source and sink.
//!
//! - [`ActitoSink`] (`type = "actito"` under `[sinks.…]`) writes changes into one
//!   profile table: one profile at a time for small change sets, a bulk import for
//!   large ones (chosen per run from the whole change set), within Actito's limits
//!   (5 calls in flight, 12 bulk imports per table per day, one import at a time).
//!   Every record is checked against the table's structure before anything is sent.
//!   Removals unsubscribe (default) or delete.
//! - [`ActitoSource`] (`type = "actito"` under `[sources.…]`) reads every profile of
//!   the table, page by page.
//! - The fake Actito for tests and `base_url = "sandbox"` is its own crate,
//!   `contactsync-sandbox-actito`, which does not depend on this one (nor this one on
//!   it): each is written from the API documents, so that one misunderstanding cannot
//!   hide on both sides.
//!
//! Read in this order: [`config`] (what a user writes), [`client`] (auth token and
//! calls, on `contactsync-http`), [`schema`] (the table and record validation),
//! [`bulk`] (mass imports), [`sink`], [`source`].

pub mod bulk;
pub mod client;
pub mod config;
pub mod cost;
pub mod schema;
pub mod sink;
pub mod source;

pub use config::{QuotaExhausted, Removal, SinkConfig, SourceConfig};
pub use sink::ActitoSink;
pub use source::ActitoSource;

use contactsync_core::registry::{boxed_sink, boxed_source};
use contactsync_core::{SinkFactory, SourceFactory};

// A client that cannot be set up as configured (the URL, a CA file) is an error of
// `base_url`'s.
contactsync_core::inventory::submit! {
    SinkFactory {
        name: "actito",
        summary: "Actito (v4): profiles one by one or by bulk import (12/day); removal by unsubscribe or delete",
        build: |s| boxed_sink(s, SinkConfig::from_settings, ActitoSink::new, "base_url"),
    }
}

contactsync_core::inventory::submit! {
    SourceFactory {
        name: "actito",
        summary: "Actito (v4): every profile of a table, page by page",
        build: |s| boxed_source(s, SourceConfig::from_settings, ActitoSource::new, "base_url"),
    }
}
