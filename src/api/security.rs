//! What guards an account beyond its password: two-factor login (TOTP, RFC 6238, with
//! single-use recovery codes), the second step of a login that needs it, and password
//! changes. Every re-authentication (a password, a code) is charged to the same limits
//! as a login's guess, and every change is written to the audit log (who, what, from
//! where; never a secret).

use std::net::IpAddr;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use sha2::{Digest, Sha256};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::accounts::{LoginCharge, hash_bounded, new_session, revoke};
use super::dto::{
    ChallengeAnswer, ChangePassword, ErrorBody, LoginChallenge, PasswordAndCode, PasswordCheck,
    RecoveryCodes, Session, TwoFactorCode, TwoFactorEnrolment, TwoFactorStatus,
};
use super::error::{ApiError, ApiResult};
use super::extract::{Authed, ClientIp, JsonBody, UserAgent};
use super::{AppState, no_content, validate};
use crate::auth::{Secret, hash_password, hex, verify_password};
use crate::clock::{now_ms, rfc3339};
use crate::model::User;
use crate::ratelimit::address_key;
use crate::sealing::Sealer;
use crate::store::TokenHash;
use crate::totp;

/// How long a login challenge may be completed.
const CHALLENGE_TTL_MS: i64 = 5 * 60 * 1000;
/// Recovery codes per user.
const RECOVERY_CODES: usize = 10;
/// The issuer an authenticator app shows beside the account.
const ISSUER: &str = "Natter";

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(two_factor_status, begin_two_factor))
        .routes(routes!(confirm_two_factor))
        .routes(routes!(disable_two_factor))
        .routes(routes!(new_recovery_codes))
        .routes(routes!(complete_login))
        .routes(routes!(change_password))
}

/// Writes one line of the audit log: who did what from where. Never a secret.
pub(super) fn audit(action: &'static str, user: &User, address: IpAddr) {
    tracing::info!(
        target: "natter::audit",
        action,
        user_id = user.id,
        username = %user.username,
        address = %address,
        "account"
    );
}

/// The caller's two-factor login: on, waiting for a confirming code, or off.
#[utoipa::path(get, path = "/v1/users/me/two-factor", tag = "accounts", security(("bearer" = [])),
    responses((status = 200, body = TwoFactorStatus), (status = 401, body = ErrorBody)))]
async fn two_factor_status(
    State(state): State<AppState>,
    auth: Authed,
) -> ApiResult<Json<TwoFactorStatus>> {
    let found = state.store.two_factor(auth.user.id).await?;
    Ok(Json(TwoFactorStatus {
        enabled: found.as_ref().is_some_and(|t| t.enabled),
        pending: found.as_ref().is_some_and(|t| !t.enabled),
        recovery_codes_left: found.map_or(0, |t| t.recovery_codes),
    }))
}

/// Begins enrolling in two-factor login (the password is asked again): a new secret,
/// shown once, replacing an enrolment not yet confirmed. Logins need no code until
/// `POST /v1/users/me/two-factor/confirm` confirms it.
#[utoipa::path(post, path = "/v1/users/me/two-factor", tag = "accounts", security(("bearer" = [])),
    request_body = PasswordCheck,
    responses((status = 201, body = TwoFactorEnrolment),
              (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody, description = "`wrong_password`"),
              (status = 409, body = ErrorBody, description = "`two_factor_enabled`: it is on already"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: too many wrong passwords or codes"),
              (status = 503, body = ErrorBody, description = "`two_factor_unavailable`: the server has no secret key")))]
async fn begin_two_factor(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    JsonBody(body): JsonBody<PasswordCheck>,
) -> ApiResult<(StatusCode, Json<TwoFactorEnrolment>)> {
    let sealer = sealer(&state)?;
    check_password(&state, &auth.user, ip, body.password, "password").await?;
    let secret = totp::new_secret();
    let sealed = sealer.seal(&secret_context(auth.user.id), &secret);
    if !state.store.begin_two_factor(auth.user.id, sealed).await? {
        return Err(two_factor_enabled());
    }
    let uri = totp::uri(ISSUER, &auth.user.username, &secret);
    let qr_svg = qr_svg(&uri)?;
    audit("two_factor.enrolment_begun", &auth.user, ip);
    Ok((
        StatusCode::CREATED,
        Json(TwoFactorEnrolment {
            secret: totp::base32(&secret).into(),
            uri: uri.into(),
            qr_svg: qr_svg.into(),
        }),
    ))
}

