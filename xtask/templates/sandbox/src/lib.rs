//! A __Name__ sandbox: a small HTTP server on loopback that behaves like the platform,
//! so that the connector and end-to-end tests run with no network and no account.
//!
//! It is written from the platform's documents, never from the connector's code: this
//! crate does not depend on the connector (the tidy test checks it), so one
//! misunderstanding cannot hide on both sides. It enforces what the platform enforces
//! (here: a bearer API key on every call, 401 otherwise; a person needs a valid
//! `email`, 400 otherwise), since a sandbox that accepts anything proves nothing.
//!
//! Written by `cargo xtask new-connector` for the placeholder protocol of the
//! connector it came with: `GET /people?page=P&per_page=N`, `PUT /people/{key}`,
//! `DELETE /people/{key}`, people as JSON objects. The kit
//! (`contactsync-sandbox-kit`) gives it the fault layer, the request log, the admin
//! endpoints and the data file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use contactsync_core::registry::{SandboxFactory, SandboxOptions, SandboxStart};
use contactsync_core::{CancellationToken, ExposeSecret, SecretString};
use contactsync_sandbox_kit::data::DataFile;
use contactsync_sandbox_kit::{
    admin_routes, inject_faults, log_calls, Answers, Platform, Running, Wire,
};
use serde::Deserialize;
use serde_json::{Map, Value};

pub use contactsync_sandbox_kit::{LoggedRequest, SandboxError, WireFaults};

/// The API key the sandbox accepts when started without connector settings.
pub const DEFAULT_API_KEY: &str = "sandbox";

/// How to run the sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The API key it accepts.
    pub api_key: String,
    /// The loopback port; 0 picks a free one.
    pub port: u16,
    /// Where to keep the data between runs; `None`: in memory only.
    pub data_file: Option<PathBuf>,
    /// The most people in one page.
    pub max_page_size: usize,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            api_key: DEFAULT_API_KEY.to_string(),
            port: 0,
            data_file: None,
            max_page_size: 1000,
        }
    }
}

/// The sandbox's own faults, beside the kit's wire faults: none yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {}

/// People by key, in key order.
type People = BTreeMap<String, Map<String, Value>>;

