//! The writer's in-memory state of hot channels: each channel's kind and last seq, its
//! members' roles, and the commit log ([`super::tail`]). A message post runs one append
//! to the log and (with a `client_id` the filter of stored ones, [`super::seen`], may
//! hold) one index probe, instead of seven statements. The channel and member rows do
//! not change at a post: the fold that moves it out of the log counts it in them
//! (`last_seq`, `live_messages`, `own_unread`), and until then readers add the log's
//! posts to what the rows say. So a commit writes no page of `channels` or `members`.
//!
//! Invariant: only the writer thread writes channels and members, so this state stays
//! true as long as (a) every op other than a post forgets the channel it touched
//! afterwards, and (b) a rolled-back batch clears it all. The writer does both.

use std::collections::HashMap;

use rusqlite::{OptionalExtension, Transaction, params};

use super::read;
use super::seen::Seen;
use super::tail::Unfolded;
use super::write::{Applied, Done, membership_row};
use crate::id::Snowflake;
use crate::model::{ChannelKind, Event, Message, Role};
use crate::store::{StoreError, rules};

/// Channels, and member roles over all of them, kept between batches before the state is
/// dropped and reloaded on demand: bounds the writer's memory.
const MAX_CHANNELS: usize = 50_000;
const MAX_ROLES: usize = 1_000_000;

struct HotChannel {
    kind: ChannelKind,
    /// The row's, or its newest post's in the log.
    last_seq: i64,
    /// Members seen posting; non-members are not cached.
    roles: HashMap<i64, Role>,
    /// For a DM its other member has not posted in yet: the member who opened it. The
    /// first post by anyone else marks the DM answered (`channels.dm_answered`).
    unanswered_dm_of: Option<i64>,
}

pub(super) struct Hot {
    channels: HashMap<i64, HotChannel>,
    /// Role entries over all channels.
    roles: usize,
    /// The commit log posts are appended to, and its unfolded tail.
    pub log: Unfolded,
    /// Which `(channel, author, client_id)`s the table may hold: a post probes the index
    /// only for those.
    seen: Seen,
}

impl Hot {
    pub fn new(log: Unfolded, seen: Seen) -> Self {
        Self {
            channels: HashMap::new(),
            roles: 0,
            log,
            seen,
        }
    }

    /// The channel's state, loaded from its row on first use; `None` if it does not exist.
    fn channel(&mut self, tx: &Transaction, id: i64) -> rusqlite::Result<Option<&mut HotChannel>> {
        use std::collections::hash_map::Entry;
        match self.channels.entry(id) {
            Entry::Occupied(e) => Ok(Some(e.into_mut())),
            Entry::Vacant(slot) => {
                let row = tx
                    .prepare_cached(
                        "SELECT kind, last_seq, owner_id, dm_answered FROM channels WHERE id = ?1",
                    )?
                    .query_row([id], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, bool>(3)?,
                        ))
                    })
                    .optional()?;
                let Some((kind, row_last_seq, owner, answered)) = row else {
                    return Ok(None);
                };
                let kind = read::parse_kind(&kind)?;
                Ok(Some(slot.insert(HotChannel {
                    unanswered_dm_of: (kind == ChannelKind::Dm && !answered).then_some(owner),
                    kind,
                    last_seq: self.log.last_seq(id, row_last_seq),
                    roles: HashMap::new(),
                })))
            }
        }
    }

    /// The user's role in an existing channel, or `None` for a non-member (or no channel).
    fn role(
        &mut self,
        tx: &Transaction,
        channel_id: i64,
        user_id: i64,
    ) -> rusqlite::Result<Option<Role>> {
        let Some(ch) = self.channel(tx, channel_id)? else {
            return Ok(None);
        };
        if let Some(role) = ch.roles.get(&user_id) {
            return Ok(Some(*role));
        }
        let Some((_, role)) = membership_row(tx, channel_id, user_id)? else {
            return Ok(None);
        };
        ch.roles.insert(user_id, role);
        self.roles += 1;
        Ok(Some(role))
    }

    /// Records that `messages` holds a message of `author` with this `client_id` (an op
    /// other than the hot post stored it): later posts must probe for it.
    pub fn stored_client_id(&mut self, channel_id: i64, author: i64, client_id: &str) {
        let key = self.seen.key(channel_id, author, client_id);
        self.seen.insert(key);
    }

    /// Drops a channel's state after another op changed its rows.
    pub fn forget(&mut self, channel_id: i64) {
        if let Some(ch) = self.channels.remove(&channel_id) {
            self.roles -= ch.roles.len();
        }
    }

    /// Drops everything: after a rollback, or when too many channels are held.
    pub fn clear(&mut self) {
        self.channels.clear();
        self.roles = 0;
    }

    /// Bounds memory between batches; call after a commit.
    pub fn trim(&mut self) {
        if self.channels.len() > MAX_CHANNELS || self.roles > MAX_ROLES {
            self.clear();
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn post_message(
    tx: &Transaction,
    journal: &mut Vec<Event>,
    hot: &mut Hot,
    ids: &mut Snowflake,
    now: i64,
    author: i64,
    channel_id: i64,
    text: &str,
    client_id: Option<&str>,
) -> Applied {
    let role = rules::member(hot.role(tx, channel_id, author)?)?;
    // The idempotency check: an unfolded post in the commit log, or a folded one.
    let keyed = client_id.map(|cid| (cid, hot.seen.key(channel_id, author, cid)));
    let original = match keyed {
        Some((cid, key)) => match hot.log.by_client_id(channel_id, author, cid) {
            Some(m) => Some(m),
            None if !hot.seen.may_contain(key) => None,
            None => tx
                .prepare_cached(read::MESSAGE_BY_CLIENT_ID)?
                .query_row(params![channel_id, author, cid], read::message_row)
                .optional()?,
        },
        None => None,
    };
    let ch = hot.channel(tx, channel_id)?.ok_or(StoreError::NotFound)?;
    if let Some(retry) = rules::post(ch.kind, Some(role), original)? {
        return Ok(Done::Posted(retry));
    }
    let id = ids.next_id(now);
    let seq = ch.last_seq + 1;
    if ch.unanswered_dm_of.is_some_and(|opener| opener != author) {
        tx.prepare_cached("UPDATE channels SET dm_answered = 1 WHERE id = ?1")?
            .execute([channel_id])?;
        ch.unanswered_dm_of = None;
    }
    ch.last_seq = seq;
    let message = Message {
        id,
        channel_id,
        seq,
        author_id: author,
        text: text.to_owned(),
        client_id: client_id.map(str::to_owned),
        created_at: now,
        edited_at: None,
        deleted: false,
        ..Message::default()
    };
    hot.log.append(tx, &message)?;
    if let Some((_, key)) = keyed {
        hot.seen.insert(key);
    }
    Ok(Done::Posted(crate::store::journal_post(journal, message)))
}
