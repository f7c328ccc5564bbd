//! The sandbox's HTTP side: the `.asmx` endpoint in SOAP 1.1 and 1.2, the admin
//! endpoints under `/_sandbox/`, authentication, fault injection and the request log.
//!
//! Requests are checked the way ASP.NET checks them (content type, `SOAPAction`,
//! envelope namespace, operation namespace) so that a client that gets any of them
//! wrong fails here and not first against a real site.

use std::sync::{Arc, Mutex, MutexGuard};

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
use contactsync_sandbox_kit::data::DataFile;
use contactsync_sandbox_kit::{
    inject_faults, log_calls, Answers, LogDetail, Platform, SandboxError, Wire,
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
    pub data: DataFile,
    pub inner: Mutex<Inner>,
    pub wire: Arc<Wire>,
}

impl Shared {
    /// The lock, recovered if a previous holder panicked (the data is still consistent:
    /// every write is completed before the lock is released).
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Saves the store to `data_file`, atomically.
    pub fn save(&self) -> Result<(), SandboxError> {
        self.save_store(&self.lock().store)
    }

    /// Saves `store` (this sandbox's, under the lock the caller holds).
    pub fn save_store(&self, store: &Store) -> Result<(), SandboxError> {
        self.data.save(|encode| encode(store))
    }

    /// Saves, logging a failure (for saves nobody waits for).
    pub fn save_logged(&self) {
        if let Err(e) = self.save() {
            tracing::error!("Business Catalyst sandbox could not save its data: {e}");
        }
    }
}

impl Platform for Shared {
    const NAME: &'static str = "Business Catalyst";
    type Faults = Faults;

    fn wire(&self) -> &Wire {
        &self.wire
    }

    fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    fn set_faults(&self, faults: Faults) {
        tracing::info!(?faults, "businesscatalyst sandbox: faults set");
        self.lock().faults = faults;
    }

    fn reset(&self) {
        self.lock().store = Store::default();
    }

    fn save(&self) -> Result<(), SandboxError> {
        Shared::save(self)
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

async fn soap_endpoint(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !uri.path().eq_ignore_ascii_case(ENDPOINT_PATH) {
        return plain(StatusCode::NOT_FOUND, "not found");
    }
    if method == Method::GET {
        return plain(
            StatusCode::OK,
            "Business Catalyst CRM web service sandbox: POST SOAP 1.1 or 1.2 requests here.",
        );
    }
    if method != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only POST is served here");
    }

    let mut entry = SoapCall::default();
    let mut response = handle_soap(&shared, &headers, &body, &mut entry);
    if entry.status == 0 {
        entry.status = response.status().as_u16();
    }
    tracing::debug!(operation = %entry.operation, status = entry.status, "businesscatalyst sandbox: request");
    if let Ok(detail) = serde_json::to_value(&entry) {
        response.extensions_mut().insert(LogDetail(detail));
    }
    response
}

fn handle_soap(
    shared: &Shared,
    headers: &HeaderMap,
    body: &[u8],
    entry: &mut SoapCall,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut parts = content_type.split(';').map(str::trim);
    let media = parts.next().unwrap_or("").to_ascii_lowercase();
    let version = match media.as_str() {
        "text/xml" => SoapVersion::V11,
        "application/soap+xml" => SoapVersion::V12,
        _ => {
            entry.status = 415;
            return plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "expected Content-Type text/xml (SOAP 1.1) or application/soap+xml (SOAP 1.2)",
            );
        }
    };
    entry.soap_version = Some(version);
    let action_param = parts
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("action"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string());
    let answer = process(shared, version, headers, action_param, body, entry);
    let (status, xml_body) = match answer {
        Answer::Ok(inner) => (StatusCode::OK, xml::envelope(version, &inner)),
        Answer::Fault { sender, text } => {
            entry.fault = Some(text.clone());
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                xml::fault(version, sender, &text),
            )
        }
    };
    (
        status,
        [(header::CONTENT_TYPE, version.content_type())],
        xml_body,
    )
        .into_response()
}

