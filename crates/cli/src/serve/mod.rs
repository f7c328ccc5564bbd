//! `contactsync serve`: a read-only web dashboard of the state (SQLite or PostgreSQL):
//! pipelines at a glance, their runs, a run's report and rejects, a person's history,
//! the same as JSON under `/api/`, and `/metrics` for Prometheus.
//!
//! Safe by default: it binds loopback unless told otherwise, and any other address
//! needs a token (`--token-file`: a Bearer header, or once through `/login`, which sets
//! an HttpOnly, SameSite=Strict cookie); it opens the state read-only and has no route
//! that changes anything (other methods get 405); every page carries a
//! Content-Security-Policy without script, and every value from the state is escaped.
//! docs/dashboard.md is the user's page.

pub mod chart;
pub mod data;
pub mod pages;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use axum::extract::{Form, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use contactsync_core::{DurationSetting, ExposeSecret, SecretString};
use contactsync_engine::state::{StateError, StateLocation, StateStore};
use minijinja::Environment;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::{failed, settings::Settings, state_failure, usage, Failure};

/// `[dashboard]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardSettings {
    /// A pipeline whose last success is older than this is marked stale (36 h).
    #[serde(default = "default_stale_after")]
    pub stale_after: DurationSetting,
}

fn default_stale_after() -> DurationSetting {
    DurationSetting::secs(36 * 3600)
}

impl Default for DashboardSettings {
    fn default() -> Self {
        DashboardSettings {
            stale_after: default_stale_after(),
        }
    }
}

/// `contactsync serve`'s options.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Where to listen. Any address but loopback needs --token-file.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The state (default: from the config).
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// A file holding the token every request must carry (a Bearer header, or the
    /// cookie `/login` sets).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

/// The cookie `/login` sets.
const COOKIE: &str = "contactsync_token";

/// What every page may load: its own stylesheet and nothing else; no script at all.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

struct App {
    store: Mutex<Box<dyn StateStore>>,
    env: Environment<'static>,
    token: Option<SecretString>,
    shown: String,
    stale_after: Duration,
}

/// Runs the dashboard until interrupted.
pub async fn serve(config: &Path, args: ServeArgs) -> Result<u8, Failure> {
    // With --state the config is optional (its [dashboard] is read when there is one).
    let settings = Settings::load(config, None);
    let location = match (&args.state, &settings) {
        (Some(path), _) => StateLocation::parse(&path.to_string_lossy(), Path::new(""))
            .map_err(|e| usage(anyhow!("--state {e}")))?,
        (None, Ok(s)) => s.state.clone(),
        (None, Err(e)) => return Err(usage(anyhow!("{e:#}"))),
    };
    let dashboard = settings.map(|s| s.dashboard).unwrap_or_default();
    let token = match &args.token_file {
        Some(path) => Some(read_token(path)?),
        None if args.listen.ip().is_loopback() => None,
        None => {
            return Err(usage(anyhow!(
                "--listen {}: any address but loopback needs --token-file, or anyone who reaches it reads the state",
                args.listen
            )))
        }
    };
    let open = location.clone();
    let store = tokio::task::spawn_blocking(move || open.open_read_only())
        .await
        .map_err(|e| failed(anyhow!(e)))?
        .map_err(state_failure)?;
    let app = Arc::new(App {
        store: Mutex::new(store),
        env: pages::environment(),
        token,
        shown: location.to_string(),
        stale_after: dashboard.stale_after.into(),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| failed(anyhow!("cannot listen on {}: {e}", args.listen)))?;
    let addr = listener.local_addr().map_err(|e| failed(anyhow!(e)))?;
    say!(
        "serving {} read-only at http://{addr}/{}",
        app.shown,
        if app.token.is_some() {
            " (token required)"
        } else {
            ""
        }
    );
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| failed(anyhow!(e)))?;
    Ok(0)
}

