//! Bulk imports: the multipart post (checked at once: parts, zip, parameters, header),
//! the daily quota, and the single FIFO worker that processes imports one after
//! another, as Actito does.

// The error side of these helpers *is* the HTTP answer, handed straight back by
// the handler; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::io::{Cursor, Read, Write};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::model::{Import, ImportMode, ImportStatus, ProfileInput};
use super::routes::{entity_ok, error, table_ok};
use super::Shared;

/// Now, as the sandbox stamps profiles and imports (`YYYY-MM-DD HH:MM:SS`, UTC).
pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string()
}

fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

/// `POST /v4/entity/{e}/table/{t}/import`.
pub async fn post_import(
    State(shared): State<Arc<Shared>>,
    Path((e, t)): Path<(String, String)>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    if let Err(r) = table_ok(&shared, &e, &t) {
        return r;
    }
    let used = shared
        .lock()
        .store
        .tables
        .get(&t)
        .and_then(|t| t.bulk_days.get(&today()).copied())
        .unwrap_or(0);
    if used >= shared.config.bulk_per_day {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "the limit of {} bulk imports per table per day is reached",
                shared.config.bulk_per_day
            ),
        );
    }
    let mut multipart = match multipart {
        Ok(m) => m,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected multipart/form-data: {e}"),
            )
        }
    };
    let mut file: Option<Bytes> = None;
    let mut parameters: Option<Bytes> = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unreadable multipart body (the zip may be over {} bytes): {e}",
                        shared.config.max_zip_bytes
                    ),
                )
            }
        };
        let name = field.name().unwrap_or("").to_string();
        let data = match field.bytes().await {
            Ok(d) => d,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unreadable part {name} (the zip may be over {} bytes): {e}",
                        shared.config.max_zip_bytes
                    ),
                )
            }
        };
        match name.as_str() {
            "inputFile" => file = Some(data),
            "parameters" => parameters = Some(data),
            _ => {}
        }
    }
    let (Some(file), Some(parameters)) = (file, parameters) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the parts `inputFile` and `parameters` are required",
        );
    };
    if file.len() > shared.config.max_zip_bytes {
        return error(
            StatusCode::BAD_REQUEST,
            format!("the file is over {} bytes", shared.config.max_zip_bytes),
        );
    }
    let import = match parse_import(&shared, &t, &file, &parameters) {
        Ok(i) => i,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let id = {
        let mut state = shared.lock();
        if let Some(table) = state.store.tables.get_mut(&t) {
            *table.bulk_days.entry(today()).or_insert(0) += 1;
        }
        let id = state.store.next_import_id;
        state.store.next_import_id += 1;
        state.stats.imports_posted += 1;
        state.store.imports.insert(id, Import { id, ..import });
        id
    };
    shared.save_logged();
    if shared.queue.send(id).is_err() {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the import worker has stopped",
        );
    }
    (StatusCode::OK, Json(json!({"id": id}))).into_response()
}

