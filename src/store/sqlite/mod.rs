//! The embedded backend: one SQLite file in WAL mode with `synchronous=FULL`. Writes go
//! through the group-commit [`writer`]; reads through a pool of read-only connections.

pub mod backup;
mod checkpoint;
mod hot;
mod index;
mod read;
mod schema;
mod seen;
mod tail;
mod write;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::Context;
use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags};

use self::checkpoint::Checkpointer;
use self::hot::Hot;
use self::index::SearchIndex;
pub use self::index::index_path;
use self::read::ReadPool;
pub use self::tail::FOLD_ROWS;
use self::tail::{Tail, Unfolded};
use self::write::{Done, Op, SecurityOp};
pub use self::writer::WriteStats;
use self::writer::{Writer, WriterParts};
use super::{
    Accounts, ApiKeyInfo, Backend, Channels, CollectedUploads, DeletedAccount, DeliveryReport,
    Files, Health, IncomingWebhook, KeyAuth, NewApiKey, NewIncomingWebhook, NewSession,
    NewSubscription, NewUpload, Posted, ReadFence, Result, SearchQuery, Security, SessionAuth,
    SessionInfo, StoreError, Subscription, SubscriptionChange, TokenHash, TwoFactor,
};
use crate::model::{
    Channel, ChannelKind, ChannelView, Event, HistoryQuery, Member, Message, Page, ProfileChange,
    ReactionCount, Reactor, Role, Upload, User,
};

/// How to open a [`SqliteStore`].
#[derive(Clone)]
pub struct SqliteOptions {
    /// The database file; created with its directory if missing.
    pub path: PathBuf,
    /// Snowflake node id (0–1023).
    pub node_id: u16,
    /// Writes that may wait for the writer before new ones are refused as overloaded.
    pub write_queue: usize,
    /// Read-only connections in the pool.
    pub read_connections: usize,
    /// Receives every committed event, in commit order (the real-time fan-out).
    pub on_commit: Option<super::OnCommit>,
    /// The writer's counters (shared with `/metrics`).
    pub stats: Arc<WriteStats>,
    /// The per-user bounds writes keep.
    pub rules: crate::store::Rules,
    /// Free bytes kept on the data directory's disk: below it, writes are refused.
    pub disk_reserve: u64,
    /// Bytes the WAL file is truncated to after a checkpoint empties it.
    pub wal_limit: u64,
    /// Posts in the commit log past which the writer folds it ([`tail`]).
    pub fold_rows: usize,
}

impl SqliteOptions {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            node_id: 0,
            write_queue: 16_384,
            read_connections: 4,
            on_commit: None,
            stats: Arc::default(),
            rules: crate::store::Rules::default(),
            disk_reserve: 0,
            wal_limit: 64 << 20,
            fold_rows: FOLD_ROWS,
        }
    }
}

pub struct SqliteStore {
    writer: Writer,
    stats: Arc<WriteStats>,
    reads: Arc<ReadPool>,
    /// Posts committed to the commit log and not yet folded: merged into every log read.
    tail: Arc<Tail>,
    search_budget: std::time::Duration,
    /// The search index's thread (`index.rs`).
    index: Arc<SearchIndex>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    checkpointer: Mutex<Option<Checkpointer>>,
}

/// The least a search waits for the index to take what was acknowledged before it (it
/// waits as long as its budget when that is longer): the budget bounds the search's own
/// reading, and the index thread's pass is not that.
const INDEX_WAIT_AT_LEAST: std::time::Duration = std::time::Duration::from_secs(1);

