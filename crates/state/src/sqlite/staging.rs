//! The batches a sink durable at its finish took whole, until its finish made them
//! durable ([`PendingJournal::record_awaiting_finish`]).
//!
//! They never touch the database file until the confirm: a thread of their own encodes
//! each row and writes it, framed, into [`BUCKETS`] buckets by the top bits of its key
//! hash, each buffered and appended in chunks to an anonymous temporary file (a crash
//! leaves nothing of them). The confirm reads one bucket at a time in a few large
//! reads, sorts it by key hash in memory, and inserts its rows into `synced` in that
//! order, so that its b-tree is appended to; another thread prepares the next bucket
//! meanwhile, compressing its records with the dictionary the state trained on a
//! sample of the whole run (a first sync is staged while it is read, and a dictionary
//! trained on its first batch, of a file sorted by id, made its records a third larger).
//!
//! Before, the rows went into a temporary table and `synced` took them with one `INSERT
//! … SELECT … ORDER BY`: on a 1M first sync the inserts into the table took 1.1 s of the
//! run's own thread, and the confirm's sort and copy 2.3 s. (Reading each row back
//! where it lay, in key order, cost two positioned reads a row: 1.4 s.)
//!
//! [`PendingJournal::record_awaiting_finish`]: crate::PendingJournal::record_awaiting_finish

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use contactsync_core::ChangeKind;
use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::{compact, to_sql, PendingRow, SYNCED_UPSERT};
use crate::record::RecordCodec;

/// Batches handed to the staging thread and not yet written: enough to keep it busy
/// while the run prepares the next, few enough to bound the memory they hold.
const QUEUED_BATCHES: usize = 2;

/// A batch for the staging thread.
struct StagedBatch {
    rows: Vec<PendingRow>,
    handles: Vec<Option<String>>,
    /// The run the batch's creates are kept under as one entry, if any.
    created_run: Option<i64>,
}

/// How many buckets the staged rows are spread over by key hash: a bucket is read
/// whole by the confirm, a 64th of the rows (some 20 MB of a 10M first sync).
const BUCKETS: usize = 64;

/// The bytes a bucket gathers before they are appended to the file as one chunk.
const CHUNK_BYTES: usize = 64 * 1024;

/// One staged row as its frame holds it (after its key hash and length): `synced`'s
/// columns but the key hash and the record, whose bytes follow it to the frame's end
/// (postcard writes a byte vector a byte at a time: a first sync's million records
/// took 0.3 s that way, and as long again to read back).
#[derive(Serialize, Deserialize)]
struct StagedFrame {
    removal: bool,
    content_hash: i64,
    /// Whether the record follows.
    record: bool,
    key: Option<String>,
    email: Option<String>,
    handle: Option<String>,
    created_run: Option<i64>,
    email_hash: Option<i64>,
}

/// What the staging thread wrote: each bucket's chunks (offset and length in the
/// file), in the order they were written.
struct StagedFile {
    file: File,
    chunks: Vec<Vec<(u64, usize)>>,
    rows: usize,
}

/// The bucket of a key hash as `synced` orders it (as a signed integer).
fn bucket_of(key_hash: i64) -> usize {
    ((key_hash as u64 ^ (1 << 63)) >> (64 - BUCKETS.trailing_zeros())) as usize
}

/// Writes frames into their buckets.
struct BucketWriter {
    file: File,
    end: u64,
    open: Vec<Vec<u8>>,
    chunks: Vec<Vec<(u64, usize)>>,
    rows: usize,
}

impl BucketWriter {
    fn new(file: File) -> BucketWriter {
        BucketWriter {
            file,
            end: 0,
            open: vec![Vec::new(); BUCKETS],
            chunks: vec![Vec::new(); BUCKETS],
            rows: 0,
        }
    }

    /// Appends one row's frame: its key hash, the body's length, the body (the frame,
    /// then the record).
    fn push(
        &mut self,
        key_hash: i64,
        frame: &StagedFrame,
        record: Option<&[u8]>,
    ) -> std::io::Result<()> {
        let bucket = bucket_of(key_hash);
        let open = &mut self.open[bucket];
        open.extend_from_slice(&key_hash.to_le_bytes());
        let at = open.len();
        open.extend_from_slice(&[0; 4]);
        let taken = std::mem::take(open);
        let mut out = postcard::to_extend(frame, taken).map_err(std::io::Error::other)?;
        out.extend_from_slice(record.unwrap_or_default());
        let length = u32::try_from(out.len() - at - 4)
            .map_err(|_| std::io::Error::other("a record too large to stage"))?;
        out[at..at + 4].copy_from_slice(&length.to_le_bytes());
        self.open[bucket] = out;
        self.rows += 1;
        if self.open[bucket].len() >= CHUNK_BYTES {
            self.flush(bucket)?;
        }
        Ok(())
    }

