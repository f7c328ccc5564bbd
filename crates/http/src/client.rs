//! The client and its calls: one request, sent and retried until the connector's
//! [`Classify`] accepts an answer or a bound is reached.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use contactsync_core::{CancellationToken, ConnectorError, ProgressReporter};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::{Method, Url};

use crate::answer::excerpt;
use crate::pace::Pacer;
use crate::retry::Standard;
use crate::{Answer, Auth, Classify, Decision, Pace, RetryPolicy, USER_AGENT};

/// How an [`HttpClient`] is built. Start from [`ClientConfig::new`] and change fields.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The base every relative path is resolved against
    /// (`https://api.newsweaver.com/v2/`). A missing trailing `/` is added, so that
    /// `acme/subscribers` lands under it.
    pub base_url: Url,
    /// The longest wait for a TCP/TLS connection. Default 10 s.
    pub connect_timeout: Duration,
    /// The longest wait for one whole request, body included. Default 60 s.
    pub request_timeout: Duration,
    /// Appended to the `User-Agent` after a space (`contactsync/0.1.0 poppulo`).
    pub user_agent_suffix: Option<String>,
    /// How calls retry, unless a call says otherwise ([`Call::retry`]).
    pub retry: RetryPolicy,
    /// Headers sent on every request (`Accept: application/xml`).
    pub default_headers: HeaderMap,
    /// The platform's rate and concurrency bounds, kept by the client ([`crate::pace`]).
    pub pace: Pace,
}

impl ClientConfig {
    /// Defaults around `base_url`; fails if it is not an absolute `http(s)` URL.
    pub fn new(base_url: &str) -> Result<Self, ConnectorError> {
        let mut base = Url::parse(base_url.trim())
            .map_err(|e| ConnectorError::Other(format!("invalid base URL {base_url:?}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(ConnectorError::Other(format!(
                "invalid base URL {base_url:?}: expected http:// or https://"
            )));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        base.set_query(None);
        base.set_fragment(None);
        Ok(ClientConfig {
            base_url: base,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            user_agent_suffix: None,
            retry: RetryPolicy::default(),
            default_headers: HeaderMap::new(),
            pace: Pace::default(),
        })
    }
}

/// The HTTP client every connector shares. Cheap to clone (the connection pool is
/// shared).
///
/// Build one per connector instance with [`HttpClient::new`], then make calls with
/// [`HttpClient::get`], [`HttpClient::post`], [`HttpClient::request`] (a path relative
/// to the base URL), [`HttpClient::request_segments`] (path segments, each
/// percent-encoded) or [`HttpClient::request_url`] (a link the platform returned).
/// Each gives a [`Call`] to complete and [`Call::send`].
///
/// Credentials ([`Auth`]) are only ever sent to the base URL's origin (a loopback host
/// counts as any other loopback host, for sandboxes); a link elsewhere is refused
/// rather than handed the password.
#[derive(Clone)]
pub struct HttpClient {
    inner: reqwest::Client,
    base: Url,
    auth: Auth,
    retry: RetryPolicy,
    user_agent: String,
    pacer: Pacer,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("base_url", &self.base.as_str())
            .field("user_agent", &self.user_agent)
            .field("auth", &self.auth)
            .field("retry", &self.retry)
            .field("pacer", &self.pacer)
            .finish()
    }
}

impl HttpClient {
    /// A client for `settings`, authenticating every request with `auth`.
    pub fn new(settings: ClientConfig, auth: Auth) -> Result<Self, ConnectorError> {
        let user_agent = match settings.user_agent_suffix.as_deref().map(str::trim) {
            Some(suffix) if !suffix.is_empty() => format!("{USER_AGENT} {suffix}"),
            _ => USER_AGENT.to_string(),
        };
        let inner = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .user_agent(user_agent.clone())
            .default_headers(settings.default_headers)
            .build()
            .map_err(|e| {
                ConnectorError::Other(format!("cannot build the HTTP client: {}", chain(e)))
            })?;
        Ok(HttpClient {
            inner,
            base: settings.base_url,
            auth,
            retry: settings.retry,
            user_agent,
            pacer: Pacer::new(settings.pace),
        })
    }

