//! A Poppulo (Newsweaver API v2) sandbox: a small HTTP server on loopback that behaves
//! like the documented API, so that the Poppulo client and end-to-end tests run with no
//! network and no account.
//!
//! It is written from the API documents (`shared/specs/poppulo.md` and the seed pages),
//! never from the client's code: the two share no types, so a misunderstanding on one
//! side cannot hide itself on the other. A sandbox that accepts anything proves
//! nothing, so it enforces the documented rules: Basic auth and a `User-Agent` on every
//! request, 409 for every documented import validation failure, one import at a time
//! per account (503 without `Retry-After`), throttling (503 with `Retry-After`),
//! polling no earlier than `ping_after`, a person's own opt-out being final.
//!
//! Start reading from [`PoppuloSandbox::start`]; [`Faults`] injects failures.
//!
//! Inferred choices (the documents are silent; see the module docs of `routes` and
//! `import` for the details):
//! - Unknown account with good credentials: 401. Missing or empty `User-Agent`: 400.
//!   POST/PUT bodies must be `application/xml` or `text/xml`: 415 otherwise.
//! - Missing job booleans mean `false`. Permission and tag cells hold several names
//!   separated by `|`. An empty field cell clears the field; empty `permissions`,
//!   `tags` or `status` cells change nothing.
//! - Rows for existing subscribers when `update_existing=false`, and ACTIVE rows for
//!   removed subscribers whose `reactivate_*` flag is false, are skipped and counted in
//!   no API counter (the sandbox's own `results.skipped` counts them).
//! - Custom fields: any name that is not a (misspelt) canonical name, unless
//!   [`SandboxConfig::custom_fields`] declares the account's fields.
//! - The first poll of an import is always welcome; each IN_PROGRESS answer sets a new
//!   `ping_after`. Whole seconds, rounded up, when the interval is whole seconds;
//!   milliseconds otherwise (`2012-01-11T16:41:13.250Z`).
//! - Subscriber lists: `status` defaults to `active`; paging by `startIndex`
//!   (1-based) and `itemsPerPage` (capped at the page size), in creation order.

mod faults;
mod import;
mod model;
mod routes;
mod xml;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use contactsync_core::registry::{RunningSandbox, SandboxFactory, SandboxOptions, SandboxStart};
use contactsync_core::{
    CancellationToken, ConfigError, ConnectorError, ExposeSecret, SecretString,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use tokio::task::JoinHandle;

pub use faults::{Faults, Stats};
pub use import::CustomFields;
pub use model::{
    FieldSeparator, Import, ImportJob, ImportResults, ImportStatus, RemovedBy, Subscriber,
    SubscriberStatus,
};

use model::Store;

/// Default account code when the sandbox is started without connector settings.
pub const DEFAULT_ACCOUNT: &str = "demo";
/// Default API user name.
pub const DEFAULT_USERNAME: &str = "sandbox";
/// Default API user password.
pub const DEFAULT_PASSWORD: &str = "sandbox";

/// Why the sandbox could not start, load or save.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The data file is not the sandbox's JSON.
    #[error("{}: not a Poppulo sandbox data file: {message}", path.display())]
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The port could not be bound.
    #[error("cannot listen on 127.0.0.1:{port}: {source}")]
    Bind {
        /// The port asked for.
        port: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A seeded subscriber is not acceptable.
    #[error("cannot seed {email}: {message}")]
    Seed {
        /// The subscriber's email.
        email: String,
        /// Why.
        message: String,
    },
    /// The connector settings do not name an account and credentials.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl From<SandboxError> for ConnectorError {
    fn from(error: SandboxError) -> Self {
        match error {
            SandboxError::Io { path, source } => ConnectorError::Io { path, source },
            SandboxError::Config(e) => ConnectorError::Config(e),
            other => ConnectorError::Other(other.to_string()),
        }
    }
}

/// How to run the sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The account code in URLs (`/v2/{account}/…`).
    pub account: String,
    /// The API user's name.
    pub username: String,
    /// The API user's password.
    pub password: String,
    /// The loopback port; 0 picks a free one.
    pub port: u16,
    /// Where to keep the data between runs; `None`: in memory only.
    pub data_file: Option<PathBuf>,
    /// The most subscribers in one list page (the API's is about 1000).
    pub page_size: usize,
    /// Import rows processed per tick.
    pub records_per_tick: usize,
    /// The time between processing ticks.
    pub tick: Duration,
    /// How long a client is asked to wait between polls (`ping_after`).
    pub ping_interval: Duration,
    /// The account's custom fields.
    pub custom_fields: CustomFields,
    /// Faults from the start.
    pub faults: Faults,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            account: DEFAULT_ACCOUNT.to_string(),
            username: DEFAULT_USERNAME.to_string(),
            password: DEFAULT_PASSWORD.to_string(),
            port: 0,
            data_file: None,
            page_size: 1000,
            records_per_tick: 500,
            tick: Duration::from_millis(100),
            ping_interval: Duration::from_secs(1),
            custom_fields: CustomFields::Any,
            faults: Faults::default(),
        }
    }
}

