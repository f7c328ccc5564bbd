//! The directory the sandbox serves: Users and Groups as the JSON resources a client
//! sent, with the server's `id` and `meta`, the rules RFC 7643 sets on them (a unique
//! `userName`, compared case-insensitively; read-only `id` and `meta`; a version a
//! write must name in `If-Match` when it gives one) and what an admin does in the app.

use std::collections::{BTreeMap, HashMap};

use chrono::{SecondsFormat, Utc};
use contactsync_sandbox_kit::plain_email;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::filter::{get_ci, Filter};
use crate::patch;

/// The core schema URNs.
pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
/// The Group schema.
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
/// The enterprise extension.
pub const ENTERPRISE_SCHEMA: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

/// Users or Groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/Users`.
    User,
    /// `/Groups`.
    Group,
}

impl Kind {
    /// `User` or `Group`, as `meta.resourceType` says.
    pub fn name(self) -> &'static str {
        match self {
            Kind::User => "User",
            Kind::Group => "Group",
        }
    }

    /// The endpoint, `Users` or `Groups`.
    pub fn endpoint(self) -> &'static str {
        match self {
            Kind::User => "Users",
            Kind::Group => "Groups",
        }
    }

    fn schema(self) -> &'static str {
        match self {
            Kind::User => USER_SCHEMA,
            Kind::Group => GROUP_SCHEMA,
        }
    }

    /// The attribute that must be unique (case-insensitively).
    fn unique(self) -> &'static str {
        match self {
            Kind::User => "userName",
            Kind::Group => "displayName",
        }
    }
}

/// A refused request, as a SCIM error (RFC 7644 §3.12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimError {
    /// The HTTP status.
    pub status: u16,
    /// The `scimType`, when the RFC names one.
    pub scim_type: Option<&'static str>,
    /// What is wrong.
    pub detail: String,
}

impl ScimError {
    /// A refusal with a `scimType`.
    pub fn typed(status: u16, scim_type: &'static str, detail: impl Into<String>) -> Self {
        ScimError {
            status,
            scim_type: Some(scim_type),
            detail: detail.into(),
        }
    }

    /// A refusal without one.
    pub fn plain(status: u16, detail: impl Into<String>) -> Self {
        ScimError {
            status,
            scim_type: None,
            detail: detail.into(),
        }
    }

    /// The error body.
    pub fn body(&self) -> Value {
        let mut body = json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
            "status": self.status.to_string(),
            "detail": self.detail,
        });
        if let Some(t) = self.scim_type {
            body["scimType"] = Value::String(t.into());
        }
        body
    }
}

fn not_found(kind: Kind, id: &str) -> ScimError {
    ScimError::plain(404, format!("{} {id} not found", kind.name()))
}

/// The resources, by id; ids are a counter, zero-padded, so id order is creation order
/// (a listing pages in it, and people created while a client pages land at its end).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Directory {
    users: BTreeMap<String, Map<String, Value>>,
    groups: BTreeMap<String, Map<String, Value>>,
    next_id: u64,
    next_version: u64,
    /// The unique names (`userName`, group `displayName`), lower-cased, to their ids:
    /// what the uniqueness check and a look-up by `userName eq` read, so that a
    /// directory of 100,000 users answers either without a scan. Rebuilt on load.
    #[serde(skip)]
    names: [HashMap<String, String>; 2],
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The version a resource's ETag carries.
pub fn version_of(resource: &Map<String, Value>) -> Option<&str> {
    resource.get("meta")?.get("version")?.as_str()
}

fn text<'a>(resource: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    get_ci(resource, name).and_then(Value::as_str)
}

impl Directory {
    fn table(&self, kind: Kind) -> &BTreeMap<String, Map<String, Value>> {
        match kind {
            Kind::User => &self.users,
            Kind::Group => &self.groups,
        }
    }

    fn table_mut(&mut self, kind: Kind) -> &mut BTreeMap<String, Map<String, Value>> {
        match kind {
            Kind::User => &mut self.users,
            Kind::Group => &mut self.groups,
        }
    }

    fn names(&self, kind: Kind) -> &HashMap<String, String> {
        &self.names[kind as usize]
    }

    /// Rebuilds the name index (after loading the data file).
    pub fn reindex(&mut self) {
        for kind in [Kind::User, Kind::Group] {
            let index = self
                .table(kind)
                .iter()
                .filter_map(|(id, r)| Some((text(r, kind.unique())?.to_lowercase(), id.clone())))
                .collect();
            self.names[kind as usize] = index;
        }
    }

