//! Durable state behind two narrow traits: [`Accounts`] (users and sessions) and
//! [`Channels`] (channels, members, and each channel's event log with its projections).
//!
//! Only this module and its backends touch SQL. Write methods check authorization inside
//! the same transaction that applies the change, so a check can never race its write;
//! a read of a channel's members checks membership in the same trip to the store, while
//! history and log reads leave that check to their callers (see [`Channels::log`]).
//! [`conformance`] is one test suite that every backend must pass.

pub mod conformance;
pub mod location;
pub mod postgres;
pub mod rules;
pub mod sqlite;

pub use self::location::{StoreLocation, StoreOptions, migrate, open};

use async_trait::async_trait;

use crate::model::{
    Attachment, Channel, ChannelKind, ChannelView, Event, HistoryQuery, Member, Message, Page,
    ProfileChange, ReactionCount, Reactor, Role, Upload, User,
};

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The bounds the store enforces inside the write that would pass them, so concurrent
/// writes cannot race past them. Every backend applies the same [`Rules`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Channels one user may be a member of.
    pub max_channels_per_user: u32,
    /// Edits of one message.
    pub max_edits_per_message: u32,
    /// Who may add a user to a group or broadcast channel.
    pub consent: Consent,
    /// DMs others opened with a user that the user has not answered (under
    /// [`Consent::SharedChannel`]).
    pub max_pending_dms: u32,
    /// Sessions one user may hold; a new login past it ends the oldest.
    pub max_sessions_per_user: u32,
    /// Distinct emoji on one message.
    pub max_reactions_per_message: u32,
    /// Time one search may spend in the index.
    pub search_budget: std::time::Duration,
    /// Bot accounts one user may own.
    pub max_bots_per_user: u32,
    /// API keys one user may hold, for themself and their bots together.
    pub max_api_keys_per_user: u32,
    /// Incoming webhooks of one channel.
    pub max_webhooks_per_channel: u32,
    /// How long a deleted account's username stays taken.
    pub username_hold: std::time::Duration,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            max_channels_per_user: 2000,
            max_edits_per_message: 50,
            // The server's default (`--membership-consent`) is `SharedChannel`; the store's
            // own default keeps no consent rule, for tools and suites that make their own.
            consent: Consent::Open,
            max_pending_dms: 100,
            max_sessions_per_user: 100,
            max_reactions_per_message: 20,
            search_budget: std::time::Duration::from_secs(2),
            max_bots_per_user: 20,
            max_api_keys_per_user: 50,
            max_webhooks_per_channel: 20,
            username_hold: std::time::Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Who may put a user into a channel (creating it with them, or adding them). Anyone may
/// open a DM with anyone (one per pair; a bounded number unanswered per recipient), so a
/// DM is how two strangers start; it counts once the recipient has answered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consent {
    /// Only someone who already shares a channel (a DM counts) with the user.
    SharedChannel,
    /// Anyone (a closed team server where everybody knows everybody).
    Open,
}

/// Which bound of the [`Rules`] a write would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TooMany {
    #[error("a user may be a member of at most {0} channels")]
    Channels(u32),
    #[error("a message may be edited at most {0} times")]
    Edits(u32),
    #[error("this user has {0} direct messages they have not answered; try again later")]
    PendingDms(u32),
    #[error("a message may have at most {0} different reactions")]
    Reactions(u32),
    #[error("a user may own at most {0} bots")]
    Bots(u32),
    #[error("a user may hold at most {0} API keys (their bots' included)")]
    ApiKeys(u32),
    #[error("a channel may have at most {0} webhooks")]
    Webhooks(u32),
}

/// Why a store call failed. Everything but [`StoreError::Internal`] is the caller's to act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing does not exist, or the caller may not see it (non-members see no channel).
    #[error("not found")]
    NotFound,
    /// The caller sees the thing but may not do this to it.
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error("username taken")]
    UsernameTaken,
    /// A value that passed the API's shape checks but not the store's (e.g. an unknown user
    /// id in a member list).
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// A per-user bound of the store's [`Rules`] was reached. Nothing was written.
    #[error("{0}")]
    TooMany(TooMany),
    /// The data directory's free space is below its reserve (or the disk is full):
    /// writes are refused until space is freed; reads still work. Nothing was written.
    #[error("the disk is full")]
    DiskFull,
    /// The write queue is full; retry later. Nothing was written.
    #[error("write queue is full")]
    Overloaded,
    /// The store is shutting down or its writer stopped. Nothing was written.
    #[error("store is unavailable")]
    Unavailable,
    /// A search would read more than its budget allows (a common word over many
    /// messages): narrow it.
    #[error("the search matches too much to answer in time")]
    SearchTooBroad,
    /// The database holding this (a PostgreSQL shard) is down, restarting or too slow to
    /// answer within the statement timeout. A write that got this was not acknowledged;
    /// if it was a send, retrying with the same `client_id` is safe.
    #[error("the database holding this is unreachable")]
    Unreachable,
    /// An unexpected storage failure. Nothing of the failed call was committed.
    #[error("{context}")]
    Internal {
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    /// The same error again (an internal one keeps its message, not its source): for an
    /// answer decided once and given to a write that may be replayed.
    pub fn duplicate(&self) -> Self {
        match self {
            Self::NotFound => Self::NotFound,
            Self::Forbidden(why) => Self::Forbidden(why),
            Self::UsernameTaken => Self::UsernameTaken,
            Self::Invalid { field, message } => Self::Invalid {
                field,
                message: message.clone(),
            },
            Self::TooMany(which) => Self::TooMany(*which),
            Self::DiskFull => Self::DiskFull,
            Self::Overloaded => Self::Overloaded,
            Self::Unavailable => Self::Unavailable,
            Self::SearchTooBroad => Self::SearchTooBroad,
            Self::Unreachable => Self::Unreachable,
            Self::Internal { context, source } => Self::internal(context, source.to_string()),
        }
    }

    pub fn internal(
        context: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Internal {
            context,
            source: source.into(),
        }
    }
}

