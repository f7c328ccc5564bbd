//! PATCH operations (RFC 7644 §3.5.2) applied to a resource: `add`, `replace` and
//! `remove`, with or without a path; paths `attr`, `attr.sub`, `urn:…:attr`, and a
//! value filter on a multi-valued attribute (`emails[type eq "work"].value`,
//! `members[value eq "…"]`). Operation names are case-insensitive (Entra sends
//! `Replace`).

use serde_json::{Map, Value};

use crate::filter::Filter;

/// Why an operation failed: the SCIM `scimType` and a detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchError {
    /// `invalidPath`, `noTarget`, `invalidValue`, `mutability`, `invalidSyntax`.
    pub scim_type: &'static str,
    /// What is wrong, in a sentence.
    pub detail: String,
}

fn fail(scim_type: &'static str, detail: impl Into<String>) -> PatchError {
    PatchError {
        scim_type,
        detail: detail.into(),
    }
}

/// Applies the `Operations` of a PatchOp body to `resource`, all or nothing.
pub fn apply(resource: &mut Map<String, Value>, body: &Value) -> Result<(), PatchError> {
    let ops = body
        .get("Operations")
        .or_else(|| body.get("operations"))
        .and_then(Value::as_array)
        .ok_or_else(|| fail("invalidSyntax", "a PatchOp needs `Operations`"))?;
    let mut copy = resource.clone();
    for op in ops {
        let name = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| fail("invalidSyntax", "an operation needs `op`"))?
            .to_ascii_lowercase();
        let path = op.get("path").and_then(Value::as_str);
        let value = op.get("value");
        match (name.as_str(), path) {
            ("add" | "replace", None) => {
                let Some(Value::Object(values)) = value else {
                    return Err(fail(
                        "invalidValue",
                        "an operation without a path needs an object value",
                    ));
                };
                for (key, v) in values {
                    if key.to_ascii_lowercase().starts_with("urn:") && v.is_object() {
                        let ext = object_at(&mut copy, key);
                        for (k, v) in v.as_object().into_iter().flatten() {
                            ext.insert(k.clone(), v.clone());
                        }
                    } else {
                        set(&mut copy, key, v.clone(), name == "add")?;
                    }
                }
            }
            ("add" | "replace", Some(path)) => {
                let v = value.ok_or_else(|| fail("invalidValue", "an operation needs a value"))?;
                set(&mut copy, path, v.clone(), name == "add")?;
            }
            ("remove", Some(path)) => remove(&mut copy, path)?,
            ("remove", None) => return Err(fail("noTarget", "`remove` needs a path")),
            (other, _) => {
                return Err(fail(
                    "invalidSyntax",
                    format!("unknown operation {other:?}"),
                ))
            }
        }
    }
    *resource = copy;
    Ok(())
}

/// A parsed path: the object it starts in (an extension's URN, or none), the
/// attribute, an optional value filter, and an optional sub-attribute.
struct Path<'a> {
    urn: Option<&'a str>,
    attr: &'a str,
    filter: Option<Filter>,
    sub: Option<&'a str>,
}

const CORE: [&str; 2] = [
    "urn:ietf:params:scim:schemas:core:2.0:User",
    "urn:ietf:params:scim:schemas:core:2.0:Group",
];

