//! A throwaway OpenLDAP `slapd` on loopback, for tests.
//!
//! The LDAP connector is tested against a real directory server rather than a mock,
//! because what matters (paging under server size limits, `modifyTimestamp`
//! resolution, schema checks on writes, result codes) is exactly what a mock would
//! get wrong. [`Slapd`] owns one `slapd` process in a temporary directory: it is
//! configured from code (no `/etc/ldap` state, no systemd), listens on a free loopback
//! port, and is stopped and removed when dropped.
//!
//! Start reading at [`Slapd::builder`].
//!
//! Requires the Debian packages `slapd` and `ldap-utils`; `cargo xtask test` installs
//! them, or run `apt-get install slapd ldap-utils`.
//!
//! ```no_run
//! use contactsync_testkit::slapd::Slapd;
//!
//! let slapd = Slapd::builder().people(100).start()?;
//! assert!(slapd.url().starts_with("ldap://127.0.0.1:"));
//! slapd.ldapmodify(&format!(
//!     "dn: {}\nchangetype: modify\nreplace: title\ntitle: Boss\n",
//!     Slapd::person_dn(7)
//! ))?;
//! # Ok::<(), contactsync_testkit::slapd::SlapdError>(())
//! ```

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The directory's suffix.
pub const BASE_DN: &str = "dc=example,dc=org";
/// The root DN: not subject to ACLs or size limits.
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=org";
/// The root DN's password.
pub const ADMIN_PASSWORD: &str = "secret";
/// Where [`SlapdBuilder::people`] and [`Slapd::person_ldif`] put people.
pub const PEOPLE_DN: &str = "ou=people,dc=example,dc=org";
/// An ordinary account that may read everything; unlike the root DN it is subject to
/// the configured size limit, as a connector's service account would be.
pub const READER_DN: &str = "cn=reader,dc=example,dc=org";
/// The reader's password.
pub const READER_PASSWORD: &str = "reader-secret";

const INSTALL_HINT: &str =
    "run `apt-get install slapd ldap-utils` (the project's `cargo xtask test` installs them)";

