//! Row mapping and the read queries, shared by the read pools and the writers' transactions
//! (anything that derefs to a `tokio_postgres` client or transaction: `GenericClient`).

use tokio_postgres::{GenericClient, Row};

use crate::model::{
    Channel, ChannelKind, ChannelView, Event, EventBody, HistoryQuery, Member, Message, Page,
    ReactionCount, Role, User,
};
use crate::store::{SearchOrder, SearchQuery, SessionAuth, SessionInfo, StoreError};

use super::Fail;

fn corrupt(what: &str, value: &str) -> Fail {
    Fail::Store(StoreError::internal(
        "read a row",
        format!("corrupt {what} {value:?}"),
    ))
}

pub(super) fn parse_kind(s: &str) -> Result<ChannelKind, Fail> {
    ChannelKind::parse(s).ok_or_else(|| corrupt("channel kind", s))
}

pub(super) fn parse_role(s: &str) -> Result<Role, Fail> {
    Role::parse(s).ok_or_else(|| corrupt("role", s))
}

pub(super) const USER_COLUMNS: &str =
    "id, username, created_at, display_name, about, bot_owner, deleted_at IS NOT NULL AS deleted";

/// A user from the first three columns, and the profile's by name (every query that
/// reads a user selects `display_name` and `about` too).
pub(super) fn user_row(r: &Row) -> User {
    User {
        id: r.get(0),
        username: r.get(1),
        created_at: r.get(2),
        display_name: r.get("display_name"),
        about: r.get("about"),
        bot_owner: r.get("bot_owner"),
        deleted: r.get("deleted"),
    }
}

pub(super) const CHANNEL_COLUMNS: &str =
    "c.id, c.kind, c.name, c.owner_id, c.last_seq, c.created_at";

pub(super) fn channel_row(r: &Row) -> Result<Channel, Fail> {
    Ok(Channel {
        id: r.get(0),
        kind: parse_kind(r.get(1))?,
        name: r.get(2),
        owner_id: r.get(3),
        last_seq: r.get(4),
        created_at: r.get(5),
    })
}

/// The columns [`message_row`] reads, of `messages m`.
macro_rules! message_select {
    () => {
        "SELECT m.id, m.channel_id, m.seq, m.author_id, m.text, m.client_id, m.created_at, \
         m.edited_at, m.deleted, m.thread_root_id, m.reply_count, m.last_reply_at, m.mentions, m.files "
    };
}
pub(super) use message_select;

pub(super) const MESSAGE_BY_ID: &str = concat!(
    message_select!(),
    "FROM messages m WHERE m.id = $1 AND m.channel_id = $2"
);

pub(super) fn message_row(r: &Row) -> Message {
    Message {
        id: r.get(0),
        channel_id: r.get(1),
        seq: r.get(2),
        author_id: r.get(3),
        text: r.get(4),
        client_id: r.get(5),
        created_at: r.get(6),
        edited_at: r.get(7),
        deleted: r.get(8),
        thread_root_id: r.get(9),
        reply_count: r.get(10),
        last_reply_at: r.get(11),
        mentions: r.get::<_, Option<Vec<i64>>>(12).unwrap_or_default(),
        attachments: crate::store::decode_attachments(r.get(13)),
    }
}

/// The columns [`upload_row`] reads, of `uploads`.
pub(super) const UPLOAD_COLUMNS: &str =
    "id, owner_id, sha256, size, content_type, name, width, height, thumb_sha256, created_at";

pub(super) fn upload_row(r: &Row) -> crate::model::Upload {
    crate::model::Upload {
        id: r.get(0),
        owner_id: r.get(1),
        sha256: r.get(2),
        size: r.get(3),
        content_type: r.get(4),
        name: r.get(5),
        width: r.get(6),
        height: r.get(7),
        thumb_sha256: r.get(8),
        created_at: r.get(9),
    }
}

pub(super) async fn user(c: &impl GenericClient, id: i64) -> Result<Option<User>, Fail> {
    let row = c
        .query_opt(
            &format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"),
            &[&id],
        )
        .await?;
    Ok(row.as_ref().map(user_row))
}

pub(super) async fn users(c: &impl GenericClient, ids: &[i64]) -> Result<Vec<User>, Fail> {
    let rows = c
        .query(
            &format!("SELECT {USER_COLUMNS} FROM users WHERE id = ANY($1)"),
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(user_row).collect())
}

