//! The rules every write obeys, as plain functions over what the backend read inside the
//! write's transaction: who may do what to a channel, its members and its messages, the
//! idempotency of sends, and the per-user bounds of [`Rules`]. Both backends call these,
//! so a refusal is the same error whichever stores the data.
//!
//! Each function decides only; it writes nothing. A backend reads what a rule needs,
//! asks the rule, and writes only if the rule allows it (a refused op changes nothing).

use super::{Consent, Posted, Rules, StoreError, TooMany};
use crate::model::{ChannelKind, Message, Role};

pub type Verdict<T = ()> = Result<T, StoreError>;

/// The actor must be a member: non-members see no channel (`NotFound`).
pub fn member<T>(membership: Option<T>) -> Verdict<T> {
    membership.ok_or(StoreError::NotFound)
}

/// Renaming: groups and broadcasts only, by the owner or an admin.
pub fn rename(kind: ChannelKind, role: Role) -> Verdict {
    if kind == ChannelKind::Dm {
        return Err(StoreError::Forbidden("a DM has no name"));
    }
    if !role.is_manager() {
        return Err(StoreError::Forbidden(
            "only the owner or an admin may rename the channel",
        ));
    }
    Ok(())
}

/// What a `put_member` does once allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMember {
    /// Add the user with this role (consent and room are checked next).
    Add(Role),
    /// Change an existing member's role.
    SetRole(Role),
    /// Nothing changes (the same role again).
    Nothing,
}

/// Adding a member or changing a role: not in DMs, by the owner or an admin; only the
/// owner changes an admin's role; the owner's role never changes.
pub fn put_member(
    kind: ChannelKind,
    actor_role: Role,
    current: Option<Role>,
    wanted: Option<Role>,
) -> Verdict<PutMember> {
    if kind == ChannelKind::Dm {
        return Err(StoreError::Forbidden("a DM has exactly two members"));
    }
    if !actor_role.is_manager() {
        return Err(StoreError::Forbidden(
            "only the owner or an admin may manage members",
        ));
    }
    match current {
        None => Ok(PutMember::Add(wanted.unwrap_or(Role::Member))),
        Some(Role::Owner) => {
            if wanted.is_some_and(|r| r != Role::Owner) {
                return Err(StoreError::Forbidden("the owner's role cannot be changed"));
            }
            Ok(PutMember::Nothing)
        }
        Some(current) => {
            let wanted = wanted.unwrap_or(current);
            if wanted == current {
                return Ok(PutMember::Nothing);
            }
            if current == Role::Admin && actor_role != Role::Owner {
                return Err(StoreError::Forbidden(
                    "only the owner may change an admin's role",
                ));
            }
            Ok(PutMember::SetRole(wanted))
        }
    }
}

/// Leaving or removing: not in DMs, never the owner; a member may leave; managers remove
/// members, only the owner removes admins.
pub fn remove_member(
    kind: ChannelKind,
    actor: i64,
    actor_role: Role,
    user: i64,
    target: Option<Role>,
) -> Verdict {
    let target = target.ok_or(StoreError::NotFound)?;
    if kind == ChannelKind::Dm {
        return Err(StoreError::Forbidden("a DM has exactly two members"));
    }
    if target == Role::Owner {
        return Err(StoreError::Forbidden(
            "the owner cannot leave or be removed",
        ));
    }
    if actor != user {
        let allowed = match target {
            Role::Member => actor_role.is_manager(),
            _ => actor_role == Role::Owner,
        };
        if !allowed {
            return Err(StoreError::Forbidden("you may not remove this member"));
        }
    }
    Ok(())
}

/// A send. The order of the checks is part of the contract: a non-member gets `NotFound`;
/// a retry (an earlier message of the author with the same `client_id`) gets the original,
/// unchanged, even if the sender could no longer post it now; then broadcasts take posts
/// from managers only. `Ok(Some(_))` is the retry's answer, `Ok(None)` a new message.
pub fn post(
    kind: ChannelKind,
    role: Option<Role>,
    original: Option<Message>,
) -> Verdict<Option<Posted>> {
    let role = member(role)?;
    if let Some(message) = original {
        return Ok(Some(Posted {
            message,
            created: false,
        }));
    }
    if kind == ChannelKind::Broadcast && !role.is_manager() {
        return Err(StoreError::Forbidden(
            "only the owner or an admin may post in a broadcast channel",
        ));
    }
    Ok(None)
}

/// An edit: of a live message, by its author, at most [`Rules::max_edits_per_message`]
/// times (each edit keeps the text it replaces in the log).
pub fn edit(rules: &Rules, message: Option<&Message>, actor: i64, edits_so_far: u32) -> Verdict {
    let message = message.ok_or(StoreError::NotFound)?;
    if message.deleted {
        return Err(StoreError::NotFound);
    }
    if message.author_id != actor {
        return Err(StoreError::Forbidden("only the author may edit a message"));
    }
    if edits_so_far >= rules.max_edits_per_message {
        return Err(StoreError::TooMany(TooMany::Edits(
            rules.max_edits_per_message,
        )));
    }
    Ok(())
}

