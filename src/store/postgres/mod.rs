//! The PostgreSQL backend, sharded (see `CLUSTER.md` beside the project, and
//! ARCHITECTURE.md): channels live on the shard their bucket maps to; accounts, sessions,
//! the user → channels index and node-id leases live on shard 0. Each shard has a read
//! pool and one group-commit [`writer`] per node; the index is kept by a relay that applies
//! each shard's outbox to shard 0 (right after a membership change commits, and every
//! second in case a node died in between).
//!
//! Checks that span shards (the user exists, shares a channel, has room for one more
//! membership, has too many unanswered DMs) are read before the write is queued; the
//! checks of the channel itself (membership, roles, idempotency) run inside the shard's
//! transaction, as on SQLite. The cross-shard ones can therefore be raced by concurrent
//! writes on other shards: two joins at once may pass the channel cap by one each.

mod read;
mod ring;
mod schema;
mod security;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;

use self::writer::{Done, Op, Writer};
use super::{
    Accounts, ApiKeyInfo, Backend, Channels, CollectedUploads, DeliveryReport, Files, Health,
    IncomingWebhook, KeyAuth, NewApiKey, NewIncomingWebhook, NewSession, NewSubscription,
    NewUpload, OnCommit, Posted, ReadFence, Result, Rules, SearchOrder, SearchQuery, SessionAuth,
    SessionInfo, StoreError, Subscription, SubscriptionChange, TokenHash, rules,
};
use crate::clock::now_ms;
use crate::id::Snowflake;
use crate::metrics::{BATCH_BUCKETS, Histogram, LATENCY_BUCKETS, render_header, render_value};
use crate::model::{
    Channel, ChannelKind, ChannelView, Event, HistoryQuery, Member, Message, Page, ProfileChange,
    ReactionCount, Reactor, Role, Upload, User,
};

/// How long a node's lease on its id lasts without renewal, and how often it is renewed.
const LEASE_TTL: Duration = Duration::from_secs(6);
const LEASE_RENEW: Duration = Duration::from_millis(1500);
/// Writes stop this long before the lease could lapse unrenewed.
const LEASE_MARGIN: Duration = Duration::from_secs(1);
/// The database's clock in Unix ms: leases compare times of one clock, whatever the
/// nodes' clocks say.
const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";
/// The advisory lock (on each shard) held while its outbox is relayed.
const RELAY_LOCK: i64 = 0x6e61_7474_6572_0002;
/// How often each shard is probed and its outbox relayed.
const TICK: Duration = Duration::from_secs(1);
/// Longest wait for a pooled read connection.
const POOL_WAIT: Duration = Duration::from_secs(2);
/// The statement timeout of the connections that migrate and check the cluster at start.
const SETUP_TIMEOUT: Duration = Duration::from_secs(600);

/// How to open a [`PostgresStore`].
#[derive(Clone)]
pub struct PostgresOptions {
    /// One connection URL per shard, shard 0 first.
    pub shards: Vec<String>,
    pub node_id: u16,
    /// Writes that may wait for each shard's writer before new ones get 503.
    pub write_queue: usize,
    /// Read connections per shard.
    pub read_connections: usize,
    pub on_commit: Option<OnCommit>,
    pub rules: Rules,
    /// Every statement is cancelled past this.
    pub statement_timeout: Duration,
}

/// What a failed step was: a refusal by a rule (or a mapped error), or PostgreSQL's.
pub(super) enum Fail {
    Store(StoreError),
    Pg(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// Errors that mean the connection to the shard is gone (the shard is down or
/// restarting): the shard shows down until a probe gets through again.
pub(super) fn connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // No SQLSTATE: an I/O error on the socket (or a driver-side error, which is not).
        None => {
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                if s.is::<std::io::Error>() {
                    return true;
                }
                source = s.source();
            }
            false
        }
        Some(code) => {
            code.code().starts_with("08")
                || [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                ]
                .contains(code)
        }
    }
}

/// Errors the caller gets as `503 unavailable` (retry shortly): a lost connection, a
/// statement past the timeout, a shard refusing connections or writes.
pub(super) fn unreachable_error(e: &tokio_postgres::Error) -> bool {
    connection_lost(e)
        || e.code().is_some_and(|code| {
            [
                SqlState::QUERY_CANCELED,
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::READ_ONLY_SQL_TRANSACTION,
            ]
            .contains(code)
        })
}

/// What every shard writer of this node shares.
pub(super) struct Shared {
    /// One id generator for the node: ids stay unique over all its shard writers.
    ids: Mutex<Snowflake>,
    on_commit: Option<OnCommit>,
    rules: Rules,
    /// Until when (ms since `started`) the node id's lease is surely still ours: the last
    /// renewal's send time plus the lease's life, less a margin.
    lease_until_ms: AtomicU64,
    started: Instant,
    /// Shard 0's read pool, where accounts are: writers resolve `@name`s there.
    pub(super) accounts: OnceLock<Pool>,
}

impl Shared {
    /// Whether this node may hand out ids: its lease on the node id has not lapsed.
    pub(super) fn lease_held(&self) -> bool {
        (self.started.elapsed().as_millis() as u64) < self.lease_until_ms.load(Ordering::Relaxed)
    }

    /// Records a successful lease write sent at `sent`.
    fn lease_renewed(&self, sent: Instant) {
        let until = sent.duration_since(self.started) + LEASE_TTL - LEASE_MARGIN;
        self.lease_until_ms
            .fetch_max(until.as_millis() as u64, Ordering::Relaxed);
    }

    /// Deleted accounts deleted at or before this time (ms) hold their names no more.
    fn held_since(&self, now: i64) -> i64 {
        now.saturating_sub(self.rules.username_hold.as_millis() as i64)
    }

    /// An id for a write the caller is about to queue; refused without a live lease.
    fn checked_id(&self, now: i64) -> Result<i64> {
        if !self.lease_held() {
            return Err(StoreError::Unreachable);
        }
        Ok(self.next_id(now))
    }

    fn next_id(&self, now: i64) -> i64 {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_id(now)
    }

    pub(super) fn next_ids(&self, n: usize, now: i64) -> Vec<i64> {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        (0..n).map(|_| ids.next_id(now)).collect()
    }
}

/// One shard's counters, for `/metrics` (label `shard`).
pub struct ShardStats {
    up: AtomicBool,
    queue: OnceLock<mpsc::WeakSender<writer::Msg>>,
    overloaded: AtomicU64,
    batch_ops: Histogram,
    commit_seconds: Histogram,
    /// Time an op waited in the queue before its batch began.
    queue_wait: Histogram,
    /// Time to get a pooled read connection.
    pool_wait: Histogram,
    failed_commits: AtomicU64,
    messages_accepted: AtomicU64,
    events_committed: AtomicU64,
    /// Calls answered `Unreachable`.
    unreachable: AtomicU64,
    relay_pending: AtomicU64,
    /// Age of the oldest outbox row not yet applied, ms.
    relay_lag_ms: AtomicU64,
    relay_applied: AtomicU64,
    relay_errors: AtomicU64,
}

impl Default for ShardStats {
    fn default() -> Self {
        Self {
            up: AtomicBool::new(true),
            queue: OnceLock::new(),
            overloaded: AtomicU64::new(0),
            batch_ops: Histogram::new(BATCH_BUCKETS),
            commit_seconds: Histogram::new(LATENCY_BUCKETS),
            queue_wait: Histogram::new(LATENCY_BUCKETS),
            pool_wait: Histogram::new(LATENCY_BUCKETS),
            failed_commits: AtomicU64::new(0),
            messages_accepted: AtomicU64::new(0),
            events_committed: AtomicU64::new(0),
            unreachable: AtomicU64::new(0),
            relay_pending: AtomicU64::new(0),
            relay_lag_ms: AtomicU64::new(0),
            relay_applied: AtomicU64::new(0),
            relay_errors: AtomicU64::new(0),
        }
    }
}

impl ShardStats {
    pub(super) fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }

    fn queued(&self) -> (usize, usize) {
        match self.queue.get().and_then(|q| q.upgrade()) {
            Some(tx) => (tx.max_capacity() - tx.capacity(), tx.max_capacity()),
            None => (0, 0),
        }
    }
}

struct Shard {
    index: usize,
    pool: Pool,
    /// Streaming replicas that may answer log and history reads.
    replicas: Vec<Arc<Replica>>,
    /// Reads that could have gone to a replica but went to the primary (none had
    /// replayed far enough, or it failed).
    primary_reads: AtomicU64,
    writer: Writer,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<ShardStats>,
    /// Serialises this shard's relay runs, so outbox rows apply in order.
    relay: tokio::sync::Mutex<()>,
}

struct Inner {
    shards: Vec<Shard>,
    /// Bucket → shard.
    map: Vec<i32>,
    shared: Arc<Shared>,
    node_id: u16,
    /// This process's claim on its node id.
    holder: String,
    lease_lost: AtomicBool,
}

/// The sharded PostgreSQL store.
pub struct PostgresStore {
    inner: Arc<Inner>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for PostgresStore {
    /// A store dropped without [`Backend::close`] (an error path) still stops its
    /// background tasks; its writers stop when their queues close.
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            t.abort();
        }
    }
}

fn pg_config(url: &str, statement_timeout: Duration) -> anyhow::Result<tokio_postgres::Config> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .with_context(|| format!("parse {}", super::location::redact(url)))?;
    config
        .connect_timeout(Duration::from_secs(2))
        .application_name("natter")
        .options(format!(
            "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            statement_timeout.as_millis(),
            (statement_timeout * 4).as_millis()
        ));
    Ok(config)
}

async fn connect_once(config: &tokio_postgres::Config) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl PostgresStore {
    /// Connects to every shard, migrates them, checks (or, for a new cluster, writes) the
    /// bucket map, takes the node-id lease, and starts a writer per shard. Refuses to start
    /// on a shard list that disagrees with the cluster, or a node id another live node
    /// holds.
    pub async fn open(mut opts: PostgresOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(!opts.shards.is_empty(), "no PostgreSQL shard given");
        // Each shard's URL names its replicas (`?replica=host:port`); the rest is the
        // primary's.
        let mut replica_urls = Vec::with_capacity(opts.shards.len());
        for url in &mut opts.shards {
            let (primary, replicas) =
                super::location::split_replicas(url).map_err(|e| anyhow::anyhow!(e))?;
            *url = primary;
            replica_urls.push(replicas);
        }
        let configs = opts
            .shards
            .iter()
            .map(|u| pg_config(u, opts.statement_timeout))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut clients = Vec::new();
        for (i, url) in opts.shards.iter().enumerate() {
            // Migrations and the cluster check may wait on other nodes' locks: a long bound.
            let c = pg_config(url, SETUP_TIMEOUT)?;
            let mut client = connect_once(&c).await.with_context(|| {
                format!(
                    "connect to shard {i} ({})",
                    super::location::redact(&opts.shards[i])
                )
            })?;
            schema::migrate(&mut client, i).await?;
            clients.push(client);
        }
        let cluster = schema::check_or_create_cluster(&mut clients).await?;
        let holder = {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).expect("the OS random source works");
            format!(
                "{}-{}",
                std::process::id(),
                b.iter().map(|x| format!("{x:02x}")).collect::<String>()
            )
        };
        let sent = Instant::now();
        take_lease(&clients[0], opts.node_id, &holder).await?;
        drop(clients);
        let shared = Arc::new(Shared {
            ids: Mutex::new(Snowflake::new(opts.node_id)),
            on_commit: opts.on_commit.clone(),
            rules: opts.rules,
            lease_until_ms: AtomicU64::new(0),
            started: Instant::now(),
            accounts: OnceLock::new(),
        });
        shared.lease_renewed(sent.max(shared.started));
        let mut shards = Vec::new();
        for (index, config) in configs.into_iter().enumerate() {
            let stats = Arc::new(ShardStats::default());
            let manager = Manager::from_config(
                config.clone(),
                tokio_postgres::NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            let pool = read_pool(manager, opts.read_connections)?;
            if index == 0 {
                let _ = shared.accounts.set(pool.clone());
            }
            let mut replicas = Vec::new();
            for url in &replica_urls[index] {
                let config = pg_config(url, opts.statement_timeout)?;
                let manager = Manager::from_config(
                    config,
                    tokio_postgres::NoTls,
                    ManagerConfig {
                        recycling_method: RecyclingMethod::Fast,
                    },
                );
                replicas.push(Arc::new(Replica {
                    name: replica_name(url),
                    pool: read_pool(manager, opts.read_connections)?,
                    replayed: AtomicU64::new(0),
                    primary_at: AtomicU64::new(0),
                    reads: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                }));
            }
            let (writer, thread) = Writer::start(
                index,
                config,
                opts.write_queue,
                Arc::clone(&shared),
                Arc::clone(&stats),
            );
            shards.push(Shard {
                index,
                pool,
                replicas,
                primary_reads: AtomicU64::new(0),
                writer,
                thread: Mutex::new(Some(thread)),
                stats,
                relay: tokio::sync::Mutex::new(()),
            });
        }
        tracing::info!(
            shards = shards.len(),
            cluster = %cluster.cluster_id,
            node_id = opts.node_id,
            "PostgreSQL store open"
        );
        let inner = Arc::new(Inner {
            shards,
            map: cluster.buckets,
            shared,
            node_id: opts.node_id,
            holder,
            lease_lost: AtomicBool::new(false),
        });
        let lease_config = pg_config(&opts.shards[0], opts.statement_timeout)?;
        let mut tasks = vec![
            tokio::spawn(renew_lease(Arc::clone(&inner), lease_config)),
            tokio::spawn(tick(Arc::clone(&inner))),
        ];
        for shard in 0..inner.shards.len() {
            for replica in &inner.shards[shard].replicas {
                tasks.push(tokio::spawn(watch_replica(
                    Arc::clone(&inner),
                    shard,
                    Arc::clone(replica),
                )));
            }
        }
        Ok(Self {
            inner,
            tasks: Mutex::new(tasks),
        })
    }
}

