//! The SQL source: a full read runs `query`, an incremental one `incremental_query`
//! with `:since` bound to the cursor less `overlap`; each in a read-only transaction
//! that sees one snapshot, streamed (a PostgreSQL portal, a MySQL result read row by
//! row) by a task of its own that hands records over a bounded channel.

use contactsync_core::{
    async_trait, CheckFindings, ConnectorError, ReadMode, ReadOutcome, RecordStream, Source,
    SourceCapabilities, SourceItem,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{Dialect, SqlConfig};
use crate::reading::{Query, Reading};
use crate::values::{utc_text, Column};
use crate::{mysql, postgres};

/// The SQL source. Built by the `sql` [`contactsync_core::SourceFactory`].
#[derive(Debug)]
pub struct SqlSource {
    config: SqlConfig,
    described: CheckFindings,
}

impl SqlSource {
    /// A source for `config`. Touches no network.
    pub fn new(config: SqlConfig) -> Result<Self, ConnectorError> {
        Ok(SqlSource {
            config,
            described: CheckFindings::default(),
        })
    }
}

/// Records a read hands over at a time, at most.
const CHANNEL: usize = 1024;

#[async_trait]
impl Source for SqlSource {
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities {
            incremental: self.config.incremental_query.is_some(),
            reports_deletions: false,
            // Incremental reads cannot see deleted rows: a full read a week.
            full_every: self.config.incremental_query.as_ref().map(|_| 7),
            skips_unchanged: false,
        }
    }

    async fn check(&self) -> Result<(), ConnectorError> {
        let mut queries = vec![("query", self.config.query.as_str())];
        if let Some(q) = &self.config.incremental_query {
            queries.push(("incremental_query", q.as_str()));
        }
        let described = match self.config.dialect {
            Dialect::Postgres => postgres::describe_all(&self.config, &queries).await?,
            Dialect::MySql => mysql::describe_all(&self.config, &queries).await?,
        };
        let mut said = Vec::new();
        for ((name, _), columns) in queries.iter().zip(&described) {
            let (mapped, ignored): (Vec<&Column>, Vec<&Column>) =
                columns.iter().partition(|c| c.field.is_some());
            let list = |cs: &[&Column]| {
                cs.iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            said.push(format!(
                "{name} maps {}{}",
                if mapped.is_empty() {
                    "nothing".into()
                } else {
                    list(&mapped)
                },
                if ignored.is_empty() {
                    String::new()
                } else {
                    format!(", ignores {}", list(&ignored))
                }
            ));
            if let Some(cursor) = &self.config.cursor_column {
                if *name == "incremental_query"
                    && !columns.iter().any(|c| c.name.eq_ignore_ascii_case(cursor))
                {
                    return Err(ConnectorError::Other(format!(
                        "`incremental_query` has no column {cursor} (`cursor_column`)"
                    )));
                }
            }
        }
        self.described.set(said.join("; "));
        Ok(())
    }

    fn described(&self) -> Option<String> {
        self.described.get()
    }

    async fn read(&self, mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
        let incremental = match (&mode, &self.config.incremental_query) {
            (ReadMode::Incremental { cursor: Some(c) }, Some(q)) => Some((q.clone(), c.clone())),
            _ => None,
        };
        let (sender, receiver) = mpsc::channel(CHANNEL);
        let config = self.config.clone();
        let task = tokio::spawn(run_query(config, incremental, sender));
        Ok(Box::new(Rows { receiver, task }))
    }
}

/// A read in progress: records as the task sends them.
struct Rows {
    receiver: mpsc::Receiver<SourceItem>,
    task: JoinHandle<Result<ReadOutcome, ConnectorError>>,
}

#[async_trait]
impl RecordStream for Rows {
    async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
        match self.receiver.recv().await {
            Some(item) => Ok(Some(item)),
            // The task ended: an error is the read's; a success is the end.
            None => match (&mut self.task).await {
                Ok(Err(e)) => Err(e),
                Ok(Ok(outcome)) => {
                    self.task = tokio::spawn(async move { Ok(outcome) });
                    Ok(None)
                }
                Err(e) => Err(ConnectorError::Other(format!(
                    "the database read stopped: {e}"
                ))),
            },
        }
    }

    async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
        self.task
            .await
            .map_err(|e| ConnectorError::Other(format!("the database read stopped: {e}")))?
    }
}

/// Runs one read to its end, sending each row; the outcome says whether it was complete
/// and where the next incremental read starts.
async fn run_query(
    config: SqlConfig,
    incremental: Option<(String, String)>,
    sender: mpsc::Sender<SourceItem>,
) -> Result<ReadOutcome, ConnectorError> {
    let (query, cursor) = match incremental {
        Some((text, cursor)) => (
            Query {
                name: "incremental_query",
                text,
                since: Some(earlier(&cursor, config.overlap)),
            },
            Some(cursor),
        ),
        None => (
            Query {
                name: "query",
                text: config.query.clone(),
                since: None,
            },
            None,
        ),
    };
    let mut reading = Reading::new(&query, config.cursor_column.clone(), sender);
    match config.dialect {
        Dialect::Postgres => postgres::read(&config, &query, &mut reading).await?,
        Dialect::MySql => mysql::read(&config, &query, &mut reading).await?,
    }
    Ok(reading.outcome(cursor.as_deref()))
}

/// `since` moved back by `overlap` when it is a timestamp (rows whose transaction
/// committed late carry an earlier time); other cursors as they are.
fn earlier(since: &str, overlap: std::time::Duration) -> String {
    match (
        chrono::DateTime::parse_from_rfc3339(since),
        chrono::Duration::from_std(overlap),
    ) {
        (Ok(t), Ok(d)) if !overlap.is_zero() => t
            .checked_sub_signed(d)
            .map_or(since.to_string(), |t| utc_text(t.to_utc())),
        _ => since.to_string(),
    }
}
