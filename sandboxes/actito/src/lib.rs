//! An Actito (v4) sandbox: a small HTTP server on loopback that behaves like the
//! documented API, so that the Actito connector and end-to-end tests run with no
//! network and no licence.
//!
//! It is written from `shared/specs/actito.md` and the seed, never from the client's
//! code: the two share no types. It enforces the documented rules, since a sandbox
//! that accepts anything proves nothing: tokens from the API key that expire (401
//! after), entity and table by name (404 otherwise), the table's structure on every
//! write (400 with `{"status":400,"message":…}`), 5 requests in flight (429 for the
//! 6th), 12 bulk imports per table per UTC day (429 for the 13th), zips of at most
//! 100 MB (400), imports processed one after another by a single FIFO worker, and 406
//! for an `Accept` it cannot serve.
//!
//! Start reading from [`ActitoSandbox::start`]; [`Faults`] injects failures, [`Stats`]
//! counts what it saw.
//!
//! Inferred choices (the spec is silent):
//! - Listing: `GET …/profile?search=attr=value&number=N&page=P`: `search` optional,
//!   `number` 1..=1000 (default 100; larger is capped), `page` from 0, profiles in id
//!   order; the answer also carries `totalCount`, `page` and `number`.
//! - Create answers 201 (+`Location`), update 200, both `{"profileId":n}`; delete and
//!   unsubscribe answer 200 with `{"profileId":n}`. A `null` attribute value clears it.
//! - Import status `{"id","status":"WAITING|RUNNING|FINISHED|ERROR",…}`; result
//!   `{"withErrors","rowsInError","totalRows","createdProfiles","updatedProfiles"}`;
//!   result-file: a zip holding `errors.csv`: the rejected rows under the import's own
//!   header plus an `errorMessage` column, in the import's delimiter. An empty cell
//!   clears the attribute; the key column must have a value.
//! - An `Accept` is served when it is absent or admits `application/json` (the
//!   result-file: `application/zip` or `application/octet-stream`) or a wildcard.

mod faults;
mod import;
mod model;
mod routes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use contactsync_core::registry::{RunningSandbox, SandboxOptions};
use contactsync_core::{CancellationToken, ExposeSecret, SecretString};
use contactsync_sandbox_kit::data::DataFile;
use contactsync_sandbox_kit::{start_for_registry, Answers, Guarded, Platform, Running, Wire};
use serde::Deserialize;

pub use contactsync_sandbox_kit::{LoggedRequest, SandboxError, WireFaults};
pub use faults::{Faults, Stats};
pub use model::{
    Attribute, Import, ImportMode, ImportStatus, Profile, ProfileInput, Segmentation, TableDef,
    ValueRestriction,
};

use model::Store;

/// Default API key when the sandbox is started without connector settings.
pub const DEFAULT_API_KEY: &str = "sandbox-key";
/// Default entity name.
pub const DEFAULT_ENTITY: &str = "demo";
/// Default profile table name.
pub const DEFAULT_TABLE: &str = "contacts";

/// How to run the sandbox.
#[derive(Clone)]
pub struct SandboxConfig {
    /// The API key `GET /auth/token` accepts.
    pub api_key: String,
    /// The entity's name.
    pub entity: String,
    /// The entity's profile tables (used only when the data file has none).
    pub tables: Vec<TableDef>,
    /// The loopback port; 0 picks a free one.
    pub port: u16,
    /// Where to keep the data between runs; `None`: in memory only.
    pub data_file: Option<PathBuf>,
    /// How long a token lives (Actito: 15 minutes).
    pub token_lifetime: Duration,
    /// Requests in flight before a 429 (Actito: 5).
    pub max_concurrent: usize,
    /// Bulk imports per table per UTC day (Actito: 12).
    pub bulk_per_day: u32,
    /// Largest zip accepted (Actito: 100 MB).
    pub max_zip_bytes: usize,
    /// How long the worker spends on each import before processing its rows, so
    /// that tests can see it WAITING or RUNNING.
    pub import_delay: Duration,
    /// Platform faults from the start.
    pub faults: Faults,
    /// Wire faults (throttling, server errors, delays, lost answers) from the start.
    pub wire_faults: WireFaults,
}

impl std::fmt::Debug for SandboxConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxConfig")
            .field("api_key", &"[redacted]")
            .field("entity", &self.entity)
            .field("tables", &self.tables)
            .field("port", &self.port)
            .field("data_file", &self.data_file)
            .field("token_lifetime", &self.token_lifetime)
            .field("max_concurrent", &self.max_concurrent)
            .finish()
    }
}

impl Default for SandboxConfig {
    /// Key `sandbox-key`, entity `demo`, one table `contacts` with
    /// [`TableDef::default_named`]'s structure, the documented limits.
    fn default() -> Self {
        SandboxConfig {
            api_key: DEFAULT_API_KEY.to_string(),
            entity: DEFAULT_ENTITY.to_string(),
            tables: vec![TableDef::default_named(DEFAULT_TABLE)],
            port: 0,
            data_file: None,
            token_lifetime: Duration::from_secs(900),
            max_concurrent: 5,
            bulk_per_day: 12,
            max_zip_bytes: 100 * 1024 * 1024,
            import_delay: Duration::from_millis(50),
            faults: Faults::default(),
            wire_faults: WireFaults::default(),
        }
    }
}

