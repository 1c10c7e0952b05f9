//! The search index, kept off the writer: a full-text index (FTS5) in a file of its own
//! beside the database (`natter.db` → `natter.search.db`), written by a thread of its own.
//!
//! The writer's share is one row per change: triggers on `messages` append the id of every
//! message inserted, edited, deleted or removed to `search_queue`. This thread reads the
//! queue past the position it has indexed through, reads those messages' current text from
//! the database, writes them into the index, and stores the position in the same
//! transaction as the index rows (`synchronous=FULL`), so the index and its position
//! always agree, after a crash too. The writer deletes the queue's rows the index has
//! passed ([`IndexSignal::trim_due`]). Indexing a message twice is harmless: each row of
//! the queue only says "look at this message again".
//!
//! A search first folds the commit log through the caller's channels and then waits
//! (as long as its time budget, a second at least) until the index has passed the queue's end as it was
//! after that fold, so a search finds every message acknowledged before it.
//!
//! The index is derived data. It is rebuilt from `messages` when its file is missing, or
//! was built for another database: `search_meta.epoch` names the database, and a backup's
//! copy gets a new one, so a restored backup never trusts an index of the live server.
//!
//! Failure: an index write that fails (a full disk) is rolled back and retried a second
//! later; writes are never refused for it, searches meanwhile read the index as it is.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::watch;

use crate::metrics::render_one;

/// Queue rows one index transaction takes (and messages one rebuild step reads).
const BATCH: usize = 8192;
/// The queue's rows the index passed that the writer lets pile up before it trims them.
const TRIM_EVERY: i64 = 4096;
/// The most queue rows one trim deletes (a trim rides in a batch of writes).
const TRIM_MOST: i64 = 65_536;
/// After a pass, how long the thread lets changes gather before the next one (unless a
/// search waits): fewer, larger transactions under load.
const GATHER: Duration = Duration::from_millis(100);
/// How long the thread waits before it tries again after a failed pass.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The index file of the database at `db`.
pub fn index_path(db: &Path) -> PathBuf {
    db.with_extension("search.db")
}

const INDEX_SCHEMA: &str = r#"
    CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(
        text, ch, content='', contentless_delete=1,
        tokenize='unicode61 remove_diacritics 2'
    );
    CREATE TABLE IF NOT EXISTS indexed (
        id            INTEGER PRIMARY KEY CHECK (id = 0),
        epoch         INTEGER NOT NULL, -- the database's `search_meta.epoch`
        through       INTEGER NOT NULL, -- `search_queue.pos` indexed through
        rebuild_after INTEGER           -- while rebuilding: the last message id indexed
    );
"#;

/// What the index thread shares with the writer and the searches.
#[derive(Debug)]
pub(super) struct IndexSignal {
    wake: Mutex<Wake>,
    cond: Condvar,
    /// Set by the writer after a commit, cleared by the thread: saves a lock per commit
    /// while the thread has not looked yet.
    poked: AtomicBool,
    /// The queue position indexed through, durably (0 until the index is built).
    through: watch::Sender<i64>,
    /// The position through which the writer has trimmed the queue.
    trimmed: AtomicI64,
    /// Queue rows not indexed yet, as of the last pass.
    behind: AtomicU64,
    failures: AtomicU64,
    rebuilding: AtomicBool,
}

#[derive(Debug, Default)]
struct Wake {
    work: bool,
    urgent: bool,
    stop: bool,
}

