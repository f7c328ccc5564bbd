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
//!   call and writes nothing (the message names the record). Matching, as the
//!   spec says: by `externalId` when a contact has it; else by `emailAddress`
//!   (case-insensitive) among contacts without an `externalId` (inferred: a web
//!   sign-up is linked by the first record that names it, and a contact that has an
//!   `externalId` is never taken over by another one's); with neither, always added.
//!   The `entityId` a record carries does not match anyone (inferred from the spec's
//!   silence). A matched soft-deleted contact is revived. Absent
//!   elements keep their stored value, empty ones clear it; phones and addresses merge
//!   by type (an empty number/address removes that type). Out-of-order elements are
//!   ignored as XmlSerializer does, and listed in [`SoapCall::ignored_elements`].
//! - `ContactList_Retrieve`: `lastUpdateDate >= given`, ordered by last update then
//!   entity id, 100 per page, deleted ones with `deleted=true`.
//! - Deletes are soft: the contact is marked deleted and its `lastUpdateDate` bumped.
//!   `Contact_RetrieveBy*` do not see deleted contacts and, as the service does, answer
//!   a Retrieve that finds nobody with a fault (`Server was unable to process request.
//!   ---> ERROR: Contact record could not be retrieved.`); `Contact_DeleteBy*` answer
//!   `false` then.
//! - Dates are the site's local time without zone (the sandbox's [`SandboxConfig::time_zone`]),
//!   with milliseconds when they are not zero, from a clock tests can fix and advance.
//!
//! Admin endpoints: the kit's `POST`/`GET /_sandbox/faults` ([`Faults`] and the
//! [`WireFaults`] as one JSON object), `GET`/`DELETE /_sandbox/requests` (the kit's log;
//! each entry's `detail` is a [`SoapCall`]) and `POST /_sandbox/reset`; and its own
//! `GET /_sandbox/contacts`, `POST /_sandbox/clock` (`{"utc": "…"}`,
//! `{"advance_secs": 60}` or `{"system": true}`).

mod model;
mod server;
mod xml;

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use contactsync_core::registry::RunningSandbox;
use contactsync_core::{CancellationToken, ConnectorError, SandboxOptions, SecretString};
use contactsync_sandbox_kit::data::DataFile;
use contactsync_sandbox_kit::{start_for_registry, Guarded, Platform, Running, Wire};
use serde::{Deserialize, Serialize};

pub use contactsync_sandbox_kit::{Injected, SandboxError, WireFaults};

pub use model::{
    SandboxAddress, SandboxContact, SandboxCrmField, SandboxCrmForm, SandboxPhone, MAX_BATCH,
    PAGE_SIZE,
};
pub use xml::SoapVersion;

use server::{Clock, Credentials, Inner, Shared};

/// Business Catalyst faults, settable through [`Sandbox::set_faults`] or
/// `POST /_sandbox/faults` (in one object with the kit's [`WireFaults`]: a server error
/// is HTTP 500 with a plain body and no SOAP Fault; a drop closes the connection).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// A `ContactList_UpdateInsert` holding a record with one of these emails faults.
    pub fault_on_emails: Vec<String>,
    /// `ContactList_Retrieve` answers leave `moreRecords` out (a proxy or a service
    /// version that drops it): a client must not take that for the last page.
    pub omit_more_records: bool,
    /// Records changing while a client pages: while this count lasts, each
    /// `ContactList_Retrieve` past the first page (`recordStart` > 0) first edits the
    /// contact at the head of the list being paged, as staff would (its first name
    /// gains ` (edited)` and its `lastUpdateDate` moves to now, after every other), so
    /// that it moves to the end and the records behind it shift back by one: a client
    /// paging by offset skips one.
    pub edit_while_paging: u32,
    /// The service's own trouble: while this count lasts, each
    /// `ContactList_UpdateInsert` faults as the service does on a transient server
    /// error (a SOAP fault naming no record: "A database error occurred…") and writes
    /// nothing.
    pub transient_faults: u32,
}

/// One call to the SOAP endpoint, as the sandbox saw it (the kit's log entry, with the
/// SOAP details the handler added).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoapCall {
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
    pub injected: Option<Injected>,
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

/// A running sandbox. Dropping it stops the server (best effort); call
/// [`Sandbox::shutdown`] to wait for it and its final save.
#[derive(Debug)]
pub struct Sandbox {
    running: Running<Shared>,
}

/// Detached: the server runs on under the registry's handle.
impl From<Sandbox> for RunningSandbox {
    fn from(sandbox: Sandbox) -> Self {
        sandbox.running.detach()
    }
}

