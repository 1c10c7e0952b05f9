//! The write ops the writer thread applies inside its batch transaction. Each op runs all
//! of its checks before its first write, so a refused op leaves the batch untouched.
//! This module holds the op set, the dispatcher, accounts and the helpers the op modules
//! share; `channels` and `messages` hold the channel and message ops.

mod channels;
mod files;
mod keys;
mod messages;
mod security;
mod subscriptions;

pub(super) use self::security::SecurityOp;

use rusqlite::{OptionalExtension, Transaction, params};

use self::channels::{
    create_channel, mark_read, open_dm, put_member, remove_member, rename_channel,
};
use self::messages::{delete_message, edit_message, post_slow, react};
use super::hot::{self, Hot};
use super::read;
use crate::clock::now_ms;
use crate::id::Snowflake;
use crate::model::{Channel, ChannelKind, Event, EventBody, Message, Role, User};
use crate::store::{
    ApiKeyInfo, DeliveryReport, IncomingWebhook, NewApiKey, NewIncomingWebhook, NewSession,
    NewSubscription, Posted, Rules, StoreError, Subscription, SubscriptionChange, TokenHash,
};

pub(super) enum Op {
    CreateUser {
        username: String,
        password_hash: String,
        session: Option<NewSession>,
    },
    CreateSession {
        user_id: i64,
        session: NewSession,
    },
    UpdateProfile {
        user_id: i64,
        change: crate::model::ProfileChange,
    },
    DeleteSession {
        token: TokenHash,
    },
    LastSeen {
        seen: Vec<(i64, i64)>,
    },
    TouchSession {
        token: TokenHash,
        now: i64,
    },
    DeleteSessionById {
        user_id: i64,
        session_id: i64,
    },
    DeleteOtherSessions {
        user_id: i64,
        keep: TokenHash,
    },
    PurgeSessions {
        now: i64,
    },
    CreateBot {
        owner: i64,
        username: String,
    },
    CreateApiKey {
        owner: i64,
        key: NewApiKey,
    },
    DeleteApiKey {
        owner: i64,
        id: i64,
    },
    TouchApiKey {
        token: TokenHash,
        now: i64,
    },
    CreateIncomingWebhook {
        actor: i64,
        channel_id: i64,
        hook: NewIncomingWebhook,
    },
    DeleteIncomingWebhook {
        actor: i64,
        channel_id: i64,
        id: i64,
    },
    CreateSubscription {
        actor: i64,
        channel_id: i64,
        sub: NewSubscription,
    },
    UpdateSubscription {
        actor: i64,
        channel_id: i64,
        id: i64,
        change: SubscriptionChange,
    },
    DeleteSubscription {
        actor: i64,
        channel_id: i64,
        id: i64,
    },
    ClaimSubscription {
        channel_id: i64,
        id: i64,
        node: String,
        now: i64,
        until: i64,
    },
    RecordDelivery {
        channel_id: i64,
        id: i64,
        node: String,
        now: i64,
        report: DeliveryReport,
    },
    CreateChannel {
        owner: i64,
        kind: ChannelKind,
        name: String,
        members: Vec<i64>,
    },
    OpenDm {
        user: i64,
        peer: i64,
    },
    RenameChannel {
        actor: i64,
        channel_id: i64,
        name: String,
    },
    PutMember {
        actor: i64,
        channel_id: i64,
        user_id: i64,
        role: Option<Role>,
    },
    RemoveMember {
        actor: i64,
        channel_id: i64,
        user_id: i64,
    },
    MarkRead {
        user_id: i64,
        channel_id: i64,
        seq: i64,
    },
    PostMessage {
        author: i64,
        channel_id: i64,
        text: String,
        client_id: Option<String>,
    },
    /// A post the hot path does not take: a reply (`root_id`), or one whose text may
    /// mention someone.
    PostSlow {
        author: i64,
        channel_id: i64,
        root_id: Option<i64>,
        text: String,
        client_id: Option<String>,
        /// Uploads of the author it carries, created at `attach_since` or later.
        files: Vec<i64>,
        attach_since: i64,
    },
    CreateUpload {
        upload: crate::store::NewUpload,
    },
    CollectUploads {
        before: i64,
        after: i64,
        limit: u32,
    },
    EditMessage {
        actor: i64,
        channel_id: i64,
        message_id: i64,
        text: String,
    },
    DeleteMessage {
        actor: i64,
        channel_id: i64,
        message_id: i64,
    },
    React {
        actor: i64,
        channel_id: i64,
        message_id: i64,
        emoji: String,
        add: bool,
    },
    /// Folds the commit log through the channels' posts, so the search index has them.
    Fold {
        channels: Vec<i64>,
    },
    Security(SecurityOp),
    /// A deleted account leaves a channel.
    Depart {
        user_id: i64,
        channel_id: i64,
        leaving: Vec<i64>,
    },
}

