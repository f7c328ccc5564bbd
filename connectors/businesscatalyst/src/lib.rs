//! Business Catalyst CRM (SOAP) source and sink.
//!
//! Business Catalyst (Adobe, retired 2019; compatible exports live on) exposes its CRM
//! as an ASP.NET SOAP web service. This crate speaks it directly with quick-xml (no SOAP
//! framework): [`config`] is what the user writes, [`soap`] builds and reads envelopes,
//! [`client`] makes the calls (authentication in every call, retries, faults),
//! [`source`] reads contacts changed since a date, page by page, and [`sink`] upserts
//! and removes them. The fake service for tests is its own crate,
//! `contactsync-sandbox-businesscatalyst`; it shares no code with the client.
//!
//! Start reading at [`config::BcSettings`], then [`source::BcSource`] and
//! [`sink::BcSink`].

pub mod client;
pub mod config;
pub mod sink;
pub mod soap;
pub mod source;

pub use config::{BcConfig, BcSettings, Removal};
pub use sink::BcSink;
pub use source::BcSource;

contactsync_core::inventory::submit! {
    contactsync_core::SourceFactory {
        name: "businesscatalyst",
        summary: "Business Catalyst CRM contacts (SOAP), incremental by lastUpdateDate",
        build: source::build,
    }
}

contactsync_core::inventory::submit! {
    contactsync_core::SinkFactory {
        name: "businesscatalyst",
        summary: "Business Catalyst CRM contacts (SOAP): bulk upserts by externalId or email",
        build: sink::build,
    }
}
