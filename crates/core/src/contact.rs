//! The canonical person record and its identity.
//!
//! Every source maps what it reads into a [`Contact`]; every sink maps a `Contact` into
//! what its platform wants. The engine compares contacts only through
//! [`Contact::content_hash`], so two contacts that mean the same person in the same way
//! hash the same whatever the order their source listed the fields in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Whether a person should receive mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContactStatus {
    /// Receives mail.
    #[default]
    Active,
    /// Kept, but not mailed (a disabled account, a leaver kept for the record).
    Inactive,
    /// The person opted out themselves. Sinks must never re-subscribe them.
    OptedOut,
}

impl ContactStatus {
    /// The spelling used in config files, CSV files and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            ContactStatus::Active => "active",
            ContactStatus::Inactive => "inactive",
            ContactStatus::OptedOut => "opted_out",
        }
    }
}

impl fmt::Display for ContactStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ContactStatus {
    type Err = String;

    /// Liberal in what it accepts: `active`, `ACTIVE`, `inactive`, `opt_out`,
    /// `opted-out`, `unsubscribed`, and an empty string for active.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The usual spellings without building a normalised copy: a nightly parses
        // every person's status.
        let trimmed = s.trim();
        for (word, status) in [
            ("active", ContactStatus::Active),
            ("", ContactStatus::Active),
            ("inactive", ContactStatus::Inactive),
            ("opted_out", ContactStatus::OptedOut),
        ] {
            if trimmed.eq_ignore_ascii_case(word) {
                return Ok(status);
            }
        }
        let norm: String = s
            .trim()
            .chars()
            .filter(|c| c.is_alphanumeric())
            .flat_map(char::to_lowercase)
            .collect();
        match norm.as_str() {
            "" | "active" | "enabled" | "subscribed" => Ok(ContactStatus::Active),
            "inactive" | "disabled" | "removed" => Ok(ContactStatus::Inactive),
            "optedout" | "optout" | "unsubscribed" => Ok(ContactStatus::OptedOut),
            _ => Err(format!(
                "unknown status {s:?} (expected active, inactive or opted_out)"
            )),
        }
    }
}

/// The canonical fields of a [`Contact`], by the names used in config files
/// (`columns`, `attributes`, field mappings) and error messages. Serialised as that
/// name (`attributes.NAME` for a custom field).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum Field {
    /// `external_id`
    ExternalId,
    /// `email`
    Email,
    /// `first_name`
    FirstName,
    /// `last_name`
    LastName,
    /// `display_name`
    DisplayName,
    /// `phone`
    Phone,
    /// `mobile`
    Mobile,
    /// `company`
    Company,
    /// `department`
    Department,
    /// `job_title`
    JobTitle,
    /// `language`
    Language,
    /// `subscriptions`: list/permission names, separated by `;` or `|` in flat formats.
    Subscriptions,
    /// `status`
    Status,
    /// `updated_at`
    UpdatedAt,
    /// A custom field, `attributes.NAME` in config (or any name that is not canonical).
    Attribute(String),
}

impl Field {
    /// Every canonical field, in the order used for hashing and for default CSV columns.
    pub const CANONICAL: [Field; 14] = [
        Field::ExternalId,
        Field::Email,
        Field::FirstName,
        Field::LastName,
        Field::DisplayName,
        Field::Phone,
        Field::Mobile,
        Field::Company,
        Field::Department,
        Field::JobTitle,
        Field::Language,
        Field::Subscriptions,
        Field::Status,
        Field::UpdatedAt,
    ];

    /// The config-file name of the field.
    pub fn name(&self) -> &str {
        match self {
            Field::ExternalId => "external_id",
            Field::Email => "email",
            Field::FirstName => "first_name",
            Field::LastName => "last_name",
            Field::DisplayName => "display_name",
            Field::Phone => "phone",
            Field::Mobile => "mobile",
            Field::Company => "company",
            Field::Department => "department",
            Field::JobTitle => "job_title",
            Field::Language => "language",
            Field::Subscriptions => "subscriptions",
            Field::Status => "status",
            Field::UpdatedAt => "updated_at",
            Field::Attribute(name) => name,
        }
    }

    /// Parses a field name: a canonical name, `attributes.NAME`, or any other name as a
    /// custom attribute of that name. Never fails, so that a column called `Cost Center`
    /// simply becomes the attribute `Cost Center`.
    pub fn parse(name: &str) -> Field {
        let trimmed = name.trim();
        if let Some(attr) = trimmed.strip_prefix("attributes.") {
            return Field::Attribute(attr.to_string());
        }
        Field::CANONICAL
            .iter()
            .find(|f| f.name().eq_ignore_ascii_case(trimmed))
            .cloned()
            .unwrap_or_else(|| Field::Attribute(trimmed.to_string()))
    }