fn read_token(path: &Path) -> Result<SecretString, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| usage(anyhow!("--token-file {}: {e}", path.display())))?;
    let token = text.trim();
    if token.len() < 16 {
        return Err(usage(anyhow!(
            "--token-file {}: the token must be at least 16 characters",
            path.display()
        )));
    }
    contactsync_core::remember_secret(token);
    Ok(SecretString::from(token.to_string()))
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/api/overview", get(overview_json))
        .route("/pipelines/{name}", get(pipeline))
        .route("/api/pipelines/{name}", get(pipeline_json))
        .route("/pipelines/{name}/runs/{run}", get(run))
        .route("/api/pipelines/{name}/runs/{run}", get(run_json))
        .route("/pipelines/{name}/runs/{run}/rejects.csv", get(rejects_csv))
        .route("/people", get(people))
        .route("/api/people", get(people_json))
        .route("/metrics", get(metrics))
        .route("/style.css", get(style))
        .route("/login", get(login_form).post(login))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), authorize))
        .layer(middleware::from_fn(secure_headers))
        .with_state(app)
}

/// Every response: no script, no framing, no sniffing, no caching of the state's data.
async fn secure_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// The token a request carries: a Bearer header, else the login cookie.
fn presented(headers: &HeaderMap) -> Option<String> {
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(bearer.trim().to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
}

fn token_matches(app: &App, given: &str) -> bool {
    app.token
        .as_ref()
        .is_some_and(|t| bool::from(t.expose_secret().as_bytes().ct_eq(given.as_bytes())))
}

/// With a token configured, every route but `/login` and the stylesheet needs it. A
/// wrong or missing one is 401 with no hint of why.
async fn authorize(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if app.token.is_none() || path == "/login" || path == "/style.css" {
        return next.run(request).await;
    }
    if presented(request.headers()).is_some_and(|t| token_matches(&app, &t)) {
        return next.run(request).await;
    }
    let mut response = if path.starts_with("/api/") || path == "/metrics" {
        (StatusCode::UNAUTHORIZED, "401 Unauthorized\n").into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            Html(pages::login(&app.env, &frame(&app))),
        )
            .into_response()
    };
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"contactsync\""),
    );
    response
}

fn frame(app: &App) -> pages::Frame<'_> {
    pages::Frame {
        state: &app.shown,
        now: chrono::Utc::now().to_rfc3339(),
    }
}

/// Reads the state on a blocking thread (its calls wait for SQLite or the PostgreSQL
/// connection), one request at a time.
async fn read<T: Send + 'static>(
    app: &Arc<App>,
    work: impl FnOnce(&mut dyn StateStore) -> Result<T, StateError> + Send + 'static,
) -> Result<T, Response> {
    let app2 = app.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut store = app2
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        work(store.as_mut())
    })
    .await;
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(problem(
            app,
            StatusCode::SERVICE_UNAVAILABLE,
            "The state could not be read",
            &e.to_string(),
        )),
        Err(e) => Err(problem(
            app,
            StatusCode::INTERNAL_SERVER_ERROR,
            "The state could not be read",
            &e.to_string(),
        )),
    }
}

fn problem(app: &App, status: StatusCode, title: &str, message: &str) -> Response {
    let message = contactsync_core::redact_secrets(message);
    (
        status,
        Html(pages::error(&app.env, &frame(app), title, &message)),
    )
        .into_response()
}

fn missing(app: &App, what: &str) -> Response {
    problem(
        app,
        StatusCode::NOT_FOUND,
        "Not found",
        &format!("The state has no {what}."),
    )
}

async fn not_found(State(app): State<Arc<App>>) -> Response {
    missing(&app, "such page")
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        pages::STYLE,
    )
}

async fn overview_data(app: &Arc<App>) -> Result<Vec<data::PipelineOverview>, Response> {
    let stale_after = app.stale_after;
    read(app, move |s| {
        data::overview(s, chrono::Utc::now(), stale_after)
    })
    .await
}

async fn overview(State(app): State<Arc<App>>) -> Response {
    match overview_data(&app).await {
        Ok(rows) => Html(pages::overview(
            &app.env,
            &frame(&app),
            &rows,
            &humantime::format_duration(app.stale_after).to_string(),
        ))
        .into_response(),
        Err(r) => r,
    }
}

