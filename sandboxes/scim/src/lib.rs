//! A SCIM 2.0 sandbox: a small HTTP server on loopback that behaves like an application
//! provisioned over SCIM (RFC 7643 resources, RFC 7644 protocol), so that the connector
//! and end-to-end tests run with no network and no account.
//!
//! It is written from the RFCs, never from the connector's code: this crate does not
//! depend on the connector (the tidy test checks it). What it serves:
//! - `GET /ServiceProviderConfig`, `/Schemas`, `/ResourceTypes` (without a token, as
//!   RFC 7644 §4 allows);
//! - `/Users` and `/Groups`: `GET` (a ListResponse: `filter` with `eq ne co sw ew gt ge
//!   lt le pr`, `and`/`or`; `startIndex` 1-based; `count` at most `max_results`),
//!   `POST` (409 `uniqueness` on a taken `userName`, compared case-insensitively, or
//!   group `displayName`), and per resource `GET`, `PUT`, `PATCH`, `DELETE`, each write
//!   checked against `If-Match` (412 when the version moved on) and answered with an
//!   `ETag`;
//! - `POST /Bulk` within `maxOperations` and `maxPayloadSize` (413 beyond), `bulkId`
//!   references resolved, `failOnErrors` honoured.
//!
//! What people do in the app, beside the client: an admin deactivates a user or renames
//! them ([`RunningScim::deactivate`], [`RunningScim::rename`], or `POST
//! /_sandbox/users/deactivate` / `rename` with `{"userName": …, "to": …}`); `GET
//! /_sandbox/stats` counts the API calls, all and by route. Faults
//! ([`Faults`], `POST /_sandbox/faults`): PATCH not supported (as in servers behind
//! wizard-built Okta apps), Bulk not supported, writes that find the version moved on
//! (someone edited the user in between); with the kit's wire faults (throttling, 5xx,
//! lost answers).

mod bulk;
pub mod filter;
pub mod model;
pub mod patch;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use contactsync_core::registry::{SandboxFactory, SandboxOptions, SandboxStart};
use contactsync_core::{CancellationToken, ExposeSecret, SecretString};
use contactsync_sandbox_kit::data::DataFile;
use contactsync_sandbox_kit::{
    admin_routes, inject_faults, log_calls, Answers, Guarded, Platform, Running, Wire,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

pub use contactsync_sandbox_kit::{LoggedRequest, SandboxError, WireFaults};
pub use model::{Directory, Kind, ScimError, ENTERPRISE_SCHEMA, GROUP_SCHEMA, USER_SCHEMA};

use filter::Filter;

/// The bearer token the sandbox accepts when started without connector settings.
pub const DEFAULT_TOKEN: &str = "sandbox";

/// The media type of SCIM bodies.
pub const SCIM_JSON: &str = "application/scim+json";

/// How to run the sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The bearer token it accepts.
    pub token: String,
    /// The loopback port; 0 picks a free one.
    pub port: u16,
    /// Where to keep the data between runs; `None`: in memory only.
    pub data_file: Option<PathBuf>,
    /// `filter.maxResults`: the most resources in one page.
    pub max_results: usize,
    /// `bulk.maxOperations`.
    pub bulk_max_operations: usize,
    /// `bulk.maxPayloadSize`, in bytes.
    pub bulk_max_payload: usize,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            token: DEFAULT_TOKEN.to_string(),
            port: 0,
            data_file: None,
            max_results: 200,
            bulk_max_operations: 100,
            bulk_max_payload: 1_048_576,
        }
    }
}

/// The sandbox's own faults, beside the kit's wire faults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// The server says `patch.supported = false` and answers a PATCH 501.
    pub patch_unsupported: bool,
    /// The server says `bulk.supported = false` and answers `/Bulk` 501.
    pub bulk_unsupported: bool,
    /// The next this many writes that name a version (`If-Match`) find it moved on
    /// (412): someone edited the user between the client's read and its write.
    pub stale_writes: u64,
}

/// What the handlers share.
struct Shared {
    config: SandboxConfig,
    directory: Guarded<Directory>,
    faults: std::sync::Mutex<Faults>,
    wire: Arc<Wire>,
}

