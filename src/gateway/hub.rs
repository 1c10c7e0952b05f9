//! The local fan-out point: which connections are online, for which user and token, and
//! which channels each one follows. [`Hub::dispatch`] pushes each committed event, encoded
//! once, into the outbox of every connection following its channel, in commit order.
//!
//! Membership events move subscriptions in the same pass that delivers them: a
//! `member.added` subscribes the user's connections before the channel's next event is
//! dispatched, and a `member.removed` is the last event of that channel they are given.
//!
//! Per followed channel the hub also keeps the seq the dispatcher last delivered (its
//! position, for ordering what several sources bring), and it tells the bus, as they
//! happen, which channels and users this node starts and stops following ([`Interest`]).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{Sender, sync_channel};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use rustc_hash::{FxHashMap, FxHashSet};

use super::outbox::{Delivery, Item, Outbox};
use super::stats::Stats;
use crate::model::Event;
use crate::store::TokenHash;
use crate::wire::protocol;

pub type ConnId = u64;

struct Conn {
    user_id: i64,
    token: TokenHash,
    outbox: Arc<Outbox>,
    channels: FxHashSet<i64>,
}

/// A change of what this node follows, told to the bus as it happens (under the hub's
/// lock, so in order): a cluster bus subscribes to what is followed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// The channel's first follower on this node, or its last one gone.
    Channel(i64, bool),
    /// The user's first connection on this node, or its last one gone.
    User(i64, bool),
}

pub type InterestSink = Box<dyn Fn(Interest) + Send + Sync>;

/// "No event of this channel dispatched yet since it was first followed."
pub(super) const UNKNOWN: i64 = i64::MIN;

/// The dispatcher's view of the followed channels' positions, under one hold of the
/// read lock (drop it before dispatching).
pub(super) struct Cursors<'a>(std::sync::RwLockReadGuard<'a, Subs>);

impl Cursors<'_> {
    /// The channel's position (`UNKNOWN` until known), if it is followed here.
    pub(super) fn get(&self, channel_id: i64) -> Option<&AtomicI64> {
        self.0.by_channel.get(&channel_id).map(|f| &f.last)
    }

    /// Where the channel stands for the check: its position, else its floor.
    pub(super) fn known(&self, channel_id: i64) -> Option<i64> {
        self.0
            .by_channel
            .get(&channel_id)
            .and_then(Followers::known)
    }
}

impl Followers {
    fn known(&self) -> Option<i64> {
        let last = self.last.load(Ordering::Acquire);
        let at = if last == UNKNOWN {
            self.floor.load(Ordering::Acquire)
        } else {
            last
        };
        (at != UNKNOWN).then_some(at)
    }
}

/// A followed channel: its online followers, and the seq of the last of its events the
/// dispatcher delivered since it was first followed here.
struct Followers {
    /// Each with its outbox, so a delivery reaches it without a lookup in the connections'
    /// map (a cache miss per follower), in a list the [`Crew`] shares while it delivers
    /// (changed in place unless a helper still holds it).
    conns: Arc<Vec<Follower>>,
    /// Written only by the dispatcher; `UNKNOWN` until it dispatched one of its events.
    last: AtomicI64,
    /// The lowest position a follower read while `last` was unknown ([`Hub::seed`]):
    /// where the periodic check and gap reads start from until something is dispatched.
    /// Never used to drop an event.
    floor: AtomicI64,
}

/// A follower of a channel: its connection and that connection's outbox.
type Follower = (ConnId, Arc<Outbox>);

/// Who follows what. A connection's channels are a set, so one user with many channels
/// costs (un)subscribing what changed, not the square of it; a channel's followers stay a
/// list, which dispatch walks fastest (dropping one is a scan of that channel's online
/// followers and a swap). Keyed by ids the server gives out (connections, users, channels),
/// so hashed with Fx rather than SipHash: no one can choose keys that collide, and a
/// delivery's lookups were ~5 % of the server's CPU at 1,000 members per channel.
#[derive(Default)]
struct Subs {
    conns: FxHashMap<ConnId, Conn>,
    /// A user's connections: a short list (bounded by the per-user connection cap).
    by_user: FxHashMap<i64, Vec<ConnId>>,
    by_channel: FxHashMap<i64, Followers>,
    interest: Option<Arc<InterestSink>>,
}

