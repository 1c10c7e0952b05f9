//! Each connection's bounded outbound queue. Fan-out pushes into it without waiting; the
//! connection's task drains everything queued at once and writes it as one flush. A queue
//! that would pass its byte bound is emptied and marked slow: the connection closes with
//! 4008 and its memory is freed at once, so one slow socket never stalls anyone else.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use axum::extract::ws::Utf8Bytes;

use super::stats::Stats;
use crate::model::{Event, EventBody};

/// An event as fan-out hands it to every recipient: encoded once, shared by all.
#[derive(Debug)]
pub struct Delivery {
    pub channel_id: i64,
    pub seq: i64,
    /// For `member.added`/`member.removed`: whose membership changed, and whether added.
    pub membership: Option<(i64, bool)>,
    pub frame: Utf8Bytes,
    pub event: Event,
}

impl Delivery {
    pub fn new(event: Event) -> Arc<Self> {
        let membership = match &event.body {
            EventBody::MemberAdded { user_id, .. } => Some((*user_id, true)),
            EventBody::MemberRemoved { user_id } => Some((*user_id, false)),
            _ => None,
        };
        Arc::new(Self {
            channel_id: event.channel_id,
            seq: event.seq,
            membership,
            frame: crate::wire::protocol::event(&event).into(),
            event,
        })
    }
}

