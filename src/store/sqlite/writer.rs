//! The single writer: one thread owns the write connection, takes every queued write,
//! applies them all in one transaction (group commit, `synchronous=FULL`), and only then
//! answers each caller. The queue is bounded; a full queue is refused, never grown.
//!
//! Failure handling: an op that fails a check writes nothing and answers its own error
//! without touching the batch. An unexpected SQLite error rolls the whole batch back and
//! replays its ops one transaction each, so one bad op cannot fail its neighbours. A failed
//! commit answers every op of the batch with an error: nothing unacknowledged is claimed
//! and nothing acknowledged is lost.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::hot::Hot;
use super::index::{self, IndexSignal};
use super::tail::{IDLE_FOLD_AFTER, Quiet, QuietFoldError};
use super::write::{self, Done, Op};
use crate::id::Snowflake;
use crate::metrics::{BATCH_BUCKETS, Histogram, LATENCY_BUCKETS, render_header, render_one};
use crate::model::{Event, EventBody};
use crate::store::{OnCommit, Result, Rules, StoreError};

/// Most ops one transaction takes; bounds the time a caller waits behind a batch.
const MAX_BATCH: usize = 4096;
/// A writer that has found writes waiting (or committed a large batch) after every commit
/// for this long gets no turn between batches to fold old rows, so its batches fold them.
const BUSY_AFTER: std::time::Duration = std::time::Duration::from_millis(100);
/// Most ops a batch may have had for the writer to fold old rows after it, between
/// batches, when no write waits.
const QUIET_BATCH: usize = 64;

/// Why a batch transaction was not committed.
#[derive(Debug, thiserror::Error)]
enum BatchFailed {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// A bug guard: an op reported a refusal after it had written.
    #[error("an op was refused after it wrote: {0}")]
    RefusedAfterWrite(StoreError),
}

impl BatchFailed {
    fn is_disk_full(&self) -> bool {
        matches!(self, Self::Sqlite(e) if disk_full(e))
    }
}

/// SQLite found the disk full (a quota, a file-size limit, or no space).
fn disk_full(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull)
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Done>>,
}

/// What the queue carries: writes, and at the end the request to stop.
enum Msg {
    Job(Job),
    /// Commit what came before and stop; answered once the thread is about to end.
    Stop(oneshot::Sender<()>),
}

/// The writer's counters, for `/metrics`.
#[derive(Debug)]
pub struct WriteStats {
    /// The writer's queue, read for its depth and bound when rendered (weak, so it never
    /// keeps the writer running); set when the writer starts.
    queue: OnceLock<mpsc::WeakSender<Msg>>,
    /// Writes refused because the queue was full (503 `overloaded`).
    overloaded: AtomicU64,
    /// Ops per commit.
    batch_ops: Histogram,
    /// Time from `BEGIN` to `COMMIT` returning, per commit.
    commit_seconds: Histogram,
    /// Transactions that could not commit (their writers got an error).
    failed_commits: AtomicU64,
    /// New messages committed (an idempotent resend is not new).
    messages_accepted: AtomicU64,
    /// Events committed to channel logs.
    events_committed: AtomicU64,
    /// Time to fold the commit log into the channel tables, per fold of its own.
    fold_seconds: Histogram,
    /// Rows folded from the commit log into the channel tables.
    folded_rows: AtomicU64,
    /// The data directory's disk, as the checkpoint thread last read it.
    pub disk: DiskState,
    /// WAL frames the background checkpoint last left uncopied (its log minus what it
    /// copied back): how much a checkpoint by the writer would have to copy.
    pub wal_backlog_frames: std::sync::atomic::AtomicI64,
}

/// Whether writes are refused for lack of disk space, kept by the checkpoint thread (and
/// set at once by a commit that found the disk full).
#[derive(Debug, Default)]
pub struct DiskState {
    refused: std::sync::atomic::AtomicBool,
    free_bytes: AtomicU64,
    /// After a commit found the disk full (a quota, a file-size limit: what the free
    /// space does not show), writes stay refused until this time (Unix ms) at least.
    full_until: AtomicU64,
}

