//! The wire shapes of API v1. Ids travel as decimal strings, times as RFC 3339 UTC.
//! Request types reject unknown fields, so a typo is an error rather than a silent no-op.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::schema as openapi;
use crate::clock::rfc3339;
use crate::model;

#[derive(Debug, Serialize, ToSchema)]
pub struct User {
    #[schema(value_type = openapi::Id)]
    pub id: String,
    /// Folded (NFKC, lower case), as stored.
    pub username: String,
    #[schema(schema_with = openapi::time)]
    pub created_at: String,
    /// The name shown beside the username; absent when not set.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub display_name: Option<String>,
    /// A few lines about the user; absent when not set.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub about: Option<String>,
    /// Whether this is a bot account (it acts through API keys; it cannot log in).
    pub bot: bool,
    /// A bot's owner, who manages its keys; absent for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<openapi::Id>, nullable = false)]
    pub bot_owner_id: Option<String>,
    /// The account was deleted: its username reads `deleted`, it has no profile, and its
    /// messages stay under this id. Show it as "deleted user".
    pub deleted: bool,
}

impl From<&model::User> for User {
    fn from(u: &model::User) -> Self {
        Self {
            id: u.id.to_string(),
            username: u.username.clone(),
            created_at: rfc3339(u.created_at),
            display_name: u.display_name.clone(),
            about: u.about.clone(),
            bot: u.bot_owner.is_some(),
            bot_owner_id: u.bot_owner.map(|o| o.to_string()),
            deleted: u.deleted,
        }
    }
}

/// A bot account to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBot {
    /// Under the rules of usernames; bots and people share one namespace.
    #[schema(schema_with = openapi::username)]
    pub username: String,
    #[serde(default)]
    #[schema(schema_with = openapi::display_name)]
    pub display_name: Option<String>,
    #[serde(default)]
    #[schema(schema_with = openapi::about)]
    pub about: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BotList {
    /// Oldest first.
    pub bots: Vec<User>,
}

/// An API key to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    /// Shown in the key list: what the key is for (a channel name's rules).
    #[schema(schema_with = openapi::channel_name)]
    pub name: String,
    /// What the key may do: any of `users:read`, `users:write`, `channels:read`,
    /// `channels:write`, `messages:read`, `messages:write`. At least one.
    #[schema(schema_with = openapi::scopes)]
    pub scopes: Vec<String>,
    /// The bot the key acts as; absent or `null`: the caller.
    #[serde(default)]
    #[schema(value_type = Option<openapi::Id>)]
    pub user_id: Option<String>,
    /// Days until the key stops working; absent or `null`: it never expires.
    #[serde(default, deserialize_with = "integral_or_null")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 3650)]
    pub expires_in_days: Option<i64>,
}

/// An API key as its holder sees it in their list (never its token).
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKey {
    /// Names the key for `DELETE /v1/keys/{id}`; not its token.
    #[schema(value_type = openapi::Id)]
    pub id: String,
    pub name: String,
    /// The account the key acts as: the holder or one of their bots.
    #[schema(value_type = openapi::Id)]
    pub user_id: String,
    pub scopes: Vec<String>,
    #[schema(schema_with = openapi::time)]
    pub created_at: String,
    /// Absent: the key never expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime, nullable = false)]
    pub expires_at: Option<String>,
    /// Coarse (updated at most once a minute); absent until first used.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime, nullable = false)]
    pub last_used_at: Option<String>,
}

impl From<&crate::store::ApiKeyInfo> for ApiKey {
    fn from(k: &crate::store::ApiKeyInfo) -> Self {
        Self {
            id: k.id.to_string(),
            name: k.name.clone(),
            user_id: k.user_id.to_string(),
            scopes: k
                .scopes
                .split_ascii_whitespace()
                .map(str::to_owned)
                .collect(),
            created_at: rfc3339(k.created_at),
            expires_at: k.expires_at.map(rfc3339),
            last_used_at: k.last_used_at.map(rfc3339),
        }
    }
}

/// A new API key and its token: the only time the token is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApiKey {
    pub key: ApiKey,
    /// `Authorization: Bearer <token>`, as a session's token is used. Starts with `ntk_`.
    #[schema(value_type = String)]
    pub token: crate::auth::Secret,
}