/// One thing for a connection to write.
#[derive(Debug, Clone)]
pub enum Item {
    /// An event of a channel: the connection delivers it only in seq order, once.
    Event(Arc<Delivery>),
    /// A frame for this connection alone (ack, error, pong, typing).
    Frame(Utf8Bytes),
    /// Close the connection with this code and reason, after what is queued before it.
    Close(u16, &'static str),
    /// Read the user's channels again and join any this connection does not follow (the
    /// cluster bus may have lost a `member.added` for a channel nobody followed here).
    Resync,
    /// Time to ping the client, and to check that it still answers and that its session
    /// has not expired ([`super::hub::start_pinger`]); when the ping was queued.
    Ping(std::time::Instant),
}

impl Item {
    fn bytes(&self) -> usize {
        match self {
            Item::Event(d) => d.frame.len(),
            Item::Frame(f) => f.len(),
            Item::Close(..) | Item::Resync | Item::Ping(_) => 0,
        }
    }
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    bytes: usize,
    /// Set once the queue overflowed or was told to close; nothing more is queued.
    closed: bool,
    /// A ping is queued: another is not (a connection whose task is held up gets one).
    ping: bool,
    /// The connection's task, waiting for the queue to fill. Kept here, under the lock,
    /// rather than as a `Notify`: the waiting future is then a pointer or two, and every
    /// idle connection holds one.
    waiting: Option<Waker>,
}

impl Queue {
    /// The waiting task, if the queue was empty (and so the task may be waiting for it).
    fn waiter(&mut self, was_empty: bool) -> Option<Waker> {
        if was_empty { self.waiting.take() } else { None }
    }
}

pub struct Outbox {
    queue: Mutex<Queue>,
    limit: usize,
    stats: Arc<Stats>,
}

impl Outbox {
    pub fn new(limit: usize, stats: Arc<Stats>) -> Self {
        Self {
            queue: Mutex::default(),
            limit,
            stats,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item`; false if the connection is closing. A push that would pass the byte
    /// bound drops everything queued and closes the connection as a slow consumer.
    pub fn push(&self, item: Item) -> bool {
        self.push_all(std::iter::once(item))
    }

    /// Queues `items` in order, as [`Outbox::push`] would one by one, under one lock and
    /// with at most one wake-up (fan-out hands a connection a channel's run of consecutive
    /// events at once). False if any was refused: the connection is closing, or closed on the way
    /// as a slow consumer.
    pub fn push_all(&self, items: impl IntoIterator<Item = Item>) -> bool {
        let mut q = self.lock();
        let was_empty = q.items.is_empty();
        // Bytes queued here and not yet counted in the stats.
        let mut added = 0;
        let mut all = true;
        for item in items {
            if q.closed {
                all = false;
                break;
            }
            let size = item.bytes();
            if q.bytes + size > self.limit {
                // The level this run reached before it overflowed, as pushes would record.
                if added > 0 {
                    self.stats
                        .outbox_peak_bytes
                        .fetch_max(q.bytes, Ordering::Relaxed);
                }
                self.stats
                    .buffered_bytes
                    .fetch_sub(q.bytes - added, Ordering::Relaxed);
                added = 0;
                q.items.clear();
                q.bytes = 0;
                q.items.push_back(Item::Close(
                    crate::wire::protocol::close::SLOW_CONSUMER,
                    "slow consumer: reconnect and resume",
                ));
                q.closed = true;
                self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                all = false;
                break;
            }
            match item {
                Item::Close(..) => q.closed = true,
                Item::Ping(_) if q.ping => continue,
                Item::Ping(_) => q.ping = true,
                _ => {}
            }
            q.items.push_back(item);
            q.bytes += size;
            added += size;
        }
        let queued = q.bytes;
        let now_empty = q.items.is_empty();
        let waiter = q.waiter(was_empty && !now_empty);
        drop(q);
        if added > 0 {
            self.stats
                .buffered_bytes
                .fetch_add(added, Ordering::Relaxed);
            self.stats
                .outbox_peak_bytes
                .fetch_max(queued, Ordering::Relaxed);
        }
        if let Some(w) = waiter {
            w.wake();
        }
        all
    }

    /// Closes the connection after what is queued: `code` unless it is already closing.
    pub fn close(&self, code: u16, reason: &'static str) {
        self.push(Item::Close(code, reason));
    }

    /// Gives back the memory of an empty queue (a burst grows it; draining keeps its
    /// capacity).
    pub fn shrink(&self) {
        let mut q = self.lock();
        if q.items.is_empty() {
            q.items = VecDeque::new();
        }
    }

    /// Bytes the queue holds room for (tests).
    #[cfg(test)]
    pub fn capacity_bytes(&self) -> usize {
        self.lock().items.capacity() * std::mem::size_of::<Item>()
    }

    /// Moves everything queued into `out`, waiting until there is something.
    pub async fn take(&self, out: &mut VecDeque<Item>) {
        std::future::poll_fn(|cx| self.poll_take(cx, out)).await;
    }

    /// Moves everything queued into `out`; if nothing is, the task is woken by the next
    /// push. One task takes from an outbox: its waker is the one kept. An empty `out`
    /// (as the caller's always is) trades places with the queue: no item is moved.
    pub fn poll_take(&self, cx: &mut Context<'_>, out: &mut VecDeque<Item>) -> Poll<()> {
        let mut q = self.lock();
        if q.items.is_empty() {
            match &mut q.waiting {
                Some(w) => w.clone_from(cx.waker()),
                none => *none = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        self.stats
            .buffered_bytes
            .fetch_sub(q.bytes, Ordering::Relaxed);
        q.bytes = 0;
        q.ping = false;
        if out.is_empty() {
            std::mem::swap(&mut q.items, out);
        } else {
            out.extend(q.items.drain(..));
        }
        Poll::Ready(())
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let q = self.lock();
        self.stats
            .buffered_bytes
            .fetch_sub(q.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Item {
        Item::Frame("x".repeat(n).into())
    }

    #[tokio::test]
    async fn a_push_past_the_bound_empties_the_queue_and_closes_it() {
        let stats = Arc::new(Stats::default());
        let outbox = Outbox::new(100, Arc::clone(&stats));
        assert!(outbox.push(frame(60)));
        assert_eq!(stats.buffered_bytes.load(Ordering::Relaxed), 60);
        assert!(!outbox.push(frame(60)));
        assert_eq!(stats.buffered_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(stats.slow_consumers.load(Ordering::Relaxed), 1);
        assert!(!outbox.push(frame(1)), "a slow queue takes nothing more");
        let mut out = VecDeque::new();
        outbox.take(&mut out).await;
        assert!(matches!(out.make_contiguous(), [Item::Close(4008, _)]));
        assert!(stats.outbox_peak_bytes.load(Ordering::Relaxed) <= 100);
    }

    /// Counts its wake-ups.
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_run_is_queued_in_order_with_one_wake_up_and_overflows_as_pushes_would() {
        let stats = Arc::new(Stats::default());
        let outbox = Outbox::new(100, Arc::clone(&stats));
        let wakes = Arc::new(Wakes(Default::default()));
        let waker = Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        let mut out = VecDeque::new();
        assert!(outbox.poll_take(&mut cx, &mut out).is_pending());
        assert!(outbox.push_all((1..=4).map(frame)));
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "the waiting task is woken"
        );
        assert_eq!(stats.buffered_bytes.load(Ordering::Relaxed), 10);
        assert_eq!(stats.outbox_peak_bytes.load(Ordering::Relaxed), 10);
        assert!(outbox.poll_take(&mut cx, &mut out).is_ready());
        let sizes: Vec<usize> = out.drain(..).map(|i| i.bytes()).collect();
        assert_eq!(sizes, [1, 2, 3, 4]);
        assert_eq!(stats.buffered_bytes.load(Ordering::Relaxed), 0);
        // A run that passes the bound part way: what it queued goes too, and the queue
        // holds only the close, counted as nothing.
        assert!(outbox.push(frame(30)));
        assert!(!outbox.push_all([frame(30), frame(30), frame(30), frame(1)]));
        assert_eq!(stats.outbox_peak_bytes.load(Ordering::Relaxed), 90);
        assert_eq!(stats.buffered_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(stats.slow_consumers.load(Ordering::Relaxed), 1);
        assert!(
            !outbox.push_all([frame(1)]),
            "a slow queue takes nothing more"
        );
        assert!(outbox.poll_take(&mut cx, &mut out).is_ready());
        assert!(matches!(out.make_contiguous(), [Item::Close(4008, _)]));
        assert_eq!(stats.buffered_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn take_returns_everything_queued_in_order() {
        let stats = Arc::new(Stats::default());
        let outbox = Outbox::new(1000, Arc::clone(&stats));
        for n in 1..=3 {
            outbox.push(frame(n));
        }
        let mut out = VecDeque::new();
        outbox.take(&mut out).await;
        let sizes: Vec<usize> = out.iter().map(Item::bytes).collect();
        assert_eq!(sizes, [1, 2, 3]);
        assert_eq!(stats.buffered_bytes.load(Ordering::Relaxed), 0);
    }

    /// Regression: a burst grew a connection's queue, and draining it kept the room for
    /// the whole burst until the connection closed.
    #[tokio::test]
    async fn an_idle_queue_gives_back_what_a_burst_grew() {
        let outbox = Outbox::new(1 << 20, Arc::new(Stats::default()));
        for _ in 0..1000 {
            outbox.push(frame(10));
        }
        // Taken into an empty list, the queue's room goes with its items (the session
        // gives its list's back at each ping); the outbox keeps the list's (none).
        let mut out = VecDeque::new();
        outbox.take(&mut out).await;
        assert_eq!(out.len(), 1000);
        assert!(out.capacity() >= 1000);
        assert_eq!(outbox.capacity_bytes(), 0);
        // Taken into a list that holds something, the items move and the room stays.
        for _ in 0..1000 {
            outbox.push(frame(10));
        }
        outbox.take(&mut out).await;
        assert_eq!(out.len(), 2000);
        assert!(outbox.capacity_bytes() >= 1000 * std::mem::size_of::<Item>());
        outbox.shrink();
        assert_eq!(outbox.capacity_bytes(), 0);
        // A queue with something in it is left alone.
        outbox.push(frame(10));
        outbox.shrink();
        outbox.take(&mut out).await;
        assert_eq!(out.len(), 2001);
    }

    #[tokio::test]
    async fn a_ping_is_queued_once_until_taken() {
        let outbox = Outbox::new(1000, Arc::new(Stats::default()));
        let pings =
            |out: &VecDeque<Item>| out.iter().filter(|i| matches!(i, Item::Ping(_))).count();
        let ping = || Item::Ping(std::time::Instant::now());
        assert!(outbox.push(ping()));
        assert!(outbox.push(frame(1)));
        assert!(outbox.push(ping()), "taken as done: one is queued");
        let mut out = VecDeque::new();
        outbox.take(&mut out).await;
        assert_eq!((out.len(), pings(&out)), (2, 1));
        assert!(outbox.push(ping()));
        out.clear();
        outbox.take(&mut out).await;
        assert_eq!(pings(&out), 1, "queued again once the last was taken");
    }

    #[tokio::test]
    async fn a_push_wakes_the_task_waiting_to_take() {
        let outbox = Arc::new(Outbox::new(1000, Arc::new(Stats::default())));
        let taker = tokio::spawn({
            let outbox = Arc::clone(&outbox);
            async move {
                let mut out = VecDeque::new();
                outbox.take(&mut out).await;
                out.len()
            }
        });
        tokio::task::yield_now().await;
        outbox.push(frame(1));
        let taken = tokio::time::timeout(std::time::Duration::from_secs(5), taker).await;
        assert_eq!(taken.expect("woken").expect("no panic"), 1);
    }
}
