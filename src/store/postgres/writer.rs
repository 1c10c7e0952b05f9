//! One group-commit writer per shard: a thread with its own small runtime and its own
//! connection takes every op queued for the shard, applies them in one transaction (every
//! touched channel row locked first, in id order, so writers on other nodes never
//! deadlock with it; runs of sends applied as a few `unnest` statements, pipelined), and
//! only after `COMMIT` returns hands the events on and answers the callers.
//!
//! Failure handling, as on SQLite: an op refused by a check writes nothing and answers its
//! own error. An unexpected PostgreSQL error rolls the batch back and replays its ops one
//! transaction each. A lost connection answers the batch `Unreachable` (if it broke during
//! `COMMIT` the outcome is unknown, and it is still not acknowledged: a send retried with
//! its `client_id` gets the original if it did commit) and the writer reconnects.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::read::{self, MESSAGE_BY_ID, message_select};
use super::{Fail, ShardStats, Shared, unreachable_error};
use crate::clock::now_ms;
use crate::model::{Channel, ChannelKind, Event, EventBody, Message, Role};
use crate::store::rules::{self, PutMember, Verdict};
use crate::store::{Posted, Result, StoreError};

/// Longest wait for shard 0 to resolve a send's `@name`s, inside the shard's transaction.
const MENTION_LOOKUP: Duration = Duration::from_secs(1);
/// Most ops one transaction takes.
const MAX_BATCH: usize = 4096;
/// How long a lost connection is not retried after a failed attempt (ops meanwhile are
/// answered `Unreachable` at once).
const RECONNECT_BACKOFF: Duration = Duration::from_millis(250);

pub(super) enum Op {
    /// `members` exist and were admitted (consent, room) by the caller.
    CreateChannel {
        id: i64,
        owner: i64,
        kind: ChannelKind,
        name: String,
        members: Vec<i64>,
    },
    /// `id` is on this shard, as the pair key's bucket says; the pair was admitted.
    OpenDm {
        id: i64,
        key: String,
        user: i64,
        peer: i64,
    },
    RenameChannel {
        actor: i64,
        channel_id: i64,
        name: String,
    },
    /// `admitted` is the caller's verdict on consent and room, applied if this adds.
    PutMember {
        actor: i64,
        channel_id: i64,
        user_id: i64,
        role: Option<Role>,
        admitted: Verdict,
    },
    RemoveMember {
        actor: i64,
        channel_id: i64,
        user_id: i64,
    },
    /// A deleted account leaves the channel.
    Depart {
        user_id: i64,
        channel_id: i64,
        leaving: Vec<i64>,
    },
    MarkRead {
        user_id: i64,
        channel_id: i64,
        seq: i64,
    },
    Post {
        author: i64,
        channel_id: i64,
        text: String,
        client_id: Option<String>,
    },
    /// A send applied alone, not in a run: a reply (it changes its root too), or one whose
    /// text may mention someone (names are resolved on shard 0).
    SlowPost {
        author: i64,
        channel_id: i64,
        root_id: Option<i64>,
        text: String,
        client_id: Option<String>,
        /// Uploads of the author it carries (looked up on shard 0), created at
        /// `attach_since` or later.
        files: Vec<i64>,
        attach_since: i64,
    },
    Edit {
        actor: i64,
        channel_id: i64,
        message_id: i64,
        text: String,
    },
    Delete {
        actor: i64,
        channel_id: i64,
        message_id: i64,
    },
    React {
        actor: i64,
        channel_id: i64,
        message_id: i64,
        emoji: String,
        add: bool,
    },
}

impl Op {
    /// The existing channel whose row the op locks.
    fn locks(&self) -> Option<i64> {
        match self {
            Op::CreateChannel { .. } | Op::OpenDm { .. } => None,
            Op::RenameChannel { channel_id, .. }
            | Op::PutMember { channel_id, .. }
            | Op::RemoveMember { channel_id, .. }
            | Op::Depart { channel_id, .. }
            | Op::MarkRead { channel_id, .. }
            | Op::Post { channel_id, .. }
            | Op::Edit { channel_id, .. }
            | Op::Delete { channel_id, .. }
            | Op::React { channel_id, .. }
            | Op::SlowPost { channel_id, .. } => Some(*channel_id),
        }
    }
}

pub(super) enum Done {
    Channel(Channel),
    Dm(Channel, bool),
    Posted(Posted),
    Message(Message),
    /// Whether the op changed anything (an idempotent op that found it done: `false`).
    Changed(bool),
    Unit,
}

pub(super) struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Done>>,
    queued: Instant,
}

pub(super) enum Msg {
    Job(Job),
    Stop(oneshot::Sender<()>),
}

/// The async side: queues ops for the shard's writer thread.
pub(super) struct Writer {
    tx: mpsc::Sender<Msg>,
    stats: Arc<ShardStats>,
}

impl Writer {
    pub fn start(
        shard: usize,
        pg: tokio_postgres::Config,
        capacity: usize,
        shared: Arc<Shared>,
        stats: Arc<ShardStats>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let _ = stats.queue.set(tx.downgrade());
        let thread_stats = Arc::clone(&stats);
        let handle = std::thread::Builder::new()
            .name(format!("natter-pg{shard}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the shard writer");
                rt.block_on(run(
                    State {
                        shard,
                        pg,
                        conn: None,
                        retry_at: Instant::now(),
                        shared,
                        stats: thread_stats,
                    },
                    rx,
                ));
            })
            .expect("spawn a shard writer thread");
        (Self { tx, stats }, handle)
    }

    /// Queues `op` (synchronously, in this call: ops queued in some order commit in that
    /// order) and waits for its commit or refusal.
    pub fn submit(&self, op: Op) -> impl Future<Output = Result<Done>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let queued = self.tx.try_send(Msg::Job(Job {
            op,
            reply,
            queued: Instant::now(),
        }));
        let refused = match queued {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
                Some(StoreError::Overloaded)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Some(StoreError::Unavailable),
        };
        async move {
            if let Some(e) = refused {
                return Err(e);
            }
            answer.await.map_err(|_| StoreError::Unavailable)?
        }
    }

    /// Commits everything queued before this, then stops the thread.
    pub async fn stop(&self) {
        let (done, stopped) = oneshot::channel();
        if self.tx.send(Msg::Stop(done)).await.is_ok() {
            let _ = stopped.await;
        }
    }
}

/// The shard's hot statements, prepared once per connection.
struct Stmts {
    lock: Statement,
    channels: Statement,
    roles: Statement,
    originals: Statement,
    insert_events: Statement,
    insert_messages: Statement,
    update_channels: Statement,
    update_own_unread: Statement,
}

struct Conn {
    client: Client,
    stmts: Stmts,
}

struct State {
    shard: usize,
    pg: tokio_postgres::Config,
    conn: Option<Conn>,
    retry_at: Instant,
    shared: Arc<Shared>,
    stats: Arc<ShardStats>,
}

