//! The dispatcher: one thread that takes committed events from every source (this node's
//! writers, in commit order; other nodes' commits, as the cluster bus brings them: late,
//! twice, out of order or never) and hands each followed channel's events to the
//! hot-channel cache and the hub exactly once, in seq order.
//!
//! Per followed channel the hub keeps the seq last dispatched (its cursor). An event right
//! after it is dispatched; one at or below it is a duplicate and dropped; one further on
//! is held, and if the events before it have not come within [`GRACE`] they are read
//! from the store (through the reader: cache, then the store, identical reads shared) and
//! dispatched first. The cluster bus's periodic check ([`check`]) tells the dispatcher
//! where the store's channels stand, which catches the loss of a channel's newest events
//! (no later event shows the gap). A channel nobody here follows has no cursor: its
//! events (this node's commits, membership changes of users online here) are dispatched
//! as they come, for the cache and for the users they add or remove.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError, channel, sync_channel};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::cache::EventCache;
use super::hub::{Handing, Hub, UNKNOWN};
use super::outbox::Delivery;
use super::reader::EventReader;
use crate::model::Event;
use crate::store::{ReadFence, Store};

/// Batches the dispatcher may have queued before a local publisher waits.
const QUEUED_BATCHES: usize = 1024;
/// How long a held event waits for the events before it to arrive on their own.
pub const GRACE: Duration = Duration::from_millis(25);
/// How long after a failed gap read it is tried again.
const RETRY: Duration = Duration::from_millis(500);
/// Events held per channel; past it, later events are left to the store read.
const MAX_HELD: usize = 4096;
/// Events read from the store per gap read.
const FILL_PAGE: u32 = 1000;
/// How often the cluster bus checks where the followed channels stand.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// The most events of a local batch the publishing writer hands on itself (see
/// [`Handoff::Inline`]), and the most deliveries they make here; a bigger batch goes to
/// the dispatcher thread (the writer answers its writers after the hand-on: a channel with
/// a thousand followers would hold the acks back by as many pushes). A hand-on by the
/// writer may write to parked connections' sockets ([`Handing::Direct`]), a system call
/// per delivery before the acks: measured against queuing there, 4–9 % less server CPU
/// per message at 50 and 2,000 msgs/s, ack p99 0.3–0.6 ms more at 5,000 msgs/s × 10
/// members (BENCHMARKS.md, "Session 15").
const INLINE_EVENTS: usize = 8;
const INLINE_DELIVERIES: usize = 64;

/// How this node's committed batches reach the hub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handoff {
    /// Every batch through the dispatcher thread's queue.
    Queued,
    /// A small batch is handed on by the publishing thread itself (the writer), when the
    /// dispatcher is idle and nothing of this node's is queued before it; bigger ones, or
    /// any while the thread is busy, are queued. At low load this saves a thread wake-up
    /// per commit; under load the thread still overlaps the hand-on with the next commit.
    Inline,
}

/// Called with each batch of this node's committed events once encoded (the cluster bus
/// publishes them).
pub type Outbound = Box<dyn Fn(&[Arc<Delivery>]) + Send>;

enum Input {
    /// This node's committed events, in commit order.
    Local(Vec<Event>),
    /// Other nodes' committed events, in the order the bus brought them.
    Remote(Vec<Event>),
    Typing {
        channel_id: i64,
        user_id: i64,
    },
    /// A member of the channel changed their profile.
    Profile {
        channel_id: i64,
        user: crate::model::User,
    },
    /// Control messages are waiting.
    Wake,
    /// Hand on what is queued before this, then stop.
    Stop,
}

enum Control {
    /// Where the store's channels stand (the periodic check).
    Behind(Vec<(i64, i64)>),
    /// A held event's grace ran out: read its gap if it is still open.
    Due(i64),
    /// A gap read's answer.
    Filled(i64, Result<Vec<Arc<Delivery>>, String>),
}

struct Shared {
    data: SyncSender<Input>,
    control: Mutex<Sender<Control>>,
    cache: Arc<EventCache>,
    /// Weak: the reader holds the store, which holds the bus, which holds this.
    reader: OnceLock<std::sync::Weak<EventReader>>,
    runtime: tokio::runtime::Handle,
    /// The dispatcher's state: the thread runs it, and with [`Handoff::Inline`] so may a
    /// publisher.
    worker: Mutex<Worker>,
    handoff: Handoff,
    /// Local batches (and profile changes) in the thread's queue, not handed on yet: while
    /// any is, a publisher queues its own behind them (commit order).
    queued_local: AtomicUsize,
}

