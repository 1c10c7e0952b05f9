//! A cache of recently seen sessions, so most requests authenticate without a store read.
//!
//! Logout revokes here as well as in the store, and a lookup that raced a revocation is
//! never cached (a generation counter tells), so a revoked token stops working at once on
//! this node. Entries are also re-checked against the store after [`MAX_AGE`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::scopes::Scopes;
use crate::model::User;
use crate::store::TokenHash;

/// How long a cached session is trusted before it is read from the store again.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// Most sessions held; past it the cache starts over.
const MAX_ENTRIES: usize = 100_000;

struct Entry {
    user: User,
    expires_at_ms: i64,
    /// An API key's scopes; `None` for a session.
    scopes: Option<Scopes>,
    fetched: Instant,
}

#[derive(Default)]
pub struct SessionCache {
    entries: Mutex<HashMap<TokenHash, Entry>>,
    /// Bumped by every revocation.
    generation: AtomicU64,
}

impl SessionCache {
    /// The user of a cached unexpired session (or API key), when it expires, and a key's
    /// scopes.
    /// `trusted_since`: entries cached before it are not used (the cluster bus may have
    /// missed another node's revocation then).
    pub fn get(
        &self,
        token: &TokenHash,
        now_ms: i64,
        trusted_since: Option<Instant>,
    ) -> Option<(User, i64, Option<Scopes>)> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(token)
            .filter(|e| e.expires_at_ms > now_ms && e.fetched.elapsed() < MAX_AGE)
            .filter(|e| trusted_since.is_none_or(|t| e.fetched > t))
            .map(|e| (e.user.clone(), e.expires_at_ms, e.scopes))
    }

    /// Read before a store lookup; hand it to [`SessionCache::insert`] after.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Caches a session (or an API key, with its scopes) read from the store, unless a
    /// revocation happened since `generation` was read.
    pub fn insert(
        &self,
        generation: u64,
        token: TokenHash,
        user: User,
        expires_at_ms: i64,
        scopes: Option<Scopes>,
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(
            token,
            Entry {
                user,
                expires_at_ms,
                scopes,
                fetched: Instant::now(),
            },
        );
    }

    /// Forgets a session at once.
    pub fn revoke(&self, token: &TokenHash) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        entries.remove(token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            id: 1,
            username: "u".into(),
            created_at: 0,
            ..User::default()
        }
    }

    #[test]
    fn serves_unexpired_sessions_only() {
        let cache = SessionCache::default();
        let g = cache.generation();
        cache.insert(g, [1; 32], user(), 100, None);
        assert_eq!(cache.get(&[1; 32], 99, None), Some((user(), 100, None)));
        assert_eq!(cache.get(&[1; 32], 100, None), None);
        assert_eq!(cache.get(&[2; 32], 0, None), None);
    }

    #[test]
    fn a_lookup_that_raced_a_revocation_is_not_cached() {
        let cache = SessionCache::default();
        let g = cache.generation();
        cache.revoke(&[1; 32]);
        cache.insert(g, [1; 32], user(), 100, None);
        assert_eq!(cache.get(&[1; 32], 0, None), None);
        cache.insert(cache.generation(), [1; 32], user(), 100, None);
        cache.revoke(&[1; 32]);
        assert_eq!(cache.get(&[1; 32], 0, None), None);
    }
}
