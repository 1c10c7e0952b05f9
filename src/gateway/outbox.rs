//! Each connection's bounded outbound queue. Fan-out pushes into it without waiting; the
//! connection's task drains everything queued at once and writes it as one flush. A queue
//! that would pass its byte bound is emptied and marked slow: the connection closes with
//! 4008 and its memory is freed at once, so one slow socket never stalls anyone else.
//!
//! The fan-out writes to the socket itself when it can ([`Outbox::deliver`]): while the
//! connection's task waits with nothing to write, it leaves its channels' positions here
//! ([`Outbox::park`]), and a channel's next events go straight to the socket, as the task
//! would have written them, without waking it. Anything else (an event out of its place,
//! a membership change, a frame of the connection's own, a socket that is full, a task
//! that is busy) is queued, and the task writes it in order when it wakes.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use axum::extract::ws::Utf8Bytes;
use rustc_hash::FxHashMap;

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
    /// The WebSocket frame header the fan-out writes before `frame` (RFC 6455, 5.2: a
    /// final text frame from the server, unmasked), and its length.
    head: ([u8; 10], u8),
    pub event: Event,
}

impl Delivery {
    pub fn new(event: Event) -> Arc<Self> {
        let membership = match &event.body {
            EventBody::MemberAdded { user_id, .. } => Some((*user_id, true)),
            EventBody::MemberRemoved { user_id } => Some((*user_id, false)),
            _ => None,
        };
        let frame: Utf8Bytes = crate::wire::protocol::event(&event).into();
        Arc::new(Self {
            channel_id: event.channel_id,
            seq: event.seq,
            membership,
            head: frame_head(frame.len()),
            frame,
            event,
        })
    }

    /// The event as a WebSocket frame on the wire: its header, then its text.
    pub fn wire(&self) -> [&[u8]; 2] {
        let (head, len) = &self.head;
        [&head[..usize::from(*len)], self.frame.as_bytes()]
    }

    /// Bytes of the frame on the wire.
    fn wire_len(&self) -> usize {
        usize::from(self.head.1) + self.frame.len()
    }
}

/// The header of a final, unmasked text frame of `len` bytes (RFC 6455, 5.2).
fn frame_head(len: usize) -> ([u8; 10], u8) {
    head_of(0x81, 0, len)
}

