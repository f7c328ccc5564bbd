//! The calls, on `contactsync-http`: it times out, retries what is worth retrying
//! (honouring `Retry-After`) and names the call in errors; this module only says what
//! the platform's answers mean.

use contactsync_core::{Contact, ConnectorError, ContactKey};
use contactsync_http::{header, Answer, Auth, Decision, HttpClient, Method};

use crate::config::Connection;

/// What became of one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// The platform holds it now.
    Done,
    /// The platform refused the record (400): sending it again unchanged will not help.
    Refused(String),
}

/// 400 (a refused record) and 404 (nobody to delete) are answers for the caller, not
/// failures to retry.
fn classify(answer: &Answer) -> Decision {
    match answer.status().as_u16() {
        400 | 404 => Decision::Accept,
        _ => Decision::standard(answer),
    }
}

/// The platform, reached over HTTP.
#[derive(Debug, Clone)]
pub struct __Name__Client {
    http: HttpClient,
}

impl __Name__Client {
    /// A client for `connection`. Touches no network.
    pub fn new(connection: &Connection) -> Result<Self, ConnectorError> {
        let mut headers = header::HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            header::HeaderValue::from_static("application/json"),
        );
        let http = &connection.http;
        Ok(__Name__Client {
            http: http.client(
                &http.base_url,
                "__name__",
                headers,
                Auth::bearer(connection.api_key.clone()),
            )?,
        })
    }

    /// One page of people (1-based), and the call's name for origins.
    pub async fn page(&self, page: u64, size: usize) -> Result<(String, Vec<Contact>), ConnectorError> {
        let answer = self
            .http
            .get("people")
            .query("page", &page.to_string())
            .query("per_page", &size.to_string())
            .send()
            .await?;
        let people: Vec<Contact> = serde_json::from_slice(answer.body())
            .map_err(|e| answer.error_with(format!("not a list of people: {e}")))?;
        Ok((answer.call().to_string(), people))
    }

    /// `PUT /people/{key}`: creates or replaces the person (an upsert).
    pub async fn put(&self, key: &ContactKey, contact: &Contact) -> Result<Written, ConnectorError> {
        let body = serde_json::to_vec(contact)
            .map_err(|e| ConnectorError::Other(format!("cannot encode {key}: {e}")))?;
        let answer = self
            .http
            .request_segments(Method::PUT, &["people", &key.to_string()])
            .body("application/json", body)
            .classify(&classify)
            .send()
            .await?;
        Ok(match answer.status().as_u16() {
            400 => Written::Refused(answer.excerpt()),
            404 => return Err(answer.error()),
            _ => Written::Done,
        })
    }

    /// `DELETE /people/{key}`; someone already gone is done.
    pub async fn delete(&self, key: &ContactKey) -> Result<Written, ConnectorError> {
        let answer = self
            .http
            .request_segments(Method::DELETE, &["people", &key.to_string()])
            .classify(&classify)
            .send()
            .await?;
        Ok(match answer.status().as_u16() {
            400 => Written::Refused(answer.excerpt()),
            _ => Written::Done,
        })
    }
}
