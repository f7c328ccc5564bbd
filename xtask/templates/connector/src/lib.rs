//! __Name__ source and sink.
//!
// @if sink
//! - [`__Name__Sink`] (`type = "__name__"` under `[sinks.…]`) writes each change as one
//!   call: `PUT /people/{key}` (an upsert, so that a change sent twice does no harm)
//!   or `DELETE /people/{key}`.
// @end
// @if source
//! - [`__Name__Source`] (`type = "__name__"` under `[sources.…]`) reads `GET /people`,
//!   page by page.
// @end
// @if !source
//! - [`__Name__Source`] reads `GET /people` back; it is not registered as a source (the
//!   connector is a sink only): the conformance test reads back what the sink wrote
//!   with it. Register it with a `SourceFactory` to make the connector a source too.
// @end
//!
//! Written by `cargo xtask new-connector`: the calls are a placeholder protocol (JSON
//! people under `/people`). Replace them with the platform's, from its documents (copy
//! what the connector follows of them into `docs/connectors/`), keeping the shape.
//!
//! Read in this order: [`config`] (what a user writes), [`client`] (the calls, on
//! `contactsync-http`), [`sink`], [`source`].

pub mod client;
pub mod config;
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

// A client that cannot be set up as configured (the URL, a CA file) is an error of
// `base_url`'s.
// @if sink
contactsync_core::inventory::submit! {
    contactsync_core::SinkFactory {
        name: "__name__",
        summary: "__Name__: people upserted and deleted one call each",
        build: |s| contactsync_core::registry::boxed_sink(s, SinkConfig::from_settings, __Name__Sink::new, "base_url"),
    }
}
// @end
// @if source
contactsync_core::inventory::submit! {
    contactsync_core::SourceFactory {
        name: "__name__",
        summary: "__Name__: every person, page by page",
        build: |s| contactsync_core::registry::boxed_source(s, SourceConfig::from_settings, __Name__Source::new, "base_url"),
    }
}
// @end
