//! The one HTTP layer connectors share: timeouts, retries that honour Retry-After, redaction.