/// An incoming webhook to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewIncomingWebhook {
    /// What the webhook is for (a channel name's rules); a bot made for it is shown by
    /// this name (its first 64 characters).
    #[schema(schema_with = openapi::channel_name)]
    pub name: String,
    /// One of the caller's bots to post as (added to the channel if it is not in it);
    /// absent or `null`: a new bot is made for the webhook.
    #[serde(default)]
    #[schema(value_type = Option<openapi::Id>)]
    pub bot_id: Option<String>,
}

/// An incoming webhook as the channel's admins see it (never its secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct IncomingWebhook {
    #[schema(value_type = openapi::Id)]
    pub id: String,
    #[schema(value_type = openapi::Id)]
    pub channel_id: String,
    /// The bot it posts as.
    #[schema(value_type = openapi::Id)]
    pub bot_id: String,
    /// Who made it.
    #[schema(value_type = openapi::Id)]
    pub creator_id: String,
    pub name: String,
    #[schema(schema_with = openapi::time)]
    pub created_at: String,
}

impl From<&crate::store::IncomingWebhook> for IncomingWebhook {
    fn from(w: &crate::store::IncomingWebhook) -> Self {
        Self {
            id: w.id.to_string(),
            channel_id: w.channel_id.to_string(),
            bot_id: w.bot_id.to_string(),
            creator_id: w.creator_id.to_string(),
            name: w.name.clone(),
            created_at: rfc3339(w.created_at),
        }
    }
}

/// A new incoming webhook and its secret URL: the only time the URL is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedIncomingWebhook {
    pub webhook: IncomingWebhook,
    /// The path to `POST {"text", "client_id"?}` to, on this server:
    /// `/v1/hooks/{channel_id}/{secret}`. Whoever holds it posts as the bot.
    #[schema(value_type = String)]
    pub path: crate::auth::Secret,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IncomingWebhookList {
    /// Oldest first.
    pub webhooks: Vec<IncomingWebhook>,
}

/// An outgoing webhook subscription to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSubscription {
    /// Where each event is POSTed: an absolute `http` or `https` URL whose host is a
    /// public address (unless the server's allow-list names it).
    #[schema(min_length = 1, max_length = 2048, pattern = "^https?://")]
    pub url: String,
    /// The event types delivered; absent or empty: every type.
    #[serde(default)]
    #[schema(schema_with = openapi::event_types)]
    pub event_types: Vec<String>,
    /// Deliver the events after this seq; absent or `null`: from now on (the channel's
    /// current last seq). `0` replays the whole log.
    #[serde(default, deserialize_with = "integral_or_null")]
    #[schema(value_type = Option<i64>, minimum = 0)]
    pub from_seq: Option<i64>,
}

/// An admin's change to a subscription: pause it, resume it (from its cursor, its
/// failures cleared), or move its cursor (to replay or skip).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSubscription {
    #[serde(default)]
    #[schema(schema_with = openapi::settable_subscription_status)]
    pub status: Option<String>,
    /// Deliver the events after this seq from now on.
    #[serde(default, deserialize_with = "integral_or_null")]
    #[schema(value_type = Option<i64>, minimum = 0)]
    pub cursor: Option<i64>,
}

/// An outgoing webhook subscription and where its delivery stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct Subscription {
    #[schema(value_type = openapi::Id)]
    pub id: String,
    #[schema(value_type = openapi::Id)]
    pub channel_id: String,
    #[schema(value_type = openapi::Id)]
    pub creator_id: String,
    pub url: String,
    /// Empty: every type.
    pub event_types: Vec<String>,
    /// The last seq delivered (or skipped by the type filter).
    #[schema(minimum = 0)]
    pub cursor: i64,
    /// Events of the channel after the cursor.
    #[schema(minimum = 0)]
    pub lag: i64,
    /// `active` (delivering, or waiting out a backoff until `next_try_at`), `paused` (by
    /// an admin) or `dead` (failing past the server's dead-after time; resume it).
    #[schema(schema_with = openapi::subscription_status)]
    pub status: &'static str,
    /// Events delivered so far.
    #[schema(minimum = 0)]
    pub delivered: i64,
    /// Failures in a row.
    #[schema(minimum = 0)]
    pub failures: i64,
    /// The last failure's error (kept after a success, for the record).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub last_error: Option<String>,
    /// When the current run of failures began; absent while the endpoint succeeds.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime, nullable = false)]
    pub failing_since: Option<String>,
    /// After a failure: no try before this.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime, nullable = false)]
    pub next_try_at: Option<String>,
    #[schema(schema_with = openapi::time)]
    pub created_at: String,
}

