//! The platform: a folder holding one JSON file a person, named after the person's key.
//! Every call says which file it touched in its errors.

use std::path::{Path, PathBuf};

use contactsync_core::{Contact, ContactKey, ConnectorError};

/// The folder people are kept in.
#[derive(Debug, Clone)]
pub struct Folder {
    dir: PathBuf,
}

impl Folder {
    /// The folder at `dir`. Touches nothing.
    pub fn new(dir: PathBuf) -> Self {
        Folder { dir }
    }

    /// Fails, saying what to do, when the folder cannot be read.
    pub async fn check(&self) -> Result<(), ConnectorError> {
        tokio::fs::read_dir(&self.dir)
            .await
            .map(|_| ())
            .map_err(|e| self.error(&self.dir, "cannot read the folder (create it, or fix `dir`)", e))
    }

    /// The files of the people it holds, sorted (a read in a stable order).
    pub async fn files(&self) -> Result<Vec<PathBuf>, ConnectorError> {
        let mut entries = tokio::fs::read_dir(&self.dir)
            .await
            .map_err(|e| self.error(&self.dir, "cannot read the folder", e))?;
        let mut files = Vec::new();
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| self.error(&self.dir, "cannot read the folder", e))?
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                files.push(path);
            }
        }
        files.sort();
        Ok(files)
    }

    /// The person in `file`; `Err` with the text and why when the file holds no
    /// person (a record to reject, not a failed read).
    pub async fn read(
        &self,
        file: &Path,
    ) -> Result<Result<Contact, (String, String)>, ConnectorError> {
        let bytes = tokio::fs::read(file)
            .await
            .map_err(|e| self.error(file, "cannot read", e))?;
        Ok(serde_json::from_slice(&bytes).map_err(|e| {
            (
                String::from_utf8_lossy(&bytes).into_owned(),
                format!("not a person in JSON: {e}"),
            )
        }))
    }

    /// Writes `contact` as the person `key`: to a temporary file renamed over the old
    /// one, so that a crash never leaves half a person.
    pub async fn write(&self, key: &ContactKey, contact: &Contact) -> Result<(), ConnectorError> {
        let file = self.file(key);
        let text = serde_json::to_vec_pretty(contact)
            .map_err(|e| self.error(&file, "cannot encode", e))?;
        let partial = file.with_extension("json.partial");
        tokio::fs::write(&partial, text)
            .await
            .map_err(|e| self.error(&partial, "cannot write", e))?;
        tokio::fs::rename(&partial, &file)
            .await
            .map_err(|e| self.error(&file, "cannot write", e))
    }

    /// Removes the person `key`; someone already gone is done.
    pub async fn remove(&self, key: &ContactKey) -> Result<(), ConnectorError> {
        let file = self.file(key);
        match tokio::fs::remove_file(&file).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.error(&file, "cannot remove", e)),
        }
    }

    /// The file of the person `key`: its key with every character that cannot stand in
    /// a file name spelt as `_XX` (hex), so that two keys never share a file.
    pub fn file(&self, key: &ContactKey) -> PathBuf {
        let name: String = key
            .to_string()
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'@' => {
                    (b as char).to_string()
                }
                _ => format!("_{b:02X}"),
            })
            .collect();
        self.dir.join(format!("{name}.json"))
    }

    fn error(&self, path: &Path, what: &str, e: impl std::fmt::Display) -> ConnectorError {
        ConnectorError::Other(format!("{}: {what}: {e}", path.display()))
    }
}
