//! Subscribers over HTTP: list, read, create and update one.

use super::*;
use contactsync_sandbox_kit::Platform as _;

/// Top-level standard fields of a subscriber entity, in output order.
pub(super) const TOP_FIELDS: &[&str] = &[
    "first_name",
    "surname",
    "company",
    "position_company",
    "phone_number",
    "external_id",
];

/// Grouped standard fields of a subscriber entity (`<address><city>`), in output order.
pub(super) const GROUPS: &[(&str, &[&str])] = &[
    (
        "address",
        &[
            "address_line_1",
            "city",
            "state_region",
            "postal_code",
            "country",
        ],
    ),
    ("personal_details", &["employee_id", "preferred_name"]),
    (
        "work_details",
        &[
            "function",
            "team",
            "department",
            "division",
            "business_unit",
        ],
    ),
    (
        "work_location",
        &["office_building", "site_location", "region"],
    ),
];

pub(super) fn subscriber_xml(w: &mut XmlWriter, subscriber: &Subscriber, base: &str) {
    let uri = format!("{base}/subscriber/{}", subscriber.id);
    let modified = format_date(subscriber.date_modified, false);
    w.open("subscriber", &[("uri", &uri), ("date_modified", &modified)])
        .text("email", &subscriber.email)
        .text("status", subscriber.status.as_str());
    for field in TOP_FIELDS {
        if let Some(value) = subscriber.field(field) {
            w.text(field, value);
        }
    }
    for (group, fields) in GROUPS {
        let present: Vec<(&str, &str)> = fields
            .iter()
            .filter_map(|f| subscriber.field(&format!("{group}/{f}")).map(|v| (*f, v)))
            .collect();
        if !present.is_empty() {
            w.open(group, &[]);
            for (field, value) in present {
                w.text(field, value);
            }
            w.close(group);
        }
    }
    w.open("custom_fields", &[]);
    for (name, value) in &subscriber.custom_fields {
        w.text_with("custom_field", &[("name", name)], value);
    }
    w.close("custom_fields").open("permissions", &[]);
    for permission in &subscriber.permissions {
        w.empty("permission", &[("name", permission)]);
    }
    w.close("permissions").open("tags", &[]);
    for tag in &subscriber.tags {
        w.empty("tag", &[("name", tag)]);
    }
    w.close("tags").close("subscriber");
}

pub(super) async fn list_subscribers(
    State(shared): SharedState,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let status = query.get("status").map(String::as_str).unwrap_or("active");
    let wanted: Option<SubscriberStatus> = match status {
        "active" => Some(SubscriberStatus::Active),
        "inactive" => Some(SubscriberStatus::Inactive),
        "opt_out" => Some(SubscriberStatus::OptOut),
        "all" => None,
        other => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("status must be active, opt_out, inactive or all, not '{other}'"),
            )
        }
    };
    let number = |name: &str, default: usize| match query.get(name) {
        None => Ok(default),
        Some(v) => v.parse::<usize>().ok().filter(|n| *n >= 1).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{name} must be a whole number from 1"),
            )
        }),
    };
    let page_size = shared.config.page_size.max(1);
    let start = match number("startIndex", 1) {
        Ok(n) => n,
        Err(error) => return error.into_response(),
    };
    let per_page = match number("itemsPerPage", page_size) {
        Ok(n) => n.min(page_size),
        Err(error) => return error.into_response(),
    };
    let ext_id = query.get("ext_id");
    let base = account_url(&headers, &shared);
    let state = shared.lock();
    let matching: Vec<&Subscriber> = state
        .store
        .subscribers()
        .filter(|s| wanted.is_none_or(|w| s.status == w))
        .filter(|s| ext_id.is_none_or(|e| s.field("external_id") == Some(e.as_str())))
        .collect();
    let total = matching.len();
    let mut w = XmlWriter::new();
    w.open(
        "subscribers",
        &[
            ("itemsPerPage", &per_page.to_string()),
            ("startIndex", &start.to_string()),
            ("totalResults", &total.to_string()),
        ],
    );
    let next_start = start.saturating_add(per_page);
    if next_start <= total {
        let mut params = url::form_urlencoded::Serializer::new(String::new());
        params.append_pair("status", status);
        if let Some(ext_id) = ext_id {
            params.append_pair("ext_id", ext_id);
        }
        params.append_pair("startIndex", &next_start.to_string());
        params.append_pair("itemsPerPage", &per_page.to_string());
        let href = format!("{base}/subscribers?{}", params.finish());
        w.empty("link", &[("rel", "next"), ("href", &href)]);
    }
    for subscriber in matching.iter().skip(start - 1).take(per_page) {
        subscriber_xml(&mut w, subscriber, &base);
    }
    w.close("subscribers");
    xml_ok(StatusCode::OK, w.finish())
}

