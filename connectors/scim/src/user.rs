//! The canonical contact as a SCIM User (RFC 7643 §4.1, and the enterprise extension
//! §4.3), and back.
//!
//! | canonical | SCIM |
//! |---|---|
//! | `external_id` | `externalId`, enterprise `employeeNumber` |
//! | `email` | `emails[type eq "work"].value` (primary) |
//! | `first_name`, `last_name` | `name.givenName`, `name.familyName` |
//! | `display_name` | `displayName` |
//! | `phone`, `mobile` | `phoneNumbers[type eq "work"]`, `[type eq "mobile"]` |
//! | `company`, `department` | enterprise `organization`, `department` |
//! | `job_title`, `language` | `title`, `preferredLanguage` |
//! | `status` | `active` (`true` only for `active`) |
//! | `attributes.NAME` | the path the section's `fields` names |
//!
//! and `userName` from the email or the external id (`user_name`). Reading is liberal
//! (RFC 7643 names are case-insensitive; Entra and Okta send `"True"`/`"False"` for
//! booleans); writing is strict (the RFC's spelling, booleans as booleans).

use std::collections::BTreeMap;

use contactsync_core::{Contact, ContactStatus, Field};
use serde_json::{json, Map, Value};

use crate::config::UserNameFrom;

/// The User schema.
pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
/// The enterprise extension's schema.
pub const ENTERPRISE: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
/// The PatchOp message schema.
pub const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

/// Where a value lives in a User.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScimPath {
    /// A top-level attribute (`title`).
    Attr(String),
    /// A sub-attribute of a complex one (`name.givenName`).
    Sub(String, String),
    /// An attribute of an extension (`urn:…:enterprise:2.0:User` and `department`).
    Extension(String, String),
    /// The `value` of the element of a multi-valued attribute with a `type`
    /// (`emails[type eq "work"].value`).
    Typed {
        /// `emails`, `phoneNumbers`.
        attr: String,
        /// `work`, `mobile`.
        kind: String,
    },
}

fn key_ci<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a String> {
    map.keys().find(|k| k.eq_ignore_ascii_case(name))
}

fn get_ci<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    map.get(name)
        .or_else(|| key_ci(map, name).and_then(|k| map.get(k)))
}

