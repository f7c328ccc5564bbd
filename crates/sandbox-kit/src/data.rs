//! The sandbox's data file: JSON, read once at start, written whole through a temporary
//! file and a rename, so that a crash never leaves half a file.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::SandboxError;

/// A sandbox's data file, if it has one: saved by one writer at a time, encoded under
/// the sandbox's own lock and written outside it.
#[derive(Debug)]
pub struct DataFile {
    platform: &'static str,
    path: Option<PathBuf>,
    one_writer: Mutex<()>,
}

impl DataFile {
    /// The data file of `platform` at `path`; `None` keeps the data in memory only.
    pub fn new(platform: &'static str, path: Option<PathBuf>) -> Self {
        DataFile {
            platform,
            path,
            one_writer: Mutex::new(()),
        }
    }

    /// What the file holds; `Ok(None)` without a file (or a data file) yet.
    pub fn load<T: DeserializeOwned>(&self) -> Result<Option<T>, SandboxError> {
        match &self.path {
            Some(path) => load(self.platform, path),
            None => Ok(None),
        }
    }

    /// Saves what `locked` hands to its encoder: `data.save(|encode|
    /// encode(&self.lock().store))`, so that the sandbox's lock is held only while
    /// encoding.
    pub fn save<T: Serialize>(
        &self,
        locked: impl FnOnce(
            &dyn Fn(&T) -> Result<Vec<u8>, SandboxError>,
        ) -> Result<Vec<u8>, SandboxError>,
    ) -> Result<(), SandboxError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        // A poisoned lock only means another save panicked; this one may go ahead.
        let _one_writer = self.one_writer.lock().unwrap_or_else(|e| e.into_inner());
        let json = locked(&|value: &T| encode(self.platform, path, value))?;
        write(path, &json)
    }
}

/// Reads `path`; `Ok(None)` when there is no such file (a first start).
fn load<T: DeserializeOwned>(
    platform: &'static str,
    path: &Path,
) -> Result<Option<T>, SandboxError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SandboxError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| SandboxError::Data {
            platform,
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// `value` as the data file's JSON: encoded under the sandbox's lock, then written
/// outside it.
fn encode<T: Serialize>(
    platform: &'static str,
    path: &Path,
    value: &T,
) -> Result<Vec<u8>, SandboxError> {
    serde_json::to_vec_pretty(value).map_err(|e| SandboxError::Data {
        platform,
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Writes `json` to `path` atomically, creating the directory when needed.
fn write(path: &Path, json: &[u8]) -> Result<(), SandboxError> {
    let io = |source| SandboxError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    std::fs::write(&temp, json).map_err(io)?;
    std::fs::rename(&temp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_file_and_memory_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sub/data.json");
        let file = DataFile::new("T", Some(path.clone()));
        assert!(matches!(file.load::<Vec<u32>>(), Ok(None)));
        file.save(|encode| encode(&vec![1u32, 2])).expect("saved");
        assert!(matches!(file.load::<Vec<u32>>(), Ok(Some(v)) if v == vec![1, 2]));
        assert!(!path.with_extension("json.tmp").exists());
        std::fs::write(&path, "not json").expect("written");
        let error = file.load::<Vec<u32>>().map(|_| ());
        assert!(
            matches!(&error, Err(SandboxError::Data { .. })),
            "{error:?}"
        );

        let memory = DataFile::new("T", None);
        memory
            .save(|encode| encode(&vec![3u32]))
            .expect("nothing to save");
        assert!(matches!(memory.load::<Vec<u32>>(), Ok(None)));
    }
}