impl IndexSignal {
    fn new() -> Self {
        Self {
            // The first pass runs at once: a rebuild, or what the last run left queued.
            wake: Mutex::new(Wake {
                work: true,
                ..Wake::default()
            }),
            cond: Condvar::new(),
            poked: AtomicBool::new(false),
            through: watch::Sender::new(0),
            trimmed: AtomicI64::new(0),
            behind: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            rebuilding: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Wake> {
        self.wake.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer committed something that may have queued messages.
    pub fn poke(&self) {
        if !self.poked.swap(true, Ordering::AcqRel) {
            self.lock().work = true;
            self.cond.notify_one();
        }
    }

    /// A search waits: index now, without gathering.
    fn hurry(&self) {
        let mut w = self.lock();
        w.work = true;
        w.urgent = true;
        self.cond.notify_one();
    }

    /// The position through which the writer may delete the queue's rows, when enough of
    /// them have piled up since it last did (at most [`TRIM_MOST`] rows at a time).
    pub fn trim_due(&self) -> Option<i64> {
        let through = *self.through.borrow();
        let trimmed = self.trimmed.load(Ordering::Relaxed);
        (through - trimmed >= TRIM_EVERY).then_some(through.min(trimmed + TRIM_MOST))
    }

    /// The writer's trim through `through` committed.
    pub fn trimmed(&self, through: i64) {
        self.trimmed.store(through, Ordering::Relaxed);
    }

    fn publish(&self, through: i64) {
        self.through.send_replace(through);
    }
}

/// Deletes the queue's rows through `through`, keeping the last row whatever it is: the
/// next position is the largest one plus one, and must never go back.
pub(super) fn trim(tx: &Connection, through: i64) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "DELETE FROM search_queue WHERE pos <= ?1 AND pos < (SELECT max(pos) FROM search_queue)",
    )?
    .execute([through])
}

/// The last position of the queue (0 when it never had a row).
pub(super) fn queue_end(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT coalesce(max(pos), 0) FROM search_queue")?
        .query_row([], |r| r.get(0))
}

/// The index thread and its signal.
pub(super) struct SearchIndex {
    signal: Arc<IndexSignal>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl SearchIndex {
    /// [`SearchIndex::start`]; an index that cannot be opened (a damaged file) is derived
    /// data, so it is removed and started anew, to be rebuilt from the messages.
    pub fn open(db: &Path) -> anyhow::Result<Self> {
        match Self::start(db) {
            Ok(index) => Ok(index),
            Err(e) => {
                let path = index_path(db);
                tracing::warn!(error = %e, file = %path.display(), "the search index cannot be opened; it is removed and rebuilt from the messages");
                for suffix in ["", "-wal", "-shm"] {
                    let file = PathBuf::from(format!("{}{suffix}", path.display()));
                    match std::fs::remove_file(&file) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(e).with_context(|| format!("remove {}", file.display()));
                        }
                    }
                }
                Self::start(db)
            }
        }
    }

