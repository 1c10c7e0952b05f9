//! Message search, the part both stores share: the query language ([`Query::parse`]), what
//! it becomes for each store's full-text index ([`Query::fts5`], [`Query::tsquery`]), and
//! the snippet shown with each hit ([`snippet`]).
//!
//! A query is terms separated by spaces; a message matches when it has every term:
//! - `word`: the word (letter case does not matter; on the embedded store accents do not
//!   either);
//! - `"some words"`: those words next to each other, in that order;
//! - `word*` (or `"some wor"*`): the last word may be any word that starts with it (at
//!   least [`MIN_PREFIX`] letters);
//! - `-word`, `-"some words"`: messages that have it are left out.
//!
//! Anything but letters and digits separates words (`e-mail` is the phrase `"e mail"`).
//! The query is never handed to an index's own parser as the user wrote it: only the
//! words are, quoted, so no input is a syntax error of the index's (a 500), and every
//! syntax error is ours (a 400 with what is wrong).

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// The longest query, in characters.
pub const MAX_QUERY_CHARS: usize = 256;
/// The most terms in a query.
pub const MAX_TERMS: usize = 16;
/// The fewest letters before a `*` (a shorter prefix reads too much of the index).
pub const MIN_PREFIX: usize = 3;
/// Characters of text a snippet shows at most (besides the `…` where it is cut).
pub const SNIPPET_CHARS: usize = 160;

/// One term of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// Its words, lowercased, in order (one, or a phrase's).
    pub words: Vec<String>,
    /// The term as written (without quotes, `-` or `*`), for an index that splits text
    /// into words its own way (PostgreSQL's parser keeps `e-mail` and `a.example` whole).
    pub text: String,
    /// The last word is a prefix.
    pub prefix: bool,
    /// The words as the snippet compares them ([`fold`]).
    folded: Vec<String>,
    /// Messages that have it are left out.
    pub negated: bool,
}

/// A parsed query: at least one term a message must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    terms: Vec<Term>,
}

/// A piece of a snippet: text, and whether it is a word the query matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    pub hit: bool,
}

/// The words of `s`: maximal runs of letters and digits, lowercased.
fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// A word as the embedded store's index compares it: lowercased, accents removed.
fn fold(word: &str) -> String {
    word.nfkd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .collect()
}

impl Query {
    /// Parses a query; the error says what is wrong with it, for the caller to show.
    pub fn parse(q: &str) -> Result<Self, String> {
        if q.chars().count() > MAX_QUERY_CHARS {
            return Err(format!(
                "the query is longer than {MAX_QUERY_CHARS} characters"
            ));
        }
        let mut terms = Vec::new();
        let mut rest = q.trim_start();
        while !rest.is_empty() {
            let negated = rest.starts_with('-');
            if negated {
                rest = &rest[1..];
            }
            let (body, quoted, after) = if let Some(inner) = rest.strip_prefix('"') {
                let Some(end) = inner.find('"') else {
                    return Err("a quoted phrase is not closed: add the closing \"".into());
                };
                (&inner[..end], true, &inner[end + 1..])
            } else {
                let end = rest
                    .find(|c: char| c.is_whitespace() || c == '"')
                    .unwrap_or(rest.len());
                (&rest[..end], false, &rest[end..])
            };
            rest = after;
            let mut prefix = false;
            let body = if quoted {
                if let Some(r) = rest.strip_prefix('*') {
                    prefix = true;
                    rest = r;
                }
                body
            } else if let Some(stem) = body.strip_suffix('*') {
                prefix = true;
                stem
            } else {
                body
            };
            if !rest.is_empty() && !rest.starts_with(char::is_whitespace) && !rest.starts_with('"')
            {
                return Err("put a space after a quoted phrase".into());
            }
            rest = rest.trim_start();
            let words = words(body);
            let Some(last) = words.last() else {
                // Punctuation alone, or a lone `-`: nothing to look for.
                continue;
            };
            if prefix && last.chars().count() < MIN_PREFIX {
                return Err(format!(
                    "a word ending in * needs at least {MIN_PREFIX} letters before it"
                ));
            }
            terms.push(Term {
                folded: words.iter().map(|w| fold(w)).collect(),
                text: body.to_owned(),
                words,
                prefix,
                negated,
            });
        }
        if terms.len() > MAX_TERMS {
            return Err(format!("the query has more than {MAX_TERMS} terms"));
        }
        if !terms.iter().any(|t| !t.negated) {
            return Err("the query has no word to look for".into());
        }
        Ok(Self { terms })
    }

