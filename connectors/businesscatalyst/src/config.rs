//! What the user writes in a `type = "businesscatalyst"` section, and its validation.
//!
//! Settings are checked when the connector is built (before any network call), so a
//! misspelt key, an unknown time zone or a batch over the service's limit is a config
//! error that names the key.
//!
//! ```toml
//! [sources.bc]
//! type = "businesscatalyst"
//! base_url = "https://example.worldsecuresystems.com"
//! site_id = 123456
//! username = "api@example.com"   # empty: site-token mode, the token is the password
//! password_file = "bc-password.txt"
//! time_zone = "Europe/London"
//! phone_types = { "3" = "phone", "5" = "mobile" }
//! addresses = { "2" = "work" }   # attributes work_address_line1, work_city, …
//! crm_fields = { "Member Level" = "attributes.level" }  # default: every field
//! removal = "delete"             # or "opt_out"
//! batch_size = 100
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono_tz::Tz;
use contactsync_core::{ConfigError, ConnectorSettings, Field, SecretString};
use contactsync_http::{HttpDefaults, HttpSettings, OldKey, OldUnit};
use serde::Deserialize;

/// The service's path under the site URL.
pub const ENDPOINT_PATH: &str = "/catalystwebservice/catalystcrmwebservice.asmx";
/// The most records `ContactList_UpdateInsert` takes per call.
pub const MAX_BATCH: usize = 100;

/// Business Catalyst's defaults for the connection settings: the shared ones, and no
/// default site.
#[derive(Debug)]
pub struct BcDefaults;

impl HttpDefaults for BcDefaults {}

/// The keys this connector took before the shared connection settings, still read
/// (with a deprecation warning): whole seconds, and milliseconds for the backoff.
pub const OLD_KEYS: &[OldKey] = &[
    OldKey {
        name: "timeout_secs",
        now: "request_timeout",
        unit: OldUnit::Same,
    },
    OldKey {
        name: "connect_timeout_secs",
        now: "connect_timeout",
        unit: OldUnit::Same,
    },
    OldKey {
        name: "retry_backoff_ms",
        now: "retry_backoff",
        unit: OldUnit::Millis,
    },
];

/// How a removal is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Removal {
    /// `Contact_DeleteByEntityID` / `Contact_DeleteByEmailAddress`, one call each.
    #[default]
    Delete,
    /// An update with `MasterOptIn=false`: the contact is kept, and not mailed.
    OptOut,
}

/// The settings as written (see the module example), but for the connection settings
/// ([`HttpSettings`]: `base_url`, the site or the full `.asmx` URL; `request_timeout`,
/// default 60 s; `connect_timeout`, 10 s; `max_attempts` on transport errors and HTTP
/// 5xx without a SOAP Fault, which is never retried, 5; `retry_backoff`, 1 s; and
/// `max_retry_time`). Unknown keys are errors.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BcSettings {
    /// The site id (API Integration page).
    pub site_id: i64,
    /// The API user; empty for site-token mode.
    #[serde(default)]
    pub username: String,
    /// The password (or site token).
    #[serde(default)]
    pub password: Option<SecretString>,
    /// A file holding the password (or site token).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The site's IANA time zone: BC's dates carry none. Default `UTC`.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// `phoneNoTypeID` → field (`phone`, `mobile`, `attributes.fax`, …).
    /// Default `{ "3" = "phone", "5" = "mobile" }`.
    #[serde(default)]
    pub phone_types: Option<BTreeMap<String, String>>,
    /// `addressTypeID` → attribute prefix: the parts of that address become the
    /// attributes `PREFIX_address_line1`, `PREFIX_address_line2`, `PREFIX_city`,
    /// `PREFIX_zipcode`, `PREFIX_state`, `PREFIX_country_code`. Default: none.
    #[serde(default)]
    pub addresses: BTreeMap<String, String>,
    /// CRM form `fieldName` → field. Default: every CRM form field becomes the
    /// attribute named by its `fieldName` (read only: see the sink).
    #[serde(default)]
    pub crm_fields: Option<BTreeMap<String, String>>,
    /// `delete` (default) or `opt_out`.
    #[serde(default)]
    pub removal: Removal,
    /// Records per `ContactList_UpdateInsert`, at most 100 (the default).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// After upserting new contacts, look each one's `entityId` up
    /// (`Contact_RetrieveByExternalID`/`ByEmailAddress`, one call per new contact) so
    /// later updates and deletions address it by id. Default false.
    #[serde(default)]
    pub resolve_entity_ids: bool,
}