/// The subscriber addressed by `{email|id}`.
pub(super) fn find_key(shared: &Shared, key: &str) -> Option<Subscriber> {
    let state = shared.lock();
    match key.parse::<u64>() {
        Ok(id) => state.store.get(id).cloned(),
        Err(_) => state.store.find(key).cloned(),
    }
}

pub(super) fn with_etag(mut response: Response, subscriber: &Subscriber) -> Response {
    if let Ok(value) = HeaderValue::from_str(&subscriber.etag()) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

pub(super) async fn get_subscriber(
    State(shared): SharedState,
    headers: HeaderMap,
    Path((_, key)): Path<(String, String)>,
) -> Response {
    let Some(subscriber) = find_key(&shared, &key) else {
        return error_response(StatusCode::NOT_FOUND, "no such subscriber");
    };
    let mut w = XmlWriter::new();
    subscriber_xml(&mut w, &subscriber, &account_url(&headers, &shared));
    with_etag(xml_ok(StatusCode::OK, w.finish()), &subscriber)
}

/// What a `<subscriber>` body asks to set.
#[derive(Debug, Default)]
pub(super) struct SubscriberPatch {
    email: Option<String>,
    status: Option<SubscriberStatus>,
    fields: Vec<(String, String)>,
    custom_fields: Vec<(String, String)>,
    permissions: Option<BTreeSet<String>>,
    tags: Option<BTreeSet<String>>,
}

pub(super) fn subscriber_patch(
    root: &Element,
    custom: &CustomFields,
) -> Result<SubscriberPatch, ApiError> {
    let invalid = |message: String| ApiError(StatusCode::CONFLICT, message);
    if root.name != "subscriber" {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("expected <subscriber>, got <{}>", root.name),
        ));
    }
    let mut patch = SubscriberPatch::default();
    for child in &root.children {
        let name = child.name.as_str();
        match name {
            "email" => patch.email = Some(child.text.trim().to_string()),
            "status" => match SubscriberStatus::parse(child.text.trim()) {
                Some(SubscriberStatus::Unconfirmed) => {
                    return Err(invalid("the API cannot set the status UNCONFIRMED".into()))
                }
                Some(status) => patch.status = Some(status),
                None => return Err(invalid(format!("unknown status '{}'", child.text.trim()))),
            },
            "custom_fields" => {
                for field in child.children_named("custom_field") {
                    let Some(field_name) = field.attribute("name") else {
                        return Err(invalid("a <custom_field> without a name".into()));
                    };
                    match resolve(field_name, custom) {
                        Ok(Target::Custom(_)) => {}
                        Ok(_) => {
                            return Err(invalid(format!("'{field_name}' is not a custom field")))
                        }
                        Err(message) => return Err(invalid(message)),
                    }
                    patch
                        .custom_fields
                        .push((field_name.to_string(), field.text.clone()));
                }
            }
            "permissions" | "tags" => {
                let item = if name == "tags" { "tag" } else { "permission" };
                let mut names = BTreeSet::new();
                for element in child.children_named(item) {
                    match element.attribute("name") {
                        Some(n) if !n.trim().is_empty() => names.insert(n.to_string()),
                        _ => return Err(invalid(format!("a <{item}> without a name"))),
                    };
                }
                if name == "tags" {
                    patch.tags = Some(names);
                } else {
                    patch.permissions = Some(names);
                }
            }
            _ if TOP_FIELDS.contains(&name) => {
                patch.fields.push((name.to_string(), child.text.clone()))
            }
            _ => match GROUPS.iter().find(|(group, _)| *group == name) {
                Some((group, fields)) => {
                    for field in &child.children {
                        if !fields.contains(&field.name.as_str()) {
                            return Err(invalid(format!(
                                "unknown field <{group}><{}>",
                                field.name
                            )));
                        }
                        patch
                            .fields
                            .push((format!("{group}/{}", field.name), field.text.clone()));
                    }
                }
                None => return Err(invalid(format!("unknown subscriber field <{name}>"))),
            },
        }
    }
    Ok(patch)
}

