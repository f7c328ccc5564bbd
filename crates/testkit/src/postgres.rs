//! A throwaway PostgreSQL cluster on loopback, for tests of the PostgreSQL state.
//!
//! [`Postgres::start`] runs `initdb` into a temporary directory and `pg_ctl start` on a
//! free port (`listen_addresses = 127.0.0.1`, its socket in the same directory, `trust`
//! authentication for the cluster's own superuser `contactsync`, no fsync); dropping the
//! handle stops the server (`pg_ctl stop -m immediate`) and deletes the directory.
//! PostgreSQL refuses to run as root, so under root the programs run as the `postgres`
//! system user (Debian's package creates it) through `runuser`. `cargo xtask test`
//! installs the server from Debian's packages when it is missing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why the cluster could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// The server programs are not installed.
    #[error("PostgreSQL's initdb and pg_ctl were not found (looked on PATH and in /usr/lib/postgresql/*/bin): install the server (Debian: postgresql), or run `cargo xtask test`, which does")]
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

/// A running throwaway cluster. Stopped and deleted on drop.
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    run_as: Option<String>,
    /// Which try at starting this is (each initialises its own data directory).
    attempt: u32,
    /// The private CA whose certificate the server presents, when it serves TLS.
    tls: Option<crate::tls::PrivateCa>,
    databases: std::sync::atomic::AtomicU32,
}

/// The cluster's superuser.
pub const USER: &str = "contactsync";

fn bin_dir() -> Option<PathBuf> {
    // The real directory of an `initdb` on PATH (often a link into the server's own
    // bin directory, which also holds `createdb`).
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("initdb"))
            .find(|p| p.exists())
            .and_then(|p| std::fs::canonicalize(p).ok())
            .and_then(|p| p.parent().map(Path::to_path_buf))
    });
    if let Some(dir) = on_path.filter(|d| d.join("pg_ctl").exists() && d.join("createdb").exists())
    {
        return Some(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop()
}

/// Whether this process runs as root (the uid the kernel reports; no libc call needed).
pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A port free on 127.0.0.1 this instant.
pub(crate) fn free_port() -> Result<u16, std::io::Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Postgres {
    /// Initialises and starts a cluster.
    pub fn start() -> Result<Postgres, PostgresError> {
        Postgres::start_with(false)
    }

    /// A cluster that also serves TLS (`ssl = on`), with a server certificate for
    /// 127.0.0.1 signed by a private CA ([`Postgres::ca_certificate`]).
    pub fn start_tls() -> Result<Postgres, PostgresError> {
        Postgres::start_with(true)
    }

    fn start_with(tls: bool) -> Result<Postgres, PostgresError> {
        let bin = bin_dir().ok_or(PostgresError::NotInstalled)?;
        let run_as = is_root().then(|| "postgres".to_string());
        let dir = tempfile::Builder::new()
            .prefix("contactsync-pg-")
            .tempdir()?;
        if let Some(user) = &run_as {
            let out = Command::new("chown")
                .arg(format!("{user}:"))
                .arg(dir.path())
                .output()?;
            if !out.status.success() {
                return Err(PostgresError::Failed {
                    program: "chown".into(),
                    output: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
        }
        let tls = if tls {
            let ca =
                crate::tls::private_ca(dir.path()).map_err(|output| PostgresError::Failed {
                    program: "openssl".into(),
                    output,
                })?;
            // The server reads its key only when no one else can.
            std::fs::set_permissions(&ca.key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            if let Some(user) = &run_as {
                let _ = Command::new("chown")
                    .arg(format!("{user}:"))
                    .arg(&ca.key)
                    .arg(&ca.cert)
                    .output()?;
            }
            Some(ca)
        } else {
            None
        };
        let mut pg = Postgres {
            dir,
            bin,
            port: 0,
            run_as,
            attempt: 0,
            tls,
            databases: std::sync::atomic::AtomicU32::new(0),
        };
        // A port found free can be taken before the server binds it: try a few.
        let mut last = PostgresError::NotInstalled;
        for attempt in 0..3 {
            pg.attempt = attempt;
            pg.port = free_port()?;
            match pg.init_and_start() {
                Ok(()) => return Ok(pg),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn run(&self, mut cmd: Command, program: &str) -> Result<String, PostgresError> {
        let out = cmd.output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            let log = std::fs::read_to_string(self.log()).unwrap_or_default();
            return Err(PostgresError::Failed {
                program: program.into(),
                output: format!("{text}\n{log}"),
            });
        }
        Ok(text)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join(format!("data-{}", self.attempt))
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join(format!("server-{}.log", self.attempt))
    }

    fn init_and_start(&self) -> Result<(), PostgresError> {
        let mut init = self.command("initdb");
        init.arg("-D").arg(self.data()).args([
            "-U",
            USER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        self.run(init, "initdb")?;
        let mut start = self.command("pg_ctl");
        start
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log())
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100{}",
                self.port,
                self.dir.path().display(),
                match &self.tls {
                    Some(ca) => format!(
                        " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                        ca.cert.display(),
                        ca.key.display()
                    ),
                    None => String::new(),
                }
            ))
            .args(["-w", "-t", "60", "start"]);
        self.run(start, "pg_ctl start")?;
        Ok(())
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `name` for the superuser (no password: `trust`).
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub fn new_database(&self) -> Result<String, PostgresError> {
        let n = self
            .databases
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("contactsync_{n}");
        let mut create = self.command("createdb");
        create
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .arg(&name);
        self.run(create, "createdb")?;
        Ok(self.url(&name))
    }

    /// The CA a client must trust to verify this server, when it serves TLS.
    pub fn ca_certificate(&self) -> Option<&Path> {
        self.tls.as_ref().map(|ca| ca.ca.as_path())
    }

    /// The cluster's directory (data, log, socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = stop.output();
    }
}
