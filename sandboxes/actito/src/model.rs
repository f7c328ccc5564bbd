//! The sandbox's own data: tables, their structure and profiles, imports; and the
//! rules Actito applies when a profile is written (known attributes, types and
//! lengths, unique keys, mandatory values, known subscriptions and segmentations).
//! Written from the spec, sharing nothing with the client.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Attributes Actito maintains itself; clients cannot write them.
pub const TECHNICAL: [&str; 3] = ["profileId", "creationMoment", "updateMoment"];

/// An attribute's length restriction.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValueRestriction {
    /// Shortest value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_length: Option<usize>,
    /// Longest value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
}

/// One attribute of a profile table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attribute {
    /// Its name.
    pub name: String,
    /// `EMAIL_ADDRESS`, `FIRSTNAME`, `LASTNAME`, `MOTHER_LANGUAGE`, `CUSTOM`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// Identifies a profile.
    #[serde(default)]
    pub unique: bool,
    /// Must have a value.
    #[serde(default)]
    pub mandatory: bool,
    /// For CUSTOM: `STRING`, `INTEGER`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_type: Option<String>,
    /// Several values.
    #[serde(default)]
    pub multi_valued: bool,
    /// Length restriction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_restriction: Option<ValueRestriction>,
}

impl Attribute {
    /// An attribute of `kind`, neither unique nor mandatory.
    pub fn new(name: &str, kind: &str) -> Self {
        Attribute {
            name: name.to_string(),
            kind: kind.to_string(),
            unique: false,
            mandatory: false,
            value_type: None,
            multi_valued: false,
            value_restriction: None,
        }
    }

    /// A CUSTOM attribute of `value_type`.
    pub fn custom(name: &str, value_type: &str) -> Self {
        Attribute {
            value_type: Some(value_type.to_string()),
            ..Attribute::new(name, "CUSTOM")
        }
    }

    /// Marks it unique; builder style.
    pub fn unique(mut self) -> Self {
        self.unique = true;
        self
    }

    /// Marks it mandatory; builder style.
    pub fn mandatory(mut self) -> Self {
        self.mandatory = true;
        self
    }

    /// Limits its length; builder style.
    pub fn max_length(mut self, max: usize) -> Self {
        self.value_restriction = Some(ValueRestriction {
            min_length: None,
            max_length: Some(max),
        });
        self
    }