    /// Whether this is a canonical field (not a custom attribute).
    pub fn is_canonical(&self) -> bool {
        !matches!(self, Field::Attribute(_))
    }
}

impl From<Field> for String {
    fn from(field: Field) -> String {
        field.to_string()
    }
}

impl From<String> for Field {
    fn from(name: String) -> Field {
        Field::parse(&name)
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Attribute(name) => write!(f, "attributes.{name}"),
            other => f.write_str(other.name()),
        }
    }
}

/// One person, in the shape every connector maps to and from.
///
/// Empty strings are not values: setters store `None` for blank input, so that a source
/// that writes `""` and one that omits the field describe the same person.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Contact {
    /// The identity in the system of record (employee number, member number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// The email address, trimmed, with its domain lower-cased (see [`Contact::normalize_email`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Given name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    /// Family name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    /// The name to show, when it is not simply first and last name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Landline or work phone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// Mobile phone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mobile: Option<String>,
    /// Organisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company: Option<String>,
    /// Department or team.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub department: Option<String>,
    /// Job title or position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_title: Option<String>,
    /// Preferred language, as the source spells it (`en`, `fr-BE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Custom fields by name; ordered so that hashing and output are deterministic.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// Lists or permissions the person is subscribed to.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub subscriptions: BTreeSet<String>,
    /// Whether the person should be mailed.
    #[serde(default)]
    pub status: ContactStatus,
    /// When the source last changed the person, if it says. Not part of the content
    /// hash: a record touched without change is not a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
}

/// One field that a change sets: its value before (as the sink last accepted it) and
/// after. `None` stands for "unset". Values are text, as [`Contact::get`] gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    /// The field.
    pub field: Field,
    /// Its value as last sent; `None` when it was unset or is not known.
    pub before: Option<String>,
    /// Its value now; `None` when the change clears it.
    pub after: Option<String>,
}

/// Which field identifies a person in a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyRule {
    /// The external id when the record has one, else the email (the platforms' own rule).
    #[default]
    Auto,
    /// Always the external id; records without one are rejected.
    ExternalId,
    /// Always the normalised email; records without one are rejected.
    Email,
}

/// The identity of a contact within one pipeline.
///
/// Written `external_id:E123` or `email:ann@example.com`, so that an external id that
/// happens to look like an email address can never be confused with one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum ContactKey {
    /// Keyed by the external id.
    ExternalId(String),
    /// Keyed by the normalised email.
    Email(String),
}

impl ContactKey {
    /// The value without its kind: the id or the email.
    pub fn value(&self) -> &str {
        match self {
            ContactKey::ExternalId(v) | ContactKey::Email(v) => v,
        }
    }

    /// A stable 64-bit hash of the key's text form (`email:…`), for compact indexes.
    /// Stored in the sync state: it must never change for a given key.
    pub fn hash64(&self) -> u64 {
        match self {
            ContactKey::ExternalId(v) => key_text_hash(ID_PREFIX, v),
            ContactKey::Email(v) => key_text_hash(EMAIL_PREFIX, v),
        }
    }
}

impl ContactKey {
    /// [`ContactKey::hash64`] of `ContactKey::ExternalId(id)`, without building it.
    pub fn external_id_hash(id: &str) -> u64 {
        key_text_hash(ID_PREFIX, id)
    }

    /// [`ContactKey::hash64`] of `ContactKey::Email(email)`, without building it;
    /// `email` as the key holds it (normalised, see [`Contact::normalize_email`]).
    pub fn email_hash(email: &str) -> u64 {
        key_text_hash(EMAIL_PREFIX, email)
    }
}

const ID_PREFIX: &str = "external_id:";
const EMAIL_PREFIX: &str = "email:";

/// The hash of a key's text form, `prefix` then `value`: what [`ContactKey::hash64`]
/// gives, without the key having to be built (a nightly hashes every person's key and
/// keeps few of them).
fn key_text_hash(prefix: &str, value: &str) -> u64 {
    // XXH3 of the whole is what feeding it piece by piece gives (the hash every state
    // stores was computed that way); one call on a small buffer is cheaper.
    let len = prefix.len() + value.len();
    let mut buffer = [0u8; 128];
    match buffer.get_mut(..len) {
        Some(whole) => {
            whole[..prefix.len()].copy_from_slice(prefix.as_bytes());
            whole[prefix.len()..].copy_from_slice(value.as_bytes());
            xxhash_rust::xxh3::xxh3_64(whole)
        }
        None => {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(prefix.as_bytes());
            h.update(value.as_bytes());
            h.digest()
        }
    }
}

