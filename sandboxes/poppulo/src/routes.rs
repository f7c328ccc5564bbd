//! The HTTP face of the sandbox: the API v2 routes under `/v2/{account}/`, the checks
//! every request goes through (User-Agent, Basic auth, account), and the sandbox's own
//! `/_sandbox/…` admin routes (faults, counters, seeding), which need no auth.
//!
//! Every error is a `<status>` entity with its code and a `<warnings><warning>`
//! message, also on CSV calls. URLs in answers (`uri`, `href`, `next`) are absolute and
//! built from the request's `Host`, so they work whatever port the sandbox got.

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

use super::faults::{throttled, Stats};
use super::import::{self, resolve, CustomFields, JobError, Target};
use super::model::{
    now, valid_email, Import, ImportStatus, PlannedEnd, RemovedBy, Subscriber, SubscriberStatus,
};
use super::xml::{self, Element, XmlWriter};
use super::Shared;

const XML: &str = "application/xml; charset=UTF-8";
const REL_CREATED: &str = "http://api-info.newsweaver.com/v2/rels/status.created";
const REL_UPDATED: &str = "http://api-info.newsweaver.com/v2/rels/status.updated";
const REL_INVALID: &str =
    "http://api-info.newsweaver.com/v2/rels/subscriber_import.invalid_subscribers";

/// Top-level standard fields of a subscriber entity, in output order.
const TOP_FIELDS: &[&str] = &[
    "first_name",
    "surname",
    "company",
    "position_company",
    "phone_number",
    "external_id",
];

/// Grouped standard fields of a subscriber entity (`<address><city>`), in output order.
const GROUPS: &[(&str, &[&str])] = &[
    (
        "address",
        &[
            "address_line_1",
            "city",
            "state_region",
            "postal_code",
            "country",
        ],
    ),
    ("personal_details", &["employee_id", "preferred_name"]),
    (
        "work_details",
        &[
            "function",
            "team",
            "department",
            "division",
            "business_unit",
        ],
    ),
    (
        "work_location",
        &["office_building", "site_location", "region"],
    ),
];

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

fn whole_seconds(interval: Duration) -> bool {
    interval.subsec_nanos() == 0
}

/// The next welcome poll time, rounded up to what is printed, so that a client that
/// waits until the printed time is never early.
fn next_ping(now: DateTime<Utc>, interval: Duration) -> DateTime<Utc> {
    let due = now + chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::seconds(1));
    let rounded = if whole_seconds(interval) {
        due.trunc_subsecs(0)
    } else {
        due.trunc_subsecs(3)
    };
    if rounded < due {
        rounded
            + if whole_seconds(interval) {
                chrono::Duration::seconds(1)
            } else {
                chrono::Duration::milliseconds(1)
            }
    } else {
        rounded
    }
}

async fn post_import(State(shared): SharedState, headers: HeaderMap, body: Bytes) -> Response {
    let root = match xml_body(&headers, &body) {
        Ok(root) => root,
        Err(error) => return error.into_response(),
    };
    let checked = match import::check_job(&root, &shared.config.custom_fields) {
        Ok(checked) => checked,
        Err(JobError::Malformed(message)) => {
            return error_response(StatusCode::BAD_REQUEST, &message)
        }
        Err(JobError::Invalid(message)) => return error_response(StatusCode::CONFLICT, &message),
    };
    let id = {
        let mut state = shared.lock();
        let busy = state
            .busy_until
            .is_some_and(|until| std::time::Instant::now() < until)
            || state
                .store
                .imports
                .values()
                .any(|i| i.status == ImportStatus::InProgress);
        if busy {
            state.stats.imports_refused_busy += 1;
            drop(state);
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "an import is in progress in this account; concurrent imports in the same account are not supported",
            );
        }
        let planned_end = if state.faults.fail_next_import {
            state.faults.fail_next_import = false;
            Some(PlannedEnd::Error)
        } else {
            state
                .faults
                .cancel_next_import_after
                .take()
                .map(PlannedEnd::CancelledAfter)
        };
        let id = state.store.next_import_id();
        state
            .store
            .imports
            .insert(id, import::new_import(id, checked, planned_end));
        state.stats.imports_posted += 1;
        id
    };
    shared.save_logged();
    tokio::spawn(import::run(shared.clone(), id));
    let href = format!("{}/subscriber_import/{id}", account_url(&headers, &shared));
    xml_ok(
        StatusCode::ACCEPTED,
        status_entity(StatusCode::ACCEPTED, &[&href], &[], &[]),
    )
}