async fn overview_json(State(app): State<Arc<App>>) -> Response {
    match overview_data(&app).await {
        Ok(rows) => Json(serde_json::json!({
            "stale_after_seconds": app.stale_after.as_secs(),
            "pipelines": rows,
        }))
        .into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct Before {
    before: Option<i64>,
}

async fn pipeline_data(
    app: &Arc<App>,
    name: String,
    before: Option<i64>,
) -> Result<data::PipelinePage, Response> {
    let shown = name.clone();
    match read(app, move |s| data::pipeline_page(s, &name, before)).await? {
        Some(page) => Ok(page),
        None => Err(missing(app, &format!("pipeline {shown}"))),
    }
}

async fn pipeline(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<Before>,
) -> Response {
    match pipeline_data(&app, name, q.before).await {
        Ok(page) => Html(pages::pipeline(&app.env, &frame(&app), &page)).into_response(),
        Err(r) => r,
    }
}

async fn pipeline_json(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<Before>,
) -> Response {
    match pipeline_data(&app, name, q.before).await {
        Ok(page) => Json(page).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct Offset {
    offset: Option<u64>,
}

async fn run_data(
    app: &Arc<App>,
    name: String,
    run: i64,
    offset: u64,
) -> Result<data::RunPage, Response> {
    let shown = name.clone();
    match read(app, move |s| data::run_page(s, &name, run, offset)).await? {
        Some(page) => Ok(page),
        None => Err(missing(app, &format!("run {run} of {shown}"))),
    }
}

async fn run(
    State(app): State<Arc<App>>,
    UrlPath((name, run)): UrlPath<(String, i64)>,
    Query(q): Query<Offset>,
) -> Response {
    match run_data(&app, name, run, q.offset.unwrap_or(0)).await {
        Ok(page) => Html(pages::run(&app.env, &frame(&app), &page)).into_response(),
        Err(r) => r,
    }
}

async fn run_json(
    State(app): State<Arc<App>>,
    UrlPath((name, run)): UrlPath<(String, i64)>,
    Query(q): Query<Offset>,
) -> Response {
    match run_data(&app, name, run, q.offset.unwrap_or(0)).await {
        Ok(page) => Json(page).into_response(),
        Err(r) => r,
    }
}

async fn rejects_csv(
    State(app): State<Arc<App>>,
    UrlPath((name, run)): UrlPath<(String, i64)>,
) -> Response {
    let file = format!(
        "rejects-{}-run-{run}.csv",
        name.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    );
    match read(&app, move |s| data::rejects_csv(s, &name, run)).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{file}\""),
                ),
            ],
            bytes,
        )
            .into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct Who {
    q: Option<String>,
}

async fn people_data(app: &Arc<App>, q: &str) -> Result<Vec<data::PersonEntry>, Response> {
    let who = q.to_string();
    read(app, move |s| data::person(s, &who)).await
}

async fn people(State(app): State<Arc<App>>, Query(who): Query<Who>) -> Response {
    let q = who.q.unwrap_or_default();
    match people_data(&app, &q).await {
        Ok(entries) => {
            Html(pages::people(&app.env, &frame(&app), q.trim(), &entries)).into_response()
        }
        Err(r) => r,
    }
}

async fn people_json(State(app): State<Arc<App>>, Query(who): Query<Who>) -> Response {
    let q = who.q.unwrap_or_default();
    match people_data(&app, &q).await {
        Ok(entries) => {
            Json(serde_json::json!({ "q": q.trim(), "entries": entries })).into_response()
        }
        Err(r) => r,
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let numbers = match read(&app, data::metrics).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    match crate::metrics::render_numbers(&numbers) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => problem(
            &app,
            StatusCode::INTERNAL_SERVER_ERROR,
            "Metrics",
            &format!("{e:#}"),
        ),
    }
}

async fn login_form(State(app): State<Arc<App>>) -> Response {
    Html(pages::login(&app.env, &frame(&app))).into_response()
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

/// Sets the cookie when the token is right; a wrong one is 401, the form again.
async fn login(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(form): Form<Login>,
) -> Response {
    if !token_matches(&app, form.token.trim()) {
        return (
            StatusCode::UNAUTHORIZED,
            Html(pages::login(&app.env, &frame(&app))),
        )
            .into_response();
    }
    // Behind a reverse proxy that ends TLS, the cookie is sent over HTTPS only.
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{}",
        form.token.trim(),
        if secure { "; Secure" } else { "" }
    );
    let mut response = Redirect::to("/").into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}