impl fmt::Display for ContactKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContactKey::ExternalId(v) => write!(f, "external_id:{v}"),
            ContactKey::Email(v) => write!(f, "email:{v}"),
        }
    }
}

impl From<ContactKey> for String {
    fn from(key: ContactKey) -> String {
        key.to_string()
    }
}

impl TryFrom<String> for ContactKey {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl FromStr for ContactKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(v) = s.strip_prefix("external_id:") {
            Ok(ContactKey::ExternalId(v.to_string()))
        } else if let Some(v) = s.strip_prefix("email:") {
            Ok(ContactKey::Email(v.to_string()))
        } else {
            Err(format!(
                "not a contact key: {s:?} (expected external_id:… or email:…)"
            ))
        }
    }
}

/// Sets `slot` to `value`, trimmed (`None` when blank), reusing the string it holds:
/// a record reshaped in place (a pipeline's `map`) allocates nothing for a value that
/// is unchanged or fits.
fn assign(slot: &mut Option<String>, value: &str) {
    let Some(trimmed) = field_text(value) else {
        *slot = None;
        return;
    };
    match slot {
        Some(current) => {
            if current != trimmed {
                current.clear();
                current.push_str(trimmed);
            }
        }
        None => *slot = Some(trimmed.to_string()),
    }
}

/// The `email_address` crate's verdict on an address that is plain ASCII with no
/// quote, angle bracket or square bracket (nearly every address a source holds), worked
/// out without its allocation and its search for a display name; `None` for any other
/// address, which the crate judges. The rules are the crate's (0.2) for such text: the
/// last `@` splits it; the local part is 1 to 64 characters of dot-separated, non-empty
/// atoms; the domain is 1 to 254 characters of dot-separated labels, each 1 to 63
/// characters, beginning and ending with a letter or digit. A test compares the two on
/// generated addresses.
fn plain_address_is_valid(email: &str) -> Option<bool> {
    let bytes = email.as_bytes();
    if !bytes
        .iter()
        .all(|&b| b.is_ascii() && !matches!(b, b'"' | b'<' | b'[' | b']'))
    {
        return None;
    }
    fn atext(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
    }
    let Some(at) = bytes.iter().rposition(|&b| b == b'@') else {
        return Some(false);
    };
    let (local, domain) = (&bytes[..at], &bytes[at + 1..]);
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && local
            .split(|&b| b == b'.')
            .all(|atom| !atom.is_empty() && atom.iter().all(|&b| atext(b)));
    let domain_ok = !domain.is_empty()
        && domain.len() <= 254
        && domain.split(|&b| b == b'.').all(|label| match label {
            [first, .., last] | [first @ last] => {
                label.len() <= 63
                    && first.is_ascii_alphanumeric()
                    && last.is_ascii_alphanumeric()
                    && label.iter().all(|&b| atext(b))
            }
            [] => false,
        });
    Some(local_ok && domain_ok)
}

fn clean(value: impl Into<String>) -> Option<String> {
    let value = value.into();
    let trimmed = value.trim();
    if trimmed.is_empty() {
        None
    } else if trimmed.len() == value.len() {
        Some(value)
    } else {
        Some(trimmed.to_string())
    }
}

impl Contact {
    /// Normalises an email address the way the platforms match them: trimmed, domain
    /// lower-cased. The local part keeps its case (RFC 5321 lets servers honour it).
    /// Returns `None` for a blank value.
    pub fn normalize_email(raw: &str) -> Option<String> {
        Contact::normalized_email(raw).map(std::borrow::Cow::into_owned)
    }

