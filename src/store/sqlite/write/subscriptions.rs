//! Outgoing webhook subscriptions: made, changed and deleted by a channel's owner and
//! admins; claimed and reported on by the delivery worker of the node holding the lease.

use rusqlite::{OptionalExtension, Transaction, params};

use super::keys::check_manager;
use super::{Applied, Done};
use crate::store::sqlite::read::{SUBSCRIPTION_COLUMNS, subscription_row};
use crate::store::{
    DeliveryReport, NewSubscription, Rules, Subscription, SubscriptionChange, SubscriptionStatus,
    rules,
};

#[allow(clippy::too_many_arguments)]
pub(super) fn create(
    tx: &Transaction,
    rules: &Rules,
    id: i64,
    now: i64,
    actor: i64,
    channel_id: i64,
    sub: &NewSubscription,
) -> Applied {
    check_manager(tx, channel_id, actor)?;
    let hooks: i64 = tx
        .prepare_cached(
            "SELECT (SELECT count(*) FROM incoming_webhooks WHERE channel_id = ?1)
                  + (SELECT count(*) FROM subscriptions WHERE channel_id = ?1)",
        )?
        .query_row([channel_id], |r| r.get(0))?;
    rules::webhook_room(rules, hooks as u64, true)?;
    let made = Subscription {
        id,
        channel_id,
        creator_id: actor,
        url: sub.url.clone(),
        secret: sub.secret.clone(),
        types: sub.types.clone(),
        cursor: sub.cursor,
        status: SubscriptionStatus::Active,
        delivered: 0,
        last_error: None,
        failing_since: None,
        failures: 0,
        next_try_at: 0,
        created_at: now,
    };
    tx.prepare_cached(
        "INSERT INTO subscriptions (id, channel_id, creator_id, url, secret, types, cursor, status, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        id,
        channel_id,
        actor,
        made.url,
        made.secret,
        made.types,
        made.cursor,
        made.status.as_str(),
        now
    ])?;
    Ok(Done::Subscription(Some(made)))
}

fn find(tx: &Transaction, channel_id: i64, id: i64) -> rusqlite::Result<Option<Subscription>> {
    tx.prepare_cached(&format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE id = ?1 AND channel_id = ?2"
    ))?
    .query_row([id, channel_id], subscription_row)
    .optional()
}

/// Writes the fields a change or a report moves.
fn store(tx: &Transaction, s: &Subscription) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE subscriptions SET cursor = ?2, status = ?3, delivered = ?4, last_error = ?5,
             failing_since = ?6, failures = ?7, next_try_at = ?8, creator_id = ?9
         WHERE id = ?1",
    )?
    .execute(params![
        s.id,
        s.cursor,
        s.status.as_str(),
        s.delivered,
        s.last_error,
        s.failing_since,
        s.failures,
        s.next_try_at,
        s.creator_id
    ])?;
    Ok(())
}

pub(super) fn update(
    tx: &Transaction,
    actor: i64,
    channel_id: i64,
    id: i64,
    change: SubscriptionChange,
) -> Applied {
    check_manager(tx, channel_id, actor)?;
    let Some(sub) = find(tx, channel_id, id)? else {
        return Err(crate::store::StoreError::NotFound.into());
    };
    let next = rules::change_subscription(&sub, change, actor)?;
    store(tx, &next)?;
    Ok(Done::Subscription(Some(next)))
}

pub(super) fn delete(tx: &Transaction, actor: i64, channel_id: i64, id: i64) -> Applied {
    check_manager(tx, channel_id, actor)?;
    let n = tx
        .prepare_cached("DELETE FROM subscriptions WHERE id = ?1 AND channel_id = ?2")?
        .execute([id, channel_id])?;
    Ok(Done::Changed(n > 0))
}

pub(super) fn claim(
    tx: &Transaction,
    channel_id: i64,
    id: i64,
    node: &str,
    now: i64,
    until: i64,
) -> Applied {
    let taken = tx
        .prepare_cached(
            "UPDATE subscriptions SET lease_node = ?3, lease_until = ?5
             WHERE id = ?1 AND channel_id = ?2 AND status = 'active'
               AND (lease_until <= ?4 OR lease_node = ?3)",
        )?
        .execute(params![id, channel_id, node, now, until])?;
    if taken == 0 {
        return Ok(Done::Subscription(None));
    }
    Ok(Done::Subscription(find(tx, channel_id, id)?))
}

pub(super) fn record(
    tx: &Transaction,
    channel_id: i64,
    id: i64,
    node: &str,
    now: i64,
    report: &DeliveryReport,
) -> Applied {
    let holder: Option<Option<String>> = tx
        .prepare_cached("SELECT lease_node FROM subscriptions WHERE id = ?1 AND channel_id = ?2")?
        .query_row([id, channel_id], |r| r.get(0))
        .optional()?;
    if holder.flatten().as_deref() != Some(node) {
        return Ok(Done::Changed(false));
    }
    let Some(sub) = find(tx, channel_id, id)? else {
        return Ok(Done::Changed(false));
    };
    let next = rules::report_delivery(&sub, report, now);
    store(tx, &next)?;
    tx.prepare_cached("UPDATE subscriptions SET lease_until = ?2 WHERE id = ?1")?
        .execute([id, report.lease_until])?;
    let moved = sub.cursor != report.from;
    Ok(Done::Changed(
        next.status == SubscriptionStatus::Active && !moved,
    ))
}
