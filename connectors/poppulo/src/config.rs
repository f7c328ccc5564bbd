//! What a user writes in a `[sinks.NAME]` or `[sources.NAME]` section with
//! `type = "poppulo"`, checked once at build time so that a misspelt key or an
//! impossible column mapping is a config error naming the key, not a 409 at 2 a.m.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use contactsync_core::{ConfigError, ConnectorSettings, DurationSetting, Field, SecretString};
use contactsync_http::{HttpDefaults, HttpSettings, Rate};
use serde::Deserialize;

use crate::xml::ImportFlags;

/// The API base when none is configured.
pub const DEFAULT_BASE_URL: &str = "https://api.newsweaver.com/v2";

/// Poppulo's defaults for the connection settings (`base_url`, timeouts, retries).
#[derive(Debug)]
pub struct PoppuloDefaults;

impl HttpDefaults for PoppuloDefaults {
    /// `https://api.us.newsweaver.com/v2` serves US-hosted accounts.
    const BASE_URL: Option<&'static str> = Some(DEFAULT_BASE_URL);
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
    const MAX_RETRY_TIME: Duration = Duration::from_secs(900);
    /// "Fair use: about 1,000 requests an hour".
    const RATE_LIMIT: Option<Rate> = Some(Rate::per_hour(1000));
}

/// How a removal is carried out: an import row with this status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Removal {
    /// `INACTIVE`: soft; `reactivate_api_removed` brings the person back later.
    #[default]
    Inactive,
    /// `OPT_OUT`: drops every permission.
    OptOut,
}

impl Removal {
    /// The status written in the import row.
    pub fn status(self) -> &'static str {
        match self {
            Removal::Inactive => "INACTIVE",
            Removal::OptOut => "OPT_OUT",
        }
    }
}

fn yes() -> bool {
    true
}
fn default_max_rows() -> usize {
    50_000
}
fn d_busy() -> DurationSetting {
    DurationSetting::secs(3600)
}
fn d_busy_interval() -> DurationSetting {
    DurationSetting::secs(30)
}
fn d_poll() -> DurationSetting {
    DurationSetting::secs(10)
}
fn d_min_poll() -> DurationSetting {
    DurationSetting::secs(1)
}
fn d_import_wait() -> DurationSetting {
    DurationSetting::secs(6 * 3600)
}

/// The `[sinks.NAME]` section, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSettings {
    /// The account code (`/v2/{account}/…`).
    pub account: String,
    /// The API user.
    pub username: String,
    /// The API user's password (better: `password_file`, or the environment).
    pub password: Option<SecretString>,
    /// A file holding the password.
    pub password_file: Option<PathBuf>,
    /// Canonical field → Poppulo column, merged over the defaults; `""` unmaps a default.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// How people are removed.
    #[serde(default)]
    pub removal: Removal,
    /// Must be true: Poppulo refuses imports otherwise.
    #[serde(default = "yes")]
    pub accept_terms: bool,
    /// Update people who exist already (false: only create).
    #[serde(default = "yes")]
    pub update_existing: bool,
    /// Bring back people removed through the API (INACTIVE rows of earlier runs).
    #[serde(default = "yes")]
    pub reactivate_api_removed: bool,
    /// Bring back people removed by an administrator.
    #[serde(default)]
    pub reactivate_admin_removed: bool,
    /// Bring back people removed because their mail bounced.
    #[serde(default)]
    pub reactivate_bounced_removed: bool,
    /// Fields set on every imported row (`source = "hr-sync"`).
    #[serde(default)]
    pub set_fields: BTreeMap<String, String>,
    /// Permissions granted to every imported row.
    #[serde(default)]
    pub add_permissions: Vec<String>,
    /// Permissions withdrawn from every imported row.
    #[serde(default)]
    pub remove_permissions: Vec<String>,
    /// Tags put on every imported row.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The most rows in one import job (the engine's batch size).
    #[serde(default = "default_max_rows")]
    pub max_rows_per_job: usize,
    /// Most time to wait for another import of the account to finish before posting.
    #[serde(default = "d_busy")]
    pub max_wait_for_busy_account: DurationSetting,
    /// First wait when the account is busy (doubles, up to 10 minutes).
    #[serde(default = "d_busy_interval")]
    pub busy_retry_interval: DurationSetting,
    /// Wait between polls when the import gives no `ping_after`.
    #[serde(default = "d_poll")]
    pub poll_interval: DurationSetting,
    /// Shortest wait between polls, whatever `ping_after` says.
    #[serde(default = "d_min_poll")]
    pub min_poll_interval: DurationSetting,
    /// Most time to follow one import; past it the rows are reported unknown and the
    /// next run resumes following the same import.
    #[serde(default = "d_import_wait")]
    pub max_import_wait: DurationSetting,
}

