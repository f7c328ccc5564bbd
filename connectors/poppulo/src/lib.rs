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

use contactsync_core::registry::{boxed_sink, boxed_source};
use contactsync_core::{SinkFactory, SourceFactory};

// A client that cannot be set up as configured (the URL, a CA file) is an error of
// `base_url`'s.
contactsync_core::inventory::submit! {
    SinkFactory {
        name: "poppulo",
        summary: "Poppulo (Newsweaver API v2): subscriber import jobs; removal as INACTIVE or OPT_OUT",
        build: |s| boxed_sink(s, SinkConfig::from_settings, PoppuloSink::new, "base_url"),
    }
}

contactsync_core::inventory::submit! {
    SourceFactory {
        name: "poppulo",
        summary: "Poppulo (Newsweaver API v2): every subscriber, page by page",
        build: |s| boxed_source(s, SourceConfig::from_settings, PoppuloSource::new, "base_url"),
    }
}
