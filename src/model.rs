//! Domain types shared by the store and the API. They carry no serde derives: the wire
//! shapes live in `api::dto`, so an internal field can never leak into the API by accident.

/// A registered account. Times are Unix milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub created_at: i64,
    /// The name others see beside the username, if the user set one.
    pub display_name: Option<String>,
    /// A few lines about the user, if they wrote any.
    pub about: Option<String>,
    /// For a bot account: the user who made it (and manages its keys). A bot has no
    /// password and cannot log in; it acts through API keys.
    pub bot_owner: Option<i64>,
    /// The account was deleted: this is what stays of it (its messages keep its id).
    pub deleted: bool,
}

/// A change of a user's profile: each field `None` to keep, `Some(None)` to clear.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProfileChange {
    pub display_name: Option<Option<String>>,
    pub about: Option<Option<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    /// Members post.
    Group,
    /// Only the owner and admins post; members read.
    Broadcast,
    /// Exactly two members, no name, one per pair.
    Dm,
}

impl ChannelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Group => "group",
            Self::Broadcast => "broadcast",
            Self::Dm => "dm",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "group" => Some(Self::Group),
            "broadcast" => Some(Self::Broadcast),
            "dm" => Some(Self::Dm),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Member,
    Admin,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Member => "member",
            Self::Admin => "admin",
            Self::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "member" => Some(Self::Member),
            "admin" => Some(Self::Admin),
            "owner" => Some(Self::Owner),
            _ => None,
        }
    }

    /// Owners and admins manage members and post in broadcast channels.
    pub fn is_manager(self) -> bool {
        self >= Self::Admin
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    pub id: i64,
    pub kind: ChannelKind,
    /// `None` for DMs.
    pub name: Option<String>,
    pub owner_id: i64,
    /// The seq of the channel's newest event (0 before the first).
    pub last_seq: i64,
    pub created_at: i64,
}

/// A channel as one member sees it in their channel list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelView {
    pub channel: Channel,
    pub role: Role,
    pub read_seq: i64,
    /// Messages above `read_seq` that are neither the member's own nor deleted.
    pub unread: i64,
    /// Of those, the ones that mention the member.
    pub mentions: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user: User,
    pub role: Role,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub id: i64,
    pub channel_id: i64,
    /// The seq of this message's `message.created` event.
    pub seq: i64,
    pub author_id: i64,
    /// Emptied when the message is deleted.
    pub text: String,
    pub client_id: Option<String>,
    pub created_at: i64,
    pub edited_at: Option<i64>,
    pub deleted: bool,
    /// A reply: the root message of its thread (same channel; a root is never a reply).
    pub thread_root_id: Option<i64>,
    /// A root: its replies that are not deleted.
    pub reply_count: i64,
    /// A root: when its newest reply was posted (a deleted one included).
    pub last_reply_at: Option<i64>,
    /// The members its text mentions (`@name`), as resolved when it was sent or last
    /// edited.
    pub mentions: Vec<i64>,
    /// The files it carries, as uploaded (emptied when the message is deleted).
    pub attachments: Vec<Attachment>,
}

/// A file a message carries: what a reader needs to show it before fetching its bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attachment {
    /// The upload's id (`GET /v1/files/{id}`).
    pub id: i64,
    pub name: String,
    /// As checked against the bytes: an image type only for bytes that decode as one.
    pub content_type: String,
    pub size: i64,
    /// An image's size in pixels.
    pub width: Option<i64>,
    pub height: Option<i64>,
    /// An image has a thumbnail (`GET /v1/files/{id}/thumbnail`).
    pub thumbnail: bool,
}

/// An uploaded file: its bytes are in the file store under `sha256` (one copy per
/// digest, shared by uploads of the same bytes), its thumbnail's under `thumb_sha256`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upload {
    pub id: i64,
    pub owner_id: i64,
    pub sha256: String,
    pub size: i64,
    pub content_type: String,
    pub name: String,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub thumb_sha256: Option<String>,
    pub created_at: i64,
}

impl Upload {
    /// The upload as a message carries it.
    pub fn attachment(&self) -> Attachment {
        Attachment {
            id: self.id,
            name: self.name.clone(),
            content_type: self.content_type.clone(),
            size: self.size,
            width: self.width,
            height: self.height,
            thumbnail: self.thumb_sha256.is_some(),
        }
    }
}

/// What one event of a channel's log records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    MessageCreated(Message),
    MessageEdited(Message),
    MessageDeleted(Message),
    MemberAdded {
        user_id: i64,
        role: Role,
    },
    /// A member's role changed.
    MemberUpdated {
        user_id: i64,
        role: Role,
    },
    MemberRemoved {
        user_id: i64,
    },
    ChannelUpdated {
        name: Option<String>,
    },
    /// `user_id` reacted to the message with `emoji` (one of each per user and message).
    ReactionAdded {
        message_id: i64,
        user_id: i64,
        emoji: String,
    },
    /// `user_id` took back their `emoji` reaction to the message.
    ReactionRemoved {
        message_id: i64,
        user_id: i64,
        emoji: String,
    },
}

impl EventBody {
    /// The message a message event carries (created, edited, deleted).
    pub fn message(&self) -> Option<&Message> {
        match self {
            Self::MessageCreated(m) | Self::MessageEdited(m) | Self::MessageDeleted(m) => Some(m),
            _ => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::MessageCreated(_) => "message.created",
            Self::MessageEdited(_) => "message.edited",
            Self::MessageDeleted(_) => "message.deleted",
            Self::MemberAdded { .. } => "member.added",
            Self::MemberUpdated { .. } => "member.updated",
            Self::MemberRemoved { .. } => "member.removed",
            Self::ChannelUpdated { .. } => "channel.updated",
            Self::ReactionAdded { .. } => "reaction.added",
            Self::ReactionRemoved { .. } => "reaction.removed",
        }
    }
}

/// One emoji's reactions to a message, as one viewer sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReactionCount {
    pub emoji: String,
    /// Users who reacted with it (at least 1).
    pub count: i64,
    /// The viewer is one of them.
    pub me: bool,
}

/// A user who reacted, and when (Unix ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reactor {
    pub user: User,
    pub at: i64,
    /// The seq of the `reaction.added` event (a page's position).
    pub seq: i64,
}

/// One durable change in a channel, numbered by the channel's gap-free `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub channel_id: i64,
    pub seq: i64,
    pub at: i64,
    pub body: EventBody,
}

/// A page of a channel's messages or events, ascending by seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// More items exist beyond this page in the direction being paged.
    pub has_more: bool,
}

/// Which window of a channel's history to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only messages with a seq below this.
    pub before_seq: Option<i64>,
    /// Only messages with a seq above this. When set (and paging forward), the page holds
    /// the oldest matching messages; otherwise the newest.
    pub after_seq: Option<i64>,
    pub limit: u32,
}

impl HistoryQuery {
    /// The newest `limit` messages.
    pub fn newest(limit: u32) -> Self {
        Self {
            before_seq: None,
            after_seq: None,
            limit,
        }
    }
}

/// Whether a user is online ([`crate::gateway::presence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PresenceStatus {
    Offline,
    Idle,
    Online,
}

impl PresenceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Offline => "offline",
            Self::Idle => "idle",
            Self::Online => "online",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "offline" => Some(Self::Offline),
            "idle" => Some(Self::Idle),
            "online" => Some(Self::Online),
            _ => None,
        }
    }
}

/// A user's presence as shown: the status, and when they were last online (Unix ms; for
/// an offline user, if ever known).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    pub user_id: i64,
    pub status: PresenceStatus,
    pub last_seen_at: Option<i64>,
}
