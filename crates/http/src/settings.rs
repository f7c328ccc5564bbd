//! The connection settings every HTTP connector's section takes, written the same way
//! everywhere, and the one function that builds a client from them.
//!
//! In the file they stay flat in the connector's section:
//!
//! ```toml
//! [sinks.poppulo]
//! type = "poppulo"
//! base_url = "https://api.newsweaver.com/v2"   # the connector's default when left out
//! connect_timeout = "10s"
//! request_timeout = "2m"
//! max_attempts = 5
//! max_retry_time = "15m"
//! retry_backoff = "1s"
//! rate_limit = "1000/h"        # the platform's documented rate; "off" to not pace
//! max_in_flight = 5            # the most calls at once
//! ```
//!
//! Each connector gives its own defaults with an [`HttpDefaults`] type, in the manner of
//! Vector's `TowerRequestConfig<D>`, and parses its section with
//! [`HttpSettings::parse`], which splits these keys from the connector's own (each part
//! with `deny_unknown_fields`, so a misspelt key is an error naming it).

use std::time::Duration;

use contactsync_core::{ConfigError, ConnectorError, ConnectorSettings, DurationSetting};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::{Auth, ClientConfig, HttpClient, Pace, Rate, RetryPolicy};

/// A connector's defaults for its [`HttpSettings`]. Every constant has the shared
/// default; override the ones the platform needs.
pub trait HttpDefaults {
    /// The platform's API base when the section gives none; `None`: `base_url` is
    /// required.
    const BASE_URL: Option<&'static str> = None;
    /// `connect_timeout`.
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    /// `request_timeout`.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
    /// `max_attempts`.
    const MAX_ATTEMPTS: u32 = 5;
    /// `max_retry_time`.
    const MAX_RETRY_TIME: Duration = Duration::from_secs(600);
    /// `retry_backoff`.
    const RETRY_BACKOFF: Duration = Duration::from_secs(1);
    /// `rate_limit`: the platform's documented rate (none: not paced).
    const RATE_LIMIT: Option<Rate> = None;
    /// `max_in_flight`: the platform's bound on concurrent calls (none: unbounded).
    const MAX_IN_FLIGHT: Option<u32> = None;
}

/// A key a connector used to take, now one of [`HttpSettings::KEYS`]: still read, with
/// a deprecation warning.
#[derive(Debug, Clone, Copy)]
pub struct OldKey {
    /// The old name (`timeout_secs`).
    pub name: &'static str,
    /// The key it stands for (`request_timeout`).
    pub now: &'static str,
    /// The unit of its bare number: the new keys read a bare number as seconds.
    pub unit: OldUnit,
}

/// The unit of an [`OldKey`]'s number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldUnit {
    /// A plain value, read as the new key reads it (seconds for a duration).
    Same,
    /// Milliseconds.
    Millis,
}

/// The section's connection settings, with the connector's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// `base_url`, trimmed.
    pub base_url: String,
    /// `connect_timeout`: the longest wait for a TCP/TLS connection.
    pub connect_timeout: Duration,
    /// `request_timeout`: the longest wait for one whole request, body included.
    pub request_timeout: Duration,
    /// `max_attempts`: the most attempts of one call on transient failures (at least 1).
    pub max_attempts: u32,
    /// `max_retry_time`: the most time one call spends retrying.
    pub max_retry_time: Duration,
    /// `retry_backoff`: the first backoff after a transient failure (doubles at each
    /// retry).
    pub retry_backoff: Duration,
    /// `rate_limit` and `max_in_flight`: how the client paces its calls.
    pub pace: Pace,
}

/// The keys as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Written {
    base_url: Option<String>,
    connect_timeout: Option<DurationSetting>,
    request_timeout: Option<DurationSetting>,
    max_attempts: Option<u32>,
    max_retry_time: Option<DurationSetting>,
    retry_backoff: Option<DurationSetting>,
    rate_limit: Option<String>,
    max_in_flight: Option<u32>,
}

