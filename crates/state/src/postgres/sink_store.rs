//! The sink's key-value space in the PostgreSQL state.

use super::*;

/// The sink's key-value space, written through at once.
pub(super) struct PostgresSinkStore<'a> {
    pub(super) state: &'a PostgresState,
    pub(super) scope: String,
}

fn store_error(e: StateError) -> ConnectorError {
    ConnectorError::Other(format!("sink store in the state database: {e}"))
}

impl SinkStore for PostgresSinkStore<'_> {
    fn get(&self, key: &str) -> Result<Option<String>, ConnectorError> {
        let (scope, key) = (self.scope.clone(), key.to_string());
        self.state
            .call(move |c| {
                Ok(c.query_opt(
                    "SELECT value FROM sink_data WHERE scope = $1 AND key = $2",
                    &[&scope, &key],
                )?
                .map(|r| r.get(0)))
            })
            .map_err(store_error)
    }

    fn put(&mut self, key: &str, value: &str) -> Result<(), ConnectorError> {
        let (scope, key, value) = (self.scope.clone(), key.to_string(), value.to_string());
        self.state
            .call(move |c| {
                c.execute(
                    "INSERT INTO sink_data (scope, key, value) VALUES ($1, $2, $3)
                     ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value",
                    &[&scope, &key, &value],
                )
                .map(|_| ())
            })
            .map_err(store_error)
    }

    fn remove(&mut self, key: &str) -> Result<(), ConnectorError> {
        let (scope, key) = (self.scope.clone(), key.to_string());
        self.state
            .call(move |c| {
                c.execute(
                    "DELETE FROM sink_data WHERE scope = $1 AND key = $2",
                    &[&scope, &key],
                )
                .map(|_| ())
            })
            .map_err(store_error)
    }
}