impl Subscription {
    pub fn new(s: &crate::store::Subscription, last_seq: i64) -> Self {
        Self {
            id: s.id.to_string(),
            channel_id: s.channel_id.to_string(),
            creator_id: s.creator_id.to_string(),
            url: s.url.clone(),
            event_types: s
                .types
                .split_ascii_whitespace()
                .map(str::to_owned)
                .collect(),
            cursor: s.cursor,
            lag: (last_seq - s.cursor).max(0),
            status: s.status.as_str(),
            delivered: s.delivered,
            failures: s.failures,
            last_error: s.last_error.clone(),
            failing_since: s.failing_since.map(rfc3339),
            next_try_at: (s.next_try_at > 0).then(|| rfc3339(s.next_try_at)),
            created_at: rfc3339(s.created_at),
        }
    }
}

/// A new subscription and its signing secret: the only time the secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedSubscription {
    pub subscription: Subscription,
    /// The HMAC-SHA256 key of each request's `Natter-Signature` (see the API notes for
    /// how to verify it).
    #[schema(value_type = String)]
    pub secret: crate::auth::Secret,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionList {
    /// Oldest first.
    pub subscriptions: Vec<Subscription>,
}

/// A message posted through an incoming webhook.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HookMessage {
    #[schema(schema_with = openapi::text)]
    pub text: String,
    /// 1–64 characters; a retry with the same value returns the original message.
    #[schema(min_length = 1, max_length = 64)]
    pub client_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    /// Newest first.
    pub keys: Vec<ApiKey>,
}

/// A change of the caller's profile: a field left out keeps its value, `null` clears it.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProfile {
    #[serde(default, deserialize_with = "set_or_clear")]
    #[schema(schema_with = openapi::display_name)]
    pub display_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "set_or_clear")]
    #[schema(schema_with = openapi::about)]
    pub about: Option<Option<String>>,
}

/// A field present (`Some`), with a value or `null` (`Some(None)`); with
/// `#[serde(default)]`, absent is `None`.
fn set_or_clear<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Session {
    pub user: User,
    /// Opaque bearer token for `Authorization: Bearer <token>`.
    #[schema(value_type = String)]
    pub token: crate::auth::Secret,
}

/// One of the caller's sessions (a login on some device).
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionListItem {
    /// Names the session for `DELETE /v1/sessions/{id}`; not its token.
    #[schema(value_type = openapi::Id)]
    pub id: String,
    #[schema(schema_with = openapi::time)]
    pub created_at: String,
    /// Coarse: updated at most every few minutes.
    #[schema(schema_with = openapi::time)]
    pub last_used_at: String,
    #[schema(schema_with = openapi::time)]
    pub expires_at: String,
    /// The client address that logged in.
    pub address: String,
    /// The `User-Agent` that logged in.
    pub agent: String,
    /// Whether this is the session of the request's own token.
    pub current: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionListItem>,
}