impl Shared {
    fn tell(&self, c: Control) {
        let sent = self
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(c);
        if sent.is_ok() {
            // A full queue will be read soon anyway, and the control queue with it.
            let _ = self.data.try_send(Input::Wake);
        }
    }
}

/// The handle the buses feed. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    shared: Arc<Shared>,
}

impl Dispatcher {
    /// Starts the dispatcher thread; it stops when every handle is dropped. Gap reads and
    /// timers run on `runtime`.
    pub fn start(
        hub: Arc<Hub>,
        cache: Arc<EventCache>,
        outbound: Option<Outbound>,
        runtime: tokio::runtime::Handle,
        handoff: Handoff,
    ) -> (Self, JoinHandle<()>) {
        let (data, data_rx) = sync_channel(QUEUED_BATCHES);
        let (control, control_rx) = channel();
        let shared = Arc::new_cyclic(|weak| Shared {
            data,
            control: Mutex::new(control),
            reader: OnceLock::new(),
            runtime,
            worker: Mutex::new(Worker {
                hub,
                shared: weak.clone(),
                cache: Arc::clone(&cache),
                outbound,
                held: HashMap::new(),
                out: Vec::new(),
                batches: 0,
                offers: 0,
            }),
            cache,
            handoff,
            queued_local: AtomicUsize::new(0),
        });
        // The thread holds the state weakly, like everything the worker spawns: it ends
        // when the last handle is dropped (its queue's sender goes with the state).
        let weak = Arc::downgrade(&shared);
        let handle = std::thread::Builder::new()
            .name("natter-dispatch".into())
            .spawn(move || run(&weak, &data_rx, &control_rx))
            .expect("spawn the dispatcher thread");
        (Self { shared }, handle)
    }

    /// Where gaps are read from; set once the store is open (events can only be
    /// committed after that).
    pub fn set_reader(&self, reader: Arc<EventReader>) {
        let _ = self.shared.reader.set(Arc::downgrade(&reader));
    }

    /// This node's committed events, in commit order: handed on here when
    /// [`Handoff::Inline`] allows, else queued to the thread; waits while the dispatcher
    /// is [`QUEUED_BATCHES`] behind (the writers' backpressure).
    pub fn local(&self, events: Vec<Event>) {
        // Counted before the writer answers anyone: a cache read waits for this batch.
        self.shared.cache.mark_published();
        let events = match self.inline(events) {
            Some(events) => events,
            None => return,
        };
        self.shared.queued_local.fetch_add(1, Ordering::AcqRel);
        if self.shared.data.send(Input::Local(events)).is_err() {
            tracing::error!("the dispatcher is gone; committed events are no longer delivered");
        }
    }