/// Why the server could not be started or a command against it failed.
#[derive(Debug, thiserror::Error)]
pub enum SlapdError {
    /// A program of OpenLDAP is not installed.
    #[error("`{program}` not found on PATH nor in /usr/sbin: {INSTALL_HINT}")]
    NotInstalled {
        /// The program looked for.
        program: &'static str,
    },
    /// Writing the temporary directory or running a program failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A program ran and failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command, without passwords.
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stdout and stderr.
        output: String,
    },
    /// slapd did not answer in time, or exited.
    #[error("slapd did not start: {0}")]
    NotStarted(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SlapdError {
    let what = what.into();
    move |source| SlapdError::Io { what, source }
}

/// How to configure the server before it starts.
#[derive(Debug, Clone, Default)]
pub struct SlapdBuilder {
    size_limit: Option<u32>,
    tls: bool,
    people: usize,
    ldif: Vec<String>,
}

impl SlapdBuilder {
    /// Caps searches by ordinary accounts (such as [`READER_DN`]) at `limit` entries,
    /// while leaving searches with the paged results control unlimited in total: a
    /// read of more than `limit` entries then only succeeds if it really pages.
    /// Without it, searches are unlimited.
    pub fn size_limit(mut self, limit: u32) -> Self {
        self.size_limit = Some(limit);
        self
    }

    /// Also listens on `ldaps://` (see [`Slapd::ldaps_url`]) and offers StartTLS on
    /// `ldap://`, with a certificate for 127.0.0.1 signed by a private CA
    /// ([`Slapd::ca_certificate`]), both made by `openssl`.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Seeds `count` generated people (see [`Slapd::person_ldif`]) before the server
    /// starts, with `slapadd`: 20 000 entries take a few seconds.
    pub fn people(mut self, count: usize) -> Self {
        self.people = count;
        self
    }

    /// Seeds extra entries (LDIF, without `changetype`) before the server starts.
    pub fn ldif(mut self, ldif: impl Into<String>) -> Self {
        self.ldif.push(ldif.into());
        self
    }

    /// Writes the configuration, seeds the data, starts `slapd` and waits until it
    /// answers.
    pub fn start(self) -> Result<Slapd, SlapdError> {
        let slapd = find_program("slapd")?;
        let slapadd = find_program("slapadd")?;
        let ldapsearch = find_program("ldapsearch")?;
        let dir = tempfile::Builder::new()
            .prefix("contactsync-slapd-")
            .tempdir()
            .map_err(io("creating a temporary directory"))?;
        let root = dir.path().to_path_buf();
        fs::create_dir(root.join("db")).map_err(io("creating the database directory"))?;
        if self.tls {
            // A private CA and a server certificate it signs, as a company directory has:
            // clients trust it with `ca_file`, or not at all.
            find_program("openssl")?;
            crate::tls::private_ca(&root).map_err(|output| SlapdError::Command {
                command: "openssl".into(),
                status: "failed".into(),
                output,
            })?;
        }
        let conf = root.join("slapd.conf");
        fs::write(&conf, self.config(&root)).map_err(io("writing slapd.conf"))?;

        let seed = root.join("seed.ldif");
        {
            let file = fs::File::create(&seed).map_err(io("writing seed.ldif"))?;
            let mut out = std::io::BufWriter::new(file);
            let write = |out: &mut std::io::BufWriter<fs::File>, text: &str| {
                out.write_all(text.as_bytes())
                    .map_err(io("writing seed.ldif"))
            };
            write(&mut out, &base_ldif())?;
            for i in 0..self.people {
                write(&mut out, "\n")?;
                write(&mut out, &Slapd::person_ldif(i))?;
            }
            for extra in &self.ldif {
                write(&mut out, "\n")?;
                write(&mut out, extra.trim())?;
                write(&mut out, "\n")?;
            }
            out.flush().map_err(io("writing seed.ldif"))?;
        }
        run(Command::new(&slapadd)
            .arg("-q")
            .arg("-f")
            .arg(&conf)
            .arg("-l")
            .arg(&seed))?;

        let mut last_error = String::new();
        for _attempt in 0..3 {
            let port = free_port()?;
            let tls_port = if self.tls { Some(free_port()?) } else { None };
            let log_path = root.join("slapd.log");
            let log = fs::File::create(&log_path).map_err(io("creating slapd.log"))?;
            let url = format!("ldap://127.0.0.1:{port}");
            let ldaps_url = tls_port.map(|p| format!("ldaps://127.0.0.1:{p}"));
            let listeners = match &ldaps_url {
                Some(ldaps) => format!("{url}/ {ldaps}/"),
                None => format!("{url}/"),
            };
            let child = Command::new(&slapd)
                .arg("-f")
                .arg(&conf)
                .arg("-h")
                .arg(listeners)
                .arg("-d")
                .arg("0")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(io(format!("starting {}", slapd.display())))?;
            let mut child = Some(child);
            match wait_until_answering(&mut child, &ldapsearch, &url, &log_path) {
                Ok(()) => {
                    return Ok(Slapd {
                        child,
                        url,
                        ldaps_url,
                        ldapsearch,
                        dir,
                    })
                }
                Err(e) => {
                    last_error = e;
                    stop(&mut child);
                }
            }
        }
        Err(SlapdError::NotStarted(last_error))
    }

    fn config(&self, root: &Path) -> String {
        let root = root.display();
        let mut conf = String::new();
        for schema in ["core", "cosine", "nis", "inetorgperson"] {
            let _ = writeln!(conf, "include /etc/ldap/schema/{schema}.schema");
        }
        if self.tls {
            let _ = writeln!(conf, "TLSCertificateFile {root}/cert.pem");
            let _ = writeln!(conf, "TLSCertificateKeyFile {root}/key.pem");
        }
        let limit = match self.size_limit {
            Some(n) => format!("sizelimit size.soft={n} size.hard={n} size.prtotal=unlimited"),
            None => "sizelimit unlimited".to_string(),
        };
        let _ = write!(
            conf,
            r#"modulepath /usr/lib/ldap
moduleload back_mdb
moduleload syncprov
pidfile {root}/slapd.pid
{limit}
database mdb
maxsize 1073741824
suffix "{BASE_DN}"
rootdn "{ADMIN_DN}"
rootpw {ADMIN_PASSWORD}
directory {root}/db
index objectClass eq
index entryCSN,entryUUID eq
index modifyTimestamp eq
index employeeNumber eq
access to attrs=userPassword by self write by anonymous auth by * none
access to * by * read
overlay syncprov
"#
        );
        conf
    }
}

/// A running `slapd`, stopped (SIGTERM, then waited for) and its files removed on drop.
#[derive(Debug)]
pub struct Slapd {
    child: Option<Child>,
    url: String,
    ldaps_url: Option<String>,
    ldapsearch: PathBuf,
    dir: tempfile::TempDir,
}

impl Slapd {
    /// How to configure a server; [`SlapdBuilder::start`] starts it.
    pub fn builder() -> SlapdBuilder {
        SlapdBuilder::default()
    }

    /// A server with the base entries only (the suffix, `ou=people`, the reader).
    pub fn start() -> Result<Slapd, SlapdError> {
        Self::builder().start()
    }

    /// `ldap://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `ldaps://127.0.0.1:PORT` when started with [`SlapdBuilder::tls`].
    pub fn ldaps_url(&self) -> Option<&str> {
        self.ldaps_url.as_deref()
    }

    /// The private CA's certificate (PEM) that signed the server's, when started with
    /// [`SlapdBuilder::tls`].
    pub fn ca_certificate(&self) -> Option<PathBuf> {
        self.certificate().map(|_| self.dir.path().join("ca.pem"))
    }

    /// The server's certificate (PEM) when started with [`SlapdBuilder::tls`].
    pub fn certificate(&self) -> Option<PathBuf> {
        self.ldaps_url
            .as_ref()
            .map(|_| self.dir.path().join("cert.pem"))
    }

    /// The root DN.
    pub fn admin_dn(&self) -> &str {
        ADMIN_DN
    }

    /// The root DN's password.
    pub fn admin_password(&self) -> &str {
        ADMIN_PASSWORD
    }

    /// The suffix, `dc=example,dc=org`.
    pub fn base_dn(&self) -> &str {
        BASE_DN
    }

    /// `ou=people,dc=example,dc=org`.
    pub fn people_dn(&self) -> &str {
        PEOPLE_DN
    }

    /// An ordinary read-only account, subject to [`SlapdBuilder::size_limit`].
    pub fn reader_dn(&self) -> &str {
        READER_DN
    }

    /// The reader's password.
    pub fn reader_password(&self) -> &str {
        READER_PASSWORD
    }

    /// The server's temporary directory (configuration, database, `slapd.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The DN of generated person `i`: `uid=person00007,ou=people,dc=example,dc=org`.
    pub fn person_dn(i: usize) -> String {
        format!("uid=person{i:05},{PEOPLE_DN}")
    }

    /// Generated person `i` as LDIF (an add without `changetype`): an inetOrgPerson
    /// with `employeeNumber` `E00007`, `mail` `person00007@example.org`, given name,
    /// surname, display name, phone, organisation, department, title and language.
    pub fn person_ldif(i: usize) -> String {
        format!(
            "dn: {dn}\n\
             objectClass: inetOrgPerson\n\
             uid: person{i:05}\n\
             cn: Given{i} Family{i}\n\
             sn: Family{i}\n\
             givenName: Given{i}\n\
             displayName: Given{i} Family{i}\n\
             employeeNumber: E{i:05}\n\
             mail: person{i:05}@example.org\n\
             telephoneNumber: +32 2 555 {phone:04}\n\
             o: Example\n\
             departmentNumber: D{dept}\n\
             title: Engineer\n\
             preferredLanguage: en\n",
            dn = Self::person_dn(i),
            phone = i % 10_000,
            dept = i % 10,
        )
    }

    /// Adds entries (LDIF without `changetype`) as the root DN, with `ldapadd`.
    pub fn ldapadd(&self, ldif: &str) -> Result<(), SlapdError> {
        self.ldap_tool("ldapadd", &[], ldif)
    }

    /// Applies changes (LDIF with `changetype`) as the root DN, with `ldapmodify`.
    pub fn ldapmodify(&self, ldif: &str) -> Result<(), SlapdError> {
        self.ldap_tool("ldapmodify", &[], ldif)
    }

    /// Deletes the entry `dn` as the root DN, with `ldapdelete`.
    pub fn ldapdelete(&self, dn: &str) -> Result<(), SlapdError> {
        self.ldap_tool("ldapdelete", &[dn], "")
    }

    /// Reads the entry `dn` as the root DN: its attributes as `(name, value)` pairs in
    /// the server's order (operational ones included when named in `attrs`, all user
    /// attributes when `attrs` is empty), or `None` when it does not exist.
    pub fn entry(
        &self,
        dn: &str,
        attrs: &[&str],
    ) -> Result<Option<Vec<(String, String)>>, SlapdError> {
        let mut cmd = Command::new(&self.ldapsearch);
        cmd.args([
            "-x",
            "-LLL",
            "-o",
            "ldif-wrap=no",
            "-H",
            &self.url,
            "-D",
            ADMIN_DN,
            "-w",
        ])
        .arg(ADMIN_PASSWORD)
        .args(["-s", "base", "-b", dn, "(objectClass=*)"])
        .args(attrs);
        let output = cmd.output().map_err(io("running ldapsearch"))?;
        match output.status.code() {
            Some(0) => {}
            Some(32) => return Ok(None),
            _ => {
                return Err(SlapdError::Command {
                    command: format!("ldapsearch -b {dn}"),
                    status: output.status.to_string(),
                    output: String::from_utf8_lossy(&output.stderr).into_owned(),
                })
            }
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let mut pairs = Vec::new();
        for line in text.lines() {
            if let Some((name, value)) = line.split_once(": ") {
                if name != "dn" {
                    pairs.push((name.to_string(), value.to_string()));
                }
            } else if let Some((name, value)) = line.split_once(":: ") {
                pairs.push((name.to_string(), format!("(base64) {value}")));
            }
        }
        Ok(Some(pairs))
    }

    /// The values of `attr` in entry `dn` (empty when the entry or attribute is absent).
    pub fn values(&self, dn: &str, attr: &str) -> Result<Vec<String>, SlapdError> {
        Ok(self
            .entry(dn, &[attr])?
            .unwrap_or_default()
            .into_iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case(attr))
            .map(|(_, value)| value)
            .collect())
    }

    fn ldap_tool(&self, tool: &'static str, args: &[&str], stdin: &str) -> Result<(), SlapdError> {
        let program = find_program(tool)?;
        let mut child = Command::new(program)
            .args(["-x", "-H", &self.url, "-D", ADMIN_DN, "-w", ADMIN_PASSWORD])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(format!("running {tool}")))?;
        // Written from a thread of its own while the output is read: a long LDIF
        // makes the tool print a line an entry, and a full stdout pipe would stop it
        // reading its stdin while this side is still writing it.
        let input = child.stdin.take();
        let (written, output) = std::thread::scope(|scope| {
            let writer = scope.spawn(move || match input {
                Some(mut input) => input.write_all(stdin.as_bytes()),
                None => Ok(()),
            });
            let output = child.wait_with_output();
            (writer.join(), output)
        });
        let output = output.map_err(io(format!("running {tool}")))?;
        if output.status.success() {
            // A tool that succeeded read all its input; a failed write is still said.
            match written {
                Ok(result) => result.map_err(io(format!("writing to {tool}"))),
                Err(_) => Err(SlapdError::Command {
                    command: tool.to_string(),
                    status: "the thread writing its input panicked".into(),
                    output: String::new(),
                }),
            }
        } else {
            Err(SlapdError::Command {
                command: format!("{tool} {}", args.join(" ")),
                status: output.status.to_string(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
            })
        }
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn base_ldif() -> String {
    format!(
        "dn: {BASE_DN}\n\
         objectClass: dcObject\n\
         objectClass: organization\n\
         dc: example\n\
         o: Example\n\
         \n\
         dn: {PEOPLE_DN}\n\
         objectClass: organizationalUnit\n\
         ou: people\n\
         \n\
         dn: {READER_DN}\n\
         objectClass: organizationalRole\n\
         objectClass: simpleSecurityObject\n\
         cn: reader\n\
         userPassword: {READER_PASSWORD}\n"
    )
}

fn free_port() -> Result<u16, SlapdError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io("finding a free port"))?
        .port();
    Ok(port)
}

fn find_program(name: &'static str) -> Result<PathBuf, SlapdError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or(SlapdError::NotInstalled { program: name })
}

fn run(cmd: &mut Command) -> Result<(), SlapdError> {
    let output = cmd.output().map_err(io(format!("running {cmd:?}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(SlapdError::Command {
            command: format!("{cmd:?}"),
            status: output.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}

/// Waits until slapd answers a root DSE search, or exits, or 15 s pass.
fn wait_until_answering(
    child: &mut Option<Child>,
    ldapsearch: &Path,
    url: &str,
    log: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(process) = child.as_mut() {
            if let Ok(Some(status)) = process.try_wait() {
                *child = None;
                return Err(format!(
                    "slapd exited ({status}); its log: {}",
                    fs::read_to_string(log).unwrap_or_default()
                ));
            }
        }
        let answered = Command::new(ldapsearch)
            .args([
                "-x",
                "-H",
                url,
                "-b",
                "",
                "-s",
                "base",
                "-o",
                "nettimeout=1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if answered {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no answer on {} within 15 s; its log: {}",
                url,
                fs::read_to_string(log).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops slapd: SIGTERM lets it close its database cleanly; SIGKILL if it lingers.
fn stop(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        // SIGTERM lets slapd close its database cleanly; fall back to SIGKILL.
        let terminated = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if terminated && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }
}