impl SessionListItem {
    pub fn new(s: &crate::store::SessionInfo, current: i64) -> Self {
        Self {
            id: s.id.to_string(),
            created_at: rfc3339(s.created_at),
            last_used_at: rfc3339(s.last_used_at),
            expires_at: rfc3339(s.expires_at),
            address: s.address.clone(),
            agent: s.agent.clone(),
            current: s.id == current,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    #[schema(schema_with = openapi::username)]
    pub username: String,
    /// 8–1024 characters (Unicode scalar values).
    #[schema(value_type = String, min_length = 8, max_length = 1024)]
    pub password: crate::auth::Secret,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Channel {
    #[schema(value_type = openapi::Id)]
    pub id: String,
    #[schema(schema_with = openapi::channel_kind)]
    pub kind: &'static str,
    /// `null` for DMs.
    #[schema(required)]
    pub name: Option<String>,
    #[schema(value_type = openapi::Id)]
    pub owner_id: String,
    #[schema(minimum = 0)]
    pub last_seq: i64,
    #[schema(schema_with = openapi::time)]
    pub created_at: String,
    /// The caller's role; only in the caller's channel list.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = openapi::role)]
    pub role: Option<&'static str>,
    /// Only in the caller's channel list.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0)]
    pub read_seq: Option<i64>,
    /// Messages above `read_seq` that are neither the caller's own nor deleted; only in
    /// the caller's channel list.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0)]
    pub unread: Option<i64>,
    /// Of the unread messages, those that mention the caller; only in the caller's
    /// channel list.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0)]
    pub mentions: Option<i64>,
}

impl From<&model::Channel> for Channel {
    fn from(c: &model::Channel) -> Self {
        Self {
            id: c.id.to_string(),
            kind: c.kind.as_str(),
            name: c.name.clone(),
            owner_id: c.owner_id.to_string(),
            last_seq: c.last_seq,
            created_at: rfc3339(c.created_at),
            role: None,
            read_seq: None,
            unread: None,
            mentions: None,
        }
    }
}

impl From<&model::ChannelView> for Channel {
    fn from(v: &model::ChannelView) -> Self {
        Self {
            role: Some(v.role.as_str()),
            read_seq: Some(v.read_seq),
            unread: Some(v.unread),
            mentions: Some(v.mentions),
            ..Self::from(&v.channel)
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChannelList {
    pub channels: Vec<Channel>,
    /// The `after` of the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<openapi::Id>, nullable = false)]
    pub next_after: Option<String>,
    /// Channels of this page's id range that cannot be read now (on PostgreSQL, their
    /// shard is down): the caller is (as far as the server knows) a member, and should
    /// ask again shortly. Absent when every channel could be read.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<openapi::Id>)]
    pub unavailable: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChannel {
    #[schema(schema_with = openapi::channel_name)]
    pub name: String,
    /// DMs are opened with `POST /v1/dms`.
    #[schema(schema_with = openapi::new_channel_kind)]
    pub kind: String,
    /// User ids added as plain members; the caller becomes the owner.
    #[serde(default)]
    #[schema(schema_with = openapi::member_ids)]
    pub members: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateChannel {
    #[schema(schema_with = openapi::channel_name)]
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenDm {
    #[schema(value_type = openapi::Id)]
    pub user_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Member {
    pub user: User,
    #[schema(schema_with = openapi::role)]
    pub role: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MemberList {
    pub members: Vec<Member>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutMember {
    /// An existing member keeps their role when it is omitted or `null`; a new one is a
    /// `member`.
    #[schema(schema_with = openapi::granted_role)]
    pub role: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MarkRead {
    /// Clamped to the channel's last seq.
    #[serde(deserialize_with = "integral")]
    #[schema(minimum = 0)]
    pub seq: i64,
}

/// An integer written either way JSON allows: `7` or `7.0` (JSON Schema counts both as
/// the integer 7, so a client may send either).
fn integral<'de, D: serde::Deserializer<'de>>(de: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Int(i64),
        Float(f64),
    }
    match Number::deserialize(de)? {
        Number::Int(n) => Ok(n),
        // 2^63 is exact as an f64, and the first float past i64::MAX.
        Number::Float(f) if f.fract() == 0.0 && f >= -(2f64.powi(63)) && f < 2f64.powi(63) => {
            Ok(f as i64)
        }
        Number::Float(f) => Err(serde::de::Error::custom(format!("{f} is not an integer"))),
    }
}

/// [`integral`], or `null`.
fn integral_or_null<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    struct Integral(#[serde(deserialize_with = "integral")] i64);
    Option::<Integral>::deserialize(de).map(|n| n.map(|Integral(n)| n))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Message {
    #[schema(value_type = openapi::Id)]
    pub id: String,
    #[schema(value_type = openapi::Id)]
    pub channel_id: String,
    /// The seq of the message's `message.created` event.
    #[schema(minimum = 1)]
    pub seq: i64,
    #[schema(value_type = openapi::Id)]
    pub author_id: String,
    /// Empty once deleted.
    pub text: String,
    /// Only when the message was sent with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub client_id: Option<String>,
    #[schema(schema_with = openapi::time)]
    pub created_at: String,
    /// Only once edited.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime, nullable = false)]
    pub edited_at: Option<String>,
    pub deleted: bool,
    /// Only on a reply: its thread's root message.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<openapi::Id>, nullable = false)]
    pub thread_root_id: Option<String>,
    /// Only on a root with replies: how many are not deleted.
    #[serde(skip_serializing_if = "is_zero")]
    #[schema(minimum = 1)]
    pub reply_count: i64,
    /// Only on a root with replies: when the newest was posted.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime, nullable = false)]
    pub last_reply_at: Option<String>,
    /// The members its text mentions (`@name`), resolved when sent or last edited;
    /// omitted when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<openapi::Id>)]
    pub mentions: Vec<String>,
    /// In history pages: each emoji's reactions, in the order first used, and whether
    /// the caller is among them. Omitted when there are none, and in events (a client
    /// applies `reaction.*` events to what it holds).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reactions: Vec<Reaction>,
    /// The files it carries, in the order attached; omitted when none (and once deleted).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
}

/// A file a message carries. Its bytes are `GET /v1/files/{id}` (and an image's
/// thumbnail `GET /v1/files/{id}/thumbnail`), for members of the message's channel.
#[derive(Debug, Serialize, ToSchema)]
pub struct Attachment {
    #[schema(value_type = openapi::Id)]
    pub id: String,
    /// The file's name as uploaded.
    pub name: String,
    /// Checked against the bytes: an image type (`image/png`, `image/jpeg`, `image/gif`,
    /// `image/webp`) only for bytes that decode as that image, else
    /// `application/octet-stream`.
    pub content_type: String,
    /// Bytes.
    #[schema(minimum = 0)]
    pub size: i64,
    /// An image's size in pixels.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1)]
    pub width: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1)]
    pub height: Option<i64>,
    /// An image: a thumbnail (at most 320×320) is at `GET /v1/files/{id}/thumbnail`.
    pub thumbnail: bool,
}

impl From<&model::Attachment> for Attachment {
    fn from(a: &model::Attachment) -> Self {
        Self {
            id: a.id.to_string(),
            name: a.name.clone(),
            content_type: a.content_type.clone(),
            size: a.size,
            width: a.width,
            height: a.height,
            thumbnail: a.thumbnail,
        }
    }
}

/// An upload: attach it to a message (by `id`) within its grace period, or it is deleted.
#[derive(Debug, Serialize, ToSchema)]
pub struct Upload {
    #[schema(value_type = openapi::Id)]
    pub id: String,
    pub name: String,
    /// As checked against the bytes (see `Attachment`).
    pub content_type: String,
    #[schema(minimum = 0)]
    pub size: i64,
    /// The bytes' SHA-256, hex (also the file's `ETag`).
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1)]
    pub width: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1)]
    pub height: Option<i64>,
    pub thumbnail: bool,
    #[schema(schema_with = openapi::time)]
    pub created_at: String,
    /// Attach it before this time, or it is deleted (unless a message carries it).
    #[schema(schema_with = openapi::time)]
    pub attach_by: String,
}

/// One emoji's reactions to a message.
#[derive(Debug, Serialize, ToSchema)]
pub struct Reaction {
    pub emoji: String,
    #[schema(minimum = 1)]
    pub count: i64,
    /// The caller reacted with it.
    pub me: bool,
}

impl From<&model::ReactionCount> for Reaction {
    fn from(r: &model::ReactionCount) -> Self {
        Self {
            emoji: r.emoji.clone(),
            count: r.count,
            me: r.me,
        }
    }
}

/// A user who reacted, and when.
#[derive(Debug, Serialize, ToSchema)]
pub struct Reactor {
    pub user: User,
    #[schema(schema_with = openapi::time)]
    pub at: String,
}

/// A page of who reacted with one emoji, in the order they did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReactorPage {
    pub users: Vec<Reactor>,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub next: Option<String>,
}

/// Every emoji's reactions to one message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReactionList {
    pub reactions: Vec<Reaction>,
}

impl From<&model::Message> for Message {
    fn from(m: &model::Message) -> Self {
        Self {
            id: m.id.to_string(),
            channel_id: m.channel_id.to_string(),
            seq: m.seq,
            author_id: m.author_id.to_string(),
            text: m.text.clone(),
            client_id: m.client_id.clone(),
            created_at: rfc3339(m.created_at),
            edited_at: m.edited_at.map(rfc3339),
            deleted: m.deleted,
            thread_root_id: m.thread_root_id.map(|id| id.to_string()),
            reply_count: m.reply_count,
            last_reply_at: m.last_reply_at.map(rfc3339),
            mentions: m.mentions.iter().map(i64::to_string).collect(),
            reactions: Vec::new(),
            attachments: m.attachments.iter().map(Into::into).collect(),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    /// Required unless the message carries `attachments`.
    #[serde(default)]
    #[schema(schema_with = openapi::text, required = false)]
    pub text: Option<String>,
    /// Up to 10 of the caller's uploads (`POST /v1/uploads`), in the order shown.
    #[serde(default)]
    #[schema(value_type = Option<Vec<openapi::Id>>, max_items = 10)]
    pub attachments: Option<Vec<String>>,
    /// 1–64 characters; a retry with the same value returns the original message.
    #[schema(min_length = 1, max_length = 64)]
    pub client_id: Option<String>,
    /// Makes the message a reply in the thread of this message of the channel (a root:
    /// not itself a reply); absent or `null` for a message of the channel itself.
    #[schema(value_type = Option<openapi::Id>)]
    pub thread_root_id: Option<String>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// The caller's recent mentions, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct MentionPage {
    pub messages: Vec<Message>,
    /// Pass as `before` for the next (older) page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<openapi::Id>, nullable = false)]
    pub next: Option<String>,
}

/// A user's presence: `online` while a connection of theirs is open and active, `idle`
/// when every open one said so, `offline` otherwise.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Presence {
    #[schema(value_type = openapi::Id)]
    pub user_id: String,
    #[schema(schema_with = openapi::presence_status)]
    pub status: &'static str,
    /// When they were last online: only on an offline user, and only once known.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime, nullable = false)]
    pub last_seen_at: Option<String>,
}

impl From<&crate::model::Presence> for Presence {
    fn from(s: &crate::model::Presence) -> Self {
        Self {
            user_id: s.user_id.to_string(),
            status: s.status.as_str(),
            last_seen_at: s.last_seen_at.map(rfc3339),
        }
    }
}

/// The presence of a channel's members.
#[derive(Debug, Serialize, ToSchema)]
pub struct PresenceList {
    pub members: Vec<Presence>,
}

/// Found messages, best or newest first ([`crate::store::SearchOrder`]).
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchPage {
    pub results: Vec<SearchHit>,
    /// Pass as `cursor` (with the same `q`, `channel_id` and `sort`) for the next page;
    /// absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub next: Option<String>,
}

/// A message found, as history shows it, and the part of its text to show.
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchHit {
    pub message: Message,
    /// The text around the first word found, in pieces: joined they are the snippet
    /// (cut with `…` in a long text); `hit` marks the words the query matched. Plain
    /// text, never markup.
    pub snippet: Vec<SnippetPiece>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnippetPiece {
    pub text: String,
    /// Only on a word the query matched.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hit: bool,
}

impl From<crate::search::Piece> for SnippetPiece {
    fn from(p: crate::search::Piece) -> Self {
        Self {
            text: p.text,
            hit: p.hit,
        }
    }
}

/// A page of a thread's replies, with its root.
#[derive(Debug, Serialize, ToSchema)]
pub struct ThreadPage {
    pub root: Message,
    pub messages: Vec<Message>,
    pub has_more: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditMessage {
    #[schema(schema_with = openapi::text)]
    pub text: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessagePage {
    pub messages: Vec<Message>,
    pub has_more: bool,
}

/// One event of a channel's log.
#[derive(Debug, Serialize, ToSchema)]
pub struct Event {
    #[serde(rename = "type")]
    #[schema(schema_with = openapi::event_type)]
    pub kind: &'static str,
    #[schema(value_type = openapi::Id)]
    pub channel_id: String,
    #[schema(minimum = 1)]
    pub seq: i64,
    #[schema(schema_with = openapi::time)]
    pub at: String,
    /// The message as of this event, in `message.*` events.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Message>, nullable = false)]
    pub message: Option<Message>,
    /// The member, in `member.*` events; who reacted, in `reaction.*` events.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<openapi::Id>, nullable = false)]
    pub user_id: Option<String>,
    /// The message reacted to, in `reaction.*` events.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<openapi::Id>, nullable = false)]
    pub message_id: Option<String>,
    /// The emoji, in `reaction.*` events.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub emoji: Option<String>,
    /// The member's role, in `member.added` and `member.updated`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = openapi::role)]
    pub role: Option<&'static str>,
    /// The new name, in `channel.updated`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub name: Option<String>,
}

impl From<&model::Event> for Event {
    fn from(e: &model::Event) -> Self {
        use model::EventBody as B;
        let mut out = Self {
            kind: e.body.kind(),
            channel_id: e.channel_id.to_string(),
            seq: e.seq,
            at: rfc3339(e.at),
            message: None,
            user_id: None,
            message_id: None,
            emoji: None,
            role: None,
            name: None,
        };
        match &e.body {
            B::MessageCreated(m) | B::MessageEdited(m) | B::MessageDeleted(m) => {
                // As of the event: no thread counters (see `EventMessage`).
                let mut shown = Message::from(m);
                shown.reply_count = 0;
                shown.last_reply_at = None;
                out.message = Some(shown)
            }
            B::MemberAdded { user_id, role } | B::MemberUpdated { user_id, role } => {
                out.user_id = Some(user_id.to_string());
                out.role = Some(role.as_str());
            }
            B::MemberRemoved { user_id } => out.user_id = Some(user_id.to_string()),
            B::ChannelUpdated { name } => out.name = name.clone(),
            B::ReactionAdded {
                message_id,
                user_id,
                emoji,
            }
            | B::ReactionRemoved {
                message_id,
                user_id,
                emoji,
            } => {
                out.user_id = Some(user_id.to_string());
                out.message_id = Some(message_id.to_string());
                out.emoji = Some(emoji.clone());
            }
        }
        out
    }
}

/// A message serialized exactly as [`Message`], straight from the model: no copy of its
/// text and no string per id or time (acks and event frames are on the delivery path).
pub struct MessageRef<'a>(pub &'a model::Message);

/// An event serialized exactly as [`Event`], straight from the model.
pub struct EventRef<'a>(pub &'a model::Event);

/// An id as its decimal string, written where it is serialized.
struct IdStr(i64);

impl Serialize for IdStr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// A time as RFC 3339, written where it is serialized.
struct TimeStr(i64);

impl Serialize for TimeStr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&crate::clock::Rfc3339(self.0))
    }
}

impl Serialize for MessageRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_message(self.0, true, s)
    }
}

/// A message as an event shows it: as of the event, so without a root's reply count and
/// newest reply, which change later with no event of its own.
struct EventMessage<'a>(&'a model::Message);

impl Serialize for EventMessage<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_message(self.0, false, s)
    }
}

