//! The sandbox's data file: JSON, read once at start, written whole through a temporary
//! file and a rename, so that a crash never leaves half a file.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::SandboxError;

/// Reads `path`; `Ok(None)` when there is no such file (a first start).
pub fn load<T: DeserializeOwned>(
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

/// Writes `value` to `path` atomically (a sibling `.tmp` file, then a rename), creating
/// the directory when needed.
pub fn save<T: Serialize>(
    platform: &'static str,
    path: &Path,
    value: &T,
) -> Result<(), SandboxError> {
    write(path, &encode(platform, path, value)?)
}

/// `value` as the data file's JSON: to encode under a lock, then [`write`] outside it.
pub fn encode<T: Serialize>(
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
pub fn write(path: &Path, json: &[u8]) -> Result<(), SandboxError> {
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
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sub/data.json");
        assert!(matches!(load::<Vec<u32>>("T", &path), Ok(None)));
        save("T", &path, &vec![1u32, 2]).expect("saved");
        assert!(matches!(load::<Vec<u32>>("T", &path), Ok(Some(v)) if v == vec![1, 2]));
        assert!(!path.with_extension("json.tmp").exists());
        std::fs::write(&path, "not json").expect("written");
        let error = load::<Vec<u32>>("T", &path).map(|_| ());
        assert!(
            matches!(&error, Err(SandboxError::Data { .. })),
            "{error:?}"
        );
    }
}
