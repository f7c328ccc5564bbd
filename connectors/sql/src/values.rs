//! A result's columns as canonical fields, and their values as text in one format.
//!
//! A column maps by its name, as a CSV header does: a canonical field's name (`email`,
//! `first_name`, …, `subscriptions`, `updated_at`) or `attributes.NAME`. Other columns
//! are ignored (alias them in the query to use them). NULL is absent.
//!
//! | PostgreSQL | MySQL, MariaDB | text |
//! |---|---|---|
//! | text, varchar, char, name, citext, uuid | char, varchar, text, enum, set (not binary) | as stored |
//! | smallint, integer, bigint | tinyint, smallint, mediumint, int, bigint, year | `42` |
//! | numeric, real, double precision | decimal, float, double | as the server prints them (`3.50`) |
//! | boolean | tinyint(1), which is what BOOLEAN is | `true` / `false` (MySQL: 0 is false) |
//! | date | date | `2026-12-07` |
//! | timestamp with time zone | timestamp (the session in UTC) | RFC 3339 in UTC, `2026-12-07T10:00:00Z` |
//! | timestamp without time zone | datetime | the same, the value taken as UTC |
//! | anything else: json, bytea, arrays, intervals… | time, bit, binary, varbinary, blob, json, geometry, a zero date | a reject naming the column and its type |

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use contactsync_core::Field;

/// How a column's values are turned into text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Text as stored.
    Text,
    /// An integer.
    Integer,
    /// A decimal or floating-point number.
    Number,
    /// A boolean.
    Bool,
    /// A date.
    Date,
    /// A timestamp without time zone.
    Timestamp,
    /// A timestamp with time zone.
    TimestampTz,
    /// A type not read.
    Other,
}

/// One column of the result.
#[derive(Debug, Clone)]
pub struct Column {
    /// Its name in the result.
    pub name: String,
    /// How its values become text.
    pub kind: Kind,
    /// The server's name of its type.
    pub type_name: String,
    /// The field it maps to; `None`: ignored.
    pub field: Option<Field>,
}

impl Column {
    /// The column `name` of type `type_name`.
    pub fn new(name: &str, kind: Kind, type_name: &str) -> Column {
        let field = match name.strip_prefix("attributes.") {
            Some(attr) if !attr.is_empty() => Some(Field::Attribute(attr.to_string())),
            Some(_) => None,
            None => Some(Field::parse(name)).filter(Field::is_canonical),
        };
        Column {
            name: name.to_string(),
            kind,
            type_name: type_name.to_string(),
            field,
        }
    }

    /// A value of this column (as the server printed it) in the documented format.
    pub fn text(&self, raw: &str) -> Result<String, String> {
        let timestamp = |raw: &str| -> Result<String, String> {
            let parsed = DateTime::parse_from_str(raw, "%Y-%m-%d %H:%M:%S%.f%#z")
                .map(|t| t.to_utc())
                .or_else(|_| {
                    NaiveDateTime::parse_from_str(raw, "%Y-%m-%d %H:%M:%S%.f").map(|t| t.and_utc())
                })
                .map_err(|e| format!("{raw:?} is not a timestamp the source reads ({e})"))?;
            Ok(utc_text(parsed))
        };
        match self.kind {
            Kind::Text | Kind::Integer | Kind::Number | Kind::Date => Ok(raw.to_string()),
            Kind::Bool => Ok(match raw {
                "t" | "true" => "true".into(),
                "f" | "false" => "false".into(),
                other => other.to_string(),
            }),
            Kind::Timestamp | Kind::TimestampTz => timestamp(raw),
            Kind::Other => Err(self.not_read()),
        }
    }

    /// Why a value of a type not read is a reject.
    pub fn not_read(&self) -> String {
        format!(
            "column {} has type {}, which is not read: cast it to text in the query",
            self.name, self.type_name
        )
    }
}

/// A point in time in the documented format: RFC 3339 in UTC, fractions only when
/// there are some.
pub fn utc_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Whether cursor value `a` comes after `b` (both in this module's format).
pub fn later(kind: Kind, a: &str, b: &str) -> bool {
    match kind {
        Kind::Integer | Kind::Number => match (a.parse::<f64>(), b.parse::<f64>()) {
            (Ok(a), Ok(b)) => a > b,
            _ => a > b,
        },
        Kind::Timestamp | Kind::TimestampTz => {
            match (
                DateTime::parse_from_rfc3339(a),
                DateTime::parse_from_rfc3339(b),
            ) {
                (Ok(a), Ok(b)) => a > b,
                _ => a > b,
            }
        }
        _ => a > b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_as_csv_headers_do_and_values_have_one_format() {
        assert_eq!(
            Column::new("email", Kind::Text, "text").field,
            Some(Field::Email)
        );
        assert_eq!(
            Column::new("attributes.cost_center", Kind::Text, "text").field,
            Some(Field::Attribute("cost_center".into()))
        );
        assert_eq!(
            Column::new("dept", Kind::Text, "text").field,
            None,
            "ignored"
        );
        let ts = Column::new("updated_at", Kind::TimestampTz, "timestamptz");
        assert_eq!(
            ts.text("2026-12-07 10:00:00.25+00").as_deref(),
            Ok("2026-12-07T10:00:00.250Z")
        );
        let naive = Column::new("updated_at", Kind::Timestamp, "timestamp");
        assert_eq!(
            naive.text("2026-12-07 10:00:00").as_deref(),
            Ok("2026-12-07T10:00:00Z")
        );
        assert_eq!(
            Column::new("b", Kind::Bool, "bool").text("t").as_deref(),
            Ok("true")
        );
        let json = Column::new("attributes.x", Kind::Other, "jsonb")
            .text("{}")
            .expect_err("refused");
        assert!(
            json.contains("attributes.x") && json.contains("jsonb"),
            "{json}"
        );
        assert!(later(Kind::Integer, "10", "9"));
        assert!(later(
            Kind::TimestampTz,
            "2026-12-07T10:00:01Z",
            "2026-12-07T10:00:00.5Z"
        ));
    }
}
