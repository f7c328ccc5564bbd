//! One read's rows turned into records, whichever server they come from: each column's
//! value (already text in the documented format, see [`crate::values`]) set on its
//! field, a value that cannot be read a reject naming its column, the row's position in
//! the result its origin (`query:N`), and the greatest cursor value seen kept for the
//! next incremental read.

use contactsync_core::{Contact, Origin, ReadOutcome, RecordError, SourceItem, SourceRecord};
use tokio::sync::mpsc;

use crate::values::{later, Column, Kind};

/// The query a read runs.
#[derive(Debug, Clone)]
pub struct Query {
    /// `query` or `incremental_query`: what errors and origins name.
    pub name: &'static str,
    /// Its text as the user wrote it (`:since` not yet bound).
    pub text: String,
    /// The cursor the read starts from, already moved back by `overlap`.
    pub since: Option<String>,
}

/// A read in progress: the result's columns, the rows sent so far, the newest cursor.
pub struct Reading {
    name: &'static str,
    cursor_column: Option<String>,
    columns: Vec<Column>,
    cursor_at: Option<usize>,
    position: u64,
    newest: Option<String>,
    sender: mpsc::Sender<SourceItem>,
    stopped: bool,
}

impl Reading {
    /// A read of `query` whose cursor is `cursor_column`, sending to `sender`.
    pub fn new(
        query: &Query,
        cursor_column: Option<String>,
        sender: mpsc::Sender<SourceItem>,
    ) -> Reading {
        Reading {
            name: query.name,
            cursor_column,
            columns: Vec::new(),
            cursor_at: None,
            position: 0,
            newest: None,
            sender,
            stopped: false,
        }
    }

    /// The result's columns, once the server has described them.
    pub fn start(&mut self, columns: Vec<Column>) {
        self.cursor_at = self.cursor_column.as_ref().and_then(|c| {
            columns
                .iter()
                .position(|col| col.name.eq_ignore_ascii_case(c))
        });
        self.columns = columns;
    }

    /// The result's columns.
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// How the cursor column's values read, when the result has it.
    pub fn cursor_kind(&self) -> Option<Kind> {
        self.cursor_at.map(|i| self.columns[i].kind)
    }

    /// Sends one row: each column's value in the documented format (`None`: NULL,
    /// `Err`: why it cannot be read). False when the reader stopped listening.
    pub async fn send(
        &mut self,
        values: impl IntoIterator<Item = Option<Result<String, String>>>,
    ) -> bool {
        self.position += 1;
        let origin = Origin::line(self.name, self.position);
        let mut contact = Contact::default();
        let mut fault: Option<(String, String)> = None;
        for (i, (column, value)) in self.columns.iter().zip(values).enumerate() {
            let value = match value {
                None => continue,
                Some(Ok(v)) => v,
                Some(Err(reason)) => {
                    // An ignored column's value does not matter, whatever its type.
                    if column.field.is_some() {
                        fault.get_or_insert((column.name.clone(), reason));
                    }
                    continue;
                }
            };
            if Some(i) == self.cursor_at
                && self
                    .newest
                    .as_deref()
                    .is_none_or(|n| later(column.kind, &value, n))
            {
                self.newest = Some(value.clone());
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
            None => SourceItem::Record(Box::new(SourceRecord::new(contact, origin))),
            Some((column, reason)) => {
                let mut error = RecordError::new(origin, reason);
                error.field = Some(column);
                error.partial = Some(Box::new(contact));
                SourceItem::Rejected(Box::new(error))
            }
        };
        if self.sender.send(item).await.is_err() {
            self.stopped = true;
        }
        !self.stopped
    }

    /// What the read found, once the result has run to its end. `cursor` is the one the
    /// read started from (before `overlap`), `None` for a full read.
    pub fn outcome(self, cursor: Option<&str>) -> ReadOutcome {
        if self.stopped {
            // The reader went away: nothing this read saw counts.
            return ReadOutcome::default();
        }
        let kind = self.cursor_kind();
        ReadOutcome {
            // Only a full read that ran to its end sees everyone.
            complete: cursor.is_none(),
            // The greatest value read, never behind the cursor this read started from
            // (the overlap re-reads rows from before it).
            cursor: match (self.newest, cursor, kind) {
                (Some(n), Some(c), Some(kind)) if !later(kind, &n, c) => Some(c.to_string()),
                (Some(n), _, _) => Some(n),
                (None, c, _) => c.map(str::to_string),
            },
        }
    }
}