    pub fn terms(&self) -> &[Term] {
        &self.terms
    }

    /// The query as an FTS5 expression over the column `column`: each term one quoted
    /// phrase of its words (FTS5 tokenizes them as it did the text).
    pub fn fts5(&self, column: &str) -> String {
        let phrase = |t: &Term| {
            let mut p = format!("\"{}\"", t.words.join(" "));
            if t.prefix {
                p.push_str(" *");
            }
            p
        };
        let mut expr = self
            .terms
            .iter()
            .filter(|t| !t.negated)
            .map(phrase)
            .collect::<Vec<_>>()
            .join(" AND ");
        for t in self.terms.iter().filter(|t| t.negated) {
            expr = format!("({expr}) NOT {}", phrase(t));
        }
        format!("{column} : ({expr})")
    }
}

impl Term {
    /// A prefix term as PostgreSQL `tsquery` text (for `to_tsquery('simple', …)`): its
    /// words in order, the last one a prefix. The words are letters and digits only, so
    /// quoting each is enough.
    pub fn prefix_tsquery(&self) -> String {
        let n = self.words.len();
        self.words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if i + 1 == n {
                    format!("'{w}':*")
                } else {
                    format!("'{w}'")
                }
            })
            .collect::<Vec<_>>()
            .join(" <-> ")
    }
}

impl Query {
    /// Whether a word of a message (folded) is one the query looks for.
    fn hits(&self, word: &str) -> bool {
        self.terms.iter().filter(|t| !t.negated).any(|t| {
            let n = t.folded.len();
            t.folded.iter().enumerate().any(|(i, w)| {
                if t.prefix && i + 1 == n {
                    word.starts_with(w.as_str())
                } else {
                    word == w
                }
            })
        })
    }
}

