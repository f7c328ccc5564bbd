//! What the user writes in a `type = "csv"` section, and how columns map to fields.
//!
//! Source and sink have separate settings types so that `#[serde(deny_unknown_fields)]`
//! catches a sink-only key (`removal`) misplaced in a source section. What they share
//! (the file's format and column mapping) is resolved into a [`CsvFormat`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use contactsync_core::{ConfigError, ConnectorSettings, Field};
use serde::Deserialize;

/// What to do with a column that names no canonical field and is not in `columns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtraColumns {
    /// It becomes a custom attribute named after its header.
    #[default]
    Attributes,
    /// It is not read (the sink keeps its values in rows it rewrites).
    Ignore,
}

/// How the sink removes a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemovalMode {
    /// The row is dropped from the file.
    #[default]
    Drop,
    /// The row is kept with status `inactive`.
    Mark,
}

/// The settings of a CSV source section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// The file, relative to the config file's directory.
    pub path: PathBuf,
    /// The field separator, one ASCII character; default `,`.
    #[serde(default)]
    pub delimiter: Option<String>,
    /// The quote character, one ASCII character; default `"`.
    #[serde(default)]
    pub quote: Option<String>,
    /// Field name (`email`, `attributes.Cost Center`) → column header.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// What to do with other columns; default `attributes`.
    #[serde(default)]
    pub extra_columns: ExtraColumns,
    /// A record longer than this many bytes is rejected with its line instead of
    /// being read into memory; default 1 MiB.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: u64,
}

/// The default of `max_record_bytes`: 1 MiB.
pub const DEFAULT_MAX_RECORD_BYTES: u64 = 1 << 20;

fn default_max_record_bytes() -> u64 {
    DEFAULT_MAX_RECORD_BYTES
}

/// The settings of a CSV sink section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSettings {
    /// The file, relative to the config file's directory.
    pub path: PathBuf,
    /// The field separator, one ASCII character; default `,`.
    #[serde(default)]
    pub delimiter: Option<String>,
    /// The quote character, one ASCII character; default `"`.
    #[serde(default)]
    pub quote: Option<String>,
    /// Field name → column header to write it under.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// Whether attributes without a configured column are written; default `attributes`.
    #[serde(default)]
    pub extra_columns: ExtraColumns,
    /// How removals are done; default `drop`.
    #[serde(default)]
    pub removal: RemovalMode,
    /// The fields to write, in order, when the sink creates the file. Default: every
    /// canonical field in `Field::CANONICAL` order, then the attributes seen.
    #[serde(default)]
    pub fields: Option<Vec<String>>,
}

/// The file format and column mapping, shared by source and sink.
#[derive(Debug, Clone)]
pub struct CsvFormat {
    /// The resolved file path.
    pub path: PathBuf,
    /// The file as the user named it, for record origins.
    pub display_name: String,
    /// The field separator.
    pub delimiter: u8,
    /// The quote character.
    pub quote: u8,
    /// How headers map to fields.
    pub columns: ColumnMap,
    /// The longest record read (bytes); longer ones are rejected unread.
    pub max_record_bytes: u64,
}

/// The resolved source configuration.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Format and mapping.
    pub format: CsvFormat,
}

/// The resolved sink configuration.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Format and mapping.
    pub format: CsvFormat,
    /// How removals are done.
    pub removal: RemovalMode,
    /// The configured fields to write, in order.
    pub fields: Option<Vec<Field>>,
}

impl SourceConfig {
    /// Parses and checks a source section.
    pub fn from_settings(settings: &ConnectorSettings) -> Result<Self, ConfigError> {
        let s: SourceSettings = settings.parse()?;
        if s.max_record_bytes == 0 {
            return Err(settings.error(
                "max_record_bytes",
                "must be at least 1 (the default is 1048576, 1 MiB)",
            ));
        }
        let max_record_bytes = s.max_record_bytes;
        let mut config = SourceConfig {
            format: CsvFormat::new(
                settings,
                s.path,
                s.delimiter,
                s.quote,
                s.columns,
                s.extra_columns,
            )?,
        };
        config.format.max_record_bytes = max_record_bytes;
        Ok(config)
    }
}

