//! The compact form in which the state keeps the last-sent record of each person.
//!
//! Format 1: a version byte, then the contact's binary body
//! ([`Contact::encode_binary`]: postcard, varint lengths, no field names): about the
//! size of the values themselves, some 60 to 100 bytes for a typical person.
//! `updated_at` is left out, since it is not content. The body's field order is the
//! format: a change to it bumps [`VERSION`].
//!
//! Format 2 ([`RecordCodec`]): the same body compressed by zstd with a dictionary the
//! state trained on its own first records and keeps beside them: a version byte, the
//! dictionary's id and the body's length (postcard varints), then a zstd frame without
//! magic number, checksum or dictionary id. Records this small carry too little
//! repetition of their own for a compressor; what repeats is across people (the domain,
//! the company, the department, the field layout), and that is what the dictionary
//! holds: a 100-byte record takes some 30.

use contactsync_core::Contact;

/// The first byte of every encoded record; a future layout gets another.
const VERSION: u8 = 1;

/// The first byte of a record compressed with a dictionary (format 2).
const COMPRESSED: u8 = 2;

/// The zstd level records are compressed at: level 1 is within a byte of level 3 on
/// records this small, and faster.
const LEVEL: i32 = 1;

/// The size of a trained dictionary: larger ones gained nothing on sample states.
const DICTIONARY_BYTES: usize = 4096;

/// How many records a dictionary is trained on, at the least.
pub const TRAINING_RECORDS: usize = 1000;

/// Compresses and decompresses records with a state's dictionaries (format 2), and
/// reads format 1 as it is. The state stores each dictionary before the first record
/// that uses it, and never changes one, so a record reads back whichever process
/// wrote it.
#[derive(Default)]
pub(crate) struct RecordCodec {
    /// The dictionary new records are compressed with, by id.
    current: Option<(u64, zstd::bulk::Compressor<'static>)>,
    /// That dictionary's bytes, for [`RecordCodec::writer`].
    current_dictionary: Vec<u8>,
    /// Every dictionary known, by id.
    readers: std::collections::HashMap<u64, zstd::bulk::Decompressor<'static>>,
    /// Format-1 bodies kept to train the first dictionary on.
    samples: Vec<Vec<u8>>,
    /// The compressed form of the records encoded last, by their body: a run stores
    /// each person it creates twice (as pending, and in the audit), and compressing is
    /// the dearer half of encoding. Hashed by xxh3: SipHash over a million bodies
    /// cost a first sync a fifth of a second.
    recent: std::collections::HashMap<Vec<u8>, Vec<u8>, xxhash_rust::xxh3::Xxh3DefaultBuilder>,
    /// A [`RecordCodec::writer`]: it compresses each record once, so it remembers none
    /// (hashing and keeping them cost the staging thread a tenth of its time).
    forgets: bool,
}

/// How many compressed records [`RecordCodec`] remembers (some batches' worth).
const RECENT_RECORDS: usize = 20_000;

impl std::fmt::Debug for RecordCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordCodec")
            .field("current", &self.current.as_ref().map(|(id, _)| id))
            .field("dictionaries", &self.readers.len())
            .finish()
    }
}

impl RecordCodec {
    /// Learns a stored dictionary; `current` makes new records use it.
    pub(crate) fn add_dictionary(
        &mut self,
        id: u64,
        dictionary: &[u8],
        current: bool,
    ) -> std::io::Result<()> {
        use zstd::zstd_safe::{CParameter, DParameter, FrameFormat};
        let mut reader = zstd::bulk::Decompressor::with_dictionary(dictionary)?;
        reader.set_parameter(DParameter::Format(FrameFormat::Magicless))?;
        self.readers.insert(id, reader);
        if current {
            let mut writer = zstd::bulk::Compressor::with_dictionary(LEVEL, dictionary)?;
            for parameter in [
                CParameter::Format(FrameFormat::Magicless),
                CParameter::ChecksumFlag(false),
                CParameter::ContentSizeFlag(false),
                CParameter::DictIdFlag(false),
            ] {
                writer.set_parameter(parameter)?;
            }
            self.current = Some((id, writer));
            self.current_dictionary = dictionary.to_vec();
            self.samples = Vec::new();
            self.recent.clear();
        }
        Ok(())
    }

    /// The id of the dictionary new records are compressed with, if any.
    pub(crate) fn current_id(&self) -> Option<u64> {
        self.current.as_ref().map(|(id, _)| *id)
    }

