//! A Rust client of Natter: [`Api`] for the REST calls a client needs to get going, and
//! [`Realtime`] for `/v1/ws` with automatic reconnect-and-resume. The CLI (`natter send`,
//! `natter tail`), the bench tool and the tests use it.
//!
//! [`Realtime`] remembers the last seq it has seen per channel and the sends not yet
//! acknowledged; after a drop (or a 1012/4008 close) it reconnects with backoff, resumes
//! from those positions and sends the unacknowledged ops again with their `client_id`, so
//! nothing is lost and, the server's idempotency permitting, nothing is doubled. It reports
//! what arrives as it arrives and does not drop duplicates itself: a caller can check the
//! server's exactly-once promise.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("request: {0}")]
    Http(#[from] reqwest::Error),
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("the server closed the connection for good ({code}): {reason}")]
    Closed { code: u16, reason: String },
    #[error("gave up reconnecting after {0} attempts")]
    GaveUp(u32),
    #[error("unexpected frame: {0}")]
    Protocol(String),
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// The REST calls a client needs: accounts, channels, members, history.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    /// `base` is the server's root, e.g. `http://127.0.0.1:8080`.
    pub fn new(base: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
            token: None,
        }
    }

    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `ws://…/v1/ws` for this server.
    pub fn ws_url(&self) -> String {
        let rest = self
            .base
            .strip_prefix("https://")
            .map(|r| format!("wss://{r}"))
            .or_else(|| {
                self.base
                    .strip_prefix("http://")
                    .map(|r| format!("ws://{r}"))
            })
            .unwrap_or_else(|| self.base.clone());
        format!("{rest}/v1/ws")
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status.is_success() {
            return Ok(value);
        }
        Err(ClientError::Api {
            status: status.as_u16(),
            code: value["error"]["code"]
                .as_str()
                .unwrap_or("unknown")
                .to_owned(),
            message: value["error"]["message"].as_str().unwrap_or("").to_owned(),
        })
    }

    async fn session(&mut self, path: &str, username: &str, password: &str) -> Result<i64> {
        let v = self
            .call(
                reqwest::Method::POST,
                path,
                Some(json!({"username": username, "password": password})),
            )
            .await?;
        self.token = v["token"].as_str().map(str::to_owned);
        id(&v["user"]["id"])
    }

    /// Creates an account and logs in as it; returns the user id.
    pub async fn register(&mut self, username: &str, password: &str) -> Result<i64> {
        self.session("/v1/users", username, password).await
    }

    /// Logs in; returns the user id.
    pub async fn login(&mut self, username: &str, password: &str) -> Result<i64> {
        self.session("/v1/sessions", username, password).await
    }

    /// Creates a group (or broadcast) channel; returns its id.
    pub async fn create_channel(&self, name: &str, kind: &str, members: &[i64]) -> Result<i64> {
        let members: Vec<String> = members.iter().map(i64::to_string).collect();
        let v = self
            .call(
                reqwest::Method::POST,
                "/v1/channels",
                Some(json!({"name": name, "kind": kind, "members": members})),
            )
            .await?;
        id(&v["id"])
    }

    pub async fn add_member(&self, channel_id: i64, user_id: i64) -> Result<()> {
        let path = format!("/v1/channels/{channel_id}/members/{user_id}");
        self.call(reqwest::Method::PUT, &path, Some(json!({})))
            .await?;
        Ok(())
    }

    pub async fn remove_member(&self, channel_id: i64, user_id: i64) -> Result<()> {
        let path = format!("/v1/channels/{channel_id}/members/{user_id}");
        self.call(reqwest::Method::DELETE, &path, None).await?;
        Ok(())
    }

    /// Sends over REST; returns the message.
    pub async fn send(&self, channel_id: i64, text: &str, client_id: Option<&str>) -> Result<Msg> {
        let path = format!("/v1/channels/{channel_id}/messages");
        let v = self
            .call(
                reqwest::Method::POST,
                &path,
                Some(json!({"text": text, "client_id": client_id})),
            )
            .await?;
        Msg::from_value(&v)
    }

    pub async fn logout(&self) -> Result<()> {
        self.call(reqwest::Method::DELETE, "/v1/sessions/current", None)
            .await?;
        Ok(())
    }
}

fn id(v: &Value) -> Result<i64> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("expected a decimal id, got {v}")))
}

/// A message as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Msg {
    #[serde(deserialize_with = "de_id")]
    pub id: i64,
    #[serde(deserialize_with = "de_id")]
    pub channel_id: i64,
    pub seq: i64,
    #[serde(deserialize_with = "de_id")]
    pub author_id: i64,
    pub text: String,
    pub client_id: Option<String>,
    pub deleted: bool,
}

impl Msg {
    fn from_value(v: &Value) -> Result<Self> {
        Msg::deserialize(v).map_err(|e| ClientError::Protocol(format!("message: {e}")))
    }
}

fn de_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

/// One event of a channel's log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: String,
    pub channel_id: i64,
    pub seq: i64,
    pub message: Option<Msg>,
    pub user_id: Option<i64>,
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Ready {
        user_id: i64,
        /// (channel id, last seq).
        channels: Vec<(i64, i64)>,
    },
    Event(Event),
    Ack {
        client_id: String,
        message: Msg,
    },
    Error {
        client_id: Option<String>,
        code: String,
        message: String,
    },
    Typing {
        channel_id: i64,
        user_id: i64,
    },
    Joined {
        channel_id: i64,
        last_seq: i64,
    },
    Left {
        channel_id: i64,
    },
    Pong,
}