impl Op {
    /// Ops taken even while writes are refused for disk space: they free space.
    pub(super) fn frees_space(&self) -> bool {
        matches!(
            self,
            Op::DeleteSession { .. }
                | Op::DeleteSessionById { .. }
                | Op::DeleteOtherSessions { .. }
                | Op::PurgeSessions { .. }
                | Op::DeleteApiKey { .. }
        )
    }

    /// The channel the op appends an event to, or whose messages or members it reads or
    /// changes: the commit log is folded through its posts first (its rows then count
    /// every post, [`super::tail`]), and the writer's [`Hot`] state of it is dropped
    /// after. Posts keep that state themselves; no other op changes what it holds (a
    /// channel's kind, roles and newest seq).
    pub(super) fn folds_channel(&self) -> Option<i64> {
        match self {
            Op::RenameChannel { channel_id, .. }
            | Op::PutMember { channel_id, .. }
            | Op::RemoveMember { channel_id, .. }
            | Op::EditMessage { channel_id, .. }
            | Op::DeleteMessage { channel_id, .. }
            | Op::React { channel_id, .. }
            | Op::PostSlow { channel_id, .. }
            | Op::Depart { channel_id, .. } => Some(*channel_id),
            // Listed, so that a new op is placed here on purpose.
            Op::PostMessage { .. }
            | Op::CreateUser { .. }
            | Op::CreateSession { .. }
            | Op::UpdateProfile { .. }
            | Op::LastSeen { .. }
            | Op::DeleteSession { .. }
            | Op::TouchSession { .. }
            | Op::DeleteSessionById { .. }
            | Op::DeleteOtherSessions { .. }
            | Op::PurgeSessions { .. }
            | Op::CreateBot { .. }
            | Op::CreateApiKey { .. }
            | Op::CreateUpload { .. }
            | Op::CollectUploads { .. }
            | Op::DeleteApiKey { .. }
            | Op::TouchApiKey { .. }
            | Op::Security(_)
            | Op::CreateChannel { .. }
            | Op::OpenDm { .. }
            | Op::MarkRead { .. }
            | Op::CreateIncomingWebhook { .. }
            | Op::DeleteIncomingWebhook { .. }
            | Op::CreateSubscription { .. }
            | Op::UpdateSubscription { .. }
            | Op::DeleteSubscription { .. }
            | Op::Fold { .. }
            | Op::ClaimSubscription { .. }
            | Op::RecordDelivery { .. } => None,
        }
    }
}

pub(super) enum Done {
    User(User),
    Channel(Channel),
    Dm(Channel, bool),
    Posted(Posted),
    Message(Message),
    Count(u64),
    /// Digests of deleted sessions.
    Tokens(Vec<TokenHash>),
    ApiKey(ApiKeyInfo),
    Webhook(IncomingWebhook),
    Upload(crate::model::Upload),
    Collected(crate::store::CollectedUploads),
    Subscription(Option<Subscription>),
    /// A deleted API key's account and digest, if there was one.
    DeletedKey(Option<(i64, TokenHash)>),
    Deleted(crate::store::DeletedAccount),
    /// Whether the op changed anything (an idempotent op that found it done: `false`).
    Changed(bool),
    Unit,
}

pub(super) enum Failure {
    /// A check failed before anything was written.
    Refused(StoreError),
    /// SQLite failed; the batch must not be committed as it is.
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Self::Refused(e)
    }
}

pub(super) type Applied = Result<Done, Failure>;

