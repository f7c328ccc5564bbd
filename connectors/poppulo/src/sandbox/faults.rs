//! Fault injection and counters: the failures the documents promise (throttling, busy
//! account, imports ending in ERROR or CANCELLED) and the ones networks add (lost
//! answers, slow answers), switched on by tests through the Rust API or
//! `POST /_sandbox/faults`, and counters that let tests assert how a client behaved
//! (for example that it never polled before `ping_after`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::routes::error_response;
use super::Shared;

/// Faults to inject. Request numbers count API requests (not `/_sandbox/…`) from the
/// moment the faults were set. JSON field names are the same as here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Answer every Nth request with 503 and `Retry-After` (0: never).
    pub throttle_every: u64,
    /// The `Retry-After` seconds of a throttled answer.
    pub retry_after_secs: u64,
    /// The next accepted import ends in ERROR without processing a row.
    pub fail_next_import: bool,
    /// The next accepted import ends CANCELLED after this many rows.
    pub cancel_next_import_after: Option<usize>,
    /// Close the connection of the Nth request without answering (once).
    pub drop_nth: Option<u64>,
    /// With `drop_nth`: handle the request first, then drop the answer (the call took
    /// effect but the client cannot know).
    pub drop_after_handling: bool,
    /// Delay every answer by this many milliseconds.
    pub delay_ms: u64,
    /// For this many milliseconds from now, the account has an import IN_PROGRESS
    /// (started in the web application): posting an import gets 503 without
    /// `Retry-After`.
    pub busy_for_ms: u64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            throttle_every: 0,
            retry_after_secs: 1,
            fail_next_import: false,
            cancel_next_import_after: None,
            drop_nth: None,
            drop_after_handling: false,
            delay_ms: 0,
            busy_for_ms: 0,
        }
    }
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

/// Marks a response whose connection must be closed without sending it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropConnection;

/// Counts, delays, throttles and drops API requests, before auth (as a front proxy
/// would).
pub(crate) async fn layer(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let route = match request.extensions().get::<MatchedPath>() {
        Some(path) => format!("{} {}", request.method(), path.as_str()),
        None => format!("{} (no route)", request.method()),
    };
    let (delay, throttle, drop, drop_after) = {
        let mut state = shared.lock();
        state.stats.requests += 1;
        *state.stats.requests_by_route.entry(route).or_default() += 1;
        state.fault_counter += 1;
        let n = state.fault_counter;
        let faults = state.faults.clone();
        let drop = faults.drop_nth == Some(n);
        let throttle = !drop && faults.throttle_every > 0 && n % faults.throttle_every == 0;
        if drop {
            state.stats.dropped += 1;
        } else if throttle {
            state.stats.throttled += 1;
        }
        (
            Duration::from_millis(faults.delay_ms),
            throttle.then_some(faults.retry_after_secs),
            drop,
            faults.drop_after_handling,
        )
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if drop && !drop_after {
        let mut response = StatusCode::INTERNAL_SERVER_ERROR.into_response();
        response.extensions_mut().insert(DropConnection);
        return response;
    }
    if let Some(seconds) = throttle {
        return throttled(seconds, "rate limit exceeded: retry later");
    }
    let mut response = next.run(request).await;
    if drop {
        response.extensions_mut().insert(DropConnection);
    }
    response
}

/// A 503 with `Retry-After`.
pub(crate) fn throttled(seconds: u64, message: &str) -> Response {
    let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, message);
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert("retry-after", value);
    }
    response
}
