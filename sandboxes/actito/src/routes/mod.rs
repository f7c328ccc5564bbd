//! The sandbox's HTTP surface: a gate every API request passes (faults, the 5-in-flight
//! limit, the request log, the token, `Accept`), then one handler per documented call.

// The error side of these helpers *is* the HTTP answer, handed straight back by
// the handler; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use axum::middleware::from_fn_with_state;
use contactsync_sandbox_kit::{inject_faults, log_calls};

use crate::model::{ProfileInput, Segmentation};
use crate::Shared;

mod imports;
mod profiles;

use imports::*;
use profiles::*;

type S = State<Arc<Shared>>;

/// An error answer: `{"status":n,"message":"…"}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"status": status.as_u16(), "message": message.into()})),
    )
        .into_response()
}

/// Every route.
pub fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.config.max_zip_bytes.saturating_add(1024 * 1024);
    Router::new()
        .route("/auth/token", get(token))
        .route("/v4/entity", get(entities))
        .route("/v4/entity/{e}/table", get(tables))
        .route("/v4/entity/{e}/table/{t}", get(structure))
        .route(
            "/v4/entity/{e}/table/{t}/profile",
            post(write_profile).get(list_profiles),
        )
        .route(
            "/v4/entity/{e}/table/{t}/profile/{key}",
            get(get_profile).delete(delete_profile),
        )
        .route(
            "/v4/entity/{e}/table/{t}/profile/{key}/subscription/{name}",
            post(subscribe).delete(unsubscribe),
        )
        .route(
            "/v4/entity/{e}/table/{t}/import",
            post(post_import).layer(DefaultBodyLimit::max(limit)),
        )
        .route("/v4/entity/{e}/import/{id}", get(status))
        .route("/v4/entity/{e}/import/{id}/result", get(result))
        .route("/v4/entity/{e}/import/{id}/result-file", get(result_file))
        // Injected faults inside the gate: a delayed request counts as in flight.
        .layer(from_fn_with_state(shared.wire.clone(), inject_faults))
        .layer(from_fn_with_state(shared.clone(), gate))
        .layer(from_fn_with_state(shared.wire.clone(), log_calls))
        .route("/_sandbox/stats", get(stats))
        .merge(contactsync_sandbox_kit::admin_routes(shared.clone()))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such resource") })
        .with_state(shared)
}

/// Decrements the in-flight count when the request ends, however it ends.
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accepts(headers: &HeaderMap, wanted: &[&str]) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    accept.split(',').any(|item| {
        let media = item
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        media.is_empty()
            || media == "*/*"
            || media == "application/*"
            || wanted.iter().any(|w| media == *w)
    })
}

/// The concurrency limit, token and `Accept` checks, and the 429/401 counters.
async fn gate(State(shared): S, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    if path.starts_with("/_sandbox") {
        return next.run(request).await;
    }
    let response = gated(&shared, &path, request, next).await;
    let status = response.status().as_u16();
    let mut state = shared.lock();
    if status == 429 {
        state.stats.too_many_requests += 1;
    }
    if status == 401 {
        state.stats.unauthorized += 1;
    }
    response
}

async fn gated(shared: &Shared, path: &str, request: Request, next: Next) -> Response {
    let now_in_flight = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let _guard = InFlight(shared);
    let busy = {
        let mut state = shared.lock();
        state.stats.max_in_flight = state.stats.max_in_flight.max(now_in_flight);
        let busy = state.busy_licence > 0;
        state.busy_licence = state.busy_licence.saturating_sub(1);
        busy
    };
    if busy || now_in_flight > shared.config.max_concurrent as u64 {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "more than {} concurrent requests for this licence",
                shared.config.max_concurrent
            ),
        );
    }
    if path != "/auth/token" {
        let token = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| token.trim().to_string())
            });
        let valid = token.is_some_and(|t| {
            shared
                .lock()
                .tokens
                .get(&t)
                .is_some_and(|expiry| Instant::now() < *expiry)
        });
        if !valid {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing, invalid or expired token",
            );
        }
    }
    let wanted: &[&str] = if path.ends_with("/result-file") {
        &["application/zip", "application/octet-stream"]
    } else {
        &["application/json"]
    };
    if !accepts(request.headers(), wanted) {
        return error(
            StatusCode::NOT_ACCEPTABLE,
            format!(
                "cannot answer in the format asked; this call answers {}",
                wanted[0]
            ),
        );
    }
    next.run(request).await
}

async fn token(State(shared): S, headers: HeaderMap) -> Response {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if key != Some(shared.config.api_key.as_str()) {
        return error(StatusCode::UNAUTHORIZED, "invalid API key");
    }
    let token: String = (0..32)
        .map(|_| format!("{:x}", rand::random::<u8>() % 16))
        .collect();
    let jti: String = (0..32)
        .map(|_| format!("{:x}", rand::random::<u8>() % 16))
        .collect();
    let lifetime = shared.config.token_lifetime;
    {
        let mut state = shared.lock();
        let now = Instant::now();
        state.tokens.retain(|_, expiry| *expiry > now);
        state.tokens.insert(token.clone(), now + lifetime);
        state.stats.tokens_issued += 1;
    }
    Json(json!({
        "accessToken": token,
        "tokenType": "bearer",
        "expiresIn": format!("{}s", lifetime.as_secs_f64()),
        "scope": "read write",
        "jti": jti,
    }))
    .into_response()
}

/// Checks the entity name.
pub fn entity_ok(shared: &Shared, entity: &str) -> Result<(), Response> {
    if entity == shared.config.entity {
        Ok(())
    } else {
        Err(error(StatusCode::NOT_FOUND, format!("no entity {entity}")))
    }
}

/// Checks entity and table names.
pub fn table_ok(shared: &Shared, entity: &str, table: &str) -> Result<(), Response> {
    entity_ok(shared, entity)?;
    if shared.lock().store.tables.contains_key(table) {
        Ok(())
    } else {
        Err(error(
            StatusCode::NOT_FOUND,
            format!("no profile table {table}"),
        ))
    }
}

/// What `read` takes from table `table` of `entity`, or the answer that it does not
/// exist.
pub fn read_table<T>(
    shared: &Shared,
    entity: &str,
    table: &str,
    read: impl FnOnce(&crate::model::Table) -> T,
) -> Result<T, Response> {
    entity_ok(shared, entity)?;
    let state = shared.lock();
    state
        .store
        .tables
        .get(table)
        .map(read)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("no profile table {table}")))
}

async fn entities(State(shared): S) -> Response {
    Json(json!({"entities": [{"name": shared.config.entity}]})).into_response()
}

async fn tables(State(shared): S, Path(e): Path<String>) -> Response {
    if let Err(r) = entity_ok(&shared, &e) {
        return r;
    }
    let names: Vec<Value> = shared
        .lock()
        .store
        .tables
        .keys()
        .map(|n| json!({"name": n}))
        .collect();
    Json(json!({"profileTables": names})).into_response()
}

async fn structure(State(shared): S, Path((e, t)): Path<(String, String)>) -> Response {
    match read_table(&shared, &e, &t, |table| table.def.to_json()) {
        Ok(json) => Json(json).into_response(),
        Err(r) => r,
    }
}

async fn stats(State(shared): S) -> Json<super::Stats> {
    Json(shared.stats())
}
