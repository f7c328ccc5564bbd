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
//! - Custom fields: the account's ([`SandboxConfig::custom_fields`]; by default
//!   [`DEMO_CUSTOM_FIELDS`]); an import naming any other is refused with 409, as the
//!   spec says.
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
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use contactsync_core::registry::{RunningSandbox, SandboxOptions};
use contactsync_core::{CancellationToken, ExposeSecret, SecretString};
use contactsync_sandbox_kit::data::DataFile;
use contactsync_sandbox_kit::{start_for_registry, Answers, Guarded, Platform, Running, Wire};
use serde::Deserialize;

pub use contactsync_sandbox_kit::{LoggedRequest, SandboxError, WireFaults};
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
    /// Platform faults from the start.
    pub faults: Faults,
    /// Wire faults (throttling, lost answers, delays) from the start.
    pub wire_faults: WireFaults,
}

/// The custom fields the sandbox's account has unless told otherwise
/// ([`SandboxConfig::with_custom_fields`]): as on the platform, an import that names
/// any other is refused with 409.
pub const DEMO_CUSTOM_FIELDS: [&str; 2] = ["Cost Center", "Origin"];

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
            custom_fields: CustomFields::Declared(
                DEMO_CUSTOM_FIELDS.iter().map(|f| f.to_string()).collect(),
            ),
            faults: Faults::default(),
            wire_faults: WireFaults::default(),
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
    pub busy_until: Option<Instant>,
    pub stats: Stats,
}

/// What the handlers and background tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: SandboxConfig,
    pub state: Guarded<State>,
    pub wire: Arc<Wire>,
    pub shutdown: CancellationToken,
}

impl Shared {
    /// The state; see [`Guarded::lock`].
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Saves the data file, if any.
    pub fn save(&self) -> Result<(), SandboxError> {
        self.state.save(|state| &state.store)
    }

    /// The counters so far: the platform's and the wire's.
    pub fn stats(&self) -> Stats {
        let counts = self.wire.counts();
        let mut stats = self.lock().stats.clone();
        stats.requests = counts.requests;
        stats.requests_by_route = counts.requests_by_route;
        stats.throttled += counts.throttled;
        stats.dropped = counts.dropped;
        stats
    }
}

impl Platform for Shared {
    const NAME: &'static str = "Poppulo";
    type Faults = Faults;

    fn wire(&self) -> &Wire {
        &self.wire
    }

    fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    fn set_faults(&self, faults: Faults) {
        let mut state = self.lock();
        state.busy_until = (faults.busy_for_ms > 0)
            .then(|| Instant::now() + Duration::from_millis(faults.busy_for_ms));
        state.faults = faults;
    }

    fn reset(&self) {
        let mut state = self.lock();
        state.store = Store::default();
        state.stats = Stats::default();
        state.busy_until = None;
    }

    fn save(&self) -> Result<(), SandboxError> {
        Shared::save(self)
    }
}

/// How Poppulo words a throttled answer and a server error.
const ANSWERS: Answers = Answers {
    throttled: || {
        routes::error_response(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "rate limit exceeded: retry later",
        )
    },
    failed: || {
        routes::error_response(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal server error",
        )
    },
};

/// Starts Poppulo sandboxes.
#[derive(Debug)]
pub struct PoppuloSandbox;

impl PoppuloSandbox {
    /// Loads the data file (if any), binds `127.0.0.1:port`, resumes imports that were
    /// in progress, and serves until [`RunningPoppulo::shutdown`] (or drop).
    pub async fn start(config: SandboxConfig) -> Result<RunningPoppulo, SandboxError> {
        let data = DataFile::new(<Shared as Platform>::NAME, config.data_file.clone());
        let store = Store::loaded(data.load()?);
        let faults = config.faults.clone();
        let port = config.port;
        let shared = Arc::new(Shared {
            wire: Arc::new(Wire::new(ANSWERS, config.wire_faults.clone())),
            config,
            state: Guarded::new(
                State {
                    store,
                    ..State::default()
                },
                data,
            ),
            shutdown: CancellationToken::new(),
        });
        Platform::set_faults(&*shared, faults);
        let unfinished: Vec<u64> = shared
            .lock()
            .store
            .imports
            .values()
            .filter(|i| i.status == ImportStatus::InProgress)
            .map(|i| i.id)
            .collect();
        let router = routes::router(shared.clone());
        let shutdown = shared.shutdown.clone();
        let running =
            contactsync_sandbox_kit::start(shared.clone(), shutdown, port, "/v2", router).await?;
        for id in unfinished {
            tokio::spawn(import::run(shared.clone(), id));
        }
        Ok(RunningPoppulo { running })
    }
}

/// A running sandbox. Dropping it stops the server (saving is then best effort; call
/// [`RunningPoppulo::shutdown`] to wait for the save).
#[derive(Debug)]
pub struct RunningPoppulo {
    running: Running<Shared>,
}

