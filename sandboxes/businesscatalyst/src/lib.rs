//! A fake Business Catalyst CRM web service, for tests and `base_url = "sandbox"`.
//!
//! It is a real HTTP server on loopback, written from `shared/specs/businesscatalyst.md`
//! with its own model ([`SandboxContact`]) and its own XML handling: it imports nothing
//! from the client, so that a misreading of the protocol cannot hide on both sides.
//!
//! What it does, and the choices the documents left open:
//! - Serves `POST /catalystwebservice/catalystcrmwebservice.asmx` (path
//!   case-insensitive) in SOAP 1.1 (`text/xml`, `SOAPAction` required and matching the
//!   operation) and SOAP 1.2 (`application/soap+xml`, an `action` parameter checked when
//!   given). Any other content type: **HTTP 415**, plain text.
//! - Faults come as HTTP 500 with `Server was unable to process request. ---> ERROR: …`.
//!   Bad username/password, or a `siteId` other than the configured one, faults every
//!   call. Site-token mode: an empty username with the configured token (or, when the
//!   configured username is empty, the configured password) as password.
//! - `ContactList_UpdateInsert`: more than 100 records, an invalid email address in a
//!   record, or a record whose email is in [`Faults::fault_on_emails`], faults the whole
//!   call and writes nothing (the message names the record). Matching: an `entityId`
//!   of a stored contact, else `externalId`, else `emailAddress` (case-insensitive);
//!   with neither, always added. A matched soft-deleted contact is revived. Absent
//!   elements keep their stored value, empty ones clear it; phones and addresses merge
//!   by type (an empty number/address removes that type). Out-of-order elements are
//!   ignored as XmlSerializer does, and listed in [`LoggedRequest::ignored_elements`].
//! - `ContactList_Retrieve`: `lastUpdateDate >= given`, ordered by last update then
//!   entity id, 100 per page, deleted ones with `deleted=true`.
//! - Deletes are soft: the contact is marked deleted and its `lastUpdateDate` bumped.
//!   `Contact_RetrieveBy*` do not see deleted contacts and leave the `…Result` element
//!   out when nothing matches; `Contact_DeleteBy*` answer `false` then.
//! - Dates are the site's local time without zone (the sandbox's [`SandboxConfig::time_zone`]),
//!   with milliseconds when they are not zero, from a clock tests can fix and advance.
//!
//! Admin endpoints: `POST`/`GET /_sandbox/faults` ([`Faults`] as JSON),
//! `GET`/`DELETE /_sandbox/requests` ([`LoggedRequest`]s), `GET /_sandbox/contacts`,
//! `POST /_sandbox/clock` (`{"utc": "…"}`, `{"advance_secs": 60}` or `{"system": true}`).

mod model;
mod server;
mod xml;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use contactsync_core::registry::SandboxStart;
use contactsync_core::{ConnectorError, RunningSandbox, SandboxOptions, SecretString};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use model::{
    SandboxAddress, SandboxContact, SandboxCrmField, SandboxCrmForm, SandboxPhone, MAX_BATCH,
    PAGE_SIZE,
};
pub use xml::SoapVersion;

use server::{Clock, Credentials, Inner, Shared};

/// Faults the sandbox injects, settable through [`Sandbox::set_faults`] or
/// `POST /_sandbox/faults`. Counters count every call to the SOAP endpoint, from 1.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Every Nth call answers HTTP 500 with a plain body and no SOAP Fault (0: never).
    pub http_500_every: u32,
    /// Every Nth call drops the connection after the headers (0: never).
    pub drop_every: u32,
    /// Every call waits this long before being processed.
    pub delay_ms: u64,
    /// A `ContactList_UpdateInsert` holding a record with one of these emails faults.
    pub fault_on_emails: Vec<String>,
}

/// One call to the SOAP endpoint, as the sandbox saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedRequest {
    /// The operation (`ContactList_Retrieve`), empty when unreadable.
    pub operation: String,
    /// The SOAP version spoken, when the content type said.
    pub soap_version: Option<SoapVersion>,
    /// The `lastUpdateDate` sent, as sent.
    pub last_update_date: Option<String>,
    /// The `recordStart` sent.
    pub record_start: Option<i64>,
    /// Records sent (`ContactList_UpdateInsert`) or returned (`ContactList_Retrieve`).
    pub records: usize,
    /// The HTTP status answered.
    pub status: u16,
    /// The fault text, when the call faulted.
    pub fault: Option<String>,
    /// The injected fault, when one was.
    pub injected: Option<String>,
    /// `ContactRecord` elements ignored because unknown or out of order.
    pub ignored_elements: Vec<String>,
    /// Whether the call changed the store.
    #[serde(skip)]
    pub wrote: bool,
}

