//! Token-bucket rate limits keyed by user, username or client address.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Tokens refill at `per_second` up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets are created full on first use and forgotten once full again, so memory tracks
/// only the keys that are being limited right now (capped at `max_keys`).
pub struct RateLimiter<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, Bucket>>,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
            max_keys: 100_000,
        }
    }

    /// Takes one token for `key`, or says how long until one is available.
    pub fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        self.update(key, now, true)
    }

    /// Whether `key` has a token, without taking it.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        self.update(key, now, false)
    }

    fn update(&self, key: &K, now: Instant, take: bool) -> Result<(), Duration> {
        let Rate { per_second, burst } = self.rate;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= self.max_keys && !buckets.contains_key(key) {
            buckets.retain(|_, b| refill(*b, now, per_second, burst) < burst);
            if buckets.len() >= self.max_keys {
                // Every key is being limited: start over rather than scan the map on each
                // new key (a flood of addresses would make every request O(max_keys)).
                buckets.clear();
            }
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let tokens = refill(*bucket, now, per_second, burst);
        *bucket = Bucket { tokens, at: now };
        if tokens >= 1.0 {
            if take {
                bucket.tokens -= 1.0;
            }
            Ok(())
        } else if per_second > 0.0 {
            Err(Duration::from_secs_f64((1.0 - tokens) / per_second))
        } else {
            Err(Duration::from_secs(3600))
        }
    }
}

fn refill(b: Bucket, now: Instant, per_second: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * per_second).min(burst)
}

/// Whole seconds for a `Retry-After` header: at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_refills_at_the_rate() {
        let limiter = RateLimiter::new(Rate {
            per_second: 2.0,
            burst: 3.0,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.take(&"k", t0).unwrap();
        }
        let wait = limiter.take(&"k", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        limiter.take(&"k", t0 + Duration::from_millis(500)).unwrap();
        limiter.take(&"other", t0).unwrap();
    }

    #[test]
    fn check_does_not_consume() {
        let limiter = RateLimiter::new(Rate {
            per_second: 1.0,
            burst: 1.0,
        });
        let t0 = Instant::now();
        limiter.check(&1, t0).unwrap();
        limiter.check(&1, t0).unwrap();
        limiter.take(&1, t0).unwrap();
        assert!(limiter.check(&1, t0).is_err());
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
    }
}