/// Every field any server frame has; the frame's `type` says which are set. Parsing into
/// this (not a `Value` tree) keeps a receiving client cheap.
#[derive(Deserialize)]
struct RawFrame {
    #[serde(rename = "type")]
    kind: String,
    channel_id: Option<String>,
    seq: Option<i64>,
    message: Option<Msg>,
    user_id: Option<String>,
    client_id: Option<String>,
    user: Option<RawId>,
    channels: Option<Vec<RawPosition>>,
    channel: Option<RawPosition>,
    error: Option<RawError>,
}

#[derive(Deserialize)]
struct RawId {
    id: String,
}

#[derive(Deserialize)]
struct RawPosition {
    id: String,
    last_seq: i64,
}

#[derive(Deserialize)]
struct RawError {
    code: String,
    message: String,
}

fn parse_id(field: &str, v: Option<&str>) -> Result<i64> {
    v.and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("expected a decimal id in `{field}`")))
}

/// Parses a server frame.
pub fn parse_frame(text: &str) -> Result<Frame> {
    let f: RawFrame =
        serde_json::from_str(text).map_err(|e| ClientError::Protocol(format!("{e}: {text}")))?;
    let channel_id = || parse_id("channel_id", f.channel_id.as_deref());
    Ok(match f.kind.as_str() {
        "ready" => Frame::Ready {
            user_id: parse_id("user.id", f.user.as_ref().map(|u| u.id.as_str()))?,
            channels: f
                .channels
                .iter()
                .flatten()
                .map(|c| Ok((parse_id("channels.id", Some(&c.id))?, c.last_seq)))
                .collect::<Result<_>>()?,
        },
        "ack" => Frame::Ack {
            client_id: f.client_id.unwrap_or_default(),
            message: f
                .message
                .ok_or_else(|| ClientError::Protocol("an ack without its message".into()))?,
        },
        "error" => {
            let e = f.error.unwrap_or(RawError {
                code: String::new(),
                message: String::new(),
            });
            Frame::Error {
                client_id: f.client_id,
                code: e.code,
                message: e.message,
            }
        }
        "typing" => Frame::Typing {
            channel_id: channel_id()?,
            user_id: parse_id("user_id", f.user_id.as_deref())?,
        },
        "channel.joined" => {
            let c = f.channel.ok_or_else(|| {
                ClientError::Protocol("channel.joined without its channel".into())
            })?;
            Frame::Joined {
                channel_id: parse_id("channel.id", Some(&c.id))?,
                last_seq: c.last_seq,
            }
        }
        "channel.left" => Frame::Left {
            channel_id: channel_id()?,
        },
        "pong" => Frame::Pong,
        k if k.starts_with("message.") || k.starts_with("member.") || k.starts_with("channel.") => {
            Frame::Event(Event {
                channel_id: channel_id()?,
                seq: f.seq.unwrap_or(0),
                user_id: f.user_id.as_deref().and_then(|s| s.parse().ok()),
                message: f.message,
                kind: f.kind,
            })
        }
        _ => return Err(ClientError::Protocol(format!("unknown frame: {text}"))),
    })
}

/// What [`Realtime::next`] reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Frame(Frame),
    /// The connection ended (close code, if any); the next call reconnects and resumes.
    Dropped {
        code: Option<u16>,
    },
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A pending send, kept until acknowledged and sent again after a reconnect.
#[derive(Debug, Clone)]
struct PendingSend {
    channel_id: i64,
    text: String,
}

/// A `/v1/ws` connection that reconnects and resumes by itself.
pub struct Realtime {
    url: String,
    token: String,
    ws: Option<Ws>,
    positions: HashMap<i64, i64>,
    pending: BTreeMap<String, PendingSend>,
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
            max_attempts: 60,
        };
        let ready = rt.open().await?;
        Ok((rt, ready))
    }

    /// The last seq seen per channel: where a reconnect resumes.
    pub fn positions(&self) -> &HashMap<i64, i64> {
        &self.positions
    }

    /// Sends not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    async fn open(&mut self) -> Result<Frame> {
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(16 * 1024);
        let (mut ws, _) =
            tokio_tungstenite::connect_async_with_config(self.url.as_str(), Some(config), true)
                .await?;
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
        for (client_id, p) in &self.pending {
            let op = json!({"op": "send", "channel_id": p.channel_id.to_string(), "text": p.text, "client_id": client_id});
            ws.send(WsMessage::text(op.to_string())).await?;
        }
        self.ws = Some(ws);
        Ok(ready)
    }

    /// Sends a message; its `ack` (or `error`) arrives through [`Realtime::next`]. Kept and
    /// sent again after a reconnect until answered.
    pub async fn send(&mut self, channel_id: i64, text: &str, client_id: &str) -> Result<()> {
        self.pending.insert(
            client_id.to_owned(),
            PendingSend {
                channel_id,
                text: text.to_owned(),
            },
        );
        let op = json!({"op": "send", "channel_id": channel_id.to_string(), "text": text, "client_id": client_id});
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
                self.pending.remove(client_id);
            }
            Frame::Error {
                client_id: Some(c),
                code,
                ..
            } if code != "overloaded" && code != "rate_limited" => {
                self.pending.remove(c);
            }
            _ => {}
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