/// What the handlers share.
struct Shared {
    config: SandboxConfig,
    people: Mutex<People>,
    wire: Arc<Wire>,
    data: DataFile,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, People> {
        // A poisoned lock (a panic elsewhere) still holds usable data.
        self.people.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Platform for Shared {
    const NAME: &'static str = "__Name__";
    type Faults = Faults;

    fn wire(&self) -> &Wire {
        &self.wire
    }
    fn faults(&self) -> Faults {
        Faults::default()
    }
    fn set_faults(&self, _faults: Faults) {}
    fn reset(&self) {
        self.lock().clear();
    }
    fn save(&self) -> Result<(), SandboxError> {
        self.data.save::<People>(|encode| encode(&self.lock()))
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// How the platform words a throttled answer and a server error.
const ANSWERS: Answers = Answers {
    throttled: || error(StatusCode::TOO_MANY_REQUESTS, "slow down"),
    failed: || error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
};

/// Starts __Name__ sandboxes.
#[derive(Debug)]
pub struct __Name__Sandbox;

impl __Name__Sandbox {
    /// Loads the data file (if any), binds `127.0.0.1:port` and serves until
    /// [`Running__Name__::shutdown`] (or drop).
    pub async fn start(config: SandboxConfig) -> Result<Running__Name__, SandboxError> {
        let data = DataFile::new(Shared::NAME, config.data_file.clone());
        let people: People = data.load()?.unwrap_or_default();
        let port = config.port;
        let shared = Arc::new(Shared {
            config,
            people: Mutex::new(people),
            wire: Arc::new(Wire::new(ANSWERS, WireFaults::default())),
            data,
        });
        let router = Router::new()
            .route("/people", get(list))
            .route("/people/{key}", put(upsert).delete(remove))
            .route_layer(from_fn_with_state(shared.clone(), authenticate))
            .layer(from_fn_with_state(shared.wire.clone(), inject_faults))
            .layer(from_fn_with_state(shared.wire.clone(), log_calls))
            .merge(admin_routes(shared.clone()))
            .fallback(|| async { error(StatusCode::NOT_FOUND, "no such resource") })
            .with_state(shared.clone());
        let running =
            contactsync_sandbox_kit::start(shared, CancellationToken::new(), port, "", router)
                .await?;
        Ok(Running__Name__ { running })
    }
}

/// A running sandbox. Dropping it stops the server.
#[derive(Debug)]
pub struct Running__Name__ {
    running: Running<Shared>,
}

impl Running__Name__ {
    /// The API base, `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        self.running.base_url()
    }

    /// The API key it accepts.
    pub fn api_key(&self) -> &str {
        &self.running.platform().config.api_key
    }

    /// Every person, by key.
    pub fn people(&self) -> BTreeMap<String, Map<String, Value>> {
        self.running.platform().lock().clone()
    }

    /// Replaces the wire faults (throttling, errors, delays, lost answers).
    pub fn set_wire_faults(&self, faults: WireFaults) {
        self.running.wire().set_faults(faults);
    }

    /// Every API call logged, oldest first.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.running.wire().requests()
    }

    /// Stops serving, waits for the server to end and saves the data file.
    pub async fn shutdown(self) -> Result<(), SandboxError> {
        self.running.shutdown().await
    }
}

type S = State<Arc<Shared>>;

async fn authenticate(State(shared): S, request: Request, next: Next) -> Response {
    let expected = format!("Bearer {}", shared.config.api_key);
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if given != Some(expected.as_str()) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
    }
    next.run(request).await
}

#[derive(Debug, Deserialize)]
struct Paging {
    page: Option<usize>,
    per_page: Option<usize>,
}

async fn list(State(shared): S, Query(paging): Query<Paging>) -> Response {
    let page = paging.page.unwrap_or(1).max(1);
    let size = paging
        .per_page
        .unwrap_or(100)
        .clamp(1, shared.config.max_page_size);
    let people: Vec<Value> = shared
        .lock()
        .values()
        .skip((page - 1) * size)
        .take(size)
        .map(|p| Value::Object(p.clone()))
        .collect();
    Json(people).into_response()
}

fn valid_email(email: &str) -> bool {
    email
        .split_once('@')
        .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'))
}

async fn upsert(State(shared): S, Path(key): Path<String>, body: axum::body::Bytes) -> Response {
    let Ok(Value::Object(person)) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "the body must be a JSON object");
    };
    match person.get("email").and_then(Value::as_str) {
        Some(email) if valid_email(email) => {}
        _ => return error(StatusCode::BAD_REQUEST, "a person needs a valid email"),
    }
    let created = shared.lock().insert(key, person).is_none();
    if let Err(e) = shared.save() {
        return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
    }
    if created {
        StatusCode::CREATED.into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

async fn remove(State(shared): S, Path(key): Path<String>) -> Response {
    if shared.lock().remove(&key).is_none() {
        return error(StatusCode::NOT_FOUND, "no such person");
    }
    if let Err(e) = shared.save() {
        return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
    }
    StatusCode::NO_CONTENT.into_response()
}

/// The part of the connector's settings the sandbox reads (other keys are the
/// client's, and allowed).
#[derive(Debug, Deserialize)]
struct ConnectorSection {
    api_key: Option<SecretString>,
    api_key_file: Option<PathBuf>,
}

fn config_from(options: &SandboxOptions) -> Result<SandboxConfig, SandboxError> {
    let mut config = SandboxConfig {
        port: options.port,
        data_file: options.data_file.clone(),
        ..SandboxConfig::default()
    };
    if let Some(settings) = &options.settings {
        let section: ConnectorSection = settings.parse()?;
        let key = settings.secret("api_key", section.api_key, section.api_key_file.as_deref())?;
        config.api_key = key.expose_secret().to_string();
    }
    Ok(config)
}

/// Starts the sandbox for the registry (`base_url = "sandbox"`, `contactsync sandbox
/// __name__`): the API key of the connector settings when given, otherwise `sandbox`.
pub fn start(options: SandboxOptions) -> SandboxStart {
    Box::pin(async move {
        let config = config_from(&options)?;
        Ok(__Name__Sandbox::start(config).await?.running.detach())
    })
}

contactsync_core::inventory::submit! {
    SandboxFactory { name: "__name__", start }
}
