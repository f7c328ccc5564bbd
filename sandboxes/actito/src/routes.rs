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

use super::import;
use super::model::{ProfileInput, Segmentation};
use super::Shared;

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
            post(import::post_import).layer(DefaultBodyLimit::max(limit)),
        )
        .route("/v4/entity/{e}/import/{id}", get(import::status))
        .route("/v4/entity/{e}/import/{id}/result", get(import::result))
        .route(
            "/v4/entity/{e}/import/{id}/result-file",
            get(import::result_file),
        )
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
    {
        let mut state = shared.lock();
        state.stats.max_in_flight = state.stats.max_in_flight.max(now_in_flight);
    }
    if now_in_flight > shared.config.max_concurrent as u64 {
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
    if let Err(r) = table_ok(&shared, &e, &t) {
        return r;
    }
    let json = shared
        .lock()
        .store
        .tables
        .get(&t)
        .map(|t| t.def.to_json())
        .unwrap_or(Value::Null);
    Json(json).into_response()
}

fn text(v: &Value) -> Option<Option<String>> {
    match v {
        Value::Null => Some(None),
        Value::String(s) => Some(Some(s.clone())),
        Value::Number(n) => Some(Some(n.to_string())),
        Value::Bool(b) => Some(Some(b.to_string())),
        _ => None,
    }
}

/// Reads a profile body (`attributes`, `subscriptions`, `segmentations`).
fn profile_input(body: &Value) -> Result<ProfileInput, String> {
    let mut input = ProfileInput::default();
    let attrs = body
        .get("attributes")
        .and_then(Value::as_array)
        .ok_or("the body needs an `attributes` list")?;
    for a in attrs {
        let name = a
            .get("name")
            .and_then(Value::as_str)
            .ok_or("an attribute without a name")?;
        let value = text(a.get("value").unwrap_or(&Value::Null)).ok_or_else(|| {
            format!("attribute {name}: the value must be a string, number, boolean or null")
        })?;
        input.attributes.push((name.to_string(), value));
    }
    for s in body
        .get("subscriptions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = s
            .get("name")
            .and_then(Value::as_str)
            .ok_or("a subscription without a name")?;
        let on = s
            .get("subscribe")
            .and_then(Value::as_bool)
            .ok_or_else(|| format!("subscription {name}: `subscribe` must be true or false"))?;
        input.subscriptions.push((name.to_string(), on));
    }
    for s in body
        .get("segmentations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let belongs = s.get("belongs").and_then(Value::as_bool).unwrap_or(true);
        let seg = s
            .get("segmentation")
            .ok_or("a segmentation entry without `segmentation`")?;
        let (Some(category), Some(name)) = (
            seg.get("category").and_then(Value::as_str),
            seg.get("name").and_then(Value::as_str),
        ) else {
            return Err("a segmentation needs a category and a name".into());
        };
        input.segmentations.push((
            Segmentation {
                category: category.to_string(),
                name: name.to_string(),
            },
            belongs,
        ));
    }
    Ok(input)
}

async fn write_profile(
    State(shared): S,
    Path((e, t)): Path<(String, String)>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Bytes,
) -> Response {
    if let Err(r) = table_ok(&shared, &e, &t) {
        return r;
    }
    shared.lock().stats.profile_posts += 1;
    let allow_update = query
        .ok()
        .as_ref()
        .and_then(|q| q.get("allowUpdate"))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let json: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            )
        }
    };
    let input = match profile_input(&json) {
        Ok(i) => i,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let now = import::now();
    let result = {
        let mut state = shared.lock();
        let store = &mut state.store;
        let mut next = store.next_profile_id;
        let r = match store.tables.get_mut(&t) {
            Some(table) => table.write(&input, true, allow_update, &mut next, &now),
            None => Err("no table".into()),
        };
        store.next_profile_id = next;
        r
    };
    match result {
        Ok((id, created)) => {
            shared.save_logged();
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let location = format!("/v4/entity/{e}/table/{t}/profile/{id}");
            (
                status,
                [(header::LOCATION, location)],
                Json(json!({"profileId": id})),
            )
                .into_response()
        }
        Err(m) => error(StatusCode::BAD_REQUEST, m),
    }
}

