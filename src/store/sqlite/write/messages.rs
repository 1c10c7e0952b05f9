//! Message ops other than the post (which is the writer's hot path, in `hot.rs`): edit
//! and delete.

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
    tx.prepare_cached("UPDATE events SET body = '' WHERE channel_id = ?1 AND message_id = ?2")?
        .execute([channel_id, message_id])?;
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