    /// The base URL (with its trailing `/`).
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// How calls retry unless a call says otherwise.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The `User-Agent` sent.
    pub fn user_agent(&self) -> &str {
        &self.user_agent
    }

    /// A call to `path`, relative to the base URL (a leading `/` is ignored:
    /// `/acme/subscribers` and `acme/subscribers` both land under the base). The path
    /// is used as given: percent-encode user-supplied parts, or use
    /// [`HttpClient::request_segments`].
    pub fn request(&self, method: Method, path: &str) -> Call<'_> {
        let url = self
            .base
            .join(path.trim_start_matches('/'))
            .map_err(|e| ConnectorError::Other(format!("invalid path {path:?}: {e}")));
        Call::new(self, method, url)
    }

    /// A call to the base URL followed by `segments`, each percent-encoded
    /// (`["acme", "subscriber", "ann@example.com"]`).
    pub fn request_segments(&self, method: Method, segments: &[&str]) -> Call<'_> {
        let mut url = self.base.clone();
        let result = match url.path_segments_mut() {
            Ok(mut path) => {
                path.pop_if_empty().extend(segments);
                Ok(())
            }
            Err(()) => Err(ConnectorError::Other(
                "the base URL cannot take a path".into(),
            )),
        };
        Call::new(self, method, result.map(|()| url))
    }

    /// A call to a link the platform returned: an absolute URL, or a reference
    /// resolved against the base URL (RFC 3986). Use it to follow `href`s rather than
    /// building URLs.
    pub fn request_url(&self, method: Method, href: &str) -> Call<'_> {
        let href = href.trim();
        let url = Url::parse(href)
            .or_else(|_| self.base.join(href))
            .map_err(|e| ConnectorError::Protocol {
                call: format!("{method} link"),
                message: format!("the platform returned an unusable link ({e})"),
            });
        Call::new(self, method, url)
    }

    /// `GET path` (see [`HttpClient::request`]).
    pub fn get(&self, path: &str) -> Call<'_> {
        self.request(Method::GET, path)
    }

    /// `POST path` (see [`HttpClient::request`]).
    pub fn post(&self, path: &str) -> Call<'_> {
        self.request(Method::POST, path)
    }

    /// Whether credentials may be sent to `url`: same origin as the base, or both on
    /// loopback with the same scheme and port.
    fn may_send_credentials(&self, url: &Url) -> bool {
        if matches!(self.auth, Auth::None) || url.origin() == self.base.origin() {
            return true;
        }
        url.scheme() == self.base.scheme()
            && url.port_or_known_default() == self.base.port_or_known_default()
            && is_loopback(url)
            && is_loopback(&self.base)
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// One request being prepared, then sent (and retried) by [`Call::send`].
///
/// By default: the client's [`RetryPolicy`], the [`Decision::standard`] reading of
/// answers, no cancellation, no progress notes.
#[must_use = "a call does nothing until `send` is awaited"]
pub struct Call<'a> {
    client: &'a HttpClient,
    method: Method,
    url: Result<Url, ConnectorError>,
    headers: HeaderMap,
    query: Vec<(String, String)>,
    body: Option<Bytes>,
    classify: &'a dyn Classify,
    progress: Option<&'a dyn ProgressReporter>,
    cancel: Option<CancellationToken>,
    retry: Option<RetryPolicy>,
    error: Option<ConnectorError>,
}

impl<'a> Call<'a> {
    fn new(client: &'a HttpClient, method: Method, url: Result<Url, ConnectorError>) -> Self {
        Call {
            client,
            method,
            url,
            headers: HeaderMap::new(),
            query: Vec::new(),
            body: None,
            classify: &Standard,
            progress: None,
            cancel: None,
            retry: None,
            error: None,
        }
    }

