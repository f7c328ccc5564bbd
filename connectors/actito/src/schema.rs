//! The profile table's structure, and what a [`Contact`] becomes in it.
//!
//! Actito refuses a profile whose mandatory attribute is empty, whose value breaks its
//! attribute's type or `valueRestriction`, or that names an unknown subscription; and a
//! bulk import reports such rows only at the end, in an error file. So the sink reads
//! the table's structure first (`GET /v4/entity/{e}/table/{t}`) and checks every record
//! against it *before* sending anything: a record that cannot be written is rejected
//! with the field at fault and never reaches the platform.
//!
//! The mapping rules, in order:
//! - the configured `attributes` (field → attribute; `""` unmaps);
//! - by type: `email` → the `EMAIL_ADDRESS` attribute, `first_name` → `FIRSTNAME`,
//!   `last_name` → `LASTNAME`, `language` → `MOTHER_LANGUAGE`;
//! - by name: another canonical field (not `external_id`, which must be configured)
//!   maps to a CUSTOM attribute of the same name, compared without case and `_`
//!   (`job_title` → `jobTitle`);
//! - a contact's custom attribute maps to the CUSTOM attribute of the same name; the
//!   source reads every remaining CUSTOM attribute back as a custom attribute;
//! - custom attributes the table does not have are not sent (logged once per run).
//!
//! The profile's identity (the `headerKeyColumn` of imports, the `key=value` of
//! deletes) is the external id's attribute when it is unique, else the email's.

use std::collections::{BTreeMap, BTreeSet};

use contactsync_core::{Contact, ContactKey, ContactStatus, Field};
use serde_json::{json, Value};

use contactsync_core::{ConfigError, ConnectorError};

use crate::client::{id_text, ActitoClient};
use crate::config::Mapping;

/// Reads the table's structure and resolves `mapping` against it: what `check` and
/// every run start with. A mapping the table cannot take is a config error of
/// `section`.
pub async fn load_schema(
    client: &ActitoClient,
    mapping: &Mapping,
    section: &str,
) -> Result<Schema, ConnectorError> {
    let (call, json) = client.table_structure().await?;
    let structure = TableStructure::parse(&json)
        .map_err(|message| ConnectorError::Protocol { call, message })?;
    Schema::resolve(structure, mapping).map_err(|m| {
        ConnectorError::Config(ConfigError::section(
            section,
            format!(
                "does not fit Actito table `{}` of entity `{}`: {m}",
                client.table(),
                client.entity()
            ),
        ))
    })
}

/// Attributes Actito maintains itself; never sent.
pub const TECHNICAL: [&str; 3] = ["profileId", "creationMoment", "updateMoment"];

/// One attribute of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeDef {
    /// Its name.
    pub name: String,
    /// Its type (`EMAIL_ADDRESS`, `FIRSTNAME`, `CUSTOM`, …), upper case.
    pub kind: String,
    /// Whether it identifies a profile.
    pub unique: bool,
    /// Whether a profile must have a value.
    pub mandatory: bool,
    /// For CUSTOM: `STRING`, `INTEGER`, `TIMESTAMP`, …, upper case.
    pub value_type: Option<String>,
    /// Whether it holds several values.
    pub multi_valued: bool,
    /// Shortest value, in characters.
    pub min_length: Option<usize>,
    /// Longest value, in characters.
    pub max_length: Option<usize>,
}

impl AttributeDef {
    fn is_technical(&self) -> bool {
        TECHNICAL.iter().any(|t| t.eq_ignore_ascii_case(&self.name))
    }