fn serialize_message<S: serde::Serializer>(
    m: &model::Message,
    thread_counters: bool,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut out = s.serialize_struct("Message", 14)?;
    out.serialize_field("id", &IdStr(m.id))?;
    out.serialize_field("channel_id", &IdStr(m.channel_id))?;
    out.serialize_field("seq", &m.seq)?;
    out.serialize_field("author_id", &IdStr(m.author_id))?;
    out.serialize_field("text", &m.text)?;
    match &m.client_id {
        Some(c) => out.serialize_field("client_id", c)?,
        None => out.skip_field("client_id")?,
    }
    out.serialize_field("created_at", &TimeStr(m.created_at))?;
    match m.edited_at {
        Some(t) => out.serialize_field("edited_at", &TimeStr(t))?,
        None => out.skip_field("edited_at")?,
    }
    out.serialize_field("deleted", &m.deleted)?;
    match m.thread_root_id {
        Some(id) => out.serialize_field("thread_root_id", &IdStr(id))?,
        None => out.skip_field("thread_root_id")?,
    }
    if m.reply_count == 0 || !thread_counters {
        out.skip_field("reply_count")?;
    } else {
        out.serialize_field("reply_count", &m.reply_count)?;
    }
    match m.last_reply_at.filter(|_| thread_counters) {
        Some(t) => out.serialize_field("last_reply_at", &TimeStr(t))?,
        None => out.skip_field("last_reply_at")?,
    }
    if m.mentions.is_empty() {
        out.skip_field("mentions")?;
    } else {
        let ids: Vec<IdStr> = m.mentions.iter().map(|&id| IdStr(id)).collect();
        out.serialize_field("mentions", &ids)?;
    }
    if m.attachments.is_empty() {
        out.skip_field("attachments")?;
    } else {
        let files: Vec<Attachment> = m.attachments.iter().map(Into::into).collect();
        out.serialize_field("attachments", &files)?;
    }
    out.end()
}

