//! Writing changes to an Actito profile table.
//!
//! Actito offers two ways in, with limits that decide between them:
//! - one profile at a time (`POST …/profile?allowUpdate=true`): immediate, but at most
//!   5 calls in flight per licence (the 6th gets 429);
//! - a bulk import: for large accumulated changes, asynchronous, one at a time on the
//!   platform, and at most **12 per table per day**.
//!
//! So [`Sink::begin`] looks at the whole run's change count and picks bulk at or above
//! `bulk_threshold`, one-by-one below it. Bulk imports are counted in the engine's state
//! (`ctx.store`, key `bulk:{entity}/{table}:{YYYY-MM-DD}`, UTC) *before* each post, so
//! that a crash after the post still counts it; a 13th is never posted: the run falls
//! back to one-by-one, or stops with [`ConnectorError::Limit`], as configured. The
//! running import's id is kept in the store until it ends, so no second import is
//! posted while one of ours runs, and a restarted run finds it again
//! ([`Sink::recover`]).
//!
//! Every record is first checked against the table's structure ([`crate::schema`]):
//! an invalid one is rejected, naming the field, and never sent. Removals are always
//! one-by-one: unsubscribe from the managed subscriptions (default) or delete.

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use contactsync_core::async_trait;
use contactsync_core::{
    Change, ChangeBatch, ChangeKind, ChangePlan, ConnectorError, JobEntry, JobFollower, Outcome,
    PendingBatch, RemovalStyle, Sink, SinkCapabilities, SinkContext, SinkSummary, Waited,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::bulk::{BulkImporter, ImportState, RejectedRow};
use crate::client::{ActitoClient, ProfileWrite};
use crate::config::{QuotaExhausted, Removal, SinkConfig, BULK_IMPORTS_PER_DAY};
use crate::cost;
use crate::schema::{load_schema, Prepared, Schema};

mod bulk_path;

/// The most changes in a batch written one profile at a time.
pub const ONE_BY_ONE_BATCH: usize = 2_000;

/// The largest zip Actito takes.
pub const MAX_ZIP_BYTES: usize = 100 * 1024 * 1024;

/// The store key counting today's (UTC) bulk imports into a table.
pub fn quota_key(entity: &str, table: &str, day: chrono::NaiveDate) -> String {
    format!("bulk:{entity}/{table}:{}", day.format("%Y-%m-%d"))
}

/// The subscriptions to send for `change`: consent belongs to the person, so only what
/// the source changed. A new profile is subscribed to what the source lists (and
/// unsubscribed from nothing: it may be someone Actito knows); a create of a profile
/// Actito holds already (a first sync into a filled table, a lost state) grants
/// nothing, since the person may have unsubscribed themselves (`exists`). An update
/// sends only the subscriptions whose value differs from the record last sent, even
/// when that record no longer validates against today's table (an opt-out is always
/// sent); without that record (a state from before records were kept) it sends none.
/// A source without subscriptions (a CSV) so never unsubscribes anyone, and a person
/// who unsubscribed in Actito is not re-subscribed until the source changes their
/// subscriptions. With the pipeline's `resubscribe`, an update sends every
/// subscription as the source has it.
fn subscription_delta(
    schema: &Schema,
    change: &Change,
    now: Vec<(String, bool)>,
    resubscribe: bool,
    exists: bool,
) -> Vec<(String, bool)> {
    match change {
        Change::Create { .. } if exists && !resubscribe => Vec::new(),
        Change::Create { .. } => now.into_iter().filter(|(_, on)| *on).collect(),
        _ if resubscribe => now,
        _ => match change.before() {
            Some(before) => {
                let before = schema.subscriptions_of(before);
                now.into_iter()
                    .filter(|(name, on)| {
                        before
                            .iter()
                            .find(|(n, _)| n == name)
                            .is_none_or(|(_, was)| was != on)
                    })
                    .collect()
            }
            None => Vec::new(),
        },
    }
}

/// The attributes to send for `change`, with fields owned by the source that provides
/// them: an attribute without a value is sent (as a clear) only when the record last
/// sent had one. With `changed_only` (one profile at a time) an update sends only the
/// attributes whose value differs from that record (and the key, which addresses the
/// profile), so that what staff edit in Actito in the other attributes stands; a bulk
/// row keeps every value, since a blank cell would clear it. Without that record (a
/// state from before records were kept) every attribute with a value is sent, and none
/// is cleared. Segmentations are sent only when they changed.
fn owned_attributes(schema: &Schema, change: &Change, prepared: &mut Prepared, changed_only: bool) {
    let before = match change {
        Change::Create { .. } => None,
        _ => change.before().and_then(|b| schema.prepare(b).ok()),
    };
    let key = schema.key_attribute().to_string();
    let was = |name: &str| -> Option<Option<String>> {
        before.as_ref().map(|b| {
            b.attributes
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| v.clone())
        })
    };
    prepared.attributes.retain(|(name, value)| {
        if *name == key {
            return true;
        }
        match (value, was(name)) {
            // No record of what was sent: send what the source has, clear nothing.
            (None, None) => false,
            (Some(_), None) => true,
            (None, Some(before)) => before.is_some(),
            (Some(v), Some(before)) => !changed_only || before.as_deref() != Some(v.as_str()),
        }
    });
    if let Some(b) = &before {
        if b.segmentations == prepared.segmentations {
            prepared.segmentations.clear();
        }
    }
}

