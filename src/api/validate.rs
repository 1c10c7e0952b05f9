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

/// The rules above as JSON Schema patterns for the OpenAPI document, so a client can check
/// a value before sending it. Written for ECMA-262, Python's `re` and the `regex` crate
/// alike: BMP characters as `\uXXXX`, the two supplementary ranges of invisible characters
/// (tags, variation selectors) as literal characters, no look-around. The tests hold each
/// to its rule.
pub mod pattern {
    /// A positive decimal id (1 to 2^63 − 1), without sign or leading zeros.
    pub const ID: &str = "^(?:[1-9][0-9]{0,17}|[1-8][0-9]{18}|9[0-1][0-9]{17}|92[0-1][0-9]{16}\
        |922[0-2][0-9]{15}|9223[0-2][0-9]{14}|92233[0-6][0-9]{13}|922337[0-1][0-9]{12}\
        |92233720[0-2][0-9]{10}|922337203[0-5][0-9]{9}|9223372036[0-7][0-9]{8}\
        |92233720368[0-4][0-9]{7}|922337203685[0-3][0-9]{6}|9223372036854[0-6][0-9]{5}\
        |92233720368547[0-6][0-9]{4}|922337203685477[0-4][0-9]{3}|9223372036854775[0-7][0-9]{2}\
        |922337203685477580[0-6]|9223372036854775807)$";

    /// A new username as typed in ASCII: letters (any case), digits and single `_ . -`
    /// between them, with at least one letter. (Compatible forms such as fullwidth letters
    /// fold into such a name and are accepted too.)
    pub const USERNAME: &str = "^(?:[0-9]+[._-])*[0-9]*[A-Za-z][A-Za-z0-9]*(?:[._-][A-Za-z0-9]+)*$";

    /// Message text: no control character but newline and tab, no bidi override or
    /// isolate, and at least one character that is neither whitespace nor invisible.
    pub const TEXT: &str = concat!(
        "^[\\t\\n \\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000",
        "\\u00AD\\u034F\\u115F\\u1160\\u17B4\\u17B5\\u180B-\\u180F\\u200B-\\u200F\\u2060-\\u2064",
        "\\u3164\\uFE00-\\uFE0F\\uFEFF\\uFFA0\\u061C\u{E0000}-\u{E007F}\u{E0100}-\u{E01EF}]*",
        "[^\\u0000-\\u0020\\u007F-\\u00A0\\u202A-\\u202E\\u2066-\\u2069",
        "\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000",
        "\\u00AD\\u034F\\u115F\\u1160\\u17B4\\u17B5\\u180B-\\u180F\\u200B-\\u200F\\u2060-\\u2064",
        "\\u3164\\uFE00-\\uFE0F\\uFEFF\\uFFA0\\u061C\u{E0000}-\u{E007F}\u{E0100}-\u{E01EF}]",
        "[^\\u0000-\\u0008\\u000B-\\u001F\\u007F-\\u009F\\u202A-\\u202E\\u2066-\\u2069]*$",
    );

    /// A channel name: no control character, line or paragraph separator or bidi control
    /// (override, isolate or mark), and at least one character that is neither whitespace
    /// nor invisible.
    pub const CHANNEL_NAME: &str = concat!(
        "^[ \\u00A0\\u1680\\u2000-\\u200A\\u202F\\u205F\\u3000",
        "\\u00AD\\u034F\\u115F\\u1160\\u17B4\\u17B5\\u180B-\\u180F\\u200B-\\u200D\\u2060-\\u2064",
        "\\u3164\\uFE00-\\uFE0F\\uFEFF\\uFFA0\u{E0000}-\u{E007F}\u{E0100}-\u{E01EF}]*",
        "[^\\u0000-\\u0020\\u007F-\\u00A0\\u061C\\u200E\\u200F\\u2028\\u2029\\u202A-\\u202E",
        "\\u2066-\\u2069\\u1680\\u2000-\\u200A\\u202F\\u205F\\u3000",
        "\\u00AD\\u034F\\u115F\\u1160\\u17B4\\u17B5\\u180B-\\u180F\\u200B-\\u200D\\u2060-\\u2064",
        "\\u3164\\uFE00-\\uFE0F\\uFEFF\\uFFA0\u{E0000}-\u{E007F}\u{E0100}-\u{E01EF}]",
        "[^\\u0000-\\u001F\\u007F-\\u009F\\u061C\\u200E\\u200F\\u2028\\u2029\\u202A-\\u202E",
        "\\u2066-\\u2069]*$",
    );
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
