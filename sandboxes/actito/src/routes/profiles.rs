//! Profiles over HTTP: write (create or update), list, read, delete, and their
//! subscriptions.

use super::*;
use contactsync_sandbox_kit::Platform as _;

pub(super) fn text(v: &Value) -> Option<Option<String>> {
    match v {
        Value::Null => Some(None),
        Value::String(s) => Some(Some(s.clone())),
        Value::Number(n) => Some(Some(n.to_string())),
        Value::Bool(b) => Some(Some(b.to_string())),
        _ => None,
    }
}

/// Reads a profile body (`attributes`, `subscriptions`, `segmentations`).
pub(super) fn profile_input(body: &Value) -> Result<ProfileInput, String> {
    let mut input = ProfileInput::default();
    let attrs = body
        .get("attributes")
        .and_then(Value::as_array)
        .ok_or("the body needs an `attributes` list")?;
    for a in attrs {
        let name = a
            .get("name")
            .and_then(Value::as_str)
            .ok_or("an attribute without a name")?;
        let value = text(a.get("value").unwrap_or(&Value::Null)).ok_or_else(|| {
            format!("attribute {name}: the value must be a string, number, boolean or null")
        })?;
        input.attributes.push((name.to_string(), value));
    }
    for s in body
        .get("subscriptions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = s
            .get("name")
            .and_then(Value::as_str)
            .ok_or("a subscription without a name")?;
        let on = s
            .get("subscribe")
            .and_then(Value::as_bool)
            .ok_or_else(|| format!("subscription {name}: `subscribe` must be true or false"))?;
        input.subscriptions.push((name.to_string(), on));
    }
    for s in body
        .get("segmentations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let belongs = s.get("belongs").and_then(Value::as_bool).unwrap_or(true);
        let seg = s
            .get("segmentation")
            .ok_or("a segmentation entry without `segmentation`")?;
        let (Some(category), Some(name)) = (
            seg.get("category").and_then(Value::as_str),
            seg.get("name").and_then(Value::as_str),
        ) else {
            return Err("a segmentation needs a category and a name".into());
        };
        input.segmentations.push((
            Segmentation {
                category: category.to_string(),
                name: name.to_string(),
            },
            belongs,
        ));
    }
    Ok(input)
}

pub(super) async fn write_profile(
    State(shared): S,
    Path((e, t)): Path<(String, String)>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Bytes,
) -> Response {
    if let Err(r) = table_ok(&shared, &e, &t) {
        return r;
    }
    shared.lock().stats.profile_posts += 1;
    let allow_update = query
        .ok()
        .as_ref()
        .and_then(|q| q.get("allowUpdate"))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let json: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            )
        }
    };
    let input = match profile_input(&json) {
        Ok(i) => i,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let now = crate::import::now();
    let result = {
        let mut state = shared.lock();
        let store = &mut state.store;
        let mut next = store.next_profile_id;
        let r = match store.tables.get_mut(&t) {
            Some(table) => table.write(&input, true, allow_update, &mut next, &now),
            None => Err("no table".into()),
        };
        store.next_profile_id = next;
        r
    };
    match result {
        Ok((id, created)) => {
            shared.save_logged();
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let location = format!("/v4/entity/{e}/table/{t}/profile/{id}");
            (
                status,
                [(header::LOCATION, location)],
                Json(json!({"profileId": id})),
            )
                .into_response()
        }
        Err(m) => error(StatusCode::BAD_REQUEST, m),
    }
}