/// Called by a backend's writer with the events of each committed transaction, in commit
/// order, before any of that transaction's writers is answered. It must not block for long:
/// the writer waits for it.
pub type OnCommit = std::sync::Arc<dyn Fn(Vec<Event>) + Send + Sync>;

/// Token hashes are SHA-256 digests of the opaque bearer token.
pub type TokenHash = [u8; 32];

/// A session to create: the digest of its bearer token, when it expires (Unix ms), and
/// where it was made from (shown in the owner's session list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    pub token: TokenHash,
    pub expires_at: i64,
    /// The client address that logged in.
    pub address: String,
    /// Its `User-Agent`, cut to 200 characters, without control, bidi or invisible
    /// characters.
    pub agent: String,
}

/// A session as its owner sees it in their list. Its id is not its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: i64,
    pub created_at: i64,
    pub last_used_at: i64,
    pub expires_at: i64,
    pub address: String,
    pub agent: String,
}

/// A live session's user, when it expires and when it was last used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionAuth {
    pub user: User,
    pub expires_at: i64,
    pub last_used_at: i64,
}

/// The public id of a session: derived from its token's digest, so it names the session
/// without revealing (or leading to) the token.
pub fn session_id(token: &TokenHash) -> i64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(token);
    let id = i64::from_be_bytes(d[..8].try_into().expect("8 bytes")) & i64::MAX;
    id.max(1)
}

/// An API key to store: the digest of its token, whose account it acts as (its owner's
/// own, or one of the owner's bots), a name, its scopes (space-separated names; the API
/// layer reads them) and when it expires (Unix ms; `None`: never).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApiKey {
    pub token: TokenHash,
    pub user_id: i64,
    pub name: String,
    pub scopes: String,
    pub expires_at: Option<i64>,
}

/// An API key as its owner sees it in their list. Its id is derived from the token's
/// digest ([`session_id`]), as a session's is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInfo {
    pub id: i64,
    /// The account the key acts as.
    pub user_id: i64,
    pub name: String,
    pub scopes: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

/// An incoming webhook to store: the digest of its secret, the bot it posts as (a member
/// of the channel) and a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewIncomingWebhook {
    pub token: TokenHash,
    pub bot_id: i64,
    pub name: String,
}

/// An incoming webhook: a secret URL that posts to its channel as its bot. Its id is
/// derived from the secret's digest ([`session_id`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingWebhook {
    pub id: i64,
    pub channel_id: i64,
    pub bot_id: i64,
    pub creator_id: i64,
    pub name: String,
    pub created_at: i64,
}

/// An outgoing webhook subscription to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSubscription {
    /// Where events are POSTed (checked by the caller).
    pub url: String,
    /// The HMAC-SHA256 key each request is signed with.
    pub secret: String,
    /// The event types delivered (space-separated); empty: every type.
    pub types: String,
    /// The seq after which delivery starts.
    pub cursor: i64,
}

/// Where an outgoing webhook subscription stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionStatus {
    /// Delivering (or backing off after a failure, until `next_try_at`).
    Active,
    /// Stopped by an admin; resumes from its cursor.
    Paused,
    /// Failed for longer than the server's dead-after time; tried no more until an admin
    /// resumes it (from its cursor).
    Dead,
}

impl SubscriptionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "paused" => Some(Self::Paused),
            "dead" => Some(Self::Dead),
            _ => None,
        }
    }
}

/// An outgoing webhook subscription: a channel's events POSTed to `url` in seq order,
/// at least once, from a durable cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub id: i64,
    pub channel_id: i64,
    pub creator_id: i64,
    pub url: String,
    pub secret: String,
    pub types: String,
    /// The last seq delivered (or skipped by the type filter): delivery resumes after it.
    pub cursor: i64,
    pub status: SubscriptionStatus,
    /// Events delivered so far.
    pub delivered: i64,
    pub last_error: Option<String>,
    /// When the current run of failures began.
    pub failing_since: Option<i64>,
    /// Failures in a row.
    pub failures: i64,
    /// No delivery before this (Unix ms): the backoff after a failure.
    pub next_try_at: i64,
    pub created_at: i64,
}

/// An admin's change to a subscription: pause or resume it, and/or move its cursor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriptionChange {
    /// `Active` resumes (clearing the failures), `Paused` pauses.
    pub status: Option<SubscriptionStatus>,
    pub cursor: Option<i64>,
}

