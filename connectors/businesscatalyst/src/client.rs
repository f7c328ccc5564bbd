//! The calls this connector makes, over the shared HTTP layer.
//!
//! Every call carries the credentials in its body (the service has no HTTP auth), so
//! the request body is never logged. Retries are the HTTP layer's (timeouts, backoff,
//! `Retry-After`); this module only says which answers are worth retrying: transport
//! errors and HTTP 5xx *without* a SOAP Fault. A Fault is the service's considered
//! answer and is handed back as [`CallError::Fault`], never retried.

use contactsync_core::{ConnectorError, ExposeSecret, SecretString};
use contactsync_http::{header, Answer, Decision, HttpClient, Method};

use crate::config::BcConfig;
use crate::soap::{self, ContactRecord, Fault, Login, Node, Reply};

/// `ContactList_Retrieve` returns this many records per call; `recordStart` advances by it.
pub const PAGE_SIZE: u64 = 100;

/// A call that failed: a SOAP Fault (the service refused) or anything else.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The service answered with a SOAP Fault.
    #[error("{call}: {}", fault.text)]
    Fault {
        /// The operation (`ContactList_UpdateInsert`).
        call: String,
        /// The fault.
        fault: Fault,
    },
    /// Transport, HTTP or protocol failure (after retries).
    #[error(transparent)]
    Connector(#[from] ConnectorError),
}

impl From<CallError> for ConnectorError {
    fn from(e: CallError) -> ConnectorError {
        match e {
            CallError::Fault { call, fault } if fault.is_authentication() => ConnectorError::Auth {
                call,
                message: format!(
                    "{} (check username, password or site token, and site_id)",
                    fault.text
                ),
            },
            CallError::Fault { call, fault } => ConnectorError::Call {
                call,
                status: Some(500),
                message: fault.text,
            },
            CallError::Connector(e) => e,
        }
    }
}

/// One page of `ContactList_Retrieve`.
#[derive(Debug)]
pub struct Page {
    /// The records, in the service's order.
    pub records: Vec<ContactRecord>,
    /// Whether more records follow.
    pub more_records: bool,
}

/// A client for one site's CRM web service. `Debug` shows the password as redacted.
#[derive(Debug, Clone)]
pub struct BcClient {
    http: HttpClient,
    endpoint: String,
    path: String,
    site_id: i64,
    username: String,
    password: SecretString,
}

/// Whether an answer is a SOAP Fault: the service's final word, handed to the caller.
fn is_fault(answer: &Answer) -> bool {
    std::str::from_utf8(answer.body())
        .ok()
        .and_then(|body| soap::parse_reply(body).ok())
        .is_some_and(|reply| matches!(reply, Reply::Fault(_)))
}

/// 5xx with a SOAP Fault: accepted (parsed by the caller); anything else: the shared rules.
fn classify(answer: &Answer) -> Decision {
    if answer.status().is_server_error() && is_fault(answer) {
        Decision::Accept
    } else {
        Decision::standard(answer)
    }
}

impl BcClient {
    /// A client for `config`. Touches no network.
    pub fn new(config: &BcConfig) -> Result<BcClient, ConnectorError> {
        let http = config.http.client(
            &config.endpoint,
            "businesscatalyst",
            header::HeaderMap::new(),
            contactsync_http::Auth::None,
        )?;
        let path = http.base_url().path().trim_end_matches('/').to_string();
        Ok(BcClient {
            http,
            endpoint: config.endpoint.clone(),
            path,
            site_id: config.site_id,
            username: config.username.clone(),
            password: config.password.clone(),
        })
    }

    fn call_name(&self, operation: &str) -> String {
        format!("POST {} {operation}", self.path)
    }

    /// Sends `operation` with `params` and returns its `…Response` element.
    async fn call(&self, operation: &str, params: &str) -> Result<Node, CallError> {
        let login = Login {
            username: &self.username,
            password: self.password.expose_secret(),
            site_id: self.site_id,
        };
        let body = soap::request(operation, &login, params);
        let call = self.call_name(operation);
        let answer = self
            .http
            .request_url(Method::POST, &self.endpoint)
            .body(soap::CONTENT_TYPE, body)
            .classify(&classify)
            .send()
            .await?;
        let text = String::from_utf8_lossy(answer.body());
        let reply = soap::parse_reply(&text).map_err(|message| {
            if answer.status().is_success() {
                ConnectorError::Protocol {
                    call: call.clone(),
                    message,
                }
            } else {
                answer.error()
            }
        })?;
        match reply {
            Reply::Fault(fault) => {
                tracing::debug!(call = %call, fault = %fault.text, "SOAP fault");
                Err(CallError::Fault { call, fault })
            }
            Reply::Response(node) => {
                let expected = format!("{operation}Response");
                if node.name != expected || node.ns != soap::CRM_NS {
                    return Err(ConnectorError::Protocol {
                        call,
                        message: format!(
                            "expected {{{}}}{expected}, got {{{}}}{}",
                            soap::CRM_NS,
                            node.ns,
                            node.name
                        ),
                    }
                    .into());
                }
                if !answer.status().is_success() {
                    return Err(answer.error().into());
                }
                Ok(node)
            }
        }
    }

