//! The commit log and its tail.
//!
//! A post commits as one row appended to `commit_log` (rowid order: a commit writes a few
//! pages at the end of one B-tree, however many channels its batch touched) instead of a
//! row in each of the channel-keyed `events` and `messages` tables (a page per channel per
//! commit). Every so often the writer folds the log into those tables in one transaction,
//! many rows per page, and empties it ([`fold`]).
//!
//! Until then the posts are served from memory: the [`Tail`] holds exactly the committed
//! rows of `commit_log`, by channel, and the read paths merge it with what they read from
//! the tables. Readers take the tail *before* their SQL read: a fold that commits in
//! between shows its rows in both (merged away by seq), never in neither.
//!
//! Invariants the writer keeps:
//! - Only posts of live messages go to the log. An op that appends another event to a
//!   channel, or reads or changes its messages (edit, delete, rename, membership), folds
//!   first in its own transaction ([`fold`]), so `events` always holds a prefix of each
//!   channel's log and the tail the rest.
//! - The tail changes only after a commit: extended with the batch's posts, or cleared
//!   when the batch folded. A rolled-back batch leaves it as it was.
//! - At open the whole log is folded before anything is served, so a restart (or a crash)
//!   starts with an empty tail.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::{Connection, Transaction};

use crate::model::{Event, EventBody, Message};

/// Rows in the log past which the writer folds it after a commit, by default.
pub const FOLD_ROWS: usize = 16_384;
/// Age of the oldest unfolded row past which the writer folds when it has nothing queued.
pub(super) const FOLD_AFTER: Duration = Duration::from_secs(1);

/// Committed, not yet folded posts by channel, each channel's in seq order. Shared by the
/// writer (which changes it) and the readers.
#[derive(Default)]
pub(super) struct Tail {
    channels: Mutex<HashMap<i64, Vec<Message>>>,
}

impl Tail {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Vec<Message>>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a committed batch's posts (in commit order).
    pub fn extend(&self, posts: impl IntoIterator<Item = Message>) {
        let mut channels = self.lock();
        for m in posts {
            channels.entry(m.channel_id).or_default().push(m);
        }
    }

    /// Empties the tail once a fold committed.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The channel's unfolded posts with `after < seq < before`, up to `max` of them:
    /// the first ones (`newest` false) or the last ones (`newest` true), in seq order.
    pub fn range(
        &self,
        channel_id: i64,
        after: i64,
        before: i64,
        max: usize,
        newest: bool,
    ) -> Vec<Message> {
        let channels = self.lock();
        let Some(posts) = channels.get(&channel_id) else {
            return Vec::new();
        };
        let lo = posts.partition_point(|m| m.seq <= after);
        let hi = posts.partition_point(|m| m.seq < before).max(lo);
        let (lo, hi) = if newest {
            (hi.saturating_sub(max).max(lo), hi)
        } else {
            (lo, hi.min(lo + max))
        };
        posts[lo..hi].to_vec()
    }

    /// The unfolded post of the channel with this seq.
    pub fn get(&self, channel_id: i64, seq: i64) -> Option<Message> {
        let channels = self.lock();
        let posts = channels.get(&channel_id)?;
        let i = posts.binary_search_by_key(&seq, |m| m.seq).ok()?;
        Some(posts[i].clone())
    }

    /// The channel's unfolded posts with `after < seq <= through`, and how many of them
    /// `author` wrote.
    pub fn count(&self, channel_id: i64, after: i64, through: i64, author: i64) -> (i64, i64) {
        let channels = self.lock();
        let Some(posts) = channels.get(&channel_id) else {
            return (0, 0);
        };
        posts
            .iter()
            .filter(|m| m.seq > after && m.seq <= through)
            .fold((0, 0), |(n, own), m| {
                (n + 1, own + i64::from(m.author_id == author))
            })
    }
}

/// The message event a post in the tail stands for.
pub(super) fn event(m: Message) -> Event {
    Event {
        channel_id: m.channel_id,
        seq: m.seq,
        at: m.created_at,
        body: EventBody::MessageCreated(m),
    }
}