/// Page cache of the writer's connection and of each reader's.
const WRITER_CACHE_KIB: i64 = 64 * 1024;
const READER_CACHE_KIB: i64 = 16 * 1024;

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database and starts the writer.
    pub fn open(opts: &SqliteOptions) -> anyhow::Result<Self> {
        if let Some(dir) = opts.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("create data directory {}: {e}", dir.display()))?;
        }
        let dir = opts.path.parent().unwrap_or(Path::new("."));
        // Say at once, in one line, when the disk is why writes will be refused.
        checkpoint::check_disk(dir, &opts.stats, opts.disk_reserve);
        let mut conn = Connection::open(&opts.path)
            .map_err(|e| anyhow::anyhow!("open database {}: {e}", opts.path.display()))?;
        let prepared = schema::configure(&conn, WRITER_CACHE_KIB)
            .map_err(anyhow::Error::from)
            .and_then(|()| schema::migrate(&mut conn))
            .and_then(|()| {
                conn.pragma_update(None, "journal_size_limit", opts.wal_limit as i64)?;
                // Checkpoints run on their own thread, never inside the writer's commits.
                conn.pragma_update(None, "wal_autocheckpoint", 0)?;
                let folded = tail::fold_all(&mut conn)?;
                if folded > 0 {
                    tracing::info!(rows = folded, "folded the commit log the previous run left");
                }
                Ok(())
            });
        if let Err(e) = prepared {
            let free = crate::process::disk_space(dir).map_or(0, |(free, _)| free);
            if free < 1 << 20 {
                anyhow::bail!(
                    "open database {}: {e}; its disk has {free} bytes free: free some space and start again",
                    opts.path.display()
                );
            }
            return Err(e);
        }
        let checkpointer = Checkpointer::start(
            &opts.path,
            opts.wal_limit,
            Arc::clone(&opts.stats),
            opts.disk_reserve,
        )?;
        // Before the readers: they attach its file.
        let index = Arc::new(SearchIndex::open(&opts.path)?);
        let reads = (0..opts.read_connections.max(1))
            .map(|_| open_reader(&opts.path))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Ids continue above every stored one, even if the clock stepped back since.
        let last_id: i64 = conn.query_row(
            "SELECT max(coalesce((SELECT max(id) FROM users), 0),
                        coalesce((SELECT max(id) FROM channels), 0),
                        coalesce((SELECT max(id) FROM messages), 0))",
            [],
            |r| r.get(0),
        )?;
        let mut ids = crate::id::Snowflake::new(opts.node_id);
        ids.resume_after(last_id);
        let tail = Arc::new(Tail::default());
        let folded = tail::folded_through(&conn)?;
        let parts = WriterParts {
            conn,
            ids,
            on_commit: opts.on_commit.clone(),
            stats: Arc::clone(&opts.stats),
            rules: opts.rules,
            hot: Hot::new(
                Unfolded::new(Arc::clone(&tail), opts.fold_rows, folded),
                seen::Seen::start(&opts.path),
            ),
            index: index.signal(),
            wal: (wal_path(&opts.path), opts.wal_limit),
        };
        let (writer, handle) = Writer::start(parts, opts.write_queue);
        Ok(Self {
            writer,
            stats: Arc::clone(&opts.stats),
            reads: ReadPool::new(reads),
            tail,
            search_budget: opts.rules.search_budget,
            index,
            writer_thread: Mutex::new(Some(handle)),
            checkpointer: Mutex::new(Some(checkpointer)),
        })
    }

    /// Takes the writer and checkpoint threads, to be joined once the writer stopped.
    fn take_threads(&self) -> (Option<JoinHandle<()>>, Option<Checkpointer>) {
        let writer = self
            .writer_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let checkpointer = self
            .checkpointer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        (writer, checkpointer)
    }

    /// Runs `f` if `user_id` is a member of the channel, else `NotFound`: the check and the
    /// read take one trip to the read pool.
    async fn member_read<T, F>(&self, user_id: i64, channel_id: i64, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.reads
            .run(move |c| {
                if read::member_channel(c, channel_id, user_id)?.is_none() {
                    return Ok(None);
                }
                f(c).map(Some)
            })
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// [`SqliteStore::member_read`] for what only the channel's owner and admins read
    /// (its webhooks), with the same read's membership.
    async fn manager_read<T, F>(&self, actor: i64, channel_id: i64, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (membership, found) = self
            .reads
            .run(move |c| Ok((read::member_channel(c, channel_id, actor)?, f(c)?)))
            .await?;
        super::rules::manage_webhooks(membership.map(|(c, role)| (c.kind, role)))?;
        Ok(found)
    }

    async fn write(&self, op: Op) -> Result<Done> {
        self.writer.submit(op).await
    }

    /// Waits, for at most `within`, until the search index holds every message
    /// acknowledged so far in `channels`: their posts still in the commit log are folded
    /// (so queued for the index) first. Whether it does; `false` also when the fold
    /// failed (full disk, overload).
    async fn index_through(&self, channels: Vec<i64>, within: std::time::Duration) -> Result<bool> {
        let mut folded = true;
        if self.tail.holds_any(&channels)
            && let Err(e) = self.write(Op::Fold { channels }).await
        {
            // What was queued before is still waited for.
            tracing::debug!(error = %e, "the posts not folded yet are not in the index");
            folded = false;
        }
        let end = self.reads.run(index::queue_end).await?;
        Ok(self.index.caught_up(end, within).await && folded)
    }
}

