//! Writing contacts into Business Catalyst: `ContactList_UpdateInsert` in batches of at
//! most 100, and removals by delete calls or `MasterOptIn=false`.
//!
//! Why it is shaped so:
//! - The service matches an upsert by `externalId`, else `emailAddress`, and *adds* a
//!   record with neither. Such a change is rejected here, before sending: it would
//!   create the person again on every run.
//! - A bulk call faults as a whole when one record is bad. The batch is then sent again
//!   one record at a time, so that the fault lands on the record that caused it
//!   ([`Outcome::Rejected`] with the service's words) and the others are applied.
//!   Authentication faults stop the run instead. Only a fault that says what is
//!   wrong with the request or a record ([`crate::soap::Fault::is_about_the_request`])
//!   is final; any other is the service's own trouble (it reports transient errors as
//!   faults too): the call is tried again, up to [`TRANSIENT_FAULT_ATTEMPTS`], and the
//!   records stay pending (unknown, sent again next run) if the trouble lasts. Transport errors and HTTP 5xx without
//!   a fault are retried by the HTTP layer; if they persist, `apply` fails and the
//!   engine sends the batch again next run (every call here is an idempotent upsert or
//!   a delete).
//! - `entityId` is sent as the handle the engine kept for the person, or -1. Handles
//!   are learnt only when `resolve_entity_ids = true` (one `Contact_RetrieveBy…` call
//!   per new contact); otherwise `Applied { handle: None }` for new contacts.
//! - Removals (`removal = "delete"`): `Contact_DeleteByEntityID` when the handle is
//!   known; for an external-id key, `Contact_RetrieveByExternalID` then delete by id;
//!   otherwise `Contact_DeleteByEmailAddress`. A delete that finds nobody is applied
//!   (the person is gone, which is what was asked). `removal = "opt_out"`: an upsert
//!   carrying only the identity and `MasterOptIn=false`.
//! - What is written: externalId, emailAddress, fullName (display name), firstName,
//!   lastName (sent empty to clear), the configured phone types and addresses, and
//!   `MasterOptIn` (`false` unless the contact is active). CRM form fields are read by
//!   the source but not written (writing needs form and field ids).

use contactsync_core::{
    async_trait, Change, ChangeBatch, ChangePlan, ConfigError, ConnectorError, ConnectorSettings,
    Contact, ContactKey, ContactStatus, Field, Outcome, RemovalStyle, Sink, SinkCapabilities,
    SinkContext,
};

use crate::client::{BcClient, CallError};
use crate::config::{BcConfig, Removal, ADDRESS_PARTS};
use crate::soap::{Address, ContactRecord, PhoneNo};

/// A Business Catalyst site as a sink.
#[derive(Debug)]
pub struct BcSink {
    config: BcConfig,
    client: BcClient,
    /// The site's live contacts, read once in `begin` for a large change set; `None`:
    /// looked up one by one.
    site: Option<SiteIndex>,
}

/// What a create needs to know of the site's live contacts: who exists already.
#[derive(Debug, Default)]
struct SiteIndex {
    /// By `externalId`: the entity id.
    by_external_id: std::collections::HashMap<String, i64>,
    /// Those without an `externalId` (web sign-ups, imports), by lower-cased email: a
    /// create for one of them must update it, not add a second contact.
    unlinked: std::collections::HashMap<String, i64>,
}

impl BcSink {
    /// A sink for `config`. Touches no network.
    pub fn new(config: BcConfig) -> Result<BcSink, ConnectorError> {
        let client = BcClient::new(&config)?;
        Ok(BcSink {
            config,
            client,
            site: None,
        })
    }