async fn list_profiles(
    State(shared): S,
    Path((e, t)): Path<(String, String)>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    if let Err(r) = table_ok(&shared, &e, &t) {
        return r;
    }
    let q = query.map(|q| q.0).unwrap_or_default();
    let number: usize = match q.get("number").map(|n| n.trim().parse::<usize>()) {
        None => 100,
        Some(Ok(n)) if n > 0 => n.min(1000),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "`number` must be a positive integer",
            )
        }
    };
    let page: usize = match q.get("page").map(|n| n.trim().parse::<usize>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "`page` must be an integer from 0"),
    };
    let search = match q.get("search").filter(|s| !s.trim().is_empty()) {
        None => None,
        Some(s) => match s.split_once('=') {
            Some((a, v)) => Some((a.trim().to_string(), v.to_string())),
            None => return error(StatusCode::BAD_REQUEST, "`search` must be attribute=value"),
        },
    };
    let state = shared.lock();
    let Some(table) = state.store.tables.get(&t) else {
        return error(StatusCode::NOT_FOUND, "no table");
    };
    let matching: Vec<_> = table
        .profiles
        .values()
        .filter(|p| match &search {
            None => true,
            Some((a, v)) if a == "profileId" => p.id.to_string() == *v,
            Some((a, v)) => p.attributes.get(a) == Some(v),
        })
        .collect();
    let total = matching.len();
    let profiles: Vec<Value> = matching
        .into_iter()
        .skip(page.saturating_mul(number))
        .take(number)
        .map(|p| p.to_json(&table.def))
        .collect();
    Json(json!({"profiles": profiles, "totalCount": total, "page": page, "number": number}))
        .into_response()
}

async fn get_profile(
    State(shared): S,
    Path((e, t, key)): Path<(String, String, String)>,
) -> Response {
    if let Err(r) = table_ok(&shared, &e, &t) {
        return r;
    }
    let state = shared.lock();
    let Some(table) = state.store.tables.get(&t) else {
        return error(StatusCode::NOT_FOUND, "no table");
    };
    match table.find(&key).and_then(|id| table.profiles.get(&id)) {
        Some(p) => Json(p.to_json(&table.def)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no profile {key}")),
    }
}

async fn delete_profile(
    State(shared): S,
    Path((e, t, key)): Path<(String, String, String)>,
) -> Response {
    if let Err(r) = table_ok(&shared, &e, &t) {
        return r;
    }
    let removed = {
        let mut state = shared.lock();
        state.stats.profile_deletes += 1;
        state.store.tables.get_mut(&t).and_then(|table| {
            let id = table.find(&key)?;
            table.remove_profile(id).map(|_| id)
        })
    };
    match removed {
        Some(id) => {
            shared.save_logged();
            Json(json!({"profileId": id})).into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("no profile {key}")),
    }
}

async fn subscribe(
    State(shared): S,
    Path((e, t, key, name)): Path<(String, String, String, String)>,
) -> Response {
    set_subscription(&shared, &e, &t, &key, &name, true)
}

async fn unsubscribe(
    State(shared): S,
    Path((e, t, key, name)): Path<(String, String, String, String)>,
) -> Response {
    set_subscription(&shared, &e, &t, &key, &name, false)
}

fn set_subscription(
    shared: &Shared,
    e: &str,
    t: &str,
    key: &str,
    name: &str,
    on: bool,
) -> Response {
    if let Err(r) = table_ok(shared, e, t) {
        return r;
    }
    let result = {
        let mut state = shared.lock();
        state.stats.subscription_changes += 1;
        match state.store.tables.get_mut(t) {
            None => Err(error(StatusCode::NOT_FOUND, "no table")),
            Some(table) => {
                if !table.def.subscriptions.iter().any(|s| s == name) {
                    Err(error(
                        StatusCode::NOT_FOUND,
                        format!("no subscription {name}"),
                    ))
                } else {
                    match table.find(key).and_then(|id| table.profiles.get_mut(&id)) {
                        None => Err(error(StatusCode::NOT_FOUND, format!("no profile {key}"))),
                        Some(p) => {
                            p.subscriptions.insert(name.to_string(), on);
                            p.updated = import::now();
                            Ok(p.id)
                        }
                    }
                }
            }
        }
    };
    match result {
        Ok(id) => {
            shared.save_logged();
            Json(json!({"profileId": id})).into_response()
        }
        Err(r) => r,
    }
}

async fn stats(State(shared): S) -> Json<super::Stats> {
    Json(shared.stats())
}