/// The store key of the times (RFC 3339, UTC) of the table's bulk imports posted in the
/// last 24 hours: with the day's counter, no UTC day and no rolling 24 hours sees a
/// 13th import.
pub fn posts_key(entity: &str, table: &str) -> String {
    format!("bulk-posts:{entity}/{table}")
}

/// The store key of the table's import in flight.
pub fn running_key(entity: &str, table: &str) -> String {
    format!("import:{entity}/{table}")
}

/// What the store keeps of an import in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningImport {
    /// The import's id.
    pub id: String,
    /// The batch it carries.
    pub batch: String,
    /// Positions in the batch of the changes *not* in the import (rejected before
    /// sending, removals): their outcome is not the import's.
    #[serde(default)]
    pub skipped: Vec<usize>,
    /// The key column's value of each row of the file, in the file's order (the
    /// positions not `skipped`, ascending): a rejected row is matched to the person it
    /// was sent for, not to whoever the batch holds at the same place. Empty in an
    /// import stored by an older version (the keys are then worked out again).
    #[serde(default)]
    pub keys: Vec<String>,
    /// Positions whose segmentations were to follow the import one profile at a time:
    /// a resumed import leaves them unknown, so that this run's diff sends them again
    /// and nothing the batch needed is lost.
    #[serde(default)]
    pub follow_up: Vec<usize>,
}

impl JobEntry for RunningImport {
    fn handle(&self) -> &str {
        &self.id
    }
    fn rows(&self) -> usize {
        self.keys.len()
    }
}

/// How this run writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One profile at a time.
    OneByOne,
    /// A bulk import per batch.
    Bulk,
}

/// The Actito sink. Built by the `actito` [`contactsync_core::SinkFactory`].
#[derive(Debug)]
pub struct ActitoSink {
    config: SinkConfig,
    client: ActitoClient,
    schema: Option<Schema>,
    mode: Mode,
    /// The key column values (see [`Schema::existing_key`]) of the profiles the table
    /// held when the run began, when `begin` read them: who a create may not grant
    /// consent to. `None`: asked profile by profile.
    existing: Option<std::collections::HashSet<String>>,
    /// Bulk imports posted this run (for the report).
    imports: u64,
    /// How this run writes and why (`bulk: 1 import … instead of 2,400 calls …`).
    how: Option<String>,
}

/// A write to make one profile at a time.
enum Work {
    Upsert(Prepared, bool),
    Remove(Option<String>),
    /// A person whose address is their profile's key moved to a new address: the new
    /// profile is written whole, with the subscriptions the old one holds (and the
    /// source's changes to them), then the old one is removed per the removal policy.
    /// Actito has no way to change a key attribute in place.
    Move {
        new: Prepared,
        old: String,
    },
}

impl ActitoSink {
    /// A sink for `config`. Touches no network.
    pub fn new(config: SinkConfig) -> Result<Self, ConnectorError> {
        let client = ActitoClient::new(&config.connection)?;
        Ok(ActitoSink {
            config,
            client,
            schema: None,
            mode: Mode::OneByOne,
            existing: None,
            imports: 0,
            how: None,
        })
    }

    /// Profiles a listing page holds: the most Actito gives.
    const EXISTING_PAGE: usize = 1000;