impl Serialize for EventRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use model::EventBody as B;
        use serde::ser::SerializeStruct;
        let e = self.0;
        let mut out = s.serialize_struct("Event", 10)?;
        out.serialize_field("type", e.body.kind())?;
        out.serialize_field("channel_id", &IdStr(e.channel_id))?;
        out.serialize_field("seq", &e.seq)?;
        out.serialize_field("at", &TimeStr(e.at))?;
        let (mut message, mut user, mut role, mut name) = (None, None, None, None);
        let (mut message_id, mut emoji) = (None, None);
        match &e.body {
            B::MessageCreated(m) | B::MessageEdited(m) | B::MessageDeleted(m) => {
                message = Some(EventMessage(m))
            }
            B::MemberAdded { user_id, role: r } | B::MemberUpdated { user_id, role: r } => {
                user = Some(IdStr(*user_id));
                role = Some(r.as_str());
            }
            B::MemberRemoved { user_id } => user = Some(IdStr(*user_id)),
            B::ChannelUpdated { name: n } => name = n.as_deref(),
            B::ReactionAdded {
                message_id: m,
                user_id,
                emoji: e,
            }
            | B::ReactionRemoved {
                message_id: m,
                user_id,
                emoji: e,
            } => {
                user = Some(IdStr(*user_id));
                message_id = Some(IdStr(*m));
                emoji = Some(e.as_str());
            }
        }
        match message {
            Some(m) => out.serialize_field("message", &m)?,
            None => out.skip_field("message")?,
        }
        match user {
            Some(u) => out.serialize_field("user_id", &u)?,
            None => out.skip_field("user_id")?,
        }
        match message_id {
            Some(m) => out.serialize_field("message_id", &m)?,
            None => out.skip_field("message_id")?,
        }
        match emoji {
            Some(e) => out.serialize_field("emoji", e)?,
            None => out.skip_field("emoji")?,
        }
        match role {
            Some(r) => out.serialize_field("role", r)?,
            None => out.skip_field("role")?,
        }
        match name {
            Some(n) => out.serialize_field("name", n)?,
            None => out.skip_field("name")?,
        }
        out.end()
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<Event>,
    pub has_more: bool,
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable snake_case code, e.g. `invalid_field` or `rate_limited`.
    pub code: String,
    /// Text a person can act on.
    pub message: String,
    /// The offending request field, when there is one.
    pub field: Option<String>,
}

