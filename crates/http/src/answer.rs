//! What a platform answered.

use bytes::Bytes;
use contactsync_core::ConnectorError;
use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};

/// The most characters of a platform's error text kept in an error message.
const MAX_ERROR_TEXT: usize = 500;

/// A complete answer: status, headers and the whole body.
///
/// Bodies are read whole: connectors page through listings, so one answer is one page.
#[derive(Debug, Clone)]
pub struct Answer {
    pub(crate) call: String,
    pub(crate) url: Url,
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Answer {
    /// The call that was answered (`GET /v2/acme/subscribers`), safe for messages.
    pub fn call(&self) -> &str {
        &self.call
    }

    /// The URL requested (after following no redirect). It may hold a query string:
    /// do not log it; use [`Answer::call`].
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// A header's value as text, if present and readable.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body's bytes.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `Retry-After` header as a delay from now, if present and readable
    /// (seconds, or an HTTP-date).
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.header("retry-after")
            .and_then(|v| crate::parse_retry_after(v, chrono::Utc::now()))
    }

    /// The body as a short, one-line excerpt for error messages: whitespace collapsed,
    /// truncated to a few hundred characters.
    pub fn excerpt(&self) -> String {
        excerpt(&self.text())
    }

    /// This answer as the error a connector returns: [`ConnectorError::Auth`] for 401
    /// and 403, else [`ConnectorError::Call`], with the status and the platform's text.
    pub fn error(&self) -> ConnectorError {
        self.error_with(self.excerpt())
    }

    /// Like [`Answer::error`], with a message of the connector's choosing (the
    /// platform's error text extracted from its XML or JSON).
    pub fn error_with(&self, message: impl Into<String>) -> ConnectorError {
        let mut message = message.into();
        if message.is_empty() {
            message = self
                .status
                .canonical_reason()
                .unwrap_or("no explanation given")
                .to_string();
        }
        match self.status.as_u16() {
            401 | 403 => ConnectorError::Auth {
                call: self.call.clone(),
                message: format!("HTTP {}: {message}", self.status.as_u16()),
            },
            status => ConnectorError::Call {
                call: self.call.clone(),
                status: Some(status),
                message,
            },
        }
    }

    /// `Ok(self)` for a 2xx answer, else [`Answer::error`].
    pub fn error_for_status(self) -> Result<Answer, ConnectorError> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(self.error())
        }
    }
}

/// Collapses whitespace and truncates `text` (on a character boundary).
pub(crate) fn excerpt(text: &str) -> String {
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.chars().count() <= MAX_ERROR_TEXT {
        collapsed
    } else {
        let cut: String = collapsed.chars().take(MAX_ERROR_TEXT).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_collapses_and_truncates() {
        assert_eq!(excerpt("  a \n\t b  "), "a b");
        let long = "é".repeat(2000);
        let e = excerpt(&long);
        assert_eq!(e.chars().count(), MAX_ERROR_TEXT + 1);
    }
}
