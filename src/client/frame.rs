//! The server's frames as the client sees them, and their parser.

use serde::Deserialize;
use serde_json::Value;

use super::{ClientError, Result};

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
    /// A reply's thread root.
    #[serde(default, deserialize_with = "de_opt_id")]
    pub thread_root_id: Option<i64>,
    /// The members the text mentions.
    #[serde(default, deserialize_with = "de_ids")]
    pub mentions: Vec<i64>,
}

/// A message a search found, and its snippet.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Found {
    pub message: Msg,
    pub snippet: Vec<crate::wire::dto::SnippetPiece>,
}

impl Found {
    pub(super) fn from_value(v: &Value) -> Result<Self> {
        Found::deserialize(v).map_err(|e| ClientError::Protocol(format!("search hit: {e}")))
    }

    /// The snippet's text, with the words found between `[` and `]`.
    pub fn marked(&self) -> String {
        self.snippet
            .iter()
            .map(|p| {
                if p.hit {
                    format!("[{}]", p.text)
                } else {
                    p.text.clone()
                }
            })
            .collect()
    }
}

impl Msg {
    pub(super) fn from_value(v: &Value) -> Result<Self> {
        Msg::deserialize(v).map_err(|e| ClientError::Protocol(format!("message: {e}")))
    }
}

fn de_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn de_ids<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect()
}

fn de_opt_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .transpose()
}

/// One event of a channel's log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: String,
    pub channel_id: i64,
    pub seq: i64,
    pub message: Option<Box<Msg>>,
    pub user_id: Option<i64>,
    /// The message reacted to, in `reaction.*` events.
    pub message_id: Option<i64>,
    /// The emoji, in `reaction.*` events.
    pub emoji: Option<String>,
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
        message: Box<Msg>,
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
    /// A user who shares a channel with this one changed their profile.
    UserUpdated {
        user_id: i64,
        display_name: Option<String>,
        /// The account was deleted.
        deleted: bool,
    },
    /// How the users a `presence.subscribe` named stand.
    Presence(Vec<PresenceOf>),
    /// A watched user's presence changed.
    PresenceUpdated(PresenceOf),
    Pong,
}

/// A user's presence as a frame tells it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PresenceOf {
    #[serde(deserialize_with = "de_id")]
    pub user_id: i64,
    /// `online`, `idle` or `offline`.
    pub status: String,
    /// When an offline user was last online (RFC 3339), if known.
    #[serde(default)]
    pub last_seen_at: Option<String>,
}

/// Every field any server frame has; the frame's `type` says which are set. Parsing into
/// this (not a `Value` tree) keeps a receiving client cheap.
#[derive(Deserialize)]
struct RawFrame {
    #[serde(rename = "type")]
    kind: String,
    channel_id: Option<String>,
    seq: Option<i64>,
    message: Option<Box<Msg>>,
    user_id: Option<String>,
    message_id: Option<String>,
    emoji: Option<String>,
    client_id: Option<String>,
    user: Option<RawId>,
    channels: Option<Vec<RawPosition>>,
    channel: Option<RawPosition>,
    error: Option<RawError>,
    status: Option<String>,
    last_seen_at: Option<String>,
    users: Option<Vec<PresenceOf>>,
}

