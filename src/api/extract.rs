//! Request extractors that answer in the API's error format: a size-limited JSON body,
//! the bearer-token user, the client address, numeric path ids and query parameters.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{
    ConnectInfo, FromRequest, FromRequestParts, MatchedPath, Query, RawPathParams, Request,
};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;
use super::scopes::{self, Needs, Scopes};
use crate::auth::token_hash;
use crate::clock::now_ms;
use crate::model::User;
use crate::store::TokenHash;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON request body of at most [`MAX_BODY_BYTES`]. Malformed JSON is `invalid_json`; a
/// well-formed body of the wrong shape is `invalid_field` naming the field.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.config.http.body_timeout;
        let read = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES);
        let bytes = tokio::time::timeout(limit, read)
            .await
            .map_err(|_| ApiError::request_timeout(limit))?
            .map_err(|_| ApiError::payload_too_large(MAX_BODY_BYTES))?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a JSON document into `T`, with the API's error codes. An empty body reads as
/// `null`, so `Option<T>` bodies may be left out.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"null"
    } else {
        bytes
    };
    // serde reads an array into a struct, field by field: every body is an object.
    if bytes.trim_ascii_start().starts_with(b"[") {
        return Err(ApiError::invalid_field(
            "body",
            "the body must be a JSON object with the documented fields",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || inner.is_io() {
            return ApiError::invalid_json(format!("the body is not valid JSON: {inner}"));
        }
        let message = inner.to_string();
        if path != "." {
            return ApiError::invalid_field(path, message);
        }
        // A missing or unknown field names itself. A body of the wrong type is "body", told
        // in our words: serde's would name an internal Rust type.
        match Some(&message)
            .filter(|m| m.starts_with("missing field") || m.starts_with("unknown field"))
            .and_then(|m| backticked(m))
        {
            Some(field) => ApiError::invalid_field(field, message),
            None => ApiError::invalid_field(
                "body",
                "the body must be a JSON object with the documented fields",
            ),
        }
    })
}

/// The first `name` in a serde message like "missing field `name`".
fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

/// The user behind the request's bearer token (a session's or an API key's), that
/// token's hash, when it expires (Unix ms; `i64::MAX` for a key that never does), and an
/// API key's scopes. As an extractor it also checks that the key may use the route
/// ([`scopes::required`]).
pub struct Authed {
    pub user: User,
    pub token: TokenHash,
    pub expires_at: i64,
    /// `None` for a session, which may do all its user may.
    pub scopes: Option<Scopes>,
}

/// A session's last use is written at most this often (ms).
const TOUCH_EVERY_MS: i64 = 5 * 60 * 1000;
/// An API key's, at most this often (ms): its owner reads it to find unused keys.
const KEY_TOUCH_EVERY_MS: i64 = 60 * 1000;

/// How an API key's token starts (a session's is bare hex): the server tells the two
/// apart, and so can a secret scanner.
pub const API_KEY_PREFIX: &str = "ntk_";

impl FromRequestParts<AppState> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or_else(ApiError::unauthorized)?;
        let authed = authenticate(state, token).await?;
        if let Some(scopes) = authed.scopes {
            let route = parts
                .extensions
                .get::<MatchedPath>()
                .map(MatchedPath::as_str);
            let needs = route.and_then(|r| scopes::required(&parts.method, r));
            match needs {
                Some(Needs::Scope(s)) if scopes.contains(s) => {}
                Some(Needs::Scope(s)) => return Err(ApiError::insufficient_scope(s.name())),
                Some(Needs::Session) | None => return Err(ApiError::session_required()),
            }
        }
        Ok(authed)
    }
}

/// The user of a bearer token, from the session cache or the store.
pub async fn authenticate(state: &AppState, token: &str) -> Result<Authed, ApiError> {
    let token = Some(token.trim())
        .filter(|t| !t.is_empty() && t.len() <= 256)
        .ok_or_else(ApiError::unauthorized)?;
    let is_key = token.starts_with(API_KEY_PREFIX);
    let token = token_hash(token);
    let now = now_ms();
    let trusted_since = state.gateway.bus.trusted_since();
    if let Some((user, expires_at, scopes)) = state.sessions.get(&token, now, trusted_since) {
        return Ok(Authed {
            user,
            token,
            expires_at,
            scopes,
        });
    }
    let generation = state.sessions.generation();
    if is_key {
        return authenticate_key(state, token, now, generation).await;
    }
    let found = state
        .store
        .session_user(token, now)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    if found.last_used_at < now - TOUCH_EVERY_MS {
        // Off the request's path; a failure only leaves the time coarser.
        let store = std::sync::Arc::clone(&state.store);
        tokio::spawn(async move {
            if let Err(e) = store.touch_session(token, now).await {
                tracing::debug!(error = %e, "record a session's last use");
            }
        });
    }
    state.sessions.insert(
        generation,
        token,
        found.user.clone(),
        found.expires_at,
        None,
    );
    Ok(Authed {
        user: found.user,
        token,
        expires_at: found.expires_at,
        scopes: None,
    })
}

