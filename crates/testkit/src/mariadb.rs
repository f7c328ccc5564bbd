//! A throwaway MariaDB server on loopback, for tests of the SQL source.
//!
//! [`MariaDb::start`] runs `mariadb-install-db` into a temporary directory and
//! `mariadbd` on a free port (`bind-address = 127.0.0.1`, its socket in the same
//! directory, no binary log, no flush at commit), with one user, [`USER`], who logs in
//! over TCP with a password made for this server ([`MariaDb::password`]); dropping the
//! handle kills the server and deletes the directory. Under root the server runs as the
//! `mysql` system user (Debian's package creates it). `cargo xtask test` installs the
//! server from Debian's packages (`mariadb-server`) when it is missing.
//!
//! ```no_run
//! use contactsync_testkit::mariadb::MariaDb;
//!
//! let server = MariaDb::start()?;
//! let url = server.new_database()?; // mysql://contactsync@127.0.0.1:PORT/contactsync_0
//! server.execute("contactsync_0", "CREATE TABLE people (id int PRIMARY KEY)")?;
//! # let _ = url;
//! # Ok::<(), contactsync_testkit::mariadb::MariaDbError>(())
//! ```

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::postgres::{free_port, is_root};

/// Why the server could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum MariaDbError {
    /// The server programs are not installed.
    #[error("MariaDB's mariadbd and mariadb-install-db were not found: install the server (Debian: mariadb-server), or run `cargo xtask test`, which does")]
    NotInstalled,
    /// A program failed.
    #[error("{program} failed: {output}")]
    Failed {
        /// What ran.
        program: String,
        /// What it printed.
        output: String,
    },
    /// The file system said no.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The user tests connect as, over TCP, with [`MariaDb::password`].
pub const USER: &str = "contactsync";

/// A running throwaway server. Killed and deleted on drop.
#[derive(Debug)]
pub struct MariaDb {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
    password: String,
    run_as: Option<&'static str>,
    tls: Option<crate::tls::PrivateCa>,
    databases: AtomicU32,
}

fn program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"].map(PathBuf::from))
        .collect();
    names
        .iter()
        .flat_map(|name| dirs.iter().map(move |d| d.join(name)))
        .find(|p| p.exists())
}

fn failed(program: &str, output: impl Into<String>) -> MariaDbError {
    MariaDbError::Failed {
        program: program.into(),
        output: output.into(),
    }
}

impl MariaDb {
    /// Initialises and starts a server.
    pub fn start() -> Result<MariaDb, MariaDbError> {
        MariaDb::start_with(false)
    }

    /// A server that also serves TLS, with a certificate for 127.0.0.1 signed by a
    /// private CA ([`MariaDb::ca_certificate`]).
    pub fn start_tls() -> Result<MariaDb, MariaDbError> {
        MariaDb::start_with(true)
    }

