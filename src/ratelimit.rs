//! Token-bucket rate limits keyed by user, username or client address.
//!
//! A limiter holds at most `max_keys` buckets. Full buckets are forgotten first; when every
//! bucket is still limiting, the tenth least recently used are evicted, so a flood of new
//! keys costs the flooder's own oldest buckets rather than resetting everyone's.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
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
        Self::with_max_keys(rate, 100_000)
    }

    pub fn with_max_keys(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
            max_keys: max_keys.max(1),
        }
    }

    /// Takes one token for `key`, or says how long until one is available.
    pub fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        self.take_n(key, 1.0, now)
    }

    /// Takes `cost` tokens for `key` (a cost above the burst is charged as the burst, so
    /// it passes once the bucket is full), or says how long until they are available.
    pub fn take_n(&self, key: &K, cost: f64, now: Instant) -> Result<(), Duration> {
        self.update(key, now, cost.min(self.rate.burst), true)
    }

    /// Whether `key` has a token, without taking it.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        self.update(key, now, 1.0, false)
    }

    /// Gives back one token taken by [`RateLimiter::take`] (a charge made before knowing
    /// whether it was owed: a login that succeeded).
    pub fn refund(&self, key: &K) {
        let mut buckets = self.lock();
        if let Some(b) = buckets.get_mut(key) {
            b.tokens = (b.tokens + 1.0).min(self.rate.burst);
        }
    }

    /// Buckets held now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Bucket>> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, key: &K, now: Instant, cost: f64, take: bool) -> Result<(), Duration> {
        let Rate { per_second, burst } = self.rate;
        let mut buckets = self.lock();
        if buckets.len() >= self.max_keys && !buckets.contains_key(key) {
            buckets.retain(|_, b| refill(*b, now, per_second, burst) < burst);
            if buckets.len() >= self.max_keys {
                evict_oldest(&mut buckets, self.max_keys / 10 + 1);
            }
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let tokens = refill(*bucket, now, per_second, burst);
        *bucket = Bucket { tokens, at: now };
        if tokens >= cost {
            if take {
                bucket.tokens -= cost;
            }
            Ok(())
        } else if per_second > 0.0 {
            Err(Duration::from_secs_f64((cost - tokens) / per_second))
        } else {
            Err(Duration::from_secs(3600))
        }
    }
}

/// Drops the `n` least recently touched buckets: one sort per `n` new keys, not a scan
/// per key.
fn evict_oldest<K: Hash + Eq + Clone>(buckets: &mut HashMap<K, Bucket>, n: usize) {
    let mut ages: Vec<(Instant, K)> = buckets.iter().map(|(k, b)| (b.at, k.clone())).collect();
    let n = n.min(ages.len());
    ages.select_nth_unstable_by_key(n.saturating_sub(1), |(at, _)| *at);
    for (_, key) in ages.into_iter().take(n) {
        buckets.remove(&key);
    }
}

/// The key a client address is limited by: an IPv4 address as it is, an IPv6 address by
/// its /64 (one subscriber's whole prefix: a host can pick any address in it).
/// IPv4-mapped IPv6 addresses count as the IPv4 address.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
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
        limiter.refund(&1);
        limiter.take(&1, t0).unwrap();
    }

    #[test]
    fn costs_are_weighted_and_capped_at_the_burst() {
        let limiter = RateLimiter::new(Rate {
            per_second: 10.0,
            burst: 100.0,
        });
        let t0 = Instant::now();
        limiter.take_n(&1, 60.0, t0).unwrap();
        let wait = limiter.take_n(&1, 60.0, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 2.0).abs() < 1e-6, "{wait:?}");
        // More than the burst costs the whole burst.
        limiter.take_n(&2, 1e9, t0).unwrap();
        assert!(limiter.take(&2, t0).is_err());
    }

    /// Regression (security review, 13): a full limiter cleared every bucket, so a flood
    /// of new keys reset the limits of everyone being limited.
    #[test]
    fn a_full_limiter_evicts_the_oldest_buckets_not_all_of_them() {
        let limiter = RateLimiter::with_max_keys(
            Rate {
                per_second: 0.001,
                burst: 1.0,
            },
            100,
        );
        let t0 = Instant::now();
        for i in 0..99 {
            limiter
                .take(&format!("flood{i}"), t0 + Duration::from_micros(i))
                .unwrap();
        }
        let later = t0 + Duration::from_millis(1);
        limiter.take(&"target".to_owned(), later).unwrap();
        // Full, and every bucket limiting: a new key evicts the oldest, not the target.
        limiter.take(&"new".to_owned(), later).unwrap();
        assert!(limiter.len() <= 100, "{}", limiter.len());
        assert!(limiter.take(&"target".to_owned(), later).is_err());
        assert!(
            limiter.take(&"flood0".to_owned(), later).is_ok(),
            "the oldest went"
        );
    }

    /// Regression (security review, 13): per-address limits keyed on the whole IPv6
    /// address, and a host picks any of the 2^64 addresses of its prefix.
    #[test]
    fn ipv6_addresses_are_limited_by_their_64_prefix() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            address_key(ip("2001:db8:1:2:aaaa::1")),
            address_key(ip("2001:db8:1:2:ffff:1:2:3"))
        );
        assert_ne!(
            address_key(ip("2001:db8:1:2::1")),
            address_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(address_key(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(address_key(ip("1.2.3.4")), ip("1.2.3.4"));
    }
}
