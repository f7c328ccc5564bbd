//! The sandbox's contact store: what Business Catalyst keeps about a person, and the
//! rules it applies when records are written, matched, listed and deleted.
//!
//! Written from `shared/specs/businesscatalyst.md`, not from the client: matching is by
//! `externalId` when present, else `emailAddress`, and a record with neither is always
//! added. Every write stamps `lastUpdateDate` with the site's local time (no zone), so
//! incremental readers see it; deletions are soft (`deleted = true`) for the same reason.

use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};

/// Records `ContactList_Retrieve` returns per call.
pub const PAGE_SIZE: usize = 100;
/// Records `ContactList_UpdateInsert` accepts per call (inferred; enforced with a fault).
pub const MAX_BATCH: usize = 100;

/// One contact as the sandbox stores it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SandboxContact {
    /// The platform's id, assigned incrementally from 1. `0` in a seed: assign one.
    pub entity_id: i64,
    /// The caller's identity for the person.
    pub external_id: Option<String>,
    /// The email address, as written.
    pub email_address: Option<String>,
    /// Mr, Ms, ...
    pub contact_title: Option<String>,
    /// Soft-deleted: listed with `deleted=true`, invisible to `Contact_RetrieveBy*`.
    pub deleted: bool,
    /// Full name.
    pub full_name: Option<String>,
    /// First name.
    pub first_name: Option<String>,
    /// Last name.
    pub last_name: Option<String>,
    /// Site login name.
    pub username: Option<String>,
    /// Date of birth, as written.
    pub date_of_birth: Option<String>,
    /// When the contact was created (site-local time). `None` in a seed: now.
    pub create_date: Option<NaiveDateTime>,
    /// When the contact was last written (site-local time). `None` in a seed: now.
    pub last_update_date: Option<NaiveDateTime>,
    /// Customer type, as written.
    pub customer_type: Option<String>,
    /// Industry type, as written.
    pub industry_type: Option<String>,
    /// Lead source type, as written.
    pub lead_source_type: Option<String>,
    /// Rating type, as written.
    pub rating_type: Option<String>,
    /// Addresses, at most one per `addressTypeID`.
    pub addresses: Vec<SandboxAddress>,
    /// Phone numbers, at most one per `phoneNoTypeID`.
    pub phone_nos: Vec<SandboxPhone>,
    /// Custom CRM form fields.
    pub crm_forms: Vec<SandboxCrmForm>,
    /// `false`: the person opted out of all mail.
    pub master_opt_in: bool,
}

/// An address of a contact.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SandboxAddress {
    /// 1 home, 2 work, 3 PO box, 5 shipping, 6 pickup, 7 storage, 8 billing.
    pub address_type_id: i32,
    /// First line.
    pub address_line1: String,
    /// Second line.
    pub address_line2: String,
    /// City.
    pub city: String,
    /// Postal code.
    pub zipcode: String,
    /// State or region.
    pub state: String,
    /// Country code.
    pub country_code: String,
}

/// A phone number of a contact.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SandboxPhone {
    /// 1 home, 2 home fax, 3 work, 4 work fax, 5 cell, 6 pager, 7-9 email, 10 web.
    pub phone_no_type_id: i32,
    /// The number, as written.
    pub phone_no: String,
}

/// A CRM form with its fields' values for one contact.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SandboxCrmForm {
    /// The form's id.
    pub form_id: i64,
    /// The form's name.
    pub form_name: String,
    /// The fields.
    pub fields: Vec<SandboxCrmField>,
}

/// One custom field value.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SandboxCrmField {
    /// The field's id.
    pub field_id: i64,
    /// 1 text, 2 number, 3 boolean, 4 datetime, 5 dropdown, ...
    pub field_type_id: i32,
    /// The field's name.
    pub field_name: String,
    /// The value, as text.
    pub field_value: String,
}

