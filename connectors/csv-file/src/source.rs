//! Reading people from a CSV file.
//!
//! Parsing runs on its own thread, a chunk of rows ahead of the engine, so that a large
//! file neither blocks the async runtime nor sits in memory: at most
//! [`CHUNKS_AHEAD`] chunks of [`CHUNK_ROWS`] rows are ever buffered.
//!
//! What the file's shape can spoil, it reports rather than guesses:
//! - a header without an email or external-id column, or naming one field twice, is
//!   one error for the file, before any row is read;
//! - a row with the wrong number of fields, or a quote that is never closed (which
//!   would swallow the rows after it into one field), is a rejected record with no
//!   key, so that the engine holds back the run's removals;
//! - a row with one bad value is rejected with the fields that could be read, so that
//!   the engine still knows whose row it was.
//!
//! Lines end at `\n`, so that line numbers are right in files with Windows (`\r\n`)
//! line endings too; the `\r` is dropped from the last field. Old Mac files that end
//! lines with a bare `\r` are read as one line.

use std::fs::File;
use std::io::{BufRead, BufReader};

use contactsync_core::{
    async_trait, ConnectorError, Contact, ContactText, Field, KeyRule, Origin, ReadMode,
    ReadOutcome, RecordError, RecordStream, Source, SourceCapabilities, SourceItem, SourceRecord,
    Unchanged, UnchangedRow,
};
use tokio::sync::mpsc;

use crate::config::{CsvFormat, SourceConfig};
use crate::limiter::RecordLimiter;

/// Rows parsed per message to the engine's side: large enough that channel overhead
/// vanishes, small enough to keep memory flat.
pub const CHUNK_ROWS: usize = 1024;
/// Chunks the parsing thread may run ahead.
pub const CHUNKS_AHEAD: usize = 4;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// A CSV file people are read from.
#[derive(Debug, Clone)]
pub struct CsvSource {
    config: SourceConfig,
}

impl CsvSource {
    /// A source reading the file `config` names.
    pub fn new(config: SourceConfig) -> Self {
        CsvSource { config }
    }
}

#[async_trait]
impl Source for CsvSource {
    /// Full reads of the whole file, which skip the rows the engine knows as they are.
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities {
            skips_unchanged: true,
            ..SourceCapabilities::default()
        }
    }

    /// The file exists, its header parses, and every configured column is in it.
    async fn check(&self) -> Result<(), ConnectorError> {
        let format = self.config.format.clone();
        run_blocking(move || RowReader::open(&format).map(|_| ())).await
    }

    fn files(&self) -> Vec<std::path::PathBuf> {
        vec![self.config.format.path.clone()]
    }

    /// Every row; an incremental read is a full read (`complete: true`, no cursor).
    async fn read(&self, _mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
        self.read_rows(None).await
    }

    /// Every row, each one the state holds unchanged as an [`UnchangedRow`]: its fields
    /// hashed as borrowed text ([`ContactText`]) on the parsing thread, no `Contact`
    /// built.
    async fn read_skipping_unchanged(
        &self,
        _mode: ReadMode,
        unchanged: Unchanged,
    ) -> Result<Box<dyn RecordStream>, ConnectorError> {
        self.read_rows(Some(unchanged)).await
    }
}

impl CsvSource {
    async fn read_rows(
        &self,
        unchanged: Option<Unchanged>,
    ) -> Result<Box<dyn RecordStream>, ConnectorError> {
        let format = self.config.format.clone();
        let mut rows = run_blocking(move || RowReader::open(&format)).await?;
        rows.unchanged = unchanged;
        let (sender, receiver) = mpsc::channel(CHUNKS_AHEAD);
        let path = self.config.format.path.clone();
        std::thread::Builder::new()
            .name("csv-source".into())
            .spawn(move || rows.send_all(&sender))
            .map_err(|e| ConnectorError::io(path, e))?;
        Ok(Box::new(CsvStream {
            receiver,
            chunk: Vec::new().into_iter(),
        }))
    }
}

/// Runs file work off the async runtime's worker threads.
async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ConnectorError> + Send + 'static,
) -> Result<T, ConnectorError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ConnectorError::Other(format!("CSV reader task failed: {e}")))?
}

/// The engine's end of a read.
struct CsvStream {
    receiver: mpsc::Receiver<Result<Vec<SourceItem>, ConnectorError>>,
    chunk: std::vec::IntoIter<SourceItem>,
}

#[async_trait]
impl RecordStream for CsvStream {
    async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
        loop {
            if let Some(item) = self.chunk.next() {
                return Ok(Some(item));
            }
            match self.receiver.recv().await {
                Some(chunk) => self.chunk = chunk?.into_iter(),
                None => return Ok(None),
            }
        }
    }

    async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
        Ok(ReadOutcome {
            complete: true,
            cursor: None,
        })
    }
}

