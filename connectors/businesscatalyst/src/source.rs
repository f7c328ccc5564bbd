//! Reading contacts out of Business Catalyst: `ContactList_Retrieve` from a date, page
//! by page.
//!
//! Why it is shaped so:
//! - A full read asks from `0001-01-01T00:00:00` (BC's "no date") and is complete; an
//!   incremental read asks from the cursor and is never complete, so the engine never
//!   removes anyone for being absent from it. Deletions come as `deleted=true` records
//!   either way, yielded with [`SourceRecord::deleted`].
//! - The cursor is the latest `lastUpdateDate` seen, **as BC writes it: site-local
//!   time without zone** (`2026-11-21T10:15:00` or with a fraction). It is sent back
//!   unchanged, so no time zone arithmetic can shift it. The service's comparison is
//!   inclusive, so the records changed at exactly that instant are read again next
//!   time: harmless (the engine's diff finds them unchanged) and it never skips a
//!   record written in the same second after the read.
//! - On the autumn night the site's clock repeats an hour: a change made in the
//!   repeated hour's second run is stamped earlier than one made in its first, so a
//!   cursor taken in the first would leave it behind. A cursor that falls in a
//!   repeated hour is moved back by the length of the repeat before it is sent
//!   ([`overlap_repeated_hour`]); the records read twice are the same people, found
//!   unchanged by the engine's diff. Any other cursor is sent as it is.
//! - One page (100 records) is held at a time.
//! - Reads that page do not skip. The list is ordered by `lastUpdateDate` and paged by
//!   offset, so a contact changed during the read, after its page was read, moves to
//!   the end, and the record behind it shifts back onto a page already read: it is
//!   skipped, and a catch-up of "changes since the read began" cannot bring it back
//!   (it did not change). Such a move shows as the same `entityId` met twice in one
//!   pass. A pass that met one is followed by another (at most [`MAX_PASSES`] in all)
//!   that yields only the records no pass yielded yet; a read whose last pass still
//!   met a move is incomplete, so no removal comes from it. A record met again is the
//!   same person, never yielded twice: its newer version is left to the next read,
//!   whose cursor is kept at or before the version yielded (overlap, de-duplicated by
//!   the engine's diff), so the update is never lost.

use std::collections::{HashMap, HashSet, VecDeque};

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use contactsync_core::{
    async_trait, ConfigError, ConnectorError, ConnectorSettings, Contact, ContactStatus, Field,
    Origin, ReadMode, ReadOutcome, ReadPasses, RecordStream, Source, SourceCapabilities,
    SourceItem, SourceRecord,
};

use crate::client::{BcClient, PAGE_SIZE};
use crate::config::{BcConfig, ADDRESS_PARTS};
use crate::soap::{ContactRecord, UNSET_DATE};

/// The most passes over the list one read makes while contacts move under it.
pub const MAX_PASSES: u32 = 3;

/// The system name in [`Origin::Record`].
pub const SYSTEM: &str = "businesscatalyst";

/// A Business Catalyst site as a source of contacts.
#[derive(Debug)]
pub struct BcSource {
    config: BcConfig,
    client: BcClient,
}

impl BcSource {
    /// A source for `config`. Touches no network.
    pub fn new(config: BcConfig) -> Result<BcSource, ConnectorError> {
        let client = BcClient::new(&config)?;
        Ok(BcSource { config, client })
    }
}

/// The registry's builder.
pub fn build(settings: &ConnectorSettings) -> Result<Box<dyn Source>, ConfigError> {
    let config = BcConfig::from_settings(settings)?;
    let source = BcSource::new(config).map_err(|e| settings.error("base_url", e.to_string()))?;
    Ok(Box::new(source))
}

