//! Channel ops: create, DM, rename, members and roles, read markers.

use rusqlite::{OptionalExtension, Transaction, params};

use super::{Applied, Done, append_event, membership, membership_row, role_of, user_exists};
use crate::id::Snowflake;
use crate::model::{ChannelKind, Event, EventBody, Role};
use crate::store::rules::{self, PutMember};
use crate::store::sqlite::read;
use crate::store::sqlite::tail::{Span, Unfolded};
use crate::store::{Consent, Rules, StoreError};

/// Adds a member with a `member.added` event. Their read marker starts at that event, so
/// earlier history does not count as unread.
fn add_member(
    tx: &Transaction,
    j: &mut Vec<Event>,
    channel_id: i64,
    user_id: i64,
    role: Role,
    at: i64,
) -> rusqlite::Result<()> {
    let seq = append_event(
        tx,
        j,
        EventBody::MemberAdded { user_id, role },
        channel_id,
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

/// Refuses a membership that would take `user_id` past the channel cap.
fn check_room(tx: &Transaction, rules: &Rules, user_id: i64) -> Result<(), super::Failure> {
    let n: i64 = tx
        .prepare_cached("SELECT count(*) FROM members WHERE user_id = ?1")?
        .query_row([user_id], |r| r.get(0))?;
    Ok(rules::room(rules, n as u64)?)
}

/// Refuses putting `user_id` into a channel by `actor` without the user's consent: under
/// [`Consent::SharedChannel`], only someone who already shares a channel with them may.
fn check_consent(
    tx: &Transaction,
    rules: &Rules,
    actor: i64,
    user_id: i64,
) -> Result<(), super::Failure> {
    if !rules::needs_consent(rules, actor, user_id) {
        return Ok(());
    }
    // A DM counts only once the user has answered it (or opened it themselves): a DM a
    // stranger opened is not consent.
    // A bot's owner may put it anywhere they are.
    let shared = tx
        .prepare_cached(
            "SELECT 1 FROM members a
             JOIN members b ON b.channel_id = a.channel_id AND b.user_id = ?2
             JOIN channels c ON c.id = a.channel_id
             WHERE a.user_id = ?1 AND (c.kind != 'dm' OR c.owner_id = ?2 OR c.dm_answered = 1)
             UNION ALL SELECT 1 FROM users WHERE id = ?2 AND bot_owner = ?1
             LIMIT 1",
        )?
        .exists([actor, user_id])?;
    Ok(rules::consent(shared)?)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn create_channel(
    tx: &Transaction,
    j: &mut Vec<Event>,
    ids: &mut Snowflake,
    rules: &Rules,
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
        rules::known_member(user_exists(tx, m)?, m)?;
        check_consent(tx, rules, owner, m)?;
        check_room(tx, rules, m)?;
    }
    check_room(tx, rules, owner)?;
    let id = ids.next_id(now);
    tx.prepare_cached(
        "INSERT INTO channels (id, kind, name, owner_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![id, kind.as_str(), name, owner, now])?;
    add_member(tx, j, id, owner, Role::Owner, now)?;
    for m in others {
        add_member(tx, j, id, m, Role::Member, now)?;
    }
    Ok(Done::Channel(
        read::channel(tx, id)?.ok_or(StoreError::NotFound)?,
    ))
}

pub(super) fn open_dm(
    tx: &Transaction,
    j: &mut Vec<Event>,
    ids: &mut Snowflake,
    rules: &Rules,
    now: i64,
    user: i64,
    peer: i64,
) -> Applied {
    let key = rules::dm_key(user, peer)?;
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
    check_room(tx, rules, user)?;
    check_room(tx, rules, peer)?;
    // DMs opened by others and not answered are bounded per user: a crowd of strangers'
    // accounts cannot fill someone's channel list with DMs.
    if rules.consent == Consent::SharedChannel {
        let pending: i64 = tx
            .prepare_cached(
                "SELECT count(*) FROM members m JOIN channels c ON c.id = m.channel_id
                 WHERE m.user_id = ?1 AND c.kind = 'dm' AND c.owner_id != ?1 AND c.dm_answered = 0",
            )?
            .query_row([peer], |r| r.get(0))?;
        rules::pending_dms(rules, pending as u64)?;
    }
    let id = ids.next_id(now);
    tx.prepare_cached(
        "INSERT INTO channels (id, kind, name, owner_id, dm_key, created_at) VALUES (?1, 'dm', NULL, ?2, ?3, ?4)",
    )?
    .execute(params![id, user, key, now])?;
    add_member(tx, j, id, user, Role::Member, now)?;
    add_member(tx, j, id, peer, Role::Member, now)?;
    Ok(Done::Dm(
        read::channel(tx, id)?.ok_or(StoreError::NotFound)?,
        true,
    ))
}

pub(super) fn rename_channel(
    tx: &Transaction,
    j: &mut Vec<Event>,
    now: i64,
    actor: i64,
    channel_id: i64,
    name: &str,
) -> Applied {
    let (kind, role) = membership(tx, channel_id, actor)?;
    rules::rename(kind, role)?;
    tx.prepare_cached("UPDATE channels SET name = ?2 WHERE id = ?1")?
        .execute(params![channel_id, name])?;
    append_event(
        tx,
        j,
        EventBody::ChannelUpdated {
            name: Some(name.to_owned()),
        },
        channel_id,
        now,
        None,
        None,
        Some(name),
    )?;
    Ok(Done::Channel(
        read::channel(tx, channel_id)?.ok_or(StoreError::NotFound)?,
    ))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn put_member(
    tx: &Transaction,
    j: &mut Vec<Event>,
    rules: &Rules,
    now: i64,
    actor: i64,
    channel_id: i64,
    user_id: i64,
    role: Option<Role>,
) -> Applied {
    let (kind, actor_role) = membership(tx, channel_id, actor)?;
    let current = role_of(tx, channel_id, user_id)?;
    let change = rules::put_member(kind, actor_role, current, role)?;
    if current.is_none() && !user_exists(tx, user_id)? {
        return Err(StoreError::NotFound.into());
    }
    match change {
        PutMember::Add(role) => {
            check_consent(tx, rules, actor, user_id)?;
            check_room(tx, rules, user_id)?;
            add_member(tx, j, channel_id, user_id, role, now)?
        }
        PutMember::SetRole(wanted) => {
            tx.prepare_cached(
                "UPDATE members SET role = ?3 WHERE channel_id = ?1 AND user_id = ?2",
            )?
            .execute(params![channel_id, user_id, wanted.as_str()])?;
            append_event(
                tx,
                j,
                EventBody::MemberUpdated {
                    user_id,
                    role: wanted,
                },
                channel_id,
                now,
                None,
                Some(user_id),
                Some(wanted.as_str()),
            )?;
        }
        PutMember::Nothing => {}
    }
    Ok(Done::Unit)
}

pub(super) fn remove_member(
    tx: &Transaction,
    j: &mut Vec<Event>,
    now: i64,
    actor: i64,
    channel_id: i64,
    user_id: i64,
) -> Applied {
    let (kind, actor_role) = membership(tx, channel_id, actor)?;
    let target = role_of(tx, channel_id, user_id)?;
    rules::remove_member(kind, actor, actor_role, user_id, target)?;
    tx.prepare_cached("DELETE FROM members WHERE channel_id = ?1 AND user_id = ?2")?
        .execute([channel_id, user_id])?;
    append_event(
        tx,
        j,
        EventBody::MemberRemoved { user_id },
        channel_id,
        now,
        None,
        Some(user_id),
        None,
    )?;
    Ok(Done::Unit)
}

/// A deleted account leaves the channel (not a DM): its webhooks and subscriptions here
/// go, and an owner's role passes to the first admin, else the first member.
pub(super) fn depart(
    tx: &Transaction,
    j: &mut Vec<Event>,
    now: i64,
    user_id: i64,
    channel_id: i64,
    leaving: &[i64],
) -> Applied {
    let Some((kind, role)) = membership_row(tx, channel_id, user_id)? else {
        return Ok(Done::Changed(false));
    };
    if kind == ChannelKind::Dm {
        return Ok(Done::Changed(false));
    }
    tx.prepare_cached("DELETE FROM subscriptions WHERE channel_id = ?1 AND creator_id = ?2")?
        .execute([channel_id, user_id])?;
    tx.prepare_cached(
        "DELETE FROM incoming_webhooks WHERE channel_id = ?1 AND (creator_id = ?2 OR bot_id = ?2)",
    )?
    .execute([channel_id, user_id])?;
    if role == Role::Owner {
        // The first admin, else member, by id, not deleted with it.
        let heir: Option<i64> = tx
            .prepare_cached(
                "SELECT user_id FROM members WHERE channel_id = ?1 AND user_id != ?2
                 ORDER BY role = 'admin' DESC, user_id LIMIT ?3",
            )?
            .query_map(
                params![channel_id, user_id, leaving.len() as i64 + 1],
                |r| r.get::<_, i64>(0),
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .find(|id| !leaving.contains(id));
        if let Some(heir) = heir {
            tx.prepare_cached(
                "UPDATE members SET role = 'owner' WHERE channel_id = ?1 AND user_id = ?2",
            )?
            .execute([channel_id, heir])?;
            tx.prepare_cached("UPDATE channels SET owner_id = ?2 WHERE id = ?1")?
                .execute([channel_id, heir])?;
            append_event(
                tx,
                j,
                EventBody::MemberUpdated {
                    user_id: heir,
                    role: Role::Owner,
                },
                channel_id,
                now,
                None,
                Some(heir),
                Some(Role::Owner.as_str()),
            )?;
        }
    }
    tx.prepare_cached("DELETE FROM members WHERE channel_id = ?1 AND user_id = ?2")?
        .execute([channel_id, user_id])?;
    append_event(
        tx,
        j,
        EventBody::MemberRemoved { user_id },
        channel_id,
        now,
        None,
        Some(user_id),
        None,
    )?;
    Ok(Done::Changed(true))
}

pub(super) fn mark_read(
    tx: &Transaction,
    log: &Unfolded,
    user_id: i64,
    channel_id: i64,
    seq: i64,
) -> Applied {
    let row: Option<(i64, i64)> = tx
        .prepare_cached(
            "SELECT m.read_seq, c.last_seq FROM members m JOIN channels c ON c.id = m.channel_id
             WHERE m.channel_id = ?1 AND m.user_id = ?2",
        )?
        .query_row([channel_id, user_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (from, row_last) = row.ok_or(StoreError::NotFound)?;
    // Not past the committed posts: a reader between this batch's commit and its posts
    // reaching the tail would see the marker count a post it does not show (and the
    // user cannot have seen it either).
    let last = log.committed_last_seq(channel_id, row_last);
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
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })?;
    // Posts not folded yet are in the commit log (all live: a delete folds first).
    let (unfolded, own_unfolded) = log.count(&Span {
        channel_id,
        after: from,
        through: to,
        author: user_id,
    });
    let (live, own) = (live + unfolded, own + own_unfolded);
    tx.prepare_cached(
        "UPDATE members SET read_seq = ?3, live_read = live_read + ?4, own_unread = own_unread - ?5,
             mention_unread = mention_unread - (SELECT count(*) FROM mentions
                 WHERE channel_id = ?1 AND user_id = ?2 AND seq > read_seq AND seq <= ?3)
         WHERE channel_id = ?1 AND user_id = ?2",
    )?
    .execute([channel_id, user_id, to, live, own])?;
    Ok(Done::Unit)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rusqlite::Connection;

    use super::*;
    use crate::model::Message;
    use crate::store::sqlite::tail::Tail;

    fn post(seq: i64) -> Message {
        Message {
            id: 100 + seq,
            channel_id: 1,
            seq,
            author_id: 7,
            text: format!("m{seq}"),
            created_at: seq,
            ..Message::default()
        }
    }

    /// Bob's `(unread, read_seq, last_seq)` as a reader sees the channel.
    fn bobs_view(conn: &Connection, tail: &Tail) -> (i64, i64, i64) {
        let v = read::channels(conn, tail, 8).unwrap().remove(0);
        (v.unread, v.read_seq, v.channel.last_seq)
    }

    /// Regression: a read marker moved in the batch that posts ann's next message
    /// counted that post as read; a reader between the batch's commit and the post
    /// reaching the tail saw one unread too few (-1) and a read marker past `last_seq`.
    #[test]
    fn a_read_marker_stops_at_the_posts_readers_can_see() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("db")).unwrap();
        crate::store::sqlite::schema::migrate(&mut conn).unwrap();
        conn.execute_batch(
            "INSERT INTO channels (id, kind, name, owner_id, created_at) VALUES (1, 'group', 'a', 7, 0);
             INSERT INTO members (channel_id, user_id, role, read_seq, live_read, own_unread)
                 VALUES (1, 7, 'owner', 0, 0, 0), (1, 8, 'member', 0, 0, 0);",
        )
        .unwrap();
        let tail = Arc::new(Tail::default());
        let mut log = Unfolded::new(Arc::clone(&tail), 1000, 0);
        let tx = conn.transaction().unwrap();
        log.append(&tx, &post(1)).unwrap();
        tx.commit().unwrap();
        log.committed();
        // One batch: ann's second post, then bob marks everything read.
        let tx = conn.transaction().unwrap();
        log.append(&tx, &post(2)).unwrap();
        assert!(mark_read(&tx, &log, 8, 1, i64::MAX).is_ok());
        tx.commit().unwrap();
        assert_eq!(
            bobs_view(&conn, &tail),
            (0, 1, 1),
            "committed, the post not in the tail yet"
        );
        log.committed();
        assert_eq!(bobs_view(&conn, &tail), (1, 1, 2));
    }
}