/// What a delivery run did, recorded by the node that holds the subscription's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// The cursor the run last knew stored (claimed, or its last report's). If the stored
    /// one differs, an admin moved it meanwhile: the report's cursor is not applied, and
    /// the run stops (the next one starts where the admin put it).
    pub from: i64,
    /// The new cursor.
    pub cursor: i64,
    /// Events delivered since the last report.
    pub delivered: i64,
    /// `None`: the run succeeded (failures cleared). Else the error, the next try and
    /// whether the subscription is now dead.
    pub failure: Option<DeliveryFailure>,
    /// The lease: held until this time (ms), or `0` to let it go.
    pub lease_until: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryFailure {
    pub error: String,
    /// Pause the subscription (its creator is no longer allowed to hold it) rather than
    /// back off.
    pub pause: bool,
    pub next_try_at: i64,
    /// Failing since this long ago or more: the subscription turns dead.
    pub dead_after_ms: i64,
}

/// The account behind an unexpired API key, and the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAuth {
    pub user: User,
    pub key: ApiKeyInfo,
}

/// A user's channels that could be read, and the ids (from the index, ascending) of those
/// that could not be read now.
#[derive(Debug, Clone, Default)]
pub struct ChannelListing {
    pub views: Vec<ChannelView>,
    pub unavailable: Vec<i64>,
}

/// A message send's outcome: `created` is false when the `client_id` matched an earlier
/// message, which is returned unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posted {
    pub message: Message,
    pub created: bool,
}

/// Records a new message's `message.created` event in a writer's journal and returns
/// the send's answer: what every backend's send paths end with.
pub(crate) fn journal_post(journal: &mut Vec<Event>, message: Message) -> Posted {
    journal.push(Event {
        channel_id: message.channel_id,
        seq: message.seq,
        at: message.created_at,
        body: crate::model::EventBody::MessageCreated(message.clone()),
    });
    Posted {
        message,
        created: true,
    }
}

/// An upload to record: its bytes (and thumbnail) are received and checked, and are
/// placed in the file store once the record is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUpload {
    pub owner_id: i64,
    pub sha256: String,
    pub size: i64,
    pub content_type: String,
    pub name: String,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub thumb_sha256: Option<String>,
}

/// What one garbage-collection step of uploads did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CollectedUploads {
    /// Uploads deleted: older than the cutoff and carried by no message.
    pub deleted: u64,
    /// The digests (of files and thumbnails) the deleted uploads used: candidates for
    /// removal from the file store once no upload uses them ([`Files::blob_in_use`]).
    pub digests: Vec<String>,
    /// Where the next step starts (`None`: every upload was looked at; start over).
    pub next_after: Option<i64>,
}

/// The most files one message carries.
pub const MAX_ATTACHMENTS: usize = 10;

/// Attachments as a message row keeps them (`messages.files`): a JSON array, `NULL` for
/// none. Written and read by both backends, so a message reads the same from either.
pub(crate) fn encode_attachments(files: &[Attachment]) -> Option<String> {
    if files.is_empty() {
        return None;
    }
    let rows: Vec<StoredAttachment> = files.iter().map(StoredAttachment::from).collect();
    Some(serde_json::to_string(&rows).expect("attachments serialize"))
}

/// The attachments of a `messages.files` value; an unreadable one reads as none (and is
/// logged), so one bad row never fails a page of history.
pub(crate) fn decode_attachments(files: Option<&str>) -> Vec<Attachment> {
    let Some(json) = files else {
        return Vec::new();
    };
    match serde_json::from_str::<Vec<StoredAttachment>>(json) {
        Ok(rows) => rows.into_iter().map(Attachment::from).collect(),
        Err(e) => {
            tracing::error!(error = %e, "unreadable attachments in a message row");
            Vec::new()
        }
    }
}

/// An attachment as a message row and the cluster bus carry it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct StoredAttachment {
    id: i64,
    name: String,
    #[serde(rename = "type")]
    content_type: String,
    size: i64,
    #[serde(rename = "w", default, skip_serializing_if = "Option::is_none")]
    width: Option<i64>,
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    height: Option<i64>,
    #[serde(default)]
    thumbnail: bool,
}

impl From<&Attachment> for StoredAttachment {
    fn from(a: &Attachment) -> Self {
        Self {
            id: a.id,
            name: a.name.clone(),
            content_type: a.content_type.clone(),
            size: a.size,
            width: a.width,
            height: a.height,
            thumbnail: a.thumbnail,
        }
    }
}

impl From<StoredAttachment> for Attachment {
    fn from(a: StoredAttachment) -> Self {
        Self {
            id: a.id,
            name: a.name,
            content_type: a.content_type,
            size: a.size,
            width: a.width,
            height: a.height,
            thumbnail: a.thumbnail,
        }
    }
}

/// The uploads `files` names, in that order, checked for a post by `author`: each must be
/// one of the author's, named once, and at most [`MAX_ATTACHMENTS`] of them (else
/// `Invalid` on `attachments`). `found` holds the author's uploads among them.
pub(crate) fn attachments_of(
    author: i64,
    files: &[i64],
    found: &[Upload],
) -> std::result::Result<Vec<Attachment>, StoreError> {
    let invalid = |message: String| StoreError::Invalid {
        field: "attachments",
        message,
    };
    if files.len() > MAX_ATTACHMENTS {
        return Err(invalid(format!(
            "a message carries at most {MAX_ATTACHMENTS} files"
        )));
    }
    let mut out = Vec::with_capacity(files.len());
    for (i, id) in files.iter().enumerate() {
        if files[..i].contains(id) {
            return Err(invalid(format!("upload {id} is named twice")));
        }
        match found.iter().find(|u| u.id == *id && u.owner_id == author) {
            Some(u) => out.push(u.attachment()),
            None => {
                return Err(invalid(format!(
                    "no upload {id} of yours (an upload is attached by its uploader, within its grace period)"
                )));
            }
        }
    }
    Ok(out)
}

