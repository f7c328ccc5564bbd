//! A sandbox's state behind one lock, saved to its data file.

use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

use crate::data::DataFile;
use crate::SandboxError;

/// A sandbox's state behind one lock, and the data file it is saved to: what every
/// sandbox's handlers share.
#[derive(Debug)]
pub struct Guarded<S> {
    state: Mutex<S>,
    data: DataFile,
}

impl<S> Guarded<S> {
    /// `state`, saved to `data`.
    pub fn new(state: S, data: DataFile) -> Self {
        Guarded {
            state: Mutex::new(state),
            data,
        }
    }

    /// The state. A poisoned lock (a panic in another handler) is still usable data:
    /// every write completes before the lock is released.
    pub fn lock(&self) -> MutexGuard<'_, S> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Saves the part of the state `part` picks (its store) to the data file, if there
    /// is one; the lock is held only while encoding.
    pub fn save<T: Serialize>(&self, part: impl Fn(&S) -> &T) -> Result<(), SandboxError> {
        self.data.save(|encode| encode(part(&self.lock())))
    }

    /// The data file.
    pub fn data(&self) -> &DataFile {
        &self.data
    }
}

/// Whether `email` has the plain form most platforms ask of an address: one `@` with
/// something before it, a domain with a dot neither first nor last, and no whitespace.
pub fn plain_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains('@')
        && !email.chars().any(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_state_is_what_the_data_file_loads() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("data.json");
        let guarded = Guarded::new(
            (vec![1, 2, 3], "not saved"),
            DataFile::new("test", Some(path.clone())),
        );
        guarded.lock().0.push(4);
        guarded.save(|s| &s.0).expect("saved");
        let loaded: Option<Vec<i32>> = DataFile::new("test", Some(path)).load().expect("load");
        assert_eq!(loaded, Some(vec![1, 2, 3, 4]));
    }

    #[test]
    fn plain_emails() {
        for good in ["a@b.org", "first.last@mail.example.com"] {
            assert!(plain_email(good), "{good}");
        }
        for bad in [
            "a@b",
            "not an email",
            "a b@c.org",
            "@b.org",
            "a@.org",
            "a@b.",
            "a@b@c.org",
        ] {
            assert!(!plain_email(bad), "{bad}");
        }
    }
}
