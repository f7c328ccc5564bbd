//! Writing the synced population as a CSV file.
//!
//! The sink receives only changes, so the file is rebuilt at [`Sink::finish`]: the
//! existing file is streamed row by row into a temporary file in the same directory
//! (updated rows replaced, removed rows dropped or marked, other rows copied as they
//! were), creates are appended, and the temporary file is fsynced and renamed over the
//! old one. A crash leaves either the old file or the new one, never half of one; and
//! since nothing is durable before `finish`, the sink says `durable_at_finish`.
//!
//! Memory: every change is spooled to an anonymous temporary file as a binary frame (a
//! little-endian `u32` length, then the key, the contact's binary body and its
//! `updated_at`, in postcard); what stays in memory is 16 bytes a change (key hash →
//! the frame's offset), so a first sync of a million people costs tens of megabytes.
//! (JSON lines cost a first sync of a million people some two seconds of formatting
//! and parsing.) A hash hit is always confirmed against
//! the exact key read back from the spool, so a hash collision can never misapply a
//! change. Rows the run does not touch are copied through as raw bytes.
//!
//! Columns: an existing file keeps its header, columns and order (columns the sink does
//! not map keep their values). Columns are appended for fields the run needs that the
//! header lacks: the configured `fields` (or, by default, every canonical field and the
//! attributes seen in this run's changes, sorted), and `status` when removal is `mark`.
//! A new file gets exactly those columns.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use contactsync_core::{
    async_trait, ChangeBatch, ConnectorError, Contact, ContactKey, ContactStatus, Field,
    FinishStarted, KeyRule, Outcome, RemovalStyle, Sink, SinkCapabilities, SinkContext,
    SinkIntegrity, SinkSummary,
};
use nohash_hasher::BuildNoHashHasher;
use serde::{Deserialize, Serialize};

use crate::config::{ExtraColumns, RemovalMode, SinkConfig};
use crate::source::{csv_error, open_csv, LineEnds};
use crate::spool::{frame_change, spool_error, unframe_change, SpooledChange};

/// A CSV file kept equal to the synced population.
pub struct CsvSink {
    config: SinkConfig,
    run: Option<PendingRun>,
    /// How this run treats the file it finds, as [`Sink::verify`] decided.
    trust: FileTrust,
    /// Rows kept that the state never synced, counted when the file was foreign.
    unknown_in_sink: Option<u64>,
    /// The file being written, from [`Sink::start_finish`] until `finish` ends it.
    writing: Option<tokio::task::JoinHandle<Result<Written, ConnectorError>>>,
}

/// What the sink makes of the file it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum FileTrust {
    /// What contactsync last wrote: the changes are merged into it.
    #[default]
    Trusted,
    /// Missing or changed by hand: the file is written anew from this run's changes,
    /// which then hold everyone.
    Rebuild,
    /// Rows written before this state existed: kept, and counted.
    Foreign,
}

/// What the sink records of the file it last wrote, to tell at the next run whether
/// anyone else changed it: size and modification time (cheap), and a content hash
/// (for when only the time moved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Fingerprint {
    size: u64,
    modified_ns: u128,
    hash: u64,
}

fn modified_ns(meta: &std::fs::Metadata) -> u128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

/// Hashes what passes through on its way to the file.
struct HashingWriter<W> {
    inner: W,
    hasher: xxhash_rust::xxh3::Xxh3,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The content hash of a file, as [`HashingWriter`] computes it while writing.
fn hash_file(path: &Path) -> std::io::Result<u64> {
    let mut file = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    loop {
        let buf = file.fill_buf()?;
        if buf.is_empty() {
            return Ok(hasher.digest());
        }
        hasher.update(buf);
        let n = buf.len();
        file.consume(n);
    }
}

/// What writing the file did, for the fingerprint and the summary.
struct Written {
    fingerprint: Fingerprint,
    counts: MergeCounts,
}

/// What the current run has applied, waiting for `finish`.
struct PendingRun {
    /// Every change, one frame ([`SpoolFrame`]) after the other.
    spool: BufWriter<File>,
    /// Bytes written to `spool`: the offset of the next frame.
    written: u64,
    /// Key hash → offset of that key's change in the spool. A key comes at most once a
    /// run (the engine's contract), so a hash already present is a true collision,
    /// whose other offsets go to `collisions`.
    index: HashMap<u64, u64, BuildNoHashHasher<u64>>,
    collisions: HashMap<u64, Vec<u64>>,
    /// Attribute names of the contacts created or updated, for new columns.
    attributes: BTreeSet<String>,
}

impl CsvSink {
    /// The sink-store key of the file's fingerprint.
    fn fingerprint_key(&self) -> String {
        format!("fingerprint:{}", self.config.format.path.display())
    }