    /// Checks a value as Actito would.
    pub fn check(&self, value: &str) -> Result<(), String> {
        let n = value.chars().count();
        if let Some(r) = &self.value_restriction {
            if r.max_length.is_some_and(|m| n > m) || r.min_length.is_some_and(|m| n < m) {
                return Err(format!(
                    "value of attribute {} has {n} characters, outside its restriction",
                    self.name
                ));
            }
        }
        if self.kind == "EMAIL_ADDRESS" && !valid_email(value) {
            return Err(format!("invalid email address for attribute {}", self.name));
        }
        if !self.multi_valued {
            match self.value_type.as_deref() {
                Some("INTEGER") if value.trim().parse::<i64>().is_err() => {
                    return Err(format!("attribute {} expects an integer", self.name))
                }
                Some("BOOLEAN") if !matches!(value, "true" | "false") => {
                    return Err(format!("attribute {} expects true or false", self.name))
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn technical(&self) -> bool {
        TECHNICAL.contains(&self.name.as_str())
    }

    fn output(&self, value: &str) -> Value {
        match self.value_type.as_deref() {
            Some("INTEGER") => value
                .parse::<i64>()
                .map(Value::from)
                .unwrap_or_else(|_| Value::from(value)),
            _ => Value::from(value),
        }
    }
}

/// A simple check of an address: one `@`, both sides non-empty, a dot in the domain,
/// no whitespace.
pub fn valid_email(value: &str) -> bool {
    contactsync_sandbox_kit::plain_email(value)
}

/// A segmentation of a table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Segmentation {
    /// Its category.
    pub category: String,
    /// Its name.
    pub name: String,
}

/// A profile table's structure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDef {
    /// The table's name.
    pub name: String,
    /// Its attributes (technical ones are added by the sandbox).
    pub attributes: Vec<Attribute>,
    /// Its subscriptions.
    pub subscriptions: Vec<String>,
    /// Its segmentations.
    #[serde(default)]
    pub segmentations: Vec<Segmentation>,
}

impl TableDef {
    /// The default table: `emailAddress` (EMAIL_ADDRESS, unique, mandatory),
    /// `firstName`, `lastName`, `motherLanguage`, a unique CUSTOM `customerId`
    /// (STRING, at most 50), a CUSTOM `department` (STRING); subscriptions
    /// `Newsletter` and `Events`.
    pub fn default_named(name: &str) -> Self {
        TableDef {
            name: name.to_string(),
            attributes: vec![
                Attribute::new("emailAddress", "EMAIL_ADDRESS")
                    .unique()
                    .mandatory(),
                Attribute::new("firstName", "FIRSTNAME"),
                Attribute::new("lastName", "LASTNAME"),
                Attribute::new("motherLanguage", "MOTHER_LANGUAGE"),
                Attribute::custom("customerId", "STRING")
                    .unique()
                    .max_length(50),
                Attribute::custom("department", "STRING"),
            ],
            subscriptions: vec!["Newsletter".into(), "Events".into()],
            segmentations: Vec::new(),
        }
    }

    /// The attribute called `name` (writable ones only).
    pub fn attribute(&self, name: &str) -> Option<&Attribute> {
        self.attributes
            .iter()
            .find(|a| a.name == name && !a.technical())
    }

    /// The structure as `GET /v4/entity/{e}/table/{t}` answers it.
    pub fn to_json(&self) -> Value {
        let mut attributes: Vec<Value> = vec![
            json!({"name": "profileId", "type": "CUSTOM", "valueType": "INTEGER", "unique": true, "mandatory": false, "multiValued": false}),
            json!({"name": "creationMoment", "type": "CUSTOM", "valueType": "TIMESTAMP", "unique": false, "mandatory": false, "multiValued": false}),
            json!({"name": "updateMoment", "type": "CUSTOM", "valueType": "TIMESTAMP", "unique": false, "mandatory": false, "multiValued": false}),
        ];
        attributes.extend(
            self.attributes
                .iter()
                .filter(|a| !a.technical())
                .map(|a| serde_json::to_value(a).unwrap_or(Value::Null)),
        );
        json!({
            "name": self.name,
            "attributes": attributes,
            "subscriptions": self.subscriptions.iter().map(|s| json!({"name": s})).collect::<Vec<_>>(),
            "segmentations": self.segmentations,
        })
    }
}

/// One profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Its id.
    pub id: u64,
    /// Attribute values.
    pub attributes: BTreeMap<String, String>,
    /// Subscription → subscribed.
    pub subscriptions: BTreeMap<String, bool>,
    /// Segmentations it belongs to.
    pub segmentations: BTreeSet<Segmentation>,
    /// When created (`YYYY-MM-DD HH:MM:SS`, UTC).
    pub created: String,
    /// When last updated.
    pub updated: String,
}

impl Profile {
    /// The profile as the API lists it.
    pub fn to_json(&self, def: &TableDef) -> Value {
        let mut attributes = vec![
            json!({"name": "profileId", "value": self.id}),
            json!({"name": "creationMoment", "value": self.created}),
            json!({"name": "updateMoment", "value": self.updated}),
        ];
        for (name, value) in &self.attributes {
            let v = def
                .attribute(name)
                .map(|a| a.output(value))
                .unwrap_or_else(|| Value::from(value.as_str()));
            attributes.push(json!({"name": name, "value": v}));
        }
        json!({
            "profileId": self.id,
            "attributes": attributes,
            "subscriptions": self.subscriptions.iter().map(|(n, s)| json!({"name": n, "subscribe": s})).collect::<Vec<_>>(),
            "segmentations": self.segmentations.iter().map(|s| json!({"belongs": true, "segmentation": s})).collect::<Vec<_>>(),
        })
    }

    /// Whether it is subscribed to `name`.
    pub fn subscribed(&self, name: &str) -> bool {
        self.subscriptions.get(name).copied().unwrap_or(false)
    }
}

/// What a write asks for.
#[derive(Debug, Clone, Default)]
pub struct ProfileInput {
    /// Attribute → value (`None` clears).
    pub attributes: Vec<(String, Option<String>)>,
    /// Subscription → subscribe.
    pub subscriptions: Vec<(String, bool)>,
    /// Segmentation → belongs.
    pub segmentations: Vec<(Segmentation, bool)>,
}

/// A table and its profiles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    /// Its structure.
    pub def: TableDef,
    /// Its profiles by id.
    pub profiles: BTreeMap<u64, Profile>,
    /// Bulk imports accepted per UTC day (`YYYY-MM-DD`).
    #[serde(default)]
    pub bulk_days: BTreeMap<String, u32>,
    /// (unique attribute, value) → profile id: a lookup must not scan every profile, or
    /// a bulk import of a hundred thousand rows takes hours. Derived from `profiles`.
    #[serde(skip)]
    unique: HashMap<(String, String), u64>,
}

