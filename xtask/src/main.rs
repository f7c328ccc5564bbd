//! `cargo xtask`: every developer chore, in Rust.
//!
//! - `cargo xtask test`: what CI runs. Formatting, clippy with warnings as errors, and
//!   every unit, doc and end-to-end test of the workspace. Installs what the tests need
//!   from Debian's packages when it is missing (OpenLDAP's `slapd` and `ldap-utils`,
//!   PostgreSQL's server) and, into a virtualenv under `target/`, the reference SCIM
//!   server the SCIM connector is also tested against (`scim2-server`, from PyPI).
//! - `cargo xtask tidy`: the architecture's invariants (`tidy.rs`) as one report; the
//!   same checks run as tests under `cargo xtask test`.
//! - `cargo xtask new-connector NAME [--sandbox] [--source-only | --sink-only] [--no-http]`:
//!   a new connector crate of that kind (with `--sandbox`, its sandbox crate too),
//!   wired into the binary (`scaffold.rs`).
//! - `cargo xtask bench [--sizes 100000,1000000]`: generates synthetic contacts, times
//!   a first full sync and a nightly rerun, and prints records/s and peak memory.

mod bench;
mod bench_dashboard;
mod scaffold;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("bench") => bench::run(&root()?, &args[1..]),
        Some("tidy") => tidy::run(&root()?),
        Some("new-connector") => scaffold::run(&root()?, &args[1..]),
        // The bench's anchor, run as a process of its own so that its time and peak
        // memory are measured as contactsync's are.
        Some("anchor-diff") => bench::anchor_diff(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask test | cargo xtask tidy | cargo xtask bench [--sizes N,N]"
            );
            std::process::exit(2);
        }
    }
}

/// The workspace root.
pub fn root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask lives in the workspace root")?
        .to_path_buf())
}

/// Runs a command in the workspace root, failing with its name when it fails.
pub fn run(program: &str, args: &[&str], dir: &Path) -> Result<()> {
    eprintln!("$ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .status()
        .with_context(|| format!("starting {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn test() -> Result<()> {
    let root = root()?;
    let cargo = cargo();
    ensure_slapd()?;
    ensure_postgres()?;
    ensure_mariadb()?;
    ensure_chromium()?;
    ensure_scim2_server(&root)?;
    run(&cargo, &["fmt", "--all", "--", "--check"], &root)
        .context("formatting differs: run `cargo fmt --all`")?;
    run(
        &cargo,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &root,
    )?;
    // A production build leaves the sandboxes out; it must still build.
    run(
        &cargo,
        &["check", "-p", "contactsync", "--no-default-features"],
        &root,
    )?;
    run(&cargo, &["test", "--workspace", "--no-fail-fast"], &root)?;
    // The guide's first step must keep working: scaffold a connector in a copy.
    scaffold::check_in_copy(&root)?;
    eprintln!("xtask test: all checks passed");
    Ok(())
}

fn found(program: &str) -> bool {
    [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ]
    .iter()
    .any(|dir| Path::new(dir).join(program).exists())
}

/// The LDAP tests run against a real OpenLDAP server; install it when missing.
fn ensure_slapd() -> Result<()> {
    if found("slapd") && found("ldapadd") {
        return Ok(());
    }
    install("the LDAP tests", &["slapd", "ldap-utils"])
}

/// The PostgreSQL state tests run against a real server (a throwaway cluster the
/// testkit starts); install the server programs when missing.
fn ensure_postgres() -> Result<()> {
    let server = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(|d| d.ok()).any(|d| {
                d.path().join("bin/initdb").exists() && d.path().join("bin/createdb").exists()
            })
        })
        .unwrap_or(false);
    if server || (found("initdb") && found("pg_ctl") && found("createdb")) {
        return Ok(());
    }
    install("the PostgreSQL state tests", &["postgresql"])
}

/// The SQL source is tested against a real MariaDB server (a throwaway one the testkit
/// starts); install the server and its client when missing.
fn ensure_mariadb() -> Result<()> {
    if (found("mariadbd") || found("mysqld"))
        && (found("mariadb-install-db") || found("mysql_install_db"))
        && (found("mariadb") || found("mysql"))
    {
        return Ok(());
    }
    install(
        "the SQL source tests",
        &["mariadb-server", "mariadb-client"],
    )
}

/// The dashboard's pages are checked in a real headless browser: Debian's Chromium.
fn ensure_chromium() -> Result<()> {
    if found("chromium") || found("chromium-browser") || found("google-chrome") {
        return Ok(());
    }
    install("the dashboard's browser tests", &["chromium"])
}

/// The version of scim2-server the SCIM connector is tested against.
const SCIM2_SERVER: &str = "scim2-server==0.8.3";

/// The SCIM connector is also tested against scim2-server, the python-scim project's
/// reference server, from PyPI: installed into a virtualenv under `target/` (where the
/// testkit finds it) when missing, with Debian's Python when the machine has none.
fn ensure_scim2_server(root: &Path) -> Result<()> {
    let venv = root.join("target/scim2-server");
    let program = venv.join("bin/scim2-server");
    let marker = venv.join(SCIM2_SERVER);
    if program.exists() && marker.exists() {
        return Ok(());
    }
    if !found("python3") && which("python3").is_none() {
        install("the SCIM tests", &["python3", "python3-venv"])?;
    }
    eprintln!("xtask: installing {SCIM2_SERVER} into {}", venv.display());
    let venv_text = venv.to_string_lossy().to_string();
    if run("python3", &["-m", "venv", "--clear", &venv_text], root).is_err() {
        // Debian's python3 needs its venv module as a package of its own.
        install("the SCIM tests", &["python3-venv"])?;
        run("python3", &["-m", "venv", "--clear", &venv_text], root)?;
    }
    let pip = venv.join("bin/pip").to_string_lossy().to_string();
    run(
        &pip,
        &[
            "install",
            "--quiet",
            "--disable-pip-version-check",
            SCIM2_SERVER,
        ],
        root,
    )
    .context("installing scim2-server from PyPI")?;
    std::fs::write(&marker, "installed by cargo xtask test\n").context("marking the virtualenv")?;
    Ok(())
}

/// A program on `PATH`.
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.exists())
}

/// Installs Debian `packages` (with sudo unless root).
fn install(purpose: &str, packages: &[&str]) -> Result<()> {
    let names = packages.join(" ");
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!("{purpose} need {names}: install them with your package manager");
    }
    eprintln!("xtask: installing {names} for {purpose}");
    let sudo = if unsafe { libc::geteuid() } == 0 {
        None
    } else {
        Some("sudo")
    };
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = match sudo {
            Some(s) => {
                let mut c = Command::new(s);
                c.arg("apt-get");
                c
            }
            None => Command::new("apt-get"),
        };
        let status = cmd
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed: install {names} by hand", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend_from_slice(packages);
    apt(&args)?;
    Ok(())
}
