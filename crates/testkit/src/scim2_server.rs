//! A throwaway `scim2-server` on loopback, for tests: the python-scim project's
//! reference SCIM 2.0 server (PyPI `scim2-server`), written by others from the RFCs, so
//! that the SCIM connector is checked against more than the project's own sandbox.
//!
//! [`Scim2Server::start`] runs one server (in memory, one bearer token, a free port)
//! and stops it when dropped. The program is found in `CONTACTSYNC_SCIM2_SERVER`, else
//! in the virtualenv `cargo xtask test` installs it into (`target/scim2-server`, at the
//! version xtask's `SCIM2_SERVER` pins), else
//! on `PATH`.
//!
//! ```no_run
//! use contactsync_testkit::scim2_server::Scim2Server;
//!
//! let server = Scim2Server::start()?;
//! assert!(server.base_url().starts_with("http://127.0.0.1:"));
//! # Ok::<(), contactsync_testkit::scim2_server::Scim2ServerError>(())
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bearer token the server accepts.
pub const TOKEN: &str = "scim2-server-test-token";

const INSTALL_HINT: &str =
    "run `cargo xtask test` (it installs scim2-server into target/scim2-server), \
or `pip install scim2-server` and set CONTACTSYNC_SCIM2_SERVER to the program";

/// Why the server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Scim2ServerError {
    /// The program is not installed.
    #[error("scim2-server not found: {INSTALL_HINT}")]
    NotInstalled,
    /// Starting it or reaching it failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It did not answer in time, or exited.
    #[error("scim2-server did not start: {0}")]
    NotStarted(String),
}

/// A running server; dropping it stops it.
#[derive(Debug)]
pub struct Scim2Server {
    child: Child,
    port: u16,
    /// Its log, removed with it.
    _dir: tempfile::TempDir,
}

/// The program: `CONTACTSYNC_SCIM2_SERVER`, the xtask's virtualenv, or `PATH`.
pub fn program() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CONTACTSYNC_SCIM2_SERVER") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/scim2-server/bin/scim2-server");
    if venv.exists() {
        return Some(venv);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("scim2-server"))
        .find(|p| p.exists())
}

impl Scim2Server {
    /// Starts a server with an empty directory and waits until it answers.
    pub fn start() -> Result<Scim2Server, Scim2ServerError> {
        let program = program().ok_or(Scim2ServerError::NotInstalled)?;
        let dir = tempfile::Builder::new()
            .prefix("contactsync-scim2-server-")
            .tempdir()
            .map_err(|source| Scim2ServerError::Io {
                what: "creating a temporary directory".into(),
                source,
            })?;
        let mut last = String::new();
        for _attempt in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|source| Scim2ServerError::Io {
                    what: "finding a free port".into(),
                    source,
                })?
                .port();
            let log_path = dir.path().join("scim2-server.log");
            let log = std::fs::File::create(&log_path).map_err(|source| Scim2ServerError::Io {
                what: "creating the log".into(),
                source,
            })?;
            let err = log.try_clone().map_err(|source| Scim2ServerError::Io {
                what: "creating the log".into(),
                source,
            })?;
            let child = Command::new(&program)
                .args(["--hostname", "127.0.0.1", "--port", &port.to_string()])
                .args(["--bearer-token", TOKEN])
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(err)
                .spawn()
                .map_err(|source| Scim2ServerError::Io {
                    what: format!("starting {}", program.display()),
                    source,
                })?;
            let mut child = child;
            match wait_until_answering(&mut child, port) {
                Ok(()) => {
                    return Ok(Scim2Server {
                        child,
                        port,
                        _dir: dir,
                    })
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = format!(
                        "{e}; its log: {}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
            }
        }
        Err(Scim2ServerError::NotStarted(last))
    }

    /// The SCIM base URL, `http://127.0.0.1:PORT/v2`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v2", self.port)
    }

    /// The bearer token it accepts.
    pub fn token(&self) -> &'static str {
        TOKEN
    }
}

/// Waits until the server answers its ServiceProviderConfig, at most 30 s.
fn wait_until_answering(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("it exited ({status})"));
        }
        if let Ok(answer) = get(port, "/v2/ServiceProviderConfig") {
            if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err("no answer within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One plain HTTP GET on loopback: the raw answer.
fn get(port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

impl Drop for Scim2Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
