//! Changes as the engine hands them to a sink, for a sink's own tests: the key is the
//! contact's under [`KeyRule::Auto`], the origin [`Origin::Derived`].

use contactsync_core::{
    Change, Contact, ContactKey, KeyRule, Origin, PendingBatch, PendingRecord, SyncedEntry,
};

/// The contact's key; an empty email key for a contact with none (a sink must refuse it).
fn key(contact: &Contact) -> ContactKey {
    contact
        .key(KeyRule::Auto)
        .unwrap_or(ContactKey::Email(String::new()))
}

/// The state's entry of a person last sent as `before` (or of whom only the address
/// is known).
fn previous(email: Option<String>, before: Option<Contact>) -> SyncedEntry {
    SyncedEntry {
        content_hash: before.as_ref().map_or(0, Contact::content_hash),
        email,
        handle: None,
        record: before.map(Box::new),
    }
}

/// The create of `contact`.
pub fn create(contact: Contact) -> Change {
    Change::Create {
        key: key(&contact),
        contact,
        origin: Origin::Derived,
    }
}

/// The creates of `contacts`, in order.
pub fn creates(contacts: &[Contact]) -> Vec<Change> {
    contacts.iter().cloned().map(create).collect()
}

/// An update of `contact`, with nothing known of what was sent before.
pub fn update(contact: Contact) -> Change {
    Change::Update {
        key: key(&contact),
        previous: previous(contact.email.clone(), None),
        contact,
        origin: Origin::Derived,
    }
}

/// An update of a person last sent as `before` to `after`.
pub fn update_from(before: &Contact, after: Contact) -> Change {
    Change::Update {
        key: key(&after),
        previous: previous(before.email.clone(), Some(before.clone())),
        contact: after,
        origin: Origin::Derived,
    }
}

/// The removal of `contact`, last sent as it is.
pub fn removal(contact: &Contact) -> Change {
    Change::Remove {
        key: key(contact),
        previous: previous(contact.email.clone(), Some(contact.clone())),
        origin: Origin::Derived,
    }
}

/// Batch `id` of `changes` as the state keeps it while it is pending (what a sink's
/// `recover` is handed after a crash).
pub fn pending(id: &str, changes: &[Change]) -> PendingBatch {
    PendingBatch {
        id: id.to_string(),
        records: changes
            .iter()
            .map(|c| PendingRecord {
                key: c.key().clone(),
                kind: c.kind(),
                email: c.email().map(str::to_string),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_change_carries_the_contacts_key_and_what_was_sent_before() {
        let ann = Contact {
            email: Some("ann@example.com".into()),
            first_name: Some("Ann".into()),
            ..Contact::default()
        };
        let renamed = Contact {
            first_name: Some("Anne".into()),
            ..ann.clone()
        };
        let key = ContactKey::Email("ann@example.com".into());
        assert_eq!(create(ann.clone()).key(), &key);
        assert_eq!(update(ann.clone()).before(), None);
        let update = update_from(&ann, renamed);
        assert_eq!(update.before(), Some(&ann));
        assert_eq!(
            update.contact().and_then(|c| c.first_name.as_deref()),
            Some("Anne")
        );
        let removal = removal(&ann);
        assert_eq!(removal.key(), &key);
        assert_eq!(removal.email(), Some("ann@example.com"));
        assert_eq!(
            create(Contact::default()).key(),
            &ContactKey::Email(String::new())
        );
    }
}
