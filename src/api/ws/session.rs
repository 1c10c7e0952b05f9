//! One WebSocket session after its hello: going online, `ready`, the replay of resumed
//! channels, then the loop that reads ops, writes queued frames and pings.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes};
use futures_util::{Sink, SinkExt, Stream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::{Incoming, malformed, next_frame};
use crate::api::AppState;
use crate::api::error::ApiError;
use crate::api::messages::admit_send;
use crate::config::Feature;
use crate::gateway::hub::ConnId;
use crate::gateway::outbox::{Delivery, Item, Outbox};
use crate::model::User;
use crate::store::{ReadFence, StoreError};
use crate::wire::protocol::{self, ChannelPosition, ClientOp, Malformed, close};

/// Events read per trip when replaying or filling a gap.
const FILL_PAGE: u32 = 256;
/// Least time between two typing signals of one connection in one channel.
const TYPING_EVERY: Duration = Duration::from_millis(1500);

/// Why a session ends.
pub(super) enum End {
    /// Close with this code and reason.
    Close(u16, String),
    /// The peer is gone or the socket failed: nothing to say.
    Gone,
}

impl End {
    fn store(e: StoreError) -> Self {
        tracing::warn!(error = %e, "read for a WebSocket session; closing it so the client resumes");
        End::Close(
            close::RESTARTING,
            "the server could not read; reconnect and resume".into(),
        )
    }
}

pub(super) struct Session {
    state: AppState,
    user: User,
    conn: ConnId,
    outbox: Arc<Outbox>,
    /// Channel → the seq delivered last: the connection's channels and its place in each.
    positions: HashMap<i64, i64>,
    typing: HashMap<i64, Instant>,
    /// Events written since the shared counter was last told.
    delivered: u64,
    /// When the session's token expires (Unix ms): the connection closes with 4001 then.
    expires_at: i64,
}

/// The answer to one send or read op.
type Reply = Utf8Bytes;

impl Session {
    pub(super) fn new(
        state: AppState,
        user: User,
        expires_at: i64,
        conn: ConnId,
        outbox: Arc<Outbox>,
    ) -> Self {
        Self {
            state,
            user,
            conn,
            outbox,
            positions: HashMap::new(),
            typing: HashMap::new(),
            delivered: 0,
            expires_at,
        }
    }

    pub(super) async fn serve<S, E>(
        &mut self,
        socket: &mut S,
        resume: HashMap<i64, i64>,
    ) -> Result<(), End>
    where
        S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin + Send,
    {
        let cfg = self.state.config.gateway;
        let hub = Arc::clone(&self.state.gateway.hub);
        // Follow the channels first, then read where each one stands: an event committed
        // after that read is dispatched to us live.
        // Channels on a PostgreSQL shard that is down are named in ready as unavailable,
        // neither followed nor reported left; the session ends with 1012 once every shard
        // answers again, and the client's resume then brings them.
        let first = self.listing().await?.views;
        let ids: Vec<i64> = first.iter().map(|v| v.channel.id).collect();
        hub.subscribe_all(self.conn, &ids);
        // A cluster bus brings this node the events of what it follows once its
        // subscriptions reach the server: wait for that (bounded) before reading where the
        // channels stand, so that what is committed after the read comes live.
        self.state.gateway.bus.sync().await;
        let listing = self.listing().await?;
        let (now, unavailable) = (listing.views, listing.unavailable);
        let current: HashSet<i64> = now.iter().map(|v| v.channel.id).collect();
        for v in &first {
            if !current.contains(&v.channel.id) {
                hub.unsubscribe(self.conn, v.channel.id);
            }
        }
        // Already-followed channels cost a set lookup each.
        let ids: Vec<i64> = now.iter().map(|v| v.channel.id).collect();
        hub.subscribe_all(self.conn, &ids);
        let mut listed = Vec::with_capacity(now.len());
        for v in &now {
            let last = v.channel.last_seq;
            // If nothing of it was dispatched here since it was followed, what comes after
            // `last` is what to deliver: the dispatcher fills any gap before it.
            hub.seed(v.channel.id, last);
            let at = resume.get(&v.channel.id).map_or(last, |&s| s.min(last));
            self.positions.insert(v.channel.id, at);
            listed.push(ChannelPosition {
                id: v.channel.id.to_string(),
                last_seq: last,
            });
        }
        let unavailable_ids: Vec<String> = unavailable.iter().map(i64::to_string).collect();
        let ready: Utf8Bytes = protocol::ready(&self.user, &listed, &unavailable_ids).into();
        let size = ready.len();
        if feed(socket, ready).await.is_err() {
            // The write buffer is sized for the ready frame of the channel cap; a failure
            // here is the server's to look at, and the client is told.
            tracing::warn!(
                user_id = self.user.id,
                channels = listed.len(),
                bytes = size,
                "write the ready frame; closing"
            );
            return Err(End::Close(
                close::INTERNAL,
                "the server could not send ready".into(),
            ));
        }
        for &id in resume
            .keys()
            .filter(|id| !current.contains(id) && !unavailable.contains(id))
        {
            feed(socket, protocol::left(id).into()).await?;
        }
        flush(socket, cfg.idle_timeout).await?;
        // Replay up to where each channel stood when listed; what came since is
        // dispatched live (a gap before it filled from the store).
        let lasts: HashMap<i64, i64> = now
            .iter()
            .map(|v| (v.channel.id, v.channel.last_seq))
            .collect();
        for (&id, _) in resume.iter().filter(|(id, _)| current.contains(id)) {
            self.fill(socket, id, lasts[&id]).await?;
        }
        self.count_delivered();

        let sends = Arc::new(Semaphore::new(cfg.max_in_flight));
        let (reply_tx, mut replies) = mpsc::unbounded_channel::<Reply>();
        let mut ticker = tokio::time::interval(cfg.ping_interval);
        ticker.reset();
        let mut last_seen = Instant::now();
        let mut items = Vec::new();
        // Only a session with unavailable channels checks, each second, whether they are back.
        let mut recheck =
            (!unavailable.is_empty()).then(|| tokio::time::interval(Duration::from_secs(1)));
        loop {
            tokio::select! {
                Some(_) = async {
                    match &mut recheck {
                        Some(every) => Some(every.tick().await),
                        None => std::future::pending().await,
                    }
                } => {
                    if self.state.store.health().parts.iter().all(|(_, up)| *up) {
                        flush(socket, cfg.idle_timeout).await?;
                        finish_sends(socket, &sends, &mut replies, cfg.max_in_flight).await;
                        return Err(End::Close(
                            close::RESTARTING,
                            "every channel can be read again: reconnect and resume".into(),
                        ));
                    }
                }
                incoming = next_frame(socket, cfg.max_frame_bytes) => {
                    last_seen = Instant::now();
                    match incoming {
                        Incoming::Text(text) => self.on_op(&text, &sends, &reply_tx).await?,
                        Incoming::Bad(reason) => return Err(self.malformed(socket, reason).await),
                        Incoming::Alive => {}
                        Incoming::Gone => return Err(End::Gone),
                    }
                }
                Some(frame) = replies.recv() => {
                    feed(socket, frame).await?;
                    while let Ok(frame) = replies.try_recv() {
                        feed(socket, frame).await?;
                    }
                    flush(socket, cfg.idle_timeout).await?;
                }
                () = self.outbox.take(&mut items) => {
                    for item in items.drain(..) {
                        match item {
                            Item::Event(d) => self.deliver(socket, d).await?,
                            Item::Frame(f) => feed(socket, f).await?,
                            Item::Resync => self.resync(socket).await?,
                            Item::Close(code, reason) => {
                                flush(socket, cfg.idle_timeout).await?;
                                if code == close::RESTARTING {
                                    finish_sends(socket, &sends, &mut replies, cfg.max_in_flight).await;
                                }
                                return Err(End::Close(code, reason.into()));
                            }
                        }
                    }
                    flush(socket, cfg.idle_timeout).await?;
                    self.count_delivered();
                }
                _ = ticker.tick() => {
                    // Checked at each ping rather than by a timer of its own (a timer per
                    // connection costs memory): the session ends within a ping interval.
                    if crate::clock::now_ms() >= self.expires_at {
                        return Err(End::Close(close::BAD_TOKEN, "the session expired; log in again".into()));
                    }
                    if last_seen.elapsed() > cfg.idle_timeout {
                        return Err(End::Close(close::GOING_AWAY, "no answer to pings".into()));
                    }
                    // Bounded like every write: a peer that takes nothing is dropped.
                    socket.feed(Message::Ping(Default::default())).await.map_err(|_| End::Gone)?;
                    flush(socket, cfg.idle_timeout).await?;
                }
            }
        }
    }

    /// Adds the events written since the last call to the shared counter: one atomic add
    /// per drained queue, not one per event.
    fn count_delivered(&mut self) {
        let n = std::mem::take(&mut self.delivered);
        if n > 0 {
            self.state
                .gateway
                .hub
                .stats()
                .events_delivered
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    async fn malformed<S>(&self, socket: &mut S, reason: String) -> End
    where
        S: Sink<Message> + Unpin,
    {
        let _ = feed(
            socket,
            protocol::error(None, malformed(reason.clone()).detail()).into(),
        )
        .await;
        End::Close(close::MALFORMED, reason)
    }

    /// Handles one client op. Sends and reads run as their own tasks and answer through
    /// `replies`; at most `max_in_flight` of them wait for commit at once.
    async fn on_op(
        &mut self,
        text: &str,
        sends: &Arc<Semaphore>,
        replies: &mpsc::UnboundedSender<Reply>,
    ) -> Result<(), End> {
        let op = match protocol::parse(text) {
            Ok(op) => op,
            Err(Malformed(reason)) => {
                let frame = protocol::error(None, malformed(reason.clone()).detail());
                self.outbox.push(Item::Frame(frame.into()));
                self.outbox.close(close::MALFORMED, "malformed frame");
                return Ok(());
            }
        };
        match op {
            ClientOp::Ping {} => {
                self.outbox.push(Item::Frame(protocol::PONG.into()));
            }
            ClientOp::Hello { .. } => {
                let frame = protocol::error(None, malformed("hello was already sent").detail());
                self.outbox.push(Item::Frame(frame.into()));
                self.outbox.close(close::MALFORMED, "a second hello");
            }
            ClientOp::Typing { channel_id } => {
                let Ok(id) = super::parse_id("channel_id", &channel_id) else {
                    return Ok(());
                };
                let now = Instant::now();
                let recent = self
                    .typing
                    .get(&id)
                    .is_some_and(|t| now - *t < TYPING_EVERY);
                // With the `typing` flag off, typing signals are taken and dropped.
                let on = self.state.config.features.enabled(Feature::Typing);
                if on
                    && self.positions.contains_key(&id)
                    && !recent
                    && self.state.admit_typing(self.user.id, id)
                {
                    self.typing.insert(id, now);
                    self.state.gateway.bus.typing(id, self.user.id);
                }
            }
            ClientOp::Send {
                channel_id,
                text,
                client_id,
            } => {
                let checked = super::parse_id("channel_id", &channel_id).and_then(|id| {
                    admit_send(&self.state, self.user.id, &text, Some(&client_id)).map(|()| id)
                });
                let id = match checked {
                    Ok(id) => id,
                    Err(e) => {
                        let _ = replies.send(protocol::error(Some(&client_id), e.detail()).into());
                        return Ok(());
                    }
                };
                let permit = in_flight(sends).await?;
                let store = Arc::clone(&self.state.store);
                let (replies, author) = (replies.clone(), self.user.id);
                let mut post = Box::pin(async move {
                    let frame = match store
                        .post_message(author, id, &text, Some(&client_id))
                        .await
                    {
                        Ok(posted) => protocol::ack(&client_id, &posted.message),
                        Err(e) => protocol::error(Some(&client_id), ApiError::from(e).detail()),
                    };
                    // Reply first: a returned permit means a queued answer.
                    let _ = replies.send(frame.into());
                    drop(permit);
                });
                // One poll here, in frame order, puts the send in the writer's FIFO queue
                // (the store queues a write on its first poll): a connection's messages
                // commit in the order it sent them, though their commits are awaited
                // concurrently.
                let first = std::future::poll_fn(|cx| Poll::Ready(post.as_mut().poll(cx))).await;
                if first.is_pending() {
                    tokio::spawn(post);
                }
            }
            ClientOp::Read { channel_id, seq } => {
                let id = match super::parse_id("channel_id", &channel_id) {
                    Ok(id) => id,
                    Err(e) => {
                        let _ = replies.send(protocol::error(None, e.detail()).into());
                        return Ok(());
                    }
                };
                if let Err(e) = self.state.admit_read_marker(self.user.id) {
                    let _ = replies.send(protocol::error(None, e.detail()).into());
                    return Ok(());
                }
                let permit = in_flight(sends).await?;
                let store = Arc::clone(&self.state.store);
                let (replies, user) = (replies.clone(), self.user.id);
                tokio::spawn(async move {
                    if let Err(e) = store.mark_read(user, id, seq).await {
                        let _ =
                            replies.send(protocol::error(None, ApiError::from(e).detail()).into());
                    }
                    drop(permit);
                });
            }
        }
        Ok(())
    }

    /// Delivers a dispatched event exactly once and in order (see the module docs).
    async fn deliver<S>(&mut self, socket: &mut S, d: Arc<Delivery>) -> Result<(), End>
    where
        S: Sink<Message> + Unpin,
    {
        let me = self.user.id;
        let Some(&at) = self.positions.get(&d.channel_id) else {
            if d.membership == Some((me, true)) {
                self.join(socket, d.channel_id).await?;
            }
            return Ok(());
        };
        if d.seq <= at {
            return Ok(());
        }
        if d.seq > at + 1 && !self.fill(socket, d.channel_id, d.seq - 1).await? {
            return Ok(());
        }
        self.send_event(socket, &d).await
    }

    /// Writes one event in its place and moves the position; a removal of this user is
    /// followed by `channel.left` and ends the channel's stream.
    async fn send_event<S>(&mut self, socket: &mut S, d: &Delivery) -> Result<(), End>
    where
        S: Sink<Message> + Unpin,
    {
        feed(socket, d.frame.clone()).await?;
        self.delivered += 1;
        self.positions.insert(d.channel_id, d.seq);
        if d.membership == Some((self.user.id, false)) {
            self.leave(socket, d.channel_id).await?;
        }
        Ok(())
    }

    async fn leave<S>(&mut self, socket: &mut S, channel_id: i64) -> Result<(), End>
    where
        S: Sink<Message> + Unpin,
    {
        self.positions.remove(&channel_id);
        self.state.gateway.hub.unsubscribe(self.conn, channel_id);
        feed(socket, protocol::left(channel_id).into()).await
    }

    /// The user's channels now (those on a shard that is down named as unavailable).
    async fn listing(&self) -> Result<crate::store::ChannelListing, End> {
        self.state
            .store
            .channel_listing(self.user.id)
            .await
            .map_err(End::store)
    }

    /// Joins the user's channels this connection does not follow yet (their additions
    /// may have been lost on the cluster bus). Leaving needs no resync: a followed
    /// channel's removal comes in order from the store like any of its events.
    async fn resync<S>(&mut self, socket: &mut S) -> Result<(), End>
    where
        S: Sink<Message> + Unpin,
    {
        let listing = self.listing().await?;
        for v in listing.views {
            if !self.positions.contains_key(&v.channel.id) {
                self.state.gateway.hub.subscribe(self.conn, v.channel.id);
                self.join(socket, v.channel.id).await?;
            }
        }
        Ok(())
    }

    /// This user was added to a channel: the hub follows it for us already; announce it
    /// with the channel as it stands, and deliver what comes after.
    async fn join<S>(&mut self, socket: &mut S, channel_id: i64) -> Result<(), End>
    where
        S: Sink<Message> + Unpin,
    {
        self.state.gateway.bus.sync().await;
        match self
            .state
            .store
            .channel(channel_id, self.user.id)
            .await
            .map_err(End::store)?
        {
            Some((channel, _)) => {
                self.state.gateway.hub.subscribe(self.conn, channel_id);
                self.state.gateway.hub.seed(channel_id, channel.last_seq);
                self.positions.insert(channel_id, channel.last_seq);
                feed(socket, protocol::joined(&channel).into()).await
            }
            // Removed again before we looked: its member.removed follows and is dropped.
            None => {
                self.state.gateway.hub.unsubscribe(self.conn, channel_id);
                Ok(())
            }
        }
    }

    /// Sends the channel's events after our position through `until` (committed, so the
    /// cache or the store has them). False if the channel's stream ended on the way (this
    /// user was removed).
    async fn fill<S>(&mut self, socket: &mut S, channel_id: i64, until: i64) -> Result<bool, End>
    where
        S: Sink<Message> + Unpin,
    {
        let idle = self.state.config.gateway.idle_timeout;
        loop {
            let Some(&at) = self.positions.get(&channel_id) else {
                return Ok(false);
            };
            if at >= until {
                return Ok(true);
            }
            let limit = (until - at).clamp(1, i64::from(FILL_PAGE)) as u32;
            let reader = Arc::clone(&self.state.gateway.reader);
            let page = reader
                .read_range(channel_id, at, until, limit, ReadFence::PRIMARY)
                .await
                .map_err(End::store)?;
            let mut progressed = false;
            for d in &page.0 {
                if d.seq != self.positions.get(&channel_id).copied().unwrap_or(i64::MAX) + 1 {
                    continue;
                }
                progressed = true;
                self.send_event(socket, d).await?;
                if !self.positions.contains_key(&channel_id) {
                    flush(socket, idle).await?;
                    return Ok(false);
                }
            }
            flush(socket, idle).await?;
            if !progressed {
                // Committed events the log cannot give: never skip them silently.
                return Err(End::Close(
                    close::RESTARTING,
                    "the channel log is not readable; reconnect and resume".into(),
                ));
            }
        }
    }
}

/// A place among the store calls this connection has waiting (sends and reads). It is
/// released once the store has answered and the reply is queued, so waiting for one never
/// waits on the session loop.
async fn in_flight(sends: &Arc<Semaphore>) -> Result<OwnedSemaphorePermit, End> {
    Arc::clone(sends)
        .acquire_owned()
        .await
        .map_err(|_| End::Gone)
}

/// Waits (bounded) for the sends already taken to commit, and writes their answers, so a
/// restarting server answers every op it accepted.
async fn finish_sends<S>(
    socket: &mut S,
    sends: &Arc<Semaphore>,
    replies: &mut mpsc::UnboundedReceiver<Reply>,
    max_in_flight: usize,
) where
    S: Sink<Message> + Unpin,
{
    // Every permit back means every store call answered and its reply queued.
    let all = u32::try_from(max_in_flight).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(5), sends.acquire_many(all)).await;
    while let Ok(frame) = replies.try_recv() {
        if socket.feed(Message::Text(frame)).await.is_err() {
            return;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), socket.flush()).await;
}

async fn feed<S>(socket: &mut S, frame: Utf8Bytes) -> Result<(), End>
where
    S: Sink<Message> + Unpin,
{
    socket
        .feed(Message::Text(frame))
        .await
        .map_err(|_| End::Gone)
}

/// Writes what was fed; a peer that takes longer than `limit` to accept it is dropped.
async fn flush<S>(socket: &mut S, limit: Duration) -> Result<(), End>
where
    S: Sink<Message> + Unpin,
{
    match tokio::time::timeout(limit, socket.flush()).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(End::Gone),
    }
}