fn parse(path: &str) -> Result<Path<'_>, PatchError> {
    let (urn, rest) = if path.to_ascii_lowercase().starts_with("urn:") {
        // The attribute follows the schema URN's last `:` (before any filter).
        let head_end = path.find('[').unwrap_or(path.len());
        let colon = path[..head_end]
            .rfind(':')
            .ok_or_else(|| fail("invalidPath", format!("{path:?} has no attribute")))?;
        let urn = &path[..colon];
        let urn = (!CORE.iter().any(|c| c.eq_ignore_ascii_case(urn))).then_some(urn);
        (urn, &path[colon + 1..])
    } else {
        (None, path)
    };
    if let Some(open) = rest.find('[') {
        let close = rest
            .rfind(']')
            .ok_or_else(|| fail("invalidPath", format!("{path:?}: `[` is not closed")))?;
        let filter = Filter::parse(&rest[open + 1..close])
            .map_err(|e| fail("invalidPath", format!("{path:?}: {e}")))?;
        let sub = rest[close + 1..].strip_prefix('.');
        return Ok(Path {
            urn,
            attr: &rest[..open],
            filter: Some(filter),
            sub,
        });
    }
    let (attr, sub) = match rest.split_once('.') {
        Some((a, s)) => (a, Some(s)),
        None => (rest, None),
    };
    Ok(Path {
        urn,
        attr,
        filter: None,
        sub,
    })
}

/// The object for an extension URN, created when missing.
fn object_at<'a>(resource: &'a mut Map<String, Value>, urn: &str) -> &'a mut Map<String, Value> {
    let key = resource
        .keys()
        .find(|k| k.eq_ignore_ascii_case(urn))
        .cloned()
        .unwrap_or_else(|| urn.to_string());
    let slot = resource
        .entry(key)
        .or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    match slot {
        Value::Object(m) => m,
        _ => unreachable!("just made an object"),
    }
}

/// The key under which `map` holds `name` (case-insensitive), or `name`.
fn key_of(map: &Map<String, Value>, name: &str) -> String {
    map.keys()
        .find(|k| k.eq_ignore_ascii_case(name))
        .cloned()
        .unwrap_or_else(|| name.to_string())
}

fn container<'a>(
    resource: &'a mut Map<String, Value>,
    path: &Path<'_>,
) -> &'a mut Map<String, Value> {
    match path.urn {
        Some(urn) => object_at(resource, urn),
        None => resource,
    }
}

const READ_ONLY: [&str; 2] = ["id", "meta"];

/// What `path` addresses in `resource`: the parsed path, the object holding the
/// attribute, and the attribute's key there; a read-only attribute is refused.
fn target<'r, 'p>(
    resource: &'r mut Map<String, Value>,
    path: &'p str,
) -> Result<(Path<'p>, &'r mut Map<String, Value>, String), PatchError> {
    let p = parse(path)?;
    if p.urn.is_none() && READ_ONLY.iter().any(|r| r.eq_ignore_ascii_case(p.attr)) {
        return Err(fail("mutability", format!("{} is read-only", p.attr)));
    }
    let map = container(resource, &p);
    let key = key_of(map, p.attr);
    Ok((p, map, key))
}

fn set(
    resource: &mut Map<String, Value>,
    path: &str,
    value: Value,
    add: bool,
) -> Result<(), PatchError> {
    let (p, map, key) = target(resource, path)?;
    match (&p.filter, p.sub) {
        (None, None) => {
            match (map.get_mut(&key), value) {
                // `add` to a multi-valued attribute appends what it does not hold.
                (Some(Value::Array(items)), Value::Array(new)) if add => {
                    // A group of 100,000 members takes a batch's additions without a
                    // scan for each.
                    let mut held: std::collections::HashSet<String> =
                        items.iter().map(Value::to_string).collect();
                    for v in new {
                        if held.insert(v.to_string()) {
                            items.push(v);
                        }
                    }
                }
                (Some(Value::Array(items)), v @ Value::Object(_)) if add => {
                    if !items.contains(&v) {
                        items.push(v);
                    }
                }
                (_, v) => {
                    map.insert(key, v);
                }
            }
            Ok(())
        }
        (None, Some(sub)) => {
            let slot = map.entry(key).or_insert_with(|| Value::Object(Map::new()));
            match slot {
                Value::Object(m) => {
                    let k = key_of(m, sub);
                    m.insert(k, value);
                    Ok(())
                }
                _ => Err(fail("invalidPath", format!("{} is not complex", p.attr))),
            }
        }
        (Some(filter), sub) => {
            let Some(Value::Array(items)) = map.get_mut(&key) else {
                return Err(fail(
                    "noTarget",
                    format!("no {} matches the filter", p.attr),
                ));
            };
            let mut hit = false;
            for item in items.iter_mut() {
                let Value::Object(m) = item else { continue };
                if !filter.matches(m) {
                    continue;
                }
                hit = true;
                match sub {
                    Some(sub) => {
                        let k = key_of(m, sub);
                        m.insert(k, value.clone());
                    }
                    None => *item = value.clone(),
                }
            }
            if hit {
                Ok(())
            } else {
                Err(fail(
                    "noTarget",
                    format!("no {} matches the filter", p.attr),
                ))
            }
        }
    }
}