/// Applies `op`, appending to `journal` every event it wrote (and none if it was refused).
pub(super) fn apply(
    tx: &Transaction,
    ids: &mut Snowflake,
    hot: &mut Hot,
    rules: &Rules,
    op: &Op,
    journal: &mut Vec<Event>,
) -> Applied {
    let now = now_ms();
    let j = journal;
    match op {
        Op::CreateUser {
            username,
            password_hash,
            session,
        } => create_user(
            tx,
            rules,
            ids.next_id(now),
            now,
            username,
            password_hash,
            session.as_ref(),
        ),
        Op::CreateSession { user_id, session } => {
            // A login that checked its password before the account was deleted gets none.
            let live = tx
                .prepare_cached("SELECT 1 FROM users WHERE id = ?1 AND deleted_at IS NULL")?
                .exists([user_id])?;
            if !live {
                return Err(StoreError::NotFound.into());
            }
            insert_session(tx, *user_id, session, now)?;
            // The oldest sessions past the cap end (the caller revokes them).
            let evicted = tx
                .prepare_cached(
                    "DELETE FROM sessions WHERE user_id = ?1 AND token_hash IN (
                         SELECT token_hash FROM sessions WHERE user_id = ?1
                         ORDER BY created_at DESC, id DESC LIMIT -1 OFFSET ?2)
                     RETURNING token_hash",
                )?
                .query_map(params![user_id, rules.max_sessions_per_user], |r| {
                    r.get::<_, Vec<u8>>(0)
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Done::Tokens(
                evicted.into_iter().filter_map(digest).collect(),
            ))
        }
        Op::UpdateProfile { user_id, change } => {
            if let Some(name) = &change.display_name {
                tx.prepare_cached("UPDATE users SET display_name = ?2 WHERE id = ?1")?
                    .execute(params![user_id, name])?;
            }
            if let Some(about) = &change.about {
                tx.prepare_cached("UPDATE users SET about = ?2 WHERE id = ?1")?
                    .execute(params![user_id, about])?;
            }
            let user = tx
                .prepare_cached(&format!(
                    "SELECT {} FROM users WHERE id = ?1",
                    read::USER_COLUMNS
                ))?
                .query_row([user_id], read::user_row)
                .optional()?;
            // A missing user: the updates above changed nothing.
            Ok(Done::User(user.ok_or(StoreError::NotFound)?))
        }
        Op::LastSeen { seen } => {
            let mut update = tx.prepare_cached(
                "UPDATE users SET last_seen_at = max(coalesce(last_seen_at, 0), ?2) WHERE id = ?1",
            )?;
            for (user, at) in seen {
                update.execute(params![user, at])?;
            }
            Ok(Done::Unit)
        }
        Op::TouchSession { token, now } => {
            tx.prepare_cached(
                "UPDATE sessions SET last_used_at = max(last_used_at, ?2) WHERE token_hash = ?1",
            )?
            .execute(params![&token[..], now])?;
            Ok(Done::Unit)
        }
        Op::DeleteSessionById {
            user_id,
            session_id,
        } => {
            let token: Option<Vec<u8>> = tx
                .prepare_cached(
                    "DELETE FROM sessions WHERE user_id = ?1 AND id = ?2 RETURNING token_hash",
                )?
                .query_row([user_id, session_id], |r| r.get(0))
                .optional()?;
            Ok(Done::Tokens(token.into_iter().filter_map(digest).collect()))
        }
        Op::DeleteOtherSessions { user_id, keep } => {
            let tokens = tx
                .prepare_cached(
                    "DELETE FROM sessions WHERE user_id = ?1 AND token_hash != ?2 RETURNING token_hash",
                )?
                .query_map(params![user_id, &keep[..]], |r| r.get::<_, Vec<u8>>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Done::Tokens(
                tokens.into_iter().filter_map(digest).collect(),
            ))
        }
        Op::DeleteSession { token } => {
            tx.prepare_cached("DELETE FROM sessions WHERE token_hash = ?1")?
                .execute([&token[..]])?;
            Ok(Done::Unit)
        }
        Op::PurgeSessions { now } => {
            let n = tx
                .prepare_cached("DELETE FROM sessions WHERE expires_at <= ?1")?
                .execute([now])?;
            Ok(Done::Count(n as u64))
        }
        Op::Security(op) => security::apply(tx, now, op),
        Op::Depart {
            user_id,
            channel_id,
            leaving,
        } => channels::depart(tx, j, now, *user_id, *channel_id, leaving),
        Op::CreateBot { owner, username } => {
            keys::create_bot(tx, rules, ids.next_id(now), now, *owner, username)
        }
        Op::CreateApiKey { owner, key } => keys::create_api_key(tx, rules, now, *owner, key),
        Op::CreateIncomingWebhook {
            actor,
            channel_id,
            hook,
        } => keys::create_incoming_webhook(tx, rules, now, *actor, *channel_id, hook),
        Op::DeleteIncomingWebhook {
            actor,
            channel_id,
            id,
        } => keys::delete_incoming_webhook(tx, *actor, *channel_id, *id),
        Op::CreateSubscription {
            actor,
            channel_id,
            sub,
        } => subscriptions::create(tx, rules, ids.next_id(now), now, *actor, *channel_id, sub),
        Op::UpdateSubscription {
            actor,
            channel_id,
            id,
            change,
        } => subscriptions::update(tx, *actor, *channel_id, *id, *change),
        Op::DeleteSubscription {
            actor,
            channel_id,
            id,
        } => subscriptions::delete(tx, *actor, *channel_id, *id),
        Op::ClaimSubscription {
            channel_id,
            id,
            node,
            now,
            until,
        } => subscriptions::claim(tx, *channel_id, *id, node, *now, *until),
        Op::RecordDelivery {
            channel_id,
            id,
            node,
            now,
            report,
        } => subscriptions::record(tx, *channel_id, *id, node, *now, report),
        Op::DeleteApiKey { owner, id } => keys::delete_api_key(tx, *owner, *id),
        Op::TouchApiKey { token, now } => {
            tx.prepare_cached(
                "UPDATE api_keys SET last_used_at = max(coalesce(last_used_at, 0), ?2)
                 WHERE token_hash = ?1",
            )?
            .execute(params![&token[..], now])?;
            Ok(Done::Unit)
        }
        Op::CreateChannel {
            owner,
            kind,
            name,
            members,
        } => create_channel(tx, j, ids, rules, now, *owner, *kind, name, members),
        Op::OpenDm { user, peer } => match open_dm(tx, j, ids, rules, now, *user, *peer)? {
            // An open DM's row counts its posts only once they are folded.
            Done::Dm(mut ch, false) => {
                ch.last_seq = hot.log.last_seq(ch.id, ch.last_seq);
                Ok(Done::Dm(ch, false))
            }
            done => Ok(done),
        },
        Op::RenameChannel {
            actor,
            channel_id,
            name,
        } => rename_channel(tx, j, now, *actor, *channel_id, name),
        Op::PutMember {
            actor,
            channel_id,
            user_id,
            role,
        } => put_member(tx, j, rules, now, *actor, *channel_id, *user_id, *role),
        Op::RemoveMember {
            actor,
            channel_id,
            user_id,
        } => remove_member(tx, j, now, *actor, *channel_id, *user_id),
        Op::MarkRead {
            user_id,
            channel_id,
            seq,
        } => mark_read(tx, &hot.log, *user_id, *channel_id, *seq),
        Op::PostMessage {
            author,
            channel_id,
            text,
            client_id,
        } => hot::post_message(
            tx,
            j,
            hot,
            ids,
            now,
            *author,
            *channel_id,
            text,
            client_id.as_deref(),
        ),
        Op::PostSlow {
            author,
            channel_id,
            root_id,
            text,
            client_id,
            files,
            attach_since,
        } => post_slow(
            tx,
            j,
            hot,
            ids,
            now,
            (*author, *channel_id, *root_id),
            text,
            client_id.as_deref(),
            (files, *attach_since),
        ),
        Op::CreateUpload { upload } => files::create_upload(tx, ids.next_id(now), now, upload),
        Op::CollectUploads {
            before,
            after,
            limit,
        } => files::collect_uploads(tx, *before, *after, *limit),
        Op::EditMessage {
            actor,
            channel_id,
            message_id,
            text,
        } => edit_message(tx, j, rules, now, *actor, *channel_id, *message_id, text),
        Op::DeleteMessage {
            actor,
            channel_id,
            message_id,
        } => delete_message(tx, j, now, *actor, *channel_id, *message_id),
        Op::Fold { channels } => Ok(Done::Count(hot.log.fold_channels(tx, channels)? as u64)),
        Op::React {
            actor,
            channel_id,
            message_id,
            emoji,
            add,
        } => react(
            tx,
            j,
            rules,
            now,
            *actor,
            *channel_id,
            *message_id,
            emoji,
            *add,
        ),
    }
}