/// The account behind an API key, from the store (the caller looked in the cache).
async fn authenticate_key(
    state: &AppState,
    token: TokenHash,
    now: i64,
    generation: u64,
) -> Result<Authed, ApiError> {
    let found = state
        .store
        .key_user(token, now)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    if found.key.last_used_at.unwrap_or(0) < now - KEY_TOUCH_EVERY_MS {
        let store = std::sync::Arc::clone(&state.store);
        tokio::spawn(async move {
            if let Err(e) = store.touch_api_key(token, now).await {
                tracing::debug!(error = %e, "record an API key's last use");
            }
        });
    }
    let scopes = Scopes::parse_stored(&found.key.scopes);
    let expires_at = found.key.expires_at.unwrap_or(i64::MAX);
    state.sessions.insert(
        generation,
        token,
        found.user.clone(),
        expires_at,
        Some(scopes),
    );
    Ok(Authed {
        user: found.user,
        token,
        expires_at,
        scopes: Some(scopes),
    })
}

/// The client's address: the connection's peer, or, when the peer is a trusted proxy
/// (`--trusted-proxies`), the rightmost address in `X-Forwarded-For` that is not one
/// (unspecified when the server runs without a peer address).
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let trusted = &state.config.trusted_proxies;
        let forwarded = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok());
        Ok(Self(client_ip(peer, forwarded, trusted)))
    }
}

/// Walks `X-Forwarded-For` from the right (the hop nearest us) past trusted proxies; an
/// entry that is not an address ends the walk at the last trusted hop, since whoever
/// wrote it cannot be believed about anything further left.
fn client_ip<'a>(
    peer: IpAddr,
    forwarded: impl DoubleEndedIterator<Item = &'a str>,
    trusted: &[IpAddr],
) -> IpAddr {
    // A dual-stack listener sees IPv4 clients as IPv4-mapped IPv6 addresses.
    let peer = peer.to_canonical();
    if !trusted.contains(&peer) {
        return peer;
    }
    let hops: Vec<&str> = forwarded.flat_map(|v| v.split(',')).collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.trim().parse::<IpAddr>().map(|ip| ip.to_canonical()) {
            Ok(ip) => {
                client = ip;
                if !trusted.contains(&ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// The request's `User-Agent`, at most 200 characters, without control, bidi or invisible
/// characters (it is shown to the user in their session list).
pub struct UserAgent(pub String);

impl<S: Send + Sync> FromRequestParts<S> for UserAgent {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let raw = parts
            .headers
            .get(header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        // Shown in the owner's session list: nothing that could disguise it there.
        let shown = |c: &char| {
            !c.is_control()
                && !crate::chars::is_bidi_override(*c)
                && !crate::chars::is_bidi_mark(*c)
                && !crate::chars::is_invisible(*c)
        };
        Ok(Self(raw.chars().filter(shown).take(200).collect()))
    }
}

/// The numeric ids of the path, in order. An id that is not a decimal number names
/// nothing, so it is `not_found`.
pub struct PathIds<const N: usize>(pub [i64; N]);

impl<const N: usize, S: Send + Sync> FromRequestParts<S> for PathIds<N> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found())?;
        let mut ids = [0i64; N];
        let mut n = 0;
        for (_, value) in &params {
            if n == N {
                return Err(ApiError::not_found());
            }
            ids[n] = parse_id(value).ok_or_else(ApiError::not_found)?;
            n += 1;
        }
        if n != N {
            return Err(ApiError::not_found());
        }
        Ok(Self(ids))
    }
}

/// A positive decimal id, written as ids are sent: digits only, no sign or leading zero
/// (the OpenAPI document's `Id` pattern).
pub fn parse_id(s: &str) -> Option<i64> {
    if !s.bytes().all(|b| b.is_ascii_digit()) || s.starts_with('0') {
        return None;
    }
    s.parse::<i64>().ok()
}

/// The query string's parameters, parsed one by one with field-naming errors.
pub struct Params(HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(map) = Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid_field("query", e.body_text()))?;
        Ok(Self(map))
    }
}

