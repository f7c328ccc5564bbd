//! What the user writes in a `[sources.NAME]` or `[sinks.NAME]` section of type `ldap`,
//! checked once when the connector is built so that a misspelt key or a malformed
//! filter is reported before anything touches the network.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use contactsync_core::{
    ConfigError, ConnectorSettings, DurationSetting, ExposeSecret, SecretString,
};
use serde::Deserialize;

pub use crate::mapping::MultiValue;
use crate::mapping::{check_attribute_name, AttributeMap};

/// The filter a source uses when none is configured.
pub const DEFAULT_FILTER: &str = "(objectClass=inetOrgPerson)";
/// Entries per page of a paged search when `page_size` is not set.
pub const DEFAULT_PAGE_SIZE: u32 = 500;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(60);

/// How the connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain `ldap://`: only for loopback and tests.
    None,
    /// TLS from the first byte (`ldaps://`, port 636).
    Ldaps,
    /// `ldap://` upgraded with the StartTLS extended operation before binding.
    Starttls,
}

/// The connection settings shared by the source and the sink, kept flat in the section
/// and split off it by [`ConnectorSettings::split`] (so that each part can deny unknown
/// keys, which `serde(flatten)` cannot).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionToml {
    url: String,
    #[serde(default)]
    bind_dn: Option<String>,
    #[serde(default)]
    password: Option<SecretString>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    tls: Option<TlsMode>,
    #[serde(default = "yes")]
    tls_verify: bool,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    connect_timeout: Option<DurationSetting>,
    #[serde(default)]
    operation_timeout: Option<DurationSetting>,
}

fn yes() -> bool {
    true
}

/// Where and how to connect and bind.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The server URL, `ldap://host:389` or `ldaps://host:636`.
    pub url: String,
    /// The DN to bind as; `None` binds anonymously.
    pub bind_dn: Option<String>,
    /// The bind password (never logged: `SecretString` prints nothing).
    pub password: Option<SecretString>,
    /// How the connection is protected.
    pub tls: TlsMode,
    /// Whether the server certificate is verified: against `ca_file` when given, else
    /// the system's trust store.
    pub tls_verify: bool,
    /// The certificates (DER) of the CA that signs the directory's certificate, read
    /// from `ca_file` (PEM) at build time: the only roots trusted when set.
    pub ca_certificates: Option<Vec<Vec<u8>>>,
    /// How long to wait for the TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// How long to wait for any one answer from the server (each page entry of a search).
    pub operation_timeout: Duration,
}

