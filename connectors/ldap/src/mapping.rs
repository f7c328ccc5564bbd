//! Which LDAP attribute means which [`Field`] of a [`Contact`], in both directions.
//!
//! Directories differ (inetOrgPerson, Active Directory, 389-DS, home-grown schemas),
//! so the mapping is configuration with inetOrgPerson defaults. It is written
//! `ldapAttribute = "field"` because attribute names are case-insensitive in LDAP and
//! so survive any case-folding of config keys; a field name that is not canonical must
//! be spelt `attributes.NAME`, so that a typo (`emial`) is an error rather than a
//! silently empty custom field.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use contactsync_core::{ConfigError, ConnectorSettings, Contact, Field};
use serde::Deserialize;

/// The inetOrgPerson defaults: attribute, field.
pub const DEFAULT_ATTRIBUTES: [(&str, Field); 11] = [
    ("employeeNumber", Field::ExternalId),
    ("mail", Field::Email),
    ("givenName", Field::FirstName),
    ("sn", Field::LastName),
    ("displayName", Field::DisplayName),
    ("telephoneNumber", Field::Phone),
    ("mobile", Field::Mobile),
    ("o", Field::Company),
    ("departmentNumber", Field::Department),
    ("title", Field::JobTitle),
    ("preferredLanguage", Field::Language),
];

/// The attribute ↔ field pairs in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeMap {
    pairs: Vec<(String, Field)>,
}

impl Default for AttributeMap {
    fn default() -> Self {
        AttributeMap {
            pairs: DEFAULT_ATTRIBUTES
                .iter()
                .map(|(attr, field)| (attr.to_string(), field.clone()))
                .collect(),
        }
    }
}

impl AttributeMap {
    /// The defaults, changed by the `attributes` table: `attr = "field"` maps `attr` to
    /// `field` (replacing the default attribute of that field), `attr = ""` stops
    /// reading or writing `attr`.
    pub fn from_settings(
        settings: &ConnectorSettings,
        overrides: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut map = AttributeMap::default();
        for (attr, field_name) in overrides {
            let key = format!("attributes.{attr}");
            check_attribute_name(settings, &key, attr)?;
            map.pairs.retain(|(a, _)| !a.eq_ignore_ascii_case(attr));
            let field_name = field_name.trim();
            if field_name.is_empty() {
                continue;
            }
            let field = Field::parse(field_name);
            if !field.is_canonical() && !field_name.starts_with("attributes.") {
                let canonical: Vec<&str> = Field::CANONICAL.iter().map(|f| f.name()).collect();
                return Err(settings.error(
                    &key,
                    format!(
                        "{field_name:?} is not a field: use one of {} or attributes.NAME for a custom field",
                        canonical.join(", ")
                    ),
                ));
            }
            if field == Field::UpdatedAt {
                return Err(settings.error(&key, "updated_at is always read from modifyTimestamp"));
            }
            map.pairs.retain(|(_, f)| *f != field);
            map.pairs.push((attr.clone(), field));
        }
        Ok(map)
    }

    /// The pairs, attribute first.
    pub fn pairs(&self) -> &[(String, Field)] {
        &self.pairs
    }

    /// Whether `attr` is mapped (case-insensitively).
    pub fn contains_attribute(&self, attr: &str) -> bool {
        self.pairs.iter().any(|(a, _)| a.eq_ignore_ascii_case(attr))
    }

    /// Maps an entry's attributes into a contact. `Err((field, reason))` when a value
    /// does not fit its field (a status the field does not know).
    pub fn read(
        &self,
        attrs: &HashMap<String, Vec<String>>,
        multi_value: MultiValue,
        separator: &str,
    ) -> Result<Contact, (Field, String)> {
        let by_name: HashMap<String, &Vec<String>> = attrs
            .iter()
            .map(|(name, values)| (name.to_ascii_lowercase(), values))
            .collect();
        let mut contact = Contact::default();
        for (attr, field) in &self.pairs {
            let Some(values) = by_name.get(&attr.to_ascii_lowercase()) else {
                continue;
            };
            let value = match (multi_value, values.as_slice()) {
                (_, []) => continue,
                (MultiValue::First, [first, ..]) => first.clone(),
                (MultiValue::Join, all) => all.join(separator),
            };
            contact
                .set(field, &value)
                .map_err(|reason| (field.clone(), reason))?;
        }
        Ok(contact)
    }

    /// The attribute values a contact should have: attribute (as configured) → values.
    /// Subscriptions become one value each; unset fields give no entry.
    pub fn write(&self, contact: &Contact) -> Vec<(String, BTreeSet<String>)> {
        let mut out = Vec::new();
        for (attr, field) in &self.pairs {
            let values: BTreeSet<String> = match field {
                Field::Subscriptions => contact.subscriptions.iter().cloned().collect(),
                other => contact.get(other).into_iter().collect(),
            };
            if !values.is_empty() {
                out.push((attr.clone(), values));
            }
        }
        out
    }
}

/// How a multi-valued attribute becomes one field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MultiValue {
    /// The first value the server returns.
    #[default]
    First,
    /// All values, joined with `multi_value_separator`.
    Join,
}

/// An attribute description: a name (letters, digits, hyphens) or an OID.
pub(crate) fn check_attribute_name(
    settings: &ConnectorSettings,
    key: &str,
    name: &str,
) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == ';');
    if ok {
        Ok(())
    } else {
        Err(settings.error(key, format!("{name:?} is not an LDAP attribute name")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ConnectorSettings {
        ConnectorSettings::from_toml("sources.dir", "url = \"ldap://x\"").unwrap()
    }

    #[test]
    fn overrides_replace_the_default_of_the_same_field_and_can_unmap() {
        let overrides = BTreeMap::from([
            ("uid".to_string(), "external_id".to_string()),
            ("mobile".to_string(), String::new()),
            (
                "costCenter".to_string(),
                "attributes.cost_center".to_string(),
            ),
        ]);
        let map = AttributeMap::from_settings(&settings(), &overrides).unwrap();
        assert!(!map.contains_attribute("employeeNumber"));
        assert!(!map.contains_attribute("mobile"));
        assert!(map.contains_attribute("UID"));
        assert!(map.pairs().contains(&(
            "costCenter".to_string(),
            Field::Attribute("cost_center".into())
        )));
    }

    #[test]
    fn a_misspelt_field_is_an_error_naming_the_key() {
        let overrides = BTreeMap::from([("mail".to_string(), "emial".to_string())]);
        let err = AttributeMap::from_settings(&settings(), &overrides).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("attributes.mail"));
        assert!(err.message.contains("emial"));
    }

    #[test]
    fn multi_values_take_the_first_or_join() {
        let map = AttributeMap::default();
        let attrs = HashMap::from([
            (
                "MAIL".to_string(),
                vec!["a@Example.org".to_string(), "b@example.org".to_string()],
            ),
            (
                "title".to_string(),
                vec!["Dev".to_string(), "Lead".to_string()],
            ),
        ]);
        let first = map.read(&attrs, MultiValue::First, ";").unwrap();
        assert_eq!(first.email.as_deref(), Some("a@example.org"));
        assert_eq!(first.job_title.as_deref(), Some("Dev"));
        let joined = map.read(&attrs, MultiValue::Join, " / ").unwrap();
        assert_eq!(joined.job_title.as_deref(), Some("Dev / Lead"));
    }
}