/// Uploaded files' records. Their bytes are in [`crate::files::FileStore`]; a record is
/// written before its bytes are placed, and deleted before they are removed, so no record
/// a message carries is ever without its bytes.
#[async_trait]
pub trait Files: Send + Sync {
    /// Records an upload (its bytes are placed after this commits).
    async fn create_upload(&self, upload: NewUpload) -> Result<Upload>;
    async fn upload(&self, id: i64) -> Result<Option<Upload>>;
    /// The channels with a message that carries the upload (deleted messages carry none).
    async fn upload_channels(&self, id: i64) -> Result<Vec<i64>>;
    /// The bytes of `owner`'s uploads, attached or not (their quota's use).
    async fn upload_bytes(&self, owner: i64) -> Result<i64>;
    /// Looks at up to `limit` uploads with ids above `after`, and deletes those created
    /// before `before` that no message carries.
    async fn collect_uploads(
        &self,
        before: i64,
        after: i64,
        limit: u32,
    ) -> Result<CollectedUploads>;
    /// Some upload uses these bytes (as its file or its thumbnail).
    async fn blob_in_use(&self, sha256: &str) -> Result<bool>;
}

/// A user's two-factor login, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwoFactor {
    /// The TOTP secret, sealed by the API layer ([`crate::sealing`]): the store never
    /// holds it readable.
    pub secret: Vec<u8>,
    /// Confirmed by a code: logins need one. Until then an enrolment waits for it.
    pub enabled: bool,
    /// The last 30-second step a code was accepted for: a code of it or an earlier one
    /// is refused.
    pub last_step: i64,
    /// Recovery codes not yet used.
    pub recovery_codes: u32,
}

/// What guards an account beyond its password: two-factor login and password changes.
/// Every check that must not race (a code used once, a recovery code used once) is made
/// in the write that records it.
#[async_trait]
pub trait Security: Send + Sync {
    /// The user's two-factor state, if they ever began an enrolment.
    async fn two_factor(&self, user_id: i64) -> Result<Option<TwoFactor>>;
    /// Begins an enrolment with a sealed secret, replacing one not yet confirmed;
    /// `false` (nothing changed) if two-factor login is on already.
    async fn begin_two_factor(&self, user_id: i64, secret: Vec<u8>) -> Result<bool>;
    /// Turns two-factor login on, if the waiting enrolment's secret is still `secret`
    /// (else `false`: another enrolment replaced it, or it is on already): `step` counts
    /// as used, and the recovery codes (their digests) replace any before.
    async fn enable_two_factor(
        &self,
        user_id: i64,
        secret: Vec<u8>,
        step: i64,
        recovery_codes: Vec<TokenHash>,
    ) -> Result<bool>;
    /// Records a code of `step` as used, if two-factor login is on and no code of that
    /// step or a later one was: whether it was (`false`: a replay).
    async fn use_code_step(&self, user_id: i64, step: i64) -> Result<bool>;
    /// Uses up a recovery code (its digest), if two-factor login is on and the code is
    /// one not used: whether it was.
    async fn use_recovery_code(&self, user_id: i64, code: TokenHash) -> Result<bool>;
    /// New recovery codes in place of the old (`false` if two-factor login is off).
    async fn replace_recovery_codes(&self, user_id: i64, codes: Vec<TokenHash>) -> Result<bool>;
    /// Turns two-factor login off (its secret and recovery codes are deleted).
    async fn disable_two_factor(&self, user_id: i64) -> Result<()>;
    /// Deletes an account and the bots it owns: each keeps its row (its messages keep
    /// its id) with the username `deleted`, no profile, no password; its sessions, API
    /// keys (held by it, or acting as it) and two-factor state are deleted, in one
    /// transaction. Its name stays taken for [`Rules::username_hold`]. `NotFound` for
    /// no such (or an already deleted) user. The accounts then leave their channels:
    /// [`finish_deletion`].
    async fn delete_account(&self, user_id: i64) -> Result<DeletedAccount>;
    /// A deleted account leaves a channel (not a DM): its webhooks and subscriptions
    /// there are deleted, an owner's role passes to the first admin (else the first
    /// member; by user id) not among `leaving` (the accounts deleted with it), and
    /// `member.removed` is appended. `false` if it was not a member.
    async fn depart(&self, user_id: i64, channel_id: i64, leaving: &[i64]) -> Result<bool>;
    /// Records that deleted accounts left every channel they had to.
    async fn departed(&self, users: &[i64]) -> Result<()>;
    /// Deleted accounts that have not left every channel yet.
    async fn departing(&self) -> Result<Vec<i64>>;
    /// Stores a new password hash and ends every session of the user but `keep`, in one
    /// transaction: the ended sessions' digests (the caller revokes them).
    async fn change_password(
        &self,
        user_id: i64,
        password_hash: &str,
        keep: TokenHash,
    ) -> Result<Vec<TokenHash>>;
}