/// A streaming replica of a shard.
struct Replica {
    /// host:port, for metrics and logs.
    name: String,
    pool: Pool,
    /// The WAL position it has replayed (bytes), as last polled; 0 while it is down or
    /// unknown, so that no read goes to it.
    replayed: AtomicU64,
    /// The primary's WAL position at the same poll (for the lag).
    primary_at: AtomicU64,
    reads: AtomicU64,
    failures: AtomicU64,
}

/// A per-replica metric: name, type, help, value.
type ReplicaMetric<'a> = (&'a str, &'a str, &'a str, &'a dyn Fn(&Replica) -> u64);

/// How often each replica's replay position is read.
const REPLICA_POLL: Duration = Duration::from_millis(100);

fn read_pool(manager: Manager, size: usize) -> anyhow::Result<Pool> {
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(Duration::from_secs(2)))
        .recycle_timeout(Some(Duration::from_secs(1)))
        .build()
        .context("build a read pool")
}

/// `host:port` of a replica's URL (no user or password).
fn replica_name(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, h)| h)
        .to_owned()
}

/// Polls a replica's replay position (and the primary's, for the lag) every
/// [`REPLICA_POLL`]; a replica that fails or is not in recovery gets position 0, so
/// reads skip it until it answers again.
async fn watch_replica(inner: Arc<Inner>, shard: usize, replica: Arc<Replica>) {
    const SQL: &str = "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint";
    let mut every = tokio::time::interval(REPLICA_POLL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_up = true;
    loop {
        every.tick().await;
        let replayed = async {
            let c = replica.pool.get().await.ok()?;
            let row = c.query_one(SQL, &[]).await.ok()?;
            row.get::<_, Option<i64>>(0)
        };
        let replayed = tokio::time::timeout(Duration::from_secs(1), replayed)
            .await
            .ok()
            .flatten()
            .unwrap_or(0)
            .max(0) as u64;
        replica.replayed.store(replayed, Ordering::Release);
        if (replayed > 0) != was_up {
            was_up = replayed > 0;
            if was_up {
                tracing::info!(shard, replica = %replica.name, "replica answers; reads may go to it");
            } else {
                tracing::warn!(shard, replica = %replica.name, "replica down or not replaying; its reads go to the primary");
            }
        }
        if let Ok(c) = inner.conn(shard).await
            && let Ok(row) = c
                .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
                .await
        {
            replica
                .primary_at
                .store(row.get::<_, i64>(0).max(0) as u64, Ordering::Relaxed);
        }
    }
}

/// Applies missing migrations to every shard and checks (or creates) the bucket map,
/// without serving: what `natter migrate` does. Says what it did.
pub async fn migrate_only(shards: &[String]) -> anyhow::Result<String> {
    anyhow::ensure!(!shards.is_empty(), "no PostgreSQL shard given");
    let mut clients = Vec::new();
    let mut report = Vec::new();
    for (i, url) in shards.iter().enumerate() {
        let (url, _) = super::location::split_replicas(url).map_err(|e| anyhow::anyhow!(e))?;
        let url = &url;
        let config = pg_config(url, Duration::from_secs(600))?;
        let mut client = connect_once(&config)
            .await
            .with_context(|| format!("connect to shard {i} ({})", super::location::redact(url)))?;
        let before = schema::version(&client).await?;
        schema::migrate(&mut client, i).await?;
        report.push(format!(
            "shard {i}: schema version {before} -> {}",
            schema::VERSION
        ));
        clients.push(client);
    }
    let cluster = schema::check_or_create_cluster(&mut clients).await?;
    report.push(format!(
        "cluster {}: {} shard(s), bucket map checked",
        cluster.cluster_id,
        shards.len()
    ));
    Ok(report.join("\n"))
}

/// Takes `node_id`'s lease for `holder`. A lease held by another holder that is still
/// being renewed means another live node has this id: refused. One that stops being
/// renewed (its node died) is waited out, at most [`LEASE_TTL`], and taken.
async fn take_lease(
    client: &tokio_postgres::Client,
    node_id: u16,
    holder: &str,
) -> anyhow::Result<()> {
    let node = i32::from(node_id);
    let ttl = LEASE_TTL.as_millis() as i64;
    let mut seen: Option<i64> = None;
    for _ in 0..20 {
        let taken = client
            .query_opt(
                &format!(
                    "INSERT INTO node_leases (node_id, holder, expires_at) VALUES ($1, $2, {DB_NOW_MS} + $3)
                     ON CONFLICT (node_id) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
                     WHERE node_leases.expires_at <= {DB_NOW_MS} OR node_leases.holder = EXCLUDED.holder
                     RETURNING holder"
                ),
                &[&node, &holder, &ttl],
            )
            .await?;
        if taken.is_some() {
            return Ok(());
        }
        let Some(row) = client
            .query_opt(
                &format!(
                    "SELECT expires_at, expires_at - {DB_NOW_MS} FROM node_leases WHERE node_id = $1"
                ),
                &[&node],
            )
            .await?
        else {
            continue;
        };
        let (other, left): (i64, i64) = (row.get(0), row.get(1));
        if seen.is_some_and(|before| other > before) {
            anyhow::bail!(
                "node id {node_id} is held by another live node (its lease is being renewed); \
                 give every node its own --node-id"
            );
        }
        seen = Some(other);
        let wait = left.clamp(0, ttl) as u64 + 100;
        tracing::info!(
            node_id,
            wait_ms = wait,
            "node id lease held by another process; waiting to see whether it is alive"
        );
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    anyhow::bail!("could not take the lease on node id {node_id}")
}

/// Renews the lease on its own connection (not the read pool: a busy pool must not let
/// the lease lapse). While renewals fail, [`Shared::lease_held`] turns false once the
/// lease could have lapsed, and writes are refused until a renewal gets through.
async fn renew_lease(inner: Arc<Inner>, config: tokio_postgres::Config) {
    let mut every = tokio::time::interval(LEASE_RENEW);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        every.tick().await;
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = tokio::time::timeout(Duration::from_secs(2), connect_once(&config))
                .await
                .ok()
                .and_then(Result::ok);
        }
        let Some(c) = &client else {
            continue;
        };
        let sent = Instant::now();
        let renewed = tokio::time::timeout(
            LEASE_RENEW,
            c.execute(
                &format!(
                    "UPDATE node_leases SET expires_at = {DB_NOW_MS} + $3 WHERE node_id = $1 AND holder = $2"
                ),
                &[
                    &i32::from(inner.node_id),
                    &inner.holder,
                    &(LEASE_TTL.as_millis() as i64),
                ],
            ),
        )
        .await;
        match renewed {
            Ok(Ok(1)) => {
                inner.shared.lease_renewed(sent);
                inner.lease_lost.store(false, Ordering::Relaxed);
            }
            Ok(Ok(_)) => {
                if !inner.lease_lost.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        node_id = inner.node_id,
                        "lost the lease on this node id (another node took it after it lapsed); writes are refused: stop this node"
                    );
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "renew the node id lease"),
            Err(_) => tracing::warn!("renewing the node id lease timed out"),
        }
    }
}

/// Every second: probe each shard, and relay its outbox to shard 0's index.
async fn tick(inner: Arc<Inner>) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        for shard in &inner.shards {
            let probe = tokio::time::timeout(Duration::from_secs(1), async {
                let c = inner.conn(shard.index).await.ok()?;
                c.simple_query("SELECT 1").await.ok()
            });
            let up = matches!(probe.await, Ok(Some(_)));
            shard.stats.set_up(up);
        }
        for shard in &inner.shards {
            if let Err(e) = inner.relay(shard.index).await {
                tracing::debug!(shard = shard.index, error = %e, "relay outbox");
            }
        }
    }
}