impl HttpSettings {
    /// The keys of the group, as written in a connector's section.
    pub const KEYS: &'static [&'static str] = &[
        "base_url",
        "connect_timeout",
        "request_timeout",
        "max_attempts",
        "max_retry_time",
        "retry_backoff",
        "rate_limit",
        "max_in_flight",
    ];

    /// Parses a connector's section: its own settings into `T` (which should
    /// `deny_unknown_fields`) and these keys, with `D`'s defaults.
    pub fn parse<D: HttpDefaults, T: DeserializeOwned>(
        settings: &ConnectorSettings,
    ) -> Result<(T, HttpSettings), ConfigError> {
        Self::parse_with_old_keys::<D, T>(settings, &[])
    }

    /// As [`HttpSettings::parse`], also reading `old` keys (with a warning naming the
    /// key to write instead). A section giving both an old key and its new one is an
    /// error naming the old key.
    pub fn parse_with_old_keys<D: HttpDefaults, T: DeserializeOwned>(
        settings: &ConnectorSettings,
        old: &[OldKey],
    ) -> Result<(T, HttpSettings), ConfigError> {
        let renamed = rename_old_keys(settings, old)?;
        let (own, group) = renamed.split(Self::KEYS);
        let own: T = own.parse()?;
        let written: Written = group.parse()?;
        let base_url = match written.base_url.or(D::BASE_URL.map(str::to_string)) {
            Some(url) if !url.trim().is_empty() => url.trim().to_string(),
            Some(_) => return Err(settings.error("base_url", "empty")),
            None => return Err(settings.error("base_url", "missing: the platform's URL")),
        };
        let positive = |key: &str, value: Option<DurationSetting>, default: Duration| {
            let value = value.map_or(default, |v| v.0);
            if value.is_zero() {
                Err(settings.error(key, "must be more than 0"))
            } else {
                Ok(value)
            }
        };
        let max_attempts = written.max_attempts.unwrap_or(D::MAX_ATTEMPTS);
        if max_attempts == 0 {
            return Err(settings.error("max_attempts", "must be at least 1"));
        }
        let rate = match written.rate_limit.as_deref().map(str::trim) {
            None => D::RATE_LIMIT,
            Some(off) if off.eq_ignore_ascii_case("off") => None,
            Some(text) => Some(Rate::parse(text).map_err(|e| settings.error("rate_limit", e))?),
        };
        let max_in_flight = match written.max_in_flight {
            None => D::MAX_IN_FLIGHT,
            Some(0) => return Err(settings.error("max_in_flight", "must be at least 1")),
            Some(n) => Some(n),
        };
        let http = HttpSettings {
            base_url,
            connect_timeout: positive(
                "connect_timeout",
                written.connect_timeout,
                D::CONNECT_TIMEOUT,
            )?,
            request_timeout: positive(
                "request_timeout",
                written.request_timeout,
                D::REQUEST_TIMEOUT,
            )?,
            max_attempts,
            max_retry_time: written.max_retry_time.map_or(D::MAX_RETRY_TIME, |v| v.0),
            retry_backoff: written.retry_backoff.map_or(D::RETRY_BACKOFF, |v| v.0),
            pace: Pace {
                rate,
                max_in_flight,
            },
        };
        Ok((own, http))
    }

    /// The retry policy these settings give (the shared default's other bounds).
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            base_backoff: self.retry_backoff,
            max_elapsed: self.max_retry_time,
            ..RetryPolicy::default()
        }
    }

    /// The client for these settings, against `base_url` (the connector may have
    /// completed the configured one, as Business Catalyst adds the `.asmx` path).
    pub fn client(
        &self,
        base_url: &str,
        user_agent_suffix: &str,
        default_headers: crate::header::HeaderMap,
        auth: Auth,
    ) -> Result<HttpClient, ConnectorError> {
        let mut config = ClientConfig::new(base_url)?;
        config.connect_timeout = self.connect_timeout;
        config.request_timeout = self.request_timeout;
        config.user_agent_suffix = Some(user_agent_suffix.to_string());
        config.retry = self.retry_policy();
        config.default_headers = default_headers;
        config.pace = self.pace;
        HttpClient::new(config, auth)
    }
}