/// What a deleted account left to end: the tokens of its sessions and API keys (and its
/// bots'), each with the account it acted as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeletedAccount {
    /// The user and the bots they owned, deleted with them.
    pub users: Vec<i64>,
    pub tokens: Vec<(i64, TokenHash)>,
}

/// Takes deleted accounts out of their channels (all but DMs, which keep both members so
/// the other party still reads them), then records that they left. Idempotent: what a
/// deletion cut short (a shard down, a crash) is finished by the next call, which the
/// server's upkeep makes for every account [`Security::departing`] names.
/// Each account is done on its own: one that fails does not hold back the others (the
/// first error is returned once all were tried). An account is recorded as done only
/// when its channel list, read again, shows nothing left to leave.
pub async fn finish_deletion(store: &dyn Store, users: &[i64]) -> Result<()> {
    let mut failed = None;
    for &user in users {
        match leave_all(store, user, users).await {
            Ok(true) => store.departed(&[user]).await?,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(user_id = user, error = %e, "a deleted account could not leave all its channels yet");
                failed.get_or_insert(e);
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Whether `user` has left every channel but its DMs (none was added meanwhile).
async fn leave_all(store: &dyn Store, user: i64, leaving: &[i64]) -> Result<bool> {
    let not_dm = |v: &crate::model::ChannelView| v.channel.kind != crate::model::ChannelKind::Dm;
    for view in store.channels(user).await?.iter().filter(|v| not_dm(v)) {
        store.depart(user, view.channel.id, leaving).await?;
    }
    Ok(!store.channels(user).await?.iter().any(not_dm))
}

/// Users and their sessions.
#[async_trait]
pub trait Accounts: Send + Sync {
    /// Stores the name folded ([`crate::username::fold`]: the form shown from then on).
    /// Fails with [`StoreError::UsernameTaken`] if its folded form or its skeleton
    /// ([`crate::username::skeleton`]) is an existing account's. With `session`, the
    /// account's first session commits with it, atomically. The caller checks the rules.
    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        session: Option<NewSession>,
    ) -> Result<User>;
    async fn user(&self, id: i64) -> Result<Option<User>>;
    /// Exact match of folded forms (so any letter case or compatible form finds it).
    async fn user_by_username(&self, username: &str) -> Result<Option<User>>;
    /// The user and their stored password hash, for login.
    async fn credentials(&self, username: &str) -> Result<Option<(User, String)>>;
    /// Changes the user's display name and about text (the caller checked them); the user
    /// as now stored, `NotFound` for no such user.
    async fn update_profile(&self, user_id: i64, change: ProfileChange) -> Result<User>;
    /// Records when users were last online (`(user, Unix ms)`); a time before the stored
    /// one changes nothing, an unknown user is skipped.
    async fn record_last_seen(&self, seen: &[(i64, i64)]) -> Result<()>;
    /// When each of `users` was last online, of those recorded (`(user, Unix ms)`, in no
    /// particular order).
    async fn last_seen(&self, users: &[i64]) -> Result<Vec<(i64, i64)>>;
    /// Past [`Rules::max_sessions_per_user`] the oldest sessions end; their digests.
    async fn create_session(&self, user_id: i64, session: NewSession) -> Result<Vec<TokenHash>>;
    /// The user of an unexpired session, when it expires and when it was last used.
    async fn session_user(&self, token: TokenHash, now: i64) -> Result<Option<SessionAuth>>;
    /// Records that the session was used at `now` (kept coarse by the caller).
    async fn touch_session(&self, token: TokenHash, now: i64) -> Result<()>;
    /// The unexpired sessions of `user_id`, newest first.
    async fn sessions(&self, user_id: i64, now: i64) -> Result<Vec<SessionInfo>>;
    /// Idempotent: deleting a missing session succeeds.
    async fn delete_session(&self, token: TokenHash) -> Result<()>;
    /// Deletes `user_id`'s session `session_id`; its token digest, or `None` if the user
    /// has no such session.
    async fn delete_session_by_id(
        &self,
        user_id: i64,
        session_id: i64,
    ) -> Result<Option<TokenHash>>;
    /// Deletes every session of `user_id` but `keep`; their token digests.
    async fn delete_other_sessions(&self, user_id: i64, keep: TokenHash) -> Result<Vec<TokenHash>>;
    /// Deletes sessions that expired at or before `now`; returns how many.
    async fn purge_sessions(&self, now: i64) -> Result<u64>;

    /// Creates a bot account owned by `owner`: a user without a password (it cannot log
    /// in), named as [`Accounts::create_user`] names users. Past
    /// [`Rules::max_bots_per_user`], `TooMany`; an owner that is a bot itself, `Forbidden`.
    async fn create_bot(&self, owner: i64, username: &str) -> Result<User>;
    /// The bots `owner` made, oldest first.
    async fn bots(&self, owner: i64) -> Result<Vec<User>>;
    /// Stores an API key held by `owner` for `key.user_id`, which must be `owner` or one
    /// of their bots (else `NotFound`). Past [`Rules::max_api_keys_per_user`] keys held
    /// by `owner` (expired ones included), `TooMany`.
    async fn create_api_key(&self, owner: i64, key: NewApiKey) -> Result<ApiKeyInfo>;
    /// The API keys `owner` holds (for themself and their bots), newest first.
    async fn api_keys(&self, owner: i64) -> Result<Vec<ApiKeyInfo>>;
    /// Deletes `owner`'s key `id`: the account it acted as and its digest, or `None` if
    /// the owner holds no such key.
    async fn delete_api_key(&self, owner: i64, id: i64) -> Result<Option<(i64, TokenHash)>>;
    /// The account behind an unexpired API key.
    async fn key_user(&self, token: TokenHash, now: i64) -> Result<Option<KeyAuth>>;
    /// Records that the key was used at `now` (kept coarse by the caller).
    async fn touch_api_key(&self, token: TokenHash, now: i64) -> Result<()>;
}

/// Channels, their members and their event logs. Every change appends one event per
/// affected fact with the channel's next seq, in the transaction that makes the change.
#[async_trait]
pub trait Channels: Send + Sync {
    /// Creates a group or broadcast channel owned by `owner`, with `members` (unknown ids
    /// are [`StoreError::Invalid`]) as plain members.
    async fn create_channel(
        &self,
        owner: i64,
        kind: ChannelKind,
        name: &str,
        members: &[i64],
    ) -> Result<Channel>;
    /// The DM channel of the pair, created if missing; `true` when it was created.
    async fn open_dm(&self, user: i64, peer: i64) -> Result<(Channel, bool)>;
    /// Owner/admin only; not for DMs.
    async fn rename_channel(&self, actor: i64, channel_id: i64, name: &str) -> Result<Channel>;
    /// The channel and the caller's role, or `None` if the caller is not a member.
    async fn channel(&self, channel_id: i64, user_id: i64) -> Result<Option<(Channel, Role)>>;
    /// [`Channels::channel`] for a caller about to read the channel's log or history:
    /// also the fence those reads must respect to see every write acknowledged before
    /// this call (a replica may answer them once it has replayed that far).
    async fn channel_to_read(
        &self,
        channel_id: i64,
        user_id: i64,
    ) -> Result<Option<(Channel, Role, ReadFence)>> {
        Ok(self
            .channel(channel_id, user_id)
            .await?
            .map(|(c, r)| (c, r, ReadFence::PRIMARY)))
    }
    /// All channels of `user_id` with role, read marker and unread count, by id.
    async fn channels(&self, user_id: i64) -> Result<Vec<ChannelView>>;
    /// As [`Channels::channels`], but a channel whose data cannot be read now (its
    /// PostgreSQL shard is down) is named in `unavailable` instead of failing the call.
    /// Membership of those is not verified: a caller must not follow them.
    async fn channel_listing(&self, user_id: i64) -> Result<ChannelListing> {
        Ok(ChannelListing {
            views: self.channels(user_id).await?,
            unavailable: Vec::new(),
        })
    }

    /// The members of a channel `user_id` belongs to; `NotFound` for non-members.
    async fn members(&self, user_id: i64, channel_id: i64) -> Result<Vec<Member>>;
    /// Which of `others` share a channel with `user_id` as consent counts it: any
    /// channel but a DM, and a DM once the other answered it (or if they opened it).
    async fn sharing(&self, user_id: i64, others: &[i64]) -> Result<Vec<i64>>;
    /// Adds `user_id` (with `role`, default member) or changes its role. Owner/admin only.
    async fn put_member(
        &self,
        actor: i64,
        channel_id: i64,
        user_id: i64,
        role: Option<Role>,
    ) -> Result<()>;
    /// A member leaves (actor == user) or is removed by an owner/admin.
    async fn remove_member(&self, actor: i64, channel_id: i64, user_id: i64) -> Result<()>;
    /// Moves the read marker forward to `seq` (clamped to the channel's last seq); never back.
    /// Queued and carried out as [`Channels::post_message`] is.
    async fn mark_read(&self, user_id: i64, channel_id: i64, seq: i64) -> Result<()>;

    /// The ordering promise every backend keeps: the write is queued no later than the
    /// returned future's first poll (SQLite: on that poll; PostgreSQL: in this call), and
    /// posts to one channel queued in some order commit in that order (the gateway relies
    /// on this to commit one connection's sends in the order sent). Once queued, the write
    /// is carried out and answered whether or not the future is polled again: the future
    /// only awaits the answer, so a WebSocket session keeps its sends in flight in its own
    /// task and polls them when it gets to them (no task per send).
    async fn post_message(
        &self,
        author: i64,
        channel_id: i64,
        text: &str,
        client_id: Option<&str>,
    ) -> Result<Posted>;
    /// A reply in the thread of `root_id`, a message of the same channel that is not a
    /// reply itself (else `Invalid`, as for a missing root or a deleted one without
    /// replies). The same checks, idempotency and ordering promise as
    /// [`Channels::post_message`]; the root's `reply_count` and `last_reply_at` change in
    /// the same transaction. Its event is a `message.created` whose message names the root.
    async fn post_reply(
        &self,
        author: i64,
        channel_id: i64,
        root_id: i64,
        text: &str,
        client_id: Option<&str>,
    ) -> Result<Posted>;
    /// A message (or with `root_id` a reply) that carries files: `files` are uploads of
    /// the author created at `attach_since` or later ([`attachments_of`]'s rules: the
    /// caller keeps this well inside the grace period [`Files::collect_uploads`] is called
    /// with, so no upload being attached is collected); the text may be empty. The same
    /// checks, idempotency and ordering promise as [`Channels::post_message`]; a retry
    /// with the same `client_id` returns the original whatever files it names.
    #[allow(clippy::too_many_arguments)]
    async fn post_with_files(
        &self,
        author: i64,
        channel_id: i64,
        root_id: Option<i64>,
        text: &str,
        client_id: Option<&str>,
        files: &[i64],
        attach_since: i64,
    ) -> Result<Posted>;
    /// The messages that mention `user_id` in the channels they are a member of, newest
    /// first, with message ids below `before` (a page's position). Only others' live
    /// messages mention a user.
    async fn mentions(
        &self,
        user_id: i64,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Page<Message>>;
    /// The live messages matching `query` in the channels `user_id` is a member of (or
    /// in `query.channel_id` alone: `NotFound` if they are not a member of it). What was
    /// sent before the call is found, an edited message by its new text only, a deleted
    /// one not at all. Past the store's search budget, `SearchTooBroad`.
    async fn search(&self, user_id: i64, query: &SearchQuery) -> Result<Page<Message>>;
    /// A message of the channel by id, deleted or not; no membership check, as for
    /// [`Channels::log`].
    async fn message(&self, channel_id: i64, message_id: i64) -> Result<Option<Message>>;
    /// A page of the live messages `author` wrote, in any channel (ones they left
    /// included), by id, after `after`: every one acknowledged before the call. For the
    /// author's own export: no membership check. A shard that cannot be read fails the
    /// call (an export must not leave messages out silently).
    async fn authored(&self, author: i64, after: i64, limit: u32) -> Result<Page<Message>>;
    /// A page of the replies to `root_id` (of the channel), by seq, paged as
    /// [`Channels::history`]; no membership check.
    async fn thread(
        &self,
        channel_id: i64,
        root_id: i64,
        query: HistoryQuery,
    ) -> Result<Page<Message>>;
    /// Author only.
    async fn edit_message(
        &self,
        actor: i64,
        channel_id: i64,
        message_id: i64,
        text: &str,
    ) -> Result<Message>;
    /// Author, owner or admin; deleting a deleted message changes nothing. The message's
    /// reactions go with it (no `reaction.removed` events: `message.deleted` says it).
    async fn delete_message(&self, actor: i64, channel_id: i64, message_id: i64) -> Result<()>;
    /// Adds (`add`) or takes back `actor`'s `emoji` reaction to a live message of the
    /// channel, appending `reaction.added` or `reaction.removed`. Any member may react,
    /// in broadcast channels too. `Ok(false)` when there was nothing to change (the same
    /// reaction twice is one; removing a missing one succeeds). `emoji` is in the
    /// canonical form the caller checked ([`crate::api`] validates it).
    async fn react(
        &self,
        actor: i64,
        channel_id: i64,
        message_id: i64,
        emoji: &str,
        add: bool,
    ) -> Result<bool>;
    /// The reactions to each of `message_ids` that belong to the channel, as `viewer`
    /// sees them (counts, and whether `viewer` is among them), each message's emoji in
    /// the order they were first used. Messages without reactions are left out. No
    /// membership check, as for [`Channels::log`].
    async fn reactions(
        &self,
        viewer: i64,
        channel_id: i64,
        message_ids: &[i64],
    ) -> Result<Vec<(i64, Vec<ReactionCount>)>>;
    /// Who reacted to the message with `emoji`, in the order they did, after `after` (the
    /// `seq` of the last one seen). No membership check.
    async fn reactors(
        &self,
        channel_id: i64,
        message_id: i64,
        emoji: &str,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<Reactor>>;
    /// A page of a channel's log. No membership check: callers check first (the API with
    /// [`Channels::channel`], the gateway from its connections' channel sets), so that
    /// identical reads of different members can share one store read.
    /// `fence` says where the read may go: [`ReadFence::PRIMARY`], or a position from
    /// [`Channels::channel_to_read`] that a replica must have replayed.
    async fn log(
        &self,
        channel_id: i64,
        after_seq: i64,
        limit: u32,
        fence: ReadFence,
    ) -> Result<Page<Event>>;
    /// A page of a channel's history; no membership check, as for [`Channels::log`].
    async fn history(
        &self,
        channel_id: i64,
        query: HistoryQuery,
        fence: ReadFence,
    ) -> Result<Page<Message>>;
    /// Stores an incoming webhook of the channel, made by `actor`, an owner or admin of it
    /// (a member otherwise is `Forbidden`, a non-member `NotFound`; no webhooks in DMs).
    /// Its bot must be a member (`Invalid` on `bot_id`). Past
    /// [`Rules::max_webhooks_per_channel`], `TooMany`.
    async fn create_incoming_webhook(
        &self,
        actor: i64,
        channel_id: i64,
        hook: NewIncomingWebhook,
    ) -> Result<IncomingWebhook>;
    /// The channel's incoming webhooks, oldest first; for its owner and admins only (as
    /// [`Channels::create_incoming_webhook`] checks).
    async fn incoming_webhooks(&self, actor: i64, channel_id: i64) -> Result<Vec<IncomingWebhook>>;
    /// Deletes the channel's webhook `id` (owner and admins); whether there was one.
    async fn delete_incoming_webhook(&self, actor: i64, channel_id: i64, id: i64) -> Result<bool>;
    /// The channel's webhook with this secret's digest.
    async fn incoming_webhook(
        &self,
        channel_id: i64,
        token: TokenHash,
    ) -> Result<Option<IncomingWebhook>>;
    /// Stores an outgoing webhook subscription of the channel, made by `actor` (an owner
    /// or admin, as for incoming webhooks; they count toward the same cap).
    async fn create_subscription(
        &self,
        actor: i64,
        channel_id: i64,
        sub: NewSubscription,
    ) -> Result<Subscription>;
    /// The channel's subscriptions, oldest first (owner and admins).
    async fn subscriptions(&self, actor: i64, channel_id: i64) -> Result<Vec<Subscription>>;
    /// Pauses, resumes (clearing its failures; the resuming admin becomes its creator,
    /// the one whose role it is delivered under) or moves the cursor of one (owner and
    /// admins); the subscription as now stored, `NotFound` for none.
    async fn update_subscription(
        &self,
        actor: i64,
        channel_id: i64,
        id: i64,
        change: SubscriptionChange,
    ) -> Result<Subscription>;
    /// Deletes one (owner and admins); whether there was one.
    async fn delete_subscription(&self, actor: i64, channel_id: i64, id: i64) -> Result<bool>;
    /// Active subscriptions due at `now` (no backoff pending, no other node's lease: a
    /// lease of `node`'s own counts as none, so a restarted node goes on at once), of
    /// every channel, by id, after id `after`, at most `limit` (a page: the caller pages
    /// through them all). No membership check: for the delivery worker.
    async fn due_subscriptions(
        &self,
        node: &str,
        now: i64,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Subscription>>;
    /// Takes the lease on an active subscription for `node` until `until`, if no other
    /// node holds one at `now`; the subscription as stored, or `None`.
    async fn claim_subscription(
        &self,
        channel_id: i64,
        id: i64,
        node: &str,
        now: i64,
        until: i64,
    ) -> Result<Option<Subscription>>;
    /// Records a delivery run of the lease holder `node`; `false` (nothing written) if
    /// it no longer holds the lease or the subscription is gone, and `false` (written)
    /// if it is no longer active (an admin paused it meanwhile): the run stops either
    /// way. A report never moves the cursor back, and leaves a paused subscription
    /// paused.
    async fn record_delivery(
        &self,
        channel_id: i64,
        id: i64,
        node: &str,
        now: i64,
        report: DeliveryReport,
    ) -> Result<bool>;
    /// The newest seq of each existing channel among `ids` (the cluster bus's check for
    /// events it missed), as `(channel_id, last_seq)` in no particular order. A channel on
    /// a shard that is down is left out rather than failing the call.
    async fn last_seqs(&self, ids: &[i64]) -> Result<Vec<(i64, i64)>>;
}

/// A search ([`Channels::search`]).
#[derive(Debug, Clone)]
pub struct SearchQuery {
    pub query: crate::search::Query,
    /// Only this channel's messages.
    pub channel_id: Option<i64>,
    pub order: SearchOrder,
    /// Where the page starts: with [`SearchOrder::Newest`], message ids below this one;
    /// with [`SearchOrder::Relevance`], past this many results.
    pub from: Option<i64>,
    pub limit: u32,
}

/// How search results are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchOrder {
    Newest,
    /// Best first (BM25 on the embedded store, `ts_rank` on PostgreSQL); ties newest first.
    Relevance,
}

/// The most results a relevance-ordered search pages through.
pub const MAX_SEARCH_OFFSET: i64 = 1_000;

/// Where a log or history read may be answered. A backend without replicas ignores it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ReadFence(pub Option<u64>);

impl ReadFence {
    /// Only the primary (every read of the gateway, which follows the primary's commits).
    pub const PRIMARY: Self = Self(None);
}

/// What a running backend tells the server about itself, for `/readyz` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Writes are refused for lack of disk space (SQLite below its reserve).
    pub disk_full: bool,
    /// The backend takes no more writes at all: SQLite's writer thread has ended (closed,
    /// or it could not go on safely). The node should leave the balancer.
    pub writes_ended: bool,
    /// Each part the backend depends on (a PostgreSQL shard: `shard0`, …) and whether it
    /// answers now. Empty for a backend with no parts (SQLite).
    pub parts: Vec<(String, bool)>,
}

impl Health {
    /// Every part answers and writes are taken.
    pub fn ready(&self) -> bool {
        !self.disk_full && !self.writes_ended && self.parts.iter().all(|(_, up)| *up)
    }
}

/// The life of a backend beside its data: closing, upkeep and its own metrics.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Commits every write already queued, answers its caller, and stops: later writes get
    /// [`StoreError::Unavailable`]. Call once, when nothing else writes any more.
    async fn close(&self);
    /// Periodic upkeep (e.g. deleting expired sessions), called at start and hourly; what
    /// it did, for the log.
    async fn maintain(&self, now: i64) -> Result<String>;
    fn health(&self) -> Health;
    /// Appends the backend's metrics in Prometheus text format.
    fn render_metrics(&self, out: &mut String);
    /// Waits, for at most `within`, until every message written so far is in the search
    /// index (for benchmarks, which measure searches apart from the writes before them);
    /// whether it is. A backend that indexes in the write itself is always caught up.
    async fn search_caught_up(&self, within: std::time::Duration) -> bool {
        let _ = within;
        true
    }
}

/// The whole store, as one object the server holds.
pub trait Store: Accounts + Security + Channels + Files + Backend {}
impl<T: Accounts + Security + Channels + Files + Backend> Store for T {}
