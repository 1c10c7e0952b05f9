//! The HTTP API v1 as a value: [`app`] builds the router over an [`AppState`], so tests
//! drive it over a real socket. The OpenAPI document is generated from the same route
//! table (utoipa-axum), so it cannot drift from what is served.

mod accounts;
mod channels;
pub use crate::wire::dto;
pub mod error;
mod export;
pub mod extract;
mod files;
mod health;
mod keys;
mod messages;
mod observe;
mod openapi;
pub(crate) mod presence;
mod reactions;
pub mod scopes;
mod search;
mod security;
mod sessions;
pub mod validate;
mod web;
mod webhooks;
pub mod ws;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use self::error::ApiError;
use crate::config::{Config, Feature};
use crate::gateway::Gateway;
use crate::metrics::{EdgeStats, HttpMetrics, Limit};
use crate::ratelimit::RateLimiter;
use crate::store::Store;

/// Searches that run at once on a node; more wait their turn.
const SEARCHES_AT_ONCE: usize = 2;

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
    /// Posts through each incoming webhook (by its id), beside its bot's own limits.
    hook_posts: RateLimiter<i64>,
    /// Writes other than sends, per user.
    write_ops: RateLimiter<i64>,
    /// Bytes of message text, per user.
    write_bytes: RateLimiter<i64>,
    channel_creates: RateLimiter<i64>,
    read_markers: RateLimiter<i64>,
    searches: RateLimiter<i64>,
    /// Searches running at once on this node: each may hold a read connection for its
    /// whole budget, and history reads share the pool.
    search_slots: tokio::sync::Semaphore,
    /// Typing signals per (user, channel), over all of the user's connections.
    typing: RateLimiter<(i64, i64)>,
    /// Failed logins per (username, client address key).
    login_failures_by_user: RateLimiter<(String, IpAddr)>,
    login_failures_by_account: RateLimiter<String>,
    login_failures_by_ip: RateLimiter<IpAddr>,
    /// Wrong two-factor codes per account (user id), from everywhere.
    code_failures: RateLimiter<i64>,
    signups_by_ip: RateLimiter<IpAddr>,
    /// Bounds the Argon2 hashes computed at once (each takes ~19 MiB).
    hashing: Arc<tokio::sync::Semaphore>,
    http: HttpMetrics,
    edge: EdgeStats,
    conns: Arc<crate::conns::ConnStats>,
    /// Outgoing webhook deliveries' counters (kept by [`crate::delivery::Deliverer`]).
    delivery: Arc<crate::delivery::DeliveryStats>,
    /// Which addresses subscriptions' URLs may resolve to.
    webhook_policy: crate::delivery::AddressPolicy,
    /// Uploaded files' bytes.
    files: Arc<crate::files::FileStore>,
    /// Uploads being received, per user.
    uploading: std::sync::Mutex<std::collections::HashMap<i64, u32>>,
    /// Images decoded at once (each may take up to a few hundred MiB).
    decoding: Arc<tokio::sync::Semaphore>,
    /// Seals two-factor secrets and signs login challenges; `None` without a secret key
    /// (a cluster node not given one): two-factor login is then unavailable.
    sealer: Option<Arc<crate::sealing::Sealer>>,
    /// Users with an export running on this node.
    exporting: export::Exporting,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(
        store: Arc<dyn Store>,
        config: Config,
        gateway: Gateway,
        files: Arc<crate::files::FileStore>,
        sealer: Option<Arc<crate::sealing::Sealer>>,
    ) -> Self {
        let limits = config.limits;
        let state = Self(Arc::new(Inner {
            store,
            gateway,
            ready: AtomicBool::new(true),
            sessions: sessions::SessionCache::default(),
            dummy_hash: crate::auth::hash_password("natter dummy password", config.hash_cost)
                .expect("hash a password at start-up"),
            sends: RateLimiter::new(limits.send),
            hook_posts: RateLimiter::new(limits.send),
            write_ops: RateLimiter::new(limits.writes),
            write_bytes: RateLimiter::new(limits.write_bytes),
            channel_creates: RateLimiter::new(limits.channel_creates),
            read_markers: RateLimiter::new(limits.read_markers),
            searches: RateLimiter::new(limits.search),
            search_slots: tokio::sync::Semaphore::new(SEARCHES_AT_ONCE),
            typing: RateLimiter::new(limits.typing),
            login_failures_by_user: RateLimiter::new(limits.login_failures_per_user),
            login_failures_by_account: RateLimiter::new(limits.login_failures_per_account),
            hashing: Arc::new(tokio::sync::Semaphore::new(
                limits.password_hash_concurrency,
            )),
            login_failures_by_ip: RateLimiter::new(limits.login_failures_per_ip),
            code_failures: RateLimiter::new(limits.code_failures_per_account),
            signups_by_ip: RateLimiter::new(limits.signups_per_ip),
            http: HttpMetrics::default(),
            conns: Arc::default(),
            edge: EdgeStats::default(),
            delivery: Arc::default(),
            webhook_policy: crate::delivery::AddressPolicy::new(config.webhooks.allow.clone()),
            files,
            uploading: std::sync::Mutex::default(),
            decoding: Arc::new(tokio::sync::Semaphore::new(1)),
            sealer,
            exporting: export::Exporting::default(),
            config,
        }));
        // A session revoked on another node ends here too.
        let weak = Arc::downgrade(&state.0);
        state.gateway.bus.on_revoke(Box::new(move |user_id, token| {
            if let Some(inner) = weak.upgrade() {
                inner.sessions.revoke(token);
                inner.gateway.hub.revoke(user_id, token);
            }
        }));
        state
    }

    /// Marks the server as draining: `/readyz` answers 503 from now on.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// The outgoing webhook counters, for the node's [`crate::delivery::Deliverer`].
    pub fn delivery_stats(&self) -> Arc<crate::delivery::DeliveryStats> {
        Arc::clone(&self.delivery)
    }

    /// The HTTP connection counters (kept by [`crate::conns::serve`]).
    pub fn conn_stats(&self) -> &Arc<crate::conns::ConnStats> {
        &self.conns
    }

    /// Charges one write other than a send to `user_id`, and `text_bytes` of message text
    /// (or a name) to their byte budget; refused with `429 rate_limited` past either.
    pub(crate) fn admit_write(&self, user_id: i64, text_bytes: usize) -> Result<(), ApiError> {
        let now = std::time::Instant::now();
        self.write_ops
            .take(&user_id, now)
            .map_err(|w| self.rate_limited(Limit::Write, w))?;
        self.admit_bytes(user_id, text_bytes).inspect_err(|_| {
            self.write_ops.refund(&user_id);
        })
    }

    /// Charges `text_bytes` of message text to `user_id`'s byte budget.
    pub(crate) fn admit_bytes(&self, user_id: i64, text_bytes: usize) -> Result<(), ApiError> {
        if text_bytes == 0 {
            return Ok(());
        }
        self.write_bytes
            .take_n(&user_id, text_bytes as f64, std::time::Instant::now())
            .map_err(|w| self.rate_limited(Limit::WriteBytes, w))
    }

    /// Charges a channel creation to `user_id` before it is made (so concurrent requests
    /// cannot all pass); give it back with [`AppState::refund_channel_create`] when none
    /// was made.
    pub(crate) fn admit_channel_create(&self, user_id: i64) -> Result<(), ApiError> {
        self.channel_creates
            .take(&user_id, std::time::Instant::now())
            .map_err(|w| self.rate_limited(Limit::ChannelCreate, w))
    }

    pub(crate) fn refund_channel_create(&self, user_id: i64) {
        self.channel_creates.refund(&user_id);
    }

    /// Charges a read marker to `user_id` (its own budget: a busy channel's markers must
    /// not use up the budget of edits and revocations).
    pub(crate) fn admit_read_marker(&self, user_id: i64) -> Result<(), ApiError> {
        self.read_markers
            .take(&user_id, std::time::Instant::now())
            .map_err(|w| self.rate_limited(Limit::Write, w))
    }

    /// Charges a search to `user_id`.
    pub(crate) fn admit_search(&self, user_id: i64) -> Result<(), ApiError> {
        self.searches
            .take(&user_id, std::time::Instant::now())
            .map_err(|w| self.rate_limited(Limit::Search, w))
    }

    /// Whether a typing signal of `user_id` in `channel_id` goes out: a bound over all
    /// of the user's connections together.
    pub(crate) fn admit_typing(&self, user_id: i64, channel_id: i64) -> bool {
        self.typing
            .take(&(user_id, channel_id), std::time::Instant::now())
            .is_ok()
    }

    /// The answer to a request a rate limit refused, counted for `/metrics`.
    fn rate_limited(&self, limit: Limit, wait: std::time::Duration) -> ApiError {
        self.edge.rate_limited(limit);
        ApiError::rate_limited(crate::ratelimit::retry_after_secs(wait))
    }

    /// Prometheus text format of every counter of this server.
    pub fn render_metrics(&self) -> String {
        use crate::metrics::{render_header, render_one, render_value};
        let mut out = String::with_capacity(16 * 1024);
        render_header(
            &mut out,
            "natter_build_info",
            "gauge",
            "Always 1; the version is a label.",
        );
        render_value(
            &mut out,
            "natter_build_info",
            &format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
            1,
        );
        render_one(
            &mut out,
            "natter_ready",
            "gauge",
            "1 while the server takes traffic; 0 once it drains.",
            u8::from(self.ready.load(Ordering::SeqCst)),
        );
        render_header(
            &mut out,
            "natter_feature_enabled",
            "gauge",
            "Feature flags in force (1 on, 0 off).",
        );
        for feature in Feature::ALL {
            render_value(
                &mut out,
                "natter_feature_enabled",
                &format!("feature=\"{}\"", feature.name()),
                u8::from(self.config.features.enabled(feature)),
            );
        }
        self.http.render(&mut out);
        self.edge.render(&mut out);
        self.conns.render(&mut out);
        self.delivery.render(&mut out);
        self.files.render(&mut out);
        self.store.render_metrics(&mut out);
        self.gateway.bus.render_metrics(&mut out);
        self.gateway.hub.stats().render(&mut out);
        let (watching, watched) = self.gateway.presence.counts();
        render_one(
            &mut out,
            "natter_presence_watching_connections",
            "gauge",
            "Connections watching someone's presence.",
            watching,
        );
        render_one(
            &mut out,
            "natter_presence_watched_users",
            "gauge",
            "Users whose presence some connection on this node watches.",
            watched,
        );
        crate::process::render(&mut out);
        crate::process::render_disk(&mut out, &self.config.data_dir);
        out
    }
}

