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
        rows.builder.unchanged = unchanged;
        let (sender, receiver) = mpsc::channel(CHUNKS_AHEAD);
        rows.spawn(sender)
            .map_err(|e| ConnectorError::io(&self.config.format.path, e))?;
        Ok(Box::new(CsvStream {
            receiver,
            chunk: Vec::new().into_iter(),
            ended: false,
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
    receiver: mpsc::Receiver<ReadMessage<Vec<SourceItem>>>,
    chunk: std::vec::IntoIter<SourceItem>,
    /// The reader said the file ended.
    ended: bool,
}

#[async_trait]
impl RecordStream for CsvStream {
    async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
        loop {
            if let Some(item) = self.chunk.next() {
                return Ok(Some(item));
            }
            if self.ended {
                return Ok(None);
            }
            match self.receiver.recv().await {
                Some(ReadMessage::Rows(chunk)) => self.chunk = chunk.into_iter(),
                Some(ReadMessage::End) => self.ended = true,
                Some(ReadMessage::Failed(e)) => return Err(e),
                // Not the end of the file: a read cut short must not look complete.
                None => return Err(stopped_early()),
            }
        }
    }

    /// The rest of the chunk at hand, or of the next one, at most `max`.
    async fn next_batch(
        &mut self,
        into: &mut Vec<SourceItem>,
        max: usize,
    ) -> Result<bool, ConnectorError> {
        if max == 0 {
            return Ok(true);
        }
        if self.chunk.as_slice().is_empty() {
            // The next chunk (its first item taken), or the end.
            match self.next().await? {
                Some(item) => into.push(item),
                None => return Ok(false),
            }
            into.extend(self.chunk.by_ref().take(max - 1));
        } else {
            into.extend(self.chunk.by_ref().take(max));
        }
        Ok(true)
    }

    async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
        Ok(ReadOutcome {
            complete: true,
            cursor: None,
        })
    }
}

/// Parses one file row by row, with the column→field mapping worked out once: a
/// [`RowParser`] splits the file into rows, a [`RowBuilder`] turns each into an item.
/// A read runs each on a thread of its own.
pub(crate) struct RowReader {
    parser: RowParser,
    builder: RowBuilder,
}

/// The first half of a read: splits the file into rows and rejects the rows whose
/// shape is wrong (too long, an unclosed quote, the wrong number of fields), which only
/// the reader's position can tell.
struct RowParser {
    reader: csv::Reader<RecordLimiter<BufReader<File>>>,
    /// Fields a row must have: the header's.
    width: usize,
    display_name: String,
    path: std::path::PathBuf,
    quoting: Quoting,
    max_record_bytes: u64,
}

/// The second half of a read: a row of the right shape as a record, a rejection, or
/// (when the engine asked) a row the state holds unchanged.
struct RowBuilder {
    /// The field each column is read into.
    fields: Vec<Option<Field>>,
    /// The file as the user named it, shared by the rows yielded as unchanged.
    display_name: std::sync::Arc<str>,
    quoting: Quoting,
    /// What a row is compared with to be yielded as unchanged, when the engine asked.
    unchanged: Option<Unchanged>,
}

/// The file's delimiter and quote, to write a rejected row back as text.
#[derive(Debug, Clone, Copy)]
struct Quoting {
    delimiter: u8,
    quote: u8,
}

/// [`CHUNK_ROWS`] rows on their way from the parser to the builder. Its records are
/// handed back and parsed into again, so that a read does not allocate a row's buffers
/// for every row.
struct RawChunk {
    /// The rows of the right shape, in order; `records[..parsed]` are this chunk's.
    records: Vec<csv::ByteRecord>,
    parsed: usize,
    /// Every row in file order.
    rows: Vec<RawRow>,
}

/// One row of a [`RawChunk`].
enum RawRow {
    /// The next of the chunk's records, which starts on this line.
    Parsed { line: u64 },
    /// A row the parser rejected for its shape.
    Rejected(SourceItem),
}

/// What one thread of a read sends the next. A channel that closes without
/// [`ReadMessage::End`] means the sender stopped early (it panicked): the read failed.
enum ReadMessage<T> {
    Rows(T),
    /// The file ended; nothing follows.
    End,
    /// The read failed; nothing follows.
    Failed(ConnectorError),
}

