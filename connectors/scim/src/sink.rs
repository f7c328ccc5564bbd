//! Writing changes into a SCIM service provider.
//!
//! Each batch goes in three steps:
//! 1. **Prepare**, at most 4 calls in flight: a create looks the user up first (`filter=
//!    userName eq "…"`, or `externalId`), and adopts one found (its `id` becomes the
//!    handle, and a PATCH brings the fields the source has; a user an admin
//!    deactivated stays deactivated) instead of POSTing a second; an update or a
//!    removal addresses the user by the handle kept from the last sync (looked up when
//!    the state has none). With `update = "put"` (or a server without PATCH), the user
//!    is read here, to be written back whole.
//! 2. **Write**: in `/Bulk` requests within the server's `maxOperations` and
//!    `maxPayloadSize` when it supports them, `bulkId`s for creates; otherwise one call
//!    a change, at most 4 in flight. Each answer is the change's outcome; a refusal is
//!    a reject with the server's `detail`. A create answered 409 `uniqueness` is looked
//!    up and adopted, never POSTed again; a create whose answer was lost is looked up,
//!    and stays pending (sent again next run, which looks it up first) if not found. A
//!    PUT answered 412 reads the user again, once.
//! 3. **Groups**: for the subscriptions named in `groups`, one PATCH a group adds and
//!    removes the batch's members, with the consent rules of subscriptions: a new user
//!    joins the groups of their subscriptions; an adopted one joins none (they may have
//!    left on their own); an update changes only what the source changed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use contactsync_core::{
    async_trait, Change, ChangeBatch, ChangePlan, ConnectorError, Contact, Outcome, RemovalStyle,
    Sink, SinkCapabilities, SinkContext, SinkIntegrity, SinkSummary,
};
use contactsync_http::Method;
use futures::stream::{self, StreamExt};
use serde_json::{json, Map, Value};

use crate::client::{id_from_location, patch_body, Provider, ScimClient, ScimFault, Written};
use crate::config::{MatchOn, Removal, ScimConfig, UpdateStyle, UserNameFrom};
use crate::user::apply_locally;

/// Calls in flight at once when writing one by one (and when looking users up).
pub const IN_FLIGHT: usize = 4;

/// The SCIM sink. Built by the `scim` [`contactsync_core::SinkFactory`].
#[derive(Debug)]
pub struct ScimSink {
    config: ScimConfig,
    client: ScimClient,
    provider: Option<Provider>,
    /// Subscription -> the id of its group, resolved once a run.
    group_ids: Option<BTreeMap<String, String>>,
    /// The app's users, read once in `begin` for a run with many creates.
    app: Option<index::AppIndex>,
    /// What `check` found the server supports.
    described: Option<String>,
    tally: Tally,
}

/// The calls of the run, for the summary.
#[derive(Debug, Default)]
struct Tally {
    lookups: AtomicU64,
    writes: AtomicU64,
    bulk_requests: AtomicU64,
}

impl Tally {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// What a change needs written, once prepared.
#[derive(Debug)]
enum Step {
    /// Nothing to write: the outcome is known.
    Done(Outcome),
    /// `POST /Users`.
    Create(Map<String, Value>),
    /// A write to the user `id`.
    Write {
        id: String,
        write: UserWrite,
        /// A removal: a user already gone is what was asked.
        removal: bool,
        /// For an update: the user to create when the app no longer has them.
        recreate: Option<Map<String, Value>>,
    },
}

#[derive(Debug)]
enum UserWrite {
    Patch(Vec<Value>),
    /// The user as read, with the operations applied, and its version.
    Put {
        user: Map<String, Value>,
        etag: Option<String>,
        ops: Vec<Value>,
    },
    Delete,
}

/// A prepared change: its step, and whether a create adopted a user the app had.
#[derive(Debug)]
struct Prepared {
    step: Step,
    adopted: bool,
}

impl Prepared {
    fn done(outcome: Outcome) -> Self {
        Prepared {
            step: Step::Done(outcome),
            adopted: false,
        }
    }
}

fn applied(id: &str) -> Outcome {
    Outcome::Applied {
        handle: Some(id.to_string()),
    }
}

fn refused(fault: &ScimFault) -> Outcome {
    Outcome::Rejected {
        reason: fault.to_string(),
        field: None,
        // A value taken by another user may be freed; a malformed one will not mend.
        retry: fault.status == 409,
    }
}

fn unknown(reason: impl Into<String>) -> Outcome {
    Outcome::Unknown {
        reason: reason.into(),
    }
}

impl ScimSink {
    /// A sink for `config`. Touches no network.
    pub fn new(config: ScimConfig) -> Result<Self, ConnectorError> {
        Ok(ScimSink {
            client: ScimClient::new(&config.connection)?,
            config,
            provider: None,
            group_ids: None,
            app: None,
            described: None,
            tally: Tally::default(),
        })
    }