fn remove(resource: &mut Map<String, Value>, path: &str) -> Result<(), PatchError> {
    let (p, map, key) = target(resource, path)?;
    match (&p.filter, p.sub) {
        (None, None) => {
            map.remove(&key);
        }
        (None, Some(sub)) => {
            if let Some(Value::Object(m)) = map.get_mut(&key) {
                let k = key_of(m, sub);
                m.remove(&k);
            }
        }
        (Some(filter), sub) => {
            if let Some(Value::Array(items)) = map.get_mut(&key) {
                match sub {
                    None => items.retain(|i| !i.as_object().is_some_and(|m| filter.matches(m))),
                    Some(sub) => {
                        for item in items.iter_mut() {
                            if let Value::Object(m) = item {
                                if filter.matches(m) {
                                    let k = key_of(m, sub);
                                    m.remove(&k);
                                }
                            }
                        }
                    }
                }
                if items.is_empty() {
                    map.remove(&key);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ENTERPRISE: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

    fn patched(ops: Value) -> Result<Value, PatchError> {
        let mut user = json!({
            "id": "1",
            "userName": "ann@example.com",
            "emails": [{ "value": "ann@example.com", "type": "work", "primary": true }],
            "name": { "givenName": "Ann" }
        })
        .as_object()
        .cloned()
        .expect("object");
        apply(&mut user, &json!({ "Operations": ops }))?;
        Ok(Value::Object(user))
    }

    #[test]
    fn paths_filters_and_extensions() {
        let user = patched(json!([
            { "op": "Replace", "path": "name.familyName", "value": "Lee" },
            { "op": "replace", "path": "emails[type eq \"work\"].value", "value": "ann@example.org" },
            { "op": "add", "path": format!("{ENTERPRISE}:department"), "value": "Sales" },
            { "op": "add", "path": "phoneNumbers", "value": [{ "value": "+32 2", "type": "work" }] },
            { "op": "remove", "path": "name.givenName" },
            { "op": "replace", "value": { "active": false, "title": "Boss" } }
        ]))
        .expect("patched");
        assert_eq!(user["name"], json!({ "familyName": "Lee" }));
        assert_eq!(user["emails"][0]["value"], "ann@example.org");
        assert_eq!(user[ENTERPRISE]["department"], "Sales");
        assert_eq!(user["phoneNumbers"][0]["type"], "work");
        assert_eq!(user["active"], false);
        assert_eq!(user["title"], "Boss");
    }

    #[test]
    fn a_filter_that_matches_nothing_is_no_target_and_changes_nothing() {
        let e = patched(json!([
            { "op": "replace", "path": "name.givenName", "value": "Bea" },
            { "op": "replace", "path": "phoneNumbers[type eq \"mobile\"].value", "value": "1" }
        ]))
        .expect_err("no target");
        assert_eq!(e.scim_type, "noTarget");
        assert_eq!(
            patched(json!([{ "op": "remove", "path": "emails[type eq \"work\"]" }]))
                .expect("removed")
                .get("emails"),
            None
        );
        assert_eq!(
            patched(json!([{ "op": "replace", "path": "id", "value": "2" }]))
                .expect_err("read-only")
                .scim_type,
            "mutability"
        );
    }
}