    /// Keeps `resource` under `id`, its name indexed.
    fn store(&mut self, kind: Kind, id: &str, resource: Map<String, Value>) {
        self.unstore(kind, id);
        if let Some(name) = text(&resource, kind.unique()) {
            self.names[kind as usize].insert(name.to_lowercase(), id.to_string());
        }
        self.table_mut(kind).insert(id.to_string(), resource);
    }

    fn unstore(&mut self, kind: Kind, id: &str) {
        if let Some(old) = self.table_mut(kind).remove(id) {
            if let Some(name) = text(&old, kind.unique()) {
                self.names[kind as usize].remove(&name.to_lowercase());
            }
        }
    }

    /// One resource.
    pub fn get(&self, kind: Kind, id: &str) -> Result<&Map<String, Value>, ScimError> {
        self.table(kind).get(id).ok_or_else(|| not_found(kind, id))
    }

    /// Every user, in id order.
    pub fn users(&self) -> impl Iterator<Item = &Map<String, Value>> {
        self.users.values()
    }

    /// Every group, in id order.
    pub fn groups(&self) -> impl Iterator<Item = &Map<String, Value>> {
        self.groups.values()
    }

    /// Each user's read-only `groups` (RFC 7643 §4.1.2), from the groups' `members`.
    fn memberships(&self) -> HashMap<String, Vec<Value>> {
        let mut of: HashMap<String, Vec<Value>> = HashMap::new();
        for (gid, group) in &self.groups {
            let members = group.get("members").and_then(Value::as_array);
            for id in members
                .into_iter()
                .flatten()
                .filter_map(|m| m.get("value").and_then(Value::as_str))
            {
                of.entry(id.to_string()).or_default().push(json!({
                    "value": gid,
                    "display": group.get("displayName").cloned().unwrap_or(Value::Null),
                    "$ref": format!("/Groups/{gid}")
                }));
            }
        }
        of
    }

    /// A resource as the server shows it: a user with the groups they are a member of.
    pub fn shown(&self, kind: Kind, resource: Map<String, Value>) -> Map<String, Value> {
        if kind != Kind::User {
            return resource;
        }
        shown_with(&self.memberships(), resource)
    }

    /// The id of the user whose `userName` is `user_name` (case-insensitively).
    pub fn user_id(&self, user_name: &str) -> Option<String> {
        self.names(Kind::User)
            .get(&user_name.to_lowercase())
            .cloned()
    }

    /// The total matching `filter`, and the page from `start` (1-based) of `count`.
    pub fn list(
        &self,
        kind: Kind,
        filter: Option<&Filter>,
        start: usize,
        count: usize,
    ) -> (usize, Vec<Map<String, Value>>) {
        // `userName eq` (or a group's `displayName eq`) is answered from the index.
        let indexed = filter.and_then(|f| f.equality_on(kind.unique()));
        let matching: Vec<&Map<String, Value>> = match indexed {
            Some(name) => self
                .names(kind)
                .get(&name.to_lowercase())
                .and_then(|id| self.table(kind).get(id))
                .into_iter()
                .collect(),
            None => self
                .table(kind)
                .values()
                .filter(|r| filter.is_none_or(|f| f.matches(r)))
                .collect(),
        };
        let memberships = if kind == Kind::User {
            self.memberships()
        } else {
            HashMap::new()
        };
        let page = matching
            .iter()
            .skip(start.saturating_sub(1))
            .take(count)
            .map(|r| match kind {
                Kind::User => shown_with(&memberships, (*r).clone()),
                Kind::Group => (*r).clone(),
            })
            .collect();
        (matching.len(), page)
    }

    /// Creates a resource from `body`.
    pub fn create(&mut self, kind: Kind, body: &Value) -> Result<Map<String, Value>, ScimError> {
        let mut resource = self.checked(kind, body, None)?;
        self.next_id += 1;
        let id = format!("{:08}", self.next_id);
        resource.insert("id".into(), Value::String(id.clone()));
        let at = now();
        resource.insert(
            "meta".into(),
            json!({ "resourceType": kind.name(), "created": at, "lastModified": at }),
        );
        self.stamp(&mut resource);
        self.store(kind, &id, resource.clone());
        Ok(resource)
    }

