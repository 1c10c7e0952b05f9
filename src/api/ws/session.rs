//! One WebSocket session after its hello: going online, `ready`, the replay of resumed
//! channels, then the loop that reads ops, writes queued frames and pings.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes};
use futures_util::stream::FuturesUnordered;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use rustc_hash::FxHashMap;

use super::{Incoming, malformed, next_frame};
use crate::api::AppState;
use crate::api::error::ApiError;
use crate::api::messages::admit_send;
use crate::api::scopes::{Scope, Scopes};
use crate::config::Feature;
use crate::gateway::hub::ConnId;
use crate::gateway::outbox::{Delivery, Item, Outbox, Positions, Rest, Socket};
use crate::model::{PresenceStatus, User};
use crate::store::{ReadFence, StoreError};
use crate::wire::protocol::{self, ChannelPosition, ClientOp, Malformed, close};

/// Events read per trip when replaying or filling a gap.
const FILL_PAGE: u32 = 256;
/// Presence ops (subscribe, unsubscribe, set) one connection may make per
/// [`PRESENCE_WINDOW`].
const PRESENCE_OPS: u32 = 20;
const PRESENCE_WINDOW: Duration = Duration::from_secs(10);
/// Users one presence op may name.
const PRESENCE_USERS_PER_OP: usize = 200;

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

/// A session's state while it lasts: every idle connection holds one (in its task), so it
/// keeps only what the loop uses.
pub(super) struct Session {
    state: AppState,
    user_id: i64,
    conn: ConnId,
    outbox: Arc<Outbox>,
    /// Channel → the seq delivered last: the connection's channels and its place in each.
    /// Lent to the outbox while the task waits (see [`Session::serve`]).
    positions: Positions,
    /// The channels this connection signalled typing in lately, and when: a few at most
    /// (entries older than `TYPING_EVERY` are dropped).
    typing: Vec<(i64, Instant)>,
    /// Presence subscriptions lately: when the window started and how many in it.
    presence_ops: (Instant, u32),
    /// Events written since the shared counter was last told.
    delivered: u64,
    /// When the session's token expires (Unix ms): the connection closes with 4001 then.
    expires_at: i64,
    /// An API key's scopes (`None`: a session's connection, which may do everything).
    scopes: Option<Scopes>,
}

/// The answer to one send or read op.
type Reply = Utf8Bytes;

impl Session {
    pub(super) fn new(
        state: AppState,
        user_id: i64,
        expires_at: i64,
        scopes: Option<Scopes>,
        conn: ConnId,
        outbox: Arc<Outbox>,
    ) -> Self {
        Self {
            state,
            user_id,
            conn,
            outbox,
            positions: FxHashMap::default(),
            typing: Vec::new(),
            presence_ops: (Instant::now(), 0),
            delivered: 0,
            expires_at,
            scopes,
        }
    }

    /// The error for an op an API key without `scope` may not do.
    fn lacks(&self, scope: Scope) -> Option<ApiError> {
        self.scopes
            .filter(|s| !s.contains(scope))
            .map(|_| ApiError::insufficient_scope(scope.name()))
    }

