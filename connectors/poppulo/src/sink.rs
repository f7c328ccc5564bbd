//! Writing changes to Poppulo: one subscriber import job per batch, followed to its end.
//!
//! Poppulo has no per-person write worth using at night: everything (creates, updates,
//! removals as a status) goes through an asynchronous import, one at a time per
//! account. So `apply` posts the job, stores its URL at once in the sink's store (a
//! crashed run then resumes following the same import in `recover`, instead of posting
//! another), polls it no earlier than `ping_after`, and maps the rejected rows Poppulo
//! lists back to the batch's changes by email.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use contactsync_core::async_trait;
use contactsync_core::{
    Change, ChangeBatch, ChangeKind, ConnectorError, Contact, ContactStatus, Field, JobProgress,
    Outcome, PendingBatch, RemovalStyle, Sink, SinkCapabilities, SinkContext,
};

use crate::client::{PoppuloClient, Posted};
use crate::config::{Removal, SinkConfig};
use crate::rejected::{parse_rejected, RejectedRow, RejectionKind};
use crate::xml::{ImportJob, ImportStatus};

/// Reason for a row Poppulo found invalid.
pub const REASON_INVALID: &str = "invalid subscriber (Poppulo rejected the row)";
/// Reason for a row skipped as a duplicate.
pub const REASON_DUPLICATE: &str = "duplicate email within the import";
/// Reason for a row skipped because the person opted out.
pub const REASON_OPTED_OUT: &str =
    "previously opted out: the person opted out themselves and is not re-subscribed";
/// Separator of several permissions in one `permissions` cell.
pub const PERMISSION_SEPARATOR: &str = "|";

/// A little slack after `ping_after`, for clocks and rounding.
const PING_MARGIN: Duration = Duration::from_millis(100);

/// The store key of the import in flight for a batch.
pub fn store_key(batch_id: &str) -> String {
    format!("import:{batch_id}")
}

/// The Poppulo sink. Built by the `poppulo` [`contactsync_core::SinkFactory`].
#[derive(Debug)]
pub struct PoppuloSink {
    config: SinkConfig,
    client: PoppuloClient,
}

/// A batch turned into an import job.
#[derive(Debug, Clone)]
pub struct PreparedImport {
    /// The `<subscriber_import_job>` document; `None` when no change is sendable.
    pub xml: Option<String>,
    /// Per change: the outcome of a change not sent (no email), a placeholder
    /// `Applied` for a sent one.
    pub known: Vec<Outcome>,
    /// Per change: the email it is sent under; `None` when not sent.
    pub emails: Vec<Option<String>>,
}

/// What becomes of one change before anything is sent.
#[derive(Debug, Clone)]
enum Row {
    /// Sent in the import, under this email.
    Sent(String),
    /// Not sent; its outcome is already known.
    Refused(Outcome),
}

impl PoppuloSink {
    /// A sink for `config`. Touches no network.
    pub fn new(config: SinkConfig) -> Result<Self, ConnectorError> {
        let client = PoppuloClient::new(&config.connection)?;
        Ok(PoppuloSink { config, client })
    }

    /// The column names of every import, in order: the mapping, then `status`.
    pub fn columns(&self) -> Vec<String> {
        self.config
            .columns
            .columns()
            .map(str::to_string)
            .chain(std::iter::once("status".to_string()))
            .collect()
    }

    /// The import job (without data) for this sink's settings.
    ///
    /// A batch of removals (the engine never mixes them with creates and updates) sends
    /// only `email,status`: a removed person's other fields are not known, and a blank
    /// cell would clear them on the platform. Nor does it add permissions to them.
    pub fn job(&self, removals: bool) -> ImportJob {
        let c = &self.config;
        if removals {
            return ImportJob {
                accept_terms: true,
                update_existing: true,
                reactivate_api_removed: false,
                reactivate_admin_removed: false,
                reactivate_bounced_removed: false,
                set_fields: c.set_fields.clone(),
                add_permissions: Vec::new(),
                remove_permissions: Vec::new(),
                tags: c.tags.clone(),
                columns: vec!["email".to_string(), "status".to_string()],
            };
        }
        ImportJob {
            accept_terms: true,
            update_existing: c.update_existing,
            reactivate_api_removed: c.reactivate_api_removed,
            reactivate_admin_removed: c.reactivate_admin_removed,
            reactivate_bounced_removed: c.reactivate_bounced_removed,
            set_fields: c.set_fields.clone(),
            add_permissions: c.add_permissions.clone(),
            remove_permissions: c.remove_permissions.clone(),
            tags: c.tags.clone(),
            columns: self.columns(),
        }
    }

