//! Accounts and sessions: register, log in, log out, and look users up.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::dto::{
    Credentials, ErrorBody, LoginChallenge, PasswordAndCode, Session, SessionList, SessionListItem,
    UpdateProfile, User,
};
use super::error::{ApiError, ApiResult};
use super::extract::{Authed, ClientIp, JsonBody, Params, PathIds, UserAgent};
use super::{AppState, no_content, validate};
use crate::auth::{hash_password, new_token, token_hash, verify_password};
use crate::clock::now_ms;
use crate::metrics::Limit;
use crate::ratelimit::address_key;
use crate::store::{NewSession, TokenHash, session_id};
use crate::username;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register, find_user))
        .routes(routes!(me, update_me, delete_me))
        .routes(routes!(get_user))
        .routes(routes!(login, list_sessions))
        .routes(routes!(logout))
        .routes(routes!(revoke_other_sessions))
        .routes(routes!(revoke_session))
}

/// Creates an account and logs it in.
#[utoipa::path(post, path = "/v1/users", tag = "accounts", request_body = Credentials,
    responses((status = 201, body = Session),
              (status = 400, body = ErrorBody, description = "`invalid_field`: the name or password breaks its rules"),
              (status = 409, body = ErrorBody, description = "`username_taken`: the name, or one that looks like it, is taken"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: too many sign-ups from this address")))]
async fn register(
    State(state): State<AppState>,
    ClientIp(client_ip): ClientIp,
    agent: UserAgent,
    JsonBody(body): JsonBody<Credentials>,
) -> ApiResult<(StatusCode, Json<Session>)> {
    let username = validate::username(&body.username)?;
    validate::password(body.password.expose())?;
    let ip = address_key(client_ip);
    state
        .signups_by_ip
        .take(&ip, Instant::now())
        .map_err(|w| state.rate_limited(Limit::Signup, w))?;
    let cost = state.config.hash_cost;
    let password = body.password;
    let hashed = hash_bounded(&state, move || hash_password(password.expose(), cost)).await;
    let hash = match hashed {
        Ok(Ok(hash)) => hash,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "hash password");
            return Err(ApiError::internal());
        }
        Err(e) => {
            // Refused for load, not for the address: the attempt costs it nothing.
            state.signups_by_ip.refund(&ip);
            return Err(e);
        }
    };
    let (token, session) = new_session(&state, client_ip, agent);
    let user = state
        .store
        .create_user(&username, &hash, Some(session))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(Session {
            user: (&user).into(),
            token: token.into(),
        }),
    ))
}

