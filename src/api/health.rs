//! Health endpoints for load balancers and orchestrators.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::ApiError;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// The server accepts traffic: 503 while draining, once the embedded store's writer has
/// ended (it takes no more writes), and while writes are refused for disk space (reads
/// still work; a balancer should prefer other servers). The body names each
/// part of the store and whether it answers (`shard1: down`): a PostgreSQL shard that is
/// down fails only the channels it holds, and every node sees it alike, so it does not
/// take the node out of the balancer (its channels answer 503 `unavailable`). In cluster
/// mode a `bus: up|down` line says whether the node reaches NATS (down, deliveries between
/// nodes come by the periodic check; the node stays ready).
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = String), (status = 503, body = super::dto::ErrorBody)))]
async fn readyz(State(state): State<AppState>) -> Result<(StatusCode, String), ApiError> {
    if !state.ready.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable());
    }
    let health = state.store.health();
    if health.writes_ended {
        return Err(ApiError::unavailable());
    }
    if health.disk_full {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            ..ApiError::insufficient_storage()
        });
    }
    let mut body = String::from("ready");
    // A cluster bus that is down slows deliveries between nodes (they come by the
    // periodic check) but every node sees it alike: named, not a reason to leave.
    let bus = state.gateway.bus.health();
    for (part, up) in health
        .parts
        .iter()
        .map(|(p, up)| (p.as_str(), *up))
        .chain(bus)
    {
        body.push_str(&format!("\n{part}: {}", if up { "up" } else { "down" }));
    }
    Ok((StatusCode::OK, body))
}
