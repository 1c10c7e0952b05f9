//! Incoming webhooks: a channel's owner or admin makes a secret URL that posts to the
//! channel as a bot (one of theirs, or one made for the webhook). Whoever holds the URL
//! may post `{text, client_id?}` there, under the webhook's own send limit and its bot's;
//! deleting the webhook ends the URL at once. The secret is shown once and stored as a
//! digest; the access log names routes, never paths, so it is not logged.

use std::time::Instant;

use axum::Json;
use axum::extract::{RawPathParams, State};
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::dto::{
    CreatedIncomingWebhook, CreatedSubscription, ErrorBody, HookMessage, IncomingWebhookList,
    Message, NewIncomingWebhook, NewSubscription, Subscription, SubscriptionList,
    UpdateSubscription,
};
use super::error::{ApiError, ApiResult};
use super::extract::{Authed, JsonBody, PathIds, parse_id};
use super::messages::admit_send;
use super::{AppState, no_content, validate};
use crate::auth::{new_token, token_hash};
use crate::metrics::Limit;
use crate::model::{ProfileChange, Role};
use crate::store::{SubscriptionChange, SubscriptionStatus};
use crate::wire::schema::EVENT_TYPES;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_webhook, list_webhooks))
        .routes(routes!(delete_webhook))
        .routes(routes!(post_to_hook))
        .routes(routes!(create_subscription, list_subscriptions))
        .routes(routes!(update_subscription, delete_subscription))
}

/// Subscribes a URL to the channel's events (owner and admins): each event is POSTed
/// there as JSON, one per request, in seq order, at least once, signed with the secret
/// the answer shows this once. See the API notes for the headers and retries.
#[utoipa::path(post, path = "/v1/channels/{id}/subscriptions", tag = "webhooks", security(("bearer" = [])), request_body = NewSubscription,
    params(("id" = super::openapi::Id, Path, description = "Channel id")),
    responses((status = 201, body = CreatedSubscription),
              (status = 400, body = ErrorBody, description = "`invalid_field`: the URL (not http(s), or not a public address), an event type, `from_seq`"),
              (status = 403, body = ErrorBody, description = "Not an owner or admin, or a DM"),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "`too_many_webhooks`"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's write limits")))]
async fn create_subscription(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<1>,
    JsonBody(body): JsonBody<NewSubscription>,
) -> ApiResult<(StatusCode, Json<CreatedSubscription>)> {
    let PathIds([channel_id]) = path;
    let (channel, role) = state
        .store
        .channel(channel_id, auth.user.id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    crate::store::rules::manage_webhooks(Some((channel.kind, role)))?;
    if body.url.len() > 2048 {
        return Err(ApiError::invalid_field(
            "url",
            "url must be at most 2048 bytes",
        ));
    }
    let mut types: Vec<&str> = Vec::new();
    for t in &body.event_types {
        let known = EVENT_TYPES
            .iter()
            .find(|k| **k == t.as_str())
            .ok_or_else(|| {
                ApiError::invalid_field(
                    "event_types",
                    format!(
                        "unknown event type {t:?}; the types are {}",
                        EVENT_TYPES.join(", ")
                    ),
                )
            })?;
        if !types.contains(known) {
            types.push(known);
        }
    }
    if body.from_seq.is_some_and(|s| s < 0) {
        return Err(ApiError::invalid_field(
            "from_seq",
            "from_seq must be 0 or more",
        ));
    }
    state.admit_write(auth.user.id, body.url.len())?;
    crate::delivery::check_url(&body.url, &state.webhook_policy)
        .await
        .map_err(|e| ApiError::invalid_field("url", e.to_string()))?;
    let last_seq = last_seq(&state, channel_id).await?;
    let secret = format!("whsec_{}", new_token());
    let sub = crate::store::NewSubscription {
        url: body.url.clone(),
        secret: secret.clone(),
        types: types.join(" "),
        cursor: body.from_seq.unwrap_or(last_seq).min(last_seq),
    };
    let sub = state
        .store
        .create_subscription(auth.user.id, channel_id, sub)
        .await?;
    tracing::info!(
        target: "natter::audit",
        user = auth.user.id,
        channel = channel_id,
        subscription = sub.id,
        "webhook subscription created"
    );
    Ok((
        StatusCode::CREATED,
        Json(CreatedSubscription {
            subscription: Subscription::new(&sub, last_seq),
            secret: secret.into(),
        }),
    ))
}

/// The channel's newest seq.
async fn last_seq(state: &AppState, channel_id: i64) -> ApiResult<i64> {
    Ok(state
        .store
        .last_seqs(&[channel_id])
        .await?
        .first()
        .map_or(0, |(_, s)| *s))
}

/// The channel's subscriptions and where each stands (owner and admins).
#[utoipa::path(get, path = "/v1/channels/{id}/subscriptions", tag = "webhooks", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id")),
    responses((status = 200, body = SubscriptionList),
              (status = 403, body = ErrorBody, description = "Not an owner or admin"),
              (status = 404, body = ErrorBody)))]
