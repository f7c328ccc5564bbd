//! The sandbox's own picture of a Poppulo account: subscribers and imports, and how
//! they are kept in a JSON file between runs.
//!
//! Everything here is plain data so that tests can take snapshots of it and assert on
//! what the platform would hold. It is written from the API documents
//! (`shared/specs/poppulo.md`), never from the client's types.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A subscriber's status, as the API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SubscriberStatus {
    /// Receives communications.
    Active,
    /// Soft-removed (for example by an API import row `INACTIVE`).
    Inactive,
    /// Opted out: no permissions left.
    OptOut,
    /// Exists on the platform but cannot be set through the API.
    Unconfirmed,
}

impl SubscriberStatus {
    /// The API's spelling (`OPT_OUT`).
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriberStatus::Active => "ACTIVE",
            SubscriberStatus::Inactive => "INACTIVE",
            SubscriberStatus::OptOut => "OPT_OUT",
            SubscriberStatus::Unconfirmed => "UNCONFIRMED",
        }
    }

    /// The status named by an API value; `UNCONFIRMED` parses but the API may not set it.
    pub fn parse(value: &str) -> Option<SubscriberStatus> {
        match value {
            "ACTIVE" => Some(SubscriberStatus::Active),
            "INACTIVE" => Some(SubscriberStatus::Inactive),
            "OPT_OUT" => Some(SubscriberStatus::OptOut),
            "UNCONFIRMED" => Some(SubscriberStatus::Unconfirmed),
            _ => None,
        }
    }
}

/// Who removed (deactivated or opted out) a subscriber; decides whether an import may
/// bring them back (`reactivate_api_removed`, `reactivate_admin_removed`,
/// `reactivate_bounced_removed`). A removal by the subscriber is final for the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemovedBy {
    /// An API call or import row.
    Api,
    /// The person themselves (an unsubscribe link): final.
    Subscriber,
    /// An administrator in the web application.
    Admin,
    /// Bounces.
    Bounced,
}

/// One subscriber, as the sandbox holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscriber {
    /// The platform's id (used in `uri`).
    pub id: u64,
    /// The email address, as first given.
    pub email: String,
    /// The status.
    pub status: SubscriberStatus,
    /// Who removed them, while INACTIVE or OPT_OUT.
    pub removed_by: Option<RemovedBy>,
    /// Standard fields by their place in the subscriber entity: `first_name`,
    /// `surname`, `company`, `position_company`, `phone_number`, `external_id`,
    /// `address/city`, `personal_details/employee_id`, `work_details/department`, …
    pub fields: BTreeMap<String, String>,
    /// Custom fields by name.
    pub custom_fields: BTreeMap<String, String>,
    /// Permission names.
    pub permissions: BTreeSet<String>,
    /// Tag names.
    pub tags: BTreeSet<String>,
    /// When the subscriber was created.
    pub created: DateTime<Utc>,
    /// When anything about the subscriber last changed.
    pub date_modified: DateTime<Utc>,
    /// Bumped on every change; the `ETag`.
    pub version: u64,
}

impl Subscriber {
    /// An ACTIVE subscriber with no fields, for seeding (the id is assigned on seeding).
    pub fn new(email: impl Into<String>) -> Self {
        let now = now();
        Subscriber {
            id: 0,
            email: email.into(),
            status: SubscriberStatus::Active,
            removed_by: None,
            fields: BTreeMap::new(),
            custom_fields: BTreeMap::new(),
            permissions: BTreeSet::new(),
            tags: BTreeSet::new(),
            created: now,
            date_modified: now,
            version: 1,
        }
    }

    /// A subscriber who opted out themselves: the API cannot bring them back.
    pub fn self_opted_out(email: impl Into<String>) -> Self {
        Subscriber {
            status: SubscriberStatus::OptOut,
            removed_by: Some(RemovedBy::Subscriber),
            ..Subscriber::new(email)
        }
    }

    /// Sets a standard field (`first_name`, `address/city`, …); builder style.
    pub fn with_field(mut self, path: &str, value: impl Into<String>) -> Self {
        self.fields.insert(path.to_string(), value.into());
        self
    }

    /// Sets a custom field; builder style.
    pub fn with_custom_field(mut self, name: &str, value: impl Into<String>) -> Self {
        self.custom_fields.insert(name.to_string(), value.into());
        self
    }

    /// Sets the status and who removed them; builder style.
    pub fn with_status(mut self, status: SubscriberStatus, removed_by: Option<RemovedBy>) -> Self {
        self.status = status;
        self.removed_by = removed_by;
        self
    }

