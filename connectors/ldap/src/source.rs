//! Reading people out of a directory, one page at a time.
//!
//! A read is one paged subtree search (RFC 2696, `PagedResults`) per pass: the server
//! sends a page, the engine pulls entries one by one, and the next page is only asked
//! for when the current one is used up, so memory is bounded by the page size whatever
//! the directory's size. With `inactive_filter` set there are two passes — the active
//! people `(&(filter)(!(inactive)))`, then the inactive ones `(&(filter)(inactive))` —
//! so that "disabled" can be any filter the server understands (Active Directory's
//! `userAccountControl` bit, 389-DS's `nsAccountLock`), and every entry is still read
//! exactly once.
//!
//! # Incremental reads
//! `(modifyTimestamp>=CURSOR)` is and-ed to the filter. The cursor is the newest
//! `modifyTimestamp` seen, in the server's clock (generalized time, `YYYYMMDDHHMMSSZ`),
//! so client clock skew does not matter. The timestamp has one-second resolution,
//! hence `>=` rather than `>`: an entry changed later in the same second as the newest
//! one read must not be lost, at the price of reading that second's entries again
//! (the engine's diff finds them unchanged). An incremental read never sees deletions,
//! so it says `complete: false`; removals come from the full reads the engine schedules
//! (the pipeline's `full_every`; left out, this source asks for one every
//! [`FULL_EVERY`] runs).
//!
//! # Changes during the read
//! An entry changed after its page was returned can carry a `modifyTimestamp` older
//! than a later entry's: a cursor at the newest time seen would pass it, and its change
//! would be lost for good. So when the passes end, a catch-up search asks for the
//! entries changed since the read's own start (`since` for an incremental read; for a
//! full read the local time at start less [`CATCH_UP_WINDOW`], for clock skew) and
//! compares them with what was read: an entry not read yet is yielded then (a paged
//! search that skipped it loses nothing), and an entry read with another timestamp
//! holds the cursor at or before the version read, so the next read brings the new
//! one (an overlap the engine's diff de-duplicates). An entry met twice is the same
//! person, yielded once.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, Utc};
use contactsync_core::{
    async_trait, ConnectorError, ContactStatus, Origin, ReadMode, ReadOutcome, RecordError,
    RecordStream, Source, SourceCapabilities, SourceItem, SourceRecord,
};
use ldap3::adapters::{EntriesOnly, PagedResults};
use ldap3::{Ldap, Scope, SearchEntry, SearchStream};

use crate::client::{self, describe, rc};
use crate::config::SourceConfig;

/// The operational attributes every read asks for besides the mapped ones.
const MODIFY_TIMESTAMP: &str = "modifyTimestamp";
/// The default of a pipeline's `full_every` with an LDAP source: deletes are seen only
/// by full reads, so one every seventh run.
pub const FULL_EVERY: u32 = 7;
const ENTRY_UUID: &str = "entryUUID";
/// How far before a full read's start (by the local clock) its catch-up search looks
/// for entries changed during the read: room for the server's clock to lag behind.
pub const CATCH_UP_WINDOW: chrono::Duration = chrono::Duration::hours(1);

/// An LDAP directory as a [`Source`].
#[derive(Debug, Clone)]
pub struct LdapSource {
    config: Arc<SourceConfig>,
}

impl LdapSource {
    /// A source with checked settings; touches no network until `check` or `read`.
    pub fn new(config: SourceConfig) -> Self {
        LdapSource {
            config: Arc::new(config),
        }
    }

    /// The search filters of a read, each with the status its entries get.
    fn passes(&self, since: Option<&str>) -> Vec<(String, ContactStatus)> {
        let config = &self.config;
        let changed = since
            .map(|cursor| format!("({MODIFY_TIMESTAMP}>={})", ldap3::ldap_escape(cursor)))
            .unwrap_or_default();
        match &config.inactive_filter {
            None if changed.is_empty() => vec![(config.filter.clone(), ContactStatus::Active)],
            None => vec![(
                format!("(&{}{changed})", config.filter),
                ContactStatus::Active,
            )],
            Some(inactive) => vec![
                (
                    format!("(&{}(!{inactive}){changed})", config.filter),
                    ContactStatus::Active,
                ),
                (
                    format!("(&{}{inactive}{changed})", config.filter),
                    ContactStatus::Inactive,
                ),
            ],
        }
    }
}