    fn flush(&mut self, bucket: usize) -> std::io::Result<()> {
        let open = &mut self.open[bucket];
        if open.is_empty() {
            return Ok(());
        }
        self.file.write_all(open)?;
        self.chunks[bucket].push((self.end, open.len()));
        self.end += open.len() as u64;
        open.clear();
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<StagedFile> {
        for bucket in 0..BUCKETS {
            self.flush(bucket)?;
        }
        Ok(StagedFile {
            file: self.file,
            chunks: self.chunks,
            rows: self.rows,
        })
    }
}

/// The rows one run of a pipeline staged.
pub(super) struct StagedRun {
    run: i64,
    state: Staging,
}

enum Staging {
    Writing {
        batches: SyncSender<StagedBatch>,
        thread: JoinHandle<std::io::Result<StagedFile>>,
    },
    /// Written: a confirm too large to hold left them for the confirm after the
    /// sink's finish.
    Written(StagedFile),
    /// The thread failed.
    Stopped,
}

fn thread_stopped() -> std::io::Error {
    std::io::Error::other("the thread staging records stopped")
}

impl StagedRun {
    /// Starts staging `run`'s rows into a temporary file in `dir`.
    pub(super) fn start(run: i64, dir: &Path) -> std::io::Result<StagedRun> {
        let file = tempfile::tempfile_in(dir)?;
        let (batches, received) = sync_channel::<StagedBatch>(QUEUED_BATCHES);
        let thread = std::thread::Builder::new()
            .name("state-staging".into())
            .spawn(move || {
                let mut out = BucketWriter::new(file);
                for batch in received {
                    for (row, handle) in batch.rows.into_iter().zip(batch.handles) {
                        let key_hash = row.key.hash64();
                        let record = row.record.as_ref();
                        // Compressed by the confirm, with a dictionary trained on the
                        // whole run's records (a first sync is staged as it is read).
                        let encoded = record.map(crate::record::encode);
                        let staged = StagedFrame {
                            removal: row.kind == ChangeKind::Remove,
                            content_hash: to_sql(row.content_hash),
                            record: encoded.is_some(),
                            key: compact::key(&row.key, record),
                            email: compact::email(row.email.as_deref(), record),
                            handle,
                            created_run: batch
                                .created_run
                                .filter(|_| row.kind == ChangeKind::Create),
                            email_hash: compact::email_hash(key_hash, row.email.as_deref(), record),
                        };
                        out.push(to_sql(key_hash), &staged, encoded.as_deref())?;
                    }
                }
                out.finish()
            })?;
        Ok(StagedRun {
            run,
            state: Staging::Writing { batches, thread },
        })
    }

    /// The run whose rows these are.
    pub(super) fn run(&self) -> i64 {
        self.run
    }

    /// Hands a batch to the staging thread.
    pub(super) fn push(
        &mut self,
        rows: Vec<PendingRow>,
        handles: Vec<Option<String>>,
        created_run: Option<i64>,
    ) -> std::io::Result<()> {
        let Staging::Writing { batches, .. } = &self.state else {
            return Err(thread_stopped());
        };
        let batch = StagedBatch {
            rows,
            handles,
            created_run,
        };
        if batches.send(batch).is_ok() {
            return Ok(());
        }
        // The thread stopped at an error: its own says why.
        match self.written() {
            Ok(_) => Err(thread_stopped()),
            Err(e) => Err(e),
        }
    }

    /// Waits for the thread to write every row.
    fn written(&mut self) -> std::io::Result<&StagedFile> {
        self.state = match std::mem::replace(&mut self.state, Staging::Stopped) {
            Staging::Writing { batches, thread } => {
                drop(batches);
                // Stopped, if the thread failed: its error is told once, here.
                Staging::Written(thread.join().map_err(|_| thread_stopped())??)
            }
            other => other,
        };
        match &self.state {
            Staging::Written(file) => Ok(file),
            _ => Err(thread_stopped()),
        }
    }

    /// How many rows were staged, once all are written.
    pub(super) fn rows(&mut self) -> std::io::Result<usize> {
        Ok(self.written()?.rows)
    }

