//! Bots and API keys. A user makes bot accounts (users without a password, marked as
//! bots) and API keys that act as them or as one of their bots, each with scopes
//! ([`super::scopes`]), a name, an optional expiry and a last-used time. A key's token is
//! shown once and stored as a digest; deleting a key ends it at once, on every node and
//! on its open WebSockets. All of it is managed from a login session, never with a key.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::dto::{
    ApiKey, ApiKeyList, BotList, CreatedApiKey, ErrorBody, NewApiKey, NewBot, UpdateProfile, User,
};
use super::error::{ApiError, ApiResult};
use super::extract::{API_KEY_PREFIX, Authed, JsonBody, PathIds};
use super::scopes::{Scope, Scopes};
use super::{AppState, no_content, validate};
use crate::auth::{new_token, token_hash};
use crate::clock::now_ms;
use crate::model::ProfileChange;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_bot, list_bots))
        .routes(routes!(update_bot))
        .routes(routes!(create_key, list_keys))
        .routes(routes!(delete_key))
}

/// Longest lifetime a key may be given, in days.
const MAX_KEY_DAYS: i64 = 3650;

/// Makes a bot account owned by the caller. It cannot log in; it acts through the API
/// keys its owner makes for it, and joins channels as a user does (its owner may add it
/// to any channel they are in).
#[utoipa::path(post, path = "/v1/bots", tag = "bots and keys", security(("bearer" = [])), request_body = NewBot,
    responses((status = 201, body = User),
              (status = 400, body = ErrorBody, description = "`invalid_field`: the name breaks the rules of usernames"),
              (status = 403, body = ErrorBody, description = "`session_required`, or a bot making a bot"),
              (status = 409, body = ErrorBody, description = "`username_taken`, or `too_many_bots`")))]
async fn create_bot(
    State(state): State<AppState>,
    auth: Authed,
    JsonBody(body): JsonBody<NewBot>,
) -> ApiResult<(StatusCode, Json<User>)> {
    let username = validate::username(&body.username)?;
    let change = profile_change(body.display_name, body.about)?;
    state.admit_write(auth.user.id, username.len())?;
    let mut bot = state.store.create_bot(auth.user.id, &username).await?;
    if change.display_name.is_some() || change.about.is_some() {
        bot = state.store.update_profile(bot.id, change).await?;
    }
    tracing::info!(target: "natter::audit", user = auth.user.id, bot = bot.id, "bot created");
    Ok((StatusCode::CREATED, Json((&bot).into())))
}

/// The caller's bots, oldest first.
#[utoipa::path(get, path = "/v1/bots", tag = "bots and keys", security(("bearer" = [])),
    responses((status = 200, body = BotList), (status = 401, body = ErrorBody)))]
async fn list_bots(State(state): State<AppState>, auth: Authed) -> ApiResult<Json<BotList>> {
    let bots = state.store.bots(auth.user.id).await?;
    Ok(Json(BotList {
        bots: bots.iter().map(Into::into).collect(),
    }))
}

/// Changes one of the caller's bots' display name and about text (a field left out
/// stays, `null` clears it).
#[utoipa::path(patch, path = "/v1/bots/{id}", tag = "bots and keys", security(("bearer" = [])), request_body = UpdateProfile,
    params(("id" = super::openapi::Id, Path, description = "The bot's user id")),
    responses((status = 200, body = User), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody, description = "The caller has no such bot")))]
async fn update_bot(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<1>,
    JsonBody(body): JsonBody<UpdateProfile>,
) -> ApiResult<Json<User>> {
    let PathIds([id]) = path;
    let change = ProfileChange {
        display_name: body.display_name,
        about: body.about,
    };
    check_profile(&change)?;
    let bytes = [&change.display_name, &change.about]
        .iter()
        .map(|f| f.as_ref().and_then(Option::as_ref).map_or(0, String::len))
        .sum();
    state.admit_write(auth.user.id, bytes)?;
    let owned = state
        .store
        .user(id)
        .await?
        .is_some_and(|u| u.bot_owner == Some(auth.user.id));
    if !owned {
        return Err(ApiError::not_found());
    }
    let bot = state.store.update_profile(id, change).await?;
    for channel in state.store.channels(bot.id).await.unwrap_or_default() {
        state.gateway.bus.profile(channel.channel.id, &bot);
    }
    Ok(Json((&bot).into()))
}

