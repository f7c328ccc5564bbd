//! What a user writes in a `[sinks.NAME]` or `[sources.NAME]` section with
//! `type = "scim"`, checked once at build time so that a misspelt key is a config
//! error naming the key.
//!
//! ```toml
//! [sinks.slack]
//! type = "scim"
//! base_url = "https://api.example.com/scim/v2"   # or "sandbox"
//! token_file = "/etc/contactsync/slack.token"    # or token_env = "SLACK_SCIM_TOKEN"
//! match_on = "userName"          # or "externalId": how an existing user is found
//! user_name = "email"            # or "external_id": what becomes userName
//! update = "auto"                # "patch" | "put" | "auto"
//! removal = "deactivate"         # or "delete"
//! groups = { Newsletter = "All Staff" }
//! fields = { "attributes.cost_center" = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:costCenter" }
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use contactsync_core::{ConfigError, ConnectorSettings, Field, SecretString};
use contactsync_http::{HttpDefaults, HttpSettings};
use serde::Deserialize;

use crate::user::{Mapping, ScimPath};

/// SCIM's defaults for the shared connection settings: `base_url` must be given; at
/// most 4 calls in flight (what the issue of one-by-one writes asks of a server that
/// does not take `/Bulk`).
#[derive(Debug)]
pub struct ScimDefaults;

impl HttpDefaults for ScimDefaults {
    const MAX_IN_FLIGHT: Option<u32> = Some(4);
}

/// How an existing user is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MatchOn {
    /// `filter=userName eq "…"`.
    #[serde(rename = "userName")]
    UserName,
    /// `filter=externalId eq "…"`.
    #[serde(rename = "externalId")]
    ExternalId,
}

impl MatchOn {
    /// The SCIM attribute.
    pub fn attribute(self) -> &'static str {
        match self {
            MatchOn::UserName => "userName",
            MatchOn::ExternalId => "externalId",
        }
    }
}

/// The canonical field that becomes `userName`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserNameFrom {
    /// The email address (most applications log people in by it).
    Email,
    /// The external id.
    ExternalId,
}

impl UserNameFrom {
    /// The canonical field.
    pub fn field(self) -> Field {
        match self {
            UserNameFrom::Email => Field::Email,
            UserNameFrom::ExternalId => Field::ExternalId,
        }
    }
}

/// How an update is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateStyle {
    /// PATCH when the server's ServiceProviderConfig says it supports it, else PUT.
    Auto,
    /// Always PATCH.
    Patch,
    /// GET, change the owned attributes, PUT back (with `If-Match` when the server
    /// gives ETags).
    Put,
}

/// How a removal is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Removal {
    /// `active = false`: the user is kept, and can no longer sign in.
    Deactivate,
    /// `DELETE /Users/{id}`.
    Delete,
}

/// The section's own keys, as written; the connection keys are [`HttpSettings`]'s.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Written {
    token: Option<SecretString>,
    token_file: Option<PathBuf>,
    token_env: Option<String>,
    #[serde(default = "default_match_on")]
    match_on: MatchOn,
    #[serde(default = "default_user_name")]
    user_name: UserNameFrom,
    #[serde(default = "default_update")]
    update: UpdateStyle,
    #[serde(default = "default_removal")]
    removal: Removal,
    #[serde(default)]
    groups: BTreeMap<String, String>,
    #[serde(default)]
    fields: BTreeMap<String, String>,
    #[serde(default = "default_bulk")]
    bulk: bool,
    #[serde(default = "default_page_size")]
    page_size: usize,
}

fn default_match_on() -> MatchOn {
    MatchOn::UserName
}
fn default_user_name() -> UserNameFrom {
    UserNameFrom::Email
}
fn default_update() -> UpdateStyle {
    UpdateStyle::Auto
}
fn default_removal() -> Removal {
    Removal::Deactivate
}
fn default_bulk() -> bool {
    true
}
fn default_page_size() -> usize {
    100
}

/// Where and how to reach the server: what the source and the sink share.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The connection settings (`base_url`, timeouts, retries, pace).
    pub http: HttpSettings,
    /// The bearer token (never printed).
    pub token: SecretString,
}

/// The settings of a `scim` section, checked: the sink's and the source's.
#[derive(Debug, Clone)]
pub struct ScimConfig {
    /// How to reach the server.
    pub connection: Connection,
    /// How an existing user is found.
    pub match_on: MatchOn,
    /// What becomes `userName`, and the rest of the mapping.
    pub mapping: Mapping,
    /// How updates are written.
    pub update: UpdateStyle,
    /// How removals are written.
    pub removal: Removal,
    /// Subscription -> group `displayName`: the groups whose membership follows the
    /// source.
    pub groups: BTreeMap<String, String>,
    /// Whether `/Bulk` is used when the server supports it (`bulk = false`: one call
    /// a change).
    pub bulk: bool,
    /// Users a page when reading.
    pub page_size: usize,
}