/// Channels (un)subscribed under one hold of the lock: a connection with thousands of
/// channels lets dispatch in between.
const SUBSCRIBE_CHUNK: usize = 256;

impl Subs {
    fn subscribe(&mut self, id: ConnId, channel_id: i64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.channels.insert(channel_id) {
            let outbox = Arc::clone(&conn.outbox);
            let followers = self.by_channel.entry(channel_id).or_insert_with(|| {
                if let Some(tell) = &self.interest {
                    tell(Interest::Channel(channel_id, true));
                }
                Followers {
                    conns: Arc::default(),
                    last: AtomicI64::new(UNKNOWN),
                    floor: AtomicI64::new(UNKNOWN),
                }
            });
            Arc::make_mut(&mut followers.conns).push((id, outbox));
        }
    }

    fn unsubscribe(&mut self, id: ConnId, channel_id: i64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.channels.remove(&channel_id) {
            self.drop_follower(id, channel_id);
        }
    }

    fn drop_follower(&mut self, id: ConnId, channel_id: i64) {
        if let Some(followers) = self.by_channel.get_mut(&channel_id) {
            if let Some(at) = followers.conns.iter().position(|&(c, _)| c == id) {
                Arc::make_mut(&mut followers.conns).swap_remove(at);
            }
            let list = &followers.conns;
            if list.is_empty() {
                self.by_channel.remove(&channel_id);
                if let Some(tell) = &self.interest {
                    tell(Interest::Channel(channel_id, false));
                }
            }
        }
    }

    fn user_conns(&self, user_id: i64) -> Vec<ConnId> {
        self.by_user.get(&user_id).cloned().unwrap_or_default()
    }
}

pub struct Hub {
    subs: RwLock<Subs>,
    next_id: AtomicU64,
    stats: Arc<Stats>,
    /// Started at the first run with many followers; `None` on one core.
    crew: OnceLock<Option<Crew>>,
}

/// Followers of one run past which the fan-out shares its writes with the [`Crew`].
const SHARE_PAST: usize = 128;

/// How [`Hub::dispatch`] hands events to the connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handing {
    /// Written to the sockets of parked connections ([`Outbox::deliver`]), else queued;
    /// a run with many followers is shared with the [`Crew`]. For a dispatcher that
    /// keeps up: no task is woken for an event, and none waits for one.
    Direct,
    /// Queued for the connections' tasks, which write what gathered in one flush, on
    /// every core, while the dispatcher goes on. For a dispatcher that falls behind:
    /// a write per connection per run would cost more than the wake-ups it saves (at a
    /// thousand members, saturated, 0.49–0.54 against 0.46–0.48 server CPU-s per
    /// million deliveries, and p50 83–92 against 62–65 ms).
    Queued,
}

/// Threads that deliver a share of a run with many followers while the dispatching
/// thread delivers its own, so a channel's fan-out to a thousand sockets uses every core
/// (as the connections' own tasks spread it, before the fan-out wrote to sockets itself).
/// They end when the hub is dropped.
struct Crew {
    jobs: Sender<Job>,
    helpers: usize,
}

/// A share of a run: the followers to hand it to (`share` of the channel's list), and
/// where to tell how many events went straight to their sockets.
struct Job {
    followers: Arc<Vec<Follower>>,
    share: std::ops::Range<usize>,
    run: Vec<Arc<Delivery>>,
    done: std::sync::mpsc::SyncSender<usize>,
}

impl Crew {
    /// One helper per core beside the dispatching thread (at most three).
    fn start() -> Option<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let mut helpers = 0;
        for i in 0..cores.min(4) - 1 {
            let queue = Arc::clone(&queue);
            let spawned = std::thread::Builder::new()
                .name(format!("natter-fanout-{i}"))
                .spawn(move || {
                    loop {
                        let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok(job) = job else {
                            return;
                        };
                        let share = &job.followers[job.share.clone()];
                        let direct = deliver_each(share, &job.run);
                        let _ = job.done.send(direct);
                    }
                });
            match spawned {
                Ok(_) => helpers += 1,
                Err(e) => {
                    tracing::warn!(error = %e, "start a fan-out thread; the fan-out uses fewer");
                    break;
                }
            }
        }
        (helpers > 0).then_some(Self { jobs, helpers })
    }
}

