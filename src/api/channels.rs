//! Channels, DMs, members and read markers.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::dto::{
    Channel, ChannelList, CreateChannel, ErrorBody, MarkRead, Member, MemberList, OpenDm,
    PutMember, UpdateChannel, User,
};
use super::error::{ApiError, ApiResult};
use super::extract::{Authed, JsonBody, Params, PathIds, parse_id};
use super::{AppState, no_content, validate};
use crate::model::{ChannelKind, Role};

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_channel, list_channels))
        .routes(routes!(get_channel, update_channel))
        .routes(routes!(open_dm))
        .routes(routes!(list_members))
        .routes(routes!(put_member, remove_member))
        .routes(routes!(mark_read))
}

/// Creates a group or broadcast channel; the caller is its owner.
#[utoipa::path(post, path = "/v1/channels", tag = "channels", security(("bearer" = [])), request_body = CreateChannel,
    responses((status = 201, body = Channel), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody, description = "`forbidden`: a listed user may not be added by the caller"),
              (status = 404, body = ErrorBody, description = "`not_found`: a listed user does not exist"),
              (status = 409, body = ErrorBody, description = "`too_many_channels`: the caller or a listed user is at the channel cap"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's channel-creation or write limits")))]
async fn create_channel(
    State(state): State<AppState>,
    auth: Authed,
    JsonBody(body): JsonBody<CreateChannel>,
) -> ApiResult<(StatusCode, Json<Channel>)> {
    validate::channel_name(&body.name)?;
    let kind = match ChannelKind::parse(&body.kind) {
        Some(k @ (ChannelKind::Group | ChannelKind::Broadcast)) => k,
        _ => {
            return Err(ApiError::invalid_field(
                "kind",
                "kind must be \"group\" or \"broadcast\" (open DMs with POST /v1/dms)",
            ));
        }
    };
    if body.members.len() > validate::MAX_INITIAL_MEMBERS {
        return Err(ApiError::invalid_field(
            "members",
            "at most 1000 initial members",
        ));
    }
    let members = body
        .members
        .iter()
        .map(|m| {
            parse_id(m).ok_or_else(|| {
                ApiError::invalid_field("members", format!("{m:?} is not a user id"))
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    state.admit_write(auth.user.id, body.name.len())?;
    state.admit_channel_create(auth.user.id)?;
    let channel = state
        .store
        .create_channel(auth.user.id, kind, &body.name, &members)
        .await
        .inspect_err(|_| state.refund_channel_create(auth.user.id))?;
    Ok((StatusCode::CREATED, Json((&channel).into())))
}

/// The caller's channels, with role, read marker and unread count, by ascending id, a
/// page at a time: `next_after` is the `after` of the next page (absent on the last).
#[utoipa::path(get, path = "/v1/channels", tag = "channels", security(("bearer" = [])),
    params(super::openapi::ChannelPage),
    responses((status = 200, body = ChannelList), (status = 400, body = ErrorBody)))]
async fn list_channels(
    State(state): State<AppState>,
    auth: Authed,
    params: Params,
) -> ApiResult<Json<ChannelList>> {
    let after = match params.str("after") {
        None | Some("") => 0,
        Some(raw) => parse_id(raw).ok_or_else(|| {
            ApiError::invalid_field("after", "after must be a channel id from next_after")
        })?,
    };
    let limit = params
        .int("limit", 1, MAX_CHANNEL_PAGE)?
        .unwrap_or(MAX_CHANNEL_PAGE) as usize;
    // The store's list is bounded by the channel cap and comes ordered by id. Channels
    // that cannot be read now (a PostgreSQL shard is down) take their place in the pages
    // by id, named in `unavailable`.
    let listing = state.store.channel_listing(auth.user.id).await?;
    let mut ids: Vec<(i64, Option<&crate::model::ChannelView>)> = listing
        .views
        .iter()
        .map(|v| (v.channel.id, Some(v)))
        .chain(listing.unavailable.iter().map(|&id| (id, None)))
        .collect();
    ids.sort_unstable_by_key(|(id, _)| *id);
    let start = ids.partition_point(|(id, _)| *id <= after);
    let page = &ids[start..ids.len().min(start + limit)];
    let next_after = (start + page.len() < ids.len())
        .then(|| page.last().map(|(id, _)| id.to_string()))
        .flatten();
    Ok(Json(ChannelList {
        channels: page
            .iter()
            .filter_map(|(_, v)| v.map(Channel::from))
            .collect(),
        next_after,
        unavailable: page
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(id, _)| id.to_string())
            .collect(),
    }))
}

/// The most channels one page holds, and the default: the default channel cap, so a client
/// that does not page gets every channel of a user within it.
pub(super) const MAX_CHANNEL_PAGE: i64 = 2000;

/// Opens the DM with another user: 201 when created, 200 when it already existed.
#[utoipa::path(post, path = "/v1/dms", tag = "channels", security(("bearer" = [])), request_body = OpenDm,
    responses((status = 201, body = Channel), (status = 200, body = Channel), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "`too_many_channels`: either user is at the channel cap"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's channel-creation or write limits")))]
async fn open_dm(
    State(state): State<AppState>,
    auth: Authed,
    JsonBody(body): JsonBody<OpenDm>,
) -> ApiResult<(StatusCode, Json<Channel>)> {
    let peer = parse_id(&body.user_id)
        .ok_or_else(|| ApiError::invalid_field("user_id", "user_id must be a user id"))?;
    state.admit_write(auth.user.id, 0)?;
    state.admit_channel_create(auth.user.id)?;
    let opened = state.store.open_dm(auth.user.id, peer).await;
    if !matches!(opened, Ok((_, true))) {
        state.refund_channel_create(auth.user.id);
    }
    let (channel, created) = opened?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json((&channel).into())))
}

/// One channel the caller is a member of.
#[utoipa::path(get, path = "/v1/channels/{id}", tag = "channels", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id")),
    responses((status = 200, body = Channel), (status = 404, body = ErrorBody)))]
