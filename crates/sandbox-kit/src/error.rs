use std::path::PathBuf;

use contactsync_core::{ConfigError, ConnectorError};

/// Why a sandbox could not start, load, save or seed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The data file is not this sandbox's JSON.
    #[error("{}: not a {platform} sandbox data file: {message}", path.display())]
    Data {
        /// The sandbox.
        platform: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The port could not be bound.
    #[error("cannot listen on 127.0.0.1:{port}: {source}")]
    Bind {
        /// The port asked for.
        port: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A record given to seed the sandbox is not acceptable.
    #[error("cannot seed {0}")]
    Seed(String),
    /// The connector settings do not say what the sandbox must accept.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl From<SandboxError> for ConnectorError {
    fn from(error: SandboxError) -> Self {
        match error {
            SandboxError::Io { path, source } => ConnectorError::Io { path, source },
            SandboxError::Config(e) => ConnectorError::Config(e),
            other => ConnectorError::Other(other.to_string()),
        }
    }
}