async fn get_import(
    State(shared): SharedState,
    headers: HeaderMap,
    Path((_, id)): Path<(String, String)>,
) -> Response {
    let millis = !whole_seconds(shared.config.ping_interval);
    let base = account_url(&headers, &shared);
    let mut state = shared.lock();
    let Some(import) = id
        .parse::<u64>()
        .ok()
        .and_then(|id| state.store.imports.get_mut(&id))
    else {
        return error_response(StatusCode::NOT_FOUND, "no such subscriber import");
    };
    let now = Utc::now();
    if let Some(ping_after) = import.ping_after.filter(|p| now < *p) {
        let wait = (ping_after - now).num_milliseconds().max(0) as u64;
        state.stats.early_polls += 1;
        state.stats.throttled += 1;
        drop(state);
        return throttled(
            wait.div_ceil(1000).max(1),
            &format!(
                "polled before ping_after ({})",
                format_date(ping_after, millis)
            ),
        );
    }
    import.ping_after = (import.status == ImportStatus::InProgress)
        .then(|| next_ping(now, shared.config.ping_interval));
    let body = import_xml(import, &base, millis);
    state.stats.import_polls += 1;
    xml_ok(StatusCode::OK, body)
}

fn import_xml(import: &Import, base: &str, millis: bool) -> String {
    let uri = format!("{base}/subscriber_import/{}", import.id);
    let created = format_date(import.created, false);
    let mut w = XmlWriter::new();
    w.open(
        "subscriber_import",
        &[
            ("created", &created),
            ("status", import.status.as_str()),
            ("uri", &uri),
        ],
    );
    let results = &import.results;
    if import.status == ImportStatus::InProgress {
        w.open("progress", &[])
            .text("total_records", &results.total_records.to_string())
            .text("records_processed", &import.processed.to_string());
        if let Some(ping_after) = import.ping_after {
            w.text("ping_after", &format_date(ping_after, millis));
        }
        w.close("progress");
    } else {
        let href = format!("{uri}/invalid_subscribers");
        w.open("results", &[])
            .text("total_records", &results.total_records.to_string())
            .text("new_subscribers", &results.new_subscribers.to_string())
            .text(
                "updated_subscribers",
                &results.updated_subscribers.to_string(),
            )
            .text(
                "invalid_subscribers",
                &results.invalid_subscribers.to_string(),
            )
            .text(
                "duplicate_subscribers",
                &results.duplicate_subscribers.to_string(),
            )
            .text(
                "previously_opted_out",
                &results.previously_opted_out.to_string(),
            )
            .empty("link", &[("rel", REL_INVALID), ("href", &href)])
            .close("results");
    }
    let job = &import.job;
    let flag = |b: bool| if b { "true" } else { "false" };
    w.open("specification", &[])
        .text("accept_terms", flag(job.accept_terms))
        .text("update_existing", flag(job.update_existing))
        .text("reactivate_api_removed", flag(job.reactivate_api_removed))
        .text(
            "reactivate_admin_removed",
            flag(job.reactivate_admin_removed),
        )
        .text(
            "reactivate_bounced_removed",
            flag(job.reactivate_bounced_removed),
        );
    if !job.set_fields.is_empty() {
        w.open("set_fields", &[]);
        for (name, value) in &job.set_fields {
            w.text_with("set_field", &[("name", name)], value);
        }
        w.close("set_fields");
    }
    for (list, item, names) in [
        ("add_permissions", "permission", &job.add_permissions),
        ("remove_permissions", "permission", &job.remove_permissions),
        ("tags", "tag", &job.tags),
    ] {
        if !names.is_empty() {
            w.open(list, &[]);
            for name in names {
                w.empty(item, &[("name", name)]);
            }
            w.close(list);
        }
    }
    w.open("subscriber_data", &[])
        .text("columns", &job.columns.join(","))
        .text("skip_first_line", flag(job.skip_first_line))
        .text("field_separator", job.field_separator.as_str())
        .close("subscriber_data")
        .close("specification")
        .close("subscriber_import");
    w.finish()
}

