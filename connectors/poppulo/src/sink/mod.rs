//! Writing changes to Poppulo: one subscriber import job per batch, followed to its end.
//!
//! Poppulo has no per-person write worth using at night: everything (creates, updates,
//! removals as a status) goes through an asynchronous import, one at a time per
//! account. So `apply` posts the job, stores its URL at once in the sink's store (a
//! crashed run then resumes following the same import in `recover`, instead of posting
//! another), polls it no earlier than `ping_after`, and maps the rejected rows Poppulo
//! lists back to the batch's changes by email.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use contactsync_core::async_trait;
use contactsync_core::{
    CancellationToken, Change, ChangeBatch, ChangeKind, ConnectorError, Contact, ContactStatus,
    Field, Followed, JobEntry, JobFollower, JobLedger, JobPoll, JobTiming, Outcome, PendingBatch,
    Posted, ProgressReporter, RemovalStyle, Sink, SinkCapabilities, SinkContext, SinkSummary,
    Submitted,
};

use crate::client::PoppuloClient;
use crate::config::{Removal, SinkConfig};
use crate::rejected::{parse_rejected, RejectedRow, RejectionKind};
use crate::xml::{ImportFlags, ImportJob, ImportState, ImportStatus};

mod build;
mod follow;

/// Reason for a row Poppulo found invalid.
pub const REASON_INVALID: &str = "invalid subscriber (Poppulo rejected the row)";
/// Reason for a row skipped as a duplicate.
pub const REASON_DUPLICATE: &str = "duplicate email within the import";
/// Reason for a row skipped because the person opted out.
pub const REASON_OPTED_OUT: &str =
    "previously opted out: the person opted out themselves and is not re-subscribed";
/// Separator of several permissions in one `permissions` cell.
pub const PERMISSION_SEPARATOR: &str = "|";

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
    /// Its rows, as sent (empty from earlier versions: then the changes' emails).
    #[serde(default)]
    pub rows: Vec<SentRow>,
    /// A `NewOnly` import (skipped rows are expected).
    #[serde(default)]
    pub new_only: bool,
}

impl JobEntry for PostedImport {
    fn handle(&self) -> &str {
        &self.href
    }
    fn rows(&self) -> usize {
        self.rows.len()
    }
}

/// The Poppulo sink. Built by the `poppulo` [`contactsync_core::SinkFactory`].
#[derive(Debug)]
pub struct PoppuloSink {
    config: SinkConfig,
    client: PoppuloClient,
    resubscribe: bool,
    /// Imports posted by this sink (for the report).
    imports: u64,
    /// Reads made to establish outcomes (reconciling uncounted rows) this run.
    reads: u64,
}

/// One row of an import: the change it carries and what it asks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SentRow {
    /// The change's position in the batch.
    pub change: usize,
    /// The email the row is sent under.
    pub email: String,
    /// The row gives a person's old address the removal status (their email changed).
    #[serde(default)]
    pub old_address: bool,
    /// The row's status cell; `None`: left empty (the status is the person's).
    #[serde(default)]
    pub status: Option<String>,
    /// The row creates the person.
    #[serde(default)]
    pub create: bool,
    /// The row gives an address the removal status (a removal or an old address).
    #[serde(default)]
    pub removal: bool,
}

/// One import job of a batch.
#[derive(Debug, Clone)]
pub struct ImportPart {
    /// Which import it is.
    pub group: Group,
    /// The `<subscriber_import_job>` document.
    pub xml: String,
    /// Its columns, in data order.
    pub columns: Vec<String>,
    /// Its rows, in data order.
    pub rows: Vec<SentRow>,
    /// The rows as planned, to build it again without some.
    planned: Vec<Planned>,
}

/// A batch turned into imports. A row never carries a cell for a field its own change
/// does not set, so rows with different sets of cells go into different imports (sent
/// one after the other: Poppulo runs one at a time): most batches are one import of
/// creates and updates, and one of removals (`email,status`).
#[derive(Debug, Clone)]
pub struct PreparedImport {
    /// The imports, in the order they are posted.
    pub parts: Vec<ImportPart>,
    /// Per change: the outcome of a change sent in no import; a placeholder `Applied`
    /// for a sent one.
    pub known: Vec<Outcome>,
}

impl PreparedImport {
    /// The first import's document, if any.
    pub fn xml(&self) -> Option<&str> {
        self.parts.first().map(|p| p.xml.as_str())
    }
}