/// The sink's settings.
pub type SinkConfig = ScimConfig;
/// The source's settings.
pub type SourceConfig = ScimConfig;

impl ScimConfig {
    /// Parses and checks a `[sinks.NAME]` or `[sources.NAME]` section.
    pub fn from_settings(settings: &ConnectorSettings) -> Result<Self, ConfigError> {
        let (written, http): (Written, _) = HttpSettings::parse::<ScimDefaults, _>(settings)?;
        let inline = match (written.token_env, written.token) {
            (Some(_), Some(_)) => {
                return Err(settings.error(
                    "token_env",
                    "both `token` and `token_env` are set; keep one",
                ))
            }
            (Some(var), None) => match std::env::var(&var) {
                Ok(value) if !value.trim().is_empty() => {
                    Some(SecretString::from(value.trim().to_string()))
                }
                _ => {
                    return Err(settings.error(
                        "token_env",
                        format!("the environment variable {var} is not set (or empty)"),
                    ))
                }
            },
            (None, inline) => inline,
        };
        let token = settings.secret("token", inline, written.token_file.as_deref())?;
        if written.page_size == 0 {
            return Err(settings.error("page_size", "must be at least 1"));
        }
        let mut fields = BTreeMap::new();
        for (name, path) in written.fields {
            let field = Field::parse(name.strip_prefix("attributes.").unwrap_or(&name));
            let Field::Attribute(attr) = field else {
                return Err(settings.error(
                    "fields",
                    format!(
                        "{name} is a canonical field, mapped already; `fields` maps attributes"
                    ),
                ));
            };
            let path = ScimPath::parse(&path)
                .map_err(|e| settings.error("fields", format!("{name}: {e}")))?;
            fields.insert(attr, path);
        }
        for (subscription, group) in &written.groups {
            if group.trim().is_empty() {
                return Err(
                    settings.error("groups", format!("{subscription}: the group name is empty"))
                );
            }
        }
        Ok(ScimConfig {
            connection: Connection { http, token },
            match_on: written.match_on,
            mapping: Mapping::new(written.user_name, fields),
            update: written.update,
            removal: written.removal,
            groups: written.groups,
            bulk: written.bulk,
            page_size: written.page_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> ConnectorSettings {
        ConnectorSettings::from_toml("sinks.scim", toml).expect("toml")
    }

    #[test]
    fn errors_name_the_key() {
        let base = "base_url = \"http://127.0.0.1:1\"\ntoken = \"k\"\n";
        let key = |extra: &str| {
            ScimConfig::from_settings(&settings(&format!("{base}{extra}")))
                .err()
                .and_then(|e| e.key)
        };
        assert_eq!(key(""), None);
        assert_eq!(key("page_sise = 5").as_deref(), Some("page_sise"));
        assert_eq!(key("page_size = 0").as_deref(), Some("page_size"));
        assert_eq!(key("match_on = \"email\"").as_deref(), Some("match_on"));
        assert_eq!(key("update = \"post\"").as_deref(), Some("update"));
        assert_eq!(key("removal = \"purge\"").as_deref(), Some("removal"));
        assert_eq!(
            key("fields = { first_name = \"title\" }").as_deref(),
            Some("fields")
        );
        assert_eq!(
            key("fields = { \"attributes.x\" = \"a[b\" }").as_deref(),
            Some("fields")
        );
        assert_eq!(
            key("token_env = \"CONTACTSYNC_SCIM_TEST_UNSET\"").as_deref(),
            Some("token_env")
        );
        let missing = ScimConfig::from_settings(&settings("token = \"k\"")).err();
        assert_eq!(missing.and_then(|e| e.key).as_deref(), Some("base_url"));
        let config = ScimConfig::from_settings(&settings(&format!(
            "{base}match_on = \"externalId\"\nuser_name = \"external_id\"\nupdate = \"put\"\nremoval = \"delete\"\ngroups = {{ Newsletter = \"All Staff\" }}"
        )))
        .expect("config");
        assert_eq!(config.match_on, MatchOn::ExternalId);
        assert_eq!(config.update, UpdateStyle::Put);
        assert_eq!(config.removal, Removal::Delete);
        assert_eq!(config.groups["Newsletter"], "All Staff");
        assert_eq!(config.connection.http.pace.max_in_flight, Some(4));
    }
}