/// What changes while the sandbox runs.
#[derive(Debug)]
pub(crate) struct State {
    pub store: Store,
    pub tokens: HashMap<String, Instant>,
    pub stats: Stats,
    /// What is left of [`Faults::delete_while_paging`].
    pub delete_while_paging: u32,
    /// What is left of [`Faults::replace_while_paging`].
    pub replace_while_paging: u32,
    /// What is left of [`Faults::busy_licence`].
    pub busy_licence: u32,
}

/// What the handlers and the import worker share.
pub(crate) struct Shared {
    pub config: SandboxConfig,
    pub state: Guarded<State>,
    pub in_flight: AtomicU64,
    pub queue: tokio::sync::mpsc::UnboundedSender<u64>,
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

    /// The counters so far, with the wire's count of requests.
    pub fn stats(&self) -> Stats {
        let mut stats = self.lock().stats.clone();
        let counts = self.wire.counts();
        stats.requests = counts.requests;
        stats.slowed = counts.slowed;
        stats
    }
}

impl Platform for Shared {
    const NAME: &'static str = "Actito";
    type Faults = Faults;

    fn wire(&self) -> &Wire {
        &self.wire
    }

    /// Expiring tokens is done at once, so that fault never stays set.
    fn faults(&self) -> Faults {
        let state = self.lock();
        Faults {
            delete_while_paging: state.delete_while_paging,
            replace_while_paging: state.replace_while_paging,
            busy_licence: state.busy_licence,
            ..Faults::default()
        }
    }

    fn set_faults(&self, faults: Faults) {
        {
            let mut state = self.lock();
            state.delete_while_paging = faults.delete_while_paging;
            state.replace_while_paging = faults.replace_while_paging;
            state.busy_licence = faults.busy_licence;
        }
        if faults.expire_tokens_now {
            let now = Instant::now();
            for expiry in self.lock().tokens.values_mut() {
                *expiry = now;
            }
        }
    }

    fn reset(&self) {
        let mut state = self.lock();
        state.store = Store::new(&self.config.tables);
        state.tokens.clear();
        state.stats = Stats::default();
        state.delete_while_paging = 0;
        state.replace_while_paging = 0;
        state.busy_licence = 0;
    }

    fn save(&self) -> Result<(), SandboxError> {
        Shared::save(self)
    }
}

/// How Actito words a throttled answer and a server error.
const ANSWERS: Answers = Answers {
    throttled: || {
        routes::error(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too many requests (injected)",
        )
    },
    failed: || {
        routes::error(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal error (injected)",
        )
    },
};

/// Starts Actito sandboxes.
#[derive(Debug)]
pub struct ActitoSandbox;

impl ActitoSandbox {
    /// Loads the data file (if any), binds `127.0.0.1:port`, re-queues unfinished
    /// imports, and serves until [`RunningActito::shutdown`] (or drop).
    pub async fn start(config: SandboxConfig) -> Result<RunningActito, SandboxError> {
        let data = DataFile::new(<Shared as Platform>::NAME, config.data_file.clone());
        let store = Store::loaded(data.load()?, &config.tables);
        let (queue, receiver) = tokio::sync::mpsc::unbounded_channel();
        let unfinished: Vec<u64> = store
            .imports
            .values()
            .filter(|i| matches!(i.status, ImportStatus::Waiting | ImportStatus::Running))
            .map(|i| i.id)
            .collect();
        let faults = config.faults.clone();
        let port = config.port;
        let shared = Arc::new(Shared {
            wire: Arc::new(Wire::new(ANSWERS, config.wire_faults.clone())),
            config,
            state: Guarded::new(
                State {
                    store,
                    tokens: HashMap::new(),
                    stats: Stats::default(),
                    delete_while_paging: 0,
                    replace_while_paging: 0,
                    busy_licence: 0,
                },
                data,
            ),
            in_flight: AtomicU64::new(0),
            queue,
            shutdown: CancellationToken::new(),
        });
        Platform::set_faults(&*shared, faults);
        for id in unfinished {
            // The receiver is alive: the worker is spawned just below.
            let _ = shared.queue.send(id);
        }
        tokio::spawn(import::worker(shared.clone(), receiver));
        let router = routes::router(shared.clone());
        let shutdown = shared.shutdown.clone();
        let running =
            contactsync_sandbox_kit::start(shared.clone(), shutdown, port, "", router).await?;
        Ok(RunningActito { running })
    }
}

/// A running sandbox. Dropping it stops the server.
#[derive(Debug)]
pub struct RunningActito {
    running: Running<Shared>,
}