fn process(
    shared: &Shared,
    version: SoapVersion,
    headers: &HeaderMap,
    action_param: Option<String>,
    body: &[u8],
    entry: &mut SoapCall,
) -> Answer {
    let sender_fault = |text: String| Answer::Fault { sender: true, text };
    let Ok(text) = std::str::from_utf8(body) else {
        return sender_fault("The request body is not UTF-8.".into());
    };
    let root = match xml::parse_document(text) {
        Ok(root) => root,
        Err(e) => return sender_fault(format!("Server was unable to read request. ---> {e}")),
    };
    if root.name != "Envelope" || (root.ns != xml::SOAP11_NS && root.ns != xml::SOAP12_NS) {
        return sender_fault("The root element is not a SOAP Envelope.".into());
    }
    if root.ns != version.namespace() {
        return sender_fault(format!(
            "VersionMismatch: the envelope namespace {} does not go with this Content-Type.",
            root.ns
        ));
    }
    let Some(op) = root
        .children
        .iter()
        .find(|c| c.ns == root.ns && c.name == "Body")
        .and_then(|b| b.children.first())
    else {
        return sender_fault("The SOAP Body is missing or empty.".into());
    };
    entry.operation = op.name.clone();
    if op.ns != CRM_NS {
        return sender_fault(format!(
            "Server did not recognize the value of HTTP Header SOAPAction or the operation {{{}}}{}.",
            op.ns, op.name
        ));
    }
    let expected_action = format!("{CRM_NS}/{}", op.name);
    let action = match version {
        SoapVersion::V11 => match headers.get("soapaction").and_then(|v| v.to_str().ok()) {
            Some(v) => Some(v.trim().trim_matches('"').to_string()),
            None => return sender_fault("The SOAPAction header is required for SOAP 1.1.".into()),
        },
        SoapVersion::V12 => action_param,
    };
    if let Some(action) = action {
        if action != expected_action {
            return sender_fault(format!(
                "Server did not recognize the value of HTTP Header SOAPAction: {action}."
            ));
        }
    }
    entry.last_update_date = op.crm_text("lastUpdateDate").map(String::from);
    entry.record_start = op.crm_text("recordStart").and_then(|v| v.parse().ok());

    if let Some(fault) = authenticate(&shared.credentials, op) {
        return fault;
    }
    let mut inner = shared.lock();
    let answer = dispatch(&mut inner, op, entry);
    if entry.wrote {
        if let Err(e) = shared.save_store(&inner.store) {
            tracing::error!(error = %e, "businesscatalyst sandbox: cannot save its data file");
            return error_fault(format!("storage failure: {e}"));
        }
    }
    answer
}

fn authenticate(credentials: &Credentials, op: &XmlNode) -> Option<Answer> {
    let username = op.crm_text("username").unwrap_or("");
    let password = op.crm_text("password").unwrap_or("");
    let site_ok = match op.crm_text("siteId").map(str::parse::<i64>) {
        Some(Ok(id)) => id == credentials.site_id,
        Some(Err(_)) => return Some(error_fault("siteId must be an integer.")),
        None => false,
    };
    let login_ok = if username.is_empty() {
        credentials.username.is_empty() && password == credentials.password
            || credentials.site_token.as_deref() == Some(password) && !password.is_empty()
    } else {
        username == credentials.username && password == credentials.password
    };
    if !login_ok {
        return Some(error_fault("Invalid username or password."));
    }
    if !site_ok {
        return Some(error_fault(
            "Invalid siteId, or the user has no access to this site.",
        ));
    }
    None
}

fn dispatch(inner: &mut Inner, op: &XmlNode, entry: &mut SoapCall) -> Answer {
    let name = op.name.as_str();
    match name {
        "ContactList_Retrieve" => retrieve_list(inner, op, entry),
        "ContactList_UpdateInsert" => update_insert(inner, op, entry),
        "Contact_RetrieveByEntityID" => {
            let Some(id) = op.crm_text("entityId").and_then(|v| v.parse::<i64>().ok()) else {
                return error_fault("entityId must be an integer.");
            };
            single_result(name, inner.store.by_entity_id(id))
        }
        "Contact_RetrieveByExternalID" => {
            let ext = op.crm_text("externalId").unwrap_or("");
            single_result(name, inner.store.by_external_id(ext))
        }
        "Contact_RetrieveByEmailAddress" => {
            let email = op
                .crm_text("emailAddress")
                .or(op.crm_text("email"))
                .unwrap_or("");
            single_result(name, inner.store.by_email(email))
        }
        "Contact_DeleteByEntityID" => {
            let Some(id) = op.crm_text("entityId").and_then(|v| v.parse::<i64>().ok()) else {
                return error_fault("entityId must be an integer.");
            };
            let now = inner.now_local();
            let done = inner.store.delete_entity(id, now);
            entry.wrote = done;
            bool_result(name, done)
        }
        "Contact_DeleteByEmailAddress" => {
            let email = op
                .crm_text("email")
                .or(op.crm_text("emailAddress"))
                .unwrap_or("");
            let now = inner.now_local();
            let id = inner.store.by_email(email).map(|c| c.entity_id);
            let done = id.is_some_and(|id| inner.store.delete_entity(id, now));
            entry.wrote = done;
            bool_result(name, done)
        }
        other => Answer::Fault {
            sender: true,
            text: format!(
                "Server did not recognize the value of HTTP Header SOAPAction: {CRM_NS}/{other}."
            ),
        },
    }
}

