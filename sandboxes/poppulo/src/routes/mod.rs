//! The HTTP face of the sandbox: the API v2 routes under `/v2/{account}/`, the checks
//! every request goes through (User-Agent, Basic auth, account), and the sandbox's own
//! `/_sandbox/…` admin routes (faults, counters, seeding), which need no auth.
//!
//! Every error is a `<status>` entity with its code and a `<warnings><warning>`
//! message, also on CSV calls. URLs in answers (`uri`, `href`, `next`) are absolute and
//! built from the request's `Host`, so they work whatever port the sandbox got.

mod admin;
mod imports;
mod subscribers;

use admin::*;
use imports::*;
use subscribers::*;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use chrono::{DateTime, SubsecRound, Utc};
use serde::Deserialize;

use contactsync_sandbox_kit::{inject_faults, log_calls};

use crate::faults::Stats;
use crate::import::{self, resolve, CustomFields, JobError, Target};
use crate::model::{
    now, valid_email, Import, ImportStatus, PlannedEnd, RemovedBy, Subscriber, SubscriberStatus,
};
use crate::xml::{self, Element, XmlWriter};
use crate::Shared;

const XML: &str = "application/xml; charset=UTF-8";
const REL_CREATED: &str = "http://api-info.newsweaver.com/v2/rels/status.created";
const REL_UPDATED: &str = "http://api-info.newsweaver.com/v2/rels/status.updated";
const REL_INVALID: &str =
    "http://api-info.newsweaver.com/v2/rels/subscriber_import.invalid_subscribers";

type SharedState = State<Arc<Shared>>;

/// The largest request body the sandbox reads (inferred: the documents give none).
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// The sandbox's routes.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route(
            "/v2/{account}/subscriber_imports",
            axum::routing::post(post_import),
        )
        .route("/v2/{account}/subscriber_import/{id}", get(get_import))
        .route(
            "/v2/{account}/subscriber_import/{id}/invalid_subscribers",
            get(get_rejected),
        )
        .route(
            "/v2/{account}/subscribers",
            get(list_subscribers).post(create_subscriber),
        )
        .route(
            "/v2/{account}/subscriber/{key}",
            get(get_subscriber).put(update_subscriber),
        )
        .route_layer(from_fn_with_state(shared.clone(), guard))
        // Faults before auth, as a front proxy would; the log sees every answer.
        .layer(from_fn_with_state(shared.wire.clone(), inject_faults))
        .layer(from_fn_with_state(shared.wire.clone(), log_calls))
        // The documents set no size limit on an import job; a 50,000-row job (the
        // connector's default) is about 5 MB. Inferred: 64 MB.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES));
    let admin = Router::new()
        .route("/_sandbox/stats", get(get_stats))
        .route(
            "/_sandbox/subscribers",
            get(admin_subscribers).post(admin_seed),
        )
        .route("/_sandbox/imports", get(admin_imports));
    api.merge(admin)
        .merge(contactsync_sandbox_kit::admin_routes(shared.clone()))
        .fallback(|| async { error_response(StatusCode::NOT_FOUND, "no such resource") })
        .with_state(shared)
}

/// An error answer, small enough to pass around in `Result`s.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl ApiError {
    fn new(code: StatusCode, message: impl Into<String>) -> Self {
        ApiError(code, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.0, &self.1)
    }
}

/// An error as the API's `<status>` entity.
pub(crate) fn error_response(code: StatusCode, message: &str) -> Response {
    let body = status_entity(code, &[], &[], &[message]);
    (code, [(header::CONTENT_TYPE, XML)], body).into_response()
}

fn status_entity(
    code: StatusCode,
    created: &[&str],
    updated: &[&str],
    warnings: &[&str],
) -> String {
    let mut w = XmlWriter::new();
    w.open("status", &[]).text("status_code", code.as_str());
    w.open("resources_created", &[]);
    for href in created {
        w.empty("link", &[("rel", REL_CREATED), ("href", href)]);
    }
    w.close("resources_created").open("resources_updated", &[]);
    for href in updated {
        w.empty("link", &[("rel", REL_UPDATED), ("href", href)]);
    }
    w.close("resources_updated").empty("resources_deleted", &[]);
    w.open("warnings", &[]);
    for warning in warnings {
        w.text("warning", warning);
    }
    w.close("warnings").close("status");
    w.finish()
}

fn unauthorized(shared: &Shared, message: &str) -> Response {
    shared.lock().stats.unauthorized += 1;
    let mut response = error_response(StatusCode::UNAUTHORIZED, message);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"Newsweaver API\""),
    );
    response
}

/// User-Agent, Basic auth and account checks, in that order, for every API route.
async fn guard(State(shared): SharedState, request: Request, next: Next) -> Response {
    let agent = request
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or_default();
    if agent.is_empty() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "a non-empty User-Agent header is required",
        );
    }
    let credentials = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.trim())
                .ok()
        })
        .and_then(|v| String::from_utf8(v).ok());
    let Some(credentials) = credentials else {
        return unauthorized(&shared, "HTTP Basic authentication is required");
    };
    let accepted = match credentials.split_once(':') {
        Some((user, password)) => {
            user == shared.config.username && password == shared.config.password
        }
        None => false,
    };
    if !accepted {
        return unauthorized(&shared, "the user name or password is wrong");
    }
    let account = request.uri().path().split('/').nth(2).unwrap_or_default();
    if account != shared.config.account {
        let message = format!("the API user is not authorised for account '{account}'");
        return unauthorized(&shared, &message);
    }
    next.run(request).await
}

/// `http://host` of the request, for absolute URLs.
fn origin(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

fn account_url(headers: &HeaderMap, shared: &Shared) -> String {
    format!("{}/v2/{}", origin(headers), shared.config.account)
}

fn xml_body(headers: &HeaderMap, body: &Bytes) -> Result<Element, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mime = content_type.split(';').next().unwrap_or_default().trim();
    if mime != "application/xml" && mime != "text/xml" {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be XML (Content-Type: application/xml; charset=UTF-8)",
        ));
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "the body is not UTF-8"))?;
    xml::parse(text).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

fn xml_ok(code: StatusCode, body: String) -> Response {
    (code, [(header::CONTENT_TYPE, XML)], body).into_response()
}

fn format_date(date: DateTime<Utc>, millis: bool) -> String {
    if millis {
        date.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
    } else {
        date.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    }
}

/// A 503 with `Retry-After`.
pub(crate) fn throttled(seconds: u64, message: &str) -> Response {
    let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, message);
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert("retry-after", value);
    }
    response
}