    /// [`Contact::normalize_email`], borrowing `raw` when it is already normal (trimmed,
    /// with a domain in ASCII lower case), which is nearly always.
    pub fn normalized_email(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return None;
        }
        Some(match trimmed.rsplit_once('@') {
            Some((_, domain))
                if domain
                    .bytes()
                    .all(|b| b.is_ascii() && !b.is_ascii_uppercase()) =>
            {
                Cow::Borrowed(trimmed)
            }
            Some((local, domain)) => Cow::Owned(format!("{local}@{}", domain.to_lowercase())),
            None => Cow::Borrowed(trimmed),
        })
    }

    /// Whether `email` is a syntactically valid address (RFC 5322 addr-spec).
    pub fn is_valid_email(email: &str) -> bool {
        match plain_address_is_valid(email) {
            Some(valid) => valid,
            // An address alone: the display-name form (`Ann <ann@example.com>`) the
            // crate also accepts is no address a platform takes, nor the same text as
            // the address it holds.
            None => {
                email_address::EmailAddress::parse_with_options(
                    email,
                    email_address::Options::default().without_display_text(),
                )
                .is_ok()
                    && email.contains('@')
            }
        }
    }

    /// The value of a field as text (subscriptions joined with `;`), `None` when unset.
    pub fn get(&self, field: &Field) -> Option<String> {
        match field {
            Field::Subscriptions => {
                if self.subscriptions.is_empty() {
                    None
                } else {
                    Some(
                        self.subscriptions
                            .iter()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(";"),
                    )
                }
            }
            Field::UpdatedAt => self.updated_at.map(|t| t.to_rfc3339()),
            other => self.get_str(other).map(str::to_string),
        }
    }

    /// The value of a field the contact holds as text, borrowed: `None` when it is
    /// unset, and for the two it does not hold as text (`subscriptions`, a set, and
    /// `updated_at`, a time; [`Contact::get`] formats those).
    pub fn get_str(&self, field: &Field) -> Option<&str> {
        match field {
            Field::ExternalId => self.external_id.as_deref(),
            Field::Email => self.email.as_deref(),
            Field::FirstName => self.first_name.as_deref(),
            Field::LastName => self.last_name.as_deref(),
            Field::DisplayName => self.display_name.as_deref(),
            Field::Phone => self.phone.as_deref(),
            Field::Mobile => self.mobile.as_deref(),
            Field::Company => self.company.as_deref(),
            Field::Department => self.department.as_deref(),
            Field::JobTitle => self.job_title.as_deref(),
            Field::Language => self.language.as_deref(),
            Field::Status => Some(self.status.as_str()),
            Field::Attribute(name) => self.attributes.get(name).map(String::as_str),
            Field::Subscriptions | Field::UpdatedAt => None,
        }
    }

    /// Sets a field from text, normalising as the field requires (email, status,
    /// subscriptions split on `;`, `|` or `,`, timestamps in RFC 3339). A blank value
    /// clears the field. Errors say what was wrong with the value, without the field's
    /// name: callers add the origin and field.
    pub fn set(&mut self, field: &Field, value: &str) -> Result<(), String> {
        match field {
            Field::ExternalId => assign(&mut self.external_id, value),
            Field::Email => match Contact::normalized_email(value) {
                Some(std::borrow::Cow::Borrowed(normal)) => assign(&mut self.email, normal),
                normalized => self.email = normalized.map(std::borrow::Cow::into_owned),
            },
            Field::FirstName => assign(&mut self.first_name, value),
            Field::LastName => assign(&mut self.last_name, value),
            Field::DisplayName => assign(&mut self.display_name, value),
            Field::Phone => assign(&mut self.phone, value),
            Field::Mobile => assign(&mut self.mobile, value),
            Field::Company => assign(&mut self.company, value),
            Field::Department => assign(&mut self.department, value),
            Field::JobTitle => assign(&mut self.job_title, value),
            Field::Language => assign(&mut self.language, value),
            Field::Subscriptions => {
                self.subscriptions = subscription_names(value).map(str::to_string).collect();
            }
            Field::Status => self.status = value.parse()?,
            Field::UpdatedAt => {
                self.updated_at = match clean(value) {
                    None => None,
                    Some(v) => Some(
                        DateTime::parse_from_rfc3339(&v)
                            .map_err(|e| format!("not an RFC 3339 timestamp ({e}): {v:?}"))?
                            .with_timezone(&Utc),
                    ),
                }
            }
            Field::Attribute(name) => match self.attributes.get_mut(name) {
                Some(current) if !value.trim().is_empty() => {
                    let mut slot = Some(std::mem::take(current));
                    assign(&mut slot, value);
                    *current = slot.unwrap_or_default();
                }
                _ => match clean(value) {
                    Some(v) => {
                        self.attributes.insert(name.clone(), v);
                    }
                    None => {
                        self.attributes.remove(name);
                    }
                },
            },
        }
        Ok(())
    }

    /// Every field that is set, with its value as text, in a fixed order: the canonical
    /// fields (status always, `updated_at` never, since it is not content), then the
    /// attributes by name.
    pub fn set_fields(&self) -> Vec<(Field, String)> {
        let mut fields: Vec<(Field, String)> = Field::CANONICAL
            .iter()
            .filter(|f| **f != Field::UpdatedAt)
            .filter_map(|f| self.get(f).map(|v| (f.clone(), v)))
            .collect();
        fields.extend(
            self.attributes
                .iter()
                .map(|(name, value)| (Field::Attribute(name.clone()), value.clone())),
        );
        fields
    }

    /// The fields in which `after` differs from `before`, in [`Contact::set_fields`]
    /// order. With no `before` (a create, or a previous record the state does not know)
    /// every set field of `after` is listed with `before: None`.
    pub fn field_changes(before: Option<&Contact>, after: &Contact) -> Vec<FieldChange> {
        let Some(before) = before else {
            return after
                .set_fields()
                .into_iter()
                .map(|(field, value)| FieldChange {
                    field,
                    before: None,
                    after: Some(value),
                })
                .collect();
        };
        let mut changes: Vec<FieldChange> = Field::CANONICAL
            .iter()
            .filter(|f| **f != Field::UpdatedAt)
            .filter_map(|f| {
                let (old, new) = (before.get(f), after.get(f));
                (old != new).then(|| FieldChange {
                    field: f.clone(),
                    before: old,
                    after: new,
                })
            })
            .collect();
        let names: BTreeSet<&String> = before
            .attributes
            .keys()
            .chain(after.attributes.keys())
            .collect();
        for name in names {
            let (old, new) = (before.attributes.get(name), after.attributes.get(name));
            if old != new {
                changes.push(FieldChange {
                    field: Field::Attribute(name.clone()),
                    before: old.cloned(),
                    after: new.cloned(),
                });
            }
        }
        changes
    }

    /// The contact's identity under `rule`, or `None` when the record lacks the field the
    /// rule needs (the engine rejects such records).
    pub fn key(&self, rule: KeyRule) -> Option<ContactKey> {
        let by_id = || self.external_id.clone().map(ContactKey::ExternalId);
        let by_email = || self.email.clone().map(ContactKey::Email);
        match rule {
            KeyRule::Auto => by_id().or_else(by_email),
            KeyRule::ExternalId => by_id(),
            KeyRule::Email => by_email(),
        }
    }

    /// The hash of the contact's key under `rule` ([`ContactKey::hash64`] of
    /// [`Contact::key`]), without building the key; `None` when it has none.
    pub fn key_hash(&self, rule: KeyRule) -> Option<u64> {
        key_hash_of(rule, self.external_id.as_deref(), self.email.as_deref())
    }

    /// A stable 64-bit hash of everything a sink would write, in a canonical form:
    /// fields in a fixed order, each length-prefixed, attributes and subscriptions
    /// sorted. `updated_at` is left out. The same person hashes the same on every
    /// machine and every version that keeps this encoding.
    pub fn content_hash(&self) -> u64 {
        canonical_hash(
            [
                self.external_id.as_deref(),
                self.email.as_deref(),
                self.first_name.as_deref(),
                self.last_name.as_deref(),
                self.display_name.as_deref(),
                self.phone.as_deref(),
                self.mobile.as_deref(),
                self.company.as_deref(),
                self.department.as_deref(),
                self.job_title.as_deref(),
                self.language.as_deref(),
            ],
            self.status,
            self.attributes
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str())),
            self.subscriptions.iter().map(String::as_str),
        )
    }
}