impl Sandbox {
    /// Starts a sandbox on 127.0.0.1. Must be called inside a tokio runtime.
    pub async fn start(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        use contactsync_core::ExposeSecret;
        let data = DataFile::new(<server::Shared as Platform>::NAME, config.data_file.clone());
        let store = data.load()?.unwrap_or_default();
        let mut inner = Inner {
            store,
            clock: Clock::System,
            time_zone: config.time_zone,
            faults: Faults::default(),
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
            inner: Guarded::new(inner, data),
            wire: Arc::new(Wire::new(server::ANSWERS, WireFaults::default())),
        });
        let app = server::router(shared.clone());
        let running =
            contactsync_sandbox_kit::start(shared, CancellationToken::new(), config.port, "", app)
                .await?;
        tracing::info!(
            username = %config.username,
            site_id = config.site_id,
            time_zone = %config.time_zone,
            data_file = ?config.data_file,
            "Business Catalyst SOAP endpoint {}{}",
            running.base_url(),
            server::ENDPOINT_PATH
        );
        Ok(Sandbox { running })
    }

    fn shared(&self) -> &Shared {
        self.running.platform()
    }

    pub fn base_url(&self) -> &str {
        self.running.base_url()
    }

    /// The accepted username.
    pub fn username(&self) -> &str {
        &self.shared().credentials.username
    }

    /// The accepted site id.
    pub fn site_id(&self) -> i64 {
        self.shared().credentials.site_id
    }

    /// Adds contacts as they are (ids and dates assigned when missing); returns their
    /// entity ids.
    pub fn seed(&self, contacts: Vec<SandboxContact>) -> Vec<i64> {
        let mut inner = self.shared().lock();
        let now = inner.now_local();
        let ids = inner.store.seed(contacts, now);
        drop(inner);
        self.shared().save_logged();
        ids
    }

    /// Every stored contact, deleted ones included, by entity id.
    pub fn contacts(&self) -> Vec<SandboxContact> {
        self.shared().lock().store.contacts.clone()
    }

    /// Every call to the SOAP endpoint so far, in order.
    pub fn requests(&self) -> Vec<SoapCall> {
        self.running
            .wire()
            .requests()
            .into_iter()
            .map(|logged| {
                let mut call = logged
                    .detail
                    .and_then(|detail| serde_json::from_value::<SoapCall>(detail).ok())
                    .unwrap_or_default();
                call.status = logged.status;
                call.injected = logged.injected;
                call
            })
            .collect()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.running.wire().clear_requests();
    }

    /// Fixes the clock at `now` (UTC); writes are stamped with it, in the site's zone.
    pub fn set_clock(&self, now: DateTime<Utc>) {
        self.shared().lock().clock = Clock::Fixed(now);
    }

    /// Moves the clock forward (fixing it first if it followed the system clock).
    pub fn advance_clock(&self, by: chrono::Duration) {
        let mut inner = self.shared().lock();
        let base = match inner.clock {
            Clock::System => Utc::now(),
            Clock::Fixed(t) => t,
        };
        inner.clock = Clock::Fixed(base + by);
    }

    /// Follows the system clock again.
    pub fn use_system_clock(&self) {
        self.shared().lock().clock = Clock::System;
    }

    /// Changes the site's time zone.
    pub fn set_time_zone(&self, tz: Tz) {
        self.shared().lock().time_zone = tz;
    }

    /// Sets the faults to inject (replacing the previous ones).
    pub fn set_faults(&self, faults: Faults) {
        self.shared().lock().faults = faults;
    }

    /// Replaces the wire faults (HTTP 500s, dropped connections, delays); call numbers
    /// count from now.
    pub fn set_wire_faults(&self, faults: WireFaults) {
        self.running.wire().set_faults(faults);
    }

    /// The current wire faults.
    pub fn wire_faults(&self) -> WireFaults {
        self.running.wire().faults()
    }

    /// The faults being injected.
    pub fn faults(&self) -> Faults {
        self.shared().lock().faults.clone()
    }

    /// Stops the server and saves the data file.
    pub async fn shutdown(self) -> Result<(), SandboxError> {
        self.running.shutdown().await
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

// The sandbox for the registry. With settings,
// it accepts exactly their `username`, `password`/`password_file` and `site_id` (and
// uses their `time_zone`); without, user `sandbox`, password `sandbox`, site 1, UTC.
contactsync_core::inventory::submit! {
    contactsync_core::SandboxFactory {
        name: "businesscatalyst",
        start: |options| start_for_registry(options, config_from_options, Sandbox::start),
    }
}