#[async_trait]
impl Source for LdapSource {
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities {
            incremental: true,
            reports_deletions: false,
            // An incremental search cannot see a deleted entry: a full read every
            // seventh run (a week of nightly runs) brings removals to the sink, unless
            // the pipeline's `full_every` says otherwise (`"never"`: never).
            full_every: Some(FULL_EVERY),
            skips_unchanged: false,
        }
    }

    async fn check(&self) -> Result<(), ConnectorError> {
        let mut ldap = client::connect(&self.config.connection).await?;
        let checked = client::check_base(
            &mut ldap,
            &self.config.base_dn,
            self.config.connection.operation_timeout,
        )
        .await;
        let _ = ldap.unbind().await;
        checked
    }

    async fn read(&self, mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
        let (since, complete) = match &mode {
            ReadMode::Full => (None, true),
            ReadMode::Incremental { cursor: None } => (None, true),
            ReadMode::Incremental {
                cursor: Some(cursor),
            } => {
                let time = parse_generalized_time(cursor).ok_or_else(|| {
                    ConnectorError::Other(format!(
                        "the stored LDAP cursor {cursor:?} is not a generalized time (YYYYMMDDHHMMSSZ); run a full read to replace it"
                    ))
                })?;
                (Some(format_generalized_time(time)), false)
            }
        };
        let passes = self.passes(since.as_deref());
        let catch_up_from = since
            .clone()
            .unwrap_or_else(|| format_generalized_time(Utc::now() - CATCH_UP_WINDOW));
        let catch_up = self.passes(Some(&catch_up_from));
        let ldap = client::connect(&self.config.connection).await?;
        let mut attributes: Vec<String> = self
            .config
            .attributes
            .pairs()
            .iter()
            .map(|(attr, _)| attr.clone())
            .collect();
        attributes.push(MODIFY_TIMESTAMP.to_string());
        attributes.push(ENTRY_UUID.to_string());
        tracing::info!(
            base_dn = %self.config.base_dn,
            filter = %passes.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>().join(" then "),
            page_size = self.config.page_size,
            "reading the directory"
        );
        Ok(Box::new(LdapRecordStream {
            config: Arc::clone(&self.config),
            ldap,
            passes: passes.into(),
            current: None,
            attributes,
            newest: None,
            since,
            complete,
            read: 0,
            catch_up: Some(catch_up.into()),
            catching_up: false,
            seen: HashMap::new(),
            floor: None,
        }))
    }
}

type Search = SearchStream<'static, String, Vec<String>>;

/// A read in progress: the current pass's paged search and those still to run.
struct LdapRecordStream {
    config: Arc<SourceConfig>,
    ldap: Ldap,
    passes: VecDeque<(String, ContactStatus)>,
    current: Option<(Search, String, ContactStatus)>,
    attributes: Vec<String>,
    newest: Option<DateTime<Utc>>,
    since: Option<String>,
    complete: bool,
    read: u64,
    /// The catch-up searches, run once the passes end.
    catch_up: Option<VecDeque<(String, ContactStatus)>>,
    /// Whether the current search is a catch-up one.
    catching_up: bool,
    /// DN → the `modifyTimestamp` of the version yielded.
    seen: HashMap<String, Option<String>>,
    /// The oldest version yielded of an entry that changed during the read: the cursor
    /// does not pass it.
    floor: Option<DateTime<Utc>>,
}

impl LdapRecordStream {
    fn search_call(&self, filter: &str) -> String {
        format!("search {:?} for {filter}", self.config.base_dn)
    }