    /// Reads the server's ServiceProviderConfig (once) and resolves the groups.
    async fn ready(&mut self) -> Result<(), ConnectorError> {
        if self.provider.is_none() {
            let provider = self.client.provider().await?;
            tracing::info!(
                "SCIM server {}: {provider}",
                self.config.connection.http.base_url
            );
            self.provider = Some(provider);
        }
        if self.group_ids.is_none() {
            let mut ids = BTreeMap::new();
            for (subscription, name) in &self.config.groups {
                let group = self.client.find("Groups", "displayName", name).await?;
                let id = group
                    .as_ref()
                    .and_then(|g| g.get("id"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ConnectorError::Other(format!(
                            "the group {name:?} (groups.{subscription}) does not exist in the app: \
                             create it there, or remove it from `groups`"
                        ))
                    })?;
                ids.insert(subscription.clone(), id.to_string());
            }
            self.group_ids = Some(ids);
        }
        Ok(())
    }

    fn provider(&self) -> Provider {
        self.provider.clone().unwrap_or(Provider {
            patch: true,
            bulk: None,
            filter: true,
            max_results: None,
            etag: false,
        })
    }

    fn puts(&self) -> bool {
        match self.config.update {
            UpdateStyle::Put => true,
            UpdateStyle::Patch => false,
            UpdateStyle::Auto => !self.provider().patch,
        }
    }

    /// The attribute and value `match_on` finds `contact` by: `externalId` when asked
    /// and the contact has one, else `userName`.
    fn match_key(&self, contact: &Contact) -> Option<(&'static str, String)> {
        match (self.config.match_on, &contact.external_id) {
            (MatchOn::ExternalId, Some(id)) => Some(("externalId", id.clone())),
            _ => self
                .config
                .mapping
                .user_name(contact)
                .map(|n| ("userName", n)),
        }
    }

    /// The user the app holds for `contact`, found by `match_on`.
    async fn lookup(
        &self,
        contact: &Contact,
    ) -> Result<Option<Map<String, Value>>, ConnectorError> {
        self.lookup_by(self.match_key(contact)).await
    }

    /// The user whose `attr` is `value`: from the app's users read in `begin` when
    /// the run read them, else asked of the app.
    async fn lookup_by(
        &self,
        key: Option<(&str, String)>,
    ) -> Result<Option<Map<String, Value>>, ConnectorError> {
        let Some((attr, value)) = key else {
            return Ok(None);
        };
        if let Some(app) = &self.app {
            let Some(id) = app.id(attr, &value) else {
                return Ok(None);
            };
            Tally::add(&self.tally.lookups, 1);
            return Ok(self.client.get(id).await?.map(|(user, _)| user));
        }
        self.find_live(Some((attr, value))).await
    }

