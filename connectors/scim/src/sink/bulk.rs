//! Writing a batch's steps in `/Bulk` requests (RFC 7644 §3.7), each within the
//! server's `maxOperations` and `maxPayloadSize`.

use contactsync_core::{ChangeBatch, ConnectorError, Outcome};
use serde_json::{json, Value};

use super::{
    applied, located, patch_data, refused, unknown, Prepared, ScimSink, Step, Tally, UserWrite,
};
use crate::client::{bulk_body, BulkAnswer, BulkLimits};

/// Room kept in a request below `maxPayloadSize` for what the count of bytes here
/// does not see (the server's own measure, a proxy's headers).
const PAYLOAD_MARGIN: usize = 1024;

/// What a bulk answer leaves to do one by one.
enum FollowUp {
    /// A create answered 409: look the user up and adopt them.
    Converge(String),
    /// An update of a user the app no longer has: create them.
    Recreate,
    /// A PUT answered 412: write it again on its own (which reads the user again).
    Again,
}

impl ScimSink {
    /// The bulk operation for a step; `None` for a step with nothing to write.
    fn operation(&self, index: usize, step: &Step) -> Option<Value> {
        Some(match step {
            Step::Done(_) => return None,
            Step::Create(body) => json!({
                "method": "POST", "bulkId": format!("c{index}"), "path": "/Users", "data": body
            }),
            Step::Write { id, write, .. } => {
                let path = format!("/Users/{id}");
                match write {
                    UserWrite::Patch(ops) => {
                        json!({ "method": "PATCH", "path": path, "data": patch_data(ops) })
                    }
                    UserWrite::Delete => json!({ "method": "DELETE", "path": path }),
                    UserWrite::Put { user, etag, .. } => {
                        let mut body = user.clone();
                        body.remove("meta");
                        body.remove("groups");
                        let mut op = json!({ "method": "PUT", "path": path, "data": body });
                        if let Some(v) = etag.as_deref().filter(|_| self.provider().etag) {
                            op["version"] = Value::String(v.to_string());
                        }
                        op
                    }
                }
            }
        })
    }

    /// Writes the steps in bulk requests; one outcome a change, and whether a create
    /// adopted a user.
    pub(super) async fn write_in_bulk(
        &self,
        batch: &ChangeBatch,
        prepared: &[Prepared],
        limits: BulkLimits,
    ) -> Result<Vec<(Outcome, bool)>, ConnectorError> {
        let mut results: Vec<Option<(Outcome, bool)>> = prepared
            .iter()
            .map(|p| match &p.step {
                Step::Done(o) => Some((o.clone(), false)),
                _ => None,
            })
            .collect();
        let envelope = bulk_body(&[]).to_string().len() + PAYLOAD_MARGIN;
        let mut chunks: Vec<Vec<(usize, Value, usize)>> = Vec::new();
        let mut current: Vec<(usize, Value, usize)> = Vec::new();
        let mut size = envelope;
        let mut alone = Vec::new();
        for (i, p) in prepared.iter().enumerate() {
            let Some(op) = self.operation(i, &p.step) else {
                continue;
            };
            let len = op.to_string().len() + 1;
            if envelope + len > limits.max_payload {
                // Too large for any request: its own call has no such limit.
                alone.push(i);
                continue;
            }
            if !current.is_empty()
                && (current.len() >= limits.max_operations || size + len > limits.max_payload)
            {
                chunks.push(std::mem::take(&mut current));
                size = envelope;
            }
            size += len;
            current.push((i, op, len));
        }
        if !current.is_empty() {
            chunks.push(current);
        }
        let mut follow_ups = Vec::new();
        for chunk in chunks {
            let ops: Vec<Value> = chunk.iter().map(|(_, op, _)| op.clone()).collect();
            Tally::add(&self.tally.bulk_requests, 1);
            let answers = match self.client.bulk(&ops).await {
                Ok(answers) => answers,
                Err(e @ (ConnectorError::Auth { .. } | ConnectorError::Cancelled)) => {
                    return Err(e)
                }
                Err(e) => {
                    // Whether any of it happened is unknown: sent again next run, where
                    // each create looks its user up first.
                    for (i, _, _) in &chunk {
                        results[*i] = Some((unknown(e.to_string()), false));
                    }
                    continue;
                }
            };
            for (position, (i, op, _)) in chunk.iter().enumerate() {
                let bulk_id = op.get("bulkId").and_then(Value::as_str);
                let answer = answers
                    .iter()
                    .find(|a| bulk_id.is_some() && a.bulk_id.as_deref() == bulk_id)
                    .or_else(|| {
                        answers
                            .get(position)
                            .filter(|a| a.bulk_id.is_none() || a.bulk_id.as_deref() == bulk_id)
                    });
                match answer {
                    None => {
                        results[*i] = Some((
                            unknown("the bulk response did not answer this operation"),
                            false,
                        ))
                    }
                    Some(a) => match outcome(&prepared[*i].step, a) {
                        Ok(o) => results[*i] = Some((o, false)),
                        Err(follow) => follow_ups.push((*i, follow)),
                    },
                }
            }
        }
        for i in alone {
            follow_ups.push((i, FollowUp::Again));
        }
        for (i, follow) in follow_ups {
            let contact = batch.changes[i].contact();
            let step = &prepared[i].step;
            let done = match (follow, step) {
                (FollowUp::Converge(why), _) => self.converge(contact, &why).await,
                (
                    FollowUp::Recreate,
                    Step::Write {
                        recreate: Some(body),
                        ..
                    },
                ) => self.create(body, contact).await,
                (_, step) => self.execute(step, contact).await,
            };
            results[i] = Some(match done {
                Ok(done) => done,
                Err(e @ (ConnectorError::Auth { .. } | ConnectorError::Cancelled)) => {
                    return Err(e)
                }
                Err(e) => (unknown(e.to_string()), false),
            });
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| (unknown("not written"), false)))
            .collect())
    }
}

/// The outcome of one bulk answer for `step`, or what is left to do one by one.
fn outcome(step: &Step, answer: &BulkAnswer) -> Result<Outcome, FollowUp> {
    let fault = || {
        answer
            .fault
            .clone()
            .unwrap_or_else(|| crate::client::ScimFault {
                status: answer.status,
                scim_type: None,
                detail: format!("operation answered {}", answer.status),
            })
    };
    match (step, answer.status) {
        (Step::Create(_), 200..=299) => Ok(match located(answer.location.as_deref()) {
            Some(id) => applied(&id),
            None => Outcome::applied(),
        }),
        (Step::Create(_), 409) => Err(FollowUp::Converge(fault().to_string())),
        (Step::Write { id, .. }, 200..=299) => Ok(applied(id)),
        (Step::Write { removal: true, .. }, 404) => Ok(Outcome::applied()),
        (
            Step::Write {
                recreate: Some(_), ..
            },
            404,
        ) => Err(FollowUp::Recreate),
        (Step::Write { .. }, 412) => Err(FollowUp::Again),
        (_, 0 | 408 | 429 | 500..=599) => Ok(unknown(fault().to_string())),
        (_, 404) => Ok(unknown("the user is no longer in the app")),
        _ => Ok(refused(&fault())),
    }
}
