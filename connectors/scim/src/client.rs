//! The calls of RFC 7644, on `contactsync-http` (which times out, retries what is worth
//! retrying, honours `Retry-After` on 429 and 503, and names the call in errors); this
//! module says what SCIM's answers mean.
//!
//! Choices where the RFC leaves room, written down:
//! - Bodies are sent as `application/scim+json`; answers are read as JSON whatever
//!   their media type says.
//! - A POST is never retried on a lost connection or a 5xx: whether the user was
//!   created is then unknown, and the sink looks the user up instead (a retry could
//!   create them twice on a server without `userName` uniqueness).
//! - 400, 404, 409, 412, 413 and 501 are answers for the caller; 401 and 403 fail the
//!   run (a token problem is no record's fault).
//! - Numbers a server sends as strings (`"totalResults": "12"`, Okta's `startIndex`) and
//!   a missing `schemas` are taken.

use std::fmt;

use contactsync_core::ConnectorError;
use contactsync_http::{header, Answer, Auth, Decision, HttpClient, Method, RetryPolicy};
use serde_json::{json, Map, Value};

use crate::config::Connection;
use crate::user::PATCH_OP;

/// The media type of SCIM bodies.
pub const SCIM_JSON: &str = "application/scim+json";

/// A SCIM error answer (RFC 7644 §3.12): the reject's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimFault {
    /// The HTTP status.
    pub status: u16,
    /// The `scimType`, when given.
    pub scim_type: Option<String>,
    /// The server's `detail`, or an excerpt of its answer.
    pub detail: String,
}

impl fmt::Display for ScimFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SCIM {}", self.status)?;
        if let Some(t) = &self.scim_type {
            write!(f, " {t}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

impl ScimFault {
    /// Reads an error body, liberally.
    pub fn from_body(status: u16, body: &Value, excerpt: impl FnOnce() -> String) -> ScimFault {
        ScimFault {
            status,
            scim_type: body
                .get("scimType")
                .and_then(Value::as_str)
                .map(str::to_string),
            detail: body
                .get("detail")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(excerpt),
        }
    }

    fn of(answer: &Answer) -> ScimFault {
        let body = serde_json::from_slice(answer.body()).unwrap_or(Value::Null);
        ScimFault::from_body(answer.status().as_u16(), &body, || answer.excerpt())
    }
}

/// What became of one write.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// Done; the resource as the server answered it, when it did.
    Done(Option<Value>),
    /// 404: the resource is not there.
    Gone,
    /// 412: the resource changed since the version the write named.
    Stale,
    /// 409 on a create: the `userName` (or another unique value) is taken.
    Conflict(ScimFault),
    /// Refused (400, 413, 501, or a 409 elsewhere): sending it again unchanged will
    /// not help.
    Refused(ScimFault),
    /// A create whose fate is unknown (lost connection, 5xx): look it up.
    Unsure(String),
}

/// What the server says it supports (`/ServiceProviderConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// `patch.supported`.
    pub patch: bool,
    /// `bulk.supported`, with `maxOperations` and `maxPayloadSize`.
    pub bulk: Option<BulkLimits>,
    /// `filter.supported`.
    pub filter: bool,
    /// `filter.maxResults`.
    pub max_results: Option<usize>,
    /// `etag.supported`.
    pub etag: bool,
}

/// The limits of one `/Bulk` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkLimits {
    /// `maxOperations`.
    pub max_operations: usize,
    /// `maxPayloadSize`, in bytes.
    pub max_payload: usize,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "no" };
        write!(f, "PATCH {}, Bulk ", yes(self.patch))?;
        match self.bulk {
            Some(b) => write!(
                f,
                "yes ({} operations, {} bytes a request)",
                b.max_operations, b.max_payload
            )?,
            None => write!(f, "no")?,
        }
        write!(f, ", filter {}", yes(self.filter))?;
        if let Some(m) = self.max_results {
            write!(f, " ({m} results at most)")?;
        }
        write!(f, ", ETags {}", yes(self.etag))
    }
}

