//! The sandbox's HTTP side: its shared state, the router (the kit's fault layer, log and
//! admin routes, and its own `/_sandbox/contacts` and `/_sandbox/clock`); `endpoint`
//! is the `.asmx` endpoint in SOAP 1.1 and 1.2 and its authentication, `contacts` the
//! operations.
//!
//! Requests are checked the way ASP.NET checks them (content type, `SOAPAction`,
//! envelope namespace, operation namespace) so that a client that gets any of them
//! wrong fails here and not first against a real site.

mod contacts;
mod endpoint;

use contacts::*;
use endpoint::*;

use std::sync::{Arc, MutexGuard};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};
use chrono_tz::Tz;
use serde::Deserialize;

use super::model::{
    email_is_acceptable, IncomingRecord, SandboxAddress, SandboxContact, SandboxCrmField,
    SandboxCrmForm, SandboxPhone, Store, MAX_BATCH,
};
use super::xml::{self, esc, SoapVersion, XmlNode, CRM_NS};
use super::{Faults, SoapCall};
use contactsync_sandbox_kit::{
    inject_faults, log_calls, Answers, Guarded, LogDetail, Platform, SandboxError, Wire,
};

/// The endpoint's path, compared case-insensitively.
pub const ENDPOINT_PATH: &str = "/catalystwebservice/catalystcrmwebservice.asmx";
const FAULT_PREFIX: &str = "Server was unable to process request. ---> ERROR: ";
const UNSET_DATE: &str = "0001-01-01T00:00:00";

/// What the sandbox accepts as credentials.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    pub site_id: i64,
    pub site_token: Option<String>,
}

/// The sandbox's clock: the system's, or one a test sets and advances.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    System,
    Fixed(DateTime<Utc>),
}

/// Everything mutable, behind one lock (never held across an await).
pub struct Inner {
    pub store: Store,
    pub clock: Clock,
    pub time_zone: Tz,
    pub faults: Faults,
}

impl Inner {
    /// Now, in the site's local time, to the millisecond.
    pub fn now_local(&self) -> NaiveDateTime {
        let utc = match self.clock {
            Clock::System => Utc::now(),
            Clock::Fixed(t) => t,
        };
        utc.with_timezone(&self.time_zone)
            .naive_local()
            .trunc_subsecs(3)
    }
}

/// State shared by every request and the Rust API.
pub struct Shared {
    pub credentials: Credentials,
    pub inner: Guarded<Inner>,
    pub wire: Arc<Wire>,
}

impl Shared {
    /// The state; see [`Guarded::lock`].
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// Saves the store to `data_file`, atomically.
    pub fn save(&self) -> Result<(), SandboxError> {
        self.inner.save(|inner| &inner.store)
    }

    /// Saves `store` (this sandbox's, under the lock the caller holds).
    pub fn save_store(&self, store: &Store) -> Result<(), SandboxError> {
        self.inner.data().save(|encode| encode(store))
    }
}

// The platform's own faults and data first; the wire is the kit's.
impl Platform for Shared {
    const NAME: &'static str = "Business Catalyst";
    type Faults = Faults;

    fn set_faults(&self, faults: Faults) {
        tracing::info!(?faults, "businesscatalyst sandbox: faults set");
        self.lock().faults = faults;
    }

    fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    fn reset(&self) {
        self.lock().store = Store::default();
    }

    fn save(&self) -> Result<(), SandboxError> {
        Shared::save(self)
    }

    fn wire(&self) -> &Wire {
        &self.wire
    }
}

/// How the service answers an injected throttle or server error: ASP.NET's plain
/// 503 and 500 pages, without a SOAP Fault.
pub const ANSWERS: Answers = Answers {
    throttled: || plain(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable"),
    failed: || plain(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error"),
};

/// The router: admin endpoints, and everything else to the SOAP endpoint.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .fallback(soap_endpoint)
        .layer(axum::middleware::from_fn_with_state(
            shared.wire.clone(),
            inject_faults,
        ))
        .layer(axum::middleware::from_fn_with_state(
            shared.wire.clone(),
            log_calls,
        ))
        .route("/_sandbox/contacts", get(get_contacts))
        .route("/_sandbox/clock", post(set_clock))
        .merge(contactsync_sandbox_kit::admin_routes(shared.clone()))
        .with_state(shared)
}

async fn get_contacts(State(shared): State<Arc<Shared>>) -> Json<Vec<SandboxContact>> {
    Json(shared.lock().store.contacts.clone())
}

/// Body of `POST /_sandbox/clock`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockRequest {
    /// Fix the clock at this instant.
    #[serde(default)]
    utc: Option<DateTime<Utc>>,
    /// Move the (fixed) clock forward by this many seconds.
    #[serde(default)]
    advance_secs: Option<i64>,
    /// Go back to the system clock.
    #[serde(default)]
    system: bool,
}

async fn set_clock(State(shared): State<Arc<Shared>>, Json(req): Json<ClockRequest>) -> StatusCode {
    let mut inner = shared.lock();
    if req.system {
        inner.clock = Clock::System;
    }
    if let Some(t) = req.utc {
        inner.clock = Clock::Fixed(t);
    }
    if let Some(secs) = req.advance_secs {
        let base = match inner.clock {
            Clock::System => Utc::now(),
            Clock::Fixed(t) => t,
        };
        inner.clock = Clock::Fixed(base + chrono::Duration::seconds(secs));
    }
    StatusCode::NO_CONTENT
}

/// A finished answer to a SOAP request, before it becomes an HTTP response.
enum Answer {
    Ok(String),
    Fault { sender: bool, text: String },
}

fn error_fault(message: impl AsRef<str>) -> Answer {
    Answer::Fault {
        sender: false,
        text: format!("{FAULT_PREFIX}{}", message.as_ref()),
    }
}

fn plain(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text.to_string(),
    )
        .into_response()
}
