//! The query's text: `:since` found where it is a parameter (not inside a string, a
//! quoted name, a comment or a `::` cast) and turned into the server's placeholder, so
//! that the cursor is always bound, never pasted in.

/// `text` with every `:since` parameter replaced by `placeholder`, and how many there
/// were.
pub fn bind_since(text: &str, placeholder: &str) -> (String, usize) {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut found = 0;
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let skip = if rest.starts_with('\'') || rest.starts_with('"') || rest.starts_with('`') {
            // A string, a quoted name: up to the closing quote (a doubled quote stays inside).
            let quote = rest.as_bytes()[0];
            let mut j = 1;
            while j < rest.len() {
                if rest.as_bytes()[j] == quote {
                    if rest.as_bytes().get(j + 1) == Some(&quote) {
                        j += 2;
                        continue;
                    }
                    j += 1;
                    break;
                }
                j += 1;
            }
            j
        } else if rest.starts_with("--") {
            rest.find('\n').map_or(rest.len(), |n| n + 1)
        } else if rest.starts_with("/*") {
            rest.find("*/").map_or(rest.len(), |n| n + 2)
        } else if rest.starts_with("::") {
            2
        } else if rest.starts_with(":since")
            && !rest[":since".len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            out.push_str(placeholder);
            found += 1;
            i += ":since".len();
            continue;
        } else {
            rest.chars().next().map_or(1, char::len_utf8)
        };
        out.push_str(&rest[..skip]);
        i += skip;
    }
    (out, found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_bound_only_where_it_is_a_parameter() {
        let q = "SELECT a::text, ':since' AS s, \":since\" -- :since\nFROM t WHERE u > :since /* :since */ AND v >= :since_x";
        let (text, n) = bind_since(q, "$1");
        assert_eq!(n, 1);
        assert_eq!(
            text,
            "SELECT a::text, ':since' AS s, \":since\" -- :since\nFROM t WHERE u > $1 /* :since */ AND v >= :since_x"
        );
        assert_eq!(
            bind_since("x = :since OR y = :since", "?"),
            ("x = ? OR y = ?".into(), 2)
        );
        assert_eq!(bind_since("WHERE name = 'O''Brien :since'", "$1").1, 0);
    }
}
