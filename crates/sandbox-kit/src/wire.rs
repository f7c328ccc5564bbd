//! One fault layer and one request log for every sandbox.
//!
//! [`log_calls`] goes around everything (it sees every answer, whoever gave it);
//! [`inject_faults`] goes where the platform would fail, usually just inside it
//! (as a front proxy would: before authentication). A sandbox with a concurrency limit
//! puts the fault layer inside its limit, so that a delayed request counts as in flight.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// The most entries the request log keeps (the oldest go first).
pub const LOG_LIMIT: usize = 10_000;

/// Failures the network and the platform's front end add. Call numbers count API calls
/// (not `/_sandbox/…`) that reach the fault layer, from the moment the faults were set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WireFaults {
    /// Answer every Nth call with the platform's throttled answer and `Retry-After`
    /// (0: never).
    pub throttle_every: u64,
    /// The `Retry-After` seconds of a throttled answer.
    pub retry_after_secs: u64,
    /// Answer every Nth call with the platform's server error (0: never).
    pub fail_every: u64,
    /// Answer the Nth call with the platform's server error (once).
    pub fail_nth: Option<u64>,
    /// Close the connection of every Nth call without an answer (0: never).
    pub drop_every: u64,
    /// Close the connection of the Nth call without an answer (once).
    pub drop_nth: Option<u64>,
    /// With `drop_every`/`drop_nth`: handle the call first, then drop the answer (the
    /// call took effect but the client cannot know).
    pub drop_after_handling: bool,
    /// Hold every call this many milliseconds before handling it.
    pub delay_ms: u64,
    /// The platform's documented rate, enforced as the service does when a client
    /// goes beyond it ("calls are slowed, not refused"): at most this many calls in any
    /// `rate_window_ms`; a call beyond is held until the window has room, and counted
    /// in [`WireCounts::slowed`]. 0: off (the default, so that tests and benches run at
    /// full speed).
    pub rate_calls: u64,
    /// The window of `rate_calls`, in milliseconds (60,000 for "a minute").
    pub rate_window_ms: u64,
}

impl Default for WireFaults {
    fn default() -> Self {
        WireFaults {
            throttle_every: 0,
            retry_after_secs: 1,
            fail_every: 0,
            fail_nth: None,
            drop_every: 0,
            drop_nth: None,
            drop_after_handling: false,
            delay_ms: 0,
            rate_calls: 0,
            rate_window_ms: 60_000,
        }
    }
}

impl WireFaults {
    /// The Nth call is handled, then its connection closed before the answer: it took
    /// effect, and the client cannot know.
    pub fn answer_lost(nth: u64) -> Self {
        WireFaults {
            drop_nth: Some(nth),
            drop_after_handling: true,
            ..WireFaults::default()
        }
    }

    /// The Nth call is answered with the platform's server error, not handled.
    pub fn fails(nth: u64) -> Self {
        WireFaults {
            fail_nth: Some(nth),
            ..WireFaults::default()
        }
    }

    /// The JSON keys these faults take, for splitting one `/_sandbox/faults` object
    /// between the wire and the platform.
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(WireFaults::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// What the Nth call gets.
    fn injected(&self, n: u64) -> Option<Injected> {
        let every = |k: u64| k > 0 && n.is_multiple_of(k);
        if self.drop_nth == Some(n) || every(self.drop_every) {
            Some(if self.drop_after_handling {
                Injected::DroppedAfterHandling
            } else {
                Injected::Dropped
            })
        } else if every(self.throttle_every) {
            Some(Injected::Throttled)
        } else if self.fail_nth == Some(n) || every(self.fail_every) {
            Some(Injected::Failed)
        } else {
            None
        }
    }
}

/// A fault the layer injected into one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Injected {
    /// Answered with the platform's throttled answer.
    Throttled,
    /// Answered with the platform's server error.
    Failed,
    /// The connection was closed without an answer; the call was not handled.
    Dropped,
    /// The call was handled, then its connection closed without the answer.
    DroppedAfterHandling,
}

/// How the platform words the answers the fault layer gives.
#[derive(Debug, Clone, Copy)]
pub struct Answers {
    /// A throttled answer; the kit adds `Retry-After` with the seconds.
    pub throttled: fn() -> Response,
    /// A server error.
    pub failed: fn() -> Response,
}

/// One call, as the log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedRequest {
    /// The method.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query, when there was one.
    pub query: Option<String>,
    /// The answer's status (also for a dropped answer: the one that was not sent).
    pub status: u16,
    /// The fault injected, if any.
    pub injected: Option<Injected>,
    /// What the platform's handler said about the call ([`LogDetail`]).
    pub detail: Option<serde_json::Value>,
}

/// A response extension a handler adds to put platform details (the SOAP operation,
/// the records sent) into the call's [`LoggedRequest::detail`].
#[derive(Debug, Clone)]
pub struct LogDetail(pub serde_json::Value);

/// Counters of the calls the wire saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireCounts {
    /// API calls, all routes.
    pub requests: u64,
    /// API calls by route (`POST /v2/{account}/subscriber_imports`).
    pub requests_by_route: BTreeMap<String, u64>,
    /// Throttled answers injected.
    pub throttled: u64,
    /// Server errors injected.
    pub failed: u64,
    /// Connections dropped on purpose.
    pub dropped: u64,
    /// Calls held because they went beyond [`WireFaults::rate_calls`].
    pub slowed: u64,
}