    /// Follows the user's channels, sends `ready` and replays the resumed channels. True
    /// if some channels are unavailable (on a shard that is down). Run boxed: its future
    /// and its lists (channel views, ids, positions) are freed before [`Session::serve`].
    pub(super) async fn start<S>(
        &mut self,
        socket: &mut S,
        user: User,
        resume: HashMap<i64, i64>,
    ) -> Result<bool, End>
    where
        S: Sink<Message> + Unpin,
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
        let ready: Utf8Bytes = protocol::ready(&user, &listed, &unavailable_ids).into();
        let size = ready.len();
        if feed(socket, ready, cfg.idle_timeout).await.is_err() {
            // The write buffer is sized for the ready frame of the channel cap; a failure
            // here is the server's to look at, and the client is told.
            tracing::warn!(
                user_id = self.user_id,
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
            feed(socket, protocol::left(id).into(), cfg.idle_timeout).await?;
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
        Ok(!unavailable.is_empty())
    }

    /// The connection's life after `ready`: reads ops, writes what is queued for it, and
    /// pings when the hub's pinger asks ([`crate::gateway::hub::start_pinger`]).
    ///
    /// With the socket attached to the outbox ([`Session::attach`]), the session lets the
    /// fan-out write to it while the task waits with everything it wrote flushed: at the
    /// top of the loop it parks its positions in the outbox ([`Outbox::park`]), and every
    /// branch takes them back before it writes or reads them. The caller detaches the
    /// socket ([`Session::detach`]) before it writes the close.
    /// Everything this future holds, every idle connection holds: what is rare (gap
    /// fills, joins, resyncs, errors, the last answers before a close) and the ops run
    /// boxed, what ops in flight share is made at the first op and dropped again when
    /// idle, and the timeouts are read from the config where they are needed.
    pub(super) async fn serve<S, E>(&mut self, socket: &mut S, unavailable: bool) -> Result<(), End>
    where
        S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin + Send,
    {
        // A session with unavailable channels checks each second whether they are back.
        // (The first check at once.)
        let mut recheck =
            unavailable.then(|| Box::new(tokio::time::interval(Duration::from_secs(1))));
        let mut ops: Option<Box<InFlight>> = None;
        let mut last_seen = Instant::now();
        let mut items = VecDeque::new();
        loop {
            self.outbox.park(&mut self.positions);
            tokio::select! {
                incoming = next_frame(socket, self.state.config.gateway.max_frame_bytes) => {
                    // The fan-out only queues from now on; what it began goes first.
                    if let Some(rest) = self.outbox.unpark(&mut self.positions) {
                        Box::pin(self.write_rest(rest)).await?;
                    }
                    last_seen = Instant::now();
                    match incoming {
                        Incoming::Text(text) => {
                            // Boxed: an op's future is larger than the rest of the loop.
                            let op = Box::pin(self.on_op(&text, &mut ops));
                            op.await?;
                        }
                        Incoming::Bad(reason) => {
                            let end = Box::pin(self.malformed(socket, reason));
                            return Err(end.await);
                        }
                        // The answer to a ping waits in the WebSocket's buffer for its next
                        // read or flush: written now, while the fan-out does not write.
                        Incoming::Alive => flush(socket, self.idle()).await?,
                        Incoming::Gone => return Err(End::Gone),
                    }
                }
                () = std::future::poll_fn(|cx| match &mut ops {
                    Some(o) => o.poll_answers(cx),
                    None => Poll::Pending,
                }) => {
                    // The fan-out only queues from now on; what it began goes first.
                    if let Some(rest) = self.outbox.unpark(&mut self.positions) {
                        Box::pin(self.write_rest(rest)).await?;
                    }
                    while let Some(frame) = ops.as_mut().and_then(|o| o.ready.pop_front()) {
                        feed(socket, frame, self.idle()).await?;
                    }
                    flush(socket, self.idle()).await?;
                }
                // (The positions come back with the items; the rest of a frame the fan-out
                // began goes first.)
                () = std::future::poll_fn(|cx| self.outbox.poll_take(cx, &mut items, &mut self.positions)) => {
                    if let Some(rest) = self.outbox.unpark(&mut self.positions) {
                        Box::pin(self.write_rest(rest)).await?;
                    }
                    let mut pinged = false;
                    // (`pop_front`, not a `drain` iterator: the iterator would be kept in
                    // every connection's task beside the loop's other state.)
                    while let Some(item) = items.pop_front() {
                        match item {
                            Item::Event(d) if self.is_next(&d) => {
                                // Inline, not `send_event`: its future would sit here.
                                feed(socket, d.frame.clone(), self.idle()).await?;
                                if let Some(left) = self.sent(&d) {
                                    let leave = Box::pin(self.leave(socket, left));
                                    leave.await?;
                                }
                            }
                            Item::Event(d) => {
                                let deliver = Box::pin(self.deliver(socket, d));
                                deliver.await?;
                            }
                            Item::Frame(f) => feed(socket, f, self.idle()).await?,
                            Item::Resync => {
                                let resync = Box::pin(self.resync(socket));
                                resync.await?;
                            }
                            Item::Ping(at) => {
                                // Checked at each ping rather than by timers of their own
                                // (a timer per connection costs memory): the session ends
                                // within a ping interval of either.
                                if crate::clock::now_ms() >= self.expires_at {
                                    flush(socket, self.idle()).await?;
                                    return Err(End::Close(close::BAD_TOKEN, "the session expired; log in again".into()));
                                }
                                // Silent until the ping was queued (frames the client sent
                                // while earlier items were written are not read yet).
                                if at.saturating_duration_since(last_seen) > self.idle() {
                                    return Err(End::Close(close::GOING_AWAY, "no answer to pings".into()));
                                }
                                // Bounded like every write: a peer that takes nothing is
                                // dropped.
                                let ping = Message::Ping(Default::default());
                                write(socket, ping, self.idle()).await?;
                                pinged = true;
                            }
                            Item::Close(code, reason) => {
                                flush(socket, self.idle()).await?;
                                if code == close::RESTARTING {
                                    InFlight::finish(ops.take(), socket).await;
                                }
                                return Err(End::Close(code, reason.into()));
                            }
                        }
                    }
                    flush(socket, self.idle()).await?;
                    self.count_delivered();
                    if pinged {
                        self.shrink(&mut ops, &mut items);
                    }
                }
                () = std::future::poll_fn(|cx| match &mut recheck {
                    Some(every) => every.poll_tick(cx).map(drop),
                    None => Poll::Pending,
                }) => {
                    // The fan-out only queues from now on; what it began goes first.
                    if let Some(rest) = self.outbox.unpark(&mut self.positions) {
                        Box::pin(self.write_rest(rest)).await?;
                    }
                    if self.state.store.health().parts.iter().all(|(_, up)| *up) {
                        flush(socket, self.idle()).await?;
                        InFlight::finish(ops.take(), socket).await;
                        return Err(End::Close(
                            close::RESTARTING,
                            "every channel can be read again: reconnect and resume".into(),
                        ));
                    }
                }
            }
        }
    }

    /// Writes the rest of an event's frame that the fan-out began on the socket, before
    /// anything else reaches it; a peer that takes longer than the idle timeout is
    /// dropped (its position already counts the event: the connection must end).
    /// (Straight to the socket, with no flush of the WebSocket first: its buffer is empty,
    /// as the task flushes before it parks, and what it may hold beside it, the answer to
    /// a ping or a close just read, must follow the frame, not land inside it.)
    async fn write_rest(&self, Rest(d, from): Rest) -> Result<(), End> {
        let raw = self.outbox.socket().ok_or(End::Gone)?;
        let written = tokio::time::timeout(self.idle(), async {
            let mut at = from;
            loop {
                let [head, text] = d.wire();
                let parts = if at < head.len() {
                    [IoSlice::new(&head[at..]), IoSlice::new(text)]
                } else if at - head.len() < text.len() {
                    [IoSlice::new(&[]), IoSlice::new(&text[at - head.len()..])]
                } else {
                    return Ok(());
                };
                raw.writable().await?;
                match raw.try_write_vectored(&parts) {
                    Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                    Ok(n) => at += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        match written {
            Ok(Ok(())) => Ok(()),
            _ => Err(End::Gone),
        }
    }

    /// How long a client may stay silent, and a write may wait for the socket.
    fn idle(&self) -> Duration {
        self.state.config.gateway.idle_timeout
    }

    /// Gives back, at each ping, what a burst grew and nothing needs now: the store calls'
    /// channel if none is in flight, the list items are taken into, the outbox's queue if
    /// empty, and stale typing times. A connection that is busy grows them again.
    fn shrink(&mut self, ops: &mut Option<Box<InFlight>>, items: &mut VecDeque<Item>) {
        if ops.as_ref().is_some_and(|o| o.is_idle()) {
            *ops = None;
        }
        *items = VecDeque::new();
        self.outbox.shrink();
        let now = Instant::now();
        self.typing.retain(|(_, t)| now - *t < TYPING_EVERY);
        self.typing.shrink_to_fit();
    }

    /// Lends the socket itself to the outbox, for [`Session::serve`].
    pub(super) fn attach(&self, socket: Socket) {
        self.outbox.attach(socket);
    }

    /// The session's loop ended: the fan-out writes nothing more to its socket.
    pub(super) fn detach(&self) {
        self.outbox.detach();
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
            self.idle(),
        )
        .await;
        End::Close(close::MALFORMED, reason)
    }

    /// Handles one client op. Sends and read markers are started here and answer through
    /// `ops` (made at the first); at most `max_in_flight` of them wait for commit at once.
    async fn on_op(&mut self, text: &str, ops: &mut Option<Box<InFlight>>) -> Result<(), End> {
        let max = self.state.config.gateway.max_in_flight;
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
                if let Some(e) = self.lacks(Scope::MessagesWrite) {
                    self.outbox
                        .push(Item::Frame(protocol::error(None, e.detail()).into()));
                    return Ok(());
                }
                let now = Instant::now();
                self.typing.retain(|(_, t)| now - *t < TYPING_EVERY);
                let recent = self.typing.iter().any(|(c, _)| *c == id);
                // With the `typing` flag off, typing signals are taken and dropped.
                let on = self.state.config.features.enabled(Feature::Typing);
                if on
                    && self.positions.contains_key(&id)
                    && !recent
                    && self.state.admit_typing(self.user_id, id)
                {
                    self.typing.push((id, now));
                    self.state.gateway.bus.typing(id, self.user_id);
                }
            }
            ClientOp::PresenceSet { status } => {
                let refused = self
                    .lacks(Scope::UsersWrite)
                    .map_or_else(|| self.admit_presence_op(), Err);
                if let Err(e) = refused {
                    self.outbox
                        .push(Item::Frame(protocol::error(None, e.detail()).into()));
                    return Ok(());
                }
                let presence = &self.state.gateway.presence;
                match PresenceStatus::parse(&status) {
                    Some(PresenceStatus::Idle) => presence.set_idle(self.conn, self.user_id, true),
                    Some(PresenceStatus::Online) => {
                        presence.set_idle(self.conn, self.user_id, false)
                    }
                    _ => {
                        let e =
                            ApiError::invalid_field("status", "status must be `online` or `idle`");
                        self.outbox
                            .push(Item::Frame(protocol::error(None, e.detail()).into()));
                    }
                }
            }
            ClientOp::PresenceSubscribe {
                channel_id,
                user_ids,
            } => {
                if let Some(e) = self.lacks(Scope::UsersRead) {
                    self.outbox
                        .push(Item::Frame(protocol::error(None, e.detail()).into()));
                    return Ok(());
                }
                let frame = match self.presence_subscribe(channel_id, user_ids).await {
                    Ok(frame) => frame,
                    Err(e) => protocol::error(None, e.detail()),
                };
                self.outbox.push(Item::Frame(frame.into()));
            }
            ClientOp::PresenceUnsubscribe {
                channel_id,
                user_ids,
            } => {
                if let Err(e) = self.admit_presence_op() {
                    self.outbox
                        .push(Item::Frame(protocol::error(None, e.detail()).into()));
                    return Ok(());
                }
                // What to stop watching needs no check: ids as given, a channel's members
                // as it stands (nothing, for a channel the caller is no longer in).
                let users = match (channel_id, user_ids) {
                    (None, None) => None,
                    (None, Some(list)) => Some(
                        list.iter()
                            .filter_map(|u| super::parse_id("user_ids", u).ok())
                            .collect::<Vec<i64>>(),
                    ),
                    (channel_id, user_ids) => {
                        match self.presence_users(channel_id, user_ids).await {
                            Ok(users) => Some(users),
                            Err(e) => {
                                self.outbox
                                    .push(Item::Frame(protocol::error(None, e.detail()).into()));
                                return Ok(());
                            }
                        }
                    }
                };
                self.state
                    .gateway
                    .presence
                    .unwatch(self.conn, users.as_deref());
            }
            ClientOp::Send {
                channel_id,
                text,
                client_id,
                thread_root_id,
            } => {
                let in_flight = ops.get_or_insert_with(|| Box::new(InFlight::new(max)));
                if let Some(e) = self.lacks(Scope::MessagesWrite) {
                    in_flight.reply(protocol::error(Some(&client_id), e.detail()).into());
                    return Ok(());
                }
                let checked = super::parse_id("channel_id", &channel_id).and_then(|id| {
                    let root = thread_root_id
                        .as_deref()
                        .map(|r| super::parse_id("thread_root_id", r))
                        .transpose()?;
                    admit_send(&self.state, self.user_id, &text, Some(&client_id))
                        .map(|()| (id, root))
                });
                let (id, root) = match checked {
                    Ok(checked) => checked,
                    Err(e) => {
                        in_flight.reply(protocol::error(Some(&client_id), e.detail()).into());
                        return Ok(());
                    }
                };
                let (store, author) = (Arc::clone(&self.state.store), self.user_id);
                let post: Call = Box::pin(async move {
                    let posted = match root {
                        Some(root) => {
                            store
                                .post_reply(author, id, root, &text, Some(&client_id))
                                .await
                        }
                        None => {
                            store
                                .post_message(author, id, &text, Some(&client_id))
                                .await
                        }
                    };
                    let frame = match posted {
                        Ok(posted) => protocol::ack(&client_id, &posted.message),
                        Err(e) => protocol::error(Some(&client_id), ApiError::from(e).detail()),
                    };
                    Some(frame.into())
                });
                in_flight.start(post).await;
            }
            ClientOp::Read { channel_id, seq } => {
                let in_flight = ops.get_or_insert_with(|| Box::new(InFlight::new(max)));
                let id = match super::parse_id("channel_id", &channel_id) {
                    Ok(id) => id,
                    Err(e) => {
                        in_flight.reply(protocol::error(None, e.detail()).into());
                        return Ok(());
                    }
                };
                if let Err(e) = self.state.admit_read_marker(self.user_id) {
                    in_flight.reply(protocol::error(None, e.detail()).into());
                    return Ok(());
                }
                let (store, user) = (Arc::clone(&self.state.store), self.user_id);
                in_flight
                    .start(Box::pin(async move {
                        let marked = store.mark_read(user, id, seq).await;
                        let e = marked.err()?;
                        Some(protocol::error(None, ApiError::from(e).detail()).into())
                    }))
                    .await;
            }
        }
        Ok(())
    }

    /// Watches the users a `presence.subscribe` names; the `presence` frame of how they
    /// stand now.
    async fn presence_subscribe(
        &mut self,
        channel_id: Option<String>,
        user_ids: Option<Vec<String>>,
    ) -> Result<String, ApiError> {
        self.admit_presence_op()?;
        let users = self.presence_users(channel_id, user_ids).await?;
        let presence = &self.state.gateway.presence;
        let mut seen = presence
            .watch(self.conn, &self.outbox, &users)
            .map_err(ApiError::too_many_watched)?;
        presence.fill_last_seen(&mut seen).await;
        Ok(protocol::presence(&seen))
    }

    /// Charges a presence op to this connection: [`PRESENCE_OPS`] per [`PRESENCE_WINDOW`].
    fn admit_presence_op(&mut self) -> Result<(), ApiError> {
        let now = Instant::now();
        if now - self.presence_ops.0 >= PRESENCE_WINDOW {
            self.presence_ops = (now, 0);
        }
        if self.presence_ops.1 >= PRESENCE_OPS {
            let wait = PRESENCE_WINDOW.saturating_sub(now - self.presence_ops.0);
            return Err(ApiError::rate_limited(crate::ratelimit::retry_after_secs(
                wait,
            )));
        }
        self.presence_ops.1 += 1;
        Ok(())
    }

    /// The users a presence op names: a channel's members (a channel of this connection's;
    /// else 404; of a DM, the other one once it counts: see
    /// [`crate::api::presence::visible_members`]), or users who share a channel with the
    /// caller as consent counts it (else 404).
    async fn presence_users(
        &self,
        channel_id: Option<String>,
        user_ids: Option<Vec<String>>,
    ) -> Result<Vec<i64>, ApiError> {
        match (channel_id, user_ids) {
            (Some(channel_id), None) => {
                let id = super::parse_id("channel_id", &channel_id)?;
                if !self.positions.contains_key(&id) {
                    return Err(ApiError::not_found_because("no such channel"));
                }
                Ok(crate::api::presence::visible_members(&self.state, self.user_id, id).await?)
            }
            (None, Some(list)) => {
                if list.len() > PRESENCE_USERS_PER_OP {
                    return Err(ApiError::invalid_field(
                        "user_ids",
                        format!("at most {PRESENCE_USERS_PER_OP} users per op"),
                    ));
                }
                let mut ids = Vec::with_capacity(list.len());
                for u in &list {
                    ids.push(super::parse_id("user_ids", u)?);
                }
                ids.sort_unstable();
                ids.dedup();
                let others: Vec<i64> = ids.iter().copied().filter(|u| *u != self.user_id).collect();
                let shared: HashSet<i64> = self
                    .state
                    .store
                    .sharing(self.user_id, &others)
                    .await?
                    .into_iter()
                    .collect();
                if others.iter().any(|u| !shared.contains(u)) {
                    return Err(ApiError::not_found_because(
                        "a user in user_ids shares no channel with you",
                    ));
                }
                Ok(ids)
            }
            _ => Err(ApiError::invalid_field(
                "channel_id",
                "give either channel_id or user_ids",
            )),
        }
    }

    /// The event is the next of a channel this connection follows: the common case, which
    /// [`Session::send_event`] writes at once. Anything else goes through
    /// [`Session::deliver`] (boxed, for its gap fill and join).
    fn is_next(&self, d: &Delivery) -> bool {
        self.positions.get(&d.channel_id) == Some(&(d.seq - 1))
    }

    /// Delivers a dispatched event exactly once and in order (see the module docs).
    async fn deliver<S>(&mut self, socket: &mut S, d: Arc<Delivery>) -> Result<(), End>
    where
        S: Sink<Message> + Unpin,
    {
        let me = self.user_id;
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
        feed(socket, d.frame.clone(), self.idle()).await?;
        if let Some(left) = self.sent(d) {
            let leave = Box::pin(self.leave(socket, left));
            leave.await?;
        }
        Ok(())
    }

    /// Counts an event written: its channel's position moves to it. The channel this
    /// user left, if the event is their removal (the connection then leaves it too).
    fn sent(&mut self, d: &Delivery) -> Option<i64> {
        self.delivered += 1;
        self.positions.insert(d.channel_id, d.seq);
        (d.membership == Some((self.user_id, false))).then_some(d.channel_id)
    }

    async fn leave<S>(&mut self, socket: &mut S, channel_id: i64) -> Result<(), End>
    where
        S: Sink<Message> + Unpin,
    {
        self.positions.remove(&channel_id);
        self.state.gateway.hub.unsubscribe(self.conn, channel_id);
        // Whom the connection may watch may have changed: it watches no one until it
        // subscribes again (documented; the web client does so on `channel.left`).
        self.state.gateway.presence.unwatch(self.conn, None);
        feed(socket, protocol::left(channel_id).into(), self.idle()).await
    }

    /// The user's channels now (those on a shard that is down named as unavailable).
    async fn listing(&self) -> Result<crate::store::ChannelListing, End> {
        self.state
            .store
            .channel_listing(self.user_id)
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
            .channel(channel_id, self.user_id)
            .await
            .map_err(End::store)?
        {
            Some((channel, _)) => {
                self.state.gateway.hub.subscribe(self.conn, channel_id);
                self.state.gateway.hub.seed(channel_id, channel.last_seq);
                self.positions.insert(channel_id, channel.last_seq);
                feed(socket, protocol::joined(&channel).into(), self.idle()).await
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

/// A store call in flight: its answer to the client, if it has one.
type Call = Pin<Box<dyn Future<Output = Option<Reply>> + Send>>;

/// A connection's store calls in flight (sends and read markers) and their answers not yet
/// written. The calls are polled by the connection's own task, so a commit wakes that task
/// once and nothing else (a task per call would be woken first, then wake this one). Made
/// at the first op and dropped when idle, so an idle connection holds none of it.
///
/// That rests on the store's promise ([`crate::store::Channels::post_message`]): a write
/// queued at the call's first poll is carried out unpolled, also when the connection
/// ends and drops its calls.
struct InFlight {
    calls: FuturesUnordered<Call>,
    max: usize,
    /// Answers to write, in the order they were made.
    ready: VecDeque<Reply>,
}

impl InFlight {
    fn new(max: usize) -> Self {
        Self {
            calls: FuturesUnordered::new(),
            max: max.max(1),
            ready: VecDeque::new(),
        }
    }

    /// Queues an answer made at once (a refused op).
    fn reply(&mut self, frame: Reply) {
        self.ready.push_back(frame);
    }

    /// Takes a call. Its first poll is here, in frame order: the store queues a write at
    /// its first poll, so a connection's writes commit in the order it sent them, though
    /// they are awaited together. At most `max` wait at once: with all places taken, this
    /// waits for the first answer (queued to be written), and the connection reads no
    /// further op meanwhile.
    async fn start(&mut self, mut call: Call) {
        let first = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
        match first {
            Poll::Ready(reply) => self.ready.extend(reply),
            Poll::Pending => self.calls.push(call),
        }
        while self.calls.len() >= self.max {
            if let Some(reply) = self.calls.next().await {
                self.ready.extend(reply);
            }
        }
    }

    /// Ready once an answer waits to be written; moves every finished call's answer to
    /// `ready` on the way.
    fn poll_answers(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while let Poll::Ready(Some(reply)) = self.calls.poll_next_unpin(cx) {
            self.ready.extend(reply);
        }
        if self.ready.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// Nothing in flight and every answer written.
    fn is_idle(&self) -> bool {
        self.calls.is_empty() && self.ready.is_empty()
    }

    /// Waits (bounded) for the calls already taken to be answered, and writes their
    /// answers, so a restarting server answers every op it accepted. Boxed: it runs once,
    /// and its timers would otherwise sit in every connection's task.
    async fn finish<S>(ops: Option<Box<Self>>, socket: &mut S)
    where
        S: Sink<Message> + Unpin,
    {
        let Some(mut ops) = ops else {
            return;
        };
        Box::pin(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Some(reply) = ops.calls.next().await {
                    ops.ready.extend(reply);
                }
            })
            .await;
            for frame in ops.ready.drain(..) {
                if socket.feed(Message::Text(frame)).await.is_err() {
                    return;
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), socket.flush()).await;
        })
        .await;
    }
}

/// Queues a text frame in the socket's write buffer; see [`Feed`].
fn feed<S>(socket: &mut S, frame: Utf8Bytes, limit: Duration) -> Feed<'_, S> {
    write(socket, Message::Text(frame), limit)
}

/// Queues any message in the socket's write buffer; see [`Feed`].
fn write<S>(socket: &mut S, message: Message, limit: Duration) -> Feed<'_, S> {
    Feed {
        socket,
        message: Some(message),
        wait: Wait::Limit(limit),
    }
}

/// Queues a message in the socket's write buffer. The socket takes it at once unless its
/// buffer is full and the peer is not reading: then this waits for room, at most `limit`
/// (a peer that takes nothing is dropped; without the limit, a session whose peer stopped
/// reading in the middle of a batch waited for ever). A future of its own, not an `async
/// fn` (whose future keeps the frame twice), and its timer made only when it has to wait:
/// it is awaited inside the session loop, whose largest wait sets the size of every
/// connection's task.
struct Feed<'a, S> {
    socket: &'a mut S,
    message: Option<Message>,
    wait: Wait,
}

/// How long a write may wait for room: its limit until it first has to wait, then the
/// timer.
enum Wait {
    Limit(Duration),
    Timer(Pin<Box<tokio::time::Sleep>>),
}

impl<S: Sink<Message> + Unpin> Future for Feed<'_, S> {
    type Output = Result<(), End>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match this.socket.poll_ready_unpin(cx) {
            Poll::Ready(Ok(())) => {
                let message = this.message.take().ok_or(End::Gone)?;
                Poll::Ready(this.socket.start_send_unpin(message).map_err(|_| End::Gone))
            }
            Poll::Ready(Err(_)) => Poll::Ready(Err(End::Gone)),
            Poll::Pending => {
                if let Wait::Limit(limit) = this.wait {
                    this.wait = Wait::Timer(Box::pin(tokio::time::sleep(limit)));
                }
                match &mut this.wait {
                    Wait::Timer(timer) => timer.as_mut().poll(cx).map(|()| Err(End::Gone)),
                    Wait::Limit(_) => Poll::Pending,
                }
            }
        }
    }
}

/// Writes what was fed; a peer that takes longer than `limit` to accept it is dropped.
async fn flush<S>(socket: &mut S, limit: Duration) -> Result<(), End>
where
    S: Sink<Message> + Unpin,
{
    // Most flushes are done at the first try (the socket takes the bytes): those need no
    // timer, which costs a registration in the timer wheel and its removal.
    match std::future::poll_fn(|cx| Poll::Ready(socket.poll_flush_unpin(cx))).await {
        Poll::Ready(Ok(())) => return Ok(()),
        Poll::Ready(Err(_)) => return Err(End::Gone),
        Poll::Pending => {}
    }
    // Boxed: a timer inside the loop's future would sit in every connection's task.
    match Box::pin(tokio::time::timeout(limit, socket.flush())).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(End::Gone),
    }
}