/// Checks parameters, zip and header; the rows are processed later.
fn parse_import(
    shared: &Shared,
    table: &str,
    zip: &[u8],
    parameters: &[u8],
) -> Result<Import, String> {
    let params: Value =
        serde_json::from_slice(parameters).map_err(|e| format!("`parameters` is not JSON: {e}"))?;
    let field = |k: &str| params.get(k).and_then(Value::as_str);
    let delimiter = match field("format") {
        Some("COMMA_SEPARATED_VALUES") => b',',
        Some("TAB_SEPARATED_VALUES") => b'\t',
        Some("SEMI_COLON_SEPARATED_VALUES") => b';',
        other => return Err(format!("unknown or missing format {other:?}")),
    };
    match field("charset") {
        Some(c) if c.eq_ignore_ascii_case("UTF-8") => {}
        other => {
            return Err(format!(
                "unsupported or missing charset {other:?} (UTF-8 only)"
            ))
        }
    }
    let mode = match field("mode") {
        Some("CREATE_ONLY") => ImportMode::CreateOnly,
        Some("UPDATE_ONLY") => ImportMode::UpdateOnly,
        Some("CREATE_UPDATE") => ImportMode::CreateUpdate,
        other => return Err(format!("unknown or missing mode {other:?}")),
    };
    let key_column = field("headerKeyColumn").map(str::to_string);
    let mut archive = zip::ZipArchive::new(Cursor::new(zip))
        .map_err(|e| format!("`inputFile` is not a zip: {e}"))?;
    let files: Vec<usize> = (0..archive.len())
        .filter(|i| archive.by_index(*i).map(|f| !f.is_dir()).unwrap_or(true))
        .collect();
    if files.len() != 1 {
        return Err(format!(
            "the zip must hold exactly one file, it holds {}",
            files.len()
        ));
    }
    let mut bytes = Vec::new();
    archive
        .by_index(files[0])
        .map_err(|e| format!("unreadable zip entry: {e}"))?
        .read_to_end(&mut bytes)
        .map_err(|e| format!("unreadable zip entry: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|_| "the file is not UTF-8".to_string())?;
    let text = text.trim_start_matches('\u{feff}');
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| format!("unreadable header: {e}"))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let state = shared.lock();
    let def = &state.store.tables.get(table).ok_or("no table")?.def;
    for h in &header {
        if def.attribute(h).is_none() {
            return Err(format!("unknown column {h}: not an attribute of the table"));
        }
    }
    match (&key_column, mode) {
        (Some(k), _) => {
            if !header.contains(k) {
                return Err(format!("headerKeyColumn {k} is not a column of the file"));
            }
            if !def.attribute(k).is_some_and(|a| a.unique) {
                return Err(format!("headerKeyColumn {k} is not a unique attribute"));
            }
        }
        (None, ImportMode::CreateOnly) => {}
        (None, _) => return Err("headerKeyColumn is required to update".into()),
    }
    drop(state);
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| format!("unreadable CSV: {e}"))?;
        rows.push(record.iter().map(str::to_string).collect());
    }
    Ok(Import {
        id: 0,
        table: table.to_string(),
        mode,
        key_column,
        delimiter,
        status: ImportStatus::Waiting,
        header,
        rows,
        errors: Vec::new(),
        created: 0,
        updated: 0,
        posted: now(),
    })
}

/// The one worker: imports run one after another, in the order posted.
pub async fn worker(shared: Arc<Shared>, mut queue: tokio::sync::mpsc::UnboundedReceiver<u64>) {
    loop {
        let id = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            id = queue.recv() => match id { Some(id) => id, None => return },
        };
        if let Some(i) = shared.lock().store.imports.get_mut(&id) {
            i.status = ImportStatus::Running;
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(shared.config.import_delay) => {}
        }
        process(&shared, id);
        shared.save_logged();
    }
}

fn process(shared: &Shared, id: u64) {
    let stamp = now();
    let mut state = shared.lock();
    let store = &mut state.store;
    let Some(mut import) = store.imports.get(&id).cloned() else {
        return;
    };
    let Some(table) = store.tables.get_mut(&import.table) else {
        if let Some(i) = store.imports.get_mut(&id) {
            i.status = ImportStatus::Error;
        }
        return;
    };
    let mut next = store.next_profile_id;
    let (create, update) = match import.mode {
        ImportMode::CreateOnly => (true, false),
        ImportMode::UpdateOnly => (false, true),
        ImportMode::CreateUpdate => (true, true),
    };
    for row in &import.rows {
        if row.len() != import.header.len() {
            import.errors.push((
                row.clone(),
                format!("{} values for {} columns", row.len(), import.header.len()),
            ));
            continue;
        }
        if let Some(k) = &import.key_column {
            let idx = import.header.iter().position(|h| h == k);
            if idx
                .and_then(|i| row.get(i))
                .is_none_or(|v| v.trim().is_empty())
            {
                import
                    .errors
                    .push((row.clone(), format!("no value for the key column {k}")));
                continue;
            }
        }
        let input = ProfileInput {
            attributes: import
                .header
                .iter()
                .zip(row)
                .map(|(h, v)| (h.clone(), (!v.is_empty()).then(|| v.clone())))
                .collect(),
            ..ProfileInput::default()
        };
        match table.write(&input, create, update, &mut next, &stamp) {
            Ok((_, true)) => import.created += 1,
            Ok((_, false)) => import.updated += 1,
            Err(reason) => import.errors.push((row.clone(), reason)),
        }
    }
    store.next_profile_id = next;
    import.status = ImportStatus::Finished;
    store.imports.insert(id, import);
}