    /// A standard field's value.
    pub fn field(&self, path: &str) -> Option<&str> {
        self.fields.get(path).map(String::as_str)
    }

    /// Whether the person opted out themselves (final for the API).
    pub fn opted_out_by_subscriber(&self) -> bool {
        self.status == SubscriberStatus::OptOut && self.removed_by == Some(RemovedBy::Subscriber)
    }

    /// The `ETag` of this version.
    pub fn etag(&self) -> String {
        format!("\"{}-{}\"", self.id, self.version)
    }
}

/// The state of an import, as the API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ImportStatus {
    /// Still processing rows.
    InProgress,
    /// Finished (possibly with rejected rows).
    Completed,
    /// Failed before processing.
    Error,
    /// Cancelled in the web application (part-processed).
    Cancelled,
}

impl ImportStatus {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ImportStatus::InProgress => "IN_PROGRESS",
            ImportStatus::Completed => "COMPLETED",
            ImportStatus::Error => "ERROR",
            ImportStatus::Cancelled => "CANCELLED",
        }
    }
}

/// The column separator of an import's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldSeparator {
    /// `,`
    Comma,
    /// `\t`
    Tab,
    /// `;`
    Semicolon,
}

impl FieldSeparator {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FieldSeparator::Comma => "comma",
            FieldSeparator::Tab => "tab",
            FieldSeparator::Semicolon => "semicolon",
        }
    }

    /// The byte between fields.
    pub fn byte(self) -> u8 {
        match self {
            FieldSeparator::Comma => b',',
            FieldSeparator::Tab => b'\t',
            FieldSeparator::Semicolon => b';',
        }
    }
}

/// A subscriber import job as submitted, without its data (the `specification`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportJob {
    /// `accept_terms` (always true once accepted).
    pub accept_terms: bool,
    /// `update_existing`; missing means false.
    pub update_existing: bool,
    /// `reactivate_api_removed`; missing means false.
    pub reactivate_api_removed: bool,
    /// `reactivate_admin_removed`; missing means false.
    pub reactivate_admin_removed: bool,
    /// `reactivate_bounced_removed`; missing means false.
    pub reactivate_bounced_removed: bool,
    /// `set_fields`: (name, value) in order.
    pub set_fields: Vec<(String, String)>,
    /// `add_permissions`.
    pub add_permissions: Vec<String>,
    /// `remove_permissions`.
    pub remove_permissions: Vec<String>,
    /// `tags`.
    pub tags: Vec<String>,
    /// `columns`, split on commas.
    pub columns: Vec<String>,
    /// `skip_first_line`.
    pub skip_first_line: bool,
    /// `field_separator`.
    pub field_separator: FieldSeparator,
}

/// The counts of a finished import (`results`), plus rows the sandbox skipped without
/// a documented counter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportResults {
    /// Rows in the import (after `skip_first_line`).
    pub total_records: usize,
    /// Subscribers created.
    pub new_subscribers: usize,
    /// Existing subscribers updated.
    pub updated_subscribers: usize,
    /// Rows rejected by validation (bad email, bad status, …).
    pub invalid_subscribers: usize,
    /// Rows whose email appeared earlier in the same import.
    pub duplicate_subscribers: usize,
    /// Rows skipped because the person opted out themselves.
    pub previously_opted_out: usize,
    /// Sandbox only, not in the API's results: rows skipped because the subscriber
    /// exists and `update_existing` is false, or because they were removed and the
    /// matching `reactivate_*` flag is false.
    pub skipped: usize,
}

/// One import, its rows as submitted and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Import {
    /// The import's id (in its URL).
    pub id: u64,
    /// When the job was submitted.
    pub created: DateTime<Utc>,
    /// Its status.
    pub status: ImportStatus,
    /// The job as submitted, without data.
    pub job: ImportJob,
    /// The data rows as parsed (after `skip_first_line`), one `Vec` of cells per row.
    pub rows: Vec<Vec<String>>,
    /// Rows processed so far.
    pub processed: usize,
    /// The counts so far.
    pub results: ImportResults,
    /// Indexes into `rows` of invalid rows.
    pub invalid_rows: Vec<usize>,
    /// Indexes into `rows` of duplicate rows.
    pub duplicate_rows: Vec<usize>,
    /// Indexes into `rows` of rows skipped because the person opted out.
    pub opted_out_rows: Vec<usize>,
    /// An injected ending (ERROR, or CANCELLED after so many rows).
    pub(crate) planned_end: Option<PlannedEnd>,
    /// The next time a poll is welcome; polls before it are refused.
    #[serde(skip)]
    pub(crate) ping_after: Option<DateTime<Utc>>,
}