/// Creates the account and, when given, its first session, in one transaction: a
/// registration never leaves an account whose creator got an error.
fn create_user(
    tx: &Transaction,
    rules: &Rules,
    id: i64,
    now: i64,
    username: &str,
    hash: &str,
    session: Option<&NewSession>,
) -> Applied {
    let user = insert_user(tx, rules, id, now, username, hash, None)?;
    if let Some(s) = session {
        insert_session(tx, id, s, now)?;
    }
    Ok(Done::User(user))
}

/// Inserts a user (a bot when `bot_owner` is set) under a name nobody's folded form or
/// skeleton has.
fn insert_user(
    tx: &Transaction,
    rules: &Rules,
    id: i64,
    now: i64,
    username: &str,
    hash: &str,
    bot_owner: Option<i64>,
) -> Result<User, Failure> {
    // Stored and shown folded; a name whose skeleton an existing one shares is taken.
    // Skeletons are not a unique index (accounts from before skeletons may share one),
    // so this check, in the writer's transaction, is what keeps new ones apart.
    let folded = crate::username::fold(username);
    let skeleton = crate::username::skeleton(&folded);
    // A deleted account past its hold gives its name up (a key no name can have).
    let held_since = now.saturating_sub(rules.username_hold.as_millis() as i64);
    tx.prepare_cached(
        "UPDATE users SET username_key = '~deleted~' || id, username_skeleton = ''
         WHERE deleted_at IS NOT NULL AND deleted_at <= ?3
           AND (username_key = ?1 OR username_skeleton = ?2)",
    )?
    .execute(params![&folded, &skeleton, held_since])?;
    let taken = tx
        .prepare_cached("SELECT 1 FROM users WHERE username_key = ?1 OR username_skeleton = ?2")?
        .exists([&folded, &skeleton])?;
    if taken {
        return Err(StoreError::UsernameTaken.into());
    }
    tx.prepare_cached(
        "INSERT INTO users (id, username, username_key, username_skeleton, password_hash, created_at, bot_owner)
         VALUES (?1, ?2, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![id, folded, skeleton, hash, now, bot_owner])?;
    Ok(User {
        id,
        username: folded,
        created_at: now,
        bot_owner,
        ..User::default()
    })
}

fn insert_session(
    tx: &Transaction,
    user_id: i64,
    s: &NewSession,
    now: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO sessions (token_hash, user_id, created_at, expires_at, id, last_used_at, address, agent)
         VALUES (?1, ?2, ?3, ?4, ?5, ?3, ?6, ?7)",
    )?
    .execute(params![
        &s.token[..],
        user_id,
        now,
        s.expires_at,
        crate::store::session_id(&s.token),
        s.address,
        s.agent
    ])?;
    Ok(())
}