/// A `ContactRecord` as a caller wrote it: `None` for an element that was absent
/// (the stored value is kept), `Some("")` for one that was present and empty (cleared).
#[derive(Debug, Clone, Default)]
pub struct IncomingRecord {
    /// `entityId` (`-1` or absent for a new contact).
    pub entity_id: Option<i64>,
    /// `externalId`.
    pub external_id: Option<String>,
    /// `emailAddress`.
    pub email_address: Option<String>,
    /// `contactTitle`.
    pub contact_title: Option<String>,
    /// `fullName`.
    pub full_name: Option<String>,
    /// `firstName`.
    pub first_name: Option<String>,
    /// `lastName`.
    pub last_name: Option<String>,
    /// `username`.
    pub username: Option<String>,
    /// `dateOfBirth`.
    pub date_of_birth: Option<String>,
    /// `customerType`.
    pub customer_type: Option<String>,
    /// `industryType`.
    pub industry_type: Option<String>,
    /// `leadSourceType`.
    pub lead_source_type: Option<String>,
    /// `ratingType`.
    pub rating_type: Option<String>,
    /// `addresses`, merged by type (an address with every part empty removes the type).
    pub addresses: Option<Vec<SandboxAddress>>,
    /// `phoneNos`, merged by type (an empty number removes the type).
    pub phone_nos: Option<Vec<SandboxPhone>>,
    /// `crmForms`, merged by form and field.
    pub crm_forms: Option<Vec<SandboxCrmForm>>,
    /// `MasterOptIn`.
    pub master_opt_in: Option<bool>,
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// Whether the sandbox accepts `email` (its record-level validation rule: one `@`
/// with something on both sides, a dot in the domain, and no whitespace).
pub fn email_is_acceptable(email: &str) -> bool {
    contactsync_sandbox_kit::plain_email(email.trim())
}

/// The sandbox's data: what is persisted to `data_file`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Store {
    /// The last entity id handed out.
    pub last_entity_id: i64,
    /// Every contact, deleted ones included, in entity id order.
    pub contacts: Vec<SandboxContact>,
}

impl Store {
    /// Adds seed contacts, assigning ids and dates they lack. Returns their ids.
    pub fn seed(&mut self, contacts: Vec<SandboxContact>, now: NaiveDateTime) -> Vec<i64> {
        let mut ids = Vec::with_capacity(contacts.len());
        for mut contact in contacts {
            if contact.entity_id <= 0
                || self
                    .contacts
                    .iter()
                    .any(|c| c.entity_id == contact.entity_id)
            {
                self.last_entity_id += 1;
                contact.entity_id = self.last_entity_id;
            } else {
                self.last_entity_id = self.last_entity_id.max(contact.entity_id);
            }
            contact.create_date.get_or_insert(now);
            contact.last_update_date.get_or_insert(now);
            ids.push(contact.entity_id);
            self.contacts.push(contact);
        }
        self.contacts.sort_by_key(|c| c.entity_id);
        ids
    }

    /// The contact an incoming record updates, if any: the one with its `externalId`
    /// when a contact has it; else the one with its `emailAddress` (case-insensitive)
    /// and no `externalId` of its own, or any with it when the record has no
    /// `externalId`. The `entityId` the record carries matches nobody (the spec names
    /// only the two keys). A soft-deleted match is revived by the write (inferred: one
    /// record per person, not a second one).
    fn find_match(&self, record: &IncomingRecord) -> Option<usize> {
        let ext = non_empty(&record.external_id);
        if let Some(ext) = ext {
            if let Some(pos) = self
                .contacts
                .iter()
                .position(|c| non_empty(&c.external_id) == Some(ext))
            {
                return Some(pos);
            }
        }
        let email = non_empty(&record.email_address)?;
        // A live contact wins over a deleted one with the same address.
        let same = |c: &SandboxContact| {
            non_empty(&c.email_address).is_some_and(|e| e.eq_ignore_ascii_case(email))
                && (ext.is_none() || non_empty(&c.external_id).is_none())
        };
        self.contacts
            .iter()
            .position(|c| same(c) && !c.deleted)
            .or_else(|| self.contacts.iter().position(same))
    }