/// An import's injected ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum PlannedEnd {
    /// ERROR before any row is processed.
    Error,
    /// CANCELLED after this many rows.
    CancelledAfter(usize),
}

/// The sandbox's data: what is saved between runs.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Store {
    next_subscriber_id: u64,
    next_import_id: u64,
    subscribers: BTreeMap<u64, Subscriber>,
    pub imports: BTreeMap<u64, Import>,
    #[serde(skip)]
    by_email: HashMap<String, u64>,
}

/// The key subscribers are matched by: the email without regard to case, as the
/// platform matches it (`User5@` and `user5@` are one subscriber).
pub(crate) fn match_key(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Whether `email` looks like an address Poppulo would accept (inferred rules: one `@`,
/// a non-empty local part without spaces or specials, a dotted domain of letters,
/// digits and hyphens).
pub(crate) fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    local_ok && domain_ok && email.len() <= 254
}

/// Now, to the second (the API's dates have no fractions).
pub(crate) fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now)
}

impl Store {
    /// The import whose id is written `id` in a URL.
    pub fn import(&self, id: &str) -> Option<&Import> {
        self.imports.get(&id.parse::<u64>().ok()?)
    }

    /// The import whose id is written `id` in a URL, to change.
    pub fn import_mut(&mut self, id: &str) -> Option<&mut Import> {
        self.imports.get_mut(&id.parse::<u64>().ok()?)
    }

    /// The subscriber matched by `email`.
    pub fn find(&self, email: &str) -> Option<&Subscriber> {
        self.by_email
            .get(&match_key(email))
            .and_then(|id| self.subscribers.get(id))
    }

    /// The subscriber matched by `email`, for changing.
    pub fn find_mut(&mut self, email: &str) -> Option<&mut Subscriber> {
        let id = *self.by_email.get(&match_key(email))?;
        self.subscribers.get_mut(&id)
    }

    /// The subscriber with this id.
    pub fn get(&self, id: u64) -> Option<&Subscriber> {
        self.subscribers.get(&id)
    }

    /// The subscriber with this id, for changing.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut Subscriber> {
        self.subscribers.get_mut(&id)
    }

    /// Every subscriber, by id (creation order).
    pub fn subscribers(&self) -> impl Iterator<Item = &Subscriber> {
        self.subscribers.values()
    }

    /// Adds a subscriber, giving it the next id; the caller has checked the email is new.
    pub fn insert(&mut self, mut subscriber: Subscriber) -> &Subscriber {
        self.next_subscriber_id += 1;
        let id = self.next_subscriber_id;
        subscriber.id = id;
        self.by_email.insert(match_key(&subscriber.email), id);
        self.subscribers.entry(id).or_insert(subscriber)
    }

    /// Changes a subscriber's email (the caller has checked it is free and valid).
    pub fn change_email(&mut self, id: u64, email: &str) {
        if let Some(subscriber) = self.subscribers.get_mut(&id) {
            self.by_email.remove(&match_key(&subscriber.email));
            subscriber.email = email.to_string();
            self.by_email.insert(match_key(email), id);
        }
    }

    /// The next import id.
    pub fn next_import_id(&mut self) -> u64 {
        self.next_import_id += 1;
        self.next_import_id
    }

    /// The store the data file held (its email index rebuilt), or an empty one.
    pub fn loaded(saved: Option<Store>) -> Store {
        let Some(mut store) = saved else {
            return Store::default();
        };
        store.by_email = store
            .subscribers
            .values()
            .map(|s| (match_key(&s.email), s.id))
            .collect();
        store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert!(valid_email("ann.lee+x@example.co.uk"));
        for bad in [
            "",
            "ann",
            "ann@",
            "@example.com",
            "ann@example",
            "a b@example.com",
            "ann@@example.com",
            "ann@exa_mple.com",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
        assert_eq!(match_key(" Ann@Example.COM "), "ann@example.com");
    }

    #[test]
    fn addresses_match_without_regard_to_case() {
        let mut store = Store::default();
        store.insert(Subscriber::new("User5@example.com"));
        assert!(store.find("user5@example.com").is_some());
        assert!(store.find("USER5@EXAMPLE.COM").is_some());
    }
}