/// Appends an ascending run read from the tail to an ascending run read from the tables,
/// skipping what both hold (a fold committed between the two reads), up to `max` items.
pub(super) fn merge_after<T>(
    mut folded: Vec<T>,
    tail: Vec<T>,
    max: usize,
    seq: impl Fn(&T) -> i64,
) -> Vec<T> {
    let last = folded.last().map(&seq);
    folded.extend(tail.into_iter().filter(|t| last.is_none_or(|l| seq(t) > l)));
    folded.truncate(max);
    folded
}

/// The writer's side of the log: what it has appended in the open batch, and an index of
/// unfolded posts by `client_id` for the idempotency check.
pub(super) struct Unfolded {
    pub tail: std::sync::Arc<Tail>,
    /// Rows in the log past which it is due a fold.
    fold_rows: usize,
    /// Rows in the log (committed and in the open batch).
    rows: usize,
    /// When the oldest unfolded row was appended.
    since: Option<Instant>,
    /// Posts appended in the open batch.
    batch: Vec<Message>,
    /// The open batch folded the log: once it commits, the tail is emptied first.
    folded_in_batch: bool,
    /// `(channel, author, client_id)` → seq of the unfolded posts that carry one.
    by_client: HashMap<(i64, i64, String), i64>,
}

impl Unfolded {
    pub fn new(tail: std::sync::Arc<Tail>, fold_rows: usize) -> Self {
        Self {
            tail,
            fold_rows: fold_rows.max(1),
            rows: 0,
            since: None,
            batch: Vec::new(),
            folded_in_batch: false,
            by_client: HashMap::new(),
        }
    }

    /// Appends a post to the log (in the open transaction).
    pub fn append(&mut self, tx: &Transaction, m: &Message) -> rusqlite::Result<()> {
        tx.prepare_cached(
            "INSERT INTO commit_log (channel_id, seq, message_id, author_id, text, client_id, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(rusqlite::params![
            m.channel_id,
            m.seq,
            m.id,
            m.author_id,
            m.text,
            m.client_id,
            m.created_at
        ])?;
        if let Some(cid) = &m.client_id {
            self.by_client
                .insert((m.channel_id, m.author_id, cid.clone()), m.seq);
        }
        self.batch.push(m.clone());
        self.rows += 1;
        self.since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// An unfolded post by `author` in the channel with this `client_id`.
    pub fn by_client_id(&self, channel_id: i64, author: i64, client_id: &str) -> Option<Message> {
        let seq = *self
            .by_client
            .get(&(channel_id, author, client_id.to_owned()))?;
        let in_batch = self
            .batch
            .iter()
            .rev()
            .find(|m| m.seq == seq && m.channel_id == channel_id);
        in_batch.cloned().or_else(|| self.tail.get(channel_id, seq))
    }

    /// The channel's unfolded posts with `after < seq <= through` (committed or in the
    /// open batch), and how many of them `author` wrote.
    pub fn count(&self, channel_id: i64, after: i64, through: i64, author: i64) -> (i64, i64) {
        // Once the batch folded, the tail's rows are in the tables (in this transaction).
        let (n, own) = if self.folded_in_batch {
            (0, 0)
        } else {
            self.tail.count(channel_id, after, through, author)
        };
        self.batch
            .iter()
            .filter(|m| m.channel_id == channel_id && m.seq > after && m.seq <= through)
            .fold((n, own), |(n, own), m| {
                (n + 1, own + i64::from(m.author_id == author))
            })
    }