pub(super) fn apply_patch(subscriber: &mut Subscriber, patch: SubscriberPatch) {
    for (path, value) in patch.fields {
        if value.is_empty() {
            subscriber.fields.remove(&path);
        } else {
            subscriber.fields.insert(path, value);
        }
    }
    for (name, value) in patch.custom_fields {
        if value.is_empty() {
            subscriber.custom_fields.remove(&name);
        } else {
            subscriber.custom_fields.insert(name, value);
        }
    }
    if let Some(permissions) = patch.permissions {
        subscriber.permissions = permissions;
    }
    if let Some(tags) = patch.tags {
        subscriber.tags = tags;
    }
    if let Some(status) = patch.status {
        if status != subscriber.status {
            subscriber.removed_by = match status {
                SubscriberStatus::Inactive | SubscriberStatus::OptOut => Some(RemovedBy::Api),
                _ => None,
            };
        }
        subscriber.status = status;
    }
    if subscriber.status == SubscriberStatus::OptOut {
        subscriber.permissions.clear();
    }
}

/// The subscriber fields a request body sets.
fn patch_of(
    shared: &Shared,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<SubscriberPatch, ApiError> {
    xml_body(headers, body).and_then(|root| subscriber_patch(&root, &shared.config.custom_fields))
}

pub(super) async fn create_subscriber(
    State(shared): SharedState,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let patch = match patch_of(&shared, &headers, &body) {
        Ok(patch) => patch,
        Err(error) => return error.into_response(),
    };
    let Some(email) = patch.email.clone().filter(|e| valid_email(e)) else {
        return error_response(StatusCode::CONFLICT, "a valid <email> is required");
    };
    let created = {
        let mut state = shared.lock();
        if state.store.find(&email).is_some() {
            return error_response(
                StatusCode::CONFLICT,
                "a subscriber with this email already exists",
            );
        }
        let mut subscriber = Subscriber::new(email);
        apply_patch(&mut subscriber, patch);
        state.store.insert(subscriber).clone()
    };
    shared.save_logged();
    let href = format!(
        "{}/subscriber/{}",
        account_url(&headers, &shared),
        created.id
    );
    let mut response = xml_ok(
        StatusCode::CREATED,
        status_entity(StatusCode::CREATED, &[&href], &[], &[]),
    );
    if let Ok(value) = HeaderValue::from_str(&href) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    with_etag(response, &created)
}

pub(super) async fn update_subscriber(
    State(shared): SharedState,
    headers: HeaderMap,
    Path((_, key)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let patch = match patch_of(&shared, &headers, &body) {
        Ok(patch) => patch,
        Err(error) => return error.into_response(),
    };
    let Some(current) = find_key(&shared, &key) else {
        return error_response(StatusCode::NOT_FOUND, "no such subscriber");
    };
    if let Some(expected) = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) {
        let matches =
            expected.trim() == "*" || expected.split(',').any(|tag| tag.trim() == current.etag());
        if !matches {
            return error_response(
                StatusCode::PRECONDITION_FAILED,
                "If-Match does not match the subscriber's current ETag",
            );
        }
    }
    if current.opted_out_by_subscriber()
        && patch.status.is_some_and(|s| s != SubscriberStatus::OptOut)
    {
        return error_response(
            StatusCode::CONFLICT,
            "the subscriber opted out themselves; the API cannot reverse it",
        );
    }
    let updated = {
        let mut state = shared.lock();
        if let Some(email) = patch.email.as_deref() {
            if !valid_email(email) {
                return error_response(StatusCode::CONFLICT, "not a valid email address");
            }
            if state
                .store
                .find(email)
                .is_some_and(|other| other.id != current.id)
            {
                return error_response(StatusCode::CONFLICT, "another subscriber has this email");
            }
        }
        let Some(subscriber) = state.store.get_mut(current.id) else {
            return error_response(StatusCode::NOT_FOUND, "no such subscriber");
        };
        let email_change = patch.email.clone().filter(|e| *e != subscriber.email);
        let before = subscriber.clone();
        apply_patch(subscriber, patch);
        if subscriber != &before {
            subscriber.version += 1;
            subscriber.date_modified = now();
        }
        let updated = subscriber.clone();
        if let Some(email) = email_change {
            state.store.change_email(current.id, &email);
        }
        state.store.get(current.id).cloned().unwrap_or(updated)
    };
    shared.save_logged();
    let href = format!(
        "{}/subscriber/{}",
        account_url(&headers, &shared),
        updated.id
    );
    let response = xml_ok(
        StatusCode::OK,
        status_entity(StatusCode::OK, &[], &[&href], &[]),
    );
    with_etag(response, &updated)
}
