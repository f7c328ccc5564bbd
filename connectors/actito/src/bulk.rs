//! Actito's bulk path: one mass import of a zipped CSV, followed to its end.
//!
//! Everything about *how* a bulk import is made lives behind [`BulkImporter`], so that
//! moving from v4 imports (`POST /v4/entity/{e}/table/{t}/import`) to v5 "ETL
//! executions" changes this file only. The sink decides *when* to import (threshold,
//! daily quota, one import at a time) and maps the outcome back to its changes.
//!
//! The wire, per the spec: `multipart/form-data` with the parts `inputFile` (a zip
//! holding one UTF-8, comma-separated CSV whose headers are attribute names) and
//! `parameters` (JSON: `format`, `charset`, `mode` = `CREATE_UPDATE`, `headerKeyColumn`
//! = the unique column). Then `GET /v4/entity/{e}/import/{id}` until it ends,
//! `…/result` for the counts, and `…/result-file` (a zip) for the rejected rows.
//!
//! The error file's layout is not published, so it is read liberally: any delimiter
//! of `,` `;` or tab; the row is found by the key column (by name), else by a line
//! number column; the reason is the first column whose name speaks of an error,
//! reason or message, else the last column.

use std::io::{Cursor, Read};

use contactsync_core::{CancellationToken, ConnectorError, Posted};
use contactsync_http::multipart::{self, Part};
use contactsync_http::{Method, RetryPolicy};
use serde_json::{json, Value};

use crate::client::{answer_error, error_text, id_text, parse_json, ActitoClient, Request};

/// The file name of the CSV inside the zip.
pub const CSV_NAME: &str = "profiles.csv";

/// The most attempts of an import POST answered 429: a licence whose five concurrent
/// slots other applications hold frees one within seconds, the day's quota never.
pub const CONCURRENT_429_ATTEMPTS: u32 = 8;

/// How an import ended, as far as Actito says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportState {
    /// Queued or running.
    Running(String),
    /// Finished (its rows may still have errors).
    Finished,
    /// Ended without importing (`ERROR`), with what Actito said.
    Failed(String, String),
}

/// One rejected row of an import's error file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRow {
    /// The key column's value, when the file has that column.
    pub key: Option<String>,
    /// The data row's number (1-based, header not counted), when the file says.
    pub line: Option<usize>,
    /// Why Actito rejected it.
    pub reason: String,
}

/// Makes and follows bulk imports into one profile table.
#[derive(Debug, Clone, Copy)]
pub struct BulkImporter<'a> {
    client: &'a ActitoClient,
}

impl<'a> BulkImporter<'a> {
    /// An importer through `client`.
    pub fn new(client: &'a ActitoClient) -> Self {
        BulkImporter { client }
    }

    /// The zipped CSV of `rows` under `columns`.
    pub fn zip_csv<R, C>(
        columns: &[String],
        rows: impl IntoIterator<Item = R>,
    ) -> Result<Vec<u8>, ConnectorError>
    where
        R: IntoIterator<Item = C>,
        C: AsRef<[u8]>,
    {
        let fail = |e: &dyn std::fmt::Display| {
            ConnectorError::Other(format!("cannot write the import file: {e}"))
        };
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zip.start_file(CSV_NAME, options).map_err(|e| fail(&e))?;
        {
            // The CSV is deflated as it is written: the file is never held whole.
            let mut writer = csv::WriterBuilder::new()
                .terminator(csv::Terminator::CRLF)
                .from_writer(&mut zip);
            writer.write_record(columns).map_err(|e| fail(&e))?;
            for row in rows {
                writer.write_record(row).map_err(|e| fail(&e))?;
            }
            writer.flush().map_err(|e| fail(&e))?;
        }
        Ok(zip.finish().map_err(|e| fail(&e))?.into_inner())
    }

    /// The `parameters` part.
    pub fn parameters(key_column: &str) -> Value {
        json!({
            "format": "COMMA_SEPARATED_VALUES",
            "charset": "UTF-8",
            "mode": "CREATE_UPDATE",
            "headerKeyColumn": key_column,
        })
    }