/// Parses one file row by row, with the column→field mapping worked out once.
pub(crate) struct RowReader {
    reader: csv::Reader<RecordLimiter<BufReader<File>>>,
    /// The field each column is read into.
    fields: Vec<Option<Field>>,
    /// The file as the user named it.
    display_name: String,
    path: std::path::PathBuf,
    delimiter: u8,
    quote: u8,
    record: csv::ByteRecord,
    max_record_bytes: u64,
    /// What a row is compared with to be yielded as unchanged, when the engine asked.
    unchanged: Option<Unchanged>,
    /// `display_name`, shared by the rows yielded as unchanged.
    shared_name: std::sync::Arc<str>,
}

impl RowReader {
    /// Opens the file and maps its header; a missing file, an unreadable header or a
    /// configured column the header lacks is an error.
    pub(crate) fn open(format: &CsvFormat) -> Result<Self, ConnectorError> {
        let (reader, headers) = open_csv(format, LineEnds::Newline, format.max_record_bytes)?
            .ok_or_else(|| {
                ConnectorError::io(
                    &format.path,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
                )
            })?;
        let headers = headers.ok_or_else(|| {
            ConnectorError::Other(format!(
                "{}: the file is empty; a header row is required",
                format.path.display()
            ))
        })?;
        let resolved = format.columns.resolve(headers.iter().map(String::as_str));
        if !resolved.missing.is_empty() {
            return Err(ConnectorError::Other(format!(
                "{}: configured column(s) {} not in the header row",
                format.path.display(),
                resolved
                    .missing
                    .iter()
                    .map(|h| format!("{h:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        check_header(format, &headers, &resolved.fields)?;
        Ok(RowReader {
            reader,
            fields: resolved.fields,
            display_name: format.display_name.clone(),
            path: format.path.clone(),
            delimiter: format.delimiter,
            quote: format.quote,
            record: csv::ByteRecord::new(),
            max_record_bytes: format.max_record_bytes,
            unchanged: None,
            shared_name: format.display_name.as_str().into(),
        })
    }

    /// Parses every row into chunks for `sender`; stops early when the engine dropped the
    /// stream, and sends a read error as the last message.
    fn send_all(&mut self, sender: &mpsc::Sender<Result<Vec<SourceItem>, ConnectorError>>) {
        loop {
            let mut chunk = Vec::with_capacity(CHUNK_ROWS);
            let mut at_end = false;
            while chunk.len() < CHUNK_ROWS {
                match self.next_item() {
                    Ok(Some(item)) => chunk.push(item),
                    Ok(None) => {
                        at_end = true;
                        break;
                    }
                    Err(e) => {
                        if !chunk.is_empty() && sender.blocking_send(Ok(chunk)).is_err() {
                            return;
                        }
                        let _ = sender.blocking_send(Err(e));
                        return;
                    }
                }
            }
            if !chunk.is_empty() && sender.blocking_send(Ok(chunk)).is_err() {
                tracing::debug!(file = %self.display_name, "read abandoned by the engine");
                return;
            }
            if at_end {
                return;
            }
        }
    }

    /// The next row as a record or a rejection; `None` at the end of the file.
    pub(crate) fn next_item(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
        let (start, end) = loop {
            let start = self.reader.position().clone();
            if !self
                .reader
                .read_byte_record(&mut self.record)
                .map_err(|e| csv_error(&self.path, e))?
            {
                return Ok(None);
            }
            let start = self.record.position().cloned().unwrap_or(start);
            // A blank line of a `\r\n` file reads as one field holding `\r`.
            if self.record.len() == 1 && field_value(&self.record, 0).is_empty() {
                continue;
            }
            break (start, self.reader.position().clone());
        };
        let line = start.line();
        let origin = Origin::line(self.display_name.clone(), line);
        // Only a quoted field can hold a line break, legitimate or not.
        let spans_lines = self.record.as_slice().contains(&b'\n');
        if self.reader.get_mut().oversized(line) {
            let reason = format!(
                "the record is longer than max_record_bytes ({} bytes), so it was not read; \
                 raise max_record_bytes if such records are real",
                self.max_record_bytes
            );
            return Ok(Some(self.reject(RecordError::new(origin, reason), None)));
        }
        if spans_lines {
            let unclosed = self
                .reader
                .get_ref()
                .open_quote_at_end()
                .filter(|&q| line <= q && q < end.line());
            if let Some(quote_line) = unclosed {
                let reason = format!(
                    "the quoted field that starts on line {quote_line} is never closed, so it runs to the end of the file \
                     and takes lines {line} to {} with it; close or remove the stray {:?}",
                    end.line().saturating_sub(1).max(line),
                    self.quote as char
                );
                let origin = Origin::line(self.display_name.clone(), quote_line);
                return Ok(Some(self.reject(RecordError::new(origin, reason), None)));
            }
        }
        if self.record.len() != self.fields.len() {
            let mut reason = format!(
                "the row has {} fields, the header has {}",
                self.record.len(),
                self.fields.len()
            );
            if spans_lines {
                reason.push_str(&format!(
                    " (a quoted field runs from line {line} to line {}: check for a stray {:?})",
                    end.line().saturating_sub(1).max(line),
                    self.quote as char
                ));
            }
            return Ok(Some(self.reject(RecordError::new(origin, reason), None)));
        }
        if let Some(row) = self.unchanged_row(line) {
            return Ok(Some(SourceItem::Unchanged(row)));
        }
        let mut contact = Contact::default();
        let mut failure: Option<(Field, String)> = None;
        for (i, field) in self.fields.iter().enumerate() {
            let Some(field) = field else { continue };
            let result = match std::str::from_utf8(field_value(&self.record, i)) {
                Ok(value) => contact.set(field, value),
                Err(e) => Err(format!("invalid UTF-8 ({e})")),
            };
            // The first bad value is the one reported; the other fields are still read,
            // so that the rejection knows whose row it is.
            if let (Err(reason), None) = (result, &failure) {
                failure = Some((field.clone(), reason));
            }
        }
        if let Some((field, reason)) = failure {
            let error = RecordError::new(origin, reason).with_field(field.name());
            return Ok(Some(self.reject(error, Some(contact))));
        }
        Ok(Some(SourceItem::Record(Box::new(SourceRecord::new(
            contact, origin,
        )))))
    }

    /// The current row (starting on `line`) as an [`UnchangedRow`], when the engine asked
    /// for them and the state holds the row's key with the content it reads as, and it
    /// has a valid email or none. `None` for every other row, which is then read into a
    /// `Contact` (and rejected there if a value is bad).
    fn unchanged_row(&self, line: u64) -> Option<UnchangedRow> {
        let unchanged = self.unchanged.as_ref()?;
        // The row's bytes are checked once; a field that does not start and end on a
        // character boundary (one invalid alone) takes the `Contact` path, which says so.
        let row = std::str::from_utf8(self.record.as_slice()).ok()?;
        let mut whole = true;
        let text = ContactText::read(
            self.fields
                .iter()
                .enumerate()
                .filter_map(|(i, field)| Some((field.as_ref()?, i)))
                .map_while(|(field, i)| {
                    let value = field_range(&self.record, i).and_then(|range| row.get(range));
                    whole &= value.is_some();
                    Some((field, value?))
                }),
        )?;
        if !whole {
            return None;
        }
        let key_hash = text.key_hash(unchanged.rule)?;
        let known = unchanged.known.content_hash(key_hash)?;
        if known != text.content_hash() || !text.email().is_none_or(Contact::is_valid_email) {
            return None;
        }
        Some(UnchangedRow {
            key_hash,
            file: std::sync::Arc::clone(&self.shared_name),
            line,
        })
    }

    /// A rejection carrying the row as text (re-quoted as written) and, when the row's
    /// shape could be trusted, the fields that could be read (and the key they give).
    fn reject(&self, mut error: RecordError, partial: Option<Contact>) -> SourceItem {
        if let Some(partial) = partial {
            if let Some(key) = partial.key(KeyRule::Auto) {
                error = error.with_key(key);
            }
            error = error.with_partial(partial);
        }
        SourceItem::Rejected(Box::new(error.with_raw(raw_row(
            &self.record,
            self.delimiter,
            self.quote,
        ))))
    }
}

/// A CSV file opened for reading: the reader past the header, and the header row
/// (`None` for an empty file).
pub(crate) type OpenedCsv = (
    csv::Reader<RecordLimiter<BufReader<File>>>,
    Option<Vec<String>>,
);

/// Where a CSV reader ends its lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineEnds {
    /// At `\n` only, so that line numbers count `\r\n` files right; the caller drops
    /// the `\r` left at the end of the last field ([`field_value`]).
    Newline,
    /// At `\n`, `\r` or `\r\n`, the `csv` crate's default: for reading rows that are
    /// copied, not reported by line.
    Any,
}

/// Field `i` of a record read with [`LineEnds::Newline`], without the `\r` of a
/// `\r\n` line end.
pub(crate) fn field_value(record: &csv::ByteRecord, i: usize) -> &[u8] {
    field_range(record, i).map_or(&[], |range| &record.as_slice()[range])
}

/// Where field `i` of a record read with [`LineEnds::Newline`] is in the record's bytes
/// ([`csv::ByteRecord::as_slice`]), without the `\r` of a `\r\n` line end.
fn field_range(record: &csv::ByteRecord, i: usize) -> Option<std::ops::Range<usize>> {
    let mut range = record.range(i)?;
    if i + 1 == record.len() && record.as_slice()[range.clone()].ends_with(b"\r") {
        range.end -= 1;
    }
    Some(range)
}

/// One error for the whole file when its header cannot be trusted: a column named
/// twice (which would silently read one and drop the other), or neither an email nor
/// an external-id column (every row would be rejected for want of a key).
fn check_header(
    format: &CsvFormat,
    headers: &[String],
    fields: &[Option<Field>],
) -> Result<(), ConnectorError> {
    let file = format.path.display();
    for (i, field) in fields.iter().enumerate() {
        let Some(field) = field else { continue };
        if let Some(j) = fields[..i].iter().position(|f| f.as_ref() == Some(field)) {
            return Err(ConnectorError::Other(format!(
                "{file}: columns {} ({:?}) and {} ({:?}) both give the field {field}; rename or remove one of them \
                 (or map one elsewhere with `columns`)",
                j + 1,
                headers[j].trim(),
                i + 1,
                headers[i].trim()
            )));
        }
    }
    let has = |wanted: Field| fields.iter().any(|f| f.as_ref() == Some(&wanted));
    if !has(Field::Email) && !has(Field::ExternalId) {
        return Err(ConnectorError::Other(format!(
            "{file}: the header has neither an email nor an external_id column, so no row could be matched to a person \
             (header: {}); name the columns in `columns`, e.g. columns = {{ email = \"E-mail\" }}",
            headers
                .iter()
                .map(|h| format!("{:?}", h.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
}

/// Opens `format.path` as CSV, skipping a UTF-8 BOM; `Ok(None)` when the file does not
/// exist. Also returns the header row (trimmed of a `\r` line end), `None` for an
/// empty file.
pub(crate) fn open_csv(
    format: &CsvFormat,
    line_ends: LineEnds,
    max_record_bytes: u64,
) -> Result<Option<OpenedCsv>, ConnectorError> {
    let file = match File::open(&format.path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ConnectorError::io(&format.path, e)),
    };
    let mut input = BufReader::with_capacity(256 * 1024, file);
    if input
        .fill_buf()
        .map_err(|e| ConnectorError::io(&format.path, e))?
        .starts_with(UTF8_BOM)
    {
        input.consume(UTF8_BOM.len());
    }
    let mut builder = csv::ReaderBuilder::new();
    builder
        .delimiter(format.delimiter)
        .quote(format.quote)
        .flexible(true)
        .has_headers(true);
    if line_ends == LineEnds::Newline {
        builder.terminator(csv::Terminator::Any(b'\n'));
    }
    let mut reader = builder.from_reader(RecordLimiter::new(
        input,
        format.delimiter,
        format.quote,
        max_record_bytes,
    ));
    let headers = reader
        .byte_headers()
        .map_err(|e| csv_error(&format.path, e))?;
    if headers.is_empty() {
        return Ok(Some((reader, None)));
    }
    let headers = (0..headers.len())
        .map(|i| {
            std::str::from_utf8(field_value(headers, i))
                .map(str::to_string)
                .map_err(|_| {
                    ConnectorError::Other(format!(
                        "{}: the header row is not valid UTF-8",
                        format.path.display()
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some((reader, Some(headers))))
}

/// A `csv` error as a connector error naming the file.
pub(crate) fn csv_error(path: &std::path::Path, error: csv::Error) -> ConnectorError {
    match error.into_kind() {
        csv::ErrorKind::Io(e) => ConnectorError::io(path, e),
        other => ConnectorError::Other(format!("{}: {other:?}", path.display())),
    }
}

/// A row as CSV text, for a rejects file; invalid UTF-8 is replaced with U+FFFD.
fn raw_row(record: &csv::ByteRecord, delimiter: u8, quote: u8) -> String {
    let mut writer = csv::WriterBuilder::new()
        .delimiter(delimiter)
        .quote(quote)
        .flexible(true)
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    let written = (0..record.len()).all(|i| writer.write_field(field_value(record, i)).is_ok())
        && writer.write_record(None::<&[u8]>).is_ok();
    let bytes = match writer.into_inner() {
        Ok(bytes) if written => bytes,
        // Writing to memory cannot fail; fall back to a plain join all the same.
        _ => record.iter().collect::<Vec<_>>().join(&delimiter),
    };
    String::from_utf8_lossy(&bytes)
        .trim_end_matches('\n')
        .to_string()
}