/// A stored token digest (always 32 bytes as written).
fn digest(bytes: Vec<u8>) -> Option<TokenHash> {
    TokenHash::try_from(bytes.as_slice()).ok()
}

/// Appends an event with the channel's next seq, records it in the journal, and returns
/// its seq. `record` builds the event's body once the row is written.
#[allow(clippy::too_many_arguments)]
fn append_event(
    tx: &Transaction,
    journal: &mut Vec<Event>,
    record: EventBody,
    channel_id: i64,
    at: i64,
    message_id: Option<i64>,
    user_id: Option<i64>,
    body: Option<&str>,
) -> rusqlite::Result<i64> {
    let seq: i64 = tx
        .prepare_cached(
            "UPDATE channels SET last_seq = last_seq + 1 WHERE id = ?1 RETURNING last_seq",
        )?
        .query_row([channel_id], |r| r.get(0))?;
    tx.prepare_cached(
        "INSERT INTO events (channel_id, seq, kind, at, message_id, user_id, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![channel_id, seq, record.kind(), at, message_id, user_id, body])?;
    journal.push(Event {
        channel_id,
        seq,
        at,
        body: record,
    });
    Ok(seq)
}

/// A live account: a deleted one is joined to nothing new.
fn user_exists(tx: &Transaction, user_id: i64) -> rusqlite::Result<bool> {
    tx.prepare_cached("SELECT 1 FROM users WHERE id = ?1 AND deleted_at IS NULL")?
        .exists([user_id])
}

/// The channel's kind and the user's role in it; `NotFound` for non-members.
fn membership(
    tx: &Transaction,
    channel_id: i64,
    user_id: i64,
) -> Result<(ChannelKind, Role), Failure> {
    Ok(membership_row(tx, channel_id, user_id)?.ok_or(StoreError::NotFound)?)
}

/// The channel's kind and the user's role in it; `None` for non-members.
pub(super) fn membership_row(
    tx: &Transaction,
    channel_id: i64,
    user_id: i64,
) -> rusqlite::Result<Option<(ChannelKind, Role)>> {
    let row = tx
        .prepare_cached(
            "SELECT c.kind, m.role FROM members m JOIN channels c ON c.id = m.channel_id
             WHERE m.channel_id = ?1 AND m.user_id = ?2",
        )?
        .query_row([channel_id, user_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .optional()?;
    row.map(|(kind, role)| Ok((read::parse_kind(&kind)?, read::parse_role(&role)?)))
        .transpose()
}

fn role_of(tx: &Transaction, channel_id: i64, user_id: i64) -> rusqlite::Result<Option<Role>> {
    let role: Option<String> = tx
        .prepare_cached("SELECT role FROM members WHERE channel_id = ?1 AND user_id = ?2")?
        .query_row([channel_id, user_id], |r| r.get(0))
        .optional()?;
    role.map(|r| read::parse_role(&r)).transpose()
}