/// What the parser sends the builder.
type RawMessage = ReadMessage<RawChunk>;

/// Where a read's chunks of items go.
type ItemSender = mpsc::Sender<ReadMessage<Vec<SourceItem>>>;

/// The error for a read whose thread stopped before the end of the file.
fn stopped_early() -> ConnectorError {
    ConnectorError::Other(
        "the CSV reader stopped before the end of the file (one of its threads failed); \
         nothing was removed, run again"
            .into(),
    )
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
        let quoting = Quoting {
            delimiter: format.delimiter,
            quote: format.quote,
        };
        Ok(RowReader {
            parser: RowParser {
                reader,
                width: resolved.fields.len(),
                display_name: format.display_name.clone(),
                path: format.path.clone(),
                quoting,
                max_record_bytes: format.max_record_bytes,
            },
            builder: RowBuilder {
                fields: resolved.fields,
                display_name: format.display_name.as_str().into(),
                quoting,
                unchanged: None,
            },
        })
    }

    /// Reads the file on two threads, the parser's and the builder's, each a chunk of
    /// rows ahead of the next; the builder's chunks go to `sender`. Splitting the work
    /// lets a large file's parsing and hashing run side by side: the hashing, lookups
    /// and `Contact`s are more than half of a read.
    fn spawn(self, sender: ItemSender) -> std::io::Result<()> {
        let RowReader {
            mut parser,
            builder,
        } = self;
        let (raw_sender, raw_receiver) = std::sync::mpsc::sync_channel::<RawMessage>(CHUNKS_AHEAD);
        let (spent_sender, spent_receiver) = std::sync::mpsc::channel::<RawChunk>();
        std::thread::Builder::new()
            .name("csv-rows".into())
            .spawn(move || builder.build_all(&raw_receiver, &spent_sender, &sender))?;
        std::thread::Builder::new()
            .name("csv-source".into())
            .spawn(move || parser.parse_all(&raw_sender, &spent_receiver))?;
        Ok(())
    }
}

impl RowParser {
    /// Parses every row into chunks for the builder, reusing the chunks it hands back;
    /// stops early when the builder is gone (the engine dropped the stream), and sends a
    /// read error as the last message.
    fn parse_all(
        &mut self,
        sender: &std::sync::mpsc::SyncSender<RawMessage>,
        spent: &std::sync::mpsc::Receiver<RawChunk>,
    ) {
        loop {
            let mut chunk = spent.try_recv().unwrap_or_else(|_| RawChunk {
                records: Vec::with_capacity(CHUNK_ROWS),
                parsed: 0,
                rows: Vec::with_capacity(CHUNK_ROWS),
            });
            chunk.parsed = 0;
            chunk.rows.clear();
            // The message that ends the read, once the file has ended or failed.
            let mut last = None;
            while chunk.rows.len() < CHUNK_ROWS {
                if chunk.records.len() == chunk.parsed {
                    chunk.records.push(csv::ByteRecord::new());
                }
                let record = &mut chunk.records[chunk.parsed];
                match self.next_row(record) {
                    Ok(Some(Ok(line))) => {
                        chunk.parsed += 1;
                        chunk.rows.push(RawRow::Parsed { line });
                    }
                    Ok(Some(Err(rejected))) => chunk.rows.push(RawRow::Rejected(rejected)),
                    Ok(None) => {
                        last = Some(ReadMessage::End);
                        break;
                    }
                    Err(e) => {
                        last = Some(ReadMessage::Failed(e));
                        break;
                    }
                }
            }
            if !chunk.rows.is_empty() && sender.send(ReadMessage::Rows(chunk)).is_err() {
                tracing::debug!(file = %self.display_name, "read abandoned by the engine");
                return;
            }
            if let Some(last) = last {
                let _ = sender.send(last);
                return;
            }
        }
    }