#[async_trait]
impl Source for BcSource {
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities {
            incremental: true,
            // Deleted contacts come back from incremental reads (`deleted=true`).
            reports_deletions: true,
            full_every: None,
            skips_unchanged: false,
        }
    }

    async fn check(&self) -> Result<(), ConnectorError> {
        self.client.check().await
    }

    async fn read(&self, mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
        let (since, complete, previous) = match mode {
            ReadMode::Full => (UNSET_DATE.to_string(), true, None),
            ReadMode::Incremental { cursor: None } => (UNSET_DATE.to_string(), false, None),
            ReadMode::Incremental { cursor: Some(c) } => {
                let date = parse_bc_date(&c, self.config.time_zone).ok_or_else(|| {
                    ConnectorError::Other(format!(
                        "the stored Business Catalyst cursor {c:?} is not a date; run a full read to reset it"
                    ))
                })?;
                (
                    format_bc_date(overlap_repeated_hour(date, self.config.time_zone)),
                    false,
                    Some(c),
                )
            }
        };
        tracing::info!(since = %since, complete, "businesscatalyst: reading contacts");
        Ok(Box::new(RetrieveStream {
            client: self.client.clone(),
            config: self.config.clone(),
            since,
            complete,
            next_start: 0,
            page: 0,
            buffer: VecDeque::new(),
            more: true,
            latest: None,
            previous_cursor: previous,
            passes: ReadPasses::new(MAX_PASSES),
            seen_this_pass: HashSet::new(),
            moved_this_pass: false,
            yielded: HashMap::new(),
            floor: None,
        }))
    }
}

/// A read in progress: one page buffered, the next fetched when it runs out.
struct RetrieveStream {
    client: BcClient,
    config: BcConfig,
    since: String,
    complete: bool,
    next_start: u64,
    page: u64,
    buffer: VecDeque<(u64, ContactRecord)>,
    more: bool,
    latest: Option<NaiveDateTime>,
    previous_cursor: Option<String>,
    /// The passes over the list.
    passes: ReadPasses,
    /// The entity ids met in this pass: one met twice moved during the read.
    seen_this_pass: HashSet<i64>,
    /// Whether this pass met a record twice (one behind it may have been skipped).
    moved_this_pass: bool,
    /// Entity id → the `lastUpdateDate` of the version yielded.
    yielded: HashMap<i64, Option<NaiveDateTime>>,
    /// The earliest yielded version of a record that changed during the read: the
    /// cursor never passes it, so the next read brings the newer version.
    floor: Option<NaiveDateTime>,
}

#[async_trait]
impl RecordStream for RetrieveStream {
    async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
        loop {
            if let Some((index, record)) = self.buffer.pop_front() {
                if self.already_met(&record) {
                    continue;
                }
                return Ok(Some(self.item(index, record)));
            }
            if !self.more {
                if !self.moved_this_pass {
                    return Ok(None);
                }
                // A record moved under the read: one behind it may have been skipped.
                // Page through again for the records no pass yielded yet.
                if !self.passes.another("Business Catalyst contacts") {
                    return Ok(None);
                }
                self.seen_this_pass.clear();
                self.moved_this_pass = false;
                self.next_start = 0;
                self.more = true;
            }
            let start = self.next_start;
            let page = self.client.retrieve_page(&self.since, start).await?;
            self.page += 1;
            self.next_start += PAGE_SIZE;
            self.more = page.more_records;
            tracing::debug!(
                record_start = start,
                records = page.records.len(),
                more = self.more,
                "businesscatalyst: page"
            );
            if page.records.is_empty() && self.more {
                return Err(ConnectorError::Protocol {
                    call: "ContactList_Retrieve".into(),
                    message: format!(
                        "an empty page at recordStart {start} says more records follow"
                    ),
                });
            }
            self.buffer.extend(
                page.records
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| (i as u64 + 1, r)),
            );
        }
    }

    async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
        let latest = match (self.latest, self.floor) {
            (Some(latest), Some(floor)) => Some(latest.min(floor)),
            (latest, floor) => latest.or(floor),
        };
        let cursor = match latest {
            Some(latest) => Some(format_bc_date(latest)),
            None => self.previous_cursor,
        };
        Ok(ReadOutcome {
            complete: self.complete && self.passes.complete(),
            cursor,
        })
    }
}

impl RetrieveStream {
    /// Whether `record` was met before in this read: again in this pass (it moved: a
    /// record behind it may have been skipped), or yielded by an earlier pass. Either
    /// way it is the same person, not yielded again; a newer version of it lowers the
    /// cursor's floor to the version yielded.
    fn already_met(&mut self, record: &ContactRecord) -> bool {
        let id = record.entity_id;
        if id <= 0 {
            return false;
        }
        if !self.seen_this_pass.insert(id) {
            self.moved_this_pass = true;
        }
        let Some(yielded) = self.yielded.get(&id) else {
            return false;
        };
        let now = record
            .last_update_date
            .as_deref()
            .and_then(|d| parse_bc_date(d, self.config.time_zone));
        if now != *yielded {
            if let Some(was) = *yielded {
                self.floor = Some(self.floor.map_or(was, |f| f.min(was)));
            }
        }
        true
    }

