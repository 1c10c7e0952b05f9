//! Wall-clock helpers: milliseconds since the Unix epoch and their RFC 3339 rendering.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock reads before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Renders milliseconds since the Unix epoch as an RFC 3339 UTC string with millisecond
/// precision, e.g. `2026-11-22T03:41:59.123Z`.
pub fn rfc3339(ms: i64) -> String {
    Rfc3339(ms).to_string()
}

/// A time rendered as by [`rfc3339`] where it is written (`Display`), with no allocation:
/// every message on the wire carries one or two, so this is on the delivery path.
#[derive(Debug, Clone, Copy)]
pub struct Rfc3339(pub i64);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match civil(self.0) {
            Some(buf) => f.write_str(std::str::from_utf8(&buf).map_err(|_| std::fmt::Error)?),
            None => f.write_str(&rfc3339_slow(self.0)),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for years 0–9999 (days to a civil date as in Howard
/// Hinnant's `civil_from_days`); `None` outside them.
fn civil(ms: i64) -> Option<[u8; 24]> {
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days.checked_add(719_468)?;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if !(0..=9999).contains(&year) {
        return None;
    }
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: i64| {
        for i in (0..width).rev() {
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, day_secs / 3_600);
    put(14, 2, day_secs / 60 % 60);
    put(17, 2, day_secs % 60);
    put(20, 3, milli);
    Some(out)
}

/// The general rendering, for years outside 0–9999 (and before 1970 by clock error).
fn rfc3339_slow(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rfc3339_utc_with_millis() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_314_119_123), "2026-11-22T02:21:59.123Z");
    }

    #[test]
    fn the_fast_rendering_matches_the_general_one() {
        let mut cases = vec![
            0,
            -1,
            -1_000,
            951_782_400_000,     // 2000-02-29
            4_107_542_399_999,   // 2100-02-28T23:59:59.999
            253_402_300_799_999, // 9999-12-31T23:59:59.999
            253_402_300_800_000, // year 10000: the general rendering
            -62_167_219_200_000, // 0000-01-01
            -62_167_219_200_001, // year -1
            i64::MAX,
            i64::MIN,
        ];
        // A spread over the years 1900–2200 and a run of consecutive days.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            cases.push((x % 9_467_280_000_000) as i64 - 2_208_988_800_000);
        }
        cases.extend((0..2_000).map(|d| 946_684_800_000 + d * 86_400_000 - 1));
        for ms in cases {
            assert_eq!(rfc3339(ms), rfc3339_slow(ms), "{ms}");
        }
    }
}
