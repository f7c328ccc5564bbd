//! Conformance tests every source and sink passes against a live instance.

pub mod slapd;