impl DiskState {
    /// Writes are refused (507) while the free space is below the reserve.
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_bytes.load(Ordering::Relaxed)
    }

    /// Records a reading; returns whether writes are refused now and whether that changed.
    pub(super) fn update(&self, free: u64, reserve: u64) -> (bool, bool) {
        self.free_bytes.store(free, Ordering::Relaxed);
        let now = crate::clock::now_ms().max(0) as u64;
        let refused = free < reserve || now < self.full_until.load(Ordering::Relaxed);
        let was = self.refused.swap(refused, Ordering::Relaxed);
        (refused, was != refused)
    }

    /// A commit found the disk full: refuse writes now and for the next 30 s at least.
    fn set_full(&self) {
        let until = crate::clock::now_ms().max(0) as u64 + 30_000;
        self.full_until.store(until, Ordering::Relaxed);
        self.refused.store(true, Ordering::Relaxed);
    }
}

impl Default for WriteStats {
    fn default() -> Self {
        Self {
            queue: OnceLock::new(),
            overloaded: AtomicU64::new(0),
            batch_ops: Histogram::new(BATCH_BUCKETS),
            commit_seconds: Histogram::new(LATENCY_BUCKETS),
            failed_commits: AtomicU64::new(0),
            messages_accepted: AtomicU64::new(0),
            events_committed: AtomicU64::new(0),
            fold_seconds: Histogram::new(LATENCY_BUCKETS),
            folded_rows: AtomicU64::new(0),
            disk: DiskState::default(),
            wal_backlog_frames: std::sync::atomic::AtomicI64::new(0),
        }
    }
}

impl WriteStats {
    /// Writes waiting for the writer right now.
    pub fn queued(&self) -> u64 {
        self.bounds().map_or(0, |(free, max)| (max - free) as u64)
    }

    /// The queue's (free slots, bound), while the writer runs.
    fn bounds(&self) -> Option<(usize, usize)> {
        let tx = self.queue.get()?.upgrade()?;
        Some((tx.capacity(), tx.max_capacity()))
    }

    pub fn render(&self, out: &mut String) {
        let count = |a: &AtomicU64| a.load(Ordering::Relaxed);
        render_one(
            out,
            "natter_write_queue_depth",
            "gauge",
            "Writes queued for the group-commit writer.",
            self.queued(),
        );
        render_one(
            out,
            "natter_write_queue_capacity",
            "gauge",
            "Writes the queue holds before new ones are refused as overloaded.",
            self.bounds().map_or(0, |(_, max)| max),
        );
        render_one(
            out,
            "natter_write_overloaded_total",
            "counter",
            "Writes refused because the write queue was full (503 overloaded).",
            count(&self.overloaded),
        );
        render_header(
            out,
            "natter_commit_batch_ops",
            "histogram",
            "Writes committed together in one transaction (group commit).",
        );
        self.batch_ops.render(out, "natter_commit_batch_ops", "");
        render_header(
            out,
            "natter_commit_duration_seconds",
            "histogram",
            "Time to apply and commit one group-commit transaction.",
        );
        self.commit_seconds
            .render(out, "natter_commit_duration_seconds", "");
        render_one(
            out,
            "natter_commit_failures_total",
            "counter",
            "Transactions that failed to commit; their writers were answered with an error.",
            count(&self.failed_commits),
        );
        render_one(
            out,
            "natter_messages_accepted_total",
            "counter",
            "New messages committed (idempotent resends excluded).",
            count(&self.messages_accepted),
        );
        render_one(
            out,
            "natter_events_committed_total",
            "counter",
            "Events committed to channel logs.",
            count(&self.events_committed),
        );
        render_header(
            out,
            "natter_commit_log_fold_seconds",
            "histogram",
            "Time to fold the commit log into the per-channel tables, per fold.",
        );
        self.fold_seconds
            .render(out, "natter_commit_log_fold_seconds", "");
        render_one(
            out,
            "natter_commit_log_folded_total",
            "counter",
            "Posts folded from the commit log into the per-channel tables.",
            count(&self.folded_rows),
        );
        render_one(
            out,
            "natter_disk_writes_refused",
            "gauge",
            "1 while writes are refused (507) because the data directory's free space is below --disk-reserve-mib.",
            u8::from(self.disk.refused()),
        );
    }
}

