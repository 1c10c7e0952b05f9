//! Time-based one-time passwords (RFC 6238 over HOTP, RFC 4226): HMAC-SHA1, 6 digits,
//! 30-second steps, a code of the step before or after accepted for clock skew. Also
//! the base32 (RFC 4648) the secrets are shown in, and the `otpauth://` URI
//! authenticator apps read.

use crate::mac::hmac_sha1;

/// Seconds per step.
pub const STEP_SECS: i64 = 30;
/// Digits per code.
pub const DIGITS: u32 = 6;
/// Steps either side of now whose code is accepted.
pub const SKEW: i64 = 1;
/// Bytes of a new secret (160 bits, as RFC 4226 recommends).
pub const SECRET_BYTES: usize = 20;

/// The step of a Unix time in milliseconds.
pub fn step_at(unix_ms: i64) -> i64 {
    unix_ms.div_euclid(1000).div_euclid(STEP_SECS)
}

/// The HOTP value of `counter` under `secret`, as `digits` decimal digits.
pub fn hotp(secret: &[u8], counter: u64, digits: u32) -> u32 {
    let mac = hmac_sha1(secret, &counter.to_be_bytes());
    let offset = usize::from(mac[19] & 0x0f);
    let bin =
        u32::from_be_bytes(mac[offset..offset + 4].try_into().expect("4 bytes")) & 0x7fff_ffff;
    bin % 10u32.pow(digits)
}

/// The code of `step`, zero-padded to [`DIGITS`].
pub fn code(secret: &[u8], step: i64) -> String {
    format!(
        "{:0width$}",
        hotp(secret, step.max(0) as u64, DIGITS),
        width = DIGITS as usize
    )
}

/// The step within [`SKEW`] of `now_step` whose code `given` is (spaces ignored), if
/// any. Every candidate is compared, in constant time, so the answer's timing does not
/// tell which step matched.
pub fn matching_step(secret: &[u8], given: &str, now_step: i64) -> Option<i64> {
    let given: String = given.chars().filter(|c| !c.is_whitespace()).collect();
    if given.len() != DIGITS as usize || !given.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut found = None;
    for step in now_step - SKEW..=now_step + SKEW {
        if crate::mac::same(code(secret, step).as_bytes(), given.as_bytes()) {
            found = found.or(Some(step));
        }
    }
    found
}

/// A new random secret.
pub fn new_secret() -> [u8; SECRET_BYTES] {
    let mut secret = [0u8; SECRET_BYTES];
    getrandom::fill(&mut secret).expect("the OS random source works");
    secret
}

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// RFC 4648 base32 without padding, as authenticator apps take secrets.
pub fn base32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(BASE32[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(BASE32[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The bytes of base32 text (any letter case; padding and spaces ignored), or `None`
/// for a character outside the alphabet.
pub fn from_base32(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for c in text.chars().filter(|c| *c != '=' && !c.is_whitespace()) {
        let c = c.to_ascii_uppercase();
        let value = BASE32.iter().position(|&a| char::from(a) == c)? as u32;
        buffer = (buffer << 5) | value;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    Some(out)
}

/// The `otpauth://` URI of a secret for `account` at `issuer` (what a QR code carries).
pub fn uri(issuer: &str, account: &str, secret: &[u8]) -> String {
    use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
    let issuer_enc = utf8_percent_encode(issuer, NON_ALPHANUMERIC);
    let account_enc = utf8_percent_encode(account, NON_ALPHANUMERIC);
    format!(
        "otpauth://totp/{issuer_enc}:{account_enc}?secret={}&issuer={issuer_enc}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
        base32(secret)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1: the 8-digit values at the listed times.
    #[test]
    fn totp_matches_rfc_6238_vectors() {
        let secret = b"12345678901234567890";
        let vectors = [
            (59, 94287082),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000, 65353130),
        ];
        for (unix, expected) in vectors {
            let step = step_at(unix * 1000);
            assert_eq!(hotp(secret, step as u64, 8), expected, "T = {unix}");
            // The 6-digit code is the last six of those digits.
            assert_eq!(code(secret, step), format!("{:06}", expected % 1_000_000));
        }
    }

    /// RFC 4226 appendix D: HOTP values of counters 0 to 9.
    #[test]
    fn hotp_matches_rfc_4226_vectors() {
        let secret = b"12345678901234567890";
        let expected = [
            755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489,
        ];
        for (counter, value) in expected.into_iter().enumerate() {
            assert_eq!(hotp(secret, counter as u64, 6), value);
        }
    }

    #[test]
    fn a_code_matches_within_one_step_either_side() {
        let secret = b"12345678901234567890";
        let now = 1000;
        for step in [now - 1, now, now + 1] {
            assert_eq!(matching_step(secret, &code(secret, step), now), Some(step));
        }
        for step in [now - 2, now + 2] {
            let c = code(secret, step);
            // Unless the far step's code happens to equal a near one's.
            if (now - 1..=now + 1).all(|s| code(secret, s) != c) {
                assert_eq!(matching_step(secret, &c, now), None);
            }
        }
        let spaced = code(secret, now);
        let spaced = format!("{} {}", &spaced[..3], &spaced[3..]);
        assert_eq!(matching_step(secret, &spaced, now), Some(now));
        assert_eq!(matching_step(secret, "12345", now), None);
        assert_eq!(matching_step(secret, "12345a", now), None);
        assert_eq!(matching_step(secret, "1234567", now), None);
    }

    /// RFC 4648 section 10.
    #[test]
    fn base32_matches_rfc_4648() {
        let cases = [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base32(plain.as_bytes()), encoded);
            assert_eq!(from_base32(encoded).unwrap(), plain.as_bytes());
            assert_eq!(
                from_base32(&encoded.to_lowercase()).unwrap(),
                plain.as_bytes()
            );
        }
        assert_eq!(from_base32("MZXW6===").unwrap(), b"foo");
        assert_eq!(from_base32("MZ1"), None);
        let secret = new_secret();
        assert_eq!(from_base32(&base32(&secret)).unwrap(), secret);
    }

    #[test]
    fn the_uri_names_issuer_account_and_parameters() {
        let uri = uri("Natter", "al ice", b"12345678901234567890");
        assert_eq!(
            uri,
            "otpauth://totp/Natter:al%20ice?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=Natter&algorithm=SHA1&digits=6&period=30"
        );
    }
}
