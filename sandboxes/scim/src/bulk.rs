//! `POST /Bulk` (RFC 7644 §3.7): operations in order, each answered with its own
//! status; `bulkId:` references to resources created earlier in the request resolved
//! in paths and data; a request beyond `maxOperations` or `maxPayloadSize` is 413.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use crate::model::ScimError;
use crate::{dispatch, scim, Platform, Shared};

fn refused(e: &ScimError) -> Response {
    scim(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
        e.body(),
    )
}

/// Answers a BulkRequest.
pub(crate) async fn handle(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    if shared.faults().bulk_unsupported {
        return refused(&ScimError::plain(
            501,
            "Bulk is not supported by this server",
        ));
    }
    let limits = (
        &shared.config.bulk_max_operations,
        &shared.config.bulk_max_payload,
    );
    if body.len() > *limits.1 {
        return refused(&ScimError::plain(
            413,
            format!(
                "the request is {} bytes; maxPayloadSize is {}",
                body.len(),
                limits.1
            ),
        ));
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return refused(&ScimError::typed(
                400,
                "invalidSyntax",
                format!("not JSON: {e}"),
            ))
        }
    };
    let Some(operations) = request.get("Operations").and_then(Value::as_array) else {
        return refused(&ScimError::typed(
            400,
            "invalidSyntax",
            "a BulkRequest needs `Operations`",
        ));
    };
    if operations.len() > *limits.0 {
        return refused(&ScimError::plain(
            413,
            format!(
                "{} operations; maxOperations is {}",
                operations.len(),
                limits.0
            ),
        ));
    }
    let fail_on_errors = request
        .get("failOnErrors")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let mut created: HashMap<String, String> = HashMap::new();
    let mut errors = 0;
    let mut answers = Vec::new();
    for op in operations {
        let method = op.get("method").and_then(Value::as_str).unwrap_or_default();
        let bulk_id = op.get("bulkId").and_then(Value::as_str);
        let path = op.get("path").and_then(Value::as_str).unwrap_or_default();
        let version = op.get("version").and_then(Value::as_str);
        let (status, answer) = match (
            Method::from_bytes(method.to_ascii_uppercase().as_bytes()),
            resolve_text(path, &created),
        ) {
            (Ok(m), Ok(path)) => {
                let data = op.get("data").map(|d| resolve(d, &created));
                match data.transpose() {
                    Ok(data) => dispatch(&shared, &m, &path, data.as_ref(), version),
                    Err(e) => crate::failed(&e),
                }
            }
            (Err(_), _) => crate::failed(&ScimError::typed(
                400,
                "invalidSyntax",
                format!("unknown method {method:?}"),
            )),
            (_, Err(e)) => crate::failed(&e),
        };
        let mut entry = json!({ "method": method, "status": status.as_u16().to_string() });
        if let Some(b) = bulk_id {
            entry["bulkId"] = Value::String(b.into());
        }
        if status.is_success() {
            if let Some(location) = answer.pointer("/meta/location").and_then(Value::as_str) {
                entry["location"] = Value::String(location.into());
            }
            if let Some(v) = answer.pointer("/meta/version") {
                entry["version"] = v.clone();
            }
            if let (Some(b), Some(id)) = (bulk_id, answer.get("id").and_then(Value::as_str)) {
                created.insert(b.to_string(), id.to_string());
            }
        } else {
            entry["response"] = answer;
            errors += 1;
        }
        answers.push(entry);
        if errors >= fail_on_errors {
            break;
        }
    }
    scim(
        StatusCode::OK,
        json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkResponse"],
            "Operations": answers
        }),
    )
}

/// `text` with each `bulkId:ID` replaced by the id that operation created.
fn resolve_text(text: &str, created: &HashMap<String, String>) -> Result<String, ScimError> {
    let Some(at) = text.find("bulkId:") else {
        return Ok(text.to_string());
    };
    let reference = &text[at + "bulkId:".len()..];
    let end = reference.find('/').unwrap_or(reference.len());
    let id = created.get(&reference[..end]).ok_or_else(|| {
        ScimError::typed(
            409,
            "invalidValue",
            format!("bulkId {} names no created resource", &reference[..end]),
        )
    })?;
    Ok(format!("{}{id}{}", &text[..at], &reference[end..]))
}

fn resolve(value: &Value, created: &HashMap<String, String>) -> Result<Value, ScimError> {
    Ok(match value {
        Value::String(s) => Value::String(resolve_text(s, created)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| resolve(v, created))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), resolve(v, created)?)))
                .collect::<Result<_, ScimError>>()?,
        ),
        other => other.clone(),
    })
}