/// How to start a [`Sandbox`].
#[derive(Clone)]
pub struct SandboxConfig {
    /// The accepted username (default `sandbox`; empty: site-token mode only).
    pub username: String,
    /// The accepted password (default `sandbox`).
    pub password: SecretString,
    /// The site id (default 1).
    pub site_id: i64,
    /// A site token accepted with an empty username (default none).
    pub site_token: Option<SecretString>,
    /// The site's time zone, in which dates are given (default UTC).
    pub time_zone: Tz,
    /// Where to persist contacts (JSON, replaced atomically); `None`: memory only.
    pub data_file: Option<PathBuf>,
    /// The loopback port; 0 picks a free one.
    pub port: u16,
    /// Contacts to start with (added after those loaded from `data_file`).
    pub contacts: Vec<SandboxContact>,
}

impl std::fmt::Debug for SandboxConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxConfig")
            .field("username", &self.username)
            .field("site_id", &self.site_id)
            .field("time_zone", &self.time_zone)
            .field("data_file", &self.data_file)
            .field("port", &self.port)
            .field("contacts", &self.contacts.len())
            .finish_non_exhaustive()
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            username: "sandbox".into(),
            password: SecretString::from("sandbox"),
            site_id: 1,
            site_token: None,
            time_zone: Tz::UTC,
            data_file: None,
            port: 0,
            contacts: Vec::new(),
        }
    }
}

/// Why the sandbox could not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The port could not be bound.
    #[error("cannot listen on 127.0.0.1:{port}: {source}")]
    Bind {
        /// The port asked for.
        port: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The data file could not be read or written.
    #[error("sandbox data file {}: {message}", path.display())]
    DataFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The server task failed.
    #[error("sandbox server failed: {0}")]
    Server(String),
}

/// A running sandbox. Dropping it without [`Sandbox::shutdown`] stops the server too.
pub struct Sandbox {
    base_url: String,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), SandboxError>>>,
    stop_on_drop: bool,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Starts a sandbox on 127.0.0.1. Must be called inside a tokio runtime.
    pub async fn start(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        use contactsync_core::ExposeSecret;
        let mut store = model::Store::default();
        if let Some(path) = &config.data_file {
            match std::fs::read(path) {
                Ok(bytes) => {
                    store = serde_json::from_slice(&bytes).map_err(|e| SandboxError::DataFile {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(SandboxError::DataFile {
                        path: path.clone(),
                        message: e.to_string(),
                    })
                }
            }
        }
        let mut inner = Inner {
            store,
            clock: Clock::System,
            time_zone: config.time_zone,
            faults: Faults::default(),
            calls: 0,
            log: Vec::new(),
        };
        if !config.contacts.is_empty() {
            let now = inner.now_local();
            inner.store.seed(config.contacts, now);
        }
        let shared = Arc::new(Shared {
            credentials: Credentials {
                username: config.username.clone(),
                password: config.password.expose_secret().to_string(),
                site_id: config.site_id,
                site_token: config
                    .site_token
                    .as_ref()
                    .map(|t| t.expose_secret().to_string()),
            },
            data_file: config.data_file.clone(),
            inner: Mutex::new(inner),
        });
        let listener =
            tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], config.port)))
                .await
                .map_err(|source| SandboxError::Bind {
                    port: config.port,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| SandboxError::Bind {
            port: config.port,
            source,
        })?;
        let base_url = format!("http://{addr}");
        let shutdown = CancellationToken::new();
        let app = server::router(shared.clone());
        let stop = shutdown.clone();
        let saver = shared.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .map_err(|e| SandboxError::Server(e.to_string()))?;
            let store = saver.lock().store.clone();
            if let Some(path) = &saver.data_file {
                server::save_store(path, &store).map_err(|e| SandboxError::DataFile {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            }
            Ok(())
        });
        tracing::info!(
            %base_url,
            username = %config.username,
            site_id = config.site_id,
            time_zone = %config.time_zone,
            data_file = ?config.data_file,
            "Business Catalyst sandbox listening (SOAP endpoint {base_url}{})",
            server::ENDPOINT_PATH
        );
        Ok(Sandbox {
            base_url,
            shared,
            shutdown,
            task: Some(task),
            stop_on_drop: true,
        })
    }

    /// The site URL to put in the connector's `base_url` (`http://127.0.0.1:PORT`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The accepted username.
    pub fn username(&self) -> &str {
        &self.shared.credentials.username
    }

    /// The accepted site id.
    pub fn site_id(&self) -> i64 {
        self.shared.credentials.site_id
    }

    /// Adds contacts as they are (ids and dates assigned when missing); returns their
    /// entity ids.
    pub fn seed(&self, contacts: Vec<SandboxContact>) -> Vec<i64> {
        let mut inner = self.shared.lock();
        let now = inner.now_local();
        let ids = inner.store.seed(contacts, now);
        if let Err(e) = self.shared.save(&inner.store) {
            tracing::error!(error = %e, "businesscatalyst sandbox: cannot save its data file");
        }
        ids
    }

    /// Every stored contact, deleted ones included, by entity id.
    pub fn contacts(&self) -> Vec<SandboxContact> {
        self.shared.lock().store.contacts.clone()
    }

    /// Every call to the SOAP endpoint so far, in order.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.shared.lock().log.clone()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.shared.lock().log.clear();
    }

    /// Fixes the clock at `now` (UTC); writes are stamped with it, in the site's zone.
    pub fn set_clock(&self, now: DateTime<Utc>) {
        self.shared.lock().clock = Clock::Fixed(now);
    }

    /// Moves the clock forward (fixing it first if it followed the system clock).
    pub fn advance_clock(&self, by: chrono::Duration) {
        let mut inner = self.shared.lock();
        let base = match inner.clock {
            Clock::System => Utc::now(),
            Clock::Fixed(t) => t,
        };
        inner.clock = Clock::Fixed(base + by);
    }

    /// Follows the system clock again.
    pub fn use_system_clock(&self) {
        self.shared.lock().clock = Clock::System;
    }

    /// Changes the site's time zone.
    pub fn set_time_zone(&self, tz: Tz) {
        self.shared.lock().time_zone = tz;
    }

    /// Sets the faults to inject (replacing the previous ones).
    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().faults = faults;
    }

    /// The faults being injected.
    pub fn faults(&self) -> Faults {
        self.shared.lock().faults.clone()
    }

    /// Stops the server and saves the data file.
    pub async fn shutdown(mut self) -> Result<(), SandboxError> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task
                .await
                .map_err(|e| SandboxError::Server(e.to_string()))?,
            None => Ok(()),
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.stop_on_drop {
            self.shutdown.cancel();
        }
    }
}

