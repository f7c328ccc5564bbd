//! Writing people into a directory, one entry per contact.
//!
//! Every write is an upsert: the entry is read first and only the attributes that
//! differ are replaced, so re-sending a batch after a crash converges instead of
//! failing on `entryAlreadyExists`, and a directory's audit log shows only real
//! changes. The DN is `RDN_ATTRIBUTE=<key value>,BASE_DN` (the key value is the external
//! id, else the email): it is derived from the stable identity alone, so a removal,
//! which carries no contact, can still find the entry.
//!
//! Only the attributes this sink manages (the mapped ones, `cn`/`sn` when the object
//! classes need them, the RDN attribute, the removal mark) are compared and written:
//! whatever else the directory keeps on the entry is left alone.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use contactsync_core::{
    async_trait, Change, ChangeBatch, ConnectorError, Contact, ContactKey, ContactStatus, Outcome,
    RemovalStyle, Sink, SinkCapabilities, SinkContext,
};
use ldap3::{Ldap, LdapError, LdapResult, Mod, Scope, SearchEntry};

use crate::client::{self, describe, rc};
use crate::config::{Removal, SinkConfig};

/// Changes per batch: each is a read and at most one write, so batches stay short
/// enough for progress and cancellation to be felt.
const MAX_BATCH: usize = 100;
/// Attempts at a write the server answered `busy` or `unavailable`.
const ATTEMPTS: u32 = 3;

/// An LDAP directory as a [`Sink`].
pub struct LdapSink {
    config: SinkConfig,
    ldap: Option<Ldap>,
}

impl std::fmt::Debug for LdapSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapSink")
            .field("config", &self.config)
            .field("connected", &self.ldap.is_some())
            .finish()
    }
}

/// A write of one entry.
#[derive(Debug, Clone)]
enum Write {
    /// Changes to an entry that exists.
    Modify(Vec<Mod<String>>),
    /// A new entry's attributes.
    Add(Vec<(String, HashSet<String>)>),
}

/// What became of one change, before it is an [`Outcome`]: a failure of the
/// connection is kept apart, because it also dooms the rest of the batch.
enum Step {
    Done(Outcome),
    ConnectionLost(String),
}

/// An entry's managed attributes as the sink wants them: lower-cased name → (name as
/// configured, values).
type Desired = BTreeMap<String, (String, BTreeSet<String>)>;

impl LdapSink {
    /// A sink with checked settings; touches no network until `check` or `apply`.
    pub fn new(config: SinkConfig) -> Self {
        LdapSink { config, ldap: None }
    }

    fn timeout(&self) -> Duration {
        self.config.connection.operation_timeout
    }

    async fn connection(&mut self) -> Result<Ldap, ConnectorError> {
        if let Some(ldap) = &mut self.ldap {
            if !ldap.is_closed() {
                return Ok(ldap.clone());
            }
        }
        let ldap = client::connect(&self.config.connection).await?;
        self.ldap = Some(ldap.clone());
        Ok(ldap)
    }

    /// The DN of the entry for `key`.
    pub fn dn_for(&self, key: &ContactKey) -> String {
        format!(
            "{}={},{}",
            self.config.rdn_attribute,
            ldap3::dn_escape(key.value()),
            self.config.base_dn
        )
    }

    fn needs_person(&self) -> bool {
        self.config.object_classes.iter().any(|class| {
            ["person", "organizationalPerson", "inetOrgPerson"]
                .iter()
                .any(|p| p.eq_ignore_ascii_case(class))
        })
    }

    /// The attributes this sink compares and writes (lower-cased → as configured).
    fn managed(&self) -> BTreeMap<String, String> {
        let mut managed = BTreeMap::new();
        let mut add = |name: &str| {
            managed
                .entry(name.to_ascii_lowercase())
                .or_insert_with(|| name.to_string());
        };
        for (attr, _) in self.config.attributes.pairs() {
            add(attr);
        }
        add(&self.config.rdn_attribute);
        if self.needs_person() {
            add("cn");
            add("sn");
        }
        if let Removal::Mark { attribute, .. } = &self.config.removal {
            add(attribute);
        }
        managed
    }