/// Applies missing migrations to the database at `path` (created if missing) without
/// starting a writer: what `natter migrate` does. Says what it did.
pub fn migrate_only(path: &Path) -> anyhow::Result<String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut conn = Connection::open(path)
        .map_err(|e| anyhow::anyhow!("open database {}: {e}", path.display()))?;
    schema::configure(&conn, READER_CACHE_KIB)?;
    let before: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    schema::migrate(&mut conn)?;
    Ok(format!(
        "{}: schema version {before} -> {}",
        path.display(),
        schema::VERSION
    ))
}

/// Folds the commit log of the (stopped) database at `path` into its channel tables, as
/// the next start would; returns the posts it moved. For tools and tests that read the
/// file directly.
pub fn fold_commit_log(path: &Path) -> anyhow::Result<usize> {
    let mut conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(|e| anyhow::anyhow!("open database {}: {e}", path.display()))?;
    schema::configure(&conn, READER_CACHE_KIB)?;
    Ok(tail::fold_all(&mut conn)?)
}

/// The WAL file of the database at `path`.
fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    name.into()
}

fn open_reader(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    schema::configure(&conn, READER_CACHE_KIB)?;
    let index = index_path(path);
    conn.execute(
        "ATTACH DATABASE ?1 AS search",
        [index
            .to_str()
            .context("the search index's path is not UTF-8")?],
    )?;
    Ok(conn)
}

fn unexpected(done: Done) -> StoreError {
    let what = match done {
        Done::User(_) => "user",
        Done::Channel(_) => "channel",
        Done::Dm(..) => "dm",
        Done::Posted(_) => "posted",
        Done::Message(_) => "message",
        Done::Count(_) => "count",
        Done::Tokens(_) => "tokens",
        Done::Deleted(_) => "deleted",
        Done::ApiKey(_) => "API key",
        Done::Upload(_) => "upload",
        Done::Collected(_) => "collected uploads",
        Done::Webhook(_) => "webhook",
        Done::Subscription(_) => "subscription",
        Done::DeletedKey(_) => "deleted key",
        Done::Changed(_) => "changed",
        Done::Unit => "unit",
    };
    StoreError::internal("match writer answer", format!("unexpected answer {what}"))
}

fn unit(done: Done) -> Result<()> {
    match done {
        Done::Unit => Ok(()),
        other => Err(unexpected(other)),
    }
}

#[async_trait]
impl Backend for SqliteStore {
    async fn close(&self) {
        self.writer.stop().await;
        let (writer, checkpointer) = self.take_threads();
        // The writer thread ends at once now; the checkpointer finishes its last pass, and
        // the index thread its current transaction.
        let index = Arc::clone(&self.index);
        let joined = tokio::task::spawn_blocking(move || {
            if let Some(h) = writer {
                let _ = h.join();
            }
            if let Some(c) = checkpointer {
                c.stop();
            }
            index.stop();
        });
        let _ = joined.await;
    }

    async fn maintain(&self, now: i64) -> Result<String> {
        let n = self.purge_sessions(now).await?;
        Ok(format!("purged {n} expired sessions"))
    }

    fn health(&self) -> Health {
        Health {
            disk_full: self.stats.disk.refused(),
            writes_ended: self.writer.ended(),
            parts: Vec::new(),
        }
    }

    fn render_metrics(&self, out: &mut String) {
        self.stats.render(out);
        self.index.render(out);
    }

    async fn search_caught_up(&self, within: std::time::Duration) -> bool {
        self.index_through(self.tail.channels(), within)
            .await
            .unwrap_or(false)
    }
}