pub(super) async fn user_by_key(c: &impl GenericClient, key: &str) -> Result<Option<User>, Fail> {
    let row = c
        .query_opt(
            &format!(
                "SELECT {USER_COLUMNS} FROM users WHERE username_key = $1 AND deleted_at IS NULL"
            ),
            &[&key],
        )
        .await?;
    Ok(row.as_ref().map(user_row))
}

pub(super) async fn credentials(
    c: &impl GenericClient,
    key: &str,
) -> Result<Option<(User, String)>, Fail> {
    let row = c
        .query_opt(
            &format!(
                "SELECT {USER_COLUMNS}, password_hash FROM users
                 WHERE username_key = $1 AND bot_owner IS NULL AND deleted_at IS NULL"
            ),
            &[&key],
        )
        .await?;
    Ok(row.map(|r| (user_row(&r), r.get("password_hash"))))
}

pub(super) const SUBSCRIPTION_COLUMNS: &str = "id, channel_id, creator_id, url, secret, types, \
     cursor, status, delivered, last_error, failing_since, failures, next_try_at, created_at";

pub(super) fn subscription_row(r: &Row) -> Result<crate::store::Subscription, Fail> {
    let status: String = r.get(7);
    Ok(crate::store::Subscription {
        id: r.get(0),
        channel_id: r.get(1),
        creator_id: r.get(2),
        url: r.get(3),
        secret: r.get(4),
        types: r.get(5),
        cursor: r.get(6),
        status: crate::store::SubscriptionStatus::parse(&status).ok_or_else(|| {
            Fail::Store(StoreError::internal(
                "read subscription",
                format!("unknown status {status:?}"),
            ))
        })?,
        delivered: r.get(8),
        last_error: r.get(9),
        failing_since: r.get(10),
        failures: r.get(11),
        next_try_at: r.get(12),
        created_at: r.get(13),
    })
}

pub(super) const WEBHOOK_COLUMNS: &str = "id, channel_id, bot_id, creator_id, name, created_at";

pub(super) fn webhook_row(r: &Row) -> crate::store::IncomingWebhook {
    crate::store::IncomingWebhook {
        id: r.get(0),
        channel_id: r.get(1),
        bot_id: r.get(2),
        creator_id: r.get(3),
        name: r.get(4),
        created_at: r.get(5),
    }
}

pub(super) const KEY_COLUMNS: &str =
    "k.id, k.user_id, k.name, k.scopes, k.created_at, k.expires_at, k.last_used_at";

pub(super) fn key_row(r: &Row) -> crate::store::ApiKeyInfo {
    crate::store::ApiKeyInfo {
        id: r.get(0),
        user_id: r.get(1),
        name: r.get(2),
        scopes: r.get(3),
        created_at: r.get(4),
        expires_at: r.get(5),
        last_used_at: r.get(6),
    }
}

/// The account behind an unexpired API key, and the key.
pub(super) async fn key_user(
    c: &impl GenericClient,
    token: &[u8],
    now: i64,
) -> Result<Option<crate::store::KeyAuth>, Fail> {
    let row = c
        .query_opt(
            &format!(
                "SELECT {KEY_COLUMNS}, u.id AS uid, u.username, u.created_at AS ucreated,
                        u.display_name, u.about, u.bot_owner
                 FROM api_keys k JOIN users u ON u.id = k.user_id
                 WHERE k.token_hash = $1 AND (k.expires_at IS NULL OR k.expires_at > $2)
                   AND u.deleted_at IS NULL"
            ),
            &[&token, &now],
        )
        .await?;
    Ok(row.map(|r| crate::store::KeyAuth {
        key: key_row(&r),
        user: User {
            id: r.get("uid"),
            username: r.get("username"),
            created_at: r.get("ucreated"),
            display_name: r.get("display_name"),
            about: r.get("about"),
            bot_owner: r.get("bot_owner"),
            deleted: false,
        },
    }))
}

pub(super) async fn session_user(
    c: &impl GenericClient,
    token: &[u8],
    now: i64,
) -> Result<Option<SessionAuth>, Fail> {
    let row = c
        .query_opt(
            "SELECT u.id, u.username, u.created_at, s.expires_at, s.last_used_at, u.display_name, u.about,
                    u.bot_owner, u.deleted_at IS NOT NULL AS deleted
             FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.token_hash = $1 AND s.expires_at > $2 AND u.deleted_at IS NULL",
            &[&token, &now],
        )
        .await?;
    Ok(row.map(|r| SessionAuth {
        user: user_row(&r),
        expires_at: r.get(3),
        last_used_at: r.get(4),
    }))
}

