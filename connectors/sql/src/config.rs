//! What a user writes in a `[sources.NAME]` section with `type = "sql"`.
//!
//! ```toml
//! [sources.hrdb]
//! type = "sql"
//! url = "postgres://sync@db.internal:5432/hr"     # or mysql://…; or url_env = "HR_DB_URL"
//! password_file = "/etc/contactsync/hr-db.pass"   # or password_env; never in the URL
//! query = "SELECT employee_id AS external_id, work_email AS email FROM employees"
//! incremental_query = "SELECT … FROM employees WHERE updated_at > :since"
//! cursor_column = "updated_at"
//! overlap = "10m"
//! ```

use std::path::PathBuf;
use std::time::Duration;

use contactsync_core::{ConfigError, ConnectorSettings, DurationSetting, SecretString};
use serde::Deserialize;

use crate::query::bind_since;

/// Which server the URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `postgres://` or `postgresql://`.
    Postgres,
    /// `mysql://` or `mariadb://`: MySQL or MariaDB.
    MySql,
}

impl Dialect {
    /// The port the server listens on unless the URL says otherwise.
    pub fn default_port(self) -> u16 {
        match self {
            Dialect::Postgres => 5432,
            Dialect::MySql => 3306,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Written {
    url: Option<String>,
    url_env: Option<String>,
    password: Option<SecretString>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    query: String,
    incremental_query: Option<String>,
    cursor_column: Option<String>,
    #[serde(default)]
    overlap: Option<DurationSetting>,
    ca_file: Option<PathBuf>,
    #[serde(default = "default_fetch")]
    fetch_size: u32,
}

fn default_fetch() -> u32 {
    1000
}

/// The section, checked.
#[derive(Clone)]
pub struct SqlConfig {
    /// The server's kind.
    pub dialect: Dialect,
    /// The URL without a password.
    pub url: String,
    /// The password, when one is given outside the URL.
    pub password: Option<SecretString>,
    /// The full read's query.
    pub query: String,
    /// The incremental read's query, with `:since`.
    pub incremental_query: Option<String>,
    /// The column whose greatest value is the cursor.
    pub cursor_column: Option<String>,
    /// How far before the cursor an incremental read starts.
    pub overlap: Duration,
    /// The CA that signs the server's certificate (PEM), trusted alone.
    pub ca_file: Option<PathBuf>,
    /// Rows fetched from the server-side cursor at a time.
    pub fetch_size: u32,
}

impl std::fmt::Debug for SqlConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlConfig")
            .field("url", &self.url)
            .field("query", &self.query)
            .field("incremental_query", &self.incremental_query)
            .finish_non_exhaustive()
    }
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

fn env(settings: &ConnectorSettings, key: &str, var: &str) -> Result<String, ConfigError> {
    std::env::var(var)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| {
            settings.error(
                key,
                format!("the environment variable {var} is not set (or empty)"),
            )
        })
}

impl SqlConfig {
    /// Parses and checks a `[sources.NAME]` section.
    pub fn from_settings(settings: &ConnectorSettings) -> Result<Self, ConfigError> {
        let w: Written = settings.parse()?;
        let url = match (w.url, w.url_env) {
            (Some(_), Some(_)) => {
                return Err(settings.error("url_env", "both `url` and `url_env` are set; keep one"))
            }
            (Some(u), None) => u,
            (None, Some(var)) => env(settings, "url_env", &var)?,
            (None, None) => {
                return Err(settings.error(
                    "url",
                    "missing: the database's URL (`postgres://user@host:5432/db` or `mysql://user@host:3306/db`)",
                ))
            }
        };
        let dialect = match url.split_once("://").map(|(s, _)| s.to_ascii_lowercase()) {
            Some(s) if s == "postgres" || s == "postgresql" => Dialect::Postgres,
            Some(s) if s == "mysql" || s == "mariadb" => Dialect::MySql,
            _ => {
                return Err(settings.error(
                    "url",
                    format!(
                        "{}: not a PostgreSQL or MySQL URL (postgres://user@host:5432/db, mysql://user@host:3306/db)",
                        redact(&url)
                    ),
                ))
            }
        };
        if dialect == Dialect::MySql {
            crate::mysql::options(&url).map_err(|e| settings.error("url", e))?;
        }
        // A password written into the URL all the same is kept out of every output.
        if let Some(pw) = url::Url::parse(&url)
            .ok()
            .and_then(|u| u.password().map(str::to_string))
        {
            contactsync_core::remember_secret(&pw);
        }
        let password = match (w.password_env, w.password, w.password_file) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(settings.error(
                    "password_env",
                    "set one of `password_env`, `password_file` and `password`",
                ))
            }
            (Some(var), None, None) => {
                let value = env(settings, "password_env", &var)?;
                contactsync_core::remember_secret(&value);
                Some(SecretString::from(value))
            }
            (None, None, None) => None,
            (None, inline, file) => Some(settings.secret("password", inline, file.as_deref())?),
        };
        if w.query.trim().is_empty() {
            return Err(settings.error("query", "is empty"));
        }
        if bind_since(&w.query, "$1").1 > 0 {
            return Err(settings.error(
                "query",
                "`:since` belongs in `incremental_query`; the full read takes no parameter",
            ));
        }
        if let Some(q) = &w.incremental_query {
            if bind_since(q, "$1").1 == 0 {
                return Err(settings.error(
                    "incremental_query",
                    "has no `:since`: it must read only what changed after the cursor (`WHERE updated_at > :since`)",
                ));
            }
            if w.cursor_column.is_none() {
                return Err(settings.error("cursor_column", "is required with `incremental_query`: the column whose greatest value is the cursor"));
            }
        }
        if w.fetch_size == 0 {
            return Err(settings.error("fetch_size", "must be at least 1"));
        }
        Ok(SqlConfig {
            dialect,
            url,
            password,
            query: w.query,
            incremental_query: w.incremental_query,
            cursor_column: w.cursor_column,
            overlap: w.overlap.map(Duration::from).unwrap_or_default(),
            ca_file: w.ca_file.map(|p| settings.path(&p)),
            fetch_size: w.fetch_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(toml: &str) -> Option<String> {
        let settings = ConnectorSettings::from_toml("sources.hrdb", toml).expect("toml");
        SqlConfig::from_settings(&settings)
            .err()
            .and_then(|e| e.key)
    }

    #[test]
    fn errors_name_the_key() {
        let base = "url = \"postgres://sync@127.0.0.1/hr\"\nquery = \"SELECT 1\"\n";
        assert_eq!(key(base), None);
        assert_eq!(key("query = \"SELECT 1\""), Some("url".into()));
        assert_eq!(
            key("url = \"oracle://x\"\nquery = \"SELECT 1\""),
            Some("url".into())
        );
        assert_eq!(
            key(&format!(
                "{base}incremental_query = \"SELECT 1\"\ncursor_column = \"u\""
            )),
            Some("incremental_query".into())
        );
        assert_eq!(
            key(&format!(
                "{base}incremental_query = \"SELECT 1 WHERE u > :since\""
            )),
            Some("cursor_column".into())
        );
        assert_eq!(
            key("url = \"postgres://h/db\"\nquery = \"SELECT 1 WHERE u > :since\""),
            Some("query".into())
        );
        assert_eq!(
            key(&format!("{base}overlap = \"soon\"")),
            Some("overlap".into())
        );
        assert_eq!(
            key(&format!(
                "{base}password_env = \"CONTACTSYNC_SQL_TEST_UNSET\""
            )),
            Some("password_env".into())
        );
        assert_eq!(redact("postgres://u:pw@h/db"), "postgres://u:***@h/db");
    }
}