    /// Reads the keys of every profile of the table, when that costs fewer calls than
    /// asking for each of `creates` profiles on its own (one page of 1,000 a call; an
    /// empty table: one call). `None` otherwise.
    async fn read_existing(
        &self,
        schema: &Schema,
        creates: u64,
    ) -> Result<Option<std::collections::HashSet<String>>, ConnectorError> {
        let mut existing = std::collections::HashSet::new();
        let mut page = 0;
        loop {
            let (_, profiles, total) = self.client.profiles_page(page, Self::EXISTING_PAGE).await?;
            if page == 0 {
                let pages = total.map(|t| t.div_ceil(Self::EXISTING_PAGE as u64));
                if pages.is_some_and(|p| p > creates) {
                    return Ok(None);
                }
            }
            existing.extend(profiles.iter().filter_map(|p| schema.listed_key(p)));
            if profiles.len() < Self::EXISTING_PAGE {
                return Ok(Some(existing));
            }
            page += 1;
            if page > creates {
                // More pages than creates after all (no total given): ask one by one.
                return Ok(None);
            }
        }
    }

    /// Whether Actito holds a profile with the key column value `key_value`.
    async fn exists(&self, schema: &Schema, key_value: &str) -> Result<bool, ConnectorError> {
        if let Some(existing) = &self.existing {
            return Ok(existing.contains(&Schema::existing_key(key_value)));
        }
        let key = format!("{}={key_value}", schema.key_attribute());
        Ok(self.client.profile(&key).await?.is_some())
    }

    /// The mode the current run uses.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The client (for tests and diagnostics).
    pub fn client(&self) -> &ActitoClient {
        &self.client
    }

    async fn schema(&mut self) -> Result<Schema, ConnectorError> {
        if let Some(s) = &self.schema {
            return Ok(s.clone());
        }
        let s = load_schema(&self.client, &self.config.mapping, &self.config.section).await?;
        self.schema = Some(s.clone());
        Ok(s)
    }

    fn quota_key_today(&self) -> String {
        quota_key(
            self.client.entity(),
            self.client.table(),
            Utc::now().date_naive(),
        )
    }

    /// Imports used: the most of today's (UTC) counter and of the posts of the last 24
    /// hours, whichever window Actito counts in.
    fn bulk_used(&self, ctx: &SinkContext<'_>) -> Result<u32, ConnectorError> {
        let today: u32 = ctx
            .store
            .get(&self.quota_key_today())?
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let rolling = self.recent_posts(ctx)?.len() as u32;
        Ok(today.max(rolling))
    }

    /// The posts of the last 24 hours.
    fn recent_posts(
        &self,
        ctx: &SinkContext<'_>,
    ) -> Result<Vec<chrono::DateTime<Utc>>, ConnectorError> {
        let key = posts_key(self.client.entity(), self.client.table());
        let since = Utc::now() - chrono::Duration::hours(24);
        Ok(ctx
            .store
            .get(&key)?
            .and_then(|v| serde_json::from_str::<Vec<chrono::DateTime<Utc>>>(&v).ok())
            .unwrap_or_default()
            .into_iter()
            .filter(|t| *t > since)
            .collect())
    }

    /// Counts one post, before it is made: a crash after the post must still count it.
    fn count_post(&self, used_today: u32, ctx: &mut SinkContext<'_>) -> Result<(), ConnectorError> {
        ctx.store
            .put(&self.quota_key_today(), &(used_today + 1).to_string())?;
        let mut posts = self.recent_posts(ctx)?;
        posts.push(Utc::now());
        let json =
            serde_json::to_string(&posts).map_err(|e| ConnectorError::Other(e.to_string()))?;
        ctx.store
            .put(&posts_key(self.client.entity(), self.client.table()), &json)
    }

    /// The quota is used up: one-by-one from now on, or stop, as configured.
    fn quota_exhausted(&mut self, why: &str, ctx: &SinkContext<'_>) -> Result<(), ConnectorError> {
        match self.config.when_bulk_quota_exhausted {
            QuotaExhausted::OneByOne => {
                tracing::warn!("{why}; sending the changes one profile at a time instead");
                ctx.progress
                    .note(&format!("{why}; sending the changes one by one"));
                self.mode = Mode::OneByOne;
                Ok(())
            }
            QuotaExhausted::Stop => Err(ConnectorError::Limit(format!(
                "{why}; `when_bulk_quota_exhausted = \"stop\"`: nothing was sent. Run again tomorrow (UTC), or set it to \"one-by-one\""
            ))),
        }
    }

