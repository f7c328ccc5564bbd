//! What the engine hands a sink, and what the sink answers.
//!
//! The engine works out *who* changed; a [`ChangeBatch`] carries those changes to the
//! sink, and the sink answers one [`Outcome`] per change, in the same order. Only
//! [`Outcome::Applied`] (and a final [`Outcome::Rejected`]) update the sync state; every
//! other answer leaves the change to be sent again by the next run.

use serde::{Deserialize, Serialize};

use crate::{Contact, ContactKey, FieldChange, Origin};

/// What the state remembers of a contact the sink last accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncedEntry {
    /// The [`Contact::content_hash`] of the contact as last accepted.
    pub content_hash: u64,
    /// Its email then, so a sink that addresses people by email can remove someone who
    /// is keyed by external id.
    pub email: Option<String>,
    /// What the sink asked to keep to address the person later (Actito's profileId,
    /// Business Catalyst's entityId), as returned in [`Outcome::Applied`].
    pub handle: Option<String>,
    /// The contact as the sink last accepted it: the `before` of an update or a
    /// removal. `None` when the state does not know it yet (a state written before
    /// records were kept, or a final rejection): a sink then behaves as if it knew
    /// nothing of the person's previous values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Box<Contact>>,
}

/// The three kinds of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A person the sink has never accepted.
    Create,
    /// A person whose content differs from what the sink last accepted.
    Update,
    /// A person to remove, in the way the sink's removal policy says.
    Remove,
}

impl ChangeKind {
    /// `create`, `update` or `remove`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Create => "create",
            ChangeKind::Update => "update",
            ChangeKind::Remove => "remove",
        }
    }
}

/// One change for a sink to apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// Create (or, since every platform call is an upsert, converge on) this contact.
    Create {
        /// Its identity.
        key: ContactKey,
        /// The contact as it should be.
        contact: Contact,
        /// Where it was read.
        origin: Origin,
    },
    /// Update the contact to this content.
    Update {
        /// Its identity.
        key: ContactKey,
        /// The contact as it should be.
        contact: Contact,
        /// Where it was read.
        origin: Origin,
        /// What the sink last accepted.
        previous: SyncedEntry,
    },
    /// Remove the contact, per the sink's removal policy.
    Remove {
        /// Its identity.
        key: ContactKey,
        /// What the sink last accepted (its email and handle address the person).
        previous: SyncedEntry,
        /// Where the removal came from: [`Origin::Derived`] for absence from a complete
        /// read, the source record for a source that reports deletions.
        origin: Origin,
    },
}

impl Change {
    /// The kind of change.
    pub fn kind(&self) -> ChangeKind {
        match self {
            Change::Create { .. } => ChangeKind::Create,
            Change::Update { .. } => ChangeKind::Update,
            Change::Remove { .. } => ChangeKind::Remove,
        }
    }

    /// The contact's identity.
    pub fn key(&self) -> &ContactKey {
        match self {
            Change::Create { key, .. }
            | Change::Update { key, .. }
            | Change::Remove { key, .. } => key,
        }
    }

    /// The contact as it should be; `None` for a removal.
    pub fn contact(&self) -> Option<&Contact> {
        match self {
            Change::Create { contact, .. } | Change::Update { contact, .. } => Some(contact),
            Change::Remove { .. } => None,
        }
    }

    /// Where the change came from.
    pub fn origin(&self) -> &Origin {
        match self {
            Change::Create { origin, .. }
            | Change::Update { origin, .. }
            | Change::Remove { origin, .. } => origin,
        }
    }

    /// What the sink last accepted; `None` for a create.
    pub fn previous(&self) -> Option<&SyncedEntry> {
        match self {
            Change::Create { .. } => None,
            Change::Update { previous, .. } | Change::Remove { previous, .. } => Some(previous),
        }
    }

    /// The contact as the sink last accepted it, for updates and removals, when the
    /// state knows it (see [`SyncedEntry::record`]).
    pub fn before(&self) -> Option<&Contact> {
        self.previous().and_then(|p| p.record.as_deref())
    }

    /// The contact as it should be after the change; `None` for a removal. The same as
    /// [`Change::contact`], named for reading next to [`Change::before`].
    pub fn after(&self) -> Option<&Contact> {
        self.contact()
    }

    /// The email the sink last accepted for this person, when it differs from the one
    /// the change carries: the person's address changed (same key, new email), and a
    /// sink that addresses people by email must deal with the old address.
    pub fn previous_email(&self) -> Option<&str> {
        let old = self
            .before()
            .and_then(|b| b.email.as_deref())
            .or_else(|| self.previous().and_then(|p| p.email.as_deref()))?;
        match self.contact() {
            Some(after) if after.email.as_deref() != Some(old) => Some(old),
            _ => None,
        }
    }

    /// Makes the person's old address none of this change's business: after it,
    /// [`Change::previous_email`] is `None`, so no sink gives the old address a removal
    /// status or addresses anyone by it. The engine calls it on the copy it hands a sink
    /// when the old address now belongs to another person of the state or of the run
    /// (an address another person holds is never the target of a removal).
    pub fn forget_previous_email(&mut self) {
        let Change::Update {
            contact, previous, ..
        } = self
        else {
            return;
        };
        previous.email.clone_from(&contact.email);
        if let Some(record) = previous.record.as_deref_mut() {
            record.email.clone_from(&contact.email);
        }
    }

