//! Failures on demand, and what the sandbox saw: so that tests can provoke throttling,
//! server errors, slow answers and expired tokens, and then check what the client did.

use serde::{Deserialize, Serialize};

/// Failures to inject (`POST /_sandbox/faults` takes the same JSON). Request numbers
/// count API requests (not `/_sandbox/…`) from when the faults were set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Answer 429 to every Nth request (0: never).
    pub too_many_every: u64,
    /// Answer 500 to every Nth request (0: never).
    pub error_every: u64,
    /// Hold every request this many milliseconds (while it counts as in flight).
    pub delay_ms: u64,
    /// Expire every token issued so far, once, when set.
    pub expire_tokens_now: bool,
}

/// Counters of what the sandbox saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// API requests (not `/_sandbox/…`).
    pub requests: u64,
    /// Tokens issued.
    pub tokens_issued: u64,
    /// `POST …/profile` requests.
    pub profile_posts: u64,
    /// `DELETE …/profile/{key}` requests.
    pub profile_deletes: u64,
    /// Subscribe and unsubscribe requests.
    pub subscription_changes: u64,
    /// Imports accepted.
    pub imports_posted: u64,
    /// 429 answers, for any reason.
    pub too_many_requests: u64,
    /// 401 answers.
    pub unauthorized: u64,
    /// Most requests in flight at once.
    pub max_in_flight: u64,
}

/// One request, as logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedRequest {
    /// The method.
    pub method: String,
    /// The path (percent-decoding not applied; no query string).
    pub path: String,
    /// The answer's status.
    pub status: u16,
}