pub(super) async fn sessions(
    c: &impl GenericClient,
    user_id: i64,
    now: i64,
) -> Result<Vec<SessionInfo>, Fail> {
    let rows = c
        .query(
            "SELECT id, created_at, last_used_at, expires_at, address, agent FROM sessions
             WHERE user_id = $1 AND expires_at > $2 ORDER BY created_at DESC, id",
            &[&user_id, &now],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| SessionInfo {
            id: r.get(0),
            created_at: r.get(1),
            last_used_at: r.get(2),
            expires_at: r.get(3),
            address: r.get(4),
            agent: r.get(5),
        })
        .collect())
}

pub(super) async fn channel(c: &impl GenericClient, id: i64) -> Result<Option<Channel>, Fail> {
    let row = c
        .query_opt(
            &format!("SELECT {CHANNEL_COLUMNS} FROM channels c WHERE c.id = $1"),
            &[&id],
        )
        .await?;
    row.as_ref().map(channel_row).transpose()
}

/// [`member_channel`] and the primary's WAL position after it (bytes).
pub(super) async fn member_channel_at(
    c: &impl GenericClient,
    channel_id: i64,
    user_id: i64,
) -> Result<Option<(Channel, Role, u64)>, Fail> {
    let row = c
        .query_opt(
            &format!(
                "SELECT {CHANNEL_COLUMNS}, m.role,
                        (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint
                 FROM members m JOIN channels c ON c.id = m.channel_id
                 WHERE m.channel_id = $1 AND m.user_id = $2"
            ),
            &[&channel_id, &user_id],
        )
        .await?;
    row.map(|r| {
        Ok((
            channel_row(&r)?,
            parse_role(r.get(6))?,
            r.get::<_, i64>(7).max(0) as u64,
        ))
    })
    .transpose()
}

/// `(id, last_seq)` of the existing channels among `ids`.
pub(super) async fn last_seqs(
    c: &impl GenericClient,
    ids: &[i64],
) -> Result<Vec<(i64, i64)>, Fail> {
    let rows = c
        .query(
            "SELECT id, last_seq FROM channels WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

pub(super) async fn member_channel(
    c: &impl GenericClient,
    channel_id: i64,
    user_id: i64,
) -> Result<Option<(Channel, Role)>, Fail> {
    let row = c
        .query_opt(
            &format!(
                "SELECT {CHANNEL_COLUMNS}, m.role FROM members m JOIN channels c ON c.id = m.channel_id
                 WHERE m.channel_id = $1 AND m.user_id = $2"
            ),
            &[&channel_id, &user_id],
        )
        .await?;
    row.map(|r| Ok((channel_row(&r)?, parse_role(r.get(6))?)))
        .transpose()
}

/// The user's channels among `ids` on one shard (re-checked against the membership rows,
/// which are the truth; the index on shard 0 may lag).
pub(super) async fn channels_among(
    c: &impl GenericClient,
    user_id: i64,
    ids: &[i64],
) -> Result<Vec<ChannelView>, Fail> {
    let rows = c
        .query(
            &format!(
                "SELECT {CHANNEL_COLUMNS}, m.role, m.read_seq, c.live_messages - m.live_read - m.own_unread,
                        m.mention_unread
                 FROM members m JOIN channels c ON c.id = m.channel_id
                 WHERE m.user_id = $1 AND m.channel_id = ANY($2)"
            ),
            &[&user_id, &ids],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(ChannelView {
                channel: channel_row(r)?,
                role: parse_role(r.get(6))?,
                read_seq: r.get(7),
                unread: r.get(8),
                mentions: r.get(9),
            })
        })
        .collect()
}

/// A channel's member rows, by user id.
pub(super) async fn member_roles(
    c: &impl GenericClient,
    channel_id: i64,
) -> Result<Vec<(i64, Role)>, Fail> {
    let rows = c
        .query(
            "SELECT user_id, role FROM members WHERE channel_id = $1 ORDER BY user_id",
            &[&channel_id],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.get(0), parse_role(r.get(1))?)))
        .collect()
}

/// Joins member roles with their users (read from shard 0), by user id.
pub(super) fn members(roles: Vec<(i64, Role)>, users: Vec<User>) -> Vec<Member> {
    let by_id: std::collections::HashMap<i64, User> =
        users.into_iter().map(|u| (u.id, u)).collect();
    roles
        .into_iter()
        .filter_map(|(id, role)| {
            by_id.get(&id).map(|u| Member {
                user: u.clone(),
                role,
            })
        })
        .collect()
}

