//! The compact stored form of what a row holds beside a last-sent record.
//!
//! A synced, pending or audit row that keeps the person's record does not repeat what
//! the record already says: the key is stored only when the record does not give it
//! ([`Contact::key`] with [`KeyRule::Auto`]), the email only when it differs from the
//! record's, and the change kind and outcome as small integers. On a million people
//! that is some 60 bytes a person less (the key and email text were stored twice).
//!
//! | stored `key` | meaning |
//! |---|---|
//! | NULL | the record's own key (there is a record, and it gives this key) |
//! | text | this key |
//!
//! | stored `email` | meaning |
//! |---|---|
//! | NULL | the record's email (none when there is no record) |
//! | `''` | no email |
//! | text | this email |
//!
//! A row written without a record always has an explicit key and email, so that an
//! upsert which keeps the previous record (`COALESCE(excluded.record, record)`) stays
//! true whichever record ends up beside it.

use contactsync_core::{ChangeKind, Contact, ContactKey, KeyRule};
use rusqlite::types::Value;

/// The key as stored beside `record`: `None` when the record gives it.
pub(crate) fn key(key: &ContactKey, record: Option<&Contact>) -> Option<String> {
    match record {
        Some(r) if derived_key(r).as_ref() == Some(key) => None,
        _ => Some(key.to_string()),
    }
}

/// The same, for a key kept as text (the audit's).
pub(crate) fn key_text(key: &str, record: Option<&Contact>) -> Option<String> {
    match record.and_then(derived_key) {
        Some(derived) if derived.to_string() == key => None,
        _ => Some(key.to_string()),
    }
}

/// The key a row holds: its stored text, else the record's.
pub(crate) fn expand_key(stored: Option<&str>, record: Option<&Contact>) -> Result<String, String> {
    match (stored, record.and_then(derived_key)) {
        (Some(text), _) => Ok(text.to_string()),
        (None, Some(derived)) => Ok(derived.to_string()),
        (None, None) => Err("a row whose key is its record's has no readable record".to_string()),
    }
}

fn derived_key(record: &Contact) -> Option<ContactKey> {
    record.key(KeyRule::Auto)
}

/// The hash a person is found by their email with (what `email:ADDRESS` hashes to as a
/// key, the address in lower case: `history` matches emails whatever their case), stored beside a row so that `history EMAIL` (and the dashboard's person search)
/// reads an index instead of every record. `None` when the row has no email, or when
/// the hash is its key hash already (a pipeline keyed by email: the primary key finds
/// it, and the row keeps a byte).
pub(crate) fn email_hash(
    key_hash: u64,
    email: Option<&str>,
    record: Option<&Contact>,
) -> Option<i64> {
    let email = email
        .filter(|e| !e.is_empty())
        .or_else(|| record.and_then(|r| r.email.as_deref()))?;
    let hash = email_lookup_hash(email)?;
    (hash != key_hash).then_some(hash as i64)
}

/// The hash [`email_hash`] gives `email`, as a search computes it.
pub(crate) fn email_lookup_hash(email: &str) -> Option<u64> {
    let normalized = Contact::normalized_email(email)?;
    // Every row of a first sync passes here: no copy unless the address has capitals.
    Some(if normalized.chars().any(char::is_uppercase) {
        ContactKey::email_hash(&normalized.to_lowercase())
    } else {
        ContactKey::email_hash(&normalized)
    })
}

/// The email as stored beside `record`: `None` when it is the record's.
pub(crate) fn email(email: Option<&str>, record: Option<&Contact>) -> Option<String> {
    match record {
        Some(r) if r.email.as_deref() == email => None,
        _ => Some(email.unwrap_or_default().to_string()),
    }
}

/// The email a row holds.
pub(crate) fn expand_email(stored: Option<String>, record: Option<&Contact>) -> Option<String> {
    match stored {
        None => record.and_then(|r| r.email.clone()),
        Some(text) if text.is_empty() => None,
        Some(text) => Some(text),
    }
}