async fn connect(pg: &tokio_postgres::Config) -> std::result::Result<Conn, tokio_postgres::Error> {
    let (client, connection) = pg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "shard writer connection ended");
        }
    });
    let (lock, channels, roles, originals) = tokio::try_join!(
        client.prepare("SELECT id FROM channels WHERE id = ANY($1) ORDER BY id FOR UPDATE"),
        client.prepare(
            "SELECT id, kind, last_seq, owner_id, dm_answered FROM channels WHERE id = ANY($1)"
        ),
        client.prepare(
            "SELECT m.channel_id, m.user_id, m.role FROM members m
             JOIN unnest($1::bigint[], $2::bigint[]) AS k(c, u) ON m.channel_id = k.c AND m.user_id = k.u"
        ),
        client.prepare(concat!(
            message_select!(),
            "FROM messages m JOIN unnest($1::bigint[], $2::bigint[], $3::text[]) AS k(c, a, cid)
             ON m.channel_id = k.c AND m.author_id = k.a AND m.client_id = k.cid"
        )),
    )?;
    let (insert_events, insert_messages, update_channels, update_own_unread) = tokio::try_join!(
        client.prepare(
            "INSERT INTO events (channel_id, seq, kind, at, message_id)
             SELECT c, s, 'message.created', a, m FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[]) AS v(c, s, a, m)"
        ),
        // A client_id already stored is skipped, and the count shows it.
        client.prepare(
            "INSERT INTO messages (id, channel_id, seq, author_id, text, client_id, created_at)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::bigint[])
             ON CONFLICT (channel_id, author_id, client_id) WHERE client_id IS NOT NULL DO NOTHING"
        ),
        client.prepare(
            "UPDATE channels c SET last_seq = v.last, live_messages = c.live_messages + v.n,
                 dm_answered = c.dm_answered OR v.answered
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bool[]) AS v(id, last, n, answered)
             WHERE c.id = v.id"
        ),
        client.prepare(
            "UPDATE members m SET own_unread = m.own_unread + v.d
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS v(c, u, d)
             WHERE m.channel_id = v.c AND m.user_id = v.u"
        ),
    )?;
    Ok(Conn {
        client,
        stmts: Stmts {
            lock,
            channels,
            roles,
            originals,
            insert_events,
            insert_messages,
            update_channels,
            update_own_unread,
        },
    })
}

async fn run(mut state: State, mut rx: mpsc::Receiver<Msg>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut stop = None;
    while let Some(first) = rx.recv().await {
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
        if !batch.is_empty() {
            commit_batch(&mut state, &mut batch).await;
        }
        if let Some(done) = stop.take() {
            rx.close();
            drop(rx);
            let _ = done.send(());
            return;
        }
    }
}

/// Makes sure the writer has a live connection; `false` (the shard is unreachable) if not
/// and the last attempt was too recent or this one failed.
async fn ensure_connected(state: &mut State) -> bool {
    if state.conn.as_ref().is_some_and(|c| !c.client.is_closed()) {
        return true;
    }
    state.conn = None;
    if Instant::now() < state.retry_at {
        return false;
    }
    let attempt = tokio::time::timeout(Duration::from_secs(2), connect(&state.pg)).await;
    match attempt {
        Ok(Ok(conn)) => {
            tracing::info!(shard = state.shard, "shard writer connected");
            state.conn = Some(conn);
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(shard = state.shard, error = %e, "shard writer cannot connect");
            state.retry_at = Instant::now() + RECONNECT_BACKOFF;
            state.stats.set_up(false);
            false
        }
        Err(_) => {
            tracing::warn!(shard = state.shard, "shard writer connect timed out");
            state.retry_at = Instant::now() + RECONNECT_BACKOFF;
            state.stats.set_up(false);
            false
        }
    }
}

async fn commit_batch(state: &mut State, batch: &mut Vec<Job>) {
    // Without a live lease on the node id, ids could collide with another node's.
    if !state.shared.lease_held() {
        tracing::warn!(
            shard = state.shard,
            ops = batch.len(),
            "no live lease on the node id; writes refused"
        );
        for job in batch.drain(..) {
            let _ = job.reply.send(Err(StoreError::Unreachable));
        }
        return;
    }
    if !ensure_connected(state).await {
        state
            .stats
            .unreachable
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for job in batch.drain(..) {
            let _ = job.reply.send(Err(StoreError::Unreachable));
        }
        return;
    }
    for job in batch.iter() {
        state
            .stats
            .queue_wait
            .observe_duration(job.queued.elapsed());
    }
    match apply_all(state, batch).await {
        Ok((results, events)) => {
            state.committed(events);
            for (job, result) in batch.drain(..).zip(results) {
                let _ = job.reply.send(result);
            }
        }
        Err(e) if unreachable_error(&e) => fail_all(state, batch, &e),
        Err(e) if batch.len() > 1 || transient_error(&e) => {
            tracing::warn!(shard = state.shard, error = %e, ops = batch.len(), "commit batch failed; replaying its ops one by one");
            for job in batch.drain(..) {
                let mut single = vec![job];
                // A deadlock or serialization failure (with another node's writer) is
                // tried once more before it is an error.
                for attempt in 0..2 {
                    if !ensure_connected(state).await {
                        state.stats.unreachable.fetch_add(1, Ordering::Relaxed);
                        for job in single.drain(..) {
                            let _ = job.reply.send(Err(StoreError::Unreachable));
                        }
                        break;
                    }
                    match apply_all(state, &single).await {
                        Ok((mut results, events)) => {
                            state.committed(events);
                            let _ = single.pop().expect("one job").reply.send(results.remove(0));
                            break;
                        }
                        Err(e) if attempt == 0 && transient_error(&e) => continue,
                        Err(e) => {
                            fail_all(state, &mut single, &e);
                            break;
                        }
                    }
                }
            }
        }
        Err(e) => fail_all(state, batch, &e),
    }
}

