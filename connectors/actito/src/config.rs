//! What a user writes in a `[sinks.NAME]` or `[sources.NAME]` section with
//! `type = "actito"`, checked once at build time so that a misspelt key is a config
//! error naming the key rather than a 400 in the night.
//!
//! The attribute mapping is only *declared* here: which Actito attribute a canonical
//! field lands in is resolved against the table's structure, read from the platform in
//! `check`/`begin` (see [`crate::schema`]), because the defaults are found by type.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use contactsync_core::{ConfigError, ConnectorSettings, DurationSetting, Field, SecretString};
use contactsync_http::{HttpDefaults, HttpSettings, Rate};
use serde::Deserialize;

/// The API base when none is configured.
pub const DEFAULT_BASE_URL: &str = "https://api.actito.com";

/// Actito's defaults for the connection settings (`base_url`, timeouts, retries).
#[derive(Debug)]
pub struct ActitoDefaults;

impl HttpDefaults for ActitoDefaults {
    /// `api1`, `api3`, `api-pre1` hosts serve other environments.
    const BASE_URL: Option<&'static str> = Some(DEFAULT_BASE_URL);
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
    const MAX_ATTEMPTS: u32 = 6;
    /// "100 calls a minute per licence: beyond that calls are slowed".
    const RATE_LIMIT: Option<Rate> = Some(Rate::per_minute(100));
    /// "5 concurrent requests per licence: the 6th gets 429".
    const MAX_IN_FLIGHT: Option<u32> = Some(5);
}

/// The bulk imports Actito allows per table per day.
pub const BULK_IMPORTS_PER_DAY: u32 = 12;

/// How a removal is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Removal {
    /// Unsubscribe the person from the managed subscriptions; the profile stays.
    #[default]
    Unsubscribe,
    /// Delete the profile.
    Delete,
}

/// What to do when the day's bulk imports are used up and a run wants one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuotaExhausted {
    /// Send the changes one profile at a time instead.
    #[default]
    OneByOne,
    /// Stop the run with a limit error.
    Stop,
}

fn d_poll() -> DurationSetting {
    DurationSetting::secs(5)
}
fn d_import_wait() -> DurationSetting {
    DurationSetting::secs(6 * 3600)
}
/// One bulk import a batch, and twelve a day: a first sync of 100,000 is one import.
fn d_max_batch() -> usize {
    100_000
}
fn d_page_size() -> usize {
    500
}
/// One below the licence's 5 in flight, so that another client of the same licence (an
/// admin's export, a second job) is not refused while a run writes.
fn d_concurrency() -> usize {
    4
}

/// Settings shared by the sink and the source sections.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSettings {
    /// The entity's name.
    pub entity: String,
    /// The profile table's name.
    pub table: String,
    /// The API key (better: `api_key_file`, or the environment).
    pub api_key: Option<SecretString>,
    /// A file holding the API key.
    pub api_key_file: Option<PathBuf>,
    /// Canonical field (or `attributes.NAME`) → Actito attribute, over the defaults
    /// found by type; `""` unmaps a default.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Contact subscription name → Actito subscription. These are the *managed*
    /// subscriptions: set or cleared on every write, and left on removal. Empty: every
    /// subscription of the table, matched by name (case-insensitive).
    #[serde(default)]
    pub subscriptions: BTreeMap<String, String>,
    /// Canonical field (or `attributes.NAME`) → segmentation category: the field's
    /// value names the segmentation the profile belongs to.
    #[serde(default)]
    pub segmentations: BTreeMap<String, String>,
    /// Change-set size at or above which a run uses bulk imports. Unset (the
    /// default): the run goes bulk when that is quicker at the documented rate
    /// ([`crate::cost`]).
    #[serde(default)]
    pub bulk_threshold: Option<u64>,
    /// `one-by-one` (default) or `stop` when the day's 12 bulk imports are used.
    #[serde(default)]
    pub when_bulk_quota_exhausted: QuotaExhausted,
    /// `unsubscribe` (default) or `delete`.
    #[serde(default)]
    pub removal: Removal,
    /// The most changes in one batch (one bulk import at most per batch).
    #[serde(default = "d_max_batch")]
    pub max_batch: usize,
    /// One-by-one calls in flight at once (at most 5, Actito's limit per licence).
    #[serde(default = "d_concurrency")]
    pub concurrency: usize,
    /// Wait between polls of a running import.
    #[serde(default = "d_poll")]
    pub poll_interval: DurationSetting,
    /// Most time to follow one import; past it its rows are reported unknown and the
    /// next run waits for the same import.
    #[serde(default = "d_import_wait")]
    pub max_import_wait: DurationSetting,
}