    /// Adds a header. An invalid name or value makes [`Call::send`] fail.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        match (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            (Ok(n), Ok(v)) => {
                self.headers.insert(n, v);
            }
            _ => {
                self.error = Some(ConnectorError::Other(format!(
                    "invalid HTTP header {name:?}"
                )));
            }
        }
        self
    }

    /// Adds a query parameter (percent-encoded). Query strings never appear in errors
    /// or logs, so they may carry tokens.
    pub fn query(mut self, name: &str, value: &str) -> Self {
        self.query.push((name.to_string(), value.to_string()));
        self
    }

    /// Sets the body and its `Content-Type`.
    pub fn body(mut self, content_type: &str, body: impl Into<Bytes>) -> Self {
        self = self.header(CONTENT_TYPE.as_str(), content_type);
        self.body = Some(body.into());
        self
    }

    /// Reads answers with the connector's own rules instead of [`Decision::standard`].
    pub fn classify(mut self, classify: &'a dyn Classify) -> Self {
        self.classify = classify;
        self
    }

    /// Reports long waits (`Retry-After`, [`Decision::Wait`]) there.
    pub fn progress(mut self, progress: &'a dyn ProgressReporter) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Ends the call, and any wait, with [`ConnectorError::Cancelled`] when `cancel`
    /// is cancelled.
    pub fn cancel(mut self, cancel: CancellationToken) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// Retries this call under `policy` instead of the client's.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Sends the request, retrying as the policy and the classifier say.
    ///
    /// Returns the first answer the classifier accepts (with the standard classifier:
    /// any 1xx–3xx answer). Errors:
    /// - [`ConnectorError::Auth`] for a 401/403 the classifier fails;
    /// - [`ConnectorError::Call`] for any other failed answer, for a transport error,
    ///   and when retries ran out (the message says how many attempts over how long,
    ///   and the platform's last words);
    /// - [`ConnectorError::Cancelled`] when cancelled;
    /// - [`ConnectorError::Protocol`] for a link to another host (credentials withheld).
    pub async fn send(self) -> Result<Answer, ConnectorError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let url = self.url?;
        let call = format!("{} {}", self.method, url.path());
        if !self.client.may_send_credentials(&url) {
            let base = &self.client.base;
            let (what, configured) =
                if url.host_str() == base.host_str() && url.scheme() == base.scheme() {
                    (
                        format!("port {}", url.port_or_known_default().unwrap_or_default()),
                        format!("port {}", base.port_or_known_default().unwrap_or_default()),
                    )
                } else {
                    (
                        format!(
                            "{}://{}",
                            url.scheme(),
                            url.host_str().unwrap_or("another host")
                        ),
                        format!("{}://{}", base.scheme(), base.host_str().unwrap_or("?")),
                    )
                };
            return Err(ConnectorError::Protocol {
                call,
                message: format!(
                    "the link points to {what}, not to the configured base URL's {configured}; credentials withheld"
                ),
            });
        }
        let policy = self.retry.unwrap_or_else(|| self.client.retry.clone());
        let started = Instant::now();
        let mut attempts: u32 = 0;
        let mut waited = Duration::ZERO; // time spent in Decision::Wait sleeps
        loop {
            let mut request = self
                .client
                .inner
                .request(self.method.clone(), url.clone())
                .headers(self.headers.clone());
            if !self.query.is_empty() {
                request = request.query(&self.query);
            }
            if let Some(body) = &self.body {
                request = request.body(body.clone());
            }
            request = self.client.auth.apply(request);

            let slot = self.client.pacer.acquire(self.cancel.as_ref()).await?;
            let result = cancellable(self.cancel.as_ref(), exchange(request, &call, &url)).await?;
            drop(slot);
            let (delay, last_status, last_words) = match result {
                Ok(answer) => {
                    let decision = self.classify.classify(&answer);
                    tracing::debug!(call = %call, status = answer.status.as_u16(), ?decision, "answer");
                    match decision {
                        Decision::Accept => return Ok(answer),
                        Decision::Fail => return Err(answer.error()),
                        Decision::Retry => {
                            attempts += 1;
                            (
                                policy.backoff(attempts),
                                Some(answer.status.as_u16()),
                                answer.excerpt(),
                            )
                        }
                        Decision::RetryAfter(d) => {
                            attempts += 1;
                            (d, Some(answer.status.as_u16()), answer.excerpt())
                        }
                        Decision::Wait { delay, bound, note } => {
                            if waited >= bound {
                                return Err(ConnectorError::Call {
                                    call,
                                    status: Some(answer.status.as_u16()),
                                    message: format!(
                                        "gave up after waiting {}s ({note}): {}",
                                        waited.as_secs(),
                                        answer.excerpt()
                                    ),
                                });
                            }
                            let delay = delay.min(bound - waited);
                            tracing::info!(call = %call, delay_ms = delay.as_millis() as u64, "{note}; waiting");
                            if let Some(p) = self.progress {
                                p.note(&format!("{call}: {note}; waiting {}s", delay.as_secs()));
                            }
                            sleep(self.cancel.as_ref(), delay).await?;
                            waited += delay;
                            continue;
                        }
                    }
                }
                Err(transport) => {
                    attempts += 1;
                    if !policy.retry_transport_errors {
                        return Err(ConnectorError::Call {
                            call,
                            status: None,
                            message: transport,
                        });
                    }
                    (policy.backoff(attempts), None, transport)
                }
            };
            let spent = started.elapsed().saturating_sub(waited);
            let give_up = |why: String| ConnectorError::Call {
                call: call.clone(),
                status: last_status,
                message: format!(
                    "gave up after {attempts} attempt{} over {:.1}s ({why}): {}",
                    if attempts == 1 { "" } else { "s" },
                    spent.as_secs_f64(),
                    if last_words.is_empty() {
                        "no explanation given".to_string()
                    } else {
                        last_words.clone()
                    }
                ),
            };
            if attempts >= policy.max_attempts {
                return Err(give_up(format!("at most {} attempts", policy.max_attempts)));
            }
            if spent + delay > policy.max_elapsed {
                return Err(give_up(format!(
                    "next try in {:.1}s would pass the {}s bound",
                    delay.as_secs_f64(),
                    policy.max_elapsed.as_secs()
                )));
            }
            tracing::warn!(
                call = %call,
                status = last_status,
                attempt = attempts,
                delay_ms = delay.as_millis() as u64,
                "retrying: {last_words}"
            );
            if delay >= Duration::from_secs(5) {
                if let Some(p) = self.progress {
                    p.note(&format!(
                        "{call}: asked to wait; retrying in {}s",
                        delay.as_secs()
                    ));
                }
            }
            sleep(self.cancel.as_ref(), delay).await?;
        }
    }
}

