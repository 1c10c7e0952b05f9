//! The `/v1/ws` wire protocol as plain types: [`ClientOp`] with a pure [`parse`], and the
//! server's frames with pure encoders. No I/O here.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::dto;
use crate::model;

/// One frame from a client.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientOp {
    Hello {
        token: crate::auth::Secret,
        /// Channel id (decimal string) → the last seq the client holds.
        #[serde(default)]
        resume: HashMap<String, i64>,
    },
    Send {
        channel_id: String,
        text: String,
        client_id: String,
        /// A reply in this message's thread.
        #[serde(default)]
        thread_root_id: Option<String>,
    },
    Read {
        channel_id: String,
        seq: i64,
    },
    Typing {
        channel_id: String,
    },
    /// Watch the presence of a channel's members, or of users who share a channel with
    /// the caller.
    #[serde(rename = "presence.subscribe")]
    PresenceSubscribe {
        #[serde(default)]
        channel_id: Option<String>,
        #[serde(default)]
        user_ids: Option<Vec<String>>,
    },
    /// Stop watching them (everyone, with neither).
    #[serde(rename = "presence.unsubscribe")]
    PresenceUnsubscribe {
        #[serde(default)]
        channel_id: Option<String>,
        #[serde(default)]
        user_ids: Option<Vec<String>>,
    },
    /// This connection's user is `idle` here, or `online` again.
    #[serde(rename = "presence.set")]
    PresenceSet {
        status: String,
    },
    Ping {},
}

/// Why a frame is not a valid op: the `error` frame's message before close 4002.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

/// Parses one text frame.
pub fn parse(frame: &str) -> Result<ClientOp, Malformed> {
    serde_json::from_str(frame).map_err(|e| Malformed(describe(&e)))
}

/// A message a person can act on, without serde's internal type names.
fn describe(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            format!(
                "a frame must be one JSON object (line {} column {})",
                e.line(),
                e.column()
            )
        }
        Category::Data => {
            let text = e.to_string();
            // serde's data errors name the field or variant at fault; keep that part.
            let detail = text.split(" at line ").next().unwrap_or(&text);
            format!("not a valid op: {detail}")
        }
    }
}

#[derive(Serialize)]
struct Ready<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    user: dto::User,
    channels: &'a [ChannelPosition],
    /// Channels that cannot be read now (a PostgreSQL shard is down): not followed; the
    /// server closes the session with 1012 once they can be, to be resumed.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    unavailable: &'a [String],
}

/// A channel the client is in and its newest seq, as `ready` lists them.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelPosition {
    pub id: String,
    pub last_seq: i64,
}

#[derive(Serialize)]
struct Ack<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    client_id: &'a str,
    message: dto::MessageRef<'a>,
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    error: dto::ErrorDetail,
}

#[derive(Serialize)]
struct Typing {
    #[serde(rename = "type")]
    kind: &'static str,
    channel_id: String,
    user_id: String,
}

#[derive(Serialize)]
struct UserUpdated {
    #[serde(rename = "type")]
    kind: &'static str,
    user: dto::User,
}

#[derive(Serialize)]
struct Joined {
    #[serde(rename = "type")]
    kind: &'static str,
    channel: dto::Channel,
}

#[derive(Serialize)]
struct Left {
    #[serde(rename = "type")]
    kind: &'static str,
    channel_id: String,
}

fn encode(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("frames serialize to JSON")
}

/// What a frame carrying a message takes besides the message's text, `client_id` and
/// mentions (its ids, seq, times, field names, the event's envelope), rounded up.
const MESSAGE_FRAME_BYTES: usize = 448;
/// A mention's bytes in a frame: a quoted id and a comma.
const MENTION_BYTES: usize = 24;

/// The bytes to reserve for a frame carrying `m`: its strings, and the rest.
fn message_frame_bytes(m: &model::Message) -> usize {
    MESSAGE_FRAME_BYTES
        + m.text.len()
        + m.client_id.as_ref().map_or(0, String::len)
        + m.mentions.len() * MENTION_BYTES
}