    async fn start_pass(
        &mut self,
        filter: String,
        status: ContactStatus,
    ) -> Result<(), ConnectorError> {
        let timeout = self.config.connection.operation_timeout;
        let page_size = i32::try_from(self.config.page_size).unwrap_or(i32::MAX);
        let search = self
            .ldap
            .with_timeout(timeout)
            .streaming_search_with(
                vec![
                    Box::new(EntriesOnly::new()) as Box<dyn ldap3::adapters::Adapter<_, _>>,
                    Box::new(PagedResults::new(page_size)),
                ],
                &self.config.base_dn,
                Scope::Subtree,
                &filter,
                self.attributes.clone(),
            )
            .await
            .map_err(|e| client::call_error(self.search_call(&filter), e, timeout))?;
        self.current = Some((search, filter, status));
        Ok(())
    }

    /// Whether `entry` was yielded before in this read (the same person, not yielded
    /// again); in the catch-up, one read with another timestamp changed during the
    /// read, and holds the cursor at the version read.
    fn met_before(&mut self, entry: &SearchEntry) -> bool {
        let stamp = first_value(entry, MODIFY_TIMESTAMP).map(str::to_string);
        match self.seen.get(&entry.dn) {
            None => {
                if self.catching_up {
                    tracing::info!(dn = %entry.dn, "an entry changed or added during the read, read by the catch-up");
                }
                self.seen.insert(entry.dn.clone(), stamp);
                false
            }
            Some(was) => {
                if self.catching_up && *was != stamp {
                    tracing::info!(dn = %entry.dn, "an entry changed during the read; the cursor stays before its earlier version");
                    if let Some(time) = was.as_deref().and_then(parse_generalized_time) {
                        self.floor = Some(self.floor.map_or(time, |f| f.min(time)));
                    }
                }
                true
            }
        }
    }

    /// Maps one entry; a value that does not fit its field rejects the entry.
    fn item(&mut self, entry: SearchEntry, status: ContactStatus) -> SourceItem {
        let origin = Origin::Entry {
            dn: entry.dn.clone(),
        };
        let modified = first_value(&entry, MODIFY_TIMESTAMP).and_then(parse_generalized_time);
        if let Some(time) = modified {
            if self.newest.is_none_or(|newest| time > newest) {
                self.newest = Some(time);
            }
        }
        let config = &self.config;
        match config.attributes.read(
            &entry.attrs,
            config.multi_value,
            &config.multi_value_separator,
        ) {
            Ok(mut contact) => {
                contact.updated_at = modified;
                // The status pass decides, unless a mapped attribute said more
                // (an opt-out must not turn back into "inactive").
                if status == ContactStatus::Inactive && contact.status == ContactStatus::Active {
                    contact.status = ContactStatus::Inactive;
                }
                tracing::trace!(dn = %entry.dn, entry_uuid = ?first_value(&entry, ENTRY_UUID), "read entry");
                SourceItem::Record(Box::new(SourceRecord::new(contact, origin)))
            }
            Err((field, reason)) => {
                let raw = format!(
                    "entryUUID={} {:?}",
                    first_value(&entry, ENTRY_UUID).unwrap_or("?"),
                    entry.attrs
                );
                SourceItem::Rejected(Box::new(
                    RecordError::new(origin, reason)
                        .with_field(field.to_string())
                        .with_raw(raw),
                ))
            }
        }
    }
}

