//! Actito's own faults, and what the sandbox saw: so that tests can expire tokens and
//! then check what the client did. Throttling, server errors, slow answers and lost
//! answers are the kit's wire faults, set through the same `/_sandbox/faults` object.

use serde::{Deserialize, Serialize};

/// Actito faults to inject (`POST /_sandbox/faults` takes the same JSON, together with
/// the wire faults).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Expire every token issued so far, once, when set.
    pub expire_tokens_now: bool,
    /// Profiles deleted while a client pages: while this count lasts, each listing of
    /// the second page (`page` = 1) first deletes the table's first profile, as staff
    /// would in the web application, so that the profiles behind it shift back by one
    /// and a client paging by offset skips one.
    pub delete_while_paging: u32,
    /// As `delete_while_paging`, and each deletion is followed by the creation of a new
    /// profile (at the end of the listing, as a new `profileId` sorts): the table's
    /// count is unchanged, yet the profiles behind the deleted one shift back by one.
    pub replace_while_paging: u32,
    /// Other applications of the licence hold its concurrent slots: the next this many
    /// API requests get the 429 a sixth concurrent request gets.
    pub busy_licence: u32,
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
    /// Requests slowed for going beyond the rate (the wire's `rate_calls`).
    pub slowed: u64,
}
