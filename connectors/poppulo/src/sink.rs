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

/// The store key of the imports in flight for a batch.
pub fn store_key(batch_id: &str) -> String {
    format!("import:{batch_id}")
}

/// Why a row Poppulo did not count was skipped: the person was removed on the platform.
pub const REASON_REMOVED_ON_PLATFORM: &str =
    "removed on Poppulo (by an administrator or a bounce) and not reactivated: \
the reactivate_admin_removed / reactivate_bounced_removed settings are false";
/// Why a create Poppulo did not count was skipped: the person exists already.
pub const REASON_EXISTS: &str =
    "exists on Poppulo already, and update_existing = false: Poppulo only creates";
/// Why an update is not sent when `update_existing = false`.
pub const REASON_NO_UPDATES: &str =
    "not sent: update_existing = false, so Poppulo would skip the row";

/// What the store keeps of a batch's imports, so that a crashed run follows them
/// instead of posting again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PostedImport {
    /// The import's URL.
    pub href: String,
    /// The positions in the batch of the changes it carries.
    pub changes: Vec<usize>,
    /// Its columns, for reading its rejected rows.
    pub columns: Vec<String>,
}

/// The Poppulo sink. Built by the `poppulo` [`contactsync_core::SinkFactory`].
#[derive(Debug)]
pub struct PoppuloSink {
    config: SinkConfig,
    client: PoppuloClient,
    resubscribe: bool,
}

/// One row of an import: the change it carries and what it asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentRow {
    /// The change's position in the batch.
    pub change: usize,
    /// The email the row is sent under.
    pub email: String,
    /// The row gives a person's old address the removal status (their email changed).
    pub old_address: bool,
    /// The row's status cell; `None`: left empty (the status is the person's).
    pub status: Option<&'static str>,
    /// The row creates the person.
    pub create: bool,
}

/// One import job of a batch.
#[derive(Debug, Clone)]
pub struct ImportPart {
    /// The `<subscriber_import_job>` document.
    pub xml: String,
    /// Its columns, in data order.
    pub columns: Vec<String>,
    /// Its rows, in data order.
    pub rows: Vec<SentRow>,
}

/// A batch turned into imports: one, holding creates, updates and removals, unless the
/// batch withdraws permissions (one more per distinct set withdrawn, since Poppulo
/// withdraws them job by job) or removes people whose last-sent record is not known
/// (one more, `email,status` only, so that no cell clears a field).
#[derive(Debug, Clone)]
pub struct PreparedImport {
    /// The imports, in the order they are posted.
    pub parts: Vec<ImportPart>,
    /// Per change: the outcome of a change sent in no import; a placeholder `Applied`
    /// for a sent one.
    pub known: Vec<Outcome>,
}

impl PreparedImport {
    /// The first import's document, if any (most batches have exactly one).
    pub fn xml(&self) -> Option<&str> {
        self.parts.first().map(|p| p.xml.as_str())
    }
}

/// Which import a row goes into.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    /// The run's one import.
    Main,
    /// Rows whose permissions the source withdrew, by the set withdrawn.
    Withdraw(Vec<String>),
    /// Removals without a known last-sent record: `email,status` only.
    Bare,
}

/// A row before the import's columns are known.
#[derive(Debug, Clone)]
struct Planned {
    row: SentRow,
    /// Per mapped column (the sink's column map, in order): the cell; `None` when the
    /// row has nothing to say there.
    cells: Vec<Option<String>>,
    /// Permissions the row grants.
    permissions: Vec<String>,
    /// A create or update (not a removal or an old address).
    upsert: bool,
}

/// What one row came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RowResult {
    Applied,
    Rejected(RejectionKind),
    Skipped(&'static str),
    Unknown(String),
}

impl PoppuloSink {
    /// A sink for `config`. Touches no network.
    pub fn new(config: SinkConfig) -> Result<Self, ConnectorError> {
        let client = PoppuloClient::new(&config.connection)?;
        Ok(PoppuloSink {
            config,
            client,
            resubscribe: false,
        })
    }

