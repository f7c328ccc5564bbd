//! TLS client configurations from a CA file, for the connections that are not HTTP
//! (an LDAP directory, the PostgreSQL state) but trust a company's own CA the same way.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// The certificates of a PEM file (a `ca_file`), as DER; an error says what is wrong.
pub fn read_ca_file(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let certificates: Vec<Vec<u8>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .map(|c| c.map(|c| c.as_ref().to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{}: holds no certificate", path.display()));
    }
    Ok(certificates)
}

/// A client configuration trusting exactly `certificates` (a private CA), or, when
/// there are none, the public web roots (Mozilla's, as `webpki-roots` ships them).
pub fn client_config(certificates: &[Vec<u8>]) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    if certificates.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    for der in certificates {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| format!("ca_file: a certificate is not usable as a root: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