    /// Applies one record (already validated). Returns the entity id written.
    pub fn upsert(&mut self, record: IncomingRecord, now: NaiveDateTime) -> i64 {
        let pos = match self.find_match(&record) {
            Some(pos) => pos,
            None => {
                self.last_entity_id += 1;
                self.contacts.push(SandboxContact {
                    entity_id: self.last_entity_id,
                    create_date: Some(now),
                    master_opt_in: true,
                    ..SandboxContact::default()
                });
                self.contacts.len() - 1
            }
        };
        let Some(contact) = self.contacts.get_mut(pos) else {
            return 0;
        };
        let set = |slot: &mut Option<String>, value: Option<String>| {
            if let Some(v) = value {
                *slot = Some(v).filter(|v| !v.trim().is_empty());
            }
        };
        // The fields a record gives replace the contact's (a blank one clears it); the
        // ones it leaves out stay.
        macro_rules! merge {
            ($($field:ident),*) => { $( set(&mut contact.$field, record.$field); )* };
        }
        merge!(
            external_id,
            email_address,
            contact_title,
            full_name,
            first_name,
            last_name,
            username,
            date_of_birth,
            customer_type,
            industry_type,
            lead_source_type,
            rating_type
        );
        if let Some(addresses) = record.addresses {
            for address in addresses {
                contact
                    .addresses
                    .retain(|a| a.address_type_id != address.address_type_id);
                let empty = [
                    &address.address_line1,
                    &address.address_line2,
                    &address.city,
                    &address.zipcode,
                    &address.state,
                    &address.country_code,
                ]
                .iter()
                .all(|p| p.trim().is_empty());
                if !empty {
                    contact.addresses.push(address);
                }
            }
            contact.addresses.sort_by_key(|a| a.address_type_id);
        }
        if let Some(phones) = record.phone_nos {
            for phone in phones {
                contact
                    .phone_nos
                    .retain(|p| p.phone_no_type_id != phone.phone_no_type_id);
                if !phone.phone_no.trim().is_empty() {
                    contact.phone_nos.push(phone);
                }
            }
            contact.phone_nos.sort_by_key(|p| p.phone_no_type_id);
        }
        if let Some(forms) = record.crm_forms {
            for form in forms {
                let stored = match contact
                    .crm_forms
                    .iter()
                    .position(|f| f.form_id == form.form_id)
                {
                    Some(i) => &mut contact.crm_forms[i],
                    None => {
                        contact.crm_forms.push(SandboxCrmForm {
                            form_id: form.form_id,
                            form_name: form.form_name.clone(),
                            fields: Vec::new(),
                        });
                        let last = contact.crm_forms.len() - 1;
                        &mut contact.crm_forms[last]
                    }
                };
                if !form.form_name.is_empty() {
                    stored.form_name = form.form_name;
                }
                for field in form.fields {
                    stored.fields.retain(|f| {
                        !(f.field_id == field.field_id
                            && (field.field_id != 0 || f.field_name == field.field_name))
                    });
                    stored.fields.push(field);
                }
            }
        }
        if let Some(opt_in) = record.master_opt_in {
            contact.master_opt_in = opt_in;
        }
        contact.deleted = false;
        contact.last_update_date = Some(now);
        contact.entity_id
    }

    /// Contacts with `lastUpdateDate >= since`, ordered by last update then entity id
    /// (inferred), deleted ones included: the page starting at `record_start`, and
    /// whether more follow.
    pub fn list_since(
        &self,
        since: NaiveDateTime,
        record_start: usize,
    ) -> (Vec<SandboxContact>, bool) {
        let mut matching: Vec<&SandboxContact> = self
            .contacts
            .iter()
            .filter(|c| c.last_update_date.is_some_and(|d| d >= since))
            .collect();
        matching.sort_by_key(|c| (c.last_update_date, c.entity_id));
        let page: Vec<SandboxContact> = matching
            .iter()
            .skip(record_start)
            .take(PAGE_SIZE)
            .map(|c| (*c).clone())
            .collect();
        let more = matching.len() > record_start.saturating_add(PAGE_SIZE);
        (page, more)
    }

    /// Edits the first contact of the list from `since`, as staff would while someone
    /// pages it (the fault [`crate::Faults::edit_while_paging`]): ` (edited)` on its
    /// first name, and a `lastUpdateDate` after every other (`now`, or a second after
    /// the latest), so that it moves to the end of the list.
    pub fn edit_head(&mut self, since: NaiveDateTime, now: NaiveDateTime) {
        let latest = self
            .contacts
            .iter()
            .filter_map(|c| c.last_update_date)
            .max();
        let head = self
            .contacts
            .iter()
            .enumerate()
            .filter(|(_, c)| c.last_update_date.is_some_and(|d| d >= since))
            .min_by_key(|(_, c)| (c.last_update_date, c.entity_id))
            .map(|(i, _)| i);
        let Some(i) = head else { return };
        let when = match latest {
            Some(l) if l >= now => l + chrono::Duration::seconds(1),
            _ => now,
        };
        let contact = &mut self.contacts[i];
        let name = contact.first_name.take().unwrap_or_default();
        contact.first_name = Some(format!("{name} (edited)"));
        contact.last_update_date = Some(when);
    }