    /// Checks a value against the attribute's type and restriction.
    pub fn check(&self, value: &str) -> Result<(), String> {
        let len = value.chars().count();
        if let Some(max) = self.max_length {
            if len > max {
                return Err(format!(
                    "{len} characters, more than the {max} attribute `{}` allows",
                    self.name
                ));
            }
        }
        if let Some(min) = self.min_length {
            if len < min {
                return Err(format!(
                    "{len} characters, fewer than the {min} attribute `{}` needs",
                    self.name
                ));
            }
        }
        if self.kind == "EMAIL_ADDRESS" && !Contact::is_valid_email(value) {
            return Err(format!("{value:?} is not a valid email address"));
        }
        match self.value_type.as_deref() {
            Some("INTEGER" | "LONG") if !self.multi_valued => value
                .trim()
                .parse::<i64>()
                .map(|_| ())
                .map_err(|_| format!("{value:?} is not an integer")),
            Some("NUMBER" | "DOUBLE" | "DECIMAL" | "FLOAT") if !self.multi_valued => value
                .trim()
                .parse::<f64>()
                .map(|_| ())
                .map_err(|_| format!("{value:?} is not a number")),
            Some("BOOLEAN") if !self.multi_valued => {
                match value.trim().to_ascii_lowercase().as_str() {
                    "true" | "false" => Ok(()),
                    _ => Err(format!("{value:?} is not true or false")),
                }
            }
            _ => Ok(()),
        }
    }

    /// The JSON value sent for `value`: a number for numeric attributes.
    fn json_value(&self, value: &str) -> Value {
        match self.value_type.as_deref() {
            Some("INTEGER" | "LONG") if !self.multi_valued => value
                .trim()
                .parse::<i64>()
                .map(Value::from)
                .unwrap_or_else(|_| Value::from(value)),
            Some("BOOLEAN") if !self.multi_valued => {
                Value::Bool(value.trim().eq_ignore_ascii_case("true"))
            }
            _ => Value::from(value),
        }
    }
}

