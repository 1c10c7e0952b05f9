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
    let members = state.store.members(auth.user.id, id).await?;
    let ids: Vec<i64> = members.iter().map(|m| m.user.id).collect();
    let seen = state.gateway.presence.of(&ids).await;
    Ok(Json(PresenceList {
        members: seen.iter().map(Into::into).collect(),
    }))
}
