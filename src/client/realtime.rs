//! `/v1/ws` with automatic reconnect-and-resume.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::json;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, error::UrlError};

use super::{Api, ClientError, Frame, Result, parse_frame};

/// What [`Realtime::next`] reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Frame(Frame),
    /// The connection ended (close code, if any); the next call reconnects and resumes.
    Dropped {
        code: Option<u16>,
    },
}

/// The socket under a read buffer of its own: the WebSocket library zeroes the room of its
/// read buffer before every read (including the one that finds nothing), which at 16 KiB
/// was an eighth of the load tool's time at a thousand members. Its own buffer is kept
/// small; this one, filled without zeroing, still takes what has arrived in one call.
type Ws = WebSocketStream<BufReader<TcpStream>>;

/// The read buffer under the WebSocket library's (see [`Ws`]).
const READ_BUFFER: usize = 16 * 1024;
/// The WebSocket library's own read buffer: zeroed before each read, so small.
const FRAME_READ: usize = 512;

/// A pending send, kept until acknowledged and sent again after a reconnect.
#[derive(Debug, Clone)]
struct PendingSend {
    client_id: String,
    channel_id: i64,
    text: String,
}

impl PendingSend {
    fn op(&self) -> String {
        json!({"op": "send", "channel_id": self.channel_id.to_string(), "text": self.text, "client_id": self.client_id})
            .to_string()
    }
}

/// A `/v1/ws` connection that reconnects and resumes by itself.
pub struct Realtime {
    url: String,
    token: String,
    ws: Option<Ws>,
    positions: HashMap<i64, i64>,
    /// Unanswered sends in the order they were made (resent in that order), and where each
    /// `client_id` sits in it.
    pending: BTreeMap<u64, PendingSend>,
    pending_at: HashMap<String, u64>,
    next_send: u64,
    /// Give up after this many failed reconnect attempts in a row.
    pub max_attempts: u32,
}

impl Realtime {
    /// Connects, says hello (resuming from `resume`) and waits for `ready`, which it returns.
    pub async fn connect(api: &Api, resume: HashMap<i64, i64>) -> Result<(Self, Frame)> {
        let token = api
            .token()
            .ok_or_else(|| ClientError::Protocol("log in before connecting".into()))?;
        let mut rt = Self {
            url: api.ws_url(),
            token: token.to_owned(),
            ws: None,
            positions: resume,
            pending: BTreeMap::new(),
            pending_at: HashMap::new(),
            next_send: 0,
            max_attempts: 60,
        };
        let ready = rt.open().await?;
        Ok((rt, ready))
    }

    /// The last seq seen per channel: where a reconnect resumes.
    pub fn positions(&self) -> &HashMap<i64, i64> {
        &self.positions
    }

    /// Whether the socket is up (after a drop, the next [`Realtime::next`] reconnects).
    pub fn is_connected(&self) -> bool {
        self.ws.is_some()
    }

    /// Sends not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    async fn open(&mut self) -> Result<Frame> {
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(FRAME_READ);
        let request = self.url.as_str().into_client_request()?;
        let uri = request.uri();
        // As the WebSocket library's own connect answers them (built without TLS).
        match uri.scheme_str() {
            Some("ws") => {}
            Some("wss") => {
                return Err(tungstenite::Error::Url(UrlError::TlsFeatureNotEnabled).into());
            }
            _ => return Err(tungstenite::Error::Url(UrlError::UnsupportedUrlScheme).into()),
        }
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_owned();
        let port = uri.port_u16().unwrap_or(80);
        let io = tungstenite::Error::Io;
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(io)?;
        tcp.set_nodelay(true).map_err(io)?;
        let stream = BufReader::with_capacity(READ_BUFFER, tcp);
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
        let resume: HashMap<String, i64> = self
            .positions
            .iter()
            .map(|(c, s)| (c.to_string(), *s))
            .collect();
        let hello = json!({"op": "hello", "token": self.token, "resume": resume});
        ws.send(WsMessage::text(hello.to_string())).await?;
        let ready = loop {
            match ws.next().await {
                Some(Ok(WsMessage::Text(t))) => match parse_frame(&t)? {
                    ready @ Frame::Ready { .. } => break ready,
                    Frame::Error { code, message, .. } => {
                        return Err(ClientError::Closed {
                            code: 0,
                            reason: format!("{code}: {message}"),
                        });
                    }
                    other => return Err(ClientError::Protocol(format!("before ready: {other:?}"))),
                },
                Some(Ok(WsMessage::Close(frame))) => {
                    let (code, reason) = close_parts(frame);
                    return Err(ClientError::Closed { code, reason });
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => {
                    return Err(ClientError::Closed {
                        code: 1006,
                        reason: "closed before ready".into(),
                    });
                }
            }
        };
        if let Frame::Ready { channels, .. } = &ready {
            for &(c, last) in channels {
                self.positions.entry(c).or_insert(last);
            }
        }
        for p in self.pending.values() {
            ws.send(WsMessage::text(p.op())).await?;
        }
        self.ws = Some(ws);
        Ok(ready)
    }