    fn start_with(tls: bool) -> Result<MariaDb, MariaDbError> {
        let server = program(&["mariadbd", "mysqld"]).ok_or(MariaDbError::NotInstalled)?;
        let install = program(&["mariadb-install-db", "mysql_install_db"])
            .ok_or(MariaDbError::NotInstalled)?;
        let run_as = is_root().then_some("mysql");
        let dir = tempfile::Builder::new()
            .prefix("contactsync-mariadb-")
            .tempdir()?;
        // Each server's temporary tables in its own directory: servers started side by
        // side in /tmp collide while their system tables are made.
        std::fs::create_dir(dir.path().join("tmp"))?;
        let tls = if tls {
            Some(crate::tls::private_ca(dir.path()).map_err(|e| failed("openssl", e))?)
        } else {
            None
        };
        if let Some(user) = run_as {
            let out = Command::new("chown")
                .arg("-R")
                .arg(format!("{user}:"))
                .arg(dir.path())
                .output()?;
            if !out.status.success() {
                return Err(failed("chown", String::from_utf8_lossy(&out.stderr)));
            }
        }
        // A password of this server's own, so that a test can look for it in outputs.
        let mut random = [0u8; 12];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut random)?;
        let password = random.iter().fold(String::from("pw-"), |mut s, b| {
            s.push_str(&format!("{b:02x}"));
            s
        });
        let mut db = MariaDb {
            dir,
            child: None,
            port: 0,
            password,
            run_as,
            tls,
            databases: AtomicU32::new(0),
        };
        let data = db.dir.path().join("data");
        let mut init = Command::new(&install);
        init.env("TMPDIR", db.dir.path().join("tmp"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ]);
        if let Some(user) = run_as {
            init.arg(format!("--user={user}"));
        }
        let out = init.output()?;
        if !out.status.success() {
            return Err(failed(
                "mariadb-install-db",
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ));
        }
        let setup = db.dir.path().join("init.sql");
        std::fs::write(
            &setup,
            format!(
                "CREATE USER IF NOT EXISTS '{USER}'@'127.0.0.1' IDENTIFIED BY '{}';\n\
                 GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'127.0.0.1' WITH GRANT OPTION;\n",
                db.password
            ),
        )?;
        db.chown(&setup)?;
        // A port found free can be taken before the server binds it: try a few.
        let mut last = MariaDbError::NotInstalled;
        for attempt in 0..3 {
            db.port = free_port()?;
            match db.serve(&server, &data, &setup, attempt) {
                Ok(child) => {
                    db.child = Some(child);
                    return Ok(db);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn chown(&self, path: &Path) -> Result<(), MariaDbError> {
        if let Some(user) = self.run_as {
            Command::new("chown")
                .arg(format!("{user}:"))
                .arg(path)
                .output()?;
        }
        Ok(())
    }

    fn serve(
        &self,
        server: &Path,
        data: &Path,
        setup: &Path,
        attempt: u32,
    ) -> Result<Child, MariaDbError> {
        let log = self.dir.path().join(format!("server-{attempt}.log"));
        let mut cmd = Command::new(server);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!(
                "--tmpdir={}",
                self.dir.path().join("tmp").display()
            ))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!("--port={}", self.port))
            .arg(format!(
                "--pid-file={}",
                self.dir.path().join("mariadb.pid").display()
            ))
            .arg(format!("--log-error={}", log.display()))
            .arg(format!("--init-file={}", setup.display()))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-buffer-pool-size=256M",
                "--max-connections=200",
            ]);
        if let Some(ca) = &self.tls {
            cmd.arg(format!("--ssl-ca={}", ca.ca.display()))
                .arg(format!("--ssl-cert={}", ca.cert.display()))
                .arg(format!("--ssl-key={}", ca.key.display()));
        }
        if let Some(user) = self.run_as {
            cmd.arg(format!("--user={user}"));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            if said.contains("ready for connections")
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return Ok(child);
            }
            if let Some(status) = child.try_wait()? {
                return Err(failed("mariadbd", format!("exited ({status}): {said}")));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed("mariadbd", format!("not ready after 60 s: {said}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("mariadb.sock")
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The password of [`USER`].
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The URL of database `name` for [`USER`], without the password.
    pub fn url(&self, name: &str) -> String {
        format!("mysql://{USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub fn new_database(&self) -> Result<String, MariaDbError> {
        let n = self.databases.fetch_add(1, Ordering::SeqCst);
        let name = format!("contactsync_{n}");
        self.execute("mysql", &format!("CREATE DATABASE {name}"))?;
        Ok(self.url(&name))
    }

    /// Runs `sql` (one or more statements) in `database` with the `mariadb` client, as
    /// the server's root over its socket (`LOAD DATA LOCAL INFILE` allowed); returns
    /// what it printed (tab-separated rows, no column names).
    pub fn execute(&self, database: &str, sql: &str) -> Result<String, MariaDbError> {
        let client = program(&["mariadb", "mysql"]).ok_or(MariaDbError::NotInstalled)?;
        let mut child = Command::new(client)
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args([
                "-u",
                "root",
                "--batch",
                "--skip-column-names",
                "--local-infile=1",
            ])
            .arg(database)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, sql.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(failed("mariadb", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The CA a client must trust to verify this server, when it serves TLS.
    pub fn ca_certificate(&self) -> Option<&Path> {
        self.tls.as_ref().map(|ca| ca.ca.as_path())
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