fn find_import(shared: &Shared, e: &str, id: &str) -> Result<Import, Response> {
    entity_ok(shared, e)?;
    id.trim()
        .parse::<u64>()
        .ok()
        .and_then(|id| shared.lock().store.imports.get(&id).cloned())
        .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("no import {id}")))
}

fn status_name(s: ImportStatus) -> &'static str {
    match s {
        ImportStatus::Waiting => "WAITING",
        ImportStatus::Running => "RUNNING",
        ImportStatus::Finished => "FINISHED",
        ImportStatus::Error => "ERROR",
    }
}

/// `GET /v4/entity/{e}/import/{id}`.
pub async fn status(
    State(shared): State<Arc<Shared>>,
    Path((e, id)): Path<(String, String)>,
) -> Response {
    match find_import(&shared, &e, &id) {
        Ok(i) => Json(json!({
            "id": i.id,
            "status": status_name(i.status),
            "table": i.table,
            "creationMoment": i.posted,
            "totalRows": i.rows.len(),
        }))
        .into_response(),
        Err(r) => r,
    }
}

/// `GET /v4/entity/{e}/import/{id}/result`.
pub async fn result(
    State(shared): State<Arc<Shared>>,
    Path((e, id)): Path<(String, String)>,
) -> Response {
    match find_import(&shared, &e, &id) {
        Ok(i) if i.status != ImportStatus::Finished => error(
            StatusCode::BAD_REQUEST,
            format!("import {} has not finished", i.id),
        ),
        Ok(i) => Json(json!({
            "withErrors": !i.errors.is_empty(),
            "rowsInError": i.errors.len(),
            "totalRows": i.rows.len(),
            "createdProfiles": i.created,
            "updatedProfiles": i.updated,
        }))
        .into_response(),
        Err(r) => r,
    }
}

/// `GET /v4/entity/{e}/import/{id}/result-file`: a zip of the rejected rows.
pub async fn result_file(
    State(shared): State<Arc<Shared>>,
    Path((e, id)): Path<(String, String)>,
) -> Response {
    let import = match find_import(&shared, &e, &id) {
        Ok(i) if i.status != ImportStatus::Finished => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("import {} has not finished", i.id),
            )
        }
        Ok(i) => i,
        Err(r) => return r,
    };
    match error_zip(&import) {
        Ok(bytes) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/zip"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"errors.zip\"",
                ),
            ],
            bytes,
        )
            .into_response(),
        Err(m) => error(StatusCode::INTERNAL_SERVER_ERROR, m),
    }
}

fn error_zip(import: &Import) -> Result<Vec<u8>, String> {
    let mut writer = csv::WriterBuilder::new()
        .delimiter(import.delimiter)
        .from_writer(Vec::new());
    let mut header = import.header.clone();
    header.push("errorMessage".into());
    writer.write_record(&header).map_err(|e| e.to_string())?;
    for (row, reason) in &import.errors {
        let mut record = row.clone();
        record.resize(import.header.len(), String::new());
        record.push(reason.clone());
        writer.write_record(&record).map_err(|e| e.to_string())?;
    }
    let data = writer.into_inner().map_err(|e| e.to_string())?;
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    zip.start_file("errors.csv", zip::write::SimpleFileOptions::default())
        .map_err(|e| e.to_string())?;
    zip.write_all(&data).map_err(|e| e.to_string())?;
    Ok(zip.finish().map_err(|e| e.to_string())?.into_inner())
}