/// The `[sources.NAME]` section, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// The entity's name.
    pub entity: String,
    /// The profile table's name.
    pub table: String,
    /// The API key.
    pub api_key: Option<SecretString>,
    /// A file holding the API key.
    pub api_key_file: Option<PathBuf>,
    /// As for the sink.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// As for the sink: Actito subscriptions are read back under the contact name.
    #[serde(default)]
    pub subscriptions: BTreeMap<String, String>,
    /// Profiles per page (`number`).
    #[serde(default = "d_page_size")]
    pub page_size: usize,
}

/// Where and how to reach the table: what sources and sinks share.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The connection settings (`base_url`, timeouts, retries).
    pub http: HttpSettings,
    /// Entity name.
    pub entity: String,
    /// Profile table name.
    pub table: String,
    /// The API key (never printed).
    pub api_key: SecretString,
}

/// The declared mapping: canonical field → Actito name, `None` for "unmapped on
/// purpose" (`""` in the config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    /// Field → attribute overrides.
    pub attributes: BTreeMap<Field, Option<String>>,
    /// Contact subscription → Actito subscription.
    pub subscriptions: BTreeMap<String, String>,
    /// Field → segmentation category.
    pub segmentations: BTreeMap<Field, String>,
}

/// The sink's settings, checked.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// The config section (`sinks.actito`), for errors found against the table.
    pub section: String,
    /// How to reach the table.
    pub connection: Connection,
    /// The declared mapping.
    pub mapping: Mapping,
    /// Bulk at or above this many changes; `None`: when quicker at the rate.
    pub bulk_threshold: Option<u64>,
    /// What to do without bulk quota.
    pub when_bulk_quota_exhausted: QuotaExhausted,
    /// Removal policy.
    pub removal: Removal,
    /// Most changes per batch.
    pub max_batch: usize,
    /// One-by-one calls in flight.
    pub concurrency: usize,
    /// Import poll interval.
    pub poll_interval: Duration,
    /// Most time following one import.
    pub max_import_wait: Duration,
}

/// The source's settings, checked.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The config section, for errors found against the table.
    pub section: String,
    /// How to reach the table.
    pub connection: Connection,
    /// The declared mapping.
    pub mapping: Mapping,
    /// Profiles per page.
    pub page_size: usize,
}

fn parse_mapping(
    settings: &ConnectorSettings,
    attributes: BTreeMap<String, String>,
    subscriptions: BTreeMap<String, String>,
    segmentations: BTreeMap<String, String>,
) -> Result<Mapping, ConfigError> {
    let mut mapping = Mapping::default();
    for (field, attr) in attributes {
        let parsed = Field::parse(&field);
        if matches!(parsed, Field::Subscriptions | Field::UpdatedAt) {
            return Err(settings.error(
                &format!("attributes.{field}"),
                "subscriptions are mapped with `subscriptions`, and updated_at is Actito's own",
            ));
        }
        let attr = attr.trim();
        mapping
            .attributes
            .insert(parsed, (!attr.is_empty()).then(|| attr.to_string()));
    }
    for (name, target) in subscriptions {
        if target.trim().is_empty() {
            return Err(settings.error(
                &format!("subscriptions.{name}"),
                "empty Actito subscription name",
            ));
        }
        mapping
            .subscriptions
            .insert(name.trim().to_string(), target.trim().to_string());
    }
    for (field, category) in segmentations {
        if category.trim().is_empty() {
            return Err(settings.error(
                &format!("segmentations.{field}"),
                "empty segmentation category",
            ));
        }
        mapping
            .segmentations
            .insert(Field::parse(&field), category.trim().to_string());
    }
    Ok(mapping)
}

fn check_name(settings: &ConnectorSettings, key: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(settings.error(key, "empty; name the Actito entity and profile table"));
    }
    Ok(())
}

