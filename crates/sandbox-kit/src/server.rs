//! Serving on loopback, the running handle and the admin endpoints.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use contactsync_core::registry::RunningSandbox;
use contactsync_core::CancellationToken;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::task::JoinHandle;

use crate::wire::DropConnection;
use crate::{LoggedRequest, SandboxError, Wire, WireFaults};

/// What a sandbox's shared state tells the kit.
pub trait Platform: Send + Sync + 'static {
    /// The platform's name, for logs and errors (`Poppulo`).
    const NAME: &'static str;
    /// The platform's own faults (imports that fail, a busy account), set through the
    /// same `/_sandbox/faults` object as the [`WireFaults`]. Use
    /// `#[serde(default, deny_unknown_fields)]`, so that a misspelt fault is refused.
    type Faults: Serialize + DeserializeOwned + Clone + Default + Send;

    /// The sandbox's fault layer and log.
    fn wire(&self) -> &Wire;
    /// The platform faults now.
    fn faults(&self) -> Self::Faults;
    /// Replaces the platform faults.
    fn set_faults(&self, faults: Self::Faults);
    /// Forgets every record, as a new account would be (`POST /_sandbox/reset`).
    fn reset(&self);
    /// Saves the data file, if the sandbox has one.
    fn save(&self) -> Result<(), SandboxError>;

    /// Saves, logging a failure: for saves nobody waits for (after a background
    /// import, on the way out).
    fn save_logged(&self) {
        if let Err(e) = self.save() {
            tracing::error!("{} sandbox could not save its data: {e}", Self::NAME);
        }
    }
}

/// Binds `127.0.0.1:port` (0: any free port), serves `router` with [`serve`] until
/// `shutdown` is cancelled (by the returned handle's shutdown or drop), then saves.
/// `path` follows the address in the base URL (`/v2`, or empty). The sandbox's own
/// background tasks (import workers) watch the same token.
pub async fn start<P: Platform>(
    platform: Arc<P>,
    shutdown: CancellationToken,
    port: u16,
    path: &str,
    router: Router,
) -> Result<Running<P>, SandboxError> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|source| SandboxError::Bind { port, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| SandboxError::Bind { port, source })?;
    let saver = platform.clone();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        serve(listener, router, stop).await;
        saver.save_logged();
    });
    let base_url = format!("http://{addr}{path}");
    tracing::info!(
        "{} sandbox on {base_url} — not the real {}",
        P::NAME,
        P::NAME
    );
    Ok(Running {
        platform,
        addr,
        base_url,
        shutdown,
        task: Some(task),
    })
}

/// Accepts connections until `shutdown`; each connection is served by hyper, so that
/// a response the fault layer marked is not sent and its connection closes instead.
pub async fn serve(listener: tokio::net::TcpListener, router: Router, shutdown: CancellationToken) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("sandbox accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let mut router = router.clone();
                async move {
                    let response = match tower_service::Service::call(&mut router, request).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    };
                    if response.extensions().get::<DropConnection>().is_some() {
                        Err(DroppedOnPurpose)
                    } else {
                        Ok(response)
                    }
                }
            });
        connections.spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // Errors here are dropped connections (on purpose or by the client).
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
    connections.abort_all();
}

/// The error that makes hyper close a connection without answering.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped on purpose by the sandbox")]
struct DroppedOnPurpose;

/// A running sandbox. Dropping it stops the server (saving is then best effort; call
/// [`Running::shutdown`] to wait for the save).
pub struct Running<P: Platform> {
    platform: Arc<P>,
    addr: SocketAddr,
    base_url: String,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl<P: Platform> std::fmt::Debug for Running<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("platform", &P::NAME)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl<P: Platform> Running<P> {
    /// The base URL (`http://127.0.0.1:PORT` and the start's path).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The sandbox's shared state.
    pub fn platform(&self) -> &Arc<P> {
        &self.platform
    }

    /// The fault layer and log.
    pub fn wire(&self) -> &Wire {
        self.platform.wire()
    }

    /// Stops serving, waits for the server to end and saves the data file.
    pub async fn shutdown(mut self) -> Result<(), SandboxError> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            // A panicked server task has nothing more to do; the save below still runs.
            let _ = task.await;
        }
        self.platform.save()
    }

    /// Hands the server to the registry's handle: it runs until that handle's token is
    /// cancelled or its guard dropped, and saves its data as it ends.
    pub fn detach(mut self) -> RunningSandbox {
        self.task.take();
        RunningSandbox::new(self.base_url.clone(), self.shutdown.clone())
    }
}

