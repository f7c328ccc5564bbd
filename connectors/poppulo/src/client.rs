//! The calls the connector makes to Poppulo, on top of the shared HTTP layer: Basic
//! auth, XML headers, and Poppulo's reading of its answers (a 503 without `Retry-After`
//! on an import POST is another import running, not throttling).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use contactsync_core::{CancellationToken, ConnectorError, Posted, ProgressReporter};
use contactsync_http::{header, Answer, Auth, Decision, HttpClient, Method, RetryPolicy};

use crate::config::Connection;
use crate::xml::{error_text, Element, ImportState, StatusEntity, SubscriberPage};

/// The content type of every body we send.
pub const XML: &str = "application/xml; charset=UTF-8";

/// The longest single wait while the account is busy.
const MAX_BUSY_STEP: Duration = Duration::from_secs(600);

/// A Poppulo account, reached over HTTP.
#[derive(Debug, Clone)]
pub struct PoppuloClient {
    http: HttpClient,
    account: String,
}

impl PoppuloClient {
    /// A client for `connection`. Touches no network.
    pub fn new(connection: &Connection) -> Result<Self, ConnectorError> {
        let mut headers = header::HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            header::HeaderValue::from_static("application/xml"),
        );
        let auth = Auth::basic(connection.username.clone(), connection.password.clone());
        let http = &connection.http;
        Ok(PoppuloClient {
            http: http.client(&http.base_url, "poppulo", headers, auth)?,
            account: connection.account.clone(),
        })
    }

    /// The account code.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// `GET /{account}/subscribers?status=…` (first page), or the page at `href`.
    pub async fn subscribers_page(
        &self,
        status: &str,
        href: Option<&str>,
    ) -> Result<(String, SubscriberPage), ConnectorError> {
        let call = match href {
            Some(h) => self.http.request_url(Method::GET, h),
            None => self
                .http
                .request_segments(Method::GET, &[&self.account, "subscribers"])
                .query("status", status),
        };
        let answer = finish(call.classify(&standard_xml).send().await?)?;
        let page = SubscriberPage::parse(&answer.text()).map_err(|m| ConnectorError::Protocol {
            call: answer.call().to_string(),
            message: m,
        })?;
        Ok((answer.call().to_string(), page))
    }

    /// `GET /{account}/subscriber/{email}`: the subscriber, or `None` (404).
    pub async fn subscriber(&self, email: &str) -> Result<Option<Element>, ConnectorError> {
        let answer = self
            .http
            .request_segments(Method::GET, &[&self.account, "subscriber", email])
            .classify(&standard_xml)
            .send()
            .await?;
        if answer.status().as_u16() == 404 {
            return Ok(None);
        }
        let answer = finish(answer)?;
        Element::parse(&answer.text())
            .map(Some)
            .map_err(|m| ConnectorError::Protocol {
                call: answer.call().to_string(),
                message: m,
            })
    }

    /// `POST /{account}/subscriber_imports`; returns the import's href from the status
    /// entity. While another import runs in the account (503 without `Retry-After`) it
    /// waits, with growing pauses from `busy_interval`, at most `busy_bound` in all;
    /// throttling (503 with `Retry-After`) is retried too: neither took the job. The
    /// post is not idempotent, so a lost answer or another 5xx, after which Poppulo may
    /// have taken it, is never followed by a second post: it is [`Posted::Unknown`].
    pub async fn post_import(
        &self,
        job_xml: String,
        busy_interval: Duration,
        busy_bound: Duration,
        progress: &dyn ProgressReporter,
        cancel: CancellationToken,
    ) -> Result<Posted, ConnectorError> {
        let busy_tries = AtomicU32::new(0);
        let classify = |a: &Answer| -> Decision {
            match a.status().as_u16() {
                503 if a.retry_after().is_none() => {
                    let n = busy_tries.fetch_add(1, Ordering::SeqCst).min(16);
                    Decision::Wait {
                        delay: busy_interval.saturating_mul(1 << n).min(MAX_BUSY_STEP),
                        bound: busy_bound,
                        note: "another import is running in the Poppulo account (one at a time)"
                            .into(),
                    }
                }
                503 => standard_xml(a),
                500..=599 => Decision::Accept,
                _ => standard_xml(a),
            }
        };
        let sent = self
            .http
            .request_segments(Method::POST, &[&self.account, "subscriber_imports"])
            .body(XML, job_xml)
            .classify(&classify)
            .retry(RetryPolicy {
                retry_transport_errors: false,
                ..self.http.retry_policy().clone()
            })
            .progress(progress)
            .cancel(cancel)
            .send()
            .await;
        let answer = match sent {
            Ok(answer) if answer.status().is_server_error() => {
                return Ok(Posted::Unknown(format!(
                    "{} answered {}: {}",
                    answer.call(),
                    answer.status().as_u16(),
                    error_text(&answer.text())
                )))
            }
            Ok(answer) => answer,
            Err(ConnectorError::Call {
                call,
                status: None,
                message,
            }) => return Ok(Posted::Unknown(format!("{call}: {message}"))),
            Err(e) => return Err(e),
        };
        let answer = finish(answer)?;
        let entity = StatusEntity::parse(&answer.text());
        let href = entity
            .and_then(|e| e.created)
            .or_else(|| answer.header("location").map(str::to_string));
        href.map(Posted::Accepted)
            .ok_or_else(|| ConnectorError::Protocol {
                call: answer.call().to_string(),
                message: format!(
                    "HTTP {} without resources_created/link/@href: {}",
                    answer.status().as_u16(),
                    error_text(&answer.text())
                ),
            })
    }

    /// `GET` the import at `href`.
    pub async fn import(
        &self,
        href: &str,
        cancel: CancellationToken,
    ) -> Result<ImportState, ConnectorError> {
        let answer = self.get_url(href, None, cancel).await?;
        ImportState::parse(&answer.text()).map_err(|m| ConnectorError::Protocol {
            call: answer.call().to_string(),
            message: m,
        })
    }

    /// `GET` the rejected rows' CSV at `href`.
    pub async fn rejected_rows(
        &self,
        href: &str,
        cancel: CancellationToken,
    ) -> Result<String, ConnectorError> {
        let accept = "text/csv, application/xml;q=0.5";
        Ok(self.get_url(href, Some(accept), cancel).await?.text())
    }

    /// `GET` a URL Poppulo handed out (an import's, its rejected rows'), accepting
    /// `accept` instead of the client's XML when given; a 2xx answer, or the error it
    /// means.
    async fn get_url(
        &self,
        href: &str,
        accept: Option<&str>,
        cancel: CancellationToken,
    ) -> Result<Answer, ConnectorError> {
        let mut request = self.http.request_url(Method::GET, href);
        if let Some(accept) = accept {
            request = request.header("Accept", accept);
        }
        let answer = request
            .classify(&standard_xml)
            .cancel(cancel)
            .send()
            .await?;
        finish(answer)
    }
}

/// The standard reading, except that failures are handed back so that [`finish`] can
/// put the platform's XML error text in the error.
fn standard_xml(answer: &Answer) -> Decision {
    match Decision::standard(answer) {
        Decision::Fail => Decision::Accept,
        other => other,
    }
}

/// A 2xx answer, or the error it means, with the platform's words.
fn finish(answer: Answer) -> Result<Answer, ConnectorError> {
    if answer.status().is_success() {
        return Ok(answer);
    }
    let text = error_text(&answer.text());
    let message = match answer.status().as_u16() {
        401 => format!("check the username and password of the API user ({text})"),
        403 => format!("the API user lacks the permission for this call ({text})"),
        409 => format!("Poppulo refused the request as invalid: {text}"),
        _ => text,
    };
    Err(answer.error_with(message))
}