/// The caller's password, asked again before a sensitive change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordCheck {
    #[schema(value_type = String)]
    pub password: crate::auth::Secret,
}

/// A code of the caller's authenticator app (6 digits) or one of their recovery codes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TwoFactorCode {
    /// Six digits (spaces ignored), or a recovery code (`xxxxx-xxxxx`).
    #[schema(value_type = String, max_length = 64)]
    pub code: crate::auth::Secret,
}

/// The password and a second-factor code.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordAndCode {
    #[schema(value_type = String)]
    pub password: crate::auth::Secret,
    /// Six digits, or a recovery code. Not needed (and ignored) while two-factor login
    /// is off.
    #[schema(value_type = Option<String>, max_length = 64)]
    #[serde(default)]
    pub code: Option<crate::auth::Secret>,
}

/// A new two-factor secret, shown once: add it to an authenticator app (scan the QR
/// code, or type the secret), then confirm with a code.
#[derive(Debug, Serialize, ToSchema)]
pub struct TwoFactorEnrolment {
    /// The secret in base32 (RFC 4648, no padding), for typing into an app.
    #[schema(value_type = String)]
    pub secret: crate::auth::Secret,
    /// The `otpauth://totp/…` URI (SHA-1, 6 digits, 30 s) an app reads.
    #[schema(value_type = String)]
    pub uri: crate::auth::Secret,
    /// The URI as a QR code: an SVG document, made by this server (nothing is fetched
    /// from elsewhere).
    #[schema(value_type = String)]
    pub qr_svg: crate::auth::Secret,
}