    /// `POST …/table/{t}/import`. Retried only on 429; never after a 5xx or a dropped
    /// connection (it may have been taken: a second post would spend another of the
    /// day's imports).
    ///
    /// A 429 says either "a sixth concurrent request" (other applications of the
    /// licence are busy: it passes) or "the day's 12 imports are used". The caller
    /// posts only while its own count of today's imports is under 12, so a 429 is first
    /// taken for the concurrent case and waited out: up to [`CONCURRENT_429_ATTEMPTS`]
    /// attempts, with the section's backoff, within its `max_retry_time`. Only a 429
    /// that outlasts that is [`Posted::Refused`]. A 5xx or a lost answer is
    /// [`Posted::Unknown`]: Actito may have taken the import or not; it is not posted
    /// again, and it counts against the day's imports.
    pub async fn post(
        &self,
        zip: Vec<u8>,
        key_column: &str,
        cancel: &CancellationToken,
    ) -> Result<Posted, ConnectorError> {
        let (content_type, body) = multipart::form(vec![
            Part::file("inputFile", "profiles.zip", "application/zip", zip),
            Part::text(
                "parameters",
                "application/json",
                Self::parameters(key_column).to_string(),
            ),
        ])
        .await?;
        let mut request = Request::new(Method::POST, self.client.table_path(&["import"]));
        request.body = Some((content_type, body));
        let policy = self.client.retry_policy();
        request.retry = Some(RetryPolicy {
            max_attempts: policy.max_attempts.max(CONCURRENT_429_ATTEMPTS),
            retry_transport_errors: false,
            ..policy.clone()
        });
        request.not_idempotent = true;
        let answer = match self.client.send(&request, Some(cancel)).await {
            Ok(a) => a,
            // Retries ran out on 429s.
            Err(ConnectorError::Call {
                status: Some(429),
                message,
                ..
            }) => return Ok(Posted::Refused(message)),
            // The post itself lost its answer (the token call is a GET).
            Err(ConnectorError::Call {
                call,
                status: None,
                message,
            }) if call.starts_with("POST ") => {
                return Ok(Posted::Unknown(format!("{call}: {message}")))
            }
            Err(e) => return Err(e),
        };
        match answer.status().as_u16() {
            200..=299 => {
                let from_body = serde_json::from_slice::<Value>(answer.body())
                    .ok()
                    .and_then(|v| v.get("id").or_else(|| v.get("importId")).map(id_text));
                let from_location = answer
                    .header("location")
                    .and_then(|l| l.trim_end_matches('/').rsplit('/').next())
                    .map(str::to_string);
                from_body
                    .or(from_location)
                    .map(Posted::Accepted)
                    .ok_or_else(|| ConnectorError::Protocol {
                        call: answer.call().to_string(),
                        message: "the import was accepted without an id".into(),
                    })
            }
            429 => Ok(Posted::Refused(error_text(&answer))),
            500..=599 => Ok(Posted::Unknown(format!(
                "{} answered {}: {}",
                answer.call(),
                answer.status().as_u16(),
                error_text(&answer)
            ))),
            _ => Err(answer_error(&answer)),
        }
    }