const HISTORY_AFTER: &str = concat!(
    message_select!(),
    "FROM events e JOIN messages m ON m.id = e.message_id
     WHERE e.channel_id = $1 AND e.kind = 'message.created' AND e.seq > $2 AND e.seq < $3
     ORDER BY e.seq ASC LIMIT $4"
);
const HISTORY_BEFORE: &str = concat!(
    message_select!(),
    "FROM events e JOIN messages m ON m.id = e.message_id
     WHERE e.channel_id = $1 AND e.kind = 'message.created' AND e.seq < $2
     ORDER BY e.seq DESC LIMIT $3"
);

const THREAD_AFTER: &str = concat!(
    message_select!(),
    "FROM messages m WHERE m.thread_root_id = $1 AND m.channel_id = $2 AND m.seq > $3 AND m.seq < $4
     ORDER BY m.seq ASC LIMIT $5"
);
const THREAD_BEFORE: &str = concat!(
    message_select!(),
    "FROM messages m WHERE m.thread_root_id = $1 AND m.channel_id = $2 AND m.seq < $3
     ORDER BY m.seq DESC LIMIT $4"
);

/// The messages on this shard mentioning `user_id` in channels they are in, newest first.
pub(super) async fn mentions(
    c: &impl GenericClient,
    user_id: i64,
    before: i64,
    limit: u32,
) -> Result<Vec<Message>, Fail> {
    let rows = c
        .query(
            concat!(
                message_select!(),
                "FROM mentions x JOIN members b ON b.channel_id = x.channel_id AND b.user_id = x.user_id
                 JOIN messages m ON m.id = x.message_id
                 WHERE x.user_id = $1 AND x.message_id < $2 ORDER BY x.message_id DESC LIMIT $3"
            ),
            &[&user_id, &before, &i64::from(limit)],
        )
        .await?;
    Ok(rows.iter().map(message_row).collect())
}

/// The live messages `author` wrote on this shard, by id, after `after`: at most `limit`.
pub(super) async fn authored(
    c: &impl GenericClient,
    author: i64,
    after: i64,
    limit: u32,
) -> Result<Vec<Message>, Fail> {
    let rows = c
        .query(
            concat!(
                message_select!(),
                "FROM messages m WHERE m.author_id = $1 AND m.id > $2 AND NOT m.deleted
                 ORDER BY m.id LIMIT $3"
            ),
            &[&author, &after, &i64::from(limit)],
        )
        .await?;
    Ok(rows.iter().map(message_row).collect())
}

/// The live messages of the shard matching `tsquery` in channels `user_id` is a member of
/// (or in `channel_id` alone), newest first from `before`, or best first: at most
/// `fetch`, each with its rank. Within the statement timeout `budget` (set for this
/// statement's transaction alone); past it, `SearchTooBroad`.
pub(super) async fn search(
    c: &mut deadpool_postgres::Object,
    user_id: i64,
    q: &SearchQuery,
    fetch: i64,
    budget_ms: u64,
) -> Result<Vec<(Message, f32)>, Fail> {
    // Each term's text goes through PostgreSQL's own parser (`phraseto_tsquery`), as the
    // text went into `words`, so both split it alike (`e-mail`, `a.example`, `3.14`). A
    // prefix is our words (letters and digits) as lexemes. A query whose positive part
    // PostgreSQL finds no lexeme in finds nothing (else `-x` alone would match the rest).
    let mut params: Vec<String> = Vec::new();
    let mut part = |t: &crate::search::Term| {
        if t.prefix {
            params.push(t.prefix_tsquery());
            format!("to_tsquery('simple', ${})", params.len() + 4)
        } else {
            params.push(t.text.clone());
            format!("phraseto_tsquery('simple', ${})", params.len() + 4)
        }
    };
    let mut positive = Vec::new();
    let mut negative = Vec::new();
    for t in q.query.terms() {
        if t.negated {
            negative.push(format!("!!{}", part(t)));
        } else {
            positive.push(part(t));
        }
    }
    let positive = positive.join(" && ");
    let full = std::iter::once(format!("({positive})"))
        .chain(negative)
        .collect::<Vec<_>>()
        .join(" && ");
    let before = match q.order {
        SearchOrder::Newest => q.from.unwrap_or(i64::MAX),
        SearchOrder::Relevance => i64::MAX,
    };
    let order = match q.order {
        SearchOrder::Newest => "m.id DESC",
        SearchOrder::Relevance => "rank DESC, m.id DESC",
    };
    let sql = format!(
        concat!(
            message_select!(),
            ", ts_rank(m.words, x.q) AS rank
             FROM (SELECT {positive} AS pos, {full} AS q) x, messages m
             JOIN members b ON b.channel_id = m.channel_id AND b.user_id = $1
             WHERE numnode(x.pos) > 0 AND m.words @@ x.q AND NOT m.deleted AND m.id < $2
               AND ($3::BIGINT IS NULL OR m.channel_id = $3)
             ORDER BY {order} LIMIT $4"
        ),
        positive = positive,
        full = full,
        order = order,
    );
    let tx = c.transaction().await?;
    tx.batch_execute(&format!(
        "SET LOCAL statement_timeout = {}",
        budget_ms.max(1)
    ))
    .await?;
    let mut args: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        vec![&user_id, &before, &q.channel_id, &fetch];
    args.extend(
        params
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync)),
    );
    let rows = match tx.query(&sql, &args).await {
        Ok(rows) => rows,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
            return Err(Fail::Store(StoreError::SearchTooBroad));
        }
        Err(e) => return Err(e.into()),
    };
    tx.commit().await?;
    Ok(rows
        .iter()
        .map(|r| (message_row(r), r.get::<_, f32>(14)))
        .collect())
}