    /// What the entry for `contact` should hold, or why it cannot exist.
    fn desired(&self, key: &ContactKey, contact: &Contact) -> Result<Desired, String> {
        let mut desired = Desired::new();
        let mut put = |name: &str, values: BTreeSet<String>| {
            desired
                .entry(name.to_ascii_lowercase())
                .or_insert_with(|| (name.to_string(), BTreeSet::new()))
                .1
                .extend(values);
        };
        for (attr, values) in self.config.attributes.write(contact) {
            put(&attr, values);
        }
        // The RDN value must be among the attribute's values.
        put(
            &self.config.rdn_attribute,
            BTreeSet::from([key.value().to_string()]),
        );
        if self.needs_person() {
            if !desired.contains_key("cn") {
                let joined = [contact.first_name.as_deref(), contact.last_name.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" ");
                let cn = contact
                    .display_name
                    .clone()
                    .or((!joined.is_empty()).then_some(joined))
                    .or_else(|| contact.email.clone())
                    .ok_or("the object classes need a cn (common name), and the contact has no display name, first or last name, nor email")?;
                desired.insert("cn".into(), ("cn".into(), BTreeSet::from([cn])));
            }
            if !desired.contains_key("sn") {
                let sn = contact
                    .last_name
                    .clone()
                    .or_else(|| contact.display_name.clone())
                    .ok_or("the object classes need an sn (surname), and the contact has neither a last name nor a display name")?;
                desired.insert("sn".into(), ("sn".into(), BTreeSet::from([sn])));
            }
        }
        if let Removal::Mark { attribute, value } = &self.config.removal {
            let lower = attribute.to_ascii_lowercase();
            if contact.status != ContactStatus::Active {
                desired
                    .entry(lower)
                    .or_insert_with(|| (attribute.clone(), BTreeSet::new()))
                    .1
                    .insert(value.clone());
            }
        }
        Ok(desired)
    }

    /// The entry's managed attributes, or `None` when it does not exist.
    async fn read_entry(
        &self,
        ldap: &mut Ldap,
        dn: &str,
    ) -> Result<Option<HashMap<String, Vec<String>>>, LdapError> {
        let attrs: Vec<String> = self.managed().into_values().collect();
        let result = ldap
            .with_timeout(self.timeout())
            .search(dn, Scope::Base, "(objectClass=*)", attrs)
            .await?;
        match result.1.rc {
            rc::NO_SUCH_OBJECT => Ok(None),
            0 => Ok(result.0.into_iter().next().map(|entry| {
                SearchEntry::construct(entry)
                    .attrs
                    .into_iter()
                    .map(|(name, values)| (name.to_ascii_lowercase(), values))
                    .collect()
            })),
            _ => Err(LdapError::LdapResult { result: result.1 }),
        }
    }

    /// The modifications that turn `existing` into `desired` for the managed attributes.
    /// An attribute `desired` lacks is deleted only when `previous` (what was last sent)
    /// had it: absent from the source is not a value to clear (an admin's phone number
    /// stays), emptied by the source is. With `previous`, only attributes whose value
    /// the source changed are replaced.
    fn modifications(
        &self,
        existing: &HashMap<String, Vec<String>>,
        desired: &Desired,
        previous: Option<&Desired>,
    ) -> Vec<Mod<String>> {
        let mut mods = Vec::new();
        for (lower, name) in self.managed() {
            let have: BTreeSet<String> = existing
                .get(&lower)
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            match (&self.config.removal, desired.get(&lower)) {
                // The removal mark: add or take away only our value, keep the others.
                (Removal::Mark { attribute, value }, want)
                    if attribute.eq_ignore_ascii_case(&lower) =>
                {
                    let marked = want.is_some_and(|(_, v)| v.contains(value));
                    if marked && !have.contains(value) {
                        mods.push(Mod::Add(name, HashSet::from([value.clone()])));
                    } else if !marked && have.contains(value) {
                        mods.push(Mod::Delete(name, HashSet::from([value.clone()])));
                    }
                }
                // Only what the source changed since the record last sent: a value an
                // admin edited in an attribute the source did not change stands.
                (_, Some((_, want)))
                    if *want != have
                        && previous.is_none_or(|p| p.get(&lower).map(|(_, v)| v) != Some(want)) =>
                {
                    mods.push(Mod::Replace(name, want.iter().cloned().collect()));
                }
                // Replace with no values deletes, and does not fail if already absent.
                (_, None)
                    if !have.is_empty() && previous.is_some_and(|p| p.contains_key(&lower)) =>
                {
                    mods.push(Mod::Replace(name, HashSet::new()))
                }
                _ => {}
            }
        }
        mods
    }

