//! Character classes the input rules and the CLI share: controls, bidi controls and
//! invisible characters, and escaping what a terminal would act on instead of print.

use std::borrow::Cow;
use std::fmt::Write as _;

/// C0 controls, DEL and C1 controls (U+0000–U+001F, U+007F–U+009F).
pub fn is_control(c: char) -> bool {
    c.is_control()
}

/// Bidi embeddings, overrides and isolates (U+202A–U+202E, U+2066–U+2069): each
/// reorders how the text after it is displayed, so `abc` U+202E `txt.exe` shows
/// as `abcexe.txt`.
pub fn is_bidi_override(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Bidi marks (LRM U+200E, RLM U+200F, ALM U+061C): invisible, direction hints only.
pub fn is_bidi_mark(c: char) -> bool {
    matches!(c, '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// Characters that draw nothing: zero-width space, non-joiner and joiner, word joiner and
/// the invisible operators, the byte-order mark, the Mongolian vowel separator, soft
/// hyphen, combining grapheme joiner, Hangul fillers, Khmer inherent vowels, variation
/// selectors, tag characters, bidi marks and bidi overrides.
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{17B4}'
            | '\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200D}'
            | '\u{2060}'..='\u{2064}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{E0000}'..='\u{E007F}'
            | '\u{E0100}'..='\u{E01EF}'
    ) || is_bidi_mark(c)
        || is_bidi_override(c)
}

/// Whether `s` shows nothing: it is empty or only whitespace and invisible characters.
pub fn is_blank(s: &str) -> bool {
    s.chars().all(|c| c.is_whitespace() || is_invisible(c))
}

/// Whether a terminal printing `c` could act on it or hide it: controls (newline and tab
/// included, so an event stays on one line), bidi overrides and marks, line and paragraph
/// separators, and the zero-width characters that are never part of a visible sequence.
/// (Joiners and variation selectors are left alone: emoji sequences need them.)
fn needs_escape(c: char) -> bool {
    is_control(c)
        || is_bidi_override(c)
        || is_bidi_mark(c)
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200B}' | '\u{2060}'
                ..='\u{2064}' | '\u{FEFF}' | '\u{180E}'
        )
}

/// `s` safe to print on a terminal: `\n`, `\t`, `\r` and `\\` as those escapes, every other
/// character of [`needs_escape`] as `\u{…}`. Unambiguous: a backslash in `s` is doubled.
pub fn escape_for_terminal(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || needs_escape(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_escapes_c1_and_bidi_controls_are_escaped_for_the_terminal() {
        assert_eq!(
            escape_for_terminal("\u{1b}[31mred\u{1b}[0m"),
            "\\u{1b}[31mred\\u{1b}[0m"
        );
        assert_eq!(escape_for_terminal("a\u{9b}2Jb"), "a\\u{9b}2Jb");
        assert_eq!(escape_for_terminal("x\u{7f}"), "x\\u{7f}");
        assert_eq!(
            escape_for_terminal("abc\u{202E}txt.exe\u{2066}"),
            "abc\\u{202e}txt.exe\\u{2066}"
        );
        assert_eq!(escape_for_terminal("a\u{200F}b"), "a\\u{200f}b");
        assert_eq!(
            escape_for_terminal("one\ntwo\tthree\r"),
            "one\\ntwo\\tthree\\r"
        );
        assert_eq!(
            escape_for_terminal("zero\u{200B}width"),
            "zero\\u{200b}width"
        );
        assert_eq!(escape_for_terminal("a\u{2028}b"), "a\\u{2028}b");
    }

    #[test]
    fn printable_text_is_unchanged_and_backslashes_are_doubled() {
        for plain in [
            "hello",
            "é ü ß 日本語 مرحبا",
            "👩\u{200D}👩\u{200D}👧 ❤\u{FE0F}",
            "",
        ] {
            assert!(
                matches!(escape_for_terminal(plain), Cow::Borrowed(_)),
                "{plain}"
            );
        }
        // A literal `\u{1b}` typed by someone reads differently from a real ESC.
        assert_eq!(escape_for_terminal("\\u{1b}"), "\\\\u{1b}");
        assert_eq!(escape_for_terminal("\u{1b}"), "\\u{1b}");
    }

    #[test]
    fn blank_means_whitespace_and_invisible_characters_only() {
        for blank in [
            "",
            " \n\t",
            "\u{200B}",
            "\u{200B}\u{200C}\u{200D}\u{2060}\u{FEFF}",
            " \u{180E} \u{FE0F}\u{E0100}",
            "\u{3164}\u{115F}\u{00AD}",
            "\u{200E}\u{202E}",
        ] {
            assert!(is_blank(blank), "{blank:?}");
        }
        for shown in ["a", "\u{200B}a", ".", "❤\u{FE0F}"] {
            assert!(!is_blank(shown), "{shown:?}");
        }
    }
}