/// The async side of the writer: submits ops and awaits their commit.
#[derive(Clone)]
pub(super) struct Writer {
    tx: mpsc::Sender<Msg>,
    stats: Arc<WriteStats>,
}

impl Writer {
    /// Starts the writer thread over `parts.conn`, with a queue of `capacity`. The thread
    /// ends when every [`Writer`] clone is dropped and the queue has drained.
    pub fn start(parts: WriterParts, capacity: usize) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let stats = parts.stats;
        let _ = stats.queue.set(tx.downgrade());
        // A WAL frame: a page and its 24-byte header.
        let page: i64 = parts
            .conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .unwrap_or(4096);
        let state = State {
            conn: parts.conn,
            ids: parts.ids,
            hot: parts.hot,
            rules: parts.rules,
            on_commit: parts.on_commit,
            stats: Arc::clone(&stats),
            busy_since: None,
            index: parts.index,
            wal: WalWatch {
                path: parts.wal.0,
                limit: parts.wal.1,
                frame_bytes: page + 24,
                checked: Instant::now(),
            },
        };
        let handle = std::thread::Builder::new()
            .name("natter-writer".into())
            .spawn(move || run(state, rx))
            .expect("spawn the writer thread");
        (Self { tx, stats }, handle)
    }

    /// Queues `op` and waits until it is committed (or refused).
    pub async fn submit(&self, op: Op) -> Result<Done> {
        // Below the disk reserve only what frees space (ending sessions) is taken.
        if self.stats.disk.refused() && !op.frees_space() {
            return Err(StoreError::DiskFull);
        }
        let (reply, answer) = oneshot::channel();
        if let Err(e) = self.tx.try_send(Msg::Job(Job { op, reply })) {
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => {
                    self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
                    StoreError::Overloaded
                }
                mpsc::error::TrySendError::Closed(_) => StoreError::Unavailable,
            });
        }
        answer.await.map_err(|_| StoreError::Unavailable)?
    }

    /// Whether the writer thread has ended (stopped, or ended by an error it could not
    /// write past): every write is refused as unavailable from then on.
    pub fn ended(&self) -> bool {
        self.tx.is_closed()
    }

    /// Asks the writer to commit everything queued before this and stop; resolves when
    /// it has. Writes queued after it are dropped unanswered ([`StoreError::Unavailable`]).
    pub async fn stop(&self) {
        let (done, stopped) = oneshot::channel();
        if self.tx.send(Msg::Stop(done)).await.is_ok() {
            let _ = stopped.await;
        }
    }
}

/// What a writer is started with.
pub(super) struct WriterParts {
    pub conn: Connection,
    pub ids: Snowflake,
    pub on_commit: Option<OnCommit>,
    pub stats: Arc<WriteStats>,
    pub rules: Rules,
    pub hot: Hot,
    pub index: Arc<IndexSignal>,
    /// The WAL file, and the size past which the writer checkpoints it itself.
    pub wal: (std::path::PathBuf, u64),
}

/// What the writer thread owns besides its queue.
struct State {
    conn: Connection,
    ids: Snowflake,
    hot: Hot,
    rules: Rules,
    on_commit: Option<OnCommit>,
    stats: Arc<WriteStats>,
    /// Since when the writer has found, after every commit, its queue non-empty or the
    /// batch large (`None`: it found it empty after a batch of at most [`QUIET_BATCH`]).
    busy_since: Option<Instant>,
    /// The search index's thread: told after each commit, and whose indexed position
    /// bounds the queue rows a batch may delete.
    index: Arc<IndexSignal>,
    wal: WalWatch,
}