    /// Hands a small batch to the hub from the calling thread when the dispatcher thread
    /// is idle and nothing of this node's is queued before it; gives the batch back
    /// otherwise.
    fn inline(&self, events: Vec<Event>) -> Option<Vec<Event>> {
        if self.shared.handoff != Handoff::Inline || events.len() > INLINE_EVENTS {
            return Some(events);
        }
        let mut worker = match self.shared.worker.try_lock() {
            Ok(worker) => worker,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            // Busy: queue it, and let the thread overlap it with the next commit.
            Err(TryLockError::WouldBlock) => return Some(events),
        };
        // Nothing of this node's may be queued before it (counted under the lock the
        // thread hands batches on under), or the order would not hold.
        if self.shared.queued_local.load(Ordering::Acquire) > 0
            || worker.hub.deliveries(&events) > INLINE_DELIVERIES
        {
            return Some(events);
        }
        // The caller is the writer: a bug in the hand-on must not end the writes too. The
        // batch is then lost to the live path only, as when the dispatcher thread fails
        // (a session that sees a later event reads the gap from the store).
        let handed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            worker.local(events);
            worker.flush();
        }));
        if handed.is_err() {
            tracing::error!(
                "handing committed events to the hub failed; they are not delivered live"
            );
        }
        None
    }

    /// Events another node committed. Waits (off the async threads) while the dispatcher
    /// is behind, so the bus's own buffers take the backpressure.
    pub async fn remote(&self, events: Vec<Event>) {
        match self.shared.data.try_send(Input::Remote(events)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(input)) => {
                let data = self.shared.data.clone();
                let _ = tokio::task::spawn_blocking(move || data.send(input)).await;
            }
        }
    }

    /// An ephemeral signal; dropped rather than queued when the dispatcher is behind.
    pub fn typing(&self, channel_id: i64, user_id: i64) {
        let _ = self.shared.data.try_send(Input::Typing {
            channel_id,
            user_id,
        });
    }

    /// A profile change, to the channel's online members; dropped rather than queued when
    /// the dispatcher is behind (clients read profiles again on reconnecting). Counted as
    /// this node's, like a local batch: a later commit's batch is not handed on inline
    /// before it (followers would see a deleted account leave before they saw it deleted).
    pub fn profile(&self, channel_id: i64, user: crate::model::User) {
        self.shared.queued_local.fetch_add(1, Ordering::AcqRel);
        if self
            .shared
            .data
            .try_send(Input::Profile { channel_id, user })
            .is_err()
        {
            self.shared.queued_local.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Stops the thread once it has handed on everything queued before this call.
    pub fn stop(&self) {
        let _ = self.shared.data.send(Input::Stop);
    }

    /// Where the store's channels stand, as the periodic check read it.
    pub fn behind(&self, positions: Vec<(i64, i64)>) {
        if !positions.is_empty() {
            self.shared.tell(Control::Behind(positions));
        }
    }
}

/// The gaps of one followed channel.
#[derive(Default)]
struct Held {
    /// Events past a gap, by seq.
    events: BTreeMap<i64, Arc<Delivery>>,
    /// The newest seq known to exist (held, or seen by the check).
    want: i64,
    /// A grace timer or a store read is running.
    busy: bool,
}

struct Worker {
    hub: Arc<Hub>,
    shared: std::sync::Weak<Shared>,
    cache: Arc<EventCache>,
    outbound: Option<Outbound>,
    held: HashMap<i64, Held>,
    /// Events to dispatch at the next flush, in order.
    out: Vec<Arc<Delivery>>,
    /// Local batches taken since the last flush.
    batches: u64,
    /// Batches (local or remote) offered since the last flush: more than one means the
    /// thread gathers what came while it was busy; with them, or with a batch of more
    /// than [`INLINE_EVENTS`] (the writer gathers what came while it synced), the
    /// thread hands on queued ([`Handing`]).
    offers: u32,
}

/// The dispatcher thread: takes what is queued, hands it on under the state's lock.
fn run(shared: &std::sync::Weak<Shared>, data: &Receiver<Input>, control: &Receiver<Control>) {
    while let Ok(first) = data.recv() {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut worker = shared.worker.lock().unwrap_or_else(|p| p.into_inner());
        let mut local = 0;
        // Take whatever else is queued, so a busy writer's batches go out together.
        for input in std::iter::once(first).chain(data.try_iter().take(QUEUED_BATCHES)) {
            match input {
                Input::Local(events) => {
                    worker.local(events);
                    local += 1;
                }
                Input::Remote(events) => {
                    worker.offer(events.into_iter().map(Delivery::new).collect());
                }
                Input::Typing {
                    channel_id,
                    user_id,
                } => {
                    worker.flush();
                    worker.hub.typing(channel_id, user_id);
                }
                Input::Profile { channel_id, user } => {
                    worker.flush();
                    worker.hub.profile(channel_id, &user);
                    local += 1;
                }
                Input::Wake => {}
                Input::Stop => {
                    worker.flush();
                    shared.queued_local.fetch_sub(local, Ordering::AcqRel);
                    return;
                }
            }
        }
        for c in control.try_iter() {
            match c {
                Control::Behind(positions) => worker.behind(positions),
                Control::Due(channel_id) => worker.due(channel_id),
                Control::Filled(channel_id, page) => worker.filled(channel_id, page),
            }
        }
        worker.flush();
        // Handed on: a publisher may hand its next batch on itself.
        shared.queued_local.fetch_sub(local, Ordering::AcqRel);
    }
}

impl Worker {
    /// One of this node's committed batches: encoded, published to the other nodes, and
    /// sorted for the next flush.
    fn local(&mut self, events: Vec<Event>) {
        let ds: Vec<Arc<Delivery>> = events.into_iter().map(Delivery::new).collect();
        if let Some(publish) = &self.outbound {
            publish(&ds);
        }
        self.offer(ds);
        self.batches += 1;
    }

    /// Sorts events into dispatched now, held, or dropped.
    fn offer(&mut self, ds: Vec<Arc<Delivery>>) {
        self.offers += 1;
        let stats = Arc::clone(self.hub.stats());
        let cursors = self.hub.cursors();
        let mut gaps = Vec::new();
        for d in ds {
            let Some(cursor) = cursors.get(d.channel_id) else {
                // Nobody follows it here: nothing to keep in order for.
                self.out.push(d);
                continue;
            };
            // The last dispatched seq; before the first, the lowest position a follower
            // read (events up to it are everyone's already), if any.
            let last = cursors.known(d.channel_id).unwrap_or(UNKNOWN);
            if last == UNKNOWN || d.seq == last + 1 {
                cursor.store(d.seq, Ordering::Release);
                let channel_id = d.channel_id;
                self.out.push(d);
                // Events held behind this one may follow it now.
                if let Some(held) = self.held.get_mut(&channel_id) {
                    let mut at = cursor.load(Ordering::Acquire);
                    while let Some(next) = held.events.remove(&(at + 1)) {
                        at += 1;
                        self.out.push(next);
                    }
                    // Anything held at or below the cursor came another way.
                    while held.events.first_key_value().is_some_and(|(&s, _)| s <= at) {
                        held.events.pop_first();
                    }
                    cursor.store(at, Ordering::Release);
                    if held.events.is_empty() && held.want <= at && !held.busy {
                        self.held.remove(&channel_id);
                    } else if !held.busy {
                        // A second gap behind this one: give it its grace too.
                        held.busy = true;
                        gaps.push(channel_id);
                    }
                }
            } else if d.seq <= last {
                stats.dispatch_duplicates.fetch_add(1, Ordering::Relaxed);
                // An addition that came late (the position moved on with a later event
                // that came first) still subscribes the user's connections here: each
                // session checks the membership in the store before it follows, and
                // drops events it has. A removal never goes out late: it could undo a
                // later addition.
                if matches!(d.membership, Some((_, true))) {
                    self.out.push(d);
                }
            } else {
                stats.dispatch_held.fetch_add(1, Ordering::Relaxed);
                let channel_id = d.channel_id;
                let held = self.held.entry(channel_id).or_default();
                held.want = held.want.max(d.seq);
                if held.events.len() < MAX_HELD {
                    held.events.insert(d.seq, d);
                }
                if !held.busy {
                    held.busy = true;
                    gaps.push(channel_id);
                }
            }
        }
        drop(cursors);
        for channel_id in gaps {
            self.after(GRACE, channel_id);
        }
    }

    /// Caches, then dispatches: a connection that sees an event can read everything before
    /// it from the cache.
    fn flush(&mut self) {
        let handing = if std::mem::take(&mut self.offers) > 1 || self.out.len() > INLINE_EVENTS {
            Handing::Queued
        } else {
            Handing::Direct
        };
        if !self.out.is_empty() {
            self.cache.append(&self.out);
        }
        if self.batches > 0 {
            self.cache.mark_applied(self.batches);
            self.batches = 0;
        }
        if !self.out.is_empty() {
            self.hub.dispatch(&self.out, handing);
            self.out.clear();
        }
    }

    /// Sends `Due(channel_id)` after `delay`.
    fn after(&self, delay: Duration, channel_id: i64) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let weak = Arc::downgrade(&shared);
        shared.runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(shared) = weak.upgrade() {
                shared.tell(Control::Due(channel_id));
            }
        });
    }

    fn behind(&mut self, positions: Vec<(i64, i64)>) {
        let mut late = Vec::new();
        {
            let cursors = self.hub.cursors();
            for (channel_id, seq) in positions {
                let Some(last) = cursors.known(channel_id) else {
                    continue;
                };
                if seq <= last {
                    continue;
                }
                let held = self.held.entry(channel_id).or_default();
                held.want = held.want.max(seq);
                if !held.busy {
                    held.busy = true;
                    late.push(channel_id);
                }
            }
        }
        let stats = self.hub.stats();
        stats
            .dispatch_behind
            .fetch_add(late.len() as u64, Ordering::Relaxed);
        // Its events may be on their way; give them the same grace as a held one.
        for channel_id in late {
            self.after(GRACE, channel_id);
        }
    }

    /// A gap's grace ran out (or a read came back): read what is still missing.
    fn due(&mut self, channel_id: i64) {
        let Some(held) = self.held.get_mut(&channel_id) else {
            return;
        };
        let last = match self.hub.position(channel_id) {
            Some(Some(last)) => last,
            // No longer followed (or followed anew): nothing to keep in order for.
            _ => {
                self.held.remove(&channel_id);
                return;
            }
        };
        let target = held
            .events
            .first_key_value()
            .map_or(held.want, |(&s, _)| s - 1);
        if target <= last {
            held.busy = false;
            if held.events.is_empty() && held.want <= last {
                self.held.remove(&channel_id);
            }
            return;
        }
        held.busy = true;
        let (Some(shared), limit) = (
            self.shared.upgrade(),
            (target - last).min(i64::from(FILL_PAGE)) as u32,
        ) else {
            return;
        };
        let Some(reader) = shared.reader.get().and_then(std::sync::Weak::upgrade) else {
            // Not open yet: try again shortly.
            self.after(RETRY, channel_id);
            return;
        };
        self.hub
            .stats()
            .dispatch_fills
            .fetch_add(1, Ordering::Relaxed);
        let weak = Arc::downgrade(&shared);
        shared.runtime.spawn(async move {
            let page = reader
                .read_range(channel_id, last, target, limit, ReadFence::PRIMARY)
                .await
                .map(|page| page.0.clone())
                .map_err(|e| e.to_string());
            if let Some(shared) = weak.upgrade() {
                shared.tell(Control::Filled(channel_id, page));
            }
        });
    }

    fn filled(&mut self, channel_id: i64, page: Result<Vec<Arc<Delivery>>, String>) {
        let Some(held) = self.held.get_mut(&channel_id) else {
            return;
        };
        held.busy = false;
        let stats = Arc::clone(self.hub.stats());
        match page {
            Ok(events) => {
                let before = self.hub.position(channel_id).flatten();
                stats
                    .dispatch_filled_events
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
                // Offered like any event: in order, each once.
                self.offer(events);
                let after = self.hub.position(channel_id).flatten();
                if after > before {
                    // Progress: read on at once if the gap is not closed yet.
                    if let Some(held) = self.held.get_mut(&channel_id)
                        && !held.busy
                    {
                        held.busy = true;
                        self.due(channel_id);
                    }
                } else if let Some(held) = self.held.get_mut(&channel_id)
                    && !held.busy
                {
                    // The store did not have it yet (or not any more): try again shortly.
                    held.busy = true;
                    self.after(RETRY, channel_id);
                }
            }
            Err(error) => {
                stats.dispatch_fill_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(channel_id, %error, "read a gap in a channel's events; retrying");
                held.busy = true;
                self.after(RETRY, channel_id);
            }
        }
    }
}

