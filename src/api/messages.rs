//! Messages and the channel event log.

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::dto::{
    EditMessage, ErrorBody, EventPage, MentionPage, Message, MessagePage, SendMessage, ThreadPage,
};
use super::error::{ApiError, ApiResult};
use super::extract::{Authed, JsonBody, Params, PathIds};
use super::{AppState, no_content, validate};
use crate::metrics::Limit;
use crate::model::HistoryQuery;
use crate::store::ReadFence;

pub(super) const DEFAULT_PAGE: i64 = 50;
pub(super) const MAX_PAGE: i64 = 200;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(send_message, list_messages))
        .routes(routes!(get_message, edit_message, delete_message))
        .routes(routes!(list_thread))
        .routes(routes!(list_mentions))
        .routes(routes!(list_events))
}

/// Sends a message, or with `thread_root_id` a reply in that message's thread. Answered
/// only after it is durably committed. A retry with the same `client_id` answers 200 with
/// the original message and creates nothing.
#[utoipa::path(post, path = "/v1/channels/{id}/messages", tag = "messages", security(("bearer" = [])), request_body = SendMessage,
    params(("id" = super::openapi::Id, Path, description = "Channel id")),
    responses((status = 201, body = Message), (status = 200, body = Message, description = "An earlier message with this client_id"),
              (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's send or text-bytes limit")))]
async fn send_message(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<1>,
    JsonBody(body): JsonBody<SendMessage>,
) -> ApiResult<(StatusCode, Json<Message>)> {
    let PathIds([id]) = path;
    let root = body
        .thread_root_id
        .as_deref()
        .map(|r| super::ws::parse_id("thread_root_id", r))
        .transpose()?;
    let files = attachment_ids(body.attachments.as_deref())?;
    let text = body.text.as_deref().unwrap_or_default();
    if files.is_empty() || !text.is_empty() {
        admit_send(&state, auth.user.id, text, body.client_id.as_deref())?;
    } else {
        // A message of files alone: the same checks but the text's.
        admit_post(&state, auth.user.id, 0, body.client_id.as_deref())?;
    }
    let client_id = body.client_id.as_deref();
    let posted = match root {
        _ if !files.is_empty() => {
            state
                .store
                .post_with_files(auth.user.id, id, root, text, client_id, &files, {
                    // Within half the grace period, so the collector (which waits the whole
                    // of it) never deletes an upload being attached.
                    crate::clock::now_ms() - state.config.files.grace.as_millis() as i64 / 2
                })
                .await?
        }
        Some(root) => {
            state
                .store
                .post_reply(auth.user.id, id, root, text, client_id)
                .await?
        }
        None => {
            state
                .store
                .post_message(auth.user.id, id, text, client_id)
                .await?
        }
    };
    let status = if posted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json((&posted.message).into())))
}

/// The uploads a send names, as ids: at most [`crate::store::MAX_ATTACHMENTS`]. The store
/// checks that each is the sender's, named once and young enough to attach.
fn attachment_ids(ids: Option<&[String]>) -> ApiResult<Vec<i64>> {
    let ids = ids.unwrap_or_default();
    if ids.len() > crate::store::MAX_ATTACHMENTS {
        return Err(ApiError::invalid_field(
            "attachments",
            format!(
                "a message carries at most {} files",
                crate::store::MAX_ATTACHMENTS
            ),
        ));
    }
    ids.iter()
        .map(|raw| super::ws::parse_id("attachments", raw))
        .collect()
}

/// The checks every send passes before it is queued, over REST and the WebSocket alike:
/// the text and `client_id` rules, then the sender's rate limit.
pub(super) fn admit_send(
    state: &AppState,
    user_id: i64,
    text: &str,
    client_id: Option<&str>,
) -> ApiResult<()> {
    validate::text(text)?;
    admit_post(state, user_id, text.len(), client_id)
}

/// A send's checks but the text's: its `client_id`, then the sender's rate limits.
fn admit_post(
    state: &AppState,
    user_id: i64,
    text_bytes: usize,
    client_id: Option<&str>,
) -> ApiResult<()> {
    if let Some(cid) = client_id {
        validate::client_id(cid)?;
    }
    state
        .sends
        .take(&user_id, Instant::now())
        .map_err(|w| state.rate_limited(Limit::Send, w))?;
    state.admit_bytes(user_id, text_bytes).inspect_err(|_| {
        state.sends.refund(&user_id);
    })
}