impl SinkConfig {
    /// Parses and checks a `[sinks.NAME]` section.
    pub fn from_settings(settings: &ConnectorSettings) -> Result<Self, ConfigError> {
        let (s, http): (SinkSettings, _) = HttpSettings::parse::<ActitoDefaults, _>(settings)?;
        check_name(settings, "entity", &s.entity)?;
        check_name(settings, "table", &s.table)?;
        let api_key = settings.secret("api_key", s.api_key, s.api_key_file.as_deref())?;
        if s.concurrency == 0 || s.concurrency > 5 {
            return Err(settings.error(
                "concurrency",
                "between 1 and 5 (Actito refuses a 6th concurrent request)",
            ));
        }
        if s.max_batch == 0 {
            return Err(settings.error("max_batch", "must be at least 1"));
        }
        let mapping = parse_mapping(settings, s.attributes, s.subscriptions, s.segmentations)?;
        Ok(SinkConfig {
            section: settings.section.clone(),
            connection: Connection {
                http,
                entity: s.entity.trim().to_string(),
                table: s.table.trim().to_string(),
                api_key,
            },
            mapping,
            bulk_threshold: s.bulk_threshold.map(|t| t.max(1)),
            when_bulk_quota_exhausted: s.when_bulk_quota_exhausted,
            removal: s.removal,
            max_batch: s.max_batch,
            concurrency: s.concurrency,
            poll_interval: s.poll_interval.0.max(Duration::from_millis(10)),
            max_import_wait: s.max_import_wait.0,
        })
    }
}

impl SourceConfig {
    /// Parses and checks a `[sources.NAME]` section.
    pub fn from_settings(settings: &ConnectorSettings) -> Result<Self, ConfigError> {
        let (s, http): (SourceSettings, _) = HttpSettings::parse::<ActitoDefaults, _>(settings)?;
        check_name(settings, "entity", &s.entity)?;
        check_name(settings, "table", &s.table)?;
        let api_key = settings.secret("api_key", s.api_key, s.api_key_file.as_deref())?;
        if s.page_size == 0 || s.page_size > 1000 {
            return Err(settings.error("page_size", "between 1 and 1000"));
        }
        let mapping = parse_mapping(settings, s.attributes, s.subscriptions, BTreeMap::new())?;
        Ok(SourceConfig {
            section: settings.section.clone(),
            connection: Connection {
                http,
                entity: s.entity.trim().to_string(),
                table: s.table.trim().to_string(),
                api_key,
            },
            mapping,
            page_size: s.page_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> ConnectorSettings {
        ConnectorSettings::from_toml("sinks.actito", toml).expect("toml")
    }

    #[test]
    fn debug_never_shows_the_api_key() {
        let c = SinkConfig::from_settings(&settings(
            "entity = \"demo\"\ntable = \"contacts\"\napi_key = \"s3cret-key\"",
        ))
        .expect("config");
        let client = crate::client::ActitoClient::new(&c.connection).expect("client");
        for shown in [format!("{c:?}"), format!("{client:?}")] {
            assert!(!shown.contains("s3cret-key"), "{shown}");
        }
    }

    #[test]
    fn minimal_sink_settings_take_the_defaults() {
        let c = SinkConfig::from_settings(&settings(
            "entity = \"demo\"\ntable = \"contacts\"\napi_key = \"k\"",
        ))
        .expect("config");
        assert_eq!(c.connection.http.base_url, DEFAULT_BASE_URL);
        assert_eq!(c.bulk_threshold, None, "chosen on time at the rate");
        assert_eq!(
            c.connection.http.pace.rate,
            Some(contactsync_http::Rate::per_minute(100))
        );
        assert_eq!(c.connection.http.pace.max_in_flight, Some(5));
        assert_eq!(c.concurrency, 4, "headroom under the licence's 5");
        assert_eq!(c.removal, Removal::Unsubscribe);
        assert_eq!(c.when_bulk_quota_exhausted, QuotaExhausted::OneByOne);
        assert!(!format!("{c:?}").contains("\"k\""));
    }

    #[test]
    fn misspelt_key_and_bad_values_are_errors() {
        assert!(SinkConfig::from_settings(&settings(
            "entity = \"d\"\ntable = \"t\"\napi_key = \"k\"\nbulk_treshold = 3"
        ))
        .is_err());
        let e = SinkConfig::from_settings(&settings(
            "entity = \"d\"\ntable = \"t\"\napi_key = \"k\"\nconcurrency = 6",
        ))
        .expect_err("concurrency");
        assert_eq!(e.key.as_deref(), Some("concurrency"));
        let c = SinkConfig::from_settings(&settings(
            "entity = \"d\"\ntable = \"t\"\napi_key = \"k\"\nwhen_bulk_quota_exhausted = \"stop\"\nremoval = \"delete\"\n[attributes]\nexternal_id = \"customerId\"\nfirst_name = \"\"",
        ))
        .expect("config");
        assert_eq!(c.when_bulk_quota_exhausted, QuotaExhausted::Stop);
        assert_eq!(c.removal, Removal::Delete);
        assert_eq!(
            c.mapping.attributes.get(&Field::ExternalId),
            Some(&Some("customerId".to_string()))
        );
        assert_eq!(c.mapping.attributes.get(&Field::FirstName), Some(&None));
    }
}
