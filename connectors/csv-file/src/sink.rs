//! Writing the synced population as a CSV file.
//!
//! The sink receives only changes, so the file is rebuilt at [`Sink::finish`]: the
//! existing file is streamed row by row into a temporary file in the same directory
//! (updated rows replaced, removed rows dropped or marked, other rows copied as they
//! were), creates are appended, and the temporary file is fsynced and renamed over the
//! old one. A crash leaves either the old file or the new one, never half of one; and
//! since nothing is durable before `finish`, the sink says `durable_at_finish`.
//!
//! Memory: creates are spooled to an anonymous temporary file as JSON lines; only
//! updated contacts, and one small entry per key touched, stay in memory.
//!
//! Columns: an existing file keeps its header, columns and order (columns the sink does
//! not map keep their values). Columns are appended for fields the run needs that the
//! header lacks: the configured `fields` (or, by default, every canonical field and the
//! attributes seen in this run's changes, sorted), and `status` when removal is `mark`.
//! A new file gets exactly those columns.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use contactsync_core::{
    async_trait, Change, ChangeBatch, ConnectorError, Contact, ContactKey, ContactStatus, Field,
    KeyRule, Outcome, RemovalStyle, Sink, SinkCapabilities, SinkContext,
};
use serde::{Deserialize, Serialize};

use crate::config::{ExtraColumns, RemovalMode, SinkConfig};
use crate::source::{csv_error, open_csv};

/// A CSV file kept equal to the synced population.
pub struct CsvSink {
    config: SinkConfig,
    run: Option<PendingRun>,
}

/// What the current run has applied, waiting for `finish`.
struct PendingRun {
    /// The latest change per key.
    latest: HashMap<ContactKey, Latest>,
    /// Created contacts, one JSON [`SpooledCreate`] per line.
    spool: BufWriter<File>,
    /// Lines written to `spool`.
    spooled: u64,
    /// Attribute names of the contacts created or updated, for new columns.
    attributes: BTreeSet<String>,
}

/// The latest change to a key in this run.
#[derive(Debug)]
enum Latest {
    /// Created: the contact is line `.0` of the spool.
    Created(u64),
    /// Updated to this contact.
    Updated(Box<Contact>),
    /// The updated row was written; later rows with the same key are duplicates.
    Written,
    /// Removed.
    Removed,
}

/// One line of the create spool.
#[derive(Serialize, Deserialize)]
struct SpooledCreate {
    key: ContactKey,
    contact: Contact,
}

impl CsvSink {
    /// A sink writing the file `config` names.
    pub fn new(config: SinkConfig) -> Self {
        CsvSink { config, run: None }
    }

