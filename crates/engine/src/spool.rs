//! The run's change set, spooled to a temporary file between the diff and the apply.
//!
//! The whole change set must be known before anything is applied: the removal guard
//! needs the number of removals, a dry run prints the plan, and some sinks choose
//! between one-by-one calls and a bulk import by its size. Holding it in memory would
//! break the memory bound on a first sync of a million people, so it goes to disk and
//! is read back batch by batch.
//!
//! The format is the run's own, never read by another version: a length-prefixed
//! `postcard` frame a change, the contacts in the state's compact record form
//! (`contactsync_state::record`) and the origin as [`OriginFrame`] (the public [`Origin`] is
//! internally tagged for its JSON form, which postcard cannot read back). A JSON line
//! a change cost a first sync of a million people seconds of formatting and parsing.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use contactsync_core::{Change, ContactKey, Origin, SyncedEntry};
use serde::{Deserialize, Serialize};

/// One spooled change. The records' bytes follow it, the contact's then the previous
/// one's, their lengths in it: postcard writes a byte vector a byte at a time, which
/// cost a first sync of a million people about a second in the CSV sink's spool.
#[derive(Serialize, Deserialize)]
struct Frame {
    /// 0 create, 1 update, 2 remove.
    kind: u8,
    key: String,
    origin: OriginFrame,
    /// The length of the contact's record.
    contact: Option<u32>,
    /// The contact's `updated_at`, in microseconds since the epoch (not in the record).
    updated_at: Option<i64>,
    previous: Option<Previous>,
}

#[derive(Serialize, Deserialize)]
struct Previous {
    content_hash: u64,
    email: Option<String>,
    handle: Option<String>,
    /// The length of its record.
    record: Option<u32>,
}

/// A record's bytes, their length checked for a frame.
fn record_bytes(contact: &contactsync_core::Contact) -> std::io::Result<(Vec<u8>, u32)> {
    let bytes = contactsync_state::record::encode(contact);
    let length = u32::try_from(bytes.len()).map_err(invalid)?;
    Ok((bytes, length))
}

/// [`Origin`] in an externally tagged form, which postcard can frame.
#[derive(Serialize, Deserialize)]
enum OriginFrame {
    Line { file: String, line: u64 },
    Entry { dn: String },
    Page { call: String, page: u64, index: u64 },
    Record { system: String, id: String },
    Derived,
}

impl From<&Origin> for OriginFrame {
    fn from(origin: &Origin) -> Self {
        match origin.clone() {
            Origin::Line { file, line } => OriginFrame::Line { file, line },
            Origin::Entry { dn } => OriginFrame::Entry { dn },
            Origin::Page { call, page, index } => OriginFrame::Page { call, page, index },
            Origin::Record { system, id } => OriginFrame::Record { system, id },
            Origin::Derived => OriginFrame::Derived,
        }
    }
}

impl From<OriginFrame> for Origin {
    fn from(frame: OriginFrame) -> Self {
        match frame {
            OriginFrame::Line { file, line } => Origin::Line { file, line },
            OriginFrame::Entry { dn } => Origin::Entry { dn },
            OriginFrame::Page { call, page, index } => Origin::Page { call, page, index },
            OriginFrame::Record { system, id } => Origin::Record { system, id },
            OriginFrame::Derived => Origin::Derived,
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// `change` as a frame, and the bytes of its records that follow it.
fn frame(change: &Change) -> std::io::Result<(Frame, Vec<u8>)> {
    let (kind, contact) = match change {
        Change::Create { contact, .. } => (0, Some(contact)),
        Change::Update { contact, .. } => (1, Some(contact)),
        Change::Remove { .. } => (2, None),
    };
    let contact = contact.map(record_bytes).transpose()?;
    let before = change
        .previous()
        .and_then(|p| p.record.as_deref())
        .map(record_bytes)
        .transpose()?;
    let frame = Frame {
        kind,
        key: change.key().to_string(),
        origin: change.origin().into(),
        contact: contact.as_ref().map(|(_, length)| *length),
        updated_at: change
            .contact()
            .and_then(|c| c.updated_at)
            .map(|t| t.timestamp_micros()),
        previous: change.previous().map(|p| Previous {
            content_hash: p.content_hash,
            email: p.email.clone(),
            handle: p.handle.clone(),
            record: before.as_ref().map(|(_, length)| *length),
        }),
    };
    let mut records = contact.map(|(bytes, _)| bytes).unwrap_or_default();
    if let Some((bytes, _)) = before {
        records.extend_from_slice(&bytes);
    }
    Ok((frame, records))
}

/// The change a frame and its records' bytes (`records`) hold.
fn unframe(frame: Frame, records: &[u8]) -> std::io::Result<Change> {
    let key: ContactKey = frame.key.parse().map_err(invalid)?;
    let origin = Origin::from(frame.origin);
    let cut = || invalid("a spooled change's records are cut short");
    let contact_length = frame.contact.unwrap_or_default() as usize;
    let (contact_bytes, before_bytes) = records.split_at_checked(contact_length).ok_or_else(cut)?;
    let contact = frame
        .contact
        .map(|_| contactsync_state::record::decode(contact_bytes).map_err(invalid))
        .transpose()?
        .map(|mut c| {
            c.updated_at = frame
                .updated_at
                .and_then(chrono::DateTime::from_timestamp_micros);
            c
        });
    let previous = frame
        .previous
        .map(|p| -> std::io::Result<SyncedEntry> {
            Ok(SyncedEntry {
                content_hash: p.content_hash,
                email: p.email,
                handle: p.handle,
                record: p
                    .record
                    .map(|length| {
                        let bytes = before_bytes.get(..length as usize).ok_or_else(cut)?;
                        contactsync_state::record::decode(bytes).map_err(invalid)
                    })
                    .transpose()?
                    .map(Box::new),
            })
        })
        .transpose()?;
    let missing = || invalid("a spooled change lost its contact or its previous entry");
    Ok(match frame.kind {
        0 => Change::Create {
            key,
            contact: contact.ok_or_else(missing)?,
            origin,
        },
        1 => Change::Update {
            key,
            contact: contact.ok_or_else(missing)?,
            origin,
            previous: previous.ok_or_else(missing)?,
        },
        _ => Change::Remove {
            key,
            previous: previous.ok_or_else(missing)?,
            origin,
        },
    })
}

/// Spooled changes.
pub(crate) struct ChangeSpool {
    writer: BufWriter<File>,
    len: u64,
    buf: Vec<u8>,
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
            buf: Vec::new(),
        })
    }

