//! Bounds on user-supplied text that reaches messages, events and logs: every free-form string a
//! user (or a rank on a user's behalf) can put into a message is cut to a known length here, so
//! that a refused or failed job never echoes an unbounded string.

/// Longest echo of a user string inside an error message (characters).
pub const ECHO_CHARS: usize = 120;

/// Longest message stored with a job or an event (characters).
pub const MESSAGE_CHARS: usize = 2000;

/// `text` cut to at most `max` characters (on a character boundary), with `… (N bytes)` telling
/// how long it was when it was cut.
pub fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((end, _)) => format!("{}… ({} bytes)", &text[..end], text.len()),
    }
}

/// [`clip`] to [`ECHO_CHARS`]: a user's value quoted in an error.
pub fn echo(text: &str) -> String {
    clip(text, ECHO_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_keeps_short_text_and_cuts_long_text_on_a_char_boundary() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "abc… (4 bytes)");
        let long = "é".repeat(10_000);
        let cut = echo(&long);
        assert!(cut.chars().count() < ECHO_CHARS + 20, "{cut}");
        assert!(cut.ends_with("(20000 bytes)"), "{cut}");
    }
}
