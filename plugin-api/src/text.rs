//! Bounding what a plugin logs about input it could not read: a 1 MB garbage value must not
//! become a 1 MB log line (per watching service).

use std::borrow::Cow;

/// How many characters of an unreadable value a message keeps.
pub const KEPT_CHARS: usize = 120;

/// `text` as it is when short, else its first [`KEPT_CHARS`] characters, `…` and the full
/// length in bytes, so a reader still sees what the value starts with and how big it was.
pub fn cut(text: &str) -> Cow<'_, str> {
    match text.char_indices().nth(KEPT_CHARS) {
        None => Cow::Borrowed(text),
        Some((end, _)) => Cow::Owned(format!("{}… ({} bytes)", &text[..end], text.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: &str) {
        assert_eq!(cut(text), expected, "{text:?}");
    }

    #[test]
    fn long_values_are_cut_with_their_size() {
        check("", "");
        check("127.0.0.1:80", "127.0.0.1:80");
        let kept = "x".repeat(KEPT_CHARS);
        check(&kept, &kept);
        check(
            &format!("{kept}y"),
            &format!("{kept}… ({} bytes)", KEPT_CHARS + 1),
        );
        check(
            &"x".repeat(1 << 20),
            &format!("{kept}… ({} bytes)", 1 << 20),
        );
        // Characters, not bytes: a multi-byte character is never split.
        let wide = "é".repeat(KEPT_CHARS + 5);
        check(
            &wide,
            &format!("{}… ({} bytes)", "é".repeat(KEPT_CHARS), wide.len()),
        );
    }
}
