//! A contact's content in a compact binary form, for the files and tables a run keeps
//! for itself (the engine's state and spool, a sink's spool).
//!
//! The body is the contact's fields in postcard's binary encoding: varint lengths, no
//! field names, about the size of the values themselves. `updated_at` is left out,
//! since it is not content; a caller that needs it keeps it beside the body. The body
//! carries no version: whoever stores it long-term (the state) puts one in front.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{Contact, ContactStatus};

/// The contact's fields, borrowed, in a fixed order. Field order is the format: a new
/// field is appended at the end, and the state's record version bumped.
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

impl Contact {
    /// Appends the binary body of this contact's content (all but `updated_at`) to
    /// `out`, and returns it.
    ///
    /// ```
    /// use contactsync_core::Contact;
    ///
    /// let mut ann = Contact::default();
    /// ann.email = Some("ann@example.com".into());
    /// let body = ann.encode_binary(Vec::new());
    /// assert_eq!(Contact::decode_binary(&body), Ok(ann));
    /// ```
    pub fn encode_binary(&self, out: Vec<u8>) -> Vec<u8> {
        let wire = Wire {
            external_id: self.external_id.as_deref(),
            email: self.email.as_deref(),
            first_name: self.first_name.as_deref(),
            last_name: self.last_name.as_deref(),
            display_name: self.display_name.as_deref(),
            phone: self.phone.as_deref(),
            mobile: self.mobile.as_deref(),
            company: self.company.as_deref(),
            department: self.department.as_deref(),
            job_title: self.job_title.as_deref(),
            language: self.language.as_deref(),
            status: status_code(self.status),
            attributes: self
                .attributes
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            subscriptions: self.subscriptions.iter().map(String::as_str).collect(),
        };
        // Serialising strings into a Vec cannot fail; were it to, the empty body reads
        // back as an error, which every reader treats as "not known".
        postcard::to_extend(&wire, out).unwrap_or_default()
    }

    /// Reads a body [`Contact::encode_binary`] wrote (`updated_at` stays `None`); the
    /// error says what is wrong with it.
    pub fn decode_binary(body: &[u8]) -> Result<Contact, String> {
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
}