#[derive(Deserialize)]
struct RawId {
    id: String,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    deleted: bool,
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
        "presence" => Frame::Presence(f.users.unwrap_or_default()),
        "presence.updated" => Frame::PresenceUpdated(PresenceOf {
            user_id: parse_id("user_id", f.user_id.as_deref())?,
            status: f
                .status
                .ok_or_else(|| ClientError::Protocol("presence.updated without a status".into()))?,
            last_seen_at: f.last_seen_at,
        }),
        "user.updated" => {
            let user = f
                .user
                .ok_or_else(|| ClientError::Protocol("user.updated without its user".into()))?;
            Frame::UserUpdated {
                user_id: parse_id("user.id", Some(&user.id))?,
                display_name: user.display_name,
                deleted: user.deleted,
            }
        }
        k if ["message.", "member.", "channel.", "reaction."]
            .iter()
            .any(|p| k.starts_with(p)) =>
        {
            Frame::Event(Event {
                channel_id: channel_id()?,
                seq: f.seq.unwrap_or(0),
                user_id: f.user_id.as_deref().and_then(|s| s.parse().ok()),
                message_id: f.message_id.as_deref().and_then(|s| s.parse().ok()),
                emoji: f.emoji,
                message: f.message,
                kind: f.kind,
            })
        }
        _ => return Err(ClientError::Protocol(format!("unknown frame: {text}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model;
    use crate::wire::protocol;

    fn message() -> model::Message {
        model::Message {
            id: 9,
            channel_id: 5,
            seq: 3,
            author_id: 2,
            text: "hi".into(),
            client_id: Some("c".into()),
            created_at: 0,
            edited_at: None,
            deleted: false,
            ..model::Message::default()
        }
    }

    /// The client reads what the server's encoders write.
    #[test]
    fn parses_every_frame_the_server_encodes() {
        let user = model::User {
            id: 2,
            username: "u".into(),
            created_at: 0,
            ..model::User::default()
        };
        let ready = protocol::ready(
            &user,
            &[protocol::ChannelPosition {
                id: "5".into(),
                last_seq: 3,
            }],
            &["6".into()],
        );
        assert_eq!(
            parse_frame(&ready).unwrap(),
            Frame::Ready {
                user_id: 2,
                channels: vec![(5, 3)]
            }
        );
        let msg = Msg {
            id: 9,
            channel_id: 5,
            seq: 3,
            author_id: 2,
            text: "hi".into(),
            client_id: Some("c".into()),
            deleted: false,
            thread_root_id: None,
            mentions: Vec::new(),
        };
        assert_eq!(
            parse_frame(&protocol::ack("c", &message())).unwrap(),
            Frame::Ack {
                client_id: "c".into(),
                message: Box::new(msg.clone())
            }
        );
        let event = model::Event {
            channel_id: 5,
            seq: 3,
            at: 0,
            body: model::EventBody::MessageCreated(message()),
        };
        assert_eq!(
            parse_frame(&protocol::event(&event)).unwrap(),
            Frame::Event(Event {
                kind: "message.created".into(),
                channel_id: 5,
                seq: 3,
                message: Some(Box::new(msg)),
                user_id: None,
                message_id: None,
                emoji: None,
            })
        );
        let reacted = model::Event {
            channel_id: 5,
            seq: 5,
            at: 0,
            body: model::EventBody::ReactionAdded {
                message_id: 9,
                user_id: 2,
                emoji: "👍".into(),
            },
        };
        assert_eq!(
            parse_frame(&protocol::event(&reacted)).unwrap(),
            Frame::Event(Event {
                kind: "reaction.added".into(),
                channel_id: 5,
                seq: 5,
                message: None,
                user_id: Some(2),
                message_id: Some(9),
                emoji: Some("👍".into()),
            })
        );
        let removed = model::Event {
            channel_id: 5,
            seq: 4,
            at: 0,
            body: model::EventBody::MemberRemoved { user_id: 2 },
        };
        assert!(matches!(parse_frame(&protocol::event(&removed)).unwrap(),
            Frame::Event(Event { kind, user_id: Some(2), seq: 4, .. }) if kind == "member.removed"));
        assert_eq!(
            parse_frame(&protocol::typing(5, 2)).unwrap(),
            Frame::Typing {
                channel_id: 5,
                user_id: 2
            }
        );
        assert_eq!(
            parse_frame(&protocol::left(5)).unwrap(),
            Frame::Left { channel_id: 5 }
        );
        assert_eq!(parse_frame(protocol::PONG).unwrap(), Frame::Pong);
        let err = crate::api::error::ApiError::invalid_json("bad");
        assert!(
            matches!(parse_frame(&protocol::error(Some("c"), err.detail())).unwrap(),
            Frame::Error { client_id: Some(c), code, .. } if c == "c" && code == "invalid_json")
        );
        assert!(parse_frame(r#"{"type":"nope"}"#).is_err());
    }
}