    /// The user whose `attr` is `value`, asked of the app now (after a create that may
    /// have happened, the users read at the start are out of date).
    async fn find_live(
        &self,
        key: Option<(&str, String)>,
    ) -> Result<Option<Map<String, Value>>, ConnectorError> {
        let Some((attr, value)) = key else {
            return Ok(None);
        };
        Tally::add(&self.tally.lookups, 1);
        self.client.find("Users", attr, &value).await
    }

    /// The write of `ops` to the user `id`: a PATCH, or the user read and PUT back.
    async fn write_step(
        &self,
        id: &str,
        ops: Vec<Value>,
        known: Option<&Map<String, Value>>,
        removal: bool,
        recreate: Option<Map<String, Value>>,
    ) -> Result<Step, ConnectorError> {
        let write = if self.puts() {
            let read = match known {
                Some(user) => Some((user.clone(), version(user))),
                None => {
                    Tally::add(&self.tally.lookups, 1);
                    self.client.get(id).await?
                }
            };
            let Some((mut user, etag)) = read else {
                return Ok(match recreate {
                    Some(body) => Step::Create(body),
                    None => Step::Done(Outcome::applied()),
                });
            };
            apply_locally(&mut user, &ops);
            UserWrite::Put { user, etag, ops }
        } else {
            UserWrite::Patch(ops)
        };
        Ok(Step::Write {
            id: id.to_string(),
            write,
            removal,
            recreate,
        })
    }

    async fn prepare(
        &self,
        change: &Change,
        resubscribe: bool,
    ) -> Result<Prepared, ConnectorError> {
        let mapping = &self.config.mapping;
        match change {
            Change::Create { contact, .. } => {
                let body = match mapping.to_user(contact) {
                    Ok(body) => body,
                    Err(reason) => {
                        return Ok(Prepared::done(Outcome::Rejected {
                            reason,
                            field: Some(mapping.user_name_from().field().name().to_string()),
                            retry: false,
                        }))
                    }
                };
                match self.lookup(contact).await? {
                    Some(user) => self.adopt(user, contact).await,
                    None => Ok(Prepared {
                        step: Step::Create(body),
                        adopted: false,
                    }),
                }
            }
            Change::Update {
                contact, previous, ..
            } => {
                let recreate = mapping.to_user(contact).ok();
                let id = match &previous.handle {
                    Some(id) => id.clone(),
                    None => {
                        let by = change.before().unwrap_or(contact);
                        match self.lookup(by).await? {
                            Some(user) => return self.adopt(user, contact).await,
                            None => {
                                return Ok(Prepared::done(match recreate {
                                    Some(_) => {
                                        unknown("not found in the app; looked up again next run")
                                    }
                                    None => Outcome::rejected(
                                        "the contact has no userName to find or create it by",
                                    ),
                                }))
                            }
                        }
                    }
                };
                let ops =
                    mapping.update_ops(change.before(), contact, change.sends_status(resubscribe));
                if ops.is_empty() {
                    return Ok(Prepared::done(applied(&id)));
                }
                let step = self.write_step(&id, ops, None, false, recreate).await?;
                Ok(Prepared {
                    step,
                    adopted: false,
                })
            }
            Change::Remove { previous, .. } => {
                let id = match &previous.handle {
                    Some(id) => Some(id.clone()),
                    None => match previous.record.as_deref() {
                        Some(record) => self
                            .lookup(record)
                            .await?
                            .and_then(|u| u.get("id").and_then(Value::as_str).map(str::to_string)),
                        None => None,
                    },
                };
                // Nobody to remove: what was asked holds already.
                let Some(id) = id else {
                    return Ok(Prepared::done(Outcome::applied()));
                };
                let step = match self.config.removal {
                    Removal::Delete => Step::Write {
                        id,
                        write: UserWrite::Delete,
                        removal: true,
                        recreate: None,
                    },
                    Removal::Deactivate => {
                        let ops =
                            vec![json!({ "op": "replace", "path": "active", "value": false })];
                        self.write_step(&id, ops, None, true, None).await?
                    }
                };
                Ok(Prepared {
                    step,
                    adopted: false,
                })
            }
        }
    }

