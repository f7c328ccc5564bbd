//! The SQL source: a full read runs `query`, an incremental one `incremental_query`
//! with `:since` bound to the cursor less `overlap`; each in a read-only transaction
//! that sees one snapshot, streamed from a server-side portal by a task of its own that
//! hands records over a bounded channel.

use contactsync_core::{
    async_trait, CheckFindings, ConnectorError, Contact, Origin, ReadMode, ReadOutcome,
    RecordError, RecordStream, Source, SourceCapabilities, SourceItem, SourceRecord,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::SqlConfig;
use crate::postgres::{self, as_text, describe, query_error, since_param};
use crate::query::bind_since;
use crate::values::{later, Column};

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
        }
    }

    async fn check(&self) -> Result<(), ConnectorError> {
        let connection = postgres::connect(&self.config).await?;
        let mut said = Vec::new();
        let queries = std::iter::once(("query", &self.config.query)).chain(
            self.config
                .incremental_query
                .as_ref()
                .map(|q| ("incremental_query", q)),
        );
        for (name, text) in queries {
            let (columns, _) =
                describe(&connection.client, &bind_since(text, "$1").0, name).await?;
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
                if name == "incremental_query"
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
    let (name, text, since) = match &incremental {
        Some((q, cursor)) => ("incremental_query", q.as_str(), Some(cursor.as_str())),
        None => ("query", config.query.as_str(), None),
    };
    let mut connection = postgres::connect(&config).await?;
    // One snapshot, and no write whatever the query tries: the server refuses it.
    let client = connection
        .client
        .build_transaction()
        .read_only(true)
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .map_err(|e| query_error(name, &e))?;
    client
        .batch_execute("SET LOCAL TIME ZONE 'UTC'; SET LOCAL DateStyle = 'ISO'")
        .await
        .map_err(|e| query_error(name, &e))?;
    let (text, _) = bind_since(text, "$1");
    let (columns, params) = describe(&client, &text, name).await?;
    let cursor_at = config.cursor_column.as_ref().and_then(|c| {
        columns
            .iter()
            .position(|col| col.name.eq_ignore_ascii_case(c))
    });
    let mut bound: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = Vec::new();
    if let (Some(since), Some(param)) = (since, params.first()) {
        let since = earlier(since, config.overlap);
        bound.push(
            since_param(param, &since)
                .map_err(|e| ConnectorError::Other(format!("`{name}`: {e}")))?,
        );
    }
    let statement = client
        .prepare(&as_text(&text, &columns))
        .await
        .map_err(|e| query_error(name, &e))?;
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = bound
        .iter()
        .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let portal = client
        .bind(&statement, &params)
        .await
        .map_err(|e| query_error(name, &e))?;
    let mut position = 0u64;
    let mut newest: Option<String> = None;
    loop {
        let rows = client
            .query_portal(&portal, config.fetch_size as i32)
            .await
            .map_err(|e| query_error(name, &e))?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            position += 1;
            let origin = Origin::line(name, position);
            let mut contact = Contact::default();
            let mut fault: Option<(String, String)> = None;
            for (i, column) in columns.iter().enumerate() {
                let raw: Option<&str> = row.try_get(i).map_err(|e| query_error(name, &e))?;
                let Some(raw) = raw else { continue };
                let value = match column.text(raw) {
                    Ok(v) => v,
                    Err(reason) => {
                        if column.field.is_some() {
                            fault.get_or_insert((column.name.clone(), reason));
                        }
                        continue;
                    }
                };
                if Some(i) == cursor_at
                    && newest
                        .as_deref()
                        .is_none_or(|n| later(column.kind, &value, n))
                {
                    newest = Some(value.clone());
                }
                if let Some(field) = &column.field {
                    if let Err(reason) = contact.set(field, &value) {
                        fault.get_or_insert((
                            column.name.clone(),
                            format!("column {}: {reason}", column.name),
                        ));
                    }
                }
            }
            let item = match fault {
                None => SourceItem::Record(SourceRecord::new(contact, origin)),
                Some((column, reason)) => {
                    let mut error = RecordError::new(origin, reason);
                    error.field = Some(column);
                    error.partial = Some(Box::new(contact));
                    SourceItem::Rejected(error)
                }
            };
            if sender.send(item).await.is_err() {
                // The reader stopped listening: nothing more to do.
                return Ok(ReadOutcome::default());
            }
        }
    }
    let _ = client.commit().await;
    Ok(ReadOutcome {
        // Only a full read that ran to its end sees everyone.
        complete: incremental.is_none(),
        // The greatest value read, never behind the cursor this read started from
        // (the overlap re-reads rows from before it).
        cursor: match (newest, since, cursor_at.map(|i| columns[i].kind)) {
            (Some(n), Some(s), Some(kind)) if !later(kind, &n, s) => Some(s.to_string()),
            (Some(n), _, _) => Some(n),
            (None, s, _) => s.map(str::to_string),
        },
    })
}

/// `since` moved back by `overlap` when it is a timestamp (rows whose transaction
/// committed late carry an earlier time); other cursors as they are.
fn earlier(since: &str, overlap: std::time::Duration) -> String {
    match (
        chrono::DateTime::parse_from_rfc3339(since),
        chrono::Duration::from_std(overlap),
    ) {
        (Ok(t), Ok(d)) if !overlap.is_zero() => {
            t.checked_sub_signed(d).map_or(since.to_string(), |t| {
                t.to_utc()
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
            })
        }
        _ => since.to_string(),
    }
}
