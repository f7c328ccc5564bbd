//! Writing changes: one call per change, in order, one outcome each.

use contactsync_core::async_trait;
use contactsync_core::{
    Change, ChangeBatch, ConnectorError, Outcome, RemovalStyle, Sink, SinkCapabilities,
    SinkContext,
};

use crate::client::{Written, __Name__Client};
use crate::config::SinkConfig;

/// The __Name__ sink. Built by the `__name__` [`contactsync_core::SinkFactory`].
#[derive(Debug)]
pub struct __Name__Sink {
    client: __Name__Client,
}

impl __Name__Sink {
    /// A sink for `config`. Touches no network.
    pub fn new(config: SinkConfig) -> Result<Self, ConnectorError> {
        Ok(__Name__Sink {
            client: __Name__Client::new(&config.connection)?,
        })
    }
}

fn outcome(written: Written) -> Outcome {
    match written {
        Written::Done => Outcome::Applied { handle: None },
        Written::Refused(reason) => Outcome::Rejected {
            reason,
            field: None,
            retry: false,
        },
    }
}

#[async_trait]
impl Sink for __Name__Sink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities {
            max_batch: 100,
            asynchronous_jobs: false,
            durable_at_finish: false,
            removal: RemovalStyle::Delete,
            addresses_by_email: false,
            mixes_removals: false,
        }
    }

    async fn check(&mut self) -> Result<(), ConnectorError> {
        self.client.page(1, 1).await.map(|_| ())
    }

    async fn apply(
        &mut self,
        batch: &ChangeBatch,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Vec<Outcome>, ConnectorError> {
        let mut outcomes = Vec::with_capacity(batch.changes.len());
        for change in &batch.changes {
            if ctx.cancel.is_cancelled() {
                // Not sent: the engine sends it again next run.
                outcomes.push(Outcome::Unknown {
                    reason: "the run was cancelled before this change was sent".into(),
                });
                continue;
            }
            let written = match change {
                Change::Create { key, contact, .. } | Change::Update { key, contact, .. } => {
                    self.client.put(key, contact).await?
                }
                Change::Remove { key, .. } => self.client.delete(key).await?,
            };
            outcomes.push(outcome(written));
        }
        Ok(outcomes)
    }
}