/// The registry's start function of a sandbox (`base_url = "sandbox"`, `contactsync
/// sandbox NAME`): `config` reads the connector's settings in `options`, `start`
/// starts the sandbox, whose server then runs detached under the registry's handle.
///
/// ```ignore
/// contactsync_core::inventory::submit! {
///     SandboxFactory { name: "acme", start: |o| start_for_registry(o, config_from, AcmeSandbox::start) }
/// }
/// ```
pub fn start_for_registry<C, E, R, Fut>(
    options: contactsync_core::SandboxOptions,
    config: fn(&contactsync_core::SandboxOptions) -> Result<C, E>,
    start: fn(C) -> Fut,
) -> contactsync_core::registry::SandboxStart
where
    C: Send + 'static,
    E: Into<contactsync_core::ConnectorError>,
    Fut: std::future::Future<Output = Result<R, SandboxError>> + Send + 'static,
    R: Into<RunningSandbox>,
{
    let config = config(&options).map_err(Into::into);
    Box::pin(async move { Ok(start(config?).await?.into()) })
}

impl<P: Platform> Drop for Running<P> {
    fn drop(&mut self) {
        // A detached server has no task here and lives on under its RunningSandbox.
        if self.task.is_some() {
            self.shutdown.cancel();
        }
    }
}

/// The admin endpoints every sandbox has, needing no auth:
/// - `GET /_sandbox/faults`: the [`WireFaults`] and the platform's faults, one object;
///   `POST` replaces both from one object (missing keys: defaults; an unknown key: 400
///   naming it) and answers the faults now set.
/// - `GET /_sandbox/requests`: the [`LoggedRequest`]s; `DELETE` forgets them.
/// - `POST /_sandbox/reset`: no records, no faults, no log.
pub fn admin_routes<P: Platform, S: Clone + Send + Sync + 'static>(platform: Arc<P>) -> Router<S> {
    Router::new()
        .route(
            "/_sandbox/faults",
            get(get_faults::<P>).post(post_faults::<P>),
        )
        .route(
            "/_sandbox/requests",
            get(get_requests::<P>).delete(delete_requests::<P>),
        )
        .route("/_sandbox/reset", post(reset::<P>))
        .with_state(platform)
}

fn object(value: impl Serialize) -> Map<String, Value> {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

async fn get_faults<P: Platform>(State(platform): State<Arc<P>>) -> Json<Value> {
    let mut all = object(platform.wire().faults());
    all.extend(object(platform.faults()));
    Json(Value::Object(all))
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

/// Takes the body as JSON whatever its `Content-Type` says (liberal in what it accepts:
/// this is a test tool).
async fn post_faults<P: Platform>(
    State(platform): State<Arc<P>>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(Value::Object(mut rest)) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("faults must be a JSON object".into());
    };
    let mut wire = Map::new();
    for key in WireFaults::keys() {
        if let Some(value) = rest.remove(&key) {
            wire.insert(key, value);
        }
    }
    let wire: WireFaults = match serde_json::from_value(Value::Object(wire)) {
        Ok(faults) => faults,
        Err(e) => return bad_request(e.to_string()),
    };
    let own: P::Faults = match serde_json::from_value(Value::Object(rest)) {
        Ok(faults) => faults,
        Err(e) => return bad_request(e.to_string()),
    };
    platform.wire().set_faults(wire);
    platform.set_faults(own);
    get_faults(State(platform)).await.into_response()
}

async fn get_requests<P: Platform>(State(platform): State<Arc<P>>) -> Json<Vec<LoggedRequest>> {
    Json(platform.wire().requests())
}

async fn delete_requests<P: Platform>(State(platform): State<Arc<P>>) -> StatusCode {
    platform.wire().clear_requests();
    StatusCode::NO_CONTENT
}

async fn reset<P: Platform>(State(platform): State<Arc<P>>) -> StatusCode {
    platform.wire().reset();
    platform.set_faults(P::Faults::default());
    platform.reset();
    platform.save_logged();
    StatusCode::NO_CONTENT
}