    /// The next row into `record`: the line it starts on, or its rejection when its
    /// shape is wrong; `None` at the end of the file.
    fn next_row(
        &mut self,
        record: &mut csv::ByteRecord,
    ) -> Result<Option<Result<u64, SourceItem>>, ConnectorError> {
        let (start, end) = loop {
            let start = self.reader.position().clone();
            if !self
                .reader
                .read_byte_record(record)
                .map_err(|e| csv_error(&self.path, e))?
            {
                return Ok(None);
            }
            let start = record.position().cloned().unwrap_or(start);
            // A blank line of a `\r\n` file reads as one field holding `\r`.
            if record.len() == 1 && field_value(record, 0).is_empty() {
                continue;
            }
            break (start, self.reader.position().clone());
        };
        let line = start.line();
        // Built for a rejection only: most rows have none.
        let origin = || Origin::line(self.display_name.clone(), line);
        // Only a quoted field can hold a line break, legitimate or not.
        let spans_lines = record.as_slice().contains(&b'\n');
        let quoting = self.quoting;
        if self.reader.get_mut().oversized(line) {
            let reason = format!(
                "the record is longer than max_record_bytes ({} bytes), so it was not read; \
                 raise max_record_bytes if such records are real",
                self.max_record_bytes
            );
            return Ok(Some(Err(reject(
                record,
                quoting,
                RecordError::new(origin(), reason),
                None,
            ))));
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
                    quoting.quote as char
                );
                let origin = Origin::line(self.display_name.clone(), quote_line);
                return Ok(Some(Err(reject(
                    record,
                    quoting,
                    RecordError::new(origin, reason),
                    None,
                ))));
            }
        }
        if record.len() != self.width {
            let mut reason = format!(
                "the row has {} fields, the header has {}",
                record.len(),
                self.width
            );
            if spans_lines {
                reason.push_str(&format!(
                    " (a quoted field runs from line {line} to line {}: check for a stray {:?})",
                    end.line().saturating_sub(1).max(line),
                    quoting.quote as char
                ));
            }
            return Ok(Some(Err(reject(
                record,
                quoting,
                RecordError::new(origin(), reason),
                None,
            ))));
        }
        Ok(Some(Ok(line)))
    }
}

impl RowBuilder {
    /// Turns the parser's chunks into items for `sender`, handing each chunk back to be
    /// parsed into again; stops early when the engine dropped the stream, and passes a
    /// read error on as the last message.
    fn build_all(
        &self,
        raw: &std::sync::mpsc::Receiver<RawMessage>,
        spent: &std::sync::mpsc::Sender<RawChunk>,
        sender: &ItemSender,
    ) {
        let mut read_as: Vec<Option<RowRead>> = Vec::with_capacity(CHUNK_ROWS);
        let mut keys: Vec<u64> = Vec::with_capacity(CHUNK_ROWS);
        loop {
            let mut chunk = match raw.recv() {
                Ok(ReadMessage::Rows(chunk)) => chunk,
                Ok(ReadMessage::End) => {
                    let _ = sender.blocking_send(ReadMessage::End);
                    return;
                }
                Ok(ReadMessage::Failed(e)) => {
                    let _ = sender.blocking_send(ReadMessage::Failed(e));
                    return;
                }
                Err(std::sync::mpsc::RecvError) => {
                    let _ = sender.blocking_send(ReadMessage::Failed(stopped_early()));
                    return;
                }
            };
            let RawChunk {
                records,
                parsed,
                rows,
            } = &mut chunk;
            let records = &records[..*parsed];
            // What each row reads as first, then the chunk's keys warmed in one go, then
            // the lookups: each row's lookup no longer waits alone for memory.
            read_as.clear();
            read_as.extend(records.iter().map(|record| self.read_as(record)));
            if let Some(unchanged) = &self.unchanged {
                keys.clear();
                keys.extend(read_as.iter().flatten().map(|read| read.key_hash));
                unchanged.known.warm(&keys);
            }
            let mut parsed = records.iter().zip(&read_as);
            let items: Vec<SourceItem> = rows
                .drain(..)
                .map(|row| match row {
                    RawRow::Parsed { line } => {
                        // The parser pushes one record a parsed row. Were that broken,
                        // the panic fails the read (`stopped_early`) instead of a row
                        // going missing.
                        let (record, read) = parsed
                            .next()
                            .expect("the parser keeps a record for each parsed row");
                        self.item(record, *read, line)
                    }
                    RawRow::Rejected(item) => item,
                })
                .collect();
            // The parser may have ended: then the chunk is not needed.
            let _ = spent.send(chunk);
            if sender.blocking_send(ReadMessage::Rows(items)).is_err() {
                tracing::debug!(file = %self.display_name, "read abandoned by the engine");
                return;
            }
        }
    }