impl Platform for Shared {
    const NAME: &'static str = "SCIM";
    type Faults = Faults;

    fn wire(&self) -> &Wire {
        &self.wire
    }
    fn faults(&self) -> Faults {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
    }
    fn reset(&self) {
        *self.directory.lock() = Directory::default();
        self.set_faults(Faults::default());
    }
    fn save(&self) -> Result<(), SandboxError> {
        self.directory.save(|d| d)
    }
}

impl Shared {
    /// Whether this write meets one of the [`Faults::stale_writes`] (and uses it up).
    fn take_stale_write(&self) -> bool {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let stale = faults.stale_writes > 0;
        faults.stale_writes = faults.stale_writes.saturating_sub(1);
        stale
    }
}

/// A SCIM answer: a status, a body, and the resource's version as its ETag.
pub(crate) fn scim(status: StatusCode, body: Value) -> Response {
    let version = body
        .get("meta")
        .and_then(|m| m.get("version"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut response = (
        status,
        [(header::CONTENT_TYPE, SCIM_JSON)],
        body.to_string(),
    )
        .into_response();
    if let Some(v) = version.and_then(|v| header::HeaderValue::from_str(&v).ok()) {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

fn error(e: &ScimError) -> Response {
    scim(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
        e.body(),
    )
}

/// How SCIM words a throttled answer and a server error.
const ANSWERS: Answers = Answers {
    throttled: || error(&ScimError::plain(429, "too many requests")),
    failed: || error(&ScimError::plain(500, "internal error")),
};

/// Starts SCIM sandboxes.
#[derive(Debug)]
pub struct ScimSandbox;

impl ScimSandbox {
    /// Loads the data file (if any), binds `127.0.0.1:port` and serves until
    /// [`RunningScim::shutdown`] (or drop).
    pub async fn start(config: SandboxConfig) -> Result<RunningScim, SandboxError> {
        let data = DataFile::new(Shared::NAME, config.data_file.clone());
        let mut directory: Directory = data.load()?.unwrap_or_default();
        directory.reindex();
        let port = config.port;
        let shared = Arc::new(Shared {
            config,
            directory: Guarded::new(directory, data),
            faults: std::sync::Mutex::new(Faults::default()),
            wire: Arc::new(Wire::new(ANSWERS, WireFaults::default())),
        });
        let api = Router::new()
            .route("/Users", any(resources))
            .route("/Users/{id}", any(resources))
            .route("/Groups", any(resources))
            .route("/Groups/{id}", any(resources))
            .route("/Bulk", post(bulk::handle))
            .route_layer(from_fn_with_state(shared.clone(), authenticate));
        let router = Router::new()
            .route("/ServiceProviderConfig", get(service_provider_config))
            .route("/Schemas", get(schemas))
            .route("/ResourceTypes", get(resource_types))
            .merge(api)
            .layer(from_fn_with_state(shared.wire.clone(), inject_faults))
            .layer(from_fn_with_state(shared.wire.clone(), log_calls))
            .route("/_sandbox/stats", get(stats))
            .route("/_sandbox/users/deactivate", post(admin_deactivate))
            .route("/_sandbox/users/rename", post(admin_rename))
            .merge(admin_routes(shared.clone()))
            .fallback(|| async { error(&ScimError::plain(404, "no such endpoint")) })
            .with_state(shared.clone());
        let running =
            contactsync_sandbox_kit::start(shared, CancellationToken::new(), port, "", router)
                .await?;
        Ok(RunningScim { running })
    }
}

/// A running sandbox. Dropping it stops the server.
#[derive(Debug)]
pub struct RunningScim {
    running: Running<Shared>,
}

impl RunningScim {
    /// The SCIM base, `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        self.running.base_url()
    }

    /// The bearer token it accepts.
    pub fn token(&self) -> &str {
        &self.running.platform().config.token
    }

    /// Every user, in creation order.
    pub fn users(&self) -> Vec<Map<String, Value>> {
        self.running
            .platform()
            .directory
            .lock()
            .users()
            .cloned()
            .collect()
    }

    /// Every group, in creation order.
    pub fn groups(&self) -> Vec<Map<String, Value>> {
        self.running
            .platform()
            .directory
            .lock()
            .groups()
            .cloned()
            .collect()
    }

    /// The user whose `userName` is `user_name` (case-insensitively).
    pub fn user(&self, user_name: &str) -> Option<Map<String, Value>> {
        let directory = self.running.platform().directory.lock();
        let id = directory.user_id(user_name)?;
        let user = directory.get(Kind::User, &id).ok()?.clone();
        Some(directory.shown(Kind::User, user))
    }

    /// Creates a user or group as an admin would in the app (or another provisioning
    /// client): `body` is the resource as POSTed.
    pub fn seed(&self, kind: Kind, body: Value) -> Result<Map<String, Value>, ScimError> {
        self.running.platform().directory.lock().create(kind, &body)
    }

    /// An admin deactivates the user named `user_name` in the app.
    pub fn deactivate(&self, user_name: &str) -> Result<(), ScimError> {
        let shared = self.running.platform();
        shared
            .directory
            .lock()
            .admin_edit(user_name, "active", Value::Bool(false))
    }

    /// An admin renames the user named `user_name` to `to` in the app.
    pub fn rename(&self, user_name: &str, to: &str) -> Result<(), ScimError> {
        let shared = self.running.platform();
        shared
            .directory
            .lock()
            .admin_edit(user_name, "userName", Value::String(to.into()))
    }

    /// Replaces the sandbox's own faults.
    pub fn set_faults(&self, faults: Faults) {
        self.running.platform().set_faults(faults);
    }

    /// Replaces the wire faults (throttling, errors, delays, lost answers).
    pub fn set_wire_faults(&self, faults: WireFaults) {
        self.running.wire().set_faults(faults);
    }

    /// Every API call logged, oldest first.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.running.wire().requests()
    }

    /// Forgets the logged calls.
    pub fn clear_requests(&self) {
        self.running.wire().clear_requests();
    }

    /// Stops serving, waits for the server to end and saves the data file.
    pub async fn shutdown(self) -> Result<(), SandboxError> {
        self.running.shutdown().await
    }
}

type S = State<Arc<Shared>>;

async fn authenticate(State(shared): S, request: Request, next: Next) -> Response {
    let expected = format!("Bearer {}", shared.config.token);
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if given != Some(expected.as_str()) {
        return error(&ScimError::plain(401, "missing or wrong bearer token"));
    }
    next.run(request).await
}

async fn service_provider_config(State(shared): S) -> Response {
    let faults = shared.faults();
    let c = &shared.config;
    scim(
        StatusCode::OK,
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
            "patch": { "supported": !faults.patch_unsupported },
            "bulk": {
                "supported": !faults.bulk_unsupported,
                "maxOperations": c.bulk_max_operations,
                "maxPayloadSize": c.bulk_max_payload
            },
            "filter": { "supported": true, "maxResults": c.max_results },
            "changePassword": { "supported": false },
            "sort": { "supported": false },
            "etag": { "supported": true },
            "authenticationSchemes": [{
                "type": "oauthbearertoken",
                "name": "OAuth Bearer Token",
                "description": "A static bearer token",
                "primary": true
            }]
        }),
    )
}