/// Hands `run` to each follower in `share` ([`Outbox::deliver`]); the events written to
/// sockets. Each outbox is a cache miss (its lock, then its positions) in a loop whose
/// every turn is a `sendmsg`: the next but one is fetched ahead while this one writes.
fn deliver_each(share: &[Follower], run: &[Arc<Delivery>]) -> usize {
    let mut direct = 0;
    for (i, (_, outbox)) in share.iter().enumerate() {
        if let Some((_, ahead)) = share.get(i + 2) {
            fetch_ahead(Arc::as_ptr(ahead));
        }
        direct += outbox.deliver(run);
    }
    direct
}

/// Asks the CPU to bring `at`'s first two cache lines in (a hint: nothing is read).
#[inline(always)]
fn fetch_ahead<T>(at: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let at = at.cast::<i8>();
        // SAFETY: SSE is in every x86_64 CPU, and a prefetch neither reads nor faults, at
        // any address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(at);
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

impl Hub {
    pub fn new(stats: Arc<Stats>) -> Self {
        Self {
            subs: RwLock::default(),
            next_id: AtomicU64::new(1),
            stats,
            crew: OnceLock::new(),
        }
    }

    /// Tells `sink` every change of what this node follows from now on (a cluster bus
    /// subscribes by it). Set once, before the first connection.
    pub fn set_interest(&self, sink: InterestSink) {
        self.write().interest = Some(Arc::new(sink));
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Subs> {
        self.subs.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Subs> {
        self.subs.write().unwrap_or_else(|p| p.into_inner())
    }

    /// [`Hub::try_register`] without a bound (unit tests).
    #[cfg(test)]
    pub fn register(&self, user_id: i64, token: TokenHash, outbox: Arc<Outbox>) -> ConnId {
        self.try_register(user_id, token, outbox, usize::MAX)
            .expect("no bound")
    }

    /// Puts a connection online, unless the user already has `max` connections online.
    /// From now on it is told about its user's membership changes; it follows no channel
    /// until [`Hub::subscribe`].
    pub fn try_register(
        &self,
        user_id: i64,
        token: TokenHash,
        outbox: Arc<Outbox>,
        max: usize,
    ) -> Option<ConnId> {
        let mut subs = self.write();
        let online = subs.by_user.get(&user_id).map_or(0, Vec::len);
        if online >= max {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        subs.conns.insert(
            id,
            Conn {
                user_id,
                token,
                outbox,
                channels: FxHashSet::default(),
            },
        );
        let conns = subs.by_user.entry(user_id).or_default();
        conns.push(id);
        if conns.len() == 1
            && let Some(tell) = &subs.interest
        {
            tell(Interest::User(user_id, true));
        }
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        Some(id)
    }

    /// Takes a connection offline. Its user's membership changes stop reaching it at
    /// once; its channels are dropped a chunk per hold of the lock.
    pub fn unregister(&self, id: ConnId) {
        let channels: Vec<i64> = {
            let mut subs = self.write();
            let Some(conn) = subs.conns.get_mut(&id) else {
                return;
            };
            let user_id = conn.user_id;
            let channels = std::mem::take(&mut conn.channels);
            if let Some(set) = subs.by_user.get_mut(&user_id) {
                set.retain(|&c| c != id);
                if set.is_empty() {
                    subs.by_user.remove(&user_id);
                    if let Some(tell) = &subs.interest {
                        tell(Interest::User(user_id, false));
                    }
                }
            }
            channels.into_iter().collect()
        };
        for chunk in channels.chunks(SUBSCRIBE_CHUNK) {
            let mut subs = self.write();
            for &c in chunk {
                subs.drop_follower(id, c);
            }
        }
        self.write().conns.remove(&id);
        self.stats.connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn subscribe(&self, id: ConnId, channel_id: i64) {
        self.write().subscribe(id, channel_id);
    }

    /// Follows many channels, a chunk per hold of the lock.
    pub fn subscribe_all(&self, id: ConnId, channels: &[i64]) {
        for chunk in channels.chunks(SUBSCRIBE_CHUNK) {
            let mut subs = self.write();
            for &c in chunk {
                subs.subscribe(id, c);
            }
        }
    }

    pub fn unsubscribe(&self, id: ConnId, channel_id: i64) {
        self.write().unsubscribe(id, channel_id);
    }

    /// A follower read the channel's position (`seq`) after it followed it. Until an
    /// event of the channel is dispatched here, the lowest such position is where the
    /// dispatcher's check looks from, so an event the bus never brings is still found.
    /// It never makes the dispatcher drop an event (another follower may have read an
    /// earlier position that an event in flight completes).
    pub fn seed(&self, channel_id: i64, seq: i64) {
        if let Some(f) = self.read().by_channel.get(&channel_id) {
            let mut at = f.floor.load(Ordering::Acquire);
            loop {
                let lower = if at == UNKNOWN { seq } else { at.min(seq) };
                match f
                    .floor
                    .compare_exchange(at, lower, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => return,
                    Err(now) => at = now,
                }
            }
        }
    }

    /// Where the dispatcher stands on a channel: `None` when it is not followed here,
    /// `Some(None)` when followed but nothing is known yet; the last dispatched seq, or
    /// until there is one, the lowest position a follower read.
    pub fn position(&self, channel_id: i64) -> Option<Option<i64>> {
        self.read()
            .by_channel
            .get(&channel_id)
            .map(Followers::known)
    }

    /// Deliveries `events` make here: the connections following each one's channel.
    pub fn deliveries(&self, events: &[Event]) -> usize {
        let subs = self.read();
        events
            .iter()
            .map(|e| {
                subs.by_channel
                    .get(&e.channel_id)
                    .map_or(0, |f| f.conns.len())
            })
            .sum()
    }

    pub(super) fn cursors(&self) -> Cursors<'_> {
        Cursors(self.read())
    }

    /// The followed channels with a known position (or floor), for the dispatcher's check.
    pub fn positions(&self) -> Vec<(i64, i64)> {
        self.read()
            .by_channel
            .iter()
            .filter_map(|(&id, f)| Some((id, f.known()?)))
            .collect()
    }

    /// Delivers committed events, in order. Called by one thread at a time (the bus).
    pub fn dispatch(&self, deliveries: &[Arc<Delivery>], handing: Handing) {
        let mut direct = 0;
        if deliveries.iter().any(|d| d.membership.is_some()) {
            let mut subs = self.write();
            for d in deliveries {
                direct += self.deliver(&subs, std::slice::from_ref(d), handing);
                if let Some((user_id, added)) = d.membership {
                    for id in subs.user_conns(user_id) {
                        if added {
                            subs.subscribe(id, d.channel_id);
                        } else {
                            subs.unsubscribe(id, d.channel_id);
                        }
                    }
                }
            }
        } else {
            let subs = self.read();
            for run in deliveries.chunk_by(|a, b| a.channel_id == b.channel_id) {
                direct += self.deliver(&subs, run, handing);
            }
        }
        if direct > 0 {
            let direct = direct as u64;
            self.stats
                .events_delivered
                .fetch_add(direct, Ordering::Relaxed);
            self.stats
                .events_written_by_fanout
                .fetch_add(direct, Ordering::Relaxed);
        }
    }

    /// Hands `run`, consecutive events of one channel, to the channel's followers: each
    /// gets the whole run at once (written to its socket, or queued with one lock and at
    /// most one wake-up: [`Outbox::deliver`], [`Outbox::push_all`]). Handed directly, a
    /// run with many followers is shared with the [`Crew`]; this returns once every
    /// follower has it. A membership event also goes to the user's connections that do
    /// not follow the channel. The events written to sockets here.
    fn deliver(&self, subs: &Subs, run: &[Arc<Delivery>], handing: Handing) -> usize {
        let Some(first) = run.first() else {
            return 0;
        };
        let list = subs.by_channel.get(&first.channel_id).map(|f| &f.conns);
        let followers: &[Follower] = list.map_or(&[], |l| l.as_slice());
        let each = |share: &[Follower]| -> usize {
            match handing {
                Handing::Direct => deliver_each(share, run),
                Handing::Queued => {
                    for (_, outbox) in share {
                        outbox.push_all(run.iter().map(|d| Item::Event(Arc::clone(d))));
                    }
                    0
                }
            }
        };
        let crew = if handing == Handing::Direct && followers.len() > SHARE_PAST {
            self.crew.get_or_init(Crew::start).as_ref()
        } else {
            None
        };
        let mut direct = 0;
        match crew {
            None => direct += each(followers),
            Some(crew) => {
                let per = followers.len().div_ceil(crew.helpers + 1);
                let (mine, theirs) = followers.split_at(per);
                let (done, answers) = sync_channel(crew.helpers);
                let mut shared = 0;
                for from in (per..followers.len()).step_by(per) {
                    let share = from..followers.len().min(from + per);
                    let job = Job {
                        // (`list` is there: `followers` is not empty.)
                        followers: list.map(Arc::clone).unwrap_or_default(),
                        share: share.clone(),
                        run: run.to_vec(),
                        done: done.clone(),
                    };
                    match crew.jobs.send(job) {
                        Ok(()) => shared += 1,
                        // The helpers are gone: deliver their share here.
                        Err(_) => direct += each(&followers[share]),
                    }
                }
                drop(done);
                direct += each(mine);
                // Every share is delivered before the next run (of this channel, or a
                // membership change) is.
                let mut answered = 0;
                while answered < shared {
                    match answers.recv() {
                        Ok(n) => (direct, answered) = (direct + n, answered + 1),
                        Err(_) => break,
                    }
                }
                if answered < shared {
                    // A helper failed on the way: deliver the others' shares again here.
                    // A connection drops what it has (and what it is given twice is never
                    // written directly: only the next seq is).
                    tracing::error!("a fan-out thread failed; delivering its share inline");
                    direct += each(theirs);
                }
            }
        }
        for d in run {
            let Some((user_id, _)) = d.membership else {
                continue;
            };
            for id in subs.by_user.get(&user_id).into_iter().flatten() {
                if let Some(conn) = subs.conns.get(id)
                    && !conn.channels.contains(&d.channel_id)
                {
                    conn.outbox.push(Item::Event(Arc::clone(d)));
                }
            }
        }
        direct
    }

    /// Shows `user_id` typing to the channel's other online members.
    pub fn typing(&self, channel_id: i64, user_id: i64) {
        let subs = self.read();
        let Some(list) = subs.by_channel.get(&channel_id).map(|f| &f.conns) else {
            return;
        };
        let frame: axum::extract::ws::Utf8Bytes = protocol::typing(channel_id, user_id).into();
        for conn in list.iter().filter_map(|(id, _)| subs.conns.get(id)) {
            if conn.user_id != user_id {
                conn.outbox.push(Item::Frame(frame.clone()));
            }
        }
    }

    /// Shows a member's new profile to the channel's online members (the member's own
    /// other connections too).
    pub fn profile(&self, channel_id: i64, user: &crate::model::User) {
        let subs = self.read();
        let Some(list) = subs.by_channel.get(&channel_id).map(|f| &f.conns) else {
            return;
        };
        let frame: axum::extract::ws::Utf8Bytes = protocol::user_updated(user).into();
        for (_, outbox) in list.iter() {
            outbox.push(Item::Frame(frame.clone()));
        }
    }

    /// Closes every connection of a revoked session with 4001.
    pub fn revoke(&self, user_id: i64, token: &TokenHash) {
        let subs = self.read();
        // A user's connections are few (the per-user cap): no index by token needed.
        let ids = subs.by_user.get(&user_id).into_iter().flatten();
        let conns = ids.filter_map(|id| subs.conns.get(id));
        for conn in conns.filter(|c| &c.token == token) {
            conn.outbox
                .close(protocol::close::BAD_TOKEN, "the session was revoked");
        }
    }

    /// Asks every connection to read its user's channels again (the bus may have lost
    /// additions meant for them).
    pub fn resync_all(&self) {
        for conn in self.read().conns.values() {
            conn.outbox.push(Item::Resync);
        }
    }

    /// Asks the connections of one of `slots` slots (their ids modulo `slots`) to ping
    /// their clients. The pushes (and the wake-ups they make) come after the lock is let
    /// go: with many connections they would hold up the hub's writers, and behind a
    /// waiting writer the dispatcher.
    pub fn ping_slot(&self, slot: u64, slots: u64) {
        let due: Vec<Arc<Outbox>> = self
            .read()
            .conns
            .iter()
            .filter(|(id, _)| *id % slots == slot)
            .map(|(_, conn)| Arc::clone(&conn.outbox))
            .collect();
        let now = std::time::Instant::now();
        for outbox in due {
            outbox.push(Item::Ping(now));
        }
    }

    /// Closes every connection (e.g. 1012 when the server stops).
    pub fn close_all(&self, code: u16, reason: &'static str) {
        for conn in self.read().conns.values() {
            conn.outbox.close(code, reason);
        }
    }
}

/// Slots of [`start_pinger`]: each connection is pinged once per interval, a sixteenth of
/// them at a time.
const PING_SLOTS: u64 = 16;

/// Pings every connection once per `every`, from one timer for all of them: a timer per
/// connection would sit in each idle connection's memory. The connections are pinged a
/// slot at a time (by id), so their pings spread over the interval instead of waking
/// every connection at once. Ends when the hub is dropped.
pub fn start_pinger(hub: &Arc<Hub>, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(hub);
    let period = (every / PING_SLOTS as u32).max(std::time::Duration::from_millis(1));
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut slot = 0;
        loop {
            ticker.tick().await;
            match weak.upgrade() {
                Some(hub) => hub.ping_slot(slot, PING_SLOTS),
                None => return,
            }
            slot = (slot + 1) % PING_SLOTS;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Event, EventBody, Role};

    fn event(channel_id: i64, seq: i64, body: EventBody) -> Arc<Delivery> {
        Delivery::new(Event {
            channel_id,
            seq,
            at: 0,
            body,
        })
    }

    async fn seqs(outbox: &Outbox) -> Vec<i64> {
        let mut items = std::collections::VecDeque::new();
        let taken = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            outbox.take(&mut items),
        )
        .await;
        if taken.is_err() {
            return Vec::new();
        }
        items
            .iter()
            .filter_map(|i| match i {
                Item::Event(d) => Some(d.seq),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_run_with_many_followers_reaches_each_once_in_order() {
        let stats = Arc::new(Stats::default());
        let hub = Hub::new(Arc::clone(&stats));
        let outboxes: Vec<Arc<Outbox>> = (0..SHARE_PAST * 3 + 1)
            .map(|_| Arc::new(Outbox::new(1 << 20, Arc::clone(&stats))))
            .collect();
        for (user, outbox) in outboxes.iter().enumerate() {
            let conn = hub.register(user as i64, [0; 32], Arc::clone(outbox));
            hub.subscribe(conn, 1);
        }
        let message = |seq| event(1, seq, EventBody::ChannelUpdated { name: None });
        // Runs one after another, shared with the crew or not: each is with every
        // follower before the next starts.
        for (seqs, handing) in [
            ([1, 2], Handing::Direct),
            ([3, 4], Handing::Queued),
            ([5, 6], Handing::Direct),
        ] {
            hub.dispatch(&seqs.map(message), handing);
        }
        for outbox in &outboxes {
            assert_eq!(seqs(outbox).await, [1, 2, 3, 4, 5, 6]);
        }
        assert_eq!(
            stats.events_written_by_fanout.load(Ordering::Relaxed),
            0,
            "no socket attached: all queued"
        );
    }

    #[tokio::test]
    async fn membership_events_move_subscriptions_in_dispatch_order() {
        let stats = Arc::new(Stats::default());
        let hub = Hub::new(Arc::clone(&stats));
        let outbox = Arc::new(Outbox::new(1 << 20, Arc::clone(&stats)));
        let conn = hub.register(7, [0; 32], Arc::clone(&outbox));
        let message = |seq| {
            event(
                1,
                seq,
                EventBody::ChannelUpdated {
                    name: Some(format!("n{seq}")),
                },
            )
        };
        // Not following channel 1: nothing of it arrives...
        hub.dispatch(&[message(1)], Handing::Direct);
        assert_eq!(seqs(&outbox).await, Vec::<i64>::new());
        // ...until this user is added: the addition and everything after it arrive.
        let added = event(
            1,
            2,
            EventBody::MemberAdded {
                user_id: 7,
                role: Role::Member,
            },
        );
        hub.dispatch(&[added, message(3)], Handing::Direct);
        assert_eq!(seqs(&outbox).await, [2, 3]);
        // The removal is the last event of the channel the user gets.
        let removed = event(1, 4, EventBody::MemberRemoved { user_id: 7 });
        hub.dispatch(&[removed, message(5)], Handing::Direct);
        assert_eq!(seqs(&outbox).await, [4]);
        // Someone else's membership changes reach only followers.
        hub.subscribe(conn, 1);
        hub.dispatch(
            &[event(
                1,
                6,
                EventBody::MemberAdded {
                    user_id: 8,
                    role: Role::Member,
                },
            )],
            Handing::Direct,
        );
        assert_eq!(seqs(&outbox).await, [6]);
        hub.unregister(conn);
        hub.dispatch(&[message(7)], Handing::Direct);
        assert_eq!(seqs(&outbox).await, Vec::<i64>::new());
        assert_eq!(stats.connections.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn revoking_a_token_closes_only_its_connections() {
        let stats = Arc::new(Stats::default());
        let hub = Hub::new(Arc::clone(&stats));
        let (a, b) = (
            Arc::new(Outbox::new(1 << 20, Arc::clone(&stats))),
            Arc::new(Outbox::new(1 << 20, Arc::clone(&stats))),
        );
        hub.register(7, [1; 32], Arc::clone(&a));
        hub.register(7, [2; 32], Arc::clone(&b));
        hub.revoke(7, &[1; 32]);
        let mut items = std::collections::VecDeque::new();
        a.take(&mut items).await;
        assert!(matches!(items.make_contiguous(), [Item::Close(4001, _)]));
        assert!(b.push(Item::Frame("still open".into())));
    }

    /// Counts the pings queued in `outbox`, taking everything queued (without waiting).
    fn pings(outbox: &Outbox) -> usize {
        use futures_util::FutureExt;
        let mut items = std::collections::VecDeque::new();
        let _ = outbox.take(&mut items).now_or_never();
        items.iter().filter(|i| matches!(i, Item::Ping(_))).count()
    }

    #[tokio::test]
    async fn one_interval_of_the_pinger_pings_every_connection_once() {
        let stats = Arc::new(Stats::default());
        let hub = Arc::new(Hub::new(Arc::clone(&stats)));
        let outboxes: Vec<Arc<Outbox>> = (0..40)
            .map(|_| Arc::new(Outbox::new(1 << 20, Arc::clone(&stats))))
            .collect();
        for (user, outbox) in outboxes.iter().enumerate() {
            hub.register(user as i64, [0; 32], Arc::clone(outbox));
        }
        // Slot by slot: each connection is in exactly one.
        let mut pinged = 0;
        for slot in 0..PING_SLOTS {
            hub.ping_slot(slot, PING_SLOTS);
            let mut this_slot = 0;
            for outbox in &outboxes {
                this_slot += pings(outbox);
            }
            assert!(this_slot < outboxes.len(), "a slot pings some of them");
            pinged += this_slot;
        }
        assert_eq!(pinged, outboxes.len());
        // The pinger's timer goes round the slots: every connection is pinged, and none
        // twice before the last one's first (at most twice by the time it is seen: a
        // slot's next round may come before this loop looks again).
        let every = std::time::Duration::from_millis(1600);
        let started = std::time::Instant::now();
        let pinger = start_pinger(&hub, every);
        let mut counts = vec![0; outboxes.len()];
        for _ in 0..500 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            for (n, outbox) in counts.iter_mut().zip(&outboxes) {
                *n += pings(outbox);
            }
            if counts.iter().all(|&n| n > 0) {
                break;
            }
        }
        assert!(counts.iter().all(|&n| n == 1 || n == 2), "{counts:?}");
        // The last slot's turn comes a whole interval after the start (a slot per
        // sixteenth), not sooner.
        let round = started.elapsed();
        assert!(round >= every * 15 / 16, "all pinged after {round:?}");
        pinger.abort();
        let _ = pinger.await;
    }
}
