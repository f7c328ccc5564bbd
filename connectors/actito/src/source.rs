//! Reading every profile of an Actito table, page by page.
//!
//! The spec names `GET …/table/{t}/profile?search=…&number=N` for listings, and is
//! silent on paging. This source sends no `search` (every profile), `number` = the
//! page size (`page_size`, at most 1000) and `page` = the page index from 0, and stops
//! at the first page shorter than `number`. A server that ignored `page` would send the
//! same page again: the read then stops and says it is *not* complete (so no removal is
//! inferred from it), rather than looping. Memory holds one page at a time, and the
//! ids of the profiles read.
//!
//! Reads that page do not skip: a profile deleted (or moved) during the read, on a
//! page already read, shifts the ones behind it back by one, and one is skipped. So a
//! pass over the table is trusted only when nothing moved under it: the same
//! `profileId` met twice means a move, a `totalCount` (when the server gives one)
//! that differs between the first page and the last means profiles came or went, and
//! a profile created during the pass means one came, so that an equal count says one
//! went too (a deletion and a creation keep the count and still shift the list). To
//! know what was created during the pass, each pass of a table over one page starts
//! with two small calls: one profile (for `totalCount`), then the last page, whose
//! highest `profileId` is the newest profile the pass may meet; Actito numbers
//! profiles in increasing order and lists them in that order (inferred; the sandbox
//! does), so a higher id met later was created after the pass began. A
//! pass that cannot be trusted is followed by another (at most [`MAX_PASSES`] in all)
//! that yields only profiles no pass yielded yet; without a `totalCount` a first pass
//! is always checked by a second, which must find nothing new. A read whose last pass
//! is still not trusted is incomplete: no removal comes from it. A profile met again is
//! the same person, never yielded twice.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use contactsync_core::async_trait;
use contactsync_core::{
    ConnectorError, Origin, ReadMode, ReadOutcome, ReadPasses, RecordError, RecordStream, Source,
    SourceItem, SourceRecord,
};
use serde_json::Value;

use crate::client::{id_text, ActitoClient};
use crate::config::SourceConfig;
use crate::schema::{load_schema, Schema};

/// The most passes over the table one read makes while profiles move under it.
pub const MAX_PASSES: u32 = 3;

/// The Actito source. Built by the `actito` [`contactsync_core::SourceFactory`].
#[derive(Debug)]
pub struct ActitoSource {
    config: SourceConfig,
    client: Arc<ActitoClient>,
}

impl ActitoSource {
    /// A source for `config`. Touches no network.
    pub fn new(config: SourceConfig) -> Result<Self, ConnectorError> {
        let client = Arc::new(ActitoClient::new(&config.connection)?);
        Ok(ActitoSource { config, client })
    }
}

#[async_trait]
impl Source for ActitoSource {
    async fn check(&self) -> Result<(), ConnectorError> {
        load_schema(&self.client, &self.config.mapping, &self.config.section)
            .await
            .map(|_| ())
    }

    async fn read(&self, _mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
        let schema = load_schema(&self.client, &self.config.mapping, &self.config.section).await?;
        Ok(Box::new(ProfileStream {
            client: self.client.clone(),
            schema,
            page_size: self.config.page_size,
            next_page: 0,
            buffer: VecDeque::new(),
            call: String::new(),
            finished: false,
            complete: true,
            previous_first: None,
            passes: ReadPasses::new(MAX_PASSES),
            seen_this_pass: HashSet::new(),
            yielded: HashSet::new(),
            moved: false,
            found_new: false,
            totals: (None, None),
            newest_at_start: None,
            created: false,
        }))
    }
}

/// A read in progress: the current page's profiles, and where the next page is.
struct ProfileStream {
    client: Arc<ActitoClient>,
    schema: Schema,
    page_size: usize,
    next_page: u64,
    buffer: VecDeque<(u64, Value)>,
    call: String,
    finished: bool,
    complete: bool,
    previous_first: Option<String>,
    /// The passes over the table.
    passes: ReadPasses,
    /// Profile ids met in this pass.
    seen_this_pass: HashSet<String>,
    /// Profile ids yielded by any pass.
    yielded: HashSet<String>,
    /// This pass met a profile twice.
    moved: bool,
    /// This pass (past the first) yielded a profile no earlier pass had.
    found_new: bool,
    /// `totalCount` on this pass's first page and on its latest page.
    totals: (Option<u64>, Option<u64>),
    /// The highest `profileId` when the pass began (read from the last page first),
    /// for a table over one page with numeric ids.
    newest_at_start: Option<u64>,
    /// This pass met a profile created after it began.
    created: bool,
}