/// Which import a row goes into, in the order they are posted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    /// Creates that grant permissions (the source's, `add_permissions`), with
    /// `update_existing = false`: Poppulo creates the people it does not hold and
    /// skips those it does, so a grant reaches only someone new to Poppulo (consent is
    /// the person's). Each row is sent again, without grants, in the `Upsert` import
    /// after it, unless this import created every row.
    NewOnly(Cells),
    /// Creates and updates with the same set of cells.
    Upsert(Cells),
    /// Removals and old addresses: `email,status` only.
    Removal,
}

/// Which cells the rows of an import have: per mapped column, whether it is there;
/// granted permissions; the permissions the rows withdraw (job-level). The status is
/// not among them: a status cannot be cleared, and an empty status cell leaves the
/// person's status as it is (the one empty cell a row may carry), so that creates
/// (which set one) and updates (which mostly do not) share an import.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cells {
    mapped: Vec<bool>,
    permissions: bool,
    withdrawn: Vec<String>,
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
    /// A create's second row, after its `NewOnly` one: left out when that import
    /// created every row it held.
    follow_up: bool,
}

/// What one row came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RowResult {
    Applied,
    Rejected(RejectionKind),
    Skipped(&'static str),
    Unknown(String),
}

/// What an import's rows came to, and whether Poppulo counted every row.
struct PartResult {
    results: Vec<RowResult>,
    /// Every row was counted (none skipped), as far as is known.
    all_counted: bool,
}