/// A delete: by the author, the owner or an admin. `Ok(false)`: already deleted, nothing
/// to do (deleting twice succeeds).
pub fn delete(message: Option<&Message>, actor: i64, role: Role) -> Verdict<bool> {
    let message = message.ok_or(StoreError::NotFound)?;
    if message.author_id != actor && !role.is_manager() {
        return Err(StoreError::Forbidden(
            "only the author, the owner or an admin may delete a message",
        ));
    }
    Ok(!message.deleted)
}

/// A reply's root: a message of the channel that is not a reply itself; a deleted root
/// takes replies only while its thread has some (the thread stays readable and open).
/// A root that is not there is the body's fault, not the path's: `Invalid`.
pub fn reply_root(root: Option<&Message>) -> Verdict {
    let root = root.ok_or_else(|| StoreError::Invalid {
        field: "thread_root_id",
        message: "no such message in this channel".into(),
    })?;
    if root.thread_root_id.is_some() {
        return Err(StoreError::Invalid {
            field: "thread_root_id",
            message: "a reply cannot start a thread: reply to its thread's root".into(),
        });
    }
    if root.deleted && root.reply_count == 0 {
        return Err(StoreError::Invalid {
            field: "thread_root_id",
            message: "that message was deleted and has no thread".into(),
        });
    }
    Ok(())
}

/// A reaction: to a live message (a deleted or missing one is `NotFound`), by any member.
/// Adding a new emoji to a message that has [`Rules::max_reactions_per_message`] already
/// is refused; a user adding one the message has, or removing, always passes.
pub fn react(
    rules: &Rules,
    message: Option<&Message>,
    add: bool,
    emoji_is_new: bool,
    distinct: u32,
) -> Verdict {
    let message = message.ok_or(StoreError::NotFound)?;
    if message.deleted {
        return Err(StoreError::NotFound);
    }
    if add && emoji_is_new && distinct >= rules.max_reactions_per_message {
        return Err(StoreError::TooMany(TooMany::Reactions(
            rules.max_reactions_per_message,
        )));
    }
    Ok(())
}

/// A DM's pair key, `"low:high"` (one DM per pair), refusing a DM with oneself.
pub fn dm_key(user: i64, peer: i64) -> Verdict<String> {
    if user == peer {
        return Err(StoreError::Invalid {
            field: "user_id",
            message: "a DM needs another user".into(),
        });
    }
    Ok(format!("{}:{}", user.min(peer), user.max(peer)))
}

/// Room for one more membership of a user who has `memberships` now.
pub fn room(rules: &Rules, memberships: u64) -> Verdict {
    if memberships >= u64::from(rules.max_channels_per_user) {
        return Err(StoreError::TooMany(TooMany::Channels(
            rules.max_channels_per_user,
        )));
    }
    Ok(())
}

/// Room for one more bot of a user who owns `bots` now; a bot owns none.
pub fn bot_room(rules: &Rules, owner_is_bot: bool, bots: u64) -> Verdict {
    if owner_is_bot {
        return Err(StoreError::Forbidden("a bot cannot make bots"));
    }
    if bots >= u64::from(rules.max_bots_per_user) {
        return Err(StoreError::TooMany(TooMany::Bots(rules.max_bots_per_user)));
    }
    Ok(())
}

/// Managing a channel's webhooks: its owner and admins, not in DMs (`membership` is the
/// channel's kind and the actor's role, `None` for a non-member).
pub fn manage_webhooks(
    membership: Option<(crate::model::ChannelKind, crate::model::Role)>,
) -> Verdict {
    use crate::model::{ChannelKind, Role};
    match membership {
        None => Err(StoreError::NotFound),
        Some((ChannelKind::Dm, _)) => {
            Err(StoreError::Forbidden("direct messages have no webhooks"))
        }
        Some((_, Role::Member)) => Err(StoreError::Forbidden(
            "only the channel's owner and admins manage its webhooks",
        )),
        Some((_, Role::Owner | Role::Admin)) => Ok(()),
    }
}

/// Room for one more webhook in a channel that has `hooks`, posting as a bot that is
/// (`bot_is_member`) a member.
pub fn webhook_room(rules: &Rules, hooks: u64, bot_is_member: bool) -> Verdict {
    if !bot_is_member {
        return Err(StoreError::Invalid {
            field: "bot_id",
            message: "the webhook's bot must be a member of the channel".into(),
        });
    }
    if hooks >= u64::from(rules.max_webhooks_per_channel) {
        return Err(StoreError::TooMany(TooMany::Webhooks(
            rules.max_webhooks_per_channel,
        )));
    }
    Ok(())
}

