//! Reading people from a CSV file.
//!
//! Parsing runs on its own thread, a chunk of rows ahead of the engine, so that a large
//! file neither blocks the async runtime nor sits in memory: at most
//! [`CHUNKS_AHEAD`] chunks of [`CHUNK_ROWS`] rows are ever buffered.

use std::fs::File;
use std::io::{BufRead, BufReader};

use contactsync_core::{
    async_trait, ConnectorError, Contact, Field, KeyRule, Origin, ReadMode, ReadOutcome,
    RecordError, RecordStream, Source, SourceCapabilities, SourceItem, SourceRecord,
};
use tokio::sync::mpsc;

use crate::config::{CsvFormat, SourceConfig};

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
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities {
            incremental: false,
            reports_deletions: false,
        }
    }

    /// The file exists, its header parses, and every configured column is in it.
    async fn check(&self) -> Result<(), ConnectorError> {
        let format = self.config.format.clone();
        run_blocking(move || RowReader::open(&format).map(|_| ())).await
    }

    /// Every row; an incremental read is a full read (`complete: true`, no cursor).
    async fn read(&self, _mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
        let format = self.config.format.clone();
        let mut rows = run_blocking(move || RowReader::open(&format)).await?;
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
    reader: csv::Reader<BufReader<File>>,
    /// The field each column is read into.
    fields: Vec<Option<Field>>,
    /// The file as the user named it.
    display_name: String,
    path: std::path::PathBuf,
    delimiter: u8,
    quote: u8,
    record: csv::ByteRecord,
}

impl RowReader {
    /// Opens the file and maps its header; a missing file, an unreadable header or a
    /// configured column the header lacks is an error.
    pub(crate) fn open(format: &CsvFormat) -> Result<Self, ConnectorError> {
        let (reader, headers) = open_csv(format)?.ok_or_else(|| {
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
        Ok(RowReader {
            reader,
            fields: resolved.fields,
            display_name: format.display_name.clone(),
            path: format.path.clone(),
            delimiter: format.delimiter,
            quote: format.quote,
            record: csv::ByteRecord::new(),
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
        if !self
            .reader
            .read_byte_record(&mut self.record)
            .map_err(|e| csv_error(&self.path, e))?
        {
            return Ok(None);
        }
        let line = self.record.position().map_or(0, |p| p.line());
        let origin = Origin::line(self.display_name.clone(), line);
        if self.record.len() != self.fields.len() {
            let reason = format!(
                "the row has {} fields, the header has {}",
                self.record.len(),
                self.fields.len()
            );
            return Ok(Some(self.reject(RecordError::new(origin, reason), None)));
        }
        let mut contact = Contact::default();
        for (field, bytes) in self.fields.iter().zip(self.record.iter()) {
            let Some(field) = field else { continue };
            let failure = match std::str::from_utf8(bytes) {
                Ok(value) => contact.set(field, value).err(),
                Err(e) => Some(format!("invalid UTF-8 ({e})")),
            };
            if let Some(reason) = failure {
                let error = RecordError::new(origin, reason).with_field(field.name());
                return Ok(Some(self.reject(error, Some(&contact))));
            }
        }
        Ok(Some(SourceItem::Record(SourceRecord::new(contact, origin))))
    }

    /// A rejection carrying the row as text (re-quoted as written) and, when the fields
    /// read so far give one, the key.
    fn reject(&self, mut error: RecordError, partial: Option<&Contact>) -> SourceItem {
        if let Some(key) = partial.and_then(|c| c.key(KeyRule::Auto)) {
            error = error.with_key(key);
        }
        SourceItem::Rejected(error.with_raw(raw_row(&self.record, self.delimiter, self.quote)))
    }
}

/// A CSV file opened for reading: the reader past the header, and the header row
/// (`None` for an empty file).
pub(crate) type OpenedCsv = (csv::Reader<BufReader<File>>, Option<Vec<String>>);

/// Opens `format.path` as CSV, skipping a UTF-8 BOM; `Ok(None)` when the file does not
/// exist. Also returns the header row, `None` for an empty file.
pub(crate) fn open_csv(format: &CsvFormat) -> Result<Option<OpenedCsv>, ConnectorError> {
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
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(format.delimiter)
        .quote(format.quote)
        .flexible(true)
        .has_headers(true)
        .from_reader(input);
    let headers = reader
        .byte_headers()
        .map_err(|e| csv_error(&format.path, e))?;
    if headers.is_empty() {
        return Ok(Some((reader, None)));
    }
    let headers = headers
        .iter()
        .map(|h| {
            std::str::from_utf8(h).map(str::to_string).map_err(|_| {
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
    let written = writer.write_byte_record(record).is_ok();
    let bytes = match writer.into_inner() {
        Ok(bytes) if written => bytes,
        // Writing to memory cannot fail; fall back to a plain join all the same.
        _ => record.iter().collect::<Vec<_>>().join(&delimiter),
    };
    String::from_utf8_lossy(&bytes)
        .trim_end_matches('\n')
        .to_string()
}