    /// Sends status and permissions of every update as the source has them (the
    /// pipeline's `resubscribe`; the engine sets it for each run).
    pub fn set_resubscribe(&mut self, resubscribe: bool) {
        self.resubscribe = resubscribe;
    }

    /// Every column an import of this sink may have, in order: the mapping, then
    /// `status`.
    pub fn columns(&self) -> Vec<String> {
        self.config
            .columns
            .columns()
            .map(str::to_string)
            .chain(std::iter::once("status".to_string()))
            .collect()
    }

    /// The column the subscriptions go to: the mapped one, else `permissions`.
    fn permissions_column(&self) -> String {
        self.config
            .columns
            .0
            .iter()
            .find(|(f, _)| *f == Field::Subscriptions)
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| "permissions".to_string())
    }

    fn manages_permissions(&self) -> bool {
        self.config
            .columns
            .0
            .iter()
            .any(|(f, _)| *f == Field::Subscriptions)
    }

    /// The imports for `batch` and what becomes of each change.
    pub fn build_import(&self, batch: &ChangeBatch) -> Result<PreparedImport, ConnectorError> {
        let mut known = vec![Outcome::applied(); batch.changes.len()];
        let mut groups: std::collections::BTreeMap<Group, Vec<Planned>> = Default::default();
        let removal_status = self.config.removal.status();
        let mapped = &self.config.columns.0;
        let from_before = |before: &Contact, email: &str| -> Vec<Option<String>> {
            mapped
                .iter()
                .map(|(f, _)| match f {
                    Field::Email => Some(email.to_string()),
                    Field::Subscriptions => None,
                    f => before.get(f).map(|v| one_line(&v)),
                })
                .collect()
        };
        let email_only = |email: &str| -> Vec<Option<String>> {
            mapped
                .iter()
                .map(|(f, _)| (*f == Field::Email).then(|| email.to_string()))
                .collect()
        };
        // A row giving an address the removal status (a removal, or a changed email's
        // old address), with what was last sent so that it clears nothing. It shares
        // the run's import only when that updates existing people (with
        // `update_existing = false` Poppulo would skip it), and only when the record
        // last sent is known; otherwise it goes in an `email,status` import.
        let removal_row = |change: usize,
                           email: String,
                           before: Option<&Contact>,
                           old_address: bool|
         -> (Group, Planned) {
            let (group, cells) = match before {
                Some(b) if self.config.update_existing => (Group::Main, from_before(b, &email)),
                _ => (Group::Bare, email_only(&email)),
            };
            let row = SentRow {
                change,
                email,
                old_address,
                status: Some(removal_status),
                create: false,
            };
            let planned = Planned {
                row,
                cells,
                permissions: Vec::new(),
                upsert: false,
            };
            (group, planned)
        };
        for (index, change) in batch.changes.iter().enumerate() {
            let Some(email) = change.email().and_then(Contact::normalize_email) else {
                known[index] = no_email(change);
                continue;
            };
            let Some(contact) = change.contact() else {
                let (group, planned) = removal_row(index, email, change.before(), false);
                groups.entry(group).or_default().push(planned);
                continue;
            };
            if change.kind() == ChangeKind::Update && !self.config.update_existing {
                known[index] = Outcome::Rejected {
                    reason: REASON_NO_UPDATES.to_string(),
                    field: None,
                    retry: false,
                };
                continue;
            }
            let create = change.kind() == ChangeKind::Create;
            let cells = mapped
                .iter()
                .map(|(f, _)| match f {
                    Field::Email => Some(email.clone()),
                    Field::Subscriptions => None,
                    f => change.owned_value(f).map(|v| one_line(&v)),
                })
                .collect();
            // Consent is the person's: a create grants what the source lists, an
            // update only what the source added since the last sync, and withdraws
            // what it took away; a permission the person dropped on Poppulo stays
            // dropped until the source changes it.
            let (permissions, withdrawn) = if !self.manages_permissions() {
                (Vec::new(), Vec::new())
            } else if create || self.resubscribe {
                let withdrawn = change
                    .before()
                    .map(|b| {
                        b.subscriptions
                            .difference(&contact.subscriptions)
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                (contact.subscriptions.iter().cloned().collect(), withdrawn)
            } else {
                match change.before() {
                    Some(b) => (
                        contact
                            .subscriptions
                            .difference(&b.subscriptions)
                            .cloned()
                            .collect(),
                        b.subscriptions
                            .difference(&contact.subscriptions)
                            .cloned()
                            .collect(),
                    ),
                    None => (Vec::new(), Vec::new()),
                }
            };
            let status = change
                .sends_status(self.resubscribe)
                .then(|| status_cell(contact.status));
            let group = if withdrawn.is_empty() {
                Group::Main
            } else {
                Group::Withdraw(withdrawn)
            };
            // A changed address: the old one gets the removal status in the same
            // import, so that it is not left ACTIVE for good.
            if let Some(old) = change.previous_email().and_then(Contact::normalize_email) {
                if !old.eq_ignore_ascii_case(&email) {
                    let (group, planned) = removal_row(index, old, change.before(), true);
                    groups.entry(group).or_default().push(planned);
                }
            }
            groups.entry(group).or_default().push(Planned {
                row: SentRow {
                    change: index,
                    email,
                    old_address: false,
                    status,
                    create,
                },
                cells,
                permissions,
                upsert: true,
            });
        }
        // An old address that someone in the batch now uses is theirs: never removed.
        let used: std::collections::HashSet<String> = groups
            .values()
            .flatten()
            .filter(|p| p.upsert)
            .map(|p| p.row.email.to_lowercase())
            .collect();
        for rows in groups.values_mut() {
            rows.retain(|p| {
                let keep = !p.row.old_address || !used.contains(&p.row.email.to_lowercase());
                if !keep {
                    tracing::info!(
                        "an old address is now someone else's in this batch; it is not removed"
                    );
                }
                keep
            });
        }
        let mut parts = Vec::new();
        for (group, rows) in groups {
            if rows.is_empty() {
                continue;
            }
            parts.push(self.part(&group, rows)?);
        }
        Ok(PreparedImport { parts, known })
    }

    /// One import: its columns are those some row has something to say in, so that no
    /// cell clears a field the source does not provide.
    fn part(&self, group: &Group, rows: Vec<Planned>) -> Result<ImportPart, ConnectorError> {
        let c = &self.config;
        let mapped = &c.columns.0;
        let bare = *group == Group::Bare;
        let mixed = rows.iter().any(|p| !p.upsert);
        let upserts = rows.iter().any(|p| p.upsert);
        let included: Vec<usize> = (0..mapped.len())
            .filter(|&j| {
                mapped[j].0 == Field::Email || (!bare && rows.iter().any(|p| p.cells[j].is_some()))
            })
            .collect();
        // Job-level tags, set_fields and add_permissions would reach the removal rows
        // too: in a mixed import they become cells of the upsert rows.
        let per_row = mixed && upserts;
        let permissions = !bare
            && (rows.iter().any(|p| !p.permissions.is_empty())
                || (per_row && !c.add_permissions.is_empty()));
        let tags = per_row && !c.tags.is_empty();
        let mut columns: Vec<String> = included.iter().map(|&j| mapped[j].1.clone()).collect();
        let mut overridden: Vec<(usize, String)> = Vec::new();
        let mut set_columns: Vec<(String, String)> = Vec::new();
        if per_row {
            for (name, value) in &c.set_fields {
                match columns.iter().position(|col| col == name) {
                    Some(at) => overridden.push((at, value.clone())),
                    None => set_columns.push((name.clone(), value.clone())),
                }
            }
        }
        if permissions {
            columns.push(self.permissions_column());
        }
        if tags {
            columns.push("tags".to_string());
        }
        columns.extend(set_columns.iter().map(|(n, _)| n.clone()));
        // An empty status cell leaves the person's status as it is; a job in which no
        // row sets one has no status column at all.
        let status = rows.iter().any(|p| p.row.status.is_some());
        if status {
            columns.push("status".to_string());
        }
        let mut writer = csv::WriterBuilder::new()
            .terminator(csv::Terminator::Any(b'\n'))
            .quote_style(csv::QuoteStyle::Necessary)
            .from_writer(Vec::new());
        let mut sent = Vec::with_capacity(rows.len());
        for planned in rows {
            let mut record: Vec<String> = included
                .iter()
                .map(|&j| planned.cells[j].clone().unwrap_or_default())
                .collect();
            if planned.upsert {
                for (at, value) in &overridden {
                    record[*at] = value.clone();
                }
            }
            if permissions {
                let mut granted = planned.permissions.clone();
                if per_row && planned.upsert {
                    granted.extend(c.add_permissions.iter().cloned());
                }
                record.push(granted.join(PERMISSION_SEPARATOR));
            }
            if tags {
                record.push(if planned.upsert {
                    c.tags.join(PERMISSION_SEPARATOR)
                } else {
                    String::new()
                });
            }
            // A removal row carries the set fields' values as every earlier upsert
            // gave them, so that they stay as they are.
            record.extend(set_columns.iter().map(|(_, v)| v.clone()));
            if status {
                record.push(planned.row.status.unwrap_or("").to_string());
            }
            writer
                .write_record(&record)
                .map_err(|e| ConnectorError::Other(format!("cannot write the import CSV: {e}")))?;
            sent.push(planned.row);
        }
        let data = writer
            .into_inner()
            .map_err(|e| ConnectorError::Other(format!("cannot write the import CSV: {e}")))?;
        let data = String::from_utf8_lossy(&data);
        let mut remove_permissions = if bare {
            Vec::new()
        } else {
            c.remove_permissions.clone()
        };
        if let Group::Withdraw(withdrawn) = group {
            for p in withdrawn {
                if !remove_permissions.contains(p) {
                    remove_permissions.push(p.clone());
                }
            }
        }
        let job = ImportJob {
            accept_terms: true,
            update_existing: bare || c.update_existing,
            reactivate_api_removed: !bare && c.reactivate_api_removed,
            reactivate_admin_removed: !bare && c.reactivate_admin_removed,
            reactivate_bounced_removed: !bare && c.reactivate_bounced_removed,
            set_fields: if per_row || bare || !upserts {
                Default::default()
            } else {
                c.set_fields.clone()
            },
            add_permissions: if per_row || bare || !upserts {
                Vec::new()
            } else {
                c.add_permissions.clone()
            },
            remove_permissions,
            tags: if per_row || bare || !upserts {
                Vec::new()
            } else {
                c.tags.clone()
            },
            columns: columns.clone(),
        };
        let xml = job.to_xml(&data).map_err(ConnectorError::Other)?;
        Ok(ImportPart {
            xml,
            columns,
            rows: sent,
        })
    }

    /// Follows the import at `href` to its end: per row (by `emails`), what Poppulo
    /// counted it as, and the results; or why the rows' fate is not known.
    async fn follow(
        &self,
        href: &str,
        columns: &[String],
        emails: &[String],
        ctx: &mut SinkContext<'_>,
    ) -> Result<Followed, ConnectorError> {
        let label = format!("Poppulo import {}", import_id(href));
        let started = Instant::now();
        let mut wait = self.config.min_poll_interval;
        loop {
            let cancelled = || {
                Followed::Pending(format!(
                    "cancelled while {label} was running; the next run resumes it"
                ))
            };
            if !sleep(&ctx.cancel, wait).await {
                return Ok(cancelled());
            }
            let state = match self.client.import(href, ctx.cancel.clone()).await {
                Ok(s) => s,
                Err(ConnectorError::Cancelled) => return Ok(cancelled()),
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
                        return Ok(Followed::Pending(format!(
                            "{label} still running; the next run resumes following it"
                        )));
                    }
                }
                ImportStatus::Completed => {
                    let results = state.results.clone().unwrap_or_default();
                    let total = results.total_records.unwrap_or(emails.len() as u64);
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
                        parse_rejected(&text, columns).map_err(|m| ConnectorError::Protocol {
                            call: format!("GET {}", url_path(&link)),
                            message: m,
                        })?
                    } else {
                        Vec::new()
                    };
                    let verdicts = verdicts(emails, &rejected);
                    let listed =
                        results.invalid + results.duplicates + results.previously_opted_out;
                    if listed as usize != rejected.len() {
                        tracing::warn!(
                            import = %href,
                            "{label}: results count {listed} rejected rows, the list holds {}",
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
                    let counted = results.new_subscribers + results.updated_subscribers + listed;
                    return Ok(Followed::Completed(Completed {
                        verdicts,
                        uncounted: total.saturating_sub(counted),
                        created: state.created,
                    }));
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
                    return Ok(Followed::Ended(format!(
                        "{label} ended {}{why}",
                        state.status_text
                    )));
                }
            }
        }
    }

    /// Rows Poppulo did not count (a `total` above the sum of new, updated, invalid,
    /// duplicate and opted-out rows) were skipped: find out which, from the account's subscribers, so
    /// that none is recorded as applied. Only rows that can be skipped are looked at:
    /// ACTIVE rows (a person removed on the platform is not reactivated) and, with
    /// `update_existing = false`, creates of people who exist already.
    async fn reconcile(
        &self,
        rows: &[SentRow],
        results: &mut [RowResult],
        followed: &Completed,
        posted_at: chrono::DateTime<Utc>,
        cancel: &contactsync_core::CancellationToken,
    ) -> Result<(), ConnectorError> {
        if followed.uncounted == 0 {
            return Ok(());
        }
        let candidates: Vec<usize> = (0..rows.len())
            .filter(|&i| results[i] == RowResult::Applied)
            .filter(|&i| {
                rows[i].status == Some("ACTIVE") || (!self.config.update_existing && rows[i].create)
            })
            .collect();
        tracing::warn!(
            uncounted = followed.uncounted,
            candidates = candidates.len(),
            "Poppulo counted fewer rows than the import held; reading the account to find the skipped ones"
        );
        if candidates.is_empty() {
            return Ok(());
        }
        let mut platform: HashMap<String, (String, Option<chrono::DateTime<Utc>>)> = HashMap::new();
        let mut next: Option<String> = None;
        loop {
            if cancel.is_cancelled() {
                return Err(ConnectorError::Cancelled);
            }
            let (_, page) = self.client.subscribers_page("all", next.as_deref()).await?;
            for s in &page.subscribers {
                let Some(email) = s.value("email") else {
                    continue;
                };
                let status = s.value("status").unwrap_or("ACTIVE").to_ascii_uppercase();
                let modified = s.value("date_modified").and_then(crate::xml::parse_time);
                platform.insert(email.to_lowercase(), (status, modified));
            }
            match page.next {
                Some(n) if !page.subscribers.is_empty() => next = Some(n),
                _ => break,
            }
        }
        let before = followed.created.unwrap_or(posted_at);
        let mut found = 0u64;
        for i in candidates {
            let row = &rows[i];
            match platform.get(&row.email.to_lowercase()) {
                None => {
                    results[i] =
                        RowResult::Unknown("not found on Poppulo after the import".to_string());
                    found += 1;
                }
                Some((status, _)) if row.status == Some("ACTIVE") && status != "ACTIVE" => {
                    results[i] = RowResult::Skipped(REASON_REMOVED_ON_PLATFORM);
                    found += 1;
                }
                Some((_, Some(modified)))
                    if !self.config.update_existing && row.create && *modified < before =>
                {
                    results[i] = RowResult::Skipped(REASON_EXISTS);
                    found += 1;
                }
                _ => {}
            }
        }
        if found < followed.uncounted {
            tracing::warn!(
                "Poppulo skipped {} rows this sink cannot tell apart; they are recorded as applied",
                followed.uncounted - found
            );
        }
        Ok(())
    }

    /// Posts and follows one import; the store keeps it from the moment Poppulo took
    /// it. Returns each row's result.
    async fn run_part(
        &self,
        key: &str,
        posted: &mut Vec<PostedImport>,
        part: &ImportPart,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Vec<RowResult>, ConnectorError> {
        if ctx.cancel.is_cancelled() {
            return Err(ConnectorError::Cancelled);
        }
        tracing::info!(rows = part.rows.len(), "posting a Poppulo import job");
        let posted_at = Utc::now();
        let answer = self
            .client
            .post_import(
                part.xml.clone(),
                self.config.busy_retry_interval,
                self.config.max_wait_for_busy_account,
                ctx.progress,
                ctx.cancel.clone(),
            )
            .await?;
        let href = match answer {
            Posted::Accepted(href) => href,
            Posted::Unknown(why) => {
                // Not posted again: whatever Poppulo did with it, the engine sends these
                // rows again next run (an import is an upsert, so both converge).
                tracing::warn!(
                    "Poppulo may or may not have taken the import ({why}); not posting it again"
                );
                ctx.progress.note(&format!(
                    "Poppulo may or may not have taken an import ({why}); its rows are sent again next run"
                ));
                let reason = format!("the import's answer was lost ({why}): whether Poppulo took it is unknown; sent again next run");
                return Ok(vec![RowResult::Unknown(reason); part.rows.len()]);
            }
        };
        // At once: a crash from here on resumes this import instead of posting another.
        posted.push(PostedImport {
            href: href.clone(),
            changes: part.rows.iter().map(|r| r.change).collect(),
            columns: part.columns.clone(),
        });
        save_posted(ctx, key, posted)?;
        tracing::info!(import = %href, "Poppulo import accepted");
        let emails: Vec<String> = part.rows.iter().map(|r| r.email.clone()).collect();
        let followed = self.follow(&href, &part.columns, &emails, ctx).await?;
        let results = match followed {
            Followed::Completed(completed) => {
                let mut results = completed.verdicts.clone();
                self.reconcile(&part.rows, &mut results, &completed, posted_at, &ctx.cancel)
                    .await?;
                results
            }
            // Kept in the store: the next run resumes following it.
            Followed::Pending(reason) => {
                return Ok(vec![RowResult::Unknown(reason); part.rows.len()])
            }
            Followed::Ended(reason) => {
                posted.retain(|p| p.href != href);
                save_posted(ctx, key, posted)?;
                return Ok(vec![RowResult::Unknown(reason); part.rows.len()]);
            }
        };
        posted.retain(|p| p.href != href);
        save_posted(ctx, key, posted)?;
        Ok(results)
    }
}

/// How following an import ended.
#[derive(Debug, Clone)]
enum Followed {
    /// It completed.
    Completed(Completed),
    /// Still running, or the run was cancelled: the next run resumes following it.
    Pending(String),
    /// It ended in error or was cancelled on the platform: nothing to resume.
    Ended(String),
}

/// What a completed import said.
#[derive(Debug, Clone)]
struct Completed {
    /// Per row: applied, or the list it was rejected in.
    verdicts: Vec<RowResult>,
    /// Rows Poppulo counted in none of its results.
    uncounted: u64,
    /// When the import was submitted.
    created: Option<chrono::DateTime<Utc>>,
}

fn save_posted(
    ctx: &mut SinkContext<'_>,
    key: &str,
    posted: &[PostedImport],
) -> Result<(), ConnectorError> {
    if posted.is_empty() {
        return ctx.store.remove(key);
    }
    let json = serde_json::to_string(posted)
        .map_err(|e| ConnectorError::Other(format!("cannot record the import: {e}")))?;
    ctx.store.put(key, &json)
}

/// The imports a stored value names: a JSON list, or (from earlier versions) one href
/// carrying every change of the batch.
fn load_posted(value: &str, changes: usize, columns: Vec<String>) -> Vec<PostedImport> {
    match serde_json::from_str::<Vec<PostedImport>>(value) {
        Ok(posted) => posted,
        Err(_) => vec![PostedImport {
            href: value.trim().to_string(),
            changes: (0..changes).collect(),
            columns,
        }],
    }
}

fn status_cell(status: ContactStatus) -> &'static str {
    match status {
        ContactStatus::Active => "ACTIVE",
        ContactStatus::Inactive => "INACTIVE",
        ContactStatus::OptedOut => "OPT_OUT",
    }
}

