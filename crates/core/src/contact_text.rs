//! A record read as text and hashed without building a [`Contact`].
//!
//! A nightly run reads every person and finds most of them unchanged: for those, a
//! `Contact` (a dozen strings and a set, allocated, moved and dropped) is built only to
//! be hashed. A source that reads text (a CSV file) can instead take its fields as
//! borrowed text, normalised as [`Contact::set`] would, and give the engine the hashes
//! alone; it builds the `Contact` only for the people whose hash differs.

use std::borrow::Cow;

use smallvec::SmallVec;

use crate::contact::{canonical_hash, field_text, key_hash_of, subscription_names, TEXT_FIELDS};
use crate::{Contact, ContactStatus, Field, KeyRule};

/// A record's fields as borrowed text, as [`Contact::set`] would hold them: the same
/// [`ContactText::content_hash`] and [`ContactText::key_hash`] as the `Contact` that
/// setting the same values builds.
///
/// ```
/// use contactsync_core::{Contact, ContactText, Field, KeyRule};
///
/// let row = [
///     (Field::Email, " Ann@Example.COM "),
///     (Field::FirstName, "Ann"),
///     (Field::Subscriptions, "news; offers;news"),
/// ];
/// let text = ContactText::read(row.iter().map(|(f, v)| (f, *v))).expect("readable");
/// let mut contact = Contact::default();
/// for (field, value) in &row {
///     contact.set(field, value).unwrap();
/// }
/// assert_eq!(text.content_hash(), contact.content_hash());
/// assert_eq!(text.key_hash(KeyRule::Auto), contact.key_hash(KeyRule::Auto));
/// assert_eq!(text.email(), Some("Ann@example.com"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ContactText<'a> {
    /// The text fields in canonical order; the email is in `email`.
    text: [Option<&'a str>; TEXT_FIELDS],
    /// Normalised: borrowed unless its domain had capitals.
    email: Option<Cow<'a, str>>,
    status: ContactStatus,
    /// Sorted by name; a name at most once.
    attributes: SmallVec<[(&'a str, &'a str); 4]>,
    /// Sorted, each once.
    subscriptions: SmallVec<[&'a str; 4]>,
}

impl<'a> ContactText<'a> {
    /// Reads `values` (a field and its raw text, each field at most once) as
    /// [`Contact::set`] would. `None` when `set` would refuse a value (an unknown
    /// status, a malformed `updated_at`): the caller builds the `Contact`, which says
    /// why.
    pub fn read(values: impl IntoIterator<Item = (&'a Field, &'a str)>) -> Option<Self> {
        let mut text = ContactText::default();
        for (field, value) in values {
            if let Some(slot) = text_slot(field) {
                match field {
                    Field::Email => text.email = Contact::normalized_email(value),
                    _ => text.text[slot] = field_text(value),
                }
                continue;
            }
            match field {
                Field::Status => text.status = value.parse().ok()?,
                Field::UpdatedAt => {
                    // Not content; only whether `set` would take it.
                    if let Some(v) = field_text(value) {
                        chrono::DateTime::parse_from_rfc3339(v).ok()?;
                    }
                }
                Field::Subscriptions => {
                    text.subscriptions.clear();
                    text.subscriptions.extend(subscription_names(value));
                    text.subscriptions.sort_unstable();
                    text.subscriptions.dedup();
                }
                Field::Attribute(name) => {
                    text.attributes.retain(|(n, _)| *n != name.as_str());
                    if let Some(v) = field_text(value) {
                        text.attributes.push((name.as_str(), v));
                    }
                }
                _ => {}
            }
        }
        text.attributes.sort_unstable_by_key(|(name, _)| *name);
        Some(text)
    }

    /// The email, normalised ([`Contact::normalize_email`]).
    pub fn email(&self) -> Option<&str> {
        self.email.as_deref()
    }

    /// [`Contact::key_hash`] of the record.
    pub fn key_hash(&self, rule: KeyRule) -> Option<u64> {
        key_hash_of(rule, self.text[0], self.email())
    }

    /// [`Contact::content_hash`] of the record.
    pub fn content_hash(&self) -> u64 {
        let mut text = self.text;
        text[1] = self.email();
        canonical_hash(
            text,
            self.status,
            self.attributes.iter().copied(),
            self.subscriptions.iter().copied(),
        )
    }
}

/// Where a text field is in the canonical order ([`Field::CANONICAL`]), `None` for the
/// others.
fn text_slot(field: &Field) -> Option<usize> {
    Some(match field {
        Field::ExternalId => 0,
        Field::Email => 1,
        Field::FirstName => 2,
        Field::LastName => 3,
        Field::DisplayName => 4,
        Field::Phone => 5,
        Field::Mobile => 6,
        Field::Company => 7,
        Field::Department => 8,
        Field::JobTitle => 9,
        Field::Language => 10,
        Field::Subscriptions | Field::Status | Field::UpdatedAt | Field::Attribute(_) => {
            return None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way a value can be written (padding, capitals in the domain, blanks,
    /// separators, repeats, attributes in any order) hashes as the `Contact` that
    /// setting it builds, and a value `set` refuses is refused.
    #[test]
    fn reads_every_field_as_set_does() {
        let attribute = |name: &str| Field::Attribute(name.to_string());
        let spellings = [
            "",
            "  ",
            "x",
            " padded ",
            "Ann@Example.COM",
            " bo@éxample.com ",
            "no-at",
            "a;b|c, d;;a",
            "Opted-Out",
            "INACTIVE",
            "2024-02-29T10:00:00Z",
            "é",
        ];
        let fields: Vec<Field> = Field::CANONICAL
            .iter()
            .cloned()
            .chain([attribute("zeta"), attribute("alpha"), attribute("mid")])
            .collect();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as usize
        };
        let (mut compared, mut refused) = (0, 0);
        for _ in 0..5_000 {
            let mut row: Vec<(&Field, &str)> = Vec::new();
            for field in &fields {
                if next() % 3 != 0 {
                    row.push((field, spellings[next() % spellings.len()]));
                }
            }
            let mut contact = Contact::default();
            let set = row.iter().try_for_each(|(f, v)| contact.set(f, v));
            match (ContactText::read(row.iter().copied()), set) {
                (Some(text), Ok(())) => {
                    compared += 1;
                    assert_eq!(text.content_hash(), contact.content_hash(), "{row:?}");
                    for rule in [KeyRule::Auto, KeyRule::ExternalId, KeyRule::Email] {
                        assert_eq!(text.key_hash(rule), contact.key_hash(rule), "{row:?}");
                    }
                    assert_eq!(text.email(), contact.email.as_deref(), "{row:?}");
                }
                (None, Err(_)) => refused += 1,
                (text, set) => panic!("{row:?}: read {:?}, set {set:?}", text.is_some()),
            }
        }
        assert!(
            compared > 1_000 && refused > 1_000,
            "{compared} compared, {refused} refused"
        );
    }
}