/// Encodes a frame into a buffer of `bytes` from the start: serde_json's own starts at
/// 128 bytes and grows two or three times (a copy each) for an event or ack of a short
/// message, one of each per message sent.
fn encode_into(value: &impl Serialize, bytes: usize) -> String {
    let mut out = Vec::with_capacity(bytes);
    serde_json::to_writer(&mut out, value).expect("frames serialize to JSON");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

pub fn ready(user: &model::User, channels: &[ChannelPosition], unavailable: &[String]) -> String {
    encode(&Ready {
        kind: "ready",
        user: user.into(),
        channels,
        unavailable,
    })
}

pub fn event(event: &model::Event) -> String {
    match event.body.message() {
        Some(m) => encode_into(&dto::EventRef(event), message_frame_bytes(m)),
        None => encode(&dto::EventRef(event)),
    }
}

pub fn ack(client_id: &str, message: &model::Message) -> String {
    encode_into(
        &Ack {
            kind: "ack",
            client_id,
            message: dto::MessageRef(message),
        },
        message_frame_bytes(message) + client_id.len(),
    )
}

pub fn error(client_id: Option<&str>, error: dto::ErrorDetail) -> String {
    encode(&ErrorFrame {
        kind: "error",
        client_id,
        error,
    })
}

pub fn user_updated(user: &model::User) -> String {
    encode(&UserUpdated {
        kind: "user.updated",
        user: user.into(),
    })
}

#[derive(Serialize)]
struct PresenceUpdated {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    presence: dto::Presence,
}

#[derive(Serialize)]
struct PresenceSnapshot {
    #[serde(rename = "type")]
    kind: &'static str,
    users: Vec<dto::Presence>,
}

/// A change of a watched user's presence.
pub fn presence_updated(seen: &crate::model::Presence) -> String {
    encode(&PresenceUpdated {
        kind: "presence.updated",
        presence: seen.into(),
    })
}

/// The presence of the users a `presence.subscribe` named, as it stands.
pub fn presence(seen: &[crate::model::Presence]) -> String {
    encode(&PresenceSnapshot {
        kind: "presence",
        users: seen.iter().map(Into::into).collect(),
    })
}

pub fn typing(channel_id: i64, user_id: i64) -> String {
    encode(&Typing {
        kind: "typing",
        channel_id: channel_id.to_string(),
        user_id: user_id.to_string(),
    })
}

pub fn joined(channel: &model::Channel) -> String {
    encode(&Joined {
        kind: "channel.joined",
        channel: channel.into(),
    })
}

pub fn left(channel_id: i64) -> String {
    encode(&Left {
        kind: "channel.left",
        channel_id: channel_id.to_string(),
    })
}

pub const PONG: &str = r#"{"type":"pong"}"#;

/// Close codes of the protocol.
pub mod close {
    pub const BAD_TOKEN: u16 = 4001;
    pub const MALFORMED: u16 = 4002;
    pub const NO_HELLO: u16 = 4003;
    /// An API key without the `messages:read` scope cannot open the real-time stream.
    pub const FORBIDDEN: u16 = 4004;
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The user has `--ws-connections-per-user` connections open already.
    pub const TOO_MANY_CONNECTIONS: u16 = 4009;
    /// The server failed in a way it logged (e.g. it could not write `ready`).
    pub const INTERNAL: u16 = 1011;
    pub const RESTARTING: u16 = 1012;
    /// The peer stopped answering heartbeats.
    pub const GOING_AWAY: u16 = 1001;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_op() {
        assert_eq!(
            parse(r#"{"op":"hello","token":"t","resume":{"12":3}}"#),
            Ok(ClientOp::Hello {
                token: "t".into(),
                resume: HashMap::from([("12".into(), 3)])
            })
        );
        assert_eq!(
            parse(r#"{"op":"hello","token":"t"}"#),
            Ok(ClientOp::Hello {
                token: "t".into(),
                resume: HashMap::new()
            })
        );
        assert_eq!(
            parse(r#"{"op":"send","channel_id":"1","text":"hi","client_id":"c"}"#),
            Ok(ClientOp::Send {
                channel_id: "1".into(),
                text: "hi".into(),
                client_id: "c".into(),
                thread_root_id: None,
            })
        );
        assert_eq!(
            parse(
                r#"{"op":"send","channel_id":"1","text":"re","client_id":"d","thread_root_id":"7"}"#
            ),
            Ok(ClientOp::Send {
                channel_id: "1".into(),
                text: "re".into(),
                client_id: "d".into(),
                thread_root_id: Some("7".into()),
            })
        );
        assert_eq!(
            parse(r#"{"op":"read","channel_id":"1","seq":4}"#),
            Ok(ClientOp::Read {
                channel_id: "1".into(),
                seq: 4
            })
        );
        assert_eq!(
            parse(r#"{"op":"typing","channel_id":"1"}"#),
            Ok(ClientOp::Typing {
                channel_id: "1".into()
            })
        );
        assert_eq!(parse(r#"{"op":"ping"}"#), Ok(ClientOp::Ping {}));
    }

    #[test]
    fn refuses_malformed_frames_with_a_readable_reason() {
        for bad in [
            "",
            "not json",
            "[]",
            r#"{"op":"nope"}"#,
            r#"{"op":"send","channel_id":"1"}"#,
            r#"{"op":"ping","extra":1}"#,
            r#"{"op":"read","channel_id":"1","seq":"x"}"#,
        ] {
            let Malformed(reason) = parse(bad).expect_err(bad);
            assert!(!reason.contains("natter::"), "{reason}");
        }
    }

    /// The event and the ack of a message as the bench sends it (100 bytes of text, a
    /// UUID-long `client_id`, ids of today's size) fit the buffer reserved for them: no
    /// growing, so no copy, and no more than a few hundred bytes to spare.
    #[test]
    fn a_message_frame_fits_the_buffer_reserved_for_it() {
        use model::{Event, EventBody, Message};
        let m = Message {
            id: 387_299_818_566_844_425,
            channel_id: 387_299_818_566_844_000,
            seq: 1_000_000_000,
            author_id: 387_299_818_566_843_000,
            text: "x".repeat(100),
            client_id: Some("0190b3c2-7a5e-7cc4-9a4f-5b8e6d2c1f00".into()),
            created_at: 1_795_314_119_123,
            edited_at: Some(1_795_314_120_000),
            thread_root_id: Some(387_299_818_566_844_001),
            mentions: vec![387_299_818_566_843_001],
            ..Message::default()
        };
        let reserved = message_frame_bytes(&m);
        let e = Event {
            channel_id: m.channel_id,
            seq: m.seq,
            at: m.created_at,
            body: EventBody::MessageEdited(m.clone()),
        };
        let frame = event(&e);
        assert_eq!(frame.capacity(), reserved, "{} bytes: {frame}", frame.len());
        assert!(
            reserved - frame.len() < 256,
            "{} of {reserved}",
            frame.len()
        );
        let ack = ack("0190b3c2-7a5e-7cc4-9a4f-5b8e6d2c1f00", &m);
        assert_eq!(ack.capacity(), reserved + 36, "{} bytes: {ack}", ack.len());
    }

    #[test]
    fn acks_and_events_encode_as_the_api_shapes() {
        use model::{Event, EventBody as B, Message, Role};
        let plain = Message {
            id: 7_123_456_789_012,
            channel_id: 42,
            seq: 3,
            author_id: 9,
            text: "h\u{e9}llo \"quoted\" \\ \u{1}".into(),
            client_id: None,
            created_at: 1_795_314_119_123,
            edited_at: None,
            deleted: false,
            ..Message::default()
        };
        let edited = Message {
            client_id: Some("c-\"1".into()),
            edited_at: Some(1_795_314_120_000),
            ..plain.clone()
        };
        let deleted = Message {
            text: String::new(),
            deleted: true,
            ..edited.clone()
        };
        for m in [&plain, &edited, &deleted] {
            let owned = encode(&Ack {
                kind: "ack",
                client_id: "c",
                message: dto::MessageRef(m),
            });
            let expected = serde_json::to_string(&serde_json::json!({
                "type": "ack",
                "client_id": "c",
                "message": dto::Message::from(m),
            }))
            .unwrap();
            let parsed = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap();
            assert_eq!(parsed(&owned), parsed(&expected));
            assert_eq!(
                serde_json::to_string(&dto::MessageRef(m)).unwrap(),
                serde_json::to_string(&dto::Message::from(m)).unwrap()
            );
        }
        let bodies = [
            B::MessageCreated(plain.clone()),
            B::MessageEdited(edited.clone()),
            B::MessageDeleted(deleted.clone()),
            B::MemberAdded {
                user_id: 5,
                role: Role::Admin,
            },
            B::MemberUpdated {
                user_id: 5,
                role: Role::Owner,
            },
            B::MemberRemoved { user_id: 5 },
            B::ChannelUpdated {
                name: Some("n\u{e9}w".into()),
            },
            B::ChannelUpdated { name: None },
        ];
        for body in bodies {
            let e = Event {
                channel_id: 42,
                seq: 11,
                at: 1_795_314_119_000,
                body,
            };
            assert_eq!(
                event(&e),
                serde_json::to_string(&dto::Event::from(&e)).unwrap()
            );
        }
    }
}
