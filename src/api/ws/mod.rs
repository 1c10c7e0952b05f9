//! `GET /v1/ws`: the real-time session. The session logic is written over any
//! `Stream + Sink` of WebSocket messages, so tests can drive it without a socket.
//!
//! Exactly once, in order: the connection keeps, per channel, the seq it has delivered.
//! An event at or below it is a duplicate and is dropped; one past a gap is preceded by the
//! missing events, read from the hot-channel cache or the store. The connection goes
//! online (and follows its channels) *before* it reads its channel list, so every event
//! committed after that read reaches it live; the replay of resumed channels and the live
//! stream meet without a gap or a duplicate however the two race.

mod session;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tracing::Instrument;

use self::session::{End, Session};
use super::AppState;
use super::dto::ErrorBody;
use super::error::ApiError;
use super::extract::authenticate;
use super::scopes::Scope;
use crate::gateway::hub::{ConnId, Hub};
use crate::gateway::outbox::{Outbox, Socket};
use crate::model::User;
use crate::wire::protocol::{self, ClientOp, Malformed, close};

/// Bytes of written frames gathered before they go to the socket.
const WRITE_BUFFER: usize = 64 * 1024;

/// The real-time gateway: a WebSocket opening handshake (RFC 6455). Once upgraded, the
/// first frame must be `{"op": "hello", "token", "resume"?}` (the token travels in it, not
/// in a header); see the API notes (docs/api.md) for the frames and close codes.
#[utoipa::path(get, path = "/v1/ws", tag = "real time",
    params(crate::api::openapi::WsHandshake),
    responses((status = 101, description = "Switching to the WebSocket protocol",
               headers(("Upgrade" = String, description = "`websocket`"),
                       ("Connection" = String, description = "`upgrade`"),
                       ("Sec-WebSocket-Accept" = String, description = "Derived from `Sec-WebSocket-Key` (RFC 6455)"))),
              (status = 400, body = ErrorBody, description = "`invalid_handshake`: not a WebSocket opening handshake (a plain GET, or a header missing or wrong)")))]
pub async fn upgrade(
    State(state): State<AppState>,
    direct: Option<Extension<Socket>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // The socket itself, when the connection loop lends it ([`crate::conns`]): the fan-out
    // then writes events to it (see `Session::serve`).
    let direct = direct.map(|Extension(s)| s);
    let ws = match ws {
        Ok(ws) => ws,
        Err(refused) => {
            return ApiError::invalid_handshake(refused.status(), refused.body_text())
                .into_response();
        }
    };
    let max = state.config.gateway.max_frame_bytes;
    // tungstenite refuses frames far past the limit; frames just past it get a readable
    // error from the session.
    // A small read buffer: tungstenite zeroes its spare capacity on every read attempt,
    // and a 128 KiB default made that a tenth of the fan-out profile; every connection
    // holds one for its whole life. 256 bytes takes a client's usual op (a ping, a read
    // marker, a short send) in one read; a longer frame takes a read per 256 bytes, and
    // pipelined sends about one read each. (4 KiB → 1 KiB → 256 bytes took ~3 KiB, then
    // ~0.75 KiB, off every idle connection; see BENCHMARKS.md.) Written frames
    // gather in a 64 KiB buffer, so one flush of a drained queue is one write, not one per
    // frame; a socket that stops taking writes stops the session at twice that.
    // The largest frame written is `ready` for a user at the channel cap (or with up to
    // 10,000 channels: memberships made before a lower cap keep working). A bound, not an
    // allocation: the buffer only grows to what is written.
    let ready = ready_bound(state.config.limits.rules.max_channels_per_user.max(10_000));
    ws.max_message_size(max * 2)
        .max_frame_size(max * 2)
        .read_buffer_size(256)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(2 * WRITE_BUFFER + max.max(ready))
        // The session logs under the upgrade request's span (its request id).
        .on_upgrade(move |socket: WebSocket| {
            run(socket, state, direct).instrument(tracing::Span::current())
        })
}

/// Bytes of the largest `ready` frame: the user (a name of at most 32 bytes) and up to
/// `channels` positions (`{"id":"<19 digits>","last_seq":<19 digits>},`: 64 bytes).
fn ready_bound(channels: u32) -> usize {
    1024 + 64 * channels as usize
}

/// A frame from the client, as the session sees it.
pub(super) enum Incoming {
    Text(Utf8Bytes),
    /// Not a text frame, or one too large.
    Bad(String),
    /// Ping, pong: proof of life only.
    Alive,
    Gone,
}

pub(super) async fn next_frame<S, E>(socket: &mut S, max: usize) -> Incoming
where
    S: Stream<Item = Result<Message, E>> + Unpin,
{
    match socket.next().await {
        Some(Ok(Message::Text(t))) if t.len() > max => {
            Incoming::Bad(format!("a frame may be at most {max} bytes"))
        }
        Some(Ok(Message::Text(t))) => Incoming::Text(t),
        Some(Ok(Message::Binary(_))) => Incoming::Bad("frames must be text (JSON)".into()),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Incoming::Alive,
        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => Incoming::Gone,
    }
}