    /// Folds the log inside the open transaction, if it holds anything; returns the rows
    /// it moved.
    pub fn fold_in(&mut self, tx: &Transaction) -> rusqlite::Result<usize> {
        if self.rows == 0 {
            return Ok(0);
        }
        let n = fold(tx)?;
        self.folded_in_batch = true;
        self.batch.clear();
        self.by_client.clear();
        self.rows = 0;
        self.since = None;
        Ok(n)
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Whether the log is due a fold of its own: large, or old with the writer idle.
    pub fn due(&self, idle: bool) -> bool {
        self.rows >= self.fold_rows
            || (idle && self.since.is_some_and(|t| t.elapsed() >= FOLD_AFTER))
    }

    /// The open batch committed: the tail now shows it.
    pub fn committed(&mut self) {
        if std::mem::take(&mut self.folded_in_batch) {
            self.tail.clear();
        }
        self.tail.extend(self.batch.drain(..));
    }

    /// The open batch rolled back: forget what it appended or folded, keep the tail.
    pub fn rolled_back(&mut self) {
        self.batch.clear();
        self.folded_in_batch = false;
        let channels = self.tail.lock();
        self.by_client = channels
            .values()
            .flatten()
            .filter_map(|m| {
                let cid = m.client_id.clone()?;
                Some(((m.channel_id, m.author_id, cid), m.seq))
            })
            .collect();
        self.rows = channels.values().map(Vec::len).sum();
        self.since = (self.rows > 0).then(|| self.since.unwrap_or_else(Instant::now));
    }
}

/// Moves every row of the log into `events` and `messages`, in channel order (so each
/// channel's rows land together), and empties it.
pub(super) fn fold(tx: &Transaction) -> rusqlite::Result<usize> {
    let n = tx
        .prepare_cached(
            "INSERT INTO events (channel_id, seq, kind, at, message_id)
             SELECT channel_id, seq, 'message.created', at, message_id FROM commit_log
             ORDER BY channel_id, seq",
        )?
        .execute([])?;
    tx.prepare_cached(
        "INSERT INTO messages (id, channel_id, seq, author_id, text, client_id, created_at)
         SELECT message_id, channel_id, seq, author_id, text, client_id, at FROM commit_log",
    )?
    .execute([])?;
    tx.prepare_cached("DELETE FROM commit_log")?.execute([])?;
    Ok(n)
}

/// Folds the whole log in a transaction of its own: at open, before the writer starts,
/// what a previous run left; in a backup's copy.
pub(super) fn fold_all(conn: &mut Connection) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let n = fold(&tx)?;
    tx.commit()?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(channel_id: i64, seq: i64, author_id: i64) -> Message {
        Message {
            id: channel_id * 1000 + seq,
            channel_id,
            seq,
            author_id,
            text: format!("m{seq}"),
            client_id: None,
            created_at: seq,
            edited_at: None,
            deleted: false,
        }
    }

    #[test]
    fn ranges_take_the_first_or_the_last_within_bounds() {
        let tail = Tail::default();
        tail.extend((5..=10).map(|s| post(1, s, 7)));
        tail.extend([post(2, 1, 7)]);
        let seqs = |v: Vec<Message>| v.iter().map(|m| m.seq).collect::<Vec<_>>();
        assert_eq!(seqs(tail.range(1, 6, i64::MAX, 2, false)), [7, 8]);
        assert_eq!(seqs(tail.range(1, 0, i64::MAX, 2, true)), [9, 10]);
        assert_eq!(seqs(tail.range(1, 0, 9, 3, true)), [6, 7, 8]);
        assert_eq!(seqs(tail.range(1, 8, 9, 3, true)), Vec::<i64>::new());
        assert_eq!(
            seqs(tail.range(1, 20, i64::MAX, 3, false)),
            Vec::<i64>::new()
        );
        assert_eq!(
            seqs(tail.range(3, 0, i64::MAX, 3, false)),
            Vec::<i64>::new()
        );
        assert_eq!(tail.get(1, 7).map(|m| m.text), Some("m7".into()));
        assert_eq!(tail.count(1, 6, 9, 7), (3, 3));
        assert_eq!(tail.count(1, 6, 9, 8), (3, 0));
    }

    #[test]
    fn a_merge_skips_what_both_reads_saw() {
        let folded = vec![1, 2, 3, 4];
        let tail = vec![3, 4, 5, 6];
        assert_eq!(merge_after(folded, tail, 10, |s| *s), [1, 2, 3, 4, 5, 6]);
        assert_eq!(merge_after(vec![], vec![5, 6], 1, |s: &i64| *s), [5]);
        assert_eq!(merge_after(vec![1, 2], vec![], 1, |s: &i64| *s), [1]);
    }
}
