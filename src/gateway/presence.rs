//! Presence: whether each user is online (a connection of theirs is open and not idle),
//! idle (every open connection said so) or offline (none open), told to the connections
//! that asked about them.
//!
//! - A change is told at most once per [`COALESCE`] per user: changes in between wait and
//!   go out as one (the state at that time; nothing if it is back to what was told).
//! - Going offline waits [`Presence::grace`]: a page reload or a reconnect does not show
//!   the user offline.
//! - Only connections that subscribed to a user hear of them ([`Presence::watch`]), so a
//!   big server does not send every change to everyone. Who may watch whom is the
//!   caller's check (a shared channel).
//! - When a user goes offline, the time is recorded in the store (`last_seen_at`), so it
//!   outlives this process. A failed write is logged; the time stays known in memory.
//! - In a cluster each node tells the others its own view of its users ([`Remote`]), and
//!   republishes it every [`REFRESH`]; a node's view of a user expires after [`EXPIRY`]
//!   without word (a node that died stops counting).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::hub::ConnId;
use super::outbox::{Item, Outbox};
use crate::model::{Presence as Seen, PresenceStatus as Status};
use crate::store::Store;
use crate::wire::protocol;

/// Least time between two changes told of one user.
pub const COALESCE: Duration = Duration::from_secs(1);
/// How often the ticker looks for changes whose time has come.
pub const TICK: Duration = Duration::from_millis(200);
/// Users one connection may watch at once.
pub const MAX_WATCHED: usize = 1_000;
/// How often a node republishes its users' presence to the other nodes.
pub const REFRESH: Duration = Duration::from_secs(20);
/// Users per refresh message (well under NATS's default 1 MiB payload).
pub const REFRESH_CHUNK: usize = 5_000;
/// How long another node's word on a user holds without a refresh.
pub const EXPIRY: Duration = Duration::from_secs(50);

/// Another node's word on a user.
#[derive(Debug, Clone, Copy)]
struct Remote {
    status: Status,
    until: Instant,
}

/// What watchers were last told of a user, and when.
#[derive(Debug, Clone, Copy)]
struct Told {
    status: Status,
    at: Instant,
}

struct Watcher {
    outbox: Arc<Outbox>,
    users: HashSet<i64>,
}

#[derive(Default)]
struct Inner {
    /// This node's open connections by user, each with whether it is idle.
    local: HashMap<i64, HashMap<ConnId, bool>>,
    /// Other nodes' word, by user and node.
    remote: HashMap<i64, HashMap<u64, Remote>>,
    told: HashMap<i64, Told>,
    /// Users with a change waiting, and when it may go out.
    due: HashMap<i64, Instant>,
    /// When users were last online (Unix ms), as this node knows it.
    last_seen: HashMap<i64, i64>,
    watchers: HashMap<i64, HashSet<ConnId>>,
    watching: HashMap<ConnId, Watcher>,
    /// What this node last told the other nodes of its own users.
    published: HashMap<i64, Status>,
}

impl Inner {
    /// The user's status over this node's connections and the other nodes' word.
    fn status(&self, user: i64) -> Status {
        let now = Instant::now();
        let local = self.local_status(user);
        let remote = self
            .remote
            .get(&user)
            .into_iter()
            .flat_map(HashMap::values)
            .filter(|r| r.until > now)
            .map(|r| r.status)
            .max()
            .unwrap_or(Status::Offline);
        local.max(remote)
    }

    /// This node's own view of the user (what it tells the others).
    fn local_status(&self, user: i64) -> Status {
        match self.local.get(&user) {
            Some(conns) if conns.values().any(|idle| !idle) => Status::Online,
            Some(conns) if !conns.is_empty() => Status::Idle,
            _ => Status::Offline,
        }
    }

    fn seen(&self, user: i64) -> Seen {
        let status = self
            .told
            .get(&user)
            .map_or_else(|| self.status(user), |t| t.status);
        Seen {
            user_id: user,
            status,
            last_seen_at: (status == Status::Offline)
                .then(|| self.last_seen.get(&user).copied())
                .flatten(),
        }
    }
}

/// Called with a user's own new status on this node, for the other nodes.
pub type PublishSink = Box<dyn Fn(i64, Status) + Send + Sync>;

pub struct Presence {
    inner: Mutex<Inner>,
    store: Arc<dyn Store>,
    /// How long a user's last connection must stay closed before they show offline.
    grace: Duration,
    publish: std::sync::OnceLock<PublishSink>,
}