    /// Moves the staged rows whose key hashes lie in `from..=to` into `synced` (removals
    /// out of it), in key-hash order (rows of one key in the order they came); returns
    /// how many.
    pub(super) fn confirm_range(
        &mut self,
        tx: &rusqlite::Connection,
        codec: &mut RecordCodec,
        pipeline: i64,
        from: i64,
        to: i64,
    ) -> Result<u64, ConfirmError> {
        let staged = self.written().map_err(ConfirmError::Staging)?;
        let mut upsert = tx.prepare_cached(&format!(
            "INSERT INTO synced (pipeline, key_hash, content_hash, record, key, email, handle, created_run, email_hash)
               VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             {SYNCED_UPSERT}"
        ))?;
        let mut forget =
            tx.prepare_cached("DELETE FROM synced WHERE pipeline = ?1 AND key_hash = ?2")?;
        // A thread reads, sorts and compresses the next bucket while this one's rows
        // are inserted: compressing a first sync's million records here took 1.5 s
        // more of the confirm.
        let mut writer = codec.writer();
        std::thread::scope(|scope| {
            let (send, prepared) = sync_channel::<std::io::Result<Vec<ConfirmedRow>>>(1);
            scope.spawn(move || {
                let mut bytes = Vec::new();
                let mut frames = Vec::new();
                for bucket in bucket_of(from)..=bucket_of(to) {
                    let rows = prepare_bucket(
                        staged,
                        bucket,
                        (from, to),
                        &mut writer,
                        &mut bytes,
                        &mut frames,
                    );
                    let failed = rows.is_err();
                    if send.send(rows).is_err() || failed {
                        return; // the inserting side stopped, or this one did
                    }
                }
            });
            let mut confirmed = 0;
            for rows in prepared {
                for row in rows.map_err(ConfirmError::Staging)? {
                    let frame = row.frame;
                    if frame.removal {
                        forget.execute(params![pipeline, row.key_hash])?;
                    } else {
                        upsert.execute(params![
                            pipeline,
                            row.key_hash,
                            frame.content_hash,
                            row.record,
                            frame.key,
                            frame.email,
                            frame.handle,
                            frame.created_run,
                            frame.email_hash,
                        ])?;
                    }
                    confirmed += 1;
                }
            }
            Ok(confirmed)
        })
    }
}

/// A staged row ready for `synced`, its record compressed.
struct ConfirmedRow {
    key_hash: i64,
    frame: StagedFrame,
    record: Option<Vec<u8>>,
}

/// The rows of `bucket` whose key hashes lie in `range`, in key-hash order (rows of
/// one key in the order they came), their records compressed with `codec`'s
/// dictionary; `bytes` and `frames` are room reused from bucket to bucket.
fn prepare_bucket(
    staged: &StagedFile,
    bucket: usize,
    (from, to): (i64, i64),
    codec: &mut RecordCodec,
    bytes: &mut Vec<u8>,
    frames: &mut Vec<(i64, (usize, usize))>,
) -> std::io::Result<Vec<ConfirmedRow>> {
    read_bucket(staged, bucket, bytes)?;
    frames.clear();
    index_frames(bytes, frames)?;
    frames.retain(|(hash, _)| (from..=to).contains(hash));
    frames.sort_unstable();
    frames
        .iter()
        .map(|&(key_hash, (start, end))| {
            let (frame, record): (StagedFrame, &[u8]) =
                postcard::take_from_bytes(&bytes[start..end]).map_err(std::io::Error::other)?;
            let record = frame.record.then(|| {
                codec
                    .compress_encoded(record)
                    .unwrap_or_else(|| record.to_vec())
            });
            Ok(ConfirmedRow {
                key_hash,
                frame,
                record,
            })
        })
        .collect()
}

/// Reads a bucket's chunks into `bytes`.
fn read_bucket(staged: &StagedFile, bucket: usize, bytes: &mut Vec<u8>) -> std::io::Result<()> {
    let chunks = &staged.chunks[bucket];
    bytes.clear();
    bytes.resize(chunks.iter().map(|(_, length)| length).sum(), 0);
    let mut at = 0;
    for &(offset, length) in chunks {
        staged
            .file
            .read_exact_at(&mut bytes[at..at + length], offset)?;
        at += length;
    }
    Ok(())
}

/// Each frame of a bucket's bytes: its key hash and where its body lies.
fn index_frames(bytes: &[u8], frames: &mut Vec<(i64, (usize, usize))>) -> std::io::Result<()> {
    let torn = || std::io::Error::other("a staged frame is cut short");
    let mut at = 0;
    while at < bytes.len() {
        let head = bytes.get(at..at + 12).ok_or_else(torn)?;
        let (hash, length) = head.split_at(8);
        let key_hash = i64::from_le_bytes(hash.try_into().map_err(|_| torn())?);
        let length = u32::from_le_bytes(length.try_into().map_err(|_| torn())?) as usize;
        let (start, end) = (at + 12, at + 12 + length);
        if end > bytes.len() {
            return Err(torn());
        }
        frames.push((key_hash, (start, end)));
        at = end;
    }
    Ok(())
}

/// Why a staged range could not be confirmed.
#[derive(Debug)]
pub(super) enum ConfirmError {
    /// Reading the staged rows back.
    Staging(std::io::Error),
    /// Writing them into `synced`.
    Database(rusqlite::Error),
}

impl From<rusqlite::Error> for ConfirmError {
    fn from(e: rusqlite::Error) -> Self {
        ConfirmError::Database(e)
    }
}

/// Where a state's staged rows are written: beside the database file (a first sync of
/// ten million people stages some gigabytes, more than a `/tmp` in memory may hold),
/// or the system's temporary directory for a state with no directory of its own.
pub(super) fn staging_dir(state: &Path) -> std::path::PathBuf {
    match state.parent() {
        Some(dir) if dir.is_dir() => dir.to_path_buf(),
        Some(dir) if dir.as_os_str().is_empty() => std::path::PathBuf::from("."),
        _ => std::env::temp_dir(),
    }
}

impl super::SqliteState {
    /// The rows `pipeline`'s `run` staged, taken for its confirm.
    pub(super) fn take_staged(&mut self, pipeline: &str, run: i64) -> Option<StagedRun> {
        self.staged
            .remove(pipeline)
            .filter(|staged| staged.run() == run)
    }
}
