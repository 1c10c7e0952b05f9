//! The commit log and its tail.
//!
//! A post commits as one row appended to `commit_log` (in `pos` order: a commit writes a
//! few pages at the end of one B-tree, however many channels its batch touched) instead
//! of a row in each of the channel-keyed `events` and `messages` tables (a page per
//! channel per commit). The writer moves the log's oldest rows into those tables later,
//! many rows per page ([`fold`]), and deletes them from the log:
//! - a little at a time: the rows of batches committed over [`FOLD_AFTER`] ago, at most
//!   [`TRICKLE_ROWS`] of them, and at least [`TRICKLE_MIN_ROWS`] unless they have waited
//!   [`TRICKLE_WAIT`] (at a low rate rows are folded in chunks, not a page write or more
//!   per row; idle folds keep that rule too); between batches also younger ones while
//!   the log is dense, a chunk of [`EARLY_ROWS_PER_CHANNEL`] rows per channel (at least
//!   [`TRICKLE_ROWS`]) at a time, while it holds two chunks and grows fast enough to
//!   reach `fold_rows` before its rows are old ([`Unfolded::early_chunk`]:
//!   a writer saturated by a few channels would otherwise fold them all at once at
//!   `fold_rows`, a stall every write waits out). The writer folds them between
//!   batches while no write waits, in transactions that do not sync
//!   ([`Unfolded::fold_quiet`]), so no commit carries them;
//!   a writer that has not found its queue empty after a small batch for a while (it is
//!   busy), or whose old rows pile up to [`TRICKLE_BACKLOG`], folds them at the start of
//!   each batch instead ([`Unfolded::trickle`], as many as the batch appends). At a
//!   steady rate the log holds a second or two of posts and no commit waits behind a
//!   large fold;
//! - all of it, young rows too, a chunk at a time, once no write has come for
//!   [`IDLE_FOLD_AFTER`] ([`Quiet::Idle`], in transactions that do not sync,
//!   stopping at the first write that comes): a burst leaves an empty log behind, and
//!   the next burst's writes do not wait behind folds of the last one's rows;
//! - all at once, in a transaction of its own, when the log holds `fold_rows` rows (the
//!   writer is saturated: large folds write the fewest pages per post), at a stop, and
//!   at open (what a previous run or a crash left);
//! - all at once inside the batch, before an op that appends another event to a
//!   channel, or reads or changes its messages (edit, delete, rename, membership).
//!
//! Until then the posts are served from memory: the [`Tail`] holds exactly the committed
//! rows of `commit_log`, by channel, and the read paths merge it with what they read from
//! the tables. Readers take the tail *before* their SQL read: a fold that commits in
//! between shows its rows in both (merged away by seq), never in neither.
//!
//! Invariants the writer keeps:
//! - Only posts of live messages go to the log, and a fold takes a prefix of it (by
//!   `pos`, which is commit order and, per channel, seq order), so `events` always holds
//!   a prefix of each channel's log and the tail the rest.
//! - The tail changes only after a commit: extended with the batch's posts, and rid of
//!   what the batch (or a fold of its own) folded. A rolled-back batch or fold leaves it
//!   as it was.
//! - `pos` is assigned by the writer, growing for the whole run (a full fold empties the
//!   table; rowids alone would start again). The open folds the whole log, so a restart
//!   starts with an empty tail.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, Transaction};

use crate::model::{Event, EventBody, Message};

/// Rows in the log past which the writer folds it all after a commit, by default.
pub const FOLD_ROWS: usize = 16_384;
/// Age past which a committed batch's posts are folded a little at a time.
pub(super) const FOLD_AFTER: Duration = Duration::from_secs(1);
/// Most old rows one batch transaction folds (unless the batch itself appends more).
pub(super) const TRICKLE_ROWS: usize = 512;
/// Fewest old rows a trickle folds, unless they have waited [`TRICKLE_WAIT`]: rows folded
/// together share the pages they go to, and every page a commit writes is a WAL frame of
/// its own (at one post per commit, folding one row a commit wrote ~5 pages more).
pub(super) const TRICKLE_MIN_ROWS: usize = 256;
/// Old rows at which the batches fold them too, as when the writer is busy: the folds
/// between batches are falling behind.
pub(super) const TRICKLE_BACKLOG: usize = 2 * TRICKLE_ROWS;
/// Age past which old rows are folded however few.
pub(super) const TRICKLE_WAIT: Duration = Duration::from_secs(2);
/// A writer that has had no write for this long folds the whole log, young rows too, a
/// chunk at a time while no write comes ([`Quiet::Idle`]).
pub(super) const IDLE_FOLD_AFTER: Duration = Duration::from_millis(250);
/// Rows per channel with posts in the log that a fold takes, on average, when it folds
/// rows younger than [`FOLD_AFTER`] ([`Unfolded::early_chunk`]: a chunk is this many
/// per channel, and never under [`TRICKLE_ROWS`]).
pub(super) const EARLY_ROWS_PER_CHANNEL: usize = 128;
/// Bytes of posts in the log (their text, and a row's overhead) past which it is folded
/// all at once, whatever its rows: bounds the tail's memory.
pub(super) const FOLD_BYTES: usize = 64 << 20;
/// A row's bytes besides its text, counted towards [`FOLD_BYTES`].
const ROW_BYTES: usize = 160;

fn bytes_of(m: &Message) -> usize {
    ROW_BYTES + m.text.len() + m.client_id.as_ref().map_or(0, String::len)
}

/// A post in the log: its position and the message.
#[derive(Clone)]
pub(super) struct Entry {
    pos: i64,
    message: Message,
}

/// Committed, not yet folded posts by channel, each channel's in seq order. Shared by the
/// writer (which changes it) and the readers.
#[derive(Default)]
pub(super) struct Tail {
    inner: Mutex<Inner>,
}

/// Folds remembered for the readers that raced them ([`Tail::view`]).
const RECENT_FOLDS: usize = 64;

#[derive(Default)]
struct Inner {
    channels: HashMap<i64, Vec<Entry>>,
    /// The highest `pos` a committed fold took out of here (0: none this run).
    removed_through: i64,
    /// The latest folds that took posts out, oldest first: how far each went, and the
    /// channels whose posts it took (sorted).
    recent_folds: VecDeque<(i64, Vec<i64>)>,
    /// How far the newest fold no longer in `recent_folds` went (0: none).
    forgotten_through: i64,
}

impl Inner {
    /// Whether no fold past `folded` took posts of `channels` out: a read of their rows
    /// folded through `folded` and this tail count each post once.
    fn unchanged_since(&self, folded: i64, channels: &[i64]) -> bool {
        if self.removed_through <= folded {
            return true;
        }
        self.forgotten_through <= folded
            && self
                .recent_folds
                .iter()
                .filter(|(through, _)| *through > folded)
                .all(|(_, took)| channels.iter().all(|c| took.binary_search(c).is_err()))
    }
}

/// The tail as a reader sees it beside what it read from the tables, which were folded
/// through `folded` (`log_state.folded_through` in the same statement): the posts past
/// it are the ones the channel and member counters it read do not count yet.
pub(super) struct TailView<'a> {
    inner: &'a Inner,
    folded: i64,
}

impl TailView<'_> {
    /// The channel's `last_seq`, given the one read from its row.
    pub fn last_seq(&self, channel_id: i64, row: i64) -> i64 {
        let last = self.inner.channels.get(&channel_id).and_then(|p| p.last());
        last.map_or(row, |e| row.max(e.message.seq))
    }

    /// The channel's posts the counters read from the tables do not count yet, and how
    /// many of them `author` wrote.
    pub fn uncounted(&self, channel_id: i64, author: i64) -> (i64, i64) {
        let Some(posts) = self.inner.channels.get(&channel_id) else {
            return (0, 0);
        };
        // In `pos` order: the uncounted ones are a suffix.
        let from = posts.partition_point(|e| e.pos <= self.folded);
        posts[from..].iter().fold((0, 0), |(n, own), e| {
            (n + 1, own + i64::from(e.message.author_id == author))
        })
    }
}