/// A scalar as text: strings as they are, numbers and booleans spelt out; blank is
/// none.
fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl ScimPath {
    /// Parses a path as the `fields` table writes it: `title`, `name.givenName`,
    /// `urn:…:User:costCenter`, `phoneNumbers[type eq "fax"].value`.
    pub fn parse(path: &str) -> Result<ScimPath, String> {
        let path = path.trim();
        if path.is_empty() {
            return Err("the SCIM path is empty".into());
        }
        if let Some(open) = path.find('[') {
            let rest = &path[open..];
            let kind = rest
                .strip_prefix("[type eq \"")
                .and_then(|r| r.split_once("\"]"))
                .filter(|(_, tail)| tail.is_empty() || *tail == ".value")
                .map(|(kind, _)| kind)
                .ok_or_else(|| {
                    format!("{path:?}: a filtered path must read ATTR[type eq \"TYPE\"].value")
                })?;
            return Ok(ScimPath::Typed {
                attr: path[..open].to_string(),
                kind: kind.to_string(),
            });
        }
        if path.to_ascii_lowercase().starts_with("urn:") {
            let (urn, attr) = path
                .rsplit_once(':')
                .filter(|(_, a)| !a.is_empty())
                .ok_or_else(|| {
                    format!("{path:?}: the attribute after the schema URN is missing")
                })?;
            return Ok(ScimPath::Extension(urn.to_string(), attr.to_string()));
        }
        Ok(match path.split_once('.') {
            Some((a, s)) => ScimPath::Sub(a.to_string(), s.to_string()),
            None => ScimPath::Attr(path.to_string()),
        })
    }

    /// The path as a PATCH operation names it.
    pub fn patch_path(&self) -> String {
        match self {
            ScimPath::Attr(a) => a.clone(),
            ScimPath::Sub(a, s) => format!("{a}.{s}"),
            ScimPath::Extension(urn, a) => format!("{urn}:{a}"),
            ScimPath::Typed { attr, kind } => format!("{attr}[type eq \"{kind}\"].value"),
        }
    }

    /// The value at this path in `user`, as text.
    pub fn read(&self, user: &Map<String, Value>) -> Option<String> {
        match self {
            ScimPath::Attr(a) => get_ci(user, a).and_then(as_text),
            ScimPath::Sub(a, s) => get_ci(user, a)?
                .as_object()
                .and_then(|m| get_ci(m, s))
                .and_then(as_text),
            ScimPath::Extension(urn, a) => get_ci(user, urn)?
                .as_object()
                .and_then(|m| get_ci(m, a))
                .and_then(as_text),
            ScimPath::Typed { attr, kind } => {
                let items = get_ci(user, attr)?.as_array()?;
                let typed = |i: &&Value| {
                    i.get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| t.eq_ignore_ascii_case(kind))
                };
                let element = items.iter().find(typed).or_else(|| {
                    // An email without a type (some servers drop it) is still the
                    // person's address: the primary one, or the only one.
                    let untyped = items
                        .iter()
                        .filter(|i| i.get("type").is_none())
                        .collect::<Vec<_>>();
                    (attr.eq_ignore_ascii_case("emails") && kind == "work")
                        .then(|| {
                            untyped
                                .iter()
                                .find(|i| i.get("primary").is_some_and(is_true))
                                .or(untyped.first())
                                .copied()
                        })
                        .flatten()
                })?;
                element.get("value").and_then(as_text)
            }
        }
    }

    /// Sets (`Some`) or removes (`None`) the value at this path in `user`, as a PUT
    /// body or a POST body is built.
    pub fn write(&self, user: &mut Map<String, Value>, value: Option<&str>) {
        let object = |parent: &mut Map<String, Value>, name: &str| -> Option<Map<String, Value>> {
            let key = key_ci(parent, name)
                .cloned()
                .unwrap_or_else(|| name.to_string());
            match parent.remove(&key) {
                Some(Value::Object(m)) => Some(m),
                _ => None,
            }
        };
        match self {
            ScimPath::Attr(a) => {
                let key = key_ci(user, a).cloned().unwrap_or_else(|| a.clone());
                match value {
                    Some(v) => user.insert(key, Value::String(v.into())),
                    None => user.remove(&key),
                };
            }
            ScimPath::Sub(parent, name) | ScimPath::Extension(parent, name) => {
                let mut m = object(user, parent).unwrap_or_default();
                let key = key_ci(&m, name).cloned().unwrap_or_else(|| name.clone());
                match value {
                    Some(v) => m.insert(key, Value::String(v.into())),
                    None => m.remove(&key),
                };
                if !m.is_empty() {
                    user.insert(parent.clone(), Value::Object(m));
                }
            }
            ScimPath::Typed { attr, kind } => {
                let key = key_ci(user, attr).cloned().unwrap_or_else(|| attr.clone());
                let mut items = match user.remove(&key) {
                    Some(Value::Array(items)) => items,
                    _ => Vec::new(),
                };
                let is_kind = |i: &Value| {
                    i.get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| t.eq_ignore_ascii_case(kind))
                };
                match (value, items.iter_mut().find(|i| is_kind(i))) {
                    (Some(v), Some(Value::Object(element))) => {
                        element.insert("value".into(), Value::String(v.into()));
                    }
                    (Some(v), _) => items.push(self.element(v)),
                    (None, _) => items.retain(|i| !is_kind(i)),
                }
                if !items.is_empty() {
                    user.insert(key, Value::Array(items));
                }
            }
        }
    }

    /// A new element of a multi-valued attribute; a work email is the primary one.
    fn element(&self, value: &str) -> Value {
        match self {
            ScimPath::Typed { attr, kind } => {
                let mut element = json!({ "value": value, "type": kind });
                if attr.eq_ignore_ascii_case("emails") && kind == "work" {
                    element["primary"] = Value::Bool(true);
                }
                element
            }
            _ => Value::String(value.into()),
        }
    }

    /// The PATCH operation that sets (`Some`) or removes (`None`) the value; `exists`
    /// says whether the user holds one now, since a value filter that matches nothing
    /// is an error (RFC 7644 §3.5.2.3): a new typed element is `add`ed whole.
    pub fn patch_op(&self, value: Option<&str>, exists: bool) -> Value {
        match (self, value) {
            (ScimPath::Typed { attr, kind }, None) => {
                json!({ "op": "remove", "path": format!("{attr}[type eq \"{kind}\"]") })
            }
            (_, None) => json!({ "op": "remove", "path": self.patch_path() }),
            (ScimPath::Typed { attr, .. }, Some(v)) if !exists => {
                json!({ "op": "add", "path": attr, "value": [self.element(v)] })
            }
            (_, Some(v)) => json!({ "op": "replace", "path": self.patch_path(), "value": v }),
        }
    }
}