async fn list_subscriptions(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<1>,
) -> ApiResult<Json<SubscriptionList>> {
    let PathIds([channel_id]) = path;
    let subs = state.store.subscriptions(auth.user.id, channel_id).await?;
    let last = last_seq(&state, channel_id).await?;
    Ok(Json(SubscriptionList {
        subscriptions: subs.iter().map(|s| Subscription::new(s, last)).collect(),
    }))
}

/// Pauses or resumes a subscription, or moves its cursor (owner and admins). A resumed
/// one (a dead one too) is tried at once, from its cursor.
#[utoipa::path(patch, path = "/v1/channels/{id}/subscriptions/{subscription_id}", tag = "webhooks", security(("bearer" = [])), request_body = UpdateSubscription,
    params(("id" = super::openapi::Id, Path, description = "Channel id"),
           ("subscription_id" = super::openapi::Id, Path, description = "Subscription id")),
    responses((status = 200, body = Subscription),
              (status = 403, body = ErrorBody, description = "Not an owner or admin"),
              (status = 404, body = ErrorBody),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's write limits")))]
async fn update_subscription(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<2>,
    JsonBody(body): JsonBody<UpdateSubscription>,
) -> ApiResult<Json<Subscription>> {
    let PathIds([channel_id, id]) = path;
    let status = match body.status.as_deref() {
        None => None,
        Some("active") => Some(SubscriptionStatus::Active),
        Some("paused") => Some(SubscriptionStatus::Paused),
        Some(_) => {
            return Err(ApiError::invalid_field(
                "status",
                "status must be `active` or `paused`",
            ));
        }
    };
    if body.cursor.is_some_and(|c| c < 0) {
        return Err(ApiError::invalid_field(
            "cursor",
            "cursor must be 0 or more",
        ));
    }
    state.admit_write(auth.user.id, 0)?;
    let change = SubscriptionChange {
        status,
        cursor: body.cursor,
    };
    let sub = state
        .store
        .update_subscription(auth.user.id, channel_id, id, change)
        .await?;
    let last = last_seq(&state, channel_id).await?;
    Ok(Json(Subscription::new(&sub, last)))
}

/// Deletes a subscription (owner and admins). A run under way stops at its next record
/// of the cursor (within 20 events).
#[utoipa::path(delete, path = "/v1/channels/{id}/subscriptions/{subscription_id}", tag = "webhooks", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id"),
           ("subscription_id" = super::openapi::Id, Path, description = "Subscription id")),
    responses((status = 204),
              (status = 403, body = ErrorBody, description = "Not an owner or admin"),
              (status = 404, body = ErrorBody)))]
async fn delete_subscription(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<2>,
) -> ApiResult<StatusCode> {
    let PathIds([channel_id, id]) = path;
    if !state
        .store
        .delete_subscription(auth.user.id, channel_id, id)
        .await?
    {
        return Err(ApiError::not_found());
    }
    Ok(no_content())
}