    /// A row of the right shape, starting on `line`, as an item: unchanged when it
    /// reads as (`read`) what the state holds for its key, else a record or a rejection.
    fn item(&self, record: &csv::ByteRecord, read: Option<RowRead>, line: u64) -> SourceItem {
        if let Some(row) = self.unchanged_row(read, line) {
            return SourceItem::Unchanged(row);
        }
        let origin = Origin::line(&*self.display_name, line);
        let mut contact = Contact::default();
        let mut failure: Option<(Field, String)> = None;
        for (i, field) in self.fields.iter().enumerate() {
            let Some(field) = field else { continue };
            let result = match std::str::from_utf8(field_value(record, i)) {
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
            return reject(record, self.quoting, error, Some(contact));
        }
        SourceItem::Record(Box::new(SourceRecord::new(contact, origin)))
    }

    /// What `record` reads as, when the engine asked for unchanged rows: the hashes of
    /// its key and content, read as borrowed text ([`ContactText`]). `None` for a row
    /// that cannot be unchanged: no key, a value `Contact::set` would refuse, an invalid
    /// email, or bytes that are not UTF-8 (such a row is read into a `Contact`, which
    /// says what is wrong).
    fn read_as(&self, record: &csv::ByteRecord) -> Option<RowRead> {
        let unchanged = self.unchanged.as_ref()?;
        // The row's bytes are checked once; a field that does not start and end on a
        // character boundary (one invalid alone) takes the `Contact` path, which says so.
        let row = std::str::from_utf8(record.as_slice()).ok()?;
        let mut whole = true;
        let text = ContactText::read(
            self.fields
                .iter()
                .enumerate()
                .filter_map(|(i, field)| Some((field.as_ref()?, i)))
                .map_while(|(field, i)| {
                    let value = field_range(record, i).and_then(|range| row.get(range));
                    whole &= value.is_some();
                    Some((field, value?))
                }),
        )?;
        if !whole || !text.email().is_none_or(Contact::is_valid_email) {
            return None;
        }
        Some(RowRead {
            key_hash: text.key_hash(unchanged.rule)?,
            content_hash: text.content_hash(),
        })
    }

    /// The row (starting on `line`) as an [`UnchangedRow`] when it reads as (`read`)
    /// the content the state holds for its key. `None` for every other row, which is
    /// then read into a `Contact` (and rejected there if a value is bad).
    fn unchanged_row(&self, read: Option<RowRead>, line: u64) -> Option<UnchangedRow> {
        let (unchanged, read) = (self.unchanged.as_ref()?, read?);
        let known = unchanged.known.entry(read.key_hash)?;
        if known.content_hash != read.content_hash {
            return None;
        }
        Some(UnchangedRow {
            key_hash: read.key_hash,
            file: std::sync::Arc::clone(&self.display_name),
            line,
            at: known.at,
        })
    }
}

/// The hashes a row reads as ([`RowBuilder::read_as`]).
#[derive(Debug, Clone, Copy)]
struct RowRead {
    key_hash: u64,
    content_hash: u64,
}

/// A rejection carrying the row as text (re-quoted as written) and, when the row's
/// shape could be trusted, the fields that could be read (and the key they give).
fn reject(
    record: &csv::ByteRecord,
    quoting: Quoting,
    mut error: RecordError,
    partial: Option<Contact>,
) -> SourceItem {
    if let Some(partial) = partial {
        if let Some(key) = partial.key(KeyRule::Auto) {
            error = error.with_key(key);
        }
        error = error.with_partial(partial);
    }
    SourceItem::Rejected(Box::new(error.with_raw(raw_row(
        record,
        quoting.delimiter,
        quoting.quote,
    ))))
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