/// The section with every old key given renamed to the key it stands for.
fn rename_old_keys(
    settings: &ConnectorSettings,
    old: &[OldKey],
) -> Result<ConnectorSettings, ConfigError> {
    if !old.iter().any(|o| settings.has(o.name)) {
        return Ok(settings.clone());
    }
    let mut table = settings
        .values
        .clone()
        .into_table()
        .map_err(|e| ConfigError::section(&settings.section, e.to_string()))?;
    for key in old {
        let Some(value) = table.remove(key.name) else {
            continue;
        };
        if table.contains_key(key.now) {
            return Err(settings.error(
                key.name,
                format!("give `{}` only (`{}` is its old name)", key.now, key.name),
            ));
        }
        let value = match key.unit {
            OldUnit::Same => value,
            OldUnit::Millis => {
                let millis = value
                    .clone()
                    .into_uint()
                    .map_err(|e| settings.error(key.name, e.to_string()))?;
                config::Value::new(None, format!("{millis}ms"))
            }
        };
        tracing::warn!(
            "[{}] `{}` is deprecated: write `{}` (a duration: `30`, \"30s\", \"500ms\")",
            settings.section,
            key.name,
            key.now
        );
        table.insert(key.now.to_string(), value);
    }
    Ok(ConnectorSettings {
        values: config::Value::new(None, config::ValueKind::Table(table)),
        ..settings.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Defaults;
    impl HttpDefaults for Defaults {
        const BASE_URL: Option<&'static str> = Some("https://api.example.com/v2");
        const MAX_ATTEMPTS: u32 = 6;
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Own {
        account: String,
    }

    fn parse(toml: &str) -> Result<(Own, HttpSettings), ConfigError> {
        let settings = ConnectorSettings::from_toml("sinks.x", toml)?;
        HttpSettings::parse_with_old_keys::<Defaults, Own>(
            &settings,
            &[OldKey {
                name: "retry_backoff_ms",
                now: "retry_backoff",
                unit: OldUnit::Millis,
            }],
        )
    }

    #[test]
    fn defaults_per_connector_and_durations() {
        let (own, http) = parse("account = \"a\"").expect("parsed");
        assert_eq!(own.account, "a");
        assert_eq!(http.base_url, "https://api.example.com/v2");
        assert_eq!(http.max_attempts, 6);
        assert_eq!(http.request_timeout, Duration::from_secs(60));
        let (_, http) = parse("account = \"a\"\nrequest_timeout = \"2m\"\nretry_backoff_ms = 250")
            .expect("parsed");
        assert_eq!(http.request_timeout, Duration::from_secs(120));
        assert_eq!(http.retry_backoff, Duration::from_millis(250));
    }

    #[test]
    fn errors_name_the_key() {
        let message = |toml: &str| parse(toml).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message("account = \"a\"\nconect_timeout = 5").contains("conect_timeout"));
        assert!(message("account = \"a\"\nrequest_timeout = \"soon\"").contains("request_timeout"));
        assert!(message("account = \"a\"\nmax_attempts = 0").contains("max_attempts"));
        assert!(message("account = \"a\"\nconnect_timeout = 0").contains("connect_timeout"));
        assert!(message("account = \"a\"\nbase_url = \" \"").contains("base_url"));
        assert!(message("").contains("account"));
        assert!(
            message("account = \"a\"\nretry_backoff = 1\nretry_backoff_ms = 5")
                .contains("retry_backoff_ms"),
            "an old key beside its new one is refused"
        );
    }
}