    /// Reads the whole site once (100 contacts a call) and indexes its live contacts.
    async fn read_site(&self) -> Result<SiteIndex, ConnectorError> {
        let mut site = SiteIndex::default();
        let mut start = 0;
        loop {
            let page = self
                .client
                .retrieve_page(crate::soap::UNSET_DATE, start)
                .await?;
            for record in page.records.iter().filter(|r| !r.deleted) {
                match record.external_id.as_deref().map(str::trim) {
                    Some(id) if !id.is_empty() => {
                        site.by_external_id.insert(id.to_string(), record.entity_id);
                    }
                    _ => {
                        if let Some(email) = &record.email_address {
                            site.unlinked
                                .insert(email.trim().to_lowercase(), record.entity_id);
                        }
                    }
                }
            }
            if !page.more_records || page.records.is_empty() {
                return Ok(site);
            }
            start += page.records.len() as u64;
        }
    }

    /// The entity id of the site's contact that already is the person a create names:
    /// one with the same `externalId`, else one with the same email and no
    /// `externalId`. `None`: the person is new to the site.
    async fn existing(&self, contact: &Contact) -> Result<Option<i64>, ConnectorError> {
        let external_id = contact
            .external_id
            .as_deref()
            .map(str::trim)
            .filter(|id| !id.is_empty());
        if let Some(site) = &self.site {
            let by_id = external_id.and_then(|id| site.by_external_id.get(id));
            let by_email = || {
                contact
                    .email
                    .as_deref()
                    .and_then(|e| site.unlinked.get(&e.trim().to_lowercase()))
            };
            return Ok(by_id.or_else(by_email).copied());
        }
        if let Some(id) = external_id {
            if let Some(record) = self.client.retrieve_by_external_id(id).await? {
                return Ok(Some(record.entity_id));
            }
        }
        match &contact.email {
            Some(email) => self.unlinked_match(email).await,
            None => Ok(None),
        }
    }

    /// The entity id of a site contact with `email` and no `externalId`.
    async fn unlinked_match(&self, email: &str) -> Result<Option<i64>, ConnectorError> {
        Ok(self
            .client
            .retrieve_by_email(email)
            .await?
            .filter(|r| {
                r.external_id
                    .as_deref()
                    .is_none_or(|id| id.trim().is_empty())
            })
            .map(|r| r.entity_id)
            .filter(|id| *id > 0))
    }
}

/// Above this many creates, `begin` reads the site once (100 contacts a call) instead of
/// looking each create's email up (one call each).
const LOOKUPS_BEFORE_ONE_READ: u64 = 100;

/// The registry's builder.
pub fn build(settings: &ConnectorSettings) -> Result<Box<dyn Sink>, ConfigError> {
    let config = BcConfig::from_settings(settings)?;
    let sink = BcSink::new(config).map_err(|e| settings.error("base_url", e.to_string()))?;
    Ok(Box::new(sink))
}

/// One upsert to send: the change's position, the record, the handle it had.
struct Upsert {
    index: usize,
    record: ContactRecord,
    handle: Option<String>,
}

fn entity_id(handle: Option<&str>) -> Option<i64> {
    handle
        .and_then(|h| h.trim().parse::<i64>().ok())
        .filter(|id| *id > 0)
}

const NO_IDENTITY: &str = "the contact has neither an external id nor an email address: \
Business Catalyst would add it again on every run";