/// Keeps the WAL from growing without end under sustained writes. The background
/// checkpoints are PASSIVE and run beside the writer, so while commits keep coming one
/// never finds every frame copied back, and SQLite restarts the WAL from its start only
/// at a write that does: at 2,000 msgs/s the file grew ~20 MB/s for as long as the load
/// lasted, and each commit's `fdatasync` also wrote the inode for the new size (~11 % of
/// the writer's time). Past the size limit the writer checkpoints itself between two
/// batches, when no other write can land: PASSIVE (it waits for no one), so its next
/// commit restarts the WAL unless a reader still uses it (tried again at the next check).
struct WalWatch {
    path: std::path::PathBuf,
    limit: u64,
    /// A WAL frame's bytes (the database's page and a header).
    frame_bytes: i64,
    checked: Instant,
}

/// How often the writer looks at the WAL's size (a `stat`).
const WAL_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

impl WalWatch {
    /// After a batch: at most every [`WAL_CHECK`].
    fn check(&mut self, conn: &Connection, stats: &WriteStats) {
        if self.checked.elapsed() >= WAL_CHECK {
            self.check_now(conn, stats);
        }
    }

    /// After each chunk of a quiet fold, which may fold a whole burst's rows (megabytes
    /// of pages) in less than [`WAL_CHECK`]: a `stat` per chunk of up to a few thousand
    /// rows.
    fn check_now(&mut self, conn: &Connection, stats: &WriteStats) {
        self.checked = Instant::now();
        let size = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        if size <= self.limit {
            return;
        }
        // A backlog (a long reader, e.g. a backup, held the checkpoints back) is the
        // background thread's to copy, beside the writer: the writer takes only the last
        // few frames, or it would stop committing for as long as the copy takes.
        let backlog = stats.wal_backlog_frames.load(Ordering::Relaxed) * self.frame_bytes;
        if backlog > i64::try_from(self.limit / 8).unwrap_or(i64::MAX) {
            return;
        }
        match super::checkpoint::passive(conn) {
            // Another checkpoint is running (the background one): the next check retries.
            Ok((true, ..)) => {
                tracing::debug!(size, "WAL over its limit: a checkpoint is already running");
            }
            Ok((_, log, copied)) => {
                tracing::debug!(
                    size,
                    log,
                    copied,
                    "WAL over its limit: checkpointed by the writer"
                );
            }
            Err(e) => tracing::debug!(error = %e, "WAL over its limit: checkpoint deferred"),
        }
    }
}

impl State {
    /// Hands a committed batch's events on, before any of its writers is answered: a
    /// client that got an ack can rely on every reader of the events having them.
    fn committed(&self, events: Vec<Event>) {
        let messages = events
            .iter()
            .filter(|e| matches!(e.body, EventBody::MessageCreated(_)))
            .count();
        self.stats
            .messages_accepted
            .fetch_add(messages as u64, Ordering::Relaxed);
        self.stats
            .events_committed
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        if let Some(f) = &self.on_commit
            && !events.is_empty()
        {
            f(events);
        }
    }
}