/// Logs in. An unknown name and a wrong password get the same answer; failures are
/// throttled per username and per client address. With two-factor login on, a right
/// password gets `202` and a challenge to complete at `POST /v1/sessions/two-factor`
/// with a code; no session exists before that.
#[utoipa::path(post, path = "/v1/sessions", tag = "accounts", request_body = Credentials,
    responses((status = 200, body = Session),
              (status = 202, body = LoginChallenge, description = "The password is right and the account has two-factor login on: complete the login with a code"),
              (status = 401, body = ErrorBody, description = "`invalid_credentials`"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: too many failed logins for this name or from this address")))]
async fn login(
    State(state): State<AppState>,
    ClientIp(client_ip): ClientIp,
    agent: UserAgent,
    JsonBody(body): JsonBody<Credentials>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    if body.username.len() > 4 * 4 * username::MAX_CHARS || body.password.expose().len() > 4096 {
        return Err(ApiError::invalid_credentials());
    }
    // Folded but not held to the rules of new names: older accounts keep logging in.
    let name = username::fold(&body.username);
    let charge = LoginCharge::take(&state, name, address_key(client_ip))?;
    let found = match state.store.credentials(&charge.name).await {
        Ok(found) => found,
        Err(e) => {
            charge.refund(&state);
            return Err(e.into());
        }
    };
    let password = body.password;
    let dummy = state.dummy_hash.clone();
    // An unknown name is checked against a dummy hash, so both failures take as long.
    let verified = hash_bounded(&state, move || match found {
        Some((user, hash)) => verify_password(password.expose(), &hash)
            .then(|| (user, super::security::password_binding(&hash))),
        None => {
            verify_password(password.expose(), &dummy);
            None
        }
    })
    .await;
    let (user, binding) = match verified {
        Ok(Some(found)) => {
            charge.succeeded(&state);
            found
        }
        Ok(None) => return Err(ApiError::invalid_credentials()),
        Err(e) => {
            charge.refund(&state);
            return Err(e);
        }
    };
    if let Some(challenge) =
        super::security::challenge_for(&state, &user, &binding, client_ip).await?
    {
        return Ok((StatusCode::ACCEPTED, Json(challenge)).into_response());
    }
    let (token, session) = new_session(&state, client_ip, agent);
    // Past the cap on sessions per user the oldest end, at once and everywhere.
    for evicted in state.store.create_session(user.id, session).await? {
        revoke(&state, user.id, &evicted);
    }
    super::security::audit("login.password", &user, client_ip);
    Ok(Json(Session {
        user: (&user).into(),
        token: token.into(),
    })
    .into_response())
}

/// One login attempt's charge to the login limits, taken before the password is verified
/// (so concurrent guesses cannot all pass a check made before any of them failed). Three
/// buckets: the username from this address (so a stranger elsewhere cannot lock the owner
/// out), the username from everywhere (a ceiling on distributed guessing, and on a loop of
/// right passwords), and this address over every username. A right password gives back
/// the first and the last; an attempt that never ran gives back all three.
pub(super) struct LoginCharge {
    name: String,
    ip: IpAddr,
}

impl LoginCharge {
    pub(super) fn take(state: &AppState, name: String, ip: IpAddr) -> ApiResult<Self> {
        let now = Instant::now();
        let by_user = (name.clone(), ip);
        let refused = |w| state.rate_limited(Limit::Login, w);
        state
            .login_failures_by_user
            .take(&by_user, now)
            .map_err(refused)?;
        if let Err(w) = state.login_failures_by_account.take(&name, now) {
            state.login_failures_by_user.refund(&by_user);
            return Err(refused(w));
        }
        if let Err(w) = state.login_failures_by_ip.take(&ip, now) {
            state.login_failures_by_user.refund(&by_user);
            state.login_failures_by_account.refund(&name);
            return Err(refused(w));
        }
        Ok(Self { name, ip })
    }

    /// The attempt was not made (refused for load, or the store failed): costs nothing.
    pub(super) fn refund(self, state: &AppState) {
        state.login_failures_by_account.refund(&self.name);
        self.succeeded(state);
    }

    /// The password was right: nothing is charged to this address, but the attempt stays
    /// charged to the username's ceiling, so even right passwords cannot make Argon2 run
    /// without bound (a loop of logins with the right password).
    pub(super) fn succeeded(self, state: &AppState) {
        state.login_failures_by_ip.refund(&self.ip);
        state.login_failures_by_user.refund(&(self.name, self.ip));
    }
}

/// Runs `f` (an Argon2 hash or verification: CPU-heavy, ~19 MiB) on the blocking pool,
/// at most `--password-hash-concurrency` at once; past that, `503 overloaded` with
/// Retry-After, so a burst of logins cannot exhaust memory.
pub(super) async fn hash_bounded<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce() -> T + Send + 'static,
) -> ApiResult<T> {
    let permit = Arc::clone(&state.hashing)
        .try_acquire_owned()
        .map_err(|_| {
            state.edge.rate_limited(Limit::PasswordHash);
            ApiError::overloaded()
        })?;
    tokio::task::spawn_blocking(move || {
        let out = f();
        drop(permit);
        out
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "password hash task failed");
        ApiError::internal()
    })
}

/// A fresh bearer token and the session row that stores its digest.
pub(super) fn new_session(
    state: &AppState,
    address: IpAddr,
    agent: UserAgent,
) -> (String, NewSession) {
    let token = new_token();
    let expires_at = now_ms() + state.config.token_ttl.as_millis() as i64;
    let session = NewSession {
        token: token_hash(&token),
        expires_at,
        address: address.to_string(),
        agent: agent.0,
    };
    (token, session)
}