    /// `GET /v4/entity/{e}/import/{id}`.
    pub async fn state(
        &self,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<ImportState, ConnectorError> {
        let request = Request::new(Method::GET, self.client.import_path(id, &[]));
        let (_, json) = self.client.send_json(&request, Some(cancel)).await?;
        let status = ["status", "state", "importStatus", "executionStatus"]
            .iter()
            .find_map(|k| json.get(*k).and_then(Value::as_str))
            .unwrap_or("")
            .to_ascii_uppercase();
        Ok(match status.as_str() {
            "FINISHED" | "DONE" | "SUCCESS" | "SUCCEEDED" | "COMPLETED" | "ENDED" => {
                ImportState::Finished
            }
            "ERROR" | "FAILED" | "FAILURE" | "CANCELLED" | "CANCELED" | "ABORTED" => {
                let message = json
                    .get("message")
                    .or_else(|| json.get("errorMessage"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                ImportState::Failed(status, message)
            }
            _ => ImportState::Running(status),
        })
    }

    /// The rejected rows of a finished import: none when `…/result` says there are
    /// none, else those of `…/result-file`.
    pub async fn rejected_rows(
        &self,
        id: &str,
        key_column: &str,
        cancel: &CancellationToken,
    ) -> Result<Vec<RejectedRow>, ConnectorError> {
        let request = Request::new(Method::GET, self.client.import_path(id, &["result"]));
        let (_, result) = self.client.send_json(&request, Some(cancel)).await?;
        let with_errors = match result.get("withErrors") {
            Some(Value::Bool(b)) => *b,
            _ => result
                .get("rowsInError")
                .and_then(Value::as_u64)
                .is_none_or(|n| n > 0),
        };
        if !with_errors {
            return Ok(Vec::new());
        }
        let mut request = Request::new(Method::GET, self.client.import_path(id, &["result-file"]));
        request.accept = "application/zip, application/octet-stream;q=0.9, */*;q=0.5";
        let answer = self.client.send_ok(&request, Some(cancel)).await?;
        let call = answer.call().to_string();
        let csv = unzip_first(answer.body()).map_err(|m| ConnectorError::Protocol {
            call: call.clone(),
            message: m,
        })?;
        parse_error_file(&csv, key_column)
            .map_err(|m| ConnectorError::Protocol { call, message: m })
    }

    /// The JSON of `…/result`, for logs.
    pub async fn result(&self, id: &str) -> Result<Value, ConnectorError> {
        let request = Request::new(Method::GET, self.client.import_path(id, &["result"]));
        let answer = self.client.send_ok(&request, None).await?;
        parse_json(&answer)
    }
}

/// The first file of a zip, as text.
pub fn unzip_first(data: &[u8]) -> Result<String, String> {
    let mut archive =
        zip::ZipArchive::new(Cursor::new(data)).map_err(|e| format!("not a zip file: {e}"))?;
    for i in 0..archive.len() {
        let mut file = archive
            .by_index(i)
            .map_err(|e| format!("unreadable zip entry: {e}"))?;
        if file.is_dir() {
            continue;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| format!("unreadable zip entry: {e}"))?;
        let text = String::from_utf8_lossy(&bytes);
        return Ok(text.trim_start_matches('\u{feff}').to_string());
    }
    Err("an empty zip file".into())
}

/// Reads an import's error file (see the module doc).
pub fn parse_error_file(text: &str, key_column: &str) -> Result<Vec<RejectedRow>, String> {
    let first = text.lines().next().unwrap_or("");
    let delimiter = [b',', b';', b'\t']
        .into_iter()
        .max_by_key(|d| first.bytes().filter(|b| b == d).count())
        .unwrap_or(b',');
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| format!("unreadable error file: {e}"))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let find = |pred: &dyn Fn(&str) -> bool| headers.iter().position(|h| pred(&h.to_lowercase()));
    let key_index = headers
        .iter()
        .position(|h| h.eq_ignore_ascii_case(key_column));
    let line_index = find(&|h| {
        matches!(
            h,
            "line" | "row" | "linenumber" | "rownumber" | "line_number" | "row_number"
        )
    });
    let reason_index = find(&|h| {
        h.contains("error") || h.contains("reason") || h.contains("message") || h.contains("cause")
    })
    .or_else(|| headers.len().checked_sub(1));
    if key_index.is_none() && line_index.is_none() {
        return Err(format!(
            "the error file has neither the key column `{key_column}` nor a line number"
        ));
    }
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| format!("unreadable error file: {e}"))?;
        let cell = |i: Option<usize>| i.and_then(|i| record.get(i)).map(str::trim);
        rows.push(RejectedRow {
            key: cell(key_index)
                .filter(|v| !v.is_empty())
                .map(str::to_string),
            line: cell(line_index).and_then(|v| v.parse().ok()),
            reason: cell(reason_index)
                .filter(|v| !v.is_empty())
                .unwrap_or("rejected by the Actito import (no reason given)")
                .to_string(),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zip_round_trip_and_error_file_reading() {
        let zip = BulkImporter::zip_csv(
            &["emailAddress".into(), "firstName".into()],
            [vec!["a@b.org", "Ann, \"A\""]],
        )
        .expect("zip");
        let text = unzip_first(&zip).expect("unzip");
        assert!(text.starts_with("emailAddress,firstName\r\n"));
        assert!(text.contains("\"Ann, \"\"A\"\"\""));

        let rows = parse_error_file(
            "emailAddress;firstName;errorMessage\nx@y.org;X;bad value\n",
            "EMAILADDRESS",
        )
        .expect("rows");
        assert_eq!(rows[0].key.as_deref(), Some("x@y.org"));
        assert_eq!(rows[0].reason, "bad value");
        assert!(parse_error_file("a,b\n1,2\n", "key").is_err());
    }
}
