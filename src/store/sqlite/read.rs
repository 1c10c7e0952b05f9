//! Read queries and row mapping, plus the pool of read-only connections that serves them
//! off the async runtime (WAL lets them run beside the writer).

use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, Row, params};
use tokio::sync::Semaphore;

use super::tail::{self, Tail, merge_after};
use crate::model::{
    Channel, ChannelKind, ChannelView, Event, EventBody, HistoryQuery, Member, Message, Page,
    ReactionCount, Reactor, Role, User,
};
use crate::store::{Result, SearchOrder, SearchQuery, StoreError};

/// A small pool of read connections; each call runs on the blocking thread pool.
pub(super) struct ReadPool {
    conns: Mutex<Vec<Connection>>,
    permits: Semaphore,
}

impl ReadPool {
    pub fn new(conns: Vec<Connection>) -> Arc<Self> {
        let permits = Semaphore::new(conns.len());
        Arc::new(Self {
            conns: Mutex::new(conns),
            permits,
        })
    }

    /// Runs `f` on a pooled connection without blocking the async runtime.
    pub async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable)?;
        let pool = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let conn = pool
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .expect("a permit guarantees a connection");
            let result = f(&conn);
            pool.conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
            result
        })
        .await
        .map_err(|e| StoreError::internal("run read query", e))?
        .map_err(|e| StoreError::internal("read store", e))
    }
}

fn corrupt(what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(0, format!("{what} {value:?}"), rusqlite::types::Type::Text)
}

pub(super) fn parse_kind(s: &str) -> rusqlite::Result<ChannelKind> {
    ChannelKind::parse(s).ok_or_else(|| corrupt("channel kind", s))
}

pub(super) fn parse_role(s: &str) -> rusqlite::Result<Role> {
    Role::parse(s).ok_or_else(|| corrupt("role", s))
}

pub(super) const USER_COLUMNS: &str =
    "id, username, created_at, display_name, about, bot_owner, deleted_at IS NOT NULL AS deleted";

/// A user from the first three columns, and the profile's by name (every query that
/// reads a user selects `display_name` and `about` too).
pub(super) fn user_row(r: &Row) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get(0)?,
        username: r.get(1)?,
        created_at: r.get(2)?,
        display_name: r.get("display_name")?,
        about: r.get("about")?,
        bot_owner: r.get("bot_owner")?,
        deleted: r.get("deleted")?,
    })
}

pub(super) const CHANNEL_COLUMNS: &str =
    "c.id, c.kind, c.name, c.owner_id, c.last_seq, c.created_at";

fn channel_row(r: &Row) -> rusqlite::Result<Channel> {
    Ok(Channel {
        id: r.get(0)?,
        kind: parse_kind(&r.get::<_, String>(1)?)?,
        name: r.get(2)?,
        owner_id: r.get(3)?,
        last_seq: r.get(4)?,
        created_at: r.get(5)?,
    })
}

/// The columns [`message_row`] reads, of `messages m`. A macro so that queries are built
/// with `concat!` at compile time: the send path never formats SQL.
macro_rules! message_select {
    () => {
        "SELECT m.id, m.channel_id, m.seq, m.author_id, m.text, m.client_id, m.created_at, \
         m.edited_at, m.deleted, m.thread_root_id, m.reply_count, m.last_reply_at, m.mentions, m.files "
    };
}

/// An earlier message of an author with this `client_id` (the idempotency probe).
pub(super) const MESSAGE_BY_CLIENT_ID: &str = concat!(
    message_select!(),
    "FROM messages m WHERE m.channel_id = ?1 AND m.author_id = ?2 AND m.client_id = ?3"
);

/// A message by id within its channel.
pub(super) const MESSAGE_BY_ID: &str = concat!(
    message_select!(),
    "FROM messages m WHERE m.id = ?1 AND m.channel_id = ?2"
);

// History is read along the log, `events (channel_id, seq)`, so messages need no index by
// channel (one B-tree fewer to update per message on the write path).
const HISTORY_AFTER: &str = concat!(
    message_select!(),
    "FROM events e CROSS JOIN messages m ON m.id = e.message_id
     WHERE e.channel_id = ?1 AND e.kind = 'message.created' AND e.seq > ?2 AND e.seq < ?3
     ORDER BY e.seq ASC LIMIT ?4"
);
const HISTORY_BEFORE: &str = concat!(
    message_select!(),
    "FROM events e CROSS JOIN messages m ON m.id = e.message_id
     WHERE e.channel_id = ?1 AND e.kind = 'message.created' AND e.seq < ?2
     ORDER BY e.seq DESC LIMIT ?3"
);