impl Tail {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a committed batch's posts (in commit order).
    fn extend(&self, posts: impl IntoIterator<Item = Entry>) {
        let mut inner = self.lock();
        for e in posts {
            inner
                .channels
                .entry(e.message.channel_id)
                .or_default()
                .push(e);
        }
    }

    /// Runs `f` on the tail beside a read of `channels`' rows, folded through `folded`,
    /// read *before* this call: `None` when a fold has taken posts of those channels out
    /// of the tail since that read (they would be counted in neither), so the caller
    /// reads again. Under the lock no fold leaves the tail, so a read made while holding
    /// it needs no retry.
    pub fn view<T>(
        &self,
        folded: i64,
        channels: &[i64],
        f: impl FnOnce(&TailView<'_>) -> T,
    ) -> Option<T> {
        let inner = self.lock();
        inner.unchanged_since(folded, channels).then(|| {
            f(&TailView {
                inner: &inner,
                folded,
            })
        })
    }

    /// Reads the tables with `read` (which returns them and how far they were folded),
    /// then finishes with the tail's view of them (`channels` names the channels the
    /// rows are of): again if a fold of those channels came between, at most a few
    /// times, then with the tail held across the read (the writer then waits for it
    /// before it shows its next batch).
    pub fn read_with<R, T>(
        &self,
        mut read: impl FnMut() -> rusqlite::Result<(R, i64)>,
        channels: impl Fn(&R) -> Vec<i64>,
        finish: impl Fn(R, &TailView<'_>) -> T,
    ) -> rusqlite::Result<T> {
        for _ in 0..3 {
            let (rows, folded) = read()?;
            let ids = channels(&rows);
            let mut rows = Some(rows);
            let done = self.view(folded, &ids, |v| finish(rows.take().expect("once"), v));
            if let Some(done) = done {
                return Ok(done);
            }
        }
        let inner = self.lock();
        let (rows, folded) = read()?;
        Ok(finish(
            rows,
            &TailView {
                inner: &inner,
                folded,
            },
        ))
    }

    /// Drops the posts a committed fold moved (`pos <= through`), calling `gone` on each.
    fn remove_through(&self, through: i64, mut gone: impl FnMut(&Message)) {
        let mut inner = self.lock();
        inner.removed_through = inner.removed_through.max(through);
        let mut took = Vec::new();
        inner.channels.retain(|channel, posts| {
            let n = posts.partition_point(|e| e.pos <= through);
            if n > 0 {
                took.push(*channel);
            }
            for e in posts.drain(..n) {
                gone(&e.message);
            }
            !posts.is_empty()
        });
        if !took.is_empty() {
            took.sort_unstable();
            inner.recent_folds.push_back((through, took));
            if inner.recent_folds.len() > RECENT_FOLDS
                && let Some((forgotten, _)) = inner.recent_folds.pop_front()
            {
                inner.forgotten_through = forgotten;
            }
        }
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
        let inner = self.lock();
        let Some(posts) = inner.channels.get(&channel_id) else {
            return Vec::new();
        };
        let lo = posts.partition_point(|e| e.message.seq <= after);
        let hi = posts.partition_point(|e| e.message.seq < before).max(lo);
        let (lo, hi) = if newest {
            (hi.saturating_sub(max).max(lo), hi)
        } else {
            (lo, hi.min(lo + max))
        };
        posts[lo..hi].iter().map(|e| e.message.clone()).collect()
    }

    /// The unfolded post of the channel with this id.
    pub fn find(&self, channel_id: i64, id: i64) -> Option<Message> {
        let inner = self.lock();
        let posts = inner.channels.get(&channel_id)?;
        posts
            .iter()
            .find(|e| e.message.id == id)
            .map(|e| e.message.clone())
    }

    /// How many channels have posts in the tail.
    fn channel_count(&self) -> usize {
        self.lock().channels.len()
    }

    /// The channels with posts in the tail.
    pub fn channels(&self) -> Vec<i64> {
        let inner = self.lock();
        inner
            .channels
            .iter()
            .filter(|(_, e)| !e.is_empty())
            .map(|(c, _)| *c)
            .collect()
    }

    /// Whether any of the channels has posts not folded yet.
    pub fn holds_any(&self, channels: &[i64]) -> bool {
        let inner = self.lock();
        channels
            .iter()
            .any(|c| inner.channels.get(c).is_some_and(|e| !e.is_empty()))
    }

    /// The unfolded post of the channel with this seq.
    fn get(&self, channel_id: i64, seq: i64) -> Option<Message> {
        let inner = self.lock();
        let posts = inner.channels.get(&channel_id)?;
        let i = posts.binary_search_by_key(&seq, |e| e.message.seq).ok()?;
        Some(posts[i].message.clone())
    }

    /// The posts `span` counts among the channel's unfolded ones with `pos > folded`.
    fn count(&self, span: &Span, folded: i64) -> (i64, i64) {
        let inner = self.lock();
        let Some(posts) = inner.channels.get(&span.channel_id) else {
            return (0, 0);
        };
        // In seq order: only the posts in the span are looked at.
        let lo = posts.partition_point(|e| e.message.seq <= span.after);
        let hi = posts
            .partition_point(|e| e.message.seq <= span.through)
            .max(lo);
        span.count(&posts[lo..hi], folded)
    }

    /// The highest `pos` of the channel's posts in the tail.
    fn last_pos(&self, channel_id: i64) -> Option<i64> {
        self.lock().channels.get(&channel_id)?.last().map(|e| e.pos)
    }

    /// What the tail's posts with `after < pos <= through` add to the counters.
    fn tally(&self, after: i64, through: i64, into: &mut Tally) {
        let inner = self.lock();
        for posts in inner.channels.values() {
            // Each channel's posts are in `pos` order.
            let lo = posts.partition_point(|e| e.pos <= after);
            let hi = posts.partition_point(|e| e.pos <= through).max(lo);
            for e in &posts[lo..hi] {
                into.add(&e.message);
            }
        }
    }

    /// The highest seq of the channel's posts in the tail.
    fn last_seq(&self, channel_id: i64) -> Option<i64> {
        self.lock()
            .channels
            .get(&channel_id)?
            .last()
            .map(|e| e.message.seq)
    }

    /// Every post in the tail, for rebuilding the writer's index after a rollback.
    fn entries_after_rollback(&self) -> Vec<Entry> {
        self.lock().channels.values().flatten().cloned().collect()
    }
}

/// A read marker's move: the channel's posts with `after < seq <= through`, and which of
/// them are the reader's own.
pub(super) struct Span {
    pub channel_id: i64,
    pub after: i64,
    pub through: i64,
    pub author: i64,
}

impl Span {
    /// Of `posts`, those with `pos > folded` in the span, and how many `author` wrote.
    fn count(&self, posts: &[Entry], folded: i64) -> (i64, i64) {
        posts
            .iter()
            .filter(|e| {
                let m = &e.message;
                e.pos > folded
                    && m.channel_id == self.channel_id
                    && m.seq > self.after
                    && m.seq <= self.through
            })
            .fold((0, 0), |(n, own), e| {
                (n + 1, own + i64::from(e.message.author_id == self.author))
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

/// A committed batch still (partly) in the log: its last `pos`, its rows, when it
/// committed.
struct Committed {
    last_pos: i64,
    rows: usize,
    bytes: usize,
    at: Instant,
}

/// The writer's side of the log: what it has appended in the open batch, the committed
/// batches not yet folded, and an index of unfolded posts by `client_id` for the
/// idempotency check.
pub(super) struct Unfolded {
    pub tail: Arc<Tail>,
    /// Rows in the log past which it is folded all at once.
    fold_rows: usize,
    /// The next post's `pos`.
    next_pos: i64,
    /// Committed batches with rows in the log, oldest first.
    committed: VecDeque<Committed>,
    /// Rows of the committed batches (some of the oldest may be folded in the open batch).
    committed_rows: usize,
    /// Their bytes ([`bytes_of`]).
    committed_bytes: usize,
    /// Posts appended in the open batch and not folded in it.
    batch: Vec<Entry>,
    /// The open batch (or a fold of its own) folded the log up to this `pos` (0: none).
    folded_through: i64,
    /// `(channel, author, client_id)` → seq of the unfolded posts that carry one.
    by_client: ClientIds,
}

impl Unfolded {
    /// The log starts empty, folded through `folded` (`log_state`): positions go on from
    /// there, so a reader never takes a new post for one the tables count.
    pub fn new(tail: Arc<Tail>, fold_rows: usize, folded: i64) -> Self {
        Self {
            tail,
            fold_rows: fold_rows.max(1),
            next_pos: folded + 1,
            committed: VecDeque::new(),
            committed_rows: 0,
            committed_bytes: 0,
            batch: Vec::new(),
            folded_through: 0,
            by_client: ClientIds::new(),
        }
    }

    /// Appends a post to the log (in the open transaction).
    pub fn append(&mut self, tx: &Transaction, m: &Message) -> rusqlite::Result<()> {
        let pos = self.next_pos;
        tx.prepare_cached(
            "INSERT INTO commit_log (pos, channel_id, seq, message_id, author_id, text, client_id, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(rusqlite::params![
            pos,
            m.channel_id,
            m.seq,
            m.id,
            m.author_id,
            m.text,
            m.client_id,
            m.created_at
        ])?;
        self.next_pos += 1;
        remember(&mut self.by_client, m);
        self.batch.push(Entry {
            pos,
            message: m.clone(),
        });
        Ok(())
    }

    /// An unfolded post by `author` in the channel with this `client_id`.
    pub fn by_client_id(&self, channel_id: i64, author: i64, client_id: &str) -> Option<Message> {
        let seq = *self.by_client.get(&(channel_id, author))?.get(client_id)?;
        let in_batch = self
            .batch
            .iter()
            .rev()
            .find(|e| e.message.seq == seq && e.message.channel_id == channel_id);
        match in_batch {
            Some(e) => Some(e.message.clone()),
            None => self.tail.get(channel_id, seq),
        }
    }

    /// The channel's `last_seq`, given its row's (which counts a post only once it is
    /// folded): its newest post, committed or in the open batch.
    pub fn last_seq(&self, channel_id: i64, row: i64) -> i64 {
        let in_batch = self
            .batch
            .iter()
            .rev()
            .find(|e| e.message.channel_id == channel_id)
            .map(|e| e.message.seq);
        in_batch.map_or_else(|| self.committed_last_seq(channel_id, row), |s| s.max(row))
    }

    /// The channel's `last_seq` as a reader can see it now, given its row's: the open
    /// batch's posts reach the tail only after its commit.
    pub fn committed_last_seq(&self, channel_id: i64, row: i64) -> i64 {
        self.tail.last_seq(channel_id).map_or(row, |s| s.max(row))
    }

    /// The unfolded posts (committed or in the open batch) in `span`, and how many of
    /// them are its author's.
    pub fn count(&self, span: &Span) -> (i64, i64) {
        // What the batch folded is in the tables now (in this transaction).
        let (n, own) = self.tail.count(span, self.folded_through);
        let (b, own_b) = span.count(&self.batch, 0);
        (n + b, own + own_b)
    }

    /// Folds the whole log inside the open transaction; returns the rows it moved.
    pub fn fold_in(&mut self, tx: &Transaction) -> rusqlite::Result<usize> {
        self.fold_through(tx, self.next_pos - 1)
    }

    /// Folds, inside the open transaction, the log up to the channel's newest post in it
    /// (a prefix of the log, as every fold; a committed batch goes whole): before an op
    /// that appends another event to the channel or reads its messages. Nothing when the
    /// channel has none.
    pub fn fold_channel(&mut self, tx: &Transaction, channel_id: i64) -> rusqlite::Result<usize> {
        self.fold_channels(tx, &[channel_id])
    }

    /// Folds, inside the open transaction, the log up to the newest post of any of the
    /// channels (a search reads the index the fold fills).
    pub fn fold_channels(&mut self, tx: &Transaction, channels: &[i64]) -> rusqlite::Result<usize> {
        match channels.iter().filter_map(|c| self.through(*c)).max() {
            Some(pos) => self.fold_through(tx, pos),
            None => Ok(0),
        }
    }

    /// The `pos` a fold must reach to take the channel's posts: its newest post's batch's
    /// last one (a committed batch goes whole).
    fn through(&self, channel_id: i64) -> Option<i64> {
        let in_batch = self
            .batch
            .iter()
            .rev()
            .find(|e| e.message.channel_id == channel_id)
            .map(|e| e.pos);
        in_batch.or_else(|| {
            let pos = self.tail.last_pos(channel_id)?;
            let batch = self.committed.iter().find(|b| b.last_pos >= pos)?;
            Some(batch.last_pos)
        })
    }

    /// A trickle at the start of a batch (or a fold of its own) was undone: nothing of it
    /// holds.
    pub fn trickle_failed(&mut self) {
        self.folded_through = 0;
    }

    /// Folds, inside the open transaction, the oldest committed batches' rows when they
    /// are over [`FOLD_AFTER`] old: at most [`TRICKLE_ROWS`] (or `at_least`) rows, but
    /// always the oldest batch whole; and none while fewer than [`TRICKLE_MIN_ROWS`] are
    /// due and the oldest has waited less than [`TRICKLE_WAIT`].
    pub fn trickle(&mut self, tx: &Connection, at_least: usize) -> rusqlite::Result<usize> {
        match self.old_rows(TRICKLE_ROWS.max(at_least), false) {
            Some(through) => self.fold_through(tx, through),
            None => Ok(0),
        }
    }

    /// The `pos` a trickle of at most `bound` rows (but always the oldest batch whole)
    /// would fold through, if one is due ([`Self::trickle`]'s rule). `early`: young rows
    /// too, up to a chunk, while the log is dense ([`Self::early_chunk`]).
    fn old_rows(&self, bound: usize, early: bool) -> Option<i64> {
        let early = early.then(|| self.early_chunk()).flatten();
        let bound = bound.max(early.unwrap_or(0));
        let (through, rows, oldest) = self.prefix(self.old_batches(early.is_some()), bound);
        let waited = oldest.is_some_and(|at| at.elapsed() >= TRICKLE_WAIT);
        if through == self.folded_through || (rows < TRICKLE_MIN_ROWS && !waited) {
            return None;
        }
        Some(through)
    }

    /// The first of `batches` that add up to at most `bound` rows (but always the first
    /// whole): the `pos` they end at (`folded_through` for none), their rows, and when
    /// the first was committed.
    fn prefix<'a>(
        &self,
        batches: impl Iterator<Item = &'a Committed>,
        bound: usize,
    ) -> (i64, usize, Option<Instant>) {
        let (mut through, mut rows, mut oldest) = (self.folded_through, 0, None);
        for b in batches {
            if rows > 0 && rows + b.rows > bound {
                break;
            }
            oldest.get_or_insert(b.at);
            through = b.last_pos;
            rows += b.rows;
        }
        (through, rows, oldest)
    }

    /// Whether at least [`TRICKLE_BACKLOG`] rows are over [`FOLD_AFTER`] old: the folds
    /// between batches are not keeping up, so the batches fold too.
    pub fn old_rows_pile_up(&self) -> bool {
        let mut rows = 0;
        self.old_batches(false).any(|b| {
            rows += b.rows;
            rows >= TRICKLE_BACKLOG
        })
    }

    /// The committed batches not yet folded and over [`FOLD_AFTER`] old (all of them
    /// when `early`), oldest first.
    fn old_batches(&self, early: bool) -> impl Iterator<Item = &Committed> {
        self.committed
            .iter()
            .skip_while(|b| b.last_pos <= self.folded_through)
            .take_while(move |b| early || b.at.elapsed() >= FOLD_AFTER)
    }

    /// While the log is dense, the rows a fold between batches takes
    /// ([`Self::fold_quiet`]): its batches count as old there before [`FOLD_AFTER`], so a
    /// writer that finds its queue empty now and then folds them a chunk at a time
    /// rather than all at once at `fold_rows`, a stall of ~60 ms at 16k rows that every
    /// write waited out. (A batch's own trickle still waits for old rows: folding young
    /// ones in every batch made each slower, and a writer never idle 13 % slower in
    /// all, `bench store --channels 16`.) Dense: the log holds at least two chunks, a
    /// chunk being [`EARLY_ROWS_PER_CHANNEL`] rows per channel with posts in it (so each
    /// fold still writes many rows per page) and at least [`TRICKLE_ROWS`] (1,024 rows
    /// for up to four channels), and a chunk is at most a quarter of
    /// `fold_rows` (past that many channels, the log is left to fold all at once). And
    /// only while posts come fast enough to reach `fold_rows` before the oldest is
    /// [`FOLD_AFTER`] old: slower, the folds of old rows keep the log short by
    /// themselves (at 5,000 msgs/s into one channel, folding young rows too put
    /// 0.2–0.6 ms on the send→deliver p99).
    fn early_chunk(&self) -> Option<usize> {
        let chunk = TRICKLE_ROWS.max(EARLY_ROWS_PER_CHANNEL * self.tail.channel_count());
        let dense = chunk <= self.fold_rows / 4 && self.committed_rows >= 2 * chunk;
        let fast = || {
            self.committed.front().is_some_and(|oldest| {
                let age = oldest.at.elapsed().max(Duration::from_millis(1));
                self.committed_rows as f64 * FOLD_AFTER.as_secs_f64() / age.as_secs_f64()
                    >= self.fold_rows as f64
            })
        };
        (dense && fast()).then_some(chunk)
    }

    /// Whether a fold of its own between batches ([`Self::fold_quiet`]) would fold some
    /// rows.
    pub fn quiet_due(&self, which: Quiet) -> bool {
        self.batch.is_empty() && self.quiet_rows(which).is_some()
    }

    /// The `pos` a fold of its own would fold through, if one is due. Idle: the log holds
    /// at least [`TRICKLE_MIN_ROWS`] (the chunk itself may be fewer: batches are taken
    /// whole), or its oldest row has waited [`TRICKLE_WAIT`].
    fn quiet_rows(&self, which: Quiet) -> Option<i64> {
        match which {
            Quiet::Old => self.old_rows(TRICKLE_ROWS, true),
            Quiet::Idle => {
                let (through, _, oldest) = self.prefix(self.old_batches(true), TRICKLE_ROWS);
                let waited = oldest.is_some_and(|at| at.elapsed() >= TRICKLE_WAIT);
                let enough = self.committed_rows >= TRICKLE_MIN_ROWS || waited;
                (through > self.folded_through && enough).then_some(through)
            }
        }
    }

    /// Between batches, while no write waits: folds the rows `which` says (old ones as a
    /// trickle would, or while the writer is idle young ones too), in a transaction of
    /// its own that does not sync (`synchronous=NORMAL`), so no batch's commit waits
    /// behind the fold and the fold adds no `fsync`. Durability is not at stake: a fold
    /// only moves committed rows, atomically; a later commit (or the checkpointer) syncs
    /// the WAL with the fold's frames in it, and a fold lost to a crash leaves the rows
    /// in the log, folded at the next open. `synchronous` is set back to `FULL` before
    /// this returns, whatever happened (after a rollback, if a transaction was left
    /// open); if that fails, the error says so and the caller must not commit another
    /// batch on `conn`. Returns the rows folded (0: none due).
    pub fn fold_quiet(
        &mut self,
        conn: &mut Connection,
        which: Quiet,
    ) -> Result<usize, QuietFoldError> {
        debug_assert!(
            self.batch.is_empty() && self.folded_through == 0,
            "a fold of its own while a batch is open"
        );
        let Some(through) = self.quiet_rows(which) else {
            return Ok(0);
        };
        let folded = conn
            .pragma_update(None, "synchronous", "NORMAL")
            .and_then(|()| {
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let n = self.fold_through(&tx, through)?;
                tx.commit()?;
                Ok(n)
            });
        let restored = conn
            .pragma_update(None, "synchronous", "FULL")
            .or_else(|_| {
                // Refused inside a transaction: one a failed commit could not roll back.
                let _ = conn.execute_batch("ROLLBACK");
                conn.pragma_update(None, "synchronous", "FULL")
            });
        // No batch is open: the fold's own rows are all it changed.
        match folded {
            Ok(_) => self.committed(),
            Err(_) => self.trickle_failed(),
        }
        restored.map_err(QuietFoldError::Unsynced)?;
        folded.map_err(QuietFoldError::Fold)
    }

    fn fold_through(&mut self, tx: &Connection, through: i64) -> rusqlite::Result<usize> {
        if through <= self.folded_through {
            return Ok(0);
        }
        // What the fold adds to the channel and member rows, from memory: the posts it
        // moves are the tail's past what this batch folded already, and the batch's own.
        let mut tally = Tally::default();
        self.tail.tally(self.folded_through, through, &mut tally);
        for e in self.batch.iter().filter(|e| e.pos <= through) {
            tally.add(&e.message);
        }
        let n = fold(tx, through, Count::Tally(&tally))?;
        self.folded_through = through;
        // The batch's own posts folded with it leave the index now; the tail's, at commit.
        let by_client = &mut self.by_client;
        self.batch.retain(|e| {
            let keep = e.pos > through;
            if !keep {
                forget(by_client, &e.message);
            }
            keep
        });
        Ok(n)
    }

    /// Rows in the log, committed and in the open batch.
    fn rows(&self) -> usize {
        self.committed_rows + self.batch.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows() == 0
    }

    /// Whether the log is due a fold of its own, all of it, after a commit: it is large.
    /// (Old rows trickle out between batches or with them; while no write comes, all
    /// rows fold a chunk at a time.)
    pub fn due(&self) -> bool {
        let batch_bytes: usize = self.batch.iter().map(|e| bytes_of(&e.message)).sum();
        self.rows() >= self.fold_rows || self.committed_bytes + batch_bytes >= FOLD_BYTES
    }

    /// The open batch (or a fold of its own) committed: the tail now shows its posts and
    /// not what it folded.
    pub fn committed(&mut self) {
        let through = std::mem::take(&mut self.folded_through);
        if through > 0 {
            let by_client = &mut self.by_client;
            self.tail.remove_through(through, |m| forget(by_client, m));
            while let Some(b) = self.committed.front() {
                if b.last_pos > through {
                    break;
                }
                self.committed_rows -= b.rows;
                self.committed_bytes -= b.bytes;
                self.committed.pop_front();
            }
            // No committed batch is folded in part: every fold ends at a batch's end,
            // or in the open batch.
            debug_assert!(self.committed.front().is_none_or(|b| b.last_pos > through));
        }
        if let Some(last) = self.batch.last() {
            let bytes = self.batch.iter().map(|e| bytes_of(&e.message)).sum();
            self.committed.push_back(Committed {
                last_pos: last.pos,
                rows: self.batch.len(),
                bytes,
                at: Instant::now(),
            });
            self.committed_rows += self.batch.len();
            self.committed_bytes += bytes;
        }
        self.tail.extend(self.batch.drain(..));
    }

    /// The open batch rolled back: forget what it appended or folded; the tail and the
    /// committed batches are as they were.
    pub fn rolled_back(&mut self) {
        self.batch.clear();
        self.folded_through = 0;
        self.by_client.clear();
        for e in self.tail.entries_after_rollback() {
            remember(&mut self.by_client, &e.message);
        }
    }
}

/// What a fold of its own between batches takes ([`Unfolded::fold_quiet`]).
#[derive(Clone, Copy, Debug)]
pub(super) enum Quiet {
    /// The rows a trickle would: old ones, or a chunk of young ones while the log is
    /// dense ([`Unfolded::early_chunk`]); after a small batch, while no write waits.
    Old,
    /// The oldest rows, young ones too, [`TRICKLE_ROWS`] at a time (always the oldest
    /// batch whole), once no write has come for [`IDLE_FOLD_AFTER`]: a burst of posts
    /// leaves an empty log behind, and the next burst does not fold the last one's rows
    /// while its own writes wait. A chunk is small, whatever the channels it touches,
    /// because a write that comes waits it out. As with old rows, a log of fewer than
    /// [`TRICKLE_MIN_ROWS`] waits until its oldest row has waited [`TRICKLE_WAIT`], so a
    /// trickle of posts at a low rate is not folded a row at a time.
    Idle,
}

/// Why a quiet fold ([`Unfolded::fold_quiet`]) failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum QuietFoldError {
    /// The fold did not commit: its rows stay in the log.
    #[error("folding old rows: {0}")]
    Fold(rusqlite::Error),
    /// `synchronous` could not be set back to `FULL`: a commit on the connection would
    /// not be durable.
    #[error("restoring synchronous=FULL after a fold: {0}")]
    Unsynced(rusqlite::Error),
}

/// `(channel, author)` → `client_id` → seq: looked up by `&str`, with no allocation on
/// the send path.
type ClientIds = HashMap<(i64, i64), HashMap<String, i64>>;

fn remember(by_client: &mut ClientIds, m: &Message) {
    if let Some(cid) = &m.client_id {
        by_client
            .entry((m.channel_id, m.author_id))
            .or_default()
            .insert(cid.clone(), m.seq);
    }
}

fn forget(by_client: &mut ClientIds, m: &Message) {
    let (Some(cid), Some(ids)) = (
        &m.client_id,
        by_client.get_mut(&(m.channel_id, m.author_id)),
    ) else {
        return;
    };
    ids.remove(cid.as_str());
    if ids.is_empty() {
        by_client.remove(&(m.channel_id, m.author_id));
    }
}

/// What a fold adds to the channel and member rows: per channel its newest seq and its
/// posts, per channel and author the author's posts.
#[derive(Default)]
pub(super) struct Tally {
    channels: HashMap<i64, (i64, i64)>,
    authors: HashMap<(i64, i64), i64>,
}

impl Tally {
    fn add(&mut self, m: &Message) {
        let (last, n) = self.channels.entry(m.channel_id).or_default();
        *last = (*last).max(m.seq);
        *n += 1;
        *self.authors.entry((m.channel_id, m.author_id)).or_default() += 1;
    }
}

/// How a fold counts the posts it moves in the channel and member rows.
pub(super) enum Count<'a> {
    /// The writer's count of them; every `pos` up to `through` is folded or was never
    /// committed (a rolled-back batch's), so the log is folded through `through`.
    Tally(&'a Tally),
    /// By aggregating the rows (at open, in a backup's copy).
    Rows,
    /// Not at all: a log an earlier build (schema before 19, no `log_state`) left, whose
    /// posts were counted when they committed.
    Counted,
}

/// Moves the log's rows up to `through` into `events` and `messages`, in channel order
/// (so each channel's rows land together), counts them in their channel's `last_seq` and
/// `live_messages` and their author's `own_unread` (see [`Count`]), records how far the
/// log is folded, and deletes them from the log.
pub(super) fn fold(tx: &Connection, through: i64, count: Count) -> rusqlite::Result<usize> {
    let n = tx
        .prepare_cached(
            "INSERT INTO events (channel_id, seq, kind, at, message_id)
             SELECT channel_id, seq, 'message.created', at, message_id FROM commit_log
             WHERE pos <= ?1 ORDER BY channel_id, seq",
        )?
        .execute([through])?;
    tx.prepare_cached(
        "INSERT INTO messages (id, channel_id, seq, author_id, text, client_id, created_at)
         SELECT message_id, channel_id, seq, author_id, text, client_id, at FROM commit_log
         WHERE pos <= ?1",
    )?
    .execute([through])?;
    tx.prepare_cached(
        "INSERT INTO search_queue (message_id) SELECT message_id FROM commit_log WHERE pos <= ?1",
    )?
    .execute([through])?;
    match count {
        // A statement per channel and author: a few pages, against two scans and sorts
        // of the rows (~0.8 µs a post in a fold of 16k).
        Count::Tally(tally) => {
            let mut channel = tx.prepare_cached(
                "UPDATE channels SET last_seq = max(last_seq, ?2), live_messages = live_messages + ?3
                 WHERE id = ?1",
            )?;
            for (id, (last, n)) in &tally.channels {
                channel.execute([*id, *last, *n])?;
            }
            let mut member = tx.prepare_cached(
                "UPDATE members SET own_unread = own_unread + ?3 WHERE channel_id = ?1 AND user_id = ?2",
            )?;
            for ((channel_id, author), n) in &tally.authors {
                member.execute([*channel_id, *author, *n])?;
            }
            tx.prepare_cached("UPDATE log_state SET folded_through = max(folded_through, ?1)")?
                .execute([through])?;
        }
        Count::Rows => {
            tx.prepare_cached(
                "UPDATE channels SET last_seq = max(channels.last_seq, l.last),
                                     live_messages = channels.live_messages + l.n
                 FROM (SELECT channel_id, max(seq) AS last, count(*) AS n FROM commit_log
                       WHERE pos <= ?1 GROUP BY channel_id) AS l
                 WHERE channels.id = l.channel_id",
            )?
            .execute([through])?;
            tx.prepare_cached(
                "UPDATE members SET own_unread = members.own_unread + l.n
                 FROM (SELECT channel_id, author_id, count(*) AS n FROM commit_log
                       WHERE pos <= ?1 GROUP BY channel_id, author_id) AS l
                 WHERE members.channel_id = l.channel_id AND members.user_id = l.author_id",
            )?
            .execute([through])?;
            tx.prepare_cached(
                "UPDATE log_state SET folded_through = max(folded_through,
                     coalesce((SELECT max(pos) FROM commit_log WHERE pos <= ?1), 0))",
            )?
            .execute([through])?;
        }
        Count::Counted => {}
    }
    tx.prepare_cached("DELETE FROM commit_log WHERE pos <= ?1")?
        .execute([through])?;
    Ok(n)
}

/// How far the log is folded (`log_state`).
pub(super) fn folded_through(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT folded_through FROM log_state", [], |r| r.get(0))
}

/// Folds the whole log in a transaction of its own: at open, before the writer starts,
/// what a previous run left; in a backup's copy, which may be of an earlier schema (a
/// running server of an earlier build), whose log was counted at commit.
pub(super) fn fold_all(conn: &mut Connection) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let count = if super::schema::has_table(&tx, "log_state")? {
        Count::Rows
    } else {
        Count::Counted
    };
    let n = fold(&tx, i64::MAX, count)?;
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
            client_id: Some(format!("c{channel_id}-{seq}")),
            created_at: seq,
            edited_at: None,
            deleted: false,
            ..Message::default()
        }
    }

    fn entry(pos: i64, message: Message) -> Entry {
        Entry { pos, message }
    }

    #[test]
    fn ranges_take_the_first_or_the_last_within_bounds() {
        let tail = Tail::default();
        tail.extend((5..=10).map(|s| entry(s, post(1, s, 7))));
        tail.extend([entry(11, post(2, 1, 7))]);
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
        let span = |author| Span {
            channel_id: 1,
            after: 6,
            through: 9,
            author,
        };
        assert_eq!(tail.count(&span(7), 0), (3, 3));
        assert_eq!(tail.count(&span(8), 0), (3, 0));
        assert_eq!(tail.count(&span(7), 8), (1, 1), "pos 7 and 8 folded");
        let mut gone = Vec::new();
        tail.remove_through(7, |m| gone.push(m.seq));
        assert_eq!(gone, [5, 6, 7]);
        assert_eq!(seqs(tail.range(1, 0, i64::MAX, 10, false)), [8, 9, 10]);
        tail.remove_through(11, |_| {});
        assert!(tail.entries_after_rollback().is_empty());
    }

    #[test]
    fn readers_add_the_posts_past_the_fold_they_read_and_read_again_after_a_fold() {
        let tail = Tail::default();
        tail.extend([
            entry(1, post(1, 5, 7)),
            entry(2, post(1, 6, 8)),
            entry(3, post(2, 1, 7)),
            entry(4, post(1, 7, 7)),
        ]);
        let seen = |folded| tail.view(folded, &[1], |v| (v.last_seq(1, 4), v.uncounted(1, 7)));
        assert_eq!(seen(0), Some((7, (3, 2))));
        // The tables were read folded through pos 2: they count the first two.
        assert_eq!(seen(2), Some((7, (1, 1))));
        assert_eq!(
            tail.view(0, &[3], |v| (v.last_seq(3, 9), v.uncounted(3, 7))),
            Some((9, (0, 0))),
            "a channel with nothing in the tail is as its row says"
        );
        // A fold through pos 2 commits and leaves the tail: a read of channel 1's rows
        // from before it counts those posts nowhere, so it must read again; a read of
        // channel 2's need not (the fold took none of its posts).
        tail.remove_through(2, |_| {});
        assert_eq!(seen(0), None);
        assert_eq!(seen(2), Some((7, (1, 1))));
        assert_eq!(tail.view(0, &[2], |v| v.uncounted(2, 7)), Some((1, 1)));
        let mut reads = 0;
        let got = tail
            .read_with(
                || {
                    reads += 1;
                    // The first read was before the fold; the second after.
                    Ok((6, if reads == 1 { 0 } else { 2 }))
                },
                |_| vec![1],
                |row, v| (v.last_seq(1, row), v.uncounted(1, 8)),
            )
            .unwrap();
        assert_eq!((got, reads), ((7, (1, 0)), 2));
        let mut reads = 0;
        let got = tail
            .read_with(
                || {
                    reads += 1;
                    Ok((6, 0))
                },
                |_| vec![1],
                |row, v| v.last_seq(1, row),
            )
            .unwrap();
        assert_eq!(
            (got, reads),
            (7, 4),
            "three reads race a fold, then one holds the tail"
        );
        // Past the folds it remembers, a reader from before them cannot tell: it reads
        // again.
        for pos in 5..5 + RECENT_FOLDS as i64 {
            tail.extend([entry(pos, post(4, pos, 7))]);
            tail.remove_through(pos, |_| {});
        }
        assert_eq!(
            tail.view(1, &[9], |_| ()),
            None,
            "the fold through 2 is forgotten"
        );
        assert_eq!(tail.view(3, &[9], |_| ()), Some(()));
        assert_eq!(
            tail.view(3, &[2], |_| ()),
            None,
            "the fold through 5 took pos 3"
        );
        assert_eq!(tail.view(5, &[2], |v| v.uncounted(2, 7)), Some((0, 0)));
    }

    #[test]
    fn a_merge_skips_what_both_reads_saw() {
        let folded = vec![1, 2, 3, 4];
        let tail = vec![3, 4, 5, 6];
        assert_eq!(merge_after(folded, tail, 10, |s| *s), [1, 2, 3, 4, 5, 6]);
        assert_eq!(merge_after(vec![], vec![5, 6], 1, |s: &i64| *s), [5]);
        assert_eq!(merge_after(vec![1, 2], vec![], 1, |s: &i64| *s), [1]);
    }

    /// A migrated database in a temporary directory (dropped with the directory).
    fn database() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("db")).unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        (dir, conn)
    }

    /// Rows in (`commit_log`, `events`, `messages`).
    fn counts(conn: &Connection) -> (i64, i64, i64) {
        conn.query_row(
            "SELECT (SELECT count(*) FROM commit_log), (SELECT count(*) FROM events),
                    (SELECT count(*) FROM messages)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    }

    /// A batch of `posts` committed after the trickle; the rows it folded.
    fn commit(conn: &mut Connection, log: &mut Unfolded, posts: &[Message]) -> usize {
        commit_as(conn, log, posts, true)
    }

    /// A batch of `posts` committed, after the trickle if `trickle`; the rows it folded.
    fn commit_as(
        conn: &mut Connection,
        log: &mut Unfolded,
        posts: &[Message],
        trickle: bool,
    ) -> usize {
        let tx = conn.transaction().unwrap();
        let n = if trickle {
            log.trickle(&tx, posts.len()).unwrap()
        } else {
            0
        };
        for m in posts {
            log.append(&tx, m).unwrap();
        }
        tx.commit().unwrap();
        log.committed();
        n
    }

    #[test]
    fn old_batches_trickle_out_a_rolled_back_fold_changes_nothing_and_a_full_fold_takes_all() {
        let (_dir, mut conn) = database();
        let mut log = Unfolded::new(Arc::new(Tail::default()), 1000, 0);
        // Two old batches, then a young one.
        commit(&mut conn, &mut log, &[post(1, 1, 7), post(2, 1, 7)]);
        commit(&mut conn, &mut log, &[post(1, 2, 8)]);
        assert!(!log.due());
        std::thread::sleep(TRICKLE_WAIT + Duration::from_millis(100));
        commit(&mut conn, &mut log, &[post(1, 3, 7)]);
        assert_eq!(counts(&conn), (1, 3, 3), "the old batches folded");
        let seqs = |log: &Unfolded, ch| {
            log.tail
                .range(ch, 0, i64::MAX, 10, false)
                .iter()
                .map(|m| m.seq)
                .collect::<Vec<_>>()
        };
        assert_eq!(seqs(&log, 1), [3]);
        assert_eq!(seqs(&log, 2), Vec::<i64>::new());
        assert!(
            log.by_client_id(1, 7, "c1-1").is_none(),
            "folded: the table answers"
        );
        assert_eq!(log.by_client_id(1, 7, "c1-3").map(|m| m.seq), Some(3));
        let span = Span {
            channel_id: 1,
            after: 0,
            through: 10,
            author: 7,
        };
        assert_eq!(log.count(&span), (1, 1));
        // A batch that folds everything, appends, and rolls back: nothing changed.
        {
            let tx = conn.transaction().unwrap();
            assert_eq!(log.fold_in(&tx).unwrap(), 1);
            log.append(&tx, &post(1, 4, 7)).unwrap();
            assert_eq!(log.count(&span), (1, 1), "seq 3 folded, seq 4 in the batch");
            drop(tx);
            log.rolled_back();
        }
        assert_eq!(counts(&conn), (1, 3, 3));
        assert_eq!(seqs(&log, 1), [3]);
        assert_eq!(log.by_client_id(1, 7, "c1-3").map(|m| m.seq), Some(3));
        assert!(log.by_client_id(1, 7, "c1-4").is_none());
        // The same batch committed: the tail holds only what came after the fold.
        {
            let tx = conn.transaction().unwrap();
            log.fold_in(&tx).unwrap();
            log.append(&tx, &post(1, 4, 7)).unwrap();
            tx.commit().unwrap();
            log.committed();
        }
        assert_eq!(counts(&conn), (1, 4, 4));
        assert_eq!(seqs(&log, 1), [4]);
        assert_eq!(log.rows(), 1);
        assert!(log.by_client_id(1, 7, "c1-3").is_none());
        assert_eq!(fold_all(&mut conn).unwrap(), 1);
        assert_eq!(counts(&conn), (0, 5, 5));
    }

    /// The channel's `(last_seq, live_messages)`, its members' `own_unread` by user, and
    /// `log_state.folded_through`.
    fn counters(conn: &Connection, channel_id: i64) -> ((i64, i64), Vec<(i64, i64)>, i64) {
        let row = conn
            .query_row(
                "SELECT last_seq, live_messages FROM channels WHERE id = ?1",
                [channel_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        let own = conn
            .prepare(
                "SELECT user_id, own_unread FROM members WHERE channel_id = ?1 ORDER BY user_id",
            )
            .unwrap()
            .query_map([channel_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        (row, own, folded_through(conn).unwrap())
    }

    /// A commit leaves the channel and member rows alone (a page each per commit it
    /// wrote before); the fold counts the posts it moves, and positions go on past it.
    #[test]
    fn the_fold_counts_the_posts_it_moves_and_positions_go_on_past_it() {
        let (_dir, mut conn) = database();
        conn.execute_batch(
            "INSERT INTO channels (id, kind, name, owner_id, created_at) VALUES (1, 'group', 'a', 7, 0);
             INSERT INTO members (channel_id, user_id, role, read_seq, live_read, own_unread)
                 VALUES (1, 7, 'owner', 0, 0, 0), (1, 8, 'member', 0, 0, 0);",
        )
        .unwrap();
        let mut log = Unfolded::new(Arc::new(Tail::default()), 1000, 0);
        commit(&mut conn, &mut log, &[post(1, 1, 7), post(1, 2, 8)]);
        commit(&mut conn, &mut log, &[post(1, 3, 7)]);
        assert_eq!(counters(&conn, 1), ((0, 0), vec![(7, 0), (8, 0)], 0));
        assert_eq!(log.last_seq(1, 0), 3);
        {
            let tx = conn.transaction().unwrap();
            assert_eq!(log.fold_channel(&tx, 1).unwrap(), 3);
            log.append(&tx, &post(1, 4, 8)).unwrap();
            assert_eq!(log.last_seq(1, 0), 4, "the open batch's post");
            assert_eq!(log.committed_last_seq(1, 0), 3, "what readers see");
            tx.commit().unwrap();
            log.committed();
        }
        assert_eq!(counters(&conn, 1), ((3, 3), vec![(7, 2), (8, 1)], 3));
        assert_eq!(
            log.tail
                .view(3, &[1], |v| (v.last_seq(1, 3), v.uncounted(1, 8))),
            Some((4, (1, 1)))
        );
        // Two folds in one batch: the second counts only what the first left.
        {
            let tx = conn.transaction().unwrap();
            assert_eq!(log.fold_through(&tx, 4).unwrap(), 1);
            log.append(&tx, &post(1, 5, 7)).unwrap();
            log.append(&tx, &post(1, 6, 7)).unwrap();
            assert_eq!(log.fold_through(&tx, 5).unwrap(), 1);
            tx.commit().unwrap();
            log.committed();
        }
        assert_eq!(counters(&conn, 1), ((5, 5), vec![(7, 3), (8, 2)], 5));
        // Without the writer's count (at open, in a backup's copy) the rows are counted.
        assert_eq!(fold_all(&mut conn).unwrap(), 1);
        assert_eq!(counters(&conn, 1), ((6, 6), vec![(7, 4), (8, 2)], 6));
        // The next run's log starts past what was folded.
        let mut next = Unfolded::new(
            Arc::new(Tail::default()),
            1000,
            folded_through(&conn).unwrap(),
        );
        commit(&mut conn, &mut next, &[post(1, 7, 8)]);
        assert_eq!(
            next.tail.view(6, &[1], |v| v.uncounted(1, 8)),
            Some((1, 1)),
            "a new post is past the fold"
        );
        assert_eq!(fold_all(&mut conn).unwrap(), 1);
        assert_eq!(counters(&conn, 1), ((7, 7), vec![(7, 4), (8, 3)], 7));
    }

    /// Regression: a full fold after a rolled-back batch went through that batch's
    /// positions, but the log recorded only the last one it held: the tail was past
    /// what every reader read, so each counter read went to its slow path until the next
    /// fold.
    #[test]
    fn a_fold_past_a_rolled_back_batch_records_how_far_it_went() {
        let (_dir, mut conn) = database();
        let tail = Arc::new(Tail::default());
        let mut log = Unfolded::new(Arc::clone(&tail), 1000, 0);
        commit(&mut conn, &mut log, &[post(1, 1, 7)]);
        {
            let tx = conn.transaction().unwrap();
            log.append(&tx, &post(1, 2, 7)).unwrap();
            drop(tx);
            log.rolled_back();
        }
        {
            let tx = conn.transaction().unwrap();
            assert_eq!(log.fold_in(&tx).unwrap(), 1);
            tx.commit().unwrap();
            log.committed();
        }
        let folded = folded_through(&conn).unwrap();
        assert_eq!(folded, 2);
        assert_eq!(tail.view(folded, &[1], |v| v.last_seq(1, 1)), Some(1));
    }

    /// Regression: at one post per commit, each commit folded the one row that had just
    /// become old, so every post cost a commit some five more page writes. A few old
    /// rows now wait for more (or for [`TRICKLE_WAIT`]) and fold together.
    #[test]
    fn a_trickle_folds_old_rows_in_chunks() {
        let (_dir, mut conn) = database();
        let mut log = Unfolded::new(Arc::new(Tail::default()), 100_000, 0);
        commit(
            &mut conn,
            &mut log,
            &[post(1, 1, 7), post(2, 1, 7), post(1, 2, 8)],
        );
        std::thread::sleep(FOLD_AFTER + Duration::from_millis(100));
        assert_eq!(
            commit(&mut conn, &mut log, &[post(1, 3, 7)]),
            0,
            "three old rows wait"
        );
        let many: Vec<Message> = (1..=TRICKLE_MIN_ROWS as i64)
            .map(|seq| post(3, seq, 7))
            .collect();
        assert_eq!(commit(&mut conn, &mut log, &many), 0);
        std::thread::sleep(FOLD_AFTER + Duration::from_millis(100));
        let folded = commit(&mut conn, &mut log, &[post(1, 4, 7)]);
        assert_eq!(
            folded,
            TRICKLE_MIN_ROWS + 4,
            "enough old rows fold together"
        );
        assert_eq!(log.rows(), 1);
        assert_eq!(counts(&conn).1, folded as i64);
    }

    /// Makes every committed batch committed now: what a test says of young rows holds
    /// however slowly it ran.
    fn rejuvenate(log: &mut Unfolded) {
        for b in &mut log.committed {
            b.at = Instant::now();
        }
    }

    /// Makes every committed batch `by` older (instead of sleeping).
    fn age(log: &mut Unfolded, by: Duration) {
        for b in &mut log.committed {
            b.at = b.at.checked_sub(by).expect("an instant that far back");
        }
    }

    fn synchronous(conn: &Connection) -> i64 {
        conn.pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap()
    }

    /// Between batches the old rows fold in a transaction of their own that does not
    /// sync; the connection is back to `synchronous=FULL` after it, also when it fails.
    #[test]
    fn a_quiet_fold_takes_the_old_rows_and_leaves_the_connection_syncing() {
        let (_dir, mut conn) = database();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        let mut log = Unfolded::new(Arc::new(Tail::default()), 100_000, 0);
        let many: Vec<Message> = (1..=TRICKLE_MIN_ROWS as i64 + 10)
            .map(|seq| post(1 + seq % 3, seq, 7))
            .collect();
        commit_as(&mut conn, &mut log, &many, false);
        assert!(!log.quiet_due(Quiet::Old), "young rows wait");
        assert_eq!(log.fold_quiet(&mut conn, Quiet::Old).unwrap(), 0);
        age(&mut log, FOLD_AFTER + Duration::from_millis(100));
        commit_as(&mut conn, &mut log, &[post(9, 1, 7)], false);
        assert_eq!(
            counts(&conn).0,
            many.len() as i64 + 1,
            "all rows in the log"
        );
        assert!(log.quiet_due(Quiet::Old));

        // A fold that fails (its table is gone) leaves the rows where they were.
        conn.execute_batch("ALTER TABLE events RENAME TO events_away")
            .unwrap();
        assert!(matches!(
            log.fold_quiet(&mut conn, Quiet::Old),
            Err(QuietFoldError::Fold(_))
        ));
        assert_eq!(synchronous(&conn), 2, "FULL again after a failed fold");
        assert_eq!(log.rows(), many.len() + 1);
        conn.execute_batch("ALTER TABLE events_away RENAME TO events")
            .unwrap();

        assert_eq!(log.fold_quiet(&mut conn, Quiet::Old).unwrap(), many.len());
        assert_eq!(synchronous(&conn), 2, "FULL again after a fold");
        assert_eq!(counts(&conn), (1, many.len() as i64, many.len() as i64));
        assert_eq!(log.rows(), 1, "the young row stays");
        assert!(log.tail.range(1, 0, i64::MAX, 10, false).is_empty());
        assert_eq!(log.tail.range(9, 0, i64::MAX, 10, false).len(), 1);
        assert!(
            log.by_client_id(1, 7, "c1-3").is_none(),
            "folded: the table answers"
        );
        assert!(!log.quiet_due(Quiet::Old));
    }

    /// Idle, the writer folds every row, young ones too, a chunk of [`TRICKLE_ROWS`] at a
    /// time (the oldest batch always whole), in transactions that do not sync; the
    /// connection is back to `synchronous=FULL` after each. Fewer than
    /// [`TRICKLE_MIN_ROWS`] young rows wait until they have waited [`TRICKLE_WAIT`].
    #[test]
    fn an_idle_fold_takes_young_rows_a_chunk_at_a_time_until_the_log_is_empty() {
        let (_dir, mut conn) = database();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        let mut log = Unfolded::new(Arc::new(Tail::default()), 100_000, 0);
        assert_eq!(
            log.fold_quiet(&mut conn, Quiet::Idle).unwrap(),
            0,
            "an empty log"
        );
        // A batch larger than a chunk, then three of 200 rows over channels 2-4.
        let large: Vec<Message> = (1..=TRICKLE_ROWS as i64 + 100)
            .map(|seq| post(1, seq, 7))
            .collect();
        commit_as(&mut conn, &mut log, &large, false);
        for ch in 2..=4 {
            let posts: Vec<Message> = (1..=200).map(|seq| post(ch, seq, 8)).collect();
            commit_as(&mut conn, &mut log, &posts, false);
        }
        rejuvenate(&mut log);
        assert!(log.quiet_due(Quiet::Idle));

        assert_eq!(
            log.fold_quiet(&mut conn, Quiet::Idle).unwrap(),
            large.len(),
            "the oldest batch whole, though over a chunk"
        );
        assert_eq!(synchronous(&conn), 2, "FULL again after a fold");
        assert_eq!(
            log.fold_quiet(&mut conn, Quiet::Idle).unwrap(),
            400,
            "whole batches, up to a chunk"
        );
        assert_eq!(synchronous(&conn), 2);
        assert!(!log.quiet_due(Quiet::Idle), "200 young rows wait");
        assert_eq!(log.fold_quiet(&mut conn, Quiet::Idle).unwrap(), 0);
        age(&mut log, TRICKLE_WAIT);
        assert!(log.quiet_due(Quiet::Idle), "until they have waited");
        assert_eq!(log.fold_quiet(&mut conn, Quiet::Idle).unwrap(), 200);
        assert!(log.is_empty());
        let rows = large.len() as i64 + 600;
        assert_eq!(counts(&conn), (0, rows, rows));
        assert_eq!(folded_through(&conn).unwrap(), rows, "positions 1..=rows");
        for ch in 1..=4 {
            assert!(log.tail.range(ch, 0, i64::MAX, 10, false).is_empty());
        }
        assert!(!log.quiet_due(Quiet::Idle), "nothing left");
        assert_eq!(log.fold_quiet(&mut conn, Quiet::Idle).unwrap(), 0);
    }

    /// A dense log (many rows per channel) folds its young rows a chunk at a time, down
    /// to under two chunks; one spread over many channels leaves them to age.
    #[test]
    fn a_dense_log_folds_young_rows_a_chunk_at_a_time() {
        let (_dir, mut conn) = database();
        let mut log = Unfolded::new(Arc::new(Tail::default()), 100_000, 0);
        let batch = |log: &Unfolded, n: i64, channels: i64| -> Vec<Message> {
            let from = log.next_pos;
            (from..from + n)
                .map(|seq| post(1 + seq % channels, seq, 7))
                .collect()
        };
        for _ in 0..10 {
            let posts = batch(&log, 100, 1);
            commit_as(&mut conn, &mut log, &posts, false);
        }
        rejuvenate(&mut log);
        assert_eq!(log.early_chunk(), None, "1,000 rows: under two chunks");
        assert!(!log.quiet_due(Quiet::Old));
        let posts = batch(&log, 100, 1);
        commit_as(&mut conn, &mut log, &posts, false);
        rejuvenate(&mut log);
        assert_eq!(
            log.early_chunk(),
            Some(TRICKLE_ROWS),
            "two chunks of one channel's rows (a chunk is never under 512)"
        );
        assert!(log.quiet_due(Quiet::Old));
        assert!(
            !log.old_rows_pile_up(),
            "the batches leave them to the folds between batches"
        );
        assert_eq!(
            log.fold_quiet(&mut conn, Quiet::Old).unwrap(),
            500,
            "a chunk: whole batches"
        );
        assert_eq!(log.rows(), 600);
        rejuvenate(&mut log);
        assert_eq!(log.early_chunk(), None, "under two chunks again");
        assert!(!log.quiet_due(Quiet::Old));
        assert_eq!(counts(&conn).1, 500);

        // Dense again, but its oldest row came half a second ago: ~2,200 rows a second
        // would not reach `fold_rows` before they are old, so they wait to be.
        for _ in 0..5 {
            let posts = batch(&log, 100, 1);
            commit_as(&mut conn, &mut log, &posts, false);
        }
        rejuvenate(&mut log);
        assert!(log.early_chunk().is_some(), "1,100 rows at once");
        age(&mut log, FOLD_AFTER / 2);
        assert_eq!(log.early_chunk(), None, "1,100 rows in half a second");
        assert!(!log.quiet_due(Quiet::Old));

        // 2,000 young rows over 40 channels: a chunk would be 5,120 rows.
        let (_dir, mut conn) = database();
        let mut log = Unfolded::new(Arc::new(Tail::default()), 100_000, 0);
        for _ in 0..20 {
            let posts = batch(&log, 100, 40);
            commit_as(&mut conn, &mut log, &posts, false);
        }
        rejuvenate(&mut log);
        assert_eq!(log.early_chunk(), None, "40 channels, 50 rows each");
        assert!(!log.quiet_due(Quiet::Old), "young rows wait");
        assert_eq!(log.fold_quiet(&mut conn, Quiet::Old).unwrap(), 0);
    }

    /// The batches fold old rows too once [`TRICKLE_BACKLOG`] of them wait.
    #[test]
    fn old_rows_that_pile_up_are_told() {
        let (_dir, mut conn) = database();
        let mut log = Unfolded::new(Arc::new(Tail::default()), 100_000, 0);
        // Over 40 channels: far from dense, so young rows wait ([`Unfolded::early_chunk`]).
        let posts = |from: i64, n: usize| -> Vec<Message> {
            (from..from + n as i64)
                .map(|seq| post(1 + seq % 40, seq, 7))
                .collect()
        };
        commit_as(&mut conn, &mut log, &posts(1, TRICKLE_BACKLOG - 1), false);
        assert!(!log.old_rows_pile_up(), "young rows");
        age(&mut log, FOLD_AFTER + Duration::from_millis(100));
        assert!(log.quiet_due(Quiet::Old));
        assert!(!log.old_rows_pile_up(), "one row short");
        commit_as(
            &mut conn,
            &mut log,
            &posts(TRICKLE_BACKLOG as i64, 1),
            false,
        );
        assert!(!log.old_rows_pile_up(), "the young row does not count");
        age(&mut log, FOLD_AFTER + Duration::from_millis(100));
        assert!(log.old_rows_pile_up());
    }
}