fn profile_change(display_name: Option<String>, about: Option<String>) -> ApiResult<ProfileChange> {
    let change = ProfileChange {
        display_name: display_name.map(Some),
        about: about.map(Some),
    };
    check_profile(&change)?;
    Ok(change)
}

fn check_profile(change: &ProfileChange) -> ApiResult<()> {
    if let Some(Some(name)) = &change.display_name {
        validate::display_name(name)?;
    }
    if let Some(Some(about)) = &change.about {
        validate::about(about)?;
    }
    Ok(())
}

/// Makes an API key that acts as the caller or as one of their bots. The answer holds
/// its token, shown this once: the server keeps only its digest.
#[utoipa::path(post, path = "/v1/keys", tag = "bots and keys", security(("bearer" = [])), request_body = NewApiKey,
    responses((status = 201, body = CreatedApiKey),
              (status = 400, body = ErrorBody, description = "`invalid_field`: the name, a scope or the expiry"),
              (status = 403, body = ErrorBody, description = "`session_required`: keys are made from a login"),
              (status = 404, body = ErrorBody, description = "`user_id` names none of the caller's bots"),
              (status = 409, body = ErrorBody, description = "`too_many_api_keys`")))]
async fn create_key(
    State(state): State<AppState>,
    auth: Authed,
    JsonBody(body): JsonBody<NewApiKey>,
) -> ApiResult<(StatusCode, Json<CreatedApiKey>)> {
    // A channel name's rules (1–100 characters, no control or bidi character).
    validate::channel_name(&body.name)?;
    let name = body.name.as_str();
    if body.scopes.is_empty() {
        return Err(ApiError::invalid_field(
            "scopes",
            "a key needs at least one scope",
        ));
    }
    let mut scopes = Scopes::default();
    for s in &body.scopes {
        let scope = Scope::parse(s).ok_or_else(|| {
            let known: Vec<&str> = Scope::ALL.iter().map(|s| s.name()).collect();
            ApiError::invalid_field(
                "scopes",
                format!("unknown scope {s:?}; the scopes are {}", known.join(", ")),
            )
        })?;
        scopes.insert(scope);
    }
    let user_id = match &body.user_id {
        Some(id) => super::ws::parse_id("user_id", id)?,
        None => auth.user.id,
    };
    let expires_at = match body.expires_in_days {
        None => None,
        Some(days @ 1..=MAX_KEY_DAYS) => Some(now_ms() + days * 86_400_000),
        Some(_) => {
            return Err(ApiError::invalid_field(
                "expires_in_days",
                format!("expires_in_days must be 1 to {MAX_KEY_DAYS}"),
            ));
        }
    };
    state.admit_write(auth.user.id, name.len())?;
    let token = format!("{API_KEY_PREFIX}{}", new_token());
    let key = crate::store::NewApiKey {
        token: token_hash(&token),
        user_id,
        name: name.to_owned(),
        scopes: scopes.stored(),
        expires_at,
    };
    let key = state.store.create_api_key(auth.user.id, key).await?;
    tracing::info!(
        target: "natter::audit",
        user = auth.user.id,
        key = key.id,
        acts_as = key.user_id,
        scopes = %key.scopes,
        "API key created"
    );
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey {
            key: (&key).into(),
            token: token.into(),
        }),
    ))
}

/// The API keys the caller holds (for themself and their bots), newest first. Tokens
/// are never shown again.
#[utoipa::path(get, path = "/v1/keys", tag = "bots and keys", security(("bearer" = [])),
    responses((status = 200, body = ApiKeyList), (status = 401, body = ErrorBody)))]
async fn list_keys(State(state): State<AppState>, auth: Authed) -> ApiResult<Json<ApiKeyList>> {
    let keys = state.store.api_keys(auth.user.id).await?;
    Ok(Json(ApiKeyList {
        keys: keys.iter().map(ApiKey::from).collect(),
    }))
}

/// Revokes one of the caller's API keys: it stops working at once, on every node, and
/// its WebSockets are closed with 4001.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "bots and keys", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Key id from GET /v1/keys")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete_key(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<1>,
) -> ApiResult<StatusCode> {
    // Not charged to the write budget, as ending a session is not: a leak must be
    // stoppable whatever else the owner did.
    let PathIds([id]) = path;
    let (acts_as, token) = state
        .store
        .delete_api_key(auth.user.id, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    super::accounts::revoke(&state, acts_as, &token);
    tracing::info!(target: "natter::audit", user = auth.user.id, key = id, "API key revoked");
    Ok(no_content())
}
