//! The run's change set, spooled to a temporary file between the diff and the apply.
//!
//! The whole change set must be known before anything is applied: the removal guard
//! needs the number of removals, a dry run prints the plan, and some sinks choose
//! between one-by-one calls and a bulk import by its size. Holding it in memory would
//! break the memory bound on a first sync of a million people, so it goes to disk, one
//! JSON line a change, and is read back batch by batch.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use contactsync_core::Change;

/// Spooled changes.
pub(crate) struct ChangeSpool {
    writer: BufWriter<File>,
    len: u64,
}

impl ChangeSpool {
    /// A spool in `dir` (the system's temp dir when `None`); the file is deleted when
    /// the spool is dropped, or by the OS if the process dies.
    pub(crate) fn create(dir: Option<&Path>) -> std::io::Result<Self> {
        let file = match dir {
            Some(dir) => tempfile::tempfile_in(dir)?,
            None => tempfile::tempfile()?,
        };
        Ok(ChangeSpool {
            writer: BufWriter::with_capacity(1 << 20, file),
            len: 0,
        })
    }

    pub(crate) fn push(&mut self, change: &Change) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.writer, change)?;
        self.writer.write_all(b"\n")?;
        self.len += 1;
        Ok(())
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Reads the changes back, in the order pushed.
    pub(crate) fn into_reader(self) -> std::io::Result<SpoolReader> {
        let mut file = self.writer.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(0))?;
        Ok(SpoolReader {
            lines: BufReader::with_capacity(1 << 20, file),
            buf: String::new(),
        })
    }
}

pub(crate) struct SpoolReader {
    lines: BufReader<File>,
    buf: String,
}

impl SpoolReader {
    /// Up to `n` changes; empty at the end.
    pub(crate) fn next_batch(&mut self, n: usize) -> std::io::Result<Vec<Change>> {
        let mut batch = Vec::with_capacity(n.min(4096));
        while batch.len() < n {
            self.buf.clear();
            if self.lines.read_line(&mut self.buf)? == 0 {
                break;
            }
            let change = serde_json::from_str(&self.buf)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            batch.push(change);
        }
        Ok(batch)
    }
}