impl Presence {
    pub fn new(store: Arc<dyn Store>, grace: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            store,
            grace,
            publish: std::sync::OnceLock::new(),
        })
    }

    /// Where this node's own changes go for the other nodes (a cluster bus). Set once.
    pub fn on_publish(&self, sink: PublishSink) {
        let _ = self.publish.set(sink);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection of `user` opened (not idle).
    pub fn connected(&self, conn: ConnId, user: i64) {
        let mut inner = self.lock();
        inner.local.entry(user).or_default().insert(conn, false);
        self.changed(&mut inner, user);
    }

    /// A connection closed: it no longer counts, and watches no one.
    pub fn disconnected(&self, conn: ConnId, user: i64) {
        let mut inner = self.lock();
        if let Some(conns) = inner.local.get_mut(&user) {
            conns.remove(&conn);
            if conns.is_empty() {
                inner.local.remove(&user);
                inner.last_seen.insert(user, crate::clock::now_ms());
            }
        }
        if let Some(w) = inner.watching.remove(&conn) {
            for u in w.users {
                if let Some(set) = inner.watchers.get_mut(&u) {
                    set.remove(&conn);
                    if set.is_empty() {
                        inner.watchers.remove(&u);
                    }
                }
            }
        }
        self.changed(&mut inner, user);
    }

    /// A connection says its user is idle there (or active again).
    pub fn set_idle(&self, conn: ConnId, user: i64, idle: bool) {
        let mut inner = self.lock();
        let Some(slot) = inner.local.get_mut(&user).and_then(|c| c.get_mut(&conn)) else {
            return;
        };
        if *slot != idle {
            *slot = idle;
            if idle {
                inner.last_seen.insert(user, crate::clock::now_ms());
            }
            self.changed(&mut inner, user);
        }
    }

    /// Another node's word on a user (`node`: its id).
    pub fn remote(&self, node: u64, user: i64, status: Status) {
        let mut inner = self.lock();
        let until = Instant::now() + EXPIRY;
        if status == Status::Offline {
            if let Some(nodes) = inner.remote.get_mut(&user) {
                nodes.remove(&node);
                if nodes.is_empty() {
                    inner.remote.remove(&user);
                }
            }
            // Its time is the other node's to record; read from the store when asked.
        } else {
            inner
                .remote
                .entry(user)
                .or_default()
                .insert(node, Remote { status, until });
        }
        self.changed(&mut inner, user);
    }

    /// Schedules telling the user's new status, if it differs from what was told.
    fn changed(&self, inner: &mut Inner, user: i64) {
        let now = Instant::now();
        let local = inner.local_status(user);
        if inner
            .published
            .get(&user)
            .copied()
            .unwrap_or(Status::Offline)
            != local
        {
            if local == Status::Offline {
                inner.published.remove(&user);
            } else {
                inner.published.insert(user, local);
            }
            if let Some(publish) = self.publish.get() {
                publish(user, local);
            }
        }
        let status = inner.status(user);
        let told = inner.told.get(&user).copied();
        if told.map_or(Status::Offline, |t| t.status) == status {
            inner.due.remove(&user);
            return;
        }
        let mut when = told.map_or(now, |t| t.at + COALESCE);
        if status == Status::Offline {
            when = when.max(now + self.grace);
        }
        if when <= now {
            self.tell(inner, user, status, now);
        } else {
            inner.due.insert(user, when);
        }
    }

    /// Tells the user's watchers of the status; records an offline user's last time.
    fn tell(&self, inner: &mut Inner, user: i64, status: Status, now: Instant) {
        inner.due.remove(&user);
        if status == Status::Offline {
            inner.told.remove(&user);
        } else {
            inner.told.insert(user, Told { status, at: now });
        }
        if let Some(conns) = inner.watchers.get(&user) {
            let frame: axum::extract::ws::Utf8Bytes =
                protocol::presence_updated(&inner.seen(user)).into();
            for conn in conns {
                if let Some(w) = inner.watching.get(conn) {
                    w.outbox.push(Item::Frame(frame.clone()));
                }
            }
        }
        // An offline user's time goes to the store, and from memory (read back from the
        // store when asked): memory holds the online users' state only.
        if status == Status::Offline
            && let Some(at) = inner.last_seen.remove(&user)
        {
            let store = Arc::clone(&self.store);
            tokio::spawn(async move {
                if let Err(e) = store.record_last_seen(&[(user, at)]).await {
                    tracing::warn!(user, error = %e, "record when a user was last online");
                }
            });
        }
    }

    /// Tells the changes whose time has come; drops other nodes' word that expired.
    pub fn tick(&self) {
        let mut inner = self.lock();
        let now = Instant::now();
        let expired: Vec<i64> = inner
            .remote
            .iter()
            .filter(|(_, nodes)| nodes.values().any(|r| r.until <= now))
            .map(|(u, _)| *u)
            .collect();
        for user in expired {
            if let Some(nodes) = inner.remote.get_mut(&user) {
                nodes.retain(|_, r| r.until > now);
                if nodes.is_empty() {
                    inner.remote.remove(&user);
                }
            }
            self.changed(&mut inner, user);
        }
        let ready: Vec<i64> = inner
            .due
            .iter()
            .filter(|(_, when)| **when <= now)
            .map(|(u, _)| *u)
            .collect();
        for user in ready {
            let status = inner.status(user);
            let told = inner.told.get(&user).map_or(Status::Offline, |t| t.status);
            if status == told {
                inner.due.remove(&user);
            } else {
                self.tell(&mut inner, user, status, now);
            }
        }
    }

    /// Hands this node's users that are not offline to `publish`, [`REFRESH_CHUNK`] at a
    /// time, under the lock: a change made after it is published after it, never
    /// overtaken by this older view.
    pub fn publish_all(&self, mut publish: impl FnMut(Vec<(i64, Status)>)) {
        let inner = self.lock();
        let users: Vec<(i64, Status)> = inner
            .local
            .keys()
            .map(|u| (*u, inner.local_status(*u)))
            .collect();
        for chunk in users.chunks(REFRESH_CHUNK) {
            publish(chunk.to_vec());
        }
    }

    /// The users offline here whose change still waits (at a stop), with when they left;
    /// forgets them.
    pub fn pending_offline(&self) -> Vec<(i64, i64)> {
        let mut inner = self.lock();
        let now = crate::clock::now_ms();
        let mut seen: Vec<(i64, i64)> = inner.local.keys().map(|u| (*u, now)).collect();
        let waiting: Vec<i64> = inner.due.keys().copied().collect();
        for user in waiting {
            if !inner.local.contains_key(&user)
                && let Some(at) = inner.last_seen.remove(&user)
            {
                seen.push((user, at));
            }
        }
        inner.due.clear();
        seen
    }

    /// `conn` watches `users` from now on: their changes come to its outbox. Answers
    /// their presence now, or `Err` with the bound if it would watch more than
    /// [`MAX_WATCHED`] (then nothing changes).
    pub fn watch(
        &self,
        conn: ConnId,
        outbox: &Arc<Outbox>,
        users: &[i64],
    ) -> Result<Vec<Seen>, usize> {
        let mut inner = self.lock();
        let Inner {
            watching, watchers, ..
        } = &mut *inner;
        let w = watching.entry(conn).or_insert_with(|| Watcher {
            outbox: Arc::clone(outbox),
            users: HashSet::new(),
        });
        let new = users.iter().filter(|u| !w.users.contains(u)).count();
        if w.users.len() + new > MAX_WATCHED {
            return Err(MAX_WATCHED);
        }
        for &u in users {
            if w.users.insert(u) {
                watchers.entry(u).or_default().insert(conn);
            }
        }
        Ok(users.iter().map(|u| inner.seen(*u)).collect())
    }

    /// `conn` stops watching `users` (all of them with `None`).
    pub fn unwatch(&self, conn: ConnId, users: Option<&[i64]>) {
        let mut inner = self.lock();
        let Inner {
            watching, watchers, ..
        } = &mut *inner;
        let Some(w) = watching.get_mut(&conn) else {
            return;
        };
        let gone: Vec<i64> = match users {
            Some(list) => list.iter().copied().filter(|u| w.users.remove(u)).collect(),
            None => w.users.drain().collect(),
        };
        for u in gone {
            if let Some(set) = watchers.get_mut(&u) {
                set.remove(&conn);
                if set.is_empty() {
                    watchers.remove(&u);
                }
            }
        }
    }

    /// The presence of `users` now, the last times of offline ones read from the store
    /// where this node does not know them.
    pub async fn of(&self, users: &[i64]) -> Vec<Seen> {
        let mut seen: Vec<Seen> = {
            let inner = self.lock();
            users.iter().map(|u| inner.seen(*u)).collect()
        };
        self.fill_last_seen(&mut seen).await;
        seen
    }

    /// Fills in, from the store, when offline users were last online where not known
    /// here. A failed read leaves them without.
    pub async fn fill_last_seen(&self, seen: &mut [Seen]) {
        let unknown: Vec<i64> = seen
            .iter()
            .filter(|s| s.status == Status::Offline && s.last_seen_at.is_none())
            .map(|s| s.user_id)
            .collect();
        if unknown.is_empty() {
            return;
        }
        match self.store.last_seen(&unknown).await {
            Ok(found) => {
                let found: HashMap<i64, i64> = found.into_iter().collect();
                for s in seen.iter_mut() {
                    if s.status == Status::Offline && s.last_seen_at.is_none() {
                        s.last_seen_at = found.get(&s.user_id).copied();
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "read when users were last online"),
        }
    }

    /// Connections watching someone, and users watched (for `/metrics` and tests).
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.watching.len(), inner.watchers.len())
    }
}

/// Runs [`Presence::tick`] every [`TICK`] until the presence is dropped elsewhere.
pub fn start_ticker(presence: &Arc<Presence>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(presence);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            match weak.upgrade() {
                Some(p) => p.tick(),
                None => return,
            }
        }
    })
}