    /// A sink writing the file `config` names.
    pub fn new(config: SinkConfig) -> Self {
        CsvSink {
            config,
            run: None,
            trust: FileTrust::default(),
            unknown_in_sink: None,
            writing: None,
        }
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
            std::fs::create_dir_all(&dir).map_err(|e| ConnectorError::io(&dir, e))?;
            let spool = tempfile::tempfile_in(&dir).map_err(|e| ConnectorError::io(&dir, e))?;
            self.run = Some(PendingRun {
                spool: BufWriter::with_capacity(1 << 20, spool),
                written: 0,
                index: HashMap::default(),
                collisions: HashMap::new(),
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
    fn write_file(&self, run: PendingRun) -> Result<Written, ConnectorError> {
        let format = &self.config.format;
        let path = &format.path;
        let mut spool = run
            .spool
            .into_inner()
            .map_err(|e| spool_error(e.into_error()))?;
        spool.rewind().map_err(spool_error)?;

        // A file that cannot be trusted is not merged: this run's changes hold everyone.
        let existing = match self.trust {
            FileTrust::Rebuild => None,
            _ => open_csv(format, LineEnds::Any, u64::MAX)?,
        };
        // An existing file keeps its mode; a new one gets the usual mode under the
        // umask (the temporary file is created 0600).
        let mode = std::fs::metadata(path).ok().map(|m| m.permissions());
        let (mut reader, old_headers) = match existing {
            Some((reader, headers)) => (Some(reader), headers.unwrap_or_default()),
            None => (None, Vec::new()),
        };
        let layout = self.layout(old_headers, &run.attributes);
        let dir = self.directory();
        let temp = self.temp_file(&dir, mode.clone())?;
        let write_error = |e: csv::Error| csv_error(temp.path(), e);
        let mut writer = csv::WriterBuilder::new()
            .delimiter(format.delimiter)
            .quote(format.quote)
            .flexible(true)
            .from_writer(BufWriter::with_capacity(
                256 * 1024,
                HashingWriter {
                    inner: temp.as_file(),
                    hasher: xxhash_rust::xxh3::Xxh3::new(),
                },
            ));
        writer.write_record(&layout.headers).map_err(write_error)?;

        let lookup = ChangeLookup {
            spool: &spool,
            index: &run.index,
            collisions: &run.collisions,
        };
        // Offsets of the changes already written in place of an existing row.
        let mut consumed: HashSet<u64> = HashSet::new();
        let mut counts = MergeCounts::default();
        if let Some(reader) = reader.as_mut() {
            self.merge_rows(
                reader,
                &mut writer,
                &layout,
                &lookup,
                &mut consumed,
                &mut counts,
            )
            .map_err(|e| e.at(path, temp.path()))?;
        }
        append_rest(
            &spool,
            run.written,
            &consumed,
            &lookup,
            &mut writer,
            &layout,
            &mut counts,
        )
        .map_err(|e| e.at(path, temp.path()))?;

        let mut buffered = writer
            .into_inner()
            .map_err(|e| ConnectorError::io(temp.path(), e.into_error()))?;
        buffered
            .flush()
            .map_err(|e| ConnectorError::io(temp.path(), e))?;
        let hash = buffered
            .into_inner()
            .map_err(|e| ConnectorError::io(temp.path(), e.into_error()))?
            .hasher
            .digest();
        if let Some(mode) = mode {
            // The umask does not apply to an explicit change of mode.
            std::fs::set_permissions(temp.path(), mode)
                .map_err(|e| ConnectorError::io(temp.path(), e))?;
        }
        temp.as_file()
            .sync_all()
            .map_err(|e| ConnectorError::io(temp.path(), e))?;
        let file = temp
            .persist(path)
            .map_err(|e| ConnectorError::io(path, e.error))?;
        sync_directory(&dir);
        let meta = file.metadata().map_err(|e| ConnectorError::io(path, e))?;
        Ok(Written {
            fingerprint: Fingerprint {
                size: meta.len(),
                modified_ns: modified_ns(&meta),
                hash,
            },
            counts,
        })
    }

    /// The columns of the file this run writes: the old header's, then one for each
    /// field the run needs that it lacks.
    fn layout(&self, old_headers: Vec<String>, attributes: &BTreeSet<String>) -> Layout {
        let columns_config = &self.config.format.columns;
        let mut columns = columns_config
            .resolve(old_headers.iter().map(String::as_str))
            .fields;
        let old_width = old_headers.len();
        let mut headers = old_headers;
        for field in self.wanted_fields(attributes) {
            if !columns.contains(&Some(field.clone())) {
                headers.push(columns_config.header_for(&field));
                columns.push(Some(field));
            }
        }
        let position = |wanted: &Field| columns.iter().position(|f| f.as_ref() == Some(wanted));
        Layout {
            id_column: position(&Field::ExternalId),
            email_column: position(&Field::Email),
            status_column: position(&Field::Status),
            headers,
            columns,
            old_width,
        }
    }

    /// The temporary file beside the file, with `mode` (or the usual one), after
    /// removing what a crashed run left.
    fn temp_file(
        &self,
        dir: &Path,
        mode: Option<std::fs::Permissions>,
    ) -> Result<tempfile::NamedTempFile, ConnectorError> {
        std::fs::create_dir_all(dir).map_err(|e| ConnectorError::io(dir, e))?;
        let file_name = self
            .config
            .format
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        remove_leftover_temps(dir, &file_name);
        tempfile::Builder::new()
            .prefix(&format!(".{file_name}."))
            .suffix(".tmp")
            .permissions(mode.unwrap_or_else(|| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::Permissions::from_mode(0o666)
            }))
            .tempfile_in(dir)
            .map_err(|e| ConnectorError::io(dir, e))
    }

    /// Copies the existing rows, each replaced by its person's change (or dropped, or
    /// marked inactive, on a removal); records the changes used in `consumed`.
    fn merge_rows(
        &self,
        reader: &mut csv::Reader<impl Read>,
        writer: &mut RowWriter<'_>,
        layout: &Layout,
        lookup: &ChangeLookup<'_>,
        consumed: &mut HashSet<u64>,
        counts: &mut MergeCounts,
    ) -> Result<(), MergeError> {
        let mut row = csv::ByteRecord::new();
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(layout.columns.len());
        while reader
            .read_byte_record(&mut row)
            .map_err(MergeError::Read)?
        {
            // Most rows are not changed: their keys' hashes miss the index, and the
            // keys are never built.
            let hit = if row_key_hashes(&row, layout.id_column, layout.email_column)
                .into_iter()
                .flatten()
                .any(|hash| lookup.index.contains_key(&hash))
            {
                lookup
                    .find(row_keys(&row, layout.id_column, layout.email_column))
                    .map_err(MergeError::Spool)?
            } else {
                None
            };
            // Rows of the old header's width get blanks for the new columns; a
            // malformed row is copied as it was.
            let width = if row.len() == layout.old_width {
                layout.columns.len()
            } else {
                row.len()
            };
            let Some(Found {
                offset,
                change,
                superseded,
            }) = hit
            else {
                counts.kept += 1;
                if width == row.len() {
                    writer.write_byte_record(&row).map_err(MergeError::Write)?;
                } else {
                    for field in row.iter() {
                        writer.write_field(field).map_err(MergeError::Write)?;
                    }
                    for _ in row.len()..width {
                        writer.write_field(b"").map_err(MergeError::Write)?;
                    }
                    writer
                        .write_record(None::<&[u8]>)
                        .map_err(MergeError::Write)?;
                }
                continue;
            };
            consumed.extend(superseded);
            if !consumed.insert(offset) {
                // A second row with the key of a change already written: a duplicate.
                counts.replaced += 1;
                continue;
            }
            out.clear();
            out.extend(row.iter().map(<[u8]>::to_vec));
            out.resize(width, Vec::new());
            match change.contact {
                Some(contact) => {
                    render(&mut out, &layout.columns, &contact);
                    counts.replaced += 1;
                }
                None => {
                    counts.removed += 1;
                    match (self.config.removal, layout.status_column) {
                        (RemovalMode::Mark, Some(status)) if status < out.len() => {
                            out[status] = ContactStatus::Inactive.as_str().as_bytes().to_vec();
                        }
                        _ => continue,
                    }
                }
            }
            writer.write_record(&out).map_err(MergeError::Write)?;
        }
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

/// The text of a row's cell, trimmed; `None` when the column is absent, blank or not
/// UTF-8.
fn cell(row: &csv::ByteRecord, column: Option<usize>) -> Option<&str> {
    column
        .and_then(|c| row.get(c))
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// The row's possible keys: by external id and by email, so that a change keyed either
/// way finds it. Normalised as [`Contact::set`] does, without building a contact.
fn row_keys(
    row: &csv::ByteRecord,
    id_column: Option<usize>,
    email_column: Option<usize>,
) -> [Option<ContactKey>; 2] {
    let by_id = cell(row, id_column).map(|v| ContactKey::ExternalId(v.to_string()));
    let by_email = cell(row, email_column)
        .and_then(Contact::normalize_email)
        .map(ContactKey::Email);
    [by_id, by_email]
}

/// The hashes of [`row_keys`], computed without building the keys (only a domain with
/// upper case letters, rare, is lower-cased in a copy).
fn row_key_hashes(
    row: &csv::ByteRecord,
    id_column: Option<usize>,
    email_column: Option<usize>,
) -> [Option<u64>; 2] {
    let by_id = cell(row, id_column).map(ContactKey::external_id_hash);
    let by_email = cell(row, email_column)
        .and_then(Contact::normalized_email)
        .map(|email| ContactKey::email_hash(&email));
    [by_id, by_email]
}

/// The file's writer: buffered, hashing what it writes (the fingerprint).
type RowWriter<'f> = csv::Writer<BufWriter<HashingWriter<&'f File>>>;

/// The columns of the file a run writes.
struct Layout {
    /// The header row.
    headers: Vec<String>,
    /// The field of each column (`None`: a column no field maps to, kept as it is).
    columns: Vec<Option<Field>>,
    /// Columns in the existing file's header.
    old_width: usize,
    id_column: Option<usize>,
    email_column: Option<usize>,
    status_column: Option<usize>,
}

/// What a merge did, for the log.
#[derive(Debug, Default)]
struct MergeCounts {
    kept: u64,
    replaced: u64,
    removed: u64,
    appended: u64,
}

/// Why a merge stopped: reading the file, writing the temporary file, or the spool.
enum MergeError {
    Read(csv::Error),
    Write(csv::Error),
    Spool(ConnectorError),
}

impl MergeError {
    /// The error, naming the file (`path`) or the temporary file (`temp`).
    fn at(self, path: &Path, temp: &Path) -> ConnectorError {
        match self {
            MergeError::Read(e) => csv_error(path, e),
            MergeError::Write(e) => csv_error(temp, e),
            MergeError::Spool(e) => e,
        }
    }
}

/// Appends the changes of people not in the file: creates, and updates (an update is
/// an upsert too). Removals of people not in the file have nothing to remove.
fn append_rest(
    spool: &File,
    written: u64,
    consumed: &HashSet<u64>,
    lookup: &ChangeLookup<'_>,
    writer: &mut RowWriter<'_>,
    layout: &Layout,
    counts: &mut MergeCounts,
) -> Result<(), MergeError> {
    let spooled = |e: std::io::Error| MergeError::Spool(spool_error(e));
    let mut offset = 0u64;
    let mut body = Vec::new();
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(layout.columns.len());
    let mut frames = BufReader::with_capacity(1 << 20, spool);
    while offset < written {
        let mut length = [0u8; 4];
        frames.read_exact(&mut length).map_err(spooled)?;
        let length = u32::from_le_bytes(length) as usize;
        let this = offset;
        offset += 4 + length as u64;
        if consumed.contains(&this) {
            frames.seek_relative(length as i64).map_err(spooled)?;
            continue;
        }
        body.resize(length, 0);
        frames.read_exact(&mut body).map_err(spooled)?;
        let change = unframe_change(&body).map_err(MergeError::Spool)?;
        if lookup.has_collisions(&change.key)
            && lookup
                .latest(&change.key)
                .map_err(MergeError::Spool)?
                .is_some_and(|latest| latest.offset != this)
        {
            continue; // superseded by a later change of the same key
        }
        if let Some(contact) = change.contact {
            out.clear();
            out.resize(layout.columns.len(), Vec::new());
            render(&mut out, &layout.columns, &contact);
            writer.write_record(&out).map_err(MergeError::Write)?;
            counts.appended += 1;
        }
    }
    Ok(())
}

/// Finds a key's change in the spool: the index narrows it to offsets, and the lines
/// read back there (positioned reads, which leave the spool's own cursor alone) confirm
/// the exact key. Should a key come more than once, the latest change wins.
struct ChangeLookup<'a> {
    spool: &'a File,
    index: &'a HashMap<u64, u64, BuildNoHashHasher<u64>>,
    collisions: &'a HashMap<u64, Vec<u64>>,
}

/// A key's latest change, and the offsets of the earlier changes it supersedes.
struct Found {
    offset: u64,
    change: SpooledChange,
    superseded: Vec<u64>,
}

impl ChangeLookup<'_> {
    /// The latest change of the first of `keys` that has one.
    fn find(&self, keys: [Option<ContactKey>; 2]) -> Result<Option<Found>, ConnectorError> {
        for key in keys.into_iter().flatten() {
            if let Some(found) = self.latest(&key)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    fn latest(&self, key: &ContactKey) -> Result<Option<Found>, ConnectorError> {
        let hash = key.hash64();
        let Some(first) = self.index.get(&hash) else {
            return Ok(None);
        };
        let mut found: Option<Found> = None;
        let others = self.collisions.get(&hash).into_iter().flatten();
        for &offset in std::iter::once(first).chain(others) {
            let change = self.read(offset)?;
            if &change.key != key {
                continue;
            }
            found = Some(match found {
                None => Found {
                    offset,
                    change,
                    superseded: Vec::new(),
                },
                Some(mut earlier) => {
                    earlier.superseded.push(earlier.offset);
                    Found {
                        offset,
                        change,
                        superseded: earlier.superseded,
                    }
                }
            });
        }
        Ok(found)
    }

    /// Whether `key` appears more than once in the spool (rare: only on a hash collision
    /// or a key sent twice).
    fn has_collisions(&self, key: &ContactKey) -> bool {
        self.collisions.contains_key(&key.hash64())
    }

    fn read(&self, offset: u64) -> Result<SpooledChange, ConnectorError> {
        use std::os::unix::fs::FileExt;
        let mut length = [0u8; 4];
        self.spool
            .read_exact_at(&mut length, offset)
            .map_err(spool_error)?;
        let mut body = vec![0; u32::from_le_bytes(length) as usize];
        self.spool
            .read_exact_at(&mut body, offset + 4)
            .map_err(spool_error)?;
        unframe_change(&body)
    }
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

/// Decides how far the file can be trusted, given how many people the state says it
/// holds and the fingerprint recorded when it was last written.
fn judge_file(
    format: &crate::config::CsvFormat,
    synced: u64,
    stored: Option<&Fingerprint>,
) -> Result<(FileTrust, SinkIntegrity), ConnectorError> {
    let path = &format.path;
    let name = &format.display_name;
    let meta = match std::fs::metadata(path) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ConnectorError::io(path, e)),
    };
    let rebuild = |reason: String| Ok((FileTrust::Rebuild, SinkIntegrity::Rebuild { reason }));
    match (synced, meta) {
        (0, None) => Ok((FileTrust::Trusted, SinkIntegrity::Intact)),
        (0, Some(_)) => {
            let rows = match open_csv(format, LineEnds::Any, u64::MAX)? {
                Some((mut reader, Some(_))) => {
                    let mut record = csv::ByteRecord::new();
                    let mut rows = 0u64;
                    while reader
                        .read_byte_record(&mut record)
                        .map_err(|e| csv_error(path, e))?
                    {
                        rows += 1;
                    }
                    rows
                }
                _ => 0,
            };
            if rows == 0 {
                Ok((FileTrust::Trusted, SinkIntegrity::Intact))
            } else {
                Ok((
                    FileTrust::Foreign,
                    SinkIntegrity::Foreign {
                        reason: format!(
                            "{name} already holds {rows} rows that this state has never synced"
                        ),
                    },
                ))
            }
        }
        (_, None) => rebuild(format!("{name} is missing")),
        (_, Some(meta)) => match stored {
            // Written by a contactsync that kept no fingerprint: trusted this once.
            None => Ok((FileTrust::Trusted, SinkIntegrity::Intact)),
            Some(fp) if fp.size == meta.len() && fp.modified_ns == modified_ns(&meta) => {
                Ok((FileTrust::Trusted, SinkIntegrity::Intact))
            }
            Some(fp) => {
                let hash = hash_file(path).map_err(|e| ConnectorError::io(path, e))?;
                if hash == fp.hash {
                    Ok((FileTrust::Trusted, SinkIntegrity::Intact))
                } else {
                    rebuild(format!(
                        "{name} was changed outside contactsync since the last run"
                    ))
                }
            }
        },
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
            addresses_by_email: false,
            mixes_removals: false,
            max_batch: 10_000,
            asynchronous_jobs: false,
            durable_at_finish: true,
            removal: match self.config.removal {
                RemovalMode::Drop => RemovalStyle::Delete,
                RemovalMode::Mark => RemovalStyle::MarkInactive,
            },
        }
    }

    fn files(&self) -> Vec<PathBuf> {
        vec![self.config.format.path.clone()]
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
            let key = change.key();
            if let Some(contact) = change.contact() {
                run.attributes.extend(contact.attributes.keys().cloned());
            }
            let frame = frame_change(key, change.contact())?;
            run.spool.write_all(&frame).map_err(spool_error)?;
            let offset = run.written;
            run.written += frame.len() as u64;
            match run.index.entry(key.hash64()) {
                std::collections::hash_map::Entry::Occupied(e) => {
                    run.collisions.entry(*e.key()).or_default().push(offset)
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(offset);
                }
            }
            outcomes.push(Outcome::applied());
        }
        Ok(outcomes)
    }

    /// Merges the run's changes into the file (or writes it anew when it could not be
    /// trusted), replaces it atomically, and records its fingerprint.
    async fn finish(&mut self, ctx: &mut SinkContext<'_>) -> Result<(), ConnectorError> {
        if self.writing.is_none() {
            self.start_finish()?;
        }
        let Some(writing) = self.writing.take() else {
            return Ok(());
        };
        let written = writing
            .await
            .map_err(|e| ConnectorError::Other(format!("CSV sink finish failed: {e}")))??;
        let MergeCounts {
            kept,
            replaced,
            removed,
            appended,
        } = written.counts;
        if self.trust == FileTrust::Foreign {
            self.unknown_in_sink = Some(kept);
        }
        let fingerprint = serde_json::to_string(&written.fingerprint)
            .map_err(|e| ConnectorError::Other(format!("CSV sink fingerprint: {e}")))?;
        ctx.store.put(&self.fingerprint_key(), &fingerprint)?;
        // Said once the sink's work is all done: after the state's confirm when the
        // engine held it meanwhile (all but a SQLite state's largest runs), so that a
        // run killed after this line has nothing left to do.
        tracing::info!(
            file = %self.config.format.path.display(), kept, replaced, removed, appended,
            rebuilt = self.trust == FileTrust::Rebuild,
            "CSV file written"
        );
        Ok(())
    }

    /// Writes, syncs and renames the file on a blocking thread, which `finish` waits
    /// for.
    fn start_finish(&mut self) -> Result<Option<FinishStarted>, ConnectorError> {
        let Some(run) = self.run.take() else {
            return Ok(None);
        };
        let sink = CsvSink {
            config: self.config.clone(),
            run: None,
            trust: self.trust,
            unknown_in_sink: None,
            writing: None,
        };
        let (ended, started) = FinishStarted::channel();
        self.writing = Some(tokio::task::spawn_blocking(move || {
            let written = sink.write_file(run);
            let _ = ended.send(written.is_ok());
            written
        }));
        Ok(Some(started))
    }

    /// Whether the file is still what this sink last wrote (see [`FileTrust`]).
    async fn verify(
        &mut self,
        synced: u64,
        ctx: &mut SinkContext<'_>,
    ) -> Result<SinkIntegrity, ConnectorError> {
        let stored: Option<Fingerprint> = ctx
            .store
            .get(&self.fingerprint_key())?
            .and_then(|text| serde_json::from_str(&text).ok());
        let format = self.config.format.clone();
        let (trust, integrity) =
            tokio::task::spawn_blocking(move || judge_file(&format, synced, stored.as_ref()))
                .await
                .map_err(|e| ConnectorError::Other(format!("CSV sink check failed: {e}")))??;
        self.trust = trust;
        Ok(integrity)
    }

    fn summary(&self) -> SinkSummary {
        SinkSummary {
            unknown_in_sink: self.unknown_in_sink,
            ..SinkSummary::default()
        }
    }
}

/// Removes the temporary files an earlier write of `file_name` left in `dir` when its
/// process was killed (`.{file_name}.XXXXXX.tmp`, as large as the file): this run holds
/// the sink section's lock, so no other write of that file is under way.
fn remove_leftover_temps(dir: &Path, file_name: &str) {
    let prefix = format!(".{file_name}.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let leftover = name.starts_with(&prefix)
            && name.ends_with(".tmp")
            && name.len() > prefix.len() + ".tmp".len()
            && entry.file_type().is_ok_and(|t| t.is_file());
        if leftover {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(file = %entry.path().display(), "removed a temporary file an interrupted run left")
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), "cannot remove a temporary file an interrupted run left: {e}")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_interrupted_writes_temporary_files_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            ".synced.csv.AbC123.tmp",
            ".synced.csv.x.tmp",
            ".other.csv.AbC123.tmp",
            "synced.csv",
            ".synced.csv..tmp",
        ] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        remove_leftover_temps(dir.path(), "synced.csv");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [".other.csv.AbC123.tmp", ".synced.csv..tmp", "synced.csv"]
        );
    }

    use super::*;

    /// The shortcut that skips unchanged rows must hash a row's keys exactly as the
    /// keys themselves hash, or a changed row would be copied as it was.
    #[test]
    fn row_key_hashes_are_the_hashes_of_row_keys() {
        for (id, email) in [
            ("E1", "ann@example.com"),
            (" E2 ", " Bob@Example.COM "),
            ("", "carl@EXAMPLE.org"),
            ("E4", ""),
            ("  ", "dee@exämple.ORG"),
            ("E6", "no-at-sign"),
        ] {
            let row = csv::ByteRecord::from(vec![id, "x", email]);
            let keys = row_keys(&row, Some(0), Some(2));
            let expected = keys.map(|k| k.map(|k| k.hash64()));
            assert_eq!(
                row_key_hashes(&row, Some(0), Some(2)),
                expected,
                "{id:?} {email:?}"
            );
            assert_eq!(row_key_hashes(&row, None, None), [None, None]);
        }
    }
}