impl Params {
    pub fn str(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// An integer parameter within `min..=max`, if present.
    pub fn int(&self, name: &'static str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        let Some(raw) = self.0.get(name) else {
            return Ok(None);
        };
        match raw.parse::<i64>() {
            Ok(v) if (min..=max).contains(&v) => Ok(Some(v)),
            _ => Err(ApiError::invalid_field(
                name,
                format!("{name} must be an integer from {min} to {max}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// serde would read `[null, null]` as a profile change of two absent fields.
    #[test]
    fn a_body_is_an_object_never_an_array() {
        use crate::wire::dto::UpdateProfile;
        for body in [&b"[null, null]"[..], b"  []", b"[\"hi\"]"] {
            let e = parse_json::<UpdateProfile>(body).unwrap_err();
            assert_eq!(e.detail().field.as_deref(), Some("body"), "{body:?}");
        }
        let ok = parse_json::<UpdateProfile>(br#"{"display_name": null}"#).unwrap();
        assert_eq!(ok.display_name, Some(None));
        assert_eq!(ok.about, None);
    }

    #[test]
    fn the_client_address_comes_from_trusted_proxies_only() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let proxy = ip("10.0.0.1");
        let trusted = [proxy, ip("10.0.0.2")];
        let xff = |v: &'static [&'static str]| v.iter().copied();
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_ip(ip("1.2.3.4"), xff(&["9.9.9.9"]), &trusted),
            ip("1.2.3.4")
        );
        // Through one proxy.
        assert_eq!(client_ip(proxy, xff(&["5.6.7.8"]), &trusted), ip("5.6.7.8"));
        // A client's forged entry on the left is skipped: the rightmost untrusted wins.
        assert_eq!(
            client_ip(proxy, xff(&["6.6.6.6, 5.6.7.8", "10.0.0.2"]), &trusted),
            ip("5.6.7.8")
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(client_ip(proxy, xff(&["5.6.7.8, junk"]), &trusted), proxy);
        // No header: the proxy itself.
        assert_eq!(client_ip(proxy, xff(&[]), &trusted), proxy);
    }
    use serde::Deserialize;

    #[allow(dead_code)]
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        text: String,
        n: Option<u8>,
    }

    fn code(r: Result<Body, ApiError>) -> (&'static str, Option<String>) {
        let e = r.unwrap_err();
        (e.code, e.field)
    }

    #[test]
    fn classifies_json_errors() {
        assert_eq!(code(parse_json(b"{\"text\":")).0, "invalid_json");
        assert_eq!(code(parse_json(b"not json")).0, "invalid_json");
        assert_eq!(
            code(parse_json(b"{}")),
            ("invalid_field", Some("text".into()))
        );
        assert_eq!(
            code(parse_json(b"{\"text\":5}")),
            ("invalid_field", Some("text".into()))
        );
        assert_eq!(
            code(parse_json(b"{\"text\":\"a\",\"n\":300}")),
            ("invalid_field", Some("n".into()))
        );
        assert_eq!(
            code(parse_json(b"{\"text\":\"a\",\"x\":1}")).0,
            "invalid_field"
        );
        assert!(parse_json::<Body>(b"{\"text\":\"a\"}").is_ok());
        assert_eq!(
            code(parse_json(b"5")),
            ("invalid_field", Some("body".into()))
        );
        assert_eq!(
            code(parse_json(b"")),
            ("invalid_field", Some("body".into()))
        );
    }

    #[test]
    fn ids_are_positive_decimals() {
        assert_eq!(parse_id("42"), Some(42));
        assert_eq!(parse_id("-1"), None);
        assert_eq!(parse_id("0"), None);
        assert_eq!(parse_id("99999999999999999999"), None);
        assert_eq!(parse_id("4x"), None);
        assert_eq!(parse_id("+42"), None);
        assert_eq!(parse_id("042"), None);
        assert_eq!(parse_id(""), None);
        assert_eq!(parse_id("9223372036854775807"), Some(i64::MAX));
    }
}