pub(super) async fn list_profiles(
    State(shared): S,
    Path((e, t)): Path<(String, String)>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    if let Err(r) = table_ok(&shared, &e, &t) {
        return r;
    }
    let q = query.map(|q| q.0).unwrap_or_default();
    let number: usize = match q.get("number").map(|n| n.trim().parse::<usize>()) {
        None => 100,
        Some(Ok(n)) if n > 0 => n.min(1000),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "`number` must be a positive integer",
            )
        }
    };
    let page: usize = match q.get("page").map(|n| n.trim().parse::<usize>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "`page` must be an integer from 0"),
    };
    let search = match q.get("search").filter(|s| !s.trim().is_empty()) {
        None => None,
        Some(s) => match s.split_once('=') {
            Some((a, v)) => Some((a.trim().to_string(), v.to_string())),
            None => return error(StatusCode::BAD_REQUEST, "`search` must be attribute=value"),
        },
    };
    let mut state = shared.lock();
    if page == 1 && state.delete_while_paging > 0 {
        state.delete_while_paging -= 1;
        if let Some(table) = state.store.tables.get_mut(&t) {
            if let Some(first) = table.profiles.keys().next().copied() {
                table.remove_profile(first);
            }
        }
    }
    if page == 1 && state.replace_while_paging > 0 {
        state.replace_while_paging -= 1;
        let store = &mut state.store;
        let mut next = store.next_profile_id;
        if let Some(table) = store.tables.get_mut(&t) {
            if let Some(first) = table.profiles.keys().next().copied() {
                table.remove_profile(first);
                let email = table
                    .def
                    .attributes
                    .iter()
                    .find(|a| a.kind == "EMAIL_ADDRESS")
                    .map(|a| a.name.clone());
                let input = ProfileInput {
                    attributes: email
                        .map(|name| {
                            (
                                name,
                                Some(format!("created.while.paging.{next}@example.com")),
                            )
                        })
                        .into_iter()
                        .collect(),
                    ..ProfileInput::default()
                };
                if let Err(e) = table.write(&input, true, true, &mut next, &crate::import::now()) {
                    tracing::warn!("the sandbox could not create a profile while paging: {e}");
                }
            }
        }
        store.next_profile_id = next;
    }
    let Some(table) = state.store.tables.get(&t) else {
        return error(StatusCode::NOT_FOUND, "no table");
    };
    let matching: Vec<_> = table
        .profiles
        .values()
        .filter(|p| match &search {
            None => true,
            Some((a, v)) if a == "profileId" => p.id.to_string() == *v,
            Some((a, v)) => p.attributes.get(a) == Some(v),
        })
        .collect();
    let total = matching.len();
    let profiles: Vec<Value> = matching
        .into_iter()
        .skip(page.saturating_mul(number))
        .take(number)
        .map(|p| p.to_json(&table.def))
        .collect();
    Json(json!({"profiles": profiles, "totalCount": total, "page": page, "number": number}))
        .into_response()
}

pub(super) async fn get_profile(
    State(shared): S,
    Path((e, t, key)): Path<(String, String, String)>,
) -> Response {
    if let Err(r) = table_ok(&shared, &e, &t) {
        return r;
    }
    let state = shared.lock();
    let Some(table) = state.store.tables.get(&t) else {
        return error(StatusCode::NOT_FOUND, "no table");
    };
    match table.find(&key).and_then(|id| table.profiles.get(&id)) {
        Some(p) => Json(p.to_json(&table.def)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no profile {key}")),
    }
}

pub(super) async fn delete_profile(
    State(shared): S,
    Path((e, t, key)): Path<(String, String, String)>,
) -> Response {
    if let Err(r) = table_ok(&shared, &e, &t) {
        return r;
    }
    let removed = {
        let mut state = shared.lock();
        state.stats.profile_deletes += 1;
        state.store.tables.get_mut(&t).and_then(|table| {
            let id = table.find(&key)?;
            table.remove_profile(id).map(|_| id)
        })
    };
    match removed {
        Some(id) => {
            shared.save_logged();
            Json(json!({"profileId": id})).into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("no profile {key}")),
    }
}

pub(super) async fn subscribe(
    State(shared): S,
    Path((e, t, key, name)): Path<(String, String, String, String)>,
) -> Response {
    set_subscription(&shared, &e, &t, &key, &name, true)
}

pub(super) async fn unsubscribe(
    State(shared): S,
    Path((e, t, key, name)): Path<(String, String, String, String)>,
) -> Response {
    set_subscription(&shared, &e, &t, &key, &name, false)
}

pub(super) fn set_subscription(
    shared: &Shared,
    e: &str,
    t: &str,
    key: &str,
    name: &str,
    on: bool,
) -> Response {
    if let Err(r) = table_ok(shared, e, t) {
        return r;
    }
    let result = {
        let mut state = shared.lock();
        state.stats.subscription_changes += 1;
        match state.store.tables.get_mut(t) {
            None => Err(error(StatusCode::NOT_FOUND, "no table")),
            Some(table) => {
                if !table.def.subscriptions.iter().any(|s| s == name) {
                    Err(error(
                        StatusCode::NOT_FOUND,
                        format!("no subscription {name}"),
                    ))
                } else {
                    match table.find(key).and_then(|id| table.profiles.get_mut(&id)) {
                        None => Err(error(StatusCode::NOT_FOUND, format!("no profile {key}"))),
                        Some(p) => {
                            p.subscriptions.insert(name.to_string(), on);
                            p.updated = crate::import::now();
                            Ok(p.id)
                        }
                    }
                }
            }
        }
    };
    match result {
        Ok(id) => {
            shared.save_logged();
            Json(json!({"profileId": id})).into_response()
        }
        Err(r) => r,
    }
}
