//! The single writer: one thread owns the write connection, takes every queued write,
//! applies them all in one transaction (group commit, `synchronous=FULL`), and only then
//! answers each caller. The queue is bounded; a full queue is refused, never grown.
//!
//! Failure handling: an op that fails a check writes nothing and answers its own error
//! without touching the batch. An unexpected SQLite error rolls the whole batch back and
//! replays its ops one transaction each, so one bad op cannot fail its neighbours. A failed
//! commit answers every op of the batch with an error: nothing unacknowledged is claimed
//! and nothing acknowledged is lost.

use std::thread::JoinHandle;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::hot::Hot;
use super::write::{self, Done, HotUse, Op};
use crate::id::Snowflake;
use crate::model::Event;
use crate::store::{OnCommit, Result, StoreError};

/// Most ops one transaction takes; bounds the time a caller waits behind a batch.
const MAX_BATCH: usize = 4096;

/// Why a batch transaction was not committed.
#[derive(Debug, thiserror::Error)]
enum BatchFailed {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// A bug guard: an op reported a refusal after it had written.
    #[error("an op was refused after it wrote: {0}")]
    RefusedAfterWrite(StoreError),
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Done>>,
}

/// The async side of the writer: submits ops and awaits their commit.
#[derive(Clone)]
pub(super) struct Writer {
    tx: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer thread over `conn`. The thread ends when every [`Writer`] clone is
    /// dropped and the queue has drained.
    pub fn start(
        conn: Connection,
        node_id: u16,
        capacity: usize,
        on_commit: Option<OnCommit>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let handle = std::thread::Builder::new()
            .name("natter-writer".into())
            .spawn(move || run(conn, Snowflake::new(node_id), on_commit, rx))
            .expect("spawn the writer thread");
        (Self { tx }, handle)
    }

    /// Queues `op` and waits until it is committed (or refused).
    pub async fn submit(&self, op: Op) -> Result<Done> {
        let (reply, answer) = oneshot::channel();
        self.tx.try_send(Job { op, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StoreError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => StoreError::Unavailable,
        })?;
        answer.await.map_err(|_| StoreError::Unavailable)?
    }
}

/// What the writer thread owns besides its queue.
struct State {
    conn: Connection,
    ids: Snowflake,
    hot: Hot,
    on_commit: Option<OnCommit>,
}

impl State {
    /// Hands a committed batch's events on, before any of its writers is answered: a
    /// client that got an ack can rely on every reader of the events having them.
    fn committed(&self, events: Vec<Event>) {
        if let Some(f) = &self.on_commit
            && !events.is_empty()
        {
            f(events);
        }
    }
}

fn run(conn: Connection, ids: Snowflake, on_commit: Option<OnCommit>, mut rx: mpsc::Receiver<Job>) {
    let mut state = State {
        conn,
        ids,
        hot: Hot::default(),
        on_commit,
    };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        commit_batch(&mut state, &mut batch);
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
        Err(e) if batch.len() > 1 => {
            tracing::warn!(error = %e, ops = batch.len(), "commit batch failed; replaying its ops one by one");
            for job in batch.drain(..) {
                let mut single = vec![job];
                let result = match apply_all(state, &single) {
                    Ok((mut results, events)) => {
                        state.committed(events);
                        results.remove(0)
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

/// Each op's own answer, and the events the batch committed, in order.
type Committed = (Vec<Result<Done>>, Vec<Event>);

/// Applies every op in one transaction. `Err` means nothing was committed; `Ok` holds each
/// op's own answer (an op whose checks failed wrote nothing) and the committed events.
fn apply_all(state: &mut State, batch: &[Job]) -> Result<Committed, BatchFailed> {
    let result = try_apply_all(state, batch);
    if result.is_err() {
        // Rolled back: the hot state may hold changes that never reached the disk.
        state.hot.clear();
    }
    result
}

fn try_apply_all(state: &mut State, batch: &[Job]) -> Result<Committed, BatchFailed> {
    let State { conn, ids, hot, .. } = state;
    let mut journal = Vec::new();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let hot_use = job.op.hot_use();
        if let HotUse::FlushAndForget(_) = hot_use {
            hot.flush(&tx)?;
        }
        let changes_before = tx.total_changes();
        let journal_before = journal.len();
        let applied = write::apply(&tx, ids, hot, &job.op, &mut journal);
        if let HotUse::FlushAndForget(Some(channel_id)) = hot_use {
            hot.forget(channel_id);
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
    hot.flush(&tx)?;
    tx.commit()?;
    hot.trim();
    Ok((results, journal))
}