impl ProfileStream {
    /// Whether the pass just ended can be trusted to have skipped nobody.
    fn trusted(&self) -> bool {
        if self.moved || self.created {
            return false;
        }
        let one_page = self.next_page <= 1;
        match self.totals {
            (Some(first), Some(last)) if one_page || self.newest_at_start.is_some() => {
                first == last
            }
            // No count, or no way to tell a creation: a second pass must find nothing
            // new.
            _ => self.passes.current() > 1 && !self.found_new,
        }
    }

    /// Before a pass: the count, and the newest profile of a table over one page.
    async fn anchor(&mut self) -> Result<(), ConnectorError> {
        self.newest_at_start = None;
        self.created = false;
        let (_, _, total) = self.client.profiles_page(0, 1).await?;
        self.totals = (total, total);
        let Some(total) = total else {
            return Ok(());
        };
        let last = total.saturating_sub(1) / self.page_size as u64;
        if last == 0 {
            return Ok(());
        }
        let (_, profiles, _) = self.client.profiles_page(last, self.page_size).await?;
        self.newest_at_start = profiles
            .iter()
            .map(numeric_id)
            .collect::<Option<Vec<u64>>>()
            .and_then(|ids| ids.into_iter().max());
        Ok(())
    }

    async fn fetch(&mut self) -> Result<(), ConnectorError> {
        let page = self.next_page;
        if page == 0 {
            self.anchor().await?;
        }
        let (call, profiles, total) = self.client.profiles_page(page, self.page_size).await?;
        if page == 0 && self.totals.0.is_none() {
            self.totals = (total, total);
        } else {
            self.totals.1 = total;
        }
        self.call = call;
        self.next_page += 1;
        let first = profiles
            .first()
            .and_then(|p| p.get("profileId").or_else(|| p.get("id")))
            .map(id_text);
        if page > 0 && first.is_some() && first == self.previous_first {
            tracing::warn!(
                "Actito answered page {page} with the same profiles as the page before: the server ignores `page`; the read is incomplete"
            );
            self.finished = true;
            self.complete = false;
            return Ok(());
        }
        self.previous_first = first;
        if profiles.len() < self.page_size {
            self.finished = true;
        }
        self.buffer = profiles
            .into_iter()
            .enumerate()
            .map(|(i, p)| (i as u64 + 1, p))
            .collect();
        Ok(())
    }
}

#[async_trait]
impl RecordStream for ProfileStream {
    async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
        loop {
            if let Some((index, profile)) = self.buffer.pop_front() {
                if let Some(id) = profile
                    .get("profileId")
                    .or_else(|| profile.get("id"))
                    .map(id_text)
                {
                    if !self.seen_this_pass.insert(id.clone()) {
                        self.moved = true;
                    }
                    if let (Some(newest), Some(n)) = (self.newest_at_start, numeric_id(&profile)) {
                        if n > newest {
                            self.created = true;
                        }
                    }
                    if !self.yielded.insert(id) {
                        continue;
                    }
                    if self.passes.current() > 1 {
                        self.found_new = true;
                    }
                }
                let origin = Origin::Page {
                    call: self.call.clone(),
                    page: self.next_page,
                    index,
                };
                return Ok(Some(match self.schema.contact_from(&profile) {
                    Ok((_, contact)) => {
                        SourceItem::Record(Box::new(SourceRecord::new(contact, origin)))
                    }
                    Err(reason) => SourceItem::Rejected(Box::new(
                        RecordError::new(origin, reason).with_raw(profile.to_string()),
                    )),
                }));
            }
            if self.finished {
                if !self.complete || self.trusted() {
                    return Ok(None);
                }
                if !self.passes.another("Actito profiles") {
                    return Ok(None);
                }
                self.seen_this_pass.clear();
                self.moved = false;
                self.found_new = false;
                self.next_page = 0;
                self.previous_first = None;
                self.finished = false;
            }
            self.fetch().await?;
        }
    }

    async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
        Ok(ReadOutcome {
            complete: self.complete && self.passes.complete(),
            cursor: None,
        })
    }
}

/// A profile's `profileId` as a number, when it is one.
fn numeric_id(profile: &Value) -> Option<u64> {
    profile
        .get("profileId")
        .or_else(|| profile.get("id"))
        .map(id_text)
        .and_then(|id| id.trim().parse().ok())
}
