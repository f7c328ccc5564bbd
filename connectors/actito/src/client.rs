//! The calls the connector makes to Actito, on top of the shared HTTP layer.
//!
//! Actito authenticates in two steps: the API key buys a bearer token
//! (`GET /auth/token`, header `Authorization: <key>`) that lives 15 minutes. The shared
//! layer's [`Auth`] is fixed at build time, so this client keeps the token itself: it is
//! cached, refreshed a little before it expires, and refreshed once more when a call
//! answers 401 (a token expired early, or revoked). The key and the token only ever
//! travel in headers, which the shared layer never logs.
//!
//! Every answer is handed back to the caller (the classifier accepts what the standard
//! one would fail) so that each call can read Actito's JSON error text, and so that a
//! 400 for one profile is that profile's rejection rather than the run's end.

use std::time::{Duration, Instant};

use bytes::Bytes;
use contactsync_core::{CancellationToken, ConnectorError, ExposeSecret, SecretString};
use contactsync_http::{header, Answer, Auth, Decision, HttpClient, Method};
use contactsync_http::{Call, RetryPolicy};
use serde_json::Value;

use crate::config::Connection;

/// `Accept` of every JSON call.
pub const JSON: &str = "application/json";

/// The lifetime assumed when the token answer does not say (Actito's is 15 minutes).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(900);

/// A bearer token and when to stop using it.
#[derive(Debug)]
struct Token {
    value: SecretString,
    refresh_at: Instant,
}

/// A profile table of an Actito entity, reached over HTTP. `Debug` shows the API key
/// and the token as redacted.
#[derive(Debug)]
pub struct ActitoClient {
    http: HttpClient,
    entity: String,
    table: String,
    api_key: SecretString,
    token: tokio::sync::Mutex<Option<Token>>,
    tokens_fetched: std::sync::atomic::AtomicU64,
}

/// One request, rebuilt for each attempt (a 401 is retried once with a new token).
#[derive(Debug, Clone)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// Path segments after the base URL, each percent-encoded on sending.
    pub segments: Vec<String>,
    /// Query parameters.
    pub query: Vec<(String, String)>,
    /// Body and its content type.
    pub body: Option<(String, Bytes)>,
    /// The `Accept` header.
    pub accept: &'static str,
    /// A retry policy other than the client's.
    pub retry: Option<RetryPolicy>,
    /// The call is not idempotent (an import POST): a 5xx answer, which may come after
    /// Actito took the call, is handed back instead of retried. 429 (refused, not
    /// taken) is still retried.
    pub not_idempotent: bool,
}

impl Request {
    /// A request with no body, accepting JSON.
    pub fn new(method: Method, segments: Vec<String>) -> Self {
        Request {
            method,
            segments,
            query: Vec::new(),
            body: None,
            accept: JSON,
            retry: None,
            not_idempotent: false,
        }
    }

    /// Adds a query parameter.
    pub fn query(mut self, name: &str, value: impl Into<String>) -> Self {
        self.query.push((name.to_string(), value.into()));
        self
    }

    /// Sets a JSON body.
    pub fn json(mut self, body: &Value) -> Self {
        self.body = Some((JSON.to_string(), Bytes::from(body.to_string())));
        self
    }
}

/// What became of one profile write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileWrite {
    /// Accepted; the profile's id when the answer gave it.
    Done(Option<String>),
    /// Refused as invalid (400): do not send it again unchanged.
    Refused(String),
    /// The profile (or subscription) does not exist (404).
    NotFound(String),
}

