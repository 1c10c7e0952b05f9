//! The HTTP API v1 as a value: [`app`] builds the router over an [`AppState`], so tests
//! drive it over a real socket. The OpenAPI document is generated from the same route
//! table (utoipa-axum), so it cannot drift from what is served.

mod accounts;
mod channels;
pub mod dto;
pub mod error;
pub mod extract;
mod health;
mod messages;
mod sessions;
pub mod validate;
pub mod ws;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;

use self::error::ApiError;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::ratelimit::RateLimiter;
use crate::store::Store;

/// Everything a request handler needs, shared by all of them.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    store: Arc<dyn Store>,
    config: Config,
    gateway: Gateway,
    ready: AtomicBool,
    sessions: sessions::SessionCache,
    /// Verified against when a login names no account, so that failure costs the same time.
    dummy_hash: String,
    sends: RateLimiter<i64>,
    login_failures_by_user: RateLimiter<String>,
    login_failures_by_ip: RateLimiter<IpAddr>,
    signups_by_ip: RateLimiter<IpAddr>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(store: Arc<dyn Store>, config: Config, gateway: Gateway) -> Self {
        let limits = config.limits;
        Self(Arc::new(Inner {
            store,
            gateway,
            ready: AtomicBool::new(true),
            sessions: sessions::SessionCache::default(),
            dummy_hash: crate::auth::hash_password("natter dummy password", config.hash_cost)
                .expect("hash a password at start-up"),
            sends: RateLimiter::new(limits.send),
            login_failures_by_user: RateLimiter::new(limits.login_failures_per_user),
            login_failures_by_ip: RateLimiter::new(limits.login_failures_per_ip),
            signups_by_ip: RateLimiter::new(limits.signups_per_ip),
            config,
        }))
    }

    /// Marks the server as draining: `/readyz` answers 503 from now on.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Natter API", version = "1", description = "Real-time messaging: accounts, channels, durable messages and each channel's gap-free event log."),
    modifiers(&BearerAuth),
    components(schemas(dto::ErrorBody, dto::ErrorDetail))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The route table and the OpenAPI document it generates.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(accounts::routes())
        .merge(channels::routes())
        .merge(messages::routes())
        .merge(health::routes())
        .routes(utoipa_axum::routes!(ws::upgrade))
}

/// The OpenAPI 3.1 document of API v1.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().split_for_parts().1
}

/// The whole HTTP application over `state`.
pub fn app(state: AppState) -> Router {
    let (router, spec) = routes().split_for_parts();
    let spec = Arc::new(spec);
    router
        .route(
            "/v1/openapi.json",
            axum::routing::get(move || {
                let spec = Arc::clone(&spec);
                async move { axum::Json(spec.as_ref().clone()) }
            }),
        )
        .route("/metrics", axum::routing::get(metrics))
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| -> Response {
                tracing::error!("request handler panicked");
                ApiError::internal().into_response()
            },
        ))
        .with_state(state)
}

/// Prometheus text format of the server's counters.
async fn metrics(axum::extract::State(state): axum::extract::State<AppState>) -> Response {
    let mut body = String::new();
    state.gateway.hub.stats().render(&mut body);
    crate::process::render(&mut body);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
        .into_response()
}

/// A 204 answer.
fn no_content() -> StatusCode {
    StatusCode::NO_CONTENT
}