impl Connection {
    fn from_toml(settings: &ConnectorSettings, raw: ConnectionToml) -> Result<Self, ConfigError> {
        let url = raw.url.trim().to_string();
        let scheme_ldaps = url.to_ascii_lowercase().starts_with("ldaps://");
        if !scheme_ldaps && !url.to_ascii_lowercase().starts_with("ldap://") {
            return Err(settings.error("url", format!("{url:?} is not an ldap:// or ldaps:// URL")));
        }
        let tls = match (raw.tls, scheme_ldaps) {
            (None, true) | (Some(TlsMode::Ldaps), true) => TlsMode::Ldaps,
            (None, false) => TlsMode::None,
            (Some(TlsMode::Ldaps), false) => {
                return Err(settings.error("tls", "`ldaps` needs an ldaps:// URL"));
            }
            (Some(mode), true) => {
                return Err(settings.error(
                    "tls",
                    format!("{mode:?} does not go with an ldaps:// URL (which is always TLS); use `ldaps` or an ldap:// URL").to_lowercase(),
                ));
            }
            (Some(mode), false) => mode,
        };
        let password = match (&raw.bind_dn, &raw.password, &raw.password_file) {
            (None, None, None) => None,
            (None, _, _) => {
                return Err(
                    settings.error("bind_dn", "a password is set but no `bind_dn` to bind with")
                );
            }
            (Some(_), inline, file) => {
                let secret = settings.secret("password", inline.clone(), file.as_deref())?;
                if secret.expose_secret().is_empty() {
                    // RFC 4513 §5.1.2: a simple bind with an empty password is anonymous.
                    return Err(settings.error(
                        "password",
                        "is empty: an empty password would bind anonymously",
                    ));
                }
                Some(secret)
            }
        };
        let timeout = |key: &str, value: &Option<DurationSetting>, default: Duration| match value {
            None => Ok(default),
            Some(v) if v.0.is_zero() => Err(settings.error(key, "must be more than zero")),
            Some(v) => Ok(v.0),
        };
        Ok(Connection {
            url,
            bind_dn: raw
                .bind_dn
                .map(|dn| dn.trim().to_string())
                .filter(|dn| !dn.is_empty()),
            password,
            tls,
            tls_verify: raw.tls_verify,
            ca_certificates: match &raw.ca_file {
                None => None,
                Some(file) => {
                    if tls == TlsMode::None {
                        return Err(settings.error(
                            "ca_file",
                            "is set but the connection is not TLS: use an ldaps:// URL or tls = \"starttls\"",
                        ));
                    }
                    Some(
                        crate::client::read_ca_file(&settings.path(file))
                            .map_err(|e| settings.error("ca_file", e))?,
                    )
                }
            },
            connect_timeout: timeout(
                "connect_timeout",
                &raw.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            operation_timeout: timeout(
                "operation_timeout",
                &raw.operation_timeout,
                DEFAULT_OPERATION_TIMEOUT,
            )?,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceToml {
    base_dn: String,
    #[serde(default)]
    filter: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default)]
    multi_value: MultiValue,
    #[serde(default)]
    multi_value_separator: Option<String>,
    #[serde(default)]
    inactive_filter: Option<String>,
    #[serde(default)]
    page_size: Option<u32>,
}

/// The settings of an LDAP source.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Where and how to connect.
    pub connection: Connection,
    /// The subtree searched.
    pub base_dn: String,
    /// Which entries are people; [`DEFAULT_FILTER`] by default.
    pub filter: String,
    /// Which attribute fills which field.
    pub attributes: AttributeMap,
    /// What to do with several values of one attribute.
    pub multi_value: MultiValue,
    /// The separator for [`MultiValue::Join`] (`;`, which the `subscriptions` field also
    /// splits on).
    pub multi_value_separator: String,
    /// Entries matching this filter (within `filter`) are read as inactive.
    pub inactive_filter: Option<String>,
    /// Entries per page of the paged search.
    pub page_size: u32,
}

impl SourceConfig {
    /// Reads and checks the settings.
    pub fn from_settings(settings: &ConnectorSettings) -> Result<Self, ConfigError> {
        let (own, connection) = split_connection(settings)?;
        let raw: SourceToml = own.parse()?;
        let base_dn = non_empty(settings, "base_dn", raw.base_dn)?;
        let filter = match raw.filter {
            None => DEFAULT_FILTER.to_string(),
            Some(f) => check_filter(settings, "filter", f)?,
        };
        let inactive_filter = raw
            .inactive_filter
            .map(|f| check_filter(settings, "inactive_filter", f))
            .transpose()?;
        let page_size = raw.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
        if page_size == 0 || page_size > i32::MAX as u32 {
            return Err(settings.error("page_size", "must be between 1 and 2147483647"));
        }
        Ok(SourceConfig {
            connection,
            base_dn,
            filter,
            attributes: AttributeMap::from_settings(settings, &raw.attributes)?,
            multi_value: raw.multi_value,
            multi_value_separator: raw.multi_value_separator.unwrap_or_else(|| ";".to_string()),
            inactive_filter,
            page_size,
        })
    }
}

/// How the sink removes a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// Delete the entry.
    Delete,
    /// Keep the entry and set `attribute` to `value` (cleared again if the person
    /// comes back active).
    Mark {
        /// The attribute, e.g. `employeeType`.
        attribute: String,
        /// The value, e.g. `disabled`.
        value: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RemovalToml {
    Word(String),
    Mark { attribute: String, value: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkToml {
    base_dn: String,
    #[serde(default)]
    rdn_attribute: Option<String>,
    #[serde(default)]
    object_classes: Option<Vec<String>>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default)]
    removal: Option<RemovalToml>,
}

/// The settings of an LDAP sink.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Where and how to connect.
    pub connection: Connection,
    /// The entries are created directly under this DN.
    pub base_dn: String,
    /// The attribute naming an entry (`uid` by default); its value is the contact's key
    /// value (external id, else email), so the DN never changes while the key does not.
    pub rdn_attribute: String,
    /// The object classes of created entries.
    pub object_classes: Vec<String>,
    /// Which field fills which attribute.
    pub attributes: AttributeMap,
    /// How removals are carried out.
    pub removal: Removal,
}

impl SinkConfig {
    /// Reads and checks the settings.
    pub fn from_settings(settings: &ConnectorSettings) -> Result<Self, ConfigError> {
        let (own, connection) = split_connection(settings)?;
        let raw: SinkToml = own.parse()?;
        let base_dn = non_empty(settings, "base_dn", raw.base_dn)?;
        let rdn_attribute = non_empty(
            settings,
            "rdn_attribute",
            raw.rdn_attribute.unwrap_or_else(|| "uid".into()),
        )?;
        check_attribute_name(settings, "rdn_attribute", &rdn_attribute)?;
        let object_classes = raw.object_classes.unwrap_or_else(|| {
            ["top", "person", "organizationalPerson", "inetOrgPerson"]
                .map(String::from)
                .to_vec()
        });
        if object_classes.is_empty() {
            return Err(settings.error("object_classes", "needs at least one object class"));
        }
        let removal = match raw.removal {
            None => Removal::Delete,
            Some(RemovalToml::Word(w)) if w.eq_ignore_ascii_case("delete") => Removal::Delete,
            Some(RemovalToml::Word(w)) => {
                return Err(settings.error(
                    "removal",
                    format!("{w:?} is not a removal policy: write \"delete\" or {{ attribute = \"employeeType\", value = \"disabled\" }}"),
                ));
            }
            Some(RemovalToml::Mark { attribute, value }) => {
                check_attribute_name(settings, "removal.attribute", &attribute)?;
                if value.trim().is_empty() {
                    return Err(settings.error("removal.value", "must not be empty"));
                }
                Removal::Mark { attribute, value }
            }
        };
        let attributes = AttributeMap::from_settings(settings, &raw.attributes)?;
        if let Removal::Mark { attribute, .. } = &removal {
            if attributes.contains_attribute(attribute)
                || attribute.eq_ignore_ascii_case(&rdn_attribute)
            {
                return Err(settings.error(
                    "removal.attribute",
                    format!("{attribute:?} is also written from a field (attributes) or names the entry (rdn_attribute); the removal mark needs an attribute of its own"),
                ));
            }
        }
        Ok(SinkConfig {
            connection,
            base_dn,
            rdn_attribute,
            object_classes,
            attributes,
            removal,
        })
    }
}

const CONNECTION_KEYS: &[&str] = &[
    "url",
    "bind_dn",
    "password",
    "password_file",
    "tls",
    "tls_verify",
    "ca_file",
    "connect_timeout",
    "operation_timeout",
];
/// The connection, and the rest of the section for the source's or sink's own keys.
fn split_connection(
    settings: &ConnectorSettings,
) -> Result<(ConnectorSettings, Connection), ConfigError> {
    if settings.has("full_every") {
        return Err(settings.error(
            "full_every",
            "a full read every N runs is a pipeline setting: put `full_every` in the [pipelines.NAME] section of this source and sink",
        ));
    }
    let (own, connection) = settings.split(CONNECTION_KEYS);
    let connection = Connection::from_toml(settings, connection.parse()?)?;
    Ok((own, connection))
}

fn non_empty(
    settings: &ConnectorSettings,
    key: &str,
    value: String,
) -> Result<String, ConfigError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        Err(settings.error(key, "must not be empty"))
    } else {
        Ok(trimmed.to_string())
    }
}