pub(super) fn message_row(r: &Row) -> rusqlite::Result<Message> {
    Ok(Message {
        id: r.get(0)?,
        channel_id: r.get(1)?,
        seq: r.get(2)?,
        author_id: r.get(3)?,
        text: r.get(4)?,
        client_id: r.get(5)?,
        created_at: r.get(6)?,
        edited_at: r.get(7)?,
        deleted: r.get(8)?,
        thread_root_id: r.get(9)?,
        reply_count: r.get(10)?,
        last_reply_at: r.get(11)?,
        mentions: parse_ids(r.get(12)?),
        attachments: crate::store::decode_attachments(r.get::<_, Option<String>>(13)?.as_deref()),
    })
}

/// An upload by id.
pub(super) const UPLOAD_BY_ID: &str =
    "SELECT id, owner_id, sha256, size, content_type, name, width, height, thumb_sha256, created_at
     FROM uploads WHERE id = ?1";

pub(super) fn upload_row(r: &Row) -> rusqlite::Result<crate::model::Upload> {
    Ok(crate::model::Upload {
        id: r.get(0)?,
        owner_id: r.get(1)?,
        sha256: r.get(2)?,
        size: r.get(3)?,
        content_type: r.get(4)?,
        name: r.get(5)?,
        width: r.get(6)?,
        height: r.get(7)?,
        thumb_sha256: r.get(8)?,
        created_at: r.get(9)?,
    })
}

pub(super) fn upload(c: &Connection, id: i64) -> rusqlite::Result<Option<crate::model::Upload>> {
    c.prepare_cached(UPLOAD_BY_ID)?
        .query_row([id], upload_row)
        .optional()
}

pub(super) fn upload_channels(c: &Connection, id: i64) -> rusqlite::Result<Vec<i64>> {
    c.prepare_cached("SELECT DISTINCT channel_id FROM message_files WHERE upload_id = ?1")?
        .query_map([id], |r| r.get(0))?
        .collect()
}

pub(super) fn upload_bytes(c: &Connection, owner: i64) -> rusqlite::Result<i64> {
    c.prepare_cached("SELECT coalesce(sum(size), 0) FROM uploads WHERE owner_id = ?1")?
        .query_row([owner], |r| r.get(0))
}

pub(super) fn blob_in_use(c: &Connection, sha256: &str) -> rusqlite::Result<bool> {
    c.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM uploads WHERE sha256 = ?1)
             OR EXISTS (SELECT 1 FROM uploads WHERE thumb_sha256 = ?1)",
    )?
    .query_row([sha256], |r| r.get(0))
}

/// Ids as a message's `mentions` column keeps them: comma-separated, `NULL` for none.
pub(super) fn parse_ids(s: Option<String>) -> Vec<i64> {
    s.iter()
        .flat_map(|s| s.split(','))
        .filter_map(|id| id.parse().ok())
        .collect()
}

/// The column's value for `ids`.
pub(super) fn join_ids(ids: &[i64]) -> Option<String> {
    (!ids.is_empty()).then(|| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(","))
}