fn list_response(total: usize, start: usize, resources: Vec<Value>) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
        "totalResults": total,
        "startIndex": start,
        "itemsPerPage": resources.len(),
        "Resources": resources
    })
}

fn attribute(name: &str, kind: &str) -> Value {
    json!({ "name": name, "type": kind, "multiValued": false, "required": false,
            "caseExact": false, "mutability": "readWrite", "returned": "default", "uniqueness": "none" })
}

async fn schemas() -> Response {
    let strings = |names: &[&str]| {
        names
            .iter()
            .map(|a| attribute(a, "string"))
            .collect::<Vec<_>>()
    };
    let user = strings(&[
        "userName",
        "externalId",
        "displayName",
        "title",
        "preferredLanguage",
        "active",
    ]);
    let enterprise = strings(&["employeeNumber", "organization", "department"]);
    let schemas = vec![
        json!({ "id": model::USER_SCHEMA, "name": "User",
                "attributes": user }),
        json!({ "id": model::GROUP_SCHEMA, "name": "Group",
                "attributes": [attribute("displayName", "string"), attribute("members", "complex")] }),
        json!({ "id": model::ENTERPRISE_SCHEMA, "name": "EnterpriseUser",
                "attributes": enterprise }),
    ];
    scim(StatusCode::OK, list_response(schemas.len(), 1, schemas))
}