impl Inner {
    /// Runs `read` on a replica of `shard` that has replayed past `fence`, if one has;
    /// `None` (read the primary) when none has, or the replica failed (it is then
    /// skipped until its next poll finds it well).
    async fn on_replica<T>(
        &self,
        shard: usize,
        fence: ReadFence,
        read: impl AsyncFnOnce(&tokio_postgres::Client) -> std::result::Result<T, Fail>,
    ) -> Option<T> {
        let s = &self.shards[shard];
        let need = fence.0?;
        if s.replicas.is_empty() {
            return None;
        }
        // The polled position only picks a replica that is up (the most advanced); the
        // replica's own position is read with the query, below.
        let Some(replica) = s
            .replicas
            .iter()
            .filter(|r| r.replayed.load(Ordering::Acquire) > 0)
            .max_by_key(|r| r.replayed.load(Ordering::Acquire))
        else {
            s.primary_reads.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        // Its replay position, then the read: the read's snapshot is taken after the
        // position was read, so it holds everything up to it. (Not pipelined: the order
        // of two queries polled together is not guaranteed to be the order sent.)
        let answer = async {
            let c = replica.pool.get().await.ok()?;
            let row = c
                .query_one(
                    "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint",
                    &[],
                )
                .await
                .ok()?;
            let replayed = row.get::<_, Option<i64>>(0).unwrap_or(0).max(0) as u64;
            if replayed < need {
                return Some((replayed, None));
            }
            Some((replayed, Some(read(&c).await.ok()?)))
        };
        match answer.await {
            Some((_, Some(page))) => {
                replica.reads.fetch_add(1, Ordering::Relaxed);
                Some(page)
            }
            Some((_, None)) => {
                // Not there yet: the primary answers.
                s.primary_reads.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => {
                replica.failures.fetch_add(1, Ordering::Relaxed);
                replica.replayed.store(0, Ordering::Release);
                s.primary_reads.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    fn shard_of_channel(&self, channel_id: i64) -> usize {
        self.map[ring::bucket_of_channel(channel_id)] as usize
    }

    /// A pooled read connection to `shard`.
    async fn conn(&self, shard: usize) -> Result<deadpool_postgres::Object> {
        let s = &self.shards[shard];
        let started = Instant::now();
        let got = s.pool.get().await;
        s.stats.pool_wait.observe_duration(started.elapsed());
        got.map_err(|e| {
            // Waiting too long for a pooled connection is load, not a dead shard.
            if !matches!(
                e,
                deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)
            ) {
                s.stats.set_up(false);
            }
            s.stats.unreachable.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(shard, error = %e, "no read connection");
            StoreError::Unreachable
        })
    }

    /// Turns a failed read on `shard` into the caller's error.
    fn fail(&self, shard: usize, context: &'static str, f: Fail) -> StoreError {
        match f {
            Fail::Store(e) => e,
            Fail::Pg(e) if unreachable_error(&e) => {
                let s = &self.shards[shard];
                if connection_lost(&e) {
                    s.stats.set_up(false);
                }
                s.stats.unreachable.fetch_add(1, Ordering::Relaxed);
                StoreError::Unreachable
            }
            Fail::Pg(e) if e.code() == Some(&SqlState::DISK_FULL) => StoreError::DiskFull,
            Fail::Pg(e) => StoreError::internal(context, e),
        }
    }

    /// Applies `shard`'s outbox to shard 0's user → channels index, in outbox order, and
    /// deletes what it applied. Idempotent: a row applied twice leaves the same index.
    async fn relay(&self, shard: usize) -> Result<u64> {
        let s = &self.shards[shard];
        let _one_at_a_time = s.relay.lock().await;
        let mut applied = 0;
        loop {
            let mut source = self.conn(shard).await?;
            let chunk = self.relay_chunk(shard, &mut source).await;
            match chunk {
                Ok(0) => return Ok(applied),
                Ok(n) => {
                    applied += n;
                    s.stats.relay_applied.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    s.stats.relay_errors.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    }

    /// One chunk of `shard`'s outbox: in a transaction on the shard that holds the shard's
    /// relay lock (so relays of several nodes never interleave, which could apply an old
    /// state after a newer one), read the oldest rows, apply them to shard 0, delete them,
    /// commit. A crash between shard 0's commit and the delete applies them again later:
    /// harmless, as each pair ends in its last state either way.
    async fn relay_chunk(
        &self,
        shard: usize,
        source: &mut deadpool_postgres::Object,
    ) -> Result<u64> {
        let s = &self.shards[shard];
        let tx = source
            .transaction()
            .await
            .map_err(|e| self.fail(shard, "begin relay", e.into()))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&RELAY_LOCK])
            .await
            .map_err(|e| self.fail(shard, "take the relay lock", e.into()))?;
        let rows = tx
            .query(
                "SELECT id, user_id, channel_id, joined, created_at FROM outbox ORDER BY id LIMIT 1000",
                &[],
            )
            .await
            .map_err(|e| self.fail(shard, "read outbox", e.into()))?;
        if rows.is_empty() {
            s.stats.relay_pending.store(0, Ordering::Relaxed);
            s.stats.relay_lag_ms.store(0, Ordering::Relaxed);
            return Ok(0);
        }
        let oldest: i64 = rows[0].get(4);
        s.stats
            .relay_pending
            .store(rows.len() as u64, Ordering::Relaxed);
        s.stats
            .relay_lag_ms
            .store((now_ms() - oldest).max(0) as u64, Ordering::Relaxed);
        // The last change of each (user, channel) pair in this chunk is its state.
        let mut last: BTreeMap<(i64, i64), bool> = BTreeMap::new();
        let mut ids = Vec::with_capacity(rows.len());
        for r in &rows {
            ids.push(r.get::<_, i64>(0));
            last.insert((r.get(1), r.get(2)), r.get(3));
        }
        let (mut join_u, mut join_c, mut left_u, mut left_c) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((u, c), joined) in last {
            if joined {
                join_u.push(u);
                join_c.push(c);
            } else {
                left_u.push(u);
                left_c.push(c);
            }
        }
        let mut index = self.conn(0).await?;
        let apply = async {
            let itx = index.transaction().await?;
            itx.execute(
                "INSERT INTO user_channels (user_id, channel_id)
                 SELECT * FROM unnest($1::bigint[], $2::bigint[]) ON CONFLICT DO NOTHING",
                &[&join_u, &join_c],
            )
            .await?;
            itx.execute(
                "DELETE FROM user_channels uc USING unnest($1::bigint[], $2::bigint[]) AS v(u, c)
                 WHERE uc.user_id = v.u AND uc.channel_id = v.c",
                &[&left_u, &left_c],
            )
            .await?;
            itx.commit().await
        };
        apply
            .await
            .map_err(|e| self.fail(0, "apply outbox to the index", e.into()))?;
        tx.execute("DELETE FROM outbox WHERE id = ANY($1)", &[&ids])
            .await
            .map_err(|e| self.fail(shard, "delete relayed outbox rows", e.into()))?;
        tx.commit()
            .await
            .map_err(|e| self.fail(shard, "commit relay", e.into()))?;
        Ok(ids.len() as u64)
    }

    /// Relays right after a membership change, so the caller's next channel list shows
    /// it. A failure is logged; the next tick retries.
    async fn relay_now(&self, shard: usize) {
        if let Err(e) = self.relay(shard).await {
            tracing::warn!(shard, error = %e, "relay outbox after a membership change; will retry");
        }
    }

    /// Deletes row `id` of the channel's `table` (its incoming webhooks or its
    /// subscriptions) for `actor`, an owner or admin of it; whether there was one.
    async fn delete_managed(
        &self,
        actor: i64,
        channel_id: i64,
        id: i64,
        table: &'static str,
    ) -> Result<bool> {
        let shard = self.shard_of_channel(channel_id);
        let mut c = self.conn(shard).await?;
        let result: std::result::Result<bool, Fail> = async {
            let tx = c.transaction().await?;
            manager_check(&*tx, channel_id, actor).await?;
            let n = tx
                .execute(
                    &format!("DELETE FROM {table} WHERE id = $1 AND channel_id = $2"),
                    &[&id, &channel_id],
                )
                .await?;
            tx.commit().await?;
            Ok(n > 0)
        }
        .await;
        result.map_err(|e| self.fail(shard, "delete a webhook or subscription", e))
    }

    /// Whether `actor` and `user` share a channel that counts as consent (not a DM, or a
    /// DM `user` opened or answered), looked up in the index and re-checked on each shard.
    async fn shares_channel(&self, actor: i64, user: i64) -> Result<bool> {
        let c = self.conn(0).await?;
        // A bot's owner may put it anywhere they are.
        let own_bot = c
            .query_opt(
                "SELECT 1 FROM users WHERE id = $1 AND bot_owner = $2",
                &[&user, &actor],
            )
            .await
            .map_err(|e| self.fail(0, "read bot owner", e.into()))?;
        if own_bot.is_some() {
            return Ok(true);
        }
        let rows = c
            .query(
                "SELECT a.channel_id FROM user_channels a
                 JOIN user_channels b ON b.channel_id = a.channel_id AND b.user_id = $2
                 WHERE a.user_id = $1 LIMIT 5000",
                &[&actor, &user],
            )
            .await
            .map_err(|e| self.fail(0, "read shared channels", e.into()))?;
        drop(c);
        let mut by_shard: HashMap<usize, Vec<i64>> = HashMap::new();
        for r in rows {
            let id: i64 = r.get(0);
            by_shard
                .entry(self.shard_of_channel(id))
                .or_default()
                .push(id);
        }
        let mut failed = None;
        for (shard, ids) in by_shard {
            let c = match self.conn(shard).await {
                Ok(c) => c,
                Err(e) => {
                    failed = Some(e);
                    continue;
                }
            };
            let found = c
                .query_opt(
                    "SELECT 1 FROM channels c
                     WHERE c.id = ANY($1) AND (c.kind != 'dm' OR c.owner_id = $3 OR c.dm_answered)
                       AND EXISTS (SELECT 1 FROM members WHERE channel_id = c.id AND user_id = $2)
                       AND EXISTS (SELECT 1 FROM members WHERE channel_id = c.id AND user_id = $3)
                     LIMIT 1",
                    &[&ids, &actor, &user],
                )
                .await;
            match found {
                Ok(Some(_)) => return Ok(true),
                Ok(None) => {}
                Err(e) => failed = Some(self.fail(shard, "check a shared channel", e.into())),
            }
        }
        // A shard that did not answer might have held the shared channel.
        match failed {
            Some(e) => Err(e),
            None => Ok(false),
        }
    }

    /// Memberships of each of `users`, from the index.
    async fn membership_counts(&self, users: &[i64]) -> Result<HashMap<i64, u64>> {
        let c = self.conn(0).await?;
        let rows = c
            .query(
                "SELECT user_id, count(*) FROM user_channels WHERE user_id = ANY($1) GROUP BY user_id",
                &[&users],
            )
            .await
            .map_err(|e| self.fail(0, "count memberships", e.into()))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    async fn existing_users(&self, ids: &[i64]) -> Result<Vec<User>> {
        let c = self.conn(0).await?;
        read::users(&**c, ids)
            .await
            .map_err(|e| self.fail(0, "read users", e))
    }

    /// The live accounts among `ids`: a deleted one is joined to nothing new.
    async fn live_users(&self, ids: &[i64]) -> Result<Vec<User>> {
        let found = self.existing_users(ids).await?;
        Ok(found.into_iter().filter(|u| !u.deleted).collect())
    }

    /// DMs others opened with `user` that `user` has not answered, over every shard.
    async fn pending_dms(&self, user: i64) -> Result<u64> {
        let mut total = 0;
        for shard in &self.shards {
            // A shard that does not answer counts none: a DM is still allowed.
            let Ok(c) = self.conn(shard.index).await else {
                continue;
            };
            let n: i64 = match c
                .query_one(
                    "SELECT count(*) FROM members m JOIN channels c ON c.id = m.channel_id
                     WHERE m.user_id = $1 AND c.kind = 'dm' AND c.owner_id != $1 AND NOT c.dm_answered",
                    &[&user],
                )
                .await
            {
                Ok(row) => row.get(0),
                Err(e) => {
                    let e = self.fail(shard.index, "count pending DMs", e.into());
                    tracing::warn!(shard = shard.index, error = %e, "count pending DMs");
                    continue;
                }
            };
            total += n as u64;
        }
        Ok(total)
    }

    /// The consent and room verdict for putting `user` into a channel by `actor`.
    async fn admit(&self, actor: i64, user: i64) -> Result<rules::Verdict> {
        if self.live_users(&[user]).await?.is_empty() {
            return Ok(Err(StoreError::NotFound));
        }
        if rules::needs_consent(&self.shared.rules, actor, user)
            && let Err(e) = rules::consent(self.shares_channel(actor, user).await?)
        {
            return Ok(Err(e));
        }
        let counts = self.membership_counts(&[user]).await?;
        Ok(rules::room(
            &self.shared.rules,
            counts.get(&user).copied().unwrap_or(0),
        ))
    }

    async fn submit(&self, shard: usize, op: Op) -> Result<Done> {
        self.shards[shard].writer.submit(op).await
    }
}

fn unexpected(what: &str) -> StoreError {
    StoreError::internal(
        "match writer answer",
        format!("unexpected answer to {what}"),
    )
}

#[async_trait]
impl Backend for PostgresStore {
    async fn close(&self) {
        for shard in &self.inner.shards {
            shard.writer.stop().await;
        }
        let tasks: Vec<_> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        for shard in &self.inner.shards {
            let thread = shard
                .thread
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(t) = thread {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
        }
        // Apply what the writers left in the outboxes, then let the id go at once.
        for shard in &self.inner.shards {
            self.inner.relay_now(shard.index).await;
        }
        if let Ok(c) = self.inner.conn(0).await {
            let _ = c
                .execute(
                    "DELETE FROM node_leases WHERE node_id = $1 AND holder = $2",
                    &[&i32::from(self.inner.node_id), &self.inner.holder],
                )
                .await;
        }
        for shard in &self.inner.shards {
            shard.pool.close();
            for replica in &shard.replicas {
                replica.pool.close();
            }
        }
    }

    async fn maintain(&self, now: i64) -> Result<String> {
        let n = self.purge_sessions(now).await?;
        Ok(format!("purged {n} expired sessions"))
    }

    fn health(&self) -> Health {
        Health {
            disk_full: false,
            writes_ended: false,
            parts: self
                .inner
                .shards
                .iter()
                .map(|s| {
                    (
                        format!("shard{}", s.index),
                        s.stats.up.load(Ordering::Relaxed),
                    )
                })
                .collect(),
        }
    }

    fn render_metrics(&self, out: &mut String) {
        let shards = &self.inner.shards;
        let label = |s: &Shard| format!("shard=\"{}\"", s.index);
        let gauge = |out: &mut String,
                     name: &str,
                     kind: &str,
                     help: &str,
                     f: &dyn Fn(&ShardStats) -> u64| {
            render_header(out, name, kind, help);
            for s in shards {
                render_value(out, name, &label(s), f(&s.stats));
            }
        };
        let count = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            out,
            "natter_store_shard_up",
            "gauge",
            "1 while the PostgreSQL shard answers.",
            &|s| u64::from(s.up.load(Ordering::Relaxed)),
        );
        render_header(
            out,
            "natter_store_replica_skipped_total",
            "counter",
            "Log and history reads a replica could have answered that went to the shard's primary (none had replayed the reader's writes, or it failed).",
        );
        for s in shards {
            render_value(
                out,
                "natter_store_replica_skipped_total",
                &label(s),
                count(&s.primary_reads),
            );
        }
        let replicas: Vec<(&Shard, &Arc<Replica>)> = shards
            .iter()
            .flat_map(|s| s.replicas.iter().map(move |r| (s, r)))
            .collect();
        let per_replica: [ReplicaMetric; 4] = [
            (
                "natter_store_replica_up",
                "gauge",
                "1 while the streaming replica answers and replays.",
                &|r| u64::from(r.replayed.load(Ordering::Relaxed) > 0),
            ),
            (
                "natter_store_replica_lag_bytes",
                "gauge",
                "WAL bytes the replica has yet to replay (as of its last poll).",
                &|r| {
                    r.primary_at
                        .load(Ordering::Relaxed)
                        .saturating_sub(r.replayed.load(Ordering::Relaxed))
                },
            ),
            (
                "natter_store_replica_reads_total",
                "counter",
                "Log and history reads the replica answered.",
                &|r| count(&r.reads),
            ),
            (
                "natter_store_replica_failures_total",
                "counter",
                "Reads on the replica that failed (answered by the primary instead).",
                &|r| count(&r.failures),
            ),
        ];
        for (name, kind, help, f) in per_replica {
            render_header(out, name, kind, help);
            for (s, r) in &replicas {
                let labels = format!("shard=\"{}\",replica=\"{}\"", s.index, r.name);
                render_value(out, name, &labels, f(r));
            }
        }
        gauge(
            out,
            "natter_write_queue_depth",
            "gauge",
            "Writes queued for the shard's group-commit writer.",
            &|s| s.queued().0 as u64,
        );
        gauge(
            out,
            "natter_write_queue_capacity",
            "gauge",
            "Writes a shard's queue holds before new ones are refused as overloaded.",
            &|s| s.queued().1 as u64,
        );
        gauge(
            out,
            "natter_write_overloaded_total",
            "counter",
            "Writes refused because the shard's write queue was full (503 overloaded).",
            &|s| count(&s.overloaded),
        );
        gauge(
            out,
            "natter_commit_failures_total",
            "counter",
            "Transactions that failed to commit; their writers were answered with an error.",
            &|s| count(&s.failed_commits),
        );
        gauge(
            out,
            "natter_messages_accepted_total",
            "counter",
            "New messages committed (idempotent resends excluded).",
            &|s| count(&s.messages_accepted),
        );
        gauge(
            out,
            "natter_events_committed_total",
            "counter",
            "Events committed to channel logs.",
            &|s| count(&s.events_committed),
        );
        gauge(
            out,
            "natter_store_unreachable_total",
            "counter",
            "Store calls answered 503 because the shard was down, restarting or past the statement timeout.",
            &|s| count(&s.unreachable),
        );
        gauge(
            out,
            "natter_store_relay_pending",
            "gauge",
            "Membership changes in the shard's outbox not yet applied to shard 0's index (at the last relay run, at most 1000).",
            &|s| count(&s.relay_pending),
        );
        render_header(
            out,
            "natter_store_relay_lag_seconds",
            "gauge",
            "Age of the oldest membership change not yet applied to shard 0's index.",
        );
        for s in shards {
            render_value(
                out,
                "natter_store_relay_lag_seconds",
                &label(s),
                count(&s.stats.relay_lag_ms) as f64 / 1000.0,
            );
        }
        gauge(
            out,
            "natter_store_relay_applied_total",
            "counter",
            "Outbox rows applied to shard 0's index.",
            &|s| count(&s.relay_applied),
        );
        gauge(
            out,
            "natter_store_relay_errors_total",
            "counter",
            "Relay runs that failed to apply to shard 0 (retried every second).",
            &|s| count(&s.relay_errors),
        );
        let histogram =
            |out: &mut String, name: &str, help: &str, f: &dyn Fn(&ShardStats) -> &Histogram| {
                render_header(out, name, "histogram", help);
                for s in shards {
                    f(&s.stats).render(out, name, &label(s));
                }
            };
        histogram(
            out,
            "natter_commit_batch_ops",
            "Writes committed together in one transaction (group commit).",
            &|s| &s.batch_ops,
        );
        histogram(
            out,
            "natter_commit_duration_seconds",
            "Time to apply and commit one group-commit transaction.",
            &|s| &s.commit_seconds,
        );
        histogram(
            out,
            "natter_store_queue_wait_seconds",
            "Time a write waited in its shard's queue before its transaction began.",
            &|s| &s.queue_wait,
        );
        histogram(
            out,
            "natter_store_pool_wait_seconds",
            "Time to get a pooled read connection to the shard.",
            &|s| &s.pool_wait,
        );
        render_header(
            out,
            "natter_store_node_lease_lost",
            "gauge",
            "1 if this node lost the lease on its node id (another node may hand out the same ids).",
        );
        render_value(
            out,
            "natter_store_node_lease_lost",
            "",
            u8::from(self.inner.lease_lost.load(Ordering::Relaxed)),
        );
    }
}

#[async_trait]
impl Accounts for PostgresStore {
    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        session: Option<NewSession>,
    ) -> Result<User> {
        let inner = &self.inner;
        let folded = crate::username::fold(username);
        let skeleton = crate::username::skeleton(&folded);
        let now = now_ms();
        let id = inner.shared.checked_id(now)?;
        let mut c = inner.conn(0).await?;
        let result: std::result::Result<User, Fail> = async {
            let tx = c.transaction().await?;
            let held_since = inner.shared.held_since(now);
            let user = insert_user(
                &tx,
                id,
                &folded,
                &skeleton,
                password_hash,
                now,
                None,
                held_since,
            )
            .await?;
            if let Some(s) = &session {
                insert_session(&tx, id, s, now).await?;
            }
            tx.commit().await?;
            Ok(user)
        }
        .await;
        result.map_err(|e| name_taken_or(e, |e| inner.fail(0, "create user", e)))
    }

    async fn user(&self, id: i64) -> Result<Option<User>> {
        let c = self.inner.conn(0).await?;
        read::user(&**c, id)
            .await
            .map_err(|e| self.inner.fail(0, "read user", e))
    }

    async fn user_by_username(&self, username: &str) -> Result<Option<User>> {
        let c = self.inner.conn(0).await?;
        read::user_by_key(&**c, &crate::username::fold(username))
            .await
            .map_err(|e| self.inner.fail(0, "read user", e))
    }

    async fn credentials(&self, username: &str) -> Result<Option<(User, String)>> {
        let c = self.inner.conn(0).await?;
        read::credentials(&**c, &crate::username::fold(username))
            .await
            .map_err(|e| self.inner.fail(0, "read credentials", e))
    }

    async fn create_session(&self, user_id: i64, session: NewSession) -> Result<Vec<TokenHash>> {
        let inner = &self.inner;
        let max = i64::from(inner.shared.rules.max_sessions_per_user);
        let mut c = inner.conn(0).await?;
        let result: std::result::Result<Vec<TokenHash>, Fail> = async {
            let tx = c.transaction().await?;
            // One login of a user at a time: the cap holds under concurrent logins. A
            // login that checked its password before the account was deleted gets none.
            let live = tx
                .execute(
                    "SELECT 1 FROM users WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
                    &[&user_id],
                )
                .await?;
            if live == 0 {
                return Err(Fail::Store(StoreError::NotFound));
            }
            insert_session(&tx, user_id, &session, now_ms()).await?;
            let evicted = tx
                .query(
                    "DELETE FROM sessions WHERE user_id = $1 AND token_hash IN (
                         SELECT token_hash FROM sessions WHERE user_id = $1
                         ORDER BY created_at DESC, id DESC OFFSET $2)
                     RETURNING token_hash",
                    &[&user_id, &max],
                )
                .await?;
            tx.commit().await?;
            Ok(evicted.iter().filter_map(|r| digest(r.get(0))).collect())
        }
        .await;
        result.map_err(|e| inner.fail(0, "create session", e))
    }

    async fn session_user(&self, token: TokenHash, now: i64) -> Result<Option<SessionAuth>> {
        let c = self.inner.conn(0).await?;
        read::session_user(&**c, &token, now)
            .await
            .map_err(|e| self.inner.fail(0, "read session", e))
    }

    async fn update_profile(&self, user_id: i64, change: ProfileChange) -> Result<User> {
        let c = self.inner.conn(0).await?;
        let row = c
            .query_opt(
                &format!(
                    "UPDATE users SET
                         display_name = CASE WHEN $2 THEN $3 ELSE display_name END,
                         about = CASE WHEN $4 THEN $5 ELSE about END
                     WHERE id = $1 RETURNING {}",
                    read::USER_COLUMNS
                ),
                &[
                    &user_id,
                    &change.display_name.is_some(),
                    &change.display_name.clone().flatten(),
                    &change.about.is_some(),
                    &change.about.clone().flatten(),
                ],
            )
            .await
            .map_err(|e| self.inner.fail(0, "update profile", e.into()))?;
        row.as_ref().map(read::user_row).ok_or(StoreError::NotFound)
    }

    async fn record_last_seen(&self, seen: &[(i64, i64)]) -> Result<()> {
        let (users, times): (Vec<i64>, Vec<i64>) = seen.iter().copied().unzip();
        let c = self.inner.conn(0).await?;
        c.execute(
            "UPDATE users u SET last_seen_at = GREATEST(coalesce(u.last_seen_at, 0), s.at)
             FROM unnest($1::BIGINT[], $2::BIGINT[]) AS s(id, at) WHERE u.id = s.id",
            &[&users, &times],
        )
        .await
        .map_err(|e| self.inner.fail(0, "record last seen", e.into()))?;
        Ok(())
    }

    async fn last_seen(&self, users: &[i64]) -> Result<Vec<(i64, i64)>> {
        let c = self.inner.conn(0).await?;
        let rows = c
            .query(
                "SELECT id, last_seen_at FROM users
                 WHERE id = ANY($1) AND last_seen_at IS NOT NULL",
                &[&users],
            )
            .await
            .map_err(|e| self.inner.fail(0, "read last seen", e.into()))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn touch_session(&self, token: TokenHash, now: i64) -> Result<()> {
        let c = self.inner.conn(0).await?;
        c.execute(
            "UPDATE sessions SET last_used_at = GREATEST(last_used_at, $2) WHERE token_hash = $1",
            &[&&token[..], &now],
        )
        .await
        .map_err(|e| self.inner.fail(0, "touch session", e.into()))?;
        Ok(())
    }

    async fn sessions(&self, user_id: i64, now: i64) -> Result<Vec<SessionInfo>> {
        let c = self.inner.conn(0).await?;
        read::sessions(&**c, user_id, now)
            .await
            .map_err(|e| self.inner.fail(0, "read sessions", e))
    }

    async fn delete_session(&self, token: TokenHash) -> Result<()> {
        let c = self.inner.conn(0).await?;
        c.execute("DELETE FROM sessions WHERE token_hash = $1", &[&&token[..]])
            .await
            .map_err(|e| self.inner.fail(0, "delete session", e.into()))?;
        Ok(())
    }

    async fn delete_session_by_id(
        &self,
        user_id: i64,
        session_id: i64,
    ) -> Result<Option<TokenHash>> {
        let c = self.inner.conn(0).await?;
        let row = c
            .query_opt(
                "DELETE FROM sessions WHERE user_id = $1 AND id = $2 RETURNING token_hash",
                &[&user_id, &session_id],
            )
            .await
            .map_err(|e| self.inner.fail(0, "delete session", e.into()))?;
        Ok(row.and_then(|r| digest(r.get(0))))
    }

    async fn delete_other_sessions(&self, user_id: i64, keep: TokenHash) -> Result<Vec<TokenHash>> {
        let c = self.inner.conn(0).await?;
        let rows = c
            .query(
                "DELETE FROM sessions WHERE user_id = $1 AND token_hash != $2 RETURNING token_hash",
                &[&user_id, &&keep[..]],
            )
            .await
            .map_err(|e| self.inner.fail(0, "delete sessions", e.into()))?;
        Ok(rows.iter().filter_map(|r| digest(r.get(0))).collect())
    }

    async fn purge_sessions(&self, now: i64) -> Result<u64> {
        let c = self.inner.conn(0).await?;
        c.execute("DELETE FROM sessions WHERE expires_at <= $1", &[&now])
            .await
            .map_err(|e| self.inner.fail(0, "purge sessions", e.into()))
    }

    async fn create_bot(&self, owner: i64, username: &str) -> Result<User> {
        let inner = &self.inner;
        let folded = crate::username::fold(username);
        let skeleton = crate::username::skeleton(&folded);
        let now = now_ms();
        let id = inner.shared.checked_id(now)?;
        let rules = inner.shared.rules;
        let mut c = inner.conn(0).await?;
        let result: std::result::Result<User, Fail> = async {
            let tx = c.transaction().await?;
            // One bot of an owner at a time: the cap holds under concurrent requests.
            let Some(row) = tx
                .query_opt(
                    "SELECT bot_owner FROM users WHERE id = $1 FOR UPDATE",
                    &[&owner],
                )
                .await?
            else {
                return Err(StoreError::NotFound.into());
            };
            let owner_is_bot = row.get::<_, Option<i64>>(0).is_some();
            let bots: i64 = tx
                .query_one("SELECT count(*) FROM users WHERE bot_owner = $1", &[&owner])
                .await?
                .get(0);
            rules::bot_room(&rules, owner_is_bot, bots as u64)?;
            let held_since = inner.shared.held_since(now);
            let user = insert_user(
                &tx,
                id,
                &folded,
                &skeleton,
                "",
                now,
                Some(owner),
                held_since,
            )
            .await?;
            tx.commit().await?;
            Ok(user)
        }
        .await;
        result.map_err(|e| name_taken_or(e, |e| inner.fail(0, "create bot", e)))
    }

    async fn bots(&self, owner: i64) -> Result<Vec<User>> {
        let c = self.inner.conn(0).await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {} FROM users WHERE bot_owner = $1 ORDER BY created_at, id",
                    read::USER_COLUMNS
                ),
                &[&owner],
            )
            .await
            .map_err(|e| self.inner.fail(0, "read bots", e.into()))?;
        Ok(rows.iter().map(read::user_row).collect())
    }

    async fn create_api_key(&self, owner: i64, key: NewApiKey) -> Result<ApiKeyInfo> {
        let inner = &self.inner;
        let rules = inner.shared.rules;
        let now = now_ms();
        let id = crate::store::session_id(&key.token);
        let mut c = inner.conn(0).await?;
        let result: std::result::Result<ApiKeyInfo, Fail> = async {
            let tx = c.transaction().await?;
            // One key of an owner at a time: the cap holds under concurrent requests.
            if tx
                .query_opt("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", &[&owner])
                .await?
                .is_none()
            {
                return Err(StoreError::NotFound.into());
            }
            if key.user_id != owner
                && tx
                    .query_opt(
                        "SELECT 1 FROM users WHERE id = $1 AND bot_owner = $2",
                        &[&key.user_id, &owner],
                    )
                    .await?
                    .is_none()
            {
                return Err(StoreError::NotFound.into());
            }
            let held: i64 = tx
                .query_one("SELECT count(*) FROM api_keys WHERE owner_id = $1", &[&owner])
                .await?
                .get(0);
            rules::key_room(&rules, held as u64)?;
            tx.execute(
                "INSERT INTO api_keys (token_hash, id, owner_id, user_id, name, scopes, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &&key.token[..],
                    &id,
                    &owner,
                    &key.user_id,
                    &key.name,
                    &key.scopes,
                    &now,
                    &key.expires_at,
                ],
            )
            .await?;
            tx.commit().await?;
            Ok(ApiKeyInfo {
                id,
                user_id: key.user_id,
                name: key.name.clone(),
                scopes: key.scopes.clone(),
                created_at: now,
                expires_at: key.expires_at,
                last_used_at: None,
            })
        }
        .await;
        result.map_err(|e| inner.fail(0, "create API key", e))
    }

    async fn api_keys(&self, owner: i64) -> Result<Vec<ApiKeyInfo>> {
        let c = self.inner.conn(0).await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {} FROM api_keys k WHERE k.owner_id = $1
                     ORDER BY k.created_at DESC, k.id",
                    read::KEY_COLUMNS
                ),
                &[&owner],
            )
            .await
            .map_err(|e| self.inner.fail(0, "read API keys", e.into()))?;
        Ok(rows.iter().map(read::key_row).collect())
    }