/// The periodic check of the cluster bus: every [`CHECK_EVERY`], or at once when `now` is
/// notified (the bus lost messages, or came back), reads where each channel followed here
/// stands in the store and tells the dispatcher, so that an event the bus never brought,
/// with no later event to show the gap, is still delivered. Runs until aborted.
pub async fn check(
    hub: Arc<Hub>,
    store: Arc<dyn Store>,
    dispatcher: Dispatcher,
    now: Arc<tokio::sync::Notify>,
) {
    let mut every = tokio::time::interval(CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = now.notified() => {
                // The bus may have lost additions of users online here to channels
                // nobody here follows (no position to check): their sessions look.
                hub.resync_all();
            }
        }
        let followed = hub.positions();
        if followed.is_empty() {
            continue;
        }
        let ids: Vec<i64> = followed.iter().map(|&(id, _)| id).collect();
        let mine: HashMap<i64, i64> = followed.into_iter().collect();
        match store.last_seqs(&ids).await {
            Ok(seqs) => dispatcher.behind(
                seqs.into_iter()
                    .filter(|(id, seq)| mine.get(id).is_some_and(|last| seq > last))
                    .collect(),
            ),
            Err(e) => tracing::debug!(error = %e, "check where followed channels stand"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::outbox::{Item, Outbox};
    use crate::gateway::stats::Stats;
    use crate::model::EventBody;

    fn event(channel_id: i64, seq: i64) -> Event {
        Event {
            channel_id,
            seq,
            at: 0,
            body: EventBody::ChannelUpdated {
                name: Some(format!("n{seq}")),
            },
        }
    }

    /// What `outbox` is given, taken until `done` says it is all there (or 5 s passed).
    async fn taken_until(outbox: &Outbox, done: impl Fn(&[Item]) -> bool) -> Vec<Item> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done(&got) && tokio::time::Instant::now() < deadline {
            let mut items = std::collections::VecDeque::new();
            if tokio::time::timeout(Duration::from_millis(100), outbox.take(&mut items))
                .await
                .is_ok()
            {
                got.extend(items);
            }
        }
        got
    }

    /// The seq of an event item.
    fn seq(item: &Item) -> Option<i64> {
        match item {
            Item::Event(d) => Some(d.seq),
            _ => None,
        }
    }

    /// The seqs of the events `outbox` is given, until `want` of them came.
    async fn seqs(outbox: &Outbox, want: usize) -> Vec<i64> {
        let got = taken_until(outbox, |items| items.iter().filter_map(seq).count() >= want).await;
        got.iter().filter_map(seq).collect()
    }

    /// A dispatcher with the inline hand-off over `hub`.
    fn inline(hub: &Arc<Hub>) -> (Dispatcher, JoinHandle<()>) {
        Dispatcher::start(
            Arc::clone(hub),
            Arc::new(EventCache::new(1 << 30)),
            None,
            tokio::runtime::Handle::current(),
            Handoff::Inline,
        )
    }

    /// A hub with one connection (user 7) following channel 1 from its start, and its
    /// outbox of `bytes`.
    fn one_follower(bytes: usize) -> (Arc<Stats>, Arc<Hub>, Arc<Outbox>) {
        let stats = Arc::new(Stats::default());
        let hub = Arc::new(Hub::new(Arc::clone(&stats)));
        let outbox = Arc::new(Outbox::new(bytes, Arc::clone(&stats)));
        let conn = hub.register(7, [0; 32], Arc::clone(&outbox));
        hub.subscribe(conn, 1);
        hub.seed(1, 0);
        (stats, hub, outbox)
    }

    /// Events of a followed channel that come late, twice or out of order are dispatched
    /// once each, in seq order; a channel nobody follows is not held back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_followed_channel_is_dispatched_in_order_once() {
        let (stats, hub, outbox) = one_follower(1 << 20);
        let cache = Arc::new(EventCache::new(1 << 20));
        let (dispatcher, thread) = Dispatcher::start(
            Arc::clone(&hub),
            Arc::clone(&cache),
            None,
            tokio::runtime::Handle::current(),
            Handoff::Queued,
        );
        dispatcher
            .remote(vec![event(1, 1), event(1, 3), event(2, 9)])
            .await;
        dispatcher.local(vec![event(1, 4)]);
        dispatcher
            .remote(vec![event(1, 2), event(1, 3), event(1, 1)])
            .await;
        assert_eq!(seqs(&outbox, 4).await, [1, 2, 3, 4]);
        assert_eq!(hub.position(1), Some(Some(4)));
        assert_eq!(stats.dispatch_duplicates.load(Ordering::Relaxed), 2);
        assert_eq!(stats.dispatch_held.load(Ordering::Relaxed), 2);
        // The cache holds the run in order, and the unfollowed channel's event.
        let (page, _) = cache.read(1, 0, 10).unwrap();
        assert_eq!(page.iter().map(|d| d.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert!(cache.read(2, 8, 10).is_some());
        dispatcher.stop();
        thread.join().unwrap();
    }

    /// Regression: a session's seed once became the dispatcher's position, so an event
    /// at or below it that had not been dispatched yet was dropped as a duplicate: a
    /// follower that had read an earlier position never got it live, and a user added
    /// by it was never subscribed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_seed_never_drops_an_event_that_was_not_dispatched() {
        let stats = Arc::new(Stats::default());
        let hub = Arc::new(Hub::new(Arc::clone(&stats)));
        let alice = Arc::new(Outbox::new(1 << 20, Arc::clone(&stats)));
        let carol = Arc::new(Outbox::new(1 << 20, Arc::clone(&stats)));
        let conn = hub.register(7, [0; 32], Arc::clone(&alice));
        hub.register(8, [1; 32], Arc::clone(&carol));
        hub.subscribe(conn, 1);
        // Two followers read positions 6 and 5 (the later read seeds first); event 6,
        // which adds Carol, is still on its way.
        hub.seed(1, 6);
        hub.seed(1, 5);
        let (dispatcher, thread) = Dispatcher::start(
            Arc::clone(&hub),
            Arc::new(EventCache::new(1 << 20)),
            None,
            tokio::runtime::Handle::current(),
            Handoff::Queued,
        );
        let added = Event {
            channel_id: 1,
            seq: 6,
            at: 0,
            body: EventBody::MemberAdded {
                user_id: 8,
                role: crate::model::Role::Member,
            },
        };
        dispatcher.remote(vec![added.clone()]).await;
        assert_eq!(seqs(&alice, 1).await, [6], "the follower at 5 gets it");
        assert_eq!(seqs(&carol, 1).await, [6], "the added user is told");
        // Seen again (a second copy over the bus): an addition still reaches the user's
        // connections (their session checks the store before it follows), nothing else.
        dispatcher.remote(vec![added, event(1, 6)]).await;
        dispatcher.remote(vec![event(1, 7)]).await;
        assert_eq!(seqs(&alice, 2).await, [6, 7]);
        dispatcher.stop();
        thread.join().unwrap();
    }

    /// Regression: a profile change (an account deleted, say) queued to the dispatcher
    /// thread was overtaken by the next commit's small batch, which the writer handed on
    /// itself before the thread had woken: followers saw the account leave its channels
    /// before they saw it deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queued_profile_change_is_not_overtaken_by_an_inline_hand_off() {
        let (_, hub, outbox) = one_follower(1 << 30);
        let (dispatcher, thread) = inline(&hub);
        const ROUNDS: i64 = 200;
        for seq in 1..=ROUNDS {
            let user = crate::model::User {
                id: 7,
                username: format!("u{seq}"),
                ..Default::default()
            };
            dispatcher.profile(1, user);
            dispatcher.local(vec![event(1, seq)]);
        }
        // What the follower got, in order: a profile frame then its round's event.
        let items = taken_until(&outbox, |items| items.len() >= 2 * ROUNDS as usize).await;
        let got: Vec<String> = items
            .into_iter()
            .map(|i| match i {
                Item::Event(d) => format!("event {}", d.seq),
                Item::Frame(f) => {
                    let v: serde_json::Value = serde_json::from_str(&f).unwrap();
                    format!("profile {}", v["user"]["username"].as_str().unwrap())
                }
                other => format!("{other:?}"),
            })
            .collect();
        let want: Vec<String> = (1..=ROUNDS)
            .flat_map(|seq| [format!("profile u{seq}"), format!("event {seq}")])
            .collect();
        let first_wrong = got.iter().zip(&want).position(|(g, w)| g != w);
        assert_eq!(first_wrong, None, "got {:?}", &got[..got.len().min(8)]);
        assert_eq!(got.len(), want.len());
        dispatcher.stop();
        thread.join().unwrap();
    }

    /// With the inline hand-off, a small batch is handed on by the publishing thread
    /// before `local` returns when the dispatcher is idle, and one published while the
    /// thread still works through an earlier batch waits behind it: commit order holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_inline_hand_off_keeps_commit_order() {
        let (stats, hub, outbox) = one_follower(1 << 30);
        let (dispatcher, thread) = inline(&hub);
        dispatcher.local(vec![event(1, 1)]);
        assert_eq!(
            hub.position(1),
            Some(Some(1)),
            "handed on before local returned"
        );
        // A big batch goes to the thread; the small ones right behind it must not pass it.
        dispatcher.local((2..=20_000).map(|seq| event(1, seq)).collect());
        for seq in 20_001..=20_100 {
            dispatcher.local(vec![event(1, seq)]);
        }
        let got = seqs(&outbox, 20_100).await;
        assert_eq!(got, (1..=20_100).collect::<Vec<_>>());
        assert_eq!(
            stats.dispatch_held.load(Ordering::Relaxed),
            0,
            "none came early"
        );
        dispatcher.stop();
        thread.join().unwrap();
    }
}