pub(super) fn user(conn: &Connection, id: i64) -> rusqlite::Result<Option<User>> {
    conn.prepare_cached(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1"))?
        .query_row([id], user_row)
        .optional()
}

pub(super) fn user_by_username(
    conn: &Connection,
    username: &str,
) -> rusqlite::Result<Option<User>> {
    conn.prepare_cached(&format!(
        "SELECT {USER_COLUMNS} FROM users WHERE username_key = ?1 AND deleted_at IS NULL"
    ))?
    .query_row([crate::username::fold(username)], user_row)
    .optional()
}

pub(super) fn credentials(
    conn: &Connection,
    username: &str,
) -> rusqlite::Result<Option<(User, String)>> {
    conn.prepare_cached(&format!(
        "SELECT {USER_COLUMNS}, password_hash FROM users
         WHERE username_key = ?1 AND bot_owner IS NULL AND deleted_at IS NULL"
    ))?
    .query_row([crate::username::fold(username)], |r| {
        Ok((user_row(r)?, r.get("password_hash")?))
    })
    .optional()
}

pub(super) fn session_user(
    conn: &Connection,
    token: &[u8],
    now: i64,
) -> rusqlite::Result<Option<crate::store::SessionAuth>> {
    conn.prepare_cached(
        "SELECT u.id, u.username, u.created_at, s.expires_at, s.last_used_at, u.display_name, u.about,
                u.bot_owner, u.deleted_at IS NOT NULL AS deleted
         FROM sessions s JOIN users u ON u.id = s.user_id
         WHERE s.token_hash = ?1 AND s.expires_at > ?2 AND u.deleted_at IS NULL",
    )?
    .query_row(params![token, now], |r| {
        Ok(crate::store::SessionAuth {
            user: user_row(r)?,
            expires_at: r.get(3)?,
            last_used_at: r.get(4)?,
        })
    })
    .optional()
}

pub(super) fn sessions(
    conn: &Connection,
    user_id: i64,
    now: i64,
) -> rusqlite::Result<Vec<crate::store::SessionInfo>> {
    conn.prepare_cached(
        "SELECT id, created_at, last_used_at, expires_at, address, agent FROM sessions
         WHERE user_id = ?1 AND expires_at > ?2 ORDER BY created_at DESC, id",
    )?
    .query_map(params![user_id, now], |r| {
        Ok(crate::store::SessionInfo {
            id: r.get(0)?,
            created_at: r.get(1)?,
            last_used_at: r.get(2)?,
            expires_at: r.get(3)?,
            address: r.get(4)?,
            agent: r.get(5)?,
        })
    })?
    .collect()
}

/// The bots `owner` made, oldest first.
pub(super) fn bots(conn: &Connection, owner: i64) -> rusqlite::Result<Vec<User>> {
    conn.prepare_cached(&format!(
        "SELECT {USER_COLUMNS} FROM users WHERE bot_owner = ?1 ORDER BY created_at, id"
    ))?
    .query_map([owner], user_row)?
    .collect()
}

const KEY_COLUMNS: &str =
    "k.id, k.user_id, k.name, k.scopes, k.created_at, k.expires_at, k.last_used_at";

fn key_row(r: &Row) -> rusqlite::Result<crate::store::ApiKeyInfo> {
    Ok(crate::store::ApiKeyInfo {
        id: r.get(0)?,
        user_id: r.get(1)?,
        name: r.get(2)?,
        scopes: r.get(3)?,
        created_at: r.get(4)?,
        expires_at: r.get(5)?,
        last_used_at: r.get(6)?,
    })
}

/// The API keys `owner` holds, newest first.
pub(super) fn api_keys(
    conn: &Connection,
    owner: i64,
) -> rusqlite::Result<Vec<crate::store::ApiKeyInfo>> {
    conn.prepare_cached(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.owner_id = ?1
         ORDER BY k.created_at DESC, k.id"
    ))?
    .query_map([owner], key_row)?
    .collect()
}

/// The account behind an unexpired API key, and the key.
pub(super) fn key_user(
    conn: &Connection,
    token: &[u8],
    now: i64,
) -> rusqlite::Result<Option<crate::store::KeyAuth>> {
    conn.prepare_cached(&format!(
        "SELECT {KEY_COLUMNS}, u.id AS uid, u.username, u.created_at AS ucreated,
                u.display_name, u.about, u.bot_owner
         FROM api_keys k JOIN users u ON u.id = k.user_id
         WHERE k.token_hash = ?1 AND (k.expires_at IS NULL OR k.expires_at > ?2)
           AND u.deleted_at IS NULL"
    ))?
    .query_row(params![token, now], |r| {
        Ok(crate::store::KeyAuth {
            key: key_row(r)?,
            user: User {
                id: r.get("uid")?,
                username: r.get("username")?,
                created_at: r.get("ucreated")?,
                display_name: r.get("display_name")?,
                about: r.get("about")?,
                bot_owner: r.get("bot_owner")?,
                deleted: false,
            },
        })
    })
    .optional()
}

pub(crate) const SUBSCRIPTION_COLUMNS: &str = "id, channel_id, creator_id, url, secret, types, \
     cursor, status, delivered, last_error, failing_since, failures, next_try_at, created_at";

pub(crate) fn subscription_row(r: &Row) -> rusqlite::Result<crate::store::Subscription> {
    let status: String = r.get(7)?;
    Ok(crate::store::Subscription {
        id: r.get(0)?,
        channel_id: r.get(1)?,
        creator_id: r.get(2)?,
        url: r.get(3)?,
        secret: r.get(4)?,
        types: r.get(5)?,
        cursor: r.get(6)?,
        status: crate::store::SubscriptionStatus::parse(&status)
            .ok_or_else(|| corrupt("subscription status", &status))?,
        delivered: r.get(8)?,
        last_error: r.get(9)?,
        failing_since: r.get(10)?,
        failures: r.get(11)?,
        next_try_at: r.get(12)?,
        created_at: r.get(13)?,
    })
}