/// A frame header (RFC 6455, 5.2): `first` (FIN and opcode), then the length of `len`
/// with `mask` (0x80 for a client's masked frame, whose key follows) in its first byte;
/// the header and how many of its bytes are used.
pub(crate) fn head_of(first: u8, mask: u8, len: usize) -> ([u8; 10], u8) {
    let mut head = [0u8; 10];
    head[0] = first;
    let used = if len < 126 {
        head[1] = mask | len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        head[1] = mask | 126;
        head[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        head[1] = mask | 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (head, used)
}

/// The connection's socket, shared by its own I/O ([`crate::conns`]) and the fan-out.
pub type Socket = Arc<tokio::net::TcpStream>;

/// Where a connection stands in each of its channels: the seq delivered last.
pub type Positions = FxHashMap<i64, i64>;

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

/// The rest of an event's frame that the fan-out wrote to the socket in part: the bytes
/// from `.1` on of [`Delivery::wire`]. The task writes it before anything else.
#[derive(Debug)]
pub struct Rest(pub Arc<Delivery>, pub usize);

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
    /// The socket, while the connection's session runs ([`Outbox::attach`]), and its
    /// descriptor beside the lock (the fan-out reads it without a trip through the
    /// socket's own memory).
    socket: Option<Socket>,
    fd: std::os::fd::RawFd,
    /// The positions of a task that waits with nothing to write ([`Outbox::park`]): the
    /// fan-out may then write a channel's next events to the socket, and moves them.
    parked: Option<Positions>,
    /// What the socket did not take of the frame the fan-out wrote last. While it is
    /// here the fan-out only queues, and the task is woken to write it first. (Not held
    /// against the byte bound: one frame at most, which must precede even a slow
    /// consumer's close.)
    rest: Option<Box<Rest>>,
}

/// Events of a run the fan-out writes to a socket in one call, at most.
const DIRECT_RUN: usize = 32;

impl Queue {
    /// The waiting task, if the queue was empty (and so the task may be waiting for it).
    fn waiter(&mut self, was_empty: bool) -> Option<Waker> {
        if was_empty { self.waiting.take() } else { None }
    }

    /// Writes the first events of `run` to the socket if the task is parked, nothing is
    /// queued, and they are their channel's next (consecutive, no membership change among
    /// them). The events begun, and the bytes of the last one written if it went out in
    /// part (else 0). Its channel's position moves past every event begun: the rest of a
    /// partial one is kept for the task to write first ([`Rest`]), and the connection
    /// ends if it cannot be written.
    fn write_direct(&mut self, run: &[Arc<Delivery>]) -> (usize, usize) {
        let (Some(_), Some(parked)) = (&self.socket, &mut self.parked) else {
            return (0, 0);
        };
        let Some(first) = run.first() else {
            return (0, 0);
        };
        if !self.items.is_empty() || self.closed || self.rest.is_some() {
            return (0, 0);
        }
        let Some(at) = parked.get_mut(&first.channel_id) else {
            return (0, 0);
        };
        let mut slices = [IoSlice::new(&[]); 2 * DIRECT_RUN];
        let mut next = *at;
        let mut n = 0;
        for d in run.iter().take(DIRECT_RUN) {
            if d.seq != next + 1 || d.membership.is_some() {
                break;
            }
            let [head, text] = d.wire();
            slices[2 * n] = IoSlice::new(head);
            slices[2 * n + 1] = IoSlice::new(text);
            next = d.seq;
            n += 1;
        }
        if n == 0 {
            return (0, 0);
        }
        // `sendmsg` itself rather than Tokio's `try_write_vectored`: `writev` passes
        // through the file layer, and Tokio's readiness check costs a shared cache line
        // (the two were ~9 % of the server's samples at 50 msgs/s × 1000 members). The
        // readiness is not Tokio's to track here: a full socket makes the task's next
        // write find it full. A full socket, or one that failed: the task writes the
        // events (and finds the failure) as it would have.
        // SAFETY: `fd` is the descriptor of the stream `self.socket` holds a strong
        // reference to (checked above), so it stays open while this borrow lasts.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        let Ok(mut sent) = socket2::SockRef::from(&fd).send_vectored(&slices[..2 * n]) else {
            return (0, 0);
        };
        let mut whole = 0;
        for d in &run[..n] {
            if sent < d.wire_len() {
                break;
            }
            sent -= d.wire_len();
            whole += 1;
        }
        let begun = whole + usize::from(sent > 0);
        if begun > 0 {
            *at = run[begun - 1].seq;
        }
        (begun, sent)
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
        self.queue(self.lock(), items)
    }

    /// Hands the connection `run`, consecutive events of one channel: written to the
    /// socket at once while the connection's task is parked and the run continues the
    /// channel where the task left it, else queued as [`Outbox::push_all`] queues them
    /// (the task then delivers them, filling a gap or dropping a duplicate). The number
    /// of events written here.
    pub fn deliver(&self, run: &[Arc<Delivery>]) -> usize {
        let mut q = self.lock();
        let (begun, partial) = q.write_direct(run);
        if begun == run.len() && partial == 0 {
            return begun;
        }
        if partial > 0 {
            q.rest = Some(Box::new(Rest(Arc::clone(&run[begun - 1]), partial)));
            if begun == run.len() {
                // Nothing to queue: wake the task for the rest alone.
                let empty = q.items.is_empty();
                let waiter = q.waiter(empty);
                drop(q);
                if let Some(w) = waiter {
                    w.wake();
                }
                return begun;
            }
        }
        self.queue(q, run[begun..].iter().map(|d| Item::Event(Arc::clone(d))));
        begun
    }

    /// Queues `items` behind what `q` holds (see [`Outbox::push_all`]), lets the lock go
    /// and wakes the task if it may be waiting.
    fn queue(
        &self,
        mut q: std::sync::MutexGuard<'_, Queue>,
        items: impl IntoIterator<Item = Item>,
    ) -> bool {
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

    /// The connection's session starts: the fan-out may write to `socket` while the
    /// session is parked.
    pub fn attach(&self, socket: Socket) {
        let mut q = self.lock();
        q.fd = std::os::fd::AsRawFd::as_raw_fd(&*socket);
        q.socket = Some(socket);
    }

    /// The session ends: the fan-out writes nothing more to the socket (a write under
    /// way finishes first, under the lock), and queues what comes.
    pub fn detach(&self) {
        let mut q = self.lock();
        q.socket = None;
        q.parked = None;
    }

    /// The socket, while attached (to write the rest of a frame the fan-out began).
    pub fn socket(&self) -> Option<Socket> {
        self.lock().socket.clone()
    }

    /// The connection's task waits with nothing of its own to write (what it wrote is
    /// flushed to the socket): it leaves its channels' positions here, for the fan-out to
    /// write the channels' next events itself and move them. Nothing is parked while
    /// something is queued (the task takes that first), or without a socket. Before it
    /// writes anything, the task takes the positions back, and the rest of a frame begun,
    /// with [`Outbox::unpark`] or with the items of [`Outbox::poll_take`].
    pub fn park(&self, positions: &mut Positions) {
        let mut q = self.lock();
        if q.socket.is_some()
            && q.items.is_empty()
            && q.rest.is_none()
            && !q.closed
            && q.parked.is_none()
        {
            q.parked = Some(std::mem::take(positions));
        }
    }

    /// Takes back the positions parked (moved by what the fan-out wrote meanwhile), and
    /// the rest of a frame the fan-out began, to be written before anything else; after
    /// this the fan-out only queues.
    pub fn unpark(&self, positions: &mut Positions) -> Option<Rest> {
        let mut q = self.lock();
        if let Some(parked) = q.parked.take() {
            *positions = parked;
        }
        q.rest.take().map(|r| *r)
    }

    /// Bytes the queue holds room for (tests).
    #[cfg(test)]
    pub fn capacity_bytes(&self) -> usize {
        self.lock().items.capacity() * std::mem::size_of::<Item>()
    }

    /// Moves everything queued into `out`, waiting until there is something.
    #[cfg(test)]
    pub async fn take(&self, out: &mut VecDeque<Item>) {
        let mut positions = Positions::default();
        std::future::poll_fn(|cx| self.poll_take(cx, out, &mut positions)).await;
    }

    /// Moves everything queued into `out`; if nothing is, the task is woken by the next
    /// push. One task takes from an outbox: its waker is the one kept. An empty `out`
    /// (as the caller's always is) trades places with the queue: no item is moved.
    /// Parked positions come back into `positions` with the items, under the same lock:
    /// the fan-out must not write past items the task has taken and not yet written.
    /// Ready too for the rest of a frame begun alone; the task takes that with
    /// [`Outbox::unpark`] and writes it first.
    pub fn poll_take(
        &self,
        cx: &mut Context<'_>,
        out: &mut VecDeque<Item>,
        positions: &mut Positions,
    ) -> Poll<()> {
        let mut q = self.lock();
        if q.items.is_empty() && q.rest.is_none() {
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
        if let Some(parked) = q.parked.take() {
            *positions = parked;
        }
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

    /// A message event of channel 1 whose text is `size` bytes.
    fn message(seq: i64, size: usize) -> Arc<Delivery> {
        Delivery::new(Event {
            channel_id: 1,
            seq,
            at: 0,
            body: EventBody::ChannelUpdated {
                name: Some("x".repeat(size)),
            },
        })
    }

    /// A connected pair on loopback: the server's end (shared, as the connection loop
    /// shares it) and the client's.
    async fn pair() -> (Socket, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (Arc::new(accepted.unwrap().0), client.unwrap())
    }

    /// Reads WebSocket frames as a client does: each must be a final, unmasked text frame
    /// (RFC 6455, 5.2); the seq of each event, until `n` came.
    async fn read_seqs(client: &mut tokio::net::TcpStream, n: usize) -> Vec<i64> {
        use tokio::io::AsyncReadExt;
        let mut seqs = Vec::new();
        while seqs.len() < n {
            let mut head = [0u8; 2];
            client.read_exact(&mut head).await.unwrap();
            assert_eq!(head[0], 0x81, "a final text frame");
            let len = match head[1] {
                126 => usize::from(client.read_u16().await.unwrap()),
                127 => client.read_u64().await.unwrap() as usize,
                short => usize::from(short),
            };
            let mut text = vec![0; len];
            client.read_exact(&mut text).await.unwrap();
            let event: serde_json::Value = serde_json::from_slice(&text).unwrap();
            seqs.push(event["seq"].as_i64().unwrap());
        }
        seqs
    }

    #[test]
    fn frame_heads_carry_the_length_as_rfc_6455_says() {
        assert_eq!(frame_head(0), ([0x81, 0, 0, 0, 0, 0, 0, 0, 0, 0], 2));
        assert_eq!(frame_head(125).0[..2], [0x81, 125]);
        assert_eq!(frame_head(126), ([0x81, 126, 0, 126, 0, 0, 0, 0, 0, 0], 4));
        assert_eq!(frame_head(65_535).0[..4], [0x81, 126, 0xff, 0xff]);
        assert_eq!(
            frame_head(65_536),
            ([0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0], 10)
        );
    }

    #[tokio::test]
    async fn a_parked_task_gets_its_channels_next_events_on_the_socket_and_the_rest_queued() {
        let stats = Arc::new(Stats::default());
        let outbox = Outbox::new(1 << 20, Arc::clone(&stats));
        let (socket, mut client) = pair().await;
        let mut positions = Positions::from_iter([(1, 5)]);
        // Not attached, or not parked: queued.
        outbox.park(&mut positions);
        assert_eq!(outbox.deliver(&[message(6, 10)]), 0);
        let mut items = VecDeque::new();
        outbox.take(&mut items).await;
        assert_eq!(items.len(), 1);
        items.clear();
        outbox.attach(socket);
        assert_eq!(outbox.deliver(&[message(6, 10)]), 0, "not parked");
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            outbox
                .poll_take(&mut cx, &mut items, &mut positions)
                .is_ready()
        );
        items.clear();
        // Parked: the next events go out at once, a short and a long frame in one run.
        outbox.park(&mut positions);
        assert!(positions.is_empty(), "lent to the outbox");
        assert_eq!(outbox.deliver(&[message(6, 10), message(7, 300)]), 2);
        assert_eq!(read_seqs(&mut client, 2).await, [6, 7]);
        // A gap, a duplicate and a membership change are the task's to handle: queued,
        // and the first thing queued stops the fan-out writing until the task took it.
        assert_eq!(outbox.deliver(&[message(9, 10)]), 0);
        assert_eq!(
            outbox.deliver(&[message(8, 10)]),
            0,
            "behind the queued gap"
        );
        assert!(
            outbox
                .poll_take(&mut cx, &mut items, &mut positions)
                .is_ready()
        );
        assert_eq!(positions.get(&1), Some(&7), "moved by what went out");
        let queued: Vec<i64> = items
            .drain(..)
            .map(|i| match i {
                Item::Event(d) => d.seq,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(queued, [9, 8]);
        outbox.park(&mut positions);
        let removed = Delivery::new(Event {
            channel_id: 1,
            seq: 8,
            at: 0,
            body: EventBody::MemberRemoved { user_id: 3 },
        });
        assert_eq!(outbox.deliver(&[removed]), 0);
        assert!(
            outbox
                .poll_take(&mut cx, &mut items, &mut positions)
                .is_ready()
        );
        items.clear();
        // Unparked (the task is writing): queued. Detached: queued.
        assert_eq!(outbox.deliver(&[message(8, 10)]), 0);
        outbox.take(&mut items).await;
        items.clear();
        outbox.park(&mut positions);
        outbox.detach();
        assert_eq!(outbox.deliver(&[message(8, 10)]), 0);
        assert!(outbox.socket().is_none());
        outbox.take(&mut items).await;
        assert_eq!(items.len(), 1);
        assert_eq!(stats.buffered_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_frame_the_socket_takes_in_part_is_finished_first_and_whole() {
        let outbox = Outbox::new(64 << 20, Arc::new(Stats::default()));
        let (socket, mut client) = pair().await;
        outbox.attach(Arc::clone(&socket));
        let mut positions = Positions::from_iter([(1, 0)]);
        let mut cx = Context::from_waker(Waker::noop());
        let mut items = VecDeque::new();
        // The client reads nothing: frames of 20,000 bytes fill the socket until one goes
        // out in part.
        let mut seq = 0;
        let written = loop {
            assert!(seq < 10_000, "the socket never filled");
            seq += 1;
            outbox.park(&mut positions);
            let written = outbox.deliver(&[message(seq, 20_000)]);
            if written == 0 || outbox.lock().rest.is_some() {
                break written;
            }
        };
        // (Linux takes what fits of a write: the last frame goes out in part.)
        assert_eq!(written, 1, "the last frame went out in part");
        // Whatever comes next is queued behind the rest, and the task is told of both.
        assert_eq!(outbox.deliver(&[message(seq + 1, 10)]), 0);
        assert!(
            outbox
                .poll_take(&mut cx, &mut items, &mut positions)
                .is_ready()
        );
        outbox.park(&mut positions);
        assert!(!positions.is_empty(), "nothing parks while a rest waits");
        let Some(Rest(d, from)) = outbox.unpark(&mut positions) else {
            panic!("the rest is handed out");
        };
        assert!(matches!(items.make_contiguous(), [Item::Event(e)] if e.seq == seq + 1));
        assert!(from > 0 && from < d.wire_len());
        assert_eq!(
            positions.get(&1),
            Some(&seq),
            "the begun frame counts as delivered"
        );
        // What the task does: the rest of the frame first, then what was queued.
        let reader = tokio::spawn(async move { read_seqs(&mut client, seq as usize + 1).await });
        let Some(Item::Event(next)) = items.pop_front() else {
            unreachable!()
        };
        let whole = [d.wire().concat(), next.wire().concat()].concat();
        let mut at = from;
        while at < whole.len() {
            socket.writable().await.unwrap();
            match socket.try_write(&whole[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("every frame read")
            .unwrap();
        assert_eq!(got, (1..=seq + 1).collect::<Vec<_>>());
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

    #[test]
    fn a_slow_consumer_s_close_follows_the_rest_of_a_frame_begun() {
        let stats = Arc::new(Stats::default());
        let outbox = Outbox::new(100, Arc::clone(&stats));
        outbox.lock().rest = Some(Box::new(Rest(message(1, 10), 3)));
        assert!(outbox.push(frame(60)));
        assert!(!outbox.push(frame(60)));
        let mut cx = Context::from_waker(Waker::noop());
        let (mut items, mut positions) = (VecDeque::new(), Positions::default());
        let taken = outbox.poll_take(&mut cx, &mut items, &mut positions);
        assert!(taken.is_ready());
        assert!(matches!(outbox.unpark(&mut positions), Some(Rest(_, 3))));
        assert!(matches!(items.make_contiguous(), [Item::Close(4008, _)]));
        assert_eq!(stats.buffered_bytes.load(Ordering::Relaxed), 0);
        // A rest alone wakes the task too, and is handed out once.
        outbox.lock().rest = Some(Box::new(Rest(message(1, 10), 3)));
        assert!(
            outbox
                .poll_take(&mut cx, &mut VecDeque::new(), &mut positions)
                .is_ready()
        );
        assert!(outbox.unpark(&mut positions).is_some());
        assert!(outbox.unpark(&mut positions).is_none(), "once");
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
        let mut positions = Positions::default();
        assert!(
            outbox
                .poll_take(&mut cx, &mut out, &mut positions)
                .is_pending()
        );
        assert!(outbox.push_all((1..=4).map(frame)));
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "the waiting task is woken"
        );
        assert_eq!(stats.buffered_bytes.load(Ordering::Relaxed), 10);
        assert_eq!(stats.outbox_peak_bytes.load(Ordering::Relaxed), 10);
        assert!(
            outbox
                .poll_take(&mut cx, &mut out, &mut positions)
                .is_ready()
        );
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
        assert!(
            outbox
                .poll_take(&mut cx, &mut out, &mut positions)
                .is_ready()
        );
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