    fn item(&mut self, index: u64, record: ContactRecord) -> SourceItem {
        let origin = if record.entity_id > 0 {
            Origin::Record {
                system: SYSTEM.into(),
                id: record.entity_id.to_string(),
            }
        } else {
            Origin::Page {
                call: "ContactList_Retrieve".into(),
                page: self.page,
                index,
            }
        };
        let updated = record
            .last_update_date
            .as_deref()
            .and_then(|d| parse_bc_date(d, self.config.time_zone));
        if record.entity_id > 0 {
            self.yielded.insert(record.entity_id, updated);
        }
        if let Some(updated) = updated {
            if self.latest.is_none_or(|l| updated > l) {
                self.latest = Some(updated);
            }
        }
        let deleted = record.deleted;
        match to_contact(&record, &self.config) {
            Ok(contact) => SourceItem::Record(Box::new(SourceRecord {
                contact,
                origin,
                deleted,
            })),
            Err(e) => SourceItem::Rejected(Box::new(e.into_record_error(origin))),
        }
    }
}

/// Why a record could not be mapped.
#[derive(Debug)]
pub struct MapError {
    field: String,
    reason: String,
}

impl MapError {
    fn into_record_error(self, origin: Origin) -> contactsync_core::RecordError {
        contactsync_core::RecordError::new(origin, self.reason).with_field(self.field)
    }
}

/// Parses a BC date: site-local without zone (with or without fraction), or, liberally,
/// one with an offset (converted to the site's zone), or a bare date.
pub fn parse_bc_date(value: &str, tz: Tz) -> Option<NaiveDateTime> {
    let value = value.trim();
    if let Ok(d) = NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(d);
    }
    if let Ok(d) = DateTime::parse_from_rfc3339(value) {
        return Some(d.with_timezone(&tz).naive_local());
    }
    chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
}

/// Writes a BC date: `YYYY-MM-DDTHH:MM:SS`, with the fraction only when there is one.
pub fn format_bc_date(date: NaiveDateTime) -> String {
    if date.and_utc().timestamp_subsec_nanos() == 0 {
        date.format("%Y-%m-%dT%H:%M:%S").to_string()
    } else {
        date.format("%Y-%m-%dT%H:%M:%S%.f").to_string()
    }
}

/// The date to read from for cursor `date`: when `date` names two instants (the clock
/// went back over it), the earlier of its two local times minus the length of the
/// repeat, so that every change stamped in the repeated hour after the cursor's
/// instant is read; otherwise `date`.
pub fn overlap_repeated_hour(date: NaiveDateTime, tz: Tz) -> NaiveDateTime {
    match tz.from_local_datetime(&date) {
        chrono::LocalResult::Ambiguous(first, second) => {
            let repeat = second.with_timezone(&Utc) - first.with_timezone(&Utc);
            date - repeat.abs()
        }
        _ => date,
    }
}

/// A site-local date as an instant (the earlier one when the clock went back).
pub fn to_utc(date: NaiveDateTime, tz: Tz) -> Option<DateTime<Utc>> {
    tz.from_local_datetime(&date)
        .earliest()
        .map(|d| d.with_timezone(&Utc))
}