    /// Adopting the user the app has for a create: their `id` is the handle, and the
    /// fields the source has are brought in.
    async fn adopt(
        &self,
        user: Map<String, Value>,
        contact: &Contact,
    ) -> Result<Prepared, ConnectorError> {
        let Some(id) = user.get("id").and_then(Value::as_str).map(str::to_string) else {
            return Ok(Prepared::done(unknown(
                "the app found the user but gave no id",
            )));
        };
        // A user of the app with another external id is another person who held the
        // userName (an address given to a new hire): never taken over.
        let theirs = user.get("externalId").and_then(Value::as_str);
        if let (Some(theirs), Some(ours)) = (theirs, contact.external_id.as_deref()) {
            if theirs != ours {
                return Ok(Prepared::done(Outcome::Rejected {
                    reason: format!(
                        "the app's user {id} has this userName and another externalId ({theirs}): \
                         another person; rename or remove them in the app"
                    ),
                    field: Some(
                        self.config
                            .mapping
                            .user_name_from()
                            .field()
                            .name()
                            .to_string(),
                    ),
                    retry: true,
                }));
            }
        }
        let ops = self.config.mapping.adopt_ops(&user, contact);
        let step = if ops.is_empty() {
            Step::Done(applied(&id))
        } else {
            self.write_step(&id, ops, Some(&user), false, None).await?
        };
        Ok(Prepared {
            step,
            adopted: true,
        })
    }

    /// Carries out one step with single calls.
    async fn execute(
        &self,
        step: &Step,
        contact: Option<&Contact>,
    ) -> Result<(Outcome, bool), ConnectorError> {
        match step {
            Step::Done(outcome) => Ok((outcome.clone(), false)),
            Step::Create(body) => self.create(body, contact).await,
            Step::Write {
                id,
                write,
                removal,
                recreate,
            } => {
                Tally::add(&self.tally.writes, 1);
                let written = match write {
                    UserWrite::Patch(ops) => self.client.patch("Users", id, ops, None).await?,
                    UserWrite::Delete => {
                        self.client
                            .write(Method::DELETE, "Users", id, None, None)
                            .await?
                    }
                    UserWrite::Put { user, etag, ops } => {
                        let first = self.put(id, user, etag.as_deref()).await?;
                        if first == Written::Stale {
                            // Someone changed the user since it was read: read it once more.
                            match self.client.get(id).await? {
                                Some((mut fresh, etag)) => {
                                    apply_locally(&mut fresh, ops);
                                    self.put(id, &fresh, etag.as_deref()).await?
                                }
                                None => Written::Gone,
                            }
                        } else {
                            first
                        }
                    }
                };
                Ok(match (written, recreate) {
                    (Written::Done(_), _) => (applied(id), false),
                    (Written::Gone, _) if *removal => (Outcome::applied(), false),
                    (Written::Gone, Some(body)) => return self.create(body, contact).await,
                    (Written::Gone, None) => (unknown("the user is no longer in the app"), false),
                    (Written::Stale, _) => (
                        unknown("the user changed in the app while it was written"),
                        false,
                    ),
                    (Written::Refused(f) | Written::Conflict(f), _) => (refused(&f), false),
                    (Written::Unsure(reason), _) => (unknown(reason), false),
                })
            }
        }
    }

    /// [`ScimSink::execute`], with a failure of this change's call (not of the run's
    /// token) as its outcome.
    async fn execute_or_unknown(
        &self,
        step: &Step,
        contact: Option<&Contact>,
    ) -> Result<(Outcome, bool), ConnectorError> {
        match self.execute(step, contact).await {
            Ok(done) => Ok(done),
            Err(e @ (ConnectorError::Auth { .. } | ConnectorError::Cancelled)) => Err(e),
            Err(e) => Ok((unknown(e.to_string()), false)),
        }
    }

