//! The one HTTP layer every contactsync connector shares.
//!
//! Platforms throttle, time out and fail in the night; a connector that retried on its
//! own rules would sooner or later hammer one of them, leak a password into a log, or
//! give up on a blip. So every connector talks HTTP through an [`HttpClient`], which
//! gives it, once and for all:
//!
//! - connect and request timeouts, and a `User-Agent: contactsync/<version>`;
//! - a [`RetryPolicy`]: bounded attempts, exponential backoff with jitter, a bound on
//!   the total time spent retrying; `Retry-After` (seconds or HTTP-date) honoured on
//!   429 and 503; 5xx, 408/429 and dropped connections or timeouts retried; any other
//!   4xx never retried;
//! - a hook, [`Classify`], through which the connector decides what an answer means
//!   (Poppulo's "503 without `Retry-After`" is another import running: [`Decision::Wait`]
//!   longer, with its own bound);
//! - errors that are [`ConnectorError`]s naming the call (`POST /v2/acme/subscriber_imports`:
//!   method and path, never the query string nor credentials), the status and the
//!   platform's own words, truncated;
//! - credentials ([`Auth`]) that never appear in `Debug` output or logs, and that are
//!   only sent to the configured base URL's origin;
//! - waits that end at once when the run is cancelled ([`CancellationToken`]).
//!
//! What it is not: it knows no platform, no XML, no JSON. Connectors parse bodies.
//!
//! Start reading at [`HttpSettings`] (the connection keys every HTTP connector's section
//! takes, with its own defaults, and the client built from them), then [`HttpClient`],
//! [`Call`] (one request and its retries) and [`Answer`] (what came back).
//! [`multipart`] builds `multipart/form-data` bodies.
//!
//! # Example
//! ```no_run
//! use contactsync_http::{Auth, HttpClient, ClientConfig, Decision, Answer, SecretString};
//!
//! # async fn demo() -> Result<(), contactsync_core::ConnectorError> {
//! let settings = ClientConfig::new("https://api.example.com/v2")?;
//! let auth = Auth::basic("api-user", SecretString::from("s3cret"));
//! let client = HttpClient::new(settings, auth)?;
//!
//! // GET https://api.example.com/v2/acme/subscribers?status=all, retried per policy;
//! // any answer that is not 2xx (after retries) is an `Err(ConnectorError)`.
//! let answer = client
//!     .get("acme/subscribers")
//!     .query("status", "all")
//!     .header("Accept", "application/xml")
//!     .send()
//!     .await?;
//! println!("{}", answer.text());
//!
//! // A connector-specific reading of answers: 409 handed back to the caller.
//! let classify = |a: &Answer| match a.status().as_u16() {
//!     409 => Decision::Accept,
//!     _ => Decision::standard(a),
//! };
//! let answer = client
//!     .post("acme/subscriber_imports")
//!     .body("application/xml; charset=UTF-8", "<subscriber_import_job/>")
//!     .classify(&classify)
//!     .send()
//!     .await?;
//! if answer.status().as_u16() == 409 {
//!     return Err(answer.error());
//! }
//! # Ok(()) }
//! ```

mod answer;
mod auth;
mod client;
pub mod multipart;
pub mod pace;
mod retry;
mod settings;
/// The TLS client configuration every TLS connection shares (the `contactsync-tls`
/// crate, also used by the PostgreSQL state).
pub use contactsync_tls as tls;

pub use answer::Answer;
pub use auth::Auth;
pub use client::{Call, ClientConfig, HttpClient};
pub use pace::{Pace, Rate};
pub use retry::{parse_retry_after, Classify, Decision, RetryPolicy};
pub use settings::{HttpDefaults, HttpSettings, OldKey, OldUnit};

pub use contactsync_core::{CancellationToken, ConnectorError, SecretString};
/// Re-exported so that connectors name methods, statuses and headers without their own
/// `reqwest` dependency.
pub use reqwest::{header, Method, StatusCode, Url};

/// The `User-Agent` every request carries, before any connector suffix.
pub const USER_AGENT: &str = concat!("contactsync/", env!("CARGO_PKG_VERSION"));
