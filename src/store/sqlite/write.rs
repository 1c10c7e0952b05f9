//! The write ops the writer thread applies inside its batch transaction. Each op runs all
//! of its checks before its first write, so a refused op leaves the batch untouched.

use rusqlite::{OptionalExtension, Transaction, params};

use super::hot::{self, Hot};
use super::read;
use crate::clock::now_ms;
use crate::id::Snowflake;
use crate::model::{Channel, ChannelKind, Message, Role, User};
use crate::store::{Posted, StoreError, TokenHash};

pub(super) enum Op {
    CreateUser {
        username: String,
        password_hash: String,
    },
    CreateSession {
        user_id: i64,
        token: TokenHash,
        expires_at: i64,
    },
    DeleteSession {
        token: TokenHash,
    },
    PurgeSessions {
        now: i64,
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
}

/// How an op relates to the writer's [`Hot`] channel state.
pub(super) enum HotUse {
    /// Message posts keep the hot state themselves.
    Owns,
    /// Touches no channel or member row.
    None,
    /// Reads or writes channel/member rows: pending state is flushed first, and the
    /// channel (if any) is forgotten afterwards.
    FlushAndForget(Option<i64>),
}

impl Op {
    pub(super) fn hot_use(&self) -> HotUse {
        match self {
            Op::PostMessage { .. } => HotUse::Owns,
            Op::CreateUser { .. }
            | Op::CreateSession { .. }
            | Op::DeleteSession { .. }
            | Op::PurgeSessions { .. } => HotUse::None,
            Op::CreateChannel { .. } | Op::OpenDm { .. } | Op::MarkRead { .. } => {
                HotUse::FlushAndForget(None)
            }
            Op::RenameChannel { channel_id, .. }
            | Op::PutMember { channel_id, .. }
            | Op::RemoveMember { channel_id, .. }
            | Op::EditMessage { channel_id, .. }
            | Op::DeleteMessage { channel_id, .. } => HotUse::FlushAndForget(Some(*channel_id)),
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

pub(super) fn apply(tx: &Transaction, ids: &mut Snowflake, hot: &mut Hot, op: &Op) -> Applied {
    let now = now_ms();
    match op {
        Op::CreateUser {
            username,
            password_hash,
        } => create_user(tx, ids.next_id(now), now, username, password_hash),
        Op::CreateSession {
            user_id,
            token,
            expires_at,
        } => {
            tx.prepare_cached(
                "INSERT INTO sessions (token_hash, user_id, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![&token[..], user_id, now, expires_at])?;
            Ok(Done::Unit)
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
        Op::CreateChannel {
            owner,
            kind,
            name,
            members,
        } => create_channel(tx, ids, now, *owner, *kind, name, members),
        Op::OpenDm { user, peer } => open_dm(tx, ids, now, *user, *peer),
        Op::RenameChannel {
            actor,
            channel_id,
            name,
        } => rename_channel(tx, now, *actor, *channel_id, name),
        Op::PutMember {
            actor,
            channel_id,
            user_id,
            role,
        } => put_member(tx, now, *actor, *channel_id, *user_id, *role),
        Op::RemoveMember {
            actor,
            channel_id,
            user_id,
        } => remove_member(tx, now, *actor, *channel_id, *user_id),
        Op::MarkRead {
            user_id,
            channel_id,
            seq,
        } => mark_read(tx, *user_id, *channel_id, *seq),
        Op::PostMessage {
            author,
            channel_id,
            text,
            client_id,
        } => hot::post_message(
            tx,
            hot,
            ids,
            now,
            *author,
            *channel_id,
            text,
            client_id.as_deref(),
        ),
        Op::EditMessage {
            actor,
            channel_id,
            message_id,
            text,
        } => edit_message(tx, now, *actor, *channel_id, *message_id, text),
        Op::DeleteMessage {
            actor,
            channel_id,
            message_id,
        } => delete_message(tx, now, *actor, *channel_id, *message_id),
    }
}

fn create_user(tx: &Transaction, id: i64, now: i64, username: &str, hash: &str) -> Applied {
    let key = username.to_ascii_lowercase();
    let taken = tx
        .prepare_cached("SELECT 1 FROM users WHERE username_key = ?1")?
        .exists([&key])?;
    if taken {
        return Err(StoreError::UsernameTaken.into());
    }
    tx.prepare_cached(
        "INSERT INTO users (id, username, username_key, password_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![id, username, key, hash, now])?;
    Ok(Done::User(User {
        id,
        username: username.to_owned(),
        created_at: now,
    }))
}

/// Appends an event with the channel's next seq and returns that seq.
fn append_event(
    tx: &Transaction,
    channel_id: i64,
    kind: &str,
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
    .execute(params![channel_id, seq, kind, at, message_id, user_id, body])?;
    Ok(seq)
}

/// Adds a member with a `member.added` event. Their read marker starts at that event, so
/// earlier history does not count as unread.
fn add_member(
    tx: &Transaction,
    channel_id: i64,
    user_id: i64,
    role: Role,
    at: i64,
) -> rusqlite::Result<()> {
    let seq = append_event(
        tx,
        channel_id,
        "member.added",
        at,
        None,
        Some(user_id),
        Some(role.as_str()),
    )?;
    tx.prepare_cached(
        "INSERT INTO members (channel_id, user_id, role, read_seq, live_read, own_unread)
         SELECT ?1, ?2, ?3, ?4, live_messages, 0 FROM channels WHERE id = ?1",
    )?
    .execute(params![channel_id, user_id, role.as_str(), seq])?;
    Ok(())
}

fn user_exists(tx: &Transaction, user_id: i64) -> rusqlite::Result<bool> {
    tx.prepare_cached("SELECT 1 FROM users WHERE id = ?1")?
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

#[allow(clippy::too_many_arguments)]
fn create_channel(
    tx: &Transaction,
    ids: &mut Snowflake,
    now: i64,
    owner: i64,
    kind: ChannelKind,
    name: &str,
    members: &[i64],
) -> Applied {
    let mut others: Vec<i64> = members.iter().copied().filter(|&m| m != owner).collect();
    others.sort_unstable();
    others.dedup();
    for &m in &others {
        if !user_exists(tx, m)? {
            return Err(StoreError::Invalid {
                field: "members",
                message: format!("no user has id {m}"),
            }
            .into());
        }
    }
    let id = ids.next_id(now);
    tx.prepare_cached(
        "INSERT INTO channels (id, kind, name, owner_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![id, kind.as_str(), name, owner, now])?;
    add_member(tx, id, owner, Role::Owner, now)?;
    for m in others {
        add_member(tx, id, m, Role::Member, now)?;
    }
    Ok(Done::Channel(
        read::channel(tx, id)?.ok_or(StoreError::NotFound)?,
    ))
}

fn open_dm(tx: &Transaction, ids: &mut Snowflake, now: i64, user: i64, peer: i64) -> Applied {
    if user == peer {
        return Err(StoreError::Invalid {
            field: "user_id",
            message: "a DM needs another user".into(),
        }
        .into());
    }
    let key = format!("{}:{}", user.min(peer), user.max(peer));
    let existing: Option<i64> = tx
        .prepare_cached("SELECT id FROM channels WHERE dm_key = ?1")?
        .query_row([&key], |r| r.get(0))
        .optional()?;
    if let Some(id) = existing {
        return Ok(Done::Dm(
            read::channel(tx, id)?.ok_or(StoreError::NotFound)?,
            false,
        ));
    }
    if !user_exists(tx, peer)? {
        return Err(StoreError::NotFound.into());
    }
    let id = ids.next_id(now);
    tx.prepare_cached(
        "INSERT INTO channels (id, kind, name, owner_id, dm_key, created_at) VALUES (?1, 'dm', NULL, ?2, ?3, ?4)",
    )?
    .execute(params![id, user, key, now])?;
    add_member(tx, id, user, Role::Member, now)?;
    add_member(tx, id, peer, Role::Member, now)?;
    Ok(Done::Dm(
        read::channel(tx, id)?.ok_or(StoreError::NotFound)?,
        true,
    ))
}

fn rename_channel(tx: &Transaction, now: i64, actor: i64, channel_id: i64, name: &str) -> Applied {
    let (kind, role) = membership(tx, channel_id, actor)?;
    if kind == ChannelKind::Dm {
        return Err(StoreError::Forbidden("a DM has no name").into());
    }
    if !role.is_manager() {
        return Err(
            StoreError::Forbidden("only the owner or an admin may rename the channel").into(),
        );
    }
    tx.prepare_cached("UPDATE channels SET name = ?2 WHERE id = ?1")?
        .execute(params![channel_id, name])?;
    append_event(
        tx,
        channel_id,
        "channel.updated",
        now,
        None,
        None,
        Some(name),
    )?;
    Ok(Done::Channel(
        read::channel(tx, channel_id)?.ok_or(StoreError::NotFound)?,
    ))
}

fn put_member(
    tx: &Transaction,
    now: i64,
    actor: i64,
    channel_id: i64,
    user_id: i64,
    role: Option<Role>,
) -> Applied {
    let (kind, actor_role) = membership(tx, channel_id, actor)?;
    if kind == ChannelKind::Dm {
        return Err(StoreError::Forbidden("a DM has exactly two members").into());
    }
    if !actor_role.is_manager() {
        return Err(StoreError::Forbidden("only the owner or an admin may manage members").into());
    }
    if !user_exists(tx, user_id)? {
        return Err(StoreError::NotFound.into());
    }
    match role_of(tx, channel_id, user_id)? {
        None => add_member(tx, channel_id, user_id, role.unwrap_or(Role::Member), now)?,
        Some(Role::Owner) => {
            if role.is_some_and(|r| r != Role::Owner) {
                return Err(StoreError::Forbidden("the owner's role cannot be changed").into());
            }
        }
        Some(current) => {
            let wanted = role.unwrap_or(current);
            if wanted != current {
                if current == Role::Admin && actor_role != Role::Owner {
                    return Err(
                        StoreError::Forbidden("only the owner may change an admin's role").into(),
                    );
                }
                tx.prepare_cached(
                    "UPDATE members SET role = ?3 WHERE channel_id = ?1 AND user_id = ?2",
                )?
                .execute(params![channel_id, user_id, wanted.as_str()])?;
                append_event(
                    tx,
                    channel_id,
                    "member.updated",
                    now,
                    None,
                    Some(user_id),
                    Some(wanted.as_str()),
                )?;
            }
        }
    }
    Ok(Done::Unit)
}

fn remove_member(tx: &Transaction, now: i64, actor: i64, channel_id: i64, user_id: i64) -> Applied {
    let (kind, actor_role) = membership(tx, channel_id, actor)?;
    let target = role_of(tx, channel_id, user_id)?.ok_or(StoreError::NotFound)?;
    if kind == ChannelKind::Dm {
        return Err(StoreError::Forbidden("a DM has exactly two members").into());
    }
    if target == Role::Owner {
        return Err(StoreError::Forbidden("the owner cannot leave or be removed").into());
    }
    if actor != user_id {
        let allowed = match target {
            Role::Member => actor_role.is_manager(),
            _ => actor_role == Role::Owner,
        };
        if !allowed {
            return Err(StoreError::Forbidden("you may not remove this member").into());
        }
    }
    tx.prepare_cached("DELETE FROM members WHERE channel_id = ?1 AND user_id = ?2")?
        .execute([channel_id, user_id])?;
    append_event(
        tx,
        channel_id,
        "member.removed",
        now,
        None,
        Some(user_id),
        None,
    )?;
    Ok(Done::Unit)
}

fn mark_read(tx: &Transaction, user_id: i64, channel_id: i64, seq: i64) -> Applied {
    let row: Option<(i64, i64)> = tx
        .prepare_cached(
            "SELECT m.read_seq, c.last_seq FROM members m JOIN channels c ON c.id = m.channel_id
             WHERE m.channel_id = ?1 AND m.user_id = ?2",
        )?
        .query_row([channel_id, user_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (from, last) = row.ok_or(StoreError::NotFound)?;
    let to = seq.min(last);
    if to <= from {
        return Ok(Done::Unit);
    }
    let (live, own): (i64, i64) = tx
        .prepare_cached(
            "SELECT count(*), coalesce(sum(m.author_id = ?4), 0)
             FROM events e CROSS JOIN messages m ON m.id = e.message_id
             WHERE e.channel_id = ?1 AND e.kind = 'message.created' AND e.seq > ?2 AND e.seq <= ?3
               AND m.deleted = 0",
        )?
        .query_row([channel_id, from, to, user_id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    tx.prepare_cached(
        "UPDATE members SET read_seq = ?3, live_read = live_read + ?4, own_unread = own_unread - ?5
         WHERE channel_id = ?1 AND user_id = ?2",
    )?
    .execute([channel_id, user_id, to, live, own])?;
    Ok(Done::Unit)
}

fn live_message(tx: &Transaction, channel_id: i64, message_id: i64) -> Result<Message, Failure> {
    let message = tx
        .prepare_cached(&format!(
            "SELECT {} FROM messages WHERE id = ?1 AND channel_id = ?2",
            read::MESSAGE_COLUMNS
        ))?
        .query_row([message_id, channel_id], read::message_row)
        .optional()?;
    Ok(message.ok_or(StoreError::NotFound)?)
}

fn edit_message(
    tx: &Transaction,
    now: i64,
    actor: i64,
    channel_id: i64,
    message_id: i64,
    text: &str,
) -> Applied {
    membership(tx, channel_id, actor)?;
    let mut message = live_message(tx, channel_id, message_id)?;
    if message.deleted {
        return Err(StoreError::NotFound.into());
    }
    if message.author_id != actor {
        return Err(StoreError::Forbidden("only the author may edit a message").into());
    }
    // The event that showed the latest text (body NULL) keeps the old text as its own;
    // the new event shows the message row's text from now on.
    tx.prepare_cached(
        "UPDATE events SET body = ?3 WHERE channel_id = ?1 AND message_id = ?2 AND body IS NULL",
    )?
    .execute(params![channel_id, message_id, message.text])?;
    tx.prepare_cached("UPDATE messages SET text = ?2, edited_at = ?3 WHERE id = ?1")?
        .execute(params![message_id, text, now])?;
    append_event(
        tx,
        channel_id,
        "message.edited",
        now,
        Some(message_id),
        None,
        None,
    )?;
    message.text = text.to_owned();
    message.edited_at = Some(now);
    Ok(Done::Message(message))
}

/// Tombstones the message and redacts its text from every event of the log.
fn delete_message(
    tx: &Transaction,
    now: i64,
    actor: i64,
    channel_id: i64,
    message_id: i64,
) -> Applied {
    let (_, role) = membership(tx, channel_id, actor)?;
    let message = live_message(tx, channel_id, message_id)?;
    if message.author_id != actor && !role.is_manager() {
        return Err(StoreError::Forbidden(
            "only the author, the owner or an admin may delete a message",
        )
        .into());
    }
    if message.deleted {
        return Ok(Done::Unit);
    }
    tx.prepare_cached("UPDATE messages SET text = '', deleted = 1 WHERE id = ?1")?
        .execute([message_id])?;
    tx.prepare_cached("UPDATE events SET body = '' WHERE channel_id = ?1 AND message_id = ?2")?
        .execute([channel_id, message_id])?;
    append_event(
        tx,
        channel_id,
        "message.deleted",
        now,
        Some(message_id),
        None,
        None,
    )?;
    // Unread projection: one live message fewer in the channel, fewer read by those past
    // it, and one own message fewer for an author who had not read past it.
    tx.prepare_cached("UPDATE channels SET live_messages = live_messages - 1 WHERE id = ?1")?
        .execute([channel_id])?;
    tx.prepare_cached(
        "UPDATE members SET live_read = live_read - 1 WHERE channel_id = ?1 AND read_seq >= ?2",
    )?
    .execute([channel_id, message.seq])?;
    tx.prepare_cached(
        "UPDATE members SET own_unread = own_unread - 1 WHERE channel_id = ?1 AND user_id = ?2 AND read_seq < ?3",
    )?
    .execute([channel_id, message.author_id, message.seq])?;
    Ok(Done::Unit)
}