/// The `[sources.NAME]` section, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// The account code.
    pub account: String,
    /// The API user.
    pub username: String,
    /// The password.
    pub password: Option<SecretString>,
    /// A file holding the password.
    pub password_file: Option<PathBuf>,
    /// Which subscribers to read: `all` (default), `active`, `inactive`, `opt_out`.
    #[serde(default = "default_status_filter")]
    pub status: String,
}

fn default_status_filter() -> String {
    "all".to_string()
}

/// Where and how to reach the account: what sources and sinks share.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The connection settings (`base_url`, timeouts, retries).
    pub http: HttpSettings,
    /// Account code.
    pub account: String,
    /// API user.
    pub username: String,
    /// Its password (never printed).
    pub password: SecretString,
}

/// Canonical field → Poppulo column, in the order columns are sent (`email` first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMap(pub Vec<(Field, String)>);

impl ColumnMap {
    /// The defaults: email, names, company, position, department, external id.
    pub fn defaults() -> BTreeMap<Field, String> {
        [
            (Field::Email, "email"),
            (Field::FirstName, "name.first name"),
            (Field::LastName, "name.surname"),
            (Field::Company, "company"),
            (Field::JobTitle, "position"),
            (Field::Department, "workDetails.department"),
            (Field::ExternalId, "externalId"),
        ]
        .into_iter()
        .map(|(f, c)| (f, c.to_string()))
        .collect()
    }

    /// The Poppulo column names, in order.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(_, c)| c.as_str())
    }
}

/// The sink's settings, checked and resolved.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// How to reach the account.
    pub connection: Connection,
    /// Field → column mapping (never `status`: it is always the last column).
    pub columns: ColumnMap,
    /// Removal policy.
    pub removal: Removal,
    /// What every import job asks besides its rows.
    pub flags: ImportFlags,
    /// Rows per job.
    pub max_rows_per_job: usize,
    /// Busy-account wait bound.
    pub max_wait_for_busy_account: Duration,
    /// First busy-account wait.
    pub busy_retry_interval: Duration,
    /// Poll interval without `ping_after`.
    pub poll_interval: Duration,
    /// Shortest poll interval.
    pub min_poll_interval: Duration,
    /// Most time following one import.
    pub max_import_wait: Duration,
}

/// The source's settings, checked and resolved.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// How to reach the account.
    pub connection: Connection,
    /// The `status` filter of the listing.
    pub status: String,
}

