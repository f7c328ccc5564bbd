//! Opening a bound connection, and turning ldap3's errors into [`ConnectorError`]s that
//! name the server and the operation but never the password.
//!
//! Both the source and the sink go through [`connect`], so TLS, timeouts and the bind
//! behave the same in both directions.

use std::time::Duration;

use contactsync_core::{ConnectorError, ExposeSecret};
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, LdapResult, Scope};

use crate::config::{Connection, TlsMode};

/// LDAP result codes (RFC 4511, appendix A) this connector acts on.
pub mod rc {
    /// `sizeLimitExceeded`
    pub const SIZE_LIMIT_EXCEEDED: u32 = 4;
    /// `noSuchObject`
    pub const NO_SUCH_OBJECT: u32 = 32;
    /// `invalidCredentials`
    pub const INVALID_CREDENTIALS: u32 = 49;
    /// `busy`
    pub const BUSY: u32 = 51;
    /// `unavailable`
    pub const UNAVAILABLE: u32 = 52;
    /// `entryAlreadyExists`
    pub const ENTRY_ALREADY_EXISTS: u32 = 68;
}

/// A name for an LDAP result code, for messages a user reads.
pub fn rc_name(code: u32) -> &'static str {
    match code {
        0 => "success",
        1 => "operationsError",
        2 => "protocolError",
        3 => "timeLimitExceeded",
        4 => "sizeLimitExceeded",
        8 => "strongerAuthRequired",
        11 => "adminLimitExceeded",
        12 => "unavailableCriticalExtension",
        13 => "confidentialityRequired",
        16 => "noSuchAttribute",
        17 => "undefinedAttributeType",
        18 => "inappropriateMatching",
        19 => "constraintViolation",
        20 => "attributeOrValueExists",
        21 => "invalidAttributeSyntax",
        32 => "noSuchObject",
        34 => "invalidDNSyntax",
        48 => "inappropriateAuthentication",
        49 => "invalidCredentials",
        50 => "insufficientAccessRights",
        51 => "busy",
        52 => "unavailable",
        53 => "unwillingToPerform",
        64 => "namingViolation",
        65 => "objectClassViolation",
        66 => "notAllowedOnNonLeaf",
        67 => "notAllowedOnRDN",
        68 => "entryAlreadyExists",
        69 => "objectClassModsProhibited",
        80 => "other",
        _ => "unknown result code",
    }
}

/// `code name: server text`.
pub fn describe(result: &LdapResult) -> String {
    let text = result.text.trim();
    if text.is_empty() {
        format!("result code {} ({})", result.rc, rc_name(result.rc))
    } else {
        format!("result code {} ({}): {text}", result.rc, rc_name(result.rc))
    }
}

/// Whether an ldap3 error means the connection (not the request) failed: the outcome of
/// the request is then unknown, and the connection must not be reused.
pub fn is_transport(error: &LdapError) -> bool {
    !matches!(
        error,
        LdapError::LdapResult { .. } | LdapError::FilterParsing | LdapError::AddNoValues
    )
}

/// An ldap3 error during `call`, as a [`ConnectorError::Call`].
/// Checks that `base` exists, with a base-scope search of it: the `check` of the source
/// and of the sink.
pub async fn check_base(
    ldap: &mut Ldap,
    base: &str,
    timeout: Duration,
) -> Result<(), ConnectorError> {
    let call = format!("search {base:?} (scope base)");
    let result = ldap
        .with_timeout(timeout)
        .search(base, Scope::Base, "(objectClass=*)", vec!["1.1"])
        .await
        .map_err(|e| call_error(&call, e, timeout))?;
    match result.1.rc {
        0 => Ok(()),
        rc::NO_SUCH_OBJECT => Err(ConnectorError::Call {
            call,
            status: None,
            message: format!("base_dn {base:?} does not exist"),
        }),
        _ => Err(ConnectorError::Call {
            call,
            status: None,
            message: describe(&result.1),
        }),
    }
}

pub fn call_error(call: impl Into<String>, error: LdapError, timeout: Duration) -> ConnectorError {
    let message = match &error {
        LdapError::Timeout { .. } => format!(
            "no answer within {} s (operation_timeout)",
            timeout.as_secs_f64()
        ),
        LdapError::LdapResult { result } => describe(result),
        other => other.to_string(),
    };
    ConnectorError::Call {
        call: call.into(),
        status: None,
        message,
    }
}

pub(crate) use contactsync_http::tls::read_ca_file;

/// A TLS client configuration trusting exactly `certificates`.
fn ca_config(certificates: &[Vec<u8>]) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    if certificates.is_empty() {
        return Err("ca_file: holds no certificate".into());
    }
    contactsync_http::tls::client_config(certificates)
}

/// Connects to the configured server, sets up TLS and binds. The connection is driven
/// by a task on the current runtime that ends when the last [`Ldap`] handle is dropped.
pub async fn connect(connection: &Connection) -> Result<Ldap, ConnectorError> {
    let mut settings = LdapConnSettings::new()
        .set_conn_timeout(connection.connect_timeout)
        .set_starttls(connection.tls == TlsMode::Starttls);
    if !connection.tls_verify && connection.tls != TlsMode::None {
        tracing::warn!(url = %connection.url, "TLS certificate verification is off (tls_verify = false)");
        settings = settings.set_no_tls_verify(true);
    } else if let Some(certificates) = &connection.ca_certificates {
        settings = settings.set_config(ca_config(certificates).map_err(|message| {
            ConnectorError::Call {
                call: format!("connect to {}", connection.url),
                status: None,
                message,
            }
        })?);
    }
    let call = format!("connect to {}", connection.url);
    let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &connection.url)
        .await
        .map_err(|e| match e {
            LdapError::Timeout { .. } => ConnectorError::Call {
                call: call.clone(),
                status: None,
                message: format!(
                    "no connection within {} s (connect_timeout)",
                    connection.connect_timeout.as_secs_f64()
                ),
            },
            other => ConnectorError::Call {
                call: call.clone(),
                status: None,
                message: other.to_string(),
            },
        })?;
    let url = connection.url.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.drive().await {
            tracing::warn!(%url, error = %e, "LDAP connection ended with an error");
        }
    });
    if let Some(bind_dn) = &connection.bind_dn {
        let password = connection
            .password
            .as_ref()
            .map(|p| p.expose_secret())
            .unwrap_or_default();
        let call = format!("bind as {bind_dn:?} to {}", connection.url);
        let result = ldap
            .with_timeout(connection.operation_timeout)
            .simple_bind(bind_dn, password)
            .await
            .map_err(|e| call_error(call.clone(), e, connection.operation_timeout))?;
        if result.rc != 0 {
            let hint = match result.rc {
                rc::INVALID_CREDENTIALS => ": check bind_dn and password",
                8 | 13 => ": the server wants TLS (set tls = \"starttls\" or use ldaps://)",
                _ => "",
            };
            return Err(ConnectorError::Auth {
                call,
                message: format!("{}{hint}", describe(&result)),
            });
        }
        tracing::debug!(url = %connection.url, %bind_dn, "bound");
    }
    Ok(ldap)
}