/// Makes an incoming webhook of the channel (owner and admins). Without `bot_id` a bot
/// is made for it (named `hook-…`, shown by the webhook's name) and added to the channel.
/// The answer holds the webhook's secret path, shown this once.
#[utoipa::path(post, path = "/v1/channels/{id}/webhooks", tag = "webhooks", security(("bearer" = [])), request_body = NewIncomingWebhook,
    params(("id" = super::openapi::Id, Path, description = "Channel id")),
    responses((status = 201, body = CreatedIncomingWebhook),
              (status = 400, body = ErrorBody, description = "`invalid_field`: the name"),
              (status = 403, body = ErrorBody, description = "`forbidden`: not an owner or admin, or a DM; `session_required`"),
              (status = 404, body = ErrorBody, description = "Not a member of the channel, or `bot_id` names none of the caller's bots"),
              (status = 409, body = ErrorBody, description = "`too_many_webhooks`, or `too_many_bots` for a new bot"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's write limits")))]
async fn create_webhook(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<1>,
    JsonBody(body): JsonBody<NewIncomingWebhook>,
) -> ApiResult<(StatusCode, Json<CreatedIncomingWebhook>)> {
    let PathIds([channel_id]) = path;
    validate::channel_name(&body.name)?;
    let actor = auth.user.id;
    // Checked here first so that no bot is made for a webhook that will be refused; the
    // store checks again in the write.
    let (channel, role) = state
        .store
        .channel(channel_id, actor)
        .await?
        .ok_or_else(ApiError::not_found)?;
    crate::store::rules::manage_webhooks(Some((channel.kind, role)))?;
    // The cap, before a bot is made for a webhook the store would refuse (it checks
    // again in the write).
    let hooks = state
        .store
        .incoming_webhooks(actor, channel_id)
        .await?
        .len()
        + state.store.subscriptions(actor, channel_id).await?.len();
    crate::store::rules::webhook_room(&state.config.limits.rules, hooks as u64, true)?;
    state.admit_write(actor, body.name.len())?;
    let bot_id = match &body.bot_id {
        Some(id) => {
            let id = super::ws::parse_id("bot_id", id)?;
            let owned = state
                .store
                .user(id)
                .await?
                .is_some_and(|u| u.bot_owner == Some(actor));
            if !owned {
                // As for a key's `user_id`: another's bot is none of the caller's.
                return Err(ApiError::not_found());
            }
            id
        }
        None => hook_bot(&state, actor, &body.name).await?.id,
    };
    if state.store.channel(channel_id, bot_id).await?.is_none() {
        state
            .store
            .put_member(actor, channel_id, bot_id, Some(Role::Member))
            .await?;
    }
    let secret = new_token();
    let hook = crate::store::NewIncomingWebhook {
        token: token_hash(&secret),
        bot_id,
        name: body.name.clone(),
    };
    let hook = state
        .store
        .create_incoming_webhook(actor, channel_id, hook)
        .await?;
    tracing::info!(
        target: "natter::audit",
        user = actor,
        channel = channel_id,
        webhook = hook.id,
        bot = bot_id,
        "incoming webhook created"
    );
    Ok((
        StatusCode::CREATED,
        Json(CreatedIncomingWebhook {
            webhook: (&hook).into(),
            path: format!("/v1/hooks/{channel_id}/{secret}").into(),
        }),
    ))
}

/// A bot of `owner` for a webhook called `name`.
async fn hook_bot(state: &AppState, owner: i64, name: &str) -> ApiResult<crate::model::User> {
    let mut suffix = [0u8; 6];
    getrandom::fill(&mut suffix).map_err(|_| ApiError::internal())?;
    let username = format!(
        "hook-{}",
        suffix
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let bot = state.store.create_bot(owner, &username).await?;
    // The bot is shown by the webhook's name, cut to a display name's length.
    let shown: String = name.chars().take(64).collect();
    let change = ProfileChange {
        display_name: validate::display_name(&shown)
            .is_ok()
            .then_some(Some(shown)),
        about: None,
    };
    if change.display_name.is_some() {
        return Ok(state.store.update_profile(bot.id, change).await?);
    }
    Ok(bot)
}

/// The channel's incoming webhooks (owner and admins), oldest first; never their
/// secrets.
#[utoipa::path(get, path = "/v1/channels/{id}/webhooks", tag = "webhooks", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id")),
    responses((status = 200, body = IncomingWebhookList),
              (status = 403, body = ErrorBody, description = "Not an owner or admin"),
              (status = 404, body = ErrorBody)))]
async fn list_webhooks(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<1>,
) -> ApiResult<Json<IncomingWebhookList>> {
    let PathIds([channel_id]) = path;
    let hooks = state
        .store
        .incoming_webhooks(auth.user.id, channel_id)
        .await?;
    Ok(Json(IncomingWebhookList {
        webhooks: hooks.iter().map(Into::into).collect(),
    }))
}

/// Deletes one of the channel's incoming webhooks (owner and admins): its URL stops
/// working at once. Its bot stays.
#[utoipa::path(delete, path = "/v1/channels/{id}/webhooks/{webhook_id}", tag = "webhooks", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id"),
           ("webhook_id" = super::openapi::Id, Path, description = "Webhook id")),
    responses((status = 204),
              (status = 403, body = ErrorBody, description = "Not an owner or admin"),
              (status = 404, body = ErrorBody)))]
