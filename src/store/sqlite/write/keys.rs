//! Bots and API keys: a bot is a user with an owner and no password; an API key is a
//! token's digest held by a user, acting as them or as one of their bots.

use rusqlite::{OptionalExtension, Transaction, params};

use super::{Applied, Done, digest, insert_user, membership_row};
use crate::store::{
    ApiKeyInfo, IncomingWebhook, NewApiKey, NewIncomingWebhook, Rules, StoreError, rules,
    session_id,
};

pub(super) fn create_bot(
    tx: &Transaction,
    rules: &Rules,
    id: i64,
    now: i64,
    owner: i64,
    username: &str,
) -> Applied {
    let owner_bot: Option<Option<i64>> = tx
        .prepare_cached("SELECT bot_owner FROM users WHERE id = ?1")?
        .query_row([owner], |r| r.get(0))
        .optional()?;
    let Some(owner_bot) = owner_bot else {
        return Err(StoreError::NotFound.into());
    };
    let bots: i64 = tx
        .prepare_cached("SELECT count(*) FROM users WHERE bot_owner = ?1")?
        .query_row([owner], |r| r.get(0))?;
    rules::bot_room(rules, owner_bot.is_some(), bots as u64)?;
    // No password hash: no password verifies against an empty one, and logins look
    // bots up as unknown names.
    Ok(Done::User(insert_user(
        tx,
        rules,
        id,
        now,
        username,
        "",
        Some(owner),
    )?))
}

pub(super) fn create_api_key(
    tx: &Transaction,
    rules: &Rules,
    now: i64,
    owner: i64,
    key: &NewApiKey,
) -> Applied {
    let acts_for_owner = key.user_id == owner
        && tx
            .prepare_cached("SELECT 1 FROM users WHERE id = ?1")?
            .exists([owner])?;
    let own_bot = tx
        .prepare_cached("SELECT 1 FROM users WHERE id = ?1 AND bot_owner = ?2")?
        .exists([key.user_id, owner])?;
    if !acts_for_owner && !own_bot {
        return Err(StoreError::NotFound.into());
    }
    let held: i64 = tx
        .prepare_cached("SELECT count(*) FROM api_keys WHERE owner_id = ?1")?
        .query_row([owner], |r| r.get(0))?;
    rules::key_room(rules, held as u64)?;
    let id = session_id(&key.token);
    tx.prepare_cached(
        "INSERT INTO api_keys (token_hash, id, owner_id, user_id, name, scopes, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        &key.token[..],
        id,
        owner,
        key.user_id,
        key.name,
        key.scopes,
        now,
        key.expires_at
    ])?;
    Ok(Done::ApiKey(ApiKeyInfo {
        id,
        user_id: key.user_id,
        name: key.name.clone(),
        scopes: key.scopes.clone(),
        created_at: now,
        expires_at: key.expires_at,
        last_used_at: None,
    }))
}

pub(super) fn delete_api_key(tx: &Transaction, owner: i64, id: i64) -> Applied {
    let deleted: Option<(i64, Vec<u8>)> = tx
        .prepare_cached(
            "DELETE FROM api_keys WHERE owner_id = ?1 AND id = ?2 RETURNING user_id, token_hash",
        )?
        .query_row([owner, id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(Done::DeletedKey(
        deleted.and_then(|(user, token)| Some((user, digest(token)?))),
    ))
}

/// Checks that `actor` may manage the channel's webhooks.
pub(super) fn check_manager(
    tx: &Transaction,
    channel_id: i64,
    actor: i64,
) -> Result<(), super::Failure> {
    Ok(rules::manage_webhooks(membership_row(
        tx, channel_id, actor,
    )?)?)
}

pub(super) fn create_incoming_webhook(
    tx: &Transaction,
    rules: &Rules,
    now: i64,
    actor: i64,
    channel_id: i64,
    hook: &NewIncomingWebhook,
) -> Applied {
    check_manager(tx, channel_id, actor)?;
    let bot_is_member = membership_row(tx, channel_id, hook.bot_id)?.is_some();
    let hooks: i64 = tx
        .prepare_cached(
            "SELECT (SELECT count(*) FROM incoming_webhooks WHERE channel_id = ?1)
                  + (SELECT count(*) FROM subscriptions WHERE channel_id = ?1)",
        )?
        .query_row([channel_id], |r| r.get(0))?;
    rules::webhook_room(rules, hooks as u64, bot_is_member)?;
    let id = session_id(&hook.token);
    tx.prepare_cached(
        "INSERT INTO incoming_webhooks (token_hash, id, channel_id, bot_id, creator_id, name, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        &hook.token[..],
        id,
        channel_id,
        hook.bot_id,
        actor,
        hook.name,
        now
    ])?;
    Ok(Done::Webhook(IncomingWebhook {
        id,
        channel_id,
        bot_id: hook.bot_id,
        creator_id: actor,
        name: hook.name.clone(),
        created_at: now,
    }))
}

pub(super) fn delete_incoming_webhook(
    tx: &Transaction,
    actor: i64,
    channel_id: i64,
    id: i64,
) -> Applied {
    check_manager(tx, channel_id, actor)?;
    let n = tx
        .prepare_cached("DELETE FROM incoming_webhooks WHERE channel_id = ?1 AND id = ?2")?
        .execute([channel_id, id])?;
    Ok(Done::Changed(n > 0))
}