/// The channel's subscriptions, oldest first.
pub(super) fn subscriptions(
    conn: &Connection,
    channel_id: i64,
) -> rusqlite::Result<Vec<crate::store::Subscription>> {
    conn.prepare_cached(&format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE channel_id = ?1 ORDER BY id"
    ))?
    .query_map([channel_id], subscription_row)?
    .collect()
}

/// Active subscriptions with no backoff pending and no other node's lease at `now`.
pub(super) fn due_subscriptions(
    conn: &Connection,
    node: &str,
    now: i64,
    after: i64,
    limit: u32,
) -> rusqlite::Result<Vec<crate::store::Subscription>> {
    conn.prepare_cached(&format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions
         WHERE id > ?4 AND status = 'active' AND next_try_at <= ?1
           AND (lease_until <= ?1 OR lease_node = ?3)
         ORDER BY id LIMIT ?2"
    ))?
    .query_map(params![now, limit, node, after], subscription_row)?
    .collect()
}

const WEBHOOK_COLUMNS: &str = "id, channel_id, bot_id, creator_id, name, created_at";

fn webhook_row(r: &Row) -> rusqlite::Result<crate::store::IncomingWebhook> {
    Ok(crate::store::IncomingWebhook {
        id: r.get(0)?,
        channel_id: r.get(1)?,
        bot_id: r.get(2)?,
        creator_id: r.get(3)?,
        name: r.get(4)?,
        created_at: r.get(5)?,
    })
}

/// The channel's incoming webhooks, oldest first.
pub(super) fn incoming_webhooks(
    conn: &Connection,
    channel_id: i64,
) -> rusqlite::Result<Vec<crate::store::IncomingWebhook>> {
    conn.prepare_cached(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM incoming_webhooks WHERE channel_id = ?1
         ORDER BY created_at, id"
    ))?
    .query_map([channel_id], webhook_row)?
    .collect()
}

/// The channel's webhook with this secret's digest.
pub(super) fn incoming_webhook(
    conn: &Connection,
    channel_id: i64,
    token: &[u8],
) -> rusqlite::Result<Option<crate::store::IncomingWebhook>> {
    conn.prepare_cached(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM incoming_webhooks WHERE token_hash = ?1 AND channel_id = ?2"
    ))?
    .query_row(params![token, channel_id], webhook_row)
    .optional()
}

pub(super) fn channel(conn: &Connection, id: i64) -> rusqlite::Result<Option<Channel>> {
    conn.prepare_cached(&format!(
        "SELECT {CHANNEL_COLUMNS} FROM channels c WHERE c.id = ?1"
    ))?
    .query_row([id], channel_row)
    .optional()
}

/// Runs `read` in one read transaction, with how far the commit log was folded in the
/// snapshot it read: the channel and member counters it read count the posts up to
/// there ([`tail::TailView`]).
fn with_folded<T>(
    conn: &Connection,
    read: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<(T, i64)> {
    let tx = conn.unchecked_transaction()?;
    let folded = tail::folded_through(&tx)?;
    let out = read(&tx)?;
    tx.commit()?;
    Ok((out, folded))
}

/// `(id, last_seq)` of the existing channels among `ids`.
pub(super) fn last_seqs(
    conn: &Connection,
    tail: &Tail,
    ids: &[i64],
) -> rusqlite::Result<Vec<(i64, i64)>> {
    let rows = |c: &Connection| {
        let mut stmt = c.prepare_cached("SELECT last_seq FROM channels WHERE id = ?1")?;
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            if let Some(last) = stmt.query_row([id], |r| r.get(0)).optional()? {
                out.push((id, last));
            }
        }
        Ok(out)
    };
    tail.read_with(
        || with_folded(conn, rows),
        |lasts| lasts.iter().map(|(id, _)| *id).collect(),
        |mut lasts: Vec<(i64, i64)>, view| {
            for (id, last) in &mut lasts {
                *last = view.last_seq(*id, *last);
            }
            lasts
        },
    )
}

