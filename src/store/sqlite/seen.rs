//! The `client_id`s the store holds, as a Bloom filter: the idempotency check of a post
//! probes the `messages_client` index only when the filter says its `(channel, author,
//! client_id)` may be there. A new `client_id` (nearly every send) then costs a few hashed
//! bit tests instead of a B-tree descent: that probe was ~11 % of the writer thread at
//! saturation (BENCHMARKS.md, issue 15).
//!
//! A Bloom filter answers "maybe" for every key it holds and for a few it does not (a
//! false positive costs the probe it would have cost anyway), never "no" for a key it
//! holds. It is built from two halves:
//!
//! - the writer adds every post's key from the moment the store opens (a post that rolls
//!   back leaves its key behind: a false positive, harmless);
//! - a thread scans the `client_id`s already in the table (the covering index
//!   `messages_client`) on its own read connection, in one snapshot taken after the open
//!   folded the commit log. Every row is either in that snapshot or was written by this
//!   writer since the open, so the union of both halves holds every key.
//!
//! Until the scan is done, every post probes the index as before. A scan that fails, or
//! a filter past [`MAX_KEYS`] (scanned and posted together), turns the filter off for the
//! rest of the run (probing always, as before) and says so in the log. Memory: 10–20 bits
//! per key, so at most ~160 MB (a store of 10 million messages with `client_id`s holds
//! 12–25 MB here).

use std::hash::{BuildHasher, RandomState};
use std::path::Path;
use std::sync::mpsc;

use rusqlite::Connection;

/// More keys than this, scanned and posted, and the filter is turned off (its memory is
/// bounded).
const MAX_KEYS: usize = 64 << 20;
/// Keys the first layer holds before a layer twice its size is added.
const FIRST_LAYER: usize = 1 << 16;
/// Bits tested per key; with 10–20 bits per key a false positive is under 1 %.
const PROBES: u32 = 7;

/// One Bloom filter of a fixed size.
struct Layer {
    bits: Vec<u64>,
    /// Bits − 1 (the size is a power of two).
    mask: u64,
    keys: usize,
    capacity: usize,
}

impl Layer {
    fn new(capacity: usize) -> Self {
        let bits = (capacity * 10).next_power_of_two().max(64);
        Self {
            bits: vec![0; bits / 64],
            mask: bits as u64 - 1,
            keys: 0,
            capacity,
        }
    }

    /// The bit positions of a key: double hashing over one 64-bit hash.
    fn positions(mask: u64, hash: u64) -> impl Iterator<Item = usize> {
        let (h1, h2) = (hash, hash.rotate_left(32) | 1);
        (0..u64::from(PROBES)).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) & mask) as usize)
    }

    fn insert(&mut self, hash: u64) {
        for p in Self::positions(self.mask, hash) {
            self.bits[p / 64] |= 1 << (p % 64);
        }
        self.keys += 1;
    }

    fn may_contain(&self, hash: u64) -> bool {
        Self::positions(self.mask, hash).all(|p| self.bits[p / 64] & (1 << (p % 64)) != 0)
    }

    fn bytes(&self) -> usize {
        self.bits.len() * 8
    }
}

/// A Bloom filter that grows: when its newest layer is full, a layer twice its size is
/// added (a key may be in any layer, so a lookup tests each).
struct Layers {
    layers: Vec<Layer>,
}

impl Layers {
    fn new() -> Self {
        Self {
            layers: vec![Layer::new(FIRST_LAYER)],
        }
    }

    fn insert(&mut self, hash: u64) {
        let last = self.layers.last().expect("a filter has a layer");
        if last.keys >= last.capacity {
            let next = Layer::new(last.capacity * 2);
            self.layers.push(next);
        }
        self.layers
            .last_mut()
            .expect("a filter has a layer")
            .insert(hash);
    }

    fn may_contain(&self, hash: u64) -> bool {
        self.layers.iter().any(|l| l.may_contain(hash))
    }

    fn keys(&self) -> usize {
        self.layers.iter().map(|l| l.keys).sum()
    }

    fn bytes(&self) -> usize {
        self.layers.iter().map(Layer::bytes).sum()
    }
}

/// The writer's filter of stored `client_id`s (see the module's documentation).
pub(super) struct Seen {
    hasher: RandomState,
    /// Every key posted since the store opened (while the filter is not off).
    added: Layers,
    state: State,
    /// [`MAX_KEYS`] (lower in tests).
    max_keys: usize,
}