/// Each change's outcome from its rows' results: the person's row decides; an old
/// address that could not be removed makes the change one to send again.
fn combine(known: Vec<Outcome>, rows: &[SentRow], results: &[RowResult]) -> Vec<Outcome> {
    let mut out = known;
    let mut old: Vec<Option<&RowResult>> = vec![None; out.len()];
    for (row, result) in rows.iter().zip(results) {
        if row.old_address {
            old[row.change] = Some(result);
            continue;
        }
        out[row.change] = outcome(result);
    }
    for (i, result) in old.into_iter().enumerate() {
        let Some(result) = result else { continue };
        if !matches!(out[i], Outcome::Applied { .. }) {
            continue;
        }
        match result {
            RowResult::Applied | RowResult::Rejected(RejectionKind::OptedOut) | RowResult::Skipped(_) => {}
            RowResult::Unknown(reason) => {
                out[i] = Outcome::Unknown {
                    reason: format!("the old address: {reason}"),
                }
            }
            RowResult::Rejected(_) => {
                out[i] = Outcome::Rejected {
                    reason: "the new address was imported, but Poppulo refused the row that removes the old one".into(),
                    field: Some("email".into()),
                    retry: true,
                }
            }
        }
    }
    out
}

fn outcome(result: &RowResult) -> Outcome {
    match result {
        RowResult::Applied => Outcome::Applied { handle: None },
        RowResult::Rejected(RejectionKind::Invalid) => Outcome::Rejected {
            reason: REASON_INVALID.to_string(),
            field: None,
            retry: true,
        },
        RowResult::Rejected(RejectionKind::Duplicate) => Outcome::Rejected {
            reason: REASON_DUPLICATE.to_string(),
            field: Some("email".to_string()),
            retry: true,
        },
        RowResult::Rejected(RejectionKind::OptedOut) => Outcome::Rejected {
            reason: REASON_OPTED_OUT.to_string(),
            field: None,
            retry: false,
        },
        RowResult::Skipped(reason) => Outcome::Rejected {
            reason: reason.to_string(),
            field: None,
            retry: false,
        },
        RowResult::Unknown(reason) => Outcome::Unknown {
            reason: reason.clone(),
        },
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

/// Maps Poppulo's rejected rows back onto the rows by email (compared ignoring case):
/// a duplicate is a later row with an email seen earlier, so duplicates take the last
/// rows of their email; invalid and opted-out rows take the first ones not yet taken.
/// Every other row is applied.
fn verdicts(emails: &[String], rejected: &[RejectedRow]) -> Vec<RowResult> {
    let mut by_email: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, e) in emails.iter().enumerate() {
        by_email.entry(e.to_lowercase()).or_default().push(i);
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
            tracing::warn!("Poppulo listed a rejected row for an email not in the import");
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
    verdict
        .into_iter()
        .map(|v| match v {
            None => RowResult::Applied,
            Some(kind) => RowResult::Rejected(kind),
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
            mixes_removals: true,
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
        let Some(value) = ctx.store.get(&key)? else {
            return Ok(None);
        };
        let mut posted = load_posted(&value, batch.records.len(), self.columns());
        tracing::info!(batch = %batch.id, imports = posted.len(), "resuming the Poppulo imports a previous run left running");
        // Changes in no import still followable are sent again.
        let mut outcomes: Vec<Outcome> = vec![
            Outcome::Unknown {
                reason: "not part of an import a previous run left running; sent again".into(),
            };
            batch.records.len()
        ];
        for import in posted.clone() {
            ctx.progress.note(&format!(
                "resuming Poppulo import {} of batch {}",
                import_id(&import.href),
                batch.id
            ));
            let rows: Vec<(usize, String)> = import
                .changes
                .iter()
                .filter_map(|&i| {
                    let email = batch.records.get(i)?.email.as_deref();
                    Some((i, email.and_then(Contact::normalize_email)?))
                })
                .collect();
            let emails: Vec<String> = rows.iter().map(|(_, e)| e.clone()).collect();
            match self
                .follow(&import.href, &import.columns, &emails, ctx)
                .await
            {
                Ok(Followed::Completed(followed)) => {
                    // What the rows asked is not kept, so skipped rows cannot be told
                    // apart: when Poppulo counted fewer rows than it got, they are all
                    // sent again (the next run's own import reconciles them).
                    for ((i, _), verdict) in rows.iter().zip(&followed.verdicts) {
                        outcomes[*i] = if followed.uncounted > 0 && *verdict == RowResult::Applied {
                            Outcome::Unknown {
                                reason:
                                    "Poppulo skipped some rows of the resumed import; sent again"
                                        .into(),
                            }
                        } else {
                            outcome(verdict)
                        };
                    }
                    posted.retain(|p| p.href != import.href);
                    save_posted(ctx, &key, &posted)?;
                }
                Ok(Followed::Pending(reason)) => {
                    // Left in the store: the next run follows it again.
                    for (i, _) in &rows {
                        outcomes[*i] = Outcome::Unknown {
                            reason: reason.clone(),
                        };
                    }
                }
                Ok(Followed::Ended(reason)) => {
                    for (i, _) in &rows {
                        outcomes[*i] = Outcome::Unknown {
                            reason: reason.clone(),
                        };
                    }
                    posted.retain(|p| p.href != import.href);
                    save_posted(ctx, &key, &posted)?;
                }
                Err(e) if cannot_be_followed(&e) => {
                    // A handle that can never be followed again must not wedge the
                    // pipeline: say so once, forget it, and let the engine send the
                    // changes again (an import is an upsert, so whatever it did converges).
                    tracing::warn!(import = %import.href, "the import an earlier run left can no longer be followed ({e}); its changes are sent again");
                    ctx.progress.note(&format!(
                        "gave up following Poppulo import {} of an earlier run ({e}); its changes are sent again",
                        import_id(&import.href)
                    ));
                    posted.retain(|p| p.href != import.href);
                    save_posted(ctx, &key, &posted)?;
                }
                Err(e) => return Err(e),
            }
        }
        if posted.is_empty()
            && outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Unknown { .. }))
        {
            return Ok(None);
        }
        Ok(Some(outcomes))
    }

    async fn apply(
        &mut self,
        batch: &ChangeBatch,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Vec<Outcome>, ConnectorError> {
        self.resubscribe = ctx.resubscribe;
        let PreparedImport { parts, known } = self.build_import(batch)?;
        let key = store_key(&batch.id);
        let mut posted = Vec::new();
        let mut rows = Vec::new();
        let mut results = Vec::new();
        for part in &parts {
            let part_results = self.run_part(&key, &mut posted, part, ctx).await?;
            rows.extend(part.rows.iter().cloned());
            results.extend(part_results);
        }
        Ok(combine(known, &rows, &results))
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
        let emails: Vec<String> = ["a@x.org", "b@x.org", "A@X.org", "c@x.org"]
            .map(String::from)
            .to_vec();
        let out = verdicts(
            &emails,
            &[
                row(RejectionKind::Invalid, "c@x.org"),
                row(RejectionKind::Duplicate, "a@x.org"),
                row(RejectionKind::OptedOut, "B@x.org"),
                row(RejectionKind::Invalid, "zzz@x.org"),
            ],
        );
        assert_eq!(
            out,
            vec![
                RowResult::Applied,
                RowResult::Rejected(RejectionKind::OptedOut),
                RowResult::Rejected(RejectionKind::Duplicate),
                RowResult::Rejected(RejectionKind::Invalid),
            ]
        );
        assert!(
            matches!(outcome(&out[1]), Outcome::Rejected { retry: false, reason, .. } if reason == REASON_OPTED_OUT)
        );
        assert!(
            matches!(outcome(&out[3]), Outcome::Rejected { retry: true, reason, .. } if reason == REASON_INVALID)
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