/// The sandbox's account when started for a connector section: parsed leniently,
/// because the section also holds the client's own settings.
#[derive(Deserialize, Default)]
struct SectionAccount {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<SecretString>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    site_id: Option<i64>,
    #[serde(default)]
    time_zone: Option<String>,
}

fn config_from_options(options: &SandboxOptions) -> Result<SandboxConfig, ConnectorError> {
    let mut config = SandboxConfig {
        data_file: options.data_file.clone(),
        port: options.port,
        ..SandboxConfig::default()
    };
    if let Some(settings) = &options.settings {
        let account: SectionAccount = settings.parse()?;
        config.username = account.username.unwrap_or_default();
        config.password = settings.secret(
            "password",
            account.password,
            account.password_file.as_deref(),
        )?;
        config.site_id = account.site_id.ok_or_else(|| {
            settings.error(
                "site_id",
                "missing: the sandbox needs the site id to accept",
            )
        })?;
        if let Some(tz) = account.time_zone {
            config.time_zone = tz.parse().map_err(|_| {
                settings.error("time_zone", format!("unknown IANA time zone {tz:?}"))
            })?;
        }
    }
    Ok(config)
}

/// The registry's entry point: starts a sandbox for [`SandboxOptions`]. With settings,
/// it accepts exactly their `username`, `password`/`password_file` and `site_id` (and
/// uses their `time_zone`); without, user `sandbox`, password `sandbox`, site 1, UTC.
pub fn start(options: SandboxOptions) -> SandboxStart {
    Box::pin(async move {
        let config = config_from_options(&options)?;
        let mut sandbox = Sandbox::start(config)
            .await
            .map_err(|e| ConnectorError::Other(e.to_string()))?;
        let shutdown = sandbox.shutdown.clone();
        let base_url = sandbox.base_url.clone();
        // The server keeps running until `shutdown` is cancelled (or the guard dropped);
        // its state lives on in the server task, which saves the data file as it stops.
        sandbox.stop_on_drop = false;
        drop(sandbox);
        Ok(RunningSandbox::new(base_url, shutdown))
    })
}

contactsync_core::inventory::submit! {
    contactsync_core::SandboxFactory { name: "businesscatalyst", start }
}