    /// A codec that compresses new records as this one does, for another thread (it
    /// reads only what it writes).
    pub(crate) fn writer(&self) -> RecordCodec {
        let mut codec = RecordCodec {
            forgets: true,
            ..RecordCodec::default()
        };
        if let Some(id) = self.current_id() {
            // Usable here, so usable there: the same bytes.
            if let Err(e) = codec.add_dictionary(id, &self.current_dictionary, true) {
                tracing::warn!("records stay uncompressed: dictionary {id} is not usable: {e}");
            }
        }
        codec
    }

    /// Whether the dictionary `id` is known.
    pub(crate) fn knows(&self, id: u64) -> bool {
        self.readers.contains_key(&id)
    }

    /// Whether new records are compressed.
    #[cfg(test)]
    pub(crate) fn compresses(&self) -> bool {
        self.current.is_some()
    }

    /// Keeps `contacts` to train on, and once there are enough, returns a dictionary
    /// trained on them for the state to store (and then [`add_dictionary`]). `None`
    /// while there are too few, or when training fails (records then stay format 1).
    ///
    /// [`add_dictionary`]: RecordCodec::add_dictionary
    pub(crate) fn learn<'a>(
        &mut self,
        contacts: impl Iterator<Item = &'a Contact>,
    ) -> Option<Vec<u8>> {
        if self.current.is_some() {
            return None;
        }
        self.samples
            .extend(contacts.map(|c| c.encode_binary(Vec::new())));
        if self.samples.len() < TRAINING_RECORDS {
            return None;
        }
        let samples = std::mem::take(&mut self.samples);
        match zstd::dict::from_samples(&samples, DICTIONARY_BYTES) {
            Ok(dictionary) => Some(dictionary),
            Err(e) => {
                tracing::debug!("records stay uncompressed: no dictionary could be trained: {e}");
                None
            }
        }
    }

    /// Encodes `contact`: compressed when there is a current dictionary, else format 1.
    pub(crate) fn encode(&mut self, contact: &Contact) -> Vec<u8> {
        let Some((id, writer)) = self.current.as_mut() else {
            return encode(contact);
        };
        let body = contact.encode_binary(Vec::new());
        if self.forgets {
            return match writer.compress(&body) {
                Ok(frame) => compressed(*id, &body, &frame),
                Err(_) => encode(contact),
            };
        }
        if let Some(known) = self.recent.get(&body) {
            return known.clone();
        }
        match writer.compress(&body) {
            Ok(frame) => {
                let out = compressed(*id, &body, &frame);
                if self.recent.len() >= RECENT_RECORDS {
                    self.recent.clear();
                }
                self.recent.insert(body, out.clone());
                out
            }
            // Cannot happen with a valid dictionary; format 1 reads back anyway.
            Err(_) => encode(contact),
        }
    }

    /// `record` ([`encode`]'s format 1) compressed with the current dictionary, or
    /// `None` when there is none (or the record is compressed already).
    pub(crate) fn compress_encoded(&mut self, record: &[u8]) -> Option<Vec<u8>> {
        let (id, writer) = self.current.as_mut()?;
        let body = record.strip_prefix(&[VERSION])?;
        let frame = writer.compress(body).ok()?;
        Some(compressed(*id, body, &frame))
    }

    /// Decodes a record of either format. A compressed one names its dictionary;
    /// [`RecordDecodeError::Dictionary`] asks the caller for one it does not know.
    pub(crate) fn decode(&mut self, bytes: &[u8]) -> Result<Contact, RecordDecodeError> {
        if bytes.first() != Some(&COMPRESSED) {
            return decode(bytes).map_err(RecordDecodeError::Unreadable);
        }
        let ((id, length), frame): ((u64, u64), &[u8]) = postcard::take_from_bytes(&bytes[1..])
            .map_err(|e| RecordDecodeError::Unreadable(format!("compressed record header: {e}")))?;
        let reader = self
            .readers
            .get_mut(&id)
            .ok_or(RecordDecodeError::Dictionary(id))?;
        let body = reader
            .decompress(frame, length as usize)
            .map_err(|e| RecordDecodeError::Unreadable(format!("compressed record: {e}")))?;
        if body.len() as u64 != length {
            return Err(RecordDecodeError::Unreadable(format!(
                "compressed record of {} bytes, {length} expected",
                body.len()
            )));
        }
        Contact::decode_binary(&body).map_err(RecordDecodeError::Unreadable)
    }
}

/// A record compressed with dictionary `id` (format 2): the body's length, then the
/// frame.
fn compressed(id: u64, body: &[u8], frame: &[u8]) -> Vec<u8> {
    let mut out =
        postcard::to_extend(&(id, body.len() as u64), vec![COMPRESSED]).unwrap_or_default();
    out.extend_from_slice(frame);
    out
}

/// Why [`RecordCodec::decode`] could not read a record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RecordDecodeError {
    /// Compressed with this dictionary, which the codec does not know (yet).
    Dictionary(u64),
    /// Damaged, or written by a newer contactsync.
    Unreadable(String),
}