/// Whether a JSON value says yes: `true`, or Entra's and Okta's `"True"`.
pub fn is_true(value: &Value) -> bool {
    match value {
        Value::Bool(b) => *b,
        Value::String(s) => s.trim().eq_ignore_ascii_case("true"),
        _ => false,
    }
}

/// Whether the user is active: `active` read liberally; a user without it is active
/// (RFC 7643 leaves its default to the server, and servers that omit it have no
/// deactivation).
pub fn is_active(user: &Map<String, Value>) -> bool {
    get_ci(user, "active").is_none_or(is_true)
}

/// The mapping between contacts and Users, as the section configured it.
#[derive(Debug, Clone)]
pub struct Mapping {
    user_name: UserNameFrom,
    fields: BTreeMap<String, ScimPath>,
}

impl Mapping {
    /// The mapping with `userName` from `user_name` and the attributes of `fields`.
    pub fn new(user_name: UserNameFrom, fields: BTreeMap<String, ScimPath>) -> Self {
        Mapping { user_name, fields }
    }

    /// What `userName` is made from.
    pub fn user_name_from(&self) -> UserNameFrom {
        self.user_name
    }

    /// The `userName` of `contact`, if it has the field it comes from.
    pub fn user_name(&self, contact: &Contact) -> Option<String> {
        contact
            .get_str(&self.user_name.field())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    }

    /// Where `field` is written; empty for fields SCIM does not hold (`subscriptions`
    /// are group memberships, `status` is `active`, an attribute `fields` does not name).
    pub fn paths(&self, field: &Field) -> Vec<ScimPath> {
        let attr = |a: &str| ScimPath::Attr(a.into());
        let ext = |a: &str| ScimPath::Extension(ENTERPRISE.into(), a.into());
        let typed = |a: &str, k: &str| ScimPath::Typed {
            attr: a.into(),
            kind: k.into(),
        };
        match field {
            Field::ExternalId => vec![attr("externalId"), ext("employeeNumber")],
            Field::Email => vec![typed("emails", "work")],
            Field::FirstName => vec![ScimPath::Sub("name".into(), "givenName".into())],
            Field::LastName => vec![ScimPath::Sub("name".into(), "familyName".into())],
            Field::DisplayName => vec![attr("displayName")],
            Field::Phone => vec![typed("phoneNumbers", "work")],
            Field::Mobile => vec![typed("phoneNumbers", "mobile")],
            Field::Company => vec![ext("organization")],
            Field::Department => vec![ext("department")],
            Field::JobTitle => vec![attr("title")],
            Field::Language => vec![attr("preferredLanguage")],
            Field::Attribute(name) => self.fields.get(name).cloned().into_iter().collect(),
            Field::Status | Field::Subscriptions | Field::UpdatedAt => Vec::new(),
        }
    }

