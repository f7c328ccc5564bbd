//! The sync run: read, validate, diff against the state, apply, record.
