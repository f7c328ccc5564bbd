//! Subscriber import jobs: checking a submitted job the way the API documents it (409
//! for every documented validation failure), then processing its rows in the
//! background at a configurable pace, so that clients must poll, honour `ping_after`
//! and cope with IN_PROGRESS, ERROR and CANCELLED like on the real platform.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use super::model::{
    match_key, now, valid_email, FieldSeparator, Import, ImportJob, ImportResults, ImportStatus,
    PlannedEnd, RemovedBy, Store, Subscriber, SubscriberStatus,
};
use super::xml::Element;
use super::Shared;
use contactsync_sandbox_kit::Platform as _;

/// Where a column's values go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Target {
    /// The email (the match key).
    Email,
    /// A standard field, by its place in the subscriber entity.
    Field(&'static str),
    /// A custom field.
    Custom(String),
    /// Permissions to grant.
    Permissions,
    /// The status.
    Status,
    /// Tags to add.
    Tags,
    /// Tags to remove.
    RemoveTags,
}

/// The canonical column names the API knows, spelled exactly, and where they go.
#[rustfmt::skip]
pub(crate) const CANONICAL: &[(&str, Target)] = &[
    ("email", Target::Email),
    ("name.first name", Target::Field("first_name")),
    ("name.surname", Target::Field("surname")),
    ("personalDetails.preferredName", Target::Field("personal_details/preferred_name")),
    ("personalDetails.employeeId", Target::Field("personal_details/employee_id")),
    ("employeeId", Target::Field("personal_details/employee_id")),
    ("externalId", Target::Field("external_id")),
    ("company", Target::Field("company")),
    ("position", Target::Field("position_company")),
    ("workDetails.function", Target::Field("work_details/function")),
    ("workDetails.team", Target::Field("work_details/team")),
    ("workDetails.department", Target::Field("work_details/department")),
    ("workDetails.division", Target::Field("work_details/division")),
    ("workDetails.businessUnit", Target::Field("work_details/business_unit")),
    ("workLocation.officeBuilding", Target::Field("work_location/office_building")),
    ("workLocation.siteLocation", Target::Field("work_location/site_location")),
    ("workLocation.region", Target::Field("work_location/region")),
    ("address.address line 1", Target::Field("address/address_line_1")),
    ("address.city", Target::Field("address/city")),
    ("address.state/region", Target::Field("address/state_region")),
    ("address.postal code", Target::Field("address/postal_code")),
    ("address.country", Target::Field("address/country")),
    ("permissions", Target::Permissions),
    ("status", Target::Status),
    ("tags", Target::Tags),
    ("removetags", Target::RemoveTags),
];

/// Prefixes of canonical names: a name with one of them that is not in [`CANONICAL`] is
/// a misspelt field, never a custom field.
const RESERVED_PREFIXES: &[&str] = &[
    "name.",
    "personalDetails.",
    "workDetails.",
    "workLocation.",
    "address.",
];

/// The separator between several permission or tag names in one cell (inferred).
pub(crate) const LIST_SEPARATOR: char = '|';

/// Which custom field names the account has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CustomFields {
    /// Any name that is not a (misspelt) canonical name is a custom field (the default:
    /// the sandbox cannot know the account's fields).
    #[default]
    Any,
    /// Only these names, spelled exactly.
    Declared(BTreeSet<String>),
}

/// Why a job was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum JobError {
    /// 400: the body is not a job at all.
    #[error("{0}")]
    Malformed(String),
    /// 409: a documented validation failure.
    #[error("{0}")]
    Invalid(String),
}

/// Resolves a column or `set_field` name.
pub(crate) fn resolve(name: &str, custom: &CustomFields) -> Result<Target, String> {
    if let Some((_, target)) = CANONICAL.iter().find(|(n, _)| *n == name) {
        return Ok(target.clone());
    }
    if name.trim().is_empty() {
        return Err("an empty column name".to_string());
    }
    if let Some((canonical, _)) = CANONICAL
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
    {
        return Err(format!(
            "unknown field '{name}' (the field is spelled '{canonical}')"
        ));
    }
    if RESERVED_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Err(format!("unknown field '{name}'"));
    }
    match custom {
        CustomFields::Any => Ok(Target::Custom(name.to_string())),
        CustomFields::Declared(names) if names.contains(name) => {
            Ok(Target::Custom(name.to_string()))
        }
        CustomFields::Declared(_) => Err(format!("unknown custom field '{name}'")),
    }
}