/// Sends a close frame, then reads (and drops) what the client still sends until its own
/// close frame arrives, for at most 2 s in all: dropping a socket with unread data in it
/// makes the kernel answer with a reset, which can reach the client before our close
/// frame does and hide the close code from it.
async fn close_with<S, E>(socket: &mut S, code: u16, reason: &str)
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = socket.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

async fn refuse<S, E>(socket: &mut S, code: u16, error: &ApiError)
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin,
{
    let _ = socket
        .send(Message::Text(protocol::error(None, error.detail()).into()))
        .await;
    close_with(socket, code, &error.message).await;
}

pub(super) fn malformed(message: impl Into<String>) -> ApiError {
    ApiError::invalid_json(message.into())
}

/// Runs one connection from its first frame to its close.
///
/// An idle connection's memory is mostly this task, whose future is as large as the
/// largest state it passes through: the hello (with its timer), the authentication and
/// going online, the start (`ready` and the replay) and the final close run in boxed
/// futures of their own, freed once done, so the connection keeps only what its session
/// loop holds. (An `async` block rather
/// than an `async fn`: an `async fn` keeps a second copy of the socket it is passed.)
#[allow(clippy::manual_async_fn)] // On purpose: see above.
pub fn run<S, E>(
    mut socket: S,
    state: AppState,
    direct: Option<Socket>,
) -> impl Future<Output = ()> + Send
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin + Send,
{
    async move {
        let admitting = Box::pin(admit(&mut socket, state));
        let Some(Admitted {
            mut session,
            user,
            resume,
            online: _online,
        }) = admitting.await
        else {
            return;
        };
        // Going online, `ready` and the replay: boxed too, with the lists they make.
        // (Its outcome is a flag, not a `Result` matched around the loop's await: the
        // task would keep that beside the loop for the connection's life.)
        let starting = Box::pin(start(&mut session, &mut socket, user, resume));
        let Some(unavailable) = starting.await else {
            return;
        };
        if let Some(direct) = direct {
            session.attach(direct);
        }
        let served = session.serve(&mut socket, unavailable).await;
        // Nothing more from the fan-out: the close (if any) is the last frame.
        session.detach();
        if let Err(end) = served {
            end_with(&mut socket, end).await;
        }
    }
}

/// Goes online, sends `ready` and the replay; whether some channels are unavailable, or
/// `None` once the connection is closed.
async fn start<S, E>(
    session: &mut Session,
    socket: &mut S,
    user: User,
    resume: HashMap<i64, i64>,
) -> Option<bool>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin + Send,
{
    match session.start(socket, user, resume).await {
        Ok(unavailable) => Some(unavailable),
        Err(end) => {
            end_with(socket, end).await;
            None
        }
    }
}

/// Closes the connection the way its session ended (a connection that is gone is not
/// written to).
async fn end_with<S, E>(socket: &mut S, end: End)
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin + Send,
{
    if let End::Close(code, reason) = end {
        let closing = Box::pin(close_with(socket, code, &reason));
        closing.await;
    }
}

/// A connection past its hello: authenticated and online.
struct Admitted {
    session: Session,
    user: User,
    /// The channels to resume, and the seq the client has of each.
    resume: HashMap<i64, i64>,
    /// Goes offline however the session ends, a panic included.
    online: Online,
}