/// A deadlock or serialization failure: nothing was committed, and trying again may pass.
fn transient_error(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

fn fail_all(state: &mut State, batch: &mut Vec<Job>, e: &tokio_postgres::Error) {
    let error = if unreachable_error(e) {
        if super::connection_lost(e) {
            state.conn = None;
            state.stats.set_up(false);
        }
        state
            .stats
            .unreachable
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        tracing::warn!(shard = state.shard, error = %e, ops = batch.len(), "shard unreachable; its writes are refused until it is back");
        StoreError::Unreachable
    } else if e.code() == Some(&tokio_postgres::error::SqlState::DISK_FULL) {
        tracing::error!(shard = state.shard, error = %e, "commit write: the shard's disk is full");
        StoreError::DiskFull
    } else {
        tracing::error!(shard = state.shard, error = %e, "commit write failed");
        StoreError::internal("commit write", e.to_string())
    };
    for job in batch.drain(..) {
        let _ = job.reply.send(Err(error.duplicate()));
    }
}

impl State {
    fn committed(&self, events: Vec<Event>) {
        self.stats.set_up(true);
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
        if let Some(f) = &self.shared.on_commit
            && !events.is_empty()
        {
            f(events);
        }
    }
}

type Committed = (Vec<Result<Done>>, Vec<Event>);

async fn apply_all(
    state: &mut State,
    batch: &[Job],
) -> std::result::Result<Committed, tokio_postgres::Error> {
    let started = Instant::now();
    let result = try_apply_all(state, batch).await;
    match &result {
        Ok(_) => {
            state
                .stats
                .commit_seconds
                .observe_duration(started.elapsed());
            state.stats.batch_ops.observe(batch.len() as f64);
        }
        Err(_) => {
            state.stats.failed_commits.fetch_add(1, Ordering::Relaxed);
        }
    }
    result
}

async fn try_apply_all(
    state: &mut State,
    batch: &[Job],
) -> std::result::Result<Committed, tokio_postgres::Error> {
    let shared = Arc::clone(&state.shared);
    let conn = state.conn.as_mut().expect("connected");
    let stmts = &conn.stmts;
    let tx = &conn.client;
    let mut locked: Vec<i64> = batch.iter().filter_map(|j| j.op.locks()).collect();
    locked.sort_unstable();
    locked.dedup();
    // BEGIN and the locks in one round trip (the backend runs them in order).
    let applied = async {
        tokio::try_join!(tx.batch_execute("BEGIN"), async {
            if locked.is_empty() {
                Ok(Vec::new())
            } else {
                tx.query(&stmts.lock, &[&locked]).await
            }
        })?;
        apply_in_transaction(tx, stmts, &shared, batch).await
    };
    match applied.await {
        Ok(committed) => Ok(committed),
        Err(e) => {
            // Leave the connection outside any transaction for the next batch (if it is
            // still there at all).
            let _ = tx.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// The batch's ops inside the open transaction, then `COMMIT`.
async fn apply_in_transaction(
    tx: &Client,
    stmts: &Stmts,
    shared: &Shared,
    batch: &[Job],
) -> std::result::Result<Committed, tokio_postgres::Error> {
    let mut journal = Vec::new();
    let mut results = Vec::with_capacity(batch.len());
    let mut i = 0;
    while i < batch.len() {
        if matches!(batch[i].op, Op::Post { .. }) {
            let end = batch[i..]
                .iter()
                .position(|j| !matches!(j.op, Op::Post { .. }))
                .map_or(batch.len(), |n| i + n);
            // Retries are rare: first without looking for earlier messages with the same
            // client_ids; if the insert finds one, again with the lookup.
            let run = &batch[i..end];
            if !post_run(tx, stmts, shared, run, &mut journal, &mut results, false).await? {
                post_run(tx, stmts, shared, run, &mut journal, &mut results, true).await?;
            }
            i = end;
        } else {
            let before = journal.len();
            // Checks come before writes, so a refusal writes nothing; the savepoint makes
            // sure of it (as SQLite's writer checks `total_changes`): a refused op is
            // rolled back to it, whatever it did. These ops are rare; sends take no
            // savepoint of their own.
            let (saved, applied) = tokio::join!(
                tx.batch_execute("SAVEPOINT op"),
                apply_one(tx, shared, &batch[i].op, &mut journal)
            );
            saved?;
            match applied {
                Ok(done) => results.push(Ok(done)),
                Err(Fail::Store(e)) => {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT op").await?;
                    journal.truncate(before);
                    results.push(Err(e))
                }
                Err(Fail::Pg(e)) => return Err(e),
            }
            i += 1;
        }
    }
    tx.batch_execute("COMMIT").await?;
    Ok((results, journal))
}

/// A run of sends: pipelined reads (channel rows, the authors' roles and, with `probe`,
/// earlier messages with the same `client_id`s), the rules, then pipelined writes.
///
/// Without `probe`, the messages insert skips a `client_id` that already exists and says
/// so: then the run's writes are rolled back to a savepoint, its answers withdrawn, and
/// `false` returned, for the caller to run it again with `probe`.
#[allow(clippy::too_many_arguments)]
async fn post_run(
    tx: &Client,
    stmts: &Stmts,
    shared: &Shared,
    jobs: &[Job],
    journal: &mut Vec<Event>,
    results: &mut Vec<Result<Done>>,
    probe: bool,
) -> std::result::Result<bool, tokio_postgres::Error> {
    let (journal_before, results_before) = (journal.len(), results.len());
    let posts: Vec<(i64, i64, &str, Option<&str>)> = jobs
        .iter()
        .map(|j| match &j.op {
            Op::Post {
                author,
                channel_id,
                text,
                client_id,
            } => (*author, *channel_id, text.as_str(), client_id.as_deref()),
            _ => unreachable!("a run holds posts only"),
        })
        .collect();
    let mut channel_ids: Vec<i64> = posts.iter().map(|p| p.1).collect();
    channel_ids.sort_unstable();
    channel_ids.dedup();
    let (role_c, role_u): (Vec<i64>, Vec<i64>) = posts.iter().map(|p| (p.1, p.0)).unzip();
    let keyed: Vec<&(i64, i64, &str, Option<&str>)> = if probe {
        posts.iter().filter(|p| p.3.is_some()).collect()
    } else {
        Vec::new()
    };
    let orig_c: Vec<i64> = keyed.iter().map(|p| p.1).collect();
    let orig_a: Vec<i64> = keyed.iter().map(|p| p.0).collect();
    let orig_k: Vec<&str> = keyed.iter().map(|p| p.3.unwrap_or_default()).collect();
    let channel_params: [&(dyn ToSql + Sync); 1] = [&channel_ids];
    let role_params: [&(dyn ToSql + Sync); 2] = [&role_c, &role_u];
    let original_params: [&(dyn ToSql + Sync); 3] = [&orig_c, &orig_a, &orig_k];
    let (channel_rows, role_rows, original_rows) = tokio::try_join!(
        tx.query(&stmts.channels, &channel_params),
        tx.query(&stmts.roles, &role_params),
        async {
            if keyed.is_empty() {
                Ok(Vec::new())
            } else {
                tx.query(&stmts.originals, &original_params).await
            }
        },
    )?;
    struct Ch {
        kind: Option<ChannelKind>,
        last_seq: i64,
        added: i64,
        /// The DM's opener while nobody else has posted in it.
        unanswered_of: Option<i64>,
        answered: bool,
    }
    let mut channels: HashMap<i64, Ch> = HashMap::new();
    for r in &channel_rows {
        let kind = ChannelKind::parse(r.get(1));
        let answered: bool = r.get(4);
        channels.insert(
            r.get(0),
            Ch {
                unanswered_of: (kind == Some(ChannelKind::Dm) && !answered).then(|| r.get(3)),
                kind,
                last_seq: r.get(2),
                added: 0,
                answered: false,
            },
        );
    }
    let roles: HashMap<(i64, i64), Option<Role>> = role_rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), Role::parse(r.get(2))))
        .collect();
    // Earlier messages with these client_ids (read only on a second pass), and the sends
    // of this run already made (a second send with a client_id in one run is its retry),
    // keyed without copying the client_ids.
    let stored: HashMap<(i64, i64, &str), Message> = original_rows
        .iter()
        .map(|r| {
            let m = read::message_row(r);
            ((m.channel_id, m.author_id, r.get::<_, &str>(5)), m)
        })
        .collect();
    let mut made: HashMap<(i64, i64, &str), usize> = HashMap::new();
    let now = now_ms();
    let ids = shared.next_ids(posts.len(), now);
    let mut ev = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut msg = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::<Option<&str>>::new(),
        Vec::new(),
    );
    let mut own: HashMap<(i64, i64), i64> = HashMap::new();
    for (n, &(author, channel_id, text, client_id)) in posts.iter().enumerate() {
        let Some(ch) = channels.get_mut(&channel_id) else {
            results.push(Err(StoreError::NotFound));
            continue;
        };
        let Some(kind) = ch.kind else {
            results.push(Err(StoreError::internal(
                "read channel",
                "corrupt channel kind",
            )));
            continue;
        };
        let role = roles.get(&(channel_id, author)).copied().flatten();
        let original = client_id.and_then(|k| {
            let key = (channel_id, author, k);
            match made.get(&key) {
                Some(&at) => match &results[at] {
                    Ok(Done::Posted(p)) => Some(p.message.clone()),
                    _ => None,
                },
                None => stored.get(&key).cloned(),
            }
        });
        match rules::post(kind, role, original) {
            Err(e) => results.push(Err(e)),
            Ok(Some(retry)) => results.push(Ok(Done::Posted(retry))),
            Ok(None) => {
                let id = ids[n];
                ch.last_seq += 1;
                ch.added += 1;
                let seq = ch.last_seq;
                if ch.unanswered_of.is_some_and(|opener| opener != author) {
                    ch.unanswered_of = None;
                    ch.answered = true;
                }
                *own.entry((channel_id, author)).or_default() += 1;
                ev.0.push(channel_id);
                ev.1.push(seq);
                ev.2.push(now);
                ev.3.push(id);
                msg.0.push(id);
                msg.1.push(channel_id);
                msg.2.push(seq);
                msg.3.push(author);
                msg.4.push(text);
                msg.5.push(client_id);
                msg.6.push(now);
                let message = Message {
                    id,
                    channel_id,
                    seq,
                    author_id: author,
                    text: text.to_owned(),
                    client_id: client_id.map(str::to_owned),
                    created_at: now,
                    edited_at: None,
                    deleted: false,
                    ..Message::default()
                };
                if let Some(k) = client_id {
                    made.insert((channel_id, author, k), results.len());
                }
                journal.push(Event {
                    channel_id,
                    seq,
                    at: now,
                    body: EventBody::MessageCreated(message.clone()),
                });
                results.push(Ok(Done::Posted(Posted {
                    message,
                    created: true,
                })));
            }
        }
    }
    if ev.0.is_empty() {
        return Ok(true);
    }
    let optimistic = !probe && msg.5.iter().any(Option::is_some);
    let mut upd = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (id, ch) in &channels {
        if ch.added > 0 {
            upd.0.push(*id);
            upd.1.push(ch.last_seq);
            upd.2.push(ch.added);
            upd.3.push(ch.answered);
        }
    }
    let (own_c, own_u, own_d) = own.iter().fold(
        (Vec::new(), Vec::new(), Vec::new()),
        |(mut c, mut u, mut d), (&(ch, user), &n)| {
            c.push(ch);
            u.push(user);
            d.push(n);
            (c, u, d)
        },
    );
    let event_params: [&(dyn ToSql + Sync); 4] = [&ev.0, &ev.1, &ev.2, &ev.3];
    let message_params: [&(dyn ToSql + Sync); 7] =
        [&msg.0, &msg.1, &msg.2, &msg.3, &msg.4, &msg.5, &msg.6];
    let channel_params: [&(dyn ToSql + Sync); 4] = [&upd.0, &upd.1, &upd.2, &upd.3];
    let own_params: [&(dyn ToSql + Sync); 3] = [&own_c, &own_u, &own_d];
    let (_, inserted, ..) = tokio::try_join!(
        async {
            if optimistic {
                tx.batch_execute("SAVEPOINT sends").await
            } else {
                Ok(())
            }
        },
        tx.execute(&stmts.insert_messages, &message_params),
        tx.execute(&stmts.insert_events, &event_params),
        tx.execute(&stmts.update_channels, &channel_params),
        tx.execute(&stmts.update_own_unread, &own_params),
    )?;
    if inserted as usize != msg.0.len() {
        // A client_id of this run was already stored: a retry of a committed send.
        debug_assert!(optimistic, "without conflicts every message is inserted");
        tx.batch_execute("ROLLBACK TO SAVEPOINT sends").await?;
        journal.truncate(journal_before);
        results.truncate(results_before);
        return Ok(false);
    }
    Ok(true)
}

