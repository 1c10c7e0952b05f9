//! Usernames: the one folded form a name is stored, shown and looked up under, the rules a
//! new name must meet, and the skeleton that makes look-alike names collide.

use unicode_normalization::UnicodeNormalization;

pub const MIN_CHARS: usize = 3;
pub const MAX_CHARS: usize = 32;

/// The separators a name may contain between letters and digits.
fn is_separator(c: char) -> bool {
    matches!(c, '_' | '.' | '-')
}

/// The form a name is stored, shown and looked up under: Unicode NFKC, lower case (NFKC
/// again, since lower-casing can leave a decomposed form). `ＡＬＩＣＥ` and `Alice` both
/// fold to `alice`.
pub fn fold(raw: &str) -> String {
    let compatible: String = raw.nfkc().collect();
    compatible.to_lowercase().nfkc().collect()
}

/// Why a folded name is refused, in words that name the rule.
pub fn check(folded: &str) -> Result<(), &'static str> {
    let n = folded.chars().count();
    if !(MIN_CHARS..=MAX_CHARS).contains(&n) {
        return Err("username must be 3–32 characters");
    }
    if !folded
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || is_separator(c))
    {
        return Err("username may contain only a-z, 0-9, '_', '.' and '-' \
                    (letters in any case; other scripts are not accepted)");
    }
    if !folded.chars().any(|c| c.is_ascii_lowercase()) {
        return Err("username must contain at least one letter");
    }
    let first = folded.chars().next().unwrap_or('_');
    let last = folded.chars().next_back().unwrap_or('_');
    if is_separator(first) || is_separator(last) {
        return Err("username must start and end with a letter or digit");
    }
    let bytes = folded.as_bytes();
    if bytes
        .windows(2)
        .any(|w| is_separator(w[0] as char) && is_separator(w[1] as char))
    {
        return Err("username must not have two of '_', '.' and '-' in a row");
    }
    Ok(())
}

/// Most different names one message may mention; further `@name`s are plain text.
pub const MAX_MENTIONS: usize = 50;

/// The names `text` mentions, folded, each once, in order, at most [`MAX_MENTIONS`]: an
/// `@` at the start or after a character that cannot be in a name, then a name's
/// characters (any letter case), without trailing separators (`@bob.` at a sentence's
/// end is `bob`). `mail@example.com` mentions no one; neither does a name that is not
/// one. Whether a mentioned name is a member is the store's question.
pub fn mentions(text: &str) -> Vec<String> {
    let name_char = |c: char| c.is_ascii_alphanumeric() || is_separator(c);
    let mut out: Vec<String> = Vec::new();
    let mut prev: Option<char> = None;
    for (i, c) in text.char_indices() {
        let starts = c == '@' && !prev.is_some_and(|p| name_char(p) || p == '@');
        prev = Some(c);
        if !starts {
            continue;
        }
        let rest = &text[i + 1..];
        let len = rest.find(|c: char| !name_char(c)).unwrap_or(rest.len());
        let name = rest[..len].trim_end_matches(is_separator);
        if name.is_empty() || name.len() > MAX_CHARS {
            continue;
        }
        let folded = fold(name);
        if check(&folded).is_ok() && !out.contains(&folded) {
            out.push(folded);
            if out.len() == MAX_MENTIONS {
                break;
            }
        }
    }
    out
}

/// What a folded name looks like, for telling look-alikes apart: separators dropped, and
/// `1`, `i` → `l`; `0` → `o`; `5` → `s`; then `rn` → `m` and `vv` → `w`. Two names with
/// the same skeleton cannot both be registered: `alice`, `aiice`, `a1ice` and `al.ice`
/// are one name.
pub fn skeleton(folded: &str) -> String {
    let mapped: String = folded
        .chars()
        .filter(|&c| !is_separator(c))
        .map(|c| match c {
            '1' | 'i' | '|' => 'l',
            '0' => 'o',
            '5' => 's',
            c => c,
        })
        .collect();
    mapped.replace("rn", "m").replace("vv", "w")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding_is_nfkc_and_lower_case() {
        assert_eq!(fold("Alice"), "alice");
        assert_eq!(fold("ＡＬＩＣＥ"), "alice");
        assert_eq!(fold("ａｌｉｃｅ"), "alice");
        assert_eq!(fold("\u{212A}elvin"), "kelvin"); // KELVIN SIGN
        assert_eq!(fold("ﬁle"), "file");
        assert_eq!(fold("émile"), "émile");
    }

    #[test]
    fn rules_of_a_new_name() {
        for ok in [
            "abc",
            "alice_1",
            "a.b-c",
            "r2d2",
            "007bond",
            &"x".repeat(32),
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for bad in [
            "ab",
            &"x".repeat(33),
            "",
            "...",
            "___",
            "123",
            "1-2",
            ".alice",
            "alice-",
            "a..b",
            "a_-b",
            "with space",
            "émile",
            "semi;colon",
            "Alice", // not folded
        ] {
            assert!(check(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mentions_are_names_after_an_at_sign() {
        let m = |t: &str| mentions(t);
        assert_eq!(m("hi @Alice and @bob."), ["alice", "bob"]);
        assert_eq!(m("@carol, @carol!"), ["carol"]);
        assert_eq!(m("(@dave) @e.v-e_ @@frank"), ["dave", "e.v-e"]);
        assert!(m("mail@example.com, @ alone, @x, @12, @-dash").is_empty());
        assert!(m(&format!("@{}", "a".repeat(33))).is_empty());
        let many: String = (0..60).map(|i| format!("@user{i:02} ")).collect();
        assert_eq!(m(&many).len(), MAX_MENTIONS);
    }

    #[test]
    fn look_alikes_share_a_skeleton() {
        let alice = skeleton("alice");
        for same in ["aiice", "a1ice", "al.ice", "a_lice", "alice"] {
            assert_eq!(skeleton(same), alice, "{same}");
        }
        assert_eq!(skeleton("rnike"), skeleton("mike"));
        assert_eq!(skeleton("vvendy"), skeleton("wendy"));
        assert_eq!(skeleton("b0b"), skeleton("bob"));
        assert_eq!(skeleton("5am"), skeleton("sam"));
        assert_ne!(skeleton("alice"), skeleton("alex"));
        assert_ne!(skeleton("bob"), skeleton("rob"));
    }
}