/// The validated configuration the client, source and sink run with. `Debug` shows
/// the password as redacted (a [`SecretString`]).
#[derive(Debug, Clone)]
pub struct BcConfig {
    /// The `.asmx` endpoint URL.
    pub endpoint: String,
    /// The site id.
    pub site_id: i64,
    /// The API user (empty: site-token mode).
    pub username: String,
    /// The password or token.
    pub password: SecretString,
    /// The site's time zone.
    pub time_zone: Tz,
    /// `phoneNoTypeID` → field.
    pub phone_types: BTreeMap<u32, Field>,
    /// `addressTypeID` → attribute prefix.
    pub addresses: BTreeMap<u32, String>,
    /// CRM form field name → field; `None`: every field to the attribute of its name.
    pub crm_fields: Option<BTreeMap<String, Field>>,
    /// The removal policy.
    pub removal: Removal,
    /// Records per upsert call.
    pub batch_size: usize,
    /// The connection settings (timeouts, retries; `base_url` as configured).
    pub http: HttpSettings,
    /// Look up entity ids of new contacts.
    pub resolve_entity_ids: bool,
}

/// The attribute suffixes an address is spread over, in `Address` element order.
pub const ADDRESS_PARTS: [&str; 6] = [
    "address_line1",
    "address_line2",
    "city",
    "zipcode",
    "state",
    "country_code",
];

impl BcConfig {
    /// Parses and validates a section.
    pub fn from_settings(settings: &ConnectorSettings) -> Result<BcConfig, ConfigError> {
        let (raw, http): (BcSettings, _) =
            HttpSettings::parse_with_old_keys::<BcDefaults, _>(settings, OLD_KEYS)?;
        let password = settings.secret("password", raw.password, raw.password_file.as_deref())?;
        let endpoint = endpoint_url(&http.base_url).map_err(|m| settings.error("base_url", m))?;
        let time_zone = match raw.time_zone.as_deref().map(str::trim) {
            None | Some("") => Tz::UTC,
            Some(name) => name.parse().map_err(|_| {
                settings.error(
                    "time_zone",
                    format!("unknown IANA time zone {name:?} (e.g. Europe/London)"),
                )
            })?,
        };
        let phone_raw = raw.phone_types.unwrap_or_else(|| {
            BTreeMap::from([
                ("3".to_string(), "phone".to_string()),
                ("5".to_string(), "mobile".to_string()),
            ])
        });
        let mut phone_types = BTreeMap::new();
        for (id, field) in phone_raw {
            let type_id = parse_type_id(&id).map_err(|m| settings.error("phone_types", m))?;
            phone_types.insert(type_id, Field::parse(&field));
        }
        let mut addresses = BTreeMap::new();
        for (id, prefix) in raw.addresses {
            let type_id = parse_type_id(&id).map_err(|m| settings.error("addresses", m))?;
            let prefix = prefix.trim().to_string();
            if prefix.is_empty() {
                return Err(settings.error(
                    "addresses",
                    format!("address type {id}: the prefix is empty"),
                ));
            }
            addresses.insert(type_id, prefix);
        }
        let crm_fields = raw.crm_fields.map(|m| {
            m.into_iter()
                .map(|(name, field)| (name, Field::parse(&field)))
                .collect()
        });
        let batch_size = raw.batch_size.unwrap_or(MAX_BATCH);
        if batch_size == 0 || batch_size > MAX_BATCH {
            return Err(settings.error(
                "batch_size",
                format!("{batch_size} is out of range: Business Catalyst takes 1 to {MAX_BATCH} records per call"),
            ));
        }
        Ok(BcConfig {
            endpoint,
            site_id: raw.site_id,
            username: raw.username.trim().to_string(),
            password,
            time_zone,
            phone_types,
            addresses,
            crm_fields,
            removal: raw.removal,
            batch_size,
            http,
            resolve_entity_ids: raw.resolve_entity_ids,
        })
    }
}