/// Every op but a send, one at a time, checks before writes.
async fn apply_one(
    tx: &Client,
    shared: &Shared,
    op: &Op,
    j: &mut Vec<Event>,
) -> std::result::Result<Done, Fail> {
    let now = now_ms();
    match op {
        Op::CreateChannel {
            id,
            owner,
            kind,
            name,
            members,
        } => {
            tx.execute(
                "INSERT INTO channels (id, kind, name, owner_id, created_at) VALUES ($1, $2, $3, $4, $5)",
                &[id, &kind.as_str(), name, owner, &now],
            )
            .await?;
            add_member(tx, j, *id, *owner, Role::Owner, now).await?;
            for m in members {
                add_member(tx, j, *id, *m, Role::Member, now).await?;
            }
            Ok(Done::Channel(existing(tx, *id).await?))
        }
        Op::OpenDm {
            id,
            key,
            user,
            peer,
        } => {
            let found = tx
                .query_opt("SELECT id FROM channels WHERE dm_key = $1", &[key])
                .await?;
            if let Some(row) = found {
                return Ok(Done::Dm(existing(tx, row.get(0)).await?, false));
            }
            // Another node may make the same pair's DM at the same moment: the unique key
            // decides, and the loser returns the winner's.
            let made = tx
                .query_opt(
                    "INSERT INTO channels (id, kind, name, owner_id, dm_key, created_at) VALUES ($1, 'dm', NULL, $2, $3, $4)
                     ON CONFLICT (dm_key) DO NOTHING RETURNING id",
                    &[id, user, key, &now],
                )
                .await?;
            if made.is_none() {
                let row = tx
                    .query_one("SELECT id FROM channels WHERE dm_key = $1", &[key])
                    .await?;
                return Ok(Done::Dm(existing(tx, row.get(0)).await?, false));
            }
            add_member(tx, j, *id, *user, Role::Member, now).await?;
            add_member(tx, j, *id, *peer, Role::Member, now).await?;
            Ok(Done::Dm(existing(tx, *id).await?, true))
        }
        Op::RenameChannel {
            actor,
            channel_id,
            name,
        } => {
            let (kind, role) = membership(tx, *channel_id, *actor).await?;
            rules::rename(kind, role)?;
            tx.execute(
                "UPDATE channels SET name = $2 WHERE id = $1",
                &[channel_id, name],
            )
            .await?;
            append_event(
                tx,
                j,
                EventBody::ChannelUpdated {
                    name: Some(name.clone()),
                },
                *channel_id,
                now,
                None,
                None,
                Some(name),
            )
            .await?;
            Ok(Done::Channel(existing(tx, *channel_id).await?))
        }
        Op::PutMember {
            actor,
            channel_id,
            user_id,
            role,
            admitted,
        } => {
            let (kind, actor_role) = membership(tx, *channel_id, *actor).await?;
            let current = role_of(tx, *channel_id, *user_id).await?;
            match rules::put_member(kind, actor_role, current, *role)? {
                PutMember::Add(role) => {
                    if let Err(e) = admitted {
                        return Err(Fail::Store(e.duplicate()));
                    }
                    add_member(tx, j, *channel_id, *user_id, role, now).await?;
                }
                PutMember::SetRole(wanted) => {
                    tx.execute(
                        "UPDATE members SET role = $3 WHERE channel_id = $1 AND user_id = $2",
                        &[channel_id, user_id, &wanted.as_str()],
                    )
                    .await?;
                    append_event(
                        tx,
                        j,
                        EventBody::MemberUpdated {
                            user_id: *user_id,
                            role: wanted,
                        },
                        *channel_id,
                        now,
                        None,
                        Some(*user_id),
                        Some(wanted.as_str()),
                    )
                    .await?;
                }
                PutMember::Nothing => {}
            }
            Ok(Done::Unit)
        }
        Op::RemoveMember {
            actor,
            channel_id,
            user_id,
        } => {
            let (kind, actor_role) = membership(tx, *channel_id, *actor).await?;
            let target = role_of(tx, *channel_id, *user_id).await?;
            rules::remove_member(kind, *actor, actor_role, *user_id, target)?;
            tx.execute(
                "DELETE FROM members WHERE channel_id = $1 AND user_id = $2",
                &[channel_id, user_id],
            )
            .await?;
            outbox(tx, *user_id, *channel_id, false, now).await?;
            append_event(
                tx,
                j,
                EventBody::MemberRemoved { user_id: *user_id },
                *channel_id,
                now,
                None,
                Some(*user_id),
                None,
            )
            .await?;
            Ok(Done::Unit)
        }
        Op::Depart {
            user_id,
            channel_id,
            leaving,
        } => depart(tx, j, now, *user_id, *channel_id, leaving).await,
        Op::MarkRead {
            user_id,
            channel_id,
            seq,
        } => {
            let row = tx
                .query_opt(
                    "SELECT m.read_seq, c.last_seq FROM members m JOIN channels c ON c.id = m.channel_id
                     WHERE m.channel_id = $1 AND m.user_id = $2",
                    &[channel_id, user_id],
                )
                .await?;
            let row = rules::member(row)?;
            let (from, last): (i64, i64) = (row.get(0), row.get(1));
            let to = (*seq).min(last);
            if to <= from {
                return Ok(Done::Unit);
            }
            let counts = tx
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE m.author_id = $4)
                     FROM events e JOIN messages m ON m.id = e.message_id
                     WHERE e.channel_id = $1 AND e.kind = 'message.created' AND e.seq > $2 AND e.seq <= $3
                       AND NOT m.deleted",
                    &[channel_id, &from, &to, user_id],
                )
                .await?;
            let (live, own): (i64, i64) = (counts.get(0), counts.get(1));
            tx.execute(
                "UPDATE members SET read_seq = $3, live_read = live_read + $4, own_unread = own_unread - $5,
                     mention_unread = mention_unread - (SELECT count(*) FROM mentions x
                         WHERE x.channel_id = $1 AND x.user_id = $2 AND x.seq > members.read_seq AND x.seq <= $3)
                 WHERE channel_id = $1 AND user_id = $2",
                &[channel_id, user_id, &to, &live, &own],
            )
            .await?;
            Ok(Done::Unit)
        }
        Op::Post { .. } => unreachable!("sends are applied in runs"),
        Op::Edit {
            actor,
            channel_id,
            message_id,
            text,
        } => {
            membership(tx, *channel_id, *actor).await?;
            let found = message(tx, *channel_id, *message_id).await?;
            let edits: i64 = tx
                .query_one(
                    "SELECT count(*) FROM events WHERE message_id = $1 AND kind = 'message.edited'
                       AND kind <> 'message.created'",
                    &[message_id],
                )
                .await?
                .get(0);
            rules::edit(&shared.rules, found.as_ref(), *actor, edits as u32)?;
            let mut message = found.ok_or(StoreError::NotFound)?;
            // Mentions follow the text: those it no longer names are taken back.
            let mentioned = resolve_mentions(tx, shared, *channel_id, text).await?;
            tx.execute(
                "UPDATE events SET body = $3 WHERE channel_id = $1 AND body IS NULL
                   AND (seq = $4 OR (message_id = $2 AND kind <> 'message.created'))",
                &[channel_id, message_id, &message.text, &message.seq],
            )
            .await?;
            tx.execute(
                "UPDATE messages SET text = $2, edited_at = $3, mentions = $4 WHERE id = $1",
                &[message_id, text, &now, &mentioned],
            )
            .await?;
            let gone: Vec<i64> = message
                .mentions
                .iter()
                .copied()
                .filter(|u| !mentioned.contains(u))
                .collect();
            let (seq, author) = (message.seq, message.author_id);
            mention(tx, *channel_id, seq, *message_id, author, &gone, false).await?;
            mention(tx, *channel_id, seq, *message_id, author, &mentioned, true).await?;
            message.text = text.clone();
            message.edited_at = Some(now);
            message.mentions = mentioned;
            let seq = append_event(
                tx,
                j,
                EventBody::MessageEdited(message.clone()),
                *channel_id,
                now,
                Some(*message_id),
                None,
                None,
            )
            .await?;
            // The edit's event shows the mentions it made (each event, those as of it).
            tx.execute(
                "UPDATE events SET mentions = $3 WHERE channel_id = $1 AND seq = $2",
                &[channel_id, &seq, &message.mentions],
            )
            .await?;
            Ok(Done::Message(message))
        }
        Op::Delete {
            actor,
            channel_id,
            message_id,
        } => {
            let (_, role) = membership(tx, *channel_id, *actor).await?;
            let found = message(tx, *channel_id, *message_id).await?;
            if !rules::delete(found.as_ref(), *actor, role)? {
                return Ok(Done::Unit);
            }
            let message = found.ok_or(StoreError::NotFound)?;
            tx.execute(
                "UPDATE messages SET text = '', deleted = TRUE, mentions = NULL, files = NULL WHERE id = $1",
                &[message_id],
            )
            .await?;
            // Its files are no longer carried by it: with no other message carrying them,
            // they are collected after their grace period.
            tx.execute(
                "DELETE FROM message_files WHERE message_id = $1",
                &[message_id],
            )
            .await?;
            // Its mentions are no one's any more.
            mention(
                tx,
                *channel_id,
                message.seq,
                *message_id,
                message.author_id,
                &message.mentions,
                false,
            )
            .await?;
            tx.execute(
                "UPDATE events SET body = '', mentions = NULL WHERE channel_id = $1
                   AND (seq = $3 OR (message_id = $2 AND kind IN ('message.edited', 'message.deleted')))",
                &[channel_id, message_id, &message.seq],
            )
            .await?;
            // A reply fewer in its thread.
            if let Some(root) = message.thread_root_id {
                tx.execute(
                    "UPDATE messages SET reply_count = reply_count - 1 WHERE id = $1",
                    &[&root],
                )
                .await?;
            }
            // Its reactions go with it; their events stay in the log.
            tx.execute("DELETE FROM reactions WHERE message_id = $1", &[message_id])
                .await?;
            tx.execute(
                "DELETE FROM reaction_counts WHERE message_id = $1",
                &[message_id],
            )
            .await?;
            let redacted = Message {
                text: String::new(),
                deleted: true,
                mentions: Vec::new(),
                attachments: Vec::new(),
                ..message.clone()
            };
            append_event(
                tx,
                j,
                EventBody::MessageDeleted(redacted),
                *channel_id,
                now,
                Some(*message_id),
                None,
                None,
            )
            .await?;
            tx.execute(
                "UPDATE channels SET live_messages = live_messages - 1 WHERE id = $1",
                &[channel_id],
            )
            .await?;
            tx.execute(
                "UPDATE members SET live_read = live_read - 1 WHERE channel_id = $1 AND read_seq >= $2",
                &[channel_id, &message.seq],
            )
            .await?;
            tx.execute(
                "UPDATE members SET own_unread = own_unread - 1 WHERE channel_id = $1 AND user_id = $2 AND read_seq < $3",
                &[channel_id, &message.author_id, &message.seq],
            )
            .await?;
            Ok(Done::Unit)
        }
        Op::SlowPost {
            author,
            channel_id,
            root_id,
            text,
            client_id,
            files,
            attach_since,
        } => {
            slow_post(
                tx,
                shared,
                j,
                now,
                (*author, *channel_id, *root_id),
                (text, client_id.as_deref()),
                (files, *attach_since),
            )
            .await
        }
        Op::React {
            actor,
            channel_id,
            message_id,
            emoji,
            add,
        } => {
            react(
                tx,
                shared,
                j,
                now,
                (*actor, *channel_id, *message_id),
                emoji,
                *add,
            )
            .await
        }
    }
}

