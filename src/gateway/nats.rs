//! The cluster bus over core NATS (`--bus nats://…`), as `CLUSTER.md` designs it: a lossy
//! accelerator beside PostgreSQL, which stays the only truth.
//!
//! - After commit, each event of this node goes to `natter.ch.<channel_id>`; a membership
//!   event also to `natter.user.<user_id>`, so the node that serves that user learns of it
//!   even when it follows nothing of the channel yet. Typing signals go to the channel's
//!   subject too.
//! - A node subscribes to `natter.ch.<id>` while it has a follower of the channel, and to
//!   `natter.user.<id>` while the user has a connection on it (the hub tells it of every
//!   change, in order). Its own messages do not come back (`no_echo`).
//! - What arrives goes to the same dispatcher as this node's commits, which delivers each
//!   followed channel's events once and in order and reads gaps from the store; the
//!   periodic check (`dispatch::check`) finds what never arrived.
//! - `natter.ctl.revoke` carries logouts to every node; `natter.ctl.nodes` a heartbeat per
//!   node each second (live nodes in `/metrics`; a second live node with this node's id is
//!   logged and counted); `natter.ctl.presence` each node's own view of its users'
//!   presence as it changes, and all of it again every `presence::REFRESH` (the others
//!   forget a node's word after `presence::EXPIRY` without it).
//!
//! Publishing never waits: with NATS down or its queue full, a message is dropped and
//! counted, and the receivers get the event from the store by the check. The client
//! reconnects by itself and subscribes again; meanwhile `/readyz` says `bus: down`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::bus::{Bus, RevokeHandler};
use super::cache::EventCache;
use super::dispatch::{Dispatcher, Handoff, Outbound};
use super::hub::{Hub, Interest};
use super::outbox::Delivery;
use super::presence::{Presence, REFRESH};
use crate::model::{Event, EventBody, Message, PresenceStatus, Role};
use crate::store::TokenHash;

/// Messages waiting to be handed to the NATS client before more are dropped.
const PUBLISH_QUEUE: usize = 65_536;
/// Messages received and not yet decoded before the subscriptions wait.
const INBOX: usize = 16_384;
/// How often a node says it is alive, and how long it counts as live after.
const HEARTBEAT: Duration = Duration::from_secs(1);
const LIVE_FOR: Duration = Duration::from_secs(5);
/// The most a new subscription waits to reach the server before a session goes on.
const SYNC_WAIT: Duration = Duration::from_secs(1);

const REVOKE: &str = "natter.ctl.revoke";
/// Revocations kept for a NATS that is away (past it, the other nodes' cached sessions
/// still expire within `api::sessions::MAX_AGE`).
const MAX_HELD_REVOCATIONS: usize = 10_000;
const NODES: &str = "natter.ctl.nodes";
/// "Events of mine were lost while I was away from NATS": every node runs its check and
/// asks its sessions to read their channels again.
const RESYNC: &str = "natter.ctl.resync";
const PRESENCE: &str = "natter.ctl.presence";

fn channel_subject(channel_id: i64) -> String {
    format!("natter.ch.{channel_id}")
}

fn user_subject(user_id: i64) -> String {
    format!("natter.user.{user_id}")
}

#[derive(Default)]
struct Counters {
    connected: AtomicBool,
    /// When the bus last came back or lost messages: revocations may have been missed
    /// before it.
    trusted_since: Mutex<Option<Instant>>,
    published: AtomicU64,
    dropped: AtomicU64,
    received: AtomicU64,
    undecodable: AtomicU64,
    slow_consumers: AtomicU64,
    disconnects: AtomicU64,
    subscriptions: AtomicUsize,
    node_id_conflicts: AtomicU64,
    /// Events were dropped while NATS was away: once back, tell every node to resync.
    lost_while_away: AtomicBool,
}

/// Another node's last heartbeat.
struct Peer {
    instance: u64,
    seen: Instant,
}

enum Cmd {
    Interest(Interest),
    Sync(oneshot::Sender<()>),
}

