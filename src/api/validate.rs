//! Input rules of API v1, checked at the edge before anything reaches the store.

use super::error::ApiError;
use crate::{chars, username};

pub const MAX_TEXT_CHARS: usize = 4000;
pub const MAX_CLIENT_ID_CHARS: usize = 64;
pub const MAX_CHANNEL_NAME_CHARS: usize = 100;
pub const MAX_INITIAL_MEMBERS: usize = 1000;

/// A new account's name, folded (NFKC, lower case: the form stored and shown), then held
/// to the rules of [`crate::username::check`]. Returns the folded name.
pub fn username(raw: &str) -> Result<String, ApiError> {
    // Folding is linear, but a name far over the limit is not worth folding.
    if raw.chars().count() > 4 * username::MAX_CHARS {
        return Err(ApiError::invalid_field(
            "username",
            "username must be 3–32 characters",
        ));
    }
    let folded = username::fold(raw);
    username::check(&folded).map_err(|why| ApiError::invalid_field("username", why))?;
    Ok(folded)
}

/// 8–1024 characters.
pub fn password(password: &str) -> Result<(), ApiError> {
    let n = password.chars().count();
    if !(8..=1024).contains(&n) {
        return Err(ApiError::invalid_field(
            "password",
            "password must be 8–1024 characters",
        ));
    }
    Ok(())
}

/// 1–4000 characters, not only whitespace and invisible characters, with no control
/// character but newline and tab, and no bidi override or isolate. Stored as sent:
/// nothing is trimmed.
pub fn text(text: &str) -> Result<(), ApiError> {
    if chars::is_blank(text) {
        return Err(ApiError::text_empty());
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(ApiError::text_too_long(MAX_TEXT_CHARS));
    }
    if let Some(c) = text
        .chars()
        .find(|&c| (chars::is_control(c) && c != '\n' && c != '\t') || chars::is_bidi_override(c))
    {
        return Err(ApiError::invalid_field(
            "text",
            format!(
                "text must not contain U+{:04X}: control characters (other than newline and \
                 tab) and bidi overrides or isolates (U+202A–U+202E, U+2066–U+2069) are refused",
                c as u32
            ),
        ));
    }
    Ok(())
}

/// 1–64 characters.
pub fn client_id(id: &str) -> Result<(), ApiError> {
    let n = id.chars().count();
    if !(1..=MAX_CLIENT_ID_CHARS).contains(&n) {
        return Err(ApiError::invalid_field(
            "client_id",
            "client_id must be 1–64 characters",
        ));
    }
    Ok(())
}

/// 1–100 characters, not only whitespace and invisible characters, with no control
/// character, bidi control (override, isolate or mark) or line separator.
pub fn channel_name(name: &str) -> Result<(), ApiError> {
    let n = name.chars().count();
    if chars::is_blank(name) || n > MAX_CHANNEL_NAME_CHARS {
        return Err(ApiError::invalid_field(
            "name",
            "name must be 1–100 characters, not only whitespace or invisible characters",
        ));
    }
    if let Some(c) = name.chars().find(|&c| {
        chars::is_control(c)
            || chars::is_bidi_override(c)
            || chars::is_bidi_mark(c)
            || matches!(c, '\u{2028}' | '\u{2029}')
    }) {
        return Err(ApiError::invalid_field(
            "name",
            format!(
                "name must not contain U+{:04X}: control characters, line separators and bidi \
                 controls are refused",
                c as u32
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_folded_then_checked() {
        assert_eq!(username("Alice_1").unwrap(), "alice_1");
        assert_eq!(username("ＡＬＩＣＥ").unwrap(), "alice");
        for ok in ["abc", "a.b-c", &"x".repeat(32)] {
            assert!(username(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ab",
            "with space",
            "émile",
            "semi;colon",
            &"x".repeat(33),
            "",
            "...",
            "123",
            "ali\u{202E}ce",
            "ali\u{200B}ce",
        ] {
            let e = username(bad).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("username"), "{bad}");
        }
    }

    #[test]
    fn texts_refuse_controls_and_bidi_overrides() {
        assert!(text("line\nnext\ttab").is_ok());
        assert!(text("\u{200F}marked").is_ok());
        for bad in [
            "\u{1b}[31mred",
            "a\u{0}b",
            "a\rb",
            "del\u{7f}",
            "c1\u{9b}2J",
            "abc\u{202E}txt",
            "x\u{2066}y\u{2069}",
        ] {
            let e = text(bad).unwrap_err();
            assert_eq!(
                (e.code, e.field.as_deref()),
                ("invalid_field", Some("text")),
                "{bad:?}"
            );
        }
        for blank in [
            "\u{200B}",
            "\u{200B}\u{200C}\u{200D}\u{FEFF}",
            " \u{2060}\n",
        ] {
            assert_eq!(text(blank).unwrap_err().code, "text_empty", "{blank:?}");
        }
    }

    #[test]
    fn channel_names_refuse_controls_and_bidi_controls() {
        for bad in [
            "a\nb",
            "tab\there",
            "\u{1b}[2J",
            "\u{202E}cba",
            "a\u{200E}b",
            "\u{200B}\u{FEFF}",
            "a\u{2028}b",
        ] {
            let e = channel_name(bad).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("name"), "{bad:?}");
        }
        assert!(channel_name("général 🎉").is_ok());
    }

    #[test]
    fn texts_count_unicode_scalars() {
        assert!(text(&"é".repeat(4000)).is_ok());
        assert_eq!(text(&"é".repeat(4001)).unwrap_err().code, "text_too_long");
        assert_eq!(text(" \n\t").unwrap_err().code, "text_empty");
        assert_eq!(text("").unwrap_err().code, "text_empty");
        assert!(text(" padded ").is_ok());
    }

    #[test]
    fn client_ids_and_names() {
        assert!(client_id(&"c".repeat(64)).is_ok());
        assert!(client_id(&"c".repeat(65)).is_err());
        assert!(client_id("").is_err());
        assert!(channel_name("general").is_ok());
        assert!(channel_name("  ").is_err());
        assert!(channel_name(&"n".repeat(101)).is_err());
        assert!(password("short").is_err());
        assert!(password("long enough").is_ok());
    }
}