impl SandboxConfig {
    /// Declares the account's custom fields (others are refused with 409); builder style.
    pub fn with_custom_fields<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        names: I,
    ) -> Self {
        self.custom_fields =
            CustomFields::Declared(names.into_iter().map(Into::into).collect::<BTreeSet<_>>());
        self
    }
}

/// What changes while the sandbox runs.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub store: Store,
    pub faults: Faults,
    pub fault_counter: u64,
    pub busy_until: Option<Instant>,
    pub stats: Stats,
}

/// What the handlers and background tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: SandboxConfig,
    pub state: Mutex<State>,
    pub shutdown: CancellationToken,
    save_lock: Mutex<()>,
}

impl Shared {
    /// The state; a poisoned lock (a panic elsewhere) is still usable data.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Saves the data file, if any.
    pub fn save(&self) -> Result<(), SandboxError> {
        let Some(path) = &self.config.data_file else {
            return Ok(());
        };
        let _one_writer = self.save_lock.lock().unwrap_or_else(|e| e.into_inner());
        let json = self.lock().store.to_json()?;
        model::write_atomically(path, &json)
    }

    /// Saves, logging a failure (for background saves nobody waits for).
    pub fn save_logged(&self) {
        if let Err(e) = self.save() {
            tracing::error!("Poppulo sandbox could not save its data: {e}");
        }
    }

    fn set_faults(&self, faults: Faults) {
        let mut state = self.lock();
        state.busy_until = (faults.busy_for_ms > 0)
            .then(|| Instant::now() + Duration::from_millis(faults.busy_for_ms));
        state.fault_counter = 0;
        state.faults = faults;
    }
}

/// Starts Poppulo sandboxes.
#[derive(Debug)]
pub struct PoppuloSandbox;

impl PoppuloSandbox {
    /// Loads the data file (if any), binds `127.0.0.1:port`, resumes imports that were
    /// in progress, and serves until [`RunningPoppulo::shutdown`] (or drop).
    pub async fn start(config: SandboxConfig) -> Result<RunningPoppulo, SandboxError> {
        let store = match &config.data_file {
            Some(path) => Store::load(path)?,
            None => Store::default(),
        };
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, config.port))
            .await
            .map_err(|source| SandboxError::Bind {
                port: config.port,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SandboxError::Bind {
            port: config.port,
            source,
        })?;
        let shutdown = CancellationToken::new();
        let faults = config.faults.clone();
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(State {
                store,
                ..State::default()
            }),
            shutdown: shutdown.clone(),
            save_lock: Mutex::new(()),
        });
        shared.set_faults(faults);
        let unfinished: Vec<u64> = shared
            .lock()
            .store
            .imports
            .values()
            .filter(|i| i.status == ImportStatus::InProgress)
            .map(|i| i.id)
            .collect();
        for id in unfinished {
            tokio::spawn(import::run(shared.clone(), id));
        }
        let router = routes::router(shared.clone());
        let task = tokio::spawn(serve(listener, router, shared.clone()));
        let base_url = format!("http://{addr}/v2");
        tracing::info!("Poppulo sandbox on {base_url} — not the real Poppulo");
        Ok(RunningPoppulo {
            shared,
            addr,
            base_url,
            task: Some(task),
            stop_on_drop: true,
        })
    }
}