#[async_trait]
impl Accounts for SqliteStore {
    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        session: Option<NewSession>,
    ) -> Result<User> {
        let op = Op::CreateUser {
            username: username.to_owned(),
            password_hash: password_hash.to_owned(),
            session,
        };
        match self.write(op).await? {
            Done::User(u) => Ok(u),
            other => Err(unexpected(other)),
        }
    }

    async fn user(&self, id: i64) -> Result<Option<User>> {
        self.reads.run(move |c| read::user(c, id)).await
    }

    async fn user_by_username(&self, username: &str) -> Result<Option<User>> {
        let name = username.to_owned();
        self.reads
            .run(move |c| read::user_by_username(c, &name))
            .await
    }

    async fn credentials(&self, username: &str) -> Result<Option<(User, String)>> {
        let name = username.to_owned();
        self.reads.run(move |c| read::credentials(c, &name)).await
    }

    async fn create_session(&self, user_id: i64, session: NewSession) -> Result<Vec<TokenHash>> {
        match self.write(Op::CreateSession { user_id, session }).await? {
            Done::Tokens(evicted) => Ok(evicted),
            other => Err(unexpected(other)),
        }
    }

    async fn session_user(&self, token: TokenHash, now: i64) -> Result<Option<SessionAuth>> {
        self.reads
            .run(move |c| read::session_user(c, &token, now))
            .await
    }

    async fn update_profile(&self, user_id: i64, change: ProfileChange) -> Result<User> {
        match self.write(Op::UpdateProfile { user_id, change }).await? {
            Done::User(u) => Ok(u),
            other => Err(unexpected(other)),
        }
    }

    async fn record_last_seen(&self, seen: &[(i64, i64)]) -> Result<()> {
        unit(
            self.write(Op::LastSeen {
                seen: seen.to_vec(),
            })
            .await?,
        )
    }

    async fn last_seen(&self, users: &[i64]) -> Result<Vec<(i64, i64)>> {
        let users = users.to_vec();
        self.reads
            .run(move |c| {
                let mut read = c.prepare_cached(
                    "SELECT last_seen_at FROM users WHERE id = ?1 AND last_seen_at IS NOT NULL",
                )?;
                let mut seen = Vec::new();
                for user in users {
                    if let Some(at) =
                        rusqlite::OptionalExtension::optional(read.query_row([user], |r| r.get(0)))?
                    {
                        seen.push((user, at));
                    }
                }
                Ok(seen)
            })
            .await
    }

    async fn touch_session(&self, token: TokenHash, now: i64) -> Result<()> {
        unit(self.write(Op::TouchSession { token, now }).await?)
    }

    async fn sessions(&self, user_id: i64, now: i64) -> Result<Vec<SessionInfo>> {
        self.reads
            .run(move |c| read::sessions(c, user_id, now))
            .await
    }

    async fn delete_session_by_id(
        &self,
        user_id: i64,
        session_id: i64,
    ) -> Result<Option<TokenHash>> {
        match self
            .write(Op::DeleteSessionById {
                user_id,
                session_id,
            })
            .await?
        {
            Done::Tokens(t) => Ok(t.into_iter().next()),
            other => Err(unexpected(other)),
        }
    }

    async fn delete_other_sessions(&self, user_id: i64, keep: TokenHash) -> Result<Vec<TokenHash>> {
        match self
            .write(Op::DeleteOtherSessions { user_id, keep })
            .await?
        {
            Done::Tokens(t) => Ok(t),
            other => Err(unexpected(other)),
        }
    }

    async fn purge_sessions(&self, now: i64) -> Result<u64> {
        match self.write(Op::PurgeSessions { now }).await? {
            Done::Count(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    async fn delete_session(&self, token: TokenHash) -> Result<()> {
        unit(self.write(Op::DeleteSession { token }).await?)
    }

    async fn create_bot(&self, owner: i64, username: &str) -> Result<User> {
        let op = Op::CreateBot {
            owner,
            username: username.to_owned(),
        };
        match self.write(op).await? {
            Done::User(u) => Ok(u),
            other => Err(unexpected(other)),
        }
    }

    async fn bots(&self, owner: i64) -> Result<Vec<User>> {
        self.reads.run(move |c| read::bots(c, owner)).await
    }

    async fn create_api_key(&self, owner: i64, key: NewApiKey) -> Result<ApiKeyInfo> {
        match self.write(Op::CreateApiKey { owner, key }).await? {
            Done::ApiKey(k) => Ok(k),
            other => Err(unexpected(other)),
        }
    }

    async fn api_keys(&self, owner: i64) -> Result<Vec<ApiKeyInfo>> {
        self.reads.run(move |c| read::api_keys(c, owner)).await
    }

    async fn delete_api_key(&self, owner: i64, id: i64) -> Result<Option<(i64, TokenHash)>> {
        match self.write(Op::DeleteApiKey { owner, id }).await? {
            Done::DeletedKey(k) => Ok(k),
            other => Err(unexpected(other)),
        }
    }

    async fn key_user(&self, token: TokenHash, now: i64) -> Result<Option<KeyAuth>> {
        self.reads
            .run(move |c| read::key_user(c, &token, now))
            .await
    }

    async fn touch_api_key(&self, token: TokenHash, now: i64) -> Result<()> {
        unit(self.write(Op::TouchApiKey { token, now }).await?)
    }
}

impl SqliteStore {
    async fn security(&self, op: SecurityOp) -> Result<bool> {
        match self.write(Op::Security(op)).await? {
            Done::Changed(changed) => Ok(changed),
            Done::Unit => Ok(true),
            other => Err(unexpected(other)),
        }
    }
}

#[async_trait]
impl Security for SqliteStore {
    async fn two_factor(&self, user_id: i64) -> Result<Option<TwoFactor>> {
        self.reads
            .run(move |c| {
                rusqlite::OptionalExtension::optional(
                    c.prepare_cached(
                        "SELECT secret, enabled, last_step,
                                (SELECT count(*) FROM recovery_codes WHERE user_id = ?1)
                         FROM two_factor WHERE user_id = ?1",
                    )?
                    .query_row([user_id], |r| {
                        Ok(TwoFactor {
                            secret: r.get(0)?,
                            enabled: r.get(1)?,
                            last_step: r.get(2)?,
                            recovery_codes: r.get(3)?,
                        })
                    }),
                )
            })
            .await
    }

    async fn begin_two_factor(&self, user_id: i64, secret: Vec<u8>) -> Result<bool> {
        self.security(SecurityOp::Begin { user_id, secret }).await
    }

    async fn enable_two_factor(
        &self,
        user_id: i64,
        secret: Vec<u8>,
        step: i64,
        recovery_codes: Vec<TokenHash>,
    ) -> Result<bool> {
        self.security(SecurityOp::Enable {
            user_id,
            secret,
            step,
            codes: recovery_codes,
        })
        .await
    }

    async fn use_code_step(&self, user_id: i64, step: i64) -> Result<bool> {
        self.security(SecurityOp::UseStep { user_id, step }).await
    }

    async fn use_recovery_code(&self, user_id: i64, code: TokenHash) -> Result<bool> {
        self.security(SecurityOp::UseRecoveryCode { user_id, code })
            .await
    }

    async fn replace_recovery_codes(&self, user_id: i64, codes: Vec<TokenHash>) -> Result<bool> {
        self.security(SecurityOp::ReplaceRecoveryCodes { user_id, codes })
            .await
    }

    async fn disable_two_factor(&self, user_id: i64) -> Result<()> {
        self.security(SecurityOp::Disable { user_id })
            .await
            .map(drop)
    }

    async fn delete_account(&self, user_id: i64) -> Result<DeletedAccount> {
        match self
            .write(Op::Security(SecurityOp::DeleteAccount { user_id }))
            .await?
        {
            Done::Deleted(deleted) => Ok(deleted),
            other => Err(unexpected(other)),
        }
    }

    async fn depart(&self, user_id: i64, channel_id: i64, leaving: &[i64]) -> Result<bool> {
        let op = Op::Depart {
            user_id,
            channel_id,
            leaving: leaving.to_vec(),
        };
        match self.write(op).await? {
            Done::Changed(changed) => Ok(changed),
            other => Err(unexpected(other)),
        }
    }

    async fn departed(&self, users: &[i64]) -> Result<()> {
        let users = users.to_vec();
        self.security(SecurityOp::Departed { users })
            .await
            .map(drop)
    }

    async fn departing(&self) -> Result<Vec<i64>> {
        self.reads
            .run(|c| {
                c.prepare_cached(
                    "SELECT id FROM users WHERE deleted_at IS NOT NULL AND departed_at IS NULL",
                )?
                .query_map([], |r| r.get(0))?
                .collect()
            })
            .await
    }

    async fn change_password(
        &self,
        user_id: i64,
        password_hash: &str,
        keep: TokenHash,
    ) -> Result<Vec<TokenHash>> {
        let op = SecurityOp::ChangePassword {
            user_id,
            password_hash: password_hash.to_owned(),
            keep,
        };
        match self.write(Op::Security(op)).await? {
            Done::Tokens(ended) => Ok(ended),
            other => Err(unexpected(other)),
        }
    }
}

#[async_trait]
impl Files for SqliteStore {
    async fn create_upload(&self, upload: NewUpload) -> Result<Upload> {
        match self.write(Op::CreateUpload { upload }).await? {
            Done::Upload(u) => Ok(u),
            other => Err(unexpected(other)),
        }
    }

    async fn upload(&self, id: i64) -> Result<Option<Upload>> {
        self.reads.run(move |c| read::upload(c, id)).await
    }

    async fn upload_channels(&self, id: i64) -> Result<Vec<i64>> {
        self.reads.run(move |c| read::upload_channels(c, id)).await
    }

    async fn upload_bytes(&self, owner: i64) -> Result<i64> {
        self.reads.run(move |c| read::upload_bytes(c, owner)).await
    }

    async fn collect_uploads(
        &self,
        before: i64,
        after: i64,
        limit: u32,
    ) -> Result<CollectedUploads> {
        let op = Op::CollectUploads {
            before,
            after,
            limit,
        };
        match self.write(op).await? {
            Done::Collected(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    async fn blob_in_use(&self, sha256: &str) -> Result<bool> {
        let sha256 = sha256.to_owned();
        self.reads.run(move |c| read::blob_in_use(c, &sha256)).await
    }
}

#[async_trait]
impl Channels for SqliteStore {
    async fn create_channel(
        &self,
        owner: i64,
        kind: ChannelKind,
        name: &str,
        members: &[i64],
    ) -> Result<Channel> {
        let op = Op::CreateChannel {
            owner,
            kind,
            name: name.to_owned(),
            members: members.to_vec(),
        };
        match self.write(op).await? {
            Done::Channel(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    async fn open_dm(&self, user: i64, peer: i64) -> Result<(Channel, bool)> {
        match self.write(Op::OpenDm { user, peer }).await? {
            Done::Dm(c, created) => Ok((c, created)),
            other => Err(unexpected(other)),
        }
    }

    async fn rename_channel(&self, actor: i64, channel_id: i64, name: &str) -> Result<Channel> {
        match self
            .write(Op::RenameChannel {
                actor,
                channel_id,
                name: name.to_owned(),
            })
            .await?
        {
            Done::Channel(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    async fn channel(&self, channel_id: i64, user_id: i64) -> Result<Option<(Channel, Role)>> {
        let tail = Arc::clone(&self.tail);
        self.reads
            .run(move |c| read::member_channel_now(c, &tail, channel_id, user_id))
            .await
    }

    async fn channels(&self, user_id: i64) -> Result<Vec<ChannelView>> {
        let tail = Arc::clone(&self.tail);
        self.reads
            .run(move |c| read::channels(c, &tail, user_id))
            .await
    }

    async fn create_incoming_webhook(
        &self,
        actor: i64,
        channel_id: i64,
        hook: NewIncomingWebhook,
    ) -> Result<IncomingWebhook> {
        let op = Op::CreateIncomingWebhook {
            actor,
            channel_id,
            hook,
        };
        match self.write(op).await? {
            Done::Webhook(w) => Ok(w),
            other => Err(unexpected(other)),
        }
    }

    async fn incoming_webhooks(&self, actor: i64, channel_id: i64) -> Result<Vec<IncomingWebhook>> {
        self.manager_read(actor, channel_id, move |c| {
            read::incoming_webhooks(c, channel_id)
        })
        .await
    }

    async fn delete_incoming_webhook(&self, actor: i64, channel_id: i64, id: i64) -> Result<bool> {
        let op = Op::DeleteIncomingWebhook {
            actor,
            channel_id,
            id,
        };
        match self.write(op).await? {
            Done::Changed(deleted) => Ok(deleted),
            other => Err(unexpected(other)),
        }
    }

    async fn incoming_webhook(
        &self,
        channel_id: i64,
        token: TokenHash,
    ) -> Result<Option<IncomingWebhook>> {
        self.reads
            .run(move |c| read::incoming_webhook(c, channel_id, &token))
            .await
    }

    async fn create_subscription(
        &self,
        actor: i64,
        channel_id: i64,
        sub: NewSubscription,
    ) -> Result<Subscription> {
        let op = Op::CreateSubscription {
            actor,
            channel_id,
            sub,
        };
        match self.write(op).await? {
            Done::Subscription(Some(s)) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    async fn subscriptions(&self, actor: i64, channel_id: i64) -> Result<Vec<Subscription>> {
        self.manager_read(actor, channel_id, move |c| {
            read::subscriptions(c, channel_id)
        })
        .await
    }

    async fn update_subscription(
        &self,
        actor: i64,
        channel_id: i64,
        id: i64,
        change: SubscriptionChange,
    ) -> Result<Subscription> {
        let op = Op::UpdateSubscription {
            actor,
            channel_id,
            id,
            change,
        };
        match self.write(op).await? {
            Done::Subscription(Some(s)) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    async fn delete_subscription(&self, actor: i64, channel_id: i64, id: i64) -> Result<bool> {
        let op = Op::DeleteSubscription {
            actor,
            channel_id,
            id,
        };
        match self.write(op).await? {
            Done::Changed(deleted) => Ok(deleted),
            other => Err(unexpected(other)),
        }
    }

    async fn due_subscriptions(
        &self,
        node: &str,
        now: i64,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Subscription>> {
        let node = node.to_owned();
        self.reads
            .run(move |c| read::due_subscriptions(c, &node, now, after, limit))
            .await
    }

    async fn claim_subscription(
        &self,
        channel_id: i64,
        id: i64,
        node: &str,
        now: i64,
        until: i64,
    ) -> Result<Option<Subscription>> {
        let op = Op::ClaimSubscription {
            channel_id,
            id,
            node: node.to_owned(),
            now,
            until,
        };
        match self.write(op).await? {
            Done::Subscription(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    async fn record_delivery(
        &self,
        channel_id: i64,
        id: i64,
        node: &str,
        now: i64,
        report: DeliveryReport,
    ) -> Result<bool> {
        let op = Op::RecordDelivery {
            channel_id,
            id,
            node: node.to_owned(),
            now,
            report,
        };
        match self.write(op).await? {
            Done::Changed(done) => Ok(done),
            other => Err(unexpected(other)),
        }
    }

    async fn members(&self, user_id: i64, channel_id: i64) -> Result<Vec<Member>> {
        self.member_read(user_id, channel_id, move |c| read::members(c, channel_id))
            .await
    }

    async fn put_member(
        &self,
        actor: i64,
        channel_id: i64,
        user_id: i64,
        role: Option<Role>,
    ) -> Result<()> {
        unit(
            self.write(Op::PutMember {
                actor,
                channel_id,
                user_id,
                role,
            })
            .await?,
        )
    }

    async fn remove_member(&self, actor: i64, channel_id: i64, user_id: i64) -> Result<()> {
        unit(
            self.write(Op::RemoveMember {
                actor,
                channel_id,
                user_id,
            })
            .await?,
        )
    }

    async fn mark_read(&self, user_id: i64, channel_id: i64, seq: i64) -> Result<()> {
        unit(
            self.write(Op::MarkRead {
                user_id,
                channel_id,
                seq,
            })
            .await?,
        )
    }

    async fn post_message(
        &self,
        author: i64,
        channel_id: i64,
        text: &str,
        client_id: Option<&str>,
    ) -> Result<Posted> {
        // A text that may mention someone is resolved by the slow path; the rest is hot.
        let op = if crate::username::mentions(text).is_empty() {
            Op::PostMessage {
                author,
                channel_id,
                text: text.to_owned(),
                client_id: client_id.map(str::to_owned),
            }
        } else {
            Op::PostSlow {
                author,
                channel_id,
                root_id: None,
                text: text.to_owned(),
                client_id: client_id.map(str::to_owned),
                files: Vec::new(),
                attach_since: 0,
            }
        };
        match self.write(op).await? {
            Done::Posted(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    async fn post_reply(
        &self,
        author: i64,
        channel_id: i64,
        root_id: i64,
        text: &str,
        client_id: Option<&str>,
    ) -> Result<Posted> {
        let op = Op::PostSlow {
            author,
            channel_id,
            root_id: Some(root_id),
            text: text.to_owned(),
            client_id: client_id.map(str::to_owned),
            files: Vec::new(),
            attach_since: 0,
        };
        match self.write(op).await? {
            Done::Posted(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    async fn post_with_files(
        &self,
        author: i64,
        channel_id: i64,
        root_id: Option<i64>,
        text: &str,
        client_id: Option<&str>,
        files: &[i64],
        attach_since: i64,
    ) -> Result<Posted> {
        let op = Op::PostSlow {
            author,
            channel_id,
            root_id,
            text: text.to_owned(),
            client_id: client_id.map(str::to_owned),
            files: files.to_vec(),
            attach_since,
        };
        match self.write(op).await? {
            Done::Posted(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    async fn authored(&self, author: i64, after: i64, limit: u32) -> Result<Page<Message>> {
        // Posts still in the commit log are folded into the tables first (a second or
        // two of them at most), so the read below sees every acknowledged one.
        let unfolded = self.tail.channels();
        if !unfolded.is_empty() {
            self.write(Op::Fold { channels: unfolded }).await?;
        }
        self.reads
            .run(move |c| read::authored(c, author, after, limit))
            .await
    }

    async fn mentions(
        &self,
        user_id: i64,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Page<Message>> {
        self.reads
            .run(move |c| read::mentions(c, user_id, before, limit))
            .await
    }

    async fn sharing(&self, user_id: i64, others: &[i64]) -> Result<Vec<i64>> {
        let others = others.to_vec();
        self.reads
            .run(move |c| {
                // A DM counts once the other answered it, or if they opened it: a stranger
                // who opens a DM does not get to watch anyone.
                let mut shares = c.prepare_cached(
                    "SELECT 1 FROM members a
                     JOIN members b ON b.channel_id = a.channel_id AND b.user_id = ?2
                     JOIN channels c ON c.id = a.channel_id
                     WHERE a.user_id = ?1 AND (c.kind != 'dm' OR c.owner_id = ?2 OR c.dm_answered = 1)
                     LIMIT 1",
                )?;
                let mut found = Vec::new();
                for other in others {
                    if shares.exists(rusqlite::params![user_id, other])? {
                        found.push(other);
                    }
                }
                Ok(found)
            })
            .await
    }

    async fn search(&self, user_id: i64, query: &SearchQuery) -> Result<Page<Message>> {
        let channels = match query.channel_id {
            Some(channel_id) => {
                self.member_read(user_id, channel_id, move |_| Ok(vec![channel_id]))
                    .await?
            }
            None => {
                self.reads
                    .run(move |c| read::member_channel_ids(c, user_id))
                    .await?
            }
        };
        if channels.is_empty() {
            return Ok(Page {
                items: Vec::new(),
                has_more: false,
            });
        }
        // Wait (as long as the search's budget, a second at least) for the index to take
        // what was acknowledged in these channels. If it cannot (the writer cannot fold,
        // the index is rebuilding, its thread is failing or that far behind), the search
        // goes on with the index as it is.
        let wait = self.search_budget.max(INDEX_WAIT_AT_LEAST);
        if !self.index_through(channels.clone(), wait).await? {
            tracing::debug!("searching an index that is behind");
        }
        let (query, budget) = (query.clone(), self.search_budget);
        self.reads
            .run(move |c| read::search(c, &query, &channels, budget))
            .await?
            .ok_or(StoreError::SearchTooBroad)
    }

    async fn message(&self, channel_id: i64, message_id: i64) -> Result<Option<Message>> {
        let tail = Arc::clone(&self.tail);
        self.reads
            .run(move |c| read::message(c, &tail, channel_id, message_id))
            .await
    }

    async fn thread(
        &self,
        channel_id: i64,
        root_id: i64,
        query: HistoryQuery,
    ) -> Result<Page<Message>> {
        self.reads
            .run(move |c| read::thread(c, channel_id, root_id, query))
            .await
    }

    async fn edit_message(
        &self,
        actor: i64,
        channel_id: i64,
        message_id: i64,
        text: &str,
    ) -> Result<Message> {
        let op = Op::EditMessage {
            actor,
            channel_id,
            message_id,
            text: text.to_owned(),
        };
        match self.write(op).await? {
            Done::Message(m) => Ok(m),
            other => Err(unexpected(other)),
        }
    }

    async fn delete_message(&self, actor: i64, channel_id: i64, message_id: i64) -> Result<()> {
        unit(
            self.write(Op::DeleteMessage {
                actor,
                channel_id,
                message_id,
            })
            .await?,
        )
    }

    async fn react(
        &self,
        actor: i64,
        channel_id: i64,
        message_id: i64,
        emoji: &str,
        add: bool,
    ) -> Result<bool> {
        let op = Op::React {
            actor,
            channel_id,
            message_id,
            emoji: emoji.to_owned(),
            add,
        };
        match self.write(op).await? {
            Done::Changed(changed) => Ok(changed),
            other => Err(unexpected(other)),
        }
    }

    async fn reactions(
        &self,
        viewer: i64,
        channel_id: i64,
        message_ids: &[i64],
    ) -> Result<Vec<(i64, Vec<ReactionCount>)>> {
        let ids = message_ids.to_vec();
        self.reads
            .run(move |c| read::reactions(c, viewer, channel_id, &ids))
            .await
    }

    async fn reactors(
        &self,
        channel_id: i64,
        message_id: i64,
        emoji: &str,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<Reactor>> {
        let emoji = emoji.to_owned();
        self.reads
            .run(move |c| read::reactors(c, channel_id, message_id, &emoji, after, limit))
            .await
    }

    async fn log(
        &self,
        channel_id: i64,
        after_seq: i64,
        limit: u32,
        _fence: ReadFence,
    ) -> Result<Page<Event>> {
        let tail = Arc::clone(&self.tail);
        self.reads
            .run(move |c| read::events(c, &tail, channel_id, after_seq, limit))
            .await
    }

    async fn history(
        &self,
        channel_id: i64,
        query: HistoryQuery,
        _fence: ReadFence,
    ) -> Result<Page<Message>> {
        let tail = Arc::clone(&self.tail);
        self.reads
            .run(move |c| read::messages(c, &tail, channel_id, query))
            .await
    }

    async fn last_seqs(&self, ids: &[i64]) -> Result<Vec<(i64, i64)>> {
        let ids = ids.to_vec();
        let tail = Arc::clone(&self.tail);
        self.reads
            .run(move |c| read::last_seqs(c, &tail, &ids))
            .await
    }
}