    /// The fewest rows worth an import of their own: the configured `bulk_threshold`,
    /// else the size at which an import is quicker than one call a row at the rate.
    fn group_threshold(&self) -> u64 {
        self.config
            .bulk_threshold
            .unwrap_or_else(|| cost::break_even(self.rate(), self.config.poll_interval))
    }

    /// The rate the client keeps to: the documented one unless `rate_limit` says
    /// otherwise (also when it is off against a sandbox: costs are the real service's).
    fn rate(&self) -> contactsync_http::Rate {
        self.config
            .connection
            .http
            .pace
            .rate
            .unwrap_or(cost::DOCUMENTED_RATE)
    }

    /// Waits for an import of ours that is still running (a crashed run's, or one
    /// that outlived `max_import_wait`). `false` when it still runs.
    async fn settle_running(&self, ctx: &mut SinkContext<'_>) -> Result<bool, ConnectorError> {
        let ledger = self.ledger();
        let Some(running) = ledger.load(ctx.store, |_| None)? else {
            return Ok(true);
        };
        // Only waited for, its result never read: the key column is not needed.
        let imports = bulk_path::BulkImports {
            sink: self,
            key_column: String::new(),
        };
        let follower = JobFollower::new(&imports, &ledger, self.timing());
        for import in running {
            ctx.progress.note(&format!(
                "waiting for Actito import {} (batch {}) to end before posting another",
                import.id, import.batch
            ));
            let waited = follower
                .wait(&import.id, None, ctx.progress, &ctx.cancel)
                .await?;
            if matches!(waited, Waited::Pending(_)) {
                return Ok(false);
            }
            ledger.forget(ctx.store, &import.id)?;
        }
        Ok(true)
    }

