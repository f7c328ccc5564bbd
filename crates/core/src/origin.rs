//! Where a record came from, so that every error and every rejected record can be
//! traced back to the line, entry or page that produced it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The place in a source system a record was read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// A line of a file (1-based, counting the header).
    Line {
        /// The file as the user named it.
        file: String,
        /// The line number, 1-based.
        line: u64,
    },
    /// A directory entry.
    Entry {
        /// Its distinguished name.
        dn: String,
    },
    /// An item of a paged API listing.
    Page {
        /// The call or resource listed (`GET /subscribers`).
        call: String,
        /// The page, 1-based.
        page: u64,
        /// The position within the page, 1-based.
        index: u64,
    },
    /// A record identified by the platform's own id.
    Record {
        /// The system (`businesscatalyst`).
        system: String,
        /// Its id there.
        id: String,
    },
    /// Not read from a source: a change the engine derived (a removal by absence).
    Derived,
}

impl Origin {
    /// A line of a file.
    pub fn line(file: impl Into<String>, line: u64) -> Self {
        Origin::Line {
            file: file.into(),
            line,
        }
    }

    /// The file, DN or call, for the `source` column of a rejects file.
    pub fn location(&self) -> String {
        match self {
            Origin::Line { file, .. } => file.clone(),
            Origin::Entry { dn } => dn.clone(),
            Origin::Page { call, .. } => call.clone(),
            Origin::Record { system, .. } => system.clone(),
            Origin::Derived => String::new(),
        }
    }

    /// The line, position or id within [`Origin::location`], for the `line` column.
    pub fn position(&self) -> String {
        match self {
            Origin::Line { line, .. } => line.to_string(),
            Origin::Entry { .. } | Origin::Derived => String::new(),
            Origin::Page { page, index, .. } => format!("page {page} item {index}"),
            Origin::Record { id, .. } => id.clone(),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Line { file, line } => write!(f, "{file}:{line}"),
            Origin::Entry { dn } => write!(f, "entry {dn}"),
            Origin::Page { call, page, index } => write!(f, "{call}, page {page}, item {index}"),
            Origin::Record { system, id } => write!(f, "{system} record {id}"),
            Origin::Derived => f.write_str("(state)"),
        }
    }
}
