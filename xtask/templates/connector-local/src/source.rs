//! Reading every person, one file at a time.

use std::path::PathBuf;

use contactsync_core::async_trait;
use contactsync_core::{
    ConnectorError, Origin, ReadMode, ReadOutcome, RecordError, RecordStream, Source,
    SourceItem, SourceRecord,
};

use crate::config::SourceConfig;
use crate::folder::Folder;

/// The __Name__ source.
#[derive(Debug)]
pub struct __Name__Source {
    folder: Folder,
}

impl __Name__Source {
    /// A source for `config`. Touches nothing.
    pub fn new(config: SourceConfig) -> Self {
        __Name__Source {
            folder: Folder::new(config.dir),
        }
    }
}

#[async_trait]
impl Source for __Name__Source {
    async fn check(&self) -> Result<(), ConnectorError> {
        self.folder.check().await
    }

    async fn read(&self, _mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
        let files = self.folder.files().await?;
        Ok(Box::new(People {
            folder: self.folder.clone(),
            files: files.into_iter(),
        }))
    }
}

/// A read in progress: the files still to read.
struct People {
    folder: Folder,
    files: std::vec::IntoIter<PathBuf>,
}

#[async_trait]
impl RecordStream for People {
    async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
        let Some(file) = self.files.next() else {
            return Ok(None);
        };
        let origin = Origin::line(file.display().to_string(), 1);
        Ok(Some(match self.folder.read(&file).await? {
            Ok(contact) => SourceItem::Record(Box::new(SourceRecord::new(contact, origin))),
            // Reported and written to the rejects file; with no key known, the
            // engine removes nobody after this read.
            Err((raw, reason)) => {
                SourceItem::Rejected(Box::new(RecordError::new(origin, reason).with_raw(raw)))
            }
        }))
    }

    async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
        // Every file listed was read: the read is complete.
        Ok(ReadOutcome {
            complete: true,
            cursor: None,
        })
    }
}