    /// The import for `batch`: the job document and what becomes of each change.
    pub fn build_import(&self, batch: &ChangeBatch) -> Result<PreparedImport, ConnectorError> {
        let (xml, rows) = self.prepare(batch)?;
        let known = rows
            .iter()
            .map(|r| match r {
                Row::Refused(o) => o.clone(),
                Row::Sent(_) => Outcome::applied(),
            })
            .collect();
        let emails = rows
            .into_iter()
            .map(|r| match r {
                Row::Sent(e) => Some(e),
                Row::Refused(_) => None,
            })
            .collect();
        Ok(PreparedImport { xml, known, emails })
    }

    fn prepare(&self, batch: &ChangeBatch) -> Result<(Option<String>, Vec<Row>), ConnectorError> {
        let mut writer = csv::WriterBuilder::new()
            .terminator(csv::Terminator::Any(b'\n'))
            .quote_style(csv::QuoteStyle::Necessary)
            .from_writer(Vec::new());
        let mut rows = Vec::with_capacity(batch.changes.len());
        let mut sent = 0usize;
        let removals = batch.changes.iter().all(|c| c.kind() == ChangeKind::Remove);
        for change in &batch.changes {
            let Some(email) = change.email().and_then(Contact::normalize_email) else {
                rows.push(Row::Refused(no_email(change)));
                continue;
            };
            let record = if removals {
                vec![email.clone(), self.config.removal.status().to_string()]
            } else {
                self.row(change, &email)
            };
            writer
                .write_record(&record)
                .map_err(|e| ConnectorError::Other(format!("cannot write the import CSV: {e}")))?;
            rows.push(Row::Sent(email));
            sent += 1;
        }
        if sent == 0 {
            return Ok((None, rows));
        }
        let data = writer
            .into_inner()
            .map_err(|e| ConnectorError::Other(format!("cannot write the import CSV: {e}")))?;
        let data = String::from_utf8_lossy(&data);
        let xml = self
            .job(removals)
            .to_xml(&data)
            .map_err(ConnectorError::Other)?;
        Ok((Some(xml), rows))
    }

    /// One CSV row: the mapped fields, then the status.
    fn row(&self, change: &Change, email: &str) -> Vec<String> {
        let mut record: Vec<String> = self
            .config
            .columns
            .0
            .iter()
            .map(|(field, _)| match (field, change.contact()) {
                (Field::Email, _) => email.to_string(),
                (_, None) => String::new(),
                (Field::Subscriptions, Some(c)) => c
                    .subscriptions
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(PERMISSION_SEPARATOR),
                (f, Some(c)) => c.get(f).map(|v| one_line(&v)).unwrap_or_default(),
            })
            .collect();
        let status = match change.contact() {
            None => self.config.removal.status(),
            Some(c) => match c.status {
                ContactStatus::Active => "ACTIVE",
                ContactStatus::Inactive => "INACTIVE",
                ContactStatus::OptedOut => "OPT_OUT",
            },
        };
        record.push(status.to_string());
        record
    }