/// Detached: the server runs on under the registry's handle.
impl From<RunningPoppulo> for RunningSandbox {
    fn from(sandbox: RunningPoppulo) -> Self {
        sandbox.running.detach()
    }
}

impl RunningPoppulo {
    /// The API base, `http://127.0.0.1:PORT/v2` (the account code follows it).
    pub fn base_url(&self) -> &str {
        self.running.base_url()
    }

    /// The account's base, `http://127.0.0.1:PORT/v2/{account}`.
    pub fn account_url(&self) -> String {
        format!("{}/{}", self.base_url(), self.shared().config.account)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.running.addr()
    }

    fn shared(&self) -> &Shared {
        self.running.platform()
    }

    /// The account code it accepts.
    pub fn account(&self) -> &str {
        &self.shared().config.account
    }

    /// The API user name it accepts.
    pub fn username(&self) -> &str {
        &self.shared().config.username
    }

    /// The password it accepts.
    pub fn password(&self) -> &str {
        &self.shared().config.password
    }

    /// Replaces the platform faults.
    pub fn set_faults(&self, faults: Faults) {
        Platform::set_faults(self.shared(), faults);
    }

    /// The current platform faults.
    pub fn faults(&self) -> Faults {
        Platform::faults(self.shared())
    }

    /// Replaces the wire faults (throttling, drops, delays); call numbers count from
    /// now.
    pub fn set_wire_faults(&self, faults: WireFaults) {
        self.running.wire().set_faults(faults);
    }

    /// The calls seen so far, oldest first.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.running.wire().requests()
    }

    /// The counters so far: the platform's and the wire's.
    pub fn stats(&self) -> Stats {
        self.shared().stats()
    }

    /// A snapshot of every subscriber, in creation order.
    pub fn subscribers(&self) -> Vec<Subscriber> {
        self.shared().lock().store.subscribers().cloned().collect()
    }

    /// The subscriber with this email (domain case-insensitive).
    pub fn subscriber(&self, email: &str) -> Option<Subscriber> {
        self.shared().lock().store.find(email).cloned()
    }

    /// Adds a subscriber as if created on the platform (for example one who opted out
    /// themselves, [`Subscriber::self_opted_out`]); returns it with its id.
    pub fn seed_subscriber(&self, subscriber: Subscriber) -> Result<Subscriber, SandboxError> {
        let seeded = seed(self.shared(), subscriber)?;
        self.shared().save()?;
        Ok(seeded)
    }

    /// Changes a subscriber as a person or the account's staff would in the web
    /// application (the person opts out, an administrator removes them or edits a
    /// field, a permission is dropped): `edit` gets the subscriber, whose version and
    /// `date_modified` move on. `false` when no subscriber has `email`.
    pub fn edit_on_platform(&self, email: &str, edit: impl FnOnce(&mut Subscriber)) -> bool {
        let edited = {
            let mut state = self.shared().lock();
            match state.store.find_mut(email) {
                Some(subscriber) => {
                    edit(subscriber);
                    subscriber.version += 1;
                    subscriber.date_modified = model::now();
                    true
                }
                None => false,
            }
        };
        if edited {
            self.shared().save_logged();
        }
        edited
    }

    /// A snapshot of every import (its columns in `job.columns`, its rows as parsed),
    /// oldest first.
    pub fn imports(&self) -> Vec<Import> {
        self.shared()
            .lock()
            .store
            .imports
            .values()
            .cloned()
            .collect()
    }

    /// Saves the data file now.
    pub fn save(&self) -> Result<(), SandboxError> {
        self.shared().save()
    }

    /// Stops serving, waits for the server to end and saves the data file.
    pub async fn shutdown(self) -> Result<(), SandboxError> {
        self.running.shutdown().await
    }
}

/// Adds a subscriber with the next id, refusing duplicates and invalid emails.
pub(crate) fn seed(shared: &Shared, subscriber: Subscriber) -> Result<Subscriber, SandboxError> {
    let email = subscriber.email.trim().to_string();
    if !model::valid_email(&email) {
        return Err(SandboxError::Seed(format!(
            "{email}: not a valid email address"
        )));
    }
    let mut state = shared.lock();
    if state.store.find(&email).is_some() {
        return Err(SandboxError::Seed(format!(
            "{email}: a subscriber with this email exists"
        )));
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

// The sandbox for the registry (`base_url = "sandbox"`, `contactsync sandbox
// poppulo`): the account and credentials of the connector settings when given,
// otherwise account `demo`, user `sandbox`, password `sandbox`.
contactsync_core::inventory::submit! {
    contactsync_core::SandboxFactory {
        name: "poppulo",
        start: |options| start_for_registry(options, config_from, PoppuloSandbox::start),
    }
}