fn bool_result(op: &str, value: bool) -> Answer {
    Answer::Ok(format!(
        "<{op}Response xmlns=\"{CRM_NS}\"><{op}Result>{value}</{op}Result></{op}Response>"
    ))
}

/// A `Contact_RetrieveBy*` answer; no contact: the result element is left out (what
/// XmlSerializer does for a null object).
fn single_result(op: &str, contact: Option<&SandboxContact>) -> Answer {
    let inner = contact
        .map(|c| format!("<{op}Result>{}</{op}Result>", contact_fields(c)))
        .unwrap_or_default();
    Answer::Ok(format!(
        "<{op}Response xmlns=\"{CRM_NS}\">{inner}</{op}Response>"
    ))
}

/// Parses a date as the service would: site-local, with or without fraction; a
/// zoned value is converted into the site's zone; a bare date means midnight.
fn parse_date(value: &str, tz: Tz) -> Option<NaiveDateTime> {
    let value = value.trim();
    if let Ok(d) = NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(d);
    }
    if let Ok(d) = DateTime::parse_from_rfc3339(value) {
        return Some(d.with_timezone(&tz).naive_local());
    }
    chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
}

fn format_date(date: Option<NaiveDateTime>) -> String {
    match date {
        None => UNSET_DATE.to_string(),
        Some(d) if d.and_utc().timestamp_subsec_millis() == 0 => {
            d.format("%Y-%m-%dT%H:%M:%S").to_string()
        }
        Some(d) => d.format("%Y-%m-%dT%H:%M:%S%.3f").to_string(),
    }
}

fn retrieve_list(inner: &mut Inner, op: &XmlNode, entry: &mut SoapCall) -> Answer {
    let since = match op.crm_text("lastUpdateDate") {
        None | Some("") => None,
        Some(v) => match parse_date(v, inner.time_zone) {
            Some(d) => Some(d),
            None => return error_fault(format!("lastUpdateDate {v:?} is not a date.")),
        },
    };
    let since = since.unwrap_or(NaiveDateTime::MIN);
    let start = match op.crm_text("recordStart").map(str::parse::<i64>) {
        None => 0,
        Some(Ok(n)) if n >= 0 => n,
        Some(_) => return error_fault("recordStart must be a non-negative integer."),
    };
    let start = usize::try_from(start).unwrap_or(usize::MAX);
    let (page, more) = inner.store.list_since(since, start);
    entry.records = page.len();
    let records: String = page
        .iter()
        .map(|c| format!("<ContactRecord>{}</ContactRecord>", contact_fields(c)))
        .collect();
    Answer::Ok(format!(
        "<ContactList_RetrieveResponse xmlns=\"{CRM_NS}\"><ContactList_RetrieveResult>{records}\
         </ContactList_RetrieveResult><recordStart>{start}</recordStart><moreRecords>{more}</moreRecords>\
         </ContactList_RetrieveResponse>"
    ))
}

fn update_insert(inner: &mut Inner, op: &XmlNode, entry: &mut SoapCall) -> Answer {
    let records: Vec<&XmlNode> = op
        .crm_child("contactsList")
        .map(|list| list.crm_children("ContactRecord").collect())
        .unwrap_or_default();
    entry.records = records.len();
    if records.len() > MAX_BATCH {
        return error_fault(format!(
            "A maximum of {MAX_BATCH} contacts can be sent per call; {} were sent.",
            records.len()
        ));
    }
    // Validate the whole batch first: a faulty record faults the call, and nothing of
    // it is written (inferred: the service's bulk call is one transaction).
    let mut parsed = Vec::with_capacity(records.len());
    for (i, node) in records.iter().enumerate() {
        let record = match parse_record(node, &mut entry.ignored_elements) {
            Ok(r) => r,
            Err(e) => return error_fault(format!("record {} of contactsList: {e}", i + 1)),
        };
        if let Some(email) = record
            .email_address
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            if !email_is_acceptable(email) {
                return error_fault(format!(
                    "Invalid email address '{email}' in record {} of contactsList.",
                    i + 1
                ));
            }
            if inner
                .faults
                .fault_on_emails
                .iter()
                .any(|f| f.trim().eq_ignore_ascii_case(email))
            {
                return error_fault(format!(
                    "Contact '{email}' (record {} of contactsList) could not be saved (injected fault).",
                    i + 1
                ));
            }
        }
        parsed.push(record);
    }
    let now = inner.now_local();
    for record in parsed {
        inner.store.upsert(record, now);
    }
    entry.wrote = !records.is_empty();
    Answer::Ok(format!(
        "<ContactList_UpdateInsertResponse xmlns=\"{CRM_NS}\" />"
    ))
}

