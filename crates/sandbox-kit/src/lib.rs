//! What every platform sandbox shares, so that each sandbox crate holds only what its
//! platform does.
//!
//! A sandbox is a real HTTP server on loopback that follows a platform's documents
//! (`shared/specs/`). It depends on `contactsync-core` and this kit, never on the
//! connector it stands in for: the two are written separately from the documents, so
//! that one misreading cannot hide on both sides (the tidy test in `xtask` checks it).
//!
//! The parts:
//! - [`Platform`]: what a sandbox's shared state tells the kit (its name, its wire, its
//!   own faults, how to save and reset it).
//! - [`start`] binds `127.0.0.1:PORT`, serves the router with [`serve`] (hyper, so that
//!   a request can lose its connection on purpose) until shutdown, then saves; it gives
//!   a [`Running`] handle that stops the server when dropped, and
//!   [`Running::detach`] turns it into the registry's `RunningSandbox`.
//! - [`Wire`]: one fault layer for every sandbox ([`WireFaults`]: throttle every Nth
//!   call with `Retry-After`, fail the Nth or every Nth call, delay, drop a connection
//!   before or *after* handling the request) and the request log ([`LoggedRequest`]).
//! - [`admin_routes`]: `GET`/`POST /_sandbox/faults` (the wire's faults and the
//!   platform's in one JSON object), `GET`/`DELETE /_sandbox/requests`,
//!   `POST /_sandbox/reset`.
//! - [`data`]: the JSON data file, loaded at start and saved atomically; [`Guarded`]
//!   the state behind one lock, saved to it.
//! - [`plain_email`]: the plain address form most platforms ask for.
//! - [`SandboxError`]: why a sandbox could not start, load, save or seed.

pub mod data;
mod error;
mod guarded;
mod server;
mod wire;

pub use error::SandboxError;
pub use guarded::{plain_email, Guarded};
pub use server::{admin_routes, serve, start, start_for_registry, Platform, Running};
pub use wire::{
    inject_faults, log_calls, Answers, Injected, LogDetail, LoggedRequest, Wire, WireCounts,
    WireFaults, LOG_LIMIT,
};