    async fn upsert(
        &self,
        mut ldap: Ldap,
        key: &ContactKey,
        contact: &Contact,
        before: Option<&Contact>,
    ) -> Result<Outcome, LdapError> {
        let dn = self.dn_for(key);
        // What was last sent: an attribute it had and `contact` has not was cleared by
        // the source; one neither has is not the source's, and is left alone.
        let previous = before.and_then(|b| self.desired(key, b).ok());
        let desired = match self.desired(key, contact) {
            Ok(d) => d,
            Err(reason) => {
                return Ok(Outcome::Rejected {
                    reason: reason.to_string(),
                    field: None,
                    retry: false,
                })
            }
        };
        // Two rounds: a create that races with another writer (or a re-sent batch)
        // finds the entry on the second round and modifies it instead.
        for _round in 0..2 {
            match self.read_entry(&mut ldap, &dn).await? {
                Some(existing) => {
                    let mods = self.modifications(&existing, &desired, previous.as_ref());
                    if mods.is_empty() {
                        tracing::debug!(%dn, "entry already up to date");
                        return Ok(applied(&dn));
                    }
                    tracing::debug!(%dn, changed = mods.len(), "modifying entry");
                    let result = self.write(&ldap, &dn, Write::Modify(mods)).await?;
                    match result.rc {
                        0 => return Ok(applied(&dn)),
                        rc::NO_SUCH_OBJECT => continue,
                        _ => return Ok(rejection(&result)),
                    }
                }
                None => {
                    let mut attrs: Vec<(String, HashSet<String>)> = vec![(
                        "objectClass".to_string(),
                        self.config.object_classes.iter().cloned().collect(),
                    )];
                    attrs.extend(
                        desired
                            .values()
                            .map(|(name, values)| (name.clone(), values.iter().cloned().collect())),
                    );
                    tracing::debug!(%dn, "adding entry");
                    let result = self.write(&ldap, &dn, Write::Add(attrs)).await?;
                    match result.rc {
                        0 => return Ok(applied(&dn)),
                        rc::ENTRY_ALREADY_EXISTS => continue,
                        _ => return Ok(rejection(&result)),
                    }
                }
            }
        }
        Ok(Outcome::Unknown {
            reason: format!("{dn} kept appearing and disappearing while being written"),
        })
    }

    async fn remove(
        &self,
        ldap: Ldap,
        key: &ContactKey,
        handle: Option<&str>,
    ) -> Result<Outcome, LdapError> {
        let dn = handle
            .map(str::to_string)
            .unwrap_or_else(|| self.dn_for(key));
        let result = match &self.config.removal {
            Removal::Delete => {
                tracing::debug!(%dn, "deleting entry");
                self.retrying(
                    |mut l, t| {
                        let dn = dn.clone();
                        async move { l.with_timeout(t).delete(&dn).await }
                    },
                    &ldap,
                )
                .await?
            }
            Removal::Mark { attribute, value } => {
                let mut ldap = ldap.clone();
                let existing = self.read_entry(&mut ldap, &dn).await?;
                let lower = attribute.to_ascii_lowercase();
                if existing
                    .as_ref()
                    .and_then(|e| e.get(&lower))
                    .is_some_and(|values| values.contains(value))
                {
                    return Ok(applied(&dn));
                }
                let mods = vec![Mod::Add(attribute.clone(), HashSet::from([value.clone()]))];
                tracing::debug!(%dn, %attribute, %value, "marking entry removed");
                self.retrying(
                    |mut l, t| {
                        let dn = dn.clone();
                        let mods = mods.clone();
                        async move { l.with_timeout(t).modify(&dn, mods).await }
                    },
                    &ldap,
                )
                .await?
            }
        };
        match result.rc {
            // Already gone: the removal has converged.
            0 | rc::NO_SUCH_OBJECT => Ok(applied(&dn)),
            _ => Ok(rejection(&result)),
        }
    }

    /// Runs a write, again after a pause when the server says it is busy or unavailable.
    /// Modifies or adds the entry `dn`, retried while the directory is busy.
    async fn write(&self, ldap: &Ldap, dn: &str, write: Write) -> Result<LdapResult, LdapError> {
        self.retrying(
            |mut l, t| {
                let write = write.clone();
                async move {
                    let l = l.with_timeout(t);
                    match write {
                        Write::Modify(mods) => l.modify(dn, mods).await,
                        Write::Add(attrs) => l.add(dn, attrs).await,
                    }
                }
            },
            ldap,
        )
        .await
    }