    /// The live contact with `entity_id`.
    pub fn by_entity_id(&self, entity_id: i64) -> Option<&SandboxContact> {
        self.contacts
            .iter()
            .find(|c| c.entity_id == entity_id && !c.deleted)
    }

    /// The live contact with `external_id`.
    pub fn by_external_id(&self, external_id: &str) -> Option<&SandboxContact> {
        let wanted = external_id.trim();
        self.contacts
            .iter()
            .find(|c| !c.deleted && non_empty(&c.external_id) == Some(wanted))
    }

    /// The first live contact with `email` (case-insensitive).
    pub fn by_email(&self, email: &str) -> Option<&SandboxContact> {
        let wanted = email.trim();
        self.contacts.iter().find(|c| {
            !c.deleted
                && non_empty(&c.email_address).is_some_and(|e| e.eq_ignore_ascii_case(wanted))
        })
    }

    /// Soft-deletes the live contact with `entity_id`; `false` when there is none.
    pub fn delete_entity(&mut self, entity_id: i64, now: NaiveDateTime) -> bool {
        match self
            .contacts
            .iter_mut()
            .find(|c| c.entity_id == entity_id && !c.deleted)
        {
            Some(contact) => {
                contact.deleted = true;
                contact.last_update_date = Some(now);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S").unwrap()
    }

    fn rec(ext: Option<&str>, email: Option<&str>, first: &str) -> IncomingRecord {
        IncomingRecord {
            external_id: ext.map(String::from),
            email_address: email.map(String::from),
            first_name: Some(first.into()),
            ..IncomingRecord::default()
        }
    }

    #[test]
    fn matching_follows_external_id_then_email_then_always_adds() {
        let mut store = Store::default();
        let now = at("2026-01-01T00:00:00");
        let a = store.upsert(rec(Some("E1"), Some("a@x.org"), "A"), now);
        // Same external id, different email: updates.
        assert_eq!(store.upsert(rec(Some("E1"), Some("b@x.org"), "A2"), now), a);
        // Email only, case-insensitive: updates the contact with that email.
        assert_eq!(store.upsert(rec(None, Some("B@X.org"), "A3"), now), a);
        // External id differs: a new contact even with the same email.
        let b = store.upsert(rec(Some("E2"), Some("b@x.org"), "B"), now);
        assert_ne!(a, b);
        // Neither: always added.
        let c = store.upsert(rec(None, None, "C"), now);
        let d = store.upsert(rec(None, None, "C"), now);
        assert_ne!(c, d);
        assert_eq!(store.contacts.len(), 4);
        assert_eq!(
            store.by_entity_id(a).unwrap().first_name.as_deref(),
            Some("A3")
        );
    }

    #[test]
    fn listing_is_inclusive_ordered_and_paged() {
        let mut store = Store::default();
        for i in 0..250 {
            let minute = i % 3;
            let now = at(&format!("2026-01-01T00:0{minute}:00"));
            store.upsert(rec(Some(&format!("E{i}")), None, "x"), now);
        }
        let (page, more) = store.list_since(at("2026-01-01T00:01:00"), 0);
        assert_eq!(page.len(), 100);
        assert!(more);
        assert!(page
            .windows(2)
            .all(|w| (w[0].last_update_date, w[0].entity_id)
                < (w[1].last_update_date, w[1].entity_id)));
        let (page, more) = store.list_since(at("2026-01-01T00:01:00"), 100);
        assert_eq!(page.len(), 66);
        assert!(!more);
    }

    #[test]
    fn email_rule() {
        assert!(email_is_acceptable("a@b.org"));
        assert!(!email_is_acceptable("a@b"));
        assert!(!email_is_acceptable("not an email"));
        assert!(!email_is_acceptable("a b@c.org"));
    }
}
