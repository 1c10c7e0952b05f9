//! Message ops other than the post (which is the writer's hot path, in `hot.rs`): edit,
//! delete and reactions.

use rusqlite::{OptionalExtension, Transaction, params};

use super::{Applied, Done, Failure, append_event, membership};
use crate::model::{Event, EventBody, Message};
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
    // The event that showed the latest text (body NULL) keeps the old text as its own;
    // the new event shows the message row's text from now on.
    tx.prepare_cached(
        "UPDATE events SET body = ?3 WHERE channel_id = ?1 AND message_id = ?2 AND body IS NULL",
    )?
    .execute(params![channel_id, message_id, message.text])?;
    tx.prepare_cached("UPDATE messages SET text = ?2, edited_at = ?3 WHERE id = ?1")?
        .execute(params![message_id, text, now])?;
    message.text = text.to_owned();
    message.edited_at = Some(now);
    append_event(
        tx,
        j,
        EventBody::MessageEdited(message.clone()),
        channel_id,
        now,
        Some(message_id),
        None,
        None,
    )?;
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
    tx.prepare_cached("UPDATE messages SET text = '', deleted = 1 WHERE id = ?1")?
        .execute([message_id])?;
    tx.prepare_cached(
        "UPDATE events SET body = '' WHERE channel_id = ?1 AND message_id = ?2 AND kind LIKE 'message.%'",
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