/// A page of a thread's replies, paged as [`messages`].
pub(super) async fn thread(
    c: &impl GenericClient,
    channel_id: i64,
    root_id: i64,
    q: HistoryQuery,
) -> Result<Page<Message>, Fail> {
    let before = q.before_seq.unwrap_or(i64::MAX);
    let fetch = i64::from(q.limit) + 1;
    let rows = match q.after_seq {
        Some(after) => {
            c.query(
                THREAD_AFTER,
                &[&root_id, &channel_id, &after, &before, &fetch],
            )
            .await?
        }
        None => {
            c.query(THREAD_BEFORE, &[&root_id, &channel_id, &before, &fetch])
                .await?
        }
    };
    let mut items: Vec<Message> = rows.iter().map(message_row).collect();
    let has_more = items.len() as i64 == fetch;
    items.truncate(q.limit as usize);
    if q.after_seq.is_none() {
        items.reverse();
    }
    Ok(Page { items, has_more })
}

pub(super) async fn messages(
    c: &impl GenericClient,
    channel_id: i64,
    q: HistoryQuery,
) -> Result<Page<Message>, Fail> {
    let before = q.before_seq.unwrap_or(i64::MAX);
    let fetch = i64::from(q.limit) + 1;
    let rows = match q.after_seq {
        Some(after) => {
            c.query(HISTORY_AFTER, &[&channel_id, &after, &before, &fetch])
                .await?
        }
        None => {
            c.query(HISTORY_BEFORE, &[&channel_id, &before, &fetch])
                .await?
        }
    };
    let mut items: Vec<Message> = rows.iter().map(message_row).collect();
    let has_more = items.len() as i64 == fetch;
    items.truncate(q.limit as usize);
    if q.after_seq.is_none() {
        items.reverse();
    }
    Ok(Page { items, has_more })
}

pub(super) async fn events(
    c: &impl GenericClient,
    channel_id: i64,
    after_seq: i64,
    limit: u32,
) -> Result<Page<Event>, Fail> {
    let fetch = i64::from(limit) + 1;
    let rows = c
        .query(
            "SELECT e.seq, e.kind, e.at, e.user_id, e.body,
                    m.id, m.author_id, m.client_id, m.created_at, m.edited_at, m.deleted, m.seq, m.text,
                    m.thread_root_id, m.reply_count, m.last_reply_at, e.message_id, e.mentions, m.files
             FROM events e LEFT JOIN messages m ON m.id = e.message_id
             WHERE e.channel_id = $1 AND e.seq > $2 ORDER BY e.seq ASC LIMIT $3",
            &[&channel_id, &after_seq, &fetch],
        )
        .await?;
    let mut items = rows
        .iter()
        .map(|r| event_row(channel_id, r))
        .collect::<Result<Vec<_>, _>>()?;
    let has_more = items.len() as i64 == fetch;
    items.truncate(limit as usize);
    Ok(Page { items, has_more })
}