/// A send applied alone, with the unread projection kept as a run keeps it, a reply's
/// root's counters, and the mentioned members' unread mentions (the SQLite backend's
/// `post_slow`).
async fn slow_post(
    tx: &Client,
    shared: &Shared,
    j: &mut Vec<Event>,
    now: i64,
    (author, channel_id, root_id): (i64, i64, Option<i64>),
    (text, client_id): (&str, Option<&str>),
    (files, attach_since): (&[i64], i64),
) -> std::result::Result<Done, Fail> {
    let (kind, role) = membership(tx, channel_id, author).await?;
    let original = match client_id {
        Some(cid) => tx
            .query_opt(
                concat!(
                    message_select!(),
                    "FROM messages m WHERE m.channel_id = $1 AND m.author_id = $2 AND m.client_id = $3"
                ),
                &[&channel_id, &author, &cid],
            )
            .await?
            .as_ref()
            .map(read::message_row),
        None => None,
    };
    if let Some(retry) = rules::post(kind, Some(role), original)? {
        return Ok(Done::Posted(retry));
    }
    if let Some(root_id) = root_id {
        rules::reply_root(message(tx, channel_id, root_id).await?.as_ref())?;
    }
    let mentioned = resolve_mentions(tx, shared, channel_id, text).await?;
    let attachments = resolve_files(shared, author, files, attach_since).await?;
    let id = shared.next_ids(1, now)[0];
    let seq: i64 = tx
        .query_one(
            "UPDATE channels SET last_seq = last_seq + 1, live_messages = live_messages + 1,
                 dm_answered = dm_answered OR (kind = 'dm' AND owner_id <> $2)
             WHERE id = $1 RETURNING last_seq",
            &[&channel_id, &author],
        )
        .await?
        .get(0);
    tx.execute(
        "INSERT INTO messages (id, channel_id, seq, author_id, text, client_id, created_at, thread_root_id, mentions, files)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &[
            &id,
            &channel_id,
            &seq,
            &author,
            &text,
            &client_id,
            &now,
            &root_id,
            &mentioned,
            &crate::store::encode_attachments(&attachments),
        ],
    )
    .await?;
    for file in files {
        tx.execute(
            "INSERT INTO message_files (upload_id, message_id, channel_id) VALUES ($1, $2, $3)",
            &[file, &id, &channel_id],
        )
        .await?;
    }
    tx.execute(
        "INSERT INTO events (channel_id, seq, kind, at, message_id, mentions) VALUES ($1, $2, 'message.created', $3, $4, $5)",
        &[&channel_id, &seq, &now, &id, &mentioned],
    )
    .await?;
    if let Some(root_id) = root_id {
        tx.execute(
            "UPDATE messages SET reply_count = reply_count + 1, last_reply_at = $2 WHERE id = $1",
            &[&root_id, &now],
        )
        .await?;
    }
    mention(tx, channel_id, seq, id, author, &mentioned, true).await?;
    tx.execute(
        "UPDATE members SET own_unread = own_unread + 1 WHERE channel_id = $1 AND user_id = $2",
        &[&channel_id, &author],
    )
    .await?;
    let message = Message {
        id,
        channel_id,
        seq,
        author_id: author,
        text: text.to_owned(),
        client_id: client_id.map(str::to_owned),
        created_at: now,
        thread_root_id: root_id,
        mentions: mentioned,
        attachments,
        ..Message::default()
    };
    Ok(Done::Posted(crate::store::journal_post(j, message)))
}

