//! Where the state lives, and opening it: a SQLite file or a PostgreSQL database.

use std::path::{Path, PathBuf};

#[cfg(feature = "postgres")]
use crate::PostgresState;
#[cfg(feature = "sqlite")]
use crate::SqliteState;
use crate::{StateError, StateStore};

/// Where the state lives: a SQLite file (the embedded default) or a PostgreSQL
/// database shared by many runners. Shown (`Display`, `Debug`) without a password.
#[derive(Clone, PartialEq, Eq)]
pub enum StateLocation {
    /// A SQLite database file.
    File(PathBuf),
    /// A PostgreSQL database: `postgres://user@host:port/db`.
    Postgres {
        /// The URL as configured (it may hold a password; never shown).
        url: String,
        /// A file holding the password, when the URL and environment give none.
        password_file: Option<PathBuf>,
        /// The PEM certificates of a private CA the server's certificate is checked
        /// against (else the public web roots).
        ca_file: Option<PathBuf>,
    },
}

impl StateLocation {
    /// Reads a `state` value: a `postgres://` (or `postgresql://`) URL, else a file
    /// path, relative to `base_dir`. Any other scheme is refused.
    pub fn parse(value: &str, base_dir: &Path) -> Result<Self, String> {
        if let Some((scheme, _)) = value.split_once("://") {
            if scheme.eq_ignore_ascii_case("postgres") || scheme.eq_ignore_ascii_case("postgresql")
            {
                return Ok(StateLocation::Postgres {
                    url: value.to_string(),
                    password_file: None,
                    ca_file: None,
                });
            }
            let looks_like_scheme = !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
            if looks_like_scheme {
                return Err(format!(
                    "{scheme}://…: the state is a SQLite file (\"contactsync-data/state.db\") or a PostgreSQL URL (\"postgres://user@host/db\")"
                ));
            }
        }
        Ok(StateLocation::File(base_dir.join(value)))
    }

    /// The SQLite file, when the state is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            StateLocation::File(path) => Some(path),
            StateLocation::Postgres { .. } => None,
        }
    }

    /// Opens an existing store for reading only: nothing is created, migrated or
    /// written (`contactsync serve`).
    #[cfg_attr(
        not(any(feature = "sqlite", feature = "postgres")),
        allow(unreachable_code)
    )]
    pub fn open_read_only(&self) -> Result<Box<dyn StateStore>, StateError> {
        Ok(match self {
            #[cfg(feature = "sqlite")]
            StateLocation::File(path) => Box::new(SqliteState::open_read_only(path)?),
            #[cfg(feature = "postgres")]
            StateLocation::Postgres {
                url,
                password_file,
                ca_file,
            } => Box::new(PostgresState::open_read_only(
                url,
                password_file.as_deref(),
                ca_file.as_deref(),
            )?),
            #[allow(unreachable_patterns)]
            other => return other.open(),
        })
    }

    /// Opens the store (creating the file, or applying the database's migrations).
    #[cfg_attr(
        not(any(feature = "sqlite", feature = "postgres")),
        allow(unreachable_code)
    )]
    pub fn open(&self) -> Result<Box<dyn StateStore>, StateError> {
        Ok(match self {
            #[cfg(feature = "sqlite")]
            StateLocation::File(path) => Box::new(SqliteState::open(path)?),
            #[cfg(feature = "postgres")]
            StateLocation::Postgres {
                url,
                password_file,
                ca_file,
            } => Box::new(PostgresState::open(
                url,
                password_file.as_deref(),
                ca_file.as_deref(),
            )?),
            #[allow(unreachable_patterns)]
            other => {
                return Err(StateError::Unavailable {
                    path: other.file().map(Path::to_path_buf).unwrap_or_default(),
                    message: format!(
                        "{other}: this build has no backend for it (the `contactsync-state` features `sqlite` and `postgres`)"
                    ),
                })
            }
        })
    }
}

impl std::fmt::Display for StateLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateLocation::File(path) => write!(f, "{}", path.display()),
            StateLocation::Postgres { url, .. } => f.write_str(&redact(url)),
        }
    }
}

impl std::fmt::Debug for StateLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateLocation({self})")
    }
}

/// `url` with its password, if any, replaced by `***`: what logs and errors show.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "postgres://(unreadable URL)".to_string(),
    }
}
