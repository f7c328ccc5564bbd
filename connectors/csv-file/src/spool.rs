//! The CSV sink's spool: each change a run applied, framed, until its finish writes
//! the file (see [`crate::sink`]).

use contactsync_core::{ConnectorError, Contact, ContactKey};
use serde::{Deserialize, Serialize};

/// A change read back from the spool: the contact as it should be, or `None` for a
/// removal.
pub(crate) struct SpooledChange {
    pub(crate) key: ContactKey,
    pub(crate) contact: Option<Contact>,
}

/// A change as the spool holds it, after its `u32` length; the contact's
/// [`Contact::encode_binary`] body follows it to the frame's end (postcard writes a
/// byte vector a byte at a time: a first sync's million contacts spent half of this
/// sink's `apply` so).
#[derive(Serialize, Deserialize)]
struct SpoolFrame {
    key: String,
    /// Whether the contact's body follows (not for a removal).
    contact: bool,
    /// The contact's `updated_at` in microseconds since the epoch (not in the body).
    updated_at: Option<i64>,
}

/// A failure of the spool, as the sink tells it.
pub(crate) fn spool_error(e: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::Other(format!("CSV sink spool: {e}"))
}

/// `key`'s change framed for the spool, length first.
pub(crate) fn frame_change(
    key: &ContactKey,
    contact: Option<&Contact>,
) -> Result<Vec<u8>, ConnectorError> {
    let frame = SpoolFrame {
        key: key.to_string(),
        contact: contact.is_some(),
        updated_at: contact
            .and_then(|c| c.updated_at)
            .map(|t| t.timestamp_micros()),
    };
    // Room for a typical change at once, not grown a doubling at a time.
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&[0; 4]);
    let mut out = postcard::to_extend(&frame, out).map_err(spool_error)?;
    if let Some(contact) = contact {
        out = contact.encode_binary(out);
    }
    let length =
        u32::try_from(out.len() - 4).map_err(|_| spool_error("a change too large to spool"))?;
    out[..4].copy_from_slice(&length.to_le_bytes());
    Ok(out)
}

/// Reads a frame's body (what follows its length) back.
pub(crate) fn unframe_change(body: &[u8]) -> Result<SpooledChange, ConnectorError> {
    let (frame, contact): (SpoolFrame, &[u8]) =
        postcard::take_from_bytes(body).map_err(spool_error)?;
    let key = frame.key.parse().map_err(spool_error)?;
    let contact = frame
        .contact
        .then(|| Contact::decode_binary(contact).map_err(spool_error))
        .transpose()?
        .map(|mut c| {
            c.updated_at = frame
                .updated_at
                .and_then(chrono::DateTime::from_timestamp_micros);
            c
        });
    Ok(SpooledChange { key, contact })
}