    /// Sends a message; its `ack` (or `error`) arrives through [`Realtime::next`]. Kept and
    /// sent again after a reconnect until answered.
    pub async fn send(&mut self, channel_id: i64, text: &str, client_id: &str) -> Result<()> {
        self.queue(channel_id, text, client_id).await?;
        self.flush().await
    }

    /// [`Realtime::send`] without the flush: the frame waits in the socket's write buffer
    /// until [`Realtime::flush`] or the next `send` (or until the buffer passes 128 KiB, or
    /// a pong for the server's ping goes out), so a client with several sends ready writes
    /// them in one system call. Flush before waiting on [`Realtime::next`] for their
    /// answers: a send left in the buffer may never reach the server.
    pub async fn queue(&mut self, channel_id: i64, text: &str, client_id: &str) -> Result<()> {
        let p = PendingSend {
            client_id: client_id.to_owned(),
            channel_id,
            text: text.to_owned(),
        };
        let op = p.op();
        self.forget(client_id);
        self.next_send += 1;
        self.pending_at.insert(client_id.to_owned(), self.next_send);
        self.pending.insert(self.next_send, p);
        if let Some(ws) = &mut self.ws
            && ws.feed(WsMessage::text(op)).await.is_err()
        {
            self.ws = None;
        }
        Ok(())
    }

    /// Writes out what [`Realtime::queue`] left in the write buffer. A connection that
    /// fails here is dropped; its pending sends go again after the reconnect.
    pub async fn flush(&mut self) -> Result<()> {
        if let Some(ws) = &mut self.ws
            && ws.flush().await.is_err()
        {
            self.ws = None;
        }
        Ok(())
    }

    /// Watches the presence of a channel's members: a [`Frame::Presence`] answers with how
    /// they stand, then a [`Frame::PresenceUpdated`] comes with each change. Not resumed:
    /// after a reconnect (a new `ready`) or leaving a channel, watch again.
    pub async fn watch_channel_presence(&mut self, channel_id: i64) -> Result<()> {
        let op =
            serde_json::json!({"op": "presence.subscribe", "channel_id": channel_id.to_string()});
        self.send_raw(&op.to_string()).await
    }

    /// Watches the presence of users who share a channel with this one (at most 200).
    pub async fn watch_presence(&mut self, user_ids: &[i64]) -> Result<()> {
        let ids: Vec<String> = user_ids.iter().map(i64::to_string).collect();
        let op = serde_json::json!({"op": "presence.subscribe", "user_ids": ids});
        self.send_raw(&op.to_string()).await
    }

    /// Tells the server this connection's user is idle here (or active again).
    pub async fn set_idle(&mut self, idle: bool) -> Result<()> {
        let status = if idle { "idle" } else { "online" };
        let op = serde_json::json!({"op": "presence.set", "status": status});
        self.send_raw(&op.to_string()).await
    }