async fn delete_webhook(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<2>,
) -> ApiResult<StatusCode> {
    let PathIds([channel_id, id]) = path;
    let deleted = state
        .store
        .delete_incoming_webhook(auth.user.id, channel_id, id)
        .await?;
    if !deleted {
        return Err(ApiError::not_found());
    }
    tracing::info!(
        target: "natter::audit",
        user = auth.user.id,
        channel = channel_id,
        webhook = id,
        "incoming webhook deleted"
    );
    Ok(no_content())
}

/// Posts a message to the webhook's channel as its bot. No `Authorization`: the secret
/// path is the credential. Idempotent by `client_id`, as every send.
#[utoipa::path(post, path = "/v1/hooks/{id}/{secret}", tag = "webhooks", request_body = HookMessage,
    params(("id" = super::openapi::Id, Path, description = "Channel id"),
           ("secret" = String, Path, min_length = 64, max_length = 64, pattern = "^[0-9a-f]{64}$", description = "The webhook's secret, from its path")),
    responses((status = 201, body = Message),
              (status = 200, body = Message, description = "A retry: the message this `client_id` already made"),
              (status = 403, body = ErrorBody, description = "`forbidden`: the bot may not post here (a broadcast channel where it is a plain member)"),
              (status = 404, body = ErrorBody, description = "No such webhook (deleted, or the bot left the channel)"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the webhook's or its bot's send limit")))]
async fn post_to_hook(
    State(state): State<AppState>,
    params: RawPathParams,
    JsonBody(body): JsonBody<HookMessage>,
) -> ApiResult<(StatusCode, Json<Message>)> {
    let mut values = params.iter().map(|(_, v)| v);
    let channel_id = values
        .next()
        .and_then(parse_id)
        .ok_or_else(ApiError::not_found)?;
    let secret = values.next().ok_or_else(ApiError::not_found)?;
    if secret.len() > 128 {
        return Err(ApiError::not_found());
    }
    let hook = state
        .store
        .incoming_webhook(channel_id, token_hash(secret))
        .await?
        .ok_or_else(ApiError::not_found)?;
    // A bot deleted with its owner's account posts nothing, even before it has left the
    // channel (and its webhooks with it).
    let bot = state.store.user(hook.bot_id).await?;
    if bot.is_none_or(|b| b.deleted) {
        return Err(ApiError::not_found());
    }
    state
        .hook_posts
        .take(&hook.id, Instant::now())
        .map_err(|w| state.rate_limited(Limit::Send, w))?;
    admit_send(&state, hook.bot_id, &body.text, body.client_id.as_deref())?;
    let posted = state
        .store
        .post_message(
            hook.bot_id,
            channel_id,
            &body.text,
            body.client_id.as_deref(),
        )
        .await?;
    let status = if posted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json((&posted.message).into())))
}
