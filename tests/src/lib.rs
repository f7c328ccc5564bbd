//! End-to-end scenarios live in `tests/*.rs`; this library holds their shared helpers.