async fn resource_types() -> Response {
    let types = vec![
        json!({ "id": "User", "name": "User", "endpoint": "/Users", "schema": model::USER_SCHEMA,
                "schemaExtensions": [{ "schema": model::ENTERPRISE_SCHEMA, "required": false }] }),
        json!({ "id": "Group", "name": "Group", "endpoint": "/Groups", "schema": model::GROUP_SCHEMA }),
    ];
    scim(StatusCode::OK, list_response(types.len(), 1, types))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Listing {
    filter: Option<String>,
    start_index: Option<String>,
    count: Option<String>,
}

/// Every call on `/Users`, `/Groups` and a resource under them.
async fn resources(
    State(shared): S,
    method: Method,
    Query(listing): Query<Listing>,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let path = request.uri().path().to_string();
    let body = match axum::body::to_bytes(request.into_body(), 16 * 1024 * 1024).await {
        Ok(b) => b,
        Err(_) => return error(&ScimError::plain(413, "the body is too large")),
    };
    let if_match = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok());
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let is_listing = segments.len() == 1 && method == Method::GET;
    if is_listing {
        return list(&shared, segments[0], &listing);
    }
    let body = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v) => Some(v),
            Err(e) => {
                return error(&ScimError::typed(
                    400,
                    "invalidSyntax",
                    format!("not JSON: {e}"),
                ))
            }
        }
    };
    let (status, answer) = dispatch(&shared, &method, &path, body.as_ref(), if_match);
    scim(status, answer)
}

fn list(shared: &Shared, endpoint: &str, listing: &Listing) -> Response {
    let kind = if endpoint == "Groups" {
        Kind::Group
    } else {
        Kind::User
    };
    // Okta sends numbers as strings in some places; a missing or bad one is the default.
    let start = listing
        .start_index
        .as_deref()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let count = listing
        .count
        .as_deref()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(shared.config.max_results)
        .min(shared.config.max_results);
    let filter = match listing.filter.as_deref().map(Filter::parse).transpose() {
        Ok(f) => f,
        Err(e) => return error(&ScimError::typed(400, "invalidFilter", e)),
    };
    let (total, page) = shared
        .directory
        .lock()
        .list(kind, filter.as_ref(), start, count);
    let page = page.into_iter().map(Value::Object).collect();
    scim(StatusCode::OK, list_response(total, start, page))
}

/// One write or read of a resource, as a route or a bulk operation makes it: the
/// status and the body to answer.
pub(crate) fn dispatch(
    shared: &Shared,
    method: &Method,
    path: &str,
    body: Option<&Value>,
    if_match: Option<&str>,
) -> (StatusCode, Value) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let kind = match segments.first().copied() {
        Some("Users") => Kind::User,
        Some("Groups") => Kind::Group,
        _ => return failed(&ScimError::plain(404, format!("no endpoint {path}"))),
    };
    let id = segments.get(1).copied();
    if *method == Method::PATCH && shared.faults().patch_unsupported {
        return failed(&ScimError::plain(
            501,
            "PATCH is not supported by this server",
        ));
    }
    if if_match.is_some() && *method != Method::GET && shared.take_stale_write() {
        return failed(&ScimError::plain(
            412,
            format!("{path} was changed by someone else"),
        ));
    }
    let empty = Value::Null;
    let body = body.unwrap_or(&empty);
    let mut directory = shared.directory.lock();
    let result = match (method.as_str(), id) {
        ("POST", None) => directory
            .create(kind, body)
            .map(|r| (StatusCode::CREATED, r)),
        ("GET", Some(id)) => directory.get(kind, id).map(|r| (StatusCode::OK, r.clone())),
        ("PUT", Some(id)) => directory
            .replace(kind, id, body, if_match)
            .map(|r| (StatusCode::OK, r)),
        ("PATCH", Some(id)) => directory
            .patch(kind, id, body, if_match)
            .map(|r| (StatusCode::OK, r)),
        ("DELETE", Some(id)) => directory
            .delete(kind, id, if_match)
            .map(|()| (StatusCode::NO_CONTENT, Map::new())),
        _ => Err(ScimError::plain(
            405,
            format!("{method} {path} is not allowed"),
        )),
    };
    let result = result.map(|(status, r)| (status, directory.shown(kind, r)));
    drop(directory);
    match result {
        Ok((status, resource)) => {
            if *method != Method::GET {
                shared.save_logged();
            }
            if status == StatusCode::NO_CONTENT {
                (status, Value::Null)
            } else {
                (status, with_location(kind, Value::Object(resource)))
            }
        }
        Err(e) => failed(&e),
    }
}