impl Table {
    /// A new, empty table.
    pub fn new(def: TableDef) -> Self {
        Table {
            def,
            profiles: BTreeMap::new(),
            bulk_days: BTreeMap::new(),
            unique: HashMap::new(),
        }
    }

    /// Rebuilds the index of unique values (after loading).
    pub fn reindex(&mut self) {
        let entries: Vec<((String, String), u64)> = self
            .profiles
            .values()
            .flat_map(|p| self.unique_values(p).map(move |k| (k, p.id)))
            .collect();
        self.unique = entries.into_iter().collect();
    }

    fn unique_values<'a>(
        &'a self,
        profile: &'a Profile,
    ) -> impl Iterator<Item = (String, String)> + 'a {
        self.def
            .attributes
            .iter()
            .filter(|a| a.unique)
            .filter_map(move |a| {
                profile
                    .attributes
                    .get(&a.name)
                    .map(|v| (a.name.clone(), v.clone()))
            })
    }

    /// Removes a profile, and its unique values from the index.
    pub fn remove_profile(&mut self, id: u64) -> Option<Profile> {
        let profile = self.profiles.remove(&id)?;
        let keys: Vec<_> = self.unique_values(&profile).collect();
        for key in keys {
            self.unique.remove(&key);
        }
        Some(profile)
    }

    /// The profile `key` names: a profile id, or `attribute=value` of a unique
    /// attribute.
    pub fn find(&self, key: &str) -> Option<u64> {
        if let Some((attr, value)) = key.split_once('=') {
            let a = self.def.attribute(attr).filter(|a| a.unique)?;
            return self
                .unique
                .get(&(a.name.clone(), value.to_string()))
                .copied();
        }
        let id: u64 = key.trim().parse().ok()?;
        self.profiles.contains_key(&id).then_some(id)
    }

    /// Creates or updates a profile from `input`, matched on its unique attributes.
    /// Returns the id and whether it was created; an `Err` is the 400's message and
    /// changes nothing.
    pub fn write(
        &mut self,
        input: &ProfileInput,
        allow_create: bool,
        allow_update: bool,
        next_id: &mut u64,
        now: &str,
    ) -> Result<(u64, bool), String> {
        for (name, value) in &input.attributes {
            if TECHNICAL.contains(&name.as_str()) {
                return Err(format!(
                    "attribute {name} is technical and cannot be written"
                ));
            }
            let attr = self
                .def
                .attribute(name)
                .ok_or_else(|| format!("unknown attribute {name}"))?;
            if let Some(v) = value {
                attr.check(v)?;
            }
        }
        let mut matched: BTreeSet<u64> = BTreeSet::new();
        for (name, value) in &input.attributes {
            let Some(v) = value else { continue };
            if self.def.attribute(name).is_some_and(|a| a.unique) {
                if let Some(id) = self.find(&format!("{name}={v}")) {
                    matched.insert(id);
                }
            }
        }
        if matched.len() > 1 {
            return Err("the unique attributes given match different profiles".into());
        }
        let existing = matched.into_iter().next();
        let (mut profile, created) = match existing {
            Some(id) if !allow_update => {
                return Err(format!("profile {id} exists and updates are not allowed"))
            }
            Some(id) => match self.profiles.get(&id) {
                Some(p) => (p.clone(), false),
                None => return Err("inconsistent data".into()),
            },
            None if !allow_create => return Err("no existing profile matches".into()),
            None => (
                Profile {
                    id: *next_id,
                    attributes: BTreeMap::new(),
                    subscriptions: BTreeMap::new(),
                    segmentations: BTreeSet::new(),
                    created: now.to_string(),
                    updated: now.to_string(),
                },
                true,
            ),
        };
        for (name, value) in &input.attributes {
            match value {
                Some(v) => {
                    profile.attributes.insert(name.clone(), v.clone());
                }
                None => {
                    profile.attributes.remove(name);
                }
            }
        }
        for a in self.def.attributes.iter().filter(|a| a.mandatory) {
            if !profile.attributes.contains_key(&a.name) {
                return Err(format!("mandatory attribute {} has no value", a.name));
            }
        }
        for (name, on) in &input.subscriptions {
            let Some(actual) = self.def.subscriptions.iter().find(|s| *s == name) else {
                return Err(format!("unknown subscription {name}"));
            };
            profile.subscriptions.insert(actual.clone(), *on);
        }
        for (seg, belongs) in &input.segmentations {
            if !self.def.segmentations.contains(seg) {
                return Err(format!(
                    "unknown segmentation {}/{}",
                    seg.category, seg.name
                ));
            }
            if *belongs {
                profile.segmentations.insert(seg.clone());
            } else {
                profile.segmentations.remove(seg);
            }
        }
        profile.updated = now.to_string();
        if created {
            *next_id += 1;
        }
        let id = profile.id;
        if let Some(old) = self.remove_profile(id) {
            drop(old);
        }
        let keys: Vec<_> = self.unique_values(&profile).collect();
        for key in keys {
            self.unique.insert(key, id);
        }
        self.profiles.insert(id, profile);
        Ok((id, created))
    }
}

