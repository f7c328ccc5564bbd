//! Text as the platforms' wire formats can carry it.

use std::borrow::Cow;

/// `text` without the characters XML 1.0 cannot carry (most C0 controls, U+FFFE,
/// U+FFFF; lone surrogates cannot occur in a Rust string), for connectors that speak
/// XML: an export's stray control character would otherwise fault the whole call.
///
/// ```
/// assert_eq!(contactsync_core::text::xml_safe("Ann\u{1}Lee\tok"), "AnnLee\tok");
/// ```
pub fn xml_safe(text: &str) -> Cow<'_, str> {
    let ok = |c: char| {
        matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
    };
    if text.chars().all(ok) {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(text.chars().filter(|c| ok(*c)).collect())
    }
}