/// The channel and the user's role in it, if they are a member, with its `last_seq`.
pub(super) fn member_channel_now(
    conn: &Connection,
    tail: &Tail,
    channel_id: i64,
    user_id: i64,
) -> rusqlite::Result<Option<(Channel, Role)>> {
    tail.read_with(
        || with_folded(conn, |c| member_channel(c, channel_id, user_id)),
        |_| vec![channel_id],
        |found, view| {
            found.map(|(mut ch, role)| {
                ch.last_seq = view.last_seq(ch.id, ch.last_seq);
                (ch, role)
            })
        },
    )
}

pub(super) fn member_channel(
    conn: &Connection,
    channel_id: i64,
    user_id: i64,
) -> rusqlite::Result<Option<(Channel, Role)>> {
    conn.prepare_cached(&format!(
        "SELECT {CHANNEL_COLUMNS}, m.role FROM members m JOIN channels c ON c.id = m.channel_id
         WHERE m.channel_id = ?1 AND m.user_id = ?2"
    ))?
    .query_row([channel_id, user_id], |r| {
        Ok((channel_row(r)?, parse_role(&r.get::<_, String>(6)?)?))
    })
    .optional()
}

/// The user's channels with their read markers and unread counts.
pub(super) fn channels(
    conn: &Connection,
    tail: &Tail,
    user_id: i64,
) -> rusqlite::Result<Vec<ChannelView>> {
    tail.read_with(
        || with_folded(conn, |c| channel_rows(c, user_id)),
        |views| views.iter().map(|v| v.channel.id).collect(),
        |mut views: Vec<ChannelView>, tail| {
            for v in &mut views {
                let id = v.channel.id;
                v.channel.last_seq = tail.last_seq(id, v.channel.last_seq);
                // The rows count posts once they are folded; the newer ones are here.
                let (posts, own) = tail.uncounted(id, user_id);
                v.unread += posts - own;
            }
            views
        },
    )
}

fn channel_rows(conn: &Connection, user_id: i64) -> rusqlite::Result<Vec<ChannelView>> {
    conn.prepare_cached(&format!(
        "SELECT {CHANNEL_COLUMNS}, m.role, m.read_seq, c.live_messages - m.live_read - m.own_unread,
                m.mention_unread
         FROM members m JOIN channels c ON c.id = m.channel_id
         WHERE m.user_id = ?1 ORDER BY c.id"
    ))?
    .query_map([user_id], |r| {
        Ok(ChannelView {
            channel: channel_row(r)?,
            role: parse_role(&r.get::<_, String>(6)?)?,
            read_seq: r.get(7)?,
            unread: r.get(8)?,
            mentions: r.get(9)?,
        })
    })?
    .collect()
}

pub(super) fn members(conn: &Connection, channel_id: i64) -> rusqlite::Result<Vec<Member>> {
    conn.prepare_cached(
        "SELECT u.id, u.username, u.created_at, m.role, u.display_name, u.about, u.bot_owner,
                u.deleted_at IS NOT NULL AS deleted
         FROM members m JOIN users u ON u.id = m.user_id
         WHERE m.channel_id = ?1 ORDER BY u.id",
    )?
    .query_map([channel_id], |r| {
        Ok(Member {
            user: user_row(r)?,
            role: parse_role(&r.get::<_, String>(3)?)?,
        })
    })?
    .collect()
}