/// The record for an upsert of `contact`, or why it cannot be sent.
///
/// Fields the source does not give are left out, so that Business Catalyst keeps what
/// it holds (an admin's phone number, a `fullName`): absent is not empty. A field the
/// last-sent record (`before`) had and `contact` no longer has is sent empty: the source
/// cleared it. `MasterOptIn` is sent only when `send_opt_in` says so (a new person, or a
/// status that changed in the source): consent given or withdrawn on the site stays.
pub fn to_record(
    contact: &Contact,
    before: Option<&Contact>,
    handle: Option<&str>,
    config: &BcConfig,
    send_opt_in: bool,
) -> Result<ContactRecord, String> {
    if contact.external_id.is_none() && contact.email.is_none() {
        return Err(NO_IDENTITY.into());
    }
    let owned = |now: Option<String>, was: Option<String>| match (now, was) {
        (Some(value), _) => Some(value),
        (None, Some(_)) => Some(String::new()),
        (None, None) => None,
    };
    let field = |f: &Field| owned(contact.get(f), before.and_then(|b| b.get(f)));
    // An update sends only what changed since the record last sent: what staff edit
    // on the site in the other fields stands.
    let changed = |f: &Field| match (contact.get(f), before.and_then(|b| b.get(f))) {
        (Some(now), Some(was)) if now == was => None,
        (now, was) => owned(now, was),
    };
    let phone_nos: Vec<PhoneNo> = config
        .phone_types
        .iter()
        .filter_map(|(type_id, f)| {
            changed(f).map(|number| PhoneNo {
                type_id: *type_id,
                number,
            })
        })
        .collect();
    let addresses: Vec<Address> = config
        .addresses
        .iter()
        .filter_map(|(type_id, prefix)| {
            let parts: Vec<Option<String>> = ADDRESS_PARTS
                .iter()
                .map(|part| field(&Field::Attribute(format!("{prefix}_{part}"))))
                .collect();
            // An address travels whole (a part left out would be blanked), and only
            // when one of its parts changed.
            let moved = ADDRESS_PARTS
                .iter()
                .any(|part| changed(&Field::Attribute(format!("{prefix}_{part}"))).is_some());
            (moved && parts.iter().any(Option::is_some)).then(|| {
                let part = |i: usize| parts[i].clone().unwrap_or_default();
                Address {
                    type_id: *type_id,
                    line1: part(0),
                    line2: part(1),
                    city: part(2),
                    zipcode: part(3),
                    state: part(4),
                    country_code: part(5),
                }
            })
        })
        .collect();
    Ok(ContactRecord {
        entity_id: entity_id(handle).unwrap_or(-1),
        external_id: contact.external_id.clone(),
        email_address: contact.email.clone(),
        full_name: changed(&Field::DisplayName),
        first_name: changed(&Field::FirstName),
        last_name: changed(&Field::LastName),
        phone_nos: (!phone_nos.is_empty()).then_some(phone_nos),
        addresses: (!addresses.is_empty()).then_some(addresses),
        master_opt_in: send_opt_in.then(|| contact.status == ContactStatus::Active),
        ..ContactRecord::default()
    })
}

/// The record that opts a removed person out: identity and `MasterOptIn=false` only.
fn opt_out_record(change: &Change) -> Result<ContactRecord, String> {
    let external_id = match change.key() {
        ContactKey::ExternalId(id) => Some(id.clone()),
        ContactKey::Email(_) => None,
    };
    let email = change
        .email()
        .map(str::to_string)
        .or_else(|| match change.key() {
            ContactKey::Email(e) => Some(e.clone()),
            ContactKey::ExternalId(_) => None,
        });
    if external_id.is_none() && email.is_none() {
        return Err(NO_IDENTITY.into());
    }
    let handle = change.previous().and_then(|p| p.handle.as_deref());
    Ok(ContactRecord {
        entity_id: entity_id(handle).unwrap_or(-1),
        external_id,
        email_address: email,
        master_opt_in: Some(false),
        ..ContactRecord::default()
    })
}

/// The most tries of a batch the service faults on for its own trouble.
pub const TRANSIENT_FAULT_ATTEMPTS: u32 = 3;

/// A fault that is the service's trouble, not the record's: kept pending, sent again
/// next run (never a final rejection: the person would never be written).
fn service_trouble(text: &str) -> Outcome {
    Outcome::Unknown {
        reason: format!("Business Catalyst faulted on its own ({text}); sent again next run"),
    }
}

fn final_rejection(reason: impl Into<String>) -> Outcome {
    Outcome::Rejected {
        reason: reason.into(),
        field: None,
        retry: false,
    }
}