fn flag(job: &Element, name: &str) -> Result<bool, JobError> {
    match job.child_text(name).map(str::trim) {
        None => Ok(false),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(JobError::Invalid(format!(
            "{name} must be true or false, not '{other}'"
        ))),
    }
}

fn names(job: &Element, list: &str, item: &str) -> Result<Vec<String>, JobError> {
    let Some(list) = job.child(list) else {
        return Ok(Vec::new());
    };
    list.children_named(item)
        .map(|e| match e.attribute("name") {
            Some(name) if !name.trim().is_empty() => Ok(name.to_string()),
            _ => Err(JobError::Invalid(format!("a <{item}> without a name"))),
        })
        .collect()
}

/// A checked job: its specification, the targets of its columns and its rows.
#[derive(Debug)]
pub(crate) struct CheckedJob {
    pub job: ImportJob,
    pub rows: Vec<Vec<String>>,
}

/// Checks a `<subscriber_import_job>` as the API does.
pub(crate) fn check_job(root: &Element, custom: &CustomFields) -> Result<CheckedJob, JobError> {
    if root.name != "subscriber_import_job" {
        return Err(JobError::Malformed(format!(
            "expected <subscriber_import_job>, got <{}>",
            root.name
        )));
    }
    match root.child_text("accept_terms").map(str::trim) {
        Some("true") => {}
        Some(_) => return Err(JobError::Invalid("accept_terms must be true".into())),
        None => {
            return Err(JobError::Invalid(
                "accept_terms is missing; it must be true".into(),
            ))
        }
    }
    let mut set_fields = Vec::new();
    if let Some(list) = root.child("set_fields") {
        for field in list.children_named("set_field") {
            let Some(name) = field.attribute("name") else {
                return Err(JobError::Invalid("a <set_field> without a name".into()));
            };
            match resolve(name, custom).map_err(JobError::Invalid)? {
                Target::Field(_) | Target::Custom(_) => {}
                _ => {
                    return Err(JobError::Invalid(format!(
                        "set_field '{name}' is not a field that can be set"
                    )))
                }
            }
            set_fields.push((name.to_string(), field.text.clone()));
        }
    }
    let data = root
        .child("subscriber_data")
        .ok_or_else(|| JobError::Invalid("subscriber_data is missing".into()))?;
    let columns_text = data
        .child_text("columns")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            JobError::Invalid(
                "columns is missing (automatic column mapping is not supported)".into(),
            )
        })?;
    let columns: Vec<String> = columns_text.split(',').map(str::to_string).collect();
    let mut targets: Vec<Target> = Vec::new();
    for column in &columns {
        let target = resolve(column, custom).map_err(JobError::Invalid)?;
        if targets.contains(&target) {
            return Err(JobError::Invalid(format!(
                "column '{column}' is mapped twice"
            )));
        }
        targets.push(target);
    }
    if !targets.contains(&Target::Email) {
        return Err(JobError::Invalid("the email column is mandatory".into()));
    }
    let field_separator = match data.child_text("field_separator").map(str::trim) {
        None | Some("comma") => FieldSeparator::Comma,
        Some("tab") => FieldSeparator::Tab,
        Some("semicolon") => FieldSeparator::Semicolon,
        Some(other) => {
            return Err(JobError::Invalid(format!(
                "field_separator must be comma, tab or semicolon, not '{other}'"
            )))
        }
    };
    let skip_first_line = flag(data, "skip_first_line")?;
    let text = data.child_text("data").unwrap_or_default();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(field_separator.byte())
        .from_reader(text.as_bytes());
    let mut rows = Vec::new();
    for (index, record) in reader.records().enumerate() {
        let record =
            record.map_err(|e| JobError::Invalid(format!("data is not valid CSV: {e}")))?;
        if index == 0 && skip_first_line {
            continue;
        }
        if record.len() != columns.len() {
            let line = record
                .position()
                .map(|p| p.line())
                .unwrap_or(index as u64 + 1);
            return Err(JobError::Invalid(format!(
                "data line {line} has {} fields but {} columns are mapped",
                record.len(),
                columns.len()
            )));
        }
        rows.push(record.iter().map(str::to_string).collect());
    }
    if rows.is_empty() {
        return Err(JobError::Invalid("data is empty".into()));
    }
    Ok(CheckedJob {
        job: ImportJob {
            accept_terms: true,
            update_existing: flag(root, "update_existing")?,
            reactivate_api_removed: flag(root, "reactivate_api_removed")?,
            reactivate_admin_removed: flag(root, "reactivate_admin_removed")?,
            reactivate_bounced_removed: flag(root, "reactivate_bounced_removed")?,
            set_fields,
            add_permissions: names(root, "add_permissions", "permission")?,
            remove_permissions: names(root, "remove_permissions", "permission")?,
            tags: names(root, "tags", "tag")?,
            columns,
            skip_first_line,
            field_separator,
        },
        rows,
    })
}