/// The table's structure as Actito describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableStructure {
    /// Its attributes.
    pub attributes: Vec<AttributeDef>,
    /// Its subscriptions' names.
    pub subscriptions: Vec<String>,
    /// Its segmentations, as (category, name).
    pub segmentations: Vec<(String, String)>,
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn flag(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

fn usize_of(v: Option<&Value>) -> Option<usize> {
    match v? {
        Value::Number(n) => n.as_u64().map(|n| n as usize),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl TableStructure {
    /// Reads the JSON of `GET /v4/entity/{e}/table/{t}`, liberally: subscriptions as
    /// objects with a `name` or as plain strings; segmentations with `category` as a
    /// string or an object with a `name`.
    pub fn parse(json: &Value) -> Result<Self, String> {
        let attrs = json
            .get("attributes")
            .and_then(Value::as_array)
            .ok_or("no `attributes` list in the table structure")?;
        let mut attributes = Vec::new();
        for a in attrs {
            let Some(name) = text(a.get("name")) else {
                return Err("an attribute without a name".into());
            };
            let restriction = a.get("valueRestriction");
            attributes.push(AttributeDef {
                name,
                kind: text(a.get("type"))
                    .unwrap_or_else(|| "CUSTOM".into())
                    .to_ascii_uppercase(),
                unique: flag(a.get("unique")),
                mandatory: flag(a.get("mandatory")),
                value_type: text(a.get("valueType")).map(|t| t.to_ascii_uppercase()),
                multi_valued: flag(a.get("multiValued")),
                min_length: usize_of(restriction.and_then(|r| r.get("minLength"))),
                max_length: usize_of(restriction.and_then(|r| r.get("maxLength"))),
            });
        }
        let subscriptions = json
            .get("subscriptions")
            .and_then(Value::as_array)
            .map(|l| {
                l.iter()
                    .filter_map(|s| text(Some(s)).or_else(|| text(s.get("name"))))
                    .collect()
            })
            .unwrap_or_default();
        let segmentations = json
            .get("segmentations")
            .and_then(Value::as_array)
            .map(|l| {
                l.iter()
                    .filter_map(|s| {
                        let category = text(s.get("category"))
                            .or_else(|| text(s.get("category").and_then(|c| c.get("name"))))?;
                        Some((category, text(s.get("name"))?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(TableStructure {
            attributes,
            subscriptions,
            segmentations,
        })
    }

    fn attribute(&self, name: &str) -> Option<&AttributeDef> {
        self.attributes.iter().find(|a| a.name == name).or_else(|| {
            self.attributes
                .iter()
                .find(|a| a.name.eq_ignore_ascii_case(name))
        })
    }
}

/// A record that cannot be written, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The field at fault (`email`, `attributes.site`, `subscriptions`).
    pub field: Option<String>,
    /// Why.
    pub reason: String,
}

/// A contact checked and turned into Actito's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// The unique key column's value.
    pub key_value: String,
    /// Attribute → value (`None`: clear it), in the schema's column order.
    pub attributes: Vec<(String, Option<String>)>,
    /// Subscription → subscribed.
    pub subscriptions: Vec<(String, bool)>,
    /// Segmentations the profile belongs to, as (category, name).
    pub segmentations: Vec<(String, String)>,
}

/// The mapping resolved against a table's structure.
#[derive(Debug, Clone)]
pub struct Schema {
    structure: TableStructure,
    /// Field → attribute, in column order.
    fields: Vec<(Field, AttributeDef)>,
    /// CUSTOM attributes no field is mapped to, by lower-case name.
    free: BTreeMap<String, AttributeDef>,
    key: (Field, AttributeDef),
    /// (contact name, Actito name) of the managed subscriptions.
    subscriptions: Vec<(String, String)>,
    segmentations: Vec<(Field, String)>,
}

fn squash(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_' && *c != '-' && *c != ' ')
        .flat_map(char::to_lowercase)
        .collect()
}

impl Schema {
    /// Resolves `mapping` against `structure`; errors are configuration problems.
    pub fn resolve(structure: TableStructure, mapping: &Mapping) -> Result<Self, String> {
        let usable = |a: &&AttributeDef| !a.is_technical();
        let mut fields: Vec<(Field, AttributeDef)> = Vec::new();
        let mut taken: BTreeSet<String> = BTreeSet::new();
        // Configured first.
        for (field, attr) in &mapping.attributes {
            let Some(attr) = attr else { continue };
            let def = structure
                .attribute(attr)
                .filter(usable)
                .ok_or_else(|| {
                    format!(
                        "attributes.{}: the table has no attribute `{attr}`",
                        field.name()
                    )
                })?
                .clone();
            taken.insert(def.name.clone());
            fields.push((field.clone(), def));
        }
        let configured = |f: &Field| mapping.attributes.contains_key(f);
        // By type.
        for (field, kind) in [
            (Field::Email, "EMAIL_ADDRESS"),
            (Field::FirstName, "FIRSTNAME"),
            (Field::LastName, "LASTNAME"),
            (Field::Language, "MOTHER_LANGUAGE"),
        ] {
            if configured(&field) {
                continue;
            }
            if let Some(def) = structure
                .attributes
                .iter()
                .filter(usable)
                .find(|a| a.kind == kind && !taken.contains(&a.name))
            {
                taken.insert(def.name.clone());
                fields.push((field, def.clone()));
            }
        }
        // By name.
        for field in Field::CANONICAL.iter() {
            if matches!(
                field,
                Field::ExternalId | Field::Subscriptions | Field::Status | Field::UpdatedAt
            ) || configured(field)
                || fields.iter().any(|(f, _)| f == field)
            {
                continue;
            }
            if let Some(def) = structure.attributes.iter().filter(usable).find(|a| {
                a.kind == "CUSTOM"
                    && !taken.contains(&a.name)
                    && squash(&a.name) == squash(field.name())
            }) {
                taken.insert(def.name.clone());
                fields.push((field.clone(), def.clone()));
            }
        }
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        let free = structure
            .attributes
            .iter()
            .filter(usable)
            .filter(|a| a.kind == "CUSTOM" && !taken.contains(&a.name))
            .map(|a| (a.name.to_lowercase(), a.clone()))
            .collect();
        let key = [Field::ExternalId, Field::Email]
            .iter()
            .find_map(|k| fields.iter().find(|(f, d)| f == k && d.unique))
            .or_else(|| fields.iter().find(|(_, d)| d.unique))
            .cloned()
            .ok_or_else(|| {
                "no unique attribute is mapped: map `external_id` (or `email`) to a unique attribute of the table".to_string()
            })?;
        let subscriptions = if mapping.subscriptions.is_empty() {
            structure
                .subscriptions
                .iter()
                .map(|s| (s.clone(), s.clone()))
                .collect()
        } else {
            let mut list = Vec::new();
            for (name, target) in &mapping.subscriptions {
                let actual = structure
                    .subscriptions
                    .iter()
                    .find(|s| s.eq_ignore_ascii_case(target))
                    .ok_or_else(|| {
                        format!("subscriptions.{name}: the table has no subscription `{target}`")
                    })?;
                list.push((name.clone(), actual.clone()));
            }
            list
        };
        let mut segmentations = Vec::new();
        for (field, category) in &mapping.segmentations {
            if !structure
                .segmentations
                .iter()
                .any(|(c, _)| c.eq_ignore_ascii_case(category))
            {
                return Err(format!(
                    "segmentations.{}: the table has no segmentation category `{category}`",
                    field.name()
                ));
            }
            segmentations.push((field.clone(), category.clone()));
        }
        Ok(Schema {
            structure,
            fields,
            free,
            key,
            subscriptions,
            segmentations,
        })
    }

    /// The table's structure.
    pub fn structure(&self) -> &TableStructure {
        &self.structure
    }

    /// The unique attribute profiles are keyed on (`headerKeyColumn`).
    pub fn key_attribute(&self) -> &str {
        &self.key.1.name
    }

    /// The canonical field the key attribute holds.
    pub fn key_field(&self) -> &Field {
        &self.key.0
    }

    /// The mapped fields and their attributes, in column order.
    pub fn mapped(&self) -> impl Iterator<Item = (&Field, &str)> {
        self.fields.iter().map(|(f, d)| (f, d.name.as_str()))
    }

    /// The field whose attribute an Actito error message names, if any.
    pub fn field_in_message(&self, message: &str) -> Option<String> {
        self.fields
            .iter()
            .find(|(_, d)| message.contains(&d.name))
            .map(|(f, _)| f.to_string())
    }

    /// The managed subscriptions' Actito names.
    pub fn managed_subscriptions(&self) -> impl Iterator<Item = &str> {
        self.subscriptions.iter().map(|(_, a)| a.as_str())
    }

    /// Every managed subscription with whether `contact` has it (active, and listed),
    /// without checking anything else: what a record last sent said, even when it no
    /// longer validates against today's table.
    pub fn subscriptions_of(&self, contact: &Contact) -> Vec<(String, bool)> {
        let active = contact.status == ContactStatus::Active;
        self.subscriptions
            .iter()
            .map(|(name, actito)| {
                let listed = contact
                    .subscriptions
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(name));
                (actito.clone(), active && listed)
            })
            .collect()
    }

    /// Checks `contact` against the table and turns it into Actito's terms.
    pub fn prepare(&self, contact: &Contact) -> Result<Prepared, Invalid> {
        let invalid = |field: &Field, reason: String| Invalid {
            field: Some(field.to_string()),
            reason,
        };
        let mut attributes: Vec<(String, Option<String>)> = Vec::new();
        let mut present: BTreeSet<String> = BTreeSet::new();
        for (field, def) in &self.fields {
            let value = contact.get(field);
            if let Some(v) = &value {
                def.check(v).map_err(|r| invalid(field, r))?;
                present.insert(def.name.clone());
            }
            attributes.push((def.name.clone(), value));
        }
        for (name, value) in &contact.attributes {
            let explicitly = Field::Attribute(name.clone());
            if self.fields.iter().any(|(f, _)| f == &explicitly) {
                continue;
            }
            if let Some(def) = self.free.get(&name.to_lowercase()) {
                def.check(value).map_err(|r| invalid(&explicitly, r))?;
                present.insert(def.name.clone());
                attributes.push((def.name.clone(), Some(value.clone())));
            }
        }
        for def in self
            .structure
            .attributes
            .iter()
            .filter(|a| a.mandatory && !a.is_technical())
        {
            if !present.contains(&def.name) {
                let field = self
                    .fields
                    .iter()
                    .find(|(_, d)| d.name == def.name)
                    .map(|(f, _)| f.to_string())
                    .unwrap_or_else(|| def.name.clone());
                return Err(Invalid {
                    field: Some(field),
                    reason: format!(
                        "the table's mandatory attribute `{}` has no value",
                        def.name
                    ),
                });
            }
        }
        let key_value = contact.get(&self.key.0).ok_or_else(|| {
            invalid(
                &self.key.0,
                format!(
                    "no value for the unique attribute `{}` that identifies profiles",
                    self.key.1.name
                ),
            )
        })?;
        let mut wanted: BTreeSet<&str> = BTreeSet::new();
        for s in &contact.subscriptions {
            let Some((_, actito)) = self
                .subscriptions
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(s))
            else {
                return Err(invalid(
                    &Field::Subscriptions,
                    format!("`{s}` is not a subscription of the table (or not a configured one)"),
                ));
            };
            wanted.insert(actito);
        }
        let active = contact.status == ContactStatus::Active;
        let subscriptions = self
            .subscriptions
            .iter()
            .map(|(_, a)| (a.clone(), active && wanted.contains(a.as_str())))
            .collect();
        let mut segmentations = Vec::new();
        for (field, category) in &self.segmentations {
            let Some(name) = contact.get(field) else {
                continue;
            };
            let Some((c, n)) =
                self.structure.segmentations.iter().find(|(c, n)| {
                    c.eq_ignore_ascii_case(category) && n.eq_ignore_ascii_case(&name)
                })
            else {
                return Err(invalid(
                    field,
                    format!("`{name}` is not a segmentation of category `{category}`"),
                ));
            };
            segmentations.push((c.clone(), n.clone()));
        }
        Ok(Prepared {
            key_value,
            attributes,
            subscriptions,
            segmentations,
        })
    }

    /// The JSON body of `POST …/profile` for `prepared`. Attributes without a value
    /// are sent as `null` (cleared) only when `clear` (an update); never on a create.
    pub fn profile_body(&self, prepared: &Prepared, clear: bool, now: &str) -> Value {
        let attributes: Vec<Value> = prepared
            .attributes
            .iter()
            .filter(|(_, v)| v.is_some() || clear)
            .map(|(name, v)| {
                let value = match (v, self.structure.attribute(name)) {
                    (Some(v), Some(def)) => def.json_value(v),
                    (Some(v), None) => Value::from(v.as_str()),
                    (None, _) => Value::Null,
                };
                json!({"name": name, "value": value})
            })
            .collect();
        let subscriptions: Vec<Value> = prepared
            .subscriptions
            .iter()
            .map(|(name, on)| json!({"name": name, "subscribe": on}))
            .collect();
        let segmentations: Vec<Value> = prepared
            .segmentations
            .iter()
            .map(|(c, n)| json!({"belongs": true, "segmentation": {"category": c, "name": n}}))
            .collect();
        let mut body = json!({
            "attributes": attributes,
            "subscriptions": subscriptions,
            "dataCollectionInformation": {"date": now, "source": "contactsync", "way": "api_push"},
        });
        if !segmentations.is_empty() {
            body["segmentations"] = Value::Array(segmentations);
        }
        body
    }

    /// How to address an existing profile in a URL: the profile id kept as the handle
    /// when there is one (an email may belong to someone else by now), else
    /// `attribute=value` of a unique attribute the key (or the last synced email) gives.
    pub fn profile_key(
        &self,
        key: &ContactKey,
        email: Option<&str>,
        handle: Option<&str>,
    ) -> Option<String> {
        if let Some(id) = handle.map(str::trim).filter(|h| !h.is_empty()) {
            return Some(id.to_string());
        }
        let value_for = |field: &Field| match (field, key) {
            (Field::ExternalId, ContactKey::ExternalId(v)) => Some(v.clone()),
            (Field::Email, ContactKey::Email(v)) => Some(v.clone()),
            (Field::Email, _) => email.map(str::to_string),
            _ => None,
        };
        std::iter::once(&self.key)
            .chain(self.fields.iter().filter(|(_, d)| d.unique))
            .find_map(|(f, d)| value_for(f).map(|v| format!("{}={v}", d.name)))
    }

    /// The key column's value of a profile as Actito lists it, compared as
    /// [`Schema::existing_key`] does.
    pub fn listed_key(&self, profile: &Value) -> Option<String> {
        let (_, contact) = self.contact_from(profile).ok()?;
        contact.get(&self.key.0).map(|v| Self::existing_key(&v))
    }

    /// A key column's value as it is compared with the profiles Actito holds: trimmed
    /// and lower-cased (addresses match without regard to case).
    pub fn existing_key(value: &str) -> String {
        value.trim().to_lowercase()
    }

    /// The key column's value for a change already sent, from its key (and email).
    pub fn key_value_of(&self, key: &ContactKey, email: Option<&str>) -> Option<String> {
        match (&self.key.0, key) {
            (Field::ExternalId, ContactKey::ExternalId(v))
            | (Field::Email, ContactKey::Email(v)) => Some(v.clone()),
            (Field::Email, _) => email.map(str::to_string),
            _ => None,
        }
    }

    /// A profile as Actito lists it, as a contact. Subscriptions are read back under
    /// their contact names; a profile subscribed to none of the managed subscriptions
    /// (when there are any, and `status` is not mapped) reads as inactive: Actito has no
    /// status of its own, and unsubscribing is how this connector removes people.
    pub fn contact_from(&self, profile: &Value) -> Result<(Option<String>, Contact), String> {
        let mut values: BTreeMap<String, String> = BTreeMap::new();
        match profile.get("attributes") {
            Some(Value::Array(list)) => {
                for a in list {
                    if let (Some(name), Some(v)) = (text(a.get("name")), text(a.get("value"))) {
                        values.insert(name, v);
                    }
                }
            }
            Some(Value::Object(map)) => {
                for (name, v) in map {
                    if let Some(v) = text(Some(v)) {
                        values.insert(name.clone(), v);
                    }
                }
            }
            _ => return Err("a profile without `attributes`".into()),
        }
        let id = profile
            .get("profileId")
            .or_else(|| profile.get("id"))
            .map(id_text)
            .or_else(|| values.get("profileId").cloned());
        let mut contact = Contact::default();
        for (field, def) in &self.fields {
            if let Some(v) = values.get(&def.name) {
                contact
                    .set(field, v)
                    .map_err(|e| format!("attribute `{}`: {e}", def.name))?;
            }
        }
        for def in self.free.values() {
            if let Some(v) = values.get(&def.name) {
                contact
                    .set(&Field::Attribute(def.name.clone()), v)
                    .map_err(|e| format!("attribute `{}`: {e}", def.name))?;
            }
        }
        let subscribed: BTreeSet<String> = match profile.get("subscriptions") {
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(|s| match s {
                    Value::String(n) => Some(n.clone()),
                    other => {
                        let on = other
                            .get("subscribe")
                            .or_else(|| other.get("subscribed"))
                            .map(|v| flag(Some(v)))
                            .unwrap_or(true);
                        on.then(|| text(other.get("name"))).flatten()
                    }
                })
                .collect(),
            _ => BTreeSet::new(),
        };
        for (name, actito) in &self.subscriptions {
            if subscribed.iter().any(|s| s.eq_ignore_ascii_case(actito)) {
                contact.subscriptions.insert(name.clone());
            }
        }
        let status_mapped = self.fields.iter().any(|(f, _)| f == &Field::Status);
        if !status_mapped && !self.subscriptions.is_empty() && contact.subscriptions.is_empty() {
            contact.status = ContactStatus::Inactive;
        }
        Ok((id, contact))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn structure() -> TableStructure {
        TableStructure::parse(&json!({
            "attributes": [
                {"name": "profileId", "type": "CUSTOM", "valueType": "INTEGER"},
                {"name": "emailAddress", "type": "EMAIL_ADDRESS", "unique": true, "mandatory": true},
                {"name": "firstName", "type": "FIRSTNAME"},
                {"name": "customerId", "type": "CUSTOM", "valueType": "STRING", "unique": true,
                 "valueRestriction": {"maxLength": 5}},
                {"name": "department", "type": "CUSTOM", "valueType": "STRING"},
                {"name": "age", "type": "CUSTOM", "valueType": "INTEGER"}
            ],
            "subscriptions": [{"name": "Newsletter"}, "Events"]
        }))
        .expect("structure")
    }

    fn mapping() -> Mapping {
        let mut m = Mapping::default();
        m.attributes
            .insert(Field::ExternalId, Some("customerId".into()));
        m
    }

    #[test]
    fn mapping_by_config_type_and_name() {
        let s = Schema::resolve(structure(), &mapping()).expect("schema");
        let mapped: Vec<_> = s
            .mapped()
            .map(|(f, a)| (f.name().to_string(), a.to_string()))
            .collect();
        assert!(mapped.contains(&("email".into(), "emailAddress".into())));
        assert!(mapped.contains(&("department".into(), "department".into())));
        assert_eq!(s.key_attribute(), "customerId");
        let without = Schema::resolve(structure(), &Mapping::default()).expect("schema");
        assert_eq!(without.key_attribute(), "emailAddress");
    }

    #[test]
    fn records_are_checked_against_the_table() {
        let s = Schema::resolve(structure(), &mapping()).expect("schema");
        let mut c = Contact {
            external_id: Some("E1".into()),
            email: Some("ann@example.com".into()),
            ..Contact::default()
        };
        c.subscriptions.insert("newsletter".into());
        let p = s.prepare(&c).expect("valid");
        assert_eq!(p.key_value, "E1");
        assert!(p.subscriptions.contains(&("Newsletter".into(), true)));
        assert!(p.subscriptions.contains(&("Events".into(), false)));

        let long = Contact {
            external_id: Some("E123456".into()),
            ..c.clone()
        };
        let e = s.prepare(&long).expect_err("too long");
        assert_eq!(e.field.as_deref(), Some("external_id"));

        let no_mail = Contact {
            email: None,
            ..c.clone()
        };
        assert_eq!(
            s.prepare(&no_mail).expect_err("mandatory").field.as_deref(),
            Some("email")
        );

        let mut bad_age = c.clone();
        bad_age.attributes.insert("age".into(), "old".into());
        assert_eq!(
            s.prepare(&bad_age).expect_err("integer").field.as_deref(),
            Some("attributes.age")
        );

        let mut unknown_sub = c.clone();
        unknown_sub.subscriptions.insert("Gossip".into());
        assert_eq!(
            s.prepare(&unknown_sub).expect_err("sub").field.as_deref(),
            Some("subscriptions")
        );
    }

    #[test]
    fn profiles_address_by_profile_id_else_by_unique_key() {
        let s = Schema::resolve(structure(), &mapping()).expect("schema");
        // The profile id first: an address may be someone else's by now.
        assert_eq!(
            s.profile_key(
                &ContactKey::Email("x@b.org".into()),
                Some("x@b.org"),
                Some("7")
            ),
            Some("7".into())
        );
        assert_eq!(
            s.profile_key(&ContactKey::ExternalId("E1".into()), None, None),
            Some("customerId=E1".into())
        );
        assert_eq!(
            s.profile_key(&ContactKey::Email("a@b.org".into()), None, None),
            Some("emailAddress=a@b.org".into())
        );
    }
}