fn check_connection(
    settings: &ConnectorSettings,
    base_url: &str,
    account: &str,
    username: &str,
) -> Result<(), ConfigError> {
    let url = url::Url::parse(base_url.trim())
        .map_err(|e| settings.error("base_url", format!("not a URL ({e}): {base_url:?}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(settings.error("base_url", "expected an http:// or https:// URL"));
    }
    if account.trim().is_empty() {
        return Err(settings.error("account", "empty; set the Poppulo account code"));
    }
    if account.contains(['/', '?', '#']) {
        return Err(settings.error("account", "an account code, not a URL or path"));
    }
    if username.trim().is_empty() {
        return Err(settings.error("username", "empty; set the API user's name"));
    }
    Ok(())
}

fn check_column_name(
    settings: &ConnectorSettings,
    key: &str,
    column: &str,
) -> Result<(), ConfigError> {
    if column.contains([',', '\n', '\r', '"']) {
        return Err(settings.error(
            key,
            format!("Poppulo column {column:?} cannot hold a comma, quote or line break"),
        ));
    }
    Ok(())
}

impl SinkConfig {
    /// Parses and checks the section.
    pub fn from_settings(settings: &ConnectorSettings) -> Result<Self, ConfigError> {
        let (s, http): (SinkSettings, _) = HttpSettings::parse::<PoppuloDefaults, _>(settings)?;
        check_connection(settings, &http.base_url, &s.account, &s.username)?;
        let password = settings.secret("password", s.password, s.password_file.as_deref())?;
        if !s.accept_terms {
            return Err(settings.error(
                "accept_terms",
                "must be true: Poppulo refuses every import job that does not accept its terms (409)",
            ));
        }
        if s.max_rows_per_job == 0 {
            return Err(settings.error("max_rows_per_job", "must be at least 1"));
        }
        let mut map = ColumnMap::defaults();
        for (field_name, column) in &s.columns {
            let field = Field::parse(field_name);
            let key = format!("columns.{field_name}");
            match field {
                Field::Status => {
                    return Err(settings.error(
                        &key,
                        "the status is always sent, as the `status` column; it cannot be mapped",
                    ))
                }
                Field::UpdatedAt => {
                    return Err(settings.error(&key, "updated_at is not sent to Poppulo"))
                }
                _ => {}
            }
            let column = column.trim();
            if column.is_empty() {
                map.remove(&field);
                continue;
            }
            check_column_name(settings, &key, column)?;
            if column.eq_ignore_ascii_case("status") {
                return Err(settings.error(
                    &key,
                    "the `status` column is reserved for the contact's status",
                ));
            }
            map.insert(field, column.to_string());
        }
        if !map.contains_key(&Field::Email) {
            return Err(settings.error(
                "columns.email",
                "Poppulo matches people by email: it must be mapped",
            ));
        }
        // Email first (Poppulo's mandatory matching column), then the rest in a fixed order.
        let mut ordered: Vec<(Field, String)> = Vec::with_capacity(map.len());
        if let Some(c) = map.remove(&Field::Email) {
            ordered.push((Field::Email, c));
        }
        ordered.extend(map);
        let mut seen = BTreeSet::new();
        for (field, column) in &ordered {
            if !seen.insert(column.to_ascii_lowercase()) {
                return Err(settings.error(
                    &format!("columns.{}", field.name()),
                    format!(
                        "Poppulo column {column:?} is mapped twice (Poppulo refuses such imports)"
                    ),
                ));
            }
        }
        for (name, list) in [
            ("add_permissions", &s.add_permissions),
            ("remove_permissions", &s.remove_permissions),
            ("tags", &s.tags),
        ] {
            if list.iter().any(|v| v.trim().is_empty()) {
                return Err(settings.error(name, "holds an empty name"));
            }
        }
        Ok(SinkConfig {
            connection: Connection {
                http,
                account: s.account.trim().to_string(),
                username: s.username,
                password,
            },
            columns: ColumnMap(ordered),
            removal: s.removal,
            flags: ImportFlags {
                update_existing: s.update_existing,
                reactivate_api_removed: s.reactivate_api_removed,
                reactivate_admin_removed: s.reactivate_admin_removed,
                reactivate_bounced_removed: s.reactivate_bounced_removed,
                set_fields: s.set_fields,
                add_permissions: s.add_permissions,
                remove_permissions: s.remove_permissions,
                tags: s.tags,
            },
            max_rows_per_job: s.max_rows_per_job,
            max_wait_for_busy_account: s.max_wait_for_busy_account.0,
            busy_retry_interval: s.busy_retry_interval.0.max(Duration::from_millis(10)),
            poll_interval: s.poll_interval.0,
            min_poll_interval: s.min_poll_interval.0,
            max_import_wait: s.max_import_wait.0,
        })
    }
}

impl SourceConfig {
    /// Parses and checks the section.
    pub fn from_settings(settings: &ConnectorSettings) -> Result<Self, ConfigError> {
        let (s, http): (SourceSettings, _) = HttpSettings::parse::<PoppuloDefaults, _>(settings)?;
        check_connection(settings, &http.base_url, &s.account, &s.username)?;
        let password = settings.secret("password", s.password, s.password_file.as_deref())?;
        let status = s.status.trim().to_ascii_lowercase();
        if !matches!(status.as_str(), "all" | "active" | "inactive" | "opt_out") {
            return Err(settings.error("status", "expected all, active, inactive or opt_out"));
        }
        Ok(SourceConfig {
            connection: Connection {
                http,
                account: s.account.trim().to_string(),
                username: s.username,
                password,
            },
            status,
        })
    }
}