/// What became of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowOutcome {
    New,
    Updated,
    Invalid,
    Duplicate,
    OptedOut,
    Skipped,
}

fn list(cell: &str) -> impl Iterator<Item = &str> {
    cell.split(LIST_SEPARATOR)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Applies one row to the store, with the documented semantics.
fn apply_row(
    store: &mut Store,
    job: &ImportJob,
    targets: &[Target],
    row: &[String],
    seen: &mut HashSet<String>,
) -> RowOutcome {
    let Some(email) = targets
        .iter()
        .position(|t| *t == Target::Email)
        .and_then(|i| row.get(i))
        .map(|e| e.trim())
    else {
        return RowOutcome::Invalid;
    };
    if !valid_email(email) {
        return RowOutcome::Invalid;
    }
    if !seen.insert(match_key(email)) {
        return RowOutcome::Duplicate;
    }
    let mut requested = None;
    for (target, cell) in targets.iter().zip(row) {
        if *target == Target::Status && !cell.trim().is_empty() {
            match SubscriberStatus::parse(cell.trim()) {
                Some(SubscriberStatus::Unconfirmed) | None => return RowOutcome::Invalid,
                Some(status) => requested = Some(status),
            }
        }
    }
    let exists = match store.find(email) {
        Some(existing) if existing.opted_out_by_subscriber() => return RowOutcome::OptedOut,
        Some(_) if !job.update_existing => return RowOutcome::Skipped,
        Some(existing) => {
            let removed = matches!(
                existing.status,
                SubscriberStatus::Inactive | SubscriberStatus::OptOut
            );
            if requested == Some(SubscriberStatus::Active) && removed {
                let allowed = match existing.removed_by {
                    Some(RemovedBy::Api) | None => job.reactivate_api_removed,
                    Some(RemovedBy::Admin) => job.reactivate_admin_removed,
                    Some(RemovedBy::Bounced) => job.reactivate_bounced_removed,
                    Some(RemovedBy::Subscriber) => false,
                };
                if !allowed {
                    return RowOutcome::Skipped;
                }
            }
            true
        }
        None => false,
    };
    let mut subscriber = match store.find(email) {
        Some(existing) => existing.clone(),
        None => Subscriber::new(email),
    };
    let before = subscriber.clone();
    for (target, cell) in targets.iter().zip(row) {
        match target {
            Target::Email | Target::Status => {}
            Target::Field(path) => set(&mut subscriber.fields, path, cell),
            Target::Custom(name) => set(&mut subscriber.custom_fields, name, cell),
            Target::Permissions => subscriber
                .permissions
                .extend(list(cell).map(str::to_string)),
            Target::Tags => subscriber.tags.extend(list(cell).map(str::to_string)),
            Target::RemoveTags => {
                for tag in list(cell) {
                    subscriber.tags.remove(tag);
                }
            }
        }
    }
    for (name, value) in &job.set_fields {
        match CANONICAL.iter().find(|(n, _)| n == name) {
            Some((_, Target::Field(path))) => set(&mut subscriber.fields, path, value),
            _ => set(&mut subscriber.custom_fields, name, value),
        }
    }
    subscriber
        .permissions
        .extend(job.add_permissions.iter().cloned());
    for permission in &job.remove_permissions {
        subscriber.permissions.remove(permission);
    }
    subscriber.tags.extend(job.tags.iter().cloned());
    if let Some(status) = requested {
        subscriber.status = status;
        subscriber.removed_by = match status {
            SubscriberStatus::Active | SubscriberStatus::Unconfirmed => None,
            SubscriberStatus::Inactive | SubscriberStatus::OptOut => Some(RemovedBy::Api),
        };
    }
    if subscriber.status == SubscriberStatus::OptOut {
        subscriber.permissions.clear();
    }
    if exists {
        if subscriber != before {
            subscriber.version += 1;
            subscriber.date_modified = now();
            if let Some(slot) = store.find_mut(email) {
                *slot = subscriber;
            }
        }
        RowOutcome::Updated
    } else {
        store.insert(subscriber);
        RowOutcome::New
    }
}

/// An empty cell clears the field (inferred: the import sets what the row says).
fn set(map: &mut std::collections::BTreeMap<String, String>, key: &str, cell: &str) {
    if cell.is_empty() {
        map.remove(key);
    } else {
        map.insert(key.to_string(), cell.to_string());
    }
}

fn targets_of(job: &ImportJob) -> Vec<Target> {
    // The job was checked on submission; resolving with `Any` cannot fail differently.
    job.columns
        .iter()
        .map(|c| resolve(c, &CustomFields::Any).unwrap_or(Target::Custom(c.clone())))
        .collect()
}

/// Processes up to `budget` rows of import `id`; returns whether it has finished.
pub(crate) fn process_some(
    store: &mut Store,
    id: u64,
    budget: usize,
    seen: &mut HashSet<String>,
) -> bool {
    let Some(mut import) = store.imports.remove(&id) else {
        return true;
    };
    if import.status != ImportStatus::InProgress {
        store.imports.insert(id, import);
        return true;
    }
    let total = import.rows.len();
    if import.planned_end == Some(PlannedEnd::Error) {
        import.status = ImportStatus::Error;
        import.ping_after = None;
        store.imports.insert(id, import);
        return true;
    }
    let targets = targets_of(&import.job);
    let stop_at = match import.planned_end {
        Some(PlannedEnd::CancelledAfter(n)) => n.min(total),
        _ => total,
    };
    let end = (import.processed + budget.max(1)).min(stop_at);
    for index in import.processed..end {
        let outcome = apply_row(store, &import.job, &targets, &import.rows[index], seen);
        let results = &mut import.results;
        match outcome {
            RowOutcome::New => results.new_subscribers += 1,
            RowOutcome::Updated => results.updated_subscribers += 1,
            RowOutcome::Skipped => results.skipped += 1,
            RowOutcome::Invalid => {
                results.invalid_subscribers += 1;
                import.invalid_rows.push(index);
            }
            RowOutcome::Duplicate => {
                results.duplicate_subscribers += 1;
                import.duplicate_rows.push(index);
            }
            RowOutcome::OptedOut => {
                results.previously_opted_out += 1;
                import.opted_out_rows.push(index);
            }
        }
    }
    import.processed = end;
    let finished = if end >= total {
        import.status = ImportStatus::Completed;
        true
    } else if end >= stop_at {
        import.status = ImportStatus::Cancelled;
        true
    } else {
        false
    };
    if finished {
        import.ping_after = None;
    }
    store.imports.insert(id, import);
    finished
}

/// The emails already seen by the processed rows of an import (to resume after a
/// restart without losing duplicate detection).
pub(crate) fn seen_so_far(import: &Import) -> HashSet<String> {
    let Some(email) = targets_of(&import.job)
        .iter()
        .position(|t| *t == Target::Email)
    else {
        return HashSet::new();
    };
    import.rows[..import.processed.min(import.rows.len())]
        .iter()
        .filter_map(|row| row.get(email))
        .map(|e| e.trim())
        .filter(|e| valid_email(e))
        .map(match_key)
        .collect()
}

/// A new import for a checked job.
pub(crate) fn new_import(id: u64, checked: CheckedJob, planned_end: Option<PlannedEnd>) -> Import {
    Import {
        id,
        created: now(),
        status: ImportStatus::InProgress,
        results: ImportResults {
            total_records: checked.rows.len(),
            ..ImportResults::default()
        },
        job: checked.job,
        rows: checked.rows,
        processed: 0,
        invalid_rows: Vec::new(),
        duplicate_rows: Vec::new(),
        opted_out_rows: Vec::new(),
        planned_end,
        ping_after: None,
    }
}

/// Runs import `id` to its end in the background, a batch of rows per tick; saves the
/// data when it ends. Stops (leaving it IN_PROGRESS, to resume on the next start) when
/// the sandbox shuts down.
pub(crate) async fn run(shared: Arc<Shared>, id: u64) {
    let mut seen = match shared.lock().store.imports.get(&id) {
        Some(import) => seen_so_far(import),
        None => return,
    };
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(shared.config.tick) => {}
        }
        let finished = {
            let mut state = shared.lock();
            process_some(
                &mut state.store,
                id,
                shared.config.records_per_tick,
                &mut seen,
            )
        };
        if finished {
            if let Some(import) = shared.lock().store.imports.get(&id) {
                tracing::info!(import = id, status = import.status.as_str(), results = ?import.results, "Poppulo sandbox import finished");
            }
            shared.save_logged();
            return;
        }
    }
}