enum State {
    /// The scan runs; its answer comes here (`None`: the filter is to be off).
    Scanning(mpsc::Receiver<Option<Layers>>),
    /// On: the keys the table held at open.
    On(Layers),
    /// Off for good: every key may be there.
    Off,
}

/// A key of the filter: one hash of `(channel, author, client_id)`, made by
/// [`Seen::key`] for the writer's lookups and inserts and by the scan alike.
#[derive(Clone, Copy)]
pub(super) struct Key(u64);

fn key(hasher: &RandomState, channel_id: i64, author: i64, client_id: &str) -> Key {
    Key(hasher.hash_one((channel_id, author, client_id)))
}

impl Seen {
    /// Starts the scan of the database at `path` on its own thread.
    pub fn start(path: &Path) -> Self {
        let hasher = RandomState::new();
        let (tx, rx) = mpsc::sync_channel(1);
        let (path, scan_hasher) = (path.to_owned(), hasher.clone());
        let spawned = std::thread::Builder::new()
            .name("natter-seen".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let scanned = match scan(&path, &scan_hasher) {
                    Ok(Some(layers)) => {
                        tracing::debug!(
                            keys = layers.keys(),
                            bytes = layers.bytes(),
                            ms = started.elapsed().as_millis() as u64,
                            "client_id filter built"
                        );
                        Some(layers)
                    }
                    Ok(None) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "client_id filter not built: every send probes the index");
                        None
                    }
                };
                let _ = tx.send(scanned);
            });
        let state = match spawned {
            Ok(_) => State::Scanning(rx),
            Err(e) => {
                tracing::warn!(error = %e, "client_id filter not built: every send probes the index");
                State::Off
            }
        };
        Self {
            hasher,
            added: Layers::new(),
            state,
            max_keys: MAX_KEYS,
        }
    }

    /// The key of `(channel, author, client_id)`: made once per post, for the lookup and
    /// the insert.
    pub fn key(&self, channel_id: i64, author: i64, client_id: &str) -> Key {
        key(&self.hasher, channel_id, author, client_id)
    }

    /// Records a posted key.
    pub fn insert(&mut self, key: Key) {
        if matches!(self.state, State::Off) {
            return;
        }
        self.added.insert(key.0);
        let scanned = match &self.state {
            State::On(layers) => layers.keys(),
            _ => 0,
        };
        if self.added.keys() + scanned > self.max_keys {
            self.turn_off();
        }
    }

    /// Whether the table may hold the key: `false` only when it surely does not.
    pub fn may_contain(&mut self, key: Key) -> bool {
        if let State::Scanning(rx) = &self.state {
            match rx.try_recv() {
                Ok(Some(scanned)) if scanned.keys() + self.added.keys() <= self.max_keys => {
                    self.state = State::On(scanned);
                }
                Ok(_) | Err(mpsc::TryRecvError::Disconnected) => self.turn_off(),
                Err(mpsc::TryRecvError::Empty) => return true,
            }
        }
        match &self.state {
            State::On(scanned) => scanned.may_contain(key.0) || self.added.may_contain(key.0),
            State::Scanning(_) | State::Off => true,
        }
    }

    /// Turns the filter off for the rest of the run, giving its memory back.
    fn turn_off(&mut self) {
        if !matches!(self.state, State::Off) {
            tracing::warn!(
                max = self.max_keys,
                "client_id filter off (more keys than it takes, or no scan): every send probes the index"
            );
        }
        self.state = State::Off;
        self.added = Layers::new();
    }

    /// Waits for the scan (for tests: the filter is then on, or off for good).
    #[cfg(test)]
    pub fn wait(&mut self) {
        if let State::Scanning(rx) = &self.state {
            let answer = rx.recv().ok().flatten();
            self.state = match answer {
                Some(layers) => State::On(layers),
                None => State::Off,
            };
        }
    }

    /// Whether the scan is done and the filter is on.
    #[cfg(test)]
    pub fn is_on(&self) -> bool {
        matches!(self.state, State::On(_))
    }
}