    async fn delete_api_key(&self, owner: i64, id: i64) -> Result<Option<(i64, TokenHash)>> {
        let c = self.inner.conn(0).await?;
        let row = c
            .query_opt(
                "DELETE FROM api_keys WHERE owner_id = $1 AND id = $2
                 RETURNING user_id, token_hash",
                &[&owner, &id],
            )
            .await
            .map_err(|e| self.inner.fail(0, "delete API key", e.into()))?;
        Ok(row.and_then(|r| Some((r.get(0), digest(r.get(1))?))))
    }

    async fn key_user(&self, token: TokenHash, now: i64) -> Result<Option<KeyAuth>> {
        let c = self.inner.conn(0).await?;
        read::key_user(&**c, &token, now)
            .await
            .map_err(|e| self.inner.fail(0, "read API key", e))
    }

    async fn touch_api_key(&self, token: TokenHash, now: i64) -> Result<()> {
        let c = self.inner.conn(0).await?;
        c.execute(
            "UPDATE api_keys SET last_used_at = GREATEST(coalesce(last_used_at, 0), $2)
             WHERE token_hash = $1",
            &[&&token[..], &now],
        )
        .await
        .map_err(|e| self.inner.fail(0, "touch API key", e.into()))?;
        Ok(())
    }
}