    /// Replaces a resource with `body` (PUT), keeping its `id` and `meta.created`.
    pub fn replace(
        &mut self,
        kind: Kind,
        id: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> Result<Map<String, Value>, ScimError> {
        let old = self.current(kind, id, if_match)?.clone();
        self.rewrite(kind, id, body, &old)
    }

    /// Applies a PatchOp body.
    pub fn patch(
        &mut self,
        kind: Kind,
        id: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> Result<Map<String, Value>, ScimError> {
        let old = self.current(kind, id, if_match)?.clone();
        let mut patched = old.clone();
        patch::apply(&mut patched, body)
            .map_err(|e| ScimError::typed(400, e.scim_type, e.detail))?;
        self.rewrite(kind, id, &Value::Object(patched), &old)
    }

    /// Stores `body`, checked, as the new version of `old`: its `id` and `meta` kept,
    /// `lastModified` and the version moved on.
    fn rewrite(
        &mut self,
        kind: Kind,
        id: &str,
        body: &Value,
        old: &Map<String, Value>,
    ) -> Result<Map<String, Value>, ScimError> {
        let mut resource = self.checked(kind, body, Some(id))?;
        resource.insert("id".into(), Value::String(id.into()));
        resource.insert(
            "meta".into(),
            old.get("meta").cloned().unwrap_or(Value::Null),
        );
        self.touch(&mut resource);
        self.store(kind, id, resource.clone());
        Ok(resource)
    }

    /// Deletes a resource; a deleted user leaves every group.
    pub fn delete(
        &mut self,
        kind: Kind,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<(), ScimError> {
        self.current(kind, id, if_match)?;
        self.unstore(kind, id);
        if kind == Kind::User {
            let ids: Vec<String> = self.groups.keys().cloned().collect();
            for gid in ids {
                let Some(group) = self.groups.get_mut(&gid) else {
                    continue;
                };
                let before = group.get("members").cloned();
                if let Some(Value::Array(members)) = group.get_mut("members") {
                    members.retain(|m| m.get("value").and_then(Value::as_str) != Some(id));
                }
                if group.get("members") != before.as_ref() {
                    let mut group = group.clone();
                    self.touch(&mut group);
                    self.groups.insert(gid, group);
                }
            }
        }
        Ok(())
    }

    /// What an admin does in the app: sets `path` of the user named `user_name` to
    /// `value` (deactivates them, renames them), as a new version.
    pub fn admin_edit(
        &mut self,
        user_name: &str,
        path: &str,
        value: Value,
    ) -> Result<(), ScimError> {
        let id = self
            .user_id(user_name)
            .ok_or_else(|| ScimError::plain(404, format!("no user named {user_name}")))?;
        let body = json!({ "Operations": [{ "op": "replace", "path": path, "value": value }] });
        self.patch(Kind::User, &id, &body, None).map(|_| ())
    }

    fn current(
        &self,
        kind: Kind,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<&Map<String, Value>, ScimError> {
        let resource = self.get(kind, id)?;
        if let Some(wanted) = if_match.map(str::trim).filter(|w| *w != "*") {
            if version_of(resource) != Some(wanted) {
                return Err(ScimError::plain(
                    412,
                    format!("{} {id} has changed since version {wanted}", kind.name()),
                ));
            }
        }
        Ok(resource)
    }

    fn stamp(&mut self, resource: &mut Map<String, Value>) {
        self.next_version += 1;
        if let Some(Value::Object(meta)) = resource.get_mut("meta") {
            meta.insert(
                "version".into(),
                Value::String(format!("W/\"{}\"", self.next_version)),
            );
        }
    }

    fn touch(&mut self, resource: &mut Map<String, Value>) {
        if let Some(Value::Object(meta)) = resource.get_mut("meta") {
            meta.insert("lastModified".into(), Value::String(now()));
        }
        self.stamp(resource);
    }

    /// `body` as a resource of `kind`, checked; `id` is the resource it replaces.
    fn checked(
        &self,
        kind: Kind,
        body: &Value,
        id: Option<&str>,
    ) -> Result<Map<String, Value>, ScimError> {
        let Value::Object(resource) = body else {
            return Err(ScimError::typed(
                400,
                "invalidSyntax",
                "the body must be a JSON object",
            ));
        };
        let schemas = resource.get("schemas").and_then(Value::as_array);
        if !schemas.is_some_and(|s| s.iter().any(|v| v.as_str() == Some(kind.schema()))) {
            return Err(ScimError::typed(
                400,
                "invalidSyntax",
                format!("`schemas` must list {}", kind.schema()),
            ));
        }
        let unique = kind.unique();
        let Some(name) = text(resource, unique)
            .map(str::trim)
            .filter(|n| !n.is_empty())
        else {
            return Err(ScimError::typed(
                400,
                "invalidValue",
                format!("{unique} is required"),
            ));
        };
        let taken = self
            .names(kind)
            .get(&name.to_lowercase())
            .is_some_and(|other| Some(other.as_str()) != id);
        if taken {
            return Err(ScimError::typed(
                409,
                "uniqueness",
                format!("{unique} {name:?} is already taken"),
            ));
        }
        let mut resource = resource.clone();
        // `groups` is the server's to compute: what a client sends there is ignored.
        if kind == Kind::User {
            if let Some(k) = resource
                .keys()
                .find(|k| k.eq_ignore_ascii_case("groups"))
                .cloned()
            {
                resource.remove(&k);
            }
        }
        match kind {
            Kind::User => check_user(&mut resource)?,
            Kind::Group => self.check_group(&resource)?,
        }
        Ok(resource)
    }

    fn check_group(&self, group: &Map<String, Value>) -> Result<(), ScimError> {
        let members = get_ci(group, "members").and_then(Value::as_array);
        for member in members.into_iter().flatten() {
            let id = member
                .get("value")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !self.users.contains_key(id) {
                return Err(ScimError::typed(
                    400,
                    "invalidValue",
                    format!("member {id:?} is no user"),
                ));
            }
        }
        Ok(())
    }
}

/// `user` with its `groups` from `memberships` (user id -> group references).
fn shown_with(
    memberships: &HashMap<String, Vec<Value>>,
    mut user: Map<String, Value>,
) -> Map<String, Value> {
    user.remove("groups");
    let id = user.get("id").and_then(Value::as_str).unwrap_or_default();
    if let Some(groups) = memberships.get(id) {
        user.insert("groups".into(), Value::Array(groups.clone()));
    }
    user
}

/// A user's own rules: every email a plain address, `active` a boolean (Entra's
/// `"True"`/`"False"` are taken and stored as booleans).
fn check_user(user: &mut Map<String, Value>) -> Result<(), ScimError> {
    let emails = get_ci(user, "emails").and_then(Value::as_array);
    for email in emails.into_iter().flatten() {
        let value = email
            .get("value")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !plain_email(value) {
            return Err(ScimError::typed(
                400,
                "invalidValue",
                format!("{value:?} is not an email address"),
            ));
        }
    }
    let key = user
        .keys()
        .find(|k| k.eq_ignore_ascii_case("active"))
        .cloned();
    if let Some(key) = key {
        let active = match &user[&key] {
            Value::Bool(b) => *b,
            Value::String(s) if s.eq_ignore_ascii_case("true") => true,
            Value::String(s) if s.eq_ignore_ascii_case("false") => false,
            other => {
                return Err(ScimError::typed(
                    400,
                    "invalidValue",
                    format!("active must be a boolean, not {other}"),
                ))
            }
        };
        user.insert(key, Value::Bool(active));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Value {
        json!({ "schemas": [USER_SCHEMA], "userName": name, "emails": [{ "value": name, "type": "work" }] })
    }

    #[test]
    fn user_names_are_unique_case_insensitively_and_versions_guard_writes() {
        let mut d = Directory::default();
        let ann = d
            .create(Kind::User, &user("ann@example.com"))
            .expect("created");
        let id = ann["id"].as_str().expect("id").to_string();
        let dup = d
            .create(Kind::User, &user("ANN@example.com"))
            .expect_err("duplicate");
        assert_eq!((dup.status, dup.scim_type), (409, Some("uniqueness")));
        let v1 = version_of(&ann).expect("version").to_string();
        let patch =
            json!({ "Operations": [{ "op": "replace", "path": "title", "value": "Boss" }] });
        let after = d
            .patch(Kind::User, &id, &patch, Some(&v1))
            .expect("patched");
        assert_ne!(version_of(&after), Some(v1.as_str()));
        let stale = d
            .patch(Kind::User, &id, &patch, Some(&v1))
            .expect_err("stale");
        assert_eq!(stale.status, 412);
        let bad = d.create(
            Kind::User,
            &json!({ "schemas": [USER_SCHEMA], "userName": "x", "emails": [{ "value": "nope" }] }),
        );
        assert_eq!(bad.expect_err("bad email").scim_type, Some("invalidValue"));
    }

    #[test]
    fn a_deleted_user_leaves_their_groups() {
        let mut d = Directory::default();
        let ann = d
            .create(Kind::User, &user("ann@example.com"))
            .expect("created");
        let id = ann["id"].as_str().expect("id").to_string();
        let group = json!({ "schemas": [GROUP_SCHEMA], "displayName": "Staff", "members": [{ "value": id }] });
        let g = d.create(Kind::Group, &group).expect("group");
        d.delete(Kind::User, &id, None).expect("deleted");
        let gid = g["id"].as_str().expect("id");
        assert_eq!(
            d.get(Kind::Group, gid).expect("group")["members"],
            json!([])
        );
    }
}