/// Reads every stored key into a filter; `None` past [`MAX_KEYS`].
fn scan(path: &Path, hasher: &RandomState) -> anyhow::Result<Option<Layers>> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mut stmt = conn.prepare(
        "SELECT channel_id, author_id, client_id FROM messages INDEXED BY messages_client
         WHERE client_id IS NOT NULL",
    )?;
    let mut rows = stmt.query([])?;
    let mut layers = Layers::new();
    while let Some(row) = rows.next()? {
        if layers.keys() >= MAX_KEYS {
            return Ok(None);
        }
        let (channel_id, author): (i64, i64) = (row.get(0)?, row.get(1)?);
        let client_id = row.get_ref(2)?.as_str()?;
        layers.insert(key(hasher, channel_id, author, client_id).0);
    }
    Ok(Some(layers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_never_forgets_a_key_and_rarely_claims_one() {
        let mut layers = Layers::new();
        let hasher = RandomState::new();
        let hash = |i: u64| hasher.hash_one(("key", i));
        // Past the first layer, so lookups span several layers.
        let n = (FIRST_LAYER * 3) as u64;
        for i in 0..n {
            layers.insert(hash(i));
        }
        assert!(layers.layers.len() >= 2);
        assert!((0..n).all(|i| layers.may_contain(hash(i))));
        let false_positives = (n..2 * n).filter(|&i| layers.may_contain(hash(i))).count();
        assert!(
            (false_positives as u64) < n / 50,
            "{false_positives} false positives in {n}"
        );
    }

    #[test]
    fn the_scan_finds_every_stored_client_id_and_the_writer_adds_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut conn = Connection::open(&path).unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        let tx = conn.transaction().unwrap();
        for i in 0..5_000i64 {
            tx.execute(
                "INSERT INTO messages (id, channel_id, seq, author_id, text, client_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, 'x', ?5, 0)",
                rusqlite::params![i + 1, i % 7, i + 1, i % 3, format!("c{i}")],
            )
            .unwrap();
        }
        // A message without a client_id is not a key.
        tx.execute(
            "INSERT INTO messages (id, channel_id, seq, author_id, text, created_at)
             VALUES (9999999, 1, 9999999, 1, 'x', 0)",
            [],
        )
        .unwrap();
        tx.commit().unwrap();

        let mut seen = Seen::start(&path);
        // Before the scan is done, every key may be there.
        let new = seen.key(100, 1, "new");
        seen.insert(new);
        seen.wait();
        assert!(seen.is_on());
        for i in 0..5_000i64 {
            assert!(
                seen.may_contain(seen.key(i % 7, i % 3, &format!("c{i}"))),
                "stored key {i}"
            );
        }
        assert!(seen.may_contain(new), "the writer's own key");
        // Keys never stored: the same client_id elsewhere, or another one.
        let claimed = (0..5_000i64)
            .filter(|i| seen.may_contain(seen.key(i % 7 + 10, i % 3, &format!("c{i}"))))
            .count()
            + (5_000..10_000i64)
                .filter(|i| seen.may_contain(seen.key(i % 7, i % 3, &format!("c{i}"))))
                .count();
        assert!(claimed < 100, "{claimed} of 10,000 absent keys claimed");
    }

    #[test]
    fn a_scan_that_cannot_read_leaves_the_filter_off() {
        let dir = tempfile::tempdir().unwrap();
        // No database there: the scan fails, and every key may be there.
        let mut seen = Seen::start(&dir.path().join("missing").join("db"));
        seen.wait();
        assert!(!seen.is_on());
        assert!(seen.may_contain(seen.key(1, 1, "anything")));
    }

    #[test]
    fn a_filter_past_its_bound_turns_off_and_lets_every_key_be_probed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut conn = Connection::open(&path).unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        drop(conn);
        let mut seen = Seen::start(&path);
        seen.max_keys = 10;
        seen.wait();
        assert!(seen.is_on());
        let absent = (0..1_000)
            .map(|i| seen.key(1, 1, &format!("absent{i}")))
            .collect::<Vec<_>>();
        assert!(
            absent.iter().any(|k| !seen.may_contain(*k)),
            "on, it rules keys out"
        );
        for i in 0..11 {
            let k = seen.key(1, 1, &format!("posted{i}"));
            seen.insert(k);
        }
        assert!(!seen.is_on(), "past its bound");
        assert!(
            absent.iter().all(|k| seen.may_contain(*k)),
            "off, every key may be there"
        );
        assert_eq!(seen.added.keys(), 0, "its memory given back");
    }
}