impl SinkConfig {
    /// Parses and checks a sink section.
    pub fn from_settings(settings: &ConnectorSettings) -> Result<Self, ConfigError> {
        let s: SinkSettings = settings.parse()?;
        let fields = s
            .fields
            .map(|names| names.iter().map(|n| Field::parse(n)).collect::<Vec<_>>());
        if fields.as_ref().is_some_and(|f| f.is_empty()) {
            return Err(settings.error("fields", "must name at least one field"));
        }
        // Rows are found again by external id or email; without either column every
        // run would append the same people again.
        if fields
            .as_ref()
            .is_some_and(|f| !f.contains(&Field::ExternalId) && !f.contains(&Field::Email))
        {
            return Err(settings.error(
                "fields",
                "must include external_id or email, which identify each row",
            ));
        }
        Ok(SinkConfig {
            format: CsvFormat::new(
                settings,
                s.path,
                s.delimiter,
                s.quote,
                s.columns,
                s.extra_columns,
            )?,
            removal: s.removal,
            fields,
        })
    }
}

impl CsvFormat {
    fn new(
        settings: &ConnectorSettings,
        path: PathBuf,
        delimiter: Option<String>,
        quote: Option<String>,
        columns: BTreeMap<String, String>,
        extra_columns: ExtraColumns,
    ) -> Result<Self, ConfigError> {
        let configured: Vec<(Field, String)> = columns
            .into_iter()
            .map(|(field, header)| (Field::parse(&field), header.trim().to_string()))
            .collect();
        for (i, (field, header)) in configured.iter().enumerate() {
            if header.is_empty() {
                return Err(settings.error("columns", format!("the column for {field} is empty")));
            }
            if configured[..i]
                .iter()
                .any(|(_, h)| h.eq_ignore_ascii_case(header))
            {
                return Err(settings.error(
                    "columns",
                    format!("column {header:?} is mapped to two fields"),
                ));
            }
        }
        let delimiter = single_byte(settings, "delimiter", delimiter, b',')?;
        let quote = single_byte(settings, "quote", quote, b'"')?;
        if delimiter == quote {
            return Err(settings.error(
                "quote",
                format!(
                    "must differ from the delimiter (both are {:?})",
                    delimiter as char
                ),
            ));
        }
        Ok(CsvFormat {
            display_name: path.display().to_string(),
            path: settings.path(&path),
            delimiter,
            quote,
            columns: ColumnMap {
                configured,
                extra_columns,
            },
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
        })
    }
}

/// One ASCII character from a setting, the way the `csv` crate wants it.
fn single_byte(
    settings: &ConnectorSettings,
    key: &str,
    value: Option<String>,
    default: u8,
) -> Result<u8, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    let value = if value == "\\t" {
        "\t".to_string()
    } else {
        value
    };
    match value.as_bytes() {
        // CSV ends its lines with these: they cannot also separate or quote fields.
        [b'\n' | b'\r'] => Err(settings.error(
            key,
            format!("cannot be a line break, got {value:?}"),
        )),
        [b] if b.is_ascii() && !b.is_ascii_alphanumeric() => Ok(*b),
        _ => Err(settings.error(
            key,
            format!("must be one ASCII character that is not a letter or digit (\"\\t\" for tab), got {value:?}"),
        )),
    }
}

/// How CSV column headers map to fields.
#[derive(Debug, Clone)]
pub struct ColumnMap {
    /// Explicit mappings: field → header (compared without regard to ASCII case).
    pub configured: Vec<(Field, String)>,
    /// What other columns become.
    pub extra_columns: ExtraColumns,
}

/// The columns of one file, resolved against a [`ColumnMap`].
#[derive(Debug, Clone)]
pub struct ResolvedColumns {
    /// The field of each column, `None` for a column that is not read.
    pub fields: Vec<Option<Field>>,
    /// Configured headers the file does not have.
    pub missing: Vec<String>,
}

