//! An in-memory [`SinkStore`], so a sink can be driven without the engine's state.

use std::collections::HashMap;

use contactsync_core::{CancellationToken, ConnectorError, NoProgress, SinkContext, SinkStore};

/// Reports progress nowhere; `'static` so that contexts can borrow it freely.
static NO_PROGRESS: NoProgress = NoProgress;

/// A [`SinkStore`] held in a `HashMap`: what the engine lends a sink, without a
/// database. Writes cannot fail.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    values: HashMap<String, String>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// A [`SinkContext`] lending this store to a sink, with [`NoProgress`] and a fresh
    /// (never cancelled) [`CancellationToken`].
    ///
    /// ```
    /// # use contactsync_testkit::MemoryStore;
    /// let mut store = MemoryStore::new();
    /// let mut ctx = store.context();
    /// ctx.store.put("job", "42").unwrap();
    /// assert_eq!(ctx.store.get("job").unwrap().as_deref(), Some("42"));
    /// ```
    pub fn context(&mut self) -> SinkContext<'_> {
        SinkContext {
            store: self,
            progress: &NO_PROGRESS,
            cancel: CancellationToken::new(),
            resubscribe: false,
        }
    }

    /// Every key and value, for assertions on what a sink kept.
    pub fn values(&self) -> &HashMap<String, String> {
        &self.values
    }
}

impl SinkStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<String>, ConnectorError> {
        Ok(self.values.get(key).cloned())
    }

    fn put(&mut self, key: &str, value: &str) -> Result<(), ConnectorError> {
        self.values.insert(key.to_string(), value.to_string());
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<(), ConnectorError> {
        self.values.remove(key);
        Ok(())
    }
}