/// Detached: the server runs on under the registry's handle.
impl From<RunningActito> for RunningSandbox {
    fn from(sandbox: RunningActito) -> Self {
        sandbox.running.detach()
    }
}

impl RunningActito {
    /// The API base, `http://127.0.0.1:PORT` (`/auth/token`, `/v4/…` follow it).
    pub fn base_url(&self) -> &str {
        self.running.base_url()
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.running.addr()
    }

    fn shared(&self) -> &Shared {
        self.running.platform()
    }

    /// The API key it accepts.
    pub fn api_key(&self) -> &str {
        &self.shared().config.api_key
    }

    /// The entity's name.
    pub fn entity(&self) -> &str {
        &self.shared().config.entity
    }

    /// The first table's name.
    pub fn table(&self) -> String {
        self.shared()
            .lock()
            .store
            .tables
            .keys()
            .next()
            .cloned()
            .unwrap_or_default()
    }

    /// Applies platform faults (expiring tokens).
    pub fn set_faults(&self, faults: Faults) {
        Platform::set_faults(self.shared(), faults);
    }

    /// Expires every token issued so far.
    pub fn expire_tokens(&self) {
        let faults = Platform::faults(self.shared());
        self.set_faults(Faults {
            expire_tokens_now: true,
            ..faults
        });
    }

    /// Replaces the wire faults (429s, 500s, delays, lost answers); call numbers count
    /// from now.
    pub fn set_wire_faults(&self, faults: WireFaults) {
        self.running.wire().set_faults(faults);
    }

    /// The current wire faults.
    pub fn wire_faults(&self) -> WireFaults {
        self.running.wire().faults()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.shared().stats()
    }

    /// Every API request logged, oldest first.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.running.wire().requests()
    }

    pub fn profiles(&self, table: &str) -> Vec<Profile> {
        self.shared()
            .lock()
            .store
            .tables
            .get(table)
            .map(|t| t.profiles.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The profile of `table` whose `attribute` is `value`.
    pub fn profile_where(&self, table: &str, attribute: &str, value: &str) -> Option<Profile> {
        self.profiles(table)
            .into_iter()
            .find(|p| p.attributes.get(attribute).map(String::as_str) == Some(value))
    }

    /// A snapshot of every import, oldest first.
    pub fn imports(&self) -> Vec<Import> {
        self.shared()
            .lock()
            .store
            .imports
            .values()
            .cloned()
            .collect()
    }

    /// Sets how many bulk imports `table` has had today (UTC), to test the quota.
    pub fn set_bulk_count_today(&self, table: &str, count: u32) {
        let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
        if let Some(t) = self.shared().lock().store.tables.get_mut(table) {
            t.bulk_days.insert(day, count);
        }
    }

    /// Adds or updates a profile of `table` as if written through the API (the same
    /// checks apply); returns its id. It is also how a test makes what people and staff
    /// do in Actito happen: a person unsubscribing, an administrator editing an
    /// attribute.
    pub fn seed_profile(&self, table: &str, input: &ProfileInput) -> Result<u64, SandboxError> {
        let now = import::now();
        let id = {
            let mut state = self.shared().lock();
            let store = &mut state.store;
            let mut next = store.next_profile_id;
            let t = store
                .tables
                .get_mut(table)
                .ok_or_else(|| SandboxError::Seed(format!("no table {table}")))?;
            let (id, _) = t
                .write(input, true, true, &mut next, &now)
                .map_err(SandboxError::Seed)?;
            store.next_profile_id = next;
            id
        };
        self.shared().save()?;
        Ok(id)
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

#[derive(Debug, Deserialize)]
struct ConnectorSection {
    api_key: Option<SecretString>,
    api_key_file: Option<PathBuf>,
    entity: Option<String>,
    table: Option<String>,
}

fn config_from(options: &SandboxOptions) -> Result<SandboxConfig, SandboxError> {
    let mut config = SandboxConfig {
        port: options.port,
        data_file: options.data_file.clone(),
        ..SandboxConfig::default()
    };
    if let Some(settings) = &options.settings {
        let section: ConnectorSection = settings.parse()?;
        if section.api_key.is_some() || section.api_key_file.is_some() {
            let key =
                settings.secret("api_key", section.api_key, section.api_key_file.as_deref())?;
            config.api_key = key.expose_secret().to_string();
        }
        if let Some(entity) = section.entity.filter(|e| !e.trim().is_empty()) {
            config.entity = entity.trim().to_string();
        }
        if let Some(table) = section.table.filter(|t| !t.trim().is_empty()) {
            config.tables = vec![TableDef::default_named(table.trim())];
        }
    }
    Ok(config)
}

// The sandbox for the registry (`base_url = "sandbox"`, `contactsync sandbox
// actito`): the key, entity and table of the connector settings when given,
// otherwise key `sandbox-key`, entity `demo`, table `contacts`.
contactsync_core::inventory::submit! {
    contactsync_core::SandboxFactory {
        name: "actito",
        start: |options| start_for_registry(options, config_from, ActitoSandbox::start),
    }
}