    fn directory(&self) -> PathBuf {
        match self.config.format.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// The run in progress, started on first use (`apply` without `begin` is allowed).
    fn run(&mut self) -> Result<&mut PendingRun, ConnectorError> {
        if self.run.is_none() {
            let dir = self.directory();
            let spool = tempfile::tempfile_in(&dir).map_err(|e| ConnectorError::io(&dir, e))?;
            self.run = Some(PendingRun {
                latest: HashMap::new(),
                spool: BufWriter::new(spool),
                spooled: 0,
                attributes: BTreeSet::new(),
            });
        }
        self.run
            .as_mut()
            .ok_or_else(|| ConnectorError::Other("CSV sink run state missing".into()))
    }

    /// Why `contact` cannot be written so that it reads back the same, if it cannot.
    fn refusal(&self, contact: &Contact) -> Option<Outcome> {
        if contact.key(KeyRule::Auto).is_none() {
            return Some(Outcome::Rejected {
                reason: "a row needs an email or an external id to be found again".into(),
                field: Some(Field::Email.name().to_string()),
                retry: false,
            });
        }
        // An attribute whose name reads back as something else (`email`, ` x`,
        // `attributes.x`) would change on the next read.
        contact
            .attributes
            .keys()
            .find(|name| Field::parse(name) != Field::Attribute((*name).clone()))
            .map(|name| Outcome::Rejected {
                reason: format!(
                    "attribute name {name:?} cannot be a CSV column: it reads back as {}",
                    Field::parse(name)
                ),
                field: Some(format!("attributes.{name}")),
                retry: false,
            })
    }

    /// The merge: existing file + changes → temporary file → renamed over the file.
    fn write_file(&self, mut run: PendingRun) -> Result<(), ConnectorError> {
        let format = &self.config.format;
        let path = &format.path;
        let spool_error = |e: std::io::Error| ConnectorError::Other(format!("CSV sink spool: {e}"));
        let mut spool = run
            .spool
            .into_inner()
            .map_err(|e| spool_error(e.into_error()))?;
        spool.rewind().map_err(spool_error)?;

        let existing = open_csv(format)?;
        let (mut reader, old_headers) = match existing {
            Some((reader, headers)) => (Some(reader), headers.unwrap_or_default()),
            None => (None, Vec::new()),
        };
        let mut columns = format
            .columns
            .resolve(old_headers.iter().map(String::as_str))
            .fields;
        let mut headers = old_headers.clone();
        for field in self.wanted_fields(&run.attributes) {
            if !columns.contains(&Some(field.clone())) {
                headers.push(format.columns.header_for(&field));
                columns.push(Some(field));
            }
        }
        let position = |wanted: &Field| columns.iter().position(|f| f.as_ref() == Some(wanted));
        let (id_column, email_column, status_column) = (
            position(&Field::ExternalId),
            position(&Field::Email),
            position(&Field::Status),
        );

        let dir = self.directory();
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{file_name}."))
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(|e| ConnectorError::io(&dir, e))?;
        let write_error = |e: csv::Error| csv_error(temp.path(), e);
        let mut writer = csv::WriterBuilder::new()
            .delimiter(format.delimiter)
            .quote(format.quote)
            .flexible(true)
            .from_writer(BufWriter::with_capacity(256 * 1024, temp.as_file()));
        writer.write_record(&headers).map_err(write_error)?;

        let mut row = csv::ByteRecord::new();
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(columns.len());
        let (mut kept, mut replaced, mut removed) = (0u64, 0u64, 0u64);
        if let Some(reader) = reader.as_mut() {
            while reader
                .read_byte_record(&mut row)
                .map_err(|e| csv_error(path, e))?
            {
                let key = row_key(&row, id_column, email_column);
                let matched = key.and_then(|(by_id, by_email)| {
                    [by_id, by_email]
                        .into_iter()
                        .flatten()
                        .find(|k| run.latest.contains_key(k))
                });
                let entry = matched.and_then(|k| run.latest.get_mut(&k));
                // Rows of the old header's width get blanks for the new columns; a
                // malformed row is copied as it was.
                let width = if row.len() == old_headers.len() {
                    columns.len()
                } else {
                    row.len()
                };
                out.clear();
                out.extend(row.iter().map(<[u8]>::to_vec));
                out.resize(width, Vec::new());
                match entry {
                    None => kept += 1,
                    Some(Latest::Created(_)) | Some(Latest::Written) => {
                        // Replaced by the spooled create, or a duplicate of a row written.
                        replaced += 1;
                        continue;
                    }
                    Some(latest @ Latest::Updated(_)) => {
                        if let Latest::Updated(contact) = std::mem::replace(latest, Latest::Written)
                        {
                            render(&mut out, &columns, &contact);
                        }
                        replaced += 1;
                    }
                    Some(Latest::Removed) => {
                        removed += 1;
                        match (self.config.removal, status_column) {
                            (RemovalMode::Mark, Some(status)) if status < out.len() => {
                                out[status] = ContactStatus::Inactive.as_str().as_bytes().to_vec();
                            }
                            _ => continue,
                        }
                    }
                }
                writer.write_record(&out).map_err(write_error)?;
            }
        }

        // Updates of people not in the file: an update is an upsert too.
        let mut appended = 0u64;
        for latest in run.latest.values_mut() {
            if !matches!(latest, Latest::Updated(_)) {
                continue;
            }
            if let Latest::Updated(contact) = std::mem::replace(latest, Latest::Written) {
                out.clear();
                out.resize(columns.len(), Vec::new());
                render(&mut out, &columns, &contact);
                writer.write_record(&out).map_err(write_error)?;
                appended += 1;
            }
        }
        for (line_number, line) in (0u64..).zip(BufReader::new(&mut spool).lines()) {
            let line = line.map_err(spool_error)?;
            let create: SpooledCreate = serde_json::from_str(&line)
                .map_err(|e| ConnectorError::Other(format!("CSV sink spool: {e}")))?;
            // Only the latest change of a key counts: a later update or removal, or a
            // second create, supersedes this one.
            if !matches!(run.latest.get(&create.key), Some(Latest::Created(n)) if *n == line_number)
            {
                continue;
            }
            out.clear();
            out.resize(columns.len(), Vec::new());
            render(&mut out, &columns, &create.contact);
            writer.write_record(&out).map_err(write_error)?;
            appended += 1;
        }

        let mut buffered = writer
            .into_inner()
            .map_err(|e| ConnectorError::io(temp.path(), e.into_error()))?;
        buffered
            .flush()
            .map_err(|e| ConnectorError::io(temp.path(), e))?;
        drop(buffered);
        temp.as_file()
            .sync_all()
            .map_err(|e| ConnectorError::io(temp.path(), e))?;
        temp.persist(path)
            .map_err(|e| ConnectorError::io(path, e.error))?;
        sync_directory(&dir);
        tracing::info!(
            file = %path.display(), kept, replaced, removed, appended,
            "CSV file written"
        );
        Ok(())
    }

    /// The fields the file must have columns for in this run.
    fn wanted_fields(&self, attributes: &BTreeSet<String>) -> Vec<Field> {
        let mut fields: Vec<Field> = match &self.config.fields {
            Some(fields) => fields.clone(),
            None => {
                let mut all = Field::CANONICAL.to_vec();
                if self.config.format.columns.extra_columns == ExtraColumns::Attributes {
                    all.extend(attributes.iter().map(|a| Field::Attribute(a.clone())));
                }
                all
            }
        };
        if self.config.removal == RemovalMode::Mark && !fields.contains(&Field::Status) {
            fields.push(Field::Status);
        }
        fields
    }
}

/// The row's possible keys: by external id and by email, so a change keyed either way
/// finds it (`None` when the row has neither).
fn row_key(
    row: &csv::ByteRecord,
    id_column: Option<usize>,
    email_column: Option<usize>,
) -> Option<(Option<ContactKey>, Option<ContactKey>)> {
    let mut contact = Contact::default();
    for (column, field) in [(id_column, Field::ExternalId), (email_column, Field::Email)] {
        if let Some(value) = column
            .and_then(|c| row.get(c))
            .and_then(|v| std::str::from_utf8(v).ok())
        {
            // Setting an id or email cannot fail; it only normalises.
            let _ = contact.set(&field, value);
        }
    }
    let by_id = contact.key(KeyRule::ExternalId);
    let by_email = contact.key(KeyRule::Email);
    (by_id.is_some() || by_email.is_some()).then_some((by_id, by_email))
}

/// Writes `contact`'s fields into the mapped columns of `out`; unmapped columns keep
/// what they had.
fn render(out: &mut [Vec<u8>], columns: &[Option<Field>], contact: &Contact) {
    for (cell, field) in out.iter_mut().zip(columns) {
        if let Some(field) = field {
            *cell = contact.get(field).unwrap_or_default().into_bytes();
        }
    }
}

/// Makes the rename durable. Best effort: not every platform can open a directory.
fn sync_directory(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), "could not fsync the directory: {e}");
    }
}