pub struct NatsBus {
    client: async_nats::Client,
    dispatcher: Dispatcher,
    publish: mpsc::Sender<(String, Bytes)>,
    commands: mpsc::UnboundedSender<Cmd>,
    counters: Arc<Counters>,
    peers: Arc<Mutex<HashMap<u16, Peer>>>,
    on_revoke: Arc<OnceLock<RevokeHandler>>,
    /// Notified when events may have been lost (a slow consumer, a reconnect): the check
    /// runs at once.
    recover: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
    /// This run's random id (heartbeats; presence's word from this node).
    instance: u64,
    /// Tasks started once presence is attached.
    presence_tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl NatsBus {
    /// Connects (in the background: a node starts while NATS is down, and its deliveries
    /// come by the check until it is up), starts the dispatcher and the bus's tasks, and
    /// tells `hub` to report what it follows.
    pub async fn start(
        urls: &[String],
        node_id: u16,
        hub: Arc<Hub>,
        cache: Arc<EventCache>,
    ) -> anyhow::Result<(Arc<Self>, std::thread::JoinHandle<()>)> {
        let counters = Arc::new(Counters::default());
        let recover = Arc::new(Notify::new());
        let events = {
            let (counters, recover) = (Arc::clone(&counters), Arc::clone(&recover));
            move |event: async_nats::Event| {
                let (counters, recover) = (Arc::clone(&counters), Arc::clone(&recover));
                async move { on_event(&counters, &recover, event) }
            }
        };
        let mut instance = [0u8; 8];
        getrandom::fill(&mut instance).expect("the OS random source works");
        let instance = u64::from_le_bytes(instance) | 1;
        let client = async_nats::ConnectOptions::new()
            .name(format!("natter-node-{node_id}"))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(Duration::from_secs(5))
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis((100 * attempt as u64).min(2000))
            })
            .event_callback(events)
            .connect(urls.join(","))
            .await?;
        let (publish, outbox) = mpsc::channel(PUBLISH_QUEUE);
        let (dispatcher, thread) = Dispatcher::start(
            Arc::clone(&hub),
            cache,
            Some(outbound(publish.clone(), Arc::clone(&counters))),
            tokio::runtime::Handle::current(),
            Handoff::Queued,
        );
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (inbox, inbox_rx) = mpsc::channel(INBOX);
        let peers = Arc::new(Mutex::new(HashMap::new()));
        let on_revoke: Arc<OnceLock<RevokeHandler>> = Arc::new(OnceLock::new());
        let tasks = vec![
            tokio::spawn(publisher(client.clone(), outbox, Arc::clone(&counters))),
            tokio::spawn(subscriptions(
                client.clone(),
                command_rx,
                inbox,
                Arc::clone(&counters),
            )),
            tokio::spawn(receive(inbox_rx, dispatcher.clone(), Arc::clone(&counters))),
            tokio::spawn(revocations(
                client.clone(),
                Arc::clone(&on_revoke),
                Arc::clone(&counters),
            )),
            tokio::spawn(resyncs(client.clone(), Arc::clone(&recover))),
            tokio::spawn(heartbeats(
                client.clone(),
                node_id,
                instance,
                Arc::clone(&peers),
                Arc::clone(&counters),
            )),
        ];
        let tell = commands.clone();
        hub.set_interest(Box::new(move |i| {
            let _ = tell.send(Cmd::Interest(i));
        }));
        tracing::info!(servers = urls.len(), node_id, "cluster bus: NATS");
        Ok((
            Arc::new(Self {
                client,
                dispatcher,
                publish,
                commands,
                counters,
                peers,
                on_revoke,
                recover,
                tasks,
                instance,
                presence_tasks: Mutex::new(Vec::new()),
            }),
            thread,
        ))
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Notified when the bus may have lost events: run the check at once.
    pub fn recover(&self) -> Arc<Notify> {
        Arc::clone(&self.recover)
    }

    /// Hands what is queued to NATS and flushes it (bounded), then stops the bus's tasks.
    pub async fn close(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.publish.capacity() < self.publish.max_capacity()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
        self.abort_tasks();
    }

    /// Stops the bus's tasks, the presence ones too.
    fn abort_tasks(&self) {
        let presence = self
            .presence_tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for t in self.tasks.iter().chain(presence.iter()) {
            t.abort();
        }
    }

    fn send(&self, subject: String, payload: Bytes) {
        push(&self.publish, &self.counters, subject, payload);
    }
}