async fn get_rejected(
    State(shared): SharedState,
    Path((_, id)): Path<(String, String)>,
) -> Response {
    let csv = {
        let state = shared.lock();
        let Some(import) = id
            .parse::<u64>()
            .ok()
            .and_then(|id| state.store.imports.get(&id))
        else {
            return error_response(StatusCode::NOT_FOUND, "no such subscriber import");
        };
        import::rejected_csv(import)
    };
    match csv {
        Ok(csv) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/csv; charset=UTF-8")],
            csv,
        )
            .into_response(),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot write CSV: {e}"),
        ),
    }
}

fn subscriber_xml(w: &mut XmlWriter, subscriber: &Subscriber, base: &str) {
    let uri = format!("{base}/subscriber/{}", subscriber.id);
    let modified = format_date(subscriber.date_modified, false);
    w.open("subscriber", &[("uri", &uri), ("date_modified", &modified)])
        .text("email", &subscriber.email)
        .text("status", subscriber.status.as_str());
    for field in TOP_FIELDS {
        if let Some(value) = subscriber.field(field) {
            w.text(field, value);
        }
    }
    for (group, fields) in GROUPS {
        let present: Vec<(&str, &str)> = fields
            .iter()
            .filter_map(|f| subscriber.field(&format!("{group}/{f}")).map(|v| (*f, v)))
            .collect();
        if !present.is_empty() {
            w.open(group, &[]);
            for (field, value) in present {
                w.text(field, value);
            }
            w.close(group);
        }
    }
    w.open("custom_fields", &[]);
    for (name, value) in &subscriber.custom_fields {
        w.text_with("custom_field", &[("name", name)], value);
    }
    w.close("custom_fields").open("permissions", &[]);
    for permission in &subscriber.permissions {
        w.empty("permission", &[("name", permission)]);
    }
    w.close("permissions").open("tags", &[]);
    for tag in &subscriber.tags {
        w.empty("tag", &[("name", tag)]);
    }
    w.close("tags").close("subscriber");
}