    /// The fields this change sets, with their values before and after: for an update
    /// the fields that differ from [`Change::before`] (every set field, with no
    /// `before`, when the previous record is not known), for a create every set field,
    /// for a removal none.
    pub fn field_changes(&self) -> Vec<FieldChange> {
        match self.contact() {
            Some(after) => Contact::field_changes(self.before(), after),
            None => Vec::new(),
        }
    }

    /// Whether the sink sends the person's status (and consent) with this change: for a
    /// create, a removal, or an update whose status the source changed since the last
    /// sync; or always, when the pipeline says `resubscribe = true`. Consent given or
    /// withdrawn on the platform otherwise stands. An update whose previous record is not
    /// known (a state from before records were kept) does not send it.
    pub fn sends_status(&self, resubscribe: bool) -> bool {
        match self {
            Change::Create { .. } | Change::Remove { .. } => true,
            Change::Update { contact, .. } => {
                resubscribe || self.before().is_some_and(|b| b.status != contact.status)
            }
        }
    }

    /// What a sink writes for `field`, with fields owned by the source that provides
    /// them: the value when the contact has one; an empty value when the record last
    /// sent had one and the contact no longer has (the source cleared it); `None`
    /// when neither has one, so that the sink leaves the platform's value alone (absent
    /// is not empty). `None` for a removal.
    pub fn owned_value(&self, field: &crate::Field) -> Option<String> {
        let after = self.contact()?;
        match (after.get(field), self.before().and_then(|b| b.get(field))) {
            (Some(value), _) => Some(value),
            (None, Some(_)) => Some(String::new()),
            (None, None) => None,
        }
    }

    /// The email that addresses the person: the contact's, else the one last synced.
    pub fn email(&self) -> Option<&str> {
        self.contact()
            .and_then(|c| c.email.as_deref())
            .or_else(|| self.previous().and_then(|p| p.email.as_deref()))
    }
}

/// A batch of changes, at most the sink's [`crate::SinkCapabilities::max_batch`] long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeBatch {
    /// Unique within the pipeline's history (`run-12-batch-3`). A sink may key the
    /// handle of an asynchronous job on it, to find that job again after a crash.
    pub id: String,
    /// The changes, in the order outcomes must be returned.
    pub changes: Vec<Change>,
}

/// The counts of a whole run's change set, given to the sink before the first batch
/// so that it can choose how to apply it (one by one, or a bulk import).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangePlan {
    /// Contacts to create.
    pub creates: u64,
    /// Contacts to update.
    pub updates: u64,
    /// Contacts to remove.
    pub removals: u64,
}

impl ChangePlan {
    /// All changes.
    pub fn total(&self) -> u64 {
        self.creates + self.updates + self.removals
    }
}

/// What became of one change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The platform confirmed the change.
    Applied {
        /// What to keep to address the person later (profile id, entity id).
        handle: Option<String>,
    },
    /// The platform refused the change for this record.
    Rejected {
        /// Why, in the platform's words where it gave any.
        reason: String,
        /// The field at fault, when known.
        field: Option<String>,
        /// Whether sending it again unchanged could succeed. `false` for final refusals
        /// such as a person's own opt-out: the engine then remembers the content so it
        /// is not re-sent every night, only when it changes again.
        retry: bool,
    },
    /// Whether the change happened is not known (the job failed, the connection dropped).
    /// The change stays pending and is sent again by the next run.
    Unknown {
        /// What went wrong.
        reason: String,
    },
}

impl Outcome {
    /// Applied, with nothing to keep.
    pub fn applied() -> Self {
        Outcome::Applied { handle: None }
    }

    /// One outcome a change from outcomes gathered by position: a change none was
    /// found for is [`Outcome::Unknown`] for `reason` (the engine sends it again), never
    /// applied.
    pub fn each_or_unknown(outcomes: Vec<Option<Outcome>>, reason: &str) -> Vec<Outcome> {
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Outcome::Unknown {
                    reason: reason.to_string(),
                })
            })
            .collect()
    }

    /// Rejected for `reason`, worth retrying.
    pub fn rejected(reason: impl Into<String>) -> Self {
        Outcome::Rejected {
            reason: reason.into(),
            field: None,
            retry: true,
        }
    }
}

/// A batch that was sent but whose outcomes were never recorded (the run died), handed
/// back to the sink at the start of the next run by [`crate::Sink::recover`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingBatch {
    /// The batch's id, as in [`ChangeBatch::id`].
    pub id: String,
    /// What was sent, in the order it was sent.
    pub records: Vec<PendingRecord>,
}

/// One change of a [`PendingBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRecord {
    /// The contact's identity.
    pub key: ContactKey,
    /// The kind of change sent.
    pub kind: ChangeKind,
    /// The email it was sent with.
    pub email: Option<String>,
}