/// A page of history, ascending by seq. With no cursor: the newest `limit`; with
/// `before_seq`: the newest below it; with `after_seq`: the oldest above it.
#[utoipa::path(get, path = "/v1/channels/{id}/messages", tag = "messages", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id"),
           ("before_seq" = Option<i64>, Query, minimum = 0, description = "Only messages with a smaller seq"),
           ("after_seq" = Option<i64>, Query, minimum = 0, description = "Only messages with a larger seq"),
           ("limit" = Option<i64>, Query, minimum = 1, maximum = 200, description = "Messages per page, default 50")),
    responses((status = 200, body = MessagePage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn list_messages(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<1>,
    params: Params,
) -> ApiResult<Json<MessagePage>> {
    let PathIds([id]) = path;
    let query = HistoryQuery {
        before_seq: params.int("before_seq", 0, i64::MAX)?,
        after_seq: params.int("after_seq", 0, i64::MAX)?,
        limit: params.int("limit", 1, MAX_PAGE)?.unwrap_or(DEFAULT_PAGE) as u32,
    };
    let (through, fence) = member_of(&state, auth.user.id, id).await?;
    let page = state
        .gateway
        .reader
        .history(id, query, through, fence)
        .await?;
    Ok(Json(MessagePage {
        messages: with_reactions(&state, auth.user.id, id, &page.items).await?,
        has_more: page.has_more,
    }))
}

/// The messages as `viewer` sees them: each with its reactions.
async fn with_reactions(
    state: &AppState,
    viewer: i64,
    channel_id: i64,
    items: &[crate::model::Message],
) -> ApiResult<Vec<Message>> {
    let ids: Vec<i64> = items.iter().map(|m| m.id).collect();
    let mut reactions: std::collections::HashMap<i64, Vec<crate::model::ReactionCount>> = state
        .store
        .reactions(viewer, channel_id, &ids)
        .await?
        .into_iter()
        .collect();
    Ok(items
        .iter()
        .map(|m| {
            let mut out = Message::from(m);
            if let Some(list) = reactions.remove(&m.id) {
                out.reactions = list.iter().map(Into::into).collect();
            }
            out
        })
        .collect())
}

/// The caller's recent mentions: others' messages that name them (`@name`) in the
/// channels they are a member of, newest first, each as history shows it.
#[utoipa::path(get, path = "/v1/mentions", tag = "messages", security(("bearer" = [])),
    params(("before" = Option<super::openapi::Id>, Query, description = "The `next` of the previous page: only older mentions"),
           ("limit" = Option<i64>, Query, minimum = 1, maximum = 200, description = "Messages per page, default 50")),
    responses((status = 200, body = MentionPage), (status = 400, body = ErrorBody)))]
async fn list_mentions(
    State(state): State<AppState>,
    auth: Authed,
    params: Params,
) -> ApiResult<Json<MentionPage>> {
    let limit = params.int("limit", 1, MAX_PAGE)?.unwrap_or(DEFAULT_PAGE) as u32;
    let before = match params.str("before") {
        None => None,
        Some(cursor) => Some(super::extract::parse_id(cursor).ok_or_else(|| {
            ApiError::invalid_field("before", "before must be the `next` of a previous page")
        })?),
    };
    let page = state.store.mentions(auth.user.id, before, limit).await?;
    let next = match page.items.last() {
        Some(last) if page.has_more => Some(last.id.to_string()),
        _ => None,
    };
    let messages = across_channels(&state, auth.user.id, &page.items).await?;
    Ok(Json(MentionPage { messages, next }))
}

/// Messages of several channels, as history shows them, in the order given: one reactions
/// read per channel, not per message.
pub(super) async fn across_channels(
    state: &AppState,
    viewer: i64,
    items: &[crate::model::Message],
) -> ApiResult<Vec<Message>> {
    let mut by_channel: std::collections::BTreeMap<i64, Vec<crate::model::Message>> =
        std::collections::BTreeMap::new();
    for m in items {
        by_channel.entry(m.channel_id).or_default().push(m.clone());
    }
    let mut shown: std::collections::HashMap<String, Message> = std::collections::HashMap::new();
    for (channel, items) in &by_channel {
        for m in with_reactions(state, viewer, *channel, items).await? {
            shown.insert(m.id.clone(), m);
        }
    }
    Ok(items
        .iter()
        .filter_map(|m| shown.remove(&m.id.to_string()))
        .collect())
}

/// One message, as history shows it (deleted ones as tombstones): to open a message
/// found elsewhere (a search result, a mention, a thread's root).
#[utoipa::path(get, path = "/v1/channels/{id}/messages/{message_id}", tag = "messages", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id"), ("message_id" = super::openapi::Id, Path, description = "Message id")),
    responses((status = 200, body = Message), (status = 404, body = ErrorBody)))]
async fn get_message(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<2>,
) -> ApiResult<Json<Message>> {
    let PathIds([id, message_id]) = path;
    member_of(&state, auth.user.id, id).await?;
    let message = state
        .store
        .message(id, message_id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let mut shown = with_reactions(&state, auth.user.id, id, &[message]).await?;
    Ok(Json(shown.remove(0)))
}

/// A page of a thread: its root (a tombstone if deleted: the thread stays readable) and
/// replies, ascending by seq, paged as history: with no cursor the newest `limit`; with
/// `before_seq` the newest below it; with `after_seq` the oldest above it.
#[utoipa::path(get, path = "/v1/channels/{id}/threads/{root_id}/messages", tag = "messages", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id"),
           ("root_id" = super::openapi::Id, Path, description = "The thread's root message"),
           ("before_seq" = Option<i64>, Query, minimum = 0, description = "Only replies with a smaller seq"),
           ("after_seq" = Option<i64>, Query, minimum = 0, description = "Only replies with a larger seq"),
           ("limit" = Option<i64>, Query, minimum = 1, maximum = 200, description = "Replies per page, default 50")),
    responses((status = 200, body = ThreadPage), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody, description = "Not a member, or no such root in the channel (a reply is no root)")))]