#[derive(Debug, Default)]
struct WireState {
    faults: WireFaults,
    calls: u64,
    log: VecDeque<LoggedRequest>,
    counts: WireCounts,
    /// When the calls of the current rate window were let through.
    recent: VecDeque<std::time::Instant>,
}

/// The fault layer's and the log's shared state. One per running sandbox.
#[derive(Debug)]
pub struct Wire {
    answers: Answers,
    state: Mutex<WireState>,
}

/// Marks a response whose connection [`crate::serve`] must close without sending it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropConnection;

impl Wire {
    /// A wire with these answers and faults.
    pub fn new(answers: Answers, faults: WireFaults) -> Self {
        Wire {
            answers,
            state: Mutex::new(WireState {
                faults,
                ..WireState::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, WireState> {
        // A poisoned lock (a panic elsewhere) still holds usable counters.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the faults; call numbers count from now.
    pub fn set_faults(&self, faults: WireFaults) {
        let mut state = self.lock();
        tracing::info!(?faults, "sandbox faults set");
        state.faults = faults;
        state.calls = 0;
    }

    /// The current faults.
    pub fn faults(&self) -> WireFaults {
        self.lock().faults.clone()
    }

    /// The calls logged so far, oldest first (at most [`LOG_LIMIT`]).
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.lock().log.iter().cloned().collect()
    }

    /// Forgets the logged calls (counters stay).
    pub fn clear_requests(&self) {
        self.lock().log.clear();
    }

    /// The counters so far.
    pub fn counts(&self) -> WireCounts {
        self.lock().counts.clone()
    }

    /// Back to no faults, no log, no counters.
    pub fn reset(&self) {
        *self.lock() = WireState::default();
    }
}

fn is_admin(request: &Request) -> bool {
    request.uri().path().starts_with("/_sandbox")
}

/// The middleware that logs and counts every API call with its final answer:
/// `axum::middleware::from_fn_with_state(wire.clone(), log_calls)`, around everything.
pub async fn log_calls(State(wire): State<Arc<Wire>>, request: Request, next: Next) -> Response {
    if is_admin(&request) {
        return next.run(request).await;
    }
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let query = request.uri().query().map(str::to_string);
    let route = match request.extensions().get::<MatchedPath>() {
        Some(matched) => format!("{method} {}", matched.as_str()),
        None => format!("{method} {path}"),
    };
    let response = next.run(request).await;
    let injected = response.extensions().get::<Injected>().copied();
    let detail = response
        .extensions()
        .get::<LogDetail>()
        .map(|d| d.0.clone());
    let mut state = wire.lock();
    state.counts.requests += 1;
    *state.counts.requests_by_route.entry(route).or_default() += 1;
    if state.log.len() >= LOG_LIMIT {
        state.log.pop_front();
    }
    state.log.push_back(LoggedRequest {
        method,
        path,
        query,
        status: response.status().as_u16(),
        injected,
        detail,
    });
    response
}

/// The middleware that injects the [`WireFaults`]:
/// `axum::middleware::from_fn_with_state(wire.clone(), inject_faults)`.
pub async fn inject_faults(
    State(wire): State<Arc<Wire>>,
    request: Request,
    next: Next,
) -> Response {
    if is_admin(&request) {
        return next.run(request).await;
    }
    let (injected, delay, retry_after) = {
        let mut state = wire.lock();
        state.calls += 1;
        let injected = state.faults.injected(state.calls);
        match injected {
            Some(Injected::Throttled) => state.counts.throttled += 1,
            Some(Injected::Failed) => state.counts.failed += 1,
            Some(Injected::Dropped | Injected::DroppedAfterHandling) => state.counts.dropped += 1,
            None => {}
        }
        let mut delay = Duration::from_millis(state.faults.delay_ms);
        if state.faults.rate_calls > 0 {
            let window = Duration::from_millis(state.faults.rate_window_ms);
            let now = std::time::Instant::now();
            while state
                .recent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= window)
            {
                state.recent.pop_front();
            }
            // Beyond the rate: held until the call that fills the window is a window
            // old, as if it had arrived then.
            let mut at = now;
            if state.recent.len() as u64 >= state.faults.rate_calls {
                let full = state.recent.len() - state.faults.rate_calls as usize;
                if let Some(t) = state.recent.get(full) {
                    at = (*t + window).max(now);
                    delay += at - now;
                    state.counts.slowed += 1;
                }
            }
            state.recent.push_back(at);
        }
        (injected, delay, state.faults.retry_after_secs)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut response = match injected {
        Some(Injected::Throttled) => {
            let mut response = (wire.answers.throttled)();
            if let Ok(value) = axum::http::HeaderValue::from_str(&retry_after.to_string()) {
                response.headers_mut().insert("retry-after", value);
            }
            response
        }
        Some(Injected::Failed) => (wire.answers.failed)(),
        Some(Injected::Dropped) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Some(Injected::DroppedAfterHandling) | None => next.run(request).await,
    };
    if let Some(injected) = injected {
        response.extensions_mut().insert(injected);
        if matches!(injected, Injected::Dropped | Injected::DroppedAfterHandling) {
            response.extensions_mut().insert(DropConnection);
        }
    }
    response
}
