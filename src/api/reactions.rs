//! Reactions to messages: add and take back one emoji (idempotent), list a message's
//! reactions, and page who reacted with one emoji. Each change is a `reaction.added` or
//! `reaction.removed` event in the channel's log.

use axum::Json;
use axum::extract::{FromRequestParts, RawPathParams, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::dto::{ErrorBody, Reaction, ReactionList, Reactor, ReactorPage, User};
use super::error::{ApiError, ApiResult};
use super::extract::{Authed, Params, PathIds, parse_id};
use super::{AppState, no_content, validate};
use crate::clock::rfc3339;
use crate::config::Feature;

/// Reactors per page, by default and at most.
const DEFAULT_REACTORS: i64 = 50;
const MAX_REACTORS: i64 = 200;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(add_reaction, remove_reaction, list_reactors))
        .routes(routes!(list_reactions))
}

/// `/v1/channels/{id}/messages/{message_id}/reactions/{emoji}`: the two ids, and the
/// emoji checked and in its canonical form. An id or an emoji that is not one is a 404,
/// as for every path.
struct ReactionPath {
    channel_id: i64,
    message_id: i64,
    emoji: &'static str,
}

impl<S: Send + Sync> FromRequestParts<S> for ReactionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found())?;
        let values: Vec<&str> = params.iter().map(|(_, v)| v).collect();
        let [channel, message, emoji] = values[..] else {
            return Err(ApiError::not_found());
        };
        let (Some(channel_id), Some(message_id)) = (parse_id(channel), parse_id(message)) else {
            return Err(ApiError::not_found());
        };
        Ok(Self {
            channel_id,
            message_id,
            emoji: validate::emoji(emoji)?,
        })
    }
}

/// Reacts to a message with one emoji. Any member may react, in broadcast channels too;
/// reacting again with the same emoji changes nothing (and appends no event).
#[utoipa::path(put, path = "/v1/channels/{id}/messages/{message_id}/reactions/{emoji}", tag = "messages", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id"), ("message_id" = super::openapi::Id, Path, description = "Message id"),
           ("emoji" = String, Path, min_length = 1, max_length = 64, description = "One Unicode emoji, percent-encoded, e.g. `%F0%9F%91%8D` for 👍")),
    responses((status = 204, description = "The caller's reaction is there (added now, or already)"),
              (status = 404, body = ErrorBody, description = "No such channel for the caller, no such live message in it, or the path's emoji is not one"),
              (status = 409, body = ErrorBody, description = "`too_many_reactions`: the message has as many different emoji as allowed"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's write limits")))]
async fn add_reaction(
    State(state): State<AppState>,
    auth: Authed,
    path: ReactionPath,
) -> ApiResult<StatusCode> {
    react(&state, &auth, &path, true).await
}

/// Takes back the caller's reaction with this emoji; taking back one that is not there
/// succeeds and changes nothing.
#[utoipa::path(delete, path = "/v1/channels/{id}/messages/{message_id}/reactions/{emoji}", tag = "messages", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id"), ("message_id" = super::openapi::Id, Path, description = "Message id"),
           ("emoji" = String, Path, min_length = 1, max_length = 64, description = "One Unicode emoji, percent-encoded")),
    responses((status = 204, description = "The caller's reaction is not there (taken back now, or already)"),
              (status = 404, body = ErrorBody, description = "No such channel for the caller, no such live message in it, or the path's emoji is not one"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's write limits")))]
async fn remove_reaction(
    State(state): State<AppState>,
    auth: Authed,
    path: ReactionPath,
) -> ApiResult<StatusCode> {
    react(&state, &auth, &path, false).await
}

async fn react(
    state: &AppState,
    auth: &Authed,
    path: &ReactionPath,
    add: bool,
) -> ApiResult<StatusCode> {
    if !state.config.features.enabled(Feature::Reactions) {
        return Err(ApiError::forbidden(
            "reactions are turned off on this server",
        ));
    }
    state.admit_write(auth.user.id, path.emoji.len())?;
    state
        .store
        .react(
            auth.user.id,
            path.channel_id,
            path.message_id,
            path.emoji,
            add,
        )
        .await?;
    Ok(no_content())
}

/// Who reacted with this emoji, in the order they did.
#[utoipa::path(get, path = "/v1/channels/{id}/messages/{message_id}/reactions/{emoji}", tag = "messages", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id"), ("message_id" = super::openapi::Id, Path, description = "Message id"),
           ("emoji" = String, Path, min_length = 1, max_length = 64, description = "One Unicode emoji, percent-encoded"),
           ("after" = Option<super::openapi::Id>, Query, description = "The `next` of the previous page"),
           ("limit" = Option<i64>, Query, minimum = 1, maximum = 200, description = "Users per page, default 50")),
    responses((status = 200, body = ReactorPage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn list_reactors(
    State(state): State<AppState>,
    auth: Authed,
    path: ReactionPath,
    params: Params,
) -> ApiResult<Json<ReactorPage>> {
    let limit = params
        .int("limit", 1, MAX_REACTORS)?
        .unwrap_or(DEFAULT_REACTORS) as u32;
    let after = match params.str("after") {
        None => None,
        Some(cursor) => Some(parse_cursor(cursor).ok_or_else(|| {
            ApiError::invalid_field("after", "after must be the `next` of a previous page")
        })?),
    };
    super::messages::member_of(&state, auth.user.id, path.channel_id).await?;
    live_message(&state, path.channel_id, path.message_id).await?;
    let page = state
        .store
        .reactors(path.channel_id, path.message_id, path.emoji, after, limit)
        .await?;
    let next = match page.items.last() {
        Some(last) if page.has_more => Some(last.seq.to_string()),
        _ => None,
    };
    Ok(Json(ReactorPage {
        users: page
            .items
            .iter()
            .map(|r| Reactor {
                user: User::from(&r.user),
                at: rfc3339(r.at),
            })
            .collect(),
        next,
    }))
}

/// A seq, as `next` writes it.
fn parse_cursor(s: &str) -> Option<i64> {
    parse_id(s)
}

/// A message's reactions: each emoji with its count and whether the caller is among
/// them, in the order the emoji were first used. A message without any has none.
#[utoipa::path(get, path = "/v1/channels/{id}/messages/{message_id}/reactions", tag = "messages", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id"), ("message_id" = super::openapi::Id, Path, description = "Message id")),
    responses((status = 200, body = ReactionList), (status = 404, body = ErrorBody)))]
async fn list_reactions(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<2>,
) -> ApiResult<Json<ReactionList>> {
    let PathIds([id, message_id]) = path;
    super::messages::member_of(&state, auth.user.id, id).await?;
    live_message(&state, id, message_id).await?;
    let found = state
        .store
        .reactions(auth.user.id, id, &[message_id])
        .await?;
    Ok(Json(ReactionList {
        reactions: found
            .into_iter()
            .flat_map(|(_, list)| list)
            .map(|r| Reaction::from(&r))
            .collect(),
    }))
}

/// `NotFound` unless the channel has this message, not deleted (a deleted one has no
/// reactions).
async fn live_message(state: &AppState, channel_id: i64, message_id: i64) -> ApiResult<()> {
    match state.store.message(channel_id, message_id).await? {
        Some(m) if !m.deleted => Ok(()),
        _ => Err(ApiError::not_found()),
    }
}