/// `ContactRecord` elements in the order XmlSerializer expects them.
const RECORD_ORDER: [&str; 22] = [
    "entityId",
    "externalId",
    "emailAddress",
    "contactTitle",
    "deleted",
    "fullName",
    "firstName",
    "lastName",
    "username",
    "password",
    "dateOfBirth",
    "createDate",
    "lastUpdateDate",
    "customerType",
    "industryType",
    "leadSourceType",
    "ratingType",
    "relationships",
    "addresses",
    "phoneNos",
    "crmForms",
    "MasterOptIn",
];

fn parse_bool(value: &str) -> Result<bool, String> {
    match value.trim() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(format!("{other:?} is not a boolean")),
    }
}

fn parse_int<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("{name} {value:?} is not an integer"))
}

/// Reads a `ContactRecord` the way XmlSerializer does: known elements in the CRM
/// namespace in the documented order; an element out of order (or unknown) is ignored,
/// and noted in the request log so tests see it.
fn parse_record(node: &XmlNode, ignored: &mut Vec<String>) -> Result<IncomingRecord, String> {
    let mut record = IncomingRecord::default();
    let mut last = 0usize;
    for child in &node.children {
        let position = RECORD_ORDER
            .iter()
            .position(|n| *n == child.name && child.ns == CRM_NS);
        let Some(position) = position.filter(|p| *p >= last) else {
            ignored.push(child.name.clone());
            continue;
        };
        last = position;
        let text = || {
            if child.nil {
                None
            } else {
                Some(child.text.clone())
            }
        };
        match child.name.as_str() {
            "entityId" => record.entity_id = Some(parse_int("entityId", &child.text)?),
            "externalId" => record.external_id = text(),
            "emailAddress" => record.email_address = text(),
            "contactTitle" => record.contact_title = text(),
            "fullName" => record.full_name = text(),
            "firstName" => record.first_name = text(),
            "lastName" => record.last_name = text(),
            "username" => record.username = text(),
            "dateOfBirth" => record.date_of_birth = text(),
            "customerType" => record.customer_type = text(),
            "industryType" => record.industry_type = text(),
            "leadSourceType" => record.lead_source_type = text(),
            "ratingType" => record.rating_type = text(),
            "addresses" => {
                let mut list = Vec::new();
                for a in child.crm_children("Address") {
                    let part = |n: &str| a.crm_text(n).unwrap_or("").to_string();
                    list.push(SandboxAddress {
                        address_type_id: parse_int(
                            "addressTypeID",
                            a.crm_text("addressTypeID").unwrap_or(""),
                        )?,
                        address_line1: part("addressLine1"),
                        address_line2: part("addressLine2"),
                        city: part("city"),
                        zipcode: part("zipcode"),
                        state: part("state"),
                        country_code: part("countryCode"),
                    });
                }
                record.addresses = Some(list);
            }
            "phoneNos" => {
                let mut list = Vec::new();
                for p in child.crm_children("PhoneNo") {
                    list.push(SandboxPhone {
                        phone_no_type_id: parse_int(
                            "phoneNoTypeID",
                            p.crm_text("phoneNoTypeID").unwrap_or(""),
                        )?,
                        phone_no: p.crm_text("phoneNo").unwrap_or("").to_string(),
                    });
                }
                record.phone_nos = Some(list);
            }
            "crmForms" => {
                let mut forms = Vec::new();
                for f in child.crm_children("CrmForms") {
                    let mut fields = Vec::new();
                    for field in f
                        .crm_child("crmFormFields")
                        .map(|c| c.crm_children("CrmFormFields").collect::<Vec<_>>())
                        .unwrap_or_default()
                    {
                        fields.push(SandboxCrmField {
                            field_id: parse_int(
                                "fieldId",
                                field.crm_text("fieldId").unwrap_or("0"),
                            )?,
                            field_type_id: parse_int(
                                "fieldTypeId",
                                field.crm_text("fieldTypeId").unwrap_or("1"),
                            )?,
                            field_name: field.crm_text("fieldName").unwrap_or("").to_string(),
                            field_value: field.crm_text("fieldValue").unwrap_or("").to_string(),
                        });
                    }
                    forms.push(SandboxCrmForm {
                        form_id: parse_int("formId", f.crm_text("formId").unwrap_or("0"))?,
                        form_name: f.crm_text("formName").unwrap_or("").to_string(),
                        fields,
                    });
                }
                record.crm_forms = Some(forms);
            }
            "MasterOptIn" => {
                record.master_opt_in =
                    Some(parse_bool(&child.text).map_err(|e| format!("MasterOptIn: {e}"))?)
            }
            // deleted, password, createDate, lastUpdateDate, relationships: read-only or
            // not modelled by the sandbox.
            _ => {}
        }
    }
    Ok(record)
}

