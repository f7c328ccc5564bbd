//! Poppulo's own faults and counters: the failures the documents promise (a busy
//! account, imports ending in ERROR or CANCELLED), switched on by tests through the Rust
//! API or `POST /_sandbox/faults` (in one object with the kit's wire faults: throttling,
//! lost answers, delays), and counters that let tests assert how a client behaved (for
//! example that it never polled before `ping_after`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Poppulo faults to inject. JSON field names are the same as here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// The next accepted import ends in ERROR without processing a row.
    pub fail_next_import: bool,
    /// The next accepted import ends CANCELLED after this many rows.
    pub cancel_next_import_after: Option<usize>,
    /// For this many milliseconds from now, the account has an import IN_PROGRESS
    /// (started in the web application): posting an import gets 503 without
    /// `Retry-After`.
    pub busy_for_ms: u64,
}

/// What the sandbox has seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// API requests, all routes.
    pub requests: u64,
    /// API requests by route (`POST /v2/{account}/subscriber_imports`).
    pub requests_by_route: BTreeMap<String, u64>,
    /// Imports accepted (202).
    pub imports_posted: u64,
    /// Import posts refused because another import was in progress (503, no
    /// `Retry-After`).
    pub imports_refused_busy: u64,
    /// Import status polls answered (not counting early ones).
    pub import_polls: u64,
    /// Import polls before the `ping_after` the sandbox gave (503 + `Retry-After`).
    pub early_polls: u64,
    /// 401 answers.
    pub unauthorized: u64,
    /// Throttled answers (503 + `Retry-After`), including early polls.
    pub throttled: u64,
    /// Connections dropped on purpose.
    pub dropped: u64,
}
