//! Reading every profile of an Actito table, page by page.
//!
//! The spec names `GET …/table/{t}/profile?search=…&number=N` for listings, and is
//! silent on paging. This source sends no `search` (every profile), `number` = the
//! page size (`page_size`, at most 1000) and `page` = the page index from 0, and stops
//! at the first page shorter than `number`. A server that ignored `page` would send the
//! same page again: the read then stops and says it is *not* complete (so no removal is
//! inferred from it), rather than looping. Memory holds one page at a time.

use std::collections::VecDeque;
use std::sync::Arc;

use contactsync_core::async_trait;
use contactsync_core::{
    ConnectorError, Origin, ReadMode, ReadOutcome, RecordError, RecordStream, Source,
    SourceCapabilities, SourceItem, SourceRecord,
};
use serde_json::Value;

use crate::client::{id_text, ActitoClient};
use crate::config::SourceConfig;
use crate::schema::{load_schema, Schema};

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
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities::default()
    }

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
}

impl ProfileStream {
    async fn fetch(&mut self) -> Result<(), ConnectorError> {
        let page = self.next_page;
        let (call, profiles) = self.client.profiles_page(page, self.page_size).await?;
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
                let origin = Origin::Page {
                    call: self.call.clone(),
                    page: self.next_page,
                    index,
                };
                return Ok(Some(match self.schema.contact_from(&profile) {
                    Ok((_, contact)) => SourceItem::Record(SourceRecord::new(contact, origin)),
                    Err(reason) => SourceItem::Rejected(
                        RecordError::new(origin, reason).with_raw(profile.to_string()),
                    ),
                }));
            }
            if self.finished {
                return Ok(None);
            }
            self.fetch().await?;
        }
    }

    async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
        Ok(ReadOutcome {
            complete: self.complete,
            cursor: None,
        })
    }
}