/// Maps a `ContactRecord` into a [`Contact`].
pub fn to_contact(record: &ContactRecord, config: &BcConfig) -> Result<Contact, MapError> {
    let mut contact = Contact::default();
    let set = |contact: &mut Contact, field: &Field, value: &str, what: &str| {
        contact.set(field, value).map_err(|reason| MapError {
            field: what.to_string(),
            reason,
        })
    };
    let simple = [
        (Field::ExternalId, &record.external_id, "externalId"),
        (Field::Email, &record.email_address, "emailAddress"),
        (Field::FirstName, &record.first_name, "firstName"),
        (Field::LastName, &record.last_name, "lastName"),
        (Field::DisplayName, &record.full_name, "fullName"),
    ];
    for (field, value, what) in simple {
        if let Some(v) = value {
            set(&mut contact, &field, v, what)?;
        }
    }
    for phone in record.phone_nos.iter().flatten() {
        if let Some(field) = config.phone_types.get(&phone.type_id) {
            set(&mut contact, field, &phone.number, "phoneNos")?;
        }
    }
    for address in record.addresses.iter().flatten() {
        if let Some(prefix) = config.addresses.get(&address.type_id) {
            let parts = [
                &address.line1,
                &address.line2,
                &address.city,
                &address.zipcode,
                &address.state,
                &address.country_code,
            ];
            for (suffix, value) in ADDRESS_PARTS.iter().zip(parts) {
                set(
                    &mut contact,
                    &Field::Attribute(format!("{prefix}_{suffix}")),
                    value,
                    "addresses",
                )?;
            }
        }
    }
    for form in record.crm_forms.iter().flatten() {
        for field in &form.fields {
            let target = match &config.crm_fields {
                None => Some(Field::Attribute(field.name.trim().to_string())),
                Some(map) => map.get(field.name.trim()).cloned(),
            };
            if let Some(target) = target.filter(|t| !t.name().is_empty()) {
                set(&mut contact, &target, &field.value, "crmForms")?;
            }
        }
    }
    if record.master_opt_in == Some(false) {
        contact.status = ContactStatus::OptedOut;
    }
    contact.updated_at = record
        .last_update_date
        .as_deref()
        .and_then(|d| parse_bc_date(d, config.time_zone))
        .and_then(|d| to_utc(d, config.time_zone));
    Ok(contact)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soap::{CrmForm, CrmFormField, PhoneNo};

    fn config() -> BcConfig {
        let s = ConnectorSettings::from_toml(
            "sources.bc",
            "base_url = \"http://x\"\nsite_id = 1\npassword = \"p\"\ntime_zone = \"Europe/London\"\naddresses = { \"2\" = \"work\" }",
        )
        .unwrap();
        BcConfig::from_settings(&s).unwrap()
    }

    #[test]
    fn maps_a_record() {
        let record = ContactRecord {
            entity_id: 5,
            external_id: Some("E5".into()),
            email_address: Some(" Ann@Example.COM ".into()),
            full_name: Some("Ann Lee".into()),
            first_name: Some("Ann".into()),
            last_name: Some("Lee".into()),
            last_update_date: Some("2026-07-01T10:00:00".into()),
            phone_nos: Some(vec![
                PhoneNo {
                    type_id: 3,
                    number: "0113".into(),
                },
                PhoneNo {
                    type_id: 5,
                    number: "0777".into(),
                },
                PhoneNo {
                    type_id: 1,
                    number: "home".into(),
                },
            ]),
            addresses: Some(vec![crate::soap::Address {
                type_id: 2,
                city: "Leeds".into(),
                ..Default::default()
            }]),
            crm_forms: Some(vec![CrmForm {
                form_id: 1,
                name: "F".into(),
                fields: vec![CrmFormField {
                    name: "Level".into(),
                    value: "Gold".into(),
                    ..Default::default()
                }],
            }]),
            master_opt_in: Some(false),
            ..Default::default()
        };
        let c = to_contact(&record, &config()).unwrap();
        assert_eq!(c.email.as_deref(), Some("Ann@example.com"));
        assert_eq!(c.display_name.as_deref(), Some("Ann Lee"));
        assert_eq!(c.phone.as_deref(), Some("0113"));
        assert_eq!(c.mobile.as_deref(), Some("0777"));
        assert_eq!(
            c.attributes.get("work_city").map(String::as_str),
            Some("Leeds")
        );
        assert_eq!(c.attributes.get("Level").map(String::as_str), Some("Gold"));
        assert_eq!(c.status, ContactStatus::OptedOut);
        // 10:00 in London in July is 09:00 UTC.
        assert_eq!(
            c.updated_at.unwrap().to_rfc3339(),
            "2026-07-01T09:00:00+00:00"
        );
    }

    #[test]
    fn dates_round_trip_as_bc_writes_them() {
        let tz = Tz::UTC;
        for s in ["2026-01-02T03:04:05", "2026-01-02T03:04:05.120"] {
            let d = parse_bc_date(s, tz).unwrap();
            assert_eq!(parse_bc_date(&format_bc_date(d), tz), Some(d));
        }
        assert_eq!(
            format_bc_date(parse_bc_date("0001-01-01T00:00:00", tz).unwrap()),
            UNSET_DATE
        );
        assert!(parse_bc_date("yesterday", tz).is_none());
    }
}