/// Single-use recovery codes, shown once: each logs in (or confirms a change) in place
/// of an app's code.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecoveryCodes {
    #[schema(value_type = Vec<String>)]
    pub recovery_codes: Vec<crate::auth::Secret>,
}

/// Where the caller's two-factor login stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct TwoFactorStatus {
    /// Logins need a code.
    pub enabled: bool,
    /// An enrolment waits for its confirming code.
    pub pending: bool,
    /// Recovery codes not yet used.
    pub recovery_codes_left: u32,
}

/// A login's password was right, and the account has two-factor login on: complete it
/// at `POST /v1/sessions/two-factor` with this challenge and a code.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoginChallenge {
    /// Always `true`.
    pub two_factor_required: bool,
    /// Opaque; good until `expires_at`.
    #[schema(value_type = String)]
    pub challenge: crate::auth::Secret,
    pub expires_at: String,
}

/// The second step of a login with two-factor login on.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChallengeAnswer {
    #[schema(value_type = String, max_length = 512)]
    pub challenge: crate::auth::Secret,
    /// Six digits, or a recovery code.
    #[schema(value_type = String, max_length = 64)]
    pub code: crate::auth::Secret,
}

/// A new password for the caller. Every other session of theirs ends.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePassword {
    #[schema(value_type = String)]
    pub current_password: crate::auth::Secret,
    /// 8–1024 characters (Unicode scalar values).
    #[schema(value_type = String, min_length = 8, max_length = 1024)]
    pub new_password: crate::auth::Secret,
    /// Six digits, or a recovery code: required while two-factor login is on.
    #[schema(value_type = Option<String>, max_length = 64)]
    #[serde(default)]
    pub code: Option<crate::auth::Secret>,
}
