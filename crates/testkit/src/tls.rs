//! A private certificate authority and a server certificate it signs for 127.0.0.1,
//! made with `openssl`, as a company's own servers have: a client trusts them with a
//! CA file, or not at all. Used by the fixtures that serve TLS (slapd, PostgreSQL).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The files of a private CA and its server certificate, in one directory.
#[derive(Debug, Clone)]
pub struct PrivateCa {
    /// The CA's certificate (PEM): what a client trusts.
    pub ca: PathBuf,
    /// The server's certificate (PEM), for `IP:127.0.0.1`.
    pub cert: PathBuf,
    /// The server's key (PEM, unencrypted).
    pub key: PathBuf,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("running openssl (is it installed?): {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "`{cmd:?}` failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Creates the CA and the server certificate in `dir` (`ca.pem`, `cert.pem`, `key.pem`).
pub fn private_ca(dir: &Path) -> Result<PrivateCa, String> {
    let openssl = "openssl";
    run(Command::new(openssl)
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=contactsync test CA"])
        .arg("-keyout")
        .arg(dir.join("ca-key.pem"))
        .arg("-out")
        .arg(dir.join("ca.pem")))?;
    run(Command::new(openssl)
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("server.csr")))?;
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| format!("writing server.ext: {e}"))?;
    run(Command::new(openssl)
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(dir.join("server.csr"))
        .arg("-CA")
        .arg(dir.join("ca.pem"))
        .arg("-CAkey")
        .arg(dir.join("ca-key.pem"))
        .arg("-extfile")
        .arg(dir.join("server.ext"))
        .arg("-out")
        .arg(dir.join("cert.pem")))?;
    Ok(PrivateCa {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    })
}