async fn find_subscription(
    tx: &tokio_postgres::Transaction<'_>,
    channel_id: i64,
    id: i64,
) -> std::result::Result<Option<Subscription>, Fail> {
    let row = tx
        .query_opt(
            &format!(
                "SELECT {} FROM subscriptions WHERE id = $1 AND channel_id = $2 FOR UPDATE",
                read::SUBSCRIPTION_COLUMNS
            ),
            &[&id, &channel_id],
        )
        .await?;
    row.as_ref().map(read::subscription_row).transpose()
}

/// Writes the fields an admin's change or a delivery report moves.
async fn store_subscription(
    tx: &tokio_postgres::Transaction<'_>,
    s: &Subscription,
) -> std::result::Result<(), Fail> {
    tx.execute(
        "UPDATE subscriptions SET cursor = $2, status = $3, delivered = $4, last_error = $5,
             failing_since = $6, failures = $7, next_try_at = $8, creator_id = $9
         WHERE id = $1",
        &[
            &s.id,
            &s.cursor,
            &s.status.as_str(),
            &s.delivered,
            &s.last_error,
            &s.failing_since,
            &s.failures,
            &s.next_try_at,
            &s.creator_id,
        ],
    )
    .await?;
    Ok(())
}

/// Checks that `actor` may manage the channel's webhooks (inside a transaction: the
/// membership row is locked until it ends).
async fn manager_check(
    c: &impl tokio_postgres::GenericClient,
    channel_id: i64,
    actor: i64,
) -> std::result::Result<(), Fail> {
    let row = c
        .query_opt(
            "SELECT c.kind, m.role FROM members m JOIN channels c ON c.id = m.channel_id
             WHERE m.channel_id = $1 AND m.user_id = $2 FOR SHARE OF m",
            &[&channel_id, &actor],
        )
        .await?;
    let membership = match row {
        Some(r) => Some((read::parse_kind(r.get(0))?, read::parse_role(r.get(1))?)),
        None => None,
    };
    Ok(rules::manage_webhooks(membership)?)
}

/// Inserts a user (a bot when `bot_owner` is set) under a name nobody's folded form or
/// skeleton has.
#[allow(clippy::too_many_arguments)]
async fn insert_user(
    tx: &tokio_postgres::Transaction<'_>,
    id: i64,
    folded: &str,
    skeleton: &str,
    password_hash: &str,
    now: i64,
    bot_owner: Option<i64>,
    held_since: i64,
) -> std::result::Result<User, Fail> {
    // Names with one skeleton are created one at a time, cluster-wide.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1)::bigint)",
        &[&skeleton],
    )
    .await?;
    // A deleted account past its hold gives its name up (a key no name can have).
    tx.execute(
        "UPDATE users SET username_key = '~deleted~' || id, username_skeleton = ''
         WHERE deleted_at IS NOT NULL AND deleted_at <= $3
           AND (username_key = $1 OR username_skeleton = $2)",
        &[&folded, &skeleton, &held_since],
    )
    .await?;
    let taken = tx
        .query_opt(
            "SELECT 1 FROM users WHERE username_key = $1 OR username_skeleton = $2",
            &[&folded, &skeleton],
        )
        .await?;
    if taken.is_some() {
        return Err(StoreError::UsernameTaken.into());
    }
    tx.execute(
        "INSERT INTO users (id, username, username_key, username_skeleton, password_hash, created_at, bot_owner)
         VALUES ($1, $2, $2, $3, $4, $5, $6)",
        &[&id, &folded, &skeleton, &password_hash, &now, &bot_owner],
    )
    .await?;
    Ok(User {
        id,
        username: folded.to_owned(),
        created_at: now,
        bot_owner,
        ..User::default()
    })
}