/// The rejected rows of an import as the API's CSV: three sections, each a quoted
/// title line, the header of the submitted columns, then the rows as submitted.
pub(crate) fn rejected_csv(import: &Import) -> Result<String, csv::Error> {
    let sections = [
        ("Invalid Subscribers", &import.invalid_rows),
        ("Duplicate Subscribers", &import.duplicate_rows),
        ("Opted-out Subscribers", &import.opted_out_rows),
    ];
    let mut out = String::new();
    for (title, rows) in sections {
        out.push_str(&format!("\"{title}\"\r\n"));
        let mut writer = csv::WriterBuilder::new()
            .flexible(true)
            .terminator(csv::Terminator::CRLF)
            .from_writer(Vec::new());
        writer.write_record(&import.job.columns)?;
        for &index in rows.iter() {
            if let Some(row) = import.rows.get(index) {
                writer.write_record(row)?;
            }
        }
        let bytes = writer
            .into_inner()
            .map_err(|e| csv::Error::from(e.into_error()))?;
        out.push_str(&String::from_utf8_lossy(&bytes));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_lines_around_data_are_not_rows() {
        let body = "<subscriber_import_job><accept_terms>true</accept_terms><subscriber_data>\
                    <columns>email</columns><data><![CDATA[\na@example.com\r\nb@example.com\n]]></data>\
                    </subscriber_data></subscriber_import_job>";
        let root = super::super::xml::parse(body).map_err(|e| e.to_string());
        let rows = root.and_then(|r| check_job(&r, &CustomFields::Any).map_err(|e| e.to_string()));
        assert_eq!(
            rows.map(|c| c.rows),
            Ok(vec![
                vec!["a@example.com".to_string()],
                vec!["b@example.com".to_string()]
            ])
        );
    }

    #[test]
    fn names_resolve() {
        let any = CustomFields::Any;
        assert_eq!(
            resolve("position", &any),
            Ok(Target::Field("position_company"))
        );
        assert!(resolve("Email", &any).is_err());
        assert!(resolve("name.firstname", &any).is_err());
        assert_eq!(
            resolve("Department", &any),
            Ok(Target::Custom("Department".into()))
        );
        let declared = CustomFields::Declared(["Dept".to_string()].into());
        assert!(resolve("Department", &declared).is_err());
    }
}