/// A contact's fields, every element in the documented order (null strings left out,
/// as XmlSerializer does).
fn contact_fields(c: &SandboxContact) -> String {
    let mut out = String::new();
    let opt = |out: &mut String, name: &str, v: &Option<String>| {
        if let Some(v) = v {
            out.push_str(&format!("<{name}>{}</{name}>", esc(v)));
        }
    };
    out.push_str(&format!("<entityId>{}</entityId>", c.entity_id));
    opt(&mut out, "externalId", &c.external_id);
    opt(&mut out, "emailAddress", &c.email_address);
    opt(&mut out, "contactTitle", &c.contact_title);
    out.push_str(&format!("<deleted>{}</deleted>", c.deleted));
    opt(&mut out, "fullName", &c.full_name);
    opt(&mut out, "firstName", &c.first_name);
    opt(&mut out, "lastName", &c.last_name);
    opt(&mut out, "username", &c.username);
    opt(&mut out, "dateOfBirth", &c.date_of_birth);
    out.push_str(&format!(
        "<createDate>{}</createDate>",
        format_date(c.create_date)
    ));
    out.push_str(&format!(
        "<lastUpdateDate>{}</lastUpdateDate>",
        format_date(c.last_update_date)
    ));
    opt(&mut out, "customerType", &c.customer_type);
    opt(&mut out, "industryType", &c.industry_type);
    opt(&mut out, "leadSourceType", &c.lead_source_type);
    opt(&mut out, "ratingType", &c.rating_type);
    out.push_str("<relationships />");
    out.push_str("<addresses>");
    for a in &c.addresses {
        out.push_str(&format!(
            "<Address><addressTypeID>{}</addressTypeID><addressLine1>{}</addressLine1>\
             <addressLine2>{}</addressLine2><city>{}</city><zipcode>{}</zipcode><state>{}</state>\
             <countryCode>{}</countryCode></Address>",
            a.address_type_id,
            esc(&a.address_line1),
            esc(&a.address_line2),
            esc(&a.city),
            esc(&a.zipcode),
            esc(&a.state),
            esc(&a.country_code)
        ));
    }
    out.push_str("</addresses><phoneNos>");
    for p in &c.phone_nos {
        out.push_str(&format!(
            "<PhoneNo><phoneNoTypeID>{}</phoneNoTypeID><phoneNo>{}</phoneNo></PhoneNo>",
            p.phone_no_type_id,
            esc(&p.phone_no)
        ));
    }
    out.push_str("</phoneNos><crmForms>");
    for f in &c.crm_forms {
        out.push_str(&format!(
            "<CrmForms><formId>{}</formId><formName>{}</formName><crmFormFields>",
            f.form_id,
            esc(&f.form_name)
        ));
        for field in &f.fields {
            out.push_str(&format!(
                "<CrmFormFields><fieldId>{}</fieldId><fieldTypeId>{}</fieldTypeId><fieldName>{}</fieldName>\
                 <fieldValue>{}</fieldValue></CrmFormFields>",
                field.field_id,
                field.field_type_id,
                esc(&field.field_name),
                esc(&field.field_value)
            ));
        }
        out.push_str("</crmFormFields></CrmForms>");
    }
    out.push_str("</crmForms>");
    out.push_str(&format!("<MasterOptIn>{}</MasterOptIn>", c.master_opt_in));
    out
}