    /// Opens (creating it if needed) the index of the database at `db`, which must be
    /// migrated, and starts its thread. A rebuild, if one is needed, runs on the thread.
    pub fn start(db: &Path) -> anyhow::Result<Self> {
        let path = index_path(db);
        let index = Connection::open(&path).with_context(|| format!("open {}", path.display()))?;
        super::schema::configure(&index, 16 * 1024)?;
        let mode: String = index.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        anyhow::ensure!(
            mode.eq_ignore_ascii_case("wal"),
            "{}: no WAL",
            path.display()
        );
        index.execute_batch(INDEX_SCHEMA)?;
        // The database, read (never written) in the index's transactions.
        index.execute(
            "ATTACH DATABASE ?1 AS m",
            [db.to_str().context("the database's path is not UTF-8")?],
        )?;
        let signal = Arc::new(IndexSignal::new());
        let mut worker = Worker {
            index,
            signal: Arc::clone(&signal),
        };
        worker.prepare()?;
        let thread = std::thread::Builder::new()
            .name("natter-index".into())
            .spawn(move || worker.run())
            .context("spawn the index thread")?;
        Ok(Self {
            signal,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn signal(&self) -> Arc<IndexSignal> {
        Arc::clone(&self.signal)
    }

    /// Waits until the index has passed queue position `end`, for at most `within`;
    /// whether it has.
    /// While a rebuild runs, at once: the index stays behind until it is done.
    pub async fn caught_up(&self, end: i64, within: Duration) -> bool {
        if *self.signal.through.borrow() >= end {
            return true;
        }
        if self.signal.rebuilding.load(Ordering::Relaxed) {
            return false;
        }
        let mut through = self.signal.through.subscribe();
        self.signal.hurry();
        tokio::time::timeout(within, through.wait_for(|t| *t >= end))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stops the thread after its current transaction and waits for it.
    pub fn stop(&self) {
        self.signal.lock().stop = true;
        self.signal.cond.notify_one();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    pub fn render(&self, out: &mut String) {
        let s = &self.signal;
        render_one(
            out,
            "natter_search_index_behind",
            "gauge",
            "Message changes queued for the search index and not indexed yet (as of its last pass).",
            s.behind.load(Ordering::Relaxed),
        );
        render_one(
            out,
            "natter_search_index_rebuilding",
            "gauge",
            "1 while the search index is being rebuilt from the messages.",
            u8::from(s.rebuilding.load(Ordering::Relaxed)),
        );
        render_one(
            out,
            "natter_search_index_failures_total",
            "counter",
            "Search index passes that failed (retried a second later).",
            s.failures.load(Ordering::Relaxed),
        );
    }
}

impl Drop for SearchIndex {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The thread's connection: the index, with the database attached as `m`.
struct Worker {
    index: Connection,
    signal: Arc<IndexSignal>,
}

/// The index's own record of what it holds.
struct Indexed {
    epoch: i64,
    through: i64,
    rebuild_after: Option<i64>,
}

impl Worker {
    /// Reads where the index stands; starts a rebuild (empties it, to be refilled by the
    /// thread) when it was built for another database or never built.
    fn prepare(&mut self) -> anyhow::Result<()> {
        let epoch: i64 = self
            .index
            .query_row("SELECT epoch FROM m.search_meta", [], |r| r.get(0))
            .context("read the database's search epoch")?;
        let state = self.state()?;
        let (low, end): (Option<i64>, i64) = self.index.query_row(
            "SELECT min(pos), coalesce(max(pos), 0) FROM m.search_queue",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        // The writer trims only what the index has passed and keeps the last row, so an
        // index of this database has passed no row beyond the queue's end, and every row
        // it has not passed is still queued. Anything else is another moment's index (a
        // data directory copied file by file, an older file put back): rebuilt.
        let fits = |through: i64| through <= end && low.is_none_or(|low| low <= through + 1);
        self.signal
            .trimmed
            .store(low.map_or(end, |low| low - 1), Ordering::Relaxed);
        match state {
            Some(s) if s.epoch == epoch && fits(s.through) => {
                self.signal
                    .rebuilding
                    .store(s.rebuild_after.is_some(), Ordering::Relaxed);
                if s.rebuild_after.is_none() {
                    self.signal.publish(s.through);
                }
            }
            other => {
                let why = match other {
                    None => "its file is new",
                    Some(s) if s.epoch != epoch => "it was built for another copy of the database",
                    Some(_) => "it does not match the database's queue",
                };
                // Everything queued through `end` is in the messages the rebuild reads.
                let tx = self.index.transaction()?;
                tx.execute(
                    "INSERT INTO messages_fts (messages_fts) VALUES ('delete-all')",
                    [],
                )?;
                tx.execute(
                    "INSERT OR REPLACE INTO indexed VALUES (0, ?1, ?2, 0)",
                    params![epoch, end],
                )?;
                tx.commit()?;
                self.signal.rebuilding.store(true, Ordering::Relaxed);
                tracing::info!(reason = why, "building the search index from the messages");
            }
        }
        Ok(())
    }

    fn state(&self) -> rusqlite::Result<Option<Indexed>> {
        self.index
            .query_row(
                "SELECT epoch, through, rebuild_after FROM indexed",
                [],
                |r| {
                    Ok(Indexed {
                        epoch: r.get(0)?,
                        through: r.get(1)?,
                        rebuild_after: r.get(2)?,
                    })
                },
            )
            .optional()
    }

    fn queue_end(&self) -> rusqlite::Result<i64> {
        // `search_queue` is only in the attached database, so the name finds it there.
        queue_end(&self.index)
    }

    fn run(mut self) {
        let signal = Arc::clone(&self.signal);
        loop {
            {
                let mut w = signal.lock();
                while !w.work && !w.stop {
                    w = signal.cond.wait(w).unwrap_or_else(|p| p.into_inner());
                }
                if w.stop {
                    break;
                }
                w.work = false;
                w.urgent = false;
            }
            signal.poked.store(false, Ordering::Release);
            // A pass that panics (a bug) counts as a failed one: its transaction was
            // rolled back as it unwound, and the thread goes on, so searches do not wait
            // on a thread that is gone.
            let passed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.pass()))
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the pass panicked")));
            let pause = match passed {
                Ok(()) => GATHER,
                Err(e) => {
                    signal.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "indexing messages for search failed; tried again in a second");
                    signal.lock().work = true;
                    RETRY_AFTER
                }
            };
            // Let changes gather (a waiting search or a stop cuts it short).
            let w = signal.lock();
            let (w, _) = signal
                .cond
                .wait_timeout_while(w, pause, |w| !w.urgent && !w.stop)
                .unwrap_or_else(|p| p.into_inner());
            if w.stop {
                break;
            }
        }
        // A clean stop leaves the index in its file alone, its log emptied.
        if let Err(e) = self
            .index
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::debug!(error = %e, "checkpointing the search index at stop");
        }
        tracing::debug!("search index thread stopped");
    }

    /// Indexes what is queued (after a rebuild step, while one is on), a transaction per
    /// [`BATCH`] rows, until the queue is passed or a stop is asked.
    fn pass(&mut self) -> anyhow::Result<()> {
        while self.signal.rebuilding.load(Ordering::Relaxed) {
            if self.stopping() {
                return Ok(());
            }
            self.rebuild_step()?;
        }
        loop {
            let (rows, through) = self.index_batch()?;
            if rows < BATCH || self.stopping() {
                let end = self.queue_end()?;
                self.signal
                    .behind
                    .store((end - through).max(0) as u64, Ordering::Relaxed);
                return Ok(());
            }
        }
    }

    fn stopping(&self) -> bool {
        self.signal.lock().stop
    }

    /// Indexes the next [`BATCH`] live messages by id; ends the rebuild when none is left.
    /// A plain insert: the rebuild emptied the index, and goes up by id.
    fn rebuild_step(&mut self) -> anyhow::Result<()> {
        let state = self.state()?.context("the index lost its state row")?;
        let after = state.rebuild_after.unwrap_or(0);
        let tx = self.index.transaction()?;
        let last: Option<i64> = tx.query_row(
            "SELECT max(id) FROM (SELECT id FROM m.messages WHERE id > ?1 AND deleted = 0
             ORDER BY id LIMIT ?2)",
            params![after, BATCH as i64],
            |r| r.get(0),
        )?;
        if let Some(last) = last {
            tx.execute(
                "INSERT INTO messages_fts (rowid, text, ch)
                 SELECT id, text, channel_id FROM m.messages
                 WHERE id > ?1 AND id <= ?2 AND deleted = 0",
                params![after, last],
            )?;
        }
        tx.execute("UPDATE indexed SET rebuild_after = ?1", [last])?;
        tx.commit()?;
        if last.is_none() {
            self.signal.rebuilding.store(false, Ordering::Relaxed);
            self.signal.publish(state.through);
            tracing::info!("the search index is built");
        }
        Ok(())
    }

    /// Indexes the next [`BATCH`] queue rows; the rows taken and the position now indexed
    /// through. Three statements for the lot, reading the database (attached as `m`) in
    /// one snapshot: each message as it is now, removed from the index if it was deleted
    /// or is gone, else put in: a message the index may hold with a replace (a plain
    /// insert of one it holds is not refused, and would leave its old words behind), one
    /// it cannot hold (newer than any it does) with a plain insert, once however often it
    /// is queued. A message the index may hold queued twice is put in twice, the same
    /// text both times.
    fn index_batch(&mut self) -> anyhow::Result<(usize, i64)> {
        let through = *self.signal.through.borrow();
        let tx = self.index.transaction()?;
        let (last, rows): (Option<i64>, i64) = tx.query_row(
            "SELECT max(pos), count(*) FROM (SELECT pos FROM m.search_queue WHERE pos > ?1
             ORDER BY pos LIMIT ?2)",
            params![through, BATCH as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let Some(last) = last else {
            return Ok((0, through));
        };
        // Ids past the newest the index holds are messages it has never seen (ids grow
        // with time): those go in with a plain insert, once each, and need no delete. A
        // replace pays for a lookup and a delete of the old words (a fifth of this
        // thread's time when every row was replaced); only the others are replaced.
        // `messages_fts_docsize` is FTS5's table of one row per document held
        // (`contentless_delete` keeps it), so its largest id is the index's.
        let newest: i64 = tx
            .prepare_cached("SELECT coalesce(max(id), 0) FROM messages_fts_docsize")?
            .query_row([], |r| r.get(0))?;
        tx.prepare_cached(
            "DELETE FROM messages_fts WHERE rowid IN (
                 SELECT q.message_id FROM m.search_queue q
                 LEFT JOIN m.messages x ON x.id = q.message_id
                 WHERE q.pos > ?1 AND q.pos <= ?2 AND q.message_id <= ?3
                   AND (x.id IS NULL OR x.deleted != 0))",
        )?
        .execute(params![through, last, newest])?;
        tx.prepare_cached(
            "INSERT OR REPLACE INTO messages_fts (rowid, text, ch)
             SELECT x.id, x.text, x.channel_id FROM m.search_queue q
             JOIN m.messages x ON x.id = q.message_id
             WHERE q.pos > ?1 AND q.pos <= ?2 AND q.message_id <= ?3 AND x.deleted = 0",
        )?
        .execute(params![through, last, newest])?;
        tx.prepare_cached(
            "INSERT INTO messages_fts (rowid, text, ch)
             SELECT x.id, x.text, x.channel_id FROM m.messages x
             WHERE x.id IN (SELECT q.message_id FROM m.search_queue q
                            WHERE q.pos > ?1 AND q.pos <= ?2 AND q.message_id > ?3)
               AND x.deleted = 0",
        )?
        .execute(params![through, last, newest])?;
        tx.execute("UPDATE indexed SET through = ?1", [last])?;
        tx.commit()?;
        self.signal.publish(last);
        Ok((rows as usize, last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker over an in-memory index, the database's two tables it reads attached as
    /// `m` (in memory too), and its index state at the start.
    fn worker() -> Worker {
        let index = Connection::open_in_memory().unwrap();
        index.execute_batch(INDEX_SCHEMA).unwrap();
        index
            .execute_batch(
                "ATTACH DATABASE ':memory:' AS m;
                 CREATE TABLE m.messages (id INTEGER PRIMARY KEY, channel_id INTEGER NOT NULL,
                     text TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
                 CREATE TABLE m.search_queue (pos INTEGER PRIMARY KEY, message_id INTEGER NOT NULL);
                 INSERT INTO indexed VALUES (0, 1, 0, NULL);",
            )
            .unwrap();
        Worker {
            index,
            signal: Arc::new(IndexSignal::new()),
        }
    }

    fn matching(w: &Worker, query: &str) -> Vec<i64> {
        w.index
            .prepare("SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?1 ORDER BY rowid")
            .unwrap()
            .query_map([query], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    /// The documents FTS5 counts as inserted and not deleted: the first varint of its
    /// averages record (`messages_fts_data` row 1), one byte while under 128. (Its
    /// `_docsize` table keeps one row per rowid, however often one was inserted.)
    fn documents(w: &Worker) -> u8 {
        let record: Vec<u8> = w
            .index
            .query_row(
                "SELECT block FROM messages_fts_data WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(record[0] < 0x80, "a count under 128");
        record[0]
    }

    /// Queues `ids` (in order) after what is queued.
    fn queue(w: &Worker, ids: &[i64]) {
        for id in ids {
            w.index
                .execute("INSERT INTO m.search_queue (message_id) VALUES (?1)", [id])
                .unwrap();
        }
    }

    /// New messages go in with a plain insert and the others with a replace: a message
    /// queued twice before it was indexed goes in once, an edit takes the old words'
    /// place, a delete takes them out, and a message older than the newest indexed that
    /// the index never held still goes in.
    #[test]
    fn new_messages_go_in_once_and_known_ones_are_replaced() {
        let mut w = worker();
        let put = |w: &Worker, id: i64, text: &str, deleted: bool| {
            w.index
                .execute(
                    "INSERT OR REPLACE INTO m.messages VALUES (?1, 1, ?2, ?3)",
                    params![id, text, deleted],
                )
                .unwrap();
        };
        put(&w, 10, "alpha", false);
        put(&w, 20, "beta", false);
        put(&w, 30, "gone", true);
        queue(&w, &[10, 20, 10, 30]);
        assert_eq!(w.index_batch().unwrap(), (4, 4));
        assert_eq!(matching(&w, "alpha"), [10]);
        assert_eq!(matching(&w, "beta"), [20]);
        assert_eq!(matching(&w, "gone"), Vec::<i64>::new());
        assert_eq!(
            documents(&w),
            2,
            "one document per message, however often queued"
        );

        put(&w, 20, "gamma", false);
        put(&w, 10, "alpha", true);
        put(&w, 15, "late", false);
        put(&w, 40, "delta", false);
        queue(&w, &[20, 10, 15, 40]);
        assert_eq!(w.index_batch().unwrap(), (4, 8));
        assert_eq!(
            matching(&w, "beta"),
            Vec::<i64>::new(),
            "the edit's old words"
        );
        assert_eq!(matching(&w, "gamma"), [20]);
        assert_eq!(
            matching(&w, "alpha"),
            Vec::<i64>::new(),
            "the deleted message"
        );
        assert_eq!(matching(&w, "late OR delta"), [15, 40]);
        assert_eq!(w.index_batch().unwrap(), (0, 8), "nothing left");
    }

    /// Why the thread replaces the messages the index may hold: a plain insert of one it
    /// holds is not refused, and leaves the old words found; a replace takes their place.
    #[test]
    fn a_replace_takes_the_place_of_a_message_where_a_second_insert_would_not() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(INDEX_SCHEMA).unwrap();
        let matching = |query: &str| -> Vec<i64> {
            conn.prepare(
                "SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?1 ORDER BY rowid",
            )
            .unwrap()
            .query_map([query], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
        };
        let insert = "INSERT INTO messages_fts (rowid, text, ch) VALUES (?1, ?2, ?3)";
        let replace = "INSERT OR REPLACE INTO messages_fts (rowid, text, ch) VALUES (?1, ?2, ?3)";
        conn.execute(insert, params![7, "old words", 1]).unwrap();
        conn.execute(insert, params![7, "new words", 1]).unwrap();
        assert_eq!(matching("old"), [7], "a second insert leaves the old words");
        conn.execute(insert, params![8, "old words", 1]).unwrap();
        conn.execute(replace, params![8, "new words", 1]).unwrap();
        conn.execute(replace, params![9, "fresh", 1]).unwrap();
        assert_eq!(matching("old OR new OR fresh"), [7, 8, 9]);
        assert_eq!(
            matching("old"),
            [7],
            "the replaced message lost its old words"
        );
    }
}