/// Rebuilds an event from its log row, as the SQLite backend does: a message event shows
/// its own text snapshot, or (body NULL) the message row's latest text; once deleted,
/// every event of the message shows it deleted and redacted.
fn event_row(channel_id: i64, r: &Row) -> Result<Event, Fail> {
    let seq: i64 = r.get(0);
    let kind: &str = r.get(1);
    let at: i64 = r.get(2);
    let body: Option<String> = r.get(4);
    let message = |edited_at: Option<i64>| -> Message {
        let deleted: bool = r.get(10);
        Message {
            id: r.get(5),
            channel_id,
            seq: r.get(11),
            author_id: r.get(6),
            text: match (&body, deleted) {
                (_, true) => String::new(),
                (Some(snapshot), false) => snapshot.clone(),
                (None, false) => r.get(12),
            },
            client_id: r.get(7),
            created_at: r.get(8),
            edited_at,
            deleted,
            thread_root_id: r.get(13),
            reply_count: r.get(14),
            last_reply_at: r.get(15),
            mentions: r.get::<_, Option<Vec<i64>>>(17).unwrap_or_default(),
            attachments: crate::store::decode_attachments(r.get(18)),
        }
    };
    let role = || parse_role(body.as_deref().unwrap_or_default());
    let body = match kind {
        "message.created" => EventBody::MessageCreated(message(None)),
        "message.edited" => EventBody::MessageEdited(message(Some(at))),
        "message.deleted" => EventBody::MessageDeleted(message(r.get(9))),
        "member.added" => EventBody::MemberAdded {
            user_id: r.get(3),
            role: role()?,
        },
        "member.updated" => EventBody::MemberUpdated {
            user_id: r.get(3),
            role: role()?,
        },
        "member.removed" => EventBody::MemberRemoved { user_id: r.get(3) },
        "channel.updated" => EventBody::ChannelUpdated { name: body.clone() },
        "reaction.added" => EventBody::ReactionAdded {
            message_id: r.get(16),
            user_id: r.get(3),
            emoji: body.clone().unwrap_or_default(),
        },
        "reaction.removed" => EventBody::ReactionRemoved {
            message_id: r.get(16),
            user_id: r.get(3),
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

/// The reactions to each of `ids` that is a message of the channel, as `viewer` sees them.
pub(super) async fn reactions(
    c: &impl GenericClient,
    viewer: i64,
    channel_id: i64,
    ids: &[i64],
) -> Result<Vec<(i64, Vec<ReactionCount>)>, Fail> {
    let rows = c
        .query(
            "SELECT rc.message_id, rc.emoji, rc.count,
                    EXISTS (SELECT 1 FROM reactions r
                            WHERE r.message_id = rc.message_id AND r.emoji = rc.emoji AND r.user_id = $3)
             FROM reaction_counts rc JOIN messages m ON m.id = rc.message_id
             WHERE rc.message_id = ANY($1) AND m.channel_id = $2
             ORDER BY rc.message_id, rc.first_seq",
            &[&ids, &channel_id, &viewer],
        )
        .await?;
    let mut out: Vec<(i64, Vec<ReactionCount>)> = Vec::new();
    for r in &rows {
        let id: i64 = r.get(0);
        let count = ReactionCount {
            emoji: r.get(1),
            count: r.get(2),
            me: r.get(3),
        };
        match out.last_mut() {
            Some((last, list)) if *last == id => list.push(count),
            _ => out.push((id, vec![count])),
        }
    }
    Ok(out)
}

/// Who reacted to a message of the channel with `emoji` (user ids and times), in the
/// order they did; the users themselves are on shard 0.
pub(super) async fn reactor_ids(
    c: &impl GenericClient,
    channel_id: i64,
    message_id: i64,
    emoji: &str,
    after: Option<i64>,
    limit: u32,
) -> Result<(Vec<(i64, i64, i64)>, bool), Fail> {
    let rows = c
        .query(
            "SELECT user_id, at, seq FROM reactions
             WHERE message_id = $1 AND emoji = $2 AND channel_id = $3 AND seq > $4
             ORDER BY seq LIMIT $5",
            &[
                &message_id,
                &emoji,
                &channel_id,
                &after.unwrap_or(0),
                &(i64::from(limit) + 1),
            ],
        )
        .await?;
    let mut ids: Vec<(i64, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let has_more = ids.len() > limit as usize;
    ids.truncate(limit as usize);
    Ok((ids, has_more))
}