/// A change kind or an audit outcome as stored: a small integer when it is one of the
/// known words, else the word itself (a newer contactsync's, kept as it came).
pub(crate) fn word(text: &str) -> Value {
    match WORDS.iter().position(|w| *w == text) {
        Some(code) => Value::Integer(code as i64),
        None => Value::Text(text.to_string()),
    }
}

/// The word a stored [`word`] stands for.
pub(crate) fn expand_word(stored: Value) -> Result<String, String> {
    match stored {
        Value::Integer(code) => usize::try_from(code)
            .ok()
            .and_then(|i| WORDS.get(i))
            .map(|w| w.to_string())
            .ok_or_else(|| format!("unknown word code {code}")),
        Value::Text(text) => Ok(text),
        other => Err(format!("unexpected stored value {other:?}")),
    }
}

/// A change kind as stored.
pub(crate) fn kind(kind: ChangeKind) -> Value {
    word(kind.as_str())
}

/// The words stored as integers, by position. Append only: a position is the format.
/// The commonest first: SQLite stores the integers 0 and 1 in no bytes at all, and a
/// first sync's audit is one `create`, `applied` a person.
const WORDS: [&str; 8] = [
    "create",
    "applied",
    "update",
    "remove",
    "rejected",
    "unknown",
    "sent",
    "address_taken",
];

#[cfg(test)]
mod tests {
    use super::*;
    use contactsync_core::Field;

    fn person(id: Option<&str>, email: Option<&str>) -> Contact {
        let mut c = Contact::default();
        if let Some(id) = id {
            c.set(&Field::ExternalId, id).unwrap();
        }
        if let Some(email) = email {
            c.set(&Field::Email, email).unwrap();
        }
        c
    }

    #[test]
    fn what_the_record_says_is_not_stored_again_and_reads_back() {
        let both = person(Some("E1"), Some("a@x.org"));
        let by_id = ContactKey::ExternalId("E1".into());
        let by_email = ContactKey::Email("a@x.org".into());
        assert_eq!(key(&by_id, Some(&both)), None);
        // Keyed by email although the record has an id: Auto would say otherwise.
        assert_eq!(
            key(&by_email, Some(&both)).as_deref(),
            Some("email:a@x.org")
        );
        assert_eq!(key(&by_id, None).as_deref(), Some("external_id:E1"));
        for (stored, record) in [
            (key(&by_id, Some(&both)), Some(&both)),
            (key(&by_email, Some(&both)), Some(&both)),
            (key(&by_id, None), None),
        ] {
            let back = expand_key(stored.as_deref(), record).unwrap();
            assert!(back == by_id.to_string() || back == by_email.to_string());
        }
        assert_eq!(key_text("external_id:E1", Some(&both)), None);
        assert!(expand_key(None, None).is_err());

        let no_email = person(Some("E2"), None);
        for (value, record) in [
            (Some("a@x.org"), Some(&both)),
            (Some("b@x.org"), Some(&both)),
            (None, Some(&both)),
            (None, Some(&no_email)),
            (Some("a@x.org"), Some(&no_email)),
            (None, None),
            (Some("a@x.org"), None),
        ] {
            let stored = email(value, record);
            assert_eq!(expand_email(stored, record).as_deref(), value);
        }
        assert_eq!(email(Some("a@x.org"), Some(&both)), None);
        // Without a record the email is explicit, whatever record is kept beside it.
        assert_eq!(expand_email(email(None, None), Some(&both)), None);
    }

    #[test]
    fn words_are_small_integers_and_others_stay_words() {
        for w in WORDS {
            assert!(matches!(word(w), Value::Integer(_)));
            assert_eq!(expand_word(word(w)).unwrap(), w);
        }
        assert_eq!(expand_word(word("merged")).unwrap(), "merged");
        assert!(expand_word(Value::Integer(99)).is_err());
    }
}