/// The reactions to each of `ids` that is a message of the channel, as `viewer` sees them.
/// (A message with reactions is folded: a reaction folds its channel's posts first.)
pub(super) fn reactions(
    conn: &Connection,
    viewer: i64,
    channel_id: i64,
    ids: &[i64],
) -> rusqlite::Result<Vec<(i64, Vec<ReactionCount>)>> {
    // One statement per message, so each message's counts and `me` are one snapshot.
    let mut counts = conn.prepare_cached(
        "SELECT rc.emoji, rc.count, EXISTS (SELECT 1 FROM reactions r
                 WHERE r.message_id = rc.message_id AND r.user_id = ?3 AND r.emoji = rc.emoji)
         FROM reaction_counts rc JOIN messages m ON m.id = rc.message_id
         WHERE rc.message_id = ?1 AND m.channel_id = ?2 ORDER BY rc.first_seq",
    )?;
    let mut out = Vec::new();
    for &id in ids {
        let list = counts
            .query_map(params![id, channel_id, viewer], |r| {
                Ok(ReactionCount {
                    emoji: r.get(0)?,
                    count: r.get(1)?,
                    me: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        if !list.is_empty() {
            out.push((id, list));
        }
    }
    Ok(out)
}

/// Who reacted to a message of the channel with `emoji`, in the order they did.
pub(super) fn reactors(
    conn: &Connection,
    channel_id: i64,
    message_id: i64,
    emoji: &str,
    after: Option<i64>,
    limit: u32,
) -> rusqlite::Result<Page<Reactor>> {
    let mut items = conn
        .prepare_cached(
            "SELECT u.id, u.username, u.created_at, r.at, r.seq, u.display_name, u.about,
                    u.bot_owner, u.deleted_at IS NOT NULL AS deleted
             FROM reactions r JOIN users u ON u.id = r.user_id
             WHERE r.message_id = ?1 AND r.emoji = ?2 AND r.channel_id = ?3 AND r.seq > ?4
             ORDER BY r.seq LIMIT ?5",
        )?
        .query_map(
            params![
                message_id,
                emoji,
                channel_id,
                after.unwrap_or(0),
                i64::from(limit) + 1
            ],
            |r| {
                Ok(Reactor {
                    user: user_row(r)?,
                    at: r.get(3)?,
                    seq: r.get(4)?,
                })
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let has_more = items.len() > limit as usize;
    items.truncate(limit as usize);
    Ok(Page { items, has_more })
}

const THREAD_AFTER: &str = concat!(
    message_select!(),
    "FROM messages m WHERE m.thread_root_id = ?1 AND m.channel_id = ?2 AND m.seq > ?3 AND m.seq < ?4
     ORDER BY m.seq ASC LIMIT ?5"
);
const THREAD_BEFORE: &str = concat!(
    message_select!(),
    "FROM messages m WHERE m.thread_root_id = ?1 AND m.channel_id = ?2 AND m.seq < ?3
     ORDER BY m.seq DESC LIMIT ?4"
);

/// A page of a thread's replies, paged as [`messages`]. Replies are never in the commit
/// log (a reply is written straight to the tables).
pub(super) fn thread(
    conn: &Connection,
    channel_id: i64,
    root_id: i64,
    q: HistoryQuery,
) -> rusqlite::Result<Page<Message>> {
    let before = q.before_seq.unwrap_or(i64::MAX);
    let fetch = q.limit as i64 + 1;
    let mut items = match q.after_seq {
        Some(after) => conn
            .prepare_cached(THREAD_AFTER)?
            .query_map(
                params![root_id, channel_id, after, before, fetch],
                message_row,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?,
        None => {
            let mut newest = conn
                .prepare_cached(THREAD_BEFORE)?
                .query_map(params![root_id, channel_id, before, fetch], message_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            newest.reverse();
            newest
        }
    };
    let has_more = items.len() as i64 == fetch;
    if has_more {
        // One past the page: the newest when paging forward, the oldest otherwise.
        if q.after_seq.is_some() {
            items.pop();
        } else {
            items.remove(0);
        }
    }
    Ok(Page { items, has_more })
}

/// The messages mentioning `user_id` in channels they are in, newest first.
pub(super) fn mentions(
    conn: &Connection,
    user_id: i64,
    before: Option<i64>,
    limit: u32,
) -> rusqlite::Result<Page<Message>> {
    let mut items = conn
        .prepare_cached(concat!(
            message_select!(),
            "FROM mentions x JOIN members b ON b.channel_id = x.channel_id AND b.user_id = x.user_id
             CROSS JOIN messages m ON m.id = x.message_id
             WHERE x.user_id = ?1 AND x.message_id < ?2 ORDER BY x.message_id DESC LIMIT ?3"
        ))?
        .query_map(
            params![user_id, before.unwrap_or(i64::MAX), i64::from(limit) + 1],
            message_row,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let has_more = items.len() > limit as usize;
    items.truncate(limit as usize);
    Ok(Page { items, has_more })
}

/// A page of the live messages `author` wrote, by id, after `after`.
pub(super) fn authored(
    conn: &Connection,
    author: i64,
    after: i64,
    limit: u32,
) -> rusqlite::Result<Page<Message>> {
    let mut items = conn
        .prepare_cached(concat!(
            message_select!(),
            "FROM messages m WHERE m.author_id = ?1 AND m.id > ?2 AND m.deleted = 0
             ORDER BY m.id LIMIT ?3"
        ))?
        .query_map(params![author, after, i64::from(limit) + 1], message_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let has_more = items.len() > limit as usize;
    items.truncate(limit as usize);
    Ok(Page { items, has_more })
}

/// The channels `user_id` is a member of.
pub(super) fn member_channel_ids(conn: &Connection, user_id: i64) -> rusqlite::Result<Vec<i64>> {
    conn.prepare_cached("SELECT channel_id FROM members WHERE user_id = ?1")?
        .query_map([user_id], |r| r.get(0))?
        .collect()
}

/// A search over the index of `channels` (the caller's, their posts folded): `None` when
/// it would take longer than `budget`. The channels are a column of the index, so the
/// index intersects them with the words; nothing of another channel is read.
pub(super) fn search(
    conn: &Connection,
    q: &SearchQuery,
    channels: &[i64],
    budget: std::time::Duration,
) -> rusqlite::Result<Option<Page<Message>>> {
    let within = channels
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(" OR ");
    let expr = format!("({}) AND (ch : ({within}))", q.query.fts5("text"));
    let fetch = i64::from(q.limit) + 1;
    let deadline = std::time::Instant::now() + budget;
    conn.progress_handler(1_000, Some(move || std::time::Instant::now() >= deadline))?;
    let ids: rusqlite::Result<Vec<i64>> = match q.order {
        SearchOrder::Newest => conn
            .prepare_cached(
                "SELECT rowid FROM search.messages_fts WHERE messages_fts MATCH ?1 AND rowid < ?2
                 ORDER BY rowid DESC LIMIT ?3",
            )
            .and_then(|mut s| {
                s.query_map(params![expr, q.from.unwrap_or(i64::MAX), fetch], |r| {
                    r.get(0)
                })?
                .collect()
            }),
        SearchOrder::Relevance => conn
            .prepare_cached(
                "SELECT rowid FROM search.messages_fts WHERE messages_fts MATCH ?1
                 ORDER BY bm25(messages_fts, 1.0, 0.0), rowid DESC LIMIT ?2 OFFSET ?3",
            )
            .and_then(|mut s| {
                s.query_map(params![expr, fetch, q.from.unwrap_or(0)], |r| r.get(0))?
                    .collect()
            }),
    };
    conn.progress_handler(0, None::<fn() -> bool>)?;
    let mut ids = match ids {
        Ok(ids) => ids,
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let has_more = ids.len() as i64 == fetch;
    ids.truncate(q.limit as usize);
    let mut by_id = conn.prepare_cached(concat!(
        message_select!(),
        "FROM messages m WHERE m.id = ?1"
    ))?;
    let mut items = Vec::with_capacity(ids.len());
    for id in ids {
        // The index holds live messages of these channels only; checked again all the same.
        if let Some(m) = by_id.query_row([id], message_row).optional()?
            && !m.deleted
            && channels.contains(&m.channel_id)
        {
            items.push(m);
        }
    }
    Ok(Some(Page { items, has_more }))
}

/// A message of the channel by id: from the tables, or the commit log's tail (taken
/// first: a fold in between shows it in both, never in neither).
pub(super) fn message(
    conn: &Connection,
    tail: &Tail,
    channel_id: i64,
    message_id: i64,
) -> rusqlite::Result<Option<Message>> {
    let unfolded = tail.find(channel_id, message_id);
    let folded = conn
        .prepare_cached(MESSAGE_BY_ID)?
        .query_row(params![message_id, channel_id], message_row)
        .optional()?;
    Ok(folded.or(unfolded))
}

/// A page of the channel's messages: the folded ones from the tables, the newest from the
/// commit log's tail (taken first: see [`super::tail`]).
pub(super) fn messages(
    conn: &Connection,
    tail: &Tail,
    channel_id: i64,
    q: HistoryQuery,
) -> rusqlite::Result<Page<Message>> {
    let before = q.before_seq.unwrap_or(i64::MAX);
    let fetch = q.limit as usize + 1;
    let mut items: Vec<Message> = match q.after_seq {
        Some(after) => {
            let unfolded = tail.range(channel_id, after, before, fetch, false);
            let folded = conn
                .prepare_cached(HISTORY_AFTER)?
                .query_map(
                    params![channel_id, after, before, fetch as i64],
                    message_row,
                )?
                .collect::<rusqlite::Result<_>>()?;
            merge_after(folded, unfolded, fetch, |m| m.seq)
        }
        None => {
            // The newest first: from the tail, then older ones from the tables.
            let unfolded = tail.range(channel_id, i64::MIN, before, fetch, true);
            let below = unfolded.first().map_or(before, |m| m.seq);
            let mut items: Vec<Message> = if unfolded.len() < fetch {
                conn.prepare_cached(HISTORY_BEFORE)?
                    .query_map(
                        params![channel_id, below, (fetch - unfolded.len()) as i64],
                        message_row,
                    )?
                    .collect::<rusqlite::Result<_>>()?
            } else {
                Vec::new()
            };
            items.reverse();
            items.extend(unfolded);
            // Ascending; the oldest one is past the page.
            if items.len() == fetch {
                items.remove(0);
                return Ok(Page {
                    items,
                    has_more: true,
                });
            }
            items
        }
    };
    let has_more = items.len() == fetch;
    items.truncate(q.limit as usize);
    Ok(Page { items, has_more })
}

/// The channel's events after `after_seq`: the folded ones from the tables, then the
/// commit log's tail (taken first: see [`super::tail`]).
pub(super) fn events(
    conn: &Connection,
    tail: &Tail,
    channel_id: i64,
    after_seq: i64,
    limit: u32,
) -> rusqlite::Result<Page<Event>> {
    let fetch = limit as usize + 1;
    let unfolded = tail.range(channel_id, after_seq, i64::MAX, fetch, false);
    let mut stmt = conn.prepare_cached(
        "SELECT e.seq, e.kind, e.at, e.user_id, e.body,
                m.id, m.author_id, m.client_id, m.created_at, m.edited_at, m.deleted, m.seq, m.text,
                m.thread_root_id, m.reply_count, m.last_reply_at, e.message_id, e.mentions, m.files
         FROM events e LEFT JOIN messages m ON m.id = e.message_id
         WHERE e.channel_id = ?1 AND e.seq > ?2 ORDER BY e.seq ASC LIMIT ?3",
    )?;
    let folded = stmt
        .query_map(params![channel_id, after_seq, fetch as i64], |r| {
            event_row(channel_id, r)
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let unfolded = unfolded.into_iter().map(tail::event).collect();
    let mut items = merge_after(folded, unfolded, fetch, |e| e.seq);
    let has_more = items.len() == fetch;
    items.truncate(limit as usize);
    Ok(Page { items, has_more })
}

/// Rebuilds an event from its log row. A message event carries the message as of that
/// event: its own text snapshot, or (body NULL) the message row's text when it is the
/// latest version. Once the message is deleted, every one of its events shows it
/// deleted, text redacted.
fn event_row(channel_id: i64, r: &Row) -> rusqlite::Result<Event> {
    let seq: i64 = r.get(0)?;
    let kind: String = r.get(1)?;
    let at: i64 = r.get(2)?;
    let body: Option<String> = r.get(4)?;
    let message = |edited_at: Option<i64>| -> rusqlite::Result<Message> {
        let deleted: bool = r.get(10)?;
        Ok(Message {
            id: r.get(5)?,
            channel_id,
            seq: r.get(11)?,
            author_id: r.get(6)?,
            text: match (&body, deleted) {
                (_, true) => String::new(),
                (Some(snapshot), false) => snapshot.clone(),
                (None, false) => r.get(12)?,
            },
            client_id: r.get(7)?,
            created_at: r.get(8)?,
            edited_at,
            deleted,
            thread_root_id: r.get(13)?,
            reply_count: r.get(14)?,
            last_reply_at: r.get(15)?,
            mentions: parse_ids(r.get(17)?),
            attachments: crate::store::decode_attachments(
                r.get::<_, Option<String>>(18)?.as_deref(),
            ),
        })
    };
    let role = || parse_role(body.as_deref().unwrap_or_default());
    let body = match kind.as_str() {
        "message.created" => EventBody::MessageCreated(message(None)?),
        "message.edited" => EventBody::MessageEdited(message(Some(at))?),
        "message.deleted" => EventBody::MessageDeleted(message(r.get(9)?)?),
        "member.added" => EventBody::MemberAdded {
            user_id: r.get(3)?,
            role: role()?,
        },
        "member.updated" => EventBody::MemberUpdated {
            user_id: r.get(3)?,
            role: role()?,
        },
        "member.removed" => EventBody::MemberRemoved { user_id: r.get(3)? },
        "channel.updated" => EventBody::ChannelUpdated { name: body.clone() },
        "reaction.added" => EventBody::ReactionAdded {
            message_id: r.get(16)?,
            user_id: r.get(3)?,
            emoji: body.clone().unwrap_or_default(),
        },
        "reaction.removed" => EventBody::ReactionRemoved {
            message_id: r.get(16)?,
            user_id: r.get(3)?,
            emoji: body.clone().unwrap_or_default(),
        },
        other => return Err(corrupt("event kind", other)),
    };
    Ok(Event {
        channel_id,
        seq,
        at,
        body,
    })
}