    pub(crate) fn push(&mut self, change: &Change) -> std::io::Result<()> {
        self.buf.clear();
        let (frame, records) = frame(change)?;
        let mut bytes =
            postcard::to_extend(&frame, std::mem::take(&mut self.buf)).map_err(invalid)?;
        bytes.extend_from_slice(&records);
        let len = u32::try_from(bytes.len()).map_err(invalid)?;
        self.writer.write_all(&len.to_le_bytes())?;
        self.writer.write_all(&bytes)?;
        self.buf = bytes;
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
            frames: BufReader::with_capacity(1 << 20, file),
            buf: Vec::new(),
            left: self.len,
        })
    }
}

pub(crate) struct SpoolReader {
    frames: BufReader<File>,
    buf: Vec<u8>,
    left: u64,
}

impl SpoolReader {
    /// Up to `n` changes; empty at the end.
    pub(crate) fn next_batch(&mut self, n: usize) -> std::io::Result<Vec<Change>> {
        let mut batch = Vec::with_capacity(n.min(4096));
        while batch.len() < n && self.left > 0 {
            let mut len = [0u8; 4];
            self.frames.read_exact(&mut len)?;
            self.buf.resize(u32::from_le_bytes(len) as usize, 0);
            self.frames.read_exact(&mut self.buf)?;
            let (frame, records): (Frame, &[u8]) =
                postcard::take_from_bytes(&self.buf).map_err(invalid)?;
            batch.push(unframe(frame, records)?);
            self.left -= 1;
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contactsync_core::Contact;

    #[test]
    fn every_kind_of_change_reads_back_as_written() {
        let ann = Contact {
            external_id: Some("E1".into()),
            email: Some("ann@example.com".into()),
            first_name: Some("Ann".into()),
            updated_at: chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456),
            ..Contact::default()
        };
        let previous = SyncedEntry {
            content_hash: 42,
            email: Some("old@example.com".into()),
            handle: Some("h-7".into()),
            // As the state keeps it: without `updated_at`.
            record: Some(Box::new(Contact {
                updated_at: None,
                ..ann.clone()
            })),
        };
        let key = ContactKey::ExternalId("E1".into());
        let changes = vec![
            Change::Create {
                key: key.clone(),
                contact: ann.clone(),
                origin: Origin::line("people.csv", 2),
            },
            Change::Update {
                key: key.clone(),
                contact: ann.clone(),
                origin: Origin::Derived,
                previous: previous.clone(),
            },
            Change::Remove {
                key: key.clone(),
                previous: SyncedEntry {
                    record: None,
                    ..previous.clone()
                },
                origin: Origin::Derived,
            },
            Change::Create {
                key: key.clone(),
                contact: ann.clone(),
                origin: Origin::Entry {
                    dn: "uid=ann,ou=people,dc=example,dc=com".into(),
                },
            },
            Change::Create {
                key: key.clone(),
                contact: ann.clone(),
                origin: Origin::Page {
                    call: "GET /subscribers".into(),
                    page: 3,
                    index: 7,
                },
            },
            Change::Remove {
                key,
                previous,
                origin: Origin::Record {
                    system: "businesscatalyst".into(),
                    id: "88".into(),
                },
            },
        ];
        let mut spool = ChangeSpool::create(None).unwrap();
        for c in &changes {
            spool.push(c).unwrap();
        }
        assert_eq!(spool.len(), 6);
        let mut reader = spool.into_reader().unwrap();
        let mut back = reader.next_batch(2).unwrap();
        back.extend(reader.next_batch(10).unwrap());
        assert!(reader.next_batch(10).unwrap().is_empty());
        assert_eq!(back, changes);
    }
}