async fn get_channel(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<1>,
) -> ApiResult<Json<Channel>> {
    let PathIds([id]) = path;
    let (channel, _) = state
        .store
        .channel(id, auth.user.id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok(Json((&channel).into()))
}

/// Renames a group or broadcast channel (owner/admin); appends `channel.updated`.
#[utoipa::path(patch, path = "/v1/channels/{id}", tag = "channels", security(("bearer" = [])), request_body = UpdateChannel,
    params(("id" = super::openapi::Id, Path, description = "Channel id")),
    responses((status = 200, body = Channel), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's write limits")))]
async fn update_channel(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<1>,
    JsonBody(body): JsonBody<UpdateChannel>,
) -> ApiResult<Json<Channel>> {
    let PathIds([id]) = path;
    validate::channel_name(&body.name)?;
    state.admit_write(auth.user.id, body.name.len())?;
    let channel = state
        .store
        .rename_channel(auth.user.id, id, &body.name)
        .await?;
    Ok(Json((&channel).into()))
}

/// The channel's members and their roles.
#[utoipa::path(get, path = "/v1/channels/{id}/members", tag = "channels", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id")),
    responses((status = 200, body = MemberList), (status = 404, body = ErrorBody)))]
async fn list_members(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<1>,
) -> ApiResult<Json<MemberList>> {
    let PathIds([id]) = path;
    let members = state.store.members(auth.user.id, id).await?;
    let members = members
        .iter()
        .map(|m| Member {
            user: User::from(&m.user),
            role: m.role.as_str(),
        })
        .collect();
    Ok(Json(MemberList { members }))
}

/// Adds a member, or changes a member's role (owner/admin only).
#[utoipa::path(put, path = "/v1/channels/{id}/members/{user_id}", tag = "channels", security(("bearer" = [])),
    request_body(content = Option<PutMember>, description = "Optional: no body, `null` or the object"),
    params(("id" = super::openapi::Id, Path, description = "Channel id"), ("user_id" = super::openapi::Id, Path, description = "User id")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "`too_many_channels`: the user is at the channel cap"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's write limits")))]
async fn put_member(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<2>,
    JsonBody(body): JsonBody<Option<PutMember>>,
) -> ApiResult<StatusCode> {
    let PathIds([id, user_id]) = path;
    let body = body.unwrap_or_default();
    let role = match body.role.as_deref() {
        None => None,
        Some("member") => Some(Role::Member),
        Some("admin") => Some(Role::Admin),
        Some(_) => {
            return Err(ApiError::invalid_field(
                "role",
                "role must be \"member\" or \"admin\"",
            ));
        }
    };
    state.admit_write(auth.user.id, 0)?;
    state
        .store
        .put_member(auth.user.id, id, user_id, role)
        .await?;
    Ok(no_content())
}

/// Removes a member: yourself to leave, or another member as owner/admin.
#[utoipa::path(delete, path = "/v1/channels/{id}/members/{user_id}", tag = "channels", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id"), ("user_id" = super::openapi::Id, Path, description = "User id")),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's write limits")))]
async fn remove_member(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<2>,
) -> ApiResult<StatusCode> {
    let PathIds([id, user_id]) = path;
    state.admit_write(auth.user.id, 0)?;
    state.store.remove_member(auth.user.id, id, user_id).await?;
    Ok(no_content())
}

/// Moves the caller's read marker forward (never backwards; clamped to the last seq).
#[utoipa::path(put, path = "/v1/channels/{id}/read", tag = "channels", security(("bearer" = [])), request_body = MarkRead,
    params(("id" = super::openapi::Id, Path, description = "Channel id")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's write limits")))]
async fn mark_read(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<1>,
    JsonBody(body): JsonBody<MarkRead>,
) -> ApiResult<StatusCode> {
    let PathIds([id]) = path;
    if body.seq < 0 {
        return Err(ApiError::invalid_field("seq", "seq must not be negative"));
    }
    state.admit_read_marker(auth.user.id)?;
    state.store.mark_read(auth.user.id, id, body.seq).await?;
    Ok(no_content())
}