/// The part of `text` to show for a hit: all of it when short, else [`SNIPPET_CHARS`]
/// characters from a little before its first matched word, cut at spaces where it can be,
/// with `…` where it is cut. Matched words are pieces of their own.
pub fn snippet(text: &str, query: &Query) -> Vec<Piece> {
    // Words with their byte ranges.
    let mut spans = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices().chain([(text.len(), ' ')]) {
        match (c.is_alphanumeric() && i < text.len(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                spans.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    let hits: Vec<(usize, usize)> = spans
        .into_iter()
        .filter(|&(s, e)| query.hits(&fold(&text[s..e])))
        .collect();
    let (from, to) = window(text, hits.first().map_or(0, |h| h.0));
    let mut pieces = Vec::new();
    let mut push = |s: &str, hit: bool| {
        if s.is_empty() {
            return;
        }
        match pieces.last_mut() {
            Some(Piece { text, hit: false }) if !hit => text.push_str(s),
            _ => pieces.push(Piece {
                text: s.to_owned(),
                hit,
            }),
        }
    };
    if from > 0 {
        push("…", false);
    }
    let mut at = from;
    for (s, e) in hits {
        if s < from || e > to {
            continue;
        }
        push(&text[at..s], false);
        push(&text[s..e], true);
        at = e;
    }
    push(&text[at..to], false);
    if to < text.len() {
        push("…", false);
    }
    pieces
}

/// The byte range of `text` a snippet shows, around the byte `focus`.
fn window(text: &str, focus: usize) -> (usize, usize) {
    let chars = text.chars().count();
    if chars <= SNIPPET_CHARS {
        return (0, text.len());
    }
    // Start a quarter of the window before the focus, at a space if one is near.
    let before: Vec<usize> = text[..focus].char_indices().map(|(i, _)| i).collect();
    let lead = SNIPPET_CHARS / 4;
    let mut from = if before.len() > lead {
        before[before.len() - lead]
    } else {
        0
    };
    if from > 0
        && let Some(space) = text[from..focus].find(char::is_whitespace)
    {
        from += space
            + text[from + space..]
                .chars()
                .next()
                .map_or(1, char::len_utf8);
    }
    let mut to = text[from..]
        .char_indices()
        .nth(SNIPPET_CHARS)
        .map_or(text.len(), |(i, _)| from + i);
    if to < text.len()
        && let Some(space) = text[from..to].rfind(char::is_whitespace)
        && space > (to - from) / 2
    {
        to = from + space;
    }
    (from, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Shape = (Vec<String>, bool, bool);

    fn term(words: &[&str], prefix: bool, negated: bool) -> Shape {
        (
            words.iter().map(|w| (*w).to_owned()).collect(),
            prefix,
            negated,
        )
    }

    fn shape(q: &Query) -> Vec<Shape> {
        q.terms()
            .iter()
            .map(|t| (t.words.clone(), t.prefix, t.negated))
            .collect()
    }

    #[test]
    fn parses_words_phrases_prefixes_and_exclusions() {
        let q = Query::parse(r#"  Hello "big  World" deplo* -spam -"no way" e-mail "#).unwrap();
        assert_eq!(
            shape(&q),
            [
                term(&["hello"], false, false),
                term(&["big", "world"], false, false),
                term(&["deplo"], true, false),
                term(&["spam"], false, true),
                term(&["no", "way"], false, true),
                term(&["e", "mail"], false, false),
            ]
        );
        assert_eq!(
            q.fts5("text"),
            r#"text : ((("hello" AND "big world" AND "deplo" * AND "e mail") NOT "spam") NOT "no way")"#
        );
        assert_eq!(q.terms()[2].prefix_tsquery(), "'deplo':*");
        assert_eq!(q.terms()[5].text, "e-mail");
    }

    #[test]
    fn punctuation_alone_is_no_term_and_quotes_cannot_reach_the_index() {
        let q = Query::parse(r#"!!! ok -  "" AND OR NOT ( ) "#).unwrap();
        assert_eq!(
            shape(&q),
            [
                term(&["ok"], false, false),
                term(&["and"], false, false),
                term(&["or"], false, false),
                term(&["not"], false, false),
            ]
        );
        // Words are letters and digits: no quote, paren or operator gets through.
        let q = Query::parse(r#"a'b "c""d" x:y {z}"#).unwrap();
        for t in q.terms() {
            for w in &t.words {
                assert!(w.chars().all(char::is_alphanumeric), "{w}");
            }
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        for (q, says) in [
            ("", "no word"),
            ("   ", "no word"),
            ("-spam", "no word"),
            ("!!!", "no word"),
            ("\"open phrase", "not closed"),
            ("a*", "at least 3"),
            ("ab*", "at least 3"),
            ("\"x\"y", "space after"),
        ] {
            let err = Query::parse(q).unwrap_err();
            assert!(err.contains(says), "{q:?}: {err}");
        }
        let long = "a ".repeat(MAX_TERMS + 1);
        assert!(Query::parse(&long).unwrap_err().contains("terms"));
        let longer = "a".repeat(MAX_QUERY_CHARS + 1);
        assert!(Query::parse(&longer).unwrap_err().contains("longer"));
    }

    fn shown(pieces: &[Piece]) -> String {
        pieces
            .iter()
            .map(|p| {
                if p.hit {
                    format!("[{}]", p.text)
                } else {
                    p.text.clone()
                }
            })
            .collect()
    }

    #[test]
    fn snippets_mark_the_words_found_ignoring_case_and_accents() {
        let q = Query::parse("cafe deplo* -nothing").unwrap();
        assert_eq!(
            shown(&snippet("Le Café: deployed, not deploying? nothing.", &q)),
            "Le [Café]: [deployed], not [deploying]? nothing."
        );
    }

    #[test]
    fn long_texts_are_cut_around_the_first_hit() {
        let q = Query::parse("needle").unwrap();
        let text = format!("{} needle {}", "hay ".repeat(200), "straw ".repeat(200));
        let s = snippet(&text, &q);
        let all = shown(&s);
        assert!(all.starts_with('…') && all.ends_with('…'), "{all}");
        assert!(all.contains("[needle]"));
        let visible = all.chars().count() - "[]".len() - 2;
        assert!(visible <= SNIPPET_CHARS, "{visible}: {all}");
        // No word is cut in half.
        assert!(
            all.starts_with("…hay ") && all.ends_with(" straw…"),
            "{all}"
        );
        // Multi-byte text is cut at character boundaries.
        let text = format!("{} 바늘 {}", "가나다 ".repeat(100), "라마 ".repeat(100));
        let q = Query::parse("바늘").unwrap();
        assert!(shown(&snippet(&text, &q)).contains("[바늘]"));
    }

    #[test]
    fn a_text_without_a_visible_hit_shows_its_start() {
        let q = Query::parse("zzz").unwrap();
        assert_eq!(shown(&snippet("short text", &q)), "short text");
    }
}