/// Checks a filter with ldap3's own parser, so a typo fails at build time with the key.
fn check_filter(
    settings: &ConnectorSettings,
    key: &str,
    filter: String,
) -> Result<String, ConfigError> {
    let filter = filter.trim().to_string();
    let wrapped = if filter.starts_with('(') {
        filter
    } else {
        format!("({filter})")
    };
    ldap3::parse_filter(&wrapped).map_err(|_| {
        settings.error(
            key,
            format!("{wrapped:?} is not a valid LDAP filter (RFC 4515)"),
        )
    })?;
    Ok(wrapped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(toml: &str) -> Result<SourceConfig, ConfigError> {
        let base = "url = \"ldap://localhost\"\nbind_dn = \"cn=a\"\npassword = \"pw\"\nbase_dn = \"dc=x\"\n";
        SourceConfig::from_settings(&ConnectorSettings::from_toml(
            "sources.dir",
            &format!("{base}{toml}"),
        )?)
    }

    #[test]
    fn defaults() {
        let config = source("").unwrap();
        assert_eq!(config.filter, DEFAULT_FILTER);
        assert_eq!(config.page_size, DEFAULT_PAGE_SIZE);
        assert_eq!(config.connection.tls, TlsMode::None);
        assert_eq!(config.connection.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    }

    #[test]
    fn tls_is_inferred_from_the_url_and_contradictions_are_errors() {
        let settings = |toml: &str| ConnectorSettings::from_toml("sources.dir", toml).unwrap();
        let ldaps = settings("url = \"ldaps://h\"\nbase_dn = \"dc=x\"");
        assert_eq!(
            SourceConfig::from_settings(&ldaps).unwrap().connection.tls,
            TlsMode::Ldaps
        );
        assert_eq!(
            source("tls = \"starttls\"").unwrap().connection.tls,
            TlsMode::Starttls
        );
        let err = source("tls = \"ldaps\"").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("tls"));
        let err = SourceConfig::from_settings(&settings(
            "url = \"ldaps://h\"\nbase_dn = \"dc=x\"\ntls = \"starttls\"",
        ))
        .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("tls"));
    }

    #[test]
    fn misspelt_keys_bad_filters_and_empty_passwords_name_the_key() {
        assert_eq!(
            source("page_sise = 5").unwrap_err().key.as_deref(),
            Some("page_sise")
        );
        assert_eq!(
            source("filter = \"(uid=\"").unwrap_err().key.as_deref(),
            Some("filter")
        );
        assert_eq!(source("filter = \"uid=a\"").unwrap().filter, "(uid=a)");
        assert_eq!(
            source("inactive_filter = \"(&(a=b)\"")
                .unwrap_err()
                .key
                .as_deref(),
            Some("inactive_filter")
        );
        assert_eq!(
            source("page_size = 0").unwrap_err().key.as_deref(),
            Some("page_size")
        );
        let settings = ConnectorSettings::from_toml(
            "sources.dir",
            "url = \"ldap://h\"\nbind_dn = \"cn=a\"\npassword = \"\"\nbase_dn = \"dc=x\"",
        )
        .unwrap();
        assert_eq!(
            SourceConfig::from_settings(&settings)
                .unwrap_err()
                .key
                .as_deref(),
            Some("password")
        );
        let settings = ConnectorSettings::from_toml(
            "sources.dir",
            "url = \"ldap://h\"\nbind_dn = \"cn=a\"\nbase_dn = \"dc=x\"",
        )
        .unwrap();
        let err = SourceConfig::from_settings(&settings).unwrap_err();
        assert!(err.message.contains("password_file"), "{err}");
        assert_eq!(source("url2 = 1").unwrap_err().key.as_deref(), Some("url2"));
    }

    #[test]
    fn durations_take_seconds_or_units() {
        let config = source("connect_timeout = 3\noperation_timeout = \"250ms\"").unwrap();
        assert_eq!(config.connection.connect_timeout, Duration::from_secs(3));
        assert_eq!(
            config.connection.operation_timeout,
            Duration::from_millis(250)
        );
        // The connection keys are split off the section and parsed on their own, so a
        // bad value names its key.
        let err = source("connect_timeout = \"soon\"").unwrap_err();
        assert!(err.to_string().contains("\"soon\""), "{err}");
        assert_eq!(err.section, "sources.dir");
        assert_eq!(err.key.as_deref(), Some("connect_timeout"));
        assert_eq!(
            source("connect_timeout = 0").unwrap_err().key.as_deref(),
            Some("connect_timeout")
        );
    }

    #[test]
    fn sink_removal_policies() {
        let sink = |toml: &str| {
            let base = "url = \"ldap://localhost\"\nbind_dn = \"cn=a\"\npassword = \"pw\"\nbase_dn = \"dc=x\"\n";
            SinkConfig::from_settings(
                &ConnectorSettings::from_toml("sinks.dir", &format!("{base}{toml}")).unwrap(),
            )
        };
        assert_eq!(sink("").unwrap().removal, Removal::Delete);
        assert_eq!(sink("").unwrap().rdn_attribute, "uid");
        assert_eq!(
            sink("removal = { attribute = \"employeeType\", value = \"disabled\" }")
                .unwrap()
                .removal,
            Removal::Mark {
                attribute: "employeeType".into(),
                value: "disabled".into()
            }
        );
        assert_eq!(
            sink("removal = \"erase\"").unwrap_err().key.as_deref(),
            Some("removal")
        );
        assert_eq!(
            sink("removal = { attribute = \"title\", value = \"gone\" }")
                .unwrap_err()
                .key
                .as_deref(),
            Some("removal.attribute"),
            "title is written from job_title"
        );
        assert_eq!(
            sink("rdn_attribute = \"u id\"").unwrap_err().key.as_deref(),
            Some("rdn_attribute")
        );
    }
}