pub(crate) fn failed(e: &ScimError) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
        e.body(),
    )
}

fn with_location(kind: Kind, mut resource: Value) -> Value {
    let id = resource
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string);
    if let (Some(id), Some(meta)) = (id, resource.get_mut("meta").and_then(Value::as_object_mut)) {
        meta.insert(
            "location".into(),
            Value::String(format!("/{}/{id}", kind.endpoint())),
        );
    }
    resource
}

/// `GET /_sandbox/stats`: the wire's counts of API calls, all and by route.
async fn stats(State(shared): S) -> Json<contactsync_sandbox_kit::WireCounts> {
    Json(shared.wire.counts())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdminEdit {
    user_name: String,
    to: Option<String>,
}

async fn admin_deactivate(State(shared): S, Json(edit): Json<AdminEdit>) -> Response {
    let done = shared
        .directory
        .lock()
        .admin_edit(&edit.user_name, "active", Value::Bool(false));
    admin_answer(&shared, done)
}

async fn admin_rename(State(shared): S, Json(edit): Json<AdminEdit>) -> Response {
    let Some(to) = edit.to else {
        return error(&ScimError::plain(400, "`to` is required"));
    };
    let done = shared
        .directory
        .lock()
        .admin_edit(&edit.user_name, "userName", Value::String(to));
    admin_answer(&shared, done)
}

fn admin_answer(shared: &Shared, done: Result<(), ScimError>) -> Response {
    match done {
        Ok(()) => {
            shared.save_logged();
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => error(&e),
    }
}

/// The part of the connector's settings the sandbox reads (other keys are the
/// client's, and allowed).
#[derive(Debug, Deserialize)]
struct ConnectorSection {
    token: Option<SecretString>,
    token_file: Option<PathBuf>,
    token_env: Option<String>,
}

fn config_from(options: &SandboxOptions) -> Result<SandboxConfig, SandboxError> {
    let mut config = SandboxConfig {
        port: options.port,
        data_file: options.data_file.clone(),
        ..SandboxConfig::default()
    };
    if let Some(settings) = &options.settings {
        let section: ConnectorSection = settings.parse()?;
        let inline = match (&section.token_env, section.token) {
            (Some(var), None) => std::env::var(var).ok().map(SecretString::from),
            (_, inline) => inline,
        };
        if inline.is_some() || section.token_file.is_some() {
            let token = settings.secret("token", inline, section.token_file.as_deref())?;
            config.token = token.expose_secret().to_string();
        }
    }
    Ok(config)
}

/// Starts the sandbox for the registry (`base_url = "sandbox"`, `contactsync sandbox
/// scim`): the token of the connector settings when given, otherwise `sandbox`.
pub fn start(options: SandboxOptions) -> SandboxStart {
    Box::pin(async move {
        let config = config_from(&options)?;
        Ok(ScimSandbox::start(config).await?.running.detach())
    })
}

contactsync_core::inventory::submit! {
    SandboxFactory { name: "scim", start }
}