fn run(mut state: State, mut rx: mpsc::Receiver<Msg>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut stop = None;
    let mut idle = Idle::new();
    loop {
        let first = match idle.next(&mut state, &mut rx) {
            Ok(Some(first)) => first,
            Ok(None) => break,
            Err(e) => {
                tracing::error!(error = %e, "the writer stops: its connection's synchronous setting could not be restored");
                return;
            }
        };
        match first {
            Msg::Job(job) => batch.push(job),
            Msg::Stop(done) => stop = Some(done),
        }
        while stop.is_none() && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Job(job)) => batch.push(job),
                Ok(Msg::Stop(done)) => stop = Some(done),
                Err(_) => break,
            }
        }
        let ops = batch.len();
        if !batch.is_empty() {
            commit_batch(&mut state, &mut batch);
            state.index.poke();
            state.wal.check(&state.conn, &state.stats);
        }
        // Folded when due, and all at a stop, so a clean restart starts with an empty log.
        if state.hot.log.due() || (stop.is_some() && !state.hot.log.is_empty()) {
            fold(&mut state);
        }
        // A large batch means writes are coming fast even if none waits this instant:
        // then the batches fold (large chunks, fewer pages per row).
        if stop.is_none() && rx.is_empty() && ops <= QUIET_BATCH {
            state.busy_since = None;
            if let Err(e) = fold_quietly(&mut state, &rx, Quiet::Old) {
                // Nothing more is committed on a connection that would not sync: writes
                // are refused as unavailable from here on, never acknowledged unsynced.
                tracing::error!(error = %e, "the writer stops: its connection's synchronous setting could not be restored");
                return;
            }
        } else {
            state.busy_since.get_or_insert_with(Instant::now);
        }
        if let Some(done) = stop.take() {
            // Later writes stay queued until the receiver drops: they are never answered
            // as committed.
            rx.close();
            drop(rx);
            tracing::debug!("writer stopped on request");
            let _ = done.send(());
            return;
        }
    }
    tracing::debug!("writer stopped: queue closed and drained");
}

fn commit_batch(state: &mut State, batch: &mut Vec<Job>) {
    match apply_all(state, batch) {
        Ok((results, events)) => {
            state.committed(events);
            for (job, result) in batch.drain(..).zip(results) {
                let _ = job.reply.send(result);
            }
        }
        Err(e) if e.is_disk_full() => {
            state.stats.disk.set_full();
            tracing::error!(error = %e, ops = batch.len(), "commit batch: the disk is full; writes are refused until space is freed");
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(StoreError::DiskFull));
            }
        }
        Err(e) if batch.len() > 1 => {
            tracing::warn!(error = %e, ops = batch.len(), "commit batch failed; replaying its ops one by one");
            for job in batch.drain(..) {
                let mut single = vec![job];
                let result = match apply_all(state, &single) {
                    Ok((mut results, events)) => {
                        state.committed(events);
                        results.remove(0)
                    }
                    Err(e) if e.is_disk_full() => {
                        state.stats.disk.set_full();
                        tracing::error!(error = %e, "commit write: the disk is full");
                        Err(StoreError::DiskFull)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "commit write failed");
                        Err(StoreError::internal("commit write", e))
                    }
                };
                let job = single.pop().expect("one job");
                let _ = job.reply.send(result);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "commit write failed");
            for job in batch.drain(..) {
                let _ = job
                    .reply
                    .send(Err(StoreError::internal("commit write", e.to_string())));
            }
        }
    }
}

