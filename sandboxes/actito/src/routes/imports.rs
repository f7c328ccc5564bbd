//! Bulk imports over HTTP: the multipart post (checked at once: parts, zip, parameters,
//! header), the daily quota, and following an import to its result and error file.

use std::io::{Cursor, Read, Write};

use axum::extract::multipart::{Multipart, MultipartRejection};

use super::*;
use crate::import::now;
use crate::model::{Import, ImportMode, ImportStatus};
use contactsync_sandbox_kit::Platform as _;

pub(super) fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

/// `POST /v4/entity/{e}/table/{t}/import`.
pub(super) async fn post_import(
    State(shared): State<Arc<Shared>>,
    Path((e, t)): Path<(String, String)>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    let used = match read_table(&shared, &e, &t, |t| t.bulk_days.get(&today()).copied()) {
        Ok(used) => used.unwrap_or(0),
        Err(r) => return r,
    };
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
pub(super) fn parse_import(
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
        // A column named after a subscription holds `Y` or `N` (Actito's import
        // documentation, "Structuring an Excel file to Import Profiles").
        if def.attribute(h).is_none() && !def.subscriptions.contains(h) {
            return Err(format!(
                "unknown column {h}: not an attribute or a subscription of the table"
            ));
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

pub(super) fn find_import(shared: &Shared, e: &str, id: &str) -> Result<Import, Response> {
    entity_ok(shared, e)?;
    id.trim()
        .parse::<u64>()
        .ok()
        .and_then(|id| shared.lock().store.imports.get(&id).cloned())
        .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("no import {id}")))
}

/// Import `id`, once it has finished; else the answer that it has not (or does not
/// exist).
fn finished_import(shared: &Shared, e: &str, id: &str) -> Result<Import, Response> {
    let import = find_import(shared, e, id)?;
    if import.status != ImportStatus::Finished {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("import {} has not finished", import.id),
        ));
    }
    Ok(import)
}

pub(super) fn status_name(s: ImportStatus) -> &'static str {
    match s {
        ImportStatus::Waiting => "WAITING",
        ImportStatus::Running => "RUNNING",
        ImportStatus::Finished => "FINISHED",
        ImportStatus::Error => "ERROR",
    }
}

/// `GET /v4/entity/{e}/import/{id}`.
pub(super) async fn status(
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
pub(super) async fn result(
    State(shared): State<Arc<Shared>>,
    Path((e, id)): Path<(String, String)>,
) -> Response {
    match finished_import(&shared, &e, &id) {
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
pub(super) async fn result_file(
    State(shared): State<Arc<Shared>>,
    Path((e, id)): Path<(String, String)>,
) -> Response {
    let import = match finished_import(&shared, &e, &id) {
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

pub(super) fn error_zip(import: &Import) -> Result<Vec<u8>, String> {
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