    /// The fields this mapping writes, with their paths, `userName`'s field included.
    fn written(&self) -> impl Iterator<Item = (Field, Vec<ScimPath>)> + '_ {
        Field::CANONICAL
            .iter()
            .cloned()
            .chain(self.fields.keys().map(|a| Field::Attribute(a.clone())))
            .map(|f| {
                let paths = self.paths(&f);
                (f, paths)
            })
            .filter(|(_, p)| !p.is_empty())
    }

    /// The User to POST for `contact`, or why there is none (no `userName`).
    pub fn to_user(&self, contact: &Contact) -> Result<Map<String, Value>, String> {
        let user_name = self.user_name(contact).ok_or_else(|| {
            format!(
                "the contact has no {} to make its SCIM userName from",
                self.user_name.field()
            )
        })?;
        let mut user = Map::new();
        user.insert("userName".into(), Value::String(user_name));
        for (field, paths) in self.written() {
            if let Some(value) = contact.get_str(&field) {
                for path in &paths {
                    path.write(&mut user, Some(value));
                }
            }
        }
        user.insert(
            "active".into(),
            Value::Bool(contact.status == ContactStatus::Active),
        );
        set_schemas(&mut user);
        Ok(user)
    }

    /// The contact a User stands for (the source's reading): every mapped field the
    /// user holds; `status` from `active`; the `groups` it is a member of named in
    /// `groups` as subscriptions.
    pub fn to_contact(
        &self,
        user: &Map<String, Value>,
        groups: &BTreeMap<String, String>,
    ) -> Contact {
        let mut contact = Contact::default();
        for (field, paths) in self.written() {
            if let Some(value) = paths.iter().find_map(|p| p.read(user)) {
                // A value the canonical form refuses (an odd email) is left out here;
                // the engine's validation names it.
                let _ = contact.set(&field, &value);
            }
        }
        contact.status = if is_active(user) {
            ContactStatus::Active
        } else {
            ContactStatus::Inactive
        };
        let member_of: Vec<&str> = get_ci(user, "groups")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|g| g.get("display").and_then(Value::as_str))
            .collect();
        for (subscription, group) in groups {
            if member_of.iter().any(|g| g.eq_ignore_ascii_case(group)) {
                contact.subscriptions.insert(subscription.clone());
            }
        }
        contact
    }

    /// The PATCH operations that bring `user` (as the server holds it) to `contact`
    /// for the fields `contact` has: what adopting an existing user sends. Fields the
    /// contact does not have are left as the app holds them (absent is not empty), and
    /// `active` is only ever turned off here (a user an admin deactivated stays so).
    pub fn adopt_ops(&self, user: &Map<String, Value>, contact: &Contact) -> Vec<Value> {
        let mut ops = Vec::new();
        if let Some(name) = self.user_name(contact) {
            if get_ci(user, "userName").and_then(as_text).as_deref() != Some(name.as_str()) {
                ops.push(json!({ "op": "replace", "path": "userName", "value": name }));
            }
        }
        for (field, paths) in self.written() {
            let Some(value) = contact.get_str(&field) else {
                continue;
            };
            for path in &paths {
                let now = path.read(user);
                if now.as_deref() != Some(value) {
                    ops.push(path.patch_op(Some(value), now.is_some()));
                }
            }
        }
        if contact.status != ContactStatus::Active && is_active(user) {
            ops.push(json!({ "op": "replace", "path": "active", "value": false }));
        }
        ops
    }

    /// The PATCH operations for an update from `before` (as last sent; `None` when the
    /// state does not know it) to `after`: each mapped field that changed, a cleared one
    /// as `remove`; `userName` follows its field (and is never removed: it is
    /// required); `active` only when `send_status`.
    pub fn update_ops(
        &self,
        before: Option<&Contact>,
        after: &Contact,
        send_status: bool,
    ) -> Vec<Value> {
        let mut ops = Vec::new();
        for change in Contact::field_changes(before, after) {
            if change.field == self.user_name.field() {
                if let Some(name) = self.user_name(after) {
                    ops.push(json!({ "op": "replace", "path": "userName", "value": name }));
                }
            }
            for path in self.paths(&change.field) {
                ops.push(path.patch_op(change.after.as_deref(), change.before.is_some()));
            }
        }
        if send_status {
            ops.push(json!({ "op": "replace", "path": "active", "value": after.status == ContactStatus::Active }));
        }
        ops
    }
}

/// `schemas` as the attributes of `user` need it: the User schema, and each extension
/// the user carries.
pub fn set_schemas(user: &mut Map<String, Value>) {
    let mut schemas = vec![Value::String(USER_SCHEMA.into())];
    schemas.extend(
        user.keys()
            .filter(|k| k.to_ascii_lowercase().starts_with("urn:"))
            .map(|k| Value::String(k.clone())),
    );
    user.insert("schemas".into(), Value::Array(schemas));
}