impl BcSink {
    /// Sends `upserts` in one call; on a record-level fault, one by one.
    async fn upsert(
        &self,
        upserts: &[Upsert],
        outcomes: &mut [Option<Outcome>],
        ctx: &mut SinkContext<'_>,
    ) -> Result<(), ConnectorError> {
        let records: Vec<ContactRecord> = upserts.iter().map(|u| u.record.clone()).collect();
        let mut attempts = 0;
        let fault = loop {
            attempts += 1;
            match self.client.update_insert(&records).await {
                Ok(()) => {
                    for u in upserts {
                        outcomes[u.index] = Some(Outcome::Applied {
                            handle: u.handle.clone(),
                        });
                    }
                    return Ok(());
                }
                Err(CallError::Fault { fault, .. }) if !fault.is_authentication() => {
                    if fault.is_about_the_request() {
                        break fault;
                    }
                    // The service's own trouble: the upsert is idempotent, so it is
                    // tried again; if the trouble lasts, the records stay pending.
                    if attempts >= TRANSIENT_FAULT_ATTEMPTS || ctx.cancel.is_cancelled() {
                        tracing::warn!(records = upserts.len(), attempts, fault = %fault.text, "businesscatalyst: the service kept faulting; the records are sent again next run");
                        for u in upserts {
                            outcomes[u.index] = Some(service_trouble(&fault.text));
                        }
                        return Ok(());
                    }
                    let backoff = self.config.http.retry_policy().backoff(attempts);
                    tracing::info!(attempt = attempts, fault = %fault.text, "businesscatalyst: the service faulted on its own; trying again");
                    tokio::select! {
                        () = ctx.cancel.cancelled() => {}
                        () = tokio::time::sleep(backoff) => {}
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        // A record that faults on its own faults for what it holds: sent unchanged it
        // would fault again, every run. Final, until the source changes it.
        if upserts.len() == 1 {
            outcomes[upserts[0].index] = Some(final_rejection(fault.text));
            return Ok(());
        }
        tracing::warn!(records = upserts.len(), fault = %fault.text, "businesscatalyst: a batch faulted; sending its records one by one");
        ctx.progress
            .note("Business Catalyst refused a batch; sending its records one by one to find the faulty ones");
        for u in upserts {
            if ctx.cancel.is_cancelled() {
                outcomes[u.index] = Some(Outcome::Unknown {
                    reason: "cancelled before this record was sent on its own".into(),
                });
                continue;
            }
            outcomes[u.index] = Some(
                match self
                    .client
                    .update_insert(std::slice::from_ref(&u.record))
                    .await
                {
                    Ok(()) => Outcome::Applied {
                        handle: u.handle.clone(),
                    },
                    Err(CallError::Fault { fault, .. }) if !fault.is_authentication() => {
                        if fault.is_about_the_request() {
                            final_rejection(fault.text)
                        } else {
                            service_trouble(&fault.text)
                        }
                    }
                    Err(e) => return Err(e.into()),
                },
            );
        }
        Ok(())
    }

    /// Learns the entity id of an applied upsert without one.
    async fn resolve_handle(
        &self,
        record: &ContactRecord,
    ) -> Result<Option<String>, ConnectorError> {
        let found = match (&record.external_id, &record.email_address) {
            (Some(ext), _) => self.client.retrieve_by_external_id(ext).await?,
            (None, Some(email)) => self.client.retrieve_by_email(email).await?,
            (None, None) => None,
        };
        Ok(found.map(|r| r.entity_id.to_string()))
    }

    /// Deletes the person a removal names.
    async fn delete(&self, change: &Change) -> Result<Outcome, ConnectorError> {
        let handle = change.previous().and_then(|p| p.handle.as_deref());
        let result = if let Some(id) = entity_id(handle) {
            self.client.delete_by_entity_id(id).await
        } else if let ContactKey::ExternalId(ext) = change.key() {
            match self.client.retrieve_by_external_id(ext).await {
                Ok(Some(record)) => self.client.delete_by_entity_id(record.entity_id).await,
                Ok(None) => Ok(false),
                Err(e) => Err(e),
            }
        } else if let Some(email) = change.email() {
            self.client.delete_by_email(email).await
        } else {
            return Ok(final_rejection(NO_IDENTITY));
        };
        match result {
            Ok(deleted) => {
                if !deleted {
                    tracing::debug!(key = %change.key(), "businesscatalyst: nobody to delete; already gone");
                }
                Ok(Outcome::Applied { handle: None })
            }
            Err(CallError::Fault { fault, .. }) if !fault.is_authentication() => {
                Ok(if fault.is_about_the_request() {
                    Outcome::rejected(fault.text)
                } else {
                    service_trouble(&fault.text)
                })
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[async_trait]
impl Sink for BcSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities {
            addresses_by_email: false,
            mixes_removals: false,
            max_batch: self.config.batch_size,
            asynchronous_jobs: false,
            durable_at_finish: false,
            removal: removal_style(self.config.removal),
        }
    }

    async fn check(&mut self) -> Result<(), ConnectorError> {
        self.client.check().await
    }

    async fn begin(
        &mut self,
        plan: &ChangePlan,
        _ctx: &mut SinkContext<'_>,
    ) -> Result<(), ConnectorError> {
        self.site = if plan.creates > LOOKUPS_BEFORE_ONE_READ {
            Some(self.read_site().await?)
        } else {
            None
        };
        Ok(())
    }

    async fn apply(
        &mut self,
        batch: &ChangeBatch,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Vec<Outcome>, ConnectorError> {
        // Upserts go in calls of many, deletes one by one; outcomes by position.
        let (mut upserts, mut deletes) = (Vec::new(), Vec::new());
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.changes.len()];
        for (index, change) in batch.changes.iter().enumerate() {
            let mut handle = change.previous().and_then(|p| p.handle.clone());
            // Consent is the person's: sent for someone new to the site, or when the
            // status changed in the source since the last sync; never otherwise.
            // (`resubscribe = true` in the pipeline: on every update.)
            let mut send_opt_in = change.sends_status(ctx.resubscribe);
            if let Change::Create { contact, .. } = change {
                // Match before create: a site contact with this externalId, or with
                // this email and no externalId, is this person (new to the state, not
                // to the site: a first sync, a lost state). Their consent on the site
                // stands: never opted back in, only out when the source says so.
                if let Some(id) = self.existing(contact).await? {
                    handle = Some(id.to_string());
                    send_opt_in = contact.status != ContactStatus::Active;
                }
            }
            let record = match change {
                Change::Create { contact, .. } | Change::Update { contact, .. } => to_record(
                    contact,
                    change.before(),
                    handle.as_deref(),
                    &self.config,
                    send_opt_in,
                ),
                Change::Remove { .. } if self.config.removal == Removal::OptOut => {
                    opt_out_record(change)
                }
                Change::Remove { .. } => {
                    deletes.push(index);
                    continue;
                }
            };
            match record {
                Ok(record) => upserts.push(Upsert {
                    index,
                    record,
                    handle,
                }),
                Err(reason) => outcomes[index] = Some(final_rejection(reason)),
            }
        }
        // Batches are at most max_batch long already; chunk anyway, the service's
        // limit is not negotiable.
        for chunk in upserts.chunks(crate::config::MAX_BATCH) {
            self.upsert(chunk, &mut outcomes, ctx).await?;
        }
        if self.config.resolve_entity_ids {
            for u in &upserts {
                if let Some(Outcome::Applied { handle: None }) = &outcomes[u.index] {
                    let handle = self.resolve_handle(&u.record).await?;
                    outcomes[u.index] = Some(Outcome::Applied { handle });
                }
            }
        }
        for index in deletes {
            outcomes[index] = Some(self.delete(&batch.changes[index]).await?);
        }
        Ok(Outcome::each_or_unknown(outcomes, "not processed"))
    }
}

/// How the engine is told this sink removes people.
fn removal_style(removal: Removal) -> RemovalStyle {
    match removal {
        Removal::Delete => RemovalStyle::Delete,
        Removal::OptOut => RemovalStyle::OptOut,
    }
}