impl ColumnMap {
    /// Maps each header to its field, once per file: the configured mapping first; then
    /// a header naming a field ([`Field::parse`], which also turns any other name into an
    /// attribute) unless that field is configured to come from another column, or it is
    /// an attribute and extra columns are ignored.
    pub fn resolve<'h>(&self, headers: impl IntoIterator<Item = &'h str>) -> ResolvedColumns {
        let mut found = vec![false; self.configured.len()];
        let fields = headers
            .into_iter()
            .map(|header| {
                let header = header.trim();
                if let Some(i) = self
                    .configured
                    .iter()
                    .position(|(_, h)| h.eq_ignore_ascii_case(header))
                {
                    found[i] = true;
                    return Some(self.configured[i].0.clone());
                }
                if header.is_empty() {
                    return None;
                }
                let field = Field::parse(header);
                let taken = self.configured.iter().any(|(f, _)| *f == field);
                let ignored = !field.is_canonical() && self.extra_columns == ExtraColumns::Ignore;
                (!taken && !ignored).then_some(field)
            })
            .collect();
        let missing = self
            .configured
            .iter()
            .zip(found)
            .filter(|(_, found)| !found)
            .map(|((_, h), _)| h.clone())
            .collect();
        ResolvedColumns { fields, missing }
    }

    /// The header to write `field` under: its configured column, else its name.
    pub fn header_for(&self, field: &Field) -> String {
        self.configured
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, h)| h.clone())
            .unwrap_or_else(|| field.name().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(toml: &str) -> ColumnMap {
        let settings = ConnectorSettings::from_toml("sources.hr", toml).unwrap();
        SourceConfig::from_settings(&settings)
            .unwrap()
            .format
            .columns
    }

    #[test]
    fn canonical_headers_configured_columns_and_attributes() {
        let columns = map("path = \"x.csv\"\ncolumns = { email = \"E-Mail\", \"attributes.cc\" = \"Cost Center\" }");
        let resolved =
            columns.resolve(["EMAIL", "e-mail", "First_Name", "Cost Center", "Site", ""]);
        assert_eq!(
            resolved.fields,
            vec![
                None, // email comes from E-Mail
                Some(Field::Email),
                Some(Field::FirstName),
                Some(Field::Attribute("cc".into())),
                Some(Field::Attribute("Site".into())),
                None,
            ]
        );
        assert!(resolved.missing.is_empty());
        assert_eq!(columns.header_for(&Field::Email), "E-Mail");
        assert_eq!(columns.header_for(&Field::Phone), "phone");
    }

    #[test]
    fn ignored_extra_columns_and_missing_configured_ones() {
        let columns = map(
            "path = \"x.csv\"\nextra_columns = \"ignore\"\ncolumns = { external_id = \"Emp No\" }",
        );
        let resolved = columns.resolve(["email", "Site"]);
        assert_eq!(resolved.fields, vec![Some(Field::Email), None]);
        assert_eq!(resolved.missing, vec!["Emp No".to_string()]);
    }

    #[test]
    fn bad_settings_name_the_key() {
        for (toml, key) in [
            ("path = \"x.csv\"\ndelimiter = \";;\"", "delimiter"),
            ("path = \"x.csv\"\nremoval = \"mark\"", "removal"),
        ] {
            let settings = ConnectorSettings::from_toml("sources.hr", toml).unwrap();
            let err = SourceConfig::from_settings(&settings)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err}");
        }
        let settings =
            ConnectorSettings::from_toml("sources.hr", "path = \"x.csv\"\ndelimiter = \"\\\\t\"")
                .unwrap();
        assert_eq!(
            SourceConfig::from_settings(&settings)
                .unwrap()
                .format
                .delimiter,
            b'\t'
        );
        let settings = ConnectorSettings::from_toml(
            "sinks.out",
            "path = \"x.csv\"\nfields = [\"first_name\"]",
        )
        .unwrap();
        let err = SinkConfig::from_settings(&settings)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`fields`"), "{err}");
    }
}