async fn list_subscribers(
    State(shared): SharedState,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let status = query.get("status").map(String::as_str).unwrap_or("active");
    let wanted: Option<SubscriberStatus> = match status {
        "active" => Some(SubscriberStatus::Active),
        "inactive" => Some(SubscriberStatus::Inactive),
        "opt_out" => Some(SubscriberStatus::OptOut),
        "all" => None,
        other => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("status must be active, opt_out, inactive or all, not '{other}'"),
            )
        }
    };
    let number = |name: &str, default: usize| match query.get(name) {
        None => Ok(default),
        Some(v) => v.parse::<usize>().ok().filter(|n| *n >= 1).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{name} must be a whole number from 1"),
            )
        }),
    };
    let page_size = shared.config.page_size.max(1);
    let start = match number("startIndex", 1) {
        Ok(n) => n,
        Err(error) => return error.into_response(),
    };
    let per_page = match number("itemsPerPage", page_size) {
        Ok(n) => n.min(page_size),
        Err(error) => return error.into_response(),
    };
    let ext_id = query.get("ext_id");
    let base = account_url(&headers, &shared);
    let state = shared.lock();
    let matching: Vec<&Subscriber> = state
        .store
        .subscribers()
        .filter(|s| wanted.is_none_or(|w| s.status == w))
        .filter(|s| ext_id.is_none_or(|e| s.field("external_id") == Some(e.as_str())))
        .collect();
    let total = matching.len();
    let mut w = XmlWriter::new();
    w.open(
        "subscribers",
        &[
            ("itemsPerPage", &per_page.to_string()),
            ("startIndex", &start.to_string()),
            ("totalResults", &total.to_string()),
        ],
    );
    let next_start = start.saturating_add(per_page);
    if next_start <= total {
        let mut params = url::form_urlencoded::Serializer::new(String::new());
        params.append_pair("status", status);
        if let Some(ext_id) = ext_id {
            params.append_pair("ext_id", ext_id);
        }
        params.append_pair("startIndex", &next_start.to_string());
        params.append_pair("itemsPerPage", &per_page.to_string());
        let href = format!("{base}/subscribers?{}", params.finish());
        w.empty("link", &[("rel", "next"), ("href", &href)]);
    }
    for subscriber in matching.iter().skip(start - 1).take(per_page) {
        subscriber_xml(&mut w, subscriber, &base);
    }
    w.close("subscribers");
    xml_ok(StatusCode::OK, w.finish())
}

/// The subscriber addressed by `{email|id}`.
fn find_key(shared: &Shared, key: &str) -> Option<Subscriber> {
    let state = shared.lock();
    match key.parse::<u64>() {
        Ok(id) => state.store.get(id).cloned(),
        Err(_) => state.store.find(key).cloned(),
    }
}

fn with_etag(mut response: Response, subscriber: &Subscriber) -> Response {
    if let Ok(value) = HeaderValue::from_str(&subscriber.etag()) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

async fn get_subscriber(
    State(shared): SharedState,
    headers: HeaderMap,
    Path((_, key)): Path<(String, String)>,
) -> Response {
    let Some(subscriber) = find_key(&shared, &key) else {
        return error_response(StatusCode::NOT_FOUND, "no such subscriber");
    };
    let mut w = XmlWriter::new();
    subscriber_xml(&mut w, &subscriber, &account_url(&headers, &shared));
    with_etag(xml_ok(StatusCode::OK, w.finish()), &subscriber)
}

/// What a `<subscriber>` body asks to set.
#[derive(Debug, Default)]
struct SubscriberPatch {
    email: Option<String>,
    status: Option<SubscriberStatus>,
    fields: Vec<(String, String)>,
    custom_fields: Vec<(String, String)>,
    permissions: Option<BTreeSet<String>>,
    tags: Option<BTreeSet<String>>,
}

fn subscriber_patch(root: &Element, custom: &CustomFields) -> Result<SubscriberPatch, ApiError> {
    let invalid = |message: String| ApiError(StatusCode::CONFLICT, message);
    if root.name != "subscriber" {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("expected <subscriber>, got <{}>", root.name),
        ));
    }
    let mut patch = SubscriberPatch::default();
    for child in &root.children {
        let name = child.name.as_str();
        match name {
            "email" => patch.email = Some(child.text.trim().to_string()),
            "status" => match SubscriberStatus::parse(child.text.trim()) {
                Some(SubscriberStatus::Unconfirmed) => {
                    return Err(invalid("the API cannot set the status UNCONFIRMED".into()))
                }
                Some(status) => patch.status = Some(status),
                None => return Err(invalid(format!("unknown status '{}'", child.text.trim()))),
            },
            "custom_fields" => {
                for field in child.children_named("custom_field") {
                    let Some(field_name) = field.attribute("name") else {
                        return Err(invalid("a <custom_field> without a name".into()));
                    };
                    match resolve(field_name, custom) {
                        Ok(Target::Custom(_)) => {}
                        Ok(_) => {
                            return Err(invalid(format!("'{field_name}' is not a custom field")))
                        }
                        Err(message) => return Err(invalid(message)),
                    }
                    patch
                        .custom_fields
                        .push((field_name.to_string(), field.text.clone()));
                }
            }
            "permissions" | "tags" => {
                let item = if name == "tags" { "tag" } else { "permission" };
                let mut names = BTreeSet::new();
                for element in child.children_named(item) {
                    match element.attribute("name") {
                        Some(n) if !n.trim().is_empty() => names.insert(n.to_string()),
                        _ => return Err(invalid(format!("a <{item}> without a name"))),
                    };
                }
                if name == "tags" {
                    patch.tags = Some(names);
                } else {
                    patch.permissions = Some(names);
                }
            }
            _ if TOP_FIELDS.contains(&name) => {
                patch.fields.push((name.to_string(), child.text.clone()))
            }
            _ => match GROUPS.iter().find(|(group, _)| *group == name) {
                Some((group, fields)) => {
                    for field in &child.children {
                        if !fields.contains(&field.name.as_str()) {
                            return Err(invalid(format!(
                                "unknown field <{group}><{}>",
                                field.name
                            )));
                        }
                        patch
                            .fields
                            .push((format!("{group}/{}", field.name), field.text.clone()));
                    }
                }
                None => return Err(invalid(format!("unknown subscriber field <{name}>"))),
            },
        }
    }
    Ok(patch)
}