    /// Follows the import at `href` to its end and maps its outcome onto `emails` (one
    /// per change; `None` for a change not sent, whose outcome is in `known`).
    async fn follow(
        &self,
        key: &str,
        href: &str,
        known: Vec<Outcome>,
        emails: &[Option<String>],
        ctx: &mut SinkContext<'_>,
    ) -> Result<Vec<Outcome>, ConnectorError> {
        let label = format!("Poppulo import {}", import_id(href));
        let started = Instant::now();
        let mut wait = self.config.min_poll_interval;
        loop {
            if !sleep(&ctx.cancel, wait).await {
                return Ok(unknown(
                    known,
                    emails,
                    &format!("cancelled while {label} was running; the next run resumes it"),
                ));
            }
            let state = match self.client.import(href, ctx.cancel.clone()).await {
                Ok(s) => s,
                Err(ConnectorError::Cancelled) => {
                    return Ok(unknown(
                        known,
                        emails,
                        &format!("cancelled while {label} was running; the next run resumes it"),
                    ))
                }
                Err(e) => return Err(e),
            };
            match state.status {
                ImportStatus::InProgress => {
                    if let (Some(done), Some(total)) =
                        (state.records_processed, state.total_records)
                    {
                        ctx.progress.job_progress(&JobProgress {
                            label: label.clone(),
                            done,
                            total,
                        });
                    }
                    wait = match state.ping_after {
                        Some(at) => {
                            (at - Utc::now()).to_std().unwrap_or(Duration::ZERO) + PING_MARGIN
                        }
                        None => self.config.poll_interval,
                    }
                    .max(self.config.min_poll_interval);
                    if started.elapsed() + wait > self.config.max_import_wait {
                        tracing::warn!(import = %href, "{label} still running after {}s; the next run resumes following it", started.elapsed().as_secs());
                        return Ok(unknown(
                            known,
                            emails,
                            &format!("{label} still running; the next run resumes following it"),
                        ));
                    }
                }
                ImportStatus::Completed => {
                    let results = state.results.clone().unwrap_or_default();
                    let total = results
                        .total_records
                        .unwrap_or(emails.iter().flatten().count() as u64);
                    ctx.progress.job_progress(&JobProgress {
                        label: label.clone(),
                        done: total,
                        total,
                    });
                    let rejected = if results.has_rejections() {
                        let link = results.invalid_link.clone().unwrap_or_else(|| {
                            format!("{}/invalid_subscribers", href.trim_end_matches('/'))
                        });
                        let text = self.client.rejected_rows(&link, ctx.cancel.clone()).await?;
                        parse_rejected(&text, &self.columns()).map_err(|m| {
                            ConnectorError::Protocol {
                                call: format!("GET {}", url_path(&link)),
                                message: m,
                            }
                        })?
                    } else {
                        Vec::new()
                    };
                    let outcomes = map_outcomes(known, emails, &rejected);
                    let counted =
                        results.invalid + results.duplicates + results.previously_opted_out;
                    if counted as usize != rejected.len() {
                        tracing::warn!(
                            import = %href,
                            "{label}: results count {counted} rejected rows, the list holds {}",
                            rejected.len()
                        );
                    }
                    tracing::info!(
                        import = %href,
                        new = results.new_subscribers,
                        updated = results.updated_subscribers,
                        invalid = results.invalid,
                        duplicates = results.duplicates,
                        opted_out = results.previously_opted_out,
                        "{label} completed"
                    );
                    ctx.store.remove(key)?;
                    return Ok(outcomes);
                }
                ImportStatus::Error | ImportStatus::Cancelled => {
                    let why = state
                        .message
                        .as_deref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default();
                    tracing::error!(
                        import = %href,
                        status = %state.status_text,
                        "{label} ended {}{why}; its rows will be sent again by the next run",
                        state.status_text
                    );
                    ctx.progress.note(&format!(
                        "{label} ended {}{why}; its rows will be sent again",
                        state.status_text
                    ));
                    ctx.store.remove(key)?;
                    return Ok(unknown(
                        known,
                        emails,
                        &format!("{label} ended {}{why}", state.status_text),
                    ));
                }
            }
        }
    }
}

/// The last path segment of an import's URL (its id), for labels.
fn import_id(href: &str) -> &str {
    let path = href
        .split(['?', '#'])
        .next()
        .unwrap_or(href)
        .trim_end_matches('/');
    path.rsplit('/').next().unwrap_or(path)
}

/// The path of a URL, for error messages (no query string).
fn url_path(href: &str) -> String {
    url::Url::parse(href)
        .map(|u| u.path().to_string())
        .unwrap_or_else(|_| href.split(['?', '#']).next().unwrap_or("").to_string())
}

/// CSV allows line breaks in quoted fields, but XML turns `\r` into `\n`: normalise.
fn one_line(value: &str) -> String {
    if value.contains('\r') {
        value.replace("\r\n", "\n").replace('\r', "\n")
    } else {
        value.to_string()
    }
}

fn no_email(change: &Change) -> Outcome {
    let reason = match change.kind() {
        ChangeKind::Remove => "cannot remove: no email is known for this person, and Poppulo addresses people by email",
        _ => "no email: Poppulo matches subscribers by email, which is mandatory",
    };
    Outcome::Rejected {
        reason: reason.to_string(),
        field: Some("email".to_string()),
        retry: false,
    }
}

