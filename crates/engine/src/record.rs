//! The compact form in which the state keeps the last-sent record of each person.
//!
//! A version byte, then the contact's set fields in postcard's binary encoding
//! (varint lengths, no field names): about the size of the values themselves, some 60
//! to 90 bytes for a typical person. `updated_at` is left out, since it is not content.
//! Compression was tried and left out on purpose: records this small carry too little
//! repetition for a general-purpose compressor to gain anything without a shared
//! dictionary.

use std::collections::{BTreeMap, BTreeSet};

use contactsync_core::{Contact, ContactStatus};
use serde::{Deserialize, Serialize};

/// The first byte of every encoded record; a future layout gets another.
const VERSION: u8 = 1;

/// The contact's fields, borrowed, in a fixed order. Field order is the format: append
/// new fields at the end and bump [`VERSION`].
#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    external_id: Option<&'a str>,
    #[serde(borrow)]
    email: Option<&'a str>,
    #[serde(borrow)]
    first_name: Option<&'a str>,
    #[serde(borrow)]
    last_name: Option<&'a str>,
    #[serde(borrow)]
    display_name: Option<&'a str>,
    #[serde(borrow)]
    phone: Option<&'a str>,
    #[serde(borrow)]
    mobile: Option<&'a str>,
    #[serde(borrow)]
    company: Option<&'a str>,
    #[serde(borrow)]
    department: Option<&'a str>,
    #[serde(borrow)]
    job_title: Option<&'a str>,
    #[serde(borrow)]
    language: Option<&'a str>,
    status: u8,
    #[serde(borrow)]
    attributes: Vec<(&'a str, &'a str)>,
    #[serde(borrow)]
    subscriptions: Vec<&'a str>,
}

fn status_code(status: ContactStatus) -> u8 {
    match status {
        ContactStatus::Active => 0,
        ContactStatus::Inactive => 1,
        ContactStatus::OptedOut => 2,
    }
}

/// Encodes `contact` for the state.
pub(crate) fn encode(contact: &Contact) -> Vec<u8> {
    let wire = Wire {
        external_id: contact.external_id.as_deref(),
        email: contact.email.as_deref(),
        first_name: contact.first_name.as_deref(),
        last_name: contact.last_name.as_deref(),
        display_name: contact.display_name.as_deref(),
        phone: contact.phone.as_deref(),
        mobile: contact.mobile.as_deref(),
        company: contact.company.as_deref(),
        department: contact.department.as_deref(),
        job_title: contact.job_title.as_deref(),
        language: contact.language.as_deref(),
        status: status_code(contact.status),
        attributes: contact
            .attributes
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        subscriptions: contact.subscriptions.iter().map(String::as_str).collect(),
    };
    // Serialising strings into a Vec cannot fail; were it to, the empty record reads
    // back as "not known", which is safe.
    postcard::to_extend(&wire, vec![VERSION]).unwrap_or_default()
}

/// Decodes a record [`encode`] wrote; the error says what is wrong.
pub(crate) fn decode(bytes: &[u8]) -> Result<Contact, String> {
    let (&version, body) = bytes
        .split_first()
        .ok_or_else(|| "empty stored record".to_string())?;
    if version != VERSION {
        return Err(format!(
            "stored record of format {version}, this contactsync reads {VERSION}"
        ));
    }
    let wire: Wire<'_> =
        postcard::from_bytes(body).map_err(|e| format!("unreadable stored record: {e}"))?;
    let owned = |v: Option<&str>| v.map(str::to_string);
    Ok(Contact {
        external_id: owned(wire.external_id),
        email: owned(wire.email),
        first_name: owned(wire.first_name),
        last_name: owned(wire.last_name),
        display_name: owned(wire.display_name),
        phone: owned(wire.phone),
        mobile: owned(wire.mobile),
        company: owned(wire.company),
        department: owned(wire.department),
        job_title: owned(wire.job_title),
        language: owned(wire.language),
        status: match wire.status {
            0 => ContactStatus::Active,
            1 => ContactStatus::Inactive,
            2 => ContactStatus::OptedOut,
            other => return Err(format!("unknown status code {other} in a stored record")),
        },
        attributes: wire
            .attributes
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        subscriptions: wire
            .subscriptions
            .into_iter()
            .map(str::to_string)
            .collect::<BTreeSet<_>>(),
        updated_at: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use contactsync_core::Field;

    #[test]
    fn round_trip_and_size() {
        let mut c = Contact::default();
        for (field, value) in [
            (Field::ExternalId, "E123456"),
            (Field::Email, "person123456@example.com"),
            (Field::FirstName, "Annabel"),
            (Field::LastName, "Lee-Smith"),
            (Field::Department, "Marketing"),
            (Field::Status, "opted_out"),
            (Field::Subscriptions, "news;events"),
            (Field::Attribute("Cost Center".into()), "CC-100"),
        ] {
            c.set(&field, value).unwrap();
        }
        let bytes = encode(&c);
        assert_eq!(decode(&bytes).unwrap(), c);
        // The values alone are 83 bytes; the encoding adds about one byte a field.
        assert!(bytes.len() < 110, "{} bytes", bytes.len());
        assert!(decode(&[]).is_err());
        assert!(decode(&[9, 0]).unwrap_err().contains("format 9"));
    }
}
