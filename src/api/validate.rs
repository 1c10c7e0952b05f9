//! Input rules of API v1, checked at the edge before anything reaches the store.

use super::error::ApiError;
use crate::{chars, username};

pub use crate::wire::schema::{
    MAX_CHANNEL_NAME_CHARS, MAX_CLIENT_ID_CHARS, MAX_INITIAL_MEMBERS, MAX_TEXT_CHARS, pattern,
};

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
    // What a deleted account's username reads: no one may pass as one.
    if username::skeleton(&folded) == username::skeleton("deleted") {
        return Err(ApiError::invalid_field(
            "username",
            "this name is reserved: it is what deleted accounts are shown as",
        ));
    }
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

/// A reaction's emoji: one emoji as Unicode defines them (with its skin tone, if any),
/// answered in its fully qualified form so that one emoji is stored one way. Anything
/// else names no reaction: `404`, as a path segment that is not an id (no schema can
/// state which strings are emoji, so the contract lists this answer, not a 400).
pub fn emoji(raw: &str) -> Result<&'static str, ApiError> {
    if raw.len() <= MAX_EMOJI_BYTES
        && let Some(e) = emojis::get(raw)
    {
        return Ok(e.as_str());
    }
    Err(ApiError::not_found_because(
        "no such reaction: the path's last part must be one Unicode emoji, e.g. 👍, \
         percent-encoded",
    ))
}

/// Longer than any emoji (the longest ZWJ sequences are ~35 bytes of UTF-8).
const MAX_EMOJI_BYTES: usize = 64;

/// A display name: as a channel name (not blank, no control, bidi or line-separator
/// character), 1–64 characters.
pub fn display_name(name: &str) -> Result<(), ApiError> {
    let n = name.chars().count();
    let bad = chars::is_blank(name)
        || n > MAX_DISPLAY_NAME_CHARS
        || name.chars().any(|c| {
            chars::is_control(c)
                || chars::is_bidi_override(c)
                || chars::is_bidi_mark(c)
                || matches!(c, '\u{2028}' | '\u{2029}')
        });
    if bad {
        return Err(ApiError::invalid_field(
            "display_name",
            "display_name must be 1–64 characters, not only whitespace, with no control, bidi or line-separator character",
        ));
    }
    Ok(())
}

const MAX_DISPLAY_NAME_CHARS: usize = 64;
const MAX_ABOUT_CHARS: usize = 1000;

/// An about text: the rules of a message's text, up to 1000 characters.
pub fn about(text: &str) -> Result<(), ApiError> {
    if text.chars().count() > MAX_ABOUT_CHARS {
        return Err(ApiError::invalid_field(
            "about",
            "about must be at most 1000 characters",
        ));
    }
    self::text(text).map_err(|_| {
        ApiError::invalid_field(
            "about",
            "about must not be only whitespace, nor hold control characters (but newline and \
             tab) or bidi overrides",
        )
    })
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

    /// Characters the rules treat specially, and a few plain ones.
    const POOL: &[char] = &[
        'a',
        'Z',
        '0',
        '9',
        '_',
        '.',
        '-',
        ' ',
        'é',
        '日',
        '🎉',
        '\n',
        '\t',
        '\r',
        '\u{0}',
        '\u{1b}',
        '\u{7f}',
        '\u{85}',
        '\u{9b}',
        '\u{a0}',
        '\u{ad}',
        '\u{61c}',
        '\u{180e}',
        '\u{2003}',
        '\u{200b}',
        '\u{200d}',
        '\u{200e}',
        '\u{2028}',
        '\u{202e}',
        '\u{2060}',
        '\u{2066}',
        '\u{3000}',
        '\u{3164}',
        '\u{fe0f}',
        '\u{feff}',
        '\u{e0001}',
        '\u{e0100}',
        'Ａ',
        'ﬁ',
    ];

    fn matches(pattern: &str, s: &str, min: usize, max: usize) -> bool {
        let n = s.chars().count();
        regex::Regex::new(pattern).unwrap().is_match(s) && (min..=max).contains(&n)
    }

    proptest::proptest! {
        /// The document's patterns say exactly what the rules accept (for usernames: what
        /// they accept typed in ASCII; folding accepts more).
        #[test]
        fn patterns_state_the_rules(picks in proptest::collection::vec(0..POOL.len(), 0..12)) {
            let s: String = picks.iter().map(|&i| POOL[i]).collect();
            proptest::prop_assert_eq!(matches(pattern::TEXT, &s, 1, MAX_TEXT_CHARS), text(&s).is_ok(), "{:?}", s);
            proptest::prop_assert_eq!(
                matches(pattern::CHANNEL_NAME, &s, 1, MAX_CHANNEL_NAME_CHARS),
                channel_name(&s).is_ok(),
                "{:?}", s
            );
            if s.is_ascii() {
                proptest::prop_assert_eq!(
                    matches(pattern::USERNAME, &s, username::MIN_CHARS, username::MAX_CHARS),
                    username(&s).is_ok(),
                    "{:?}", s
                );
            } else if matches(pattern::USERNAME, &s, 3, 32) {
                proptest::prop_assert!(username(&s).is_ok(), "{:?}", s);
            }
        }
    }

    #[test]
    fn the_id_pattern_is_the_positive_i64s() {
        let id = regex::Regex::new(pattern::ID).unwrap();
        for ok in [
            "1",
            "42",
            "386391145204154368",
            "9223372036854775807",
            "9223372036854775799",
        ] {
            assert!(id.is_match(ok), "{ok}");
            assert!(super::super::extract::parse_id(ok).is_some(), "{ok}");
        }
        for bad in [
            "",
            "0",
            "01",
            "+1",
            "-1",
            "9223372036854775808",
            "9999999999999999999",
            "1 ",
        ] {
            assert!(!id.is_match(bad), "{bad}");
            assert!(super::super::extract::parse_id(bad).is_none(), "{bad}");
        }
    }
}