/// Confirms an enrolment with a code of the new secret: two-factor login is on from
/// now, and the answer holds ten single-use recovery codes, shown this once.
#[utoipa::path(post, path = "/v1/users/me/two-factor/confirm", tag = "accounts", security(("bearer" = [])),
    request_body = TwoFactorCode,
    responses((status = 200, body = RecoveryCodes),
              (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody, description = "`invalid_code`"),
              (status = 409, body = ErrorBody, description = "`two_factor_enabled`, or `no_enrolment`: nothing waits for a code"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: too many wrong passwords or codes")))]
async fn confirm_two_factor(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    JsonBody(body): JsonBody<TwoFactorCode>,
) -> ApiResult<Json<RecoveryCodes>> {
    let sealer = sealer(&state)?;
    let user = &auth.user;
    let charge = LoginCharge::take(&state, user.username.clone(), address_key(ip))?;
    let waiting = match state.store.two_factor(user.id).await {
        Ok(found) => found,
        Err(e) => {
            charge.refund(&state);
            return Err(e.into());
        }
    };
    let Some(waiting) = waiting else {
        charge.refund(&state);
        return Err(ApiError::conflict(
            "no_enrolment",
            "no enrolment waits for a code: begin one with POST /v1/users/me/two-factor",
        ));
    };
    if waiting.enabled {
        charge.refund(&state);
        return Err(two_factor_enabled());
    }
    let secret = match open_secret(sealer, user.id, &waiting.secret) {
        Ok(secret) => secret,
        Err(e) => {
            charge.refund(&state);
            return Err(e);
        }
    };
    let Some(step) = totp::matching_step(&secret, body.code.expose(), totp::step_at(now_ms()))
    else {
        audit("two_factor.wrong_code", user, ip);
        return Err(ApiError::invalid_code(StatusCode::FORBIDDEN));
    };
    charge.succeeded(&state);
    let (codes, digests) = recovery_codes();
    if !state
        .store
        .enable_two_factor(user.id, waiting.secret, step, digests)
        .await?
    {
        return Err(ApiError::conflict(
            "no_enrolment",
            "another enrolment replaced this one meanwhile: confirm with a code of its secret",
        ));
    }
    audit("two_factor.enabled", user, ip);
    Ok(Json(RecoveryCodes {
        recovery_codes: codes,
    }))
}

/// Turns two-factor login off (its secret and recovery codes are deleted): the
/// password and a code (or a recovery code) are asked. With nothing but an enrolment
/// waiting, the password alone cancels it.
#[utoipa::path(post, path = "/v1/users/me/two-factor/disable", tag = "accounts", security(("bearer" = [])),
    request_body = PasswordAndCode,
    responses((status = 204),
              (status = 400, body = ErrorBody, description = "`invalid_field`: `code` is missing"),
              (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody, description = "`wrong_password` or `invalid_code`"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: too many wrong passwords or codes")))]
async fn disable_two_factor(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    JsonBody(body): JsonBody<PasswordAndCode>,
) -> ApiResult<StatusCode> {
    check_password(&state, &auth.user, ip, body.password, "password").await?;
    second_factor(&state, &auth.user, ip, body.code.as_ref()).await?;
    state.store.disable_two_factor(auth.user.id).await?;
    audit("two_factor.disabled", &auth.user, ip);
    Ok(no_content())
}

/// Ten new recovery codes in place of the old (the password and a code are asked).
#[utoipa::path(post, path = "/v1/users/me/two-factor/recovery-codes", tag = "accounts", security(("bearer" = [])),
    request_body = PasswordAndCode,
    responses((status = 200, body = RecoveryCodes),
              (status = 400, body = ErrorBody, description = "`invalid_field`: `code` is missing"),
              (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody, description = "`wrong_password` or `invalid_code`"),
              (status = 409, body = ErrorBody, description = "`two_factor_disabled`: two-factor login is off"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: too many wrong passwords or codes")))]
async fn new_recovery_codes(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    JsonBody(body): JsonBody<PasswordAndCode>,
) -> ApiResult<Json<RecoveryCodes>> {
    check_password(&state, &auth.user, ip, body.password, "password").await?;
    if !second_factor(&state, &auth.user, ip, body.code.as_ref()).await? {
        return Err(two_factor_disabled());
    }
    let (codes, digests) = recovery_codes();
    if !state
        .store
        .replace_recovery_codes(auth.user.id, digests)
        .await?
    {
        return Err(two_factor_disabled());
    }
    audit("two_factor.recovery_codes_replaced", &auth.user, ip);
    Ok(Json(RecoveryCodes {
        recovery_codes: codes,
    }))
}

/// Completes a login that needs a second factor: the challenge `POST /v1/sessions`
/// answered with and a code of the app (each accepted once) or an unused recovery
/// code. Wrong codes count against the same limits as wrong passwords.
#[utoipa::path(post, path = "/v1/sessions/two-factor", tag = "accounts", request_body = ChallengeAnswer,
    responses((status = 200, body = Session),
              (status = 401, body = ErrorBody, description = "`invalid_code`, or `invalid_challenge`: expired or altered"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: too many wrong codes for this account or from this address"),
              (status = 503, body = ErrorBody, description = "`two_factor_unavailable`: the server has no secret key")))]
async fn complete_login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    agent: UserAgent,
    JsonBody(body): JsonBody<ChallengeAnswer>,
) -> ApiResult<Json<Session>> {
    let sealer = sealer(&state)?;
    let challenge = body.challenge.expose();
    // The challenge is bound to the password it was won with: read the user's hash to
    // check it (a changed password, or a deleted account, voids it).
    let user_id = challenge_user(challenge).ok_or_else(ApiError::invalid_challenge)?;
    let user = state
        .store
        .user(user_id)
        .await?
        .filter(|u| !u.deleted)
        .ok_or_else(ApiError::invalid_challenge)?;
    let binding = state
        .store
        .credentials(&user.username)
        .await?
        .filter(|(u, _)| u.id == user.id)
        .map(|(_, hash)| password_binding(&hash))
        .ok_or_else(ApiError::invalid_challenge)?;
    check_challenge(sealer, challenge, now_ms(), &binding)
        .ok_or_else(ApiError::invalid_challenge)?;
    match use_code_charged(&state, &user, ip, body.code.expose()).await? {
        Some(Factor::App) => audit("login.two_factor", &user, ip),
        Some(Factor::Recovery) => audit("login.recovery_code", &user, ip),
        None => return Err(ApiError::invalid_code(StatusCode::UNAUTHORIZED)),
    }
    let (token, session) = new_session(&state, ip, agent);
    for evicted in state.store.create_session(user.id, session).await? {
        revoke(&state, user.id, &evicted);
    }
    Ok(Json(Session {
        user: (&user).into(),
        token: token.into(),
    }))
}

/// Changes the caller's password: the current one is asked (and a code while two-factor
/// login is on). Every other session of the caller ends at once, their WebSockets closed
/// with 4001; this one stays. API keys are not sessions and keep working.
#[utoipa::path(post, path = "/v1/users/me/password", tag = "accounts", security(("bearer" = [])),
    request_body = ChangePassword,
    responses((status = 204),
              (status = 400, body = ErrorBody, description = "`invalid_field`: the new password breaks the rules, or `code` is missing"),
              (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody, description = "`wrong_password` or `invalid_code`"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: too many wrong passwords or codes")))]
async fn change_password(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    JsonBody(body): JsonBody<ChangePassword>,
) -> ApiResult<StatusCode> {
    validate::password(body.new_password.expose()).map_err(|mut e| {
        e.field = Some("new_password".into());
        e
    })?;
    check_password(
        &state,
        &auth.user,
        ip,
        body.current_password,
        "current_password",
    )
    .await?;
    second_factor(&state, &auth.user, ip, body.code.as_ref()).await?;
    let cost = state.config.hash_cost;
    let password = body.new_password;
    let hash = hash_bounded(&state, move || hash_password(password.expose(), cost))
        .await?
        .map_err(|e| {
            tracing::error!(error = %e, "hash password");
            ApiError::internal()
        })?;
    let ended = state
        .store
        .change_password(auth.user.id, &hash, auth.token)
        .await?;
    for token in &ended {
        revoke(&state, auth.user.id, token);
    }
    tracing::info!(
        target: "natter::audit",
        action = "password.changed",
        user_id = auth.user.id,
        username = %auth.user.username,
        address = %ip,
        sessions_ended = ended.len(),
        "account"
    );
    Ok(no_content())
}

/// A login whose password was right: the challenge to complete it with, if the user has
/// two-factor login on.
pub(super) async fn challenge_for(
    state: &AppState,
    user: &User,
    binding: &[u8],
    ip: IpAddr,
) -> ApiResult<Option<LoginChallenge>> {
    let on = state
        .store
        .two_factor(user.id)
        .await?
        .is_some_and(|t| t.enabled);
    if !on {
        return Ok(None);
    }
    let sealer = sealer(state)?;
    let expires_at = now_ms() + CHALLENGE_TTL_MS;
    audit("login.password_ok_code_needed", user, ip);
    Ok(Some(LoginChallenge {
        two_factor_required: true,
        challenge: issue_challenge(sealer, user.id, expires_at, binding).into(),
        expires_at: rfc3339(expires_at),
    }))
}

fn sealer(state: &AppState) -> ApiResult<&Sealer> {
    state
        .sealer
        .as_deref()
        .ok_or_else(ApiError::two_factor_unavailable)
}

fn two_factor_enabled() -> ApiError {
    ApiError::conflict(
        "two_factor_enabled",
        "two-factor login is on already: turn it off first to enrol again",
    )
}

fn two_factor_disabled() -> ApiError {
    ApiError::conflict("two_factor_disabled", "two-factor login is off")
}

/// What a TOTP secret is sealed with besides the key: its user, so a sealed secret
/// moved to another user's row does not open.
fn secret_context(user_id: i64) -> Vec<u8> {
    format!("natter totp secret\0{user_id}").into_bytes()
}

fn open_secret(sealer: &Sealer, user_id: i64, sealed: &[u8]) -> ApiResult<Vec<u8>> {
    sealer
        .open(&secret_context(user_id), sealed)
        .ok_or_else(|| {
            tracing::error!(
                user_id,
                "a two-factor secret does not open with this server's secret key: is --secret-key-file the key it was sealed with? (the user can still log in with a recovery code)"
            );
            ApiError::two_factor_unavailable()
        })
}

/// Checks the caller's password again for a sensitive change, charged to the login
/// limits as a login's guess is.
pub(super) async fn check_password(
    state: &AppState,
    user: &User,
    ip: IpAddr,
    password: Secret,
    field: &'static str,
) -> ApiResult<()> {
    let charge = LoginCharge::take(state, user.username.clone(), address_key(ip))?;
    let hash = match state.store.credentials(&user.username).await {
        Ok(found) => found.filter(|(u, _)| u.id == user.id).map(|(_, hash)| hash),
        Err(e) => {
            charge.refund(state);
            return Err(e.into());
        }
    };
    let dummy = state.dummy_hash.clone();
    let verified = hash_bounded(state, move || match hash {
        Some(hash) => verify_password(password.expose(), &hash),
        None => {
            verify_password(password.expose(), &dummy);
            false
        }
    })
    .await;
    match verified {
        Ok(true) => {
            charge.succeeded(state);
            Ok(())
        }
        Ok(false) => {
            audit("reauth.wrong_password", user, ip);
            Err(ApiError::wrong_password(field))
        }
        Err(e) => {
            charge.refund(state);
            Err(e)
        }
    }
}

/// With two-factor login on, checks and uses up the request's code (`false`: it is off,
/// and no code is needed).
pub(super) async fn second_factor(
    state: &AppState,
    user: &User,
    ip: IpAddr,
    code: Option<&Secret>,
) -> ApiResult<bool> {
    let on = state
        .store
        .two_factor(user.id)
        .await?
        .is_some_and(|t| t.enabled);
    if !on {
        return Ok(false);
    }
    let code = code.ok_or_else(|| {
        ApiError::invalid_field(
            "code",
            "two-factor login is on: a code of your authenticator app (or a recovery code) is required",
        )
    })?;
    match use_code_charged(state, user, ip, code.expose()).await? {
        Some(_) => Ok(true),
        None => Err(ApiError::invalid_code(StatusCode::FORBIDDEN)),
    }
}

/// Which second factor a code was.
enum Factor {
    App,
    Recovery,
}

/// [`use_code`], charged to the login limits: a wrong code costs what a wrong password
/// does; a right one costs this address nothing.
async fn use_code_charged(
    state: &AppState,
    user: &User,
    ip: IpAddr,
    code: &str,
) -> ApiResult<Option<Factor>> {
    let charge = LoginCharge::take(state, user.username.clone(), address_key(ip))?;
    // And a tighter budget of its own: codes are six digits, passwords are not.
    if let Err(wait) = state
        .code_failures
        .take(&user.id, std::time::Instant::now())
    {
        charge.refund(state);
        return Err(state.rate_limited(crate::metrics::Limit::Login, wait));
    }
    match use_code(state, user.id, code).await {
        Ok(Some(factor)) => {
            state.code_failures.refund(&user.id);
            charge.succeeded(state);
            Ok(Some(factor))
        }
        Ok(None) => {
            audit("two_factor.wrong_code", user, ip);
            Ok(None)
        }
        Err(e) => {
            state.code_failures.refund(&user.id);
            charge.refund(state);
            Err(e)
        }
    }
}

/// Checks `code` against the user's two-factor login and uses it up: an app's code once
/// (and none of an earlier step after it), a recovery code once. `None`: wrong, used, or
/// two-factor login is off.
async fn use_code(state: &AppState, user_id: i64, code: &str) -> ApiResult<Option<Factor>> {
    let Some(on) = state.store.two_factor(user_id).await?.filter(|t| t.enabled) else {
        return Ok(None);
    };
    let code: String = code
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .take(65)
        .collect();
    if code.len() == totp::DIGITS as usize && code.bytes().all(|b| b.is_ascii_digit()) {
        let secret = open_secret(sealer(state)?, user_id, &on.secret)?;
        let Some(step) = totp::matching_step(&secret, &code, totp::step_at(now_ms())) else {
            return Ok(None);
        };
        let fresh = state.store.use_code_step(user_id, step).await?;
        return Ok(fresh.then_some(Factor::App));
    }
    if code.is_empty() || code.len() > 64 {
        return Ok(None);
    }
    let used = state
        .store
        .use_recovery_code(user_id, recovery_digest(&code))
        .await?;
    Ok(used.then_some(Factor::Recovery))
}

/// New recovery codes (`xxxxx-xxxxx`, 50 random bits each) and their digests.
fn recovery_codes() -> (Vec<Secret>, Vec<TokenHash>) {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut codes = Vec::with_capacity(RECOVERY_CODES);
    let mut digests = Vec::with_capacity(RECOVERY_CODES);
    for _ in 0..RECOVERY_CODES {
        let mut bytes = [0u8; 10];
        getrandom::fill(&mut bytes).expect("the OS random source works");
        let plain: String = bytes
            .iter()
            .map(|b| char::from(ALPHABET[usize::from(b % 32)]))
            .collect();
        digests.push(recovery_digest(&plain));
        codes.push(Secret::from(format!("{}-{}", &plain[..5], &plain[5..])));
    }
    (codes, digests)
}

/// The digest a recovery code is stored as (given without its dash, any letter case).
fn recovery_digest(code: &str) -> TokenHash {
    let mut h = Sha256::new();
    h.update(b"natter recovery code\0");
    h.update(code.to_ascii_lowercase().as_bytes());
    h.finalize().into()
}

/// What a login challenge is bound to besides its user: a digest of the password hash
/// the login was checked against, so a password change voids the challenges won with
/// the old one.
pub(super) fn password_binding(hash: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"natter challenge binding\0");
    h.update(hash.as_bytes());
    h.finalize().to_vec()
}

/// A login challenge for `user_id`, good until `expires_at`:
/// `<user>.<expires>.<nonce>.<signature>`, signed with the server's key over that and
/// `binding` (so any node of a cluster takes it, and no one can make one).
fn issue_challenge(sealer: &Sealer, user_id: i64, expires_at: i64, binding: &[u8]) -> String {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).expect("the OS random source works");
    let payload = format!("{user_id}.{expires_at}.{}", hex(&nonce));
    let signature = sealer.sign(&challenge_message(&payload, binding));
    format!("{payload}.{}", hex(&signature))
}

/// The user a challenge names, unchecked (to look up what it must be bound to).
fn challenge_user(challenge: &str) -> Option<i64> {
    challenge.split('.').next()?.parse().ok()
}

/// The user a challenge was issued for, if it is this server's, bound to `binding`, and
/// unexpired at `now`.
fn check_challenge(sealer: &Sealer, challenge: &str, now: i64, binding: &[u8]) -> Option<i64> {
    let (payload, signature) = challenge.rsplit_once('.')?;
    let signature = unhex(signature)?;
    if !sealer.verify(&challenge_message(payload, binding), &signature) {
        return None;
    }
    let mut parts = payload.split('.');
    let user_id: i64 = parts.next()?.parse().ok()?;
    let expires_at: i64 = parts.next()?.parse().ok()?;
    (expires_at > now).then_some(user_id)
}

fn challenge_message(payload: &str, binding: &[u8]) -> Vec<u8> {
    let mut message = format!("natter login challenge\0{payload}\0").into_bytes();
    message.extend_from_slice(binding);
    message
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 128 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The `otpauth://` URI as a QR code, in SVG.
fn qr_svg(uri: &str) -> ApiResult<String> {
    let code = qrcode::QrCode::new(uri.as_bytes()).map_err(|e| {
        tracing::error!(error = %e, "make a QR code");
        ApiError::internal()
    })?;
    Ok(code
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(200, 200)
        .quiet_zone(true)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_hold_their_user_until_they_expire() {
        let sealer = Sealer::from_key([7; 32]);
        let c = issue_challenge(&sealer, 42, 1_000, b"pw");
        assert_eq!(challenge_user(&c), Some(42));
        assert_eq!(check_challenge(&sealer, &c, 999, b"pw"), Some(42));
        assert_eq!(
            check_challenge(&sealer, &c, 999, b"new pw"),
            None,
            "another password"
        );
        assert_eq!(check_challenge(&sealer, &c, 1_000, b"pw"), None, "expired");
        assert_eq!(
            check_challenge(&Sealer::from_key([8; 32]), &c, 0, b"pw"),
            None
        );
        let forged = c.replacen("42.", "43.", 1);
        assert_eq!(check_challenge(&sealer, &forged, 0, b"pw"), None);
        let later = c.replacen(".1000.", ".9000.", 1);
        assert_eq!(check_challenge(&sealer, &later, 0, b"pw"), None);
        assert_eq!(check_challenge(&sealer, "", 0, b"pw"), None);
        assert_eq!(check_challenge(&sealer, "1.2.3.zz", 0, b"pw"), None);
    }

    #[test]
    fn recovery_codes_are_distinct_and_match_their_digests() {
        let (codes, digests) = recovery_codes();
        assert_eq!(codes.len(), RECOVERY_CODES);
        for (code, digest) in codes.iter().zip(&digests) {
            let c = code.expose();
            assert_eq!(c.len(), 11);
            assert_eq!(&c[5..6], "-");
            let plain = c.replace('-', "").to_uppercase();
            assert_eq!(recovery_digest(&plain), *digest, "any letter case");
        }
        let mut unique = digests.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), RECOVERY_CODES);
    }

    #[test]
    fn the_qr_code_is_an_svg_document() {
        let svg = qr_svg("otpauth://totp/Natter:a?secret=ABC").unwrap();
        assert!(svg.starts_with("<?xml"), "{}", &svg[..40]);
        assert!(svg.contains("<svg"));
    }
}
