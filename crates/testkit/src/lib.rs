//! Conformance tests every source and sink passes against a live instance.
//!
//! Every connector promises the engine the same things (see the contracts on
//! [`contactsync_core::Source`] and [`contactsync_core::Sink`]); this crate checks those
//! promises the same way for all of them, so that a connector is judged by one yardstick
//! and a failure names the check and what differed. It is a dev-dependency: nothing here
//! runs in production.
//!
//! Start with:
//! - [`source_conformance`]: a full read of a source holding known contacts.
//! - [`SinkConformance`]: create, re-apply, update, remove and reject through a sink,
//!   checked by reading the system back with a source.
//! - [`MemoryStore`]: the in-memory [`contactsync_core::SinkStore`] to run a sink with.
//! - [`sample_contacts`]: deterministic, valid contacts to feed either.
//!
//! ```
//! use contactsync_testkit::{sample_contacts, MemoryStore};
//!
//! let contacts = sample_contacts(3);
//! assert_eq!(contacts.len(), 3);
//! let mut store = MemoryStore::new();
//! let ctx = store.context();
//! assert!(!ctx.cancel.is_cancelled());
//! ```

pub mod changes;
mod compare;
mod error;
pub mod mariadb;
pub mod postgres;
mod samples;
pub mod scim2_server;
mod sink;
pub mod slapd;
mod source;
mod store;
pub mod tls;

pub use compare::{compare_contacts, Difference, FieldDifference};
pub use error::{Check, ConformanceError};
pub use samples::{default_round_trip_fields, sample_contacts, SAMPLE_ATTRIBUTES};
pub use sink::SinkConformance;
pub use source::{read_all, read_all_skipping_unchanged, source_conformance, SourceRead};
pub use store::MemoryStore;

#[cfg(test)]
mod tests;