impl PoppuloSink {
    /// A sink for `config`. Touches no network.
    pub fn new(config: SinkConfig) -> Result<Self, ConnectorError> {
        let client = PoppuloClient::new(&config.connection)?;
        Ok(PoppuloSink {
            config,
            client,
            resubscribe: false,
            imports: 0,
            reads: 0,
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

    /// Whether grants on a create go through a `NewOnly` import first: when the job
    /// updates existing people and the pipeline does not say `resubscribe`.
    fn grants_to_new_only(&self) -> bool {
        self.config.flags.update_existing && !self.resubscribe
    }

    /// The ledger of the imports in flight for batch `batch_id`.
    fn ledger(batch_id: &str) -> JobLedger<PostedImport> {
        JobLedger::new(store_key(batch_id))
    }

    /// Posts and follows one import; the ledger keeps it from the moment Poppulo took
    /// it. Returns each row's result.
    async fn run_part(
        &mut self,
        ledger: &JobLedger<PostedImport>,
        part: &ImportPart,
        ctx: &mut SinkContext<'_>,
    ) -> Result<PartResult, ConnectorError> {
        if ctx.cancel.is_cancelled() {
            return Err(ConnectorError::Cancelled);
        }
        let unknown = |reason: String| PartResult {
            results: vec![RowResult::Unknown(reason); part.rows.len()],
            all_counted: false,
        };
        tracing::info!(rows = part.rows.len(), "posting a Poppulo import job");
        let posted_at = Utc::now();
        self.imports += 1;
        let imports = follow::Imports { sink: self };
        let entry = |href: String| PostedImport {
            href,
            changes: part.rows.iter().map(|r| r.change).collect(),
            columns: part.columns.clone(),
            rows: part.rows.clone(),
            new_only: matches!(part.group, Group::NewOnly(_)),
        };
        let submitted = JobFollower::new(&imports, ledger, self.timing())
            .submit(part.xml.clone(), entry, ctx)
            .await?;
        let completed = match submitted {
            Submitted::Followed(Followed::Completed(completed)) => completed,
            Submitted::Unknown(why) | Submitted::Refused(why) => {
                // Not posted again: whatever Poppulo did with it, the engine sends these
                // rows again next run (an import is an upsert, so both converge).
                tracing::warn!(
                    "Poppulo may or may not have taken the import ({why}); not posting it again"
                );
                ctx.progress.note(&format!(
                    "Poppulo may or may not have taken an import ({why}); its rows are sent again next run"
                ));
                return Ok(unknown(format!("the import's answer was lost ({why}): whether Poppulo took it is unknown; sent again next run")));
            }
            // Pending: kept in the ledger, the next run resumes following it.
            Submitted::Followed(Followed::Pending(reason) | Followed::Ended(reason)) => {
                return Ok(unknown(reason))
            }
        };
        let mut results = completed.verdicts.clone();
        // A `NewOnly` import skips the people Poppulo holds: on purpose, and the import
        // after it updates them.
        if !matches!(part.group, Group::NewOnly(_)) {
            let reads = self
                .reconcile(&part.rows, &mut results, &completed, posted_at, &ctx.cancel)
                .await?;
            self.reads += reads;
        }
        Ok(PartResult {
            results,
            all_counted: completed.uncounted == 0,
        })
    }
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

/// The import an earlier version's stored value names: one href carrying every change
/// of the batch.
fn legacy_posted(value: &str, changes: usize, columns: Vec<String>) -> Vec<PostedImport> {
    vec![PostedImport {
        href: value.trim().to_string(),
        changes: (0..changes).collect(),
        columns,
        rows: Vec::new(),
        new_only: false,
    }]
}

fn status_cell(status: ContactStatus) -> &'static str {
    match status {
        ContactStatus::Active => "ACTIVE",
        ContactStatus::Inactive => "INACTIVE",
        ContactStatus::OptedOut => "OPT_OUT",
    }
}

/// Each change's outcome from its rows' results: the person's rows decide (the last
/// one sent, unless any is unknown: then the change is sent again); an old address
/// that could not be removed makes the change one to send again. A removal row Poppulo
/// skipped as a duplicate of an earlier row of its import found its address removed
/// already: done, not retried.
fn combine(known: Vec<Outcome>, rows: &[SentRow], results: &[RowResult]) -> Vec<Outcome> {
    let mut out = known;
    let mut unknown: Vec<Option<String>> = vec![None; out.len()];
    let mut old: Vec<Option<&RowResult>> = vec![None; out.len()];
    for (row, result) in rows.iter().zip(results) {
        if row.old_address {
            old[row.change] = Some(result);
            continue;
        }
        if let RowResult::Unknown(reason) = result {
            unknown[row.change].get_or_insert_with(|| reason.clone());
        }
        out[row.change] = match result {
            RowResult::Rejected(RejectionKind::Duplicate) if row.removal => Outcome::applied(),
            result => outcome(result),
        };
    }
    for (i, reason) in unknown.into_iter().enumerate() {
        if let Some(reason) = reason {
            out[i] = Outcome::Unknown { reason };
        }
    }
    for (i, result) in old.into_iter().enumerate() {
        let Some(result) = result else { continue };
        if !matches!(out[i], Outcome::Applied { .. }) {
            continue;
        }
        match result {
            RowResult::Applied
            | RowResult::Rejected(RejectionKind::OptedOut | RejectionKind::Duplicate)
            | RowResult::Skipped(_) => {}
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

/// Maps Poppulo's rejected rows back onto the rows by email (compared ignoring case):
/// a duplicate is a later row with an email seen earlier, so duplicates take the last
/// rows of their email; invalid and opted-out rows take the first ones not yet taken.
/// Every other row is applied. Also says how many rejected rows matched no row.
fn verdicts(emails: &[String], rejected: &[RejectedRow]) -> (Vec<RowResult>, usize) {
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
    let mut unmatched = 0;
    for row in ordered {
        let Some(indices) = by_email.get(&row.email.trim().to_lowercase()) else {
            tracing::warn!("Poppulo listed a rejected row for an email not in the import");
            unmatched += 1;
            continue;
        };
        let free = |i: &&usize| verdict[**i].is_none();
        let slot = if row.kind == RejectionKind::Duplicate {
            indices.iter().rev().find(free)
        } else {
            indices.iter().find(free)
        };
        match slot {
            Some(&i) => verdict[i] = Some(row.kind),
            None => unmatched += 1,
        }
    }
    let verdicts = verdict
        .into_iter()
        .map(|v| match v {
            None => RowResult::Applied,
            Some(kind) => RowResult::Rejected(kind),
        })
        .collect();
    (verdicts, unmatched)
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
            removal: removal_style(self.config.removal),
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
        let ledger = Self::ledger(&batch.id);
        let columns = self.columns();
        let legacy = |text: &str| Some(legacy_posted(text, batch.records.len(), columns));
        let Some(posted) = ledger.load(ctx.store, legacy)? else {
            return Ok(None);
        };
        tracing::info!(batch = %batch.id, imports = posted.len(), "resuming the Poppulo imports a previous run left running");
        // Changes in no import still followable are sent again.
        let known: Vec<Outcome> = vec![
            Outcome::Unknown {
                reason: "not part of an import a previous run left running; sent again".into(),
            };
            batch.records.len()
        ];
        let imports = follow::Imports { sink: self };
        let follower = JobFollower::new(&imports, &ledger, self.timing());
        let mut rows: Vec<SentRow> = Vec::new();
        let mut results: Vec<RowResult> = Vec::new();
        for import in posted {
            ctx.progress.note(&format!(
                "resuming Poppulo import {} of batch {}",
                import_id(&import.href),
                batch.id
            ));
            // The rows as sent; an import stored by an earlier version names only its
            // changes, which are then taken at the address they carry.
            let sent: Vec<SentRow> = if import.rows.is_empty() {
                import
                    .changes
                    .iter()
                    .filter_map(|&i| {
                        let record = batch.records.get(i)?;
                        Some(SentRow {
                            change: i,
                            email: record.email.as_deref().and_then(Contact::normalize_email)?,
                            old_address: false,
                            status: None,
                            create: record.kind == ChangeKind::Create,
                            removal: record.kind == ChangeKind::Remove,
                        })
                    })
                    .collect()
            } else {
                import
                    .rows
                    .iter()
                    .filter(|r| r.change < batch.records.len())
                    .cloned()
                    .collect()
            };
            let unknown = |reason: &str| vec![RowResult::Unknown(reason.to_string()); sent.len()];
            let entry = PostedImport {
                rows: sent.clone(),
                ..import
            };
            let verdicts = match follower.follow(&entry, ctx).await {
                Ok(Followed::Completed(followed)) => {
                    if followed.uncounted > 0 && !entry.new_only {
                        // Which rows Poppulo skipped is not known here: the applied
                        // ones are sent again (the next run's own import reconciles).
                        followed
                            .verdicts
                            .into_iter()
                            .map(|v| match v {
                                RowResult::Applied => RowResult::Unknown(
                                    "Poppulo skipped some rows of the resumed import; sent again"
                                        .into(),
                                ),
                                v => v,
                            })
                            .collect()
                    } else if followed.uncounted > 0 {
                        // A `NewOnly` import skips the people Poppulo holds; whether the
                        // import after it ran is not known: sent again.
                        unknown("the resumed import created only some of its rows; sent again")
                    } else {
                        followed.verdicts
                    }
                }
                // Pending: left in the ledger, the next run follows it again.
                Ok(Followed::Pending(reason) | Followed::Ended(reason)) => unknown(&reason),
                Err(e) if cannot_be_followed(&e) => {
                    // A handle that can never be followed again must not wedge the
                    // pipeline: say so once, forget it, and let the engine send the
                    // changes again (an import is an upsert, so whatever it did converges).
                    tracing::warn!(import = %entry.href, "the import an earlier run left can no longer be followed ({e}); its changes are sent again");
                    ctx.progress.note(&format!(
                        "gave up following Poppulo import {} of an earlier run ({e}); its changes are sent again",
                        import_id(&entry.href)
                    ));
                    ledger.forget(ctx.store, &entry.href)?;
                    unknown("the import can no longer be followed; sent again")
                }
                Err(e) => return Err(e),
            };
            rows.extend(sent);
            results.extend(verdicts);
        }
        let outcomes = combine(known, &rows, &results);
        let still_running = ctx.store.get(ledger.key())?.is_some();
        if !still_running
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
        let ledger = Self::ledger(&batch.id);
        let mut rows = Vec::new();
        let mut results = Vec::new();
        // The creates a `NewOnly` import created, every one: their second row is not
        // needed.
        let mut created: std::collections::HashSet<usize> = Default::default();
        for part in parts {
            let part = if part.rows.iter().any(|r| created.contains(&r.change)) {
                match self.without_created(part, &created)? {
                    Some(part) => part,
                    None => continue,
                }
            } else {
                part
            };
            let result = self.run_part(&ledger, &part, ctx).await?;
            // Every row counted: each was created, or refused for what it holds
            // (which its second row would be too).
            if matches!(part.group, Group::NewOnly(_)) && result.all_counted {
                created.extend(part.rows.iter().map(|row| row.change));
            }
            rows.extend(part.rows);
            results.extend(result.results);
        }
        Ok(combine(known, &rows, &results))
    }

    fn summary(&self) -> SinkSummary {
        SinkSummary {
            jobs: Some(self.imports),
            reads: Some(self.reads),
            ..SinkSummary::default()
        }
    }
}

impl PoppuloSink {
    /// `part` without the rows of the creates in `created` (their `NewOnly` import
    /// created them); `None` when nothing is left.
    fn without_created(
        &self,
        part: ImportPart,
        created: &std::collections::HashSet<usize>,
    ) -> Result<Option<ImportPart>, ConnectorError> {
        let ImportPart { group, planned, .. } = part;
        let rows: Vec<Planned> = planned
            .into_iter()
            .filter(|p| !(p.follow_up && created.contains(&p.row.change)))
            .collect();
        if rows.is_empty() {
            return Ok(None);
        }
        self.part(group, rows).map(Some)
    }
}

/// How the engine is told this sink removes people.
fn removal_style(removal: Removal) -> RemovalStyle {
    match removal {
        Removal::Inactive => RemovalStyle::MarkInactive,
        Removal::OptOut => RemovalStyle::OptOut,
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
        let (out, unmatched) = verdicts(
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
        assert_eq!(
            unmatched, 1,
            "zzz@ was in no row: its verdict cannot be placed"
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