    async fn put(
        &self,
        id: &str,
        user: &Map<String, Value>,
        etag: Option<&str>,
    ) -> Result<Written, ConnectorError> {
        let mut body = user.clone();
        // Read-only attributes are the server's own.
        body.remove("meta");
        body.remove("groups");
        let etag = etag.filter(|_| self.provider().etag);
        self.client
            .write(Method::PUT, "Users", id, Some(&Value::Object(body)), etag)
            .await
    }

    /// `POST /Users`, answering a conflict or a lost answer by looking the user up.
    /// The flag says the user was adopted.
    async fn create(
        &self,
        body: &Map<String, Value>,
        contact: Option<&Contact>,
    ) -> Result<(Outcome, bool), ConnectorError> {
        Tally::add(&self.tally.writes, 1);
        let written = self
            .client
            .create("Users", &Value::Object(body.clone()))
            .await?;
        match written {
            Written::Done(Some(user)) => Ok(match user.get("id").and_then(Value::as_str) {
                Some(id) => (applied(id), false),
                None => (Outcome::applied(), false),
            }),
            Written::Done(None) => Ok((Outcome::applied(), false)),
            Written::Conflict(fault) => self.converge(contact, &fault.to_string()).await,
            Written::Unsure(reason) => self.converge(contact, &reason).await,
            Written::Refused(fault) => Ok((refused(&fault), false)),
            Written::Gone | Written::Stale => Ok((unknown("the server refused the create"), false)),
        }
    }