/// The text fields of the canonical form, in its order: [`Field::CANONICAL`] up to
/// `subscriptions`.
pub(crate) const TEXT_FIELDS: usize = 11;

/// The hash of a record's canonical form (see [`Contact::content_hash`]), from its
/// parts: the [`TEXT_FIELDS`] text fields in order, the status, the attributes sorted
/// by name and the subscriptions sorted, each once. The one encoding of a record's
/// content, whether it was built as a [`Contact`] or read as text
/// ([`ContactText`](crate::ContactText)).
pub(crate) fn canonical_hash<'a>(
    text: [Option<&str>; TEXT_FIELDS],
    status: ContactStatus,
    attributes: impl Iterator<Item = (&'a str, &'a str)>,
    subscriptions: impl Iterator<Item = &'a str>,
) -> u64 {
    // The canonical form is laid out in one buffer and hashed at once: XXH3 of the
    // whole is what feeding it piece by piece gives, and a nightly hashes every
    // person read, so the streaming hasher's copies into its own buffer were a
    // sixth of its time.
    thread_local! {
        static CANONICAL: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    CANONICAL.with_borrow_mut(|out| {
        out.clear();
        let mut put = |tag: u8, v: &str| {
            out.push(tag);
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            out.extend_from_slice(v.as_bytes());
        };
        for (tag, value) in (1..).zip(text) {
            // A NUL stands for "unset", so that unset and "" (never stored) differ.
            put(tag, value.unwrap_or("\u{0}"));
        }
        put(12, status.as_str());
        for (name, value) in attributes {
            put(13, name);
            put(14, value);
        }
        for sub in subscriptions {
            put(15, sub);
        }
        xxhash_rust::xxh3::xxh3_64(out)
    })
}

/// The hash of the key `rule` picks from a record's external id and normalised email
/// (see [`Contact::key_hash`]).
pub(crate) fn key_hash_of(
    rule: KeyRule,
    external_id: Option<&str>,
    email: Option<&str>,
) -> Option<u64> {
    let by_id = || external_id.map(|v| key_text_hash(ID_PREFIX, v));
    let by_email = || email.map(|v| key_text_hash(EMAIL_PREFIX, v));
    match rule {
        KeyRule::Auto => by_id().or_else(by_email),
        KeyRule::ExternalId => by_id(),
        KeyRule::Email => by_email(),
    }
}

/// `value` as a field holds it: trimmed, `None` when blank.
pub(crate) fn field_text(value: &str) -> Option<&str> {
    Some(value.trim()).filter(|v| !v.is_empty())
}

/// The subscriptions a `subscriptions` value names: split on `;`, `|` or `,`, each
/// trimmed, blanks left out (in the value's order, possibly repeated).
pub(crate) fn subscription_names(value: &str) -> impl Iterator<Item = &str> {
    value.split([';', '|', ',']).filter_map(field_text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_domain_is_lowercased_and_local_part_kept() {
        assert_eq!(
            Contact::normalize_email("  Ann.Lee@Example.COM "),
            Some("Ann.Lee@example.com".to_string())
        );
        assert_eq!(Contact::normalize_email("   "), None);
    }

    #[test]
    fn setting_a_set_field_again_replaces_trims_and_clears() {
        let mut c = Contact::default();
        for (field, value, expected) in [
            (Field::FirstName, "  Ann ", Some("Ann")),
            (Field::FirstName, "Bo", Some("Bo")),
            (Field::FirstName, "   ", None),
            (Field::Email, "Ann@Example.COM", Some("Ann@example.com")),
            (Field::Email, " bo@example.com ", Some("bo@example.com")),
            (Field::Email, "Bo@Éxample.com", Some("Bo@éxample.com")),
            (Field::Attribute("cc".into()), " CC-1 ", Some("CC-1")),
            (Field::Attribute("cc".into()), "CC-22", Some("CC-22")),
            (Field::Attribute("cc".into()), "", None),
        ] {
            c.set(&field, value).expect("set");
            assert_eq!(c.get(&field).as_deref(), expected, "{field:?} = {value:?}");
        }
    }

    #[test]
    fn email_validation() {
        assert!(Contact::is_valid_email("ann@example.com"));
        assert!(!Contact::is_valid_email("ann@"));
        assert!(!Contact::is_valid_email("not-an-email"));
        assert!(!Contact::is_valid_email("ann lee@example.com"));
        // The display-name form is no address of its own.
        assert!(!Contact::is_valid_email("Ann <ann@example.com>"));
        assert!(!Contact::is_valid_email("<ann@example.com>"));
    }

    #[test]
    fn hash_ignores_field_order_and_updated_at_but_not_content() {
        let mut a = Contact::default();
        a.set(&Field::Attribute("b".into()), "2").unwrap();
        a.set(&Field::Attribute("a".into()), "1").unwrap();
        a.set(&Field::Email, "x@y.org").unwrap();
        let mut b = Contact::default();
        b.set(&Field::Email, "x@Y.org").unwrap();
        b.set(&Field::Attribute("a".into()), "1").unwrap();
        b.set(&Field::Attribute("b".into()), "2").unwrap();
        b.set(&Field::UpdatedAt, "2026-01-01T00:00:00Z").unwrap();
        assert_eq!(a.content_hash(), b.content_hash());
        b.set(&Field::FirstName, "X").unwrap();
        assert_ne!(a.content_hash(), b.content_hash());
    }

    #[test]
    fn hash_does_not_confuse_adjacent_fields() {
        let a = Contact {
            first_name: Some("ab".into()),
            ..Contact::default()
        };
        let b = Contact {
            first_name: Some("a".into()),
            last_name: Some("b".into()),
            ..Contact::default()
        };
        assert_ne!(a.content_hash(), b.content_hash());
    }

    #[test]
    fn key_rule_auto_prefers_external_id() {
        let mut c = Contact::default();
        c.set(&Field::Email, "a@b.org").unwrap();
        assert_eq!(
            c.key(KeyRule::Auto),
            Some(ContactKey::Email("a@b.org".into()))
        );
        assert_eq!(c.key(KeyRule::ExternalId), None);
        c.set(&Field::ExternalId, " E1 ").unwrap();
        assert_eq!(
            c.key(KeyRule::Auto),
            Some(ContactKey::ExternalId("E1".into()))
        );
        let text = c.key(KeyRule::Auto).unwrap().to_string();
        assert_eq!(text, "external_id:E1");
        assert_eq!(
            text.parse::<ContactKey>().unwrap(),
            ContactKey::ExternalId("E1".into())
        );
    }

    #[test]
    fn key_hash_is_the_hash_of_the_text_form() {
        for key in [
            ContactKey::ExternalId("E1".into()),
            ContactKey::Email("a@b.org".into()),
        ] {
            assert_eq!(
                key.hash64(),
                xxhash_rust::xxh3::xxh3_64(key.to_string().as_bytes())
            );
        }
        // Keys longer than the one-shot buffer hash the same way.
        let long = "x".repeat(300);
        let mut contact = Contact {
            email: Some(format!("{long}@example.org")),
            ..Contact::default()
        };
        for rule in [KeyRule::Auto, KeyRule::Email, KeyRule::ExternalId] {
            assert_eq!(
                contact.key_hash(rule),
                contact.key(rule).map(|k| k.hash64())
            );
        }
        contact.external_id = Some(long.clone());
        assert_eq!(
            contact.key_hash(KeyRule::Auto),
            Some(xxhash_rust::xxh3::xxh3_64(
                format!("external_id:{long}").as_bytes()
            ))
        );
        assert_eq!(
            contact.key_hash(KeyRule::Email),
            contact.key(KeyRule::Email).map(|k| k.hash64())
        );
    }

    /// The shortcut for plain addresses gives the `email_address` crate's verdict: on
    /// every address built from pieces that touch each of its rules (dots, atext,
    /// hyphens at label ends, lengths at and over the limits, several `@`).
    #[test]
    fn plain_addresses_are_judged_as_the_email_address_crate_judges_them() {
        let locals = [
            "",
            "a",
            "ann.lee",
            ".ann",
            "ann.",
            "a..b",
            "a+b",
            "o'neil",
            "a!#$%&*/=?^_`{|}~-z",
            "a b",
            "a,b",
            "a(b)",
            "a:b",
            "a;b",
            "a\\b",
            "a\tb",
            "ÿ",
        ];
        let long_local = "l".repeat(64);
        let longer_local = "l".repeat(65);
        let domains = [
            "",
            "b",
            "example.com",
            "ex-ample.com",
            "-ex.com",
            "ex-.com",
            "ex..com",
            ".ex.com",
            "ex.com.",
            "1.2.3.4",
            "ex_ample.com",
            "ex+ample.com",
            "EXAMPLE.COM",
            "a@b.com",
            "ex ample.com",
            "b.c-",
            "_b.c",
        ];
        let long_label = format!("{}.com", "d".repeat(63));
        let longer_label = format!("{}.com", "d".repeat(64));
        let long_domain = vec!["d".repeat(62); 4].join(".") + ".ab"; // 254
        let longer_domain = vec!["d".repeat(62); 4].join(".") + ".abc"; // 255
        let mut checked = 0;
        let all_locals = locals
            .iter()
            .map(|s| s.to_string())
            .chain([long_local, longer_local]);
        for local in all_locals {
            let all_domains = domains.iter().map(|s| s.to_string()).chain([
                long_label.clone(),
                longer_label.clone(),
                long_domain.clone(),
                longer_domain.clone(),
            ]);
            for domain in all_domains {
                for email in [format!("{local}@{domain}"), format!("{local}{domain}")] {
                    let crate_says =
                        email_address::EmailAddress::is_valid(&email) && email.contains('@');
                    if let Some(shortcut) = plain_address_is_valid(&email) {
                        assert_eq!(shortcut, crate_says, "{email:?}");
                        checked += 1;
                    }
                    assert_eq!(Contact::is_valid_email(&email), crate_says, "{email:?}");
                }
            }
        }
        assert!(
            checked > 500,
            "the shortcut judged only {checked} addresses"
        );
    }

    #[test]
    fn status_parsing_is_liberal() {
        assert_eq!(
            "OPT_OUT".parse::<ContactStatus>().unwrap(),
            ContactStatus::OptedOut
        );
        assert_eq!(
            "Inactive".parse::<ContactStatus>().unwrap(),
            ContactStatus::Inactive
        );
        assert_eq!("".parse::<ContactStatus>().unwrap(), ContactStatus::Active);
        assert!("maybe".parse::<ContactStatus>().is_err());
    }

    #[test]
    fn field_changes_list_only_what_differs() {
        let mut before = Contact::default();
        before.set(&Field::Email, "ann@example.com").unwrap();
        before.set(&Field::LastName, "Lee").unwrap();
        before
            .set(&Field::Attribute("site".into()), "Gent")
            .unwrap();
        let mut after = before.clone();
        after.set(&Field::LastName, "Smith").unwrap();
        after.set(&Field::Attribute("site".into()), "").unwrap();
        after.set(&Field::Attribute("cc".into()), "CC-1").unwrap();
        after
            .set(&Field::UpdatedAt, "2026-01-01T00:00:00Z")
            .unwrap();
        let changes = Contact::field_changes(Some(&before), &after);
        let seen: Vec<(String, Option<&str>, Option<&str>)> = changes
            .iter()
            .map(|c| (c.field.to_string(), c.before.as_deref(), c.after.as_deref()))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("last_name".to_string(), Some("Lee"), Some("Smith")),
                ("attributes.cc".to_string(), None, Some("CC-1")),
                ("attributes.site".to_string(), Some("Gent"), None),
            ]
        );
        let created = Contact::field_changes(None, &before);
        assert_eq!(
            created.len(),
            4,
            "email, last name, status, site: {created:?}"
        );
        assert!(created.iter().all(|c| c.before.is_none()));
        assert!(Contact::field_changes(Some(&before), &before).is_empty());
    }

    #[test]
    fn field_names_round_trip() {
        for f in Field::CANONICAL.iter() {
            assert_eq!(&Field::parse(f.name()), f);
        }
        assert_eq!(
            Field::parse("attributes.Cost Center"),
            Field::Attribute("Cost Center".into())
        );
        assert_eq!(
            Field::parse("Cost Center"),
            Field::Attribute("Cost Center".into())
        );
    }

    /// The hash is the one every earlier version stored: a state does not see everyone
    /// as changed after an upgrade. The reference feeds XXH3 the canonical form piece
    /// by piece, as the first release did.
    #[test]
    fn the_content_hash_is_the_one_earlier_versions_stored() {
        fn reference(c: &Contact) -> u64 {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            let mut put = |tag: u8, v: &str| {
                h.update(&[tag]);
                h.update(&(v.len() as u64).to_le_bytes());
                h.update(v.as_bytes());
            };
            let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "\u{0}".to_string());
            put(1, &opt(&c.external_id));
            put(2, &opt(&c.email));
            put(3, &opt(&c.first_name));
            put(4, &opt(&c.last_name));
            put(5, &opt(&c.display_name));
            put(6, &opt(&c.phone));
            put(7, &opt(&c.mobile));
            put(8, &opt(&c.company));
            put(9, &opt(&c.department));
            put(10, &opt(&c.job_title));
            put(11, &opt(&c.language));
            put(12, c.status.as_str());
            for (name, value) in &c.attributes {
                put(13, name);
                put(14, value);
            }
            for sub in &c.subscriptions {
                put(15, sub);
            }
            h.digest()
        }
        let mut c = Contact::default();
        assert_eq!(c.content_hash(), reference(&c));
        for (field, value) in [
            (Field::ExternalId, "E00000042"),
            (Field::Email, "person42@example.com"),
            (Field::FirstName, "Ann"),
            (Field::Status, "opted_out"),
            (Field::Subscriptions, "news;events"),
            (Field::Attribute("Cost Center".into()), "CC-100"),
            (Field::Attribute("notes".into()), &"long ".repeat(100)),
        ] {
            c.set(&field, value).expect("set");
            assert_eq!(c.content_hash(), reference(&c), "after {field:?}");
        }
    }
}