    /// Sends any text frame as it is (e.g. `read`, `typing`, `ping`, or a malformed one).
    /// If the connection is down, the frame is dropped; pending sends are kept.
    pub async fn send_raw(&mut self, frame: &str) -> Result<()> {
        if let Some(ws) = &mut self.ws
            && ws.send(WsMessage::text(frame.to_owned())).await.is_err()
        {
            self.ws = None;
        }
        Ok(())
    }

    /// The next thing from the server. After a [`Incoming::Dropped`], the next call
    /// reconnects (with backoff) and resumes; it reports the new `ready` as a frame.
    /// Closes that a reconnect cannot fix (4001, 4002, 4003) are errors.
    pub async fn next(&mut self) -> Result<Incoming> {
        let Some(ws) = &mut self.ws else {
            return self.reconnect().await.map(Incoming::Frame);
        };
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Text(t))) => {
                    let frame = parse_frame(&t)?;
                    self.track(&frame);
                    return Ok(Incoming::Frame(frame));
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    let (code, reason) = close_parts(frame);
                    self.ws = None;
                    if matches!(code, 4001..=4003) {
                        return Err(ClientError::Closed { code, reason });
                    }
                    return Ok(Incoming::Dropped { code: Some(code) });
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => {
                    self.ws = None;
                    return Ok(Incoming::Dropped { code: None });
                }
            }
        }
    }

    /// What [`Realtime::next`] would return without waiting: a frame already read off the
    /// socket (or there to read), or `None`, also while disconnected (only `next`
    /// reconnects).
    pub fn try_next(&mut self) -> Option<Result<Incoming>> {
        self.ws.as_ref()?;
        // Connected, `next` only awaits the stream, so dropping it pending loses nothing.
        self.next().now_or_never()
    }

    fn track(&mut self, frame: &Frame) {
        match frame {
            Frame::Event(e) => {
                let at = self.positions.entry(e.channel_id).or_insert(0);
                *at = (*at).max(e.seq);
            }
            Frame::Joined {
                channel_id,
                last_seq,
            } => {
                self.positions.insert(*channel_id, *last_seq);
            }
            Frame::Left { channel_id } => {
                self.positions.remove(channel_id);
            }
            Frame::Ack { client_id, .. } => {
                self.forget(client_id);
            }
            Frame::Error {
                client_id: Some(c),
                code,
                ..
            } if code != "overloaded" && code != "rate_limited" => {
                self.forget(c);
            }
            _ => {}
        }
    }

    fn forget(&mut self, client_id: &str) {
        if let Some(at) = self.pending_at.remove(client_id) {
            self.pending.remove(&at);
        }
    }

    async fn reconnect(&mut self) -> Result<Frame> {
        let mut wait = Duration::from_millis(50);
        for _ in 0..self.max_attempts {
            match self.open().await {
                Ok(ready) => return Ok(ready),
                Err(
                    e @ ClientError::Closed {
                        code: 4001..=4003, ..
                    },
                ) => return Err(e),
                Err(_) => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
        Err(ClientError::GaveUp(self.max_attempts))
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        if let Some(ws) = &mut self.ws {
            let _ = ws.close(None).await;
        }
    }

    /// Drops the socket without a close frame, as a lost network would.
    pub fn drop_connection(&mut self) {
        self.ws = None;
    }

    /// Stops reading (for slow-consumer tests): the socket stays open, unread.
    pub fn take_socket(&mut self) -> Option<Ws> {
        self.ws.take()
    }
}

fn close_parts(frame: Option<CloseFrame>) -> (u16, String) {
    frame.map_or((1005, String::new()), |f| {
        (f.code.into(), f.reason.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client connects its socket itself (under a read buffer of its own): a URL it
    /// cannot serve is refused as the WebSocket library's connect refused it.
    #[tokio::test]
    async fn a_tls_url_is_refused_as_the_websocket_library_refuses_it() {
        let api = Api::new("https://127.0.0.1:9").with_token("t");
        let refused = Realtime::connect(&api, HashMap::new()).await.err();
        assert!(
            matches!(
                refused,
                Some(ClientError::Ws(tungstenite::Error::Url(
                    UrlError::TlsFeatureNotEnabled
                )))
            ),
            "{refused:?}"
        );
    }
}