impl ActitoClient {
    /// A client for `connection`. Touches no network.
    pub fn new(connection: &Connection) -> Result<Self, ConnectorError> {
        let mut headers = header::HeaderMap::new();
        headers.insert(header::ACCEPT, header::HeaderValue::from_static(JSON));
        let http = &connection.http;
        Ok(ActitoClient {
            // Credentials are set per call: the bearer token changes.
            http: http.client(&http.base_url, "actito", headers, Auth::None)?,
            entity: connection.entity.clone(),
            table: connection.table.clone(),
            api_key: connection.api_key.clone(),
            token: tokio::sync::Mutex::new(None),
            tokens_fetched: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// How calls retry unless a request says otherwise (the section's settings).
    pub fn retry_policy(&self) -> &RetryPolicy {
        self.http.retry_policy()
    }

    /// The entity name.
    pub fn entity(&self) -> &str {
        &self.entity
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// How many tokens this client fetched (for tests and logs).
    pub fn tokens_fetched(&self) -> u64 {
        self.tokens_fetched
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `["v4", "entity", e, "table", t, rest…]`.
    pub fn table_path(&self, rest: &[&str]) -> Vec<String> {
        let mut p = vec![
            "v4".to_string(),
            "entity".to_string(),
            self.entity.clone(),
            "table".to_string(),
            self.table.clone(),
        ];
        p.extend(rest.iter().map(|s| s.to_string()));
        p
    }

    /// `["v4", "entity", e, "import", id, rest…]`.
    pub fn import_path(&self, id: &str, rest: &[&str]) -> Vec<String> {
        let mut p = vec![
            "v4".to_string(),
            "entity".to_string(),
            self.entity.clone(),
            "import".to_string(),
            id.to_string(),
        ];
        p.extend(rest.iter().map(|s| s.to_string()));
        p
    }

    /// A valid token: the cached one, or a new one.
    async fn token(&self) -> Result<SecretString, ConnectorError> {
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_ref() {
            if Instant::now() < t.refresh_at {
                return Ok(t.value.clone());
            }
        }
        let fresh = self.fetch_token().await?;
        let value = fresh.value.clone();
        *slot = Some(fresh);
        Ok(value)
    }

    /// Forgets `used` if it is still the cached token (another call may have refreshed
    /// it already).
    async fn forget(&self, used: &SecretString) {
        let mut slot = self.token.lock().await;
        if slot
            .as_ref()
            .is_some_and(|t| t.value.expose_secret() == used.expose_secret())
        {
            *slot = None;
        }
    }

    /// `GET /auth/token` with the API key.
    async fn fetch_token(&self) -> Result<Token, ConnectorError> {
        let asked = Instant::now();
        let answer = self
            .http
            .request_segments(Method::GET, &["auth", "token"])
            .header("Authorization", self.api_key.expose_secret())
            .header("Accept", JSON)
            .classify(&lenient)
            .send()
            .await?;
        if answer.status().as_u16() == 401 || answer.status().as_u16() == 403 {
            return Err(ConnectorError::Auth {
                call: answer.call().to_string(),
                message: format!(
                    "HTTP {}: the API key was refused; check `api_key` ({})",
                    answer.status().as_u16(),
                    error_text(&answer)
                ),
            });
        }
        let answer = finish(answer)?;
        let json: Value = parse_json(&answer)?;
        let value = json
            .get("accessToken")
            .or_else(|| json.get("access_token"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ConnectorError::Protocol {
                call: answer.call().to_string(),
                message: "no accessToken in the answer".into(),
            })?;
        let lifetime = json
            .get("expiresIn")
            .or_else(|| json.get("expires_in"))
            .and_then(parse_lifetime)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        // Refresh a little early: a minute, or a tenth of a short lifetime.
        let margin = (lifetime / 10).min(Duration::from_secs(60));
        self.tokens_fetched
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(lifetime_s = lifetime.as_secs_f64(), "Actito token obtained");
        contactsync_core::remember_secret(value);
        Ok(Token {
            value: SecretString::from(value.to_string()),
            refresh_at: asked + lifetime.saturating_sub(margin),
        })
    }

    fn build<'a>(&'a self, request: &Request, token: &SecretString) -> Call<'a> {
        let segments: Vec<&str> = request.segments.iter().map(String::as_str).collect();
        let mut call = self
            .http
            .request_segments(request.method.clone(), &segments)
            .header(
                "Authorization",
                &format!("Bearer {}", token.expose_secret()),
            )
            .header("Accept", request.accept)
            .classify(if request.not_idempotent {
                &once_unless_refused
            } else {
                &lenient
            });
        for (k, v) in &request.query {
            call = call.query(k, v);
        }
        if let Some((ct, body)) = &request.body {
            call = call.body(ct, body.clone());
        }
        if let Some(policy) = &request.retry {
            call = call.retry(policy.clone());
        }
        call
    }

    /// Sends `request` with a bearer token; on 401, once more with a new token. Returns
    /// whatever Actito answered last (retries of 429 and 5xx done): callers read the
    /// status.
    pub async fn send(
        &self,
        request: &Request,
        cancel: Option<&CancellationToken>,
    ) -> Result<Answer, ConnectorError> {
        let mut refreshed = false;
        loop {
            let token = self.token().await?;
            let mut call = self.build(request, &token);
            if let Some(c) = cancel {
                call = call.cancel(c.clone());
            }
            let answer = call.send().await?;
            if answer.status().as_u16() == 401 && !refreshed {
                tracing::info!(call = %answer.call(), "Actito token refused; getting a new one");
                self.forget(&token).await;
                refreshed = true;
                continue;
            }
            return Ok(answer);
        }
    }

    /// Sends and requires a 2xx answer.
    pub async fn send_ok(
        &self,
        request: &Request,
        cancel: Option<&CancellationToken>,
    ) -> Result<Answer, ConnectorError> {
        finish(self.send(request, cancel).await?)
    }

    /// Sends and parses a 2xx answer's JSON.
    pub async fn send_json(
        &self,
        request: &Request,
        cancel: Option<&CancellationToken>,
    ) -> Result<(String, Value), ConnectorError> {
        let answer = self.send_ok(request, cancel).await?;
        let json = parse_json(&answer)?;
        Ok((answer.call().to_string(), json))
    }

    /// `GET /v4/entity/{e}/table/{t}`: the table's structure, as JSON.
    pub async fn table_structure(&self) -> Result<(String, Value), ConnectorError> {
        self.send_json(&Request::new(Method::GET, self.table_path(&[])), None)
            .await
    }

    /// `POST …/profile?allowUpdate=true`: creates or updates one profile.
    pub async fn upsert_profile(&self, body: &Value) -> Result<ProfileWrite, ConnectorError> {
        let request = Request::new(Method::POST, self.table_path(&["profile"]))
            .query("allowUpdate", "true")
            .json(body);
        let answer = self.send(&request, None).await?;
        match answer.status().as_u16() {
            200..=299 => {
                let id = serde_json::from_slice::<Value>(answer.body())
                    .ok()
                    .and_then(|v| v.get("profileId").map(id_text));
                Ok(ProfileWrite::Done(id))
            }
            400 | 409 | 422 => Ok(ProfileWrite::Refused(error_text(&answer))),
            _ => Err(answer_error(&answer)),
        }
    }

    /// `GET …/profile/{key}` (a profile id or `attribute=value`): the profile, or
    /// `None` when Actito holds none (404).
    pub async fn profile(&self, key: &str) -> Result<Option<Value>, ConnectorError> {
        let request = Request::new(Method::GET, self.table_path(&["profile", key]));
        let answer = self.send(&request, None).await?;
        match answer.status().as_u16() {
            200..=299 => parse_json(&answer).map(Some),
            404 => Ok(None),
            _ => Err(answer_error(&answer)),
        }
    }

    /// `DELETE …/profile/{key}` (a profile id or `attribute=value`).
    pub async fn delete_profile(&self, key: &str) -> Result<ProfileWrite, ConnectorError> {
        let request = Request::new(Method::DELETE, self.table_path(&["profile", key]));
        self.write_answer(self.send(&request, None).await?)
    }

    /// `DELETE …/profile/{key}/subscription/{name}`: unsubscribes.
    pub async fn unsubscribe(&self, key: &str, name: &str) -> Result<ProfileWrite, ConnectorError> {
        let request = Request::new(
            Method::DELETE,
            self.table_path(&["profile", key, "subscription", name]),
        );
        self.write_answer(self.send(&request, None).await?)
    }

    fn write_answer(&self, answer: Answer) -> Result<ProfileWrite, ConnectorError> {
        match answer.status().as_u16() {
            200..=299 => Ok(ProfileWrite::Done(None)),
            404 => Ok(ProfileWrite::NotFound(error_text(&answer))),
            400 | 409 | 422 => Ok(ProfileWrite::Refused(error_text(&answer))),
            _ => Err(answer_error(&answer)),
        }
    }

    /// `GET …/profile?number=N&page=P` (pages from 0): one page of profiles, as JSON,
    /// and the `totalCount` when the server gives one.
    pub async fn profiles_page(
        &self,
        page: u64,
        number: usize,
    ) -> Result<(String, Vec<Value>, Option<u64>), ConnectorError> {
        let request = Request::new(Method::GET, self.table_path(&["profile"]))
            .query("number", number.to_string())
            .query("page", page.to_string());
        let (call, json) = self.send_json(&request, None).await?;
        // The spec shows only `profiles`; a total, when the server gives one, tells a
        // reader whether profiles came or went while it paged.
        let total = json
            .get("totalCount")
            .or_else(|| json.get("total"))
            .and_then(Value::as_u64);
        let list = match json {
            Value::Array(items) => items,
            Value::Object(mut o) => match o.remove("profiles").or_else(|| o.remove("items")) {
                Some(Value::Array(items)) => items,
                Some(Value::Null) | None => Vec::new(),
                Some(_) => {
                    return Err(ConnectorError::Protocol {
                        call,
                        message: "`profiles` is not a list".into(),
                    })
                }
            },
            _ => {
                return Err(ConnectorError::Protocol {
                    call,
                    message: "expected {\"profiles\":[…]}".into(),
                })
            }
        };
        Ok((call, list, total))
    }
}

/// An id given as a number or a string, as text.
pub fn id_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `"900s"`, `900`, `"900"`, `"15m"` as a duration.
fn parse_lifetime(v: &Value) -> Option<Duration> {
    match v {
        Value::Number(n) => n.as_f64().filter(|f| *f > 0.0).map(Duration::from_secs_f64),
        Value::String(s) => {
            let t = s.trim();
            let (num, factor) = if let Some(n) = t.strip_suffix("ms") {
                (n, 0.001)
            } else if let Some(n) = t.strip_suffix('s') {
                (n, 1.0)
            } else if let Some(n) = t.strip_suffix('m') {
                (n, 60.0)
            } else {
                (t, 1.0)
            };
            num.trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite() && *f > 0.0)
                .map(|f| Duration::from_secs_f64(f * factor))
        }
        _ => None,
    }
}

/// The standard reading, except that failures are handed back to the caller.
pub fn lenient(answer: &Answer) -> Decision {
    match Decision::standard(answer) {
        Decision::Fail => Decision::Accept,
        other => other,
    }
}

/// For a call that is not idempotent: 429 (Actito refused it) is retried as usual;
/// any other answer, a 5xx included, is handed back, since the call may have been
/// taken before the error.
pub fn once_unless_refused(answer: &Answer) -> Decision {
    if answer.status().is_server_error() {
        Decision::Accept
    } else {
        lenient(answer)
    }
}

/// Actito's error text: the `message` of its JSON error body, else the body.
pub fn error_text(answer: &Answer) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(answer.body()) {
        for key in [
            "message",
            "errorMessage",
            "error_description",
            "error",
            "description",
        ] {
            if let Some(m) = v.get(key).and_then(Value::as_str) {
                return m.to_string();
            }
        }
    }
    answer.excerpt()
}

/// The error a failed answer means, with Actito's words and a hint.
pub fn answer_error(answer: &Answer) -> ConnectorError {
    let text = error_text(answer);
    let message = match answer.status().as_u16() {
        401 => format!("the token was refused even after a refresh ({text})"),
        403 => format!("the API key lacks the right for this call ({text})"),
        404 => format!("not found: check `entity` and `table` ({text})"),
        406 => format!("Actito cannot answer in the format asked ({text})"),
        429 => format!("Actito kept throttling ({text})"),
        _ => text,
    };
    answer.error_with(message)
}

/// A 2xx answer, or its error.
pub fn finish(answer: Answer) -> Result<Answer, ConnectorError> {
    if answer.status().is_success() {
        Ok(answer)
    } else {
        Err(answer_error(&answer))
    }
}

/// The answer's body as JSON.
pub fn parse_json(answer: &Answer) -> Result<Value, ConnectorError> {
    serde_json::from_slice(answer.body()).map_err(|e| ConnectorError::Protocol {
        call: answer.call().to_string(),
        message: format!("not JSON ({e}): {}", answer.excerpt()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_are_read_liberally() {
        assert_eq!(
            parse_lifetime(&Value::from("900s")),
            Some(Duration::from_secs(900))
        );
        assert_eq!(
            parse_lifetime(&Value::from(2)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_lifetime(&Value::from("15m")),
            Some(Duration::from_secs(900))
        );
        assert_eq!(parse_lifetime(&Value::from("soon")), None);
    }
}