    /// Writes `work` one profile at a time, at most `concurrency` in flight, outcomes in
    /// order.
    async fn one_by_one(
        &self,
        schema: &Schema,
        work: Vec<Work>,
        cancel: contactsync_core::CancellationToken,
    ) -> Result<Vec<Outcome>, ConnectorError> {
        let now = Utc::now().format("%Y-%m-%d %H:%M:%S").to_string();
        let results: Vec<Result<Outcome, ConnectorError>> = futures::stream::iter(work)
            .map(|w| {
                let now = now.clone();
                let cancel = cancel.clone();
                async move {
                    if cancel.is_cancelled() {
                        return Ok(Outcome::Unknown {
                            reason: "cancelled before it was sent".into(),
                        });
                    }
                    let result = match w {
                        Work::Upsert(p, clear) => {
                            let body = schema.profile_body(&p, clear, &now);
                            self.client.upsert_profile(&body).await
                        }
                        Work::Remove(None) => {
                            return Ok(Outcome::Rejected {
                                reason: "cannot address the profile: no unique key value nor profile id known".into(),
                                field: None,
                                retry: false,
                            })
                        }
                        Work::Remove(Some(key)) => self.remove(schema, &key).await,
                        Work::Move { new, old } => self.move_profile(schema, new, &old, &now).await,
                    };
                    match result {
                        Ok(ProfileWrite::Done(handle)) => Ok(Outcome::Applied { handle }),
                        Ok(ProfileWrite::NotFound(_)) => Ok(Outcome::applied()),
                        Ok(ProfileWrite::Refused(reason)) => Ok(Outcome::Rejected {
                            field: schema.field_in_message(&reason),
                            reason: format!("Actito refused the profile: {reason}"),
                            retry: false,
                        }),
                        Err(e) if fatal(&e) => Err(e),
                        Err(e) => Ok(Outcome::Unknown {
                            reason: e.to_string(),
                        }),
                    }
                }
            })
            .buffered(self.config.concurrency)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Writes `new` with the subscriptions the profile at `old` holds (those the
    /// source did not change), then removes the old one.
    async fn move_profile(
        &self,
        schema: &Schema,
        mut new: Prepared,
        old: &str,
        now: &str,
    ) -> Result<ProfileWrite, ConnectorError> {
        if let Some(profile) = self.client.profile(old).await? {
            if let Ok((_, held)) = schema.contact_from(&profile) {
                for (name, on) in schema.subscriptions_of(&held) {
                    if on && !new.subscriptions.iter().any(|(n, _)| *n == name) {
                        new.subscriptions.push((name, true));
                    }
                }
            }
        }
        let body = schema.profile_body(&new, false, now);
        let written = self.client.upsert_profile(&body).await?;
        let ProfileWrite::Done(handle) = written else {
            return Ok(written);
        };
        match self.remove(schema, old).await? {
            ProfileWrite::Refused(reason) => Ok(ProfileWrite::Refused(format!(
                "the new address was written, but the old profile could not be removed: {reason}"
            ))),
            _ => Ok(ProfileWrite::Done(handle)),
        }
    }

    /// Removes one profile per the removal policy. 404s count as done: already gone.
    async fn remove(&self, schema: &Schema, key: &str) -> Result<ProfileWrite, ConnectorError> {
        match self.config.removal {
            Removal::Delete => self.client.delete_profile(key).await,
            Removal::Unsubscribe => {
                for name in schema.managed_subscriptions() {
                    match self.client.unsubscribe(key, name).await? {
                        ProfileWrite::Done(_) => {}
                        // The profile is gone, or not subscribed: either way, done.
                        ProfileWrite::NotFound(_) => {}
                        refused @ ProfileWrite::Refused(_) => return Ok(refused),
                    }
                }
                Ok(ProfileWrite::Done(None))
            }
        }
    }
}

/// The profile a change's person moves from: their address is the profile's key and
/// changed (and the old address is not someone else's now: the engine leaves such an
/// old address out of the change). Addressed by the profile id when known.
fn moved_from(schema: &Schema, change: &Change) -> Option<String> {
    if *schema.key_field() != contactsync_core::Field::Email {
        return None;
    }
    let old = change.previous_email()?;
    let new = change.contact()?.email.as_deref()?;
    if old.trim().eq_ignore_ascii_case(new.trim()) {
        return None;
    }
    let handle = change
        .previous()
        .and_then(|p| p.handle.as_deref())
        .map(str::trim)
        .filter(|h| !h.is_empty());
    Some(match handle {
        Some(id) => id.to_string(),
        None => format!("{}={}", schema.key_attribute(), old.trim()),
    })
}

/// Errors that end the batch rather than one record's write.
fn fatal(e: &ConnectorError) -> bool {
    match e {
        ConnectorError::Auth { .. } | ConnectorError::Config(_) | ConnectorError::Cancelled => true,
        ConnectorError::Call { status, .. } => matches!(status, Some(403..=406)),
        _ => false,
    }
}

#[async_trait]
impl Sink for ActitoSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities {
            // People are found by their email address.
            addresses_by_email: true,
            mixes_removals: false,
            // One import a batch in bulk; one by one, small batches keep memory low
            // and record outcomes as they come.
            max_batch: match self.mode {
                Mode::Bulk => self.config.max_batch,
                Mode::OneByOne => self.config.max_batch.min(ONE_BY_ONE_BATCH),
            },
            asynchronous_jobs: true,
            durable_at_finish: false,
            removal: removal_style(self.config.removal),
        }
    }

    async fn check(&mut self) -> Result<(), ConnectorError> {
        self.schema = None;
        self.schema().await.map(|_| ())
    }

    fn summary(&self) -> SinkSummary {
        SinkSummary {
            jobs: Some(self.imports),
            how: self.how.clone(),
            ..SinkSummary::default()
        }
    }