/// The route table and the OpenAPI document it generates.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(accounts::routes())
        .merge(security::routes())
        .merge(export::routes())
        .merge(keys::routes())
        .merge(webhooks::routes())
        .merge(channels::routes())
        .merge(messages::routes())
        .merge(files::routes())
        .merge(reactions::routes())
        .merge(search::routes())
        .merge(presence::routes())
        .merge(health::routes())
        .routes(utoipa_axum::routes!(ws::upgrade))
}

/// The router and the OpenAPI 3.1 document of API v1, with the answers every operation
/// shares added.
fn split() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut spec) = routes().split_for_parts();
    utoipa::Modify::modify(&openapi::SharedAnswers, &mut spec);
    (router, spec)
}

/// The OpenAPI 3.1 document of API v1.
pub fn openapi() -> utoipa::openapi::OpenApi {
    split().1
}

/// The whole HTTP application over `state`.
pub fn app(state: AppState) -> Router {
    let (router, spec) = split();
    let spec = Arc::new(spec);
    // With `--metrics-listen`, `/metrics` is served on that address only.
    let router = if state.config.metrics_listen.is_none() {
        router.route("/metrics", axum::routing::get(metrics))
    } else {
        router
    };
    router
        .merge(web::routes())
        .route(
            "/v1/openapi.json",
            axum::routing::get(move || {
                let spec = Arc::clone(&spec);
                async move { axum::Json(spec.as_ref().clone()) }
            }),
        )
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| -> Response {
                tracing::error!("request handler panicked");
                ApiError::internal().into_response()
            },
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            observe::observe,
        ))
        .with_state(state)
}

/// `/metrics` alone, for `--metrics-listen`.
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .fallback(|| async { ApiError::not_found() })
        .with_state(state)
}

/// Prometheus text format of the server's counters.
async fn metrics(axum::extract::State(state): axum::extract::State<AppState>) -> Response {
    let body = state.render_metrics();
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