#[async_trait]
impl Sink for CsvSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities {
            max_batch: 10_000,
            asynchronous_jobs: false,
            durable_at_finish: true,
            removal: match self.config.removal {
                RemovalMode::Drop => RemovalStyle::Delete,
                RemovalMode::Mark => RemovalStyle::MarkInactive,
            },
        }
    }

    /// The file's directory exists and a file can be created in it.
    async fn check(&mut self) -> Result<(), ConnectorError> {
        let dir = self.directory();
        tokio::task::spawn_blocking(move || {
            tempfile::tempfile_in(&dir)
                .map(drop)
                .map_err(|e| ConnectorError::io(&dir, e))
        })
        .await
        .map_err(|e| ConnectorError::Other(format!("CSV sink check failed: {e}")))?
    }

    /// Records the batch for `finish`: creates go to the spool, the rest to memory.
    async fn apply(
        &mut self,
        batch: &ChangeBatch,
        _ctx: &mut SinkContext<'_>,
    ) -> Result<Vec<Outcome>, ConnectorError> {
        let refusals: Vec<Option<Outcome>> = batch
            .changes
            .iter()
            .map(|c| c.contact().and_then(|contact| self.refusal(contact)))
            .collect();
        let run = self.run()?;
        let mut outcomes = Vec::with_capacity(batch.changes.len());
        for (change, refusal) in batch.changes.iter().zip(refusals) {
            if let Some(refusal) = refusal {
                outcomes.push(refusal);
                continue;
            }
            let key = change.key().clone();
            match change {
                Change::Create { contact, .. } => {
                    run.attributes.extend(contact.attributes.keys().cloned());
                    let line = serde_json::to_string(&SpooledCreate {
                        key: key.clone(),
                        contact: contact.clone(),
                    })
                    .map_err(|e| ConnectorError::Other(format!("CSV sink spool: {e}")))?;
                    writeln!(run.spool, "{line}")
                        .map_err(|e| ConnectorError::Other(format!("CSV sink spool: {e}")))?;
                    run.latest.insert(key, Latest::Created(run.spooled));
                    run.spooled += 1;
                }
                Change::Update { contact, .. } => {
                    run.attributes.extend(contact.attributes.keys().cloned());
                    run.latest
                        .insert(key, Latest::Updated(Box::new(contact.clone())));
                }
                Change::Remove { .. } => {
                    run.latest.insert(key, Latest::Removed);
                }
            }
            outcomes.push(Outcome::applied());
        }
        Ok(outcomes)
    }

    /// Merges the run's changes into the file and replaces it atomically.
    async fn finish(&mut self, _ctx: &mut SinkContext<'_>) -> Result<(), ConnectorError> {
        let Some(run) = self.run.take() else {
            return Ok(());
        };
        let sink = CsvSink {
            config: self.config.clone(),
            run: None,
        };
        tokio::task::spawn_blocking(move || sink.write_file(run))
            .await
            .map_err(|e| ConnectorError::Other(format!("CSV sink finish failed: {e}")))?
    }
}