    async fn recover(
        &mut self,
        batch: &PendingBatch,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Option<Vec<Outcome>>, ConnectorError> {
        let ledger = self.ledger();
        let Some(running) = ledger
            .load(ctx.store, |_| None)?
            .and_then(|r| r.into_iter().find(|r| r.batch == batch.id))
        else {
            return Ok(None);
        };
        tracing::info!(batch = %batch.id, import = %running.id, "resuming the Actito import a previous run left running");
        ctx.progress.note(&format!(
            "resuming Actito import {} of batch {}",
            running.id, batch.id
        ));
        let schema = self.schema().await?;
        // The file's rows are the batch's positions not skipped, in order.
        let skipped: HashSet<usize> = running.skipped.iter().copied().collect();
        let follow_up: HashSet<usize> = running.follow_up.iter().copied().collect();
        let positions: Vec<usize> = (0..batch.records.len())
            .filter(|i| !skipped.contains(i))
            .collect();
        let keys: Vec<String> = if running.keys.len() == positions.len() {
            running.keys.clone()
        } else {
            // Stored by an older version: worked out again from the batch.
            let mut keys = Vec::with_capacity(positions.len());
            for &i in &positions {
                let r = &batch.records[i];
                match schema.key_value_of(&r.key, r.email.as_deref()) {
                    Some(k) if r.kind != ChangeKind::Remove => keys.push(k),
                    _ => {
                        tracing::warn!(batch = %batch.id, "the rows of the resumed import cannot be told apart; the batch is sent again");
                        return Ok(None);
                    }
                }
            }
            keys
        };
        let rows = keys.len();
        let imports = bulk_path::BulkImports {
            sink: self,
            key_column: schema.key_attribute().to_string(),
        };
        let entry = RunningImport { keys, ..running };
        let followed = JobFollower::new(&imports, &ledger, self.timing())
            .follow(&entry, ctx)
            .await?;
        let results = bulk_path::outcomes_of(followed, rows);
        // What the import did not carry (removals, rows of another import, rows that
        // go one by one) and segmentations still to follow are unknown: this run's
        // diff sends them again, so the resumed batch does all the first run would.
        let mut outcomes = vec![
            Outcome::Unknown {
                reason: "not part of the resumed import; sent again by this run".into(),
            };
            batch.records.len()
        ];
        for (i, o) in positions.into_iter().zip(results) {
            outcomes[i] = if matches!(o, Outcome::Applied { .. }) && follow_up.contains(&i) {
                Outcome::Unknown {
                    reason: "its segmentations follow the import; sent again by this run".into(),
                }
            } else {
                o
            };
        }
        Ok(Some(outcomes))
    }

    async fn begin(
        &mut self,
        plan: &ChangePlan,
        ctx: &mut SinkContext<'_>,
    ) -> Result<(), ConnectorError> {
        // The structure may have changed since the last run.
        self.schema = None;
        let schema = self.schema().await?;
        self.imports = 0;
        // Who exists already, when creates may grant subscriptions: read once when
        // that is cheaper than asking for each.
        self.existing = if plan.creates > 0 && schema.managed_subscriptions().next().is_some() {
            self.read_existing(&schema, plan.creates).await?
        } else {
            None
        };
        // Bulk or one by one, on the time each takes at the rate the client keeps to
        // (the documented one unless `rate_limit` says otherwise).
        let rate = self.rate();
        let used = self.bulk_used(ctx)?;
        let choice = cost::choose(
            plan,
            rate,
            self.config.max_batch,
            self.config.poll_interval,
            self.config.bulk_threshold,
            // None left: the quota rule below decides (fall back or stop).
            BULK_IMPORTS_PER_DAY.saturating_sub(used).max(1),
        );
        self.mode = if choice.bulk {
            Mode::Bulk
        } else {
            Mode::OneByOne
        };
        if plan.total() > 0 {
            tracing::info!("Actito: {choice}");
            ctx.progress.note(&format!("Actito {choice}"));
            self.how = Some(choice.to_string());
        }
        if self.mode == Mode::Bulk && used >= BULK_IMPORTS_PER_DAY {
            self.quota_exhausted(
                &format!(
                    "the {BULK_IMPORTS_PER_DAY} bulk imports Actito allows per table per day are used"
                ),
                ctx,
            )?;
        }
        tracing::info!(changes = plan.total(), mode = ?self.mode, "Actito sink run starts");
        Ok(())
    }

    async fn apply(
        &mut self,
        batch: &ChangeBatch,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Vec<Outcome>, ConnectorError> {
        let schema = self.schema().await?;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.changes.len()];
        let mut upserts: Vec<(usize, Prepared, bool)> = Vec::new();
        let mut removals: Vec<(usize, Option<String>)> = Vec::new();
        let mut moves: Vec<(usize, Work)> = Vec::new();
        for (i, change) in batch.changes.iter().enumerate() {
            match change {
                Change::Create { contact, .. } | Change::Update { contact, .. } => {
                    match schema.prepare(contact) {
                        Ok(mut p) => {
                            if let Some(old) = moved_from(&schema, change) {
                                p.subscriptions = subscription_delta(
                                    &schema,
                                    change,
                                    p.subscriptions,
                                    ctx.resubscribe,
                                    false,
                                );
                                // A new profile: every attribute with a value, none cleared.
                                let key = schema.key_attribute().to_string();
                                p.attributes.retain(|(n, v)| *n == key || v.is_some());
                                moves.push((i, Work::Move { new: p, old }));
                                continue;
                            }
                            let grants = p.subscriptions.iter().any(|(_, on)| *on);
                            let create = change.kind() == ChangeKind::Create;
                            // In bulk, every create is asked about (one table read in
                            // `begin`): a profile new to Actito gets a `Y` or `N` cell
                            // for every managed subscription, so that all new profiles
                            // share one import.
                            let full_row =
                                create && self.mode == Mode::Bulk && !p.subscriptions.is_empty();
                            let exists = create
                                && (grants || full_row)
                                && !ctx.resubscribe
                                && self.exists(&schema, &p.key_value).await?;
                            let every = p.subscriptions.clone();
                            p.subscriptions = subscription_delta(
                                &schema,
                                change,
                                p.subscriptions,
                                ctx.resubscribe,
                                exists,
                            );
                            // New to Actito: an `N` withdraws nothing it could have.
                            if full_row && !exists {
                                p.subscriptions = every;
                            }
                            owned_attributes(&schema, change, &mut p, self.mode == Mode::OneByOne);
                            upserts.push((i, p, change.kind() == ChangeKind::Update))
                        }
                        Err(invalid) => {
                            tracing::debug!(key = %change.key(), field = ?invalid.field, "rejected before sending: {}", invalid.reason);
                            outcomes[i] = Some(Outcome::Rejected {
                                reason: invalid.reason,
                                field: invalid.field,
                                retry: true,
                            });
                        }
                    }
                }
                Change::Remove { key, previous, .. } => removals.push((
                    i,
                    schema.profile_key(key, previous.email.as_deref(), previous.handle.as_deref()),
                )),
            }
        }
        let mut work: Vec<(usize, Work)> = Vec::new();
        if self.mode == Mode::Bulk && !upserts.is_empty() {
            // A row never carries a cell for an attribute its own change does not set
            // (a blank cell clears it): rows with different sets of attributes go into
            // different imports. The largest set goes first; another set gets an
            // import of its own while the day's budget lasts and it is large enough
            // for bulk (`bulk_threshold`), else its rows go one by one.
            let mut groups: std::collections::BTreeMap<Vec<String>, Vec<(usize, Prepared, bool)>> =
                Default::default();
            for (i, p, clear) in upserts {
                // The cells a row has: its attributes and its subscriptions.
                let names: Vec<String> = p
                    .attributes
                    .iter()
                    .map(|(n, _)| n.clone())
                    .chain(
                        p.subscriptions
                            .iter()
                            .map(|(n, _)| format!("subscription:{n}")),
                    )
                    .collect();
                groups.entry(names).or_default().push((i, p, clear));
            }
            let mut groups: Vec<Vec<(usize, Prepared, bool)>> = groups.into_values().collect();
            groups.sort_by_key(|g| std::cmp::Reverse(g.len()));
            for (n, group) in groups.into_iter().enumerate() {
                let worth_an_import = n == 0 || group.len() as u64 >= self.group_threshold();
                if self.mode != Mode::Bulk || !worth_an_import {
                    work.extend(group.into_iter().map(|(i, p, c)| (i, Work::Upsert(p, c))));
                    continue;
                }
                let in_group: HashSet<usize> = group.iter().map(|(i, _, _)| *i).collect();
                let skipped: Vec<usize> = (0..batch.changes.len())
                    .filter(|i| !in_group.contains(i))
                    .collect();
                let (rows, clears): (Vec<(usize, Prepared)>, Vec<bool>) =
                    group.into_iter().map(|(i, p, c)| ((i, p), c)).unzip();
                let follow_up: Vec<usize> = rows
                    .iter()
                    .filter(|(_, p)| !p.segmentations.is_empty())
                    .map(|(i, _)| *i)
                    .collect();
                match self
                    .bulk(&schema, batch, &rows, skipped, follow_up, ctx)
                    .await?
                {
                    Some(results) => {
                        // A bulk row carries attributes and subscriptions (`Y`/`N`
                        // columns): the segmentations the source changed follow one
                        // profile at a time, and a person is recorded as applied only
                        // when both went through.
                        for ((i, p), o) in rows.iter().zip(results) {
                            if matches!(o, Outcome::Applied { .. }) && !p.segmentations.is_empty() {
                                let only = Prepared {
                                    key_value: p.key_value.clone(),
                                    attributes: p
                                        .attributes
                                        .iter()
                                        .filter(|(n, _)| n == schema.key_attribute())
                                        .cloned()
                                        .collect(),
                                    subscriptions: Vec::new(),
                                    segmentations: p.segmentations.clone(),
                                };
                                work.push((*i, Work::Upsert(only, false)));
                            } else {
                                outcomes[*i] = Some(o);
                            }
                        }
                    }
                    None => work.extend(
                        rows.into_iter()
                            .zip(clears)
                            .map(|((i, p), c)| (i, Work::Upsert(p, c))),
                    ),
                }
            }
        } else {
            work.extend(upserts.into_iter().map(|(i, p, c)| (i, Work::Upsert(p, c))));
        }
        work.extend(moves);
        work.extend(removals.into_iter().map(|(i, k)| (i, Work::Remove(k))));
        work.sort_by_key(|(i, _)| *i);
        let positions: Vec<usize> = work.iter().map(|(i, _)| *i).collect();
        let results = self
            .one_by_one(
                &schema,
                work.into_iter().map(|(_, w)| w).collect(),
                ctx.cancel.clone(),
            )
            .await?;
        for (i, o) in positions.into_iter().zip(results) {
            outcomes[i] = Some(o);
        }
        Ok(Outcome::each_or_unknown(outcomes, "not handled"))
    }
}

/// How the engine is told this sink removes people.
fn removal_style(removal: Removal) -> RemovalStyle {
    match removal {
        Removal::Unsubscribe => RemovalStyle::Unsubscribe,
        Removal::Delete => RemovalStyle::Delete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mapping;
    use crate::schema::TableStructure;
    use contactsync_core::{Contact, ContactKey, ContactStatus, Field, Origin};
    use serde_json::json;

    fn schema() -> Schema {
        let structure = TableStructure::parse(&json!({
            "attributes": [
                {"name": "emailAddress", "type": "EMAIL_ADDRESS", "unique": true, "mandatory": true},
                {"name": "customerId", "type": "CUSTOM", "valueType": "STRING", "unique": true}
            ],
            "subscriptions": [{"name": "Newsletter"}, {"name": "Events"}]
        }))
        .expect("structure");
        let mut mapping = Mapping::default();
        mapping
            .attributes
            .insert(Field::ExternalId, Some("customerId".into()));
        Schema::resolve(structure, &mapping).expect("schema")
    }

    fn person(status: ContactStatus, subscriptions: &[&str]) -> Contact {
        Contact {
            external_id: Some("E1".into()),
            email: Some("ann@example.com".into()),
            status,
            subscriptions: subscriptions.iter().map(|s| s.to_string()).collect(),
            ..Contact::default()
        }
    }

    fn update(before: Contact, after: Contact) -> Change {
        contactsync_testkit::changes::update_from(&before, after)
    }

    #[test]
    fn an_opt_out_is_sent_even_when_the_record_last_sent_no_longer_validates() {
        let schema = schema();
        // Last sent when the table still had a `Flyer` subscription.
        let before = person(ContactStatus::Active, &["Newsletter", "Flyer"]);
        assert!(schema.prepare(&before).is_err());
        let after = person(ContactStatus::OptedOut, &["Newsletter"]);
        let now = schema.prepare(&after).expect("valid").subscriptions;
        let delta = subscription_delta(&schema, &update(before, after), now, false, false);
        assert_eq!(delta, [("Newsletter".to_string(), false)]);
    }

    #[test]
    fn a_create_of_a_profile_actito_holds_grants_nothing() {
        let schema = schema();
        let contact = person(ContactStatus::Active, &["Newsletter"]);
        let now = schema.prepare(&contact).expect("valid").subscriptions;
        let create = Change::Create {
            key: ContactKey::ExternalId("E1".into()),
            contact,
            origin: Origin::Derived,
        };
        assert_eq!(
            subscription_delta(&schema, &create, now.clone(), false, false),
            [("Newsletter".to_string(), true)]
        );
        assert!(subscription_delta(&schema, &create, now.clone(), false, true).is_empty());
        assert_eq!(
            subscription_delta(&schema, &create, now, true, true).len(),
            1,
            "resubscribe: the user said so"
        );
    }
}