/// The caller's unexpired sessions (their logins on every device), newest first.
#[utoipa::path(get, path = "/v1/sessions", tag = "accounts", security(("bearer" = [])),
    responses((status = 200, body = SessionList), (status = 401, body = ErrorBody)))]
async fn list_sessions(
    State(state): State<AppState>,
    auth: Authed,
) -> ApiResult<Json<SessionList>> {
    let current = session_id(&auth.token);
    let sessions = state.store.sessions(auth.user.id, now_ms()).await?;
    Ok(Json(SessionList {
        sessions: sessions
            .iter()
            .map(|s| SessionListItem::new(s, current))
            .collect(),
    }))
}

/// Ends one of the caller's sessions: its token stops working at once and its
/// WebSockets are closed with 4001.
#[utoipa::path(delete, path = "/v1/sessions/{id}", tag = "accounts", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Session id from GET /v1/sessions")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn revoke_session(
    State(state): State<AppState>,
    auth: Authed,
    path: PathIds<1>,
) -> ApiResult<StatusCode> {
    // Not charged to the write budget: a thief holding a token must not be able to keep
    // its owner from ending it. Bounded by the sessions a user may hold.
    let PathIds([id]) = path;
    let token = state
        .store
        .delete_session_by_id(auth.user.id, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    revoke(&state, auth.user.id, &token);
    Ok(no_content())
}

/// Logs out everywhere else: every session of the caller but this one ends.
#[utoipa::path(delete, path = "/v1/sessions/others", tag = "accounts", security(("bearer" = [])),
    responses((status = 204), (status = 401, body = ErrorBody)))]
async fn revoke_other_sessions(
    State(state): State<AppState>,
    auth: Authed,
) -> ApiResult<StatusCode> {
    let tokens = state
        .store
        .delete_other_sessions(auth.user.id, auth.token)
        .await?;
    for token in &tokens {
        revoke(&state, auth.user.id, token);
    }
    Ok(no_content())
}

/// Ends a deleted session everywhere it is held: the session cache and open WebSockets.
pub(super) fn revoke(state: &AppState, user_id: i64, token: &TokenHash) {
    state.sessions.revoke(token);
    state.gateway.hub.revoke(user_id, token);
    // And on every other node of a cluster.
    state.gateway.bus.revoke(user_id, token);
}

/// Logs out: the token stops working at once.
#[utoipa::path(delete, path = "/v1/sessions/current", tag = "accounts", security(("bearer" = [])),
    responses((status = 204)))]
async fn logout(State(state): State<AppState>, auth: Authed) -> ApiResult<StatusCode> {
    // Revoked here before and after the store delete: no request sees the token valid
    // once this answers, and none can re-cache it in between.
    state.sessions.revoke(&auth.token);
    state.store.delete_session(auth.token).await?;
    revoke(&state, auth.user.id, &auth.token);
    Ok(no_content())
}

/// The caller's own account.
#[utoipa::path(get, path = "/v1/users/me", tag = "accounts", security(("bearer" = [])),
    responses((status = 200, body = User)))]
async fn me(State(state): State<AppState>, auth: Authed) -> ApiResult<Json<User>> {
    // From the store, not the session cache: a profile just changed shows at once.
    let user = state.store.user(auth.user.id).await?.unwrap_or(auth.user);
    Ok(Json((&user).into()))
}

