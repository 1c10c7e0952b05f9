//! Input rules of API v1, checked at the edge before anything reaches the store.

use super::error::ApiError;

pub const MAX_TEXT_CHARS: usize = 4000;
pub const MAX_CLIENT_ID_CHARS: usize = 64;
pub const MAX_CHANNEL_NAME_CHARS: usize = 100;
pub const MAX_INITIAL_MEMBERS: usize = 1000;

/// 3–32 characters of `a-z 0-9 _ . -` (letters in either case; names compare without case).
pub fn username(name: &str) -> Result<(), ApiError> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !(3..=32).contains(&name.len()) || !ok_chars {
        return Err(ApiError::invalid_field(
            "username",
            "username must be 3–32 characters of a-z, 0-9, '_', '.' and '-'",
        ));
    }
    Ok(())
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

/// 1–4000 characters, not only whitespace. Stored as sent: nothing is trimmed.
pub fn text(text: &str) -> Result<(), ApiError> {
    if text.chars().all(char::is_whitespace) {
        return Err(ApiError::text_empty());
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(ApiError::text_too_long(MAX_TEXT_CHARS));
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

/// 1–100 characters, not only whitespace.
pub fn channel_name(name: &str) -> Result<(), ApiError> {
    let n = name.chars().count();
    if name.trim().is_empty() || n > MAX_CHANNEL_NAME_CHARS {
        return Err(ApiError::invalid_field(
            "name",
            "name must be 1–100 characters, not only whitespace",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for ok in ["abc", "Alice_1", "a.b-c", &"x".repeat(32)] {
            assert!(username(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ab",
            "with space",
            "émile",
            "semi;colon",
            &"x".repeat(33),
            "",
        ] {
            assert!(username(bad).is_err(), "{bad}");
        }
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