fn apply_patch(subscriber: &mut Subscriber, patch: SubscriberPatch) {
    for (path, value) in patch.fields {
        if value.is_empty() {
            subscriber.fields.remove(&path);
        } else {
            subscriber.fields.insert(path, value);
        }
    }
    for (name, value) in patch.custom_fields {
        if value.is_empty() {
            subscriber.custom_fields.remove(&name);
        } else {
            subscriber.custom_fields.insert(name, value);
        }
    }
    if let Some(permissions) = patch.permissions {
        subscriber.permissions = permissions;
    }
    if let Some(tags) = patch.tags {
        subscriber.tags = tags;
    }
    if let Some(status) = patch.status {
        if status != subscriber.status {
            subscriber.removed_by = match status {
                SubscriberStatus::Inactive | SubscriberStatus::OptOut => Some(RemovedBy::Api),
                _ => None,
            };
        }
        subscriber.status = status;
    }
    if subscriber.status == SubscriberStatus::OptOut {
        subscriber.permissions.clear();
    }
}

async fn create_subscriber(
    State(shared): SharedState,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let patch = match xml_body(&headers, &body)
        .and_then(|root| subscriber_patch(&root, &shared.config.custom_fields))
    {
        Ok(patch) => patch,
        Err(error) => return error.into_response(),
    };
    let Some(email) = patch.email.clone().filter(|e| valid_email(e)) else {
        return error_response(StatusCode::CONFLICT, "a valid <email> is required");
    };
    let created = {
        let mut state = shared.lock();
        if state.store.find(&email).is_some() {
            return error_response(
                StatusCode::CONFLICT,
                "a subscriber with this email already exists",
            );
        }
        let mut subscriber = Subscriber::new(email);
        apply_patch(&mut subscriber, patch);
        state.store.insert(subscriber).clone()
    };
    shared.save_logged();
    let href = format!(
        "{}/subscriber/{}",
        account_url(&headers, &shared),
        created.id
    );
    let mut response = xml_ok(
        StatusCode::CREATED,
        status_entity(StatusCode::CREATED, &[&href], &[], &[]),
    );
    if let Ok(value) = HeaderValue::from_str(&href) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    with_etag(response, &created)
}