    /// After a create that may or may not have happened: the user found is adopted.
    async fn converge(
        &self,
        contact: Option<&Contact>,
        why: &str,
    ) -> Result<(Outcome, bool), ConnectorError> {
        let Some(contact) = contact else {
            return Ok((unknown(why), false));
        };
        // The user `match_on` finds; else the one holding the userName (a 409 names
        // the unique value taken, whatever `match_on` is).
        let mut found = self.find_live(self.match_key(contact)).await?;
        if found.is_none()
            && self
                .match_key(contact)
                .is_some_and(|(attr, _)| attr != "userName")
        {
            let by_name = self
                .config
                .mapping
                .user_name(contact)
                .map(|n| ("userName", n));
            found = self.find_live(by_name).await?;
        }
        match found {
            Some(user) => {
                let prepared = self.adopt(user, contact).await?;
                match &prepared.step {
                    Step::Create(_) => Ok((unknown(why), true)),
                    step => Box::pin(self.execute(step, None))
                        .await
                        .map(|(o, _)| (o, true)),
                }
            }
            None => Ok((
                unknown(format!(
                    "{why}; no user found by the look-up: sent again next run"
                )),
                false,
            )),
        }
    }
}

/// The version a listed or read user carries (`meta.version`).
fn version(user: &Map<String, Value>) -> Option<String> {
    user.get("meta")?
        .get("version")?
        .as_str()
        .map(str::to_string)
}

mod bulk;
mod groups;
mod index;

#[async_trait]
impl Sink for ScimSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities {
            max_batch: 500,
            asynchronous_jobs: false,
            durable_at_finish: false,
            removal: match self.config.removal {
                Removal::Deactivate => RemovalStyle::MarkInactive,
                Removal::Delete => RemovalStyle::Delete,
            },
            // Two people of one read with one address would be one userName.
            addresses_by_email: self.config.mapping.user_name_from() == UserNameFrom::Email,
            mixes_removals: false,
        }
    }

    async fn check(&mut self) -> Result<(), ConnectorError> {
        let provider = self.client.provider().await?;
        let schemas = self.client.schemas().await?;
        // The listing checks the token (the two above may be served without one).
        self.client.page("Users", 1, 1, None).await?;
        let described = format!(
            "{provider}; schemas: {}",
            schemas.map_or_else(|| "not served".to_string(), |s| s.join(", "))
        );
        tracing::info!(
            "SCIM server {}: {described}",
            self.config.connection.http.base_url
        );
        self.described = Some(described);
        self.provider = Some(provider);
        self.group_ids = None;
        self.ready().await
    }

    async fn begin(
        &mut self,
        plan: &ChangePlan,
        _ctx: &mut SinkContext<'_>,
    ) -> Result<(), ConnectorError> {
        self.ready().await?;
        self.app = self.app_for(plan.creates).await?;
        Ok(())
    }

    async fn verify(
        &mut self,
        synced: u64,
        _ctx: &mut SinkContext<'_>,
    ) -> Result<SinkIntegrity, ConnectorError> {
        if synced > 0 {
            return Ok(SinkIntegrity::Intact);
        }
        let page = self.client.page("Users", 1, 1, None).await?;
        Ok(if page.total > 0 {
            SinkIntegrity::Foreign {
                reason: format!(
                    "the app holds {} users this state never synced: a create finds one by {} and adopts them",
                    page.total,
                    self.config.match_on.attribute()
                ),
            }
        } else {
            SinkIntegrity::Intact
        })
    }

    async fn apply(
        &mut self,
        batch: &ChangeBatch,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Vec<Outcome>, ConnectorError> {
        self.ready().await?;
        if ctx.cancel.is_cancelled() {
            return Ok(vec![
                unknown(
                    "the run was cancelled before this change was sent"
                );
                batch.changes.len()
            ]);
        }
        let resubscribe = ctx.resubscribe;
        let this = &*self;
        // The futures are made before the stream is polled: a closure held across the
        // await would not be `Send` for every lifetime, as `async_trait` needs.
        let preparing: Vec<_> = batch
            .changes
            .iter()
            .map(|change| this.prepare(change, resubscribe))
            .collect();
        let prepared: Vec<Prepared> = stream::iter(preparing)
            .buffered(IN_FLIGHT)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let writes = prepared
            .iter()
            .filter(|p| !matches!(p.step, Step::Done(_)))
            .count();
        let bulk = self
            .provider()
            .bulk
            .filter(|_| self.config.bulk && writes > 1);
        let mut results: Vec<(Outcome, bool)> = match bulk {
            Some(limits) => self.write_in_bulk(batch, &prepared, limits).await?,
            None => {
                let writing: Vec<_> = batch
                    .changes
                    .iter()
                    .zip(&prepared)
                    .map(|(change, p)| this.execute_or_unknown(&p.step, change.contact()))
                    .collect();
                stream::iter(writing)
                    .buffered(IN_FLIGHT)
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect::<Result<_, ConnectorError>>()?
            }
        };
        for (result, p) in results.iter_mut().zip(&prepared) {
            result.1 |= p.adopted;
        }
        let mut outcomes: Vec<Outcome> = results.iter().map(|(o, _)| o.clone()).collect();
        let adopted: Vec<bool> = results.iter().map(|(_, a)| *a).collect();
        self.follow_groups(batch, &mut outcomes, &adopted, resubscribe)
            .await?;
        Ok(outcomes)
    }

    fn described(&self) -> Option<String> {
        self.described.clone()
    }

    fn summary(&self) -> SinkSummary {
        let lookups = self.tally.lookups.load(Ordering::Relaxed);
        let writes = self.tally.writes.load(Ordering::Relaxed);
        let bulk = self.tally.bulk_requests.load(Ordering::Relaxed);
        let how = if bulk > 0 {
            format!("SCIM: {bulk} bulk requests, {writes} calls one by one, {lookups} look-ups")
        } else {
            format!("SCIM: {writes} calls one by one, {lookups} look-ups")
        };
        SinkSummary {
            reads: Some(lookups),
            how: Some(how),
            ..SinkSummary::default()
        }
    }
}

/// The PatchOp body of `ops`, for the bulk and group writers.
fn patch_data(ops: &[Value]) -> Value {
    patch_body(ops)
}

/// The id a bulk answer's `location` names.
fn located(location: Option<&str>) -> Option<String> {
    location.and_then(id_from_location)
}