/// While no write waits, folds the log's old rows (or, idle, all of them: [`Quiet`]) a
/// chunk at a time in transactions that do not sync
/// ([`super::tail::Unfolded::fold_quiet`]), so the batches' commits do not carry them.
/// Stops at the first write that comes after a chunk (a chunk takes the oldest batch
/// whole, so it may be a few thousand rows); looks at the WAL's size after each.
/// `Err` only when the connection could not be set back to `synchronous=FULL`; a fold
/// that fails otherwise, or none while the disk is short, is left for later
/// (`Ok(false)`).
fn fold_quietly(
    state: &mut State,
    rx: &mpsc::Receiver<Msg>,
    which: Quiet,
) -> Result<bool, QuietFoldError> {
    if state.stats.disk.refused() {
        return Ok(false);
    }
    while rx.is_empty() && state.hot.log.quiet_due(which) {
        let started = Instant::now();
        match state.hot.log.fold_quiet(&mut state.conn, which) {
            Ok(0) => break,
            Ok(rows) => {
                state.index.poke();
                state.stats.fold_seconds.observe_duration(started.elapsed());
                state
                    .stats
                    .folded_rows
                    .fetch_add(rows as u64, Ordering::Relaxed);
                state.wal.check_now(&state.conn, &state.stats);
            }
            Err(QuietFoldError::Fold(e)) => {
                if disk_full(&e) {
                    state.stats.disk.set_full();
                }
                tracing::warn!(error = %e, "folding the commit log's old rows failed; they stay in the log");
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// How the writer waits for its next write. While the commit log holds rows it waits at
/// most [`IDLE_FOLD_AFTER`], then folds them all (a chunk at a time, stopping at the
/// first write that comes), so a burst of posts leaves an empty log behind it and the
/// next burst's writes do not wait behind the last one's folds. It polls the queue with
/// a waker that unparks the thread and parks it with a timeout (`blocking_recv` has no
/// timeout): no runtime, no timer wheel. While a short log waits to be old enough
/// ([`Quiet::Idle`]), it wakes every [`IDLE_FOLD_AFTER`] to look again.
struct Idle {
    /// Unparks the writer thread when the queue has something.
    waker: std::task::Waker,
    /// The last idle fold failed: none is tried again before the next write.
    failed: bool,
}

/// Wakes a parked thread.
struct Unpark(std::thread::Thread);

impl std::task::Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

impl Idle {
    /// For the calling thread: the writer's own.
    fn new() -> Self {
        Self {
            waker: Arc::new(Unpark(std::thread::current())).into(),
            failed: false,
        }
    }

    /// The next message (`None`: the queue is closed and drained), folding the log while
    /// none comes. `Err`: the connection could not be set back to `synchronous=FULL`
    /// after a fold, so the writer must stop.
    fn next(
        &mut self,
        state: &mut State,
        rx: &mut mpsc::Receiver<Msg>,
    ) -> Result<Option<Msg>, QuietFoldError> {
        loop {
            let fold_after = (!self.failed && !state.hot.log.is_empty()).then_some(IDLE_FOLD_AFTER);
            if let Some(next) = self.recv(rx, fold_after) {
                self.failed = false;
                return Ok(next);
            }
            self.failed = !fold_quietly(state, rx, Quiet::Idle)?;
        }
    }

    /// The next message, waiting at most `timeout` (`None`: it came not in time).
    fn recv(
        &self,
        rx: &mut mpsc::Receiver<Msg>,
        timeout: Option<std::time::Duration>,
    ) -> Option<Option<Msg>> {
        let mut cx = std::task::Context::from_waker(&self.waker);
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let std::task::Poll::Ready(next) = rx.poll_recv(&mut cx) {
                return Some(next);
            }
            // Parking may end early (a stale unpark): the queue is polled again.
            match deadline {
                None => std::thread::park(),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    std::thread::park_timeout(left);
                }
            }
        }
    }
}

/// Folds the whole commit log in a transaction of its own. A fold that fails leaves the
/// log and its tail as they were, to be folded later.
fn fold(state: &mut State) {
    let started = Instant::now();
    let result = state
        .conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .and_then(|tx| {
            let n = state.hot.log.fold_in(&tx)?;
            tx.commit()?;
            Ok(n)
        });
    match result {
        Ok(rows) => {
            state.hot.log.committed();
            state.index.poke();
            state.stats.fold_seconds.observe_duration(started.elapsed());
            state
                .stats
                .folded_rows
                .fetch_add(rows as u64, Ordering::Relaxed);
            tracing::trace!(rows, took = ?started.elapsed(), "folded the commit log");
        }
        Err(e) => {
            state.hot.log.rolled_back();
            if disk_full(&e) {
                state.stats.disk.set_full();
            }
            tracing::warn!(error = %e, "folding the commit log failed; its rows stay in the log and the fold is tried again later");
        }
    }
}

/// Each op's own answer, and the events the batch committed, in order.
type Committed = (Vec<Result<Done>>, Vec<Event>);

/// Applies every op in one transaction. `Err` means nothing was committed; `Ok` holds each
/// op's own answer (an op whose checks failed wrote nothing) and the committed events.
fn apply_all(state: &mut State, batch: &[Job]) -> Result<Committed, BatchFailed> {
    let started = Instant::now();
    let result = try_apply_all(state, batch);
    if result.is_err() {
        // Rolled back: the hot state may hold changes that never reached the disk.
        state.hot.clear();
        state.hot.log.rolled_back();
        state.stats.failed_commits.fetch_add(1, Ordering::Relaxed);
    } else {
        state
            .stats
            .commit_seconds
            .observe_duration(started.elapsed());
        state.stats.batch_ops.observe(batch.len() as f64);
    }
    result
}

fn try_apply_all(state: &mut State, batch: &[Job]) -> Result<Committed, BatchFailed> {
    let State {
        conn,
        ids,
        hot,
        rules,
        stats,
        busy_since,
        index,
        ..
    } = state;
    let mut journal = Vec::new();
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // The commit log's old rows go a few at a time between batches ([`fold_quietly`]); a
    // writer that has been busy for [`BUSY_AFTER`] (no empty queue after a small batch),
    // or whose old rows pile up, folds them with the batches that add more. Not while
    // the disk is short (what is taken then frees space, and a fold takes some). A
    // trickle that fails is undone alone and left for later: the batch goes on.
    if !stats.disk.refused()
        && !batch.iter().all(|j| j.op.frees_space())
        && (busy_since.is_some_and(|t| t.elapsed() >= BUSY_AFTER) || hot.log.old_rows_pile_up())
    {
        let trickled = tx.savepoint().and_then(|sp| {
            let n = hot.log.trickle(&sp, batch.len())?;
            sp.commit()?;
            Ok(n)
        });
        match trickled {
            Ok(n) => stats.folded_rows.fetch_add(n as u64, Ordering::Relaxed),
            Err(e) => {
                hot.log.trickle_failed();
                tracing::warn!(error = %e, "folding the commit log's old rows failed; they stay in the log");
                0
            }
        };
    }
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let folds = job.op.folds_channel();
        if let Some(channel_id) = folds {
            let n = hot.log.fold_channel(&tx, channel_id)?;
            stats.folded_rows.fetch_add(n as u64, Ordering::Relaxed);
        }
        let changes_before = tx.total_changes();
        let journal_before = journal.len();
        let applied = write::apply(&tx, ids, hot, rules, &job.op, &mut journal);
        if let Some(channel_id) = folds {
            hot.forget(channel_id);
        }
        // A search's fold counts with the others.
        if let (write::Op::Fold { .. }, Ok(write::Done::Count(n))) = (&job.op, &applied) {
            stats.folded_rows.fetch_add(*n, Ordering::Relaxed);
        }
        match applied {
            Ok(done) => results.push(Ok(done)),
            // A refusal must come before any write; if one did not, the batch is unsafe to
            // commit, so it is rolled back and replayed op by op.
            Err(write::Failure::Refused(e))
                if tx.total_changes() == changes_before && journal.len() == journal_before =>
            {
                results.push(Err(e))
            }
            Err(write::Failure::Refused(e)) => return Err(BatchFailed::RefusedAfterWrite(e)),
            Err(write::Failure::Sqlite(e)) => return Err(e.into()),
        }
    }
    // The search queue's rows the index has passed, now and then. A trim that fails is
    // undone alone and tried again later: the batch goes on.
    let mut trim = index.trim_due();
    if let Some(through) = trim {
        let trimmed = tx.savepoint().and_then(|sp| {
            index::trim(&sp, through)?;
            sp.commit()
        });
        if let Err(e) = trimmed {
            tracing::warn!(error = %e, "trimming the search queue failed; tried again later");
            trim = None;
        }
    }
    tx.commit()?;
    hot.log.committed();
    hot.trim();
    if let Some(through) = trim {
        index.trimmed(through);
    }
    Ok((results, journal))
}