/// Sleeps, unless cancelled (then `false`).
async fn sleep(cancel: &contactsync_core::CancellationToken, wait: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// Every sent row's outcome is unknown (the known ones stay as they are).
fn unknown(known: Vec<Outcome>, emails: &[Option<String>], reason: &str) -> Vec<Outcome> {
    known
        .into_iter()
        .zip(emails)
        .map(|(k, e)| match e {
            Some(_) => Outcome::Unknown {
                reason: reason.to_string(),
            },
            None => k,
        })
        .collect()
}

/// Maps Poppulo's rejected rows back onto the batch by email (compared ignoring case):
/// a duplicate is a later row with an email seen earlier, so duplicates take the last
/// rows of their email; invalid and opted-out rows take the first ones not yet taken.
/// Every other sent row is applied.
pub fn map_outcomes(
    known: Vec<Outcome>,
    emails: &[Option<String>],
    rejected: &[RejectedRow],
) -> Vec<Outcome> {
    let mut by_email: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, e) in emails.iter().enumerate() {
        if let Some(e) = e {
            by_email.entry(e.to_lowercase()).or_default().push(i);
        }
    }
    let mut verdict: Vec<Option<RejectionKind>> = vec![None; emails.len()];
    let mut ordered: Vec<&RejectedRow> = rejected
        .iter()
        .filter(|r| r.kind == RejectionKind::Duplicate)
        .collect();
    ordered.extend(
        rejected
            .iter()
            .filter(|r| r.kind != RejectionKind::Duplicate),
    );
    for row in ordered {
        let Some(indices) = by_email.get(&row.email.trim().to_lowercase()) else {
            tracing::warn!("Poppulo listed a rejected row for an email not in the batch");
            continue;
        };
        let free = |i: &&usize| verdict[**i].is_none();
        let slot = if row.kind == RejectionKind::Duplicate {
            indices.iter().rev().find(free)
        } else {
            indices.iter().find(free)
        };
        if let Some(&i) = slot {
            verdict[i] = Some(row.kind);
        }
    }
    known
        .into_iter()
        .zip(emails)
        .zip(verdict)
        .map(|((k, e), v)| match (e, v) {
            (None, _) => k,
            (Some(_), None) => Outcome::Applied { handle: None },
            (Some(_), Some(RejectionKind::Invalid)) => Outcome::Rejected {
                reason: REASON_INVALID.to_string(),
                field: None,
                retry: true,
            },
            (Some(_), Some(RejectionKind::Duplicate)) => Outcome::Rejected {
                reason: REASON_DUPLICATE.to_string(),
                field: Some("email".to_string()),
                retry: true,
            },
            (Some(_), Some(RejectionKind::OptedOut)) => Outcome::Rejected {
                reason: REASON_OPTED_OUT.to_string(),
                field: None,
                retry: false,
            },
        })
        .collect()
}

/// Whether following a stored import failed for good: the import is gone (404, 410),
/// nothing listens where it was (connection refused), or the link leads outside the
/// configured base URL (a sandbox restarted on another port, a changed `base_url`).
/// Throttling, a busy account or a 5xx are passing, and fail the run as usual.
fn cannot_be_followed(error: &ConnectorError) -> bool {
    match error {
        ConnectorError::Protocol { .. } => true,
        ConnectorError::Call {
            status: Some(404 | 410),
            ..
        } => true,
        ConnectorError::Call {
            status: None,
            message,
            ..
        } => {
            let message = message.to_lowercase();
            message.contains("connection refused")
        }
        _ => false,
    }
}