/// The author's uploads `files` names, as the message carries them, looked up on shard 0
/// (where uploads are recorded) as mentions' names are: bounded in time, whatever goes
/// wrong there answered to this op alone.
async fn resolve_files(
    shared: &Shared,
    author: i64,
    files: &[i64],
    attach_since: i64,
) -> std::result::Result<Vec<crate::model::Attachment>, Fail> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let accounts = shared
        .accounts
        .get()
        .ok_or(Fail::Store(StoreError::Unreachable))?;
    let lookup = async {
        let c = accounts.get().await.ok()?;
        c.query(
            &format!(
                "SELECT {} FROM uploads WHERE id = ANY($1) AND owner_id = $2 AND created_at >= $3",
                read::UPLOAD_COLUMNS
            ),
            &[&files, &author, &attach_since],
        )
        .await
        .ok()
    };
    let rows = tokio::time::timeout(MENTION_LOOKUP, lookup)
        .await
        .ok()
        .flatten()
        .ok_or(Fail::Store(StoreError::Unreachable))?;
    let found: Vec<_> = rows.iter().map(read::upload_row).collect();
    Ok(crate::store::attachments_of(author, files, &found)?)
}

/// The members of the channel the text's `@name`s name, in the order named. Names are
/// looked up on shard 0 (where accounts live; unreachable, the send is refused as such
/// and may be retried), membership here, in the transaction.
async fn resolve_mentions(
    tx: &Client,
    shared: &Shared,
    channel_id: i64,
    text: &str,
) -> std::result::Result<Vec<i64>, Fail> {
    let names = crate::username::mentions(text);
    if names.is_empty() {
        return Ok(Vec::new());
    }
    // Bounded well below the shard's idle-in-transaction timeout: this transaction holds
    // its channels' locks meanwhile. Whatever goes wrong on shard 0 is answered to this
    // op alone (rolled back to its savepoint), never taken for this shard's failure.
    let accounts = shared
        .accounts
        .get()
        .ok_or(Fail::Store(StoreError::Unreachable))?;
    let lookup = async {
        let c = accounts.get().await.ok()?;
        c.query(
            "SELECT id, username_key FROM users WHERE username_key = ANY($1)",
            &[&names],
        )
        .await
        .ok()
    };
    let users = tokio::time::timeout(MENTION_LOOKUP, lookup)
        .await
        .ok()
        .flatten()
        .ok_or(Fail::Store(StoreError::Unreachable))?;
    let ids: Vec<i64> = names
        .iter()
        .filter_map(|n| {
            users
                .iter()
                .find(|r| r.get::<_, &str>(1) == n)
                .map(|r| r.get(0))
        })
        .collect();
    let members: Vec<i64> = tx
        .query(
            "SELECT user_id FROM members WHERE channel_id = $1 AND user_id = ANY($2)",
            &[&channel_id, &ids],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(ids.into_iter().filter(|id| members.contains(id)).collect())
}

/// Adds (or with `add` false, drops) the mention rows of a message at `seq` for `users`
/// but its author, with each one's unread mentions when the message is above their read
/// marker.
async fn mention(
    tx: &Client,
    channel_id: i64,
    seq: i64,
    message_id: i64,
    author: i64,
    users: &[i64],
    add: bool,
) -> std::result::Result<(), Fail> {
    let users: Vec<i64> = users.iter().copied().filter(|&u| u != author).collect();
    if users.is_empty() {
        return Ok(());
    }
    let changed: Vec<i64> = if add {
        tx.query(
            "INSERT INTO mentions (user_id, message_id, channel_id, seq)
             SELECT u, $2, $3, $4 FROM unnest($1::bigint[]) AS u
             ON CONFLICT DO NOTHING RETURNING user_id",
            &[&users, &message_id, &channel_id, &seq],
        )
        .await?
    } else {
        tx.query(
            "DELETE FROM mentions WHERE message_id = $2 AND user_id = ANY($1) RETURNING user_id",
            &[&users, &message_id],
        )
        .await?
    }
    .iter()
    .map(|r| r.get(0))
    .collect();
    tx.execute(
        "UPDATE members SET mention_unread = mention_unread + $4
         WHERE channel_id = $1 AND user_id = ANY($2) AND read_seq < $3",
        &[&channel_id, &changed, &seq, &if add { 1i64 } else { -1 }],
    )
    .await?;
    Ok(())
}

/// Adds or takes back a reaction, keeping `reaction_counts` in step, as the SQLite
/// backend does; `Changed(false)` when there was nothing to do.
async fn react(
    tx: &Client,
    shared: &Shared,
    j: &mut Vec<Event>,
    now: i64,
    (actor, channel_id, message_id): (i64, i64, i64),
    emoji: &str,
    add: bool,
) -> std::result::Result<Done, Fail> {
    membership(tx, channel_id, actor).await?;
    let found = message(tx, channel_id, message_id).await?;
    let has = tx
        .query_opt(
            "SELECT 1 FROM reactions WHERE message_id = $1 AND user_id = $2 AND emoji = $3",
            &[&message_id, &actor, &emoji],
        )
        .await?
        .is_some();
    let counts = tx
        .query_one(
            "SELECT count(*), coalesce(bool_or(emoji = $2), false) FROM reaction_counts WHERE message_id = $1",
            &[&message_id, &emoji],
        )
        .await?;
    let (distinct, known): (i64, bool) = (counts.get(0), counts.get(1));
    rules::react(
        &shared.rules,
        found.as_ref(),
        add,
        !known,
        u32::try_from(distinct).unwrap_or(u32::MAX),
    )?;
    if add == has {
        return Ok(Done::Changed(false));
    }
    let record = if add {
        EventBody::ReactionAdded {
            message_id,
            user_id: actor,
            emoji: emoji.to_owned(),
        }
    } else {
        EventBody::ReactionRemoved {
            message_id,
            user_id: actor,
            emoji: emoji.to_owned(),
        }
    };
    // The event's seq orders the emoji of a message and its reactors (times may tie).
    let seq = append_event(
        tx,
        j,
        record,
        channel_id,
        now,
        Some(message_id),
        Some(actor),
        Some(emoji),
    )
    .await?;
    if add {
        tx.execute(
            "INSERT INTO reactions (message_id, user_id, emoji, channel_id, seq, at) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&message_id, &actor, &emoji, &channel_id, &seq, &now],
        )
        .await?;
        tx.execute(
            "INSERT INTO reaction_counts (message_id, emoji, count, first_seq) VALUES ($1, $2, 1, $3)
             ON CONFLICT (message_id, emoji) DO UPDATE SET count = reaction_counts.count + 1",
            &[&message_id, &emoji, &seq],
        )
        .await?;
    } else {
        tx.execute(
            "DELETE FROM reactions WHERE message_id = $1 AND user_id = $2 AND emoji = $3",
            &[&message_id, &actor, &emoji],
        )
        .await?;
        tx.execute(
            "UPDATE reaction_counts SET count = count - 1 WHERE message_id = $1 AND emoji = $2",
            &[&message_id, &emoji],
        )
        .await?;
        tx.execute(
            "DELETE FROM reaction_counts WHERE message_id = $1 AND emoji = $2 AND count <= 0",
            &[&message_id, &emoji],
        )
        .await?;
    }
    Ok(Done::Changed(true))
}

async fn existing(tx: &Client, id: i64) -> std::result::Result<Channel, Fail> {
    Ok(read::channel(tx, id).await?.ok_or(StoreError::NotFound)?)
}

async fn message(
    tx: &Client,
    channel_id: i64,
    message_id: i64,
) -> std::result::Result<Option<Message>, Fail> {
    let row = tx
        .query_opt(MESSAGE_BY_ID, &[&message_id, &channel_id])
        .await?;
    Ok(row.as_ref().map(read::message_row))
}

/// The channel's kind and the user's role; `NotFound` for non-members.
/// A deleted account leaves the channel (not a DM): its webhooks and subscriptions here
/// go, and an owner's role passes to the first admin, else the first member.
async fn depart(
    tx: &Client,
    j: &mut Vec<Event>,
    now: i64,
    user_id: i64,
    channel_id: i64,
    leaving: &[i64],
) -> std::result::Result<Done, Fail> {
    let row = tx
        .query_opt(
            "SELECT c.kind, m.role FROM members m JOIN channels c ON c.id = m.channel_id
             WHERE m.channel_id = $1 AND m.user_id = $2 FOR UPDATE OF m",
            &[&channel_id, &user_id],
        )
        .await?;
    let Some(row) = row else {
        return Ok(Done::Changed(false));
    };
    let kind = read::parse_kind(row.get(0))?;
    let role = read::parse_role(row.get(1))?;
    if kind == ChannelKind::Dm {
        return Ok(Done::Changed(false));
    }
    tx.execute(
        "DELETE FROM subscriptions WHERE channel_id = $1 AND creator_id = $2",
        &[&channel_id, &user_id],
    )
    .await?;
    tx.execute(
        "DELETE FROM incoming_webhooks WHERE channel_id = $1 AND (creator_id = $2 OR bot_id = $2)",
        &[&channel_id, &user_id],
    )
    .await?;
    if role == Role::Owner {
        // The first admin, else member, by id, not deleted with it.
        let heir = tx
            .query_opt(
                "SELECT user_id FROM members WHERE channel_id = $1 AND user_id != $2
                   AND user_id != ALL($3)
                 ORDER BY role = 'admin' DESC, user_id LIMIT 1",
                &[&channel_id, &user_id, &leaving],
            )
            .await?;
        if let Some(heir) = heir {
            let heir: i64 = heir.get(0);
            tx.execute(
                "UPDATE members SET role = 'owner' WHERE channel_id = $1 AND user_id = $2",
                &[&channel_id, &heir],
            )
            .await?;
            tx.execute(
                "UPDATE channels SET owner_id = $2 WHERE id = $1",
                &[&channel_id, &heir],
            )
            .await?;
            append_event(
                tx,
                j,
                EventBody::MemberUpdated {
                    user_id: heir,
                    role: Role::Owner,
                },
                channel_id,
                now,
                None,
                Some(heir),
                Some(Role::Owner.as_str()),
            )
            .await?;
        }
    }
    tx.execute(
        "DELETE FROM members WHERE channel_id = $1 AND user_id = $2",
        &[&channel_id, &user_id],
    )
    .await?;
    outbox(tx, user_id, channel_id, false, now).await?;
    append_event(
        tx,
        j,
        EventBody::MemberRemoved { user_id },
        channel_id,
        now,
        None,
        Some(user_id),
        None,
    )
    .await?;
    Ok(Done::Changed(true))
}

async fn membership(
    tx: &Client,
    channel_id: i64,
    user_id: i64,
) -> std::result::Result<(ChannelKind, Role), Fail> {
    let row = tx
        .query_opt(
            "SELECT c.kind, m.role FROM members m JOIN channels c ON c.id = m.channel_id
             WHERE m.channel_id = $1 AND m.user_id = $2",
            &[&channel_id, &user_id],
        )
        .await?;
    let row = rules::member(row)?;
    Ok((read::parse_kind(row.get(0))?, read::parse_role(row.get(1))?))
}

async fn role_of(
    tx: &Client,
    channel_id: i64,
    user_id: i64,
) -> std::result::Result<Option<Role>, Fail> {
    let row = tx
        .query_opt(
            "SELECT role FROM members WHERE channel_id = $1 AND user_id = $2",
            &[&channel_id, &user_id],
        )
        .await?;
    row.map(|r| read::parse_role(r.get(0))).transpose()
}

/// Adds a member with a `member.added` event (read marker at that event) and records the
/// change in the outbox for shard 0's index.
async fn add_member(
    tx: &Client,
    j: &mut Vec<Event>,
    channel_id: i64,
    user_id: i64,
    role: Role,
    at: i64,
) -> std::result::Result<(), Fail> {
    let seq = append_event(
        tx,
        j,
        EventBody::MemberAdded { user_id, role },
        channel_id,
        at,
        None,
        Some(user_id),
        Some(role.as_str()),
    )
    .await?;
    tx.execute(
        "INSERT INTO members (channel_id, user_id, role, read_seq, live_read, own_unread)
         SELECT $1, $2, $3, $4, live_messages, 0 FROM channels WHERE id = $1",
        &[&channel_id, &user_id, &role.as_str(), &seq],
    )
    .await?;
    outbox(tx, user_id, channel_id, true, at).await
}

async fn outbox(
    tx: &Client,
    user_id: i64,
    channel_id: i64,
    joined: bool,
    at: i64,
) -> std::result::Result<(), Fail> {
    tx.execute(
        "INSERT INTO outbox (user_id, channel_id, joined, created_at) VALUES ($1, $2, $3, $4)",
        &[&user_id, &channel_id, &joined, &at],
    )
    .await?;
    Ok(())
}

/// Appends an event with the channel's next seq (the row lock is held to commit, so seq
/// order is commit order) and returns the seq.
#[allow(clippy::too_many_arguments)]
async fn append_event(
    tx: &Client,
    journal: &mut Vec<Event>,
    record: EventBody,
    channel_id: i64,
    at: i64,
    message_id: Option<i64>,
    user_id: Option<i64>,
    body: Option<&str>,
) -> std::result::Result<i64, Fail> {
    let seq: i64 = tx
        .query_one(
            "UPDATE channels SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq",
            &[&channel_id],
        )
        .await?
        .get(0);
    tx.execute(
        "INSERT INTO events (channel_id, seq, kind, at, message_id, user_id, body) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[&channel_id, &seq, &record.kind(), &at, &message_id, &user_id, &body],
    )
    .await?;
    journal.push(Event {
        channel_id,
        seq,
        at,
        body: record,
    });
    Ok(seq)
}
