//! Reading every person, page by page, one page in memory at a time.

use std::collections::VecDeque;

use contactsync_core::async_trait;
use contactsync_core::{
    ConnectorError, Contact, Origin, ReadMode, ReadOutcome, RecordStream, Source,
    SourceItem, SourceRecord,
};

use crate::client::__Name__Client;
use crate::config::SourceConfig;

/// The __Name__ source. Built by the `__name__` [`contactsync_core::SourceFactory`].
#[derive(Debug)]
pub struct __Name__Source {
    client: __Name__Client,
    page_size: usize,
}

impl __Name__Source {
    /// A source for `config`. Touches no network.
    pub fn new(config: SourceConfig) -> Result<Self, ConnectorError> {
        Ok(__Name__Source {
            client: __Name__Client::new(&config.connection)?,
            page_size: config.page_size,
        })
    }
}

#[async_trait]
impl Source for __Name__Source {
    async fn check(&self) -> Result<(), ConnectorError> {
        self.client.page(1, 1).await.map(|_| ())
    }

    async fn read(&self, _mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
        Ok(Box::new(People {
            client: self.client.clone(),
            page_size: self.page_size,
            page: 0,
            call: String::new(),
            buffer: VecDeque::new(),
            finished: false,
        }))
    }
}

/// A read in progress: the current page, and which page comes next.
struct People {
    client: __Name__Client,
    page_size: usize,
    page: u64,
    call: String,
    buffer: VecDeque<(u64, Contact)>,
    finished: bool,
}

#[async_trait]
impl RecordStream for People {
    async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
        loop {
            if let Some((index, contact)) = self.buffer.pop_front() {
                let origin = Origin::Page {
                    call: self.call.clone(),
                    page: self.page,
                    index,
                };
                return Ok(Some(SourceItem::Record(Box::new(SourceRecord::new(contact, origin)))));
            }
            if self.finished {
                return Ok(None);
            }
            self.page += 1;
            let (call, people) = self.client.page(self.page, self.page_size).await?;
            // A short page is the last one.
            self.finished = people.len() < self.page_size;
            self.call = call;
            self.buffer = (1..).zip(people).collect();
        }
    }

    async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
        Ok(ReadOutcome {
            complete: true,
            cursor: None,
        })
    }
}