/// Applies PATCH operations built by [`Mapping`] to a copy of `user` held locally: what
/// a PUT sends to a server without PATCH. Only the operations this module builds are
/// understood (`replace`/`remove` on a [`ScimPath`], `add` of a typed element,
/// `userName`, `active`).
pub fn apply_locally(user: &mut Map<String, Value>, ops: &[Value]) {
    for op in ops {
        let name = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let path = op.get("path").and_then(Value::as_str).unwrap_or_default();
        let value = op.get("value");
        match (name, path) {
            (_, "active") => {
                user.insert(
                    "active".into(),
                    value.cloned().unwrap_or(Value::Bool(false)),
                );
            }
            ("add", attr) => {
                let text = value
                    .and_then(|v| v.get(0))
                    .and_then(|e| Some((e.get("type")?.as_str()?, e.get("value")?.as_str()?)));
                if let Some((kind, v)) = text {
                    let p = ScimPath::Typed {
                        attr: attr.into(),
                        kind: kind.into(),
                    };
                    p.write(user, Some(v));
                }
            }
            (_, path) => {
                // `remove` of a whole typed element names it without `.value`.
                let parsed =
                    ScimPath::parse(path).or_else(|_| ScimPath::parse(&format!("{path}.value")));
                if let Ok(p) = parsed {
                    p.write(user, value.and_then(Value::as_str));
                }
            }
        }
    }
    set_schemas(user);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping() -> Mapping {
        let fields = BTreeMap::from([(
            "cost_center".to_string(),
            ScimPath::parse(&format!("{ENTERPRISE}:costCenter")).expect("path"),
        )]);
        Mapping::new(UserNameFrom::Email, fields)
    }

    fn ann() -> Contact {
        Contact {
            external_id: Some("E1".into()),
            email: Some("ann@example.com".into()),
            first_name: Some("Ann".into()),
            mobile: Some("+32 470".into()),
            department: Some("Sales".into()),
            attributes: BTreeMap::from([("cost_center".into(), "CC1".into())]),
            ..Contact::default()
        }
    }

    #[test]
    fn a_contact_becomes_a_user_and_reads_back_the_same() {
        let m = mapping();
        let user = m.to_user(&ann()).expect("user");
        assert_eq!(user["userName"], "ann@example.com");
        assert_eq!(
            user["emails"],
            json!([{ "value": "ann@example.com", "type": "work", "primary": true }])
        );
        assert_eq!(user[ENTERPRISE]["employeeNumber"], "E1");
        assert_eq!(user[ENTERPRISE]["costCenter"], "CC1");
        assert_eq!(user["schemas"], json!([USER_SCHEMA, ENTERPRISE]));
        assert_eq!(m.to_contact(&user, &BTreeMap::new()), ann());
        let nameless = Contact {
            email: None,
            ..ann()
        };
        assert!(m.to_user(&nameless).is_err());
    }

    #[test]
    fn reading_is_liberal() {
        let user = json!({ "USERNAME": "x", "Active": "False",
            "emails": [{ "value": "x@example.com", "primary": "True" }],
            "groups": [{ "value": "g1", "display": "All Staff" }] });
        let groups = BTreeMap::from([("newsletter".to_string(), "all staff".to_string())]);
        let c = mapping().to_contact(user.as_object().expect("object"), &groups);
        assert_eq!(c.email.as_deref(), Some("x@example.com"));
        assert_eq!(c.status, ContactStatus::Inactive);
        assert!(c.subscriptions.contains("newsletter"));
    }

    #[test]
    fn an_update_patches_only_what_changed_and_removes_what_was_cleared() {
        let before = ann();
        let after = Contact {
            first_name: Some("Anna".into()),
            mobile: None,
            phone: Some("+32 2".into()),
            ..ann()
        };
        let ops = mapping().update_ops(Some(&before), &after, false);
        assert_eq!(
            ops,
            vec![
                json!({ "op": "replace", "path": "name.givenName", "value": "Anna" }),
                json!({ "op": "add", "path": "phoneNumbers", "value": [{ "value": "+32 2", "type": "work" }] }),
                json!({ "op": "remove", "path": "phoneNumbers[type eq \"mobile\"]" }),
            ]
        );
        let mut user = mapping().to_user(&before).expect("user");
        apply_locally(&mut user, &ops);
        assert_eq!(mapping().to_contact(&user, &BTreeMap::new()), after);
    }

    #[test]
    fn adopting_fills_in_and_never_reactivates() {
        let m = mapping();
        let mut user = m
            .to_user(&Contact {
                first_name: Some("A.".into()),
                ..ann()
            })
            .expect("user");
        user.insert("active".into(), Value::Bool(false));
        user.insert("title".into(), Value::String("kept".into()));
        let ops = m.adopt_ops(&user, &ann());
        assert_eq!(
            ops,
            vec![json!({ "op": "replace", "path": "name.givenName", "value": "Ann" })]
        );
    }

    #[test]
    fn field_paths_parse() {
        assert_eq!(ScimPath::parse("title"), Ok(ScimPath::Attr("title".into())));
        assert_eq!(
            ScimPath::parse("phoneNumbers[type eq \"fax\"].value"),
            Ok(ScimPath::Typed {
                attr: "phoneNumbers".into(),
                kind: "fax".into()
            })
        );
        assert!(ScimPath::parse("a[b").is_err());
        assert!(ScimPath::parse("urn:x:").is_err());
    }
}