/// Changes the caller's display name and about text (a field left out stays, `null`
/// clears it). Everyone online who shares a channel with the caller gets `user.updated`.
#[utoipa::path(patch, path = "/v1/users/me", tag = "accounts", security(("bearer" = [])), request_body = UpdateProfile,
    responses((status = 200, body = User), (status = 400, body = ErrorBody),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's write limits")))]
async fn update_me(
    State(state): State<AppState>,
    auth: Authed,
    JsonBody(body): JsonBody<UpdateProfile>,
) -> ApiResult<Json<User>> {
    if let Some(Some(name)) = &body.display_name {
        validate::display_name(name)?;
    }
    if let Some(Some(about)) = &body.about {
        validate::about(about)?;
    }
    let bytes = [&body.display_name, &body.about]
        .iter()
        .map(|f| f.as_ref().and_then(Option::as_ref).map_or(0, String::len))
        .sum();
    state.admit_write(auth.user.id, bytes)?;
    let change = crate::model::ProfileChange {
        display_name: body.display_name,
        about: body.about,
    };
    let user = state.store.update_profile(auth.user.id, change).await?;
    // Live to those who share a channel: once per channel, over the bus (a client that
    // shares several takes the frame again; it is the same profile).
    for channel in state.store.channels(user.id).await.unwrap_or_default() {
        state.gateway.bus.profile(channel.channel.id, &user);
    }
    Ok(Json((&user).into()))
}

/// Deletes the caller's account (the password is asked again, and a code while
/// two-factor login is on), with the bots they own. Its sessions and API keys end at once,
/// everywhere (sockets close with 4001); its messages stay in their channels' history,
/// text and all, under its id, which now reads as a deleted user (`deleted: true`,
/// username `deleted`, no profile); it leaves every channel but its DMs (`member.removed`;
/// a channel it owned passes to its first admin, else its first member), and its DMs stay
/// readable by the other party. Its two-factor secret, recovery codes, sessions and keys
/// are deleted. Its username is free again after `--username-hold-secs`.
#[utoipa::path(delete, path = "/v1/users/me", tag = "accounts", security(("bearer" = [])),
    request_body = PasswordAndCode,
    responses((status = 204),
              (status = 400, body = ErrorBody, description = "`invalid_field`: `code` is missing"),
              (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody, description = "`wrong_password` or `invalid_code`"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: too many wrong passwords or codes")))]
async fn delete_me(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    JsonBody(body): JsonBody<PasswordAndCode>,
) -> ApiResult<StatusCode> {
    use super::security::{audit, check_password, second_factor};
    check_password(&state, &auth.user, ip, body.password, "password").await?;
    second_factor(&state, &auth.user, ip, body.code.as_ref()).await?;
    // Where others should see the account turn into a deleted one.
    let channels = state.store.channels(auth.user.id).await.unwrap_or_default();
    let deleted = state.store.delete_account(auth.user.id).await?;
    for (user, token) in &deleted.tokens {
        revoke(&state, *user, token);
    }
    audit("account.deleted", &auth.user, ip);
    if let Ok(Some(gone)) = state.store.user(auth.user.id).await {
        for view in &channels {
            state.gateway.bus.profile(view.channel.id, &gone);
        }
    }
    // Leaving the channels: what cannot be done now (a shard down) the upkeep finishes.
    if let Err(e) = crate::store::finish_deletion(&*state.store, &deleted.users).await {
        tracing::warn!(user_id = auth.user.id, error = %e, "an account deleted has channels left to leave; the upkeep finishes it");
    }
    Ok(no_content())
}

/// A user by id.
#[utoipa::path(get, path = "/v1/users/{id}", tag = "accounts", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "User id")),
    responses((status = 200, body = User), (status = 404, body = ErrorBody)))]
async fn get_user(
    State(state): State<AppState>,
    _auth: Authed,
    path: PathIds<1>,
) -> ApiResult<Json<User>> {
    let PathIds([id]) = path;
    let user = state
        .store
        .user(id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok(Json((&user).into()))
}

/// A user by username, matched after folding (NFKC, lower case) as at registration.
#[utoipa::path(get, path = "/v1/users", tag = "accounts", security(("bearer" = [])),
    params(("username" = String, Query, description = "Username, any letter case or compatible form (fullwidth, …); missing is 400, and one that names no account 404")),
    responses((status = 200, body = User), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn find_user(
    State(state): State<AppState>,
    _auth: Authed,
    params: Params,
) -> ApiResult<Json<User>> {
    let name = params.str("username").ok_or_else(|| {
        ApiError::invalid_field("username", "the username query parameter is required")
    })?;
    if name.chars().count() > 4 * username::MAX_CHARS {
        return Err(ApiError::not_found());
    }
    let user = state
        .store
        .user_by_username(&username::fold(name))
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok(Json((&user).into()))
}
