//! The sink's key-value space in the SQLite state.

use super::*;

/// The sink's key-value space, written through at once.
pub(super) struct SqliteSinkStore<'a> {
    pub(super) conn: &'a mut Connection,
    pub(super) scope: String,
}

fn store_error(e: rusqlite::Error) -> ConnectorError {
    ConnectorError::Other(format!("sink store in the state database: {e}"))
}

impl SinkStore for SqliteSinkStore<'_> {
    fn get(&self, key: &str) -> Result<Option<String>, ConnectorError> {
        self.conn
            .query_row(
                "SELECT value FROM sink_data WHERE scope = ?1 AND key = ?2",
                params![self.scope, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(store_error)
    }

    fn put(&mut self, key: &str, value: &str) -> Result<(), ConnectorError> {
        self.conn
            .execute(
                "INSERT INTO sink_data (scope, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value",
                params![self.scope, key, value],
            )
            .map(|_| ())
            .map_err(store_error)
    }

    fn remove(&mut self, key: &str) -> Result<(), ConnectorError> {
        self.conn
            .execute(
                "DELETE FROM sink_data WHERE scope = ?1 AND key = ?2",
                params![self.scope, key],
            )
            .map(|_| ())
            .map_err(store_error)
    }
}