/// Reads the hello, authenticates it and puts the connection online; `None` once the
/// connection was refused (and told why) or is gone.
async fn admit<S, E>(socket: &mut S, state: AppState) -> Option<Admitted>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin + Send,
{
    let cfg = state.config.gateway;
    let hello = tokio::time::timeout(cfg.hello_timeout, async {
        loop {
            match next_frame(socket, cfg.max_frame_bytes).await {
                Incoming::Alive => continue,
                other => return other,
            }
        }
    })
    .await;
    let (token, resume) = match hello {
        Err(_) => {
            let secs = cfg.hello_timeout.as_secs_f64();
            let reason = format!("no hello within {secs} s");
            close_with(socket, close::NO_HELLO, &reason).await;
            return None;
        }
        Ok(Incoming::Gone | Incoming::Alive) => return None,
        Ok(Incoming::Bad(reason)) => {
            refuse(socket, close::MALFORMED, &malformed(reason)).await;
            return None;
        }
        Ok(Incoming::Text(text)) => match protocol::parse(&text) {
            Ok(ClientOp::Hello { token, resume }) => (token, resume),
            Ok(_) => {
                let e = malformed("the first frame must be a hello");
                refuse(socket, close::MALFORMED, &e).await;
                return None;
            }
            Err(Malformed(reason)) => {
                refuse(socket, close::MALFORMED, &malformed(reason)).await;
                return None;
            }
        },
    };
    let mut resume_at = HashMap::with_capacity(resume.len());
    for (id, seq) in resume {
        match parse_id("resume", &id) {
            Ok(id) => resume_at.insert(id, seq.max(0)),
            Err(e) => {
                refuse(socket, close::MALFORMED, &e).await;
                return None;
            }
        };
    }
    // A revocation between this authentication and going online would find no connection
    // to close: the generation tells whether one may have happened, and then the session
    // is looked up again once the connection is online.
    let generation = state.sessions.generation();
    let authed = match authenticate(&state, token.expose()).await {
        Ok(a) => a,
        Err(e) => {
            let code = if e.code == "unauthorized" {
                close::BAD_TOKEN
            } else {
                close::RESTARTING
            };
            refuse(socket, code, &e).await;
            return None;
        }
    };
    if let Some(scopes) = authed.scopes
        && !scopes.contains(Scope::MessagesRead)
    {
        let e = ApiError::insufficient_scope(Scope::MessagesRead.name());
        refuse(socket, close::FORBIDDEN, &e).await;
        return None;
    }
    let outbox = Arc::new(Outbox::new(
        cfg.queue_bytes,
        Arc::clone(state.gateway.hub.stats()),
    ));
    let max = state.config.limits.ws_connections_per_user;
    let Some(conn) =
        state
            .gateway
            .hub
            .try_register(authed.user.id, authed.token, Arc::clone(&outbox), max)
    else {
        state.edge.rate_limited(crate::metrics::Limit::Connections);
        let e = ApiError::too_many_connections(max);
        refuse(socket, close::TOO_MANY_CONNECTIONS, &e).await;
        return None;
    };
    let online = Online {
        hub: Arc::clone(&state.gateway.hub),
        presence: Arc::clone(&state.gateway.presence),
        conn,
        user_id: authed.user.id,
    };
    if state.sessions.generation() != generation {
        let now = crate::clock::now_ms();
        let found = match authed.scopes {
            None => state
                .store
                .session_user(authed.token, now)
                .await
                .map(|s| s.is_some()),
            Some(_) => state
                .store
                .key_user(authed.token, now)
                .await
                .map(|k| k.is_some()),
        };
        let refused = match found {
            Ok(true) => None,
            Ok(false) => Some((close::BAD_TOKEN, ApiError::unauthorized())),
            Err(e) => Some((close::RESTARTING, ApiError::from(e))),
        };
        if let Some((code, e)) = refused {
            refuse(socket, code, &e).await;
            return None;
        }
    }
    state.gateway.presence.connected(conn, authed.user.id);
    Some(Admitted {
        session: Session::new(
            state,
            authed.user.id,
            authed.expires_at,
            authed.scopes,
            conn,
            outbox,
        ),
        user: authed.user,
        resume: resume_at,
        online,
    })
}

/// An admitted connection: online in the hub and in presence until dropped.
struct Online {
    hub: Arc<Hub>,
    presence: Arc<crate::gateway::presence::Presence>,
    conn: ConnId,
    user_id: i64,
}

impl Drop for Online {
    fn drop(&mut self) {
        self.hub.unregister(self.conn);
        self.presence.disconnected(self.conn, self.user_id);
    }
}

/// Parses a decimal channel id from a frame.
pub(crate) fn parse_id(field: &'static str, value: &str) -> Result<i64, ApiError> {
    value
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::invalid_field(field, "must be a decimal id"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future a function returns, from the function's type alone.
    fn future_size3<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every idle connection holds its task's future, which is as large as the largest
    /// state it passes through. It was 3,280 bytes when the hello, the authentication, the
    /// start and the close were states of it (each now boxed for its moment), the socket
    /// was held twice and the loop held a `Notify`'s waiter and a second timer; 1,176
    /// bytes (a 560-byte loop) while the loop had a ping timer of its own, awaited
    /// `async fn` wrappers around the socket's writes and kept the start's outcome.
    /// Tokio's task cell around it (axum's upgrade wrapper, 168 bytes, and the cell's
    /// header, scheduler and trailer, 104) is rounded up to 128 bytes: at most 1,008 bytes
    /// here keeps it at 1,280.
    #[test]
    fn an_idle_connection_holds_a_small_future() {
        type Ws = WebSocket;
        let run = future_size3(run::<Ws, axum::Error>);
        let serve = future_size3(
            Session::serve::<Ws, axum::Error>
                as fn(&'static mut Session, &'static mut Ws, bool) -> _,
        );
        let socket = std::mem::size_of::<Ws>();
        let session = std::mem::size_of::<Session>();
        // The socket, the session and the loop, and little else.
        assert!(
            run <= socket + session + serve + 96,
            "run: {run} bytes (socket {socket}, session {session}, loop {serve})"
        );
        assert!(run <= 1008, "run: {run} bytes (loop {serve})");
        assert!(serve <= 440, "the session loop's future: {serve} bytes");
        assert!(session <= 160, "Session: {session} bytes");
    }

    #[test]
    fn ids_must_be_positive_decimals() {
        assert_eq!(parse_id("channel_id", "42").ok(), Some(42));
        for bad in ["", "-1", "0", "x", "1.5", "99999999999999999999"] {
            assert!(parse_id("channel_id", bad).is_err(), "{bad}");
        }
    }
}