#[async_trait]
impl RecordStream for LdapRecordStream {
    async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
        let timeout = self.config.connection.operation_timeout;
        loop {
            let Some((search, filter, status)) = self.current.as_mut() else {
                match self.passes.pop_front() {
                    Some((filter, status)) => {
                        self.start_pass(filter, status).await?;
                        continue;
                    }
                    None => match self.catch_up.take() {
                        Some(searches) => {
                            self.passes = searches;
                            self.catching_up = true;
                            continue;
                        }
                        None => return Ok(None),
                    },
                }
            };
            let status = *status;
            match search.next().await {
                Ok(Some(entry)) => {
                    let entry = SearchEntry::construct(entry);
                    if self.met_before(&entry) {
                        continue;
                    }
                    self.read += 1;
                    return Ok(Some(self.item(entry, status)));
                }
                Ok(None) => {
                    let result = search.finish().await;
                    let call = format!("search {:?} for {filter}", self.config.base_dn);
                    self.current = None;
                    match result.rc {
                        0 => continue,
                        rc::SIZE_LIMIT_EXCEEDED => {
                            return Err(ConnectorError::Limit(format!(
                                "{call}: the server's size limit cut the read short after {} entries ({}); \
                                 the paged search should avoid it — ask the directory's administrators to allow \
                                 paged results (OpenLDAP: size.prtotal) for the bind account",
                                self.read,
                                describe(&result)
                            )))
                        }
                        rc::NO_SUCH_OBJECT => {
                            return Err(ConnectorError::Call {
                                call,
                                status: None,
                                message: format!("base_dn {:?} does not exist", self.config.base_dn),
                            })
                        }
                        _ => {
                            return Err(ConnectorError::Call {
                                call,
                                status: None,
                                message: describe(&result),
                            })
                        }
                    }
                }
                Err(e) => {
                    let call = format!("search {:?} for {filter}", self.config.base_dn);
                    self.current = None;
                    return Err(client::call_error(call, e, timeout));
                }
            }
        }
    }

    async fn finish(mut self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
        let _ = self.ldap.unbind().await;
        let newest = match (self.newest, self.floor) {
            (Some(newest), Some(floor)) => Some(newest.min(floor)),
            (newest, floor) => newest.or(floor),
        };
        let cursor = newest.map(format_generalized_time).or(self.since.clone());
        tracing::info!(entries = self.read, cursor = ?cursor, complete = self.complete, "directory read");
        Ok(ReadOutcome {
            complete: self.complete,
            cursor,
        })
    }
}

fn first_value<'e>(entry: &'e SearchEntry, attr: &str) -> Option<&'e str> {
    entry
        .attrs
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(attr))
        .and_then(|(_, values)| values.first())
        .map(String::as_str)
}

/// Parses an LDAP generalized time (RFC 4517 §3.3.13): `YYYYMMDDHHMMSS`, an optional
/// fraction, then `Z` or an offset (`+0100`). Minutes and seconds are required here,
/// as every directory writes them in `modifyTimestamp`.
pub fn parse_generalized_time(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    let (digits, rest) = text.split_at_checked(14)?;
    let naive = NaiveDateTime::parse_from_str(digits, "%Y%m%d%H%M%S").ok()?;
    let rest = rest
        .strip_prefix(['.', ','])
        .map(|r| r.trim_start_matches(|c: char| c.is_ascii_digit()))
        .unwrap_or(rest);
    let offset_secs = match rest {
        "Z" => 0,
        _ => {
            let (sign, hhmm) = match rest.split_at_checked(1)? {
                ("+", hhmm) => (1, hhmm),
                ("-", hhmm) => (-1, hhmm),
                _ => return None,
            };
            if hhmm.len() != 4 || !hhmm.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let hours: i64 = hhmm[..2].parse().ok()?;
            let minutes: i64 = hhmm[2..].parse().ok()?;
            sign * (hours * 3600 + minutes * 60)
        }
    };
    Some(naive.and_utc() - chrono::Duration::seconds(offset_secs))
}

/// Formats a time as the generalized time used in cursors and filters: `YYYYMMDDHHMMSSZ`.
pub fn format_generalized_time(time: DateTime<Utc>) -> String {
    time.format("%Y%m%d%H%M%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generalized_times_of_several_directories_parse() {
        let utc = parse_generalized_time("20261121103045Z").unwrap();
        assert_eq!(format_generalized_time(utc), "20261121103045Z");
        // Active Directory writes a fraction.
        assert_eq!(parse_generalized_time("20261121103045.0Z"), Some(utc));
        assert_eq!(
            parse_generalized_time("20261121113045+0100"),
            Some(utc),
            "offsets are folded into UTC"
        );
        assert_eq!(parse_generalized_time("2026112110Z"), None);
        assert_eq!(parse_generalized_time("20261121103045Q"), None);
        assert_eq!(parse_generalized_time("nonsense*)(uid=*"), None);
    }
}
