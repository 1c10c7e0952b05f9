//! Presence over REST: how a channel's members stand now (the WebSocket's
//! `presence.subscribe` tells the changes).

use axum::Json;
use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::dto::{ErrorBody, PresenceList};
use super::error::ApiResult;
use super::extract::{Authed, PathIds};

/// The members of a channel whose presence `user_id` may see: all of a group or broadcast
/// channel's; of a DM, the other one only once they answered it (or opened it), so a
/// stranger cannot watch someone by opening a DM. `NotFound` for a non-member.
pub(crate) async fn visible_members(
    state: &AppState,
    user_id: i64,
    channel_id: i64,
) -> Result<Vec<i64>, crate::store::StoreError> {
    let (channel, _) = state
        .store
        .channel(channel_id, user_id)
        .await?
        .ok_or(crate::store::StoreError::NotFound)?;
    let members = state.store.members(user_id, channel_id).await?;
    let mut ids: Vec<i64> = members.iter().map(|m| m.user.id).collect();
    if channel.kind == crate::model::ChannelKind::Dm {
        let others: Vec<i64> = ids.iter().copied().filter(|u| *u != user_id).collect();
        let shared = state.store.sharing(user_id, &others).await?;
        ids.retain(|u| *u == user_id || shared.contains(u));
    }
    Ok(ids)
}

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(channel_presence))
}

/// The presence of the channel's members: `online`, `idle` or `offline`, with when an
/// offline one was last online. Members only (404 for anyone else).
#[utoipa::path(get, path = "/v1/channels/{id}/presence", tag = "channels", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Channel id")),
    responses((status = 200, body = PresenceList), (status = 404, body = ErrorBody)))]
async fn channel_presence(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<1>,
) -> ApiResult<Json<PresenceList>> {
    let PathIds([id]) = path;
    let ids = visible_members(&state, auth.user.id, id).await?;
    let seen = state.gateway.presence.of(&ids).await;
    Ok(Json(PresenceList {
        members: seen.iter().map(Into::into).collect(),
    }))
}