async fn list_thread(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<2>,
    params: Params,
) -> ApiResult<Json<ThreadPage>> {
    let PathIds([id, root_id]) = path;
    let query = HistoryQuery {
        before_seq: params.int("before_seq", 0, i64::MAX)?,
        after_seq: params.int("after_seq", 0, i64::MAX)?,
        limit: params.int("limit", 1, MAX_PAGE)?.unwrap_or(DEFAULT_PAGE) as u32,
    };
    member_of(&state, auth.user.id, id).await?;
    let root = state
        .store
        .message(id, root_id)
        .await?
        .filter(|m| m.thread_root_id.is_none())
        .ok_or_else(ApiError::not_found)?;
    let page = state.store.thread(id, root_id, query).await?;
    let mut root = with_reactions(&state, auth.user.id, id, &[root]).await?;
    Ok(Json(ThreadPage {
        root: root.remove(0),
        messages: with_reactions(&state, auth.user.id, id, &page.items).await?,
        has_more: page.has_more,
    }))
}

/// Edits a message (author only); appends `message.edited`.
#[utoipa::path(patch, path = "/v1/channels/{id}/messages/{message_id}", tag = "messages", security(("bearer" = [])), request_body = EditMessage,
    params(("id" = super::openapi::Id, Path, description = "Channel id"), ("message_id" = super::openapi::Id, Path, description = "Message id")),
    responses((status = 200, body = Message), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "`too_many_edits`: the message was edited as often as allowed"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's write limits")))]
async fn edit_message(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<2>,
    JsonBody(body): JsonBody<EditMessage>,
) -> ApiResult<Json<Message>> {
    let PathIds([id, message_id]) = path;
    validate::text(&body.text)?;
    state.admit_write(auth.user.id, body.text.len())?;
    let message = state
        .store
        .edit_message(auth.user.id, id, message_id, &body.text)
        .await?;
    Ok(Json((&message).into()))
}

/// Deletes a message (author, owner or admin): it stays as a tombstone with its id and
/// seq, its text is removed everywhere, and `message.deleted` is appended.
#[utoipa::path(delete, path = "/v1/channels/{id}/messages/{message_id}", tag = "messages", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id"), ("message_id" = super::openapi::Id, Path, description = "Message id")),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's write limits")))]
async fn delete_message(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<2>,
) -> ApiResult<StatusCode> {
    let PathIds([id, message_id]) = path;
    state.admit_write(auth.user.id, 0)?;
    state
        .store
        .delete_message(auth.user.id, id, message_id)
        .await?;
    Ok(no_content())
}

/// The channel's event log after `after_seq`, ascending and gap-free.
#[utoipa::path(get, path = "/v1/channels/{id}/events", tag = "messages", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id"),
           ("after_seq" = Option<i64>, Query, minimum = 0, description = "Only events with a larger seq (default 0)"),
           ("limit" = Option<i64>, Query, minimum = 1, maximum = 200, description = "Events per page, default 50")),
    responses((status = 200, body = EventPage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn list_events(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<1>,
    params: Params,
) -> ApiResult<Response> {
    let PathIds([id]) = path;
    let after = params.int("after_seq", 0, i64::MAX)?.unwrap_or(0);
    let limit = params.int("limit", 1, MAX_PAGE)?.unwrap_or(DEFAULT_PAGE) as u32;
    let (through, fence) = member_of(&state, auth.user.id, id).await?;
    let page = state
        .gateway
        .reader
        .read_committed(id, after, through, limit, fence)
        .await?;
    // Each event's JSON is the frame fan-out encoded once; the page is spliced from them.
    let (events, has_more) = (&page.0, page.1);
    let mut body =
        String::with_capacity(events.iter().map(|d| d.frame.len() + 1).sum::<usize>() + 32);
    body.push_str(r#"{"events":["#);
    for (n, d) in events.iter().enumerate() {
        if n > 0 {
            body.push(',');
        }
        body.push_str(d.frame.as_str());
    }
    body.push_str(if has_more {
        r#"],"has_more":true}"#
    } else {
        r#"],"has_more":false}"#
    });
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `NotFound` unless `user_id` is a member of the channel: reads from the cache and the
/// store's unchecked reads come after this. Returns the channel's newest seq as the store
/// shows it now: a cached answer must reach it (read-your-writes on any node); and the
/// fence a replica must have replayed past to answer instead of the primary.
pub(super) async fn member_of(
    state: &AppState,
    user_id: i64,
    channel_id: i64,
) -> ApiResult<(i64, ReadFence)> {
    match state.store.channel_to_read(channel_id, user_id).await? {
        Some((channel, _, fence)) => Ok((channel.last_seq, fence)),
        None => Err(ApiError::not_found()),
    }
}
