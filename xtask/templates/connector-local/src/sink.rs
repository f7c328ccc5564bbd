//! Writing changes: one file per change, in order, one outcome each.

use contactsync_core::async_trait;
use contactsync_core::{
    Change, ChangeBatch, ConnectorError, Outcome, RemovalStyle, Sink, SinkCapabilities,
    SinkContext,
};

use crate::config::SinkConfig;
use crate::folder::Folder;

/// The __Name__ sink.
#[derive(Debug)]
pub struct __Name__Sink {
    folder: Folder,
}

impl __Name__Sink {
    /// A sink for `config`. Touches nothing.
    pub fn new(config: SinkConfig) -> Self {
        __Name__Sink {
            folder: Folder::new(config.dir),
        }
    }
}

#[async_trait]
impl Sink for __Name__Sink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities {
            max_batch: 1000,
            asynchronous_jobs: false,
            durable_at_finish: false,
            removal: RemovalStyle::Delete,
            addresses_by_email: false,
            mixes_removals: false,
        }
    }

    async fn check(&mut self) -> Result<(), ConnectorError> {
        self.folder.check().await
    }

    async fn apply(
        &mut self,
        batch: &ChangeBatch,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Vec<Outcome>, ConnectorError> {
        let mut outcomes = Vec::with_capacity(batch.changes.len());
        for change in &batch.changes {
            if ctx.cancel.is_cancelled() {
                // Not written: the engine sends it again next run.
                outcomes.push(Outcome::Unknown {
                    reason: "the run was cancelled before this change was written".into(),
                });
                continue;
            }
            let written = match change {
                Change::Create { key, contact, .. } | Change::Update { key, contact, .. } => {
                    self.folder.write(key, contact).await
                }
                Change::Remove { key, .. } => self.folder.remove(key).await,
            };
            outcomes.push(match written {
                Ok(()) => Outcome::Applied { handle: None },
                // Whether a failed write left the file is not known: sent again.
                Err(e) => Outcome::Unknown {
                    reason: e.to_string(),
                },
            });
        }
        Ok(outcomes)
    }
}