fn parse_type_id(id: &str) -> Result<u32, String> {
    id.trim()
        .parse()
        .map_err(|_| format!("{id:?} is not a type id (a number, e.g. \"3\")"))
}

/// The `.asmx` URL for a site URL: the service path appended, unless the URL already
/// names an `.asmx`.
pub fn endpoint_url(base_url: &str) -> Result<String, String> {
    let base = base_url.trim();
    if !(base.starts_with("https://") || base.starts_with("http://")) {
        return Err(format!(
            "{base:?} is not an http(s) URL (e.g. https://example.worldsecuresystems.com)"
        ));
    }
    if base.to_ascii_lowercase().ends_with(".asmx") {
        return Ok(base.to_string());
    }
    Ok(format!("{}{ENDPOINT_PATH}", base.trim_end_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings(toml: &str) -> ConnectorSettings {
        ConnectorSettings::from_toml("sources.bc", toml).unwrap()
    }

    #[test]
    fn defaults() {
        let c = BcConfig::from_settings(&settings(
            "base_url = \"https://x.worldsecuresystems.com/\"\nsite_id = 5\nusername = \"u\"\npassword = \"p\"",
        ))
        .unwrap();
        assert_eq!(
            c.endpoint,
            "https://x.worldsecuresystems.com/catalystwebservice/catalystcrmwebservice.asmx"
        );
        assert_eq!(c.phone_types.get(&3), Some(&Field::Phone));
        assert_eq!(c.phone_types.get(&5), Some(&Field::Mobile));
        assert_eq!(c.batch_size, 100);
        assert_eq!(c.removal, Removal::Delete);
        assert_eq!(c.time_zone, Tz::UTC);
        assert!(!format!("{c:?}").contains("\"p\""));
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = BcConfig::from_settings(&settings(
            "base_url = \"https://x\"\nsite_id = 5\nusername = \"u\"\npassword = \"s3cret-pw\"",
        ))
        .unwrap();
        let client = crate::client::BcClient::new(&c).unwrap();
        for shown in [format!("{c:?}"), format!("{client:?}")] {
            assert!(!shown.contains("s3cret-pw"), "{shown}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let base = "base_url = \"https://x\"\nsite_id = 5\npassword = \"p\"\n";
        let err = |extra: &str| {
            BcConfig::from_settings(&settings(&format!("{base}{extra}")))
                .err()
                .unwrap()
                .to_string()
        };
        for (extra, named) in [
            ("batch_size = 101", "batch_size"),
            ("time_zone = \"Mars/Olympus\"", "time_zone"),
            ("phone_types = { x = \"phone\" }", "phone_types"),
            ("colour = \"red\"", "colour"),
            ("removal = \"burn\"", "burn"),
            ("timeout_secs = 5\nrequest_timeout = 5", "timeout_secs"),
        ] {
            assert!(err(extra).contains(named), "{extra}: {}", err(extra));
        }
    }

    #[test]
    fn the_old_integer_keys_still_read() {
        let c = BcConfig::from_settings(&settings(
            "base_url = \"https://x\"\nsite_id = 5\npassword = \"p\"\n\
             timeout_secs = 30\nconnect_timeout_secs = 3\nretry_backoff_ms = 250",
        ))
        .unwrap();
        assert_eq!(c.http.request_timeout, Duration::from_secs(30));
        assert_eq!(c.http.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.http.retry_backoff, Duration::from_millis(250));
        let c = BcConfig::from_settings(&settings(
            "base_url = \"https://x\"\nsite_id = 5\npassword = \"p\"\nrequest_timeout = \"2m\"",
        ))
        .unwrap();
        assert_eq!(c.http.request_timeout, Duration::from_secs(120));
        assert_eq!(c.http.max_attempts, 5);
    }
}