/// One exchange: `Ok(Ok(answer))`, or `Ok(Err(text))` for a transport error (connection
/// refused, timeout, body cut short), described without the URL.
async fn exchange(
    request: reqwest::RequestBuilder,
    call: &str,
    url: &Url,
) -> Result<Result<Answer, String>, ConnectorError> {
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return Ok(Err(chain(e))),
    };
    let status = response.status();
    let headers = response.headers().clone();
    let body = match response.bytes().await {
        Ok(b) => b,
        Err(e) => return Ok(Err(chain(e))),
    };
    Ok(Ok(Answer {
        call: call.to_string(),
        url: url.clone(),
        status,
        headers,
        body,
    }))
}

/// A reqwest error and its causes in one line, without the URL (which may hold a
/// query string with secrets).
fn chain(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = if error.is_timeout() {
        "timed out".to_string()
    } else {
        error.to_string()
    };
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let part = cause.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    excerpt(&text)
}

async fn cancellable<T>(
    cancel: Option<&CancellationToken>,
    fut: impl std::future::Future<Output = Result<T, ConnectorError>>,
) -> Result<T, ConnectorError> {
    match cancel {
        None => fut.await,
        Some(token) => tokio::select! {
            _ = token.cancelled() => Err(ConnectorError::Cancelled),
            r = fut => r,
        },
    }
}

/// Sleeps `delay`, or returns [`ConnectorError::Cancelled`] as soon as `cancel` fires.
async fn sleep(cancel: Option<&CancellationToken>, delay: Duration) -> Result<(), ConnectorError> {
    cancellable(cancel, async {
        tokio::time::sleep(delay).await;
        Ok(())
    })
    .await
}