    async fn retrying<F, Fut>(&self, op: F, ldap: &Ldap) -> Result<LdapResult, LdapError>
    where
        F: Fn(Ldap, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<LdapResult, LdapError>>,
    {
        let mut attempt = 1;
        loop {
            let result = op(ldap.clone(), self.timeout()).await?;
            if attempt >= ATTEMPTS || !matches!(result.rc, rc::BUSY | rc::UNAVAILABLE) {
                return Ok(result);
            }
            tracing::warn!(answer = %describe(&result), attempt, "the directory is busy; trying again");
            tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
            attempt += 1;
        }
    }

    async fn apply_one(&mut self, change: &Change) -> Step {
        let ldap = match self.connection().await {
            Ok(ldap) => ldap,
            Err(e) => return Step::ConnectionLost(e.to_string()),
        };
        let result = match change {
            Change::Create { key, contact, .. } | Change::Update { key, contact, .. } => {
                self.upsert(ldap, key, contact, change.before()).await
            }
            Change::Remove { key, previous, .. } => {
                self.remove(ldap, key, previous.handle.as_deref()).await
            }
        };
        match result {
            Ok(outcome) => Step::Done(outcome),
            Err(e) if client::is_transport(&e) => {
                let reason =
                    client::call_error(format!("write {}", change.key()), e, self.timeout())
                        .to_string();
                Step::ConnectionLost(reason)
            }
            Err(LdapError::LdapResult { result }) => Step::Done(rejection(&result)),
            Err(other) => Step::Done(Outcome::rejected(other.to_string())),
        }
    }
}

fn applied(dn: &str) -> Outcome {
    Outcome::Applied {
        handle: Some(dn.to_string()),
    }
}

/// A refusal of one record. Schema and naming violations will not pass by being sent
/// again unchanged; other refusals (access rights, server trouble) might.
fn rejection(result: &LdapResult) -> Outcome {
    let permanent = matches!(result.rc, 17 | 18 | 19 | 20 | 21 | 34 | 64 | 65 | 67 | 69);
    if matches!(result.rc, rc::BUSY | rc::UNAVAILABLE | 3 | 80) {
        return Outcome::Unknown {
            reason: describe(result),
        };
    }
    Outcome::Rejected {
        reason: describe(result),
        field: None,
        retry: !permanent,
    }
}

#[async_trait]
impl Sink for LdapSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities {
            addresses_by_email: false,
            mixes_removals: false,
            max_batch: MAX_BATCH,
            asynchronous_jobs: false,
            durable_at_finish: false,
            removal: match self.config.removal {
                Removal::Delete => RemovalStyle::Delete,
                Removal::Mark { .. } => RemovalStyle::MarkInactive,
            },
        }
    }

    async fn check(&mut self) -> Result<(), ConnectorError> {
        let mut ldap = self.connection().await?;
        client::check_base(&mut ldap, &self.config.base_dn, self.timeout()).await
    }

    async fn apply(
        &mut self,
        batch: &ChangeBatch,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Vec<Outcome>, ConnectorError> {
        // A bind failure is the whole run's problem, not each record's.
        self.connection().await?;
        let mut outcomes = Vec::with_capacity(batch.changes.len());
        let mut lost: Option<String> = None;
        for change in &batch.changes {
            if let Some(reason) = &lost {
                outcomes.push(Outcome::Unknown {
                    reason: format!("not sent: {reason}"),
                });
                continue;
            }
            if ctx.cancel.is_cancelled() {
                outcomes.push(Outcome::Unknown {
                    reason: "not sent: the run was cancelled".into(),
                });
                continue;
            }
            match self.apply_one(change).await {
                Step::Done(outcome) => {
                    if let Outcome::Rejected { reason, .. } | Outcome::Unknown { reason } = &outcome
                    {
                        tracing::warn!(key = %change.key(), kind = change.kind().as_str(), %reason, "change not applied");
                    }
                    outcomes.push(outcome);
                }
                Step::ConnectionLost(reason) => {
                    tracing::warn!(%reason, "lost the connection to the directory");
                    self.ldap = None;
                    outcomes.push(Outcome::Unknown {
                        reason: reason.clone(),
                    });
                    lost = Some(reason);
                }
            }
        }
        Ok(outcomes)
    }

    async fn finish(&mut self, _ctx: &mut SinkContext<'_>) -> Result<(), ConnectorError> {
        if let Some(mut ldap) = self.ldap.take() {
            let _ = ldap.unbind().await;
        }
        Ok(())
    }
}