#[async_trait]
impl Sink for PoppuloSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities {
            // People are found by their email address.
            addresses_by_email: true,
            max_batch: self.config.max_rows_per_job,
            asynchronous_jobs: true,
            durable_at_finish: false,
            removal: match self.config.removal {
                Removal::Inactive => RemovalStyle::MarkInactive,
                Removal::OptOut => RemovalStyle::OptOut,
            },
        }
    }

    async fn check(&mut self) -> Result<(), ConnectorError> {
        self.client.subscribers_page("all", None).await.map(|_| ())
    }

    async fn recover(
        &mut self,
        batch: &PendingBatch,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Option<Vec<Outcome>>, ConnectorError> {
        let key = store_key(&batch.id);
        let Some(href) = ctx.store.get(&key)? else {
            return Ok(None);
        };
        tracing::info!(batch = %batch.id, import = %href, "resuming the Poppulo import a previous run left running");
        ctx.progress.note(&format!(
            "resuming Poppulo import {} of batch {}",
            import_id(&href),
            batch.id
        ));
        let mut known = Vec::with_capacity(batch.records.len());
        let mut emails = Vec::with_capacity(batch.records.len());
        for record in &batch.records {
            match record.email.as_deref().and_then(Contact::normalize_email) {
                Some(e) => {
                    known.push(Outcome::applied());
                    emails.push(Some(e));
                }
                None => {
                    known.push(Outcome::Unknown {
                        reason: "not part of the resumed import (no email)".into(),
                    });
                    emails.push(None);
                }
            }
        }
        match self.follow(&key, &href, known, &emails, ctx).await {
            Ok(outcomes) => Ok(Some(outcomes)),
            Err(e) if cannot_be_followed(&e) => {
                // A handle that can never be followed again must not wedge the pipeline:
                // say so once, forget it, and let the engine send the batch again (an
                // import is an upsert, so whatever the lost import did converges).
                tracing::warn!(import = %href, "the import an earlier run left can no longer be followed ({e}); its changes are sent again");
                ctx.progress.note(&format!(
                    "gave up following Poppulo import {} of an earlier run ({e}); its changes are sent again",
                    import_id(&href)
                ));
                ctx.store.remove(&key)?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn apply(
        &mut self,
        batch: &ChangeBatch,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Vec<Outcome>, ConnectorError> {
        let PreparedImport { xml, known, emails } = self.build_import(batch)?;
        let Some(xml) = xml else {
            return Ok(known);
        };
        if ctx.cancel.is_cancelled() {
            return Err(ConnectorError::Cancelled);
        }
        let rows = emails.iter().flatten().count();
        tracing::info!(batch = %batch.id, rows, "posting a Poppulo import job");
        let posted = self
            .client
            .post_import(
                xml,
                self.config.busy_retry_interval,
                self.config.max_wait_for_busy_account,
                ctx.progress,
                ctx.cancel.clone(),
            )
            .await?;
        let href = match posted {
            Posted::Accepted(href) => href,
            Posted::Unknown(why) => {
                // Not posted again: whatever Poppulo did with it, the engine sends these
                // rows again next run (an import is an upsert, so both converge).
                tracing::warn!(batch = %batch.id, "Poppulo may or may not have taken the import ({why}); not posting it again");
                ctx.progress.note(&format!(
                    "Poppulo may or may not have taken an import ({why}); its rows are sent again next run"
                ));
                return Ok(unknown(
                    known,
                    &emails,
                    &format!("the import's answer was lost ({why}): whether Poppulo took it is unknown; sent again next run"),
                ));
            }
        };
        let key = store_key(&batch.id);
        // At once: a crash from here on resumes this import instead of posting another.
        ctx.store.put(&key, &href)?;
        tracing::info!(batch = %batch.id, import = %href, "Poppulo import accepted");
        self.follow(&key, &href, known, &emails, ctx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: RejectionKind, email: &str) -> RejectedRow {
        RejectedRow {
            kind,
            email: email.into(),
        }
    }

    #[test]
    fn duplicates_take_the_later_rows_and_others_the_first() {
        let emails = vec![
            Some("a@x.org".to_string()),
            Some("b@x.org".to_string()),
            Some("A@X.org".to_string()),
            None,
            Some("c@x.org".to_string()),
        ];
        let known = vec![Outcome::applied(); 5];
        let out = map_outcomes(
            known,
            &emails,
            &[
                row(RejectionKind::Invalid, "c@x.org"),
                row(RejectionKind::Duplicate, "a@x.org"),
                row(RejectionKind::OptedOut, "B@x.org"),
                row(RejectionKind::Invalid, "zzz@x.org"),
            ],
        );
        assert_eq!(out[0], Outcome::applied());
        assert!(
            matches!(&out[1], Outcome::Rejected { retry: false, reason, .. } if reason == REASON_OPTED_OUT)
        );
        assert!(matches!(&out[2], Outcome::Rejected { reason, .. } if reason == REASON_DUPLICATE));
        assert_eq!(out[3], Outcome::applied());
        assert!(
            matches!(&out[4], Outcome::Rejected { retry: true, reason, .. } if reason == REASON_INVALID)
        );
    }

    #[test]
    fn import_ids() {
        assert_eq!(
            import_id("https://api.newsweaver.com/v2/acme/subscriber_import/6732468"),
            "6732468"
        );
        assert_eq!(import_id("/v2/acme/subscriber_import/7/?x=1"), "7");
    }
}