/// A subscription after an admin's change: resuming clears its failures (it is tried at
/// once, from its cursor); a cursor must not be negative.
pub fn change_subscription(
    sub: &crate::store::Subscription,
    change: crate::store::SubscriptionChange,
    actor: i64,
) -> Result<crate::store::Subscription, StoreError> {
    use crate::store::SubscriptionStatus;
    let mut next = sub.clone();
    if let Some(cursor) = change.cursor {
        if cursor < 0 {
            return Err(StoreError::Invalid {
                field: "cursor",
                message: "cursor must be 0 or more".into(),
            });
        }
        next.cursor = cursor;
    }
    match change.status {
        Some(SubscriptionStatus::Active) => {
            next.status = SubscriptionStatus::Active;
            // Delivered under the resuming admin's role from now on.
            next.creator_id = actor;
            next.failures = 0;
            next.failing_since = None;
            next.next_try_at = 0;
        }
        Some(SubscriptionStatus::Paused) => next.status = SubscriptionStatus::Paused,
        Some(SubscriptionStatus::Dead) => {
            return Err(StoreError::Invalid {
                field: "status",
                message: "status must be `active` or `paused`".into(),
            });
        }
        None => {}
    }
    Ok(next)
}

/// A subscription after its lease holder's delivery report at `now`: the cursor moves to
/// the report's unless an admin moved it since the run last knew it; a failure counts,
/// backs off and, once failing for the report's dead-after time, turns it dead (or
/// pauses it, when the report says so); a success clears the failures. A paused
/// subscription stays paused.
pub fn report_delivery(
    sub: &crate::store::Subscription,
    report: &crate::store::DeliveryReport,
    now: i64,
) -> crate::store::Subscription {
    use crate::store::SubscriptionStatus;
    let mut next = sub.clone();
    if sub.cursor == report.from {
        next.cursor = report.cursor;
    }
    next.delivered = sub.delivered + report.delivered.max(0);
    match &report.failure {
        None => {
            next.failures = 0;
            next.failing_since = None;
            next.next_try_at = 0;
        }
        Some(f) => {
            let since = sub.failing_since.unwrap_or(now);
            next.failures = sub.failures + 1;
            next.failing_since = Some(since);
            next.last_error = Some(f.error.chars().take(500).collect());
            next.next_try_at = f.next_try_at;
            if next.status == SubscriptionStatus::Active {
                if f.pause {
                    next.status = SubscriptionStatus::Paused;
                } else if now - since >= f.dead_after_ms {
                    next.status = SubscriptionStatus::Dead;
                }
            }
        }
    }
    next
}

/// Room for one more API key of a user who holds `keys` now.
pub fn key_room(rules: &Rules, keys: u64) -> Verdict {
    if keys >= u64::from(rules.max_api_keys_per_user) {
        return Err(StoreError::TooMany(TooMany::ApiKeys(
            rules.max_api_keys_per_user,
        )));
    }
    Ok(())
}

/// Whether the consent rule asks the backend to look for a shared channel before `actor`
/// puts `user` into a channel.
pub fn needs_consent(rules: &Rules, actor: i64, user: i64) -> bool {
    rules.consent == Consent::SharedChannel && actor != user
}

/// Putting `user` into a channel by `actor` under [`Consent::SharedChannel`]: only if they
/// share a channel (a DM counts once answered, or if `user` opened it).
pub fn consent(shares_a_channel: bool) -> Verdict {
    if !shares_a_channel {
        return Err(StoreError::Forbidden(
            "you may add only people who share a channel with you; open a direct message with them first",
        ));
    }
    Ok(())
}

/// A new DM to `peer`, who has `pending` DMs others opened and they have not answered.
pub fn pending_dms(rules: &Rules, pending: u64) -> Verdict {
    if rules.consent == Consent::SharedChannel && pending >= u64::from(rules.max_pending_dms) {
        return Err(StoreError::TooMany(TooMany::PendingDms(
            rules.max_pending_dms,
        )));
    }
    Ok(())
}

/// A new member of `user_id` must name an existing user.
pub fn known_member(exists: bool, user_id: i64) -> Verdict {
    if !exists {
        return Err(StoreError::Invalid {
            field: "members",
            message: format!("no user has id {user_id}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_changes_an_admin() {
        use ChannelKind::Group;
        assert_eq!(
            put_member(Group, Role::Owner, Some(Role::Admin), Some(Role::Member)).unwrap(),
            PutMember::SetRole(Role::Member)
        );
        assert!(put_member(Group, Role::Admin, Some(Role::Admin), Some(Role::Member)).is_err());
        assert_eq!(
            put_member(Group, Role::Admin, Some(Role::Member), None).unwrap(),
            PutMember::Nothing
        );
        assert!(put_member(Group, Role::Member, None, None).is_err());
        assert!(put_member(ChannelKind::Dm, Role::Owner, None, None).is_err());
    }

    #[test]
    fn a_retry_returns_the_original_before_the_broadcast_rule() {
        let m = Message {
            id: 1,
            channel_id: 2,
            seq: 3,
            author_id: 4,
            text: "x".into(),
            client_id: Some("c".into()),
            created_at: 0,
            edited_at: None,
            deleted: false,
            ..Message::default()
        };
        let kind = ChannelKind::Broadcast;
        assert!(post(kind, Some(Role::Member), Some(m)).unwrap().is_some());
        assert!(post(kind, Some(Role::Member), None).is_err());
        assert!(matches!(post(kind, None, None), Err(StoreError::NotFound)));
    }
}
