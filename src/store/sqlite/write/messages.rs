//! Message ops other than the post (which is the writer's hot path, in `hot.rs`): edit,
//! delete and reactions.

use rusqlite::{OptionalExtension, Transaction, params};

use super::{Applied, Done, Failure, append_event, membership};
use crate::id::Snowflake;
use crate::model::{Event, EventBody, Message};
use crate::store::sqlite::hot::Hot;
use crate::store::sqlite::read;
use crate::store::{Rules, StoreError, rules};

/// The message by id within its channel, deleted or not.
pub(super) fn message(
    tx: &Transaction,
    channel_id: i64,
    message_id: i64,
) -> Result<Option<Message>, Failure> {
    Ok(tx
        .prepare_cached(read::MESSAGE_BY_ID)?
        .query_row([message_id, channel_id], read::message_row)
        .optional()?)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn edit_message(
    tx: &Transaction,
    j: &mut Vec<Event>,
    rules: &Rules,
    now: i64,
    actor: i64,
    channel_id: i64,
    message_id: i64,
    text: &str,
) -> Applied {
    membership(tx, channel_id, actor)?;
    let found = message(tx, channel_id, message_id)?;
    // Each edit keeps the text it replaces in the log, so edits are bounded per message.
    let edits: u32 = tx
        .prepare_cached(
            "SELECT count(*) FROM events WHERE message_id = ?1 AND kind = 'message.edited'",
        )?
        .query_row([message_id], |r| r.get(0))?;
    rules::edit(rules, found.as_ref(), actor, edits)?;
    let mut message = found.ok_or(StoreError::NotFound)?;
    // Mentions follow the text: those it no longer names are taken back, new ones added.
    let mentioned = resolve_mentions(tx, channel_id, text)?;
    // The event that showed the latest text (body NULL) keeps the old text as its own;
    // the new event shows the message row's text from now on.
    tx.prepare_cached(
        "UPDATE events SET body = ?3 WHERE channel_id = ?1 AND message_id = ?2 AND body IS NULL",
    )?
    .execute(params![channel_id, message_id, message.text])?;
    tx.prepare_cached(
        "UPDATE messages SET text = ?2, edited_at = ?3, mentions = ?4 WHERE id = ?1",
    )?
    .execute(params![message_id, text, now, read::join_ids(&mentioned)])?;
    let gone: Vec<i64> = message
        .mentions
        .iter()
        .copied()
        .filter(|u| !mentioned.contains(u))
        .collect();
    let (seq, author) = (message.seq, message.author_id);
    mention(tx, channel_id, seq, message_id, author, &gone, false)?;
    mention(tx, channel_id, seq, message_id, author, &mentioned, true)?;
    message.text = text.to_owned();
    message.edited_at = Some(now);
    message.mentions = mentioned;
    let seq = append_event(
        tx,
        j,
        EventBody::MessageEdited(message.clone()),
        channel_id,
        now,
        Some(message_id),
        None,
        None,
    )?;
    // The edit's event shows the mentions it made (each event, those as of it).
    tx.prepare_cached("UPDATE events SET mentions = ?3 WHERE channel_id = ?1 AND seq = ?2")?
        .execute(params![channel_id, seq, read::join_ids(&message.mentions)])?;
    Ok(Done::Message(message))
}

/// Tombstones the message and redacts its text from every event of the log.
pub(super) fn delete_message(
    tx: &Transaction,
    j: &mut Vec<Event>,
    now: i64,
    actor: i64,
    channel_id: i64,
    message_id: i64,
) -> Applied {
    let (_, role) = membership(tx, channel_id, actor)?;
    let found = message(tx, channel_id, message_id)?;
    if !rules::delete(found.as_ref(), actor, role)? {
        return Ok(Done::Unit);
    }
    let message = found.ok_or(StoreError::NotFound)?;
    tx.prepare_cached(
        "UPDATE messages SET text = '', deleted = 1, mentions = NULL, files = NULL WHERE id = ?1",
    )?
    .execute([message_id])?;
    // Its files are no longer carried by it: with no other message carrying them, they
    // are collected after their grace period.
    tx.prepare_cached("DELETE FROM message_files WHERE message_id = ?1")?
        .execute([message_id])?;
    // Its mentions are no one's any more.
    let seq = message.seq;
    mention(
        tx,
        channel_id,
        seq,
        message_id,
        message.author_id,
        &message.mentions,
        false,
    )?;
    tx.prepare_cached(
        "UPDATE events SET body = '', mentions = NULL WHERE channel_id = ?1 AND message_id = ?2 AND kind LIKE 'message.%'",
    )?
    .execute([channel_id, message_id])?;
    // Its reactions go with it; their events stay in the log (`message.deleted` follows).
    tx.prepare_cached("DELETE FROM reactions WHERE message_id = ?1")?
        .execute([message_id])?;
    tx.prepare_cached("DELETE FROM reaction_counts WHERE message_id = ?1")?
        .execute([message_id])?;
    let redacted = Message {
        text: String::new(),
        deleted: true,
        mentions: Vec::new(),
        attachments: Vec::new(),
        ..message.clone()
    };
    append_event(
        tx,
        j,
        EventBody::MessageDeleted(redacted),
        channel_id,
        now,
        Some(message_id),
        None,
        None,
    )?;
    // A reply fewer in its thread.
    if let Some(root) = message.thread_root_id {
        tx.prepare_cached("UPDATE messages SET reply_count = reply_count - 1 WHERE id = ?1")?
            .execute([root])?;
    }
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

/// A post the hot path does not take (a reply, or a text that may mention someone),
/// written straight to `messages` and `events` (its channel's posts are folded first),
/// with the unread projection kept as a post keeps it, a reply's root's counters, and
/// the mentioned members' unread mentions.
#[allow(clippy::too_many_arguments)]
pub(super) fn post_slow(
    tx: &Transaction,
    j: &mut Vec<Event>,
    hot: &mut Hot,
    ids: &mut Snowflake,
    now: i64,
    (author, channel_id, root_id): (i64, i64, Option<i64>),
    text: &str,
    client_id: Option<&str>,
    (files, attach_since): (&[i64], i64),
) -> Applied {
    let (kind, role) = membership(tx, channel_id, author)?;
    let original = match client_id {
        Some(cid) => tx
            .prepare_cached(read::MESSAGE_BY_CLIENT_ID)?
            .query_row(params![channel_id, author, cid], read::message_row)
            .optional()?,
        None => None,
    };
    if let Some(retry) = rules::post(kind, Some(role), original)? {
        return Ok(Done::Posted(retry));
    }
    if let Some(root_id) = root_id {
        rules::reply_root(message(tx, channel_id, root_id)?.as_ref())?;
    }
    let mentioned = resolve_mentions(tx, channel_id, text)?;
    let attachments = attachments(tx, author, files, attach_since)?;
    let id = ids.next_id(now);
    let seq: i64 = tx
        .prepare_cached(
            "UPDATE channels SET last_seq = last_seq + 1, live_messages = live_messages + 1
             WHERE id = ?1 RETURNING last_seq",
        )?
        .query_row([channel_id], |r| r.get(0))?;
    tx.prepare_cached(
        "INSERT INTO messages (id, channel_id, seq, author_id, text, client_id, created_at, thread_root_id, mentions, files)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        id,
        channel_id,
        seq,
        author,
        text,
        client_id,
        now,
        root_id,
        read::join_ids(&mentioned),
        crate::store::encode_attachments(&attachments)
    ])?;
    for file in files {
        tx.prepare_cached(
            "INSERT INTO message_files (upload_id, message_id, channel_id) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![file, id, channel_id])?;
    }
    tx.prepare_cached("INSERT INTO search_queue (message_id) VALUES (?1)")?
        .execute([id])?;
    tx.prepare_cached(
        "INSERT INTO events (channel_id, seq, kind, at, message_id, mentions) VALUES (?1, ?2, 'message.created', ?3, ?4, ?5)",
    )?
    .execute(params![channel_id, seq, now, id, read::join_ids(&mentioned)])?;
    if let Some(root_id) = root_id {
        tx.prepare_cached(
            "UPDATE messages SET reply_count = reply_count + 1, last_reply_at = ?2 WHERE id = ?1",
        )?
        .execute(params![root_id, now])?;
    }
    mention(tx, channel_id, seq, id, author, &mentioned, true)?;
    tx.prepare_cached(
        "UPDATE members SET own_unread = own_unread + 1 WHERE channel_id = ?1 AND user_id = ?2",
    )?
    .execute(params![channel_id, author])?;
    // As a post does: the first message of anyone but its opener answers a DM.
    tx.prepare_cached(
        "UPDATE channels SET dm_answered = 1 WHERE id = ?1 AND kind = 'dm' AND owner_id != ?2 AND dm_answered = 0",
    )?
    .execute(params![channel_id, author])?;
    if let Some(cid) = client_id {
        hot.stored_client_id(channel_id, author, cid);
    }
    let message = Message {
        id,
        channel_id,
        seq,
        author_id: author,
        text: text.to_owned(),
        client_id: client_id.map(str::to_owned),
        created_at: now,
        thread_root_id: root_id,
        mentions: mentioned,
        attachments,
        ..Message::default()
    };
    Ok(Done::Posted(crate::store::journal_post(j, message)))
}

/// The author's uploads `files` names, as the message carries them.
fn attachments(
    tx: &Transaction,
    author: i64,
    files: &[i64],
    attach_since: i64,
) -> Result<Vec<crate::model::Attachment>, Failure> {
    let mut found = Vec::with_capacity(files.len());
    for id in files.iter().take(crate::store::MAX_ATTACHMENTS + 1) {
        found.extend(
            tx.prepare_cached(read::UPLOAD_BY_ID)?
                .query_row([id], read::upload_row)
                .optional()?
                .filter(|u| u.created_at >= attach_since),
        );
    }
    Ok(crate::store::attachments_of(author, files, &found)?)
}

/// The members of the channel the text's `@name`s name, in the order named.
fn resolve_mentions(tx: &Transaction, channel_id: i64, text: &str) -> Result<Vec<i64>, Failure> {
    let mut found = Vec::new();
    for name in crate::username::mentions(text) {
        let id: Option<i64> = tx
            .prepare_cached(
                "SELECT u.id FROM users u JOIN members b ON b.user_id = u.id
                 WHERE u.username_key = ?1 AND b.channel_id = ?2",
            )?
            .query_row(params![name, channel_id], |r| r.get(0))
            .optional()?;
        found.extend(id);
    }
    Ok(found)
}

/// Adds (or with `add` false, drops) the mention rows of a message at `seq` for `users`
/// but its author, with each one's unread mentions when the message is above their read
/// marker.
fn mention(
    tx: &Transaction,
    channel_id: i64,
    seq: i64,
    message_id: i64,
    author: i64,
    users: &[i64],
    add: bool,
) -> rusqlite::Result<()> {
    for &user in users.iter().filter(|&&u| u != author) {
        let changed = if add {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO mentions (user_id, message_id, channel_id, seq) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![user, message_id, channel_id, seq])?
        } else {
            tx.prepare_cached("DELETE FROM mentions WHERE user_id = ?1 AND message_id = ?2")?
                .execute(params![user, message_id])?
        };
        if changed > 0 {
            tx.prepare_cached(
                "UPDATE members SET mention_unread = mention_unread + ?4
                 WHERE channel_id = ?1 AND user_id = ?2 AND read_seq < ?3",
            )?
            .execute(params![channel_id, user, seq, if add { 1 } else { -1 }])?;
        }
    }
    Ok(())
}

/// Adds or takes back `actor`'s `emoji` reaction, keeping `reaction_counts` in step, and
/// appends `reaction.added` or `reaction.removed`. `Changed(false)` when there was nothing
/// to do.
#[allow(clippy::too_many_arguments)]
pub(super) fn react(
    tx: &Transaction,
    j: &mut Vec<Event>,
    rules: &Rules,
    now: i64,
    actor: i64,
    channel_id: i64,
    message_id: i64,
    emoji: &str,
    add: bool,
) -> Applied {
    membership(tx, channel_id, actor)?;
    let found = message(tx, channel_id, message_id)?;
    let has = tx
        .prepare_cached(
            "SELECT 1 FROM reactions WHERE message_id = ?1 AND user_id = ?2 AND emoji = ?3",
        )?
        .exists(params![message_id, actor, emoji])?;
    let (distinct, known): (u32, bool) = tx
        .prepare_cached(
            "SELECT count(*), coalesce(max(emoji = ?2), 0) FROM reaction_counts WHERE message_id = ?1",
        )?
        .query_row(params![message_id, emoji], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rules::react(rules, found.as_ref(), add, !known, distinct)?;
    if add == has {
        return Ok(Done::Changed(false));
    }
    let body = if add {
        EventBody::ReactionAdded {
            message_id,
            user_id: actor,
            emoji: emoji.to_owned(),
        }
    } else {
        EventBody::ReactionRemoved {
            message_id,
            user_id: actor,
            emoji: emoji.to_owned(),
        }
    };
    // The event's seq orders the emoji of a message and its reactors (times may tie).
    let seq = append_event(
        tx,
        j,
        body,
        channel_id,
        now,
        Some(message_id),
        Some(actor),
        Some(emoji),
    )?;
    if add {
        tx.prepare_cached(
            "INSERT INTO reactions (message_id, user_id, emoji, channel_id, seq, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![message_id, actor, emoji, channel_id, seq, now])?;
        tx.prepare_cached(
            "INSERT INTO reaction_counts (message_id, emoji, count, first_seq) VALUES (?1, ?2, 1, ?3)
             ON CONFLICT (message_id, emoji) DO UPDATE SET count = count + 1",
        )?
        .execute(params![message_id, emoji, seq])?;
    } else {
        tx.prepare_cached(
            "DELETE FROM reactions WHERE message_id = ?1 AND user_id = ?2 AND emoji = ?3",
        )?
        .execute(params![message_id, actor, emoji])?;
        tx.prepare_cached(
            "UPDATE reaction_counts SET count = count - 1 WHERE message_id = ?1 AND emoji = ?2",
        )?
        .execute(params![message_id, emoji])?;
        tx.prepare_cached(
            "DELETE FROM reaction_counts WHERE message_id = ?1 AND emoji = ?2 AND count <= 0",
        )?
        .execute(params![message_id, emoji])?;
    }
    Ok(Done::Changed(true))
}