async fn update_subscriber(
    State(shared): SharedState,
    headers: HeaderMap,
    Path((_, key)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let patch = match xml_body(&headers, &body)
        .and_then(|root| subscriber_patch(&root, &shared.config.custom_fields))
    {
        Ok(patch) => patch,
        Err(error) => return error.into_response(),
    };
    let Some(current) = find_key(&shared, &key) else {
        return error_response(StatusCode::NOT_FOUND, "no such subscriber");
    };
    if let Some(expected) = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) {
        let matches =
            expected.trim() == "*" || expected.split(',').any(|tag| tag.trim() == current.etag());
        if !matches {
            return error_response(
                StatusCode::PRECONDITION_FAILED,
                "If-Match does not match the subscriber's current ETag",
            );
        }
    }
    if current.opted_out_by_subscriber()
        && patch.status.is_some_and(|s| s != SubscriberStatus::OptOut)
    {
        return error_response(
            StatusCode::CONFLICT,
            "the subscriber opted out themselves; the API cannot reverse it",
        );
    }
    let updated = {
        let mut state = shared.lock();
        if let Some(email) = patch.email.as_deref() {
            if !valid_email(email) {
                return error_response(StatusCode::CONFLICT, "not a valid email address");
            }
            if state
                .store
                .find(email)
                .is_some_and(|other| other.id != current.id)
            {
                return error_response(StatusCode::CONFLICT, "another subscriber has this email");
            }
        }
        let Some(subscriber) = state.store.get_mut(current.id) else {
            return error_response(StatusCode::NOT_FOUND, "no such subscriber");
        };
        let email_change = patch.email.clone().filter(|e| *e != subscriber.email);
        let before = subscriber.clone();
        apply_patch(subscriber, patch);
        if subscriber != &before {
            subscriber.version += 1;
            subscriber.date_modified = now();
        }
        let updated = subscriber.clone();
        if let Some(email) = email_change {
            state.store.change_email(current.id, &email);
        }
        state.store.get(current.id).cloned().unwrap_or(updated)
    };
    shared.save_logged();
    let href = format!(
        "{}/subscriber/{}",
        account_url(&headers, &shared),
        updated.id
    );
    let response = xml_ok(
        StatusCode::OK,
        status_entity(StatusCode::OK, &[], &[&href], &[]),
    );
    with_etag(response, &updated)
}

async fn get_stats(State(shared): SharedState) -> Json<Stats> {
    Json(shared.stats())
}

async fn admin_subscribers(State(shared): SharedState) -> Json<Vec<Subscriber>> {
    Json(shared.lock().store.subscribers().cloned().collect())
}

async fn admin_imports(State(shared): SharedState) -> Json<Vec<Import>> {
    Json(shared.lock().store.imports.values().cloned().collect())
}

/// A subscriber to seed through `POST /_sandbox/subscribers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedRequest {
    email: String,
    #[serde(default)]
    status: Option<SubscriberStatus>,
    #[serde(default)]
    removed_by: Option<RemovedBy>,
    #[serde(default)]
    fields: BTreeMap<String, String>,
    #[serde(default)]
    custom_fields: BTreeMap<String, String>,
    #[serde(default)]
    permissions: BTreeSet<String>,
    #[serde(default)]
    tags: BTreeSet<String>,
}

async fn admin_seed(State(shared): SharedState, Json(seed): Json<SeedRequest>) -> Response {
    let subscriber = Subscriber {
        fields: seed.fields,
        custom_fields: seed.custom_fields,
        permissions: seed.permissions,
        tags: seed.tags,
        ..Subscriber::new(seed.email)
    }
    .with_status(
        seed.status.unwrap_or(SubscriberStatus::Active),
        seed.removed_by,
    );
    match super::seed(&shared, subscriber) {
        Ok(seeded) => {
            shared.save_logged();
            (StatusCode::CREATED, Json(seeded)).into_response()
        }
        Err(e) => (StatusCode::CONFLICT, e.to_string()).into_response(),
    }
}