/// A unique violation of a user's name is `UsernameTaken` (two nodes raced past the
/// check); anything else goes to `fail`.
fn name_taken_or(e: Fail, fail: impl FnOnce(Fail) -> StoreError) -> StoreError {
    match e {
        Fail::Pg(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => StoreError::UsernameTaken,
        e => fail(e),
    }
}

async fn insert_session(
    tx: &tokio_postgres::Transaction<'_>,
    user_id: i64,
    s: &NewSession,
    now: i64,
) -> std::result::Result<(), Fail> {
    tx.execute(
        "INSERT INTO sessions (token_hash, id, user_id, created_at, last_used_at, expires_at, address, agent)
         VALUES ($1, $2, $3, $4, $4, $5, $6, $7)",
        &[
            &&s.token[..],
            &crate::store::session_id(&s.token),
            &user_id,
            &now,
            &s.expires_at,
            &s.address,
            &s.agent,
        ],
    )
    .await?;
    Ok(())
}

fn digest(bytes: Vec<u8>) -> Option<TokenHash> {
    TokenHash::try_from(bytes.as_slice()).ok()
}

/// Uploads are recorded on shard 0; the messages that carry them, on their channels'
/// shards.
#[async_trait]
impl Files for PostgresStore {
    async fn create_upload(&self, upload: NewUpload) -> Result<Upload> {
        let inner = &self.inner;
        let now = now_ms();
        let id = inner.shared.checked_id(now)?;
        let c = inner.conn(0).await?;
        let row = c
            .query_opt(
                &format!(
                    "INSERT INTO uploads (id, owner_id, sha256, size, content_type, name, width, height, thumb_sha256, created_at)
                     SELECT $1, id, $3, $4, $5, $6, $7, $8, $9, $10 FROM users WHERE id = $2
                     RETURNING {}",
                    read::UPLOAD_COLUMNS
                ),
                &[
                    &id,
                    &upload.owner_id,
                    &upload.sha256,
                    &upload.size,
                    &upload.content_type,
                    &upload.name,
                    &upload.width,
                    &upload.height,
                    &upload.thumb_sha256,
                    &now,
                ],
            )
            .await
            .map_err(|e| inner.fail(0, "record an upload", e.into()))?;
        row.as_ref()
            .map(read::upload_row)
            .ok_or(StoreError::NotFound)
    }

    async fn upload(&self, id: i64) -> Result<Option<Upload>> {
        let c = self.inner.conn(0).await?;
        let row = c
            .query_opt(
                &format!("SELECT {} FROM uploads WHERE id = $1", read::UPLOAD_COLUMNS),
                &[&id],
            )
            .await
            .map_err(|e| self.inner.fail(0, "read an upload", e.into()))?;
        Ok(row.as_ref().map(read::upload_row))
    }

    async fn upload_channels(&self, id: i64) -> Result<Vec<i64>> {
        let inner = &self.inner;
        // Every shard's: one that does not answer shows none of its own (its members
        // are refused the file until it is back).
        let reads = inner.shards.iter().map(|shard| async move {
            let c = inner.conn(shard.index).await?;
            c.query(
                "SELECT DISTINCT channel_id FROM message_files WHERE upload_id = $1",
                &[&id],
            )
            .await
            .map_err(|e| inner.fail(shard.index, "read an upload's channels", e.into()))
        });
        let mut channels = Vec::new();
        for part in futures_util::future::join_all(reads).await {
            match part {
                Ok(rows) => channels.extend(rows.iter().map(|r| r.get::<_, i64>(0))),
                Err(StoreError::Unreachable) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(channels)
    }

    async fn upload_bytes(&self, owner: i64) -> Result<i64> {
        let c = self.inner.conn(0).await?;
        let row = c
            .query_one(
                "SELECT coalesce(sum(size), 0)::BIGINT FROM uploads WHERE owner_id = $1",
                &[&owner],
            )
            .await
            .map_err(|e| self.inner.fail(0, "read upload bytes", e.into()))?;
        Ok(row.get(0))
    }

    async fn collect_uploads(
        &self,
        before: i64,
        after: i64,
        limit: u32,
    ) -> Result<CollectedUploads> {
        let inner = &self.inner;
        let c = inner.conn(0).await?;
        let looked = c
            .query(
                "SELECT id, created_at FROM uploads WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &i64::from(limit)],
            )
            .await
            .map_err(|e| inner.fail(0, "read uploads", e.into()))?;
        let mut out = CollectedUploads {
            next_after: match looked.last() {
                Some(r) if looked.len() == limit as usize => Some(r.get(0)),
                _ => None,
            },
            ..CollectedUploads::default()
        };
        let old: Vec<i64> = looked
            .iter()
            .filter(|r| r.get::<_, i64>(1) < before)
            .map(|r| r.get(0))
            .collect();
        if old.is_empty() {
            return Ok(out);
        }
        // Carried anywhere: every shard must answer, or nothing is collected this time.
        let mut carried = std::collections::HashSet::new();
        for shard in &inner.shards {
            let s = inner.conn(shard.index).await?;
            let rows = s
                .query(
                    "SELECT DISTINCT upload_id FROM message_files WHERE upload_id = ANY($1)",
                    &[&old],
                )
                .await
                .map_err(|e| inner.fail(shard.index, "read carried uploads", e.into()))?;
            carried.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
        }
        let unused: Vec<i64> = old.into_iter().filter(|id| !carried.contains(id)).collect();
        let gone = c
            .query(
                "DELETE FROM uploads WHERE id = ANY($1) AND created_at < $2
                 RETURNING sha256, thumb_sha256",
                &[&unused, &before],
            )
            .await
            .map_err(|e| inner.fail(0, "delete uploads", e.into()))?;
        out.deleted = gone.len() as u64;
        for r in &gone {
            let sha: String = r.get(0);
            let thumb: Option<String> = r.get(1);
            for digest in std::iter::once(sha).chain(thumb) {
                if !out.digests.contains(&digest) {
                    out.digests.push(digest);
                }
            }
        }
        Ok(out)
    }

    async fn blob_in_use(&self, sha256: &str) -> Result<bool> {
        let c = self.inner.conn(0).await?;
        let row = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM uploads WHERE sha256 = $1)
                     OR EXISTS (SELECT 1 FROM uploads WHERE thumb_sha256 = $1)",
                &[&sha256],
            )
            .await
            .map_err(|e| self.inner.fail(0, "read a digest's uploads", e.into()))?;
        Ok(row.get(0))
    }
}

#[async_trait]
impl Channels for PostgresStore {
    async fn create_channel(
        &self,
        owner: i64,
        kind: ChannelKind,
        name: &str,
        members: &[i64],
    ) -> Result<Channel> {
        let inner = &self.inner;
        let rules = &inner.shared.rules;
        let mut others: Vec<i64> = members.iter().copied().filter(|&m| m != owner).collect();
        others.sort_unstable();
        others.dedup();
        let known: std::collections::HashSet<i64> = inner
            .live_users(&others)
            .await?
            .into_iter()
            .map(|u| u.id)
            .collect();
        let mut everyone = others.clone();
        everyone.push(owner);
        let counts = inner.membership_counts(&everyone).await?;
        let count = |u: i64| counts.get(&u).copied().unwrap_or(0);
        for &m in &others {
            rules::known_member(known.contains(&m), m)?;
            if rules::needs_consent(rules, owner, m) {
                rules::consent(inner.shares_channel(owner, m).await?)?;
            }
            rules::room(rules, count(m))?;
        }
        rules::room(rules, count(owner))?;
        let id = inner.shared.checked_id(now_ms())?;
        let shard = inner.shard_of_channel(id);
        let done = inner
            .submit(
                shard,
                Op::CreateChannel {
                    id,
                    owner,
                    kind,
                    name: name.to_owned(),
                    members: others,
                },
            )
            .await?;
        inner.relay_now(shard).await;
        match done {
            Done::Channel(c) => Ok(c),
            _ => Err(unexpected("create channel")),
        }
    }

    async fn open_dm(&self, user: i64, peer: i64) -> Result<(Channel, bool)> {
        let inner = &self.inner;
        let rules = &inner.shared.rules;
        let key = rules::dm_key(user, peer)?;
        let shard = inner.map[ring::bucket_of_key(&key)] as usize;
        {
            let c = inner.conn(shard).await?;
            let found = c
                .query_opt(
                    &format!(
                        "SELECT {} FROM channels c WHERE c.dm_key = $1",
                        read::CHANNEL_COLUMNS
                    ),
                    &[&key],
                )
                .await
                .map_err(|e| inner.fail(shard, "read DM", e.into()))?;
            if let Some(row) = found {
                return Ok((
                    read::channel_row(&row).map_err(|e| inner.fail(shard, "read DM", e))?,
                    false,
                ));
            }
        }
        if inner.live_users(&[peer]).await?.is_empty() {
            return Err(StoreError::NotFound);
        }
        let counts = inner.membership_counts(&[user, peer]).await?;
        rules::room(rules, counts.get(&user).copied().unwrap_or(0))?;
        rules::room(rules, counts.get(&peer).copied().unwrap_or(0))?;
        if rules.consent == super::Consent::SharedChannel {
            rules::pending_dms(rules, inner.pending_dms(peer).await?)?;
        }
        // The DM is made on its pair's shard: an id whose bucket maps there.
        let id = loop {
            let id = inner.shared.checked_id(now_ms())?;
            if inner.shard_of_channel(id) == shard {
                break id;
            }
        };
        let done = inner
            .submit(
                shard,
                Op::OpenDm {
                    id,
                    key,
                    user,
                    peer,
                },
            )
            .await?;
        match done {
            Done::Dm(c, created) => {
                if created {
                    inner.relay_now(shard).await;
                }
                Ok((c, created))
            }
            _ => Err(unexpected("open DM")),
        }
    }

    async fn rename_channel(&self, actor: i64, channel_id: i64, name: &str) -> Result<Channel> {
        let shard = self.inner.shard_of_channel(channel_id);
        match self
            .inner
            .submit(
                shard,
                Op::RenameChannel {
                    actor,
                    channel_id,
                    name: name.to_owned(),
                },
            )
            .await?
        {
            Done::Channel(c) => Ok(c),
            _ => Err(unexpected("rename")),
        }
    }

    async fn create_incoming_webhook(
        &self,
        actor: i64,
        channel_id: i64,
        hook: NewIncomingWebhook,
    ) -> Result<IncomingWebhook> {
        let inner = &self.inner;
        let rules = inner.shared.rules;
        let shard = inner.shard_of_channel(channel_id);
        let now = now_ms();
        let id = crate::store::session_id(&hook.token);
        let mut c = inner.conn(shard).await?;
        let result: std::result::Result<IncomingWebhook, Fail> = async {
            let tx = c.transaction().await?;
            // One webhook of a channel at a time (the cap holds), and the memberships
            // checked stay until this commits.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&channel_id])
                .await?;
            manager_check(&*tx, channel_id, actor).await?;
            let bot_is_member = tx
                .query_opt(
                    "SELECT 1 FROM members WHERE channel_id = $1 AND user_id = $2 FOR SHARE",
                    &[&channel_id, &hook.bot_id],
                )
                .await?
                .is_some();
            let hooks: i64 = tx
                .query_one(
                    "SELECT (SELECT count(*) FROM incoming_webhooks WHERE channel_id = $1)
                          + (SELECT count(*) FROM subscriptions WHERE channel_id = $1)",
                    &[&channel_id],
                )
                .await?
                .get(0);
            rules::webhook_room(&rules, hooks as u64, bot_is_member)?;
            tx.execute(
                "INSERT INTO incoming_webhooks (token_hash, id, channel_id, bot_id, creator_id, name, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &&hook.token[..],
                    &id,
                    &channel_id,
                    &hook.bot_id,
                    &actor,
                    &hook.name,
                    &now,
                ],
            )
            .await?;
            tx.commit().await?;
            Ok(IncomingWebhook {
                id,
                channel_id,
                bot_id: hook.bot_id,
                creator_id: actor,
                name: hook.name.clone(),
                created_at: now,
            })
        }
        .await;
        result.map_err(|e| inner.fail(shard, "create webhook", e))
    }

    async fn incoming_webhooks(&self, actor: i64, channel_id: i64) -> Result<Vec<IncomingWebhook>> {
        let inner = &self.inner;
        let shard = inner.shard_of_channel(channel_id);
        let c = inner.conn(shard).await?;
        let client: &tokio_postgres::Client = &c;
        let result: std::result::Result<Vec<IncomingWebhook>, Fail> = async {
            manager_check(client, channel_id, actor).await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {} FROM incoming_webhooks WHERE channel_id = $1
                         ORDER BY created_at, id",
                        read::WEBHOOK_COLUMNS
                    ),
                    &[&channel_id],
                )
                .await?;
            Ok(rows.iter().map(read::webhook_row).collect())
        }
        .await;
        result.map_err(|e| inner.fail(shard, "read webhooks", e))
    }

    async fn delete_incoming_webhook(&self, actor: i64, channel_id: i64, id: i64) -> Result<bool> {
        self.inner
            .delete_managed(actor, channel_id, id, "incoming_webhooks")
            .await
    }

    async fn incoming_webhook(
        &self,
        channel_id: i64,
        token: TokenHash,
    ) -> Result<Option<IncomingWebhook>> {
        let inner = &self.inner;
        let shard = inner.shard_of_channel(channel_id);
        let c = inner.conn(shard).await?;
        let row = c
            .query_opt(
                &format!(
                    "SELECT {} FROM incoming_webhooks WHERE token_hash = $1 AND channel_id = $2",
                    read::WEBHOOK_COLUMNS
                ),
                &[&&token[..], &channel_id],
            )
            .await
            .map_err(|e| inner.fail(shard, "read webhook", e.into()))?;
        Ok(row.as_ref().map(read::webhook_row))
    }

    async fn create_subscription(
        &self,
        actor: i64,
        channel_id: i64,
        sub: NewSubscription,
    ) -> Result<Subscription> {
        let inner = &self.inner;
        let rules = inner.shared.rules;
        let shard = inner.shard_of_channel(channel_id);
        let now = now_ms();
        let id = inner.shared.checked_id(now)?;
        let mut c = inner.conn(shard).await?;
        let result: std::result::Result<Subscription, Fail> = async {
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&channel_id])
                .await?;
            manager_check(&*tx, channel_id, actor).await?;
            let hooks: i64 = tx
                .query_one(
                    "SELECT (SELECT count(*) FROM incoming_webhooks WHERE channel_id = $1)
                          + (SELECT count(*) FROM subscriptions WHERE channel_id = $1)",
                    &[&channel_id],
                )
                .await?
                .get(0);
            rules::webhook_room(&rules, hooks as u64, true)?;
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO subscriptions (id, channel_id, creator_id, url, secret, types, cursor, status, created_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8)
                         RETURNING {}",
                        read::SUBSCRIPTION_COLUMNS
                    ),
                    &[
                        &id,
                        &channel_id,
                        &actor,
                        &sub.url,
                        &sub.secret,
                        &sub.types,
                        &sub.cursor,
                        &now,
                    ],
                )
                .await?;
            tx.commit().await?;
            read::subscription_row(&row)
        }
        .await;
        result.map_err(|e| inner.fail(shard, "create subscription", e))
    }

    async fn subscriptions(&self, actor: i64, channel_id: i64) -> Result<Vec<Subscription>> {
        let inner = &self.inner;
        let shard = inner.shard_of_channel(channel_id);
        let c = inner.conn(shard).await?;
        let client: &tokio_postgres::Client = &c;
        let result: std::result::Result<Vec<Subscription>, Fail> = async {
            manager_check(client, channel_id, actor).await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {} FROM subscriptions WHERE channel_id = $1 ORDER BY id",
                        read::SUBSCRIPTION_COLUMNS
                    ),
                    &[&channel_id],
                )
                .await?;
            rows.iter().map(read::subscription_row).collect()
        }
        .await;
        result.map_err(|e| inner.fail(shard, "read subscriptions", e))
    }

    async fn update_subscription(
        &self,
        actor: i64,
        channel_id: i64,
        id: i64,
        change: SubscriptionChange,
    ) -> Result<Subscription> {
        let inner = &self.inner;
        let shard = inner.shard_of_channel(channel_id);
        let mut c = inner.conn(shard).await?;
        let result: std::result::Result<Subscription, Fail> = async {
            let tx = c.transaction().await?;
            manager_check(&*tx, channel_id, actor).await?;
            let Some(sub) = find_subscription(&tx, channel_id, id).await? else {
                return Err(StoreError::NotFound.into());
            };
            let next = rules::change_subscription(&sub, change, actor)?;
            store_subscription(&tx, &next).await?;
            tx.commit().await?;
            Ok(next)
        }
        .await;
        result.map_err(|e| inner.fail(shard, "update subscription", e))
    }

    async fn delete_subscription(&self, actor: i64, channel_id: i64, id: i64) -> Result<bool> {
        self.inner
            .delete_managed(actor, channel_id, id, "subscriptions")
            .await
    }

    async fn due_subscriptions(
        &self,
        node: &str,
        now: i64,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Subscription>> {
        let inner = &self.inner;
        let mut due = Vec::new();
        // Every shard; one that is down is skipped (its subscriptions wait for it).
        for shard in 0..inner.shards.len() {
            let Ok(c) = inner.conn(shard).await else {
                continue;
            };
            let rows = c
                .query(
                    &format!(
                        "SELECT {} FROM subscriptions
                         WHERE id > $4 AND status = 'active' AND next_try_at <= $1
                           AND (lease_until <= $1 OR lease_node = $3)
                         ORDER BY id LIMIT $2",
                        read::SUBSCRIPTION_COLUMNS
                    ),
                    &[&now, &i64::from(limit), &node, &after],
                )
                .await;
            match rows {
                Ok(rows) => {
                    for r in &rows {
                        due.push(
                            read::subscription_row(r)
                                .map_err(|e| inner.fail(shard, "read subscriptions", e))?,
                        );
                    }
                }
                Err(e) => {
                    tracing::debug!(shard, error = %e, "read due subscriptions");
                }
            }
        }
        // A page by id over every shard: each gave its first `limit` past `after`.
        due.sort_by_key(|s| s.id);
        due.truncate(limit as usize);
        Ok(due)
    }

    async fn claim_subscription(
        &self,
        channel_id: i64,
        id: i64,
        node: &str,
        now: i64,
        until: i64,
    ) -> Result<Option<Subscription>> {
        let inner = &self.inner;
        let shard = inner.shard_of_channel(channel_id);
        let c = inner.conn(shard).await?;
        let row = c
            .query_opt(
                &format!(
                    "UPDATE subscriptions SET lease_node = $3, lease_until = $5
                     WHERE id = $1 AND channel_id = $2 AND status = 'active'
                       AND (lease_until <= $4 OR lease_node = $3)
                     RETURNING {}",
                    read::SUBSCRIPTION_COLUMNS
                ),
                &[&id, &channel_id, &node, &now, &until],
            )
            .await
            .map_err(|e| inner.fail(shard, "claim subscription", e.into()))?;
        row.as_ref()
            .map(read::subscription_row)
            .transpose()
            .map_err(|e| inner.fail(shard, "claim subscription", e))
    }

    async fn record_delivery(
        &self,
        channel_id: i64,
        id: i64,
        node: &str,
        now: i64,
        report: DeliveryReport,
    ) -> Result<bool> {
        let inner = &self.inner;
        let shard = inner.shard_of_channel(channel_id);
        let mut c = inner.conn(shard).await?;
        let result: std::result::Result<bool, Fail> = async {
            let tx = c.transaction().await?;
            let holder = tx
                .query_opt(
                    "SELECT lease_node FROM subscriptions WHERE id = $1 AND channel_id = $2 FOR UPDATE",
                    &[&id, &channel_id],
                )
                .await?;
            let holds = holder
                .and_then(|r| r.get::<_, Option<String>>(0))
                .is_some_and(|n| n == node);
            if !holds {
                return Ok(false);
            }
            let Some(sub) = find_subscription(&tx, channel_id, id).await? else {
                return Ok(false);
            };
            let next = rules::report_delivery(&sub, &report, now);
            store_subscription(&tx, &next).await?;
            tx.execute(
                "UPDATE subscriptions SET lease_until = $2 WHERE id = $1",
                &[&id, &report.lease_until],
            )
            .await?;
            tx.commit().await?;
            let moved = sub.cursor != report.from;
            Ok(next.status == crate::store::SubscriptionStatus::Active && !moved)
        }
        .await;
        result.map_err(|e| inner.fail(shard, "record delivery", e))
    }

    async fn channel(&self, channel_id: i64, user_id: i64) -> Result<Option<(Channel, Role)>> {
        let shard = self.inner.shard_of_channel(channel_id);
        let c = self.inner.conn(shard).await?;
        read::member_channel(&**c, channel_id, user_id)
            .await
            .map_err(|e| self.inner.fail(shard, "read channel", e))
    }

    async fn channel_to_read(
        &self,
        channel_id: i64,
        user_id: i64,
    ) -> Result<Option<(Channel, Role, ReadFence)>> {
        let shard = self.inner.shard_of_channel(channel_id);
        let c = self.inner.conn(shard).await?;
        if self.inner.shards[shard].replicas.is_empty() {
            return read::member_channel(&**c, channel_id, user_id)
                .await
                .map(|found| found.map(|(ch, role)| (ch, role, ReadFence::PRIMARY)))
                .map_err(|e| self.inner.fail(shard, "read channel", e));
        }
        // The primary's WAL position, read after everything acknowledged before this
        // call committed: a replica that has replayed past it has all of that.
        read::member_channel_at(&**c, channel_id, user_id)
            .await
            .map(|found| found.map(|(ch, role, lsn)| (ch, role, ReadFence(Some(lsn)))))
            .map_err(|e| self.inner.fail(shard, "read channel", e))
    }

    async fn channels(&self, user_id: i64) -> Result<Vec<ChannelView>> {
        let listing = self.channel_listing(user_id).await?;
        if !listing.unavailable.is_empty() {
            return Err(StoreError::Unreachable);
        }
        Ok(listing.views)
    }

    async fn channel_listing(&self, user_id: i64) -> Result<super::ChannelListing> {
        let inner = &self.inner;
        let ids: Vec<i64> = {
            let c = inner.conn(0).await?;
            c.query(
                "SELECT channel_id FROM user_channels WHERE user_id = $1",
                &[&user_id],
            )
            .await
            .map_err(|e| inner.fail(0, "read the channel index", e.into()))?
            .iter()
            .map(|r| r.get(0))
            .collect()
        };
        let mut by_shard: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
        for id in ids {
            by_shard
                .entry(inner.shard_of_channel(id))
                .or_default()
                .push(id);
        }
        let reads = by_shard.into_iter().map(|(shard, ids)| async move {
            let read = async {
                let c = inner.conn(shard).await?;
                read::channels_among(&**c, user_id, &ids)
                    .await
                    .map_err(|e| inner.fail(shard, "read channels", e))
            };
            (read.await, ids)
        });
        let mut listing = super::ChannelListing::default();
        for (part, ids) in futures_util::future::join_all(reads).await {
            match part {
                Ok(views) => listing.views.extend(views),
                // A shard that is down: its channels are named, the rest listed.
                Err(StoreError::Unreachable) => listing.unavailable.extend(ids),
                Err(e) => return Err(e),
            }
        }
        listing.views.sort_by_key(|v| v.channel.id);
        listing.unavailable.sort_unstable();
        Ok(listing)
    }

    async fn members(&self, user_id: i64, channel_id: i64) -> Result<Vec<Member>> {
        let inner = &self.inner;
        let shard = inner.shard_of_channel(channel_id);
        let roles = {
            let c = inner.conn(shard).await?;
            let client: &tokio_postgres::Client = &c;
            let check = async {
                if read::member_channel(client, channel_id, user_id)
                    .await?
                    .is_none()
                {
                    return Err(Fail::Store(StoreError::NotFound));
                }
                read::member_roles(client, channel_id).await
            };
            check
                .await
                .map_err(|e| inner.fail(shard, "read members", e))?
        };
        let ids: Vec<i64> = roles.iter().map(|(id, _)| *id).collect();
        let users = inner.existing_users(&ids).await?;
        Ok(read::members(roles, users))
    }

    async fn put_member(
        &self,
        actor: i64,
        channel_id: i64,
        user_id: i64,
        role: Option<Role>,
    ) -> Result<()> {
        let inner = &self.inner;
        let shard = inner.shard_of_channel(channel_id);
        let admitted = inner.admit(actor, user_id).await?;
        inner
            .submit(
                shard,
                Op::PutMember {
                    actor,
                    channel_id,
                    user_id,
                    role,
                    admitted,
                },
            )
            .await?;
        inner.relay_now(shard).await;
        Ok(())
    }

    async fn remove_member(&self, actor: i64, channel_id: i64, user_id: i64) -> Result<()> {
        let inner = &self.inner;
        let shard = inner.shard_of_channel(channel_id);
        inner
            .submit(
                shard,
                Op::RemoveMember {
                    actor,
                    channel_id,
                    user_id,
                },
            )
            .await?;
        inner.relay_now(shard).await;
        Ok(())
    }

    async fn mark_read(&self, user_id: i64, channel_id: i64, seq: i64) -> Result<()> {
        let shard = self.inner.shard_of_channel(channel_id);
        self.inner
            .submit(
                shard,
                Op::MarkRead {
                    user_id,
                    channel_id,
                    seq,
                },
            )
            .await?;
        Ok(())
    }

    fn post_message<'a, 'b, 'c, 'async_trait>(
        &'a self,
        author: i64,
        channel_id: i64,
        text: &'b str,
        client_id: Option<&'c str>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Posted>> + Send + 'async_trait>>
    where
        'a: 'async_trait,
        'b: 'async_trait,
        'c: 'async_trait,
        Self: 'async_trait,
    {
        // Queued at once, not on the future's first poll: the order of calls is the order
        // of commits (one connection's sends to a channel commit in send order).
        let shard = self.inner.shard_of_channel(channel_id);
        // A text that may mention someone goes alone (its names are resolved on shard 0),
        // still queued in this call.
        let op = if crate::username::mentions(text).is_empty() {
            Op::Post {
                author,
                channel_id,
                text: text.to_owned(),
                client_id: client_id.map(str::to_owned),
            }
        } else {
            Op::SlowPost {
                author,
                channel_id,
                root_id: None,
                text: text.to_owned(),
                client_id: client_id.map(str::to_owned),
                files: Vec::new(),
                attach_since: 0,
            }
        };
        let answer = self.inner.shards[shard].writer.submit(op);
        Box::pin(async move {
            match answer.await? {
                Done::Posted(p) => Ok(p),
                _ => Err(unexpected("post")),
            }
        })
    }

    async fn edit_message(
        &self,
        actor: i64,
        channel_id: i64,
        message_id: i64,
        text: &str,
    ) -> Result<Message> {
        let shard = self.inner.shard_of_channel(channel_id);
        match self
            .inner
            .submit(
                shard,
                Op::Edit {
                    actor,
                    channel_id,
                    message_id,
                    text: text.to_owned(),
                },
            )
            .await?
        {
            Done::Message(m) => Ok(m),
            _ => Err(unexpected("edit")),
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
        let shard = self.inner.shard_of_channel(channel_id);
        let op = Op::SlowPost {
            author,
            channel_id,
            root_id: Some(root_id),
            text: text.to_owned(),
            client_id: client_id.map(str::to_owned),
            files: Vec::new(),
            attach_since: 0,
        };
        match self.inner.submit(shard, op).await? {
            Done::Posted(p) => Ok(p),
            _ => Err(unexpected("reply")),
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
        let shard = self.inner.shard_of_channel(channel_id);
        let op = Op::SlowPost {
            author,
            channel_id,
            root_id,
            text: text.to_owned(),
            client_id: client_id.map(str::to_owned),
            files: files.to_vec(),
            attach_since,
        };
        match self.inner.submit(shard, op).await? {
            Done::Posted(p) => Ok(p),
            _ => Err(unexpected("post with files")),
        }
    }

    async fn mentions(
        &self,
        user_id: i64,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Page<Message>> {
        let inner = &self.inner;
        let before = before.unwrap_or(i64::MAX);
        // Every shard's newest, merged: a shard that does not answer shows none of its own.
        let reads = inner.shards.iter().map(|shard| async move {
            let c = inner.conn(shard.index).await?;
            read::mentions(&**c, user_id, before, limit + 1)
                .await
                .map_err(|e| inner.fail(shard.index, "read mentions", e))
        });
        let mut items = Vec::new();
        for part in futures_util::future::join_all(reads).await {
            match part {
                Ok(found) => items.extend(found),
                Err(StoreError::Unreachable) => {}
                Err(e) => return Err(e),
            }
        }
        items.sort_unstable_by_key(|m: &Message| std::cmp::Reverse(m.id));
        let has_more = items.len() > limit as usize;
        items.truncate(limit as usize);
        Ok(Page { items, has_more })
    }

    async fn authored(&self, author: i64, after: i64, limit: u32) -> Result<Page<Message>> {
        let inner = &self.inner;
        // Each shard's next, merged by id; every shard must answer.
        let reads = inner.shards.iter().map(|shard| async move {
            let c = inner.conn(shard.index).await?;
            read::authored(&**c, author, after, limit + 1)
                .await
                .map_err(|e| inner.fail(shard.index, "read a user's messages", e))
        });
        let mut items = Vec::new();
        for part in futures_util::future::join_all(reads).await {
            items.extend(part?);
        }
        items.sort_unstable_by_key(|m: &Message| m.id);
        let has_more = items.len() > limit as usize;
        items.truncate(limit as usize);
        Ok(Page { items, has_more })
    }

    async fn sharing(&self, user_id: i64, others: &[i64]) -> Result<Vec<i64>> {
        // As consent counts it: a DM once the other answered it or opened it.
        let mut found = Vec::new();
        for &other in others {
            if self.inner.shares_channel(user_id, other).await? {
                found.push(other);
            }
        }
        Ok(found)
    }

    async fn search(&self, user_id: i64, query: &SearchQuery) -> Result<Page<Message>> {
        let inner = &self.inner;
        let budget_ms = inner.shared.rules.search_budget.as_millis() as u64;
        let shards: Vec<usize> = match query.channel_id {
            Some(channel_id) => {
                if self.channel(channel_id, user_id).await?.is_none() {
                    return Err(StoreError::NotFound);
                }
                vec![inner.shard_of_channel(channel_id)]
            }
            None => (0..inner.shards.len()).collect(),
        };
        let skip = match query.order {
            SearchOrder::Newest => 0,
            SearchOrder::Relevance => query.from.unwrap_or(0).max(0) as usize,
        };
        let fetch = (skip + query.limit as usize + 1) as i64;
        // Every shard's best, merged: a shard that does not answer shows none of its own.
        let reads = shards.into_iter().map(|shard| async move {
            let mut c = inner.conn(shard).await?;
            read::search(&mut c, user_id, query, fetch, budget_ms)
                .await
                .map_err(|e| inner.fail(shard, "search", e))
        });
        let mut found = Vec::new();
        let (mut answered, mut down) = (0, 0);
        for part in futures_util::future::join_all(reads).await {
            match part {
                Ok(part) => {
                    answered += 1;
                    found.extend(part);
                }
                Err(StoreError::Unreachable) => down += 1,
                Err(e) => return Err(e),
            }
        }
        if answered == 0 && down > 0 {
            return Err(StoreError::Unreachable);
        }
        match query.order {
            SearchOrder::Newest => found.sort_unstable_by_key(|(m, _)| std::cmp::Reverse(m.id)),
            SearchOrder::Relevance => {
                found.sort_unstable_by(|(a, ra), (b, rb)| rb.total_cmp(ra).then(b.id.cmp(&a.id)))
            }
        }
        let mut items: Vec<Message> = found.into_iter().skip(skip).map(|(m, _)| m).collect();
        let has_more = items.len() > query.limit as usize;
        items.truncate(query.limit as usize);
        Ok(Page { items, has_more })
    }

    async fn message(&self, channel_id: i64, message_id: i64) -> Result<Option<Message>> {
        let shard = self.inner.shard_of_channel(channel_id);
        let c = self.inner.conn(shard).await?;
        let row = c
            .query_opt(read::MESSAGE_BY_ID, &[&message_id, &channel_id])
            .await
            .map_err(|e| self.inner.fail(shard, "read message", e.into()))?;
        Ok(row.as_ref().map(read::message_row))
    }

    async fn thread(
        &self,
        channel_id: i64,
        root_id: i64,
        query: HistoryQuery,
    ) -> Result<Page<Message>> {
        let shard = self.inner.shard_of_channel(channel_id);
        let c = self.inner.conn(shard).await?;
        read::thread(&**c, channel_id, root_id, query)
            .await
            .map_err(|e| self.inner.fail(shard, "read thread", e))
    }

    async fn delete_message(&self, actor: i64, channel_id: i64, message_id: i64) -> Result<()> {
        let shard = self.inner.shard_of_channel(channel_id);
        self.inner
            .submit(
                shard,
                Op::Delete {
                    actor,
                    channel_id,
                    message_id,
                },
            )
            .await?;
        Ok(())
    }

    async fn react(
        &self,
        actor: i64,
        channel_id: i64,
        message_id: i64,
        emoji: &str,
        add: bool,
    ) -> Result<bool> {
        let shard = self.inner.shard_of_channel(channel_id);
        let op = Op::React {
            actor,
            channel_id,
            message_id,
            emoji: emoji.to_owned(),
            add,
        };
        match self.inner.submit(shard, op).await? {
            Done::Changed(changed) => Ok(changed),
            _ => Err(unexpected("react")),
        }
    }

    async fn reactions(
        &self,
        viewer: i64,
        channel_id: i64,
        message_ids: &[i64],
    ) -> Result<Vec<(i64, Vec<ReactionCount>)>> {
        let shard = self.inner.shard_of_channel(channel_id);
        let c = self.inner.conn(shard).await?;
        read::reactions(&**c, viewer, channel_id, message_ids)
            .await
            .map_err(|e| self.inner.fail(shard, "read reactions", e))
    }

    async fn reactors(
        &self,
        channel_id: i64,
        message_id: i64,
        emoji: &str,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<Reactor>> {
        let inner = &self.inner;
        let shard = inner.shard_of_channel(channel_id);
        let (ids, has_more) = {
            let c = inner.conn(shard).await?;
            read::reactor_ids(&**c, channel_id, message_id, emoji, after, limit)
                .await
                .map_err(|e| inner.fail(shard, "read reactors", e))?
        };
        let users: Vec<i64> = ids.iter().map(|(id, ..)| *id).collect();
        let mut by_id: HashMap<i64, User> = inner
            .existing_users(&users)
            .await?
            .into_iter()
            .map(|u| (u.id, u))
            .collect();
        // A reactor whose account is gone is left out.
        let items = ids
            .into_iter()
            .filter_map(|(id, at, seq)| by_id.remove(&id).map(|user| Reactor { user, at, seq }))
            .collect();
        Ok(Page { items, has_more })
    }

    async fn log(
        &self,
        channel_id: i64,
        after_seq: i64,
        limit: u32,
        fence: ReadFence,
    ) -> Result<Page<Event>> {
        let shard = self.inner.shard_of_channel(channel_id);
        if let Some(page) = self
            .inner
            .on_replica(shard, fence, async |c| {
                read::events(c, channel_id, after_seq, limit).await
            })
            .await
        {
            return Ok(page);
        }
        let c = self.inner.conn(shard).await?;
        read::events(&**c, channel_id, after_seq, limit)
            .await
            .map_err(|e| self.inner.fail(shard, "read log", e))
    }

    async fn history(
        &self,
        channel_id: i64,
        query: HistoryQuery,
        fence: ReadFence,
    ) -> Result<Page<Message>> {
        let shard = self.inner.shard_of_channel(channel_id);
        if let Some(page) = self
            .inner
            .on_replica(shard, fence, async |c| {
                read::messages(c, channel_id, query).await
            })
            .await
        {
            return Ok(page);
        }
        let c = self.inner.conn(shard).await?;
        read::messages(&**c, channel_id, query)
            .await
            .map_err(|e| self.inner.fail(shard, "read history", e))
    }

    async fn last_seqs(&self, ids: &[i64]) -> Result<Vec<(i64, i64)>> {
        let inner = &self.inner;
        let mut by_shard: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
        for &id in ids {
            by_shard
                .entry(inner.shard_of_channel(id))
                .or_default()
                .push(id);
        }
        // One query per shard, all at once.
        let reads = by_shard.into_iter().map(|(shard, ids)| async move {
            let c = inner.conn(shard).await?;
            read::last_seqs(&**c, &ids)
                .await
                .map_err(|e| inner.fail(shard, "read last seqs", e))
        });
        let mut all = Vec::with_capacity(ids.len());
        for part in futures_util::future::join_all(reads).await {
            match part {
                Ok(seqs) => all.extend(seqs),
                Err(StoreError::Unreachable) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(all)
    }
}