/// Encodes `contact` for the state, in format 1.
pub fn encode(contact: &Contact) -> Vec<u8> {
    contact.encode_binary(vec![VERSION])
}

/// Decodes a record [`encode`] wrote; the error says what is wrong. A compressed
/// record needs its state's dictionary: [`RecordCodec::decode`].
pub fn decode(bytes: &[u8]) -> Result<Contact, String> {
    let (&version, body) = bytes
        .split_first()
        .ok_or_else(|| "empty stored record".to_string())?;
    match version {
        VERSION => Contact::decode_binary(body),
        COMPRESSED => Err("a compressed record read without its state's dictionary".into()),
        other => Err(format!(
            "stored record of format {other}, this contactsync reads {VERSION} and {COMPRESSED}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contactsync_core::Field;

    #[test]
    fn round_trip_and_size() {
        let mut c = Contact::default();
        for (field, value) in [
            (Field::ExternalId, "E123456"),
            (Field::Email, "person123456@example.com"),
            (Field::FirstName, "Annabel"),
            (Field::LastName, "Lee-Smith"),
            (Field::Department, "Marketing"),
            (Field::Status, "opted_out"),
            (Field::Subscriptions, "news;events"),
            (Field::Attribute("Cost Center".into()), "CC-100"),
        ] {
            c.set(&field, value).unwrap();
        }
        let bytes = encode(&c);
        assert_eq!(decode(&bytes).unwrap(), c);
        // The values alone are 83 bytes; the encoding adds about one byte a field.
        assert!(bytes.len() < 110, "{} bytes", bytes.len());
        assert!(decode(&[]).is_err());
        assert!(decode(&[9, 0]).unwrap_err().contains("format 9"));
    }

    fn people(n: usize) -> Vec<Contact> {
        let departments = ["Sales", "Engineering", "Marketing", "Finance"];
        (0..n)
            .map(|i| {
                let mut c = Contact::default();
                for (field, value) in [
                    (Field::ExternalId, format!("E{i:08}")),
                    (Field::Email, format!("person{i}@example.com")),
                    (Field::FirstName, format!("First{i}")),
                    (Field::LastName, format!("Last{}", i % 9973)),
                    (Field::Company, "Acme".to_string()),
                    (Field::Department, departments[i % 4].to_string()),
                    (Field::Subscriptions, "Newsletter".to_string()),
                ] {
                    c.set(&field, &value).unwrap();
                }
                c
            })
            .collect()
    }

    #[test]
    fn records_compressed_with_a_trained_dictionary_read_back_and_are_small() {
        let people = people(3000);
        let mut codec = RecordCodec::default();
        assert!(
            codec.learn(people[..10].iter()).is_none(),
            "too few to train on"
        );
        let plain = codec.encode(&people[0]);
        assert_eq!(plain[0], VERSION, "format 1 until there is a dictionary");
        let dictionary = codec
            .learn(people[10..TRAINING_RECORDS].iter())
            .expect("a dictionary");
        assert!(dictionary.len() <= DICTIONARY_BYTES);
        codec.add_dictionary(7, &dictionary, true).unwrap();
        assert!(codec.compresses() && codec.knows(7));
        assert!(codec.learn(people.iter()).is_none(), "trained once");
        let (mut plain_bytes, mut compressed_bytes) = (0, 0);
        for person in &people[TRAINING_RECORDS..] {
            let bytes = codec.encode(person);
            assert_eq!(bytes[0], COMPRESSED);
            assert_eq!(&codec.decode(&bytes).unwrap(), person);
            plain_bytes += encode(person).len();
            compressed_bytes += bytes.len();
        }
        assert!(
            compressed_bytes * 2 < plain_bytes,
            "{compressed_bytes} bytes compressed, {plain_bytes} plain"
        );
        // Format 1 reads back through the codec; a compressed record does not without it.
        assert_eq!(codec.decode(&plain).unwrap(), people[0]);
        let compressed = codec.encode(&people[1]);
        assert!(decode(&compressed).unwrap_err().contains("dictionary"));
        let mut other = RecordCodec::default();
        assert_eq!(
            other.decode(&compressed),
            Err(RecordDecodeError::Dictionary(7))
        );
        other.add_dictionary(7, &dictionary, false).unwrap();
        assert!(!other.compresses());
        assert_eq!(other.decode(&compressed).unwrap(), people[1]);
        let mut damaged = compressed.clone();
        damaged.truncate(damaged.len() - 3);
        assert!(matches!(
            other.decode(&damaged),
            Err(RecordDecodeError::Unreadable(_))
        ));
    }
}