/// A number, or a number in a string.
pub fn number(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn supported(config: &Value, name: &str) -> bool {
    config
        .get(name)
        .and_then(|f| f.get("supported"))
        .is_some_and(crate::user::is_true)
}

impl Provider {
    /// Reads a ServiceProviderConfig.
    pub fn from_config(config: &Value) -> Provider {
        let bulk = supported(config, "bulk").then(|| BulkLimits {
            max_operations: number(config.pointer("/bulk/maxOperations")).unwrap_or(0) as usize,
            max_payload: number(config.pointer("/bulk/maxPayloadSize")).unwrap_or(0) as usize,
        });
        Provider {
            patch: supported(config, "patch"),
            // A bulk limit of 0 (or none given) leaves nothing to send.
            bulk: bulk.filter(|b| b.max_operations > 0 && b.max_payload > 0),
            filter: supported(config, "filter"),
            max_results: number(config.pointer("/filter/maxResults"))
                .map(|n| n as usize)
                .filter(|n| *n > 0),
            etag: supported(config, "etag"),
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub struct Page {
    /// `totalResults`.
    pub total: u64,
    /// The resources of the page.
    pub resources: Vec<Map<String, Value>>,
    /// The call, for origins.
    pub call: String,
}

/// One operation's answer in a BulkResponse.
#[derive(Debug, Clone)]
pub struct BulkAnswer {
    /// `bulkId`, when given.
    pub bulk_id: Option<String>,
    /// `status`.
    pub status: u16,
    /// `location`.
    pub location: Option<String>,
    /// The error, when it failed.
    pub fault: Option<ScimFault>,
}

/// Answers the caller reads itself; 401/403 fail; the rest as usual.
fn classify(answer: &Answer) -> Decision {
    match answer.status().as_u16() {
        400 | 404 | 409 | 412 | 413 | 501 => Decision::Accept,
        _ => Decision::standard(answer),
    }
}

/// A create's answers: as [`classify`], and a 5xx other than 503 is the caller's to
/// find out about (the user may have been created).
fn classify_create(answer: &Answer) -> Decision {
    match answer.status().as_u16() {
        500..=502 | 504..=599 => Decision::Accept,
        _ => classify(answer),
    }
}

/// A SCIM service provider, reached over HTTP.
#[derive(Debug, Clone)]
pub struct ScimClient {
    http: HttpClient,
}

impl ScimClient {
    /// A client for `connection`. Touches no network.
    pub fn new(connection: &Connection) -> Result<Self, ConnectorError> {
        let mut headers = header::HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            header::HeaderValue::from_static("application/scim+json, application/json"),
        );
        let http = &connection.http;
        Ok(ScimClient {
            http: http.client(
                &http.base_url,
                "scim",
                headers,
                Auth::bearer(connection.token.clone()),
            )?,
        })
    }

    fn json(answer: &Answer) -> Result<Value, ConnectorError> {
        if answer.body().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(answer.body())
            .map_err(|e| answer.error_with(format!("not JSON: {e}")))
    }

    /// `GET /ServiceProviderConfig`.
    pub async fn provider(&self) -> Result<Provider, ConnectorError> {
        let answer = self.http.get("ServiceProviderConfig").send().await?;
        Ok(Provider::from_config(&Self::json(&answer)?))
    }

    /// The ids of `GET /Schemas`; `None` when the server does not serve it.
    pub async fn schemas(&self) -> Result<Option<Vec<String>>, ConnectorError> {
        let answer = self.http.get("Schemas").classify(&classify).send().await?;
        if !answer.status().is_success() {
            return Ok(None);
        }
        let body = Self::json(&answer)?;
        let list = body
            .get("Resources")
            .or_else(|| body.get("resources"))
            .or(Some(&body))
            .and_then(Value::as_array);
        Ok(Some(
            list.into_iter()
                .flatten()
                .filter_map(|s| s.get("id").and_then(Value::as_str).map(str::to_string))
                .collect(),
        ))
    }

    /// One page of `endpoint` (`Users`, `Groups`) from `start` (1-based), filtered.
    pub async fn page(
        &self,
        endpoint: &str,
        start: u64,
        count: usize,
        filter: Option<&str>,
    ) -> Result<Page, ConnectorError> {
        let mut call = self
            .http
            .get(endpoint)
            .query("startIndex", &start.to_string())
            .query("count", &count.to_string());
        if let Some(f) = filter {
            call = call.query("filter", f);
        }
        let answer = call.classify(&classify).send().await?;
        if !answer.status().is_success() {
            return Err(answer.error_with(ScimFault::of(&answer).to_string()));
        }
        let body = Self::json(&answer)?;
        let resources: Vec<Map<String, Value>> = body
            .get("Resources")
            .or_else(|| body.get("resources"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_object().cloned())
            .collect();
        let total = number(body.get("totalResults")).unwrap_or(resources.len() as u64);
        Ok(Page {
            total,
            resources,
            call: answer.call().to_string(),
        })
    }

    /// The first resource of `endpoint` whose `attr` equals `value`.
    pub async fn find(
        &self,
        endpoint: &str,
        attr: &str,
        value: &str,
    ) -> Result<Option<Map<String, Value>>, ConnectorError> {
        let filter = format!("{attr} eq {}", quoted(value));
        let page = self.page(endpoint, 1, 2, Some(&filter)).await?;
        Ok(page.resources.into_iter().next())
    }

    /// `GET /Users/{id}`: the user and its ETag; `None` when gone.
    pub async fn get(
        &self,
        id: &str,
    ) -> Result<Option<(Map<String, Value>, Option<String>)>, ConnectorError> {
        let answer = self
            .http
            .request_segments(Method::GET, &["Users", id])
            .classify(&classify)
            .send()
            .await?;
        match answer.status().as_u16() {
            404 => Ok(None),
            s if (200..300).contains(&s) => {
                let etag = answer.header("etag").map(str::to_string);
                let user = Self::json(&answer)?
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                Ok(Some((user, etag)))
            }
            _ => Err(answer.error_with(ScimFault::of(&answer).to_string())),
        }
    }

    /// `POST /{endpoint}`: never retried once it may have reached the server.
    pub async fn create(&self, endpoint: &str, body: &Value) -> Result<Written, ConnectorError> {
        let policy = RetryPolicy {
            retry_transport_errors: false,
            ..self.http.retry_policy().clone()
        };
        let sent = self
            .http
            .post(endpoint)
            .body(SCIM_JSON, body.to_string())
            .classify(&classify_create)
            .retry(policy)
            .send()
            .await;
        let answer = match sent {
            Ok(answer) => answer,
            Err(e @ (ConnectorError::Auth { .. } | ConnectorError::Cancelled)) => return Err(e),
            Err(e) => return Ok(Written::Unsure(e.to_string())),
        };
        Ok(match answer.status().as_u16() {
            409 => Written::Conflict(ScimFault::of(&answer)),
            s if s >= 500 => Written::Unsure(ScimFault::of(&answer).to_string()),
            s if (200..300).contains(&s) => Written::Done(Some(Self::json(&answer)?)),
            _ => Written::Refused(ScimFault::of(&answer)),
        })
    }

    /// A write to one resource: PATCH, PUT or DELETE, with `If-Match` when given.
    pub async fn write(
        &self,
        method: Method,
        endpoint: &str,
        id: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> Result<Written, ConnectorError> {
        let mut call = self
            .http
            .request_segments(method, &[endpoint, id])
            .classify(&classify);
        if let Some(body) = body {
            call = call.body(SCIM_JSON, body.to_string());
        }
        if let Some(version) = if_match {
            call = call.header("if-match", version);
        }
        let answer = call.send().await?;
        Ok(match answer.status().as_u16() {
            404 => Written::Gone,
            412 => Written::Stale,
            s if (200..300).contains(&s) => {
                Written::Done(Self::json(&answer).ok().filter(|v| !v.is_null()))
            }
            _ => Written::Refused(ScimFault::of(&answer)),
        })
    }

    /// `PATCH /{endpoint}/{id}` with `operations`.
    pub async fn patch(
        &self,
        endpoint: &str,
        id: &str,
        operations: &[Value],
        if_match: Option<&str>,
    ) -> Result<Written, ConnectorError> {
        let body = patch_body(operations);
        self.write(Method::PATCH, endpoint, id, Some(&body), if_match)
            .await
    }

    /// `POST /Bulk` with `operations`; the answers in the server's order.
    pub async fn bulk(&self, operations: &[Value]) -> Result<Vec<BulkAnswer>, ConnectorError> {
        let body = bulk_body(operations);
        // A bulk request holds creates: not retried once it may have reached the server.
        let policy = RetryPolicy {
            retry_transport_errors: false,
            ..self.http.retry_policy().clone()
        };
        let answer = self
            .http
            .post("Bulk")
            .body(SCIM_JSON, body.to_string())
            .classify(&classify_create)
            .retry(policy)
            .send()
            .await?;
        if !answer.status().is_success() {
            return Err(answer.error_with(ScimFault::of(&answer).to_string()));
        }
        let body = Self::json(&answer)?;
        let ops = body
            .get("Operations")
            .or_else(|| body.get("operations"))
            .and_then(Value::as_array)
            .ok_or_else(|| answer.error_with("a BulkResponse without `Operations`"))?;
        Ok(ops
            .iter()
            .map(|op| {
                let status = number(op.get("status").map(|s| s.get("code").unwrap_or(s)))
                    .unwrap_or(0) as u16;
                let fault = (!(200..300).contains(&status)).then(|| {
                    let response = op.get("response").cloned().unwrap_or(Value::Null);
                    ScimFault::from_body(status, &response, || {
                        format!("operation answered {status}")
                    })
                });
                BulkAnswer {
                    bulk_id: op.get("bulkId").and_then(Value::as_str).map(str::to_string),
                    status,
                    location: op
                        .get("location")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    fault,
                }
            })
            .collect())
    }
}

/// A PatchOp body.
pub fn patch_body(operations: &[Value]) -> Value {
    json!({ "schemas": [PATCH_OP], "Operations": operations })
}

/// A BulkRequest body.
pub fn bulk_body(operations: &[Value]) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],
        "Operations": operations
    })
}

/// `value` as a filter's quoted string (RFC 7644 §3.4.2.2: JSON string escaping).
pub fn quoted(value: &str) -> String {
    Value::String(value.to_string()).to_string()
}

/// The id at the end of a resource's `location` (`…/Users/2819c223`).
pub fn id_from_location(location: &str) -> Option<String> {
    location
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|id| !id.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_config_is_read_liberally() {
        let p = Provider::from_config(&json!({
            "patch": { "supported": "True" },
            "bulk": { "supported": true, "maxOperations": "50", "maxPayloadSize": 1048576 },
            "filter": { "supported": true, "maxResults": 200 },
            "etag": { "supported": false }
        }));
        assert!(p.patch && p.filter && !p.etag);
        assert_eq!(
            p.bulk,
            Some(BulkLimits {
                max_operations: 50,
                max_payload: 1_048_576
            })
        );
        assert_eq!(p.max_results, Some(200));
        let none =
            Provider::from_config(&json!({ "bulk": { "supported": true, "maxOperations": 0 } }));
        assert_eq!(none.bulk, None);
        assert!(!none.patch);
    }

    #[test]
    fn filter_values_are_quoted_and_locations_give_ids() {
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(
            id_from_location("https://x/scim/v2/Users/2819c223/").as_deref(),
            Some("2819c223")
        );
    }
}
