//! Subscriber import jobs over HTTP: post one, follow it, read its rejected rows.

use super::*;
use contactsync_sandbox_kit::Platform as _;

pub(super) fn whole_seconds(interval: Duration) -> bool {
    interval.subsec_nanos() == 0
}

/// The next welcome poll time, rounded up to what is printed, so that a client that
/// waits until the printed time is never early.
pub(super) fn next_ping(now: DateTime<Utc>, interval: Duration) -> DateTime<Utc> {
    let due = now + chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::seconds(1));
    let rounded = if whole_seconds(interval) {
        due.trunc_subsecs(0)
    } else {
        due.trunc_subsecs(3)
    };
    if rounded < due {
        rounded
            + if whole_seconds(interval) {
                chrono::Duration::seconds(1)
            } else {
                chrono::Duration::milliseconds(1)
            }
    } else {
        rounded
    }
}

pub(super) async fn post_import(
    State(shared): SharedState,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let root = match xml_body(&headers, &body) {
        Ok(root) => root,
        Err(error) => return error.into_response(),
    };
    let checked = match import::check_job(&root, &shared.config.custom_fields) {
        Ok(checked) => checked,
        Err(JobError::Malformed(message)) => {
            return error_response(StatusCode::BAD_REQUEST, &message)
        }
        Err(JobError::Invalid(message)) => return error_response(StatusCode::CONFLICT, &message),
    };
    let id = {
        let mut state = shared.lock();
        let busy = state
            .busy_until
            .is_some_and(|until| std::time::Instant::now() < until)
            || state
                .store
                .imports
                .values()
                .any(|i| i.status == ImportStatus::InProgress);
        if busy {
            state.stats.imports_refused_busy += 1;
            drop(state);
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "an import is in progress in this account; concurrent imports in the same account are not supported",
            );
        }
        let planned_end = if state.faults.fail_next_import {
            state.faults.fail_next_import = false;
            Some(PlannedEnd::Error)
        } else {
            state
                .faults
                .cancel_next_import_after
                .take()
                .map(PlannedEnd::CancelledAfter)
        };
        let id = state.store.next_import_id();
        state
            .store
            .imports
            .insert(id, import::new_import(id, checked, planned_end));
        state.stats.imports_posted += 1;
        id
    };
    shared.save_logged();
    tokio::spawn(import::run(shared.clone(), id));
    let href = format!("{}/subscriber_import/{id}", account_url(&headers, &shared));
    xml_ok(
        StatusCode::ACCEPTED,
        status_entity(StatusCode::ACCEPTED, &[&href], &[], &[]),
    )
}

pub(super) async fn get_import(
    State(shared): SharedState,
    headers: HeaderMap,
    Path((_, id)): Path<(String, String)>,
) -> Response {
    let millis = !whole_seconds(shared.config.ping_interval);
    let base = account_url(&headers, &shared);
    let mut state = shared.lock();
    let Some(import) = state.store.import_mut(&id) else {
        return error_response(StatusCode::NOT_FOUND, "no such subscriber import");
    };
    let now = Utc::now();
    if let Some(ping_after) = import.ping_after.filter(|p| now < *p) {
        let wait = (ping_after - now).num_milliseconds().max(0) as u64;
        state.stats.early_polls += 1;
        state.stats.throttled += 1;
        drop(state);
        return throttled(
            wait.div_ceil(1000).max(1),
            &format!(
                "polled before ping_after ({})",
                format_date(ping_after, millis)
            ),
        );
    }
    import.ping_after = (import.status == ImportStatus::InProgress)
        .then(|| next_ping(now, shared.config.ping_interval));
    let body = import_xml(import, &base, millis);
    state.stats.import_polls += 1;
    xml_ok(StatusCode::OK, body)
}

pub(super) fn import_xml(import: &Import, base: &str, millis: bool) -> String {
    let uri = format!("{base}/subscriber_import/{}", import.id);
    let created = format_date(import.created, false);
    let mut w = XmlWriter::new();
    w.open(
        "subscriber_import",
        &[
            ("created", &created),
            ("status", import.status.as_str()),
            ("uri", &uri),
        ],
    );
    let results = &import.results;
    if import.status == ImportStatus::InProgress {
        w.open("progress", &[])
            .text("total_records", &results.total_records.to_string())
            .text("records_processed", &import.processed.to_string());
        if let Some(ping_after) = import.ping_after {
            w.text("ping_after", &format_date(ping_after, millis));
        }
        w.close("progress");
    } else {
        let href = format!("{uri}/invalid_subscribers");
        w.open("results", &[])
            .number("total_records", results.total_records)
            .number("new_subscribers", results.new_subscribers)
            .number("updated_subscribers", results.updated_subscribers)
            .number("invalid_subscribers", results.invalid_subscribers)
            .number("duplicate_subscribers", results.duplicate_subscribers)
            .number("previously_opted_out", results.previously_opted_out)
            .empty("link", &[("rel", REL_INVALID), ("href", &href)])
            .close("results");
    }
    let job = &import.job;
    let flag = |b: bool| if b { "true" } else { "false" };
    w.open("specification", &[])
        .text("accept_terms", flag(job.accept_terms))
        .text("update_existing", flag(job.update_existing))
        .text("reactivate_api_removed", flag(job.reactivate_api_removed))
        .text(
            "reactivate_admin_removed",
            flag(job.reactivate_admin_removed),
        )
        .text(
            "reactivate_bounced_removed",
            flag(job.reactivate_bounced_removed),
        );
    if !job.set_fields.is_empty() {
        w.open("set_fields", &[]);
        for (name, value) in &job.set_fields {
            w.text_with("set_field", &[("name", name)], value);
        }
        w.close("set_fields");
    }
    for (list, item, names) in [
        ("add_permissions", "permission", &job.add_permissions),
        ("remove_permissions", "permission", &job.remove_permissions),
        ("tags", "tag", &job.tags),
    ] {
        if !names.is_empty() {
            w.open(list, &[]);
            for name in names {
                w.empty(item, &[("name", name)]);
            }
            w.close(list);
        }
    }
    w.open("subscriber_data", &[])
        .text("columns", &job.columns.join(","))
        .text("skip_first_line", flag(job.skip_first_line))
        .text("field_separator", job.field_separator.as_str())
        .close("subscriber_data")
        .close("specification")
        .close("subscriber_import");
    w.finish()
}

pub(super) async fn get_rejected(
    State(shared): SharedState,
    Path((_, id)): Path<(String, String)>,
) -> Response {
    let csv = {
        let state = shared.lock();
        let Some(import) = state.store.import(&id) else {
            return error_response(StatusCode::NOT_FOUND, "no such subscriber import");
        };
        import::rejected_csv(import)
    };
    match csv {
        Ok(csv) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/csv; charset=UTF-8")],
            csv,
        )
            .into_response(),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot write CSV: {e}"),
        ),
    }
}
