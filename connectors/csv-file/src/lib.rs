//! CSV file source and sink (registered as csv).