/// The three import modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ImportMode {
    /// New profiles only.
    CreateOnly,
    /// Existing profiles only.
    UpdateOnly,
    /// Both.
    CreateUpdate,
}

/// Where an import is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ImportStatus {
    /// Queued behind another.
    Waiting,
    /// Being processed.
    Running,
    /// Done (rows may have errors).
    Finished,
    /// Failed as a whole.
    Error,
}

/// A bulk import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Import {
    /// Its id.
    pub id: u64,
    /// The table.
    pub table: String,
    /// The mode.
    pub mode: ImportMode,
    /// The key column.
    pub key_column: Option<String>,
    /// The CSV delimiter.
    pub delimiter: u8,
    /// Where it is.
    pub status: ImportStatus,
    /// The CSV header.
    pub header: Vec<String>,
    /// The data rows.
    pub rows: Vec<Vec<String>>,
    /// Rows in error, with the reason.
    pub errors: Vec<(Vec<String>, String)>,
    /// Profiles created.
    pub created: u64,
    /// Profiles updated.
    pub updated: u64,
    /// When posted.
    pub posted: String,
}

/// Everything the sandbox holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Store {
    /// Tables by name.
    pub tables: BTreeMap<String, Table>,
    /// Imports by id.
    pub imports: BTreeMap<u64, Import>,
    /// The next profile id.
    pub next_profile_id: u64,
    /// The next import id.
    pub next_import_id: u64,
}

impl Store {
    /// A store with `tables`, empty.
    pub fn new(tables: &[TableDef]) -> Self {
        Store {
            tables: tables
                .iter()
                .map(|d| (d.name.clone(), Table::new(d.clone())))
                .collect(),
            imports: BTreeMap::new(),
            next_profile_id: 1,
            next_import_id: 1,
        }
    }

    /// The store the data file held (its indexes rebuilt), or a new one with `tables`.
    pub fn loaded(saved: Option<Self>, tables: &[TableDef]) -> Self {
        let Some(mut store) = saved else {
            return Store::new(tables);
        };
        for table in store.tables.values_mut() {
            table.reindex();
        }
        store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_upsert_on_unique_attributes_and_enforce_the_structure() {
        let mut t = Table::new(TableDef::default_named("contacts"));
        let mut next = 1;
        let input = |email: &str, id: Option<&str>| ProfileInput {
            attributes: [
                Some(("emailAddress".to_string(), Some(email.to_string()))),
                id.map(|i| ("customerId".to_string(), Some(i.to_string()))),
            ]
            .into_iter()
            .flatten()
            .collect(),
            subscriptions: vec![("Newsletter".into(), true)],
            segmentations: vec![],
        };
        let (a, created) = t
            .write(&input("a@b.org", Some("E1")), true, true, &mut next, "now")
            .expect("create");
        assert!(created);
        let (b, created) = t
            .write(
                &input("new@b.org", Some("E1")),
                true,
                true,
                &mut next,
                "now",
            )
            .expect("update");
        assert_eq!((a, created), (b, false));
        assert!(t
            .write(&input("x@b.org", Some("E1")), true, false, &mut next, "now")
            .is_err());
        assert!(t
            .write(&input("not-an-email", None), true, true, &mut next, "now")
            .is_err());
        let long = "x".repeat(51);
        assert!(t
            .write(&input("c@b.org", Some(&long)), true, true, &mut next, "now")
            .is_err());
        assert_eq!(t.find("customerId=E1"), Some(a));
        assert_eq!(t.find("emailAddress=new@b.org"), Some(a));
        assert_eq!(t.find("firstName=x"), None);
    }
}
