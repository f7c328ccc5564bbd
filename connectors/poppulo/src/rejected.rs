//! The rows an import did not take, as Poppulo reports them
//! (`GET …/subscriber_import/{id}/invalid_subscribers`): a `text/csv` of three sections
//! one after another, each a quoted title line (`"Invalid Subscribers"`,
//! `"Duplicate Subscribers"`, `"Opted-out Subscribers"`), the header of the submitted
//! columns, then the rows.
//!
//! Read liberally: titles in any case or spacing, blank lines, a section without rows
//! or even without a header, extra columns, rows of a different length.

/// Why a row was not imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectionKind {
    /// Rejected, typically by validation.
    Invalid,
    /// Skipped: the email was seen earlier in the same import.
    Duplicate,
    /// Skipped: the person opted out themselves.
    OptedOut,
}

/// One rejected row: the section it was in and its email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRow {
    /// The section.
    pub kind: RejectionKind,
    /// The row's email, as written.
    pub email: String,
}

fn section_title(record: &csv::StringRecord) -> Option<RejectionKind> {
    let non_empty: Vec<&str> = record
        .iter()
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .collect();
    if non_empty.len() != 1 {
        return None;
    }
    let title: String = non_empty[0]
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect();
    if !title.ends_with("subscribers") && !title.ends_with("records") {
        return None;
    }
    if title.starts_with("invalid") {
        Some(RejectionKind::Invalid)
    } else if title.starts_with("duplicate") {
        Some(RejectionKind::Duplicate)
    } else if title.starts_with("optedout")
        || title.starts_with("optout")
        || title.starts_with("previouslyoptedout")
    {
        Some(RejectionKind::OptedOut)
    } else {
        None
    }
}

/// Parses the CSV. `columns` are the columns submitted (their `email` position is the
/// fallback when a section has no header). Rows before any title are ignored.
pub fn parse_rejected(text: &str, columns: &[String]) -> Result<Vec<RejectedRow>, String> {
    let fallback_email = columns
        .iter()
        .position(|c| c.trim().eq_ignore_ascii_case("email"))
        .unwrap_or(0);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.trim_start_matches('\u{feff}').as_bytes());
    let mut out = Vec::new();
    let mut section: Option<RejectionKind> = None;
    let mut email_col = fallback_email;
    let mut expect_header = false;
    for record in reader.records() {
        let record = record.map_err(|e| format!("unreadable invalid-subscribers CSV: {e}"))?;
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        if let Some(kind) = section_title(&record) {
            section = Some(kind);
            email_col = fallback_email;
            expect_header = true;
            continue;
        }
        let Some(kind) = section else { continue };
        if expect_header {
            expect_header = false;
            if let Some(i) = record
                .iter()
                .position(|f| f.trim().eq_ignore_ascii_case("email"))
            {
                email_col = i;
                continue;
            }
            // No header: this is already a row.
        }
        if let Some(email) = record.get(email_col).map(str::trim) {
            out.push(RejectedRow {
                kind,
                email: email.to_string(),
            });
        }
    }
    Ok(out)
}