    /// `ContactList_Retrieve` from `since` (site-local, as BC writes dates), page at
    /// `record_start`.
    pub async fn retrieve_page(&self, since: &str, record_start: u64) -> Result<Page, CallError> {
        let start = record_start.to_string();
        let params = soap::params(&[
            ("lastUpdateDate", since),
            ("recordStart", &start),
            ("moreRecords", "true"),
        ]);
        let op = "ContactList_Retrieve";
        let node = self.call(op, &params).await?;
        let protocol = |message: String| {
            CallError::Connector(ConnectorError::Protocol {
                call: self.call_name(op),
                message,
            })
        };
        let mut records = Vec::new();
        if let Some(list) = node.child("ContactList_RetrieveResult") {
            for (i, rec) in list.children_named("ContactRecord").enumerate() {
                records.push(ContactRecord::read(rec).map_err(|e| {
                    protocol(format!(
                        "record {} at recordStart {record_start}: {e}",
                        i + 1
                    ))
                })?);
            }
        }
        // Without `moreRecords` nobody knows whether more pages follow: the read stops
        // with an error rather than claim it is complete (which would remove everyone
        // behind this page).
        let more_records = match node.child("moreRecords").map(|n| n.text.trim()) {
            None | Some("") => {
                return Err(protocol(format!(
                    "the answer at recordStart {record_start} has no moreRecords: whether more pages follow is unknown"
                )))
            }
            Some(v) => soap::parse_bool(v)
                .ok_or_else(|| protocol(format!("moreRecords {v:?} is not a boolean")))?,
        };
        Ok(Page {
            records,
            more_records,
        })
    }

    /// `ContactList_UpdateInsert` of `records` (at most 100).
    pub async fn update_insert(&self, records: &[ContactRecord]) -> Result<(), CallError> {
        self.call("ContactList_UpdateInsert", &soap::contacts_list(records))
            .await
            .map(|_| ())
    }

    async fn retrieve_one(
        &self,
        op: &str,
        element: &str,
        value: &str,
    ) -> Result<Option<ContactRecord>, CallError> {
        let node = match self.call(op, &soap::params(&[(element, value)])).await {
            Ok(node) => node,
            Err(CallError::Fault { fault, .. }) if fault.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        // An empty result is taken for "nobody" too (be liberal in what is accepted).
        let result = match node.child(&format!("{op}Result")) {
            Some(r) if !r.nil && !r.children.is_empty() => r,
            _ => return Ok(None),
        };
        let record = ContactRecord::read(result).map_err(|message| ConnectorError::Protocol {
            call: self.call_name(op),
            message,
        })?;
        Ok((record.entity_id > 0).then_some(record))
    }

    /// `Contact_RetrieveByExternalID`; `None` when no contact has it.
    pub async fn retrieve_by_external_id(
        &self,
        external_id: &str,
    ) -> Result<Option<ContactRecord>, CallError> {
        self.retrieve_one("Contact_RetrieveByExternalID", "externalId", external_id)
            .await
    }

    /// `Contact_RetrieveByEmailAddress`; `None` when no contact has it.
    pub async fn retrieve_by_email(&self, email: &str) -> Result<Option<ContactRecord>, CallError> {
        self.retrieve_one("Contact_RetrieveByEmailAddress", "emailAddress", email)
            .await
    }

    async fn delete(&self, op: &str, element: &str, value: &str) -> Result<bool, CallError> {
        let node = self.call(op, &soap::params(&[(element, value)])).await?;
        Ok(node
            .child(&format!("{op}Result"))
            .and_then(|r| soap::parse_bool(&r.text))
            .unwrap_or(false))
    }

    /// `Contact_DeleteByEntityID`: whether a contact was deleted.
    pub async fn delete_by_entity_id(&self, entity_id: i64) -> Result<bool, CallError> {
        self.delete(
            "Contact_DeleteByEntityID",
            "entityId",
            &entity_id.to_string(),
        )
        .await
    }

    /// `Contact_DeleteByEmailAddress` (element `email`): whether a contact was deleted.
    pub async fn delete_by_email(&self, email: &str) -> Result<bool, CallError> {
        self.delete("Contact_DeleteByEmailAddress", "email", email)
            .await
    }

    /// A cheap call that proves the site and credentials: `ContactList_Retrieve` from a
    /// far-future date (no records).
    pub async fn check(&self) -> Result<(), ConnectorError> {
        self.retrieve_page("9999-12-31T00:00:00", 0).await?;
        Ok(())
    }
}