/// Accepts connections until shutdown; each connection is served by hyper so that a
/// request marked [`faults::DropConnection`] can end its connection without an answer.
async fn serve(listener: tokio::net::TcpListener, router: axum::Router, shared: Arc<Shared>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("Poppulo sandbox accept failed: {e}");
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
                    if response
                        .extensions()
                        .get::<faults::DropConnection>()
                        .is_some()
                    {
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
    shared.save_logged();
}

/// The error that makes hyper close a connection without answering.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped on purpose by the sandbox")]
struct DroppedOnPurpose;

/// A running sandbox. Dropping it stops the server (saving is then best effort; call
/// [`RunningPoppulo::shutdown`] to wait for the save).
#[derive(Debug)]
pub struct RunningPoppulo {
    shared: Arc<Shared>,
    addr: SocketAddr,
    base_url: String,
    task: Option<JoinHandle<()>>,
    stop_on_drop: bool,
}

impl RunningPoppulo {
    /// The API base, `http://127.0.0.1:PORT/v2` (the account code follows it).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The account's base, `http://127.0.0.1:PORT/v2/{account}`.
    pub fn account_url(&self) -> String {
        format!("{}/{}", self.base_url, self.shared.config.account)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The account code it accepts.
    pub fn account(&self) -> &str {
        &self.shared.config.account
    }

    /// The API user name it accepts.
    pub fn username(&self) -> &str {
        &self.shared.config.username
    }

    /// The password it accepts.
    pub fn password(&self) -> &str {
        &self.shared.config.password
    }

    /// Replaces the faults; request numbers count from now.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.set_faults(faults);
    }

    /// The current faults.
    pub fn faults(&self) -> Faults {
        self.shared.lock().faults.clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }

    /// A snapshot of every subscriber, in creation order.
    pub fn subscribers(&self) -> Vec<Subscriber> {
        self.shared.lock().store.subscribers().cloned().collect()
    }

    /// The subscriber with this email (domain case-insensitive).
    pub fn subscriber(&self, email: &str) -> Option<Subscriber> {
        self.shared.lock().store.find(email).cloned()
    }

    /// Adds a subscriber as if created on the platform (for example one who opted out
    /// themselves, [`Subscriber::self_opted_out`]); returns it with its id.
    pub fn seed_subscriber(&self, subscriber: Subscriber) -> Result<Subscriber, SandboxError> {
        let seeded = seed(&self.shared, subscriber)?;
        self.shared.save()?;
        Ok(seeded)
    }

    /// A snapshot of every import (its columns in `job.columns`, its rows as parsed),
    /// oldest first.
    pub fn imports(&self) -> Vec<Import> {
        self.shared.lock().store.imports.values().cloned().collect()
    }

    /// Saves the data file now.
    pub fn save(&self) -> Result<(), SandboxError> {
        self.shared.save()
    }

    /// Stops serving, waits for the server to end and saves the data file.
    pub async fn shutdown(mut self) -> Result<(), SandboxError> {
        self.shared.shutdown.cancel();
        if let Some(task) = self.task.take() {
            // A panicked server task has nothing more to do; the save below still runs.
            let _ = task.await;
        }
        self.shared.save()
    }
}

impl Drop for RunningPoppulo {
    fn drop(&mut self) {
        if self.stop_on_drop {
            self.shared.shutdown.cancel();
        }
    }
}

/// Adds a subscriber with the next id, refusing duplicates and invalid emails.
pub(crate) fn seed(shared: &Shared, subscriber: Subscriber) -> Result<Subscriber, SandboxError> {
    let email = subscriber.email.trim().to_string();
    if !model::valid_email(&email) {
        return Err(SandboxError::Seed {
            email,
            message: "not a valid email address".into(),
        });
    }
    let mut state = shared.lock();
    if state.store.find(&email).is_some() {
        return Err(SandboxError::Seed {
            email,
            message: "a subscriber with this email exists".into(),
        });
    }
    Ok(state
        .store
        .insert(Subscriber {
            email,
            ..subscriber
        })
        .clone())
}

/// The part of the Poppulo connector's settings the sandbox reads (unknown keys are the
/// client's, and allowed).
#[derive(Debug, Deserialize)]
struct ConnectorSection {
    account: String,
    username: String,
    password: Option<SecretString>,
    password_file: Option<PathBuf>,
}

fn config_from(options: &SandboxOptions) -> Result<SandboxConfig, SandboxError> {
    let mut config = SandboxConfig {
        port: options.port,
        data_file: options.data_file.clone(),
        ..SandboxConfig::default()
    };
    if let Some(settings) = &options.settings {
        let section: ConnectorSection = settings.parse()?;
        let password = settings.secret(
            "password",
            section.password,
            section.password_file.as_deref(),
        )?;
        config.account = section.account;
        config.username = section.username;
        config.password = password.expose_secret().to_string();
    }
    Ok(config)
}

/// Starts the sandbox for the registry (`base_url = "sandbox"`, `contactsync sandbox
/// poppulo`): the account and credentials of the connector settings when given,
/// otherwise account `demo`, user `sandbox`, password `sandbox`.
pub fn start(options: SandboxOptions) -> SandboxStart {
    Box::pin(async move {
        let config = config_from(&options)?;
        let mut running = PoppuloSandbox::start(config).await?;
        let shutdown = running.shared.shutdown.clone();
        let base_url = running.base_url.clone();
        // The server task lives on its own; the token (and its drop guard) stops it,
        // and the server saves the data when it ends.
        running.task.take();
        running.stop_on_drop = false;
        Ok(RunningSandbox::new(base_url, shutdown))
    })
}

contactsync_core::inventory::submit! {
    SandboxFactory { name: "poppulo", start }
}