impl Drop for NatsBus {
    fn drop(&mut self) {
        self.abort_tasks();
    }
}

fn on_event(counters: &Counters, recover: &Notify, event: async_nats::Event) {
    match event {
        async_nats::Event::Connected => {
            tracing::info!("cluster bus connected");
            *counters
                .trusted_since
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            counters.connected.store(true, Ordering::Relaxed);
            // What was published while it was away is found by the check.
            recover.notify_one();
        }
        async_nats::Event::Disconnected => {
            tracing::warn!(
                "cluster bus disconnected; deliveries from other nodes come by the periodic check until it is back"
            );
            counters.connected.store(false, Ordering::Relaxed);
            counters.disconnects.fetch_add(1, Ordering::Relaxed);
        }
        async_nats::Event::SlowConsumer(sid) => {
            counters.slow_consumers.fetch_add(1, Ordering::Relaxed);
            *counters
                .trusted_since
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            tracing::warn!(
                sid,
                "cluster bus: messages dropped for a slow subscription; checking the store"
            );
            recover.notify_one();
        }
        other => tracing::info!(event = %other, "cluster bus"),
    }
}

/// Queues a message for the publisher; never waits.
fn push(
    queue: &mpsc::Sender<(String, Bytes)>,
    counters: &Counters,
    subject: String,
    payload: Bytes,
) {
    if queue.try_send((subject, payload)).is_err() {
        counters.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// The dispatcher's hook: this node's committed events, encoded for the other nodes.
fn outbound(queue: mpsc::Sender<(String, Bytes)>, counters: Arc<Counters>) -> Outbound {
    Box::new(move |ds: &[Arc<Delivery>]| {
        for d in ds {
            let payload = Bytes::from(encode(&Packet::event(&d.event)));
            if let Some((user_id, _)) = d.membership {
                push(&queue, &counters, user_subject(user_id), payload.clone());
            }
            push(&queue, &counters, channel_subject(d.channel_id), payload);
        }
    })
}

async fn publisher(
    client: async_nats::Client,
    mut queue: mpsc::Receiver<(String, Bytes)>,
    counters: Arc<Counters>,
) {
    // Revocations are kept while NATS is away and sent when it is back; events are not
    // (the check brings them sooner than a late flood would).
    let mut held: Vec<(String, Bytes)> = Vec::new();
    let mut retry = tokio::time::interval(Duration::from_millis(250));
    loop {
        let next = tokio::select! {
            next = queue.recv() => match next {
                Some(next) => Some(next),
                None => return,
            },
            _ = retry.tick(), if !held.is_empty() || counters.lost_while_away.load(Ordering::Relaxed) => None,
        };
        let connected = client.connection_state() == State::Connected;
        if connected && !held.is_empty() {
            for (subject, payload) in held.drain(..) {
                let _ = client.publish(subject, payload).await;
            }
        }
        if connected && counters.lost_while_away.swap(false, Ordering::Relaxed) {
            // Other nodes kept their connection and do not know what they missed.
            let _ = client.publish(RESYNC, Bytes::new()).await;
        }
        let Some((subject, payload)) = next else {
            continue;
        };
        if !connected {
            if subject == REVOKE && held.len() < MAX_HELD_REVOCATIONS {
                held.push((subject, payload));
            } else {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
                counters.lost_while_away.store(true, Ordering::Relaxed);
            }
            continue;
        }
        match client.publish(subject, payload).await {
            Ok(()) => counters.published.fetch_add(1, Ordering::Relaxed),
            Err(_) => counters.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Channel(i64),
    User(i64),
}

/// Keeps one NATS subscription per followed channel and online user, in the order the hub
/// reported the changes; answers `Sync` once every earlier change reached the server.
async fn subscriptions(
    client: async_nats::Client,
    mut commands: mpsc::UnboundedReceiver<Cmd>,
    inbox: mpsc::Sender<Bytes>,
    counters: Arc<Counters>,
) {
    let mut subs: HashMap<Key, JoinHandle<()>> = HashMap::new();
    while let Some(cmd) = commands.recv().await {
        let (key, on) = match cmd {
            Cmd::Sync(done) => {
                if client.connection_state() == State::Connected {
                    let _ = tokio::time::timeout(SYNC_WAIT, client.flush()).await;
                }
                let _ = done.send(());
                continue;
            }
            Cmd::Interest(Interest::Channel(id, on)) => (Key::Channel(id), on),
            Cmd::Interest(Interest::User(id, on)) => (Key::User(id), on),
        };
        if !on {
            // Dropping the subscriber (with its task) unsubscribes.
            if let Some(task) = subs.remove(&key) {
                task.abort();
            }
            counters.subscriptions.store(subs.len(), Ordering::Relaxed);
            continue;
        }
        let subject = match key {
            Key::Channel(id) => channel_subject(id),
            Key::User(id) => user_subject(id),
        };
        match client.subscribe(subject).await {
            Ok(mut sub) => {
                let inbox = inbox.clone();
                let task = tokio::spawn(async move {
                    while let Some(m) = sub.next().await {
                        if inbox.send(m.payload).await.is_err() {
                            break;
                        }
                    }
                });
                if let Some(old) = subs.insert(key, task) {
                    old.abort();
                }
            }
            Err(e) => tracing::warn!(error = %e, ?key, "cluster bus: subscribe"),
        }
        counters.subscriptions.store(subs.len(), Ordering::Relaxed);
    }
    for (_, task) in subs {
        task.abort();
    }
}

/// Decodes what the subscriptions brought and hands it to the dispatcher in batches.
async fn receive(
    mut inbox: mpsc::Receiver<Bytes>,
    dispatcher: Dispatcher,
    counters: Arc<Counters>,
) {
    let mut payloads = Vec::with_capacity(256);
    while inbox.recv_many(&mut payloads, 256).await > 0 {
        counters
            .received
            .fetch_add(payloads.len() as u64, Ordering::Relaxed);
        let mut events = Vec::with_capacity(payloads.len());
        for payload in payloads.drain(..) {
            match serde_json::from_slice::<Packet>(&payload).map(Packet::into_item) {
                Ok(Some(Item::Event(e))) => events.push(e),
                Ok(Some(Item::Typing {
                    channel_id,
                    user_id,
                })) => dispatcher.typing(channel_id, user_id),
                Ok(Some(Item::Profile { channel_id, user })) => {
                    dispatcher.profile(channel_id, user)
                }
                Ok(None) | Err(_) => {
                    counters.undecodable.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if !events.is_empty() {
            dispatcher.remote(events).await;
        }
    }
}

/// A subscription to a control subject for the bus's life; `None` (logged) if the client
/// is closed.
async fn control_subscription(
    client: &async_nats::Client,
    subject: &'static str,
) -> Option<async_nats::Subscriber> {
    client
        .subscribe(subject)
        .await
        .inspect_err(|e| tracing::error!(error = %e, subject, "cluster bus: subscribe"))
        .ok()
}

#[derive(Serialize, Deserialize)]
struct Revocation {
    u: i64,
    t: String,
}

async fn revocations(
    client: async_nats::Client,
    handler: Arc<OnceLock<RevokeHandler>>,
    counters: Arc<Counters>,
) {
    let Some(mut sub) = control_subscription(&client, REVOKE).await else {
        return;
    };
    while let Some(m) = sub.next().await {
        let Ok(r) = serde_json::from_slice::<Revocation>(&m.payload) else {
            counters.undecodable.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Some(token) = unhex(&r.t) else {
            counters.undecodable.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        if let Some(revoke) = handler.get() {
            revoke(r.u, &token);
        }
    }
}

/// Another node lost events while it was away from NATS: check and resync here.
async fn resyncs(client: async_nats::Client, recover: Arc<Notify>) {
    let Some(mut sub) = control_subscription(&client, RESYNC).await else {
        return;
    };
    while sub.next().await.is_some() {
        recover.notify_one();
    }
}

/// A node's word on its users' presence: `(user, status)` with 0 offline, 1 idle, 2
/// online.
#[derive(Serialize, Deserialize)]
struct PresenceWord {
    n: u64,
    p: Vec<(i64, u8)>,
}

fn status_code(s: PresenceStatus) -> u8 {
    match s {
        PresenceStatus::Offline => 0,
        PresenceStatus::Idle => 1,
        PresenceStatus::Online => 2,
    }
}

/// Other nodes' presence words in; this node's whole view out every [`REFRESH`].
async fn presence_words(
    client: async_nats::Client,
    instance: u64,
    presence: Arc<Presence>,
    publish: mpsc::Sender<(String, Bytes)>,
    counters: Arc<Counters>,
) {
    let Some(mut sub) = control_subscription(&client, PRESENCE).await else {
        return;
    };
    let mut every = tokio::time::interval(REFRESH);
    loop {
        tokio::select! {
            _ = every.tick() => {
                presence.publish_all(|users| {
                    let word = PresenceWord {
                        n: instance,
                        p: users.into_iter().map(|(u, s)| (u, status_code(s))).collect(),
                    };
                    push(&publish, &counters, PRESENCE.to_owned(), Bytes::from(encode(&word)));
                });
            }
            m = sub.next() => {
                let Some(m) = m else { return };
                let Ok(word) = serde_json::from_slice::<PresenceWord>(&m.payload) else {
                    counters.undecodable.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if word.n == instance {
                    continue;
                }
                for (user, s) in word.p {
                    let status = match s {
                        2 => PresenceStatus::Online,
                        1 => PresenceStatus::Idle,
                        _ => PresenceStatus::Offline,
                    };
                    presence.remote(word.n, user, status);
                }
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Heartbeat {
    n: u16,
    i: u64,
}

async fn heartbeats(
    client: async_nats::Client,
    node_id: u16,
    instance: u64,
    peers: Arc<Mutex<HashMap<u16, Peer>>>,
    counters: Arc<Counters>,
) {
    let Some(mut sub) = control_subscription(&client, NODES).await else {
        return;
    };
    let beat = Bytes::from(encode(&Heartbeat {
        n: node_id,
        i: instance,
    }));
    let mut every = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = every.tick() => {
                if client.connection_state() == State::Connected {
                    let _ = client.publish(NODES, beat.clone()).await;
                }
            }
            m = sub.next() => {
                let Some(m) = m else { return };
                let Ok(h) = serde_json::from_slice::<Heartbeat>(&m.payload) else {
                    counters.undecodable.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if h.n == node_id && h.i != instance {
                    counters.node_id_conflicts.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(node_id, "another live node uses this node's --node-id");
                    continue;
                }
                peers.lock().unwrap_or_else(|p| p.into_inner()).insert(
                    h.n,
                    Peer { instance: h.i, seen: Instant::now() },
                );
            }
        }
    }
}

#[async_trait::async_trait]
impl Bus for NatsBus {
    fn publish(&self, events: Vec<Event>) {
        // The dispatcher encodes them once and hands them to `outbound`.
        self.dispatcher.local(events);
    }

    fn typing(&self, channel_id: i64, user_id: i64) {
        self.dispatcher.typing(channel_id, user_id);
        let packet = Packet {
            c: channel_id,
            s: 0,
            at: 0,
            b: Body::Typing { u: user_id },
        };
        self.send(channel_subject(channel_id), Bytes::from(encode(&packet)));
    }

    fn profile(&self, channel_id: i64, user: &crate::model::User) {
        self.dispatcher.profile(channel_id, user.clone());
        let packet = Packet::profile(channel_id, user);
        self.send(channel_subject(channel_id), Bytes::from(encode(&packet)));
    }

    fn attach_presence(&self, presence: &Arc<Presence>) {
        let (publish, counters, instance) = (
            self.publish.clone(),
            Arc::clone(&self.counters),
            self.instance,
        );
        presence.on_publish(Box::new(move |user, status| {
            let word = PresenceWord {
                n: instance,
                p: vec![(user, status_code(status))],
            };
            push(
                &publish,
                &counters,
                PRESENCE.to_owned(),
                Bytes::from(encode(&word)),
            );
        }));
        let task = tokio::spawn(presence_words(
            self.client.clone(),
            self.instance,
            Arc::clone(presence),
            self.publish.clone(),
            Arc::clone(&self.counters),
        ));
        self.presence_tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    fn revoke(&self, user_id: i64, token: &TokenHash) {
        let r = Revocation {
            u: user_id,
            t: hex(token),
        };
        self.send(REVOKE.to_owned(), Bytes::from(encode(&r)));
    }

    fn on_revoke(&self, handler: RevokeHandler) {
        let _ = self.on_revoke.set(handler);
    }

    async fn sync(&self) {
        let (done, wait) = oneshot::channel();
        if self.commands.send(Cmd::Sync(done)).is_ok() {
            let _ = tokio::time::timeout(SYNC_WAIT * 2, wait).await;
        }
    }

    fn health(&self) -> Option<(&'static str, bool)> {
        Some(("bus", self.counters.connected.load(Ordering::Relaxed)))
    }

    fn trusted_since(&self) -> Option<Instant> {
        if !self.counters.connected.load(Ordering::Relaxed) {
            // Revocations cannot reach this node now: trust no cached session.
            return Some(Instant::now());
        }
        *self
            .counters
            .trusted_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let c = &self.counters;
        let live = {
            let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            1 + peers
                .values()
                .filter(|p| p.seen.elapsed() < LIVE_FOR && p.instance != 0)
                .count()
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let metrics: [(&str, &str, &str, u64); 10] = [
            (
                "natter_bus_connected",
                "gauge",
                "1 while the cluster bus (NATS) is connected.",
                u64::from(c.connected.load(Ordering::Relaxed)),
            ),
            (
                "natter_bus_published_total",
                "counter",
                "Messages handed to NATS.",
                load(&c.published),
            ),
            (
                "natter_bus_publish_dropped_total",
                "counter",
                "Messages not published (NATS down or its queue full); the check delivers their events.",
                load(&c.dropped),
            ),
            (
                "natter_bus_received_total",
                "counter",
                "Messages received from other nodes.",
                load(&c.received),
            ),
            (
                "natter_bus_undecodable_total",
                "counter",
                "Messages received that could not be decoded.",
                load(&c.undecodable),
            ),
            (
                "natter_bus_slow_consumer_total",
                "counter",
                "Times NATS dropped messages for this node's slow subscriptions.",
                load(&c.slow_consumers),
            ),
            (
                "natter_bus_disconnects_total",
                "counter",
                "Times the connection to NATS was lost.",
                load(&c.disconnects),
            ),
            (
                "natter_bus_subscriptions",
                "gauge",
                "Channel and user subscriptions held.",
                c.subscriptions.load(Ordering::Relaxed) as u64,
            ),
            (
                "natter_cluster_nodes_live",
                "gauge",
                "Nodes heard from within 5 s, this one included.",
                live as u64,
            ),
            (
                "natter_bus_node_id_conflicts_total",
                "counter",
                "Heartbeats from another live node with this node's id.",
                load(&c.node_id_conflicts),
            ),
        ];
        for (name, kind, help, value) in metrics {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}

fn encode(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("bus packets serialize")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<TokenHash> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// One event (or typing signal) as it travels between nodes.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Packet {
    c: i64,
    #[serde(default)]
    s: i64,
    #[serde(default)]
    at: i64,
    #[serde(flatten)]
    b: Body,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "k")]
enum Body {
    #[serde(rename = "mc")]
    Created { m: WireMessage },
    #[serde(rename = "me")]
    Edited { m: WireMessage },
    #[serde(rename = "md")]
    Deleted { m: WireMessage },
    #[serde(rename = "ma")]
    Added { u: i64, r: String },
    #[serde(rename = "mu")]
    Updated { u: i64, r: String },
    #[serde(rename = "mr")]
    Removed { u: i64 },
    #[serde(rename = "cu")]
    Renamed { n: Option<String> },
    #[serde(rename = "ra")]
    Reacted { mi: i64, u: i64, e: String },
    #[serde(rename = "rr")]
    Unreacted { mi: i64, u: i64, e: String },
    #[serde(rename = "ty")]
    Typing { u: i64 },
    /// A member's profile (the packet's `at` is the account's creation time).
    #[serde(rename = "pu")]
    Profile {
        u: i64,
        n: String,
        #[serde(default)]
        d: Option<String>,
        #[serde(default)]
        a: Option<String>,
        /// A bot's owner.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        o: Option<i64>,
        /// A deleted account.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        x: bool,
    },
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct WireMessage {
    i: i64,
    /// The seq of the message's creation (an edit's or delete's event has its own).
    s: i64,
    a: i64,
    t: String,
    #[serde(default)]
    ci: Option<String>,
    ca: i64,
    #[serde(default)]
    ea: Option<i64>,
    #[serde(default)]
    d: bool,
    /// A reply's root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tr: Option<i64>,
    /// A root's live replies.
    #[serde(default, skip_serializing_if = "is_zero")]
    rc: i64,
    /// A root's newest reply's time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lr: Option<i64>,
    /// The members the text mentions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    mn: Vec<i64>,
    /// The files it carries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    f: Vec<crate::store::StoredAttachment>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

enum Item {
    Event(Event),
    Typing {
        channel_id: i64,
        user_id: i64,
    },
    Profile {
        channel_id: i64,
        user: crate::model::User,
    },
}

impl WireMessage {
    fn of(m: &Message) -> Self {
        Self {
            i: m.id,
            s: m.seq,
            a: m.author_id,
            t: m.text.clone(),
            ci: m.client_id.clone(),
            ca: m.created_at,
            ea: m.edited_at,
            d: m.deleted,
            tr: m.thread_root_id,
            rc: m.reply_count,
            lr: m.last_reply_at,
            mn: m.mentions.clone(),
            f: m.attachments.iter().map(Into::into).collect(),
        }
    }

    fn into_message(self, channel_id: i64) -> Message {
        Message {
            id: self.i,
            channel_id,
            seq: self.s,
            author_id: self.a,
            text: self.t,
            client_id: self.ci,
            created_at: self.ca,
            edited_at: self.ea,
            deleted: self.d,
            thread_root_id: self.tr,
            reply_count: self.rc,
            last_reply_at: self.lr,
            mentions: self.mn,
            attachments: self.f.into_iter().map(Into::into).collect(),
        }
    }
}

impl Packet {
    /// A member's profile, for the channel's subject (`at`: the account's creation time).
    fn profile(channel_id: i64, user: &crate::model::User) -> Self {
        Self {
            c: channel_id,
            s: 0,
            at: user.created_at,
            b: Body::Profile {
                u: user.id,
                n: user.username.clone(),
                d: user.display_name.clone(),
                a: user.about.clone(),
                o: user.bot_owner,
                x: user.deleted,
            },
        }
    }

    fn event(e: &Event) -> Self {
        let b = match &e.body {
            EventBody::MessageCreated(m) => Body::Created {
                m: WireMessage::of(m),
            },
            EventBody::MessageEdited(m) => Body::Edited {
                m: WireMessage::of(m),
            },
            EventBody::MessageDeleted(m) => Body::Deleted {
                m: WireMessage::of(m),
            },
            EventBody::MemberAdded { user_id, role } => Body::Added {
                u: *user_id,
                r: role.as_str().to_owned(),
            },
            EventBody::MemberUpdated { user_id, role } => Body::Updated {
                u: *user_id,
                r: role.as_str().to_owned(),
            },
            EventBody::MemberRemoved { user_id } => Body::Removed { u: *user_id },
            EventBody::ChannelUpdated { name } => Body::Renamed { n: name.clone() },
            EventBody::ReactionAdded {
                message_id,
                user_id,
                emoji,
            } => Body::Reacted {
                mi: *message_id,
                u: *user_id,
                e: emoji.clone(),
            },
            EventBody::ReactionRemoved {
                message_id,
                user_id,
                emoji,
            } => Body::Unreacted {
                mi: *message_id,
                u: *user_id,
                e: emoji.clone(),
            },
        };
        Self {
            c: e.channel_id,
            s: e.seq,
            at: e.at,
            b,
        }
    }

    /// `None` for a packet this version cannot take (an unknown role).
    fn into_item(self) -> Option<Item> {
        let (c, s) = (self.c, self.s);
        let body = match self.b {
            Body::Typing { u } => {
                return Some(Item::Typing {
                    channel_id: c,
                    user_id: u,
                });
            }
            Body::Profile { u, n, d, a, o, x } => {
                return Some(Item::Profile {
                    channel_id: c,
                    user: crate::model::User {
                        id: u,
                        username: n,
                        created_at: self.at,
                        display_name: d,
                        about: a,
                        bot_owner: o,
                        deleted: x,
                    },
                });
            }
            Body::Created { m } => EventBody::MessageCreated(m.into_message(c)),
            Body::Edited { m } => EventBody::MessageEdited(m.into_message(c)),
            Body::Deleted { m } => EventBody::MessageDeleted(m.into_message(c)),
            Body::Added { u, r } => EventBody::MemberAdded {
                user_id: u,
                role: Role::parse(&r)?,
            },
            Body::Updated { u, r } => EventBody::MemberUpdated {
                user_id: u,
                role: Role::parse(&r)?,
            },
            Body::Removed { u } => EventBody::MemberRemoved { user_id: u },
            Body::Renamed { n } => EventBody::ChannelUpdated { name: n },
            Body::Reacted { mi, u, e } => EventBody::ReactionAdded {
                message_id: mi,
                user_id: u,
                emoji: e,
            },
            Body::Unreacted { mi, u, e } => EventBody::ReactionRemoved {
                message_id: mi,
                user_id: u,
                emoji: e,
            },
        };
        if s < 1 {
            return None;
        }
        Some(Item::Event(Event {
            channel_id: c,
            seq: s,
            at: self.at,
            body,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: i64) -> Message {
        Message {
            id: 77,
            channel_id: 5,
            seq,
            author_id: 9,
            text: "hé \"there\"".into(),
            client_id: Some("c-1".into()),
            created_at: 1_700_000_000_000,
            edited_at: Some(1_700_000_000_500),
            deleted: false,
            ..Message::default()
        }
    }

    #[test]
    fn every_event_kind_survives_the_trip() {
        let bodies = [
            EventBody::MessageCreated(message(3)),
            EventBody::MessageEdited(message(3)),
            EventBody::MessageEdited(Message {
                reply_count: 2,
                last_reply_at: Some(1_700_000_000_700),
                ..message(3)
            }),
            EventBody::MessageCreated(Message {
                thread_root_id: Some(70),
                mentions: vec![4, 12],
                ..message(4)
            }),
            EventBody::MessageDeleted(Message {
                text: String::new(),
                deleted: true,
                ..message(3)
            }),
            EventBody::MemberAdded {
                user_id: 4,
                role: Role::Admin,
            },
            EventBody::MemberUpdated {
                user_id: 4,
                role: Role::Owner,
            },
            EventBody::MemberRemoved { user_id: 4 },
            EventBody::ChannelUpdated {
                name: Some("général".into()),
            },
            EventBody::ChannelUpdated { name: None },
            EventBody::ReactionAdded {
                message_id: 77,
                user_id: 4,
                emoji: "👍🏽".into(),
            },
            EventBody::ReactionRemoved {
                message_id: 77,
                user_id: 4,
                emoji: "❤️".into(),
            },
        ];
        for (n, body) in bodies.into_iter().enumerate() {
            let event = Event {
                channel_id: 5,
                seq: 10 + n as i64,
                at: 1_700_000_000_900,
                body,
            };
            let bytes = encode(&Packet::event(&event));
            let back = serde_json::from_slice::<Packet>(&bytes)
                .unwrap()
                .into_item();
            match back {
                Some(Item::Event(e)) => assert_eq!(e, event),
                _ => panic!("{} did not decode", String::from_utf8_lossy(&bytes)),
            }
        }
    }

    #[test]
    fn a_profile_survives_the_trip() {
        let user = crate::model::User {
            id: 4,
            username: "ada".into(),
            created_at: 1_700_000_000_000,
            display_name: Some("Ada \"L\"".into()),
            about: None,
            bot_owner: Some(3),
            deleted: true,
        };
        let packet = Packet::profile(5, &user);
        let back = serde_json::from_slice::<Packet>(&encode(&packet))
            .unwrap()
            .into_item();
        assert!(
            matches!(back, Some(Item::Profile { channel_id: 5, user: ref u }) if *u == user),
            "the profile came back changed"
        );
    }

    #[test]
    fn tokens_travel_as_hex() {
        let token: TokenHash = std::array::from_fn(|i| (i * 7) as u8);
        assert_eq!(unhex(&hex(&token)), Some(token));
        assert_eq!(unhex("zz"), None);
    }
}
